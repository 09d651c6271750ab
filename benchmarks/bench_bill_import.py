"""Bill import throughput and memory: a 10-million-row FOCUS Parquet file through gpuledger's reader.

1. Generates benchmarks/out/focus-bench-<rows>.parquet once, streaming (one ParquetWriter, batches of
   100 000 rows, never the whole table in memory): 24 FOCUS 1.2 columns, hourly charges of a fleet
   (instances, storage, network, an AI service, credits), AWS-style x_UsageType, Tags drawn from a
   few hundred tag sets, as a real month of a large account repeats them.
2. Reference: a bare `pyarrow.parquet.ParquetFile.iter_batches` over the same columns, touching
   every batch (what any reader must pay to decode the file).
3. gpuledger: `read_bills(...)` iterated to the end: normalized chunks, GPU catalog matching, tags
   parsed into maps, slice keys.
Each runs in its own process, so each peak RSS (ru_maxrss) is its own. Result: one JSON line with
rows/s of both, their ratio, and both peaks.

    python benchmarks/bench_bill_import.py [--rows 10000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

BATCH = 100_000
HOUR_MS = 3_600_000
START_MS = 1_793_491_200_000  # 2026-11-01T00:00Z


def generate(path: Path, rows: int, seed: int = 7) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    kinds = [  # (x_UsageType, ServiceName, ServiceCategory, ChargeDescription, unit, hourly)
        ("USE1-BoxUsage:p5.48xlarge", "Amazon Elastic Compute Cloud", "Compute", "p5.48xlarge Instance Hour", 55.04),
        ("USE1-BoxUsage:p4d.24xlarge", "Amazon Elastic Compute Cloud", "Compute", "p4d.24xlarge Instance Hour",
         21.957642),
        ("USE1-BoxUsage:g5.12xlarge", "Amazon Elastic Compute Cloud", "Compute", "g5.12xlarge Instance Hour", 5.672),
        ("USE1-BoxUsage:m6i.2xlarge", "Amazon Elastic Compute Cloud", "Compute", "m6i.2xlarge Instance Hour", 0.384),
        ("USE1-TimedStorage-ByteHrs", "Amazon Simple Storage Service", "Storage", "GB-Month of storage", 0.023),
        ("USE1-DataTransfer-Out-Bytes", "AWS Data Transfer", "Networking", "GB data transfer out", 0.09),
        ("USE1-Host:ml.g5.xlarge", "Amazon SageMaker", "AI and Machine Learning", "ml.g5.xlarge hour", 1.408),
    ]
    teams = ["research", "search", "vision", "platform", "ads", "infra"]
    phases = ["pretrain", "finetune", "eval", "serve", None]
    tag_sets = []
    for i in range(400):
        t = {"team": teams[i % len(teams)], "cost_center": f"cc-{1000 + i % 37}", "env": ["prod", "dev"][i % 2]}
        if phases[i % len(phases)]:
            t["phase"] = phases[i % len(phases)]
        tag_sets.append(json.dumps(t))
    schema = pa.schema([
        ("BillingAccountId", pa.string()), ("SubAccountId", pa.string()), ("ProviderName", pa.string()),
        ("BillingPeriodStart", pa.timestamp("ms", tz="UTC")), ("ChargePeriodStart", pa.timestamp("ms", tz="UTC")),
        ("ChargePeriodEnd", pa.timestamp("ms", tz="UTC")), ("ChargeCategory", pa.string()),
        ("ChargeClass", pa.string()), ("ChargeDescription", pa.string()), ("ServiceCategory", pa.string()),
        ("ServiceName", pa.string()), ("SkuId", pa.string()), ("x_UsageType", pa.string()),
        ("ResourceId", pa.string()), ("RegionId", pa.string()), ("BilledCost", pa.float64()),
        ("EffectiveCost", pa.float64()), ("ListCost", pa.float64()), ("BillingCurrency", pa.string()),
        ("ConsumedQuantity", pa.float64()), ("ConsumedUnit", pa.string()), ("PricingQuantity", pa.float64()),
        ("PricingUnit", pa.string()), ("Tags", pa.string()),
    ])
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
        done = 0
        while done < rows:
            n = min(BATCH, rows - done)
            k = rng.integers(0, len(kinds), n)
            hour = (np.arange(done, done + n) // 3000) % 720
            res = rng.integers(0, 20_000, n)
            qty = np.where(k < 4, 1.0, np.round(rng.uniform(0.1, 50, n), 4))
            price = np.array([kinds[i][4] for i in range(len(kinds))])[k]
            billed = np.round(qty * price, 8)
            credit = rng.random(n) < 0.001
            billed = np.where(credit, -np.round(rng.uniform(1, 100, n), 2), billed)
            cat = np.where(credit, "Credit", "Usage")
            start = START_MS + hour * HOUR_MS
            ut = np.array([x[0] for x in kinds], dtype=object)[k]
            batch = pa.record_batch([
                pa.array(["111122223333"] * n), pa.array([f"4444555566{i % 10:02d}" for i in res]),
                pa.array(["AWS"] * n), pa.array(np.full(n, START_MS), pa.timestamp("ms", tz="UTC")),
                pa.array(start, pa.timestamp("ms", tz="UTC")), pa.array(start + HOUR_MS, pa.timestamp("ms", tz="UTC")),
                pa.array(cat), pa.nulls(n, pa.string()),
                pa.array(np.array([x[3] for x in kinds], dtype=object)[k]),
                pa.array(np.array([x[2] for x in kinds], dtype=object)[k]),
                pa.array(np.array([x[1] for x in kinds], dtype=object)[k]),
                pa.array([f"SKU{i:03d}" for i in k]), pa.array(ut), pa.array([f"i-0{r:016x}" for r in res]),
                pa.array(["us-east-1"] * n), pa.array(billed), pa.array(np.round(billed * 0.72, 8)), pa.array(billed),
                pa.array(["USD"] * n), pa.array(qty), pa.array(["Hours"] * n), pa.array(qty),
                pa.array(["Hours"] * n), pa.array(np.array(tag_sets, dtype=object)[res % len(tag_sets)]),
            ], schema=schema)
            w.write_batch(batch, row_group_size=BATCH)
            done += n
    tmp.rename(path)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_reference(path: str) -> dict:
    import pyarrow.parquet as pq

    from gpuledger.collector.bills import FOCUS_COLUMNS

    pf = pq.ParquetFile(path)
    cols = [c for c in pf.schema_arrow.names if any(c in v for v in FOCUS_COLUMNS.values())]
    t0 = time.perf_counter()
    rows = 0
    for batch in pf.iter_batches(batch_size=65_536, columns=cols):
        rows += batch.num_rows
    return {"rows": rows, "seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_mib()}


def run_gpuledger(path: str) -> dict:
    from gpuledger.collector.bills import read_bills

    t0 = time.perf_counter()
    reader = read_bills(path)
    rows = gpu = 0
    for chunk in reader:
        rows += chunk.table.num_rows
        gpu += chunk.table["is_gpu_instance"].true_count if hasattr(chunk.table["is_gpu_instance"], "true_count") \
            else int(chunk.table["is_gpu_instance"].to_numpy(zero_copy_only=False).sum())
    return {"rows": rows, "seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_mib(), "gpu_rows": gpu,
            "refused": reader.refused, "slices": len(reader.slices)}


def main(rows: int) -> dict:
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"focus-bench-{rows}.parquet"
    if not path.exists():
        t0 = time.perf_counter()
        generate(path, rows)
        gen_s = time.perf_counter() - t0
    else:
        gen_s = None
    res = {}
    for which in ("reference", "gpuledger"):
        proc = subprocess.run([sys.executable, __file__, "--child", which, str(path)], capture_output=True,
                              text=True, check=True)
        res[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, ours = res["reference"], res["gpuledger"]
    return {
        "bench": "bill_import", "rows": rows, "file_mib": round(path.stat().st_size / 2**20, 1),
        "generate_s": round(gen_s, 1) if gen_s else None,
        "reference_rows_per_s": round(ref["rows"] / ref["seconds"]),
        "gpuledger_rows_per_s": round(ours["rows"] / ours["seconds"]),
        "ratio_gpuledger_to_reference": round((ours["rows"] / ours["seconds"]) / (ref["rows"] / ref["seconds"]), 4),
        "reference_peak_rss_mib": round(ref["peak_rss_mib"]), "gpuledger_peak_rss_mib": round(ours["peak_rss_mib"]),
        "gpu_rows": ours["gpu_rows"], "refused": ours["refused"], "slices": ours["slices"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        fn = run_reference if args.child[0] == "reference" else run_gpuledger
        print(json.dumps(fn(args.child[1])))
    else:
        print(json.dumps(main(args.rows)))
