"""Ids and tags full of SQL are data: stored and reported back verbatim, never executed.

Report queries bind every value as a ClickHouse parameter. Host ids and process tag values made of
quotes, backslashes, comment markers, placeholder syntax and unicode go in over gRPC, come back
unchanged from `idle_rows` / `cost_rows`, from the Query service and from the CLI's `idle --host`
filter, and every table is still there afterwards. Control characters are refused at ingest with a
message naming the field.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gpuledger.cli import app
from gpuledger.client import fetch_report
from gpuledger.collector.reports import ReportError, cost_rows, idle_rows
from gpuledger.collector.server import INVALID_ARGUMENT, OK
from gpuledger.collector.store import TABLES
from gpuledger.schema import from_ipc
from tests.helpers import aligned_start_us, sim_batch
from tests.integration.streams import send_batches

EVIL_HOSTS = [
    "x'); DROP TABLE gpuledger.gpu_windows; --",
    "a\\'b\\\\c\\",
    "\"double\" 'single' `back`",
    "{host:String} {since:Int64} %s %(host)s ?",
    "ホスト-🚀-ü-name",
    "' OR '1'='1",
]
EVIL_TEAMS = [
    "'; DROP TABLE gpuledger.processes; --",
    "team\\' OR 1=1 /*",
    "チーム 🚀 \"quoted\"",
]


def _batch(seq: int, host: str, start_us: int, team: str):
    b = sim_batch(seq=seq, host_id=host, start_us=start_us, profiles=("training", "notebook"))
    for p in b.processes:
        p.tags["team"] = team
    return b


def _tables(store) -> set[str]:
    return {r[0] for r in store.query_rows("SELECT name FROM system.tables WHERE database = 'gpuledger'")}


@pytest.fixture
def evil_fleet(collector):
    start_us = aligned_start_us(hours_ago=2.0)
    batches = [_batch(1, h, start_us, EVIL_TEAMS[i % len(EVIL_TEAMS)]) for i, h in enumerate(EVIL_HOSTS)]
    for b in batches:
        acks = send_batches(collector.address, [b.SerializeToString()])
        assert [a.code for a in acks] == [OK], acks
    since, until = start_us // 1000, start_us // 1000 + 3 * 60_000
    return collector, batches, since, until


def test_sql_in_ids_and_tags_is_stored_and_reported_verbatim(evil_fleet):
    collector, batches, since, until = evil_fleet
    store, pricing = collector.store, collector.pricing
    assert _tables(store) >= set(TABLES)
    windows = {b.host.host_id: from_ipc(b.gpu_windows_arrow).num_rows for b in batches}

    rows = idle_rows(store, pricing, since, until, "host", {})
    assert sorted(r["host"] for r in rows) == sorted(EVIL_HOSTS)
    for host in EVIL_HOSTS:
        only = idle_rows(store, pricing, since, until, "host", {"host": host})
        assert [r["host"] for r in only] == [host]
        assert only[0]["gpus"] == 2
        assert only[0]["gpu_hours"] == pytest.approx(windows[host] * 10 / 3600)
    assert idle_rows(store, pricing, since, until, "host", {"host": "' OR 1=1 --"}) == []

    by_team = {r["team"] for r in cost_rows(store, pricing, since, until, "team", {})}
    assert set(EVIL_TEAMS) <= by_team
    by_host = {r["host"] for r in cost_rows(store, pricing, since, until, "host", {})}
    assert by_host == set(EVIL_HOSTS)
    with pytest.raises(ReportError, match="by: .* is not a tag key"):
        cost_rows(store, pricing, since, until, "team') --", {})

    # over the Query service, as every client gets it
    table, _ = fetch_report(collector.address, "idle", since, until, "host", {"host": EVIL_HOSTS[0]})
    assert table.column("host").to_pylist() == [EVIL_HOSTS[0]]

    # nothing was dropped or emptied
    assert _tables(store) >= set(TABLES)
    stored = dict(store.query_rows("SELECT host_id, count() FROM gpuledger.gpu_windows GROUP BY host_id"))
    assert stored == windows
    assert store.query_rows("SELECT count() FROM gpuledger.processes")[0][0] == sum(len(b.processes) for b in batches)


def test_cli_host_filter_takes_sql_as_data(evil_fleet):
    collector = evil_fleet[0]
    runner = CliRunner()
    for host in EVIL_HOSTS:
        res = runner.invoke(app, ["idle", "--collector", collector.address, "--since", "3h", "--host", host,
                                  "--format", "json"])
        assert res.exit_code == 0, res.output
        rows = json.loads(res.stdout)
        assert [r["host"] for r in rows] == [host]
    res = runner.invoke(app, ["idle", "--collector", collector.address, "--since", "3h", "--host",
                              "x' OR '1'='1", "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == []
    assert _tables(collector.store) >= set(TABLES)


@pytest.mark.parametrize("where, setter, names", [
    ("host_id", lambda b: setattr(b.host, "host_id", "evil\nhost"), "host.host_id: contains control characters"),
    ("host_id", lambda b: setattr(b.host, "host_id", "evil\x00"), "host.host_id: contains control characters"),
    ("host_id", lambda b: setattr(b.host, "host_id", "\x1b[31mred"), "host.host_id: contains control characters"),
    ("host_id", lambda b: setattr(b.host, "host_id", "evil\u202etxt.exe"), "host.host_id: contains control characters"),
    ("agent_id", lambda b: setattr(b, "agent_id", "a\tb"), "agent_id: contains control characters"),
    ("gpu uuid", lambda b: setattr(b.gpus[0], "uuid", "GPU-\r"), "gpus[0].uuid: contains control characters"),
    ("team tag", lambda b: b.processes[0].tags.__setitem__("team", "x\n'); DROP TABLE t; --"),
     "processes[0].tags[team]: contains control characters"),
    ("host tag key", lambda b: b.host.tags.__setitem__("k\x07", "v"), "host.tags key: contains control characters"),
])
def test_control_characters_in_ids_are_refused_naming_the_field(collector, where, setter, names):
    b = _batch(1, "ctrl-host", aligned_start_us(hours_ago=3.0), "ml")
    setter(b)
    acks = send_batches(collector.address, [b.SerializeToString()])
    assert acks[0].code == INVALID_ARGUMENT and not acks[0].retryable, where
    assert names in acks[0].message, (where, acks[0].message)
    assert collector.store.query_rows("SELECT count() FROM gpuledger.gpu_windows")[0][0] == 0
    assert collector.store.query_rows("SELECT count() FROM gpuledger.hosts")[0][0] == 0
