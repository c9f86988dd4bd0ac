"""Tests for the cardinality trackers (service/governance/cardinality.py).

Inputs are deterministic: series are real remote-write label bytes (what prw.py hashes) with a
counter in the instance label, or 64-bit ints from a seeded random.Random. Sketch accuracy is
checked on one fixed input per size (a deterministic pass or fail, 2.5x the standard error of
0.81 %) and, in the range where the classic estimator is biased, as a mean over 32 sketches.
"""

from __future__ import annotations

import math
import random
import sys
import tracemalloc
from array import array
from collections.abc import Iterator

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service._proto.prometheus.types_pb2 import Label, TimeSeries
from service.governance.cardinality import (
    DEFAULT_EXACT_LIMIT,
    CardinalityTracker,
    HyperLogLog,
    SortedHashes,
    WindowedTracker,
    WindowStats,
    hash_many,
    series_hash,
    top_k,
)

# A series' labels as prw.py's `keys` holds them: a TimeSeries with only its Label fields,
# serialized; the instance label has a fixed width, so every key has the same length bytes.
_KEY = b"\n\x1f\n\x08__name__\x12\x13http_requests_total\n\x16\n\x08instance\x12\n%010d"


def _series(start: int, stop: int) -> list[int]:
    """The hashes of series start..stop-1 (distinct series, distinct keys)."""
    return hash_many(map(_KEY.__mod__, range(start, stop)))


def _series_chunks(n: int, chunk: int = 1 << 20) -> Iterator[list[int]]:
    for start in range(0, n, chunk):
        yield _series(start, min(start + chunk, n))


def _random_hashes(seed: int, n: int) -> list[int]:
    """n uniform 64-bit ints (distinct with probability 1 - n^2 / 2^65)."""
    a = array("Q", random.Random(seed).randbytes(8 * n))
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


def _reference_registers(hashes: list[int], p: int) -> bytes:
    """HyperLogLog registers by the definition: register = hash mod 2^p, rank = leading zeros
    of the other 64 - p bits, plus one; each register keeps the largest rank."""
    q = 64 - p
    regs = [0] * (1 << p)
    for h in hashes:
        bits = format(h >> p, f"0{q}b")
        rank = (bits + "1").index("1") + 1
        i = h % (1 << p)
        regs[i] = max(regs[i], rank)
    return bytes(regs)


def _hll(hashes: list[int], p: int = 14) -> HyperLogLog:
    h = HyperLogLog(p)
    h.add_hashes(hashes)
    return h


# ---- the series hash ---------------------------------------------------------------------------


def test_key_is_what_remote_write_hashes() -> None:
    ts = TimeSeries(
        labels=[
            Label(name="__name__", value="http_requests_total"),
            Label(name="instance", value="0000000042"),
        ]
    )
    assert ts.SerializeToString() == _KEY % 42


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x2D06800538D394C2),  # XXH3-64's published test vector for empty input
        (b"a", 0xE6C632B61E964E1F),
        (b"\n\x1f\n\x08__name__\x12\x13http_requests_total", 0xBE31CBF169076A07),
        (_KEY % 42, 0x5AB7D09787B46EBB),
    ],
)
def test_series_hash_is_pinned(data: bytes, expected: int) -> None:
    """Series hashes shard series across replicas and must not change between releases."""
    assert series_hash(data) == expected
    assert hash_many([data, data]) == [expected, expected]


def test_hash_many_is_series_hash_in_order() -> None:
    keys = [_KEY % i for i in range(1000)]
    hashes = hash_many(keys)
    assert hashes == [series_hash(k) for k in keys]
    assert len(set(hashes)) == 1000
    assert all(0 <= h < 2**64 for h in hashes)
    assert hash_many(iter(keys[:3])) == hashes[:3]
    assert hash_many([]) == []


# ---- HyperLogLog -------------------------------------------------------------------------------


def test_registers_follow_the_definition() -> None:
    p = 14
    crafted = [
        0,  # register 0, all 50 rank bits zero: rank 51
        1 << 63,  # register 0, rank 1 (loses to the 51)
        (1 << 14) - 1 | 1 << 40,  # register 16383, rank bits 1 << 26: 23 leading zeros, rank 24
        5 | 1 << 14,  # register 5, rank 50
        5 | 1 << 63,  # register 5, rank 1 (loses)
        7 | 1 << 62,  # register 7, rank 2
    ]
    regs = _hll(crafted, p).registers
    assert (regs[0], regs[16383], regs[5], regs[7]) == (51, 24, 50, 2)
    assert sum(1 for r in regs if r) == 4
    assert regs == _reference_registers(crafted, p)


@pytest.mark.parametrize("p", [4, 10, 14, 18])
def test_bulk_add_matches_the_definition(p: int) -> None:
    """add_hashes skips hashes that cannot raise a register; that must change nothing, also
    once every register is well above zero."""
    hashes = _random_hashes(p, 300_000)
    h = HyperLogLog(p)
    for start in range(0, len(hashes), 30_000):
        h.add_hashes(hashes[start : start + 30_000])
    assert h.registers == _reference_registers(hashes, p)
    if p <= 10:
        assert min(h.registers) > 3  # the skipping was in play

    one_by_one = HyperLogLog(p)
    for x in hashes[:20_000]:
        one_by_one.add_hash(x)
    assert one_by_one.registers == _reference_registers(hashes[:20_000], p)


def test_order_and_duplicates_do_not_matter() -> None:
    hashes = _random_hashes(1, 50_000)
    shuffled = hashes * 2
    random.Random(2).shuffle(shuffled)
    a = _hll(hashes)
    b = _hll(shuffled)
    assert a.registers == b.registers
    assert a.count() == b.count()


def test_empty_and_tiny() -> None:
    h = HyperLogLog()
    assert h.count() == 0.0
    h.add_hashes([series_hash(b"x")] * 1000)
    assert h.count() == pytest.approx(1.0, abs=1e-3)
    h.add_hashes(_series(0, 100))
    assert h.count() == pytest.approx(101, abs=1.0)


def test_count_follows_adds() -> None:
    h = HyperLogLog()
    h.add_hashes(_series(0, 5000))
    first = h.count()
    assert h.count() == first
    h.add_hash(series_hash(b"one more"))
    h.add_hashes(_series(5000, 6000))
    assert h.count() > first
    assert h.count() == pytest.approx(6001, rel=0.02)


def _reference_estimate(registers: bytes, p: int) -> float:
    """Ertl's improved raw estimator, algorithm 6 of "New cardinality estimation algorithms for
    HyperLogLog sketches" (2017), over the full register histogram."""

    def sigma(x: float) -> float:
        if x == 1:
            return math.inf
        y, z = 1.0, x
        while True:
            x *= x
            z_old, z = z, z + x * y
            y += y
            if z == z_old:
                return z

    def tau(x: float) -> float:
        if x in (0, 1):
            return 0.0
        y, z = 1.0, 1 - x
        while True:
            x = math.sqrt(x)
            y *= 0.5
            z_old, z = z, z - (1 - x) ** 2 * y
            if z == z_old:
                return z / 3

    m, q = 1 << p, 64 - p
    c = [registers.count(k) for k in range(q + 2)]
    z = m * tau(1 - c[q + 1] / m)
    for k in range(q, 0, -1):
        z = 0.5 * (z + c[k])
    z += m * sigma(c[0] / m)
    return m * m / (2 * math.log(2)) / z


@pytest.mark.parametrize("p", [4, 14, 18])
def test_count_is_the_improved_raw_estimator(p: int) -> None:
    h = HyperLogLog(p)
    assert h.count() == _reference_estimate(h.registers, p) == 0.0
    rng = random.Random(p)
    for n in [1, 10, 1000, 100_000, 1_000_000]:
        h.add_hashes(_random_hashes(rng.randrange(2**32), n))
        assert h.count() == pytest.approx(_reference_estimate(h.registers, p), rel=1e-12)
    h.add_hash(0)  # a register at the largest rank, 65 - p
    assert h.count() == pytest.approx(_reference_estimate(h.registers, p), rel=1e-12)


@pytest.mark.parametrize("n", [10_000, 100_000, 1_000_000, 10_000_000])
def test_accuracy_within_2_percent(n: int) -> None:
    h = HyperLogLog()
    for chunk in _series_chunks(n):
        h.add_hashes(chunk)
    assert h.count() == pytest.approx(n, rel=0.02)


def test_unbiased_where_linear_counting_hands_over() -> None:
    """Around 2.5 x 2^p distinct hashes the classic estimator switches from linear counting to
    the raw estimate and reads ~1.5 % high on average; this one must not: the mean error over
    32 sketches stays within 0.5 %, and their RMS error near the standard error 0.81 %."""
    n = 45_000
    errors = [_hll(_random_hashes(100 + seed, n)).count() / n - 1 for seed in range(32)]
    mean = sum(errors) / len(errors)
    rms = (sum(e * e for e in errors) / len(errors)) ** 0.5
    assert abs(mean) < 0.005
    assert rms < 0.012


def test_merge_is_union() -> None:
    a_hashes = _series(0, 60_000)
    b_hashes = _series(40_000, 100_000)
    a = _hll(a_hashes)
    b = _hll(b_hashes)
    b_before = b.registers
    a.merge(b)
    assert a.registers == _hll(_series(0, 100_000)).registers
    assert a.count() == pytest.approx(100_000, rel=0.02)
    assert b.registers == b_before
    b.merge(_hll(a_hashes))
    assert b.registers == a.registers

    # Adding after a merge still skips correctly (the merge raised the lowest register).
    c = _hll(_random_hashes(7, 400_000))
    c.merge(_hll(_random_hashes(8, 400_000)))
    more = _random_hashes(9, 100_000)
    c.add_hashes(more)
    everything = _random_hashes(7, 400_000) + _random_hashes(8, 400_000) + more
    assert c.registers == _reference_registers(everything, 14)

    empty = HyperLogLog()
    empty.merge(HyperLogLog())
    assert empty.count() == 0.0
    with pytest.raises(ValueError, match="precision 12 into precision 14"):
        a.merge(HyperLogLog(12))


def test_copy_is_independent() -> None:
    a = _hll(_series(0, 1000))
    b = a.copy()
    b.add_hashes(_series(1000, 2000))
    assert a.registers == _hll(_series(0, 1000)).registers
    assert b.registers == _hll(_series(0, 2000)).registers


@pytest.mark.parametrize("p", [3, 19])
def test_precision_out_of_range(p: int) -> None:
    with pytest.raises(ValueError, match=r"precision must be in \[4, 18\]"):
        HyperLogLog(p)
    with pytest.raises(ValueError, match=r"precision must be in \[4, 18\]"):
        CardinalityTracker(precision=p)


def test_sketch_memory_is_its_registers() -> None:
    h = _hll(_random_hashes(3, 200_000))
    assert 2**14 <= h.memory_bytes() < 2**14 + 1024
    assert HyperLogLog(10).memory_bytes() < 2**10 + 1024
    assert repr(h).startswith("HyperLogLog(precision=14, count=")


# ---- CardinalityTracker ------------------------------------------------------------------------


def test_exact_up_to_the_limit() -> None:
    t = CardinalityTracker(exact_limit=1000)
    t.add_hashes(_series(0, 600))
    t.add_hashes(_series(300, 1000))  # half of them again
    t.add_hash(series_hash(_KEY % 5))
    assert (t.count(), t.is_exact) == (1000, True)
    t.add_hash(series_hash(_KEY % 1000))
    assert not t.is_exact
    assert t.count() == pytest.approx(1001, rel=0.02)
    assert CardinalityTracker().exact_limit == DEFAULT_EXACT_LIMIT


@pytest.mark.parametrize("limit", [100, 1000, 10_000, 100_000])
def test_switch_keeps_the_count_continuous(limit: int) -> None:
    """The sketch receives every hash the set held: just after the switch it has the same
    registers as a sketch that saw everything, and the count moves by less than 2 %."""
    t = CardinalityTracker(exact_limit=limit)
    t.add_hashes(_series(0, limit))
    before = t.count()
    assert (before, t.is_exact) == (limit, True)
    t.add_hash(series_hash(_KEY % limit))
    after = t.count()
    assert not t.is_exact
    assert abs(after - before) / before < 0.02
    assert t._hll is not None
    assert t._hll.registers == _hll(_series(0, limit + 1)).registers


@pytest.mark.parametrize("as_list", [True, False])
def test_one_batch_across_the_limit(as_list: bool) -> None:
    """A batch much larger than the limit (a list, or an iterator read once) goes into the set
    only until the limit is crossed, then into the sketch: no hash is lost or read twice."""
    hashes = _series(0, 100_000)
    read: list[int] = []

    def reading() -> Iterator[int]:
        for x in hashes:
            read.append(x)
            yield x

    t = CardinalityTracker(exact_limit=1000)
    t.add_hashes(hashes if as_list else reading())
    assert not t.is_exact
    assert t._hll is not None
    assert t._hll.registers == _hll(hashes).registers
    assert t.count() == pytest.approx(100_000, rel=0.02)
    if not as_list:
        assert read == hashes


def test_limit_zero_is_a_sketch_from_the_first_hash() -> None:
    t = CardinalityTracker(exact_limit=0)
    assert t.count() == 0
    t.add_hash(series_hash(b"a"))
    assert (t.is_exact, t.count()) == (False, 1)
    with pytest.raises(ValueError, match="exact_limit must be >= 0"):
        CardinalityTracker(exact_limit=-1)


def test_merge_trackers() -> None:
    a = CardinalityTracker(exact_limit=1000)
    a.add_hashes(_series(0, 400))
    b = CardinalityTracker(exact_limit=1000)
    b.add_hashes(_series(200, 700))
    a.merge(b)
    assert (a.count(), a.is_exact) == (700, True)

    c = CardinalityTracker(exact_limit=1000)
    c.add_hashes(_series(500, 1500))  # a sketch now
    a.merge(c)
    assert not a.is_exact
    assert a.count() == pytest.approx(1500, rel=0.02)
    assert a._hll is not None
    assert a._hll.registers == _hll(_series(0, 1500)).registers

    d = CardinalityTracker(exact_limit=1000)
    d.add_hashes(_series(0, 300))
    c.merge(d)  # exact into a sketch
    assert c._hll is not None
    assert c._hll.registers == _hll(_series(0, 300) + _series(500, 1500)).registers
    with pytest.raises(ValueError, match="precision 12 into precision 14"):
        a.merge(CardinalityTracker(precision=12))


def test_memory_of_a_million_series_is_bounded() -> None:
    t = CardinalityTracker()
    t.add_hashes(_series(0, 100_000))
    at_100k = t.memory_bytes()
    for chunk in _series_chunks(1_000_000):
        t.add_hashes(chunk)
    assert t.memory_bytes() == at_100k < 50_000_000
    assert at_100k < 2**14 + 1024  # the sketch

    # The most a default tracker holds: its set, just below the switch.
    full = CardinalityTracker()
    full.add_hashes(_series(0, DEFAULT_EXACT_LIMIT))
    assert full.is_exact
    assert full.memory_bytes() < 10 * DEFAULT_EXACT_LIMIT  # 8 bytes a hash, and the array


def test_exact_memory_estimate_matches_allocations() -> None:
    """memory_bytes() while exact is what its sorted array of hashes allocates (8 bytes a
    hash), as tracemalloc sees it, to within the few hundred bytes of the objects around it."""
    keys = [_KEY % i for i in range(100_000)]
    t = CardinalityTracker(exact_limit=200_000)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        t.add_hashes(hash_many(keys))
        allocated = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert t.is_exact
    assert abs(t.memory_bytes() - allocated) <= 512
    assert t.memory_bytes() <= 8 * 100_000 + 512


def test_tracker_repr() -> None:
    t = CardinalityTracker(exact_limit=10)
    t.add_hashes(_series(0, 5))
    assert repr(t) == "CardinalityTracker(exact, count=5, limit=10)"
    t.add_hashes(_series(5, 20))
    assert repr(t) == "CardinalityTracker(hll p=14, count=20, limit=10)"


# ---- WindowedTracker ---------------------------------------------------------------------------


def test_stopped_series_count_down_after_one_to_two_windows() -> None:
    w = WindowedTracker(window_s=60.0)
    assert w.roll(1000.0) is False  # the first call only sets the window: [960, 1020)
    w.add_hashes(_series(0, 100))
    assert w.count() == 100
    assert w.roll(1019.9) is False
    w.add_hashes(_series(0, 50))  # series 50..99 stop here, at 1019.9
    assert w.roll(1020.0) is True
    assert w.count() == 100  # all seen in the last window
    w.add_hashes(_series(0, 50))
    assert w.count() == 100
    assert w.roll(1080.0) is True
    assert w.count() == 50  # 50..99 dropped out 60.1 s after their last sample
    stats = w.statistics()
    assert attrs.evolve(stats, memory_bytes=0) == WindowStats(
        count=50, current=0, previous=50, window_start_s=1080.0, exact=True, memory_bytes=0
    )
    assert 0 < stats.memory_bytes < 10_000
    assert w.roll(1200.0) is True  # a whole window passed without a roll
    assert w.count() == 0


def test_a_series_counts_for_at_most_two_windows() -> None:
    w = WindowedTracker(window_s=10.0)
    w.roll(0.0)
    w.add_hash(series_hash(b"early"))  # at the start of [0, 10): counted until 20
    w.roll(9.99)
    w.add_hash(series_hash(b"late"))  # at the end of [0, 10): also counted until 20
    w.roll(19.99)
    assert w.count() == 2
    w.roll(20.0)
    assert w.count() == 0


def test_churn_counts_both_generations() -> None:
    """Series replaced within a window (new pods) are all live in the backend: the count is
    the union of the two windows, not the larger of them."""
    w = WindowedTracker(window_s=60.0)
    w.roll(0.0)
    w.add_hashes(_series(0, 300))
    w.roll(60.0)
    w.add_hashes(_series(300, 600))
    assert w.count() == 600
    stats = w.statistics()
    assert (stats.current, stats.previous, stats.count) == (300, 300, 600)


def test_clock_going_back_does_not_roll() -> None:
    w = WindowedTracker(window_s=60.0)
    w.add_hashes(_series(0, 10))  # before the first roll: belongs to the first window
    w.roll(120.0)
    assert w.roll(90.0) is False
    assert w.roll(119.0) is False
    assert w.count() == 10
    assert w.statistics().window_start_s == 120.0
    assert WindowedTracker().statistics().window_start_s is None


def test_windows_union_sketch_follows_later_adds() -> None:
    """After a count, hashes added to the current window reach the union too: the count after
    each add is the union's, with nothing counted twice."""
    w = WindowedTracker(window_s=60.0, exact_limit=100)
    w.roll(0.0)
    w.add_hashes(_series(0, 20_000))
    w.roll(60.0)
    w.add_hashes(_series(10_000, 30_000))
    assert w.count() == pytest.approx(30_000, rel=0.02)
    w.add_hashes(_series(30_000, 40_000))
    assert w.count() == pytest.approx(40_000, rel=0.02)
    assert w.statistics().current == pytest.approx(30_000, rel=0.02)
    w.add_hashes(_series(0, 40_000))  # all seen already: no change
    assert w.count() == pytest.approx(40_000, rel=0.02)


def test_windows_with_sketches() -> None:
    """Past the exact limit each window is a sketch, and once counted, their union is a third
    one kept up to date (so counting after each add stays cheap): memory is three sketches,
    whatever the number of series, and the union keeps counting what is added after it."""
    w = WindowedTracker(window_s=60.0, exact_limit=100)
    w.roll(0.0)
    w.add_hashes(_series(0, 20_000))
    w.roll(60.0)
    w.add_hashes(_series(10_000, 30_000))
    stats = w.statistics()
    assert not stats.exact
    assert stats.count == pytest.approx(30_000, rel=0.02)
    assert stats.current == pytest.approx(20_000, rel=0.02)
    assert stats.memory_bytes < 3 * (2**14 + 1024)
    w.roll(120.0)
    w.add_hashes(_series(10_000, 10_050))  # a small current window, exact
    assert w.count() == pytest.approx(20_000, rel=0.02)
    assert repr(w).startswith("WindowedTracker(window_s=60.0, count=")


def test_windows_hold_small_adds_back_without_counting_them_late() -> None:
    """Hashes added a few at a time are held and go to the window's tracker in bulk, but every
    read sees them, and a roll puts them in the window they were added in, not the next one;
    what is held never exceeds 2048 hashes (16 KiB)."""
    w = WindowedTracker(window_s=60.0, exact_limit=100)
    w.roll(0.0)
    hashes = _series(0, 5000)
    for start in range(0, 3000, 3):
        w.add_hashes(hashes[start : start + 3])
        pending = w._pending
        assert pending is None or len(pending) < 2048
    assert w.current_count() == pytest.approx(3000, rel=0.02)
    w.add_hashes(hashes[3000:3010])
    w.roll(60.0)  # the 10 belong to the window that ended
    assert w.statistics().previous == pytest.approx(3010, rel=0.02)
    assert w.statistics().current == 0
    w.add_hashes(hashes[4000:4005])
    assert (w.current_count(), w.statistics().current) == (5, 5)
    assert w.count() == pytest.approx(3015, rel=0.02)


@pytest.mark.parametrize("p", [4, 10, 11, 14, 18])
def test_ranks_at_every_bit_length(p: int) -> None:
    """A rank is right for every length of the rank bits (2^k - 1 and 2^k), the lengths where
    a bit count by floating point could be off by one."""
    q = 64 - p
    hashes = []
    for k in range(q + 1):
        for rest in {(1 << k) - 1, min(1 << k, (1 << q) - 1)}:
            hashes.append(rest << p | len(hashes) % (1 << p))
    expected = _reference_registers(hashes, p)
    assert len(hashes) < 128  # a short list: the Python loop
    assert _hll(hashes, p).registers == expected
    batch = HyperLogLog(p)
    batch.add_hashes(np.array(hashes, dtype=np.uint64))  # an array: NumPy, whatever its length
    assert batch.registers == expected
    one_by_one = HyperLogLog(p)
    for h in hashes:
        one_by_one.add_hash(h)
    assert one_by_one.registers == expected


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s must be > 0"):
        WindowedTracker(window_s=0)


def test_window_stats_are_frozen() -> None:
    stats = WindowedTracker().statistics()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.count = 1  # type: ignore[misc]


# ---- top_k -------------------------------------------------------------------------------------


def test_top_k() -> None:
    counts = {"b": 5, "a": 5, "c": 9, "d": 1, "e": 5}
    assert top_k(counts, 3) == [("c", 9), ("a", 5), ("b", 5)]
    assert top_k(counts, 10) == [("c", 9), ("a", 5), ("b", 5), ("e", 5), ("d", 1)]
    assert top_k(counts, 0) == []
    assert top_k({}, 3) == []
    with pytest.raises(ValueError, match="k must be >= 0"):
        top_k(counts, -1)


# ---- SortedHashes ----------------------------------------------------------------------------


@given(
    st.lists(st.lists(st.integers(0, 2**64 - 1), max_size=60), max_size=8),
    st.lists(st.integers(0, 2**64 - 1), max_size=40),
)
def test_sorted_hashes_behave_as_a_set_of_ints(batches: list[list[int]], probes: list[int]) -> None:
    """SortedHashes holds what a set of the same hashes holds, whatever the batch sizes (small
    batches are inserted one by one, large ones merged): same length, same members, same union
    size with another, iteration in ascending order."""
    sh = SortedHashes()
    ref: set[int] = set()
    for batch in batches:
        sh.update(batch)
        ref.update(batch)
        assert len(sh) == len(ref)
    assert list(sh) == sorted(ref)
    for h in probes + list(ref)[:10]:
        assert (h in sh) == (h in ref)
    other = SortedHashes(probes)
    assert sh.union_len(other) == other.union_len(sh) == len(ref | set(probes))
    assert sh.add(2**64 - 1) == (2**64 - 1 not in ref)
    assert sh.copy() is not sh and list(sh.copy()) == list(sh)
