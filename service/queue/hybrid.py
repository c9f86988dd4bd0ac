"""The hybrid queue: memory first, disk past a threshold, one FIFO across the two.

Batches go to memory while the memory part holds less than `spill_bytes` and nothing waits on
disk; otherwise to disk. Workers take from memory first. Since a batch goes to memory only while
the disk part has nothing waiting, every batch in memory is older than every batch waiting on
disk, so the order of delivery is the order of arrival. At a stop, what memory still holds (in
flight included) is written to disk before the disk part closes; a crash loses the memory part.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from service.pipeline.items import Batch
from service.queue.base import QueueStats
from service.queue.disk import DiskQueue
from service.queue.memory import MemoryQueue


@attrs.frozen
class HybridQueueStats(QueueStats):
    """QueueStats of the whole queue, plus how much of it is where."""

    memory_batches: int = 0
    memory_bytes: int = 0
    disk_batches: int = 0
    spilled_at_stop: int = 0  # batches moved from memory to disk when the queue stopped


class HybridQueue:
    """See the module docstring. `memory` must be able to hold `spill_bytes` (its own limits are
    never reached); `disk` handles full_behavior once the disk part is full."""

    def __init__(self, memory: MemoryQueue, disk: DiskQueue, spill_bytes: int) -> None:
        self.memory = memory
        self.disk = disk
        self.spill_bytes = spill_bytes
        self._from_disk: set[int] = set()
        self._closed = False
        self._getters = trio.lowlevel.ParkingLot()
        self._drained = trio.Event()
        self._spilled_at_stop = 0

    @property
    def on_drop(self) -> Callable[[Batch], None] | None:
        return self.disk.on_drop

    @on_drop.setter
    def on_drop(self, callback: Callable[[Batch], None] | None) -> None:
        # Only the disk part ever drops: memory takes a batch only when it has room.
        self.disk.on_drop = callback

    async def put(self, batch: Batch) -> None:
        if self._closed:
            raise trio.ClosedResourceError("queue is closed")
        if self.disk.statistics().length == 0 and (
            self.memory.statistics().bytes + batch.size <= self.spill_bytes
        ):
            await self.memory.put(batch)
        else:
            await self.disk.put(batch)
        self._getters.unpark_all()

    async def get(self) -> Batch | None:
        while True:
            # Neither get() awaits before taking a batch it has, so the length read here holds.
            if self.memory.statistics().length:
                batch = await self.memory.get()
                if batch is not None:
                    return batch
            elif self.disk.statistics().length:
                batch = await self.disk.get()
                if batch is not None:
                    self._from_disk.add(id(batch))
                    return batch
            elif self._closed:
                self._check_drained()
                await trio.lowlevel.checkpoint()
                return None
            else:
                await self._getters.park()

    def ack(self, batch: Batch) -> None:
        if id(batch) in self._from_disk:
            self._from_disk.discard(id(batch))
            self.disk.ack(batch)
        else:
            self.memory.ack(batch)
        self._check_drained()

    def close(self) -> None:
        self._closed = True
        self.memory.close()
        self.disk.close()
        self._getters.unpark_all()
        self._check_drained()

    def _check_drained(self) -> None:
        if not self._closed:
            return
        m, d = self.memory.statistics(), self.disk.statistics()
        if not (m.length or m.in_flight or d.length or d.in_flight):
            self._drained.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fsync the disk part every sync_interval_s until the queue is closed and drained (or
        this task is cancelled); then move what memory holds to disk and close the disk part."""
        task_status.started()
        try:
            while not self._drained.is_set():
                with trio.move_on_after(self.disk.settings.sync_interval_s):
                    await self._drained.wait()
                await self.disk.sync()
        finally:
            with trio.CancelScope(shield=True):
                for batch in self.memory.take_all():
                    if self.disk.spill(batch):
                        self._spilled_at_stop += 1
                await self.disk.aclose()

    def statistics(self) -> HybridQueueStats:
        m, d = self.memory.statistics(), self.disk.statistics()
        return HybridQueueStats(
            length=m.length + d.length,
            bytes=m.bytes + d.bytes,
            datapoints=m.datapoints + d.datapoints,
            in_flight=m.in_flight + d.in_flight,
            in_flight_datapoints=m.in_flight_datapoints + d.in_flight_datapoints,
            max_batches=0,
            max_bytes=d.max_bytes,
            dropped_batches=m.dropped_batches + d.dropped_batches,
            dropped_datapoints=m.dropped_datapoints + d.dropped_datapoints,
            closed=self._closed,
            memory_batches=m.length,
            memory_bytes=m.bytes,
            disk_batches=d.length,
            spilled_at_stop=self._spilled_at_stop,
        )

    def __repr__(self) -> str:
        return f"<HybridQueue memory={self.memory!r} disk={self.disk!r}>"
