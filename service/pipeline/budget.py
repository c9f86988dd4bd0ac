"""A byte budget shared by the receivers (which take from it) and the batcher (which gives back).

It bounds the bytes of accepted requests waiting in the ingest channel or in the open batch,
so memory stays bounded by configuration whatever the request sizes and rates.
"""

from __future__ import annotations

import trio


class ByteBudget:
    """`acquire(n)` waits until `n` bytes are free; `release(n)` returns them."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiters = trio.lowlevel.ParkingLot()

    def _fits(self, n: int) -> bool:
        # A request larger than the whole budget is still let through when nothing else is held;
        # config validation keeps max_decompressed_bytes <= the budget anyway.
        return self.used + n <= self.total or self.used == 0

    def try_acquire(self, n: int) -> bool:
        """Take `n` bytes if they fit now; True if taken."""
        if self._fits(n):
            self.used += n
            return True
        return False

    async def acquire(self, n: int) -> None:
        """Wait until `n` bytes fit, then take them. Cancellation leaves the budget unchanged."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._fits(n):
            await self._waiters.park()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._waiters.unpark_all()

    def __repr__(self) -> str:
        return f"<ByteBudget {self.used}/{self.total} bytes>"
