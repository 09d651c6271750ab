"""A collector no client can starve: idle streams cost no worker, each credential has a stream cap,
idle streams are closed, and reports and health are served throughout. Real gRPC over real sockets."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpuledger.agent.shipper import STREAM_METHOD
from gpuledger.client import fetch_report
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import OK, Collector
from gpuledger.security import Auth, hash_token, new_token
from gpuledger.v1 import telemetry_pb2 as pb
from tests.helpers import sim_batch
from tests.integration.streams import send_batches


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="gpuledger.v1.Query"),
                                                     timeout=5).status


def _hold(channel, token: str | None, release: threading.Event):
    """Open a stream that sends nothing until `release` is set."""

    def requests():
        release.wait()
        return
        yield  # a generator that ends without sending

    call = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString)
    md = (("authorization", f"Bearer {token}"),) if token else ()
    return call(requests(), metadata=md)


def test_one_credential_cannot_starve_agents_reports_or_health(store):
    a, b, q = new_token(), new_token(), new_token()
    auth = Auth({hash_token(a): "host-a", hash_token(b): "host-b"}, {hash_token(q): "finance"})
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0", auth=auth, max_streams_per_agent=2)
    c.start()
    release = threading.Event()
    ch = grpc.insecure_channel(c.address)
    try:
        held = [_hold(ch, a, release) for _ in range(2)]
        assert _wait(lambda: c.active_streams == 2)
        third = _hold(ch, a, release)
        with pytest.raises(grpc.RpcError) as e:
            list(third)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "stream limit per agent reached: 2 streams already open for this credential" in e.value.details()
        assert "collector.max_streams_per_agent" in e.value.details()
        # while host-a holds its streams: reports, health, and another agent are all served
        table, _ = fetch_report(c.address, "idle", 0, int(time.time() * 1000), "host", token=q)
        assert table.num_rows == 0
        assert _health(c.address) == health_pb2.HealthCheckResponse.SERVING
        acks = send_batches(c.address, [sim_batch(host_id="host-b").SerializeToString()],
                            metadata=(("authorization", f"Bearer {b}"),))
        assert [x.code for x in acks] == [OK]
        assert c.streams_refused == 1
    finally:
        release.set()
        for call in held:
            call.cancel()
        ch.close()
        c.stop(grace_s=1)


def test_hundreds_of_idle_streams_leave_reports_and_health_served(tmp_path):
    """Before: a thread per stream, and 1,100 idle streams made reports and health checks fail. The
    collector runs in its own process here, so that its threads can be counted."""
    from tests.integration.faults import CollectorProcess, free_port

    proc = CollectorProcess(tmp_path / "data", free_port()).start()
    release = threading.Event()
    channels = [grpc.insecure_channel(proc.address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(4)]
    held = []
    try:
        before = _threads(proc.proc.pid)
        held = [_hold(channels[i % 4], None, release) for i in range(400)]
        time.sleep(2)
        assert all(call.running() for call in held[::50])  # still open: not refused, not closed
        assert _threads(proc.proc.pid) <= before + 4  # no thread per stream
        table, _ = fetch_report(proc.address, "idle", 0, int(time.time() * 1000), "host")
        assert table.num_rows == 0
        assert _health(proc.address) == health_pb2.HealthCheckResponse.SERVING
        assert [x.code for x in send_batches(proc.address, [sim_batch(host_id="busy-day").SerializeToString()])] \
            == [OK]
    finally:
        release.set()
        for call in held:
            call.cancel()
        for ch in channels:
            ch.close()
        proc.kill(15)


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))


def test_without_tokens_the_cap_is_per_host_and_idle_streams_are_closed(store):
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0", max_streams_per_agent=1, stream_idle_timeout_s=1.0)
    c.start()
    try:
        release = threading.Event()
        with grpc.insecure_channel(c.address) as ch:
            call = _hold(ch, None, release)
            with pytest.raises(grpc.RpcError) as e:
                list(call)  # nothing sent for a second: closed
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "stream idle for 1 s" in e.value.details()
        assert c.streams_idle_closed == 1
        # one host, two streams at once: the second is refused once its first batch names the host
        gate = threading.Event()
        first = sim_batch(host_id="one-host").SerializeToString()

        def slow():
            yield first
            gate.wait(10)

        with grpc.insecure_channel(c.address) as ch:
            call = ch.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString)
            open_call = call(slow())
            assert next(open_call).code == OK
            with pytest.raises(grpc.RpcError) as e:
                list(call(iter([sim_batch(seq=2, host_id="one-host").SerializeToString()])))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "for this host" in e.value.details()
            # another host is not held back by it
            assert [x.code for x in send_batches(c.address, [sim_batch(host_id="other").SerializeToString()])] == [OK]
            gate.set()
            open_call.cancel()
    finally:
        c.stop(grace_s=1)
