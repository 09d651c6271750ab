"""Prices: the shipped public catalog, effective-dated overrides, and per-GPU-hour prices.

A GPU-second costs (instance hourly price / GPUs of the instance) / 3600 unless a per-GPU-hour
price applies (owned hardware, GCP families priced per GPU, an OpenCost custom-pricing CSV).
Every priced row says which method priced it. Prices apply at query time, so correcting a
price corrects history.
"""

from __future__ import annotations

import bisect
import csv
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

CATALOG_SOURCE = ("public on-demand list prices (AWS Price List API, GCP Cloud Billing Catalog, Azure Retail "
                  "Prices API) via skypilot-catalog, snapshot about 2025")


@dataclass(frozen=True)
class Price:
    per_gpu_hour: float
    currency: str
    method: str  # instance_price/gpu_count | gpu_hour_price
    source: str


@dataclass(frozen=True)
class _Entry:
    effective_from_ms: int
    hourly: float
    gpu_count: int  # 0: per-GPU-hour price
    currency: str
    source: str


class PricingError(ValueError):
    pass


def _ms(value) -> int:
    if value in (None, ""):
        return 0
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError as e:
            raise PricingError(f"effective_from: cannot read {value!r} as an ISO 8601 date") from e
    if not isinstance(dt, datetime):  # a TOML date
        dt = datetime(dt.year, dt.month, dt.day)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


class Pricing:
    def __init__(self) -> None:
        self._instance: dict[tuple[str, str, str], list[_Entry]] = {}
        self._gpu: dict[tuple[str, str], list[_Entry]] = {}  # (scope, key): scope host | instance_type
        self.sources: list[str] = []

    # ------------------------------------------------------------------ loading
    @classmethod
    def default(cls, overrides_file: str | None = None) -> Pricing:
        p = cls()
        p.load_catalog_csv(resources.files("gpuledger.collector").joinpath("catalog/cloud-gpu-on-demand.csv")
                           .read_text(), CATALOG_SOURCE)
        if overrides_file:
            p.load_overrides(overrides_file)
        return p

    def _add(self, table: dict, key, entry: _Entry) -> None:
        rows = table.setdefault(key, [])
        rows[:] = [r for r in rows if r.effective_from_ms != entry.effective_from_ms]
        bisect.insort(rows, entry, key=lambda e: e.effective_from_ms)

    def load_catalog_csv(self, text: str, source: str) -> int:
        n = 0
        for i, row in enumerate(csv.DictReader(text.splitlines()), start=2):
            if row.get("purchase_option", "on_demand") != "on_demand":
                continue
            try:
                entry = _Entry(0, float(row["hourly_price"]), int(row["gpu_count"]), row.get("currency") or "USD",
                               source)
            except (KeyError, ValueError) as e:
                raise PricingError(f"catalog line {i}: {e}") from e
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
        """OpenCost custom pricing: rows with AssetClass=gpu give a per-GPU-hour price by instance type."""
        n = 0
        with open(path, newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh), start=2):
                if (row.get("AssetClass") or "").lower() != "gpu":
                    continue
                try:
                    price = float(row["MarketPriceHourly"])
                except (KeyError, ValueError) as e:
                    raise PricingError(f"{path} line {i}: MarketPriceHourly {e}") from e
                key = row.get("InstanceType") or row.get("InstanceID")
                if not key:
                    raise PricingError(f"{path} line {i}: needs InstanceType or InstanceID")
                scope = "instance_type" if row.get("InstanceType") else "host"
                self.set_gpu_price(scope, key, price, None, "USD", f"opencost {path}")
                n += 1
        return n

    # ------------------------------------------------------------------ lookup
    @staticmethod
    def _at(rows: list[_Entry] | None, at_ms: int) -> _Entry | None:
        if not rows:
            return None
        i = bisect.bisect_right([r.effective_from_ms for r in rows], at_ms) - 1
        return rows[i] if i >= 0 else None

    def price(self, provider: str, region: str, instance_type: str, gpu_count: int, host_id: str,
              at_ms: int) -> Price | None:
        for scope, key in (("host", host_id), ("instance_type", instance_type)):
            e = self._at(self._gpu.get((scope, key)), at_ms)
            if e is not None:
                return Price(e.hourly, e.currency, "gpu_hour_price", e.source)
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
