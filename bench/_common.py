"""Helpers shared by the benchmark scripts (not installed; run from a source checkout)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from typing import Callable, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ping(port: int, proc: "subprocess.Popen[bytes] | None" = None) -> None:
    """Until the redis/valkey server on ``port`` answers PING (10 s; sooner an error if ``proc`` exits)."""
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise RuntimeError(f"redis/valkey server on port {port} did not start")
            time.sleep(0.05)
    client.close()


@contextmanager
def redis_server() -> Iterator[str | None]:
    """A throwaway redis-server on a free loopback port; yields its URL (None if not installed)."""
    exe = shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None:
        yield None
        return
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="kvstore-bench-redis-")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ping(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def ratio_interval(ratios: list[float], level: float = 0.9, draws: int = 2000) -> tuple[float, float]:
    """Bootstrap interval of the median of per-round ratios. On these noisy VMs a ratio alone
    cannot say whether 0.95x is slower or a tie: the interval can (resampling rounds, the unit
    that drifts together; a fixed seed, so the same numbers always print the same interval)."""
    rng = random.Random(0)
    meds = sorted(median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    cut = (1 - level) / 2
    return meds[int(cut * draws)], meds[int((1 - cut) * draws) - 1]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def start_daemon(workdir: str, *extra: str, cpu: str = "6GiB") -> tuple[subprocess.Popen, str]:
    """A `kvstore serve` subprocess on a free loopback port (cpu + disk under workdir); yields
    its kvstore:// URL once /readyz answers. The caller terminates it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", "serve", "--port", str(port), "--cpu-capacity", cpu,
                             "--disk-path", os.path.join(workdir, "disk"), "--disk-capacity", "40GiB", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")})
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return proc, f"kvstore://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("daemon did not start")
