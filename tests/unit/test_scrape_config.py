"""[[agent.endpoints]]: parsed from the agent's TOML, validated with the key named."""

from __future__ import annotations

import pytest

from gpuledger.config import ConfigError, EndpointConfig, load_agent

GOOD = """
[agent]
host_id = "gpu-node-01"

[[agent.endpoints]]
name = "chat"
server = "vllm"
url = "http://127.0.0.1:8000/metrics"
labels = { model_name = "llama-3-8b" }

[[agent.endpoints]]
name = "embed"
server = "tgi"
url = "http://127.0.0.1:8080/metrics"
every_s = 5
timeout_s = 0.5
"""


def test_endpoints_parse(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text(GOOD)
    cfg = load_agent(f, env={})
    assert cfg.endpoints == (
        EndpointConfig(name="chat", server="vllm", url="http://127.0.0.1:8000/metrics",
                       labels={"model_name": "llama-3-8b"}),
        EndpointConfig(name="embed", server="tgi", url="http://127.0.0.1:8080/metrics", every_s=5.0, timeout_s=0.5),
    )
    assert load_agent(env={}).endpoints == ()


@pytest.mark.parametrize("table, message", [
    ('name = "a"\nserver = "ollama"\nurl = "http://127.0.0.1:1/metrics"',
     "agent.endpoints[0].server: must be one of vllm, tgi, triton, sglang, got 'ollama'"),
    ('name = "a"\nserver = "vllm"\nurl = "127.0.0.1:8000/metrics"', "agent.endpoints[0].url: must be an http"),
    ('server = "vllm"\nurl = "http://127.0.0.1:1/metrics"', "agent.endpoints[0].name: required"),
    ('name = "a"\nserver = "vllm"\nurl = "http://h/m"\nevery_s = -1', "agent.endpoints[0].every_s: must be >= 0"),
    ('name = "a"\nserver = "vllm"\nurl = "http://h/m"\ntimeout_s = 0', "agent.endpoints[0].timeout_s: must be > 0"),
    ('name = "a"\nserver = "vllm"\nurl = "http://h/m"\nlabels = { n = 1 }', "agent.endpoints[0].labels: must be a table"),
    ('name = "a"\nserver = "vllm"\nurl = "http://h/m"\nport = 8000', "agent.endpoints[0].port: unknown key"),
])
def test_bad_endpoint_names_the_key(tmp_path, table, message):
    f = tmp_path / "agent.toml"
    f.write_text(f"[agent]\nhost_id = \"h\"\n[[agent.endpoints]]\n{table}\n")
    with pytest.raises(ConfigError) as e:
        load_agent(f, env={})
    assert message in str(e.value)


def test_duplicate_names_and_env_value_are_rejected(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text(GOOD.replace('name = "embed"', 'name = "chat"'))
    with pytest.raises(ConfigError, match="agent.endpoints: names must be unique, chat repeated"):
        load_agent(f, env={})
    with pytest.raises(ConfigError, match=r"agent.endpoints\[0\]: must be a table"):
        load_agent(env={"GPULEDGER_AGENT_ENDPOINTS": "http://127.0.0.1:8000/metrics"})
