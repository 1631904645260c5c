"""The same LMCache 0.5.6 client against LMCache's own server and against `kvstore serve
--lmcache-port`, in one run: store and retrieve GiB/s, lookup latency and each server's peak RSS.

kvstore runs with ``--cpu-prealloc`` (its memory budget reserved and pre-faulted at start, as
LMCache's own local CPU pool is), once with the disk tier written through and once memory only.
The client is a real LMCache engine (local_cpu off, so every retrieve goes to the server) with
Llama-3-8B-shaped KV (32 layers, 8 KV heads, head 128; LMCache keeps it in bfloat16 here), 16
chunks of 256 tokens. It needs the lmcache venv that scripts/test_lmcache.sh creates.

    python bench/lmcache_compat.py [--venv .venv-lmcache] [--chunks 16] [--rounds 5]
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
from _common import free_port, median, table  # noqa: E402
from tqdm import tqdm  # noqa: E402

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


def measure(python: str, server: list[str], port: int, tokens: int, retrieves: int
            ) -> tuple[float, list[float], float, float]:
    """One round on a fresh server: (store s, [retrieve s, ...], lookup p50 ms, peak RSS MiB).
    Each retrieve is a fresh client process; the first one follows the store directly."""
    proc = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")})
    try:
        wait_port(port, proc)
        st = engine(python, port, "store", tokens)
        rts = []
        for _ in range(retrieves):
            rts.append(engine(python, port, "retrieve", tokens))
            if not rts[-1].get("exact") or rts[-1].get("retrieved") != tokens:
                raise RuntimeError(f"{server[:3]}: retrieve returned {rts[-1]}")
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return st["seconds"], [r["seconds"] for r in rts], median([r["lookup_ms_p50"] for r in rts]), rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=os.environ.get("KVSTORE_LMCACHE_VENV", os.path.join(ROOT, ".venv-lmcache")))
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--cpu-capacity", default="1GiB", help="kvstore daemon memory budget")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per server (median reported)")
    ap.add_argument("--retrieves", type=int, default=3,
                    help="retrieves per round, each by a fresh client (one 0.3 s pass is too noisy to rank)")
    args = ap.parse_args()
    python = os.path.join(args.venv, "bin", "python")
    if not os.path.exists(python):
        sys.exit(f"no lmcache venv at {args.venv}: run scripts/test_lmcache.sh first")
    tokens = args.chunks * 256
    gib = tokens * 32 * 2 * 8 * 128 * 2 / 2**30
    work = tempfile.mkdtemp(prefix="kvstore-bench-lm-")
    def kvstore(port: int, *tiers: str) -> list[str]:
        return [sys.executable, "-m", "kvstore", "serve", "--port", str(free_port()), "--lmcache-port", str(port),
                "--cpu-capacity", args.cpu_capacity, "--cpu-prealloc", *tiers]

    servers = {"LMCache server": lambda p: [python, "-m", "lmcache.v1.server", "127.0.0.1", str(p), "cpu"],
               f"kvstore serve (cpu {args.cpu_capacity} + disk)":
                   lambda p: kvstore(p, "--disk-path", os.path.join(work, f"disk{p}")),
               f"kvstore serve (cpu {args.cpu_capacity} only)": lambda p: kvstore(p, "--no-disk")}
    results: dict[str, list[tuple[float, list[float], float, float]]] = {name: [] for name in servers}
    try:
        # Alternate the servers round by round: this VM's memory and disk speed drift during a run
        # (first touch of fresh guest memory is slow), and both should see the same drift. Each
        # round also starts with a different server, so no server always runs right after another.
        names = list(servers)
        for i in tqdm(range(args.rounds), desc="rounds", leave=False):
            for name in names[i % len(names):] + names[:i % len(names)]:
                cmd = servers[name]
                port = free_port()
                results[name].append(measure(python, cmd(port), port, tokens, args.retrieves))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [["server", "store GiB/s", "retrieve GiB/s", "first retrieve GiB/s", "lookup p50 ms", "peak RSS MiB"]]
    med: dict[str, tuple[float, float]] = {}
    for name, runs in results.items():
        store_s = median([r[0] for r in runs])
        retr_s = median([t for r in runs for t in r[1]])
        first_s = median([r[1][0] for r in runs])
        med[name] = (gib / store_s, gib / retr_s)
        rows.append([name, f"{gib / store_s:.2f}", f"{gib / retr_s:.2f}", f"{gib / first_s:.2f}",
                     f"{median([r[2] for r in runs]):.2f}", f"{max(r[3] for r in runs):.0f}"])
    print(f"{args.chunks} chunks x 256 tokens of Llama-3-8B-shaped bf16 KV ({gib * 1024:.0f} MiB); "
          f"median of {args.rounds} alternating rounds, fresh servers each round, {args.retrieves} retrieves "
          "per round (first retrieve: the one right after the store)")
    print(table(rows))
    theirs, *ours = med.items()
    for name, (store_gib, retrieve_gib) in ours:
        print(f"{name} / LMCache: store {store_gib / theirs[1][0]:.2f}x, retrieve {retrieve_gib / theirs[1][1]:.2f}x "
              "(goals: >= 2x store, >= 1.0x retrieve)")

if __name__ == "__main__":
    main()
