"""Replay a Mooncake request trace through kvstore's real tiers (kvstore.planning, as `kvstore
plan` does) and print the prefix-hit token ratio against memory capacity, beside LRU and
Belady's optimum over the same chunk keys and the infinite-capacity bound measured in the same
run, with the replay's speed. The traces ship with kvstore (kvstore/traces), so this runs on a
fresh machine.

    python bench/trace_replay.py [--trace conversation] [--cpu-tokens 0.5M,2M,8M,32M] [--limit N]
"""

from __future__ import annotations

import argparse
import time

from kvstore.planning import plan
from kvstore.plan_cli import LLAMA3_8B, plot, progress_bar, report, token_count
from kvstore.traces import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="conversation", help="conversation, synthetic or a path (default conversation)")
    ap.add_argument("--limit", type=int, help="replay only the first N requests")
    ap.add_argument("--cpu-tokens", default="0.5M,2M,8M,32M", help="memory capacities in tokens")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--png", default="", help="also write the plot here")
    args = ap.parse_args()
    requests = load(args.trace, limit=args.limit)
    caps = [int(token_count(c.strip(), "--cpu-tokens")) for c in args.cpu_tokens.split(",") if c.strip()]
    t0 = time.perf_counter()
    result = plan(requests, [c * LLAMA3_8B for c in caps], [0], LLAMA3_8B, args.chunk_size,
                  ("kvstore", "lru", "belady"), progress_bar)
    secs = time.perf_counter() - t0
    print(f"trace {args.trace}: {len(requests)} requests, {result.total_tokens / 1e6:.1f}M prompt tokens; "
          f"capacities in Llama-3-8B KV ({LLAMA3_8B} B/token)")
    print(report(result, None, ""))
    kv = [p for p in result.points if p.policy == "kvstore"]
    print("kvstore at each capacity, as a share of the bound: "
          + ", ".join(f"{p.cpu_bytes // LLAMA3_8B / 1e6:g}M tokens {p.ratio / result.bound:.2f}" for p in kv))
    print(f"replay: {len(caps)} capacities x {len(requests)} requests in {secs:.1f} s "
          f"({len(caps) * len(requests) / secs:.0f} requests/s through the real store and the simulators)")
    if args.png:
        print(plot(result, args.png, args.trace))


if __name__ == "__main__":
    main()
