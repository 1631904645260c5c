import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvstore.errors import InvalidInputError
from kvstore.hashing import ChunkHasher, token_bytes

FP = b"\x01" * 16


def keys(tokens, **kw):
    h = ChunkHasher(kw.pop("fp", FP), kw.pop("tenant", "t"), kw.pop("chunk", 4), kw.pop("salt", b""))
    return [c.key for c in h.chunks(tokens, **kw)]


def test_chunking_full_and_partial():
    h = ChunkHasher(FP, "t", 4)
    refs = h.chunks(list(range(10)))
    assert [(r.start, r.end) for r in refs] == [(0, 4), (4, 8), (8, 10)]
    assert [(r.start, r.end) for r in h.chunks(list(range(10)), include_partial=False)] == [(0, 4), (4, 8)]
    assert h.chunks([]) == []


def test_prefix_chain():
    a = keys(list(range(12)))
    b = keys(list(range(8)) + [99, 9, 10, 11])  # differs in chunk 2 only
    assert a[:2] == b[:2] and a[2] != b[2]
    c = keys([5] + list(range(1, 12)))  # differs in chunk 0: every later key changes
    assert all(x != y for x, y in zip(a, c))
    # Same chunk tokens at another position/prefix give another key.
    assert keys([1, 2, 3, 4])[0] != keys([0, 0, 0, 0, 1, 2, 3, 4])[1]


def test_partial_key_differs_from_full_chunk():
    full = keys(list(range(8)))
    part = keys(list(range(7)))
    assert full[0] == part[0] and full[1] != part[1]


def test_model_tenant_salt_separate_keys():
    toks = list(range(8))
    base = keys(toks)
    assert keys(toks, fp=b"\x02" * 16) != base
    assert keys(toks, tenant="other") != base
    assert keys(toks, salt="s") != base
    assert keys(toks) == base


def test_input_forms_agree():
    toks = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    assert keys(toks) == keys(tuple(toks)) == keys(np.array(toks, dtype=np.int32)) == \
        keys(torch.tensor(toks)) == keys(torch.tensor(toks, dtype=torch.int32))


@pytest.mark.parametrize("bad,msg", [
    ([1, 2.5], "integers"), ([1, -1], r"\[0, 2\*\*32\)"), ([2**32], r"\[0, 2\*\*32\)"),
    (torch.zeros(2, 2, dtype=torch.long), "1-D"), (torch.tensor([1.0]), "integers"),
    (np.array([1.0]), "integers"), ("abc", "list of ints"), (None, "list of ints"),
    (np.array([-3]), r"\[0, 2\*\*32\)"),
])
def test_bad_tokens_are_named(bad, msg):
    with pytest.raises(InvalidInputError, match=msg):
        token_bytes(bad)


def test_keys_identical_across_processes_with_different_hashseed():
    code = ("from kvstore.hashing import ChunkHasher;"
            "h=ChunkHasher(b'\\x01'*16,'tenant-x',256,'salt');"
            "print(','.join(c.key.hex() for c in h.chunks(list(range(1000)))))")
    outs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())
    assert len(outs) == 1
    h = ChunkHasher(FP, "tenant-x", 256, "salt")
    assert outs.pop() == ",".join(c.key.hex() for c in h.chunks(list(range(1000))))


def test_keys_follow_the_design_formula():
    """h_i = xxh3_128(h_{i-1} || salt || tokens_i as little-endian uint32), h_{-1} from fingerprint+tenant."""
    import struct

    import xxhash

    toks = [7, 300000, 2**32 - 1, 0, 42, 43]
    h = ChunkHasher(FP, "acme", 4, "s1")
    prev = xxhash.xxh3_128_digest(b"kvstore-root-v1\0" + FP + b"acme")
    salt = xxhash.xxh3_128_digest(b"s1")
    expected = []
    for start in range(0, len(toks), 4):
        part = toks[start:start + 4]
        prev = xxhash.xxh3_128_digest(prev + salt + struct.pack(f"<{len(part)}I", *part))
        expected.append(prev)
    assert [c.key for c in h.chunks(toks)] == expected
