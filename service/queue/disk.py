"""The disk queue: batches in append-only segment files, so what was queued survives a restart.

It owns one directory (the format is in segments.py) and never drops a record that was not acked,
or dropped and reported to `on_drop`; damage is skipped and counted, never a reason to throw the
queue away. fsync runs in a worker thread: the event loop never waits on the disk for it.

Durability. With `durable_ack`, put() returns only once the record is fsynced (concurrent puts share
one fsync: group commit); a kill -9 or power loss then loses nothing put() returned for. Without
it, a background task (`run()`) fsyncs every `sync_interval_s`: a process crash loses nothing (the
kernel has the pages), a power loss at most the last `sync_interval_s` of puts. Acks are saved in
meta.json at the same pace; an ack lost in a crash means the batch is delivered again (at least
once), never lost.

Acks arrive out of order (several workers). The reader position (the first record not yet acked)
only advances over a contiguous prefix of settled records, and a segment is deleted once the reader
is past its end. After a restart everything from the saved reader position on is delivered again.

Limits. `max_bytes` bounds the record bytes from the reader position to the writer (waiting,
in flight, and acked records still behind an unacked one); a lone batch larger than that still goes
into an empty queue. The files may hold up to one more segment (the partly consumed oldest one).
When full: block waits for acks; drop_newest drops the incoming batch; drop_oldest drops the oldest
waiting batches, but only while no batch in flight is older than them: room behind an unacked batch
frees only when it is acked (passing it would lose it in a crash), so meanwhile the incoming batch
is dropped instead. A write error drops the incoming batch too, counted apart (`write_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import attrs
import trio

from service.pipeline.items import Batch
from service.queue import segments
from service.queue.base import QueueStats
from service.telemetry import logs

MiB = 1024 * 1024
GiB = 1024 * MiB


def _positive(_inst: object, attr: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attr.name} must be positive, got {value!r}")


@attrs.frozen
class DiskQueueSettings:
    """How one disk queue behaves; `directory` is one per exporter endpoint."""

    directory: Path = attrs.field(converter=Path)
    # Unlike the memory queue's, this does not cost RAM: only an index entry (~100 bytes) per batch.
    max_bytes: int = attrs.field(default=1 * GiB, validator=_positive)
    # Consumed space is freed a whole segment at a time; 64 MiB keeps the file count low at GiB
    # sizes while wasting at most one segment.
    segment_bytes: int = attrs.field(default=64 * MiB, validator=_positive)
    full_behavior: Literal["block", "drop_oldest", "drop_newest"] = attrs.field(
        default="block", validator=attrs.validators.in_(("block", "drop_oldest", "drop_newest"))
    )
    durable_ack: bool = False
    # Without durable_ack, the most a power loss can take.
    sync_interval_s: float = attrs.field(default=1.0, validator=_positive)


@attrs.frozen
class DiskQueueStats(QueueStats):
    """QueueStats plus the disk's own counters. `bytes` counts payload bytes of waiting batches, as
    for the memory queue; `used_bytes` is what `max_bytes` limits. `max_batches` is 0: no count
    limit."""

    used_bytes: int
    segments: int
    reader_offset: int
    writer_offset: int
    synced_offset: int
    corrupt_records: int  # skipped at open or at read, each logged with its file and position
    write_errors: int  # puts refused because the write failed (also in dropped_batches)
    write_error_datapoints: int
    sync_errors: int  # failed fsyncs or metadata writes
    fsyncs: int
    ignored_files: int  # entries of the directory that are not ours, left alone
    meta_rebuilt: bool  # meta.json was missing or unusable at open: rebuilt by scanning


class QueueLockedError(RuntimeError):
    """Another queue (in this process or another) holds the directory."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "an unknown pid"
        super().__init__(f"disk queue directory {directory} is locked by {holder}")
        self.directory = directory
        self.pid = pid


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


async def _fsync_in_thread(fd: int) -> None:
    await trio.to_thread.run_sync(os.fsync, fd)


class _Segment:
    __slots__ = ("path", "read_fd", "size", "start")

    def __init__(self, start: int, path: Path, size: int) -> None:
        self.start = start
        self.path = path
        self.size = size
        self.read_fd: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.size


class _Rec:
    """One record in the index; `settled` once acked, dropped or found corrupt."""

    __slots__ = ("datapoints", "length", "offset", "segment", "settled", "size")

    def __init__(self, offset: int, length: int, size: int, datapoints: int, segment: _Segment):
        self.offset = offset
        self.length = length
        self.size = size
        self.datapoints = datapoints
        self.segment = segment
        self.settled = False


class DiskQueue:
    """A Queue of Batches in `settings.directory`; see the module docstring.

    `on_drop(batch)` is called for every batch the queue discards when full (drop_oldest,
    drop_newest), and for batches refused because the write failed unless `on_write_error(batch)`
    is given. `fsync(fd)` makes a file durable (default: os.fsync in a worker thread) and `write`
    replaces os.write; both are for tests. The constructor recovers the directory (blocking file
    I/O) and raises QueueLockedError if another queue holds it. `run()` must run for periodic
    syncs; `aclose()` (or the end of `run()`) syncs and releases the directory.
    """

    def __init__(
        self,
        settings: DiskQueueSettings,
        on_drop: Callable[[Batch], None] | None = None,
        *,
        on_write_error: Callable[[Batch], None] | None = None,
        fsync: Callable[[int], Awaitable[None]] | None = None,
        write: Callable[[int, memoryview], int] = os.write,
    ) -> None:
        self.settings = settings
        self.directory = settings.directory
        self.on_drop = on_drop
        self.on_write_error = on_write_error
        self._fsync_fn = fsync or _fsync_in_thread
        self._write = write
        self._log = logs.get("queue.disk")
        self._rl = logs.RateLimited(self._log, 10.0)

        self._segments: deque[_Segment] = deque()
        self._active: _Segment | None = None  # the segment the writer appends to
        self._wfd: int | None = None
        self._wdirty = False  # written to _wfd since its last fsync
        self._rolled_fds: list[int] = []  # writer fds of rolled segments, to fsync then close
        self._retired_fds: list[int] = []  # clean ones, to close when the running round ends
        self._dir_dirty = False  # a segment was created since the directory's last fsync
        self._written = 0  # stream offset the next record goes to
        self._synced = 0  # stream offset up to which data is fsynced
        self._sync_done: trio.Event | None = None  # set when the running sync round ends
        self._meta_lock = trio.Lock()
        self._meta_saved: segments.Meta | None = None

        self._waiting: deque[_Rec] = deque()  # not yet taken, FIFO
        self._taken: deque[_Rec] = deque()  # taken or settled, not yet passed by the reader
        self._leased: dict[int, tuple[Batch, _Rec]] = {}  # id(batch) -> taken, not settled
        self._used = 0  # record bytes in _waiting and _taken
        self._waiting_bytes = 0
        self._waiting_datapoints = 0
        self._closed = False
        self._closing = False
        self._shut = False  # files closed, directory released
        self._finished = trio.Event()  # closed and drained, or aclose()d: run() may end
        self._getters = trio.lowlevel.ParkingLot()
        self._putters = trio.lowlevel.ParkingLot()

        self._dropped_batches = 0
        self._dropped_datapoints = 0
        self._corrupt = 0
        self._write_errors = 0
        # The error of the last write if it failed, "" once a write succeeds again: /ready shows it.
        self.write_failing = ""
        self._write_error_datapoints = 0
        self._sync_errors = 0
        self._fsyncs = 0
        self._ignored = 0
        self._meta_rebuilt = False

        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.directory)
        try:
            self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._recover()
            except BaseException:
                os.close(self._dir_fd)
                raise
        except BaseException:
            os.close(self._lock_fd)
            raise

    # ---- recovery -----------------------------------------------------------------------------

    def _recover(self) -> None:
        found = self._list_segments()
        meta = self._read_meta()
        data_end = found[-1].end if found else 0
        if meta is not None and found and meta.reader_offset > data_end:
            self._log_warning(
                "metadata points past the end of the data; rebuilding it by scanning",
                reader_offset=meta.reader_offset,
                data_end=data_end,
            )
            meta = None
        if meta is None:
            self._meta_rebuilt = True
            reader = found[0].start if found else 0
        else:
            reader = meta.reader_offset
            if meta.writer_offset > data_end and found:
                self._log_warning(
                    "segments end before the data the metadata says was synced",
                    writer_offset=meta.writer_offset,
                    data_end=data_end,
                )
        for seg in found:
            if seg.end <= reader:
                logs.log(self._log, logging.INFO, "deleting a consumed segment", file=seg.path)
                self._unlink(seg)
                continue
            self._segments.append(seg)
            try:
                size, records, damage = segments.scan_file(seg.path, max(reader - seg.start, 0))
            except OSError as e:
                self._corrupt += 1
                self._log_warning("cannot read segment; skipped", file=seg.path, error=str(e))
                continue
            seg.size = size
            for d in damage:
                self._corrupt += 1
                self._log_warning(
                    "corrupt record skipped",
                    file=seg.path,
                    position=d.position,
                    offset=seg.start + d.position,
                    skipped_bytes=d.length,
                    reason=d.reason,
                )
            for r in records:
                rec = _Rec(seg.start + r.position, r.length, r.size, r.datapoints, seg)
                self._waiting.append(rec)
                self._used += r.length
                self._waiting_bytes += r.size
                self._waiting_datapoints += r.datapoints
        end = self._segments[-1].end if self._segments else 0
        self._written = self._synced = max(end, data_end, reader, meta.writer_offset if meta else 0)
        self._meta_saved = meta
        logs.log(
            self._log,
            logging.INFO,
            "disk queue opened",
            directory=self.directory,
            batches=len(self._waiting),
            bytes=self._used,
            segments=len(self._segments),
            reader_offset=self._reader_offset(),
            writer_offset=self._written,
            corrupt_records=self._corrupt,
            meta_rebuilt=self._meta_rebuilt,
        )

    def _list_segments(self) -> list[_Segment]:
        found = []
        known = {segments.LOCK_NAME, segments.META_NAME, segments.META_TMP_NAME}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                start = segments.parse_segment_name(entry.name)
                if start is not None and entry.is_file(follow_symlinks=False):
                    found.append(_Segment(start, Path(entry.path), entry.stat().st_size))
                elif start is not None or entry.name not in known:
                    self._ignored += 1
                    self._log_warning("ignoring an entry that is not a segment", file=entry.path)
        found.sort(key=lambda s: s.start)
        return found

    def _read_meta(self) -> segments.Meta | None:
        path = self.directory / segments.META_NAME
        try:
            return segments.decode_meta(path.read_bytes())
        except FileNotFoundError:
            logs.log(self._log, logging.INFO, "no metadata; rebuilding it by scanning")
        except (OSError, ValueError) as e:
            self._log_warning("unusable metadata; rebuilding it by scanning", error=str(e))
        return None

    # ---- put ----------------------------------------------------------------------------------

    async def put(self, batch: Batch) -> None:
        """Append `batch`; when full, block, drop the oldest or drop this one (`full_behavior`).
        A failed write drops this batch (on_write_error, else on_drop) and is counted; the next
        put tries again. With durable_ack, returns once the batch is fsynced. Either the batch
        is in the queue (or reported dropped) and put returned, or put raised and nothing
        changed. Raises trio.ClosedResourceError after close()."""
        if self._closed:
            raise trio.ClosedResourceError("queue is closed")
        record = segments.encode_record(batch)
        behavior = self.settings.full_behavior
        while self._full(len(record)):
            if behavior == "block":
                await self._putters.park()
                if self._closed:
                    raise trio.ClosedResourceError("queue is closed")
            elif behavior == "drop_oldest" and self._waiting and not self._taken:
                self._drop_oldest()
            else:
                # drop_newest; or drop_oldest while a batch is in flight ahead of every waiting one:
                # dropping those would free no room until it is acked (the reader cannot pass it),
                # so only the incoming batch is dropped rather than both.
                self._drop(batch)
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
        rec = self._store(batch, record)
        if rec is None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._getters.unpark()
        if self.settings.durable_ack:
            with trio.CancelScope(shield=True):  # the batch is in: wait for it to be durable
                await self._sync_data(rec.offset + rec.length)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def spill(self, batch: Batch) -> bool:
        """Append `batch` whatever the limits and even after close(): for a hybrid queue moving
        its memory part here at a stop, data already acknowledged that must not be lost. Not
        fsynced here (aclose() does it). False if the write failed (logged and counted)."""
        return self._store(batch, segments.encode_record(batch)) is not None

    def _store(self, batch: Batch, record: bytes) -> _Rec | None:
        """Append `record` (the encoded `batch`) and queue it; None if the write failed (then
        the batch is dropped, logged and counted)."""
        try:
            offset, seg = self._append(record)
        except OSError as e:
            self._write_failed(batch, e)
            return None
        self.write_failing = ""
        rec = _Rec(offset, len(record), batch.size, batch.datapoints, seg)
        self._waiting.append(rec)
        self._used += rec.length
        self._waiting_bytes += rec.size
        self._waiting_datapoints += rec.datapoints
        return rec

    def _full(self, incoming: int) -> bool:
        if not self._waiting and not self._taken:
            return False  # a batch larger than max_bytes still goes through, alone
        return self._used + incoming > self.settings.max_bytes

    def _append(self, record: bytes) -> tuple[int, _Segment]:
        """Write `record` at the end of the active segment; its offset and segment. On OSError
        the file is left as it was (or, failing that, abandoned) and the error raised."""
        seg = self._active
        if seg is not None and seg.size and seg.size + len(record) > self.settings.segment_bytes:
            self._roll()
        if self._active is None:
            self._open_segment()
        seg = self._active
        assert seg is not None and self._wfd is not None
        fd, pos = self._wfd, seg.size
        done = 0
        view = memoryview(record)
        error: OSError | None = None
        while done < len(record) and error is None:
            try:
                n = self._write(fd, view[done:])
            except OSError as e:
                error = e
                continue
            if n <= 0:
                error = OSError(errno.EIO, "write made no progress", str(seg.path))
            done += max(n, 0)
        if error is not None:
            if done:
                self._undo_partial_write(seg, pos, len(record))
            raise error
        seg.size += len(record)
        self._written = seg.end
        self._wdirty = True
        return seg.start + pos, seg

    def _open_segment(self) -> None:
        start = self._written
        path = self.directory / segments.segment_name(start)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        if os.fstat(fd).st_size:
            os.close(fd)
            raise OSError(
                errno.EEXIST, "a segment file already holds data at the write offset", path
            )
        if self._segments and self._segments[-1].start == start:
            seg = self._segments[-1]  # an empty segment left at this offset
        else:
            seg = _Segment(start, path, 0)
            self._segments.append(seg)
        self._active, self._wfd = seg, fd
        self._wdirty = False
        self._dir_dirty = True

    def _roll(self) -> None:
        """Stop writing to the active segment. A dirty fd is closed by the next sync round after
        its fsync; a clean one now, or after the running round (which may be fsyncing it)."""
        if self._wfd is None:
            pass
        elif self._wdirty:
            self._rolled_fds.append(self._wfd)
        elif self._sync_done is not None:
            self._retired_fds.append(self._wfd)
        else:
            os.close(self._wfd)
        self._active, self._wfd, self._wdirty = None, None, False

    def _undo_partial_write(self, seg: _Segment, pos: int, length: int) -> None:
        assert self._wfd is not None
        try:
            os.ftruncate(self._wfd, pos)
        except OSError:
            # Part of the record may be on disk: the next record goes to a new segment past it,
            # and a scan skips these bytes as a torn record.
            seg.size = pos + length
            self._written = seg.end
            self._wdirty = True
            self._roll()

    def _write_failed(self, batch: Batch, e: OSError) -> None:
        self.write_failing = str(e)
        self._write_errors += 1
        self._write_error_datapoints += batch.datapoints
        self._dropped_batches += 1
        self._dropped_datapoints += batch.datapoints
        self._rl.warning(
            "write",
            "disk queue write failed; batch dropped",
            directory=self.directory,
            error=str(e),
            datapoints=batch.datapoints,
        )
        callback = self.on_write_error or self.on_drop
        if callback is not None:
            callback(batch)

    def _drop(self, batch: Batch) -> None:
        self._dropped_batches += 1
        self._dropped_datapoints += batch.datapoints
        if self.on_drop is not None:
            self.on_drop(batch)

    def _drop_oldest(self) -> None:
        rec = self._waiting.popleft()
        self._unwait(rec)
        batch = self._read(rec)
        rec.settled = True
        self._taken.append(rec)
        self._advance()
        if batch is not None:
            self._drop(batch)

    # ---- get and ack --------------------------------------------------------------------------

    async def get(self) -> Batch | None:
        """Take the oldest batch, read back from its segment, waiting for one; None once closed
        and empty. A record found corrupt is skipped and counted."""
        while True:
            while not self._waiting or self._shut:
                if self._closed or self._shut:
                    await trio.lowlevel.checkpoint()
                    return None
                await self._getters.park()
            rec = self._waiting.popleft()
            self._unwait(rec)
            batch = self._read(rec)
            self._taken.append(rec)
            if batch is None:
                rec.settled = True
                self._advance()
                continue
            self._leased[id(batch)] = (batch, rec)
            await trio.lowlevel.cancel_shielded_checkpoint()  # the batch is taken: never lose it
            return batch

    def ack(self, batch: Batch) -> None:
        """Settle a batch taken with get(). Raises KeyError for a batch not in flight."""
        _, rec = self._leased.pop(id(batch))
        rec.settled = True
        if not self._shut:
            self._advance()

    def _unwait(self, rec: _Rec) -> None:
        self._waiting_bytes -= rec.size
        self._waiting_datapoints -= rec.datapoints

    def _read(self, rec: _Rec) -> Batch | None:
        seg = rec.segment
        try:
            if seg.read_fd is None:
                seg.read_fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(seg.read_fd, rec.length, rec.offset - seg.start)
            return segments.decode_record(data)
        except (OSError, segments.CorruptRecord) as e:
            self._corrupt += 1
            self._log_warning(
                "corrupt record skipped",
                file=seg.path,
                position=rec.offset - seg.start,
                offset=rec.offset,
                reason=str(e),
            )
            return None

    def _advance(self) -> None:
        """Move the reader over settled records; free their room; delete passed segments."""
        freed = False
        while self._taken and self._taken[0].settled:
            self._used -= self._taken.popleft().length
            freed = True
        if freed:
            self._putters.unpark_all()
        reader = self._reader_offset()
        while (
            self._segments
            and self._segments[0] is not self._active
            and self._segments[0].end <= reader
        ):
            self._unlink(self._segments.popleft())
        if self._closed and not self._waiting and not self._leased:
            self._finished.set()

    def _reader_offset(self) -> int:
        if self._taken:
            return self._taken[0].offset
        if self._waiting:
            return self._waiting[0].offset
        return self._written

    def _unlink(self, seg: _Segment) -> None:
        if seg.read_fd is not None:
            # Closed by the next sync round, in a thread: while a descriptor is open, unlinking
            # is cheap, and the costly freeing of the file's pages leaves the event loop.
            self._retired_fds.append(seg.read_fd)
            seg.read_fd = None
        try:
            seg.path.unlink(missing_ok=True)
        except OSError as e:
            self._log_warning("cannot delete a consumed segment", file=seg.path, error=str(e))

    # ---- durability ---------------------------------------------------------------------------

    async def sync(self) -> None:
        """Fsync everything put so far, then save the reader and writer positions in meta.json.
        Runs to the end even if cancelled (bounded by the disk)."""
        if self._shut:
            return
        with trio.CancelScope(shield=True):
            await self._sync_data(self._written)
            await self._write_meta()
            if self._retired_fds and self._sync_done is None:
                # Nothing new to fsync (a backlog draining, say): still close what consumed
                # segments left open, so their space returns without waiting for a write.
                closing, self._retired_fds = self._retired_fds, []
                await trio.to_thread.run_sync(_close_all, closing)

    async def _sync_data(self, target: int) -> None:
        """Return once data up to stream offset `target` is fsynced (or its fsync failed, which
        is logged and counted). Callers wanting the same fsync share it: one round at a time."""
        while self._synced < target and not self._shut:
            if self._sync_done is not None:
                await self._sync_done.wait()
                continue
            done = self._sync_done = trio.Event()
            try:
                with trio.CancelScope(shield=True):
                    await self._sync_round()
            finally:
                self._sync_done = None
                done.set()

    async def _sync_round(self) -> None:
        # Let the puts of this scheduling round append first, so one fsync covers them all.
        await trio.lowlevel.cancel_shielded_checkpoint()
        upto = self._written
        rolled, self._rolled_fds = self._rolled_fds, []
        fds = list(rolled)
        if self._wfd is not None and self._wdirty:
            fds.append(self._wfd)
            self._wdirty = False
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        failed: OSError | None = None
        for fd in fds:
            try:
                await self._fsync(fd)
            except OSError as e:
                failed = e
        if dir_dirty:
            try:
                await self._fsync(self._dir_fd)
            except OSError as e:
                failed = e
                self._dir_dirty = True
        # The last close of a deleted 64 MiB segment frees its pages: 13-29 ms measured, so
        # it happens in a thread, not on the event loop.
        closing, self._retired_fds = rolled + self._retired_fds, []
        if closing:
            await trio.to_thread.run_sync(_close_all, closing)
        self._synced = max(self._synced, upto)
        if failed is not None:
            # After a failed fsync the kernel may have dropped the pages: the batches stay queued
            # in this process, but their durability is unknown; write on into a fresh segment.
            self._sync_errors += 1
            self._log.error(
                "fsync failed; batches since the last sync may not survive a power loss",
                extra={"fields": {"directory": self.directory, "error": str(failed)}},
            )
            if self._active is not None:
                self._roll()

    async def _fsync(self, fd: int) -> None:
        await self._fsync_fn(fd)
        self._fsyncs += 1

    async def _write_meta(self) -> None:
        async with self._meta_lock:
            if self._shut:
                return
            meta = segments.Meta(min(self._reader_offset(), self._synced), self._synced)
            if meta == self._meta_saved:
                return
            tmp = self.directory / segments.META_TMP_NAME
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    data = segments.encode_meta(meta)
                    if os.write(fd, data) != len(data):
                        raise OSError(errno.EIO, "short write", tmp)
                    await self._fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.directory / segments.META_NAME)
                await self._fsync(self._dir_fd)
            except OSError as e:
                self._sync_errors += 1
                self._rl.warning("meta", "cannot write queue metadata", file=tmp, error=str(e))
                return
            self._meta_saved = meta

    # ---- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fsync and save positions every `sync_interval_s` until the queue is closed and drained
        (or this task is cancelled), then aclose()."""
        task_status.started()
        try:
            deadline = trio.current_time()
            while not self._finished.is_set():
                deadline = max(deadline + self.settings.sync_interval_s, trio.current_time())
                with trio.move_on_at(deadline):
                    await self._finished.wait()
                await self.sync()
        finally:
            await self.aclose()

    def close(self) -> None:
        """No more puts; get() drains what is left, then returns None."""
        self._closed = True
        self._getters.unpark_all()
        self._putters.unpark_all()
        if not self._waiting and not self._leased:
            self._finished.set()

    async def aclose(self) -> None:
        """close(), fsync everything, save positions, close the files and release the directory.
        What is not acked stays for the next open. Idempotent; runs to the end if cancelled."""
        if self._closing:
            return
        self._closing = True
        self.close()
        with trio.CancelScope(shield=True):
            try:
                await self._sync_data(self._written)
                await self._write_meta()
            finally:
                self._shut = True
                self._roll()
                for fd in self._rolled_fds + self._retired_fds:
                    os.close(fd)
                self._rolled_fds, self._retired_fds = [], []
                for seg in self._segments:
                    if seg.read_fd is not None:
                        os.close(seg.read_fd)
                        seg.read_fd = None
                os.close(self._dir_fd)
                os.close(self._lock_fd)  # releases the flock
                self._getters.unpark_all()
                self._finished.set()

    # ---- looking at it ------------------------------------------------------------------------

    def statistics(self) -> DiskQueueStats:
        return DiskQueueStats(
            length=len(self._waiting),
            bytes=self._waiting_bytes,
            datapoints=self._waiting_datapoints,
            in_flight=len(self._leased),
            in_flight_datapoints=sum(r.datapoints for _, r in self._leased.values()),
            max_batches=0,
            max_bytes=self.settings.max_bytes,
            dropped_batches=self._dropped_batches,
            dropped_datapoints=self._dropped_datapoints,
            closed=self._closed,
            used_bytes=self._used,
            segments=len(self._segments),
            reader_offset=self._reader_offset(),
            writer_offset=self._written,
            synced_offset=self._synced,
            corrupt_records=self._corrupt,
            write_errors=self._write_errors,
            write_error_datapoints=self._write_error_datapoints,
            sync_errors=self._sync_errors,
            fsyncs=self._fsyncs,
            ignored_files=self._ignored,
            meta_rebuilt=self._meta_rebuilt,
        )

    def _log_warning(self, msg: str, **fields: object) -> None:
        logs.log(self._log, logging.WARNING, msg, directory=self.directory, **fields)

    def __repr__(self) -> str:
        return (
            f"<DiskQueue {self.directory} {len(self._waiting)} batches,"
            f" {self._waiting_bytes} bytes, {len(self._leased)} in flight,"
            f" {len(self._segments)} segments{', closed' if self._closed else ''}>"
        )


def _lock(directory: Path) -> int:
    """Open and flock `directory`/lock, writing our pid into it; the fd holds the lock.
    Raises QueueLockedError naming the holder's pid."""
    path = directory / segments.LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # read-only directory: lock all the same
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        raise QueueLockedError(directory, int(text) if text.isdigit() else None) from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd
