"""NvmlSource: the GpuSource on real GPUs. The only module that imports `pynvml` (nvidia-ml-py).

The module is a parameter (`NvmlSource(nvml=...)`), so tests pass a fake fed by fixtures.

What it reads, per GPU and poll:
- utilization from the driver's sample buffer (`nvmlDeviceGetSamples`) with a per-device cursor:
  each sample covers the time since the previous sample, so no driver period is missed or counted
  twice. Driver timestamps are a cursor, mapped to the agent clock by an offset. Where the buffer
  is not supported, `nvmlDeviceGetUtilizationRates` covers the time since the previous poll.
  GpuFacts.util_method records which ("samples", "rates", "gpm", "none");
- energy (total-energy counter, mJ) and power through one `nvmlDeviceGetFieldValues` call where
  the driver has it, else individual calls; memory used and temperature; clocks and clock event
  (throttle) reasons every `slow_every` polls (kept in `extras`);
- on Hopper and newer, GPM metrics (SM active, SM occupancy, tensor active, DRAM bandwidth)
  from two GPM samples at least 100 ms apart;
- compute processes and their memory, per-process SM utilization with its own cursor, and the
  identity of each process from /proc (attribution.py).

States: a utilization reading is `held` while a compute process holds the GPU (presence is
sampled at each poll; a change is placed halfway between two polls). The driver may keep no
samples while a GPU is idle (NOT_FOUND): time after the newest sample, up to `holdback` before
the poll, is then idle, since NVML answered and had nothing newer. A gap between samples is idle
only if this agent polled the GPU cleanly throughout (at most `max_poll_gap_s` apart); otherwise
(the agent stalled and the buffer may have wrapped) it stays unmonitored.

MIG: NVML has no utilization for MIG instances. Each instance is its own GpuFacts (uuid
"MIG-...", mig=True). With GPM (Hopper) the instance's graphics activity gives its utilization
("gpm"); without it ("none") an instance with no process is idle-free (nothing can run on it)
and an instance with a process is unmonitored: we cannot tell busy from idle, and say so.

Errors are sorted (as nvitop does) into: absent (a function or field this GPU/driver lacks: NaN,
logged once per device and field), device down (GPU lost etc.: the GPU is reported in
Readings.unhealthy, its time stays unmonitored, the other GPUs go on, it is retried every
`retry_s`), and fatal (no library/driver at start: NvmlUnavailable with what to fix).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from statistics import median

from gpuledger.agent.attribution import ProcAttributor
from gpuledger.agent.source import (
    GaugeReadings,
    GpmReadings,
    GpuFacts,
    ProcessIdentity,
    ProcReadings,
    Readings,
    UtilReadings,
    from_rows,
    mig_share,
)

log = logging.getLogger(__name__)

NAN = float("nan")
DEFAULT_PERIOD_US = 166_667  # Volta and newer sample utilization every 1/6 s
GPM_MIN_INTERVAL_US = 100_000
MIB = 1 << 20

# field ids (nvml.h); read from the module when it has them
FI_TOTAL_ENERGY = 83  # NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, mJ
FI_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT, mW
# GPM metric ids
GPM_GRAPHICS_UTIL = 1
GPM_SM_UTIL = 2
GPM_SM_OCCUPANCY = 3
GPM_ANY_TENSOR_UTIL = 5
GPM_DRAM_BW_UTIL = 10

_HINTS = {
    "LIBRARY_NOT_FOUND": "libnvidia-ml.so.1 was not found: install the NVIDIA driver (it ships NVML); in a "
                         "container, run with the NVIDIA Container Toolkit (docker --gpus all, or "
                         "runtimeClassName: nvidia on Kubernetes)",
    "DRIVER_NOT_LOADED": "the NVIDIA kernel driver is not loaded: check `nvidia-smi`, `lsmod | grep nvidia` "
                         "and dmesg",
    "LIB_RM_VERSION_MISMATCH": "the NVML library and the kernel driver have different versions (driver "
                               "upgraded without a reboot): reboot or reload the nvidia kernel modules",
    "NO_PERMISSION": "no permission to open /dev/nvidia*: run the agent as root or as a user that may "
                     "open the GPU devices",
}


class NvmlUnavailable(RuntimeError):
    """Fatal: NVML cannot be used on this machine. The message says what to install or fix."""


class _Absent(Exception):
    def __init__(self, what: str, code: int | None = None) -> None:
        super().__init__(what)
        self.code = code


class _Down(Exception):
    pass


def _s(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


@dataclass
class _Proc:
    ident: ProcessIdentity
    mem_bytes: float


@dataclass
class _Dev:
    pos: int  # position in gpus(); the Readings key
    uuid: str
    index: int  # display only
    handle: object
    kind: str  # gpu | mig | mig-free (the unallocated slices of a MIG GPU)
    util_method: str
    name: str = ""
    parent: object = None  # MIG: the parent GPU's handle
    parent_uuid: str = ""
    gi_id: int = -1
    static: dict = field(default_factory=dict)
    # utilization
    cursor: int = 0
    offset_us: int | None = None
    period_us: int = DEFAULT_PERIOD_US
    diffs: deque = field(default_factory=lambda: deque(maxlen=64))
    frontier_us: int | None = None  # util readings cover up to here (agent clock)
    last_poll_us: int | None = None  # last clean poll
    present: bool = False  # a compute process (or, on Kubernetes, a pod) held it at the last clean poll
    proc_present: bool = False  # a compute process held it at the last clean poll
    # GPM
    gpm: bool = False
    gpm_bufs: list = field(default_factory=list)
    gpm_get: object = None
    gpm_prev_us: int | None = None
    gpm_cur: int = 0
    gpm_last: dict = field(default_factory=dict)
    # gauges
    fields_batch: list = field(default_factory=list)  # (field id, name) read by one FieldValues call
    fields_single: list = field(default_factory=list)  # names read by their own call
    # processes
    procs: dict = field(default_factory=dict)  # (pid, start_ms) -> _Proc present at the last poll
    proc_cursor: int = 0
    proc_util: bool = True
    proc_list: bool = True
    # health
    down: bool = False
    down_count: int = 0
    next_retry_us: int = 0
    polls: int = 0
    extras: dict = field(default_factory=dict)


class _Rows:
    """Per-poll accumulation of reading rows for one device (committed only if the poll succeeds)."""

    __slots__ = ("util", "gpm", "gauge", "procs")

    def __init__(self) -> None:
        self.util: list[tuple] = []
        self.gpm: list[tuple] = []
        self.gauge: tuple | None = None
        self.procs: list[tuple] = []


class NvmlSource:
    """GpuSource over NVML. `nvml` is the pynvml module (or a fake with the same names)."""

    def __init__(self, nvml=None, *, attribution: ProcAttributor | None = None, proc_root: str = "/proc",
                 env_allowlist: tuple = (), holdback_s: float = 1.0, max_poll_gap_s: float = 5.0,
                 retry_s: float = 10.0, resync_s: float = 5.0, idle_mem_threshold_mib: int = 1024,
                 slow_every: int = 10, measure_calls: bool = False, pods=None) -> None:
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as e:
                raise NvmlUnavailable("the Python package nvidia-ml-py is not installed: pip install nvidia-ml-py") \
                    from e
        self.nv = nvml
        self.attribution = attribution or ProcAttributor(proc_root, env_allowlist)
        self.pods = pods  # PodAttribution (Kubernetes): which pods hold which GPUs; None off Kubernetes
        self.max_holdback_us = int(holdback_s * 1e6)
        self.max_poll_gap_us = int(max_poll_gap_s * 1e6)
        self.retry_us = int(retry_s * 1e6)
        self.resync_us = int(resync_s * 1e6)
        self.idle_mem_threshold = idle_mem_threshold_mib * MIB
        self.slow_every = max(1, int(slow_every))
        self.measure_calls = measure_calls
        self.call_stats: dict[str, list] = {}  # NVML function -> [calls, total ns, max ns] (measure_calls)
        self.absent: dict[str, set] = {}  # uuid -> fields/functions absent on this device
        self.down_events = 0
        self.late_samples = 0  # samples that arrived for time already covered
        self._logged: set = set()
        self._closed = False
        self._inited = False
        self._codes()
        self._init()
        try:
            self._devs: list[_Dev] = self._discover()
        except BaseException:
            self.close()
            raise
        self._facts = [GpuFacts(uuid=d.uuid, index=d.index, name=d.name,
                                mem_total_bytes=int(d.static.get("mem_total_bytes", 0)), util_method=d.util_method,
                                mig=d.kind in ("mig", "mig-free"), parent_uuid=d.parent_uuid,
                                share=_share(d)) for d in self._devs]

    # ------------------------------------------------------------------ error sorting
    def _codes(self) -> None:
        nv = self.nv

        def code(name: str, default: int) -> int:
            return int(getattr(nv, f"NVML_ERROR_{name}", default))

        self.E_NOT_FOUND = code("NOT_FOUND", 6)
        self.E_NOT_SUPPORTED = code("NOT_SUPPORTED", 3)
        self._unsupported_codes = {code("NOT_SUPPORTED", 3), code("FUNCTION_NOT_FOUND", 13)}
        self._absent_codes = {code(n, d) for n, d in (("NOT_SUPPORTED", 3), ("FUNCTION_NOT_FOUND", 13),
                                                      ("NO_PERMISSION", 4), ("NO_DATA", 21),
                                                      ("ARGUMENT_VERSION_MISMATCH", 25), ("DEPRECATED", 26),
                                                      ("INVALID_ARGUMENT", 2), ("NOT_FOUND", 6))}
        self._fatal_codes = {code(n, d): n for n, d in (("LIBRARY_NOT_FOUND", 12), ("DRIVER_NOT_LOADED", 9),
                                                         ("LIB_RM_VERSION_MISMATCH", 18), ("NO_PERMISSION", 4))}
        self.NVMLError = getattr(nv, "NVMLError", Exception)

    def _call(self, dev: _Dev | None, what: str, fn, *args, not_found_ok: bool = False):
        """Every NVML call: returns its result, or raises _Absent (NaN) or _Down (device down).

        With not_found_ok, NOT_FOUND returns None (no new samples: normal on an idle GPU).
        """
        t0 = time.perf_counter_ns() if self.measure_calls else 0
        try:
            return fn(*args)
        except self.NVMLError as e:
            value = getattr(e, "value", None)
            if value == self.E_NOT_FOUND and not_found_ok:
                return None
            if value in self._absent_codes:
                self._note_absent(dev, what, e)
                raise _Absent(what, value) from e
            raise _Down(f"{what}: {e}") from e
        except AttributeError as e:  # a function this nvidia-ml-py does not have
            self._note_absent(dev, what, e)
            raise _Absent(what) from e
        finally:
            if self.measure_calls:
                dt = time.perf_counter_ns() - t0
                st = self.call_stats.setdefault(getattr(fn, "__name__", what), [0, 0, 0])
                st[0] += 1
                st[1] += dt
                st[2] = max(st[2], dt)

    def _note_absent(self, dev: _Dev | None, what: str, e: Exception) -> None:
        key = (dev.uuid if dev else "", what)
        if key not in self._logged:
            self._logged.add(key)
            self.absent.setdefault(key[0], set()).add(what)
            log.info("%s: %s not available (%s); recorded as missing", dev.uuid if dev else "NVML", what, e)

    def _fn(self, name: str):
        return getattr(self.nv, name, None) or _missing(name)

    # ------------------------------------------------------------------ start
    def _init(self) -> None:
        try:
            self.nv.nvmlInit()
        except self.NVMLError as e:
            value = getattr(e, "value", None)
            name = self._fatal_codes.get(value)
            hint = _HINTS.get(name or "", "check that the NVIDIA driver works (`nvidia-smi`)")
            raise NvmlUnavailable(f"NVML failed to start ({e}): {hint}") from e
        self._inited = True
        self.driver_version = self._sys("nvmlSystemGetDriverVersion")
        self.nvml_version = self._sys("nvmlSystemGetNVMLVersion")
        cuda = self._sys("nvmlSystemGetCudaDriverVersion")
        self.cuda_driver_version = f"{int(cuda) // 1000}.{int(cuda) % 1000 // 10}" if cuda.isdigit() else cuda

    def _sys(self, name: str) -> str:
        try:
            return _s(self._call(None, name, self._fn(name)))
        except (_Absent, _Down):
            return ""

    def _discover(self) -> list[_Dev]:
        try:
            count = int(self._call(None, "nvmlDeviceGetCount", self.nv.nvmlDeviceGetCount))
        except (_Absent, _Down) as e:
            raise NvmlUnavailable(f"NVML cannot count GPUs ({e.__cause__}): check `nvidia-smi`") from e
        if count == 0:
            raise NvmlUnavailable("NVML sees no GPUs on this machine: check `nvidia-smi -L`")
        devs: list[_Dev] = []
        self.physical_gpu_count = 0
        for i in range(count):
            try:
                devs.extend(self._discover_one(i, len(devs)))
                self.physical_gpu_count += 1
            except (_Absent, _Down) as e:
                log.error("GPU %d: cannot read its identity (%s); it is not monitored", i, e.__cause__ or e)
        if not devs:
            raise NvmlUnavailable(f"none of the {count} GPUs NVML lists could be read: check `nvidia-smi`")
        return devs

    def _discover_one(self, i: int, pos: int) -> list[_Dev]:
        nv = self.nv
        h = self._call(None, "nvmlDeviceGetHandleByIndex", nv.nvmlDeviceGetHandleByIndex, i)
        uuid = _s(self._call(None, "nvmlDeviceGetUUID", nv.nvmlDeviceGetUUID, h))
        name = _s(self._call(None, "nvmlDeviceGetName", nv.nvmlDeviceGetName, h))
        probe = _Dev(pos=pos, uuid=uuid, index=i, handle=h, kind="gpu", util_method="none", name=name)
        static = {"mem_total_bytes": 0, "power_limit_mw": None, "pci_bus_id": "", "architecture": None,
                  "mig_mode": False, "gpm_supported": False}
        static["mem_total_bytes"] = int(self._opt(probe, "memory", nv.nvmlDeviceGetMemoryInfo, h, attr="total") or 0)
        static["power_limit_mw"] = self._opt(probe, "power_limit", self._fn("nvmlDeviceGetEnforcedPowerLimit"), h)
        pci = self._opt(probe, "pci_info", self._fn("nvmlDeviceGetPciInfo"), h)
        if pci is not None:
            static["pci_bus_id"] = _s(getattr(pci, "busId", b"")).strip("\0")
        static["architecture"] = self._opt(probe, "architecture", self._fn("nvmlDeviceGetArchitecture"), h)
        mig = self._opt(probe, "mig_mode", self._fn("nvmlDeviceGetMigMode"), h)
        enable = int(getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1))
        static["mig_mode"] = bool(mig is not None and int(mig[0]) == enable)
        sup = self._opt(probe, "gpm_support", self._fn("nvmlGpmQueryDeviceSupport"), h)
        static["gpm_supported"] = bool(sup is not None and int(getattr(sup, "isSupportedDevice", 0)))
        probe.static = static
        if static["mig_mode"]:
            return self._discover_mig(probe, pos)
        probe.util_method = self._util_method(probe)
        self._setup_fields(probe)
        if static["gpm_supported"]:
            self._setup_gpm(probe)
        return [probe]

    def _discover_mig(self, parent: _Dev, pos: int) -> list[_Dev]:
        nv = self.nv
        out = []
        try:
            slots = int(self._call(parent, "nvmlDeviceGetMaxMigDeviceCount", self._fn("nvmlDeviceGetMaxMigDeviceCount"),
                                   parent.handle))
        except _Absent:
            slots = 0
        for k in range(slots):
            try:
                mh = self._call(parent, "nvmlDeviceGetMigDeviceHandleByIndex",
                                self._fn("nvmlDeviceGetMigDeviceHandleByIndex"), parent.handle, k, not_found_ok=True)
            except _Absent:
                mh = None
            if mh is None:
                continue  # an empty slot
            uuid = _s(self._call(parent, "nvmlDeviceGetUUID", nv.nvmlDeviceGetUUID, mh))
            dev = _Dev(pos=pos + len(out), uuid=uuid, index=parent.index, handle=mh, kind="mig", util_method="none",
                       parent=parent.handle, parent_uuid=parent.uuid)
            try:
                dev.name = _s(self._call(dev, "nvmlDeviceGetName", nv.nvmlDeviceGetName, mh))
            except _Absent:
                dev.name = f"{parent.name} MIG"
            dev.gi_id = int(self._opt(dev, "gpu_instance_id", self._fn("nvmlDeviceGetGpuInstanceId"), mh) or 0)
            dev.static = dict(parent.static, mem_total_bytes=int(
                self._opt(dev, "memory", nv.nvmlDeviceGetMemoryInfo, mh, attr="total") or 0), parent_uuid=parent.uuid,
                mig_slices=slots)
            if parent.static["gpm_supported"]:
                self._setup_gpm(dev)
            dev.util_method = "gpm" if dev.gpm else "none"
            dev.fields_single = ["memory"]  # energy, power and temperature belong to the parent GPU
            dev.proc_util = False  # per-process utilization is not available inside MIG instances
            out.append(dev)
        used = sum(round(mig_share(d.name, slots) * slots) for d in out) if slots else 0
        if slots and used < slots:
            # Slices no instance holds are paid for and idle: a device of their own, always
            # idle-free, priced at its share. Its uuid names the configuration, so a reshaped GPU
            # starts a new device instead of repricing history.
            free = slots - used
            out.append(_Dev(pos=pos + len(out), uuid=f"{parent.uuid}-unallocated-{free}of{slots}", index=parent.index,
                            handle=None, kind="mig-free", util_method="none", name=f"{parent.name} (unallocated MIG "
                            f"slices {free}/{slots})", parent=parent.handle, parent_uuid=parent.uuid,
                            static=dict(parent.static, mem_total_bytes=0, parent_uuid=parent.uuid, mig_slices=slots,
                                        free_slices=free)))
            if not used:
                log.warning("GPU %s: MIG is enabled but has no instances: all of it is reported idle", parent.uuid)
        return out

    def _opt(self, dev: _Dev, what: str, fn, *args, attr: str | None = None):
        try:
            v = self._call(dev, what, fn, *args)
        except _Absent:
            return None
        return getattr(v, attr) if attr else v

    def _util_method(self, dev: _Dev) -> str:
        nv = self.nv
        try:
            self._call(dev, "samples", nv.nvmlDeviceGetSamples, dev.handle, nv.NVML_GPU_UTILIZATION_SAMPLES, 0,
                       not_found_ok=True)
            return "samples"
        except _Absent:
            pass
        try:
            self._call(dev, "utilization_rates", nv.nvmlDeviceGetUtilizationRates, dev.handle)
            return "rates"
        except _Absent:
            log.warning("GPU %s: no utilization from NVML (neither sample buffer nor rates); its time is "
                        "unmonitored", dev.uuid)
            return "none"

    def _setup_fields(self, dev: _Dev) -> None:
        nv = self.nv
        want = [(int(getattr(nv, "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", FI_TOTAL_ENERGY)), "energy"),
                (int(getattr(nv, "NVML_FI_DEV_POWER_INSTANT", FI_POWER_INSTANT)), "power")]
        ok: list = []
        fn = getattr(nv, "nvmlDeviceGetFieldValues", None)
        if fn is not None:
            try:
                vals = self._call(dev, "field_values", fn, dev.handle, [f for f, _ in want])
                for (fid, name), v in zip(want, vals, strict=False):
                    if int(v.nvmlReturn) == 0:
                        ok.append((fid, name))
            except _Absent:
                pass
        dev.fields_batch = ok
        done = {n for _, n in ok}
        dev.fields_single = [n for _, n in want if n not in done] + ["memory", "temperature"]

    def _setup_gpm(self, dev: _Dev) -> None:
        struct = getattr(self.nv, "c_nvmlGpmMetricsGet_t", None)
        if struct is None:
            return
        try:
            bufs = [self._call(dev, "gpm_sample_alloc", self._fn("nvmlGpmSampleAlloc")) for _ in range(2)]
        except (_Absent, _Down):
            return
        get = struct()  # allocated once per device, reused every poll
        dev.gpm_bufs = bufs
        dev.gpm_get = get
        dev.gpm = True
        try:  # first sample: metrics start at the first poll
            self._gpm_sample(dev, bufs[0])
        except (_Absent, _Down):
            self._free_gpm(dev)

    def _free_gpm(self, dev: _Dev) -> None:
        free = getattr(self.nv, "nvmlGpmSampleFree", None)
        for b in dev.gpm_bufs:
            try:
                if free is not None:
                    free(b)
            except Exception:  # noqa: BLE001 - freeing on the way out must not raise
                pass
        dev.gpm_bufs = []
        dev.gpm = False

    # ------------------------------------------------------------------ GpuSource
    def gpus(self) -> list[GpuFacts]:
        return list(self._facts)

    def poll(self, now_us: int) -> Readings:
        now_us = int(now_us)
        unhealthy: list[int] = []
        util, gpm, gauge, procs = [], [], [], []
        processes: list[ProcessIdentity] = []
        proc_ref: dict[tuple[int, int], int] = {}
        if self.pods is not None:
            self.pods.refresh(now_us)
        for dev in self._devs:
            if dev.down:
                if now_us < dev.next_retry_us or not self._recover(dev):
                    unhealthy.append(dev.pos)
                    continue
            rows = _Rows()
            try:
                self._poll_dev(dev, now_us, rows)
            except _Down as e:
                self._mark_down(dev, now_us, e)
                unhealthy.append(dev.pos)
                continue
            dev.polls += 1
            util.extend(rows.util)
            gpm.extend(rows.gpm)
            if rows.gauge is not None:
                gauge.append(rows.gauge)
            for ident, t0, t1, pct, mem in rows.procs:
                key = (ident.pid, ident.start_ms)
                ref = proc_ref.get(key)
                if ref is None:
                    ref = proc_ref[key] = len(processes)
                    processes.append(ident)
                procs.append((dev.pos, ref, t0, t1, pct, mem))
        return Readings(util=from_rows(UtilReadings, util), gauges=from_rows(GaugeReadings, gauge),
                        gpm=from_rows(GpmReadings, gpm), procs=from_rows(ProcReadings, procs),
                        processes=processes, unhealthy=tuple(unhealthy))

    def close(self) -> None:
        """Free GPM buffers and shut NVML down; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.pods is not None:
            self.pods.close()
        for dev in getattr(self, "_devs", []):
            if dev.gpm_bufs:
                self._free_gpm(dev)
        if self._inited:
            try:
                self.nv.nvmlShutdown()
            except Exception as e:  # noqa: BLE001
                log.debug("nvmlShutdown: %s", e)

    # ------------------------------------------------------------------ health
    def _mark_down(self, dev: _Dev, now_us: int, e: Exception) -> None:
        if not dev.down:
            self.down_events += 1
            dev.down_count += 1
            log.error("GPU %s (index %d) is down: %s; its time is unmonitored until it answers again (retry "
                      "every %.0fs)", dev.uuid, dev.index, e, self.retry_us / 1e6)
        dev.down = True
        dev.next_retry_us = now_us + self.retry_us
        dev.frontier_us = None  # the outage stays unmonitored; the next clean poll starts afresh
        dev.gpm_prev_us = None
        dev.last_poll_us = None

    def _recover(self, dev: _Dev) -> bool:
        """Re-acquire the handle by UUID after an outage; True if the device answers."""
        fn = self.nv.nvmlDeviceGetHandleByUUID if dev.kind == "gpu" else None
        try:
            if fn is not None:
                dev.handle = self._call(dev, "nvmlDeviceGetHandleByUUID", fn, dev.uuid)
        except (_Absent, _Down):
            dev.next_retry_us += self.retry_us
            return False
        dev.down = False
        if dev.kind == "mig-free":
            dev.frontier_us = None  # nothing is known about the outage: start afresh at the next poll
        dev.cursor = 0
        dev.proc_cursor = 0
        dev.offset_us = None
        dev.procs = {}
        dev.present = False
        log.warning("GPU %s (index %d) answers again", dev.uuid, dev.index)
        return True

    # ------------------------------------------------------------------ one device, one poll
    def _poll_dev(self, dev: _Dev, now_us: int, rows: _Rows) -> None:
        if dev.kind == "mig-free":  # unallocated MIG slices: nothing can run there
            # ...as long as the GPU itself answers: a lost GPU's time is unmonitored, not idle
            self._call(dev, "parent_memory", self.nv.nvmlDeviceGetMemoryInfo, dev.parent)
            if dev.frontier_us is not None:
                self._emit_unheld(dev, dev.frontier_us, now_us, _Held(False, False, now_us), rows.util)
            dev.frontier_us = now_us
            dev.last_poll_us = now_us
            return
        priming = dev.frontier_us is None
        prev_poll = dev.last_poll_us
        gauge = self._gauges(dev, now_us)
        rows.gauge = gauge
        current, listed = self._processes(dev)
        procs_now = bool(current)
        if self.pods is not None and not current:
            # allocated to pods but running no process: held by those pods (time-sliced: shared)
            for ident in self.pods.holders(dev.uuid, dev.index if dev.kind == "gpu" else None):
                current[(ident.pid, ident.start_ms)] = _Proc(ident, NAN)
        if current:
            present_now = True
        elif listed:
            present_now = False
        else:  # no process list: a GPU with memory in use counts as held (as in replay)
            mem = gauge[4]
            present_now = bool(mem == mem and mem >= self.idle_mem_threshold)
        present_prev = dev.present if prev_poll is not None else present_now
        mid = (prev_poll + now_us) // 2 if prev_poll is not None else now_us
        held = _Held(present_prev, present_now, mid)

        try:
            if dev.util_method == "samples":
                self._util_samples(dev, now_us, held, rows.util, priming)
            elif dev.util_method == "rates":
                self._util_rates(dev, now_us, held, rows.util, priming)
            elif dev.util_method == "none" and not priming:
                # only certain for MIG: no process on the instance -> nothing can run: idle (free, or
                # held by the pods it is allocated to)
                procs = _Held(dev.proc_present if prev_poll is not None else procs_now, procs_now, mid)
                self._emit_unheld(dev, dev.frontier_us, now_us, procs, rows.util, pod_held=present_now and not procs_now)
        except _Absent:
            # the utilization call stopped answering for this device: this poll stays unmonitored
            rows.util.clear()
            dev.frontier_us = now_us
            priming = True
        if dev.gpm:
            self._gpm_poll(dev, now_us, held, rows, priming)
        if priming:
            dev.frontier_us = now_us if dev.frontier_us is None else dev.frontier_us
        self._proc_rows(dev, now_us, prev_poll, current, rows, priming)
        if dev.polls % self.slow_every == 0 and dev.kind == "gpu":
            self._slow(dev)
        dev.present = present_now
        dev.proc_present = procs_now
        dev.last_poll_us = now_us

    # --- utilization
    def _util_samples(self, dev: _Dev, now_us: int, held: _Held, out: list, priming: bool) -> None:
        nv = self.nv
        res = self._call(dev, "samples", nv.nvmlDeviceGetSamples, dev.handle, nv.NVML_GPU_UTILIZATION_SAMPLES,
                         dev.cursor, not_found_ok=True)
        samples = _sample_list(res, dev.cursor)
        if priming:
            # a session's first poll: learn the period and the clock offset from the buffer, emit nothing
            if samples:
                self._learn_period(dev, [s[0] for s in samples])
                dev.cursor = samples[-1][0]
                dev.offset_us = now_us - dev.cursor
            dev.frontier_us = now_us
            return
        frontier = dev.frontier_us
        clean = dev.last_poll_us is not None and now_us - dev.last_poll_us <= self.max_poll_gap_us
        if samples:
            newest = samples[-1][0]
            lag = now_us - newest
            if dev.offset_us is None or lag < dev.offset_us or lag - dev.offset_us > self.resync_us:
                if dev.offset_us is not None and lag - dev.offset_us > self.resync_us:
                    log.info("GPU %s: driver timestamps re-anchored to the agent clock (moved %.3fs)", dev.uuid,
                             (lag - dev.offset_us) / 1e6)
                dev.offset_us = lag
            off = dev.offset_us
            typical = dev.period_us
            limit = typical + typical // 2
            prev = dev.cursor
            for ts, pct in samples:
                per = ts - prev if prev else 0
                if 0 < per <= limit:
                    dev.diffs.append(per)
                else:
                    per = typical  # first sample of a run: the typical observed period
                prev = ts
                t1 = ts + off
                t0 = t1 - per
                if t1 <= frontier:
                    self.late_samples += 1
                    continue
                if t0 > frontier:
                    if clean:  # the driver kept no sample while NVML answered every poll: idle
                        held.emit(out, dev.pos, frontier, t0, 0.0)
                else:
                    t0 = frontier
                held.emit(out, dev.pos, t0, t1, pct)
                frontier = t1
            dev.cursor = newest
            if len(dev.diffs) >= 8 and dev.polls % 16 == 0:
                dev.period_us = int(median(dev.diffs))
        # nothing newer in the buffer: idle up to a holdback for samples still in flight
        edge = now_us - min(self.max_holdback_us, max(2 * dev.period_us + dev.period_us // 2, 500_000))
        if edge > frontier:
            held.emit(out, dev.pos, frontier, edge, 0.0)
            frontier = edge
        dev.frontier_us = frontier

    def _learn_period(self, dev: _Dev, ts: list[int]) -> None:
        d = [b - a for a, b in zip(ts, ts[1:], strict=False) if 0 < b - a <= 2_000_000]
        if d:
            dev.diffs.extend(d)
            dev.period_us = int(median(d))

    def _util_rates(self, dev: _Dev, now_us: int, held: _Held, out: list, priming: bool) -> None:
        u = self._call(dev, "utilization_rates", self.nv.nvmlDeviceGetUtilizationRates, dev.handle)
        if priming:
            dev.frontier_us = now_us
            return
        t0 = max(dev.frontier_us, now_us - self.max_poll_gap_us)  # a stalled agent: the gap stays unmonitored
        if now_us > t0:
            held.emit(out, dev.pos, t0, now_us, float(u.gpu))
        dev.frontier_us = now_us

    def _emit_unheld(self, dev: _Dev, t0: int, t1: int, held: _Held, out: list, pod_held: bool = False) -> None:
        """Idle readings for the parts of [t0, t1) with no process (idle-held when pods hold the
        device, else idle-free); the rest stays unmonitored."""
        if t1 - t0 > self.max_poll_gap_us:
            t0 = t1 - self.max_poll_gap_us
        for a, b, h in held.parts(t0, t1):
            if not h:
                out.append((dev.pos, a, b, 0.0, 1 if pod_held else 0))
        dev.frontier_us = t1

    # --- GPM
    def _gpm_sample(self, dev: _Dev, buf) -> None:
        if dev.kind == "mig":
            self._call(dev, "gpm_mig_sample", self._fn("nvmlGpmMigSampleGet"), dev.parent, dev.gi_id, buf)
        else:
            self._call(dev, "gpm_sample", self._fn("nvmlGpmSampleGet"), dev.handle, buf)

    def _gpm_poll(self, dev: _Dev, now_us: int, held: _Held, rows: _Rows, priming: bool) -> None:
        if dev.gpm_prev_us is not None and now_us - dev.gpm_prev_us < GPM_MIN_INTERVAL_US:
            return  # GPM needs samples at least 100 ms apart
        cur = dev.gpm_bufs[1 - dev.gpm_cur]
        try:
            self._gpm_sample(dev, cur)
        except _Absent:
            self._free_gpm(dev)
            return
        prev_us = dev.gpm_prev_us
        dev.gpm_prev_us = now_us
        prev_buf = dev.gpm_bufs[dev.gpm_cur]
        dev.gpm_cur = 1 - dev.gpm_cur
        if prev_us is None or priming or now_us - prev_us > self.max_poll_gap_us:
            return
        ids = (GPM_GRAPHICS_UTIL, GPM_SM_UTIL, GPM_SM_OCCUPANCY, GPM_ANY_TENSOR_UTIL, GPM_DRAM_BW_UTIL)
        mg = dev.gpm_get
        mg.version = int(getattr(self.nv, "NVML_GPM_METRICS_GET_VERSION", 1))
        mg.numMetrics = len(ids)
        mg.sample1 = prev_buf
        mg.sample2 = cur
        for i, metric in enumerate(ids):
            mg.metrics[i].metricId = metric
        try:
            self._call(dev, "gpm_metrics", self._fn("nvmlGpmMetricsGet"), mg)
        except _Absent as e:
            if e.code is None or e.code in self._unsupported_codes:
                self._free_gpm(dev)
            return  # otherwise a passing refusal: this interval has no GPM figures, GPM stays on
        vals = []
        for i in range(len(ids)):
            m = mg.metrics[i]
            v = float(m.value) if int(getattr(m, "nvmlReturn", 0)) == 0 else NAN
            vals.append(min(max(v, 0.0), 100.0) if v == v else NAN)
        dev.gpm_last = dict(zip(("graphics", "sm_active", "sm_occupancy", "tensor_active", "dram_active"), vals,
                                strict=True))
        rows.gpm.append((dev.pos, prev_us, now_us, vals[1], vals[2], vals[3], vals[4]))
        if dev.util_method == "gpm" and vals[0] == vals[0]:
            t0 = max(prev_us, dev.frontier_us if dev.frontier_us is not None else prev_us)
            if now_us > t0:
                held.emit(rows.util, dev.pos, t0, now_us, vals[0])
                dev.frontier_us = now_us

    # --- gauges
    def _gauges(self, dev: _Dev, now_us: int) -> tuple:
        v = {"energy": NAN, "power": NAN, "memory": NAN, "temperature": NAN}
        nv = self.nv
        if dev.fields_batch:
            try:
                vals = self._call(dev, "field_values", nv.nvmlDeviceGetFieldValues, dev.handle,
                                  [f for f, _ in dev.fields_batch])
                for (_, name), fv in zip(dev.fields_batch, vals, strict=False):
                    if int(fv.nvmlReturn) == 0:
                        v[name] = _field_value(fv)
                    else:
                        self._note_absent(dev, name, RuntimeError(f"field return code {int(fv.nvmlReturn)}"))
            except _Absent:
                pass
        for name in dev.fields_single:
            try:
                if name == "memory":
                    v[name] = float(self._call(dev, "memory", nv.nvmlDeviceGetMemoryInfo, dev.handle).used)
                elif name == "temperature":
                    v[name] = float(self._call(dev, "temperature", nv.nvmlDeviceGetTemperature, dev.handle,
                                               int(getattr(nv, "NVML_TEMPERATURE_GPU", 0))))
                elif name == "energy":
                    v[name] = float(self._call(dev, "energy", self._fn("nvmlDeviceGetTotalEnergyConsumption"),
                                               dev.handle))
                elif name == "power":
                    v[name] = float(self._call(dev, "power", self._fn("nvmlDeviceGetPowerUsage"), dev.handle))
            except _Absent:
                pass
        return (dev.pos, now_us, v["energy"], v["power"], v["memory"], v["temperature"])

    def _slow(self, dev: _Dev) -> None:
        """Clocks and clock event (throttle) reasons, every `slow_every` polls, into `extras`."""
        nv = self.nv
        try:
            dev.extras["sm_clock_mhz"] = int(self._call(dev, "sm_clock", self._fn("nvmlDeviceGetClockInfo"),
                                                        dev.handle, int(getattr(nv, "NVML_CLOCK_SM", 1))))
        except _Absent:
            pass
        fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if fn is not None:
            try:
                dev.extras["clock_event_reasons"] = int(self._call(dev, "clock_event_reasons", fn, dev.handle))
            except _Absent:
                pass

    # --- processes
    def _processes(self, dev: _Dev) -> tuple[dict, bool]:
        """Compute processes now: {(pid, start_ms): _Proc}, and whether NVML could list them."""
        if not dev.proc_list:
            return {}, False
        try:
            plist = self._call(dev, "compute_processes", self.nv.nvmlDeviceGetComputeRunningProcesses, dev.handle)
        except _Absent:
            dev.proc_list = False
            return {}, False
        current: dict = {}
        for p in plist or ():
            pid = int(p.pid)
            ident = self.attribution.identity(pid)
            if ident is None:
                key = ("hidden", pid)
                if key not in self._logged:
                    self._logged.add(key)
                    log.warning("pid %d on GPU %s is not visible in %s (the agent needs the host's PID namespace "
                                "or its /proc mounted as proc_root); recorded without attribution", pid, dev.uuid,
                                self.attribution.root)
                ident = ProcessIdentity(pid=pid, start_ms=0)
            elif self.pods is not None:
                ident = self.pods.enrich(ident)
            mem = getattr(p, "usedGpuMemory", None)
            current[(ident.pid, ident.start_ms)] = _Proc(ident, float(mem) if mem is not None else NAN)
        return current, True

    def _proc_util(self, dev: _Dev) -> dict[int, float] | None:
        """Mean SM utilization per pid from the samples since the cursor; None if not available."""
        if not dev.proc_util:
            return None
        try:
            res = self._call(dev, "process_utilization", self.nv.nvmlDeviceGetProcessUtilization, dev.handle,
                             dev.proc_cursor, not_found_ok=True)
        except _Absent:
            dev.proc_util = False
            return None
        acc: dict[int, list] = {}
        newest = dev.proc_cursor
        for s in res or ():
            ts = int(s.timeStamp)
            if ts <= dev.proc_cursor:
                continue
            newest = max(newest, ts)
            a = acc.setdefault(int(s.pid), [0.0, 0])
            a[0] += min(float(s.smUtil), 100.0)
            a[1] += 1
        dev.proc_cursor = newest
        return {pid: s / n for pid, (s, n) in acc.items()}

    def _proc_rows(self, dev: _Dev, now_us: int, prev_poll: int | None, current: dict, rows: _Rows,
                   priming: bool) -> None:
        shares = self._proc_util(dev) if current or dev.procs else None
        prev = dev.procs
        dev.procs = current
        if priming or prev_poll is None or now_us - prev_poll > self.max_poll_gap_us:
            return
        mid = (prev_poll + now_us) // 2
        if shares is None:  # no per-process utilization: every holder gets the GPU's utilization
            busy = sum((b - a) * p for _, a, b, p, _ in rows.util)
            span = sum(b - a for _, a, b, _, _ in rows.util)
            gpu_pct = busy / span if span else 0.0
        for key in current.keys() | prev.keys():
            p = current.get(key) or prev[key]
            if key in current and key in prev:
                t0, t1 = prev_poll, now_us
            elif key in current:
                t0, t1 = mid, now_us  # appeared: placed halfway between the polls
            else:
                t0, t1 = prev_poll, mid  # gone
            if t1 <= t0:
                continue
            pct = gpu_pct if shares is None else shares.get(p.ident.pid, 0.0)
            rows.procs.append((p.ident, t0, t1, pct, p.mem_bytes))

    # ------------------------------------------------------------------ introspection (probe)
    def devices(self) -> list[dict]:
        """Static facts and what each device supports, for probe."""
        out = []
        for d in self._devs:
            out.append({
                "uuid": d.uuid, "index": d.index, "name": d.name, "kind": d.kind, "parent_uuid": d.parent_uuid,
                "util_method": d.util_method, "sample_period_observed": bool(d.diffs),
                "sample_period_us": d.period_us if d.util_method == "samples" and d.diffs else None,
                "fields_batched": [n for _, n in d.fields_batch], "fields_single": list(d.fields_single),
                "gpm": d.gpm, "process_utilization": d.proc_util, "process_list": d.proc_list,
                "absent": sorted(self.absent.get(d.uuid, ())), "down": d.down, "down_count": d.down_count,
                "extras": dict(d.extras), **{k: v for k, v in d.static.items() if k != "parent_uuid"},
            })
        return out


# ----------------------------------------------------------------------------- helpers


class _Held:
    """Process presence over one poll interval: `prev` until `mid`, `now` after it."""

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
                out.append((pos, a, b, pct, 1 if h else 0))


def _missing(name: str):
    def fn(*_a, **_k):
        raise AttributeError(f"this nvidia-ml-py has no {name}")

    fn.__name__ = name
    return fn


def _sample_list(res, cursor: int) -> list[tuple[int, float]]:
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


def _field_value(fv) -> float:
    return float(getattr(fv.value, _VALUE_ATTR.get(int(fv.valueType), "ullVal")))










def _share(d: _Dev) -> float:
    """The fraction of its physical GPU a device is priced as."""
    slots = int(d.static.get("mig_slices") or 7)
    if d.kind == "mig":
        return mig_share(d.name, slots)
    if d.kind == "mig-free":
        return int(d.static.get("free_slices", 0)) / slots
    return 1.0


def open_nvml_source(cfg, nvml=None, proc_root: str | None = None) -> NvmlSource:
    """NvmlSource for an AgentConfig; a fatal NVML problem becomes a message and a non-zero exit."""
    from gpuledger.agent.podresources import open_pod_attribution

    root = proc_root or getattr(cfg, "proc_root", "/proc")
    pods = open_pod_attribution(cfg) if getattr(cfg, "pod_resources_socket", "") else None
    try:
        return NvmlSource(nvml, proc_root=root, env_allowlist=tuple(cfg.env_allowlist),
                          idle_mem_threshold_mib=int(getattr(cfg, "idle_mem_threshold_mib", 1024)),
                          holdback_s=min(1.0, max(0.2, float(getattr(cfg, "lateness_s", 2.0)) / 2)), pods=pods)
    except NvmlUnavailable as e:
        if pods is not None:
            pods.close()
        raise SystemExit(f"gpuledger agent: {e}") from e


__all__ = ["NvmlSource", "NvmlUnavailable", "open_nvml_source"]
