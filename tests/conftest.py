"""Shared fixtures: a real redis-server on a free loopback port, small specs, causal test KV."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
import torch

from kvstore import KVSpec

# The benches' helpers for real servers, shared with the tests (bench/ is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from _common import free_port, wait_ping  # noqa: E402,F401  (free_port: tests import it from here)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class RedisServer:
    """A real redis-server subprocess; restartable on the same port (for outage tests)."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server") or shutil.which("valkey-server")
        if exe is None:
            msg = "redis-server not found (bash scripts/test.sh installs it)"
            if IN_CI:
                pytest.fail(msg)
            pytest.skip(msg)
        self.exe = exe
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ping(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def spec() -> KVSpec:
    return KVSpec(model_id="test/tiny", num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float16)


def causal_kv(spec: KVSpec, tokens: list[int]) -> torch.Tensor:
    """KV where position p depends on tokens[0..p] (like a real model), so shared prefixes
    share KV and any mix-up between sequences shows up as a value mismatch."""
    t = torch.tensor(tokens, dtype=torch.int64)
    h = torch.cumsum((t * 2654435761) % 1000003, 0) % 65521
    base = torch.arange(1, 1 + torch.Size(spec.chunk_shape(1)).numel(), dtype=torch.float32).view(spec.chunk_shape(1))
    shape = [1] * base.dim()
    shape[2] = -1
    return ((base / base.numel()) * (h.to(torch.float32).view(shape) / 65521 + 0.25)).to(spec.dtype)


def mem_config(chunk: int = 16, cpu: str | int = "1MiB", **extra: object) -> dict:
    return {"chunk_size": chunk, "tiers": {"cpu": {"capacity": cpu}}, **extra}


def disk_config(path: Path, chunk: int = 16, cpu: str | int | None = "1MiB", disk: str | int = "8MiB",
                **extra: object) -> dict:
    tiers: dict = {"disk": {"path": str(path), "capacity": disk}}
    if cpu is not None:
        tiers["cpu"] = {"capacity": cpu}
    return {"chunk_size": chunk, "tiers": tiers, **extra}


@pytest.fixture(scope="session", params=["redis", "valkey"])
def redis_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator["Cluster"]:
    """A real 3-master, 3-replica cluster of redis-server, then of valkey-server (tests/clusters.py)."""
    from clusters import Cluster

    cluster = Cluster(tmp_path_factory.mktemp(f"{request.param}-cluster"), request.param)
    yield cluster
    cluster.stop()


class stall_writes:
    """Hold a tier's writer thread inside put_blobs until the block exits (deterministic queue tests)."""

    def __init__(self, tier) -> None:
        import threading

        self.tier, self.gate = tier, threading.Event()

    def __enter__(self) -> "stall_writes":
        real = self.tier.put_blobs
        self.tier.put_blobs = lambda items: (self.gate.wait(30), real(items))[1]
        self._real = real
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.tier.put_blobs = self._real


class Daemon:
    """A real `kvstore serve` subprocess on a free loopback port."""

    def __init__(self, workdir: Path, *extra: str, key_file: Path | None = None) -> None:
        import sys

        self.port = free_port()
        self.workdir = workdir
        self.args = [sys.executable, "-m", "kvstore", "serve", "--port", str(self.port),
                     "--disk-path", str(workdir / "disk"), "--cpu-capacity", "256MiB", *extra]
        if key_file is not None:
            self.args += ["--key-file", str(key_file)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"kvstore://127.0.0.1:{self.port}"

    def start(self) -> None:
        import urllib.request

        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        self.log = open(self.workdir / "daemon.log", "ab")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {(self.workdir / 'daemon.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self, sig: int = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self.proc = None
        self.log.close()
        return code


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    if d.proc is not None:
        d.stop()
