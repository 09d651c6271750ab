"""Credentials: per-agent tokens, the read-only query token, TLS and mutual TLS.

- Agent tokens are stored hashed by the collector (`tokens_file`: lines `HOST_ID sha256:HEX`);
  a token authenticates one host id and can write windows for that host only. A fleet token
  (host id `*`, `add-agent '*'`) writes for any host id: for agents that share one secret, as a
  Kubernetes DaemonSet does; it trades the per-host limit for one secret per cluster.
- The query token (`query_token_file`: lines `sha256:HEX`) is read-only: it can ask for
  reports and cannot write; an agent token cannot read reports.
- The admin token (`admin_token_file`, same format) may act on the collector's records (retire a
  host, import a bill or API spend) and read reports; neither other kind of token may.
- Tokens are read from files or the environment, never from command-line arguments, and
  never logged. The agent warns when its token file is readable by others.
- The collector refuses a non-loopback listen address without TLS and credentials unless
  started with `--insecure`. With no credentials configured it serves loopback only and says
  so; once credentials are configured they are always required.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import stat
from pathlib import Path

import grpc

from gpuledger.config import CollectorConfig, ConfigError

log = logging.getLogger(__name__)

BEARER = "bearer "
FLEET = "*"  # the host id of a fleet token: it may write windows for any host


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def read_token(path: str | None, env_key: str) -> str | None:
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as e:
            raise ConfigError(f"token file {path}: {e.strerror}") from e
    return os.environ.get(env_key) or None


def client_credentials(ca_file: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials of a CLI client trusting the collector's CA certificate; None without one (plain gRPC)."""
    if not ca_file:
        return None
    try:
        return grpc.ssl_channel_credentials(Path(ca_file).read_bytes())
    except OSError as e:
        raise ConfigError(f"CA certificate {ca_file}: {e.strerror}") from e


def warn_if_readable_by_others(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by group or others (mode %o): chmod 600 it", path, mode & 0o777)
        return True
    return False


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_hash_file(path: str, with_host: bool) -> dict[str, str]:
    """{hash: host_id} (or {hash: ""}) from a tokens file; comments and blank lines ignored."""
    out: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"tokens file {path}: {e.strerror}") from e
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if with_host:
            if len(parts) != 2 or not parts[1].startswith("sha256:") or len(parts[1]) != 71:
                raise ConfigError(f"tokens file {path} line {n}: expected 'HOST_ID sha256:<64 hex digits>'")
            out[parts[1]] = parts[0]
        else:
            if len(parts) != 1 or not parts[0].startswith("sha256:") or len(parts[0]) != 71:
                raise ConfigError(f"query token file {path} line {n}: expected 'sha256:<64 hex digits>'")
            out[parts[0]] = ""
    return out


def _bearer(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith(BEARER):
            return value[len(BEARER):].strip()
    return None


class AuthDenied(Exception):
    """A request without the credential it needs: `code` (a grpc.StatusCode) and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Auth:
    """Checks every stream, report and admin request; raises AuthDenied. Never logs a token."""

    def __init__(self, agent_hashes: dict[str, str], query_hashes: dict[str, str],
                 admin_hashes: dict[str, str] | None = None) -> None:
        self.agent_hashes = agent_hashes
        self.query_hashes = query_hashes
        self.admin_hashes = admin_hashes or {}
        self.failures = 0

    @classmethod
    def from_files(cls, tokens_file: str, query_token_file: str, admin_token_file: str = "") -> Auth:
        return cls(_read_hash_file(tokens_file, True) if tokens_file else {},
                   _read_hash_file(query_token_file, False) if query_token_file else {},
                   _read_hash_file(admin_token_file, False) if admin_token_file else {})

    @staticmethod
    def _match(token: str | None, table: dict[str, str]) -> str | None:
        if not token:
            return None
        h = hash_token(token)
        found = None
        for known, owner in table.items():  # compare against every entry: no early exit
            if hmac.compare_digest(known, h):
                found = owner
        return found

    def authenticate_agent(self, context) -> str:
        token = _bearer(context)
        host = self._match(token, self.agent_hashes)
        if host is None:
            self.failures += 1
            if token and self._match(token, self.query_hashes) is not None:
                raise AuthDenied(grpc.StatusCode.PERMISSION_DENIED, "the query token is read-only: it cannot write")
            raise AuthDenied(grpc.StatusCode.UNAUTHENTICATED,
                             "missing or unknown agent token (authorization: Bearer <token>)")
        return host

    def check_batch(self, principal: str | None, batch) -> None:
        if principal is None or principal == FLEET:
            return
        if batch.host.host_id != principal:
            shown = batch.host.host_id if len(batch.host.host_id) <= 80 else batch.host.host_id[:80] + "..."
            raise PermissionError(f"host.host_id: the token of host {principal!r} cannot write windows for "
                                  f"host {shown!r}")

    def authenticate_query(self, context) -> None:
        token = _bearer(context)
        if self._match(token, self.query_hashes) is not None or self._match(token, self.admin_hashes) is not None:
            return
        self.failures += 1
        if token and self._match(token, self.agent_hashes) is not None:
            raise AuthDenied(grpc.StatusCode.PERMISSION_DENIED, "an agent token cannot read reports: use the query "
                                                                "token")
        if not self.query_hashes:
            raise AuthDenied(grpc.StatusCode.UNAUTHENTICATED, "no query token is configured on this collector "
                                                              "(collector.query_token_file)")
        raise AuthDenied(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown query token")

    def authenticate_admin(self, context) -> None:
        token = _bearer(context)
        if self._match(token, self.admin_hashes) is not None:
            return
        self.failures += 1
        if token and (self._match(token, self.query_hashes) is not None
                      or self._match(token, self.agent_hashes) is not None):
            raise AuthDenied(grpc.StatusCode.PERMISSION_DENIED, "this token cannot change the collector's records: "
                                                                "use the admin token (collector.admin_token_file)")
        if not self.admin_hashes:
            raise AuthDenied(grpc.StatusCode.UNAUTHENTICATED, "no admin token is configured on this collector "
                                                              "(collector.admin_token_file)")
        raise AuthDenied(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown admin token")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from e


def collector_security(cfg: CollectorConfig):
    """(auth or None, server credentials or None, a line saying what is enforced)."""
    creds = None
    if cfg.tls_cert_file or cfg.tls_key_file:
        if not (cfg.tls_cert_file and cfg.tls_key_file):
            raise ConfigError("collector.tls_cert_file and collector.tls_key_file: set both or neither")
        client_ca = _read(cfg.tls_client_ca_file, "collector.tls_client_ca_file") if cfg.tls_client_ca_file else None
        creds = grpc.ssl_server_credentials(
            [(_read(cfg.tls_key_file, "collector.tls_key_file"), _read(cfg.tls_cert_file, "collector.tls_cert_file"))],
            root_certificates=client_ca, require_client_auth=client_ca is not None)
    auth = Auth.from_files(cfg.tokens_file, cfg.query_token_file, cfg.admin_token_file) \
        if (cfg.tokens_file or cfg.query_token_file or cfg.admin_token_file) else None
    loopback = is_loopback(cfg.listen)
    if not loopback and not cfg.insecure:
        if creds is None:
            raise ConfigError(f"collector.listen: {cfg.listen} is not a loopback address and TLS is not configured "
                              "(collector.tls_cert_file / tls_key_file); pass --insecure to allow it anyway")
        if auth is None:
            raise ConfigError(f"collector.listen: {cfg.listen} is not a loopback address and no credentials are "
                              "configured (collector.tokens_file); without them the collector serves loopback only")
    if auth is None:
        note = "no credentials configured: serving loopback only, without authentication"
    else:
        note = (f"{len(auth.agent_hashes)} agent tokens, {len(auth.query_hashes)} query tokens, "
                f"{len(auth.admin_hashes)} admin tokens; "
                f"{'mutual TLS' if cfg.tls_client_ca_file else 'TLS' if creds else 'no TLS'}")
    return auth, creds, note


def agent_channel(cfg):
    """(token, channel credentials) for an agent config; token from its file or GPULEDGER_AGENT_TOKEN."""
    if cfg.token_file:
        warn_if_readable_by_others(cfg.token_file)
    token = read_token(cfg.token_file or None, "GPULEDGER_AGENT_TOKEN")
    creds = None
    if cfg.tls_ca_file or cfg.tls_cert_file:
        if bool(cfg.tls_cert_file) != bool(cfg.tls_key_file):
            raise ConfigError("agent.tls_cert_file and agent.tls_key_file: set both (mutual TLS) or neither")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(cfg.tls_ca_file, "agent.tls_ca_file") if cfg.tls_ca_file else None,
            private_key=_read(cfg.tls_key_file, "agent.tls_key_file") if cfg.tls_key_file else None,
            certificate_chain=_read(cfg.tls_cert_file, "agent.tls_cert_file") if cfg.tls_cert_file else None)
    return token, creds


def write_private(path: str | os.PathLike, text: str, *, append: bool = False) -> None:
    """Write (or append) text to a file that only its owner can read: created 0600, and an existing
    file with a wider mode is narrowed to 0600 first (token files, token hashes, printed tokens)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    with os.fdopen(fd, "a" if append else "w") as fh:
        fh.write(text)


def add_agent_token(tokens_file: str, host_id: str) -> str:
    """Create a token for a host, append its hash to the tokens file (mode 600); returns the token."""
    token = new_token()
    p = Path(tokens_file)
    try:
        existing = p.read_text() if p.exists() else ""
    except OSError as e:
        raise ConfigError(f"tokens file {tokens_file}: {e.strerror}") from e
    if any(line.split()[:1] == [host_id] for line in existing.splitlines()):
        raise ConfigError(f"tokens file {tokens_file}: host {host_id!r} already has a token; remove its line first")
    try:
        write_private(p, f"{host_id} {hash_token(token)}\n", append=True)
    except OSError as e:
        raise ConfigError(f"tokens file {tokens_file}: {e.strerror}") from e
    return token


def add_query_token(query_token_file: str) -> str:
    """Create a read-only query token, append its hash to the query token file (mode 600); returns it."""
    token = new_token()
    try:
        write_private(query_token_file, hash_token(token) + "\n", append=True)
    except OSError as e:
        raise ConfigError(f"query token file {query_token_file}: {e.strerror}") from e
    return token
