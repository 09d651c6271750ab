"""Client of the collector's Query service, used by the CLI reports."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import grpc
import pyarrow as pa

from gpuledger.v1 import telemetry_pb2 as pb

_REL = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str | None, now_ms: int, default_ms: int | None = None) -> int:
    """ISO 8601 (`2026-11-01`, `2026-11-01T08:00:00Z`), relative (`7d`, `12h`: that long ago), or `now`."""
    if text is None or text == "":
        if default_ms is None:
            raise ValueError("a time is required")
        return default_ms
    text = text.strip()
    if text == "now":
        return now_ms
    m = _REL.match(text)
    if m:
        return now_ms - int(float(m.group(1)) * _UNIT_S[m.group(2)] * 1000)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"cannot read {text!r} as a time: use ISO 8601 (2026-11-01T08:00Z) or a relative "
                         f"duration (7d, 12h, 30m)") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def fetch_report(target: str, report: str, since_ms: int, until_ms: int, by: str, filters: dict | None = None,
                 token: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 timeout_s: float = 600.0) -> tuple[pa.Table, pb.ReportReply]:
    opts = [("grpc.max_receive_message_length", 256 << 20)]  # the collector sends up to 256 MiB (a month's FOCUS rows)
    channel = grpc.secure_channel(target, credentials, opts) if credentials else grpc.insecure_channel(target, opts)
    with channel:
        call = channel.unary_unary("/gpuledger.v1.Query/Report", request_serializer=pb.ReportRequest.SerializeToString,
                                   response_deserializer=pb.ReportReply.FromString)
        md = (("authorization", f"Bearer {token}"),) if token else ()
        reply = call(pb.ReportRequest(report=report, since_ms=since_ms, until_ms=until_ms, by=by,
                                      filters=filters or {}), timeout=timeout_s, metadata=md)
    table = pa.ipc.open_stream(pa.py_buffer(reply.arrow)).read_all() if reply.arrow else pa.table({})
    return table, reply


def retire_host(target: str, host_id: str, at_ms: int = 0, note: str = "", token: str | None = None,
                credentials: grpc.ChannelCredentials | None = None, timeout_s: float = 60.0) -> pb.RetireReply:
    """Tell the collector a host is gone from at_ms (0: now); needs the admin token where tokens are on."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        call = channel.unary_unary("/gpuledger.v1.Admin/Retire", request_serializer=pb.RetireRequest.SerializeToString,
                                   response_deserializer=pb.RetireReply.FromString)
        md = (("authorization", f"Bearer {token}"),) if token else ()
        return call(pb.RetireRequest(host_id=host_id, at_ms=at_ms, note=note), timeout=timeout_s, metadata=md)
