"""Builders of real batches (simulator -> windower -> encode_batch) for tests."""

from __future__ import annotations

import time

import pyarrow as pa

from gpuledger.agent.runtime import encode_batch, gpu_infos, host_facts
from gpuledger.agent.simulate import SimGpu, SimulatedSource
from gpuledger.agent.windows import Windower
from gpuledger.config import AgentConfig
from gpuledger.schema import from_ipc, to_ipc
from gpuledger.v1 import telemetry_pb2 as pb


def aligned_start_us(hours_ago: float = 2.0) -> int:
    return (int(time.time() * 1e6) - int(hours_ago * 3600e6)) // 10_000_000 * 10_000_000


def sim_batch(seq: int = 1, host_id: str = "h1", start_us: int | None = None, minutes: float = 2.0,
              profiles=("training", "notebook"), instance_type: str = "g5.12xlarge", provider: str = "aws",
              region: str = "us-east-1") -> pb.WindowBatch:
    start_us = aligned_start_us() if start_us is None else start_us
    src = SimulatedSource(host_id, "A10G", [SimGpu(p) for p in profiles], start_us, seed=5)
    w = Windower(src.gpus(), 10.0, 0.0, start_us=start_us)
    end = start_us + int(minutes * 60e6)
    w.add(src.poll(end))
    closed = w.close(end)
    cfg = AgentConfig(host_id=host_id, provider=provider, region=region, instance_type=instance_type)
    raw = encode_batch(host_id, 1, seq, host_facts(cfg, src.gpus()), gpu_infos(src.gpus()), closed, 0,
                       int(time.time() * 1000))
    return pb.WindowBatch.FromString(raw)


def replace_gpu_column(batch: pb.WindowBatch, name: str, values) -> pb.WindowBatch:
    """A copy of the batch with one GPU-window column replaced (to make it invalid)."""
    t = from_ipc(batch.gpu_windows_arrow)
    i = t.schema.get_field_index(name)
    t = t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type))
    out = pb.WindowBatch()
    out.CopyFrom(batch)
    out.gpu_windows_arrow = to_ipc(t)
    return out
