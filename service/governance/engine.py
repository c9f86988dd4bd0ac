"""The rule engine: runs the rules of a RuleSet over series, the same way for both pipelines.

A pipeline adapter (service/governance/prw.py, otlp.py) shows each series to `evaluate()` as a
metric name, a lazily built label mapping, an optional resource mapping, a kind and its points; the
engine answers what becomes of it. Rules run in order; transform and classify change labels and
continue; sample, downsample, aggregate and drop are terminal (the first that matches decides). The
decision which rules can apply to a metric name is cached per name, so a series that no rule's name
pattern matches costs one dict lookup. Windows (downsample, aggregate) are flushed by `due()`,
which the pipeline's governance task (service/governance/stage.py) calls on each tick.
"""

from __future__ import annotations

import hashlib
import logging
import random
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from service.governance.rules import (
    Aggregate,
    Classify,
    Downsample,
    Op,
    Rule,
    RuleSet,
    Sample,
    all_match,
)
from service.governance.windows import AggregateState, DownsampleState, Emitted
from service.telemetry import logs

log = logs.get("governance")

NUMERIC = frozenset({"gauge", "counter"})
# A window is emitted this long after it ends, for points that arrive a little late.
LATENESS_MS = 2000
_NAME_CACHE_MAX = 100_000


@attrs.define
class Verdict:
    """What becomes of one series: `keep` None means all its points go on, otherwise one flag per
    point; `name`/`labels` are set when a rule changed them."""

    keep: list[bool] | None = None
    drop_all: bool = False
    name: str | None = None
    labels: dict[str, str] | None = None
    absorbed: bool = False  # its points went into a window (and are not forwarded)


PASS = Verdict()


@attrs.frozen(eq=False, slots=True)
class Route:
    """A series' way through the rules (see RuleEngine.route); compared by identity."""

    transforms: tuple[str, ...]  # transform and classify rules that matched, in order
    terminal: Rule | None
    name: str  # the name after the transforms
    labels: dict[str, str] | None  # the labels after the transforms; None: unchanged
    key: SeriesKey | None  # the series' identity after the transforms (hash, head, windows)
    hash_keep: bool  # a hash sample's decision
    kind: str


PASS_ROUTE = Route((), None, "", None, None, True, "")


@attrs.define
class RuleStats:
    """Counts of one rule, kept across reloads by rule name."""

    input: int = 0
    output: int = 0
    dropped: int = 0
    skipped: int = 0  # datapoints of kinds the rule does not handle (passed on unchanged)
    last_match: float | None = None  # clock seconds
    dead: bool = False
    # Clock seconds when the rule was loaded (dead_after counts from here); not part of equality.
    since: float = attrs.field(default=0.0, eq=False)


class RuleEngine:
    """Rules of one pipeline, their state and their counts."""

    def __init__(
        self,
        ruleset: RuleSet,
        *,
        pipeline: str,
        clock_ms: Callable[[], int] | None = None,
        rand: Callable[[], float] = random.random,
        route_cache_max: int = 200_000,
    ) -> None:
        """`clock_ms`: milliseconds since the epoch (tests pass a virtual clock);
        `route_cache_max`: distinct series whose route is remembered (remote write)."""
        self.pipeline = pipeline
        self.route_cache_max = route_cache_max
        self.clock_ms = clock_ms or wall_clock_ms
        self.rand = rand
        self.stats: dict[str, RuleStats] = {}
        self._states: dict[str, Any] = {}
        self._heads: dict[str, dict[Any, int]] = {}
        self._apply(ruleset)

    # ---- rules -------------------------------------------------------------------------------

    def _apply(self, ruleset: RuleSet) -> None:
        old = getattr(self, "ruleset", None)
        old_rules = old.by_name() if old else {}
        if getattr(self, "route_cache", None) is not None:
            self.route_cache.retire()  # its windows go back to the states first
        self.ruleset = ruleset
        self.rules = ruleset.rules
        self._plans: dict[str, tuple[int, ...]] = {}
        # Per distinct series (a hash of its serialized labels), its route: the remote-write
        # adapter's (prw.RouteTable), emptied when the rules change and when it reaches
        # route_cache_max.
        self.route_cache: Any = None
        self.route_paths: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        states: dict[str, Any] = {}
        heads: dict[str, dict[Any, int]] = {}
        for rule in self.rules:
            same = old_rules.get(rule.name) == rule
            if rule.name not in self.stats:
                self.stats[rule.name] = RuleStats(since=self.clock_ms() / 1000)
            if isinstance(rule.settings, Downsample):
                states[rule.name] = (
                    self._states[rule.name]
                    if same and rule.name in self._states
                    else DownsampleState(rule.settings, LATENESS_MS)
                )
            elif isinstance(rule.settings, Aggregate):
                states[rule.name] = (
                    self._states[rule.name]
                    if same and rule.name in self._states
                    else AggregateState(rule.settings, LATENESS_MS)
                )
            elif isinstance(rule.settings, Sample) and rule.settings.method == "head":
                heads[rule.name] = self._heads.get(rule.name, {}) if same else {}
        self._orphans = getattr(self, "_orphans", []) + [
            s for n, s in self._states.items() if states.get(n) is not s
        ]
        self._states, self._heads = states, heads
        for name in list(self.stats):
            if name not in {r.name for r in self.rules}:
                del self.stats[name]

    def reload(self, ruleset: RuleSet) -> None:
        """Replace the rules. State (windows, head counters) of a rule that exists with the same
        name and the same settings carries over; windows of removed or changed rules are
        emitted at the next flush."""
        self._apply(ruleset)

    def state_of(self, rule_name: str) -> Any:
        """The window state (DownsampleState or AggregateState) of a windowed rule."""
        return self._states[rule_name]

    def head_counts(self, rule_name: str) -> dict[Any, int]:
        """Per series, where a head-sampling rule is in its count."""
        return self._heads[rule_name]

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def plan(self, name: str) -> tuple[int, ...]:
        """Indexes of the rules whose name pattern matches `name` (cached)."""
        p = self._plans.get(name)
        if p is None:
            p = tuple(i for i, r in enumerate(self.rules) if r.match.name.fullmatch(name))
            if len(self._plans) >= _NAME_CACHE_MAX:
                self._plans.clear()  # bounded: a flood of generated names cannot grow it
            self._plans[name] = p
        return p

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(
        self,
        name: str,
        plan: tuple[int, ...],
        labels_of: Callable[[], dict[str, str]],
        resource: Mapping[str, str] | None,
        kind: str,
        n: int,
        points_of: Callable[[], list[tuple[int, float]]] | None = None,
        origin: Any = None,
    ) -> Verdict:
        """Run the rules of `plan` (from `plan(name)`, non-empty) over one series of `n` points.

        `labels_of()` builds the series' labels (called at most once, only when a rule needs
        them); `points_of()` gives the (ts_ms, value) points of a numeric series (kind gauge or
        counter; None for other kinds), called only by downsample and aggregate."""
        labels: dict[str, str] | None = None
        changed = False
        new_name = name
        rules = self.rules
        i = 0
        now_s = 0.0
        while i < len(plan):
            rule = rules[plan[i]]
            m = rule.match
            if m.labels:
                if labels is None:
                    labels = labels_of()
                if not all_match(m.labels, labels):
                    i += 1
                    continue
            if m.resource and (resource is None or not all_match(m.resource, resource)):
                i += 1
                continue
            st = self.stats[rule.name]
            if not now_s:
                now_s = self.clock_ms() / 1000
            before = st.last_match
            st.last_match = now_s
            st.input += n
            action = rule.action
            if action == "transform" or action == "classify":
                if labels is None:
                    labels = labels_of()
                if not changed:
                    labels = dict(labels)
                    changed = True
                renamed = (
                    _transform(rule.settings, labels, new_name)
                    if action == "transform"
                    else _classify(rule.settings, labels, new_name)
                )
                st.output += n
                if renamed != new_name:
                    new_name = renamed
                    # Rules after this one are matched against the new name.
                    plan = plan[: i + 1] + tuple(j for j in self.plan(new_name) if j > plan[i])
                i += 1
                continue
            verdict = self._terminal(
                rule, st, new_name, labels, labels_of, kind, n, points_of, origin, resource
            )
            if verdict is None:  # a kind the rule does not handle: not a match, on to the next
                st.last_match = before
                i += 1
                continue
            if changed:
                verdict.name = new_name
                verdict.labels = labels
            return verdict
        if changed:
            return Verdict(name=new_name, labels=labels)
        return PASS

    def route(self, name: str, labels: dict[str, str], kind: str) -> Route:
        """Where the rules send a numeric series without a resource (remote write), decided
        from its name and labels alone and without side effects, so it can be cached per
        distinct series: the transforms and classifies that match (in order), the labels they
        leave, and the terminal rule that claims it. `execute` does the rest, per request.
        The same decisions as `evaluate` for such a series."""
        plan = self.plan(name)
        if not plan:
            return PASS_ROUTE
        rules = self.rules
        current = labels
        changed = False
        new_name = name
        matched: list[str] = []
        terminal: Rule | None = None
        i = 0
        while i < len(plan):
            rule = rules[plan[i]]
            m = rule.match
            if (m.labels and not all_match(m.labels, current)) or m.resource:
                i += 1
                continue
            if rule.action == "transform" or rule.action == "classify":
                if not changed:
                    current = dict(current)
                    changed = True
                renamed = (
                    _transform(rule.settings, current, new_name)
                    if rule.action == "transform"
                    else _classify(rule.settings, current, new_name)
                )
                matched.append(rule.name)
                if renamed != new_name:
                    new_name = renamed
                    plan = plan[: i + 1] + tuple(j for j in self.plan(new_name) if j > plan[i])
                i += 1
                continue
            terminal = rule
            break
        if terminal is None and not matched:
            return PASS_ROUTE
        # The identity only where a terminal rule needs one (hash, head, windows).
        key = None
        if terminal is not None and terminal.action != "drop":
            key = _series_key(new_name, current, None)
        hash_keep = True
        if key is not None and terminal.action == "sample" and terminal.settings.method == "hash":
            hash_keep = _hash_fraction(key) < terminal.settings.rate
        return Route(
            tuple(matched),
            terminal,
            new_name,
            current if changed else None,
            key,
            hash_keep,
            kind,
        )

    def _terminal(
        self,
        rule: Rule,
        st: RuleStats,
        name: str,
        labels: dict[str, str] | None,
        labels_of: Callable[[], dict[str, str]],
        kind: str,
        n: int,
        points_of: Callable[[], list[tuple[int, float]]] | None,
        origin: Any,
        resource: Mapping[str, str] | None,
    ) -> Verdict | None:
        action = rule.action
        if action == "drop":
            st.dropped += n
            return Verdict(drop_all=True)
        if action == "sample":
            s: Sample = rule.settings
            if s.method == "probabilistic":
                rand = self.rand
                keep = [rand() < s.rate for _ in range(n)]
            else:
                key = _series_key(name, labels if labels is not None else labels_of(), resource)
                if s.method == "hash":
                    keep = [_hash_fraction(key) < s.rate] * n
                else:
                    # The remote-write route cache keeps the counts of the series it holds.
                    table = self.route_cache
                    seen = table.move_head(key, n, s.n) if table is not None else None
                    if seen is None:
                        heads = self._heads[rule.name]
                        seen = heads.get(key, 0)
                        heads[key] = (seen + n) % s.n
                    keep = [(seen + j) % s.n == 0 for j in range(n)]
            kept = sum(keep)
            st.output += kept
            st.dropped += n - kept
            if kept == n:
                return Verdict()
            if kept == 0:
                return Verdict(drop_all=True)
            return Verdict(keep=keep)
        # downsample and aggregate: numeric series only
        if kind not in NUMERIC or points_of is None:
            st.input -= n
            if not st.skipped:
                logs.log(
                    log,
                    logging.WARNING,
                    "rule matched datapoints it does not handle; they pass on unchanged",
                    rule=rule.name,
                    action=action,
                    kind=kind,
                    pipeline=self.pipeline,
                )
            st.skipped += n
            return None
        if labels is None:
            labels = labels_of()
        key = _series_key(name, labels, resource)
        self.absorb(rule, st, key, name, labels, kind, origin, points_of(), self.clock_ms())
        if action == "aggregate" and rule.settings.keep_input:
            st.output += n
            return Verdict()
        return Verdict(absorbed=True)

    def absorb(
        self,
        rule: Rule,
        st: RuleStats,
        key: SeriesKey,
        name: str,
        labels: dict[str, str],
        kind: str,
        origin: Any,
        points: list[tuple[int, float]],
        now: int,
    ) -> None:
        """Put a series' points into the window state of a downsample or aggregate rule."""
        state = self._states[rule.name]
        late = state.late
        if rule.action == "downsample":
            # `labels` is never changed after this (a route's, or built for this series).
            state.add(key, name, labels, kind, origin, points, now)
        else:
            agg: Aggregate = rule.settings
            counter = agg.input_kind == "counter" or (
                agg.input_kind == "auto" and kind == "counter"
            )
            state.add(key, name, labels, counter, origin, points, now)
        st.dropped += state.late - late  # points for windows already emitted

    # ---- windows ---------------------------------------------------------------------------

    def due(self, *, force: bool = False) -> list[Emitted]:
        """Windows that are due (all of them with `force`), including those of rules that a
        reload removed or changed. Counts them as the rules' output."""
        now = self.clock_ms()
        out: list[Emitted] = []
        for name, state in self._states.items():
            emitted = state.due(now, force=force)
            st = self.stats.get(name)
            if st is not None:
                st.output += sum(len(e.points) for e in emitted)
            out += emitted
        for state in self._orphans:
            out += state.due(now, force=True)
        self._orphans = []
        return out

    def check_dead(self) -> list[tuple[str, bool]]:
        """Rules whose dead state changed: (name, dead). Dead: no match for `dead_after`."""
        now = self.clock_ms() / 1000
        changed = []
        for rule in self.rules:
            st = self.stats[rule.name]
            since = st.last_match if st.last_match is not None else st.since
            dead = now - since >= rule.dead_after_s
            if dead != st.dead:
                st.dead = dead
                changed.append((rule.name, dead))
        return changed

    def report_dead(self) -> None:
        """check_dead(), with a log line for each rule whose dead state changed."""
        for name, dead in self.check_dead():
            logs.log(
                log,
                logging.WARNING if dead else logging.INFO,
                "rule is dead: no match for dead_after" if dead else "rule matches again",
                rule=name,
                pipeline=self.pipeline,
            )


# ---- actions on labels ---------------------------------------------------------------------


def _transform(ops: tuple[Op, ...], labels: dict[str, str], name: str) -> str:
    for op in ops:
        if op.when and not all_match(op.when, labels):
            continue
        kind = op.op
        if kind == "set":
            assert op.value is not None
            labels[op.label] = op.value.render(labels, name)
        elif kind == "remove":
            for k in op.labels:
                labels.pop(k, None)
        elif kind == "rename":
            if op.source in labels:
                labels[op.label] = labels.pop(op.source)
        elif kind == "copy":
            if op.source in labels:
                labels[op.label] = labels[op.source]
        elif kind == "replace":
            if op.label in labels and op.regex is not None:
                labels[op.label] = op.regex.sub(op.replacement, labels[op.label])
        elif kind == "extract":
            v = labels.get(op.source)
            if v is not None and op.regex is not None:
                m = op.regex.search(v)
                if m is not None and m.group(op.group) is not None:
                    labels[op.label] = m.group(op.group)
        elif kind == "lower":
            if op.label in labels:
                labels[op.label] = labels[op.label].lower()
        elif kind == "upper":
            if op.label in labels:
                labels[op.label] = labels[op.label].upper()
        elif kind == "concat":
            labels[op.label] = op.separator.join(labels.get(s, "") for s in op.sources)
        elif kind == "map":
            v = labels.get(op.source)
            table = dict(op.table)
            if v is not None and v in table:
                labels[op.label] = table[v]
            elif op.default is not None:
                labels[op.label] = op.default
        elif kind == "hash_mod":
            v = labels.get(op.source, "")
            labels[op.label] = str(zlib.crc32(v.encode()) % op.modulus)
        elif kind == "rename_metric":
            assert op.value is not None
            name = op.value.render(labels, name) or name
        if op.label and labels.get(op.label) == "":
            del labels[op.label]  # an empty value is no label (Prometheus semantics)
    return name


def _classify(c: Classify, labels: dict[str, str], name: str) -> str:
    for chain in c.chains:
        if all_match(chain.when, labels):
            rendered = [(k, t.render(labels, name)) for k, t in chain.set]
            for k, v in rendered:
                labels[k] = v
            break
    for k in [k for k, v in labels.items() if v == ""]:
        del labels[k]  # an empty value is no label, as in transform
    for t in c.tables:
        v = labels.get(t.source)
        table = dict(t.values)
        if v is not None and v in table:
            labels[t.target] = table[v]
        elif t.default is not None:
            labels[t.target] = t.default
    return name


class SeriesKey:
    """The identity of a series: name, sorted labels and (OTLP) sorted resource attributes.
    Its hash is computed once: window, head and group state look it up per datapoint."""

    __slots__ = ("_hash", "parts")

    def __init__(self, parts: tuple[Any, ...]) -> None:
        self.parts = parts
        self._hash = hash(parts)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, SeriesKey) and self.parts == other.parts)

    def __repr__(self) -> str:
        return f"SeriesKey({self.parts!r})"


def _series_key(
    name: str, labels: Mapping[str, str], resource: Mapping[str, str] | None
) -> SeriesKey:
    """The identity of a series: name, sorted labels and (OTLP) sorted resource attributes."""
    res = tuple(sorted(resource.items())) if resource else ()
    return SeriesKey((name, tuple(sorted(labels.items())), res))


def _hash_fraction(key: SeriesKey) -> float:
    """A stable number in [0, 1) for a series: the same in every process and replica."""
    name, labels, res = key.parts
    text = "\x00".join([name, *(f"{k}\x01{v}" for k, v in labels), "\x02"])
    text += "\x00".join(f"{k}\x01{v}" for k, v in res)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def wall_clock_ms() -> int:
    import time

    return int(time.time() * 1000)
