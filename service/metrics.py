"""Prometheus metrics in Prometheus's conventions: request counters and latency histograms, the
store's counters (``*_total``, so ``rate()`` works) and gauges read at scrape time, object sizes.

One registry per app, so tests can run several daemons in one process. Label sets are bounded:
routes are the app's (unknown paths share one label), tiers are the configured ones, tenants come
from the key file. The names here are the ones ``grafana/kvstore-daemon.json`` queries.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.stats import TIER_COUNTERS

_HELP = {
    "hits": "objects served from the tier", "hit_tokens": "tokens served from the tier",
    "puts": "objects written into the tier", "put_bytes": "bytes written into the tier",
    "evictions": "objects removed to make room", "demotions": "evicted objects copied to a slower tier",
    "promotions": "objects copied up into the tier after a hit below",
    "corrupt": "objects that failed verification (served as misses, removed)",
    "dropped_writes": "queued writes dropped because the queue was full",
    "write_errors": "writes that failed (I/O error, backend down)",
    "read_errors": "read-side calls that raised (served as misses)",
    "rejected": "writes refused (pins at their cap, objects over the budget)",
    "arena_misses": "objects that got fresh memory because no arena region was free",
    "unavailable": "operations skipped while the backend was down",
    "load_seconds": "seconds spent reading hits out of the tier",
    "write_seconds": "seconds spent writing into the tier",
}
_GAUGES = {"objects": "objects held", "bytes": "bytes held", "capacity": "configured byte budget",
           "pinned_bytes": "bytes held by pinned objects", "queued_writes": "writes waiting in the queue",
           "available": "1 while the backend answers"}
disable_created_metrics()  # a `_created` gauge beside every counter doubles the series for nothing
SIZE_BUCKETS = tuple(float(1 << p) for p in range(12, 32, 2))  # 4 KiB .. 1 GiB, x4


class StoreCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]],
                 sessions: Callable[[], dict[str, Any]] | None = None) -> None:
        self._stats = stats
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        st = self._stats()
        tiers: dict[str, dict[str, Any]] = st["tiers"]
        for name in TIER_COUNTERS:
            unit = "_seconds" if name.endswith("_seconds") else ""
            base = name[: -len("_seconds")] if unit else name
            fam = CounterMetricFamily(f"kvstore_tier_{base}{unit}", f"per tier: {_HELP[name]}", labels=["tier"])
            for tier, values in tiers.items():
                fam.add_metric([tier], float(values.get(name, 0)))
            yield fam
        for name, text in _GAUGES.items():
            fam = GaugeMetricFamily(f"kvstore_tier_{name}", f"per tier: {text}", labels=["tier"])
            for tier, values in tiers.items():
                value = values.get(name)
                if value is not None:
                    fam.add_metric([tier], float(value))
            yield fam
        usage = GaugeMetricFamily("kvstore_tenant_bytes", "bytes held per tenant", labels=["tenant"])
        objects = GaugeMetricFamily("kvstore_tenant_objects", "objects held per tenant", labels=["tenant"])
        for tenant, used in st["tenants"].items():
            usage.add_metric([tenant], float(used["bytes"]))
            objects.add_metric([tenant], float(used["objects"]))
        yield usage
        yield objects
        yield GaugeMetricFamily("kvstore_pinned_objects", "pinned objects", value=st["pinned_objects"])
        if self._sessions is not None:
            yield from _session_metrics(self._sessions())


def _session_metrics(per_tenant: dict[str, Any]) -> Iterator[Metric]:
    """Agent sessions per tenant (kvstore.agents): paused now, and tool calls by outcome."""
    paused = GaugeMetricFamily("kvstore_agent_sessions_paused", "agent sessions waiting on a tool call",
                               labels=["tenant"])
    calls = CounterMetricFamily("kvstore_agent_tool_calls", "tool calls agent sessions paused on, by outcome: "
                                "started, finished (next turn came), refused (pin cap), skipped (expected "
                                "to outlast the pause limit), expired (took longer than the pin)",
                                labels=["tenant", "outcome"])
    for tenant, s in per_tenant.items():
        paused.add_metric([tenant], float(s.paused))
        for outcome in ("started", "finished", "refused", "skipped", "expired"):
            calls.add_metric([tenant, outcome], float(getattr(s, outcome)))
    yield paused
    yield calls


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]],
                 sessions: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kvstore_requests", "HTTP requests", ["route", "code"], registry=self.registry)
        self.latency = Histogram("kvstore_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.object_bytes = Histogram("kvstore_object_bytes", "size of objects put and got", ["op"],
                                      registry=self.registry, buckets=SIZE_BUCKETS)
        self.arena_waits = Counter("kvstore_arena_waits", "request bodies that waited for memory-tier space "
                                   "(back-pressure: objects in flight filled the arena)", registry=self.registry)
        self.body_waits = Counter("kvstore_body_waits", "request bodies that waited because bodies being "
                                  "received held an eighth of the memory tier", registry=self.registry)
        self.bytes_in = Counter("kvstore_received_bytes", "object bytes received", registry=self.registry)
        self.bytes_out = Counter("kvstore_sent_bytes", "object bytes sent", registry=self.registry)
        self.lmcache = Counter("kvstore_lmcache_requests", "LMCache protocol requests and rejections", ["what"],
                               registry=self.registry)
        self.registry.register(StoreCollector(stats, sessions))
