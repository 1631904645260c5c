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


def test_a_sessions_next_turn_keeps_a_callers_own_pin(spec):
    """A system prompt pinned for an hour by its owner stays pinned when a session that paused
    over it resumes: the session releases only its own hold."""
    clock = Clock()
    ctx = list(range(64))
    with KVStore(spec, {"chunk_size": 16, "tiers": {"cpu": {"capacity": "1MiB"}}}, clock=clock) as store:
        store.put(ctx, causal_kv(spec, ctx))
        store.pin(ctx[:32], 3600.0)
        store.tool_started("s", "search", ctx)
        assert len(store.pins.active()) == 4
        store.tool_finished("s")
        assert set(store.pins.active()) == {r.key for r in store.chunks(ctx[:32])}
        clock.now += 3601.0
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


def test_the_pause_limit_follows_the_memory_tiers_turnover(spec):
    """A tool is not pinned past 2.5 turnovers of the memory tier: the time new KV takes to fill
    it. Filled fast (a busy server), a 20 s tool is not worth holding; filled slowly, it is."""
    for per_s, pinned in ((8, False), (1, True)):  # chunks of new KV a second; the tier holds 16
        clock = Clock()
        cfg = {"chunk_size": 16, "tiers": {"cpu": {"capacity": 16 * 16 * spec.bytes_per_token}},
               "tool_default_ttl_s": 20.0}
        with KVStore(spec, cfg, clock=clock) as store:
            for i in range(60):  # a minute of one-off traffic
                ctx = [10_000 + i] * 16 * per_s
                store.put(ctx, causal_kv(spec, ctx))
                clock.now += 1.0
            turnover = 16 / per_s
            assert abs(store.agents.pause_limit() - 2.5 * turnover) < 0.1 * 2.5 * turnover
            ctx = list(range(32))
            store.put(ctx, causal_kv(spec, ctx))
            assert (store.tool_started("s", "search", ctx) > 0) is pinned
            assert store.agents.stats().skipped == (0 if pinned else 1)


def test_a_tool_expected_to_outlast_the_pause_limit_is_not_pinned(spec):
    """Holding a context for minutes crowds out sessions that return sooner: a tool learned to
    take longer than tool_max_pause_s is not pinned (counted as skipped), and still learned."""
    clock = Clock()
    cfg = {"chunk_size": 16, "tiers": {"cpu": {"capacity": "1MiB"}}, "tool_max_pause_s": 60.0,
           "tool_pause_turnovers": 0}  # a fixed limit in seconds
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


def test_late_reports_count_from_when_the_call_really_started(spec):
    """An engine that reports a pause late (vLLM's connector, by a step) says how late: the
    duration learned and the pin's end both count from the real start."""
    clock = Clock()
    ctx = list(range(32))
    with KVStore(spec, {"chunk_size": 16, "tiers": {"cpu": {"capacity": "1MiB"}}}, clock=clock) as store:
        store.put(ctx, causal_kv(spec, ctx))
        assert store.tool_started("s", "search", ctx, ago_s=5.0) == 25.0  # the default 30 s, 5 already gone
        clock.now += 3.0
        assert store.tool_finished("s", ago_s=1.0) == 7.0
        assert store.tool_started("s", "search", ctx, ago_s=40.0) == 0.0  # its pin would have run out
        assert not store.pins.active()


def test_sessions_that_never_come_back_are_forgotten_past_the_cap():
    from kvstore.agents import AgentSessions, ToolTTLConfig

    pinned: set[bytes] = set()
    sessions = AgentSessions(lambda keys, ttl: pinned.update(keys), lambda keys: pinned.difference_update(keys),
                             ToolTTLConfig(max_sessions=3))
    for i in range(5):
        sessions.tool_started(f"s{i}", "t", [bytes([i]) * 16, b"\xff" * 16])
    assert sessions.stats().paused == 3
    assert pinned == {bytes([i]) * 16 for i in (2, 3, 4)} | {b"\xff" * 16}  # the shared key stays for s2..s4
    assert sessions.tool_finished("s0") is None and sessions.tool_finished("s4") is not None


# ---- through the daemon ------------------------------------------------------------------

def _daemon_store(url: str, key: str) -> dict:
    return {"chunk_size": 16, "tiers": {"remote": {"url": url, "api_key": key}}}


def test_the_daemon_learns_each_tenants_tools_from_all_its_engines(tmp_path, spec):
    """Two engines of tenant a pause on one tool through one daemon: the daemon pins their
    prefixes, learns the tool's durations from both, and releases at the next turn. Tenant b
    learns nothing from a, sees none of a's sessions; the admin sees both. The KV stays exact."""
    import json
    import urllib.request

    from conftest import Daemon
    from kvstore.client import DaemonClient

    kf = tmp_path / "keys.yaml"
    kf.write_text("keys:\n  ka: {tenant: a}\n  kb: {tenant: b}\n  kadmin: {tenant: ops, admin: true}\n")
    d = Daemon(tmp_path, key_file=kf)
    try:
        admin = DaemonClient(d.url, api_key="kadmin")
        ctx = list(range(64))
        with KVStore(spec, _daemon_store(d.url, "ka")) as one, KVStore(spec, _daemon_store(d.url, "ka")) as two:
            one.put(ctx, causal_kv(spec, ctx))
            one.flush()
            for i, (engine, took) in enumerate([(one, 2.0), (two, 3.0), (one, 4.0)]):
                # started `took` seconds ago: the daemon learns that duration without the wait
                engine.tool_started(f"s{i}", "search", ctx, ago_s=took)
                assert admin.stats()["pinned_objects"] == 4  # the 4 chunks, pinned in the daemon
                assert engine.tool_finished(f"s{i}") >= took  # this process learns too
            assert admin.stats()["pinned_objects"] == 0
            a = DaemonClient(d.url, api_key="ka")
            ttl = a.tool_started("s9", "search", [])  # 0.9 quantile of 2, 3, 4 s, x1.25
            assert ttl == 0.0  # nothing to pin: the TTL is 0 ...
            assert abs(a.stats()["sessions"]["a"]["per_tool"]["search"]["ttl_s"] - 5.0) < 0.2  # ... but learned
            b = DaemonClient(d.url, api_key="kb")
            assert b.tool_finished("s9") is None  # a's session is not b's
            b.tool_started("s9", "search", [])
            assert b.stats()["sessions"]["b"]["per_tool"] == {}  # b has learned nothing (from a)
            assert set(b.stats()["sessions"]) == {"b"} and set(admin.stats()["sessions"]) == {"a", "b"}
            # Keys the tenant never stored are neither pinned nor kept: nothing to hold memory with.
            import os
            assert a.tool_started("ghost", "search", [os.urandom(16) for _ in range(100)]) == 0.0
            assert admin.stats()["pinned_objects"] == 0
            # Another model (or tensor-parallel rank) of the tenant pauses the same session id:
            # each store's chunks stay pinned, neither ends the other's pause.
            from kvstore import KVSpec
            other_spec = KVSpec(model_id="test/agents-other-rank", num_layers=2, num_kv_heads=2, head_size=8)
            with KVStore(other_spec, _daemon_store(d.url, "ka")) as other:
                other.put(ctx, causal_kv(other_spec, ctx))
                other.flush()
                one.tool_started("agent", "search", ctx)
                other.tool_started("agent", "search", ctx)
                assert admin.stats()["pinned_objects"] == 8
                one.tool_finished("agent")
                other.tool_finished("agent")
                assert admin.stats()["pinned_objects"] == 0
            # The tenant's own hour-long pin outlives a session's pause over the same chunks.
            one.pin(ctx, 3600.0)
            one.tool_started("agent", "search", ctx)
            one.tool_finished("agent")
            assert admin.stats()["pinned_objects"] == 4
            assert a.tool_finished("s9") is not None
            hit, out = two.get(ctx)
            assert hit == 64 and torch.equal(out, causal_kv(spec, ctx))
        req = urllib.request.Request(f"http://127.0.0.1:{d.port}/metrics", headers={"Authorization": "Bearer kadmin"})
        text = urllib.request.urlopen(req, timeout=10).read().decode()
        assert 'kvstore_agent_tool_calls_total{outcome="finished",tenant="a"} 7.0' in text
        assert 'kvstore_agent_sessions_paused{tenant="b"} 1.0' in text
        json.loads(urllib.request.urlopen(f"http://127.0.0.1:{d.port}/openapi.json").read())["paths"]["/v1/tool/started"]
    finally:
        d.stop()


def test_a_pause_reaches_every_daemon_of_a_group(tmp_path, spec):
    """Keys spread over two daemons: each pins its share, each learns the pause, and the next
    turn releases both."""
    from conftest import Daemon
    from kvstore.client import DaemonClient

    for name in "ab":
        (tmp_path / name).mkdir()
    a, b = Daemon(tmp_path / "a"), Daemon(tmp_path / "b")
    try:
        url = f"kvstore://127.0.0.1:{a.port},127.0.0.1:{b.port}"
        ctx = list(range(16 * 12))
        with KVStore(spec, {"chunk_size": 16, "tiers": {"remote": {"url": url}}}) as store:
            store.put(ctx, causal_kv(spec, ctx))
            store.flush()
            store.tool_started("s", "search", ctx, ago_s=1.0)
            pinned = [DaemonClient(d.url).stats()["pinned_objects"] for d in (a, b)]
            assert sum(pinned) == 12 and min(pinned) > 0, pinned
            store.tool_finished("s")
            for d in (a, b):
                st = DaemonClient(d.url).stats()
                assert st["pinned_objects"] == 0 and st["sessions"]["default"]["finished"] == 1
            hit, out = store.get(ctx)
            assert hit == len(ctx) and torch.equal(out, causal_kv(spec, ctx))
    finally:
        a.stop()
        b.stop()


def test_a_stream_of_new_tool_names_does_not_grow_memory():
    from kvstore.agents import AgentSessions, ToolTTLConfig

    clock = Clock()
    sessions = AgentSessions(lambda keys, ttl: None, lambda keys: None, ToolTTLConfig(max_tools=4), clock=clock)
    for i in range(10):
        sessions.tool_started("s", f"tool-{i}", [])
        clock.now += 1.0
        sessions.tool_finished("s")
    assert set(sessions.stats().per_tool) == {f"tool-{i}" for i in range(6, 10)}


def test_the_pause_limit_has_a_ceiling_after_a_quiet_spell_and_names_are_checked(spec):
    clock = Clock()
    with KVStore(spec, {"chunk_size": 16, "tiers": {"cpu": {"capacity": "1MiB"}}}, clock=clock) as store:
        ctx = list(range(16))
        store.put(ctx, causal_kv(spec, ctx))
        clock.now += 3600.0  # an idle hour: the turnover is as good as infinite
        assert store.agents.pause_limit() == 600.0
        clock.now -= 7200.0  # a clock that goes back is not an error on the write path
        store.put(list(range(100, 116)), causal_kv(spec, list(range(100, 116))))
        import pytest

        from kvstore.errors import InvalidInputError
        for bad in ("x" * 257, "", 42):
            with pytest.raises(InvalidInputError, match="session"):
                store.tool_started(bad, "search", ctx)


def test_hooks_session_events_after_close_are_dropped_not_raised(spec):
    from kvstore.connectors.hooks import KVHooks

    with KVStore(spec, {"chunk_size": 16, "tiers": {"cpu": {"capacity": "1MiB"}}}) as store:
        hooks = KVHooks(store)
        ctx = list(range(16))
        store.put(ctx, causal_kv(spec, ctx))
        assert 29.0 < hooks.tool_started("s", "t", ctx).result() <= 30.0  # the default, less its time queued
        assert hooks.tool_started("y" * 300, "t", ctx).result() == 0.0  # a caller's mistake: counted
        assert hooks.session_errors == 1
        hooks.close()
        assert hooks.tool_finished("s").result() is None and hooks.session_errors == 2
