#!/usr/bin/env python3
"""Refresh the shipped GPU price catalog from a newer public snapshot, in one step.

    python scripts/refresh_catalog.py NEW.csv --snapshot-date 2026-03-01 \\
        --label "2026-03-01 (skypilot-catalog commit abc1234)"

1. validates NEW.csv (columns, providers, whole GPU counts, positive prices, ISO currency codes,
   no duplicate provider/region/instance type/purchase option; every problem names line and column);
2. prints what changed against the shipped catalog (changed, added, removed rows, with % change),
   as a Markdown table to paste into gpuledger/collector/catalog/README.md;
3. unless --check, copies NEW.csv over gpuledger/collector/catalog/cloud-gpu-on-demand.csv and writes
   the snapshot's date and label to catalog/snapshot.csv, which every report's price source quotes.

Exit status: 0 done (or --check passed), 2 the new file is invalid.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpuledger.collector.pricing import PricingError, catalog_diff, validate_catalog_csv  # noqa: E402


def _markdown(diff: list[dict]) -> str:
    if not diff:
        return "(no price changed)"
    out = ["| instance | region | old (USD/h) | new (USD/h) | change |", "| --- | --- | --- | --- | --- |"]
    for d in diff:
        change = d["change"] if d["change_pct"] is None else f"{d['change_pct']:+.1f}%"
        out.append(f"| {d['instance_type']} ({d['provider']}) | {d['region']} | "
                   f"{'' if d['old_hourly_price'] is None else d['old_hourly_price']} | "
                   f"{'' if d['new_hourly_price'] is None else d['new_hourly_price']} | {change} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("new_csv", help="the new catalog CSV (same columns as the shipped one)")
    ap.add_argument("--snapshot-date", required=True, help="YYYY-MM-DD: when the prices were published/read")
    ap.add_argument("--label", default="", help="how reports name the snapshot (default: the date)")
    ap.add_argument("--check", action="store_true", help="validate and show the changes; write nothing")
    ap.add_argument("--catalog-dir", default=str(ROOT / "gpuledger" / "collector" / "catalog"),
                    help="the catalog folder to update (default: the package's own)")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.snapshot_date):
        print(f"refresh_catalog: --snapshot-date {args.snapshot_date!r} is not YYYY-MM-DD", file=sys.stderr)
        return 2
    catalog_dir = Path(args.catalog_dir)
    try:
        new_text = Path(args.new_csv).read_text()
        new = validate_catalog_csv(new_text, args.new_csv)
    except (OSError, PricingError) as e:
        print(f"refresh_catalog: {e}", file=sys.stderr)
        return 2
    shipped = catalog_dir / "cloud-gpu-on-demand.csv"
    old = validate_catalog_csv(shipped.read_text(), str(shipped)) if shipped.exists() else []
    diff = catalog_diff(old, new)
    print(f"{len(new)} rows valid; {len(diff)} changed, added or removed against the shipped catalog:")
    print(_markdown(diff))
    if args.check:
        return 0
    shipped.write_text(new_text)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerows([("key", "value"), ("snapshot_date", args.snapshot_date),
                 ("snapshot_label", args.label or args.snapshot_date)])
    (catalog_dir / "snapshot.csv").write_text(buf.getvalue())
    print(f"wrote {shipped.name} and snapshot.csv in {catalog_dir}; now record the source and the table above "
          "in the catalog's README.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
