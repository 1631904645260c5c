"""The real clusters of bench/_cluster.py, for tests: a missing server or redis-cli fails in CI
and skips elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import IN_CI  # conftest puts bench/ on the path
from _cluster import Cluster as _Cluster
from _cluster import cli_binary, failover_load, server_binary  # noqa: F401


def require(what: str, found: str | None) -> str:
    if found is None:
        msg = f"{what} not found (bash scripts/test.sh installs it)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def Cluster(workdir: Path, flavour: str = "redis", **kw: object) -> _Cluster:  # noqa: N802
    """3 masters + 3 replicas of redis-server or valkey-server."""
    return _Cluster(workdir, require(f"{flavour}-server", server_binary(flavour)),
                    require("redis-cli", cli_binary()), flavour, **kw)
