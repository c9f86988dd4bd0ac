"""OTLP metrics: decode and validate ExportMetricsServiceRequest (protobuf and the OTLP JSON
mapping), count its datapoints, split it, and encode the service's responses.

A batch is the concatenation of serialized requests: protobuf appends repeated fields on
concatenation, so every ResourceMetrics keeps its own resource and scopes and nothing is
re-encoded. Decoding validates the whole message, so one client's malformed data can never reach a
batch shared with other clients. Sans-IO: no sockets, no trio.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import attrs
from google.protobuf import json_format
from google.protobuf.message import DecodeError as _PBDecodeError
from google.protobuf.message import Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, ResourceMetrics, ScopeMetrics

from service.codec.errors import BadJSON, BadProtobuf

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"
EXPORT_METHOD = f"/{SERVICE}/Export"
# The oneof `data` of Metric: every kind of metric holds its points in `data_points`.
KINDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")

__all__ = [
    "EXPORT_METHOD",
    "JSON",
    "KINDS",
    "PROTOBUF",
    "SERVICE",
    "Admitted",
    "ExportMetricsServiceRequest",
    "ExportMetricsServiceResponse",
    "admit",
    "count",
    "decode",
    "decode_json",
    "encode_json",
    "response",
    "split",
]


@attrs.frozen
class Admitted:
    """A validated request: the serialized protobuf to forward and what it holds.

    `rejected` datapoints were removed (they belong to metrics no backend can take) and go back
    to the client as ExportMetricsPartialSuccess with `message`.
    """

    data: bytes
    datapoints: int
    metrics: int
    rejected: int = 0
    message: str = ""
    limited: int = 0  # of `rejected`: refused by limits (service/governance/limits.py)
    request: ExportMetricsServiceRequest | None = attrs.field(default=None, eq=False, repr=False)


def decode(data: bytes) -> ExportMetricsServiceRequest:
    """Parse a serialized ExportMetricsServiceRequest; raises BadProtobuf with a one-line reason."""
    try:
        return ExportMetricsServiceRequest.FromString(data)
    except _PBDecodeError:
        raise BadProtobuf("body is not a valid protobuf ExportMetricsServiceRequest") from None


def metric_points(metric: Metric) -> int:
    """The number of datapoints `metric` holds (0 when its data is not set)."""
    kind = metric.WhichOneof("data")
    return len(getattr(metric, kind).data_points) if kind else 0


def count(req: ExportMetricsServiceRequest) -> tuple[int, int]:
    """(datapoints, metrics) in `req`. Python work per metric, not per datapoint."""
    points = metrics = 0
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                metrics += 1
                kind = m.WhichOneof("data")
                if kind:
                    points += len(getattr(m, kind).data_points)
    return points, metrics


def admit(data: bytes, *, json_body: bool = False) -> Admitted:
    """Validate a request body (protobuf, or OTLP JSON when `json_body`), count it, and take out
    metrics that no backend accepts (an empty name). Raises BadProtobuf or BadJSON.

    A valid protobuf body is forwarded as the client sent it; it is re-encoded only when
    something had to be taken out, or when it arrived as JSON.
    """
    req = decode_json(data) if json_body else decode(data)
    points, metrics = count(req)
    rejected = 0
    removed = False
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            if any(not m.name for m in sm.metrics):
                removed = True
                keep = [m for m in sm.metrics if m.name]
                rejected += sum(metric_points(m) for m in sm.metrics if not m.name)
                metrics -= len(sm.metrics) - len(keep)
                del sm.metrics[:]
                sm.metrics.extend(keep)
    if removed or json_body:
        data = req.SerializeToString()
    return Admitted(
        data,
        points - rejected,
        metrics,
        rejected,
        f"{rejected} datapoints of metrics without a name were rejected" if rejected else "",
        request=req,
    )


def response(rejected: int = 0, message: str = "", *, json_body: bool = False) -> bytes:
    """An ExportMetricsServiceResponse, with partial_success when anything was rejected."""
    resp = ExportMetricsServiceResponse()
    if rejected or message:
        resp.partial_success.rejected_data_points = rejected
        resp.partial_success.error_message = message
    if json_body:
        return json.dumps(json_format.MessageToDict(resp), separators=(",", ":")).encode()
    return resp.SerializeToString()


def status_json(status: Message) -> bytes:
    """A google.rpc.Status (or any message) in proto3 JSON, for error answers to JSON clients."""
    return json.dumps(json_format.MessageToDict(status), separators=(",", ":")).encode()


def partial_success(data: bytes) -> tuple[int, str]:
    """(rejected_data_points, error_message) of a serialized ExportMetricsServiceResponse; a
    body that does not parse counts as full success (the status code said so)."""
    try:
        resp = ExportMetricsServiceResponse.FromString(data)
    except _PBDecodeError:
        return 0, ""
    return resp.partial_success.rejected_data_points, resp.partial_success.error_message


# ---- the OTLP JSON mapping ---------------------------------------------------------------------
# Proto3 JSON with three differences: trace and span ids are hex, not base64; field names may be
# lowerCamelCase or the proto names; enums may be names or numbers (json_format takes both, and
# both spellings of keys, and 64-bit integers as strings or numbers). Unknown fields are ignored,
# as the OTLP specification asks of receivers.

_ID_KEYS = (("traceId", "trace_id"), ("spanId", "span_id"))


def _exemplars(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every exemplar object in an OTLP JSON document (either key spelling)."""
    for rm in _items(doc, "resourceMetrics", "resource_metrics"):
        for sm in _items(rm, "scopeMetrics", "scope_metrics"):
            for m in _items(sm, "metrics", "metrics"):
                if not isinstance(m, dict):
                    continue
                for kind in ("gauge", "sum", "histogram", "exponentialHistogram"):
                    data = m.get(kind) or m.get(_snake(kind))
                    for dp in _items(data, "dataPoints", "data_points"):
                        yield from _items(dp, "exemplars", "exemplars")


def _items(obj: Any, camel: str, snake: str) -> list[Any]:
    if not isinstance(obj, dict):
        return []
    value = obj.get(camel, obj.get(snake))
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def decode_json(data: bytes) -> ExportMetricsServiceRequest:
    """Parse an OTLP JSON body; raises BadJSON with a one-line reason."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadJSON(f"body is not JSON: {_one_line(e)}") from None
    if not isinstance(doc, dict):
        raise BadJSON("body is not a JSON object")
    for ex in _exemplars(doc):
        for camel, snake in _ID_KEYS:
            key = camel if camel in ex else snake
            value = ex.get(key)
            if isinstance(value, str) and value:
                try:
                    ex[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise BadJSON(f"exemplar {key} {value[:40]!r} is not hex") from None
    req = ExportMetricsServiceRequest()
    try:
        json_format.ParseDict(doc, req, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, TypeError, ValueError) as e:
        raise BadJSON(f"not an OTLP ExportMetricsServiceRequest: {_one_line(e)}") from None
    return req


def encode_json(req: ExportMetricsServiceRequest) -> bytes:
    """The OTLP JSON form of `req` (lowerCamelCase keys, hex ids, enums as numbers)."""
    doc = json_format.MessageToDict(req, use_integers_for_enums=True)
    for ex in _exemplars(doc):
        for camel, _ in _ID_KEYS:
            if camel in ex:
                ex[camel] = base64.b64decode(ex[camel]).hex()
    return json.dumps(doc, separators=(",", ":")).encode()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


# ---- splitting (only when a backend says the message is too large) -----------------------------


def split(data: bytes) -> tuple[bytes, bytes] | None:
    """Split a serialized request into two requests of about half the datapoints each, keeping
    every datapoint under its own resource, scope and metric; None for a single datapoint.

    Splits the outermost list that has two or more entries with datapoints: resources, then
    scopes, then metrics, then the datapoints of one metric. Entries without datapoints carry
    nothing a backend stores and are left out of the halves.
    """
    req = decode(data)
    halves = _split_request(req)
    if halves is None:
        return None
    return halves[0].SerializeToString(), halves[1].SerializeToString()


def _split_request(
    req: ExportMetricsServiceRequest,
) -> tuple[ExportMetricsServiceRequest, ExportMetricsServiceRequest] | None:
    first, second = ExportMetricsServiceRequest(), ExportMetricsServiceRequest()
    weighed = [(rm, _resource_points(rm)) for rm in req.resource_metrics]
    rms = [rm for rm, w in weighed if w]
    if len(rms) >= 2:
        cut = _cut([w for _, w in weighed if w])
        first.resource_metrics.extend(rms[:cut])
        second.resource_metrics.extend(rms[cut:])
        return first, second
    if not rms:
        return None
    halves = _split_resource(rms[0])
    if halves is None:
        return None
    first.resource_metrics.append(halves[0])
    second.resource_metrics.append(halves[1])
    return first, second


def _resource_points(rm: ResourceMetrics) -> int:
    return sum(metric_points(m) for sm in rm.scope_metrics for m in sm.metrics)


def _split_resource(rm: ResourceMetrics) -> tuple[ResourceMetrics, ResourceMetrics] | None:
    a, b = (
        _shell(rm, ResourceMetrics, "scope_metrics"),
        _shell(rm, ResourceMetrics, "scope_metrics"),
    )
    weighed = [(sm, sum(metric_points(m) for m in sm.metrics)) for sm in rm.scope_metrics]
    sms = [sm for sm, w in weighed if w]
    if len(sms) >= 2:
        cut = _cut([w for _, w in weighed if w])
        a.scope_metrics.extend(sms[:cut])
        b.scope_metrics.extend(sms[cut:])
        return a, b
    if not sms:
        return None
    halves = _split_scope(sms[0])
    if halves is None:
        return None
    a.scope_metrics.append(halves[0])
    b.scope_metrics.append(halves[1])
    return a, b


def _split_scope(sm: ScopeMetrics) -> tuple[ScopeMetrics, ScopeMetrics] | None:
    a, b = _shell(sm, ScopeMetrics, "metrics"), _shell(sm, ScopeMetrics, "metrics")
    ms = [m for m in sm.metrics if metric_points(m)]
    if len(ms) >= 2:
        cut = _cut([metric_points(m) for m in ms])
        a.metrics.extend(ms[:cut])
        b.metrics.extend(ms[cut:])
        return a, b
    if not ms or metric_points(ms[0]) < 2:
        return None
    m = ms[0]
    kind = m.WhichOneof("data")
    ma, mb = Metric(), Metric()
    ma.CopyFrom(m)
    mb.CopyFrom(m)
    points = getattr(m, kind).data_points
    n = len(points)
    del getattr(ma, kind).data_points[n // 2 :]
    del getattr(mb, kind).data_points[: n // 2]
    a.metrics.append(ma)
    b.metrics.append(mb)
    return a, b


def _shell(msg: Any, cls: type, children: str) -> Any:
    """A copy of `msg` (resource or scope, schema URL, unknown fields) without its children."""
    copy = cls()
    copy.CopyFrom(msg)
    copy.ClearField(children)
    return copy


def _cut(weights: list[int]) -> int:
    """Where to cut a list of 2+ entries so both sides carry about half the weight (1..n-1)."""
    total = sum(weights)
    acc = 0
    for i, w in enumerate(weights[:-1]):
        acc += w
        if acc * 2 >= total:
            return i + 1
    return len(weights) - 1
