"""Windower: keeps readings across polls and closes wall-clock-aligned windows.

Windows are [k*W, (k+1)*W) in the agent's wall clock. `close(now)` emits every window that
ended at least `lateness` ago (the driver's sample buffer delivers a period after it ends),
keeping the readings that still reach into open windows. A reading is folded once per window
it overlaps, clipped to the closed range, so no period is lost or counted twice across calls.
A window without readings is emitted too, as unmonitored, never as idle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from gpuledger.agent import kernels
from gpuledger.agent.kernels import BACKENDS
from gpuledger.agent.source import GpuFacts, ProcessIdentity, Readings
from gpuledger.schema import GPU_WINDOW_SCHEMA, HIST_BUCKETS, PROC_WINDOW_SCHEMA


@dataclass
class Closed:
    """Windows closed by one call: Arrow tables in the wire schemas plus the processes they name."""

    gpu: pa.Table
    proc: pa.Table
    processes: list[ProcessIdentity] = field(default_factory=list)
    start_ms: int = 0
    end_ms: int = 0

    @property
    def n_windows(self) -> int:
        return self.gpu.num_rows


class UtilCols(NamedTuple):
    """Utilization readings kept for open windows: each covers [t0_us, t1_us) of one GPU."""

    gpu: np.ndarray
    t0_us: np.ndarray
    t1_us: np.ndarray
    pct: np.ndarray
    held: np.ndarray


class GaugeCols(NamedTuple):
    """Gauge readings, each covering the time since the previous reading of its GPU; energy_mj is the
    counter's difference over that interval (NaN across a reset)."""

    gpu: np.ndarray
    t0_us: np.ndarray
    t1_us: np.ndarray
    energy_mj: np.ndarray
    power_mw: np.ndarray
    mem_used_bytes: np.ndarray
    temp_c: np.ndarray


class GpmCols(NamedTuple):
    gpu: np.ndarray
    t0_us: np.ndarray
    t1_us: np.ndarray
    sm_active_pct: np.ndarray
    sm_occupancy_pct: np.ndarray
    tensor_active_pct: np.ndarray
    dram_active_pct: np.ndarray


class ProcCols(NamedTuple):
    """Process readings; `key` indexes the windower's (GPU, pid, start) keys."""

    key: np.ndarray
    t0_us: np.ndarray
    t1_us: np.ndarray
    pct: np.ndarray
    mem_bytes: np.ndarray


class ProcKey(NamedTuple):
    """A process on one GPU: position in gpus(), and the process identity (pid, start time)."""

    gpu: int
    pid: int
    start_ms: int


class _Buf:
    """Append-only list of column chunks of one kind (a NamedTuple of arrays); compacted on demand."""

    def __init__(self, cols: type) -> None:
        self.parts: list = []
        self.cols = cols

    def add(self, cols) -> None:
        if cols[0].size:
            self.parts.append(cols)

    def take(self):
        if not self.parts:
            return None
        if len(self.parts) == 1:
            return self.parts[0]
        return self.cols(*(np.concatenate([p[i] for p in self.parts]) for i in range(len(self.cols._fields))))

    def keep(self, cols, mask: np.ndarray) -> None:
        self.parts = [] if cols is None or not mask.any() else [self.cols(*(c[mask] for c in cols))]


def _round_u32(x: np.ndarray) -> np.ndarray:
    return np.rint(np.nan_to_num(x, nan=0.0)).astype(np.int64)


class Windower:
    def __init__(self, gpus: list[GpuFacts], window_s: float = 10.0, lateness_s: float = 2.0,
                 start_us: int | None = None, kernels: str = "numba") -> None:
        if kernels not in BACKENDS:
            raise ValueError(f"kernels: {kernels!r} is not one of {BACKENDS}")
        self.reference = kernels == "numpy"  # the numpy implementation: no numba in this process
        self.gpus = list(gpus)
        self.window_us = int(round(window_s * 1e6))
        if self.window_us <= 0 or self.window_us % 1000:
            raise ValueError("window_s must be a positive whole number of milliseconds")
        self.lateness_us = int(round(lateness_s * 1e6))
        self.closed_until_us: int | None = None
        if start_us is not None:
            self.closed_until_us = (int(start_us) // self.window_us) * self.window_us
        self._util = _Buf(UtilCols)
        self._gauge = _Buf(GaugeCols)
        self._gpm = _Buf(GpmCols)
        self._proc = _Buf(ProcCols)
        self._last_gauge: dict[int, tuple[int, float]] = {}
        self._proc_keys: dict[ProcKey, int] = {}
        self._proc_key_list: list[ProcKey] = []
        self._identities: dict[tuple[int, int], ProcessIdentity] = {}
        self.late_readings = 0

    # ------------------------------------------------------------------ input
    def add(self, r: Readings) -> None:
        u = r.util
        self._util.add(UtilCols(u.gpu, u.t0_us, u.t1_us, u.pct, u.held))
        g = r.gauges
        if g.gpu.size:
            # each reading covers the time since the previous reading of the same GPU; the energy
            # counter's difference over that interval is the energy spent in it
            t0 = g.t_us.copy()
            de = np.full(g.gpu.size, np.nan)
            for k in np.unique(g.gpu).tolist():
                idx = np.flatnonzero(g.gpu == k)
                idx = idx[np.argsort(g.t_us[idx], kind="stable")]
                t, e = g.t_us[idx], g.energy_mj[idx]
                prev_t, prev_e = self._last_gauge.get(k, (None, np.nan))
                pt = np.concatenate(([t[0] if prev_t is None else prev_t], t[:-1]))
                pe = np.concatenate(([prev_e], e[:-1]))
                ok_t = pt < t
                t0[idx] = np.where(ok_t, pt, t)
                with np.errstate(invalid="ignore"):
                    d = e - pe
                de[idx] = np.where(ok_t & (d >= 0), d, np.nan)  # a counter reset gives no energy
                self._last_gauge[k] = (int(t[-1]), float(e[-1]))
            self._gauge.add(GaugeCols(g.gpu, t0, g.t_us, de, g.power_mw, g.mem_used_bytes, g.temp_c))
        m = r.gpm
        self._gpm.add(GpmCols(m.gpu, m.t0_us, m.t1_us, m.sm_active_pct, m.sm_occupancy_pct, m.tensor_active_pct,
                              m.dram_active_pct))
        p = r.procs
        if p.gpu.size:
            nref = max(len(r.processes), 1)
            pair, inverse = np.unique(p.gpu.astype(np.int64) * nref + p.proc, return_inverse=True)
            mapped = np.empty(pair.size, np.int32)
            for j, code in enumerate(pair.tolist()):
                gi, ref = divmod(code, nref)
                ident = r.processes[ref]
                pk = ProcKey(gi, ident.pid, ident.start_ms)
                k = self._proc_keys.get(pk)
                if k is None:
                    k = len(self._proc_key_list)
                    self._proc_keys[pk] = k
                    self._proc_key_list.append(pk)
                self._identities[(ident.pid, ident.start_ms)] = ident
                mapped[j] = k
            keys = mapped[inverse.reshape(-1)]
            self._proc.add(ProcCols(keys, p.t0_us, p.t1_us, p.pct, p.mem_bytes))

    # ------------------------------------------------------------------ output
    def close(self, now_us: int, final: bool = False) -> Closed | None:
        """Close every window that ended `lateness` before now (or, if final, that has begun)."""
        W = self.window_us
        edge = now_us if final else now_us - self.lateness_us
        new_closed = (edge // W) * W
        if final and new_closed < now_us:
            new_closed += W
        if self.closed_until_us is None:
            first = self._earliest()
            if first is None:
                return None
            self.closed_until_us = (first // W) * W
        lo = self.closed_until_us
        if new_closed <= lo:
            return None
        n_win = int((new_closed - lo) // W)
        n_gpu = len(self.gpus)
        closed = self._fold(lo, n_win, n_gpu)
        self.closed_until_us = new_closed
        return closed

    def _earliest(self) -> int | None:
        cands = [p.t0_us.min() for buf in (self._util, self._gpm, self._proc) for p in buf.parts]
        cands += [p.t1_us.min() for p in self._gauge.parts]
        return int(min(cands)) if cands else None

    def _fold(self, lo: int, n_win: int, n_gpu: int) -> Closed:
        W = self.window_us
        hi = lo + n_win * W
        win_ms = W // 1000
        util = self._util.take()
        if util is None:
            empty = np.zeros(0)
            util = UtilCols(empty.astype(np.int32), empty.astype(np.int64), empty.astype(np.int64),
                            empty.astype(np.float32), empty.astype(np.uint8))
        self.late_readings += int((util.t1_us <= lo).sum())
        uf = kernels.fold_util(util.gpu, util.t0_us, util.t1_us, util.pct, util.held, lo, W, n_gpu, n_win,
                               reference=self.reference)
        self._util.keep(util, util.t1_us > hi)

        gauge = self._gauge.take()
        if gauge is not None:
            gf = kernels.fold_gauge(gauge.gpu, gauge.t0_us, gauge.t1_us, gauge.energy_mj, gauge.power_mw,
                                    gauge.mem_used_bytes, gauge.temp_c, lo, W, n_gpu, n_win, reference=self.reference)
            self._gauge.keep(gauge, gauge.t1_us > hi)
        else:
            gf = None

        gpm = self._gpm.take()
        gpm_cols = {}
        if gpm is not None:
            zeros = np.zeros(gpm.gpu.size, np.uint8)
            for name, pct in (("sm_active_ms", gpm.sm_active_pct), ("sm_occupancy_ms", gpm.sm_occupancy_pct),
                              ("tensor_active_ms", gpm.tensor_active_pct), ("dram_active_ms", gpm.dram_active_pct)):
                f = kernels.fold_util(gpm.gpu, gpm.t0_us, gpm.t1_us, pct, zeros, lo, W, n_gpu, n_win,
                                      reference=self.reference)
                gpm_cols[name] = f.busy_us
                gpm_cols["gpm_covered_ms"] = f.covered_us
            self._gpm.keep(gpm, gpm.t1_us > hi)

        # cumulative rounding to whole ms: a state with no time gets exactly 0, and the parts
        # add up to the covered time
        covered = np.minimum(_round_u32(uf.covered_us / 1000), win_ms)
        busy = np.minimum(_round_u32(uf.busy_us / 1000), covered)
        busy_held = np.clip(_round_u32((uf.busy_us + uf.held_idle_us) / 1000), busy, covered)
        held = busy_held - busy
        free = covered - busy_held
        unmon = win_ms - covered
        starts_ms = (lo + np.arange(n_win, dtype=np.int64) * W) // 1000
        n = n_gpu * n_win
        hist = uf.hist.reshape(n, HIST_BUCKETS).astype(np.uint16)
        hist_arr = pa.ListArray.from_arrays(np.arange(0, (n + 1) * HIST_BUCKETS, HIST_BUCKETS, dtype=np.int32),
                                            pa.array(hist.reshape(-1), pa.uint16()))

        def u8(x):
            return np.clip(_round_u32(x), 0, 255).astype(np.uint8).reshape(n)

        def gcol(arr, dtype):
            if gf is None:
                return np.zeros(n, dtype)
            return np.clip(_round_u32(arr), 0, np.iinfo(dtype).max).astype(dtype).reshape(n)

        if gf is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                pmean = np.where(gf.power_count > 0, gf.power_sum_mw / np.maximum(gf.power_count, 1), 0)
        cols = {
            "gpu_uuid": pa.array(np.repeat(np.array([g.uuid for g in self.gpus], dtype=object), n_win), pa.string()),
            "window_start_ms": np.tile(starts_ms, n_gpu),
            "window_ms": np.full(n, win_ms, np.uint32),
            "sample_count": uf.sample_count.reshape(n).astype(np.uint32),
            "covered_ms": covered.reshape(n).astype(np.uint32),
            "busy_ms": busy.reshape(n).astype(np.uint32),
            "idle_held_ms": held.reshape(n).astype(np.uint32),
            "idle_free_ms": free.reshape(n).astype(np.uint32),
            "unmonitored_ms": unmon.reshape(n).astype(np.uint32),
            "util_min_pct": u8(uf.util_min),
            "util_max_pct": u8(uf.util_max),
            "util_hist": hist_arr,
            "mem_used_max_bytes": gcol(gf.mem_max if gf else None, np.uint64),
            "power_mean_mw": gcol(pmean if gf else None, np.uint32),
            "power_max_mw": gcol(gf.power_max_mw if gf else None, np.uint32),
            "energy_mj": gcol(gf.energy_mj if gf else None, np.uint64),
            "temp_max_c": gcol(gf.temp_max if gf else None, np.uint8),
        }
        for name in ("gpm_covered_ms", "sm_active_ms", "sm_occupancy_ms", "tensor_active_ms", "dram_active_ms"):
            if name in gpm_cols:
                cols[name] = np.minimum(_round_u32(gpm_cols[name] / 1000), win_ms).reshape(n).astype(np.uint32)
            else:
                cols[name] = np.zeros(n, np.uint32)
        gpu_table = pa.Table.from_pydict(cols, schema=GPU_WINDOW_SCHEMA)

        proc_table, processes = self._fold_procs(lo, n_win, hi)
        return Closed(gpu=gpu_table, proc=proc_table, processes=processes, start_ms=lo // 1000, end_ms=hi // 1000)

    def _fold_procs(self, lo: int, n_win: int, hi: int):
        W = self.window_us
        proc = self._proc.take()
        if proc is None:
            return PROC_WINDOW_SCHEMA.empty_table(), []
        n_keys = len(self._proc_key_list)
        zeros = np.zeros(proc.key.size, np.uint8)
        nan = np.full(proc.key.size, np.nan)
        f = kernels.fold_util(proc.key, proc.t0_us, proc.t1_us, proc.pct, zeros, lo, W, n_keys, n_win,
                              reference=self.reference)
        # process memory folds as a gauge: only its maximum per window is used
        g = kernels.fold_gauge(proc.key, proc.t0_us, proc.t1_us, nan, nan, proc.mem_bytes, nan, lo, W, n_keys, n_win,
                               reference=self.reference)
        self._proc.keep(proc, proc.t1_us > hi)
        held = np.minimum(_round_u32(f.covered_us / 1000), W // 1000)
        busy = np.minimum(_round_u32(f.busy_us / 1000), held)
        kk, ww = np.nonzero(held > 0)
        keys = [self._proc_key_list[k] for k in kk]
        gpu_uuid = [self.gpus[k.gpu].uuid for k in keys]
        table = pa.Table.from_pydict(
            {
                "gpu_uuid": pa.array(gpu_uuid, pa.string()),
                "window_start_ms": ((lo + ww.astype(np.int64) * W) // 1000),
                "pid": np.array([k.pid for k in keys], np.uint32),
                "proc_start_ms": np.array([k.start_ms for k in keys], np.int64),
                "held_ms": held[kk, ww].astype(np.uint32),
                "busy_ms": busy[kk, ww].astype(np.uint32),
                "mem_max_bytes": np.clip(_round_u32(g.mem_max[kk, ww]), 0, None).astype(np.uint64),
            },
            schema=PROC_WINDOW_SCHEMA,
        )
        seen = {(k.pid, k.start_ms) for k in keys}
        processes = [self._identities[s] for s in sorted(seen)]
        self._compact_proc_keys()
        return table, processes

    def _compact_proc_keys(self) -> None:
        """Keep only the process keys that readings reaching into open windows still use, renumbered,
        so that memory and fold sizes follow the live processes, not every process ever seen."""
        kept = self._proc.parts[0] if self._proc.parts else None
        live = np.unique(kept.key) if kept is not None else np.zeros(0, np.int32)
        if live.size == len(self._proc_key_list):
            return
        old = self._proc_key_list
        self._proc_key_list = [old[k] for k in live.tolist()]
        self._proc_keys = {pk: i for i, pk in enumerate(self._proc_key_list)}
        ids = {(pk.pid, pk.start_ms) for pk in self._proc_key_list}
        self._identities = {k: v for k, v in self._identities.items() if k in ids}
        if kept is not None:
            remap = np.full(len(old), -1, np.int32)
            remap[live] = np.arange(live.size, dtype=np.int32)
            self._proc.parts = [kept._replace(key=remap[kept.key])]
