"""Codec microbenchmark: the per-request CPU of governor's remote-write hot path.

    .venv/bin/python bench/codec.py [--repeat 7] [--min-time 0.2]

Workload: bench/workload.py series (10 labels, one sample each). Receive-side steps run on one
1000-series WriteRequest; the batch steps build a `--batch-series`-series batch out of
`--request-series`-series requests (the default max_series): by joining uncompressed parts and
compressing the result, and (where compression.snappy_concat exists, as the batcher does now) by
joining the requests' snappy blocks without recompressing. Every figure is the median over
`--repeat` repetitions, in µs per 1000 series (and MB/s of uncompressed protobuf), with the minor
page faults per call; a second pass repeats everything with glibc's mmap threshold raised (see
the note it prints). This prints figures; it asserts nothing about them.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
import statistics
import sys
import time
import timeit
from collections.abc import Callable

import cramjam
import workload

from service.codec import compression, prw
from service.codec.prw import WriteRequest

LIMIT = 64 * 1024 * 1024


def bench(fn: Callable[[], object], repeat: int, min_time: float) -> tuple[float, float]:
    """Median seconds per call, and minor page faults per call over the timed repetitions."""
    timer = timeit.Timer(fn)
    loops = 1
    while True:
        if timer.timeit(loops) >= min_time:
            break
        loops *= 2
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = timer.repeat(repeat=repeat, number=loops)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return statistics.median(times) / loops, faults / (repeat * loops)


def _no_mmap_churn() -> None:
    """Make glibc keep freed buffers of up to 32 MiB in the heap instead of unmapping them."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024 * 1024)


def count_only(req: WriteRequest) -> int:
    """The counting loop of prw.decode, on an already parsed message."""
    samples = 0
    for ts in req.timeseries:
        samples += len(ts.samples)
    return samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per repetition, at least")
    p.add_argument("--batch-series", type=int, default=10_000)
    p.add_argument("--request-series", type=int, default=500)
    p.add_argument(
        "--no-mallopt", action="store_true", help="skip the second pass with glibc mallopt"
    )
    args = p.parse_args(argv)

    ts_ms = int(time.time() * 1000)
    (template,) = workload.build_pool(1, 1000)
    raw = workload.render(template, ts_ms)
    body = workload.compress(raw)
    n_parts = max(1, args.batch_series // args.request_series)
    parts = [
        workload.render(t, ts_ms)
        for t in workload.build_pool(n_parts, args.request_series, seed=2, first_series=10**6)
    ]
    batch_series = n_parts * args.request_series
    batch_raw_bytes = sum(map(len, parts))
    parsed = WriteRequest.FromString(raw)

    # The receiver's validate-and-count step: prw.count where it exists, else prw.decode.
    receiver_count = getattr(prw, "count", None)
    receiver_name = "prw.count" if receiver_count else "prw.decode"
    receiver_count = receiver_count or prw.decode

    # (name, per-1000-series normaliser, function)
    cases: list[tuple[str, float, Callable[[], object]]] = [
        ("snappy decompress (cramjam.snappy.decompress_raw)", 1,
         lambda: cramjam.snappy.decompress_raw(body)),
        ("snappy decompress (compression.decompress: length check + copy)", 1,
         lambda: compression.decompress(body, "snappy", LIMIT)),
        ("protobuf parse only (WriteRequest.FromString)", 1, lambda: WriteRequest.FromString(raw)),
        ("per-series count loop only, on a parsed message", 1, lambda: count_only(parsed)),
        ("protobuf decode + count (prw.decode)", 1, lambda: prw.decode(raw)),
    ]  # fmt: skip
    if hasattr(prw, "count"):
        cases.append(("validate + count without Python per series (prw.count)", 1,
                      lambda: prw.count(raw)))  # fmt: skip
    cases += [
        (f"batch join only ({n_parts} x {args.request_series} series)", batch_series / 1000,
         lambda: b"".join(parts)),
        ("batch join + snappy compress (uncompressed parts)", batch_series / 1000,
         lambda: compression.compress(b"".join(parts), "snappy")),
        ("receive path: compression.decompress + prw.decode", 1,
         lambda: prw.decode(compression.decompress(body, "snappy", LIMIT))),
    ]  # fmt: skip
    if hasattr(compression, "snappy_concat"):
        # Batches made of the clients' snappy blocks, joined without recompressing.
        blocks = [workload.compress(part) for part in parts]
        cases.append(
            (
                "batch: compression.snappy_concat of the requests' snappy blocks",
                batch_series / 1000,
                lambda: compression.snappy_concat(blocks, batch_raw_bytes),
            )
        )
    if hasattr(prw, "count"):
        name = f"receive path as the receiver runs it: decompress + {receiver_name}"
        cases.append(
            (name, 1, lambda: receiver_count(compression.decompress(body, "snappy", LIMIT)))
        )

    print(
        f"codec benchmark: 1000-series WriteRequest of {len(raw):,} bytes "
        f"({len(body):,} snappy), 10 labels + 1 sample per series; batch of {batch_series:,} "
        f"series = {batch_raw_bytes:,} bytes. Median of {args.repeat} repetitions."
    )
    passes = [("default malloc", None)]
    if not args.no_mallopt:
        passes.append(("mallopt: no mmap/trim churn", _no_mmap_churn))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
    for _, setup in passes:
        if setup is not None:
            setup()
        for name, per_k, fn in cases:
            sec, faults = bench(fn, args.repeat, args.min_time)
            results[name].append((sec / per_k, faults))
    head = f"  {'step':70s} {'µs/1000 series':>15s} {'MB/s (raw)':>11s} {'faults/call':>12s}"
    if len(passes) > 1:
        head += f" | {'µs, mallopt':>12s} {'faults':>7s}"
    print(head)
    for name, per_k, _ in cases:
        raw_per_k = len(raw) if per_k == 1 else batch_raw_bytes / per_k
        (sec, faults), *rest = results[name]
        line = f"  {name:70s} {sec * 1e6:15.1f} {raw_per_k / sec / 1e6:11.0f} {faults:12.1f}"
        for sec2, faults2 in rest:
            line += f" | {sec2 * 1e6:12.1f} {faults2:7.1f}"
        print(line)
    if len(passes) > 1:
        print(
            "  (second pass: glibc mallopt M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=128 MiB, so\n"
            "   buffers of a few hundred KiB are reused instead of mmap'ed and page-faulted anew\n"
            "   on every call. Faults cost ~1-4 µs each on this VM; which pass a long-running\n"
            "   governor resembles depends on its heap history: compare the e2e faults/request.)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
