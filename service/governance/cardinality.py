"""Cardinality trackers: how many distinct series a metric (or anything else) has had lately.

Owns the stable series hash, a HyperLogLog sketch, a tracker that counts exactly up to a limit and
then by sketch, and the two-window tracker whose count goes down when series stop. Sans-IO: no
clock (callers pass the time in), no trio, no Python `hash()` (randomised per process).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import operator
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice

import attrs
import numpy as np
import xxhash

__all__ = [
    "DEFAULT_EXACT_LIMIT",
    "DEFAULT_PRECISION",
    "CardinalityTracker",
    "HyperLogLog",
    "SortedHashes",
    "WindowStats",
    "WindowedTracker",
    "hash_array",
    "hash_many",
    "series_hash",
    "top_k",
]

# 2^14 one-byte registers (16 KiB): standard error 1.04 / sqrt(2^14) = 0.81 %.
DEFAULT_PRECISION = 14
# Up to this many distinct series a tracker holds their hashes and counts exactly, 8 bytes a
# hash (SortedHashes), so 1000 of them are half a p=14 sketch; past it the sketch's ~0.8 % error
# no longer reads as a wrong count, while below it the numbers operators compare by eye (and
# per-metric limits in the hundreds) stay exact.
DEFAULT_EXACT_LIMIT = 1000

_MIN_PRECISION = 4
_MAX_PRECISION = 18  # 256 KiB of registers
# Exact mode reads iterables in chunks this long, so one huge batch cannot grow the set far past
# the limit before the tracker switches to a sketch.
_CHUNK = 4096
_ALPHA_INF = 1 / (2 * math.log(2))
# SortedHashes merges what was added into its array once that is a quarter of it (and more
# than a few).
_MERGE_SHARE = 4
_MERGE_MIN = 64
# A windowed tracker holds hashes added to it (as 8-byte array items) until this many, or until
# it is read or rolls: callers add a few series at a time (a request's new series of one metric
# or one label combination), and a tracker's per-call cost is ~10 us, many times its per-hash
# cost. Bounds what a tracker holds pending to 16 KiB.
_PENDING_MAX = 2048
# A sketch adds fewer hashes than this in a Python loop (~100 ns a hash), more with NumPy
# (~40-70 ns a hash from a list, ~8 us a call): measured even at ~128.
_FEW_HASHES = 128

_xxh3_64 = xxhash.xxh3_64_intdigest


def series_hash(data: bytes) -> int:
    """The identity of a series as an int in [0, 2^64): XXH3-64 (seed 0) of its canonical
    serialized labels (for remote write: the bytes of its `Label` fields, which the protocol
    sends sorted by name). The same in every process, replica and release."""
    return _xxh3_64(data)


def hash_array(keys: list[bytes]) -> np.ndarray:
    """`series_hash` of each key, in order, as a uint64 array (iterated in C)."""
    return np.fromiter(map(_xxh3_64, keys), dtype=np.uint64, count=len(keys))


def hash_cut(items: list[bytes], cut: slice) -> np.ndarray:
    """`series_hash` of each item's `cut` slice, in order, as a uint64 array: each slice is
    hashed as it is made and freed at once, so the slices' memory stays in the CPU's caches
    (a list of them would be a fresh copy of the request)."""
    keys = map(operator.getitem, items, itertools.repeat(cut))
    return np.fromiter(map(_xxh3_64, keys), dtype=np.uint64, count=len(items))


def hash_many(keys: Iterable[bytes]) -> list[int]:
    """`series_hash` of each key, in order (iterated in C: ~40 ns for a 250-byte key)."""
    return list(map(_xxh3_64, keys))


class HyperLogLog:
    """A HyperLogLog sketch of 64-bit hashes: 2^precision one-byte registers.

    The low `precision` bits of a hash choose the register; the register keeps the largest
    rank seen, the rank being the number of leading zeros of the other 64 - precision bits, plus
    one. count() uses Ertl's improved raw estimator ("New cardinality estimation algorithms for
    HyperLogLog sketches", 2017; also Redis' since 4.0): unbiased from 0 to far past 10^10
    distinct hashes without an empirical bias table or a switch between linear counting and the
    raw estimate, where the classic estimator is ~1.5 % high (at p=14, around 40-50k). With
    64-bit hashes no large-range correction is needed. Standard error 1.04 / sqrt(2^p).

    add_hashes works on a batch of _FEW_HASHES or more with NumPy, over a view of the registers:
    ~10-30 ns a hash from an array('Q'), ~40-70 ns from a list of ints, plus ~8 us a call;
    fewer go through a Python loop (~100 ns a hash). Hashes must be ints in [0, 2^64)
    (`series_hash` output); nothing checks that on the hot path.
    """

    __slots__ = ("_array", "_estimate", "_mask", "_p", "_regs")

    def __init__(self, precision: int = DEFAULT_PRECISION) -> None:
        if not _MIN_PRECISION <= precision <= _MAX_PRECISION:
            raise ValueError(
                f"precision must be in [{_MIN_PRECISION}, {_MAX_PRECISION}], got {precision}"
            )
        self._p = precision
        self._mask = (1 << precision) - 1
        # One buffer, two views: a bytearray for a few hashes at a time (a Python loop indexes
        # it cheaply), a NumPy array over the same bytes for batches.
        self._regs = bytearray(1 << precision)
        self._array = np.frombuffer(self._regs, dtype=np.uint8)
        self._estimate: float | None = 0.0  # count(), until a register changes

    @property
    def precision(self) -> int:
        return self._p

    @property
    def registers(self) -> bytes:
        """A copy of the registers (index = low bits of the hash)."""
        return bytes(self._regs)

    def add_hash(self, h: int) -> None:
        """Add one hash. For more than a few, add_hashes is cheaper per hash."""
        self._add_few((h,))

    def add_hashes(self, hashes: Iterable[int]) -> None:
        """Add every hash of an iterable (read once): an array('Q') or NumPy array as it is, a
        list, tuple or other iterable converted first; fewer than _FEW_HASHES in a loop."""
        if isinstance(hashes, list | tuple | array) and len(hashes) < _FEW_HASHES:
            self._add_few(hashes)
            return
        a = _as_u64(hashes)
        if not a.size:
            return
        p = self._p
        idx = (a & np.uint64(self._mask)).astype(np.intp)
        rest = a >> np.uint64(p)
        if p >= 11:  # rest < 2^53: exact as a double, whose exponent is its bit length
            length = np.frexp(rest.astype(np.float64))[1]
        else:  # bit length of each 32-bit half
            high = np.frexp((rest >> np.uint64(32)).astype(np.float64))[1]
            low = np.frexp((rest & np.uint64(0xFFFFFFFF)).astype(np.float64))[1]
            length = np.where(high > 0, high + 32, low)
        rank = (65 - p - length).astype(np.uint8)
        regs = self._array
        up = rank > regs[idx]
        if up.any():  # once the sketch has seen a lot, most hashes raise nothing
            np.maximum.at(regs, idx[up], rank[up])
            self._estimate = None

    def _add_few(self, hashes: Iterable[int]) -> None:
        regs = self._regs
        p = self._p
        mask = self._mask
        lim = 65 - p
        for h in hashes:
            r = lim - (h >> p).bit_length()
            i = h & mask
            if r > regs[i]:
                regs[i] = r
                self._estimate = None

    def count(self) -> float:
        """The estimated number of distinct hashes added. Cached until a register changes;
        otherwise ~30 us at p=14 (a histogram of the registers, then the estimator)."""
        if self._estimate is None:
            hist = np.bincount(self._array, minlength=66 - self._p).tolist()
            self._estimate = _estimate(hist, len(self._regs))
        return self._estimate

    def merge(self, other: HyperLogLog) -> None:
        """Make this sketch the union of itself and `other` (register-wise maximum): the same
        registers as one sketch fed both inputs. Raises ValueError if the precisions differ."""
        if other._p != self._p:
            raise ValueError(f"cannot merge precision {other._p} into precision {self._p}")
        np.maximum(self._array, other._array, out=self._array)
        self._estimate = None

    def copy(self) -> HyperLogLog:
        new = HyperLogLog(self._p)
        new._regs[:] = self._regs
        new._estimate = self._estimate
        return new

    def memory_bytes(self) -> int:
        # The array view's header (its data is the bytearray's).
        return sys.getsizeof(self) + sys.getsizeof(self._regs) + sys.getsizeof(self._array)

    def __repr__(self) -> str:
        return f"HyperLogLog(precision={self._p}, count={self.count():.1f})"


def _as_u64(hashes: Iterable[int]) -> np.ndarray:
    """Hashes as a uint64 array: without a copy from an array('Q') or a uint64 array."""
    if isinstance(hashes, np.ndarray):
        return hashes.astype(np.uint64, copy=False)
    if isinstance(hashes, array) and hashes.typecode == "Q":
        return np.frombuffer(hashes, dtype=np.uint64)
    if isinstance(hashes, list | tuple):
        return np.array(hashes, dtype=np.uint64)
    return np.fromiter(hashes, dtype=np.uint64)


def _estimate(hist: list[int], m: int) -> float:
    """Ertl's improved raw estimator (his algorithm 6) from the register histogram."""
    q = len(hist) - 2
    z = m * _tau(1 - hist[q + 1] / m)
    for k in range(q, 0, -1):
        z = 0.5 * (z + hist[k])
    z += m * _sigma(hist[0] / m)
    return _ALPHA_INF * m * m / z  # 0.0 when empty (z is infinite)


def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y = 1.0
    z = x
    while True:
        x *= x
        prev = z
        z += x * y
        y += y
        if z == prev:
            return z


def _tau(x: float) -> float:
    if x in (0.0, 1.0):
        return 0.0
    y = 1.0
    z = 1 - x
    while True:
        x = math.sqrt(x)
        prev = z
        y *= 0.5
        z -= (1 - x) ** 2 * y
        if z == prev:
            return z / 3


class SortedHashes:
    """A set of 64-bit hashes kept as a sorted array: 8 bytes a hash, where a Python set of ints
    costs ~80. Hashes added go into a small set as they come (a C-level update, whether or not
    the array holds them already) and are merged into the array, duplicates dropped, once that
    set is a quarter of it: one C-level pass (two sorted runs merged, then de-duplicated by a
    dict). Membership is a set lookup and a bisection. Made for sets that are added to a little
    at a time (series seen for the first time in a window) and read often."""

    __slots__ = ("_a", "_new")

    def __init__(self, hashes: Iterable[int] = ()) -> None:
        self._a = array("Q", sorted(set(hashes)))
        self._new: set[int] | None = None  # made when first needed: an empty set is 216 bytes

    def __len__(self) -> int:
        self._merge()
        return len(self._a)

    def at_most(self) -> int:
        """An upper bound of len() that merges nothing (a pending hash may be held twice)."""
        return len(self._a) + (len(self._new) if self._new else 0)

    def __iter__(self) -> Iterator[int]:
        self._merge()
        return iter(self._a)

    def __contains__(self, h: object) -> bool:
        if self._new and h in self._new:
            return True
        a = self._a
        i = bisect.bisect_left(a, h)  # type: ignore[call-overload]
        return i < len(a) and a[i] == h

    def add(self, h: int) -> bool:
        """Add one hash; True if it was not there."""
        if h in self:
            return False
        if self._new is None:
            self._new = set()
        self._new.add(h)
        self._maybe_merge()
        return True

    def update(self, hashes: Iterable[int]) -> None:
        if self._new is None:
            self._new = set(hashes)
        else:
            self._new.update(hashes)
        self._maybe_merge()

    def _maybe_merge(self) -> None:
        n = len(self._new) if self._new else 0
        if n > _MERGE_MIN and n * _MERGE_SHARE > len(self._a):
            self._merge()

    def _merge(self) -> None:
        if self._new:
            # Two sorted runs (Timsort merges them in one pass), then duplicates out.
            merged = sorted(itertools.chain(self._a, sorted(self._new)))
            self._a = array("Q", list(dict.fromkeys(merged)))  # a list: sized exactly
        self._new = None

    def union_len(self, other: SortedHashes) -> int:
        """len(self | other): C-level, O(both) (~40 ns a hash)."""
        self._merge()
        other._merge()
        return len(set(self._a).union(other._a))

    def copy(self) -> SortedHashes:
        self._merge()
        new = SortedHashes()
        new._a = array("Q", self._a)
        return new

    def memory_bytes(self) -> int:
        new = self._new
        pending = sys.getsizeof(new) + 48 * len(new) if new is not None else 0  # 48 a hash
        return sys.getsizeof(self) + sys.getsizeof(self._a) + pending


class CardinalityTracker:
    """Distinct series hashes: a SortedHashes of them up to `exact_limit`, then a HyperLogLog.

    While exact, count() is exact. When a hash beyond the limit arrives, every hash held goes
    into a new sketch and the array is dropped, so the count carries on from where it was
    (within the sketch's error) and memory stops growing: 8 bytes a hash while exact, 2^precision
    bytes after.
    """

    __slots__ = ("_exact", "_hll", "_limit", "_p")

    def __init__(
        self, exact_limit: int = DEFAULT_EXACT_LIMIT, precision: int = DEFAULT_PRECISION
    ) -> None:
        if exact_limit < 0:
            raise ValueError(f"exact_limit must be >= 0, got {exact_limit}")
        if not _MIN_PRECISION <= precision <= _MAX_PRECISION:
            raise ValueError(
                f"precision must be in [{_MIN_PRECISION}, {_MAX_PRECISION}], got {precision}"
            )
        self._limit = exact_limit
        self._p = precision
        self._exact: SortedHashes | None = SortedHashes()
        self._hll: HyperLogLog | None = None

    @property
    def is_exact(self) -> bool:
        return self._hll is None

    @property
    def exact_limit(self) -> int:
        return self._limit

    @property
    def precision(self) -> int:
        return self._p

    def add_hash(self, h: int) -> None:
        if self._hll is not None:
            self._hll.add_hash(h)
            return
        exact = self._exact
        assert exact is not None
        if exact.add(h) and exact.at_most() > self._limit and len(exact) > self._limit:
            self._switch()

    def add_hashes(self, hashes: Iterable[int]) -> None:
        """Add every hash of an iterable (read once): while exact, a C-level set update (and
        now and then a merge into the sorted array); a sketch's add_hashes after. A batch that
        takes the tracker past its limit goes to the new sketch straight from a set, without
        a pass through the sorted array."""
        hll = self._hll
        if hll is not None:
            hll.add_hashes(hashes)
            return
        exact = self._exact
        assert exact is not None
        limit = self._limit
        small = isinstance(hashes, list | tuple | array) and len(hashes) <= _CHUNK
        it = iter(() if small else hashes)
        while True:
            # Read as many as cannot take the set past the limit, and at least _CHUNK.
            chunk: Sequence[int] = (
                hashes if small else list(islice(it, max(limit + 1 - exact.at_most(), _CHUNK)))
            )
            small = False
            if not chunk:
                return
            if exact.at_most() + len(chunk) <= limit:
                exact.update(chunk)
                continue
            held = set(chunk)
            held.update(exact)
            if len(held) <= limit:
                exact.update(chunk)
                continue
            self._switch(held).add_hashes(it)
            return

    def count(self) -> int:
        """Distinct hashes added: exact while is_exact, else the sketch's estimate, rounded."""
        if self._hll is None:
            assert self._exact is not None
            return len(self._exact)
        return round(self._hll.count())

    def merge(self, other: CardinalityTracker) -> None:
        """Make this tracker count the union of both. Raises ValueError if precisions differ."""
        if other._p != self._p:
            raise ValueError(f"cannot merge precision {other._p} into precision {self._p}")
        if other._hll is None:
            assert other._exact is not None
            self.add_hashes(other._exact)
            return
        hll = self._hll if self._hll is not None else self._switch()
        hll.merge(other._hll)

    def copy(self) -> CardinalityTracker:
        new = CardinalityTracker(self._limit, self._p)
        if self._hll is None:
            assert self._exact is not None
            new._exact = self._exact.copy()
        else:
            new._exact = None
            new._hll = self._hll.copy()
        return new

    def memory_bytes(self) -> int:
        """An estimate of the bytes this tracker holds: the set and its ints while exact (an
        int counted as 48 bytes, which errs ~1 % high), the sketch after."""
        own = sys.getsizeof(self)
        if self._hll is None:
            assert self._exact is not None
            return own + self._exact.memory_bytes()
        return own + self._hll.memory_bytes()

    def _switch(self, held: set[int] | None = None) -> HyperLogLog:
        """Count by sketch from now on: every hash held goes into it (`held`: all of them as
        a set, when the caller has made one)."""
        assert self._exact is not None
        hll = HyperLogLog(self._p)
        hll.add_hashes(self._exact if held is None else list(held))
        self._exact = None
        self._hll = hll
        return hll

    def __repr__(self) -> str:
        mode = "exact" if self._hll is None else f"hll p={self._p}"
        return f"CardinalityTracker({mode}, count={self.count()}, limit={self._limit})"


@attrs.frozen
class WindowStats:
    """A look at a WindowedTracker: its count and the windows it comes from."""

    count: int  # distinct series in the previous and current windows together
    current: int
    previous: int
    window_start_s: float | None  # start of the current window (None before the first roll)
    exact: bool  # both windows still count exactly (so `count` is exact)
    memory_bytes: int


class WindowedTracker:
    """Distinct series seen in the current or the previous window: Prometheus' "active series"
    notion (seen lately), with series that stop sending dropping out of the count.

    Windows are aligned to multiples of `window_s` on the caller's clock (every replica rolls
    at the same instants). roll(now_s) moves to the window `now_s` falls in: the current window
    becomes the previous one, and a new empty one starts (both start empty when a whole window
    passed without a roll). So a series counts until the end of the window after the one that
    last saw it: between `window_s` and 2 x `window_s` after its last sample.

    count() is the size of the union of both windows, not the larger of the two: when series
    churn (pods replaced within a window), both generations are live in the backend, and the
    union says so; the larger of the two would count half of them.
    """

    __slots__ = (
        "_count",
        "_current",
        "_index",
        "_limit",
        "_p",
        "_pending",
        "_previous",
        "_union",
        "_window_s",
    )

    def __init__(
        self,
        window_s: float = 60.0,
        exact_limit: int = DEFAULT_EXACT_LIMIT,
        precision: int = DEFAULT_PRECISION,
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self._window_s = window_s
        self._limit = exact_limit
        self._p = precision
        self._current = CardinalityTracker(exact_limit, precision)
        self._previous = CardinalityTracker(exact_limit, precision)
        self._index: int | None = None  # which window is current: floor(now_s / window_s)
        self._count: int | None = 0  # count(), until the next add or roll
        # Once a window counts by sketch: both windows' union as a sketch, kept up to date by
        # add_hashes, so count() stays cheap (a sketch's estimate is cached until a register
        # rises) instead of a copy and a merge (~0.25 ms) after every add. Built at the first
        # count() that needs it, dropped at a roll.
        self._union: HyperLogLog | None = None
        # Added to the current window but not yet to its trackers (see _PENDING_MAX).
        self._pending: array[int] | None = None

    @property
    def window_s(self) -> float:
        return self._window_s

    def roll(self, now_s: float) -> bool:
        """Move to the window `now_s` (clock seconds) falls in; True if the windows moved. Call
        it before adding each batch. The first call only sets the window (what was added before
        belongs to it); a clock that went back does not roll."""
        index = math.floor(now_s / self._window_s)
        current = self._index
        if current is None:
            self._index = index
            return False
        if index <= current:
            return False
        self._flush()  # what is pending belongs to the window that ends
        if index == current + 1:
            self._previous = self._current
        else:
            self._previous = CardinalityTracker(self._limit, self._p)
        self._current = CardinalityTracker(self._limit, self._p)
        self._index = index
        self._count = None
        self._union = None
        return True

    def add_hash(self, h: int) -> None:
        self.add_hashes((h,))

    def add_hashes(self, hashes: Iterable[int]) -> None:
        """Add hashes to the current window. They are held (C-level, 8 bytes each) and go to
        the window's tracker in batches: when _PENDING_MAX are held, and before any read or
        roll, so what the tracker says is never behind what was added."""
        if isinstance(hashes, np.ndarray):
            hashes = hashes.astype(np.uint64, copy=False).tobytes()  # array() takes the bytes
        pending = self._pending
        if pending is None:
            pending = self._pending = array("Q", hashes)
        elif isinstance(hashes, bytes):
            pending.frombytes(hashes)
        else:
            pending.extend(hashes)
        self._count = None
        if len(pending) >= _PENDING_MAX:
            self._flush()

    def _flush(self) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._current.add_hashes(pending)
        if self._union is not None:
            self._union.add_hashes(pending)

    def count(self) -> int:
        """Distinct series in the previous and current windows together. Cached until the next
        add or roll; otherwise O(set size) while both windows are exact (~5 us at 1000 each),
        and the union sketch's estimate (cached until a register rises) once one is not."""
        if self._count is None:
            self._flush()
            cur, prev = self._current, self._previous
            if cur._exact is not None and prev._exact is not None:
                self._count = _union_count(cur, prev)
            else:
                union = self._union
                if union is None:
                    union = self._union = _sketch_of(prev, self._p)
                    union.merge(_sketch_of(cur, self._p))
                self._count = round(union.count())
        return self._count

    def current_count(self) -> int:
        """Distinct series in the current window alone."""
        self._flush()
        return self._current.count()

    def memory_bytes(self) -> int:
        union = self._union.memory_bytes() if self._union is not None else 0
        pending = sys.getsizeof(self._pending) if self._pending is not None else 0
        return self._current.memory_bytes() + self._previous.memory_bytes() + union + pending

    def statistics(self) -> WindowStats:
        self._flush()
        index = self._index
        return WindowStats(
            count=self.count(),
            current=self._current.count(),
            previous=self._previous.count(),
            window_start_s=None if index is None else index * self._window_s,
            exact=self._current.is_exact and self._previous.is_exact,
            memory_bytes=self.memory_bytes(),
        )

    def __repr__(self) -> str:
        return (
            f"WindowedTracker(window_s={self._window_s}, count={self.count()}, "
            f"current={self._current.count()}, previous={self._previous.count()})"
        )


def _sketch_of(t: CardinalityTracker, precision: int) -> HyperLogLog:
    """A new sketch holding what a tracker counts."""
    if t._hll is not None:
        return t._hll.copy()
    hll = HyperLogLog(precision)
    assert t._exact is not None
    hll.add_hashes(t._exact)
    return hll


def _union_count(a: CardinalityTracker, b: CardinalityTracker) -> int:
    if a._exact is not None and b._exact is not None:
        return a._exact.union_len(b._exact)
    if b._hll is not None:
        a, b = b, a  # copy the one with a sketch: cheaper than switching the other one
    union = a.copy()
    union.merge(b)
    return union.count()


def top_k(counts: Mapping[str, float], k: int) -> list[tuple[str, float]]:
    """The `k` entries with the largest counts, largest first; equal counts by name. For
    bounding a label set (e.g. series per metric on /metrics) to k values. O(n log k)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return heapq.nsmallest(k, counts.items(), key=lambda item: (-item[1], item[0]))
