"""The queue interface every queue (memory now, disk and hybrid later) implements.

A batch is taken with `get()` and settled with `ack()` once it is delivered or given up on; a
durable queue frees it only on ack, so a crash between get and ack redelivers instead of losing.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from service.pipeline.items import Batch


@attrs.frozen
class QueueStats:
    """A snapshot of a queue; `in_flight` counts batches taken but not yet acked."""

    length: int
    bytes: int
    datapoints: int
    in_flight: int
    in_flight_datapoints: int
    max_batches: int
    max_bytes: int
    dropped_batches: int
    dropped_datapoints: int
    closed: bool


class Queue(Protocol):
    async def put(self, batch: Batch) -> None:
        """Add a batch; when full, block, drop the oldest or drop this one (`full_behavior`).
        Raises trio.ClosedResourceError after close()."""

    async def get(self) -> Batch | None:
        """Take the oldest batch, waiting for one; None once closed and empty."""

    def ack(self, batch: Batch) -> None:
        """Settle a batch taken with get(): delivered, or dropped and counted by the caller."""

    def close(self) -> None:
        """No more puts; get() drains what is left, then returns None."""

    def statistics(self) -> QueueStats: ...
