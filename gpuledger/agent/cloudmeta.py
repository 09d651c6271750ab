"""The cloud instance id of this host, read once at agent start from the instance metadata service.

Each provider's documented protocol, with a short timeout per request (default 0.3 s):

  aws    IMDSv2: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`, then
         `GET /latest/meta-data/instance-id` with `X-aws-ec2-metadata-token: <token>`
         (EC2 User Guide, "Use the Instance Metadata Service to access instance metadata").
  gcp    `GET /computeMetadata/v1/instance/id` with `Metadata-Flavor: Google`; the answer must carry
         `Metadata-Flavor: Google` too (Compute Engine, "About VM metadata").
  azure  `GET /metadata/instance/compute/resourceId?api-version=2021-02-01&format=text` with
         `Metadata: true` (Azure Instance Metadata Service): the ARM resource id, the id Azure cost
         exports put in ResourceId; `vmId` when resourceId is empty.

Precedence: the config key `agent.instance_id` wins and nothing is asked. Otherwise the provider
of `agent.provider` is asked (aws, gcp, azure); for "onprem" nothing is asked; for anything else
all three are tried in turn. Nothing found: the id is empty, and that is logged once at info.
The base URLs are parameters, so tests point them at servers on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import logging
import urllib.parse
from dataclasses import dataclass

log = logging.getLogger("gpuledger.agent.cloudmeta")

AWS_BASE = "http://169.254.169.254"
GCP_BASE = "http://metadata.google.internal"
AZURE_BASE = "http://169.254.169.254"
AZURE_API_VERSION = "2021-02-01"
CLOUDS = ("aws", "gcp", "azure")


@dataclass(frozen=True)
class Endpoints:
    aws: str = AWS_BASE
    gcp: str = GCP_BASE
    azure: str = AZURE_BASE


@dataclass(frozen=True)
class InstanceIdentity:
    provider: str      # aws | gcp | azure | "" (none)
    instance_id: str   # "" when none was found
    source: str        # "config", "imds aws", ..., or "none"


class _NotHere(Exception):
    pass


def _request(base: str, method: str, path: str, headers: dict, timeout_s: float) -> tuple[int, dict, str]:
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout_s)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        body = resp.read(4096).decode("utf-8", "replace").strip()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    except (OSError, http.client.HTTPException) as e:
        raise _NotHere(str(e)) from e
    finally:
        conn.close()


def _aws(base: str, timeout_s: float) -> str:
    status, _, token = _request(base, "PUT", "/latest/api/token",
                                {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, timeout_s)
    if status != 200 or not token:
        raise _NotHere(f"token request answered {status}")
    status, _, body = _request(base, "GET", "/latest/meta-data/instance-id",
                               {"X-aws-ec2-metadata-token": token}, timeout_s)
    if status != 200:
        raise _NotHere(f"instance-id answered {status}")
    return body


def _gcp(base: str, timeout_s: float) -> str:
    status, headers, body = _request(base, "GET", "/computeMetadata/v1/instance/id",
                                     {"Metadata-Flavor": "Google"}, timeout_s)
    if status != 200 or headers.get("metadata-flavor") != "Google":
        raise _NotHere(f"answered {status} without Metadata-Flavor: Google")
    return body


def _azure(base: str, timeout_s: float) -> str:
    for field in ("resourceId", "vmId"):
        status, _, body = _request(base, "GET", f"/metadata/instance/compute/{field}?api-version="
                                   f"{AZURE_API_VERSION}&format=text", {"Metadata": "true"}, timeout_s)
        if status != 200:
            raise _NotHere(f"{field} answered {status}")
        if body:
            return body
    return ""


_READERS = {"aws": _aws, "gcp": _gcp, "azure": _azure}


def read_instance_identity(provider: str = "", instance_id: str = "", endpoints: Endpoints | None = None,
                           timeout_s: float = 0.3) -> InstanceIdentity:
    """The instance id by the precedence above; never raises for an absent or silent service."""
    if instance_id:
        return InstanceIdentity(provider if provider in CLOUDS else "", instance_id, "config")
    endpoints = endpoints or Endpoints()
    if provider == "onprem":
        order: tuple[str, ...] = ()
    elif provider in CLOUDS:
        order = (provider,)
    else:
        order = CLOUDS
    tried = []
    for cloud in order:
        try:
            found = _READERS[cloud](getattr(endpoints, cloud), timeout_s)
        except _NotHere as e:
            tried.append(f"{cloud}: {e}")
            continue
        if found:
            return InstanceIdentity(cloud, found, f"imds {cloud}")
        tried.append(f"{cloud}: empty answer")
    log.info("no cloud instance id (agent.instance_id unset; %s); bills cannot be matched to this host by "
             "instance id", "; ".join(tried) if tried else f"provider {provider!r} has no metadata service")
    return InstanceIdentity("", "", "none")


def instance_id_for(cfg, endpoints: Endpoints | None = None, timeout_s: float = 0.3) -> str:
    """The id for an AgentConfig: `cfg.instance_id` or the metadata service of `cfg.provider`."""
    return read_instance_identity(cfg.provider, cfg.instance_id, endpoints, timeout_s).instance_id
