"""Windows kept as columns (window_columns): the parts the differential test of the cached path
(test_rules_cached_path.py) does not show on their own."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

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
