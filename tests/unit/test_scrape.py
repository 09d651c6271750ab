"""Endpoint scraping against a real local HTTP server that serves real exposition text (the
fixtures in tests/fixtures/inference-metrics/) with counters advanced, server restarts, HTTP 500s
and timeouts. Clocks are injected; every figure is asserted exactly."""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpuledger.agent.scrape import SERVERS, EndpointScraper, ScrapeError, make_urllib_get, parse_exposition
from gpuledger.config import EndpointConfig
from gpuledger.schema import ENDPOINT_WINDOW_SCHEMA

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "inference-metrics"
W = 10_000_000  # 10 s windows, in us
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z, a window boundary
S = 1_000_000


def fixture(server: str) -> str:
    return (FIXTURES / f"{server}.txt").read_text()


def with_values(text: str, values: dict[str, float]) -> str:
    """The exposition with the value of each sample (name{labels} exactly as written) replaced; a
    sample that is not there is appended (a series that appears later, as lazily created ones do)."""
    for sample, value in values.items():
        pat = re.compile(rf"^{re.escape(sample)} \S+$", re.M)
        line = f"{sample} {value}"
        text, n = pat.subn(line, text)
        if not n:
            text += line + "\n"
    return text


class MetricsServer:
    """A real HTTP server on 127.0.0.1:<free port> whose answer the test sets: body, status, delay."""

    def __init__(self, body: str = "") -> None:
        self.body, self.status, self.delay_s, self.hits = body, 200, 0.0, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits += 1
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                payload = outer.body.encode() if outer.status == 200 else b"internal error\n"
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = MetricsServer()
    yield s
    s.close()


def rows(table) -> list[dict]:
    assert table.schema == ENDPOINT_WINDOW_SCHEMA
    return table.to_pylist()


def figures(row: dict) -> tuple:
    return (row["window_start_ms"], row["scraped_ms"], row["requests"], row["prompt_tokens"],
            row["generation_tokens"], row["running_max"], row["scrape_errors"])


VLLM_OK = 'vllm:request_success_total{finished_reason="length",model_name="facebook/opt-125m"}'
VLLM_PROMPT = 'vllm:prompt_tokens_total{model_name="facebook/opt-125m"}'
VLLM_GEN = 'vllm:generation_tokens_total{model_name="facebook/opt-125m"}'
VLLM_RUN = 'vllm:num_requests_running{model_name="facebook/opt-125m"}'


def vllm(req, prompt, gen, running=0, **extra) -> str:
    return with_values(fixture("vllm"), {VLLM_OK: req, VLLM_PROMPT: prompt, VLLM_GEN: gen, VLLM_RUN: running, **extra})


def scraper(server, name="chat", kind="vllm", **kw) -> EndpointScraper:
    cfg = EndpointConfig(name=name, server=kind, url=server.url, labels=kw.pop("labels", {}),
                         every_s=kw.pop("every_s", 0.0), timeout_s=kw.pop("timeout_s", 2.0))
    return EndpointScraper([cfg], window_s=10.0, **kw)


def test_counters_spread_pro_rata_over_the_time_between_scrapes(server):
    sc = scraper(server)
    server.body = vllm(1, 5, 7)  # the fixture's own values: the baseline
    sc.poll(T0)
    server.body = vllm(11, 105, 47, running=3)
    sc.poll(T0 + 4 * S)
    server.body = vllm(31, 305, 127, running=2)
    sc.poll(T0 + 14 * S)
    # windows are closed only as far as the scrapes reached: [T0, T0+10 s)
    first = rows(sc.close_windows(T0 + 20 * S))
    assert [figures(r) for r in first] == [(T0 // 1000, 10_000, 10 + 12, 100 + 120, 40 + 48, 3, 0)]
    assert first[0]["endpoint"] == "chat" and first[0]["server"] == "vllm" and first[0]["window_ms"] == 10_000
    server.body = vllm(31, 305, 127, running=0)
    sc.poll(T0 + 24 * S)
    second = rows(sc.close_windows(T0 + 30 * S))
    # the rest of the [4 s, 14 s] increment: 20 - 12 requests, 200 - 120 and 80 - 48 tokens
    assert [figures(r) for r in second] == [((T0 + W) // 1000, 10_000, 8, 80, 32, 2, 0)]
    last = rows(sc.close(T0 + 24 * S))
    assert [figures(r) for r in last] == [((T0 + 2 * W) // 1000, 4_000, 0, 0, 0, 0, 0)]
    assert sc.close(T0 + 30 * S).num_rows == 0  # safe to call twice
    assert sum(r["requests"] for r in first + second + last) == 30


def test_shares_add_up_exactly_across_many_windows(server):
    sc = scraper(server)
    server.body = vllm(0, 0, 0)
    sc.poll(T0 + 3 * S)
    server.body = vllm(7, 1001, 333)  # 7 requests over 47 s: no window gets a fraction
    sc.poll(T0 + 50 * S)
    out = rows(sc.close_windows(T0 + 50 * S))
    assert [r["requests"] for r in out] == [1, 1, 2, 1, 2]  # 7 * (t - 3 s) // 47 s at each boundary
    assert [r["scraped_ms"] for r in out] == [7_000, 10_000, 10_000, 10_000, 10_000]
    assert sum(r["prompt_tokens"] for r in out) == 1001 and sum(r["generation_tokens"] for r in out) == 333


def test_aborted_requests_other_models_and_lazily_created_series(server):
    abort = 'vllm:request_success_total{finished_reason="abort",model_name="facebook/opt-125m"}'
    stop = 'vllm:request_success_total{finished_reason="stop",model_name="facebook/opt-125m"}'
    other = 'vllm:request_success_total{finished_reason="stop",model_name="other-model"}'
    other_prompt = 'vllm:prompt_tokens_total{model_name="other-model"}'
    sc = scraper(server, labels={"model_name": "facebook/opt-125m"})
    server.body = vllm(1, 5, 7, **{abort: 4, other: 100, other_prompt: 1000})
    sc.poll(T0)
    # a series that did not exist at the last scrape ("stop") counts from zero; aborts never count;
    # the other model's series are filtered out
    server.body = vllm(2, 15, 17, **{abort: 9, other: 200, other_prompt: 5000, stop: 6})
    sc.poll(T0 + 10 * S)
    out = rows(sc.close_windows(T0 + 10 * S))
    assert [figures(r) for r in out] == [(T0 // 1000, 10_000, 1 + 6, 10, 10, 0, 0)]


def test_vllm_v1_engines_are_summed(server):
    text = fixture("vllm").replace('{model_name="facebook/opt-125m"}', '{engine="0",model_name="facebook/opt-125m"}')
    text = text.replace('{finished_reason="length",model_name=', '{engine="0",finished_reason="length",model_name=')
    e0 = '{engine="0",model_name="facebook/opt-125m"}'
    e1 = '{engine="1",model_name="facebook/opt-125m"}'
    ok1 = 'vllm:request_success_total{engine="1",finished_reason="stop",model_name="facebook/opt-125m"}'
    sc = scraper(server)
    server.body = with_values(text, {f"vllm:num_requests_running{e1}": 0, ok1: 0, f"vllm:prompt_tokens_total{e1}": 0})
    sc.poll(T0)
    server.body = with_values(text, {
        'vllm:request_success_total{engine="0",finished_reason="length",model_name="facebook/opt-125m"}': 4,
        ok1: 5, f"vllm:prompt_tokens_total{e0}": 25, f"vllm:prompt_tokens_total{e1}": 30,
        f"vllm:num_requests_running{e0}": 2, f"vllm:num_requests_running{e1}": 5})
    sc.poll(T0 + 5 * S)
    out = rows(sc.close(T0 + 10 * S))
    assert [figures(r) for r in out] == [(T0 // 1000, 5_000, 3 + 5, 20 + 30, 0, 7, 0)]


def test_restart_is_a_reset_not_a_negative_increment(server):
    start = "process_start_time_seconds"
    sc = scraper(server)
    server.body = vllm(100, 1000, 500)
    sc.poll(T0)
    server.body = vllm(110, 1100, 540)
    sc.poll(T0 + 2 * S)
    # restarted: counters from zero, and the start time moved
    server.body = vllm(3, 30, 12, **{start: 1.7181409e09})
    sc.poll(T0 + 4 * S)
    server.body = vllm(5, 50, 20, **{start: 1.7181409e09})
    sc.poll(T0 + 6 * S)
    # restarted again, and already past the old values when scraped: only the start time tells
    server.body = vllm(9, 90, 36, **{start: 1.7181410e09})
    sc.poll(T0 + 8 * S)
    out = rows(sc.close(T0 + 10 * S))
    assert [figures(r) for r in out] == [(T0 // 1000, 8_000, 10 + 3 + 2 + 9, 100 + 30 + 20 + 90, 40 + 12 + 8 + 36, 0, 0)]
    assert sc.stats()["chat"]["resets"] == 2


def test_reset_detected_by_a_counter_going_down_when_no_start_time(server):
    tgi = fixture("tgi")
    sc = scraper(server, kind="tgi")
    server.body = with_values(tgi, {"tgi_request_success": 109})
    sc.poll(T0)
    server.body = with_values(tgi, {"tgi_request_success": 120, "tgi_request_input_length_sum": 700,
                                    "tgi_request_generated_tokens_sum": 3500, "tgi_batch_current_size": 4})
    sc.poll(T0 + 5 * S)
    server.body = with_values(tgi, {"tgi_request_success": 2, "tgi_request_input_length_sum": 20,
                                    "tgi_request_generated_tokens_sum": 60, "tgi_batch_current_size": 1})
    sc.poll(T0 + 10 * S)
    out = rows(sc.close(T0 + 10 * S))
    # 11 before the restart, then the post-reset values; the gauge read at 10 s belongs to the next
    # window, which a final close at 10 s does not open
    assert [figures(r) for r in out] == [(T0 // 1000, 10_000, 11 + 2, 38 + 20, 77 + 60, 4, 0)]
    assert sc.stats()["chat"]["resets"] == 1


def test_http_500_and_timeouts_are_unknown_time_and_counted(server):
    sc = scraper(server, timeout_s=0.1)
    server.body = vllm(0, 0, 0)
    sc.poll(T0)
    server.body = vllm(10, 100, 50, running=2)
    sc.poll(T0 + 1 * S)
    server.status = 500
    sc.poll(T0 + 2 * S)
    server.status, server.delay_s = 200, 0.5  # answers after the client's 0.1 s timeout
    sc.poll(T0 + 3 * S)
    server.delay_s = 0.0
    server.body = vllm(40, 400, 200, running=6)
    sc.poll(T0 + 4 * S)
    server.body = vllm(50, 500, 250, running=1)
    sc.poll(T0 + 5 * S)
    out = rows(sc.close(T0 + 10 * S))
    # scraped: [0, 1 s] and [4 s, 5 s]; the gap [1 s, 4 s] is unknown but its 30 requests are kept
    assert [figures(r) for r in out] == [(T0 // 1000, 2_000, 50, 500, 250, 6, 2)]
    stats = sc.stats()["chat"]
    assert stats["scrapes_failed"] == 2 and stats["scrapes_ok"] == 4 and stats["last_error"] == ""


def test_gap_over_a_closed_window_carries_its_counts_forward(server):
    sc = scraper(server)
    server.body = vllm(0, 0, 0)
    sc.poll(T0 + 1 * S)
    server.body = vllm(6, 60, 30)
    sc.poll(T0 + 7 * S)
    server.status = 500
    for t in (8, 9, 10, 11, 12):
        sc.poll(T0 + t * S)
    first = rows(sc.close_windows(T0 + 12 * S))
    assert [figures(r) for r in first] == [(T0 // 1000, 6_000, 6, 60, 30, 0, 2)]
    server.status = 200
    server.body = vllm(16, 160, 80)
    sc.poll(T0 + 17 * S)
    sc.poll(T0 + 20 * S)
    second = rows(sc.close_windows(T0 + 20 * S))
    # the 10 requests of the gap [7 s, 17 s] all land in the open window; of its time only
    # [17 s, 20 s] lies between two good scrapes
    assert [figures(r) for r in second] == [((T0 + W) // 1000, 3_000, 10, 100, 50, 0, 3)]


@pytest.mark.parametrize("kind, before, after, expect", [
    ("tgi", {}, {"tgi_request_success": 130, "tgi_request_input_length_sum": 862,
                 "tgi_request_generated_tokens_sum": 4423, "tgi_batch_current_size": 8}, (21, 200, 1000, 8)),
    ("triton", {}, {'nv_inference_request_success{model="densenet_onnx",version="1"}': 13,
                    'nv_inference_request_success{model="simple",version="1"}': 4,
                    'nv_inference_pending_request_count{model="densenet_onnx",version="1"}': 2}, (14, 0, 0, 2)),
    ("sglang", {}, {'sglang:num_requests_total{model_name="facebook/opt-125m",tp_rank="0"}': 41,
                    'sglang:prompt_tokens_total{model_name="facebook/opt-125m",tp_rank="0"}': 405,
                    'sglang:generation_tokens_total{model_name="facebook/opt-125m",tp_rank="0"}': 832,
                    'sglang:num_running_reqs{model_name="facebook/opt-125m",tp_rank="0"}': 9}, (40, 400, 800, 9)),
])
def test_each_server_from_its_real_exposition(server, kind, before, after, expect):
    sc = scraper(server, kind=kind)
    server.body = with_values(fixture(kind), before)
    sc.poll(T0)
    server.body = with_values(fixture(kind), after)
    sc.poll(T0 + 5 * S)
    sc.poll(T0 + 10 * S)  # unchanged
    out = rows(sc.close_windows(T0 + 10 * S))
    assert [(r["server"], r["scraped_ms"], r["requests"], r["prompt_tokens"], r["generation_tokens"],
             r["running_max"]) for r in out] == [(kind, 10_000) + expect]


def test_triton_labels_filter_selects_one_model(server):
    sc = scraper(server, kind="triton", labels={"model": "densenet_onnx"})
    server.body = fixture("triton")
    sc.poll(T0)
    server.body = with_values(fixture("triton"), {
        'nv_inference_request_success{model="densenet_onnx",version="1"}': 13,
        'nv_inference_request_success{model="simple",version="1"}': 4})
    sc.poll(T0 + 10 * S)
    assert [r["requests"] for r in rows(sc.close_windows(T0 + 10 * S))] == [10]


def test_scrape_every_n_seconds_and_windows_held_back(server):
    sc = scraper(server, every_s=5.0)
    server.body = vllm(0, 0, 0)
    got = []
    for t in range(0, 13):
        server.body = vllm(t, 0, 0)  # one request a second
        sc.poll(T0 + t * S)
        got.append(server.hits)
    assert got == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3]
    # the last scrape was at 10 s: [T0, T0+10 s) is closed, [10 s, 20 s) waits for the next scrape
    out = rows(sc.close_windows(T0 + 12 * S))
    assert [figures(r) for r in out] == [(T0 // 1000, 10_000, 10, 0, 0, 0, 0)]
    assert sc.close_windows(T0 + 19 * S).num_rows == 0


def test_wrong_body_and_wrong_filter_are_failed_scrapes(server):
    sc = scraper(server, labels={"model_name": "not-served"})
    server.body = vllm(1, 5, 7)
    sc.poll(T0)
    assert "with labels {'model_name': 'not-served'}" in sc.stats()["chat"]["last_error"]
    sc2 = scraper(server, kind="sglang")
    sc2.poll(T0)  # a vLLM body at an endpoint configured as SGLang
    assert "sglang:num_requests" in sc2.stats()["chat"]["last_error"]
    out = rows(sc2.close(T0 + 1 * S))
    assert [figures(r) for r in out] == [(T0 // 1000, 0, 0, 0, 0, 0, 1)]
    with pytest.raises(ScrapeError, match="does not parse"):
        parse_exposition('vllm:num_requests_running{model_name="x" 3\n', SERVERS["vllm"])


def test_connection_refused_counts_and_no_endpoint_blocks_another(server):
    dead = MetricsServer()
    dead_url = dead.url
    dead.close()  # nothing listens there any more
    server.body = vllm(0, 0, 0)
    cfgs = [EndpointConfig(name="dead", server="vllm", url=dead_url, timeout_s=0.5),
            EndpointConfig(name="live", server="vllm", url=server.url)]
    sc = EndpointScraper(cfgs, window_s=10.0)
    sc.poll(T0)
    server.body = vllm(5, 50, 25)
    sc.poll(T0 + 5 * S)
    out = rows(sc.close(T0 + 10 * S))
    assert [(r["endpoint"],) + figures(r) for r in out] == [
        ("dead", T0 // 1000, 0, 0, 0, 0, 0, 2), ("live", T0 // 1000, 5_000, 5, 50, 25, 0, 0)]
    assert "Connection" in sc.stats()["dead"]["last_error"] or "refused" in sc.stats()["dead"]["last_error"]


def test_default_get_ignores_proxy_settings(server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # the discard port: nothing answers
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    server.body = "vllm:num_requests_running 1\n"
    assert make_urllib_get()(server.url, 2.0) == b"vllm:num_requests_running 1\n"


def test_every_fixture_parses_whole():
    from prometheus_client.parser import text_string_to_metric_families

    for kind in SERVERS:
        text = fixture(kind)
        assert sum(len(f.samples) for f in text_string_to_metric_families(text)) > 10
        reading = parse_exposition(text, SERVERS[kind])
        assert sum(sum(s.values()) for s in reading.counters.values()) > 0


def test_prefilter_keeps_exactly_the_wanted_samples():
    from gpuledger.agent.scrape import wanted_lines

    text = 'vllm:request_success_total{finished_reason="stop"} 3\n' + fixture("vllm") + \
        'vllm:request_success_created{finished_reason="stop"} 1.7e9\nvllm:num_requests_running 2'
    got = wanted_lines(text, ("process_start_time_seconds", "vllm:num_requests_running", "vllm:prompt_tokens",
                              "vllm:request_success"))
    assert got == [
        "process_start_time_seconds 1.7181405583e+09",
        'vllm:num_requests_running{model_name="facebook/opt-125m"} 0.0',
        "vllm:num_requests_running 2",  # the last line, without a newline
        'vllm:prompt_tokens_total{model_name="facebook/opt-125m"} 5.0',  # not _by_source, _cached, ...
        'vllm:request_success_total{finished_reason="stop"} 3',  # the first line
        'vllm:request_success_total{finished_reason="length",model_name="facebook/opt-125m"} 1.0',
    ]
