"""The collector's insert-latency histogram counts every group commit once, through the writer's
`on_commit` hook, and is cumulative: the writer's own bounded list of recent latencies plays no part."""

from __future__ import annotations

import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpuledger.metrics import LATENCY_BUCKETS, collector_registry, insert_latency


def histogram(reg) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        if fam.name == "gpuledger_collector_insert_seconds":
            for s in fam.samples:
                key = s.name[len(fam.name):] + (f"{{le={s.labels['le']}}}" if "le" in s.labels else "")
                out[key] = s.value
    return out


def commit(writer, seconds: float) -> float:
    """One resolved group commit of the real Writer, its latency `seconds` (an empty group: the
    bookkeeping Writer._resolve does after every insert, without a store round trip). Returns the
    latency the writer measured (`seconds` and the few microseconds of the call)."""
    writer._resolve([], 0, None, time.perf_counter() - seconds)
    return writer.last_insert_s


def assert_not_backwards(before: dict, after: dict) -> None:
    for k, v in before.items():
        assert after[k] >= v, (k, v, after[k])


def test_every_commit_is_counted_however_many_pass_between_scrapes(collector):
    reg = collector_registry(collector)
    w = collector.writer
    prev = histogram(reg)
    assert prev["_count"] == 0 and set(prev) >= {f"_bucket{{le={b}}}" for b in LATENCY_BUCKETS}
    measured: list[float] = []
    for n in (1000, 5000, 1000):  # 5000 is more than the writer's list of recent latencies keeps
        measured += [commit(w, 0.3 if i % 10 == 0 else 0.001) for i in range(n)]
        now = histogram(reg)
        assert_not_backwards(prev, now)
        prev = now
    assert prev["_count"] == prev["_bucket{le=+Inf}"] == 7000
    for b in LATENCY_BUCKETS:  # each bucket holds exactly the commits the writer measured at most b
        assert prev[f"_bucket{{le={b}}}"] == sum(x <= b for x in measured), b
    assert prev["_bucket{le=0.25}"] <= 6300 and prev["_bucket{le=0.5}"] == 7000  # 700 of 0.3 s, the rest 1 ms
    assert prev["_sum"] == pytest.approx(sum(measured), rel=1e-12)


def test_commits_fill_their_buckets_and_a_second_registry_shares_the_histogram(collector):
    w = collector.writer
    reg = collector_registry(collector)
    assert w.on_commit is not None
    measured = [commit(w, s) for s in (0.02, 0.2, 2.0)]
    h = histogram(reg)
    assert h["_count"] == 3 and h["_sum"] == pytest.approx(sum(measured), rel=1e-12)
    assert h["_bucket{le=0.01}"] == 0 and h["_bucket{le=+Inf}"] == 3
    for b in LATENCY_BUCKETS:
        assert h[f"_bucket{{le={b}}}"] == sum(x <= b for x in measured), b
    reg2 = collector_registry(collector)  # a second registry on the same writer: the same histogram,
    assert insert_latency(w) is insert_latency(w)
    commit(w, 0.02)  # and one more commit is counted once, not once per registry
    assert histogram(reg)["_count"] == histogram(reg2)["_count"] == 4


def test_an_existing_commit_hook_is_kept_and_its_failure_loses_no_count(collector, caplog):
    w = collector.writer
    seen = []

    def existing(seconds):
        seen.append(seconds)
        raise RuntimeError("a hook of someone else's")

    w.on_commit = existing
    reg = collector_registry(collector)
    measured = [commit(w, s) for s in (0.002, 0.04)]
    assert seen == measured  # the hook that was there still gets every commit
    h = histogram(reg)
    assert h["_count"] == 2 and h["_sum"] == pytest.approx(sum(measured), rel=1e-12)
    failures = [r for r in caplog.records if r.exc_info and str(r.exc_info[1]) == "a hook of someone else's"]
    assert len(failures) == 2  # logged by the writer; the commits went on
