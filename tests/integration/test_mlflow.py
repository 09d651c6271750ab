"""gpuledger.integrations.mlflow against a real `mlflow server` (sqlite, basic auth), one per session."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpuledger.integrations.mlflow import MlflowClient, MlflowError, cost_per_deployment
from tests.integration.mlflow_server import mlflow_server  # noqa: F401  (session fixture)

COST = {"gpu_hours": 12.5, "active_hours": 9.0, "idle_held_hours": 3.5, "cost": 51.25, "idle_share": 0.28,
        "price_source": "catalog:aws/us-east-1/p4d.24xlarge/on_demand", "currency": "USD"}


@pytest.fixture(scope="module")
def client(mlflow_server):  # noqa: F811
    return MlflowClient.from_env(env=mlflow_server.env())


def rest(server, method: str, endpoint: str, body: dict) -> dict:
    """Set-up calls the client does not make (registry writes, run deletion), straight to the server."""
    token = base64.b64encode(f"{server.username}:{server.password}".encode()).decode()
    req = urllib.request.Request(f"{server.url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                 method=method, headers={"Authorization": f"Basic {token}",
                                                         "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"{}")


def test_cost_lands_as_metrics_and_tags_and_a_correction_wins(client):
    exp = client.create_experiment("cost-on-runs")
    run = client.create_run(exp, run_name="train-7b", start_time_ms=1_767_225_600_000)
    client.log_cost(run.run_id, COST, timestamp_ms=1_767_229_200_000)
    got = client.get_run(run.run_id)
    assert got.metrics == {"gpuledger.gpu_hours": 12.5, "gpuledger.active_hours": 9.0,
                           "gpuledger.idle_held_hours": 3.5, "gpuledger.cost": 51.25, "gpuledger.idle_share": 0.28}
    assert got.tags["gpuledger.price_source"] == "catalog:aws/us-east-1/p4d.24xlarge/on_demand"
    assert got.tags["gpuledger.currency"] == "USD"
    assert (got.name, got.status, got.experiment_id, got.start_time_ms) == ("train-7b", "RUNNING", exp, 1_767_225_600_000)
    # a corrected price: the newer write is what MLflow shows
    client.log_cost(run.run_id, dict(COST, cost=48.0, price_source="bill:2026-01"), timestamp_ms=1_767_232_800_000)
    got = client.get_run(run.run_id)
    assert got.metrics["gpuledger.cost"] == 48.0 and got.tags["gpuledger.price_source"] == "bill:2026-01"
    # and MLflow can search by it
    hits = client.search_runs([exp], filter_string='metrics."gpuledger.cost" > 40')
    assert [r.run_id for r in hits] == [run.run_id]


def test_status_search_by_id_and_name_includes_failed_killed_and_deleted(client, mlflow_server):  # noqa: F811
    exp = client.create_experiment("sweep-lr")
    runs = [client.create_run(exp, run_name=f"lr-{i}") for i in range(4)]
    assert client.update_run(runs[0].run_id, "FINISHED", end_time_ms=1_767_240_000_000).status == "FINISHED"
    client.update_run(runs[1].run_id, "FAILED")
    client.update_run(runs[2].run_id, "KILLED")
    rest(mlflow_server, "POST", "runs/delete", {"run_id": runs[3].run_id})
    assert client.run_status(runs[1].run_id) == "FAILED"
    assert client.get_run(runs[0].run_id).end_time_ms == 1_767_240_000_000
    by_id = {r.run_id: (r.status, r.lifecycle_stage) for r in client.search_runs([exp])}
    assert by_id == {runs[0].run_id: ("FINISHED", "active"), runs[1].run_id: ("FAILED", "active"),
                     runs[2].run_id: ("KILLED", "active"), runs[3].run_id: ("RUNNING", "deleted")}
    by_name = client.search_runs(experiment_names=["sweep-lr"], include_deleted=False)
    assert sorted(r.run_id for r in by_name) == sorted(r.run_id for r in runs[:3])
    assert len(client.search_runs([exp], page_size=1)) == 4  # pages followed


def test_registry_versions_aliases_and_legacy_stage(client, mlflow_server):  # noqa: F811
    exp = client.create_experiment("registry")
    run = client.create_run(exp)
    rest(mlflow_server, "POST", "registered-models/create", {"name": "ranker"})
    for _ in range(3):
        rest(mlflow_server, "POST", "model-versions/create",
             {"name": "ranker", "source": f"runs:/{run.run_id}/model", "run_id": run.run_id})
    rest(mlflow_server, "POST", "registered-models/alias", {"name": "ranker", "alias": "champion", "version": "2"})
    rest(mlflow_server, "POST", "registered-models/alias", {"name": "ranker", "alias": "challenger", "version": "3"})
    rest(mlflow_server, "POST", "model-versions/transition-stage",
         {"name": "ranker", "version": "1", "stage": "Production", "archive_existing_versions": False})
    versions = {v.version: (v.status, v.stage, v.aliases, v.run_id) for v in client.search_model_versions("ranker")}
    assert versions == {"1": ("READY", "Production", (), run.run_id), "2": ("READY", "None", ("champion",), run.run_id),
                        "3": ("READY", "None", ("challenger",), run.run_id)}
    assert client.get_model_version_by_alias("ranker", "champion").version == "2"
    assert client.get_model_aliases("ranker") == {"champion": "2", "challenger": "3"}


def test_cost_per_successful_deployment(client, mlflow_server):  # noqa: F811
    # two experiments led to deployments; a third did not and must not be priced
    e1, e2, e3 = (client.create_experiment(n) for n in ("fraud-v1", "fraud-v2", "abandoned"))
    r1 = [client.create_run(e1, run_name=f"a{i}") for i in range(3)]
    r2 = [client.create_run(e2, run_name=f"b{i}") for i in range(2)]
    r3 = client.create_run(e3)
    client.update_run(r1[0].run_id, "FAILED")
    client.update_run(r1[1].run_id, "KILLED")
    client.update_run(r1[2].run_id, "FINISHED")
    client.update_run(r2[0].run_id, "FAILED")
    client.update_run(r2[1].run_id, "FINISHED")
    rest(mlflow_server, "POST", "registered-models/create", {"name": "fraud"})
    for r in (r1[2], r2[1], r2[1]):  # versions 1, 2, 3
        rest(mlflow_server, "POST", "model-versions/create",
             {"name": "fraud", "source": f"runs:/{r.run_id}/model", "run_id": r.run_id})
    rest(mlflow_server, "POST", "registered-models/alias", {"name": "fraud", "alias": "production", "version": "2"})
    rest(mlflow_server, "POST", "model-versions/transition-stage",
         {"name": "fraud", "version": "1", "stage": "Production", "archive_existing_versions": False})
    rest(mlflow_server, "POST", "registered-models/alias", {"name": "fraud", "alias": "staging", "version": "3"})

    basis = client.deployment_cost_basis()
    fraud = [(d.model, d.version, d.aliases, d.stage, d.experiment_id) for d in basis.deployments if d.model == "fraud"]
    assert fraud == [("fraud", "1", (), "Production", e1), ("fraud", "2", ("production",), "None", e2)]
    # only this test's model: the registry test's versions are deployments of another model
    mine = {e1, e2}
    assert {r.run_id for r in basis.runs if r.experiment_id in mine} == {r.run_id for r in r1 + r2}
    assert r3.run_id not in basis.run_ids
    costs = {r1[0].run_id: 10.0, r1[1].run_id: 5.0, r1[2].run_id: 20.0, r2[0].run_id: 7.5, r2[1].run_id: 2.5,
             r3.run_id: 1000.0}
    priced = cost_per_deployment(basis, costs)
    assert priced["experiments"][e1] == {"experiment": "fraud-v1", "cost": 35.0, "runs": 3,
                                         "by_status": {"FAILED": 10.0, "KILLED": 5.0, "FINISHED": 20.0},
                                         "deployments": ["fraud/1"]}
    assert priced["experiments"][e2]["cost"] == 10.0 and priced["experiments"][e2]["deployments"] == ["fraud/2"]
    # with the registry test's model deployed too (its run has no figure): 45 over all deployments
    assert priced["total_cost"] == 45.0
    assert priced["cost_per_deployment"] == 45.0 / priced["deployments"]
    # a custom alias set: only "staging" counts
    only_staging = client.deployments(aliases=("staging",), stages=())
    assert [(d.model, d.version) for d in only_staging] == [("fraud", "3")]


def test_estimate_run_in_an_experiment_by_name(client):
    run = client.create_estimate_run("capacity-plans", {"gpu_hours": 64.0, "cost": 262.4, "currency": "USD"},
                                     run_name="llama-ft-plan", create_experiment=True)
    got = client.get_run(run.run_id)
    assert got.tags["gpuledger.estimate"] == "262.4 USD"
    assert got.tags["gpuledger.estimate.gpu_hours"] == "64.0" and got.tags["gpuledger.estimate.currency"] == "USD"
    assert client.get_experiment(got.experiment_id).name == "capacity-plans" and got.name == "llama-ft-plan"
    again = client.create_estimate_run(got.experiment_id, {"cost": 1, "currency": "EUR"})
    assert again.experiment_id == got.experiment_id


def test_errors_name_the_run_and_the_status(client, mlflow_server):  # noqa: F811
    with pytest.raises(MlflowError) as e:
        client.get_run("0123456789abcdef0123456789abcdef")
    assert e.value.status == 404 and e.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert "run 0123456789abcdef0123456789abcdef: get: HTTP 404 RESOURCE_DOES_NOT_EXIST" in str(e.value)
    with pytest.raises(MlflowError, match=r"run feedbeef: log cost: HTTP 404"):
        client.log_cost("feedbeef", COST)
    with pytest.raises(MlflowError, match=r"experiment 'no-such-experiment': get by name: HTTP 404"):
        client.search_runs(experiment_names=["no-such-experiment"])
    anonymous = MlflowClient(mlflow_server.url)
    with pytest.raises(MlflowError, match=r"run abc: get: HTTP 401: You are not authenticated") as e:
        anonymous.get_run("abc")
    assert e.value.status == 401
    wrong = MlflowClient(mlflow_server.url, username="admin", password="not-the-password")
    with pytest.raises(MlflowError, match="HTTP 401"):
        wrong.get_experiment("0")
    with pytest.raises(ValueError, match=r"cost.idle_share: a share"):
        client.log_cost("any", dict(COST, idle_share=1.5))
    with pytest.raises(MlflowError, match=r"no answer from http://127.0.0.1:9"):
        MlflowClient("http://127.0.0.1:9", timeout_s=1).get_run("abc")


def test_bearer_token_and_basic_auth_headers_from_mlflow_env():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            body = b'{"run": {"info": {"run_id": "r1", "experiment_id": "4", "status": "FINISHED"}, "data": {}}}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        MlflowClient.from_env(env={"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_TOKEN": "tok-123"}).get_run("r1")
        MlflowClient.from_env(env={"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "u",
                                   "MLFLOW_TRACKING_PASSWORD": "p", "MLFLOW_TRACKING_TOKEN": "tok-123"}).get_run("r1")
        MlflowClient(url).get_run("r1")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen == ["Bearer tok-123", "Basic " + base64.b64encode(b"u:p").decode(), None]
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        MlflowClient.from_env(env={})


def test_mlflow_is_never_imported():
    code = ("import sys, gpuledger.integrations.mlflow, gpuledger.integrations.wandb; "
            "sys.exit(1 if any(m == 'mlflow' or m.startswith('mlflow.') or m == 'wandb' for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------- W&B (no W&B server can run here)
def test_wandb_summary_fields_and_run_path(monkeypatch):
    from gpuledger.integrations.wandb import run_path, summary_fields

    assert summary_fields(COST) == {
        "gpuledger/gpu_hours": 12.5, "gpuledger/active_hours": 9.0, "gpuledger/idle_held_hours": 3.5,
        "gpuledger/cost": 51.25, "gpuledger/idle_share": 0.28,
        "gpuledger/price_source": "catalog:aws/us-east-1/p4d.24xlarge/on_demand", "gpuledger/currency": "USD"}
    with pytest.raises(ValueError, match="cost: missing field"):
        summary_fields({k: v for k, v in COST.items() if k != "currency"})
    with pytest.raises(ValueError, match=r"cost.gpu_hours: must be a finite number"):
        summary_fields(dict(COST, gpu_hours=float("nan")))
    with pytest.raises(ValueError, match=r"cost: unknown field\(s\) gpu_seconds"):
        summary_fields(dict(COST, gpu_seconds=1))
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    assert run_path("3k9x2p", "llm-ft") == "llm-ft/3k9x2p"
    assert run_path("3k9x2p", "llm-ft", entity="acme") == "acme/llm-ft/3k9x2p"
    monkeypatch.setenv("WANDB_ENTITY", "research")
    assert run_path("3k9x2p", "llm-ft") == "research/llm-ft/3k9x2p"
    with pytest.raises(ValueError, match="W&B project"):
        run_path("3k9x2p", "")


def test_wandb_missing_says_what_to_install(monkeypatch):
    import sys as _sys

    from gpuledger.integrations.wandb import WandbUnavailable, write_cost

    monkeypatch.setitem(_sys.modules, "wandb", None)  # as if not installed, whatever this machine has
    with pytest.raises(WandbUnavailable, match=r"needs the wandb package.*pip install wandb"):
        write_cost("acme/llm-ft/3k9x2p", COST)
    with pytest.raises(ValueError, match=r"\[entity/\]project/run_id"):
        write_cost("just-a-run-id", COST)


def test_mlflow_config_section(tmp_path):
    from gpuledger.config import ConfigError, load_mlflow

    f = tmp_path / "gpuledger.toml"
    f.write_text('[mlflow]\ntracking_uri = "https://mlflow.internal"\ndeploy_aliases = ["prod"]\n')
    cfg = load_mlflow(f, env={})
    assert (cfg.tracking_uri, cfg.deploy_aliases, cfg.deploy_stages) == ("https://mlflow.internal", ("prod",),
                                                                         ("Production",))
    assert load_mlflow(env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}).tracking_uri == "http://127.0.0.1:5000"
    assert load_mlflow(f, env={"GPULEDGER_MLFLOW_TRACKING_URI": "http://m:5000"}).tracking_uri == "http://m:5000"
    f.write_text('[mlflow]\ntracking_uri = "mlflow.internal:5000"\n')
    with pytest.raises(ConfigError, match="mlflow.tracking_uri: must be an http"):
        load_mlflow(f, env={})
