"""The HTML report, end to end: a simulated fleet (with scraped inference endpoints, an experiment's runs, a
simulated bill and API spend) through a real collector, `gpuledger report html`, the page rendered in headless
Chromium (Debian's chromium; the browser tests skip with the reason without it).

Checked: every chart drew (canvas pixels painted in several colours), no console error or warning, no
exception, no request for anything but the file itself; every figure printed in the page equals the
JSON reports of the same range (`gpuledger idle/cost/endpoints/baseline --format json`, the FOCUS
export); the endpoints and baseline sections say "not available on this collector" when the collector
lacks those reports; hostile names are escaped.
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

from gpuledger.agent.simulate import simulated_fleet
from gpuledger.cli import app
from gpuledger.client import fetch_report
from gpuledger.clock import WallClock
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import Collector
from gpuledger.collector.store import Store
from gpuledger.demo import run_fleet
from gpuledger.demo_finance import demo_instance_ids, import_demo_finance
from gpuledger.demo_workflow import run_workflow_fleet
from gpuledger.report import html as page
from gpuledger.report.browser import Browser, check_page, find_chromium

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium "
                                                             "(or set GPULEDGER_CHROMIUM)")

FIGURES_JS = """
(() => ({
  tables: [...document.querySelectorAll('table.figures')].map((t) => ({
    report: t.dataset.report, by: t.dataset.by,
    rows: [...t.tBodies[0].rows].map((tr) => ({key: tr.dataset.key,
      cols: [...tr.cells].filter((td) => td.dataset.col).map((td) => td.dataset.col), cells: Object.fromEntries(
      [...tr.cells].filter((td) => td.dataset.col).map((td) => [td.dataset.col,
                                                                 {text: td.textContent, v: td.dataset.v}]))}))})),
  totals: Object.fromEntries([...document.querySelectorAll('[data-total]')].map((e) => [e.dataset.total,
                                                                                       {text: e.textContent, v: e.dataset.v}])),
  unavailable: [...document.querySelectorAll('[data-unavailable]')].map((e) => [e.dataset.unavailable, e.textContent]),
  range: [document.querySelector('.range').dataset.sinceMs, document.querySelector('.range').dataset.untilMs],
  endpointFlags: [...document.querySelectorAll('#endpoints li.flag')].map((e) => [e.dataset.flag,
                                                                               e.querySelector('.text').textContent]),
  questions: [...document.querySelectorAll('#baseline article.question')].map((a) => ({
    id: a.dataset.question,
    answers: Object.fromEntries([...a.querySelectorAll('[data-answer]')].map((e) => [e.dataset.answer,
      {text: e.querySelector('.v').textContent, v: e.dataset.v, kind: e.dataset.kind}])),
    reasons: Object.fromEntries([...a.querySelectorAll('[data-reason]')].map((e) => [e.dataset.reason, e.textContent])),
    flags: [...a.querySelectorAll('p.flag')].map((e) => e.textContent),
    basis: Object.fromEntries([...a.querySelectorAll('dl.basis dt')].map((dt) => [dt.textContent,
                                                                                 dt.nextElementSibling.textContent])),
    coverage: a.querySelector('[data-coverage]') ? a.querySelector('[data-coverage]').dataset.coverage : null})),
  baselineFlags: [...document.querySelectorAll('#baseline div.flags li')].map((e) => e.textContent),
  missing: [...document.querySelectorAll('#baseline [data-missing]')].map((e) => e.textContent),
  injected: document.querySelectorAll('img').length,
  pwned: window.pwned === undefined ? null : window.pwned,
}))()
"""


HOURS = 4.0
HOUR_US = 3_600_000_000


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Six simulated hosts, and the workflow hosts (inference endpoints `chat` and `chat-dev` whose traffic is
    scraped, a host running an experiment's runs), for four evening hours through a real collector (gRPC on
    loopback, chDB); then a simulated bill and API spend for them, imported. The hours are yesterday's 18:00 to
    22:00 UTC, so `chat-dev` (used 09:00-17:00) only idles and is flagged."""
    d = tmp_path_factory.mktemp("fleet")
    store = Store(f"chdb://{d / 'chdb'}")
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0", max_streams_per_agent=64)
    c.start()
    start_us = (WallClock().now_us() // (24 * HOUR_US) - 1) * 24 * HOUR_US + 18 * HOUR_US
    run = run_fleet(c.address, d / "spool", n_hosts=6, hours=HOURS, seed=11, start_us=start_us,
                    instance_ids=demo_instance_ids(6, 11))
    wf = run_workflow_fleet(c.address, d / "spool-workflow", HOURS, start_us=start_us, seed=11, scrape="direct")
    import_demo_finance(c.address, run, d / "finance", seed=11, hosts=simulated_fleet(6, 11) + wf.hosts,
                        credit=20.0, other_compute_per_day=1_000.0)
    yield c, run.start_us // 1000, run.end_us // 1000
    c.stop(grace_s=1)
    store.close()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _parse(text: str) -> tuple[float | None, int]:
    """A printed figure back to a number and its decimals: $1,234.56 / 12.3 % / 1,234.5 / USD 3.20 / 0.55x /
    4.0 GPU-h."""
    t = text.strip()
    if t in ("-", "unpriced"):
        return None, 0
    neg = t.startswith("-")
    t = re.sub(r"^-?(\$|[A-Z]{3} )", "", t).replace(",", "").removesuffix(" %").removesuffix(" GPU-h")
    t = t.removesuffix("x")
    decimals = len(t.partition(".")[2])
    return (-float(t) if neg else float(t)), decimals


MIN_DECIMALS = {"money": 2, "rate": 2, "ratio": 2, "int": 0}
SHAPES = {"money": r"-?\$[\d,]+\.\d+", "rate": r"-?\$[\d,]+\.\d+", "share": r"-?[\d.]+ %", "pct": r"-?[\d.]+ %",
          "ratio": r"[\d,]+\.\d\dx", "hours": r"-?[\d,]+\.\d( GPU-h)?", "int": r"-?[\d,]+"}


def answer_kind(key: str) -> str:
    """How the baseline's own text prints each answer (collector/baseline.py _fmt): the page must print it so."""
    if key.endswith("_share"):
        return "share"
    if key.endswith("_pct"):
        return "pct"
    if key.endswith("_hours"):
        return "hours"
    return "ratio" if key == "training_to_inference" else "money"


def _same(cell: dict, expected, kind: str) -> None:
    """The printed text is the expected value at the printed precision (at least the kind's), and data-v is the
    value itself."""
    if expected is None:
        assert cell["text"].strip() in ("-", "unpriced"), cell
        return
    scale = 100.0 if kind == "share" else 1.0
    assert re.fullmatch(SHAPES[kind], cell["text"].strip()), (cell, kind)
    got, decimals = _parse(cell["text"])
    assert decimals >= MIN_DECIMALS.get(kind, 1), (cell, kind)
    assert got == pytest.approx(expected * scale, abs=0.5 * 10 ** -decimals + 1e-9), (cell, expected)
    assert json.loads(cell["v"]) == pytest.approx(expected, rel=1e-12, abs=1e-12), (cell, expected)


def _same_text(cell: dict, expected) -> None:
    assert cell["text"] == ("-" if expected is None else str(expected)), (cell, expected)


def expected_kind(key: str, value) -> str:
    """How a report column must be printed, from its name (the reports' naming rules: units in names)."""
    if isinstance(value, (str, list)):
        return "text"
    if isinstance(value, int):  # counts (requests_outside_hours too); every measure is a float in the JSON
        return "int"
    if key.startswith("cost_per_"):
        return "rate"  # money per unit
    if key == "cost" or key.endswith(("_cost", "_saving")) or key.startswith("price_"):
        return "money"
    for suffix, kind in (("_share", "share"), ("_hours", "hours"), ("_pct", "pct")):
        if key.endswith(suffix) or key == suffix[1:]:
            return kind
    if key == "coverage":
        return "share"
    assert value is None, (key, value)
    return "int"


def _same_rows(rows: list[dict], want: list[dict], keys: list[str]) -> None:
    """A page table's rows against report rows: exactly these columns, each value printed as its kind."""
    assert len(rows) == len(want)
    for row, w in zip(rows, want, strict=True):
        assert sorted(row["cols"]) == sorted(keys), (row["cols"], keys)
        for k in keys:
            if expected_kind(k, w[k]) == "text":
                _same_text(row["cells"][k], ", ".join(w[k]) if isinstance(w[k], list) else w[k])
            else:
                _same(row["cells"][k], w[k], expected_kind(k, w[k]))


def _cli_json(*args) -> list[dict] | dict:
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
        assert {ch["name"] for ch in check.charts} == {"spend_team", "spend_project", "spend_phase", "idle", "heat",
                                                       "endpoints", "baseline_workloads"}
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
    assert fig["unavailable"] == []
    range_args = ("--collector", c.address, "--since", _iso(since), "--until", _iso(until))

    # endpoints: every column of `gpuledger endpoints --format json`, row for row, in two tables; flags as text
    endpoints = _cli_json("endpoints", *range_args)
    assert {r["endpoint"] for r in endpoints} >= {"chat", "chat-dev"}
    shown = {by: tables[("endpoints", by)][0]["cols"] for by in ("time", "cost")}
    assert shown["time"][0] == shown["cost"][0] == "endpoint"
    assert sorted(shown["time"] + shown["cost"][1:]) == sorted(k for k in endpoints[0] if k != "flag")
    for by in ("time", "cost"):
        assert [r["key"] for r in tables[("endpoints", by)]] == [r["endpoint"] for r in endpoints]
        _same_rows(tables[("endpoints", by)], endpoints, shown[by])
    flagged = [[r["endpoint"], r["flag"]] for r in endpoints if r["flag"]]
    assert fig["endpointFlags"] == flagged
    assert "chat-dev" in dict(flagged) and "scale-to-zero after 15 min would have saved" in dict(flagged)["chat-dev"]

    # baseline: each question's answers, flags, how / rests on / covers, as `gpuledger baseline --format json`
    doc = _cli_json("baseline", *range_args)
    assert [q["id"] for q in fig["questions"]] == [q["id"] for q in doc["questions"]] and len(doc["questions"]) == 5
    for got, q in zip(fig["questions"], doc["questions"], strict=True):
        figures = {k: v for k, v in q["answer"].items() if not k.endswith("_reason")}
        assert got["answers"].keys() == figures.keys()
        for k, v in figures.items():
            cell = got["answers"][k]
            if isinstance(v, list):
                assert json.loads(cell["v"]) == v and cell["text"] == (", ".join(v) or "none")
            else:
                _same(cell, v, answer_kind(k))
        assert got["reasons"] == {k: v for k, v in q["answer"].items() if k.endswith("_reason") and v}
        assert got["flags"] == q["flags"]
        assert got["basis"]["how"] == q["method"] and got["basis"]["rests on"] == "; ".join(q["rests_on"])
        assert got["basis"]["covers"].startswith(q["covers"])
        assert (json.loads(got["coverage"]) if got["coverage"] else None) == pytest.approx(q["coverage_share"])
    # the figures the simulated bill must give: an AI share of a positive total, the unwatched GPU instance flagged
    ai = next(q for q in fig["questions"] if q["id"] == "ai_spend")["answers"]
    assert 0 < json.loads(ai["ai_share"]["v"]) < 1 and ai["ai_share"]["text"].endswith(" %")
    assert fig["baselineFlags"] == doc["flags"] and any("report to no agent" in f for f in doc["flags"])
    assert fig["missing"] == doc["missing"]
    wl = [{"workload": k, "cost": v, "share": v / sum(doc["workload_costs"].values())}
          for k, v in doc["workload_costs"].items()]
    _same_rows(tables[("baseline", "workload")], wl, ["workload", "cost", "share"])
    us = doc["untagged_share"]
    shares = [{"key": k, "gpu_cost_share": us["gpu_cost"][k], "bill_cost_share": us["bill_cost"][k]}
              for k in us["gpu_cost"]]
    _same_rows(tables[("baseline", "untagged_share")], shares, ["key", "gpu_cost_share", "bill_cost_share"])
    assert doc["untagged_top"]
    top = [{**u, "process": u["process"] or "(host owner)"} for u in doc["untagged_top"]]
    _same_rows(tables[("baseline", "untagged_top")], top, list(doc["untagged_top"][0]))
    assert [r["key"] for r in tables[("baseline", "instances")]] == [i["resource_id"] for i in doc["instances"]]
    _same_rows(tables[("baseline", "instances")], doc["instances"], list(doc["instances"][0]))
    eps = [{"endpoint": k, **v} for k, v in sorted(doc["endpoints"].items())]
    _same_rows(tables[("baseline", "endpoints")], eps, ["endpoint", "up_hours", "serving_hours"])


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
def test_hostile_names_in_endpoints_and_baseline_are_printed_as_text(fleet, tmp_path):
    """Endpoint names, tags, resource ids and hosts come from users and bills: the collector's real reports with a
    hostile name put in every such place draw, and the name shows as text, never as markup or script."""
    c, since, until = fleet
    real = page.grpc_fetch(c.address)

    def fetch(report, s, u, by, filters):
        t, reply = real(report, s, u, by, filters)
        if report == "endpoints":
            rows = t.to_pylist()
            rows[0]["endpoint"] = HOSTILE
            rows[0]["flag"] = f"always_on_dev: {HOSTILE}"
            return pa.Table.from_pylist(rows), reply
        if report == "baseline":
            doc = json.loads(t.column("document")[0].as_py())
            doc["untagged_top"][0]["host"] = HOSTILE
            doc["instances"][0]["resource_id"] = HOSTILE
            doc["questions"][1]["answer"]["unwatched_gpu_instances"] = [HOSTILE]
            doc["questions"][1]["flags"].append(HOSTILE)
            doc["missing"].append(HOSTILE)
            doc["endpoints"][HOSTILE] = {"up_hours": 1.0, "serving_hours": 0.5}
            return pa.table({"document": [json.dumps(doc)], "currency": [doc["currency"]]}), reply
        return t, reply

    data = page.collect(fetch, since, until, "recorded")
    out = tmp_path / "report.html"
    out.write_text(page.render(data))
    with Browser() as b:
        check = check_page(b, out)
        assert {"endpoints", "baseline_workloads"} <= {ch["name"] for ch in check.charts}
        assert check.blank_charts == [] and check.errors == [] and check.foreign_requests == []
        p = b.new_page()
        p.goto(out.resolve().as_uri())
        p.evaluate("window.glChartsDone", await_promise=True)
        fig = p.evaluate(FIGURES_JS)
        endpoints_text = p.evaluate("document.getElementById('endpoints').textContent")
        baseline_text = p.evaluate("document.getElementById('baseline').textContent")
    assert fig["pwned"] is None and fig["injected"] == 0
    assert endpoints_text.count(HOSTILE) == 4  # two table rows, the flag's name and text
    assert baseline_text.count(HOSTILE) == 6  # untagged top, instance, unwatched list, flag, missing, endpoint
    assert fig["endpointFlags"][0] == [HOSTILE, f"always_on_dev: {HOSTILE}"]
    tables = {(t["report"], t["by"]): t["rows"] for t in fig["tables"]}
    assert tables[("endpoints", "time")][0]["key"] == HOSTILE
    assert tables[("baseline", "instances")][0]["cells"]["resource_id"]["text"] == HOSTILE


def test_sections_say_when_the_collector_lacks_the_report_or_has_no_rows(fleet):
    """An older collector has no endpoints or baseline report; a range without endpoints has no rows."""
    c, since, until = fleet
    real = page.grpc_fetch(c.address)

    def fetch(report, s, u, by, filters):
        if report == "baseline":
            raise page.ReportUnavailable("unknown report 'baseline'")
        if report == "endpoints":
            t, reply = real(report, s, u, by, filters)
            return t.slice(0, 0), reply
        return real(report, s, u, by, filters)

    html = page.render(page.collect(fetch, since, until, "older"))
    assert '<p class="unavailable" data-unavailable="baseline">not available on this collector (unknown report ' \
           '&#x27;baseline&#x27;)</p>' in html
    assert 'data-unavailable="endpoints"' not in html and "No endpoint in this range" in html
    assert 'data-chart="endpoints"' not in html and 'data-chart="baseline_workloads"' not in html
