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

Errors are sorted (as nvitop does) by the wrapper in nvml_api.py into: absent (a function or field
this GPU/driver lacks: NaN, logged once per device and field), device down (GPU lost etc.: the GPU
is reported in Readings.unhealthy, its time stays unmonitored, the other GPUs go on, it is retried
every `retry_s`), and fatal (no library/driver at start: NvmlUnavailable with what to fix). The
device records (static facts and per-poll state) are in nvml_device.py.

Kubernetes: with a PodAttribution (podresources.py), a GPU allocated to pods that runs no compute
process is held by those pods.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from statistics import median

from gpuledger.agent.attribution import ProcAttributor
from gpuledger.agent.nvml_api import Absent, DeviceDown, Nvml, NvmlUnavailable, text
from gpuledger.agent.nvml_device import (
    GPU,
    MIG,
    MIG_FREE,
    NAN,
    Device,
    DeviceStatic,
    GaugeRow,
    GpmRow,
    Held,
    Proc,
    ProcRow,
    Rows,
    UtilRow,
    field_value,
    sample_list,
)
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

GPM_MIN_INTERVAL_US = 100_000
MIB = 1 << 20

# field ids (nvml.h); read from the module when it has them
FI_TOTAL_ENERGY = 83  # NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, mJ
FI_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT, mW
# GPM metric ids, and the names of the figures they give
GPM_METRICS = ((1, "graphics"), (2, "sm_active"), (3, "sm_occupancy"), (5, "tensor_active"), (10, "dram_active"))


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
        self.api = Nvml(nvml, measure_calls=measure_calls)
        self.attribution = attribution or ProcAttributor(proc_root, env_allowlist)
        self.pods = pods  # PodAttribution (Kubernetes): which pods hold which GPUs; None off Kubernetes
        self.max_holdback_us = int(holdback_s * 1e6)
        self.max_poll_gap_us = int(max_poll_gap_s * 1e6)
        self.retry_us = int(retry_s * 1e6)
        self.resync_us = int(resync_s * 1e6)
        self.idle_mem_threshold = idle_mem_threshold_mib * MIB
        self.slow_every = max(1, int(slow_every))
        self.down_events = 0
        self.late_samples = 0  # samples that arrived for time already covered
        self._closed = False
        self._inited = False
        self.api.init()
        self._inited = True
        self.driver_version = self.api.system_text("nvmlSystemGetDriverVersion")
        self.nvml_version = self.api.system_text("nvmlSystemGetNVMLVersion")
        cuda = self.api.system_text("nvmlSystemGetCudaDriverVersion")
        self.cuda_driver_version = f"{int(cuda) // 1000}.{int(cuda) % 1000 // 10}" if cuda.isdigit() else cuda
        try:
            self._devs: list[Device] = self._discover()
        except BaseException:
            self.close()
            raise
        self._facts = [GpuFacts(uuid=d.uuid, index=d.index, name=d.name, mem_total_bytes=d.static.mem_total_bytes,
                                util_method=d.util_method, mig=d.kind in (MIG, MIG_FREE), parent_uuid=d.parent_uuid,
                                share=d.share()) for d in self._devs]

    # the wrapper's bookkeeping, as the probe and benchmarks read it
    @property
    def call_stats(self) -> dict[str, list]:
        return self.api.call_stats

    @property
    def absent(self) -> dict[str, set]:
        return self.api.absent

    def _call(self, dev: Device | None, what: str, fn, *args, not_found_ok: bool = False):
        return self.api.call(dev.uuid if dev else None, what, fn, *args, not_found_ok=not_found_ok)

    def _opt(self, dev: Device, what: str, fn, *args, attr: str | None = None):
        return self.api.opt(dev.uuid, what, fn, *args, attr=attr)

    # ------------------------------------------------------------------ discovery
    def _discover(self) -> list[Device]:
        try:
            count = int(self._call(None, "nvmlDeviceGetCount", self.nv.nvmlDeviceGetCount))
        except (Absent, DeviceDown) as e:
            raise NvmlUnavailable(f"NVML cannot count GPUs ({e.__cause__}): check `nvidia-smi`") from e
        if count == 0:
            raise NvmlUnavailable("NVML sees no GPUs on this machine: check `nvidia-smi -L`")
        devs: list[Device] = []
        self.physical_gpu_count = 0
        for i in range(count):
            try:
                devs.extend(self._discover_one(i, len(devs)))
                self.physical_gpu_count += 1
            except (Absent, DeviceDown) as e:
                log.error("GPU %d: cannot read its identity (%s); it is not monitored", i, e.__cause__ or e)
        if not devs:
            raise NvmlUnavailable(f"none of the {count} GPUs NVML lists could be read: check `nvidia-smi`")
        return devs

    def _discover_one(self, i: int, pos: int) -> list[Device]:
        nv, fn = self.nv, self.api.fn
        h = self._call(None, "nvmlDeviceGetHandleByIndex", nv.nvmlDeviceGetHandleByIndex, i)
        uuid = text(self._call(None, "nvmlDeviceGetUUID", nv.nvmlDeviceGetUUID, h))
        name = text(self._call(None, "nvmlDeviceGetName", nv.nvmlDeviceGetName, h))
        dev = Device(pos=pos, uuid=uuid, index=i, handle=h, kind=GPU, util_method="none", name=name)
        pci = self._opt(dev, "pci_info", fn("nvmlDeviceGetPciInfo"), h)
        mig = self._opt(dev, "mig_mode", fn("nvmlDeviceGetMigMode"), h)
        sup = self._opt(dev, "gpm_support", fn("nvmlGpmQueryDeviceSupport"), h)
        dev.static = DeviceStatic(
            mem_total_bytes=int(self._opt(dev, "memory", nv.nvmlDeviceGetMemoryInfo, h, attr="total") or 0),
            power_limit_mw=self._opt(dev, "power_limit", fn("nvmlDeviceGetEnforcedPowerLimit"), h),
            pci_bus_id=text(getattr(pci, "busId", b"")).strip("\0") if pci is not None else "",
            architecture=self._opt(dev, "architecture", fn("nvmlDeviceGetArchitecture"), h),
            mig_mode=bool(mig is not None and int(mig[0]) == self.api.const("NVML_DEVICE_MIG_ENABLE", 1)),
            gpm_supported=bool(sup is not None and int(getattr(sup, "isSupportedDevice", 0))))
        if dev.static.mig_mode:
            return self._discover_mig(dev, pos)
        dev.util_method = self._util_method(dev)
        self._setup_fields(dev)
        if dev.static.gpm_supported:
            self._setup_gpm(dev)
        return [dev]

    def _discover_mig(self, parent: Device, pos: int) -> list[Device]:
        nv, fn = self.nv, self.api.fn
        out = []
        try:
            slots = int(self._call(parent, "nvmlDeviceGetMaxMigDeviceCount", fn("nvmlDeviceGetMaxMigDeviceCount"),
                                   parent.handle))
        except Absent:
            slots = 0
        for k in range(slots):
            try:
                mh = self._call(parent, "nvmlDeviceGetMigDeviceHandleByIndex",
                                fn("nvmlDeviceGetMigDeviceHandleByIndex"), parent.handle, k, not_found_ok=True)
            except Absent:
                mh = None
            if mh is None:
                continue  # an empty slot
            uuid = text(self._call(parent, "nvmlDeviceGetUUID", nv.nvmlDeviceGetUUID, mh))
            dev = Device(pos=pos + len(out), uuid=uuid, index=parent.index, handle=mh, kind=MIG, util_method="none",
                         parent=parent.handle, parent_uuid=parent.uuid)
            try:
                dev.name = text(self._call(dev, "nvmlDeviceGetName", nv.nvmlDeviceGetName, mh))
            except Absent:
                dev.name = f"{parent.name} MIG"
            dev.gi_id = int(self._opt(dev, "gpu_instance_id", fn("nvmlDeviceGetGpuInstanceId"), mh) or 0)
            dev.static = replace(parent.static, mig_slices=slots, mem_total_bytes=int(
                self._opt(dev, "memory", nv.nvmlDeviceGetMemoryInfo, mh, attr="total") or 0))
            if parent.static.gpm_supported:
                self._setup_gpm(dev)
            dev.util_method = "gpm" if dev.gpm.enabled else "none"
            dev.gauges.single = ["memory"]  # energy, power and temperature belong to the parent GPU
            dev.procs.util = False  # per-process utilization is not available inside MIG instances
            out.append(dev)
        used = sum(round(mig_share(d.name, slots) * slots) for d in out) if slots else 0
        if slots and used < slots:
            # Slices no instance holds are paid for and idle: a device of their own, always
            # idle-free, priced at its share. Its uuid names the configuration, so a reshaped GPU
            # starts a new device instead of repricing history.
            free = slots - used
            out.append(Device(pos=pos + len(out), uuid=f"{parent.uuid}-unallocated-{free}of{slots}",
                              index=parent.index, handle=None, kind=MIG_FREE, util_method="none",
                              name=f"{parent.name} (unallocated MIG slices {free}/{slots})", parent=parent.handle,
                              parent_uuid=parent.uuid,
                              static=replace(parent.static, mem_total_bytes=0, mig_slices=slots, free_slices=free)))
            if not used:
                log.warning("GPU %s: MIG is enabled but has no instances: all of it is reported idle", parent.uuid)
        return out

    def _util_method(self, dev: Device) -> str:
        nv = self.nv
        try:
            self._call(dev, "samples", nv.nvmlDeviceGetSamples, dev.handle, nv.NVML_GPU_UTILIZATION_SAMPLES, 0,
                       not_found_ok=True)
            return "samples"
        except Absent:
            pass
        try:
            self._call(dev, "utilization_rates", nv.nvmlDeviceGetUtilizationRates, dev.handle)
            return "rates"
        except Absent:
            log.warning("GPU %s: no utilization from NVML (neither sample buffer nor rates); its time is "
                        "unmonitored", dev.uuid)
            return "none"

    def _setup_fields(self, dev: Device) -> None:
        want = [(self.api.const("NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", FI_TOTAL_ENERGY), "energy"),
                (self.api.const("NVML_FI_DEV_POWER_INSTANT", FI_POWER_INSTANT), "power")]
        ok: list = []
        fn = getattr(self.nv, "nvmlDeviceGetFieldValues", None)
        if fn is not None:
            try:
                vals = self._call(dev, "field_values", fn, dev.handle, [f for f, _ in want])
                for (fid, name), v in zip(want, vals, strict=False):
                    if int(v.nvmlReturn) == 0:
                        ok.append((fid, name))
            except Absent:
                pass
        dev.gauges.batch = ok
        done = {n for _, n in ok}
        dev.gauges.single = [n for _, n in want if n not in done] + ["memory", "temperature"]

    def _setup_gpm(self, dev: Device) -> None:
        struct = getattr(self.nv, "c_nvmlGpmMetricsGet_t", None)
        if struct is None:
            return
        try:
            bufs = [self._call(dev, "gpm_sample_alloc", self.api.fn("nvmlGpmSampleAlloc")) for _ in range(2)]
        except (Absent, DeviceDown):
            return
        g = dev.gpm
        g.bufs, g.get, g.enabled = bufs, struct(), True  # the metrics struct is allocated once, reused every poll
        try:  # first sample: metrics start at the first poll
            self._gpm_sample(dev, bufs[0])
        except (Absent, DeviceDown):
            self._free_gpm(dev)

    def _free_gpm(self, dev: Device) -> None:
        free = getattr(self.nv, "nvmlGpmSampleFree", None)
        for b in dev.gpm.bufs:
            try:
                if free is not None:
                    free(b)
            except Exception:  # noqa: BLE001 - freeing on the way out must not raise
                pass
        dev.gpm.bufs = []
        dev.gpm.enabled = False

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
            if dev.health.down:
                if now_us < dev.health.next_retry_us or not self._recover(dev):
                    unhealthy.append(dev.pos)
                    continue
            rows = Rows()
            try:
                self._poll_dev(dev, now_us, rows)
            except DeviceDown as e:
                self._mark_down(dev, now_us, e)
                unhealthy.append(dev.pos)
                continue
            dev.polls += 1
            util.extend(rows.util)
            gpm.extend(rows.gpm)
            if rows.gauge is not None:
                gauge.append(rows.gauge)
            for p in rows.procs:
                key = (p.ident.pid, p.ident.start_ms)
                ref = proc_ref.get(key)
                if ref is None:
                    ref = proc_ref[key] = len(processes)
                    processes.append(p.ident)
                procs.append((dev.pos, ref, p.t0_us, p.t1_us, p.pct, p.mem_bytes))
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
            if dev.gpm.bufs:
                self._free_gpm(dev)
        if self._inited:
            try:
                self.nv.nvmlShutdown()
            except Exception as e:  # noqa: BLE001
                log.debug("nvmlShutdown: %s", e)

    # ------------------------------------------------------------------ health
    def _mark_down(self, dev: Device, now_us: int, e: Exception) -> None:
        h = dev.health
        if not h.down:
            self.down_events += 1
            h.down_count += 1
            log.error("GPU %s (index %d) is down: %s; its time is unmonitored until it answers again (retry "
                      "every %.0fs)", dev.uuid, dev.index, e, self.retry_us / 1e6)
        h.down = True
        h.next_retry_us = now_us + self.retry_us
        dev.util.frontier_us = None  # the outage stays unmonitored; the next clean poll starts afresh
        dev.util.last_poll_us = None
        dev.gpm.prev_us = None

    def _recover(self, dev: Device) -> bool:
        """Re-acquire the handle by UUID after an outage; True if the device answers."""
        fn = self.nv.nvmlDeviceGetHandleByUUID if dev.kind == GPU else None
        try:
            if fn is not None:
                dev.handle = self._call(dev, "nvmlDeviceGetHandleByUUID", fn, dev.uuid)
        except (Absent, DeviceDown):
            dev.health.next_retry_us += self.retry_us
            return False
        dev.health.down = False
        if dev.kind == MIG_FREE:
            dev.util.frontier_us = None  # nothing is known about the outage: start afresh at the next poll
        dev.util.cursor = 0
        dev.util.offset_us = None
        dev.util.present = False
        dev.util.proc_present = False
        dev.procs.cursor = 0
        dev.procs.seen = {}
        log.warning("GPU %s (index %d) answers again", dev.uuid, dev.index)
        return True

    # ------------------------------------------------------------------ one device, one poll
    def _poll_dev(self, dev: Device, now_us: int, rows: Rows) -> None:
        u = dev.util
        if dev.kind == MIG_FREE:  # unallocated MIG slices: nothing can run there
            # ...as long as the GPU itself answers: a lost GPU's time is unmonitored, not idle
            self._call(dev, "parent_memory", self.nv.nvmlDeviceGetMemoryInfo, dev.parent)
            if u.frontier_us is not None:
                self._emit_unheld(dev, u.frontier_us, now_us, Held(False, False, now_us), rows.util)
            u.frontier_us = now_us
            u.last_poll_us = now_us
            return
        priming = u.frontier_us is None
        prev_poll = u.last_poll_us
        gauge = self._gauges(dev, now_us)
        rows.gauge = gauge
        current, listed = self._processes(dev)
        procs_now = bool(current)
        if self.pods is not None and not current:
            # allocated to pods but running no process: held by those pods (time-sliced: shared)
            for ident in self.pods.holders(dev.uuid, dev.index if dev.kind == GPU else None):
                current[(ident.pid, ident.start_ms)] = Proc(ident, NAN)
        if current:
            present_now = True
        elif listed:
            present_now = False
        else:  # no process list: a GPU with memory in use counts as held (as in replay)
            mem = gauge.mem_used_bytes
            present_now = bool(mem == mem and mem >= self.idle_mem_threshold)
        present_prev = u.present if prev_poll is not None else present_now
        mid = (prev_poll + now_us) // 2 if prev_poll is not None else now_us
        held = Held(present_prev, present_now, mid)

        try:
            if dev.util_method == "samples":
                self._util_samples(dev, now_us, held, rows.util, priming)
            elif dev.util_method == "rates":
                self._util_rates(dev, now_us, held, rows.util, priming)
            elif dev.util_method == "none" and not priming:
                # only certain for MIG: no process on the instance -> nothing can run: idle (free, or
                # held by the pods it is allocated to)
                procs = Held(u.proc_present if prev_poll is not None else procs_now, procs_now, mid)
                self._emit_unheld(dev, u.frontier_us, now_us, procs, rows.util, pod_held=present_now and not procs_now)
        except Absent:
            # the utilization call stopped answering for this device: this poll stays unmonitored
            rows.util.clear()
            u.frontier_us = now_us
            priming = True
        if dev.gpm.enabled:
            self._gpm_poll(dev, now_us, held, rows, priming)
        if priming:
            u.frontier_us = now_us if u.frontier_us is None else u.frontier_us
        self._proc_rows(dev, now_us, prev_poll, current, rows, priming)
        if dev.polls % self.slow_every == 0 and dev.kind == GPU:
            self._slow(dev)
        u.present = present_now
        u.proc_present = procs_now
        u.last_poll_us = now_us

    # --- utilization
    def _util_samples(self, dev: Device, now_us: int, held: Held, out: list, priming: bool) -> None:
        nv, u = self.nv, dev.util
        res = self._call(dev, "samples", nv.nvmlDeviceGetSamples, dev.handle, nv.NVML_GPU_UTILIZATION_SAMPLES,
                         u.cursor, not_found_ok=True)
        samples = sample_list(res, u.cursor)
        if priming:
            # a session's first poll: learn the period and the clock offset from the buffer, emit nothing
            if samples:
                self._learn_period(dev, [s[0] for s in samples])
                u.cursor = samples[-1][0]
                u.offset_us = now_us - u.cursor
            u.frontier_us = now_us
            return
        frontier = u.frontier_us
        clean = u.last_poll_us is not None and now_us - u.last_poll_us <= self.max_poll_gap_us
        if samples:
            newest = samples[-1][0]
            lag = now_us - newest
            if u.offset_us is None or lag < u.offset_us or lag - u.offset_us > self.resync_us:
                if u.offset_us is not None and lag - u.offset_us > self.resync_us:
                    log.info("GPU %s: driver timestamps re-anchored to the agent clock (moved %.3fs)", dev.uuid,
                             (lag - u.offset_us) / 1e6)
                u.offset_us = lag
            off = u.offset_us
            typical = u.period_us
            limit = typical + typical // 2
            prev = u.cursor
            for ts, pct in samples:
                per = ts - prev if prev else 0
                if 0 < per <= limit:
                    u.diffs.append(per)
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
            u.cursor = newest
            if len(u.diffs) >= 8 and dev.polls % 16 == 0:
                u.period_us = int(median(u.diffs))
        # nothing newer in the buffer: idle up to a holdback for samples still in flight
        edge = now_us - min(self.max_holdback_us, max(2 * u.period_us + u.period_us // 2, 500_000))
        if edge > frontier:
            held.emit(out, dev.pos, frontier, edge, 0.0)
            frontier = edge
        u.frontier_us = frontier

    def _learn_period(self, dev: Device, ts: list[int]) -> None:
        d = [b - a for a, b in zip(ts, ts[1:], strict=False) if 0 < b - a <= 2_000_000]
        if d:
            dev.util.diffs.extend(d)
            dev.util.period_us = int(median(d))

    def _util_rates(self, dev: Device, now_us: int, held: Held, out: list, priming: bool) -> None:
        r = self._call(dev, "utilization_rates", self.nv.nvmlDeviceGetUtilizationRates, dev.handle)
        if priming:
            dev.util.frontier_us = now_us
            return
        t0 = max(dev.util.frontier_us, now_us - self.max_poll_gap_us)  # a stalled agent: the gap stays unmonitored
        if now_us > t0:
            held.emit(out, dev.pos, t0, now_us, float(r.gpu))
        dev.util.frontier_us = now_us

    def _emit_unheld(self, dev: Device, t0: int, t1: int, held: Held, out: list, pod_held: bool = False) -> None:
        """Idle readings for the parts of [t0, t1) with no process (idle-held when pods hold the
        device, else idle-free); the rest stays unmonitored."""
        if t1 - t0 > self.max_poll_gap_us:
            t0 = t1 - self.max_poll_gap_us
        for a, b, h in held.parts(t0, t1):
            if not h:
                out.append(UtilRow(dev.pos, a, b, 0.0, 1 if pod_held else 0))
        dev.util.frontier_us = t1

    # --- GPM
    def _gpm_sample(self, dev: Device, buf) -> None:
        if dev.kind == MIG:
            self._call(dev, "gpm_mig_sample", self.api.fn("nvmlGpmMigSampleGet"), dev.parent, dev.gi_id, buf)
        else:
            self._call(dev, "gpm_sample", self.api.fn("nvmlGpmSampleGet"), dev.handle, buf)

    def _gpm_poll(self, dev: Device, now_us: int, held: Held, rows: Rows, priming: bool) -> None:
        g = dev.gpm
        if g.prev_us is not None and now_us - g.prev_us < GPM_MIN_INTERVAL_US:
            return  # GPM needs samples at least 100 ms apart
        cur = g.bufs[1 - g.cur]
        try:
            self._gpm_sample(dev, cur)
        except Absent:
            self._free_gpm(dev)
            return
        prev_us = g.prev_us
        g.prev_us = now_us
        prev_buf = g.bufs[g.cur]
        g.cur = 1 - g.cur
        if prev_us is None or priming or now_us - prev_us > self.max_poll_gap_us:
            return
        mg = g.get
        mg.version = self.api.const("NVML_GPM_METRICS_GET_VERSION", 1)
        mg.numMetrics = len(GPM_METRICS)
        mg.sample1 = prev_buf
        mg.sample2 = cur
        for i, (metric, _) in enumerate(GPM_METRICS):
            mg.metrics[i].metricId = metric
        try:
            self._call(dev, "gpm_metrics", self.api.fn("nvmlGpmMetricsGet"), mg)
        except Absent as e:
            if e.code is None or e.code in self.api.unsupported_codes:
                self._free_gpm(dev)
            return  # otherwise a passing refusal: this interval has no GPM figures, GPM stays on
        vals = {}
        for i, (_, name) in enumerate(GPM_METRICS):
            m = mg.metrics[i]
            v = float(m.value) if int(getattr(m, "nvmlReturn", 0)) == 0 else NAN
            vals[name] = min(max(v, 0.0), 100.0) if v == v else NAN
        g.last = vals
        rows.gpm.append(GpmRow(dev.pos, prev_us, now_us, vals["sm_active"], vals["sm_occupancy"],
                               vals["tensor_active"], vals["dram_active"]))
        graphics = vals["graphics"]
        if dev.util_method == "gpm" and graphics == graphics:
            t0 = max(prev_us, dev.util.frontier_us if dev.util.frontier_us is not None else prev_us)
            if now_us > t0:
                held.emit(rows.util, dev.pos, t0, now_us, graphics)
                dev.util.frontier_us = now_us

    # --- gauges
    def _gauges(self, dev: Device, now_us: int) -> GaugeRow:
        v = {"energy": NAN, "power": NAN, "memory": NAN, "temperature": NAN}
        nv, fn = self.nv, self.api.fn
        plan = dev.gauges
        if plan.batch:
            try:
                vals = self._call(dev, "field_values", nv.nvmlDeviceGetFieldValues, dev.handle,
                                  [f for f, _ in plan.batch])
                for (_, name), fv in zip(plan.batch, vals, strict=False):
                    if int(fv.nvmlReturn) == 0:
                        v[name] = field_value(fv)
                    else:
                        self.api.note_absent(dev.uuid, name, RuntimeError(f"field return code {int(fv.nvmlReturn)}"))
            except Absent:
                pass
        for name in plan.single:
            try:
                if name == "memory":
                    v[name] = float(self._call(dev, "memory", nv.nvmlDeviceGetMemoryInfo, dev.handle).used)
                elif name == "temperature":
                    v[name] = float(self._call(dev, "temperature", nv.nvmlDeviceGetTemperature, dev.handle,
                                               self.api.const("NVML_TEMPERATURE_GPU", 0)))
                elif name == "energy":
                    v[name] = float(self._call(dev, "energy", fn("nvmlDeviceGetTotalEnergyConsumption"), dev.handle))
                elif name == "power":
                    v[name] = float(self._call(dev, "power", fn("nvmlDeviceGetPowerUsage"), dev.handle))
            except Absent:
                pass
        return GaugeRow(dev.pos, now_us, v["energy"], v["power"], v["memory"], v["temperature"])

    def _slow(self, dev: Device) -> None:
        """Clocks and clock event (throttle) reasons, every `slow_every` polls, into `extras`."""
        nv = self.nv
        try:
            dev.extras["sm_clock_mhz"] = int(self._call(dev, "sm_clock", self.api.fn("nvmlDeviceGetClockInfo"),
                                                        dev.handle, self.api.const("NVML_CLOCK_SM", 1)))
        except Absent:
            pass
        fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if fn is not None:
            try:
                dev.extras["clock_event_reasons"] = int(self._call(dev, "clock_event_reasons", fn, dev.handle))
            except Absent:
                pass

    # --- processes
    def _processes(self, dev: Device) -> tuple[dict, bool]:
        """Compute processes now: {(pid, start_ms): Proc}, and whether NVML could list them."""
        if not dev.procs.listed:
            return {}, False
        try:
            plist = self._call(dev, "compute_processes", self.nv.nvmlDeviceGetComputeRunningProcesses, dev.handle)
        except Absent:
            dev.procs.listed = False
            return {}, False
        current: dict = {}
        for p in plist or ():
            pid = int(p.pid)
            ident = self.attribution.identity(pid)
            if ident is None:
                if self.api.log_once(("hidden", pid)):
                    log.warning("pid %d on GPU %s is not visible in %s (the agent needs the host's PID namespace "
                                "or its /proc mounted as proc_root); recorded without attribution", pid, dev.uuid,
                                self.attribution.root)
                ident = ProcessIdentity(pid=pid, start_ms=0)
            elif self.pods is not None:
                ident = self.pods.enrich(ident)
            mem = getattr(p, "usedGpuMemory", None)
            current[(ident.pid, ident.start_ms)] = Proc(ident, float(mem) if mem is not None else NAN)
        return current, True

    def _proc_util(self, dev: Device) -> dict[int, float] | None:
        """Mean SM utilization per pid from the samples since the cursor; None if not available."""
        ps = dev.procs
        if not ps.util:
            return None
        try:
            res = self._call(dev, "process_utilization", self.nv.nvmlDeviceGetProcessUtilization, dev.handle,
                             ps.cursor, not_found_ok=True)
        except Absent:
            ps.util = False
            return None
        acc: dict[int, list] = {}
        newest = ps.cursor
        for s in res or ():
            ts = int(s.timeStamp)
            if ts <= ps.cursor:
                continue
            newest = max(newest, ts)
            a = acc.setdefault(int(s.pid), [0.0, 0])
            a[0] += min(float(s.smUtil), 100.0)
            a[1] += 1
        ps.cursor = newest
        return {pid: s / n for pid, (s, n) in acc.items()}

    def _proc_rows(self, dev: Device, now_us: int, prev_poll: int | None, current: dict, rows: Rows,
                   priming: bool) -> None:
        shares = self._proc_util(dev) if current or dev.procs.seen else None
        prev = dev.procs.seen
        dev.procs.seen = current
        if priming or prev_poll is None or now_us - prev_poll > self.max_poll_gap_us:
            return
        mid = (prev_poll + now_us) // 2
        if shares is None:  # no per-process utilization: every holder gets the GPU's utilization
            busy = sum((r.t1_us - r.t0_us) * r.pct for r in rows.util)
            span = sum(r.t1_us - r.t0_us for r in rows.util)
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
            rows.procs.append(ProcRow(p.ident, t0, t1, pct, p.mem_bytes))

    # ------------------------------------------------------------------ introspection (probe)
    def devices(self) -> list[dict]:
        """Static facts and what each device supports, for probe."""
        out = []
        for d in self._devs:
            u = d.util
            out.append({
                "uuid": d.uuid, "index": d.index, "name": d.name, "kind": d.kind, "parent_uuid": d.parent_uuid,
                "util_method": d.util_method, "sample_period_observed": bool(u.diffs),
                "sample_period_us": u.period_us if d.util_method == "samples" and u.diffs else None,
                "fields_batched": [n for _, n in d.gauges.batch], "fields_single": list(d.gauges.single),
                "gpm": d.gpm.enabled, "process_utilization": d.procs.util, "process_list": d.procs.listed,
                "absent": sorted(self.absent.get(d.uuid, ())), "down": d.health.down,
                "down_count": d.health.down_count, "extras": dict(d.extras), **d.static.for_probe(),
            })
        return out


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
