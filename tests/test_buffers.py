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
