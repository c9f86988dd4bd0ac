"""Per-metric statistics: datapoints per metric name (basic), and active series per metric, the
top label values per metric and datapoints and series per label combination (full).

Fed per request by the wire adapters with what they already know (names, series hashes, counts);
no per-datapoint work here. Bounded: at most `max_metrics` names and label combinations (the rest
count under `__other__`) and `max_label_values` values per label of a metric. Sans-IO: callers
pass the time in.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs

from service.config import StatsConfig
from service.governance.cardinality import WindowedTracker, top_k

OTHER = "__other__"


class Frozen:
    """A window's label-value table once the window has ended: read, never added to. Its pairs
    (interned, shared with the other tables) in a tuple and their counts in an array take
    ~1.5 KB for a metric's ~85 values, where the dict took ~3.5-4.5 KB (with thousands of
    metrics the tables were most of the stats' memory)."""

    __slots__ = ("_counts", "_pairs")

    def __init__(self, table: Mapping[tuple[str, str], int]) -> None:
        self._pairs = tuple(table)
        self._counts = array("q", table.values())

    def __len__(self) -> int:
        return len(self._pairs)

    def items(self) -> Iterator[tuple[tuple[str, str], int]]:
        return zip(self._pairs, self._counts, strict=True)


_NO_VALUES = Frozen({})


@attrs.define(eq=False, slots=True)
class Counted:
    """Datapoints and (full) series of one metric name or one label combination."""

    tracker: WindowedTracker | None
    total: int = 0  # datapoints since start
    window: int = 0  # datapoints in the current window
    before: int = 0  # datapoints in the previous window
    # full, metrics only: label -> value -> series first seen with it in the current window
    # One table per window, keyed by (label, value): one dict a metric rather than one a label
    # (most metrics have few series: the tables' own size is what counts).
    values: dict[tuple[str, str], int] | None = None
    values_before: Frozen | None = None  # the previous window's, frozen when it ended
    distinct: dict[str, int] | None = None  # label -> values kept in `values`
    values_dropped: int = 0  # values not kept (past max_label_values)

    def series(self) -> int:
        return self.tracker.count() if self.tracker is not None else 0


class Stats:
    """The stats of one pipeline."""

    def __init__(self, cfg: StatsConfig, *, pipeline: str) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.full = cfg.level == "full"
        self.labels = tuple(cfg.labels)
        self.window_s = cfg.window_s
        self._metrics: dict[str, Counted] = {}
        self._groups: dict[tuple[str, ...], Counted] = {}
        self.index = -1  # the current window: floor(now_s / window_s)
        self._datapoints = 0  # since start, every metric
        # Feeders that hold counts back (see defer): called before anything reads the counts
        # and before the window rolls.
        self._deferred: list[Callable[[], None]] = []

    # ---- reading the tables (what is held back is counted first) ------------------------------

    @property
    def metrics(self) -> dict[str, Counted]:
        self.flush()
        return self._metrics

    @property
    def groups(self) -> dict[tuple[str, ...], Counted]:
        self.flush()
        return self._groups

    @property
    def datapoints(self) -> int:
        self.flush()
        return self._datapoints

    def defer(self, flush: Callable[[], None]) -> None:
        """Let a feeder hold datapoint counts back and add them in bulk (with count_datapoints)
        when `flush` is called: before any read of the tables and before the window rolls."""
        self._deferred.append(flush)

    def flush(self) -> None:
        for flush in self._deferred:
            flush()

    # ---- feeding -----------------------------------------------------------------------------

    def roll(self, now_s: float) -> int:
        """Move to the window `now_s` falls in; returns its index."""
        index = int(now_s // self.window_s)
        if index != self.index:
            self.flush()  # what was held back belongs to the window that ends
            step = index == self.index + 1
            for table in (self._metrics, self._groups):
                # Names and combinations with nothing in either window are forgotten, so
                # max_metrics bounds what is active, not what was ever seen.
                for key in [k for k, c in table.items() if not c.window and not c.before]:
                    c = table[key]
                    if c.tracker is None or not c.tracker.count():
                        del table[key]
            for c in (*self._metrics.values(), *self._groups.values()):
                c.before = c.window if step else 0
                c.window = 0
                if c.tracker is not None:
                    c.tracker.roll(now_s)
                if c.values is not None:
                    c.values_before = Frozen(c.values) if step and c.values else _NO_VALUES
                    c.values = {}
                    c.distinct = {}
            self.index = index
        return index

    def _entry(self, table: dict[Any, Counted], key: Any, now_s: float) -> Counted:
        c = table.get(key)
        if c is None:
            if len(table) >= self.cfg.max_metrics:
                key = OTHER if table is self._metrics else (OTHER,) * len(self.labels)
                c = table.get(key)
                if c is not None:
                    return c
            tracker = None
            if self.full:
                tracker = WindowedTracker(self.window_s, self.cfg.exact_limit)
                tracker.roll(now_s)
            c = table[key] = Counted(tracker, values={} if table is self._metrics else None)
            if c.values is not None and self.full:
                c.values_before = _NO_VALUES
                c.distinct = {}
        return c

    def add_datapoints(self, per_name: Mapping[str, int], now_s: float) -> None:
        """Datapoints per metric name of one request."""
        self.roll(now_s)
        self.count_datapoints(per_name, now_s)

    def count_datapoints(self, per_name: Mapping[str, int], now_s: float) -> None:
        """Datapoints per metric name, counted in the current window without rolling it (for
        counts held back by a feeder, see defer)."""
        metrics = self._metrics
        total = 0
        for name, n in per_name.items():
            c = metrics.get(name) or self._entry(metrics, name, now_s)
            c.total += n
            c.window += n
            total += n
        self._datapoints += total

    def add_group_datapoints(self, per_group: Mapping[tuple[str, ...], int], now_s: float) -> None:
        """Datapoints per label combination (`stats.labels`) of one request."""
        groups = self._groups
        for key, n in per_group.items():
            c = groups.get(key) or self._entry(groups, key, now_s)
            c.total += n
            c.window += n

    def add_series(self, name: str, hashes: list[int], now_s: float) -> None:
        """Series of one metric seen for the first time in this window (full)."""
        c = self._metrics.get(name) or self._entry(self._metrics, name, now_s)
        if c.tracker is not None:
            c.tracker.add_hashes(hashes)

    def add_group_series(self, key: tuple[str, ...], hashes: list[int], now_s: float) -> None:
        c = self._groups.get(key) or self._entry(self._groups, key, now_s)
        if c.tracker is not None:
            c.tracker.add_hashes(hashes)

    def add_label_values(self, name: str, pairs: Mapping[tuple[str, str], int]) -> None:
        """The label pairs of series of `name` seen for the first time in this window, each
        with how many such series have it (full): counts series per label value, for the top
        values per metric."""
        c = self._metrics.get(name)
        if c is None or c.values is None:
            return
        limit = self.cfg.max_label_values
        values = c.values
        distinct = c.distinct
        assert distinct is not None
        for pair, n in pairs.items():
            got = values.get(pair)
            if got is not None:
                values[pair] = got + n
                continue
            label = pair[0]
            kept = distinct.get(label, 0)
            if kept < limit:
                values[pair] = n
                distinct[label] = kept + 1
            else:
                c.values_dropped += n

    # ---- reading -----------------------------------------------------------------------------

    def top_metrics(self, k: int, by: str) -> list[tuple[str, int]]:
        """The `k` metrics with the most series (`by="series"`) or datapoints in the last full
        window and this one (`by="datapoints"`)."""
        self.flush()
        if by == "series":
            counts = {n: c.series() for n, c in self._metrics.items()}
        else:
            counts = {n: c.window + c.before for n, c in self._metrics.items()}
        return [(n, int(v)) for n, v in top_k(counts, k)]

    def top_values(self, name: str, k: int) -> dict[str, tuple[int, list[tuple[str, int]]]]:
        """Per label of a metric: how many distinct values it had (this window and the
        previous one; at most max_label_values are kept) and its `k` values with the most
        series."""
        self.flush()
        c = self._metrics.get(name)
        if c is None or c.values is None:
            return {}
        out = {}
        limit = self.cfg.max_label_values
        per_label: dict[str, dict[str, int]] = {}
        for (label, v), n in c.values.items():
            per_label.setdefault(label, {})[v] = n
        for (label, v), n in (c.values_before or _NO_VALUES).items():
            merged = per_label.setdefault(label, {})
            if v in merged:
                merged[v] = max(merged[v], n)
            elif len(merged) < limit:  # the cap holds for both windows together
                merged[v] = n
        out = {}
        for label in sorted(per_label):
            merged = per_label[label]
            out[label] = (len(merged), [(v, int(n)) for v, n in top_k(merged, k)])
        return out

    def memory_bytes(self) -> int:
        """The trackers' bytes (the rest is a few hundred bytes per name)."""
        self.flush()
        return sum(
            c.tracker.memory_bytes()
            for c in (*self._metrics.values(), *self._groups.values())
            if c.tracker is not None
        )

    def report(self, top: int) -> dict[str, Any]:
        """The /api/v1/cardinality answer for this pipeline."""
        self.flush()
        names = {n for n, _ in self.top_metrics(top, "series")} if self.full else set()
        names |= {n for n, _ in self.top_metrics(top, "datapoints")}
        rows = []
        for name in names:
            c = self._metrics[name]
            row: dict[str, Any] = {
                "name": name,
                "datapoints_window": c.window + c.before,
                "datapoints_total": c.total,
            }
            if self.full:
                row["series"] = c.series()
                row["labels"] = [
                    {
                        "label": label,
                        "distinct_values": distinct,
                        "top_values": [{"value": v, "series": n} for v, n in vals],
                    }
                    for label, (distinct, vals) in self.top_values(name, top).items()
                ]
            rows.append(row)
        key = "series" if self.full else "datapoints_window"
        rows.sort(key=lambda r: (-r[key], r["name"]))
        out: dict[str, Any] = {
            "level": self.cfg.level,
            "window_s": self.window_s,
            "metrics_tracked": len(self._metrics),
            "datapoints_total": self._datapoints,
            "metrics": rows[:top],
        }
        if self.full:
            out["series_total"] = sum(c.series() for c in self._metrics.values())
            out["tracker_bytes"] = self.memory_bytes()
            if self.labels:
                counts = {"\x00".join(k): c.series() for k, c in self._groups.items()}
                by_text = {"\x00".join(k): (k, c) for k, c in self._groups.items()}
                out["groups"] = [
                    {
                        "labels": dict(zip(self.labels, by_text[text][0], strict=False)),
                        "series": n,
                        "datapoints_window": by_text[text][1].window + by_text[text][1].before,
                    }
                    for text, n in top_k(counts, top)
                ]
        return out
