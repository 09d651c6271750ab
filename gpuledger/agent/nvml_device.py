"""The device model of NvmlSource: what is known about each GPU (or MIG instance) and the state its
polls carry from one to the next, as typed records.

A `Device` is a GPU, a MIG instance ("mig"), or the unallocated slices of a MIG GPU ("mig-free").
Its parts:
- `DeviceStatic`: facts read once at discovery (memory, power limit, PCI bus, architecture, MIG);
- `UtilCursor`: the utilization sample cursor, the driver-to-agent clock offset, the observed
  sample period and how far readings cover;
- `GpmState`: Hopper GPM sample buffers and the last metrics;
- `GaugePlan`: which gauges one FieldValues call reads and which need calls of their own;
- `ProcState`: the compute processes seen at the last poll and the per-process utilization cursor;
- `Health`: whether the device is down and when to retry it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from gpuledger.agent.source import ProcessIdentity, mig_share

NAN = float("nan")
DEFAULT_PERIOD_US = 166_667  # Volta and newer sample utilization every 1/6 s

GPU = "gpu"
MIG = "mig"
MIG_FREE = "mig-free"


@dataclass(frozen=True)
class DeviceStatic:
    mem_total_bytes: int = 0
    power_limit_mw: int | None = None
    pci_bus_id: str = ""
    architecture: int | None = None
    mig_mode: bool = False
    gpm_supported: bool = False
    mig_slices: int = 0  # a MIG instance or free slices: the parent GPU's slices (7 on A100/H100)
    free_slices: int = 0  # mig-free: the slices no instance holds

    def for_probe(self) -> dict:
        out = {"mem_total_bytes": self.mem_total_bytes, "power_limit_mw": self.power_limit_mw,
               "pci_bus_id": self.pci_bus_id, "architecture": self.architecture, "mig_mode": self.mig_mode,
               "gpm_supported": self.gpm_supported}
        if self.mig_slices:
            out["mig_slices"] = self.mig_slices
        if self.free_slices:
            out["free_slices"] = self.free_slices
        return out


@dataclass
class UtilCursor:
    cursor: int = 0  # driver timestamp of the newest sample read
    offset_us: int | None = None  # agent clock - driver clock
    period_us: int = DEFAULT_PERIOD_US
    diffs: deque = field(default_factory=lambda: deque(maxlen=64))  # observed sample periods
    frontier_us: int | None = None  # util readings cover up to here (agent clock)
    last_poll_us: int | None = None  # last clean poll
    present: bool = False  # held (a compute process, or on Kubernetes a pod) at the last clean poll
    proc_present: bool = False  # a compute process at the last clean poll


@dataclass
class GpmState:
    enabled: bool = False
    bufs: list = field(default_factory=list)  # two nvmlGpmSample buffers, used in turn
    get: object = None  # the c_nvmlGpmMetricsGet_t reused every poll
    prev_us: int | None = None
    cur: int = 0  # index of the buffer holding the previous sample
    last: dict = field(default_factory=dict)  # metric name -> percent, from the last interval


@dataclass
class GaugePlan:
    batch: list = field(default_factory=list)  # (field id, name) read by one FieldValues call
    single: list = field(default_factory=list)  # names read by their own call


@dataclass
class Proc:
    ident: ProcessIdentity
    mem_bytes: float


@dataclass
class ProcState:
    seen: dict = field(default_factory=dict)  # (pid, start_ms) -> Proc present at the last poll
    cursor: int = 0  # per-process utilization cursor (driver timestamp)
    util: bool = True  # per-process utilization available
    listed: bool = True  # the compute process list available


@dataclass
class Health:
    down: bool = False
    down_count: int = 0
    next_retry_us: int = 0


@dataclass
class Device:
    pos: int  # position in gpus(); the Readings key
    uuid: str
    index: int  # display only
    handle: object
    kind: str  # GPU | MIG | MIG_FREE
    util_method: str  # samples | rates | gpm | none
    name: str = ""
    parent: object = None  # MIG: the parent GPU's handle
    parent_uuid: str = ""
    gi_id: int = -1
    static: DeviceStatic = field(default_factory=DeviceStatic)
    util: UtilCursor = field(default_factory=UtilCursor)
    gpm: GpmState = field(default_factory=GpmState)
    gauges: GaugePlan = field(default_factory=GaugePlan)
    procs: ProcState = field(default_factory=ProcState)
    health: Health = field(default_factory=Health)
    polls: int = 0
    extras: dict = field(default_factory=dict)  # clocks and clock event reasons, every few polls

    def share(self) -> float:
        """The fraction of its physical GPU the device is priced as."""
        slots = self.static.mig_slices or 7
        if self.kind == MIG:
            return mig_share(self.name, slots)
        if self.kind == MIG_FREE:
            return self.static.free_slices / slots
        return 1.0


class GaugeRow(NamedTuple):
    """One poll's gauges of one device (NaN where absent)."""

    pos: int
    t_us: int
    energy_mj: float
    power_mw: float
    mem_used_bytes: float
    temp_c: float


class UtilRow(NamedTuple):
    pos: int
    t0_us: int
    t1_us: int
    pct: float
    held: int


class GpmRow(NamedTuple):
    pos: int
    t0_us: int
    t1_us: int
    sm_active_pct: float
    sm_occupancy_pct: float
    tensor_active_pct: float
    dram_active_pct: float


class ProcRow(NamedTuple):
    ident: ProcessIdentity
    t0_us: int
    t1_us: int
    pct: float
    mem_bytes: float


class Rows:
    """Per-poll accumulation of reading rows for one device (committed only if the poll succeeds)."""

    __slots__ = ("util", "gpm", "gauge", "procs")

    def __init__(self) -> None:
        self.util: list[UtilRow] = []
        self.gpm: list[GpmRow] = []
        self.gauge: GaugeRow | None = None
        self.procs: list[ProcRow] = []


class Held:
    """Presence over one poll interval: `prev` until `mid`, `now` after it."""

    __slots__ = ("prev", "now", "mid")

    def __init__(self, prev: bool, now: bool, mid: int) -> None:
        self.prev, self.now, self.mid = prev, now, mid

    def parts(self, t0: int, t1: int):
        if self.prev == self.now or not (t0 < self.mid < t1):
            yield t0, t1, (self.prev if t1 <= self.mid else self.now)
        else:
            yield t0, self.mid, self.prev
            yield self.mid, t1, self.now

    def emit(self, out: list, pos: int, t0: int, t1: int, pct: float) -> None:
        for a, b, h in self.parts(t0, t1):
            if b > a:
                out.append(UtilRow(pos, a, b, pct, 1 if h else 0))


def sample_list(res, cursor: int) -> list[tuple[int, float]]:
    """(timestamp, percent) of utilization samples newer than the cursor, oldest first."""
    if not res:
        return []
    _vtype, samples = res
    out = []
    for s in samples:
        ts = int(s.timeStamp)
        if ts > cursor:
            out.append((ts, float(min(s.sampleValue.uiVal, 100))))
    out.sort()
    return out


_VALUE_ATTR = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def field_value(fv) -> float:
    return float(getattr(fv.value, _VALUE_ATTR.get(int(fv.valueType), "ullVal")))
