"""The same LMCache 0.5.6 client against LMCache's own server and against `kvstore serve
--lmcache-port`, in one run: store and retrieve GiB/s, lookup latency and each server's peak RSS.

The client is a real LMCache engine (local_cpu off, so every retrieve goes to the server) with
Llama-3-8B-shaped KV (32 layers, 8 KV heads, head 128; LMCache keeps it in bfloat16 here), 16
chunks of 256 tokens. It needs the lmcache venv that scripts/test_lmcache.sh creates.

    python bench/lmcache_compat.py [--venv .venv-lmcache] [--chunks 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import free_port, table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = os.path.join(ROOT, "tests", "lmcache_engine.py")
SHAPE = ["--layers", "32", "--heads", "8", "--head-size", "128"]


def wait_port(port: int, proc: subprocess.Popen) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def engine(python: str, port: int, mode: str, tokens: int) -> dict:
    out = subprocess.run([python, ENGINE, str(port), mode, str(tokens), *SHAPE], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "0"}, timeout=900)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(name: str, python: str, server: list[str], port: int, tokens: int) -> list[str]:
    proc = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")})
    try:
        wait_port(port, proc)
        st = engine(python, port, "store", tokens)
        rt = engine(python, port, "retrieve", tokens)
        if not rt.get("exact") or rt.get("retrieved") != tokens:
            raise RuntimeError(f"{name}: retrieve returned {rt}")
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    gib = st["bytes"] / 2**30
    return [name, f"{gib / st['seconds']:.2f}", f"{gib / rt['seconds']:.2f}", f"{rt['lookup_ms_p50']:.2f}", f"{rss:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=os.environ.get("KVSTORE_LMCACHE_VENV", os.path.join(ROOT, ".venv-lmcache")))
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--cpu-capacity", default="1GiB", help="kvstore daemon memory budget")
    args = ap.parse_args()
    python = os.path.join(args.venv, "bin", "python")
    if not os.path.exists(python):
        sys.exit(f"no lmcache venv at {args.venv}: run scripts/test_lmcache.sh first")
    tokens = args.chunks * 256
    work = tempfile.mkdtemp(prefix="kvstore-bench-lm-")
    rows = [["server", "store GiB/s", "retrieve GiB/s", "lookup p50 ms", "peak RSS MiB"]]
    try:
        p1 = free_port()
        rows.append(measure("LMCache server", python, [python, "-m", "lmcache.v1.server", "127.0.0.1", str(p1), "cpu"],
                            p1, tokens))
        p2, http_port = free_port(), free_port()
        rows.append(measure(f"kvstore serve (cpu {args.cpu_capacity} + disk)", python,
                            [sys.executable, "-m", "kvstore", "serve", "--port", str(http_port), "--lmcache-port",
                             str(p2), "--cpu-capacity", args.cpu_capacity, "--disk-path", os.path.join(work, "disk")],
                            p2, tokens))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, theirs = rows[2], rows[1]
    print(f"{args.chunks} chunks x 256 tokens of Llama-3-8B-shaped bf16 KV ({tokens * 32 * 2 * 8 * 128 * 2 / 2**20:.0f} MiB)")
    print(table(rows))
    print(f"kvstore / LMCache: store {float(ours[1]) / float(theirs[1]):.2f}x, retrieve "
          f"{float(ours[2]) / float(theirs[2]):.2f}x (goals: >= 2x store, >= 1.0x retrieve)")


if __name__ == "__main__":
    main()
