"""The remote-write adapter's cached path (routes per distinct series) gives exactly what
evaluating each series gives: the same output series, the same per-rule counts, the same windows."""

from __future__ import annotations

import math
import random

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import TimeSeries
from service.codec.compression import varint
from service.governance import prw
from service.governance.engine import RuleEngine
from service.governance.rules import load_rules
from service.governance.windows import Emitted

RULES = """
rules:
  - name: team
    match: {name: "http_.*"}
    action: transform
    transform:
      - {op: set, label: team, value: "web-${job}"}
      - {op: replace, label: path, regex: "/u/[0-9]+", replacement: "/u/:id"}
  - name: tier
    action: classify
    classify:
      chains:
        - {when: [{label: job, equals: api}], set: {tier: gold}}
      tables:
        - {source: job, target: owner, values: {api: a-team}, default: nobody}
  - name: rename
    match: {name: "old_.*"}
    action: transform
    transform:
      - {op: rename_metric, value: "new_${__name__}"}
  - name: drop-debug
    match: {name: "debug_.*"}
    action: drop
  - name: drop-new
    match: {name: "new_old_b"}
    action: drop
  - name: hash
    match: {name: "http_requests_total"}
    action: sample
    sample: {method: hash, rate: 0.5}
  - name: prob
    match: {name: "rpc_.*"}
    action: sample
    sample: {method: probabilistic, rate: 0.3}
  - name: head
    match: {name: "queue_.*"}
    action: sample
    sample: {method: head, n: 3}
  - name: ds
    match: {name: "cpu_.*"}
    action: downsample
    downsample: {interval: 10s, method: avg}
  - name: agg
    match: {name: "mem_.*"}
    action: aggregate
    aggregate: {interval: 10s, by: [job], functions: [sum, max], keep_input: true}
  - name: ds-last
    match: {name: "disk_.*"}
    action: downsample
    downsample: {interval: 10s, method: last}
  - name: ds-first
    match: {name: "net_.*"}
    action: downsample
    downsample: {interval: 10s, method: first}
  - name: agg-counters
    match: {name: "reqs_total"}
    action: aggregate
    aggregate: {interval: 10s, without: [pod], functions: [sum, increase, count]}
  - name: agg-gauges
    match: {name: "temp_.*"}
    action: aggregate
    aggregate: {interval: 10s, by: [job], functions: [avg, min, max, last, stddev]}
  - {name: ds-min, match: {name: "load_.*"}, action: downsample,
     downsample: {interval: 10s, method: min}}
  - {name: ds-max, match: {name: "fan_.*"}, action: downsample,
     downsample: {interval: 10s, method: max}}
  - {name: ds-sum, match: {name: "io_.*"}, action: downsample,
     downsample: {interval: 10s, method: sum}}
  - {name: ds-count, match: {name: "pkt_.*"}, action: downsample,
     downsample: {interval: 10s, method: count}}
  - {name: agg-sum-only, match: {name: "errs_total"}, action: aggregate,
     aggregate: {interval: 10s, by: [job], functions: [sum]}}
  - {name: agg-count-only, match: {name: "users_.*"}, action: aggregate,
     aggregate: {interval: 10s, without: [pod], functions: [count]}}
"""

NAMES = [
    "http_requests_total",
    "http_latency",
    "old_a",
    "old_b",
    "debug_x",
    "rpc_calls",
    "queue_depth",
    "cpu_seconds",
    "mem_bytes",
    "disk_free",
    "net_rx",
    "reqs_total",
    "temp_c",
    "load_1m",
    "fan_rpm",
    "io_ops",
    "pkt_rx",
    "errs_total",
    "users_online",
    "plain",
]

series = st.tuples(
    st.sampled_from(NAMES),
    st.sampled_from(["api", "web", "db"]),
    st.sampled_from(["/u/1", "/u/22", "/x", ""]),
    st.integers(0, 3),
    st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.just(math.nan)),
    st.sampled_from([0, 0, 0, -1000, -15000]),  # late by this many ms
)


def request(items: list[tuple[str, str, str, int, float, int]], ts: int) -> bytes:
    req = WriteRequest()
    for name, job, path, pod, value, late in items:
        t = req.timeseries.add()
        labels = {"__name__": name, "job": job, "pod": str(pod)}
        if path:
            labels["path"] = path
        for k, v in sorted(labels.items()):
            t.labels.add(name=k, value=v)
        t.samples.add(value=value, timestamp=ts + late)
    return req.SerializeToString()


def engine(now: list[int], route_cache_max: int = 200_000) -> RuleEngine:
    rng = random.Random(7)
    return RuleEngine(
        load_rules(RULES),
        pipeline="prw",
        clock_ms=lambda: now[0],
        rand=rng.random,
        route_cache_max=route_cache_max,
    )


def series_of(governed: prw.Governed, data: bytes) -> list[str]:
    """The forwarded series, sorted: a WriteRequest's series order carries no meaning, and the
    cached path puts the series it keeps as they are first."""
    req = WriteRequest.FromString(governed.data if governed.data is not None else data)
    return sorted(str(ts) for ts in req.timeseries)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(series, min_size=1, max_size=30), min_size=1, max_size=6))
def test_cached_path_matches_per_series_evaluation(
    requests: list[list[tuple[str, str, str, int, float, int]]],
) -> None:
    """For any stream of single-sample requests (NaN values, late samples and series sent twice
    in a request among them), the cached path and per-series evaluation forward the same
    series, count the same per rule, report the same counts, and emit the same windows, at
    every tick and at the end. So do a cached path whose cache holds 4 series (started again
    every few requests: its windows and head counts go back to the rules' state) and one whose
    rules are reloaded, unchanged, before every request (they carry over)."""
    now = [1_000_000]
    a, b = engine(now), engine(now)
    small, reloaded = engine(now, route_cache_max=4), engine(now)
    for step, items in enumerate(requests):
        ts = 1_000_000 + step * 4000
        now[0] = ts
        data = request(items, ts)
        reloaded.reload(load_rules(RULES))
        cached = prw.govern(a, data)
        each = prw.govern_each(b, data)
        assert series_of(cached, data) == series_of(each, data)
        assert (cached.series, cached.datapoints, cached.removed, cached.in_samples) == (
            each.series,
            each.datapoints,
            each.removed,
            each.in_samples,
        )
        assert (cached.data is None) == (each.data is None)
        for other in (small, reloaded):
            assert series_of(prw.govern(other, data), data) == series_of(cached, data)
        due = a.due()
        assert_same_windows(due, b.due())
        assert_same_windows(small.due(), due)
        assert_same_windows(reloaded.due(), due)
    assert a.stats == b.stats == small.stats
    assert {n: attrs.evolve(st, since=0) for n, st in reloaded.stats.items()} == {
        n: attrs.evolve(st, since=0) for n, st in a.stats.items()
    }
    now[0] = 10_000_000
    due = a.due(force=True)
    assert_same_windows(due, b.due(force=True))
    assert_same_windows(small.due(force=True), due)
    assert_same_windows(reloaded.due(force=True), due)
    assert a.stats == b.stats == small.stats


def assert_same_windows(emitted_a: list[Emitted], emitted_b: list[Emitted]) -> None:
    """The same windows, in any order (the order of a tick's output carries no meaning: the
    cached path keeps most windows as columns by series, per-series evaluation as objects in
    the order their series first came), and the same encoded series. The cached path's
    downsampled series carry their serialized labels for encode to reuse."""

    def plain(emitted: list[Emitted]) -> list[str]:
        return sorted(repr((e.name, sorted(e.labels.items()), e.kind, e.points)) for e in emitted)

    def encoded(emitted: list[Emitted]) -> list[str]:
        req = WriteRequest.FromString(prw.encode(emitted)[0])
        return sorted(str(ts) for ts in req.timeseries)

    assert plain(emitted_a) == plain(emitted_b)
    assert encoded(emitted_a) == encoded(emitted_b)


def test_a_request_whose_series_put_samples_before_labels_is_evaluated_once_per_series() -> None:
    """A series is spliced only if it starts with its labels. When a relabeled series of a
    request does not (protobuf allows any field order), the whole request is evaluated series
    by series instead, and counted once. A series that comes both ways keeps one head count and
    one counter value: the same output, per-rule counts and windows as evaluating each series."""
    now = [1_000_000]
    a, b = engine(now), engine(now)

    def normal(value: float) -> bytes:
        return request(
            [
                ("http_latency", "api", "/u/1", 0, 1.0, 0),
                ("queue_depth", "web", "", 1, 2.0, 0),
                ("cpu_seconds", "db", "", 2, 3.0, 0),
                ("reqs_total", "api", "", 3, value, 0),
            ],
            now[0],
        )

    def reordered(data: bytes) -> bytes:
        """The same series, each with its samples (field 2) before its labels (field 1)."""
        bodies = [
            TimeSeries(samples=ts.samples).SerializeToString()
            + TimeSeries(labels=ts.labels).SerializeToString()
            for ts in WriteRequest.FromString(data).timeseries
        ]
        return b"".join(b"\x0a" + varint(len(body)) + body for body in bodies)

    for data in (normal(10.0), reordered(normal(25.0)), normal(7.0), reordered(normal(9.0))):
        cached, each = prw.govern(a, data), prw.govern_each(b, data)
        assert series_of(cached, data) == series_of(each, data)
        now[0] += 1000
    assert a.stats == b.stats
    assert_same_windows(a.due(force=True), b.due(force=True))
