"""Rendering report rows as an aligned table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import math


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.2f}" if abs(v) >= 0.005 or v == 0 else f"{v:.4f}"
    return str(v)


def _csv_safe(v):
    """A text cell a spreadsheet would run as a formula (=, +, -, @ first) is quoted with a '."""
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def render(rows: list[dict], fmt: str, columns: list[str] | None = None) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    columns = columns or (list(rows[0].keys()) if rows else [])
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows({k: _csv_safe(v) for k, v in r.items()} for r in rows)
        return buf.getvalue()
    if fmt != "table":
        raise ValueError(f"format: {fmt!r} is not table, csv or json")
    if not rows:
        return "(no data in this range)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]
    out = ["  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(columns, widths, numeric, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for row in cells:
        out.append("  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(row, widths, numeric, strict=True)))
    return "\n".join(out)
