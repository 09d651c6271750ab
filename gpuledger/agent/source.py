"""What a GPU source gives the agent: static facts once, then readings at every poll.

Readings are columnar numpy arrays of intervals (see kernels.py): a utilization sample covers
its driver sample period, a gauge reading covers the time since the previous reading of the
same GPU, a process reading covers the time since the process was last seen. Timestamps are
microseconds of the agent's wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class GpuFacts:
    uuid: str
    index: int
    name: str
    mem_total_bytes: int
    util_method: str  # samples | rates | gpm | simulated | replay | none
    mig: bool = False
    parent_uuid: str = ""  # a MIG instance: the physical GPU it is carved from
    share: float = 1.0  # the fraction of a physical GPU it is priced as (a MIG instance: its slices / the GPU's)


def mig_share(name: str, max_slices: int = 7) -> float:
    """Share of the physical GPU from a MIG profile name such as 'NVIDIA A100 MIG 3g.20gb': its compute
    slices over the GPU's (nvmlDeviceGetMaxMigDeviceCount: 7 on A100/H100, 4 on A30)."""
    import re

    m = re.search(r"(\d+)g\.\d+gb", name)
    if not m:
        return 1.0
    return min(1.0, int(m.group(1)) / max_slices)


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_ms: int  # with pid, the identity: a reused pid is another process
    command: str = ""
    container_id: str = ""
    pod_uid: str = ""
    tags: tuple[tuple[str, str], ...] = ()


@dataclass
class StateSeconds:
    """Seconds in each GPU state: a source's own ground truth (simulator, replayed log)."""

    active_s: float = 0.0
    idle_held_s: float = 0.0
    idle_free_s: float = 0.0
    unmonitored_s: float = 0.0

    def add(self, other: StateSeconds) -> None:
        self.active_s += other.active_s
        self.idle_held_s += other.idle_held_s
        self.idle_free_s += other.idle_free_s
        self.unmonitored_s += other.unmonitored_s

    def total_s(self) -> float:
        return self.active_s + self.idle_held_s + self.idle_free_s + self.unmonitored_s


def _i32(a=()):
    return np.asarray(a, np.int32)


def _i64(a=()):
    return np.asarray(a, np.int64)


def _f32(a=()):
    return np.asarray(a, np.float32)


def _f64(a=()):
    return np.asarray(a, np.float64)


@dataclass
class UtilReadings:
    gpu: np.ndarray = field(default_factory=_i32)  # index into source.gpus()
    t0_us: np.ndarray = field(default_factory=_i64)
    t1_us: np.ndarray = field(default_factory=_i64)
    pct: np.ndarray = field(default_factory=_f32)  # NaN: no valid reading
    held: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # a process held the GPU


@dataclass
class GaugeReadings:
    gpu: np.ndarray = field(default_factory=_i32)
    t_us: np.ndarray = field(default_factory=_i64)
    energy_mj: np.ndarray = field(default_factory=_f64)  # total-energy counter, NaN if absent
    power_mw: np.ndarray = field(default_factory=_f64)
    mem_used_bytes: np.ndarray = field(default_factory=_f64)
    temp_c: np.ndarray = field(default_factory=_f64)


@dataclass
class GpmReadings:
    """Hopper GPM metrics over [t0, t1): percentages of the interval."""

    gpu: np.ndarray = field(default_factory=_i32)
    t0_us: np.ndarray = field(default_factory=_i64)
    t1_us: np.ndarray = field(default_factory=_i64)
    sm_active_pct: np.ndarray = field(default_factory=_f32)
    sm_occupancy_pct: np.ndarray = field(default_factory=_f32)
    tensor_active_pct: np.ndarray = field(default_factory=_f32)
    dram_active_pct: np.ndarray = field(default_factory=_f32)


@dataclass
class ProcReadings:
    gpu: np.ndarray = field(default_factory=_i32)
    proc: np.ndarray = field(default_factory=_i32)  # index into Readings.processes
    t0_us: np.ndarray = field(default_factory=_i64)
    t1_us: np.ndarray = field(default_factory=_i64)
    pct: np.ndarray = field(default_factory=_f32)  # the process's share of the interval busy (0..100)
    mem_bytes: np.ndarray = field(default_factory=_f64)


def from_rows(cls, rows):
    """One of the columnar reading classes above from row tuples in field order (dtypes as declared)."""
    empty = cls()
    if not rows:
        return empty
    return cls(*(np.asarray(col, getattr(empty, f.name).dtype)
                 for col, f in zip(zip(*rows, strict=True), fields(cls), strict=True)))


def from_parts(cls, parts):
    """One of the columnar reading classes from tuples of column arrays, concatenated."""
    empty = cls()
    if not parts:
        return empty
    return cls(*(np.concatenate([p[i] for p in parts]).astype(getattr(empty, f.name).dtype, copy=False)
                 for i, f in enumerate(fields(cls))))


@dataclass
class Readings:
    util: UtilReadings = field(default_factory=UtilReadings)
    gauges: GaugeReadings = field(default_factory=GaugeReadings)
    gpm: GpmReadings = field(default_factory=GpmReadings)
    procs: ProcReadings = field(default_factory=ProcReadings)
    processes: list[ProcessIdentity] = field(default_factory=list)
    unhealthy: tuple[int, ...] = ()  # GPUs that failed this poll (device down)


class GpuSource(Protocol):
    """One method to read, one to describe; `close()` is safe to call twice."""

    def gpus(self) -> list[GpuFacts]: ...

    def poll(self, now_us: int) -> Readings: ...

    def close(self) -> None: ...
