"""Where kvstore keeps what it can rebuild (the default disk tier, checkpoint digests, codec
profiles): one place, so that ``XDG_CACHE_HOME`` moves all of them."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """``$XDG_CACHE_HOME``, else ``~/.cache``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))


def cache_dir() -> Path:
    """kvstore's own folder under :func:`cache_home`."""
    return cache_home() / "kvstore"
