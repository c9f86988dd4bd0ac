"""The OTLP pipeline end to end, with the OpenTelemetry Python SDK as the client.

The real SDK exporters (OTLP/gRPC, plain and gzip, and OTLP/HTTP protobuf) send to governor, which
forwards to a real gRPC server (grpcio) or HTTP server (hypercorn). Every request the SDK sends is
captured as the SDK's own encoder builds it, so the assertions compare what arrived with what was
sent, datapoint by datapoint, under its resource and scope. The SDK is synchronous: it runs in
worker threads, with a long export interval and explicit flushes so the exports are countable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

import grpc
import pytest
import trio
from google.protobuf import text_format
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GRPCMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression as HTTPCompression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HTTPMetricExporter,
)
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_CUMULATIVE,
    AGGREGATION_TEMPORALITY_DELTA,
    DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK,
    Metric,
    ResourceMetrics,
)
from opentelemetry.sdk.metrics import (
    AlwaysOnExemplarFilter,
    Counter,
    MeterProvider,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from service.codec import otlp
from tests.otlp_peers import (
    DEADLINE_S,
    GRPCBackend,
    HTTPBackend,
    Request,
    RunningOTLP,
    running_otlp_governor,
    wait_until,
)

# One export per force_flush() and one more at shutdown(), never one from the timer.
SDK_INTERVAL_MS = 600_000
SDK_TIMEOUT_S = 10.0
RESOURCE_SCHEMA = "https://opentelemetry.io/schemas/1.26.0"
SCOPE_SCHEMA = "https://opentelemetry.io/schemas/1.24.0"
# Counters export deltas, everything else cumulative: both temporalities cross governor.
TEMPORALITY = {Counter: AggregationTemporality.DELTA}
# What one SDK client sends (see SDKClient): its first export (force_flush) holds 2 counter,
# 1 up-down counter, 2 gauge, 1 observable gauge, 3 histogram and 1 exponential histogram
# points; the second (shutdown) repeats every cumulative one and the counter's new delta.
FIRST_EXPORT_POINTS = 10
SECOND_EXPORT_POINTS = 9

TRANSPORTS = ["grpc", "grpc-gzip", "http", "http-gzip"]
BACKENDS = [GRPCBackend, HTTPBackend]

# A datapoint as a backend sees it: resource, scope, metric without its points, the point
# (text format, so a failing comparison reads as a diff of fields).
Flat = tuple[str, str, str, str]


# ---- comparing requests -----------------------------------------------------------------------


def _text(msg: Any) -> str:
    return text_format.MessageToString(msg, as_one_line=True)


def flatten(requests: Iterable[Request]) -> list[Flat]:
    """Every datapoint of `requests` with its resource, scope and metric settings, sorted: equal
    lists mean the same multiset, however governor batched the requests."""
    out: list[Flat] = []
    for req in requests:
        for rm in req.resource_metrics:
            resource = f"{_text(rm.resource)} schema_url: {rm.schema_url!r}"
            for sm in rm.scope_metrics:
                scope = f"{_text(sm.scope)} schema_url: {sm.schema_url!r}"
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    if kind is None:
                        continue  # no datapoints to place
                    shell = Metric()
                    shell.CopyFrom(m)
                    getattr(shell, kind).ClearField("data_points")
                    out.extend(
                        (resource, scope, _text(shell), _text(dp))
                        for dp in getattr(m, kind).data_points
                    )
    return sorted(out)


def points(requests: Iterable[Request]) -> int:
    return sum(otlp.count(r)[0] for r in requests)


def attribute(attrs: Iterable[KeyValue], key: str) -> str:
    [value] = [kv.value.string_value for kv in attrs if kv.key == key]
    return value


async def scraped(gov: RunningOTLP, name: str, **labels: str) -> float:
    """The value of one sample on governor's /metrics, as a Prometheus scrape would see it."""
    resp = await gov.client.get(gov.telemetry_url("/metrics"))
    assert resp.status_code == 200
    found = [
        s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
        if s.name == name and s.labels == labels
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


# ---- the SDK client ---------------------------------------------------------------------------


class Capturing(MetricExporter):
    """Wraps an SDK OTLP exporter: records the ExportMetricsServiceRequest that the SDK's encoder
    makes of each export and the exporter's result, then delegates."""

    def __init__(self, inner: MetricExporter) -> None:
        # The reader asks its exporter for these (the SDK has no public accessor): mirror the
        # inner exporter's, so the SDK aggregates exactly as it would for that exporter alone.
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.sent: list[Request] = []
        self.results: list[MetricExportResult] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.sent.append(encode_metrics(metrics_data))
        result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        self.results.append(result)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def sdk_exporter(transport: str, gov: RunningOTLP) -> MetricExporter:
    """The SDK's own OTLP exporter for `transport`, pointed at governor. Every setting is explicit
    so OTEL_* environment variables cannot change what is tested."""
    if transport.startswith("grpc"):
        return GRPCMetricExporter(
            endpoint=gov.grpc_target,
            insecure=True,
            timeout=SDK_TIMEOUT_S,
            compression=grpc.Compression.Gzip
            if transport == "grpc-gzip"
            else grpc.Compression.NoCompression,
            preferred_temporality=TEMPORALITY,
        )
    return HTTPMetricExporter(
        endpoint=gov.http_url,
        timeout=SDK_TIMEOUT_S,
        compression=HTTPCompression.Gzip
        if transport == "http-gzip"
        else HTTPCompression.NoCompression,
        preferred_temporality=TEMPORALITY,
    )


class SDKClient:
    """One instrumented process: a MeterProvider with a resource named `service`, every kind of
    instrument the SDK has, exemplars from an active sampled span. Call `record_and_flush()` then
    `finish()` (both block: run them in a thread). `step` makes this client's values its own."""

    def __init__(self, exporter: MetricExporter, service: str, step: int = 1) -> None:
        self.service = service
        self.step = step
        self.capture = Capturing(exporter)
        reader = PeriodicExportingMetricReader(
            self.capture,
            export_interval_millis=SDK_INTERVAL_MS,
            export_timeout_millis=SDK_TIMEOUT_S * 1000,
        )
        self.provider = MeterProvider(
            metric_readers=[reader],
            resource=Resource(
                {
                    "service.name": service,
                    "service.version": "1.4.0",
                    "host.cpu.count": 8,
                    "sampling.ratio": 0.25,
                    "feature.flags": ("beta", "dark-mode"),
                },
                schema_url=RESOURCE_SCHEMA,
            ),
            views=[
                View(
                    instrument_name="payload.size",
                    aggregation=ExponentialBucketHistogramAggregation(max_size=20),
                )
            ],
            exemplar_filter=AlwaysOnExemplarFilter(),
            shutdown_on_exit=False,
        )
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        self.trace_ids: set[bytes] = set()
        meter = self.provider.get_meter(
            "governor.tests.sdk", "0.9.1", schema_url=SCOPE_SCHEMA, attributes={"lang": "py"}
        )
        self.requests = meter.create_counter(
            "http.server.requests", unit="{request}", description="Requests served."
        )
        self.queue_depth = meter.create_up_down_counter("queue.depth", unit="{item}")
        self.temperature = meter.create_gauge("room.temperature", unit="Cel")
        meter.create_observable_gauge("process.threads", callbacks=[self._threads])
        self.duration = meter.create_histogram(
            "http.server.duration",
            unit="ms",
            description="Time to serve a request.",
            explicit_bucket_boundaries_advisory=[5.0, 10.0, 50.0],
        )
        self.payload = meter.create_histogram("payload.size", unit="By")
        self._done = False

    def _threads(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(7 * self.step, {"kind": "worker", "client": self.service})

    def record_and_flush(self, barrier: threading.Barrier | None = None) -> None:
        """Record inside a sampled span (exemplars carry its trace and span ids), then export
        once; with `barrier`, the export starts when every client sharing it is ready."""
        s, client = self.step, {"client": self.service}
        tracer = self.tracer_provider.get_tracer("governor.tests.sdk")
        with tracer.start_as_current_span("checkout") as span:
            ctx = span.get_span_context()
            assert ctx.trace_flags.sampled
            self.trace_ids.add(ctx.trace_id.to_bytes(16, "big"))
            self.requests.add(3 * s, {"http.route": "/a", **client})
            self.requests.add(4 * s, {"http.route": "/b", **client})
            self.queue_depth.add(5 * s, client)
            self.queue_depth.add(-2, client)
            self.temperature.set(20.5 + s, {"room": "kitchen", **client})
            self.temperature.set(18.25, {"room": "hall", **client})
            self.duration.record(12.5 * s, {"http.route": "/a", **client})
            self.duration.record(70, {"http.route": "/a", **client})
            self.duration.record(3, {"http.route": "/b", **client})
            self.duration.record(0.5 * s, {"http.route": "/c", **client})
            self.payload.record(0.3 * s, client)
            self.payload.record(17, client)
            self.payload.record(1024 * s, client)
        if barrier is not None:
            barrier.wait(DEADLINE_S)
        assert self.provider.force_flush(SDK_TIMEOUT_S * 1000)

    def finish(self) -> None:
        """Record a little outside any span, then shut down (which exports once more)."""
        if self._done:
            return
        self._done = True
        try:
            self.requests.add(self.step, {"http.route": "/a", "client": self.service})
            self.temperature.set(22.0, {"room": "kitchen", "client": self.service})
        finally:
            self.provider.shutdown(SDK_TIMEOUT_S * 1000)
            self.tracer_provider.shutdown()

    def run(self) -> None:
        try:
            self.record_and_flush()
        finally:
            self.finish()


def assert_sdk_sent_everything(client: SDKClient) -> None:
    """The client exported twice, successfully, and what it sent is the workload this file
    claims: every kind of metric, both temporalities, exemplars of its span."""
    cap = client.capture
    assert cap.results == [MetricExportResult.SUCCESS] * 2
    assert [points([r]) for r in cap.sent] == [FIRST_EXPORT_POINTS, SECOND_EXPORT_POINTS]
    every = [
        m
        for r in cap.sent
        for rm in r.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    ]
    metrics = {m.name: m for m in every}
    kinds = {name: m.WhichOneof("data") for name, m in metrics.items()}
    assert kinds == {
        "http.server.requests": "sum",
        "queue.depth": "sum",
        "room.temperature": "gauge",
        "process.threads": "gauge",
        "http.server.duration": "histogram",
        "payload.size": "exponential_histogram",
    }
    counter, updown = metrics["http.server.requests"].sum, metrics["queue.depth"].sum
    assert (counter.is_monotonic, counter.aggregation_temporality) == (
        True,
        AGGREGATION_TEMPORALITY_DELTA,
    )
    assert (updown.is_monotonic, updown.aggregation_temporality) == (
        False,
        AGGREGATION_TEMPORALITY_CUMULATIVE,
    )
    exemplar_traces = {
        ex.trace_id
        for m in every
        for dp in getattr(m, kinds[m.name]).data_points
        for ex in dp.exemplars
    }
    assert client.trace_ids <= exemplar_traces


def sdk_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("opentelemetry") and r.levelno >= logging.WARNING
    ]


# ---- hand-made requests (what the SDK cannot send: summaries, JSON, unnamed metrics) -----------


def _kv(key: str, **value: Any) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(**value))


def handmade_request(service: str, *, unnamed: bool = False) -> Request:
    """A request with a summary and exemplars carrying trace and span ids; with `unnamed`, also
    metrics without a name (2 points beside named ones, 2 in a scope of their own)."""
    t0 = 1_700_000_000_000_000_000
    req = Request()
    rm: ResourceMetrics = req.resource_metrics.add(schema_url=RESOURCE_SCHEMA)
    rm.resource.attributes.extend(
        [
            _kv("service.name", string_value=service),
            _kv("host.cpu.count", int_value=8),
            _kv("sampling.ratio", double_value=0.25),
            _kv("canary", bool_value=True),
            _kv("blob", bytes_value=b"\x00\xffraw"),
        ]
    )
    rm.resource.dropped_attributes_count = 2
    sm = rm.scope_metrics.add(schema_url=SCOPE_SCHEMA)
    sm.scope.name, sm.scope.version = "governor.tests.handmade", "3.1.0"
    sm.scope.attributes.append(_kv("lang", string_value="proto"))

    rpc = sm.metrics.add(name="rpc.latency", unit="s", description="Latency quantiles.")
    rpc.metadata.append(_kv("origin", string_value="prometheus"))
    for i, flags in enumerate((0, DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK)):
        dp = rpc.summary.data_points.add(
            start_time_unix_nano=t0, time_unix_nano=t0 + 10**9 * (i + 1), flags=flags
        )
        dp.count, dp.sum = 42 + i, 3.75 + i
        dp.quantile_values.add(quantile=0.5, value=0.0625)
        dp.quantile_values.add(quantile=0.99, value=1.5 + i)
        dp.attributes.append(_kv("method", string_value=f"Get{i}"))

    load = sm.metrics.add(name="system.load", unit="1")
    dp = load.gauge.data_points.add(time_unix_nano=t0 + 5, as_double=0.1 + 0.2)
    dp.attributes.append(_kv("cpu", int_value=3))
    ex = dp.exemplars.add(
        time_unix_nano=t0 + 4,
        as_double=0.3,
        trace_id=bytes.fromhex("5b8efff798038103d269b633813fc60c"),
        span_id=bytes.fromhex("eee19b7ec3c1b174"),
    )
    ex.filtered_attributes.append(_kv("user", string_value="alice"))

    sent = sm.metrics.add(name="bytes.sent", unit="By")
    sent.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE
    sent.sum.is_monotonic = True
    dp = sent.sum.data_points.add(start_time_unix_nano=t0, time_unix_nano=t0 + 9, as_int=-(2**40))
    dp.exemplars.add(
        time_unix_nano=t0 + 8,
        as_int=2**53 + 1,
        trace_id=bytes.fromhex("0af7651916cd43dd8448eb211c80319c"),
        span_id=bytes.fromhex("b7ad6b7169203331"),
    )

    if unnamed:
        nameless = sm.metrics.add(unit="1")
        nameless.gauge.data_points.add(time_unix_nano=t0, as_int=1)
        nameless.gauge.data_points.add(time_unix_nano=t0, as_int=2)
        alone = rm.scope_metrics.add()
        alone.scope.name = "governor.tests.nameless"
        hist = alone.metrics.add(description="no name")
        hist.histogram.aggregation_temporality = AGGREGATION_TEMPORALITY_DELTA
        hist.histogram.data_points.add(count=1, sum=2.0, bucket_counts=[1, 0], explicit_bounds=[5])
        hist.histogram.data_points.add(count=0, bucket_counts=[0, 0], explicit_bounds=[5])
    return req


def named_only(req: Request) -> Request:
    """`req` without the metrics that have no name."""
    out = Request()
    out.CopyFrom(req)
    for rm in out.resource_metrics:
        for sm in rm.scope_metrics:
            keep = [m for m in sm.metrics if m.name]
            del sm.metrics[:]
            sm.metrics.extend(keep)
    return out


def grpc_export(target: str, body: bytes) -> bytes:
    """One raw MetricsService/Export call (blocking): the response's bytes."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(otlp.EXPORT_METHOD)
        return call(body, timeout=DEADLINE_S)


async def export_raw(gov: RunningOTLP, transport: str, req: Request) -> bytes:
    """Send `req` as protobuf over `transport`; the serialized ExportMetricsServiceResponse."""
    body = req.SerializeToString()
    if transport == "grpc":
        return await trio.to_thread.run_sync(grpc_export, gov.grpc_target, body)
    resp = await gov.client.post(
        gov.http_url, content=body, headers={"content-type": otlp.PROTOBUF}
    )
    assert resp.status_code == 200
    if resp.content:
        assert resp.headers["content-type"] == otlp.PROTOBUF
    return resp.content


def assert_counted(gov: RunningOTLP, datapoints: int) -> None:
    """governor counted exactly `datapoints` in and out (read after it shut down)."""
    assert gov.sample("governor_datapoints_received_total", pipeline="otlp") == datapoints
    sent = gov.sample("governor_datapoints_sent_total", pipeline="otlp", exporter="backend")
    assert sent == datapoints
    assert gov.backend.datapoints() == datapoints


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=["to-grpc", "to-http"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sdk_metrics_arrive_exactly_as_sent(
    transport: str, backend_cls: type[GRPCBackend | HTTPBackend], caplog: pytest.LogCaptureFixture
) -> None:
    """Counters, up-down counters, gauges, histograms and exponential histograms from the SDK
    reach the backend with resource, scope, metric settings, attributes, exemplars, timestamps
    and flags unchanged; governor counts every datapoint in and out."""
    backend = backend_cls()
    async with running_otlp_governor(backend) as gov:
        client = SDKClient(sdk_exporter(transport, gov), "checkout")
        await trio.to_thread.run_sync(client.run)
        total = FIRST_EXPORT_POINTS + SECOND_EXPORT_POINTS
        await wait_until(lambda: backend.datapoints() >= total)
    assert_sdk_sent_everything(client)
    assert flatten(backend.requests()) == flatten(client.capture.sent)
    assert_counted(gov, total)
    assert sdk_warnings(caplog) == []


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=["to-grpc", "to-http"])
async def test_two_sdk_clients_share_a_batch_each_under_its_own_resource(
    backend_cls: type[GRPCBackend | HTTPBackend], caplog: pytest.LogCaptureFixture
) -> None:
    """Two processes (one over gRPC, one over HTTP) export at the same moment; governor joins
    their requests into one batch, and every datapoint stays under its own resource."""
    backend = backend_cls()
    # The first exports of both clients fill exactly one batch; the interval never runs out.
    batch = {"interval_s": 60.0, "max_datapoints": 2 * FIRST_EXPORT_POINTS}
    async with running_otlp_governor(backend, batch=batch) as gov:
        clients = [
            SDKClient(sdk_exporter("grpc", gov), "a", step=1),
            SDKClient(sdk_exporter("http", gov), "b", step=2),
        ]
        barrier = threading.Barrier(len(clients))
        try:
            async with trio.open_nursery() as nursery:
                for c in clients:
                    nursery.start_soon(trio.to_thread.run_sync, c.record_and_flush, barrier)
            await wait_until(lambda: len(backend.received) == 1)
        finally:
            with trio.CancelScope(shield=True):
                for c in clients:
                    await trio.to_thread.run_sync(c.finish)
        # The shutdown exports wait in the open batch until governor stops and flushes it.
    for c in clients:
        assert_sdk_sent_everything(c)
    requests = backend.requests()
    assert len(requests) == 2
    assert sorted(
        attribute(rm.resource.attributes, "service.name") for rm in requests[0].resource_metrics
    ) == ["a", "b"]
    for rm in (rm for r in requests for rm in r.resource_metrics):
        service = attribute(rm.resource.attributes, "service.name")
        for m in (m for sm in rm.scope_metrics for m in sm.metrics):
            for dp in getattr(m, m.WhichOneof("data")).data_points:
                assert attribute(dp.attributes, "client") == service, m.name
    assert flatten(requests) == flatten(clients[0].capture.sent + clients[1].capture.sent)
    assert_counted(gov, 2 * (FIRST_EXPORT_POINTS + SECOND_EXPORT_POINTS))
    assert sdk_warnings(caplog) == []


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=["to-grpc", "to-http"])
async def test_json_and_raw_protobuf_with_summaries_arrive_exactly(
    backend_cls: type[GRPCBackend | HTTPBackend],
) -> None:
    """OTLP JSON (hex trace and span ids) is answered in JSON and forwarded as the equivalent
    protobuf; summaries, metric metadata and datapoint flags pass over gRPC and HTTP unchanged."""
    backend = backend_cls()
    as_json = handmade_request("json-client")
    over_http = handmade_request("protobuf-http-client")
    over_grpc = handmade_request("protobuf-grpc-client")
    async with running_otlp_governor(backend) as gov:
        resp = await gov.client.post(
            gov.http_url, content=otlp.encode_json(as_json), headers={"content-type": otlp.JSON}
        )
        assert (resp.status_code, resp.headers["content-type"]) == (200, otlp.JSON)
        assert resp.json() == {}
        for transport, req in (("http", over_http), ("grpc", over_grpc)):
            answer = otlp.ExportMetricsServiceResponse.FromString(
                await export_raw(gov, transport, req)
            )
            assert not answer.HasField("partial_success"), transport
        total = points([as_json, over_http, over_grpc])
        await wait_until(lambda: backend.datapoints() >= total)
    assert flatten(backend.requests()) == flatten([as_json, over_http, over_grpc])
    assert_counted(gov, total)


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=["to-grpc", "to-http"])
@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_unnamed_metric_is_a_partial_success(
    transport: str, backend_cls: type[GRPCBackend | HTTPBackend]
) -> None:
    """A metric without a name is taken out and reported back as ExportMetricsPartialSuccess
    (OK / 200, not an error: the SDK must not retry); the named metrics of the same request
    arrive, and governor counts the rejected datapoints by reason."""
    backend = backend_cls()
    req = handmade_request("partial-client", unnamed=True)
    named = named_only(req)
    rejected = points([req]) - points([named])
    assert rejected == 4
    async with running_otlp_governor(backend) as gov:
        answer = otlp.ExportMetricsServiceResponse.FromString(await export_raw(gov, transport, req))
        assert answer.partial_success.rejected_data_points == rejected
        assert "without a name" in answer.partial_success.error_message
        assert str(rejected) in answer.partial_success.error_message
        await wait_until(lambda: backend.datapoints() >= points([named]))
        labels = {"pipeline": "otlp", "reason": "unnamed_metric"}
        assert await scraped(gov, "governor_datapoints_rejected_total", **labels) == rejected
    assert flatten(backend.requests()) == flatten([named])
    assert_counted(gov, points([named]))


async def test_protobuf_full_success_reply_says_protobuf() -> None:
    """OTLP/HTTP: "The server MUST use the same Content-Type in the response as it received in
    the request", also on full success, where the ExportMetricsServiceResponse is zero bytes."""
    async with running_otlp_governor() as gov:
        resp = await gov.client.post(
            gov.http_url,
            content=handmade_request("content-type-client").SerializeToString(),
            headers={"content-type": otlp.PROTOBUF},
        )
        assert (resp.status_code, resp.content) == (200, b"")
        assert resp.headers.get("content-type") == otlp.PROTOBUF


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_unnamed_metric_without_datapoints_never_reaches_the_backend(transport: str) -> None:
    """A metric without a name is taken out even when it holds no datapoints (nothing to report
    as rejected): the backend must never see a metric without a name."""
    req = handmade_request("nameless-empty-client")
    nameless = req.resource_metrics[0].scope_metrics[0].metrics.add(unit="1")
    nameless.gauge.SetInParent()
    async with running_otlp_governor() as gov:
        answer = otlp.ExportMetricsServiceResponse.FromString(await export_raw(gov, transport, req))
        assert answer.partial_success.rejected_data_points == 0
        await wait_until(lambda: gov.backend.datapoints() >= points([req]))
    names = [
        m.name
        for r in gov.backend.requests()
        for rm in r.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    ]
    assert sorted(names) == ["bytes.sent", "rpc.latency", "system.load"]
