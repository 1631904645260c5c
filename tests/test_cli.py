import subprocess
import sys

import pytest


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], capture_output=True, text=True, **kw)


@pytest.mark.parametrize("cmd", [[], ["demo"], ["config"], ["bench"]])
def test_help_everywhere(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0 and "usage: kvstore" in r.stdout


def test_a_bench_without_its_engine_says_what_to_install():
    import importlib.util
    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here: the message is for machines without it")
    r = run("bench", "sglang_storage", timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the 'sglang' package" in lines[0] and "scripts/test_sglang.sh" in lines[0]


def test_config_resolves_flags_over_env(tmp_path):
    import os
    env = {**os.environ, "KVSTORE_CHUNK_SIZE": "128", "KVSTORE_CPU_CAPACITY": "2GiB"}
    r = run("config", "--cpu-capacity", "1GiB", "--disk-path", str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    assert "chunk_size: 128" in r.stdout and "capacity: 1073741824" in r.stdout and str(tmp_path) in r.stdout


def test_config_error_is_clear(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("tiers:\n  cpu: {capacity: 1GiB, colour: red}\n")
    r = run("config", "--config", str(bad))
    assert r.returncode == 2 and "unknown option 'colour' for tier 'cpu'" in r.stderr


def test_serve_config_errors_are_clear(tmp_path):
    import os
    bad = tmp_path / "c.yaml"
    bad.write_text("serve:\n  colour: red\n")
    r = run("serve", "--config", str(bad), timeout=30)
    assert r.returncode == 2 and "unknown serve option(s) ['colour']" in r.stderr
    env = {**os.environ, "KVSTORE_SERVE_PORT": "eighty"}
    r = run("serve", "--no-disk", env=env, timeout=30)
    assert r.returncode == 2 and "serve.port: cannot use 'eighty'" in r.stderr


def test_serve_no_disk_really_has_no_disk_tier(tmp_path):
    """`serve --no-disk` once kept the default disk tier (writing to ~/.cache/kvstore)."""
    import json
    import urllib.request

    from conftest import Daemon

    d = Daemon(tmp_path, "--no-disk")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.port}/v1/stats", timeout=10) as r:
            stats = json.loads(r.read())
        assert list(stats["tiers"]) == ["cpu"]
        assert not (tmp_path / "disk").exists()
    finally:
        d.stop()
