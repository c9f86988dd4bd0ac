"""The batcher: joins ingested requests into batches and hands each batch to every queue.

A batch is the concatenation of serialized requests (protobuf merges them), shared by all queues:
for PRW, built by joining the requests' snappy blocks without recompressing; for OTLP, the
serialized ExportMetricsServiceRequests joined as they are (every ResourceMetrics keeps its own
resource and scopes). It flushes on max series (PRW) or max datapoints (OTLP), max bytes, or the
interval after the first item, and it closes the queues when its input ends, so shutdown flows on
downstream.
"""

from __future__ import annotations

import math

import trio

from service.codec import compression
from service.config import BatchConfig, OTLPBatchConfig
from service.pipeline.budget import ByteBudget
from service.pipeline.items import Batch, Ingested
from service.queue.base import Queue
from service.telemetry.metrics import Metrics


class Batcher:
    """Owns the open batch; `lost_datapoints()` says what a hard stop would lose."""

    def __init__(
        self,
        cfg: BatchConfig | OTLPBatchConfig,
        queues: list[Queue],
        *,
        metrics: Metrics,
        budget: ByteBudget | None = None,
        pipeline: str = "prw",
    ) -> None:
        self.cfg = cfg
        self._otlp = isinstance(cfg, OTLPBatchConfig)
        self._max_count = cfg.max_datapoints if isinstance(cfg, OTLPBatchConfig) else cfg.max_series
        self.queues = queues
        self.budget = budget
        self._parts: list[bytes] = []  # snappy blocks (PRW), serialized requests (OTLP)
        self._series = 0
        self._bytes = 0  # uncompressed, for max_bytes
        self._held = 0  # compressed, as taken from the budget
        self._done: list[trio.Event] = []  # receivers waiting for the open batch to be queued
        self.pending_datapoints = 0
        self._flushing: Batch | None = None
        self._flushed_to = 0
        self._batch_series = metrics.batch_series.labels(pipeline)
        self._batch_bytes = metrics.batch_bytes.labels(pipeline)

    async def run(self, rx: trio.MemoryReceiveChannel[Ingested]) -> None:
        """Consume `rx` until it is closed, then flush and close every queue."""
        try:
            async with rx:
                deadline = math.inf
                while True:
                    item = None
                    with trio.move_on_at(deadline):
                        try:
                            item = await rx.receive()
                        except trio.EndOfChannel:
                            break
                    if item is None:  # the interval ran out
                        await self.flush()
                        deadline = math.inf
                        continue
                    if self._bytes and self._bytes + item.raw_bytes > self.cfg.max_bytes:
                        await self.flush()
                    if not self._parts:
                        deadline = trio.current_time() + self.cfg.interval_s
                    self._parts.append(item.block)
                    self._series += item.series
                    self._bytes += item.raw_bytes
                    self._held += len(item.block)
                    if item.done is not None:
                        self._done.append(item.done)
                    self.pending_datapoints += item.datapoints
                    count = self.pending_datapoints if self._otlp else self._series
                    if count >= self._max_count or self._bytes >= self.cfg.max_bytes:
                        await self.flush()
                        deadline = math.inf
                    elif self._done and not _more_coming(rx):
                        # Clients wait for the queue (disk mode): give others ack_linger_s to
                        # join the batch, then write it (group commit), not interval_s.
                        deadline = min(deadline, trio.current_time() + self.cfg.ack_linger_s)
                await self.flush()
        finally:
            for q in self.queues:
                q.close()

    async def flush(self) -> None:
        """Hand the open batch to every queue (blocking if a queue blocks when full)."""
        if not self._parts:
            return
        batch = Batch(
            payload=b"".join(self._parts)
            if self._otlp
            else compression.snappy_concat(self._parts, self._bytes),
            encoding="identity" if self._otlp else "snappy",
            series=self._series,
            datapoints=self.pending_datapoints,
            raw_bytes=self._bytes,
        )
        self._parts = []
        if self.budget is not None:
            self.budget.release(self._held)  # the parts are garbage now; the batch is the queue's
        self._series = self._bytes = self._held = self.pending_datapoints = 0
        self._batch_series.observe(batch.series)
        self._batch_bytes.observe(batch.raw_bytes)
        done, self._done = self._done, []
        self._flushing = batch
        for i, q in enumerate(self.queues):
            self._flushed_to = i
            await q.put(batch)
        self._flushing = None
        for event in done:
            event.set()

    def lost_datapoints(self, queue_index: int) -> int:
        """Datapoints that queue `queue_index` would never get if the batcher stopped now: the
        open batch, and the batch being flushed if that queue has not taken it yet."""
        lost = self.pending_datapoints
        if self._flushing is not None and queue_index >= self._flushed_to:
            lost += self._flushing.datapoints
        return lost


def _more_coming(rx: trio.MemoryReceiveChannel[Ingested]) -> bool:
    """Whether another item is ready to be received right now."""
    st = rx.statistics()
    return st.current_buffer_used > 0 or st.tasks_waiting_send > 0
