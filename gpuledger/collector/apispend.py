"""AI API spend: OpenAI and Anthropic Admin API cost and usage reports, as JSON pages or flattened CSV/TSV.

Shapes read (as documented by each vendor; fixtures in tests/fixtures/apispend follow them):

OpenAI Admin API (platform.openai.com/docs/api-reference, "Usage" and "Costs"):
  GET /v1/organization/costs and /v1/organization/usage/{completions,embeddings,images,
  audio_speeches,audio_transcriptions,moderations,vector_stores,code_interpreter_sessions}
  return a page `{"object": "page", "data": [bucket...], "has_more", "next_page"}`; a bucket is
  `{"object": "bucket", "start_time": <unix s>, "end_time": <unix s>, "results": [...]}`.
  Cost results: `{"object": "organization.costs.result", "amount": {"value": <number>,
  "currency": "usd"}, "line_item", "project_id"}` (amount in currency units, currency lower case).
  Usage results: `{"object": "organization.usage.<endpoint>.result", ...}` with the counts of that
  endpoint (completions: input_tokens, output_tokens, input_cached_tokens, input_audio_tokens,
  output_audio_tokens, num_model_requests; embeddings/moderations: input_tokens; images: images;
  audio_speeches: characters; audio_transcriptions: seconds; vector_stores: usage_bytes;
  code_interpreter_sessions: num_sessions) and the group_by fields project_id, user_id,
  api_key_id, model, batch (null when not grouped).

Anthropic Admin API (platform.claude.com/docs/en/api/admin, "Usage and Cost"):
  GET /v1/organizations/cost_report and /v1/organizations/usage_report/messages return
  `{"data": [{"starting_at": RFC 3339, "ending_at": RFC 3339, "results": [...]}], "has_more",
  "next_page"}`. Cost results: `{"amount": "<decimal string>", "currency": "USD", "cost_type",
  "description", "model", "service_tier", "token_type", "context_window", "workspace_id"}`;
  amount is in the lowest currency unit (cents): "123.45" USD is $1.23. The cost report groups
  only by workspace_id and description: it has no api_key_id. Messages usage results:
  `{"uncached_input_tokens", "cache_creation": {"ephemeral_5m_input_tokens",
  "ephemeral_1h_input_tokens"}, "cache_read_input_tokens", "output_tokens",
  "server_tool_use": {"web_search_requests"}, "api_key_id", "workspace_id", "model",
  "service_tier", "context_window"}`.

Flattened exports: one row per result, columns named after the result's fields, with the bucket's
start_time/end_time (OpenAI, unix seconds or ISO 8601) or starting_at/ending_at (Anthropic), and
nested objects flattened with "_" (amount_value, amount_currency, cache_creation_ephemeral_5m_input_tokens,
server_tool_use_web_search_requests). CSV, or TSV (tab-separated; by the .tsv suffix or the header).

Normalized rows: `API_SPEND_SCHEMA`. `cost_basis` says where a row's cost comes from:
  "reported"             the vendor's cost endpoint (OpenAI costs, Anthropic cost_report);
  "usage x price"        usage rows priced from a price table (Anthropic per API key: the cost
                         report cannot say what a key cost);
  "reported, split by usage x price"  the cost report's amount for a (day, workspace, model),
                         shared among API keys in proportion to their usage x price;
  ""                     usage without a price.

Mapping (TOML) to team and application, most specific first: api_key_id, then project_id (OpenAI)
or workspace_id (Anthropic), then the vendor's default:

    [[map]]
    vendor = "anthropic"            # optional
    api_key_id = "apikey_01..."     # or project_id = "proj_..." / workspace_id = "wrkspc_..."
    team = "search"
    application = "ranker"

Identity for idempotent re-import: a row belongs to the slice (vendor, endpoint, day of its
bucket start, UTC). An import replaces every slice it covers, so re-fetching the last days
replaces them and never doubles. Import whole buckets (unfiltered by project or key).
"""

from __future__ import annotations

import csv
import json
import math
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

API_SPEND_SCHEMA = pa.schema([
    pa.field("source_file", pa.string(), False),
    pa.field("row_number", pa.int64(), False),       # CSV/TSV line (header = 1), or the result's place in a JSON file (1..)
    pa.field("vendor", pa.string(), False),          # openai | anthropic
    pa.field("endpoint", pa.string(), False),        # costs, completions, embeddings, ..., cost_report, messages
    pa.field("bucket_start_ms", pa.int64(), False),
    pa.field("bucket_end_ms", pa.int64(), False),
    pa.field("slice_key", pa.string(), False),       # vendor|endpoint|YYYY-MM-DD
    pa.field("project_id", pa.string()),             # OpenAI project
    pa.field("workspace_id", pa.string()),           # Anthropic workspace
    pa.field("api_key_id", pa.string()),
    pa.field("user_id", pa.string()),
    pa.field("model", pa.string()),
    pa.field("line_item", pa.string()),              # OpenAI costs line_item / Anthropic cost description
    pa.field("cost_type", pa.string()),
    pa.field("token_type", pa.string()),
    pa.field("service_tier", pa.string()),
    pa.field("batch", pa.bool_()),
    pa.field("input_tokens", pa.int64()),            # all input tokens (Anthropic: uncached + cache read + cache writes)
    pa.field("output_tokens", pa.int64()),
    pa.field("cached_input_tokens", pa.int64()),     # OpenAI input_cached_tokens / Anthropic cache_read_input_tokens
    pa.field("cache_creation_tokens", pa.int64()),   # Anthropic cache writes (5 m + 1 h)
    pa.field("requests", pa.int64()),
    pa.field("quantity", pa.float64()),              # non-token endpoints: images, characters, seconds, bytes, sessions
    pa.field("quantity_unit", pa.string()),
    pa.field("cost", pa.float64()),                  # in currency units (dollars), whatever the source unit
    pa.field("currency", pa.string()),               # upper case ISO 4217
    pa.field("cost_basis", pa.string(), False),      # reported | usage x price | reported, split by usage x price | ""
    pa.field("team", pa.string()),
    pa.field("application", pa.string()),
])

OPENAI_QUANTITY = {"images": ("images", "images"), "audio_speeches": ("characters", "characters"),
                   "audio_transcriptions": ("seconds", "seconds"), "vector_stores": ("usage_bytes", "bytes"),
                   "code_interpreter_sessions": ("num_sessions", "sessions")}


class ApiSpendError(ValueError):
    pass


@dataclass(frozen=True)
class Issue:
    file: str
    where: str      # "line 7" or "data[0].results[2]"
    field: str
    value: str
    message: str

    def __str__(self) -> str:
        return f"{self.file} {self.where}, field {self.field}: {self.message} (value {self.value!r}); row refused"


# --------------------------------------------------------------------------- mapping and prices


@dataclass(frozen=True)
class Mapping:
    rules: tuple[dict, ...] = ()

    @classmethod
    def load(cls, path: str | Path | None) -> Mapping:
        if not path:
            return cls()
        try:
            doc = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ApiSpendError(f"mapping file {path}: {e}") from e
        rules = []
        for i, r in enumerate(doc.get("map", [])):
            keys = [k for k in ("api_key_id", "project_id", "workspace_id") if k in r]
            if len(keys) > 1:
                raise ApiSpendError(f"mapping file {path}: map[{i}] names {' and '.join(keys)}; give one")
            if "team" not in r and "application" not in r:
                raise ApiSpendError(f"mapping file {path}: map[{i}] needs team or application")
            unknown = set(r) - {"vendor", "api_key_id", "project_id", "workspace_id", "team", "application"}
            if unknown:
                raise ApiSpendError(f"mapping file {path}: map[{i}]: unknown key(s) {', '.join(sorted(unknown))}")
            rules.append(dict(r))
        return cls(tuple(rules))

    def lookup(self, vendor: str, api_key_id, project_id, workspace_id) -> tuple[str | None, str | None]:
        best, rank = None, -1
        for r in self.rules:
            if r.get("vendor", vendor) != vendor:
                continue
            if "api_key_id" in r:
                hit, score = r["api_key_id"] == api_key_id, 3
            elif "project_id" in r or "workspace_id" in r:
                want = r.get("project_id", r.get("workspace_id"))
                hit, score = want in (project_id, workspace_id) and want is not None, 2
            else:
                hit, score = True, 1 if "vendor" in r else 0
            if hit and score > rank:
                best, rank = r, score
        return (best.get("team"), best.get("application")) if best else (None, None)


@dataclass(frozen=True)
class TokenPrice:
    """USD per million tokens of one model."""

    input: float
    output: float
    cache_read: float = 0.0
    cache_write_5m: float = 0.0
    cache_write_1h: float = 0.0


def load_token_prices(path: str | Path) -> dict[str, TokenPrice]:
    """TOML: [models."claude-sonnet-4-20250514"] input = 3.0, output = 15.0, cache_read = 0.3,
    cache_write_5m = 3.75, cache_write_1h = 6.0   (USD per million tokens, from your price list)."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ApiSpendError(f"price file {path}: {e}") from e
    out = {}
    for model, p in doc.get("models", {}).items():
        try:
            out[model] = TokenPrice(**{k: float(v) for k, v in p.items()})
        except TypeError as e:
            raise ApiSpendError(f"price file {path}: models.{model}: {e}") from e
    return out


# --------------------------------------------------------------------------- reading


def _ms(value, what: str) -> int:
    if value is None or value == "":
        raise ValueError(f"{what} is empty")
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        return int(float(value) * 1000)
    dt = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _int(v):
    if v is None or v == "":
        return None
    f = float(v)
    if not math.isfinite(f):
        raise ValueError("not finite")
    return int(f)


def _float(v):
    if v is None or v == "":
        return None
    f = float(v)
    if not math.isfinite(f):
        raise ValueError("not finite")
    return f


def _none(v):
    return None if v in ("", None, "null", "NULL") else v


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}_"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _kind(result: dict) -> tuple[str, str]:
    """(vendor, endpoint) of one flattened result."""
    obj = result.get("object") or ""
    if obj == "organization.costs.result" or "amount_value" in result:
        return "openai", "costs"
    if obj.startswith("organization.usage.") and obj.endswith(".result"):
        return "openai", obj[len("organization.usage."):-len(".result")]
    if "uncached_input_tokens" in result:
        return "anthropic", "messages"
    if "amount" in result and ("cost_type" in result or "starting_at" in result or "description" in result):
        return "anthropic", "cost_report"
    if "input_tokens" in result and "output_tokens" in result:
        return "openai", "completions"
    raise ApiSpendError("cannot tell which API this row comes from (no object field, and no amount_value, "
                        "uncached_input_tokens, amount or input_tokens/output_tokens)")


def _row(flat: dict, vendor: str, endpoint: str) -> dict:
    """One normalized row from one flattened result with its bucket bounds."""
    start = _ms(flat.get("start_time", flat.get("starting_at")), "start_time/starting_at")
    end = _ms(flat.get("end_time", flat.get("ending_at")), "end_time/ending_at")
    r = {k: None for k in API_SPEND_SCHEMA.names}
    day = datetime.fromtimestamp(start / 1000, UTC).strftime("%Y-%m-%d")
    r.update(vendor=vendor, endpoint=endpoint, bucket_start_ms=start, bucket_end_ms=end,
             slice_key=f"{vendor}|{endpoint}|{day}", cost_basis="")
    for k in ("project_id", "workspace_id", "api_key_id", "user_id", "model", "cost_type", "token_type",
              "service_tier"):
        r[k] = _none(flat.get(k))
    if vendor == "openai":
        b = _none(flat.get("batch"))
        r["batch"] = None if b is None else (b if isinstance(b, bool) else str(b).lower() == "true")
        if endpoint == "costs":
            r["line_item"] = _none(flat.get("line_item"))
            r["cost"] = _float(flat.get("amount_value"))
            r["currency"] = (flat.get("amount_currency") or "usd").upper()
            r["cost_basis"] = "reported"
        else:
            r["input_tokens"] = _int(flat.get("input_tokens"))
            r["output_tokens"] = _int(flat.get("output_tokens"))
            r["cached_input_tokens"] = _int(flat.get("input_cached_tokens"))
            r["requests"] = _int(flat.get("num_model_requests"))
            if endpoint in OPENAI_QUANTITY:
                field, unit = OPENAI_QUANTITY[endpoint]
                r["quantity"], r["quantity_unit"] = _float(flat.get(field)), unit
    else:
        if endpoint == "cost_report":
            cents = _float(flat.get("amount"))
            r["cost"] = None if cents is None else cents / 100.0
            r["currency"] = (flat.get("currency") or "USD").upper()
            r["line_item"] = _none(flat.get("description"))
            r["cost_basis"] = "reported"
        else:
            uncached = _int(flat.get("uncached_input_tokens")) or 0
            c5 = _int(flat.get("cache_creation_ephemeral_5m_input_tokens")) or 0
            c1 = _int(flat.get("cache_creation_ephemeral_1h_input_tokens")) or 0
            read = _int(flat.get("cache_read_input_tokens")) or 0
            r["input_tokens"] = uncached + c5 + c1 + read
            r["cached_input_tokens"] = read
            r["cache_creation_tokens"] = c5 + c1
            r["output_tokens"] = _int(flat.get("output_tokens"))
            ws = _int(flat.get("server_tool_use_web_search_requests"))
            if ws is not None:
                r["quantity"], r["quantity_unit"] = float(ws), "web_search_requests"
            # kept for pricing: the split of input tokens
            r["_tokens"] = (uncached, read, c5, c1, r["output_tokens"] or 0)
    return r


class ApiSpendReader:
    """Reads API spend files; `rows` (dicts), `issues`, `slices` after `read()`."""

    def __init__(self, mapping: Mapping | None = None, prices: dict[str, TokenPrice] | None = None) -> None:
        self.mapping = mapping or Mapping()
        self.prices = prices or {}
        self.rows: list[dict] = []
        self.issues: list[Issue] = []

    @property
    def slices(self) -> set[str]:
        return {r["slice_key"] for r in self.rows}

    def read(self, path: str | Path) -> ApiSpendReader:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as e:
            raise ApiSpendError(f"{path}: {e}") from e
        stripped = text.lstrip()
        if stripped.startswith(("{", "[")):
            self._json(path, stripped)
        else:
            self._table(path, text)
        return self

    def _add(self, path: Path, where: str, n: int, flat: dict) -> None:
        try:
            vendor, endpoint = _kind(flat)
        except ApiSpendError as e:
            self.issues.append(Issue(path.name, where, "-", "", str(e)))
            return
        try:
            r = _row(flat, vendor, endpoint)
        except (ValueError, TypeError) as e:
            field = next((f for f in ("start_time", "starting_at", "end_time", "ending_at", "amount_value", "amount")
                          if f in str(e)), "")
            bad = self._bad_field(flat)
            self.issues.append(Issue(path.name, where, bad[0] if bad else field or "-",
                                     str(bad[1]) if bad else "", str(e)))
            return
        r["source_file"], r["row_number"] = path.name, n
        r["team"], r["application"] = self.mapping.lookup(vendor, r["api_key_id"], r["project_id"], r["workspace_id"])
        if vendor == "anthropic" and endpoint == "messages":
            self._price(r)
        self.rows.append(r)

    @staticmethod
    def _bad_field(flat: dict):
        for k, v in flat.items():
            if k in ("start_time", "end_time", "starting_at", "ending_at"):
                try:
                    _ms(v, k)
                except (ValueError, TypeError):
                    return k, v
            elif isinstance(v, str) and k.endswith(("tokens", "_value", "amount", "requests", "images", "seconds",
                                                     "characters", "usage_bytes", "num_sessions")):
                try:
                    _float(v)
                except ValueError:
                    return k, v
        return None

    def _price(self, r: dict) -> None:
        p = self.prices.get(r["model"] or "")
        if p is None:
            return
        uncached, read, c5, c1, out = r["_tokens"]
        r["cost"] = (uncached * p.input + read * p.cache_read + c5 * p.cache_write_5m + c1 * p.cache_write_1h
                     + out * p.output) / 1e6
        r["currency"], r["cost_basis"] = "USD", "usage x price"

    def _json(self, path: Path, text: str) -> None:
        try:
            if text.startswith("{") and "\n{" in text.strip():
                docs = [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON Lines of pages
            else:
                doc = json.loads(text)
                docs = doc if isinstance(doc, list) else [doc]
        except json.JSONDecodeError as e:
            raise ApiSpendError(f"{path}: not JSON: {e}") from e
        n = 0
        for p, page in enumerate(docs):
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                raise ApiSpendError(f"{path}: page {p}: expected an object with a data array (an API page)")
            for i, bucket in enumerate(page["data"]):
                results = bucket.get("results")
                if not isinstance(results, list):
                    self.issues.append(Issue(path.name, f"page {p} data[{i}]", "results", "", "missing"))
                    continue
                bounds = {k: bucket.get(k) for k in ("start_time", "end_time", "starting_at", "ending_at")
                          if k in bucket}
                for j, res in enumerate(results):
                    n += 1
                    self._add(path, f"page {p} data[{i}].results[{j}]", n, {**_flatten(res), **bounds})

    def _table(self, path: Path, text: str) -> None:
        first = text.split("\n", 1)[0]
        delim = "\t" if path.suffix.lower() == ".tsv" or first.count("\t") > first.count(",") else ","
        reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delim)
        for row in reader:
            line = reader.line_num
            flat = {k: (None if v in ("", "null", "NULL") else v) for k, v in row.items() if k is not None}
            self._add(path, f"line {line}", line, flat)

    def table(self) -> pa.Table:
        return pa.Table.from_pylist([{k: r[k] for k in API_SPEND_SCHEMA.names} for r in self.rows],
                                    schema=API_SPEND_SCHEMA)


def split_reported_cost(rows: list[dict]) -> list[dict]:
    """Anthropic: share each cost_report amount of a (day, workspace, model) among the API keys of
    that day, workspace and model in proportion to their usage x price. The cost report groups by
    workspace and description (which names the model), never by key; the result's rows say
    "reported, split by usage x price". Keys without a price, or days without a cost row, keep
    their "usage x price" estimate."""
    reported = defaultdict(float)
    for r in rows:
        if r["vendor"] == "anthropic" and r["endpoint"] == "cost_report" and r["cost"] is not None:
            reported[(r["slice_key"].rsplit("|", 1)[1], r["workspace_id"], r["model"])] += r["cost"]
    usage = defaultdict(list)
    for r in rows:
        if r["vendor"] == "anthropic" and r["endpoint"] == "messages" and r["cost_basis"] == "usage x price":
            usage[(r["slice_key"].rsplit("|", 1)[1], r["workspace_id"], r["model"])].append(r)
    out = []
    for key, group in usage.items():
        total = sum(r["cost"] for r in group)
        if key not in reported or total <= 0:
            continue
        for r in group:
            out.append({**r, "cost": reported[key] * r["cost"] / total,
                        "cost_basis": "reported, split by usage x price"})
    return out


def read_api_spend(paths, mapping_file: str | Path | None = None, prices_file: str | Path | None = None,
                   split_anthropic: bool = True) -> tuple[pa.Table, ApiSpendReader]:
    """Read OpenAI / Anthropic spend files into one `API_SPEND_SCHEMA` table.

    With `split_anthropic` and both an Anthropic cost report and a priced messages usage report in
    the import, per-key rows are added with endpoint "cost_by_api_key" (cost basis "reported, split
    by usage x price"): the reported cost of each day, workspace and model shared among its keys."""
    reader = ApiSpendReader(Mapping.load(mapping_file), load_token_prices(prices_file) if prices_file else None)
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        reader.read(p)
    if split_anthropic:
        for r in split_reported_cost(reader.rows):
            day = r["slice_key"].rsplit("|", 1)[1]
            reader.rows.append({**r, "endpoint": "cost_by_api_key", "slice_key": f"anthropic|cost_by_api_key|{day}",
                                "input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"]})
    return reader.table(), reader
