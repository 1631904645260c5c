import json

import pytest
import torch

from kvstore import ConfigError, KVSpec, KVStore, StoreConfig, load_config
from kvstore.config import parse_size


@pytest.mark.parametrize("text,value", [
    ("4GiB", 4 * 2**30), ("4G", 4 * 2**30), ("512MB", 512 * 10**6), ("1.5KiB", 1536), ("10", 10),
    (1024, 1024), ("2 mib", 2 * 2**20),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["four gigs", "-1", "1XB", True])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_defaults_are_cpu_and_disk(tmp_path):
    cfg = load_config({}, env={})
    assert list(cfg.tiers) == ["cpu", "disk"] and cfg.chunk_size == 256


def test_unknown_keys_are_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'chunk_sise' \(did you mean 'chunk_size'\?\)"):
        StoreConfig.from_dict({"chunk_sise": 128})
    with pytest.raises(ConfigError, match=r"unknown option 'capacty' for tier 'cpu'.*did you mean 'capacity'"):
        StoreConfig.from_dict({"tiers": {"cpu": {"capacty": "1GiB"}}})
    with pytest.raises(ConfigError, match=r"unknown tier 'dsk'.*did you mean 'disk'"):
        StoreConfig.from_dict({"tiers": {"dsk": {}}})
    with pytest.raises(ConfigError, match="tiers.redis.url is required"):
        StoreConfig.from_dict({"tiers": {"redis": {}}})
    with pytest.raises(ConfigError, match="queue_full"):
        StoreConfig.from_dict({"queue_full": "explode"})


def test_tier_order_is_the_hierarchy(tmp_path):
    cfg = StoreConfig.from_dict({"tiers": {"disk": {"path": str(tmp_path), "capacity": "1MiB"},
                                           "cpu": {"capacity": "1MiB"}}})
    assert list(cfg.tiers) == ["cpu", "disk"]


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("chunk_size: 64\ntiers:\n  cpu: {capacity: 2MiB}\n")
    cfg = load_config(y)
    assert cfg.chunk_size == 64 and cfg.tiers["cpu"].capacity == 2 * 2**20 and list(cfg.tiers) == ["cpu"]
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"tenant": "acme", "tiers": {"cpu": {"capacity": 4096}}}))
    assert load_config(j).tenant == "acme"
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_env_overrides_file_and_flags_override_env(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("chunk_size: 64\ntiers:\n  cpu: {capacity: 2MiB}\n")
    env = {"KVSTORE_CONFIG": str(f), "KVSTORE_CHUNK_SIZE": "128", "KVSTORE_CPU_CAPACITY": "3MiB",
           "KVSTORE_REDIS_URL": "redis://127.0.0.1:1/0", "KVSTORE_TENANT": "123"}
    cfg = load_config(env=env)
    assert cfg.chunk_size == 128 and cfg.tiers["cpu"].capacity == 3 * 2**20
    assert list(cfg.tiers) == ["cpu", "redis"] and cfg.tenant == "123"
    cfg = load_config(str(f), env=env, use_env=True, overrides={"chunk_size": 32})
    assert cfg.chunk_size == 32


def test_env_tiers_list_selects_tiers():
    cfg = load_config(env={"KVSTORE_TIERS": "cpu", "KVSTORE_CPU_CAPACITY": "1MiB"})
    assert list(cfg.tiers) == ["cpu"]


def test_unknown_env_var_is_an_error():
    with pytest.raises(ConfigError, match="KVSTORE_CHUNKSIZE"):
        load_config(env={"KVSTORE_CHUNKSIZE": "1"})
    # Reserved names are not store config.
    load_config(env={"KVSTORE_LOG_LEVEL": "DEBUG", "KVSTORE_SERVE_PORT": "1"})
    # Every KVSTORE_* variable the README documents for something other than the store.
    load_config(env={"KVSTORE_MODEL_CACHE": "/tmp/models", "KVSTORE_CONFIG": "", "KVSTORE_ADMIN_URL": "x"})


def test_budget_that_cannot_hold_one_chunk():
    spec = KVSpec("m", num_layers=4, num_kv_heads=2, head_size=8, dtype=torch.float16)
    with pytest.raises(ConfigError, match="cannot hold one chunk of 65536 bytes"):
        KVStore(spec, {"chunk_size": 256, "tiers": {"cpu": {"capacity": "32KiB"}}})


def test_explicit_dict_ignores_environment(monkeypatch):
    monkeypatch.setenv("KVSTORE_CHUNK_SIZE", "999")
    assert load_config({"tiers": {"cpu": {"capacity": "1MiB"}}}).chunk_size == 256
    assert load_config(None).chunk_size == 999
