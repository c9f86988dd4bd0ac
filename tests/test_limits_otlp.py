"""Limits, tenancy and stats on the OTLP pipeline, end to end over real sockets (issue 6).

Each test starts a whole App (OTLP pipeline only) with a limits file and/or stats on 127.0.0.1:0
in front of a recording OTLP backend (tests/otlp_peers.py), and sends with clients we did not
write: grpcio (raw bytes on MetricsService/Export, the tenant in gRPC metadata), httpx (the
tenant in an HTTP header) and the OpenTelemetry SDK exporters. What the limits refuse is
reported back as OTLP partial success and never reaches the backend; what they strip arrives
later, re-aggregated. Time is real: waits are conditions polled with a deadline, never sleeps.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
import trio
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GRPCMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression as HTTPCompression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HTTPMetricExporter,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsPartialSuccess,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from service.codec import otlp
from service.config import Config, config_from_dict, to_dict
from tests.otlp_peers import (
    DEADLINE_S,
    GRPCBackend,
    HTTPBackend,
    Request,
    RunningOTLP,
    otlp_config,
    running_otlp_governor,
    wait_until,
)
from tests.test_otlp_sdk import Capturing, flatten, scraped

TRANSPORTS = ["grpc", "http"]
Response = ExportMetricsServiceResponse
ACCEPTED = Response()  # everything accepted: no partial_success
SCOPE = "tests.limits_otlp"
RESOURCE = {"service.name": "checkout"}
PODS = ("p0", "p1", "p2", "p3", "p4")
QUOTA = "tenant-quota"  # the name `quotas:` gets
# The SDK's exports repeat every series (whatever OTEL_* variables prefer).
CUMULATIVE = {Counter: AggregationTemporality.CUMULATIVE}

# Every tenant not listed may hold 2 series; t1 3, t2 10, and the tenant of requests that name
# none ("default") 4.
QUOTAS = """
quotas:
  max_series: 2
  action: drop_new
  tenants:
    t1: {max_series: 3}
    t2: {max_series: 10}
    default: {max_series: 4}
"""

# ---- data -------------------------------------------------------------------------------------


@attrs.frozen(order=True)
class Point:
    """One gauge datapoint as a test sends it or a backend sees it."""

    name: str
    attributes: tuple[tuple[str, str], ...]
    value: float
    resource: tuple[tuple[str, str], ...] = tuple(RESOURCE.items())


def point(
    attributes: dict[str, str],
    value: float,
    *,
    name: str = "queue_depth",
    resource: dict[str, str] = RESOURCE,
) -> Point:
    return Point(name, tuple(sorted(attributes.items())), value, tuple(sorted(resource.items())))


def pods(names: Iterable[str], value: float, **extra: str) -> list[Point]:
    """queue_depth{pod=<name>, **extra} = value, one point per name, in order."""
    return [point({"pod": p, **extra}, value) for p in names]


def build(points: Iterable[Point], time_ns: int | None = None) -> Request:
    """A request with one resource per distinct resource, one scope in it, one gauge per name,
    the points in the order given, all stamped `time_ns` (now by default)."""
    time_ns = time.time_ns() if time_ns is None else time_ns
    req = Request()
    metrics: dict[tuple[Any, str], Metric] = {}
    scopes: dict[Any, Any] = {}
    for p in points:
        sm = scopes.get(p.resource)
        if sm is None:
            rm = req.resource_metrics.add()
            rm.resource.attributes.extend(_kvs(p.resource))
            sm = scopes[p.resource] = rm.scope_metrics.add()
            sm.scope.name = SCOPE
        m = metrics.get((p.resource, p.name))
        if m is None:
            m = metrics[(p.resource, p.name)] = sm.metrics.add(name=p.name, unit="{item}")
        dp = m.gauge.data_points.add(time_unix_nano=time_ns, as_double=p.value)
        dp.attributes.extend(_kvs(p.attributes))
    return req


def _kvs(pairs: Iterable[tuple[str, str]]) -> list[KeyValue]:
    return [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in pairs]


def _pairs(kvs: Iterable[KeyValue]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((kv.key, kv.value.string_value) for kv in kvs))


def points_in(requests: Iterable[Request]) -> list[Point]:
    """Every gauge datapoint of `requests`, sorted (however governor batched them)."""
    out = []
    for req in requests:
        for rm in req.resource_metrics:
            resource = _pairs(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out += [
                        Point(m.name, _pairs(dp.attributes), dp.as_double, resource)
                        for dp in m.gauge.data_points
                    ]
    return sorted(out)


def delivered(backend: GRPCBackend | HTTPBackend) -> list[Point]:
    """Every gauge datapoint the backend accepted, sorted."""
    return points_in(backend.requests())


def refused(n: int) -> Response:
    """The answer to a request of which the limits refused `n` datapoints."""
    return Response(
        partial_success=ExportMetricsPartialSuccess(
            rejected_data_points=n, error_message=f"{n} data points refused by limits"
        )
    )


# ---- governor and clients ---------------------------------------------------------------------


def governed(
    tmp_path: Path, limits: str | None = None, stats: dict[str, Any] | None = None
) -> Callable[[str, str], Config]:
    """The OTLP-only test config (tests/otlp_peers.py) with `limits:` pointing at a limits file
    holding `limits` and with `stats:`, validated like a config file."""
    extra: dict[str, Any] = {}
    if limits is not None:
        path = tmp_path / "limits.yaml"
        path.write_text(limits)
        extra["limits"] = {"file": str(path)}
    if stats is not None:
        extra["stats"] = stats

    def config(endpoint: str, protocol: str) -> Config:
        return config_from_dict({**to_dict(otlp_config(endpoint, protocol)), **extra})

    return config


def _grpc_call(target: str, body: bytes, metadata: tuple[tuple[str, str], ...]) -> bytes:
    with grpc.insecure_channel(target) as channel:
        export = channel.unary_unary(otlp.EXPORT_METHOD)  # raw bytes in and out
        return export(body, timeout=DEADLINE_S, metadata=metadata)


async def export(
    gov: RunningOTLP, transport: str, req: Request, tenant: str | None = None
) -> Response:
    """Send `req` over `transport`, naming `tenant` the way that transport does (gRPC metadata
    x-scope-orgid, HTTP header X-Scope-OrgID); the decoded answer."""
    body = req.SerializeToString()
    if transport == "grpc":
        metadata = (("x-scope-orgid", tenant),) if tenant is not None else ()
        data = await trio.to_thread.run_sync(_grpc_call, gov.grpc_target, body, metadata)
    else:
        headers = {"content-type": otlp.PROTOBUF}
        if tenant is not None:
            headers["X-Scope-OrgID"] = tenant
        resp = await gov.client.post(gov.http_url, content=body, headers=headers)
        assert resp.status_code == 200, resp.text
        data = resp.content
    return Response.FromString(data)


def limit_groups(gov: RunningOTLP, limit: str = QUOTA) -> dict[str, float]:
    """Series (attempted) per group of one limit, as /metrics shows them."""
    return {
        s.labels["group"]: s.value
        for family in gov.app.metrics.registry.collect()
        for s in family.samples
        if s.name == "governor_limit_group_series"
        and s.labels["pipeline"] == "otlp"
        and s.labels["limit"] == limit
    }


def rejected_by_limits(gov: RunningOTLP) -> float:
    return gov.sample("governor_datapoints_rejected_total", pipeline="otlp", reason="limits")


# ---- tenant quotas ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tenant_quota_from_header_admits_the_first_series_of_each_tenant(
    transport: str, tmp_path: Path
) -> None:
    """The tenant a request names in x-scope-orgid (gRPC metadata) or X-Scope-OrgID (HTTP
    header) has its own series quota. Every tenant sends the same five series (pod p0..p4; the
    value says who sent them): t1 (quota 3) gets the first three through, t2 (10) all five, a
    request naming no tenant counts under `default` (4), an unlisted tenant t3 gets the default
    quota (2). The refused datapoints never reach the backend and each answer's partial_success
    counts them. Later t1 keeps its admitted series and may add no new one: p4 stays refused."""
    async with running_otlp_governor(config=governed(tmp_path, QUOTAS)) as gov:
        answers = [
            await export(gov, transport, build(pods(PODS, value)), tenant)
            for tenant, value in (("t1", 1.0), ("t2", 2.0), (None, 3.0), ("t3", 4.0))
        ]
        again = await export(gov, transport, build(pods(["p4", "p1", "p5", "p0"], 5.0)), "t1")
        await wait_until(lambda: gov.backend.datapoints() >= 3 + 5 + 4 + 2 + 2)
        assert rejected_by_limits(gov) == 2 + 0 + 1 + 3 + 2
        assert limit_groups(gov) == {
            "__tenant__=t1": 6,  # attempted, refused ones included: p0..p5
            "__tenant__=t2": 5,
            "__tenant__=default": 5,
            "__tenant__=t3": 5,
        }
    assert answers == [refused(2), ACCEPTED, refused(1), refused(3)]
    assert again == refused(2)
    assert delivered(gov.backend) == sorted(
        pods(["p0", "p1", "p2"], 1.0)
        + pods(PODS, 2.0)
        + pods(["p0", "p1", "p2", "p3"], 3.0)
        + pods(["p0", "p1"], 4.0)
        + pods(["p1", "p0"], 5.0)
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("source", ["resource_attribute", "label"])
async def test_tenant_from_resource_attribute_or_label_without_a_header(
    source: str, transport: str, tmp_path: Path
) -> None:
    """With tenant.resource_attribute (or tenant.label) set to `tenant` and no header, each
    datapoint's tenant is its resource's (or its own) attribute `tenant`, `default` where it has
    none: one request carrying series of t1, t2 and no tenant is limited per tenant, t1 to its
    first three series, t2 not at all, the rest to the default tenant's first four."""
    limits = f"tenant: {{{source}: tenant}}\n{QUOTAS}"

    def of(tenant: str | None, value: float) -> list[Point]:
        if tenant is None:
            return pods(PODS, value)
        if source == "label":
            return pods(PODS, value, tenant=tenant)
        resource = {**RESOURCE, "tenant": tenant}
        return [point({"pod": p}, value, resource=resource) for p in PODS]

    req = build(of("t1", 1.0) + of("t2", 2.0) + of(None, 3.0))
    async with running_otlp_governor(config=governed(tmp_path, limits)) as gov:
        answer = await export(gov, transport, req)
        await wait_until(lambda: gov.backend.datapoints() >= 3 + 5 + 4)
        assert limit_groups(gov) == {
            "__tenant__=t1": 5,
            "__tenant__=t2": 5,
            "__tenant__=default": 5,
        }
    assert answer == refused(2 + 0 + 1)
    assert delivered(gov.backend) == sorted(of("t1", 1.0)[:3] + of("t2", 2.0) + of(None, 3.0)[:4])
    assert rejected_by_limits(gov) == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tenant_is_the_header_then_the_label_then_the_resource_attribute(
    transport: str, tmp_path: Path
) -> None:
    """With both tenant.label and tenant.resource_attribute set, a datapoint's tenant is the
    request's header if it names one, else the datapoint's label, else its resource's
    attribute."""
    limits = "tenant: {label: tenant, resource_attribute: tenant}\nquotas: {max_series: 100}\n"
    resource = {**RESOURCE, "tenant": "from-resource"}
    req = build(
        [
            point({"pod": "p0", "tenant": "from-label"}, 1.0, resource=resource),
            point({"pod": "p1"}, 2.0, resource=resource),
        ]
    )
    async with running_otlp_governor(config=governed(tmp_path, limits)) as gov:
        answers = [
            await export(gov, transport, req),
            await export(gov, transport, req, "from-header"),
        ]
        await wait_until(lambda: gov.backend.datapoints() >= 4)
        groups = limit_groups(gov)
    assert answers == [ACCEPTED, ACCEPTED]
    assert groups == {
        "__tenant__=from-label": 1,
        "__tenant__=from-resource": 1,
        "__tenant__=from-header": 2,
    }


# ---- the OpenTelemetry SDK against a tenant's quota ---------------------------------------------


def tenant_exporter(transport: str, gov: RunningOTLP, tenant: str) -> MetricExporter:
    """The SDK's own OTLP exporter naming `tenant` in its headers; every setting explicit so
    OTEL_* environment variables cannot change what is tested."""
    headers = {"x-scope-orgid": tenant}
    if transport == "grpc":
        return GRPCMetricExporter(
            endpoint=gov.grpc_target,
            insecure=True,
            headers=headers,
            timeout=10.0,
            compression=grpc.Compression.NoCompression,
            preferred_temporality=CUMULATIVE,
        )
    return HTTPMetricExporter(
        endpoint=gov.http_url,
        headers=headers,
        timeout=10.0,
        compression=HTTPCompression.NoCompression,
        preferred_temporality=CUMULATIVE,
    )


def run_sdk(exporter: Capturing, queues: int) -> None:
    """One process counting jobs on `queues` queues (one series each); exports once on
    force_flush and once more at shutdown (cumulative: the same series again). Blocking."""
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=600_000)
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource(RESOURCE), shutdown_on_exit=False
    )
    try:
        jobs = provider.get_meter(SCOPE).create_counter("jobs.processed", unit="{job}")
        for i in range(queues):
            jobs.add(i + 1, {"queue": f"q{i}"})
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown(10_000)


def first_series_only(requests: Iterable[Request], n: int) -> list[Request]:
    """Copies of `requests` keeping only the datapoints of the first `n` distinct series (metric
    name, attributes, resource attributes) in the order they were sent."""
    admitted: list[Any] = []
    out = []
    for sent in requests:
        req = Request()
        req.CopyFrom(sent)
        for rm in req.resource_metrics:
            resource = _pairs(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    dps = getattr(m, m.WhichOneof("data")).data_points
                    keep = []
                    for dp in dps:
                        key = (m.name, _pairs(dp.attributes), resource)
                        if key not in admitted and len(admitted) < n:
                            admitted.append(key)
                        if key in admitted:
                            keep.append(dp)
                    del dps[:]
                    dps.extend(keep)
        out.append(req)
    return out


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sdk_exporter_with_a_tenant_header_gets_its_quota(
    transport: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK's exporter sends headers={"x-scope-orgid": "t1"}: of its five series t1's quota
    (3) lets the first three through, in both of its exports; the backend receives exactly
    those datapoints, as the SDK encoded them, and /metrics counts the other two of each export
    as governor_datapoints_rejected_total{reason="limits"}."""
    async with running_otlp_governor(config=governed(tmp_path, QUOTAS)) as gov:
        sdk = Capturing(tenant_exporter(transport, gov, "t1"))
        await trio.to_thread.run_sync(run_sdk, sdk, 5)
        expected = first_series_only(sdk.sent, 3)
        await wait_until(lambda: gov.backend.datapoints() >= 3 + 3)
        rejected = await scraped(
            gov, "governor_datapoints_rejected_total", pipeline="otlp", reason="limits"
        )
    assert [otlp.count(r)[0] for r in sdk.sent] == [5, 5]
    assert [otlp.count(r)[0] for r in expected] == [3, 3]
    assert flatten(gov.backend.requests()) == flatten(expected)
    assert rejected == 2 + 2
    sdk_warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("opentelemetry") and r.levelno >= logging.WARNING
    ]
    assert sdk_warnings == []


# ---- stats --------------------------------------------------------------------------------------


async def test_cardinality_lists_the_otlp_metrics_with_exact_series_counts(
    tmp_path: Path,
) -> None:
    """stats.level full counts the OTLP pipeline's series by metric name, attributes and
    resource attributes: the same attributes under two resources are two series, the same
    request sent again over the other receiver adds datapoints but no series.
    /api/v1/cardinality?top=5 lists the five metrics with the most series, with their exact
    series and datapoint counts and the series per attribute value."""
    shapes = {  # metric -> (routes, services): routes x services series
        "cart.items": (3, ("a", "b")),
        "cart.value": (5, ("a",)),
        "db.calls": (4, ("a",)),
        "cache.hits": (3, ("a",)),
        "queue.depth": (2, ("a",)),
        "uptime": (1, ("a",)),
    }
    req = build(
        point({"route": f"r{i}"}, 1.0, name=name, resource={"service.name": service})
        for name, (routes, services) in shapes.items()
        for service in services
        for i in range(routes)
    )
    async with running_otlp_governor(config=governed(tmp_path, stats={"level": "full"})) as gov:
        assert await export(gov, "grpc", req) == ACCEPTED
        assert await export(gov, "http", req) == ACCEPTED
        resp = await gov.client.get(gov.telemetry_url("/api/v1/cardinality?top=5"))
    assert resp.status_code == 200
    answer = resp.json()
    tracker_bytes = answer["pipelines"]["otlp"].pop("tracker_bytes")
    assert tracker_bytes > 0

    def row(name: str) -> dict[str, Any]:
        routes, services = shapes[name]
        series = routes * len(services)
        values = [{"value": f"r{i}", "series": len(services)} for i in range(routes)]
        return {
            "name": name,
            "datapoints_window": 2 * series,
            "datapoints_total": 2 * series,
            "series": series,
            "labels": [{"label": "route", "distinct_values": routes, "top_values": values[:5]}],
        }

    assert answer == {
        "status": "success",
        "level": "full",
        "top": 5,
        "pipelines": {
            "otlp": {
                "level": "full",
                "window_s": 60.0,
                "metrics_tracked": 6,
                "datapoints_total": 2 * 21,
                "metrics": [row(name) for name in list(shapes)[:5]],  # shapes is in rank order
                "series_total": 21,
            }
        },
    }, json.dumps(answer, indent=1)


# ---- strip -------------------------------------------------------------------------------------

STRIP_NAME = "queue-depth-pods"
STRIP = """
limits:
  - name: queue-depth-pods
    match: {name: queue_depth}
    max_series: 2
    action: strip
    strip: {labels: [pod]}
    strip_interval: 1s
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_strip_reaggregates_an_over_limit_group_per_remaining_attributes(
    transport: str, tmp_path: Path
) -> None:
    """queue_depth is limited to 2 series and its client sends 6 (route /a and /b, pods p1..p3):
    the limit takes `pod` off, and after the strip interval (1 s) the backend receives one
    series per route, the sum of its pods, stamped with the window's end, under the resource
    and scope the client sent. Nothing is refused; uptime, which no limit matches, passes at
    once, untouched."""
    resource = {**RESOURCE, "k8s.namespace.name": "shop"}
    now_ns = time.time_ns()
    depth = {("/a", "p1"): 1.0, ("/a", "p2"): 2.0, ("/a", "p3"): 3.0}
    depth |= {("/b", "p1"): 10.0, ("/b", "p2"): 20.0, ("/b", "p3"): 30.0}
    sent = build(
        [point({"route": r, "pod": p}, v, resource=resource) for (r, p), v in depth.items()]
        + [point({}, 99.0, name="uptime", resource=resource)],
        time_ns=now_ns,
    )
    async with running_otlp_governor(config=governed(tmp_path, STRIP)) as gov:
        answer = await export(gov, transport, sent)
        await wait_until(lambda: gov.backend.datapoints() >= 1)
        first = gov.backend.requests()
        await wait_until(lambda: gov.backend.datapoints() >= 3)
        stripped = gov.sample(
            "governor_limit_stripped_datapoints_total", pipeline="otlp", limit=STRIP_NAME
        )
    assert answer == ACCEPTED
    assert stripped == 6
    uptime = point({}, 99.0, name="uptime", resource=resource)
    assert points_in(first) == [uptime]
    assert delivered(gov.backend) == sorted(
        [
            uptime,
            point({"route": "/a"}, 6.0, resource=resource),
            point({"route": "/b"}, 60.0, resource=resource),
        ]
    )
    # The re-aggregated series: under the client's resource (the message itself) and scope,
    # with the metric's unit, stamped with the end of the 1 s window their points fell in.
    now_ms = now_ns // 1_000_000
    end_ns = (now_ms - now_ms % 1000 + 1000) * 1_000_000
    [later] = gov.backend.requests()[len(first) :]
    [rm] = later.resource_metrics
    assert rm.resource == sent.resource_metrics[0].resource
    [sm] = rm.scope_metrics
    assert sm.scope == sent.resource_metrics[0].scope_metrics[0].scope
    shape = [
        (m.name, m.unit, m.WhichOneof("data"), dp.time_unix_nano)
        for m in sm.metrics
        for dp in m.gauge.data_points
    ]
    assert shape == [("queue_depth", "{item}", "gauge", end_ns)] * 2
