"""Tests for service/pipeline/batcher.py, driven through a memory channel into real MemoryQueues.

Time is virtual (autojump_clock): items are sent at exact times and every batch is recorded with
the virtual time at which it came out of the queue.
"""

from __future__ import annotations

import attrs
import trio
import trio.testing

from service._proto.prometheus import remote_pb2, types_pb2
from service.codec import compression, prw
from service.config import BatchConfig, QueueConfig
from service.pipeline.batcher import Batcher
from service.pipeline.budget import ByteBudget
from service.pipeline.items import Batch, Ingested
from service.queue import MemoryQueue
from service.telemetry.metrics import Metrics


def item(*names: str, samples: int = 1) -> Ingested:
    """One ingested request with a series per name, each with `samples` float samples."""
    req = remote_pb2.WriteRequest(
        timeseries=[
            types_pb2.TimeSeries(
                labels=[types_pb2.Label(name="__name__", value=n)],
                samples=[types_pb2.Sample(value=float(i), timestamp=i) for i in range(samples)],
            )
            for n in names
        ]
    )
    raw = req.SerializeToString()
    return Ingested(
        compression.compress(raw, "snappy"),
        raw_bytes=len(raw),
        series=len(names),
        datapoints=len(names) * samples,
    )


def raw_of(it: Ingested) -> bytes:
    """The serialized WriteRequest an item carries."""
    return compression.decompress(it.block, "snappy", it.raw_bytes)


def names_in(batch: Batch) -> list[str]:
    """The series names in a batch's payload, in order."""
    raw = compression.decompress(batch.payload, batch.encoding, batch.raw_bytes)
    assert len(raw) == batch.raw_bytes
    req, counts = prw.decode(raw)
    assert (counts.series, counts.datapoints) == (batch.series, batch.datapoints)
    return [ts.labels[0].value for ts in req.timeseries]


def queue() -> MemoryQueue:
    def never(b: Batch) -> None:
        raise AssertionError(f"dropped {b!r}")

    return MemoryQueue(QueueConfig(), never)


async def consume(q: MemoryQueue, out: list[tuple[float, Batch]]) -> None:
    """Take every batch until the queue closes, recording when it arrived."""
    while (b := await q.get()) is not None:
        out.append((trio.current_time(), b))
        q.ack(b)


class Harness:
    """A batcher reading from a fresh channel, writing to `n_queues` recorded queues."""

    def __init__(self, cfg: BatchConfig, n_queues: int = 1, **kwargs: object) -> None:
        self.metrics = Metrics()
        self.queues = [queue() for _ in range(n_queues)]
        self.batcher = Batcher(cfg, list(self.queues), metrics=self.metrics, **kwargs)
        self.tx, self.rx = trio.open_memory_channel[Ingested](0)
        self.got: list[list[tuple[float, Batch]]] = [[] for _ in self.queues]

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.batcher.run, self.rx)
        for q, out in zip(self.queues, self.got):
            nursery.start_soon(consume, q, out)

    def sample(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"pipeline": "prw"})


async def test_flush_after_interval_from_first_item(autojump_clock: trio.testing.MockClock) -> None:
    """A batch is flushed interval_s after its first item, with everything that arrived in
    between; the next batch's interval starts at its own first item."""
    h = Harness(BatchConfig(interval_s=1.0))
    async with trio.open_nursery() as nursery:
        h.start(nursery)
        async with h.tx:
            await h.tx.send(item("a"))  # t=0
            await trio.sleep(0.25)
            await h.tx.send(item("b"))  # t=0.25
            await trio.sleep(1.25)
            await h.tx.send(item("c"))  # t=1.5
            await trio.sleep(1.5)
            await h.tx.send(item("d", "e"))  # t=3.0
            await trio.sleep(0.5)
        # input closed at t=3.5: the open batch is flushed at once
    got = h.got[0]
    assert [t for t, _ in got] == [1.0, 2.5, 3.5]
    assert [names_in(b) for _, b in got] == [["a", "b"], ["c"], ["d", "e"]]


async def test_idle_batcher_flushes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    """With no input nothing is flushed, however long it waits; closing then flushes nothing."""
    h = Harness(BatchConfig(interval_s=1.0))
    async with trio.open_nursery() as nursery:
        h.start(nursery)
        await trio.sleep(100.0)
        await h.tx.aclose()
    assert h.got == [[]]
    assert h.sample("governor_batch_series_count") == 0.0


async def test_flush_on_max_series(autojump_clock: trio.testing.MockClock) -> None:
    """Reaching max_series flushes at once, without waiting for the interval."""
    h = Harness(BatchConfig(max_series=4, interval_s=1.0))
    async with trio.open_nursery() as nursery:
        h.start(nursery)
        async with h.tx:
            await h.tx.send(item("a", "b"))  # t=0: 2 series
            await trio.sleep(0.5)
            await h.tx.send(item("c", "d"))  # t=0.5: 4 series, flush now
            await trio.sleep(0.25)
            await h.tx.send(item("e", "f", "g", "h", "i"))  # t=0.75: 5 series, flush now
            await trio.sleep(0.25)
            await h.tx.send(item("j"))  # t=1.0: waits for its interval
            await trio.sleep(5.0)
    got = h.got[0]
    assert [t for t, _ in got] == [0.5, 0.75, 2.0]
    assert [names_in(b) for _, b in got] == [
        ["a", "b", "c", "d"],
        ["e", "f", "g", "h", "i"],
        ["j"],
    ]
    assert [b.series for _, b in got] == [4, 5, 1]


async def test_flush_before_an_item_that_would_exceed_max_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An item that would push the open batch past max_bytes flushes the batch first, then
    starts the next batch (and its interval) with that item."""
    a, b, c = item("a"), item("b"), item("c")
    size = a.raw_bytes
    assert b.raw_bytes == c.raw_bytes == size
    h = Harness(BatchConfig(max_bytes=2 * size + 1, interval_s=1.0))
    async with trio.open_nursery() as nursery:
        h.start(nursery)
        async with h.tx:
            await h.tx.send(a)  # t=0
            await trio.sleep(0.25)
            await h.tx.send(b)  # t=0.25: 2*size fits
            await trio.sleep(0.25)
            await h.tx.send(c)  # t=0.5: 3*size does not: flush a+b, start c
            await trio.sleep(5.0)
    got = h.got[0]
    assert [t for t, _ in got] == [0.5, 1.5]
    assert [names_in(x) for _, x in got] == [["a", "b"], ["c"]]
    assert [x.raw_bytes for _, x in got] == [2 * size, size]


async def test_reaching_max_bytes_exactly_flushes(autojump_clock: trio.testing.MockClock) -> None:
    """A batch that reaches max_bytes exactly is flushed at once."""
    a, b = item("a"), item("b")
    h = Harness(BatchConfig(max_bytes=a.raw_bytes + b.raw_bytes, interval_s=1.0))
    async with trio.open_nursery() as nursery:
        h.start(nursery)
        async with h.tx:
            await h.tx.send(a)
            await trio.sleep(0.5)
            await h.tx.send(b)
            await trio.sleep(5.0)
    assert [(t, names_in(x)) for t, x in h.got[0]] == [(0.5, ["a", "b"])]


async def test_an_item_larger_than_max_bytes_goes_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An item bigger than max_bytes flushes the open batch, then is flushed alone at once."""
    small, big = item("small"), item(*(f"s{i}" for i in range(20)))
    h = Harness(BatchConfig(max_bytes=small.raw_bytes + 1, interval_s=1.0))
    async with trio.open_nursery() as nursery:
        h.start(nursery)
        async with h.tx:
            await h.tx.send(small)
            await trio.sleep(0.5)
            await h.tx.send(big)
            await trio.sleep(5.0)
    got = h.got[0]
    assert [t for t, _ in got] == [0.5, 0.5]
    assert [names_in(x) for _, x in got] == [["small"], [f"s{i}" for i in range(20)]]


async def test_batch_payload_and_counts(autojump_clock: trio.testing.MockClock) -> None:
    """The payload is the snappy-compressed concatenation of the items, in order; series,
    datapoints and raw_bytes are the sums over the items."""
    items = [item("a", "b", samples=3), item("c", samples=2), item("d", "e", "f", samples=1)]
    h = Harness(BatchConfig(interval_s=1.0))
    async with trio.open_nursery() as nursery:
        h.start(nursery)
        async with h.tx:
            for it in items:
                await h.tx.send(it)
    ((t, b),) = h.got[0]
    raw = b"".join(raw_of(it) for it in items)
    assert t == 0.0
    assert b.encoding == "snappy"
    assert compression.decompress(b.payload, "snappy", len(raw)) == raw
    assert (b.series, b.datapoints, b.raw_bytes) == (6, 11, len(raw))
    assert names_in(b) == ["a", "b", "c", "d", "e", "f"]


async def test_blocks_are_joined_without_recompression(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The payload is one snappy block: the new total length, then each item's element stream
    end to end, byte for byte as the items carried them."""
    items = [item("a", "b"), item("c"), item("d", samples=3)]
    h = Harness(BatchConfig())
    async with trio.open_nursery() as nursery:
        h.start(nursery)
        async with h.tx:
            for it in items:
                await h.tx.send(it)
    ((_, b),) = h.got[0]
    streams = b"".join(bytes(compression.snappy_body(it.block)) for it in items)
    assert b.payload.endswith(streams)
    assert b.payload[: len(b.payload) - len(streams)] == bytes([b.raw_bytes])  # a 1-byte varint
    assert names_in(b) == ["a", "b", "c", "d"]


async def test_fan_out_puts_the_same_batch_in_every_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every queue receives every batch, as the very same object, at the same time."""
    h = Harness(BatchConfig(interval_s=2.0), n_queues=3)
    async with trio.open_nursery() as nursery:
        h.start(nursery)
        async with h.tx:
            await h.tx.send(item("a"))
            await trio.sleep(3.0)
            await h.tx.send(item("b"))
    first, *others = h.got
    assert [(t, names_in(b)) for t, b in first] == [(2.0, ["a"]), (3.0, ["b"])]
    for other in others:
        assert [t for t, _ in other] == [2.0, 3.0]
        assert all(x is y for (_, x), (_, y) in zip(first, other, strict=True))


async def test_closing_input_flushes_and_closes_every_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When the input channel closes, the open batch is flushed right then and every queue is
    closed, so the consumers see the batch and then the end."""
    h = Harness(BatchConfig(interval_s=10.0), n_queues=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.batcher.run, h.rx)
        await h.tx.send(item("a"))
        await trio.sleep(0.5)
        await h.tx.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert h.batcher.pending_datapoints == 0
    for q in h.queues:
        stats = q.statistics()
        assert (stats.closed, stats.length) == (True, 1)
        b = await q.get()
        assert b is not None
        assert names_in(b) == ["a"]
        q.ack(b)
        assert await q.get() is None
    assert trio.current_time() == 0.5


async def test_pending_datapoints_until_flush(autojump_clock: trio.testing.MockClock) -> None:
    """pending_datapoints counts what the open batch holds and is zero after a flush."""
    h = Harness(BatchConfig(interval_s=1.0))
    async with trio.open_nursery() as nursery:
        h.start(nursery)
        async with h.tx:
            await h.tx.send(item("a", "b", samples=2))
            await h.tx.send(item("c", samples=5))
            await trio.testing.wait_all_tasks_blocked()
            assert h.batcher.pending_datapoints == 9
            await trio.sleep(1.0)
            await trio.testing.wait_all_tasks_blocked()  # the interval also ends at t=1.0
            assert h.batcher.pending_datapoints == 0
            assert [t for t, _ in h.got[0]] == [1.0]


async def test_cancelled_batcher_still_closes_its_queues(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A hard stop (cancellation) closes every queue; what was pending stays counted in
    pending_datapoints, so the caller can report it as lost."""
    h = Harness(BatchConfig(interval_s=10.0), n_queues=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.batcher.run, h.rx)
        await h.tx.send(item("a", samples=4))
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert [q.statistics().closed for q in h.queues] == [True, True]
    assert [q.statistics().length for q in h.queues] == [0, 0]
    assert h.batcher.pending_datapoints == 4


async def test_a_full_queue_holds_the_batcher_back(autojump_clock: trio.testing.MockClock) -> None:
    """With a blocking queue full, a flush waits until a get makes room, and meanwhile the
    batcher takes no new input (backpressure reaches the sender); nothing is lost."""
    q = MemoryQueue(QueueConfig(max_batches=1, full_behavior="block"), lambda b: None)
    batcher = Batcher(BatchConfig(max_series=1), [q], metrics=Metrics())
    tx, rx = trio.open_memory_channel[Ingested](0)
    sent: list[float] = []
    got: list[tuple[float, list[str]]] = []

    async def producer() -> None:
        async with tx:
            for name in "abc":
                await tx.send(item(name))
                sent.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, rx)
        nursery.start_soon(producer)
        await trio.sleep(2.0)
        # a is queued, b's flush is blocked in put, c is not taken from the channel.
        assert sent == [0.0, 0.0]
        assert batcher.pending_datapoints == 0  # b is no longer open...
        assert batcher.lost_datapoints(0) == 1  # ...but the queue does not have it yet
        while (b := await q.get()) is not None:
            got.append((trio.current_time(), names_in(b)))
            q.ack(b)
            await trio.sleep(1.0)
    assert sent == [0.0, 0.0, 2.0]
    assert got == [(2.0, ["a"]), (3.0, ["b"]), (4.0, ["c"])]


async def test_lost_datapoints_during_a_blocked_fan_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While a flush waits on the second of two queues, only that queue (and any after it) would
    lose the batch on a hard stop; the open batch counts for every queue."""
    q0 = MemoryQueue(QueueConfig(), lambda b: None)
    q1 = MemoryQueue(QueueConfig(max_batches=1, full_behavior="block"), lambda b: None)
    await q1.put(Batch(b"x", "snappy", 1, 1, 1))  # q1 is full
    batcher = Batcher(BatchConfig(max_series=2), [q0, q1], metrics=Metrics())
    tx, rx = trio.open_memory_channel[Ingested](1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, rx)
        await tx.send(item("a", "b", samples=3))  # 6 datapoints, flushed at once
        await tx.send(item("c", samples=2))  # 2 datapoints, waits in the channel
        await trio.sleep(1.0)
        assert (q0.statistics().length, q1.statistics().length) == (1, 1)
        assert (batcher.lost_datapoints(0), batcher.lost_datapoints(1)) == (0, 6)
        await q1.get()  # room: the flush completes, c becomes the open batch
        await trio.testing.wait_all_tasks_blocked()
        assert (batcher.lost_datapoints(0), batcher.lost_datapoints(1)) == (2, 2)
        nursery.cancel_scope.cancel()
    assert [q0.statistics().closed, q1.statistics().closed] == [True, True]


async def test_flush_releases_the_ingest_budget(autojump_clock: trio.testing.MockClock) -> None:
    """The bytes of the open batch are given back to the ingest budget when it is flushed."""
    a, b = item("a"), item("b", "c")
    budget = ByteBudget(1000)
    q = queue()
    batcher = Batcher(BatchConfig(interval_s=1.0), [q], metrics=Metrics(), budget=budget)
    tx, rx = trio.open_memory_channel[Ingested](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, rx)
        async with tx:
            for it in (a, b):
                await budget.acquire(len(it.block))  # what a receiver does before sending
                await tx.send(it)
            await trio.sleep(0.5)
            assert budget.used == len(a.block) + len(b.block)
            await trio.sleep(0.5)
            await trio.testing.wait_all_tasks_blocked()
            assert budget.used == 0
    assert q.statistics().length == 1


async def test_batch_metrics(autojump_clock: trio.testing.MockClock) -> None:
    """Each flush observes the batch's series and uncompressed bytes once, labelled by pipeline."""
    first = [item("a", "b", "c")]
    second = [item("d"), item("e", "f", "g", "h")]
    h = Harness(BatchConfig(interval_s=1.0))
    async with trio.open_nursery() as nursery:
        h.start(nursery)
        async with h.tx:
            for it in first:
                await h.tx.send(it)
            await trio.sleep(2.0)
            for it in second:
                await h.tx.send(it)
    raw1 = sum(it.raw_bytes for it in first)
    raw2 = sum(it.raw_bytes for it in second)
    assert raw1 <= 64 < raw2 <= 256  # so the bucket counts below are as written
    assert h.sample("governor_batch_series_count") == 2.0
    assert h.sample("governor_batch_series_sum") == 8.0
    reg = h.metrics.registry
    bucket = "governor_batch_series_bucket"
    assert reg.get_sample_value(bucket, {"pipeline": "prw", "le": "4.0"}) == 1.0
    assert reg.get_sample_value(bucket, {"pipeline": "prw", "le": "16.0"}) == 2.0
    assert h.sample("governor_batch_bytes_count") == 2.0
    assert h.sample("governor_batch_bytes_sum") == float(raw1 + raw2)
    bucket = "governor_batch_bytes_bucket"
    assert reg.get_sample_value(bucket, {"pipeline": "prw", "le": "64.0"}) == 1.0
    assert reg.get_sample_value(bucket, {"pipeline": "prw", "le": "256.0"}) == 2.0


async def test_pipeline_label(autojump_clock: trio.testing.MockClock) -> None:
    """The pipeline name given to the batcher is the metrics' label."""
    metrics = Metrics()
    q = queue()
    batcher = Batcher(BatchConfig(), [q], metrics=metrics, pipeline="otlp")
    tx, rx = trio.open_memory_channel[Ingested](1)
    async with tx:
        await tx.send(item("a"))
    await batcher.run(rx)
    reg = metrics.registry
    assert reg.get_sample_value("governor_batch_series_count", {"pipeline": "otlp"}) == 1.0
    assert reg.get_sample_value("governor_batch_series_count", {"pipeline": "prw"}) is None


async def test_done_is_set_only_once_the_batch_is_in_every_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An item's `done` event is set when the batch holding it has been put into every queue:
    not at hand-over, and not while a full (blocking) queue holds the flush back."""
    full = MemoryQueue(QueueConfig(max_batches=1, full_behavior="block"))
    free = MemoryQueue(QueueConfig())
    await full.put((await _one_batch())[0])  # fills it
    batcher = Batcher(BatchConfig(interval_s=1.0), [free, full], metrics=Metrics())
    tx, rx = trio.open_memory_channel[Ingested](0)
    it = attrs.evolve(item("a"), done=trio.Event())
    set_at: list[float] = []

    async def watch() -> None:
        assert it.done is not None
        await it.done.wait()
        set_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, rx)
        nursery.start_soon(watch)
        await tx.send(it)
        await trio.sleep(3.0)  # flushed at t=1: in `free`, blocked on `full`
        assert set_at == []
        assert free.statistics().length == 1
        taken = await full.get()  # t=3: room in `full`
        assert taken is not None
        full.ack(taken)
        await trio.sleep(0.5)
        assert set_at == [3.0]
        await tx.aclose()


async def _one_batch() -> tuple[Batch, list[str]]:
    """A batch as the batcher makes it, from one item."""
    q = queue()
    b = Batcher(BatchConfig(interval_s=0.1), [q], metrics=Metrics())
    tx, rx = trio.open_memory_channel[Ingested](1)
    await tx.send(item("x"))
    await tx.aclose()
    await b.run(rx)
    batch = await q.get()
    assert batch is not None
    return batch, names_in(batch)


async def test_waiting_clients_are_flushed_ack_linger_s_after_nothing_more_is_ready(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Items whose senders wait for the queue (done events) are flushed ack_linger_s after no
    further item is ready in the channel, not after interval_s: what arrives together goes out
    together (group commit); items without done events still wait for the interval."""
    q = queue()
    batcher = Batcher(BatchConfig(interval_s=5.0, ack_linger_s=0.5), [q], metrics=Metrics())
    tx, rx = trio.open_memory_channel[Ingested](10)
    waiting = [attrs.evolve(item(n), done=trio.Event()) for n in "abc"]
    got: list[tuple[float, list[str]]] = []

    async def consume_all() -> None:
        while (b := await q.get()) is not None:
            got.append((trio.current_time(), names_in(b)))
            q.ack(b)

    async with trio.open_nursery() as nursery:
        for it in waiting[:2]:
            tx.send_nowait(it)  # both buffered before the batcher runs
        nursery.start_soon(batcher.run, rx)
        nursery.start_soon(consume_all)
        await trio.sleep(1.0)
        await tx.send(waiting[2])
        await trio.sleep(1.0)
        await tx.send(item("plain"))  # nobody waits on it: the interval applies
        await trio.sleep(10.0)
        await tx.aclose()
    assert got == [(0.5, ["a", "b"]), (1.5, ["c"]), (7.0, ["plain"])]
    assert all(it.done is not None and it.done.is_set() for it in waiting)
