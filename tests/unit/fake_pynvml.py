"""FAKE pynvml (nvidia-ml-py) for tests: the one test double, standing at the hardware boundary.

`FakeNvml` has the names NvmlSource uses from the real module (functions, constants, the
NVMLError class family with the real codes and subclass names) and answers from fixtures shaped
like real GPUs:

- `h100()`: Hopper, utilization sample buffer every 1/6 s, GPM, field values, process utilization;
- `a100_mig()`: Ampere with MIG enabled (two instances, 3g.20gb and 4g.20gb): no utilization for
  the instances and no GPM, as on real A100s; `h100_mig()` is the Hopper variant with GPM per instance;
- `t4()`: Turing without sample buffers (nvmlDeviceGetSamples raises NVMLError_NotSupported, so
  the source falls back to nvmlDeviceGetUtilizationRates) and without the POWER_INSTANT field.

Time: the fake has a driver clock. `advance_to(agent_us)` moves it to `agent_us + driver_offset_us`
and lets every GPU produce what it would have produced, with its `load` (percent) constant since
the previous advance: one utilization sample per period (the integer percent of the period a
kernel ran) into a ring buffer, per-process samples, energy, GPM counters.
`nvmlDeviceGetSamples(h, NVML_GPU_UTILIZATION_SAMPLES, last_ts)` returns the samples newer than
the cursor and raises NOT_FOUND when there are none, as the driver does. `history` keeps every
sample produced, so tests compute the exact expected busy time.
"""

from __future__ import annotations

import hashlib
import string
from collections import Counter, deque
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------- constants (nvml.h / nvidia-ml-py)
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_UNKNOWN = 999

NVML_GPU_UTILIZATION_SAMPLES = 1
NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG = 2
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4
NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION = 83
NVML_FI_DEV_POWER_INSTANT = 186
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_DEVICE_ARCH_TURING = 6
NVML_DEVICE_ARCH_AMPERE = 7
NVML_DEVICE_ARCH_HOPPER = 9
NVML_GPM_METRIC_GRAPHICS_UTIL = 1
NVML_GPM_METRIC_SM_UTIL = 2
NVML_GPM_METRIC_SM_OCCUPANCY = 3
NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
NVML_GPM_METRIC_DRAM_BW_UTIL = 10
NVML_GPM_METRICS_GET_VERSION = 1
nvmlClocksEventReasonGpuIdle = 0x1


# ----------------------------------------------------------------------------- errors, as nvidia-ml-py builds them
class NVMLError(Exception):
    _valClassMapping: dict = {}
    _errcode_to_string = {
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
        NVML_ERROR_NOT_FOUND: "Not Found",
        NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
        NVML_ERROR_GPU_IS_LOST: "GPU is lost",
        NVML_ERROR_UNKNOWN: "Unknown Error",
    }

    def __new__(cls, value):
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self):
        return self._errcode_to_string.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other):
        return self.value == other.value

    __hash__ = Exception.__hash__


def _make_error_classes() -> None:
    g = globals()
    for name in [n for n in g if n.startswith("NVML_ERROR_")]:
        cls_name = "NVMLError_" + string.capwords(name.replace("NVML_ERROR_", ""), "_").replace("_", "")
        val = g[name]

        def new(cls, *args, _val=val):
            return NVMLError.__new__(cls, _val)

        cls = type(cls_name, (NVMLError,), {"__new__": new})
        g[cls_name] = cls
        NVMLError._valClassMapping[val] = cls


_make_error_classes()
# names the tests use (created above, listed for readers and linters)
NVMLError_NotSupported = globals()["NVMLError_NotSupported"]
NVMLError_GpuIsLost = globals()["NVMLError_GpuIsLost"]
NVMLError_NotFound = globals()["NVMLError_NotFound"]
NVMLError_LibraryNotFound = globals()["NVMLError_LibraryNotFound"]
NVMLError_DriverNotLoaded = globals()["NVMLError_DriverNotLoaded"]


# ----------------------------------------------------------------------------- structures (same field names)
@dataclass
class _Value:
    dVal: float = 0.0
    uiVal: int = 0
    ulVal: int = 0
    ullVal: int = 0
    sllVal: int = 0
    siVal: int = 0
    usVal: int = 0


@dataclass
class c_nvmlSample_t:
    timeStamp: int
    sampleValue: _Value


@dataclass
class c_nvmlFieldValue_t:
    fieldId: int
    scopeId: int
    timestamp: int
    latencyUsec: int
    valueType: int
    nvmlReturn: int
    value: _Value


@dataclass
class c_nvmlMemory_t:
    total: int
    free: int
    used: int


@dataclass
class c_nvmlUtilization_t:
    gpu: int
    memory: int


@dataclass
class c_nvmlProcessInfo_t:
    pid: int
    usedGpuMemory: int | None
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass
class c_nvmlProcessUtilizationSample_t:
    pid: int
    timeStamp: int
    smUtil: int
    memUtil: int = 0
    encUtil: int = 0
    decUtil: int = 0


@dataclass
class c_nvmlPciInfo_t:
    busId: bytes


@dataclass
class c_nvmlGpmSupport_t:
    version: int = 1
    isSupportedDevice: int = 0


@dataclass
class c_nvmlGpmMetric_t:
    metricId: int = 0
    nvmlReturn: int = 0
    value: float = 0.0


class c_nvmlGpmMetricsGet_t:
    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1 = None
        self.sample2 = None
        self.metrics = [c_nvmlGpmMetric_t() for _ in range(16)]


class _GpmSample:
    """Opaque GPM sample: a snapshot of the device's activity counters."""

    def __init__(self) -> None:
        self.ts: int | None = None
        self.counters: dict[int, float] = {}


# GPM counters: metric id -> fraction of the load it tracks
_GPM_SHARE = {NVML_GPM_METRIC_GRAPHICS_UTIL: 1.0, NVML_GPM_METRIC_SM_UTIL: 0.9, NVML_GPM_METRIC_SM_OCCUPANCY: 0.5,
              NVML_GPM_METRIC_ANY_TENSOR_UTIL: 0.6, NVML_GPM_METRIC_DRAM_BW_UTIL: 0.3}


# ----------------------------------------------------------------------------- fixture devices
def _uuid(prefix: str, seed: str) -> str:
    h = hashlib.md5(seed.encode()).hexdigest()
    return f"{prefix}-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


@dataclass
class FakeProcess:
    pid: int
    used_bytes: int | None = 2 << 30
    sm_util: float | None = None  # None: the GPU's load


class _Counters:
    def __init__(self) -> None:
        self.load = 0.0
        self.gpm = dict.fromkeys(_GPM_SHARE, 0.0)  # metric -> active microseconds

    def run(self, dt: int) -> None:
        for k, share in _GPM_SHARE.items():
            self.gpm[k] += dt * self.load / 100.0 * share


@dataclass
class FakeMig:
    uuid: str
    gi_id: int
    ci_id: int
    profile: str
    mem_total_bytes: int
    processes: list = field(default_factory=list)
    mem_used_bytes: int = 0
    counters: _Counters = field(default_factory=_Counters)

    @property
    def load(self) -> float:
        return self.counters.load

    @load.setter
    def load(self, v: float) -> None:
        self.counters.load = v


class FakeGpu:
    def __init__(self, *, index: int, name: str, arch: int, mem_total_mib: int, power_limit_w: float,
                 idle_w: float, max_w: float, sample_period_us: int | None, gpm: bool, seed: str,
                 mig: list[FakeMig] | None = None, power_instant_field: bool = True, proc_util: bool = True,
                 buffer_len: int = 120, samples_when_idle: bool = True, temp_c: int = 33,
                 unsupported: frozenset = frozenset(), keep_history: bool = True) -> None:
        self.index = index
        self.uuid = _uuid("GPU", seed)
        self.name = name
        self.arch = arch
        self.mem_total = mem_total_mib << 20
        self.power_limit_mw = int(power_limit_w * 1000)
        self.idle_w, self.max_w = idle_w, max_w
        self.period = sample_period_us
        self.gpm_supported = gpm
        self.mig = mig or []
        self.power_instant_field = power_instant_field
        self.proc_util = proc_util
        self.samples_when_idle = samples_when_idle
        self.pci_bus_id = f"00000000:{0x18 + index * 0x10:02X}:00.0".encode()
        self.temp_c = temp_c
        self.unsupported = set(unsupported)  # NVML function names this device answers with NotSupported
        # state the test drives
        self.load = 0.0
        self.processes: list[FakeProcess] = []
        self.mem_used_bytes = 0
        self.lost = False
        # state the fake keeps
        self.samples: deque = deque(maxlen=buffer_len)
        self.proc_samples: deque = deque(maxlen=buffer_len * 4)
        self.history: list[tuple[int, int, int]] = []  # (driver ts, period, pct) of every sample produced
        self.keep_history = keep_history
        self.energy_mj = 0.0
        self.power_mw = idle_w * 1000
        self.counters = _Counters()
        self._t: int | None = None
        self._next_ts: int | None = None

    def _advance(self, t: int) -> None:
        """Run the GPU from its last time to t at the current (constant) load."""
        if self._t is None:
            self._t = t
            self._busy = 0.0
            if self.period:
                # the buffer already holds a few samples from before the agent started
                self._next_ts = t - 5 * self.period
                self._busy_at_sample = -6 * self.period * self.load / 100.0
                self._produce(t)
            return
        if t <= self._t:
            return
        dt = t - self._t
        self.power_mw = (self.idle_w + (self.max_w - self.idle_w) * self.load / 100.0) * 1000
        self.energy_mj += self.power_mw * dt / 1e6  # mW x s = mJ
        self.counters.load = self.load
        self.counters.run(dt)
        for m in self.mig:
            m.counters.run(dt)
        if self.period:
            self._produce(t)
        self._busy += dt * self.load / 100.0
        self._t = t

    def _produce(self, t: int) -> None:
        """Samples ending by t: each the integer percent of its period a kernel ran, as the driver reports."""
        while self._next_ts <= t:
            ts = self._next_ts
            busy = self._busy + (ts - self._t) * self.load / 100.0
            pct = int(round(100.0 * (busy - self._busy_at_sample) / self.period))
            self._busy_at_sample = busy
            if pct > 0 or self.samples_when_idle:
                self.samples.append((ts, pct))
                if self.keep_history:
                    self.history.append((ts, self.period, pct))
                for p in self.processes:
                    sm = pct if p.sm_util is None else int(p.sm_util)
                    if sm > 0 and self.proc_util:
                        self.proc_samples.append((ts, p.pid, sm))
            self._next_ts += self.period


def h100(index: int = 0, **kw) -> FakeGpu:
    return FakeGpu(index=index, name="NVIDIA H100 80GB HBM3", arch=NVML_DEVICE_ARCH_HOPPER, mem_total_mib=81559,
                   power_limit_w=700, idle_w=70, max_w=700, sample_period_us=166_667, gpm=True,
                   seed=f"h100-{index}", **kw)


def a100_mig(index: int = 0, **kw) -> FakeGpu:
    gpu = FakeGpu(index=index, name="NVIDIA A100-SXM4-40GB", arch=NVML_DEVICE_ARCH_AMPERE, mem_total_mib=40960,
                  power_limit_w=400, idle_w=50, max_w=400, sample_period_us=None, gpm=False, seed=f"a100-{index}", **kw)
    gpu.mig = [FakeMig(_uuid("MIG", f"a100-{index}-gi1"), gi_id=1, ci_id=0, profile="3g.20gb",
                       mem_total_bytes=19968 << 20),
               FakeMig(_uuid("MIG", f"a100-{index}-gi2"), gi_id=2, ci_id=0, profile="4g.20gb",
                       mem_total_bytes=19968 << 20)]
    return gpu


def h100_mig(index: int = 0, **kw) -> FakeGpu:
    gpu = FakeGpu(index=index, name="NVIDIA H100 80GB HBM3", arch=NVML_DEVICE_ARCH_HOPPER, mem_total_mib=81559,
                  power_limit_w=700, idle_w=70, max_w=700, sample_period_us=None, gpm=True, seed=f"h100m-{index}",
                  **kw)
    gpu.mig = [FakeMig(_uuid("MIG", f"h100m-{index}-gi1"), gi_id=1, ci_id=0, profile="3g.40gb",
                       mem_total_bytes=40192 << 20)]
    return gpu


def t4(index: int = 0, **kw) -> FakeGpu:
    return FakeGpu(index=index, name="Tesla T4", arch=NVML_DEVICE_ARCH_TURING, mem_total_mib=15360,
                   power_limit_w=70, idle_w=10, max_w=70, sample_period_us=None, gpm=False, seed=f"t4-{index}",
                   power_instant_field=False, **kw)


# ----------------------------------------------------------------------------- the module
@dataclass
class _Handle:
    gpu: FakeGpu
    mig: FakeMig | None = None


def _err(code: int) -> NVMLError:
    return NVMLError(code)


class FakeNvml:
    """A pynvml stand-in for one machine. Unknown NVML_* names resolve to this module's constants."""

    def __init__(self, gpus: list[FakeGpu], *, driver_offset_us: int = 0, driver_version: str = "550.54.15",
                 nvml_version: str = "12.550.54.15", cuda_version: int = 12040, init_error: int | None = None,
                 clock=None) -> None:
        self.gpus = gpus
        self.clock = clock  # optional: with a clock, every call first advances the fake to clock.now_us()
        self.driver_offset_us = driver_offset_us
        self.driver_version = driver_version
        self.nvml_version = nvml_version
        self.cuda_version = cuda_version
        self.init_error = init_error
        self.inited = 0
        self.calls: Counter = Counter()
        self.now_us: int | None = None

    def __getattr__(self, name: str):
        g = globals()
        if name.startswith(("NVML_", "NVMLError", "c_nvml", "nvmlClocks")) and name in g:
            return g[name]
        raise AttributeError(name)

    # -- driving the fake
    def advance_to(self, agent_us: int) -> None:
        self.now_us = agent_us + self.driver_offset_us
        for g in self.gpus:
            g._advance(self.now_us)

    def _h(self, handle: _Handle, what: str) -> _Handle:
        if self.clock is not None and self.clock.now_us() + self.driver_offset_us != self.now_us:
            self.advance_to(self.clock.now_us())
        self.calls[what] += 1
        if handle.gpu.lost:
            raise _err(NVML_ERROR_GPU_IS_LOST)
        if what in handle.gpu.unsupported:
            raise _err(NVML_ERROR_NOT_SUPPORTED)
        return handle

    # -- system
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise _err(self.init_error)
        self.inited += 1

    def nvmlShutdown(self) -> None:
        self.inited -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver_version

    def nvmlSystemGetNVMLVersion(self) -> str:
        return self.nvml_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda_version

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        if not 0 <= index < len(self.gpus):
            raise _err(NVML_ERROR_INVALID_ARGUMENT)
        return self._h(_Handle(self.gpus[index]), "nvmlDeviceGetHandleByIndex")

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> _Handle:
        for g in self.gpus:
            if g.uuid == uuid:
                return self._h(_Handle(g), "nvmlDeviceGetHandleByUUID")
        raise _err(NVML_ERROR_NOT_FOUND)

    # -- static facts
    def nvmlDeviceGetUUID(self, h: _Handle) -> str:
        h = self._h(h, "nvmlDeviceGetUUID")
        return h.mig.uuid if h.mig else h.gpu.uuid

    def nvmlDeviceGetName(self, h: _Handle) -> str:
        h = self._h(h, "nvmlDeviceGetName")
        return f"{h.gpu.name} MIG {h.mig.profile}" if h.mig else h.gpu.name

    def nvmlDeviceGetPciInfo(self, h: _Handle) -> c_nvmlPciInfo_t:
        return c_nvmlPciInfo_t(self._h(h, "nvmlDeviceGetPciInfo").gpu.pci_bus_id)

    def nvmlDeviceGetEnforcedPowerLimit(self, h: _Handle) -> int:
        h = self._h(h, "nvmlDeviceGetEnforcedPowerLimit")
        if h.mig:
            raise _err(NVML_ERROR_NOT_SUPPORTED)
        return h.gpu.power_limit_mw

    def nvmlDeviceGetArchitecture(self, h: _Handle) -> int:
        return self._h(h, "nvmlDeviceGetArchitecture").gpu.arch

    def nvmlDeviceGetMigMode(self, h: _Handle) -> list[int]:
        h = self._h(h, "nvmlDeviceGetMigMode")
        if h.gpu.arch < NVML_DEVICE_ARCH_AMPERE:
            raise _err(NVML_ERROR_NOT_SUPPORTED)
        # MIG mode is on when instances exist, or when set explicitly (a MIG GPU with none yet)
        on = h.gpu.mig or getattr(h.gpu, "mig_mode", False)
        mode = NVML_DEVICE_MIG_ENABLE if on else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: _Handle) -> int:
        self._h(h, "nvmlDeviceGetMaxMigDeviceCount")
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: _Handle, index: int) -> _Handle:
        h = self._h(h, "nvmlDeviceGetMigDeviceHandleByIndex")
        if index >= len(h.gpu.mig):
            raise _err(NVML_ERROR_NOT_FOUND)
        return _Handle(h.gpu, h.gpu.mig[index])

    def nvmlDeviceGetGpuInstanceId(self, h: _Handle) -> int:
        h = self._h(h, "nvmlDeviceGetGpuInstanceId")
        if not h.mig:
            raise _err(NVML_ERROR_INVALID_ARGUMENT)
        return h.mig.gi_id

    # -- utilization
    def nvmlDeviceGetSamples(self, h: _Handle, sampling_type: int, last_ts: int):
        h = self._h(h, "nvmlDeviceGetSamples")
        if sampling_type != NVML_GPU_UTILIZATION_SAMPLES:
            raise _err(NVML_ERROR_INVALID_ARGUMENT)
        if h.mig or not h.gpu.period or h.gpu.mig:
            raise _err(NVML_ERROR_NOT_SUPPORTED)
        out = [c_nvmlSample_t(ts, _Value(uiVal=pct)) for ts, pct in h.gpu.samples if ts > last_ts]
        if not out:
            raise _err(NVML_ERROR_NOT_FOUND)
        return NVML_VALUE_TYPE_UNSIGNED_INT, out

    def nvmlDeviceGetUtilizationRates(self, h: _Handle) -> c_nvmlUtilization_t:
        h = self._h(h, "nvmlDeviceGetUtilizationRates")
        if h.mig or h.gpu.mig:
            raise _err(NVML_ERROR_NOT_SUPPORTED)
        return c_nvmlUtilization_t(gpu=int(round(h.gpu.load)), memory=int(h.gpu.load) // 2)

    # -- gauges
    def nvmlDeviceGetFieldValues(self, h: _Handle, field_ids: list[int]) -> list[c_nvmlFieldValue_t]:
        h = self._h(h, "nvmlDeviceGetFieldValues")
        out = []
        for fid in field_ids:
            ret, vt, val = NVML_ERROR_NOT_SUPPORTED, NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, _Value()
            if not h.mig and fid == NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION:
                ret, val = NVML_SUCCESS, _Value(ullVal=int(h.gpu.energy_mj))
            elif not h.mig and fid == NVML_FI_DEV_POWER_INSTANT and h.gpu.power_instant_field:
                ret, vt, val = NVML_SUCCESS, NVML_VALUE_TYPE_UNSIGNED_INT, _Value(uiVal=int(h.gpu.power_mw))
            out.append(c_nvmlFieldValue_t(fid, 0, self.now_us or 0, 0, vt, ret, val))
        return out

    def nvmlDeviceGetTotalEnergyConsumption(self, h: _Handle) -> int:
        h = self._h(h, "nvmlDeviceGetTotalEnergyConsumption")
        if h.mig:
            raise _err(NVML_ERROR_NOT_SUPPORTED)
        return int(h.gpu.energy_mj)

    def nvmlDeviceGetPowerUsage(self, h: _Handle) -> int:
        h = self._h(h, "nvmlDeviceGetPowerUsage")
        if h.mig:
            raise _err(NVML_ERROR_NOT_SUPPORTED)
        return int(h.gpu.power_mw)

    def nvmlDeviceGetMemoryInfo(self, h: _Handle) -> c_nvmlMemory_t:
        h = self._h(h, "nvmlDeviceGetMemoryInfo")
        if h.mig:
            used = h.mig.mem_used_bytes or sum(p.used_bytes or 0 for p in h.mig.processes)
            return c_nvmlMemory_t(h.mig.mem_total_bytes, h.mig.mem_total_bytes - used, used)
        used = h.gpu.mem_used_bytes or sum(p.used_bytes or 0 for p in h.gpu.processes)
        return c_nvmlMemory_t(h.gpu.mem_total, h.gpu.mem_total - used, used)

    def nvmlDeviceGetTemperature(self, h: _Handle, sensor: int) -> int:
        h = self._h(h, "nvmlDeviceGetTemperature")
        if h.mig:
            raise _err(NVML_ERROR_NOT_SUPPORTED)
        return h.gpu.temp_c + int(h.gpu.load // 3)

    def nvmlDeviceGetClockInfo(self, h: _Handle, clock: int) -> int:
        h = self._h(h, "nvmlDeviceGetClockInfo")
        return 1980 if h.gpu.load else 345

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: _Handle) -> int:
        h = self._h(h, "nvmlDeviceGetCurrentClocksEventReasons")
        return 0 if h.gpu.load else nvmlClocksEventReasonGpuIdle

    # -- processes
    def nvmlDeviceGetComputeRunningProcesses(self, h: _Handle) -> list[c_nvmlProcessInfo_t]:
        h = self._h(h, "nvmlDeviceGetComputeRunningProcesses")
        if h.mig:
            return [c_nvmlProcessInfo_t(p.pid, p.used_bytes, h.mig.gi_id, h.mig.ci_id) for p in h.mig.processes]
        if h.gpu.mig:
            return [c_nvmlProcessInfo_t(p.pid, p.used_bytes, m.gi_id, m.ci_id) for m in h.gpu.mig
                    for p in m.processes]
        return [c_nvmlProcessInfo_t(p.pid, p.used_bytes) for p in h.gpu.processes]

    def nvmlDeviceGetProcessUtilization(self, h: _Handle, last_ts: int) -> list[c_nvmlProcessUtilizationSample_t]:
        h = self._h(h, "nvmlDeviceGetProcessUtilization")
        if h.mig or h.gpu.mig or not h.gpu.proc_util:
            raise _err(NVML_ERROR_NOT_SUPPORTED)
        out = [c_nvmlProcessUtilizationSample_t(pid, ts, sm) for ts, pid, sm in h.gpu.proc_samples if ts > last_ts]
        if not out:
            raise _err(NVML_ERROR_NOT_FOUND)
        return out

    # -- GPM
    def nvmlGpmQueryDeviceSupport(self, h: _Handle) -> c_nvmlGpmSupport_t:
        h = self._h(h, "nvmlGpmQueryDeviceSupport")
        return c_nvmlGpmSupport_t(isSupportedDevice=int(h.gpu.gpm_supported))

    def nvmlGpmSampleAlloc(self) -> _GpmSample:
        self.calls["nvmlGpmSampleAlloc"] += 1
        return _GpmSample()

    def nvmlGpmSampleFree(self, sample: _GpmSample) -> None:
        self.calls["nvmlGpmSampleFree"] += 1

    def nvmlGpmSampleGet(self, h: _Handle, sample: _GpmSample) -> _GpmSample:
        h = self._h(h, "nvmlGpmSampleGet")
        if not h.gpu.gpm_supported or h.mig or h.gpu.mig:
            raise _err(NVML_ERROR_NOT_SUPPORTED)
        sample.ts, sample.counters = self.now_us, dict(h.gpu.counters.gpm)
        return sample

    def nvmlGpmMigSampleGet(self, h: _Handle, gi_id: int, sample: _GpmSample) -> _GpmSample:
        h = self._h(h, "nvmlGpmMigSampleGet")
        if not h.gpu.gpm_supported:
            raise _err(NVML_ERROR_NOT_SUPPORTED)
        mig = next((m for m in h.gpu.mig if m.gi_id == gi_id), None)
        if mig is None:
            raise _err(NVML_ERROR_INVALID_ARGUMENT)
        sample.ts, sample.counters = self.now_us, dict(mig.counters.gpm)
        return sample

    def nvmlGpmMetricsGet(self, mg: c_nvmlGpmMetricsGet_t) -> c_nvmlGpmMetricsGet_t:
        self.calls["nvmlGpmMetricsGet"] += 1
        s1, s2 = mg.sample1, mg.sample2
        if s1 is None or s2 is None or s1.ts is None or s2.ts is None or s2.ts <= s1.ts:
            raise _err(NVML_ERROR_INVALID_ARGUMENT)
        dt = s2.ts - s1.ts
        for i in range(mg.numMetrics):
            m = mg.metrics[i]
            if m.metricId in s2.counters:
                m.nvmlReturn, m.value = NVML_SUCCESS, 100.0 * (s2.counters[m.metricId] - s1.counters[m.metricId]) / dt
            else:
                m.nvmlReturn, m.value = NVML_ERROR_NOT_SUPPORTED, 0.0
        return mg


def library_missing() -> FakeNvml:
    """A machine without the driver: nvmlInit raises NVMLError_LibraryNotFound, as nvidia-ml-py does."""
    return FakeNvml([], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)
