"""Remote-write requests are validated whole whatever governance runs. With stats, limits or
rules, a request's labels are read first and the rest is validated without them; the
labels of a series not seen before are checked when they are first read. So a series is never
counted, routed or forwarded with labels or samples that a WriteRequest parse refuses."""

from __future__ import annotations

import random
import textwrap

import pytest

from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import Label, Sample, TimeSeries
from service.codec.compression import varint
from service.codec.errors import BadProtobuf
from service.config import StatsConfig
from service.governance.engine import RuleEngine
from service.governance.limits import LimitEngine, load_limits
from service.governance.rules import load_rules
from service.governance.stage import Governance
from service.governance.stats import Stats

RULES = """
rules:
  - name: tag
    match: {name: "up"}
    action: transform
    transform:
      - {op: set, label: team, value: web}
"""

LIMITS = """
limits:
  - name: cap
    match: {name: "up"}
    max_series: 100
    action: drop_new
"""

T0_MS = 1_700_000_000_000


def _field(number: int, body: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return bytes([number << 3 | 2]) + varint(len(body)) + body


def request(*series: bytes) -> bytes:
    return b"".join(_field(1, s) for s in series)


def series(job: bytes, sample: bytes | None = None) -> bytes:
    """A serialized `up{job=...}` with one sample (or the given sample bytes): labels first,
    as Prometheus writes them; `job` as raw bytes, so it may be anything."""
    labels = _field(1, _field(1, b"__name__") + _field(2, b"up")) + _field(
        1, _field(1, b"job") + _field(2, job)
    )
    if sample is None:
        sample = Sample(value=1.0, timestamp=T0_MS).SerializeToString()
    return labels + _field(2, sample)


def governance(kind: str) -> Governance:
    clock = lambda: T0_MS  # noqa: E731
    engine = stats = limits = None
    if kind in ("rules", "all"):
        engine = RuleEngine(
            load_rules(RULES), pipeline="prw", clock_ms=clock, rand=random.Random(1).random
        )
    if kind in ("full stats", "all"):
        stats = Stats(StatsConfig(level="full"), pipeline="prw")
    if kind == "basic stats":
        stats = Stats(StatsConfig(level="basic"), pipeline="prw")
    if kind in ("limits", "all"):
        limits = LimitEngine(load_limits(textwrap.dedent(LIMITS)), pipeline="prw")
    return Governance(pipeline="prw", engine=engine, stats=stats, limits=limits, clock_ms=clock)


def counted(g: Governance) -> tuple[object, ...]:
    """What a refused request must leave as it was."""
    return (
        g.stats.datapoints if g.stats else None,
        dict(g.stats.metrics) if g.stats else None,
        {n: (s.input, s.output) for n, s in g.engine.stats.items()} if g.engine else None,
        len(g.engine.route_cache) if g.engine else None,
    )


KINDS = ["rules", "basic stats", "full stats", "limits", "all"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_series_with_labels_that_are_not_utf8_is_refused(kind: str) -> None:
    """A request that adds, beside a known series, a series whose label value is not UTF-8 is
    refused with the codec's one-line reason and counts nothing; the known series alone still
    passes."""
    g = governance(kind)
    g.prw(request(series(b"a")))
    before = counted(g)
    with pytest.raises(BadProtobuf, match="body is not a valid protobuf WriteRequest"):
        g.prw(request(series(b"a"), series(b"\xff\xfe")))
    assert counted(g) == before
    out = g.prw(request(series(b"a")))
    assert out.in_samples == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "sample",
    [b"\x09\x00\x00", b"\x10\xff", b"\x0b"],
    ids=["value cut short", "timestamp cut short", "bad tag"],
)
def test_a_known_series_with_a_malformed_sample_is_refused(kind: str, sample: bytes) -> None:
    """A series seen before (its labels already checked) whose sample does not parse is refused
    as a whole request, and counts nothing."""
    g = governance(kind)
    g.prw(request(series(b"a")))
    before = counted(g)
    with pytest.raises(BadProtobuf, match="body is not a valid protobuf WriteRequest"):
        g.prw(request(series(b"a", sample)))
    assert counted(g) == before


@pytest.mark.parametrize("kind", KINDS)
def test_what_a_request_carries_is_counted_the_same_as_a_full_parse(kind: str) -> None:
    """The counts reported for a request read labels-first equal a WriteRequest parse's."""
    g = governance(kind)
    req = WriteRequest(
        timeseries=[
            TimeSeries(
                labels=[Label(name="__name__", value="up"), Label(name="job", value=str(i))],
                samples=[Sample(value=float(j), timestamp=T0_MS + j) for j in range(i % 3 + 1)],
            )
            for i in range(7)
        ]
    )
    out = g.prw(req.SerializeToString())
    assert (out.in_samples, out.in_histograms) == (
        sum(len(ts.samples) for ts in req.timeseries),
        0,
    )
