"""Credentials: agent tokens, the read-only query token, TLS. Tokens are never logged.

Until issue #4 lands in full, this module enforces the baseline: with no credentials configured
the collector serves loopback only.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from gpuledger.config import CollectorConfig, ConfigError


def read_token(path: str | None, env_key: str) -> str | None:
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as e:
            raise ConfigError(f"token file {path}: {e.strerror}") from e
    return os.environ.get(env_key) or None


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def collector_security(cfg: CollectorConfig):
    """(auth, server credentials) for a collector config."""
    if not is_loopback(cfg.listen) and not cfg.insecure:
        raise ConfigError(f"collector.listen: {cfg.listen} is not a loopback address; without credentials and "
                          "TLS the collector serves loopback only (pass --insecure to override)")
    return None, None


def agent_channel(cfg):
    """(token, channel credentials) for an agent config; token from its file or GPULEDGER_AGENT_TOKEN."""
    token = read_token(cfg.token_file or None, "GPULEDGER_AGENT_TOKEN")
    return token, None
