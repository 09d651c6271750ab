"""The HTML report of a month of 1,000 GPUs: page weight and time to draw in headless Chromium.

Goal: under 5 MB, and every chart drawn within 5 s of navigation (the page's own clock:
performance.now() when the last chart resolved), with no console error.

The rows are synthetic, shaped and sized like the collector's reports for 125 hosts x 8 GPUs over 720
hours (benchmarks/bench_reports.py's fleet loader was not on main when this was written; the page
builder takes report rows, so the figures here are the page's cost alone, not the collector's):
idle by host (125 rows), cost by team / project / phase, the FOCUS export aggregated per day and Tags
value, and the heat map at the layout the page picks for that fleet (host x 6 h: 15,000 cells).
For comparison it also sizes the data of a GPU x hour map (720,000 cells) that the page does not draw.

    .venv/bin/python benchmarks/bench_html.py
    .venv/bin/python benchmarks/bench_html.py --gpus 2000 --hours 720 --keep report.html
Prints one line of JSON; exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from gpuledger.report import html as page  # noqa: E402
from gpuledger.report.browser import Browser, check_page, find_chromium  # noqa: E402

HOUR_MS = 3_600_000
TEAMS = ["research", "search", "vision", "platform", "ads"]
PROJECTS = [f"project-{i:02d}" for i in range(12)]
PHASES = ["experiment", "training", "production"]
TYPES = [("aws", "us-east-1", "p5.48xlarge", 98.32), ("aws", "us-east-1", "p4d.24xlarge", 32.77),
         ("gcp", "us-central1", "a3-highgpu-8g", 88.25), ("azure", "eastus", "Standard_ND96asr_v4", 27.20)]


def synthetic(gpus: int, hours: int, seed: int = 3) -> page.ReportData:
    rng = np.random.default_rng(seed)
    hosts = math.ceil(gpus / 8)
    since = 1_793_491_200_000  # 2026-11-01T00:00Z
    until = since + hours * HOUR_MS
    data = page.ReportData(since, until, "synthetic", until)
    data.pricing_sources = ["public on-demand list prices (synthetic benchmark)"]
    idle = []
    for h in range(hosts):
        prov, region, itype, hourly = TYPES[h % len(TYPES)]
        n = min(8, gpus - 8 * h)
        gh = n * hours
        act, held = rng.uniform(0.1, 0.8), rng.uniform(0.05, 0.3)
        free = max(0.0, 1 - act - held - 0.01)
        per = hourly / 8
        row = {"host": f"gpu-node-{h:04d}", "provider": prov, "region": region, "instance_type": itype, "gpus": n,
               "state": "live", "gpu_hours": float(gh), "active_hours": gh * act, "idle_held_hours": gh * held,
               "idle_free_hours": gh * free, "unmonitored_hours": gh * 0.01, "mean_util_pct": 100 * act / 0.99,
               "cost": gh * per, "active_cost": gh * act * per, "idle_held_cost": gh * held * per,
               "idle_free_cost": gh * free * per, "unmonitored_cost": gh * 0.01 * per,
               "currency": "USD", "price_method": "instance_price/gpu_count"}
        row["idle_cost"] = row["idle_held_cost"] + row["idle_free_cost"]
        row["idle_share"] = row["idle_cost"] / row["cost"]
        idle.append(row)
    idle.sort(key=lambda r: -r["idle_cost"])
    data.idle = idle
    for dim, labels in (("team", TEAMS), ("project", PROJECTS), ("phase", PHASES)):
        w = rng.dirichlet(np.ones(len(labels)))
        total = sum(r["cost"] for r in idle)
        data.cost[dim] = [{dim: lbl, "gpu_hours": gpus * hours * x, "cost": total * x, "active_cost": total * x * .4,
                           "idle_held_cost": total * x * .3, "idle_free_cost": total * x * .29,
                           "unmonitored_cost": total * x * .01, "idle_share": .59} for lbl, x in zip(labels, w, strict=True)]
        for d in range(math.ceil(hours / 24)):
            for lbl, x in zip(labels, w, strict=True):
                c = total * x / (hours / 24) * rng.uniform(0.8, 1.2)
                data.spend.append({"period_ms": since + d * 86_400_000, "dimension": dim, "label": lbl, "cost": c,
                                   "active": c * .4, "idle_held": c * .3, "idle_free": c * .29,
                                   "unmonitored": c * .01, "gpu_hours": 0.0})
    data.spend_granularity = "day"
    data.heat_by, data.heat_step_hours = page.heat_layout(gpus, hosts, since, until)
    step = data.heat_step_hours * HOUR_MS
    for r in idle:
        n = r["gpus"]
        util = rng.uniform(0, 100, math.ceil(hours / data.heat_step_hours))
        for i, u in enumerate(util):
            a = since + i * step
            ms = n * (min(until, a + step) - a)
            data.heat.append({"host": r["host"], "gpus": n, "start_ms": a, "end_ms": min(until, a + step),
                              "active_ms": ms * u / 100, "idle_held_ms": ms * (1 - u / 100) / 2,
                              "idle_free_ms": ms * (1 - u / 100) / 2, "unmonitored_ms": 0.0,
                              "util_pct": None if i % 97 == 0 else float(u)})
    data.optional = {"endpoints": page.Section(None, "not available on this collector (synthetic)"),
                     "baseline": page.Section(None, "not available on this collector (synthetic)")}
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=1000)
    ap.add_argument("--hours", type=int, default=720)
    ap.add_argument("--keep", help="also write the page here")
    args = ap.parse_args()
    data = synthetic(args.gpus, args.hours)
    page.vega_bundle()  # built once per process (vl-convert bundles it in about 3 s): not the page's cost
    t0 = time.perf_counter()
    html = page.render(data)
    render_s = time.perf_counter() - t0
    size = len(html.encode())
    full_bytes = len(json.dumps(page._columnar(
        [{"row": f"gpu-node-{i // 8:04d} / GPU {i % 8}", "start_ms": 1_793_491_200_000 + h * HOUR_MS,
          "end_ms": 1_793_491_200_000 + (h + 1) * HOUR_MS, "util_pct": 42.5, "idle_held_ms": 1_000_000,
          "idle_free_ms": 1_000_000, "unmonitored_ms": 0} for i in range(min(args.gpus, 50)) for h in range(args.hours)],
        ["row", "start_ms", "end_ms", "util_pct", "idle_held_ms", "idle_free_ms", "unmonitored_ms"]),
        separators=(",", ":"))) * max(1, args.gpus // 50)
    result = {"bench": "html_report", "gpus": args.gpus, "hours": args.hours, "heat_by": data.heat_by,
              "heat_step_hours": data.heat_step_hours, "heat_cells": len(data.heat), "page_bytes": size,
              "page_mb": round(size / 1e6, 2), "vega_bundle_bytes": len(page.vega_bundle()),
              "gpu_x_hour_data_bytes_not_drawn": full_bytes, "python_render_s": round(render_s, 3),
              "machine": platform.machine(), "python": platform.python_version()}
    ok = size < 5_000_000
    if find_chromium() is None:
        result["chromium"] = "not installed: no drawing time"
    else:
        with tempfile.TemporaryDirectory() as d:
            path = Path(args.keep or Path(d) / "report.html")
            path.write_text(html, encoding="utf-8")
            with Browser() as b:
                runs = [check_page(b, path) for _ in range(3)]
            result["chromium"] = b.version.get("product", "")
            result["drawn_s"] = [round(r.drawn_ms / 1000, 2) for r in runs]
            result["blank_charts"] = runs[-1].blank_charts
            result["errors"] = runs[-1].errors[:5]
            ok = ok and max(r.drawn_ms for r in runs) < 5000 and not runs[-1].blank_charts and not runs[-1].errors
    result["goal"] = "page < 5 MB, every chart drawn < 5 s after navigation, no console error"
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
