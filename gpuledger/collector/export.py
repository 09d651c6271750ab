"""FOCUS-aligned export: GPU cost and usage rows for FinOps tools (FOCUS_VERSION of the FinOps
Open Cost and Usage Specification).

One row per charge period (hour or day, UTC), host, tag set and GPU state, allocated exactly as the
cost report: Tags are the host's owner tags overlaid with the process's allowlisted tags. gpuledger
issues no invoice: BilledCost, EffectiveCost, ListCost and ContractedCost all carry the cost at the
price in force (catalog, override, or a bill's effective price), and x_PriceSource says which.
Quantities are GPU-hours; x_GpuState is active, idle_held, idle_free or unmonitored.
"""

from __future__ import annotations

import functools
import json

import pyarrow as pa
import pyarrow.compute as pc

from gpuledger.clock import iso_utc, month_bounds
from gpuledger.collector import allocation
from gpuledger.collector.allocation import HostRecord, Periods, price_breakpoints
from gpuledger.collector.coverage import CoverageRules
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.store import Store

FOCUS_VERSION = "1.2"
GRANULARITY_MS = {"hour": 3_600_000, "day": 86_400_000}
MS_PER_HOUR = 3_600_000.0
_SEP = "\x1f"
# host tags that name the cloud billing account the host is billed to
ACCOUNT_TAGS = ("billing_account_id", "billing_account", "cloud_account", "account")

_TS = pa.timestamp("ms", tz="UTC")
FOCUS_SCHEMA = pa.schema([
    ("BilledCost", pa.float64()), ("EffectiveCost", pa.float64()), ("ListCost", pa.float64()),
    ("ContractedCost", pa.float64()), ("BillingAccountId", pa.string()), ("BillingAccountName", pa.string()),
    ("BillingCurrency", pa.string()), ("BillingPeriodStart", _TS), ("BillingPeriodEnd", _TS),
    ("ChargePeriodStart", _TS), ("ChargePeriodEnd", _TS), ("ChargeCategory", pa.string()),
    ("ChargeClass", pa.string()), ("ChargeFrequency", pa.string()), ("ChargeDescription", pa.string()),
    ("CommitmentDiscountCategory", pa.string()), ("CommitmentDiscountId", pa.string()),
    ("CommitmentDiscountName", pa.string()), ("CommitmentDiscountStatus", pa.string()),
    ("CommitmentDiscountType", pa.string()),
    ("ConsumedQuantity", pa.float64()), ("ConsumedUnit", pa.string()), ("PricingQuantity", pa.float64()),
    ("PricingUnit", pa.string()), ("PricingCategory", pa.string()), ("ListUnitPrice", pa.float64()),
    ("ContractedUnitPrice", pa.float64()), ("ProviderName", pa.string()), ("PublisherName", pa.string()),
    ("InvoiceId", pa.string()), ("InvoiceIssuerName", pa.string()), ("RegionId", pa.string()),
    ("RegionName", pa.string()),
    ("ResourceId", pa.string()), ("ResourceName", pa.string()), ("ResourceType", pa.string()),
    ("ServiceCategory", pa.string()), ("ServiceSubcategory", pa.string()), ("ServiceName", pa.string()),
    ("SkuId", pa.string()), ("SkuPriceId", pa.string()), ("SubAccountId", pa.string()), ("SubAccountName", pa.string()), ("Tags", pa.string()),
    ("x_GpuState", pa.string()), ("x_AllocationMethod", pa.string()), ("x_PriceSource", pa.string()),
    ("x_FocusVersion", pa.string()),
])
TIMESTAMP_COLUMNS = tuple(f.name for f in FOCUS_SCHEMA if f.type == _TS)


class ExportError(ValueError):
    pass


_iso = functools.lru_cache(maxsize=65536)(iso_utc)  # a month's rows share a few hundred period edges


def _money(x: float | None) -> float | None:
    """Costs and prices without float noise (1.0879999999999999 -> 1.088): 10 decimals, far below a cent."""
    return None if x is None else round(x, 10)


def billing_account(h: HostRecord) -> str:
    return next((h.tags[k] for k in ACCOUNT_TAGS if h.tags.get(k)), f"{h.provider or 'unknown'}-unassigned")


def focus_rows(store: Store, pricing: Pricing, since: int, until: int, granularity: str, now_ms: int,
               rules: CoverageRules = CoverageRules()) -> list[dict]:
    step = GRANULARITY_MS.get(granularity)
    if step is None:
        from gpuledger.collector.reports import ReportError

        raise ReportError(f"granularity: {granularity!r} is not hour or day")
    if (until - since) / step > 24 * 93:
        from gpuledger.collector.reports import ReportError

        raise ReportError(f"range: at most {24 * 93} charge periods in one export; narrow since/until")
    hosts = allocation.load_hosts(store)
    periods = Periods(since, until, since // step * step, step, price_breakpoints(pricing, since, until))
    label = "concat(a.host_id, '\\x1f', toJSONString(mapSort(p.tags)))"
    acc = allocation.allocate(store, pricing, periods, now_ms, rules, label, {},
                              lambda h: f"{h.host_id}{_SEP}{{}}", by_period=True)
    source = "; ".join(dict.fromkeys(pricing.sources))
    out = []
    tags_text: dict[str, str] = {}  # one Tags value per label, not per row
    grouped: dict[tuple, dict] = {}
    for (lbl, key), tally in acc.items():  # several price segments of one grid period are one charge period
        grouped.setdefault((key[0], lbl), {})[key] = tally
    for (g, lbl), parts in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        a = max(since, periods.grid_start + g * step)
        b = min(until, periods.grid_start + (g + 1) * step)
        bill_start, bill_end = month_bounds(a)
        host_id, _, tags_json = lbl.partition(_SEP)
        h = hosts.get(host_id) or HostRecord(host_id)
        if lbl not in tags_text:
            tags_text[lbl] = json.dumps({**h.tags, **json.loads(tags_json or "{}")}, sort_keys=True,
                                        ensure_ascii=False)
        account = billing_account(h)
        for state in allocation.STATES:
            ms = sum(getattr(t.ms, state) for t in parts.values())
            if ms <= 0:
                continue
            hours = _money(ms / MS_PER_HOUR)  # no float noise in quantities either
            priced = all(t.priced for t in parts.values())
            cost = _money(sum(getattr(t.cost, state) for t in parts.values())) if priced else None
            unit = _money(cost / hours) if cost is not None and hours else None
            currency = ",".join(sorted(set().union(*(t.currency for t in parts.values())))) or None
            out.append({
                "BilledCost": cost, "EffectiveCost": cost, "ListCost": cost, "ContractedCost": cost,
                "BillingAccountId": account, "BillingAccountName": account,
                "BillingCurrency": currency or "USD",
                "BillingPeriodStart": _iso(bill_start), "BillingPeriodEnd": _iso(bill_end),
                "ChargePeriodStart": _iso(a), "ChargePeriodEnd": _iso(b),
                "ChargeCategory": "Usage", "ChargeClass": None, "ChargeFrequency": "Usage-Based",
                "ChargeDescription": f"GPU time, {state.replace('_', '-')}, on {h.instance_type or 'unknown'}",
                "ConsumedQuantity": hours, "ConsumedUnit": "GPU-Hours",
                "PricingQuantity": hours, "PricingUnit": "GPU-Hours", "PricingCategory": "Standard",
                "ListUnitPrice": unit, "ContractedUnitPrice": unit,
                "ProviderName": h.provider or "unknown", "PublisherName": h.provider or "unknown",
                "InvoiceId": None,  # gpuledger issues no invoice
                "InvoiceIssuerName": h.provider or "unknown",
                "RegionId": h.region or None, "RegionName": h.region or None,
                "ResourceId": h.instance_id or host_id, "ResourceName": host_id, "ResourceType": "GPU host",
                "ServiceCategory": "Compute", "ServiceSubcategory": "Virtual Machines",
                "ServiceName": "GPU compute", "SkuId": h.instance_type or None,
                "SkuPriceId": None, "SubAccountId": None, "SubAccountName": None,
                # no commitment discount applies to a GPU-hour at the price in force (FOCUS 1.0 needs the columns)
                "CommitmentDiscountCategory": None, "CommitmentDiscountId": None, "CommitmentDiscountName": None,
                "CommitmentDiscountStatus": None, "CommitmentDiscountType": None,
                "Tags": tags_text[lbl],
                "x_GpuState": state,
                "x_AllocationMethod": ",".join(sorted(set().union(*(t.method for t in parts.values())))) or "unpriced",
                "x_PriceSource": source,
                "x_FocusVersion": FOCUS_VERSION,
            })
    return out


def focus_table(rows: list[dict]) -> pa.Table:
    """The rows with FOCUS column types: timestamps (UTC), float64 amounts, strings; no null-typed column.
    Arrow converts the dicts (in C++) with the timestamps as text, then parses each timestamp column."""
    as_text = pa.schema([pa.field(f.name, pa.string()) if f.type == _TS else f for f in FOCUS_SCHEMA])
    t = pa.Table.from_pylist(rows, schema=as_text)
    for i, f in enumerate(FOCUS_SCHEMA):
        if f.type == _TS:
            parsed = pc.assume_timezone(pc.strptime(t.column(i), format="%Y-%m-%dT%H:%M:%SZ", unit="ms"), "UTC")
            t = t.set_column(i, f, parsed)
    return t
