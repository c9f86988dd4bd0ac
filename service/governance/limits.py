"""Cardinality and rate limits: the limits file, and the engine that decides per series.

A limit matches metrics (name regex, label matchers, as in the rules file), tracks what it
matches per group (`group_by` labels; `__tenant__` is the request's tenant) and caps the active
series (`max_series`) and/or the datapoint rate (`max_datapoints_rate`) of each group. Usage is
measured on what clients attempted, before anything is dropped, so dropping never makes a group
look well-behaved. Sans-IO: callers pass the time in; the wire adapters apply the decisions.

The limits file is validated completely, like the rules file: every problem is reported with
the limit's name and the key's path, and a file with a problem never replaces a good one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import attrs

from service.governance.cardinality import SortedHashes, WindowedTracker, top_k
from service.governance.rules import (
    GAUGE_FUNCTIONS,
    LABEL_NAME_RE,
    Aggregate,
    Match,
    Reader,
    RulesError,
    all_match,
    read_match,
    template,
    top_reader,
)
from service.governance.windows import AggregateState, Emitted, _origin_key
from service.telemetry import logs

log = logs.get("limits")

TENANT = "__tenant__"  # the request's tenant, usable in group_by
ACTIONS = ("log", "drop_new", "sample", "strip", "drop")
_LATENESS_MS = 2000
_STRIP_INTERVAL_S = 30.0


class LimitsError(RulesError):
    """The limits file is invalid; `problems` lists every problem as 'where: what'."""

    def __init__(self, problems: list[str]) -> None:
        Exception.__init__(self, "invalid limits:\n  " + "\n  ".join(problems))
        self.problems = problems


@attrs.frozen
class Act:
    """What a limit does to a group's series while it applies."""

    kind: str  # log | drop_new | sample | strip | drop
    rate: float = 1.0  # sample: the share of series kept (by a stable hash of the series)
    labels: tuple[str, ...] = ()  # strip: the labels taken off
    function: str = "sum"  # strip: how gauges that collapse together are re-aggregated


@attrs.frozen
class Tier:
    at: float  # share of the limit (1.0 = 100 %) from which `act` applies
    act: Act


@attrs.frozen
class LabelCap:
    label: str
    max_values: int
    action: str  # strip | drop


@attrs.frozen
class Override:
    group: tuple[tuple[str, str], ...]  # (label, value) of the group_by labels
    max_series: int
    max_datapoints_rate: float


@attrs.frozen
class Limit:
    name: str
    match: Match
    group_by: tuple[str, ...]
    max_series: int  # 0: no series limit
    max_datapoints_rate: float  # datapoints per second; 0: no rate limit
    tiers: tuple[Tier, ...]  # ascending by `at`
    adaptive: Act | None  # adaptive: max_series is the whole limit's; act on top offenders
    label_caps: tuple[LabelCap, ...]
    overrides: tuple[Override, ...]
    dry_run: bool
    annotate: bool
    labels: tuple[tuple[str, str], ...]  # ownership labels on the limit's own metrics
    strip_interval_s: float

    @property
    def uses_tenant(self) -> bool:
        return TENANT in self.group_by


@attrs.frozen
class Tenancy:
    """Where a datapoint's tenant comes from: the first of header, label, resource attribute
    that gives one, else `default`."""

    header: str = "X-Scope-OrgID"
    label: str = ""
    resource_attribute: str = ""
    default: str = "default"


@attrs.frozen
class LimitSet:
    limits: tuple[Limit, ...]
    tenancy: Tenancy
    window_s: float
    dry_run: bool

    def by_name(self) -> dict[str, Limit]:
        return {lim.name: lim for lim in self.limits}


# ---- loading --------------------------------------------------------------------------------


def _percent(r: Reader, key: str) -> float:
    v = r.get(key, required=True)
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            return float(v.strip()[:-1]) / 100
        except ValueError:
            pass
    elif isinstance(v, int | float) and not isinstance(v, bool):
        return float(v) / 100
    if v is not None:
        r.fail(f"expected a percentage like 80% or 80, got {v!r}", key)
    return 1.0


def _act(r: Reader, kind: str) -> Act:
    if kind == "sample":
        return Act(kind, rate=r.number("rate", 0.5, check="fraction"))
    if kind == "strip":
        labels = r.strings("labels") or ()
        if not labels:
            r.fail("required: the labels to take off", "labels")
        function = r.choice("function", GAUGE_FUNCTIONS, "sum") or "sum"
        return Act(kind, labels=labels, function=function)
    return Act(kind)


def _flag(r: Reader, key: str, default: bool) -> bool:
    v = r.get(key, default)
    if not isinstance(v, bool):
        r.fail("expected true or false", key)
        return default
    return v


def _limit(item: Any, where: str, problems: list[str]) -> Limit | None:
    before = len(problems)
    name = item.get("name") if isinstance(item, Mapping) else None
    where += f" ({name})" if isinstance(name, str) and name else ""
    r = Reader(item, where, problems)
    name = r.text("name", required=True)
    match = read_match(r)
    group_by = r.strings("group_by") or ()
    for label in group_by:
        if label != TENANT and not LABEL_NAME_RE.match(label):
            r.fail(f"{label!r} is not a label name", "group_by")
    max_series = r.integer("max_series", 0, minimum=0)
    rate = r.number("max_datapoints_rate", 0.0)
    if rate < 0:
        r.fail("must be >= 0", "max_datapoints_rate")
    owner = r.get("labels", {})
    if not isinstance(owner, Mapping) or not all(
        isinstance(k, str) and LABEL_NAME_RE.match(k) and isinstance(v, str)
        for k, v in owner.items()
    ):
        r.fail("expected a mapping of label names to strings", "labels")
        owner = {}
    tiers: list[Tier] = []
    adaptive = None
    raw_tiers = r.get("tiers")
    action = r.get("action")
    if raw_tiers is not None and action is not None:
        r.fail("give either `action` or `tiers`, not both")
    elif raw_tiers is not None:
        if not isinstance(raw_tiers, list) or not raw_tiers:
            r.fail("expected a list of tiers like {at: 80%, action: log}", "tiers")
        else:
            for j, raw in enumerate(raw_tiers):
                t = Reader(raw, f"{where}.tiers[{j}]", problems)
                at = _percent(t, "at")
                kind = t.choice("action", ACTIONS)
                act = _act(t, kind) if kind else Act("log")
                t.finish()
                if at <= 0:
                    t.fail("must be > 0%", "at")
                tiers.append(Tier(at, act))
            ats = [t.at for t in tiers]
            if len(set(ats)) != len(ats):
                r.fail("two tiers start at the same percentage", "tiers")
            tiers.sort(key=lambda t: t.at)
    else:
        # Without an action, a limit with a maximum drops new series; one without a maximum
        # may hold label caps only.
        kind = ""
        if action is not None or max_series or rate:
            kind = r.choice("action", (*ACTIONS, "adaptive"), "drop_new")
        if kind == "adaptive":
            sub = r.sub("adaptive", required=False)
            then = "drop_new"
            act = Act(then)
            if sub is not None:
                then = sub.choice("then", ("drop_new", "sample", "strip", "drop"), "drop_new")
                act = _act(sub, then) if then else act
                sub.finish()
            adaptive = act
            if not group_by:
                r.fail("adaptive picks offending groups: give group_by", "group_by")
        elif kind:
            sub = r.sub(kind, required=False) if kind in ("sample", "strip") else None
            if kind in ("sample", "strip") and sub is None:
                r.fail(f"settings for {kind!r} are required", kind)
            act = _act(sub, kind) if sub is not None else Act(kind)
            if sub is not None:
                sub.finish()
            tiers.append(Tier(1.0, act))
    for other in ("sample", "strip", "adaptive"):
        if other in r.data and other not in r.used:
            r.get(other)
            r.fail(f"settings for {other!r}, but the action is {action!r}", other)
    if not max_series and not rate and (tiers or adaptive):
        r.fail("give max_series and/or max_datapoints_rate")
    if adaptive is not None and not max_series:
        r.fail("adaptive needs max_series (the budget of the whole limit)", "max_series")
    caps = []
    raw_caps = r.get("label_caps", [])
    if not isinstance(raw_caps, list):
        r.fail("expected a list like [{label: user_id, max_values: 100, action: strip}]")
        raw_caps = []
    for j, raw in enumerate(raw_caps):
        c = Reader(raw, f"{where}.label_caps[{j}]", problems)
        label = c.text("label", required=True)
        max_values = c.integer("max_values", 1)
        cap_action = c.choice("action", ("strip", "drop"), "strip")
        c.finish()
        caps.append(LabelCap(label, max_values, cap_action))
    overrides = []
    raw_over = r.get("overrides", [])
    if not isinstance(raw_over, list):
        r.fail("expected a list like [{group: {service: checkout}, max_series: 5000}]")
        raw_over = []
    for j, raw in enumerate(raw_over):
        o = Reader(raw, f"{where}.overrides[{j}]", problems)
        group = o.get("group", required=True)
        if not isinstance(group, Mapping) or set(group) != set(group_by):
            o.fail(f"expected a value for each group_by label ({', '.join(group_by)})", "group")
            group = {}
        o_series = o.integer("max_series", max_series, minimum=0)
        o_rate = o.number("max_datapoints_rate", rate)
        o.finish()
        values = tuple((k, str(group.get(k, ""))) for k in group_by)
        overrides.append(Override(values, o_series, o_rate))
    dry_run = _flag(r, "dry_run", False)
    annotate = _flag(r, "annotate", False)
    strip_interval = r.duration("strip_interval", _STRIP_INTERVAL_S)
    r.finish()
    if not tiers and adaptive is None and not caps and len(problems) == before:
        problems.append(f"{where}: nothing to enforce: give an action, tiers or label_caps")
    if len(problems) > before:
        return None
    return Limit(
        name,
        match,
        tuple(group_by),
        max_series,
        rate,
        tuple(tiers),
        adaptive,
        tuple(caps),
        tuple(overrides),
        dry_run,
        annotate,
        tuple(owner.items()),
        strip_interval,
    )


_QUOTA_KEYS = (
    "max_series",
    "max_datapoints_rate",
    "action",
    "tiers",
    "sample",
    "strip",
    "adaptive",
    "label_caps",
    "dry_run",
    "annotate",
    "labels",
    "strip_interval",
)


def _quotas(r: Reader, problems: list[str]) -> Limit | None:
    """`quotas:` is a limit over every metric grouped by tenant, with per-tenant overrides
    under `tenants` (a tenant's own maximums)."""
    raw = r.get("quotas")
    if raw is None:
        return None
    q = Reader(raw, "quotas", problems)
    item: dict[str, Any] = {"name": q.text("name", "tenant-quota"), "group_by": [TENANT]}
    for key in _QUOTA_KEYS:
        if key in q.data:
            item[key] = q.get(key)
    tenants = q.get("tenants", {})
    if not isinstance(tenants, Mapping):
        q.fail("expected a mapping of tenant to {max_series, max_datapoints_rate}", "tenants")
        tenants = {}
    q.finish()
    limit = _limit(item, "quotas", problems)
    overrides = []
    for tenant, v in tenants.items():
        if isinstance(v, int) and not isinstance(v, bool):
            v = {"max_series": v}  # `team-a: 5000` is short for its max_series
        t = Reader(v, f"quotas.tenants.{tenant}", problems)
        max_series = t.integer("max_series", limit.max_series if limit else 0, minimum=0)
        rate = t.number("max_datapoints_rate", limit.max_datapoints_rate if limit else 0.0)
        if rate < 0:
            t.fail("must be >= 0", "max_datapoints_rate")
        t.finish()
        overrides.append(Override(((TENANT, str(tenant)),), max_series, rate))
    if limit is None:
        return None
    return attrs.evolve(limit, overrides=(*limit.overrides, *overrides))


def load_limits(text: str) -> LimitSet:
    """Parse and validate a limits file; raises LimitsError listing every problem."""
    problems: list[str] = []
    top = top_reader(text, problems, LimitsError)
    window_s = top.duration("window", 60.0)
    dry_run = _flag(top, "dry_run", False)
    tenancy = Tenancy()
    t = top.sub("tenant", required=False)
    if t is not None:
        tenancy = Tenancy(
            header=t.text("header", "X-Scope-OrgID"),
            label=t.text("label", ""),
            resource_attribute=t.text("resource_attribute", ""),
            default=t.text("default", "default") or "default",
        )
        t.finish()
    quota = _quotas(top, problems)
    raw = top.get("limits", [])
    top.finish()
    if not isinstance(raw, list):
        raise LimitsError([*problems, "limits: expected a list of limits"])
    limits = [quota] if quota is not None else []
    for i, item in enumerate(raw):
        limit = _limit(item, f"limits[{i}]", problems)
        if limit is not None:
            limits.append(limit)
    # Names from the file as written, so a duplicate is reported even when one of the two
    # limits has another problem.
    names = [lim.name for lim in limits[:1] if quota is not None] + [
        item["name"]
        for item in raw
        if isinstance(item, Mapping) and isinstance(item.get("name"), str) and item["name"]
    ]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"limits: two limits are named {name!r}")
    if problems:
        raise LimitsError(problems)
    return LimitSet(tuple(limits), tenancy, window_s, dry_run)


# ---- the engine -----------------------------------------------------------------------------


@attrs.define(eq=False, slots=True)
class Group:
    """One group of one limit: what its clients attempted, and what it admitted, lately."""

    key: tuple[str, ...]
    max_series: int
    max_rate: float
    attempted: WindowedTracker
    window: int = -1  # the window index `points` and `admitted` belong to
    points: int = 0  # datapoints attempted in the current window
    points_before: int = 0  # ... in the previous one
    # Series let through (drop_new and adaptive limits), current and previous window.
    admitted: SortedHashes = attrs.field(factory=SortedHashes)
    admitted_before: SortedHashes = attrs.field(factory=SortedHashes)
    refused: bool = False  # a series was refused admission in the current window
    admitted_n: int | None = None  # len(admitted | admitted_before), None until worked out
    usage: float = 0.0  # the last usage computed: attempted / limit (the larger of both)
    act: Act | None = None  # what applies now (None: nothing)
    offender: bool = False  # adaptive: picked as a top offender for this window
    fair: int = 0  # adaptive: its fair share when it was picked
    limited_since: float | None = None  # when the group started being limited
    last_seen: float = 0.0
    dropped: int = 0  # datapoints dropped (or, dry run, that would have been) since it began

    def roll(self, index: int) -> None:
        if index == self.window:
            return
        if index == self.window + 1:
            self.points_before, self.admitted_before = self.points, self.admitted
        else:
            self.points_before, self.admitted_before = 0, SortedHashes()
        self.points, self.admitted = 0, SortedHashes()
        self.window = index
        self.offender = False
        self.refused = False
        self.admitted_n = None


@attrs.define(eq=False)
class LimitStats:
    datapoints: int = 0  # attempted
    dropped: dict[str, int] = attrs.field(factory=dict)  # by action
    dry_run: dict[str, int] = attrs.field(factory=dict)  # would have been dropped, by action
    stripped: int = 0  # datapoints whose labels were stripped and re-aggregated


@attrs.define(eq=False, slots=True)
class Series:
    """A request's series as the limits see them, by position: their hashes, their facts
    (anything with `name` and `pairs`, the labels but `__name__`) and their datapoints."""

    ids: list[int]
    facts: Sequence[Any]
    points: list[int] | None = None  # None: one each

    def count(self, idx: Collection[int]) -> int:
        """Datapoints of the series at positions `idx`."""
        if self.points is None:
            return len(idx)
        points = self.points
        return sum(points[i] for i in idx)


@attrs.define(eq=False)
class Decisions:
    """What the limits decided for a request's series, by index. Empty lists: no change."""

    drop: set[int] = attrs.field(factory=set)
    # index -> (limit, labels after stripping): take the series out, re-aggregate it
    strip: dict[int, tuple[Limit, dict[str, str]]] = attrs.field(factory=dict)
    annotate: dict[int, str] = attrs.field(factory=dict)  # index -> limit name (opt-in)
    rejected: int = 0  # datapoints dropped (for OTLP partial success)

    @property
    def changed(self) -> bool:
        return bool(self.drop or self.strip or self.annotate)


class _Cap:
    """Distinct values of one label of one metric, for a label cap: current and previous
    window (values seen in either are known)."""

    __slots__ = ("before", "now", "window")

    def __init__(self) -> None:
        self.now: set[str] = set()
        self.before: set[str] = set()
        self.window = -1


class LimitEngine:
    """The limits of one pipeline and their state."""

    ANNOTATION = "governor_limit"

    def __init__(
        self,
        limitset: LimitSet,
        *,
        pipeline: str,
        exact_limit: int = 1000,
        force_dry_run: bool = False,
        max_groups: int = 100_000,
    ) -> None:
        self.pipeline = pipeline
        self.exact_limit = exact_limit
        self.force_dry_run = force_dry_run
        self.max_groups = max_groups
        self.stats: dict[str, LimitStats] = {}
        self.groups: dict[str, dict[tuple[str, ...], Group]] = {}
        self._caps: dict[str, dict[tuple[str, str], _Cap]] = {}
        self._strips: dict[str, tuple[AggregateState, _LastValues]] = {}
        self._orphans: list[AggregateState | _LastValues] = []
        self._next_prune = 0.0
        self.generation = 0
        self.apply(limitset)

    # ---- configuration ---------------------------------------------------------------------

    def apply(self, limitset: LimitSet) -> None:
        """Use these limits. Groups and their counts of limits that exist with the same
        settings carry over; the others start afresh."""
        old = getattr(self, "limitset", None)
        old_by = old.by_name() if old else {}
        self.limitset = limitset
        self.limits = limitset.limits
        self.window_s = limitset.window_s
        self.tenancy = limitset.tenancy
        self.generation += 1
        self._plans: dict[str, tuple[int, ...]] = {}
        self._reset_matches()
        groups, caps, strips = {}, {}, {}
        for lim in self.limits:
            same = old_by.get(lim.name) == lim and old is not None and old.window_s == self.window_s
            groups[lim.name] = self.groups.get(lim.name, {}) if same else {}
            caps[lim.name] = self._caps.get(lim.name, {}) if same else {}
            if lim.name in self._strips and same:
                strips[lim.name] = self._strips[lim.name]
            elif any(t.act.kind == "strip" for t in lim.tiers) or _strips(lim):
                strips[lim.name] = _strip_states(lim)
            self.stats.setdefault(lim.name, LimitStats())
        for name, pair in self._strips.items():
            if strips.get(name) is not pair:
                self._orphans.extend(pair)
        self.groups, self._caps, self._strips = groups, caps, strips
        for name in list(self.stats):
            if name not in groups:
                del self.stats[name]

    @property
    def active(self) -> bool:
        return bool(self.limits)

    def plan(self, name: str) -> tuple[int, ...]:
        """Indexes of the limits whose name pattern matches a metric name (cached)."""
        plan = self._plans.get(name)
        if plan is None:
            plan = tuple(i for i, lim in enumerate(self.limits) if lim.match.name.fullmatch(name))
            if len(self._plans) >= 100_000:
                self._plans.clear()
            self._plans[name] = plan
        return plan

    def tenant_of(
        self, header_tenant: str, labels: Mapping[str, str], resource: Mapping[str, str] | None
    ) -> str:
        t = self.tenancy
        if header_tenant:
            return header_tenant
        if t.label and labels.get(t.label):
            return labels[t.label]
        if t.resource_attribute and resource and resource.get(t.resource_attribute):
            return resource[t.resource_attribute]
        return t.default

    # ---- deciding ----------------------------------------------------------------------------

    def match_id(
        self,
        name: str,
        labels: Mapping[str, str],
        resource: Mapping[str, str] | None = None,
    ) -> int:
        """Which limits a series falls under, as a small int (0: none) that stands for its
        (tenant from its labels or resource, ((limit index, group key), ...)) in `match_sets`:
        series with the same one are grouped per request without hashing tuples per series.
        A request header's tenant, when there is one, overrides the tenant here."""
        t = self.tenancy
        tenant = (
            (labels.get(t.label) if t.label else None)
            or (resource.get(t.resource_attribute) if t.resource_attribute and resource else None)
            or t.default
        )
        out = []
        for i in self.plan(name):
            lim = self.limits[i]
            if not all_match(lim.match.labels, labels):
                continue
            if lim.match.resource and (
                resource is None or not all_match(lim.match.resource, resource)
            ):
                continue  # remote-write series have no resource: resource matchers never hold
            out.append((i, tuple(labels.get(k, "") for k in lim.group_by if k != TENANT)))
        if not out:
            return 0
        key = (tenant, tuple(out))
        mid = self._match_ids.get(key)
        if mid is None:
            if len(self._match_ids) >= 1_000_000:  # a new generation: facts ask again
                self._reset_matches()
                self.generation += 1
            mid = self._match_ids[key] = len(self.match_sets)
            self.match_sets.append(key)
        return mid

    def _reset_matches(self) -> None:
        self.match_sets: list[tuple[str, tuple[tuple[int, tuple[str, ...]], ...]]] = [("", ())]
        self._match_ids: dict[tuple[Any, ...], int] = {("", ()): 0}

    def decide(
        self,
        series: Series,
        buckets: Mapping[int, list[int]],
        now_s: float,
        *,
        tenant: str = "",
        fresh: Collection[int] | None = None,
    ) -> Decisions:
        """Decide for a request's series, given as positions per match_id; `tenant` (from a
        request header) overrides the series' own. `fresh`: the positions of series not seen
        yet in this window (None: all); only those are added to the trackers (adding a series
        twice in a window changes nothing). The request's series are counted first, so the
        request that crosses a limit is already limited."""
        d = Decisions()
        work: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        sets = self.match_sets
        for mid, idx in buckets.items():
            own, matched = sets[mid]
            for li, gkey in matched:
                if self.limits[li].uses_tenant:
                    gkey = (*gkey, tenant or own)
                got = work.get((li, gkey))
                if got is None:
                    work[(li, gkey)] = idx
                else:
                    work[(li, gkey)] = got + idx
        if not work:
            return d
        index = int(now_s // self.window_s)
        ids = series.ids
        by_limit: dict[int, list[tuple[Group, list[int]]]] = {}
        for (li, gkey), idx in work.items():
            lim = self.limits[li]
            g = self._group(lim, gkey, now_s)
            g.roll(index)
            g.attempted.roll(now_s)
            if fresh is None:
                g.attempted.add_hashes([ids[i] for i in idx])
            elif fresh:  # in steady state no series is new in the window: nothing to add
                new = [ids[i] for i in idx if i in fresh]
                if new:
                    g.attempted.add_hashes(new)
            points = series.count(idx)
            g.points += points
            g.last_seen = now_s
            self.stats[lim.name].datapoints += points
            by_limit.setdefault(li, []).append((g, idx))
        for li, entries in by_limit.items():
            lim = self.limits[li]
            if lim.adaptive is not None:
                self._pick_offenders(lim, now_s)
            for g, idx in entries:
                self._usage(lim, g, now_s)
                act = self._act_of(lim, g)
                self._note(lim, g, act, now_s)
                self._enforce(lim, g, act, idx, series, d, fresh)
            if lim.label_caps:
                self._caps_of(lim, [i for _, idx in entries for i in idx], series, index, d)
        return d

    def _group(self, lim: Limit, gkey: tuple[str, ...], now_s: float) -> Group:
        groups = self.groups[lim.name]
        g = groups.get(gkey)
        if g is None:
            if len(groups) >= self.max_groups:
                self.prune(now_s, force=True)
            max_series, max_rate = lim.max_series, lim.max_datapoints_rate
            values = sorted(zip(group_names(lim), gkey, strict=True))
            for o in lim.overrides:
                if sorted(o.group) == values:
                    max_series, max_rate = o.max_series, o.max_datapoints_rate
            g = groups[gkey] = Group(
                gkey,
                max_series,
                max_rate,
                WindowedTracker(self.window_s, self.exact_limit),
            )
        return g

    def _usage(self, lim: Limit, g: Group, now_s: float) -> None:
        usage = 0.0
        if g.max_series:
            usage = g.attempted.count() / g.max_series
        if g.max_rate:
            # The rate over the last window length: the previous window weighted by the part
            # of it still inside, plus the current one.
            frac = (now_s % self.window_s) / self.window_s
            rate = (g.points_before * (1 - frac) + g.points) / self.window_s
            usage = max(usage, rate / g.max_rate)
        g.usage = usage

    def _act_of(self, lim: Limit, g: Group) -> Act | None:
        if lim.adaptive is not None:
            return lim.adaptive if g.offender else None
        act = None
        for tier in lim.tiers:
            if g.usage >= tier.at:
                act = tier.act
        return act

    def _pick_offenders(self, lim: Limit, now_s: float) -> None:
        """Adaptive: when the limit's groups together attempt more active series than
        `max_series`, the groups furthest above their fair share (max_series / active groups)
        are picked, the largest first, until what they hold above it covers the excess. They
        stay picked until the window ends, the others are left alone. Active series count the
        previous window too, so an offender that keeps going is picked again at its first
        request of the next window, and one that calmed down is let go then."""
        groups = []
        counts = {}
        for g in self.groups[lim.name].values():
            g.attempted.roll(now_s)  # a group that went quiet counts only what is still active
            n = g.attempted.count()
            if n:
                groups.append(g)
                counts[id(g)] = n
        excess = sum(counts.values()) - lim.max_series
        if excess <= 0 or not groups:
            return
        fair = lim.max_series / len(groups)
        covered = sum(counts[id(g)] - fair for g in groups if g.offender)
        for g in sorted(groups, key=lambda g: -counts[id(g)]):
            if covered >= excess:
                break
            if g.offender or counts[id(g)] <= fair:
                continue
            g.offender = True
            g.fair = int(fair)
            covered += counts[id(g)] - fair

    def _note(self, lim: Limit, g: Group, act: Act | None, now_s: float) -> None:
        if act is not None and g.limited_since is None:
            g.limited_since = now_s
            logs.log(
                log,
                logging.WARNING,
                "group is limited",
                limit=lim.name,
                group=group_text(lim, g.key),
                action=act.kind,
                usage=f"{g.usage:.0%}" if lim.adaptive is None else "offender",
                pipeline=self.pipeline,
                dry_run=self.dry_run(lim),
            )
        elif act is None and g.limited_since is not None:
            self._release(lim, g, now_s)
        g.act = act

    def _release(self, lim: Limit, g: Group, now_s: float) -> None:
        logs.log(
            log,
            logging.INFO,
            "group is no longer limited",
            limit=lim.name,
            group=group_text(lim, g.key),
            limited_for_s=round(now_s - (g.limited_since or now_s), 1),
            pipeline=self.pipeline,
        )
        g.limited_since = None

    def dry_run(self, lim: Limit) -> bool:
        return self.force_dry_run or self.limitset.dry_run or lim.dry_run

    def _enforce(
        self,
        lim: Limit,
        g: Group,
        act: Act | None,
        idx: list[int],
        series: Series,
        d: Decisions,
        fresh: Collection[int] | None,
    ) -> None:
        tracks_admission = lim.adaptive is not None or any(
            t.act.kind == "drop_new" for t in lim.tiers
        )
        kind = act.kind if act is not None else None
        ids = series.ids
        # Who to admit when letting every series through: those not seen yet in this window
        # (the others were admitted at their first sight), unless some were refused then.
        if fresh is None or g.refused:
            admit = idx
        else:
            admit = [i for i in idx if i in fresh] if fresh else []
        if kind is None or kind == "log":
            if tracks_admission and admit:
                g.admitted.update([ids[i] for i in admit])
                g.admitted_n = None
            if kind == "log":
                self._count(lim, "log", series.count(idx), dry=True)
            return
        dry = self.dry_run(lim)
        out: list[int] = []
        if kind == "drop":
            out = idx
        elif kind == "drop_new":
            admitted, before = g.admitted, g.admitted_before
            # An adaptive offender keeps admitting new series up to its fair share, so a group
            # that arrived after the others filled the budget is cut back, not cut off.
            cap = g.fair if lim.adaptive is not None else g.max_series
            if g.admitted_n is None:  # worked out once, then kept up to date here
                g.admitted_n = admitted.union_len(before)
            room = cap - g.admitted_n if cap else 0
            for i in idx:
                h = ids[i]
                if h in admitted:
                    continue
                if h in before:
                    admitted.add(h)
                elif room > 0:
                    admitted.add(h)
                    room -= 1
                    g.admitted_n += 1
                else:
                    out.append(i)
        elif kind == "sample":
            cut = act.rate * 2**64
            out = [i for i in idx if ids[i] >= cut]
            if tracks_admission:
                g.admitted.update([ids[i] for i in admit if ids[i] < cut])
                g.admitted_n = None
        elif kind == "strip":
            assert act is not None
            drop = act.labels
            points = 0
            for i in idx:
                labels = dict(series.facts[i].pairs)
                if not any(k in labels for k in drop):
                    continue
                points += series.count((i,))
                if not dry:
                    d.strip[i] = (lim, {k: v for k, v in labels.items() if k not in drop})
            if dry:
                self._count(lim, "strip", points, dry=True)
            else:
                self.stats[lim.name].stripped += points
        if tracks_admission and kind == "strip":
            g.admitted.update([ids[i] for i in admit])
            g.admitted_n = None
        if out and kind in ("drop_new", "sample", "drop"):
            g.refused = True
        if out:
            points = series.count(out)
            g.dropped += points
            self._count(lim, kind, points, dry=dry)
            if not dry:
                d.drop.update(out)
                d.rejected += points
        if lim.annotate and not dry:
            gone = set(out)
            for i in idx:
                if i not in gone:
                    d.annotate[i] = lim.name

    def _caps_of(
        self, lim: Limit, idx: list[int], series: Series, index: int, d: Decisions
    ) -> None:
        caps = self._caps[lim.name]
        dry = self.dry_run(lim)
        for cap in lim.label_caps:
            for i in idx:
                f = series.facts[i]
                value = dict(f.pairs).get(cap.label)
                if value is None or i in d.drop:
                    continue
                c = caps.get((f.name, cap.label))
                if c is None:
                    c = caps[(f.name, cap.label)] = _Cap()
                if c.window != index:
                    c.before = c.now if c.window == index - 1 else set()
                    c.now, c.window = set(), index
                if value in c.now:
                    continue
                if value in c.before or len(c.now | c.before) < cap.max_values:
                    c.now.add(value)
                    continue
                points = series.count((i,))
                if cap.action == "drop" or dry:
                    self._count(lim, f"label_cap_{cap.action}", points, dry=dry)
                else:
                    self.stats[lim.name].stripped += points
                if dry:
                    continue
                if cap.action == "drop":
                    d.drop.add(i)
                    d.rejected += points
                    d.strip.pop(i, None)
                else:
                    base = d.strip[i][1] if i in d.strip else dict(f.pairs)
                    labels = {k: v for k, v in base.items() if k != cap.label}
                    d.strip[i] = (lim, labels)

    def _count(self, lim: Limit, action: str, points: int, *, dry: bool) -> None:
        st = self.stats[lim.name]
        bucket = st.dry_run if dry else st.dropped
        bucket[action] = bucket.get(action, 0) + points

    # ---- re-aggregation of stripped series ----------------------------------------------------

    def strip_state(self, lim: Limit, counter: bool) -> AggregateState | _LastValues:
        counters, gauges = self._strips.setdefault(lim.name, _strip_states(lim))
        return counters if counter else gauges

    def due(self, now_ms: int, *, force: bool = False) -> list[Emitted]:
        out: list[Emitted] = []
        for counters, gauges in self._strips.values():
            out += counters.due(now_ms, force=force)
            out += gauges.due(now_ms, force=force)
        for state in self._orphans:
            out += state.due(now_ms, force=True)
        self._orphans = []
        return out

    # ---- housekeeping ------------------------------------------------------------------------

    def prune(self, now_s: float, *, force: bool = False) -> None:
        """Forget groups not seen for two windows (all but the busiest half with `force`), and
        log groups whose window ended while they were limited. A walk over every group: at
        most every tenth of a window (and every second), unless `force`."""
        if not force and now_s < self._next_prune:
            return
        self._next_prune = now_s + max(1.0, self.window_s / 10)
        index = int(now_s // self.window_s)
        for lim in self.limits:
            groups = self.groups[lim.name]
            for key, g in list(groups.items()):
                if g.limited_since is not None and g.window < index - 1:
                    g.act = None
                    self._release(lim, g, now_s)
                if now_s - g.last_seen > 2 * self.window_s:
                    del groups[key]
            if force and len(groups) >= self.max_groups:
                keep = sorted(groups.values(), key=lambda g: -g.last_seen)[: self.max_groups // 2]
                self.groups[lim.name] = {g.key: g for g in keep}
                self.generation += 1  # series of forgotten groups are fresh again
            caps = self._caps[lim.name]
            for key, c in list(caps.items()):
                if c.window < index - 1:
                    del caps[key]

    def top_groups(self, lim: Limit, k: int) -> list[tuple[Group, int]]:
        """The `k` groups of a limit with the most series, with their counts."""
        counts = {g.key: g.attempted.count() for g in self.groups[lim.name].values()}
        groups = self.groups[lim.name]
        keyed = {"\x00".join(key): key for key in counts}
        best = top_k({text: counts[key] for text, key in keyed.items()}, k)
        return [(groups[keyed[text]], n) for text, n in best]


def group_names(lim: Limit) -> list[str]:
    """The labels of a group key, in its order: the group_by labels, then the tenant."""
    return [k for k in lim.group_by if k != TENANT] + ([TENANT] if lim.uses_tenant else [])


def group_text(lim: Limit, key: Iterable[str]) -> str:
    """A group as it appears in logs and metrics: `service=api,__tenant__=team-a`."""
    names = group_names(lim)
    return ",".join(f"{k}={v}" for k, v in zip(names, key, strict=False)) or "(all)"


def _strips(lim: Limit) -> bool:
    return any(c.action == "strip" for c in lim.label_caps) or (
        lim.adaptive is not None and lim.adaptive.kind == "strip"
    )


class _LastValues:
    """Stripped gauges: per output series and window, each input series' last value. A window
    emits the strip's function over those values (with `sum`, what `sum without (labels)`
    reads at the window's end), never over every point, so how often clients send does not
    change the result."""

    def __init__(self, interval_s: float, function: str, lateness_ms: int) -> None:
        self.interval_ms = max(1, int(interval_s * 1000))
        self.function = function
        self.lateness_ms = lateness_ms
        self._windows: dict[int, dict[Any, tuple[str, dict[str, str], Any, dict[Any, Any]]]] = {}
        self._flushed_to = -1
        self.late = 0

    def group_of(
        self, name: str, labels: dict[str, str], origin: Any = None
    ) -> tuple[dict[str, str], Any]:
        key = (name, tuple(sorted(labels.items())), _origin_key(origin))
        return labels, key

    def add_one(
        self,
        series_key: Any,
        name: str,
        grouped: tuple[dict[str, str], Any],
        counter: bool,
        ts: int,
        value: float,
        now_ms: int,
        origin: Any = None,
    ) -> None:
        if value != value:
            return
        start = ts - ts % self.interval_ms
        if start < self._flushed_to:
            self.late += 1
            return
        labels, gkey = grouped
        groups = self._windows.setdefault(start, {})
        g = groups.get(gkey)
        if g is None:
            g = groups[gkey] = (name, labels, origin, {})
        last = g[3].get(series_key)
        if last is None or ts >= last[0]:
            g[3][series_key] = (ts, value)

    def due(self, now_ms: int, *, force: bool = False) -> list[Emitted]:
        out = []
        for start in sorted(self._windows):
            end = start + self.interval_ms
            if not force and now_ms < end + self.lateness_ms:
                break
            self._flushed_to = end
            for name, labels, origin, last in self._windows.pop(start).values():
                values = [v for _, v in last.values()]
                out.append(
                    Emitted(name, labels, "gauge", [(end, _apply(self.function, values))], origin)
                )
        return out


def _apply(function: str, values: list[float]) -> float:
    if function == "sum":
        return math.fsum(values)
    if function == "avg":
        return math.fsum(values) / len(values)
    if function == "min":
        return min(values)
    if function == "max":
        return max(values)
    if function == "count":
        return float(len(values))
    if function == "stddev":
        mean = math.fsum(values) / len(values)
        return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return values[-1]  # last


def _strip_states(lim: Limit) -> tuple[AggregateState, _LastValues]:
    """Where a limit's stripped series are re-aggregated: counters by their increases into a
    running total (so the output is a counter that never goes back), gauges by the strip's
    function over each input series' last value; both under the input's name, over
    `strip_interval`."""
    function = "sum"
    for act in [t.act for t in lim.tiers] + ([lim.adaptive] if lim.adaptive else []):
        if act.kind == "strip":
            function = act.function
    name = template("${__name__}")
    counters = Aggregate(
        lim.strip_interval_s, None, (), ("sum",), name, "counter", "counter", False, 600.0
    )
    return AggregateState(counters, _LATENESS_MS), _LastValues(
        lim.strip_interval_s, function, _LATENESS_MS
    )
