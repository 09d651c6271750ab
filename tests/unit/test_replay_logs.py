"""Real nvidia-smi logs (tests/fixtures/nvidia-smi/README.md names their sources) and the shapes
they come in: no GPU column, columns in any order, noheader with --columns, zones and offsets."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gpuledger.agent.cli_nvml import replay as replay_cmd
from gpuledger.agent.replay import (
    ReplayError,
    ReplaySource,
    check_not_ahead,
    parse_columns,
    parse_log,
    replay,
    zone,
)
from gpuledger.agent.windows import Windower
from gpuledger.clock import SimClock
from gpuledger.config import AgentConfig

LOGS = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi"
OMNIOPT = LOGS / "omniopt2-a100x4-noheader-10s.csv"
OMNIOPT_COLUMNS = ("timestamp, name, pci.bus_id, driver_version, pstate, pcie.link.gen.max, pcie.link.gen.current, "
                   "temperature.gpu, utilization.gpu [%], utilization.memory [%], memory.total [MiB], "
                   "memory.free [MiB], memory.used [MiB]")
CLAAUDIA = LOGS / "claaudia-v100-index-first-5s.csv"
SIGMA2 = LOGS / "sigma2-saga-no-gpu-column-1s.csv"
MIRIS = LOGS / "miris-v100s-1s.csv"


def states(t) -> tuple:
    return (t.active_s, t.idle_held_s, t.idle_free_s, t.unmonitored_s)


def one_pass(path: Path, columns: list[str] | None = None, threshold_mib: float = 1024) -> dict[str, tuple]:
    """The rules applied to the file's text directly, without the replay's parser: per GPU key the
    seconds active, idle-held, idle-free and unmonitored."""
    lines = path.read_text().splitlines()
    if columns is None:
        columns, lines = [c.strip().split(" [")[0] for c in lines[0].split(",")], lines[1:]
    col = {c: i for i, c in enumerate(columns)}
    per_gpu: dict[str, list] = {}
    for line in lines:
        f = [x.strip() for x in line.split(",")]
        key = f[col["pci.bus_id"]] if "pci.bus_id" in col else f[col["index"]] if "index" in col else "gpu"
        ts = datetime.strptime(f[col["timestamp"]], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=UTC)
        pct = float(f[col["utilization.gpu"]].rstrip(" %"))
        mem = float(f[col["memory.used"]].split()[0]) if "memory.used" in col else None
        per_gpu.setdefault(key, []).append((ts.timestamp(), pct, mem))
    out = {}
    for key, rows in per_gpu.items():
        rows.sort()
        gaps = sorted(b[0] - a[0] for a, b in zip(rows, rows[1:], strict=False))
        n = len(gaps)
        median = (gaps[(n - 1) // 2] + gaps[n // 2]) / 2
        active = held = free = unmon = 0.0
        for (t0, _, _), (t1, pct, mem) in zip(rows, rows[1:], strict=False):
            d = t1 - t0
            if d > 3 * median + 1e-9:
                unmon += d
                continue
            active += d * pct / 100
            if pct > 0 or (mem is not None and mem >= threshold_mib):
                held += d * (1 - pct / 100)
            else:
                free += d * (1 - pct / 100)
        out[key] = (active, held, free, unmon)
    return out


def folded_ms(src: ReplaySource) -> list[int]:
    """busy, idle-held, idle-free ms summed over the windows of one poll at the log's end."""
    w = Windower(src.gpus(), 10.0, 0.0, start_us=src.first_us, kernels="numpy")
    w.add(src.poll(src.last_us))
    t = w.close(src.last_us, final=True).gpu
    return [sum(t.column(c).to_pylist()) for c in ("busy_ms", "idle_held_ms", "idle_free_ms")]


def test_multi_gpu_noheader_log_read_with_columns():
    parsed = parse_log(OMNIOPT, columns=parse_columns(OMNIOPT_COLUMNS))
    assert (parsed.lines, parsed.imported, parsed.skipped_count) == (21, 21, 0)
    assert parsed.columns_from == "--columns" and not parsed.single_gpu
    assert [(g.key, len(g.ts)) for g in parsed.gpus] == [
        ("00000000:C1:00.0", 6), ("00000000:40:00.0", 4), ("00000000:90:00.0", 5), ("00000000:3B:00.0", 6)]
    src = ReplaySource(parsed, "omniopt")
    assert {f.name for f in src.gpus()} == {"NVIDIA A100-SXM4-40GB"}
    assert src.gpus()[0].mem_total_bytes == 40960 << 20
    assert src.interval_us == [10_066_000, 10_058_000, 10_068_000, 10_046_000]
    want = one_pass(OMNIOPT, [c.strip().split(" [")[0] for c in OMNIOPT_COLUMNS.split(",")])
    for g, t in zip(parsed.gpus, src.truth, strict=True):
        assert states(t) == pytest.approx(want[g.key], abs=1e-6)
    # 00000000:C1:00.0 by hand: 13 % and 4 % lines at < 1024 MiB (held: a kernel ran), the rest 0 % at 4-7 MiB
    assert states(src.truth[0]) == pytest.approx((0.13 * 10.052 + 0.04 * 10.512, 0.87 * 10.052 + 0.96 * 10.512,
                                                  50.755 - 10.052 - 10.512, 0.0))
    total = src.total_truth()
    assert folded_ms(src) == pytest.approx([total.active_s * 1e3, total.idle_held_s * 1e3, total.idle_free_s * 1e3],
                                           abs=25)  # whole-ms rounding, at most 1 ms per window and state


def test_a_noheader_log_without_columns_is_refused_with_the_way_in():
    with pytest.raises(ReplayError, match=r"line 1: data before any header line.*--columns"):
        parse_log(OMNIOPT)


def test_index_first_column_order():
    parsed = parse_log(CLAAUDIA)
    assert (parsed.lines, parsed.imported) == (17, 17)
    (g,) = parsed.gpus
    assert (g.key, g.index, len(g.ts)) == ("index-0", 0, 17)
    src = ReplaySource(parsed, "aicloud")
    assert src.interval_us == [5_002_000]
    assert states(src.truth[0]) == pytest.approx(one_pass(CLAAUDIA)["0"], abs=1e-6)
    assert src.truth[0].active_s + src.truth[0].idle_held_s == pytest.approx(80.039)  # 30994 MiB used: all held
    assert src.truth[0].idle_free_s == 0


def test_single_gpu_log_without_a_gpu_column():
    parsed = parse_log(SIGMA2)
    assert parsed.single_gpu and [len(g.ts) for g in parsed.gpus] == [4]
    src = ReplaySource(parsed, "saga-node")
    (g,) = src.gpus()
    assert (g.uuid, g.index) == ("GPU-replay-saga-node-gpu", 0)
    # three 82 % intervals (1.001 s, 1 s, 1 s); no memory column: a kernel ran, so the rest is held
    assert states(src.truth[0]) == pytest.approx((0.82 * 3.001, 0.18 * 3.001, 0.0, 0.0))
    assert states(src.truth[0]) == pytest.approx(one_pass(SIGMA2)["gpu"], abs=1e-6)
    named = ReplaySource(parse_log(SIGMA2, gpu_uuid="GPU-8f3c1e2a-0000-4000-8000-00000000a100", gpu_index=3), "x")
    assert (named.gpus()[0].uuid, named.gpus()[0].index) == ("GPU-8f3c1e2a-0000-4000-8000-00000000a100", 3)


def test_memory_threshold_and_kernels_decide_idle_on_a_real_log():
    parsed = parse_log(MIRIS)
    assert (parsed.lines, parsed.imported, [g.key for g in parsed.gpus]) == (107, 107, ["index-0"])
    src = ReplaySource(parsed, "miris")
    assert states(src.truth[0]) == pytest.approx(one_pass(MIRIS)["0"], abs=1e-6)
    assert src.truth[0].unmonitored_s == 0
    # lines above 0 % below 1024 MiB (e.g. 9 % at 364 MiB) are held; 0 % at 1 MiB is free
    loose = ReplaySource(parse_log(MIRIS), "miris", idle_mem_threshold_mib=100_000)
    assert loose.truth[0].idle_held_s < src.truth[0].idle_held_s
    assert loose.truth[0].idle_held_s + loose.truth[0].idle_free_s == pytest.approx(
        src.truth[0].idle_held_s + src.truth[0].idle_free_s)
    assert folded_ms(src) == pytest.approx([t * 1e3 for t in states(src.truth[0])[:3]], abs=33)


def test_gpu_uuid_cannot_name_one_gpu_of_many():
    with pytest.raises(ReplayError, match="has 4 GPUs"):
        parse_log(OMNIOPT, columns=parse_columns(OMNIOPT_COLUMNS), gpu_uuid="GPU-x")
    with pytest.raises(ReplayError, match="--gpu-uuid"):
        parse_log(SIGMA2, gpu_uuid="GPU with spaces")


def test_columns_in_any_order_and_headers_repeated(tmp_path):
    f = tmp_path / "mem-first.csv"
    f.write_text("timestamp, memory.used [MiB], utilization.gpu [%]\n"
                 "2026/02/02 01:07:37.100, 17092 MiB, 0 %\n"
                 "timestamp, memory.used [MiB], utilization.gpu [%]\n"
                 "2026/02/02 01:07:52.106, 17406 MiB, 50 %\n"
                 "2026/02/02 01:08:07.107, 500 MiB, 0 %\n")
    src = ReplaySource(parse_log(f), "h")
    assert src.parsed.lines == 3
    assert states(src.truth[0]) == pytest.approx((7.503, 7.503, 15.001, 0.0))


@pytest.mark.parametrize("spec, message", [
    ("timestamp,index,memory.used", "no utilization.gpu column"),
    ("index,utilization.gpu", "no timestamp column"),
    ("timestamp,utilization.gpu,,memory.used", "must name every column"),
    ("timestamp,utilization.gpu [%],utilization.gpu", "named twice"),
])
def test_bad_columns_are_named(spec, message):
    with pytest.raises(ReplayError, match=message):
        parse_columns(spec)


def test_timestamps_with_offsets_unix_times_and_zones(tmp_path):
    f = tmp_path / "mixed.csv"
    f.write_text("timestamp, index, utilization.gpu\n"
                 "2025-09-08T17:26:50+08:00, 0, 10\n"
                 "2025-09-08T09:27:00Z, 0, 10\n"
                 "1757323630.5, 0, 10\n")
    parsed = parse_log(f, tz="America/New_York")  # no line is read in the zone
    assert list(parsed.gpus[0].ts) == [1_757_323_610_000_000, 1_757_323_620_000_000, 1_757_323_630_500_000]
    assert parsed.zoned_lines == 0
    with pytest.raises(ReplayError, match="--timezone: 'Mars/Olympus' is not a time zone name"):
        zone("Mars/Olympus")


def test_the_hour_a_clock_is_set_back_comes_twice(tmp_path):
    f = tmp_path / "dst.csv"  # Europe/Berlin leaves summer time at 03:00 CEST -> 02:00 CET on 2026-10-25
    f.write_text("timestamp, index, utilization.gpu\n" + "".join(
        f"2026/10/25 {t}, 0, 50\n" for t in ("01:50:00.000", "02:20:00.000", "02:50:00.000", "02:20:00.000",
                                             "02:50:00.000", "03:20:00.000")))
    parsed = parse_log(f, tz="Europe/Berlin")
    assert parsed.skipped_count == 0
    ts = list(parsed.gpus[0].ts)
    assert [b - a for a, b in zip(ts, ts[1:], strict=False)] == [1_800_000_000] * 5


def test_a_log_ahead_of_the_clock_is_refused_with_a_zone_hint(tmp_path):
    """A UTC+9 host's log replayed as UTC right after it was written runs 9 h ahead of the clock."""
    f = tmp_path / "tokyo.csv"
    f.write_text("timestamp, index, utilization.gpu [%], memory.used [MiB]\n"
                 "2026/11/02 17:00:00.000, 0, 50 %, 2000 MiB\n2026/11/02 17:00:05.000, 0, 50 %, 2000 MiB\n")
    now_us = int(datetime(2026, 11, 2, 8, 1, tzinfo=UTC).timestamp() * 1e6)
    parsed = parse_log(f)
    with pytest.raises(ReplayError, match=r"9\.0 h ahead of this machine's clock.*--timezone.*Etc/GMT-9"):
        check_not_ahead(parsed, parsed.gpus[0].ts[-1], now_us, f)
    tokyo = parse_log(f, tz="Asia/Tokyo")
    check_not_ahead(tokyo, tokyo.gpus[0].ts[-1], now_us, f)  # read in its own zone it is in the past
    cfg = AgentConfig(host_id="tokyo", collector="127.0.0.1:1").validate()
    with pytest.raises(ReplayError, match="ahead of this machine's clock"):  # refused before anything is sent
        replay(f, cfg, spool_dir=tmp_path / "spool", wall_clock=SimClock(now_us), drain_timeout_s=0.1)
    assert not (tmp_path / "spool").exists()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(replay_cmd)

    @app.command()
    def _unused() -> None:  # a second command keeps typer from collapsing the app to one command
        pass

    return app


ARGS = ["--host", "cli-host", "--provider", "onprem", "--region", "lab", "--instance-type", "a100-box"]


def test_cli_refuses_a_future_log_and_a_bad_zone_with_exit_2(tmp_path):
    f = tmp_path / "future.csv"
    f.write_text("timestamp, utilization.gpu [%]\n2099/01/01 00:00:00.000, 5 %\n2099/01/01 00:00:05.000, 5 %\n")
    res = CliRunner().invoke(_app(), ["replay", str(f), *ARGS, "--collector", "127.0.0.1:1"])
    assert res.exit_code == 2
    assert "ahead of this machine's clock" in res.output and "--timezone" in res.output
    res = CliRunner().invoke(_app(), ["replay", str(f), *ARGS, "--timezone", "Nowhere/Land"])
    assert res.exit_code == 2 and "'Nowhere/Land' is not a time zone name" in res.output
    res = CliRunner().invoke(_app(), ["replay", str(OMNIOPT), *ARGS, "--columns", "timestamp,memory.used"])
    assert res.exit_code == 2 and "--columns: no utilization.gpu column" in res.output
    res = CliRunner().invoke(_app(), ["replay", str(OMNIOPT), *ARGS])
    assert res.exit_code == 2 and "needs --columns" in res.output


RULES = (
    "each line covers the time since the previous line of the same GPU",
    "utilization.gpu % of that time is active",
    "a gap longer than three logging intervals (the median spacing of that GPU's lines), or a line without a "
    "utilization value, is unmonitored",
    "without process data the rest of the interval is idle-held when the line's memory used is at least 1024 MiB",
    "or the line is above 0 % (a kernel ran, so a process held the GPU), else idle-free",
    "the log's end is the end of what is known: no time is expected after its last line, nor before its first",
    "malformed lines are reported with their line numbers and skipped",
)


def test_readme_and_module_docstring_state_the_same_rules():
    import gpuledger.agent.replay as module

    def norm(text: str) -> str:
        return " ".join(text.replace("`", "").lower().split())

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Backfilling from logs you already have"):readme.index("## Reading the reports")]
    for rule in RULES:
        assert norm(rule) in norm(section), f"README lacks: {rule}"
        assert norm(rule) in norm(module.__doc__), f"replay.py docstring lacks: {rule}"
