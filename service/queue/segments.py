"""The disk queue's on-disk format: segment names, records, scanning for damage, the metadata file.

Pure functions over bytes and paths, no trio and no queue logic (that is disk.py). Nothing here
deletes or rewrites data: scanning reports damage, the queue decides what to do with it.

Format version 1
================

One directory per exporter endpoint::

    lock                        flock(LOCK_EX | LOCK_NB) by the live queue; holds its pid, decimal
    meta.json                   reader and writer positions (below)
    00000000000000000000.seg    segments, named by the stream offset of their first byte
                                (20 decimal digits, zero-padded)

Stream offsets: a record's offset is its segment's start plus its position in the file. Offsets only
grow. A new segment starts where the previous one ends, except after a write the queue could not
undo (it then skips past the possibly written bytes, leaving a gap) and at open (the writer starts
a fresh segment at the end of the data rather than appending after a possibly torn tail).

A record is a 16-byte header, little-endian, then a body of `length` bytes::

    0  u8   magic and version: 0xB1 is version 1 (a zeroed header is never valid)
    1  u8   flags: 0 (reserved)
    2  u16  reserved: 0
    4  u32  length of the body
    8  u32  CRC32C of header bytes 0-7 followed by the body
    12 u32  CRC32C of header bytes 0-11: vouches for the length even when the body is damaged

The body holds the whole Batch, so a restart re-creates it exactly without re-encoding::

    u64 series, u64 datapoints, u64 raw_bytes, u8 len(encoding), encoding (ASCII),
    payload (the compressed bytes, as sent to the backend; the rest of the body)

Reading a segment from a position (the resync rule):

- fewer than 16 bytes left: a torn header; one corrupt record, the rest of the file is skipped.
- header invalid (magic, flags, reserved, or header CRC; a zeroed header is one): the length cannot
  be trusted, so search forward for the next position where a complete record verifies (magic,
  header CRC and body CRC); the bytes in between count as one corrupt record. No such position:
  skip to the end of the file.
- header valid but the body runs past the end of the file: a torn tail; one corrupt record, the
  rest of the file is skipped.
- header valid, body CRC wrong (or a body that does not parse): one corrupt record, skipped; the
  next record starts right after it, since the header CRC vouches for its length.

meta.json: ``{"version": 1, "reader_offset": R, "writer_offset": W, "crc32c": C}`` where R is the
offset of the first record not yet acked (everything before it was acked or dropped), W the end of
the data known to be fsynced, and C the CRC32C of the ASCII text ``"1 R W"``. It is replaced
atomically (write meta.json.tmp, fsync it, rename over meta.json, fsync the directory). A missing,
unparsable or inconsistent one is rebuilt by scanning every segment (everything is delivered again:
at least once, never lost).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from pathlib import Path

import attrs
from crc32c import crc32c

from service.pipeline.items import Batch

VERSION = 1
MAGIC = 0xB1  # version 1
_MAGIC_BYTES = bytes([MAGIC])
HEADER = struct.Struct("<BBHIII")  # magic, flags, reserved, length, body crc, header crc
BODY = struct.Struct("<QQQB")  # series, datapoints, raw_bytes, len(encoding)
_HEAD8 = struct.Struct("<BBHI")
_U32 = struct.Struct("<I")
MAX_BODY = 2**32 - 1

SEGMENT_SUFFIX = ".seg"
META_NAME = "meta.json"
META_TMP_NAME = "meta.json.tmp"
LOCK_NAME = "lock"
_SEGMENT_NAME = re.compile(r"(\d{20})\.seg")


class CorruptRecord(Exception):
    """Bytes that are not a valid version-1 record; the message says what is wrong."""


def segment_name(offset: int) -> str:
    """The file name of the segment starting at stream offset `offset`."""
    return f"{offset:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The start offset a segment file name encodes, or None if `name` is not a segment name."""
    m = _SEGMENT_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def encode_record(batch: Batch) -> bytes:
    """One record (header and body) holding `batch`. Raises ValueError if it cannot be encoded
    (an encoding name that is not ASCII or longer than 255 bytes, a body of 4 GiB or more)."""
    enc = batch.encoding.encode("ascii")
    if len(enc) > 255:
        raise ValueError(f"encoding name too long: {batch.encoding!r}")
    prefix = BODY.pack(batch.series, batch.datapoints, batch.raw_bytes, len(enc))
    length = BODY.size + len(enc) + len(batch.payload)
    if length > MAX_BODY:
        raise ValueError(f"batch too large for one record: {length} bytes")
    head8 = _HEAD8.pack(MAGIC, 0, 0, length)
    crc = crc32c(batch.payload, crc32c(enc, crc32c(prefix, crc32c(head8))))
    head12 = head8 + _U32.pack(crc)
    return b"".join((head12, _U32.pack(crc32c(head12)), prefix, enc, batch.payload))


def decode_record(data: bytes) -> Batch:
    """The Batch in one whole record (header and body, nothing after). Raises CorruptRecord."""
    if len(data) < HEADER.size:
        raise CorruptRecord(f"short record: {len(data)} bytes")
    magic, flags, reserved, length, crc, hcrc = HEADER.unpack_from(data)
    if magic != MAGIC or flags or reserved or crc32c(data[:12]) != hcrc:
        raise CorruptRecord("bad header")
    if HEADER.size + length != len(data):
        raise CorruptRecord(f"length {length} does not match {len(data) - HEADER.size} bytes")
    body = memoryview(data)[HEADER.size :]
    if crc32c(body, crc32c(data[:8])) != crc:
        raise CorruptRecord("bad checksum")
    series, datapoints, raw_bytes, enc_len = _body_fields(body)
    start = BODY.size + enc_len
    return Batch(
        payload=bytes(body[start:]),
        encoding=bytes(body[BODY.size : start]).decode("ascii"),
        series=series,
        datapoints=datapoints,
        raw_bytes=raw_bytes,
    )


def _body_fields(body: memoryview) -> tuple[int, int, int, int]:
    if len(body) < BODY.size:
        raise CorruptRecord("body shorter than its fixed fields")
    series, datapoints, raw_bytes, enc_len = BODY.unpack_from(body)
    if BODY.size + enc_len > len(body):
        raise CorruptRecord("encoding runs past the body")
    try:
        bytes(body[BODY.size : BODY.size + enc_len]).decode("ascii")
    except UnicodeDecodeError:
        raise CorruptRecord("encoding is not ASCII") from None
    return series, datapoints, raw_bytes, enc_len


@attrs.frozen
class RecordInfo:
    """A valid record found by a scan: where it is and what the queue counts of it."""

    position: int  # in the file
    length: int  # header and body
    datapoints: int
    size: int  # payload bytes (Batch.size)


@attrs.frozen
class Damage:
    """Bytes a scan skipped: one corrupt record (or run of unreadable bytes)."""

    position: int  # in the file
    length: int  # bytes skipped
    reason: str


def scan(buf: bytes | mmap.mmap, start: int) -> tuple[list[RecordInfo], list[Damage]]:
    """The records and the damage in `buf` (a segment's contents) from position `start` to the
    end, following the resync rule of the module docstring."""
    records: list[RecordInfo] = []
    damage: list[Damage] = []
    n = len(buf)
    pos = start
    with memoryview(buf) as view:
        while pos < n:
            if n - pos < HEADER.size:
                damage.append(Damage(pos, n - pos, "torn header"))
                break
            if not _header_ok(view, pos):
                nxt = _resync(buf, view, pos + 1)
                damage.append(Damage(pos, nxt - pos, "bad header"))
                pos = nxt
                continue
            length, crc = struct.unpack_from("<II", view, pos + 4)
            end = pos + HEADER.size + length
            if end > n:
                damage.append(Damage(pos, n - pos, "torn record"))
                break
            if crc32c(view[pos + HEADER.size : end], crc32c(view[pos : pos + 8])) != crc:
                damage.append(Damage(pos, end - pos, "bad checksum"))
                pos = end
                continue
            try:
                _, datapoints, _, enc_len = _body_fields(view[pos + HEADER.size : end])
            except CorruptRecord as e:
                damage.append(Damage(pos, end - pos, str(e)))
                pos = end
                continue
            size = length - BODY.size - enc_len
            records.append(RecordInfo(pos, end - pos, datapoints, size))
            pos = end
    return records, damage


def _header_ok(view: memoryview, pos: int) -> bool:
    magic, flags, reserved, _, _, hcrc = HEADER.unpack_from(view, pos)
    return magic == MAGIC and not flags and not reserved and crc32c(view[pos : pos + 12]) == hcrc


def _resync(buf: bytes | mmap.mmap, view: memoryview, pos: int) -> int:
    """The next position at or after `pos` where a whole record verifies, else len(buf)."""
    n = len(buf)
    while True:
        pos = buf.find(_MAGIC_BYTES, pos)
        if pos < 0 or n - pos < HEADER.size:
            return n
        if _header_ok(view, pos):
            length, crc = struct.unpack_from("<II", view, pos + 4)
            end = pos + HEADER.size + length
            if (
                end <= n
                and crc32c(view[pos + HEADER.size : end], crc32c(view[pos : pos + 8])) == crc
            ):
                return pos
        pos += 1


def scan_file(path: Path, start: int) -> tuple[int, list[RecordInfo], list[Damage]]:
    """The file size, records and damage of the segment file at `path` from position `start`.
    Raises OSError if the file cannot be read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if start >= size:
            return size, [], []
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
            records, damage = scan(mm, start)
        return size, records, damage
    finally:
        os.close(fd)


@attrs.frozen
class Meta:
    """The positions saved in meta.json."""

    reader_offset: int
    writer_offset: int


def _meta_crc(reader: int, writer: int) -> int:
    return crc32c(f"{VERSION} {reader} {writer}".encode("ascii"))


def encode_meta(meta: Meta) -> bytes:
    """The contents of meta.json for `meta`."""
    doc = {
        "version": VERSION,
        "reader_offset": meta.reader_offset,
        "writer_offset": meta.writer_offset,
        "crc32c": _meta_crc(meta.reader_offset, meta.writer_offset),
    }
    return json.dumps(doc).encode("ascii") + b"\n"


def decode_meta(data: bytes) -> Meta:
    """The positions in the contents of a meta.json; raises ValueError saying what is wrong."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError("not a version-1 metadata object")
    fields = [doc.get(k) for k in ("reader_offset", "writer_offset", "crc32c")]
    if not all(type(v) is int and v >= 0 for v in fields):
        raise ValueError("missing or invalid fields")
    reader, writer, crc = fields
    if crc != _meta_crc(reader, writer):
        raise ValueError("checksum mismatch")
    if reader > writer:
        raise ValueError(f"reader_offset {reader} is past writer_offset {writer}")
    return Meta(reader, writer)
