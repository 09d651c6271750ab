"""Shared fixtures: a real collector (gRPC on 127.0.0.1:0, chDB in a temp dir) and helpers."""

from __future__ import annotations

import pytest

from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import Collector
from gpuledger.collector.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(f"chdb://{tmp_path / 'chdb'}")
    yield s
    s.close()


@pytest.fixture
def collector(store):
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0")
    c.start()
    yield c
    c.stop(grace_s=1)
