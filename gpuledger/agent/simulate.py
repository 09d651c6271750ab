"""A simulated fleet: realistic GPU behaviour from a seed and an injected clock.

Profiles:
- training: a job at ~95 % utilization with periodic input stalls (held, 0 %), between jobs
  the GPU is free;
- notebook: a kernel holds the GPU all day, with rare bursts of work;
- inference: an endpoint holds the GPU, utilization follows a diurnal traffic curve;
- idle: no process at all;
- bursty profiles, each derived from an exact busy-interval model (see `BURSTY`): a training
  loop of 45 s compute / 15 s input stall, a data-loader loop of 8 s / 2 s, and inference
  requests arriving as a Poisson process, each keeping the GPU busy for a short random time.
  Each of their samples is the busy fraction of its driver period, rounded to an integer percent
  as NVML reports it, and `SimulatedSource.busy_us` gives the exact busy time of any interval;
plus NVML outages (no readings at all) on some GPUs, which must show up as unmonitored;
- workflow profiles (`endpoint`, `experiment`): an inference endpoint whose GPU is busy exactly while
  its simulated requests are in flight (`SimEndpoint`: requests, prompt and generation tokens from a
  seeded arrival process whose rate follows the time of day, served as a vLLM /metrics exposition by
  `SimInferenceServer` or handed to the agent's scraper by `sim_http_get`), and training runs on a
  schedule (`SimRun`: an MLflow run id and experiment id on the process, ending early when it fails).

The source keeps its own ground truth (active / idle-held / idle-free / unmonitored seconds per
GPU) from exactly the samples it hands out, so tests can compare the pipeline against it.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from gpuledger.agent.source import (
    GaugeReadings,
    GpmReadings,
    GpuFacts,
    ProcessIdentity,
    ProcReadings,
    Readings,
    StateSeconds,
    UtilReadings,
    from_parts,
)

DAY_S = 86_400.0

# Simulated characteristics by GPU model: (memory GiB, idle W, max W, sample period us)
GPU_MODELS = {
    "H100": (80, 70, 700, 166_667),
    "H200": (141, 75, 700, 166_667),
    "A100": (40, 50, 400, 166_667),
    "L40S": (48, 35, 350, 166_667),
    "A10G": (24, 25, 300, 1_000_000),
    "L4": (24, 16, 72, 1_000_000),
    "T4": (16, 10, 70, 1_000_000),
    "V100": (16, 40, 300, 1_000_000),
}
FLEET_PROFILES = ("training", "notebook", "inference", "idle")  # what `simulated_fleet` draws from


@dataclass(frozen=True)
class Loop:
    """A GPU busy for `on_s`, then idle for `off_s`, repeating from the source's start."""

    on_s: float
    off_s: float


@dataclass(frozen=True)
class Poisson:
    """Requests arriving at `rate_per_s` (a Poisson process); each keeps the GPU busy for a
    log-normal time (median `median_ms`, shape `sigma`, capped at `max_ms`). The GPU is busy
    while at least one request is in flight (the union of the requests' intervals)."""

    rate_per_s: float
    median_ms: float
    sigma: float
    max_ms: float = 2000.0


# Bursty profiles: GPUs held all the time, utilization from an exact busy-interval model.
BURSTY = {
    "training_45_15": Loop(on_s=45.0, off_s=15.0),  # training step loop with a 15 s input stall
    "dataloader_8_2": Loop(on_s=8.0, off_s=2.0),  # 8 s compute, 2 s waiting on the data loader
    "inference_poisson": Poisson(rate_per_s=3.0, median_ms=60.0, sigma=0.8),  # a lightly loaded endpoint
}
PROFILES = FLEET_PROFILES + tuple(BURSTY)
WORKFLOW_PROFILES = ("endpoint", "experiment")  # need SimGpu.traffic / SimGpu.runs
_POISSON_BLOCK_US = 60_000_000  # requests are drawn per block of the source's time, one seed each


Truth = StateSeconds  # the simulator's ground truth per GPU


@dataclass(frozen=True)
class Traffic:
    """Requests to a simulated inference endpoint: arrivals a Poisson process whose rate follows the
    time of day (UTC). `shape` diurnal: between `floor` x peak (03:00) and the peak (15:00), never
    zero; `hours`: the peak rate from hours[0] to hours[1] (UTC, every day), none outside (a
    development endpoint used in working hours). Each request has log-normal prompt and generation
    token counts (medians, shape `sigma`, generation capped at `max_tokens`) and keeps the endpoint
    busy for prefill_ms + generation tokens x ms_per_token."""

    peak_rps: float = 2.0
    shape: str = "diurnal"
    hours: tuple[float, float] = (9.0, 17.0)
    floor: float = 0.15
    prompt_tokens: float = 350.0
    generation_tokens: float = 120.0
    sigma: float = 0.7
    max_tokens: int = 1024
    prefill_ms: float = 40.0
    ms_per_token: float = 15.0

    def rate(self, t_s: np.ndarray) -> np.ndarray:
        """Requests per second at absolute times (seconds since the epoch)."""
        day = (np.asarray(t_s, float) % DAY_S) / DAY_S
        if self.shape == "hours":
            h = day * 24.0
            return np.where((h >= self.hours[0]) & (h < self.hours[1]), self.peak_rps, 0.0)
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * (day - 0.375))  # 0 at 03:00, 1 at 15:00
        return self.peak_rps * (self.floor + (1.0 - self.floor) * wave)


@dataclass(frozen=True)
class SimRun:
    """A training run on one GPU, [start_s, end_s) after the source's start, with its tracker ids."""

    run_id: str
    start_s: float
    end_s: float
    experiment_id: str = ""


@dataclass(frozen=True)
class SimGpu:
    profile: str
    team: str = "research"
    project: str = "default"
    outage: tuple[float, float] | None = None  # [start, end) seconds after the source's start
    endpoint: str = ""  # endpoint profile: its name (default <project>-endpoint); GPUs of one name share traffic
    traffic: Traffic | None = None  # endpoint profile: its requests (default Traffic())
    phase: str = ""  # the process's phase tag (default: production for inference, experiment otherwise)
    runs: tuple = ()  # experiment profile: SimRun, ... (the GPU is free between runs)


@dataclass
class _State:
    next_end_us: int
    energy_mj: float = 0.0
    last_gauge_us: int = 0
    job_pid: int = 0
    job_start_us: int = -1


_WORKLOAD = {"training": "train", "notebook": "notebook", "inference": "inference",
             "training_45_15": "train", "dataloader_8_2": "train", "inference_poisson": "inference",
             "endpoint": "inference", "experiment": "train"}


def _stable_seed(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


class SimulatedSource:
    """GpuSource for one simulated host. Deterministic for a given seed and poll sequence."""

    def __init__(self, host_id: str, gpu_model: str, gpus: list[SimGpu], start_us: int, seed: int = 0,
                 sample_period_us: int | None = None) -> None:
        mem_gib, self._idle_w, self._max_w, period = GPU_MODELS[gpu_model]
        self.period_us = int(sample_period_us or period)
        self.host_id = host_id
        self.model = gpu_model
        self.spec = list(gpus)
        self.start_us = int(start_us)
        self.seed = seed
        self._mem_total = mem_gib * 2**30
        self._facts = [
            GpuFacts(
                uuid="GPU-" + hashlib.blake2b(f"{host_id}/{i}/{seed}".encode(), digest_size=16).hexdigest(),
                index=i,
                name=f"NVIDIA {gpu_model} (simulated)",
                mem_total_bytes=self._mem_total,
                util_method="simulated",
            )
            for i in range(len(gpus))
        ]
        self._state = [_State(next_end_us=self.start_us + self.period_us, last_gauge_us=self.start_us)
                       for _ in gpus]
        self.truth = [Truth() for _ in gpus]
        self._recent: list[list[tuple]] = [[] for _ in gpus]  # per GPU: the last minutes of accounted samples
        self._truth_until_us = self.start_us
        self._closed = False
        self._poisson_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.endpoints: dict[str, SimEndpoint] = {}  # endpoint name -> its simulated server
        for spec in self.spec:
            if spec.profile == "endpoint":
                name = endpoint_name(spec)
                if name not in self.endpoints:
                    self.endpoints[name] = SimEndpoint(name, spec.traffic or Traffic(), self.start_us,
                                                       seed=_stable_seed(seed, host_id, name) % 2**32)

    # -- GpuSource
    def gpus(self) -> list[GpuFacts]:
        return list(self._facts)

    def close(self) -> None:
        self._closed = True

    def poll(self, now_us: int) -> Readings:
        util_parts, proc_parts, gauge_rows, processes = [], [], [], []
        for g, spec in enumerate(self.spec):
            st = self._state[g]
            n = (now_us - st.next_end_us) // self.period_us + 1
            if n <= 0:
                continue
            ends = st.next_end_us + self.period_us * np.arange(n, dtype=np.int64)
            st.next_end_us = int(ends[-1]) + self.period_us
            starts = ends - self.period_us
            rel_s = (ends - self.start_us) / 1e6
            pct, held, job = self._behaviour(g, spec, rel_s, ends)
            out = np.zeros(n, bool)
            if spec.outage is not None:
                out = (rel_s > spec.outage[0]) & (rel_s <= spec.outage[1])
            self._account(g, starts, ends, pct, held, out)
            keep = ~out
            util_parts.append((np.full(int(keep.sum()), g, np.int32), starts[keep], ends[keep],
                               pct[keep].astype(np.float32), held[keep].astype(np.uint8)))
            # one process per GPU while held; identity changes per job
            hk = held & keep
            if hk.any():
                ids = np.unique(job[hk])
                for jid in ids:
                    sel = hk & (job == jid)
                    ref = len(processes)
                    processes.append(self._identity(g, spec, int(jid)))
                    m = int(sel.sum())
                    proc_parts.append((np.full(m, g, np.int32), np.full(m, ref, np.int32), starts[sel],
                                       ends[sel], pct[sel].astype(np.float32),
                                       np.full(m, 0.6 * self._mem_total)))
            # gauges once a second, as the agent's 1 s tick reads them; none during an outage
            gt = np.arange(st.last_gauge_us + 1_000_000, now_us + 1, 1_000_000, dtype=np.int64)
            if gt.size:
                st.last_gauge_us = int(gt[-1])
                idx = np.clip(np.searchsorted(ends, gt), 0, n - 1)
                ok = keep[idx]
                busy = pct[idx] / 100.0
                rng_g = np.random.default_rng(_stable_seed(self.seed, self.host_id, g, int(gt[0]), "g"))
                power_w = self._idle_w + (self._max_w - self._idle_w) * busy + rng_g.normal(0, 0.01 * self._max_w,
                                                                                            gt.size)
                power_w = np.maximum(power_w, self._idle_w * 0.5)
                energy = st.energy_mj + np.cumsum(power_w) * 1000.0  # 1 s steps: W * s = J = 1000 mJ
                st.energy_mj = float(energy[-1])
                mem = np.where(held[idx], 0.6 * self._mem_total, 300 * 2**20)
                temp = 30 + 50 * busy + rng_g.normal(0, 0.5, gt.size)
                gauge_rows.append((np.full(int(ok.sum()), g, np.int32), gt[ok], np.rint(energy[ok]),
                                   np.rint(power_w[ok] * 1000.0), mem[ok], np.rint(temp[ok])))
        self._truth_until_us = max(self._truth_until_us, min(s.next_end_us - self.period_us for s in self._state))
        return Readings(
            util=from_parts(UtilReadings, util_parts),
            gauges=from_parts(GaugeReadings, gauge_rows),
            gpm=GpmReadings(),
            procs=from_parts(ProcReadings, proc_parts),
            processes=processes,
        )

    # -- behaviour
    def _behaviour(self, g: int, spec: SimGpu, rel_s: np.ndarray, ends: np.ndarray):
        """Utilization (integer percent), held flag and job id for samples ending at rel_s."""
        rng = np.random.default_rng(_stable_seed(self.seed, self.host_id, g, int(ends[0])))
        n = rel_s.size
        day = (rel_s % DAY_S) / DAY_S
        job = np.zeros(n, np.int64)
        if spec.profile == "training":
            # 7 h jobs separated by 1 h gaps; 40 s input stall every 6 min
            cycle = rel_s % (8 * 3600)
            held = cycle < 7 * 3600
            job = (rel_s // (8 * 3600)).astype(np.int64) + 1
            stall = (cycle % 360) >= 320
            pct = np.clip(rng.normal(95, 3, n), 0, 100)
            pct = np.where(stall | ~held, 0, pct)
        elif spec.profile == "notebook":
            held = np.ones(n, bool)
            minute = (rel_s // 60).astype(np.int64)
            burst = (np.sin(minute * 12.9898 + g) * 43758.5453) % 1.0 < 0.06
            pct = np.where(burst, np.clip(rng.normal(70, 15, n), 0, 100), 0)
            job[:] = 1
        elif spec.profile == "inference":
            held = np.ones(n, bool)
            traffic = 0.45 + 0.4 * np.sin(2 * math.pi * (day - 0.3))
            pct = np.clip(rng.normal(traffic * 100, 6, n), 0, 100)
            job[:] = 1
        elif spec.profile == "experiment":
            job = np.zeros(n, np.int64)
            for i, r in enumerate(spec.runs):
                job = np.where((rel_s > r.start_s) & (rel_s <= r.end_s), i + 1, job)
            held = job > 0
            stall = (rel_s % 360) >= 320  # a 40 s input stall every 6 min, as the training profile
            pct = np.clip(rng.normal(95, 3, n), 0, 100)
            pct = np.where(stall | ~held, 0, pct)
        elif spec.profile in BURSTY or spec.profile == "endpoint":
            held = np.ones(n, bool)
            busy = self.busy_us(g, ends - self.period_us, ends)
            pct = 100.0 * busy / self.period_us  # exact busy fraction of each driver period
            job[:] = 1
        else:  # idle
            held = np.zeros(n, bool)
            pct = np.zeros(n)
        return np.rint(pct), held, job

    # -- exact busy-interval model of the bursty profiles
    def busy_intervals(self, g: int, t0_us: int, t1_us: int) -> tuple[np.ndarray, np.ndarray]:
        """Disjoint, sorted busy intervals [start, end) of GPU `g` (a bursty profile), clipped to
        [t0_us, t1_us): the exact ground truth its samples are derived from."""
        a, b = self._intervals(g, int(t0_us), int(t1_us))
        a, b = np.maximum(a, t0_us), np.minimum(b, t1_us)
        keep = b > a
        return a[keep], b[keep]

    def busy_us(self, g: int, t0_us, t1_us) -> np.ndarray:
        """Exact busy microseconds of GPU `g` (a bursty profile) in each interval [t0_us, t1_us)."""
        t0 = np.atleast_1d(np.asarray(t0_us, np.int64))
        t1 = np.atleast_1d(np.asarray(t1_us, np.int64))
        if t0.size == 0:
            return np.zeros(0, np.int64)
        if np.any(t1 < t0):
            raise ValueError("busy_us: every interval needs t1_us >= t0_us")
        lo, hi = int(t0.min()), int(t1.max())
        a, b = self._intervals(g, lo, hi)
        if a.size == 0:
            return np.zeros(t0.size, np.int64)
        cum = np.concatenate(([0], np.cumsum(b - a)[:-1]))  # busy time before each interval starts

        def upto(t):  # busy time from a[0] to t
            i = np.searchsorted(a, t, side="right") - 1  # the last interval starting at or before t
            j = np.maximum(i, 0)
            return np.where(i >= 0, cum[j] + np.clip(t - a[j], 0, b[j] - a[j]), 0)

        return (upto(t1) - upto(t0)).astype(np.int64)

    def _intervals(self, g: int, lo_us: int, hi_us: int) -> tuple[np.ndarray, np.ndarray]:
        """Busy intervals of GPU g that may overlap [lo_us, hi_us), in absolute microseconds."""
        if self.spec[g].profile == "endpoint":
            return self.endpoints[endpoint_name(self.spec[g])].busy_intervals(lo_us, hi_us)
        model = BURSTY.get(self.spec[g].profile)
        if model is None:
            raise ValueError(f"GPU {g}: profile {self.spec[g].profile!r} has no busy-interval model "
                             f"(one of {tuple(BURSTY)})")
        if isinstance(model, Loop):
            on, cyc = int(round(model.on_s * 1e6)), int(round((model.on_s + model.off_s) * 1e6))
            k = np.arange((lo_us - self.start_us) // cyc, (hi_us - self.start_us) // cyc + 1, dtype=np.int64)
            a = self.start_us + k * cyc
            return a, a + on
        max_us = int(round(model.max_ms * 1000))
        k0 = (lo_us - max_us - self.start_us) // _POISSON_BLOCK_US  # earlier requests cannot reach lo_us
        k1 = (hi_us - 1 - self.start_us) // _POISSON_BLOCK_US
        parts = [self._poisson_block(g, model, k) for k in range(int(k0), int(k1) + 1)]
        a = np.concatenate([p[0] for p in parts])
        b = np.concatenate([p[1] for p in parts])
        if a.size == 0:
            return a, b
        # union of the requests' intervals (arrivals are sorted): a new busy run starts where an
        # arrival comes after every earlier request has finished
        run_end = np.maximum.accumulate(b)
        first = np.concatenate(([True], a[1:] > run_end[:-1]))
        last = np.concatenate((first[1:], [True]))
        return a[first], run_end[last]

    def _poisson_block(self, g: int, model: Poisson, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Requests arriving in block k of the source's time: (arrival, end) in absolute us."""
        hit = self._poisson_cache.get((g, k))
        if hit is not None:
            return hit
        rng = np.random.default_rng(_stable_seed(self.seed, self.host_id, g, "poisson", k))
        n = int(rng.poisson(model.rate_per_s * _POISSON_BLOCK_US / 1e6))
        arrive = self.start_us + k * _POISSON_BLOCK_US + np.sort(rng.integers(0, _POISSON_BLOCK_US, n))
        service = np.rint(rng.lognormal(math.log(model.median_ms * 1000), model.sigma, n))
        service = np.clip(service, 1, int(round(model.max_ms * 1000))).astype(np.int64)
        out = (arrive.astype(np.int64), arrive + service)
        if len(self._poisson_cache) > 512:  # a poll touches one or two blocks; keep memory flat
            self._poisson_cache.clear()
        self._poisson_cache[(g, k)] = out
        return out

    def _identity(self, g: int, spec: SimGpu, job: int) -> ProcessIdentity:
        pid = 1000 + (_stable_seed(self.host_id, g, job) % 60000)
        start_ms = (self.start_us // 1000) + (job - 1) * 8 * 3600 * 1000 if spec.profile == "training" else (
            self.start_us // 1000 - 3600_000)
        workload = _WORKLOAD[spec.profile]
        tags = [("team", spec.team), ("project", spec.project), ("workload", workload),
                ("phase", spec.phase or ("production" if workload == "inference" else "experiment"))]
        if spec.profile == "training":
            tags.append(("mlflow_run_id", f"run-{self.host_id}-{g}-{job}"))
        if spec.profile == "experiment":
            run = spec.runs[job - 1]
            start_ms = self.start_us // 1000 + int(run.start_s * 1000)
            tags.append(("mlflow_run_id", run.run_id))
            if run.experiment_id:
                tags.append(("mlflow_experiment_id", run.experiment_id))
        if workload == "inference":
            tags.append(("endpoint", endpoint_name(spec) if spec.profile == "endpoint" else f"{spec.project}-endpoint"))
        return ProcessIdentity(pid=int(pid), start_ms=int(start_ms),
                               command={"train": "python train.py", "notebook": "jupyter-kernel",
                                        "inference": "vllm serve"}[workload],
                               container_id=f"sim{_stable_seed(self.host_id, g, job) % 10**12:012x}",
                               tags=tuple(sorted(tags)))

    def _account(self, g, starts, ends, pct, held, out) -> None:
        dur = (ends - starts) / 1e6
        t = self.truth[g]
        mon = ~out
        busy = dur * pct / 100.0
        t.active_s += float(busy[mon].sum())
        t.idle_held_s += float((dur - busy)[mon & held].sum())
        t.idle_free_s += float((dur - busy)[mon & ~held].sum())
        t.unmonitored_s += float(dur[out].sum())
        recent = self._recent[g]
        recent.append((starts, ends, pct, held, out))
        while len(recent) > 1 and recent[0][1][-1] < ends[-1] - 600_000_000:  # keep the last ten minutes
            recent.pop(0)

    def forget_after(self, t_us: int) -> None:
        """The agent died at the latest poll and lost what it measured after `t_us` (windows not yet closed
        or spooled): in the truth that time is unmonitored, not what the samples said."""
        for g, recent in enumerate(self._recent):
            t = self.truth[g]
            for starts, ends, pct, held, out in recent:
                lost = np.clip(ends - np.maximum(starts, t_us), 0, None) / 1e6  # seconds of each sample after t_us
                if not lost.any():
                    continue
                busy = lost * pct / 100.0
                mon = ~out
                t.active_s -= float(busy[mon].sum())
                t.idle_held_s -= float((lost - busy)[mon & held].sum())
                t.idle_free_s -= float((lost - busy)[mon & ~held].sum())
                t.unmonitored_s += float(lost[mon].sum())
            self._recent[g] = []

    def skip_to(self, t_us: int, unmonitored: bool = False) -> None:
        """Jump to `t_us` without handing out samples: the host was off (not expected at all: no truth), or
        with `unmonitored` up but unwatched (its agent was down: the time is unmonitored in the truth)."""
        for g, st in enumerate(self._state):
            first_end = st.next_end_us
            if t_us + self.period_us <= first_end:
                continue
            n = (t_us - first_end) // self.period_us + 1  # samples ending at or before t_us are skipped
            st.next_end_us = first_end + n * self.period_us
            if unmonitored:
                self.truth[g].unmonitored_s += n * self.period_us / 1e6
            st.last_gauge_us = max(st.last_gauge_us, t_us)
            st.energy_mj += 0.0  # the counter does not move while nothing is read

    def truth_until_us(self) -> int:
        """Ground truth covers [start_us, this) for every GPU."""
        return self._truth_until_us


# ----------------------------------------------------------------------------- fleets


@dataclass(frozen=True)
class SimHost:
    host_id: str
    provider: str
    region: str
    instance_type: str
    gpu_model: str
    gpus: tuple[SimGpu, ...]
    tags: dict = field(default_factory=dict)
    # The elastic profile: (seconds after the fleet's start, event) with event "stop" (the agent stops on
    # purpose: spot notice, scale to zero, nightly shutdown; the host is then off), "start" (up again),
    # "kill" (the agent dies, the host stays up) and "restart" (the agent is back after a kill).
    lifecycle: tuple[tuple[float, str], ...] = ()
    clock_offset_s: float = 0.0  # this host's clock minus the true time


def elastic_fleet(hours: float, seed: int = 7) -> list[SimHost]:
    """Hosts at the fleet's edges, each with its lifecycle: a spot instance terminated for good, an
    inference endpoint scaling to zero and back, a nightly stop and start, an agent killed and
    restarted on a host that stayed up, and a host whose clock runs 4 minutes ahead. Event times are
    multiples of 10 s (the default window), as the gaps a real agent leaves are."""
    span = hours * 3600.0

    def at(frac: float) -> float:
        return round(span * frac / 10.0) * 10.0

    base = dict(provider="aws", region="us-east-1", tags={"team": "platform", "cloud_account": "aws-prod"})
    return [
        SimHost("sim-elastic-spot", instance_type="g5.12xlarge", gpu_model="A10G", **base,
                gpus=(SimGpu("training", "research", "llm-pretrain"),) * 4, lifecycle=((at(0.6), "stop"),)),
        SimHost("sim-elastic-endpoint", instance_type="g6e.xlarge", gpu_model="L40S", **base,
                gpus=(SimGpu("inference", "platform", "chat-api"),),
                lifecycle=((at(0.2), "stop"), (at(0.45), "start"), (at(0.7), "stop"), (at(0.85), "start"))),
        SimHost("sim-elastic-nightly", instance_type="g6.xlarge", gpu_model="L4", **base,
                gpus=(SimGpu("notebook", "vision", "detector"),), lifecycle=((at(0.3), "stop"), (at(0.5), "start"))),
        SimHost("sim-elastic-crash", instance_type="g4dn.xlarge", gpu_model="T4", **base,
                gpus=(SimGpu("inference", "search", "ranker"),),
                lifecycle=((at(0.4), "kill"), (at(0.4) + 600.0, "restart"))),
        SimHost("sim-elastic-ahead", instance_type="g5.xlarge", gpu_model="A10G", **base,
                gpus=(SimGpu("training", "research", "llm-pretrain"),), clock_offset_s=240.0),
    ]


# (provider, region, instance type, GPU model, GPU count) from the shipped catalog
_FLEET_SHAPES = [
    ("aws", "us-east-1", "p5.48xlarge", "H100", 8),
    ("aws", "us-east-1", "p4d.24xlarge", "A100", 8),
    ("aws", "us-east-1", "g5.12xlarge", "A10G", 4),
    ("aws", "us-east-1", "g6e.12xlarge", "L40S", 4),
    ("aws", "us-east-1", "g4dn.xlarge", "T4", 1),
    ("gcp", "us-central1", "a2-highgpu-1g", "A100", 1),
    ("azure", "eastus", "Standard_NC64as_T4_v3", "T4", 4),
    ("aws", "us-east-1", "g6.48xlarge", "L4", 8),
]
_TEAMS = [("research", "llm-pretrain"), ("search", "ranker"), ("vision", "detector"), ("platform", "chat-api")]


def simulated_fleet(n_hosts: int = 8, seed: int = 7) -> list[SimHost]:
    """A mixed fleet: every profile present, one NVML outage, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    hosts = []
    for h in range(n_hosts):
        provider, region, itype, model, count = _FLEET_SHAPES[h % len(_FLEET_SHAPES)]
        gpus = []
        for g in range(count):
            profile = (FLEET_PROFILES[int(rng.integers(0, len(FLEET_PROFILES)))] if count > 1
                       else FLEET_PROFILES[h % 4])
            team, project = _TEAMS[int(rng.integers(0, len(_TEAMS)))]
            outage = (3 * 3600.0, 3 * 3600.0 + 1200.0) if (h == 1 and g == 0) else None
            gpus.append(SimGpu(profile=profile, team=team, project=project, outage=outage))
        hosts.append(SimHost(host_id=f"sim-{h:03d}-{itype}", provider=provider, region=region,
                             instance_type=itype, gpu_model=model, gpus=tuple(gpus),
                             tags={"team": "platform", "cloud_account": f"{provider}-prod"}))
    return hosts


# ----------------------------------------------------------------------------- inference endpoints


def endpoint_name(spec: SimGpu) -> str:
    return spec.endpoint or f"{spec.project}-endpoint"


_BLOCK_US = 60_000_000  # requests are drawn per minute of the source's time, one seed each


class SimEndpoint:
    """A simulated inference server's requests, exactly: every request's arrival, completion and
    token counts come from a seeded draw per minute, so any instant's counters, and the ground truth
    of any window, are computed from the same requests the GPU is busy with.

    counters(t) are what its /metrics would say at t: requests completed by t (t included), their
    prompt and generation tokens, and requests in flight at t (arrived by t, not completed)."""

    def __init__(self, name: str, traffic: Traffic, start_us: int, seed: int = 0, model: str = "sim/llm-8b") -> None:
        max_us = int(round((traffic.prefill_ms + traffic.max_tokens * traffic.ms_per_token) * 1000))
        if max_us >= _BLOCK_US:
            raise ValueError(f"endpoint {name}: a request may last {max_us / 1e6:.0f} s, at most 60 s "
                             "(lower max_tokens or ms_per_token)")
        if traffic.shape not in ("diurnal", "hours"):
            raise ValueError(f"endpoint {name}: traffic shape must be diurnal or hours, got {traffic.shape!r}")
        self.name = name
        self.traffic = traffic
        self.start_us = int(start_us)
        self.seed = seed
        self.model = model
        self._blocks: dict[int, tuple[np.ndarray, ...]] = {}
        self._cum: list[np.ndarray] = [np.zeros(4, np.int64)]  # totals of blocks < k: requests, prompt, gen, length
        self._lock = threading.Lock()  # the HTTP server's threads and the source both read it

    # -- the requests
    def _block(self, k: int) -> tuple[np.ndarray, ...]:
        """Requests arriving in block k: (arrive, complete, prompt, generation), arrival-sorted, us."""
        hit = self._blocks.get(k)
        if hit is not None:
            return hit
        t = self.traffic
        rng = np.random.default_rng(_stable_seed(self.seed, self.name, "requests", k))
        a0 = self.start_us + k * _BLOCK_US
        n = int(rng.poisson(t.peak_rps * _BLOCK_US / 1e6)) if k >= 0 else 0
        arrive = a0 + np.sort(rng.integers(0, _BLOCK_US, n)).astype(np.int64)
        keep = rng.random(n) * t.peak_rps < t.rate(arrive / 1e6)  # thinning: the rate of the time of day
        arrive = arrive[keep]
        m = arrive.size
        prompt = np.maximum(1, np.rint(rng.lognormal(math.log(t.prompt_tokens), t.sigma, m))).astype(np.int64)
        gen = np.clip(np.rint(rng.lognormal(math.log(t.generation_tokens), t.sigma, m)), 1, t.max_tokens).astype(np.int64)
        complete = arrive + np.rint((t.prefill_ms + gen * t.ms_per_token) * 1000).astype(np.int64)
        out = (arrive, complete, prompt, gen)
        if len(self._blocks) > 256:
            self._blocks.clear()
        self._blocks[k] = out
        return out

    def _cum_before(self, k: int) -> np.ndarray:
        while len(self._cum) <= k:
            j = len(self._cum) - 1
            _, _, p, gen = self._block(j)
            tot = np.array([p.size, p.sum(), gen.sum(), int((gen == self.traffic.max_tokens).sum())], np.int64)
            self._cum.append(self._cum[-1] + tot)
        return self._cum[max(k, 0)]

    def _k(self, t_us: int) -> int:
        return (int(t_us) - self.start_us) // _BLOCK_US

    def requests(self, t0_us: int, t1_us: int) -> tuple[np.ndarray, ...]:
        """Every request that arrived in [t0_us - 2 min, t1_us): enough for anything that happens in
        [t0_us, t1_us)."""
        k0, k1 = max(self._k(t0_us) - 2, 0), self._k(t1_us)
        parts = [self._block(k) for k in range(k0, k1 + 1)] if k1 >= 0 else []
        if not parts:
            return tuple(np.zeros(0, np.int64) for _ in range(4))
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))

    def counters(self, t_us: int) -> tuple[int, int, int, int, int]:
        """(requests completed, prompt tokens, generation tokens, running, completed at max_tokens) at t."""
        with self._lock:
            k = self._k(t_us)
            if k < 0:
                return 0, 0, 0, 0, 0
            base = self._cum_before(k - 1).copy()
            running = 0
            for j in (k - 1, k):
                if j < 0:
                    continue
                arrive, complete, p, gen = self._block(j)
                done = complete <= t_us
                base += np.array([done.sum(), p[done].sum(), gen[done].sum(),
                                  (done & (gen == self.traffic.max_tokens)).sum()], np.int64)
                running += int(((arrive <= t_us) & ~done).sum())
            return int(base[0]), int(base[1]), int(base[2]), running, int(base[3])

    def busy_intervals(self, lo_us: int, hi_us: int) -> tuple[np.ndarray, np.ndarray]:
        """Union of the requests' [arrive, complete) that may overlap [lo_us, hi_us)."""
        with self._lock:
            arrive, complete, _, _ = self.requests(lo_us, hi_us)
        if arrive.size == 0:
            return arrive, complete
        run_end = np.maximum.accumulate(complete)
        first = np.concatenate(([True], arrive[1:] > run_end[:-1]))
        last = np.concatenate((first[1:], [True]))
        return arrive[first], run_end[last]

    def truth(self, t0_us: int, t1_us: int, window_us: int = 10_000_000) -> dict[str, np.ndarray]:
        """Ground truth per window [a, a + window) for a in [t0_us, t1_us), as a scrape at each window's
        start sees it: requests completed in (a, a + window] and their tokens, requests in flight at a,
        and `serving` (either > 0)."""
        starts = np.arange(int(t0_us), int(t1_us), int(window_us), dtype=np.int64)
        with self._lock:
            arrive, complete, p, gen = self.requests(t0_us, t1_us + window_us)
        order = np.argsort(complete, kind="stable")
        c = complete[order]
        cp = np.concatenate(([0], np.cumsum(p[order])))
        cg = np.concatenate(([0], np.cumsum(gen[order])))
        lo = np.searchsorted(c, starts, side="right")
        hi = np.searchsorted(c, starts + window_us, side="right")
        running = np.searchsorted(np.sort(arrive), starts, side="right") - lo
        req = hi - lo
        return {"window_start_us": starts, "requests": req, "prompt_tokens": cp[hi] - cp[lo],
                "generation_tokens": cg[hi] - cg[lo], "running": running, "serving": (req > 0) | (running > 0)}

    def exposition(self, t_us: int) -> str:
        """The endpoint's /metrics at t, in vLLM's names (V1 exposition: an engine label on every series)."""
        req, prompt, gen, running, length = self.counters(t_us)
        lbl = f'engine="0",model_name="{self.model}"'
        start_s = self.start_us / 1e6
        return (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{lbl}}} {running}.0\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{lbl}}} 0.0\n"
            "# HELP vllm:request_success_total Count of successfully processed requests.\n"
            "# TYPE vllm:request_success_total counter\n"
            f'vllm:request_success_total{{{lbl},finished_reason="stop"}} {req - length}.0\n'
            f'vllm:request_success_total{{{lbl},finished_reason="length"}} {length}.0\n'
            f'vllm:request_success_total{{{lbl},finished_reason="abort"}} 0.0\n'
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
            "# TYPE vllm:prompt_tokens_total counter\n"
            f"vllm:prompt_tokens_total{{{lbl}}} {prompt}.0\n"
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
            "# TYPE vllm:generation_tokens_total counter\n"
            f"vllm:generation_tokens_total{{{lbl}}} {gen}.0\n"
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n"
            "# TYPE process_start_time_seconds gauge\n"
            f"process_start_time_seconds {start_s:.2f}\n")


def sim_http_get(endpoints: dict, clock) -> callable:
    """An `http_get(url, timeout_s)` for EndpointScraper that answers http://sim/<name>/metrics from the
    simulated endpoint of that name at the clock's now (no socket: for fleets of many endpoints)."""

    def http_get(url: str, timeout_s: float) -> bytes:
        name = url.rstrip("/").split("/")[-2]
        ep = endpoints.get(name)
        if ep is None:
            raise OSError(f"no simulated endpoint {name!r}")
        return ep.exposition(clock.now_us()).encode()

    return http_get


class SimInferenceServer:
    """Real HTTP on 127.0.0.1 (a free port) serving GET /<name>/metrics of each simulated endpoint at
    the clock's now, so an agent scrapes them exactly as it scrapes vLLM. close() stops it."""

    def __init__(self, endpoints: dict, clock, host: str = "127.0.0.1") -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        eps = dict(endpoints)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                parts = self.path.strip("/").split("/")
                ep = eps.get(parts[0]) if len(parts) == 2 and parts[1] == "metrics" else None
                body = ep.exposition(clock.now_us()).encode() if ep else b"not found\n"
                self.send_response(200 if ep else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="gpuledger-sim-inference", daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}/metrics"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
