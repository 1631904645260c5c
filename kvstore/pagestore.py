"""Pages under keys the engine computes itself, in kvstore's byte tiers.

Some engines hash their own KV pages: SGLang's HiCache names each page by a hash of its token
prefix and hands a storage backend only that string and the page's tensor, in whatever layout its
host pool uses. kvstore cannot cut or decode such a page, so it stores it whole, losslessly, as a
self-describing object. What makes a page interchangeable (model, parallel rank, layout, dtype)
is the caller's ``identity``: it is folded into every key and recorded in every object as the
fingerprint, and a read must match it, the page's shape and dtype, or it is a miss plus a
``corrupt`` count, never another model's bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import torch
import xxhash

from kvstore.blobstore import BlobStore, StoredObject
from kvstore.config import StoreConfig
from kvstore.errors import ConfigError, CorruptObjectError, InvalidInputError
from kvstore.objects import ObjectMeta, decode_payload, encode_object, parse_header
from kvstore.spec import dtype_name

log = logging.getLogger(__name__)

def check_page_codec(codec: str) -> str:
    """A page's byte order is the engine's, not kvstore's [layers, 2, tokens, heads, head_size]:
    lossy codecs would quantize along the wrong axis, so only lossless ones are offered."""
    from kvstore.codecs import CodecError, available_codecs, get_codec

    lossless = [name for name in available_codecs() if get_codec(name).lossless]
    try:
        ok = get_codec(codec).lossless
    except CodecError:
        ok = False
    if not ok:
        raise ConfigError(f"page codec {codec!r} is not offered: pages are stored byte-exact, "
                          f"choose one of {lossless}")
    return codec


def identity_digest(identity: Mapping[str, Any]) -> bytes:
    """A stable 16-byte digest of what makes pages interchangeable (sorted, so dict order is moot)."""
    return xxhash.xxh3_128_digest(msgpack.packb(sorted((str(k), v) for k, v in identity.items()),
                                                use_bin_type=True))


class PageStore:
    """Tensors ("pages") by engine-computed string key, in the tiers of a :class:`BlobStore`
    (cpu, disk, redis, and the kvstore daemon as a remote tier)."""

    def __init__(self, config: StoreConfig, identity: Mapping[str, Any], *, codec: str = "raw",
                 tokens_per_page: int = 0) -> None:
        self.codec = check_page_codec(codec)
        # The config's salt names what the identity cannot see (a patched kernel, a changed model
        # behind the same name): pages stored under another salt are never read.
        self.fingerprint = identity_digest({**identity, "salt": config.salt} if config.salt else identity)
        self.tokens_per_page = tokens_per_page
        self.store = BlobStore(config, namespace=b"kvstore-pages", allow_remote=True)

    def object_key(self, key: str) -> bytes:
        return xxhash.xxh3_128_digest(self.fingerprint + key.encode())

    def _meta(self, key: bytes, page: torch.Tensor) -> ObjectMeta:
        return ObjectMeta(key=key, fingerprint=self.fingerprint, shape=tuple(page.shape),
                          dtype=dtype_name(page.dtype), num_tokens=self.tokens_per_page, partial=False,
                          codec=self.codec)

    # ---- reads ---------------------------------------------------------------------------

    def exists(self, keys: Sequence[str]) -> list[bool]:
        return self.store.exists([self.object_key(k) for k in keys])

    def leading_hits(self, keys: Sequence[str]) -> int:
        """How many leading keys are stored (a prefix is only usable up to its first gap)."""
        for i, there in enumerate(self.exists(keys)):
            if not there:
                return i
        return len(keys)

    def get_into(self, keys: Sequence[str], outs: Sequence[torch.Tensor]) -> list[bool]:
        """Copy each stored page into its ``out`` (any device); False where it is missing or does
        not verify as exactly that page for this identity, shape and dtype. A False page's
        ``out`` holds undefined bytes (a disk hit is verified after it lands there)."""
        if len(keys) != len(outs):
            raise InvalidInputError(f"{len(keys)} keys but {len(outs)} output pages")
        okeys = [self.object_key(k) for k in keys]
        expect = [self._meta(k, out) for k, out in zip(okeys, outs)]
        done = [False] * len(keys)
        if self.codec == "raw":  # a disk hit is read straight into a CPU page: no buffer, no copy
            direct = [i for i, out in enumerate(outs) if out.device.type == "cpu" and out.is_contiguous()]
            got = self.store.read_into([okeys[i] for i in direct], [expect[i] for i in direct],
                                       [memoryview(outs[i].view(-1).view(torch.uint8).numpy()) for i in direct])
            for i, ok in zip(direct, got):
                done[i] = ok
        rest = [i for i, ok in enumerate(done) if not ok]
        blobs = self.store.get([okeys[i] for i in rest], [okeys[i] for i in rest], [expect[i] for i in rest])
        for i, blob in zip(rest, blobs):
            key, okey, out = keys[i], okeys[i], outs[i]
            if blob is None:
                continue
            view = memoryview(blob).cast("B")
            header = parse_header(view, view.nbytes)  # verified by get(); this finds the payload
            try:
                page = decode_payload(header.meta, view[header.payload_offset:])
            except CorruptObjectError as exc:  # checksummed bytes that still fail to decode: drop them
                log.warning("page %s rejected: %s", key, exc)
                self.store.counters.tier(self.store.tiers[0].name, "corrupt")
                self.store.delete([okey])
                continue
            out.copy_(page)
            done[i] = True
        return done

    # ---- writes --------------------------------------------------------------------------

    def put(self, keys: Sequence[str], pages: Sequence[torch.Tensor]) -> int:
        """Store the pages not already present; returns how many were new. The engine reuses a
        page's memory once this returns: the objects go in as parts, which the store writes
        synchronously to its first tier and copies for anything it keeps."""
        if len(keys) != len(pages):
            raise InvalidInputError(f"{len(keys)} keys but {len(pages)} pages")
        okeys = [self.object_key(k) for k in keys]
        objects = []
        for okey, page, there in zip(okeys, pages, self.store.exists(okeys)):
            if there:  # encoding and checksumming a page nobody needs costs more than the lookup
                continue
            meta = self._meta(okey, page)
            objects.append(StoredObject(okey, meta, tuple(encode_object(meta, page))))
        return self.store.put(objects) if objects else 0

    # ---- control -------------------------------------------------------------------------

    def delete(self, keys: Sequence[str]) -> int:
        return self.store.delete([self.object_key(k) for k in keys])

    def clear(self) -> None:
        self.store.clear()

    def flush(self, timeout_s: float | None = None) -> bool:
        return self.store.flush(timeout_s)

    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    def close(self) -> None:
        self.store.close()
