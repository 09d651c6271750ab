"""Replay nvidia-smi CSV logs through the agent pipeline (windows -> spool -> gRPC -> collector).

Input: what `nvidia-smi --query-gpu=timestamp,index,uuid,utilization.gpu,memory.used,... --format=csv
[-l N]` writes, with or without `nounits`, several GPUs interleaved, any interval. Values such as
`[N/A]` or `[Not Supported]` are missing values, not errors.

Semantics (exact):
- each line covers the interval since the previous line of the same GPU (a GPU's first line
  only marks where its log starts);
- a gap longer than three logging intervals (the median spacing of that GPU's lines) is
  unmonitored: no utilization reading is emitted for it; so is an interval whose line has no
  utilization value;
- the log has no process data, so the line decides the idle state: a GPU at 0 % is idle-held
  when its memory.used is at least the threshold (default 1024 MiB), else idle-free. A line above
  0 % ran kernels, so some process held the GPU: its idle remainder is idle-held;
- a malformed line is reported with its line number and skipped; the rest is still imported.

The replay drives the same Agent, Windower, Spool and Shipper as the daemon, on a SimClock set to
the log's timestamps, then waits until the collector has acknowledged every batch.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import shutil
import tempfile
from array import array
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np

from gpuledger.agent.source import GaugeReadings, GpuFacts, Readings, StateSeconds, UtilReadings

log = logging.getLogger(__name__)

MIB = 1 << 20
GAP_INTERVALS = 3  # a gap longer than this many logging intervals is unmonitored
MAX_REPORTED_SKIPS = 50
_TS_FORMATS = ("%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S",
               "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S")
_POWER_COLUMNS = ("power.draw", "power.draw.instant", "power.draw.average")


class ReplayError(ValueError):
    """The log cannot be replayed at all (no header, no data): a usage error, not a skipped line."""


@dataclass
class Skipped:
    line_no: int
    reason: str


@dataclass
class _GpuLog:
    key: str
    uuid: str
    index: int
    name: str = ""
    mem_total_mib: float = float("nan")
    last_line: int = 0
    ts: array = field(default_factory=lambda: array("q"))
    pct: array = field(default_factory=lambda: array("d"))
    mem_mib: array = field(default_factory=lambda: array("d"))
    power_w: array = field(default_factory=lambda: array("d"))
    temp_c: array = field(default_factory=lambda: array("d"))


@dataclass
class ParsedLog:
    gpus: list[_GpuLog]
    lines: int  # data lines seen (headers and blank lines excluded)
    skipped: list[Skipped]
    skipped_count: int
    has_memory: bool

    @property
    def imported(self) -> int:
        return self.lines - self.skipped_count


def _value(raw: str, column: str) -> float:
    """'45 %', '1234 MiB', '52.11 W', '31', '[N/A]' -> float (NaN for a bracketed missing value)."""
    s = raw.strip()
    if not s or (s.startswith("[") and s.endswith("]")) or s in ("N/A", "Not Supported"):
        return float("nan")
    try:
        v = float(s.split()[0])
    except ValueError:
        v = float("nan")
    if not math.isfinite(v):
        raise ValueError(f"{column}: {raw.strip()!r} is not a number")
    return v


def _timestamp_us(raw: str, tz: ZoneInfo) -> int:
    s = raw.strip()
    for fmt in _TS_FORMATS:
        try:
            dt = datetime.strptime(s, fmt)
        except ValueError:
            continue
        return int(round(dt.replace(tzinfo=tz).timestamp() * 1e6))
    raise ValueError(f"timestamp {s!r} is not YYYY/MM/DD HH:MM:SS[.fff]")


def _column(name: str) -> str:
    """'utilization.gpu [%]' -> 'utilization.gpu'; 'gpu_uuid' -> 'uuid'."""
    base = name.strip().split(" [", 1)[0].strip().lower()
    return {"gpu_uuid": "uuid", "gpu_name": "name", "gpu_bus_id": "pci.bus_id"}.get(base, base)


def parse_log(path: str | Path, tz: str = "UTC") -> ParsedLog:
    """Parse a CSV log into per-GPU columns. nvidia-smi prints local time: `tz` names its zone."""
    zone = ZoneInfo(tz)
    gpus: dict[str, _GpuLog] = {}
    skipped: list[Skipped] = []
    nskipped = 0
    lines = 0
    cols: dict[str, int] | None = None
    ncols = 0
    has_memory = False

    def skip(line_no: int, reason: str) -> None:
        nonlocal nskipped
        nskipped += 1
        if len(skipped) < MAX_REPORTED_SKIPS:
            skipped.append(Skipped(line_no, reason))
        log.warning("line %d skipped: %s", line_no, reason)

    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        for line_no, row in enumerate(csv.reader(fh, skipinitialspace=True), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if row[0].strip().lower().startswith("timestamp"):
                names = [_column(c) for c in row]
                cols = {n: i for i, n in enumerate(names)}
                ncols = len(names)
                if "utilization.gpu" not in cols:
                    raise ReplayError(f"line {line_no}: header has no utilization.gpu column; log with "
                                      "--query-gpu=timestamp,index,uuid,utilization.gpu,memory.used --format=csv")
                if not ({"uuid", "index", "pci.bus_id"} & cols.keys()):
                    raise ReplayError(f"line {line_no}: header names no GPU (uuid, index or pci.bus_id)")
                has_memory = has_memory or "memory.used" in cols
                continue
            if cols is None:
                raise ReplayError(f"line {line_no}: data before a header line; the log must come from "
                                  "nvidia-smi --format=csv (without noheader)")
            lines += 1
            if len(row) != ncols:
                skip(line_no, f"expected {ncols} fields, got {len(row)}")
                continue
            try:
                ts = _timestamp_us(row[cols["timestamp"]], zone)
                pct = _value(row[cols["utilization.gpu"]], "utilization.gpu")
                if pct == pct and not 0 <= pct <= 100:
                    raise ValueError(f"utilization.gpu {pct} is outside 0..100")
                mem = _value(row[cols["memory.used"]], "memory.used") if "memory.used" in cols else float("nan")
                pcol = next((cols[c] for c in _POWER_COLUMNS if c in cols), None)
                power = _value(row[pcol], "power.draw") if pcol is not None else float("nan")
                temp = _value(row[cols["temperature.gpu"]], "temperature.gpu") if "temperature.gpu" in cols else float("nan")
                total = _value(row[cols["memory.total"]], "memory.total") if "memory.total" in cols else float("nan")
                uuid = row[cols["uuid"]].strip() if "uuid" in cols else ""
                bus = row[cols["pci.bus_id"]].strip() if "pci.bus_id" in cols else ""
                idx_raw = row[cols["index"]].strip() if "index" in cols else ""
                if idx_raw and not idx_raw.isdigit():
                    raise ValueError(f"index: {idx_raw!r} is not a GPU index")
                index = int(idx_raw) if idx_raw else -1
            except ValueError as e:
                skip(line_no, str(e))
                continue
            if uuid.startswith("["):
                uuid = ""
            key = uuid or bus or (f"index-{index}" if index >= 0 else "")
            if not key:
                skip(line_no, "no GPU uuid, pci.bus_id or index")
                continue
            g = gpus.get(key)
            if g is None:
                g = gpus[key] = _GpuLog(key=key, uuid=uuid, index=index if index >= 0 else len(gpus))
                g.name = row[cols["name"]].strip() if "name" in cols else ""
            if g.ts and ts <= g.ts[-1]:
                skip(line_no, f"timestamp not after line {g.last_line} of the same GPU")
                continue
            g.ts.append(ts)
            g.pct.append(pct)
            g.mem_mib.append(mem)
            g.power_w.append(power)
            g.temp_c.append(temp)
            g.last_line = line_no
            if total == total:
                g.mem_total_mib = total
    return ParsedLog(list(gpus.values()), lines, skipped, nskipped, has_memory)


class ReplaySource:
    """GpuSource over a parsed log: `poll(now)` hands out the intervals that ended by `now`."""

    def __init__(self, parsed: ParsedLog, host_id: str = "replay", idle_mem_threshold_mib: float = 1024) -> None:
        self.parsed = parsed
        self.threshold_mib = float(idle_mem_threshold_mib)
        self._facts = []
        self.interval_us: list[int] = []
        self.truth: list[StateSeconds] = []
        util_parts, gauge_parts = [], []
        for pos, g in enumerate(parsed.gpus):
            uuid = g.uuid or f"GPU-replay-{host_id}-{g.key}"[:128]
            mem_total = int(g.mem_total_mib * MIB) if g.mem_total_mib == g.mem_total_mib else 0
            self._facts.append(GpuFacts(uuid=uuid, index=g.index, name=g.name or "unknown (replayed)",
                                        mem_total_bytes=mem_total, util_method="replay"))
            ts = np.frombuffer(g.ts, np.int64) if len(g.ts) else np.zeros(0, np.int64)
            pct = np.frombuffer(g.pct, np.float64) if len(g.pct) else np.zeros(0)
            mem = np.frombuffer(g.mem_mib, np.float64) if len(g.mem_mib) else np.zeros(0)
            d = np.diff(ts)
            interval = int(np.median(d)) if d.size else 0
            self.interval_us.append(interval)
            t0, t1, p, m = ts[:-1], ts[1:], pct[1:], mem[1:]
            monitored = (d <= GAP_INTERVALS * interval) & ~np.isnan(p)
            with np.errstate(invalid="ignore"):
                held = (p > 0) | (~np.isnan(m) & (m >= self.threshold_mib))
            truth = StateSeconds()
            dur = d / 1e6
            busy = np.where(monitored, dur * np.nan_to_num(p) / 100.0, 0.0)
            truth.active_s = float(busy.sum())
            truth.idle_held_s = float((dur - busy)[monitored & held].sum())
            truth.idle_free_s = float((dur - busy)[monitored & ~held].sum())
            truth.unmonitored_s = float(dur[~monitored].sum())
            self.truth.append(truth)
            k = int(monitored.sum())
            util_parts.append((np.full(k, pos, np.int32), t0[monitored], t1[monitored],
                               p[monitored].astype(np.float32), held[monitored].astype(np.uint8)))
            n = ts.size
            gauge_parts.append((np.full(n, pos, np.int32), ts, np.full(n, np.nan),
                                np.frombuffer(g.power_w, np.float64) * 1000.0 if n else np.zeros(0),
                                mem * MIB, np.frombuffer(g.temp_c, np.float64) if n else np.zeros(0)))
        self._util = _sorted_cat(util_parts, 5, end_col=2)
        self._gauge = _sorted_cat(gauge_parts, 6, end_col=1)
        self._u = 0
        self._g = 0
        firsts = [g.ts[0] for g in parsed.gpus if len(g.ts)]
        lasts = [g.ts[-1] for g in parsed.gpus if len(g.ts)]
        self.first_us = min(firsts) if firsts else 0
        self.last_us = max(lasts) if lasts else 0

    def gpus(self) -> list[GpuFacts]:
        return list(self._facts)

    def poll(self, now_us: int) -> Readings:
        u, g = self._util, self._gauge
        ue = int(np.searchsorted(u[2], now_us, side="right"))
        ge = int(np.searchsorted(g[1], now_us, side="right"))
        us, gs = slice(self._u, ue), slice(self._g, ge)
        self._u, self._g = max(self._u, ue), max(self._g, ge)
        return Readings(util=UtilReadings(*(c[us] for c in u)), gauges=GaugeReadings(*(c[gs] for c in g)))

    def close(self) -> None:
        pass

    def total_truth(self) -> StateSeconds:
        t = StateSeconds()
        for x in self.truth:
            t.add(x)
        return t


def _sorted_cat(parts, n: int, end_col: int):
    if not parts:
        return tuple(np.zeros(0) for _ in range(n))
    cols = [np.concatenate([p[i] for p in parts]) for i in range(n)]
    order = np.argsort(cols[end_col], kind="stable")
    return tuple(c[order] for c in cols)


# ----------------------------------------------------------------------------- the replay run


@dataclass
class ReplaySummary:
    file: str
    host_id: str
    lines: int
    imported: int
    skipped: int
    skipped_lines: list[Skipped]
    gpus: list[dict]
    first_ms: int
    last_ms: int
    states: StateSeconds
    windows: int = 0
    batches: int = 0
    acked_batches: int = 0
    acked_windows: int = 0
    rejected_batches: int = 0
    pending_batches: int = 0
    complete: bool = False
    spool_dir: str = ""
    last_error: str = ""

    def render(self) -> str:
        def h(s: float) -> str:
            return f"{s / 3600:.4f} h ({s:.1f} s)"

        first = datetime.fromtimestamp(self.first_ms / 1000, ZoneInfo("UTC")).isoformat(timespec="seconds")
        last = datetime.fromtimestamp(self.last_ms / 1000, ZoneInfo("UTC")).isoformat(timespec="seconds")
        out = [f"replayed {self.file} as host {self.host_id}: {first} .. {last}",
               f"  lines: {self.lines} data lines, {self.imported} imported, {self.skipped} skipped"]
        for s in self.skipped_lines:
            out.append(f"    line {s.line_no}: {s.reason}")
        if self.skipped > len(self.skipped_lines):
            out.append(f"    ... and {self.skipped - len(self.skipped_lines)} more")
        for g in self.gpus:
            out.append(f"  GPU {g['index']} {g['uuid']} ({g['name']}): {g['lines']} lines every "
                       f"{g['interval_s']:g} s")
        st = self.states
        out += [f"  active       {h(st.active_s)}", f"  idle held    {h(st.idle_held_s)}",
                f"  idle free    {h(st.idle_free_s)}", f"  unmonitored  {h(st.unmonitored_s)}",
                f"  shipped: {self.windows} windows in {self.batches} batches; acknowledged {self.acked_batches} "
                f"batches ({self.acked_windows} windows)"]
        if self.rejected_batches:
            out.append(f"  REJECTED by the collector: {self.rejected_batches} batches (see deadletter.log in "
                       f"{self.spool_dir}): {self.last_error}")
        if not self.complete:
            out.append(f"  NOT COMPLETE: {self.pending_batches} batches still unacknowledged in {self.spool_dir}"
                       f" ({self.last_error or 'collector unreachable?'}); rerun with --spool-dir to resume")
        return "\n".join(out)


def replay(path: str | Path, cfg, *, spool_dir: str | Path | None = None, tz: str = "UTC",
           step_s: float = 3600.0, drain_timeout_s: float = 300.0, token: str | None = None,
           channel_credentials=None) -> ReplaySummary:
    """Replay one log through Agent -> Spool -> Shipper to cfg.collector; wait for every acknowledgement."""
    from gpuledger.agent.runtime import Agent
    from gpuledger.agent.shipper import Shipper
    from gpuledger.agent.spool import Spool
    from gpuledger.clock import SimClock

    parsed = parse_log(path, tz)
    if not any(len(g.ts) for g in parsed.gpus):
        raise ReplayError(f"{path}: no data lines could be imported ({parsed.skipped_count} skipped)")
    source = ReplaySource(parsed, cfg.host_id, cfg.idle_mem_threshold_mib)
    own_spool = spool_dir is None
    sdir = Path(tempfile.mkdtemp(prefix="gpuledger-replay-")) if own_spool else Path(spool_dir)
    start, end = source.first_us, source.last_us
    clock = SimClock(start)
    spool = Spool(sdir, max_bytes=cfg.spool_max_bytes, fsync=False)
    shipper = None
    try:
        # one batch per step of log time
        agent = Agent(dataclasses.replace(cfg, flush_s=step_s, kernels="numba"), source, clock, spool, start_us=start)
        shipper = Shipper(cfg.collector, spool, token=token, channel_credentials=channel_credentials,
                          max_inflight=cfg.max_inflight, ack_timeout_s=cfg.send_timeout_s,
                          backoff_initial_s=cfg.backoff_initial_s,
                          backoff_max_s=min(cfg.backoff_max_s, 5.0)).start()
        while clock.now_us() < end:
            clock.advance(min(step_s, (end - clock.now_us()) / 1e6))
            agent.step()
        agent.close()
        complete = shipper.drain(drain_timeout_s)
        stats = shipper.stats
    finally:
        if shipper is not None:
            shipper.close()
        spool.close()
    summary = ReplaySummary(
        file=str(path), host_id=cfg.host_id, lines=parsed.lines, imported=parsed.imported,
        skipped=parsed.skipped_count, skipped_lines=list(parsed.skipped),
        gpus=[{"uuid": f.uuid, "index": f.index, "name": f.name, "lines": len(g.ts),
               "interval_s": source.interval_us[i] / 1e6} for i, (f, g) in enumerate(zip(source.gpus(), parsed.gpus,
                                                                                          strict=True))],
        first_ms=start // 1000, last_ms=end // 1000, states=source.total_truth(), windows=agent.windows_sampled,
        batches=agent.batches_spooled, acked_batches=stats.acked, acked_windows=stats.acked_windows,
        rejected_batches=stats.rejected, pending_batches=spool.pending_count(),
        complete=complete and stats.rejected == 0, spool_dir=str(sdir), last_error=stats.last_error)
    if own_spool and summary.complete:
        shutil.rmtree(sdir, ignore_errors=True)
    return summary
