"""FOCUS conformance check for exports: the FinOps Foundation's focus-validator where it covers the
version, plus column rules of our own for what it does not cover.

    errors = validate_focus("gpu-2026-11.csv", "1.2")   # [] when valid

focus-validator (PyPI `focus-validator`, github.com/finopsfoundation/focus_validator):
  - 2.x (2.2.1; needs Python >= 3.12) bundles the rule model `model-1.2.0.1.json` and checks FOCUS
    1.2 offline with `--validate-version 1.2.0.1 --block-download`; every other version it would
    download from GitHub, so offline it checks 1.2 only. It reads CSV and Parquet.
  - 1.0.0 (Python 3.9-3.12, pandera 0.17, multimethod < 1.11) bundles rule sets for FOCUS 0.5,
    1.0-preview and 1.0, offline. Its "1.0" set still requires the 1.0-preview column names
    (`InvoiceIssuer`, `Provider`, `Publisher`, `ResourceID`; `SkuPriceId` keyed on `ChargeType`):
    those five rules are ignored here.
  Both read `currency_codes.csv` relative to the working directory, so they run from their
  site-packages folder. Neither is a dependency of gpuledger: they live in their own virtual
  environments, found by FOCUS_VALIDATOR_1_2 / FOCUS_VALIDATOR_1_0 (paths of the executables) or at
  .venv-focus/bin/focus-validator (2.2.1) and .venv-focus10/bin/focus-validator (1.0.0).
  focus-validator 2.2.1 reports `InvoiceId-C-004-C` ("InvoiceId MUST be NULL") for every non-null
  InvoiceId: one branch of an OR whose parent passes, a known artefact of its 1.2 model (FOCUS_Spec
  issue #2394, as the FinOps sample-data tooling notes); it and its twin C-005-C are ignored.

Our column rules, from the FOCUS specification text (FinOps-Open-Cost-and-Usage-Spec/FOCUS_Spec,
specification/attributes and columns) and the rule model above, for 1.0, 1.1 and 1.2:
  - the 21 mandatory columns (Column required: True in each column's page; `ColumnPresent` MUST
    rules without applicability criteria in model-1.2.0.1.json);
  - Numeric Format: numeric columns hold "integer or decimal values", no "exponent values", no "+"
    sign, no commas; a value with more significant digits than IEEE 754 double carries (16, the
    "Double" row of the Numeric Precision table) is float noise from binary arithmetic;
  - Date/Time Format: "extended ISO 8601 format with UTC offset ('YYYY-MM-DDTHH:mm:ssZ')"; in
    Parquet a timestamp type (UTC), not strings;
  - Key-Value Format (Tags): "a serialized JSON string, consistent with the ECMA 404 definition of
    an object"; values "number, string, boolean, or null", not objects or arrays;
  - allowed values of ChargeCategory, ChargeClass, ChargeFrequency, PricingCategory,
    CommitmentDiscountCategory, CommitmentDiscountStatus, CapacityReservationStatus,
    ServiceCategory; ISO 4217 codes in BillingCurrency / PricingCurrency;
  - not null: the columns the spec marks "Allows nulls: False";
  - Parquet: no column of Arrow type null (a column written without a type).
Nulls in CSV: an empty cell or the literal NULL.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent

MANDATORY = ["BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency", "BillingPeriodEnd",
             "BillingPeriodStart", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargePeriodEnd",
             "ChargePeriodStart", "ContractedCost", "EffectiveCost", "InvoiceIssuerName", "ListCost",
             "PricingQuantity", "PricingUnit", "ProviderName", "PublisherName", "ServiceCategory", "ServiceName"]
NUMERIC = ["BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "ListUnitPrice", "ContractedUnitPrice",
           "PricingQuantity", "ConsumedQuantity", "CommitmentDiscountQuantity", "PricingCurrencyContractedUnitPrice",
           "PricingCurrencyEffectiveCost", "PricingCurrencyListUnitPrice"]
DATETIME = ["BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd"]
NOT_NULL = ["BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "BillingAccountId", "BillingCurrency",
            "BillingPeriodStart", "BillingPeriodEnd", "ChargeCategory", "ChargePeriodStart", "ChargePeriodEnd",
            "InvoiceIssuerName", "ProviderName", "PublisherName", "ServiceCategory", "ServiceName"]
SERVICE_CATEGORIES = ["AI and Machine Learning", "Analytics", "Business Applications", "Compute", "Databases",
                      "Developer Tools", "Multicloud", "Identity", "Integration", "Internet of Things",
                      "Management and Governance", "Media", "Migration", "Mobile", "Networking", "Security",
                      "Storage", "Web", "Other"]
ALLOWED = {
    "ChargeCategory": {"Usage", "Purchase", "Tax", "Credit", "Adjustment"},
    "ChargeClass": {"Correction"},
    "ChargeFrequency": {"One-Time", "Recurring", "Usage-Based"},
    "PricingCategory": {"Standard", "Dynamic", "Committed", "Other"},
    "CommitmentDiscountCategory": {"Spend", "Usage"},
    "CommitmentDiscountStatus": {"Used", "Unused"},
    "CapacityReservationStatus": {"Used", "Unused"},
    "ServiceCategory": set(SERVICE_CATEGORIES),
}
VERSIONS = ("1.0", "1.1", "1.2")
_NUMBER = re.compile(r"^-?(?:\d+(?:\.\d+)?|\.\d+)$")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
# focus-validator 1.0.0's "1.0" rule set still uses 1.0-preview names (InvoiceIssuer, Provider, Publisher,
# ResourceID; SkuPriceId keyed on ChargeType, renamed ChargeCategory in 1.0): those rules are ignored.
VALIDATOR_IGNORED = {"1.2": {"InvoiceId-C-004-C", "InvoiceId-C-005-C"},
                     "1.0": {"InvoiceIssuer_Required", "Provider_Required", "Publisher_Required",
                             "ResourceID_Required", "SkuPriceId_Nullable"}}


def _significant_digits(text: str) -> int:
    digits = text.lstrip("-").replace(".", "").lstrip("0")
    return len(digits.rstrip("0")) if "." in text else len(digits)


class _Findings:
    """Errors grouped by column and rule, with a count and the first example."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], list] = defaultdict(list)

    def add(self, column: str, rule: str, where: str, value) -> None:
        self.items[(column, rule)].append((where, value))

    def messages(self) -> list[str]:
        out = []
        for (column, rule), hits in sorted(self.items.items()):
            where, value = hits[0]
            example = f"; first at {where}: {value!r}" if where else ""
            out.append(f"{column}: {rule} ({len(hits)} value(s){example})" if where else f"{column}: {rule}")
        return out


def column_rule_errors(path: str | Path, version: str = "1.2") -> list[str]:
    """Our own FOCUS column rules (see the module docstring) for a CSV or Parquet file."""
    if version not in VERSIONS:
        raise ValueError(f"FOCUS version {version!r}: column rules cover {', '.join(VERSIONS)}")
    path = Path(path)
    f = _Findings()
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        columns = table.schema.names
        for name in columns:
            t = table.schema.field(name).type
            if pa.types.is_null(t):
                f.add(name, "has Arrow type null: a column written without a type (write it with its FOCUS type)",
                      "", None)
            elif name in DATETIME and not pa.types.is_timestamp(t):
                f.add(name, f"is {t}, not a timestamp: date/times in Parquet are timestamps (DateTimeFormat)", "",
                      None)
            elif name in DATETIME and t.tz not in ("UTC", "+00:00", "Etc/UTC"):
                f.add(name, f"timestamp zone {t.tz!r}: FOCUS date/times are UTC", "", None)
            elif name in NUMERIC and not (pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_integer(t)):
                f.add(name, f"is {t}, not numeric (NumericFormat)", "", None)
        rows = ({k: (None if v is None else v) for k, v in r.items()} for r in table.to_pylist())
        where_of = "row {}".format
        typed = True
    else:
        fh = open(path, newline="", encoding="utf-8-sig")
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        rows = ({k: (None if v in ("", "NULL") else v) for k, v in r.items()} for r in reader)
        where_of = "line {}".format
        typed = False
    for c in MANDATORY:
        if c not in columns:
            f.add(c, "mandatory column missing", "", None)
    first = 2 if not typed else 1
    for i, r in enumerate(rows, start=first):
        where = where_of(i)
        for c in NOT_NULL:
            if c in r and r[c] is None:
                f.add(c, "null where the spec allows none", where, None)
        for c in NUMERIC:
            v = r.get(c)
            if v is None:
                continue
            text = repr(v) if typed and isinstance(v, float) else str(v)
            if typed and isinstance(v, float):
                text = repr(v)
                if "e" in text or "E" in text:
                    continue  # a binary float in Parquet: its repr is not the stored value's format
            if not typed and not _NUMBER.match(text):
                f.add(c, "not a plain integer or decimal (NumericFormat: no exponent, sign, comma or unit)", where,
                      text)
            elif _significant_digits(text) > 16:
                f.add(c, "more significant digits than a double carries: float noise (NumericFormat precision)",
                      where, text)
        if not typed:
            for c in DATETIME:
                v = r.get(c)
                if v is not None and not _DATETIME.match(v):
                    f.add(c, "not 'YYYY-MM-DDTHH:mm:ssZ' (DateTimeFormat)", where, v)
        for c, allowed in ALLOWED.items():
            v = r.get(c)
            if v is not None and v not in allowed:
                f.add(c, "value not allowed", where, v)
        for c in ("BillingCurrency", "PricingCurrency"):
            v = r.get(c)
            if v is not None and not _CURRENCY.match(str(v)):
                f.add(c, "not an ISO 4217 currency code", where, v)
        tags = r.get("Tags")
        if tags is not None:
            try:
                doc = json.loads(tags) if isinstance(tags, str) else tags
            except ValueError:
                doc = tags
            if not isinstance(doc, dict):
                f.add("Tags", "not a serialized JSON object (KeyValueFormat)", where, tags)
            elif any(isinstance(x, (dict, list)) for x in doc.values()):
                f.add("Tags", "a value is an object or array (KeyValueFormat)", where, tags)
    if not typed:
        fh.close()
    return f.messages()


# --------------------------------------------------------------------------- focus-validator


def _validator(version: str) -> str | None:
    env = os.environ.get("FOCUS_VALIDATOR_" + version.replace(".", "_"))
    default = {"1.2": ROOT / ".venv-focus" / "bin" / "focus-validator",
               "1.0": ROOT / ".venv-focus10" / "bin" / "focus-validator"}.get(version)
    for cand in (env, default):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def validator_available(version: str) -> bool:
    return _validator(version) is not None


def run_focus_validator(path: str | Path, version: str, timeout_s: float = 300) -> list[str] | None:
    """focus-validator's failed rules for `path` (None: no validator for this version here)."""
    exe = _validator(version)
    if exe is None:
        return None
    site = glob.glob(str(Path(exe).parent.parent / "lib" / "python3*" / "site-packages"))
    cwd = site[0] if site else None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(path).resolve()
        if version == "1.2" and data.suffix != ".parquet":
            data = _typed_parquet(data, Path(tmp) / "typed.parquet")
        return _run(exe, data, version, cwd, timeout_s)


def _typed_parquet(csv_path: Path, out: Path) -> Path:
    """A CSV carries no types, and focus-validator 2.x infers them: an all-digit BillingAccountId
    (every AWS account) becomes a number and fails "MUST be of type String". Its copy here has the
    FOCUS types: strings, numeric columns as float64 and date/times as UTC timestamps where every
    value converts (a column that does not stays text, and is reported)."""
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh))
    t = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(
        column_types={c: pa.string() for c in header}, null_values=["", "NULL"], strings_can_be_null=True))
    cols = {}
    for name in t.column_names:
        col = t[name]
        try:
            if name in NUMERIC:
                col = pc.cast(col, pa.float64())
            elif name in DATETIME:
                col = pc.cast(pc.cast(pc.replace_substring_regex(col, "Z$", ""), pa.timestamp("s")),
                              pa.timestamp("s", tz="UTC"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        cols[name] = col
    pq.write_table(pa.table(cols), out)
    return out


def _run(exe: str, data: Path, version: str, cwd, timeout_s: float) -> list[str]:
    args = [exe, "--data-file", str(data)]
    args += ["--validate-version", "1.2.0.1", "--block-download"] if version == "1.2" else \
        ["--validate-version", version]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=timeout_s,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    out = proc.stdout
    if proc.returncode != 0 and not out.strip():
        return [f"focus-validator failed to run: {proc.stderr.strip().splitlines()[-1:]}"]
    errors = []
    if version == "1.2":
        for line in out.splitlines():
            m = re.match(r"^\S*\s*([A-Za-z]+-[A-Z]-\d{3}-[A-Z]): FAIL\s+\((.*)\)\s*$", line.strip())
            if m and m.group(1) not in VALIDATOR_IGNORED["1.2"]:
                msg = re.search(r"msg=(.*?)(?:, [\d.]+ms)?$", m.group(2))
                errors.append(f"focus-validator {m.group(1)}: {msg.group(1) if msg else m.group(2)}")
        if "=== Validation Results ===" not in out:
            errors.append("focus-validator produced no results: " + (proc.stderr.strip().splitlines() or [""])[-1])
    else:
        for m in re.finditer(r"^(\S+) failed:\n\tDescription: (.*)\n\tRows: (.*)\n", out, re.MULTILINE):
            if m.group(1) not in VALIDATOR_IGNORED["1.0"]:
                errors.append(f"focus-validator {m.group(1)}: {m.group(2).strip()} (rows {m.group(3)})")
    return errors


def validate_focus(path: str | Path, version: str) -> list[str]:
    """Every error found in a FOCUS file: focus-validator's (where it covers the version and is
    installed) and our column rules'. Empty when the file is valid."""
    errors = column_rule_errors(path, version)
    found = run_focus_validator(path, version) if version in ("1.0", "1.2") else None
    return errors + (found or [])
