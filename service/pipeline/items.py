"""The values that flow between stages. Immutable; each carries its own counts so no stage has to
look inside a payload to account for it."""

from __future__ import annotations

import attrs
import trio


@attrs.frozen(slots=True)
class Ingested:
    """One accepted request: its serialized WriteRequest as a snappy raw block, and what it holds.

    Snappy blocks join without recompression (compression.snappy_concat), so a request that
    arrived snappy-compressed is never compressed again on its way to the backend.
    """

    block: bytes
    raw_bytes: int  # uncompressed size
    series: int
    datapoints: int
    # Set by the batcher once the batch holding this request is in every queue (fsynced, with
    # durable_ack); the receiver then answers. None: the receiver answers at hand-over.
    done: trio.Event | None = None


@attrs.frozen(slots=True)
class Batch:
    """An encoded, compressed payload ready for a backend; what queues hold."""

    payload: bytes  # compressed with `encoding`
    encoding: str
    series: int
    datapoints: int
    raw_bytes: int  # uncompressed size

    @property
    def size(self) -> int:
        """Bytes this batch occupies in a queue."""
        return len(self.payload)
