"""A MIG instance is priced as its share of the physical GPU, not as a whole GPU."""

from __future__ import annotations

import pytest

from gpuledger.agent.source import mig_share
from gpuledger.collector.reports import cost_rows, idle_rows
from tests.helpers import sim_batch
from tests.integration.streams import send_batches


def test_mig_share_from_profile_names():
    assert mig_share("NVIDIA A100-SXM4-40GB MIG 3g.20gb") == pytest.approx(3 / 7)
    assert mig_share("NVIDIA H100 80GB HBM3 MIG 1g.10gb") == pytest.approx(1 / 7)
    assert mig_share("NVIDIA H100 80GB HBM3 MIG 7g.80gb") == 1.0
    assert mig_share("NVIDIA H100 80GB HBM3") == 1.0


def test_report_prices_a_mig_instance_by_its_share(collector):
    b = sim_batch(seq=1, host_id="mig-host", profiles=("idle", "idle"), instance_type="p4d.24xlarge")
    b.gpus[0].mig, b.gpus[0].share, b.gpus[0].parent_uuid = True, 3 / 7, "GPU-parent"
    acks = send_batches(collector.address, [b.SerializeToString()])
    assert acks[0].code == 0
    rows = {r["gpu_uuid"]: r for r in idle_rows(collector.store, collector.pricing, 0, 4_102_444_800_000, "gpu", {})}
    mig, whole = rows[b.gpus[0].uuid], rows[b.gpus[1].uuid]
    assert mig["gpu_hours"] == whole["gpu_hours"]
    assert mig["cost"] == pytest.approx(whole["cost"] * 3 / 7)
    assert whole["cost"] == pytest.approx(21.957642 / 8 * whole["gpu_hours"])
    assert "mig_share" in mig["price_method"]
    total = sum(r["cost"] for r in cost_rows(collector.store, collector.pricing, 0, 4_102_444_800_000, "host", {}))
    assert total == pytest.approx(mig["cost"] + whole["cost"])
    b.gpus[0].share = 1.5
    b.seq = 2
    ack = send_batches(collector.address, [b.SerializeToString()])[0]
    assert ack.code == 3 and "gpus[0].share: 1.5 is not between 0 and 1" in ack.message


def test_a30_slices_are_quarters():
    assert mig_share("NVIDIA A30 MIG 1g.6gb", 4) == pytest.approx(0.25)
    assert mig_share("NVIDIA A30 MIG 2g.12gb", 4) == pytest.approx(0.5)
