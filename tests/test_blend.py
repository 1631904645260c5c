"""CacheBlend on the reference engine: ratio 1 is full prefill, lower ratios reuse documents."""

import random

import pytest
import torch

from conftest import mem_config
from kvstore.connectors.blend import BlendConfig, Blender
from kvstore.connectors.reference import Engine, SamplingParams, build_tiny_model
from kvstore.errors import InvalidInputError
from kvstore.store import KVStore


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine.load(build_tiny_model(tmp_path_factory.mktemp("blend"), num_layers=4, seed=11))


@pytest.fixture
def store(engine):
    with KVStore(engine.kv_spec(), mem_config(chunk=32, cpu="16MiB")) as s:
        yield s


r = random.Random(0)
DOCS = [[r.randrange(6, 4000) for _ in range(n)] for n in (50, 70, 40)]
QUERY = [r.randrange(6, 4000) for _ in range(10)]


def kl(ref_logits, logits):
    p, q = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
    return float((p.exp() * (p - q)).sum())


def test_ratio_one_is_full_prefill(engine, store):
    b = Blender(engine, store, BlendConfig(recompute_ratio=1.0))
    res = b.blend(DOCS, QUERY, prefix=[3, 4, 5])
    kv, logits = engine.prefill_kv(res.tokens)
    assert res.tokens == [3, 4, 5] + sum(DOCS, []) + QUERY
    assert res.reused_tokens == 163 and res.recomputed_tokens == 163 and res.compute_fraction == 1.0
    torch.testing.assert_close(res.logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.kv, kv, atol=2e-3, rtol=2e-3)
    want = engine.generate(res.tokens, SamplingParams(max_new_tokens=8))
    assert b.generate(DOCS, QUERY, SamplingParams(max_new_tokens=8), prefix=[3, 4, 5]).tokens == want.tokens


def test_documents_are_computed_once_and_reused_anywhere(engine, store):
    b = Blender(engine, store)
    first = b.blend(DOCS, QUERY)
    assert first.computed_docs == 3
    again = b.blend(list(reversed(DOCS)), QUERY)  # other positions, same stored KV
    assert again.computed_docs == 0 and again.reused_tokens == 160
    assert again.recomputed_tokens == round(0.15 * 160)


def test_lower_ratios_trade_quality_for_compute(engine, store):
    results = {}
    for ratio in (0.0, 0.15, 0.3):
        res = Blender(engine, store, BlendConfig(recompute_ratio=ratio)).blend(DOCS, QUERY)
        _, full = engine.prefill_kv(res.tokens)
        results[ratio] = (kl(full, res.logits), res.compute_fraction)
    assert results[0.0][1] == pytest.approx(10 / 170)  # full reuse computes the query only
    assert results[0.0][0] > results[0.15][0] > results[0.3][0]
    assert results[0.15][1] < results[0.3][1] < 1.0


def test_gradual_filtering_and_separators(engine, store):
    cfg = BlendConfig(recompute_ratio=0.1, check_layers=(1, 2), separator=(5,))
    assert cfg.ratios() == [0.2, 0.1]
    res = Blender(engine, store, cfg).blend(DOCS, QUERY)
    assert res.tokens == [5] + DOCS[0] + [5] + DOCS[1] + [5] + DOCS[2] + [5] + QUERY
    assert res.reused_tokens == 160 and res.recomputed_tokens == 16
    assert not set(res.selected.tolist()) & {0, 51, 122, 163}  # separators are computed, not "reused"


@pytest.mark.parametrize("kwargs, match", [
    ({"recompute_ratio": 1.5}, "recompute_ratio"),
    ({"check_layers": (0,)}, "layer 0 always runs fully"),
    ({"check_layers": (2, 1)}, "increasing"),
    ({"separator": (-1,)}, "separator"),
])
def test_bad_knobs_are_named(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        BlendConfig(**kwargs)


def test_check_layer_must_exist(engine, store):
    with pytest.raises(InvalidInputError, match="does not exist"):
        Blender(engine, store, BlendConfig(check_layers=(9,)))
    with pytest.raises(InvalidInputError, match="query is empty"):
        Blender(engine, store).blend(DOCS, [])


def test_default_check_layers_fit_the_model():
    cfg = BlendConfig(recompute_ratio=0.1)
    assert cfg.layers_for(6) == (1, 2, 3) and cfg.layers_for(2) == (1,) and cfg.ratios(3) == pytest.approx([0.3, 0.2, 0.1])
    with pytest.raises(InvalidInputError, match="selection"):
        BlendConfig(selection="random")


def test_attention_selection_beats_the_deviation_rule_on_the_trained_model():
    """On real trained weights, the tokens with the largest K/V deviation are mostly ones the query
    barely reads (each document's old attention sinks); ranking by the change in what the query
    reads recovers far more of full prefill at the same ratio. Documents are stdlib source cuts."""
    import sysconfig
    from pathlib import Path

    from kvstore.connectors.reference import DEFAULT_MODEL
    from kvstore.connectors.reference.tokenizer import load_tokenizer

    engine = Engine.load(DEFAULT_MODEL)
    tok = load_tokenizer(DEFAULT_MODEL)
    sep = tok.token_to_id("<|sep|>")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [tok.encode((stdlib / name).read_text(encoding="utf-8")).ids
             for name in ("argparse.py", "inspect.py", "typing.py", "dataclasses.py", "pathlib.py", "enum.py")]
    rng = random.Random(3)
    kls = {"none": [], "deviation": [], "attention": []}
    with KVStore(engine.kv_spec(), mem_config(chunk=64, cpu="256MiB")) as s:
        for _ in range(3):
            cuts = []
            for ids in rng.sample(texts, 5):
                start = rng.randrange(0, len(ids) - 128)
                cuts.append(ids[start:start + 128])
            docs, query = cuts[:4], cuts[4][:32]
            for name, cfg in (("none", BlendConfig(recompute_ratio=0.0, separator=(sep,))),
                              ("deviation", BlendConfig(separator=(sep,), selection="deviation")),
                              ("attention", BlendConfig(separator=(sep,)))):
                res = Blender(engine, s, cfg).blend(docs, query)
                _, full = engine.prefill_kv(res.tokens)
                kls[name].append(kl(full, res.logits))
    mean = {k: sum(v) / len(v) for k, v in kls.items()}
    assert mean["attention"] < 0.5 * mean["deviation"] and mean["deviation"] < mean["none"], mean
