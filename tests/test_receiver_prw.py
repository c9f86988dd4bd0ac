"""The Prometheus Remote Write receiver, end to end over real sockets.

Every test starts a whole App on 127.0.0.1:0 in front of a recording backend served by hypercorn,
and talks to it with httpx as a raw client. Time is real here (sockets), so waits are conditions
with a bounded deadline, never sleeps.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import cramjam
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import TimeSeries
from service.app import Addresses, App
from service.config import Config, config_from_dict
from service.receivers.http import hypercorn_config, lifespan, read_body, serve_http

# A series as the backend saw it: its labels and its (timestamp, value) samples, in order.
SeriesKey = tuple[tuple[tuple[str, str], ...], tuple[tuple[int, float], ...]]

PRW_HEADERS = {
    "content-type": "application/x-protobuf",
    "content-encoding": "snappy",
    "x-prometheus-remote-write-version": "0.1.0",
}
DEADLINE_S = 10.0  # bound on every wait for the pipeline; the happy path takes milliseconds


# ---- data -------------------------------------------------------------------------------------


def series_key(ts: TimeSeries) -> SeriesKey:
    return (
        tuple((label.name, label.value) for label in ts.labels),
        tuple((s.timestamp, s.value) for s in ts.samples),
    )


def write_request(tag: str, n_series: int = 3, n_samples: int = 2) -> WriteRequest:
    """`n_series` series named after `tag`, each with `n_samples` distinct samples."""
    req = WriteRequest()
    for i in range(n_series):
        ts = req.timeseries.add()
        ts.labels.add(name="__name__", value="http_requests_total")
        ts.labels.add(name="instance", value=f"{tag}-{i}")
        ts.labels.add(name="job", value="api")
        for j in range(n_samples):
            ts.samples.add(value=float(i * 100 + j) + 0.25, timestamp=1_700_000_000_000 + j)
    return req


def keys(req: WriteRequest) -> list[SeriesKey]:
    return [series_key(ts) for ts in req.timeseries]


def snappy(data: bytes) -> bytes:
    return bytes(cramjam.snappy.compress_raw(data))


# ---- the recording backend --------------------------------------------------------------------


class RecordingBackend:
    """An ASGI remote-write backend: records the series of every WriteRequest, answers 204.

    While `gate` is not None, every request waits for it before it is recorded and answered.
    """

    def __init__(self) -> None:
        self.series: list[SeriesKey] = []
        self.requests = 0
        self.gate: trio.Event | None = None
        self._changed = trio.Event()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(scope, receive, 1 << 30)
        self.requests += 1
        self._notify()
        if self.gate is not None:
            await self.gate.wait()
        req = WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))
        self.series.extend(keys(req))
        self._notify()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds; fails after DEADLINE_S."""
        with trio.fail_after(DEADLINE_S):
            while not predicate():
                await self._changed.wait()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll `predicate` (state with no event to wait on) until it holds; fails after DEADLINE_S."""
    with trio.fail_after(DEADLINE_S):
        while not predicate():  # noqa: ASYNC110 - the state has no event to wait on
            await trio.sleep(0.001)


# ---- a running governor -----------------------------------------------------------------------


def make_config(
    backend_url: str,
    *,
    receiver: dict[str, Any] | None = None,
    batch: dict[str, Any] | None = None,
    queue: dict[str, Any] | None = None,
    exporter: dict[str, Any] | None = None,
    shutdown_grace_s: float = 5.0,
) -> Config:
    return config_from_dict(
        {
            "telemetry": {"listen": "127.0.0.1:0"},
            "shutdown_grace_s": shutdown_grace_s,
            "prw": {
                "receiver": {"listen": "127.0.0.1:0", **(receiver or {})},
                # A short interval so a lone request reaches the backend without waiting a second.
                "batch": {"interval_s": 0.01, **(batch or {})},
                "queue": queue or {},
                "exporters": [
                    {
                        "url": backend_url,
                        "name": "backend",
                        "retry": {"initial_delay_s": 0.01, "max_delay_s": 0.1},
                        **(exporter or {}),
                    }
                ],
            },
        }
    )


@attrs.define
class Running:
    app: App
    addrs: Addresses
    backend: RecordingBackend
    client: httpx.AsyncClient
    shutting_down: bool = False

    def shutdown(self) -> None:
        """Begin the soft shutdown (once: a second App.shutdown() would be the hard stop)."""
        if not self.shutting_down:
            self.shutting_down = True
            self.app.shutdown()

    @property
    def write_url(self) -> str:
        host, port = self.addrs.prw
        return f"http://{host}:{port}/api/v1/write"

    def url(self, path: str) -> str:
        host, port = self.addrs.prw
        return f"http://{host}:{port}{path}"

    def telemetry_url(self, path: str) -> str:
        host, port = self.addrs.telemetry
        return f"http://{host}:{port}{path}"

    async def write(self, req: WriteRequest) -> httpx.Response:
        """POST `req` the way Prometheus does: snappy block format, remote write 1.0 headers."""
        body = snappy(req.SerializeToString())
        return await self.client.post(self.write_url, content=body, headers=PRW_HEADERS)

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one of the app's own metrics; 0 if it has no such sample yet."""
        value = self.app.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def rejected(self, reason: str) -> float:
        return self.sample(
            "governor_receiver_rejected_requests_total", pipeline="prw", reason=reason
        )


@asynccontextmanager
async def running_governor(
    backend: RecordingBackend | None = None, **config: Any
) -> AsyncIterator[Running]:
    """A backend and an App in front of it; on exit the App shuts down cleanly, then the backend."""
    backend = backend or RecordingBackend()
    async with trio.open_nursery() as nursery:
        backend_stop = trio.Event()
        [(host, port)] = await nursery.start(
            serve_http, backend, hypercorn_config("127.0.0.1:0"), backend_stop.wait
        )
        app = App(make_config(f"http://{host}:{port}/api/v1/write", **config))
        app_done = trio.Event()

        async def run_app(*, task_status: trio.TaskStatus[Addresses]) -> None:
            try:
                await app.run(task_status=task_status)
            finally:
                app_done.set()

        addrs = await nursery.start(run_app)
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
            running = Running(app, addrs, backend, client)
            yield running
        running.shutdown()
        with trio.fail_after(DEADLINE_S):
            await app_done.wait()
        backend_stop.set()


# ---- accepted requests ------------------------------------------------------------------------


def _compress(encoding: str, data: bytes) -> bytes:
    if encoding == "snappy":
        return snappy(data)
    if encoding == "zstd":
        return bytes(cramjam.zstd.compress(data))
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    assert encoding == ""
    return data


@pytest.mark.parametrize(
    "encoding", ["snappy", "zstd", "gzip", "deflate", ""], ids=lambda e: e or "no-encoding"
)
async def test_accepted_encodings_reach_the_backend_unchanged(encoding: str) -> None:
    """A WriteRequest compressed with each supported Content-Encoding (or none) is answered 204
    with X-Prometheus-Remote-Write-Samples-Written equal to the samples sent, and the backend
    receives every series with its labels and samples unchanged."""
    req = write_request(f"enc-{encoding or 'none'}", n_series=4, n_samples=3)
    headers = {"content-type": "application/x-protobuf"}
    if encoding:
        headers["content-encoding"] = encoding
    async with running_governor() as gov:
        resp = await gov.client.post(
            gov.write_url, content=_compress(encoding, req.SerializeToString()), headers=headers
        )
        assert resp.status_code == 204
        assert resp.headers["x-prometheus-remote-write-samples-written"] == "12"
        assert resp.content == b""
        await gov.backend.wait_for(lambda: len(gov.backend.series) >= 4)
        assert gov.backend.series == keys(req)
        assert gov.sample("governor_datapoints_received_total", pipeline="prw") == 12.0


async def test_request_without_series_is_accepted_and_forwards_nothing() -> None:
    """An empty WriteRequest is valid: 204 with zero samples written, and no batch is sent."""
    async with running_governor() as gov:
        resp = await gov.write(WriteRequest())
        assert resp.status_code == 204
        assert resp.headers["x-prometheus-remote-write-samples-written"] == "0"
        assert gov.sample("governor_datapoints_received_total", pipeline="prw") == 0.0
    assert gov.backend.requests == 0


# ---- rejected requests ------------------------------------------------------------------------

# Limits for the rejection tests: small, so a bomb or an oversized body stays cheap to build.
MAX_REQUEST = 4096
MAX_DECOMPRESSED = 65536
LIMITS = {"max_request_bytes": MAX_REQUEST, "max_decompressed_bytes": MAX_DECOMPRESSED}


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _bomb(encoding: str) -> bytes:
    zeros = b"\0" * (16 * MAX_DECOMPRESSED)
    if encoding == "gzip":
        return gzip.compress(zeros)
    return bytes(cramjam.zstd.compress(zeros))


def _snappy_claiming(length: int) -> bytes:
    """A snappy block whose length preamble (a varint) claims `length` bytes."""
    out = bytearray()
    while length >= 0x80:
        out.append(length & 0x7F | 0x80)
        length >>= 7
    out.append(length)
    return bytes(out) + b"\x00abc"


# method, path, headers, body -> status, metric reason, the one-line answer
REJECTIONS = [
    pytest.param(
        "POST",
        "/api/v1/write",
        PRW_HEADERS,
        snappy(b"\xff\xff\xff\xff not a protobuf"),
        400,
        "bad_protobuf",
        "body is not a valid protobuf WriteRequest",
        id="bad_protobuf",
    ),
    pytest.param(
        "POST",
        "/api/v1/write",
        PRW_HEADERS,
        b"\x10\xff\xfe\xfd\xfc\xfb",
        400,
        "bad_compression",
        "body is not valid snappy (block format)",
        id="corrupt_snappy",
    ),
    pytest.param(
        "POST",
        "/api/v1/write",
        PRW_HEADERS,
        b"x" * (MAX_REQUEST + 1),
        413,
        "too_large",
        f"body of {MAX_REQUEST + 1} bytes is over the limit of {MAX_REQUEST}",
        id="too_large_by_content_length",
    ),
    pytest.param(
        "POST",
        "/api/v1/write",
        PRW_HEADERS,
        _snappy_claiming(1 << 30),
        413,
        "decompressed_too_large",
        f"snappy body claims {1 << 30} bytes, over the limit of {MAX_DECOMPRESSED}",
        id="snappy_claims_huge_length",
    ),
    pytest.param(
        "POST",
        "/api/v1/write",
        {"content-type": "application/x-protobuf", "content-encoding": "gzip"},
        _bomb("gzip"),
        413,
        "decompressed_too_large",
        f"gzip body decompresses past the limit of {MAX_DECOMPRESSED} bytes",
        id="gzip_bomb",
    ),
    pytest.param(
        "POST",
        "/api/v1/write",
        {"content-type": "application/x-protobuf", "content-encoding": "zstd"},
        _bomb("zstd"),
        413,
        "decompressed_too_large",
        f"zstd body decompresses past the limit of {MAX_DECOMPRESSED} bytes",
        id="zstd_bomb",
    ),
    pytest.param(
        "POST",
        "/api/v1/write",
        {"content-type": "application/json"},
        b"{}",
        415,
        "unsupported_media_type",
        "content-type 'application/json' is not remote write 1.0 (application/x-protobuf)",
        id="json",
    ),
    pytest.param(
        "POST",
        "/api/v1/write",
        {
            "content-type": "application/x-protobuf;proto=io.prometheus.write.v2.Request",
            "content-encoding": "snappy",
        },
        snappy(write_request("v2").SerializeToString()),
        415,
        "unsupported_media_type",
        "content-type 'application/x-protobuf;proto=io.prometheus.write.v2.Request' is not"
        " remote write 1.0 (application/x-protobuf)",
        id="remote_write_v2",
    ),
    pytest.param(
        "POST",
        "/api/v1/write",
        {"content-type": "application/x-protobuf", "content-encoding": "br"},
        b"\x0b\x02\x80hello\x03",
        415,
        "unsupported_encoding",
        "content-encoding 'br' is not supported",
        id="brotli",
    ),
    pytest.param(
        "GET",
        "/api/v1/write",
        {},
        b"",
        405,
        "method_not_allowed",
        "use POST",
        id="get",
    ),
    pytest.param(
        "POST",
        "/api/v1/push",
        PRW_HEADERS,
        snappy(write_request("path").SerializeToString()),
        404,
        "not_found",
        "no such path '/api/v1/push'; use /api/v1/write",
        id="unknown_path",
    ),
]


async def _assert_still_serving(gov: Running, tag: str) -> None:
    req = write_request(tag, n_series=2, n_samples=1)
    resp = await gov.write(req)
    assert resp.status_code == 204
    assert resp.headers["x-prometheus-remote-write-samples-written"] == "2"
    await gov.backend.wait_for(lambda: len(gov.backend.series) >= 2)
    assert gov.backend.series == keys(req)


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "reason", "message"),
    REJECTIONS,
)
async def test_bad_request_is_rejected_counted_and_explained(
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    reason: str,
    message: str,
) -> None:
    """Each kind of bad request gets its status, a one-line reason as the body and exactly one
    count in governor_receiver_rejected_requests_total{reason}; nothing reaches the backend and
    the receiver still accepts a good request right after."""
    async with running_governor(receiver=LIMITS) as gov:
        assert gov.rejected(reason) == 0.0
        resp = await gov.client.request(method, gov.url(path), content=body, headers=headers)
        assert resp.status_code == status
        assert resp.text == message + "\n"
        assert resp.headers["content-type"] == "text/plain; charset=utf-8"
        if status == 405:
            assert resp.headers["allow"] == "POST"
        assert gov.rejected(reason) == 1.0
        answered = gov.sample("governor_receiver_requests_total", pipeline="prw", code=str(status))
        assert answered == 1.0
        assert gov.sample("governor_datapoints_received_total", pipeline="prw") == 0.0
        await _assert_still_serving(gov, f"after-{reason}")
        assert gov.rejected(reason) == 1.0


async def test_chunked_body_over_the_limit_is_rejected_without_content_length() -> None:
    """A chunked body (no Content-Length) is cut off once it passes max_request_bytes: 413
    too_large, counted once, and the receiver still accepts a good request afterwards."""
    body = snappy(write_request("chunked", n_series=400).SerializeToString())
    assert len(body) > MAX_REQUEST
    async with running_governor(receiver=LIMITS) as gov:
        resp = await gov.client.post(
            gov.write_url, content=_chunks(body, 1024), headers=PRW_HEADERS
        )
        assert resp.request.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in resp.request.headers
        assert resp.status_code == 413
        assert resp.text == f"body is over the limit of {MAX_REQUEST} bytes\n"
        assert gov.rejected("too_large") == 1.0
        await _assert_still_serving(gov, "after-chunked")


async def test_chunked_body_under_the_limit_is_accepted() -> None:
    """A chunked body within max_request_bytes is read whole and accepted."""
    req = write_request("chunked-ok", n_series=5, n_samples=2)
    body = snappy(req.SerializeToString())
    assert len(body) < MAX_REQUEST
    async with running_governor(receiver=LIMITS) as gov:
        resp = await gov.client.post(gov.write_url, content=_chunks(body, 16), headers=PRW_HEADERS)
        assert resp.status_code == 204
        assert resp.headers["x-prometheus-remote-write-samples-written"] == "10"
        await gov.backend.wait_for(lambda: len(gov.backend.series) >= 5)
        assert gov.backend.series == keys(req)


# ---- backpressure -----------------------------------------------------------------------------


async def test_stalled_pipeline_answers_429_then_recovers_without_losing_acknowledged_data() -> (
    None
):
    """With the backend stuck, the queue full (block) and the one-slot ingest channel taken, a
    request waits ingest_wait_s and is answered 429 with Retry-After; once the backend is
    released, requests succeed again and every series that got 204 arrives exactly once."""
    backend = RecordingBackend()
    backend.gate = trio.Event()
    async with running_governor(
        backend,
        receiver={"ingest_queue_requests": 1, "ingest_wait_s": 0.05, "retry_after_s": 3},
        batch={"max_series": 1},
        queue={"max_batches": 1, "full_behavior": "block"},
        exporter={"workers": 1},
    ) as gov:
        exporter = gov.app.exporters[0]
        batcher = gov.app.batcher
        assert batcher is not None
        acknowledged: list[SeriesKey] = []

        async def write_one(i: int) -> httpx.Response:
            req = write_request(f"bp-{i}", n_series=1, n_samples=1)
            resp = await gov.write(req)
            if resp.status_code == 204:
                acknowledged.extend(keys(req))
            return resp

        # Fill each stage in turn, waiting until the previous request has settled where it stops.
        assert (await write_one(0)).status_code == 204
        await backend.wait_for(lambda: backend.requests == 1)  # taken by the only worker
        assert (await write_one(1)).status_code == 204
        await wait_until(lambda: exporter.queue.statistics().length == 1)  # the queue is full
        assert (await write_one(2)).status_code == 204
        await wait_until(lambda: batcher.lost_datapoints(0) == 1)  # the batcher blocks in put
        assert (await write_one(3)).status_code == 204  # the ingest channel's one slot

        resp = await write_one(4)
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "3"
        assert resp.text == "ingest queue is full; retry later\n"
        assert (await write_one(5)).status_code == 429
        assert gov.rejected("backpressure") == 2.0
        assert gov.sample("governor_datapoints_received_total", pipeline="prw") == 4.0
        assert backend.requests == 1
        assert backend.series == []

        backend.gate.set()
        await backend.wait_for(lambda: len(backend.series) >= len(acknowledged))
        req = write_request("after-release", n_series=1, n_samples=1)
        resp = await gov.write(req)
        assert resp.status_code == 204
        acknowledged += keys(req)
        await backend.wait_for(lambda: len(backend.series) >= len(acknowledged))
        assert sorted(backend.series) == sorted(acknowledged)
        assert len(acknowledged) == 5
        assert gov.rejected("backpressure") == 2.0


# ---- health and telemetry ---------------------------------------------------------------------


async def test_ready_is_503_draining_after_shutdown_begins() -> None:
    """/ready answers 200 {"status": "ready"} while serving and 503 {"status": "draining"} once
    shutdown has begun (while the pipeline still drains); /live answers 200 throughout."""
    backend = RecordingBackend()
    backend.gate = trio.Event()
    async with running_governor(backend) as gov:
        live = await gov.client.get(gov.telemetry_url("/live"))
        assert live.status_code == 200
        assert live.json() == {"status": "live"}
        ready = await gov.client.get(gov.telemetry_url("/ready"))
        assert ready.status_code == 200
        assert ready.headers["content-type"] == "application/json"
        assert ready.json() == {"status": "ready"}

        # Hold one batch at the backend so the pipeline cannot finish draining.
        req = write_request("drain", n_series=2, n_samples=1)
        assert (await gov.write(req)).status_code == 204
        await backend.wait_for(lambda: backend.requests == 1)
        gov.shutdown()

        ready = await gov.client.get(gov.telemetry_url("/ready"))
        assert ready.status_code == 503
        assert json.loads(ready.content) == {"status": "draining"}
        live = await gov.client.get(gov.telemetry_url("/live"))
        assert live.status_code == 200
        assert live.json() == {"status": "live"}

        backend.gate.set()
        await backend.wait_for(lambda: len(backend.series) == 2)
    assert backend.series == keys(req)
    assert gov.app.report is not None
    assert gov.app.report.clean
    assert gov.app.report.delivered == {"backend": 2}
    assert gov.app.report.dropped == {"backend": {}}


async def test_metrics_endpoint_counts_received_datapoints_exactly() -> None:
    """/metrics is the Prometheus text format and governor_datapoints_received_total{pipeline=
    "prw"} equals the datapoints of the accepted requests (rejected ones are not counted)."""
    async with running_governor() as gov:
        for i in range(3):
            resp = await gov.write(write_request(f"m-{i}", n_series=4, n_samples=5))
            assert resp.status_code == 204
        bad = await gov.client.post(gov.write_url, content=snappy(b"\xff"), headers=PRW_HEADERS)
        assert bad.status_code == 400

        resp = await gov.client.get(gov.telemetry_url("/metrics"))
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
        families = {f.name: f for f in text_string_to_metric_families(resp.text)}
        received = families["governor_datapoints_received"]
        assert received.type == "counter"
        assert [(s.name, s.labels, s.value) for s in received.samples] == [
            ("governor_datapoints_received_total", {"pipeline": "prw"}, 60.0)
        ]
        assert 'governor_datapoints_received_total{pipeline="prw"} 60.0\n' in resp.text
        rejected = families["governor_receiver_rejected_requests"]
        assert [(s.labels, s.value) for s in rejected.samples] == [
            ({"pipeline": "prw", "reason": "bad_protobuf"}, 1.0)
        ]


# ---- many clients -----------------------------------------------------------------------------


async def test_many_concurrent_clients_all_accepted_and_all_delivered() -> None:
    """20 clients sending 10 requests each at once are all answered 204, and the backend
    receives exactly the union of their series: none lost, none duplicated."""
    clients, per_client = 20, 10
    sent: list[SeriesKey] = []
    statuses: list[int] = []
    async with running_governor(batch={"max_series": 50}) as gov:

        async def client(c: int) -> None:
            async with httpx.AsyncClient(timeout=DEADLINE_S) as own:
                for r in range(per_client):
                    req = write_request(f"c{c}-r{r}", n_series=2, n_samples=2)
                    resp = await own.post(
                        gov.write_url,
                        content=snappy(req.SerializeToString()),
                        headers=PRW_HEADERS,
                    )
                    statuses.append(resp.status_code)
                    sent.extend(keys(req))

        async with trio.open_nursery() as nursery:
            for c in range(clients):
                nursery.start_soon(client, c)

        assert statuses == [204] * (clients * per_client)
        await gov.backend.wait_for(lambda: len(gov.backend.series) >= len(sent))
        assert gov.sample("governor_datapoints_received_total", pipeline="prw") == 800.0
    assert len(sent) == 400
    assert sorted(gov.backend.series) == sorted(sent)
    assert gov.app.report is not None
    assert gov.app.report.delivered == {"backend": 800}


async def test_zero_ingest_wait_accepts_when_there_is_room() -> None:
    """ingest_wait_s: 0 never waits but still accepts: with a free slot, budget and channel room,
    every request is answered 204 and delivered."""
    async with running_governor(receiver={"ingest_wait_s": 0}) as gov:
        sent: list[SeriesKey] = []
        for i in range(5):
            req = write_request(f"nowait-{i}", n_series=2, n_samples=1)
            assert (await gov.write(req)).status_code == 204
            sent += keys(req)
        await gov.backend.wait_for(lambda: len(gov.backend.series) >= len(sent))
        assert sorted(gov.backend.series) == sorted(sent)
        assert gov.rejected("backpressure") == 0
