"""Fault-injection tools for the reliability tests: free ports, a TCP proxy that cuts or stalls,
a subprocess collector, a store that fails on demand."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpuledger.collector.store import Store, StoreError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(address) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"collector at {address} did not become SERVING")


def gpuledger_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpuledger.cli", *args]


class CollectorProcess:
    """`gpuledger collector serve` in a child process (so it can be SIGKILLed)."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.address = f"127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> CollectorProcess:
        log = open(self.data_dir.parent / f"collector-{self.port}.log", "ab")
        self.proc = subprocess.Popen(gpuledger_cmd("collector", "serve", "--data-dir", str(self.data_dir),
                                                   "--listen", self.address), stdout=log, stderr=log,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_serving(self.address)
        return self

    def kill(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; `cut()` closes every connection, `stall()` stops forwarding."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.conns: list[tuple[socket.socket, socket.socket]] = []
        self.stalled = threading.Event()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                c, _ = self.listener.accept()
            except OSError:
                continue
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns.append((c, u))
                self.connections += 1
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        try:
            while not self.stop.is_set():
                if self.stalled.is_set():
                    time.sleep(0.05)
                    continue
                r, _, _ = select.select(socks, [], [], 0.1)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            for s in socks:
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for a, b in conns:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.cut()
        self.listener.close()


class FaultyStore(Store):
    """The real store, with injected insert faults: `fail_next` inserts raise (retryable or not),
    `slow_s` delays every insert. Everything else is the real chDB store."""

    def __init__(self, *a, **kw) -> None:
        self.fail_next = 0
        self.fail_retryable = True
        self.slow_s = 0.0
        self.failures = 0
        super().__init__(*a, **kw)

    def insert(self, tables) -> None:
        if self.slow_s:
            time.sleep(self.slow_s)
        if self.fail_next > 0:
            self.fail_next -= 1
            self.failures += 1
            raise StoreError("injected: Code: 210. Connection refused" if self.fail_retryable else
                             "injected: Code: 53. Type mismatch in column busy_ms", self.fail_retryable)
        super().insert(tables)
