"""The reference engine and the hook API: prefix reuse through kvstore must not change output."""

import random

import pytest
import torch

from conftest import disk_config, mem_config
from kvstore.connectors.hooks import KVHooks, blocks_for, gather_blocks, scatter_blocks
from kvstore.connectors.reference import Engine, ModelConfig, SamplingParams, build_tiny_model
from kvstore.connectors.reference.model import Transformer
from kvstore.connectors.reference.tokenizer import load_tokenizer, train_tokenizer
from kvstore.errors import InvalidInputError
from kvstore.store import KVStore

GREEDY = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


def prompt(n: int, seed: int = 0) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(6, 4096) for _ in range(n)]


def with_store(model_dir, config, **kw):
    engine = Engine.load(model_dir, **kw)
    store = KVStore(engine.kv_spec(), config)
    engine.attach(KVHooks(store))
    return engine, store


@pytest.mark.parametrize("paged", [False, True])
def test_cached_prefix_gives_identical_greedy_output(model_dir, paged):
    plain = Engine.load(model_dir, paged=paged)
    cached, store = with_store(model_dir, mem_config(chunk=32, cpu="8MiB"), paged=paged)
    p = prompt(150)
    want = plain.generate(p, GREEDY)
    first = cached.generate(p, GREEDY)
    assert first.hit_tokens == 0 and first.tokens == want.tokens
    again = cached.generate(p, GREEDY)
    # The first generate saved the prompt and its reply: the whole prompt is stored (with its
    # partial tail chunk); one token is recomputed for the logits.
    assert again.hit_tokens == 150 and again.computed_tokens == 1
    assert again.tokens == want.tokens
    torch.testing.assert_close(again.first_logits, want.first_logits, atol=1e-4, rtol=1e-4)
    # A prompt that shares 100 tokens: three whole chunks (96 tokens) are reused.
    q = p[:100] + prompt(40, seed=9)
    got = cached.generate(q, GREEDY)
    assert got.hit_tokens == 96 and got.tokens == plain.generate(q, GREEDY).tokens
    store.close()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_families_reuse_across_store_restart(tmp_path, family):
    d = build_tiny_model(tmp_path / family, family=family, seed=1)
    p = prompt(120, seed=2)
    want = Engine.load(d).generate(p, GREEDY)
    cfg = disk_config(tmp_path / "kv", chunk=32, cpu="4MiB", disk="32MiB")
    e1, s1 = with_store(d, cfg)
    e1.generate(p, GREEDY)
    s1.close()
    e2, s2 = with_store(d, cfg)  # a new store: only the disk tier remembers
    got = e2.generate(p, GREEDY)
    assert got.hit_tokens == 120 and got.tokens == want.tokens
    assert s2.stats()["tiers"]["disk"]["hits"] > 0
    s2.close()


def test_corrupt_disk_objects_are_recomputed(tmp_path, model_dir):
    p = prompt(100, seed=4)
    want = Engine.load(model_dir).generate(p, GREEDY)
    cfg = disk_config(tmp_path / "kv", chunk=32, cpu=None, disk="32MiB")
    e1, s1 = with_store(model_dir, cfg)
    e1.generate(p, GREEDY)
    s1.close()
    files = list((tmp_path / "kv").rglob("*.kvo"))
    assert files
    for f in files:
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x40
        f.write_bytes(bytes(data))
    e2, s2 = with_store(model_dir, cfg)
    got = e2.generate(p, GREEDY)
    assert got.hit_tokens == 0 and got.tokens == want.tokens
    assert s2.stats()["tiers"]["disk"]["corrupt"] >= 1
    s2.close()


def test_engine_rejects_a_store_for_another_model(tmp_path, model_dir):
    other = build_tiny_model(tmp_path / "other", seed=99)  # same shapes, different weights
    engine = Engine.load(model_dir)
    store = KVStore(Engine.load(other).kv_spec(), mem_config())
    with pytest.raises(InvalidInputError, match="does not match"):
        engine.attach(KVHooks(store))
    store.close()


def test_sampling_is_seeded_and_validated(model_dir):
    e = Engine.load(model_dir)
    p = prompt(40)
    a = e.generate(p, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5))
    b = e.generate(p, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5))
    assert a.tokens == b.tokens
    with pytest.raises(InvalidInputError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidInputError, match="empty"):
        e.generate([], GREEDY)


def test_paged_block_mapping_round_trips():
    pool = torch.arange(10 * 4 * 3, dtype=torch.float32).view(10, 4, 3)  # 10 blocks of 4 tokens
    table = [7, 2, 9, 0]
    ids = blocks_for(table, 4, 13, block_size=4)
    assert ids.tolist() == [2, 9, 0]
    got = gather_blocks(pool, ids)
    assert torch.equal(got[1], pool[9])
    target = torch.zeros_like(pool)
    scatter_blocks(target, ids, got)
    assert torch.equal(target[[2, 9, 0]], pool[[2, 9, 0]]) and target[7].abs().sum() == 0
    with pytest.raises(InvalidInputError, match="multiple of the block size"):
        blocks_for(table, 3, 8, block_size=4)
    with pytest.raises(InvalidInputError, match="need 5 blocks"):
        blocks_for(table, 0, 17, block_size=4)


def test_rope_rerotation_moves_keys(model_dir):
    m = Transformer.load(model_dir)
    h = torch.randn(6, m.config.hidden_size)
    _, k_at_0, _ = m.qkv(0, h, torch.arange(6))
    _, k_at_40, _ = m.qkv(0, h, torch.arange(40, 46))
    torch.testing.assert_close(m.rope.rerotate(k_at_0, 40), k_at_40, atol=1e-4, rtol=1e-4)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(InvalidInputError, match="unsupported architectures"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(InvalidInputError, match="config.json"):
        ModelConfig.load(tmp_path)
    with pytest.raises(InvalidInputError, match="multiple of num_kv_heads"):
        ModelConfig(family="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=3, num_kv_heads=2, head_dim=4)


def test_tokenizer_trains_and_round_trips(tmp_path):
    texts = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n"] * 50
    tok = train_tokenizer(texts, tmp_path, vocab_size=300)
    again = load_tokenizer(tmp_path)
    text = "def sub(a, b):\n    return a - b  # ünïcode\n"
    ids = again.encode(text).ids
    assert again.decode(ids) == text and tok.encode(text).ids == ids
    assert (tmp_path / "tokenizer_config.json").is_file()


def test_prefill_kv_is_what_generate_computes(model_dir):
    e = Engine.load(model_dir)
    p = prompt(70, seed=8)
    kv, logits = e.prefill_kv(p)
    assert tuple(kv.shape) == e.kv_spec().chunk_shape(70) and kv.dtype == torch.float16
    torch.testing.assert_close(logits, e.generate(p, SamplingParams(max_new_tokens=1)).first_logits)
    # a store filled from prefill_kv serves generate() exactly like one filled by generate()
    store = KVStore(e.kv_spec(), mem_config(chunk=32, cpu="4MiB"))
    store.put(p, kv)
    e.attach(KVHooks(store))
    got = e.generate(p, GREEDY)
    assert got.hit_tokens == 70 and got.tokens == Engine.load(model_dir).generate(p, GREEDY).tokens
    store.close()


@pytest.mark.parametrize("announced", [True, False])
def test_an_agent_turn_paused_on_a_tool_keeps_its_context(model_dir, announced):
    """Turn 1 of an agent ends in a tool call; while the tool runs, one-off requests fill the
    memory tier. Announced (session= and tool=), the session's context is pinned and turn 2
    reuses it; unannounced, LRU has evicted it. Either way the output is an engine's without
    kvstore, and so is a fresh engine's on the same store."""
    plain = Engine.load(model_dir)
    spec = plain.kv_spec()
    cap = int(2.5 * 208 * spec.bytes_per_token)  # room for two and a half 208-token contexts
    engine, store = with_store(model_dir, mem_config(chunk=32, cpu=cap, tool_default_ttl_s=60.0))
    turn1 = prompt(200, seed=21)
    kw = {"session": "agent-7", "tool": "search"} if announced else {}
    first = engine.generate(turn1, GREEDY, **kw)
    for seed in range(3):  # other users' one-off requests while the tool runs
        engine.generate(prompt(200, seed=100 + seed), GREEDY)
    turn2 = turn1 + first.tokens + prompt(20, seed=22)  # the tool's result appended
    got = engine.generate(turn2, GREEDY, session="agent-7" if announced else None)
    want = plain.generate(turn2, GREEDY)
    assert got.tokens == want.tokens
    torch.testing.assert_close(got.first_logits, want.first_logits, atol=1e-4, rtol=1e-4)
    if announced:
        assert got.hit_tokens >= 192  # the 6 whole chunks of turn 1's context
        assert store.agents.stats().finished == 1 and not store.pins.active()  # released at turn 2
    else:
        assert got.hit_tokens == 0
    fresh = Engine.load(model_dir)
    fresh.attach(engine.hooks)
    again = fresh.generate(turn2, GREEDY)
    assert again.tokens == want.tokens and again.hit_tokens >= 192
    store.close()


def test_a_tool_without_a_session_is_refused(model_dir):
    engine = Engine.load(model_dir)
    with pytest.raises(InvalidInputError, match="session"):
        engine.generate(prompt(10), GREEDY, tool="search")
