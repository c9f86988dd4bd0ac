"""The OTLP/HTTP metrics receiver: POST /v1/metrics, protobuf or JSON, gzip/zstd/deflate bodies.

Owns request validation and the hand-off to the OTLP pipeline's intake. It answers in the request's
encoding (an ExportMetricsServiceResponse, with partial_success when part of the request was
rejected; a google.rpc.Status on errors), never waits past `ingest_wait_s` for room (then 429),
and never lets one client's bad body reach a batch that other clients share.
"""

from __future__ import annotations

import trio
from google.rpc.status_pb2 import Status

from service.codec import compression, otlp
from service.codec.errors import CodecError
from service.config import OTLPReceiverConfig
from service.pipeline.items import Ingested
from service.receivers.http import (
    GRPC_CODE,
    Receive,
    Rejected,
    Scope,
    Send,
    header,
    lifespan,
    read_body,
    rejection,
    respond,
)
from service.receivers.intake import Intake, Receiver, tenant_of
from service.receivers.prw import client_address
from service.telemetry.health import Health
from service.telemetry.metrics import Metrics

PATH = "/v1/metrics"
PIPELINE = "otlp"
_TYPES = {otlp.PROTOBUF: False, otlp.JSON: True}  # media type -> is JSON


class OTLPHTTPReceiver(Receiver):
    """ASGI app for OTLP/HTTP metrics."""

    pipeline = PIPELINE
    logger = "receiver.otlp_http"

    def __init__(
        self,
        cfg: OTLPReceiverConfig,
        intake: Intake,
        *,
        metrics: Metrics,
        health: Health,
        log_interval_s: float = 10.0,
    ) -> None:
        super().__init__(cfg, intake, metrics=metrics, health=health, log_interval_s=log_interval_s)
        self._ok = metrics.requests.labels(PIPELINE, "200")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        media = header(scope, b"content-type").partition(";")[0].strip().lower()
        json_body = _TYPES.get(media, False)
        try:
            admitted = await self._handle(scope, receive, media)
        except Rejected as r:
            self.count_refusal(r, str(r.status), client_address(scope), status=r.status)
            body, ctype = _status_body(r, media)
            await respond(send, r.status, body, ctype, headers=r.headers)
            return
        self._ok.inc()
        rejected, message = (admitted.rejected, admitted.message) if admitted else (0, "")
        count_rejected(self, admitted)
        body = otlp.response(rejected, message, json_body=json_body)
        await respond(send, 200, body, (otlp.JSON if json_body else otlp.PROTOBUF).encode())

    async def _handle(self, scope: Scope, receive: Receive, media: str) -> otlp.Admitted | None:
        self.check_request(scope, PATH)
        if media not in _TYPES:
            raise Rejected(
                415,
                "unsupported_media_type",
                f"content-type {media!r} is not {otlp.PROTOBUF} or {otlp.JSON}",
            )
        json_body = _TYPES[media]
        return await self.ingest_in_slot(
            lambda deadline: self._ingest(scope, receive, json_body, deadline)
        )

    async def _ingest(
        self, scope: Scope, receive: Receive, json_body: bool, deadline: float
    ) -> tuple[otlp.Admitted, trio.Event | None]:
        body = await read_body(scope, receive, self.cfg.max_request_bytes)
        try:
            data = compression.decompress(
                body, header(scope, b"content-encoding"), self.cfg.max_decompressed_bytes
            )
            del body
            admitted = otlp.admit(data, json_body=json_body)
        except CodecError as e:
            raise rejection(e) from None
        gov = self.intake.governance
        tenant = tenant_of(scope, gov.tenant_header) if gov is not None else ""
        return await hand_over(self, admitted, deadline, tenant)


async def hand_over(
    receiver: Receiver, admitted: otlp.Admitted, deadline: float, tenant: str = ""
) -> tuple[otlp.Admitted, trio.Event | None]:
    """Run the pipeline's rules over a decoded OTLP request and hand what is left to its intake
    (both OTLP receivers). Returns the request as forwarded and the event to wait for before
    answering (None: answer now)."""
    intake = receiver.intake
    received = admitted.datapoints
    if intake.governance is not None and intake.governance.active:
        admitted = intake.governance.otlp(admitted, tenant)
    done = None
    if admitted.datapoints or admitted.metrics:
        done = intake.done_event()
        item = Ingested(
            admitted.data, len(admitted.data), admitted.metrics, admitted.datapoints, done
        )
        await intake.hand_over(item, deadline)
    receiver.received.inc(received)
    return admitted, done


def count_rejected(receiver: Receiver, admitted: otlp.Admitted | None) -> None:
    """Count the datapoints a request's answer reports as rejected, by reason."""
    if admitted is None or not admitted.rejected:
        return
    unnamed = admitted.rejected - admitted.limited
    if unnamed:
        receiver._rejected_points.labels(PIPELINE, "unnamed_metric").inc(unnamed)
    if admitted.limited:
        receiver._rejected_points.labels(PIPELINE, "limits").inc(admitted.limited)


def _status_body(r: Rejected, media: str) -> tuple[bytes, bytes]:
    """The error body the OTLP specification asks for: a google.rpc.Status in the request's
    encoding (plain text when the request's content type is not one of OTLP's)."""
    if media not in _TYPES:
        return (str(r) + "\n").encode(), b"text/plain; charset=utf-8"
    status = Status(code=GRPC_CODE.get(r.status, GRPC_CODE[400]).value[0], message=str(r))
    if _TYPES[media]:
        return otlp.status_json(status), otlp.JSON.encode()
    return status.SerializeToString(), otlp.PROTOBUF.encode()
