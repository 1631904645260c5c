"""A real LMCache engine stores into `kvstore serve --lmcache-port` and a second LMCache engine,
in another process, retrieves the same KV bit-exactly.

Needs the lmcache package, which is too heavy for the main environment: scripts/test_lmcache.sh
installs it in its own venv and runs this file (CI runs that step). Elsewhere it skips, unless
KVSTORE_LMCACHE_TESTS=1 says it must run."""

import json
import os
import subprocess
import sys

import pytest

from conftest import Daemon, free_port

try:
    import lmcache  # noqa: F401
except ImportError:
    if os.environ.get("KVSTORE_LMCACHE_TESTS") == "1":
        raise
    pytest.skip("lmcache not installed here: scripts/test_lmcache.sh runs this file", allow_module_level=True)

ENGINE = os.path.join(os.path.dirname(__file__), "lmcache_engine.py")


def run_engine(port: int, mode: str, tokens: int, seed: int = 0) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run([sys.executable, ENGINE, str(port), mode, str(tokens), "--seed", str(seed)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lmcache_engines_share_kv_through_kvstore(tmp_path):
    port = free_port()
    daemon = Daemon(tmp_path, "--lmcache-port", str(port))
    try:
        stored = run_engine(port, "store", 3000)
        assert stored["lookup"] == 2816  # 11 full 256-token chunks (LMCache drops the partial tail)
        got = run_engine(port, "retrieve", 3000)
        assert got == {**got, "lookup": 2816, "retrieved": 2816, "exact": True}
        other = run_engine(port, "retrieve", 3000, seed=1)  # other tokens: nothing to retrieve
        assert other["retrieved"] == 0
        # The objects live in kvstore's tiers: after a restart they are still served.
        assert daemon.stop() == 0
        daemon.start()
        assert run_engine(port, "retrieve", 3000)["exact"] is True
    finally:
        if daemon.proc is not None:
            daemon.stop()


@pytest.mark.parametrize("tokens,hit", [(2816, 2816), (2817, 2816), (2815, 2560)],
                         ids=["chunk-multiple", "one-more", "one-less"])
def test_boundary_prompts_retrieve_their_own_kv(tmp_path, tokens, hit):
    """LMCache #5151 restored the wrong context for a prompt of an exact multiple of the chunk
    size: through kvstore, a prompt of 11 chunks, one token more and one less each retrieve
    exactly the KV stored for them."""
    port = free_port()
    daemon = Daemon(tmp_path, "--lmcache-port", str(port))
    try:
        assert run_engine(port, "store", tokens, seed=tokens)["lookup"] == hit
        got = run_engine(port, "retrieve", tokens, seed=tokens)
        assert got == {**got, "lookup": hit, "retrieved": hit, "exact": True}
    finally:
        daemon.stop()
