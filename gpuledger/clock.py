"""Clocks are injected: real daemons use WallClock, tests and the demo a SimClock."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now_us(self) -> int: ...

    def sleep(self, seconds: float) -> None: ...


class WallClock:
    def now_us(self) -> int:
        return time.time_ns() // 1000

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class SimClock:
    """A clock that moves only when told to; `sleep` advances it instantly."""

    def __init__(self, start_us: int) -> None:
        self._now = int(start_us)
        self._lock = threading.Lock()

    def now_us(self) -> int:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += int(round(seconds * 1e6))

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)
