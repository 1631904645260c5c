"""Per-model codec profiles: how much each layer's KV error costs the model, measured once.

Why: the model's sensitivity to a layer's KV error varies 10x between layers (SmolLM2: layers
5-9 feel a coarser step 10x more than layers 25-29), and nothing in one chunk's KV says which
layers those are. A calibration pass (``kvstore calibrate``, ``kvstore.connectors.calibrate``)
measures it with the model and writes a profile; a lossy codec then gives each layer a step
inversely proportional to the square root of its sensitivity (the allocation that minimizes the
summed error at a given size). On SmolLM2 that is ~20% less KL at the same size.

A profile is keyed by the model fingerprint (``KVSpec.fingerprint``) because that is what every
object carries and it names exactly one model, config and dtype. It only sets encoder step
sizes: every payload carries its own steps, so a profile (present, missing, stale or from
another model) can change the size and accuracy of new payloads but never what any payload
decodes to. Profiles live in ``$KVSTORE_CODEC_PROFILES`` (default
``$XDG_CACHE_HOME/kvstore/profiles``, else ``~/.cache/kvstore/profiles``), one JSON file per
fingerprint; a process reads each fingerprint's file once (a profile written later is used
after a restart).
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from kvstore.paths import cache_dir

log = logging.getLogger(__name__)

MAX_FACTOR = 3.0  # no layer's step strays further than this from the level's


@dataclass(frozen=True)
class CodecProfile:
    """What a calibration measured for one model. ``layer_factors`` multiply the level's step per
    layer (geometric mean 1: the level keeps about its size)."""

    fingerprint: str  # hex of the model fingerprint
    layer_factors: tuple[float, ...]
    model: str = ""  # what was calibrated (for people reading the file)
    level: str = ""  # the codec level the sensitivities were measured at
    sensitivity: tuple[float, ...] = ()  # measured KL per bit saved, per layer group
    groups: tuple[int, ...] = ()  # first layer of each group

    def __post_init__(self) -> None:
        factors = self.layer_factors
        bound = MAX_FACTOR * 1.01  # rounding
        if not factors or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 1 / bound <= f <= bound
                                  for f in factors):
            raise ValueError(f"layer_factors must be numbers within 1/{MAX_FACTOR:g}..{MAX_FACTOR:g}, one per layer "
                             "(a hand-edited profile must not make a level unrecognizable)")
        int(self.fingerprint, 16)  # raises ValueError for anything but hex

    @staticmethod
    def from_sensitivity(fingerprint: bytes, sensitivity: list[float], groups: list[int], layers: int,
                         model: str = "", level: str = "") -> "CodecProfile":
        """Step factors from measured sensitivities: ``(w / geomean(w)) ** -0.5`` per group
        (for KL ~ sum of w * step**2 at a fixed total of log steps, the optimum), bounded by
        MAX_FACTOR, with the geometric mean over the layers at 1."""
        if len(sensitivity) != len(groups) or not groups or groups[0] != 0:
            raise ValueError("one sensitivity per group, groups starting at layer 0")
        floor = max(max(sensitivity), 1e-12) * 1e-3  # a group that measured nothing is not free
        w = [max(s, floor) for s in sensitivity]
        bounds = list(groups) + [layers]
        per_layer = [w[g] for g in range(len(groups)) for _ in range(bounds[g], bounds[g + 1])]
        bound = math.log(MAX_FACTOR)
        logs = [-0.5 * math.log(x) for x in per_layer]

        def clipped_mean(shift: float) -> float:
            return sum(min(bound, max(-bound, v + shift)) for v in logs) / layers

        # The shift that puts the bounded factors' geometric mean at 1 (monotonic: bisection).
        lo, hi = -max(logs) - bound, -min(logs) + bound
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if clipped_mean(mid) < 0 else (lo, mid)
        factors = tuple(round(math.exp(min(bound, max(-bound, v + lo))), 4) for v in logs)
        return CodecProfile(fingerprint.hex(), factors, model, level, tuple(sensitivity), tuple(groups))


def profile_dir() -> Path:
    explicit = os.environ.get("KVSTORE_CODEC_PROFILES")
    if explicit:
        return Path(explicit).expanduser()
    return cache_dir() / "profiles"


_lock = threading.Lock()
_loaded: dict[tuple[Path, bytes], CodecProfile | None] = {}


def profile_for(fingerprint: bytes) -> CodecProfile | None:
    """The profile calibrated for this model, or None. Read once per process and fingerprint
    (under a lock: one read, one warning); nothing about the file, its directory or its
    contents can raise here, in an engine's put: an unreadable, oversized, malformed or foreign
    file is logged once and treated as missing (the codec then uses its rule alone)."""
    where = profile_dir()
    key = (where, fingerprint)
    try:
        return _loaded[key]
    except KeyError:
        pass
    with _lock:
        if key not in _loaded:
            _loaded[key] = _read(where / f"{fingerprint.hex()}.json", fingerprint)
        return _loaded[key]


_MAX_BYTES = 1 << 20  # a profile is a few hundred bytes


def _read(path: Path, fingerprint: bytes) -> CodecProfile | None:
    try:
        # Opened without blocking (a FIFO under the name must not hang an engine) and checked to
        # be a regular file of sane size before a byte is read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except Exception as exc:  # permissions, a name too long, a loop of links...
        log.warning("ignoring codec profile %s: %s", path, exc)
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_BYTES:
                raise ValueError(f"not a regular file of at most {_MAX_BYTES} bytes")
            data = json.loads(f.read(_MAX_BYTES + 1).decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        data["layer_factors"] = tuple(data["layer_factors"])
        for name in ("sensitivity", "groups"):
            data[name] = tuple(data.get(name, ()))
        profile = CodecProfile(**data)
        if profile.fingerprint != fingerprint.hex():
            raise ValueError(f"it is for model {profile.fingerprint[:16]}")
        return profile
    except Exception as exc:  # malformed JSON, too deep, wrong types, another model's
        log.warning("ignoring codec profile %s: %s", path, exc)
        return None


def save_profile(profile: CodecProfile, where: Path | None = None) -> Path:
    """Write atomically (a reader never sees half a file); returns the path."""
    where = where or profile_dir()
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{profile.fingerprint}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(profile), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    with _lock:
        _loaded.pop((where, bytes.fromhex(profile.fingerprint)), None)
    return path


def forget() -> None:
    """Drop what this process has read (tests; a long-lived process after a calibration)."""
    with _lock:
        _loaded.clear()
