"""Hourly rollups, sealed from deduplicated data, so month reports never read every 10 s window.

Why a sealing job and not materialized views: a view sees every inserted block, and the same window
is inserted more than once (a resend after a lost acknowledgement, a replayed spool, a replay run
twice). The raw tables count it once only when read with FINAL, so a view into a Summing or
Aggregating table would count it twice. The sealer instead rebuilds a host-hour's rollup rows from
the raw tables read with FINAL, and a rebuild replaces the previous rows (ReplacingMergeTree on the
sealing pass's version), so resends, replays and late windows stay exactly-once.

Three rollups: gpu_hours (states, energy, power per GPU-hour), alloc_hours (attributed time per process
and GPU-hour) and endpoint_use (per endpoint, host and window: what its processes held, kept per window
because scale-to-zero replays and request counts are per window; endpoints.py and baseline.py read it).

Which host-hours are current is kept in two small tables:
- rollup_marks: every group commit writes, once its windows are stored, a mark for each host-hour
  they touch (the collector's clock in µs, strictly increasing);
- rollup_built: after rebuilding a host-hour, the sealer records the newest mark it saw for it.
A host-hour is current when its newest mark is not newer than its built mark. A commit whose windows
land while the sealer reads writes its mark after them, so the host-hour shows as stale again and
reports read it raw until the next pass; a commit that fails before its mark is not acknowledged, and
the agent's resend writes it. Reports read rollups only for current host-hours and whole hours, and
the raw windows for the rest (allocation.py).

The sealer rolls a host-hour up once nothing landed in it for `settle_s`, so a live hour is rebuilt
once, not every flush.
"""

from __future__ import annotations

import logging
import threading
from itertools import groupby

import pyarrow as pa

from gpuledger.clock import Clock
from gpuledger.collector.store import Store, StoreError

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000


def pending(store: Store, before_us: int, host_filter: str = "") -> list[tuple[str, int, int]]:
    """(host, hour, newest mark) of host-hours to roll up: marked since their last build, before `before_us`."""
    db = store.db
    host = "WHERE host_id = {host:String}" if host_filter else ""
    rows = store.query_rows(
        f"""SELECT m.host_id, m.hour_ms, m.m FROM
              (SELECT host_id, hour_ms, max(mark_us) AS m FROM {db}.rollup_marks {host} GROUP BY host_id, hour_ms) AS m
            LEFT JOIN
              (SELECT host_id, hour_ms, max(built_us) AS b FROM {db}.rollup_built {host} GROUP BY host_id, hour_ms) AS b
            ON m.host_id = b.host_id AND m.hour_ms = b.hour_ms
            WHERE m.m > b.b AND m.m < {{before:Int64}}
            ORDER BY m.hour_ms, m.host_id""", {"before": before_us, "host": host_filter})
    return [(r[0], int(r[1]), int(r[2])) for r in rows]


GPU_HOURS_SELECT = """
    SELECT host_id, intDiv(window_start_ms, {hour}) * {hour} AS hour_ms, gpu_uuid,
           sum(busy_ms), sum(idle_held_ms), sum(idle_free_ms), sum(unmonitored_ms), sum(window_ms), count(),
           sum(energy_mj), sum(toUInt64(power_mean_mw) * covered_ms), max(power_max_mw), max(mem_used_max_bytes),
           max(temp_max_c), sum(gpm_covered_ms), sum(sm_active_ms), sum(tensor_active_ms), sum(dram_active_ms),
           {{version:Int64}}
    FROM {db}.gpu_windows FINAL
    WHERE host_id IN {{hosts:Array(String)}} AND window_start_ms >= {{lo:Int64}} AND window_start_ms < {{hi:Int64}}
      AND (host_id, intDiv(window_start_ms, {hour}) * {hour}) IN (SELECT arrayJoin({{pairs:Array(Tuple(String, Int64))}}))
    GROUP BY host_id, hour_ms, gpu_uuid"""

ALLOC_HOURS_SELECT = """
    SELECT host_id, intDiv(window_start_ms, {hour}) * {hour} AS hour_ms, gpu_uuid, pid, proc_start_ms,
           sum(active_attr_us), sum(held_attr_us), sum(busy_ms), sum(held_ms), {{version:Int64}}
    FROM {db}.proc_windows FINAL
    WHERE host_id IN {{hosts:Array(String)}} AND window_start_ms >= {{lo:Int64}} AND window_start_ms < {{hi:Int64}}
      AND (host_id, intDiv(window_start_ms, {hour}) * {hour}) IN (SELECT arrayJoin({{pairs:Array(Tuple(String, Int64))}}))
    GROUP BY host_id, hour_ms, gpu_uuid, pid, proc_start_ms"""

# a process window serves when it was active at least this share of its attributed time (baseline.py's
# question 5); endpoint_use keeps the time of the windows that pass it at this default
SERVING_MIN_ACTIVE = 0.05

# the processes tagged with an endpoint on the chunk's hosts, and their windows summed per host and window
ENDPOINT_PROCS = """(SELECT host_id, pid, start_ms, any(tags['endpoint']) AS endpoint FROM {db}.processes
                     WHERE tags['endpoint'] != ''{where} GROUP BY host_id, pid, start_ms)"""

ENDPOINT_USE_SELECT = """
    SELECT w.host_id, intDiv(w.window_start_ms, {hour}) * {hour} AS hour_ms, p.endpoint, w.window_start_ms,
           sum(w.held_ms), sum(w.busy_ms), sum(w.t), sum(w.active_attr_us),
           sumIf(w.t, w.active_attr_us >= {{thr:Float64}} * w.t), {{version:Int64}}
    FROM (SELECT host_id, window_start_ms, pid, proc_start_ms, held_ms, busy_ms, active_attr_us,
                 toUInt64(active_attr_us) + held_attr_us AS t
          FROM {db}.proc_windows FINAL
          WHERE host_id IN {{hosts:Array(String)}} AND window_start_ms >= {{lo:Int64}} AND window_start_ms < {{hi:Int64}}
            AND (host_id, intDiv(window_start_ms, {hour}) * {hour}) IN (SELECT arrayJoin({{pairs:Array(Tuple(String, Int64))}}))
            AND (host_id, pid, proc_start_ms) IN (SELECT host_id, pid, start_ms FROM {db}.processes
                                                  WHERE tags['endpoint'] != '' AND host_id IN {{hosts:Array(String)}})) AS w
    INNER JOIN {procs} AS p ON w.host_id = p.host_id AND w.pid = p.pid AND w.proc_start_ms = p.start_ms
    GROUP BY w.host_id, hour_ms, p.endpoint, w.window_start_ms"""


def seal(store: Store, now_us: int, settle_us: int, chunk_hours: int = 24, host_filter: str = "") -> int:
    """One sealing pass: roll up every pending host-hour; returns how many were rolled up."""
    todo = pending(store, now_us - settle_us, host_filter)
    db = store.db
    done = 0
    # hours close together are rebuilt by one statement (the raw tables are read once per chunk)
    chunks: list[list[tuple[str, int, int]]] = []
    for _, group in groupby(todo, key=lambda r: r[1] // (chunk_hours * HOUR_MS)):
        chunks.append(list(group))
    for chunk in chunks:
        lo = min(h for _, h, _ in chunk)
        hi = max(h for _, h, _ in chunk) + HOUR_MS
        params = {"hosts": sorted({h for h, _, _ in chunk}), "lo": lo, "hi": hi,
                  "pairs": [(h, hr) for h, hr, _ in chunk], "version": now_us}
        settings = {**store.report_settings(), "do_not_merge_across_partitions_select_final": 1}
        if store.opt.cluster:
            settings["insert_distributed_sync"] = 1
        store.command(f"INSERT INTO {db}.gpu_hours " + GPU_HOURS_SELECT.format(db=db, hour=HOUR_MS), params, settings)
        store.command(f"INSERT INTO {db}.alloc_hours " + ALLOC_HOURS_SELECT.format(db=db, hour=HOUR_MS), params,
                      settings)
        store.command(f"INSERT INTO {db}.endpoint_use " + ENDPOINT_USE_SELECT.format(
            db=db, hour=HOUR_MS, procs=ENDPOINT_PROCS.format(db=db, where=" AND host_id IN {hosts:Array(String)}")),
            {**params, "thr": SERVING_MIN_ACTIVE}, settings)
        store.insert_table("rollup_built", pa.table({
            "host_id": pa.array([h for h, _, _ in chunk], pa.string()),
            "hour_ms": pa.array([hr for _, hr, _ in chunk], pa.int64()),
            "built_us": pa.array([m for _, _, m in chunk], pa.int64())}))
        done += len(chunk)
    return done


class Sealer:
    """Runs `seal` every `interval_s` on a thread of its own; start() and close() are safe to call twice."""

    def __init__(self, store: Store, clock: Clock, interval_s: float = 30.0, settle_s: float = 60.0) -> None:
        self.store = store
        self.clock = clock
        self.interval_s = interval_s
        self.settle_us = int(settle_s * 1e6)
        self.sealed = 0
        self.passes = 0
        self.errors = 0
        self.last_error = ""
        self.after_pass = None  # called after every pass (the collector refreshes its prices table there)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gpuledger-sealer", daemon=True)
            self._thread.start()

    def seal_now(self, settle_s: float | None = None) -> int:
        """One pass now (tests, benchmarks, after a bulk load); settle_s=0 rolls up everything."""
        settle = self.settle_us if settle_s is None else int(settle_s * 1e6)
        with self._lock:
            n = seal(self.store, self.clock.now_us(), settle)
            self.sealed += n
            self.passes += 1
            return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.seal_now()
                if self.after_pass is not None:
                    self.after_pass()
            except StoreError as e:
                self.errors += 1
                self.last_error = str(e)
                log.warning("rollup pass failed (reports read raw windows meanwhile): %s", e)
            except Exception as e:  # the sealer must outlive a bug: reports stay right without it
                self.errors += 1
                self.last_error = str(e)
                log.exception("rollup pass failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
