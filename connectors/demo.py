"""``kvstore demo``: time to first token with and without kvstore, on a real (small) model.

The reference engine runs the committed trained model over two workloads, a multi-turn chat
(every turn resends the whole conversation) and questions over shared documents, first with no
cache and then with kvstore. Greedy outputs must be identical both ways: the demo checks it.
A third pass opens a new store over the same directory to show the disk tier serving a restart.
"""

from __future__ import annotations

import random
import statistics
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvstore.config import StoreConfig
from kvstore.connectors.hooks import KVHooks
from kvstore.connectors.reference import DEFAULT_MODEL, Engine, SamplingParams
from kvstore.connectors.reference.tokenizer import load_tokenizer
from kvstore.store import KVStore


# Served-from-cache logits must match recomputed ones to rounding; wrong KV moves them by O(1).
LOGIT_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Request:
    workload: str  # "chat" or "docs"
    prompt: tuple[int, ...]


@dataclass
class Served:
    request: Request
    ttft_s: float
    hit_tokens: int
    computed_tokens: int
    output: list[int]
    first_logits: torch.Tensor


def _texts(seed: int) -> list[str]:
    """Local text to build prompts from: this machine's Python sources (the model's domain)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    random.Random(seed).shuffle(files)
    out = []
    for p in files[:64]:
        try:
            out.append(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return out


class Workloads:
    """Prompts as token ids, deterministic for a seed."""

    def __init__(self, model_dir: Path, seed: int = 0) -> None:
        self.tok = load_tokenizer(model_dir)
        self.rng = random.Random(seed)
        self.pool = [self.tok.encode(t).ids for t in _texts(seed)]
        self.pool = [ids for ids in self.pool if len(ids) > 2048]
        self.sep = self.tok.token_to_id("<|sep|>")
        self.user = self.tok.token_to_id("<|user|>")
        self.assistant = self.tok.token_to_id("<|assistant|>")

    def snippet(self, n: int) -> list[int]:
        ids = self.rng.choice(self.pool)
        start = self.rng.randrange(0, len(ids) - n)
        return ids[start:start + n]

    def chat(self, users: int, turns: int, system_len: int, msg_len: int) -> tuple[list[int], list[list[list[int]]]]:
        """A shared system prompt and each user's messages; the replies come from the model."""
        system = self.snippet(system_len)
        return system, [[self.snippet(self.rng.randint(msg_len // 2, msg_len)) for _ in range(turns)]
                        for _ in range(users)]

    def documents(self, docs: int, questions: int, doc_len: int) -> list[Request]:
        bodies = [self.snippet(doc_len) for _ in range(docs)]
        return [Request("docs", tuple(bodies[d] + [self.sep] + self.snippet(self.rng.randint(24, 64))))
                for _q in range(questions) for d in range(docs)]


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _serve_chat(engine: Engine, w: Workloads, system: list[int], msgs: list[list[list[int]]],
                params: SamplingParams, bar: tqdm) -> list[Served]:
    """Each turn's prompt is the whole conversation so far, the model's own replies included."""
    histories = [list(system) for _ in msgs]
    out = []
    for turn in range(len(msgs[0])):
        for u, user_msgs in enumerate(msgs):
            prompt = histories[u] + [w.user] + user_msgs[turn] + [w.assistant]
            out.append(_serve(engine, Request("chat", tuple(prompt)), params))
            histories[u] = prompt + out[-1].output
            bar.update()
    return out


def _serve(engine: Engine, req: Request, params: SamplingParams) -> Served:
    g = engine.generate(req.prompt, params)
    return Served(req, g.ttft_s, g.hit_tokens, g.computed_tokens, g.tokens, g.first_logits)


def _tier_table(store: KVStore) -> str:
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


def _summary(label: str, served: list[Served]) -> str:
    lines = []
    for wl in ("chat", "docs"):
        rs = [s for s in served if s.request.workload == wl]
        if not rs:
            continue
        ttft = [1000 * s.ttft_s for s in rs]
        prompt = sum(len(s.request.prompt) for s in rs)
        hit = sum(s.hit_tokens for s in rs)
        lines.append(f"  {label:<16} {wl:<5} {len(rs):>4} req  TTFT p50 {statistics.median(ttft):7.1f} ms  "
                     f"p90 {_percentile(ttft, 0.9):7.1f} ms  prefill {sum(s.computed_tokens for s in rs):>6} "
                     f"of {prompt:>6} tokens ({100 * hit / max(prompt, 1):4.1f}% from kvstore)")
    return "\n".join(lines)


def _plot(path: Path, runs: dict[str, list[Served]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: pip install 'kvstore[demo]' for the plot)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, wl in zip(axes, ("chat", "docs")):
        for (label, served), marker in zip(runs.items(), "o^s"):
            rs = [s for s in served if s.request.workload == wl]
            ax.scatter([len(s.request.prompt) for s in rs], [1000 * s.ttft_s for s in rs], label=label,
                       marker=marker, alpha=0.75)
        ax.set_title(f"{wl}: TTFT vs prompt length")
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("time to first token (ms)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_demo(config: StoreConfig, *, model_dir: Path = DEFAULT_MODEL, users: int = 4, turns: int = 4,
             docs: int = 4, questions: int = 4, quick: bool = False, keep: bool = False,
             plot: Path | None = Path("kvstore-demo.png")) -> int:
    if quick:
        users, turns, docs, questions = min(users, 2), min(turns, 3), min(docs, 2), min(questions, 2)
    system_len, msg_len, doc_len = (256, 96, 512) if quick else (512, 192, 1536)
    params = SamplingParams(max_new_tokens=8 if quick else 16, stop_at_eos=False)
    torch.manual_seed(0)
    engine = Engine.load(model_dir)
    spec = engine.kv_spec()
    w = Workloads(model_dir)
    system, msgs = w.chat(users, turns, system_len, msg_len)
    doc_requests = w.documents(docs, questions, doc_len)
    c = engine.config
    print(f"kvstore demo: model {spec.model_id} ({c.num_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_kv_heads} KV heads x {c.head_dim}), KV {spec.bytes_per_token // 1024} KiB/token, "
          f"{torch.get_num_threads()} CPU threads")
    tiers = ", ".join(f"{k} ({(t.capacity or 0) / 2**30:.1f} GiB)" if t.capacity else k
                      for k, t in config.tiers.items())
    print(f"kvstore tiers: {tiers}; chunk {config.chunk_size} tokens")
    print(f"workloads: chat {users} users x {turns} turns over a {system_len}-token system prompt; "
          f"docs {docs} documents of {doc_len} tokens x {questions} questions each")
    engine.generate(w.snippet(64), SamplingParams(max_new_tokens=2))  # warm-up (first-call allocations)

    runs: dict[str, list[Served]] = {}
    total = users * turns + len(doc_requests)
    with KVStore(spec, config) as store:
        store.clear()  # this model's namespace only, so "with kvstore" starts cold
        for label, hooks in (("without kvstore", None), ("with kvstore", KVHooks(store))):
            engine.hooks = hooks
            with tqdm(total=total, desc=label, unit="req", leave=False) as bar:
                served = _serve_chat(engine, w, system, msgs, params, bar)
                for req in doc_requests:
                    served.append(_serve(engine, req, params))
                    bar.update()
            runs[label] = served
            if hooks is not None:
                hooks.close()
        store.flush()
        print("\nresults")
        for label, served in runs.items():
            print(_summary(label, served))
        print("\nkvstore tiers after the warm run")
        print(_tier_table(store))

    # A chat prompt contains earlier replies, so after a differing reply the prompts differ too:
    # logits are compared only where the prompts are the same.
    pairs = list(zip(runs["without kvstore"], runs["with kvstore"]))
    same = sum(a.output == b.output for a, b in pairs)
    drift = max(float((a.first_logits - b.first_logits).abs().max()) for a, b in pairs
                if a.request.prompt == b.request.prompt)
    print(f"\ngreedy outputs identical with and without kvstore: {same}/{total}; next-token logits differ by "
          f"at most {drift:.1e} (float rounding of different batch shapes; wrong KV would differ by ~1)")
    if same < total:
        print("  (a differing continuation starts at a near-tie between two tokens, where that rounding decides)")

    if any(t.kind not in ("device", "cpu") for t in config.tiers.values()):
        with KVStore(spec, config) as store:
            engine.hooks = KVHooks(store)
            restarted = [_serve(engine, req, params) for req in tqdm(doc_requests, desc="after restart",
                                                                   leave=False)]
            engine.hooks.close()
            engine.hooks = None
            runs["after restart"] = restarted
            print("\nafter a restart (a new store over the same directories; memory tiers start empty)")
            print(_summary("after restart", restarted))
            print(_tier_table(store))
            if not keep:
                store.clear()
    if plot is not None and _plot(plot, runs):
        print(f"\nplot: {plot}")
    return 0 if drift < LOGIT_TOLERANCE else 1
