"""A fork server for the vLLM test engines: imports vLLM once, then forks one child per engine run.

Why: each engine run is a fresh process (as in production), and about 8 of its ~16 seconds were
Python importing torch, transformers and vLLM again, 26 times per CI run. A child forked from
this process has those modules loaded and nothing else: no engine, no kvstore module, no store
(kvstore is imported only in the child, by the driver and the connector), so each run still
starts from what a new process would have. The child runs ``vllm_driver.main`` with its own
argv, environment, working directory and log file, runs the exit handlers (kvstore flushes and
closes its stores there, vLLM stops its engine processes) and leaves with ``os._exit``, skipping
only the interpreter's teardown.

Protocol (line-delimited JSON on stdin/stdout): a request ``{"argv", "env", "cwd", "log"}``;
the answers ``{"pid": N}`` when the child starts (its own process group, so a timed-out run can
be killed whole) and ``{"status": exit code}`` when it ends.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import traceback

import torch  # noqa: F401
import transformers  # noqa: F401
import vllm  # noqa: F401
from vllm import LLM, SamplingParams  # noqa: F401
from vllm.config import KVTransferConfig  # noqa: F401


def _child(req: dict) -> int:
    os.setpgid(0, 0)
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    sys.argv = list(req["argv"])
    code = 0
    try:
        import vllm_driver

        vllm_driver.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
        code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main() -> None:
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(req))
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
