"""Config: the sample files parse; precedence; validation names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuledger.config import ConfigError, load_agent, load_collector

ROOT = Path(__file__).resolve().parents[2]


def test_sample_agent_config_parses():
    cfg = load_agent(ROOT / "systemd" / "agent.toml", env={})
    assert cfg.instance_type == "p5.48xlarge" and cfg.gpu_count == 8
    assert cfg.tags == {"team": "ml-platform", "project": "shared-cluster", "cloud_account": "123456789012"}
    assert cfg.env_allowlist == ("COST_CENTER",)


def test_sample_collector_config_parses():
    cfg = load_collector(ROOT / "systemd" / "collector.toml", env={})
    assert cfg.listen == "0.0.0.0:4700" and cfg.ttl_days == 400
    assert cfg.store_dsn().startswith("chdb://") and cfg.store_dsn().endswith("chdb")


def test_units_reference_the_sample_configs():
    agent = (ROOT / "systemd" / "gpuledger-agent.service").read_text()
    collector = (ROOT / "systemd" / "gpuledger-collector.service").read_text()
    assert "gpuledger agent run --config /etc/gpuledger/agent.toml" in agent
    assert "gpuledger collector serve --config /etc/gpuledger/collector.toml" in collector


def test_precedence_defaults_file_env_flags(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('[agent]\nhost_id = "from-file"\nwindow_s = 20.0\ntick_s = 2.0\n')
    assert load_agent(env={}).window_s == 10.0
    assert load_agent(f, env={}).host_id == "from-file"
    cfg = load_agent(f, env={"GPULEDGER_AGENT_HOST_ID": "from-env", "GPULEDGER_AGENT_TICK_S": "5"})
    assert (cfg.host_id, cfg.tick_s, cfg.window_s) == ("from-env", 5.0, 20.0)
    cfg = load_agent(f, env={"GPULEDGER_AGENT_HOST_ID": "from-env"}, host_id="from-flag")
    assert cfg.host_id == "from-flag"


@pytest.mark.parametrize("text, key", [
    ('[agent]\nwindow_s = -1\n', "agent.window_s"),
    ('[agent]\nwindow_s = 10.0005\n', "agent.window_s"),
    ('[agent]\ncollector = "nohostport"\n', "agent.collector"),
    ('[agent]\nwindo_s = 10\n', "agent.windo_s: unknown key"),
    ('[agent]\ntick_s = "fast"\n', "agent.tick_s: cannot read"),
    ('[agent]\ntick_s = 30\n', "agent.tick_s"),
])
def test_validation_names_the_key(tmp_path, text, key):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_agent(f, env={})


def test_store_ddl_follows_partition_and_ttl_options():
    from gpuledger.collector.store import Store, StoreOptions

    ddl = Store._ddl_for(type("S", (), {"opt": StoreOptions(partition_by="day", ttl_days=30), "db": "g"})(),
                         "gpu_windows")
    assert "PARTITION BY toYYYYMMDD(" in ddl[0] and "INTERVAL 30 DAY" in ddl[0]
    ddl = Store._ddl_for(type("S", (), {"opt": StoreOptions(cluster="c1"), "db": "g"})(), "gpu_windows")
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/g/gpu_windows_local', '{replica}')" in ddl[0]
    assert "ON CLUSTER 'c1'" in ddl[0] and "ENGINE = Distributed('c1', 'g', 'gpu_windows_local', cityHash64(host_id))" in ddl[1]


def test_collector_validation(tmp_path):
    with pytest.raises(ConfigError, match="collector.store"):
        load_collector(env={}, store="mysql://x")
    with pytest.raises(ConfigError, match="collector.partition_by: must be month, week or day"):
        load_collector(env={}, partition_by="hour")
    with pytest.raises(ConfigError, match="config file .*: not found"):
        load_collector(tmp_path / "missing.toml", env={})


def test_report_threads_reach_the_report_queries():
    from gpuledger.collector.service import store_options
    from gpuledger.collector.store import Store

    with pytest.raises(ConfigError, match=r"collector\.report_threads: must be >= 0"):
        load_collector(env={}, report_threads=-1)
    cfg = load_collector(env={"GPULEDGER_COLLECTOR_REPORT_THREADS": "1"})
    opts = store_options(cfg)
    settings = Store.report_settings(type("S", (), {"opt": opts})())
    assert settings["max_threads"] == 1
    assert "max_threads" not in Store.report_settings(type("S", (), {"opt": store_options(load_collector(env={}))})())


def test_sample_collector_config_prices_as_shipped():
    """Every file the sample names ships with it (or the key stays commented out): the collector
    starts with the sample as shipped instead of refusing a pricing file nobody has."""
    from gpuledger.collector.pricing import Pricing

    cfg = load_collector(ROOT / "systemd" / "collector.toml", env={})
    assert cfg.pricing_file == "" or Path(cfg.pricing_file).is_file()
    assert Pricing.default(cfg.pricing_file or None).sources


def test_cluster_ddl_covers_every_table_and_parses(tmp_path):
    """The server path (ReplicatedMergeTree family + Distributed, ON CLUSTER) for every table, its statements
    parsed by ClickHouse itself (EXPLAIN AST in chDB: a cluster cannot run here, its SQL can be checked)."""
    from gpuledger.collector.store import TABLES, Store, StoreOptions

    fake = type("S", (), {"opt": StoreOptions(cluster="gl_cluster", database="gl"), "db": "gl",
                          "_ddl_for": Store._ddl_for})()
    ddl = Store.ddl(fake)
    for name, t in TABLES.items():
        local = next(s for s in ddl if s.startswith(f"CREATE TABLE IF NOT EXISTS gl.{name}_local "))
        dist = next(s for s in ddl if s.startswith(f"CREATE TABLE IF NOT EXISTS gl.{name} ON CLUSTER"))
        assert f"ENGINE = Replicated{t.engine}('/clickhouse/tables/{{shard}}/gl/{name}_local', '{{replica}}'" in local
        assert (f", {t.version})" in local) if t.version else ("'{replica}')" in local)
        assert "ON CLUSTER 'gl_cluster'" in local
        key = "cityHash64(host_id)" if "host_id" in t.columns else "rand()"
        assert f"ENGINE = Distributed('gl_cluster', 'gl', '{name}_local', {key})" in dist
    assert "ALTER TABLE gl.proc_windows_local ON CLUSTER 'gl_cluster' ADD COLUMN IF NOT EXISTS held_attr_us" in \
        " ".join(ddl) and "ALTER TABLE gl.proc_windows ON CLUSTER" in " ".join(ddl)
    store = Store(f"chdb://{tmp_path / 'chdb'}")
    try:
        for stmt in ddl:
            ast = store.query_rows(f"EXPLAIN AST {stmt}")
            assert ast, stmt
    finally:
        store.close()


def test_every_growing_table_has_a_retention():
    """Every time series (windows, their rollups, sessions, processes, host events) follows collector.ttl_days, so
    rollups expire with the windows they sum; the batch log batch_log_days; only the facts with one row per host
    or GPU, the prices in force and imported bills and API spend (finance's records, replaced by re-imports)
    have none."""
    from gpuledger.collector.store import TABLES, Store, StoreOptions

    fake = type("S", (), {"opt": StoreOptions(ttl_days=90, batch_log_days=30), "db": "g",
                          "_ddl_for": Store._ddl_for})()
    kept = {"hosts", "gpus", "prices", "bill_rows", "api_spend_rows", "import_slices"}
    for name in TABLES:
        stmt = Store._ddl_for(fake, name)[0]
        if name in kept:
            assert " TTL " not in stmt, name
        else:
            days = 30 if name == "agent_batches" else 90
            assert f"+ INTERVAL {days} DAY" in stmt, name
