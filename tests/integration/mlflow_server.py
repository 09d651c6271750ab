"""A real `mlflow server` for the tests: sqlite backend and artifacts in a temp dir, basic-auth app
on, 127.0.0.1 on a free port. One per test session (it takes 10-20 s to start on 2 cores).

mlflow is a test extra only (tested with mlflow[auth]==3.17.2). It is found as, in order: the
executable named by GPULEDGER_TEST_MLFLOW, `mlflow` on PATH, or `python -m mlflow` when this
interpreter has it. Without any, the tests that need it skip with that reason. mlflow pins pyarrow
below the project's version, so it is best kept in a virtual environment of its own:

    python3 -m venv .venv-mlflow && .venv-mlflow/bin/pip install 'mlflow[auth]==3.17.2'
    GPULEDGER_TEST_MLFLOW=.venv-mlflow/bin/mlflow .venv/bin/python -m pytest tests/integration/test_mlflow.py
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class MlflowServer:
    url: str
    username: str
    password: str
    log: Path

    def env(self) -> dict[str, str]:
        """MLflow's own client environment for this server."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": self.username,
                "MLFLOW_TRACKING_PASSWORD": self.password}


def mlflow_command() -> list[str] | None:
    exe = os.environ.get("GPULEDGER_TEST_MLFLOW", "")
    if exe:
        path = Path(exe) if Path(exe).is_absolute() else ROOT / exe
        return [str(path)] if path.exists() else None
    for candidate in (shutil.which("mlflow"), ROOT / ".venv-mlflow" / "bin" / "mlflow"):
        if candidate and Path(candidate).exists():
            return [str(candidate)]
    if importlib.util.find_spec("mlflow") is not None:
        return [sys.executable, "-m", "mlflow"]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(workdir: Path, timeout_s: float = 180.0):
    """Start the server; returns (MlflowServer, Popen). Raises pytest.skip without mlflow."""
    cmd = mlflow_command()
    if cmd is None:
        pytest.skip("mlflow is not installed (test extra: pip install 'mlflow[auth]==3.17.2', "
                    "or set GPULEDGER_TEST_MLFLOW to its executable)")
    password = secrets.token_urlsafe(12)
    ini = workdir / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{workdir / 'basic_auth.db'}\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   # PBKDF2 on every request costs ~0.3 s of CPU here; cache the one test user's check
                   "auth_cache_ttl_seconds = 3600\n")
    env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=password,
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        env.pop(k, None)
    port = _free_port()
    log = workdir / "server.log"
    proc = subprocess.Popen(
        cmd + ["server", "--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
               "--default-artifact-root", str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"],
        cwd=workdir, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:]
            if "Flask-WTF" in tail:
                pytest.skip("mlflow's basic-auth app needs the auth extra: pip install 'mlflow[auth]==3.17.2'")
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_mlflow_server(proc)
            raise RuntimeError(f"mlflow server not up after {timeout_s:.0f} s:\n{log.read_text(errors='replace')[-1500:]}")
        time.sleep(0.2)
    return MlflowServer(url=url, username="admin", password=password, log=log), proc


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (its uvicorn worker included), then SIGKILL: its
    data is thrown away, so a graceful drain is not waited for long."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@pytest.fixture(scope="session")
def mlflow_server():
    workdir = Path(tempfile.mkdtemp(prefix="gpuledger-mlflow-"))
    server, proc = start_mlflow_server(workdir)
    try:
        yield server
    finally:
        stop_mlflow_server(proc)
        shutil.rmtree(workdir, ignore_errors=True)
