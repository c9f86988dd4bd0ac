"""The remote-write adapter's cached path (routes per distinct series) gives exactly what
evaluating each series gives: the same output series, the same per-rule counts, the same windows."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from service._proto.prometheus.remote_pb2 import WriteRequest
from service.governance import prw
from service.governance.engine import RuleEngine
from service.governance.rules import load_rules

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
    "plain",
]

series = st.tuples(
    st.sampled_from(NAMES),
    st.sampled_from(["api", "web", "db"]),
    st.sampled_from(["/u/1", "/u/22", "/x", ""]),
    st.integers(0, 3),
    st.floats(-1e6, 1e6, allow_nan=False),
)


def request(items: list[tuple[str, str, str, int, float]], ts: int) -> bytes:
    req = WriteRequest()
    for name, job, path, pod, value in items:
        t = req.timeseries.add()
        labels = {"__name__": name, "job": job, "pod": str(pod)}
        if path:
            labels["path"] = path
        for k, v in sorted(labels.items()):
            t.labels.add(name=k, value=v)
        t.samples.add(value=value, timestamp=ts)
    return req.SerializeToString()


def engine(now: list[int]) -> RuleEngine:
    rng = random.Random(7)
    return RuleEngine(load_rules(RULES), pipeline="prw", clock_ms=lambda: now[0], rand=rng.random)


def series_of(governed: prw.Governed, data: bytes) -> list[str]:
    """The forwarded series, sorted: a WriteRequest's series order carries no meaning, and the
    cached path puts the series it keeps as they are first."""
    req = WriteRequest.FromString(governed.data if governed.data is not None else data)
    return sorted(str(ts) for ts in req.timeseries)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(series, min_size=1, max_size=30), min_size=1, max_size=6))
def test_cached_path_matches_per_series_evaluation(
    requests: list[list[tuple[str, str, str, int, float]]],
) -> None:
    """For any stream of single-sample requests, the cached path and per-series evaluation
    forward the same series, count the same per rule, report the same counts, and emit the same
    windows."""
    now_a, now_b = [1_000_000], [1_000_000]
    a, b = engine(now_a), engine(now_b)
    for step, items in enumerate(requests):
        ts = 1_000_000 + step * 4000
        now_a[0] = now_b[0] = ts
        data = request(items, ts)
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
    assert a.stats == b.stats
    now_a[0] = now_b[0] = 10_000_000
    emitted_a, emitted_b = a.due(force=True), b.due(force=True)
    # The cached path's windows carry the series' serialized labels for encode to reuse.
    assert [(e.name, e.labels, e.kind, e.points) for e in emitted_a] == [
        (e.name, e.labels, e.kind, e.points) for e in emitted_b
    ]
    assert WriteRequest.FromString(prw.encode(emitted_a)[0]) == WriteRequest.FromString(
        prw.encode(emitted_b)[0]
    )
