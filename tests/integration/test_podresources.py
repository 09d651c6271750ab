"""Pod attribution on Kubernetes: a real gRPC server speaking the kubelet's v1 PodResources API on a
unix socket, a real HTTPS server answering the Kubernetes API's pod list, the fake pynvml.

A GPU allocated to a pod and running no process is idle-held by that pod; a time-sliced GPU is
shared by its pods; a MIG instance is held by the pod it is allocated to; pod labels become tags
through the allowlist; a process inside a pod gets the pod's tags; a kubelet outage degrades to
no attribution, never to a crash; and the collector charges the pod for its idle GPU.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import grpc
import pytest

from gpuledger.agent.nvml import open_nvml_source
from gpuledger.agent.podresources import device_key, parse_label_allowlist, pod_identity
from gpuledger.agent.runtime import Agent
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.spool import Spool
from gpuledger.agent.windows import Windower
from gpuledger.client import fetch_report
from gpuledger.clock import SimClock
from gpuledger.config import AgentConfig, ConfigError, load_agent
from gpuledger.kubelet.podresources.v1 import api_pb2, api_pb2_grpc
from tests.integration.certs import make_pki
from tests.unit import fake_pynvml as fk

PROC = Path(__file__).resolve().parents[1] / "fixtures" / "proc"
T0 = 1_709_546_400_000_000  # a window boundary
POD_5151_UID = "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"  # the pod in tests/fixtures/proc/5151/cgroup


class Kubelet(api_pb2_grpc.PodResourcesListerServicer):
    """The kubelet's side of PodResources: answers List from `pods`, or fails while `down`."""

    def __init__(self) -> None:
        self.pods: list = []
        self.down = False
        self.calls = 0

    def List(self, request, context):  # noqa: N802 - the proto's name
        self.calls += 1
        if self.down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "kubelet restarting")
        return api_pb2.ListPodResourcesResponse(pod_resources=self.pods)


def pod(namespace: str, name: str, *device_ids: str, resource: str = "nvidia.com/gpu"):
    devices = [api_pb2.ContainerDevices(resource_name=resource, device_ids=list(device_ids))] if device_ids else []
    return api_pb2.PodResources(name=name, namespace=namespace, containers=[
        api_pb2.ContainerResources(name="main", devices=devices),
        api_pb2.ContainerResources(name="sidecar")])


@pytest.fixture
def kubelet(tmp_path):
    k = Kubelet()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(k, server)
    sock = tmp_path / "kubelet.sock"
    assert server.add_insecure_port(f"unix://{sock}") != 0
    server.start()
    k.socket = str(sock)
    yield k
    server.stop(grace=None)


class ApiServer:
    """GET /api/v1/pods?fieldSelector=spec.nodeName=NODE over TLS, with a bearer token."""

    def __init__(self, directory: Path, token: str, node: str) -> None:
        self.pki = make_pki(directory)
        self.token_file = directory / "sa-token"
        self.token_file.write_text(token + "\n")
        self.items: list[dict] = []
        self.forbidden = False
        self.requests: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                api.requests.append(self.path)
                u = urlparse(self.path)
                ok = (u.path == "/api/v1/pods" and parse_qs(u.query).get("fieldSelector") == [f"spec.nodeName={node}"]
                      and self.headers.get("Authorization") == f"Bearer {token}")
                code = 403 if api.forbidden or not ok else 200
                body = json.dumps({"kind": "PodList", "items": api.items} if code == 200 else
                                  {"kind": "Status", "reason": "Forbidden"}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pki["server"], self.pki["server_key"])
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://localhost:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, namespace: str, name: str, uid: str, **labels: str) -> None:
        self.items.append({"metadata": {"namespace": namespace, "name": name, "uid": uid, "labels": labels}})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api(tmp_path):
    a = ApiServer(tmp_path, "sa-token-123", "node-a")
    yield a
    a.close()


def agent_cfg(kubelet, api, tmp_path, **kw) -> AgentConfig:
    return AgentConfig(host_id="node-a", provider="aws", region="us-east-1", instance_type="p5.48xlarge",
                       spool_dir=str(tmp_path / "spool"), proc_root=str(PROC), pod_resources_socket=kubelet.socket,
                       pod_resources_interval_s=1.0,
                       pod_label_allowlist=("team", "app.kubernetes.io/part-of=project"),
                       kube_api_url=api.url, kube_token_file=str(api.token_file), kube_ca_file=api.pki["ca"],
                       **kw).validate()


def fold(src, readings, start_us: int, end_us: int):
    w = Windower(src.gpus(), 10.0, 0.0, start_us=start_us)
    for r in readings:
        w.add(r)
    closed = w.close(end_us, final=True)
    totals: dict[str, dict[str, int]] = {}
    for row in closed.gpu.to_pylist():
        acc = totals.setdefault(row["gpu_uuid"], dict.fromkeys(("busy_ms", "idle_held_ms", "idle_free_ms",
                                                                "unmonitored_ms"), 0))
        for c in acc:
            acc[c] += row[c]
    held: dict[tuple[str, str], int] = {}
    names = {(p.pid, p.start_ms): p.command for p in closed.processes}
    for row in closed.proc.to_pylist():
        key = (row["gpu_uuid"], names[(row["pid"], row["proc_start_ms"])])
        held[key] = held.get(key, 0) + row["held_ms"]
    return totals, held, closed.processes


def run_polls(src, fake, start_us: int, seconds: int) -> list:
    out = []
    for s in range(seconds + 1):
        fake.advance_to(start_us + s * 1_000_000)
        out.append(src.poll(start_us + s * 1_000_000))
    return out


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("resource, device_id, key", [
    ("nvidia.com/gpu", "GPU-8f6b1c2d-0000-1111-2222-333344445555", "GPU-8f6b1c2d-0000-1111-2222-333344445555"),
    ("nvidia.com/gpu", "GPU-8f6b1c2d-0000-1111-2222-333344445555::3", "GPU-8f6b1c2d-0000-1111-2222-333344445555"),
    ("nvidia.com/mig-1g.10gb", "MIG-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9", "MIG-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"),
    ("nvidia.com/gpu", "2", "index:2"),
    ("example.com/fpga", "2", None),
    ("example.com/nic", "0000:3b:00.0", None),
])
def test_device_ids_of_the_nvidia_device_plugin(resource, device_id, key):
    assert device_key(resource, device_id) == key


def test_label_allowlist_entries_and_their_tag_names():
    assert parse_label_allowlist(["team", "app.kubernetes.io/part-of", "gpuledger.io/cost-center=cost_center"]) == {
        "team": "team", "app.kubernetes.io/part-of": "part_of", "gpuledger.io/cost-center": "cost_center"}
    for bad in ("Bad Label", "x/", "team=", "team=namespace", "a" * 64):
        with pytest.raises(ValueError):
            parse_label_allowlist([bad])


@pytest.mark.parametrize("kw, key", [
    ({"pod_label_allowlist": ("team",)}, "agent.pod_label_allowlist: needs agent.pod_resources_socket"),
    ({"pod_resources_socket": "/s", "pod_label_allowlist": ("no spaces",)}, "agent.pod_label_allowlist: 'no spaces'"),
    ({"pod_resources_socket": "/s", "pod_resources_interval_s": 0}, "agent.pod_resources_interval_s"),
    ({"kube_api_url": "kubernetes.default.svc"}, "agent.kube_api_url"),
])
def test_pod_config_keys_are_validated_and_named(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        AgentConfig(**kw).validate()


def test_pod_config_from_toml_and_environment(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('[agent]\npod_resources_socket = "/var/lib/kubelet/pod-resources/kubelet.sock"\n'
                 'pod_label_allowlist = ["team", "app.kubernetes.io/part-of=project"]\n')
    cfg = load_agent(f, env={"GPULEDGER_AGENT_NODE_NAME": "node-7"})
    assert cfg.pod_label_allowlist == ("team", "app.kubernetes.io/part-of=project") and cfg.node_name == "node-7"


def test_pod_identity_is_stable_and_not_a_process():
    a = pod_identity("ml", "nb-1", "", ())
    assert a == pod_identity("ml", "nb-1", "", ()) and a.pid == 0 and a.start_ms < 0
    assert a.start_ms != pod_identity("ml", "nb-2", "", ()).start_ms


# ----------------------------------------------------------------------------- the source


def test_idle_gpus_allocated_to_pods_are_held_by_those_pods(kubelet, api, tmp_path):
    gpus = [fk.h100(0), fk.h100(1), fk.h100(2), fk.a100_mig(3)]
    fake = fk.FakeNvml(gpus)
    g0, g1, g2, mig = gpus[0].uuid, gpus[1].uuid, gpus[2].uuid, gpus[3].mig
    kubelet.pods = [
        pod("ml", "notebook-1", g0),
        pod("ml", "infer-b", f"{g2}::0"),  # time-sliced GPU 2: two replicas to infer-c, one to infer-b
        pod("ml", "infer-c", f"{g2}::1", f"{g2}::2"),
        pod("ml", "mig-job", mig[0].uuid, resource="nvidia.com/mig-3g.20gb"),
        pod("kube-system", "no-gpu"),
    ]
    api.add("ml", "notebook-1", "uid-nb-1", team="research", **{"app.kubernetes.io/part-of": "llm", "secret": "x"})
    api.add("ml", "infer-b", "uid-b", team="serving")
    fake.advance_to(T0)
    src = open_nvml_source(agent_cfg(kubelet, api, tmp_path), nvml=fake)
    try:
        totals, held, processes = fold(src, run_polls(src, fake, T0, 30), T0, T0 + 30_000_000)
    finally:
        src.close()
    # GPU 0: no process, but notebook-1 holds it: idle-held all through, none of it idle-free
    # (the last sample period of the range is still held back by the driver: unmonitored)
    assert totals[g0]["unmonitored_ms"] < 500
    assert totals[g0]["idle_held_ms"] == 30_000 - totals[g0]["unmonitored_ms"] and totals[g0]["idle_free_ms"] == 0
    assert held[(g0, "pod ml/notebook-1")] == 30_000
    # GPU 1: allocated to nobody: idle-free, as before
    assert totals[g1]["idle_free_ms"] == 30_000 - totals[g1]["unmonitored_ms"] and not any(k[0] == g1 for k in held)
    # GPU 2: time-sliced between two pods, each holding all of it (the collector splits by held share)
    assert totals[g2]["idle_held_ms"] == 30_000 - totals[g2]["unmonitored_ms"]
    assert held[(g2, "pod ml/infer-b")] == held[(g2, "pod ml/infer-c")] == 30_000
    # MIG: the allocated instance is held by its pod (no utilization on A100 MIG, but nothing runs);
    # the other instance is idle-free (before pod attribution, both were)
    assert totals[mig[0].uuid]["idle_held_ms"] == 30_000 and totals[mig[1].uuid]["idle_free_ms"] == 30_000
    assert held[(mig[0].uuid, "pod ml/mig-job")] == 30_000
    by_cmd = {p.command: p for p in processes}
    nb = by_cmd["pod ml/notebook-1"]
    assert nb.pid == 0 and nb.pod_uid == "uid-nb-1"
    # allowlisted labels only (secret is not), under their tag names, plus namespace and pod
    assert dict(nb.tags) == {"namespace": "ml", "pod": "notebook-1", "team": "research", "project": "llm"}
    assert dict(by_cmd["pod ml/infer-c"].tags) == {"namespace": "ml", "pod": "infer-c"}  # the API does not know it
    assert all("fieldSelector=spec.nodeName%3Dnode-a" in r for r in api.requests)


def test_a_process_in_the_pod_holds_the_gpu_and_carries_the_pods_tags(kubelet, api, tmp_path):
    gpu = fk.h100(0)
    fake = fk.FakeNvml([gpu])
    kubelet.pods = [pod("train", "trainer-0", gpu.uuid)]
    api.add("train", "trainer-0", POD_5151_UID, team="from-label", **{"app.kubernetes.io/part-of": "detector"})
    fake.advance_to(T0)
    src = open_nvml_source(agent_cfg(kubelet, api, tmp_path), nvml=fake)
    try:
        readings = run_polls(src, fake, T0, 10)
        gpu.processes = [fk.FakeProcess(5151)]
        gpu.load = 50
        for s in range(11, 21):
            fake.advance_to(T0 + s * 1_000_000)
            readings.append(src.poll(T0 + s * 1_000_000))
        totals, held, processes = fold(src, readings, T0, T0 + 20_000_000)
    finally:
        src.close()
    by_cmd = {p.command: p for p in processes}
    proc = next(p for p in processes if p.pid == 5151)
    # the pod held it while idle; once its process runs, the process holds it (not the pod as well)
    assert held[(gpu.uuid, "pod train/trainer-0")] == 10_500
    assert held[(gpu.uuid, proc.command)] == 9_500
    assert proc.pod_uid == POD_5151_UID
    # the pod's tags under the process's own: its environment says GPULEDGER_TEAM=vision, which wins
    assert dict(proc.tags) == {"namespace": "train", "pod": "trainer-0", "project": "detector", "team": "vision",
                               "workload": "train", "wandb_project": "detector", "wandb_run_id": "abc123"}
    assert dict(by_cmd["pod train/trainer-0"].tags)["team"] == "from-label"
    assert totals[gpu.uuid]["idle_free_ms"] == 0


def test_kubelet_outage_degrades_to_no_attribution_and_recovers(kubelet, api, tmp_path, caplog):
    gpu = fk.h100(0)
    fake = fk.FakeNvml([gpu])
    kubelet.pods = [pod("ml", "nb", gpu.uuid)]
    fake.advance_to(T0)
    src = open_nvml_source(agent_cfg(kubelet, api, tmp_path), nvml=fake)
    caplog.set_level(logging.WARNING, "gpuledger.agent.podresources")
    try:
        readings = run_polls(src, fake, T0, 10)
        kubelet.down = True  # the last allocation is trusted for three intervals (3 s), then dropped
        for s in range(11, 31):
            fake.advance_to(T0 + s * 1_000_000)
            readings.append(src.poll(T0 + s * 1_000_000))
        kubelet.down = False
        for s in range(31, 41):
            fake.advance_to(T0 + s * 1_000_000)
            readings.append(src.poll(T0 + s * 1_000_000))
        totals, held, _ = fold(src, readings, T0, T0 + 40_000_000)
        assert src.pods.list_errors == 20
    finally:
        src.close()
    t = totals[gpu.uuid]
    assert t["idle_held_ms"] + t["idle_free_ms"] + t["unmonitored_ms"] == 40_000 and t["unmonitored_ms"] < 500
    # down from 11 s; the allocation read at 10 s is trusted until 13 s and dropped at the poll of 14 s
    # (the change placed halfway, 13.5 s); back at 31 s (30.5 s): 17 s idle-free, the rest held by the pod
    assert t["idle_free_ms"] == 17_000 and held[(gpu.uuid, "pod ml/nb")] == 23_000
    outage = [r for r in caplog.records if "kubelet PodResources" in r.getMessage()]
    assert len(outage) == 2 and "UNAVAILABLE: kubelet restarting" in outage[0].getMessage()  # once down, once back


def test_api_refusal_leaves_pods_without_labels(kubelet, api, tmp_path):
    gpu = fk.h100(0)
    fake = fk.FakeNvml([gpu])
    kubelet.pods = [pod("ml", "nb", gpu.uuid)]
    api.add("ml", "nb", "uid-1", team="research")
    api.forbidden = True  # no RBAC for the agent's service account
    fake.advance_to(T0)
    src = open_nvml_source(agent_cfg(kubelet, api, tmp_path), nvml=fake)
    try:
        _, _, processes = fold(src, run_polls(src, fake, T0, 5), T0, T0 + 5_000_000)
        assert src.pods.label_errors >= 1
    finally:
        src.close()
    (nb,) = processes
    assert dict(nb.tags) == {"namespace": "ml", "pod": "nb"} and nb.pod_uid == ""


def test_collector_charges_the_idle_gpu_to_the_pod(kubelet, api, tmp_path, collector):
    """Through the whole pipeline: before pod attribution this GPU was idle-free, charged to the
    host's owner; now its cost is the pod's, under the pod's label."""
    gpus = [fk.h100(0), fk.h100(1)]
    clock = SimClock(T0)
    fake = fk.FakeNvml(gpus, clock=clock)
    kubelet.pods = [pod("ml", "notebook-1", gpus[0].uuid)]
    api.add("ml", "notebook-1", "uid-nb-1", team="research")
    start = (clock.now_us() // 10_000_000) * 10_000_000
    cfg = agent_cfg(kubelet, api, tmp_path, tags={"team": "platform"})
    src = open_nvml_source(cfg, nvml=fake)
    spool = Spool(cfg.spool_dir, fsync=False)
    agent = Agent(cfg, src, clock, spool, start_us=start)
    shipper = Shipper(collector.address, spool, max_inflight=2).start()
    try:
        agent.step()
        for _ in range(120):
            clock.advance(1.0)
            agent.step()
        agent.close()
        assert shipper.drain(60), shipper.stats.last_error
    finally:
        shipper.close()
        spool.close()
    table, _ = fetch_report(collector.address, "cost", start // 1000, (start + 120_000_000) // 1000, "team")
    rows = {r["team"]: r for r in table.to_pylist()}
    # GPU 0 (held by the pod) is the research team's idle-held time; GPU 1 (no pod) the host owner's idle-free
    assert rows["research"]["idle_held_hours"] * 3600 == pytest.approx(120, abs=1)
    assert rows["research"]["idle_free_hours"] == 0
    assert rows["platform"]["idle_free_hours"] * 3600 == pytest.approx(120, abs=1)
    assert rows["platform"]["idle_held_hours"] == 0
    table, _ = fetch_report(collector.address, "cost", start // 1000, (start + 120_000_000) // 1000, "namespace")
    assert {r["namespace"] for r in table.to_pylist()} >= {"ml"}
