"""Endpoint scraping: the agent's CPU per endpoint per scrape, against the 0.1 %-of-a-core goal.

A separate process serves a real vLLM exposition (tests/fixtures/inference-metrics/vllm.txt) over
loopback HTTP with its counters advancing; this process runs EndpointScraper.poll once per
simulated 1 s tick and closes windows every 10 ticks, exactly as the agent would, and measures its
own CPU with time.process_time (the server's CPU is in the other process and not counted).

Two bodies: the fixture as is (6 kB), and a production-sized one (the fixture's families repeated
for 12 models, about 70 kB, as a vLLM serving several LoRA models or a busy multi-engine server
writes) scraped with a model_name filter. For each, the split of the cost: HTTP GET through urllib,
parsing (the pre-filter + prometheus-client's parser), and the reference of parsing the whole text
without the pre-filter.

Goal: <= 1 ms of CPU per endpoint per scrape, i.e. <= 0.1 % of one core at a 1 s tick.
Prints one line of JSON.

    .venv/bin/python benchmarks/bench_scrape.py               # 2000 scrapes per body
    .venv/bin/python benchmarks/bench_scrape.py --scrapes 500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from gpuledger.agent.scrape import SERVERS, EndpointScraper, make_urllib_get, parse_exposition  # noqa: E402
from gpuledger.config import EndpointConfig  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "inference-metrics" / "vllm.txt"
T0 = 1_767_225_600_000_000
GOAL_MS = 1.0

# The server: answers every GET with the body file, its request counter advanced by one each time.
SERVER = r"""
import sys, re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
body = open(sys.argv[1]).read()
n = [0]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        n[0] += 1
        text = body.replace("REQS", str(n[0])).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)
    def log_message(self, *a):
        pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def bodies() -> dict[str, str]:
    base = FIXTURE.read_text()
    base = re.sub(r'^(vllm:request_success_total\{finished_reason="length",model_name="facebook/opt-125m"\}) \S+$',
                  r"\1 REQS", base, flags=re.M)
    families = [ln for ln in base.splitlines() if ln.startswith("vllm:")]
    extra = []
    for i in range(11):
        extra += [ln.replace('model_name="facebook/opt-125m"', f'model_name="lora-{i}"') for ln in families]
    big = base + "\n".join(extra) + "\n"
    return {"fixture": base, "production_sized": big}


def measure(body: str, scrapes: int, labels: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(body)
        path = fh.name
    proc = subprocess.Popen([sys.executable, "-c", SERVER, path], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}/metrics"
        get = make_urllib_get()
        cfg = EndpointConfig(name="chat", server="vllm", url=url, labels=labels)
        sc = EndpointScraper([cfg], http_get=get, window_s=10.0)
        for t in range(20):  # warm-up
            sc.poll(T0 + t * 1_000_000)
        sc.close_windows(T0 + 20 * 1_000_000)

        c0, w0 = time.process_time(), time.perf_counter()
        rows = 0
        for t in range(20, 20 + scrapes):
            sc.poll(T0 + t * 1_000_000)
            if t % 10 == 0:
                rows += sc.close_windows(T0 + t * 1_000_000).num_rows
        cpu_total = time.process_time() - c0
        wall = time.perf_counter() - w0
        assert sc.stats()["chat"]["scrapes_failed"] == 0 and rows > 0

        c0 = time.process_time()
        for _ in range(scrapes):
            raw = get(url, 2.0)
        cpu_get = time.process_time() - c0
        text = raw.decode()
        c0 = time.process_time()
        for _ in range(scrapes):
            parse_exposition(text, SERVERS["vllm"], labels)
        cpu_parse = time.process_time() - c0
        n_ref = max(scrapes // 10, 20)
        c0 = time.process_time()
        for _ in range(n_ref):
            for fam in text_string_to_metric_families(text):
                for _s in fam.samples:
                    pass
        cpu_full_parse = (time.process_time() - c0) / n_ref * scrapes
    finally:
        proc.terminate()
        proc.wait()
        os.unlink(path)
    per = cpu_total / scrapes * 1000
    return {
        "body_bytes": len(body.encode()),
        "scrapes": scrapes,
        "cpu_ms_per_scrape": round(per, 3),
        "pct_of_core_at_1s_tick": round(per / 1000 * 100, 4),
        "vs_goal": round(per / GOAL_MS, 3),
        "http_get_ms": round(cpu_get / scrapes * 1000, 3),
        "parse_ms": round(cpu_parse / scrapes * 1000, 3),
        "parse_whole_text_ms_reference": round(cpu_full_parse / scrapes * 1000, 3),
        "wall_ms_per_scrape": round(wall / scrapes * 1000, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scrapes", type=int, default=2000)
    args = ap.parse_args()
    out = {"bench": "scrape", "goal_cpu_ms_per_scrape": GOAL_MS, "python": platform.python_version(),
           "machine": platform.machine(), "cpus": os.cpu_count()}
    for name, body in bodies().items():
        out[name] = measure(body, args.scrapes, {"model_name": "facebook/opt-125m"})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
