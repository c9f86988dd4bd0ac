"""The hybrid queue: memory first, disk past spill_bytes, one FIFO across the two."""

from __future__ import annotations

import random
from pathlib import Path

import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from service.config import QueueConfig
from service.pipeline.items import Batch
from service.queue import DiskQueue, DiskQueueSettings, HybridQueue, MemoryQueue, open_queue


def batch(n: int, size: int = 100) -> Batch:
    """A batch whose payload names it: `n` as text, padded to `size` bytes."""
    payload = str(n).encode().ljust(size, b".")
    return Batch(payload=payload, encoding="snappy", series=1, datapoints=n + 1, raw_bytes=size)


def number(b: Batch) -> int:
    return int(b.payload.rstrip(b"."))


def hybrid(directory: Path, spill_bytes: int) -> HybridQueue:
    memory = MemoryQueue(QueueConfig(max_batches=2**62, max_bytes=spill_bytes * 2))
    disk = DiskQueue(DiskQueueSettings(directory=directory, segment_bytes=4096))
    return HybridQueue(memory, disk, spill_bytes)


async def test_memory_first_then_disk_and_fifo_across_both(tmp_path: Path) -> None:
    """Batches go to memory until spill_bytes, then to disk, and keep going to disk while the
    disk part has anything waiting; get() returns them in the order they were put."""
    q = hybrid(tmp_path, spill_bytes=300)
    for n in range(5):  # 3 fit in memory (300 bytes), 2 spill
        await q.put(batch(n))
    st_ = q.statistics()
    assert (st_.memory_batches, st_.disk_batches) == (3, 2)
    first = await q.get()
    assert first is not None
    q.ack(first)  # memory has room again, but the disk part has batches waiting
    await q.put(batch(5))
    assert (q.statistics().memory_batches, q.statistics().disk_batches) == (2, 3)
    got = [number(first)]
    while q.statistics().length:
        b = await q.get()
        assert b is not None
        got.append(number(b))
        q.ack(b)
    assert got == [0, 1, 2, 3, 4, 5]
    q.close()
    assert await q.get() is None
    await q.disk.aclose()


async def test_a_stop_moves_memory_to_disk_in_order(tmp_path: Path) -> None:
    """When run() ends (cancelled at a hard stop), what memory holds, the batch in flight first,
    is written to disk; a new queue on the directory delivers everything in order."""
    q = hybrid(tmp_path, spill_bytes=1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(q.run)
        for n in range(4):
            await q.put(batch(n))
        taken = await q.get()  # in flight when the stop comes
        assert taken is not None
        assert number(taken) == 0
        nursery.cancel_scope.cancel()
    assert q.statistics().spilled_at_stop == 4
    again = DiskQueue(DiskQueueSettings(directory=tmp_path))
    got = []
    while again.statistics().length:
        b = await again.get()
        assert b is not None
        got.append(b)
        again.ack(b)
    assert [number(b) for b in got] == [0, 1, 2, 3]
    assert got[1] == batch(1)
    await again.aclose()


async def test_run_ends_once_closed_and_drained(tmp_path: Path) -> None:
    """After close(), run() returns as soon as every batch has been taken and acked."""
    q = hybrid(tmp_path, spill_bytes=150)
    async with trio.open_nursery() as nursery:
        await nursery.start(q.run)
        for n in range(3):
            await q.put(batch(n))
        q.close()
        while (b := await q.get()) is not None:
            q.ack(b)
    assert q.statistics().spilled_at_stop == 0
    assert q.statistics().length == 0


async def run_load(tmp_path: Path, consumers: int) -> list[int]:
    """Four producers (25 batches each) and `consumers` consumers at once, spilling back and
    forth; the numbers in the order consumers received them."""
    q = hybrid(tmp_path, spill_bytes=400)
    rng = random.Random(7)
    taken: list[int] = []

    async def produce(p: int) -> None:
        for i in range(25):
            await q.put(batch(p * 1000 + i))
            if rng.random() < 0.3:
                await trio.lowlevel.checkpoint()

    async def consume() -> None:
        while (b := await q.get()) is not None:
            taken.append(number(b))
            if rng.random() < 0.5:
                await trio.lowlevel.checkpoint()
            q.ack(b)

    async with trio.open_nursery() as consuming:
        for _ in range(consumers):
            consuming.start_soon(consume)
        async with trio.open_nursery() as producers:
            for p in range(4):
                producers.start_soon(produce, p)
        q.close()
    await q.disk.aclose()
    return taken


ALL = sorted(p * 1000 + i for p in range(4) for i in range(25))


async def test_concurrent_puts_come_out_in_each_producers_order(tmp_path: Path) -> None:
    """Concurrent producers and a consumer: each producer's batches come out in its order, each
    exactly once, across memory and disk."""
    taken = await run_load(tmp_path, consumers=1)
    assert sorted(taken) == ALL
    for p in range(4):
        mine = [n for n in taken if n // 1000 == p]
        assert mine == sorted(mine)


async def test_concurrent_consumers_get_every_batch_exactly_once(tmp_path: Path) -> None:
    """Three consumers at once: every batch is delivered exactly once."""
    taken = await run_load(tmp_path, consumers=3)
    assert sorted(taken) == ALL


class HybridFIFO(RuleBasedStateMachine):
    """Any sequence of puts, gets and acks: batches come out in the order they went in, each
    once, and the counts in statistics() add up."""

    @initialize(spill=st.integers(100, 600))
    def setup(self, spill: int) -> None:
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        self.q = hybrid(Path(self.tmp.name), spill_bytes=spill)
        self.next = 0
        self.expected_next_out = 0
        self.in_flight: list[Batch] = []

    def teardown(self) -> None:
        trio.run(self.q.disk.aclose)
        self.tmp.cleanup()

    @rule(size=st.integers(50, 250))
    def put(self, size: int) -> None:
        trio.run(self.q.put, batch(self.next, size))
        self.next += 1

    @precondition(lambda self: self.q.statistics().length > 0)
    @rule()
    def get(self) -> None:
        b = trio.run(self.q.get)
        assert b is not None
        assert number(b) == self.expected_next_out
        self.expected_next_out += 1
        self.in_flight.append(b)

    @precondition(lambda self: self.in_flight)
    @rule(i=st.integers(0, 10))
    def ack(self, i: int) -> None:
        self.q.ack(self.in_flight.pop(i % len(self.in_flight)))

    @invariant()
    def counts_add_up(self) -> None:
        s = self.q.statistics()
        assert s.length == self.next - self.expected_next_out
        assert s.in_flight == len(self.in_flight)
        assert s.memory_batches + s.disk_batches == s.length


TestHybridFIFO = HybridFIFO.TestCase
TestHybridFIFO.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


def test_open_queue_builds_a_hybrid(tmp_path: Path) -> None:
    """mode: hybrid gives a HybridQueue whose memory part spills at spill_at of max_memory_bytes."""
    cfg = QueueConfig(mode="hybrid", dir=str(tmp_path), max_memory_bytes=1000, spill_at=0.5)
    q = open_queue(cfg, "exp")
    assert isinstance(q, HybridQueue)
    assert q.spill_bytes == 500
    assert q.disk.directory == tmp_path / "exp"
    trio.run(q.disk.aclose)
