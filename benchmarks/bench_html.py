"""The HTML report of a month of 1,000 GPUs: page weight and time to draw in headless Chromium.

Goal: under 5 MB, and every chart drawn within 5 s of navigation (the page's own clock:
performance.now() when the last chart resolved), with no console error.

The rows are synthetic, shaped and sized like the collector's reports for 125 hosts x 8 GPUs over 720
hours (benchmarks/bench_reports.py's fleet loader was not on main when this was written; the page
builder takes report rows, so the figures here are the page's cost alone, not the collector's):
idle by host (125 rows), cost by team / project / phase, the FOCUS export aggregated per day and Tags
value, the heat map at the layout the page picks for that fleet (host x 6 h: 15,000 cells), the endpoints
report (63 endpoints, one per two hosts, every column) and a baseline document of that fleet (130 billed GPU
instances, 63 endpoints, the untagged top ten).
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
    endpoints = synthetic_endpoints(rng, idle, hours)
    doc = synthetic_baseline(rng, idle, endpoints, since, until)
    data.optional = {"endpoints": page.Section(endpoints, ""),
                     "baseline": page.Section([{"document": json.dumps(doc), "currency": "USD"}], "")}
    return data


def synthetic_endpoints(rng, idle: list[dict], hours: int, every: int = 2) -> list[dict]:
    """One endpoint per `every` hosts (63 for 125 hosts), with every column of collector/endpoints.py endpoint_row;
    one in ten a development endpoint that idles and is flagged."""
    rows = []
    for i, h in enumerate(idle[::every]):
        dev = i % 10 == 3
        up = float(hours) * (1.0 if dev else rng.uniform(0.6, 1.0))
        serving = up * (0.1 if dev else rng.uniform(0.4, 0.99))
        unknown = up * rng.uniform(0, 0.02)
        idle_h = up - serving - unknown
        gpus = int(rng.integers(1, h["gpus"] + 1))
        per = h["cost"] / h["gpu_hours"]
        cost = up * gpus * per
        requests = 0 if i % 7 == 5 else int(serving * 3600 * rng.uniform(0.5, 20))
        prompt, gen = requests * int(rng.integers(200, 900)), requests * int(rng.integers(50, 400))
        saving = cost * idle_h / up * 0.8
        flag = (f"always_on_dev: development endpoint up 24.0 h/day, serving {24 * serving / up:.1f} h/day; "
                f"scale-to-zero after 15 min would have saved {saving:,.2f} USD (41 cold starts), office hours "
                f"(mon,tue,wed,thu,fri 08:00-18:00 UTC) {cost * 0.7:,.2f} USD") if dev else ""
        rows.append({
            "endpoint": f"{'dev-' if dev else ''}model-{i:03d}", "phase": "development" if dev else "production",
            "server": "" if requests == 0 else "vllm", "hosts": 1,
            "counters": "none (serving: GPU busy >= 5 %)" if requests == 0 else "scraped",
            "up_hours": up, "serving_hours": serving, "idle_hours": idle_h, "unknown_hours": unknown,
            "idle_share": idle_h / up, "requests": requests, "prompt_tokens": prompt, "generation_tokens": gen,
            "scrape_errors": int(rng.integers(0, 5)), "gpu_hours": up * gpus, "active_hours": serving * gpus * 0.6,
            "idle_held_hours": up * gpus - serving * gpus * 0.6, "cost": cost, "idle_cost": cost * idle_h / up,
            "currency": "USD", "cost_per_1k_requests": cost / requests * 1000 if requests else None,
            "cost_per_million_tokens": cost / (prompt + gen) * 1e6 if requests else None,
            "scale_to_zero_saving": saving, "scale_to_zero_down_hours": idle_h * 0.8, "cold_starts": 41 if dev else 3,
            "office_hours_saving": cost * 0.7, "requests_outside_hours": requests // 2, "flag": flag})
    rows.sort(key=lambda r: (not r["flag"], -r["cost"], r["endpoint"]))
    return rows


def synthetic_baseline(rng, idle: list[dict], endpoints: list[dict], since: int, until: int) -> dict:
    """A baseline document (collector/baseline.py baseline_document) of the same fleet: every host a billed
    instance, five more no agent reports, the untagged top ten, every endpoint."""
    iso = lambda ms: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))  # noqa: E731
    gpu = sum(r["cost"] for r in idle)
    hours = (until - since) / HOUR_MS
    unwatched = [{"resource_id": f"i-0{rng.integers(1 << 60):015x}", "host": None, "instance_type": "p5.48xlarge",
                  "gpus": 8, "cost": 98.32 * hours, "billed_gpu_hours": 8 * hours, "monitored_gpu_hours": 0.0,
                  "coverage": 0.0, "price_per_instance_hour": 98.32} for _ in range(5)]
    watched = [{"resource_id": f"i-0{rng.integers(1 << 60):015x}", "host": r["host"],
                "instance_type": r["instance_type"], "gpus": r["gpus"], "cost": r["cost"],
                "billed_gpu_hours": r["gpu_hours"],
                "monitored_gpu_hours": r["gpu_hours"] - r["unmonitored_hours"],
                "coverage": 1 - r["unmonitored_hours"] / r["gpu_hours"],
                "price_per_instance_hour": r["cost"] / r["gpu_hours"] * r["gpus"]} for r in idle]
    unwatched_cost = sum(u["cost"] for u in unwatched)
    gpu_cost, services, api = gpu + unwatched_cost, gpu * 0.04, gpu * 0.02
    total = (gpu_cost + services + api) / 0.62
    ai = gpu_cost + services + api
    wl = {"training": ai * .38, "fine-tuning": ai * .07, "inference": ai * .21, "embedding": ai * .01,
          "development": ai * .13, "unclassified": ai * .20}
    util = 61.4
    up = sum(r["gpu_hours"] for r in endpoints)
    serving = sum(r["serving_hours"] / r["up_hours"] * r["gpu_hours"] for r in endpoints)
    q = [
        {"id": "ai_spend", "question": "What do we spend on AI, and what share of the cloud bill is it?",
         "answer": {"total_cloud_cost": total, "ai_cost": ai, "ai_share": ai / total, "gpu_instance_cost": gpu_cost,
                    "ai_service_cost": services, "api_cost": api, "unbilled_gpu_cost": 0.0},
         "method": "bill rows in the range (effective cost, prorated by charge period), sorted into GPU instances, AI "
                   "services and the rest; plus API spend; plus the telemetry cost of GPU hosts no bill covers",
         "rests_on": ["1,843,221 bill rows from cur-2026-11.parquet", "14 API spend groups (openai, anthropic)",
                      f"telemetry of {len(idle)} host(s) (bill_effective/gpu_count)"],
         "covers": f"the bill's rows from {iso(since)} to {iso(until)}", "coverage_share": 1.0, "flags": []},
        {"id": "gpu_monitoring", "question": "How much of the GPU spend do agents watch?",
         "answer": {"monitored_share": gpu / gpu_cost * 0.99, "unwatched_gpu_cost": unwatched_cost,
                    "unwatched_gpu_instances": [u["resource_id"] for u in unwatched]},
         "method": "GPU instances of the bill matched to agents by instance id (or a gpuledger_host tag); each "
                   "weighted by its cost and its monitored / billed GPU-hours",
         "rests_on": ["1,843,221 bill rows from cur-2026-11.parquet",
                      f"{len(watched)} of {len(watched) + len(unwatched)} billed GPU instance(s) matched to agents"],
         "covers": "the GPU instances in the bill", "coverage_share": gpu / gpu_cost * 0.99,
         "flags": [f"{len(unwatched)} GPU instance(s) in the bill report to no agent ({unwatched_cost:,.2f} USD)"]},
        {"id": "training_vs_inference", "question": "What does training cost against inference?",
         "answer": {"training_cost": wl["training"] + wl["fine-tuning"], "inference_cost": wl["inference"],
                    "training_to_inference": (wl["training"] + wl["fine-tuning"]) / wl["inference"],
                    "cost_per_successful_deployment": (wl["training"] + wl["fine-tuning"]) / 7,
                    "cost_per_successful_deployment_reason": None},
         "method": "every cost classified by tags (process workload, phase; host workload, phase; bill workload, "
                   "phase; API spend by model); training = training + fine-tuning",
         "rests_on": ["API spend", "bill tags", "telemetry"],
         "covers": "80.0% of AI cost classified; the rest is unclassified", "coverage_share": 0.8, "flags": []},
        {"id": "training_utilization", "question": "How busy are the GPUs while they train?",
         "answer": {"training_util_pct": util},
         "method": "active GPU time / monitored GPU time of everything classified training or fine-tuning",
         "rests_on": [f"telemetry: {sum(r['gpu_hours'] for r in idle) * 0.4:,.1f} monitored training GPU-hours"],
         "covers": "training on watched GPUs; training on unwatched instances or services has no utilization",
         "coverage_share": 0.93, "flags": [f"training GPUs {util:.0f} % active (below 70 %)"]},
        {"id": "endpoint_idle", "question": "Do inference endpoints serve, or hold GPUs idle?",
         "answer": {"endpoint_up_hours": up, "endpoint_serving_hours": serving,
                    "endpoint_idle_share": 1 - serving / up},
         "method": "GPU time of processes with the endpoint tag (up); serving where the inference server counted "
                   "requests in the window, else where the process was active at least 5% of its GPU time",
         "rests_on": [f"{len(endpoints)} endpoint(s) in the telemetry",
                      f"{up * 0.8:,.1f} of {up:,.1f} up GPU-hours with the server's request counts"],
         "covers": "endpoints on watched GPUs that carry the endpoint tag", "coverage_share": 0.8, "flags": []},
    ]
    doc = {"since": iso(since), "until": iso(until), "cost_basis": "effective", "currency": "USD"}
    for question in q:
        doc.update(question["answer"])
    untagged = sorted(idle, key=lambda r: -r["idle_free_cost"])[:10]
    doc.update({
        "questions": q, "flags": [f for question in q for f in question["flags"]],
        "missing": ["no AI API spend imported for 2026-11-01 to 2026-11-03 (gpuledger api-spend import)"],
        "workload_costs": wl, "unclassified_share": 0.2,
        "untagged_share": {"gpu_cost": {"team": 0.02, "project": 0.31, "phase": 0.44},
                           "bill_cost": {"team": 0.12, "project": 0.57, "phase": 0.93}},
        "untagged_top": [{"host": r["host"], "process": None, "cost": r["idle_free_cost"],
                          "missing": ["project", "phase"]} for r in untagged],
        "instances": watched + unwatched,
        "endpoints": {r["endpoint"]: {"up_hours": r["gpu_hours"],
                                      "serving_hours": r["serving_hours"] / r["up_hours"] * r["gpu_hours"]}
                      for r in endpoints},
    })
    return doc


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
            result["charts"] = [c["name"] for c in runs[-1].charts]
            result["blank_charts"] = runs[-1].blank_charts
            result["errors"] = runs[-1].errors[:5]
            ok = ok and max(r.drawn_ms for r in runs) < 5000 and not runs[-1].blank_charts and not runs[-1].errors \
                and {"endpoints", "baseline_workloads"} <= set(result["charts"])
    result["goal"] = "page < 5 MB, every chart drawn < 5 s after navigation, no console error"
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
