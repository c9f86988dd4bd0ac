"""A table from 64-bit series hashes to slots, looked up a whole request at a time.

Slots are 0, 1, 2... in the order hashes were first added, so per-series data can live in arrays
(or lists) indexed by slot. The table is a NumPy array of buckets of 8 cells (one 64-byte cache
line of keys each, followed by their slots), kept at most half full; a hash lives in its bucket
or, when that is full, in the next one with room. A request's hashes are looked up together: one
gather of their buckets, one comparison, and a second round only for the few whose bucket
overflowed. So the memory loads of a table far bigger than the CPU caches overlap instead of
queueing behind each other (a dict lookup per series waits for ~3 cache misses in turn: ~0.3-0.45
us a series at 180k series). Sans-IO.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SeriesIndex",
    "all_of",
    "any_of",
    "grown",
    "largest",
    "least",
    "none_below",
    "positions",
]

_WIDTH = 8  # cells a bucket
# A bucket is one row of 12 uint64: 8 keys, then their 8 slots as int32 pairs, so the slot comes
# with the key in the same fetch (the row's int32 view: slots at 16..23).
_ROW = _WIDTH + _WIDTH // 2
_SLOT0 = 2 * _WIDTH
_EMPTY = 0
# 0 marks an empty cell, so a hash of 0 is kept as this one instead (two series then share a slot
# only if one hashes to 0 and the other to this: as likely as any 64-bit collision).
_ZERO_ALIAS = 0x9E3779B97F4A7C15
_MIN_BUCKETS = 128
_WIDTH_SHIFT = 3  # a cell's number in a request's gathered buckets, shifted: its row
assert 1 << _WIDTH_SHIFT == _WIDTH


# A request's arrays are small (hundreds to thousands of items), where a NumPy call's own cost
# decides: count_nonzero takes ~0.25 us, a.all() or a.any() ~1-1.3 us (a reduction set up through
# a Python wrapper), and a.nonzero()[0] ~0.5 us against ~1.35 for np.flatnonzero(a).


def all_of(a: np.ndarray) -> bool:
    """Whether every item of `a` is true (nonzero)."""
    return bool(np.count_nonzero(a) == a.size)


def any_of(a: np.ndarray) -> bool:
    """Whether some item of `a` is true (nonzero)."""
    return bool(np.count_nonzero(a))


# The least and largest item of a non-empty array: the ufuncs' own reductions, without the
# Python wrappers of a.min() and a.max().
least, largest = np.minimum.reduce, np.maximum.reduce


def none_below(a: np.ndarray, floor: int) -> bool:
    """Whether no item of `a` is below `floor` (True for an empty array)."""
    return bool(least(a, initial=floor) >= floor)


def positions(a: np.ndarray) -> np.ndarray:
    """The positions of the true (nonzero) items of a 1-D array, in order."""
    return a.nonzero()[0]


def _slots_matching(rows: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """For buckets `rows` (one a hash), the slot of the cell holding each hash, -1 if none.
    A bucket's cells hold distinct hashes: one cell matches at most."""
    cells = (rows[:, :_WIDTH] == hashes[:, None]).ravel().nonzero()[0]
    found = rows.view(np.int32)[:, _SLOT0:].ravel()[cells]
    if cells.size == hashes.size:  # each bucket holds its hash: the slots are in order
        return found.astype(np.int64)
    out = np.full(hashes.size, -1, dtype=np.int64)
    out[cells >> _WIDTH_SHIFT] = found
    return out


def grown(a: np.ndarray, size: int, fill: float | int = 0) -> np.ndarray:
    """`a` with room for at least `size` entries (by slot, by row): the same array when it has
    it, else a copy at least twice as long, the new entries `fill`."""
    if size <= a.size:
        return a
    out = np.full(max(size, 2 * a.size, 64), fill, dtype=a.dtype)
    out[: a.size] = a
    return out


class SeriesIndex:
    """Series hashes to slots 0..len-1, in the order added."""

    __slots__ = ("_by_slot", "_mask", "_n", "_rows", "_used")

    def __init__(self) -> None:
        self._n = 0
        self._rebuild(np.zeros(0, dtype=np.uint64), _MIN_BUCKETS)

    def __len__(self) -> int:
        return self._n

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """The slot of each hash (a uint64 array), -1 where the table does not hold it."""
        if not all_of(hashes):
            hashes = np.where(hashes == _EMPTY, np.uint64(_ZERO_ALIAS), hashes)
        table, mask = self._rows, self._mask
        # The buckets as intp (a view: the mask keeps them below 2^63), gathered by take: a
        # uint64 index costs fancy indexing a cast and a slower loop (~3-7x the gather).
        bucket = (hashes & np.uint64(mask)).view(np.intp)
        # One round for all, in as few NumPy calls as can be (each costs ~1-3 us a request
        # warm, several times that with the caches cold), none of them a reduction along a
        # bucket's 8 cells (NumPy runs one small inner loop per row for those).
        rows = table.take(bucket, axis=0)
        out = _slots_matching(rows, hashes)
        if none_below(out, 0):
            return out
        # Not in its bucket: in a later one only if that one is full.
        todo = positions((out < 0) & (rows[:, _WIDTH - 1] != _EMPTY))
        while todo.size:
            bucket[todo] = (bucket[todo] + 1) & mask
            rows = table.take(bucket[todo], axis=0)
            out[todo] = _slots_matching(rows, hashes[todo])
            todo = todo[(out[todo] < 0) & (rows[:, _WIDTH - 1] != _EMPTY)]
        return out

    def unseen(self, hashes: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of a request's hashes and their slots (`lookup`): the distinct hashes the table
        does not hold, in the order of their first place in the request, and those places (a
        series sent twice in a request is new once)."""
        missing = np.flatnonzero(slots < 0)
        new, first = np.unique(hashes[missing], return_index=True)
        order = np.argsort(first)
        return new[order], missing[first[order]]

    def get(self, h: int) -> int:
        """The slot of one hash; -1 if absent."""
        return int(self.lookup(np.array([h], dtype=np.uint64))[0])

    def add(self, h: int) -> int:
        """Add a hash the table does not hold; returns its slot (the next one)."""
        h = h or _ZERO_ALIAS
        if 2 * (self._n + 1) > (self._mask + 1) * _WIDTH:
            self._rebuild(self._by_slot[: self._n].copy(), 2 * (self._mask + 1))
        slot = self._n
        b, mask, used = h & self._mask, self._mask, self._used
        while used[b] == _WIDTH:
            b = (b + 1) & mask
        col = used[b]
        self._rows[b, col] = h
        self._rows.view(np.int32)[b, _SLOT0 + col] = slot
        used[b] = col + 1
        self._by_slot[slot] = h
        self._n += 1
        return slot

    def add_many(self, hashes: np.ndarray) -> np.ndarray:
        """Add distinct hashes the table does not hold (a uint64 array); returns their slots,
        the next ones in order."""
        if not hashes.all():
            hashes = np.where(hashes == _EMPTY, np.uint64(_ZERO_ALIAS), hashes)
        start, n = self._n, self._n + hashes.size
        if 2 * n > (self._mask + 1) * _WIDTH:
            buckets = self._mask + 1
            while 2 * n > buckets * _WIDTH:
                buckets *= 2
            self._rebuild(self._by_slot[:start].copy(), buckets)
        self._by_slot[start:n] = hashes
        self._place(start, n)
        self._n = n
        return np.arange(start, n, dtype=np.int64)

    def keep_newest(self, count: int) -> int:
        """Forget all but the `count` most recently added hashes; their slots move down by the
        number forgotten (returned), keeping their order."""
        cut = max(0, self._n - count)
        kept = self._by_slot[cut : self._n].copy()
        self._n = kept.size
        self._rebuild(kept, self._mask + 1)
        return cut

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def memory_bytes(self) -> int:
        return self._rows.nbytes + self._by_slot.nbytes + self._used.nbytes

    def _rebuild(self, by_slot: np.ndarray, buckets: int) -> None:
        """A table of `buckets` buckets holding `by_slot` (slot i: by_slot[i]), placed all at
        once: each round, every bucket takes as many of the keys still unplaced that want it as
        it has room for (in slot order), and the others move on to the next bucket."""
        self._rows = np.zeros((buckets, _ROW), dtype=np.uint64)
        self._used = np.zeros(buckets, dtype=np.int64)
        self._mask = buckets - 1
        self._by_slot = np.zeros(buckets * _WIDTH // 2, dtype=np.uint64)
        self._by_slot[: by_slot.size] = by_slot
        self._place(0, by_slot.size)

    def _place(self, start: int, end: int) -> None:
        """Put slots start..end-1 (their keys in _by_slot) into the buckets, all at once."""
        rows, used, mask, by_slot = self._rows, self._used, self._mask, self._by_slot
        slots = rows.view(np.int32)
        todo = np.arange(start, end)
        bucket = (by_slot[start:end] & np.uint64(mask)).astype(np.intp)  # by slot - start
        while todo.size:
            b = bucket[todo - start]
            order = np.argsort(b, kind="stable")
            ordered = b[order]
            # Each key's rank among the keys wanting the same bucket this round.
            first = np.searchsorted(ordered, ordered, side="left")
            col = used[ordered] + np.arange(ordered.size) - first
            fits = col < _WIDTH
            won = todo[order[fits]]
            rows[ordered[fits], col[fits]] = by_slot[won]
            slots[ordered[fits], _SLOT0 + col[fits]] = won
            np.add.at(used, ordered[fits], 1)
            todo = todo[order[~fits]]
            bucket[todo - start] = (bucket[todo - start] + 1) & mask
