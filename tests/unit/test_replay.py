"""Replay of hand-made nvidia-smi CSV logs: exact states, broken lines, gaps, thresholds, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gpuledger.agent.cli_nvml import replay as replay_cmd
from gpuledger.agent.replay import ReplayError, ReplaySource, parse_log, replay
from gpuledger.agent.windows import Windower
from gpuledger.config import AgentConfig

LOGS = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi"
A100 = LOGS / "a100-2gpu-5s.csv"
T4 = LOGS / "t4-nounits-1s.csv"
GPU0 = "GPU-0a1b2c3d-0000-4000-8000-000000000000"
GPU1 = "GPU-0a1b2c3d-0000-4000-8000-000000000001"
A100_START_US = 1_709_542_800_000_000  # 2024-03-04 09:00:00 UTC


def states(t) -> tuple:
    return (t.active_s, t.idle_held_s, t.idle_free_s, t.unmonitored_s)


def fold(src: ReplaySource, start_us: int, end_us: int) -> dict[str, dict[str, int]]:
    w = Windower(src.gpus(), 10.0, 0.0, start_us=start_us)
    w.add(src.poll(end_us))
    t = w.close(end_us, final=True).gpu
    out: dict[str, dict[str, int]] = {}
    for i, uuid in enumerate(t.column("gpu_uuid").to_pylist()):
        acc = out.setdefault(uuid, {c: 0 for c in ("busy_ms", "idle_held_ms", "idle_free_ms", "unmonitored_ms")})
        for c in acc:
            acc[c] += int(t.column(c)[i].as_py())
    return out


def test_broken_lines_are_reported_with_their_numbers_and_skipped():
    log = parse_log(A100)
    assert (log.lines, log.imported, log.skipped_count) == (25, 21, 4)
    assert [(s.line_no, s.reason) for s in log.skipped] == [
        (8, "expected 9 fields, got 4"),
        (10, "utilization.gpu: 'abc %' is not a number"),
        (13, "timestamp not after line 12 of the same GPU"),
        (17, "timestamp '2024/13/45 09:00:32.000' is not YYYY/MM/DD HH:MM:SS[.fff]"),
    ]
    assert [len(g.ts) for g in log.gpus] == [13, 8]  # a repeated header and a blank line are not data


def test_each_line_covers_the_time_since_the_previous_line_of_its_gpu():
    src = ReplaySource(parse_log(A100), "h1", 1024)
    assert [g.uuid for g in src.gpus()] == [GPU0, GPU1]
    assert src.interval_us == [5_000_000, 5_000_000]
    assert [g.util_method for g in src.gpus()] == ["replay", "replay"]
    assert src.gpus()[0].mem_total_bytes == 40960 << 20
    # GPU 0: 50 % + 100 % + 20 % lines; 0 % at >= 1024 MiB held, below free; an [N/A] line unmonitored
    assert states(src.truth[0]) == (8.5, 26.5, 20.0, 5.0)
    # GPU 1: a 20 s gap (> 3 x 5 s) unmonitored; a 15 s gap (= 3 intervals) still covered by its line
    assert states(src.truth[1]) == (9.5, 20.5, 10.0, 20.0)


def test_windows_carry_the_exact_states():
    src = ReplaySource(parse_log(A100), "h1", 1024)
    end = A100_START_US + 60_000_000
    win = fold(src, A100_START_US, end)
    assert win[GPU0] == {"busy_ms": 8500, "idle_held_ms": 26500, "idle_free_ms": 20000, "unmonitored_ms": 5000}
    assert win[GPU1] == {"busy_ms": 9500, "idle_held_ms": 20500, "idle_free_ms": 10000, "unmonitored_ms": 20000}


def test_gauges_are_replayed_and_missing_values_are_nan():
    src = ReplaySource(parse_log(A100), "h1", 1024)
    r = src.poll(A100_START_US + 60_000_000)
    g0 = r.gauges.gpu == 0
    assert r.gauges.power_mw[g0][1] == pytest.approx(210_550.0)
    assert r.gauges.mem_used_bytes[g0][1] == 30000 << 20
    assert (r.gauges.power_mw[r.gauges.gpu == 1] != r.gauges.power_mw[r.gauges.gpu == 1]).all()  # [Not Supported]
    assert (r.gauges.energy_mj != r.gauges.energy_mj).all()  # the CSV has no energy counter
    assert src.poll(A100_START_US + 60_000_000).util.gpu.size == 0  # nothing is handed out twice


@pytest.mark.parametrize("threshold, expected", [
    (1024, (3.0, 13.0, 10.0, 4.0)),  # 800 MiB at 0 % is idle-free
    (512, (3.0, 23.0, 0.0, 4.0)),  # ... and idle-held once the threshold is below it
])
def test_nounits_log_keyed_by_bus_id_with_threshold(threshold, expected):
    log = parse_log(T4)
    assert (log.lines, log.skipped_count) == (29, 1)
    assert log.skipped[0].line_no == 9 and log.skipped[0].reason == "expected 7 fields, got 8"
    src = ReplaySource(log, "t4-box", threshold)
    (g,) = src.gpus()
    assert g.uuid == "GPU-replay-t4-box-00000000:00:1E.0" and g.name == "Tesla T4"
    assert src.interval_us == [1_000_000]
    assert states(src.truth[0]) == pytest.approx(expected)  # a 4 s gap (> 3 x 1 s) unmonitored


def test_timestamps_are_read_in_the_given_time_zone():
    utc = ReplaySource(parse_log(A100), "h")
    berlin = ReplaySource(parse_log(A100, tz="Europe/Berlin"), "h")
    assert utc.first_us - berlin.first_us == 3_600_000_000  # CET is UTC+1 in March


def test_a_log_without_header_or_utilization_cannot_be_replayed(tmp_path):
    f = tmp_path / "noheader.csv"
    f.write_text("2024/03/04 09:00:00.000, 0, 5 %, 100 MiB\n")
    with pytest.raises(ReplayError, match="data before any header line.*--columns"):
        parse_log(f)
    f.write_text("timestamp, index, memory.used [MiB]\n2024/03/04 09:00:00.000, 0, 100 MiB\n")
    with pytest.raises(ReplayError, match="utilization.gpu"):
        parse_log(f)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    from gpuledger.demo import start_embedded_collector

    c = start_embedded_collector(tmp_path_factory.mktemp("collector"))
    yield c
    c.stop()


def _stored(collector, host: str) -> tuple:
    from gpuledger.collector.pricing import Pricing
    from gpuledger.collector.reports import idle_rows

    rows = [r for r in idle_rows(collector.store, Pricing.default(), A100_START_US // 1000 - 3_600_000,
                                 A100_START_US // 1000 + 3_600_000, "host", {}) if r["host"] == host]
    assert len(rows) == 1
    r = rows[0]
    return r["gpus"], tuple(round(r[k] * 3600, 6) for k in ("active_hours", "idle_held_hours", "idle_free_hours",
                                                              "unmonitored_hours"))


def test_replay_through_a_real_collector_stores_the_exact_hours(collector, tmp_path):
    cfg = AgentConfig(host_id="replayed-a100", provider="aws", region="us-east-1", instance_type="p4d.24xlarge",
                      collector=collector.address).validate()
    summary = replay(A100, cfg, spool_dir=tmp_path / "spool", drain_timeout_s=60)
    assert summary.complete and summary.pending_batches == 0 and summary.rejected_batches == 0
    assert summary.acked_windows == summary.windows == 12  # 2 GPUs x 6 windows
    assert (summary.lines, summary.imported, summary.skipped) == (25, 21, 4)
    assert states(summary.states) == (18.0, 47.0, 30.0, 25.0)
    assert _stored(collector, "replayed-a100") == (2, (18.0, 47.0, 30.0, 25.0))
    # replaying the same log again (a new spool, new sequence numbers) doubles nothing
    again = replay(A100, cfg, spool_dir=tmp_path / "spool2", drain_timeout_s=60)
    assert again.complete
    assert _stored(collector, "replayed-a100") == (2, (18.0, 47.0, 30.0, 25.0))


def test_replay_command_prints_the_summary_and_exits_once_acknowledged(collector):
    app = typer.Typer()
    app.command()(replay_cmd)

    @app.command()
    def _unused() -> None:  # a second command keeps typer from collapsing the app to one command
        pass

    res = CliRunner().invoke(app, ["replay", str(A100), "--host", "replayed-cli", "--provider", "aws", "--region",
                                   "us-east-1", "--instance-type", "p4d.24xlarge", "--collector", collector.address,
                                   "--idle-mem-threshold-mib", "100000"])
    assert res.exit_code == 0, res.output
    assert "21 imported, 4 skipped" in res.output
    assert "timestamps read as local time in UTC" in res.output and "--timezone" in res.output
    assert "line 10: utilization.gpu: 'abc %' is not a number" in res.output
    assert "12 windows in 2 batches; acknowledged 2 batches (12 windows)" in res.output  # the data and the stop
    # with a threshold above every memory reading, only the >0 % lines are held
    assert _stored(collector, "replayed-cli") == (2, (18.0, 22.0, 55.0, 25.0))


def test_replay_command_without_a_collector_exits_non_zero(tmp_path):
    app = typer.Typer()
    app.command()(replay_cmd)

    @app.command()
    def _unused() -> None:
        pass

    res = CliRunner().invoke(app, ["replay", str(A100), "--host", "x", "--provider", "aws", "--region", "us-east-1",
                                   "--instance-type", "p4d.24xlarge", "--collector", "127.0.0.1:1",
                                   "--spool-dir", str(tmp_path / "spool"), "--timeout-s", "1"])
    assert res.exit_code == 1
    assert "NOT COMPLETE" in res.output and "2 batches still unacknowledged" in res.output
    assert "the collector at 127.0.0.1:1 was unreachable (StatusCode.UNAVAILABLE" in res.output
    assert "REJECTED" not in res.output
