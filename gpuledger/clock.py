"""Clocks are injected: real daemons use WallClock, tests and the demo a SimClock. Also the UTC text and
calendar-month arithmetic on epoch milliseconds that reports, exports and bills share."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


def iso_utc(ms: int) -> str:
    """Epoch ms as ISO 8601 UTC to the second, e.g. 2026-12-01T10:00:00Z (FOCUS and JSON reports)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def month_bounds(ms: int) -> tuple[int, int]:
    """[start, end) in epoch ms of the UTC calendar month holding `ms`."""
    d = datetime.fromtimestamp(ms / 1000, UTC)
    start = datetime(d.year, d.month, 1, tzinfo=UTC)
    end = datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


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
