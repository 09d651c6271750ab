"""The single writer: group-commits the validated batches of every stream, then resolves their futures.

Batches wait in one queue; the writer takes as many as fit `max_rows` or arrive within `max_wait_s`,
inserts them as one commit per table (tables.build), and only then resolves each batch's future,
so an acknowledgement always means "stored". When the queue holds more than `max_pending_rows`, a
new batch is refused at once (the agent keeps it spooled and backs off).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures

from gpuledger.clock import Clock
from gpuledger.collector import tables
from gpuledger.collector.store import Store, StoreError
from gpuledger.collector.validate import Valid

log = logging.getLogger(__name__)


class Writer:
    def __init__(self, store: Store, clock: Clock, max_rows: int, max_wait_s: float, max_pending_rows: int,
                 retries: int = 3, retry_backoff_s: float = 0.2, on_health=None) -> None:
        self.store = store
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.on_health = on_health or (lambda serving: None)
        self.store_errors_retryable = 0
        self.store_errors_permanent = 0
        self.on_commit = None  # called with each commit's latency in seconds (metrics)
        self.clock = clock
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.max_pending_rows = max_pending_rows
        self._q: queue.Queue = queue.Queue()
        self._pending_rows = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpuledger-writer", daemon=True)
        self.commits = 0
        self._closing = False
        self._known: dict = {}
        self._last_mark_us = 0
        self.rows_committed = 0
        self.store_errors = 0
        self.last_insert_s = 0.0

    def start(self) -> None:
        if not self._thread.is_alive() and not self._closing:
            self._thread.start()

    def pending_rows(self) -> int:
        with self._lock:
            return self._pending_rows

    def submit(self, item: Valid) -> futures.Future | None:
        """Queue a validated batch; None when over the backpressure limit or closing."""
        rows = max(item.rows, 1)
        with self._lock:
            if self._closing or (self._pending_rows and self._pending_rows + rows > self.max_pending_rows):
                return None
            self._pending_rows += rows
            fut: futures.Future = futures.Future()
            self._q.put((item, rows, fut))  # under the lock: close() cannot slip in between
        return fut

    def _run(self) -> None:
        while True:
            try:
                first = self._q.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if first is None:
                return
            group = [first]
            rows = first[1]
            deadline = time.monotonic() + self.max_wait_s
            stop_after = False
            while rows < self.max_rows:
                try:
                    item = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop_after = True
                    break
                group.append(item)
                rows += item[1]
            self._commit(group, rows)
            if stop_after:
                return

    def _commit(self, group, rows: int) -> None:
        """Insert one group, then resolve every future; nothing is acknowledged unless the insert
        returned.

        A retryable fault (connection, timeout, overload) is retried here with backoff before the
        agents are told to resend. A permanent one (the store refuses the data: an operator must
        act, or one batch is at fault) fails without retry; if the group held several batches they
        are committed one by one, so one batch the store refuses cannot fail the others. The agents
        keep a failed batch spooled: valid data is never dead-lettered for a store fault.
        """
        t0 = time.perf_counter()
        err = self._insert([g[0] for g in group])
        if err is not None and not err.retryable and len(group) > 1:
            log.warning("group of %d batches refused (%s); committing them one by one", len(group), err)
            for item in group:
                self._resolve([item], item[1], self._insert([item[0]]), t0)
            return
        self._resolve(group, rows, err, t0)

    def _mark(self) -> int:
        """A commit's rollup mark (written after its windows): the collector's clock in µs, strictly increasing."""
        self._last_mark_us = max(self.clock.now_us(), self._last_mark_us + 1)
        return self._last_mark_us

    def _insert(self, items: list[Valid]) -> StoreError | None:
        err: StoreError | None = None
        for attempt in range(self.retries + 1):
            known = dict(self._known)
            try:
                built = tables.build(items, self.clock.now_us() // 1000, self._mark(), known)
            except Exception as e:  # a bug in building tables must not take the writer down
                log.exception("building the insert failed")
                return StoreError(f"building insert: {e}", retryable=False)
            try:
                self.store.insert(built)
                self._known = known  # only once stored
                return None
            except StoreError as e:
                err = e
            except Exception as e:  # an unclassified failure counts as passing
                err = StoreError(f"insert failed: {e}", retryable=True)
            if not err.retryable:
                self.store_errors_permanent += 1
                log.error("store insert failed (permanent; operator action needed): %s", err)
                return err
            self.store_errors_retryable += 1
            log.warning("store insert failed (retryable, attempt %d): %s", attempt + 1, err)
            if attempt < self.retries:
                time.sleep(self.retry_backoff_s * (2 ** attempt))
        return err

    def _resolve(self, group, rows: int, err: StoreError | None, t0: float) -> None:
        if err is None:
            self.on_health(True)
            self.commits += 1
            self.rows_committed += rows
        else:
            self.store_errors += 1
            if not err.retryable:
                self.on_health(False)
        self.last_insert_s = time.perf_counter() - t0
        if self.on_commit is not None:
            try:
                self.on_commit(self.last_insert_s)
            except Exception:  # metrics must never break a commit
                log.exception("commit hook failed")
        with self._lock:
            self._pending_rows -= rows
        for item, _, fut in group:
            if err is None:
                fut.set_result(item.gpu.num_rows)
            else:
                fut.set_exception(err)

    def close(self) -> None:
        """Take no more batches, finish every queued insert, then stop; safe to call twice."""
        with self._lock:
            self._closing = True
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout=60)
        self._stop.set()
        while True:  # anything left (the writer gave up): answer it, so no stream waits forever
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item[2].done():
                item[2].set_exception(StoreError("collector shutting down", retryable=True))
