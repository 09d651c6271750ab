"""The tables of one group commit, built from validated batches (the writer's first stage)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gpuledger.collector.validate import Valid, window_grids

HOUR_MS = 3_600_000
NEVER = np.iinfo(np.int64).max  # "no value" of a min() aggregate
PROCESS_REFRESH_MS = 600_000  # a process's facts row is rewritten this often while it runs (its last_seen_ms)
_TAGS = pa.map_(pa.string(), pa.string())


def _table(rows: list[tuple], names: list[str], types: list[pa.DataType]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in names]
    return pa.table({n: pa.array(c, t) for n, c, t in zip(names, cols, types, strict=True)})


def _host_col(host_id: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(host_id, pa.string()), n)


def hours_touched(v: Valid) -> set[int]:
    out: set[int] = set()
    for t in (v.gpu, v.endpoint):
        if t.num_rows:
            s = t.column("window_start_ms").to_numpy()
            out.update((np.unique(s // HOUR_MS) * HOUR_MS).tolist())
    return out


def build(items: list[Valid], now_ms: int, mark_us: int, known: dict) -> dict[str, pa.Table]:
    """Tables of one group commit. `known` caches host and GPU facts already stored by this process, so
    they are written only when new or changed (a GPU's first window moving earlier)."""
    gpu_parts, proc_parts, ep_parts = [], [], []
    hosts, gpus, procs, batches, sessions, marks = [], [], [], [], [], set()
    for v in items:
        b = v.batch
        host_id = b.host.host_id
        if v.gpu.num_rows:
            gpu_parts.append(v.gpu.add_column(0, "host_id", _host_col(host_id, v.gpu.num_rows)))
        if v.proc.num_rows:
            proc_parts.append(v.proc.add_column(0, "host_id", _host_col(host_id, v.proc.num_rows)))
        if v.endpoint.num_rows:
            ep_parts.append(v.endpoint.add_column(0, "host_id", _host_col(host_id, v.endpoint.num_rows)))
        h = b.host
        facts = h.SerializeToString(deterministic=True)
        if known.get(("host", host_id)) != facts:
            known[("host", host_id)] = facts
            hosts.append((host_id, h.hostname, h.provider, h.region, h.instance_type, h.gpu_count,
                          list(h.tags.items()), h.agent_version, now_ms, h.instance_id))
        declared = v.declared_first or {}
        for g in b.gpus:
            if g.uuid not in v.first_window_ms:
                continue  # declared but no window in this batch
            first = v.first_window_ms[g.uuid]
            if 0 < declared.get(g.uuid, 0) < first:  # time before the first stored window: dropped or lost
                first = declared[g.uuid]
            prev = known.get(("gpu", host_id, g.uuid))
            if prev is None or first < prev:
                known[("gpu", host_id, g.uuid)] = first
                gpus.append((host_id, g.uuid, g.index, g.name, g.mem_total_bytes, g.util_method, g.mig, first,
                             g.parent_uuid, g.share or 1.0))
        for p in b.processes:  # written when new or changed, and then every PROCESS_REFRESH_MS (last_seen_ms)
            facts = p.SerializeToString(deterministic=True)
            seen = known.get(("proc", host_id, p.pid, p.start_ms))
            if seen is None or seen[0] != facts or now_ms - seen[1] >= PROCESS_REFRESH_MS:
                known[("proc", host_id, p.pid, p.start_ms)] = (facts, now_ms)
                procs.append((host_id, p.pid, p.start_ms, p.command, p.container_id, p.pod_uid,
                              list(p.tags.items()), now_ms))
        batches.append((b.agent_id, host_id, b.agent_epoch, b.seq, now_ms, v.gpu.num_rows, v.proc.num_rows,
                        b.dropped_windows))
        session = v.session_start_ms if v.session_start_ms is not None else b.session_start_ms
        for (g, w), (starts, _) in window_grids(v).items():
            decl = declared.get(g, 0)
            sessions.append((host_id, b.agent_epoch, session, g, w, int(starts[0]), int(starts[-1]) + w,
                             decl if decl > 0 else NEVER, 0, now_ms, 0))
        sessions.append((host_id, b.agent_epoch, session, "", 0, NEVER, 0, NEVER, b.stopped_ms, now_ms,
                         b.dropped_windows))
        marks.update((host_id, hour) for hour in hours_touched(v))
    mark_rows = sorted(marks)
    marks_t = _table([(h, hr, mark_us) for h, hr in mark_rows], ["host_id", "hour_ms", "mark_us"],
                     [pa.string(), pa.int64(), pa.int64()])
    return {
        "rollup_marks": marks_t,
        "gpu_windows": pa.concat_tables(gpu_parts).combine_chunks() if gpu_parts else None,
        "proc_windows": pa.concat_tables(proc_parts).combine_chunks() if proc_parts else None,
        "endpoint_windows": pa.concat_tables(ep_parts).combine_chunks() if ep_parts else None,
        "hosts": _table(hosts, ["host_id", "hostname", "provider", "region", "instance_type", "gpu_count", "tags",
                                "agent_version", "updated_ms", "instance_id"],
                        [pa.string()] * 5 + [pa.uint32(), _TAGS, pa.string(), pa.int64(), pa.string()]),
        "gpus": _table(gpus, ["host_id", "uuid", "gpu_index", "name", "mem_total_bytes", "util_method", "mig",
                              "first_window_ms", "parent_uuid", "share"],
                       [pa.string(), pa.string(), pa.uint32(), pa.string(), pa.uint64(), pa.string(), pa.bool_(),
                        pa.int64(), pa.string(), pa.float32()]),
        "processes": _table(procs, ["host_id", "pid", "start_ms", "command", "container_id", "pod_uid", "tags",
                                    "last_seen_ms"],
                            [pa.string(), pa.uint32(), pa.int64(), pa.string(), pa.string(), pa.string(), _TAGS,
                             pa.int64()]),
        "sessions": _table(sessions, ["host_id", "agent_epoch", "session_start_ms", "gpu_uuid", "window_ms",
                                      "first_window_ms", "last_end_ms", "declared_first_ms", "stopped_ms",
                                      "received_ms", "dropped_windows"],
                           [pa.string(), pa.uint64(), pa.int64(), pa.string(), pa.uint32()] + [pa.int64()] * 5
                           + [pa.uint64()]),
        "agent_batches": _table(batches, ["agent_id", "host_id", "agent_epoch", "seq", "received_ms", "windows",
                                          "proc_windows", "dropped_windows"],
                                [pa.string(), pa.string(), pa.uint64(), pa.uint64(), pa.int64(), pa.uint32(),
                                 pa.uint32(), pa.uint64()]),
    }
