"""A KVStoreConnector that breaks its own store between the scheduler's lookup and the worker's
load, as a disk, a daemon or another process would (used by tests/test_vllm_wrong_kv.py).

vLLM imports it in its worker process (``kv_connector_module_path="vllm_faults"``, with this
directory on PYTHONPATH), so the fault happens exactly where real ones do: after the scheduler
promised the hit, before the worker reads a byte. ``KVTEST_FAULTS`` maps a prompt family (its
first four token ids, comma-joined) to one fault, applied once, at that family's first load:

- ``corrupt``: one byte flipped in every stored chunk the load will read
- ``truncate`` / ``empty``: chunk 3's file cut to half its size / to zero bytes
- ``swap``: chunk 3's file replaced by chunk 4's (a valid object under another name)
- ``evict``: chunk 3 deleted from every tier
- ``kill``: the daemon (``KVTEST_DAEMON``: a JSON file with its pid and command line) killed
  with SIGKILL; started again on the same disk once the load has met no daemon, so later
  requests find it back
- ``restart``: the daemon killed and started again on the same disk before the load
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from kvstore.connectors.vllm import KVStoreConnector
from kvstore.tiers.disk import DiskTier

_DONE: set[str] = set()


def family(tokens: Any) -> str:
    return ",".join(str(int(t)) for t in list(tokens)[:4])


class FaultyKVStoreConnector(KVStoreConnector):
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        plan = json.loads(os.environ.get("KVTEST_FAULTS", "{}"))
        applied = []
        for t in self._get_connector_metadata().loads:
            fam = family(t.tokens)
            if fam in plan and fam not in _DONE:
                _DONE.add(fam)
                apply_fault(plan[fam], self, list(t.tokens))
                applied.append(plan[fam])
        super().start_load_kv(forward_context, **kwargs)  # fetches (or fails to) before returning
        if "kill" in applied:
            restart_daemon(start=True, kill=False)


def apply_fault(fault: str, conn: KVStoreConnector, tokens: list[int]) -> None:
    store = conn.store
    refs = store.chunks(tokens, include_partial=False)
    disk = next((t for t in store.tiers if isinstance(t, DiskTier)), None)
    if fault in ("corrupt", "truncate", "empty", "swap"):
        assert disk is not None, f"fault {fault} needs a disk tier"
        paths = [Path(disk.path_of(r.key)) for r in refs]
        assert all(p.is_file() for p in paths), "the chunks the scheduler found are not on disk"
    if fault == "corrupt":
        for p in paths:
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0xFF
            p.write_bytes(bytes(data))
    elif fault == "truncate":
        os.truncate(paths[3], paths[3].stat().st_size // 2)
    elif fault == "empty":
        os.truncate(paths[3], 0)
    elif fault == "swap":
        paths[3].write_bytes(paths[4].read_bytes())
    elif fault == "evict":
        for tier in store.tiers:
            tier.delete([refs[3].key])
    elif fault in ("kill", "restart"):
        restart_daemon(kill=True, start=fault == "restart")
    else:
        raise ValueError(f"unknown fault {fault!r}")


def restart_daemon(*, kill: bool, start: bool) -> None:
    control = Path(os.environ["KVTEST_DAEMON"])
    info = json.loads(control.read_text())
    if kill:
        os.kill(info["pid"], signal.SIGKILL)
        _wait_dead(info["pid"])
    if start:
        info["pid"] = start_daemon(info["args"], info["port"], Path(info["log"]))
        control.write_text(json.dumps(info))


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it is dead, only not yet reaped by its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        try:  # our own child (a daemon this process started): reap it
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def _wait_dead(pid: int) -> None:
    for _ in range(200):
        if not alive(pid):
            return
        time.sleep(0.05)
    raise RuntimeError(f"process {pid} survived SIGKILL")


def start_daemon(args: list[str], port: int, log: Path) -> int:
    """Start ``kvstore serve`` in its own session and wait until it is ready; returns its pid."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVSTORE_", "KVTEST_", "VLLM_"))}
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc.pid
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"daemon did not start: {log.read_text()[-2000:]}")
