"""A disk that hangs (a real ext4 image frozen with fsfreeze: writes block until it thaws) under
the daemon: reads from memory, /healthz and every request's answer keep their times; only the
puts that need the disk wait, up to the request timeout. Needs root (CI runs as root)."""

import os
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import Daemon
from kvstore.client import DaemonClient
from test_serve_ops import obj


@pytest.fixture
def frozen_fs(tmp_path):
    """A 64 MiB ext4 image mounted at tmp_path/mnt; yields (mount point, freeze, thaw)."""
    img, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    need = [shutil.which(t) for t in ("mkfs.ext4", "fsfreeze", "mount")]
    ok = all(need)
    if ok:
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        ok = (subprocess.run(["mkfs.ext4", "-q", str(img)], capture_output=True).returncode == 0
              and subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True).returncode == 0)
    if not ok:
        if os.environ.get("CI") == "true":
            raise RuntimeError("cannot mount an ext4 image for the hung-disk test (needs root, e2fsprogs, util-linux)")
        pytest.skip("a frozen file system needs root, mkfs.ext4 and fsfreeze")

    def freeze():
        subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)

    def thaw():
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)

    try:
        yield mnt, freeze, thaw
    finally:
        thaw()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("ack", ["memory", "disk"])
def test_a_hung_disk_holds_up_only_the_puts_that_need_it(tmp_path, frozen_fs, ack):
    mnt, freeze, thaw = frozen_fs
    d = Daemon(tmp_path, "--disk-path", str(mnt / "kv"), "--disk-capacity", "32MiB", "--cpu-capacity", "64MiB",
               "--request-timeout-s", "3", "--ack", ack)  # the last --disk-path wins: the frozen one
    client = DaemonClient(d.url, timeout_s=15)
    try:
        warm = [(i.to_bytes(16, "big"), obj(i.to_bytes(16, "big"))) for i in range(20)]
        assert client.put(warm) == 20
        freeze()
        answers: list[float] = []

        def put(j: int) -> None:
            c = DaemonClient(d.url, timeout_s=15)
            t0 = time.monotonic()
            try:  # 50 objects a request: a body that fills a writer queue halfway through
                c.put([((1000 + 100 * j + i).to_bytes(16, "big"), obj((1000 + 100 * j + i).to_bytes(16, "big")))
                       for i in range(50)])
            except Exception:  # a 503 at the request timeout is an answer too
                pass
            answers.append(time.monotonic() - t0)
            c.close()

        threads = [threading.Thread(target=put, args=(j,)) for j in range(10)]
        for t in threads:
            t.start()
        slowest = 0.0
        for _ in range(12):  # while the puts wait: memory reads and /healthz answer at once
            time.sleep(0.5)
            t0 = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{d.port}/healthz", timeout=10) as r:
                assert r.status == 200
            assert all(g is not None for g in client.get([k for k, _ in warm[:5]]))
            slowest = max(slowest, time.monotonic() - t0)
        assert slowest < 1.0, f"the event loop waited {slowest:.1f} s on the frozen disk"
        for t in threads:
            t.join(30)
        assert len(answers) == 10 and max(answers) < 3 + 5, answers  # each at its request timeout at most
        thaw()
        deadline = time.monotonic() + 30
        while client.put([(b"z" * 16, obj(b"z" * 16))]) != 1:
            assert time.monotonic() < deadline, "puts did not recover after the disk thawed"
            time.sleep(0.2)
    finally:
        thaw()
        client.close()
        assert d.stop() == 0
