"""Replay nvidia-smi CSV logs through the agent pipeline (windows -> spool -> gRPC -> collector).

Input: what `nvidia-smi --query-gpu=timestamp,index,uuid,utilization.gpu,memory.used,... --format=csv
[-l N]` writes: with or without `nounits`, several GPUs interleaved, columns in any order, the
header repeated or not, any logging interval. A log written with `noheader` is read with the
column names given separately (`--columns`, in `--query-gpu` order). A log that names no GPU (no
`uuid`, `index` or `pci.bus_id` column) is one GPU; `--gpu-uuid` / `--gpu-index` name it. Values
such as `[N/A]` or `[Not Supported]` are missing values, not errors.

Timestamps: nvidia-smi prints the logging host's local time without a zone, so the replay reads
them in the zone it is given (`--timezone`, default UTC) and says which one it assumed. A
timestamp with its own offset (ISO 8601, `+09:00` or `Z`) or a Unix time in seconds (what a
`date +%s` prefix writes) needs no zone. A log that runs ahead of this machine's clock was read in
the wrong zone: it is refused before anything is sent, with the hint to pass `--timezone`.

The rules (exact; README "Backfilling from logs you already have" states the same):
- each line covers the time since the previous line of the same GPU, whatever the interval;
  a GPU's first line only marks where its log starts;
- its utilization.gpu % of that time is active (NVML's definition: the share of the time a
  kernel ran), spread evenly over the interval;
- a gap longer than three logging intervals (the median spacing of that GPU's lines), or a line
  without a utilization value, is unmonitored;
- without process data the rest of the interval is idle-held when the line's memory used is at
  least 1024 MiB (the threshold, `--idle-mem-threshold-mib`) or the line is above 0 % (a kernel
  ran, so a process held the GPU), else idle-free;
- the log's end is the end of what is known: no time is expected after its last line, nor
  before its first (the replay's session starts at the first line and stops at the last);
- malformed lines are reported with their line numbers and skipped; the rest is still imported.

Exact for any step: the replay drives the same Agent, Windower, Spool and Shipper as the daemon,
on a SimClock stepped through the log's time. Each poll hands out every line's interval up to
the clock's now and keeps the rest for later polls (the split is exact: utilization is uniform
over the line's interval, and the gap decision was made on the whole interval), so a window is
never closed while part of a line that covers it is still held back, whatever the interval (10 ms
to hours) and the step. Then it waits until the collector has acknowledged every batch.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import re
import shutil
import struct
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from gpuledger.agent.source import GaugeReadings, GpuFacts, Readings, StateSeconds, UtilReadings

log = logging.getLogger(__name__)

MIB = 1 << 20
GAP_INTERVALS = 3  # a gap longer than this many logging intervals is unmonitored
MAX_REPORTED_SKIPS = 50
FUTURE_SLACK_S = 300.0  # the collector's default max_future_s: a log ending later than now + this is refused
DEFAULT_TZ = "UTC"
_TS_FORMATS = ("%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S",
               "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S")
_UNIX_TS = re.compile(r"^(\d{9,11})(?:\.(\d{1,9}))?$")  # 1973..5138 in seconds: a `date +%s` prefix
_AWARE_TS = re.compile(r"(Z|[+-]\d\d:?\d\d)$")
_POWER_COLUMNS = ("power.draw", "power.draw.instant", "power.draw.average")
_GPU_COLUMNS = ("uuid", "pci.bus_id", "index")
_HEADER_MARKERS = ("timestamp", "utilization.gpu")  # a row naming either is a header: no data value is
_QUERY_HINT = "--query-gpu=timestamp,index,uuid,utilization.gpu,memory.used --format=csv"
SINGLE_GPU_KEY = "gpu"


class ReplayError(ValueError):
    """The log cannot be replayed at all (no header, no data, wrong zone): a usage error, not a skipped line."""


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
    tz: str = DEFAULT_TZ
    zoned_lines: int = 0  # lines whose timestamp had no zone of its own, read in `tz`
    single_gpu: bool = False  # the log names no GPU: all lines are one GPU
    columns_from: str = "header"  # "header" (a header line in the log) or "--columns"

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


def zone(name: str) -> ZoneInfo:
    """The zone named by --timezone, or a ReplayError that says what a zone name looks like."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ReplayError(f"--timezone: {name!r} is not a time zone name (e.g. UTC, Europe/Berlin, "
                          "Asia/Tokyo, Etc/GMT-9 for UTC+9)") from e


def _timestamp_us(raw: str, tz: ZoneInfo, after_us: int | None = None) -> tuple[int, bool]:
    """A log timestamp -> (Unix microseconds, whether it was read in `tz`).

    A timestamp without a zone is local time in `tz`; in the hour a clock is set back the same
    wall time comes twice, and the later reading is taken when the earlier one would not follow
    `after_us` (the previous line of the same GPU)."""
    s = raw.strip()
    m = _UNIX_TS.match(s)
    if m:
        return int(m.group(1)) * 1_000_000 + int((m.group(2) or "0")[:6].ljust(6, "0")), False
    if _AWARE_TS.search(s) and ("-" in s[:10]):
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            dt = None
        if dt is not None and dt.tzinfo is not None:
            return _us(dt), False
    for fmt in _TS_FORMATS:
        try:
            dt = datetime.strptime(s, fmt)
        except ValueError:
            continue
        us = _us(dt.replace(tzinfo=tz))
        if after_us is not None and us <= after_us:
            later = _us(dt.replace(tzinfo=tz, fold=1))
            if later > after_us:
                us = later
        return us, True
    raise ValueError(f"timestamp {s!r} is not YYYY/MM/DD HH:MM:SS[.fff]")


def _us(dt: datetime) -> int:
    """Exact microseconds since the epoch (no float rounding)."""
    d = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def _column(name: str) -> str:
    """'utilization.gpu [%]' -> 'utilization.gpu'; 'gpu_uuid' -> 'uuid'."""
    base = name.strip().split(" [", 1)[0].strip().lower()
    return {"gpu_uuid": "uuid", "gpu_name": "name", "gpu_bus_id": "pci.bus_id"}.get(base, base)


def _header(names: Sequence[str], where: str) -> dict[str, int]:
    cols: dict[str, int] = {}
    for i, raw in enumerate(names):
        n = _column(raw)
        if not n:
            raise ReplayError(f"{where}: column {i + 1} has no name")
        if n in cols:
            raise ReplayError(f"{where}: column {n!r} is named twice (columns {cols[n] + 1} and {i + 1})")
        cols[n] = i
    missing = [c for c in ("timestamp", "utilization.gpu") if c not in cols]
    if missing:
        raise ReplayError(f"{where}: no {' and no '.join(missing)} column; log with nvidia-smi {_QUERY_HINT}")
    return cols


def parse_columns(spec: str) -> list[str]:
    """--columns 'timestamp, index, utilization.gpu' -> ['timestamp', 'index', 'utilization.gpu']."""
    names = [c.strip() for c in spec.split(",")]
    if not spec.strip() or any(not n for n in names):
        raise ReplayError(f"--columns: {spec!r} must name every column, comma-separated (e.g. "
                          "timestamp,index,utilization.gpu,memory.used)")
    _header(names, "--columns")
    return names


def _check_uuid(uuid: str) -> None:
    if not uuid or len(uuid) > 128 or any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in uuid):
        raise ReplayError(f"--gpu-uuid: {uuid!r} must be 1 to 128 characters without spaces (e.g. "
                          "GPU-5a3c0e1f-... as nvidia-smi --query-gpu=uuid prints it)")


def parse_log(path: str | Path, tz: str = DEFAULT_TZ, columns: Sequence[str] | None = None,
              gpu_uuid: str = "", gpu_index: int | None = None) -> ParsedLog:
    """Parse a CSV log into per-GPU columns.

    tz: the zone of timestamps that carry none (nvidia-smi prints local time). columns: the
    column names of a log without a header line (`noheader`), in order. gpu_uuid / gpu_index:
    the identity of the log's only GPU (a log without a GPU column, or one that names a single
    GPU by index or bus id only)."""
    zinfo = zone(tz)
    if gpu_uuid:
        _check_uuid(gpu_uuid)
    if gpu_index is not None and not 0 <= gpu_index < 1 << 16:
        raise ReplayError(f"--gpu-index: {gpu_index} is not a GPU index (0, 1, ...)")
    gpus: dict[str, _GpuLog] = {}
    skipped: list[Skipped] = []
    nskipped = 0
    lines = 0
    zoned = 0
    cols: dict[str, int] | None = _header(columns, "--columns") if columns else None
    ncols = len(columns) if columns else 0
    has_memory = bool(cols and "memory.used" in cols)
    single = bool(cols is not None and not (set(_GPU_COLUMNS) & cols.keys()))

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
            if any(_column(c) in _HEADER_MARKERS for c in row):
                cols = _header(row, f"{path}, line {line_no} (header)")
                ncols = len(row)
                has_memory = has_memory or "memory.used" in cols
                single = not (set(_GPU_COLUMNS) & cols.keys())
                continue
            if cols is None:
                raise ReplayError(f"{path}, line {line_no}: data before any header line. A log written with "
                                  "--format=csv,noheader needs --columns naming its columns in --query-gpu order "
                                  "(e.g. --columns timestamp,index,uuid,utilization.gpu,memory.used)")
            lines += 1
            if len(row) != ncols:
                skip(line_no, f"expected {ncols} fields, got {len(row)}")
                continue
            try:
                uuid = row[cols["uuid"]].strip() if "uuid" in cols else ""
                bus = row[cols["pci.bus_id"]].strip() if "pci.bus_id" in cols else ""
                idx_raw = row[cols["index"]].strip() if "index" in cols else ""
                if idx_raw and not idx_raw.isdigit():
                    raise ValueError(f"index: {idx_raw!r} is not a GPU index")
                index = int(idx_raw) if idx_raw else -1
                if uuid.startswith("["):
                    uuid = ""
                key = SINGLE_GPU_KEY if single else uuid or bus or (f"index-{index}" if index >= 0 else "")
                if not key:
                    raise ValueError("no GPU uuid, pci.bus_id or index")
                g = gpus.get(key)
                ts, in_zone = _timestamp_us(row[cols["timestamp"]], zinfo, g.ts[-1] if g and g.ts else None)
                pct = _value(row[cols["utilization.gpu"]], "utilization.gpu")
                if pct == pct and not 0 <= pct <= 100:
                    raise ValueError(f"utilization.gpu {pct:g} is outside 0..100")
                mem = _value(row[cols["memory.used"]], "memory.used") if "memory.used" in cols else float("nan")
                pcol = next((cols[c] for c in _POWER_COLUMNS if c in cols), None)
                power = _value(row[pcol], "power.draw") if pcol is not None else float("nan")
                temp = _value(row[cols["temperature.gpu"]], "temperature.gpu") if "temperature.gpu" in cols else float("nan")
                total = _value(row[cols["memory.total"]], "memory.total") if "memory.total" in cols else float("nan")
            except ValueError as e:
                skip(line_no, str(e))
                continue
            if g is None:
                g = gpus[key] = _GpuLog(key=key, uuid=uuid, index=index if index >= 0 else len(gpus))
                g.name = row[cols["name"]].strip() if "name" in cols else ""
            if g.ts and ts <= g.ts[-1]:
                skip(line_no, f"timestamp not after line {g.last_line} of the same GPU")
                continue
            zoned += in_zone
            g.ts.append(ts)
            g.pct.append(pct)
            g.mem_mib.append(mem)
            g.power_w.append(power)
            g.temp_c.append(temp)
            g.last_line = line_no
            if total == total:
                g.mem_total_mib = total
    parsed = ParsedLog(list(gpus.values()), lines, skipped, nskipped, has_memory, tz=tz, zoned_lines=zoned,
                       single_gpu=list(gpus) == [SINGLE_GPU_KEY], columns_from="--columns" if columns else "header")
    if gpu_uuid or gpu_index is not None:
        if len(parsed.gpus) > 1:
            raise ReplayError(f"--gpu-uuid / --gpu-index name the one GPU of a log; {path} has "
                              f"{len(parsed.gpus)} GPUs ({', '.join(g.key for g in parsed.gpus[:4])}"
                              f"{', ...' if len(parsed.gpus) > 4 else ''}), named by the log itself")
        for g in parsed.gpus:
            g.uuid = gpu_uuid or g.uuid
            g.index = g.index if gpu_index is None else gpu_index
    return parsed


class ReplaySource:
    """GpuSource over a parsed log: `poll(now)` hands out every line's interval up to `now`.

    A line whose interval reaches past `now` is handed out in part, clipped at `now`; the rest
    follows at later polls. Utilization is uniform over a line's interval, so the parts add up to
    exactly what the whole line says, however the polls fall."""

    def __init__(self, parsed: ParsedLog, host_id: str = "replay", idle_mem_threshold_mib: float = 1024) -> None:
        self.parsed = parsed
        self.threshold_mib = float(idle_mem_threshold_mib)
        self._facts = []
        self.interval_us: list[int] = []
        self.truth: list[StateSeconds] = []
        self._lines: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # t0, t1, pct, held
        self._next: list[int] = []  # per GPU: the first line not yet handed out in full
        self._cut_us: int | None = None  # everything before it has been handed out
        gauge_parts = []
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
            self._lines.append((t0[monitored], t1[monitored], p[monitored].astype(np.float32),
                                held[monitored].astype(np.uint8)))
            self._next.append(0)
            n = ts.size
            gauge_parts.append((np.full(n, pos, np.int32), ts, np.full(n, np.nan),
                                np.frombuffer(g.power_w, np.float64) * 1000.0 if n else np.zeros(0),
                                mem * MIB, np.frombuffer(g.temp_c, np.float64) if n else np.zeros(0)))
        self._gauge = _sorted_cat(gauge_parts, 6, end_col=1)
        self._g = 0
        firsts = [g.ts[0] for g in parsed.gpus if len(g.ts)]
        lasts = [g.ts[-1] for g in parsed.gpus if len(g.ts)]
        self.first_us = min(firsts) if firsts else 0
        self.last_us = max(lasts) if lasts else 0

    def gpus(self) -> list[GpuFacts]:
        return list(self._facts)

    def poll(self, now_us: int) -> Readings:
        cut = self._cut_us
        if cut is not None and now_us <= cut:
            return Readings()
        parts = []
        for pos, (t0, t1, pct, held) in enumerate(self._lines):
            first = self._next[pos]
            done = int(np.searchsorted(t1, now_us, side="right"))  # lines that end by now
            last = done + 1 if done < t1.size and t0[done] < now_us else done  # ... and the one now falls in
            if last <= first:
                continue
            sl = slice(first, last)
            a = t0[sl] if cut is None else np.maximum(t0[sl], cut)
            b = np.minimum(t1[sl], now_us)
            keep = b > a
            parts.append((np.full(int(keep.sum()), pos, np.int32), a[keep], b[keep], pct[sl][keep], held[sl][keep]))
            self._next[pos] = done
        self._cut_us = now_us
        g = self._gauge
        ge = int(np.searchsorted(g[1], now_us, side="right"))
        gs = slice(self._g, ge)
        self._g = max(self._g, ge)
        util = UtilReadings(*(np.concatenate([p[i] for p in parts]) for i in range(5))) if parts else UtilReadings()
        return Readings(util=util, gauges=GaugeReadings(*(c[gs] for c in g)))

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


def dead_letter_reasons(spool_dir: str | Path, offset: int = 0) -> list[tuple[int, int, str]]:
    """(seq, windows, reason) of each batch in the spool's deadletter.log from byte `offset` on
    (records: two little-endian u32 lengths, then JSON metadata and the batch)."""
    path = Path(spool_dir) / "deadletter.log"
    try:
        data = path.read_bytes()[offset:]
    except FileNotFoundError:
        return []
    out, pos = [], 0
    while pos + 8 <= len(data):
        meta_len, payload_len = struct.unpack_from("<II", data, pos)
        end = pos + 8 + meta_len + payload_len
        if end > len(data):
            break
        try:
            meta = json.loads(data[pos + 8:pos + 8 + meta_len])
            out.append((int(meta.get("seq", 0)), int(meta.get("windows", 0)), str(meta.get("reason", ""))))
        except (ValueError, TypeError):
            pass
        pos = end
    return out


def _deadletter_size(spool_dir: Path) -> int:
    try:
        return (spool_dir / "deadletter.log").stat().st_size
    except FileNotFoundError:
        return 0


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def check_not_ahead(parsed: ParsedLog, last_us: int, now_us: int, path: str | Path) -> None:
    """Refuse a log that ends after this machine's clock: its timestamps were read in a zone west
    of the one it was written in, and the collector would refuse every window as future-dated."""
    lead_s = (last_us - now_us) / 1e6
    if lead_s <= FUTURE_SLACK_S:
        return
    hours = math.ceil(lead_s / 3600)
    if not parsed.zoned_lines:
        hint = "its timestamps carry their own offset or are Unix times, so check the clock of the host that wrote it"
    elif parsed.tz == "UTC":
        hint = (f"nvidia-smi prints the logging host's local time and it was read as UTC: pass --timezone with that "
                f"host's zone (e.g. --timezone Asia/Tokyo; Etc/GMT-{hours} is a zone {hours} h ahead of UTC)")
    else:
        hint = (f"nvidia-smi prints the logging host's local time and it was read as {parsed.tz}: pass --timezone "
                f"with that host's zone, at least {hours} h ahead of {parsed.tz}")
    raise ReplayError(f"{path}: the log runs to {_iso(last_us)}, {lead_s / 3600:.1f} h ahead of this machine's clock "
                      f"({_iso(now_us)}); the collector would refuse it as future-dated. {hint}")


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
    tz: str = DEFAULT_TZ
    zoned_lines: int = 0
    single_gpu: bool = False
    columns_from: str = "header"
    collector: str = ""
    rejections: list[tuple[int, int, str]] = field(default_factory=list)  # (seq, windows, the collector's reason)
    unreachable: bool = False  # no batch was answered and the channel never connected

    def render(self) -> str:
        def h(s: float) -> str:
            return f"{s / 3600:.4f} h ({s:.1f} s)"

        out = [f"replayed {self.file} as host {self.host_id}: {_iso(self.first_ms * 1000)} .. "
               f"{_iso(self.last_ms * 1000)}"]
        if self.zoned_lines:
            out.append(f"  time zone: timestamps read as local time in {self.tz}; nvidia-smi prints the logging host's "
                       f"local time, so if that host was not on {self.tz} pass its zone with --timezone "
                       "(e.g. --timezone Europe/Berlin)")
        else:
            out.append("  time zone: every timestamp carries its own offset or is a Unix time; --timezone is not used")
        out.append(f"  lines: {self.lines} data lines, {self.imported} imported, {self.skipped} skipped"
                   + (" (columns from --columns)" if self.columns_from == "--columns" else ""))
        for s in self.skipped_lines:
            out.append(f"    line {s.line_no}: {s.reason}")
        if self.skipped > len(self.skipped_lines):
            out.append(f"    ... and {self.skipped - len(self.skipped_lines)} more")
        if self.single_gpu:
            out.append("  one GPU: the log has no uuid, index or pci.bus_id column, so every line is the same GPU "
                       "(--gpu-uuid / --gpu-index name it)")
        for g in self.gpus:
            out.append(f"  GPU {g['index']} {g['uuid']} ({g['name']}): {g['lines']} lines every "
                       f"{g['interval_s']:g} s")
        st = self.states
        out += [f"  active       {h(st.active_s)}", f"  idle held    {h(st.idle_held_s)}",
                f"  idle free    {h(st.idle_free_s)}", f"  unmonitored  {h(st.unmonitored_s)}",
                f"  shipped: {self.windows} windows in {self.batches} batches; acknowledged {self.acked_batches} "
                f"batches ({self.acked_windows} windows)"]
        if self.rejected_batches:
            reasons: dict[str, int] = {}
            for _, _, r in self.rejections:
                reasons[r] = reasons.get(r, 0) + 1
            out.append(f"  REJECTED by the collector: {self.rejected_batches} batches (kept in deadletter.log in "
                       f"{self.spool_dir}); the collector said:")
            out += [f"    {r or '(no reason given)'}" + (f" ({n} batches)" if n > 1 else "") for r, n in reasons.items()]
            if not reasons:
                out.append(f"    {self.last_error or '(no reason recorded)'}")
        if self.pending_batches:
            if self.unreachable:
                why = f"the collector at {self.collector} was unreachable ({self.last_error or 'no connection'})"
            else:
                why = f"the collector did not acknowledge them in time ({self.last_error or 'no answer'})"
            out.append(f"  NOT COMPLETE: {self.pending_batches} batches still unacknowledged in {self.spool_dir}: "
                       f"{why}; rerun with --spool-dir {self.spool_dir} to resume")
        elif not self.complete:
            out.append("  NOT COMPLETE: the batches above were refused; nothing else is pending")
        return "\n".join(out)


def replay(path: str | Path, cfg, *, spool_dir: str | Path | None = None, tz: str = DEFAULT_TZ,
           step_s: float = 3600.0, drain_timeout_s: float = 300.0, token: str | None = None,
           channel_credentials=None, columns: Sequence[str] | None = None, gpu_uuid: str = "",
           gpu_index: int | None = None, wall_clock=None) -> ReplaySummary:
    """Replay one log through Agent -> Spool -> Shipper to cfg.collector; wait for every acknowledgement.

    wall_clock: this machine's clock (a Clock; default the wall clock), to refuse a log that runs
    ahead of it before anything is sent."""
    from gpuledger.agent.runtime import Agent
    from gpuledger.agent.shipper import Shipper
    from gpuledger.agent.spool import Spool
    from gpuledger.clock import SimClock, WallClock

    if step_s <= 0:
        raise ReplayError(f"step_s: {step_s} must be positive")
    parsed = parse_log(path, tz, columns=columns, gpu_uuid=gpu_uuid, gpu_index=gpu_index)
    if not any(len(g.ts) for g in parsed.gpus):
        raise ReplayError(f"{path}: no data lines could be imported ({parsed.skipped_count} skipped)")
    source = ReplaySource(parsed, cfg.host_id, cfg.idle_mem_threshold_mib)
    start, end = source.first_us, source.last_us
    check_not_ahead(parsed, end, (wall_clock or WallClock()).now_us(), path)
    own_spool = spool_dir is None
    sdir = Path(tempfile.mkdtemp(prefix="gpuledger-replay-")) if own_spool else Path(spool_dir)
    clock = SimClock(start)
    spool = Spool(sdir, max_bytes=cfg.spool_max_bytes, fsync=False)
    dead_before = _deadletter_size(sdir)
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
        agent.close()  # the clock is at the last line: the session stops there
        drained = shipper.drain(drain_timeout_s)
        stats = shipper.stats
    finally:
        if shipper is not None:
            shipper.close()
        spool.close()
    rejections = dead_letter_reasons(sdir, dead_before)
    answered = stats.acked or stats.rejected or stats.retried
    summary = ReplaySummary(
        file=str(path), host_id=cfg.host_id, lines=parsed.lines, imported=parsed.imported,
        skipped=parsed.skipped_count, skipped_lines=list(parsed.skipped),
        gpus=[{"uuid": f.uuid, "index": f.index, "name": f.name, "lines": len(g.ts),
               "interval_s": source.interval_us[i] / 1e6} for i, (f, g) in enumerate(zip(source.gpus(), parsed.gpus,
                                                                                          strict=True))],
        first_ms=start // 1000, last_ms=end // 1000, states=source.total_truth(), windows=agent.windows_sampled,
        batches=agent.batches_spooled, acked_batches=stats.acked, acked_windows=stats.acked_windows,
        rejected_batches=stats.rejected, pending_batches=spool.pending_count(),
        complete=drained and stats.rejected == 0, spool_dir=str(sdir), last_error=stats.last_error, tz=parsed.tz,
        zoned_lines=parsed.zoned_lines, single_gpu=parsed.single_gpu, columns_from=parsed.columns_from,
        collector=cfg.collector, rejections=rejections,
        unreachable=not answered and "UNAVAILABLE" in stats.last_error)
    if own_spool and summary.complete:
        shutil.rmtree(sdir, ignore_errors=True)
    return summary
