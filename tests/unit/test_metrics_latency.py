"""The collector's insert-latency histogram is cumulative: it never goes backwards when the writer
trims its list of recent latencies, and with an `on_commit` hook it counts every commit once."""

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


def commit(writer, seconds: float) -> None:
    """One resolved group commit of the real Writer, its latency `seconds` (an empty group: the
    bookkeeping Writer._resolve does after every insert, without a store round trip)."""
    writer._resolve([], 0, None, time.perf_counter() - seconds)


def assert_not_backwards(before: dict, after: dict) -> None:
    for k, v in before.items():
        assert after[k] >= v, (k, v, after[k])


def test_histogram_is_cumulative_across_the_writers_trims(collector):
    reg = collector_registry(collector)
    w = collector.writer
    prev = histogram(reg)
    assert prev["_count"] == 0 and set(prev) >= {f"_bucket{{le={b}}}" for b in LATENCY_BUCKETS}
    slow = 0
    for _round in range(6):
        for i in range(1000):
            s = 0.3 if i % 10 == 0 else 0.001
            slow += s == 0.3
            commit(w, s)
        now = histogram(reg)
        assert_not_backwards(prev, now)
        prev = now
    assert len(w.insert_latency_s) < 6000  # the writer trimmed its list (twice) meanwhile
    assert prev["_count"] == 6000
    assert prev["_bucket{le=0.25}"] == 6000 - slow and prev["_bucket{le=+Inf}"] == 6000
    assert prev["_bucket{le=0.5}"] == 6000 and slow == 600
    assert 0.3 * 600 < prev["_sum"] < 0.3 * 600 + 0.01 * 6000


def test_more_commits_than_the_list_keeps_between_scrapes_lose_some_but_never_go_back(collector):
    reg = collector_registry(collector)
    w = collector.writer
    for _ in range(100):
        commit(w, 0.002)
    first = histogram(reg)
    for _ in range(5000):  # over 4096 between two scrapes: the writer trims entries no scrape saw
        commit(w, 0.002)
    second = histogram(reg)
    assert_not_backwards(first, second)
    assert first["_count"] == 100 and 100 < second["_count"] <= 5100


def test_on_commit_hook_counts_each_commit_once(collector):
    w = collector.writer
    w.on_commit = None  # the Writer attribute the lead adds; the registry hooks the histogram to it
    reg = collector_registry(collector)
    assert insert_latency(w).hooked and w.on_commit is not None
    for s in (0.02, 0.2, 2.0):
        commit(w, s)  # appends to the bounded list, which a hooked histogram no longer reads
        w.on_commit(s)  # what Writer._resolve is to call after each commit
    h = histogram(reg)
    assert h["_count"] == 3 and h["_sum"] == pytest.approx(2.22)
    assert (h["_bucket{le=0.025}"], h["_bucket{le=0.25}"], h["_bucket{le=2.5}"]) == (1, 2, 3)
    collector_registry(collector)  # a second registry on the same writer shares the histogram
    w.on_commit(0.02)
    assert histogram(reg)["_count"] == 4
