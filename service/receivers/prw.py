"""The Prometheus Remote Write 1.0 receiver: POST /api/v1/write.

Owns request validation and the hand-off to the ingest channel. It acknowledges (204) only once
the request is in the channel; it never blocks longer than `ingest_wait_s` (then 429), and it never
lets one client's bad body reach a batch other clients share.
"""

from __future__ import annotations

import trio

from service.codec import compression, prw
from service.codec.errors import CodecError
from service.config import ReceiverConfig
from service.pipeline.items import Ingested
from service.receivers.http import (
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
from service.telemetry.health import Health
from service.telemetry.metrics import Metrics

PATH = "/api/v1/write"
PIPELINE = "prw"
_ACCEPTED_TYPES = ("", "application/x-protobuf")


class PRWReceiver(Receiver):
    """ASGI app for remote write; hands `Ingested` items to the pipeline through `intake`."""

    pipeline = PIPELINE
    logger = "receiver.prw"

    def __init__(
        self,
        cfg: ReceiverConfig,
        intake: Intake,
        *,
        metrics: Metrics,
        health: Health,
        log_interval_s: float = 10.0,
    ) -> None:
        super().__init__(cfg, intake, metrics=metrics, health=health, log_interval_s=log_interval_s)
        self.cfg: ReceiverConfig = cfg
        self._ok = metrics.requests.labels(PIPELINE, "204")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            written = await self._handle(scope, receive)
        except Rejected as r:
            self.count_refusal(r, str(r.status), client_address(scope), status=r.status)
            await respond(send, r.status, (str(r) + "\n").encode(), headers=r.headers)
            return
        self._ok.inc()
        samples, histograms = (written.samples, written.histograms) if written else (0, 0)
        headers = [
            (b"x-prometheus-remote-write-samples-written", str(samples).encode()),
            (b"x-prometheus-remote-write-histograms-written", str(histograms).encode()),
        ]
        await respond(send, 204, headers=headers)

    async def _handle(self, scope: Scope, receive: Receive) -> prw.Counts | None:
        self.check_request(scope, PATH)
        ctype = header(scope, b"content-type")
        media, _, params = ctype.partition(";")
        if media.strip().lower() not in _ACCEPTED_TYPES or "proto=io.prometheus.write.v2" in params:
            raise Rejected(
                415,
                "unsupported_media_type",
                f"content-type {ctype!r} is not remote write 1.0 (application/x-protobuf)",
            )
        return await self.ingest_in_slot(lambda deadline: self._ingest(scope, receive, deadline))

    async def _ingest(
        self, scope: Scope, receive: Receive, deadline: float
    ) -> tuple[prw.Counts | None, trio.Event | None]:
        body = await read_body(scope, receive, self.cfg.max_request_bytes)
        encoding = header(scope, b"content-encoding")
        gov = self.intake.governance
        try:
            data = compression.decompress(body, encoding, self.cfg.max_decompressed_bytes)
            if gov is None or not gov.active:
                counts = received = prw.count(data)
                governed = None
            else:
                governed = gov.prw(data, tenant_of(scope, gov.tenant_header))
                counts = prw.Counts(governed.series, governed.samples, governed.histograms)
                received = prw.Counts(0, governed.in_samples, governed.in_histograms)
        except CodecError as e:
            raise rejection(e) from None
        if not counts.series:
            self.received.inc(received.datapoints)
            return received, None
        if governed is not None and governed.data is not None:
            data = governed.data  # the rules changed it: encode once
            block = compression.compress(data, "snappy")
        elif encoding.strip().lower() == "snappy":
            # Keep the snappy block the client sent (the batcher joins blocks without
            # recompressing); other encodings are converted once, here.
            block = body
        else:
            block = compression.compress(data, "snappy")
        done = self.intake.done_event()
        item = Ingested(block, len(data), counts.series, counts.datapoints, done)
        del body, data
        await self.intake.hand_over(item, deadline)
        self.received.inc(received.datapoints)
        return received, done


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else ""
