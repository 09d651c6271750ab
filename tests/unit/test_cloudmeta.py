"""Instance metadata: each provider's protocol served by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpuledger.agent.cloudmeta import Endpoints, instance_id_for, read_instance_identity
from gpuledger.config import AgentConfig, load_agent

AWS_TOKEN = "AQAEAtoken=="
AWS_ID = "i-0a1b2c3d4e5f60718"
GCP_ID = "4520031799277581759"
AZURE_RID = ("/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/ml/providers/"
             "Microsoft.Compute/virtualMachines/gpu-a100-01")


class Metadata(BaseHTTPRequestHandler):
    """Answers as the documented services do, and refuses requests that lack their headers."""

    mode = "aws"
    seen: list = []
    delay_s = 0.0

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: str = "", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        try:
            self.end_headers()
            self.wfile.write(body.encode())
        except BrokenPipeError:  # the client gave up waiting (the timeout test)
            pass

    def do_PUT(self):
        self.seen.append(("PUT", self.path, dict(self.headers)))
        if self.mode == "aws" and self.path == "/latest/api/token" and \
                self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._send(200, AWS_TOKEN)
        return self._send(403)

    def do_GET(self):
        self.seen.append(("GET", self.path, dict(self.headers)))
        if self.delay_s:
            time.sleep(self.delay_s)
        url = urllib.parse.urlsplit(self.path)
        if self.mode == "aws":
            if url.path != "/latest/meta-data/instance-id":
                return self._send(404)
            if self.headers.get("X-aws-ec2-metadata-token") != AWS_TOKEN:
                return self._send(401)  # IMDSv2 only: no token, no answer
            return self._send(200, AWS_ID)
        if self.mode == "gcp":
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._send(403)
            if url.path == "/computeMetadata/v1/instance/id":
                return self._send(200, GCP_ID, {"Metadata-Flavor": "Google"})
            return self._send(404)
        if self.mode == "azure":
            q = urllib.parse.parse_qs(url.query)
            if self.headers.get("Metadata") != "true" or "api-version" not in q:
                return self._send(400)
            if url.path == "/metadata/instance/compute/resourceId" and q.get("format") == ["text"]:
                return self._send(200, AZURE_RID)
            return self._send(404)
        if self.mode == "impostor":  # answers anything, without the GCP flavour header
            return self._send(200, "not-an-id")
        return self._send(500)


@pytest.fixture
def server():
    handler = type("H", (Metadata,), {"seen": [], "mode": "aws", "delay_s": 0.0})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield handler, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _all(base: str) -> Endpoints:
    return Endpoints(aws=base, gcp=base, azure=base)


def test_aws_imdsv2_token_then_instance_id(server):
    h, base = server
    ident = read_instance_identity("aws", endpoints=_all(base))
    assert (ident.provider, ident.instance_id, ident.source) == ("aws", AWS_ID, "imds aws")
    (m1, p1, h1), (m2, p2, h2) = h.seen
    assert (m1, p1) == ("PUT", "/latest/api/token") and int(h1["X-aws-ec2-metadata-token-ttl-seconds"]) > 0
    assert (m2, p2, h2["X-aws-ec2-metadata-token"]) == ("GET", "/latest/meta-data/instance-id", AWS_TOKEN)


def test_gcp_metadata_flavor_both_ways(server):
    h, base = server
    h.mode = "gcp"
    ident = read_instance_identity("gcp", endpoints=_all(base))
    assert (ident.provider, ident.instance_id) == ("gcp", GCP_ID)
    assert h.seen[0][2]["Metadata-Flavor"] == "Google"
    h.mode = "impostor"  # a server that does not answer with Metadata-Flavor: Google is not GCP's
    assert read_instance_identity("gcp", endpoints=_all(base)).instance_id == ""


def test_azure_imds_resource_id(server):
    h, base = server
    h.mode = "azure"
    ident = read_instance_identity("azure", endpoints=_all(base))
    assert (ident.provider, ident.instance_id) == ("azure", AZURE_RID)
    method, path, headers = h.seen[0]
    assert headers["Metadata"] == "true" and "api-version=" in path and path.startswith(
        "/metadata/instance/compute/resourceId")


def test_unknown_provider_tries_each_service_in_turn(server):
    h, base = server
    h.mode = "azure"  # AWS's token PUT is refused here, GCP's flavour is missing: Azure answers
    ident = read_instance_identity("", endpoints=_all(base))
    assert ident.provider == "azure" and [m for m, _, _ in h.seen] == ["PUT", "GET", "GET"]


def test_config_instance_id_wins_and_nothing_is_asked(server):
    h, base = server
    cfg = AgentConfig(provider="aws", instance_id="i-from-config")
    assert instance_id_for(cfg, _all(base)) == "i-from-config" and h.seen == []
    assert load_agent(None, env={"GPULEDGER_AGENT_INSTANCE_ID": "i-env"}).instance_id == "i-env"
    # on-prem hosts ask no metadata service
    assert read_instance_identity("onprem", endpoints=_all(base)).source == "none" and h.seen == []


def test_no_service_gives_empty_id_logged_once_at_info(server, caplog):
    h, base = server
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    with caplog.at_level(logging.INFO, logger="gpuledger.agent.cloudmeta"):
        ident = read_instance_identity("", endpoints=_all(closed), timeout_s=0.3)
    assert (ident.provider, ident.instance_id, ident.source) == ("", "", "none")
    msgs = [r for r in caplog.records if r.name == "gpuledger.agent.cloudmeta"]
    assert len(msgs) == 1 and msgs[0].levelno == logging.INFO and "aws:" in msgs[0].getMessage()
    # a service slower than the timeout counts as absent
    h.mode, h.delay_s = "gcp", 0.5
    assert read_instance_identity("gcp", endpoints=_all(base), timeout_s=0.1).instance_id == ""
