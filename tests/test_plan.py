"""`kvstore plan`: the policies on a trace small enough to work out by hand, the shipped traces,
the access log a store writes and its replay, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import causal_kv
from kvstore import KVStore
from kvstore.planning import plan, recommend, simulate
from kvstore.traces import load


def write_trace(path, requests, block=4):
    with open(path, "w") as f:
        for i, ids in enumerate(requests):
            f.write(json.dumps({"timestamp": i * 1000, "input_length": block * len(ids), "output_length": 1,
                                "hash_ids": ids}) + "\n")
    return str(path)


def test_policies_on_a_trace_worked_out_by_hand(tmp_path):
    """Room for two 4-token chunks; prompts AB, AB, CD, AB. LRU and FIFO keep CD and miss the
    last AB (8 of 32 tokens hit); Belady does not keep CD (never used again) and hits it (16);
    with room for everything 16 hit too. kvstore's real store does what LRU does."""
    reqs = load(write_trace(tmp_path / "t.jsonl", [[1, 2], [1, 2], [3, 4], [1, 2]]), block_size=4)
    assert [simulate(reqs, 8, p, 4) for p in ("lru", "fifo", "belady")] == [8, 8, 16]
    assert simulate(reqs, 1000, "lru", 4) == 16
    bpt = 1000
    result = plan(reqs, [8 * bpt, 16 * bpt], [0], bpt, chunk=4)
    got = {(p.policy, p.cpu_bytes // bpt): p.hit_tokens for p in result.points}
    assert got == {("kvstore", 8): 8, ("lru", 8): 8, ("fifo", 8): 8, ("belady", 8): 16,
                   ("kvstore", 16): 16, ("lru", 16): 16, ("fifo", 16): 16, ("belady", 16): 16}
    assert result.bound == 0.5 and result.unique_bytes == 16 * bpt
    assert recommend(result).startswith("cpu 15.6 KiB reaches 100% of the bound"), recommend(result)


def test_lru_and_fifo_differ_where_recency_matters(tmp_path):
    """Room for two chunks; A, B, A, C, A: LRU keeps A (touched), FIFO evicts it for C."""
    reqs = load(write_trace(tmp_path / "t.jsonl", [[1], [2], [1], [3], [1]]), block_size=4)
    assert simulate(reqs, 8, "lru", 4) == 8 and simulate(reqs, 8, "fifo", 4) == 4


def test_the_shipped_traces_need_no_checkout():
    assert len(load("conversation")) == 12031
    synthetic = load("synthetic", limit=10)
    assert len(synthetic) == 10 and synthetic[0].block_size == 512


def test_a_stores_access_log_replays(spec, tmp_path):
    """A store with access_log writes one line per lookup, get, put and pin; `kvstore plan`
    replays its lookups, with the logged KV size, and writes the plot."""
    log = tmp_path / "access.jsonl"
    cfg = {"chunk_size": 16, "access_log": str(log), "tiers": {"cpu": {"capacity": "1MiB"}}}
    system = list(range(64))
    with KVStore(spec, cfg) as store:
        for user in range(6):
            toks = system + [1000 + user * 50 + i for i in range(40)]
            store.lookup(toks)
            store.get(toks)
            store.put(toks, causal_kv(spec, toks))
        store.pin(system, 10)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["op"] for e in events[:3]] == ["lookup", "get", "put"] and events[-1]["op"] == "pin"
    assert events[0]["bytes_per_token"] == spec.bytes_per_token and len(events[0]["keys"]) == 7
    reqs = load(str(log))
    assert len(reqs) == 6 and all(r.input_length == 104 for r in reqs)
    png = tmp_path / "plan.png"
    r = subprocess.run([sys.executable, "-m", "kvstore", "plan", "--trace", str(log), "--cpu", "1000tok,8Ktok",
                        "--chunk-size", "16", "--prefill-tps", "5000", "--png", str(png)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"as logged: {spec.bytes_per_token} B/token" in r.stdout
    # five later users reuse the 64-token system prompt: 320 of 624 tokens at most
    assert "bound): hit ratio 0.513" in r.stdout and "recommendation: cpu" in r.stdout, r.stdout
    assert "TTFT/request" in r.stdout and png.stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["--policies", "lru,mru"], "--policies: unknown mru"),
    (["--trace", "/nonexistent.jsonl"], "no such file, and not a shipped trace"),
    (["--cpu", "lots"], "--cpu: cannot parse byte size 'lots'"),
    (["--model", "/nonexistent/config.json"], "--model /nonexistent/config.json: cannot read"),
])
def test_operator_mistakes_are_one_line(argv, message):
    r = subprocess.run([sys.executable, "-m", "kvstore", "plan", "--limit", "5", "--png", "", *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("kvstore: error:") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_model_config_gives_kv_bytes(tmp_path):
    from kvstore.plan_cli import kv_bytes_per_token

    cfg = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
           "torch_dtype": "bfloat16", "model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert kv_bytes_per_token(str(tmp_path))[0] == 30 * 2 * 3 * 64 * 2  # SmolLM2-135M
