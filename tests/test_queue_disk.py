"""Tests for service/queue/disk.py: the persistent queue between batcher and exporters.

Real files in tmp_path. Most tests replace fsync with a recording fake (no thread, so virtual time
stays exact under autojump_clock and fsyncs can be counted and held); a few use the real one.
Cancellation tests assert that a batch is never half in the queue (STYLE.md rule 13).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing

from service.pipeline.items import Batch
from service.queue import Queue, QueueStats, segments
from service.queue.disk import DiskQueue, DiskQueueSettings, DiskQueueStats, QueueLockedError

SEG0 = "00000000000000000000.seg"


def batch(tag: str, size: int = 10, datapoints: int = 1) -> Batch:
    """A batch whose payload is `size` bytes starting with `tag` (so batches are told apart)."""
    payload = tag.encode().ljust(size, b".")
    assert len(payload) == size
    return Batch(
        payload=payload, encoding="snappy", series=1, datapoints=datapoints, raw_bytes=size
    )


L = len(segments.encode_record(batch("x")))  # bytes on disk of one 10-byte batch


def test_record_length_of_a_small_batch() -> None:
    """A 10-byte snappy batch takes 57 bytes on disk: 16 header + 25 fixed body fields + 6
    (encoding name) + 10 payload."""
    assert L == 57


class Recorder:
    """on_drop fake: remembers every batch the queue discarded."""

    def __init__(self) -> None:
        self.dropped: list[Batch] = []

    def __call__(self, b: Batch) -> None:
        self.dropped.append(b)


class FakeFsync:
    """fsync fake: records (virtual time, name of the file) per call, '<dir>' for the queue
    directory; while `gate` is set to an unset Event, each call waits for it."""

    def __init__(self, directory: Path, real: bool = False) -> None:
        self.directory = directory
        self.real = real
        self.calls: list[tuple[float, str]] = []
        self.gate: trio.Event | None = None

    async def __call__(self, fd: int) -> None:
        if self.gate is not None:
            await self.gate.wait()
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        self.calls.append((trio.current_time(), "<dir>" if path == self.directory else path.name))
        if self.real:
            os.fsync(fd)

    @property
    def names(self) -> list[str]:
        return [name for _, name in self.calls]


def make(
    directory: Path, fsync: FakeFsync | None = None, **settings: object
) -> tuple[DiskQueue, Recorder]:
    rec = Recorder()
    return DiskQueue(DiskQueueSettings(directory, **settings), rec, fsync=fsync), rec  # type: ignore[arg-type]


async def drain(q: DiskQueue) -> list[Batch]:
    """Everything left in a queue, in order, acked (the queue must be closed or it blocks)."""
    out = []
    while (b := await q.get()) is not None:
        q.ack(b)
        out.append(b)
    return out


def size(path: Path) -> int:
    return path.stat().st_size


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_disk_queue_implements_the_interface(tmp_path: Path) -> None:
    """DiskQueue has every method of the Queue protocol, and its statistics are QueueStats."""
    q: Queue = make(tmp_path)[0]
    for name in ("put", "get", "ack", "close", "statistics"):
        assert callable(getattr(q, name))
    assert isinstance(q.statistics(), QueueStats)


def test_settings_defaults_and_validation(tmp_path: Path) -> None:
    """Defaults: 1 GiB, 64 MiB segments, block, no durable_ack, 1 s sync; bad values raise."""
    s = DiskQueueSettings(str(tmp_path))  # type: ignore[arg-type]
    assert (s.directory, s.max_bytes, s.segment_bytes) == (tmp_path, 2**30, 2**26)
    assert (s.full_behavior, s.durable_ack, s.sync_interval_s) == ("block", False, 1.0)
    with pytest.raises(ValueError, match="segment_bytes must be positive"):
        DiskQueueSettings(tmp_path, segment_bytes=0)
    with pytest.raises(ValueError, match="full_behavior"):
        DiskQueueSettings(tmp_path, full_behavior="drop_all")  # type: ignore[arg-type]


# ---- round trip, restart, acks ----------------------------------------------------------------


async def test_fifo_round_trip_recreates_batches_exactly(tmp_path: Path) -> None:
    """Batches come out in the order they went in, re-created from disk field for field (payload,
    encoding, series, datapoints, raw_bytes), also across a close and reopen."""
    batches = [
        Batch(payload=b"", encoding="snappy", series=0, datapoints=0, raw_bytes=0),
        Batch(payload=bytes(range(256)) * 40, encoding="zstd", series=7, datapoints=9, raw_bytes=1),
        Batch(payload=b"\xb1" * 100, encoding="gzip", series=2**40, datapoints=2**50, raw_bytes=3),
        batch("d", 5000, datapoints=12),
    ]
    q, _ = make(tmp_path / "q")
    for b in batches:
        await q.put(b)
    got = [await q.get() for _ in batches]
    assert got == batches
    assert all(g is not b for g, b in zip(got, batches))  # read back, not the same objects
    await q.aclose()
    q, _ = make(tmp_path / "q")
    q.close()
    assert await drain(q) == batches


async def test_restart_resumes_from_the_reader_position(tmp_path: Path) -> None:
    """After close and reopen, acked batches before the first unacked one are gone; the unacked
    one and everything after it, acked or not, is delivered again (at least once)."""
    q, _ = make(tmp_path)
    b = [batch(str(i), datapoints=i) for i in range(5)]
    for x in b:
        await q.put(x)
    taken = [await q.get() for _ in range(3)]
    q.ack(taken[0])
    q.ack(taken[2])
    await q.aclose()
    meta = segments.decode_meta((tmp_path / "meta.json").read_bytes())
    assert meta == segments.Meta(reader_offset=L, writer_offset=5 * L)
    q, _ = make(tmp_path)
    stats = q.statistics()
    assert (stats.length, stats.datapoints, stats.reader_offset, stats.meta_rebuilt) == (
        4,
        1 + 2 + 3 + 4,
        L,
        False,
    )
    q.close()
    assert await drain(q) == b[1:]


async def test_out_of_order_acks_advance_only_over_the_contiguous_prefix(tmp_path: Path) -> None:
    """The reader position moves only when every record before it is settled: acking the third
    and second leaves it at the first; acking the first moves it past all three."""
    q, _ = make(tmp_path)
    for t in "abcd":
        await q.put(batch(t))
    g = [await q.get() for _ in range(4)]
    assert [x.payload[:1] for x in g if x is not None] == [b"a", b"b", b"c", b"d"]
    q.ack(g[2])
    q.ack(g[1])
    stats = q.statistics()
    assert (stats.reader_offset, stats.used_bytes, stats.in_flight) == (0, 4 * L, 2)
    q.ack(g[0])
    stats = q.statistics()
    assert (stats.reader_offset, stats.used_bytes, stats.in_flight) == (3 * L, L, 1)
    q.ack(g[3])
    stats = q.statistics()
    assert (stats.reader_offset, stats.used_bytes, stats.in_flight) == (4 * L, 0, 0)


async def test_ack_of_a_batch_not_in_flight_raises(tmp_path: Path) -> None:
    """ack of a batch that was never taken (or already acked) raises KeyError."""
    q, _ = make(tmp_path)
    await q.put(batch("a"))
    got = await q.get()
    assert got is not None
    q.ack(got)
    with pytest.raises(KeyError):
        q.ack(got)
    with pytest.raises(KeyError):
        q.ack(batch("a"))


async def test_segments_roll_and_consumed_segments_are_deleted(tmp_path: Path) -> None:
    """With room for two records per segment, five puts make three segments named by their start
    offsets; a segment is deleted once every record in it is acked, never the one being
    written to."""
    q, _ = make(tmp_path, segment_bytes=2 * L)
    for t in "abcde":
        await q.put(batch(t))
    names = [segments.segment_name(o) for o in (0, 2 * L, 4 * L)]
    assert files(tmp_path) == sorted([*names, "lock"])
    assert q.statistics().segments == 3
    g = [await q.get() for _ in range(5)]
    q.ack(g[0])
    assert files(tmp_path) == sorted([*names, "lock"])  # b is still in the first segment
    q.ack(g[2])
    q.ack(g[3])
    assert files(tmp_path) == sorted([*names, "lock"])  # reader still at b
    q.ack(g[1])
    assert files(tmp_path) == sorted([names[2], "lock"])
    q.ack(g[4])
    assert files(tmp_path) == sorted([names[2], "lock"])  # the segment being written stays
    assert q.statistics().segments == 1
    await q.put(batch("f"))
    await q.put(batch("g"))  # rolls: the old segment is passed, and no longer written to
    assert files(tmp_path) == sorted([names[2], segments.segment_name(6 * L), "lock"])
    h = await q.get()
    assert h is not None
    q.ack(h)
    assert files(tmp_path) == sorted([segments.segment_name(6 * L), "lock"])


async def test_a_record_larger_than_a_segment_gets_its_own(tmp_path: Path) -> None:
    """A record bigger than segment_bytes is written whole into a segment of its own."""
    q, _ = make(tmp_path, segment_bytes=100)
    small, big = batch("s"), batch("big", 500)
    for b in (small, big, small):
        await q.put(b)
    big_len = len(segments.encode_record(big))
    assert files(tmp_path) == sorted(
        [SEG0, segments.segment_name(L), segments.segment_name(L + big_len), "lock"]
    )
    assert size(tmp_path / segments.segment_name(L)) == big_len
    q.close()
    assert await drain(q) == [small, big, small]


async def test_a_process_crash_without_close_loses_nothing_written(tmp_path: Path) -> None:
    """The files as a killed process leaves them (no sync, no metadata yet: a copy taken while
    the queue is open) reopen with every batch that put() returned for."""
    q, _ = make(tmp_path / "q")
    b = [batch(t) for t in "abc"]
    for x in b:
        await q.put(x)
    shutil.copytree(tmp_path / "q", tmp_path / "crashed")
    crashed, _ = make(tmp_path / "crashed")
    assert crashed.statistics().meta_rebuilt is True
    crashed.close()
    assert await drain(crashed) == b
    await q.aclose()


# ---- limits and full behaviour ----------------------------------------------------------------


async def test_block_waits_for_acks_not_gets(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """In block mode a put into a full queue waits until an ack frees room on disk (a get alone
    frees nothing: the record is still there), then completes at that virtual time."""
    q, rec = make(tmp_path, max_bytes=2 * L)
    a, b, c = batch("a"), batch("b"), batch("c")
    await q.put(a)
    await q.put(b)
    done: list[float] = []

    async def putter() -> None:
        await q.put(c)
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter)
        await trio.sleep(1.0)
        got = await q.get()
        assert got == a
        await trio.sleep(1.5)
        assert done == []
        q.ack(got)
    assert done == [2.5]
    q.close()
    assert await drain(q) == [b, c]
    assert rec.dropped == []


async def test_block_room_held_behind_an_unacked_batch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An ack behind an unacked batch frees no room (the reader cannot pass the unacked one); the
    blocked put completes when the first batch is acked."""
    q, _ = make(tmp_path, max_bytes=2 * L)
    await q.put(batch("a"))
    await q.put(batch("b"))
    ga, gb = await q.get(), await q.get()
    assert ga is not None and gb is not None
    done: list[float] = []

    async def putter() -> None:
        await q.put(batch("c"))
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter)
        await trio.sleep(1.0)
        q.ack(gb)
        await trio.sleep(1.0)
        assert done == []
        q.ack(ga)
    assert done == [2.0]


async def test_drop_oldest_reports_the_recreated_batch(tmp_path: Path) -> None:
    """drop_oldest evicts the oldest waiting batch, hands on_drop the batch re-created from disk
    (so the caller counts its datapoints), and the reader moves past it for good."""
    q, rec = make(tmp_path, max_bytes=2 * L, full_behavior="drop_oldest")
    a, b, c = batch("a", datapoints=3), batch("b", datapoints=5), batch("c", datapoints=7)
    for x in (a, b, c):
        await q.put(x)
    assert rec.dropped == [a]
    assert rec.dropped[0] is not a
    stats = q.statistics()
    assert (stats.length, stats.datapoints, stats.used_bytes) == (2, 12, 2 * L)
    assert (stats.dropped_batches, stats.dropped_datapoints, stats.reader_offset) == (1, 3, L)
    await q.aclose()
    q, _ = make(tmp_path)
    q.close()
    assert await drain(q) == [b, c]


async def test_drop_oldest_evicts_as_many_as_needed(tmp_path: Path) -> None:
    """A big batch evicts several waiting ones until it fits, or until the queue is empty and it
    goes in alone."""
    big = batch("big", 3 * L - segments.HEADER.size - 25 - 6)
    assert len(segments.encode_record(big)) == 3 * L
    q, rec = make(tmp_path, max_bytes=4 * L, full_behavior="drop_oldest")
    small = [batch(t) for t in "abcd"]
    for b in small:
        await q.put(b)
    await q.put(big)  # 4L + 3L > 4L: evict a, b, c
    assert rec.dropped == small[:3]
    huge = batch("huge", 10 * L)
    await q.put(huge)  # never fits: evicts everything, then goes in alone
    assert rec.dropped == [*small, big]
    q.close()
    assert await drain(q) == [huge]


async def test_drop_oldest_with_a_batch_in_flight_ahead_drops_the_incoming(tmp_path: Path) -> None:
    """While a batch in flight is older than every waiting one, dropping waiting batches would free
    no room (the reader cannot pass the unacked one), so drop_oldest drops only the incoming
    batch; once that one is acked, drop_oldest evicts the oldest waiting batch again."""
    q, rec = make(tmp_path, max_bytes=2 * L, full_behavior="drop_oldest")
    a, b, c, d, e = (batch(t) for t in "abcde")
    await q.put(a)
    await q.put(b)
    ga = await q.get()
    assert ga is not None
    await q.put(c)
    assert rec.dropped == [c]
    assert rec.dropped[0] is c
    q.ack(ga)
    await q.put(d)  # room for d: a is acked
    await q.put(e)  # full, nothing in flight: evicts b
    assert rec.dropped == [c, b]
    q.close()
    assert await drain(q) == [d, e]


async def test_drop_newest(tmp_path: Path) -> None:
    """drop_newest refuses the incoming batch, reports that very object, and leaves the queue (and
    its files) as they were."""
    q, rec = make(tmp_path, max_bytes=2 * L, full_behavior="drop_newest")
    a, b, c, d = (batch(t, datapoints=n) for t, n in zip("abcd", (1, 2, 3, 4)))
    for x in (a, b, c, d):
        await q.put(x)
    assert rec.dropped == [c, d]
    assert rec.dropped[0] is c
    stats = q.statistics()
    assert (stats.length, stats.dropped_batches, stats.dropped_datapoints) == (2, 2, 7)
    assert size(tmp_path / SEG0) == 2 * L
    q.close()
    assert await drain(q) == [a, b]


@pytest.mark.parametrize("behavior", ["block", "drop_oldest", "drop_newest"])
async def test_a_batch_larger_than_max_bytes_goes_in_alone(tmp_path: Path, behavior: str) -> None:
    """A batch bigger than max_bytes still goes into an empty queue, whatever full_behavior."""
    q, rec = make(tmp_path, max_bytes=10, full_behavior=behavior)
    big = batch("big", 50)
    with trio.fail_after(1):
        await q.put(big)
    assert q.statistics().bytes == 50
    assert rec.dropped == []
    assert await q.get() == big


# ---- durability -------------------------------------------------------------------------------


async def test_durable_put_returns_only_after_fsync(tmp_path: Path) -> None:
    """With durable_ack, put returns only once the segment (and, for a new segment, the
    directory) is fsynced; the batch can be taken meanwhile."""
    fs = FakeFsync(tmp_path)
    fs.gate = trio.Event()
    q, _ = make(tmp_path, fs, durable_ack=True)
    done: list[bool] = []

    async def putter() -> None:
        await q.put(batch("a"))
        done.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter)
        await trio.testing.wait_all_tasks_blocked()
        assert done == []
        assert fs.calls == []
        assert q.statistics().synced_offset == 0
        assert await q.get() == batch("a")
        fs.gate.set()
    assert done == [True]
    assert fs.names == [SEG0, "<dir>"]
    assert q.statistics().synced_offset == L


async def test_concurrent_durable_puts_share_one_fsync(tmp_path: Path) -> None:
    """Fifty concurrent durable puts are covered by one sync round: one fsync of the segment and
    one of the directory (group commit), and every batch is in."""
    fs = FakeFsync(tmp_path)
    q, _ = make(tmp_path, fs, durable_ack=True)
    batches = [batch(str(i)) for i in range(50)]
    async with trio.open_nursery() as nursery:
        for b in batches:
            nursery.start_soon(q.put, b)
    assert fs.names == [SEG0, "<dir>"]
    stats = q.statistics()
    assert (stats.length, stats.fsyncs, stats.synced_offset) == (50, 2, 50 * L)
    q.close()
    got = await drain(q)
    assert sorted(g.payload for g in got) == sorted(b.payload for b in batches)


async def test_puts_during_a_sync_share_the_next_one(tmp_path: Path) -> None:
    """Puts that arrive while a sync round is running wait for it, then share the next round:
    one put, then ten while its fsync is held, cost three fsyncs (segment and directory, then
    the segment once more)."""
    fs = FakeFsync(tmp_path)
    fs.gate = trio.Event()
    q, _ = make(tmp_path, fs, durable_ack=True)
    done: list[str] = []

    async def put(tag: str) -> None:
        await q.put(batch(tag))
        done.append(tag)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put, "first")
        await trio.testing.wait_all_tasks_blocked()
        for i in range(10):
            nursery.start_soon(put, str(i))
        await trio.testing.wait_all_tasks_blocked()
        assert (done, fs.calls) == ([], [])
        fs.gate.set()
    assert done[0] == "first"
    assert sorted(done[1:]) == [str(i) for i in range(10)]
    assert fs.names == [SEG0, "<dir>", SEG0]
    assert q.statistics().synced_offset == 11 * L


async def test_concurrent_durable_puts_share_a_real_fsync_in_a_thread(tmp_path: Path) -> None:
    """The same with the real os.fsync in a worker thread: 50 concurrent puts, 2 fsyncs."""
    q = DiskQueue(DiskQueueSettings(tmp_path, durable_ack=True))
    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(q.put, batch(str(i)))
    stats = q.statistics()
    assert (stats.length, stats.fsyncs, stats.synced_offset) == (50, 2, 50 * L)
    await q.aclose()


async def test_sequential_durable_puts_each_wait_for_their_fsync(tmp_path: Path) -> None:
    """One put after another: each has its own fsync; the directory only when a segment is
    created, and a rolled segment is synced before it is left behind."""
    fs = FakeFsync(tmp_path)
    q, _ = make(tmp_path, fs, durable_ack=True, segment_bytes=2 * L)
    for t in "abc":
        await q.put(batch(t))
    seg2 = segments.segment_name(2 * L)
    assert fs.names == [SEG0, "<dir>", SEG0, seg2, "<dir>"]


async def test_without_durable_ack_put_does_not_fsync(tmp_path: Path) -> None:
    """Without durable_ack, put returns without any fsync: sync() (or run()) makes it durable."""
    fs = FakeFsync(tmp_path)
    q, _ = make(tmp_path, fs)
    await q.put(batch("a"))
    assert fs.calls == []
    assert q.statistics().synced_offset == 0
    await q.sync()
    assert fs.names == [SEG0, "<dir>", "meta.json.tmp", "<dir>"]
    assert q.statistics().synced_offset == L
    assert segments.decode_meta((tmp_path / "meta.json").read_bytes()) == segments.Meta(0, L)


async def test_run_syncs_every_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """run() fsyncs data and saves positions every sync_interval_s, only when something changed:
    a put at 0.25 is synced at 1.0; nothing happens at 2.0; an ack at 2.2 and a put at 2.5 are
    saved at 3.0; cancelling run() closes the queue and releases the directory."""
    fs = FakeFsync(tmp_path)
    q, _ = make(tmp_path, fs, sync_interval_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(q.run)
        await trio.sleep(0.25)
        await q.put(batch("a"))
        await trio.sleep(2.2 - 0.25)
        assert fs.calls == [(1.0, SEG0), (1.0, "<dir>"), (1.0, "meta.json.tmp"), (1.0, "<dir>")]
        got = await q.get()
        assert got is not None
        q.ack(got)
        await trio.sleep(0.3)
        await q.put(batch("b"))
        await trio.sleep(1.0)
        assert fs.calls[4:] == [(3.0, SEG0), (3.0, "meta.json.tmp"), (3.0, "<dir>")]
        nursery.cancel_scope.cancel()
    assert len(fs.calls) == 7  # closing had nothing left to sync
    assert segments.decode_meta((tmp_path / "meta.json").read_bytes()) == segments.Meta(L, 2 * L)
    q2, _ = make(tmp_path)  # the directory was released
    q2.close()
    assert await drain(q2) == [batch("b")]


async def test_run_ends_when_closed_and_drained(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """run() returns as soon as the queue is closed and every batch is acked, after saving the
    final reader position; the directory is released."""
    fs = FakeFsync(tmp_path)
    q, _ = make(tmp_path, fs, sync_interval_s=10.0)
    ended: list[float] = []

    async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await q.run(task_status=task_status)
        ended.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(runner)
        await q.put(batch("a"))
        q.close()
        await trio.sleep(1.0)
        got = await q.get()
        assert got is not None
        await trio.sleep(1.0)
        assert ended == []
        q.ack(got)
    assert ended == [2.0]
    assert q.statistics().closed is True
    assert segments.decode_meta((tmp_path / "meta.json").read_bytes()) == segments.Meta(L, L)
    q2, _ = make(tmp_path)
    assert q2.statistics().length == 0


async def test_aclose_ends_run(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """aclose() while run() waits for its next sync (batches still queued) ends run() at once;
    the batches stay for the next open."""
    q, _ = make(tmp_path, FakeFsync(tmp_path), sync_interval_s=10.0)
    ended: list[float] = []

    async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await q.run(task_status=task_status)
        ended.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(runner)
        await q.put(batch("a"))
        await trio.sleep(3.0)
        await q.aclose()
    assert ended == [3.0]
    q2, _ = make(tmp_path)
    q2.close()
    assert await drain(q2) == [batch("a")]


async def test_a_cancelled_run_still_saves_everything(tmp_path: Path) -> None:
    """Cancelling run() (hard shutdown) fsyncs what was put and saves positions before it
    returns, shielded: the next open finds every unacked batch."""
    fs = FakeFsync(tmp_path, real=True)
    q, _ = make(tmp_path, fs, sync_interval_s=3600.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(q.run)
        await q.put(batch("a"))
        await q.put(batch("b"))
        got = await q.get()
        assert got is not None
        q.ack(got)
        nursery.cancel_scope.cancel()
    assert fs.names == [SEG0, "<dir>", "meta.json.tmp", "<dir>"]
    q2, _ = make(tmp_path)
    assert q2.statistics().meta_rebuilt is False
    q2.close()
    assert await drain(q2) == [batch("b")]


# ---- lock -------------------------------------------------------------------------------------


async def test_a_second_queue_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    """While a queue holds the directory, another one (here in the same process) raises
    QueueLockedError naming the holder's pid; after aclose it opens."""
    q, _ = make(tmp_path)
    assert (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(QueueLockedError, match=f"is locked by pid {os.getpid()}$") as info:
        make(tmp_path)
    assert info.value.pid == os.getpid()
    await q.aclose()
    q2, _ = make(tmp_path)
    await q2.aclose()


# ---- close ------------------------------------------------------------------------------------


async def test_close_drains_then_returns_none(tmp_path: Path) -> None:
    """After close, get returns what is left in order, then None, and keeps returning None; put
    raises ClosedResourceError."""
    q, rec = make(tmp_path)
    a, b = batch("a"), batch("b")
    await q.put(a)
    await q.put(b)
    q.close()
    with pytest.raises(trio.ClosedResourceError):
        await q.put(batch("c"))
    assert [await q.get(), await q.get(), await q.get(), await q.get()] == [a, b, None, None]
    assert rec.dropped == []


async def test_close_wakes_getters_and_blocked_putters(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """close wakes a waiting get (None) and a put blocked on a full queue (ClosedResourceError,
    its batch not written and not reported dropped)."""
    q, rec = make(tmp_path, max_bytes=L)
    await q.put(batch("a"))
    q2, _ = make(tmp_path / "empty")
    events: list[tuple[float, str]] = []

    async def putter() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await q.put(batch("b"))
        events.append((trio.current_time(), "put raised"))

    async def getter() -> None:
        assert await q2.get() is None
        events.append((trio.current_time(), "get None"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter)
        nursery.start_soon(getter)
        await trio.sleep(1.5)
        q.close()
        q2.close()
    assert sorted(events) == [(1.5, "get None"), (1.5, "put raised")]
    assert rec.dropped == []
    assert q.statistics().writer_offset == L
    assert await drain(q) == [batch("a")]


async def test_after_aclose_get_returns_none_and_what_is_left_stays(tmp_path: Path) -> None:
    """aclose releases the files: get returns None at once, and what was left is delivered by
    the next open."""
    q, _ = make(tmp_path)
    await q.put(batch("a"))
    await q.aclose()
    await q.aclose()  # idempotent
    assert await q.get() is None
    q2, _ = make(tmp_path)
    q2.close()
    assert await drain(q2) == [batch("a")]


# ---- statistics -------------------------------------------------------------------------------


async def test_statistics_are_exact(tmp_path: Path) -> None:
    """statistics() is a frozen snapshot of every counter, the disk's included."""
    q, _ = make(tmp_path, max_bytes=3 * L, segment_bytes=2 * L, full_behavior="drop_oldest")
    empty = DiskQueueStats(
        length=0,
        bytes=0,
        datapoints=0,
        in_flight=0,
        in_flight_datapoints=0,
        max_batches=0,
        max_bytes=3 * L,
        dropped_batches=0,
        dropped_datapoints=0,
        closed=False,
        used_bytes=0,
        segments=0,
        reader_offset=0,
        writer_offset=0,
        synced_offset=0,
        corrupt_records=0,
        write_errors=0,
        write_error_datapoints=0,
        sync_errors=0,
        fsyncs=0,
        ignored_files=0,
        meta_rebuilt=True,
    )
    assert q.statistics() == empty
    for tag, dps in [("a", 1), ("b", 2), ("c", 3), ("d", 4)]:
        await q.put(batch(tag, 10, dps))  # d evicts a
    taken = await q.get()  # b
    assert taken is not None
    q.close()
    snapshot = q.statistics()
    assert snapshot == DiskQueueStats(
        length=2,
        bytes=20,
        datapoints=7,
        in_flight=1,
        in_flight_datapoints=2,
        max_batches=0,
        max_bytes=3 * L,
        dropped_batches=1,
        dropped_datapoints=1,
        closed=True,
        used_bytes=3 * L,
        segments=2,
        reader_offset=L,
        writer_offset=4 * L,
        synced_offset=0,
        corrupt_records=0,
        write_errors=0,
        write_error_datapoints=0,
        sync_errors=0,
        fsyncs=0,
        ignored_files=0,
        meta_rebuilt=True,
    )
    q.ack(taken)
    assert snapshot.in_flight == 1
    with pytest.raises(AttributeError):
        snapshot.length = 0  # type: ignore[misc]


async def test_repr_is_one_useful_line(tmp_path: Path) -> None:
    """repr shows the directory, length, bytes, in-flight count, segments, and closed."""
    q, _ = make(tmp_path)
    await q.put(batch("a", 10))
    await q.put(batch("b", 5))
    await q.get()
    assert repr(q) == f"<DiskQueue {tmp_path} 1 batches, 5 bytes, 1 in flight, 1 segments>"
    q.close()
    assert repr(q) == f"<DiskQueue {tmp_path} 1 batches, 5 bytes, 1 in flight, 1 segments, closed>"


# ---- cancellation -----------------------------------------------------------------------------


async def test_cancelled_durable_put_waiting_for_fsync_completes(tmp_path: Path) -> None:
    """A durable put cancelled while it waits for its fsync is already on disk: it finishes the
    fsync (shielded) and returns; the batch is in the queue, never half in."""
    fs = FakeFsync(tmp_path)
    fs.gate = trio.Event()
    q, _ = make(tmp_path, fs, durable_ack=True)
    result: list[str] = []
    scope = trio.CancelScope()

    async def putter() -> None:
        with scope:
            await q.put(batch("a"))
            result.append("returned")
        if scope.cancelled_caught:
            result.append("cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert result == []  # still waiting for the fsync, despite the cancel
        fs.gate.set()
    assert result == ["returned"]
    assert fs.names == [SEG0, "<dir>"]
    q.close()
    assert await drain(q) == [batch("a")]


async def test_cancelled_blocked_put_leaves_no_trace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Cancelling a put blocked on a full queue raises Cancelled; nothing was written, nothing is
    reported dropped, and it never enters the queue when room is freed later."""
    q, rec = make(tmp_path, max_bytes=L)
    a = batch("a")
    await q.put(a)
    with trio.move_on_after(2.0) as scope:
        await q.put(batch("b"))
    assert scope.cancelled_caught
    assert trio.current_time() == 2.0
    assert size(tmp_path / SEG0) == L
    got = await q.get()
    assert got == a
    q.ack(got)
    q.close()
    assert await drain(q) == []
    assert rec.dropped == []
    assert q.statistics().dropped_batches == 0


async def test_cancel_racing_with_room_never_half_puts(tmp_path: Path) -> None:
    """A blocked put cancelled just before or at any of a few checkpoints after the ack that frees
    room either raised Cancelled with its batch absent (from the queue and the file), or
    returned with its batch in; never both, never neither."""
    outcomes = set()
    n = 0
    for cancel_at in (-1, 0, 1, 2):  # -1: cancel, then free room; n: free room, n checkpoints
        for _ in range(5):
            n += 1
            q, rec = make(tmp_path / str(n), max_bytes=L)
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
                got = await q.get()
                assert got == a
                q.ack(got)
                for _ in range(cancel_at):
                    await trio.lowlevel.checkpoint()
                scope.cancel()
            await q.aclose()
            q, _ = make(tmp_path / str(n))
            q.close()
            left = await drain(q)
            assert result in (["returned"], ["cancelled"])
            assert left == ([b] if result == ["returned"] else [])
            assert rec.dropped == []
            outcomes.add(result[0])
    assert outcomes == {"returned", "cancelled"}  # both sides of the race were exercised


async def test_cancelled_get_loses_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Cancelling a get that waits on an empty queue takes nothing: a batch put afterwards stays
    for the next get, and nothing is in flight."""
    q, _ = make(tmp_path)
    with trio.move_on_after(1.0) as scope:
        await q.get()
    assert scope.cancelled_caught
    await q.put(batch("a"))
    stats = q.statistics()
    assert (stats.length, stats.in_flight) == (1, 0)
    assert await q.get() == batch("a")


async def test_get_with_a_batch_ready_is_not_cancelled(tmp_path: Path) -> None:
    """A get that finds a batch returns it even inside a cancelled scope: once read and taken, a
    batch is handed over, never dropped on the floor."""
    q, _ = make(tmp_path)
    await q.put(batch("a"))
    got = None
    with trio.CancelScope() as scope:
        scope.cancel()
        got = await q.get()
    assert got == batch("a")
    assert q.statistics().in_flight == 1


async def test_cancel_racing_with_a_put_never_loses_the_batch(tmp_path: Path) -> None:
    """A waiting get cancelled just before or at any of a few checkpoints after a batch arrives
    either returned the batch (now in flight) or raised Cancelled with the batch still queued;
    either way a reopen after aclose delivers it again (it was never acked)."""
    outcomes = set()
    n = 0
    for cancel_at in (-1, 0, 1, 2):  # -1: cancel, then put; n: put, n checkpoints, cancel
        for _ in range(5):
            n += 1
            q, _ = make(tmp_path / str(n))
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
            await q.aclose()
            q, _ = make(tmp_path / str(n))
            q.close()
            assert await drain(q) == [a]
    assert outcomes == {"returned", "cancelled"}  # both sides of the race were exercised


async def test_consumed_segments_release_their_descriptors_at_the_next_sync(
    tmp_path: Path,
) -> None:
    """A consumed segment's file is deleted at once, but its read descriptor (whose last close
    frees the file's pages) is closed by the next sync, in a thread, also when nothing new was
    written; after it no descriptor of a deleted segment is left open."""
    q = DiskQueue(DiskQueueSettings(tmp_path, segment_bytes=200))
    for n in range(6):
        await q.put(batch(f"r{n}", size=120))  # one record per segment
    while q.statistics().length:
        b = await q.get()
        assert b is not None
        q.ack(b)

    def deleted_fds() -> int:
        """Open descriptors of this process pointing at deleted files under tmp_path."""
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except FileNotFoundError:  # the descriptor listdir itself used
                continue
            count += target.startswith(str(tmp_path)) and target.endswith("(deleted)")
        return count

    assert deleted_fds() > 0
    await q.sync()
    assert deleted_fds() == 0
    await q.aclose()
