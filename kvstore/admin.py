"""``kvstore admin``: operate a running daemon (health, stats, usage, pin, unpin, delete, clear).

Why a CLI over curl: the daemon speaks msgpack and binary keys, answers errors as JSON, and an
operator at 3 a.m. wants one line that names the daemon and what went wrong. Everything goes
through :class:`~kvstore.client.DaemonClient`, the engines' own client, so this tests the same
path they use. The URL and key come from flags or ``KVSTORE_ADMIN_URL`` / ``KVSTORE_ADMIN_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from kvstore.client import DaemonClient, DaemonUnreachable, ServiceError
from kvstore.config import format_size
from kvstore.errors import KVStoreError


def add_admin_parser(sub: Any) -> None:
    adm = sub.add_parser("admin", help="operate a running daemon (stats, usage, pin, delete, clear, ...)",
                         description="Talk to a running `kvstore serve` with an API key (an admin key for stats "
                                     "of every tenant, usage and clear).")
    adm.add_argument("--url", default=os.environ.get("KVSTORE_ADMIN_URL", "kvstore://127.0.0.1:8765"),
                     help="the daemon (default $KVSTORE_ADMIN_URL or kvstore://127.0.0.1:8765)")
    adm.add_argument("--api-key", default=os.environ.get("KVSTORE_ADMIN_KEY"),
                     help="API key (default $KVSTORE_ADMIN_KEY; none for a daemon without a key file)")
    adm.add_argument("--tls-ca", default=os.environ.get("KVSTORE_ADMIN_TLS_CA"),
                     help="CA file to verify a kvstores:// daemon (default $KVSTORE_ADMIN_TLS_CA, else system CAs)")
    adm.add_argument("--tenant", help="act on this tenant's objects and usage (needs an admin key)")
    adm.add_argument("--timeout-s", type=float, default=10.0, help="per-request timeout (default 10)")
    ops = adm.add_subparsers(dest="op", metavar="OP", required=True)
    ops.add_parser("health", help="is it up and ready (exit 0) or not (exit 1)")
    st = ops.add_parser("stats", help="tiers and tenants (admin), or the caller's own usage")
    st.add_argument("--json", action="store_true", help="the raw JSON")
    ops.add_parser("usage", help="bytes, objects and quota per tenant (admin)")
    for name, text in (("pin", "protect keys from eviction"), ("unpin", "release pins"), ("delete", "delete keys")):
        p = ops.add_parser(name, help=text)
        p.add_argument("keys", nargs="+", metavar="KEY", help="chunk keys as 32 hex digits")
        if name == "pin":
            p.add_argument("--ttl-s", type=float, required=True, help="seconds to keep them pinned")
    clear = ops.add_parser("clear", help="delete everything, or with --tenant one tenant's objects (admin)")
    clear.add_argument("--yes", action="store_true", help="really (required)")
    adm.set_defaults(func=run_admin)


def _keys(texts: list[str]) -> list[bytes]:
    out = []
    for text in texts:
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 16:
            raise KVStoreError(f"key {text!r} is not 32 hex digits (a 16-byte chunk key)")
        out.append(key)
    return out


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _usage_rows(tenants: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = [["tenant", "bytes", "objects", "quota"]]
    for name in sorted(tenants):
        t = tenants[name]
        rows.append([name, format_size(t.get("bytes", 0)), str(t.get("objects", 0)),
                     format_size(t["quota"]) if t.get("quota") is not None else "-"])
    return rows


def _print_stats(st: dict[str, Any]) -> None:
    if "tiers" not in st:  # a tenant's own view
        print(_table(_usage_rows({st["tenant"]: st})))
        return
    rows = [["tier", "objects", "bytes", "capacity", "hits", "evictions", "corrupt", "rejected"]]
    for name, t in st["tiers"].items():
        rows.append([name, "-" if t.get("objects") is None else str(t["objects"]),
                     "-" if t.get("bytes") is None else format_size(t["bytes"]),
                     "-" if t.get("capacity") is None else format_size(t["capacity"]),
                     *(str(int(t.get(k, 0))) for k in ("hits", "evictions", "corrupt", "rejected"))])
    print(_table(rows))
    print(f"pinned objects: {st.get('pinned_objects', 0)}")
    if st.get("tenants"):
        print()
        print(_table(_usage_rows(st["tenants"])))


def run_admin(args: argparse.Namespace) -> int:
    if not args.timeout_s > 0:
        raise KVStoreError(f"--timeout-s must be positive, got {args.timeout_s}")
    client = DaemonClient(args.url, api_key=args.api_key, timeout_s=args.timeout_s, retries=0, tenant=args.tenant,
                          tls_ca=args.tls_ca)
    try:
        return _run(client, args)
    except ServiceError as exc:
        raise KVStoreError(f"{args.url} answered {exc}") from None
    except DaemonUnreachable as exc:
        raise KVStoreError(str(exc)) from None
    finally:
        client.close()


def _run(client: DaemonClient, args: argparse.Namespace) -> int:
    if args.op == "health":
        status, _ctype, _body = client.request("GET", "/readyz")
        print(f"{args.url}: {'ready' if status == 200 else f'not ready (HTTP {status})'}")
        return 0 if status == 200 else 1
    if args.op == "stats":
        st = client.stats()
        if args.tenant and "tiers" in st:  # an operator asking about one tenant
            st = {"tenant": args.tenant, **st["tenants"].get(args.tenant, {"bytes": 0, "objects": 0})}
        print(json.dumps(st, indent=1, sort_keys=True)) if args.json else _print_stats(st)
        return 0
    if args.op == "usage":
        st = client.stats()
        if "tiers" not in st:
            raise KVStoreError("usage of every tenant needs an admin key")
        print(_table(_usage_rows(st["tenants"])))
        return 0
    if args.op in ("pin", "unpin", "delete"):
        keys = _keys(args.keys)
        done = client.pin(keys, args.ttl_s) if args.op == "pin" else getattr(client, args.op)(keys)
        print(f"{args.op}: {done} of {len(keys)} key(s)")
        return 0
    if args.op == "clear":
        if not args.yes:
            what = f"tenant {args.tenant!r}'s objects" if args.tenant else "every object of every tenant"
            raise KVStoreError(f"clear deletes {what} on {args.url}; add --yes to do it")
        deleted = client.clear(tenant=args.tenant)
        print(f"cleared {args.tenant!r}: {deleted} object(s)" if args.tenant else "cleared everything")
        return 0
    raise AssertionError(args.op)
