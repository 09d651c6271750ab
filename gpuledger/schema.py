"""Arrow schemas of the columnar window bodies: part of the v1 wire contract.

The agent builds record batches with exactly these schemas; the collector rejects a body whose
schema differs (a field missing, renamed or of another type) with INVALID_ARGUMENT naming it.
Units live in every name and are spelled the same in protobuf and ClickHouse.
"""

from __future__ import annotations

import pyarrow as pa

HIST_BUCKETS = 10  # utilization histogram: [0,10), [10,20), ... [90,100]

GPU_WINDOW_SCHEMA = pa.schema(
    [
        ("gpu_uuid", pa.string()),
        ("window_start_ms", pa.int64()),
        ("window_ms", pa.uint32()),
        ("sample_count", pa.uint32()),
        ("covered_ms", pa.uint32()),
        ("busy_ms", pa.uint32()),
        ("idle_held_ms", pa.uint32()),
        ("idle_free_ms", pa.uint32()),
        ("unmonitored_ms", pa.uint32()),
        ("util_min_pct", pa.uint8()),
        ("util_max_pct", pa.uint8()),
        ("util_hist", pa.list_(pa.uint16())),
        ("mem_used_max_bytes", pa.uint64()),
        ("power_mean_mw", pa.uint32()),
        ("power_max_mw", pa.uint32()),
        ("energy_mj", pa.uint64()),
        ("temp_max_c", pa.uint8()),
        ("gpm_covered_ms", pa.uint32()),
        ("sm_active_ms", pa.uint32()),
        ("sm_occupancy_ms", pa.uint32()),
        ("tensor_active_ms", pa.uint32()),
        ("dram_active_ms", pa.uint32()),
    ]
)

PROC_WINDOW_SCHEMA = pa.schema(
    [
        ("gpu_uuid", pa.string()),
        ("window_start_ms", pa.int64()),
        ("pid", pa.uint32()),
        ("proc_start_ms", pa.int64()),
        ("held_ms", pa.uint32()),
        ("busy_ms", pa.uint32()),
        ("mem_max_bytes", pa.uint64()),
    ]
)

# One row per (inference endpoint, window): the inference server's own counters, scraped on the host.
ENDPOINT_WINDOW_SCHEMA = pa.schema(
    [
        ("endpoint", pa.string()),
        ("server", pa.string()),  # vllm | tgi | triton | sglang
        ("window_start_ms", pa.int64()),
        ("window_ms", pa.uint32()),
        ("scraped_ms", pa.uint32()),  # time of the window between two good scrapes: the rest is unknown
        ("requests", pa.uint64()),  # requests completed successfully in the window
        ("prompt_tokens", pa.uint64()),
        ("generation_tokens", pa.uint64()),
        ("running_max", pa.uint32()),  # most requests in flight at one scrape
        ("scrape_errors", pa.uint32()),
    ]
)

STATE_COLUMNS = ("busy_ms", "idle_held_ms", "idle_free_ms", "unmonitored_ms")


def to_ipc(table: pa.Table | pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return sink.getvalue().to_pybytes()


def from_ipc(body: bytes) -> pa.Table:
    if not body:
        raise ValueError("empty Arrow body")
    return pa.ipc.open_stream(pa.py_buffer(body)).read_all()
