"""The rule engine on OTLP: shows each data point of an ExportMetricsServiceRequest to the engine
(labels are the point's attributes; the resource's attributes can be matched too) and rewrites
the request in place; encodes emitted windows as a request.

Python work per data point only for metrics whose name some rule's pattern matches; everything
else is not touched, and a request that no rule changed is forwarded as the client sent it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import attrs
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    Metric,
    ScopeMetrics,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from service.codec import otlp as otlp_codec
from service.governance.engine import RuleEngine
from service.governance.windows import Emitted

_CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
_SCOPE = InstrumentationScope(name="governor")


@attrs.frozen
class Origin:
    """Where an emitted series belongs: its resource (attributes, and the exact message when
    there is one input), scope and metric metadata."""

    resource: tuple[tuple[str, str], ...]
    resource_message: bytes | None
    scope: bytes
    description: str
    unit: str

    @property
    def group_key(self) -> tuple[bytes, str, str]:
        """Aggregation groups are kept apart by scope and metric metadata, not by resource."""
        return (self.scope, self.description, self.unit)

    def common(self, other: Origin) -> Origin:
        """The resource attributes both share (what an aggregate of both keeps)."""
        mine = dict(self.resource)
        shared = tuple((k, v) for k, v in other.resource if mine.get(k) == v)
        return attrs.evolve(self, resource=shared, resource_message=None)


def origin_of(rm: Any, sm: ScopeMetrics, m: Metric, resource: dict[str, str]) -> Origin:
    """Where a metric's points come from (`resource`: its resource's attributes as text)."""
    return Origin(
        tuple(sorted(resource.items())),
        rm.resource.SerializeToString(),
        sm.scope.SerializeToString(),
        m.description,
        m.unit,
    )


def any_str(v: AnyValue) -> str:
    """An attribute value as a label value: strings as they are, others in a fixed text form."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return "true" if v.bool_value else "false"
    if kind == "int_value":
        return str(v.int_value)
    if kind == "double_value":
        return repr(v.double_value)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    if kind == "array_value":
        return json.dumps([any_str(x) for x in v.array_value.values])
    if kind == "kvlist_value":
        return json.dumps({kv.key: any_str(kv.value) for kv in v.kvlist_value.values})
    return ""


def attrs_dict(kvs: Iterable[KeyValue]) -> dict[str, str]:
    """Attributes as text (`any_str`), by key."""
    return {kv.key: any_str(kv.value) for kv in kvs}


def metric_kind(metric: Metric, field: str) -> str:
    if field == "gauge":
        return "gauge"
    if field == "sum":
        s = metric.sum
        # A cumulative monotonic sum is a counter (resets detectable); a delta sum's points add.
        return "counter" if s.is_monotonic and s.aggregation_temporality == _CUMULATIVE else "gauge"
    return field  # histogram, exponential_histogram, summary


def govern(engine: RuleEngine, req: ExportMetricsServiceRequest) -> int | None:
    """Run the rules over `req`, rewriting it in place. Returns the datapoints removed (dropped,
    sampled away or absorbed into windows), or None when nothing changed."""
    changed = False
    removed = 0
    plan_of = engine.plan
    for rm in req.resource_metrics:
        resource: dict[str, str] | None = None
        for sm in rm.scope_metrics:
            added: list[Metric] = []
            emptied = False
            for m in sm.metrics:
                plan = plan_of(m.name)
                if not plan:
                    continue
                field = m.WhichOneof("data")
                if field is None:
                    continue
                if resource is None:
                    resource = attrs_dict(rm.resource.attributes)
                result = _govern_metric(engine, plan, rm, sm, m, field, resource)
                if result is None:
                    continue
                changed = True
                n_removed, renamed = result
                removed += n_removed
                added += renamed
                if not len(getattr(m, field).data_points):
                    emptied = True
            if added:
                sm.metrics.extend(added)
            if emptied:
                keep = [m for m in sm.metrics if otlp_codec.metric_points(m)]
                del sm.metrics[:]
                sm.metrics.extend(keep)
    return removed if changed else None


def _govern_metric(
    engine: RuleEngine,
    plan: tuple[int, ...],
    rm: Any,
    sm: ScopeMetrics,
    m: Metric,
    field: str,
    resource: dict[str, str],
) -> tuple[int, list[Metric]] | None:
    data = getattr(m, field)
    points = data.data_points
    kind = metric_kind(m, field)
    numeric = field in ("gauge", "sum")
    origin = None
    keep_points = []
    moved: dict[str, list[Any]] = {}
    changed = False
    removed = 0
    for dp in points:

        def labels_of(dp: Any = dp) -> dict[str, str]:
            return attrs_dict(dp.attributes)

        points_of = None
        if numeric:

            def points_of(dp: Any = dp) -> list[tuple[int, float]]:
                v = dp.as_double if dp.WhichOneof("value") == "as_double" else float(dp.as_int)
                return [(dp.time_unix_nano // 1_000_000, v)]

            if origin is None:
                origin = origin_of(rm, sm, m, resource)
        v = engine.evaluate(m.name, plan, labels_of, resource, kind, 1, points_of, origin)
        if v.drop_all or v.absorbed or (v.keep is not None and not v.keep[0]):
            changed = True
            removed += 1
            continue
        if v.labels is not None:
            changed = True
            _set_attributes(dp, v.labels)
        if v.name is not None and v.name != m.name:
            changed = True
            moved.setdefault(v.name, []).append(dp)
            continue
        keep_points.append(dp)
    if not changed:
        return None
    renamed = []
    for name, dps in moved.items():
        copy = Metric()
        copy.CopyFrom(m)
        copy.name = name
        copy_points = getattr(copy, field).data_points
        del copy_points[:]
        copy_points.extend(dps)
        renamed.append(copy)
    del points[:]  # the removed points stay valid (upb detaches them) and are copied back
    points.extend(keep_points)
    return removed, renamed


def _set_attributes(dp: Any, labels: dict[str, str]) -> None:
    """Rewrite a point's attributes to `labels`, keeping the typed value of every attribute whose
    text form did not change."""
    old = {}
    for kv in dp.attributes:
        copy = KeyValue()
        copy.CopyFrom(kv)
        old[kv.key] = copy
    new = []
    for k, v in labels.items():
        kv = old.get(k)
        if kv is not None and any_str(kv.value) == v:
            new.append(kv)
        else:
            new.append(KeyValue(key=k, value=AnyValue(string_value=v)))
    del dp.attributes[:]
    dp.attributes.extend(new)


def apply(engine: RuleEngine, admitted: otlp_codec.Admitted) -> otlp_codec.Admitted:
    """`admitted` after the rules: re-encoded and recounted when they changed it."""
    req = admitted.request
    if req is None or not engine.active or govern(engine, req) is None:
        return admitted
    points, metrics = otlp_codec.count(req)
    data = req.SerializeToString()
    return attrs.evolve(admitted, data=data, datapoints=points, metrics=metrics)


_START_NS = time.time_ns()


def encode(emitted: list[Emitted]) -> tuple[bytes, int, int]:
    """Emitted windows as a serialized ExportMetricsServiceRequest: (data, metrics, points).
    Each goes under its origin's resource and scope (a resource with the attributes all inputs
    shared, for aggregates); outputs without an origin under scope `governor`."""
    req = ExportMetricsServiceRequest()
    scopes: dict[tuple[Any, ...], ScopeMetrics] = {}
    resources: dict[Any, Any] = {}
    points = 0
    for e in emitted:
        o: Origin | None = e.origin
        rkey = (o.resource_message, o.resource) if o else None
        rm = resources.get(rkey)
        if rm is None:
            rm = resources[rkey] = req.resource_metrics.add()
            if o is not None:
                if o.resource_message is not None:
                    rm.resource.CopyFrom(Resource.FromString(o.resource_message))
                else:
                    rm.resource.attributes.extend(
                        KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in o.resource
                    )
        skey = (rkey, o.scope if o else b"")
        sm = scopes.get(skey)
        if sm is None:
            sm = scopes[skey] = rm.scope_metrics.add()
            sm.scope.CopyFrom(InstrumentationScope.FromString(o.scope) if o else _SCOPE)
        m = sm.metrics.add(name=e.name)
        if o is not None:
            m.description, m.unit = o.description, o.unit
        if e.kind == "counter":
            m.sum.is_monotonic = True
            m.sum.aggregation_temporality = _CUMULATIVE
            dps = m.sum.data_points
        else:
            dps = m.gauge.data_points
        attrs_kv = [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in e.labels.items()]
        for ts_ms, value in e.points:
            dp = dps.add(time_unix_nano=ts_ms * 1_000_000, as_double=value)
            if e.kind == "counter":
                dp.start_time_unix_nano = _START_NS
            dp.attributes.extend(attrs_kv)
        points += len(e.points)
    return req.SerializeToString(), len(emitted), points
