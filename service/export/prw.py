"""The remote-write exporter: one per backend URL, with its own queue, workers and breaker.

Workers take batches from the queue and deliver them: retry with backoff while the backend is
unwell, split on 413, drop and count what the backend refuses for good. A batch leaves the queue
for good (ack) only when it is delivered or dropped and counted; it never disappears silently.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import httpx
import trio

from service import __version__
from service.codec import compression, prw
from service.config import PRWExporterConfig, exporter_name
from service.export.policy import (
    CircuitBreaker,
    Kind,
    Outcome,
    RetryPolicy,
    classify_http,
    network_error,
)
from service.pipeline.items import Batch
from service.queue.base import Queue
from service.telemetry import logs
from service.telemetry.metrics import Metrics

PIPELINE = "prw"


class PRWExporter:
    """Delivers the batches of `queue` to one remote-write URL."""

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
        self.cfg = cfg
        self.name = exporter_name(cfg)
        self.queue = queue
        self.policy = RetryPolicy(cfg.retry)
        self.breaker = CircuitBreaker(cfg.breaker)
        self._breaker_changed = trio.Event()
        self.sent_datapoints = 0
        self.dropped_datapoints: dict[str, int] = {}
        self._settled: dict[int, int] = {}  # id(queued batch) -> datapoints settled by its parts
        self._log = logs.get("export.prw")
        self._rl = logs.RateLimited(self._log, log_interval_s)
        labels = (PIPELINE, self.name)
        self._sent = metrics.datapoints_sent.labels(*labels)
        self._dropped = metrics.datapoints_dropped
        self._requests = metrics.export_requests
        self._retries = metrics.export_retries.labels(*labels)
        self._splits = metrics.export_splits.labels(*labels)
        self._duration = metrics.export_duration.labels(*labels)
        lbl = {"pipeline": PIPELINE, "exporter": self.name}
        metrics.gauge(
            "governor_queue_length",
            "Batches waiting in the queue.",
            lbl,
            lambda: self.queue.statistics().length,
        )
        metrics.gauge(
            "governor_queue_bytes",
            "Compressed bytes waiting in the queue.",
            lbl,
            lambda: self.queue.statistics().bytes,
        )
        metrics.gauge(
            "governor_queue_capacity_bytes",
            "The queue's byte limit.",
            lbl,
            lambda: self.queue.statistics().max_bytes,
        )
        metrics.gauge(
            "governor_queue_in_flight_batches",
            "Batches taken by workers, not yet settled.",
            lbl,
            lambda: self.queue.statistics().in_flight,
        )
        disk = getattr(self.queue, "disk", self.queue)  # a hybrid queue's disk part
        if hasattr(disk.statistics(), "corrupt_records"):  # a disk queue
            for field, name, doc in (
                (
                    "corrupt_records",
                    "governor_queue_corrupt_records",
                    "Damaged records the disk queue skipped (each logged with file and offset).",
                ),
                (
                    "write_errors",
                    "governor_queue_write_errors",
                    "Batches the disk queue could not write (disk full, I/O error); dropped.",
                ),
                ("sync_errors", "governor_queue_sync_errors", "Failed fsyncs of the disk queue."),
            ):
                metrics.counter(name, doc, lbl, lambda f=field: getattr(self.queue.statistics(), f))
            metrics.gauge(
                "governor_queue_disk_used_bytes",
                "Bytes of queue records on disk, in flight included (what max_bytes limits).",
                lbl,
                lambda: self.queue.statistics().used_bytes,
            )
        metrics.gauge(
            "governor_breaker_state",
            "Circuit breaker: 0 closed, 1 open, 2 half-open.",
            lbl,
            lambda: int(self.breaker.state),
        )
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
        self._client = httpx.AsyncClient(
            auth=auth,
            timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.workers, max_keepalive_connections=cfg.workers),
            follow_redirects=False,
            transport=transport,
        )

    def drop(self, datapoints: int, reason: str) -> None:
        """Count `datapoints` as lost for `reason`."""
        self._dropped.labels(PIPELINE, self.name, reason).inc(datapoints)
        self.dropped_datapoints[reason] = self.dropped_datapoints.get(reason, 0) + datapoints

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until the queue is closed and drained."""
        async with self._client, trio.open_nursery() as nursery:
            for _ in range(self.cfg.workers):
                nursery.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        while True:
            batch = await self.queue.get()
            if batch is None:
                return
            await self._deliver(batch, batch)
            self._settled.pop(id(batch), None)
            # Ack only once settled. A batch cancelled mid-delivery (hard stop) stays in flight:
            # the shutdown report counts it as dropped, and a durable queue would redeliver it.
            self.queue.ack(batch)

    def count_queue_drop(self, batch: Batch) -> None:
        """The queue discarded `batch` because it was full (drop_oldest / drop_newest)."""
        self.drop(batch.datapoints, "queue_full")

    def count_write_error(self, batch: Batch) -> None:
        """The disk queue could not write `batch` (disk full, I/O error) and dropped it."""
        self.drop(batch.datapoints, "queue_write_error")

    def settled_in_flight(self) -> int:
        """Datapoints of in-flight batches already delivered or dropped (halves of a split)."""
        return sum(self._settled.values())

    def _settle(self, batch: Batch, root: Batch) -> None:
        if batch is not root:
            self._settled[id(root)] = self._settled.get(id(root), 0) + batch.datapoints

    async def _deliver(self, batch: Batch, root: Batch) -> None:
        """Deliver `batch` (all or part of the queued batch `root`) or drop and count it;
        returns only when it is settled."""
        attempt = 0
        started = trio.current_time()
        max_elapsed = self.cfg.retry.max_elapsed_s or math.inf
        while True:
            outcome = await self._send(batch.payload, batch.encoding)
            if outcome.kind is Kind.SUCCESS:
                self._sent.inc(batch.datapoints)
                self.sent_datapoints += batch.datapoints
                self._settle(batch, root)
                return
            if outcome.kind is Kind.PERMANENT:
                self.drop(batch.datapoints, f"http_{outcome.status}")
                self._rl.warning(
                    f"permanent{outcome.status}",
                    "backend refused a batch; dropped",
                    exporter=self.name,
                    status=outcome.status,
                    detail=outcome.detail,
                    datapoints=batch.datapoints,
                )
                self._settle(batch, root)
                return
            if outcome.kind is Kind.TOO_LARGE:
                await self._split(batch, root, outcome)
                return
            if trio.current_time() - started >= max_elapsed:
                self.drop(batch.datapoints, "retries_exhausted")
                self._rl.warning(
                    "exhausted",
                    "gave up on a batch after max_elapsed_s",
                    exporter=self.name,
                    detail=outcome.detail,
                    datapoints=batch.datapoints,
                )
                self._settle(batch, root)
                return
            self._rl.warning(
                "retry",
                "export failed; will retry",
                exporter=self.name,
                status=outcome.status,
                detail=outcome.detail,
            )
            self._retries.inc()
            await trio.sleep(self.policy.next_delay(attempt, outcome.retry_after_s))
            attempt += 1

    async def _split(self, batch: Batch, root: Batch, outcome: Outcome) -> None:
        raw = compression.decompress(batch.payload, batch.encoding, batch.raw_bytes)
        halves = prw.split(raw)
        if halves is None:
            self.drop(batch.datapoints, "too_large")
            self._rl.warning(
                "too_large",
                "backend refused a single series as too large; dropped",
                exporter=self.name,
                detail=outcome.detail,
            )
            self._settle(batch, root)
            return
        self._splits.inc()
        for half in halves:
            _, counts = prw.decode(half)
            await self._deliver(
                Batch(
                    payload=compression.compress(half, batch.encoding),
                    encoding=batch.encoding,
                    series=counts.series,
                    datapoints=counts.datapoints,
                    raw_bytes=len(half),
                ),
                root,
            )

    async def _send(self, payload: bytes, encoding: str) -> Outcome:
        """One attempt, gated by the circuit breaker (waits while it is open)."""
        while (wait := self.breaker.acquire(trio.current_time())) > 0:
            with trio.move_on_after(wait):
                await self._breaker_changed.wait()
        t0 = trio.current_time()
        try:
            headers = self._current_headers()
            if encoding != "snappy":
                headers = {**headers, "content-encoding": encoding}
            resp = await self._client.post(self.cfg.url, content=payload, headers=headers)
            outcome = classify_http(resp.status_code, resp.headers, resp.content)
        except httpx.HTTPError as e:
            outcome = network_error(e)
        except BaseException:
            self.breaker.abandon()
            self._wake()
            raise
        self._duration.observe(trio.current_time() - t0)
        self._requests.labels(PIPELINE, self.name, outcome.kind.value).inc()
        before = self.breaker.state
        self.breaker.record(outcome.backend_alive, trio.current_time())
        if self.breaker.state is not before:
            logs.log(
                self._log,
                logging.WARNING if outcome.kind is Kind.RETRYABLE else logging.INFO,
                "circuit breaker " + self.breaker.state.name.lower(),
                exporter=self.name,
                detail=outcome.detail,
            )
        self._wake()
        return outcome

    def _current_headers(self) -> dict[str, str]:
        """The request headers, with the bearer token re-read from its file for every request
        (as Prometheus does), so a rotated token (Kubernetes service accounts) is picked up. An
        unreadable file keeps the last token and is logged."""
        if not self.cfg.bearer_token_file:
            return self._headers
        try:
            token = Path(self.cfg.bearer_token_file).read_text().strip()
        except OSError as e:
            self._rl.warning(
                "token_file",
                "cannot read bearer_token_file; sending the last token",
                exporter=self.name,
                error=str(e),
            )
            return self._headers
        auth = f"Bearer {token}"
        if self._headers.get("authorization") != auth:
            self._headers = {**self._headers, "authorization": auth}
        return self._headers

    def _wake(self) -> None:
        self._breaker_changed.set()
        self._breaker_changed = trio.Event()

    def __repr__(self) -> str:
        return f"<PRWExporter {self.name} {self.breaker!r} {self.queue!r}>"
