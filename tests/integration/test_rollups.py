"""Reports read the same figures from the sealed rollups as from the raw windows, and stay exactly-once
when windows are stored again after sealing (a resend after a lost ack, a replayed spool).

One collector takes a simulated fleet (demo.run_fleet: training, inference and notebook GPUs) and the
workflow fleet (endpoints with scraped request counts, experiments) through real agents, spools and
gRPC. Every report is computed through the Query service's code path (reports.run) four times:
1. before any sealing (every hour read raw);
2. after a sealing pass (whole hours from gpu_hours, alloc_hours and endpoint_use);
3. after every stored window was inserted a second time, as a resend inserts it, with the rollup marks a
   commit writes (the rollups are then stale: those host-hours are read raw again, through FINAL);
4. after sealing again (the rollups rebuilt from the duplicated raw tables).
All four must agree, on an hour-aligned range and on a ragged one.
"""

from __future__ import annotations

import math

import pytest

from gpuledger.collector import reports
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import Collector
from gpuledger.collector.store import Store
from gpuledger.demo import run_fleet
from gpuledger.demo_workflow import run_workflow_fleet
from gpuledger.schema import from_ipc
from gpuledger.v1 import telemetry_pb2 as pb

HOUR_MS = 3_600_000
HOURS = 3.0

CASES = [("idle", "host", {}), ("idle", "gpu", {}), ("cost", "team", {}), ("cost", "experiment", {}),
         ("cost", "endpoint", {}), ("cost", "host", {}), ("focus", "hour", {}), ("heatmap", "gpu", {}),
         ("endpoints", "", {}), ("runs", "", {}), ("baseline", "", {}),
         ("baseline", "", {"serving_min_active": "0.2"})]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rollups")
    store = Store(f"chdb://{tmp / 'chdb'}")
    # the sealer's own thread stays off: the test decides when hours are sealed
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0", run_sealer=False)
    c.start()
    now_h = c.clock.now_us() // 1000 // HOUR_MS * HOUR_MS
    start_us = (now_h - 4 * HOUR_MS) * 1000
    run_fleet(c.address, tmp / "spool", n_hosts=4, hours=HOURS, seed=5, start_us=start_us)
    run_workflow_fleet(c.address, tmp / "wspool", HOURS, start_us=start_us, scrape="direct")
    yield c, start_us // 1000
    c.stop(grace_s=1)
    store.close()


def _figures(c, since: int, until: int) -> dict:
    out = {}
    now = c.clock.now_us() // 1000
    for report, by, filters in CASES:
        reply = reports.run(c.store, c.pricing, pb.ReportRequest(report=report, since_ms=since, until_ms=until,
                                                                 by=by, filters=filters), now)
        out[(report, by, tuple(filters.items()))] = from_ipc(reply.arrow).to_pylist() if reply.arrow else []
    return out


def _same(a, b, path="") -> None:
    """Equal, floats to 1e-9 relative (sums taken in another order), everything else exactly."""
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), f"{path}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        assert len(a) == len(b), f"{path}: {len(a)} rows != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, str) and a.startswith("{") and isinstance(b, str):  # the baseline's JSON document
        import json

        _same(json.loads(a), json.loads(b), path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _count(store, table: str, final: bool = False) -> int:
    return int(store.query_rows(f"SELECT count() FROM {store.db}.{table}{' FINAL' if final else ''}")[0][0])


def test_reports_are_the_same_raw_sealed_resent_and_resealed(fleet):
    c, start_ms = fleet
    store = c.store
    aligned = (start_ms, start_ms + int(HOURS) * HOUR_MS)
    ragged = (start_ms + 1_234_567, start_ms + int(HOURS) * HOUR_MS - 987_654)
    raw = {r: _figures(c, *r) for r in (aligned, ragged)}
    # the fixture's fleet has what every report needs: endpoints with counts, tagged training, runs
    assert raw[aligned][("endpoints", "", ())] and raw[aligned][("runs", "", ())]
    assert any(r["requests"] for r in raw[aligned][("endpoints", "", ())])
    assert _count(store, "gpu_hours") == _count(store, "endpoint_use") == 0

    assert c.sealer.seal_now(settle_s=0) > 0
    assert _count(store, "gpu_hours") and _count(store, "alloc_hours") and _count(store, "endpoint_use")
    for r in (aligned, ragged):
        _same(raw[r], _figures(c, *r), f"sealed {r}")

    # every window stored a second time, as a resend stores it, and the marks its commit writes
    db = store.db
    for table in ("gpu_windows", "proc_windows", "endpoint_windows"):
        n = _count(store, table)
        store.command(f"INSERT INTO {db}.{table} SELECT * FROM {db}.{table}")
        assert _count(store, table) == 2 * n and _count(store, table, final=True) == n
    mark = c.clock.now_us()
    store.command(f"""INSERT INTO {db}.rollup_marks SELECT host_id, hour_ms, {mark}
                      FROM {db}.rollup_built GROUP BY host_id, hour_ms""")
    for r in (aligned, ragged):
        _same(raw[r], _figures(c, *r), f"resent, stale rollups read raw {r}")

    assert c.sealer.seal_now(settle_s=0) > 0
    for r in (aligned, ragged):
        _same(raw[r], _figures(c, *r), f"resealed {r}")
