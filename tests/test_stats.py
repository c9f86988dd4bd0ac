"""Per-metric stats (issue 6): service/governance/stats.py fed by the governance stage, exposed by
StatsCollector on /metrics and by /api/v1/cardinality.

Unit tests feed `Governance.prw` / `Governance.otlp` with serialized requests and a fake clock (time
is whatever the test says it is), then read `Stats` directly; counts are exact wherever the stats
promise exactness. The end-to-end tests run a whole App on 127.0.0.1:0 in front of a recording
backend and talk to it with httpx; time is real there, and nothing waits on it.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import cramjam
import httpx
import pytest
import trio
import trio.testing
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import BucketSpan, Label, Sample, TimeSeries
from service._proto.prometheus.types_pb2 import Histogram as NativeHistogram
from service.app import Addresses, App
from service.codec import otlp as otlp_codec
from service.codec.errors import BadProtobuf
from service.config import StatsConfig, config_from_dict
from service.governance import prw
from service.governance.activity import StatsCollector
from service.governance.cardinality import hash_many
from service.governance.stage import Governance
from service.governance.stats import OTHER, Stats
from service.receivers.http import hypercorn_config, lifespan, read_body, serve_http
from service.telemetry.health import Health
from service.telemetry.metrics import Metrics
from service.telemetry.server import TelemetryApp

WINDOW_S = 60.0
T0_MS = 1_700_000_040_000  # the start of a stats window (a multiple of 60 s)
DEADLINE_S = 10.0  # bound on every wait in the end-to-end tests; the happy path takes ms
PRW_HEADERS = {
    "content-type": "application/x-protobuf",
    "content-encoding": "snappy",
    "x-prometheus-remote-write-version": "0.1.0",
}


# ---- remote write data ------------------------------------------------------------------------


def series(
    name: str | None,
    *,
    samples: int = 1,
    histograms: int = 0,
    name_first: bool = True,
    **labels: str,
) -> TimeSeries:
    """One series: `__name__` (first as Prometheus sends it, or last), the other labels sorted,
    `samples` float samples and `histograms` native histogram samples."""
    pairs = sorted(labels.items())
    if name is not None:
        pairs = [("__name__", name), *pairs] if name_first else [*pairs, ("__name__", name)]
    return TimeSeries(
        labels=[Label(name=k, value=v) for k, v in pairs],
        samples=[Sample(value=float(i), timestamp=T0_MS + i) for i in range(samples)],
        histograms=[
            NativeHistogram(
                count_int=3,
                sum=4.5,
                schema=3,
                positive_spans=[BucketSpan(offset=0, length=2)],
                positive_deltas=[1, 1],
                timestamp=T0_MS + i,
            )
            for i in range(histograms)
        ],
    )


def write_request(*timeseries: TimeSeries) -> bytes:
    return WriteRequest(timeseries=list(timeseries)).SerializeToString()


def pods(name: str, n: int, **labels: str) -> list[TimeSeries]:
    """`n` single-sample series of `name`, told apart by their pod label."""
    return [series(name, pod=f"pod-{i}", **labels) for i in range(n)]


def one_sample_each(data: bytes) -> bool:
    """Whether the stats count `data` as one datapoint a series without parsing it: every
    series is its labels then one sample, as its keys taken before its sample show (they
    exist, and each is only labels)."""
    got = prw.prefix_series(data)
    keys = None if got is None else got.keys
    try:
        for key in keys or ():
            prw.check_labels(key)
    except prw.NotLabels:
        return False
    return keys is not None


# ---- OTLP data --------------------------------------------------------------------------------


def attributes(pairs: Mapping[str, str]) -> list[KeyValue]:
    """Key-values in the mapping's order (the order matters to the wire, not to identity)."""
    return [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in pairs.items()]


def gauge(name: str, *points: Mapping[str, str]) -> Metric:
    """A gauge with one datapoint per attribute mapping."""
    return Metric(
        name=name,
        gauge=Gauge(data_points=[NumberDataPoint(attributes=attributes(p)) for p in points]),
    )


def counter(name: str, *points: Mapping[str, str]) -> Metric:
    dps = [NumberDataPoint(attributes=attributes(p), as_int=1) for p in points]
    return Metric(name=name, sum=Sum(data_points=dps, is_monotonic=True, aggregation_temporality=2))


def histogram(name: str, *points: Mapping[str, str]) -> Metric:
    dps = [HistogramDataPoint(attributes=attributes(p), count=1) for p in points]
    return Metric(name=name, histogram=Histogram(data_points=dps, aggregation_temporality=2))


def resource_metrics(resource: Mapping[str, str], *metrics: Metric) -> ResourceMetrics:
    return ResourceMetrics(
        resource=Resource(attributes=attributes(resource)),
        scope_metrics=[ScopeMetrics(metrics=list(metrics))],
    )


def otlp_request(*resources: ResourceMetrics) -> bytes:
    return ExportMetricsServiceRequest(resource_metrics=list(resources)).SerializeToString()


# ---- a governance stage with stats ------------------------------------------------------------


@attrs.define
class FakeClock:
    """Milliseconds that move only when the test moves them."""

    now_ms: int = T0_MS

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += round(seconds * 1000)


@attrs.define
class Governed:
    gov: Governance
    stats: Stats
    clock: FakeClock

    def prw(self, *timeseries: TimeSeries) -> None:
        self.gov.prw(write_request(*timeseries), "")

    def otlp(self, *resources: ResourceMetrics) -> None:
        self.gov.otlp(otlp_codec.admit(otlp_request(*resources)), "")


def governed(pipeline: str = "prw", **cfg: Any) -> Governed:
    """A Governance with only stats (StatsConfig(**cfg)), on a fake clock at T0_MS."""
    stats = Stats(StatsConfig(**{"window_s": WINDOW_S, **cfg}), pipeline=pipeline)
    clock = FakeClock()
    return Governed(Governance(pipeline=pipeline, stats=stats, clock_ms=clock), stats, clock)


def datapoints_of(stats: Stats) -> dict[str, int]:
    """Datapoints per metric name since start."""
    return {name: c.total for name, c in stats.metrics.items()}


def window_datapoints_of(stats: Stats) -> dict[str, int]:
    """Datapoints per metric name in the current and the previous window."""
    return {name: c.window + c.before for name, c in stats.metrics.items()}


def series_of(stats: Stats) -> dict[str, int]:
    """Active series per metric name."""
    return {name: c.series() for name, c in stats.metrics.items()}


# ---- basic: datapoints per metric name ----------------------------------------------------------


def test_basic_counts_datapoints_per_metric_name_over_several_requests() -> None:
    """Basic stats count every datapoint under its metric name, adding up over requests:
    per name since start, per name over the window, and in all."""
    g = governed(level="basic")
    g.prw(*pods("http_requests_total", 3), *pods("up", 2))
    g.prw(*pods("http_requests_total", 3))
    g.prw(series("process_cpu_seconds_total", job="api"), *pods("up", 1))

    assert datapoints_of(g.stats) == {
        "http_requests_total": 6,
        "up": 3,
        "process_cpu_seconds_total": 1,
    }
    assert window_datapoints_of(g.stats) == datapoints_of(g.stats)
    assert g.stats.datapoints == 10
    assert series_of(g.stats) == {"http_requests_total": 0, "up": 0, "process_cpu_seconds_total": 0}


def test_basic_counts_each_sample_of_a_multi_sample_series() -> None:
    """A series with several samples (or native histogram samples) counts one datapoint per
    sample, not one per series."""
    g = governed(level="basic")
    g.prw(series("queue_depth", samples=3, queue="a"), series("queue_depth", samples=2, queue="b"))
    g.prw(series("latency_seconds", samples=0, histograms=4, route="/"), series("up", samples=5))

    assert datapoints_of(g.stats) == {"queue_depth": 5, "latency_seconds": 4, "up": 5}
    assert g.stats.datapoints == 14


@attrs.frozen
class Shape:
    """A request shape: its series, whether the stats count it without parsing it (one sample
    a series), and the datapoints per name the stats must count."""

    timeseries: Sequence[TimeSeries]
    one_sample_each: bool
    expected: dict[str, int]


_LONG_NAME = "a_metric_name_longer_than_127_bytes_" + "x" * 100  # a two-byte length varint
SHAPES = {
    "name first, one sample each": Shape(
        [*pods("http_requests_total", 3), *pods("up", 2), series("build_info", version="1")],
        True,
        {"http_requests_total": 3, "up": 2, "build_info": 1},
    ),
    "name not the first label": Shape(
        [series("up", name_first=False, a="1"), series("jobs", name_first=False, a="2")],
        True,
        {"up": 1, "jobs": 1},
    ),
    "several samples per series": Shape(
        [series("up", samples=3, pod="a"), series("up", pod="b"), series("jobs", samples=2)],
        False,
        {"up": 4, "jobs": 2},
    ),
    "native histograms": Shape(
        [series("latency_seconds", samples=0, histograms=2, route="/"), series("up", pod="a")],
        False,
        {"latency_seconds": 2, "up": 1},
    ),
    "a name longer than 127 bytes": Shape(
        [series(_LONG_NAME, pod="a"), series("up", pod="a")], True, {_LONG_NAME: 1, "up": 1}
    ),
    "a series without a name": Shape(
        [series(None, pod="a"), series("up", pod="a")], True, {"": 1, "up": 1}
    ),
    "UTF-8 metric names (Prometheus 3)": Shape(
        [
            series("http.server.request.duration", route="/a"),
            series("http.server.request.duration", route="/b"),
            series("up", pod="a"),
        ],
        True,
        {"http.server.request.duration": 2, "up": 1},
    ),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_basic_and_full_count_what_the_request_holds_in_any_shape(shape: Shape) -> None:
    """Stats count one datapoint a series without parsing the request when every series is
    its labels then one sample, and parse it otherwise; either way the datapoints per name are
    exactly what the request holds, at the basic level and the full one alike."""
    data = write_request(*shape.timeseries)
    assert one_sample_each(data) is shape.one_sample_each  # the shape covers the path it names
    basic, full = governed(level="basic"), governed(level="full")
    for g in (basic, full):
        g.gov.prw(data, "")
        g.gov.prw(data, "")

    twice = {name: 2 * n for name, n in shape.expected.items()}
    assert datapoints_of(basic.stats) == twice
    assert datapoints_of(full.stats) == twice


def test_one_sample_a_series_and_a_full_parse_agree_on_the_same_series() -> None:
    """The same series sent once as single-sample requests (counted without a parse) and once
    with two samples per series (parsed) end up under the same names, with one datapoint per
    sample."""
    names = ["http_requests_total", "node_cpu_seconds_total", "up", "build_info"]
    one = [series(n, pod=f"p{i}") for i, n in enumerate(names)]
    two = [series(n, samples=2, pod=f"p{i}") for i, n in enumerate(names)]
    assert one_sample_each(write_request(*one))
    assert not one_sample_each(write_request(*two))
    by_regex, by_parse = governed(level="basic"), governed(level="basic")
    by_regex.prw(*one)
    by_regex.prw(*one)
    by_parse.prw(*two)

    assert datapoints_of(by_regex.stats) == datapoints_of(by_parse.stats) == dict.fromkeys(names, 2)


# ---- full: series, label values, groups ----------------------------------------------------------


def test_full_counts_active_series_per_metric_exactly() -> None:
    """Below exact_limit, full stats count each metric's distinct series exactly, across
    requests that repeat some series and add others, and sum them in the report."""
    g = governed(level="full", exact_limit=1000)
    g.prw(*pods("http_requests_total", 300, code="200"), *pods("up", 7))
    g.prw(*pods("http_requests_total", 300, code="500"), *pods("up", 9))
    g.prw(*pods("http_requests_total", 150, code="200"), series("build_info", version="2"))

    assert series_of(g.stats) == {"http_requests_total": 600, "up": 9, "build_info": 1}
    assert datapoints_of(g.stats) == {"http_requests_total": 750, "up": 16, "build_info": 1}
    assert g.stats.report(3)["series_total"] == 610


def test_a_full_series_cache_forgets_its_older_half_and_counts_stay_exact(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With more active series than limits.series_cache, the facts cache forgets its older half
    each time it fills (not everything), series counts stay exact (the trackers, not the cache,
    hold them), and a rate-limited warning says to raise the cache."""
    g = governed(level="full")
    g.gov.series_cache = 40
    for _ in range(3):
        g.prw(*pods("up", 100))
        g.clock.advance(10)
    assert series_of(g.stats) == {"up": 100}
    assert datapoints_of(g.stats) == {"up": 300}
    assert 20 <= g.gov.series_cached <= 40
    assert g.gov.evictions > 0
    warnings = [r for r in caplog.records if "series cache is full" in r.getMessage()]
    assert len(warnings) == 1


def test_full_counts_a_series_once_per_window_however_often_it_is_sent() -> None:
    """A series sent many times in one window is one series (and one series behind each of
    its label values), while each of its datapoints counts."""
    g = governed(level="full")
    for _ in range(5):
        g.prw(series("up", samples=2, job="api", pod="a"))
        g.clock.advance(10)
    g.prw(series("up", job="api", pod="b"))

    assert series_of(g.stats) == {"up": 2}
    assert datapoints_of(g.stats) == {"up": 11}
    assert g.stats.top_values("up", 5) == {
        "job": (1, [("api", 2)]),
        "pod": (2, [("a", 1), ("b", 1)]),
    }


def test_a_series_sent_twice_in_its_first_request_is_one_series() -> None:
    """The same series twice in the request that first brings it (between others) is one
    series with one set of label values, and both its datapoints count."""
    g = governed(level="full")
    g.prw(
        series("up", job="api", pod="a"),
        series("up", job="api", pod="b"),
        series("up", job="api", pod="a"),
    )

    assert series_of(g.stats) == {"up": 2}
    assert datapoints_of(g.stats) == {"up": 3}
    assert g.stats.top_values("up", 5) == {
        "job": (1, [("api", 2)]),
        "pod": (2, [("a", 1), ("b", 1)]),
    }
    assert g.gov.series_cached == 2


def test_full_counts_datapoints_in_the_window_they_arrived_in_when_read_later() -> None:
    """Full stats hold a request's datapoint counts back and count them per name and group
    when the stats are read; nothing read in between, a window roll still puts each request's
    datapoints in its own window."""
    g = governed(level="full", labels=["service"])
    g.prw(*pods("http_requests_total", 3, service="api"), series("up", samples=2))
    g.prw(*pods("http_requests_total", 3, service="api"))
    g.clock.advance(WINDOW_S)
    g.prw(*pods("http_requests_total", 1, service="api"))

    assert {n: (c.before, c.window, c.total) for n, c in g.stats.metrics.items()} == {
        "http_requests_total": (6, 1, 7),
        "up": (2, 0, 2),
    }
    assert {k: (c.before, c.window) for k, c in g.stats.groups.items()} == {
        ("api",): (6, 1),
        ("",): (2, 0),
    }
    assert g.stats.datapoints == 9


@pytest.mark.parametrize("level", ["basic", "full"])
@pytest.mark.parametrize(
    "body",
    [
        b"\x0a\x05\x0a\x03\x0a",  # a label cut short
        b"\x0a\x04\x0a\x02\x0a\xff",  # a label name that is not UTF-8
        b"\xff\xff\xff",
    ],
)
def test_a_body_that_is_not_a_write_request_is_refused_at_every_level(
    level: str, body: bytes
) -> None:
    """Stats read a request's series only after, or as part of, validating it whole: a body
    that is not a WriteRequest is refused with the codec's one-line reason, and counts
    nothing."""
    g = governed(level=level)
    with pytest.raises(BadProtobuf, match="body is not a valid protobuf WriteRequest"):
        g.gov.prw(body, "")
    assert (g.stats.datapoints, dict(g.stats.metrics)) == (0, {})


def test_series_that_stop_sending_count_until_the_end_of_the_next_window() -> None:
    """A series counts in the window it was seen in and the one after; a window later it is
    gone, whether or not anything else is sent meanwhile. Datapoint counts per window follow
    the same two windows."""
    g = governed(level="full")
    g.prw(*pods("up", 3))  # window 0: pods 0, 1, 2
    g.clock.advance(30)
    g.prw(*pods("up", 1))
    assert (series_of(g.stats), window_datapoints_of(g.stats)) == ({"up": 3}, {"up": 4})

    g.clock.advance(30)  # window 1: only pod 0
    g.prw(*pods("up", 1))
    assert (series_of(g.stats), window_datapoints_of(g.stats)) == ({"up": 3}, {"up": 5})

    g.clock.advance(60)  # window 2: pods 1 and 2 were last seen two windows ago
    g.prw(*pods("up", 1))
    assert (series_of(g.stats), window_datapoints_of(g.stats)) == ({"up": 1}, {"up": 2})

    g.clock.advance(120)  # window 4: nothing sent for a whole window
    g.stats.roll(g.clock() / 1000)
    assert (series_of(g.stats), window_datapoints_of(g.stats)) == ({"up": 0}, {"up": 0})
    assert datapoints_of(g.stats) == {"up": 6}


async def test_governance_task_rolls_the_window_without_traffic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With no requests at all, the governance task's roll drops a series that stopped between
    one and two windows after its last sample: sent at 60 s and at 100 s (window 1), it counts
    until 120 s plus one tick and is gone by 180 s plus one tick."""
    stats = Stats(StatsConfig(level="full", window_s=WINDOW_S), pipeline="prw")
    gov = Governance(
        pipeline="prw", stats=stats, clock_ms=lambda: round(trio.current_time() * 1000)
    )
    emitted: list[object] = []

    async def emit(batch: list[object]) -> None:
        emitted.append(batch)

    stop = trio.Event()
    seen: dict[float, int] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gov.run, emit, stop)
        await trio.sleep_until(60.0)
        gov.prw(write_request(series("up", pod="a"), series("up", pod="b")), "")
        await trio.sleep_until(100.0)
        gov.prw(write_request(series("up", pod="a")), "")
        for t in (119.0, 121.0, 179.0, 181.0):
            await trio.sleep_until(t)
            seen[t] = stats.metrics["up"].series()
        stop.set()

    assert seen == {119.0: 2, 121.0: 2, 179.0: 2, 181.0: 0}
    assert emitted == []


def test_label_values_per_metric_count_distinct_values_and_series_per_value() -> None:
    """Per label of a metric: how many distinct values it has and its top values by the number
    of series carrying them (ties by value), over the current and previous window."""
    g = governed(level="full")
    g.prw(
        *[series("http_requests_total", code="200", pod=f"p{i}") for i in range(4)],
        *[series("http_requests_total", code="500", pod=f"p{i}") for i in range(2)],
        series("http_requests_total", code="404", pod="p9"),
        series("up", pod="p0"),
    )
    g.clock.advance(WINDOW_S)  # the next window: values seen in the last one still count
    g.prw(series("http_requests_total", code="503", pod="p0"))

    assert g.stats.top_values("http_requests_total", 2) == {
        "code": (4, [("200", 4), ("500", 2)]),
        "pod": (5, [("p0", 2), ("p1", 2)]),
    }
    assert g.stats.top_values("up", 2) == {"pod": (1, [("p0", 1)])}
    assert g.stats.top_values("never_seen", 2) == {}
    [row] = [m for m in g.stats.report(2)["metrics"] if m["name"] == "up"]
    assert row["labels"] == [
        {"label": "pod", "distinct_values": 1, "top_values": [{"value": "p0", "series": 1}]}
    ]


def test_groups_count_series_and_datapoints_per_combination_of_stats_labels() -> None:
    """With stats.labels [service, env], each combination of their values (an absent label
    is "") counts its series and datapoints, across metrics; the report lists the top ones
    by series."""
    g = governed(level="full", labels=["service", "env"])
    api_prod = [*pods("http_requests_total", 3, service="api", env="prod")]
    g.prw(*api_prod, series("up", samples=2, service="api"))
    g.prw(*api_prod, *pods("jobs_total", 2, service="batch", env="prod"))

    assert {key: (c.series(), c.window) for key, c in g.stats.groups.items()} == {
        ("api", "prod"): (3, 6),
        ("api", ""): (1, 2),
        ("batch", "prod"): (2, 2),
    }
    assert g.stats.report(2)["groups"] == [
        {"labels": {"service": "api", "env": "prod"}, "series": 3, "datapoints_window": 6},
        {"labels": {"service": "batch", "env": "prod"}, "series": 2, "datapoints_window": 2},
    ]


# ---- bounds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["basic", "full"])
def test_names_past_max_metrics_count_under_other(level: str) -> None:
    """Past max_metrics distinct names, new names count under __other__, datapoints and
    (full) series together, while the names already tracked keep counting as themselves; the
    same holds for label combinations."""
    g = governed(level=level, max_metrics=3, labels=["service"])
    g.prw(*pods("a", 1, service="s1"), *pods("b", 2, service="s2"), *pods("c", 3, service="s3"))
    g.prw(*pods("d", 4, service="s4"), *pods("e", 5, service="s5"), *pods("a", 2, service="s1"))

    assert datapoints_of(g.stats) == {"a": 3, "b": 2, "c": 3, OTHER: 9}
    assert g.stats.datapoints == 17
    if level == "full":
        assert series_of(g.stats) == {"a": 2, "b": 2, "c": 3, OTHER: 9}
        assert {k: (c.series(), c.total) for k, c in g.stats.groups.items()} == {
            ("s1",): (2, 3),
            ("s2",): (2, 2),
            ("s3",): (3, 3),
            (OTHER,): (9, 9),
        }
        assert g.stats.top_values(OTHER, 5) == {}


@pytest.mark.parametrize("level", ["basic", "full"])
def test_names_idle_for_two_windows_are_forgotten_and_make_room(level: str) -> None:
    """A name with no datapoints (and, full, no active series) in the current and previous
    window is forgotten at the next window, so max_metrics bounds the names active lately and a
    new name then counts as itself, not under __other__."""
    g = governed(level=level, max_metrics=2)
    g.prw(*pods("a", 1), *pods("b", 1))
    g.clock.advance(WINDOW_S)
    g.prw(*pods("b", 1))
    g.clock.advance(WINDOW_S)
    g.prw(*pods("b", 1))  # a: nothing in the previous window nor this one
    g.clock.advance(WINDOW_S)
    g.prw(*pods("c", 1))
    assert datapoints_of(g.stats) == {"b": 3, "c": 1}


def test_label_values_past_max_label_values_are_not_kept() -> None:
    """Past max_label_values distinct values of one label of a metric, further values are
    not kept: the distinct count stops at the cap and the top values come from those kept,
    while the series themselves all count."""
    g = governed(level="full", max_label_values=10)
    g.prw(*pods("up", 15))
    g.prw(*[series("up", pod=f"pod-{i}") for i in (3, 12)])  # a kept value and a dropped one

    assert series_of(g.stats) == {"up": 15}
    distinct, top = g.stats.top_values("up", 3)["pod"]
    assert distinct == 10
    assert top == [("pod-0", 1), ("pod-1", 1), ("pod-2", 1)]


def test_label_value_cap_holds_across_a_window_roll() -> None:
    """max_label_values bounds the distinct values a metric's label reports over the window
    pair too: pods replaced at a window boundary (15 old, 15 new) still show the cap, 10."""
    g = governed(level="full", max_label_values=10)
    g.prw(*[series("up", pod=f"old-{i}") for i in range(15)])
    g.clock.advance(WINDOW_S)
    g.prw(*[series("up", pod=f"new-{i}") for i in range(15)])

    assert series_of(g.stats) == {"up": 30}
    assert g.stats.top_values("up", 1)["pod"][0] == 10


# ---- OTLP ----------------------------------------------------------------------------------------

_API = {"service.name": "api", "host.name": "h1"}
_API_REORDERED = {"host.name": "h1", "service.name": "api"}
_API_H2 = {"service.name": "api", "host.name": "h2"}
_GET = {"method": "GET", "code": "200"}
_GET_REORDERED = {"code": "200", "method": "GET"}
_POST = {"method": "POST", "code": "200"}


def test_otlp_basic_counts_datapoints_per_metric_name() -> None:
    """Basic stats on OTLP count the datapoints of every metric kind under its name, over
    resources, scopes and requests."""
    g = governed("otlp", level="basic")
    g.otlp(
        resource_metrics(_API, gauge("cpu", {}, {"core": "1"}), counter("rpc_total", _GET)),
        resource_metrics(_API_H2, histogram("rpc_duration", _GET, _POST), gauge("cpu", {})),
    )
    g.otlp(resource_metrics(_API, counter("rpc_total", _GET, _POST)))

    assert datapoints_of(g.stats) == {"cpu": 3, "rpc_total": 3, "rpc_duration": 2}
    assert g.stats.datapoints == 8
    assert g.stats.report(5)["metrics"] == [
        {"name": "cpu", "datapoints_window": 3, "datapoints_total": 3},
        {"name": "rpc_total", "datapoints_window": 3, "datapoints_total": 3},
        {"name": "rpc_duration", "datapoints_window": 2, "datapoints_total": 2},
    ]


def test_otlp_series_identity_is_name_attributes_and_resource_attributes() -> None:
    """Full stats on OTLP: a series is its metric name, its datapoint attributes and its
    resource's attributes, each as a set (the same attributes in another order are the same
    series); another resource or another name makes another series."""
    g = governed("otlp", level="full")
    g.otlp(
        resource_metrics(
            _API,
            gauge("rpc_duration", _GET, _GET_REORDERED, _POST),  # two series
            counter("rpc_total", _GET),  # another name: its own series
        ),
        resource_metrics(_API_REORDERED, gauge("rpc_duration", _GET_REORDERED)),  # known
        resource_metrics(_API_H2, gauge("rpc_duration", _GET)),  # another resource: new
    )
    assert series_of(g.stats) == {"rpc_duration": 3, "rpc_total": 1}
    assert datapoints_of(g.stats) == {"rpc_duration": 5, "rpc_total": 1}

    g.otlp(resource_metrics(_API_REORDERED, gauge("rpc_duration", _POST, _GET)))
    assert series_of(g.stats) == {"rpc_duration": 3, "rpc_total": 1}
    assert datapoints_of(g.stats) == {"rpc_duration": 7, "rpc_total": 1}
    assert g.stats.top_values("rpc_duration", 2) == {
        "code": (1, [("200", 3)]),
        "method": (2, [("GET", 2), ("POST", 1)]),
    }


# ---- /metrics: StatsCollector -------------------------------------------------------------------


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of `name` in the registry, by its sorted labels."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name
    }


def test_stats_collector_exposes_totals_and_only_the_top_k_metrics_and_groups() -> None:
    """StatsCollector(k=2) over five metrics exposes the total datapoints and exactly the two
    metrics with the most series, the two with the most datapoints (not the same two) and the
    two label combinations with the most series."""
    g = governed(level="full", labels=["service"])
    for i, name in enumerate(["m1", "m2", "m3", "m4", "m5"]):
        g.prw(*pods(name, i + 1, service=f"s{i % 3}"))  # m5 has 5 series, m4 4, ...
    for _ in range(9):
        g.prw(series("m1", pod="pod-0", service="s0"))  # m1: 1 series, 10 datapoints
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector([g.stats], 2))

    assert registry.get_sample_value("governor_stats_datapoints_total", {"pipeline": "prw"}) == 24
    assert registry.get_sample_value("governor_stats_metric_names", {"pipeline": "prw"}) == 5
    assert registry.get_sample_value("governor_stats_series", {"pipeline": "prw"}) == 15
    assert _samples(registry, "governor_stats_top_metric_series") == {
        (("metric", "m5"), ("pipeline", "prw")): 5,
        (("metric", "m4"), ("pipeline", "prw")): 4,
    }
    assert _samples(registry, "governor_stats_top_metric_datapoints") == {
        (("metric", "m1"), ("pipeline", "prw")): 10,
        (("metric", "m5"), ("pipeline", "prw")): 5,
    }
    # s0: m1 (1) + m4 (4); s1: m2 (2) + m5 (5); s2: m3 (3)
    assert _samples(registry, "governor_stats_top_group_series") == {
        (("group", "service=s1"), ("pipeline", "prw")): 7,
        (("group", "service=s0"), ("pipeline", "prw")): 5,
    }
    assert registry.get_sample_value("governor_stats_tracker_bytes", {"pipeline": "prw"}) == float(
        g.stats.memory_bytes()
    )


def test_stats_collector_with_basic_stats_exposes_datapoints_only() -> None:
    """Basic stats have no series: the collector exposes datapoints (total and top k) and no
    series, group or tracker samples."""
    g = governed(level="basic")
    g.prw(*pods("a", 3), *pods("b", 1), *pods("c", 2))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector([g.stats], 2))

    assert registry.get_sample_value("governor_stats_datapoints_total", {"pipeline": "prw"}) == 6
    assert _samples(registry, "governor_stats_top_metric_datapoints") == {
        (("metric", "a"), ("pipeline", "prw")): 3,
        (("metric", "c"), ("pipeline", "prw")): 2,
    }
    for name in (
        "governor_stats_top_metric_series",
        "governor_stats_series",
        "governor_stats_top_group_series",
        "governor_stats_tracker_bytes",
    ):
        assert _samples(registry, name) == {}


# ---- the report (/api/v1/cardinality per pipeline) ---------------------------------------------


def test_report_with_basic_stats_lists_the_top_metrics_by_datapoints() -> None:
    """The basic report: at most `top` metrics, most datapoints in the window first (ties by
    name), with their window and total datapoints."""
    g = governed(level="basic")
    g.prw(*pods("a", 2), *pods("b", 5), *pods("c", 2), *pods("d", 1))

    assert g.stats.report(3) == {
        "level": "basic",
        "window_s": WINDOW_S,
        "metrics_tracked": 4,
        "datapoints_total": 10,
        "metrics": [
            {"name": "b", "datapoints_window": 5, "datapoints_total": 5},
            {"name": "a", "datapoints_window": 2, "datapoints_total": 2},
            {"name": "c", "datapoints_window": 2, "datapoints_total": 2},
        ],
    }


def test_report_with_full_stats_lists_at_most_top_metrics_sorted_by_series() -> None:
    """The full report lists at most `top` metrics, the ones with the most series first, even
    when other metrics have more datapoints (a few series sent often)."""
    g = governed(level="full")
    g.prw(*pods("a", 5), *pods("b", 4), *pods("c", 3))
    for _ in range(10):
        g.prw(series("d"), series("e"))

    rows = g.stats.report(3)["metrics"]
    assert [(r["name"], r["series"], r["datapoints_window"]) for r in rows] == [
        ("a", 5, 5),
        ("b", 4, 4),
        ("c", 3, 3),
    ]


# ---- memory -----------------------------------------------------------------------------------

_KEY = b"\n\x08__name__\x12\x08m%07d\n\x03pod\x12\x07%07d"  # a series' label bytes


def _feed(stats: Stats, metrics: int, series_per_metric: int, first: int = 0) -> None:
    """Each of `metrics` names gets `series_per_metric` new series (pods first..), as the stage
    adds them: datapoints per name, then the series' hashes."""
    pods_ = range(first, first + series_per_metric)
    for m in range(metrics):
        name = f"m{m:07d}"
        stats.add_datapoints({name: series_per_metric}, T0_MS / 1000)
        stats.add_series(name, hash_many(_KEY % (m, p) for p in pods_), T0_MS / 1000)


def test_full_stats_of_1000_metrics_by_1000_series_stay_within_the_exact_bound() -> None:
    """1000 metrics of 1000 series each, at the default exact_limit (1000): every count is
    exact, and the trackers hold under 82 KB a metric (a set of 1000 hashes: a 2048-slot table
    of 32 KiB and 48 bytes an int, plus an empty previous window), so under 82 MB in all."""
    stats = Stats(StatsConfig(level="full"), pipeline="prw")
    _feed(stats, 1000, 1000)

    assert set(series_of(stats).values()) == {1000}
    assert stats.memory_bytes() <= 1000 * 82_000


def test_trackers_switch_to_hyperloglog_past_exact_limit_and_stay_within_2_percent() -> None:
    """With exact_limit 100, 1000 metrics of 1000 series count by HyperLogLog: each count is
    within 2 % of 1000, and the memory stops growing: five times the series per metric cost
    not one byte more."""
    stats = Stats(StatsConfig(level="full", exact_limit=100), pipeline="prw")
    _feed(stats, 1000, 1000)
    counts = series_of(stats)
    after_1000 = stats.memory_bytes()
    _feed(stats, 1000, 4000, first=1000)
    counts_5000 = series_of(stats)

    assert all(math.isclose(n, 1000, rel_tol=0.02) for n in counts.values()), (
        min(counts.values()),
        max(counts.values()),
    )
    assert all(math.isclose(n, 5000, rel_tol=0.02) for n in counts_5000.values())
    assert stats.memory_bytes() == after_1000
    # per metric: the current window's sketch (2^14 registers), the union sketch count() keeps
    # and an empty previous window, each with its few hundred bytes of objects
    assert after_1000 <= 1000 * (2 * (2**14 + 1024) + 1024)


# ---- the HTTP endpoint, end to end ------------------------------------------------------------


class CountingBackend:
    """An ASGI remote-write backend: counts the requests it got, answers 204."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await read_body(scope, receive, 1 << 30)
        self.requests += 1
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@attrs.define
class Running:
    app: App
    addrs: Addresses
    client: httpx.AsyncClient

    async def write(self, *timeseries: TimeSeries) -> None:
        """POST a WriteRequest the way Prometheus does; the receiver must accept it."""
        host, port = self.addrs.prw
        body = bytes(cramjam.snappy.compress_raw(write_request(*timeseries)))
        resp = await self.client.post(
            f"http://{host}:{port}/api/v1/write", content=body, headers=PRW_HEADERS
        )
        assert resp.status_code in (200, 204), resp.text

    async def get(self, path: str) -> httpx.Response:
        host, port = self.addrs.telemetry
        return await self.client.get(f"http://{host}:{port}{path}")


@asynccontextmanager
async def running_governor(stats: dict[str, Any]) -> AsyncIterator[Running]:
    """A counting backend and an App in front of it with `stats`; on exit the App shuts down
    cleanly, then the backend."""
    backend = CountingBackend()
    async with trio.open_nursery() as nursery:
        backend_stop = trio.Event()
        [(host, port)] = await nursery.start(
            serve_http, backend, hypercorn_config("127.0.0.1:0"), backend_stop.wait
        )
        cfg = config_from_dict(
            {
                "telemetry": {"listen": "127.0.0.1:0"},
                "shutdown_grace_s": 5.0,
                "stats": stats,
                "prw": {
                    "receiver": {"listen": "127.0.0.1:0"},
                    "batch": {"interval_s": 0.01},
                    "exporters": [{"url": f"http://{host}:{port}/api/v1/write"}],
                },
            }
        )
        app = App(cfg)
        app_done = trio.Event()

        async def run_app(*, task_status: trio.TaskStatus[Addresses]) -> None:
            try:
                await app.run(task_status=task_status)
            finally:
                app_done.set()

        addrs = await nursery.start(run_app)
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
            yield Running(app, addrs, client)
        app.shutdown()
        with trio.fail_after(DEADLINE_S):
            await app_done.wait()
        backend_stop.set()


def _metrics_page(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("governor_stats_")
    }


async def test_cardinality_endpoint_answers_the_top_metrics_by_series() -> None:
    """GET /api/v1/cardinality?top=3 on a governor with full stats answers 200 JSON with
    status success and, for the prw pipeline, at most 3 metrics, most series first, with
    their datapoints and label values, and the groups of stats.labels; /metrics exposes the
    same stats, bounded to stats.top_k metrics."""
    async with running_governor({"level": "full", "labels": ["service"], "top_k": 2}) as gov:
        await gov.write(
            *pods("http_requests_total", 6, service="api"),
            *pods("http_request_duration_seconds", 4, service="api"),
            *pods("queue_depth", 2, service="worker"),
        )
        for _ in range(8):  # one series sent often: the most datapoints, the fewest series
            await gov.write(series("up", service="worker"))
        resp = await gov.get("/api/v1/cardinality?top=3")
        page = await gov.get("/metrics")

    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    answer = resp.json()
    assert (answer["status"], answer["level"], answer["top"]) == ("success", "full", 3)
    assert list(answer["pipelines"]) == ["prw"]
    prw = answer["pipelines"]["prw"]
    assert (prw["metrics_tracked"], prw["datapoints_total"], prw["series_total"]) == (4, 20, 13)
    assert prw["groups"] == [
        {"labels": {"service": "api"}, "series": 10, "datapoints_window": 10},
        {"labels": {"service": "worker"}, "series": 3, "datapoints_window": 10},
    ]
    assert prw["metrics"][0] == {
        "name": "http_requests_total",
        "datapoints_window": 6,
        "datapoints_total": 6,
        "series": 6,
        "labels": [
            {
                "label": "pod",
                "distinct_values": 6,
                "top_values": [
                    {"value": "pod-0", "series": 1},
                    {"value": "pod-1", "series": 1},
                    {"value": "pod-2", "series": 1},
                ],
            },
            {
                "label": "service",
                "distinct_values": 1,
                "top_values": [{"value": "api", "series": 6}],
            },
        ],
    }
    assert page.status_code == 200
    p = (("pipeline", "prw"),)
    exposed = _metrics_page(page.text)
    assert exposed[("governor_stats_datapoints_total", p)] == 20
    assert {k: v for k, v in exposed.items() if k[0] == "governor_stats_top_metric_series"} == {
        ("governor_stats_top_metric_series", (("metric", "http_requests_total"), *p)): 6,
        ("governor_stats_top_metric_series", (("metric", "http_request_duration_seconds"), *p)): 4,
    }
    assert {k: v for k, v in exposed.items() if k[0] == "governor_stats_top_metric_datapoints"} == {
        ("governor_stats_top_metric_datapoints", (("metric", "up"), *p)): 8,
        ("governor_stats_top_metric_datapoints", (("metric", "http_requests_total"), *p)): 6,
    }

    assert [(m["name"], m["series"]) for m in prw["metrics"]] == [
        ("http_requests_total", 6),
        ("http_request_duration_seconds", 4),
        ("queue_depth", 2),
    ]


async def test_cardinality_endpoint_rejects_a_top_that_is_not_a_number() -> None:
    """?top=abc answers 400 with a JSON error on one line saying what top must be."""
    async with running_governor({"level": "basic"}) as gov:
        resp = await gov.get("/api/v1/cardinality?top=abc")

    assert resp.status_code == 400
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {
        "status": "error",
        "error": "top must be an integer from 1 to 10000, got 'abc'",
    }
    assert "\n" not in resp.text


async def test_cardinality_endpoint_is_404_when_stats_are_off() -> None:
    """With stats.level none there is nothing to report: 404 with a one-line JSON error."""
    async with running_governor({"level": "none"}) as gov:
        await gov.write(series("up"))
        resp = await gov.get("/api/v1/cardinality?top=3")

    assert resp.status_code == 404, resp.text
    assert resp.json() == {
        "status": "error",
        "error": "stats are off: set stats.level to basic or full",
    }
    assert "\n" not in resp.text


@pytest.mark.parametrize(
    "query", ["top=0", "top=10001", "top=-1", "top=1.5", "top=abc", "top=%C2%B2"]
)
async def test_cardinality_endpoint_rejects_every_top_outside_1_to_10000(query: str) -> None:
    """Whatever `top` is, if it is not a plain integer from 1 to 10000 (zero, too large,
    negative, a fraction, letters, a superscript two) the answer is 400 with a one-line
    JSON error, never a server error; the report is not asked for."""
    answered: list[int] = []

    def cardinality(top: int) -> dict[str, Any]:
        answered.append(top)
        return {"top": top}

    app = TelemetryApp(Metrics(), Health(), cardinality)
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        [(host, port)] = await nursery.start(
            serve_http, app, hypercorn_config("127.0.0.1:0"), stop.wait
        )
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
            resp = await client.get(f"http://{host}:{port}/api/v1/cardinality?{query}")
            ok = await client.get(f"http://{host}:{port}/api/v1/cardinality?top=10000")
        stop.set()

    assert resp.status_code == 400, resp.text
    answer = json.loads(resp.text)
    assert answer["status"] == "error"
    assert answer["error"].startswith("top must be an integer from 1 to 10000, got ")
    assert "\n" not in resp.text
    assert (ok.status_code, ok.json(), answered) == (200, {"top": 10000}, [10000])
