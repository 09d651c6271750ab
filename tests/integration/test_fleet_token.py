"""A fleet token (host id `*` in the tokens file): one secret for every agent of a Kubernetes
DaemonSet, writing for any host id; per-host tokens keep their limit; the query token stays apart."""

from __future__ import annotations

import grpc

from gpuledger.collector.service import build_collector
from gpuledger.config import CollectorConfig
from gpuledger.security import add_agent_token, hash_token
from tests.helpers import sim_batch
from tests.integration.certs import make_pki
from tests.integration.test_security import _creds, _rows, _send


def test_fleet_token_writes_for_any_host_and_host_tokens_keep_their_limit(tmp_path):
    pki = make_pki(tmp_path)
    tokens = tmp_path / "agent-tokens"
    fleet = add_agent_token(str(tokens), "*")
    host_a = add_agent_token(str(tokens), "host-a")
    (tmp_path / "query.token").write_text(hash_token("q" * 43) + "\n")
    cfg = CollectorConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "data"), tokens_file=str(tokens),
                          query_token_file=str(tmp_path / "query.token"), tls_cert_file=pki["server"],
                          tls_key_file=pki["server_key"]).validate()
    c = build_collector(cfg)
    c.start()
    try:
        creds = _creds(pki, client_cert=False)
        acks = _send(c.address, creds, fleet, [sim_batch(seq=1, host_id="node-1").SerializeToString(),
                                               sim_batch(seq=2, host_id="node-2").SerializeToString()])
        assert [a.code for a in acks] == [0, 0]
        acks = _send(c.address, creds, host_a, [sim_batch(seq=1, host_id="node-3").SerializeToString()])
        assert acks[0].code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert (_rows(c, "node-1"), _rows(c, "node-2"), _rows(c, "node-3")) == (24, 24, 0)
    finally:
        c.stop(grace_s=1)
        c.store.close()
