"""The OTLP exporters: ExportMetricsServiceRequest batches to one endpoint over HTTP or gRPC.

The delivery loop (queue, retry, breaker, split, accounting) is the shared Exporter's; this module
adds the OTLP wire and the OTLP specification's retry rules: which answers are worth retrying,
partial success (the backend took part of a batch), and "message too large" (split the batch).
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import httpx
import trio
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

from service import __version__
from service.codec import compression, otlp
from service.config import OTLPExporterConfig, exporter_name
from service.export.base import Exporter
from service.export.policy import Kind, Outcome, network_error, parse_retry_after
from service.pipeline.items import Batch
from service.queue.base import Queue
from service.telemetry.metrics import Metrics

PIPELINE = "otlp"
# Compressing a big batch with gzip takes milliseconds; off the event loop above this size.
_THREAD_COMPRESS_BYTES = 256 * 1024

# The OTLP specification's retryable answers; every other failure is permanent.
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
RETRYABLE_GRPC = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_DETAILS_KEY = "grpc-status-details-bin"


def otlp_exporter(
    cfg: OTLPExporterConfig, queue: Queue, *, metrics: Metrics, log_interval_s: float = 10.0
) -> Exporter:
    """The exporter for `cfg.protocol`."""
    cls = OTLPGRPCExporter if cfg.protocol == "grpc" else OTLPHTTPExporter
    return cls(cfg, queue, metrics=metrics, log_interval_s=log_interval_s)


class _OTLPExporter(Exporter):
    pipeline = PIPELINE

    def __init__(
        self,
        cfg: OTLPExporterConfig,
        queue: Queue,
        *,
        metrics: Metrics,
        log_interval_s: float = 10.0,
    ) -> None:
        super().__init__(
            cfg, exporter_name(cfg), queue, metrics=metrics, log_interval_s=log_interval_s
        )
        self.cfg: OTLPExporterConfig = cfg

    def _halves(self, batch: Batch) -> tuple[Batch, Batch] | None:
        halves = otlp.split(batch.payload)
        if halves is None:
            return None
        out = []
        for half in halves:
            points, metrics = otlp.count(otlp.decode(half))
            out.append(Batch(half, "identity", metrics, points, len(half)))
        return out[0], out[1]


class OTLPHTTPExporter(_OTLPExporter):
    """POSTs protobuf requests (gzip, zstd or uncompressed) to an OTLP/HTTP endpoint."""

    def __init__(
        self,
        cfg: OTLPExporterConfig,
        queue: Queue,
        *,
        metrics: Metrics,
        log_interval_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(cfg, queue, metrics=metrics, log_interval_s=log_interval_s)
        self.url = metrics_url(cfg.endpoint)
        self._encoding = "" if cfg.compression == "none" else cfg.compression
        self._headers = {
            "content-type": otlp.PROTOBUF,
            "user-agent": f"governor/{__version__}",
            **({"content-encoding": self._encoding} if self._encoding else {}),
            **{k.lower(): v for k, v in cfg.headers.items()},
        }
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.workers, max_keepalive_connections=cfg.workers),
            follow_redirects=False,
            verify=_ssl_context(cfg) if self.url.startswith("https:") else True,
            transport=transport,
        )

    def _client(self) -> AbstractAsyncContextManager[object]:
        return self._http

    async def _attempt(self, batch: Batch) -> Outcome:
        body = batch.payload
        if self._encoding:
            if len(body) > _THREAD_COMPRESS_BYTES:
                body = await trio.to_thread.run_sync(compression.compress, body, self._encoding)
            else:
                body = compression.compress(body, self._encoding)
        headers = self._headers
        if token := self.bearer_token():
            headers = {**headers, "authorization": f"Bearer {token}"}
        try:
            resp = await self._http.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as e:
            return network_error(e)
        return classify_otlp_http(resp.status_code, resp.headers, resp.content)


class OTLPGRPCExporter(_OTLPExporter):
    """Calls MetricsService/Export with grpcio (gzip by default), TLS for https:// endpoints.

    The call is started in a worker thread (starting it compresses the batch) and grpcio runs it
    on its own threads; its completion callback wakes the worker on the Trio loop, and a
    cancelled worker cancels its call.
    """

    def __init__(
        self,
        cfg: OTLPExporterConfig,
        queue: Queue,
        *,
        metrics: Metrics,
        log_interval_s: float = 10.0,
    ) -> None:
        super().__init__(cfg, queue, metrics=metrics, log_interval_s=log_interval_s)
        parts = urlsplit(cfg.endpoint if "://" in cfg.endpoint else f"http://{cfg.endpoint}")
        target = parts.netloc
        options = [("grpc.primary_user_agent", f"governor/{__version__}")]
        if parts.scheme == "https":
            self._channel = grpc.secure_channel(target, _grpc_credentials(cfg), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._export = self._channel.unary_unary(otlp.EXPORT_METHOD)
        self._compression = (
            grpc.Compression.Gzip if cfg.compression == "gzip" else grpc.Compression.NoCompression
        )
        self._metadata = tuple((k.lower(), v) for k, v in cfg.headers.items())

    @contextlib.asynccontextmanager
    async def _open(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self._channel.close()

    def _client(self) -> AbstractAsyncContextManager[object]:
        return self._open()

    async def _attempt(self, batch: Batch) -> Outcome:
        metadata = self._metadata
        if token := self.bearer_token():
            metadata = (*metadata, ("authorization", f"Bearer {token}"))
        token_ = trio.lowlevel.current_trio_token()
        finished = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token_.run_sync_soon(finished.set)

        # Starting the call compresses the whole batch (grpcio's gzip, tens of ms for a large
        # batch) on the calling thread: start it in a worker thread, not on the event loop.
        call = await trio.to_thread.run_sync(
            functools.partial(
                self._export.future,
                batch.payload,
                timeout=self.cfg.timeout_s,
                metadata=metadata,
                compression=self._compression,
            )
        )
        call.add_done_callback(wake)
        try:
            await finished.wait()
        except BaseException:
            call.cancel()
            raise
        error = call.exception()
        if error is None:
            return _success(call.result())
        return classify_grpc(error.code(), error.details() or "", error.trailing_metadata() or ())


def metrics_url(endpoint: str) -> str:
    """The URL to POST to: `endpoint` itself, or with /v1/metrics when it has no path."""
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return urlunsplit(parts._replace(path="/v1/metrics"))
    return endpoint


def classify_otlp_http(status: int, headers: Mapping[str, str], body: bytes = b"") -> Outcome:
    """Classify an OTLP/HTTP answer as the OTLP specification says: 2xx success (maybe
    partial), 429/502/503/504 retryable honouring Retry-After, 413 too large, the rest
    permanent."""
    if 200 <= status < 300:
        return _success(body, status)
    detail = _status_message(body)
    if status == 413:
        return Outcome(Kind.TOO_LARGE, status, detail=detail)
    if status in RETRYABLE_HTTP:
        return Outcome(
            Kind.RETRYABLE, status, parse_retry_after(headers.get("retry-after")), detail
        )
    return Outcome(Kind.PERMANENT, status, detail=detail)


def classify_grpc(
    code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str | bytes]] = ()
) -> Outcome:
    """Classify a failed gRPC call as the OTLP specification says. RESOURCE_EXHAUSTED is
    retryable only when the server sent a RetryInfo; "larger than max" (either side's message
    limit) means split the batch."""
    detail = f"{code.name}: {details}".strip()[:500]
    reason = f"grpc_{code.name.lower()}"
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return Outcome(Kind.TOO_LARGE, detail=detail, code=reason)
    if code in RETRYABLE_GRPC:
        return Outcome(Kind.RETRYABLE, detail=detail, code=reason)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        delay = _retry_delay(trailing)
        if delay is not None:
            return Outcome(Kind.RETRYABLE, retry_after_s=delay, detail=detail, code=reason)
    return Outcome(Kind.PERMANENT, detail=detail, code=reason)


def _retry_delay(trailing: Sequence[tuple[str, str | bytes]]) -> float | None:
    """The RetryInfo delay in a google.rpc.Status carried in trailing metadata, if any."""
    for key, value in trailing:
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = Status.FromString(value)
        except Exception:
            return None
        for any_ in status.details:
            info = RetryInfo()
            if any_.Unpack(info):
                d = info.retry_delay
                return d.seconds + d.nanos / 1e9
    return None


def _success(body: bytes, status: int | None = None) -> Outcome:
    rejected, message = otlp.partial_success(body)
    return Outcome(Kind.SUCCESS, status, detail=message[:200], rejected=rejected)


def _status_message(body: bytes) -> str:
    """The message of a google.rpc.Status error body, or the body's start as text."""
    try:
        message = Status.FromString(body).message
    except Exception:
        message = ""
    return (message or body[:200].decode("utf-8", "replace")).strip()[:200]


def _ssl_context(cfg: OTLPExporterConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.tls.ca_file or None)
    if cfg.tls.cert_file:
        ctx.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
    return ctx


def _grpc_credentials(cfg: OTLPExporterConfig) -> grpc.ChannelCredentials:
    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(cfg.tls.ca_file),
        private_key=read(cfg.tls.key_file),
        certificate_chain=read(cfg.tls.cert_file),
    )
