"""The OTLP/gRPC and OTLP/HTTP receivers, end to end over real sockets, against bad input.

Every test starts a whole App (OTLP pipeline only) on 127.0.0.1:0 in front of a recording OTLP
backend (tests/otlp_peers.py) and talks to it with clients we did not write: grpcio (raw bytes on
MetricsService/Export, in a thread), httpx, and h2 for what no well-behaved client sends. After
each refused request a good request from another client must still be accepted and arrive. Time
is real here (sockets), so waits are conditions with a bounded deadline, never sleeps.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import resource
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import attrs
import cramjam
import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

from service.codec import otlp
from tests.otlp_peers import (
    DEADLINE_S,
    GRPCAnswer,
    GRPCBackend,
    HTTPBackend,
    RunningOTLP,
    running_otlp_governor,
    wait_until,
)

Request = otlp.ExportMetricsServiceRequest
# A datapoint as the backend saw it: (service.name, metric name, value).
Point = tuple[str, str, float]

PROTOBUF_HEADERS = {"content-type": otlp.PROTOBUF}
OK = grpc.StatusCode.OK
# Limits for the rejection tests: a gzip bomb of BOMB_BYTES (about 1 MiB compressed) must fit
# under max_request_bytes, so that it is the decompressed size that is refused.
MAX_REQUEST = 2 * 1024 * 1024
MAX_DECOMPRESSED = 4 * 1024 * 1024
LIMITS = {"max_request_bytes": MAX_REQUEST, "max_decompressed_bytes": MAX_DECOMPRESSED}
BOMB_BYTES = 1 << 30  # what each zip bomb decompresses to: 256 times the limit
# The tests that stall the exporter retry for a while; a breaker opening after five failures
# would then hold the delivery back for seconds after the backend recovers.
PATIENT_EXPORTER = {"workers": 1, "breaker": {"failure_threshold": 1_000_000}}


# ---- data -------------------------------------------------------------------------------------


def export_request(tag: str, n_points: int = 2) -> Request:
    """One resource (service.name = `tag`) with one gauge named after `tag` of `n_points`
    distinct datapoints."""
    req = Request()
    rm = req.resource_metrics.add()
    rm.resource.attributes.add(key="service.name").value.string_value = tag
    sm = rm.scope_metrics.add()
    sm.scope.name = "tests.otlp_receivers"
    metric = sm.metrics.add(name=f"queue_depth_{tag}", unit="1")
    for i in range(n_points):
        dp = metric.gauge.data_points.add(as_double=i + 0.5, time_unix_nano=1_700_000_000 + i)
        dp.attributes.add(key="shard").value.int_value = i
    return req


def with_filler(req: Request, size: int) -> Request:
    """`req` with a metric description of `size` bytes: big, and very compressible."""
    req.resource_metrics[0].scope_metrics[0].metrics[0].description = "a" * size
    return req


def points(req: Request) -> list[Point]:
    out = []
    for rm in req.resource_metrics:
        service = rm.resource.attributes[0].value.string_value
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out += [(service, m.name, dp.as_double) for dp in m.gauge.data_points]
    return out


def delivered(backend: GRPCBackend | HTTPBackend) -> list[Point]:
    """Every datapoint the backend accepted, in arrival order."""
    return [p for req in backend.requests() for p in points(req)]


@functools.cache
def zip_bomb(encoding: str) -> bytes:
    """A valid `encoding` body that decompresses to BOMB_BYTES zero bytes, built without ever
    holding them. Deflate: a block of 1 MiB of zeros ends byte-aligned after a full flush and
    refers to nothing before it, so repeating it makes a valid stream. zstd: streaming."""
    chunk = bytes(1 << 20)
    n = BOMB_BYTES // len(chunk)
    if encoding == "zstd":
        zstd = cramjam.zstd.Compressor()
        for _ in range(n):
            zstd.compress(chunk)
        return bytes(zstd.finish())
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    raw = block * n + deflate.flush()
    if encoding == "gzip":
        crc = 0
        for _ in range(n):
            crc = zlib.crc32(chunk, crc)
        header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
        return header + raw + struct.pack("<II", crc, BOMB_BYTES & 0xFFFFFFFF)
    assert encoding == "deflate"
    adler = 1
    for _ in range(n):
        adler = zlib.adler32(chunk, adler)
    return b"\x78\xda" + raw + struct.pack(">I", adler)  # zlib-wrapped, as RFC 9110 says


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ---- clients ----------------------------------------------------------------------------------


@attrs.frozen
class GRPCResult:
    """How one gRPC call ended: its code, details, trailing metadata and (OK) response bytes."""

    code: grpc.StatusCode
    details: str = ""
    trailing: tuple[tuple[str, str | bytes], ...] = ()
    response: bytes = b""


def _call(
    channel: grpc.Channel,
    data: bytes,
    method: str,
    compression: grpc.Compression | None,
    metadata: tuple[tuple[str, str], ...],
) -> GRPCResult:
    export = channel.unary_unary(method)  # no serializers: raw bytes in and out
    try:
        response, call = export.with_call(
            data, timeout=DEADLINE_S, compression=compression, metadata=metadata
        )
    except grpc.RpcError as e:
        trailing = tuple(map(tuple, e.trailing_metadata() or ()))
        return GRPCResult(e.code(), e.details() or "", trailing)
    return GRPCResult(OK, "", tuple(map(tuple, call.trailing_metadata() or ())), response)


async def grpc_export(
    target: str | grpc.Channel,
    data: bytes,
    *,
    method: str = otlp.EXPORT_METHOD,
    compression: grpc.Compression | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> GRPCResult:
    """Call `method` with the serialized `data` from a grpcio thread; on a channel of its own
    when `target` is an address."""

    def run() -> GRPCResult:
        if isinstance(target, str):
            with grpc.insecure_channel(target) as channel:
                return _call(channel, data, method, compression, metadata)
        return _call(target, data, method, compression, metadata)

    return await trio.to_thread.run_sync(run)


async def post(
    gov: RunningOTLP, req: Request, headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST `req` as protobuf to /v1/metrics on the governor's shared client."""
    return await gov.client.post(
        gov.http_url, content=req.SerializeToString(), headers=headers or PROTOBUF_HEADERS
    )


_CALL_ENDED = (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)


async def h2_grpc_call(host: str, port: int, body: bytes) -> dict[str, str]:
    """Open a raw HTTP/2 connection, start an Export call and send `body` (gRPC framing
    included) without ending the stream; the response's headers and trailers, merged."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    answer: dict[str, str] = {}
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", otlp.EXPORT_METHOD),
                (":authority", f"{host}:{port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        conn.send_data(sid, body)
        await stream.send_all(conn.data_to_send())
        with trio.fail_after(DEADLINE_S):
            for _ in range(100):  # settings, acks, pings, the answer: a handful of reads
                data = await stream.receive_some(65536)
                if not data:
                    return answer
                for event in conn.receive_data(data):
                    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        answer.update(event.headers)
                    if isinstance(event, _CALL_ENDED):
                        return answer
                await stream.send_all(conn.data_to_send())
    raise AssertionError(f"the call did not end; got {answer}")


async def wait_until_refused(host: str, port: int) -> None:
    """Wait until nothing listens on host:port any more."""
    with trio.fail_after(DEADLINE_S):
        for _ in range(1000):
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(0.005)
    raise AssertionError(f"{host}:{port} still accepts connections")


# ---- a backend that can be stalled ------------------------------------------------------------


class StallableBackend(GRPCBackend):
    """The recording gRPC backend, answering UNAVAILABLE (retryable) while `stalled` is set, so
    the exporter keeps its batch and retries until the test lets it through."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = threading.Event()

    def next(self) -> Any:
        answer = super().next()
        if self.stalled.is_set():
            return GRPCAnswer(grpc.StatusCode.UNAVAILABLE, "stalled by the test")
        return answer


# ---- checks -----------------------------------------------------------------------------------


def receiver_counts(gov: RunningOTLP) -> dict[str, float]:
    """Every non-zero sample of the OTLP receivers' request counters: governor_receiver_
    requests_total as 'code=<code>', governor_receiver_rejected_requests_total as
    'reason=<reason>'."""
    counts = {}
    for family in gov.app.metrics.registry.collect():
        for s in family.samples:
            if s.labels.get("pipeline") != "otlp" or not s.value:
                continue
            if s.name == "governor_receiver_requests_total":
                counts[f"code={s.labels['code']}"] = s.value
            elif s.name == "governor_receiver_rejected_requests_total":
                counts[f"reason={s.labels['reason']}"] = s.value
    return counts


async def assert_still_serving(
    gov: RunningOTLP, tag: str, *, metadata: tuple[tuple[str, str], ...] = ()
) -> None:
    """A good request from a new HTTP client and one from a new gRPC channel are accepted, and
    the backend then holds exactly what it held before plus their datapoints."""
    before = delivered(gov.backend)
    over_http, over_grpc = export_request(f"{tag}-http"), export_request(f"{tag}-grpc")
    async with httpx.AsyncClient(timeout=DEADLINE_S) as other:
        resp = await other.post(
            gov.http_url,
            content=over_http.SerializeToString(),
            headers={**PROTOBUF_HEADERS, **dict(metadata)},
        )
    assert resp.status_code == 200
    assert resp.content == b""  # an empty ExportMetricsServiceResponse: full success
    result = await grpc_export(gov.grpc_target, over_grpc.SerializeToString(), metadata=metadata)
    assert result == GRPCResult(OK)
    expected = before + points(over_http) + points(over_grpc)
    await wait_until(lambda: len(delivered(gov.backend)) >= len(expected))
    assert sorted(delivered(gov.backend)) == sorted(expected)


def status_of(resp: httpx.Response) -> tuple[int, str]:
    """(code, message) of the google.rpc.Status in an error answer, protobuf or JSON."""
    if resp.headers["content-type"] == otlp.JSON:
        doc = json.loads(resp.content)
        assert set(doc) == {"code", "message"}
        return doc["code"], doc["message"]
    assert resp.headers["content-type"] == otlp.PROTOBUF
    status = Status.FromString(resp.content)
    assert not status.details
    return status.code, status.message


# ---- accepted requests ------------------------------------------------------------------------


def _compress(encoding: str, data: bytes) -> bytes:
    """`data` compressed as a client would, with libraries other than governor's codec."""
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "zstd":
        return bytes(cramjam.zstd.compress(data))
    if encoding == "deflate":
        return zlib.compress(data)
    assert encoding in ("identity", "")
    return data


@pytest.mark.parametrize("backend_kind", ["grpc", "http"])
@pytest.mark.parametrize("encoding", ["gzip", "zstd", "deflate", "identity", ""])
async def test_http_accepted_encodings_arrive_unchanged(encoding: str, backend_kind: str) -> None:
    """A protobuf request with each supported Content-Encoding (or none) is answered 200 with
    an empty ExportMetricsServiceResponse, and the backend (OTLP/gRPC or OTLP/HTTP) receives
    exactly the bytes the client serialized: a valid request is forwarded as sent, never
    re-encoded."""
    req = export_request(f"enc-{encoding or 'none'}", n_points=5)
    data = req.SerializeToString()
    headers = dict(PROTOBUF_HEADERS)
    if encoding:
        headers["content-encoding"] = encoding
    backend = GRPCBackend() if backend_kind == "grpc" else HTTPBackend()
    async with running_otlp_governor(backend) as gov:
        resp = await gov.client.post(
            gov.http_url, content=_compress(encoding, data), headers=headers
        )
        assert resp.status_code == 200
        assert resp.headers["content-type"] == otlp.PROTOBUF
        assert otlp.ExportMetricsServiceResponse.FromString(resp.content) == (
            otlp.ExportMetricsServiceResponse()
        )
        await wait_until(lambda: len(backend.received) == 1)
        assert backend.received[0].data == data
        assert gov.sample("governor_datapoints_received_total", pipeline="otlp") == 5.0
        assert receiver_counts(gov) == {"code=200": 1.0}


async def test_http_gzip_body_of_several_members_arrives_whole() -> None:
    """RFC 9110's gzip coding is RFC 1952's format, a series of members; gzip(1), Python's gzip
    module and Go's gzip.Reader decode them all. Two requests compressed as one member each and
    concatenated make one valid body whose content, the two serialized requests back to back,
    is itself one valid ExportMetricsServiceRequest: it is answered 200, so the backend must
    receive the datapoints of both, not only those of the first member."""
    first, second = export_request("member-1"), export_request("member-2")
    data = first.SerializeToString() + second.SerializeToString()
    body = gzip.compress(first.SerializeToString()) + gzip.compress(second.SerializeToString())
    assert gzip.decompress(body) == data
    async with running_otlp_governor() as gov:
        resp = await gov.client.post(
            gov.http_url, content=body, headers={**PROTOBUF_HEADERS, "content-encoding": "gzip"}
        )
        assert resp.status_code == 200
        await wait_until(lambda: len(gov.backend.received) == 1)
        assert sorted(delivered(gov.backend)) == sorted(points(first) + points(second))
        assert gov.backend.received[0].data == data


def otlp_json(req: Request) -> bytes:
    """`req` in the OTLP JSON mapping, built with protobuf's json_format (lowerCamelCase keys,
    64-bit integers as strings) and exemplar trace and span ids in hex, as OTLP asks."""
    doc = json_format.MessageToDict(req)
    for rm in doc["resourceMetrics"]:
        for sm in rm["scopeMetrics"]:
            for metric in sm["metrics"]:
                for dp in metric["gauge"]["dataPoints"]:
                    for ex in dp.get("exemplars", []):
                        for key in ("traceId", "spanId"):
                            ex[key] = base64.b64decode(ex[key]).hex()
    return json.dumps(doc).encode()


def _with_exemplar(req: Request) -> Request:
    dp = req.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points[0]
    dp.exemplars.add(
        as_double=0.75,
        time_unix_nano=1_700_000_000,
        trace_id=bytes.fromhex("5b8efff798038103d269b633813fc60c"),
        span_id=bytes.fromhex("eee19b7ec3c1b174"),
    )
    return req


@pytest.mark.parametrize(
    "content_type", [otlp.PROTOBUF, otlp.JSON, "application/json; charset=utf-8"]
)
async def test_http_answer_is_in_the_encoding_of_the_request(content_type: str) -> None:
    """A request in protobuf or in OTLP JSON (also with a charset parameter) is answered in the
    same encoding (an empty ExportMetricsServiceResponse: b"" or {}), and the backend receives
    the same message, exemplar trace and span ids (hex in JSON) included."""
    req = _with_exemplar(export_request("ctype", n_points=3))
    is_json = content_type != otlp.PROTOBUF
    body = otlp_json(req) if is_json else req.SerializeToString()
    async with running_otlp_governor() as gov:
        resp = await gov.client.post(
            gov.http_url, content=body, headers={"content-type": content_type}
        )
        assert resp.status_code == 200
        if is_json:
            assert resp.headers["content-type"] == otlp.JSON
            assert json.loads(resp.content) == {}
        else:
            assert resp.headers["content-type"] == otlp.PROTOBUF
            assert resp.content == b""
        await wait_until(lambda: len(gov.backend.received) == 1)
        assert gov.backend.requests() == [req]


@pytest.mark.parametrize(
    "compression",
    [grpc.Compression.Gzip, grpc.Compression.Deflate, grpc.Compression.NoCompression],
    ids=["gzip", "deflate", "none"],
)
async def test_grpc_compressed_message_is_accepted_and_arrives_unchanged(
    compression: grpc.Compression,
) -> None:
    """grpcio's channel compresses the message (gzip, deflate or not at all); the call is
    answered OK with an empty response and the backend receives exactly the serialized
    request."""
    req = export_request("grpc-compressed", n_points=4)
    data = req.SerializeToString()
    async with running_otlp_governor() as gov:
        result = await grpc_export(gov.grpc_target, data, compression=compression)
        assert result == GRPCResult(OK)
        await wait_until(lambda: len(gov.backend.received) == 1)
        assert gov.backend.received[0].data == data
        assert receiver_counts(gov) == {"code=OK": 1.0}
        assert gov.sample("governor_datapoints_received_total", pipeline="otlp") == 4.0


async def test_empty_request_is_accepted_and_forwards_nothing() -> None:
    """A request without resource metrics is valid: OK over gRPC, 200 over HTTP (protobuf and
    JSON), and no batch is ever sent to the backend."""
    async with running_otlp_governor() as gov:
        assert await grpc_export(gov.grpc_target, b"") == GRPCResult(OK)
        resp = await gov.client.post(gov.http_url, content=b"", headers=PROTOBUF_HEADERS)
        assert (resp.status_code, resp.content) == (200, b"")
        resp = await gov.client.post(
            gov.http_url, content=b"{}", headers={"content-type": otlp.JSON}
        )
        assert (resp.status_code, resp.content) == (200, b"{}")
        assert receiver_counts(gov) == {"code=OK": 1.0, "code=200": 2.0}
        assert gov.sample("governor_datapoints_received_total", pipeline="otlp") == 0.0
    assert gov.backend.attempts == 0
    assert gov.app.report is not None
    assert gov.app.report.delivered == {"backend": 0}


# ---- HTTP: refused requests -------------------------------------------------------------------


@attrs.frozen
class BadHTTP:
    """A bad OTLP/HTTP request and what governor must answer: status, the metric reason, the
    answer's content type (a google.rpc.Status in the request's encoding, or plain text when
    the request's type is not OTLP's) and its one-line message."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # bytes, or a function making them (the bombs are built on first use)
    status: int
    reason: str
    answer_type: str
    message: str

    def content(self) -> bytes:
        return self.body() if callable(self.body) else self.body


_GOOD = export_request("good").SerializeToString()
_JSON = {"content-type": otlp.JSON}


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _bomb_case(encoding: str) -> Any:
    return pytest.param(
        BadHTTP(
            "POST",
            "/v1/metrics",
            {**PROTOBUF_HEADERS, "content-encoding": encoding},
            functools.partial(zip_bomb, encoding),
            413,
            "decompressed_too_large",
            otlp.PROTOBUF,
            f"{encoding} body decompresses past the limit of {MAX_DECOMPRESSED} bytes",
        ),
        id=f"{encoding}_bomb",
    )


def _datapoint_json(**fields: Any) -> bytes:
    """An OTLP JSON request with one gauge datapoint made of `fields`."""
    metric = {"name": "up", "gauge": {"dataPoints": [fields]}}
    return _json({"resourceMetrics": [{"scopeMetrics": [{"metrics": [metric]}]}]})


HTTP_REJECTIONS = [
    pytest.param(
        BadHTTP(
            "POST",
            "/v1/metrics",
            PROTOBUF_HEADERS,
            _GOOD[:-1],
            400,
            "bad_protobuf",
            otlp.PROTOBUF,
            "body is not a valid protobuf ExportMetricsServiceRequest",
        ),
        id="truncated_protobuf",
    ),
    pytest.param(
        BadHTTP(
            "POST",
            "/v1/metrics",
            _JSON,
            b"resourceMetrics=[]",
            400,
            "bad_json",
            otlp.JSON,
            "body is not JSON: Expecting value: line 1 column 1 (char 0)",
        ),
        id="not_json",
    ),
    pytest.param(
        BadHTTP(
            "POST",
            "/v1/metrics",
            {"content-type": "application/json; charset=utf-8"},
            _json([{"resourceMetrics": []}]),
            400,
            "bad_json",
            otlp.JSON,
            "body is not a JSON object",
        ),
        id="json_array",
    ),
    pytest.param(
        BadHTTP(
            "POST",
            "/v1/metrics",
            _JSON,
            _json({"resourceMetrics": 5}),
            400,
            "bad_json",
            otlp.JSON,
            "not an OTLP ExportMetricsServiceRequest: Failed to parse resourceMetrics field:"
            " repeated field resourceMetrics must be in [] which is 5 at"
            " ExportMetricsServiceRequest.",
        ),
        id="json_number_for_list",
    ),
    pytest.param(
        BadHTTP(
            "POST",
            "/v1/metrics",
            _JSON,
            _datapoint_json(asDouble="high"),
            400,
            "bad_json",
            otlp.JSON,
            # Cut at 200 characters of the parser's message, so it stays one short line.
            "not an OTLP ExportMetricsServiceRequest: Failed to parse resourceMetrics field:"
            " Failed to parse scopeMetrics field: Failed to parse metrics field: Failed to parse"
            " dataPoints field: Couldn't parse float: high at ExportMetricsServiceRequest.re",
        ),
        id="json_string_for_double",
    ),
    pytest.param(
        BadHTTP(
            "POST",
            "/v1/metrics",
            _JSON,
            _datapoint_json(asDouble=1.0, exemplars=[{"asDouble": 2.0, "traceId": "not-hex!"}]),
            400,
            "bad_json",
            otlp.JSON,
            "exemplar traceId 'not-hex!' is not hex",
        ),
        id="json_exemplar_trace_id_not_hex",
    ),
    _bomb_case("gzip"),
    _bomb_case("zstd"),
    _bomb_case("deflate"),
    pytest.param(
        BadHTTP(
            "POST",
            "/v1/metrics",
            PROTOBUF_HEADERS,
            bytes(MAX_REQUEST + 1),
            413,
            "too_large",
            otlp.PROTOBUF,
            f"body of {MAX_REQUEST + 1} bytes is over the limit of {MAX_REQUEST}",
        ),
        id="body_over_max_request_bytes",
    ),
    pytest.param(
        BadHTTP(
            "POST",
            "/v1/traces",
            PROTOBUF_HEADERS,
            _GOOD,
            404,
            "not_found",
            otlp.PROTOBUF,
            "no such path '/v1/traces'; use /v1/metrics",
        ),
        id="unknown_path",
    ),
    pytest.param(
        BadHTTP(
            "GET",
            "/v1/metrics",
            {},
            b"",
            405,
            "method_not_allowed",
            "text/plain; charset=utf-8",
            "use POST",
        ),
        id="get",
    ),
    pytest.param(
        BadHTTP(
            "POST",
            "/v1/metrics",
            {"content-type": "text/plain"},
            _GOOD,
            415,
            "unsupported_media_type",
            "text/plain; charset=utf-8",
            "content-type 'text/plain' is not application/x-protobuf or application/json",
        ),
        id="text_plain",
    ),
    pytest.param(
        BadHTTP(
            "POST",
            "/v1/metrics",
            {**PROTOBUF_HEADERS, "content-encoding": "br"},
            b"\x0b\x02\x80hello\x03",
            415,
            "unsupported_encoding",
            otlp.PROTOBUF,
            "content-encoding 'br' is not supported",
        ),
        id="brotli",
    ),
]

# google.rpc.Code of each refused HTTP status, as the receivers' one table says.
STATUS_CODE = {400: 3, 404: 3, 405: 3, 413: 8, 415: 3}


@pytest.mark.parametrize("bad", HTTP_REJECTIONS)
async def test_http_bad_request_is_refused_counted_and_explained(bad: BadHTTP) -> None:
    """Each bad request gets its status and a one-line reason: a google.rpc.Status in the
    request's encoding (protobuf or JSON), or plain text when the request is not OTLP at all;
    405 says Allow: POST. It is counted once under its reason and its status, nothing reaches
    the backend, and a good request from another client is accepted right after. A zip bomb
    (1 GiB of zeros as gzip, zstd or deflate) costs at most the limit: the process's peak RSS
    grows by far less than the bomb."""
    body = bad.content()
    async with running_otlp_governor(receiver=LIMITS) as gov:
        peak_before = peak_rss_bytes()
        resp = await gov.client.request(
            bad.method, gov.url(bad.path), content=body, headers=bad.headers
        )
        assert peak_rss_bytes() - peak_before < BOMB_BYTES // 4
        assert resp.status_code == bad.status
        assert resp.headers["content-type"] == bad.answer_type
        if bad.answer_type.startswith("text/plain"):
            assert resp.text == bad.message + "\n"
        else:
            assert status_of(resp) == (STATUS_CODE[bad.status], bad.message)
        assert "\n" not in bad.message
        if bad.status == 405:
            assert resp.headers["allow"] == "POST"
        assert receiver_counts(gov) == {f"code={bad.status}": 1.0, f"reason={bad.reason}": 1.0}
        assert gov.sample("governor_datapoints_received_total", pipeline="otlp") == 0.0
        await assert_still_serving(gov, f"after-{bad.reason}")
        assert receiver_counts(gov) == {
            f"code={bad.status}": 1.0,
            f"reason={bad.reason}": 1.0,
            "code=200": 1.0,
            "code=OK": 1.0,
        }


async def test_http_head_is_refused_with_405_and_no_body() -> None:
    """HEAD is not POST either: 405 with Allow: POST and, as every answer to HEAD, no body
    (RFC 9110 9.3.2), counted once as method_not_allowed; the receiver keeps serving."""
    async with running_otlp_governor() as gov:
        resp = await gov.client.head(gov.http_url)
        assert resp.status_code == 405
        assert resp.headers["allow"] == "POST"
        assert resp.content == b""
        assert receiver_counts(gov) == {"code=405": 1.0, "reason=method_not_allowed": 1.0}
        await assert_still_serving(gov, "after-head")


# ---- gRPC: refused calls ----------------------------------------------------------------------

_UNCOUNTED: dict[str, float] = {}  # grpcio answers these itself; governor's handler never runs


@functools.cache
def _huge(tag: str, size: int) -> bytes:
    return with_filler(export_request(tag), size).SerializeToString()


@attrs.frozen
class BadGRPC:
    """A bad gRPC call (`data` serialized, or a function making it) and how it must end, with
    the receiver counters it moves."""

    data: Any
    method: str
    compression: grpc.Compression | None
    code: grpc.StatusCode
    details: Any  # str, or a function of the data's size
    counts: dict[str, float]


GRPC_REJECTIONS = [
    pytest.param(
        BadGRPC(
            _GOOD[:-1],
            otlp.EXPORT_METHOD,
            None,
            grpc.StatusCode.INVALID_ARGUMENT,
            "body is not a valid protobuf ExportMetricsServiceRequest",
            {"code=INVALID_ARGUMENT": 1.0, "reason=bad_protobuf": 1.0},
        ),
        id="truncated_protobuf",
    ),
    pytest.param(
        BadGRPC(
            functools.partial(_huge, "huge", MAX_DECOMPRESSED),
            otlp.EXPORT_METHOD,
            None,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda n: f"SERVER: Received message larger than max ({n} vs. {MAX_DECOMPRESSED})",
            _UNCOUNTED,
        ),
        id="over_max_decompressed_bytes",
    ),
    pytest.param(
        BadGRPC(
            functools.partial(_huge, "bomb", 4 * MAX_DECOMPRESSED),
            otlp.EXPORT_METHOD,
            grpc.Compression.Gzip,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Decompressed message larger than max",
            _UNCOUNTED,
        ),
        id="gzip_bomb",
    ),
    pytest.param(
        BadGRPC(
            _GOOD,
            f"/{otlp.SERVICE}/Nope",
            None,
            grpc.StatusCode.UNIMPLEMENTED,
            "Method not found!",
            _UNCOUNTED,
        ),
        id="unknown_method",
    ),
    pytest.param(
        BadGRPC(
            _GOOD,
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            None,
            grpc.StatusCode.UNIMPLEMENTED,
            "Method not found!",
            _UNCOUNTED,
        ),
        id="unknown_service",
    ),
]


@pytest.mark.parametrize("bad", GRPC_REJECTIONS)
async def test_grpc_bad_call_is_refused_and_the_receiver_keeps_serving(bad: BadGRPC) -> None:
    """Each bad call ends with its code and details: an undecodable message is INVALID_ARGUMENT
    (counted as bad_protobuf); a message over max_decompressed_bytes, also one that is small on
    the wire but decompresses past it (a gzip bomb), is RESOURCE_EXHAUSTED and an unknown
    method or service UNIMPLEMENTED, both answered by grpcio itself and so not counted (as
    docs/operations.md says). Nothing reaches the backend, and a good call from another client
    is accepted right after."""
    data = bad.data() if callable(bad.data) else bad.data
    details = bad.details(len(data)) if callable(bad.details) else bad.details
    async with running_otlp_governor(receiver=LIMITS) as gov:
        result = await grpc_export(
            gov.grpc_target, data, method=bad.method, compression=bad.compression
        )
        assert (result.code, result.details) == (bad.code, details)
        assert receiver_counts(gov) == bad.counts
        await assert_still_serving(gov, f"after-{bad.code.name.lower()}")
        assert receiver_counts(gov) == {**bad.counts, "code=200": 1.0, "code=OK": 1.0}


async def test_grpc_length_prefix_claiming_4_gib_is_refused_before_the_body() -> None:
    """A gRPC message prefix claiming 0xFFFFFFFF bytes (about 4.3 GB: the prefix is 32 bits, so
    the asked-for 5 GB cannot be expressed), followed by only a few bytes on a raw HTTP/2
    connection: grpcio answers RESOURCE_EXHAUSTED (grpc-status 8) from the prefix alone,
    without waiting for or buffering the body, and the receiver keeps serving."""
    async with running_otlp_governor(receiver=LIMITS) as gov:
        assert gov.addrs.otlp_grpc is not None
        host, port = gov.addrs.otlp_grpc
        frame = struct.pack(">BI", 0, 0xFFFFFFFF) + b"\x0a\x03abc"
        answer = await h2_grpc_call(host, port, frame)
        assert answer[":status"] == "200"
        assert answer["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        assert answer["grpc-message"] == (
            f"SERVER: Received message larger than max (4294967295 vs. {MAX_DECOMPRESSED})"
        )
        assert receiver_counts(gov) == {}
        await assert_still_serving(gov, "after-huge-prefix")


# ---- authentication ---------------------------------------------------------------------------

TOKEN = "s3cret-token"


@pytest.mark.parametrize("source", ["bearer_tokens", "bearer_tokens_file"])
async def test_bearer_token_is_required_on_both_receivers(source: str, tmp_path: Path) -> None:
    """With receiver auth on (a token list, or a file with comments and blank lines), a request
    without a token, with an unknown one or with another scheme is refused: HTTP 401 with
    WWW-Authenticate: Bearer and an UNAUTHENTICATED Status, gRPC UNAUTHENTICATED; each is
    counted as unauthenticated. After each, a request with a known token from another client
    is accepted and arrives, and the client's token is not passed on to the backend."""
    if source == "bearer_tokens":
        auth: dict[str, Any] = {"bearer_tokens": ["other-token", TOKEN]}
    else:
        tokens = tmp_path / "tokens"
        tokens.write_text(f"# receiver tokens\nother-token\n\n  {TOKEN}  \n")
        auth = {"bearer_tokens_file": str(tokens)}
    good = (("authorization", f"Bearer {TOKEN}"),)
    bad_tokens = [(), (("authorization", "Bearer wrong"),), (("authorization", f"Basic {TOKEN}"),)]
    async with running_otlp_governor(receiver={"auth": auth}) as gov:
        for i, metadata in enumerate(bad_tokens):
            resp = await post(gov, export_request("anon"), {**PROTOBUF_HEADERS, **dict(metadata)})
            assert resp.status_code == 401
            assert resp.headers["www-authenticate"] == 'Bearer realm="governor"'
            assert status_of(resp) == (16, "missing or unknown bearer token")
            await assert_still_serving(gov, f"http-{i}", metadata=good)
            data = export_request("anon").SerializeToString()
            result = await grpc_export(gov.grpc_target, data, metadata=metadata)
            assert (result.code, result.details) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown bearer token",
            )
            await assert_still_serving(gov, f"grpc-{i}", metadata=good)
        assert receiver_counts(gov) == {
            "code=401": 3.0,
            "code=UNAUTHENTICATED": 3.0,
            "reason=unauthenticated": 6.0,
            "code=200": 6.0,
            "code=OK": 6.0,
        }
        assert all("authorization" not in r.metadata for r in gov.backend.received)


# ---- backpressure -----------------------------------------------------------------------------


async def test_stalled_pipeline_refuses_with_retry_advice_then_delivers_all_acknowledged() -> None:
    """With the backend stalled, the one worker holding a batch, the queue full (block), the
    batcher blocked in put and the one-slot ingest channel taken, a request waits ingest_wait_s
    and is refused: HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED whose
    grpc-status-details-bin holds a google.rpc.Status with a RetryInfo of retry_after_s. Once
    the backend recovers, every acknowledged datapoint arrives exactly once and new requests are
    accepted again."""
    backend = StallableBackend()
    backend.stalled.set()
    async with running_otlp_governor(
        backend,
        receiver={"ingest_queue_requests": 1, "ingest_wait_s": 0.05, "retry_after_s": 3},
        batch={"max_datapoints": 1},
        queue={"max_batches": 1, "full_behavior": "block"},
        exporter=PATIENT_EXPORTER,
    ) as gov:
        exporter = gov.app.exporters[0]
        batcher = gov.app.batcher
        assert batcher is not None
        acknowledged: list[Point] = []

        async def over_grpc(tag: str) -> GRPCResult:
            req = export_request(tag)
            result = await grpc_export(gov.grpc_target, req.SerializeToString())
            if result.code is OK:
                acknowledged.extend(points(req))
            return result

        async def over_http(tag: str) -> httpx.Response:
            req = export_request(tag)
            resp = await post(gov, req)
            if resp.status_code == 200:
                acknowledged.extend(points(req))
            return resp

        # Fill each stage in turn, waiting until the previous request has settled where it stops.
        assert (await over_grpc("bp-0")).code is OK
        await wait_until(lambda: backend.attempts >= 1)  # taken by the only worker, retried
        assert (await over_http("bp-1")).status_code == 200
        await wait_until(lambda: exporter.queue.statistics().length == 1)  # the queue is full
        assert (await over_grpc("bp-2")).code is OK
        await wait_until(lambda: batcher.lost_datapoints(0) == 2)  # the batcher blocks in put
        assert (await over_http("bp-3")).status_code == 200  # the ingest channel's one slot

        resp = await over_http("bp-4")
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "3"
        assert status_of(resp) == (8, "ingest queue is full; retry later")

        result = await over_grpc("bp-5")
        assert (result.code, result.details) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "ingest queue is full; retry later",
        )
        [details] = [v for k, v in result.trailing if k == "grpc-status-details-bin"]
        assert isinstance(details, bytes)
        status = Status.FromString(details)
        assert (status.code, status.message) == (8, "ingest queue is full; retry later")
        [detail] = status.details
        retry = RetryInfo()
        assert detail.Unpack(retry)
        assert retry.retry_delay == Duration(seconds=3)

        assert receiver_counts(gov) == {
            "code=OK": 2.0,
            "code=200": 2.0,
            "code=429": 1.0,
            "code=RESOURCE_EXHAUSTED": 1.0,
            "reason=backpressure": 2.0,
        }
        assert gov.sample("governor_datapoints_received_total", pipeline="otlp") == 8.0
        assert gov.backend.received == []

        backend.stalled.clear()
        await wait_until(lambda: len(delivered(backend)) >= len(acknowledged))
        assert (await over_grpc("bp-6")).code is OK
        assert (await over_http("bp-7")).status_code == 200
        await wait_until(lambda: len(delivered(backend)) >= len(acknowledged))
        assert len(acknowledged) == 12
        assert sorted(delivered(backend)) == sorted(acknowledged)


# ---- shutdown ---------------------------------------------------------------------------------


async def test_draining_refuses_new_requests_and_delivers_what_was_acknowledged() -> None:
    """Once shutdown begins (backend stalled, so the drain takes a while):

    - an HTTP request on a keep-alive connection the client already had is answered 503
      draining with Retry-After and an UNAVAILABLE Status: the receivers stop in the same
      scheduling step that marks the app draining, but the server closes its idle connections
      only a few steps later, so a request already on its way is still read, and refused;
    - a gRPC call on a channel that was already connected ends UNAVAILABLE, from grpcio and not
      from governor's handler (not counted): the server stopped listening and sent GOAWAY at
      once, so the channel's reconnection is refused;
    - once the HTTP listener is closed, a new connection is refused (httpx.ConnectError): what
      every client meets after that short window, and retries elsewhere or later;
    - /ready answers 503 draining while the drain goes on.

    What was acknowledged before shutdown arrives, exactly once, and the drain is clean."""
    backend = StallableBackend()
    backend.stalled.set()
    before_http, before_grpc = export_request("before-http"), export_request("before-grpc")
    async with running_otlp_governor(backend, exporter=PATIENT_EXPORTER) as gov:
        with grpc.insecure_channel(gov.grpc_target) as channel:
            assert (await post(gov, before_http)).status_code == 200
            data = before_grpc.SerializeToString()
            assert await grpc_export(channel, data) == GRPCResult(OK)
            await wait_until(lambda: backend.attempts >= 1)

            gov.shutdown()
            resp = await post(gov, export_request("during-http"))
            assert resp.status_code == 503
            assert resp.headers["retry-after"] == "1"
            assert status_of(resp) == (14, "shutting down; retry later")
            result = await grpc_export(channel, export_request("during-grpc").SerializeToString())
            assert result.code is grpc.StatusCode.UNAVAILABLE

        assert gov.addrs.otlp_http is not None
        await wait_until_refused(*gov.addrs.otlp_http)
        async with httpx.AsyncClient(timeout=DEADLINE_S) as fresh:
            with pytest.raises(httpx.ConnectError):
                await fresh.post(gov.http_url, content=_GOOD, headers=PROTOBUF_HEADERS)
            ready = await fresh.get(gov.telemetry_url("/ready"))
        assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
        assert receiver_counts(gov) == {
            "code=200": 1.0,
            "code=OK": 1.0,
            "code=503": 1.0,
            "reason=draining": 1.0,
        }
        assert backend.received == []
        backend.stalled.clear()
    assert sorted(delivered(backend)) == sorted(points(before_http) + points(before_grpc))
    assert gov.app.report is not None
    assert gov.app.report.clean
    assert gov.app.report.delivered == {"backend": 4}
    assert gov.app.report.dropped == {"backend": {}}


# ---- disk queue -------------------------------------------------------------------------------


async def test_disk_queue_mode_answers_only_once_the_request_is_queued(tmp_path: Path) -> None:
    """With queue mode disk, each receiver answers only after the batch holding the request is
    in the disk queue: with the backend stalled, the moment the answer arrives the queue already
    holds (or has handed to the worker) the request's datapoints, and a segment file has data.
    Once the backend recovers, everything arrives and nothing is left on disk."""
    backend = StallableBackend()
    backend.stalled.set()
    queue_dir = tmp_path / "queue"
    async with running_otlp_governor(
        backend, queue={"mode": "disk", "dir": str(queue_dir)}, exporter=PATIENT_EXPORTER
    ) as gov:
        exporter = gov.app.exporters[0]

        def queued() -> int:
            st = exporter.queue.statistics()
            return st.datapoints + st.in_flight_datapoints

        over_http, over_grpc = export_request("disk-http", 3), export_request("disk-grpc", 4)
        assert (await post(gov, over_http)).status_code == 200
        assert queued() == 3
        result = await grpc_export(gov.grpc_target, over_grpc.SerializeToString())
        assert result == GRPCResult(OK)
        assert queued() == 7
        assert sum(f.stat().st_size for f in queue_dir.rglob("*") if f.is_file()) > 0
        assert backend.received == []

        backend.stalled.clear()
        expected = points(over_http) + points(over_grpc)
        await wait_until(lambda: len(delivered(backend)) >= len(expected))
        assert sorted(delivered(backend)) == sorted(expected)
        await wait_until(lambda: queued() == 0)
    assert gov.app.report is not None
    assert gov.app.report.delivered == {"backend": 7}
    assert gov.app.report.kept_on_disk == {"backend": 0}
