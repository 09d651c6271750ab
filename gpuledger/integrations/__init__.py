"""Experiment trackers: write gpuledger's cost figures onto MLflow and W&B runs, read their runs
and model registries.

Neither tracker's client library is imported by gpuledger at run time: MLflow is reached through
its REST API (urllib + JSON), W&B's public API only when a W&B write is asked for.

The cost figures of one run, as `cost --by run` gives them, are a mapping with the keys of
COST_NUMBERS and COST_TEXT; both integrations check it with `split_cost`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# Numbers: MLflow metrics (searchable as metrics."gpuledger.cost" > 10, plotted, compared across runs).
COST_NUMBERS = ("gpu_hours", "active_hours", "idle_held_hours", "cost", "idle_share")
# Text: MLflow tags.
COST_TEXT = ("price_source", "currency")
PREFIX = "gpuledger."


def split_cost(cost: Mapping) -> tuple[dict[str, float], dict[str, str]]:
    """A run's cost figures -> (numbers, text), keys without prefix. Every key of COST_NUMBERS and
    COST_TEXT must be there; numbers must be finite and >= 0; unknown keys are an error."""
    unknown = sorted(set(cost) - set(COST_NUMBERS) - set(COST_TEXT))
    if unknown:
        raise ValueError(f"cost: unknown field(s) {', '.join(unknown)} (known: {', '.join(COST_NUMBERS + COST_TEXT)})")
    missing = [k for k in COST_NUMBERS + COST_TEXT if k not in cost]
    if missing:
        raise ValueError(f"cost: missing field(s) {', '.join(missing)}")
    numbers: dict[str, float] = {}
    for k in COST_NUMBERS:
        v = cost[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"cost.{k}: must be a finite number >= 0, got {v!r}")
        numbers[k] = float(v)
    if numbers["idle_share"] > 1:
        raise ValueError(f"cost.idle_share: a share, 0..1, got {numbers['idle_share']!r}")
    text = {k: str(cost[k]) for k in COST_TEXT}
    return numbers, text
