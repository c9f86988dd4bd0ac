"""The remote-write exporter: POSTs snappy-compressed WriteRequests to one URL.

The delivery loop (queue, retry, breaker, split, accounting) is the shared Exporter's; this module
adds the remote-write wire: headers, auth, one POST, and halving a WriteRequest on 413.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx

from service import __version__
from service.codec import compression, prw
from service.config import PRWExporterConfig, exporter_name
from service.export.base import Exporter
from service.export.policy import Outcome, classify_http, network_error
from service.pipeline.items import Batch
from service.queue.base import Queue
from service.telemetry.metrics import Metrics

PIPELINE = "prw"


class PRWExporter(Exporter):
    """Delivers the batches of `queue` to one remote-write URL."""

    pipeline = PIPELINE

    def __init__(
        self,
        cfg: PRWExporterConfig,
        queue: Queue,
        *,
        metrics: Metrics,
        transport: httpx.AsyncBaseTransport | None = None,
        log_interval_s: float = 10.0,
    ) -> None:
        """`transport` replaces the network (tests pass a recording fake)."""
        super().__init__(
            cfg, exporter_name(cfg), queue, metrics=metrics, log_interval_s=log_interval_s
        )
        self.cfg: PRWExporterConfig = cfg
        self._headers = {
            "content-type": prw.CONTENT_TYPE,
            "content-encoding": "snappy",
            "x-prometheus-remote-write-version": prw.VERSION_HEADER,
            "user-agent": f"governor/{__version__}",
            # bearer_token_file is read for every request: _current_headers()
            **({"authorization": f"Bearer {cfg.bearer_token}"} if cfg.bearer_token else {}),
            **{k.lower(): v for k, v in cfg.headers.items()},
        }
        auth = None
        if cfg.basic_auth is not None:
            password = cfg.basic_auth.password
            if cfg.basic_auth.password_file:
                password = Path(cfg.basic_auth.password_file).read_text().strip()
            auth = httpx.BasicAuth(cfg.basic_auth.username, password)
        self._http = httpx.AsyncClient(
            auth=auth,
            timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.workers, max_keepalive_connections=cfg.workers),
            follow_redirects=False,
            transport=transport,
        )

    def _client(self) -> AbstractAsyncContextManager[object]:
        return self._http

    def _halves(self, batch: Batch) -> tuple[Batch, Batch] | None:
        raw = compression.decompress(batch.payload, batch.encoding, batch.raw_bytes)
        halves = prw.split(raw)
        if halves is None:
            return None
        out = []
        for half in halves:
            _, counts = prw.decode(half)
            out.append(
                Batch(
                    payload=compression.compress(half, batch.encoding),
                    encoding=batch.encoding,
                    series=counts.series,
                    datapoints=counts.datapoints,
                    raw_bytes=len(half),
                )
            )
        return out[0], out[1]

    async def _attempt(self, batch: Batch) -> Outcome:
        headers = self._current_headers()
        if batch.encoding != "snappy":
            headers = {**headers, "content-encoding": batch.encoding}
        try:
            resp = await self._http.post(self.cfg.url, content=batch.payload, headers=headers)
        except httpx.HTTPError as e:
            return network_error(e)
        return classify_http(resp.status_code, resp.headers, resp.content)

    def _current_headers(self) -> dict[str, str]:
        """The request headers, with the current bearer token (see `bearer_token`)."""
        if not self.cfg.bearer_token_file:
            return self._headers
        auth = f"Bearer {self.bearer_token()}"
        if self._headers.get("authorization") != auth:
            self._headers = {**self._headers, "authorization": auth}
        return self._headers
