"""Windows kept as columns (window_columns): the parts the differential test of the cached path
(test_rules_cached_path.py) does not show on their own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service._proto.prometheus.remote_pb2 import WriteRequest
from service.governance import prw
from service.governance.engine import RuleEngine
from service.governance.rules import load_rules
from service.governance.window_columns import columns_fit, rounds


@given(st.lists(st.integers(0, 6), max_size=40))
def test_rounds_split_a_batch_so_that_no_row_repeats_within_a_round(rows: list[int]) -> None:
    """Every position is in exactly one round; no row repeats within a round; a row's k-th
    point is in round k; each round is in arrival order."""
    got = rounds(np.array(rows, dtype=np.int64))
    positions = np.concatenate(got) if got else np.array([], dtype=np.int64)
    assert sorted(positions.tolist()) == list(range(len(rows)))
    for k, r in enumerate(got):
        assert r.tolist() == sorted(r.tolist())
        assert len({rows[i] for i in r.tolist()}) == r.size
        for i in r.tolist():
            assert rows[: i + 1].count(rows[i]) == k + 1


RULES = """
rules:
  - {name: avg, match: {name: a}, action: downsample, downsample: {interval: 1m, method: avg}}
  - {name: min, match: {name: b}, action: downsample, downsample: {interval: 1m, method: min}}
  - {name: max, match: {name: c}, action: downsample, downsample: {interval: 1m, method: max}}
  - {name: sum, match: {name: d}, action: downsample, downsample: {interval: 1m, method: sum}}
  - {name: count, match: {name: e}, action: downsample, downsample: {interval: 1m, method: count}}
  - {name: first, match: {name: f}, action: downsample, downsample: {interval: 1m, method: first}}
  - {name: last, match: {name: g}, action: downsample, downsample: {interval: 1m, method: last}}
  - name: lttb
    match: {name: h}
    action: downsample
    downsample: {interval: 1m, method: lttb, points: 5}
  - name: door
    match: {name: i}
    action: downsample
    downsample: {interval: 1m, method: swinging_door, deviation: 1}
  - name: by-job
    match: {name: j}
    action: aggregate
    aggregate: {interval: 1m, by: [job], functions: [sum, max, stddev, last]}
  - name: quantiles
    match: {name: k}
    action: aggregate
    aggregate: {interval: 1m, by: [job], functions: [sum, "quantile(0.9)"]}
"""


def test_only_windows_that_need_no_list_of_points_are_kept_as_columns() -> None:
    """Downsample avg, min, max, sum, count, first and last, and aggregates without quantiles,
    are kept as columns; LTTB, swinging door and quantiles keep their points as objects."""
    engine = RuleEngine(load_rules(RULES), pipeline="prw")
    fit = {r.name: columns_fit(engine.state_of(r.name)) for r in engine.rules}
    assert [name for name, yes in fit.items() if not yes] == ["lttb", "door", "quantiles"]


def _request(points: list[tuple[str, str, float]], ts: int) -> bytes:
    req = WriteRequest()
    for name, pod, value in points:
        t = req.timeseries.add()
        for k, v in sorted({"__name__": name, "job": "api", "pod": pod}.items()):
            t.labels.add(name=k, value=v)
        t.samples.add(value=value, timestamp=ts)
    return req.SerializeToString()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        # downsample per series (pod a: 5, 7, 2; pod b: 1, 1, 4)
        ("downsample: {interval: 1m, method: avg}", {"a": 14 / 3, "b": 2.0}),
        ("downsample: {interval: 1m, method: min}", {"a": 2.0, "b": 1.0}),
        ("downsample: {interval: 1m, method: max}", {"a": 7.0, "b": 4.0}),
        ("downsample: {interval: 1m, method: sum}", {"a": 14.0, "b": 6.0}),
        ("downsample: {interval: 1m, method: count}", {"a": 3.0, "b": 3.0}),
        ("downsample: {interval: 1m, method: first}", {"a": 5.0, "b": 1.0}),
        ("downsample: {interval: 1m, method: last}", {"a": 2.0, "b": 4.0}),
        # aggregate by job, the series as counters: a restarts (7 -> 2), b is flat then rises.
        # Increase: a 2 + 2 (from 0 after the restart), b 0 + 3.
        (
            "aggregate: {interval: 1m, by: [job], functions: [sum], input_kind: counter}",
            {"api": 7.0},
        ),
        (
            "aggregate: {interval: 1m, by: [job], functions: [increase], input_kind: counter}",
            {"api": 7.0},
        ),
        (
            "aggregate: {interval: 1m, by: [job], functions: [count], input_kind: counter}",
            {"api": 6.0},
        ),
        (
            "aggregate: {interval: 1m, by: [job], functions: [sum], input_kind: gauge}",
            {"api": 20.0},
        ),
        ("aggregate: {interval: 1m, by: [job], functions: [max], input_kind: gauge}", {"api": 7.0}),
        ("aggregate: {interval: 1m, by: [job], functions: [min], input_kind: gauge}", {"api": 1.0}),
        (
            "aggregate: {interval: 1m, by: [job], functions: [last], input_kind: gauge}",
            {"api": 4.0},
        ),
        (
            "aggregate: {interval: 1m, by: [job], functions: [avg], input_kind: gauge}",
            {"api": 20 / 6},
        ),
    ],
)
def test_each_function_kept_as_columns_gives_its_exact_value(
    setting: str, expected: dict[str, float]
) -> None:
    """Columns keep only the fields a rule's method or functions read: each one alone, over
    three requests of two series in one window, emits exactly its value, as per-series
    evaluation does."""
    action = setting.split(":", 1)[0]
    rules = f"rules:\n  - {{name: r, match: {{name: x_total}}, action: {action}, {setting}}}\n"
    now = [0]
    cached = RuleEngine(load_rules(rules), pipeline="prw", clock_ms=lambda: now[0])
    each = RuleEngine(load_rules(rules), pipeline="prw", clock_ms=lambda: now[0])
    assert columns_fit(cached.state_of("r"))
    for i, (a, b) in enumerate([(5.0, 1.0), (7.0, 1.0), (2.0, 4.0)]):
        now[0] = 60_000 + i * 10_000
        data = _request([("x_total", "a", a), ("x_total", "b", b)], now[0])
        prw.govern(cached, data)
        prw.govern_each(each, data)
    now[0] = 10 * 60_000
    got = cached.due(force=True)
    key = "pod" if action == "downsample" else "job"
    assert {e.labels[key]: e.points[0][1] for e in got} == pytest.approx(expected, rel=1e-12)
    assert sorted((e.name, sorted(e.labels.items()), e.points) for e in got) == sorted(
        (e.name, sorted(e.labels.items()), e.points) for e in each.due(force=True)
    )
