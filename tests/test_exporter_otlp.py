"""The OTLP exporters (OTLP/gRPC and OTLP/HTTP) and the OTLP specification's delivery rules.

The classification tables are pure. Everything else runs a whole governor (tests/otlp_peers.py) in
front of a real grpcio or hypercorn backend that answers what a test scripts, in real time: grpcio
runs its own threads, which no virtual clock drives. Data goes in through governor's OTLP/HTTP
receiver, and every datapoint is named by (metric, attribute), so "exactly once" is a comparison
of sorted lists.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import grpc
import httpx
import pytest
import trio
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

from service import __version__
from service.app import Addresses, App
from service.codec import compression, otlp
from service.config import Config
from service.export import policy
from service.export.otlp import classify_grpc, classify_otlp_http, metrics_url
from service.export.policy import Kind, Outcome
from service.receivers.http import (
    Receive,
    Scope,
    Send,
    hypercorn_config,
    read_body,
    respond,
    serve_http,
)
from tests.otlp_peers import (
    DEADLINE_S,
    GRPCAnswer,
    GRPCBackend,
    HTTPAnswer,
    HTTPBackend,
    Request,
    RunningOTLP,
    otlp_config,
    running_otlp_governor,
    wait_until,
)

OPENSSL = "/usr/bin/openssl"
SENT = "governor_datapoints_sent_total"
DROPPED = "governor_datapoints_dropped_total"
RETRIES = "governor_export_retries_total"
SPLITS = "governor_export_splits_total"
REQUESTS = "governor_export_requests_total"
DETAILS_KEY = "grpc-status-details-bin"
Code = grpc.StatusCode
Backend = GRPCBackend | HTTPBackend
Key = tuple[str, str]  # (metric name, datapoint attribute "i"): one datapoint
T0_NS = 1_700_000_000 * 10**9


# ---- data -------------------------------------------------------------------------------------


def request(
    tag: str, points: int = 3, *, resources: int = 1, metrics: int = 1, pad: str = ""
) -> Request:
    """`resources` resources with one scope of `metrics` gauges of `points` datapoints each;
    datapoint i of metric "<tag>.r<r>.m<m>" has the attribute i="<i><pad>"."""
    req = Request()
    for r in range(resources):
        rm = req.resource_metrics.add()
        rm.resource.attributes.add(key="service.name").value.string_value = f"{tag}-{r}"
        sm = rm.scope_metrics.add()
        sm.scope.name = "governor.tests"
        for m in range(metrics):
            metric = sm.metrics.add(name=f"{tag}.r{r}.m{m}")
            for i in range(points):
                dp = metric.gauge.data_points.add(as_int=i, time_unix_nano=T0_NS + i)
                dp.attributes.add(key="i").value.string_value = f"{i}{pad}"
    return req


def keys(*reqs: Request) -> list[Key]:
    """The datapoints of `reqs`, sorted."""
    return sorted(
        (m.name, dp.attributes[0].value.string_value)
        for req in reqs
        for rm in req.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for dp in m.gauge.data_points
    )


def delivered(backend: Backend) -> list[Key]:
    """Every datapoint the backend accepted, sorted; duplicates stay."""
    return keys(*backend.requests())


def points_per_request(backend: Backend) -> list[int]:
    return [otlp.count(r)[0] for r in backend.requests()]


def status_body(message: str, code: Code = Code.INVALID_ARGUMENT) -> bytes:
    """A google.rpc.Status error body, as OTLP/HTTP servers send with 4xx and 5xx answers."""
    return Status(code=code.value[0], message=message).SerializeToString()


def retry_details(seconds: int = 0, nanos: int = 0) -> tuple[tuple[str, bytes], ...]:
    """gRPC trailing metadata carrying a google.rpc.Status with a RetryInfo of that delay."""
    status = Status(code=Code.RESOURCE_EXHAUSTED.value[0], message="slow down")
    info = RetryInfo()
    info.retry_delay.seconds = seconds
    info.retry_delay.nanos = nanos
    status.details.add().Pack(info)
    return ((DETAILS_KEY, status.SerializeToString()),)


# ---- governor and backends --------------------------------------------------------------------


def new_backend(protocol: str) -> Backend:
    return GRPCBackend() if protocol == "grpc" else HTTPBackend()


async def post(gov: RunningOTLP, req: Request) -> int:
    """Send `req` to governor's OTLP/HTTP receiver; returns the datapoints it acknowledged."""
    resp = await gov.client.post(
        gov.http_url, content=req.SerializeToString(), headers={"content-type": otlp.PROTOBUF}
    )
    assert resp.status_code == 200
    assert otlp.partial_success(resp.content) == (0, "")
    return otlp.count(req)[0]


def sample(gov: RunningOTLP, name: str, exporter: str = "backend", **labels: str) -> float:
    """One of governor's metrics for an exporter of the OTLP pipeline; 0 if not set yet."""
    return gov.sample(name, pipeline="otlp", exporter=exporter, **labels)


def settled(gov: RunningOTLP, exporter: str = "backend") -> int:
    """Datapoints the exporter delivered or dropped so far."""
    [exp] = [e for e in gov.app.exporters if e.name == exporter]
    return exp.sent_datapoints + sum(exp.dropped_datapoints.values())


def fast_breaker(**exporter: Any) -> dict[str, Any]:
    """Exporter settings whose breaker reopens within a tenth of a second, not the default 5 s."""
    return {"breaker": {"open_s": 0.02, "max_open_s": 0.1}, **exporter}


@asynccontextmanager
async def governor(cfg: Config, backend: Backend) -> AsyncIterator[RunningOTLP]:
    """A governor run from `cfg` whose backend the test starts and stops itself (unlike
    running_otlp_governor, which starts its backend first). Shut down cleanly on exit."""
    app = App(cfg)
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def run_app(*, task_status: trio.TaskStatus[Addresses]) -> None:
            try:
                await app.run(task_status=task_status)
            finally:
                done.set()

        addrs = await nursery.start(run_app)
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
            running = RunningOTLP(app, addrs, backend, client)
            yield running
        running.shutdown()
        with trio.fail_after(DEADLINE_S):
            await done.wait()


@asynccontextmanager
async def serving(
    backend: HTTPBackend, listen: str = "127.0.0.1:0", *, certs: Certs | None = None
) -> AsyncIterator[None]:
    """Serve `backend` with hypercorn (TLS with `certs`) and set its endpoint, until exit."""
    cfg = hypercorn_config(listen)
    scheme = "http"
    if certs is not None:
        cfg.certfile, cfg.keyfile, scheme = str(certs.cert), str(certs.key), "https"
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        [(host, port)] = await nursery.start(serve_http, backend, cfg, stop.wait)
        host = "localhost" if certs is not None else host  # the name in the certificate
        backend.endpoint = f"{scheme}://{host}:{port}/v1/metrics"
        try:
            yield
        finally:
            stop.set()


async def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (the OS picked it, then it was let go)."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FlakyGRPCBackend(GRPCBackend):
    """A GRPCBackend that answers UNAVAILABLE, not its script, while `down` is set."""

    down = False

    def next(self) -> Any:
        answer = super().next()
        return GRPCAnswer(Code.UNAVAILABLE, "backend down") if self.down else answer


class FlakyHTTPBackend(HTTPBackend):
    """An HTTPBackend that answers 503, not its script, while `down` is set."""

    down = False

    def next(self) -> Any:
        answer = super().next()
        return HTTPAnswer(503, body=status_body("backend down")) if self.down else answer


def flaky_backend(protocol: str) -> FlakyGRPCBackend | FlakyHTTPBackend:
    return FlakyGRPCBackend() if protocol == "grpc" else FlakyHTTPBackend()


class RefusingHTTPBackend(HTTPBackend):
    """An HTTPBackend that answers 413 to every request `refuse` picks, as a server with a
    request size limit does; `seen` has the datapoint count of every request, in order."""

    def __init__(self, refuse: Callable[[Request], bool]) -> None:
        super().__init__()
        self.refuse = refuse
        self.seen: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        body = await read_body(scope, receive, 1 << 30)
        encoding = dict(scope["headers"]).get(b"content-encoding", b"").decode()
        req = otlp.decode(compression.decompress(body, encoding, 1 << 30))
        self.seen.append(otlp.count(req)[0])
        if self.refuse(req):
            await respond(send, 413, status_body("request too large"), otlp.PROTOBUF.encode())
            return

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        await super().__call__(scope, replay, send)


# ---- 1. classification: pure tables -----------------------------------------------------------

NOW = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        (200, {}, b"", Outcome(Kind.SUCCESS, 200)),
        (200, {}, otlp.response(), Outcome(Kind.SUCCESS, 200)),
        (
            200,
            {},
            otlp.response(2, "2 datapoints without a unit"),
            Outcome(Kind.SUCCESS, 200, detail="2 datapoints without a unit", rejected=2),
        ),
        # A warning without rejected datapoints is still a full success.
        (200, {}, otlp.response(0, "deprecated"), Outcome(Kind.SUCCESS, 200, detail="deprecated")),
        (204, {}, b"", Outcome(Kind.SUCCESS, 204)),
        (400, {}, status_body("bad data"), Outcome(Kind.PERMANENT, 400, detail="bad data")),
        (401, {}, status_body("who are you"), Outcome(Kind.PERMANENT, 401, detail="who are you")),
        (403, {}, status_body("not you"), Outcome(Kind.PERMANENT, 403, detail="not you")),
        (404, {}, b"", Outcome(Kind.PERMANENT, 404)),
        (413, {}, status_body("too big"), Outcome(Kind.TOO_LARGE, 413, detail="too big")),
        (429, {}, b"", Outcome(Kind.RETRYABLE, 429)),
        (429, {"retry-after": "7"}, b"", Outcome(Kind.RETRYABLE, 429, retry_after_s=7.0)),
        (
            429,
            {"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"},
            status_body("slow down"),
            Outcome(Kind.RETRYABLE, 429, retry_after_s=30.0, detail="slow down"),
        ),
        (  # a date in the past: retry now
            429,
            {"retry-after": "Wed, 21 Oct 2015 07:00:00 GMT"},
            b"",
            Outcome(Kind.RETRYABLE, 429, retry_after_s=0.0),
        ),
        (429, {"retry-after": "soon"}, b"", Outcome(Kind.RETRYABLE, 429)),
        # The OTLP specification retries only 429, 502, 503 and 504: 500 and 501 are permanent.
        (500, {}, status_body("bug"), Outcome(Kind.PERMANENT, 500, detail="bug")),
        (501, {}, b"", Outcome(Kind.PERMANENT, 501)),
        (502, {}, b"", Outcome(Kind.RETRYABLE, 502)),
        (503, {"retry-after": "2"}, b"", Outcome(Kind.RETRYABLE, 503, retry_after_s=2.0)),
        (504, {}, b"", Outcome(Kind.RETRYABLE, 504)),
    ],
)
def test_classify_otlp_http(
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    headers: dict[str, str],
    body: bytes,
    expected: Outcome,
) -> None:
    """Each OTLP/HTTP answer gets the OTLP specification's outcome: success (with the count of
    datapoints a partial success rejected), too large, retryable honouring Retry-After in
    seconds or as an HTTP-date, or permanent with the google.rpc.Status message as detail."""
    monkeypatch.setattr(policy, "time", types.SimpleNamespace(time=lambda: NOW))
    assert classify_otlp_http(status, headers, body) == expected


RETRYABLE_CODES = {
    Code.CANCELLED,
    Code.DEADLINE_EXCEEDED,
    Code.ABORTED,
    Code.OUT_OF_RANGE,
    Code.UNAVAILABLE,
    Code.DATA_LOSS,
}


@pytest.mark.parametrize("code", [c for c in Code if c is not Code.OK], ids=lambda c: c.name)
def test_classify_grpc_every_code(code: Code) -> None:
    """Without details, exactly CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE
    and DATA_LOSS are retryable; every other code (RESOURCE_EXHAUSTED too) is permanent and its
    datapoints are counted under grpc_<code>."""
    kind = Kind.RETRYABLE if code in RETRYABLE_CODES else Kind.PERMANENT
    detail = f"{code.name}: scripted"
    reason = f"grpc_{code.name.lower()}"
    assert classify_grpc(code, "scripted") == Outcome(kind, detail=detail, code=reason)


@pytest.mark.parametrize(
    ("details", "trailing", "expected"),
    [
        pytest.param(
            "slow down",
            retry_details(seconds=1, nanos=500_000_000),
            Outcome(
                Kind.RETRYABLE,
                retry_after_s=1.5,
                detail="RESOURCE_EXHAUSTED: slow down",
                code="grpc_resource_exhausted",
            ),
            id="retry-info",
        ),
        pytest.param(
            "slow down",
            # Other metadata first; the details key is found wherever it is.
            (("x-other", "1"), *retry_details(seconds=4)),
            Outcome(
                Kind.RETRYABLE,
                retry_after_s=4.0,
                detail="RESOURCE_EXHAUSTED: slow down",
                code="grpc_resource_exhausted",
            ),
            id="retry-info-after-other-metadata",
        ),
        pytest.param(
            "quota",
            ((DETAILS_KEY, Status(code=8, message="quota").SerializeToString()),),
            Outcome(
                Kind.PERMANENT, detail="RESOURCE_EXHAUSTED: quota", code="grpc_resource_exhausted"
            ),
            id="status-without-retry-info",
        ),
        pytest.param(
            "quota",
            ((DETAILS_KEY, b"\xff\xff not a status"),),
            Outcome(
                Kind.PERMANENT, detail="RESOURCE_EXHAUSTED: quota", code="grpc_resource_exhausted"
            ),
            id="garbage-details",
        ),
        pytest.param(
            "Received message larger than max (5000 vs. 4096)",
            (),
            Outcome(
                Kind.TOO_LARGE,
                detail="RESOURCE_EXHAUSTED: Received message larger than max (5000 vs. 4096)",
                code="grpc_resource_exhausted",
            ),
            id="larger-than-max",
        ),
        pytest.param(
            "Sent message larger than max (5000 vs. 4096)",
            retry_details(seconds=1),
            Outcome(
                Kind.TOO_LARGE,
                detail="RESOURCE_EXHAUSTED: Sent message larger than max (5000 vs. 4096)",
                code="grpc_resource_exhausted",
            ),
            id="larger-than-max-wins-over-retry-info",
        ),
    ],
)
def test_classify_grpc_resource_exhausted(
    details: str, trailing: tuple[tuple[str, str | bytes], ...], expected: Outcome
) -> None:
    """RESOURCE_EXHAUSTED is retryable only when grpc-status-details-bin carries a RetryInfo,
    after its delay; "larger than max" (a message size limit) means split the batch."""
    assert classify_grpc(Code.RESOURCE_EXHAUSTED, details, trailing) == expected


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://collector:4318", "http://collector:4318/v1/metrics"),
        ("http://collector:4318/", "http://collector:4318/v1/metrics"),
        ("https://collector", "https://collector/v1/metrics"),
        ("http://collector:4318/v1/metrics", "http://collector:4318/v1/metrics"),
        ("https://vendor.example/otlp/v1/metrics", "https://vendor.example/otlp/v1/metrics"),
        ("http://collector:4318/custom", "http://collector:4318/custom"),
        ("http://collector:4318?tenant=a", "http://collector:4318/v1/metrics?tenant=a"),
    ],
)
def test_metrics_url(endpoint: str, url: str) -> None:
    """An endpoint without a path gets /v1/metrics (as OTEL_EXPORTER_OTLP_ENDPOINT does, in the
    URL's path, never inside its query); an endpoint with a path is POSTed to as it is."""
    assert metrics_url(endpoint) == url


# ---- 2. retry, drop and partial success through a running governor ----------------------------

RETRYABLE_ANSWERS = [
    *(
        pytest.param("grpc", GRPCAnswer(code, "scripted"), id=f"grpc-{code.name}")
        for code in sorted(RETRYABLE_CODES, key=lambda c: c.value[0])
    ),
    pytest.param(
        "grpc",
        GRPCAnswer(Code.RESOURCE_EXHAUSTED, "slow down", retry_details(nanos=10_000_000)),
        id="grpc-RESOURCE_EXHAUSTED-with-retry-info",
    ),
    pytest.param("http", HTTPAnswer(429, (("retry-after", "0"),)), id="http-429"),
    pytest.param("http", HTTPAnswer(502), id="http-502"),
    pytest.param("http", HTTPAnswer(503, body=status_body("restarting")), id="http-503"),
    pytest.param("http", HTTPAnswer(504), id="http-504"),
]


@pytest.mark.parametrize(("protocol", "answer"), RETRYABLE_ANSWERS)
async def test_retryable_answer_is_retried_and_delivered_once(
    protocol: str, answer: GRPCAnswer | HTTPAnswer
) -> None:
    """A retryable answer once, then success: the batch is sent twice and arrives once, one
    retry is counted, nothing is dropped."""
    backend = new_backend(protocol)
    backend.script(answer)
    req = request("retry")
    async with running_otlp_governor(backend) as gov:
        await post(gov, req)
        await wait_until(lambda: sample(gov, SENT) == 3)
    assert backend.attempts == 2
    assert delivered(backend) == keys(req)
    assert len(backend.received) == 1
    assert sample(gov, RETRIES) == 1.0
    assert sample(gov, REQUESTS, outcome="retryable") == 1.0
    assert sample(gov, REQUESTS, outcome="success") == 1.0
    assert gov.app.report is not None
    assert gov.app.report.delivered == {"backend": 3}
    assert gov.app.report.dropped == {"backend": {}}


PERMANENT_ANSWERS = [
    *(
        pytest.param(
            "grpc",
            GRPCAnswer(code, "scripted"),
            f"grpc_{code.name.lower()}",
            id=f"grpc-{code.name}",
        )
        for code in Code
        if code is not Code.OK and code not in RETRYABLE_CODES
    ),
    *(
        pytest.param(
            "http",
            HTTPAnswer(status, body=status_body("no")),
            f"http_{status}",
            id=f"http-{status}",
        )
        for status in (400, 401, 403, 404, 500, 501)
    ),
]


@pytest.mark.parametrize(("protocol", "answer", "reason"), PERMANENT_ANSWERS)
async def test_permanent_answer_drops_the_batch_without_retry(
    protocol: str, answer: GRPCAnswer | HTTPAnswer, reason: str
) -> None:
    """A permanent answer: the backend saw exactly one attempt, nothing of that batch arrives,
    its datapoints are counted as dropped under the answer's reason, and the next batch is
    delivered."""
    backend = new_backend(protocol)
    backend.script(answer)
    bad, good = request("bad", 4), request("good", 2)
    async with running_otlp_governor(backend) as gov:
        await post(gov, bad)
        await wait_until(lambda: sample(gov, DROPPED, reason=reason) == 4)
        assert backend.attempts == 1
        await post(gov, good)
        await wait_until(lambda: sample(gov, SENT) == 2)
    assert backend.attempts == 2
    assert delivered(backend) == keys(good)
    assert sample(gov, DROPPED, reason=reason) == 4.0
    assert sample(gov, RETRIES) == 0.0
    assert sample(gov, REQUESTS, outcome="permanent") == 1.0
    assert gov.app.report is not None
    assert gov.app.report.delivered == {"backend": 2}
    assert gov.app.report.dropped == {"backend": {reason: 4}}


@pytest.mark.parametrize(
    ("protocol", "answer"),
    [
        pytest.param(
            "grpc",
            GRPCAnswer(Code.RESOURCE_EXHAUSTED, "slow down", retry_details(seconds=1)),
            id="grpc-retry-info",
        ),
        pytest.param("http", HTTPAnswer(429, (("retry-after", "1"),)), id="http-retry-after"),
    ],
)
async def test_retry_waits_as_long_as_the_backend_asks(
    protocol: str, answer: GRPCAnswer | HTTPAnswer
) -> None:
    """A RetryInfo (gRPC) or Retry-After (HTTP) of 1 s makes the retry wait at least 1 s, far
    beyond the 10 ms backoff, and not much longer."""
    backend = new_backend(protocol)
    backend.script(answer)
    req = request("later")
    async with running_otlp_governor(backend) as gov:
        await post(gov, req)
        acked = trio.current_time()
        await wait_until(lambda: sample(gov, SENT) == 3)
        took = trio.current_time() - acked
    assert 1.0 <= took < 1.0 + 2.0
    assert backend.attempts == 2
    assert delivered(backend) == keys(req)
    assert sample(gov, RETRIES) == 1.0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_partial_success_counts_the_rejected_datapoints_as_dropped(protocol: str) -> None:
    """OK with partial_success.rejected_data_points=2: the other 3 of 5 datapoints count as
    sent, the 2 as dropped with reason backend_rejected; no retry."""
    backend = new_backend(protocol)
    body = otlp.response(2, "2 datapoints had no unit")
    backend.script(GRPCAnswer(response=body) if protocol == "grpc" else HTTPAnswer(body=body))
    async with running_otlp_governor(backend) as gov:
        await post(gov, request("partial", 5))
        await wait_until(lambda: settled(gov) == 5)
    assert backend.attempts == 1
    assert sample(gov, SENT) == 3.0
    assert sample(gov, DROPPED, reason="backend_rejected") == 2.0
    assert sample(gov, RETRIES) == 0.0
    assert gov.app.report is not None
    assert gov.app.report.delivered == {"backend": 3}
    assert gov.app.report.dropped == {"backend": {"backend_rejected": 2}}


# ---- 3. splitting what is too large -----------------------------------------------------------


async def test_http_413_splits_until_every_datapoint_arrives_once() -> None:
    """A backend refusing (413) requests of more than 2 datapoints gets a 16-datapoint request
    (2 resources x 2 metrics x 4 points) split by resource, then by metric, then by datapoint:
    eight requests of 2 arrive, every datapoint exactly once, seven splits counted."""
    backend = RefusingHTTPBackend(lambda req: otlp.count(req)[0] > 2)
    req = request("split", 4, resources=2, metrics=2)
    async with running_otlp_governor(backend) as gov:
        await post(gov, req)
        await wait_until(lambda: settled(gov) == 16)
    assert backend.seen == [16, 8, 4, 2, 2, 4, 2, 2, 8, 4, 2, 2, 4, 2, 2]
    assert points_per_request(backend) == [2] * 8
    assert delivered(backend) == keys(req)
    assert sample(gov, SPLITS) == 7.0
    assert sample(gov, SENT) == 16.0
    assert sample(gov, RETRIES) == 0.0
    assert sample(gov, REQUESTS, outcome="too_large") == 7.0
    assert gov.app.report is not None
    assert gov.app.report.dropped == {"backend": {}}


async def test_http_413_for_a_single_datapoint_drops_it_as_too_large() -> None:
    """When one datapoint is refused even alone, the split delivers the other three and drops
    exactly that one with reason too_large."""
    req = request("poison", 4)
    poison = req.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points[2]
    poison.attributes.add(key="poison").value.bool_value = True

    def has_poison(r: Request) -> bool:
        return any(
            a.key == "poison"
            for rm in r.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            for dp in m.gauge.data_points
            for a in dp.attributes
        )

    backend = RefusingHTTPBackend(has_poison)
    async with running_otlp_governor(backend) as gov:
        await post(gov, req)
        await wait_until(lambda: settled(gov) == 4)
    assert backend.seen == [4, 2, 2, 1, 1]
    assert delivered(backend) == [k for k in keys(req) if k != ("poison.r0.m0", "2")]
    assert sample(gov, DROPPED, reason="too_large") == 1.0
    assert sample(gov, SPLITS) == 2.0
    assert sample(gov, SENT) == 3.0
    assert gov.app.report is not None
    assert gov.app.report.dropped == {"backend": {"too_large": 1}}


GRPC_MAX_BYTES = 1024  # the backend's grpc.max_receive_message_length


@pytest.mark.parametrize("compression_", ["gzip", "none"])
async def test_grpc_larger_than_max_splits_until_every_datapoint_arrives_once(
    compression_: str,
) -> None:
    """A grpcio server with max_receive_message_length 1 KiB refuses a ~5 KiB request with
    RESOURCE_EXHAUSTED "larger than max", compressed or not: the batch is split until the
    pieces fit, every datapoint arrives exactly once, and each split is counted."""
    backend = GRPCBackend(options=[("grpc.max_receive_message_length", GRPC_MAX_BYTES)])
    # Distinct pads so gzip cannot shrink the request under the limit.
    req = request("big", 16, pad="-" + "".join(f"{i:03x}" for i in range(100)))
    assert len(req.SerializeToString()) == 5434
    async with running_otlp_governor(backend, exporter={"compression": compression_}) as gov:
        await post(gov, req)
        await wait_until(lambda: settled(gov) == 16)
    # 5.4 KB -> 2 x 2.7 KB -> 4 x 1.4 KB -> 8 x 740 bytes: the limit is on the decompressed size.
    assert points_per_request(backend) == [2] * 8
    assert delivered(backend) == keys(req)
    assert sample(gov, SPLITS) == 7.0
    assert sample(gov, REQUESTS, outcome="too_large") == 7.0
    assert sample(gov, SENT) == 16.0
    assert sample(gov, RETRIES) == 0.0
    assert gov.app.report is not None
    assert gov.app.report.dropped == {"backend": {}}


async def test_grpc_single_datapoint_larger_than_max_is_dropped_as_too_large() -> None:
    """A lone datapoint bigger than the server's limit cannot be split: dropped with reason
    too_large, never reaching the handler; the next batch is delivered."""
    backend = GRPCBackend(options=[("grpc.max_receive_message_length", GRPC_MAX_BYTES)])
    huge = request("huge", 1, pad="".join(f"{i:04x}" for i in range(2 * GRPC_MAX_BYTES // 4)))
    small = request("small", 2)
    async with running_otlp_governor(backend, exporter={"compression": "none"}) as gov:
        await post(gov, huge)
        await wait_until(lambda: settled(gov) == 1)
        await post(gov, small)
        await wait_until(lambda: settled(gov) == 3)
    assert backend.attempts == 1
    assert delivered(backend) == keys(small)
    assert sample(gov, DROPPED, reason="too_large") == 1.0
    assert sample(gov, SPLITS) == 0.0
    assert gov.app.report is not None
    assert gov.app.report.dropped == {"backend": {"too_large": 1}}


# ---- 4. a backend that is down, or hangs up -----------------------------------------------------


async def test_grpc_backend_not_started_then_started_gets_everything_once() -> None:
    """While the gRPC backend's server is not running, requests are acknowledged and attempts
    fail (retryable); once it starts, everything acknowledged arrives exactly once.

    grpcio binds (and the kernel accepts on) the port when the server is created, but nobody
    speaks HTTP/2 on it before start(): each attempt ends in DEADLINE_EXCEEDED after timeout_s.
    Those calls were never sent, so none of them may show up once the server starts."""
    backend = GRPCBackend()
    cfg = otlp_config(backend.endpoint, "grpc", exporter=fast_breaker(timeout_s=0.3))
    sent: list[Request] = []
    try:
        async with governor(cfg, backend) as gov:
            for i in range(3):
                sent.append(request(f"early{i}"))
                await post(gov, sent[-1])
            await wait_until(lambda: sample(gov, REQUESTS, outcome="retryable") >= 2)
            assert backend.attempts == 0
            backend.start()
            sent.append(request("late"))
            await post(gov, sent[-1])
            await wait_until(lambda: settled(gov) == 12)
    finally:
        backend.stop()
    assert delivered(backend) == keys(*sent)
    assert sample(gov, SENT) == 12.0
    assert gov.app.report is not None
    assert gov.app.report.dropped == {"backend": {}}


async def test_http_backend_down_then_up_on_the_same_port_gets_everything_once() -> None:
    """Nothing listens on the HTTP backend's port at first: requests are acknowledged, attempts
    are refused (retryable); once the backend listens there, everything arrives exactly once."""
    port = await free_port()
    backend = HTTPBackend()
    cfg = otlp_config(f"http://127.0.0.1:{port}/v1/metrics", "http", exporter=fast_breaker())
    sent: list[Request] = []
    async with governor(cfg, backend) as gov:
        for i in range(3):
            sent.append(request(f"early{i}"))
            await post(gov, sent[-1])
        await wait_until(lambda: sample(gov, REQUESTS, outcome="retryable") >= 3)
        async with serving(backend, f"127.0.0.1:{port}"):
            assert backend.endpoint == f"http://127.0.0.1:{port}/v1/metrics"
            sent.append(request("late"))
            await post(gov, sent[-1])
            await wait_until(lambda: settled(gov) == 12)
            gov.shutdown()
            await wait_until(lambda: gov.app.report is not None)
    assert delivered(backend) == keys(*sent)
    assert sample(gov, SENT) == 12.0
    assert gov.app.report is not None
    assert gov.app.report.dropped == {"backend": {}}


class HangingUpProxy:
    """A TCP proxy in front of `upstream` that reads the head of the first `hang_ups` requests
    and closes the connection without an answer; later connections are passed through."""

    def __init__(self, upstream: tuple[str, int], hang_ups: int) -> None:
        self.upstream = upstream
        self.hang_ups = hang_ups
        self.heads: list[bytes] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if len(self.heads) < self.hang_ups:
                head = b""
                with trio.fail_after(DEADLINE_S):
                    while b"\r\n\r\n" not in head:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        head += chunk
                self.heads.append(head.partition(b"\r\n\r\n")[0])
                return
            async with await trio.open_tcp_stream(*self.upstream) as up, trio.open_nursery() as n:
                n.start_soon(self._pump, stream, up, n.cancel_scope)
                n.start_soon(self._pump, up, stream, n.cancel_scope)

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream, both: trio.CancelScope) -> None:
        try:
            async for data in src:
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            both.cancel()


async def test_http_backend_closing_mid_request_loses_nothing() -> None:
    """The first two connections are closed after the request head, without an answer; the
    retries go through to the real backend and every acknowledged datapoint arrives once."""
    backend = HTTPBackend()
    async with serving(backend), trio.open_nursery() as nursery:
        upstream = httpx.URL(backend.endpoint)
        proxy = HangingUpProxy((upstream.host, upstream.port or 80), hang_ups=2)
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        cfg = otlp_config(f"http://127.0.0.1:{port}/v1/metrics", "http")
        sent = [request(f"cut{i}") for i in range(3)]
        async with governor(cfg, backend) as gov:
            await post(gov, sent[0])
            await wait_until(lambda: settled(gov) == 3)
            for req in sent[1:]:
                await post(gov, req)
            await wait_until(lambda: settled(gov) == 9)
        nursery.cancel_scope.cancel()
    assert len(proxy.heads) == 2
    assert all(h.startswith(b"POST /v1/metrics HTTP/1.1\r\n") for h in proxy.heads)
    assert delivered(backend) == keys(*sent)
    assert sample(gov, RETRIES) == 2.0
    assert sample(gov, SENT) == 9.0
    assert gov.app.report is not None
    assert gov.app.report.dropped == {"backend": {}}


# ---- 5. fan-out ---------------------------------------------------------------------------------


def fan_out_config(grpc_endpoint: str, http_endpoint: str) -> Config:
    """Two exporters: "backend" over gRPC and "http" over OTLP/HTTP."""
    cfg = otlp_config(grpc_endpoint, "grpc", exporter=fast_breaker())
    [first] = cfg.otlp.exporters
    second = attrs.evolve(first, endpoint=http_endpoint, protocol="http", name="http")
    return attrs.evolve(cfg, otlp=attrs.evolve(cfg.otlp, exporters=[first, second]))


async def test_fan_out_a_failing_backend_does_not_delay_the_other() -> None:
    """Every datapoint goes to both exporters. While the gRPC backend answers UNAVAILABLE, the
    HTTP backend gets each request within half a second; when the gRPC backend recovers, it
    gets everything too, exactly once."""
    grpc_backend = FlakyGRPCBackend()
    grpc_backend.down = True
    http_backend = HTTPBackend()
    sent: list[Request] = []
    async with (
        serving(http_backend),
        running_otlp_governor(
            grpc_backend, config=lambda e, _p: fan_out_config(e, http_backend.endpoint)
        ) as gov,
    ):
        for i in range(5):
            sent.append(request(f"fan{i}"))
            acked = await post(gov, sent[-1])
            t0 = trio.current_time()
            await wait_until(lambda: http_backend.datapoints() == 3 * len(sent))
            assert trio.current_time() - t0 < 0.5
            assert acked == 3
        assert grpc_backend.received == []
        assert grpc_backend.attempts >= 5
        grpc_backend.down = False
        await wait_until(lambda: settled(gov) == 15)
    assert delivered(http_backend) == keys(*sent)
    assert delivered(grpc_backend) == keys(*sent)
    assert sample(gov, RETRIES, exporter="http") == 0.0
    assert sample(gov, RETRIES) >= 5.0
    assert gov.app.report is not None
    assert gov.app.report.delivered == {"backend": 15, "http": 15}
    assert gov.app.report.dropped == {"backend": {}, "http": {}}


# ---- 6. wire details ----------------------------------------------------------------------------


@pytest.mark.parametrize("compression_", ["gzip", "zstd", "none"])
async def test_http_compression_headers(compression_: str) -> None:
    """OTLP/HTTP bodies are protobuf, compressed as configured (Content-Encoding gzip or zstd,
    none when uncompressed), POSTed to /v1/metrics with governor's user agent."""
    backend = HTTPBackend()
    req = request("wire")
    async with running_otlp_governor(backend, exporter={"compression": compression_}) as gov:
        await post(gov, req)
        await wait_until(lambda: settled(gov) == 3)
    [received] = backend.received
    assert received.metadata.get("content-encoding") == (
        None if compression_ == "none" else compression_
    )
    assert received.metadata["content-type"] == "application/x-protobuf"
    assert received.metadata["user-agent"] == f"governor/{__version__}"
    assert "authorization" not in received.metadata
    assert backend.paths == ["/v1/metrics"]
    assert delivered(backend) == keys(req)


@pytest.mark.parametrize(
    ("settings", "arrives"),
    [
        pytest.param({}, False, id="default"),
        pytest.param({"compression": "gzip"}, False, id="gzip"),
        pytest.param({"compression": "none"}, True, id="none"),
    ],
)
async def test_grpc_sends_gzip_by_default(settings: dict[str, Any], arrives: bool) -> None:
    """grpcio does not tell a handler how a message was compressed, so the backend here accepts
    no compression but identity: a gzip message is refused by grpcio itself (UNIMPLEMENTED,
    permanent), which shows the exporter compresses with gzip by default and when asked to,
    and sends plain messages with compression none."""
    only_identity = [("grpc.compression_enabled_algorithms_bitset", 1)]
    backend = GRPCBackend(options=only_identity)
    req = request("gz")
    async with running_otlp_governor(backend, exporter=settings) as gov:
        await post(gov, req)
        await wait_until(lambda: settled(gov) == 3)
    if arrives:
        assert delivered(backend) == keys(req)
    else:
        assert backend.attempts == 0
        assert sample(gov, DROPPED, reason="grpc_unimplemented") == 3.0


@pytest.mark.parametrize("compression_", ["gzip", "none"])
async def test_grpc_compression_delivers(compression_: str) -> None:
    """To a default grpcio server, both gzip and uncompressed calls deliver."""
    backend = GRPCBackend()
    req = request("gz")
    async with running_otlp_governor(backend, exporter={"compression": compression_}) as gov:
        await post(gov, req)
        await wait_until(lambda: settled(gov) == 3)
    assert delivered(backend) == keys(req)
    [received] = backend.received
    assert received.metadata["user-agent"].startswith(f"governor/{__version__} grpc-python/")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_custom_headers_and_bearer_token(protocol: str) -> None:
    """Configured headers (keys lower-cased) and the bearer token arrive as HTTP headers or
    gRPC metadata."""
    backend = new_backend(protocol)
    settings = {"headers": {"X-Scope-OrgID": "tenant-1"}, "bearer_token": "s3cret"}
    async with running_otlp_governor(backend, exporter=settings) as gov:
        await post(gov, request("auth"))
        await wait_until(lambda: settled(gov) == 3)
    [received] = backend.received
    assert received.metadata["x-scope-orgid"] == "tenant-1"
    assert received.metadata["authorization"] == "Bearer s3cret"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_bearer_token_file_is_read_for_every_request(protocol: str, tmp_path: Path) -> None:
    """A token file rotated between two batches: the second request carries the new token."""
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    backend = new_backend(protocol)
    async with running_otlp_governor(
        backend, exporter={"bearer_token_file": str(token_file)}
    ) as gov:
        await post(gov, request("a"))
        await wait_until(lambda: settled(gov) == 3)
        token_file.write_text("second\n")
        await post(gov, request("b"))
        await wait_until(lambda: settled(gov) == 6)
    assert [r.metadata["authorization"] for r in backend.received] == [
        "Bearer first",
        "Bearer second",
    ]


# ---- 7. TLS -------------------------------------------------------------------------------------


@attrs.frozen
class Certs:
    ca: Path  # the CA certificate (tls.ca_file)
    cert: Path  # the server's certificate, for localhost and 127.0.0.1
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throwaway CA and a server certificate it signed, made with the openssl CLI."""
    d = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=governor test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
    )  # fmt: skip
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key")


class TLSGRPCBackend(GRPCBackend):
    """A GRPCBackend that also listens with TLS; `endpoint` is https://localhost:PORT."""

    def __init__(self, certs: Certs) -> None:
        super().__init__()
        creds = grpc.ssl_server_credentials([(certs.key.read_bytes(), certs.cert.read_bytes())])
        port = self._server.add_secure_port("127.0.0.1:0", creds)
        self.endpoint = f"https://localhost:{port}"


@asynccontextmanager
async def tls_governor(protocol: str, certs: Certs, **settings: Any) -> AsyncIterator[RunningOTLP]:
    """A TLS backend (grpcio or hypercorn) with `certs` and a governor in front of it."""
    if protocol == "grpc":
        async with running_otlp_governor(TLSGRPCBackend(certs), **settings) as gov:
            yield gov
        return
    backend = HTTPBackend()
    async with (
        serving(backend, certs=certs),
        governor(otlp_config(backend.endpoint, "http", **settings), backend) as gov,
    ):
        yield gov


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_tls_with_the_ca_file_delivers(protocol: str, certs: Certs) -> None:
    """An https:// endpoint whose certificate is signed by tls.ca_file: delivered."""
    req = request("tls")
    async with tls_governor(protocol, certs, exporter={"tls": {"ca_file": str(certs.ca)}}) as gov:
        assert gov.backend.endpoint.startswith("https://localhost:")
        await post(gov, req)
        await wait_until(lambda: settled(gov) == 3)
    assert delivered(gov.backend) == keys(req)
    assert sample(gov, RETRIES) == 0.0


@pytest.mark.parametrize(
    ("protocol", "error"),
    [("grpc", "Tls handshake failed"), ("http", "CERTIFICATE_VERIFY_FAILED")],
)
async def test_tls_without_the_ca_file_is_retried_and_never_delivered(
    protocol: str, error: str, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """Without tls.ca_file the server's certificate is not trusted: every attempt fails
    retryably (logged with the reason), nothing reaches the backend, and the shutdown after a
    short grace counts the datapoints as dropped."""
    caplog.set_level(logging.WARNING, logger="governor.export.otlp")
    async with tls_governor(protocol, certs, exporter=fast_breaker(), shutdown_grace_s=0.2) as gov:
        await post(gov, request("untrusted"))
        await wait_until(lambda: sample(gov, REQUESTS, outcome="retryable") >= 2)
    assert gov.backend.attempts == 0
    assert sample(gov, REQUESTS, outcome="success") == 0.0
    assert gov.app.report is not None
    assert gov.app.report.delivered == {"backend": 0}
    assert gov.app.report.dropped == {"backend": {"shutdown": 3}}
    [retry] = [r for r in caplog.records if r.getMessage() == "export failed; will retry"]
    assert error in retry.fields["detail"]  # type: ignore[attr-defined]


# ---- 8. shutdown accounting ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_shutdown_drops_exactly_what_was_acknowledged_and_not_delivered(
    protocol: str,
) -> None:
    """Memory queue, backend UNAVAILABLE (503) for good after a first delivered batch, grace
    0.3 s: app.run returns once the grace is over; the report counts every acknowledged and
    undelivered datapoint as dropped with reason shutdown, no more, no less."""
    backend = flaky_backend(protocol)
    async with running_otlp_governor(backend, exporter=fast_breaker(), shutdown_grace_s=0.3) as gov:
        acknowledged = await post(gov, request("early", 2))
        await wait_until(lambda: settled(gov) == 2)
        backend.down = True
        late = 0
        for i in range(5):
            late += await post(gov, request(f"late{i}", 3))
        await wait_until(lambda: sample(gov, REQUESTS, outcome="retryable") >= 3)
        started = trio.current_time()
        gov.shutdown()
        await wait_until(lambda: gov.app.report is not None)
        took = trio.current_time() - started
    assert 0.3 <= took < 0.3 + 2.0
    assert (acknowledged, late) == (2, 15)
    report = gov.app.report
    assert report is not None
    assert not report.clean
    assert report.delivered == {"backend": 2}
    assert report.dropped == {"backend": {"shutdown": 15}}
    assert sample(gov, DROPPED, reason="shutdown") == 15.0
    assert points_per_request(backend) == [2]
