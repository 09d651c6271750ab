"""Grafana provisioning (deploy/grafana/): every ClickHouse panel's SQL runs on chDB against a simulated fleet and
returns rows, its money equals the reports', and the dashboards have the fields Grafana's dashboard schema
requires.

Macros are expanded as grafana-clickhouse-datasource (v4, pkg/macros/macros.go) expands them, for a time range
[from, to) in ms and an interval in seconds:
  $__fromTime / $__toTime         -> toDateTime(<seconds>)
  $__fromTime_ms / $__toTime_ms   -> fromUnixTimestamp64Milli(<ms>)
  $__timeFilter(c)                -> c >= toDateTime(<from s>) AND c <= toDateTime(<to s>)
  $__timeFilter_ms(c)             -> c >= fromUnixTimestamp64Milli(<from ms>) AND c <= fromUnixTimestamp64Milli(<to ms>)
  $__timeInterval(c)              -> toStartOfInterval(toDateTime(c), INTERVAL <s> second)
  $__timeInterval_ms(c)           -> toStartOfInterval(toDateTime64(c, 3), INTERVAL <ms> millisecond)
  $__interval_s                   -> <s>
and dashboard variables ($host, ${host}) as Grafana interpolates them, before the plugin sees the SQL.

Dashboards target schemaVersion 39 (Grafana 10.4 and 11.x). The checks are the required fields and value
ranges of the Dashboard kind (grafana/grafana kinds/dashboard/dashboard_kind.cue): a dashboard's
schemaVersion, editable, graphTooltip (0, 1, 2); a panel's non-empty type, options, fieldConfig
{defaults, overrides} and transformations; gridPos h > 0, 0 < w <= 24, 0 <= x < 24, y >= 0; a variable's
type, name and hide (0, 1, 2); plus what provisioning needs (a uid of 8 to 40 characters, data source uids
that the provisioned data sources define, unique panel ids, each target's refId).
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gpuledger.collector import reports
from gpuledger.collector.price_table import PriceTable, price_rows
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import Collector
from gpuledger.collector.store import Store
from gpuledger.demo import run_fleet

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
HOUR_MS = 3_600_000
VARIABLE_TYPES = {"query", "adhoc", "constant", "datasource", "interval", "textbox", "custom", "system"}


def expand(sql: str, from_ms: int, to_ms: int, interval_s: int, variables: dict[str, str]) -> str:
    """The SQL the plugin sends to ClickHouse (see the module docstring)."""
    def dt(ms):
        return f"toDateTime({ms // 1000})"

    def dt64(ms):
        return f"fromUnixTimestamp64Milli({ms})"

    for name, value in variables.items():
        sql = sql.replace("${" + name + "}", value)
        sql = re.sub(r"\$" + name + r"\b", value, sql)
    sql = re.sub(r"\$__timeFilter_ms\(([^)]+)\)", lambda m: f"{m[1]} >= {dt64(from_ms)} AND {m[1]} <= {dt64(to_ms)}",
                 sql)
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", lambda m: f"{m[1]} >= {dt(from_ms)} AND {m[1]} <= {dt(to_ms)}", sql)
    sql = re.sub(r"\$__timeInterval_ms\(([^)]+)\)",
                 lambda m: f"toStartOfInterval(toDateTime64({m[1]}, 3), INTERVAL {interval_s * 1000} millisecond)",
                 sql)
    sql = re.sub(r"\$__timeInterval\(([^)]+)\)",
                 lambda m: f"toStartOfInterval(toDateTime({m[1]}), INTERVAL {interval_s} second)", sql)
    sql = (sql.replace("$__fromTime_ms", dt64(from_ms)).replace("$__toTime_ms", dt64(to_ms))
           .replace("$__fromTime", dt(from_ms)).replace("$__toTime", dt(to_ms))
           .replace("$__interval_s", str(interval_s)))
    assert "$" not in sql, f"unexpanded macro or variable in: {sql[:200]}"
    return sql


def ch_targets(dash: dict) -> list[tuple[str, dict]]:
    return [(p["title"], t) for p in dash["panels"] for t in p.get("targets", [])
            if t["datasource"]["type"] == "grafana-clickhouse-datasource"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    d = tmp_path_factory.mktemp("grafana")
    store = Store(f"chdb://{d / 'chdb'}")
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0", max_streams_per_agent=64)
    c.start()
    run = run_fleet(c.address, d / "spool", n_hosts=8, hours=4.0, seed=3)
    c.sealer.seal_now(settle_s=0)  # Grafana's range panels read the hourly rollups
    now_ms = run.end_us // 1000
    assert PriceTable(store, c.pricing).refresh(now_ms)
    yield c, run
    c.stop(grace_s=1)
    store.close()


def test_every_clickhouse_panel_returns_rows_on_demo_data(fleet):
    c, run = fleet
    # the dashboards' default range ends now: the simulated day ends at this machine's now, and the batch log
    # holds when batches were received (seconds after that)
    start, end = run.start_us // 1000, int(time.time() * 1000) + 1000
    hosts = [r[0] for r in c.store.query_rows("SELECT DISTINCT host_id FROM gpuledger.hosts")]
    ran = 0
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        variables = {"host": hosts[0]}
        for var in dash["templating"]["list"]:  # variable queries run too
            rows = c.store.query_rows(expand(var["query"], start, end, 60, {}))
            assert [r[0] for r in rows] == sorted(hosts), var["name"]
        for title, target in ch_targets(dash):
            sql = expand(target["rawSql"], start, end, 60, variables)
            rows = c.store.query_rows(sql)
            assert rows, f"{path.name}: panel {title!r} returned no rows"
            assert all(v is not None for r in rows for v in r[:1]), title
            ran += 1
    assert ran == 11  # 6 fleet, 3 host, 2 agent-health panels


def _panel_sql(name: str, title: str) -> str:
    dash = json.loads((GRAFANA / "dashboards" / name).read_text())
    return next(t["rawSql"] for t_title, t in ch_targets(dash) if t_title == title)


def test_grafana_idle_cost_equals_the_reports(fleet):
    """The fleet panels' money, over whole hours, is the reports' money: same prices (the prices table), same
    allocation of idle time to teams."""
    c, run = fleet
    h0 = -(-(run.start_us // 1000) // HOUR_MS) * HOUR_MS
    h1 = (run.end_us // 1000) // HOUR_MS * HOUR_MS
    assert h1 - h0 >= 2 * HOUR_MS
    now = run.end_us // 1000
    by_team = {r["team"]: r for r in reports.cost_rows(c.store, c.pricing, h0, h1, "team", {}, now)}
    rows = c.store.query_rows(expand(_panel_sql("gpuledger-fleet.json", "Idle share by team"), h0, h1, 60, {}))
    assert {r[0] for r in rows} == {t for t, r in by_team.items() if r["idle_cost"] > 0}
    for team, idle_cost, _monitored_cost, _share in rows:
        assert idle_cost == pytest.approx(by_team[team]["idle_cost"], rel=1e-9), team

    idle = reports.idle_rows(c.store, c.pricing, h0, h1, "gpu", {}, now)
    total = c.store.query_rows(expand(_panel_sql("gpuledger-fleet.json", "Idle cost in range"), h0, h1, 60, {}))[0][0]
    assert total == pytest.approx(sum(r["idle_cost"] for r in idle), rel=1e-9)
    top = c.store.query_rows(expand(_panel_sql("gpuledger-fleet.json", "Top idle GPUs"), h0, h1, 60, {}))
    want = sorted(idle, key=lambda r: -r["idle_cost"])[:20]
    assert [(r[0], r[1]) for r in top] == [(r["host"], r["gpu_uuid"]) for r in want]
    for r, w in zip(top, want, strict=True):
        assert r[4] == pytest.approx(w["idle_cost"], rel=1e-9)
        assert r[2] == pytest.approx(w["idle_held_hours"] + w["idle_free_hours"], rel=1e-9)

    # idle cost now: the last 15 minutes' idle GPU-hours at the same per-GPU-hour prices, times four
    last = reports.idle_rows(c.store, c.pricing, now - 900_000, now, "gpu", {}, now)
    per_hour = c.store.query_rows(expand(_panel_sql("gpuledger-fleet.json", "Idle cost now (per hour)"),
                                         now - 3_600_000, now, 60, {}))[0][0]
    assert per_hour == pytest.approx(4 * sum(r["idle_cost"] for r in last), rel=1e-9)


def test_prices_table_holds_the_reports_prices_and_rewrites_only_on_change(fleet, tmp_path):
    c, run = fleet
    rows = price_rows(c.store, c.pricing)
    gpus = c.store.query_rows("SELECT count(DISTINCT (host_id, uuid)) FROM gpuledger.gpus")[0][0]
    assert len(rows) == gpus  # one price segment (the catalog has no effective dates); every GPU priced
    stored = c.store.query_rows("SELECT host_id, gpu_uuid, per_gpu_hour, method FROM gpuledger.prices "
                                "ORDER BY host_id, gpu_uuid")
    assert stored == [(r["host_id"], r["gpu_uuid"], r["per_gpu_hour"], r["method"]) for r in rows]
    idle = {r["host"]: r for r in reports.idle_rows(c.store, c.pricing, run.start_us // 1000, run.end_us // 1000,
                                                    "host", {}, run.end_us // 1000)}
    for r in rows:  # the per-GPU-hour price is the one the idle report's cost implies
        h = idle[r["host_id"]]
        assert r["per_gpu_hour"] == pytest.approx(h["cost"] / h["gpu_hours"], rel=1e-9)
    table = PriceTable(c.store, c.pricing)
    assert table.refresh(run.end_us // 1000 + 1)  # a new writer writes once
    assert not table.refresh(run.end_us // 1000 + 2)  # nothing changed: no rewrite
    # an override from now on: a second segment per GPU of that host, and only the newest version stays
    cut_ms = (run.end_us // 1000 // HOUR_MS + 1) * HOUR_MS
    p = Pricing.default()
    p.set_gpu_price("host", "sim-000-p5.48xlarge", 1.5,
                    effective_from=datetime.fromtimestamp(cut_ms / 1000, UTC).isoformat())
    t2 = PriceTable(c.store, p)
    assert t2.refresh(run.end_us // 1000 + 3)
    got = c.store.query_rows("SELECT from_ms, per_gpu_hour, count() FROM gpuledger.prices "
                             "WHERE host_id = 'sim-000-p5.48xlarge' GROUP BY from_ms, per_gpu_hour ORDER BY from_ms")
    assert [(g[0], g[1]) for g in got] == [(0, rows[0]["per_gpu_hour"]), (cut_ms, 1.5)]
    assert c.store.query_rows("SELECT uniqExact(version_ms) FROM gpuledger.prices")[0][0] == 1
    assert PriceTable(c.store, c.pricing).refresh(run.end_us // 1000 + 4)  # back to the collector's prices


def _provisioned_uids() -> dict[str, str]:
    text = (GRAFANA / "provisioning" / "datasources" / "gpuledger.yaml").read_text()
    uids = re.findall(r"^\s+uid:\s*(\S+)", text, re.M)
    types = re.findall(r"^\s+type:\s*(\S+)", text, re.M)
    assert len(uids) == len(types) == 2
    return dict(zip(uids, types, strict=True))


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_dashboard_has_the_fields_its_schema_version_requires(path):
    dash = json.loads(path.read_text())
    assert dash["schemaVersion"] == 39
    assert isinstance(dash["title"], str) and dash["title"]
    assert 8 <= len(dash["uid"]) <= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", dash["uid"])
    assert isinstance(dash["editable"], bool) and dash["graphTooltip"] in (0, 1, 2)
    assert set(dash["time"]) == {"from", "to"}
    assert isinstance(dash["annotations"]["list"], list)
    uids = _provisioned_uids()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    for p in dash["panels"]:
        assert isinstance(p["type"], str) and p["type"], p
        assert isinstance(p["options"], dict) and isinstance(p["transformations"], list)
        assert isinstance(p["fieldConfig"]["defaults"], dict) and isinstance(p["fieldConfig"]["overrides"], list)
        g = p["gridPos"]
        assert g["h"] > 0 and 0 < g["w"] <= 24 and 0 <= g["x"] < 24 and g["y"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert uids.get(t["datasource"]["uid"]) == t["datasource"]["type"], p["title"]
            if t["datasource"]["type"] == "grafana-clickhouse-datasource":
                assert t["editorType"] == "sql" and t["queryType"] in ("table", "timeSeries") and t["rawSql"]
                if p["type"] == "timeseries":
                    assert t["queryType"] == "timeSeries" and t["format"] == 0
    for v in dash["templating"]["list"]:
        assert v["type"] in VARIABLE_TYPES and v["name"] and v["hide"] in (0, 1, 2)
        assert uids.get(v["datasource"]["uid"]) == v["datasource"]["type"]
    # panels do not overlap
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine


def test_prometheus_panels_use_metrics_the_daemons_export():
    """PromQL names exist in gpuledger's metrics (counters as NAME_total), as the alert rules' names do."""
    source = (ROOT / "gpuledger" / "metrics.py").read_text()
    exported = set(re.findall(r'"(gpuledger_[a-z_]+)"', source))
    names = set()
    for path in DASHBOARDS:
        for p in json.loads(path.read_text())["panels"]:
            for t in p["targets"]:
                if t["datasource"]["type"] == "prometheus":
                    names |= set(re.findall(r"\b(gpuledger_[a-z_]+)", t["expr"]))
    assert names, "no Prometheus panel"
    for n in names:
        assert n in exported or n.removesuffix("_total") in exported, n
