"""TLS, mutual TLS, per-agent tokens, the read-only query token, and what is refused."""

from __future__ import annotations

import logging
import os

import grpc
import pytest

from gpuledger.agent.shipper import STREAM_METHOD, Shipper
from gpuledger.agent.spool import Spool
from gpuledger.client import fetch_report
from gpuledger.collector.service import build_collector
from gpuledger.config import AgentConfig, CollectorConfig, ConfigError
from gpuledger.security import add_agent_token, agent_channel, collector_security, hash_token
from gpuledger.v1 import telemetry_pb2 as pb
from tests.helpers import sim_batch
from tests.integration.certs import make_pki


@pytest.fixture
def secure(tmp_path):
    pki = make_pki(tmp_path)
    tokens = tmp_path / "agent-tokens"
    token_a = add_agent_token(str(tokens), "host-a")
    token_b = add_agent_token(str(tokens), "host-b")
    query = "q-" + "x" * 40
    (tmp_path / "query.token").write_text(hash_token(query) + "\n")
    cfg = CollectorConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "data"), tokens_file=str(tokens),
                          query_token_file=str(tmp_path / "query.token"), tls_cert_file=pki["server"],
                          tls_key_file=pki["server_key"], tls_client_ca_file=pki["ca"]).validate()
    c = build_collector(cfg)
    c.start()
    yield {"collector": c, "pki": pki, "a": token_a, "b": token_b, "query": query, "tmp": tmp_path}
    c.stop(grace_s=1)
    c.store.close()


def _creds(pki, client_cert=True):
    read = lambda p: open(p, "rb").read()  # noqa: E731
    if client_cert:
        return grpc.ssl_channel_credentials(read(pki["ca"]), read(pki["client_key"]), read(pki["client"]))
    return grpc.ssl_channel_credentials(read(pki["ca"]))


def _send(address, creds, token, batches):
    with grpc.secure_channel(address, creds) as ch:
        call = ch.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString)
        md = (("authorization", f"Bearer {token}"),) if token else ()
        return list(call(iter(batches), metadata=md, timeout=30))


def _rows(c, host):
    return c.store.query_rows("SELECT count() FROM gpuledger.gpu_windows FINAL WHERE host_id = {h:String}",
                              {"h": host})[0][0]


def test_agent_with_token_and_client_cert_delivers(secure, caplog):
    caplog.set_level(logging.DEBUG)
    c, pki = secure["collector"], secure["pki"]
    acks = _send(c.address, _creds(pki), secure["a"], [sim_batch(seq=1, host_id="host-a").SerializeToString()])
    assert [(a.code, a.stored_windows) for a in acks] == [(0, 24)]
    assert _rows(c, "host-a") == 24
    # the agent's own shipper, configured from files, over mutual TLS
    (secure["tmp"] / "b.token").write_text(secure["b"])
    os.chmod(secure["tmp"] / "b.token", 0o600)
    cfg = AgentConfig(host_id="host-b", token_file=str(secure["tmp"] / "b.token"), tls_ca_file=pki["ca"],
                      tls_cert_file=pki["client"], tls_key_file=pki["client_key"])
    token, creds = agent_channel(cfg)
    spool = Spool(secure["tmp"] / "spool-b", fsync=False)
    spool.append(sim_batch(seq=1, host_id="host-b").SerializeToString(), 24)
    sh = Shipper(c.address, spool, token=token, channel_credentials=creds).start()
    assert sh.drain(30)
    sh.close()
    assert _rows(c, "host-b") == 24
    # no token ever reaches a log
    text = caplog.text
    assert secure["a"] not in text and secure["b"] not in text and secure["query"] not in text


def test_missing_or_wrong_token_is_unauthenticated(secure):
    c, pki = secure["collector"], secure["pki"]
    for token in (None, "not-a-token"):
        with pytest.raises(grpc.RpcError) as e:
            _send(c.address, _creds(pki), token, [sim_batch(seq=1, host_id="host-a").SerializeToString()])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _rows(c, "host-a") == 0


def test_token_of_one_host_cannot_write_another(secure):
    c, pki = secure["collector"], secure["pki"]
    acks = _send(c.address, _creds(pki), secure["a"], [sim_batch(seq=1, host_id="host-b").SerializeToString(),
                                                        sim_batch(seq=2, host_id="host-a").SerializeToString()])
    # refused, but retryable: a misconfigured host keeps its windows spooled until the token is fixed
    assert acks[0].code == grpc.StatusCode.PERMISSION_DENIED.value[0] and acks[0].retryable
    assert "token of host 'host-a' cannot write windows for host 'host-b'" in acks[0].message
    assert acks[1].code == 0
    assert (_rows(c, "host-b"), _rows(c, "host-a")) == (0, 24)


def test_without_client_certificate_or_tls_the_connection_fails(secure):
    c, pki = secure["collector"], secure["pki"]
    with pytest.raises(grpc.RpcError) as e:
        _send(c.address, _creds(pki, client_cert=False), secure["a"], [sim_batch(seq=1, host_id="host-a")
                                                                        .SerializeToString()])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(c.address) as ch:
        call = ch.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString)
        with pytest.raises(grpc.RpcError) as e:
            list(call(iter([b"x"]), metadata=(("authorization", f"Bearer {secure['a']}"),), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_query_token_is_read_only_and_agent_tokens_cannot_read(secure):
    c, pki = secure["collector"], secure["pki"]
    _send(c.address, _creds(pki), secure["a"], [sim_batch(seq=1, host_id="host-a").SerializeToString()])
    table, _ = fetch_report(c.address, "idle", 0, 4_102_444_800_000, "host", token=secure["query"],
                            credentials=_creds(pki))
    assert table.column("host").to_pylist() == ["host-a"]
    with pytest.raises(grpc.RpcError) as e:
        fetch_report(c.address, "idle", 0, 4_102_444_800_000, "host", token=secure["a"], credentials=_creds(pki))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        fetch_report(c.address, "idle", 0, 4_102_444_800_000, "host", token=None, credentials=_creds(pki))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:  # the query token cannot write
        _send(c.address, _creds(pki), secure["query"], [sim_batch(seq=2, host_id="host-a").SerializeToString()])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_listen_rules(tmp_path):
    pki = make_pki(tmp_path)
    base = dict(data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="not a loopback address and TLS is not configured"):
        collector_security(CollectorConfig(listen="0.0.0.0:4700", **base))
    (tmp_path / "t").write_text("")
    with pytest.raises(ConfigError, match="no credentials are configured"):
        collector_security(CollectorConfig(listen="0.0.0.0:4700", tls_cert_file=pki["server"],
                                           tls_key_file=pki["server_key"], **base))
    auth, creds, note = collector_security(CollectorConfig(listen="0.0.0.0:4700", insecure=True, **base))
    assert auth is None and creds is None
    auth, creds, note = collector_security(CollectorConfig(listen="127.0.0.1:4700", **base))
    assert "no credentials configured: serving loopback only" in note
    with pytest.raises(ConfigError, match="line 1: expected 'HOST_ID sha256"):
        (tmp_path / "bad").write_text("host-a plaintext-token\n")
        collector_security(CollectorConfig(listen="127.0.0.1:4700", tokens_file=str(tmp_path / "bad"), **base))


def test_agent_warns_about_a_token_file_readable_by_others(tmp_path, caplog):
    f = tmp_path / "token"
    f.write_text("secret-token-value")
    os.chmod(f, 0o644)
    with caplog.at_level(logging.WARNING):
        token, _ = agent_channel(AgentConfig(host_id="h", token_file=str(f)))
    assert token == "secret-token-value"
    assert "readable by group or others" in caplog.text and "secret-token-value" not in caplog.text
    caplog.clear()
    os.chmod(f, 0o600)
    agent_channel(AgentConfig(host_id="h", token_file=str(f)))
    assert "readable" not in caplog.text
