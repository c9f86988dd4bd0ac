"""A bounded in-memory queue of batches, limited by count and by bytes.

It never holds more than its limits: a put into a full queue blocks, evicts the oldest batch, or is
refused, as `full_behavior` says; evictions are reported to `on_drop` so the caller counts them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

from service.config import QueueConfig
from service.pipeline.items import Batch
from service.queue.base import QueueStats


class MemoryQueue:
    """See the module docstring; `on_drop(batch)` is called for every batch the queue discards."""

    def __init__(self, cfg: QueueConfig, on_drop: Callable[[Batch], None] | None = None) -> None:
        self.cfg = cfg
        self.on_drop = on_drop
        self._items: deque[Batch] = deque()
        self._bytes = 0
        self._datapoints = 0
        self._in_flight: dict[int, Batch] = {}
        self._closed = False
        self._dropped_batches = 0
        self._dropped_datapoints = 0
        self._getters = trio.lowlevel.ParkingLot()
        self._putters = trio.lowlevel.ParkingLot()

    def _full(self, incoming: int) -> bool:
        if not self._items:
            return False  # a batch larger than max_bytes still goes through, alone
        return (
            len(self._items) >= self.cfg.max_batches or self._bytes + incoming > self.cfg.max_bytes
        )

    async def put(self, batch: Batch) -> None:
        if self._closed:
            raise trio.ClosedResourceError("queue is closed")
        behavior = self.cfg.full_behavior
        while self._full(batch.size):
            if behavior == "block":
                await self._putters.park()
                if self._closed:
                    raise trio.ClosedResourceError("queue is closed")
            elif behavior == "drop_newest":
                self._drop(batch)
                await trio.lowlevel.checkpoint()
                return
            else:
                self._drop(self._pop())
        self._items.append(batch)
        self._bytes += batch.size
        self._datapoints += batch.datapoints
        self._getters.unpark()
        await trio.lowlevel.cancel_shielded_checkpoint()  # the batch is in: never cancel after

    def _pop(self) -> Batch:
        batch = self._items.popleft()
        self._bytes -= batch.size
        self._datapoints -= batch.datapoints
        self._putters.unpark()
        return batch

    def _drop(self, batch: Batch) -> None:
        self._dropped_batches += 1
        self._dropped_datapoints += batch.datapoints
        if self.on_drop is not None:
            self.on_drop(batch)

    async def get(self) -> Batch | None:
        while not self._items:
            if self._closed:
                await trio.lowlevel.checkpoint()
                return None
            await self._getters.park()
        batch = self._pop()
        self._in_flight[id(batch)] = batch
        await trio.lowlevel.cancel_shielded_checkpoint()  # the batch is taken: never lose it
        return batch

    def ack(self, batch: Batch) -> None:
        del self._in_flight[id(batch)]

    def take_all(self) -> list[Batch]:
        """Remove and return every batch, in flight first (oldest), then waiting, in order: for a
        hybrid queue moving its memory part to disk at a stop."""
        batches = [*self._in_flight.values(), *self._items]
        self._in_flight.clear()
        self._items.clear()
        self._bytes = self._datapoints = 0
        self._putters.unpark_all()
        return batches

    def close(self) -> None:
        self._closed = True
        self._getters.unpark_all()
        self._putters.unpark_all()

    def statistics(self) -> QueueStats:
        return QueueStats(
            length=len(self._items),
            bytes=self._bytes,
            datapoints=self._datapoints,
            in_flight=len(self._in_flight),
            in_flight_datapoints=sum(b.datapoints for b in self._in_flight.values()),
            max_batches=self.cfg.max_batches,
            max_bytes=self.cfg.max_bytes,
            dropped_batches=self._dropped_batches,
            dropped_datapoints=self._dropped_datapoints,
            closed=self._closed,
        )

    def __repr__(self) -> str:
        return (
            f"<MemoryQueue {len(self._items)} batches, {self._bytes} bytes,"
            f" {len(self._in_flight)} in flight{', closed' if self._closed else ''}>"
        )
