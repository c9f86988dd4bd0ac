"""A remote-write series' labels are taken as its bytes before its sample (prefix_series)
when every series of a request is its labels followed by one sample, which is what Prometheus
and vmagent send; any other request gets label_keys, a labels-only parse. A prefix key that is
not only labels (a label whose value ends like a sample's field, two samples in one series) is
caught the first time it is seen (check_labels raises NotLabels), and then the stats and limits
read the request by label_keys and the rules evaluate it series by series: what governance
counts, routes and forwards is the same either way."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service._proto.governor.prw_views_pb2 import SeriesBytes
from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import (
    Exemplar,
    Histogram,
    Label,
    MetricMetadata,
    Sample,
    TimeSeries,
)
from service.codec import prw as prw_codec
from service.codec.compression import varint
from service.config import StatsConfig
from service.governance import prw
from service.governance.engine import RuleEngine
from service.governance.rules import load_rules
from service.governance.stage import Governance
from service.governance.stats import Stats

T0_MS = 1_700_000_000_000

_text = st.text(st.characters(codec="utf-8"), max_size=8)
_long_text = st.one_of(_text, st.integers(120, 20_000).map(lambda n: "v" * n))
_labels = st.lists(st.builds(Label, name=_text, value=_long_text), max_size=4)
_sample = st.builds(
    Sample,
    value=st.one_of(st.just(0.0), st.just(-0.0), st.floats(allow_nan=True)),
    timestamp=st.one_of(st.just(0), st.integers(-(2**63), 2**63 - 1), st.just(T0_MS)),
)


def full_of(data: bytes) -> list[bytes]:
    return list(SeriesBytes.FromString(data).timeseries)


def prefix_keys(data: bytes) -> list[bytes] | None:
    got = prw.prefix_series(data)
    return None if got is None else got.keys


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_labels, _sample), max_size=8))
def test_a_request_of_one_sample_per_series_gets_its_label_keys(
    items: list[tuple[list[Label], Sample]],
) -> None:
    """For any request whose every series is its labels then one sample (any value, any
    timestamp, labels of any length), each key prefix_series gives is the series' label key
    (label_keys') and passes check_labels, or, where a label's text or a sample's bytes look
    like a sample's field that runs to the series' end, is not and fails check_labels (the
    request is then read again: see the misleading request below). With timestamps of today
    (6-byte varints) and label text without control characters, every key is the label key.
    An empty request gets None."""
    data = WriteRequest(
        timeseries=[TimeSeries(labels=labels, samples=[s]) for labels, s in items]
    ).SerializeToString()
    keys = prefix_keys(data)
    if not items:
        assert keys is None
        return
    assert keys is not None
    exact = prw.label_keys(data)
    for key, want in zip(keys, exact, strict=True):
        if key != want:
            with pytest.raises(prw.NotLabels):
                prw.check_labels(key)
        else:
            prw.check_labels(key)
    if all(s.timestamp == T0_MS for _, s in items) and all(
        c >= " " for labels, _ in items for lb in labels for c in lb.name + lb.value
    ):
        assert keys == exact


def test_a_label_that_looks_like_a_sample_field_gives_a_key_that_is_caught() -> None:
    """A label name "\x12" before a value tag (0x12, read as a length of 18) looks like a
    sample's field of 18 bytes that runs to the series' end: the key taken is not the labels,
    and check_labels refuses it."""
    labels = [Label(name="\x12", value="0000"), Label(name="00\x80")]
    data = WriteRequest(
        timeseries=[TimeSeries(labels=labels, samples=[Sample(timestamp=128)])]
    ).SerializeToString()
    keys = prefix_keys(data)
    assert keys is not None and keys != prw.label_keys(data)
    with pytest.raises(prw.NotLabels):
        prw.check_labels(keys[0])


_series = st.builds(
    TimeSeries,
    labels=_labels,
    samples=st.lists(_sample, max_size=3),
    exemplars=st.lists(st.builds(Exemplar, value=st.floats(allow_nan=False)), max_size=1),
    histograms=st.lists(st.builds(Histogram, count_int=st.integers(0, 9)), max_size=1),
)
_tails = st.sampled_from([b"", b"\x12\x00", b"\x12\x02\x10\x01", b"\x12\x09\x09" + bytes(8)])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_series, _tails), max_size=6),
    st.lists(st.builds(MetricMetadata, help=_text), max_size=1),
)
def test_a_prefix_key_is_the_label_key_or_is_caught(
    items: list[tuple[TimeSeries, bytes]], metadata: list[MetricMetadata]
) -> None:
    """For any request (several samples, exemplars, histograms, metadata, and last label
    values that end like a sample's field), prefix_series gives None, or keys each of
    which is the series' label key or fails check_labels; so when all of them pass, they are
    label_keys' keys."""
    timeseries = []
    for ts, tail in items:
        ts = TimeSeries.FromString(ts.SerializeToString())
        if ts.labels and tail:
            ts.labels[-1].value += tail.decode()
        timeseries.append(ts)
    data = WriteRequest(timeseries=timeseries, metadata=metadata).SerializeToString()
    keys = prefix_keys(data)
    if keys is None:
        return
    exact = prw.label_keys(data)
    for key, want in zip(keys, exact, strict=True):
        try:
            prw.check_labels(key)
        except prw.NotLabels:
            assert key != want
        else:
            assert key == want


def test_requests_of_other_shapes_get_none() -> None:
    """Metadata, an exemplar or a histogram after the sample, or no series: no prefix keys.
    Two samples: a key that check_labels refuses (it holds the first sample). A series'
    length written in more bytes than it needs still frames the series' bytes: its key is its
    label key."""
    labels = [Label(name="__name__", value="up")]
    one = Sample(value=1.0, timestamp=T0_MS)
    plain = WriteRequest(timeseries=[TimeSeries(labels=labels, samples=[one])])
    shapes = {
        "metadata": WriteRequest(timeseries=plain.timeseries, metadata=[MetricMetadata(help="h")]),
        "an exemplar": WriteRequest(
            timeseries=[TimeSeries(labels=labels, samples=[one], exemplars=[Exemplar(value=1)])]
        ),
        "a histogram": WriteRequest(
            timeseries=[TimeSeries(labels=labels, histograms=[Histogram(count_int=1)])]
        ),
        "no series": WriteRequest(),
    }
    for shape, req in shapes.items():
        data = req.SerializeToString()
        assert prefix_keys(data) is None, shape
    two = WriteRequest(timeseries=[TimeSeries(labels=labels, samples=[one, one])])
    data = two.SerializeToString()
    keys = prefix_keys(data)
    assert keys is not None
    with pytest.raises(prw.NotLabels):
        prw.check_labels(keys[0])
    body = plain.timeseries[0].SerializeToString()
    padded = b"\x0a" + bytes([0x80 | len(body), 0x00]) + body  # the length in two bytes
    assert prw.label_keys(padded) == [body[: -len(one.SerializeToString()) - 2]]
    assert prefix_keys(padded) == prw.label_keys(padded)
    unknown = plain.SerializeToString() + b"\x28\x01"  # field 5, a varint: no WriteRequest's
    assert prefix_keys(unknown) is None


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([(18, 0x09), (9, 0x10), (11, 0x09), (20, 0x09), (4, 0x10)]),
    st.lists(st.binary(min_size=20, max_size=20), min_size=1, max_size=6),
    st.data(),
)
def test_sample_fields_are_checked_as_their_layout_says(
    shape: tuple[int, int], rows: list[bytes], data: st.DataObject
) -> None:
    """The usual request's sample fields, end to end, pass the C-level column checks exactly
    when every row's bytes under its framed layout's mask are the bytes the layout expects
    (rows made to pass, then one byte of one row changed, or random bytes)."""
    tail, tag = shape
    mask, expect, _ = prw._framed_layout(tail - 2, tag)
    made = [bytes((r & ~m) | e for r, m, e in zip(row, mask, expect)) for row in rows]
    if data.draw(st.booleans()):
        i, at = data.draw(st.integers(0, len(made) - 1)), data.draw(st.integers(0, tail - 1))
        changed = bytearray(made[i])
        changed[at] ^= data.draw(st.integers(1, 255))
        made[i] = bytes(changed)
    if data.draw(st.booleans()):
        made = [row[:tail] for row in rows]
    block = np.frombuffer(b"".join(row[:tail] for row in made), dtype=np.uint8)
    want = bool(((block.reshape(-1, tail) & mask) == expect).all())
    checks = prw._tail_checks(tail, tag)
    assert checks is not None
    tails = b"".join(row[:tail] for row in made)
    assert prw._tails_pass(tails, tail, len(made), checks) == want


# ---- a request built to be misread -----------------------------------------------------------

RULES = """
rules:
  - name: tag
    match: {name: "a"}
    action: transform
    transform:
      - {op: set, label: team, value: web}
  - name: avg
    match: {name: "b"}
    action: downsample
    downsample: {interval: 60s, method: avg}
"""


def misleading() -> bytes:
    """Series `a` with no sample and a last label value that ends like a one-sample field
    (0x12, length 0), then series `b` with two samples: as many samples as series, and each
    series ends with bytes a sample's field could have."""
    a = TimeSeries(labels=[Label(name="__name__", value="a"), Label(name="v", value="x\x12\x00")])
    b = TimeSeries(
        labels=[Label(name="__name__", value="b")],
        samples=[Sample(value=1.0, timestamp=T0_MS), Sample(value=3.0, timestamp=T0_MS + 1)],
    )
    return WriteRequest(timeseries=[a, b]).SerializeToString()


def engine(now: list[int]) -> RuleEngine:
    return RuleEngine(
        load_rules(RULES), pipeline="prw", clock_ms=lambda: now[0], rand=random.Random(1).random
    )


def test_the_misleading_request_is_caught_by_check_labels() -> None:
    """Its prefix keys exist, and neither is its series' label key: both fail check_labels."""
    data = misleading()
    keys = prefix_keys(data)
    assert keys is not None
    assert keys != prw.label_keys(data)
    for key in keys:
        with pytest.raises(prw.NotLabels):
            prw.check_labels(key)


@pytest.mark.parametrize("with_stats", [False, True], ids=["rules", "rules and full stats"])
def test_the_misleading_request_is_governed_as_its_series_are(with_stats: bool) -> None:
    """Through governance, the misleading request comes out as per-series evaluation makes it
    (`b`'s two samples go into one window, `a` has no datapoint to forward), and full stats
    count `a` with no datapoint and `b` with two."""
    now = [T0_MS]
    stats = Stats(StatsConfig(level="full"), pipeline="prw") if with_stats else None
    g = Governance(pipeline="prw", engine=engine(now), stats=stats, clock_ms=lambda: now[0])
    reference = engine(now)
    data = misleading()
    out = g.prw(data)
    want = prw.govern_each(reference, data)
    assert out == want
    assert out.data is not None and not WriteRequest.FromString(out.data).timeseries
    assert (out.series, out.samples, out.removed, out.in_samples) == (0, 0, 2, 2)
    now[0] += 120_000
    window_end = (T0_MS // 60_000 + 1) * 60_000
    assert [(e.name, e.points) for e in g.engine.due()] == [("b", [(window_end, 2.0)])]
    assert [(e.name, e.points) for e in reference.due()] == [("b", [(window_end, 2.0)])]
    if stats is not None:
        assert {n: c.total for n, c in stats.metrics.items()} == {"a": 0, "b": 2}
        assert {n: c.series() for n, c in stats.metrics.items()} == {"a": 1, "b": 1}


def test_keys_found_to_be_labels_stay_known() -> None:
    """After a normal request, the same series sent again are found by their prefix keys: the
    route cache does not grow, and the keys are label_keys' keys."""
    now = [T0_MS]
    g = Governance(pipeline="prw", engine=engine(now), clock_ms=lambda: now[0])

    def req(t: int) -> bytes:
        return WriteRequest(
            timeseries=[
                TimeSeries(
                    labels=[Label(name="__name__", value=n), Label(name="i", value=str(i))],
                    samples=[Sample(value=float(i), timestamp=t)],
                )
                for n in ("a", "b", "c")
                for i in range(3)
            ]
        ).SerializeToString()

    g.prw(req(T0_MS))
    cached = len(g.engine.route_cache)
    data = req(T0_MS + 1000)
    assert prefix_keys(data) == prw.label_keys(data)
    g.prw(data)
    assert len(g.engine.route_cache) == cached == 9


def same_floats(a: list[float], b: list[float]) -> bool:
    """Equal bit for bit (NaN payloads and -0.0 included)."""
    return [struct.pack("<d", x) for x in a] == [struct.pack("<d", x) for x in b]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_labels, _sample), min_size=1, max_size=8))
def test_the_samples_read_with_the_keys_are_the_requests(
    items: list[tuple[list[Label], Sample]],
) -> None:
    """For a request of one sample per series whose keys are its label keys (all pass
    check_labels; otherwise the request is counted again and the points are not used),
    prefix_series' points are the samples a parser reads, in order, bit for bit; or None, only
    for a timestamp below 0 (a varint of 10 bytes) or for two layouts of the same size in one
    request."""
    data = WriteRequest(
        timeseries=[TimeSeries(labels=labels, samples=[s]) for labels, s in items]
    ).SerializeToString()
    got = prw.prefix_series(data)
    assert got is not None
    try:
        for key in got.keys:
            prw.check_labels(key)
    except prw.NotLabels:
        return
    samples = [s for _, s in items]
    if got.points is None:
        layouts = {(len(s.SerializeToString()), s.SerializeToString()[:1]) for s in samples}
        sizes = [size for size, _ in layouts]
        assert any(s.timestamp < 0 for s in samples) or len(sizes) != len(set(sizes))
        return
    assert got.points.timestamps.tolist() == [s.timestamp for s in samples]
    assert same_floats(got.points.values.tolist(), [s.value for s in samples])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_labels, _sample), min_size=1, max_size=8), st.randoms())
def test_the_usual_request_is_read_as_the_general_path_reads_it(
    items: list[tuple[list[Label], Sample]], rnd: random.Random
) -> None:
    """prefix_series reads a request whose samples are all of one size and layout by C-level
    passes over its series; any request can also be read by the general array path
    (_prefix_mixed). Where the keys of both pass check_labels, both give the same keys (listed,
    or sliced one at a time), the same bytes after them, and the same points; and
    Points.at(rows), which decodes only those rows, gives those rows of the points."""
    data = WriteRequest(
        timeseries=[TimeSeries(labels=labels, samples=[s]) for labels, s in items]
    ).SerializeToString()
    full = full_of(data)
    got = prw.prefix_series(data)
    general = prw._prefix_mixed(data, full, np.array(list(map(len, full)), dtype=np.int64))
    assert got is not None and general is not None
    try:
        for key in got.keys + general.keys:
            prw.check_labels(key)
    except prw.NotLabels:
        return
    assert got.keys == general.keys
    fresh = prw.prefix_series(data)  # nothing listed yet: each key sliced where read
    assert fresh is not None
    where = rnd.sample(range(len(items)), rnd.randint(0, len(items)))
    assert list(fresh.rests(where)) == list(general.rests(where))
    assert [fresh.key(i) for i in range(len(items))] == general.keys
    assert (got.points is None) == (general.points is None)
    if got.points is None or general.points is None:
        return
    assert got.points.timestamps.tolist() == general.points.timestamps.tolist()
    assert same_floats(got.points.values.tolist(), general.points.values.tolist())
    rows = np.array(sorted(rnd.sample(range(len(items)), rnd.randint(0, len(items)))), dtype=int)
    for points in (got.points, general.points):
        ts, values = points.at(rows)
        assert ts.tolist() == points.timestamps[rows].tolist()
        assert same_floats(values.tolist(), points.values[rows].tolist())
    lazy = prw.prefix_series(data)  # decoded by rows only: never as a whole
    assert lazy is not None and lazy.points is not None
    ts, values = lazy.points.at(rows)
    assert ts.tolist() == [items[i][1].timestamp for i in rows.tolist()]
    assert same_floats(values.tolist(), [items[i][1].value for i in rows.tolist()])


def _field_varint(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


# Samples a parser accepts, written in ways protobuf does not write them; whether
# prefix_series reads them (a varint written longer than it needs is still read exactly).
_ODD_READ = {"a longer varint"}
_ODD_SAMPLES = {
    "timestamp first": _field_varint(2, T0_MS) + b"\x09" + struct.pack("<d", 1.5),
    "a longer varint": b"\x09" + struct.pack("<d", 1.5) + b"\x10" + bytes([0x80 | 5, 0x80, 0]),
    "an unknown field": b"\x09" + struct.pack("<d", 1.5) + _field_varint(2, T0_MS) + b"\x18\x01",
    "the value twice": b"\x09" + struct.pack("<d", 1.0) + b"\x09" + struct.pack("<d", 2.0),
    "a negative timestamp": b"\x09" + struct.pack("<d", 1.5) + _field_varint(2, 2**64 - 5),
}


@pytest.mark.parametrize("odd", sorted(_ODD_SAMPLES))
def test_samples_in_other_layouts_are_counted_by_the_parser(odd: str) -> None:
    """A sample in a layout protobuf does not write (fields in another order, an unknown field,
    a field twice) gives no points, and a varint longer than it needs gives the parser's
    value; through governance (rules and full stats) the request is counted and routed as the
    parser reads it."""
    sample = _ODD_SAMPLES[odd]
    parsed = Sample.FromString(sample)
    series = [
        TimeSeries(labels=[Label(name="__name__", value=n)]).SerializeToString()
        + b"\x12"
        + varint(len(sample))
        + sample
        for n in ("a", "b")
    ]
    data = prw_codec.frame(series)
    got = prw.prefix_series(data)
    assert got is not None
    if odd in _ODD_READ:
        assert got.points is not None
        assert got.points.timestamps.tolist() == [parsed.timestamp] * 2
        assert got.points.values.tolist() == [parsed.value] * 2
    else:
        assert got.points is None
    now = [T0_MS]
    stats = Stats(StatsConfig(level="full"), pipeline="prw")
    g = Governance(pipeline="prw", engine=engine(now), stats=stats, clock_ms=lambda: now[0])
    out = g.prw(data)
    assert (out.series, out.samples, out.in_samples) == (1, 1, 2)  # `b` goes into a window
    assert {n: c.total for n, c in stats.metrics.items()} == {"a": 1, "b": 1}
    now[0] += 120_000
    assert [(e.name, e.points[0][1]) for e in g.engine.due()] == [("b", parsed.value)]
