"""The agent: source -> windows -> spool -> shipper, wired explicitly.

`Agent.step(now)` polls the source, folds the readings, closes finished windows and, every
`flush_s`, appends one encoded batch to the spool. The shipper sends from the spool on its own
thread. `Agent.close()` closes the open window too, then spools a stop batch saying the run ended
on purpose at that instant, so a SIGTERM loses nothing that was measured and the collector does
not expect the host to be watched after it.

Every batch names its run's session start: when this run began watching the host. A fresh run
starts at its first window; a run that restarts after the previous one was killed (no stop) on
the same boot starts where the previous one stopped closing windows, so the time the agent was
down counts as unmonitored; after a reboot it starts at the boot (the host was up, unwatched).

Inference endpoints ([[agent.endpoints]]): an EndpointScraper reads each server's own counters on
the same window grid. Driven by `step()` (simulated fleets, tests) it scrapes inline; under `run()`
it scrapes on a thread of its own, so a slow or hung server delays only the scrape (never the GPU
windows): each GET is bounded by the endpoint's timeout_s, and the closed endpoint windows wait in
a queue that `flush()` empties. They travel in the first batch of a flush that carries GPU windows
(a batch needs GPU windows unless it is a stop batch), or in the stop batch. A failed scrape is
counted (`endpoint_stats()`) and its time left out of the window's scraped_ms, never guessed.
"""

from __future__ import annotations

import logging
import threading
import time

import pyarrow as pa

from gpuledger import __version__
from gpuledger.agent.source import GpuFacts, GpuSource, ProcessIdentity
from gpuledger.agent.spool import Spool, SpoolFull
from gpuledger.agent.windows import Closed, Windower
from gpuledger.clock import Clock
from gpuledger.config import AgentConfig
from gpuledger.schema import ENDPOINT_WINDOW_SCHEMA, GPU_WINDOW_SCHEMA, PROC_WINDOW_SCHEMA, to_ipc
from gpuledger.v1 import telemetry_pb2 as pb

log = logging.getLogger(__name__)


def host_facts(cfg: AgentConfig, gpus: list[GpuFacts], physical_gpus: int = 0,
               instance_id: str | None = None) -> pb.HostFacts:
    """Host facts; the priced GPU count is the config's, else the physical GPUs (MIG instances
    are not GPUs of their own for pricing). `instance_id`: the cloud's id of the instance (found at
    start, see Agent); None: the config's `agent.instance_id`."""
    import socket

    return pb.HostFacts(host_id=cfg.host_id, hostname=socket.gethostname(), provider=cfg.provider,
                        region=cfg.region, instance_type=cfg.instance_type,
                        gpu_count=cfg.gpu_count or physical_gpus or len(gpus), tags={str(k): str(v) for k, v in cfg.tags.items()},
                        agent_version=__version__,
                        instance_id=cfg.instance_id if instance_id is None else instance_id)


def gpu_infos(gpus: list[GpuFacts], first_windows: dict[str, int] | None = None) -> list[pb.GpuInfo]:
    first_windows = first_windows or {}
    return [pb.GpuInfo(uuid=g.uuid, index=g.index, name=g.name, mem_total_bytes=g.mem_total_bytes,
                       util_method=g.util_method, mig=g.mig, parent_uuid=g.parent_uuid, share=g.share,
                       first_window_ms=first_windows.get(g.uuid, 0))
            for g in gpus]


def process_infos(processes: list[ProcessIdentity]) -> list[pb.ProcessInfo]:
    return [pb.ProcessInfo(pid=p.pid, start_ms=p.start_ms, command=p.command[:256], container_id=p.container_id,
                           pod_uid=p.pod_uid, tags=dict(p.tags)) for p in processes]


def boot_time_ms(proc_root: str = "/proc") -> int | None:
    """The host's boot time (btime in /proc/stat), or None where it cannot be read."""
    try:
        with open(f"{proc_root}/stat") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return int(line.split()[1]) * 1000
    except (OSError, ValueError):
        return None
    return None


def merge_closed(parts: list[Closed]) -> Closed:
    if len(parts) == 1:
        return parts[0]
    seen: dict[tuple[int, int], ProcessIdentity] = {}
    for p in parts:
        for ident in p.processes:
            seen[(ident.pid, ident.start_ms)] = ident
    return Closed(gpu=pa.concat_tables([p.gpu for p in parts]), proc=pa.concat_tables([p.proc for p in parts]),
                  processes=list(seen.values()), start_ms=parts[0].start_ms, end_ms=parts[-1].end_ms)


def encode_batch(agent_id: str, epoch: int, seq: int, host: pb.HostFacts, gpus: list[pb.GpuInfo],
                 closed: Closed, dropped_windows: int, sent_ms: int, session_start_ms: int = 0) -> bytes:
    msg = pb.WindowBatch(agent_id=agent_id, agent_epoch=epoch, seq=seq, host=host, gpus=gpus,
                         processes=process_infos(closed.processes),
                         gpu_windows_arrow=to_ipc(closed.gpu.cast(GPU_WINDOW_SCHEMA)),
                         proc_windows_arrow=to_ipc(closed.proc.cast(PROC_WINDOW_SCHEMA)),
                         dropped_windows=dropped_windows, sent_ms=sent_ms, session_start_ms=session_start_ms)
    return msg.SerializeToString()


def endpoint_part(endpoint: pa.Table | None) -> bytes:
    """The serialized WindowBatch field carrying endpoint windows, to append to an encoded batch
    (protobuf keeps the last value of a field, so appending sets it)."""
    if endpoint is None or not endpoint.num_rows:
        return b""
    return pb.WindowBatch(endpoint_windows_arrow=to_ipc(endpoint.cast(ENDPOINT_WINDOW_SCHEMA))).SerializeToString()


def encode_stop(agent_id: str, epoch: int, seq: int, host: pb.HostFacts, session_start_ms: int, stopped_ms: int,
                sent_ms: int) -> bytes:
    """The last batch of a run: no windows, the instant the run stopped on purpose."""
    return pb.WindowBatch(agent_id=agent_id, agent_epoch=epoch, seq=seq, host=host, sent_ms=sent_ms,
                          session_start_ms=session_start_ms, stopped_ms=stopped_ms).SerializeToString()


def split_closed(closed: Closed, parts: int) -> list[Closed]:
    """Split closed windows into about `parts` pieces by GPU window, each process window kept with its GPU
    window (a batch must hold the GPU window of each of its process windows)."""
    n = closed.gpu.num_rows
    parts = max(1, min(parts, n))
    if parts == 1:
        return [closed]
    import numpy as np
    import pyarrow.compute as pc

    bounds = np.linspace(0, n, parts + 1).astype(int)
    gkey = pc.binary_join_element_wise(closed.gpu.column("gpu_uuid"),
                                       pc.cast(closed.gpu.column("window_start_ms"), pa.string()), "/")
    pkey = pc.binary_join_element_wise(closed.proc.column("gpu_uuid"),
                                       pc.cast(closed.proc.column("window_start_ms"), pa.string()), "/")
    out = []
    by_ident = {(p.pid, p.start_ms): p for p in closed.processes}
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b <= a:
            continue
        g = closed.gpu.slice(a, b - a)
        mask = pc.is_in(pkey, value_set=gkey.slice(a, b - a).combine_chunks()) if closed.proc.num_rows else None
        p = closed.proc.filter(mask) if mask is not None else closed.proc
        idents = sorted({(int(x), int(y)) for x, y in zip(p.column("pid").to_pylist(),
                                                          p.column("proc_start_ms").to_pylist(), strict=True)})
        starts = g.column("window_start_ms")
        out.append(Closed(gpu=g, proc=p, processes=[by_ident[i] for i in idents if i in by_ident],
                          start_ms=int(pc.min(starts).as_py()), end_ms=closed.end_ms))
    return out


def encode_within(limit: int, closed: Closed, encode) -> list[tuple[bytes, int]]:
    """Encode closed windows as one or more batches of at most `limit` bytes each: (payload, windows).
    `encode(closed) -> bytes`. A single GPU window over the limit is returned as it is (the
    collector then refuses it, and it is dead-lettered with the reason)."""
    payload = encode(closed)
    if len(payload) <= limit or closed.gpu.num_rows <= 1:
        return [(payload, closed.n_windows)]
    pieces = max(2, -(-len(payload) // max(limit, 1)) + 1)
    out: list[tuple[bytes, int]] = []
    for part in split_closed(closed, pieces):
        out.extend(encode_within(limit, part, encode))
    return out


def split_payload(payload: bytes, limit: int) -> list[tuple[bytes, int]]:
    """Re-encode a spooled batch as batches of at most `limit` bytes (same agent, epoch and windows; the
    caller gives them new sequence numbers, patched in by `with_seq`)."""
    from gpuledger.schema import from_ipc

    b = pb.WindowBatch.FromString(payload)
    gpu = from_ipc(b.gpu_windows_arrow) if b.gpu_windows_arrow else GPU_WINDOW_SCHEMA.empty_table()
    proc = from_ipc(b.proc_windows_arrow) if b.proc_windows_arrow else PROC_WINDOW_SCHEMA.empty_table()
    idents = [ProcessIdentity(pid=p.pid, start_ms=p.start_ms, command=p.command, container_id=p.container_id,
                              pod_uid=p.pod_uid, tags=tuple(sorted(p.tags.items()))) for p in b.processes]
    closed = Closed(gpu=gpu, proc=proc, processes=idents)

    def encode(c: Closed) -> bytes:
        used = {u for u in c.gpu.column("gpu_uuid").to_pylist()}
        part = pb.WindowBatch()
        part.CopyFrom(b)
        del part.gpus[:]
        part.gpus.extend(g for g in b.gpus if g.uuid in used)
        del part.processes[:]
        part.processes.extend(process_infos(c.processes))
        part.gpu_windows_arrow = to_ipc(c.gpu)
        part.proc_windows_arrow = to_ipc(c.proc)
        return part.SerializeToString()

    return encode_within(limit, closed, encode)


def with_seq(payload: bytes, seq: int) -> bytes:
    """The same batch under another sequence number (protobuf keeps the last value of a scalar field)."""
    from gpuledger.agent.shipper import _varint

    return payload + bytes([(3 << 3) | 0]) + _varint(seq)


class Agent:
    def __init__(self, cfg: AgentConfig, source: GpuSource, clock: Clock, spool: Spool,
                 start_us: int | None = None, boot_ms: int | None = None, http_get=None) -> None:
        self.cfg = cfg
        self.source = source
        self.clock = clock
        self.spool = spool
        self.gpus = source.gpus()
        self.session_start_ms = self._session_start(start_us, boot_ms)
        if spool.closed_until_ms and start_us is None:
            # A live agent's restart: windows up to closed_until were already closed (the last one
            # perhaps only in part, by a graceful stop), and re-emitting one would replace what was
            # measured. Time between then and now has no windows: reports count it as unmonitored.
            # A closed_until in the future (the clock was ahead when it was written) is ignored.
            w_us = int(round(cfg.window_s * 1e6))
            now_us = clock.now_us()
            closed_us = -(-spool.closed_until_ms * 1000 // w_us) * w_us
            if closed_us > now_us + w_us:
                log.warning("spool says windows were closed up to %d ms, after the clock's now: ignored",
                            spool.closed_until_ms)
            else:
                start_us = max(closed_us, now_us // w_us * w_us)
        self.windower = Windower(self.gpus, cfg.window_s, cfg.lateness_s, start_us=start_us, kernels=cfg.kernels)
        # the cloud instance id joins this host to its bill rows: the config's, else asked once from the
        # instance metadata service; replays and simulated fleets (start_us given) never ask
        if cfg.instance_id or start_us is not None:
            instance_id = cfg.instance_id
        else:
            from gpuledger.agent.cloudmeta import instance_id_for

            instance_id = instance_id_for(cfg)
        self.host = host_facts(cfg, self.gpus, getattr(source, "physical_gpu_count", 0), instance_id)
        spool.begin_session(self.session_start_ms)
        self.agent_id = cfg.host_id
        self._pending: list[Closed] = []
        self._last_flush_us = clock.now_us()
        self.windows_sampled = 0
        self.batches_spooled = 0
        self.unhealthy_polls = 0
        self.last_closed: Closed | None = None  # the windows closed by the latest step
        self.on_closed = None  # called with every Closed (per-GPU metrics count each window once)
        self._closed = False
        # endpoint scraping: `http_get(url, timeout_s) -> bytes` replaces urllib (a simulated server)
        self.scraper = None
        self._ep_pending: list[pa.Table] = []
        self._ep_lock = threading.Lock()
        self._scrape_thread: threading.Thread | None = None
        self._scrape_stop = threading.Event()
        self.scrape_failures = 0  # scrape loop iterations that raised (a bug, not a failed scrape)
        self._ep_window = -1  # the window index of the last close_windows call
        if cfg.endpoints:
            from gpuledger.agent.scrape import EndpointScraper

            self.scraper = EndpointScraper(cfg.endpoints, http_get=http_get, window_s=cfg.window_s,
                                           start_us=self.windower.closed_until_us)

    def _session_start(self, start_us: int | None, boot_ms: int | None) -> int:
        """When this run begins watching the host (see the module docstring)."""
        if start_us is not None:  # replay, simulated fleet: the caller knows
            return int(start_us) // 1000
        w_us = int(round(self.cfg.window_s * 1e6))
        now_us = self.clock.now_us()
        fresh = (now_us // w_us * w_us) // 1000
        closed = self.spool.closed_until_ms
        if not closed or self.spool.stopped_ms or closed * 1000 > now_us:
            return fresh  # first run, after a stop on purpose, or a closed_until from a clock that was ahead
        boot = boot_ms if boot_ms is not None else boot_time_ms(self.cfg.proc_root)
        if boot is None or boot <= closed:
            return closed  # the host stayed up: the agent alone was down, and that time is unmonitored
        return min(boot, fresh)  # the host rebooted without a clean stop: up, unwatched, since its boot

    def step(self, now_us: int | None = None) -> None:
        now_us = self.clock.now_us() if now_us is None else now_us
        readings = self.source.poll(now_us)
        if readings.unhealthy:
            self.unhealthy_polls += 1
        self.windower.add(readings)
        closed = self.windower.close(now_us)
        if closed is not None and closed.n_windows:
            self._pending.append(closed)
            self.windows_sampled += closed.n_windows
            self.last_closed = closed
            self._closed_hook(closed)
        if self.scraper is not None and self._scrape_thread is None:
            self.scrape(now_us)
        if now_us - self._last_flush_us >= self.cfg.flush_s * 1e6:
            self.flush(now_us)

    # ------------------------------------------------------------------ endpoints
    def scrape(self, now_us: int | None = None) -> None:
        """Scrape the endpoints that are due and queue their closed windows (inline, or from the
        scrape thread: one caller at a time)."""
        if self.scraper is None:
            return
        now_us = self.clock.now_us() if now_us is None else now_us
        self.scraper.poll(now_us)
        window = now_us // self.scraper.window_us
        if window != self._ep_window:  # windows close only at a boundary: skip the empty tables between
            self._ep_window = window
            self._queue_endpoint(self.scraper.close_windows(now_us))

    def _queue_endpoint(self, table: pa.Table) -> None:
        if table.num_rows:
            with self._ep_lock:
                self._ep_pending.append(table)

    def _take_endpoint(self) -> pa.Table | None:
        with self._ep_lock:
            parts, self._ep_pending = self._ep_pending, []
        if not parts:
            return None
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def endpoint_stats(self) -> dict:
        """Per endpoint: scrapes_ok, scrapes_failed, resets, last_error ({} without endpoints)."""
        return self.scraper.stats() if self.scraper is not None else {}

    def start_scraping(self) -> None:
        """Scrape on a thread of its own from now on (`run()` does this); safe to call twice."""
        if self.scraper is None or self._scrape_thread is not None:
            return
        self._scrape_thread = threading.Thread(target=self._scrape_loop, name="gpuledger-scrape", daemon=True)
        self._scrape_thread.start()

    def _scrape_loop(self) -> None:
        tick = self.cfg.tick_s
        next_t = time.monotonic()
        while not self._scrape_stop.is_set():
            try:
                self.scrape()
            except Exception:  # a bug must not end scraping; failed scrapes are counted by the scraper
                self.scrape_failures += 1
                log.exception("endpoint scrape failed; continuing")
            next_t += tick
            delay = next_t - time.monotonic()
            if delay < 0:
                next_t = time.monotonic()
                delay = 0
            self._scrape_stop.wait(delay)

    def _stop_scraping(self) -> bool:
        """Stop the scrape thread; False if it is still inside a scrape (the scraper is then left alone)."""
        if self._scrape_thread is not None:
            self._scrape_stop.set()
            self._scrape_thread.join(timeout=max(5.0, 2 * max((e.timeout_s for e in self.cfg.endpoints), default=0)))
            if self._scrape_thread.is_alive():
                log.warning("endpoint scrape thread did not stop: the open endpoint windows are not closed")
                return False
        return True

    def flush(self, now_us: int | None = None) -> int | None:
        """Encode pending closed windows into one batch and append it to the spool."""
        now_us = self.clock.now_us() if now_us is None else now_us
        self._last_flush_us = now_us
        endpoint = self._take_endpoint()
        if not self._pending:
            if endpoint is not None:  # a batch needs GPU windows: these wait for the next one
                with self._ep_lock:
                    self._ep_pending.insert(0, endpoint)
            return None
        closed = merge_closed(self._pending)
        self._pending = []
        self.spool.note_windows([g.uuid for g in self.gpus], closed.start_ms, closed.end_ms)
        infos = gpu_infos(self.gpus, self.spool.first_windows)

        def encode(c: Closed) -> bytes:  # the seq is patched in at append time
            return encode_batch(self.agent_id, self.spool.epoch, 0, self.host, infos, c, self.spool.dropped_windows,
                                now_us // 1000, self.session_start_ms)

        extra = endpoint_part(endpoint)
        limit = max(self.cfg.max_batch_bytes // 2, self.cfg.max_batch_bytes - len(extra))
        seq = None
        for i, (payload, n_windows) in enumerate(encode_within(limit, closed, encode)):
            if i == 0 and extra:
                payload += extra  # the endpoint windows ride in the first batch
            try:
                seq = self.spool.append(with_seq(payload, self.spool.next_seq), n_windows, seq=self.spool.next_seq)
            except SpoolFull as e:
                log.error("spool full, %d windows dropped: %s", n_windows, e)
                continue
            self.batches_spooled += 1
        return seq

    def close(self) -> None:
        """Close the open window into the spool, then spool the stop batch (graceful shutdown: the run
        ends on purpose now); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        scraper_free = self._stop_scraping()
        now_us = self.clock.now_us()
        try:
            self.windower.add(self.source.poll(now_us))
        except Exception as e:  # the source may be the reason we stop
            log.warning("last poll failed: %s", e)
        closed = self.windower.close(now_us, final=True)
        if closed is not None and closed.n_windows:
            self._pending.append(closed)
            self.windows_sampled += closed.n_windows
            self.last_closed = closed
            self._closed_hook(closed)
        if self.scraper is not None and scraper_free:
            try:
                self.scraper.poll(now_us)
            except Exception as e:
                log.warning("last scrape failed: %s", e)
            self._queue_endpoint(self.scraper.close(now_us))
        self.flush(now_us)
        self.source.close()
        stopped_ms = max(now_us // 1000, self.session_start_ms)
        try:  # endpoint windows that found no GPU batch go with the stop batch
            self.spool.append(encode_stop(self.agent_id, self.spool.epoch, self.spool.next_seq, self.host,
                                          self.session_start_ms, stopped_ms, now_us // 1000)
                              + endpoint_part(self._take_endpoint()), 0, seq=self.spool.next_seq)
            self.batches_spooled += 1
            self.spool.mark_stopped(stopped_ms)
        except (SpoolFull, OSError) as e:  # then the collector sees silence, never idle time
            log.error("stop batch not spooled: %s", e)

    def _closed_hook(self, closed: Closed) -> None:
        if self.on_closed is not None:
            try:
                self.on_closed(closed)
            except Exception:  # metrics must never stop the pipeline
                log.exception("on_closed hook failed")

    def run(self, stop: threading.Event) -> None:
        """Real-time loop: one poll every tick_s until `stop` is set (endpoints scraped on their own thread)."""
        self.start_scraping()
        tick = self.cfg.tick_s
        next_t = time.monotonic()
        while not stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("agent step failed; continuing")
            next_t += tick
            delay = next_t - time.monotonic()
            if delay < 0:
                next_t = time.monotonic()
                delay = 0
            stop.wait(delay)
