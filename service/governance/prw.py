"""The rule engine on remote write: runs the rules over a WriteRequest's series and builds what
comes out; encodes emitted windows as a WriteRequest.

Requests of one sample per series take the cached path (RouteTable): each distinct series'
way through the rules is decided once, and a request's series are then treated with array
operations a request at a time. A request that no rule changed is forwarded as the client sent
it.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import numpy as np
from google.protobuf.message import DecodeError as _PBDecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from service._proto.governor.prw_views_pb2 import (
    LabelsOnlyLabels,
    LabelsOnlyRequest,
    LabelsOnlySeries,
    MergedWriteRequest,
    SeriesBytes,
)
from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import Label, Sample, TimeSeries
from service.codec import prw as prw_codec
from service.codec.compression import varint
from service.codec.errors import BadProtobuf
from service.governance.cardinality import hash_array, hash_cut
from service.governance.engine import PASS_ROUTE, RuleEngine, SeriesKey
from service.governance.rules import Rule
from service.governance.series_index import (
    SeriesIndex,
    all_of,
    any_of,
    grown,
    none_below,
    positions,
)
from service.governance.window_columns import (
    AggregateColumns,
    DownsampleColumns,
    columns_fit,
    rounds,
)
from service.governance.windows import AggregateState, Emitted

NAME = "__name__"
_COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


@attrs.frozen
class Governed:
    """A request after the rules: `data` is None when nothing changed (forward the original)."""

    data: bytes | None
    series: int
    datapoints: int
    samples: int
    histograms: int
    removed: int  # datapoints dropped or sampled away, or absorbed into windows
    in_samples: int  # what the client sent
    in_histograms: int


def series_name(ts: TimeSeries) -> str:
    labels = ts.labels
    if labels and labels[0].name == NAME:  # Prometheus sorts labels: __name__ comes first
        return labels[0].value
    for label in labels:
        if label.name == NAME:
            return label.value
    return ""


def govern(
    engine: RuleEngine,
    data: bytes,
    counts: prw_codec.Counts | None = None,
    series: Prefixed | None = None,
    samples: Any = None,
    framed: list[bytes] | None = None,
) -> Governed:
    """Validate a serialized WriteRequest (raises BadProtobuf) and run the rules over it.
    `counts` (prw_codec.count) when the caller has them already, for the same `data`; or
    `counts` and `samples` (prefix_series' points, or prw_codec.count_samples'), with `series`
    (what `prefix_series` gave: the keys' hashes, the keys where read) and `framed` (each
    series' bytes): then
    the labels of series new to the route cache are validated here, before anything is
    counted (counts taken from the points hold only once they are). Without `framed`, the keys
    are taken here when they can be.

    Requests of single-sample float series (what Prometheus sends) take the cached path: each
    distinct series' route through the rules is decided once and found again by its serialized
    labels, so a known series costs a share of a request's array operations. Anything else
    (native histograms, several samples in a series) is evaluated series by series."""
    if counts is None:
        counts = prw_codec.count(data)
    if not counts.histograms and counts.samples == counts.series:
        if framed is None or series is None:
            series = prefix_series(data)
            if series is None:  # not every series its labels and one sample
                return govern_each(engine, data)
            framed = series.full
            samples = series.points
        try:
            return _govern_cached(engine, data, series, samples, framed)
        except NotLabels:  # a key taken before a sample is more than labels: not one sample each
            pass
        except _PBDecodeError:  # a new series' labels
            raise BadProtobuf("body is not a valid protobuf WriteRequest") from None
    return govern_each(engine, data)


# What the cached path does with a series, decided once per distinct series. WINDOW: folded
# into a window kept as columns (window_columns); SAMPLED: sampled per datapoint (head or
# probabilistic); both a request at a time. DYNAMIC: any other series that needs a step of its
# own per request (the other windows, aggregates that keep their input).
KEEP, RELABEL, DROP, DYNAMIC, WINDOW, SAMPLED = 0, 1, 2, 3, 4, 5


@attrs.frozen(eq=False, slots=True)
class _Dynamic:
    """What a series sampled per request or folded into windows needs each time."""

    terminal: Rule
    name: str
    kind: str
    key: SeriesKey | None
    labels: dict[str, str]  # after the rules (`__name__` aside)
    wire: bytes  # the series' labels as serialized after the rules (window outputs reuse them)
    state: Any = None  # a windowed rule's state (a reload empties the cache, so it stays right)
    counter: bool = False  # aggregate: the series is a counter
    grouped: Any = None  # aggregate: (kept labels, group key)


@attrs.frozen(eq=False, slots=True)
class _Path:
    """The rules a series passes; one object per distinct path (hashed by identity)."""

    transforms: tuple[str, ...]
    terminal: Rule | None
    hash_keep: bool


@attrs.frozen(eq=False, slots=True)
class _Cached:
    """A series' treatment. Series that need nothing of their own (passed on as they are, or
    dropped) share one object per path, so the cache costs little more than its keys."""

    disposition: int  # KEEP, RELABEL, DROP, DYNAMIC, WINDOW or SAMPLED
    # The rules the series passes, shared by every series with the same ones: requests are
    # counted per path, not per series.
    path: _Path | None
    relabeled: bytes | None = None  # the serialized labels the rules leave, when they change
    dynamic: _Dynamic | None = None


_PASS = _Cached(KEEP, None)


def _route(engine: RuleEngine, key: bytes) -> _Cached:
    """How the rules treat a series first seen, from its serialized labels. Raises NotLabels
    for a key that is not only labels (see prefix_series), DecodeError for labels that do
    not parse (not UTF-8)."""
    check_labels(key)
    labels = {}
    name = ""
    for lb in LabelsOnlyLabels.FromString(key).labels:
        if lb.name == NAME:
            name = lb.value
        else:
            labels[lb.name] = lb.value
    kind = "counter" if name.endswith(_COUNTER_SUFFIXES) else "gauge"
    route = engine.route(name, labels, kind)
    if route is PASS_ROUTE:
        return _PASS
    final = route.labels if route.labels is not None else labels
    relabeled = None
    if route.labels is not None or route.name != name:
        relabeled = labels_wire(route.name, final)
    t = route.terminal
    ident = (route.transforms, id(t), route.hash_keep)  # rules hash deeply: key by identity
    path = engine.route_paths.get(ident)
    if path is None:
        path = engine.route_paths[ident] = _Path(route.transforms, t, route.hash_keep)
    if t is None or (t.action == "sample" and t.settings.method == "hash"):
        if t is not None and not route.hash_keep:
            disposition = DROP
        else:
            disposition = RELABEL if relabeled is not None else KEEP
    elif t.action == "drop":
        disposition = DROP
    else:
        dynamic = _Dynamic(t, route.name, route.kind, route.key, final, relabeled or key)
        if t.action == "sample":
            return _Cached(SAMPLED, path, relabeled, dynamic)
        if t.action in ("downsample", "aggregate"):
            state = engine.state_of(t.name)
            counter = t.action == "aggregate" and (
                t.settings.input_kind == "counter"
                or (t.settings.input_kind == "auto" and route.kind == "counter")
            )
            grouped = state.group_of(route.name, final) if t.action == "aggregate" else None
            dynamic = attrs.evolve(dynamic, state=state, counter=counter, grouped=grouped)
            keep_input = t.action == "aggregate" and t.settings.keep_input
            if columns_fit(state) and not keep_input:
                return _Cached(WINDOW, path, relabeled, dynamic)
        return _Cached(DYNAMIC, path, relabeled, dynamic)
    if disposition == RELABEL:
        return _Cached(RELABEL, path, relabeled)
    shared = engine.route_paths.get((disposition, id(path)))
    if shared is None:
        shared = engine.route_paths[(disposition, id(path))] = _Cached(disposition, path)
    return shared


def series_keys(data: bytes) -> tuple[list[bytes], np.ndarray]:
    """Each series' serialized labels and their hash (`series_hash`, as a uint64 array), in the
    request's order: upb parses a labels-only view and serializes it back without the samples,
    all in C."""
    keys = label_keys(data)
    return keys, hash_array(keys)


def label_keys(data: bytes) -> list[bytes]:
    """Each series' serialized labels (see series_keys)."""
    view = LabelsOnlyRequest.FromString(data)
    view.DiscardUnknownFields()
    return list(SeriesBytes.FromString(view.SerializeToString()).timeseries)


class NotLabels(Exception):
    """A key taken from a series' bytes by `prefix_series` is not that series' labels."""


# The sizes a Sample's serialization can have, the commonest first: a value (9 bytes, none
# for 0.0) and a timestamp (1 + 1..10 bytes, none for 0; 6 bytes of varint from 1971 to 2109).
_SAMPLE_SIZES = (16, 7, 9, 0, 17, 15, 18, 14, 19, 13, 20, 12, 11, 10, 8, 6, 5, 4, 3, 2)


# A Sample's layout as protobuf writes it: a mask and the bytes expected under it, whether it
# has a value, and where its timestamp's varint starts (its size if it has none).
_Layout = tuple[np.ndarray, np.ndarray, bool, int]


class Points:
    """A request's samples, one a series, in the series' order: either decoded already, or the
    bytes of each series' sample field (rows of one size and layout, end to end in `tails`),
    decoded when first read, and then only the rows read (stats and limits only count them)."""

    __slots__ = ("_block", "_layout", "_tails", "_timestamps", "_values")

    def __init__(
        self,
        timestamps: np.ndarray | None = None,
        values: np.ndarray | None = None,
        *,
        tails: bytes = b"",
        layout: _Layout | None = None,
    ) -> None:
        self._timestamps = timestamps  # int64, ms
        self._values = values  # float64
        self._tails = tails  # each series' sample field, its tag and length first
        self._layout = layout
        self._block: np.ndarray | None = None  # (series, size) uint8: each Sample's bytes

    def at(self, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        """The timestamps and values of the samples of series `rows` (an index array)."""
        if self._timestamps is None:
            assert self._layout is not None
            return _decode(self._samples()[rows], self._layout)
        assert self._values is not None
        return self._timestamps[rows], self._values[rows]

    def _samples(self) -> np.ndarray:
        if self._block is None:
            assert self._layout is not None
            width = 2 + self._layout[0].size
            self._block = np.frombuffer(self._tails, dtype=np.uint8).reshape(-1, width)[:, 2:]
        return self._block

    def _decoded(self) -> tuple[np.ndarray, np.ndarray]:
        if self._timestamps is None:
            assert self._layout is not None
            self._timestamps, self._values = _decode(self._samples(), self._layout)
        assert self._values is not None
        return self._timestamps, self._values

    @property
    def timestamps(self) -> np.ndarray:
        return self._decoded()[0]

    @property
    def values(self) -> np.ndarray:
        return self._decoded()[1]


class Prefixed:
    """What prefix_series reads of the usual request: each series' bytes (`full`), the hash of
    its key (`hashes`: `series_hash` of its bytes before its sample, its labels once checked)
    and its sample. The keys themselves are sliced from the series when asked for."""

    __slots__ = ("_keys", "_tail", "full", "hashes", "points")

    def __init__(
        self,
        full: list[bytes],
        hashes: np.ndarray,
        points: Points | None,
        *,
        tail: int = 0,
        keys: list[bytes] | None = None,
    ) -> None:
        self.full = full
        self.hashes = hashes
        # The samples, when each is in a layout read here (else None: the caller validates
        # the samples and reads them with prw_codec.count_samples).
        self.points = points
        self._tail = tail  # a series' key is its bytes but the last `tail` (its sample), or
        self._keys = keys  # the keys are given

    def key(self, i: int) -> bytes:
        """Series i's key."""
        if self._keys is not None:
            return self._keys[i]
        return self.full[i][_CUT_TAIL[self._tail]]

    @property
    def keys(self) -> list[bytes]:
        """Every series' key, in order."""
        if self._keys is None:
            cut = itertools.repeat(_CUT_TAIL[self._tail])
            self._keys = list(map(operator.getitem, self.full, cut))
        return self._keys

    def rests(self, where: list[int]) -> Iterator[bytes]:
        """The bytes after the keys of series `where` (`full` given), in that order."""
        series = map(self.full.__getitem__, where)
        if self._keys is None:
            return map(operator.getitem, series, itertools.repeat(_LAST[self._tail]))
        return map(bytes.removeprefix, series, map(self._keys.__getitem__, where))


def prefix_series(data: bytes) -> Prefixed | None:
    """`label_keys` for the usual request, taken without a serialization, with the samples: a
    request made only of series, each its labels followed by one sample. Then a series'
    labels are its bytes but the last field, whose tag (a sample's) and length are checked.
    None for a request with metadata or fields of no series, or with a series that does not
    end with a sample (an exemplar, a histogram). The keys are hashed, then sliced again only
    where they are read (a series not seen before; the bytes after a relabeled series' key).
    Raises DecodeError for a body that is not a WriteRequest of series' bytes.

    What that leaves unproven is whether the bytes before the last sample are only labels: a
    series of two samples, or a label whose value ends like a sample's field, would give a key
    that is not its labels. So the key of a series not seen before must pass `check_labels`
    (which raises NotLabels); a key that passed once is the same bytes at its next sight, and
    then the series' fields can only be those labels and one sample. The points read here are
    those samples only once that is proven: until then a caller must not count them.

    The usual request, every sample of one size and layout, is read in a few C-level passes
    over the series and no NumPy call: a request's work starts with the CPU's caches cold
    (governor idles between requests), where each NumPy call costs several µs and each pass
    that writes a copy of the request touches memory no cache holds."""
    request = SeriesBytes.FromString(data)
    full = list(request.timeseries)
    n = len(full)
    if not n or request.metadata or len(UnknownFieldSet(request)):
        return None
    tail = _tail_of(full[0])
    # The first series' sample layout (from its first byte; an empty sample, size 0, has none
    # here): the checks its sample field passes.
    checks = _tail_checks(tail, full[0][2 - tail]) if tail else None
    if checks is not None:
        # The last `tail` bytes of every series, end to end: all a sample field of the first
        # series' size and layout?
        tails = b"".join(map(operator.getitem, full, itertools.repeat(_LAST[tail])))
        if len(tails) == n * tail and _tails_pass(tails, tail, n, checks):
            points = Points(tails=tails, layout=checks[2])
            return Prefixed(full, hash_cut(full, _CUT_TAIL[tail]), points, tail=tail)
    # Each series is framed by its tag and its length (a varint); framed in the fewest bytes,
    # the frames add up to the request, and each series' place in it is known.
    lengths = list(map(len, full))
    shortest, longest = min(lengths), max(lengths)
    if longest < 1 << 7:
        heads = 2 * n
    elif shortest >= 1 << 7 and longest < 1 << 14:
        heads = 3 * n
    else:
        heads = int(_frame_heads(np.array(lengths, dtype=np.int64)).sum())
    if sum(lengths) + heads != len(data):
        return None
    return _prefix_mixed(data, full, np.array(lengths, dtype=np.int64))


# A byte's high bit, as a byte (bytes.translate): a varint's bytes but its last have it.
_HIGH_BIT = bytes(b >> 7 for b in range(256))
# Per (sample field size, first byte of its Sample): the byte expected at each fixed place of
# the field (its tag and length included), the varint's places that go on (high bit 1) or end
# (0), and the Sample's layout.
_TailChecks = tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...], _Layout]
_TAIL_CHECKS: dict[tuple[int, int], _TailChecks | None] = {}


def _tail_checks(tail: int, tag: int) -> _TailChecks | None:
    """The checks of a sample field of `tail` bytes whose Sample starts with `tag`, from its
    framed layout; None where no layout is read here."""
    key = (tail, tag)
    if key not in _TAIL_CHECKS:
        framed = _framed_layout(tail - 2, tag)
        got = None
        if framed is not None:
            mask, expect = framed[0].tolist(), framed[1].tolist()
            exact = tuple((p, e) for p, (m, e) in enumerate(zip(mask, expect)) if m == 0xFF)
            high = tuple((p, e >> 7) for p, (m, e) in enumerate(zip(mask, expect)) if m == 0x80)
            got = (exact, high, framed[2])
        _TAIL_CHECKS[key] = got
    return _TAIL_CHECKS[key]


def _tails_pass(tails: bytes, tail: int, n: int, checks: _TailChecks) -> bool:
    """Whether each of the `n` rows of `tail` bytes (end to end in `tails`) passes `checks`:
    one column of the rows (a strided slice) at a time, each a C-level count."""
    exact, high, _ = checks
    for at, byte in exact:
        if tails[at::tail].count(byte) != n:
            return False
    if high:
        bits = tails.translate(_HIGH_BIT)
        for at, bit in high:
            if bits[at::tail].count(bit) != n:
                return False
    return True


def _frame_heads(lengths: np.ndarray) -> np.ndarray:
    """The bytes of each series' frame before its bytes: the tag and the length's varint."""
    return 2 + (lengths >= 1 << 7) + (lengths >= 1 << 14) + (lengths >= 1 << 21)


def _tail_of(series: bytes) -> int:
    """The bytes of a series' last field, its tag and length included, if that is a sample
    field of a size read here (the first size in _SAMPLE_SIZES that fits); else 0."""
    for size in _SAMPLE_SIZES:
        k = size + 2
        if len(series) >= k and series[-k] == 0x12 and series[-k + 1] == size:
            return k
    return 0


def _prefix_mixed(data: bytes, full: list[bytes], lengths: np.ndarray) -> Prefixed | None:
    """prefix_series for a request whose samples are not all of one size and layout (values
    of 0 are left out of a sample; negative or odd ones the parser reads)."""
    n = lengths.size
    ends = np.cumsum(_frame_heads(lengths) + lengths)
    buf = np.frombuffer(data, dtype=np.uint8)
    starts = ends - lengths
    tails = np.zeros(n, dtype=np.int64)
    todo = np.arange(n)
    for size in _SAMPLE_SIZES:
        at = ends[todo] - (size + 2)
        fits = at >= starts[todo]
        at[~fits] = 0
        found = fits & (buf[at] == 0x12) & (buf[at + 1] == size)
        tails[todo[found]] = size + 2
        todo = todo[~found]
        if not todo.size:
            break
    else:
        return None
    tail = int(tails[0])
    uniform = all_of(tails == tail)
    if uniform:
        keys = list(map(operator.getitem, full, itertools.repeat(_CUT_TAIL[tail])))
    else:
        keys = [series[:k] for series, k in zip(full, (lengths - tails).tolist(), strict=True)]
    points = _sample_points(buf, ends, tails - 2, uniform)
    return Prefixed(full, hash_array(keys), points, keys=keys)


def _sample_points(
    buf: np.ndarray, ends: np.ndarray, sizes: np.ndarray, uniform: bool
) -> Points | None:
    """Each series' sample (the `sizes[i]` bytes before `ends[i]`), when every one is laid out
    as protobuf writes a Sample: the value (tag 0x09, 8 bytes; left out when 0) then the
    timestamp (tag 0x10, a varint of at most 9 bytes; left out when 0). Any other layout, which
    a parser may still accept, gives None. Every layout read here is a valid Sample.
    `uniform`: all of the same size."""
    n = ends.size
    if uniform:
        groups: list[tuple[int, Any]] = [(int(sizes[0]), slice(None))]
    else:
        groups = [(int(s), np.flatnonzero(sizes == s)) for s in np.unique(sizes).tolist()]
    timestamps = np.zeros(n, dtype=np.int64)
    values = np.zeros(n, dtype=np.float64)
    for size, rows in groups:
        if not size:
            continue  # an empty Sample: value 0, timestamp 0
        block = buf[(ends[rows] - size)[:, None] + _BYTE_OFFSETS[:size]]
        layout = _layout(size, int(block[0, 0]))
        # Every sample of this size in the layout (tags, and which bytes of the varint go on).
        if layout is None or not all_of((block & layout[0]) == layout[1]):
            return None
        timestamps[rows], values[rows] = _decode(block, layout)
    return Points(timestamps, values)


def _decode(block: np.ndarray, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """The timestamps and values of Samples serialized in `layout`, a row of `block` each."""
    _, _, has_value, at = layout
    size = block.shape[1]
    if has_value:
        values = block[:, 1:9].copy().view("<f8").ravel()
    else:
        values = np.zeros(block.shape[0], dtype=np.float64)
    if at < size:  # each varint's 7-bit digits times their weights, in one product
        timestamps = ((block[:, at:] & 0x7F) @ _VARINT_WEIGHTS[: size - at]).view(np.int64)
    else:
        timestamps = np.zeros(block.shape[0], dtype=np.int64)
    return timestamps, values


def _layout(size: int, tag: int) -> _Layout | None:
    """For a Sample of `size` bytes starting with `tag`, as protobuf writes it; None for any
    other."""
    key = (size, tag)
    if key not in _LAYOUTS:
        has_value = tag == 0x09
        at = 10 if has_value else 1
        width = size - at
        if has_value and size == 9:
            width, at = 0, 9
        ok = (tag == 0x09 and (size == 9 or size >= 11)) or (tag == 0x10 and size >= 2)
        if not ok or width > 9:
            _LAYOUTS[key] = None
        else:
            mask = np.zeros(size, dtype=np.uint8)
            expect = np.zeros(size, dtype=np.uint8)
            mask[0], expect[0] = 0xFF, tag
            if has_value and width:
                mask[9], expect[9] = 0xFF, 0x10
            mask[at:] = 0x80  # the varint: every byte but its last goes on
            expect[at : size - 1] = 0x80
            _LAYOUTS[key] = (mask, expect, has_value, at)
    return _LAYOUTS[key]


def _framed_layout(size: int, tag: int) -> tuple[np.ndarray, np.ndarray, _Layout] | None:
    """`_layout` with the sample field's tag and length before it (mask, expected bytes).
    Not cached: `_tail_checks` keeps what it derives from it."""
    layout = _layout(size, tag) if size else None  # empty samples: the general path
    if layout is None:
        return None
    mask = np.concatenate((np.array([0xFF, 0xFF], dtype=np.uint8), layout[0]))
    expect = np.concatenate((np.array([0x12, size], dtype=np.uint8), layout[1]))
    return mask, expect, layout


_LAYOUTS: dict[tuple[int, int], _Layout | None] = {}
_BYTE_OFFSETS = np.arange(20, dtype=np.int64)
_CUT_TAIL = [slice(None, -k if k else None) for k in range(23)]  # a series' bytes less k
_LAST = [slice(-k, None) for k in range(23)]  # a series' last k bytes (k > 0)
_VARINT_WEIGHTS = np.uint64(1) << np.arange(0, 63, 7, dtype=np.uint64)  # 2^0, 2^7, ... 2^56


def check_labels(key: bytes) -> None:
    """Raise NotLabels unless `key` is only label fields, each as protobuf serializes it (so
    that it is the key `label_keys` gives for the series). The labels' contents are checked
    where they are read."""
    try:
        view = LabelsOnlySeries.FromString(key)
    except _PBDecodeError:
        raise NotLabels from None
    view.DiscardUnknownFields()
    if view.SerializeToString() != key:
        raise NotLabels


class RouteTable:
    """The route cache: per distinct series, by the hash of its serialized labels (a slot of a
    SeriesIndex), how the rules treat it. Its disposition and its path through the rules are
    also kept in arrays by slot, so a request is sorted by disposition and counted per path with
    array operations; only relabeled and per-request series take a step each, in C where they
    can."""

    __slots__ = (
        "_counted_no",
        "_head_slot",
        "_path_no",
        "_sampler_no",
        "cached",
        "column_nos",
        "columns",
        "counted_rules",
        "dispositions",
        "head_seen",
        "index",
        "new_labels",
        "path_counts",
        "path_nos",
        "paths",
        "relabels",
        "sampler_n",
        "sampler_nos",
        "sampler_rate",
        "samplers",
    )

    def __init__(self) -> None:
        self.index = SeriesIndex()
        self.cached: list[_Cached] = []  # by slot
        # By slot, the labels the rules leave a relabeled series (else None): what a request
        # splices, one list step from the slot instead of two through its _Cached.
        self.new_labels: list[bytes | None] = []
        self.dispositions = np.zeros(1024, dtype=np.int8)  # by slot
        self.path_nos = np.zeros(1024, dtype=np.int32)  # by slot: its path's number, 0 for none
        self.paths: list[_Path | None] = [None]  # by number
        self._path_no: dict[int, int] = {}  # id(path) -> number
        # Windows kept as columns, one per windowed rule; by slot, a WINDOW series' columns.
        self.columns: list[DownsampleColumns | AggregateColumns] = []
        self.column_nos = np.zeros(1024, dtype=np.int32)
        self.relabels = np.zeros(1024, dtype=bool)  # by slot: the rules change its labels
        # Sampling rules (head, probabilistic) by number: the rule, its head counts (the
        # engine's, for slots that leave), its n (head) or rate (probabilistic, else NaN).
        self.samplers: list[tuple[Rule, dict[Any, int]]] = []
        self._sampler_no: dict[int, int] = {}
        self.sampler_n = np.zeros(0, dtype=np.int64)
        self.sampler_rate = np.zeros(0)
        self.sampler_nos = np.zeros(1024, dtype=np.int32)  # by slot
        self.head_seen = np.zeros(1024, dtype=np.int64)  # by slot: where it is in its count
        self._head_slot: dict[Any, int] = {}  # a head-sampled series' key -> its slot
        # Per path number, what one series on it adds to each rule's input, output and
        # dropped counts (a row filled as each path is numbered); the rules by column.
        self.path_counts = np.zeros((16, 16, 3), dtype=np.int64)  # rows and columns to spare
        self.counted_rules: list[str] = []
        self._counted_no: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.index)

    def slots(
        self, engine: RuleEngine, key_of: Callable[[int], bytes], hashes: np.ndarray
    ) -> np.ndarray:
        """The slot of each series of a request (the i-th's key: key_of(i)). A series first
        seen is routed (its labels parsed, which validates them: raises DecodeError, or
        NotLabels) and gets the next slot; if one raises, none of the request's new series has
        a slot."""
        index = self.index
        slots = index.lookup(hashes)
        if none_below(slots, 0):
            return slots
        # New series get the next slots, in the order of their first place in the request.
        new_hashes, first = index.unseen(hashes, slots)
        routed = [_route(engine, key_of(i)) for i in first.tolist()]
        start = len(index)
        index.add_many(new_hashes)
        end = len(index)
        self.cached += routed
        self.new_labels += map(_RELABELED_OF, routed)
        self.dispositions = grown(self.dispositions, end)
        self.path_nos = grown(self.path_nos, end)
        self.column_nos = grown(self.column_nos, end)
        self.relabels = grown(self.relabels, end)
        self.sampler_nos = grown(self.sampler_nos, end)
        self.head_seen = grown(self.head_seen, end)
        self.dispositions[start:end] = list(map(_DISPOSITION_OF, routed))
        self.path_nos[start:end] = [self._number(c.path) for c in routed]
        self.relabels[start:end] = [c.relabeled is not None for c in routed]
        for slot, c in enumerate(routed, start):
            if c.disposition == WINDOW:
                self.column_nos[slot] = self._columns_of(c).register(slot)
            elif c.disposition == SAMPLED:
                assert c.dynamic is not None
                no = self.sampler_nos[slot] = self._sampler(engine, c.dynamic.terminal)
                if c.dynamic.terminal.settings.method == "head":
                    # Where its count stood, if it was counted before (another table, or
                    # evaluated on its own); from now on the count is kept here.
                    self.head_seen[slot] = self.samplers[no][1].pop(c.dynamic.key, 0)
                    self._head_slot[c.dynamic.key] = slot
        missing = np.flatnonzero(slots < 0)
        slots[missing] = index.lookup(hashes[missing])
        return slots

    def move_head(self, key: Any, points: int, n: int) -> int | None:
        """For a series evaluated on its own (RuleEngine.evaluate): where its head count stood,
        moved on by `points`; None if this table does not keep the series' count."""
        slot = self._head_slot.get(key)
        if slot is None:
            return None
        seen = int(self.head_seen[slot])
        self.head_seen[slot] = (seen + points) % n
        return seen

    def _sampler(self, engine: RuleEngine, rule: Rule) -> int:
        no = self._sampler_no.get(id(rule))
        if no is None:
            no = self._sampler_no[id(rule)] = len(self.samplers)
            s = rule.settings
            head = s.method == "head"
            self.samplers.append((rule, engine.head_counts(rule.name) if head else {}))
            self.sampler_n = np.append(self.sampler_n, s.n if head else 1)
            self.sampler_rate = np.append(self.sampler_rate, math.nan if head else s.rate)
        return no

    def _columns_of(self, c: _Cached) -> DownsampleColumns | AggregateColumns:
        assert c.dynamic is not None
        state = c.dynamic.state
        cols = state.columns
        if cols is None:
            meta = self._dynamic_of
            kind = AggregateColumns if isinstance(state, AggregateState) else DownsampleColumns
            cols = state.columns = kind(state, meta, c.dynamic.terminal.name, len(self.columns))
            self.columns.append(cols)
        return cols

    def _dynamic_of(self, slot: int) -> Any:
        return self.cached[slot].dynamic

    def retire(self) -> None:
        """The table is dropped: its windows' columns go back to their states as window
        objects (emitted as every other window), and the states stop using them."""
        for cols in self.columns:
            cols.retire()
            cols.state.columns = None
        self.columns = []
        n = len(self.index)
        for slot in np.flatnonzero(self.dispositions[:n] == SAMPLED).tolist():
            rule, heads = self.samplers[self.sampler_nos[slot]]
            if rule.settings.method == "head":
                dyn = self.cached[slot].dynamic
                assert dyn is not None
                heads[dyn.key] = int(self.head_seen[slot])
        self.samplers = []
        self._head_slot = {}

    def _number(self, path: _Path | None) -> int:
        if path is None:
            return 0
        no = self._path_no.get(id(path))
        if no is None:
            no = self._path_no[id(path)] = len(self.paths)
            self.paths.append(path)
            self._add_path_counts(path)
        return no

    def _add_path_counts(self, path: _Path) -> None:
        """The row of path_counts for a path just numbered: +1 input and output for each
        transform; for the terminal rule +1 input, and +1 output or dropped as it decides for
        every series on the path (the per-request parts count elsewhere)."""
        adds: list[tuple[str, int, int, int]] = [(name, 1, 1, 0) for name in path.transforms]
        t = path.terminal
        if t is not None:
            output = dropped = 0
            if t.action == "drop":
                dropped = 1
            elif t.action == "sample" and t.settings.method == "hash":
                output, dropped = (1, 0) if path.hash_keep else (0, 1)
            elif t.action == "aggregate" and t.settings.keep_input:
                output = 1
            adds.append((t.name, 1, output, dropped))
        for name, *_ in adds:
            if name not in self._counted_no:
                self._counted_no[name] = len(self.counted_rules)
                self.counted_rules.append(name)
        row = len(self.paths) - 1
        rows, width, _ = self.path_counts.shape
        if row >= rows or len(self.counted_rules) > width:  # room for twice as many
            grown_rows = max(rows, 2 * (row + 1))
            grown_width = max(width, 2 * len(self.counted_rules))
            counts = np.zeros((grown_rows, grown_width, 3), dtype=np.int64)
            counts[:rows, :width] = self.path_counts
            self.path_counts = counts
        for name, *unit in adds:
            self.path_counts[row, self._counted_no[name]] += unit


def route_table(engine: RuleEngine, hashes: np.ndarray) -> RouteTable:
    """The engine's route cache for a request of these series: started again when their new
    ones would take it past `route_cache_max` (and after a reload, which empties it)."""
    table = engine.route_cache
    if table is not None and len(table) + hashes.size > engine.route_cache_max:
        new = int(np.count_nonzero(table.index.lookup(hashes) < 0))
        if len(table) + new > engine.route_cache_max:
            table.retire()
            table = None
    if table is None:
        table = engine.route_cache = RouteTable()
    return table


def _govern_cached(
    engine: RuleEngine,
    data: bytes,
    series: Prefixed,
    samples: Any,
    full: list[bytes],
) -> Governed:
    """The cached path, for a request of series only (`full`, each series' bytes), each its
    labels and one sample as the keys of `series` (prefix_series': their hashes, the keys
    sliced where read) show
    once a new one passes check_labels (else NotLabels, before anything is counted). A
    relabeled series is spliced: its new labels + its bytes after its labels. `samples`: the
    request's, one per series, if known."""
    # Keyed by a 64-bit hash of the labels, not the labels: a fraction of the memory per
    # series, and a collision needs ~4 billion series in the cache at once to become likely.
    hashes = series.hashes
    n = len(hashes)
    table = route_table(engine, hashes)
    slots = table.slots(engine, series.key, hashes)
    path_nos = table.path_nos[slots]
    if not any_of(path_nos):  # no rule touches any of them
        return Governed(None, n, n, n, 0, 0, n, 0)
    now_ms = engine.clock_ms()
    disposition = table.dispositions[slots]
    if not any_of(disposition):  # all KEEP
        _count_routes(engine, table, path_nos, now_ms / 1000)
        return Governed(None, n, n, n, 0, 0, n, 0)
    _count_routes(engine, table, path_nos, now_ms / 1000)
    # The request's positions by disposition, each in the request's order (one sort).
    order = disposition.argsort(kind="stable")
    bounds = np.searchsorted(disposition[order], _DISPOSITIONS).tolist()
    of = {d: order[bounds[d] : bounds[d + 1]] for d in range(len(bounds) - 1)}
    # Whether a series comes twice in the request (then its points are taken in turn); only
    # sampled and windowed series need to know.
    repeats = False
    if of[SAMPLED].size or of[WINDOW].size:
        ordered = np.sort(slots[np.concatenate((of[SAMPLED], of[WINDOW]))])
        repeats = any_of(ordered[1:] == ordered[:-1])
    # The output is kept series first, then the others (a WriteRequest's series order carries
    # no meaning).
    out = list(map(full.__getitem__, of[KEEP].tolist()))
    cached = table.cached
    # Relabeled series go out as their new labels and the bytes after their old ones, framed
    # without joining the two first.
    spliced: tuple[list[bytes], list[bytes]] = ([], [])
    relabeled_any = False
    at = of[RELABEL]
    if at.size:
        _splice(spliced, series, table.new_labels, at, slots[at])
        relabeled_any = True
    at = of[SAMPLED]
    if at.size:
        kept_at = _sampled(engine, table, at, slots[at], repeats)
        relabel = table.relabels[slots[kept_at]]
        out += map(full.__getitem__, kept_at[~relabel].tolist())
        if any_of(relabel):
            _splice(spliced, series, table.new_labels, kept_at[relabel], slots[kept_at[relabel]])
            relabeled_any = True
    at = of[DYNAMIC]
    if at.size:
        relabeled_any |= _add_one_by_one(
            engine, out, full, series, cached, at, slots[at], samples, now_ms
        )
    at = of[WINDOW]
    if at.size:
        _add_to_columns(engine, table, full, at, slots[at], samples, now_ms, repeats)
    kept = len(out) + len(spliced[0])
    if kept == n and not relabeled_any:
        return Governed(None, n, n, n, 0, 0, n, 0)  # all went on as they came (keep_input ...)
    new = prw_codec.frame(out, spliced=spliced)
    return Governed(new, kept, kept, kept, 0, n - kept, n, 0)


def _splice(
    spliced: tuple[list[bytes], list[bytes]],
    series: Prefixed,
    new_labels: list[bytes | None],
    at: np.ndarray,
    slots: np.ndarray,
) -> None:
    """Series `at` (their slots; each starts with its labels) with the labels the rules leave
    them (`new_labels`, by slot), onto `spliced`: their new labels, and their bytes after their
    labels."""
    where = at.tolist()
    spliced[0].extend(map(new_labels.__getitem__, slots.tolist()))  # type: ignore[arg-type]
    spliced[1].extend(series.rests(where))


def _sampled(
    engine: RuleEngine, table: RouteTable, at: np.ndarray, slots: np.ndarray, repeats: bool
) -> np.ndarray:
    """Which of the sampled series `at` (their slots) are kept, and counted per rule. A
    probabilistic rule draws engine.rand() for each of its series in the request's order (as
    evaluating them one by one does); a head rule keeps a series' point when its count is at 0,
    and moves the count on."""
    nos = table.sampler_nos[slots]
    first = int(nos[0])
    if all_of(nos == first):  # one rule samples them all (the usual request)
        rule, _ = table.samplers[first]
        if rule.settings.method == "head":
            keep = _head_kept(table, slots, int(table.sampler_n[first]), repeats)
        else:
            rand = engine.rand
            keep = np.array([rand() for _ in range(at.size)]) < rule.settings.rate
        _count_sampled(engine, rule.name, at.size, int(np.count_nonzero(keep)))
        return at[keep]
    rate = table.sampler_rate[nos]
    keep = np.zeros(at.size, dtype=bool)
    prob = rate == rate
    if any_of(prob):
        p = positions(prob)
        rand = engine.rand
        keep[p] = np.array([rand() for _ in range(p.size)]) < rate[p]
    if not all_of(prob):
        h = positions(~prob)
        keep[h] = _head_kept(table, slots[h], table.sampler_n[nos[h]], repeats)
    per_rule = np.bincount(nos, minlength=len(table.samplers))
    kept = np.bincount(nos[keep], minlength=len(table.samplers))
    for no in positions(per_rule).tolist():
        _count_sampled(engine, table.samplers[no][0].name, int(per_rule[no]), int(kept[no]))
    return at[keep]


def _count_sampled(engine: RuleEngine, rule: str, seen: int, kept: int) -> None:
    """A sampling rule's counts for a request: `seen` of its series' points, `kept` kept."""
    st = engine.stats[rule]
    st.output += kept
    st.dropped += seen - kept


def _head_kept(
    table: RouteTable, slots: np.ndarray, n: np.ndarray | int, repeats: bool
) -> np.ndarray:
    """Which points of head-sampled series (their slots; `n`: each one's, or all's) are kept:
    those where the series' count is at 0; the counts move on."""
    keep = np.zeros(slots.size, dtype=bool)
    seen_of = table.head_seen
    # A series twice in the request: its points in turn.
    for once in rounds(slots) if repeats else (slice(None),):
        s = slots[once]
        seen = seen_of[s]
        keep[once] = seen == 0
        seen_of[s] = (seen + 1) % (n[once] if isinstance(n, np.ndarray) else n)
    return keep


def _points_at(full: list[bytes], at: np.ndarray, samples: Any) -> tuple[np.ndarray, np.ndarray]:
    """The timestamps and values of the samples (one a series) of series `at`: from the
    request's samples when the caller has them (Points, or count_samples' list), else by
    merging those series so that their samples line up with them."""
    if isinstance(samples, Points):
        return samples.at(at)
    where = at.tolist()
    if samples is not None:
        points = list(map(samples.__getitem__, where))
    else:
        joined = prw_codec.frame(list(map(full.__getitem__, where)))
        points = list(MergedWriteRequest.FromString(joined).timeseries.samples)
    n = len(points)
    return (
        np.fromiter(map(_TIMESTAMP_OF, points), dtype=np.int64, count=n),
        np.fromiter(map(_VALUE_OF, points), dtype=np.float64, count=n),
    )


def _add_one_by_one(
    engine: RuleEngine,
    out: list[bytes],
    full: list[bytes],
    prefixed: Prefixed,
    cached: list[_Cached],
    at: np.ndarray,
    slots: np.ndarray,
    samples: Any,
    now_ms: int,
) -> bool:
    """Series `at` (their slots) into windows that take their points one at a time (LTTB,
    swinging door, quantiles, aggregates that keep their input; the latter also go on, onto
    `out`). Whether a series that went on has new labels."""
    relabeled_any = False
    late_before: dict[str, tuple[Any, int]] = {}
    ts, values = _points_at(full, at, samples)
    for i, slot, when, value in zip(
        at.tolist(), slots.tolist(), ts.tolist(), values.tolist(), strict=True
    ):
        c = cached[slot]
        dyn = c.dynamic
        assert dyn is not None
        t, state = dyn.terminal, dyn.state
        if t.name not in late_before:
            late_before[t.name] = (state, state.late)
        if dyn.grouped is None:  # downsample: outputs reuse the serialized labels
            state.add_one(dyn.key, dyn.name, dyn.labels, dyn.kind, dyn.wire, when, value)
        else:
            state.add_one(dyn.key, dyn.name, dyn.grouped, dyn.counter, when, value, now_ms)
            if t.settings.keep_input:
                series = full[i]
                if c.relabeled is not None:
                    series = c.relabeled + next(prefixed.rests([i]))
                    relabeled_any = True
                out.append(series)
    for rule_name, (state, late) in late_before.items():
        engine.stats[rule_name].dropped += state.late - late  # windows already emitted
    return relabeled_any


def _add_to_columns(
    engine: RuleEngine,
    table: RouteTable,
    full: list[bytes],
    at: np.ndarray,
    slots: np.ndarray,
    samples: Any,
    now_ms: int,
    repeats: bool,
) -> None:
    """The samples of series `at` (their slots) into their rules' windows, a rule at a time
    (`repeats`: a series may come more than once)."""
    ts, values = _points_at(full, at, samples)
    nos = table.column_nos[slots]
    first = int(nos[0])
    groups = [(first, slice(None))] if all_of(nos == first) else None
    if groups is None:
        present = positions(np.bincount(nos)).tolist()
        groups = [(no, positions(nos == no)) for no in present]
    for no, sel in groups:
        cols = table.columns[no]
        late = cols.state.late
        cols.add(slots[sel], ts[sel], values[sel], now_ms, repeats)
        engine.stats[cols.rule].dropped += cols.state.late - late  # windows already emitted


_DISPOSITION_OF = operator.attrgetter("disposition")
_DISPOSITIONS = np.arange(SAMPLED + 2)
_VALUE_OF = operator.attrgetter("value")
_TIMESTAMP_OF = operator.attrgetter("timestamp")
_RELABELED_OF = operator.attrgetter("relabeled")


def _count_routes(
    engine: RuleEngine, table: RouteTable, path_nos: np.ndarray, now_s: float
) -> None:
    """Per-rule counts of one request: the series per path through the rules, times what a
    series on each path adds to each rule."""
    stats = engine.stats
    per_path = np.bincount(path_nos, minlength=len(table.paths))
    width = table.path_counts.shape[1]
    counts = table.path_counts[: per_path.size].reshape(per_path.size, width * 3)  # a view
    totals = (per_path @ counts).reshape(width, 3)[: len(table.counted_rules)].tolist()
    for name, (inputs, outputs, dropped) in zip(table.counted_rules, totals, strict=True):
        if inputs:
            st = stats[name]
            st.input += inputs
            st.output += outputs
            st.dropped += dropped
            st.last_match = now_s


def govern_each(engine: RuleEngine, data: bytes) -> Governed:
    """Every series evaluated on its own (native histograms, several samples per series)."""
    try:
        req = WriteRequest.FromString(data)
    except _PBDecodeError:
        raise BadProtobuf("body is not a valid protobuf WriteRequest") from None
    kept: list[TimeSeries] = []
    changed = False
    samples = histograms = removed = in_samples = in_histograms = 0
    plan_of = engine.plan
    for ts in req.timeseries:
        n_s = len(ts.samples)
        n_h = len(ts.histograms)
        in_samples += n_s
        in_histograms += n_h
        name = series_name(ts)
        plan = plan_of(name)
        if not plan:
            kept.append(ts)
            samples += n_s
            histograms += n_h
            continue

        def labels_of(ts: TimeSeries = ts) -> dict[str, str]:
            return {lb.name: lb.value for lb in ts.labels if lb.name != NAME}

        if n_h:
            kind = "native_histogram"
            points_of = None
        else:
            kind = "counter" if name.endswith(_COUNTER_SUFFIXES) else "gauge"

            def points_of(ts: TimeSeries = ts) -> list[tuple[int, float]]:
                return [(s.timestamp, s.value) for s in ts.samples]

        v = engine.evaluate(name, plan, labels_of, None, kind, n_s + n_h, points_of)
        if v.drop_all or v.absorbed:
            changed = True
            removed += n_s + n_h
            continue
        if v.keep is None and v.labels is None:
            kept.append(ts)
            samples += n_s
            histograms += n_h
            continue
        changed = True
        out = TimeSeries()
        if v.labels is not None:
            out.labels.extend(_labels(v.name or name, v.labels))
        else:
            out.labels.extend(ts.labels)
        if v.keep is None:
            out.samples.extend(ts.samples)
            out.histograms.extend(ts.histograms)
        else:
            keep = v.keep
            out.samples.extend(s for s, k in zip(ts.samples, keep[:n_s]) if k)
            out.histograms.extend(h for h, k in zip(ts.histograms, keep[n_s:]) if k)
            removed += n_s + n_h - sum(keep)
        if not out.samples and not out.histograms:
            continue
        samples += len(out.samples)
        histograms += len(out.histograms)
        kept.append(out)
    if not changed:
        data = None
    else:
        new = WriteRequest()
        new.timeseries.extend(kept)
        new.metadata.extend(req.metadata)
        data = new.SerializeToString()
    return Governed(
        data,
        len(kept),
        samples + histograms,
        samples,
        histograms,
        removed,
        in_samples,
        in_histograms,
    )


_ENTRIES: dict[tuple[str, str], bytes] = {}  # a label's serialized entry, for frequent pairs
_ENTRIES_MAX = 100_000


def labels_wire(name: str, labels: dict[str, str]) -> bytes:
    """The label entries of a TimeSeries (field 1), sorted as Prometheus sorts them, with
    `__name__`: what a LabelsOnlyLabels message with these labels serializes to."""
    out = []
    for pair in sorted({**labels, NAME: name}.items()):
        entry = _ENTRIES.get(pair)
        if entry is None:
            k, v = pair[0].encode(), pair[1].encode()
            body = b"\n" + varint(len(k)) + k + (b"\x12" + varint(len(v)) + v if v else b"")
            entry = b"\n" + varint(len(body)) + body
            if len(_ENTRIES) >= _ENTRIES_MAX:
                _ENTRIES.clear()
            _ENTRIES[pair] = entry
        out.append(entry)
    return b"".join(out)


def _labels(name: str, labels: dict[str, str]) -> list[Label]:
    """Labels in Prometheus order: sorted by name, __name__ included."""
    pairs = sorted({**labels, NAME: name}.items())
    return [Label(name=k, value=v) for k, v in pairs]


def encode(emitted: list[Emitted]) -> tuple[bytes, int, int]:
    """Emitted windows as a serialized WriteRequest: (data, series, datapoints)."""
    out: list[bytes] = []
    points = 0
    for e in emitted:
        # A downsample of the cached path carries the series' labels as already serialized.
        labels = e.origin if isinstance(e.origin, bytes) else labels_wire(e.name, e.labels)
        samples = TimeSeries(samples=[Sample(value=v, timestamp=t) for t, v in e.points])
        out.append(labels + samples.SerializeToString())
        points += len(e.points)
    return prw_codec.frame(out), len(emitted), points
