"""MLflow through its REST API (/api/2.0/mlflow/...): urllib and JSON, no mlflow import.

What gpuledger writes on a run (one `runs/log-batch` request, so a run never shows half of it):

- metrics `gpuledger.gpu_hours`, `gpuledger.active_hours`, `gpuledger.idle_held_hours`,
  `gpuledger.cost`, `gpuledger.idle_share`: numbers, so that MLflow can search
  (`metrics."gpuledger.cost" > 100`), sort, plot and compare them across runs. Written at step 0
  with the time of writing: a later write (a corrected price) becomes the value MLflow shows, and
  the earlier ones stay in the metric's history.
- tags `gpuledger.price_source`, `gpuledger.currency`: text, which metrics cannot hold.

Credentials are MLflow's own: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (HTTP basic),
else MLFLOW_TRACKING_TOKEN (bearer), as the mlflow client orders them; MLFLOW_TRACKING_INSECURE_TLS
and MLFLOW_TRACKING_SERVER_CERT_PATH as there too. Every error names what was asked (the run, the
experiment, the model) and the HTTP status and MLflow error code.

Deployments: a deployment is a READY model version that holds one of the deploy aliases (MLflow
2.3+ aliases, default `production` and `champion`) or sits in a deploy stage (legacy stages,
default `Production`). MLflow keeps no history of aliases or stages, so only versions that hold
them now are found. `deployment_cost_basis` follows each deployment's version to its run and the
run's experiment, and lists every run of those experiments (failed, killed and deleted ones
included): what it took to get there. `cost_per_deployment` divides their cost, priced by
`cost --by run`, among the deployments.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gpuledger import __version__
from gpuledger.integrations import PREFIX, split_cost

API = "/api/2.0/mlflow"
RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")


class MlflowError(Exception):
    """An MLflow request that failed. `status` is the HTTP status (None: no answer), `error_code`
    MLflow's code (RESOURCE_DOES_NOT_EXIST, ...) when it gave one."""

    def __init__(self, message: str, status: int | None = None, error_code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


@dataclass(frozen=True)
class Run:
    run_id: str
    experiment_id: str
    name: str
    status: str  # RUNNING | SCHEDULED | FINISHED | FAILED | KILLED
    lifecycle_stage: str  # active | deleted
    start_time_ms: int
    end_time_ms: int | None
    tags: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # latest value of each metric
    params: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> Run:
        info, data = d.get("info", {}), d.get("data", {})
        end = info.get("end_time")
        return cls(run_id=info.get("run_id") or info.get("run_uuid", ""), experiment_id=str(info.get("experiment_id", "")),
                   name=info.get("run_name", ""), status=info.get("status", ""),
                   lifecycle_stage=info.get("lifecycle_stage", ""), start_time_ms=int(info.get("start_time") or 0),
                   end_time_ms=int(end) if end is not None else None,
                   tags={t["key"]: t.get("value", "") for t in data.get("tags", [])},
                   metrics={m["key"]: float(m["value"]) for m in data.get("metrics", [])},
                   params={p["key"]: p.get("value", "") for p in data.get("params", [])})


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    name: str
    lifecycle_stage: str
    tags: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> Experiment:
        return cls(experiment_id=str(d["experiment_id"]), name=d.get("name", ""),
                   lifecycle_stage=d.get("lifecycle_stage", ""),
                   tags={t["key"]: t.get("value", "") for t in d.get("tags", [])})


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    status: str  # READY | PENDING_REGISTRATION | FAILED_REGISTRATION
    stage: str  # legacy stage: None | Staging | Production | Archived
    run_id: str
    source: str
    created_ms: int
    aliases: tuple = ()

    @classmethod
    def from_json(cls, d: dict, aliases: Iterable[str] = ()) -> ModelVersion:
        return cls(name=d["name"], version=str(d["version"]), status=d.get("status", ""),
                   stage=d.get("current_stage", "None"), run_id=d.get("run_id", "") or "",
                   source=d.get("source", ""), created_ms=int(d.get("creation_timestamp") or 0),
                   aliases=tuple(sorted(set(d.get("aliases", [])) | set(aliases))))


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    aliases: dict  # alias -> version

    @classmethod
    def from_json(cls, d: dict) -> RegisteredModel:
        return cls(name=d["name"], aliases={a["alias"]: str(a["version"]) for a in d.get("aliases", [])})


@dataclass(frozen=True)
class Deployment:
    """A model version that counts as deployed, and why (its deploy aliases, or its stage)."""

    model: str
    version: str
    aliases: tuple
    stage: str
    run_id: str
    experiment_id: str = ""  # "" when the version has no run or its run is gone


@dataclass(frozen=True)
class DeploymentCostBasis:
    """What `cost --by run` must price to give the cost per successful deployment."""

    deployments: tuple  # Deployment, ...
    experiments: dict  # experiment_id -> Experiment
    runs: tuple  # Run, ... of those experiments, every status and lifecycle stage
    missing_runs: tuple = ()  # run ids of deployed versions that MLflow no longer has

    @property
    def run_ids(self) -> tuple:
        return tuple(r.run_id for r in self.runs)


class MlflowClient:
    """A small MLflow REST client. `tracking_uri` is the server's base URL (http[s]://host:port)."""

    def __init__(self, tracking_uri: str, *, username: str = "", password: str = "", token: str = "",
                 timeout_s: float = 10.0, insecure_tls: bool = False, ca_file: str = "") -> None:
        u = urllib.parse.urlsplit(tracking_uri)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"MLflow tracking URI must be http:// or https://, got {tracking_uri!r}")
        self.base = tracking_uri.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": f"gpuledger/{__version__}"}
        if username and password:
            raw = base64.b64encode(f"{username}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {raw}"
        elif token:
            self._headers["Authorization"] = f"Bearer {token}"
        ctx = None
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=ca_file or None)
            if insecure_tls:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        handlers: list = [urllib.request.HTTPSHandler(context=ctx)] if ctx else []
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_env(cls, tracking_uri: str = "", env: Mapping[str, str] | None = None,
                 timeout_s: float = 10.0) -> MlflowClient:
        """Credentials and TLS settings from MLflow's own environment variables."""
        env = os.environ if env is None else env
        uri = tracking_uri or env.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise ValueError("no MLflow tracking URI: set mlflow.tracking_uri or MLFLOW_TRACKING_URI")
        return cls(uri, username=env.get("MLFLOW_TRACKING_USERNAME", ""),
                   password=env.get("MLFLOW_TRACKING_PASSWORD", ""), token=env.get("MLFLOW_TRACKING_TOKEN", ""),
                   timeout_s=timeout_s,
                   insecure_tls=env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true", "yes"),
                   ca_file=env.get("MLFLOW_TRACKING_SERVER_CERT_PATH", ""))

    # ------------------------------------------------------------------ transport
    def _call(self, method: str, endpoint: str, what: str, params: Mapping | None = None,
              body: Mapping | None = None) -> dict:
        url = f"{self.base}{API}/{endpoint}"
        if params:
            url += "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None}, doseq=True)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=self._headers)
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", errors="replace")
            code, msg = "", text.strip()[:300]
            try:
                j = json.loads(text)
                code, msg = j.get("error_code", ""), j.get("message", msg)
            except ValueError:
                pass
            raise MlflowError(f"MLflow {what}: HTTP {e.code}{' ' + code if code else ''}: {msg}",
                              status=e.code, error_code=code) from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise MlflowError(f"MLflow {what}: no answer from {self.base}: {reason}") from e
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise MlflowError(f"MLflow {what}: the answer is not JSON ({raw[:80]!r})") from e

    def _pages(self, method: str, endpoint: str, what: str, key: str, query: dict, page_size: int) -> list:
        out, token = [], None
        while True:
            q = dict(query, max_results=page_size)
            if token:
                q["page_token"] = token
            page = self._call(method, endpoint, what, params=q if method == "GET" else None,
                              body=q if method == "POST" else None)
            out.extend(page.get(key, []))
            token = page.get("next_page_token")
            if not token:
                return out

    # ------------------------------------------------------------------ runs
    def get_run(self, run_id: str) -> Run:
        return Run.from_json(self._call("GET", "runs/get", f"run {run_id}: get", params={"run_id": run_id})["run"])

    def run_status(self, run_id: str) -> str:
        return self.get_run(run_id).status

    def update_run(self, run_id: str, status: str, end_time_ms: int | None = None) -> Run:
        """Set a run's status (FINISHED, FAILED, KILLED, ...) and end time."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        body: dict = {"run_id": run_id, "status": status}
        if end_time_ms is not None:
            body["end_time"] = int(end_time_ms)
        self._call("POST", "runs/update", f"run {run_id}: update", body=body)
        return self.get_run(run_id)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self._log_batch(run_id, "set tags", tags=tags)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], timestamp_ms: int | None = None,
                    step: int = 0) -> None:
        self._log_batch(run_id, "log metrics", metrics=metrics, timestamp_ms=timestamp_ms, step=step)

    def log_cost(self, run_id: str, cost: Mapping, timestamp_ms: int | None = None) -> None:
        """Write a run's cost figures (see gpuledger.integrations): numbers as metrics
        `gpuledger.<field>`, price_source and currency as tags, in one request."""
        numbers, text = split_cost(cost)
        self._log_batch(run_id, "log cost", metrics={PREFIX + k: v for k, v in numbers.items()},
                        tags={PREFIX + k: v for k, v in text.items()}, timestamp_ms=timestamp_ms)

    def _log_batch(self, run_id: str, what: str, metrics: Mapping[str, float] | None = None,
                   tags: Mapping[str, str] | None = None, timestamp_ms: int | None = None, step: int = 0) -> None:
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        body = {"run_id": run_id,
                "metrics": [{"key": k, "value": float(v), "timestamp": ts, "step": step} for k, v in (metrics or {}).items()],
                "tags": [{"key": k, "value": str(v)} for k, v in (tags or {}).items()]}
        self._call("POST", "runs/log-batch", f"run {run_id}: {what}", body=body)

    def search_runs(self, experiment_ids: Iterable[str] = (), experiment_names: Iterable[str] = (),
                    filter_string: str = "", include_deleted: bool = True, page_size: int = 1000) -> list[Run]:
        """Runs of the experiments given by id and/or name; every status; deleted runs too unless
        told otherwise (a deleted run still ran on a GPU)."""
        ids = [str(i) for i in experiment_ids] + [self.get_experiment_by_name(n).experiment_id for n in experiment_names]
        if not ids:
            raise ValueError("search_runs: give experiment ids or names")
        out = []
        for chunk in (ids[i:i + 100] for i in range(0, len(ids), 100)):  # MLflow's per-request cap
            query = {"experiment_ids": chunk, "filter": filter_string,
                     "run_view_type": "ALL" if include_deleted else "ACTIVE_ONLY"}
            rows = self._pages("POST", "runs/search", f"experiments {', '.join(chunk)}: search runs", "runs",
                               query, page_size)
            out.extend(Run.from_json(r) for r in rows)
        return out

    def create_run(self, experiment_id: str, run_name: str = "", tags: Mapping[str, str] | None = None,
                   start_time_ms: int | None = None) -> Run:
        body: dict = {"experiment_id": str(experiment_id),
                      "start_time": int(time.time() * 1000) if start_time_ms is None else int(start_time_ms),
                      "tags": [{"key": k, "value": str(v)} for k, v in (tags or {}).items()]}
        if run_name:
            body["run_name"] = run_name
        res = self._call("POST", "runs/create", f"experiment {experiment_id}: create run", body=body)
        return Run.from_json(res["run"])

    def create_estimate_run(self, experiment: str, estimate: Mapping, run_name: str = "",
                            create_experiment: bool = False) -> Run:
        """A new run (status RUNNING, as MLflow creates it) carrying a cost estimate as tags
        `gpuledger.estimate.<field>` plus `gpuledger.estimate` = "<cost> <currency>".
        `experiment` is an id, or a name (created first when `create_experiment`)."""
        if "cost" not in estimate or "currency" not in estimate:
            raise ValueError("estimate: needs at least cost and currency")
        exp_id = self._experiment_id(experiment, create=create_experiment)
        tags = {f"{PREFIX}estimate.{k}": str(v) for k, v in estimate.items()}
        tags[f"{PREFIX}estimate"] = f"{estimate['cost']} {estimate['currency']}"
        return self.create_run(exp_id, run_name=run_name, tags=tags)

    # ------------------------------------------------------------------ experiments
    def get_experiment(self, experiment_id: str) -> Experiment:
        res = self._call("GET", "experiments/get", f"experiment {experiment_id}: get",
                         params={"experiment_id": experiment_id})
        return Experiment.from_json(res["experiment"])

    def get_experiment_by_name(self, name: str) -> Experiment:
        res = self._call("GET", "experiments/get-by-name", f"experiment {name!r}: get by name",
                         params={"experiment_name": name})
        return Experiment.from_json(res["experiment"])

    def create_experiment(self, name: str) -> str:
        return str(self._call("POST", "experiments/create", f"experiment {name!r}: create",
                              body={"name": name})["experiment_id"])

    def _experiment_id(self, experiment: str, create: bool = False) -> str:
        if experiment.isdigit():
            try:
                return self.get_experiment(experiment).experiment_id
            except MlflowError as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        try:
            return self.get_experiment_by_name(experiment).experiment_id
        except MlflowError as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST" or not create:
                raise
        return self.create_experiment(experiment)

    # ------------------------------------------------------------------ model registry
    def search_registered_models(self, page_size: int = 1000) -> list[RegisteredModel]:
        rows = self._pages("GET", "registered-models/search", "registered models: search", "registered_models", {},
                           page_size)
        return [RegisteredModel.from_json(r) for r in rows]

    def search_model_versions(self, model: str = "", page_size: int = 10000) -> list[ModelVersion]:
        """Versions of one registered model (or of all). The search answer carries no aliases:
        they are filled in from the registered models."""
        query = {"filter": f"name='{_quote(model)}'"} if model else {}
        what = f"model {model!r}: search versions" if model else "model versions: search"
        rows = self._pages("GET", "model-versions/search", what, "model_versions", query, page_size)
        held: dict[tuple[str, str], list[str]] = {}
        names = {r["name"] for r in rows}
        for rm in self.search_registered_models():
            if rm.name in names:
                for alias, version in rm.aliases.items():
                    held.setdefault((rm.name, version), []).append(alias)
        return [ModelVersion.from_json(r, held.get((r["name"], str(r["version"])), ())) for r in rows]

    def get_model_version_by_alias(self, model: str, alias: str) -> ModelVersion:
        res = self._call("GET", "registered-models/alias", f"model {model!r} alias {alias!r}: get",
                         params={"name": model, "alias": alias})
        return ModelVersion.from_json(res["model_version"])

    def get_model_aliases(self, model: str) -> dict[str, str]:
        """alias -> version of one registered model."""
        res = self._call("GET", "registered-models/get", f"model {model!r}: get", params={"name": model})
        return RegisteredModel.from_json(res["registered_model"]).aliases

    # ------------------------------------------------------------------ deployments
    def deployments(self, aliases: Iterable[str] = ("production", "champion"),
                    stages: Iterable[str] = ("Production",)) -> list[Deployment]:
        """READY model versions that hold a deploy alias or sit in a deploy stage now."""
        aliases = {a.lower() for a in aliases}
        stages = {s.lower() for s in stages}
        out = []
        for mv in self.search_model_versions():
            held = tuple(a for a in mv.aliases if a.lower() in aliases)
            if mv.status == "READY" and (held or mv.stage.lower() in stages):
                out.append(Deployment(model=mv.name, version=mv.version, aliases=held, stage=mv.stage,
                                      run_id=mv.run_id))
        return sorted(out, key=lambda d: (d.model, int(d.version) if d.version.isdigit() else 0))

    def deployment_cost_basis(self, aliases: Iterable[str] = ("production", "champion"),
                              stages: Iterable[str] = ("Production",)) -> DeploymentCostBasis:
        deps, missing, exp_of_run = [], [], {}
        for d in self.deployments(aliases, stages):
            exp_id = ""
            if d.run_id:
                if d.run_id not in exp_of_run:
                    try:
                        exp_of_run[d.run_id] = self.get_run(d.run_id).experiment_id
                    except MlflowError as e:
                        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                            raise
                        exp_of_run[d.run_id] = ""
                        missing.append(d.run_id)
                exp_id = exp_of_run[d.run_id]
            deps.append(Deployment(d.model, d.version, d.aliases, d.stage, d.run_id, exp_id))
        exp_ids = sorted({d.experiment_id for d in deps if d.experiment_id}, key=_num_key)
        experiments = {i: self.get_experiment(i) for i in exp_ids}
        runs = tuple(self.search_runs(exp_ids)) if exp_ids else ()
        return DeploymentCostBasis(deployments=tuple(deps), experiments=experiments, runs=runs,
                                   missing_runs=tuple(sorted(set(missing))))


def cost_per_deployment(basis: DeploymentCostBasis, cost_by_run: Mapping[str, float]) -> dict:
    """Price the basis with `cost --by run` figures (run id -> cost). Returns the total, the count of
    deployments, the cost per deployment, and per experiment: its cost split by run status and its
    deployments. Runs without a figure (no GPU time seen) count as 0 and are listed."""
    per_exp: dict[str, dict] = {}
    for exp_id, exp in basis.experiments.items():
        per_exp[exp_id] = {"experiment": exp.name, "cost": 0.0, "by_status": {}, "runs": 0,
                           "deployments": [f"{d.model}/{d.version}" for d in basis.deployments
                                           if d.experiment_id == exp_id]}
    unpriced = []
    for r in basis.runs:
        e = per_exp.get(r.experiment_id)
        if e is None:
            continue
        c = float(cost_by_run.get(r.run_id, 0.0))
        if r.run_id not in cost_by_run:
            unpriced.append(r.run_id)
        e["cost"] += c
        e["runs"] += 1
        e["by_status"][r.status] = e["by_status"].get(r.status, 0.0) + c
    total = sum(e["cost"] for e in per_exp.values())
    n = len(basis.deployments)
    return {"total_cost": total, "deployments": n, "cost_per_deployment": total / n if n else None,
            "experiments": per_exp, "unpriced_runs": sorted(unpriced)}


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def _num_key(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)
