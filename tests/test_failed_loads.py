"""After a failed load, nothing wrong is served: not to the request, not to a later request in
the same engine, not to a fresh engine on the same store, and nothing wrong is stored.

Each in-process connector (the reference engine, contiguous and paged; HF transformers;
CacheBlend) runs its prompt with a store whose disk objects were corrupted, or whose load
delivers layer 0 then writes garbage into the engine's buffer and fails. The outputs are
compared with an engine without kvstore; the objects left on disk with a clean engine's.
"""

import random

import pytest
import torch

from conftest import disk_config
from kvstore.connectors.blend import BlendConfig, Blender
from kvstore.connectors.hooks import KVHooks
from kvstore.connectors.reference import Engine, SamplingParams, build_tiny_model
from kvstore.errors import CorruptObjectError
from kvstore.reads import ChunkRead
from kvstore.objects import decode_payload, read_meta
from kvstore.store import KVStore

PARAMS = SamplingParams(max_new_tokens=6)
r = random.Random(3)
PROMPT = [r.randrange(6, 4000) for _ in range(150)]
DOCS = [[r.randrange(6, 4000) for _ in range(n)] for n in (64, 70)]
QUERY = [r.randrange(6, 4000) for _ in range(12)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("faults"), num_layers=4, seed=21, dtype=torch.float32)


def config(tmp_path):
    return disk_config(tmp_path / "kv", chunk=32, cpu="8MiB", disk="64MiB")


def corrupt_disk(tmp_path):
    files = list((tmp_path / "kv").rglob("*.kvo"))
    assert files
    for f in files:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))


def garbage_after_layer_0(monkeypatch):
    """The next load copies layer 0, scribbles over every later layer of the engine's buffer,
    then fails: the worst a broken transfer can leave behind."""
    real = ChunkRead.copy_layer
    armed = [True]

    def broken(self, layer):
        if not armed[0] or layer == 0:
            return real(self, layer)
        armed[0] = False
        self.out[1:, :, :self.hit_tokens].fill_(1e4)
        raise RuntimeError("transfer broke after layer 0")

    monkeypatch.setattr(ChunkRead, "copy_layer", broken)
    return armed


def stored(tmp_path):
    out = {}
    for f in (tmp_path / "kv").rglob("*.kvo"):
        try:
            meta, payload = read_meta(f.read_bytes())
        except CorruptObjectError:
            continue
        out[bytes(meta.key)] = decode_payload(meta, payload)
    return out


# ---- the connectors, each as: run(store_config) -> (tokens, logits) -------------------------

class ReferenceRunner:
    def __init__(self, model_dir, paged=False):
        self.model_dir, self.paged = model_dir, paged

    def plain(self):
        return Engine.load(self.model_dir, paged=self.paged).generate(PROMPT, PARAMS)

    def open(self, cfg):
        engine = Engine.load(self.model_dir, paged=self.paged)
        store = KVStore(engine.kv_spec(), cfg)
        engine.attach(KVHooks(store))
        return engine, store

    def run(self, handle):
        engine, store = handle
        g = engine.generate(PROMPT, PARAMS)
        store.flush()
        return g.tokens, g.first_logits

    def close(self, handle):
        handle[1].close()


class BlendRunner(ReferenceRunner):
    def open(self, cfg):
        engine = Engine.load(self.model_dir)
        store = KVStore(engine.kv_spec(), cfg)
        return Blender(engine, store, BlendConfig(recompute_ratio=1.0)), store

    def run(self, handle):
        blender, store = handle
        g = blender.generate(DOCS, QUERY, PARAMS)
        store.flush()
        return g.tokens, g.first_logits

    def close(self, handle):
        handle[0].close()
        handle[1].close()


class HFRunner:
    def __init__(self, model_dir):
        transformers = pytest.importorskip("transformers")
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.ids = torch.tensor([PROMPT])

    def _generate(self, fn):
        out = fn(self.ids, max_new_tokens=PARAMS.max_new_tokens, do_sample=False, output_scores=True,
                 return_dict_in_generate=True)
        return out.sequences[0, len(PROMPT):].tolist(), out.scores[0][0]

    def plain(self):
        return self._generate(self.model.generate)

    def open(self, cfg):
        from kvstore.connectors.hf import HFConnector

        return HFConnector(self.model, cfg)

    def run(self, conn):
        got = self._generate(conn.generate)
        conn.flush()
        return got

    def close(self, conn):
        conn.close()


def _runner(kind, model_dir):
    if kind == "hf":
        return HFRunner(model_dir)
    if kind == "blend":
        return BlendRunner(model_dir)
    return ReferenceRunner(model_dir, paged=kind == "paged")


def _baseline(kind, runner, tmp_path):
    """What an engine without kvstore generates (for CacheBlend at ratio 1: full prefill)."""
    if kind != "blend":
        g = runner.plain()
        return (g.tokens, g.first_logits) if hasattr(g, "tokens") else g
    engine = Engine.load(runner.model_dir)
    tokens, _ = Blender(engine, KVStore(engine.kv_spec(), {"tiers": {"cpu": {"capacity": "8MiB"}}}),
                        BlendConfig(recompute_ratio=1.0)).assemble(DOCS, QUERY)
    g = engine.generate(tokens, PARAMS)
    return g.tokens, g.first_logits


@pytest.mark.parametrize("fault", ["corrupt_disk", "garbage_after_layer_0"])
@pytest.mark.parametrize("kind", ["contiguous", "paged", "hf", "blend"])
def test_failed_load_serves_and_stores_nothing_wrong(tmp_path, model_dir, monkeypatch, kind, fault):
    runner = _runner(kind, model_dir)
    want_tokens, want_logits = _baseline(kind, runner, tmp_path)
    cfg = config(tmp_path)

    def check(got, what):
        tokens, logits = got
        assert tokens == want_tokens, what
        torch.testing.assert_close(logits.float(), want_logits.float(), atol=1e-4, rtol=1e-4, msg=what)

    first = runner.open(cfg)  # fills the store
    check(runner.run(first), "storing run")
    runner.close(first)
    clean = stored(tmp_path)
    assert clean

    armed = None
    if fault == "corrupt_disk":
        corrupt_disk(tmp_path)
    else:
        armed = garbage_after_layer_0(monkeypatch)
    handle = runner.open(cfg)
    check(runner.run(handle), "the faulted request")
    assert armed in (None, [False])  # the broken transfer did happen
    check(runner.run(handle), "a later request in the same engine")
    runner.close(handle)
    fresh = runner.open(cfg)
    check(runner.run(fresh), "a fresh engine on the same store")
    runner.close(fresh)
    for key, kv in stored(tmp_path).items():
        assert key in clean and torch.allclose(kv, clean[key], atol=1e-5, rtol=0), "a wrong object was stored"
