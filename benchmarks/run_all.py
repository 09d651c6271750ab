"""`make bench`: every benchmark in one run; JSON lines to stdout and benchmarks/out/results.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_kernels.py", "bench_ingest.py", "bench_storage.py", "bench_agent_overhead.py",
           "bench_load.py", "bench_aliasing.py", "bench_reports.py"]


def main() -> int:
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    failed = 0
    with open(out_dir / "results.jsonl", "w") as fh:
        for name in BENCHES:
            path = HERE / name
            if not path.exists():
                continue
            print(f"== {name}", flush=True)
            proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                failed += 1
                print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
                continue
            for ln in lines:
                print(ln, flush=True)
                fh.write(json.dumps(json.loads(ln)) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
