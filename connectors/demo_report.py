"""What ``kvstore demo`` prints and draws: TTFT per workload without and with kvstore, the
speedup in one line, hits per tier, and a PNG. Apart from the demo's driving code so each stays
small; it reads only the served records (``request.workload``, ``request.prompt``, ``ttft_s``,
``hit_tokens``, ``computed_tokens``)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

from kvstore.store import KVStore

WORKLOADS = ("chat", "rag")


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _ttft_ms(served: Sequence[Any], workload: str | None = None) -> list[float]:
    return [1000 * s.ttft_s for s in served if workload is None or s.request.workload == workload]


def speedup(without: Sequence[Any], with_: Sequence[Any], workload: str | None = None) -> float:
    """How many times lower the median TTFT is with kvstore."""
    return statistics.median(_ttft_ms(without, workload)) / max(statistics.median(_ttft_ms(with_, workload)), 1e-9)


def summary(without: Sequence[Any], with_: Sequence[Any]) -> str:
    lines = []
    for label, served in (("without kvstore", without), ("with kvstore", with_)):
        for wl in WORKLOADS:
            rs = [s for s in served if s.request.workload == wl]
            if not rs:
                continue
            ttft = _ttft_ms(rs)
            prompt = sum(len(s.request.prompt) for s in rs)
            hit = sum(s.hit_tokens for s in rs)
            lines.append(f"  {label:<16} {wl:<5} {len(rs):>3} req  TTFT p50 {statistics.median(ttft):7.0f} ms  "
                         f"p90 {percentile(ttft, 0.9):7.0f} ms  prefill {sum(s.computed_tokens for s in rs):>6} "
                         f"of {prompt:>6} tokens ({100 * hit / max(prompt, 1):4.1f}% from kvstore)")
    parts = [f"{wl} {speedup(without, with_, wl):.1f}x" for wl in WORKLOADS
             if any(s.request.workload == wl for s in without)]
    lines.append(f"  TTFT {speedup(without, with_):.1f}x lower with kvstore (median over all requests; "
                 f"{', '.join(parts)})")
    return "\n".join(lines)


def tier_table(store: KVStore) -> str:
    st = store.stats()
    rows = [f"  {'tier':<6} {'hit chunks':>10} {'hit tokens':>10} {'objects':>8} {'stored MiB':>10} "
            f"{'load s':>7} {'evict':>6} {'demote':>6} {'promote':>7} {'corrupt':>7}"]
    for name, t in st["tiers"].items():
        objects = "-" if t["objects"] is None else str(t["objects"])
        stored = "-" if t["bytes"] is None else f"{t['bytes'] / 2**20:.1f}"
        rows.append(f"  {name:<6} {int(t['hits']):>10} {int(t['hit_tokens']):>10} {objects:>8} {stored:>10} "
                    f"{t['load_seconds']:>7.2f} {int(t['evictions']):>6} {int(t['demotions']):>6} "
                    f"{int(t['promotions']):>7} {int(t['corrupt']):>7}")
    return "\n".join(rows)


def plot(path: Path, runs: dict[str, Sequence[Any]], title: str) -> bool:
    """TTFT of every request in request order, log scale, one panel per workload, each with its
    legend and its p50s and speedup in the panel title."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: pip install 'kvstore[demo]' for the plot)")
        return False
    workloads = [wl for wl in WORKLOADS if any(s.request.workload == wl for s in runs["without kvstore"])]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.4), squeeze=False)
    styles = {"without kvstore": ("o", "tab:red"), "with kvstore": ("^", "tab:blue"),
              "after restart": ("s", "tab:green")}
    for ax, wl in zip(axes[0], workloads):
        for label, served in runs.items():
            ys = _ttft_ms(served, wl)
            if not ys:
                continue
            marker, color = styles.get(label, ("x", None))
            p50 = statistics.median(ys)
            ax.plot(range(1, len(ys) + 1), ys, marker=marker, color=color, alpha=0.8, linewidth=1,
                    label=f"{label} (p50 {p50:.0f} ms)")
        ax.set_yscale("log")
        ax.set_title(f"{wl}: TTFT {speedup(runs['without kvstore'], runs['with kvstore'], wl):.1f}x lower "
                     "with kvstore (p50)")
        ax.set_xlabel("request (in order served)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("time to first token (ms, log scale)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"kvstore demo: {title}; TTFT {speedup(runs['without kvstore'], runs['with kvstore']):.1f}x "
                 "lower overall", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
