"""A chaos soak: a daemon (cpu + disk + Redis behind it, ``--ack disk``, fsync on) and four
engine-side client processes (bench/_soak_client.py) under a mixed put/get/lookup/pin load that
checks every hit byte for byte, while faults are injected on a schedule: SIGKILL and restart of
the daemon, SIGKILL and restart of redis-server, random disk files corrupted, the disk filled.

It prints what was done and what went wrong, each beside its goal:

- errors that reached a client (goal 0) and wrong bytes served (goal 0);
- acknowledged objects lost after a daemon SIGKILL + restart (goal 0): after every kill (Redis
  emptied with it, so only the disk can answer) and once more at the end, every prompt the
  daemon acknowledged before the kill is read back whole, each object verified by the daemon;
- time back to full service after each fault (a durable put and a verified get succeed);
- the daemon's peak RSS beside its RSS at start plus its memory tier (reported, not judged: the
  indexes of what the disk holds grow with it).

Exit status 0 only if every goal is met. The disk is a size-limited tmpfs (mounting one needs
root; elsewhere it is a plain directory and the fill fault is reported as skipped). Every loop
is bounded in count and time.

    python bench/soak.py [--minutes 5] [--seconds N] [--clients 4] [--rate 60] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import _soak_client as sc  # noqa: E402
from _common import free_port, table  # noqa: E402
from _load import rss_of  # noqa: E402

from kvstore import KVStore  # noqa: E402
from kvstore.client import DaemonClient  # noqa: E402
from kvstore.errors import CorruptObjectError  # noqa: E402
from kvstore.objects import encode_object, join_parts, meta_for, read_meta  # noqa: E402

CPU = 16 << 20  # the daemon's memory tier: small, so most reads reach the disk
DISK_FS = 512 << 20  # the tmpfs under the disk tier
DISK = 384 << 20  # the disk tier's capacity: room for a 5-minute run without evictions
FAULTS = ("kill_daemon", "corrupt", "kill_redis", "fill_disk")
RECOVERY_LIMIT_S = 60.0


@dataclass
class FaultResult:
    kind: str
    at_s: float
    recovery_s: float | None  # None: not back within RECOVERY_LIMIT_S
    detail: str = ""


@dataclass
class SoakReport(sc.Tally):
    seconds: float = 0.0
    clients: int = 0
    lost: int = 0
    checked: int = 0
    faults: list[FaultResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    peak_rss: int = 0
    rss_budget: int = 0
    daemon_5xx: int = 0
    counted: dict[str, int] = field(default_factory=dict)  # the daemon's own fault counters, over its lives

    def failures(self) -> list[str]:
        out = [f"{n} {what}" for n, what in ((self.errors, "errors reached a client"), (self.wrong, "wrong hits"),
                                              (self.lost, "acknowledged prompts lost")) if n]
        out += [f"{f.kind} at {f.at_s:.0f}s: service not back within {RECOVERY_LIMIT_S:.0f}s"
                for f in self.faults if f.recovery_s is None]
        if not self.acked or not self.hits or not self.checked:
            out.append(f"the load did too little to judge ({self.acked} acknowledged puts, {self.hits} hits, "
                       f"{self.checked} read back after a kill)")
        if self.daemon_5xx:
            out.append(f"the daemon answered {self.daemon_5xx} requests with an internal error")
        return out


class Proc:
    """A server subprocess restartable on the same port."""

    def __init__(self, args: list[str], ready, log: Path) -> None:
        self.args, self.ready, self.log = args, ready, log
        self.proc: subprocess.Popen | None = None

    def start(self, wait_s: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + wait_s
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.args[0]} did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _redis_ok(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.exceptions.RedisError:
        return False


def mount_tmpfs(path: Path, size: int) -> bool:
    """A size-limited tmpfs at ``path`` (root only); False where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


class Soak:
    """The run's processes, files and mount; ``close`` removes all of them, however it ended."""

    def __init__(self, args: argparse.Namespace) -> None:
        exe = shutil.which("redis-server") or shutil.which("valkey-server")
        if exe is None:
            raise SystemExit("soak: redis-server not found (bash scripts/test.sh installs it)")
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="kvstore-soak-"))
        self.disk = self.work / "disk"
        self.mounted = False
        self.clients: list[mp.process.BaseProcess] = []
        self.report = SoakReport(seconds=args.seconds, clients=args.clients)
        rport, self.port = free_port(), free_port()
        self.rport = rport
        self.redis = Proc([exe, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                           "--dir", str(self.work)], lambda: _redis_ok(rport), self.work / "redis.log")
        conf = self.work / "kvstore.json"
        conf.write_text(json.dumps({"serve": {"ack": "disk"}, "tiers": {
            "cpu": {"capacity": CPU},
            "disk": {"path": str(self.disk), "capacity": DISK, "fsync": True},
            "redis": {"url": f"redis://127.0.0.1:{rport}/0", "timeout_s": 0.5}}}))
        self.url = f"kvstore://127.0.0.1:{self.port}"
        self.daemon = Proc([sys.executable, "-m", "kvstore", "serve", "--port", str(self.port), "--config", str(conf)],
                           lambda: _http_ok(f"http://127.0.0.1:{self.port}/readyz"), self.work / "daemon.log")
        self.corrupted: set[bytes] = set()
        self.lost: set[tuple[int, int]] = set()  # (client, prompt) acknowledged and not read back
        self.hasher = KVStore(sc.SPEC, {"chunk_size": sc.CHUNK, "tiers": {"remote": {"url": self.url}}})
        self.t0 = time.monotonic()
        self._probes = 0
        self._stop = threading.Event()

    # ---- the run -------------------------------------------------------------------------

    def run(self) -> SoakReport:
        self.mounted = mount_tmpfs(self.disk, DISK_FS)
        if not self.mounted:
            self.report.skipped.append("fill_disk: no size-limited tmpfs (mounting one needs root)")
        self.redis.start()
        self.daemon.start()
        base_rss = rss_of(self.daemon.pid or 0)
        self.report.rss_budget = base_rss + CPU
        sampler = threading.Thread(target=self._sample_rss, daemon=True)
        sampler.start()
        ctx = mp.get_context("spawn")
        load_s = self.args.seconds
        clients = self.clients = [ctx.Process(target=sc.run, args=(i, self.url, str(self.work), load_s,
                                                                   self.args.rate, 2.0)) for i in range(self.args.clients)]
        self.t0 = time.monotonic()
        for c in clients:
            c.start()
        every = min(20.0, max(5.0, (load_s - 16) / len(FAULTS)))
        at, k = 8.0, 0
        while at < load_s - 4 and k < 1000:
            self._sleep_until(at)
            self.report.faults.append(self._inject(FAULTS[k % len(FAULTS)]))
            k += 1
            at = max(at + every, time.monotonic() - self.t0 + 2)
        for c in clients:
            c.join(load_s + 120)
            if c.is_alive():
                c.kill()
                self.report.first_errors.append(f"client {clients.index(c)} did not stop by itself")
                self.report.errors += 1
        # The end: one more SIGKILL, and every put acknowledged in the whole run must be there.
        self.report.faults.append(self._kill_daemon(final=True))
        self._stop.set()
        self._collect()
        return self.report

    def _sleep_until(self, at: float) -> None:
        left = at - (time.monotonic() - self.t0)
        if left > 0:
            time.sleep(left)

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.2):
            pid = self.daemon.pid
            if pid:
                try:
                    self.report.peak_rss = max(self.report.peak_rss, rss_of(pid))
                except OSError:
                    pass

    def _inject(self, kind: str) -> FaultResult:
        if kind == "kill_daemon":
            return self._kill_daemon()
        if kind == "kill_redis":
            return self._kill_redis()
        if kind == "corrupt":
            return self._corrupt()
        return self._fill()

    # ---- faults --------------------------------------------------------------------------

    def _kill_daemon(self, final: bool = False) -> FaultResult:
        self._add_counters()  # what this life of the daemon counted, before it is gone
        at = time.monotonic()
        self.daemon.kill()
        # Redis is emptied while the daemon is down, so only the disk can answer for what was
        # acknowledged (the daemon writes through to Redis too, which would hide a lost file).
        import redis

        with contextlib.suppress(redis.exceptions.RedisError):
            redis.Redis(port=self.rport, socket_timeout=5).flushall()
        self.daemon.start()
        back = self._until_served(at)
        checked, lost = self._check_acked(before=at)
        self.report.checked = max(self.report.checked, checked)
        self.lost.update(lost)
        self.report.lost = len(self.lost)
        detail = f"{checked} acknowledged prompts read back, {len(lost)} lost" + (
            f" (e.g. client {min(lost)[0]} prompt {min(lost)[1]})" if lost else "")
        return FaultResult("kill_daemon" + (" (end)" if final else ""), at - self.t0, back, detail)

    def _kill_redis(self) -> FaultResult:
        at = time.monotonic()
        self.redis.kill()
        time.sleep(1.0)  # the daemon meets a dead Redis for a while
        self.redis.start()
        before = self._redis_puts()
        deadline = at + RECOVERY_LIMIT_S
        while time.monotonic() < deadline:  # back: the daemon writes through to Redis again
            self._probe()
            if self._redis_puts() > before:
                return FaultResult("kill_redis", at - self.t0, time.monotonic() - at, "down 1 s")
            time.sleep(0.1)
        return FaultResult("kill_redis", at - self.t0, None)

    def _corrupt(self, count: int = 8) -> FaultResult:
        at = time.monotonic()
        files = [p for p in self.disk.rglob("*.kvo")]
        done = 0
        for path in random.Random(len(files)).sample(files, min(count, len(files))):
            try:
                data = bytearray(path.read_bytes())
                key = bytes(read_meta(data)[0].key)
            except (OSError, CorruptObjectError):
                continue  # gone since listed, or already bad
            data[len(data) // 2] ^= 0x5A
            path.write_bytes(bytes(data))
            self.corrupted.add(key)
            done += 1
        return FaultResult("corrupt", at - self.t0, self._until_served(at), f"{done} files changed")

    def _fill(self) -> FaultResult:
        at = time.monotonic()
        if not self.mounted:
            return FaultResult("fill_disk", at - self.t0, 0.0, "skipped: no tmpfs")
        filler = self.disk / "filler"
        with open(filler, "wb") as f:
            try:
                for _ in range(DISK_FS >> 20):  # bounded: the filesystem's size in MiB
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass  # ENOSPC: full
        time.sleep(3.0)  # the daemon's disk writes fail for a while
        refused = 0 if self._probe() else 1
        filler.unlink()
        freed = time.monotonic()
        back = self._until_served(freed)
        return FaultResult("fill_disk", at - self.t0, back, f"full for 3 s; a put while full was "
                           f"{'refused (not acknowledged)' if refused else 'acknowledged'}")

    # ---- checks --------------------------------------------------------------------------

    def _probe(self) -> bool:
        """One durable put and a verified get straight through the daemon's API."""
        self._probes += 1
        key = b"soak-probe" + self._probes.to_bytes(6, "big")
        toks = [60_001 + self._probes % 1000] * sc.CHUNK
        kv = sc.causal_kv(toks)
        blob = join_parts(encode_object(meta_for(key, sc.SPEC.fingerprint, kv, False), kv))
        try:
            client = DaemonClient(self.url, timeout_s=2.0)
            try:
                return client.put([(key, blob)]) == 1 and bytes(client.get([key])[0] or b"") == blob
            finally:
                client.close()
        except Exception:  # the daemon is not back yet
            return False

    def _until_served(self, since: float) -> float | None:
        deadline = since + RECOVERY_LIMIT_S
        while time.monotonic() < deadline:
            if self._probe():
                return time.monotonic() - since
            time.sleep(0.05)
        return None

    def _add_counters(self) -> None:
        try:
            client = DaemonClient(self.url, timeout_s=5.0)
            try:
                tiers = client.stats()["tiers"]
            finally:
                client.close()
        except Exception:
            return
        for tier, entry in tiers.items():
            for name in ("corrupt", "read_errors", "write_errors", "dropped_writes", "evictions"):
                if entry.get(name):
                    label = f"{tier} {name}"
                    self.report.counted[label] = self.report.counted.get(label, 0) + int(entry[name])

    def _redis_puts(self) -> int:
        try:
            client = DaemonClient(self.url, timeout_s=2.0)
            try:
                return int(client.stats()["tiers"]["redis"].get("puts", 0))
            finally:
                client.close()
        except Exception:
            return -1

    def _check_acked(self, before: float) -> tuple[int, set[tuple[int, int]]]:
        """(prompts checked, the lost ones): every prompt a client was told was stored before
        ``before`` is read back whole through the daemon (which verifies every object it reads
        from disk), except those with a chunk this soak corrupted on purpose."""
        prompts: list[tuple[tuple[int, int], list[bytes]]] = []
        for c in range(self.args.clients):
            path = self.work / f"acks-{c}.log"
            lines = path.read_text().splitlines() if path.exists() else []
            for line in lines:
                parts = line.split()
                if len(parts) == 3 and float(parts[1]) < before:
                    n = int(parts[0])
                    keys = [r.key for r in self.hasher.chunks(sc.prompt(c, n), include_partial=True)]
                    if not self.corrupted.intersection(keys):
                        prompts.append(((c, n), keys))
        flat = [k for _id, ks in prompts for k in ks]
        there: list[bool] = []
        client = DaemonClient(self.url, timeout_s=60.0)
        try:
            for i in range(0, len(flat), 512):
                there += [blob is not None for blob in client.get(flat[i:i + 512])]
        finally:
            client.close()
        have = dict(zip(flat, there))
        return len(prompts), {pid for pid, ks in prompts if not all(have[k] for k in ks)}

    def _collect(self) -> None:
        r = self.report
        for c in range(self.args.clients):
            path = self.work / f"client-{c}.json"
            if not path.exists():
                r.errors += 1
                r.first_errors.append(f"client {c} wrote no report (it crashed)")
                continue
            r.add(json.loads(path.read_text()))
        log = (self.work / "daemon.log").read_text(errors="replace")
        r.daemon_5xx = log.count("unhandled error")

    def close(self) -> None:
        self._stop.set()
        for c in self.clients:
            if c.is_alive():
                c.terminate()
                c.join(10)
        self.hasher.close()
        self.daemon.stop()
        self.redis.stop()
        if self.mounted:
            subprocess.run(["umount", str(self.disk)], capture_output=True)
        if self.args.keep:
            print(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def print_report(r: SoakReport) -> None:
    ops = sum(r.ops.values())
    print(f"\n{ops} ops in {r.seconds:.0f} s from {r.clients} clients "
          f"({', '.join(f'{k} {v}' for k, v in sorted(r.ops.items()))}); {r.hits} hits, {r.misses} misses; "
          f"{r.acked} puts acknowledged, {r.unacked} not")
    rows = [["fault", "at", "back after", "what happened"]]
    for f in r.faults:
        rows.append([f.kind, f"{f.at_s:.0f} s", "never" if f.recovery_s is None else f"{f.recovery_s:.2f} s", f.detail])
    print(table(rows))
    rss = r.peak_rss / r.rss_budget if r.rss_budget else 0.0
    rows = [["measure", "result", "goal"],
            ["errors that reached a client", str(r.errors), "0"],
            ["wrong bytes served (hits checked)", f"{r.wrong} ({r.hits})", "0"],
            ["acknowledged prompts lost after SIGKILL", f"{r.lost} (of {r.checked} at the end)", "0"],
            ["daemon internal errors", str(r.daemon_5xx), "0"],
            ["slowest client op", f"{r.max_latency_s:.2f} s", "bounded by timeouts"],
            ["daemon peak RSS / budget", f"{r.peak_rss / 2**20:.0f} / {r.rss_budget / 2**20:.0f} MiB = {rss:.2f}x",
             "reported, not judged"]]
    print(table(rows))
    if r.counted:
        print("the daemon counted: " + ", ".join(f"{k} {v}" for k, v in sorted(r.counted.items())))
    for s in r.skipped:
        print(f"skipped: {s}")
    for e in r.first_errors[:5]:
        print(f"first errors: {e}")


def _terminated(_sig: int, _frame: object) -> None:
    raise SystemExit(143)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="how long the load runs (default 5)")
    ap.add_argument("--seconds", type=float, help="the same in seconds (overrides --minutes)")
    ap.add_argument("--clients", type=int, default=4, help="engine-side client processes (default 4)")
    ap.add_argument("--rate", type=float, default=60.0, help="ops per second per client (default 60)")
    ap.add_argument("--json", help="also write the report to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, disk) afterwards")
    args = ap.parse_args()
    args.seconds = args.seconds if args.seconds is not None else args.minutes * 60
    if args.seconds < 30 or not 1 <= args.clients <= 16 or args.rate <= 0:
        ap.error("needs at least 30 s, 1-16 clients and a positive rate")
    signal.signal(signal.SIGTERM, _terminated)  # a kill from a test's timeout: clean up, then go
    soak = Soak(args)
    try:
        report = soak.run()
    finally:
        soak.close()
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1))
    bad = report.failures()
    print("\nsoak: " + ("every goal met" if not bad else "FAILED: " + "; ".join(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
