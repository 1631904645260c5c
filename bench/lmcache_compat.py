"""The same LMCache 0.5.6 client against LMCache's own server and against `kvstore serve
--lmcache-port`, in one run: store and retrieve GiB/s, lookup latency and each server's peak RSS.

kvstore runs with ``--cpu-prealloc`` (its memory budget reserved and pre-faulted at start, as
LMCache's own local CPU pool is), once with the disk tier written through and once memory only.
The client is a real LMCache engine (local_cpu off, so every retrieve goes to the server) with
Llama-3-8B-shaped KV (32 layers, 8 KV heads, head 128; LMCache keeps it in bfloat16 here), 16
chunks of 256 tokens. It needs the lmcache venv that scripts/test_lmcache.sh creates.

How it ranks on a noisy VM: this machine has phases of seconds to minutes in which every copy
runs up to 3x slower (perf: the kernel's socket copy itself slows), so servers measured one after
another are often measured in different phases. Each round therefore starts all servers fresh,
stores into each in turn, then gives each its own client engine and interleaves their retrieves
one by one in a fresh random order per pass (a retrieve takes ~0.25 s). Ratios are taken within
a round, retrieve k against retrieve k, and reported with a bootstrap interval over rounds. A
second copy of LMCache's server runs as an A/A control: identical code, so its distance from 1.0x
is what noise alone does to a ratio in that run.

    python bench/lmcache_compat.py [--venv .venv-lmcache] [--chunks 16] [--rounds 6] [--retrieves 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(__file__))
from _common import free_port, median, ratio_interval, table  # noqa: E402
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used: the server's own cost, which the client's noise
    (its copies, its allocator, process start) does not blur."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_cmd(python: str, port: int, mode: str, tokens: int, *extra: str) -> list[str]:
    return [python, ENGINE, str(port), mode, str(tokens), *SHAPE, *extra]


# LMCache keys chunks with Python's hash when vLLM is absent: every client must hash alike.
ENGINE_ENV = {**os.environ, "PYTHONHASHSEED": "0"}


def engine(python: str, port: int, mode: str, tokens: int, *extra: str) -> dict:
    out = subprocess.run(engine_cmd(python, port, mode, tokens, *extra), capture_output=True, text=True,
                         env=ENGINE_ENV, timeout=900, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass
class Round:
    """One server's part of one round."""
    store_s: float
    retrieve_s: list[float]  # by one client engine: [0] cold (fresh process), the rest warm
    lookup_ms: float
    rss_mib: float
    store_cpu_s: float       # server CPU during the store
    retrieve_cpu_s: float    # server CPU during all retrieves (the other servers idle meanwhile)


def quiesce(pids: list[int], timeout: float = 60.0) -> None:
    """Wait until the servers are idle (a write-through disk tier is still writing after the
    store) and dirty pages are on disk, so no retrieve pays for another server's writes."""
    os.sync()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(cpu_seconds(pid) for pid in pids)
        time.sleep(0.5)
        if sum(cpu_seconds(pid) for pid in pids) - before < 0.02:
            return


class Client:
    """A retrieving LMCache engine that waits for a go per retrieve (``--on-stdin``)."""

    def __init__(self, python: str, port: int, tokens: int, retrieves: int) -> None:
        self.stderr = tempfile.TemporaryFile()  # its tail goes into any error below
        self.proc = subprocess.Popen(engine_cmd(python, port, "retrieve", tokens, "--repeat", str(retrieves),
                                                "--on-stdin"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=ENGINE_ENV)

    def _failed(self) -> RuntimeError:
        self.stderr.seek(0)
        tail = self.stderr.read()[-2000:].decode(errors="replace")
        return RuntimeError(f"retrieving client exited with {self.proc.wait()}: {tail}")

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        if not json.loads(self.proc.stdout.readline() or "{}").get("ready"):
            raise self._failed()

    def retrieve(self) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise self._failed()
        return json.loads(line)

    def finish(self) -> dict:
        out, _ = self.proc.communicate(timeout=300)  # closing stdin ends its loop
        if self.proc.returncode:
            raise self._failed()
        return json.loads(out.strip().splitlines()[-1])


def one_round(python: str, servers: dict[str, list[str]], ports: dict[str, int], order: list[str], tokens: int,
              retrieves: int) -> dict[str, Round]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    procs = {name: subprocess.Popen(servers[name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
             for name in order}
    clients: dict[str, Client] = {}
    try:
        store, store_cpu, retr_cpu = {}, {}, {}
        for name in order:
            wait_port(ports[name], procs[name])
            c0 = cpu_seconds(procs[name].pid)
            store[name] = engine(python, ports[name], "store", tokens)["seconds"]
            store_cpu[name] = cpu_seconds(procs[name].pid) - c0
        clients = {name: Client(python, ports[name], tokens, retrieves) for name in order}
        for client in clients.values():
            client.wait_ready()  # no retrieve may share the CPUs with another client's start-up
        quiesce([procs[name].pid for name in order])
        cpu0 = {name: cpu_seconds(procs[name].pid) for name in order}
        times: dict[str, list[float]] = {name: [] for name in order}
        shuffle = random.Random(len(order) * 1000 + retrieves)
        for _ in range(retrieves):
            # A fresh random order per pass: a fixed rotation always runs the same server right
            # after the same other one, and the A/A control below showed that costs a few %.
            for name in shuffle.sample(order, len(order)):
                got = clients[name].retrieve()
                if not got["exact"] or got["retrieved"] != tokens:
                    raise RuntimeError(f"{name}: retrieve returned {got}")
                times[name].append(got["seconds"])
        for name in order:
            retr_cpu[name] = cpu_seconds(procs[name].pid) - cpu0[name]
        finals = {name: clients[name].finish() for name in order}
        return {name: Round(store[name], times[name], finals[name]["lookup_ms_p50"], peak_rss_mib(procs[name].pid),
                            store_cpu[name], retr_cpu[name]) for name in order}
    finally:
        for client in clients.values():
            if client.proc.poll() is None:
                client.proc.kill()
        for proc in procs.values():
            proc.terminate()
            proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=os.environ.get("KVSTORE_LMCACHE_VENV", os.path.join(ROOT, ".venv-lmcache")))
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--cpu-capacity", default="1GiB", help="kvstore daemon memory budget")
    ap.add_argument("--rounds", type=int, default=6, help="rounds, each on fresh servers")
    ap.add_argument("--retrieves", type=int, default=8,
                    help="retrieves per server and round, by one client engine each: the first is cold (fresh "
                         "process), the rest warm, as in a long-lived engine")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="leave out the A/A control (a second LMCache server, ranked like the others: its ratio "
                         "is how far this method's noise alone moves a ratio from 1.0)")
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

    def lmcache(port: int) -> list[str]:
        return [python, "-m", "lmcache.v1.server", "127.0.0.1", str(port), "cpu"]

    servers = {"LMCache server": lmcache,
               f"kvstore serve (cpu {args.cpu_capacity} + disk)":
                   lambda p: kvstore(p, "--disk-path", os.path.join(work, f"disk{p}")),
               f"kvstore serve (cpu {args.cpu_capacity} only)": lambda p: kvstore(p, "--no-disk")}
    if args.control:
        servers["LMCache server, 2nd copy (A/A control)"] = lmcache
    names = list(servers)
    results: dict[str, list[Round]] = {name: [] for name in names}
    try:
        for i in tqdm(range(args.rounds), desc="rounds", leave=False):
            ports = {name: free_port() for name in names}
            order = random.Random(i).sample(names, len(names))  # which server stores first, and so on
            got = one_round(python, {n: servers[n](ports[n]) for n in names}, ports, order, tokens, args.retrieves)
            for name in names:
                results[name].append(got[name])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [["server", "store GiB/s", "retrieve GiB/s (warm)", "retrieve GiB/s (cold)", "lookup p50 ms",
             "server CPU s/GiB store", "server CPU s/GiB retrieve", "peak RSS MiB"]]
    for name, runs in results.items():
        rows.append([name, f"{gib / median([r.store_s for r in runs]):.2f}",
                     f"{gib / median([t for r in runs for t in r.retrieve_s[1:]]):.2f}",
                     f"{gib / median([r.retrieve_s[0] for r in runs]):.2f}",
                     f"{median([r.lookup_ms for r in runs]):.2f}",
                     f"{median([r.store_cpu_s for r in runs]) / gib:.2f}",
                     f"{median([r.retrieve_cpu_s for r in runs]) / (gib * args.retrieves):.2f}",
                     f"{max(r.rss_mib for r in runs):.0f}"])
    print(f"{args.chunks} chunks x 256 tokens of Llama-3-8B-shaped bf16 KV ({gib * 1024:.0f} MiB); {args.rounds} "
          f"rounds on fresh servers, each: one store per server, then {args.retrieves} retrieves per server by "
          "one client engine each, interleaved (cold: the first, right after the stores; warm: the rest)")
    print(table(rows))
    theirs_name, *our_names = names
    for name in our_names:
        pairs = list(zip(results[theirs_name], results[name]))
        per_round = {"store": [t.store_s / o.store_s for t, o in pairs],
                     "warm": [median([a / b for a, b in zip(t.retrieve_s[1:], o.retrieve_s[1:])]) for t, o in pairs],
                     "cold": [t.retrieve_s[0] / o.retrieve_s[0] for t, o in pairs]}
        parts = []
        for what, ratios in per_round.items():
            lo, hi = ratio_interval(ratios)
            parts.append(f"{what} {median(ratios):.2f}x [{lo:.2f}-{hi:.2f}]")
        print(f"{name} / LMCache: {', '.join(parts)}")
    print("(each: the median over rounds of that round's paired ratio, [90% bootstrap interval over rounds]; "
          "goals: >= 2x store, >= 1.0x retrieve)")


if __name__ == "__main__":
    main()
