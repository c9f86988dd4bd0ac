"""Windowed state of downsample and aggregate rules: what each window has seen, and what it emits.

Pure: no I/O and no clock of its own; the engine says what time it is (milliseconds since the epoch)
and when to flush. A window is [start, start + interval), aligned to the interval, chosen by the
datapoint's own timestamp; it is emitted `lateness_ms` after it ends, stamped with its end.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import Any

import attrs

from service.governance.rules import Aggregate, Downsample


@attrs.define
class Emitted:
    """One output series of a window: name, labels, kind (gauge | counter), points (ts_ms, value);
    `origin` is where it came from in its pipeline (OTLP: resource, scope, metric metadata)."""

    name: str
    labels: dict[str, str]
    kind: str
    points: list[tuple[int, float]]
    origin: Any = None


# ---- shape-keeping selections ----------------------------------------------------------------


def lttb(points: list[tuple[int, float]], n: int) -> list[tuple[int, float]]:
    """Largest-Triangle-Three-Buckets: `n` points (first and last always) that keep the shape."""
    if len(points) <= n or n < 3:
        return list(points) if len(points) <= n else [points[0], points[-1]]
    out = [points[0]]
    every = (len(points) - 2) / (n - 2)
    a = 0
    for i in range(n - 2):
        start = int(i * every) + 1
        end = int((i + 1) * every) + 1
        nxt_start, nxt_end = end, min(int((i + 2) * every) + 1, len(points))
        if nxt_start >= nxt_end:  # the last bucket: average over the final point
            avg_t, avg_v = points[-1]
        else:
            span = points[nxt_start:nxt_end]
            avg_t = sum(p[0] for p in span) / len(span)
            avg_v = sum(p[1] for p in span) / len(span)
        at, av = points[a]
        best, best_area = start, -1.0
        for j in range(start, end):
            t, v = points[j]
            area = abs((at - avg_t) * (v - av) - (at - t) * (avg_v - av))
            if area > best_area:
                best, best_area = j, area
        out.append(points[best])
        a = best
    out.append(points[-1])
    return out


def swinging_door(points: list[tuple[int, float]], deviation: float) -> list[tuple[int, float]]:
    """Swinging-door compression: drop points within `deviation` of the line between kept ones;
    the first and the last point are always kept."""
    if len(points) <= 2:
        return list(points)
    out = [points[0]]
    anchor = points[0]
    upper, lower = math.inf, -math.inf
    prev = points[0]
    for p in points[1:]:
        dt = p[0] - anchor[0]
        if dt <= 0:
            prev = p
            continue
        upper = min(upper, (p[1] + deviation - anchor[1]) / dt)
        lower = max(lower, (p[1] - deviation - anchor[1]) / dt)
        if lower > upper:  # the door closed: keep the previous point and start again from it
            out.append(prev)
            anchor = prev
            dt = p[0] - anchor[0]
            upper = (p[1] + deviation - anchor[1]) / dt if dt > 0 else math.inf
            lower = (p[1] - deviation - anchor[1]) / dt if dt > 0 else -math.inf
        prev = p
    if out[-1] is not points[-1]:
        out.append(points[-1])
    return out


# ---- downsample ---------------------------------------------------------------------------


@attrs.define
class _SeriesWindow:
    name: str
    labels: dict[str, str]
    kind: str
    origin: Any
    start: int
    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    first: tuple[int, float] | None = None
    last: tuple[int, float] | None = None
    points: list[tuple[int, float]] = attrs.field(factory=list)


class DownsampleState:
    """The open windows of one downsample rule, grouped by window start (every series shares the
    rule's boundaries), so a tick looks only at windows that may be due."""

    def __init__(self, cfg: Downsample, lateness_ms: int) -> None:
        self.cfg = cfg
        self.interval_ms = max(1, int(cfg.interval_s * 1000))
        self.lateness_ms = lateness_ms
        self._windows: dict[int, dict[Hashable, _SeriesWindow]] = {}
        self._flushed_to = -1  # end of the last window emitted
        self.late = 0
        # Windows fed a request at a time (window_columns.DownsampleColumns), if any.
        self.columns: Any = None

    def __len__(self) -> int:
        cols = len(self.columns) if self.columns is not None else 0
        return sum(len(b) for b in self._windows.values()) + cols

    def add(
        self,
        key: Hashable,
        name: str,
        labels: dict[str, str],
        kind: str,
        origin: Any,
        points: Iterable[tuple[int, float]],
        now_ms: int,
    ) -> None:
        """Absorb `points` of one series. A series' state lives only in its open windows: it is
        gone once they are emitted (by `due`)."""
        for ts, value in points:
            self.add_one(key, name, labels, kind, origin, ts, value)

    def add_one(
        self,
        key: Hashable,
        name: str,
        labels: dict[str, str],
        kind: str,
        origin: Any,
        ts: int,
        value: float,
    ) -> None:
        """`add` for a single point, without building a list (the cached remote-write path)."""
        if value != value:
            return
        interval = self.interval_ms
        start = ts - ts % interval
        if start + interval <= self._flushed_to:
            self.late += 1
            return
        bucket = self._windows.get(start)
        if bucket is None:
            bucket = self._windows[start] = {}
        w = bucket.get(key)
        if w is None:
            w = bucket[key] = _SeriesWindow(name, labels, kind, origin, start)
        w.count += 1
        w.total += value
        if value < w.low:
            w.low = value
        if value > w.high:
            w.high = value
        if w.first is None or ts < w.first[0]:
            w.first = (ts, value)
        if w.last is None or ts >= w.last[0]:
            w.last = (ts, value)
        if self.cfg.method in ("lttb", "swinging_door"):
            w.points.append((ts, value))

    def due(self, now_ms: int, *, force: bool = False) -> list[Emitted]:
        """Emit every window that ended `lateness_ms` ago (all of them with `force`)."""
        if self.columns is not None:
            self.columns.materialize(self.columns.due_starts(now_ms, force))
        out: list[Emitted] = []
        for start in sorted(self._windows):
            end = start + self.interval_ms
            if not force and now_ms < end + self.lateness_ms:
                break
            bucket = self._windows.pop(start)
            self._flushed_to = max(self._flushed_to, end)
            for w in bucket.values():
                out += self._emit(w)
        return out

    def _emit(self, w: _SeriesWindow) -> list[Emitted]:
        end = w.start + self.interval_ms
        m = self.cfg.method
        if m == "lttb":
            pts = lttb(sorted(w.points), self.cfg.points)
        elif m == "swinging_door":
            pts = swinging_door(sorted(w.points), self.cfg.deviation)
        else:
            assert w.first is not None and w.last is not None
            value = {
                "avg": w.total / w.count,
                "min": w.low,
                "max": w.high,
                "sum": w.total,
                "count": float(w.count),
                "first": w.first[1],
                "last": w.last[1],
            }[m]
            pts = [(end, value)]
        return [Emitted(w.name, w.labels, w.kind, pts, w.origin)]


class _HashOnce:
    """A hashable value whose hash is computed once."""

    __slots__ = ("_hash", "parts")

    def __init__(self, parts: Hashable) -> None:
        self.parts = parts
        self._hash = hash(parts)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _HashOnce) and self.parts == other.parts)


# Series whose group (kept labels) an aggregate remembers; past it the memory starts again.
_GROUP_CACHE_MAX = 200_000

# ---- aggregate ----------------------------------------------------------------------------


@attrs.define
class _Group:
    name: str  # the input metric name
    labels: dict[str, str]
    origin: Any
    count: int = 0
    total: float = 0.0
    squares: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    last: tuple[int, float] | None = None
    values: list[float] = attrs.field(factory=list)
    increase: float = 0.0
    counter: bool = False  # its inputs are counters: aggregated by their increases


class AggregateState:
    """Per output group, the open window of one aggregate rule; per input counter series, its
    last value (for reset detection) and per group the running total of a counter `sum`."""

    def __init__(self, cfg: Aggregate, lateness_ms: int) -> None:
        self.cfg = cfg
        self.interval_ms = max(1, int(cfg.interval_s * 1000))
        self.lateness_ms = lateness_ms
        self._windows: dict[int, dict[Hashable, _Group]] = {}  # window start -> groups
        self._flushed_to = -1
        self._last_value: dict[Hashable, tuple[float, int]] = {}  # counter series -> (v, seen)
        # group -> (running total of a counter `sum`, when last updated)
        self._totals: dict[Hashable, tuple[float, int]] = {}
        self._groups: dict[Hashable, tuple[dict[str, str], Hashable]] = {}  # series -> group
        self._next_prune = 0  # when stale counter series are next forgotten
        self._gkeys: dict[Hashable, _HashOnce] = {}
        self._quantiles = tuple(
            float(f[len("quantile(") : -1]) for f in cfg.functions if f.startswith("quantile(")
        )
        self.late = 0
        # Windows fed a request at a time (window_columns.AggregateColumns), if any.
        self.columns: Any = None

    def __len__(self) -> int:
        cols = len(self.columns) if self.columns is not None else 0
        return sum(len(g) for g in self._windows.values()) + cols

    def group_labels(self, labels: dict[str, str]) -> dict[str, str]:
        if self.cfg.by is not None:
            return {k: labels[k] for k in self.cfg.by if k in labels}
        drop = self.cfg.without or ()
        return {k: v for k, v in labels.items() if k not in drop}

    def add(
        self,
        series_key: Hashable,
        name: str,
        labels: dict[str, str],
        counter: bool,
        origin: Any,
        points: Iterable[tuple[int, float]],
        now_ms: int,
    ) -> None:
        grouped = self._groups.get(series_key) if origin is None else None
        if grouped is None:
            grouped = self.group_of(name, labels, origin)
            if origin is None:
                if len(self._groups) >= _GROUP_CACHE_MAX:
                    self._groups.clear()
                self._groups[series_key] = grouped
        for ts, value in points:
            self.add_one(series_key, name, grouped, counter, ts, value, now_ms, origin)

    def group_of(
        self, name: str, labels: dict[str, str], origin: Any = None
    ) -> tuple[dict[str, str], Hashable]:
        """A series' group: the labels it keeps, and a key that hashes once (looked up per
        datapoint)."""
        glabels = self.group_labels(labels)
        parts = (name, tuple(sorted(glabels.items())), _origin_key(origin))
        # One key object per group, so the lookups per datapoint compare by identity.
        gkey = self._gkeys.get(parts)
        if gkey is None:
            if len(self._gkeys) >= _GROUP_CACHE_MAX:
                self._gkeys.clear()
            gkey = self._gkeys[parts] = _HashOnce(parts)
        return glabels, gkey

    def add_one(
        self,
        series_key: Hashable,
        name: str,
        grouped: tuple[dict[str, str], Hashable],
        counter: bool,
        ts: int,
        value: float,
        now_ms: int,
        origin: Any = None,
    ) -> None:
        """One point of a series whose group is known (`group_of`). A group fed from several
        OTLP resources keeps the resource attributes they share."""
        if value != value:
            return
        start = ts - ts % self.interval_ms
        if start < self._flushed_to:
            self.late += 1
            return
        glabels, gkey = grouped
        groups = self._windows.get(start)
        if groups is None:
            groups = self._windows[start] = {}
        g = groups.get(gkey)
        if g is None:
            g = groups[gkey] = _Group(name, glabels, origin, counter=counter)
        elif origin is not None and g.origin is not None and origin != g.origin:
            g.origin = _common_origin(g.origin, origin)
        if counter:
            # The remote-write route cache's columns keep the last values of the series they hold.
            held, before = (
                self.columns.swap_last(series_key, value, now_ms)
                if self.columns is not None
                else (False, None)
            )
            if not held:
                prev = self._last_value.get(series_key)
                before = None if prev is None else prev[0]
                self._last_value[series_key] = (value, now_ms)
            if before is not None:
                # A drop in value is a restart of the source: it counted up from 0 again.
                g.increase += value - before if value >= before else value
        g.count += 1
        g.total += value
        g.squares += value * value
        if value < g.low:
            g.low = value
        if value > g.high:
            g.high = value
        if g.last is None or ts >= g.last[0]:
            g.last = (ts, value)
        if self._quantiles:
            g.values.append(value)

    def due(self, now_ms: int, *, force: bool = False) -> list[Emitted]:
        """Emit every window that ended `lateness_ms` ago (all with `force`); forget counter
        series and running totals not seen for `staleness`."""
        if self.columns is not None:
            self.columns.materialize(self.columns.due_starts(now_ms, force))
        out: list[Emitted] = []
        for start in sorted(self._windows):
            end = start + self.interval_ms
            if not force and now_ms < end + self.lateness_ms:
                break
            groups = self._windows.pop(start)
            self._flushed_to = end
            for gkey, g in groups.items():
                out += self._emit(gkey, g, end, now_ms)
        # Forgetting is a walk over every counter series: at most a few times per staleness
        # period, not on every tick (it was 8 % of governor's CPU with 45k counter series).
        staleness_ms = int(self.cfg.staleness_s * 1000)
        if now_ms >= self._next_prune:
            self._next_prune = now_ms + max(self.interval_ms, staleness_ms // 4)
            stale = now_ms - staleness_ms
            for key, (_, seen) in list(self._last_value.items()):
                if seen < stale:
                    del self._last_value[key]
            for key, (_, seen) in list(self._totals.items()):
                if seen < stale:
                    del self._totals[key]
            if self.columns is not None:
                self.columns.prune(stale)
        return out

    def _emit(self, gkey: Hashable, g: _Group, end: int, now_ms: int) -> list[Emitted]:
        cfg = self.cfg
        counter = g.counter
        out = []
        many = len(cfg.functions) > 1
        base = cfg.output_name.render(g.labels, g.name)
        for f in cfg.functions:
            if f.startswith("quantile("):
                continue
            if counter:
                if f == "sum":
                    total = self._totals.get(gkey, (0.0, 0))[0] + g.increase
                    self._totals[gkey] = (total, now_ms)
                    value = total
                elif f == "increase":
                    value = g.increase
                elif f == "rate":
                    value = g.increase / cfg.interval_s
                elif f == "count":
                    value = float(g.count)
                else:  # a gauge function over a counter: the raw values
                    value = _gauge_value(f, g)
            else:
                value = _gauge_value(f, g)
            name = f"{base}_{f}" if many else base
            kind = "counter" if cfg.output_kind == "counter" else "gauge"
            out.append(Emitted(name, dict(g.labels), kind, [(end, value)], g.origin))
        if self._quantiles and g.values:
            values = sorted(g.values)
            name = f"{base}_quantile" if many else base
            for q in self._quantiles:
                labels = {**g.labels, "quantile": _format_q(q)}
                out.append(Emitted(name, labels, "gauge", [(end, _quantile(values, q))], g.origin))
        return out


def _gauge_value(f: str, g: _Group) -> float:
    if f == "sum":
        return g.total
    if f == "avg":
        return g.total / g.count
    if f == "min":
        return g.low
    if f == "max":
        return g.high
    if f == "count":
        return float(g.count)
    if f == "last":
        assert g.last is not None
        return g.last[1]
    if f == "stddev":
        mean = g.total / g.count
        return math.sqrt(max(0.0, g.squares / g.count - mean * mean))
    raise ValueError(f"unknown function {f!r}")  # rules.py validated the names


def _quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile with linear interpolation between closest ranks (as numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _format_q(q: float) -> str:
    return f"{q:g}"


def _origin_key(origin: Any) -> Hashable:
    """Groups are per pipeline-specific origin only where the pipeline says so (OTLP keeps the
    scope and metric metadata apart; resources are merged to what all inputs share)."""
    if origin is None:
        return None
    return origin.group_key


def _common_origin(a: Any, b: Any) -> Any:
    return a.common(b)
