"""Tests for the sans-IO codecs: service/codec/compression.py and service/codec/prw.py.

No event loop here: the codecs never touch trio.
"""

from __future__ import annotations

import math
import tracemalloc
import zlib

import cramjam
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service._proto.governor.prw_views_pb2 import SeriesBytes
from service._proto.prometheus import remote_pb2, types_pb2
from service.codec import compression, prw
from service.codec.errors import (
    BadCompression,
    BadProtobuf,
    CodecError,
    DecompressedTooLarge,
    TooLarge,
    UnsupportedEncoding,
)

COMPRESSED = ("snappy", "zstd", "gzip", "deflate")
MiB = 1024 * 1024


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def series(name: str, *values: float, ts: int = 1000, **labels: str) -> types_pb2.TimeSeries:
    pairs = [("__name__", name), *sorted(labels.items())]
    return types_pb2.TimeSeries(
        labels=[types_pb2.Label(name=k, value=v) for k, v in pairs],
        samples=[types_pb2.Sample(value=v, timestamp=ts + i) for i, v in enumerate(values)],
    )


def histogram(count: int, ts: int) -> types_pb2.Histogram:
    return types_pb2.Histogram(
        count_int=count,
        sum=1.5 * count,
        schema=3,
        zero_threshold=1e-128,
        zero_count_int=1,
        positive_spans=[types_pb2.BucketSpan(offset=0, length=2)],
        positive_deltas=[1, count - 2],
        reset_hint=types_pb2.Histogram.ResetHint.NO,
        timestamp=ts,
    )


def name_of(ts: types_pb2.TimeSeries) -> str:
    return next(label.value for label in ts.labels if label.name == "__name__")


# A text of realistic size and variety, so every codec has something to compress.
TEXT = b"".join(
    b'http_requests_total{code="%d",method="GET",handler="/api/v1/%d"} %d\n' % (c, i, i * c)
    for i in range(300)
    for c in (200, 404, 500)
)


# ---- compression: round trips -----------------------------------------------------------------


@pytest.mark.parametrize("encoding", [*COMPRESSED, "identity", ""])
@pytest.mark.parametrize("data", [b"", b"x", TEXT], ids=["empty", "one-byte", "text"])
def test_round_trip(encoding: str, data: bytes) -> None:
    """decompress(compress(x)) == x for every encoding, with a limit of exactly len(x)."""
    body = compression.compress(data, encoding)
    assert compression.decompress(body, encoding, len(data)) == data


def test_compressed_encodings_really_compress() -> None:
    """Each real codec makes the repetitive text much smaller; identity returns it as is."""
    for encoding in COMPRESSED:
        assert len(compression.compress(TEXT, encoding)) < len(TEXT) // 4, encoding
    assert compression.compress(TEXT, "identity") is TEXT


def test_formats_are_the_standard_ones() -> None:
    """snappy is the raw block format, gzip has the gzip header, deflate is zlib-wrapped, zstd is
    a zstd frame: what other implementations produce and expect."""
    assert bytes(cramjam.snappy.decompress_raw(compression.compress(TEXT, "snappy"))) == TEXT
    assert zlib.decompress(compression.compress(TEXT, "gzip"), wbits=31) == TEXT
    assert zlib.decompress(compression.compress(TEXT, "deflate")) == TEXT
    assert bytes(cramjam.zstd.decompress(compression.compress(TEXT, "zstd"))) == TEXT


def test_deflate_accepts_raw_deflate() -> None:
    """Content-Encoding deflate is accepted both zlib-wrapped (RFC 9110) and raw."""
    assert compression.decompress(zlib.compress(TEXT), "deflate", len(TEXT)) == TEXT
    assert compression.decompress(raw_deflate(TEXT), "deflate", len(TEXT)) == TEXT
    assert compression.decompress(raw_deflate(b""), "deflate", 0) == b""


def test_foreign_encoders_are_understood() -> None:
    """Bodies made by other encoders (zlib's gzip, cramjam's zstd streaming API) decode."""
    gz = zlib.compressobj(wbits=31)
    assert compression.decompress(gz.compress(TEXT) + gz.flush(), "gzip", len(TEXT)) == TEXT
    zc = cramjam.zstd.Compressor()
    zc.compress(TEXT)
    assert compression.decompress(bytes(zc.finish()), "zstd", len(TEXT)) == TEXT


@pytest.mark.parametrize(
    ("header", "encoding"),
    [("SNAPPY", "snappy"), (" gzip ", "gzip"), ("x-gzip", "gzip"), ("Zstd", "zstd"), ("", "")],
)
def test_encoding_names_are_normalised(header: str, encoding: str) -> None:
    """Content-Encoding is matched case-insensitively, trimmed, and x-gzip means gzip."""
    body = compression.compress(TEXT, encoding)
    assert compression.decompress(body, header, len(TEXT)) == TEXT


# ---- compression: limits ----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [*COMPRESSED, "identity"])
def test_limit_is_inclusive(encoding: str) -> None:
    """Exactly `limit` decompressed bytes pass; one byte more raises DecompressedTooLarge."""
    body = compression.compress(TEXT, encoding)
    assert compression.decompress(body, encoding, len(TEXT)) == TEXT
    with pytest.raises(DecompressedTooLarge):
        compression.decompress(body, encoding, len(TEXT) - 1)


def test_limit_applies_to_raw_deflate() -> None:
    """The fallback to raw deflate has the same limit."""
    with pytest.raises(DecompressedTooLarge):
        compression.decompress(raw_deflate(TEXT), "deflate", len(TEXT) - 1)


def test_too_large_is_a_codec_error() -> None:
    """DecompressedTooLarge is a TooLarge and a CodecError with its own metric reason."""
    with pytest.raises(DecompressedTooLarge) as info:
        compression.decompress(compression.compress(TEXT, "gzip"), "gzip", 10)
    assert isinstance(info.value, TooLarge)
    assert isinstance(info.value, CodecError)
    assert info.value.reason == "decompressed_too_large"
    assert str(info.value) == "gzip body decompresses past the limit of 10 bytes"


BOMB_SIZE = 200 * MiB


def _bomb(encoding: str) -> bytes:
    """BOMB_SIZE zero bytes, compressed, built in chunks so the test never holds them all."""
    chunk = bytes(MiB)
    n = BOMB_SIZE // MiB
    if encoding == "snappy":  # the block format has no streaming API; zeros are cheap to hold
        return bytes(cramjam.snappy.compress_raw(bytes(BOMB_SIZE)))
    if encoding == "zstd":
        zc = cramjam.zstd.Compressor()
        for _ in range(n):
            zc.compress(chunk)
        return bytes(zc.finish())
    wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15}[encoding]
    c = zlib.compressobj(1, zlib.DEFLATED, wbits)
    return b"".join(c.compress(chunk) for _ in range(n)) + c.flush()


@pytest.mark.parametrize("kind", ["snappy", "zstd", "gzip", "deflate", "raw-deflate"])
def test_zip_bomb_fails_within_the_limit(kind: str) -> None:
    """200 MiB of zeros, compressed to a few hundred KiB at most, is refused with a 1 MiB limit
    without allocating more than a small multiple of the limit."""
    body = _bomb(kind)
    assert len(body) < BOMB_SIZE // 20
    encoding = "deflate" if kind == "raw-deflate" else kind
    tracemalloc.start()
    try:
        with pytest.raises(DecompressedTooLarge):
            compression.decompress(body, encoding, MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB


def test_a_large_limit_costs_nothing_up_front() -> None:
    """Decompressing a small body with a 1 GiB limit allocates about the output, not the limit
    (zstd decompresses into a buffer the size of the limit)."""
    body = {enc: compression.compress(TEXT, enc) for enc in COMPRESSED}
    tracemalloc.start()
    try:
        for encoding in COMPRESSED:
            assert compression.decompress(body[encoding], encoding, 1024 * MiB) == TEXT
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(TEXT)


def test_snappy_refuses_by_its_claimed_length() -> None:
    """A snappy body whose header claims more than the limit is refused before decoding."""
    # varint 2**30 followed by nothing: a header that lies, with no data behind it.
    liar = b"\x80\x80\x80\x80\x04"
    with pytest.raises(DecompressedTooLarge) as info:
        compression.decompress(liar, "snappy", MiB)
    assert str(info.value) == f"snappy body claims {2**30} bytes, over the limit of {MiB}"


# ---- compression: corrupt input ---------------------------------------------------------------


@pytest.mark.parametrize("encoding", COMPRESSED)
def test_truncated_input_is_bad_compression(encoding: str) -> None:
    """A body cut short, at half or by its last byte, raises BadCompression."""
    body = compression.compress(TEXT, encoding)
    for cut in (body[: len(body) // 2], body[:-1]):
        with pytest.raises(BadCompression):
            compression.decompress(cut, encoding, MiB)


@pytest.mark.parametrize("encoding", COMPRESSED)
@pytest.mark.parametrize("body", [b"", b"this is not compressed at all, not even a bit"])
def test_garbage_is_bad_compression(encoding: str, body: bytes) -> None:
    """Empty or plain bytes under a compressed encoding raise BadCompression."""
    with pytest.raises(BadCompression) as info:
        compression.decompress(body, encoding, MiB)
    assert info.value.reason == "bad_compression"


@pytest.mark.parametrize("encoding", ["zstd", "gzip", "deflate"])
def test_corrupt_checksummed_input_is_bad_compression(encoding: str) -> None:
    """A flipped byte in the middle of a checksummed format raises BadCompression."""
    body = bytearray(compression.compress(TEXT, encoding))
    body[len(body) // 2] ^= 0xFF
    with pytest.raises(BadCompression):
        compression.decompress(bytes(body), encoding, MiB)


@pytest.mark.parametrize("encoding", ["br", "compress", "lz4", "snappy-framed", "gzip, br"])
def test_unknown_encoding(encoding: str) -> None:
    """Encodings we do not implement raise UnsupportedEncoding, both ways."""
    with pytest.raises(UnsupportedEncoding) as info:
        compression.decompress(b"x", encoding, MiB)
    assert info.value.reason == "unsupported_encoding"
    with pytest.raises(UnsupportedEncoding):
        compression.compress(b"x", encoding)


# ---- PRW: decode ------------------------------------------------------------------------------


def test_decode_counts_series_samples_and_histograms() -> None:
    """Counts are the number of series, float samples and native histogram samples."""
    req = remote_pb2.WriteRequest(
        timeseries=[
            series("up", 1.0, 1.0, 0.0, job="a"),
            series("up", 1.0, job="b"),
            types_pb2.TimeSeries(
                labels=[types_pb2.Label(name="__name__", value="latency_seconds")],
                histograms=[histogram(10, 1000), histogram(12, 2000)],
            ),
            series("empty"),
        ],
        metadata=[
            types_pb2.MetricMetadata(
                type=types_pb2.MetricMetadata.MetricType.GAUGE,
                metric_family_name="up",
                help="Whether the target is up.",
            )
        ],
    )
    decoded, counts = prw.decode(req.SerializeToString())
    assert decoded == req
    assert counts == prw.Counts(series=4, samples=4, histograms=2)
    assert counts.datapoints == 6


def test_decode_counts_a_series_that_mixes_samples_and_histograms() -> None:
    """A series carrying both float and histogram samples counts both (backends accept both)."""
    ts = series("mixed", 1.0, 2.0)
    ts.histograms.append(histogram(4, 3000))
    req = remote_pb2.WriteRequest(timeseries=[ts])
    _, counts = prw.decode(req.SerializeToString())
    assert counts == prw.Counts(series=1, samples=2, histograms=1)


def test_decode_empty_body_is_an_empty_request() -> None:
    """Zero bytes are a valid, empty WriteRequest."""
    req, counts = prw.decode(b"")
    assert len(req.timeseries) == 0
    assert counts == prw.Counts(0, 0, 0)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff\xff",
        b"hello world",
        b"\x0a\x05ab",  # a length that runs past the end
        # a label name that is not UTF-8
        b"\x0a\x08\x0a\x06\x0a\x02\xff\xfe\x12\x00",
    ],
    ids=["bad-tag", "text", "overrun", "bad-utf8"],
)
def test_decode_garbage_is_bad_protobuf(data: bytes) -> None:
    """Bytes that are not a valid WriteRequest raise BadProtobuf with a one-line message."""
    with pytest.raises(BadProtobuf) as info:
        prw.decode(data)
    assert info.value.reason == "bad_protobuf"
    assert str(info.value) == "body is not a valid protobuf WriteRequest"


def test_decode_truncated_request_is_bad_protobuf() -> None:
    """A serialized request missing its last byte raises BadProtobuf."""
    data = remote_pb2.WriteRequest(timeseries=[series("up", 1.0)]).SerializeToString()
    with pytest.raises(BadProtobuf):
        prw.decode(data[:-1])


def test_concatenation_decodes_to_the_union() -> None:
    """Two serialized WriteRequests joined byte for byte decode to all series of the first, then
    all of the second, and all metadata: what the batcher relies on."""
    md = types_pb2.MetricMetadata(metric_family_name="a", help="first")
    a = remote_pb2.WriteRequest(timeseries=[series("a", 1.0), series("b", 2.0, 3.0)], metadata=[md])
    b = remote_pb2.WriteRequest(
        timeseries=[types_pb2.TimeSeries(labels=[], histograms=[histogram(7, 5)])],
        metadata=[types_pb2.MetricMetadata(metric_family_name="c")],
    )
    c = remote_pb2.WriteRequest(timeseries=[series("d", math.inf)])
    joined, counts = prw.decode(
        a.SerializeToString() + b.SerializeToString() + c.SerializeToString()
    )
    assert list(joined.timeseries) == [*a.timeseries, *b.timeseries, *c.timeseries]
    assert list(joined.metadata) == [*a.metadata, *b.metadata]
    assert counts == prw.Counts(series=4, samples=4, histograms=1)


# ---- PRW: split -------------------------------------------------------------------------------


def test_split_halves_by_series_and_keeps_metadata_first() -> None:
    """An odd number of series splits floor/ceil; metadata goes with the first half only."""
    all_series = [series(f"m{i}", float(i)) for i in range(5)]
    md = [types_pb2.MetricMetadata(metric_family_name="m0", help="h")]
    req = remote_pb2.WriteRequest(timeseries=all_series, metadata=md)
    halves = prw.split(req.SerializeToString())
    assert halves is not None
    first, _ = prw.decode(halves[0])
    second, _ = prw.decode(halves[1])
    assert [name_of(t) for t in first.timeseries] == ["m0", "m1"]
    assert [name_of(t) for t in second.timeseries] == ["m2", "m3", "m4"]
    assert list(first.metadata) == md
    assert len(second.metadata) == 0
    # Nothing is lost or changed: the halves joined are the original.
    rejoined, _ = prw.decode(halves[0] + halves[1])
    assert list(rejoined.timeseries) == all_series


def test_split_two_series() -> None:
    """Two series split one and one."""
    req = remote_pb2.WriteRequest(timeseries=[series("a", 1.0), series("b", 2.0)])
    halves = prw.split(req.SerializeToString())
    assert halves == (
        remote_pb2.WriteRequest(timeseries=[series("a", 1.0)]).SerializeToString(),
        remote_pb2.WriteRequest(timeseries=[series("b", 2.0)]).SerializeToString(),
    )


@pytest.mark.parametrize("n", [0, 1])
def test_split_cannot_split_one_series(n: int) -> None:
    """With fewer than two series there is nothing to split: None."""
    req = remote_pb2.WriteRequest(timeseries=[series("a", 1.0, 2.0, 3.0)] * n)
    assert prw.split(req.SerializeToString()) is None


# ---- hypothesis: anything survives the round trip ---------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=12)
_label = st.builds(types_pb2.Label, name=_text, value=_text)
_float = st.floats(allow_nan=True, allow_infinity=True)
_int64 = st.integers(-(2**63), 2**63 - 1)
_sample = st.builds(types_pb2.Sample, value=_float, timestamp=_int64)
_span = st.builds(
    types_pb2.BucketSpan, offset=st.integers(-(2**31), 2**31 - 1), length=st.integers(0, 2**32 - 1)
)
_histogram = st.builds(
    types_pb2.Histogram,
    count_int=st.integers(0, 2**64 - 1),
    sum=_float,
    schema=st.integers(-4, 8),
    zero_threshold=_float,
    zero_count_int=st.integers(0, 2**64 - 1),
    positive_spans=st.lists(_span, max_size=3),
    positive_deltas=st.lists(_int64, max_size=4),
    negative_spans=st.lists(_span, max_size=2),
    negative_counts=st.lists(_float, max_size=3),
    reset_hint=st.sampled_from([0, 1, 2, 3]),
    timestamp=_int64,
)
_series = st.builds(
    types_pb2.TimeSeries,
    labels=st.lists(_label, max_size=5),
    samples=st.lists(_sample, max_size=5),
    histograms=st.lists(_histogram, max_size=2),
)
_metadata = st.builds(
    types_pb2.MetricMetadata,
    type=st.sampled_from(range(8)),
    metric_family_name=_text,
    help=_text,
    unit=_text,
)
_requests = st.builds(
    remote_pb2.WriteRequest,
    timeseries=st.lists(_series, max_size=6),
    metadata=st.lists(_metadata, max_size=2),
)


def _same_floats(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@settings(max_examples=100)
@given(req=_requests)
def test_any_write_request_survives_every_encoding(req: remote_pb2.WriteRequest) -> None:
    """Any WriteRequest, with any float (NaN, inf, -0.0) in samples and histograms, comes back
    unchanged through compress -> decompress -> decode for every encoding, with exact counts."""
    raw = req.SerializeToString()
    expected_counts = prw.Counts(
        series=len(req.timeseries),
        samples=sum(len(t.samples) for t in req.timeseries),
        histograms=sum(len(t.histograms) for t in req.timeseries),
    )
    for encoding in (*COMPRESSED, "identity"):
        body = compression.compress(raw, encoding)
        out = compression.decompress(body, encoding, len(raw))
        assert out == raw
        decoded, counts = prw.decode(out)
        assert counts == expected_counts
        # Equality of messages is false for NaN; the bytes and each float must match instead.
        assert decoded.SerializeToString() == raw
        for got, want in zip(decoded.timeseries, req.timeseries, strict=True):
            assert list(got.labels) == list(want.labels)
            assert [s.timestamp for s in got.samples] == [s.timestamp for s in want.samples]
            for gs, ws in zip(got.samples, want.samples, strict=True):
                assert _same_floats(gs.value, ws.value)
                assert math.copysign(1, gs.value) == math.copysign(1, ws.value)


@settings(max_examples=50)
@given(a=_requests, b=_requests)
def test_any_two_requests_concatenate(
    a: remote_pb2.WriteRequest, b: remote_pb2.WriteRequest
) -> None:
    """For any two requests, the concatenation decodes to a's series then b's, counts added."""
    joined, counts = prw.decode(a.SerializeToString() + b.SerializeToString())
    both = remote_pb2.WriteRequest(
        timeseries=[*a.timeseries, *b.timeseries], metadata=[*a.metadata, *b.metadata]
    )
    assert joined.SerializeToString() == both.SerializeToString()
    _, ca = prw.decode(a.SerializeToString())
    _, cb = prw.decode(b.SerializeToString())
    assert counts == prw.Counts(
        ca.series + cb.series, ca.samples + cb.samples, ca.histograms + cb.histograms
    )


@settings(max_examples=100)
@given(a=_requests, b=_requests)
def test_count_agrees_with_decode(a: remote_pb2.WriteRequest, b: remote_pb2.WriteRequest) -> None:
    """prw.count, the receiver's C-level validate-and-count, gives exactly decode's counts for any
    request and for any concatenation of two."""
    for raw in (a.SerializeToString(), a.SerializeToString() + b.SerializeToString()):
        assert prw.count(raw) == prw.decode(raw)[1]


@settings(max_examples=100)
@given(a=_requests, b=_requests)
def test_count_samples_agrees_with_decode(
    a: remote_pb2.WriteRequest, b: remote_pb2.WriteRequest
) -> None:
    """prw.count_samples, told the series count, gives decode's counts for any request and any
    concatenation of two, and the request's samples in order."""
    for raw in (a.SerializeToString(), a.SerializeToString() + b.SerializeToString()):
        req, counts = prw.decode(raw)
        got, samples = prw.count_samples(raw, counts.series)
        assert got == counts
        assert list(samples) == [s for ts in req.timeseries for s in ts.samples]


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff\xff",
        b"hello world",
        b"\x0a\x05ab",
        # a sample (field 2 of a series) whose value is cut short
        b"\x0a\x05\x12\x03\x09\x00\x00",
        # an exemplar label name that is not UTF-8
        b"\x0a\x08\x1a\x06\x0a\x04\x0a\x02\xff\xfe",
        # a native histogram whose sum is cut short
        b"\x0a\x05\x22\x03\x19\x00\x00",
        b"\x1a\x04\x12\x02\xff\xfe",
    ],
    ids=[
        "bad-tag",
        "text",
        "overrun",
        "bad-sample",
        "bad-utf8-exemplar",
        "bad-histogram",
        "bad-utf8-metadata",
    ],
)
def test_count_samples_rejects_all_but_the_labels_contents(data: bytes) -> None:
    """prw.count_samples validates everything decode validates except inside the labels (its
    caller checks the labels of series it has not seen): anything else decode refuses, it
    refuses too, with the same one-line reason."""
    with pytest.raises(BadProtobuf):
        prw.decode(data)
    with pytest.raises(BadProtobuf) as info:
        prw.count_samples(data, 1)
    assert str(info.value) == "body is not a valid protobuf WriteRequest"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff\xff",
        b"hello world",
        b"\x0a\x05ab",
        b"\x0a\x08\x0a\x06\x0a\x02\xff\xfe\x12\x00",
        # metadata (field 3) whose family name is not UTF-8
        b"\x1a\x04\x12\x02\xff\xfe",
    ],
    ids=["bad-tag", "text", "overrun", "bad-utf8-label", "bad-utf8-metadata"],
)
def test_count_rejects_what_decode_rejects(data: bytes) -> None:
    """prw.count validates as fully as decode: every body decode refuses, count refuses too."""
    with pytest.raises(BadProtobuf):
        prw.decode(data)
    with pytest.raises(BadProtobuf) as info:
        prw.count(data)
    assert str(info.value) == "body is not a valid protobuf WriteRequest"


@settings(max_examples=200)
@given(
    parts=st.lists(
        st.one_of(st.binary(max_size=300), st.binary(max_size=4).map(lambda b: b * 5000)),
        min_size=1,
        max_size=8,
    )
)
def test_snappy_blocks_join_without_recompression(parts: list[bytes]) -> None:
    """Snappy raw blocks of any data, joined by snappy_concat, decompress (with a standard
    decoder) to the concatenation of their data; the length preamble takes 1 to 3 bytes here."""
    blocks = [compression.compress(p, "snappy") for p in parts]
    joined = compression.snappy_concat(blocks, sum(map(len, parts)))
    assert compression.decompress(joined, "snappy", 1 << 30) == b"".join(parts)
    assert bytes(cramjam.snappy.decompress_raw(joined)) == b"".join(parts)


def test_snappy_concat_of_one_block_is_that_block() -> None:
    """A single block is passed through unchanged (same object, no copy)."""
    block = compression.compress(b"abc" * 100, "snappy")
    assert compression.snappy_concat([block], 300) is block


@settings(max_examples=100)
@given(req=_requests, long=st.integers(0, 3))
def test_frame_is_the_protobuf_serialization(req: remote_pb2.WriteRequest, long: int) -> None:
    """prw.frame builds a WriteRequest of serialized series and metadata byte for byte as
    protobuf serializes it, for series of any length (past its table of 4096 lengths too)."""
    big = types_pb2.TimeSeries(labels=[types_pb2.Label(name="a", value="v" * 5000)])
    series = [ts.SerializeToString() for ts in req.timeseries] + [big.SerializeToString()] * long
    metadata = [m.SerializeToString() for m in req.metadata]
    framed = prw.frame(series, metadata)
    assert framed == SeriesBytes(timeseries=series, metadata=metadata).SerializeToString()
    assert prw.frame(series) == SeriesBytes(timeseries=series).SerializeToString()
    decoded = remote_pb2.WriteRequest.FromString(framed)
    assert [ts.SerializeToString() for ts in decoded.timeseries] == series
    assert list(decoded.metadata) == list(req.metadata)


@settings(max_examples=100)
@given(req=_requests, cut=st.integers(0, 400), long=st.integers(0, 2))
def test_frame_of_spliced_series_is_the_serialization_of_the_joined_series(
    req: remote_pb2.WriteRequest, cut: int, long: int
) -> None:
    """Series given in two parts each (`spliced`, as the rules' relabeled series are: new
    labels, then the bytes after the old ones) are framed after the others exactly as the
    joined parts would be, at any split point and any length (past the 4096-length table)."""
    big = types_pb2.TimeSeries(labels=[types_pb2.Label(name="a", value="v" * 5000)])
    series = [ts.SerializeToString() for ts in req.timeseries] + [big.SerializeToString()] * long
    metadata = [m.SerializeToString() for m in req.metadata]
    half = len(series) // 2
    plain, split = series[:half], series[half:]
    firsts = [s[: min(cut, len(s))] for s in split]
    seconds = [s[min(cut, len(s)) :] for s in split]
    framed = prw.frame(plain, metadata, spliced=(firsts, seconds))
    assert framed == SeriesBytes(timeseries=series, metadata=metadata).SerializeToString()
    assert prw.frame(plain, spliced=([], [])) == prw.frame(plain)
