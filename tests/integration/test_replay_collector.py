"""Replay through a real collector (gRPC on 127.0.0.1:0, chDB): coarse logs store exactly the
replay's one-pass truth; a refused batch is reported with the collector's own reason."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpuledger.agent.replay import replay
from gpuledger.clock import SimClock
from gpuledger.config import AgentConfig
from tests.unit.test_replay_exact import coarse, write_log


def _cfg(host: str, collector) -> AgentConfig:
    return AgentConfig(host_id=host, provider="aws", region="us-east-1", instance_type="p4d.24xlarge",
                       collector=collector.address).validate()


def _stored(collector, host: str) -> tuple[int, int, int, int]:
    return tuple(collector.store.query_rows(
        "SELECT sum(busy_ms), sum(idle_held_ms), sum(idle_free_ms), count() FROM gpuledger.gpu_windows FINAL "
        f"WHERE host_id = '{host}'")[0])


def test_coarse_logs_store_the_replays_truth(collector, tmp_path):
    """Regression: at 60 s and 300 s intervals and the default 1 h step the collector used to store
    1.3 % and 7 % less active and idle time than the replay's own summary printed."""
    for interval_s in (60, 300):
        n = 4 * 3600 // interval_s
        log = write_log(tmp_path / f"coarse-{interval_s}.csv",
                        [coarse(interval_s, n, 0), coarse(interval_s * 2 // 3, n * 3 // 2, 1)])
        host = f"coarse-{interval_s}"
        s = replay(log, _cfg(host, collector), spool_dir=tmp_path / host, drain_timeout_s=60)
        assert s.complete and s.rejected_batches == 0 and s.acked_windows == s.windows
        busy, held, free, windows = _stored(collector, host)
        assert windows == s.windows
        t = s.states
        assert t.active_s > 0 and t.idle_held_s > 0 and t.idle_free_s > 0 and t.unmonitored_s > 0
        # whole-ms rounding: at most 1 ms per window and state
        assert busy == pytest.approx(t.active_s * 1000, abs=windows)
        assert held == pytest.approx(t.idle_held_s * 1000, abs=windows)
        assert free == pytest.approx(t.idle_free_s * 1000, abs=windows)


def test_a_refused_batch_is_reported_with_the_collectors_reason(collector, tmp_path):
    """A log read in a zone west of the one it was written in is future-dated for the collector.
    Here this machine's clock is set ahead too, so the up-front check lets it through: the user
    sees the collector's refusal, not 'unreachable'."""
    log = tmp_path / "future.csv"
    log.write_text("timestamp, utilization.gpu [%], memory.used [MiB]\n"
                   "2099/01/01 00:00:00.000, 50 %, 2000 MiB\n2099/01/01 00:00:05.000, 50 %, 2000 MiB\n")
    clock = SimClock(int(datetime(2099, 1, 1, 1, tzinfo=UTC).timestamp() * 1e6))
    s = replay(log, _cfg("future-host", collector), spool_dir=tmp_path / "spool", wall_clock=clock,
               drain_timeout_s=30)
    # the batch and the stop that closes the replay both name a future time: both refused, with the reason
    assert not s.complete and s.rejected_batches == 2 and s.pending_batches == 0 and not s.unreachable
    assert len(s.rejections) == 2 and all("4070908800000 is in the future" in r[2] for r in s.rejections)
    text = s.render()
    assert "REJECTED by the collector: 2 batches" in text
    assert "4070908800000 is in the future" in text
    assert "unreachable" not in text and "NOT COMPLETE: the batches above were refused" in text
    assert _stored(collector, "future-host")[3] == 0
