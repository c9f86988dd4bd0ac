"""Tests for the sans-IO OTLP metrics codec: service/codec/otlp.py.

Decoding (protobuf and the OTLP JSON mapping), admission, responses, splitting and the batching
property (concatenated requests decode to the union). No event loop here: the codec never touches
trio.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from google.rpc.status_pb2 import Status
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Exemplar,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
    Summary,
    SummaryDataPoint,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from service.codec import otlp
from service.codec.errors import BadJSON, BadProtobuf, CodecError

# The oneof `data` of Metric, spelled out here so the tests do not lean on otlp.KINDS.
KINDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")
CUMULATIVE = 2  # AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = 1  # AGGREGATION_TEMPORALITY_DELTA
BAD_PROTOBUF = "body is not a valid protobuf ExportMetricsServiceRequest"


# ---- helpers: build small messages, and look at them without the codec -----------------------


def attr(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def gauge(name: str, *values: float, **kw: Any) -> Metric:
    points = [NumberDataPoint(time_unix_nano=1000 + i, as_double=v) for i, v in enumerate(values)]
    return Metric(name=name, gauge=Gauge(data_points=points), **kw)


def request(*resources: ResourceMetrics) -> ExportMetricsServiceRequest:
    return ExportMetricsServiceRequest(resource_metrics=resources)


def resource(*scopes: ScopeMetrics, service: str = "svc", **kw: Any) -> ResourceMetrics:
    return ResourceMetrics(
        resource=Resource(attributes=[attr("service.name", service)]), scope_metrics=scopes, **kw
    )


def scope(*metrics: Metric, name: str = "lib", **kw: Any) -> ScopeMetrics:
    return ScopeMetrics(scope=InstrumentationScope(name=name, version="1.0"), metrics=metrics, **kw)


def points_of(metric: Metric) -> list[Any]:
    """The datapoints of `metric`, whatever its kind; [] when its data is not set."""
    for kind in KINDS:
        if metric.HasField(kind):
            return list(getattr(metric, kind).data_points)
    return []


def true_count(req: ExportMetricsServiceRequest) -> tuple[int, int]:
    """(datapoints, metrics), by walking every metric of every scope of every resource."""
    metrics = [m for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
    return sum(len(points_of(m)) for m in metrics), len(metrics)


def _bytes(msg: Any) -> bytes:
    return msg.SerializeToString(deterministic=True)


def flatten(req: ExportMetricsServiceRequest) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """Every datapoint with everything it belongs to: (resource and its schema URL, scope and its
    schema URL, the metric without its points (name, description, unit, kind, temporality,
    monotonicity, metadata), the datapoint), sorted, so two requests that hold the same
    datapoints in the same places flatten equal however they are cut."""
    rows = []
    for rm in req.resource_metrics:
        where = _bytes(ResourceMetrics(resource=rm.resource, schema_url=rm.schema_url))
        for sm in rm.scope_metrics:
            within = _bytes(ScopeMetrics(scope=sm.scope, schema_url=sm.schema_url))
            for m in sm.metrics:
                shell = Metric()
                shell.CopyFrom(m)
                kind = shell.WhichOneof("data")
                if kind:
                    del getattr(shell, kind).data_points[:]
                rows.extend((where, within, _bytes(shell), _bytes(dp)) for dp in points_of(m))
    return sorted(rows)


def names_by_place(req: ExportMetricsServiceRequest) -> list[tuple[bytes, bytes, list[Metric]]]:
    """The metrics of each non-empty scope, with the resource and scope they sit under."""
    return [
        (_bytes(rm.resource), _bytes(sm.scope), list(sm.metrics))
        for rm in req.resource_metrics
        for sm in rm.scope_metrics
        if len(sm.metrics)
    ]


def without_nameless(req: ExportMetricsServiceRequest) -> ExportMetricsServiceRequest:
    """A copy of `req` with every metric that has an empty name taken out (scopes kept)."""
    out = ExportMetricsServiceRequest()
    out.CopyFrom(req)
    for rm in out.resource_metrics:
        for sm in rm.scope_metrics:
            keep = [m for m in sm.metrics if m.name]
            del sm.metrics[:]
            sm.metrics.extend(keep)
    return out


# ---- hypothesis: random but valid ExportMetricsServiceRequests --------------------------------
# Small lists keep each example fast; numbers cover their whole wire range (uint64 times above
# 2**53, the full int64 range). No NaN: it makes message equality false.

_text = st.text(st.characters(codec="utf-8"), max_size=5)
_name = st.text(st.characters(codec="utf-8"), min_size=1, max_size=5)
_uint64 = st.integers(0, 2**64 - 1)
_int64 = st.integers(-(2**63), 2**63 - 1)
_uint32 = st.integers(0, 2**32 - 1)
_sint32 = st.integers(-(2**31), 2**31 - 1)
_double = st.floats(allow_nan=False)
_doubles = st.lists(_double, max_size=2)
_counts = st.lists(_uint64, max_size=3)

_scalar_value = st.one_of(
    st.builds(AnyValue, string_value=_text),
    st.builds(AnyValue, int_value=_int64),
    st.builds(AnyValue, double_value=_double),
    st.builds(AnyValue, bool_value=st.booleans()),
    st.builds(AnyValue, bytes_value=st.binary(max_size=4)),
)


def _array(values: st.SearchStrategy[AnyValue]) -> st.SearchStrategy[AnyValue]:
    return st.lists(values, max_size=2).map(lambda vs: AnyValue(array_value=ArrayValue(values=vs)))


def _kvlist(values: st.SearchStrategy[AnyValue]) -> st.SearchStrategy[AnyValue]:
    kvs = st.lists(st.builds(KeyValue, key=_text, value=values), max_size=2)
    return kvs.map(lambda kvs: AnyValue(kvlist_value=KeyValueList(values=kvs)))


# Nested two levels deep (a kvlist of arrays, an array of kvlists), spelled out: st.recursive
# costs several times more per example.
_nested_value = st.one_of(_scalar_value, _array(_scalar_value), _kvlist(_scalar_value))
_any_value = st.one_of(_scalar_value, _array(_nested_value), _kvlist(_nested_value))
_attributes = st.lists(st.builds(KeyValue, key=_text, value=_any_value), max_size=2)
# Datapoints, exemplars and metric metadata carry at most one attribute: they are many.
_attribute = st.lists(st.builds(KeyValue, key=_text, value=_any_value), max_size=1)


def _one_of_values(cls: type, **common: Any) -> st.SearchStrategy[Any]:
    """`cls` (a message with the oneof as_int / as_double) with either member set."""
    return st.one_of(
        st.builds(cls, as_int=_int64, **common), st.builds(cls, as_double=_double, **common)
    )


_exemplar = _one_of_values(
    Exemplar,
    filtered_attributes=_attribute,
    time_unix_nano=_uint64,
    trace_id=st.one_of(st.binary(min_size=16, max_size=16), st.just(b"")),
    span_id=st.one_of(st.binary(min_size=8, max_size=8), st.just(b"")),
)
_exemplars = st.lists(_exemplar, max_size=1)
_point = {
    "attributes": _attribute,
    "start_time_unix_nano": _uint64,
    "time_unix_nano": _uint64,
    "flags": _uint32,
}
# sum, min and max of histograms are proto3 `optional`: set or not set.
_optional_stats = st.fixed_dictionaries(
    {}, optional={"sum": _double, "min": _double, "max": _double}
)


def _with_optional(cls: type, **fields: Any) -> st.SearchStrategy[Any]:
    return st.builds(lambda opt, **kw: cls(**kw, **opt), _optional_stats, **fields)


_number_point = _one_of_values(NumberDataPoint, exemplars=_exemplars, **_point)
_histogram_point = _with_optional(
    HistogramDataPoint,
    count=_uint64,
    bucket_counts=_counts,
    explicit_bounds=_doubles,
    exemplars=_exemplars,
    **_point,
)
_buckets = st.builds(ExponentialHistogramDataPoint.Buckets, offset=_sint32, bucket_counts=_counts)
_exp_histogram_point = _with_optional(
    ExponentialHistogramDataPoint,
    count=_uint64,
    scale=st.integers(-10, 20),
    zero_count=_uint64,
    zero_threshold=_double,
    positive=_buckets,
    negative=_buckets,
    exemplars=_exemplars,
    **_point,
)
_summary_point = st.builds(
    SummaryDataPoint,
    count=_uint64,
    sum=_double,
    quantile_values=st.lists(
        st.builds(SummaryDataPoint.ValueAtQuantile, quantile=_double, value=_double), max_size=2
    ),
    **_point,
)
_temporality = st.sampled_from([0, DELTA, CUMULATIVE])


def _metric(names: st.SearchStrategy[str], min_points: int) -> st.SearchStrategy[Metric]:
    """A metric of any kind with 0 to 3 datapoints (at least `min_points`; with 0, its data may
    also be not set at all)."""

    def points(point: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
        return st.lists(point, min_size=min_points, max_size=3)

    data = [
        st.builds(Gauge, data_points=points(_number_point)).map(lambda d: {"gauge": d}),
        st.builds(
            Sum,
            data_points=points(_number_point),
            aggregation_temporality=_temporality,
            is_monotonic=st.booleans(),
        ).map(lambda d: {"sum": d}),
        st.builds(
            Histogram, data_points=points(_histogram_point), aggregation_temporality=_temporality
        ).map(lambda d: {"histogram": d}),
        st.builds(
            ExponentialHistogram,
            data_points=points(_exp_histogram_point),
            aggregation_temporality=_temporality,
        ).map(lambda d: {"exponential_histogram": d}),
        st.builds(Summary, data_points=points(_summary_point)).map(lambda d: {"summary": d}),
    ]
    if not min_points:
        data.append(st.just({}))
    return st.builds(
        lambda data, **kw: Metric(**kw, **data),
        st.one_of(data),
        name=names,
        description=_text,
        unit=_text,
        metadata=_attribute,
    )


def _requests(
    metric: st.SearchStrategy[Metric], min_size: int = 0
) -> st.SearchStrategy[ExportMetricsServiceRequest]:
    """Up to 3 resources of 1 or 2 scopes of up to 3 `metric`s; `min_size` 1 leaves out scopes
    without metrics (and, with metrics of at least one point, anything without datapoints)."""
    scope_metrics = st.builds(
        ScopeMetrics,
        scope=st.builds(
            InstrumentationScope,
            name=_text,
            version=_text,
            attributes=_attributes,
            dropped_attributes_count=_uint32,
        ),
        metrics=st.lists(metric, min_size=min_size, max_size=3),
        schema_url=_text,
    )
    resource_metrics = st.builds(
        ResourceMetrics,
        resource=st.builds(Resource, attributes=_attributes, dropped_attributes_count=_uint32),
        scope_metrics=st.lists(scope_metrics, min_size=1, max_size=2),
        schema_url=_text,
    )
    return st.builds(
        ExportMetricsServiceRequest, resource_metrics=st.lists(resource_metrics, max_size=3)
    )


_maybe_name = st.one_of(st.just(""), _name)
# Any request: metrics with or without names, datapoints or data.
any_requests = _requests(_metric(_maybe_name, 0))
# Every metric has a name.
requests = _requests(_metric(_name, 0))
# Every resource, scope and metric holds datapoints.
dense_requests = _requests(_metric(_maybe_name, 1), min_size=1)

# Each example is a whole request (tens of draws per datapoint): 100 keeps the file fast.
SETTINGS = settings(max_examples=100, deadline=None)


# ---- round trips -----------------------------------------------------------------------------


@SETTINGS
@given(req=any_requests)
def test_protobuf_round_trip(req: ExportMetricsServiceRequest) -> None:
    """decode(serialized request) is the request, and count() is the true count."""
    decoded = otlp.decode(req.SerializeToString())
    assert decoded == req
    assert otlp.count(decoded) == true_count(req)


@SETTINGS
@given(req=any_requests)
def test_json_round_trip(req: ExportMetricsServiceRequest) -> None:
    """decode_json(encode_json(request)) is the request: the JSON and protobuf forms agree on
    everything (uint64 times above 2**53, int64 extremes, infinities, ids, bytes, kvlists)."""
    body = otlp.encode_json(req)
    assert otlp.decode_json(body) == req
    # Admitted as JSON, it is forwarded as the protobuf of the same request (named metrics).
    admitted = otlp.admit(body, json_body=True)
    assert admitted.data == without_nameless(req).SerializeToString()
    assert admitted.request == without_nameless(req)


@SETTINGS
@given(req=requests)
def test_admit_forwards_the_bytes_it_was_given(req: ExportMetricsServiceRequest) -> None:
    """When every metric has a name, admit returns the body it was given (not a re-encoding),
    the true datapoint and metric counts, nothing rejected, and the decoded request."""
    data = req.SerializeToString()
    points, metrics = true_count(req)
    admitted = otlp.admit(data)
    assert admitted.data is data
    assert admitted == otlp.Admitted(data, points, metrics, 0, "")
    assert admitted.request == req


def test_admit_does_not_re_encode() -> None:
    """A valid but non-canonical body (an empty schema URL written out, which protobuf drops on
    re-encoding) is forwarded byte for byte."""
    rm = resource(scope(gauge("up", 1.0))).SerializeToString() + b"\x1a\x00"  # field 3, ""
    assert len(rm) < 128  # so that its length is one byte
    data = bytes([0x0A, len(rm)]) + rm
    canonical = request(resource(scope(gauge("up", 1.0)))).SerializeToString()
    assert otlp.decode(data).SerializeToString() == canonical != data
    admitted = otlp.admit(data)
    assert admitted == otlp.Admitted(data, 1, 1)
    assert admitted.data is data


def test_count_of_every_kind() -> None:
    """count() adds the datapoints of all five kinds; a metric without data counts as a metric
    with no points."""
    req = request(
        resource(
            scope(
                gauge("g", 1.0, 2.0),
                Metric(name="s", sum=Sum(data_points=[NumberDataPoint(as_int=1)] * 3)),
                Metric(name="h", histogram=Histogram(data_points=[HistogramDataPoint()])),
                Metric(
                    name="e",
                    exponential_histogram=ExponentialHistogram(
                        data_points=[ExponentialHistogramDataPoint()] * 2
                    ),
                ),
                Metric(name="q", summary=Summary(data_points=[SummaryDataPoint()] * 4)),
                Metric(name="nothing"),
            )
        )
    )
    assert otlp.KINDS == KINDS
    assert otlp.count(req) == (12, 6)
    assert otlp.count(ExportMetricsServiceRequest()) == (0, 0)


# ---- the OTLP JSON mapping -------------------------------------------------------------------

TRACE_ID = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SPAN_ID = bytes.fromhex("eee19b7ec3c1b174")


def test_encode_json_exact_document() -> None:
    """encode_json writes lowerCamelCase keys, 64-bit integers as strings, enums as numbers and
    exemplar ids as lowercase hex (not base64, as proto3 JSON would), compactly."""
    req = request(
        ResourceMetrics(
            scope_metrics=[
                ScopeMetrics(
                    metrics=[
                        Metric(
                            name="requests",
                            sum=Sum(
                                aggregation_temporality=CUMULATIVE,
                                is_monotonic=True,
                                data_points=[
                                    NumberDataPoint(
                                        time_unix_nano=2**64 - 1,
                                        as_int=-(2**63),
                                        exemplars=[
                                            Exemplar(
                                                trace_id=TRACE_ID, span_id=SPAN_ID, as_double=1.5
                                            )
                                        ],
                                    )
                                ],
                            ),
                        )
                    ]
                )
            ]
        )
    )
    body = otlp.encode_json(req)
    assert json.loads(body) == {
        "resourceMetrics": [
            {
                "scopeMetrics": [
                    {
                        "metrics": [
                            {
                                "name": "requests",
                                "sum": {
                                    "dataPoints": [
                                        {
                                            "timeUnixNano": "18446744073709551615",
                                            "asInt": "-9223372036854775808",
                                            "exemplars": [
                                                {
                                                    "asDouble": 1.5,
                                                    "spanId": "eee19b7ec3c1b174",
                                                    "traceId": "5b8efff798038103d269b633813fc60c",
                                                }
                                            ],
                                        }
                                    ],
                                    "aggregationTemporality": 2,
                                    "isMonotonic": True,
                                },
                            }
                        ]
                    }
                ]
            }
        ]
    }
    assert b" " not in body
    assert otlp.decode_json(body) == req


# The example of the OTLP specification (opentelemetry-proto examples/metrics.json), as sent:
# integers as JSON numbers, temporality as a number.
SPEC_EXAMPLE = b"""{
  "resourceMetrics": [{
    "resource": {
      "attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]
    },
    "scopeMetrics": [{
      "scope": {
        "name": "my.library",
        "version": "1.0.0",
        "attributes": [
          {"key": "my.scope.attribute", "value": {"stringValue": "some scope attribute"}}
        ]
      },
      "metrics": [
        {
          "name": "my.counter", "unit": "1", "description": "I`m a Counter",
          "sum": {
            "aggregationTemporality": 1,
            "isMonotonic": true,
            "dataPoints": [{
              "asDouble": 5,
              "startTimeUnixNano": 1544712660300000000,
              "timeUnixNano": 1544712660300000000,
              "attributes": [{"key": "my.counter.attr", "value": {"stringValue": "some value"}}]
            }]
          }
        },
        {
          "name": "my.gauge", "unit": "1", "description": "I`m a Gauge",
          "gauge": {
            "dataPoints": [{
              "asDouble": 10,
              "timeUnixNano": 1544712660300000000,
              "attributes": [{"key": "my.gauge.attr", "value": {"stringValue": "some value"}}]
            }]
          }
        },
        {
          "name": "my.histogram", "unit": "1", "description": "I`m a Histogram",
          "histogram": {
            "aggregationTemporality": 1,
            "dataPoints": [{
              "startTimeUnixNano": 1544712660300000000,
              "timeUnixNano": 1544712660300000000,
              "count": 3, "sum": 3, "bucketCounts": [1, 1, 1], "explicitBounds": [1],
              "min": 1, "max": 1,
              "attributes": [
                {"key": "my.histogram.attr", "value": {"stringValue": "some value"}}
              ]
            }]
          }
        }
      ]
    }]
  }]
}"""


def test_decode_json_spec_example() -> None:
    """The OTLP specification's example document decodes to exactly the message it describes."""
    t = 1544712660300000000
    expected = request(
        ResourceMetrics(
            resource=Resource(attributes=[attr("service.name", "my.service")]),
            scope_metrics=[
                ScopeMetrics(
                    scope=InstrumentationScope(
                        name="my.library",
                        version="1.0.0",
                        attributes=[attr("my.scope.attribute", "some scope attribute")],
                    ),
                    metrics=[
                        Metric(
                            name="my.counter",
                            unit="1",
                            description="I`m a Counter",
                            sum=Sum(
                                aggregation_temporality=DELTA,
                                is_monotonic=True,
                                data_points=[
                                    NumberDataPoint(
                                        as_double=5.0,
                                        start_time_unix_nano=t,
                                        time_unix_nano=t,
                                        attributes=[attr("my.counter.attr", "some value")],
                                    )
                                ],
                            ),
                        ),
                        Metric(
                            name="my.gauge",
                            unit="1",
                            description="I`m a Gauge",
                            gauge=Gauge(
                                data_points=[
                                    NumberDataPoint(
                                        as_double=10.0,
                                        time_unix_nano=t,
                                        attributes=[attr("my.gauge.attr", "some value")],
                                    )
                                ]
                            ),
                        ),
                        Metric(
                            name="my.histogram",
                            unit="1",
                            description="I`m a Histogram",
                            histogram=Histogram(
                                aggregation_temporality=DELTA,
                                data_points=[
                                    HistogramDataPoint(
                                        start_time_unix_nano=t,
                                        time_unix_nano=t,
                                        count=3,
                                        sum=3.0,
                                        bucket_counts=[1, 1, 1],
                                        explicit_bounds=[1.0],
                                        min=1.0,
                                        max=1.0,
                                        attributes=[attr("my.histogram.attr", "some value")],
                                    )
                                ],
                            ),
                        ),
                    ],
                )
            ],
        )
    )
    assert otlp.decode_json(SPEC_EXAMPLE) == expected
    assert otlp.admit(SPEC_EXAMPLE, json_body=True) == otlp.Admitted(
        expected.SerializeToString(), 3, 3
    )


def test_decode_json_accepts_proto_field_names() -> None:
    """snake_case proto field names are accepted everywhere, including the metric kind and the
    exemplar ids (which are still hex)."""
    doc = {
        "resource_metrics": [
            {
                "schema_url": "https://example.com/s",
                "scope_metrics": [
                    {
                        "metrics": [
                            {
                                "name": "latency",
                                "exponential_histogram": {
                                    "aggregation_temporality": "AGGREGATION_TEMPORALITY_DELTA",
                                    "data_points": [
                                        {
                                            "time_unix_nano": "5",
                                            "zero_count": 3,
                                            "positive": {"offset": -2, "bucket_counts": ["1", 2]},
                                            "exemplars": [
                                                {
                                                    "trace_id": TRACE_ID.hex(),
                                                    "span_id": SPAN_ID.hex(),
                                                    "as_int": 7,
                                                    "filtered_attributes": [
                                                        {
                                                            "key": "k",
                                                            "value": {"string_value": "v"},
                                                        }
                                                    ],
                                                }
                                            ],
                                        }
                                    ],
                                },
                            }
                        ]
                    }
                ],
            }
        ]
    }
    point = ExponentialHistogramDataPoint(
        time_unix_nano=5,
        zero_count=3,
        positive=ExponentialHistogramDataPoint.Buckets(offset=-2, bucket_counts=[1, 2]),
        exemplars=[
            Exemplar(
                trace_id=TRACE_ID, span_id=SPAN_ID, as_int=7, filtered_attributes=[attr("k", "v")]
            )
        ],
    )
    expected = request(
        ResourceMetrics(
            schema_url="https://example.com/s",
            scope_metrics=[
                ScopeMetrics(
                    metrics=[
                        Metric(
                            name="latency",
                            exponential_histogram=ExponentialHistogram(
                                aggregation_temporality=DELTA, data_points=[point]
                            ),
                        )
                    ]
                )
            ],
        )
    )
    assert otlp.decode_json(json.dumps(doc).encode()) == expected


def _sum_doc(temporality: Any, point: dict[str, Any]) -> bytes:
    metric = {"name": "m", "sum": {"aggregationTemporality": temporality, "dataPoints": [point]}}
    return json.dumps({"resourceMetrics": [{"scopeMetrics": [{"metrics": [metric]}]}]}).encode()


def _exemplar_doc(exemplar: dict[str, Any]) -> bytes:
    point = {"asDouble": 1, "exemplars": [exemplar]}
    metric = {"name": "m", "gauge": {"dataPoints": [point]}}
    return json.dumps({"resourceMetrics": [{"scopeMetrics": [{"metrics": [metric]}]}]}).encode()


@pytest.mark.parametrize("spelling", [str.lower, str.upper], ids=["lower", "upper"])
def test_decode_json_ids_are_case_insensitive_hex(spelling: Any) -> None:
    """Exemplar trace and span ids are hex in either case (the OTLP JSON mapping)."""
    body = _exemplar_doc({"traceId": spelling(TRACE_ID.hex()), "spanId": spelling(SPAN_ID.hex())})
    point = otlp.decode_json(body).resource_metrics[0].scope_metrics[0].metrics[0].gauge
    exemplar = point.data_points[0].exemplars[0]
    assert (exemplar.trace_id, exemplar.span_id) == (TRACE_ID, SPAN_ID)


@pytest.mark.parametrize(
    ("temporality", "expected"),
    [
        ("AGGREGATION_TEMPORALITY_CUMULATIVE", CUMULATIVE),
        (2, CUMULATIVE),
        ("AGGREGATION_TEMPORALITY_DELTA", DELTA),
        (1, DELTA),
        ("AGGREGATION_TEMPORALITY_UNSPECIFIED", 0),
    ],
)
def test_decode_json_enums_as_names_or_numbers(temporality: Any, expected: int) -> None:
    """aggregationTemporality is accepted as the enum's name or its number."""
    rm = otlp.decode_json(_sum_doc(temporality, {"asInt": 1})).resource_metrics[0]
    assert rm.scope_metrics[0].metrics[0].sum.aggregation_temporality == expected


@pytest.mark.parametrize("as_string", [True, False], ids=["string", "number"])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeUnixNano", 2**64 - 1),
        ("startTimeUnixNano", 2**53 + 1),
        ("asInt", -(2**63)),
        ("asInt", 2**63 - 1),
    ],
)
def test_decode_json_64_bit_integers(field: str, value: int, as_string: bool) -> None:
    """64-bit integers are accepted as decimal strings and as JSON numbers, exactly, at the ends
    of their ranges and past 2**53 (where a double would round)."""
    body = _sum_doc(1, {field: str(value) if as_string else value})
    point = otlp.decode_json(body).resource_metrics[0].scope_metrics[0].metrics[0].sum
    assert getattr(point.data_points[0], _snake(field)) == value


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def test_decode_json_ignores_unknown_fields() -> None:
    """Fields this version of OTLP does not know are ignored at every level (the specification
    asks receivers to), including unknown metric kinds."""
    body = json.dumps(
        {
            "resourceMetrics": [
                {
                    "futureField": {"x": [1, 2]},
                    "scopeMetrics": [
                        {
                            "scope": {"name": "lib", "newScopeThing": True},
                            "metrics": [
                                {
                                    "name": "up",
                                    "futureKind": {"dataPoints": [{}]},
                                    "gauge": {"dataPoints": [{"asDouble": 1, "newField": "x"}]},
                                }
                            ],
                        }
                    ],
                }
            ],
            "somethingElse": None,
        }
    ).encode()
    expected = request(
        ResourceMetrics(
            scope_metrics=[
                ScopeMetrics(
                    scope=InstrumentationScope(name="lib"),
                    metrics=[
                        Metric(name="up", gauge=Gauge(data_points=[NumberDataPoint(as_double=1)]))
                    ],
                )
            ]
        )
    )
    assert otlp.decode_json(body) == expected


def test_decode_json_empty_object_is_an_empty_request() -> None:
    """{} is a valid, empty request."""
    assert otlp.decode_json(b"{}") == ExportMetricsServiceRequest()
    assert otlp.admit(b"{}", json_body=True) == otlp.Admitted(b"", 0, 0)


# ---- bad input -------------------------------------------------------------------------------


def _small_request() -> ExportMetricsServiceRequest:
    return request(
        resource(
            scope(
                gauge("up", 1.0, 0.0, unit="1"),
                Metric(
                    name="h",
                    histogram=Histogram(
                        data_points=[HistogramDataPoint(count=2, bucket_counts=[1, 1])]
                    ),
                ),
            )
        )
    )


def test_truncated_protobuf_is_bad_protobuf() -> None:
    """A serialized request cut anywhere inside it raises BadProtobuf with a one-line message,
    from decode, admit and split alike."""
    data = _small_request().SerializeToString()
    for cut in range(1, len(data)):
        for call in (otlp.decode, otlp.admit, otlp.split):
            with pytest.raises(BadProtobuf) as info:
                call(data[:cut])
            assert str(info.value) == BAD_PROTOBUF
            assert info.value.reason == "bad_protobuf"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff\xff",
        b"hello world",
        b"\x0a\x05ab",  # a length that runs past the end
        b"\x0a\x08\x12\x06\x12\x04\x0a\x02\xff\xfe",  # a metric name that is not UTF-8
    ],
    ids=["bad-tag", "text", "overrun", "bad-utf8-name"],
)
def test_garbage_is_bad_protobuf(data: bytes) -> None:
    """Bytes that are not a valid ExportMetricsServiceRequest raise BadProtobuf."""
    with pytest.raises(BadProtobuf) as info:
        otlp.admit(data)
    assert str(info.value) == BAD_PROTOBUF


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "body is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (b"", "body is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (b'{"resourceMetrics": [', None),
        (b"\xff\xfe\xfd", None),  # a UTF-16 byte order mark, then half a character
        (b"[]", "body is not a JSON object"),
        (b"[{}]", "body is not a JSON object"),
        (b"5", "body is not a JSON object"),
        (b'"resourceMetrics"', "body is not a JSON object"),
        (b"null", "body is not a JSON object"),
        (b"[" * 100_000, None),
        (b'{"a":' * 100_000, None),
        (b'{"resourceMetrics": 5}', None),
        (b'{"resourceMetrics": [5]}', None),
        (b'{"resourceMetrics": [{"scopeMetrics": {}}]}', None),
        (_sum_doc(1, {"asDouble": "abc"}), None),
        (_sum_doc(1, {"asInt": 1.5}), None),
        (_sum_doc(1, {"asInt": str(2**63)}), None),
        (_sum_doc(1, {"timeUnixNano": -1}), None),
        (_sum_doc(1, {"attributes": [{"key": 5}]}), None),
        (_sum_doc([], {}), None),
        (
            _exemplar_doc({"traceId": "not hex at all"}),
            "exemplar traceId 'not hex at all' is not hex",
        ),
        (_exemplar_doc({"spanId": "abc"}), "exemplar spanId 'abc' is not hex"),
        (_exemplar_doc({"trace_id": "zz"}), "exemplar trace_id 'zz' is not hex"),
        (_exemplar_doc({"traceId": 5}), None),
        # proto3 JSON would take base64; OTLP JSON ids are hex only.
        (
            _exemplar_doc({"traceId": "W47/95gDgQPSabYzgT/GDA=="}),
            "exemplar traceId 'W47/95gDgQPSabYzgT/GDA==' is not hex",
        ),
    ],
    ids=lambda v: None if isinstance(v, bytes | str) and len(v) > 60 else repr(v)[:40],
)
def test_bad_json_is_bad_json(body: bytes, message: str | None) -> None:
    """Anything that is not an OTLP JSON request (not JSON, not an object, wrong types, values out
    of range, ids that are not hex, nesting deeper than any parser allows) raises BadJSON with a
    one-line message, from decode_json and admit, and never another exception."""
    for call in (otlp.decode_json, lambda b: otlp.admit(b, json_body=True)):
        with pytest.raises(BadJSON) as info:
            call(body)
        assert info.value.reason == "bad_json"
        assert isinstance(info.value, CodecError)
        text = str(info.value)
        assert "\n" not in text
        assert len(text) <= 250
        if message is not None:
            assert text == message


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_admit_of_any_bytes_is_admitted_or_a_codec_error(data: bytes) -> None:
    """For any bytes, admit (protobuf or JSON) returns or raises a CodecError; nothing else."""
    for json_body in (False, True):
        try:
            admitted = otlp.admit(data, json_body=json_body)
        except CodecError:
            continue
        assert isinstance(admitted, otlp.Admitted)


def _every_kind() -> ExportMetricsServiceRequest:
    """One request that uses every part of the mapping: all AnyValue types, all five kinds,
    exemplars with ids, optional histogram fields, buckets."""
    values = [
        AnyValue(string_value="s"),
        AnyValue(int_value=-(2**63)),
        AnyValue(double_value=0.25),
        AnyValue(bool_value=True),
        AnyValue(bytes_value=b"\x00\xff"),
        AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1)])),
        AnyValue(kvlist_value=KeyValueList(values=[attr("inner", "v")])),
    ]
    attrs = [KeyValue(key=f"k{i}", value=v) for i, v in enumerate(values)]
    exemplar = Exemplar(
        trace_id=TRACE_ID, span_id=SPAN_ID, as_int=1, filtered_attributes=[attr("f", "v")]
    )
    buckets = ExponentialHistogramDataPoint.Buckets(offset=-1, bucket_counts=[1, 2])
    metrics = [
        Metric(
            name="g",
            unit="1",
            gauge=Gauge(data_points=[NumberDataPoint(as_int=3, attributes=attrs[:2])]),
        ),
        Metric(
            name="s",
            sum=Sum(
                aggregation_temporality=CUMULATIVE,
                is_monotonic=True,
                data_points=[NumberDataPoint(as_double=1.5, exemplars=[exemplar], flags=1)],
            ),
        ),
        Metric(
            name="h",
            histogram=Histogram(
                aggregation_temporality=DELTA,
                data_points=[
                    HistogramDataPoint(
                        count=2,
                        sum=2.0,
                        min=0.5,
                        max=1.5,
                        bucket_counts=[1, 1],
                        explicit_bounds=[1.0],
                        exemplars=[exemplar],
                    )
                ],
            ),
        ),
        Metric(
            name="e",
            exponential_histogram=ExponentialHistogram(
                data_points=[
                    ExponentialHistogramDataPoint(
                        scale=3,
                        zero_count=1,
                        positive=buckets,
                        negative=buckets,
                        exemplars=[Exemplar(span_id=SPAN_ID, as_double=0.5)],
                    )
                ]
            ),
        ),
        Metric(
            name="q",
            summary=Summary(
                data_points=[
                    SummaryDataPoint(
                        count=1,
                        sum=1.0,
                        quantile_values=[SummaryDataPoint.ValueAtQuantile(quantile=0.5, value=1)],
                    )
                ]
            ),
        ),
    ]
    return request(
        ResourceMetrics(
            resource=Resource(attributes=attrs),
            scope_metrics=[
                ScopeMetrics(
                    scope=InstrumentationScope(name="lib", version="1", attributes=attrs[3:]),
                    metrics=metrics,
                )
            ],
        )
    )


def _paths(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path of every value inside `doc` (not `doc` itself)."""
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    out = []
    for key, value in items:
        out.append((*path, key))
        out.extend(_paths(value, (*path, key)))
    return out


EVERY_KIND_DOC = json.loads(otlp.encode_json(_every_kind()))
EVERY_KIND_PATHS = _paths(EVERY_KIND_DOC)
_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.sampled_from(["AGGREGATION_TEMPORALITY_DELTA", "-1", "1e3", "00ff", "zz", "NaN", "AAE="]),
)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def test_every_kind_document_decodes() -> None:
    """The document the next test mutates is itself a valid request."""
    assert otlp.decode_json(json.dumps(EVERY_KIND_DOC).encode()) == _every_kind()
    assert len(EVERY_KIND_PATHS) > 150


@settings(max_examples=300, deadline=None)
@given(where=st.sampled_from(EVERY_KIND_PATHS), value=_json)
def test_any_json_value_anywhere_is_admitted_or_bad_json(
    where: tuple[Any, ...], value: Any
) -> None:
    """Replacing any one value of a valid document by any JSON value gives a document that admit
    either takes or refuses with BadJSON, never another exception."""
    doc = copy.deepcopy(EVERY_KIND_DOC)
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    try:
        admitted = otlp.admit(json.dumps(doc).encode(), json_body=True)
    except BadJSON:
        return
    assert otlp.decode(admitted.data) == without_nameless(
        otlp.decode_json(json.dumps(doc).encode())
    )


# ---- admit: partial success ------------------------------------------------------------------


def test_admit_removes_metrics_without_a_name() -> None:
    """Metrics with an empty name are taken out and their datapoints counted as rejected; the
    rest stay, unchanged, under their own resource and scope, and the counts describe them."""
    kept_1 = gauge("ok", 1.0, 2.0, unit="s")
    kept_2 = Metric(name="h", histogram=Histogram(data_points=[HistogramDataPoint(count=1)]))
    kept_3 = Metric(name="q", summary=Summary(data_points=[SummaryDataPoint(count=1)]))
    nameless_sum = Metric(
        name="", sum=Sum(aggregation_temporality=CUMULATIVE, data_points=[NumberDataPoint()] * 3)
    )
    req = request(
        resource(
            scope(kept_1, nameless_sum, kept_2, name="a"),
            scope(gauge("", 5.0), name="b"),
            service="one",
        ),
        resource(scope(kept_3, name="c"), service="two"),
    )
    admitted = otlp.admit(req.SerializeToString())
    assert (admitted.datapoints, admitted.metrics, admitted.rejected) == (4, 3, 4)
    assert admitted.message == "4 datapoints of metrics without a name were rejected"
    forwarded = otlp.decode(admitted.data)
    assert otlp.count(forwarded) == (4, 3)
    one, two = (_bytes(Resource(attributes=[attr("service.name", s)])) for s in ("one", "two"))
    assert names_by_place(forwarded) == [
        (one, _bytes(InstrumentationScope(name="a", version="1.0")), [kept_1, kept_2]),
        (two, _bytes(InstrumentationScope(name="c", version="1.0")), [kept_3]),
    ]


def test_admit_json_removes_metrics_without_a_name() -> None:
    """The same holds for a JSON body (which is always re-encoded as protobuf)."""
    req = request(resource(scope(gauge("", 1.0), gauge("up", 1.0))))
    admitted = otlp.admit(otlp.encode_json(req), json_body=True)
    assert admitted == otlp.Admitted(
        without_nameless(req).SerializeToString(),
        1,
        1,
        1,
        "1 datapoints of metrics without a name were rejected",
    )


def test_admit_removes_a_metric_without_a_name_or_datapoints() -> None:
    """A metric with an empty name is taken out even when it has no datapoints: what admit
    forwards holds exactly the metrics it counts, and no nameless metric reaches a batch."""
    req = request(resource(scope(Metric(name="", gauge=Gauge()), gauge("up", 1.0))))
    admitted = otlp.admit(req.SerializeToString())
    assert (admitted.datapoints, admitted.metrics, admitted.rejected) == (1, 1, 0)
    forwarded = otlp.decode(admitted.data)
    assert [m.name for m in forwarded.resource_metrics[0].scope_metrics[0].metrics] == ["up"]


@SETTINGS
@given(req=any_requests)
def test_admit_counts_what_it_forwards(req: ExportMetricsServiceRequest) -> None:
    """For any request: rejected is exactly the datapoints of nameless metrics, datapoints and
    metrics count the rest, the message says how many, the forwarded body holds exactly the
    named metrics, unchanged and in order, under their own resource and scope, and `request` is
    the message that body encodes."""
    data = req.SerializeToString()
    nameless = [
        m
        for rm in req.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if not m.name
    ]
    rejected = sum(len(points_of(m)) for m in nameless)
    points, metrics = true_count(req)
    admitted = otlp.admit(data)
    assert admitted.rejected == rejected
    assert admitted.datapoints == points - rejected
    assert admitted.metrics == metrics - len(nameless)
    if rejected:
        assert admitted.message == f"{rejected} datapoints of metrics without a name were rejected"
    else:
        assert admitted.message == ""
    forwarded = otlp.decode(admitted.data)
    assert otlp.count(forwarded) == (admitted.datapoints, admitted.metrics)
    assert names_by_place(forwarded) == names_by_place(without_nameless(req))
    assert admitted.request == forwarded


# ---- responses -------------------------------------------------------------------------------


def test_status_json() -> None:
    """An error status for a JSON client is its proto3 JSON form, compact."""
    status = Status(code=3, message="body is not JSON")
    assert otlp.status_json(status) == b'{"code":3,"message":"body is not JSON"}'


def test_response_of_full_success_is_empty() -> None:
    """Nothing rejected: an empty ExportMetricsServiceResponse, b"" or b"{}"."""
    assert otlp.response() == b""
    assert otlp.response(0, "") == b""
    assert otlp.response(json_body=True) == b"{}"
    assert otlp.partial_success(otlp.response()) == (0, "")


def test_response_with_rejections() -> None:
    """Rejected datapoints go back as partial_success, in protobuf or the OTLP JSON form (int64
    as a string)."""
    message = "4 datapoints of metrics without a name were rejected"
    data = otlp.response(4, message)
    expected = ExportMetricsServiceResponse()
    expected.partial_success.rejected_data_points = 4
    expected.partial_success.error_message = message
    assert ExportMetricsServiceResponse.FromString(data) == expected
    assert otlp.partial_success(data) == (4, message)
    assert otlp.response(4, message, json_body=True) == (
        b'{"partialSuccess":{"rejectedDataPoints":"4","errorMessage":"' + message.encode() + b'"}}'
    )


def test_response_with_only_a_message() -> None:
    """A message without rejections (a warning) still makes a partial_success."""
    assert otlp.partial_success(otlp.response(0, "careful")) == (0, "careful")
    assert otlp.response(0, "careful", json_body=True) == (
        b'{"partialSuccess":{"errorMessage":"careful"}}'
    )


@pytest.mark.parametrize("data", [b"\xff\xff\xff\xff", b"hello world", b"\x0a\x05ab"])
def test_partial_success_of_garbage_is_full_success(data: bytes) -> None:
    """A response body that does not parse counts as full success: (0, "")."""
    assert otlp.partial_success(data) == (0, "")


@settings(max_examples=100, deadline=None)
@given(rejected=_int64, message=_text)
def test_partial_success_reads_what_response_writes(rejected: int, message: str) -> None:
    """partial_success(response(r, m)) == (r, m) for any int64 r and text m."""
    assert otlp.partial_success(otlp.response(rejected, message)) == (rejected, message)
    doc = json.loads(otlp.response(rejected, message, json_body=True))
    if rejected or message:
        assert int(doc["partialSuccess"].get("rejectedDataPoints", 0)) == rejected
        assert doc["partialSuccess"].get("errorMessage", "") == message
    else:
        assert doc == {}


# ---- split -----------------------------------------------------------------------------------


def _halves(data: bytes) -> tuple[ExportMetricsServiceRequest, ExportMetricsServiceRequest]:
    halves = otlp.split(data)
    assert halves is not None
    return otlp.decode(halves[0]), otlp.decode(halves[1])


def test_split_two_resources() -> None:
    """Two resources split one each, each whole (resource, schema URL, scopes, metrics)."""
    one = resource(scope(gauge("a", 1.0)), service="one", schema_url="https://s/1")
    two = resource(scope(gauge("b", 2.0)), service="two")
    assert _halves(request(one, two).SerializeToString()) == (request(one), request(two))


def test_split_one_resource_two_scopes() -> None:
    """One resource with two scopes: each half has the resource and one whole scope."""
    a = scope(gauge("a", 1.0, 2.0), name="a", schema_url="https://s/a")
    b = scope(gauge("b", 3.0), name="b")
    rm = resource(a, b, schema_url="https://s/r")
    first, second = _halves(request(rm).SerializeToString())
    assert first == request(resource(a, schema_url="https://s/r"))
    assert second == request(resource(b, schema_url="https://s/r"))


def test_split_one_metric_four_points() -> None:
    """One metric with 4 points splits 2 + 2; both halves keep the metric's name, description,
    unit, temporality and monotonicity, and its resource and scope."""
    points = [NumberDataPoint(time_unix_nano=i, as_int=i) for i in range(4)]

    def counter(*pts: NumberDataPoint) -> Metric:
        return Metric(
            name="requests",
            description="Requests served.",
            unit="{request}",
            sum=Sum(aggregation_temporality=CUMULATIVE, is_monotonic=True, data_points=pts),
        )

    req = request(resource(scope(counter(*points))))
    assert _halves(req.SerializeToString()) == (
        request(resource(scope(counter(*points[:2])))),
        request(resource(scope(counter(*points[2:])))),
    )


def test_split_five_points_floor_and_ceiling() -> None:
    """An odd number of points in one metric splits floor / ceiling."""
    req = request(resource(scope(gauge("g", *range(5)))))
    first, second = _halves(req.SerializeToString())
    assert [otlp.count(first), otlp.count(second)] == [(2, 1), (3, 1)]


def test_split_cuts_by_datapoints_not_entries() -> None:
    """Resources of 1, 1 and 2 datapoints split 1 + 1 | 2; of 3 and 1, split 3 | 1."""
    rms = [
        resource(scope(gauge(f"m{i}", *[1.0] * n)), service=str(i)) for i, n in enumerate([1, 1, 2])
    ]
    first, second = _halves(request(*rms).SerializeToString())
    assert (first, second) == (request(*rms[:2]), request(rms[2]))
    metrics = [gauge("a", 1.0, 2.0, 3.0), gauge("b", 4.0)]
    first, second = _halves(request(resource(scope(*metrics))).SerializeToString())
    assert (first, second) == (
        request(resource(scope(metrics[0]))),
        request(resource(scope(metrics[1]))),
    )


@pytest.mark.parametrize(
    "req",
    [
        ExportMetricsServiceRequest(),
        request(resource()),
        request(resource(scope())),
        request(resource(scope(Metric(name="nothing")))),
        request(resource(scope(gauge("one", 1.0)))),
        request(
            resource(scope(Metric(name="q", summary=Summary(data_points=[SummaryDataPoint()]))))
        ),
    ],
    ids=["empty", "no-scopes", "no-metrics", "no-data", "one-point", "one-summary-point"],
)
def test_split_cannot_split_one_datapoint(req: ExportMetricsServiceRequest) -> None:
    """With one datapoint or none there is nothing to split: None."""
    assert otlp.split(req.SerializeToString()) is None


def test_split_never_makes_a_half_without_datapoints() -> None:
    """Entries without datapoints (an empty resource, scope or metric, like the scopes admit
    leaves behind) do not count as something to split: one datapoint next to an empty resource
    is still one datapoint (None), and two datapoints next to an empty scope split 1 + 1."""
    empty_resource = resource(service="empty")
    one = request(resource(scope(gauge("up", 1.0))), empty_resource)
    assert otlp.split(one.SerializeToString()) is None

    two = request(resource(scope(gauge("up", 1.0, 2.0)), scope(name="empty")))
    first, second = _halves(two.SerializeToString())
    assert [otlp.count(first)[0], otlp.count(second)[0]] == [1, 1]


def _leaves(data: bytes) -> list[bytes]:
    """Split `data` until nothing splits; the pieces, in order."""
    halves = otlp.split(data)
    if halves is None:
        return [data]
    return _leaves(halves[0]) + _leaves(halves[1])


@SETTINGS
@given(req=any_requests)
def test_split_keeps_every_datapoint_in_its_place(req: ExportMetricsServiceRequest) -> None:
    """For any request, the two halves hold exactly the original's datapoints, each under its own
    resource, scope and metric metadata; splitting again and again ends in pieces of one
    datapoint or none that together hold all of them again. A request of two or more datapoints
    always splits."""
    data = req.SerializeToString()
    original = flatten(req)
    halves = otlp.split(data)
    if true_count(req)[0] >= 2:
        assert halves is not None
    if halves is not None:
        first, second = otlp.decode(halves[0]), otlp.decode(halves[1])
        assert sorted(flatten(first) + flatten(second)) == original
    leaves = [otlp.decode(leaf) for leaf in _leaves(data)]
    assert all(true_count(leaf)[0] <= 1 for leaf in leaves)
    assert sorted(row for leaf in leaves for row in flatten(leaf)) == original


@SETTINGS
@given(req=dense_requests)
def test_split_halves_both_carry_datapoints(req: ExportMetricsServiceRequest) -> None:
    """For requests where every resource, scope and metric holds datapoints, split returns None
    exactly when the request has one datapoint or none, and otherwise two halves that both carry
    datapoints. (Entries without datapoints: test_split_never_makes_a_half_without_datapoints.)"""
    points, _ = true_count(req)
    halves = otlp.split(req.SerializeToString())
    if points <= 1:
        assert halves is None
    else:
        assert halves is not None
        assert [true_count(otlp.decode(h))[0] >= 1 for h in halves] == [True, True]


# ---- batching: concatenation is the union ----------------------------------------------------


def test_concatenation_keeps_resources_apart() -> None:
    """Two serialized requests joined byte for byte decode to the first's resources then the
    second's, each with its own scopes and metrics: what the batcher relies on."""
    a = request(resource(scope(gauge("a", 1.0)), service="one"))
    b = request(
        resource(scope(gauge("b", 2.0), name="other"), service="two"),
        resource(scope(gauge("c", 3.0, 4.0)), service="three"),
    )
    joined = otlp.decode(a.SerializeToString() + b.SerializeToString())
    assert joined == request(*a.resource_metrics, *b.resource_metrics)
    assert otlp.count(joined) == (4, 3)


@settings(max_examples=50, deadline=None)
@given(a=requests, b=requests)
def test_any_two_requests_concatenate(
    a: ExportMetricsServiceRequest, b: ExportMetricsServiceRequest
) -> None:
    """For any two requests, the concatenation of their bytes (as admit forwards them) decodes to
    a's resource_metrics followed by b's, counts added."""
    data_a, data_b = otlp.admit(a.SerializeToString()).data, otlp.admit(b.SerializeToString()).data
    joined = otlp.decode(data_a + data_b)
    assert list(joined.resource_metrics) == [*a.resource_metrics, *b.resource_metrics]
    (pa, ma), (pb, mb) = true_count(a), true_count(b)
    assert otlp.count(joined) == (pa + pb, ma + mb)
    assert otlp.admit(data_a + data_b) == otlp.Admitted(data_a + data_b, pa + pb, ma + mb)
