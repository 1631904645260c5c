"""A tier and a codec added from outside kvstore: each one class in this file plus a registry
entry, then used through config alone (a dict, a file, env vars) by every store, with no edit to
kvstore (#15)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from typing import Sequence

import pytest
import torch

from conftest import causal_kv, disk_config
from kvstore.codecs import Codec, CodecError, register_codec, unregister_codec
from kvstore.codecs.base import tensor_bytes, tensor_from_bytes
from kvstore import KVStore
from kvstore.blobstore import BlobStore, StoredObject
from kvstore.config import TierConfig, load_config
from kvstore.errors import ConfigError
from kvstore.objects import ObjectMeta, encode_object, join_parts, meta_for
from kvstore.tiers.base import BlobTier, TierContext, TierStats
from kvstore.tiers.registry import COMMON_OPTIONS, TierKind, register_tier, tier_kinds, unregister_tier

SHELVES: dict[str, dict[bytes, bytes]] = {}  # label -> objects: a backend shared by processes


class VaultTier(BlobTier):
    """Objects in a dict shared by every store naming the same ``label``: the smallest honest
    stand-in for an object store (S3, a CXL pool) that outlives the stores using it."""

    def __init__(self, config: TierConfig, context: TierContext) -> None:
        super().__init__(config, context)
        self.objects = SHELVES.setdefault(str(config.extra.get("label", "default")), {})
        self.namespace = context.namespace
        self._lock = threading.Lock()

    def _k(self, key: bytes) -> bytes:
        return self.namespace + key

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [self._k(k) in self.objects for k in keys]

    def get_blobs(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.objects.get(self._k(k)) for k in keys]

    def put_blobs(self, items: Sequence[tuple[ObjectMeta, list[bytes | memoryview]]]) -> int:
        written = 0
        with self._lock:
            for meta, parts in items:
                if self._k(meta.key) not in self.objects:
                    self.objects[self._k(meta.key)] = join_parts(parts)
                    written += 1
        return written

    def delete(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            return sum(self.objects.pop(self._k(k), None) is not None for k in keys)

    def stats(self) -> TierStats:
        mine = [v for k, v in self.objects.items() if k.startswith(self.namespace)]
        return TierStats(objects=len(mine), bytes=sum(map(len, mine)), capacity=None, pinned_bytes=0)


@pytest.fixture
def vault():
    kind = register_tier(TierKind("vault", 35, VaultTier, VaultTier, COMMON_OPTIONS | {"label"}))
    SHELVES.clear()
    yield kind
    unregister_tier("vault")
    SHELVES.clear()


def test_a_registered_tier_takes_its_place_and_options_from_config(vault, tmp_path):
    cfg = load_config({"tiers": {"vault": {"label": "a", "codec": "lz4"}, "cpu": {"capacity": "1MiB"},
                                 "disk": {"path": str(tmp_path), "capacity": "8MiB"}}})
    assert list(cfg.tiers) == ["cpu", "disk", "vault"]  # by rank, not as listed
    assert cfg.tiers["vault"].extra == {"label": "a"} and cfg.tiers["vault"].codec == "lz4"
    assert cfg.to_dict()["tiers"]["vault"]["label"] == "a"
    assert "vault" in tier_kinds()
    with pytest.raises(ConfigError, match=r"unknown option 'lable' for tier 'vault'.*did you mean 'label'"):
        load_config({"tiers": {"vault": {"lable": "a"}}})
    env = {"KVSTORE_TIERS": "cpu,vault", "KVSTORE_VAULT_LABEL": "b", "KVSTORE_CPU_CAPACITY": "2MiB"}
    cfg = load_config(env=env)
    assert list(cfg.tiers) == ["cpu", "vault"] and cfg.tiers["vault"].extra == {"label": "b"}
    path = tmp_path / "kv.yaml"
    path.write_text("tiers:\n  cpu: {capacity: 1MiB}\n  vault: {label: c}\n")
    assert load_config(path).tiers["vault"].extra == {"label": "c"}


def test_unregistered_kinds_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown tier 'vault'"):
        load_config({"tiers": {"vault": {}}})


def test_a_kvstore_writes_reads_promotes_and_verifies_through_the_new_tier(vault, spec):
    toks = list(range(64))
    kv = causal_kv(spec, toks)
    cfg = {"chunk_size": 16, "tiers": {"cpu": {"capacity": "1MiB"}, "vault": {"label": "s", "codec": "lz4"}}}
    with KVStore(spec, cfg) as s:
        assert s.put(toks, kv) == 4  # chunks
        s.flush()
    assert len(SHELVES["s"]) == 4
    with KVStore(spec, cfg) as s:  # a fresh store (another engine): only the vault holds the chunks
        hit, got = s.get(toks)
        assert hit == 64 and torch.equal(got, kv)
        assert s.stats()["tiers"]["cpu"]["promotions"] == 4
        assert s.stats()["tiers"]["vault"]["objects"] == 4
        third = s.chunks(toks)[2].key
    victim = next(k for k in SHELVES["s"] if k.endswith(third))  # flip one payload byte of chunk 3
    bad = bytearray(SHELVES["s"][victim])
    bad[-1] ^= 0xFF
    SHELVES["s"][victim] = bytes(bad)
    with KVStore(spec, cfg) as s:
        hit, got = s.get(toks)
        assert hit == 32 and torch.equal(got, kv[:, :, :32])  # a miss from the bad chunk on, never its bytes
        st = s.stats()
        assert st["tiers"]["vault"]["corrupt"] == 1
    with KVStore(spec, cfg) as s:  # the corrupt object is gone; a later put restores the prefix
        s.put(toks, kv)
        s.flush()
    with KVStore(spec, cfg) as s:
        hit, got = s.get(toks)
        assert hit == 64 and torch.equal(got, kv)


def test_a_blobstore_keeps_objects_in_the_new_tier(vault):
    objs = []
    for i in range(3):
        kv = torch.full((1, 1, 64), float(i)).half()
        meta = meta_for(bytes([i]) * 16, b"f" * 16, kv, False)
        objs.append(StoredObject(bytes([i]) * 16, meta, join_parts(encode_object(meta, kv))))
    cfg = {"tiers": {"cpu": {"capacity": 1000}, "vault": {"label": "d"}}}
    store = BlobStore(cfg)
    store.put(objs)
    store.stack.flush()
    store.close()
    store = BlobStore(cfg)  # a restarted daemon: the vault still has them
    got = store.get([o.storage_key for o in objs], [o.meta.key for o in objs])
    assert [bytes(g) for g in got] == [bytes(o.blob) for o in objs]
    store.close()


class XorCodec(Codec):
    """Every byte XOR 0xA5: lossless, and a stored payload that is not the tensor's bytes."""

    name = "xor"

    def encode(self, kv: torch.Tensor) -> bytes:
        return (torch.frombuffer(bytearray(tensor_bytes(kv)), dtype=torch.uint8) ^ 0xA5).numpy().tobytes()

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if len(payload) != torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size():
            raise CodecError("xor payload has the wrong length")
        raw = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) ^ 0xA5).numpy().tobytes()
        return tensor_from_bytes(raw, shape, dtype)


@pytest.fixture
def xor():
    codec = register_codec(XorCodec())
    yield codec
    unregister_codec("xor")


def disk_store_in(codec: str, spec, path, tokens: int) -> tuple[list[int], torch.Tensor, dict]:
    """``tokens`` tokens stored in a disk-only store whose tier writes ``codec``."""
    toks = list(range(tokens))
    kv = causal_kv(spec, toks)
    cfg = disk_config(path, chunk=16, cpu=None)
    cfg["tiers"]["disk"]["codec"] = codec
    with KVStore(spec, cfg) as s:
        s.put(toks, kv)
        s.flush()
    return toks, kv, cfg


def test_a_registered_codec_is_used_through_config_by_both_read_paths(xor, spec, tmp_path):
    toks, kv, cfg = disk_store_in("xor", spec, tmp_path / "kv", 48)
    files = list((tmp_path / "kv").rglob("*.kvo"))
    assert len(files) == 3 and all(tensor_bytes(kv[:, :, :16]).tobytes() not in f.read_bytes() for f in files)
    with KVStore(spec, cfg) as s:
        hit, got = s.get(toks)
        assert hit == 48 and torch.equal(got, kv)
        load = s.get_layers(toks)
        assert all(torch.equal(layer, kv[i]) for i, layer in load)
        assert load.result()[0] == 48
    unregister_codec("xor")  # a reader without the codec: a miss, never an exception
    with KVStore(spec, {**cfg, "tiers": {"disk": {**cfg["tiers"]["disk"], "codec": "raw"}}}) as s:
        assert s.get(toks)[0] == 0


class FirstLayerCodec(Codec):
    """A buggy codec: decodes only layer 0, a tensor that would broadcast into every layer."""

    name, lossless = "firstlayer", False

    def encode(self, kv: torch.Tensor) -> bytes:
        return tensor_bytes(kv[:1].contiguous()).tobytes()

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return tensor_from_bytes(bytes(payload), (1, *shape[1:]), dtype)


def test_a_codec_decoding_the_wrong_shape_is_a_miss_never_a_broadcast(spec, tmp_path):
    register_codec(FirstLayerCodec())
    try:
        toks = list(range(32))
        cfg = disk_config(tmp_path / "kv", chunk=16, cpu=None)
        cfg["tiers"]["disk"]["codec"] = "firstlayer"
        for read in ("get", "get_layers"):
            with KVStore(spec, cfg) as s:
                s.put(toks, causal_kv(spec, toks))
                s.flush()
            with KVStore(spec, cfg) as s:
                hit = s.get(toks)[0] if read == "get" else s.get_layers(toks).result()[0]
                assert hit == 0 and s.stats()["tiers"]["disk"]["corrupt"] >= 1, read
    finally:
        unregister_codec("firstlayer")


def test_checksummed_cachegen_frames_that_contradict_the_header_are_a_miss(spec, tmp_path):
    from kvstore.codecs import get_codec
    from kvstore.objects import pack_object, read_meta

    toks, kv, cfg = disk_store_in("cachegen", spec, tmp_path / "kv", 32)
    with KVStore(spec, cfg) as s:
        second = s.chunks(toks)[1].key
        path = s.tiers[0].path_of(second)
    meta = read_meta(open(path, "rb").read())[0]
    forged = join_parts(pack_object(meta, get_codec("cachegen").encode(kv[:1, :, 16:32].contiguous()), "cachegen"))
    for read in ("get", "get_layers"):
        with open(path, "wb") as f:  # checksums fine, one layer of frames for a two-layer header
            f.write(forged)
        with KVStore(spec, cfg) as s:
            hit = s.get(toks)[0] if read == "get" else s.get_layers(toks).result()[0]
            assert hit == 16, read  # the first chunk, then a miss: never an exception, never garbage
    with KVStore(spec, cfg) as s:
        assert s.stats()["tiers"]["disk"]["objects"] == 1  # the forged object was removed


class FlakyTier(VaultTier):
    """Raises from every read-side call, as a third-party backend with a bug would."""

    def contains(self, keys):
        raise ConnectionError("backend went away")

    def get_blobs(self, keys):
        raise ConnectionError("backend went away")


def test_a_tier_that_raises_on_reads_is_a_miss_and_a_count(spec):
    register_tier(TierKind("flaky", 36, FlakyTier, FlakyTier, COMMON_OPTIONS | {"label"}))
    try:
        toks = list(range(64))
        kv = causal_kv(spec, toks)
        cfg = {"chunk_size": 16, "tiers": {"cpu": {"capacity": 2 * 16 * spec.bytes_per_token}, "flaky": {}}}
        with KVStore(spec, cfg) as s:
            s.put(toks[:32], kv[:, :, :32])
            assert s.lookup(toks) == 32  # the cpu tier's part of the prefix still counts
            hit, got = s.get(toks)
            assert hit == 32 and torch.equal(got, kv[:, :, :32])
            assert s.get_layers(toks).result()[0] == 32
            assert s.stats()["tiers"]["flaky"]["read_errors"] >= 3
    finally:
        unregister_tier("flaky")


def test_the_registry_keeps_builtins_and_env_words_safe():
    for name in ("cpu", "disk"):
        with pytest.raises(ValueError, match="already registered"):
            register_tier(TierKind(name, 1, VaultTier, VaultTier, COMMON_OPTIONS))
        with pytest.raises(ValueError, match="built in"):
            unregister_tier(name)
    from kvstore.config import StoreConfig
    from kvstore.tiers.registry import RESERVED_NAMES

    for field in dataclasses.fields(StoreConfig):  # a kind named like a field's first word captures its env var
        assert field.name.split("_")[0] in RESERVED_NAMES, field.name
    with pytest.raises(ValueError, match="KVSTORE_CHUNK_"):
        register_tier(TierKind("chunk", 1, VaultTier, VaultTier, COMMON_OPTIONS))
    with pytest.raises(ValueError, match="cannot be options"):
        register_tier(TierKind("bad", 1, VaultTier, VaultTier, COMMON_OPTIONS | {"extra"}))


def test_env_text_options_stay_text():
    cfg = load_config(env={"KVSTORE_REMOTE_URL": "kvstore://h:1", "KVSTORE_REMOTE_API_KEY": "0123456",
                           "KVSTORE_REDIS_URL": "redis://h:1/0", "KVSTORE_REDIS_KEY_PREFIX": "2024"})
    assert cfg.tiers["remote"].api_key == "0123456" and cfg.tiers["redis"].key_prefix == "2024"
    with pytest.raises(ConfigError, match=r"KVSTORE_S3_BUCKET \(no tier kind 's3' is registered"):
        load_config(env={"KVSTORE_S3_BUCKET": "b"})


def test_an_outside_tier_works_through_config_alone_in_a_fresh_process(tmp_path, spec):
    """A package that declares the entry point: `kvstore config` and a store in a new process use
    its tier from a YAML file, with no import in the user's code."""
    site = tmp_path / "site"
    (site / "vaultpkg-1.0.dist-info").mkdir(parents=True)
    (site / "vaultpkg-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vaultpkg\nVersion: 1.0\n")
    (site / "vaultpkg-1.0.dist-info" / "entry_points.txt").write_text("[kvstore.tiers]\nvault = vaultpkg:KIND\n")
    here = os.path.dirname(__file__)
    (site / "vaultpkg.py").write_text(
        f"import sys\nsys.path.insert(0, {here!r})\n"
        "from test_extensions import VaultTier\n"
        "from kvstore.tiers.registry import COMMON_OPTIONS, TierKind\n"
        "KIND = TierKind('vault', 35, VaultTier, VaultTier, COMMON_OPTIONS | {'label'})\n")
    cfg = tmp_path / "kv.yaml"
    cfg.write_text("chunk_size: 16\ntiers:\n  cpu: {capacity: 1MiB}\n  vault: {label: shelf}\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-m", "kvstore", "config", "--config", str(cfg)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and "vault:\n    codec: raw" in r.stdout and "label: shelf" in r.stdout, r.stderr
    script = (f"import sys; sys.path.insert(0, {here!r})\n"
              "import torch\nfrom conftest import causal_kv\nfrom kvstore import KVStore, KVSpec\n"
              "spec = KVSpec(model_id='test/tiny', num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float16)\n"
              f"s = KVStore(spec, {str(cfg)!r})\ntoks = list(range(32))\n"
              "assert s.put(toks, causal_kv(spec, toks)) == 2\ns.flush()\n"
              "print(s.stats()['tiers']['vault']['objects'])\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "2", r.stderr


def test_get_into_an_inference_tensor(spec):
    toks = list(range(32))
    with KVStore(spec, {"chunk_size": 16, "tiers": {"cpu": {"capacity": "1MiB"}}}) as s:
        s.put(toks, causal_kv(spec, toks))
        with torch.inference_mode():
            out = torch.empty(spec.chunk_shape(32), dtype=spec.dtype)
        hit, got = s.get(toks, out=out)
        assert hit == 32 and torch.equal(got, causal_kv(spec, toks))
