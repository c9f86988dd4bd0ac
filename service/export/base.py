"""The export worker every exporter shares: one per backend, with its own queue, workers and
circuit breaker.

Workers take batches from the queue and deliver them: retry with backoff while the backend is
unwell, split when the backend says the message is too large, drop and count what the backend
refuses for good. A batch leaves the queue for good (ack) only when it is delivered or dropped and
counted; it never disappears silently. Subclasses add the wire: one attempt (`_attempt`) and how
to halve a payload (`_halves`).
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractAsyncContextManager, nullcontext
from pathlib import Path
from typing import Protocol

import trio

from service.config import BreakerConfig, RetryConfig
from service.export.policy import CircuitBreaker, Kind, Outcome, RetryPolicy
from service.pipeline.items import Batch
from service.queue.base import Queue
from service.telemetry import logs
from service.telemetry.metrics import Metrics


class Exporter:
    """Delivers the batches of `queue` to one backend; subclasses implement the protocol."""

    pipeline = ""

    def __init__(
        self,
        cfg: ExporterSettings,
        name: str,
        queue: Queue,
        *,
        metrics: Metrics,
        log_interval_s: float = 10.0,
    ) -> None:
        self.cfg = cfg
        self.name = name
        self.queue = queue
        self.policy = RetryPolicy(cfg.retry)
        self.breaker = CircuitBreaker(cfg.breaker)
        self._breaker_changed = trio.Event()
        self.sent_datapoints = 0
        self.dropped_datapoints: dict[str, int] = {}
        self._settled: dict[int, int] = {}  # id(queued batch) -> datapoints settled by its parts
        self._token: str = getattr(cfg, "bearer_token", "")
        self._log = logs.get(f"export.{self.pipeline}")
        self._rl = logs.RateLimited(self._log, log_interval_s)
        labels = (self.pipeline, self.name)
        self._sent = metrics.datapoints_sent.labels(*labels)
        self._dropped = metrics.datapoints_dropped
        self._requests = metrics.export_requests
        self._retries = metrics.export_retries.labels(*labels)
        self._splits = metrics.export_splits.labels(*labels)
        self._duration = metrics.export_duration.labels(*labels)
        _register_gauges(self, metrics)

    # ---- what a subclass provides

    async def _attempt(self, batch: Batch) -> Outcome:
        """Send `batch` once; classify the answer. Network errors are RETRYABLE outcomes."""
        raise NotImplementedError

    def _halves(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """`batch` as two smaller batches, or None when it cannot be split further."""
        raise NotImplementedError

    def _client(self) -> AbstractAsyncContextManager[object]:
        """The connection pool the workers share, open while they run."""
        return nullcontext()

    def bearer_token(self) -> str:
        """The bearer token: `bearer_token`, or `bearer_token_file` read again for every request
        (as Prometheus does), so a rotated token (Kubernetes service accounts) is picked up. An
        unreadable file keeps the last token and is logged."""
        path = getattr(self.cfg, "bearer_token_file", "")
        if path:
            try:
                self._token = Path(path).read_text().strip()
            except OSError as e:
                self._rl.warning(
                    "token_file",
                    "cannot read bearer_token_file; sending the last token",
                    exporter=self.name,
                    error=str(e),
                )
        return self._token

    # ---- the delivery loop

    def drop(self, datapoints: int, reason: str) -> None:
        """Count `datapoints` as lost for `reason`."""
        self._dropped.labels(self.pipeline, self.name, reason).inc(datapoints)
        self.dropped_datapoints[reason] = self.dropped_datapoints.get(reason, 0) + datapoints

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until the queue is closed and drained."""
        async with self._client(), trio.open_nursery() as nursery:
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
            outcome = await self._send(batch)
            if outcome.kind is Kind.SUCCESS:
                delivered = batch.datapoints - outcome.rejected
                self._sent.inc(delivered)
                self.sent_datapoints += delivered
                if outcome.rejected:
                    # OTLP partial success: the backend took the rest and refused these for good.
                    self.drop(outcome.rejected, "backend_rejected")
                    self._rl.warning(
                        "partial",
                        "backend rejected part of a batch; dropped",
                        exporter=self.name,
                        detail=outcome.detail,
                        datapoints=outcome.rejected,
                    )
                self._settle(batch, root)
                return
            if outcome.kind is Kind.PERMANENT:
                self.drop(batch.datapoints, outcome.code or f"http_{outcome.status}")
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
        halves = self._halves(batch)
        if halves is None:
            self.drop(batch.datapoints, "too_large")
            self._rl.warning(
                "too_large",
                "backend refused a single series or datapoint as too large; dropped",
                exporter=self.name,
                detail=outcome.detail,
            )
            self._settle(batch, root)
            return
        self._splits.inc()
        for half in halves:
            await self._deliver(half, root)

    async def _send(self, batch: Batch) -> Outcome:
        """One attempt, gated by the circuit breaker (waits while it is open)."""
        while (wait := self.breaker.acquire(trio.current_time())) > 0:
            with trio.move_on_after(wait):
                await self._breaker_changed.wait()
        t0 = trio.current_time()
        try:
            outcome = await self._attempt(batch)
        except BaseException:
            self.breaker.abandon()
            self._wake()
            raise
        self._duration.observe(trio.current_time() - t0)
        self._requests.labels(self.pipeline, self.name, outcome.kind.value).inc()
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

    def _wake(self) -> None:
        self._breaker_changed.set()
        self._breaker_changed = trio.Event()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.breaker!r} {self.queue!r}>"


def _register_gauges(exporter: Exporter, metrics: Metrics) -> None:
    """The queue and breaker gauges of one exporter, read at scrape time."""
    lbl = {"pipeline": exporter.pipeline, "exporter": exporter.name}
    metrics.gauge(
        "governor_queue_length",
        "Batches waiting in the queue.",
        lbl,
        lambda: exporter.queue.statistics().length,
    )
    metrics.gauge(
        "governor_queue_bytes",
        "Compressed bytes waiting in the queue.",
        lbl,
        lambda: exporter.queue.statistics().bytes,
    )
    metrics.gauge(
        "governor_queue_capacity_bytes",
        "The queue's byte limit.",
        lbl,
        lambda: exporter.queue.statistics().max_bytes,
    )
    metrics.gauge(
        "governor_queue_in_flight_batches",
        "Batches taken by workers, not yet settled.",
        lbl,
        lambda: exporter.queue.statistics().in_flight,
    )
    disk = getattr(exporter.queue, "disk", exporter.queue)  # a hybrid queue's disk part
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
            metrics.counter(name, doc, lbl, lambda f=field: getattr(exporter.queue.statistics(), f))
        metrics.gauge(
            "governor_queue_disk_used_bytes",
            "Bytes of queue records on disk, in flight included (what max_bytes limits).",
            lbl,
            lambda: exporter.queue.statistics().used_bytes,
        )
    metrics.gauge(
        "governor_breaker_state",
        "Circuit breaker: 0 closed, 1 open, 2 half-open.",
        lbl,
        lambda: int(exporter.breaker.state),
    )


class ExporterSettings(Protocol):
    """What the delivery loop reads from an exporter's config."""

    workers: int
    retry: RetryConfig
    breaker: BreakerConfig
