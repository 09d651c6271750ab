"""The agent: source -> windows -> spool -> shipper, wired explicitly.

`Agent.step(now)` polls the source, folds the readings, closes finished windows and, every
`flush_s`, appends one encoded batch to the spool. The shipper sends from the spool on its own
thread. `Agent.close()` closes the open window too (its remaining time stays unmonitored), so
a SIGTERM loses nothing that was measured.
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
from gpuledger.schema import GPU_WINDOW_SCHEMA, PROC_WINDOW_SCHEMA, to_ipc
from gpuledger.v1 import telemetry_pb2 as pb

log = logging.getLogger(__name__)


def host_facts(cfg: AgentConfig, gpus: list[GpuFacts], physical_gpus: int = 0) -> pb.HostFacts:
    """Host facts; the priced GPU count is the config's, else the physical GPUs (MIG instances
    are not GPUs of their own for pricing)."""
    import socket

    return pb.HostFacts(host_id=cfg.host_id, hostname=socket.gethostname(), provider=cfg.provider,
                        region=cfg.region, instance_type=cfg.instance_type,
                        gpu_count=cfg.gpu_count or physical_gpus or len(gpus), tags={str(k): str(v) for k, v in cfg.tags.items()},
                        agent_version=__version__)


def gpu_infos(gpus: list[GpuFacts], first_windows: dict[str, int] | None = None) -> list[pb.GpuInfo]:
    first_windows = first_windows or {}
    return [pb.GpuInfo(uuid=g.uuid, index=g.index, name=g.name, mem_total_bytes=g.mem_total_bytes,
                       util_method=g.util_method, mig=g.mig, parent_uuid=g.parent_uuid, share=g.share,
                       first_window_ms=first_windows.get(g.uuid, 0))
            for g in gpus]


def process_infos(processes: list[ProcessIdentity]) -> list[pb.ProcessInfo]:
    return [pb.ProcessInfo(pid=p.pid, start_ms=p.start_ms, command=p.command[:256], container_id=p.container_id,
                           pod_uid=p.pod_uid, tags=dict(p.tags)) for p in processes]


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
                 closed: Closed, dropped_windows: int, sent_ms: int) -> bytes:
    msg = pb.WindowBatch(agent_id=agent_id, agent_epoch=epoch, seq=seq, host=host, gpus=gpus,
                         processes=process_infos(closed.processes),
                         gpu_windows_arrow=to_ipc(closed.gpu.cast(GPU_WINDOW_SCHEMA)),
                         proc_windows_arrow=to_ipc(closed.proc.cast(PROC_WINDOW_SCHEMA)),
                         dropped_windows=dropped_windows, sent_ms=sent_ms)
    return msg.SerializeToString()


class Agent:
    def __init__(self, cfg: AgentConfig, source: GpuSource, clock: Clock, spool: Spool,
                 start_us: int | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.clock = clock
        self.spool = spool
        self.gpus = source.gpus()
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
        self.host = host_facts(cfg, self.gpus, getattr(source, "physical_gpu_count", 0))
        self.agent_id = cfg.host_id
        self._pending: list[Closed] = []
        self._last_flush_us = clock.now_us()
        self.windows_sampled = 0
        self.batches_spooled = 0
        self.unhealthy_polls = 0
        self.last_closed: Closed | None = None  # the windows closed by the latest step (per-GPU metrics read it)
        self._closed = False

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
        if now_us - self._last_flush_us >= self.cfg.flush_s * 1e6:
            self.flush(now_us)

    def flush(self, now_us: int | None = None) -> int | None:
        """Encode pending closed windows into one batch and append it to the spool."""
        now_us = self.clock.now_us() if now_us is None else now_us
        self._last_flush_us = now_us
        if not self._pending:
            return None
        closed = merge_closed(self._pending)
        self._pending = []
        seq = self.spool.next_seq
        self.spool.note_windows([g.uuid for g in self.gpus], closed.start_ms, closed.end_ms)
        payload = encode_batch(self.agent_id, self.spool.epoch, seq, self.host,
                               gpu_infos(self.gpus, self.spool.first_windows), closed, self.spool.dropped_windows,
                               now_us // 1000)
        try:
            seq = self.spool.append(payload, closed.n_windows, seq=seq)
        except SpoolFull as e:
            log.error("spool full, %d windows dropped: %s", closed.n_windows, e)
            return None
        self.batches_spooled += 1
        return seq

    def close(self) -> None:
        """Close the open window into the spool (graceful shutdown); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        now_us = self.clock.now_us()
        try:
            self.windower.add(self.source.poll(now_us))
        except Exception as e:  # the source may be the reason we stop
            log.warning("last poll failed: %s", e)
        closed = self.windower.close(now_us, final=True)
        if closed is not None and closed.n_windows:
            self._pending.append(closed)
            self.windows_sampled += closed.n_windows
        self.flush(now_us)
        self.source.close()

    def run(self, stop: threading.Event) -> None:
        """Real-time loop: one poll every tick_s until `stop` is set."""
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
