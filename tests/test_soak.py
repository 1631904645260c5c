"""The chaos soak (bench/soak.py) for 60 s: a daemon with cpu + disk + Redis, four engine-side
client processes checking every hit byte for byte, while the daemon and redis-server are
killed and restarted, disk files corrupted and the disk filled. A regression in any failure
path shows up here as an error, a wrong hit or an acknowledged object lost."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import _soak_client as sc  # noqa: E402

from kvstore import KVStore  # noqa: E402


def test_the_soaks_check_sees_wrong_bytes():
    """The check can fail: KV stored under tokens it does not belong to is counted as wrong,
    whether it is another prompt's or the same prompt's one position off."""
    toks = sc.prompt(0, 1)
    rep = sc.ClientReport(client=0)
    with KVStore(sc.SPEC, {"chunk_size": sc.CHUNK, "tiers": {"cpu": {"capacity": "4MiB"}}}) as store:
        store.put(toks, sc.causal_kv(toks))
        sc._check_get(store, toks, False, rep)
        sc._check_get(store, toks, True, rep)
        assert (rep.hits, rep.wrong) == (2, 0)
        store.clear()
        store.put(toks, sc.causal_kv([t + 1 for t in toks]))  # another prompt's KV
        sc._check_get(store, toks, False, rep)
        store.clear()
        store.put(toks, sc.causal_kv([7] + toks)[:, :, 1:])  # each position's KV from another prefix
        sc._check_get(store, toks, True, rep)
    assert rep.wrong == 2


@pytest.mark.timeout(400)
def test_a_60_second_soak_meets_every_goal(tmp_path):
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    proc = subprocess.Popen([sys.executable, str(BENCH / "soak.py"), "--seconds", "60", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=360)
    except subprocess.TimeoutExpired:  # SIGTERM first: the soak then stops its servers and unmounts its disk
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
    rep = json.loads(out.read_text())
    assert (rep["errors"], rep["wrong"], rep["lost"], rep["daemon_5xx"]) == (0, 0, 0, 0)
    assert rep["hits"] > 200 and rep["checked"] > 200, rep
    kinds = {f["kind"].split()[0] for f in rep["faults"]}
    want = {"kill_daemon", "corrupt", "kill_redis", "fill_disk"}
    assert want <= kinds, kinds
    if os.environ.get("CI") == "true":  # CI runs as root: the disk must really fill there
        assert not rep["skipped"], rep["skipped"]
    assert all(f["recovery_s"] is not None for f in rep["faults"]), rep["faults"]
