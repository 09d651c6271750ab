"""Inference-server scraping: an endpoint's own Prometheus counters folded into aligned windows.

Each configured endpoint ([[agent.endpoints]]: vLLM, TGI, Triton or SGLang on this host) is
scraped on the agent's tick (or every `every_s`). The exposition text is parsed with
prometheus-client's text parser, after a pre-filter that keeps only the lines of the few
metric names used (a vLLM exposition is 20-60 kB, mostly histogram buckets that are not read).

Per endpoint and window ([k*W, (k+1)*W) of the agent's clock, the same grid as the GPU windows):

- requests, prompt_tokens, generation_tokens: counter increments. The increment between two good
  scrapes is spread over the time between them pro rata (integer shares by cumulative rounding, so
  they add up exactly), split at window boundaries exactly as a GPU reading's interval is.
- scraped_ms: the part of the window that lies between two consecutive good scrapes.
- running_max: the most requests in flight at one good scrape in the window.
- scrape_errors: failed scrapes in the window (connection refused, HTTP error, timeout, a body
  that does not parse or has none of the server's metrics).

A failed scrape makes the time from the last good scrape to the next good scrape unknown: it is not
in scraped_ms, whatever the counters say afterwards. The increment across such a gap is still
counted (totals stay exact): it is spread over the gap like any interval, and the share of
windows that were already closed goes to the first open window. A counter reset (the server
restarted: `process_start_time_seconds` changed, or a counter went down) is never a negative
increment: each counter's post-reset value is its increment since the reset. The first good
scrape is a baseline only: what the counters held before it happened at an unknown time.

Windows are closed only up to the latest scrape attempt (before that the next interval is not
known), so an endpoint scraped every 30 s closes its windows up to 30 s later than the GPU windows.

Metric names and types checked against the servers' sources (see tests/fixtures/inference-metrics/):

| server | requests (counter) | prompt tokens | generation tokens | in flight (gauge) |
| vllm   | vllm:request_success_total, finished_reason other than abort / error | vllm:prompt_tokens_total | vllm:generation_tokens_total | vllm:num_requests_running |
| tgi    | tgi_request_success | tgi_request_input_length_sum (histogram; recorded when a request passes validation) | tgi_request_generated_tokens_sum (histogram) | tgi_batch_current_size |
| triton | nv_inference_request_success | - (Triton core reports no tokens: 0) | - (0) | nv_inference_pending_request_count (queued, awaiting execution) |
| sglang | sglang:num_requests_total (finished; aborts are counted apart) | sglang:prompt_tokens_total | sglang:generation_tokens_total | sglang:num_running_reqs |

Series of one metric (engines, tensor-parallel ranks, finished reasons, models) are summed after the
endpoint's `labels` filter.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
from prometheus_client.parser import text_string_to_metric_families

from gpuledger import __version__
from gpuledger.config import EndpointConfig
from gpuledger.schema import ENDPOINT_WINDOW_SCHEMA

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20  # a /metrics body larger than this is an error, not a memory spike
_START_TIME = "process_start_time_seconds"


class ScrapeError(Exception):
    """A scrape that gave no usable figures (transport, HTTP status, body)."""


@dataclass(frozen=True)
class ServerSpec:
    """Which samples of a server's exposition give each figure (names as the parser returns them,
    `_total` suffix stripped from counters)."""

    requests: tuple[str, ...]
    prompt_tokens: tuple[str, ...]
    generation_tokens: tuple[str, ...]
    running: tuple[str, ...]
    exclude: dict = field(default_factory=dict)  # label -> values whose series are not counted

    def names(self) -> tuple[str, ...]:
        return self.requests + self.prompt_tokens + self.generation_tokens + self.running


SERVERS: dict[str, ServerSpec] = {
    # vLLM (V0 engine/metrics.py and V1 v1/metrics/loggers.py): Counter("vllm:request_success",
    # labels model_name[, engine], finished_reason in stop | length | abort | error | repetition).
    "vllm": ServerSpec(requests=("vllm:request_success",), prompt_tokens=("vllm:prompt_tokens",),
                       generation_tokens=("vllm:generation_tokens",), running=("vllm:num_requests_running",),
                       exclude={"finished_reason": frozenset({"abort", "error"})}),
    # TGI router (Rust `metrics` crate, Prometheus exporter): counters carry no _total suffix;
    # the token figures are the _sum of histograms.
    "tgi": ServerSpec(requests=("tgi_request_success",), prompt_tokens=("tgi_request_input_length_sum",),
                      generation_tokens=("tgi_request_generated_tokens_sum",), running=("tgi_batch_current_size",)),
    # Triton: per model and version. No token counters in Triton core.
    "triton": ServerSpec(requests=("nv_inference_request_success",), prompt_tokens=(), generation_tokens=(),
                         running=("nv_inference_pending_request_count",)),
    # SGLang (srt/metrics/collector.py): Counter("sglang:num_requests_total") per finished request.
    "sglang": ServerSpec(requests=("sglang:num_requests",), prompt_tokens=("sglang:prompt_tokens",),
                         generation_tokens=("sglang:generation_tokens",), running=("sglang:num_running_reqs",)),
}

_QUANTITIES = ("requests", "prompt_tokens", "generation_tokens")


def _canonical(name: str) -> str:
    return name[:-6] if name.endswith("_total") else name


def _wanted_names(spec: ServerSpec) -> tuple[str, ...]:
    return tuple(sorted(set(spec.names()) | {_START_TIME}))


def wanted_lines(text: str, names: tuple[str, ...]) -> list[str]:
    """The sample lines of exactly these metric names (a counter with or without `_total`), found
    with str.find: a vLLM exposition is mostly histogram buckets that are never read, and
    prometheus-client's parser costs about 10 us a line."""
    t = "\n" + text
    out = []
    for name in names:
        needle = "\n" + name
        n = len(name)
        i = t.find(needle)
        while i >= 0:
            j = t.find("\n", i + 1)
            line = t[i + 1:] if j < 0 else t[i + 1:j]
            rest = line[n:n + 7]
            if rest[:1] in ("{", " ") or rest in ("_total{", "_total "):
                out.append(line)
            i = t.find(needle, i + 1) if j >= 0 else -1
    return out


def _label_needles(labels: dict | None) -> tuple[str, ...]:
    """`key="value"` as the exposition writes it (escaped), to drop other series before parsing."""
    if not labels:
        return ()
    esc = {k: v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for k, v in labels.items()}
    return tuple(f'{k}="{v}"' for k, v in esc.items())


@dataclass
class Reading:
    """One good scrape: per quantity, counter series (label tuple -> integer value); the in-flight
    gauge summed; the server's process start time if it exports one."""

    counters: dict[str, dict[tuple, int]]
    running: int
    start_time: float | None


def parse_exposition(text: str, spec: ServerSpec, labels: dict | None = None,
                     names: tuple[str, ...] | None = None) -> Reading:
    """The figures of one exposition text. Raises ScrapeError if it does not parse or holds none of
    the server's metrics (after the labels filter)."""
    kept = wanted_lines(text, names or _wanted_names(spec))
    needles = _label_needles(labels)
    if needles:  # a cheap first cut; the parsed labels are checked exactly below
        kept = [ln for ln in kept if ln.startswith(_START_TIME) or all(nd in ln for nd in needles)]
    want = {q: set(getattr(spec, q)) for q in _QUANTITIES}
    running_names = set(spec.running)
    counters: dict[str, dict[tuple, int]] = {q: {} for q in _QUANTITIES}
    running = 0.0
    start_time = None
    found = False
    try:
        for fam in text_string_to_metric_families("\n".join(kept) + "\n"):
            for s in fam.samples:
                name = _canonical(s.name)
                if s.name == _START_TIME:
                    start_time = float(s.value)
                    continue
                if labels and any(s.labels.get(k) != v for k, v in labels.items()):
                    continue
                if any(s.labels.get(k) in bad for k, bad in spec.exclude.items()):
                    found = True  # the metric is there; this series is not counted
                    continue
                if name in running_names:
                    running += s.value
                    found = True
                    continue
                for q in _QUANTITIES:
                    if name in want[q]:
                        key = (name,) + tuple(sorted(s.labels.items()))
                        counters[q][key] = int(round(s.value))
                        found = True
    except (ValueError, TypeError, IndexError) as e:
        raise ScrapeError(f"exposition does not parse: {e}") from e
    if not found:
        flt = f" with labels {labels}" if labels else ""
        raise ScrapeError(f"none of {', '.join(spec.names())}{flt} in the exposition")
    return Reading(counters=counters, running=max(0, int(round(running))), start_time=start_time)


def make_urllib_get(max_bytes: int = MAX_BODY_BYTES) -> Callable[[str, float], bytes]:
    """A GET through urllib that ignores proxy settings (the server is on this host), asks for the
    classic text format and raises on any non-200 answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {"Accept": "text/plain;version=0.0.4;q=1,*/*;q=0.1", "User-Agent": f"gpuledger-agent/{__version__}"}

    def http_get(url: str, timeout_s: float) -> bytes:
        req = urllib.request.Request(url, headers=headers)
        try:
            with opener.open(req, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise ScrapeError(f"HTTP {resp.status}")
                body = resp.read(max_bytes + 1)
        except urllib.error.HTTPError as e:
            raise ScrapeError(f"HTTP {e.code}") from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise ScrapeError(f"{type(reason).__name__}: {reason}") from e
        if len(body) > max_bytes:
            raise ScrapeError(f"body larger than {max_bytes} bytes")
        return body

    return http_get


@dataclass
class _Interval:
    t0: int  # us
    t1: int
    scraped: bool  # no failed attempt between the two good scrapes
    inc: tuple[int, int, int]  # requests, prompt, generation

    def share(self, q: int, a: int, b: int) -> int:
        """This quantity's integer share of [a, b) (cumulative rounding: shares add up exactly)."""
        a, b = max(a, self.t0), min(b, self.t1)
        if b <= a:
            return 0
        d = self.t1 - self.t0
        total = self.inc[q]
        return total * (b - self.t0) // d - total * (a - self.t0) // d


class _Endpoint:
    def __init__(self, cfg: EndpointConfig) -> None:
        self.cfg = cfg
        self.spec = SERVERS[cfg.server]
        self.names = _wanted_names(self.spec)
        self.every_us = int(round(cfg.every_s * 1e6))
        self.next_due_us: int | None = None
        self.prev: Reading | None = None  # the last good scrape
        self.prev_t: int | None = None
        self.chain_ok = False  # no failed attempt since the last good scrape
        self.last_attempt_us: int | None = None
        self.closed_until_us: int | None = None
        self.intervals: list[_Interval] = []
        self.running: list[tuple[int, int]] = []
        self.errors: list[int] = []
        self.carry = [0, 0, 0]  # shares of windows closed before their gap interval was known
        self.scrapes_ok = 0
        self.scrapes_failed = 0
        self.resets = 0
        self.last_error = ""


class EndpointScraper:
    """Scrapes the configured endpoints and closes their windows.

    `poll(now_us)` scrapes every endpoint that is due; `close_windows(until_us)` returns the closed
    windows as an Arrow table in ENDPOINT_WINDOW_SCHEMA (one row per endpoint and window, also for
    windows with nothing known: scraped_ms 0). `http_get(url, timeout_s) -> bytes` raises on any
    failure; the default uses urllib. Not thread-safe: call both from the agent's loop.
    """

    def __init__(self, endpoints: Sequence[EndpointConfig], http_get: Callable[[str, float], bytes] | None = None,
                 window_s: float = 10.0, start_us: int | None = None) -> None:
        self.window_us = int(round(window_s * 1e6))
        if self.window_us <= 0 or self.window_us % 1000:
            raise ValueError("window_s must be a positive whole number of milliseconds")
        self.http_get = http_get or make_urllib_get()
        self.endpoints = [_Endpoint(e) for e in endpoints]
        if start_us is not None:
            for ep in self.endpoints:
                ep.closed_until_us = int(start_us) // self.window_us * self.window_us
        self._closed = False

    # ------------------------------------------------------------------ scraping
    def poll(self, now_us: int) -> None:
        for ep in self.endpoints:
            if ep.next_due_us is not None and now_us < ep.next_due_us:
                continue
            if ep.every_us:
                nxt = (ep.next_due_us if ep.next_due_us is not None else now_us) + ep.every_us
                ep.next_due_us = nxt if nxt > now_us else now_us + ep.every_us
            self._scrape(ep, int(now_us))

    def _scrape(self, ep: _Endpoint, now: int) -> None:
        if ep.last_attempt_us is not None and now <= ep.last_attempt_us:
            return  # the clock did not move (or went back): nothing new to learn
        if ep.closed_until_us is None:
            ep.closed_until_us = now // self.window_us * self.window_us
        ep.last_attempt_us = now
        try:
            body = self.http_get(ep.cfg.url, ep.cfg.timeout_s)
            reading = parse_exposition(body.decode("utf-8", errors="replace"), ep.spec, ep.cfg.labels, ep.names)
        except Exception as e:  # any failure is a failed scrape, counted; the agent goes on
            ep.scrapes_failed += 1
            ep.errors.append(now)
            ep.chain_ok = False
            msg = str(e) or type(e).__name__
            if msg != ep.last_error:
                log.warning("endpoint %s (%s): scrape failed: %s", ep.cfg.name, ep.cfg.url, msg)
            ep.last_error = msg
            return
        if ep.last_error:
            log.info("endpoint %s (%s): scraping again", ep.cfg.name, ep.cfg.url)
            ep.last_error = ""
        ep.scrapes_ok += 1
        ep.running.append((now, reading.running))
        if ep.prev is not None:
            inc = self._increments(ep, reading)
            iv = _Interval(ep.prev_t, now, ep.chain_ok, inc)
            if iv.t0 < ep.closed_until_us:  # part of the interval lies in windows already closed
                for q in range(3):
                    ep.carry[q] += iv.share(q, iv.t0, ep.closed_until_us)
            ep.intervals.append(iv)
        ep.prev, ep.prev_t, ep.chain_ok = reading, now, True

    def _increments(self, ep: _Endpoint, cur: Reading) -> tuple[int, int, int]:
        prev = ep.prev
        reset = (cur.start_time is not None and prev.start_time is not None and cur.start_time != prev.start_time)
        if not reset:
            reset = any(v < prev.counters[q].get(k, 0) for q in _QUANTITIES for k, v in cur.counters[q].items())
        if reset:
            ep.resets += 1
            log.info("endpoint %s: counters reset (server restarted)", ep.cfg.name)
        out = []
        for q in _QUANTITIES:
            before = prev.counters[q]
            if reset:
                out.append(sum(cur.counters[q].values()))
            else:  # a series absent before began after the last good scrape: all of it is new
                out.append(sum(v - before.get(k, 0) for k, v in cur.counters[q].items()))
        return out[0], out[1], out[2]

    # ------------------------------------------------------------------ windows
    def close_windows(self, until_us: int, final: bool = False) -> pa.Table:
        """Close every window that ended by `until_us` and that the scrapes have reached (with
        `final`, also the window `until_us` falls in, and regardless of the scrapes)."""
        W = self.window_us
        cols: dict[str, list] = {f.name: [] for f in ENDPOINT_WINDOW_SCHEMA}
        win_ms = W // 1000
        for ep in self.endpoints:
            if ep.closed_until_us is None:
                continue
            hi = until_us // W * W
            if final and hi < until_us:
                hi += W
            if not final:
                hi = min(hi, (ep.last_attempt_us or ep.closed_until_us) // W * W)
            lo = ep.closed_until_us
            if hi <= lo:
                continue
            for a in range(lo, hi, W):
                b = a + W
                sums = [0, 0, 0]
                scraped_us = 0
                for iv in ep.intervals:
                    if iv.t1 <= a or iv.t0 >= b:
                        continue
                    for q in range(3):
                        sums[q] += iv.share(q, a, b)
                    if iv.scraped:
                        scraped_us += min(b, iv.t1) - max(a, iv.t0)
                if a == lo:
                    sums = [s + c for s, c in zip(sums, ep.carry, strict=True)]
                    ep.carry = [0, 0, 0]
                run = [v for t, v in ep.running if a <= t < b]
                cols["endpoint"].append(ep.cfg.name)
                cols["server"].append(ep.cfg.server)
                cols["window_start_ms"].append(a // 1000)
                cols["window_ms"].append(win_ms)
                cols["scraped_ms"].append(min(win_ms, (scraped_us + 500) // 1000))
                cols["requests"].append(max(0, sums[0]))
                cols["prompt_tokens"].append(max(0, sums[1]))
                cols["generation_tokens"].append(max(0, sums[2]))
                cols["running_max"].append(min(max(run, default=0), 0xFFFFFFFF))
                cols["scrape_errors"].append(sum(1 for t in ep.errors if a <= t < b))
            ep.closed_until_us = hi
            ep.intervals = [iv for iv in ep.intervals if iv.t1 > hi]
            ep.running = [(t, v) for t, v in ep.running if t >= hi]
            ep.errors = [t for t in ep.errors if t >= hi]
        return pa.Table.from_pydict(cols, schema=ENDPOINT_WINDOW_SCHEMA)

    def close(self, now_us: int) -> pa.Table:
        """Final close (graceful stop): the open windows up to now; safe to call twice."""
        if self._closed:
            return ENDPOINT_WINDOW_SCHEMA.empty_table()
        self._closed = True
        return self.close_windows(now_us, final=True)

    def stats(self) -> dict[str, dict[str, int | str]]:
        """Per endpoint: scrapes_ok, scrapes_failed, resets, last_error (for the agent's metrics)."""
        return {ep.cfg.name: {"scrapes_ok": ep.scrapes_ok, "scrapes_failed": ep.scrapes_failed,
                              "resets": ep.resets, "last_error": ep.last_error} for ep in self.endpoints}
