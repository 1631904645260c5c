"""The daemon's PUT body check as chunks arrive (service.intake) against the whole-body check
(BlobStore.verify): same verdict, same objects, whatever the chunk boundaries."""

import random

import pytest
import torch

from kvstore import KVSpec
from kvstore.blobstore import BlobStore
from kvstore.client import DaemonClient, ServiceError
from kvstore.errors import InvalidInputError
from kvstore.objects import encode_object, join_parts, meta_for
from kvstore.service.intake import BodyIntake
from kvstore.wire import WireError, pack_batch

SPEC = KVSpec(model_id="test/intake", num_layers=2, num_kv_heads=2, head_size=16)


def obj(key: bytes, tokens: int) -> bytes:
    kv = torch.randn(SPEC.chunk_shape(tokens)).half()
    return join_parts(encode_object(meta_for(key, SPEC.fingerprint, kv, False), kv))


def fed(body: bytes, seed: int) -> BodyIntake:
    """An intake fed ``body`` in random chunks (1 byte up to a few KiB), as a socket would."""
    rng = random.Random(seed)
    buf = memoryview(bytearray(len(body)))
    intake = BodyIntake(buf, max_keys=64)
    got = 0
    while got < len(body):
        n = min(len(body) - got, rng.choice([1, 7, 100, 4096, 65536]))
        buf[got:got + n] = body[got:got + n]
        got += n
        intake.feed(got)
    return intake


@pytest.mark.parametrize("seed", range(6))
def test_chunked_check_matches_the_whole_body_check(seed):
    keys = [bytes([i]) * 16 for i in range(1, 4)]
    objects = [obj(k, t) for k, t in zip(keys, (16, 1, 40))]
    body = b"".join(pack_batch(list(zip(keys, objects))))
    got = fed(body, seed).finish()
    assert [k for k, _, _ in got] == keys
    for (key, view, meta), whole in zip(got, objects):
        assert bytes(view) == whole
        assert meta == BlobStore.verify(whole, key)


@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_damaged_object_is_named_and_fails_the_batch(where):
    keys = [bytes([i]) * 16 for i in range(1, 4)]
    objects = [bytearray(obj(k, 16)) for k in keys]
    objects[1][-5 if where == "payload" else 20] ^= 0x10
    body = b"".join(pack_batch([(k, bytes(o)) for k, o in zip(keys, objects)]))
    for seed in range(3):
        with pytest.raises(InvalidInputError, match=keys[1].hex()):
            fed(body, seed).finish()
        with pytest.raises(InvalidInputError):  # the whole-body check agrees
            BlobStore.verify(bytes(objects[1]), keys[1])


def test_layout_errors():
    k = b"\x01" * 16
    good = obj(k, 4)
    body = b"".join(pack_batch([(k, good)]))
    with pytest.raises(WireError, match="add up"):  # one byte more than the sizes say
        fed(body + b"x", 0).finish()
    with pytest.raises(WireError):  # the header says more than the body holds
        fed(body[:-1], 0).finish()
    with pytest.raises(WireError, match="no object"):
        fed(b"".join(pack_batch([(k, None)])), 0).finish()
    with pytest.raises(WireError):
        fed(b"\xff\xff\x00\x00garbage", 0).finish()
    with pytest.raises(InvalidInputError, match="was sent for"):  # an object under another key
        fed(b"".join(pack_batch([(b"\x02" * 16, good)])), 0).finish()


def test_a_large_batch_with_one_bad_object_stores_nothing(daemon):
    """Bodies from 64 KiB up take the streaming path in the daemon: a bad second object is a 400
    naming it, nothing of the batch is stored, and the connection serves the next request."""
    keys = [bytes([i]) * 16 for i in range(5, 8)]
    objects = [bytearray(obj(k, 256)) for k in keys]  # 32 KiB each: a body of about 96 KiB
    objects[1][-1] ^= 1
    client = DaemonClient(daemon.url)
    with pytest.raises(ServiceError, match=keys[1].hex()) as err:
        client.put([(k, bytes(o)) for k, o in zip(keys, objects)])
    assert err.value.status == 400
    assert client.exists(keys) == [False, False, False]
    objects[1][-1] ^= 1
    assert client.put([(k, bytes(o)) for k, o in zip(keys, objects)]) == 3
    assert [bytes(b) for b in client.get(keys)] == [bytes(o) for o in objects]
