"""Several daemons as one store: ``kvstore://host1:port1,host2:port2``.

Each key belongs to the live daemon that ranks highest for it by rendezvous (highest random
weight) hashing: every process that lists the same daemons, in any order, sends a key to the
same one, with no coordination; adding or losing a daemon moves only that daemon's share.

A daemon that does not answer is skipped for a back-off (0.5 s doubling to 5 s): its keys go
to their next-ranked daemon, so reads of what it held miss there (unless the daemons share a
slower tier, e.g. one Redis Cluster behind them all, which then answers) and writes land there.
When it answers again its share comes back to it. A batch is split into one request per
daemon, sent in parallel; an outage costs misses, and the call raises only when no daemon
answers, as a single daemon's client would.
"""

from __future__ import annotations

import http.client
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

import xxhash

from kvstore.client import DaemonClient, DaemonUnreachable, ServiceError
from kvstore.tiers.backoff import Backoff
from kvstore.wire import Blob

log = logging.getLogger(__name__)
T = TypeVar("T")

_MEMBER_DOWN = (401, 403, 500, 502, 503, 504)
"""A daemon answering these is skipped for a back-off, like one that does not answer (a wrong
key, or a daemon failing every request, must not cost every call a round trip)."""

MEMBER_BACKOFF_MAX_S = 5.0
"""A daemon that comes back gets its share back within this long."""


def daemon_urls(url: str) -> list[str]:
    """``kvstore://a:1,b:2`` -> ``["kvstore://a:1", "kvstore://b:2"]`` (one URL: itself). A
    daemon may name its own scheme (``kvstore://a:1,kvstores://b:2``); one without takes the
    first's."""
    items = [u.strip() for u in url.split(",") if u.strip()]
    if not items:
        return [url]
    scheme = items[0].partition("://")[0] if "://" in items[0] else "kvstore"
    return [u if "://" in u else f"{scheme}://{u}" for u in items]


class _Member:
    def __init__(self, client: DaemonClient) -> None:
        self.client = client
        self.seed = client.url.encode()
        self.backoff = Backoff(f"daemon {client.url}", max_s=MEMBER_BACKOFF_MAX_S)


class DaemonGroup:
    """The :class:`DaemonClient` data API (exists, lookup, get, put, pin, unpin, delete) over
    several daemons. Blocking, like the client: each call waits for every daemon it asks."""

    def __init__(self, urls: Sequence[str], **client_options: Any) -> None:
        if len(urls) < 2:
            raise ValueError("a DaemonGroup needs at least two daemon URLs")
        self.members = [_Member(DaemonClient(u, **client_options)) for u in urls]
        if len({m.seed for m in self.members}) != len(self.members):
            raise ValueError(f"a daemon is listed twice in {', '.join(urls)}")
        self.url = ",".join(m.client.url for m in self.members)
        # Shared by the process's threads: room for several engine threads' requests at once.
        self._pool = ThreadPoolExecutor(max(8, 4 * len(self.members)), thread_name_prefix="kvstore-daemons")

    # ---- placement -------------------------------------------------------------------------

    def ranking(self, key: bytes) -> list[int]:
        """Member indices for ``key``, best first: the same in every process listing the same daemons."""
        return sorted(range(len(self.members)), key=lambda i: xxhash.xxh3_64_intdigest(self.members[i].seed + key),
                      reverse=True)

    def owner(self, key: bytes, skip: frozenset[int] = frozenset()) -> int | None:
        """The live daemon a key goes to now (None: every daemon is down or skipped)."""
        for i in self.ranking(key):
            if i not in skip and self.members[i].backoff.available:
                return i
        return None

    def _each(self, n: int, key_of: Callable[[int], bytes],
              call: Callable[[DaemonClient, list[int]], T]) -> list[tuple[list[int], T]]:
        """``call`` on every daemon with its share of positions ``0..n-1``, in parallel. The share
        of a daemon that does not answer goes once more to the next-ranked live daemons. Raises
        DaemonUnreachable when some share found no daemon at all and none answered."""
        done: list[tuple[list[int], T]] = []
        failed: set[int] = set()
        todo = list(range(n))
        last_error: BaseException | None = None
        for _round in range(2):
            groups: dict[int, list[int]] = {}
            for pos in todo:
                owner = self.owner(key_of(pos), frozenset(failed))
                if owner is not None:  # else a miss: no daemon left to ask
                    groups.setdefault(owner, []).append(pos)
            results = self._run(groups, call) if groups else {}
            todo = []
            for member, positions in groups.items():
                ok, value = results[member]
                if ok:
                    done.append((positions, value))
                else:
                    failed.add(member)
                    last_error = value
                    todo.extend(positions)
            if not todo:
                break
        if n and not done:
            if isinstance(last_error, (DaemonUnreachable, ServiceError)):
                raise last_error
            raise DaemonUnreachable(self.url, last_error or ConnectionError("every daemon is in back-off"))
        return done

    def _run(self, groups: dict[int, list[int]],
             call: Callable[[DaemonClient, list[int]], T]) -> dict[int, tuple[bool, Any]]:
        def one(member: int) -> tuple[bool, Any]:
            m = self.members[member]
            started = m.backoff.now()
            try:
                value = call(m.client, groups[member])
            except (OSError, http.client.HTTPException) as exc:
                m.backoff.failed(exc, started)
                return False, exc
            except ServiceError as exc:  # this daemon refused: its share goes to the next-ranked one
                if exc.status in _MEMBER_DOWN:
                    m.backoff.failed(exc, started)
                else:
                    log.debug("daemon %s refused a request: %s", m.client.url, exc)
                return False, exc
            m.backoff.succeeded()
            return True, value

        if len(groups) == 1:
            (member,) = groups
            return {member: one(member)}
        futures = {m: self._pool.submit(one, m) for m in groups}
        return {m: f.result() for m, f in futures.items()}

    # ---- the API ---------------------------------------------------------------------------

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        out = [False] * len(keys)
        for positions, present in self._each(len(keys), keys.__getitem__,
                                             lambda c, ps: c.exists([keys[p] for p in ps])):
            for p, there in zip(positions, present):
                out[p] = bool(there)
        return out

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are stored (in any daemon)."""
        present = self.exists(keys)
        return next((i for i, there in enumerate(present) if not there), len(keys))

    def get(self, keys: Sequence[bytes]) -> list[bytes | memoryview | None]:
        out: list[bytes | memoryview | None] = [None] * len(keys)
        for positions, blobs in self._each(len(keys), keys.__getitem__,
                                           lambda c, ps: c.get([keys[p] for p in ps])):
            for p, blob in zip(positions, blobs):
                out[p] = blob
        return out

    def put(self, items: Sequence[tuple[bytes, Blob | tuple[Blob, ...]]]) -> int:
        return sum(stored for _ps, stored in self._each(len(items), lambda p: items[p][0],
                                                         lambda c, ps: c.put([items[p] for p in ps])))

    def pin(self, keys: Sequence[bytes], ttl_s: float) -> int:
        return sum(n for _ps, n in self._each(len(keys), keys.__getitem__,
                                              lambda c, ps: c.pin([keys[p] for p in ps], ttl_s)))

    def unpin(self, keys: Sequence[bytes]) -> int:
        return sum(n for _ps, n in self._each(len(keys), keys.__getitem__,
                                              lambda c, ps: c.unpin([keys[p] for p in ps])))

    def _live(self) -> dict[int, list[int]]:
        """Every daemon not in back-off, with no positions yet (for calls every one must hear)."""
        return {i: [] for i, m in enumerate(self.members) if m.backoff.available}

    def tool_started(self, session: str, tool: str, keys: Sequence[bytes], ago_s: float = 0.0) -> float:
        """Every live daemon learns of the pause (each pins its share of ``keys``); returns the
        longest TTL any pinned for. A daemon that does not answer is skipped."""
        groups = self._live()
        for pos, key in enumerate(keys):
            owner = self.owner(key)
            if owner is not None:  # setdefault: a member may have come back since groups was made
                groups.setdefault(owner, []).append(pos)
        results = self._run(groups, lambda c, ps: c.tool_started(session, tool, [keys[p] for p in ps], ago_s))
        return max((value for ok, value in results.values() if ok), default=0.0)

    def tool_finished(self, session: str, ago_s: float = 0.0) -> float | None:
        results = self._run(self._live(), lambda c, _ps: c.tool_finished(session, ago_s))
        return max((value for ok, value in results.values() if ok and value is not None), default=None)

    def delete(self, keys: Sequence[bytes]) -> int:
        """Deleted from every daemon that answers: a key may sit on a daemon that owned it
        before another came back."""
        total = 0
        for m in self.members:
            try:
                total += m.client.delete(keys) if keys else 0
            except (OSError, http.client.HTTPException) as exc:
                m.backoff.failed(exc)
        return total

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in self.members:
            try:
                out[m.client.url] = m.client.stats()
            except (OSError, http.client.HTTPException) as exc:
                out[m.client.url] = {"error": str(exc)}
        return out

    def healthy(self) -> bool:
        """True while some daemon answers."""
        return any(m.client.healthy() for m in self.members)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for m in self.members:
            m.client.close()


def connect(url: str, **client_options: Any) -> DaemonClient | DaemonGroup:
    """A client for ``url``: one daemon, or several (``kvstore://a:1,b:2``) spread by key."""
    urls = daemon_urls(url)
    return DaemonGroup(urls, **client_options) if len(urls) > 1 else DaemonClient(urls[0], **client_options)
