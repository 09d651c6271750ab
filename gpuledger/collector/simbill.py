"""A simulated cloud bill for the demo: FOCUS 1.2 rows for a simulated fleet, plus an API spend export.

`write_sim_bill` writes, for a time range:
  - one hourly Usage row per simulated GPU host (provider, region and instance type from
    `simulated_fleet`), at the catalog's on-demand price: BilledCost and ListCost at list price,
    EffectiveCost after a negotiated discount (effective < billed); each host has a plausible,
    deterministic resource id (AWS `i-...`, an Azure ARM path, a GCP numeric id inside its
    resource path) which the lead can also set as that agent's `instance_id`;
  - one GPU instance that no agent reports (a forgotten p4d.24xlarge);
  - non-GPU spend: object storage and data transfer (daily), a managed AI service (SageMaker
    endpoint hours, daily);
  - a negative credit (one row for the range);
and an OpenAI-shaped costs page (daily buckets, grouped by project and line item).
Everything it wrote comes back in `SimBill`, so tests can compare imports with what was written.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gpuledger.clock import iso_utc, month_bounds
from gpuledger.collector.pricing import Pricing

FOCUS_12_COLUMNS = [
    "AvailabilityZone", "BilledCost", "BillingAccountId", "BillingAccountName", "BillingAccountType",
    "BillingCurrency", "BillingPeriodEnd", "BillingPeriodStart", "CapacityReservationId",
    "CapacityReservationStatus", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargeFrequency",
    "ChargePeriodEnd", "ChargePeriodStart", "CommitmentDiscountCategory", "CommitmentDiscountId",
    "CommitmentDiscountName", "CommitmentDiscountQuantity", "CommitmentDiscountStatus", "CommitmentDiscountType",
    "CommitmentDiscountUnit", "ConsumedQuantity", "ConsumedUnit", "ContractedCost", "ContractedUnitPrice",
    "EffectiveCost", "InvoiceId", "InvoiceIssuerName", "ListCost", "ListUnitPrice", "PricingCategory",
    "PricingCurrency", "PricingCurrencyContractedUnitPrice", "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice", "PricingQuantity", "PricingUnit", "ProviderName", "PublisherName", "RegionId",
    "RegionName", "ResourceId", "ResourceName", "ResourceType", "ServiceCategory", "ServiceName",
    "ServiceSubcategory", "SkuId", "SkuMeter", "SkuPriceDetails", "SkuPriceId", "SubAccountId", "SubAccountName",
    "SubAccountType", "Tags", "x_UsageType",
]

_PROVIDER = {"aws": ("AWS", "111122223333", "acme-payer", "Amazon Elastic Compute Cloud", "us-east-1a"),
             "azure": ("Microsoft", "/providers/Microsoft.Billing/billingAccounts/9876543", "acme-ea",
                       "Virtual Machines", None),
             "gcp": ("Google Cloud", "01A2B3-C4D5E6-F70819", "acme-billing", "Compute Engine", "us-central1-a")}
_REGION_NAME = {"us-east-1": "US East (N. Virginia)", "eastus": "East US", "us-central1": "Iowa"}
_AWS_REGION_PREFIX = {"us-east-1": "USE1"}
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


@dataclass(frozen=True)
class BilledHost:
    host_id: str           # the agent's host id ("" for the instance no agent reports)
    provider: str
    region: str
    instance_type: str
    gpu_count: int
    resource_id: str       # as the bill's ResourceId
    instance_id: str       # as the agent's instance metadata service gives it (set agent.instance_id to it)
    hourly_price: float    # list price, USD per instance-hour
    has_agent: bool


@dataclass
class SimBill:
    focus_path: Path
    api_spend_path: Path
    hosts: list[BilledHost]
    rows: list[dict] = field(default_factory=list)          # the FOCUS rows as written (strings)
    billed_total: float = 0.0
    effective_total: float = 0.0
    billed_by_resource: dict[str, float] = field(default_factory=dict)
    effective_by_resource: dict[str, float] = field(default_factory=dict)
    gpu_hours_by_resource: dict[str, float] = field(default_factory=dict)
    api_spend_total: float = 0.0


def _hex(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def resource_ids(provider: str, region: str, host_id: str) -> tuple[str, str]:
    """(bill ResourceId, IMDS instance id) of a simulated host: fake but shaped like the real ones."""
    if provider == "aws":
        iid = "i-0" + _hex(host_id, 16)
        return iid, iid
    if provider == "azure":
        rid = (f"/subscriptions/00000000-0000-0000-0000-{_hex('sub' + host_id, 12)}/resourceGroups/gpu-fleet/"
               f"providers/Microsoft.Compute/virtualMachines/{host_id}")
        return rid, rid
    gid = str(int(_hex(host_id, 15), 16))[:19]
    return f"//compute.googleapis.com/projects/acme-ml/zones/{region}-a/instances/{gid}", gid


def _num(x: float) -> str:
    return f"{x:.10f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def write_sim_bill(out_dir: str | Path, start_ms: int, end_ms: int, hosts=None, discount: float = 0.28,
                   pricing: Pricing | None = None, credit: float = 500.0, other_compute_per_day: float = 0.0) -> SimBill:
    """Write `focus-1.2-simulated.csv` and `openai-costs-simulated.json` into out_dir for [start, end); `credit`
    is the one (negative) credit row's amount; `other_compute_per_day` adds the rest of a cloud bill (web
    servers, databases: general-purpose instances that are not AI)."""
    from gpuledger.agent.simulate import simulated_fleet

    if end_ms <= start_ms:
        raise ValueError("end_ms must be after start_ms")
    if not 0 <= discount < 1:
        raise ValueError("discount must be in [0, 1)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pricing = pricing or Pricing.default()
    hosts = hosts if hosts is not None else simulated_fleet(8)
    billed: list[BilledHost] = []
    for h in hosts:
        rid, iid = resource_ids(h.provider, h.region, h.host_id)
        row = next((r for r in pricing.catalog_rows() if (r["provider"], r["region"], r["instance_type"])
                    == (h.provider, h.region, h.instance_type)), None)
        if row is None:
            raise ValueError(f"host {h.host_id}: no catalog price for {h.provider}/{h.region}/{h.instance_type}")
        billed.append(BilledHost(h.host_id, h.provider, h.region, h.instance_type, row["gpu_count"], rid, iid,
                                 row["hourly_price"], True))
    ghost = "forgotten-p4d"
    rid, iid = resource_ids("aws", "us-east-1", ghost)
    p4d = next(r for r in pricing.catalog_rows() if r["instance_type"] == "p4d.24xlarge")
    billed.append(BilledHost("", "aws", "us-east-1", "p4d.24xlarge", p4d["gpu_count"], rid, iid,
                             p4d["hourly_price"], False))

    bill = SimBill(out / "focus-1.2-simulated.csv", out / "openai-costs-simulated.json", billed)

    def emit(provider: str, a: int, b: int, category: str, billed_cost: float, effective: float, list_cost: float,
             description: str, service: str, service_category: str, subcategory: str, *, resource_id=None,
             resource_name=None, resource_type=None, region=None, sku=None, usage_type=None, quantity=None,
             unit=None, list_unit=None, tags=None, frequency="Usage-Based", instance_type=None, gpus=0) -> None:
        pname, account, account_name, _, zone = _PROVIDER[provider]
        bp0, bp1 = month_bounds(a)
        usage = category == "Usage"
        r = dict.fromkeys(FOCUS_12_COLUMNS, "")
        r.update({
            "AvailabilityZone": zone if (usage and resource_id and zone) else "",
            "BilledCost": _num(round(billed_cost, 10)), "BillingAccountId": account,
            "BillingAccountName": account_name, "BillingAccountType": "Billing Account",
            "BillingCurrency": "USD", "BillingPeriodEnd": iso_utc(bp1), "BillingPeriodStart": iso_utc(bp0),
            "ChargeCategory": category, "ChargeDescription": description, "ChargeFrequency": frequency,
            "ChargePeriodEnd": iso_utc(b), "ChargePeriodStart": iso_utc(a),
            "ContractedCost": _num(round(effective, 10)), "EffectiveCost": _num(round(effective, 10)),
            "InvoiceId": f"INV-{datetime.fromtimestamp(bp0 / 1000, UTC):%Y-%m}-{provider.upper()}",
            "InvoiceIssuerName": pname, "ListCost": _num(round(list_cost, 10)),
            "PricingCurrency": "USD", "ProviderName": pname, "PublisherName": pname,
            "RegionId": region or "", "RegionName": _REGION_NAME.get(region or "", ""),
            "ResourceId": resource_id or "", "ResourceName": resource_name or "", "ResourceType": resource_type or "",
            "ServiceCategory": service_category, "ServiceName": service, "ServiceSubcategory": subcategory,
            "SubAccountId": account + ("-ml" if provider != "azure" else "/subscriptions/ml"),
            "SubAccountName": "ml-platform", "SubAccountType": "Account" if provider == "aws" else "Subscription"
            if provider == "azure" else "Project",
            "Tags": json.dumps(tags or {}, sort_keys=True), "x_UsageType": usage_type or "",
        })
        if usage:
            r.update({"ConsumedQuantity": _num(quantity), "ConsumedUnit": unit, "PricingQuantity": _num(quantity),
                      "PricingUnit": unit, "PricingCategory": "Committed" if effective < billed_cost else "Standard",
                      "ListUnitPrice": _num(list_unit), "ContractedUnitPrice": _num(round(effective / quantity, 10)),
                      "PricingCurrencyListUnitPrice": _num(list_unit),
                      "PricingCurrencyContractedUnitPrice": _num(round(effective / quantity, 10)),
                      "PricingCurrencyEffectiveCost": _num(round(effective, 10)),
                      "SkuId": sku or "", "SkuPriceId": f"{sku}.OD" if sku else "", "SkuMeter": subcategory,
                      "SkuPriceDetails": json.dumps({"x_InstanceType": instance_type} if instance_type else {})})
        else:
            r.update({"ConsumedQuantity": "", "PricingQuantity": "", "PricingUnit": "",
                      "PricingCurrencyEffectiveCost": _num(round(effective, 10))})
        bill.rows.append(r)
        bill.billed_total += round(billed_cost, 10)
        bill.effective_total += round(effective, 10)
        if resource_id:
            bill.billed_by_resource[resource_id] = bill.billed_by_resource.get(resource_id, 0.0) + round(billed_cost,
                                                                                                         10)
            bill.effective_by_resource[resource_id] = bill.effective_by_resource.get(resource_id, 0.0) + round(
                effective, 10)
            if gpus:
                bill.gpu_hours_by_resource[resource_id] = bill.gpu_hours_by_resource.get(resource_id, 0.0) + \
                    gpus * quantity

    # GPU instances, hourly
    for h in billed:
        a = start_ms
        while a < end_ms:
            b = min((a // HOUR_MS + 1) * HOUR_MS, end_ms)
            hours = (b - a) / HOUR_MS
            list_cost = h.hourly_price * hours
            eff = list_cost * (1 - discount)
            usage_type = f"{_AWS_REGION_PREFIX.get(h.region, 'USE1')}-BoxUsage:{h.instance_type}" \
                if h.provider == "aws" else None
            desc = {"aws": f"${h.hourly_price} per On Demand Linux {h.instance_type} Instance Hour",
                    "azure": f"Virtual Machines - {h.instance_type.removeprefix('Standard_').replace('_', ' ')} - "
                             f"{_REGION_NAME.get(h.region, h.region)}",
                    "gcp": f"{h.instance_type} running in Americas"}[h.provider]
            tags = {"team": "platform", "gpuledger_host": h.host_id} if h.has_agent else {"team": "unknown"}
            emit(h.provider, a, b, "Usage", list_cost, eff, list_cost, desc, _PROVIDER[h.provider][3], "Compute",
                 "Virtual Machines", resource_id=h.resource_id, resource_name=h.host_id or "gpu-box",
                 resource_type="Virtual Machine", region=h.region, sku=f"SKU-{_hex(h.instance_type, 8).upper()}",
                 usage_type=usage_type, quantity=hours, unit="Hours", list_unit=h.hourly_price, tags=tags,
                 instance_type=h.instance_type, gpus=h.gpu_count)
            a = b
    # non-GPU spend, daily: storage, data transfer, a managed AI service
    a = start_ms
    while a < end_ms:
        b = min((a // DAY_MS + 1) * DAY_MS, end_ms)
        days = (b - a) / DAY_MS
        gb_months = 5_000 * days / 30
        emit("aws", a, b, "Usage", gb_months * 0.023, gb_months * 0.023, gb_months * 0.023,
             "$0.023 per GB-Month of storage used", "Amazon Simple Storage Service", "Storage", "Object Storage",
             resource_id="arn:aws:s3:::acme-training-data", resource_name="acme-training-data",
             resource_type="Bucket", region="us-east-1", sku="SKU-S3STD", usage_type="USE1-TimedStorage-ByteHrs",
             quantity=round(gb_months, 6), unit="GB-Months", list_unit=0.023, tags={"team": "research"})
        if other_compute_per_day:
            hours = other_compute_per_day / 0.192 * days  # m7i.xlarge on demand, us-east-1
            emit("aws", a, b, "Usage", hours * 0.192, hours * 0.192 * (1 - discount), hours * 0.192,
                 "$0.192 per On Demand Linux m7i.xlarge Instance Hour", "Amazon Elastic Compute Cloud", "Compute",
                 "Virtual Machines", resource_id="i-0web-and-db-fleet", resource_name="web-and-db-fleet",
                 resource_type="Virtual Machine", region="us-east-1", sku="SKU-M7IXL", usage_type="USE1-BoxUsage:m7i.xlarge",
                 quantity=round(hours, 6), unit="Hours", list_unit=0.192, tags={"team": "platform"})
        gb = 800 * days
        emit("aws", a, b, "Usage", gb * 0.09, gb * 0.09, gb * 0.09, "$0.09 per GB data transfer out",
             "AWS Data Transfer", "Networking", "Network Connectivity", region="us-east-1", sku="SKU-DTOUT",
             usage_type="USE1-DataTransfer-Out-Bytes", quantity=gb, unit="GB", list_unit=0.09)
        hours = 24 * days
        emit("aws", a, b, "Usage", hours * 1.408, hours * 1.408, hours * 1.408,
             "SageMaker real-time inference ml.g5.xlarge hour", "Amazon SageMaker", "AI and Machine Learning",
             "Machine Learning", resource_id="arn:aws:sagemaker:us-east-1:111122223333:endpoint/chat-ranker",
             resource_name="chat-ranker", resource_type="Endpoint", region="us-east-1", sku="SKU-SMG5",
             usage_type="USE1-Host:ml.g5.xlarge", quantity=hours, unit="Hours", list_unit=1.408,
             tags={"team": "search", "workload": "inference"})
        a = b
    # one credit for the range
    emit("aws", start_ms, end_ms, "Credit", -credit, -credit, 0.0, "AWS Activate credits",
         "Amazon Elastic Compute Cloud", "Compute", "Virtual Machines", frequency="One-Time")

    with open(bill.focus_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FOCUS_12_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(bill.rows)

    # OpenAI-shaped costs page: daily buckets, grouped by project and line item
    buckets = []
    day = start_ms // DAY_MS * DAY_MS
    i = 0
    while day < end_ms:
        results = []
        for project, line_item, value in (("proj_search", "gpt-4o, input", 12.5 + i),
                                          ("proj_search", "gpt-4o, output", 30.0 + 2 * i),
                                          ("proj_rag", "text-embedding-3-small, input", 1.2)):
            results.append({"object": "organization.costs.result", "amount": {"value": value, "currency": "usd"},
                            "line_item": line_item, "project_id": project})
            bill.api_spend_total += value
        buckets.append({"object": "bucket", "start_time": day // 1000, "end_time": (day + DAY_MS) // 1000,
                        "results": results})
        day += DAY_MS
        i += 1
    bill.api_spend_path.write_text(json.dumps({"object": "page", "data": buckets, "has_more": False,
                                               "next_page": None}, indent=1))
    return bill
