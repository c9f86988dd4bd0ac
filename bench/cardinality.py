"""Cardinality tracker microbenchmark: the cost of counting distinct series, in time and memory.

    .venv/bin/python bench/cardinality.py [--sizes 100000,1000000,10000000] [--batch 1000]
                                          [--json-out PATH]

Fill. For each size N and mode, a fresh process makes one CardinalityTracker and adds N distinct
series hashes (uniform 64-bit ints from a seeded random.Random: what `series_hash` returns) in
batches of `--batch` (a 1000-series request), timing only the add_hashes calls:

- `exact`: exact_limit above N, so the tracker stays a set of hashes (what every tracker below
  its limit costs, per series);
- `hll`: the default tracker (exact up to 1000, then a p=14 HyperLogLog).

"add ns/hash" is over the whole fill, "last 10 %" over its last tenth (a sketch gets cheaper as
it fills: hashes that cannot raise a register are dropped in C). Memory is the tracker's own
memory_bytes() and the process's RSS growth from before the tracker was made to after the fill
(gc'd; generated hashes are freed batch by batch, except those the set keeps), both per million
series. count() is the median of repeated calls without the cache (a sketch's estimator rerun).

Batch size. At 1M series, the cost per hash against the batch size (1 = add_hash per series).

Hashing. `hash_many` over 1000-key batches of real remote-write label bytes (a TimeSeries with 10
labels, serialized, as prw.py's `keys`), and a WindowedTracker's count() (the union of its two
windows, uncached) with both windows exact and with both sketches.

Wall-clock timings (perf_counter); prints figures, asserts nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/queue.py would shadow the standard library's `queue` for anything that imports it:
# move bench/ to the end of sys.path, as the other benchmarks do.
# ruff: noqa: E402
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH] + [str(_BENCH)]

import argparse
import gc
import json
import random
import statistics
import subprocess
import time
from array import array
from collections.abc import Iterator
from typing import Any

import psutil

from service._proto.prometheus.types_pb2 import Label, TimeSeries
from service.governance.cardinality import (
    DEFAULT_EXACT_LIMIT,
    CardinalityTracker,
    HyperLogLog,
    WindowedTracker,
    hash_many,
)

MB = 1e6


def _batches(seed: int, n: int, batch: int) -> Iterator[list[int]]:
    rng = random.Random(seed)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        yield array("Q", rng.randbytes(8 * b)).tolist()


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _count_cost_s(tracker: CardinalityTracker, reps: int = 50) -> float:
    times = []
    for _ in range(reps):
        if tracker._hll is not None:
            tracker._hll._estimate = None  # rerun the estimator
        t0 = time.perf_counter()
        tracker.count()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fill(mode: str, n: int, batch: int) -> dict[str, Any]:
    """One tracker, n hashes: run in a fresh process, so RSS growth is this tracker's."""
    limit = n + 1 if mode == "exact" else DEFAULT_EXACT_LIMIT
    rss0 = _rss()
    tracker = CardinalityTracker(exact_limit=limit)
    add = tracker.add_hashes
    clock = time.perf_counter
    total = 0.0
    last_tenth = 0.0
    tail_from = n - n // 10
    done = 0
    for hashes in _batches(1, n, batch):
        t0 = clock()
        add(hashes)
        dt = clock() - t0
        total += dt
        if done >= tail_from:
            last_tenth += dt
        done += len(hashes)
    rss1 = _rss()
    return {
        "mode": mode,
        "n": n,
        "batch": batch,
        "exact": tracker.is_exact,
        "count": tracker.count(),
        "add_ns": total / n * 1e9,
        "add_ns_last_tenth": last_tenth / (n - tail_from) * 1e9,
        "count_us": _count_cost_s(tracker) * 1e6,
        "memory_bytes": tracker.memory_bytes(),
        "rss_growth_bytes": rss1 - rss0,
    }


def batch_sizes(mode: str, n: int, batch: int) -> dict[str, Any]:
    limit = n + 1 if mode == "exact" else DEFAULT_EXACT_LIMIT
    tracker = CardinalityTracker(exact_limit=limit)
    clock = time.perf_counter
    total = 0.0
    for hashes in _batches(2, n, max(batch, 1000)):
        if batch == 1:
            add_hash = tracker.add_hash
            t0 = clock()
            for h in hashes:
                add_hash(h)
            total += clock() - t0
        else:
            for start in range(0, len(hashes), batch):
                part = hashes[start : start + batch]
                t0 = clock()
                tracker.add_hashes(part)
                total += clock() - t0
    return {"mode": mode, "n": n, "batch": batch, "add_ns": total / n * 1e9}


def hashing(n: int = 1_000_000, batch: int = 1000) -> dict[str, Any]:
    def key(i: int) -> bytes:
        labels = [Label(name="__name__", value=f"metric_{i % 50}_total")]
        labels += [Label(name=f"label_{j}", value=f"value-{j}-{i}") for j in range(9)]
        return TimeSeries(labels=labels).SerializeToString()

    pool = [[key(b * batch + i) for i in range(batch)] for b in range(20)]
    clock = time.perf_counter
    total = 0.0
    for r in range(n // batch):
        keys = pool[r % len(pool)]
        t0 = clock()
        hash_many(keys)
        total += clock() - t0
    key_bytes = statistics.mean(len(k) for k in pool[0])
    return {"hash_many_ns": total / n * 1e9, "key_bytes": key_bytes}


def window_counts() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, per_window in (("exact", DEFAULT_EXACT_LIMIT), ("hll", 1_000_000)):
        w = WindowedTracker(window_s=60.0)
        w.roll(0.0)
        for hashes in _batches(3, per_window, 10_000):
            w.add_hashes(hashes)
        w.roll(60.0)
        for hashes in _batches(4, per_window, 10_000):
            w.add_hashes(hashes)
        times = []
        for _ in range(30):
            w._count = None
            t0 = time.perf_counter()
            w.count()
            times.append(time.perf_counter() - t0)
        out[name] = {"per_window": per_window, "count_us": statistics.median(times) * 1e6}
    # one sketch's estimator, for reference
    h = HyperLogLog()
    for hashes in _batches(5, 1_000_000, 100_000):
        h.add_hashes(hashes)
    times = []
    for _ in range(50):
        h._estimate = None
        t0 = time.perf_counter()
        h.count()
        times.append(time.perf_counter() - t0)
    out["hll_estimate_us"] = statistics.median(times) * 1e6
    return out


def _in_subprocess(case: str, **kw: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--case", case, "--args", json.dumps(kw)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sizes", default="100000,1000000,10000000")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        fn = {"fill": fill, "batch_sizes": batch_sizes, "hashing": hashing}[args.case]
        print(json.dumps(fn(**json.loads(args.args))))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, Any] = {"fill": [], "batch_sizes": []}
    print(f"fill (batches of {args.batch}; memory per million series)")
    print(
        f"{'mode':>6} {'series':>10} {'add ns/hash':>12} {'last 10 %':>10} {'count() us':>11}"
        f" {'memory_bytes':>13} {'MB/1M':>7} {'RSS growth':>11} {'MB/1M':>7}"
    )
    for mode in ("exact", "hll"):
        for n in sizes:
            r = _in_subprocess("fill", mode=mode, n=n, batch=args.batch)
            results["fill"].append(r)
            per_m = 1e6 / n
            print(
                f"{mode:>6} {n:>10} {r['add_ns']:>12.1f} {r['add_ns_last_tenth']:>10.1f}"
                f" {r['count_us']:>11.2f} {r['memory_bytes'] / MB:>10.2f} MB"
                f" {r['memory_bytes'] / MB * per_m:>7.2f} {r['rss_growth_bytes'] / MB:>8.2f} MB"
                f" {r['rss_growth_bytes'] / MB * per_m:>7.2f}"
            )

    print("\nbatch size (1M series; ns per hash)")
    print(f"{'mode':>6} " + " ".join(f"{b:>9}" for b in (1, 10, 1000, 100_000)))
    for mode in ("exact", "hll"):
        row = []
        for b in (1, 10, 1000, 100_000):
            r = _in_subprocess("batch_sizes", mode=mode, n=1_000_000, batch=b)
            results["batch_sizes"].append(r)
            row.append(r["add_ns"])
        print(f"{mode:>6} " + " ".join(f"{x:>9.1f}" for x in row))

    h = _in_subprocess("hashing")
    results["hashing"] = h
    print(f"\nhash_many: {h['hash_many_ns']:.1f} ns per key ({h['key_bytes']:.0f}-byte keys)")
    w = window_counts()
    results["windows"] = w
    print(
        f"WindowedTracker.count(), uncached: both windows exact ({w['exact']['per_window']} each)"
        f" {w['exact']['count_us']:.1f} us; both sketches ({w['hll']['per_window']} each)"
        f" {w['hll']['count_us']:.1f} us; one sketch's estimator {w['hll_estimate_us']:.1f} us"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
        print(f"\nJSON: {args.json_out}")


if __name__ == "__main__":
    main()
