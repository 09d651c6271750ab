"""Talking to a collector over a real socket with hand-built batches."""

from __future__ import annotations

import grpc

from gpuledger.agent.shipper import STREAM_METHOD
from gpuledger.v1 import telemetry_pb2 as pb


def send_batches(address: str, batches: list[bytes], metadata=(), timeout: float = 60.0) -> list[pb.Ack]:
    """Send batches on ONE stream, in order; return the acks."""
    with grpc.insecure_channel(address) as ch:
        call = ch.stream_stream(STREAM_METHOD, request_serializer=None,
                                response_deserializer=pb.Ack.FromString)
        return list(call(iter(batches), metadata=metadata, timeout=timeout))
