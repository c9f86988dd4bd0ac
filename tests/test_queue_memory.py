"""Tests for service/queue/memory.py: the bounded in-memory queue between batcher and exporters.

Times are virtual (autojump_clock) and exact; cancellation tests assert that a batch is never half
in the queue (STYLE.md rule 13).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from service.config import QueueConfig
from service.pipeline.items import Batch
from service.queue import MemoryQueue, Queue, QueueStats


def batch(tag: str, size: int = 10, datapoints: int = 1) -> Batch:
    """A batch whose payload is `size` bytes starting with `tag` (so batches are told apart)."""
    payload = tag.encode().ljust(size, b".")
    assert len(payload) == size
    return Batch(
        payload=payload, encoding="snappy", series=1, datapoints=datapoints, raw_bytes=size
    )


class Recorder:
    """on_drop fake: remembers every batch the queue discarded."""

    def __init__(self) -> None:
        self.dropped: list[Batch] = []

    def __call__(self, b: Batch) -> None:
        self.dropped.append(b)


def make(
    max_batches: int = 100, max_bytes: int = 10_000, full_behavior: str = "block"
) -> tuple[MemoryQueue, Recorder]:
    rec = Recorder()
    cfg = QueueConfig(max_batches=max_batches, max_bytes=max_bytes, full_behavior=full_behavior)
    return MemoryQueue(cfg, rec), rec


async def drain(q: MemoryQueue) -> list[Batch]:
    """Everything left in a queue, in order, acked (the queue must be closed or it blocks)."""
    out = []
    while (b := await q.get()) is not None:
        q.ack(b)
        out.append(b)
    return out


def test_memory_queue_implements_the_interface() -> None:
    """MemoryQueue has every method of the Queue protocol."""
    q: Queue = make()[0]
    for name in ("put", "get", "ack", "close", "statistics"):
        assert callable(getattr(q, name))


async def test_fifo() -> None:
    """Batches come out in the order they went in."""
    q, _ = make()
    batches = [batch(str(i)) for i in range(5)]
    for b in batches:
        await q.put(b)
    got = [await q.get() for _ in batches]
    assert got == batches
    assert all(g is b for g, b in zip(got, batches))


async def test_get_waits_for_a_put(autojump_clock: trio.testing.MockClock) -> None:
    """A get on an empty queue returns as soon as a batch is put, at that virtual time."""
    q, _ = make()
    b = batch("a")
    got: list[tuple[float, Batch | None]] = []

    async def getter() -> None:
        b = await q.get()
        got.append((trio.current_time(), b))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(getter)
        await trio.sleep(3.0)
        await q.put(b)
    assert got == [(3.0, b)]


# ---- limits and full behaviour ----------------------------------------------------------------


async def test_block_by_count(autojump_clock: trio.testing.MockClock) -> None:
    """With max_batches=2 a third put waits until a get frees a slot, then completes at once."""
    q, rec = make(max_batches=2)
    a, b, c = batch("a"), batch("b"), batch("c")
    await q.put(a)
    await q.put(b)
    done: list[float] = []

    async def putter() -> None:
        await q.put(c)
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter)
        await trio.sleep(2.5)
        assert done == []
        assert q.statistics().length == 2
        assert await q.get() is a
    assert done == [2.5]
    assert [await q.get(), await q.get()] == [b, c]
    assert rec.dropped == []


async def test_block_by_bytes(autojump_clock: trio.testing.MockClock) -> None:
    """With max_bytes=25 and 10-byte batches, the third put waits for room in bytes."""
    q, _ = make(max_bytes=25)
    a, b, c = batch("a", 10), batch("b", 10), batch("c", 10)
    await q.put(a)
    await q.put(b)
    done: list[float] = []

    async def putter() -> None:
        await q.put(c)
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter)
        await trio.sleep(1.0)
        assert await q.get() is a
    assert done == [1.0]  # c was let in as soon as a left
    assert q.statistics().bytes == 20


async def test_byte_limit_is_inclusive() -> None:
    """Batches that fill max_bytes exactly all go in without waiting."""
    q, _ = make(max_bytes=30)
    with trio.fail_after(1):  # would block forever if the limit were exclusive
        for tag in "abc":
            await q.put(batch(tag, 10))
    assert q.statistics().bytes == 30


async def test_blocked_putters_go_in_in_order(autojump_clock: trio.testing.MockClock) -> None:
    """Several putters blocked on a full queue each get in as gets free room; nothing is lost."""
    q, _ = make(max_batches=1)
    first = batch("first")
    await q.put(first)
    later = [batch(f"p{i}") for i in range(3)]
    received: list[tuple[float, Batch | None]] = []

    async with trio.open_nursery() as nursery:
        for b in later:
            nursery.start_soon(q.put, b)
            await trio.testing.wait_all_tasks_blocked()
        for _ in range(4):
            await trio.sleep(1.0)
            b = await q.get()
            received.append((trio.current_time(), b))
            assert b is not None
            q.ack(b)
    assert received == [(1.0, first), (2.0, later[0]), (3.0, later[1]), (4.0, later[2])]
    assert q.statistics().length == 0


async def test_drop_oldest_by_count() -> None:
    """drop_oldest evicts the oldest batch to make room and reports it to on_drop and stats."""
    q, rec = make(max_batches=2, full_behavior="drop_oldest")
    a, b, c = batch("a", datapoints=3), batch("b", datapoints=5), batch("c", datapoints=7)
    await q.put(a)
    await q.put(b)
    await q.put(c)
    assert rec.dropped == [a]
    assert rec.dropped[0] is a
    stats = q.statistics()
    assert (stats.length, stats.dropped_batches, stats.dropped_datapoints) == (2, 1, 3)
    assert stats.datapoints == 12
    q.close()
    assert await drain(q) == [b, c]


async def test_drop_oldest_by_bytes_evicts_as_many_as_needed() -> None:
    """A big batch evicts several old ones until it fits, or until the queue is empty."""
    q, rec = make(max_bytes=30, full_behavior="drop_oldest")
    small = [batch(t, 10, datapoints=2) for t in "abc"]
    for b in small:
        await q.put(b)
    mid = batch("mid", 20, datapoints=4)
    await q.put(mid)  # 30 + 20 > 30: evict a and b (10 + 20 fits)
    assert rec.dropped == small[:2]
    huge = batch("huge", 100, datapoints=9)
    await q.put(huge)  # never fits: evicts everything, then goes in alone
    assert rec.dropped == [*small, mid]
    stats = q.statistics()
    assert (stats.length, stats.bytes, stats.datapoints) == (1, 100, 9)
    assert (stats.dropped_batches, stats.dropped_datapoints) == (4, 10)
    q.close()
    assert await drain(q) == [huge]


async def test_drop_newest() -> None:
    """drop_newest refuses the incoming batch, reports it, and leaves the queue as it was."""
    q, rec = make(max_batches=2, full_behavior="drop_newest")
    a, b, c, d = (batch(t, datapoints=n) for t, n in zip("abcd", (1, 2, 3, 4)))
    for x in (a, b, c, d):
        await q.put(x)
    assert rec.dropped == [c, d]
    stats = q.statistics()
    assert (stats.length, stats.dropped_batches, stats.dropped_datapoints) == (2, 2, 7)
    q.close()
    assert await drain(q) == [a, b]


@pytest.mark.parametrize("behavior", ["block", "drop_oldest", "drop_newest"])
async def test_a_batch_larger_than_max_bytes_goes_in_alone(behavior: str) -> None:
    """A batch bigger than max_bytes still goes into an empty queue, whatever full_behavior."""
    q, rec = make(max_bytes=10, full_behavior=behavior)
    big = batch("big", 50)
    with trio.fail_after(1):
        await q.put(big)
    assert q.statistics().bytes == 50
    assert rec.dropped == []
    assert await q.get() is big


async def test_an_oversized_batch_waits_for_an_empty_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """In block mode an oversized batch waits until the queue is empty, then goes in."""
    q, _ = make(max_bytes=10)
    a, big = batch("a", 5), batch("big", 50)
    await q.put(a)
    done: list[float] = []

    async def putter() -> None:
        await q.put(big)
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter)
        await trio.sleep(4.0)
        assert await q.get() is a
    assert done == [4.0]
    assert q.statistics().bytes == 50


# ---- close ------------------------------------------------------------------------------------


async def test_close_drains_then_returns_none() -> None:
    """After close, get returns what is left in order, then None, and keeps returning None."""
    q, _ = make()
    a, b = batch("a"), batch("b")
    await q.put(a)
    await q.put(b)
    q.close()
    assert q.statistics().closed is True
    assert await q.get() is a
    assert await q.get() is b
    assert await q.get() is None
    assert await q.get() is None


async def test_put_after_close_raises() -> None:
    """put after close raises trio.ClosedResourceError and leaves the queue unchanged."""
    q, rec = make()
    q.close()
    with pytest.raises(trio.ClosedResourceError):
        await q.put(batch("a"))
    assert q.statistics().length == 0
    assert rec.dropped == []


async def test_close_wakes_a_waiting_getter(autojump_clock: trio.testing.MockClock) -> None:
    """A get waiting on an empty queue returns None when the queue is closed, at that time."""
    q, _ = make()
    got: list[tuple[float, Batch | None]] = []

    async def getter() -> None:
        b = await q.get()
        got.append((trio.current_time(), b))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(getter)
        nursery.start_soon(getter)
        await trio.sleep(2.0)
        q.close()
    assert got == [(2.0, None), (2.0, None)]


async def test_close_wakes_a_blocked_putter(autojump_clock: trio.testing.MockClock) -> None:
    """A put blocked on a full queue raises ClosedResourceError when the queue is closed; its
    batch is not in the queue and was not reported as dropped."""
    q, rec = make(max_batches=1)
    a = batch("a")
    await q.put(a)
    raised: list[float] = []

    async def putter() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await q.put(batch("b"))
        raised.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter)
        await trio.sleep(1.5)
        q.close()
    assert raised == [1.5]
    assert rec.dropped == []
    assert await drain(q) == [a]


# ---- in flight and statistics -----------------------------------------------------------------


async def test_in_flight_between_get_and_ack() -> None:
    """A batch counts as in flight from get until ack; the queue length drops at get."""
    q, _ = make()
    a, b = batch("a", datapoints=4), batch("b", datapoints=6)
    await q.put(a)
    await q.put(b)
    ga = await q.get()
    gb = await q.get()
    stats = q.statistics()
    assert (stats.length, stats.in_flight, stats.in_flight_datapoints) == (0, 2, 10)
    assert ga is not None and gb is not None
    q.ack(gb)
    stats = q.statistics()
    assert (stats.in_flight, stats.in_flight_datapoints) == (1, 4)
    q.ack(ga)
    stats = q.statistics()
    assert (stats.in_flight, stats.in_flight_datapoints) == (0, 0)


async def test_in_flight_does_not_use_room() -> None:
    """Room is freed at get, not at ack: a taken batch does not count against the limits."""
    q, _ = make(max_batches=1)
    await q.put(batch("a"))
    await q.get()
    with trio.fail_after(1):
        await q.put(batch("b"))
    assert q.statistics().in_flight == 1


async def test_statistics_are_exact() -> None:
    """statistics() is a frozen snapshot of every counter."""
    q, _ = make(max_batches=3, max_bytes=100, full_behavior="drop_oldest")
    assert q.statistics() == QueueStats(
        length=0,
        bytes=0,
        datapoints=0,
        in_flight=0,
        in_flight_datapoints=0,
        max_batches=3,
        max_bytes=100,
        dropped_batches=0,
        dropped_datapoints=0,
        closed=False,
    )
    for tag, size, dps in [("a", 10, 1), ("b", 20, 2), ("c", 30, 3), ("d", 40, 4)]:
        await q.put(batch(tag, size, dps))  # d evicts a by count
    taken = await q.get()  # b
    assert taken is not None
    q.close()
    snapshot = q.statistics()
    assert snapshot == QueueStats(
        length=2,
        bytes=70,
        datapoints=7,
        in_flight=1,
        in_flight_datapoints=2,
        max_batches=3,
        max_bytes=100,
        dropped_batches=1,
        dropped_datapoints=1,
        closed=True,
    )
    q.ack(taken)
    assert snapshot.in_flight == 1  # a snapshot does not change afterwards
    with pytest.raises(AttributeError):
        snapshot.length = 0  # type: ignore[misc]


async def test_repr_is_one_useful_line() -> None:
    """repr shows length, bytes, in-flight count and whether the queue is closed."""
    q, _ = make()
    await q.put(batch("a", 10))
    await q.put(batch("b", 5))
    await q.get()
    assert repr(q) == "<MemoryQueue 1 batches, 5 bytes, 1 in flight>"
    q.close()
    assert repr(q) == "<MemoryQueue 1 batches, 5 bytes, 1 in flight, closed>"


# ---- cancellation -----------------------------------------------------------------------------


async def test_cancelled_get_loses_nothing(autojump_clock: trio.testing.MockClock) -> None:
    """Cancelling a get that waits on an empty queue takes nothing: a batch put afterwards stays
    in the queue for the next get, and nothing is in flight."""
    q, _ = make()
    with trio.move_on_after(1.0) as scope:
        await q.get()
    assert scope.cancelled_caught
    a = batch("a")
    await q.put(a)
    stats = q.statistics()
    assert (stats.length, stats.in_flight) == (1, 0)
    assert await q.get() is a


async def test_get_with_a_batch_ready_is_not_cancelled() -> None:
    """A get that finds a batch returns it even inside a cancelled scope: once taken, a batch is
    handed over, never dropped on the floor."""
    q, _ = make()
    a = batch("a")
    await q.put(a)
    got = None
    with trio.CancelScope() as scope:
        scope.cancel()
        got = await q.get()
    assert got is a
    assert q.statistics().in_flight == 1


async def test_put_with_room_is_not_cancelled() -> None:
    """A put into a queue with room completes even inside a cancelled scope: it is never half
    done."""
    q, _ = make()
    a = batch("a")
    with trio.CancelScope() as scope:
        scope.cancel()
        await q.put(a)
    assert not scope.cancelled_caught
    assert q.statistics().length == 1


async def test_cancelled_blocked_put_leaves_no_trace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelling a put blocked on a full queue raises Cancelled; its batch never enters the
    queue, even when room is freed later, and it is not reported as dropped."""
    q, rec = make(max_batches=1)
    a, b = batch("a"), batch("b")
    await q.put(a)
    with trio.move_on_after(2.0) as scope:
        await q.put(b)
    assert scope.cancelled_caught
    assert trio.current_time() == 2.0
    assert await q.get() is a
    q.close()
    assert await drain(q) == []
    assert rec.dropped == []
    assert q.statistics().dropped_batches == 0


async def test_cancel_racing_with_room_never_half_puts() -> None:
    """A blocked put cancelled just before or at any of a few checkpoints after the moment room
    is freed either raised Cancelled with its batch absent, or returned with its batch in the
    queue; never both, never neither, and nothing is reported as dropped."""
    outcomes = set()
    for cancel_at in (-1, 0, 1, 2):  # -1: cancel, then free room; n: free room, n checkpoints
        for _ in range(5):
            q, rec = make(max_batches=1)
            a, b = batch("a"), batch("b")
            await q.put(a)
            result: list[str] = []
            scope = trio.CancelScope()

            async def putter(scope=scope, b=b, result=result, q=q) -> None:
                with scope:
                    await q.put(b)
                    result.append("returned")
                if scope.cancelled_caught:
                    result.append("cancelled")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(putter)
                await trio.testing.wait_all_tasks_blocked()
                if cancel_at < 0:
                    scope.cancel()
                assert await q.get() is a
                for _ in range(cancel_at):
                    await trio.lowlevel.checkpoint()
                scope.cancel()
            q.close()
            left = await drain(q)
            assert result in (["returned"], ["cancelled"])
            assert left == ([b] if result == ["returned"] else [])
            assert rec.dropped == []
            outcomes.add(result[0])
    assert outcomes == {"returned", "cancelled"}  # both sides of the race were exercised


async def test_cancel_racing_with_a_put_never_loses_the_batch() -> None:
    """A waiting get cancelled just before or at any of a few checkpoints after a batch arrives
    either returned the batch (now in flight) or raised Cancelled with the batch still queued."""
    outcomes = set()
    for cancel_at in (-1, 0, 1, 2):  # -1: cancel, then put; n: put, n checkpoints, cancel
        for _ in range(5):
            q, _ = make()
            a = batch("a")
            result: list[Batch | str | None] = []
            scope = trio.CancelScope()

            async def getter(scope=scope, result=result, q=q) -> None:
                with scope:
                    result.append(await q.get())
                if scope.cancelled_caught:
                    result.append("cancelled")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(getter)
                await trio.testing.wait_all_tasks_blocked()
                if cancel_at < 0:
                    scope.cancel()
                await q.put(a)
                for _ in range(cancel_at):
                    await trio.lowlevel.checkpoint()
                scope.cancel()
            stats = q.statistics()
            if result == ["cancelled"]:
                assert (stats.length, stats.in_flight) == (1, 0)
                outcomes.add("cancelled")
            else:
                assert result == [a]
                assert (stats.length, stats.in_flight) == (0, 1)
                outcomes.add("returned")
    assert outcomes == {"returned", "cancelled"}  # both sides of the race were exercised
