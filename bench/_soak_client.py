"""One engine-side client process of bench/soak.py: a KVStore whose only tier is the daemon,
doing a mixed put/get/get_layers/lookup/pin load and checking every hit byte for byte.

What makes the check possible: the KV of token ``t`` is a pure function of ``tokens[:t+1]``
(a rolling xxh64 over the prefix, spread over the KV's values), as a real model's is. So any
process can say what the KV of any prompt must be, a hit on a shared prefix is checked like any
other, and a chunk served for the wrong tokens or model shows up as wrong bytes.

Every put the daemon acknowledged (it answers ``--ack disk``: the disk holds it) is appended to
this client's ack log with the time it returned, so the soak can check after each SIGKILL of the
daemon that nothing acknowledged before the kill was lost.
"""

from __future__ import annotations

import json
import logging
import random
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import xxhash

from kvstore import KVSpec, KVStore

SPEC = KVSpec(model_id="soak/tiny", num_layers=2, num_kv_heads=2, head_size=16, dtype=torch.float16)
CHUNK = 16
# The op mix of one loop: what an engine fleet does, lookups and loads outnumbering stores.
MIX = (("get", 0.40), ("put", 0.25), ("lookup", 0.15), ("pin", 0.10), ("get_layers", 0.10))
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
_LANES = np.arange(int(np.prod(SPEC.chunk_shape(1))), dtype=np.uint64).reshape(SPEC.chunk_shape(1)) * _GOLD


def prompt(client: int, n: int) -> list[int]:
    """The ``n``-th prompt client ``client`` stores: 1-6 chunks, exact multiples of the chunk and
    one token more or less among them, its own first token (a family of its own)."""
    rng = random.Random((client << 32) | n)
    length = CHUNK * rng.randrange(1, 7) + rng.choice((0, 0, 1, -1, 7))
    return [rng.randrange(1, 50_000) for _ in range(max(1, length))]


def causal_kv(tokens: list[int]) -> torch.Tensor:
    """``[layers, 2, len(tokens), heads, head_size]``: position t from tokens[:t+1] only."""
    h, seeds = 0, np.empty(len(tokens), dtype=np.uint64)
    for i, t in enumerate(tokens):
        h = xxhash.xxh64_intdigest(int(t).to_bytes(4, "little"), seed=h)
        seeds[i] = h
    with np.errstate(over="ignore"):
        x = seeds.reshape(1, 1, -1, 1, 1) ^ _LANES
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    vals = ((x >> np.uint64(40)).astype(np.float32) / float(1 << 24) - 0.5) * 8.0
    return torch.from_numpy(vals.astype(np.float16))


def expected_tokens(store: KVStore, tokens: list[int]) -> int:
    """Tokens a put of ``tokens`` stores (the partial tail too, where the config saves it)."""
    refs = store.chunks(tokens, include_partial=store.config.save_partial)
    return refs[-1].end if refs else 0


@dataclass
class Tally:
    """What a load did and what went wrong: one client's, or the sum over clients."""

    ops: dict[str, int] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    acked: int = 0
    unacked: int = 0
    errors: int = 0  # exceptions that reached this engine-side caller: the goal is none
    wrong: int = 0  # hits whose bytes are not the KV of their tokens: the goal is none
    max_latency_s: float = 0.0
    first_errors: list[str] = field(default_factory=list)

    def add(self, other: dict) -> None:
        """Sum another tally (as its JSON dict) into this one."""
        for op, n in other["ops"].items():
            self.ops[op] = self.ops.get(op, 0) + n
        for name in ("hits", "misses", "hit_tokens", "acked", "unacked", "errors", "wrong"):
            setattr(self, name, getattr(self, name) + other[name])
        self.max_latency_s = max(self.max_latency_s, other["max_latency_s"])
        self.first_errors += other["first_errors"][:2]


@dataclass
class ClientReport(Tally):
    client: int = 0


def run(client: int, url: str, workdir: str, seconds: float, rate: float, timeout_s: float) -> None:
    """The client loop: bounded by ``seconds`` and by a count of ``rate * seconds`` ops; writes
    its report to ``workdir/client-N.json``."""
    # The client's own warnings (the daemon unreachable while it restarts...) go to its log file.
    logging.basicConfig(filename=str(Path(workdir) / f"client-{client}.log"), level=logging.WARNING)
    rng = random.Random(1000 + client)
    rep = ClientReport(client=client)
    acks = open(Path(workdir) / f"acks-{client}.log", "a", buffering=1)
    store = KVStore(SPEC, {"chunk_size": CHUNK, "tiers": {"remote": {"url": url, "timeout_s": timeout_s}}})
    mine: list[int] = []  # numbers of this client's stored prompts
    made = 0
    deadline = time.monotonic() + seconds
    limit = int(rate * seconds) + 1
    ops, weights = zip(*MIX)
    for i in range(limit):
        now = time.monotonic()
        if now >= deadline:
            break
        pause = (i / rate) - (now - (deadline - seconds))  # a steady rate, not a burst
        if pause > 0:
            time.sleep(min(pause, deadline - now))
        op = rng.choices(ops, weights)[0] if mine else "put"
        t0 = time.monotonic()
        try:
            if op == "put":
                toks = prompt(client, made)
                want = expected_tokens(store, toks)
                n_chunks = len(store.chunks(toks, include_partial=store.config.save_partial))
                stored = store.put(toks, causal_kv(toks))
                if stored == n_chunks:  # the daemon said its disk holds every chunk
                    acks.write(f"{made} {time.monotonic():.6f} {want}\n")
                    rep.acked += 1
                else:
                    rep.unacked += 1
                mine.append(made)
                made += 1
            else:
                base = prompt(client, rng.choice(mine[-200:]))
                cut = rng.randrange(1, len(base) + 1)
                toks = base[:cut] + ([rng.randrange(50_001, 60_000)] * rng.randrange(0, 20))
                if op == "lookup":
                    hit = store.lookup(toks)
                    assert 0 <= hit <= len(toks), f"lookup said {hit} of {len(toks)} tokens"
                elif op == "pin":
                    store.pin(base, ttl_s=rng.uniform(0.5, 5.0))
                else:
                    _check_get(store, toks, op == "get_layers", rep)
        except Exception as exc:  # what must never happen: an exception in the engine's path
            rep.errors += 1
            if len(rep.first_errors) < 5:
                rep.first_errors.append(f"{op}: {exc!r}\n{traceback.format_exc(limit=4)}")
        rep.ops[op] = rep.ops.get(op, 0) + 1
        rep.max_latency_s = max(rep.max_latency_s, time.monotonic() - t0)
    store.close()
    acks.close()
    (Path(workdir) / f"client-{client}.json").write_text(json.dumps(asdict(rep)))


def _check_get(store: KVStore, toks: list[int], layerwise: bool, rep: ClientReport) -> None:
    if layerwise:
        handle = store.get_layers(toks)
        hit = handle.hit_tokens
        layers = [handle.wait(i) for i in range(SPEC.num_layers)]
        handle.join()
        got = torch.stack(layers) if hit else None
    else:
        hit, got = store.get(toks)
    if not hit:
        rep.misses += 1
        return
    rep.hits += 1
    rep.hit_tokens += hit
    want = causal_kv(toks[:hit])
    assert got is not None
    if got.shape != want.shape or not torch.equal(got.contiguous().view(torch.int16), want.view(torch.int16)):
        rep.wrong += 1
        if len(rep.first_errors) < 5:
            rep.first_errors.append(f"wrong bytes: a hit of {hit} tokens on a {len(toks)}-token prompt")
