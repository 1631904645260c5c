"""The daemon memory tier's arena: no two live regions overlap, memory returns only when nobody
can read it any more, and free space coalesces."""

import gc
import random

import pytest

from kvstore.blobstore import BlobStore
from kvstore.buffers import ALIGN, Arena
from kvstore.objects import ObjectMeta
from kvstore.blobstore import StoredObject


def test_regions_never_overlap_and_keep_their_bytes():
    arena = Arena(1 << 20)
    rng = random.Random(0)
    live: dict[int, tuple[memoryview, bytes]] = {}
    for step in range(3000):
        if live and (rng.random() < 0.45 or arena.free_bytes < 64 << 10):
            key = rng.choice(list(live))
            view, data = live.pop(key)
            assert bytes(view) == data  # nobody else wrote into it while it was live
            del view
        else:
            n = rng.randint(1, 64 << 10)
            view = arena.allocate(n)
            if view is None:
                continue
            data = rng.randbytes(n)
            view[:] = data
            live[step] = (view, data)
    for view, data in live.values():
        assert bytes(view) == data
    del view, data
    live.clear()
    gc.collect()
    assert arena.free_bytes == 1 << 20
    assert arena.allocate(1 << 20) is not None  # everything coalesced back into one range


def test_a_region_still_read_is_not_reused():
    arena = Arena(4 * ALIGN)
    first = arena.allocate(4 * ALIGN)
    first[:] = b"x" * (4 * ALIGN)
    reader = first[10:20]  # e.g. a GET still sending the bytes after the tier evicted the object
    del first
    assert arena.allocate(ALIGN) is None
    assert bytes(reader) == b"x" * 10
    del reader
    assert arena.allocate(ALIGN) is not None


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="positive"):
        Arena(0)
    with pytest.raises(ValueError, match="positive"):
        Arena(1024).allocate(0)


def _obj(key: bytes, view: memoryview) -> StoredObject:
    meta = ObjectMeta(key=key, fingerprint=b"\0" * 16, shape=(view.nbytes,), dtype="uint8",
                      num_tokens=1, partial=False, codec="raw")
    return StoredObject(key, meta, view)


def test_preallocated_memory_tier_evicts_to_make_a_hole_and_serves_intact_bytes():
    store = BlobStore({"tiers": {"cpu": {"capacity": 4 * 1024 * 1024, "prealloc": True}}})
    tier = store.tiers[0]
    assert tier.arena is not None
    blobs = {}
    for i in range(10):  # 10 x 1 MiB through a 4 MiB budget: every put after the 4th evicts
        view = store.allocate(1 << 20)
        view[:] = bytes([i]) * (1 << 20)
        key = bytes([i]) * 16
        store.put([_obj(key, view)])
        blobs[key] = bytes([i]) * (1 << 20)
        del view
    snap = store.counters.snapshot()[1]["cpu"]
    assert snap["evictions"] == 6 and snap["arena_misses"] == 0
    for key, data in blobs.items():
        got = tier.get_blobs([key])[0]
        assert got is None or bytes(got) == data
    assert sum(tier.get_blobs([k])[0] is not None for k in blobs) == 4


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_the_arena_is_mapped_as_it_fills_and_reused_warm():
    """Without prealloc the budget is address space only until objects arrive; memory freed by
    an eviction is handed out again before untouched memory (first fit from the bottom)."""
    before = _rss()
    arena = Arena(256 << 20, prefault=False)
    assert _rss() - before < 16 << 20
    first = arena.allocate(8 << 20)
    first[:] = b"a" * (8 << 20)
    start = first.obj.ctypes.data
    del first
    again = arena.allocate(8 << 20)
    assert again.obj.ctypes.data == start


def test_transfers_in_flight_take_their_memory_from_the_cache():
    """Evicted objects still being sent hold arena regions: the next allocation evicts further
    (oldest first) until a region frees, rather than going past the budget, and never more
    than its bound when everything is held."""
    mib = 1 << 20
    store = BlobStore({"tiers": {"cpu": {"capacity": 8 * mib}}})
    tier = store.tiers[0]
    sending = []
    for i in range(8):  # the tier is full: 8 x 1 MiB (each object a little under 1 MiB)
        view = store.allocate(mib - 4096)
        view[:] = bytes([i]) * view.nbytes
        store.put([_obj(bytes([i]) * 16, view)])
        del view
    for i in range(3):  # three GETs in flight still hold the three oldest objects
        sending.append(tier.get_blobs([bytes([i]) * 16])[0])
    tier.touch([bytes([i]) * 16 for i in range(3, 8)])  # ... and the others were used since
    region = store.allocate(mib - 4096, fresh=False)
    assert region is not None and tier.arena.owns(region)
    snap = store.counters.snapshot()[1]["cpu"]
    assert snap.get("arena_misses", 0) == 0
    assert tier.stats().objects <= 7
    assert all(bytes(s) == bytes([i]) * s.nbytes for i, s in enumerate(sending))  # untouched
    # Everything held elsewhere: the allocation gives up after its bound, without fresh memory.
    held = [region] + [tier.get_blobs([k])[0] for k in list(tier._blobs)]
    assert store.allocate(mib - 4096, fresh=False) is None
    assert store.counters.snapshot()[1]["cpu"].get("arena_misses", 0) == 0
    del held, sending


def test_disk_reads_land_in_the_arena_so_a_promotion_needs_no_copy(tmp_path):
    mib = 1 << 20
    store = BlobStore({"tiers": {"cpu": {"capacity": 4 * mib},
                                 "disk": {"path": str(tmp_path), "capacity": 64 * mib}}})
    from kvstore.objects import encode_object, join_parts, meta_for
    import torch

    kv = torch.randn(2, 2, 2, 64, 128).half()  # 128 KiB
    keys = [bytes([i]) * 16 for i in range(40)]
    for key in keys:  # 40 x 128 KiB through a 4 MiB memory tier: the first ones live on disk only
        blob = join_parts(encode_object(meta_for(key, b"\1" * 16, kv, False), kv))
        store.put([StoredObject(key, BlobStore.verify(blob, key), blob)])
    store.flush()
    disk = store.tiers[1]
    assert not store.tiers[0].contains([keys[0]])[0] and disk.contains([keys[0]])[0]
    got = disk.get_blobs([keys[0]])[0]
    assert store.tiers[0].arena.owns(memoryview(got))
    del got
    out = store.get([keys[0]], [keys[0]])[0]
    assert out is not None and store.tiers[0].contains([keys[0]])[0]  # promoted
    assert store.tiers[0].get_blobs([keys[0]])[0].obj is memoryview(out).obj  # the same memory
    store.close()
