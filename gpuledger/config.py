"""Configuration: frozen dataclasses; defaults < TOML file < GPULEDGER_* environment < flags.

`validate()` names the offending key in its message, e.g. `agent.window_s: must be > 0`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Environment keys the agent may read from a GPU process: everything else is never read.
DEFAULT_ENV_ALLOWLIST = (
    "GPULEDGER_TEAM",
    "GPULEDGER_PROJECT",
    "GPULEDGER_PHASE",
    "GPULEDGER_WORKLOAD",
    "GPULEDGER_ENDPOINT",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_ID",
    "WANDB_RUN_ID",
    "WANDB_PROJECT",
    "SLURM_JOB_ID",
    "SLURM_JOB_ACCOUNT",
)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class AgentConfig:
    host_id: str = field(default_factory=socket.gethostname)
    provider: str = "onprem"
    region: str = ""
    instance_type: str = ""
    instance_id: str = ""  # cloud instance id; empty: read from the instance metadata service at start
    gpu_count: int = 0  # GPUs the instance is priced for; 0: the number of GPUs the source sees
    tags: dict = field(default_factory=dict)  # host-level owner tags
    collector: str = "127.0.0.1:4700"
    spool_dir: str = "/var/lib/gpuledger-agent/spool"
    spool_max_bytes: int = 1 << 30
    window_s: float = 10.0
    tick_s: float = 1.0
    lateness_s: float = 2.0
    flush_s: float = 10.0  # how often closed windows become a batch
    env_allowlist: tuple = ()  # extra process environment keys to read, beyond the built-in list
    token_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    max_inflight: int = 8
    # Largest batch the agent builds; it also learns the collector's limit from its acknowledgements
    # and splits anything larger, so no batch is ever too large to deliver.
    max_batch_bytes: int = 4 << 20
    send_timeout_s: float = 30.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    idle_mem_threshold_mib: int = 1024  # replay: a 0 % GPU with this much memory used is idle-held
    # Window kernels of the live agent: numpy (default) or numba. A host folds tens of samples per
    # second per GPU: both cost the same CPU there, and numba with LLVM adds ~100 MB of memory.
    # Replay and the simulated demo, which fold millions of samples, use numba.
    kernels: str = "numpy"
    proc_root: str = "/proc"  # the host's /proc (e.g. /host/proc when the agent runs in a container)
    metrics_listen: str = ""
    # Inference servers on this host whose own Prometheus counters are scraped ([[agent.endpoints]]).
    endpoints: tuple = ()
    # Kubernetes (agent/podresources.py): the kubelet's PodResources socket; empty: no pod attribution.
    # A GPU allocated to a pod that runs no process is then idle-held by that pod.
    pod_resources_socket: str = ""  # /var/lib/kubelet/pod-resources/kubelet.sock
    pod_resources_interval_s: float = 5.0  # how often the allocation is read
    pod_label_allowlist: tuple = ()  # pod labels read as tags: "LABEL" or "LABEL=TAG"; needs the Kubernetes API
    kube_api_url: str = ""  # empty: the in-cluster API server (KUBERNETES_SERVICE_HOST)
    kube_token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    kube_ca_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    node_name: str = ""  # the node whose pods to list; empty: host_id

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", parse_endpoints(self.endpoints))

    def validate(self) -> AgentConfig:
        _require(bool(self.host_id) and len(self.host_id) <= 128, "agent.host_id", "must be 1..128 characters")
        _require(self.window_s > 0 and float(self.window_s * 1000).is_integer(), "agent.window_s",
                 "must be a positive whole number of milliseconds")
        _require(0 < self.tick_s <= self.window_s, "agent.tick_s", "must be > 0 and <= window_s")
        _require(self.lateness_s >= 0, "agent.lateness_s", "must be >= 0")
        _require(self.flush_s > 0, "agent.flush_s", "must be > 0")
        _require(self.gpu_count >= 0, "agent.gpu_count", "must be >= 0")
        _require(self.spool_max_bytes >= 1 << 16, "agent.spool_max_bytes", "must be at least 65536")
        _require(_is_hostport(self.collector), "agent.collector", f"must be HOST:PORT, got {self.collector!r}")
        _require(self.max_inflight >= 1, "agent.max_inflight", "must be >= 1")
        _require(self.max_batch_bytes >= 1 << 16, "agent.max_batch_bytes", "must be at least 65536")
        _require(self.kernels in ("numba", "numpy"), "agent.kernels", f"must be numba or numpy, got {self.kernels!r}")
        _require(all(isinstance(k, str) and isinstance(v, str) for k, v in self.tags.items()), "agent.tags",
                 "keys and values must be strings")
        _require_unique([e.name for e in self.endpoints], "agent.endpoints", "names must be unique")
        _require(self.pod_resources_interval_s > 0, "agent.pod_resources_interval_s", "must be > 0")
        _require(not self.pod_label_allowlist or bool(self.pod_resources_socket), "agent.pod_label_allowlist",
                 "needs agent.pod_resources_socket (labels are read for the pods that hold GPUs)")
        _require(not self.kube_api_url or self.kube_api_url.startswith(("https://", "http://")),
                 "agent.kube_api_url", f"must start with https:// or http://, got {self.kube_api_url!r}")
        if self.pod_label_allowlist:
            from gpuledger.agent.podresources import parse_label_allowlist

            try:
                parse_label_allowlist(self.pod_label_allowlist)
            except ValueError as e:
                raise ConfigError(f"agent.pod_label_allowlist: {e}") from e
        return self


@dataclass(frozen=True)
class CollectorConfig:
    listen: str = "127.0.0.1:4700"
    data_dir: str = "/var/lib/gpuledger"
    store: str = ""  # DSN; empty: chdb://<data_dir>/chdb
    database: str = "gpuledger"
    cluster: str = ""  # ClickHouse cluster name for ON CLUSTER DDL (server mode)
    ttl_days: int = 0  # retention of every time series (windows, their rollups, sessions, processes); 0: keep
    partition_by: str = "month"  # month | week | day (window tables; fixed when the tables are created)
    pricing_file: str = ""  # TOML overrides of the shipped catalog
    max_batch_bytes: int = 16 << 20
    max_batch_rows: int = 200_000
    max_gpus_per_batch: int = 1024
    max_streams: int = 10_000  # agent streams open at once (streams are cheap: no thread each)
    max_streams_per_agent: int = 4  # streams one credential (without tokens: one host id) may hold
    stream_idle_timeout_s: float = 300.0  # a stream that carries no batch this long is closed
    report_workers: int = 2  # reports computed at once; more wait (up to 4 times as many), then are refused
    report_memory_mb: int = 2048  # ClickHouse memory limit of one report query; group-by and sort spill above half
    report_threads: int = 0  # ClickHouse threads one report query may use; 0: as many as cores. On a small
    # collector, fewer than the cores leaves the rest to ingest while finance reads (benchmarks/README.md)
    report_timeout_s: float = 600.0  # the CLI's deadline for one report
    batch_log_days: int = 30  # how long the log of received batches (agent_batches) is kept
    backfill_hours: float = 24.0  # how far a run's start or a GPU's declared first window may precede its host's
    # first window (they claim time no window backs: unmonitored, priced)
    silence_grace_s: float = 90.0  # a host this long without a batch is silent; until then its last window ends it
    silence_horizon_s: float = 3600.0  # the longest silence (no stop) counted as unmonitored before the host is
    # taken as gone; a host that comes back after a shorter silence has it all counted
    seal_interval_s: float = 30.0  # how often hourly rollups are brought up to date
    run_sealer: bool = True  # several collectors on one ClickHouse cluster: let one of them roll up
    seal_settle_s: float = 60.0  # a host-hour is rolled up once nothing landed in it for this long
    max_future_s: float = 300.0
    insert_max_rows: int = 500_000
    insert_max_wait_s: float = 0.2  # a group commit waits this long for more batches (fewer, larger inserts)
    max_pending_rows: int = 2_000_000
    tokens_file: str = ""
    query_token_file: str = ""
    admin_token_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    insecure: bool = False
    metrics_listen: str = ""
    # Alerts ([[collector.alerts]] rules) posted to an Alertmanager-compatible /api/v2/alerts URL.
    alerts: tuple = ()
    alert_webhook_url: str = ""
    alert_repeat_s: float = 4 * 3600.0  # a firing alert is sent again only after this long
    alert_generator_url: str = ""  # generatorURL of every alert (e.g. a dashboard); empty: none
    alert_timeout_s: float = 5.0
    alert_interval_s: float = 60.0  # how often the alert rules are evaluated
    # Run cost written onto tracker runs: MLflow when [mlflow] tracking_uri (or MLFLOW_TRACKING_URI) is set,
    # W&B when wandb_sync is true (needs the wandb package and its API key).
    tracker_sync_s: float = 300.0  # how often; 0: never
    tracker_lookback_s: float = 2 * 86_400.0  # runs whose processes were seen this recently are (re)priced
    tracker_final_after_s: float = 600.0  # a run ended this long ago (and quiet as long) gets its final cost
    wandb_sync: bool = False
    wandb_entity: str = ""  # empty: WANDB_ENTITY, else the API key's default entity

    def __post_init__(self) -> None:
        object.__setattr__(self, "alerts", parse_alert_rules(self.alerts))

    def store_dsn(self) -> str:
        return self.store or f"chdb://{Path(self.data_dir) / 'chdb'}"

    def validate(self) -> CollectorConfig:
        _require(_is_hostport(self.listen), "collector.listen", f"must be HOST:PORT, got {self.listen!r}")
        dsn = self.store_dsn()
        _require(dsn.startswith(("chdb://", "http://", "https://")), "collector.store",
                 f"must start with chdb://, http:// or https://, got {dsn!r}")
        _require(self.ttl_days >= 0, "collector.ttl_days", "must be >= 0")
        _require(self.partition_by in ("month", "week", "day"), "collector.partition_by",
                 f"must be month, week or day, got {self.partition_by!r}")
        _require(self.max_batch_rows > 0, "collector.max_batch_rows", "must be > 0")
        _require(self.max_batch_bytes > 1024, "collector.max_batch_bytes", "must be > 1024")
        import re

        _require(bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", self.database)), "collector.database",
                 f"must be an identifier (letters, digits and _, not starting with a digit), got {self.database!r}")
        _require(not self.cluster or bool(re.match(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$", self.cluster)),
                 "collector.cluster", f"must be a cluster name, got {self.cluster!r}")
        for key in ("max_streams", "max_streams_per_agent", "report_workers", "report_memory_mb", "batch_log_days"):
            _require(getattr(self, key) >= 1, f"collector.{key}", "must be >= 1")
        for key in ("stream_idle_timeout_s", "report_timeout_s", "silence_grace_s", "silence_horizon_s",
                    "seal_interval_s"):
            _require(getattr(self, key) > 0, f"collector.{key}", "must be > 0")
        _require(self.backfill_hours >= 0, "collector.backfill_hours", "must be >= 0")
        _require(self.report_threads >= 0, "collector.report_threads", "must be >= 0 (0: as many as cores)")
        _require(self.seal_settle_s >= 0, "collector.seal_settle_s", "must be >= 0")
        _require(not self.alerts or bool(self.alert_webhook_url), "collector.alert_webhook_url",
                 "required when collector.alerts are defined")
        _require(not self.alert_webhook_url or _is_http_url(self.alert_webhook_url), "collector.alert_webhook_url",
                 f"must be an http:// or https:// URL, got {self.alert_webhook_url!r}")
        _require(not self.alert_generator_url or _is_http_url(self.alert_generator_url),
                 "collector.alert_generator_url", f"must be an http:// or https:// URL, got {self.alert_generator_url!r}")
        _require(self.alert_repeat_s > 0, "collector.alert_repeat_s", "must be > 0")
        _require(self.alert_timeout_s > 0, "collector.alert_timeout_s", "must be > 0")
        _require(self.alert_interval_s > 0, "collector.alert_interval_s", "must be > 0")
        _require(self.tracker_sync_s >= 0, "collector.tracker_sync_s", "must be >= 0 (0: never)")
        _require(self.tracker_lookback_s > 0, "collector.tracker_lookback_s", "must be > 0")
        _require(self.tracker_final_after_s >= 0, "collector.tracker_final_after_s", "must be >= 0")
        _require("/" not in self.wandb_entity, "collector.wandb_entity", "must be a name without '/'")
        _require_unique([r.name for r in self.alerts], "collector.alerts", "names must be unique (set name = ...)")
        return self


@dataclass(frozen=True)
class MlflowConfig:
    """[mlflow]: where the MLflow tracking server is and what counts as a deployment. Credentials come
    only from MLflow's own environment (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD), never from a file that is shared or logged."""

    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI from the environment
    deploy_aliases: tuple = ("production", "champion")  # MLflow 2.x+ registry aliases that mean "deployed"
    deploy_stages: tuple = ("Production",)  # legacy registry stages that mean "deployed"
    timeout_s: float = 10.0

    def validate(self) -> MlflowConfig:
        _require(not self.tracking_uri or _is_http_url(self.tracking_uri), "mlflow.tracking_uri",
                 f"must be an http:// or https:// URL, got {self.tracking_uri!r}")
        _require(all(isinstance(a, str) and a for a in self.deploy_aliases), "mlflow.deploy_aliases",
                 "must be non-empty strings")
        _require(all(isinstance(a, str) and a for a in self.deploy_stages), "mlflow.deploy_stages",
                 "must be non-empty strings")
        _require(self.timeout_s > 0, "mlflow.timeout_s", "must be > 0")
        return self


# ------------------------------------------------------------------ endpoints and alert rules
SERVER_KINDS = ("vllm", "tgi", "triton", "sglang")
ALERT_KINDS = ("gpu_idle_held", "endpoint_idle", "unwatched_gpu_spend", "agent_silent")
# Kinds whose threshold is a duration (seconds, or a string such as "2h"); the others are plain numbers.
DURATION_THRESHOLD_KINDS = ("gpu_idle_held", "agent_silent")


@dataclass(frozen=True)
class EndpointConfig:
    """One inference server on the agent's host: [[agent.endpoints]]."""

    name: str
    server: str  # vllm | tgi | triton | sglang
    url: str  # the server's own Prometheus endpoint, e.g. http://127.0.0.1:8000/metrics
    labels: dict = field(default_factory=dict)  # only series with these labels count, e.g. {model_name = "m"}
    every_s: float = 0.0  # scrape interval; 0: every agent tick
    timeout_s: float = 2.0


@dataclass(frozen=True)
class AlertRuleConfig:
    """One alert rule: [[collector.alerts]]. `for` (TOML key) is how long the condition must hold
    before the alert fires; `labels` are added to every alert of the rule."""

    kind: str
    threshold: float
    for_s: float = 0.0
    labels: dict = field(default_factory=dict)
    name: str = ""  # alertname; default: the kind in CamelCase (GpuIdleHeld, ...)
    summary: str = ""  # annotation text; default: one written from the facts


def parse_duration(value: Any, key: str) -> float:
    """Seconds from a number or a string such as "90s", "15m", "2h", "1d", "1h30m"."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: must be a duration (seconds or e.g. \"15m\"), got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str) and value.strip():
        units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
        text, out, num = value.strip(), 0.0, ""
        try:
            if text.replace(".", "", 1).isdigit():
                out = float(text)
            else:
                for ch in text:
                    if ch.isdigit() or ch == ".":
                        num += ch
                    elif ch in units and num:
                        out += float(num) * units[ch]
                        num = ""
                    else:
                        raise ValueError(ch)
                if num:
                    raise ValueError(num)
        except ValueError as e:
            raise ConfigError(f"{key}: must be a duration (seconds or e.g. \"15m\", \"2h\"), got {value!r}") from e
    else:
        raise ConfigError(f"{key}: must be a duration (seconds or e.g. \"15m\"), got {value!r}")
    if out < 0:
        raise ConfigError(f"{key}: must be >= 0, got {value!r}")
    return out


def _table(item: Any, key: str, what: str) -> dict:
    if not isinstance(item, dict):
        raise ConfigError(f"{key}: must be a table ({what} in the TOML file), got {item!r}")
    return item


def _string_map(value: Any, key: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{key}: must be a table of strings, e.g. {{ model_name = \"llama\" }}")
    return dict(value)


def _number(value: Any, key: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{key}: must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def parse_endpoints(value: Any, key: str = "agent.endpoints") -> tuple:
    """[[agent.endpoints]] tables (or EndpointConfig objects) -> validated EndpointConfigs."""
    if isinstance(value, (str, dict)) or value is None:
        raise ConfigError(f"{key}: must be [[agent.endpoints]] tables in the TOML file, got {value!r}")
    known = {f.name for f in fields(EndpointConfig)}
    out = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        if isinstance(item, EndpointConfig):
            item = dataclasses.asdict(item)
        item = _table(item, k, "[[agent.endpoints]]")
        for name in item:
            if name not in known:
                raise ConfigError(f"{k}.{name}: unknown key (known: {', '.join(sorted(known))})")
        for name in ("name", "server", "url"):
            if not isinstance(item.get(name), str) or not item.get(name):
                raise ConfigError(f"{k}.{name}: required, a non-empty string")
        if item["server"] not in SERVER_KINDS:
            raise ConfigError(f"{k}.server: must be one of {', '.join(SERVER_KINDS)}, got {item['server']!r}")
        if not _is_http_url(item["url"]):
            raise ConfigError(f"{k}.url: must be an http:// or https:// URL, got {item['url']!r}")
        out.append(EndpointConfig(name=item["name"], server=item["server"], url=item["url"],
                                  labels=_string_map(item.get("labels", {}), f"{k}.labels"),
                                  every_s=_number(item.get("every_s", 0.0), f"{k}.every_s"),
                                  timeout_s=_number(item.get("timeout_s", 2.0), f"{k}.timeout_s", positive=True)))
    return tuple(out)


def parse_alert_rules(value: Any, key: str = "collector.alerts") -> tuple:
    """[[collector.alerts]] tables (or AlertRuleConfig objects) -> validated AlertRuleConfigs."""
    if isinstance(value, (str, dict)) or value is None:
        raise ConfigError(f"{key}: must be [[collector.alerts]] tables in the TOML file, got {value!r}")
    known = {"kind", "threshold", "for", "labels", "name", "summary"}
    out = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        if isinstance(item, AlertRuleConfig):
            out.append(item)
            continue
        item = _table(item, k, "[[collector.alerts]]")
        for name in item:
            if name not in known:
                raise ConfigError(f"{k}.{name}: unknown key (known: {', '.join(sorted(known))})")
        kind = item.get("kind")
        if kind not in ALERT_KINDS:
            raise ConfigError(f"{k}.kind: must be one of {', '.join(ALERT_KINDS)}, got {kind!r}")
        if "threshold" not in item:
            raise ConfigError(f"{k}.threshold: required")
        if kind in DURATION_THRESHOLD_KINDS:
            threshold = parse_duration(item["threshold"], f"{k}.threshold")
        else:
            threshold = _number(item["threshold"], f"{k}.threshold")
            if kind == "endpoint_idle" and threshold > 1:
                raise ConfigError(f"{k}.threshold: an idle share, 0..1, got {item['threshold']!r}")
        for name in ("name", "summary"):
            if not isinstance(item.get(name, ""), str):
                raise ConfigError(f"{k}.{name}: must be a string")
        out.append(AlertRuleConfig(kind=kind, threshold=threshold, for_s=parse_duration(item.get("for", 0), f"{k}.for"),
                                   labels=_string_map(item.get("labels", {}), f"{k}.labels"),
                                   name=item.get("name", "") or "".join(p.title() for p in kind.split("_")),
                                   summary=item.get("summary", "")))
    return tuple(out)


def _is_http_url(s: str) -> bool:
    from urllib.parse import urlsplit

    try:
        u = urlsplit(s)
    except ValueError:
        return False
    return u.scheme in ("http", "https") and bool(u.hostname)


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _require_unique(names: list[str], key: str, msg: str) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    _require(not dup, key, f"{msg}, {', '.join(dup)} repeated")


def _is_hostport(s: str) -> bool:
    host, sep, port = s.rpartition(":")
    return bool(sep) and bool(host) and port.isdigit() and 0 <= int(port) < 65536


def _coerce(cls, key: str, name: str, value: Any) -> Any:
    f = {f.name: f for f in fields(cls)}[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
        if isinstance(default, dict):
            if isinstance(value, str):
                return dict(kv.split("=", 1) for kv in value.split(",") if kv)
            return dict(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read {value!r} as {type(default).__name__}") from e


def load(cls, section: str, path: str | os.PathLike | None = None, env: dict | None = None,
         overrides: dict | None = None):
    """Build a config of `cls` from defaults, then [section] of the TOML file, the environment
    (GPULEDGER_<SECTION>_<KEY>), then explicit overrides (flags; None values are ignored)."""
    names = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    if path:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path}: not found") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from e
        for key, value in doc.get(section, {}).items():
            if key not in names:
                raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(sorted(names))})")
            values[key] = _coerce(cls, f"{section}.{key}", key, value)
    env = os.environ if env is None else env
    prefix = f"GPULEDGER_{section.upper()}_"
    for k, v in env.items():
        if k.startswith(prefix):
            name = k[len(prefix):].lower()
            if name in names:
                values[name] = _coerce(cls, k, name, v)
    for name, v in (overrides or {}).items():
        if v is not None:
            values[name] = _coerce(cls, f"--{name.replace('_', '-')}", name, v)
    return cls(**values).validate()


def load_agent(path=None, env=None, **overrides) -> AgentConfig:
    return load(AgentConfig, "agent", path, env, overrides)


def load_collector(path=None, env=None, **overrides) -> CollectorConfig:
    return load(CollectorConfig, "collector", path, env, overrides)


def load_mlflow(path=None, env=None, **overrides) -> MlflowConfig:
    """[mlflow] of the file, GPULEDGER_MLFLOW_* environment, flags; the tracking URI falls back to
    MLflow's own MLFLOW_TRACKING_URI."""
    env = os.environ if env is None else env
    cfg = load(MlflowConfig, "mlflow", path, env, overrides)
    if not cfg.tracking_uri and env.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        cfg = dataclasses.replace(cfg, tracking_uri=env["MLFLOW_TRACKING_URI"]).validate()
    return cfg
