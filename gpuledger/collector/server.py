"""Collector: gRPC ingest -> validation -> group-committed ClickHouse inserts; report queries.

Each agent stream is read on its own thread; every batch is validated, then queued for the
single writer, which coalesces the batches of all streams into one insert per table and only
then resolves their acknowledgements (group commit). Acks go back in the order batches came.
When the writer's queue is over `max_pending_rows`, a batch is answered RESOURCE_EXHAUSTED
(retryable) at once instead of queued: the agents keep it spooled and back off.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pyarrow as pa
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gpuledger.clock import Clock, WallClock
from gpuledger.collector import reports
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.store import Store, StoreError
from gpuledger.collector.validate import Invalid, Limits, TooLarge, Valid, validate
from gpuledger.v1 import telemetry_pb2 as pb

log = logging.getLogger(__name__)

OK = 0
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]


@dataclass
class IngestStats:
    batches: int = 0
    windows: int = 0
    rejected: dict = field(default_factory=dict)  # reason class -> count
    deferred: int = 0

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def _tables_for(items: list[Valid], now_ms: int, known: dict | None = None) -> dict[str, pa.Table]:
    """Tables of one group commit. `known` caches host and GPU facts already stored by this
    process, so they are written only when new or changed (a GPU's first window moving earlier)."""
    known = {} if known is None else known
    gpu_parts, proc_parts = [], []
    hosts, gpus, procs, batches = [], [], [], []
    for v in items:
        b = v.batch
        host_id = b.host.host_id
        gpu_parts.append(v.gpu.add_column(0, "host_id", pa.repeat(pa.scalar(host_id, pa.string()), v.gpu.num_rows)))
        if v.proc.num_rows:
            proc_parts.append(v.proc.add_column(0, "host_id", pa.repeat(pa.scalar(host_id, pa.string()),
                                                                        v.proc.num_rows)))
        h = b.host
        facts = h.SerializeToString(deterministic=True)
        if known.get(("host", host_id)) != facts:
            known[("host", host_id)] = facts
            hosts.append((host_id, h.hostname, h.provider, h.region, h.instance_type, h.gpu_count,
                          list(h.tags.items()), h.agent_version, now_ms))
        first_of = v.first_window_ms
        for g in b.gpus:
            if g.uuid not in first_of:
                continue  # declared but no window in this batch
            first = first_of[g.uuid]
            if 0 < g.first_window_ms < first:  # time before the first stored window: dropped or lost
                first = g.first_window_ms
            prev = known.get(("gpu", host_id, g.uuid))
            if prev is None or first < prev:
                known[("gpu", host_id, g.uuid)] = first
                gpus.append((host_id, g.uuid, g.index, g.name, g.mem_total_bytes, g.util_method, g.mig, first,
                             g.parent_uuid, g.share or 1.0))
        for p in b.processes:
            procs.append((host_id, p.pid, p.start_ms, p.command, p.container_id, p.pod_uid, list(p.tags.items()),
                          now_ms))
        batches.append((b.agent_id, host_id, b.agent_epoch, b.seq, now_ms, v.gpu.num_rows, v.proc.num_rows,
                        b.dropped_windows))

    def table(rows, names, types):
        cols = list(zip(*rows, strict=True)) if rows else [[] for _ in names]
        return pa.table({n: pa.array(c, t) for n, c, t in zip(names, cols, types, strict=True)})

    tags_t = pa.map_(pa.string(), pa.string())
    return {
        "gpu_windows": pa.concat_tables(gpu_parts).combine_chunks(),
        "proc_windows": pa.concat_tables(proc_parts).combine_chunks() if proc_parts else None,
        "hosts": table(hosts, ["host_id", "hostname", "provider", "region", "instance_type", "gpu_count", "tags",
                               "agent_version", "updated_ms"],
                       [pa.string()] * 5 + [pa.uint32(), tags_t, pa.string(), pa.int64()]),
        "gpus": table(gpus, ["host_id", "uuid", "gpu_index", "name", "mem_total_bytes", "util_method", "mig",
                             "first_window_ms", "parent_uuid", "share"],
                      [pa.string(), pa.string(), pa.uint32(), pa.string(), pa.uint64(), pa.string(), pa.bool_(),
                       pa.int64(), pa.string(), pa.float32()]),
        "processes": table(procs, ["host_id", "pid", "start_ms", "command", "container_id", "pod_uid", "tags",
                                   "last_seen_ms"],
                           [pa.string(), pa.uint32(), pa.int64(), pa.string(), pa.string(), pa.string(), tags_t,
                            pa.int64()]),
        "agent_batches": table(batches, ["agent_id", "host_id", "agent_epoch", "seq", "received_ms", "windows",
                                         "proc_windows", "dropped_windows"],
                               [pa.string(), pa.string(), pa.uint64(), pa.uint64(), pa.int64(), pa.uint32(),
                                pa.uint32(), pa.uint64()]),
    }


class Writer:
    """The single writer: group-commits queued batches, then resolves their futures."""

    def __init__(self, store: Store, clock: Clock, max_rows: int, max_wait_s: float, max_pending_rows: int,
                 retries: int = 3, retry_backoff_s: float = 0.2, on_health=None) -> None:
        self.store = store
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.on_health = on_health or (lambda serving: None)
        self.store_errors_retryable = 0
        self.store_errors_permanent = 0
        self.insert_latency_s: list[float] = []  # recent commit latencies (bounded), for metrics
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
        self.rows_committed = 0
        self.store_errors = 0
        self.last_insert_s = 0.0

    def start(self) -> None:
        self._thread.start()

    def pending_rows(self) -> int:
        with self._lock:
            return self._pending_rows

    def submit(self, item: Valid) -> futures.Future | None:
        """Queue a validated batch; None when over the backpressure limit."""
        rows = item.gpu.num_rows + item.proc.num_rows
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

    def _insert(self, items: list[Valid]) -> StoreError | None:
        known = dict(self._known)
        try:
            tables = _tables_for(items, self.clock.now_us() // 1000, known)
        except Exception as e:  # a bug in building tables must not take the writer down
            log.exception("building the insert failed")
            return StoreError(f"building insert: {e}", retryable=False)
        for attempt in range(self.retries + 1):
            try:
                self.store.insert(tables)
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
        self.insert_latency_s.append(self.last_insert_s)
        if len(self.insert_latency_s) > 4096:
            del self.insert_latency_s[:2048]
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


class Ingest:
    """Turns one raw batch into a future acknowledgement."""

    def __init__(self, writer: Writer, limits: Limits, clock: Clock, max_batch_bytes: int, auth=None) -> None:
        self.writer = writer
        self.limits = limits
        self.clock = clock
        self.max_batch_bytes = max_batch_bytes
        self.auth = auth
        self.stats = IngestStats()

    def handle(self, raw: bytes, principal=None) -> futures.Future:
        done: futures.Future = futures.Future()
        seq = 0
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
                valid = validate(batch, self.clock.now_us() // 1000, self.limits)
            except (Invalid, TooLarge):
                raise
            except Exception as e:  # a validation bug must answer this batch, not end the stream
                log.exception("validation failed unexpectedly for seq=%d", seq)
                raise Invalid(f"batch: could not be validated ({type(e).__name__}: {e})") from e
        except Invalid as e:
            self.stats.reject("invalid")
            log.warning("rejected batch seq=%d: %s", seq, e)
            done.set_result(pb.Ack(seq=seq, code=INVALID_ARGUMENT, message=str(e), retryable=False))
            return done
        except TooLarge as e:
            self.stats.reject("too_large")
            done.set_result(pb.Ack(seq=seq, code=RESOURCE_EXHAUSTED, message=str(e), retryable=False))
            return done
        except PermissionError as e:
            # a configuration mistake (host_id renamed, wrong token file), not bad data: the agent
            # keeps the batch spooled and retries until an operator fixes the credentials
            self.stats.reject("permission")
            log.warning("refused batch seq=%d: %s", seq, e)
            done.set_result(pb.Ack(seq=seq, code=grpc.StatusCode.PERMISSION_DENIED.value[0], message=str(e),
                                   retryable=True))
            return done
        fut = self.writer.submit(valid)
        if fut is None:
            self.stats.deferred += 1
            done.set_result(pb.Ack(seq=seq, code=RESOURCE_EXHAUSTED, retryable=True,
                                   message="collector busy (insert queue full) or shutting down: retry later"))
            return done

        def finish(f: futures.Future) -> None:
            exc = f.exception()
            if exc is None:
                self.stats.batches += 1
                self.stats.windows += f.result()
                done.set_result(pb.Ack(seq=seq, code=OK, stored_windows=f.result()))
            else:
                retryable = getattr(exc, "retryable", True)
                kind = "unavailable, retry later" if retryable else "permanent error, operator action needed"
                done.set_result(pb.Ack(seq=seq, code=UNAVAILABLE if retryable else INTERNAL,
                                       message=f"store {kind}: {exc}", retryable=True))

        fut.add_done_callback(finish)
        return done


class Collector:
    """The collector process: Telemetry + Query + health services on one gRPC server."""

    def __init__(self, store: Store, pricing: Pricing, *, listen: str = "127.0.0.1:0", clock: Clock | None = None,
                 limits: Limits = Limits(), max_batch_bytes: int = 16 << 20, insert_max_rows: int = 500_000,
                 insert_max_wait_s: float = 0.05, max_pending_rows: int = 2_000_000, auth=None,
                 server_credentials: grpc.ServerCredentials | None = None, max_streams: int = 1024) -> None:
        self.store = store
        self.pricing = pricing
        self.clock = clock or WallClock()
        self.listen = listen
        self.auth = auth
        self.health = health.HealthServicer()
        self.writer = Writer(store, self.clock, insert_max_rows, insert_max_wait_s, max_pending_rows,
                             on_health=self._set_store_health)
        self.ingest = Ingest(self.writer, limits, self.clock, max_batch_bytes, auth)
        self.server_credentials = server_credentials
        self.security_note = ""
        self.active_streams = 0
        # A sync gRPC server holds one worker thread per open stream for the stream's life: the pool
        # must exceed the number of agents. Past max_streams, a new stream is refused with
        # RESOURCE_EXHAUSTED at once (the agent backs off) instead of waiting silently.
        self.max_streams = max_streams
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_streams + 32, thread_name_prefix="gpuledger-rpc"),
            maximum_concurrent_rpcs=max_streams + 32,
            options=[("grpc.max_receive_message_length", max_batch_bytes + (1 << 20)),
                     ("grpc.max_send_message_length", 256 << 20)])
        handlers = {
            "Stream": grpc.stream_stream_rpc_method_handler(self._stream, request_deserializer=None,
                                                            response_serializer=pb.Ack.SerializeToString),
        }
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("gpuledger.v1.Telemetry",
                                                                                     handlers)])
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("gpuledger.v1.Query", {
            "Report": grpc.unary_unary_rpc_method_handler(self._report,
                                                          request_deserializer=pb.ReportRequest.FromString,
                                                          response_serializer=pb.ReportReply.SerializeToString)})])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = 0
        self._started = False
        self._stopped = False
        self._streams = 0

    def _set_store_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        if not self._stopped:
            self.health.set("gpuledger.v1.Telemetry", status)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> int:
        if self._started:
            return self.port
        if self.server_credentials is not None:
            self.port = self._server.add_secure_port(self.listen, self.server_credentials)
        else:
            self.port = self._server.add_insecure_port(self.listen)
        if self.port == 0:
            raise OSError(f"collector: cannot listen on {self.listen}")
        self.writer.start()
        self._server.start()
        for svc in ("", "gpuledger.v1.Telemetry", "gpuledger.v1.Query"):
            self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        self._started = True
        return self.port

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking streams, finish in-flight inserts and acks; safe to call twice."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait()
        self.writer.close()

    def wait(self) -> None:
        self._server.wait_for_termination()

    # ------------------------------------------------------------------ RPCs
    def _stream(self, request_iterator, context):
        principal = None
        if self.auth is not None:
            principal = self.auth.authenticate_agent(context)
        acks: queue.Queue = queue.Queue()
        self.active_streams += 1

        def reader():
            try:
                for raw in request_iterator:
                    acks.put(self.ingest.handle(raw, principal))
            except grpc.RpcError:
                pass  # the agent went away; its unacked batches stay in its spool
            except Exception:
                log.exception("stream reader failed")
            finally:
                acks.put(None)

        threading.Thread(target=reader, name="gpuledger-stream", daemon=True).start()
        try:
            while True:
                fut = acks.get()
                if fut is None:
                    return
                yield fut.result()
        finally:
            self.active_streams -= 1

    def _report(self, request: pb.ReportRequest, context) -> pb.ReportReply:
        if self.auth is not None:
            self.auth.authenticate_query(context)
        try:
            return reports.run(self.store, self.pricing, request, self.clock.now_us() // 1000)
        except reports.ReportError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
