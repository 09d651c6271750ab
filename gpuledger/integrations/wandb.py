"""Weights & Biases: a run's cost figures written into its summary through wandb's public API.

    write_cost("entity/project/run_id", cost)  ->  run = wandb.Api().run(path);
                                                   run.summary[key] = value ...; run.summary.update()

The keys are `gpuledger/<field>` (W&B groups keys by the part before "/"): the numbers of
COST_NUMBERS as numbers, price_source and currency as text. The wandb package is imported only
when a write is asked for, so an agent or collector without it never loads it. The API key comes
from wandb's own settings (WANDB_API_KEY or ~/.netrc), the entity from the path or WANDB_ENTITY.

NOT VERIFIED AGAINST A W&B SERVER: no W&B server can run in this project's test environment.
What is tested: the field mapping, the run path, and the error when wandb is missing. The call
itself follows the public-API example of W&B's "Log summary metrics" page (set summary keys on
Api().run(path), then summary.update()).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from gpuledger.integrations import split_cost

KEY_PREFIX = "gpuledger/"


class WandbUnavailable(RuntimeError):
    pass


def summary_fields(cost: Mapping) -> dict:
    """The summary keys and values written for one run's cost figures."""
    numbers, text = split_cost(cost)
    out: dict = {KEY_PREFIX + k: v for k, v in numbers.items()}
    out.update({KEY_PREFIX + k: v for k, v in text.items()})
    return out


def run_path(run_id: str, project: str, entity: str = "") -> str:
    """entity/project/run_id (entity from WANDB_ENTITY when not given; without one, wandb uses the
    API key's default entity)."""
    entity = entity or os.environ.get("WANDB_ENTITY", "")
    for name, value in (("run_id", run_id), ("project", project), ("entity", entity)):
        if "/" in value or (name != "entity" and not value):
            raise ValueError(f"W&B {name}: must be a non-empty name without '/', got {value!r}")
    return f"{entity}/{project}/{run_id}" if entity else f"{project}/{run_id}"


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise WandbUnavailable("writing cost to W&B needs the wandb package, which is not installed here "
                               "(pip install wandb); gpuledger imports it only for this") from e
    return wandb


def write_cost(path: str, cost: Mapping, timeout_s: float = 30.0) -> dict:
    """Write a run's cost figures into its W&B summary; returns what was written."""
    if path.count("/") not in (1, 2) or any(not p for p in path.split("/")):
        raise ValueError(f"W&B run path must be [entity/]project/run_id, got {path!r}")
    fields = summary_fields(cost)
    wandb = _import_wandb()
    try:
        run = wandb.Api(timeout=int(timeout_s)).run(path)
        for k, v in fields.items():  # W&B's documented way: set the keys, then update() writes them
            run.summary[k] = v
        run.summary.update()
    except Exception as e:  # wandb raises its own CommError and others: name the run
        raise RuntimeError(f"W&B run {path}: writing cost failed: {e}") from e
    return fields
