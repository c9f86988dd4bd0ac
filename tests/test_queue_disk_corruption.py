"""The disk queue against damaged and hostile directories, on real files.

Each test damages what a queue left behind (or what it is writing to), reopens, and asserts that
the queue opens, counts what it skipped, and delivers every intact record exactly; a failing write
or fsync is counted and never crashes the queue.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from service.pipeline.items import Batch
from service.queue import segments
from service.queue.disk import DiskQueue, DiskQueueSettings, QueueLockedError

REPO = Path(__file__).resolve().parents[1]
SEG0 = segments.segment_name(0)


def batch(tag: str, size: int = 10, datapoints: int = 1) -> Batch:
    """A batch whose payload is `size` bytes starting with `tag`."""
    payload = tag.encode().ljust(size, b".")
    return Batch(
        payload=payload, encoding="snappy", series=2, datapoints=datapoints, raw_bytes=3 * size
    )


BATCHES = [batch("a", 10), batch("b", 40), batch("c", 25), batch("d", 60)]
LENS = [len(segments.encode_record(b)) for b in BATCHES]
POS = [sum(LENS[:i]) for i in range(len(LENS) + 1)]  # record positions, then the end


class Recorder:
    def __init__(self) -> None:
        self.batches: list[Batch] = []

    def __call__(self, b: Batch) -> None:
        self.batches.append(b)


def open_queue(directory: Path, **settings: object) -> DiskQueue:
    return DiskQueue(DiskQueueSettings(directory, **settings))  # type: ignore[arg-type]


async def fill(directory: Path, batches: list[Batch] = BATCHES, **settings: object) -> None:
    """A closed queue in `directory` holding `batches`."""
    q = open_queue(directory, **settings)
    for b in batches:
        await q.put(b)
    await q.aclose()


async def reopen_and_drain(directory: Path) -> tuple[DiskQueue, list[Batch]]:
    """Open the queue in `directory`, take and ack everything, then aclose it."""
    q = open_queue(directory)
    q.close()
    out = []
    while (b := await q.get()) is not None:
        q.ack(b)
        out.append(b)
    await q.aclose()
    return q, out


def poke(path: Path, position: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(position)
        f.write(data)


def truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


def flip(path: Path, position: int) -> None:
    with path.open("r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ 0x5A]))


def write_meta(directory: Path, data: bytes) -> None:
    (directory / "meta.json").write_bytes(data)


# ---- damaged segments -------------------------------------------------------------------------


async def test_torn_tail(tmp_path: Path) -> None:
    """A last record cut short (a crash mid-write) is one corrupt record; the three before it are
    delivered. The writer starts a new segment rather than appending after the torn bytes, so
    later batches are delivered too."""
    await fill(tmp_path)
    truncate(tmp_path / SEG0, POS[4] - 5)
    q = open_queue(tmp_path)
    stats = q.statistics()
    assert (stats.corrupt_records, stats.length) == (1, 3)
    await q.put(batch("e"))
    await q.aclose()
    assert (tmp_path / segments.segment_name(POS[4])).exists()
    q, got = await reopen_and_drain(tmp_path)
    assert got == [*BATCHES[:3], batch("e")]
    assert q.statistics().corrupt_records == 1


async def test_torn_header(tmp_path: Path) -> None:
    """Fewer than 16 bytes of a header at the end of a segment: one corrupt record, the rest
    delivered."""
    await fill(tmp_path)
    truncate(tmp_path / SEG0, POS[3] + 10)
    q, got = await reopen_and_drain(tmp_path)
    assert got == BATCHES[:3]
    assert q.statistics().corrupt_records == 1


async def test_flipped_byte_in_a_payload(tmp_path: Path) -> None:
    """A damaged payload fails its CRC: that one record is skipped (its header, which has its own
    CRC, gives the length) and the records after it in the same segment are delivered."""
    await fill(tmp_path)
    flip(tmp_path / SEG0, POS[2] - 3)  # inside b's payload
    q, got = await reopen_and_drain(tmp_path)
    assert got == [BATCHES[0], BATCHES[2], BATCHES[3]]
    assert q.statistics().corrupt_records == 1


async def test_flipped_byte_in_a_length(tmp_path: Path) -> None:
    """A damaged length fails the header CRC: the queue resyncs on the next record that verifies;
    one corrupt record, every other one delivered."""
    await fill(tmp_path)
    flip(tmp_path / SEG0, POS[1] + 4)
    q, got = await reopen_and_drain(tmp_path)
    assert got == [BATCHES[0], BATCHES[2], BATCHES[3]]
    assert q.statistics().corrupt_records == 1


async def test_zeroed_header(tmp_path: Path) -> None:
    """A header zeroed out (as a filesystem may leave it after a crash) is one corrupt record; the
    queue resyncs and delivers the records after it."""
    await fill(tmp_path)
    poke(tmp_path / SEG0, POS[1], bytes(segments.HEADER.size))
    q, got = await reopen_and_drain(tmp_path)
    assert got == [BATCHES[0], BATCHES[2], BATCHES[3]]
    assert q.statistics().corrupt_records == 1


async def test_zero_filled_tail(tmp_path: Path) -> None:
    """A tail of zeros after the last record (file size extended, data never written) is one
    corrupt record; every record is delivered."""
    await fill(tmp_path)
    with (tmp_path / SEG0).open("ab") as f:
        f.write(bytes(4096))
    q, got = await reopen_and_drain(tmp_path)
    assert got == BATCHES
    assert q.statistics().corrupt_records == 1


async def test_a_garbage_segment_between_good_ones(tmp_path: Path) -> None:
    """A segment overwritten with garbage costs only its own records (one corrupt run); the
    segments before and after it are delivered."""
    await fill(tmp_path, segment_bytes=1)  # one record per segment
    middle = tmp_path / segments.segment_name(POS[1])
    middle.write_bytes(b"\xb1garbage" * (LENS[1] // 8) + b"\xb1" * (LENS[1] % 8))
    assert middle.stat().st_size == LENS[1]
    q, got = await reopen_and_drain(tmp_path)
    assert got == [BATCHES[0], BATCHES[2], BATCHES[3]]
    assert q.statistics().corrupt_records == 1


async def test_damage_found_at_read_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A record damaged after the queue opened is found when it is read: get skips it, counts it,
    logs the file and position, and returns the next record."""
    await fill(tmp_path)
    q = open_queue(tmp_path)
    flip(tmp_path / SEG0, POS[1] + segments.HEADER.size + 30)
    with caplog.at_level(logging.WARNING, logger="governor.queue.disk"):
        assert await q.get() == BATCHES[0]
        assert await q.get() == BATCHES[2]
    assert q.statistics().corrupt_records == 1
    [record] = [r for r in caplog.records if r.getMessage() == "corrupt record skipped"]
    fields = record.fields  # type: ignore[attr-defined]
    assert (fields["file"], fields["position"], fields["offset"]) == (
        tmp_path / SEG0,
        POS[1],
        POS[1],
    )
    assert fields["reason"] == "bad checksum"
    await q.aclose()


async def test_corruption_at_open_is_logged_with_file_and_position(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each skipped record is logged once at open with its file, position, stream offset, the
    bytes skipped and why."""
    seg_bytes = LENS[2] + LENS[3]
    assert POS[2] <= seg_bytes < POS[3]
    await fill(tmp_path, segment_bytes=seg_bytes)  # a and b in the first segment, c and d next
    seg1 = tmp_path / segments.segment_name(POS[2])
    flip(seg1, LENS[2] + 20)  # inside d's body
    with caplog.at_level(logging.WARNING, logger="governor.queue.disk"):
        q = open_queue(tmp_path)
    [record] = [r for r in caplog.records if r.getMessage() == "corrupt record skipped"]
    fields = record.fields  # type: ignore[attr-defined]
    assert {k: fields[k] for k in ("file", "position", "offset", "skipped_bytes", "reason")} == {
        "file": seg1,
        "position": LENS[2],
        "offset": POS[3],
        "skipped_bytes": LENS[3],
        "reason": "bad checksum",
    }
    await q.aclose()


# ---- metadata ---------------------------------------------------------------------------------


async def acked_two(directory: Path) -> None:
    """A closed queue holding BATCHES with the first two acked (all in one segment)."""
    q = open_queue(directory)
    for b in BATCHES:
        await q.put(b)
    for _ in range(2):
        got = await q.get()
        assert got is not None
        q.ack(got)
    await q.aclose()
    assert segments.decode_meta((directory / "meta.json").read_bytes()) == segments.Meta(
        POS[2], POS[4]
    )


async def test_metadata_intact_resumes_at_the_reader(tmp_path: Path) -> None:
    """The baseline for the cases below: with its metadata, the queue resumes after the acked."""
    await acked_two(tmp_path)
    q, got = await reopen_and_drain(tmp_path)
    assert got == BATCHES[2:]
    assert q.statistics().meta_rebuilt is False


@pytest.mark.parametrize(
    "meta",
    [
        None,
        b"\x00\xff not json at all",
        b'{"version": 1, "reader_offset": 3}',
        b'{"version": 1, "reader_offset": 0, "writer_offset": 0, "crc32c": 1}',
        b'{"version": 2, "reader_offset": 0, "writer_offset": 0, "crc32c": 0}',
        segments.encode_meta(segments.Meta(10**9, 10**9)),
        segments.encode_meta(segments.Meta(POS[4] + 1, POS[4] + 1)),
    ],
    ids=[
        "missing",
        "garbage",
        "incomplete",
        "bad-crc",
        "future-version",
        "far-past-end",
        "past-end",
    ],
)
async def test_unusable_metadata_is_rebuilt_by_scanning(tmp_path: Path, meta: bytes | None) -> None:
    """Metadata missing, unparsable, incomplete, failing its CRC, of an unknown version or
    pointing past the end of the data: the queue rebuilds it by scanning every segment and
    delivers every record (the acked ones again: at least once), deleting nothing."""
    await acked_two(tmp_path)
    if meta is None:
        (tmp_path / "meta.json").unlink()
    else:
        write_meta(tmp_path, meta)
    q, got = await reopen_and_drain(tmp_path)
    assert got == BATCHES
    stats = q.statistics()
    assert (stats.meta_rebuilt, stats.corrupt_records) == (True, 0)
    assert segments.decode_meta((tmp_path / "meta.json").read_bytes()) == segments.Meta(
        POS[4], POS[4]
    )


async def test_a_metadata_write_error_is_counted(tmp_path: Path) -> None:
    """When meta.json cannot be written (here its temporary path is a directory) the sync is
    counted as failed, nothing crashes, and the data is still there on the next open."""
    (tmp_path / "meta.json.tmp").mkdir()
    q = open_queue(tmp_path)
    assert q.statistics().ignored_files == 0  # a known name, not a stray file
    await q.put(BATCHES[0])
    await q.sync()
    assert q.statistics().sync_errors == 1
    await q.aclose()
    (tmp_path / "meta.json.tmp").rmdir()
    q, got = await reopen_and_drain(tmp_path)
    assert got == BATCHES[:1]
    assert q.statistics().meta_rebuilt is True


# ---- stray files ------------------------------------------------------------------------------


async def test_an_orphan_segment_before_the_reader_is_deleted(tmp_path: Path) -> None:
    """A segment that ends before the saved reader position (acked, but its deletion was lost)
    is deleted at open and none of its records is delivered."""
    q = open_queue(tmp_path, segment_bytes=1)  # one record per segment
    for b in BATCHES:
        await q.put(b)
    first = (tmp_path / SEG0).read_bytes()
    got = await q.get()
    assert got is not None
    q.ack(got)
    await q.aclose()
    assert not (tmp_path / SEG0).exists()
    (tmp_path / SEG0).write_bytes(first)
    q, got_after = await reopen_and_drain(tmp_path)
    assert got_after == BATCHES[1:]
    assert not (tmp_path / SEG0).exists()
    assert q.statistics().corrupt_records == 0


async def test_files_that_are_not_segments_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries whose name is not a 20-digit offset with .seg (or that are not regular files) are
    logged, counted and left alone; every record is delivered."""
    await fill(tmp_path)
    strays = {
        "junk.seg": b"x",
        "42.seg": BATCHES[0].payload,
        "00000000000000000000.seg.bak": b"y",
        "notes.txt": b"z",
    }
    for name, data in strays.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / segments.segment_name(10**6)).mkdir()
    with caplog.at_level(logging.WARNING, logger="governor.queue.disk"):
        q, got = await reopen_and_drain(tmp_path)
    assert got == BATCHES
    assert q.statistics().ignored_files == 5
    logged = sorted(
        Path(r.fields["file"]).name  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "ignoring an entry that is not a segment"
    )
    assert logged == sorted([*strays, segments.segment_name(10**6)])
    for name, data in strays.items():
        assert (tmp_path / name).read_bytes() == data


# ---- write and fsync errors -------------------------------------------------------------------


async def test_an_unwritable_segment_path_drops_and_counts(tmp_path: Path) -> None:
    """A put whose segment cannot be opened for writing (the path is a directory: EISDIR, as a
    read-only directory would give EROFS or EACCES; chmod does not stop root) drops that batch
    to on_write_error and counts it, without crashing; the next put tries again and succeeds
    once the path is writable."""
    (tmp_path / SEG0).mkdir()
    failed, dropped = Recorder(), Recorder()
    q = DiskQueue(DiskQueueSettings(tmp_path), dropped, on_write_error=failed)
    await q.put(BATCHES[0])
    await q.put(BATCHES[1])
    stats = q.statistics()
    assert (stats.write_errors, stats.write_error_datapoints, stats.length) == (2, 2, 0)
    assert (stats.dropped_batches, stats.dropped_datapoints) == (2, 2)
    assert failed.batches == BATCHES[:2]
    assert dropped.batches == []
    assert q.write_failing.startswith("[Errno 21] Is a directory")  # what /ready reports
    (tmp_path / SEG0).rmdir()
    await q.put(BATCHES[2])
    assert q.statistics().write_errors == 2
    assert q.write_failing == ""
    await q.aclose()
    q, got = await reopen_and_drain(tmp_path)
    assert got == [BATCHES[2]]


async def test_without_on_write_error_on_drop_is_told(tmp_path: Path) -> None:
    """Without an on_write_error callback, a batch refused by a write error goes to on_drop."""
    (tmp_path / SEG0).mkdir()
    dropped = Recorder()
    q = DiskQueue(DiskQueueSettings(tmp_path), dropped)
    await q.put(BATCHES[0])
    assert dropped.batches == [BATCHES[0]]
    assert q.statistics().write_errors == 1
    await q.aclose()


class FailingWrite:
    """os.write fake: after `ok` successful calls, writes half the data, then raises ENOSPC."""

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.half_written = False

    def __call__(self, fd: int, data: memoryview) -> int:
        if self.ok > 0:
            self.ok -= 1
            return os.write(fd, data)
        if not self.half_written:
            self.half_written = True
            return os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_disk_full_mid_record_is_undone(tmp_path: Path) -> None:
    """ENOSPC after half a record was written: the file is cut back to the last whole record, the
    batch is dropped and counted, and the next put (space back) lands right after; a reopen
    finds no damage."""
    fail = FailingWrite(ok=1)
    failed = Recorder()
    q = DiskQueue(DiskQueueSettings(tmp_path), on_write_error=failed, write=fail)
    await q.put(BATCHES[0])
    await q.put(BATCHES[1])
    assert fail.half_written
    assert (tmp_path / SEG0).stat().st_size == POS[1]
    assert failed.batches == [BATCHES[1]]
    q._write = os.write  # space is back
    await q.put(BATCHES[2])
    await q.aclose()
    q, got = await reopen_and_drain(tmp_path)
    assert got == [BATCHES[0], BATCHES[2]]
    assert q.statistics().corrupt_records == 0


async def test_disk_full_mid_record_that_cannot_be_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the half-written record cannot be cut off either, the writer moves to a new segment
    past it; a reopen counts the torn record once and delivers every whole one."""
    fail = FailingWrite(ok=1)
    q = DiskQueue(DiskQueueSettings(tmp_path), write=fail)

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", no_truncate)
    await q.put(BATCHES[0])
    await q.put(BATCHES[1])
    monkeypatch.undo()
    q._write = os.write
    await q.put(BATCHES[2])
    assert (tmp_path / segments.segment_name(POS[2])).exists()
    await q.aclose()
    q, got = await reopen_and_drain(tmp_path)
    assert got == [BATCHES[0], BATCHES[2]]
    assert q.statistics().corrupt_records == 1


async def test_a_failed_fsync_is_counted_and_does_not_crash(tmp_path: Path) -> None:
    """A durable put whose fsync fails returns (the batch is queued), the failure is counted and
    logged, and the writer moves on to a fresh segment; everything is delivered."""
    calls: list[int] = []

    async def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)

    q = DiskQueue(DiskQueueSettings(tmp_path, durable_ack=True), fsync=failing_fsync)
    await q.put(BATCHES[0])
    assert q.statistics().sync_errors == 1
    await q.put(BATCHES[1])
    assert (tmp_path / segments.segment_name(POS[1])).exists()
    q.close()
    got = []
    while (b := await q.get()) is not None:
        q.ack(b)
        got.append(b)
    assert got == BATCHES[:2]
    await q.aclose()


# ---- another process --------------------------------------------------------------------------


async def test_a_second_process_on_the_same_directory(tmp_path: Path) -> None:
    """While another process holds the queue directory, opening it raises QueueLockedError naming
    that process's pid; once it exits, the queue opens and finds what that process left."""
    await fill(tmp_path, BATCHES[:1])
    code = (
        "import sys\n"
        "from service.queue.disk import DiskQueue, DiskQueueSettings\n"
        "q = DiskQueue(DiskQueueSettings(sys.argv[1]))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with trio.fail_after(30):
            out = b""
            while b"\n" not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the holder exited early"
                out += chunk
        assert out == b"ready\n"
        with pytest.raises(QueueLockedError) as info:
            open_queue(tmp_path)
        assert info.value.pid == proc.pid
        assert str(info.value) == f"disk queue directory {tmp_path} is locked by pid {proc.pid}"
    finally:
        await proc.stdin.aclose()
        with trio.fail_after(30):
            assert await proc.wait() == 0
        await proc.stdout.aclose()
    _, got = await reopen_and_drain(tmp_path)
    assert got == BATCHES[:1]
