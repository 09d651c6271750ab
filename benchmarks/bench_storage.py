"""Stored bytes per GPU-window in ClickHouse after a simulated day (from system.parts).

A simulated fleet (8 hosts, 38 GPUs, 10 s windows) runs a day through the real pipeline into
a fresh embedded store; the parts are merged (OPTIMIZE FINAL) and their compressed size is
read from system.parts and system.parts_columns. Result: one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpuledger.demo import run_fleet, start_embedded_collector  # noqa: E402


def main(hosts: int = 8, hours: float = 24.0) -> dict:
    root = Path(tempfile.mkdtemp(prefix="gl-storage-"))
    collector = start_embedded_collector(root)
    try:
        run = run_fleet(collector.address, root / "spool", hosts, hours, tick_s=300, flush_s=600)
    finally:
        collector.stop()
    store = collector.store
    out = {"bench": "stored_bytes", "hosts": hosts, "hours": hours}
    for table in ("gpu_windows", "proc_windows"):
        store.optimize(table)
        rows, comp, unc = store.stored_bytes(table)
        out[f"{table}_rows"] = rows
        out[f"{table}_bytes_per_row"] = comp / rows if rows else None
        out[f"{table}_compression_ratio"] = unc / comp if comp else None
    cols = store.query_rows(
        "SELECT column, sum(column_data_compressed_bytes) AS c FROM system.parts_columns "
        "WHERE database = 'gpuledger' AND table = 'gpu_windows' AND active GROUP BY column ORDER BY c DESC LIMIT 6")
    out["top_columns_bytes_per_row"] = {c: round(b / out["gpu_windows_rows"], 3) for c, b in cols}
    out["windows_sampled"] = sum(a.windows_sampled for a in run.agents)
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    store.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
