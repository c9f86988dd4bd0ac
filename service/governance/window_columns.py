"""Windows fed a request at a time: the remote-write route cache's windowed series, folded into
downsample and aggregate windows with array operations instead of a Python step per datapoint.

A rule's columns number the series the route cache sends it (rows, in the order routed) and, for
an aggregate, its groups. Each open window is a set of arrays by row (downsample) or by group
(aggregate), and a request's points for the rule are added with a few NumPy calls. When a window
is due, or the route cache that numbered the rows is dropped, the window is turned into the
state's own window objects (windows.py) and emitted by the same code as every other window, so
what comes out is exactly what adding the points one by one gives.

Only what needs no list of points per window is kept here: downsample avg, min, max, sum, count,
first and last, and aggregates without quantiles. Sans-IO.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from service.governance.series_index import any_of, grown, largest, least, positions
from service.governance.windows import AggregateState, DownsampleState, _Group, _SeriesWindow

__all__ = ["AggregateColumns", "DownsampleColumns", "columns_fit", "rounds"]

_T_MAX = np.iinfo(np.int64).max
_T_MIN = np.iinfo(np.int64).min
_SIMPLE = ("avg", "min", "max", "sum", "count", "first", "last")


def columns_fit(state: Any) -> bool:
    """Whether a rule's windows can be kept as columns."""
    if isinstance(state, DownsampleState):
        return state.cfg.method in _SIMPLE
    if isinstance(state, AggregateState):
        return not state._quantiles
    return False


def rounds(rows: np.ndarray) -> list[np.ndarray]:
    """Positions of `rows` in rounds where no row repeats, each round in arrival order: the
    first time each row appears, then the second time, ... (one round when none repeats)."""
    if rows.size < 2:
        return [np.arange(rows.size)]
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    if not (ordered[1:] == ordered[:-1]).any():
        return [np.arange(rows.size)]
    rank = np.arange(rows.size) - np.searchsorted(ordered, ordered, side="left")
    out = []
    for r in range(int(rank.max()) + 1):
        out.append(np.sort(order[rank == r]))
    return out


class _Acc:
    """One open window's accumulators: an array per field, by row or group, each started at
    its field's neutral value."""

    FIELDS: tuple[tuple[str, Any, float | int], ...] = ()  # name, dtype, initial value
    count: np.ndarray

    def __init__(self, size: int) -> None:
        for name, dtype, fill in self.FIELDS:
            setattr(self, name, np.full(size, fill, dtype=dtype))

    def grow(self, size: int) -> None:
        if size <= self.count.size:  # every field has as many rows as count
            return
        for name, _, fill in self.FIELDS:
            setattr(self, name, grown(getattr(self, name), size, fill))


class _SeriesAcc(_Acc):
    """One downsample window: per row, what windows._SeriesWindow keeps."""

    FIELDS = (
        ("count", np.int64, 0),
        ("total", np.float64, 0.0),
        ("low", np.float64, math.inf),
        ("high", np.float64, -math.inf),
        ("first_t", np.int64, _T_MAX),
        ("first_v", np.float64, 0.0),
        ("last_t", np.int64, _T_MIN),
        ("last_v", np.float64, 0.0),
    )
    total: np.ndarray
    low: np.ndarray
    high: np.ndarray
    first_t: np.ndarray
    first_v: np.ndarray
    last_t: np.ndarray
    last_v: np.ndarray

    def add(self, r: np.ndarray, t: np.ndarray, v: np.ndarray, method: str) -> None:
        """Points of distinct rows, in arrival order, into the fields `method` reads (the
        others keep their neutral values: the window's output never reads them)."""
        self.count[r] += 1
        if method in ("avg", "sum"):
            self.total[r] += v
        elif method == "min":
            self.low[r] = np.minimum(self.low[r], v)
        elif method == "max":
            self.high[r] = np.maximum(self.high[r], v)
        elif method == "first":
            earlier = t < self.first_t[r]  # the first point of a timestamp stays first
            self.first_t[r[earlier]] = t[earlier]
            self.first_v[r[earlier]] = v[earlier]
        elif method == "last":
            later = t >= self.last_t[r]  # the last point of a timestamp wins
            self.last_t[r[later]] = t[later]
            self.last_v[r[later]] = v[later]


class _Columns:
    """What both kinds share: rows for the series routed to the rule, and open windows by
    start."""

    _ACC: type[_Acc]

    def __init__(self, state: Any, meta: Callable[[int], Any], rule: str, number: int) -> None:
        self.state = state
        self.meta = meta  # slot -> the route cache's _Dynamic for the series
        self.rule = rule
        self.number = number  # in the route cache's list of columns
        self.row_of = np.full(1024, -1, dtype=np.int64)  # by slot
        self.slots: list[int] = []  # by row
        self.windows: dict[int, Any] = {}  # window start -> accumulators (an _ACC)

    def register(self, slot: int) -> int:
        """A series the route cache sends to this rule (its slot there); returns `number`."""
        self.row_of = grown(self.row_of, slot + 1, -1)
        if self.row_of[slot] < 0:
            self.row_of[slot] = len(self.slots)
            self.slots.append(slot)
        return self.number

    def retire(self) -> None:
        """Every open window into the state's window objects: the route cache that numbers
        the rows is being dropped."""
        self.materialize(sorted(self.windows))

    def materialize(self, starts: list[int]) -> None:
        raise NotImplementedError

    def _admit(
        self, slots: np.ndarray, ts: np.ndarray, values: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, Any]]]:
        """The points to add, as (rows, ts, values, [(window start, their positions)]), in
        arrival order: NaN values skipped, points of windows already emitted counted as late.
        The usual request, no NaN and one window, takes four NumPy calls."""
        state = self.state
        top = float(largest(values)) if values.size else 0.0
        if top != top:  # a NaN (the largest is NaN when any is): skip the NaN values
            ok = values == values
            slots, ts, values = slots[ok], ts[ok], values[ok]
        if not ts.size:
            return self.row_of[slots], ts, values, []
        interval = state.interval_ms
        low, high = int(least(ts)), int(largest(ts))
        start = low - low % interval
        if high - high % interval == start:  # one window for all
            if self._late(start):
                state.late += int(ts.size)
                return self.row_of[slots[:0]], ts[:0], values[:0], []
            return self.row_of[slots], ts, values, [(start, slice(None))]
        starts = ts - ts % interval
        late = self._late(starts)
        if any_of(late):
            state.late += int(late.sum())
            keep = ~late
            slots, ts, values, starts = slots[keep], ts[keep], values[keep], starts[keep]
        by_window = [(w, positions(starts == w)) for w in np.unique(starts).tolist()]
        return self.row_of[slots], ts, values, by_window

    def _late(self, starts: Any) -> Any:
        """Whether points of these window starts (an array, or one int) are late."""
        raise NotImplementedError

    def add(
        self,
        slots: np.ndarray,
        ts: np.ndarray,
        values: np.ndarray,
        now_ms: int,
        repeats: bool = True,
    ) -> None:
        """One request's points for this rule, by the series' slots (registered); `repeats`:
        whether a series may come more than once."""
        rows, ts, values, by_window = self._admit(slots, ts, values)
        if not by_window:
            return
        increases = self._increases(rows, values, now_ms, repeats)
        size = self._size()
        for start, at in by_window:
            acc = self.windows.get(start)
            if acc is None:
                acc = self.windows[start] = self._ACC(size)
            acc.grow(size)
            inc = increases[at] if increases is not None else None
            self._fold(acc, rows[at], ts[at], values[at], inc, repeats)

    def _increases(
        self, rows: np.ndarray, values: np.ndarray, now_ms: int, repeats: bool
    ) -> np.ndarray | None:
        """Per point, what it adds to a counter's increase (aggregates of counters)."""
        return None

    def _size(self) -> int:
        raise NotImplementedError

    def _fold(
        self,
        acc: Any,
        rows: np.ndarray,
        ts: np.ndarray,
        values: np.ndarray,
        increases: np.ndarray | None,
        repeats: bool,
    ) -> None:
        raise NotImplementedError

    def due_starts(self, now_ms: int, force: bool) -> list[int]:
        state = self.state
        return [
            s
            for s in sorted(self.windows)
            if force or now_ms >= s + state.interval_ms + state.lateness_ms
        ]

    def __len__(self) -> int:
        return sum(int(np.count_nonzero(acc.count)) for acc in self.windows.values())


class DownsampleColumns(_Columns):
    """A downsample rule's open windows as arrays by row."""

    _ACC = _SeriesAcc

    def _late(self, starts: Any) -> Any:
        state = self.state
        return starts + state.interval_ms <= state._flushed_to

    def _size(self) -> int:
        return len(self.slots)

    def _fold(
        self,
        acc: Any,
        rows: np.ndarray,
        ts: np.ndarray,
        values: np.ndarray,
        increases: np.ndarray | None,
        repeats: bool,
    ) -> None:
        method = self.state.cfg.method
        for once in rounds(rows) if repeats else (slice(None),):
            acc.add(rows[once], ts[once], values[once], method)

    def materialize(self, starts: list[int]) -> None:
        """Move these windows into the state's window objects (merging with any there)."""
        state: DownsampleState = self.state
        for start in starts:
            acc = self.windows.pop(start)
            bucket = state._windows.setdefault(start, {})
            for row in np.flatnonzero(acc.count).tolist():
                dyn = self.meta(self.slots[row])
                w = _SeriesWindow(
                    dyn.name,
                    dyn.labels,
                    dyn.kind,
                    dyn.wire,
                    start,
                    int(acc.count[row]),
                    float(acc.total[row]),
                    float(acc.low[row]),
                    float(acc.high[row]),
                    (int(acc.first_t[row]), float(acc.first_v[row])),
                    (int(acc.last_t[row]), float(acc.last_v[row])),
                )
                old = bucket.get(dyn.key)
                bucket[dyn.key] = w if old is None else _merge_series(old, w)


def _merge_series(a: _SeriesWindow, b: _SeriesWindow) -> _SeriesWindow:
    """One series' window from points added one by one (a) and as columns (b)."""
    assert a.first is not None and a.last is not None
    assert b.first is not None and b.last is not None
    a.count += b.count
    a.total += b.total
    a.low = min(a.low, b.low)
    a.high = max(a.high, b.high)
    if b.first[0] < a.first[0]:
        a.first = b.first
    if b.last[0] >= a.last[0]:
        a.last = b.last
    return a


class _GroupAcc(_Acc):
    """One aggregate window: per group, what windows._Group keeps (quantiles aside)."""

    FIELDS = (
        ("count", np.int64, 0),
        ("total", np.float64, 0.0),
        ("squares", np.float64, 0.0),
        ("low", np.float64, math.inf),
        ("high", np.float64, -math.inf),
        ("last_t", np.int64, _T_MIN),
        ("last_v", np.float64, 0.0),
        ("increase", np.float64, 0.0),
    )
    total: np.ndarray
    squares: np.ndarray
    low: np.ndarray
    high: np.ndarray
    last_t: np.ndarray
    last_v: np.ndarray
    increase: np.ndarray


class AggregateColumns(_Columns):
    """An aggregate rule's open windows as arrays by group; per series (row), the last value of
    a counter, for reset detection."""

    _ACC = _GroupAcc

    def __init__(self, state: Any, meta: Callable[[int], Any], rule: str, number: int) -> None:
        super().__init__(state, meta, rule, number)
        self.group_of_row = np.zeros(64, dtype=np.int64)
        self.counter_row = np.zeros(64, dtype=bool)
        self.last_value = np.full(64, math.nan)  # by row: a counter's last value, NaN: none
        self.last_seen = np.zeros(64, dtype=np.int64)
        self._counter_row: dict[Hashable, int] = {}  # a counter series' key -> its row
        self.groups: list[Hashable] = []  # by number: the state's group key
        self._group_no: dict[Hashable, int] = {}
        self._group_meta: list[tuple[str, dict[str, str], bool]] = []
        # The fields the rule's functions read (count always: it marks the groups seen); the
        # others keep their neutral values.
        self._needs = frozenset().union(*(_AGGREGATE_NEEDS[f] for f in state.cfg.functions))

    def register(self, slot: int) -> int:
        known = self.row_of.size > slot and self.row_of[slot] >= 0
        super().register(slot)
        if known:
            return self.number
        row = len(self.slots) - 1
        dyn = self.meta(slot)
        glabels, gkey = dyn.grouped
        no = self._group_no.get(gkey)
        if no is None:
            no = self._group_no[gkey] = len(self.groups)
            self.groups.append(gkey)
            self._group_meta.append((dyn.name, glabels, dyn.counter))
        self.group_of_row = grown(self.group_of_row, row + 1, 0)
        self.counter_row = grown(self.counter_row, row + 1, False)
        self.last_value = grown(self.last_value, row + 1, math.nan)
        self.last_seen = grown(self.last_seen, row + 1, 0)
        self.group_of_row[row] = no
        self.counter_row[row] = dyn.counter
        if dyn.counter:  # carried over from points added one by one, if any
            prev = self.state._last_value.pop(dyn.key, None)
            if prev is not None:
                self.last_value[row], self.last_seen[row] = prev
            self._counter_row[dyn.key] = row
        return self.number

    def swap_last(self, key: Hashable, value: float, now_ms: int) -> tuple[bool, float | None]:
        """For a point added on its own (AggregateState.add_one): whether these columns keep the
        counter's last value, and if so the value before `value` (None: none yet)."""
        row = self._counter_row.get(key)
        if row is None:
            return False, None
        prev = float(self.last_value[row])
        self.last_value[row] = value
        self.last_seen[row] = now_ms
        return True, (prev if prev == prev else None)

    def _late(self, starts: Any) -> Any:
        return starts < self.state._flushed_to

    def _size(self) -> int:
        return len(self.groups)

    def _increases(
        self, rows: np.ndarray, values: np.ndarray, now_ms: int, repeats: bool
    ) -> np.ndarray | None:
        """Counters' increases, in arrival order over the whole request (a late point may come
        before an on-time one of the same series): each against the value before it."""
        counter = self.counter_row[rows]
        if not any_of(counter):
            return None
        at = positions(counter)
        inc = np.zeros(rows.size)
        crows, cv = rows[at], values[at]
        for once in rounds(crows) if repeats else (slice(None),):
            rr, vv = crows[once], cv[once]
            prev = self.last_value[rr]
            # A drop in value is a restart of the source: it counted up from 0 again.
            inc[at[once]] = np.where(prev != prev, 0.0, np.where(vv >= prev, vv - prev, vv))
            self.last_value[rr] = vv
            self.last_seen[rr] = now_ms
        return inc

    def _fold(
        self,
        acc: Any,
        rows: np.ndarray,
        ts: np.ndarray,
        values: np.ndarray,
        increases: np.ndarray | None,
        repeats: bool,
    ) -> None:
        n_groups = len(self.groups)
        g, t, v = self.group_of_row[rows], ts, values
        need = self._needs
        # Sums in arrival order, point by point (ufunc.at), as adding them one by one does:
        # the same floating-point results, not merely close ones.
        if increases is not None and "increase" in need:
            np.add.at(acc.increase, g, increases)
        acc.count[:n_groups] += np.bincount(g, minlength=n_groups)
        if "total" in need:
            np.add.at(acc.total, g, v)
        if "squares" in need:
            np.add.at(acc.squares, g, v * v)
        if "low" in need:
            np.minimum.at(acc.low, g, v)
        if "high" in need:
            np.maximum.at(acc.high, g, v)
        if "last" not in need:
            return
        # Per group its latest point (the last to arrive of the latest timestamp).
        order = np.lexsort((np.arange(t.size), t))
        rank = np.empty(t.size, dtype=np.int64)
        rank[order] = np.arange(t.size)
        best = np.full(n_groups, -1, dtype=np.int64)
        np.maximum.at(best, g, rank)
        has = positions(best >= 0)
        pick = order[best[has]]
        later = t[pick] >= acc.last_t[has]
        acc.last_t[has[later]] = t[pick[later]]
        acc.last_v[has[later]] = v[pick[later]]

    def materialize(self, starts: list[int]) -> None:
        """Move these windows into the state's window objects (merging with any there)."""
        state: AggregateState = self.state
        for start in starts:
            acc = self.windows.pop(start)
            groups = state._windows.setdefault(start, {})
            for no in np.flatnonzero(acc.count).tolist():
                name, glabels, counter = self._group_meta[no]
                g = _Group(
                    name,
                    glabels,
                    None,
                    int(acc.count[no]),
                    float(acc.total[no]),
                    float(acc.squares[no]),
                    float(acc.low[no]),
                    float(acc.high[no]),
                    (int(acc.last_t[no]), float(acc.last_v[no])),
                    [],
                    float(acc.increase[no]),
                    counter,
                )
                gkey = self.groups[no]
                old = groups.get(gkey)
                groups[gkey] = g if old is None else _merge_group(old, g)

    def retire(self) -> None:
        """Every open window into the state's window objects, and the counters' last values
        back to the state (keyed by series), for whatever adds the series' points next."""
        super().retire()
        last = self.state._last_value
        for row in np.flatnonzero(self.counter_row[: len(self.slots)]).tolist():
            value = float(self.last_value[row])
            if value == value:
                last[self.meta(self.slots[row]).key] = (value, int(self.last_seen[row]))

    def prune(self, stale_ms: int) -> None:
        """Forget the last values of counters not seen since `stale_ms`."""
        n = len(self.slots)
        gone = self.last_seen[:n] < stale_ms
        self.last_value[:n][gone] = math.nan


# What each aggregate function reads of a group's window, for gauges and for counters (sum of
# counters: the increase; a gauge function over counters: the raw values).
_AGGREGATE_NEEDS: dict[str, frozenset[str]] = {
    "sum": frozenset({"total", "increase"}),
    "avg": frozenset({"total"}),
    "min": frozenset({"low"}),
    "max": frozenset({"high"}),
    "count": frozenset(),
    "last": frozenset({"last"}),
    "stddev": frozenset({"total", "squares"}),
    "increase": frozenset({"increase"}),
    "rate": frozenset({"increase"}),
}


def _merge_group(a: _Group, b: _Group) -> _Group:
    """One group's window from points added one by one (a) and as columns (b)."""
    assert a.last is not None and b.last is not None
    a.count += b.count
    a.total += b.total
    a.squares += b.squares
    a.low = min(a.low, b.low)
    a.high = max(a.high, b.high)
    if b.last[0] >= a.last[0]:
        a.last = b.last
    a.increase += b.increase
    return a
