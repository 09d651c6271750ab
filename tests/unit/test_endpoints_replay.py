"""Endpoint policies and the simulated inference server, without a collector: the scale-to-zero
replay against hand-computed timelines, office-hours schedules in local time, and the simulated
vLLM server's exposition read back by the agent's real parser."""

from __future__ import annotations

import numpy as np
import pytest

from gpuledger.agent.scrape import SERVERS, parse_exposition
from gpuledger.agent.simulate import SimEndpoint, SimGpu, SimRun, SimulatedSource, Traffic
from gpuledger.collector.endpoints import EndpointError, Options, Schedule, replay_scale_to_zero

W = 10_000  # ms
MON = 1_767_571_200_000  # 2026-01-05T00:00:00Z, a Monday


def timeline(busy_slots: list[range], n: int = 720):
    starts = np.arange(n, dtype=np.int64) * W
    busy = np.zeros(n, bool)
    for r in busy_slots:
        busy[list(r)] = True
    return starts, busy


def test_scale_to_zero_hand_computed():
    # 2 h of 10 s windows, 1.0 per window; traffic 0-10 min and 60-62 min; 15 idle minutes
    starts, busy = timeline([range(0, 60), range(360, 372)])
    saving, down, cold = replay_scale_to_zero(starts, W, busy, np.ones(720), 15 * 60_000, since_ms=0)
    # down from 10 + 15 = 25 min to 60 min (35 min = 210 windows), then from 62 + 15 = 77 min to
    # 120 min (43 min = 258 windows); the request at 60 min finds it down: one cold start
    assert saving == 468.0 and down.sum() == 468 and cold == 1
    assert not down[:150].any() and down[150:360].all() and not down[360:462].any() and down[462:].all()


def test_scale_to_zero_start_of_range_counts_as_served_and_gaps_cost_nothing():
    starts, busy = timeline([range(200, 201)], n=300)
    cost = np.ones(300)
    cost[100:150] = 0.0  # the endpoint was not up then (no GPU held): nothing to save
    saving, down, cold = replay_scale_to_zero(starts, W, busy, cost, 5 * 60_000, since_ms=0)
    # idle from the range's start: down from 5 min (window 30) to the request at window 200, and
    # from 200 + 1 + 30 = window 231 to the end
    assert down.sum() == (200 - 30) + (300 - 231)
    assert saving == (200 - 30 - 50) + (300 - 231) and cold == 1
    # windows not in the timeline at all (no rows) still let time pass
    keep = np.r_[0:100, 150:300]
    saving2, _, cold2 = replay_scale_to_zero(starts[keep], W, busy[keep], cost[keep], 5 * 60_000, since_ms=0)
    assert (saving2, cold2) == (saving, cold)


def test_scale_to_zero_with_no_timeout_and_back_to_back_traffic():
    starts, busy = timeline([range(0, 3), range(5, 8)], n=10)
    saving, down, cold = replay_scale_to_zero(starts, W, busy, np.ones(10), 0, since_ms=0)
    assert down.tolist() == [False] * 3 + [True] * 2 + [False] * 3 + [True] * 2
    assert saving == 4.0 and cold == 1  # back-to-back busy windows are not cold starts
    assert replay_scale_to_zero(starts[:0], W, busy[:0], np.ones(0), 0, 0) == (0.0, pytest.approx(np.zeros(0)), 0)


def test_office_hours_in_local_time_with_daylight_saving():
    utc = Schedule.parse("08:00-18:00", "mon-fri", "UTC")
    h = 3_600_000
    t = np.array([MON + 8 * h - 1, MON + 8 * h, MON + 18 * h - 1, MON + 18 * h, MON + 5 * 86_400_000 + 9 * h])
    assert utc.inside(t).tolist() == [False, True, True, False, False]  # the last one is a Saturday
    berlin = Schedule.parse("8-18", "mon-fri", "Europe/Berlin")
    july_mon = 1_783_296_000_000  # 2026-07-06T00:00:00Z, a Monday (CEST, UTC+2)
    assert berlin.inside(np.array([MON + 7 * h + 1_800_000, MON + 6 * h + 1_800_000])).tolist() == [True, False]
    assert berlin.inside(np.array([july_mon + 6 * h + 1_800_000, july_mon + 16 * h])).tolist() == [True, False]
    assert Schedule.parse("22:00-23:30", "sat-mon", "UTC").days == (0, 5, 6)


@pytest.mark.parametrize("kwargs, message", [
    ({"hours": "8am-6pm"}, "office_hours: '8am-6pm' is not HH:MM-HH:MM"),
    ({"hours": "18:00-08:00"}, "must start before it ends"),
    ({"days": "weekdays"}, "office_days: 'weekdays'"),
    ({"tz": "Mars/Olympus"}, "timezone: 'Mars/Olympus' is not a time zone name"),
])
def test_schedule_errors_name_the_parameter(kwargs, message):
    with pytest.raises(EndpointError, match=message):
        Schedule.parse(**{"hours": "08:00-18:00", "days": "mon-fri", "tz": "UTC", **kwargs})


def test_options_from_filters_check_numbers():
    assert Options.from_filters({"idle_minutes": "30"}).idle_minutes == 30.0
    with pytest.raises(EndpointError, match="idle_minutes: 'soon' is not a number"):
        Options.from_filters({"idle_minutes": "soon"})
    with pytest.raises(EndpointError, match="active_threshold_pct: 150 must be between 0 and 100"):
        Options.from_filters({"active_threshold_pct": "150"})


# ----------------------------------------------------------------------------- the simulated server

T0 = 1_767_225_600_000_000 + 14 * 3_600_000_000  # 2026-01-01T14:00Z, near the diurnal peak


def test_simulated_exposition_reads_back_through_the_agents_parser():
    ep = SimEndpoint("chat", Traffic(peak_rps=4.0), T0, seed=3)
    for dt_s in (0.5, 61.0, 600.0, 3599.9):
        t = T0 + int(dt_s * 1e6)
        req, prompt, gen, running, _ = ep.counters(t)
        reading = parse_exposition(ep.exposition(t), SERVERS["vllm"])
        got = {q: sum(v.values()) for q, v in reading.counters.items()}  # the abort series is excluded
        assert got == {"requests": req, "prompt_tokens": prompt, "generation_tokens": gen}
        assert reading.running == running and reading.start_time == pytest.approx(T0 / 1e6)
    assert ep.counters(T0 + 3_600_000_000)[0] > 10_000  # about 4 req/s for an hour


def test_truth_windows_add_up_to_the_counters():
    ep = SimEndpoint("chat", Traffic(peak_rps=2.0), T0, seed=9)
    t1 = T0 + 1800 * 1_000_000
    tr = ep.truth(T0, t1, 10_000_000)
    c0, c1 = ep.counters(T0), ep.counters(t1)
    assert tr["requests"].sum() == c1[0] - c0[0]
    assert tr["prompt_tokens"].sum() == c1[1] - c0[1] and tr["generation_tokens"].sum() == c1[2] - c0[2]
    assert tr["serving"].sum() <= 180 and tr["running"][0] == c0[3]
    mid = T0 + 600 * 1_000_000  # a window's figures are counter differences across it
    i = 60
    assert tr["requests"][i] == ep.counters(mid + 10_000_000)[0] - ep.counters(mid)[0]


def test_office_traffic_is_none_outside_its_hours():
    night = 1_767_225_600_000_000 + 2 * 3_600_000_000  # 02:00Z
    ep = SimEndpoint("dev", Traffic(peak_rps=1.0, shape="hours", hours=(9.0, 17.0)), night, seed=1)
    assert ep.counters(night + 6 * 3_600_000_000)[0] == 0  # until 08:00
    assert ep.counters(night + 8 * 3_600_000_000)[0] > 1000  # 09:00-10:00 at 1 req/s


def test_endpoint_gpu_is_busy_exactly_while_requests_are_in_flight():
    src = SimulatedSource("h", "L4", [SimGpu("endpoint", endpoint="chat", traffic=Traffic(peak_rps=1.0))], T0,
                          seed=2, sample_period_us=1_000_000)
    t1 = T0 + 600 * 1_000_000
    src.poll(t1)
    a, b = src.endpoints["chat"].busy_intervals(T0, t1)
    a, b = np.maximum(a, T0), np.minimum(b, t1)
    busy_s = float(np.clip(b - a, 0, None).sum()) / 1e6
    t = src.truth[0]
    assert t.idle_free_s == 0 and t.active_s + t.idle_held_s == pytest.approx(600.0)
    assert t.active_s == pytest.approx(busy_s, abs=600 * 0.005 + 1)  # integer percent per 1 s sample


def test_experiment_runs_hold_the_gpu_and_carry_their_run_ids():
    runs = (SimRun("run-a", 0.0, 600.0, "7"), SimRun("run-b", 900.0, 1200.0, "7"))
    src = SimulatedSource("h", "A10G", [SimGpu("experiment", runs=runs)], T0, seed=4)
    r = src.poll(T0 + 1500 * 1_000_000)
    tags = sorted(dict(p.tags)["mlflow_run_id"] for p in r.processes)
    assert tags == ["run-a", "run-b"]
    assert all(dict(p.tags)["mlflow_experiment_id"] == "7" for p in r.processes)
    t = src.truth[0]
    assert t.active_s + t.idle_held_s == pytest.approx(900.0, abs=0.2)  # held during the runs only
    assert t.idle_free_s == pytest.approx(600.0, abs=0.2)


def test_a_request_longer_than_a_block_is_refused():
    with pytest.raises(ValueError, match="a request may last 150 s, at most 60 s"):
        SimEndpoint("x", Traffic(max_tokens=10_000), T0)
