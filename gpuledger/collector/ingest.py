"""Ingest: one raw batch -> authenticated, validated, bounded -> queued for the writer -> an acknowledgement.

Beyond what one batch can tell (validate.py), the ingest checks a batch against what its host
already stored:
- no window of a GPU may overlap a stored window of another length (equal windows are a resend);
- a run's session start and each GPU's declared first window may reach back at most
  `backfill_ms` before the host's earliest window (stored, or in this batch). Both claim time
  that no window backs (it is counted unmonitored and priced), so they are bounded: an earlier
  value is raised to the bound, the batch is stored, and the acknowledgement says so.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from gpuledger.clock import Clock
from gpuledger.collector.store import Store
from gpuledger.collector.validate import Invalid, Limits, TooLarge, Valid, clip, validate, window_grids
from gpuledger.collector.writer import Writer
from gpuledger.v1 import telemetry_pb2 as pb

log = logging.getLogger(__name__)

OK = 0
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


@dataclass
class IngestStats:
    batches: int = 0
    windows: int = 0
    rejected: dict = field(default_factory=dict)  # reason class -> count
    deferred: int = 0
    bounded: int = 0  # batches whose session start or first window was raised to the backfill bound

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


@dataclass
class _HostState:
    earliest_ms: int | None = None  # the host's earliest window, stored or accepted
    spans: dict = field(default_factory=dict)  # (gpu, window_ms) -> [first start, last end] of stored windows
    runs: dict = field(default_factory=dict)  # (gpu, window_ms) -> merged [start, end) runs accepted by this process
    lock: threading.Lock = field(default_factory=threading.Lock)


def _merge_runs(runs: list, starts: np.ndarray, w: int) -> list:
    """Runs (merged [start, end) intervals) with the windows `starts` of length `w` added."""
    if starts.size == 0:
        return runs
    brk = np.flatnonzero(np.diff(starts) != w) + 1
    new = [(int(a[0]), int(a[-1]) + w) for a in np.split(starts, brk)]
    out: list = []
    for a, b in sorted([tuple(r) for r in runs] + new):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _first_overlap(starts: np.ndarray, ends: np.ndarray, intervals: list) -> tuple[int, tuple] | None:
    """The first window [starts[i], ends[i]) that overlaps one of the sorted, disjoint `intervals`."""
    iv_start = np.array([a for a, _ in intervals], np.int64)
    iv_end = np.array([b for _, b in intervals], np.int64)
    j = np.searchsorted(iv_end, starts, side="right")  # first interval ending after each window's start
    ok = j < iv_start.size
    hit = ok & (iv_start[np.minimum(j, iv_start.size - 1)] < ends)
    if not hit.any():
        return None
    i = int(np.flatnonzero(hit)[0])
    k = int(j[i])
    return i, (int(iv_start[k]), int(iv_end[k]))


class Ingest:
    """Turns one raw batch into a future acknowledgement."""

    def __init__(self, writer: Writer, limits: Limits, clock: Clock, max_batch_bytes: int, auth=None,
                 store: Store | None = None, backfill_ms: int = 24 * 3_600_000) -> None:
        self.writer = writer
        self.limits = limits
        self.clock = clock
        self.max_batch_bytes = max_batch_bytes
        self.auth = auth
        self.store = store if store is not None else getattr(writer, "store", None)  # None: no stored state
        self.backfill_ms = backfill_ms
        self.stats = IngestStats()
        self._hosts: dict[str, _HostState] = {}
        self._hosts_lock = threading.Lock()

    def ack(self, seq: int, code: int = OK, message: str = "", retryable: bool = False,
            stored: int = 0) -> pb.Ack:
        return pb.Ack(seq=seq, code=code, message=message, retryable=retryable, stored_windows=stored,
                      max_batch_bytes=self.max_batch_bytes)

    # ------------------------------------------------------------------ host state
    def _host(self, host_id: str) -> _HostState:
        """The host's state, loaded from the store the first time this process sees the host."""
        with self._hosts_lock:
            st = self._hosts.get(host_id)
            if st is not None:
                return st
            st = self._hosts[host_id] = _HostState()
            st.lock.acquire()  # whoever asks next waits until it is loaded
        try:
            rows = [] if self.store is None else self.store.query_rows(
                f"SELECT gpu_uuid, window_ms, min(first_window_ms), max(last_end_ms) FROM {self.store.db}.sessions "
                "WHERE host_id = {h:String} AND gpu_uuid != '' GROUP BY gpu_uuid, window_ms", {"h": host_id})
            for g, w, first, last in rows:
                st.spans[(g, int(w))] = [int(first), int(last)]
            st.earliest_ms = min((int(r[2]) for r in rows), default=None)
        except Exception:
            with self._hosts_lock:  # not loaded: the next batch tries again
                self._hosts.pop(host_id, None)
            raise
        finally:
            st.lock.release()
        return st

    def _check_host(self, v: Valid, now_ms: int) -> None:
        b = v.batch
        st = self._host(b.host.host_id)
        with st.lock:
            if v.gpu.num_rows:
                self._check_overlap(v, st)
            batch_first = min(v.first_window_ms.values()) if v.first_window_ms else None
            evidence = [x for x in (st.earliest_ms, batch_first, b.stopped_ms or None) if x is not None]
            bound = (min(evidence) if evidence else now_ms) - self.backfill_ms
            v.session_start_ms = b.session_start_ms
            if b.session_start_ms and b.session_start_ms < bound:
                v.session_start_ms = bound
                v.warnings.append(f"session_start_ms {b.session_start_ms} is more than {self.backfill_ms // 3_600_000}"
                                  f" h before this host's first window: counted from {bound} instead")
            v.declared_first = {}
            for i, g in enumerate(b.gpus):
                if not g.first_window_ms:
                    continue
                if g.first_window_ms < bound:
                    v.declared_first[g.uuid] = bound
                    v.warnings.append(f"gpus[{i}].first_window_ms {g.first_window_ms} is more than "
                                      f"{self.backfill_ms // 3_600_000} h before this host's first window: "
                                      f"counted from {bound} instead")
                else:
                    v.declared_first[g.uuid] = g.first_window_ms
            if v.warnings:
                self.stats.bounded += 1
            # accepted: later batches are checked against these windows too, stored yet or not
            if batch_first is not None:
                st.earliest_ms = batch_first if st.earliest_ms is None else min(st.earliest_ms, batch_first)
            for key, (starts, w) in window_grids(v).items():
                st.runs[key] = _merge_runs(st.runs.get(key, []), starts, w)

    def _check_overlap(self, v: Valid, st: _HostState) -> None:
        """A window overlapping another window of a different length is refused, naming both. Windows of one
        length sit on one grid and never overlap: only a GPU whose window length changed (an agent restarted
        with another window_s) needs looking at. Windows this process accepted are checked exactly (stored or
        still in the writer's queue); older stored ones where the span of another length meets the batch."""
        host_id = v.batch.host.host_id
        for (g, w), (starts, _) in window_grids(v).items():
            ends = starts + w
            for (g2, w2), runs in st.runs.items():
                if g2 != g or w2 == w or not runs:
                    continue
                hit = _first_overlap(starts, ends, runs)
                if hit is not None:
                    a, (ra, rb) = hit
                    raise Invalid(f"gpu_windows.window_start_ms: window ({int(starts[a])}, {w} ms) of GPU {clip(g)} "
                                  f"overlaps windows of {w2} ms already accepted ({ra}..{rb})")
            for (g2, w2), (first, last) in list(st.spans.items()):
                if g2 != g or w2 == w or ends[-1] <= first or starts[0] >= last or self.store is None:
                    continue
                rows = self.store.query_rows(
                    f"SELECT window_start_ms, window_ms FROM {self.store.db}.gpu_windows "
                    "WHERE host_id = {h:String} AND gpu_uuid = {g:String} AND window_ms != {w:UInt32} "
                    "AND window_start_ms < {hi:Int64} AND window_start_ms + window_ms > {lo:Int64} "
                    "ORDER BY window_start_ms",
                    {"h": host_id, "g": g, "w": w, "hi": int(ends[-1]), "lo": int(starts[0])})
                if not rows:
                    continue
                stored = [(int(r[0]), int(r[0]) + int(r[1])) for r in rows]
                hit = _first_overlap(starts, ends, stored)
                if hit is not None:
                    a, (ra, rb) = hit
                    raise Invalid(f"gpu_windows.window_start_ms: window ({int(starts[a])}, {w} ms) of GPU {clip(g)} "
                                  f"overlaps the stored window ({ra}, {rb - ra} ms)")

    # ------------------------------------------------------------------ one batch
    def handle(self, raw: bytes, principal=None) -> futures.Future:
        done: futures.Future = futures.Future()
        seq = 0
        now_ms = self.clock.now_us() // 1000
        try:
            # parse first (gRPC already bounds the message size), so that every answer names the
            # batch's seq and the agent can set exactly that batch aside
            try:
                batch = pb.WindowBatch.FromString(raw)
            except DecodeError as e:
                raise Invalid(f"batch: not a gpuledger.v1.WindowBatch ({e})") from e
            seq = batch.seq
            if len(raw) > self.max_batch_bytes:
                raise TooLarge(f"batch: {len(raw)} bytes, at most {self.max_batch_bytes}")
            if self.auth is not None:
                self.auth.check_batch(principal, batch)
            try:
                valid = validate(batch, now_ms, self.limits)
                self._check_host(valid, now_ms)
            except (Invalid, TooLarge):
                raise
            except Exception as e:  # a validation bug must answer this batch, not end the stream
                log.exception("validation failed unexpectedly for seq=%d", seq)
                raise Invalid(f"batch: could not be validated ({type(e).__name__}: {e})") from e
        except Invalid as e:
            self.stats.reject("invalid")
            log.warning("rejected batch seq=%d: %s", seq, clip(str(e), 300))
            done.set_result(self.ack(seq, INVALID_ARGUMENT, clip(str(e), 1000)))
            return done
        except TooLarge as e:
            self.stats.reject("too_large")
            done.set_result(self.ack(seq, RESOURCE_EXHAUSTED, str(e)))
            return done
        except PermissionError as e:
            # a configuration mistake (host_id renamed, wrong token file), not bad data: the agent
            # keeps the batch spooled and retries until an operator fixes the credentials
            self.stats.reject("permission")
            log.warning("refused batch seq=%d: %s", seq, clip(str(e), 300))
            done.set_result(self.ack(seq, PERMISSION_DENIED, clip(str(e), 1000), retryable=True))
            return done
        fut = self.writer.submit(valid)
        if fut is None:
            self.stats.deferred += 1
            done.set_result(self.ack(seq, RESOURCE_EXHAUSTED, "collector busy (insert queue full) or shutting "
                                                              "down: retry later", retryable=True))
            return done
        note = "; ".join(valid.warnings)
        if note:
            log.warning("batch seq=%d of host %s stored with a bound: %s", seq, clip(batch.host.host_id), note)

        def finish(f: futures.Future) -> None:
            exc = f.exception()
            if exc is None:
                self.stats.batches += 1
                self.stats.windows += f.result()
                done.set_result(self.ack(seq, OK, note, stored=f.result()))
            else:
                retryable = getattr(exc, "retryable", True)
                kind = "unavailable, retry later" if retryable else "permanent error, operator action needed"
                done.set_result(self.ack(seq, UNAVAILABLE if retryable else INTERNAL, f"store {kind}: {exc}",
                                         retryable=True))

        fut.add_done_callback(finish)
        return done
