"""governor's own metrics, one registry per running app (so tests can run several apps).

Stages count in local variables and publish here once per request or batch, never per datapoint.
Gauges that mirror state (queue length, breaker state) are read from the owning objects at scrape
time through `statistics()`, so keeping them current costs nothing on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from service import __version__

disable_created_metrics()  # the *_created series double the exposition and nobody reads them

_SIZE_BUCKETS = tuple(float(4**i) for i in range(1, 13))  # 4 .. 16M
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _StateCollector(Collector):
    """Turns `statistics()` of live objects into gauges and counters when /metrics is scraped."""

    def __init__(self) -> None:
        self._sources: list[tuple[str, str, str, dict[str, str], Callable[[], float]]] = []

    def add(
        self, kind: str, name: str, doc: str, labels: dict[str, str], read: Callable[[], float]
    ) -> None:
        self._sources.append((kind, name, doc, labels, read))

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for kind, name, doc, labels, read in self._sources:
            fam = families.get(name)
            if fam is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fam = families[name] = cls(name, doc, labels=list(labels))
            fam.add_metric(list(labels.values()), read())
        return families.values()


class Metrics:
    """Every metric governor exports about itself."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        Gauge("governor_build_info", "Build information.", ["version"], registry=r).labels(
            __version__
        ).set(1)
        self.datapoints_received = Counter(
            "governor_datapoints_received_total",
            "Datapoints (samples and histogram samples) accepted by a receiver.",
            ["pipeline"],
            registry=r,
        )
        self.datapoints_sent = Counter(
            "governor_datapoints_sent_total",
            "Datapoints delivered to a backend (2xx).",
            ["pipeline", "exporter"],
            registry=r,
        )
        self.datapoints_dropped = Counter(
            "governor_datapoints_dropped_total",
            "Datapoints accepted but never delivered, by reason.",
            ["pipeline", "exporter", "reason"],
            registry=r,
        )
        self.datapoints_rejected = Counter(
            "governor_datapoints_rejected_total",
            "Datapoints taken out of accepted requests and reported back to the client as "
            "rejected (OTLP partial success), by reason.",
            ["pipeline", "reason"],
            registry=r,
        )
        self.config_reloads = Counter(
            "governor_config_reloads_total",
            "Reloads of the rules or limits file on SIGHUP (one per file), by result (success, "
            "failure).",
            ["result"],
            registry=r,
        )
        self.requests = Counter(
            "governor_receiver_requests_total",
            "Requests answered by a receiver, by status code (HTTP status, or the gRPC code name "
            "for OTLP/gRPC).",
            ["pipeline", "code"],
            registry=r,
        )
        self.rejected = Counter(
            "governor_receiver_rejected_requests_total",
            "Requests refused by a receiver, by reason.",
            ["pipeline", "reason"],
            registry=r,
        )
        self.export_requests = Counter(
            "governor_export_requests_total",
            "Requests sent to a backend, by outcome.",
            ["pipeline", "exporter", "outcome"],
            registry=r,
        )
        self.export_retries = Counter(
            "governor_export_retries_total",
            "Retried export attempts.",
            ["pipeline", "exporter"],
            registry=r,
        )
        self.export_splits = Counter(
            "governor_export_splits_total",
            "Batches split in two because the backend said they were too large.",
            ["pipeline", "exporter"],
            registry=r,
        )
        self.export_duration = Histogram(
            "governor_export_duration_seconds",
            "Time for one export request, from send to response.",
            ["pipeline", "exporter"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.batch_series = Histogram(
            "governor_batch_series",
            "Series per batch handed to the queue.",
            ["pipeline"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_bytes = Histogram(
            "governor_batch_bytes",
            "Uncompressed bytes per batch handed to the queue.",
            ["pipeline"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.state = _StateCollector()
        r.register(self.state)

    def gauge(self, name: str, doc: str, labels: dict[str, str], read: Callable[[], Any]) -> None:
        """Export `read()` as gauge `name` at every scrape."""
        self.state.add("gauge", name, doc, labels, read)

    def counter(self, name: str, doc: str, labels: dict[str, str], read: Callable[[], Any]) -> None:
        """Export `read()`, a count kept by its owner, as counter `name` (without `_total`)."""
        self.state.add("counter", name, doc, labels, read)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
