"""The demo's finance part: a simulated bill and API spend for a simulated fleet, imported, then the baseline.

Wiring into `gpuledger demo` (gpuledger/cli.py):

    from gpuledger.demo_finance import demo_instance_ids, import_demo_finance
    run = run_fleet(..., hosts, hours, seed=seed, instance_ids=demo_instance_ids(hosts, seed), ...)
    ...after the other reports:
    typer.echo(import_demo_finance(collector.address, run, root / "finance", seed=seed).text)

The agents carry the instance ids the bill uses (simbill.resource_ids), so the bill's GPU instances
match them; the bill adds one GPU instance no agent reports, storage, data transfer, a SageMaker
endpoint and a credit, and an OpenAI-shaped costs page (simbill.write_sim_bill).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpuledger.agent.simulate import simulated_fleet
from gpuledger.collector.simbill import SimBill, resource_ids, write_sim_bill


def demo_instance_ids(n_hosts: int, seed: int = 7) -> dict[str, str]:
    """host_id -> the cloud instance id the simulated bill gives that host (for run_fleet's instance_ids)."""
    return {h.host_id: resource_ids(h.provider, h.region, h.host_id)[1] for h in simulated_fleet(n_hosts, seed)}


@dataclass
class FinanceDemo:
    bill: SimBill
    bill_rows: int
    api_rows: int
    baseline: dict
    text: str


def import_demo_finance(collector_address: str, run, out_dir: str | Path, *, seed: int = 7, token: str | None = None,
                        discount: float = 0.28, hosts=None, credit: float = 500.0,
                        other_compute_per_day: float = 0.0) -> FinanceDemo:
    """Write the simulated bill and API spend for `run` (a demo.FleetRun) into out_dir, import both through
    the collector (Admin.Import), and fetch the baseline for the run's range (Query.Report). `hosts`: the
    always-on hosts the bill lists (default: simulated_fleet of the run's size, which must be the run's hosts)."""
    import json

    from gpuledger.client import fetch_report
    from gpuledger.collector.baseline import render_text
    from gpuledger.collector.cli_finance import import_api_spend, import_bills

    ran = {s.host_id for s in run.sources}
    if hosts is None:
        hosts = simulated_fleet(len(run.sources), seed)
        if {h.host_id for h in hosts} != ran:
            raise ValueError(f"the run's hosts ({', '.join(sorted(ran))}) are not simulated_fleet({len(ran)})'s")
    since, until = run.start_us // 1000, run.end_us // 1000
    bill = write_sim_bill(out_dir, since, until, hosts, discount=discount, credit=credit,
                          other_compute_per_day=other_compute_per_day)
    bill_reply = import_bills(collector_address, [bill.focus_path], token=token)
    api_reply = import_api_spend(collector_address, [bill.api_spend_path], "openai", token=token)
    table, _ = fetch_report(collector_address, "baseline", since, until, "", {})
    doc = json.loads(table.column("document")[0].as_py())
    text = (f"\nFinance baseline (gpuledger bill import {bill.focus_path.name}; gpuledger api-spend import "
            f"{bill.api_spend_path.name} --provider openai; gpuledger baseline):\n" + render_text(doc))
    return FinanceDemo(bill, int(bill_reply.rows_stored), int(api_reply.rows_stored), doc, text)
