"""CLI of endpoints, runs, estimates and alerts: `gpuledger endpoints`, `inference-model`, `runs`,
`estimate`, `alerts`. Each asks the collector's Query service (reports "endpoints",
"inference_model", "runs", "estimate", "alerts"); `runs` and `estimate --mlflow-experiment` also
talk to MLflow with the user's own MLflow settings ([mlflow] of --config, MLFLOW_TRACKING_URI and
MLflow's credential variables).

Register with `cli_workflow.register(app)` on the root typer app.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated

import typer

from gpuledger.collector.cli import DEFAULT_COLLECTOR, Fmt, _report
from gpuledger.config import ConfigError
from gpuledger.format import render

Collector = Annotated[str, typer.Option(help="Collector HOST:PORT.")]
Since = Annotated[str | None, typer.Option(help="Start: ISO 8601 or relative (7d, 12h). Default 7d.")]
Until = Annotated[str | None, typer.Option(help="End: ISO 8601 or relative. Default now.")]
Format = Annotated[Fmt, typer.Option("--format", help="table, csv or json.")]
TokenFile = Annotated[str | None, typer.Option(help="File holding the read-only query token (or GPULEDGER_QUERY_TOKEN).")]
CaFile = Annotated[str | None, typer.Option(help="CA certificate of a TLS collector.")]

ENDPOINT_COLUMNS = ["endpoint", "phase", "up_hours", "serving_hours", "idle_share", "requests", "cost",
                    "cost_per_1k_requests", "cost_per_million_tokens", "scale_to_zero_saving", "cold_starts",
                    "office_hours_saving", "currency"]


def _fail(cmd: str, msg: str, code: int = 2):
    typer.echo(f"gpuledger {cmd}: {msg}", err=True)
    raise typer.Exit(code)


def endpoints(
    collector: Collector = DEFAULT_COLLECTOR,
    since: Since = None,
    until: Until = None,
    endpoint: Annotated[str | None, typer.Option(help="Only this endpoint.")] = None,
    idle_minutes: Annotated[float, typer.Option(help="Scale-to-zero replay: down after this many idle minutes.")] = 15.0,
    office_hours: Annotated[str, typer.Option(help="Office-hours replay: local hours, HH:MM-HH:MM.")] = "08:00-18:00",
    office_days: Annotated[str, typer.Option(help="Office-hours replay: days, e.g. mon-fri or mon,wed.")] = "mon-fri",
    timezone: Annotated[str, typer.Option(help="Time zone of the office hours (IANA name).")] = "UTC",
    fmt: Format = Fmt.table,
    token_file: TokenFile = None,
    ca_file: CaFile = None,
) -> None:
    """Inference endpoints: up and serving hours, idle share, cost per 1,000 requests and per million tokens.

    Serving comes from each endpoint's own request counters (agent.endpoints in the
    agent config), or, without them, from its GPUs being busy. Each endpoint's measured timeline is replayed under scale-to-zero
    (after --idle-minutes without traffic) and under an office-hours schedule to show what either
    would have saved. Development and staging endpoints up around the clock while serving a few
    hours a day are flagged.

    Examples:
      gpuledger endpoints --since 7d
      gpuledger endpoints --since 30d --idle-minutes 30 --office-hours 07:00-19:00 --timezone Europe/Berlin
      gpuledger endpoints --endpoint chat-dev --format json
    """
    from gpuledger.collector.endpoints import EndpointError, Schedule

    try:  # bad input is named here, before the collector is asked
        Schedule.parse(office_hours, office_days, timezone)
    except EndpointError as e:
        _fail("endpoints", str(e))
    filters = {"idle_minutes": str(idle_minutes), "office_hours": office_hours, "office_days": office_days,
               "timezone": timezone}
    if endpoint:
        filters["endpoint"] = endpoint
    table, reply = _report("endpoints", collector, since, until, "", filters, token_file, ca_file)
    rows = table.to_pylist()
    typer.echo(render(rows, fmt.value, ENDPOINT_COLUMNS if fmt != Fmt.json else None))
    if fmt == Fmt.table:
        for r in rows:
            if r.get("flag"):
                typer.echo(f"! {r['endpoint']}: {r['flag']}")
        typer.echo(f"\nprices: {reply.pricing_source}", err=True)


def inference_model(
    endpoint: Annotated[str, typer.Option(help="The endpoint whose measurements size the target.")],
    target_rps: Annotated[float | None, typer.Option(help="Target traffic, requests per second (sustained).")] = None,
    requests_per_day: Annotated[float | None, typer.Option(help="Target traffic per day (sized for the endpoint's "
                                                                "own peak-to-mean).")] = None,
    tokens_per_request: Annotated[float | None, typer.Option(help="Size by tokens: prompt + generation tokens per "
                                                                  "request.")] = None,
    headroom: Annotated[float, typer.Option(help="Share of demonstrated capacity kept free (0.3: run at 70 %).")] = 0.3,
    idle_minutes: Annotated[float, typer.Option(help="Scale-to-zero idle timeout for the floor comparison.")] = 15.0,
    instance_type: Annotated[list[str] | None, typer.Option(help="Candidate instance types (repeat); default: "
                                                                 "every catalog type with the endpoint's GPU.")] = None,
    collector: Collector = DEFAULT_COLLECTOR,
    since: Annotated[str | None, typer.Option(help="Measurements from: ISO 8601 or relative. Default 14d.")] = None,
    until: Until = None,
    fmt: Format = Fmt.table,
    token_file: TokenFile = None,
    ca_file: CaFile = None,
) -> None:
    """Pre-launch cost of an inference endpoint at a target traffic, from an endpoint's measured capacity.

    Capacity is what the endpoint served per GPU-second in its busiest 5-minute buckets. From it: the
    GPUs needed with the stated headroom, the monthly cost per candidate instance type (catalog
    prices, 730 h a month), the cost per 1,000 requests, and the floor of one always-on instance
    against scale-to-zero at the target's mean traffic.

    Examples:
      gpuledger inference-model --endpoint chat --target-rps 40
      gpuledger inference-model --endpoint chat --requests-per-day 2000000 --tokens-per-request 900
      gpuledger inference-model --endpoint chat --target-rps 5 --instance-type g6e.xlarge --instance-type g6e.12xlarge
    """
    if (target_rps is None) == (requests_per_day is None):
        _fail("inference-model", "give exactly one of --target-rps and --requests-per-day")
    filters = {"endpoint": endpoint, "headroom": str(headroom), "idle_minutes": str(idle_minutes)}
    for k, v in (("target_rps", target_rps), ("requests_per_day", requests_per_day),
                 ("tokens_per_request", tokens_per_request)):
        if v is not None:
            filters[k] = str(v)
    if instance_type:
        filters["instance_types"] = ",".join(instance_type)
    table, reply = _report("inference_model", collector, since or "14d", until, "", filters, token_file, ca_file)
    rows = table.to_pylist()
    if fmt != Fmt.table:
        typer.echo(render(rows, fmt.value))
        return
    if rows:
        r = rows[0]
        typer.echo(f"endpoint {r['endpoint']}: {r['target']}")
        typer.echo(f"rests on: {r['basis']}")
        typer.echo(f"GPUs needed: {r['gpus_needed']} (headroom {r['headroom'] * 100:.0f} %)\n")
    typer.echo(render(rows, "table", ["instance_type", "provider", "region", "gpus_per_instance", "instances",
                                      "monthly_cost", "cost_per_1k_requests", "always_on_floor_monthly",
                                      "scale_to_zero_monthly", "currency", "note"]))
    if rows:
        cheapest = rows[0]
        typer.echo(f"\nat this traffic one always-on {cheapest['instance_type']} costs at least "
                   f"{cheapest['always_on_floor_monthly']:,.2f} {cheapest['currency']}/month; scale-to-zero after "
                   f"{idle_minutes:g} idle min would be up {cheapest['scale_to_zero_up_share'] * 100:.0f} % of the time "
                   f"(Poisson arrivals at the mean rate)")
    typer.echo(f"\nprices: {reply.pricing_source}", err=True)


def _mlflow(cmd: str, config: str | None, tracking_uri: str | None):
    from gpuledger.config import load_mlflow
    from gpuledger.integrations.mlflow import MlflowClient

    try:
        cfg = load_mlflow(config, tracking_uri=tracking_uri)
    except ConfigError as e:
        _fail(cmd, str(e))
    if not cfg.tracking_uri:
        return cfg, None
    return cfg, MlflowClient.from_env(cfg.tracking_uri, timeout_s=cfg.timeout_s)


def _iso(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M") if ms else "-"


def runs(
    experiment: Annotated[str | None, typer.Option(help="An MLflow experiment (name or id) or W&B project.")] = None,
    successful: Annotated[bool, typer.Option(help="Split cost between runs that led to a deployment and runs that "
                                                  "did not (MLflow registry).")] = False,
    config: Annotated[str | None, typer.Option(help="TOML config with an [mlflow] section.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: [mlflow] tracking_uri or "
                                                          "MLFLOW_TRACKING_URI).")] = None,
    collector: Collector = DEFAULT_COLLECTOR,
    since: Annotated[str | None, typer.Option(help="Start: ISO 8601 or relative. Default: the experiment's first "
                                                   "run, else 30d.")] = None,
    until: Until = None,
    fmt: Format = Fmt.table,
    token_file: TokenFile = None,
    ca_file: CaFile = None,
) -> None:
    """Experiment runs with their GPU cost and status; or what successful models cost.

    Cost per run is `cost --by run` (a run is its processes' MLFLOW_RUN_ID or WANDB_RUN_ID). Status and
    names come from MLflow when it is configured; MLflow credentials come from its own environment
    (MLFLOW_TRACKING_USERNAME / _PASSWORD or MLFLOW_TRACKING_TOKEN).

    Examples:
      gpuledger runs --experiment llm-finetune
      gpuledger runs --experiment 12 --since 90d --format csv
      gpuledger runs --successful --since 90d
    """
    if bool(experiment) == successful:
        _fail("runs", "give --experiment X or --successful")
    from gpuledger.integrations.mlflow import MlflowError

    mcfg, client = _mlflow("runs", config, tracking_uri)
    if successful:
        if client is None:
            _fail("runs", "--successful needs MLflow: set [mlflow] tracking_uri or MLFLOW_TRACKING_URI")
        from gpuledger.collector.runs import deployment_split

        try:
            basis = client.deployment_cost_basis(mcfg.deploy_aliases, mcfg.deploy_stages)
        except (MlflowError, OSError) as e:
            _fail("runs", f"MLflow at {client.base}: {e}", 1)
        start = min((r.start_time_ms for r in basis.runs), default=0)
        since = since or (_iso_hour(start) if start else "30d")
        table, _ = _report("runs", collector, since, until, "", {}, token_file, ca_file)
        costs = {r["run"]: r["cost"] for r in table.to_pylist() if r.get("cost") is not None}
        rows = deployment_split(basis, costs)
        typer.echo(render(rows, fmt.value, ["group", "runs", "statuses", "cost", "share"] if fmt != Fmt.json else None))
        if fmt == Fmt.table:
            n = len(basis.deployments)
            per = rows[0]["cost_per_deployment"] if rows else None
            deps = ", ".join(f"{d.model}/{d.version}" for d in basis.deployments) or "none"
            typer.echo(f"\n{n} deployment(s) ({deps}) from {len(basis.experiments)} experiment(s): cost per "
                       f"successful deployment {'-' if per is None else f'{per:,.2f}'}")
        return
    exp_id, tracked = experiment, {}
    if client is not None:
        try:
            exp = client.get_experiment_by_name(experiment) if not experiment.isdigit() else \
                client.get_experiment(experiment)
            exp_id = exp.experiment_id
            tracked = {r.run_id: r for r in client.search_runs([exp_id])}
        except (MlflowError, OSError) as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                _fail("runs", f"MLflow at {client.base}: {e}", 1)
    start = min((r.start_time_ms for r in tracked.values()), default=0)
    since = since or (_iso_hour(start) if start else "30d")
    table, reply = _report("runs", collector, since, until, "", {"experiment": exp_id}, token_file, ca_file)
    costed = {r["run"]: r for r in table.to_pylist()}
    rows = []
    for rid in sorted(set(tracked) | set(costed), key=lambda i: (tracked[i].start_time_ms if i in tracked else 0, i)):
        t, c = tracked.get(rid), costed.get(rid, {})
        rows.append({"run": rid, "name": t.name if t else "", "status": t.status if t else "-",
                     "start": _iso(t.start_time_ms) if t else _iso(c.get("first_start_ms")),
                     "end": _iso(t.end_time_ms) if t else "-", "gpu_hours": c.get("gpu_hours"),
                     "active_hours": c.get("active_hours"), "idle_held_hours": c.get("idle_held_hours"),
                     "cost": c.get("cost"), "idle_share": c.get("idle_share"), "currency": c.get("currency", "")})
    typer.echo(render(rows, fmt.value, None if fmt == Fmt.json else list(rows[0]) if rows else None))
    if fmt == Fmt.table:
        total = sum(r["cost"] or 0.0 for r in rows)
        typer.echo(f"\n{len(rows)} run(s) of experiment {experiment}: {total:,.2f} in all"
                   + ("" if client is not None else " (MLflow not configured: no names or statuses)"))
        typer.echo(f"prices: {reply.pricing_source}", err=True)


def _iso_hour(ms: int) -> str:
    return datetime.fromtimestamp(ms // 3_600_000 * 3600, UTC).isoformat()


def estimate(
    instance_type: Annotated[str | None, typer.Option(help="Plan: instance type (with --gpus and --hours).")] = None,
    gpus: Annotated[int | None, typer.Option(help="Plan: GPUs.")] = None,
    hours: Annotated[float | None, typer.Option(help="Plan: hours the GPUs are held.")] = None,
    provider: Annotated[str | None, typer.Option(help="Plan: provider, where the type is ambiguous.")] = None,
    region: Annotated[str | None, typer.Option(help="Plan: region, where the type is ambiguous.")] = None,
    like: Annotated[str | None, typer.Option(help="Similar past runs: experiment=X (MLflow experiment id or name, "
                                                  "or W&B project).")] = None,
    like_run: Annotated[str | None, typer.Option(help="Similar past runs: those of this run's experiment.")] = None,
    team: Annotated[str | None, typer.Option(help="Team whose measured idle share applies (default: the runs' "
                                                  "team, else the fleet).")] = None,
    mlflow_experiment: Annotated[str | None, typer.Option(help="Write the estimate onto a new run of this MLflow "
                                                               "experiment (created if missing).")] = None,
    config: Annotated[str | None, typer.Option(help="TOML config with an [mlflow] section.")] = None,
    collector: Collector = DEFAULT_COLLECTOR,
    since: Annotated[str | None, typer.Option(help="History from: ISO 8601 or relative. Default 90d.")] = None,
    until: Until = None,
    fmt: Format = Fmt.table,
    token_file: TokenFile = None,
    ca_file: CaFile = None,
) -> None:
    """Estimate a job's GPU cost before it runs: from a plan, or from similar past runs.

    A plan prices GPUs x hours at the catalog (or override) price in force. Similar runs give the
    50th and 90th percentile of their cost. Both show the team's measured idle share and what that
    share of the estimate would be.

    Examples:
      gpuledger estimate --instance-type p5.48xlarge --gpus 8 --hours 36 --team research
      gpuledger estimate --like experiment=llm-finetune
      gpuledger estimate --like-run 8f1c2e... --mlflow-experiment budget-requests
    """
    filters: dict[str, str] = {}
    if instance_type:
        if gpus is None or hours is None:
            _fail("estimate", "--instance-type needs --gpus and --hours")
        filters.update({"instance_type": instance_type, "gpus": str(gpus), "hours": str(hours)})
        if provider:
            filters["provider"] = provider
        if region:
            filters["region"] = region
    if like:
        key, sep, value = like.partition("=")
        if key != "experiment" or not sep or not value:
            _fail("estimate", f"--like: {like!r} must be experiment=X")
        filters["like_experiment"] = value
    if like_run:
        filters["like_run"] = like_run
    if sum(k in filters for k in ("instance_type", "like_experiment", "like_run")) != 1:
        _fail("estimate", "give one of --instance-type (with --gpus, --hours), --like experiment=X, --like-run ID")
    if team:
        filters["team"] = team
    mcfg, client = (None, None)
    if mlflow_experiment or (like and not filters["like_experiment"].isdigit()):
        mcfg, client = _mlflow("estimate", config, None)
    if "like_experiment" in filters and client is not None and not filters["like_experiment"].isdigit():
        from gpuledger.integrations.mlflow import MlflowError

        try:  # an MLflow experiment name -> its id (processes carry the id)
            filters["like_experiment"] = client.get_experiment_by_name(filters["like_experiment"]).experiment_id
        except MlflowError as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                _fail("estimate", f"MLflow at {client.base}: {e}", 1)
    table, reply = _report("estimate", collector, since or "90d", until, "", filters, token_file, ca_file)
    rows = table.to_pylist()
    typer.echo(render(rows, fmt.value, None if fmt == Fmt.json else
                      [c for c in ("cost", "p50_cost", "p90_cost", "runs", "gpu_hours", "team_idle_share",
                                   "expected_idle_cost", "currency") if rows and c in rows[0]]))
    if fmt == Fmt.table and rows:
        typer.echo(f"\nbasis: {rows[0]['basis']}; idle share of {rows[0]['team']}")
    if mlflow_experiment:
        if client is None:
            _fail("estimate", "--mlflow-experiment needs MLflow: set [mlflow] tracking_uri or MLFLOW_TRACKING_URI")
        est = {k: v for k, v in rows[0].items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        est["cost"] = round(float(est["cost"]), 2)
        run = client.create_estimate_run(mlflow_experiment, est, run_name="gpuledger-estimate", create_experiment=True)
        typer.echo(f"estimate written onto MLflow run {run.run_id} of experiment {mlflow_experiment}")


def alerts(
    collector: Collector = DEFAULT_COLLECTOR,
    since: Annotated[str | None, typer.Option(help="Resolved alerts from: ISO 8601 or relative. Default 24h.")] = None,
    until: Until = None,
    fmt: Format = Fmt.table,
    token_file: TokenFile = None,
    ca_file: CaFile = None,
) -> None:
    """Alerts firing or pending now, and those resolved in the range (the collector.alerts rules).

    State `stale`: the collector has not re-evaluated a firing alert for a few minutes (its alert
    job stopped or fails).

    Examples:
      gpuledger alerts
      gpuledger alerts --since 7d --format json
    """
    table, _ = _report("alerts", collector, since or "24h", until, "", {}, token_file, ca_file)
    typer.echo(render(table.to_pylist(), fmt.value, ["state", "alertname", "subject", "active_since", "value",
                                                     "summary"] if fmt != Fmt.json else None))


def register(app: typer.Typer) -> None:
    """Add the commands to the root app."""
    app.command()(endpoints)
    app.command("inference-model")(inference_model)
    app.command()(runs)
    app.command()(estimate)
    app.command()(alerts)
