"""Cloud cost exports read into one normalized Arrow schema, streaming.

Formats, told apart by their header (`detect_format`):
  focus-1.0 / focus-1.1 / focus-1.2  FinOps FOCUS cost and usage rows (AWS Data Exports FOCUS,
                                     Azure cost exports FOCUS, the GCP FOCUS BigQuery view
                                     exported, OCI FOCUS reports); CSV, gzipped CSV or Parquet.
                                     The version is told by columns the later versions added
                                     (1.1: ServiceSubcategory, SkuMeter, SkuPriceDetails,
                                     CapacityReservationId; 1.2: InvoiceId, PricingCurrency,
                                     BillingAccountType, SubAccountType).
  aws-cur-legacy                     AWS Cost and Usage Report, `lineItem/UnblendedCost` naming,
                                     tags in `resourceTags/user:KEY` columns.
  aws-cur-2.0                        CUR 2.0 (Data Exports), snake_case naming, tags in the
                                     `resource_tags` map (or, in legacy Athena/Parquet CUR,
                                     `resource_tags_user_KEY` columns: reported as aws-cur-legacy).

Streaming: CSV through pyarrow's block reader, Parquet by record batches of the columns used;
memory stays bounded by the batch size, whatever the file's size. Per-row Python runs only on
the distinct values of a batch (tags, usage types), which repeat heavily in real bills.

Untidy input is accepted: literal NULL / empty cells are nulls, extra columns are ignored,
timestamps without a zone are UTC (`2024-09-18 22:00:00`, BigQuery's `... UTC`, `...Z`, offsets),
negative amounts (credits) and effective cost above billed cost are kept as they are. A row whose
charge period start or a cost cannot be read is refused; every refusal (and every warning, e.g.
Tags that are not a JSON object, kept as empty tags) is an `Issue` naming the file, the CSV line
number (header = line 1, exact even with line breaks inside quoted cells) or Parquet row (first
row = 1), the column and the value.

Normalized columns: `BILL_SCHEMA` (every column documented there).

Identity for idempotent re-import (the rule the store applies): a bill row belongs to the slice
(provider, billing_account_id, billing_period), billing_period being the UTC month "YYYY-MM" of
the row's billing period start (FOCUS BillingPeriodStart, CUR bill/BillingPeriodStartDate; the
charge period start where the file has none). Exports are produced whole per account and billing
period, and a newer export of a period restates all of it. So an import REPLACES every slice it
covers: all rows stored earlier for those slices, from whatever file, are dropped and the new
rows stored. Re-importing a file, or importing a newer export of the same period, replaces and
never doubles; slices the new import does not cover are kept. Import all parts of one delivery
(AWS splits a month into several files) in one `read_bills` call: the slices are the union of
the parts'. Every chunk carries `slice_key` per row and `BillChunk.slices`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

log = logging.getLogger("gpuledger.bills")

TAGS_TYPE = pa.map_(pa.string(), pa.string())

BILL_SCHEMA = pa.schema([
    pa.field("source_file", pa.string(), False),          # the file's name (no folder)
    pa.field("row_number", pa.int64(), False),            # CSV line number (header = 1) or Parquet row (first = 1)
    pa.field("format", pa.string(), False),               # focus-1.2, aws-cur-legacy, aws-cur-2.0, ...
    pa.field("provider", pa.string(), False),             # aws | azure | gcp | oci | other name, lower case
    pa.field("billing_account_id", pa.string(), False),   # FOCUS BillingAccountId / CUR bill/PayerAccountId
    pa.field("sub_account_id", pa.string()),              # FOCUS SubAccountId / CUR lineItem/UsageAccountId
    pa.field("billing_period", pa.string(), False),       # "YYYY-MM", UTC month of the billing period start
    pa.field("slice_key", pa.string(), False),            # provider|billing_account_id|billing_period
    pa.field("charge_period_start_ms", pa.int64(), False),  # UTC epoch ms
    pa.field("charge_period_end_ms", pa.int64()),
    pa.field("charge_category", pa.string(), False),      # Usage | Purchase | Tax | Credit | Adjustment
    pa.field("charge_class", pa.string()),                # Correction or null
    pa.field("service_category", pa.string()),            # FOCUS ServiceCategory (CUR: null)
    pa.field("service_name", pa.string()),
    pa.field("sku_id", pa.string()),
    pa.field("usage_type", pa.string()),                  # AWS x_UsageType / lineItem/UsageType
    pa.field("charge_description", pa.string()),
    pa.field("resource_id", pa.string()),
    pa.field("region", pa.string()),
    pa.field("instance_type", pa.string()),               # cloud instance type found in the row, if any
    pa.field("is_gpu_instance", pa.bool_(), False),       # a GPU instance type, or a GPU accelerator SKU
    pa.field("gpu_count", pa.int32()),                    # GPUs of instance_type (catalog); null if unknown
    pa.field("gpu_model", pa.string()),                   # from the catalog, or named in the row (A100, H100 ...)
    pa.field("billed_cost", pa.float64(), False),         # invoiced amount (CUR: unblended cost)
    pa.field("effective_cost", pa.float64(), False),      # amortized, after discounts (CUR: derived)
    pa.field("list_cost", pa.float64()),                  # at public list price
    pa.field("currency", pa.string(), False),
    pa.field("consumed_quantity", pa.float64()),
    pa.field("consumed_unit", pa.string()),
    pa.field("pricing_quantity", pa.float64()),
    pa.field("pricing_unit", pa.string()),
    pa.field("tags", TAGS_TYPE, False),                   # resource tags; CUR's user: / user_ prefix dropped
    pa.field("ai_related", pa.bool_(), False),            # AI/ML service category, GPU instance or known AI service
    pa.field("team", pa.string()),                        # from tags team / gpuledger_team (case-insensitive)
    pa.field("project", pa.string()),
    pa.field("phase", pa.string()),
    pa.field("workload", pa.string()),
])


class BillError(ValueError):
    """A file that cannot be read as a bill at all (unknown header, unreadable file)."""


@dataclass(frozen=True)
class Issue:
    file: str
    row: int          # CSV line number (header = 1) or Parquet row (first = 1)
    column: str
    value: str
    message: str
    refused: bool     # True: the row was not imported; False: imported with this field emptied

    def __str__(self) -> str:
        where = "line" if not self.file.endswith(".parquet") else "row"
        return (f"{self.file} {where} {self.row}, column {self.column}: {self.message} (value {self.value!r})"
                + ("; row refused" if self.refused else ""))


@dataclass(frozen=True)
class SliceKey:
    provider: str
    billing_account_id: str
    billing_period: str  # YYYY-MM

    def __str__(self) -> str:
        return f"{self.provider}|{self.billing_account_id}|{self.billing_period}"


@dataclass
class BillChunk:
    table: pa.Table               # BILL_SCHEMA
    slices: frozenset[SliceKey]   # the slices its rows belong to


# --------------------------------------------------------------------------- GPU catalog

_GPU_FAMILY = re.compile(
    r"^(?:p[2-6][a-z0-9-]*\.[a-z0-9]+|g[3-6][a-z0-9-]*\.[a-z0-9]+"          # AWS P and G families
    r"|standard_n[cdv][a-z0-9_]*"                                            # Azure N series
    r"|a[234]-[a-z]+-\d+g?|g[24]-standard-\d+|a3-[a-z]+-\d+g"                # GCP A2/A3/A4/G2
    r"|bm\.gpu[a-z0-9.-]*|vm\.gpu[a-z0-9.-]*)$", re.IGNORECASE)              # OCI GPU shapes
_GPU_MODEL = re.compile(r"\b(H200|H100|A100|A10G|A10|L40S|L4|T4|V100|P100|K80|B200|B300|GB200|MI300X)\b",
                        re.IGNORECASE)
_GPU_SKU = re.compile(r"\b(?:nvidia|gpu)\b", re.IGNORECASE)
_AWS_USAGE = re.compile(r"(?:^|[-:])(?:BoxUsage|SpotUsage|DedicatedUsage|HostBoxUsage|HostUsage|UnusedBox|"
                        r"ReservedHostUsage|DedicatedRes|UnusedDed|SchedUsage|EBSOptimized|"
                        r"ml\.[a-z0-9]+)?:?([a-z][a-z0-9-]*\d[a-z0-9-]*\.[0-9]*[a-z0-9]+)", re.IGNORECASE)
_AZURE = re.compile(r"\bStandard_[A-Za-z0-9_]+")
_GCP = re.compile(r"\b([a-z]\d[a-z]?-(?:standard|highgpu|megagpu|ultragpu|highmem|highcpu|edgegpu)-\d+g?)\b")
_OCI = re.compile(r"\b((?:BM|VM)\.GPU[A-Za-z0-9.\-]*)")

AI_SERVICES = re.compile(
    r"sagemaker|bedrock|vertex ?ai|azure openai|openai|cognitive services|azure machine learning|"
    r"machine learning|generative ai|gemini|comprehend|rekognition|textract|transcribe|polly|"
    r"translate|kendra|lex\b|q business|ai platform|document ai|speech|vision ai|ai services|foundry",
    re.IGNORECASE)


@dataclass
class GpuCatalog:
    """Instance type -> (GPU count, GPU model) from the shipped price catalog (all regions)."""

    types: dict[str, tuple[int, str]] = field(default_factory=dict)

    @classmethod
    def default(cls) -> GpuCatalog:
        from gpuledger.collector.pricing import CATALOG_FILE, validate_catalog_csv

        text = resources.files("gpuledger.collector").joinpath(CATALOG_FILE).read_text()
        return cls({r["instance_type"]: (r["gpu_count"], r["gpu_model"]) for r in validate_catalog_csv(text)})

    def __post_init__(self) -> None:
        self._lower = {k.lower(): k for k in self.types}
        # Azure bills name sizes as "NC24ads A100 v4" as well as "Standard_NC24ads_A100_v4"
        for k in list(self.types):
            if k.startswith("Standard_"):
                self._lower[k[len("Standard_"):].replace("_", " ").lower()] = k
        alias = sorted(self._lower, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(a) for a in alias), re.IGNORECASE) if alias else None

    def find(self, text: str) -> str | None:
        """The instance type named in `text` (a usage type, SKU, description...)."""
        if not text:
            return None
        if self._pattern is not None:
            for m in self._pattern.finditer(text):
                a, b = m.start(), m.end()
                if (a == 0 or not text[a - 1].isalnum()) and (b == len(text) or not text[b].isalnum()):
                    return self._lower[m.group(0).lower()]
        for rx in (_AZURE, _GCP, _OCI):
            m = rx.search(text)
            if m:
                return m.group(m.lastindex or 0)
        m = _AWS_USAGE.search(text)
        if m and "." in m.group(1):
            return m.group(1)
        return None

    def describe(self, text: str) -> tuple[str | None, bool, int | None, str | None]:
        """(instance_type, is_gpu, gpu_count, gpu_model) for one candidate text."""
        itype = self.find(text)
        if itype is not None and itype in self.types:
            count, model = self.types[itype]
            if f"ml.{itype}" in text:  # a SageMaker instance: managed, priced apart from EC2
                return f"ml.{itype}", True, count, model
            return itype, True, count, model
        model_m = _GPU_MODEL.search(text or "")
        model = model_m.group(1).upper() if model_m else None
        if itype is not None and _GPU_FAMILY.match(itype):
            return itype, True, None, model
        if model and _GPU_SKU.search(text):  # a GPU accelerator SKU billed on its own (GCP, OCI)
            return itype, True, None, model
        return itype, False, None, None


# --------------------------------------------------------------------------- format specs

FOCUS_COLUMNS = {
    "provider": ["ProviderName"], "billing_account_id": ["BillingAccountId"], "sub_account_id": ["SubAccountId"],
    "billing_period_start": ["BillingPeriodStart"], "charge_period_start": ["ChargePeriodStart"],
    "charge_period_end": ["ChargePeriodEnd"], "charge_category": ["ChargeCategory"], "charge_class": ["ChargeClass"],
    "service_category": ["ServiceCategory"], "service_name": ["ServiceName"], "sku_id": ["SkuId"],
    "usage_type": ["x_UsageType"], "charge_description": ["ChargeDescription"], "resource_id": ["ResourceId"],
    "region": ["RegionId"], "billed_cost": ["BilledCost"], "effective_cost": ["EffectiveCost"],
    "list_cost": ["ListCost"], "currency": ["BillingCurrency"], "consumed_quantity": ["ConsumedQuantity"],
    "consumed_unit": ["ConsumedUnit"], "pricing_quantity": ["PricingQuantity"], "pricing_unit": ["PricingUnit"],
    "tags": ["Tags"],
    # only searched for an instance type
    "hint": ["SkuPriceDetails", "x_SkuDetails", "x_SkuMeterName", "SkuMeter", "x_InstanceType", "ResourceType"],
}
CUR_LEGACY_COLUMNS = {
    "billing_account_id": ["bill/PayerAccountId", "lineItem/UsageAccountId"],
    "sub_account_id": ["lineItem/UsageAccountId"], "billing_period_start": ["bill/BillingPeriodStartDate"],
    "charge_period_start": ["lineItem/UsageStartDate"], "charge_period_end": ["lineItem/UsageEndDate"],
    "line_item_type": ["lineItem/LineItemType"], "service_name": ["product/ProductName", "lineItem/ProductCode"],
    "sku_id": ["product/sku"], "usage_type": ["lineItem/UsageType"],
    "charge_description": ["lineItem/LineItemDescription"], "resource_id": ["lineItem/ResourceId"],
    "region": ["product/regionCode", "product/region"], "billed_cost": ["lineItem/UnblendedCost"],
    "list_cost": ["pricing/publicOnDemandCost"], "currency": ["lineItem/CurrencyCode"],
    "consumed_quantity": ["lineItem/UsageAmount"], "consumed_unit": ["pricing/unit"],
    "hint": ["product/instanceType"],
    "ri_effective": ["reservation/EffectiveCost"], "sp_effective": ["savingsPlan/SavingsPlanEffectiveCost"],
    "ri_unused_upfront": ["reservation/UnusedAmortizedUpfrontFeeForBillingPeriod"],
    "ri_unused_recurring": ["reservation/UnusedRecurringFee"],
    "sp_commitment": ["savingsPlan/TotalCommitmentToDate"], "sp_used": ["savingsPlan/UsedCommitment"],
}
CUR_SNAKE_COLUMNS = {
    "billing_account_id": ["bill_payer_account_id", "line_item_usage_account_id"],
    "sub_account_id": ["line_item_usage_account_id"], "billing_period_start": ["bill_billing_period_start_date"],
    "charge_period_start": ["line_item_usage_start_date"], "charge_period_end": ["line_item_usage_end_date"],
    "line_item_type": ["line_item_line_item_type"],
    "service_name": ["product_product_name", "product_servicecode", "line_item_product_code"],
    "sku_id": ["product_sku"], "usage_type": ["line_item_usage_type"],
    "charge_description": ["line_item_line_item_description"], "resource_id": ["line_item_resource_id"],
    "region": ["product_region_code", "product_region"], "billed_cost": ["line_item_unblended_cost"],
    "list_cost": ["pricing_public_on_demand_cost"], "currency": ["line_item_currency_code"],
    "consumed_quantity": ["line_item_usage_amount"], "consumed_unit": ["pricing_unit"],
    "hint": ["product_instance_type"], "tags": ["resource_tags"],
    "ri_effective": ["reservation_effective_cost"], "sp_effective": ["savings_plan_savings_plan_effective_cost"],
    "ri_unused_upfront": ["reservation_unused_amortized_upfront_fee_for_billing_period"],
    "ri_unused_recurring": ["reservation_unused_recurring_fee"],
    "sp_commitment": ["savings_plan_total_commitment_to_date"], "sp_used": ["savings_plan_used_commitment"],
}

# CUR lineItem/LineItemType -> FOCUS ChargeCategory
CUR_CHARGE_CATEGORY = {
    "Usage": "Usage", "DiscountedUsage": "Usage", "SavingsPlanCoveredUsage": "Usage", "SavingsPlanNegation": "Usage",
    "Tax": "Tax", "Credit": "Credit", "Refund": "Credit", "Discount": "Credit", "BundledDiscount": "Credit",
    "EdpDiscount": "Credit", "PrivateRateDiscount": "Credit", "DistributorDiscount": "Credit",
    "Fee": "Purchase", "RIFee": "Purchase", "SavingsPlanUpfrontFee": "Purchase",
    "SavingsPlanRecurringFee": "Purchase",
}
CHARGE_CATEGORIES = ("Usage", "Purchase", "Tax", "Credit", "Adjustment")


def detect_format(header: Iterable[str]) -> str:
    cols = set(header)
    if {"BilledCost", "ChargePeriodStart"} <= cols:
        if cols & {"InvoiceId", "PricingCurrency", "BillingAccountType", "SubAccountType"}:
            return "focus-1.2"
        if cols & {"ServiceSubcategory", "SkuMeter", "SkuPriceDetails", "CapacityReservationId"}:
            return "focus-1.1"
        return "focus-1.0"
    if {"lineItem/UsageStartDate", "lineItem/UnblendedCost"} <= cols:
        return "aws-cur-legacy"
    if {"line_item_usage_start_date", "line_item_unblended_cost"} <= cols:
        return "aws-cur-2.0" if "resource_tags" in cols else "aws-cur-legacy"
    raise BillError("header matches no known bill format (FOCUS needs BilledCost and ChargePeriodStart; AWS CUR "
                    "lineItem/UsageStartDate and lineItem/UnblendedCost, or their snake_case names)")


# --------------------------------------------------------------------------- value parsing

_NUM = r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$"
_TS = r"^\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?(?:Z|[+-]\d{2}:?\d{2})?$"
_ZONE = r"(?:Z|[+-]\d{2}:?\d{2})$"


def _strings(arr: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string())
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return pc.cast(arr, pa.string())
    return arr


def _mask(b: pa.Array) -> np.ndarray:
    """A boolean Arrow array as a numpy mask (nulls false), without pyarrow's pandas shim for booleans."""
    return pc.cast(pc.fill_null(b, False), pa.int8()).to_numpy(zero_copy_only=False).astype(bool)


def _bad(valid_in: pa.Array, ok: pa.Array) -> np.ndarray:
    """Rows with a value that is not ok (nulls are fine)."""
    return _mask(pc.and_(pc.is_valid(valid_in), pc.invert(pc.fill_null(ok, False))))


def _to_float(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """float64 and the mask of unreadable cells."""
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.float64()), np.zeros(len(arr), bool)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_decimal(arr.type):
        return pc.cast(arr, pa.float64()), np.zeros(len(arr), bool)
    s = pc.utf8_trim_whitespace(_strings(arr))
    s = pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)
    ok = pc.match_substring_regex(s, _NUM)
    bad = _bad(s, ok)
    if bad.any():
        s = pc.if_else(pa.array(bad), pa.scalar(None, pa.string()), s)
    return pc.cast(s, pa.float64()), bad


def _to_ms(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """UTC epoch milliseconds (int64); zone-less values are UTC; and the mask of unreadable cells."""
    n = len(arr)
    t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(n, pa.int64()), np.zeros(n, bool)
    if pa.types.is_timestamp(t):
        return pc.cast(pc.cast(arr, pa.timestamp("ms", tz=t.tz)), pa.int64()), np.zeros(n, bool)
    if pa.types.is_date(t):
        return pc.cast(pc.cast(arr, pa.timestamp("ms")), pa.int64()), np.zeros(n, bool)
    s = pc.utf8_trim_whitespace(_strings(arr))
    s = pc.replace_substring_regex(s, r"\s*UTC$", "Z")
    s = pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)
    bad = _bad(s, pc.match_substring_regex(s, _TS))
    if bad.any():
        s = pc.if_else(pa.array(bad), pa.scalar(None, pa.string()), s)
    zoned = pc.fill_null(pc.match_substring_regex(s, _ZONE), False)
    out = None
    for want_zone in (False, True):
        part = pc.if_else(zoned if want_zone else pc.invert(zoned), s, pa.scalar(None, pa.string()))
        if part.null_count == n:
            continue
        try:
            ms = pc.cast(pc.cast(part, pa.timestamp("ms", tz="UTC") if want_zone else pa.timestamp("ms")), pa.int64())
        except pa.ArrowInvalid:  # e.g. 2024-13-45: find the cells one by one
            vals = part.to_pylist()
            got = []
            for i, v in enumerate(vals):
                try:
                    got.append(None if v is None else pc.cast(pa.array([v]), pa.timestamp(
                        "ms", tz="UTC") if want_zone else pa.timestamp("ms")).cast(pa.int64())[0].as_py())
                except pa.ArrowInvalid:
                    got.append(None)
                    bad[i] = True
            ms = pa.array(got, pa.int64())
        out = ms if out is None else pc.coalesce(out, ms)
    return (out if out is not None else pa.nulls(n, pa.int64())), bad


def _month(ms: pa.Array) -> pa.Array:
    """"YYYY-MM" (UTC) of epoch milliseconds without nulls; formats only the distinct months."""
    months = ms.to_numpy(zero_copy_only=False).astype("datetime64[ms]").astype("datetime64[M]").astype(np.int64)
    uniq, inverse = np.unique(months, return_inverse=True)
    labels = pa.array([str(np.datetime64(int(u), "M")) for u in uniq], pa.string())
    return labels.take(pa.array(inverse.astype(np.int32)))


# --------------------------------------------------------------------------- per-distinct-value work

_TAG_KEYS = {"team": ("team", "gpuledger_team"), "project": ("project", "gpuledger_project"),
             "phase": ("phase", "gpuledger_phase"), "workload": ("workload", "gpuledger_workload")}


def _tag_key(k: str) -> str:
    for prefix in ("user:", "user_"):
        if k.startswith(prefix):
            return k[len(prefix):]
    return k


def _tags_from_json(text: str) -> dict[str, str] | None:
    """FOCUS Tags: a JSON object; GCP's view exports a list of {key, value}. None: unreadable."""
    try:
        doc = json.loads(text)
    except (TypeError, ValueError):
        return None
    if isinstance(doc, dict):
        items = doc.items()
    elif isinstance(doc, list) and all(isinstance(e, dict) and "key" in e for e in doc):
        items = ((e["key"], e.get("value")) for e in doc)
    else:
        return None
    return {_tag_key(str(k)): v if isinstance(v, str) else json.dumps(v) for k, v in items if v is not None}


def _known(tags: dict[str, str]) -> tuple[str | None, ...]:
    low = {k.lower().replace("-", "_").replace(" ", "_"): v for k, v in tags.items()}
    return tuple(next((low[k] for k in keys if low.get(k)), None) for keys in _TAG_KEYS.values())


def _by_distinct(arr: pa.Array, fn, out_types: list[pa.DataType]) -> list[pa.Array]:
    """Apply fn to each distinct value of a string array; return its outputs spread back to rows."""
    enc = pc.dictionary_encode(_strings(arr))
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    results = [fn(v) for v in enc.dictionary.to_pylist()]
    null_result = fn(None)
    idx = pc.fill_null(enc.indices, len(results))
    outs = []
    for j, t in enumerate(out_types):
        values = pa.array([r[j] for r in results] + [null_result[j]], t)
        outs.append(values.take(idx))
    return outs


def _codes(arr: pa.Array) -> tuple[np.ndarray, list]:
    """Dictionary codes of a string array (nulls: code len(values), value None) and its values."""
    enc = pc.dictionary_encode(_strings(arr))
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    values = enc.dictionary.to_pylist() + [None]
    codes = pc.fill_null(enc.indices, len(values) - 1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, values


def _by_distinct_rows(arrays: list[pa.Array], fn, out_types: list[pa.DataType]) -> list[pa.Array]:
    """Like `_by_distinct` over several columns: fn gets one tuple of values per distinct combination."""
    key = np.zeros(len(arrays[0]), dtype=np.int64)
    parts = []
    for arr in arrays:
        codes, values = _codes(arr)
        # renumber after each column, so the combined key stays below rows x values (no overflow)
        _, key = np.unique(key * len(values) + codes, return_inverse=True)
        parts.append((codes, values))
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    results = [fn(tuple(values[codes[i]] for codes, values in parts)) for i in first]
    idx = pa.array(inverse.astype(np.int32))
    return [pa.array([r[j] for r in results], t).take(idx) for j, t in enumerate(out_types)]


# --------------------------------------------------------------------------- reading

def _open_stream(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "csv.gz", lambda: pa.input_stream(str(path), compression="gzip"), \
            lambda: io.TextIOWrapper(gzip.open(path), encoding="utf-8-sig", newline="")
    if magic == b"PAR1":
        return "parquet", None, None
    return "csv", lambda: pa.input_stream(str(path)), lambda: open(path, encoding="utf-8-sig", newline="")


class BillReader:
    """One or more bill files read as `BillChunk`s. Iterate it once; then `issues`, `slices`,
    `formats`, `rows_read`, `rows_imported` describe the import.

        reader = read_bills(["cur-part-1.csv.gz", "cur-part-2.csv.gz"])
        for chunk in reader:
            store.insert(chunk.table)
        store.replace_slices(reader.slices)    # the lead's store: drop older rows of these slices
    """

    def __init__(self, paths: Iterable[str | Path], catalog: GpuCatalog | None = None, batch_rows: int = 65_536,
                 max_issues: int = 1000) -> None:
        self.paths = [Path(p) for p in paths]
        self.catalog = catalog or GpuCatalog.default()
        self.batch_rows = batch_rows
        self.max_issues = max_issues
        self.issues: list[Issue] = []
        self.issue_count = 0
        self.refused = 0
        self.rows_read = 0
        self.rows_imported = 0
        self.slices: set[SliceKey] = set()
        self.formats: dict[str, str] = {}
        self.cost_totals: dict[str, float] = {}  # currency -> billed cost imported

    def __iter__(self) -> Iterator[BillChunk]:
        for path in self.paths:
            yield from self._file(path)

    # -- one file
    def _file(self, path: Path) -> Iterator[BillChunk]:
        try:
            kind, stream, text = _open_stream(path)
        except OSError as e:
            raise BillError(f"{path}: {e}") from e
        if kind == "parquet":
            pf = pq.ParquetFile(str(path))
            header = pf.schema_arrow.names
            fmt = self._format(path, header)
            spec = _spec(fmt)
            wanted = _wanted(spec, header, fmt)
            row = 1
            for batch in pf.iter_batches(batch_size=self.batch_rows, columns=wanted):
                rows = np.arange(row, row + batch.num_rows, dtype=np.int64)
                row += batch.num_rows
                yield from self._chunk(path, fmt, spec, batch, rows)
            return
        with text() as fh:
            header = next(csv.reader(fh), None)
        if not header:
            raise BillError(f"{path}: empty file, no header")
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise BillError(f"{path} line 1: duplicate column(s) {', '.join(dup)}")
        fmt = self._format(path, header)
        spec = _spec(fmt)
        reader = pacsv.open_csv(
            stream(),
            read_options=pacsv.ReadOptions(block_size=4 << 20, use_threads=True),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in header}, null_values=["", "NULL", "null", "Null"],
                strings_can_be_null=True, quoted_strings_can_be_null=True))
        line = 2
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as e:
                raise BillError(f"{path}: CSV after line {line}: {e}") from e
            # exact line numbers: count line breaks inside quoted cells of earlier rows
            extra = np.zeros(batch.num_rows, dtype=np.int64)
            for col in batch.columns:
                if col.null_count < len(col):
                    extra += np.asarray(pc.fill_null(pc.count_substring(col, "\n"), 0).to_numpy(
                        zero_copy_only=False), dtype=np.int64)
            before = np.concatenate(([0], np.cumsum(extra)[:-1])) if batch.num_rows else extra
            rows = line + np.arange(batch.num_rows, dtype=np.int64) + before
            line += batch.num_rows + int(extra.sum())
            yield from self._chunk(path, fmt, spec, batch, rows)

    def _format(self, path: Path, header: list[str]) -> str:
        try:
            fmt = detect_format(header)
        except BillError as e:
            raise BillError(f"{path} line 1: {e}") from e
        self.formats[str(path)] = fmt
        return fmt

    def _issue(self, path: Path, row: int, column: str, value, message: str, refused: bool) -> None:
        self.issue_count += 1
        if len(self.issues) < self.max_issues:
            self.issues.append(Issue(path.name, int(row), column, "" if value is None else str(value)[:200],
                                     message, refused))

    # -- one batch
    def _chunk(self, path: Path, fmt: str, spec: dict, batch: pa.RecordBatch, rows: np.ndarray):
        n = batch.num_rows
        if n == 0:
            return
        self.rows_read += n
        names = batch.schema.names
        refuse = np.zeros(n, bool)

        def pick(key: str) -> tuple[pa.Array | None, str]:
            """The first present candidate column (coalesced with the later ones)."""
            got, label = None, ""
            for c in spec.get(key, []):
                if c in names:
                    arr = batch.column(names.index(c))
                    if got is None:
                        got, label = arr, c
                    elif pa.types.is_string(got.type) and pa.types.is_string(arr.type):
                        got = pc.coalesce(got, arr)
            return got, label

        def text(key: str) -> pa.Array:
            arr, _ = pick(key)
            if arr is None:
                return pa.nulls(n, pa.string())
            s = pc.utf8_trim_whitespace(_strings(arr))
            return pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)

        def number(key: str, required: bool) -> pa.Array:
            arr, label = pick(key)
            if arr is None:
                return pa.nulls(n, pa.float64())
            vals, bad = _to_float(arr)
            for i in np.flatnonzero(bad):
                self._issue(path, rows[i], label, arr[i].as_py(), "not a number", required)
            if required:
                refuse[bad] = True
            return vals

        def stamp(key: str, required: bool) -> pa.Array:
            arr, label = pick(key)
            if arr is None:
                if required:
                    raise BillError(f"{path}: no {spec[key][0]} column")
                return pa.nulls(n, pa.int64())
            vals, bad = _to_ms(arr)
            missing = _mask(pc.is_null(vals)) & ~bad if required else None
            for i in np.flatnonzero(bad):
                self._issue(path, rows[i], label, arr[i].as_py(), "not an ISO 8601 date-time", required)
            if required:
                for i in np.flatnonzero(missing):
                    self._issue(path, rows[i], label, None, "empty; a charge needs its period start", True)
                refuse[bad | missing] = True
            return vals

        start = stamp("charge_period_start", True)
        end = stamp("charge_period_end", False)
        bp_start = stamp("billing_period_start", False)
        billed = number("billed_cost", True)
        list_cost = number("list_cost", False)
        consumed = number("consumed_quantity", False)
        pricing_q = number("pricing_quantity", False) if "pricing_quantity" in spec else consumed
        billed0 = pc.fill_null(billed, 0.0)

        if fmt.startswith("focus"):
            provider = _by_distinct(text("provider"), lambda v: (_provider(v),), [pa.string()])[0]
            category = text("charge_category")
            eff = number("effective_cost", True)
            effective = pc.coalesce(eff, billed0)
            charge_class = text("charge_class")
            service_category = text("service_category")
            consumed_unit, pricing_unit = text("consumed_unit"), text("pricing_unit")
        else:
            provider = pa.array(["aws"] * n, pa.string())
            lit = text("line_item_type")
            category = _by_distinct(lit, lambda v: (CUR_CHARGE_CATEGORY.get(v or "", "Adjustment"),),
                                    [pa.string()])[0]
            effective = self._cur_effective(lit, billed0, number)
            charge_class = pa.nulls(n, pa.string())
            service_category = pa.nulls(n, pa.string())
            consumed_unit = pricing_unit = text("consumed_unit")
        category = _by_distinct(category, lambda v: (_category(v),), [pa.string()])[0]

        account = pc.fill_null(text("billing_account_id"), "")
        period_ms = pc.coalesce(bp_start, start)
        period = _month(pc.fill_null(period_ms, 0))
        slice_key = _by_distinct_rows([provider, account, period], lambda v: ("|".join(v),), [pa.string()])[0]

        service_name, sku, usage_type = text("service_name"), text("sku_id"), text("usage_type")
        description, hint = text("charge_description"), text("hint")
        itype, is_gpu, gpus, model = _by_distinct_rows(
            [usage_type, hint, sku, description],
            lambda v: self.catalog.describe(" | ".join(x or "" for x in v)),
            [pa.string(), pa.bool_(), pa.int32(), pa.string()])

        def ai(v):
            category, name = v
            return (category == "AI and Machine Learning" or bool(name and AI_SERVICES.search(name)),)

        ai_related = pc.or_(_by_distinct_rows([service_category, service_name], ai, [pa.bool_()])[0], is_gpu)

        tags, team, project, phase, workload = self._tags(path, fmt, spec, batch, rows, n)

        table = pa.table({
            "source_file": pa.array([path.name] * n, pa.string()),
            "row_number": pa.array(rows, pa.int64()),
            "format": pa.array([fmt] * n, pa.string()),
            "provider": provider, "billing_account_id": account, "sub_account_id": text("sub_account_id"),
            "billing_period": period, "slice_key": slice_key,
            "charge_period_start_ms": start, "charge_period_end_ms": end,
            "charge_category": category, "charge_class": charge_class,
            "service_category": service_category, "service_name": service_name, "sku_id": sku,
            "usage_type": usage_type, "charge_description": description, "resource_id": text("resource_id"),
            "region": text("region"), "instance_type": itype, "is_gpu_instance": is_gpu, "gpu_count": gpus,
            "gpu_model": model, "billed_cost": billed0, "effective_cost": effective, "list_cost": list_cost,
            "currency": pc.fill_null(text("currency"), ""), "consumed_quantity": consumed,
            "consumed_unit": consumed_unit, "pricing_quantity": pricing_q, "pricing_unit": pricing_unit,
            "tags": tags, "ai_related": ai_related, "team": team, "project": project, "phase": phase,
            "workload": workload,
        })
        if refuse.any():
            self.refused += int(refuse.sum())
            table = table.filter(pa.array(~refuse))
        table = table.cast(BILL_SCHEMA)
        if table.num_rows == 0:
            return
        self.rows_imported += table.num_rows
        keys = table.select(["provider", "billing_account_id", "billing_period"]).group_by(
            ["provider", "billing_account_id", "billing_period"]).aggregate([])
        slices = frozenset(SliceKey(*r.values()) for r in keys.to_pylist())
        self.slices |= slices
        for cur in pc.unique(table["currency"]).to_pylist():
            sel = table.filter(pc.equal(table["currency"], cur))
            self.cost_totals[cur] = self.cost_totals.get(cur, 0.0) + (pc.sum(sel["billed_cost"]).as_py() or 0.0)
        yield BillChunk(table, slices)

    def _cur_effective(self, lit: pa.Array, billed: pa.Array, number) -> pa.Array:
        """Amortized cost from CUR columns (AWS's documented amortization): reservation and
        Savings Plans covered usage at their effective cost, their fees only for unused parts,
        negations and upfront fees at 0; every other row at its unblended cost."""
        def col(key):
            return pc.fill_null(number(key, False), 0.0)

        def is_(*types):
            return pc.fill_null(pc.is_in(lit, pa.array(types)), False)

        ri, sp = col("ri_effective"), col("sp_effective")
        ri_fee = pc.add(col("ri_unused_upfront"), col("ri_unused_recurring"))
        sp_fee = pc.subtract(col("sp_commitment"), col("sp_used"))
        out = billed
        out = pc.if_else(is_("DiscountedUsage"), ri, out)
        out = pc.if_else(is_("SavingsPlanCoveredUsage"), sp, out)
        out = pc.if_else(is_("SavingsPlanNegation", "SavingsPlanUpfrontFee"), 0.0, out)
        out = pc.if_else(is_("RIFee"), ri_fee, out)
        out = pc.if_else(is_("SavingsPlanRecurringFee"), sp_fee, out)
        return out

    def _tags(self, path, fmt, spec, batch, rows, n):
        names = batch.schema.names
        out_types = [TAGS_TYPE, pa.string(), pa.string(), pa.string(), pa.string()]
        bad_rows: list[int] = []

        def parse_json(v):
            if v is None:
                return [], None, None, None, None
            tags = _tags_from_json(v)
            if tags is None:
                return None, None, None, None, None
            return list(tags.items()), *_known(tags)

        tag_col = next((c for c in spec.get("tags", []) if c in names), None)
        if tag_col is not None:
            arr = batch.column(names.index(tag_col))
            if pa.types.is_map(arr.type) or pa.types.is_list(arr.type) or pa.types.is_struct(arr.type):
                vals = []
                for v in arr.to_pylist():  # Parquet map / list<struct<key, value>>: per row
                    if isinstance(v, dict):
                        d = {_tag_key(str(k)): str(x) for k, x in v.items() if x is not None}
                    else:
                        d = {_tag_key(str(e[0] if isinstance(e, tuple) else e.get("key"))):
                             str(e[1] if isinstance(e, tuple) else e.get("value")) for e in (v or [])}
                    vals.append((list(d.items()), *_known(d)))
                cols = list(zip(*vals, strict=True)) if vals else [[]] * 5
                return [pa.array(list(c), t) for c, t in zip(cols, out_types, strict=True)]
            tags, *known = _by_distinct(arr, parse_json, out_types)
            unreadable = _mask(pc.is_null(tags))
            for i in np.flatnonzero(unreadable):
                bad_rows.append(i)
                self._issue(path, rows[i], tag_col, arr[i].as_py(), "Tags is not a JSON object; imported without tags",
                            False)
            if bad_rows:
                tags = pa.array([[] if u else t for u, t in zip(unreadable, tags.to_pylist(), strict=True)], TAGS_TYPE)
            return [tags, *known]
        # tags spread over columns: resourceTags/user:KEY (legacy CUR) or resource_tags_user_KEY (Athena CUR)
        tag_cols = [c for c in names if c.startswith(("resourceTags/", "resource_tags_"))]
        if not tag_cols:
            empty = pa.array([[]] * n, TAGS_TYPE)
            return [empty] + [pa.nulls(n, pa.string())] * 4
        pieces = []
        for c in tag_cols:
            key = _tag_key(c.split("/", 1)[1] if c.startswith("resourceTags/") else c[len("resource_tags_"):])
            v = _strings(batch.column(names.index(c)))
            pieces.append(pc.if_else(pc.fill_null(pc.not_equal(v, ""), False),
                                     pc.binary_join_element_wise(key, pc.fill_null(v, ""), "\x1f"), ""))
        joined = pc.binary_join_element_wise(*pieces, "\x1e") if len(pieces) > 1 else pieces[0]

        def parse_joined(v):
            d = dict(p.split("\x1f", 1) for p in (v or "").split("\x1e") if p)
            return list(d.items()), *_known(d)

        return _by_distinct(joined, parse_joined, out_types)


def _spec(fmt: str) -> dict:
    if fmt.startswith("focus"):
        return FOCUS_COLUMNS
    return CUR_SNAKE_COLUMNS if fmt == "aws-cur-2.0" else CUR_LEGACY_COLUMNS


def _wanted(spec: dict, header: list[str], fmt: str) -> list[str]:
    want = {c for cands in spec.values() for c in cands if c in header}
    if fmt.startswith("aws"):
        want |= {c for c in header if c.startswith(("resourceTags/", "resource_tags"))}
        want |= {c for c in CUR_SNAKE_COLUMNS["billing_account_id"] + CUR_LEGACY_COLUMNS["billing_account_id"]
                 if c in header}
    if "line_item_usage_start_date" in header:  # legacy CUR in Athena naming
        want |= {c for cands in CUR_SNAKE_COLUMNS.values() for c in cands if c in header}
    return [c for c in header if c in want]


def _provider(name: str | None) -> str:
    low = (name or "").strip().lower()
    for needle, short in (("amazon", "aws"), ("aws", "aws"), ("microsoft", "azure"), ("azure", "azure"),
                          ("google", "gcp"), ("gcp", "gcp"), ("oracle", "oci"), ("oci", "oci")):
        if needle in low:
            return short
    return low or "unknown"


def _category(v: str | None) -> str:
    for c in CHARGE_CATEGORIES:
        if v and v.strip().lower() == c.lower():
            return c
    return "Adjustment" if v else "Usage"


def read_bills(paths: Iterable[str | Path] | str | Path, catalog: GpuCatalog | None = None,
               batch_rows: int = 65_536, max_issues: int = 1000) -> BillReader:
    """Read one delivery of bill files (all parts of it together); iterate the result for chunks."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return BillReader(paths, catalog, batch_rows, max_issues)


def read_bill_table(paths, catalog: GpuCatalog | None = None) -> tuple[pa.Table, BillReader]:
    """The whole import as one table (small files and tests; large files: iterate `read_bills`)."""
    reader = read_bills(paths, catalog)
    chunks = [c.table for c in reader]
    return (pa.concat_tables(chunks) if chunks else BILL_SCHEMA.empty_table()), reader


def instance_key(resource_id: str | None) -> str:
    """The cloud instance id inside a bill's ResourceId, to join bill rows with agents' instance ids:
    AWS `arn:aws:ec2:REGION:ACCOUNT:instance/i-...` or `i-...` -> `i-...`; GCP
    `//compute.googleapis.com/projects/P/zones/Z/instances/ID` -> `ID`; Azure ARM paths are kept
    whole (IMDS gives the same path), lower-cased, as Azure ids are case-insensitive."""
    rid = (resource_id or "").strip()
    if not rid:
        return ""
    if rid.startswith("arn:") and ":instance/" in rid:
        return rid.rsplit("/", 1)[1]
    if rid.startswith("//compute.googleapis.com/"):
        return rid.rsplit("/", 1)[1]
    if rid.lower().startswith("/subscriptions/"):
        return rid.lower()
    return rid
