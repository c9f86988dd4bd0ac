"""Governance of one pipeline, in the order a request meets it: stats, then limits, then rules.

The receivers call `prw()` or `otlp()` on each decoded request, before the hand-over, with the
tenant their request header named. Stats and limits see what the client attempted; the rules see
what the limits let through. Per distinct remote-write series the facts that stats and limits
need (name, labels, stats group, which limits apply) are worked out once and remembered by the
series' hash, so a known series costs a few C-level list operations.

`run()` is the pipeline's governance task: it emits due windows (rules' downsample and
aggregate, limits' re-aggregation of stripped series), reports dead rules, forgets idle limit
groups and logs groups that stop being limited.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import operator
from array import array
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

import attrs
import numpy as np
import trio
import xxhash
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from service._proto.governor.prw_views_pb2 import (
    LabelsOnlyLabels,
    LabelsOnlySeries,
    MergedWriteRequest,
    SeriesBytes,
)
from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import Label
from service.codec import otlp as otlp_codec
from service.codec import prw as prw_codec
from service.codec.errors import BadProtobuf
from service.governance import otlp as otlp_gov
from service.governance import prw as prw_gov
from service.governance.cardinality import hash_array
from service.governance.engine import RuleEngine, SeriesKey
from service.governance.limits import Decisions, LimitEngine, Series
from service.governance.series_index import SeriesIndex, grown, none_below
from service.governance.stats import Stats
from service.governance.windows import Emitted
from service.telemetry import logs

log = logs.get("governance")
K = TypeVar("K")

NAME = "__name__"
_COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
_INTERN_MAX = 1_000_000
_HELD_MAX = 256  # requests whose series' states are held before they are counted anyway
_WINDOW_BITS = 0xFFFFFFFF  # Facts.state's low bits: a window index, modulo 2^32
_UNSEEN = _WINDOW_BITS  # never a window's index (2^32 - 1 s windows is the year 2106)


@attrs.define(eq=False, slots=True)
class Facts:
    """What stats and limits need of one distinct series, worked out at its first sight."""

    name: str
    pairs: tuple[tuple[str, str], ...]  # its labels but `__name__`, interned
    group: tuple[str, ...] | None  # stats: its values of `stats.labels`
    # stats: (the id of its kind, (name, group), << 32) | the window it was last counted in
    # (its low 32 bits; _UNSEEN before). One int says what to count the series under and
    # whether it is new in the window. Remote write keeps it in an array by slot (the value
    # here is the first one), OTLP here.
    state: int = 0
    limits: int = 0  # LimitEngine.match_id(...) for `generation` (0: no limit applies)
    generation: int = -1
    lseen: tuple[int, str, int] = (-1, "", -1)  # limits: (window, header tenant, generation)

    def labels(self) -> dict[str, str]:
        return dict(self.pairs)


_PAIRS_OF = operator.attrgetter("pairs")
_STATE_OF = operator.attrgetter("state")
_GENERATION_OF = operator.attrgetter("generation")
_LIMITS_OF = operator.attrgetter("limits")
_LSEEN_OF = operator.attrgetter("lseen")


class Governance:
    """Stats, limits and rules of one pipeline."""

    def __init__(
        self,
        *,
        pipeline: str,
        engine: RuleEngine | None = None,
        stats: Stats | None = None,
        limits: LimitEngine | None = None,
        clock_ms: Callable[[], int],
        series_cache: int = 1_000_000,
    ) -> None:
        self.pipeline = pipeline
        self.engine = engine
        self.stats = stats
        self.limits = limits
        self.clock_ms = clock_ms
        self.series_cache = series_cache
        self.facts: dict[int, Facts] = {}  # OTLP series by hash
        # Remote write series: their hashes to slots; by slot, their facts and Facts.state.
        self._index = SeriesIndex()
        self._slot_facts: list[Facts] = []
        self._slot_state = np.zeros(1024, dtype=np.int64)
        self.evictions = 0  # times the facts cache was full and its older half forgotten
        self._warn = logs.RateLimited(log, 60.0)
        self._strings: dict[str, str] = {}
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}
        self._label_pairs: dict[bytes, tuple[str, str]] = {}  # a Label's bytes -> its pair
        # What the facts were worked out for: the stats labels, and whether remote-write
        # series' facts are their name only (basic stats without limits; see _named_facts).
        self._facts_mode: tuple[tuple[str, ...], bool] = ((), False)
        self._named: dict[str, Facts] = {}  # name -> the Facts its series share then
        self._kinds = _Kinds()  # what a Facts.state counts under
        self._marks: dict[int, int] = {}  # kind id -> its state in the window of _mark
        self._mark = -1
        # Remote write series' states, one array a request (with their datapoints when not one
        # each), not yet counted in the stats (see _fold).
        self._held: list[np.ndarray] = []
        self._held_points: list[tuple[np.ndarray, np.ndarray]] = []
        if stats is not None:
            stats.defer(self._fold)

    @property
    def rules_active(self) -> bool:
        return self.engine is not None and self.engine.active

    @property
    def limits_active(self) -> bool:
        return self.limits is not None and self.limits.active

    @property
    def active(self) -> bool:
        return self.stats is not None or self.limits_active or self.rules_active

    @property
    def tenant_header(self) -> str:
        """The request header (gRPC metadata key) that names the tenant; "" without limits."""
        return self.limits.tenancy.header if self.limits_active else ""

    def _check_facts(self) -> None:
        """Facts hold the stats labels' values, and remote-write series' facts hold only their
        name while basic stats alone need them: forget them if either changed."""
        stats = self.stats
        labels = stats.labels if stats is not None else ()
        names_only = stats is not None and not stats.full and not self.limits_active
        if (labels, names_only) != self._facts_mode or len(self._kinds) >= _INTERN_MAX:
            self._forget_facts()
            self._facts_mode = (labels, names_only)

    @property
    def series_cached(self) -> int:
        """Distinct series whose facts are cached (remote write and OTLP)."""
        return len(self._index) + len(self.facts)

    def _forget_facts(self) -> None:
        self._fold()  # the held states name kinds about to be forgotten
        self.facts.clear()
        self._index = SeriesIndex()
        self._slot_facts.clear()
        self._named.clear()
        self._kinds = _Kinds()
        self._marks.clear()

    def _fold(self) -> None:
        """Count the held datapoints in the stats, per name and per group (the stats call it
        before they are read and before their window rolls)."""
        held, weighted = self._held, self._held_points
        if not (held or weighted) or self.stats is None:
            return
        n = len(self._kinds)
        per_kind = np.zeros(n, dtype=np.int64)
        if held:
            per_kind += np.bincount(np.concatenate(held) >> 32, minlength=n)
        if weighted:
            kinds = np.concatenate([st for st, _ in weighted]) >> 32
            points = np.concatenate([p for _, p in weighted])
            per_kind += np.bincount(kinds, weights=points, minlength=n).astype(np.int64)
        held.clear()
        weighted.clear()
        kinds_of = self._kinds.of
        per_name: dict[str, int] = {}
        per_group: dict[tuple[str, ...], int] = {}
        nonzero = np.flatnonzero(per_kind)
        for kid, count in zip(nonzero.tolist(), per_kind[nonzero].tolist(), strict=True):
            name, group = kinds_of[kid]
            per_name[name] = per_name.get(name, 0) + count
            if group is not None:
                per_group[group] = per_group.get(group, 0) + count
        now_s = self.stats.index * self.stats.window_s
        self.stats.count_datapoints(per_name, now_s)
        if per_group:
            self.stats.add_group_datapoints(per_group, now_s)

    # ---- remote write ------------------------------------------------------------------------

    def prw(self, data: bytes, tenant: str = "") -> prw_gov.Governed:
        """Validate a serialized WriteRequest (raises BadProtobuf) and govern it."""
        stats, limits = self.stats, self.limits if self.limits_active else None
        by_series = stats is not None or limits is not None
        samples = framed = None
        if by_series or self.rules_active:
            # Each series' labels, read first: in the usual request, the bytes of each series
            # before its sample (hashed; the keys themselves are sliced where they are read).
            # The rest of the request is validated without them; the labels of series not
            # seen before are checked where they are first read (the series' facts, a rule
            # route), before anything is counted. A key found there to be more than labels
            # (NotLabels) sends the request back to label_keys.
            try:
                got = prw_gov.prefix_series(data)
                if got is None:
                    listed = prw_gov.label_keys(data)
                    series = prw_gov.Prefixed([], hash_array(listed), None, keys=listed)
                else:
                    series = got
                    framed = got.full  # the request is these series and nothing else
            except DecodeError:
                raise BadProtobuf("body is not a valid protobuf WriteRequest") from None
            n = len(series.hashes)
            if series.points is not None:
                # Each series its labels and one sample, read above, once its key is proven
                # to be labels (below, or in the rules): else the request is counted again.
                samples = series.points
                counts = prw_codec.Counts(n, n, 0)
            else:
                counts, samples = prw_codec.count_samples(data, n)
        else:
            counts = prw_codec.count(data)
        now_s = self.clock_ms() / 1000
        removed = 0
        changed = None
        if by_series:
            self._check_facts()
            try:
                try:
                    slots = self._slots_of(series.key, series.hashes)
                except prw_gov.NotLabels:
                    listed, hashes = prw_gov.series_keys(data)
                    series = prw_gov.Prefixed([], hashes, None, keys=listed)
                    counts, samples = prw_codec.count_samples(data, len(listed))
                    framed = None
                    slots = self._slots_of(series.key, series.hashes)
            except DecodeError:  # a new series' labels
                raise BadProtobuf("body is not a valid protobuf WriteRequest") from None
            # Every series its labels and one sample: proven by keys taken before a sample
            # that are all labels (a request of as many samples as series may have two in one
            # series and none in another).
            points = None if framed is not None else _points_per_series(data)
            if stats is not None:
                self._count_prw(stats, slots, series.hashes, points, now_s)
            if limits is not None:
                facts = list(map(self._slot_facts.__getitem__, slots.tolist()))
                ids = series.hashes.tolist()
                decided = self._limit(limits, facts, ids, points, tenant, now_s)
                if decided.changed:
                    changed, removed = self._apply_prw(
                        limits, data, series.key, facts, ids, decided
                    )
            if len(self._index) > self.series_cache:  # one request had more new series
                self._evict_prw(self.series_cache // 2)
        if changed is not None:
            data = changed
            counts_after = prw_codec.count(data)
            samples = framed = None
        else:
            counts_after = counts
        if self.rules_active:
            assert self.engine is not None
            keys = series if changed is None else None
            g = prw_gov.govern(self.engine, data, counts_after, keys, samples, framed)
            if changed is not None and g.data is None:
                g = attrs.evolve(g, data=data)
            # Unless the limits rewrote it, govern counted the request itself: exactly, also
            # when it found a key taken before a sample to be more than labels.
            if changed is None:
                return g
            return attrs.evolve(
                g,
                removed=g.removed + removed,
                in_samples=counts.samples,
                in_histograms=counts.histograms,
            )
        return prw_gov.Governed(
            changed,
            counts_after.series,
            counts_after.datapoints,
            counts_after.samples,
            counts_after.histograms,
            removed,
            counts.samples,
            counts.histograms,
        )

    def _slots_of(self, key_of: Callable[[int], bytes], hashes: np.ndarray) -> np.ndarray:
        """The slot of each series of a request (the i-th's key: key_of(i)); a series seen
        for the first time gets its facts worked out and a new slot."""
        index = self._index
        slots = index.lookup(hashes)
        if none_below(slots, 0):
            return slots
        missing = np.flatnonzero(slots < 0)
        if len(index) + missing.size > self.series_cache and len(index):
            # Room for the request's new series: the older half goes, or more if need be (a
            # request's series all get a slot; prw() trims the cache after the request).
            self._evict_prw(max(0, min(len(index) // 2, self.series_cache - missing.size)))
            slots = index.lookup(hashes)
            missing = np.flatnonzero(slots < 0)
        # New series get the next slots, in the order of their first place in the request.
        new_hashes, first = index.unseen(hashes, slots)
        facts = [self._new_facts_prw(key_of(i)) for i in first.tolist()]
        new_slots = index.add_many(new_hashes)
        self._slot_facts += facts
        self._slot_state = grown(self._slot_state, len(index))
        self._slot_state[new_slots] = list(map(_STATE_OF, facts))
        slots[missing] = index.lookup(hashes[missing])
        return slots

    def _evict_prw(self, keep: int) -> None:
        """Forget all but the `keep` newest remote-write series (the slots move down)."""
        cut = self._index.keep_newest(keep)
        del self._slot_facts[:cut]
        kept = len(self._index)
        self._slot_state[:kept] = self._slot_state[cut : cut + kept].copy()
        self._evicted()

    def _evict(self) -> None:
        """Make room in the facts cache: forget the older half of it (dicts keep insertion
        order), and say so. A series forgotten while active is worked out again at its next
        sight, and counts again in the stats' label values of the window."""
        cache = self.facts
        for key in list(itertools.islice(cache, len(cache) // 2 or 1)):
            del cache[key]
        self._evicted()

    def _evicted(self) -> None:
        self.evictions += 1
        self._warn.warning(
            "series_cache",
            "the series cache is full: stats and limits work out series afresh; raise "
            "limits.series_cache above the active series",
            pipeline=self.pipeline,
            series_cache=self.series_cache,
        )

    def _intern(self, s: str) -> str:
        got = self._strings.get(s)
        if got is None:
            if len(self._strings) >= _INTERN_MAX:
                self._strings.clear()
                self._pairs.clear()
            got = self._strings[s] = s
        return got

    def _pair(self, k: str, v: str) -> tuple[str, str]:
        pair = (k, v)
        got = self._pairs.get(pair)
        if got is None:
            got = self._pairs[pair] = (self._intern(k), self._intern(v))
        return got

    def _new_facts(self, name: str, pairs: tuple[tuple[str, str], ...]) -> Facts:
        name = self._intern(name)
        group = None
        if self.stats is not None and self.stats.labels:
            labels = dict(pairs)
            group = tuple(self._intern(labels.get(k, "")) for k in self.stats.labels)
        kinds = self._kinds
        kid = kinds.id_of(name, group)
        return Facts(name, pairs, kinds.of[kid][1], kinds.unseen[kid])

    def _window_mark(self, stats: Stats, now_s: float) -> int:
        """Roll the stats to `now_s`; the mark of its window (for Facts.state)."""
        mark = stats.roll(now_s) & _WINDOW_BITS
        if mark != self._mark:
            self._marks.clear()
            self._mark = mark
        return mark

    def _marked(self, f: Facts, mark: int) -> bool:
        """Mark a series counted in the window `mark` (its index & _WINDOW_BITS); False if it
        already was. The marked states are shared ints, one per kind and window."""
        st = f.state
        if st & _WINDOW_BITS == mark:
            return False
        kid = st >> 32
        new = self._marks.get(kid)
        if new is None:
            new = self._marks[kid] = (kid << 32) | mark
        f.state = new
        return True

    def _new_facts_prw(self, key: bytes) -> Facts:
        """A series' facts from its serialized labels. Each label's bytes recur across series
        (a job, a namespace): they are read once, then found by those bytes. Raises NotLabels
        for a key that is not only labels (see prw_gov.prefix_label_keys), DecodeError for
        labels that do not parse."""
        prw_gov.check_labels(key)
        if self._facts_mode[1]:
            return self._named_facts(key)
        entries = LabelsOnlySeries.FromString(key).labels
        known = list(map(self._label_pairs.get, entries))
        if None in known:
            known = [p or self._label_pair(b) for p, b in zip(known, entries, strict=True)]
        name = ""
        pairs = []
        for pair in cast(list[tuple[str, str]], known):
            if pair[0] == NAME:
                name = pair[1]
            else:
                pairs.append(pair)
        return self._new_facts(name, tuple(sorted(pairs)))

    def _named_facts(self, key: bytes) -> Facts:
        """A series' facts when basic stats alone need them: it counts under its name, and
        the series of a name share one Facts, so a series costs the cache a slot and a
        pointer (~50 bytes) instead of its labels."""
        name = ""
        for lb in LabelsOnlyLabels.FromString(key).labels:  # parsing validates every label
            if lb.name == NAME:
                name = lb.value
        f = self._named.get(name)
        if f is None:
            name = self._intern(name)
            kid = self._kinds.id_of(name, None)
            f = self._named[name] = Facts(name, (), None, self._kinds.unseen[kid])
        return f

    def _label_pair(self, entry: bytes) -> tuple[str, str]:
        if len(self._label_pairs) >= _INTERN_MAX:
            self._label_pairs.clear()
        lb = Label.FromString(entry)
        pair = self._label_pairs[entry] = self._pair(lb.name, lb.value)
        return pair

    def _count_prw(
        self,
        stats: Stats,
        slots: np.ndarray,
        hashes: np.ndarray,
        points: list[int] | None,
        now_s: float,
    ) -> None:
        mark = self._window_mark(stats, now_s)
        # The series' states are held, an array a request, and counted per name and group when
        # the stats are read (_fold): a request costs no Python step per series or per kind.
        states = self._slot_state[slots]
        if points is None:
            self._held.append(states)
        else:
            self._held_points.append((states, np.array(points, dtype=np.int64)))
        if len(self._held) + len(self._held_points) >= _HELD_MAX:
            self._fold()
        if not stats.full:
            return
        fresh = (states & _WINDOW_BITS) != mark
        if not fresh.any():
            return
        # Series are added to the trackers once per window: at their first sight in it.
        at = np.flatnonzero(fresh)
        fresh_slots, first = np.unique(slots[at], return_index=True)  # a slot once
        at = at[first]
        kinds = states[at] >> 32
        self._slot_state[fresh_slots] = (kinds << 32) | mark
        fresh_hashes = hashes[at]
        slot_facts = self._slot_facts
        for nid, pos in _positions_of(self._kinds.name_ids(kinds)):
            name = self._kinds.names[nid]
            stats.add_series(name, fresh_hashes[pos], now_s)
            # Every label pair of the metric's new series, counted in C.
            of_name = map(slot_facts.__getitem__, fresh_slots[pos].tolist())
            stats.add_label_values(
                name, collections.Counter(itertools.chain.from_iterable(map(_PAIRS_OF, of_name)))
            )
        if stats.labels:
            for gid, pos in _positions_of(self._kinds.group_ids(kinds)):
                if gid >= 0:
                    stats.add_group_series(self._kinds.groups[gid], fresh_hashes[pos], now_s)

    def _limit(
        self,
        limits: LimitEngine,
        facts: list[Facts],
        ids: list[int],
        points: list[int] | None,
        tenant: str,
        now_s: float,
        resources: list[dict[str, str] | None] | None = None,
    ) -> Decisions:
        """The limits' decisions for a request's series. Per series only C-level list work,
        but at a series' first sight after a limits change (which limits it falls under)."""
        gen = limits.generation
        n = len(facts)
        for i in itertools.compress(range(n), map(gen.__ne__, map(_GENERATION_OF, facts))):
            f = facts[i]
            resource = resources[i] if resources is not None else None
            f.limits = limits.match_id(f.name, f.labels(), resource)
            f.generation = gen
        if gen != limits.generation:  # the match table filled up and started again
            return self._limit(limits, facts, ids, points, tenant, now_s, resources)
        mids = list(map(_LIMITS_OF, facts))
        buckets = _positions_by(mids)
        buckets.pop(0, None)
        if not buckets:
            return Decisions()
        # Series not added yet in this window, for this request's tenant (it chooses the
        # groups) and these limits: only those go into the trackers.
        mark = (int(now_s // limits.window_s), tenant, limits.generation)
        fresh = set(itertools.compress(range(n), map(mark.__ne__, map(_LSEEN_OF, facts))))
        for i in fresh:
            facts[i].lseen = mark
        series = Series(ids, facts, points)
        return limits.decide(series, buckets, now_s, tenant=tenant, fresh=fresh)

    def _apply_prw(
        self,
        limits: LimitEngine,
        data: bytes,
        key_of: Callable[[int], bytes],
        facts: list[Facts],
        ids: list[int],
        d: Decisions,
    ) -> tuple[bytes, int]:
        """The request without the series the limits took out, the stripped ones
        re-aggregated, the annotated ones relabeled. Returns (data, datapoints removed)."""
        src = SeriesBytes.FromString(data)
        full = list(src.timeseries)
        out = []
        removed = 0
        now_ms = self.clock_ms()
        for i, series in enumerate(full):
            if i in d.drop:
                continue
            stripped = d.strip.get(i)
            if stripped is not None:
                ts = prw_codec.TimeSeries.FromString(series)
                if not ts.histograms:
                    lim, labels = stripped
                    f = facts[i]
                    counter = f.name.endswith(_COUNTER_SUFFIXES)
                    state = limits.strip_state(lim, counter)
                    key = SeriesKey((ids[i],))
                    grouped = state.group_of(f.name, labels)
                    for s in ts.samples:
                        state.add_one(key, f.name, grouped, counter, s.timestamp, s.value, now_ms)
                    removed += len(ts.samples)
                    continue
            rule = d.annotate.get(i)
            old = key_of(i) if rule is not None else b""
            if rule is not None and series.startswith(old):
                f = facts[i]
                labels = {**f.labels(), LimitEngine.ANNOTATION: rule}
                series = prw_gov.labels_wire(f.name, labels) + series[len(old) :]
            out.append(series)
        merged = MergedWriteRequest.FromString(
            prw_codec.frame([full[i] for i in d.drop])
        ).timeseries
        removed += len(merged.samples) + len(merged.histograms)
        new = prw_codec.frame(out, src.metadata)
        return new, removed

    # ---- OTLP --------------------------------------------------------------------------------

    def otlp(self, admitted: otlp_codec.Admitted, tenant: str = "") -> otlp_codec.Admitted:
        """Govern a decoded OTLP request: stats, limits (what they refuse is reported back as
        partial success), then the rules."""
        req = admitted.request
        if req is None:
            return admitted
        stats, limits = self.stats, self.limits if self.limits_active else None
        now_s = self.clock_ms() / 1000
        if stats is not None or limits is not None:
            self._check_facts()
            rejected, changed = self._govern_otlp(req, stats, limits, tenant, now_s)
            if changed:
                points, metrics = otlp_codec.count(req)
                admitted = attrs.evolve(
                    admitted, data=req.SerializeToString(), datapoints=points, metrics=metrics
                )
            if rejected:
                message = f"{rejected} data points refused by limits"
                if admitted.message:
                    message = f"{admitted.message}; {message}"
                admitted = attrs.evolve(
                    admitted,
                    rejected=admitted.rejected + rejected,
                    message=message,
                    limited=admitted.limited + rejected,
                )
        if self.rules_active:
            assert self.engine is not None
            admitted = otlp_gov.apply(self.engine, admitted)
        return admitted

    def _govern_otlp(
        self,
        req: ExportMetricsServiceRequest,
        stats: Stats | None,
        limits: LimitEngine | None,
        tenant: str,
        now_s: float,
    ) -> tuple[int, bool]:
        per_name: dict[str, int] = {}
        full = stats is not None and stats.full
        per_dp = full or limits is not None
        entries: list[tuple[Any, ...]] = []  # (metric, field, dp, resource, facts, id)
        for rm in req.resource_metrics:
            resource: dict[str, str] | None = None
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    field = m.WhichOneof("data")
                    if field is None:
                        continue
                    dps = getattr(m, field).data_points
                    per_name[m.name] = per_name.get(m.name, 0) + len(dps)
                    if not per_dp:
                        continue
                    if resource is None:
                        resource = otlp_gov.attrs_dict(rm.resource.attributes)
                        rkey = "\x00".join(f"{k}\x01{v}" for k, v in sorted(resource.items()))
                    for dp in dps:
                        pairs = tuple(
                            sorted(
                                self._pair(kv.key, otlp_gov.any_str(kv.value))
                                for kv in dp.attributes
                            )
                        )
                        text = "\x00".join([m.name, *(f"{k}\x01{v}" for k, v in pairs), rkey])
                        h = xxhash.xxh3_64_intdigest(text.encode())
                        f = self.facts.get(h)
                        if f is None:
                            if len(self.facts) >= self.series_cache:
                                self._evict()
                            f = self.facts[h] = self._new_facts(m.name, pairs)
                        entries.append((m, field, dp, resource, f, h))
        if stats is not None:
            stats.add_datapoints(per_name, now_s)
            if full:
                self._count_entries(stats, entries, now_s)
        if limits is None or not entries:
            return 0, False
        facts = [e[4] for e in entries]
        ids = [e[5] for e in entries]
        resources = [e[3] for e in entries]
        d = self._limit(limits, facts, ids, None, tenant, now_s, resources)
        if not d.changed:
            return 0, False
        drop = {id(entries[i][2]) for i in d.drop}
        strip = {id(entries[i][2]): (entries[i], v) for i, v in d.strip.items()}
        annotate = {id(entries[i][2]): v for i, v in d.annotate.items()}
        now_ms = self.clock_ms()
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                emptied = False
                for m in sm.metrics:
                    field = m.WhichOneof("data")
                    if field is None:
                        continue
                    dps = getattr(m, field).data_points
                    keep = []
                    touched = False
                    for dp in dps:
                        key = id(dp)
                        if key in drop:
                            touched = True
                            continue
                        s = strip.get(key)
                        if s is not None and field in ("gauge", "sum"):
                            (_m, _f, _dp, resource, _facts, h), (lim, labels) = s
                            origin = otlp_gov.origin_of(rm, sm, m, resource)
                            self._strip_otlp(limits, lim, m, field, dp, h, labels, origin, now_ms)
                            touched = True
                            continue
                        rule = annotate.get(key)
                        if rule is not None:
                            dp.attributes.append(
                                KeyValue(
                                    key=LimitEngine.ANNOTATION, value=AnyValue(string_value=rule)
                                )
                            )
                        keep.append(dp)
                    if touched:
                        del dps[:]
                        dps.extend(keep)
                        emptied = emptied or not keep
                if emptied:
                    kept = [m for m in sm.metrics if otlp_codec.metric_points(m)]
                    del sm.metrics[:]
                    sm.metrics.extend(kept)
        return d.rejected, True

    def _strip_otlp(
        self,
        limits: LimitEngine,
        lim: Any,
        m: Any,
        field: str,
        dp: Any,
        h: int,
        labels: dict[str, str],
        origin: otlp_gov.Origin,
        now_ms: int,
    ) -> None:
        counter = otlp_gov.metric_kind(m, field) == "counter"
        state = limits.strip_state(lim, counter)
        grouped = state.group_of(m.name, labels, origin)
        v = dp.as_double if dp.WhichOneof("value") == "as_double" else float(dp.as_int)
        state.add_one(
            SeriesKey((h,)),
            m.name,
            grouped,
            counter,
            dp.time_unix_nano // 1_000_000,
            v,
            now_ms,
            origin,
        )

    def _count_entries(self, stats: Stats, entries: list[tuple[Any, ...]], now_s: float) -> None:
        mark = self._window_mark(stats, now_s)
        per_group: dict[tuple[str, ...], int] = {}
        by_name: dict[str, list[int]] = {}
        by_group: dict[tuple[str, ...], list[int]] = {}
        for *_, f, h in entries:
            if f.group is not None:
                per_group[f.group] = per_group.get(f.group, 0) + 1
            if not self._marked(f, mark):
                continue
            by_name.setdefault(f.name, []).append(h)
            stats.add_label_values(f.name, collections.Counter(f.pairs))
            if f.group is not None:
                by_group.setdefault(f.group, []).append(h)
        if per_group:
            stats.add_group_datapoints(per_group, now_s)
        for name, hashes in by_name.items():
            stats.add_series(name, hashes, now_s)
        for gk, hashes in by_group.items():
            stats.add_group_series(gk, hashes, now_s)

    # ---- the governance task -----------------------------------------------------------------

    def due(self, *, force: bool = False) -> list[Emitted]:
        out: list[Emitted] = []
        if self.engine is not None:
            out += self.engine.due(force=force)
        if self.limits is not None:
            out += self.limits.due(self.clock_ms(), force=force)
        return out

    async def run(
        self,
        emit: Callable[[list[Emitted]], Awaitable[None]],
        stop: trio.Event,
        *,
        tick_s: float = 0.5,
    ) -> None:
        """Every `tick_s` until `stop`: emit due windows, report dead rules, tidy the limits'
        groups and roll the stats' window; at `stop`, emit every open window."""
        while not stop.is_set():
            with trio.move_on_after(tick_s):
                await stop.wait()
            due = self.due()
            if due:
                await emit(due)
            now_s = self.clock_ms() / 1000
            if self.engine is not None:
                self.engine.report_dead()
            if self.limits is not None:
                self.limits.prune(now_s)
            if self.stats is not None:
                self.stats.roll(now_s)
        rest = self.due(force=True)
        if rest:
            await emit(rest)


class _Kinds:
    """What a series counts under in the stats, its kind: (name, stats group), by a small int
    id (the high bits of Facts.state). By kind, the ids of its name and of its group (-1: none)
    are kept as arrays too, so a request's series are grouped by name or by group with array
    operations."""

    def __init__(self) -> None:
        self.of: list[tuple[str, tuple[str, ...] | None]] = []  # by kind id
        self.unseen: list[int] = []  # by kind id: its Facts.state before a first count
        self.names: list[str] = []
        self.groups: list[tuple[str, ...]] = []
        self._ids: dict[tuple[str, tuple[str, ...] | None], int] = {}
        self._name_ids: dict[str, int] = {}
        self._group_ids: dict[tuple[str, ...], int] = {}
        self._name_of = array("q")
        self._group_of = array("q")

    def __len__(self) -> int:
        return len(self.of)

    def id_of(self, name: str, group: tuple[str, ...] | None) -> int:
        kid = self._ids.get((name, group))
        if kid is not None:
            return kid
        kid = self._ids[(name, group)] = len(self.of)
        nid = self._name_ids.get(name)
        if nid is None:
            nid = self._name_ids[name] = len(self.names)
            self.names.append(name)
        gid = -1
        if group is not None:
            gid = self._group_ids.get(group, -1)
            if gid < 0:
                gid = self._group_ids[group] = len(self.groups)
                self.groups.append(group)
            group = self.groups[gid]  # one tuple for every series of the group
        self.of.append((name, group))
        self._name_of.append(nid)
        self._group_of.append(gid)
        self.unseen.append((kid << 32) | _UNSEEN)  # one int for all its series
        return kid

    def name_ids(self, kinds: np.ndarray) -> np.ndarray:
        return np.frombuffer(self._name_of, dtype=np.int64)[kinds]

    def group_ids(self, kinds: np.ndarray) -> np.ndarray:
        return np.frombuffer(self._group_of, dtype=np.int64)[kinds]


def _positions_of(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Each distinct key of an int array with its positions, in order: one stable sort."""
    if not keys.size:
        return
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    bounds = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist(), keys.size]
    for start, end in itertools.pairwise(bounds):
        yield int(ordered[start]), order[start:end]


def _positions_by(keys: list[K]) -> dict[K, list[int]]:
    """Positions of each distinct key, in order, with C-level work: a stable sort of the
    positions by key, then one slice per distinct key."""
    if not keys:
        return {}
    first = keys[0]
    n = len(keys)
    if keys.count(first) == n:
        return {first: list(range(n))}
    order = sorted(range(n), key=keys.__getitem__)
    ordered = list(map(keys.__getitem__, order))
    out = {}
    for k in set(keys):
        out[k] = order[bisect.bisect_left(ordered, k) : bisect.bisect_right(ordered, k)]
    return out


def _points_per_series(data: bytes) -> list[int]:
    try:
        req = WriteRequest.FromString(data)
    except Exception:
        raise BadProtobuf("body is not a valid protobuf WriteRequest") from None
    return [len(ts.samples) + len(ts.histograms) for ts in req.timeseries]
