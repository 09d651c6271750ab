"""[[collector.alerts]] and the alert_* keys: parsed from the collector's TOML, validated with the key named."""

from __future__ import annotations

import pytest

from gpuledger.config import AlertRuleConfig, ConfigError, load_collector

GOOD = """
[collector]
alert_webhook_url = "http://alertmanager.internal:9093/api/v2/alerts"
alert_repeat_s = 7200
alert_generator_url = "http://grafana.internal/d/gpuledger"

[[collector.alerts]]
kind = "gpu_idle_held"
threshold = "2h"
for = "15m"
labels = { severity = "warning", team = "ml-platform" }

[[collector.alerts]]
kind = "endpoint_idle"
threshold = 0.8
for = 3600
name = "ChatEndpointIdle"
summary = "{endpoint} idle {value} of the day"

[[collector.alerts]]
kind = "unwatched_gpu_spend"
threshold = 250

[[collector.alerts]]
kind = "agent_silent"
threshold = "1h30m"
"""


def test_rules_parse(tmp_path):
    f = tmp_path / "collector.toml"
    f.write_text(GOOD)
    cfg = load_collector(f, env={})
    assert cfg.alerts == (
        AlertRuleConfig(kind="gpu_idle_held", threshold=7200.0, for_s=900.0,
                        labels={"severity": "warning", "team": "ml-platform"}, name="GpuIdleHeld"),
        AlertRuleConfig(kind="endpoint_idle", threshold=0.8, for_s=3600.0, name="ChatEndpointIdle",
                        summary="{endpoint} idle {value} of the day"),
        AlertRuleConfig(kind="unwatched_gpu_spend", threshold=250.0, name="UnwatchedGpuSpend"),
        AlertRuleConfig(kind="agent_silent", threshold=5400.0, name="AgentSilent"),
    )
    assert (cfg.alert_repeat_s, cfg.alert_generator_url) == (7200.0, "http://grafana.internal/d/gpuledger")


@pytest.mark.parametrize("rule, message", [
    ('kind = "gpu_idle"\nthreshold = 1', "collector.alerts[0].kind: must be one of gpu_idle_held, endpoint_idle"),
    ('kind = "agent_silent"', "collector.alerts[0].threshold: required"),
    ('kind = "agent_silent"\nthreshold = "10 minutes"', "collector.alerts[0].threshold: must be a duration"),
    ('kind = "endpoint_idle"\nthreshold = 80', "collector.alerts[0].threshold: an idle share, 0..1"),
    ('kind = "unwatched_gpu_spend"\nthreshold = "lots"', "collector.alerts[0].threshold: must be a number"),
    ('kind = "agent_silent"\nthreshold = 60\nfor = "-5m"', "collector.alerts[0].for: must be a duration"),
    ('kind = "agent_silent"\nthreshold = 60\nfor = -5', "collector.alerts[0].for: must be >= 0"),
    ('kind = "agent_silent"\nthreshold = 60\nlabels = { severity = 3 }', "collector.alerts[0].labels: must be a table"),
    ('kind = "agent_silent"\nthreshold = 60\nrepeat = "1h"', "collector.alerts[0].repeat: unknown key"),
])
def test_bad_rule_names_the_key(tmp_path, rule, message):
    f = tmp_path / "collector.toml"
    f.write_text(f'[collector]\nalert_webhook_url = "http://127.0.0.1:9093/api/v2/alerts"\n[[collector.alerts]]\n{rule}\n')
    with pytest.raises(ConfigError) as e:
        load_collector(f, env={})
    assert message in str(e.value)


def test_webhook_required_and_checked_names_unique(tmp_path):
    f = tmp_path / "collector.toml"
    f.write_text('[collector]\n[[collector.alerts]]\nkind = "agent_silent"\nthreshold = 60\n')
    with pytest.raises(ConfigError, match="collector.alert_webhook_url: required when collector.alerts are defined"):
        load_collector(f, env={})
    with pytest.raises(ConfigError, match="collector.alert_webhook_url: must be an http"):
        load_collector(env={"GPULEDGER_COLLECTOR_ALERT_WEBHOOK_URL": "alertmanager:9093"})
    f.write_text('[collector]\nalert_webhook_url = "http://a:9093/api/v2/alerts"\n'
                 '[[collector.alerts]]\nkind = "agent_silent"\nthreshold = 60\n'
                 '[[collector.alerts]]\nkind = "agent_silent"\nthreshold = 600\n')
    with pytest.raises(ConfigError, match=r"collector.alerts: names must be unique \(set name = ...\), AgentSilent"):
        load_collector(f, env={})
    with pytest.raises(ConfigError, match="collector.alert_repeat_s: must be > 0"):
        load_collector(env={"GPULEDGER_COLLECTOR_ALERT_REPEAT_S": "0"})
