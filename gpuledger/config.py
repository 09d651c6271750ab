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
    # Kubernetes (agent/podresources.py): the kubelet's PodResources socket; empty: no pod attribution.
    # A GPU allocated to a pod that runs no process is then idle-held by that pod.
    pod_resources_socket: str = ""  # /var/lib/kubelet/pod-resources/kubelet.sock
    pod_resources_interval_s: float = 5.0  # how often the allocation is read
    pod_label_allowlist: tuple = ()  # pod labels read as tags: "LABEL" or "LABEL=TAG"; needs the Kubernetes API
    kube_api_url: str = ""  # empty: the in-cluster API server (KUBERNETES_SERVICE_HOST)
    kube_token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    kube_ca_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    node_name: str = ""  # the node whose pods to list; empty: host_id

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
        _require(self.kernels in ("numba", "numpy"), "agent.kernels", f"must be numba or numpy, got {self.kernels!r}")
        _require(all(isinstance(k, str) and isinstance(v, str) for k, v in self.tags.items()), "agent.tags",
                 "keys and values must be strings")
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
    ttl_days: int = 0  # 0: keep forever
    partition_by: str = "month"  # month | week | day (window tables; fixed when the tables are created)
    pricing_file: str = ""  # TOML overrides of the shipped catalog
    max_batch_bytes: int = 16 << 20
    max_batch_rows: int = 200_000
    max_gpus_per_batch: int = 1024
    max_streams: int = 1024  # agent streams served at once (each holds a thread)
    max_future_s: float = 300.0
    insert_max_rows: int = 500_000
    insert_max_wait_s: float = 0.05
    max_pending_rows: int = 2_000_000
    tokens_file: str = ""
    query_token_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    insecure: bool = False
    metrics_listen: str = ""

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
        return self


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


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
