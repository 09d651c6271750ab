"""Prices: the shipped public catalog, effective-dated overrides, per-GPU-hour prices, OpenCost CSV.

A GPU-second costs (instance hourly price / GPUs of the instance) / 3600 unless a per-GPU-hour
price applies (owned hardware, GCP families priced per GPU, an OpenCost custom-pricing CSV).
Every priced row says which method priced it. Prices apply at query time, so correcting a
price corrects history.

Order of precedence for one host at one instant (the first that matches wins):
  1. a `[[gpu]] host_id = ...` override (per GPU-hour, effective-dated);
  2. OpenCost custom-pricing rows matched to this host (see `load_opencost_csv`);
  3. a `[[gpu]] instance_type = ...` override, or an OpenCost GPU row keyed by InstanceType;
  4. an OpenCost node row keyed by InstanceType (+ Region): OpenCost's "class" price;
  5. an `[[instance]]` override or the shipped catalog row for (provider, region, instance type).

The shipped catalog's provenance (snapshot date, commits) lives beside it in
`catalog/snapshot.csv`; `scripts/refresh_catalog.py` replaces both after `validate_catalog_csv`.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from gpuledger.clock import iso_utc

CATALOG_FILE = "catalog/cloud-gpu-on-demand.csv"
SNAPSHOT_FILE = "catalog/snapshot.csv"
CATALOG_COLUMNS = ["provider", "region", "instance_type", "gpu_count", "gpu_model", "gpu_memory_gb",
                   "purchase_option", "currency", "hourly_price", "source", "source_note"]
PROVIDERS = ("aws", "gcp", "azure", "oci", "onprem")


def _snapshot() -> dict[str, str]:
    try:
        text = resources.files("gpuledger.collector").joinpath(SNAPSHOT_FILE).read_text()
    except (FileNotFoundError, OSError):
        return {}
    return {r["key"]: r["value"] for r in csv.DictReader(io.StringIO(text))}


CATALOG_SNAPSHOT = _snapshot()
CATALOG_SNAPSHOT_DATE = CATALOG_SNAPSHOT.get("snapshot_date", "")
CATALOG_SOURCE = ("public on-demand list prices (AWS Price List API, GCP Cloud Billing Catalog, Azure Retail "
                  "Prices API) via skypilot-catalog, snapshot "
                  + (CATALOG_SNAPSHOT.get("snapshot_label") or CATALOG_SNAPSHOT_DATE or "of unknown date"))


@dataclass(frozen=True)
class Price:
    per_gpu_hour: float
    currency: str
    method: str  # instance_price/gpu_count | gpu_hour_price | instance_price/gpu_count+gpu_hour_price
    source: str


@dataclass(frozen=True)
class _Entry:
    effective_from_ms: int
    hourly: float
    gpu_count: int  # 0: per-GPU-hour price
    currency: str
    source: str


@dataclass(frozen=True)
class OpenCostRow:
    """One row of an OpenCost custom-pricing CSV, as OpenCost's CSV provider reads it.

    asset_class: node | gpu (pv and others are not GPU prices and are skipped).
    match_field: InstanceIDField: which attribute of a node carries `instance_id`:
      node rows: `spec.providerID` (the cloud instance id), `metadata.name` (the node name: our
      host_id), `metadata.labels.<key>` / `metadata.annotations.<key>` (a host tag);
      gpu rows: the node label holding the GPU class (`nvidia.com/gpu_type`, `gpu.nvidia.com/class`):
      hosts whose tag of that name equals `instance_id` get this per-GPU-hour price.
    """

    asset_class: str
    instance_id: str
    match_field: str
    region: str
    instance_type: str
    hourly: float
    end_timestamp_ms: int
    line: int
    source: str


class PricingError(ValueError):
    pass


def _ms(value, what: str = "effective_from") -> int:
    if value in (None, ""):
        return 0
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip()
        if text.endswith(" UTC"):
            text = text[:-4]
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as e:
            raise PricingError(f"{what}: cannot read {value!r} as an ISO 8601 date") from e
    if not isinstance(dt, datetime):  # a TOML date
        dt = datetime(dt.year, dt.month, dt.day)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _iso(ms: int) -> str:
    return iso_utc(ms) if ms else ""


def _provider_id(value: str) -> str:
    """The instance id inside a Kubernetes providerID, as OpenCost compares it (lower case):
    aws:///us-east-1a/i-0abc -> i-0abc; gce://project/zone/name -> name; azure://... kept whole."""
    v = value.strip().lower()
    m = re.fullmatch(r"aws:///[^/]+/([^/]+)", v)
    if m:
        return m.group(1)
    if v.startswith("gce://"):
        return v.rsplit("/", 1)[-1]
    return v.removeprefix("azure://")


def validate_catalog_csv(text: str, where: str = "catalog") -> list[dict]:
    """Check a price catalog CSV (the shipped one or a refresh) and return its rows, typed.

    Every problem is named by line and column; the first is raised as PricingError."""
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in CATALOG_COLUMNS if c not in header]
    if missing:
        raise PricingError(f"{where} line 1: missing column(s) {', '.join(missing)} "
                           f"(expected {','.join(CATALOG_COLUMNS)})")
    out, seen = [], {}
    for i, row in enumerate(reader, start=2):
        def bad(col: str, msg: str, line: int = i) -> PricingError:
            return PricingError(f"{where} line {line}, column {col}: {msg}")

        if None in row:
            raise bad("-", f"{len(header) + len(row[None])} cells, header has {len(header)}")
        if row["provider"] not in PROVIDERS:
            raise bad("provider", f"{row['provider']!r} is not one of {', '.join(PROVIDERS)}")
        for col in ("region", "instance_type"):
            if not row[col].strip():
                raise bad(col, "empty")
        try:
            gpus = int(row["gpu_count"])
        except ValueError:
            raise bad("gpu_count", f"{row['gpu_count']!r} is not a whole number") from None
        if gpus <= 0:
            raise bad("gpu_count", f"must be > 0, got {gpus}")
        try:
            hourly = float(row["hourly_price"])
        except ValueError:
            raise bad("hourly_price", f"{row['hourly_price']!r} is not a number") from None
        if not (math.isfinite(hourly) and hourly > 0):
            raise bad("hourly_price", f"must be a positive number, got {row['hourly_price']!r}")
        if not re.fullmatch(r"[A-Z]{3}", row["currency"] or ""):
            raise bad("currency", f"{row['currency']!r} is not an ISO 4217 code")
        if row["purchase_option"] not in ("on_demand", "spot", "reserved", "savings_plan", "committed_use"):
            raise bad("purchase_option", f"{row['purchase_option']!r} is not a known purchase option")
        key = (row["provider"], row["region"], row["instance_type"], row["purchase_option"])
        if key in seen:
            raise bad("instance_type", f"duplicate of line {seen[key]} ({', '.join(key)})")
        seen[key] = i
        out.append({**row, "gpu_count": gpus, "hourly_price": hourly, "line": i})
    if not out:
        raise PricingError(f"{where}: no price rows")
    return out


def catalog_diff(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows changed, added or removed between two validated catalogs (by provider, region, type, option)."""
    def key(r):
        return r["provider"], r["region"], r["instance_type"], r["purchase_option"]

    a, b = {key(r): r for r in old}, {key(r): r for r in new}
    out = []
    for k in sorted(a.keys() | b.keys()):
        was, now = a.get(k), b.get(k)
        if was and now and (was["hourly_price"], was["gpu_count"]) == (now["hourly_price"], now["gpu_count"]):
            continue
        change = "added" if was is None else "removed" if now is None else "changed"
        old_p = was["hourly_price"] if was else None
        new_p = now["hourly_price"] if now else None
        out.append({"provider": k[0], "region": k[1], "instance_type": k[2], "purchase_option": k[3],
                    "change": change, "old_hourly_price": old_p, "new_hourly_price": new_p,
                    "change_pct": round((new_p - old_p) / old_p * 100, 1) if old_p and new_p else None})
    return out


class Pricing:
    def __init__(self) -> None:
        self._instance: dict[tuple[str, str, str], list[_Entry]] = {}
        self._gpu: dict[tuple[str, str], list[_Entry]] = {}  # (scope, key): scope host | instance_type
        self._opencost: list[OpenCostRow] = []
        self.sources: list[str] = []

    # ------------------------------------------------------------------ loading
    @classmethod
    def default(cls, overrides_file: str | None = None) -> Pricing:
        p = cls()
        p.load_catalog_csv(resources.files("gpuledger.collector").joinpath(CATALOG_FILE).read_text(), CATALOG_SOURCE)
        if overrides_file:
            p.load_overrides(overrides_file)
        return p

    def _add(self, table: dict, key, entry: _Entry) -> None:
        rows = table.setdefault(key, [])
        rows[:] = [r for r in rows if r.effective_from_ms != entry.effective_from_ms]
        bisect.insort(rows, entry, key=lambda e: e.effective_from_ms)

    def load_catalog_csv(self, text: str, source: str) -> int:
        n = 0
        for row in validate_catalog_csv(text):
            if row["purchase_option"] != "on_demand":
                continue
            entry = _Entry(0, row["hourly_price"], row["gpu_count"], row["currency"], source)
            self._add(self._instance, (row["provider"], row["region"], row["instance_type"]), entry)
            n += 1
        self.sources.append(source)
        return n

    def set_instance_price(self, provider: str, region: str, instance_type: str, hourly: float, gpu_count: int,
                           effective_from=None, currency: str = "USD", source: str = "override") -> None:
        if hourly < 0 or gpu_count <= 0:
            raise PricingError(f"price for {instance_type}: hourly_price must be >= 0 and gpu_count > 0")
        self._add(self._instance, (provider, region, instance_type),
                  _Entry(_ms(effective_from), float(hourly), int(gpu_count), currency, source))

    def set_gpu_price(self, scope: str, key: str, per_gpu_hour: float, effective_from=None, currency: str = "USD",
                      source: str = "override") -> None:
        if scope not in ("host", "instance_type"):
            raise PricingError(f"gpu price scope {scope!r}: must be host or instance_type")
        self._add(self._gpu, (scope, key), _Entry(_ms(effective_from), float(per_gpu_hour), 0, currency, source))

    def load_overrides(self, path: str) -> None:
        """TOML: [[instance]] provider, region, instance_type, hourly_price, gpu_count, effective_from;
        [[gpu]] host_id or instance_type, gpu_hourly_price, effective_from; opencost_csv = "file"."""
        try:
            doc = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise PricingError(f"pricing file {path}: {e}") from e
        for i, row in enumerate(doc.get("instance", [])):
            try:
                self.set_instance_price(row["provider"], row["region"], row["instance_type"],
                                        row["hourly_price"], row["gpu_count"], row.get("effective_from"),
                                        row.get("currency", "USD"), f"override {path}")
            except KeyError as e:
                raise PricingError(f"pricing file {path}: instance[{i}] lacks {e}") from e
        for i, row in enumerate(doc.get("gpu", [])):
            scope = "host" if "host_id" in row else "instance_type"
            key = row.get("host_id") or row.get("instance_type")
            if not key or "gpu_hourly_price" not in row:
                raise PricingError(f"pricing file {path}: gpu[{i}] needs host_id or instance_type and gpu_hourly_price")
            self.set_gpu_price(scope, key, row["gpu_hourly_price"], row.get("effective_from"),
                               row.get("currency", "USD"), f"override {path}")
        if "opencost_csv" in doc:
            self.load_opencost_csv(Path(path).parent / doc["opencost_csv"])
        self.sources.append(f"overrides {Path(path).name}")

    def load_opencost_csv(self, path) -> int:
        """OpenCost custom pricing (`EndTimestamp,InstanceID,Region,AssetClass,InstanceIDField,
        InstanceType,MarketPriceHourly,Version`), read as OpenCost's CSV provider reads it
        (opencost/opencost pkg/cloud/provider/csvprovider.go; Kubecost's "CSV pricing" page):

        - AssetClass=node: an hourly price for a whole node. InstanceIDField says which node
          attribute InstanceID names: `spec.providerID` (our instance_id, the cloud instance id;
          `aws:///zone/i-...` is reduced to `i-...` as OpenCost does), `metadata.name` (our host_id),
          `metadata.labels.K` / `metadata.annotations.K` (the host tag K). Per GPU-hour: hourly /
          the host's GPUs. A node row with InstanceType (and Region) also prices, as OpenCost's
          "class" fallback, hosts of that type with no exact match: the mean of such rows.
        - AssetClass=gpu: a per-GPU-hour price for GPUs whose node label InstanceIDField (e.g.
          `nvidia.com/gpu_type`) has the value InstanceID: here, hosts whose tag of that name has
          that value (compared in lower case, as OpenCost does). OpenCost adds it to the node's
          price, so a host matched by both pays node/GPUs + GPU price per GPU-hour. A gpu row with
          InstanceType and no InstanceID prices that instance type per GPU-hour (gpuledger's own use).
        - Region: when set, the row matches only hosts in that region (lower case); rows with a
          region are preferred to rows without, as OpenCost looks up "region,id" before "id".
        - EndTimestamp: OpenCost reads it and does not use it ("currently unused" in Kubecost's
          docs). Here it must parse when present, is shown by `gpuledger pricing`, and decides
          between rows for the same asset: the later EndTimestamp wins (equal: the later line,
          as in OpenCost, where the last row read wins). It does not end a price's validity.
        - pv and other asset classes price no GPU and are skipped.
        """
        n = 0
        rows: dict[tuple, OpenCostRow] = {}
        try:
            fh = open(path, newline="")
        except OSError as e:
            raise PricingError(f"opencost csv {path}: {e}") from e
        with fh:
            reader = csv.DictReader(fh)
            need = ["AssetClass", "InstanceID", "MarketPriceHourly"]
            missing = [c for c in need if c not in (reader.fieldnames or [])]
            if missing:
                raise PricingError(f"{path} line 1: missing column(s) {', '.join(missing)}")
            for i, row in enumerate(reader, start=2):
                cells = [v for k, v in row.items() if k is not None and v is not None] + row.get(None, [])
                if None in row or any(v is None for v in row.values()):
                    if len(cells) == 1:
                        continue  # a one-cell line ('# comment'), which OpenCost skips too
                    raise PricingError(f"{path} line {i}: {len(cells)} cells, the header has "
                                       f"{len(reader.fieldnames or [])}")
                asset = (row.get("AssetClass") or "").strip().lower()
                if asset not in ("node", "gpu"):
                    continue
                try:
                    price = float(row["MarketPriceHourly"])
                except ValueError:
                    raise PricingError(f"{path} line {i}, column MarketPriceHourly: "
                                       f"{row['MarketPriceHourly']!r} is not a number") from None
                if not (math.isfinite(price) and price >= 0):
                    raise PricingError(f"{path} line {i}, column MarketPriceHourly: must be >= 0")
                try:
                    end_ms = _ms(row.get("EndTimestamp"), "EndTimestamp")
                except PricingError as e:
                    raise PricingError(f"{path} line {i}, column {e}") from None
                iid = (row.get("InstanceID") or "").strip()
                field = (row.get("InstanceIDField") or "").strip()
                itype = (row.get("InstanceType") or "").strip()
                region = (row.get("Region") or "").strip().lower()
                if not iid and not itype:
                    raise PricingError(f"{path} line {i}: needs InstanceID (with InstanceIDField) or InstanceType")
                if iid:
                    if not field:
                        raise PricingError(f"{path} line {i}, column InstanceIDField: empty; it names the node "
                                           f"field that holds InstanceID {iid!r}")
                    if asset == "node" and not (field in ("spec.providerID", "metadata.name") or
                                                field.startswith(("metadata.labels.", "metadata.annotations."))):
                        raise PricingError(f"{path} line {i}, column InstanceIDField: {field!r} is not "
                                           "spec.providerID, metadata.name, metadata.labels.KEY or "
                                           "metadata.annotations.KEY")
                r = OpenCostRow(asset, iid, field, region, itype, price, end_ms, i, f"opencost {Path(path).name}")
                key = (asset, iid.lower(), field, region, itype if not iid else "")
                prev = rows.get(key)
                if prev is None or r.end_timestamp_ms >= prev.end_timestamp_ms:
                    rows[key] = r
                n += 1
        self._opencost.extend(rows.values())
        return n

    # ------------------------------------------------------------------ lookup
    @staticmethod
    def _at(rows: list[_Entry] | None, at_ms: int) -> _Entry | None:
        if not rows:
            return None
        i = bisect.bisect_right([r.effective_from_ms for r in rows], at_ms) - 1
        return rows[i] if i >= 0 else None

    @staticmethod
    def _node_value(field: str, host_id: str, instance_id: str, tags: Mapping[str, str]) -> str:
        if field == "spec.providerID":
            return _provider_id(instance_id) if instance_id else ""
        if field == "metadata.name":
            return host_id.lower()
        for prefix in ("metadata.labels.", "metadata.annotations."):
            if field.startswith(prefix):
                return str(tags.get(field[len(prefix):], "")).lower()
        return ""

    def _opencost_match(self, region: str, instance_type: str, host_id: str, instance_id: str,
                        tags: Mapping[str, str]) -> tuple[OpenCostRow | None, OpenCostRow | None]:
        """The best node row and gpu row that name this host (region-specific rows first)."""
        region = region.lower()
        best: dict[str, tuple[int, int, OpenCostRow]] = {}
        for r in self._opencost:
            if not r.instance_id or (r.region and r.region != region):
                continue
            if r.asset_class == "node":
                want = self._node_value(r.match_field, host_id, instance_id, tags)
                hit = bool(want) and want == (_provider_id(r.instance_id) if r.match_field == "spec.providerID"
                                              else r.instance_id.lower())
            else:
                hit = str(tags.get(r.match_field, "")).lower() == r.instance_id.lower() != ""
            if hit:
                rank = (1 if r.region else 0, r.line)
                if r.asset_class not in best or rank > best[r.asset_class][:2]:
                    best[r.asset_class] = (*rank, r)
        return (best["node"][2] if "node" in best else None, best["gpu"][2] if "gpu" in best else None)

    def _opencost_class(self, asset: str, region: str, instance_type: str) -> tuple[float, str] | None:
        """OpenCost's class price: rows keyed by InstanceType (and Region), averaged."""
        region = region.lower()
        for want_region in (region, ""):
            hits = [r for r in self._opencost if r.asset_class == asset and r.instance_type == instance_type
                    and r.region == want_region and (asset == "node" or not r.instance_id)]
            if hits:
                return sum(r.hourly for r in hits) / len(hits), hits[0].source
        return None

    def price(self, provider: str, region: str, instance_type: str, gpu_count: int, host_id: str,
              at_ms: int, *, tags: Mapping[str, str] | None = None, instance_id: str = "") -> Price | None:
        """The per-GPU-hour price of one host's GPU at `at_ms`; `tags` (the host's owner tags) and
        `instance_id` (the cloud instance id) let OpenCost rows keyed by label or providerID match."""
        tags = tags or {}
        gpus = gpu_count or 1
        e = self._at(self._gpu.get(("host", host_id)), at_ms)
        if e is not None:
            return Price(e.hourly, e.currency, "gpu_hour_price", e.source)
        if self._opencost:
            node, gpu = self._opencost_match(region, instance_type, host_id, instance_id, tags)
            if node is not None and gpu is not None:
                return Price(node.hourly / gpus + gpu.hourly, "USD", "instance_price/gpu_count+gpu_hour_price",
                             f"{node.source} lines {node.line},{gpu.line}")
            if node is not None:
                return Price(node.hourly / gpus, "USD", "instance_price/gpu_count", f"{node.source} line {node.line}")
            if gpu is not None:
                return Price(gpu.hourly, "USD", "gpu_hour_price", f"{gpu.source} line {gpu.line}")
        e = self._at(self._gpu.get(("instance_type", instance_type)), at_ms)
        if e is not None:
            return Price(e.hourly, e.currency, "gpu_hour_price", e.source)
        if self._opencost:
            cls_gpu = self._opencost_class("gpu", region, instance_type)
            if cls_gpu is not None:
                return Price(cls_gpu[0], "USD", "gpu_hour_price", cls_gpu[1])
            cls_node = self._opencost_class("node", region, instance_type)
            if cls_node is not None:
                return Price(cls_node[0] / gpus, "USD", "instance_price/gpu_count", cls_node[1])
        e = self._at(self._instance.get((provider, region, instance_type)), at_ms)
        if e is None:
            return None
        gpus = e.gpu_count or gpu_count or 1
        return Price(e.hourly / gpus, e.currency, "instance_price/gpu_count", e.source)

    def breakpoints(self) -> list[int]:
        """Every instant at which some price changes."""
        out = set()
        for table in (self._instance, self._gpu):
            for rows in table.values():
                out.update(r.effective_from_ms for r in rows if r.effective_from_ms > 0)
        return sorted(out)

    def catalog_rows(self) -> list[dict]:
        out = []
        for (provider, region, itype), rows in sorted(self._instance.items()):
            for e in rows:
                out.append({"provider": provider, "region": region, "instance_type": itype,
                            "gpu_count": e.gpu_count, "hourly_price": e.hourly, "currency": e.currency,
                            "effective_from_ms": e.effective_from_ms, "source": e.source})
        return out

    def all_rows(self) -> list[dict]:
        """Every price in force, of every kind, one dict each with the same keys:

        kind: catalog | instance_override (per instance-hour, by provider/region/type);
              gpu_override (per GPU-hour, by host_id or instance_type);
              opencost_node | opencost_gpu (OpenCost custom-pricing rows).
        match: what a host must have for the row to apply (host_id=..., instance_type=...,
               instance_id=..., tag K=V); per_gpu_hour: the price per GPU-hour where it is
               known without the host (instance rows: hourly / gpu_count; node rows: None).
        """
        out = []
        for (provider, region, itype), rows in sorted(self._instance.items()):
            for e in rows:
                out.append(self._row("catalog" if e.source == CATALOG_SOURCE else "instance_override", provider,
                                     region, itype, f"instance_type={itype}", e.gpu_count, e.hourly,
                                     e.hourly / e.gpu_count, e.currency, e.effective_from_ms, e.source))
        for (scope, key), rows in sorted(self._gpu.items()):
            for e in rows:
                out.append(self._row("gpu_override", "", "", key if scope == "instance_type" else "",
                                     f"{'host_id' if scope == 'host' else scope}={key}", None, None, e.hourly, e.currency, e.effective_from_ms,
                                     e.source))
        for r in sorted(self._opencost, key=lambda r: (r.source, r.line)):
            if r.instance_id:
                if r.asset_class == "gpu" or r.match_field.startswith(("metadata.labels.", "metadata.annotations.")):
                    tag = r.match_field.split(".", 2)[-1] if r.asset_class == "node" else r.match_field
                    match = f"tag {tag}={r.instance_id}"
                else:
                    match = {"spec.providerID": "instance_id", "metadata.name": "host_id"}[r.match_field] \
                        + f"={r.instance_id}"
            else:
                match = f"instance_type={r.instance_type}"
            row = self._row(f"opencost_{r.asset_class}", "", r.region, r.instance_type, match, None,
                            r.hourly if r.asset_class == "node" else None,
                            r.hourly if r.asset_class == "gpu" else None, "USD", 0, f"{r.source} line {r.line}")
            row["end_timestamp"] = _iso(r.end_timestamp_ms)
            out.append(row)
        return out

    @staticmethod
    def _row(kind, provider, region, itype, match, gpu_count, hourly, per_gpu_hour, currency, eff_ms, source):
        return {"kind": kind, "provider": provider, "region": region, "instance_type": itype, "match": match,
                "gpu_count": gpu_count, "hourly_price": hourly, "per_gpu_hour": per_gpu_hour, "currency": currency,
                "effective_from": _iso(eff_ms), "end_timestamp": "", "source": source}
