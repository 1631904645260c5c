"""Agent sessions paused on tool calls (kvstore.agents) through a real KVStore on simulated time."""

from __future__ import annotations

import torch

from conftest import causal_kv
from kvstore import KVStore


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pins_last_the_tools_learned_duration_and_end_at_the_next_turn(spec):
    clock = Clock()
    cfg = {"chunk_size": 16, "tiers": {"cpu": {"capacity": "1MiB"}}, "tool_default_ttl_s": 30.0}
    system = list(range(48))
    with KVStore(spec, cfg, clock=clock) as store:
        ctx = system + list(range(1000, 1040))
        store.put(ctx, causal_kv(spec, ctx))
        assert store.tool_started("s1", "search", ctx) == 30.0  # never seen: the default
        assert len(store.pins.active()) == 6  # 5 whole chunks and the stored tail
        clock.now += 4.0
        assert store.tool_finished("s1") == 4.0 and not store.pins.active()
        for took in (2.0, 3.0, 4.0, 10.0):  # learned: the 0.9 quantile of these, x1.25
            store.tool_started("s1", "search", ctx)
            clock.now += took
            store.tool_finished("s1")
        assert store.tool_started("s1", "search", ctx) == 12.5
        clock.now += 13.0  # longer than its pin: it expires by itself
        assert not store.pins.active()
        assert store.tool_finished("s1") == 13.0
        stats = store.agents.stats()
        assert stats.expired == 2 and stats.per_tool["search"]["calls"] == 6  # the 10 s and the 13 s calls


def test_a_shared_prefix_stays_pinned_for_the_session_still_waiting(spec):
    clock = Clock()
    system = list(range(64))
    a, b = system + [7] * 20, system + [9] * 20
    with KVStore(spec, {"chunk_size": 16, "tiers": {"cpu": {"capacity": "1MiB"}}}, clock=clock) as store:
        for ctx in (a, b):
            store.put(ctx, causal_kv(spec, ctx))
        store.tool_started("a", "code", a)
        store.tool_started("b", "code", b)
        store.tool_finished("a")
        shared = {r.key for r in store.chunks(system)}
        assert shared <= set(store.pins.active())  # b still needs the system prompt
        store.tool_finished("b")
        assert not store.pins.active()


def test_a_refused_pin_is_counted_not_raised(spec):
    cfg = {"chunk_size": 16, "tiers": {"cpu": {"capacity": 16 * 4 * spec.bytes_per_token, "pin_fraction": 0.25}}}
    ctx = list(range(64))
    with KVStore(spec, cfg) as store:
        store.put(ctx, causal_kv(spec, ctx))
        assert store.tool_started("s", "browser", ctx) == 0.0
        assert store.agents.stats().refused == 1
        assert store.tool_finished("s") is not None  # unpinned, but its duration is still learned
        hit, out = store.get(ctx)
        assert torch.equal(out, causal_kv(spec, ctx)[:, :, :hit])


def test_a_tool_expected_to_outlast_the_pause_limit_is_not_pinned(spec):
    """Holding a context for minutes crowds out sessions that return sooner: a tool learned to
    take longer than tool_max_pause_s is not pinned (counted as skipped), and still learned."""
    clock = Clock()
    cfg = {"chunk_size": 16, "tiers": {"cpu": {"capacity": "1MiB"}}, "tool_max_pause_s": 60.0}
    ctx = list(range(64))
    with KVStore(spec, cfg, clock=clock) as store:
        store.put(ctx, causal_kv(spec, ctx))
        for _ in range(3):
            store.tool_started("s", "human_review", ctx)
            clock.now += 120.0
            store.tool_finished("s")
        assert store.tool_started("s", "human_review", ctx) == 0.0 and not store.pins.active()
        assert store.agents.stats().skipped == 1 and store.agents.predict("human_review") == 150.0
        clock.now += 100.0
        assert store.tool_finished("s") == 100.0
