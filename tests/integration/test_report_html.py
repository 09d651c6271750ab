"""The HTML report, end to end: a simulated fleet through a real collector, `gpuledger report html`, the page
rendered in headless Chromium (Debian's chromium; the browser tests skip with the reason without it).

Checked: every chart drew (canvas pixels painted in several colours), no console error or warning, no
exception, no request for anything but the file itself; every figure printed in the page equals the
JSON reports of the same range (`gpuledger idle/cost --format json`, the FOCUS export); the optional
sections say "not available on this collector" when the collector lacks those reports, and draw when
it has them; hostile names are escaped.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime

import grpc
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from gpuledger.cli import app
from gpuledger.client import fetch_report
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import Collector
from gpuledger.collector.store import Store
from gpuledger.demo import run_fleet
from gpuledger.report import html as page
from gpuledger.report.browser import Browser, check_page, find_chromium

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium "
                                                             "(or set GPULEDGER_CHROMIUM)")

FIGURES_JS = """
(() => ({
  tables: [...document.querySelectorAll('table.figures')].map((t) => ({
    report: t.dataset.report, by: t.dataset.by,
    rows: [...t.tBodies[0].rows].map((tr) => ({key: tr.dataset.key, cells: Object.fromEntries(
      [...tr.cells].filter((td) => td.dataset.col).map((td) => [td.dataset.col,
                                                                 {text: td.textContent, v: td.dataset.v}]))}))})),
  totals: Object.fromEntries([...document.querySelectorAll('[data-total]')].map((e) => [e.dataset.total,
                                                                                       {text: e.textContent, v: e.dataset.v}])),
  unavailable: [...document.querySelectorAll('[data-unavailable]')].map((e) => [e.dataset.unavailable, e.textContent]),
  range: [document.querySelector('.range').dataset.sinceMs, document.querySelector('.range').dataset.untilMs],
  pwned: window.pwned === undefined ? null : window.pwned,
}))()
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Six simulated hosts for six hours through a real collector (gRPC on loopback, chDB)."""
    d = tmp_path_factory.mktemp("fleet")
    store = Store(f"chdb://{d / 'chdb'}")
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0", max_streams_per_agent=64)
    c.start()
    run = run_fleet(c.address, d / "spool", n_hosts=6, hours=6.0, seed=11)
    yield c, run.start_us // 1000, run.end_us // 1000
    c.stop(grace_s=1)
    store.close()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _parse(text: str) -> float | None:
    """A printed figure back to a number: $1,234.56 / 12.3 % / 1,234.5 / USD 3.20."""
    t = text.strip()
    if t in ("-", "unpriced"):
        return None
    neg = t.startswith("-")
    t = re.sub(r"^-?(\$|[A-Z]{3} )", "", t).replace(",", "").replace(" %", "")
    return -float(t) if neg else float(t)


def _same(cell: dict, expected, kind: str) -> None:
    """The printed text is the expected value at the printed precision, and data-v is the value itself."""
    if expected is None:
        assert cell["text"].strip() in ("-", "unpriced"), cell
        return
    scale = 100.0 if kind == "share" else 1.0
    got = _parse(cell["text"])
    digits = 2 if kind == "money" else 0 if kind == "int" else 1
    assert got == pytest.approx(expected * scale, abs=0.5 * 10 ** -digits + 1e-9), (cell, expected)
    assert json.loads(cell["v"]) == pytest.approx(expected, rel=1e-12, abs=1e-12), (cell, expected)


def _cli_json(*args) -> list[dict]:
    res = CliRunner().invoke(app, [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@needs_chromium
def test_report_html_draws_in_chromium_and_prints_the_reports_figures(fleet, tmp_path):
    c, since, until = fleet
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", "html", "--collector", c.address, "--since", _iso(since), "--until",
                                   _iso(until), "-o", str(out)])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "<script src" not in html and "http://" not in html.split("<script>")[0]  # nothing to load
    assert len(html.encode()) < 5_000_000

    with Browser() as b:
        check = check_page(b, out, tmp_path / "report.png")
        assert {ch["name"] for ch in check.charts} == {"spend_team", "spend_project", "spend_phase", "idle", "heat"}
        assert check.blank_charts == [], check.charts
        assert check.errors == [], check.errors
        assert check.foreign_requests == []
        assert check.screenshot.stat().st_size > 50_000  # a real picture, not an empty page
        p = b.new_page()
        p.goto(out.resolve().as_uri())
        p.evaluate("window.glChartsDone", await_promise=True)
        fig = p.evaluate(FIGURES_JS)

    assert [int(x) for x in fig["range"]] == [since, until]
    tables = {(t["report"], t["by"]): t["rows"] for t in fig["tables"]}
    # idle waste by host: every host, in the report's order, every figure as `gpuledger idle --format json`
    idle = _cli_json("idle", "--collector", c.address, "--since", _iso(since), "--until", _iso(until))
    assert [r["key"] for r in tables[("idle", "host")]] == [r["host"] for r in idle]
    for row, want in zip(tables[("idle", "host")], idle, strict=True):
        for col in page.IDLE_COLS:
            if col.kind == "text":
                assert row["cells"][col.key]["text"] == str(want[col.key])
            else:
                _same(row["cells"][col.key], want[col.key], col.kind)
    # headline totals: sums of the idle report
    for key in ("cost", "idle_cost", "gpu_hours", "unmonitored_hours"):
        _same(fig["totals"][key], sum(r[key] for r in idle), "money" if "cost" in key else "hours")
    _same(fig["totals"]["idle_share"], sum(r["idle_cost"] for r in idle) / sum(r["cost"] for r in idle), "share")
    assert json.loads(fig["totals"]["gpus"]["v"]) == sum(r["gpus"] for r in idle)

    # cost by team, project, phase: as `gpuledger cost --by X --format json`
    for dim in page.SPEND_DIMENSIONS:
        cost = _cli_json("cost", "--by", dim, "--collector", c.address, "--since", _iso(since), "--until", _iso(until))
        rows = tables[("cost", dim)]
        assert [r["key"] for r in rows] == [r[dim] for r in cost]
        for row, want in zip(rows, cost, strict=True):
            for col in page.cost_cols(dim)[1:]:
                _same(row["cells"][col.key], want[col.key], col.kind)

    # spend over time: the FOCUS export by hour (a 6 h range), summed per charge period and Tags value
    focus, _ = fetch_report(c.address, "focus", since, until, "hour")
    for dim in page.SPEND_DIMENSIONS:
        want: dict[tuple[int, str], float] = {}
        for r in focus.to_pylist():
            label = json.loads(r["Tags"]).get(dim) or page.UNATTRIBUTED
            k = (int(r["ChargePeriodStart"].timestamp() * 1000), label)
            want[k] = want.get(k, 0.0) + r["BilledCost"]
        got = {(int(row["key"]), lbl): cell for row in tables[("spend", dim)] for lbl, cell in row["cells"].items()
               if cell["v"] != "null"}
        assert got.keys() == want.keys()
        for k, cell in got.items():
            _same(cell, want[k], "money")
        # every process in the simulated fleet carries team, project and phase, so the FOCUS split by Tags
        # and the cost report agree per label, apart from the host-owned time the cost report calls
        # (unattributed) and FOCUS labels with the host's own tags
        total = sum(want.values())
        assert total == pytest.approx(sum(r["cost"] for r in idle), rel=1e-9)

    # prices: per instance type, cost / GPU-hours of the idle report's hosts
    for row in tables[("prices", "instance_type")]:
        hosts = [r for r in idle if "/".join((r["provider"], r["region"], r["instance_type"], r["price_method"]))
                 == row["key"]]
        assert hosts
        _same(row["cells"]["cost"], sum(h["cost"] for h in hosts), "money")
        _same(row["cells"]["per_gpu_hour"], sum(h["cost"] for h in hosts) / sum(h["gpu_hours"] for h in hosts),
              "money")
    # the sections whose reports this collector lacks say so
    assert dict(fig["unavailable"]).keys() == {"endpoints", "baseline"}
    assert all("not available on this collector" in text for _, text in fig["unavailable"])


def test_heatmap_report_adds_up_to_the_idle_report(fleet):
    c, since, until = fleet
    idle, _ = fetch_report(c.address, "idle", since, until, "host")
    idle = {r["host"]: r for r in idle.to_pylist()}
    by_gpu, _ = fetch_report(c.address, "heatmap", since, until, "gpu")
    by_host, _ = fetch_report(c.address, "heatmap", since, until, "host", {"step_hours": "2"})
    gpu_rows, host_rows = by_gpu.to_pylist(), by_host.to_pylist()
    assert {r["host"] for r in gpu_rows} == set(idle)
    for rows in (gpu_rows, host_rows):
        for host, want in idle.items():
            mine = [r for r in rows if r["host"] == host]
            for state in ("active", "idle_held", "idle_free", "unmonitored"):
                got = sum(r[f"{state}_ms"] for r in mine) / 3_600_000
                assert got == pytest.approx(want[f"{state}_hours"], rel=1e-9, abs=1e-9), (host, state)
    for r in gpu_rows:  # hour cells, clipped to the range; utilization is active over monitored time
        assert 0 < r["end_ms"] - r["start_ms"] <= 3_600_000 and since <= r["start_ms"] and r["end_ms"] <= until
        mon = r["active_ms"] + r["idle_held_ms"] + r["idle_free_ms"]
        assert r["util_pct"] == (pytest.approx(100 * r["active_ms"] / mon) if mon else None)
        assert r["gpu_index"] is not None
        assert mon + r["unmonitored_ms"] <= r["end_ms"] - r["start_ms"] + 10_000  # one window of slack at the edge
    assert all(r["end_ms"] - r["start_ms"] <= 2 * 3_600_000 for r in host_rows)
    assert {r["gpus"] for r in host_rows} >= {8}
    assert len(host_rows) < len(gpu_rows)


@pytest.mark.parametrize("by,filters,message", [
    ("gpu", {"step_hours": "two"}, "filters.step_hours: 'two' is not a whole number"),
    ("gpu", {"step_hours": "0"}, "filters.step_hours: 0 is outside 1..168"),
    ("rack", {}, "by: 'rack' is not gpu or host"),
])
def test_heatmap_report_names_bad_parameters(fleet, by, filters, message):
    c, since, until = fleet
    with pytest.raises(grpc.RpcError) as e:
        fetch_report(c.address, "heatmap", since, until, by, filters)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


def test_heat_layout_keeps_the_map_small():
    day = 86_400_000
    assert page.heat_layout(38, 6, 0, day) == ("gpu", 1)  # a small fleet: GPU x hour
    assert page.heat_layout(1000, 125, 0, 30 * day) == ("host", 6)  # a month of 1,000 GPUs: host x 6 h
    assert page.heat_layout(160, 20, 0, 30 * day) == ("gpu", 6)  # 160 x 120 cells
    for gpus, hosts, days in ((1, 1, 90), (5000, 625, 31), (100, 13, 7)):
        by, step = page.heat_layout(gpus, hosts, 0, days * day)
        rows = gpus if by == "gpu" else hosts
        assert rows * math.ceil(days * 24 / step) <= page.HEAT_MAX_CELLS or step == page.HEAT_STEPS[-1]


def test_cli_report_html_names_bad_input(tmp_path):
    res = CliRunner().invoke(app, ["report", "html", "-o", str(tmp_path / "x.html"), "--since", "last tuesday"])
    assert res.exit_code == 2 and "cannot read 'last tuesday' as a time" in res.output
    res = CliRunner().invoke(app, ["report", "html", "-o", str(tmp_path / "x.html"), "--since", "1d", "--until", "2d"])
    assert res.exit_code == 2 and "--since must be before --until" in res.output
    res = CliRunner().invoke(app, ["report", "html", "-o", str(tmp_path / "x.html"), "--collector", "127.0.0.1:1",
                                   "--since", "1d"])
    assert res.exit_code == 1 and "UNAVAILABLE" in res.output and not (tmp_path / "x.html").exists()


HOSTILE = '</script><img src=x onerror="window.pwned=1">'


@needs_chromium
def test_optional_sections_draw_when_the_collector_answers_them(fleet, tmp_path):
    """Endpoints and baseline are other helpers' reports: until this collector serves them, their rows come from
    a recorded shape here, passed in as the data source (the rest are the real collector's)."""
    c, since, until = fleet
    real = page.grpc_fetch(c.address)
    endpoints = pa.Table.from_pylist([
        {"endpoint": "chat-api-endpoint", "host": "sim-000", "up_hours": 6.0, "serving_hours": 4.25, "requests": 1200},
        {"endpoint": HOSTILE, "host": "sim-001", "up_hours": 5.5, "serving_hours": 0.5, "requests": 3}])
    baseline = pa.Table.from_pylist([
        {"host": "sim-000", "question": "idle share", "answer": 0.42, "coverage": 0.97, "flags": ""},
        {"host": "sim-001", "question": "idle share", "answer": 0.12, "coverage": 0.61, "flags": "low_coverage"}])

    def fetch(report, s, u, by, filters):
        if report == "endpoints":
            return endpoints, None
        if report == "baseline":
            return baseline, None
        return real(report, s, u, by, filters)

    data = page.collect(fetch, since, until, "recorded")
    out = tmp_path / "report.html"
    out.write_text(page.render(data))
    with Browser() as b:
        check = check_page(b, out)
        assert "endpoints" in {ch["name"] for ch in check.charts}
        assert check.blank_charts == [] and check.errors == [] and check.foreign_requests == []
        p = b.new_page()
        p.goto(out.resolve().as_uri())
        p.evaluate("window.glChartsDone", await_promise=True)
        fig = p.evaluate(FIGURES_JS)
        text = p.evaluate("document.getElementById('endpoints').textContent")
    assert fig["unavailable"] == [] and fig["pwned"] is None
    assert HOSTILE.replace("</script>", "") in text  # shown as text, not run
    tables = {t["report"]: t["rows"] for t in fig["tables"]}
    assert [r["key"] for r in tables["endpoints"]] == ["chat-api-endpoint", HOSTILE]
    _same(tables["endpoints"][0]["cells"]["serving_hours"], 4.25, "hours")
    _same(tables["baseline"][1]["cells"]["coverage"], 0.61, "share")
    assert tables["baseline"][1]["cells"]["flags"]["text"] == "low_coverage"
