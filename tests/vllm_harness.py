"""Runs real vLLM engines for the vLLM test files, each in a fresh process (as in production),
and checks what they left in a store against a reference."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.connectors.reference.weights import DEFAULT_MODEL
from kvstore.errors import CorruptObjectError
from kvstore.objects import decode_payload, read_meta

HERE = Path(__file__).parent
DRIVER = HERE / "vllm_driver.py"
CHUNK, BLOCK = 64, 32  # the driver runs vLLM with block_size=32 (the CPU backend needs multiples of 32)


def require_vllm() -> None:
    """Skip the calling test module where vLLM is not installed, unless KVSTORE_VLLM_TESTS=1
    (scripts/test_vllm.sh, which CI runs) says it must run there."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("KVSTORE_VLLM_TESTS") == "1":
            raise
        pytest.skip("vllm not installed here: scripts/test_vllm.sh runs this file", allow_module_level=True)


def disk_config(path: Path) -> dict:
    return {"chunk_size": CHUNK, "tiers": {"cpu": {"capacity": "64MiB"},
                                           "disk": {"capacity": "256MiB", "path": str(path)}}}


def remote_config(url: str) -> dict:
    return {"chunk_size": CHUNK, "tiers": {"cpu": {"capacity": "64MiB"}, "remote": {"url": url}}}


def run(tmp: Path, name: str, prompts: list, kvstore_config: dict | None, *, multiprocessing: bool = False,
        sequential: bool = False, prefix_caching: bool = False, connector: str | None = None,
        model: Path = DEFAULT_MODEL, hf_overrides: dict | None = None, env: dict | None = None,
        pause_s: float = 0.0, extra: tuple[str, ...] = (), kv_params: list | None = None) -> list:
    """One engine over ``prompts``; returns per prompt its tokens, logprobs and cached tokens."""
    (tmp / f"{name}.prompts.json").write_text(json.dumps(prompts))
    cmd = [sys.executable, str(DRIVER), "--model", str(model), "--prompts", str(tmp / f"{name}.prompts.json"),
           "--out", str(tmp / f"{name}.out.json")]
    if sequential:
        cmd.append("--sequential")
    if prefix_caching:
        cmd.append("--prefix-caching")
    if connector:
        cmd += ["--connector", connector]
    if pause_s:
        cmd += ["--pause", str(pause_s)]
    if hf_overrides:
        cmd += ["--hf-overrides", json.dumps(hf_overrides)]
    if kv_params is not None:
        cmd += ["--kv-params", json.dumps(kv_params)]
    if kvstore_config is not None:
        cmd += ["--kvstore-config", json.dumps(kvstore_config)]
    cmd += list(extra)
    # KVSTORE_* variables configure the connector's store (an unknown one is an error): pass none.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    full_env.update(VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocessing else "0", VLLM_CPU_KVCACHE_SPACE="1",
                    PYTHONPATH=os.pathsep.join([str(HERE), full_env.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    log = tmp / f"{name}.log"
    code = _Zygote.get().run(cmd[1:], full_env, tmp, log, timeout=600)
    assert code == 0, log.read_text(errors="replace")[-8000:]
    return json.loads((tmp / f"{name}.out.json").read_text())


class _Zygote:
    """The session's fork server (tests/vllm_zygote.py): vLLM imported once, a forked child
    per engine run. Started on first use, stopped at exit."""

    _one: "_Zygote | None" = None

    @classmethod
    def get(cls) -> "_Zygote":
        if cls._one is None or cls._one.proc.poll() is not None:
            cls._one = cls()
        return cls._one

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen([sys.executable, str(HERE / "vllm_zygote.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=HERE)
        atexit.register(self.stop)

    def _answer(self, deadline: float) -> dict:
        assert self.proc.stdout is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError("the vLLM fork server exited")
                return json.loads(line)

    def run(self, argv: list[str], env: dict, cwd: Path, log: Path, timeout: float) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "cwd": str(cwd), "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        pid = self._answer(deadline)["pid"]
        try:
            return int(self._answer(deadline)["status"])
        except TimeoutError:
            os.killpg(pid, signal.SIGKILL)
            self._answer(time.monotonic() + 30)
            raise AssertionError(f"the engine run timed out after {timeout} s: {log}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def same_output(got: dict, want: dict, tol: float = 1e-4) -> str | None:
    """None if ``got`` generated what ``want`` did (tokens exactly, logprobs within ``tol``)."""
    if got["tokens"] != want["tokens"]:
        first = next(i for i, (a, b) in enumerate(zip(got["tokens"] + [None], want["tokens"])) if a != b)
        return f"tokens differ from position {first}: {got['tokens']} vs {want['tokens']}"
    worst = max((abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])), default=0.0)
    if worst > tol:
        return f"logprobs differ by up to {worst:.4f}"
    return None


def stored_objects(root: Path) -> dict[bytes, torch.Tensor]:
    """Every object under ``root`` that passes verification, by chunk key (what a reader would
    serve); objects that fail it are never served, so they are skipped."""
    out: dict[bytes, torch.Tensor] = {}
    for f in root.rglob("*.kvo"):
        try:
            meta, payload = read_meta(f.read_bytes())
            out[bytes(meta.key)] = decode_payload(meta, payload)
        except CorruptObjectError:
            continue
    return out


def foreign_objects(root: Path, reference: dict[bytes, Any], atol: float = 1e-3) -> list[str]:
    """Objects under ``root`` that are not the KV of their tokens: a key the fault-free
    reference run never stored, or values away from the reference's."""
    bad = []
    for key, kv in stored_objects(root).items():
        ref = reference.get(key)
        if ref is None:
            bad.append(f"{key.hex()[:12]}: a key the reference run never stored")
        elif ref.shape != kv.shape or not torch.allclose(kv.float(), ref.float(), atol=atol, rtol=0):
            diff = (kv.float() - ref.float()).abs().max().item() if ref.shape == kv.shape else float("inf")
            bad.append(f"{key.hex()[:12]}: differs from the reference by up to {diff:.3g}")
    return bad
