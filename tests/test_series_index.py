"""SeriesIndex: series hashes to slots, in the order added, looked up a request at a time."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.governance.series_index import SeriesIndex

_hashes = st.integers(min_value=0, max_value=2**64 - 1)


def test_slots_are_given_in_the_order_hashes_are_added_and_absent_hashes_are_minus_one() -> None:
    index = SeriesIndex()
    assert [index.add(h) for h in (7, 2**64 - 1, 12345)] == [0, 1, 2]
    got = index.lookup(np.array([12345, 8, 7, 2**64 - 1, 12345], dtype=np.uint64))
    assert got.tolist() == [2, -1, 0, 1, 2]
    assert (len(index), index.get(8), index.get(2**64 - 1)) == (3, -1, 1)


def test_a_hash_of_zero_is_held_like_any_other() -> None:
    index = SeriesIndex()
    assert index.get(0) == -1
    assert index.add(0) == 0
    assert index.lookup(np.array([0, 0], dtype=np.uint64)).tolist() == [0, 0]


def test_hashes_that_share_a_bucket_overflow_into_the_next_ones() -> None:
    """Hashes equal in their low bits all want the same (last) bucket: past its 8 cells they
    go on into the next buckets, wrapping around to the first, and are all found, also after
    the table grows and after an eviction rebuilds it."""
    index = SeriesIndex()
    same_bucket = [1023 | i << 40 for i in range(1, 600)]
    for h in same_bucket:
        index.add(h)
    looked = index.lookup(np.array(same_bucket[::-1], dtype=np.uint64))
    assert looked.tolist() == list(range(len(same_bucket)))[::-1]
    assert index.get(1023 | 700 << 40) == -1
    index.keep_newest(300)
    looked = index.lookup(np.array(same_bucket, dtype=np.uint64))
    assert looked.tolist() == [-1] * 299 + list(range(300))


@settings(max_examples=60, deadline=None)
@given(st.lists(_hashes, max_size=3000, unique=True), st.lists(_hashes, max_size=200))
def test_lookups_agree_with_a_dict(added: list[int], others: list[int]) -> None:
    index = SeriesIndex()
    expected = {}
    for h in added:
        expected[h] = index.add(h)
    queries = added[::7] + others
    got = index.lookup(np.array(queries, dtype=np.uint64))
    assert got.tolist() == [expected.get(h, -1) for h in queries]
    assert len(index) == len(added)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(_hashes, max_size=700), max_size=6))
def test_adding_many_at_once_is_adding_them_one_by_one(batches: list[list[int]]) -> None:
    """add_many gives a batch the next slots in order, as add would one by one, across the
    table's growth; both tables then answer every lookup the same."""
    seen: set[int] = set()
    for b in batches:  # each hash once, in its first batch
        b[:] = [h for h in dict.fromkeys(b) if h not in seen]
        seen.update(b)
    one, many = SeriesIndex(), SeriesIndex()
    for batch in batches:
        expected = [one.add(h) for h in batch]
        assert many.add_many(np.array(batch, dtype=np.uint64)).tolist() == expected
    everything = [h for b in batches for h in b] + [12345678901234567]
    queries = np.array(everything, dtype=np.uint64)
    assert many.lookup(queries).tolist() == one.lookup(queries).tolist()
    assert len(many) == len(one)


@settings(max_examples=30, deadline=None)
@given(st.lists(_hashes, min_size=1, max_size=3000, unique=True), st.integers(0, 3000))
def test_keeping_the_newest_renumbers_them_in_order_and_forgets_the_rest(
    added: list[int], keep: int
) -> None:
    index = SeriesIndex()
    for h in added:
        index.add(h)
    cut = index.keep_newest(keep)
    kept = added[cut:]
    assert cut == max(0, len(added) - keep)
    assert len(index) == len(kept)
    got = index.lookup(np.array(added, dtype=np.uint64))
    assert got.tolist() == [-1] * cut + list(range(len(kept)))
    assert index.add(2**64 - 2 if 2**64 - 2 not in added else 3) == len(kept)


def test_memory_is_at_most_64_bytes_a_series_and_the_table_at_most_half_full() -> None:
    index = SeriesIndex()
    for h in range(1, 100_001):
        index.add(h * 0x9E3779B1)
    assert 2 * len(index) <= index.memory_bytes() // 16 <= 4 * len(index)
