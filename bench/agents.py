"""Agent sessions paused on tool calls, under memory pressure: does pinning with predicted TTLs
keep a session's prefix until its next turn?

A multi-turn agent workload runs on simulated time through a real KVStore (its cpu tier, its
LRU eviction, its pins and their cap). Each session starts with a shared system prompt and
its own task, then alternates an LLM step with a tool call; every turn appends the model's
output and the tool's result to the context, and the next turn's prompt is the whole context.
While a session waits on its tool, other sessions' turns fill the cache.

Policies at the same memory budget:
- lru: no pins;
- fixed TTL: every pause pinned for ``--fixed-ttl`` seconds;
- predicted: ``KVStore.tool_started``/``tool_finished`` (kvstore.agents: a high quantile of the
  tool's observed durations, learned online, a default for tools never seen; tools expected to
  outlast ``--pause-turnovers`` turnovers of the memory tier are not pinned, or ``--pause-limit``
  seconds with ``--pause-turnovers 0``);
- oracle, every pause: pinned exactly until its next turn (known only in a replay). It does
  worse than LRU: long pauses hold the pin budget and crowd out sessions that return sooner;
- oracle, short pauses: the same, for pauses up to ``--pause-limit`` only.
Beside the agents, one-off requests (``--background`` per second, 4K tokens, never asked
again) compete for memory, as a server's other traffic does.
Reported: the next-turn hit ratio (prompt tokens of turns 2+ served from the cache) and prefill
tokens computed, and the share of the LRU-to-oracle gap the predicted TTLs recover (goal: at
least half).

Workload parameters (assumptions, stated here so they can be argued with): sessions arrive as a
Poisson process; 5-30 turns each (uniform); a 2,000-token system prompt shared by all, a
300-1,000-token task; each step outputs 50-400 tokens; tool results are 100-2,000 tokens. Tools
and their durations are lognormal, heavy-tailed, spanning seconds to minutes as agent tool calls
do (web search, code execution, browsing, waiting on a human), in the spirit of the Continuum
paper's observation that tool time is long and varies by tool:

    tool           median   sigma   share of calls
    search           2 s     0.6      40%
    code_exec        8 s     0.9      30%
    browser         20 s     1.0      20%
    human          90 s     1.2      10%
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402

from kvstore import KVSpec, KVStore  # noqa: E402
from kvstore.errors import PinLimitError  # noqa: E402
from kvstore.plan_cli import token_count  # noqa: E402

SPEC = KVSpec(model_id="bench/agents", num_layers=1, num_kv_heads=1, head_size=4, dtype=torch.float16)
TOOLS = {"search": (2.0, 0.6, 0.4), "code_exec": (8.0, 0.9, 0.3), "browser": (20.0, 1.0, 0.2), "human": (90.0, 1.2, 0.1)}
SYSTEM = 2000
STEP_S = 2.0  # an LLM step (prefill + decode) of simulated time
ONE_OFF = 4000  # tokens of a one-off request (background traffic)


@dataclass
class Session:
    sid: int
    turns: int
    context: list[int]
    rng: random.Random
    done: int = 0
    tool: str = ""
    resume_at: float = 0.0


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Result:
    hit: int = 0
    asked: int = 0
    computed: int = 0
    refused: int = 0
    pauses: int = 0
    ttls: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.hit / max(self.asked, 1)


def workload(sessions: int, rate: float, seed: int) -> list[tuple[float, Session]]:
    rng = random.Random(seed)
    system = [rng.randrange(10, 30000) for _ in range(SYSTEM)]
    t, out = 0.0, []
    for sid in range(sessions):
        t += rng.expovariate(rate)
        srng = random.Random(seed * 100003 + sid)
        task = [srng.randrange(10, 30000) for _ in range(srng.randint(300, 1000))]
        out.append((t, Session(sid, srng.randint(5, 30), system + task, srng)))
    return out


def pick_tool(rng: random.Random) -> tuple[str, float]:
    names = list(TOOLS)
    name = rng.choices(names, weights=[TOOLS[n][2] for n in names])[0]
    median, sigma, _share = TOOLS[name]
    return name, rng.lognormvariate(0.0, sigma) * median


def run(policy: str, arrivals: list[tuple[float, Session]], capacity_tokens: int, fixed_ttl: float,
        chunk: int, background: float = 0.0, pause_limit: float = 60.0, seed: int = 0,
        pause_turnovers: float = 2.5) -> Result:
    clock = Clock()
    cfg = {"chunk_size": chunk, "tiers": {"cpu": {"capacity": capacity_tokens * SPEC.bytes_per_token,
                                                  "pin_fraction": 0.5}},
           "tool_default_ttl_s": 30.0, "max_pin_ttl_s": 3600.0, "tool_max_pause_s": pause_limit,
           "tool_pause_turnovers": pause_turnovers}
    res = Result()
    events: list[tuple[float, int, Session | None]] = []
    for t, s in arrivals:  # fresh copies: every policy replays the same sessions
        heapq.heappush(events, (t, s.sid, Session(s.sid, s.turns, list(s.context), random.Random(s.sid * 7 + 1))))
    rng = random.Random(seed + 99)  # one-off requests (never asked again) competing for the memory
    t, n = 0.0, 0
    while background and t < arrivals[-1][0] + 600:
        t += rng.expovariate(background)
        n -= 1
        heapq.heappush(events, (t, n, None))
    longest = SYSTEM + 1000 + 30 * 2400
    kv = torch.zeros(SPEC.chunk_shape(longest), dtype=SPEC.dtype)
    with KVStore(SPEC, cfg, clock=clock) as store:
        while events:
            clock.now, _sid, s = heapq.heappop(events)
            if s is None:
                prompt = [rng.randrange(10, 30000) for _ in range(ONE_OFF)]
                store.lookup(prompt)
                store.put(prompt, kv[:, :, :ONE_OFF])
                continue
            key = f"s{s.sid}"
            if s.done:  # the tool is done: release what this session pinned
                if policy == "predicted":
                    store.tool_finished(key)
                elif policy in ("fixed", "oracle", "oracle-short"):
                    store.unpin(s.context)
            hit = store.lookup(s.context)
            if s.done:
                res.hit += hit
                res.asked += len(s.context)
            res.computed += len(s.context) - hit
            out = [s.rng.randrange(10, 30000) for _ in range(s.rng.randint(50, 400))]
            s.context += out
            store.put(s.context, kv[:, :, :len(s.context)])
            s.done += 1
            if s.done >= s.turns:
                continue
            tool, took = pick_tool(s.rng)
            s.context += [s.rng.randrange(10, 30000) for _ in range(s.rng.randint(100, 2000))]
            res.pauses += 1
            ttl = 0.0
            try:
                if policy == "predicted":
                    ttl = store.tool_started(key, tool, s.context)
                elif policy == "fixed":
                    ttl = fixed_ttl if store.pin(s.context, fixed_ttl) else 0.0
                elif policy == "oracle" or (policy == "oracle-short" and took <= pause_limit):
                    ttl = min(took + STEP_S, 3600.0)
                    ttl = ttl if store.pin(s.context, ttl) else 0.0
            except PinLimitError:  # a pin past the cap: refused, the turn goes on
                ttl = 0.0
            res.refused += policy in ("fixed", "oracle") and ttl == 0.0 or \
                (policy == "oracle-short" and took <= pause_limit and ttl == 0.0)
            res.ttls.append(ttl)
            heapq.heappush(events, (clock.now + STEP_S + took, s.sid, s))
        if policy == "predicted":
            res.refused = store.agents.stats().refused
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--rate", type=float, default=0.5, help="sessions arriving per simulated second")
    ap.add_argument("--background", type=float, default=1.0,
                    help="one-off 4K-token requests per simulated second beside the agents (default 1)")
    ap.add_argument("--capacity", default="300K", help="memory tier in tokens of KV (default 300K)")
    ap.add_argument("--pause-limit", type=float, default=60.0,
                    help="tool_max_pause_s, and the short-pause oracle's limit (default 60)")
    ap.add_argument("--pause-turnovers", type=float, default=2.5, help="tool_pause_turnovers (default 2.5; 0: "
                    "the fixed --pause-limit)")
    ap.add_argument("--fixed-ttl", type=float, default=30.0)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", default="", help="also plot next-turn hit ratio per policy against capacity here")
    args = ap.parse_args()
    cap = int(token_count(args.capacity, "--capacity"))
    arrivals = workload(args.sessions, args.rate, args.seed)
    turns = sum(s.turns for _t, s in arrivals)
    print(f"{args.sessions} sessions, {turns} turns, {args.background:g} one-off requests/s beside them; memory tier "
          f"{cap:,} tokens of KV, pins up to half of it")
    policies = ("lru", "fixed", "predicted", "oracle", "oracle-short")
    caps = [cap // 2, cap, cap * 2] if args.png else [cap]
    results = {(p, c): run(p, arrivals, c, args.fixed_ttl, args.chunk_size, args.background, args.pause_limit,
                           args.seed, args.pause_turnovers) for c in caps for p in policies}
    rows = [["policy", "next-turn hit ratio", "prefill tokens", "vs lru", "pins refused", "mean pin s"]]
    for p in policies:
        r = results[(p, cap)]
        base = results[("lru", cap)]
        label = {"fixed": f"fixed TTL {args.fixed_ttl:g} s", "oracle": "oracle, every pause",
                 "oracle-short": f"oracle, pauses <= {args.pause_limit:g} s"}.get(p, p)
        pinned = [t for t in r.ttls if t > 0]
        rows.append([label, f"{r.ratio:.3f}", f"{r.computed / 1e6:.2f}M", f"{r.computed / base.computed:.2f}x",
                     str(r.refused) if p != "lru" else "-",
                     f"{sum(pinned) / len(pinned):.1f}" if pinned else "-"])
    print(table(rows))
    lru, pred = results[("lru", cap)].ratio, results[("predicted", cap)].ratio
    for name in ("oracle", "oracle-short"):
        best = results[(name, cap)].ratio
        gap = best - lru
        if gap > 0:
            print(f"predicted TTLs recover {(pred - lru) / gap:.0%} of the gap from LRU to the {name} in next-turn "
                  f"hit ratio ({lru:.3f} -> {pred:.3f}, {name} {best:.3f}; goal: at least 50%)")
        else:
            print(f"the {name} is below LRU ({best:.3f} vs {lru:.3f}): no gap to recover")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p in policies:
            ax.plot([c / 1e3 for c in caps], [results[(p, c)].ratio for c in caps], "o-", label=p)
        for c in caps:
            print(f"memory {c:,} tokens: " + ", ".join(f"{p} {results[(p, c)].ratio:.3f}" for p in policies))
        ax.set_xlabel("memory tier (thousand tokens of KV)")
        ax.set_ylabel("next-turn hit ratio")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
