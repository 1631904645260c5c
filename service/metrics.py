"""Prometheus metrics: request counters and latencies, plus the store's own counters read at
scrape time (one registry per app, so tests can run several daemons in one process)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class StoreCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        st = self._stats()
        names = sorted({k for t in st["tiers"].values() for k, v in t.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for name in names:
            fam = GaugeMetricFamily(f"kvstore_tier_{name}", f"per-tier {name}", labels=["tier"])
            for tier, values in st["tiers"].items():
                value = values.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    fam.add_metric([tier], float(value))
            yield fam
        usage = GaugeMetricFamily("kvstore_tenant_bytes", "bytes held per tenant", labels=["tenant"])
        for tenant, used in st["tenants"].items():
            usage.add_metric([tenant], float(used))
        yield usage
        yield GaugeMetricFamily("kvstore_pinned_objects", "pinned objects", value=st["pinned_objects"])


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kvstore_requests", "HTTP requests", ["route", "code"], registry=self.registry)
        self.latency = Histogram("kvstore_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.bytes_in = Counter("kvstore_bytes_received", "object bytes received", registry=self.registry)
        self.bytes_out = Counter("kvstore_bytes_sent", "object bytes sent", registry=self.registry)
        self.lmcache = Counter("kvstore_lmcache_requests", "LMCache protocol requests and rejections", ["what"],
                               registry=self.registry)
        self.registry.register(StoreCollector(stats))
