"""Prometheus metrics of both daemons, read from the live objects at scrape time.

Each daemon gets its own registry (no global state); `serve()` exposes it over HTTP.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Live(Collector):
    def __init__(self, fn) -> None:
        self.fn = fn

    def collect(self):
        yield from self.fn()


def _counter(name, doc, value, labels=None):
    m = CounterMetricFamily(name, doc, labels=list(labels or {}))
    m.add_metric(list((labels or {}).values()), value)
    return m


def _gauge(name, doc, value):
    m = GaugeMetricFamily(name, doc)
    m.add_metric([], value)
    return m


def agent_registry(agent, spool, shipper) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)

    def collect():
        st = shipper.stats
        yield _counter("gpuledger_agent_windows_sampled", "GPU-windows closed by the agent", agent.windows_sampled)
        yield _counter("gpuledger_agent_batches_spooled", "Batches appended to the spool", agent.batches_spooled)
        yield _counter("gpuledger_agent_batches_sent", "Batches sent to the collector (resends included)", st.sent)
        yield _counter("gpuledger_agent_batches_acked", "Batches acknowledged as stored", st.acked)
        yield _counter("gpuledger_agent_windows_acked", "GPU-windows acknowledged as stored", st.acked_windows)
        yield _counter("gpuledger_agent_batches_rejected", "Batches rejected permanently (dead-lettered)", st.rejected)
        yield _counter("gpuledger_agent_batches_deferred", "Batches the collector asked to resend later", st.retried)
        yield _counter("gpuledger_agent_reconnects", "Streams re-established", st.reconnects)
        yield _counter("gpuledger_agent_windows_dropped", "GPU-windows dropped because the spool was full",
                       spool.dropped_windows)
        yield _counter("gpuledger_agent_unhealthy_polls", "Polls in which a GPU was down", agent.unhealthy_polls)
        yield _gauge("gpuledger_agent_spool_bytes", "Bytes in the spool", spool.bytes_used())
        yield _gauge("gpuledger_agent_spool_pending_windows", "GPU-windows waiting for acknowledgement",
                     spool.pending_windows())

    reg.register(_Live(collect))
    return reg


def collector_registry(collector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)

    def collect():
        st = collector.ingest.stats
        w = collector.writer
        yield _counter("gpuledger_collector_batches_stored", "Batches stored and acknowledged", st.batches)
        yield _counter("gpuledger_collector_windows_stored", "GPU-windows stored", st.windows)
        rej = CounterMetricFamily("gpuledger_collector_batches_rejected", "Batches rejected, by reason",
                                  labels=["reason"])
        for reason in ("invalid", "too_large", "permission"):
            rej.add_metric([reason], st.rejected.get(reason, 0))
        yield rej
        yield _counter("gpuledger_collector_batches_deferred", "Batches answered RESOURCE_EXHAUSTED (backpressure)",
                       st.deferred)
        err = CounterMetricFamily("gpuledger_collector_store_errors", "Store insert failures, by kind",
                                  labels=["kind"])
        err.add_metric(["retryable"], w.store_errors_retryable)
        err.add_metric(["permanent"], w.store_errors_permanent)
        yield err
        yield _gauge("gpuledger_collector_pending_rows", "Rows queued for the writer", w.pending_rows())
        yield _gauge("gpuledger_collector_active_streams", "Agent streams open", collector.active_streams)
        lat = list(w.insert_latency_s)
        buckets, acc = [], 0
        for b in LATENCY_BUCKETS:
            acc = sum(1 for x in lat if x <= b)
            buckets.append((str(b), acc))
        buckets.append(("+Inf", len(lat)))
        h = HistogramMetricFamily("gpuledger_collector_insert_seconds", "Group-commit insert latency (recent)",
                                  buckets=buckets, sum_value=sum(lat))
        yield h

    reg.register(_Live(collect))
    return reg


def serve(registry: CollectorRegistry, listen: str):
    """Serve /metrics on HOST:PORT (port 0 picks one); returns (server, port)."""
    host, port = listen.rsplit(":", 1)
    server, _thread = start_http_server(int(port), addr=host, registry=registry)
    return server, server.server_port
