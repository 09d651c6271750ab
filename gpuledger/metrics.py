"""Prometheus metrics of both daemons, read from the live objects at scrape time.

Each daemon gets its own registry (no global state); `serve()` exposes it over HTTP.

Agent (`agent_registry`): the pipeline's counters; `gpuledger_build_info`; per-GPU series named and
labelled as NVIDIA dcgm-exporter names them, so dashboards and alert rules written for
dcgm-exporter read a host that runs gpuledger; and gpuledger's own per-GPU state-seconds counters.
The per-GPU values come from the windows the agent closes (`GpuTotals`, fed with each
`gpuledger.agent.windows.Closed`), never from a reading of their own.

Collector (`collector_registry`): ingest, store and backpressure figures, the health of its gRPC
services, when each running agent's last batch was stored, and a cumulative insert-latency histogram
fed by `gpuledger.collector.writer.Writer.on_commit`.

Every counter here only grows for the life of the process: totals are kept, never rebuilt from a
bounded list.
"""

from __future__ import annotations

import logging
import platform
import re
import threading
import weakref
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gpuledger import __version__

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MIB = 1 << 20

# dcgm-exporter's label set for a GPU series (internal/pkg/rendermetrics/render_metrics.go, release
# 4.5.3-4.8.2): gpu (index), UUID, pci_bus_id, device (nvidia<index>), modelName, Hostname; on a
# MIG instance also GPU_I_PROFILE and GPU_I_ID (the parent GPU's UUID and index stay in UUID and gpu);
# with Kubernetes, pod / namespace / container and pod_uid; the driver version as
# DCGM_FI_DRIVER_VERSION (a "label" row of etc/default-counters.csv).
DCGM_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname")

# (dcgm-exporter name, help, window column, how the value is made). Names, units and Prometheus types
# as in dcgm-exporter's etc/default-counters.csv; the help text says what gpuledger measures.
# DCGM_FI_PROF_SM_ACTIVE and _SM_OCCUPANCY are in that file, commented out; gpuledger has them from
# GPM (NVML_GPM_METRIC_SM_UTIL, _SM_OCCUPANCY), as it has PIPE_TENSOR_ACTIVE (_ANY_TENSOR_UTIL) and
# DRAM_ACTIVE (_DRAM_BW_UTIL).
GPM_FIELDS = (
    ("DCGM_FI_PROF_SM_ACTIVE", "Ratio of the last window's GPM-covered time the SMs were active (GPM SM_UTIL).",
     "sm_active_ms"),
    ("DCGM_FI_PROF_SM_OCCUPANCY", "Ratio of warps resident on the SMs over the last window (GPM SM_OCCUPANCY).",
     "sm_occupancy_ms"),
    ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "Ratio of the last window the tensor pipes were active (GPM ANY_TENSOR_UTIL).",
     "tensor_active_ms"),
    ("DCGM_FI_PROF_DRAM_ACTIVE", "Ratio of the last window the memory interface was busy (GPM DRAM_BW_UTIL).",
     "dram_active_ms"),
)

# gpuledger's four states and the window columns that hold them
STATES = (("active", "busy_ms"), ("idle_held", "idle_held_ms"), ("idle_free", "idle_free_ms"),
          ("unmonitored", "unmonitored_ms"))
_WINDOW_COLUMNS = ("gpu_uuid", "window_start_ms", "window_ms", "covered_ms", "busy_ms", "idle_held_ms",
                   "idle_free_ms", "unmonitored_ms", "mem_used_max_bytes", "power_mean_mw", "power_max_mw",
                   "energy_mj", "temp_max_c", "gpm_covered_ms") + tuple(f[2] for f in GPM_FIELDS)

# How long an agent's last-batch series is kept after its last batch (a host silent that long has
# long passed the reports' silence horizon; alerts have fired for it).
AGENT_HORIZON_MS = 7 * 86_400_000


def _counter(name, doc, value, labels=None):
    m = CounterMetricFamily(name, doc, labels=list(labels or {}))
    m.add_metric(list((labels or {}).values()), value)
    return m


def _gauge(name, doc, value):
    m = GaugeMetricFamily(name, doc)
    m.add_metric([], value)
    return m


class _Live(Collector):
    def __init__(self, fn: Callable[[], Iterable]) -> None:
        self.fn = fn

    def collect(self):
        yield from self.fn()


def build_info(daemon: str, **extra: str) -> GaugeMetricFamily:
    """`gpuledger_build_info{daemon, version, python, ...} 1`: the versions this process runs."""
    import grpc
    import pyarrow

    labels = {"daemon": daemon, "version": __version__, "python": platform.python_version(),
              "grpcio": grpc.__version__, "pyarrow": pyarrow.__version__, **extra}
    m = GaugeMetricFamily("gpuledger_build_info", "Always 1; the labels name the versions this daemon runs.",
                          labels=list(labels))
    m.add_metric(list(labels.values()), 1)
    return m


# ====================================================================================== agent: per GPU
class GpuTotals:
    """Per-GPU running totals over the windows the agent closed, and each GPU's latest window.

    `feed(closed)` takes each `gpuledger.agent.windows.Closed` once: it is the agent's `on_closed`
    hook (see gpu_totals), which the agent calls with every Closed of `step()` and `close()`.
    Thread-safe: the agent's thread feeds, the HTTP thread reads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state_ms: dict[str, list[int]] = {}  # uuid -> ms per state, in STATES order
        self.energy_mj: dict[str, int] = {}
        self.latest: dict[str, dict] = {}  # uuid -> the columns of its latest window
        self.pods: dict[str, tuple[str, ...]] = {}  # uuid -> pod UIDs holding it in that window

    def feed(self, closed) -> None:
        with self._lock:
            cols = closed.gpu.select(list(_WINDOW_COLUMNS)).to_pydict()
            fresh: set[str] = set()
            for i, uuid in enumerate(cols["gpu_uuid"]):
                start = int(cols["window_start_ms"][i])
                acc = self.state_ms.setdefault(uuid, [0, 0, 0, 0])
                for k, (_, col) in enumerate(STATES):
                    acc[k] += int(cols[col][i])
                self.energy_mj[uuid] = self.energy_mj.get(uuid, 0) + int(cols["energy_mj"][i])
                prev = self.latest.get(uuid)
                if prev is None or start >= prev["window_start_ms"]:
                    self.latest[uuid] = {c: cols[c][i] for c in _WINDOW_COLUMNS}
                    fresh.add(uuid)
            if fresh:
                self._note_pods(closed, fresh)

    def _note_pods(self, closed, uuids: set[str]) -> None:
        """Pods of the processes that held each GPU in its latest window."""
        pod_of = {(p.pid, p.start_ms): p.pod_uid for p in closed.processes if p.pod_uid}
        found: dict[str, set[str]] = {u: set() for u in uuids}
        if pod_of and closed.proc.num_rows:
            p = closed.proc.select(["gpu_uuid", "window_start_ms", "pid", "proc_start_ms", "held_ms"]).to_pydict()
            for i, uuid in enumerate(p["gpu_uuid"]):
                if uuid in found and p["held_ms"][i] and p["window_start_ms"][i] == self.latest[uuid]["window_start_ms"]:
                    pod = pod_of.get((p["pid"][i], p["proc_start_ms"][i]))
                    if pod:
                        found[uuid].add(pod)
        for uuid, pods in found.items():
            self.pods[uuid] = tuple(sorted(pods))

    def snapshot(self) -> tuple[dict, dict, dict, dict]:
        with self._lock:
            return ({u: list(v) for u, v in self.state_ms.items()}, dict(self.energy_mj), dict(self.latest),
                    dict(self.pods))


def _chain(prev: Callable | None, fn: Callable) -> Callable:
    """A hook that calls `fn`, then `prev` (the hook already there, if any). A failure of `fn` is
    logged and `prev` still runs; `fn` has run whatever `prev` does."""

    def hook(arg) -> None:
        try:
            fn(arg)
        except Exception:
            log.exception("metrics hook failed")
        if prev is not None:
            prev(arg)

    return hook


_HOOK_LOCK = threading.Lock()


def _attached(table: weakref.WeakKeyDictionary, owner, hook: str, make: Callable, method: str):
    """The one `make()` object of `owner`, kept in `table`: made on first use and fed through the
    owner's `hook` attribute (a hook already there is kept, called after it), so that however
    many registries read an owner, each call is counted once."""
    with _HOOK_LOCK:
        obj = table.get(owner)
        if obj is None:
            obj = table[owner] = make()
            setattr(owner, hook, _chain(getattr(owner, hook), getattr(obj, method)))
        return obj


_TOTALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gpu_totals(agent) -> GpuTotals:
    """The one GpuTotals of an agent, fed by its `on_closed` hook with every Closed it closes."""
    return _attached(_TOTALS, agent, "on_closed", GpuTotals, "feed")


def _mig_profile(name: str) -> str:
    m = re.search(r"\b(\d+g\.\d+gb)\b", name)
    return m.group(1) if m else ""


def gpu_labels(gpu, hostname: str, device: dict | None = None, driver_version: str = "") -> dict[str, str]:
    """dcgm-exporter's labels for one gpuledger.agent.source.GpuFacts.

    A MIG instance carries its parent's UUID and model with GPU_I_PROFILE and GPU_I_ID, as
    dcgm-exporter labels one; the GPU instance id comes from the source's device facts
    (`gpu_instance_id`) where it gives one, else the instance's own MIG UUID stands in, so that
    two instances of one profile never share a series. Slices no instance holds (gpuledger's
    `...-unallocated-NofM` device) get GPU_I_PROFILE="unallocated".
    """
    device = device or {}
    uuid, name = gpu.uuid, gpu.name
    extra: dict[str, str] = {}
    if gpu.mig:
        uuid = gpu.parent_uuid or gpu.uuid
        if "-unallocated-" in gpu.uuid:
            name = name.split(" (unallocated", 1)[0]
            extra["GPU_I_PROFILE"] = "unallocated"
        else:
            name = name.split(" MIG", 1)[0]
            extra["GPU_I_PROFILE"] = _mig_profile(gpu.name)
            gi = device.get("gpu_instance_id")
            extra["GPU_I_ID"] = str(gi) if gi is not None else gpu.uuid
    labels = {"gpu": str(gpu.index), "UUID": uuid, "pci_bus_id": str(device.get("pci_bus_id", "") or ""),
              "device": f"nvidia{gpu.index}", "modelName": name, "Hostname": hostname, **extra}
    if driver_version:
        labels["DCGM_FI_DRIVER_VERSION"] = driver_version
    return labels


class _Families:
    """Metric families whose samples may carry different label sets (prometheus_client allows it:
    `Metric.add_sample` takes each sample's own labels)."""

    def __init__(self) -> None:
        self.fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def gauge(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        fam = self.fams.setdefault(name, GaugeMetricFamily(name, doc))
        fam.add_sample(name, labels, value)

    def counter(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        fam = self.fams.setdefault(name, CounterMetricFamily(name, doc))
        fam.add_sample(fam.name + "_total", labels, value)


class GpuCollector(Collector):
    """Per-GPU series of one agent: dcgm-exporter names and labels, plus gpuledger's state counters.

    Gauges describe each GPU's latest closed window and are left out where that window has no
    figure for them (a window with no monitored time has no utilization: unmonitored is never
    shown as 0 % busy). Counters are totals over every window counted since the agent started.
    """

    def __init__(self, agent, totals: GpuTotals | None = None) -> None:
        self.agent = agent
        self.totals = totals or gpu_totals(agent)
        source = getattr(agent, "source", None)
        devices: dict[str, dict] = {}
        try:
            devices = {d["uuid"]: d for d in source.devices()} if hasattr(source, "devices") else {}
        except Exception as e:  # descriptive only: the labels do without
            log.warning("per-GPU metrics: device facts unavailable (%s); pci_bus_id left empty", e)
        hostname = getattr(getattr(agent, "host", None), "hostname", "") or agent.cfg.host_id
        driver = str(getattr(source, "driver_version", "") or "")
        self.gpus = list(agent.gpus)
        self.labels = {g.uuid: gpu_labels(g, hostname, devices.get(g.uuid), driver) for g in self.gpus}
        self.mem_total = {g.uuid: int(g.mem_total_bytes) for g in self.gpus}
        # not a DCGM entity: unallocated MIG slices have gpuledger's own counters only
        self.dcgm = {g.uuid for g in self.gpus if "-unallocated-" not in g.uuid}

    def collect(self):
        state_ms, energy, latest, pods = self.totals.snapshot()
        f = _Families()
        for g in self.gpus:
            labels = self.labels[g.uuid]
            ms = state_ms.get(g.uuid, [0, 0, 0, 0])
            for k, (state, _) in enumerate(STATES):
                f.counter("gpuledger_gpu_state_seconds",
                          "GPU-seconds in each state (active, idle_held, idle_free, unmonitored) since the agent "
                          "started; the four add up to wall time.", {**labels, "state": state}, ms[k] / 1000)
            if g.uuid not in self.dcgm:
                continue
            if energy.get(g.uuid, 0) > 0:
                # dcgm-exporter's type for this field is counter, and its series has no _total suffix;
                # prometheus_client would expose a counter family as ..._total, so it is a gauge here
                # under dcgm-exporter's exact name (rate() and increase() read it the same).
                f.gauge("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                        "Energy in mJ the GPU used since the agent started (sum of the energy counter's "
                        "differences); only grows.", labels, energy[g.uuid])
            w = latest.get(g.uuid)
            if w is None:
                continue
            for pod_labels in ([{**labels, "pod_uid": p} for p in pods.get(g.uuid, ())] or [labels]):
                self._window_gauges(f, g.uuid, w, pod_labels)
        yield from f.fams.values()

    def _window_gauges(self, f: _Families, uuid: str, w: dict, labels: dict[str, str]) -> None:
        covered = int(w["covered_ms"])
        if covered:
            f.gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %): share of the last window's monitored time "
                    "a kernel ran.", labels, 100.0 * int(w["busy_ms"]) / covered)
        has_gauges = w["power_max_mw"] or w["mem_used_max_bytes"] or w["temp_max_c"]
        if w["power_max_mw"]:  # a powered GPU never draws 0 W: 0 is no reading
            f.gauge("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W), mean over the last window.", labels,
                    int(w["power_mean_mw"]) / 1000)
        if w["temp_max_c"]:
            f.gauge("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C), highest in the last window.", labels,
                    int(w["temp_max_c"]))
        if has_gauges:
            used = int(w["mem_used_max_bytes"])
            f.gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB), most in the last window.", labels,
                    used // MIB)
            total = self.mem_total.get(uuid, 0)
            if total:
                f.gauge("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB) at the last window's most used.",
                        labels, max(total - used, 0) // MIB)
        gpm = int(w["gpm_covered_ms"])
        if gpm:
            for name, doc, col in GPM_FIELDS:
                f.gauge(name, doc, labels, min(int(w[col]) / gpm, 1.0))


def agent_registry(agent, spool, shipper) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)

    def collect():
        st = shipper.stats
        yield _counter("gpuledger_agent_windows_sampled", "GPU-windows closed by the agent", agent.windows_sampled)
        yield _counter("gpuledger_agent_batches_spooled", "Batches appended to the spool", agent.batches_spooled)
        yield _counter("gpuledger_agent_batches_sent", "Batches sent to the collector (resends included)", st.sent)
        yield _counter("gpuledger_agent_batches_acked", "Batches acknowledged as stored", st.acked)
        yield _counter("gpuledger_agent_windows_acked", "GPU-windows acknowledged as stored", st.acked_windows)
        yield _counter("gpuledger_agent_batches_rejected", "Batches rejected permanently (dead-lettered)", st.rejected)
        yield _counter("gpuledger_agent_batches_deferred", "Batches the collector asked to resend later", st.retried)
        yield _counter("gpuledger_agent_reconnects", "Streams re-established", st.reconnects)
        yield _counter("gpuledger_agent_windows_dropped", "GPU-windows dropped because the spool was full",
                       spool.dropped_windows)
        yield _counter("gpuledger_agent_unhealthy_polls", "Polls in which a GPU was down", agent.unhealthy_polls)
        yield _gauge("gpuledger_agent_spool_bytes", "Bytes in the spool", spool.bytes_used())
        yield _gauge("gpuledger_agent_spool_max_bytes", "The spool's size limit (agent.spool_max_bytes)",
                     spool.max_bytes)
        yield _gauge("gpuledger_agent_spool_pending_windows", "GPU-windows waiting for acknowledgement",
                     spool.pending_windows())
        yield build_info("agent", kernels=str(getattr(agent.cfg, "kernels", "")))

    reg.register(_Live(collect))
    reg.register(GpuCollector(agent))
    return reg


# ====================================================================================== collector
def _insert_histogram() -> Histogram:
    return Histogram("gpuledger_collector_insert_seconds", "Group-commit insert latency, failed inserts included",
                     buckets=LATENCY_BUCKETS, registry=None)


_LATENCY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def insert_latency(writer) -> Histogram:
    """The one cumulative insert-latency histogram of a writer, fed by its `on_commit` hook (called
    with each group commit's latency in seconds, failed inserts included)."""
    return _attached(_LATENCY, writer, "on_commit", _insert_histogram, "observe")


class AgentLastBatch:
    """When each agent's latest batch was stored, from the store's session records (received_ms, the
    collector's clock), so every collector sharing a store tells the same. An agent whose latest run
    stopped on purpose (its stop batch stored) is not silent and is left out; a run that restarts
    brings it back. The query reads the runs with a batch in the last `horizon_ms` and runs at most
    once per `refresh_s`, on a thread of its own: a scrape waits for it at most `wait_s`, then
    answers with what it had (a store that hangs must not hang the metrics endpoint). Agents silent
    longer than the horizon are retired and left out."""

    def __init__(self, store, clock, refresh_s: float = 30.0, horizon_ms: int = AGENT_HORIZON_MS,
                 wait_s: float = 2.0) -> None:
        self.store, self.clock = store, clock
        self.refresh_us = int(refresh_s * 1e6)
        self.horizon_ms = horizon_ms
        self.wait_s = wait_s
        self.last_ms: dict[tuple[str, str], int] = {}
        self.errors = 0
        self._next_us: int | None = None
        self._running: threading.Thread | None = None
        self._lock = threading.Lock()

    def _query(self, since_ms: int) -> None:
        # each host's latest run: when its last batch arrived, and whether it stopped on purpose (a host
        # stopped on purpose is not silent: it is left out)
        try:
            rows = self.store.query_rows(
                f"""SELECT host_id, max(received), argMax(stopped, start) FROM (
                        SELECT host_id, session_start_ms AS start, max(received_ms) AS received,
                               max(stopped_ms) AS stopped
                        FROM {self.store.db}.sessions WHERE gpu_uuid = ''
                        GROUP BY host_id, agent_epoch, session_start_ms HAVING received >= {{since:Int64}})
                    GROUP BY host_id""", {"since": since_ms})
        except Exception as e:  # the store may be the thing that is down: keep what was known
            with self._lock:
                self.errors += 1
            log.warning("metrics: reading agents' last batches failed: %s", e)
            return
        with self._lock:
            for host_id, ms, stopped in rows:
                key = (str(host_id), str(host_id))  # an agent's id is its host id
                if stopped:
                    self.last_ms.pop(key, None)
                    continue
                self.last_ms[key] = max(self.last_ms.get(key, 0), int(ms))

    def values(self) -> dict[tuple[str, str], int]:
        now_us = self.clock.now_us()
        t = None
        with self._lock:
            if (self._next_us is None or now_us >= self._next_us) and \
                    (self._running is None or not self._running.is_alive()):
                self._next_us = now_us + self.refresh_us
                t = self._running = threading.Thread(target=self._query,
                                                     args=(now_us // 1000 - self.horizon_ms,),
                                                     name="gpuledger-metrics-agents", daemon=True)
                t.start()
            else:
                t = self._running
        if t is not None:
            t.join(self.wait_s)
        cutoff = now_us // 1000 - self.horizon_ms
        with self._lock:
            return {k: v for k, v in self.last_ms.items() if v >= cutoff}


def collector_registry(collector, agents_refresh_s: float = 30.0) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    latency = insert_latency(collector.writer)
    agents = AgentLastBatch(collector.store, collector.clock, refresh_s=agents_refresh_s)
    engine = "chdb" if getattr(collector.store, "embedded", False) else "clickhouse"

    def collect():
        st = collector.ingest.stats
        w = collector.writer
        yield _counter("gpuledger_collector_batches_stored", "Batches stored and acknowledged", st.batches)
        yield _counter("gpuledger_collector_windows_stored", "GPU-windows stored", st.windows)
        rej = CounterMetricFamily("gpuledger_collector_batches_rejected", "Batches rejected, by reason",
                                  labels=["reason"])
        for reason in ("invalid", "too_large", "permission"):
            rej.add_metric([reason], st.rejected.get(reason, 0))
        yield rej
        yield _counter("gpuledger_collector_batches_deferred", "Batches answered RESOURCE_EXHAUSTED (backpressure)",
                       st.deferred)
        err = CounterMetricFamily("gpuledger_collector_store_errors", "Store insert failures, by kind",
                                  labels=["kind"])
        err.add_metric(["retryable"], w.store_errors_retryable)
        err.add_metric(["permanent"], w.store_errors_permanent)
        yield err
        yield _gauge("gpuledger_collector_pending_rows", "Rows queued for the writer", w.pending_rows())
        yield _gauge("gpuledger_collector_pending_rows_limit",
                     "Queued rows past which batches are deferred (collector.max_pending_rows)", w.max_pending_rows)
        yield _gauge("gpuledger_collector_active_streams", "Agent streams open", collector.active_streams)
        serving = GaugeMetricFamily("gpuledger_collector_serving",
                                    "1 while a gRPC service answers SERVING to health checks (Telemetry turns "
                                    "NOT_SERVING on a permanent store error)", labels=["service"])
        for svc in ("gpuledger.v1.Telemetry", "gpuledger.v1.Query"):
            serving.add_metric([svc], 1 if collector.serving.get(svc) else 0)
        yield serving
        yield from latency.collect()
        last = GaugeMetricFamily("gpuledger_collector_agent_last_batch_timestamp_seconds",
                                 "Unix time the store received each agent's latest batch (left out: agents "
                                 "whose latest run stopped on purpose, and agents silent for 7 days: retired)",
                                 labels=["agent_id", "host_id"])
        for (agent_id, host_id), ms in sorted(agents.values().items()):
            last.add_metric([agent_id, host_id], ms / 1000)
        yield last
        yield _counter("gpuledger_collector_agent_last_batch_query_errors",
                       "Failed reads of the batch log for gpuledger_collector_agent_last_batch_timestamp_seconds",
                       agents.errors)
        yield build_info("collector", store=engine)

    reg.register(_Live(collect))
    return reg


def serve(registry: CollectorRegistry, listen: str):
    """Serve /metrics on HOST:PORT (port 0 picks one); returns (server, port)."""
    host, port = listen.rsplit(":", 1)
    server, _thread = start_http_server(int(port), addr=host, registry=registry)
    return server, server.server_port
