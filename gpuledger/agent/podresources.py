"""Which pod holds a GPU on Kubernetes: the kubelet PodResources API, plus pod labels as tags.

The kubelet serves `v1.PodResourcesLister` on a unix socket
(`/var/lib/kubelet/pod-resources/kubelet.sock`); `List` names, for every pod on the node, the
devices each of its containers was allocated. The NVIDIA device plugin names them
`GPU-<uuid>` (a whole GPU), `MIG-<uuid>` (a MIG instance) or `<uuid>::<n>` (replica n of a
time-sliced GPU); with its index strategy, the GPU's index (`0`, `1`, ...). These match the UUIDs
(or indices) NVML reports.

What the agent does with it (NvmlSource):
- A GPU allocated to pods and running no compute process is held BY THOSE PODS: its idle time is
  idle-held, not idle-free, and each pod appears as a process of its own, a pod holder
  (`ProcessIdentity` with pid 0, a negative `start_ms` derived from the pod's namespace and name
  (no real process start), command `pod <namespace>/<name>`, the pod's UID when known, and tags
  `namespace`, `pod` and the allowlisted labels). A time-sliced GPU held by several pods is split
  among them equally (equal held time; the collector splits by held share).
- A GPU running compute processes is held by those processes, as without Kubernetes; a process
  whose cgroup names a pod whose labels are known gets the pod's tags under its own environment
  tags (an environment tag wins over a label of the same name).

Labels come from the Kubernetes API (`GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`, with
the pod's service account token), only for the label keys in `agent.pod_label_allowlist`: an entry
`LABEL` gives the tag named by the label's last path part, lowercased, with `-` and `.` as `_`
(`app.kubernetes.io/part-of` -> `part_of`), an entry `LABEL=TAG` the tag TAG. Without an allowlist
the API is never called and pods carry only `namespace` and `pod`.

Failures never stop the agent: an unreachable socket or API is logged once per outage; the last
allocation read is used for up to three intervals, then GPUs count as allocated to no pod.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import ssl
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from gpuledger.agent.source import ProcessIdentity

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_TAG_VALUE = 256

# a label key: optional DNS-subdomain prefix and '/', then a name of at most 63 characters
_LABEL_NAME = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([a-z0-9.-]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")  # what the collector accepts as a tag key


@dataclass(frozen=True)
class PodAllocation:
    """One pod and the devices its containers hold: (resource name, device id) pairs."""

    namespace: str
    name: str
    devices: tuple[tuple[str, str], ...]


def device_key(resource_name: str, device_id: str) -> str | None:
    """The NVML UUID (or, for `nvidia.com/gpu` ids that are indices, `index:<n>`) a device id names.

    `GPU-<uuid>::3` (a time-sliced replica) -> `GPU-<uuid>`; `MIG-<uuid>` as is; `0` -> `index:0`.
    None for ids that name no NVIDIA device this way.
    """
    base = device_id.split("::", 1)[0].strip()
    if base.startswith(("GPU-", "MIG-")):
        return base
    if base.isdigit() and resource_name == "nvidia.com/gpu":
        return f"index:{int(base)}"
    return None


def parse_label_allowlist(entries: Iterable[str]) -> dict[str, str]:
    """{label key: tag name} from `agent.pod_label_allowlist` entries (`LABEL` or `LABEL=TAG`).

    Raises ValueError naming the entry that is not a label key or gives no valid tag name.
    """
    out: dict[str, str] = {}
    for raw in entries:
        entry = str(raw).strip()
        label, sep, tag = entry.partition("=")
        label = label.strip()
        if not _LABEL_KEY.match(label):
            raise ValueError(f"{entry!r} is not a Kubernetes label key (prefix/name, name at most 63 characters)")
        if not sep:
            tag = re.sub(r"[-.]", "_", label.rsplit("/", 1)[-1]).lower()
        tag = tag.strip()
        if not _TAG_KEY.match(tag) or tag in ("namespace", "pod"):
            raise ValueError(f"{entry!r}: tag name {tag!r} must be 1-64 of A-Z a-z 0-9 _ . : / - and not "
                             "namespace or pod")
        out[label] = tag
    return out


def _clean(value: str) -> str:
    return "".join(ch for ch in str(value) if ch >= " " and ch != "\x7f")[:MAX_TAG_VALUE]


class PodResourcesClient:
    """`List` over the kubelet's unix socket (the real v1 API, through the generated stubs)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout_s: float = 2.0) -> None:
        import grpc

        from gpuledger.kubelet.podresources.v1 import api_pb2, api_pb2_grpc

        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._pb = api_pb2
        self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(socket_path)}")
        self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)

    def list(self) -> list[PodAllocation]:
        reply = self._stub.List(self._pb.ListPodResourcesRequest(), timeout=self.timeout_s)
        out = []
        for pod in reply.pod_resources:
            devices = tuple((d.resource_name, i) for c in pod.containers for d in c.devices for i in d.device_ids)
            out.append(PodAllocation(pod.namespace, pod.name, devices))
        return out

    def close(self) -> None:
        self._channel.close()


@dataclass(frozen=True)
class PodMeta:
    uid: str
    labels: dict


class KubeApiPods:
    """UID and labels of the pods on one node, from the Kubernetes API server."""

    def __init__(self, base_url: str, node_name: str, *, token_file: str = f"{SERVICE_ACCOUNT}/token",
                 ca_file: str = f"{SERVICE_ACCOUNT}/ca.crt", timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.node_name = node_name
        self.token_file = token_file
        self.timeout_s = timeout_s
        self._ctx = None
        if self.base_url.startswith("https://"):
            self._ctx = ssl.create_default_context(cafile=ca_file or None)

    def pods(self) -> dict[tuple[str, str], PodMeta]:
        """{(namespace, name): PodMeta}; raises OSError (URLError included) or ValueError on failure."""
        query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={self.node_name}"})
        req = urllib.request.Request(f"{self.base_url}/api/v1/pods?{query}", headers={"Accept": "application/json"})
        if self.token_file:
            with open(self.token_file) as fh:  # read every time: projected tokens rotate
                req.add_header("Authorization", f"Bearer {fh.read().strip()}")
        with urllib.request.urlopen(req, timeout=self.timeout_s, context=self._ctx) as resp:
            doc = json.loads(resp.read())
        out = {}
        for item in doc.get("items") or ():
            md = item.get("metadata") or {}
            out[(md.get("namespace", ""), md.get("name", ""))] = PodMeta(md.get("uid", ""), dict(md.get("labels") or {}))
        return out


def in_cluster_api_url(env: dict | None = None) -> str:
    """https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT, or '' outside a pod."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        return ""
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


class PodAttribution:
    """Pod holders per GPU, refreshed from PodResources at most every `interval_s`."""

    def __init__(self, lister, *, labels: KubeApiPods | None = None, label_allowlist: dict[str, str] | None = None,
                 interval_s: float = 5.0, stale_intervals: int = 3) -> None:
        self.lister = lister
        self.labels = labels if label_allowlist else None
        self.label_tags = dict(label_allowlist or {})
        self.interval_us = int(interval_s * 1e6)
        self.stale_us = self.interval_us * max(1, stale_intervals)
        self._next_us: int | None = None
        self._good_us: int | None = None
        self._by_device: dict[str, tuple[ProcessIdentity, ...]] = {}
        self._by_uid: dict[str, tuple[tuple[str, str], ...]] = {}  # pod UID -> pod tags
        self._meta: dict[tuple[str, str], PodMeta] = {}
        self._enriched: dict[tuple[int, int, tuple], ProcessIdentity] = {}
        self._failing = False
        self._labels_failing = False
        self.list_errors = 0
        self.label_errors = 0

    # ------------------------------------------------------------------ reading
    def refresh(self, now_us: int) -> None:
        if self._next_us is not None and now_us < self._next_us:
            return
        self._next_us = now_us + self.interval_us
        try:
            allocations = self.lister.list()
        except Exception as e:  # noqa: BLE001 - any failure of the kubelet side: attribution degrades, never stops
            self.list_errors += 1
            if not self._failing:
                self._failing = True
                log.warning("kubelet PodResources at %s: %s; pods are not attributed until it answers",
                            getattr(self.lister, "socket_path", "?"), _short(e))
            if self._good_us is None or now_us - self._good_us > self.stale_us:
                self._by_device = {}
            return
        if self._failing:
            self._failing = False
            log.warning("kubelet PodResources answers again")
        self._good_us = now_us
        if self.labels is not None and any((a.namespace, a.name) not in self._meta for a in allocations if a.devices):
            self._read_labels()
        self._build(allocations)

    def _read_labels(self) -> None:
        try:
            self._meta = self.labels.pods()
        except Exception as e:  # noqa: BLE001 - an API outage or refusal leaves pods without labels
            self.label_errors += 1
            if not self._labels_failing:
                self._labels_failing = True
                log.warning("Kubernetes API %s: cannot list the pods of node %s (%s); pods carry no labels (the "
                            "agent's service account needs get/list on pods)", self.labels.base_url,
                            self.labels.node_name, _short(e))
            return
        if self._labels_failing:
            self._labels_failing = False
            log.warning("Kubernetes API answers again: pod labels are read")

    def _pod_tags(self, namespace: str, name: str, meta: PodMeta | None) -> tuple[tuple[str, str], ...]:
        tags = {"namespace": _clean(namespace), "pod": _clean(name)}
        if meta is not None:
            for label, tag in self.label_tags.items():
                v = meta.labels.get(label)
                if v:
                    tags[tag] = _clean(v)
        return tuple(sorted((k, v) for k, v in tags.items() if v))

    def _build(self, allocations: list[PodAllocation]) -> None:
        by_device: dict[str, dict[tuple[str, str], ProcessIdentity]] = {}
        by_uid: dict[str, tuple[tuple[str, str], ...]] = {}
        for a in allocations:
            keys = {k for r, i in a.devices if (k := device_key(r, i)) is not None}
            meta = self._meta.get((a.namespace, a.name))
            tags = self._pod_tags(a.namespace, a.name, meta)
            if meta is not None and meta.uid:
                by_uid[meta.uid] = tags
            if not keys:
                continue
            ident = pod_identity(a.namespace, a.name, meta.uid if meta else "", tags)
            for k in keys:
                by_device.setdefault(k, {})[(a.namespace, a.name)] = ident
        self._by_device = {k: tuple(v[p] for p in sorted(v)) for k, v in by_device.items()}
        self._by_uid = by_uid
        if len(self._enriched) > 4096:
            self._enriched.clear()

    # ------------------------------------------------------------------ asking
    def holders(self, uuid: str, index: int | None = None) -> tuple[ProcessIdentity, ...]:
        """The pods allocated this device (by UUID, or for a whole GPU by index), sorted."""
        found = self._by_device.get(uuid, ())
        if index is not None:
            extra = self._by_device.get(f"index:{index}", ())
            if extra:
                found = tuple(sorted({(p.start_ms, p): p for p in (*found, *extra)}.values(), key=lambda p: p.command))
        return found

    def enrich(self, ident: ProcessIdentity) -> ProcessIdentity:
        """A real process with its pod's tags under its own (its environment tags win)."""
        pod_tags = self._by_uid.get(ident.pod_uid) if ident.pod_uid else None
        if not pod_tags:
            return ident
        key = (ident.pid, ident.start_ms, pod_tags)
        out = self._enriched.get(key)
        if out is None:
            merged = {**dict(pod_tags), **dict(ident.tags)}
            out = self._enriched[key] = replace(ident, tags=tuple(sorted(merged.items())))
        return out

    def close(self) -> None:
        close = getattr(self.lister, "close", None)
        if close is not None:
            close()


def pod_identity(namespace: str, name: str, uid: str, tags: tuple[tuple[str, str], ...]) -> ProcessIdentity:
    """The pseudo process that stands for a pod holding a GPU: pid 0 and a negative start_ms, stable
    for the pod's namespace and name (so a restarted agent names the same holder)."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).digest()
    start_ms = -(int.from_bytes(digest[:6], "big") | 1)
    return ProcessIdentity(pid=0, start_ms=start_ms, command=_clean(f"pod {namespace}/{name}"), pod_uid=uid,
                           tags=tags)


def _short(e: Exception) -> str:
    details = getattr(e, "details", None)
    if callable(details):
        try:
            return f"{e.code().name}: {details()}"
        except Exception:  # noqa: BLE001
            pass
    return f"{type(e).__name__}: {e}"


def open_pod_attribution(cfg, env: dict | None = None,
                         make_lister: Callable[[str], object] | None = None) -> PodAttribution | None:
    """PodAttribution for an AgentConfig, or None when `agent.pod_resources_socket` is empty."""
    if not cfg.pod_resources_socket:
        return None
    lister = (make_lister or PodResourcesClient)(cfg.pod_resources_socket)
    allow = parse_label_allowlist(cfg.pod_label_allowlist)
    labels = None
    if allow:
        url = cfg.kube_api_url or in_cluster_api_url(env)
        if not url:
            from gpuledger.config import ConfigError

            raise ConfigError("agent.kube_api_url: not set, and this is not a Kubernetes pod (no "
                              "KUBERNETES_SERVICE_HOST): pod labels need the Kubernetes API")
        labels = KubeApiPods(url, cfg.node_name or cfg.host_id, token_file=cfg.kube_token_file,
                             ca_file=cfg.kube_ca_file)
    return PodAttribution(lister, labels=labels, label_allowlist=allow, interval_s=cfg.pod_resources_interval_s)
