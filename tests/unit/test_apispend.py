"""AI API spend: OpenAI and Anthropic Admin API pages and flattened exports, mapped to team and application."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pyarrow.compute as pc
import pytest

from gpuledger.collector.apispend import (
    API_SPEND_SCHEMA,
    ApiSpendError,
    ApiSpendReader,
    Mapping,
    read_api_spend,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "apispend"
MAPPING = FIX / "mapping.toml"
PRICES = FIX / "anthropic-prices.toml"


def _pages(name: str) -> list[dict]:
    doc = json.loads((FIX / name).read_text())
    return doc if isinstance(doc, list) else [doc]


def test_openai_costs_json_and_csv_give_the_reported_totals_per_project():
    want = defaultdict(float)
    for page in _pages("openai-costs.json"):
        for bucket in page["data"]:
            for r in bucket["results"]:
                want[r["project_id"]] += r["amount"]["value"]
    for name in ("openai-costs.json", "openai-costs.csv"):
        table, reader = read_api_spend(FIX / name, MAPPING)
        assert reader.issues == [] and table.schema == API_SPEND_SCHEMA
        got = defaultdict(float)
        for r in table.to_pylist():
            got[r["project_id"]] += r["cost"]
            assert (r["vendor"], r["endpoint"], r["currency"], r["cost_basis"]) == ("openai", "costs", "USD", "reported")
        assert got == pytest.approx(want)
        teams = {r["project_id"]: (r["team"], r["application"]) for r in table.to_pylist()}
        assert teams == {"proj_search": ("search", "ranker"), "proj_rag": ("platform", "rag"),
                         "proj_media": (None, None), None: (None, None)}
        assert reader.slices == {"openai|costs|2026-11-01", "openai|costs|2026-11-02", "openai|costs|2026-11-03"}
    csv_rows = read_api_spend(FIX / "openai-costs.csv")[0]["row_number"].to_pylist()
    assert csv_rows == list(range(2, 9))  # CSV line numbers


def test_openai_usage_endpoints_keep_their_counts_and_keys():
    table, reader = read_api_spend([FIX / "openai-usage-completions.json", FIX / "openai-usage-embeddings.json",
                                    FIX / "openai-usage-images.json"], MAPPING)
    rows = {(r["endpoint"], r["api_key_id"]): r for r in table.to_pylist()}
    src = [r for p in _pages("openai-usage-completions.json") for b in p["data"] for r in b["results"]]
    comp = [r for r in table.to_pylist() if r["endpoint"] == "completions"]
    assert sum(r["input_tokens"] for r in comp) == sum(r["input_tokens"] for r in src)
    assert sum(r["output_tokens"] for r in comp) == sum(r["output_tokens"] for r in src)
    assert sum(r["cached_input_tokens"] for r in comp) == sum(r["input_cached_tokens"] for r in src)
    assert sum(r["requests"] for r in comp) == sum(r["num_model_requests"] for r in src)
    # the API key's own mapping wins over its project's
    assert (rows[("completions", "key_batch")]["team"], rows[("completions", "key_batch")]["application"]) == \
        ("search", "offline-eval")
    assert rows[("completions", "key_batch")]["batch"] is True
    assert rows[("completions", "key_ranker")]["application"] == "ranker"
    assert rows[("embeddings", "key_rag")]["input_tokens"] == 200_000_000
    assert (rows[("images", "key_media")]["quantity"], rows[("images", "key_media")]["quantity_unit"]) == (19, "images")
    assert all(r["cost"] is None and r["cost_basis"] == "" for r in table.to_pylist())


def test_anthropic_cost_report_amounts_are_cents_and_per_key_cost_says_its_basis():
    table, reader = read_api_spend([FIX / "anthropic-cost-report.json", FIX / "anthropic-usage-messages.json"],
                                   MAPPING, PRICES)
    assert reader.issues == []
    rows = table.to_pylist()
    reported = [r for r in rows if r["endpoint"] == "cost_report"]
    cents = sum(float(r["amount"]) for b in _pages("anthropic-cost-report.json")[0]["data"] for r in b["results"])
    assert sum(r["cost"] for r in reported) == pytest.approx(cents / 100)  # "123.45" USD is $1.23
    assert all(r["api_key_id"] is None and r["cost_basis"] == "reported" for r in reported)
    # usage x price per key, from the documented price table (USD per million tokens)
    price = {"input": 3.0, "output": 15.0, "cache_read": 0.30, "cache_write_5m": 3.75, "cache_write_1h": 6.0}
    est = {}
    for b in _pages("anthropic-usage-messages.json")[0]["data"]:
        for r in b["results"]:
            est[r["api_key_id"]] = (r["uncached_input_tokens"] * price["input"] + r["output_tokens"] * price["output"]
                                    + r["cache_read_input_tokens"] * price["cache_read"]
                                    + r["cache_creation"]["ephemeral_5m_input_tokens"] * price["cache_write_5m"]
                                    + r["cache_creation"]["ephemeral_1h_input_tokens"] * price["cache_write_1h"]) / 1e6
    priced = {r["api_key_id"]: r for r in rows if r["endpoint"] == "messages"}
    assert {k: r["cost"] for k, r in priced.items()} == pytest.approx(est)
    assert {r["cost_basis"] for r in priced.values()} == {"usage x price"}
    assert (priced["apikey_01evals"]["team"], priced["apikey_01evals"]["application"]) == ("research", "evals")
    assert (priced["apikey_01agent"]["team"], priced["apikey_01agent"]["application"]) == ("research", "agents")
    assert priced["apikey_01default"]["application"] == "unassigned"  # the vendor-wide default
    agent = priced["apikey_01agent"]
    assert agent["input_tokens"] == 4_000_000 + 60_000 + 600_000 and agent["cache_creation_tokens"] == 60_000
    # the reported cost of a day, workspace and model, shared among its keys by usage x price
    split = {r["api_key_id"]: r for r in rows if r["endpoint"] == "cost_by_api_key"}
    day1 = sum(r["cost"] for r in reported if r["model"] and r["slice_key"].endswith("2026-11-01"))
    share = est["apikey_01agent"] / (est["apikey_01agent"] + est["apikey_01evals"])
    assert split["apikey_01agent"]["cost"] == pytest.approx(day1 * share)
    assert split["apikey_01agent"]["cost"] + split["apikey_01evals"]["cost"] == pytest.approx(day1)
    assert split["apikey_01agent"]["cost_basis"] == "reported, split by usage x price"
    day2 = sum(r["cost"] for r in reported if r["slice_key"].endswith("2026-11-02"))
    assert split["apikey_01default"]["cost"] == pytest.approx(day2)


def test_anthropic_usage_tsv_equals_the_json_pages():
    a, _ = read_api_spend(FIX / "anthropic-usage-messages.json", MAPPING, PRICES)
    b, reader = read_api_spend(FIX / "anthropic-usage-messages.tsv", MAPPING, PRICES)
    assert reader.issues == []
    keep = [c for c in API_SPEND_SCHEMA.names if c not in ("source_file", "row_number")]
    assert a.select(keep).to_pylist() == b.select(keep).to_pylist()
    assert b["row_number"].to_pylist() == [2, 3, 4]
    assert pc.sum(b["quantity"]).as_py() == 12  # web search requests


def test_bad_rows_are_refused_with_file_place_and_field(tmp_path):
    f = tmp_path / "costs.csv"
    rows = list(csv.reader((FIX / "openai-costs.csv").read_text().splitlines()))
    rows[2][3] = "twelve"       # amount_value, line 3
    rows[4][0] = "next monday"  # start_time, line 5
    with open(f, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    table, reader = read_api_spend(f)
    assert table.num_rows == 5
    assert [str(i) for i in reader.issues] == [
        "costs.csv line 3, field amount_value: could not convert string to float: 'twelve' (value 'twelve'); "
        "row refused",
        "costs.csv line 5, field start_time: Invalid isoformat string: 'next monday' (value 'next monday'); "
        "row refused"]
    j = tmp_path / "page.json"
    page = _pages("anthropic-usage-messages.json")[0]
    page["data"][0]["results"][1]["output_tokens"] = "lots"
    j.write_text(json.dumps(page))
    _, reader = read_api_spend(j)
    assert len(reader.issues) == 1 and reader.issues[0].where == "page 0 data[0].results[1]"
    assert reader.issues[0].field == "output_tokens"
    (tmp_path / "x.json").write_text('{"rows": []}')
    with pytest.raises(ApiSpendError, match="x.json: page 0: expected an object with a data array"):
        ApiSpendReader().read(tmp_path / "x.json")


def test_mapping_file_errors_name_the_entry(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('[[map]]\napi_key_id = "k"\nproject_id = "p"\nteam = "t"\n')
    with pytest.raises(ApiSpendError, match=r"map\[0\] names api_key_id and project_id"):
        Mapping.load(f)
    f.write_text('[[map]]\napi_key_id = "k"\n')
    with pytest.raises(ApiSpendError, match=r"map\[0\] needs team or application"):
        Mapping.load(f)
    f.write_text('[[map]]\napi_key = "k"\nteam = "t"\n')
    with pytest.raises(ApiSpendError, match=r"map\[0\]: unknown key\(s\) api_key"):
        Mapping.load(f)


def test_reimport_replaces_day_slices():
    store: dict[str, list[dict]] = {}

    def import_(paths):
        table, reader = read_api_spend(paths, MAPPING)
        fresh = defaultdict(list)
        for r in table.to_pylist():
            fresh[r["slice_key"]].append(r)
        for s in reader.slices:
            store[s] = fresh[s]

    import_(FIX / "openai-costs.json")
    total = sum(r["cost"] for rows in store.values() for r in rows)
    import_(FIX / "openai-costs.csv")  # the same days again, in another form
    assert sum(r["cost"] for rows in store.values() for r in rows) == pytest.approx(total)
