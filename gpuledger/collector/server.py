"""Collector: the gRPC services (Telemetry, Query, Admin, health) on one asyncio server.

The stages, each in its own module: ingest.py (authenticate, validate, bound) -> writer.py (group
commits built by tables.py) -> store.py; reports.py answers queries; rollup.py keeps the hourly
rollups current. This module only serves them.

No client can starve another:
- streams are coroutines, not threads: thousands of idle agents cost memory, not workers;
- each credential (without tokens: each host id, from the stream's first batch) holds at most
  `max_streams_per_agent` streams, everyone together `max_streams`; past either the stream is refused at once with
  RESOURCE_EXHAUSTED naming the limit;
- a stream that carries no batch for `stream_idle_timeout_s` is closed;
- reports run on their own worker threads and store connections (`report_workers`), health on the
  event loop: neither waits behind agents, and a long report never holds the writer's connection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gpuledger.agent.shipper import LIMIT_HEADER
from gpuledger.clock import Clock, WallClock
from gpuledger.collector import reports
from gpuledger.collector.ingest import INVALID_ARGUMENT, OK, RESOURCE_EXHAUSTED, Ingest  # noqa: F401 (re-exported)
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.rollup import Sealer
from gpuledger.collector.store import Store
from gpuledger.collector.validate import Limits
from gpuledger.collector.writer import Writer
from gpuledger.v1 import telemetry_pb2 as pb

log = logging.getLogger(__name__)


class Collector:
    """The collector process: Telemetry + Query + Admin + health on one grpc.aio server (its own thread)."""

    def __init__(self, store: Store, pricing: Pricing, *, listen: str = "127.0.0.1:0", clock: Clock | None = None,
                 limits: Limits = Limits(), max_batch_bytes: int = 16 << 20, insert_max_rows: int = 500_000,
                 insert_max_wait_s: float = 0.05, max_pending_rows: int = 2_000_000, auth=None,
                 server_credentials: grpc.ServerCredentials | None = None, max_streams: int = 10_000,
                 max_streams_per_agent: int = 4, stream_idle_timeout_s: float = 300.0, report_workers: int = 2,
                 backfill_hours: float = 24.0, coverage: reports.CoverageRules | None = None,
                 seal_interval_s: float = 30.0, seal_settle_s: float = 60.0, validate_workers: int = 4,
                 run_sealer: bool = True) -> None:
        self.store = store
        self.pricing = pricing
        self.clock = clock or WallClock()
        self.listen = listen
        self.auth = auth
        self.max_batch_bytes = max_batch_bytes
        self.rules = coverage or reports.CoverageRules()
        self.writer = Writer(store, self.clock, insert_max_rows, insert_max_wait_s, max_pending_rows,
                             on_health=self._set_store_health)
        self.ingest = Ingest(self.writer, limits, self.clock, max_batch_bytes, auth, store,
                             backfill_ms=int(backfill_hours * 3_600_000))
        self.sealer = Sealer(store, self.clock, interval_s=seal_interval_s, settle_s=seal_settle_s)
        self.run_sealer = run_sealer
        # the prices in force per GPU, in the store for SQL readers (Grafana): kept current by the sealer's thread
        from gpuledger.collector.price_table import PriceTable

        self.prices = PriceTable(store, pricing)
        self.sealer.after_pass = lambda: self.prices.refresh(self.clock.now_us() // 1000)
        self.server_credentials = server_credentials
        self.security_note = ""
        self.max_streams = max_streams
        self.max_streams_per_agent = max_streams_per_agent
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.report_workers = report_workers
        self.active_streams = 0
        self.streams_refused = 0
        self.streams_idle_closed = 0
        self._per_agent: dict[str, int] = {}
        self._validate_pool = futures.ThreadPoolExecutor(max_workers=validate_workers,
                                                         thread_name_prefix="gpuledger-validate")
        self._report_pool = futures.ThreadPoolExecutor(max_workers=report_workers,
                                                       thread_name_prefix="gpuledger-report")
        self._report_slots = threading.BoundedSemaphore(report_workers * 5)
        self.health = health.aio.HealthServicer()
        self.serving = {"gpuledger.v1.Telemetry": False, "gpuledger.v1.Query": False}  # what health answers
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self._stopped = False
        self.jobs = None  # alerting.Jobs (alert rules, tracker sync): started and stopped with the collector

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> int:
        """Bind, start serving (on a thread of its own) and return the port; safe to call twice."""
        if self._started:
            return self.port
        ready: futures.Future = futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="gpuledger-grpc", daemon=True)
        self._thread.start()
        self.port = ready.result(timeout=60)
        self.writer.start()
        try:
            self.prices.refresh(self.clock.now_us() // 1000)
        except Exception as e:  # reports do not need it; Grafana's money waits for the next pass
            log.warning("prices table not written at start: %s", e)
        if self.run_sealer:
            self.sealer.start()
        if self.jobs is not None:
            self.jobs.start()
        self._started = True
        return self.port

    def _serve(self, ready: futures.Future) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start_server(ready))
        except BaseException as e:  # noqa: BLE001 - handed to start()
            if not ready.done():
                ready.set_exception(e)
            loop.close()
            return
        loop.run_forever()
        loop.close()

    async def _start_server(self, ready: futures.Future) -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", self.max_batch_bytes + (1 << 20)),
                                          ("grpc.max_send_message_length", 256 << 20),
                                          ("grpc.keepalive_permit_without_calls", 1),
                                          ("grpc.http2.min_ping_interval_without_data_ms", 10_000)])
        server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler("gpuledger.v1.Telemetry", {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self._stream, request_deserializer=None, response_serializer=pb.Ack.SerializeToString)}),
            grpc.method_handlers_generic_handler("gpuledger.v1.Query", {
                "Report": grpc.unary_unary_rpc_method_handler(
                    self._report, request_deserializer=pb.ReportRequest.FromString,
                    response_serializer=pb.ReportReply.SerializeToString)}),
            grpc.method_handlers_generic_handler("gpuledger.v1.Admin", {
                "Retire": grpc.unary_unary_rpc_method_handler(
                    self._retire, request_deserializer=pb.RetireRequest.FromString,
                    response_serializer=pb.RetireReply.SerializeToString),
                "Import": grpc.stream_unary_rpc_method_handler(
                    self._import, request_deserializer=pb.ImportChunk.FromString,
                    response_serializer=pb.ImportReply.SerializeToString)}),
        ])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.server_credentials is not None:
            port = server.add_secure_port(self.listen, self.server_credentials)
        else:
            port = server.add_insecure_port(self.listen)
        if port == 0:
            raise OSError(f"collector: cannot listen on {self.listen}")
        await server.start()
        for svc in ("", "gpuledger.v1.Telemetry", "gpuledger.v1.Query"):
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
            self.serving[svc] = True
        self._server = server
        ready.set_result(port)

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def _call(self, coro, timeout: float = 60.0):
        """Run a coroutine on the server's loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _set_store_health(self, serving: bool) -> None:
        if self._stopped or self._loop is None:
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.serving["gpuledger.v1.Telemetry"] = serving
        asyncio.run_coroutine_threadsafe(self.health.set("gpuledger.v1.Telemetry", status), self._loop)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking streams, finish in-flight inserts and acks; safe to call twice."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True

        async def shutdown():
            await self.health.enter_graceful_shutdown()
            for svc in self.serving:
                self.serving[svc] = False
            await self._server.stop(grace_s)

        try:
            self._call(shutdown(), timeout=grace_s + 30)
        finally:
            if self.jobs is not None:
                self.jobs.close()
            self.sealer.close()
            self.writer.close()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._validate_pool.shutdown(wait=False, cancel_futures=True)
            self._report_pool.shutdown(wait=False, cancel_futures=True)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------ RPCs
    async def _deny(self, context, e) -> None:
        await context.abort(e.code, e.message)

    def _peer_key(self, context) -> str:
        peer = context.peer() or ""
        # ipv4:127.0.0.1:5555 / ipv6:[::1]:5555: the address without the port
        return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer

    def _cap_refusal(self, key: str, by: str) -> str | None:
        if self._per_agent.get(key, 0) >= self.max_streams_per_agent:
            self.streams_refused += 1
            return (f"stream limit per agent reached: {self.max_streams_per_agent} streams already open for this {by} "
                    "(collector.max_streams_per_agent)")
        return None

    async def _stream(self, request_iterator, context):
        from gpuledger.security import AuthDenied

        principal = None
        if self.auth is not None:
            try:
                principal = self.auth.authenticate_agent(context)
            except AuthDenied as e:
                await self._deny(context, e)
        if self.active_streams >= self.max_streams:
            self.streams_refused += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"collector stream limit reached (collector.max_streams = {self.max_streams}): "
                                "retry later")
        if principal is not None and (why := self._cap_refusal(principal, "credential")):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        self.active_streams += 1
        key = principal  # with tokens the credential is known now; without, from the first batch
        if key is not None:
            self._per_agent[key] = self._per_agent.get(key, 0) + 1
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue = asyncio.Queue(maxsize=64)
        idle = False
        it = request_iterator.__aiter__()

        async def next_raw():
            nonlocal idle
            try:
                return await asyncio.wait_for(it.__anext__(), self.stream_idle_timeout_s)
            except StopAsyncIteration:
                return None
            except TimeoutError:
                idle = True
                return None

        try:
            await context.send_initial_metadata(((LIMIT_HEADER, str(self.max_batch_bytes)),))
            first = await next_raw()
            if principal is None and first is not None:  # without tokens, an agent is its first batch's host
                try:
                    key = "host:" + pb.WindowBatch.FromString(first).host.host_id[:128]
                except Exception:  # not a batch: the ingest answers it; count it against its address
                    key = "peer:" + self._peer_key(context)
                if why := self._cap_refusal(key, "host"):
                    key = None
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
                self._per_agent[key] = self._per_agent.get(key, 0) + 1

            async def reader():
                raw = first
                try:
                    while raw is not None:
                        # one batch of a stream at a time is validated (in order: a batch is checked against
                        # the ones before it); its commit is awaited by the loop below, so validating the next
                        # batch overlaps storing this one
                        await pending.put(await loop.run_in_executor(self._validate_pool, self.ingest.handle, raw,
                                                                     principal))
                        raw = await next_raw()
                except (grpc.RpcError, asyncio.CancelledError):
                    pass  # the agent went away; its unacknowledged batches stay in its spool
                except Exception:
                    log.exception("stream reader failed")
                finally:
                    await pending.put(None)

            task = asyncio.create_task(reader())
            try:
                while True:
                    item = await pending.get()
                    if item is None:
                        break
                    yield await asyncio.wrap_future(item)  # resolved once stored or refused
            finally:
                task.cancel()
            if idle:
                self.streams_idle_closed += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"stream idle for {self.stream_idle_timeout_s:g} s: closed (open a new one when "
                                    "there is data)")
        finally:
            self.active_streams -= 1
            if key is not None:
                n = self._per_agent.get(key, 1) - 1
                if n:
                    self._per_agent[key] = n
                else:
                    self._per_agent.pop(key, None)

    async def _report(self, request: pb.ReportRequest, context) -> pb.ReportReply:
        from gpuledger.security import AuthDenied

        if self.auth is not None:
            try:
                self.auth.authenticate_query(context)
            except AuthDenied as e:
                await self._deny(context, e)
        if not self._report_slots.acquire(blocking=False):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many reports at once ({self.report_workers} running, more waiting): retry later")
        try:
            now_ms = self.clock.now_us() // 1000
            return await asyncio.get_running_loop().run_in_executor(
                self._report_pool, reports.run, self.store, self.pricing, request, now_ms, self.rules)
        except reports.ReportError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self._report_slots.release()

    async def _retire(self, request: pb.RetireRequest, context) -> pb.RetireReply:
        from gpuledger.security import AuthDenied

        if self.auth is not None:
            try:
                self.auth.authenticate_admin(context)
            except AuthDenied as e:
                await self._deny(context, e)
        now_ms = self.clock.now_us() // 1000
        try:
            at_ms, state = await asyncio.get_running_loop().run_in_executor(
                self._report_pool, reports.retire, self.store, request.host_id, request.at_ms or now_ms,
                request.note, now_ms, self.rules)
        except reports.ReportError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.RetireReply(host_id=request.host_id, at_ms=at_ms, state=state)

    async def _import(self, request_iterator, context) -> pb.ImportReply:
        """A bill or API spend import (billing.py): admin credential, chunks stored as they come."""
        from gpuledger.collector import billing
        from gpuledger.security import AuthDenied

        if self.auth is not None:
            try:
                self.auth.authenticate_admin(context)
            except AuthDenied as e:
                await self._deny(context, e)
        return await billing.serve_import(self.store, self.clock.now_us(), request_iterator, context)
