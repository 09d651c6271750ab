"""deploy/kubernetes: valid against the Kubernetes API schemas (kubernetes-validate, offline), least
privilege where the agent and collector run, configs that the daemons accept and whose paths the
pods mount, and (where kubectl is installed) a `kubectl kustomize` build with real credentials."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of kubernetes-validate) is not installed")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (PyPI) is not installed")

from gpuledger.config import load_agent, load_collector  # noqa: E402
from tests.integration.certs import make_pki  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes" / "base"
K8S_VERSION = "1.30.0"  # the oldest release these manifests use features of (gRPC appProtocol, sizeLimit, ...)


def docs(paths) -> list[dict]:
    out = []
    for p in paths:
        out += [d for d in yaml.safe_load_all(Path(p).read_text()) if d]
    return out


def manifests() -> list[dict]:
    return docs(sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml"))


def one(kind: str, all_docs=None) -> dict:
    (d,) = [d for d in (all_docs or manifests()) if d["kind"] == kind]
    return d


def test_every_manifest_is_valid_against_the_api_schemas():
    kinds = []
    for d in manifests():
        kv.validate(d, K8S_VERSION, strict=True)  # raises naming the field
        kinds.append(d["kind"])
    assert sorted(kinds) == sorted(["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                                    "ConfigMap", "DaemonSet", "StatefulSet", "Service"])


def test_a_bad_manifest_is_refused_by_the_validator():
    ds = one("DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = "SYS_PTRACE"
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, K8S_VERSION, strict=True)


def _mounts(pod: dict, claims=()) -> dict[str, dict]:
    (c,) = pod["containers"]
    vols = {v["name"]: v for v in pod["volumes"]}
    vols.update({cl["metadata"]["name"]: {"name": cl["metadata"]["name"], "claim": cl} for cl in claims})
    return {m["mountPath"]: {**m, "volume": vols[m["name"]]} for m in c["volumeMounts"]}


def _within(path: str, mounts: dict) -> dict:
    found = [m for p, m in mounts.items() if path.startswith(p.rstrip("/") + "/")]
    assert found, f"{path} is in no mounted volume"
    return found[0]


def test_agent_daemonset_has_least_privilege():
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE", "DAC_READ_SEARCH"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["runtimeClassName"] == "nvidia" and pod["hostPID"] is True
    assert "hostNetwork" not in pod
    assert "nvidia.com/gpu" not in str(c["resources"])  # monitors every GPU, takes none from the scheduler
    assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
    mounts = _mounts(pod)
    assert mounts["/host/proc"]["readOnly"] and mounts["/host/proc"]["volume"]["hostPath"]["path"] == "/proc"
    pr = mounts["/var/lib/kubelet/pod-resources"]
    assert pr["readOnly"] and pr["volume"]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/var/lib/gpuledger-agent", "/tmp"}


def test_collector_statefulset_runs_as_non_root_with_a_volume():
    sts = one("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert sts["spec"]["replicas"] == 1  # embedded chDB: one owner process
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert _mounts(pod, [claim])["/var/lib/gpuledger"]["name"] == claim["metadata"]["name"]
    svc = one("Service")
    assert svc["spec"]["selector"] == sts["spec"]["template"]["metadata"]["labels"]
    assert {p["port"] for p in svc["spec"]["ports"]} == {4700, 9400}


def _config(name: str) -> str:
    (cm,) = [d for d in manifests() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    (text,) = cm["data"].values()
    return text


def test_configmaps_are_configs_the_daemons_accept_and_their_files_are_mounted(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text(_config("gpuledger-agent-config"))
    agent = load_agent(f, env={"GPULEDGER_AGENT_HOST_ID": "node-a"})
    mounts = _mounts(one("DaemonSet")["spec"]["template"]["spec"])
    assert agent.proc_root == "/host/proc" and agent.pod_label_allowlist
    for path in (agent.token_file, agent.tls_ca_file, agent.pod_resources_socket, agent.spool_dir):
        _within(path, mounts)
    creds = _within(agent.token_file, mounts)["volume"]["secret"]["secretName"]
    assert creds == "gpuledger-agent-credentials"
    f = tmp_path / "collector.toml"
    f.write_text(_config("gpuledger-collector-config"))
    col = load_collector(f, env={})
    sts = one("StatefulSet")
    mounts = _mounts(sts["spec"]["template"]["spec"], sts["spec"]["volumeClaimTemplates"])
    for path in (col.tokens_file, col.query_token_file, col.tls_cert_file, col.tls_key_file):
        _within(path, mounts)
    assert col.store_dsn() == "chdb:///var/lib/gpuledger/chdb"
    host, port = agent.collector.rsplit(":", 1)
    assert host == "gpuledger-collector.gpuledger.svc" and port == col.listen.rsplit(":", 1)[1]


def test_kustomize_build_with_real_credentials_is_valid(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` (the build) is not checked; the manifests are")
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    sec = base / "secrets"
    gl = [sys.executable, "-m", "gpuledger.cli", "collector"]
    subprocess.run([*gl, "add-agent", "*", "--tokens-file", str(sec / "agent-tokens"), "--out",
                    str(sec / "agent.token")], check=True, capture_output=True, cwd=ROOT, timeout=60)
    subprocess.run([*gl, "query-token", "--file", str(sec / "query.token"), "--out", str(tmp_path / "q")],
                   check=True, capture_output=True, cwd=ROOT, timeout=60)
    pki = make_pki(tmp_path)
    shutil.copy(pki["server"], sec / "tls.crt")
    shutil.copy(pki["server_key"], sec / "tls.key")
    shutil.copy(pki["ca"], sec / "ca.crt")
    res = subprocess.run([kubectl, "kustomize", str(base)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    built = [d for d in yaml.safe_load_all(res.stdout) if d]
    for d in built:
        kv.validate(d, K8S_VERSION, strict=True)
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == "gpuledger", d["metadata"]["name"]
    secrets = {d["metadata"]["name"]: d for d in built if d["kind"] == "Secret"}
    assert set(secrets) == {"gpuledger-collector-tokens", "gpuledger-collector-tls", "gpuledger-agent-credentials"}
    assert secrets["gpuledger-collector-tls"]["type"] == "kubernetes.io/tls"
    assert set(secrets["gpuledger-agent-credentials"]["data"]) == {"token", "ca.crt"}
    # every Secret and ConfigMap a pod mounts is in the build
    names = {(d["kind"], d["metadata"]["name"]) for d in built}
    for kind in ("DaemonSet", "StatefulSet"):
        for v in one(kind, built)["spec"]["template"]["spec"]["volumes"]:
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in names
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names


def test_kustomize_build_without_credentials_names_the_missing_file(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    res = subprocess.run([kubectl, "kustomize", str(base)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "secrets/agent-tokens" in res.stderr
