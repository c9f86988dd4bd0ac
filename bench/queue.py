"""Queue microbenchmark: DiskQueue throughput and recovery, MemoryQueue for reference.

    .venv/bin/python bench/queue.py [--runs 3] [--quick] [--only throughput,recovery] [--dir DIR]

Throughput. Each case fills a fresh queue in a temporary directory with Batches whose payloads are
random bytes (1 KiB, 64 KiB or 1 MiB), then takes and acks every one:

- `seq`: one producer puts all N records, then one consumer gets and acks all N ("write", then
  "read"; "w+r" is the payload over the sum of both times);
- `16p`: the same with 16 producer tasks putting at once (with durable_ack: group commit);
- `stream`: one producer and one consumer at the same time (the queue stays short, as in governor);
- `sustained`: stream with 2 GiB of 64 KiB records, so that the periodic fsync (every 1 s) and the
  kernel's writeback take part (the other cases end within ~0.5 s, mostly in the page cache).

"put p99/max" is the wall time of put() calls, "get max" of get() calls that found a batch waiting:
besides the call's own work (and, with durable_ack, the wait for the fsync) they include whatever
else blocked the event loop meanwhile (e.g. the periodic sync task's file closes), and with 16
producers the other producers' turns.

Disk queues run with their `run()` task (the periodic fsync every sync_interval_s, 1 s) and
default settings except `max_bytes` (room for the whole case) and `durable_ack`. Timings are wall
clock; "CPU" is the process's CPU time (all threads, fsync threads included) over the same span.
Sizes are payload bytes; MB is 10^6 bytes. A disk record adds 41 bytes of header and fields.

Recovery. A queue of `--recovery-mb` (1 GiB) of `--recovery-record-kib` (64 KiB) records is built
and closed; then the time to construct a new DiskQueue on the directory (the constructor recovers:
reads meta.json, scans every segment from the reader position, builds the index) is measured with
meta.json intact, and with meta.json deleted (rebuilt by a full scan); each warm (segments in the
page cache) and cold (their pages dropped with posix_fadvise(DONTNEED) first: only this
benchmark's files, and only the guest's cache; a virtual disk may still be cached by the host).

Every figure is the median over --runs rounds (every case once per round), with the per-run
values in the JSON written to bench/out/. This prints figures; it asserts nothing about them.
Temporary directories are removed at the end of each case, also on errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is first on sys.path and this file would shadow the standard library's
# `queue` (trio imports it): take bench/ off the path before anything else is imported. Hence the
# imports below this line (E402).
# ruff: noqa: E402
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any

import trio

from service.config import QueueConfig
from service.pipeline.items import Batch
from service.queue.disk import DiskQueue, DiskQueueSettings
from service.queue.memory import MemoryQueue

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
KiB = 1024
MiB = 1024 * KiB
MB = 1e6
POOL = 8  # distinct random payloads per record size; batches cycle through them
CASE_TIMEOUT_S = 300.0  # a case that takes longer is a hang, not a measurement


@dataclasses.dataclass(frozen=True)
class Case:
    queue: str  # memory | disk
    record: int  # payload bytes
    count: int
    durable: bool = False
    producers: int = 1
    # seq: write all, then read all; stream: write and read at once; sustained: stream, longer
    mode: str = "seq"

    @property
    def name(self) -> str:
        size = f"{self.record // MiB} MiB" if self.record >= MiB else f"{self.record // KiB} KiB"
        kind = (
            self.mode
            if self.mode != "seq"
            else f"{self.producers}p"
            if self.producers > 1
            else "seq"
        )
        durable = " durable" if self.durable else ""
        return f"{self.queue}{durable} {kind} {size}"


def cases(quick: bool) -> list[Case]:
    scale = 8 if quick else 1
    out: list[Case] = []
    # (record size, N for plain cases, N for one durable producer: one fsync per record)
    sizes = [(1 * KiB, 32768, 1024), (64 * KiB, 4096, 1024), (1 * MiB, 256, 64)]
    for record, n, n_durable in sizes:
        n, n_durable = max(16, n // scale), max(16, n_durable // scale)
        n_16p = min(n, 8192 // scale)
        out += [
            Case("memory", record, n),
            Case("disk", record, n),
            Case("disk", record, n, mode="stream"),
            Case("disk", record, n_durable, durable=True),
            Case("disk", record, n_16p, durable=True, producers=16),
            Case("disk", record, n_16p, producers=16),
        ]
    # Long enough for the periodic fsync (every 1 s) and the kernel's writeback to take part.
    out.append(Case("disk", 64 * KiB, 32768 // scale, mode="sustained"))
    return out


def make_batches(record: int, count: int) -> list[Batch]:
    pool = [os.urandom(record) for _ in range(POOL)]
    return [
        Batch(payload=pool[i % POOL], encoding="snappy", series=1, datapoints=1, raw_bytes=record)
        for i in range(count)
    ]


class Clock:
    """Wall and process CPU time since the last lap."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


async def produce(
    q: DiskQueue | MemoryQueue, batches: list[Batch], producers: int, lat: list[float] | None = None
) -> None:
    """Put every batch from `producers` tasks; each put's wall time goes to `lat`."""
    lat = [] if lat is None else lat

    async def one(part: list[Batch]) -> None:
        for b in part:
            t = time.perf_counter()
            await q.put(b)
            lat.append(time.perf_counter() - t)

    if producers == 1:
        await one(batches)
        return
    async with trio.open_nursery() as nursery:
        for i in range(producers):
            nursery.start_soon(one, batches[i::producers])


async def consume(
    q: DiskQueue | MemoryQueue, count: int, record: int, lat: list[float] | None = None
) -> None:
    """Get and ack `count` batches; the wall time of each get that found one waiting goes to
    `lat` (in stream mode a get may wait for the producer: not counted)."""
    lat = [] if lat is None else lat
    for _ in range(count):
        t = time.perf_counter()
        waiting = q.statistics().length > 0
        b = await q.get()
        if waiting:
            lat.append(time.perf_counter() - t)
        if b is None or b.size != record:
            raise RuntimeError(f"queue returned {b!r}, expected a {record}-byte batch")
        q.ack(b)


def fsyncs(q: DiskQueue | MemoryQueue) -> int:
    return q.statistics().fsyncs if isinstance(q, DiskQueue) else 0


async def drive(q: DiskQueue | MemoryQueue, case: Case, batches: list[Batch]) -> dict[str, Any]:
    """Run the case against an open queue; its timings."""
    n, payload = len(batches), len(batches) * case.record
    r: dict[str, Any] = {}
    put_lat: list[float] = []
    get_lat: list[float] = []
    with trio.fail_after(CASE_TIMEOUT_S):
        clock = Clock()
        if case.mode in ("stream", "sustained"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce, q, batches, case.producers, put_lat)
                nursery.start_soon(consume, q, n, case.record, get_lat)
            r["total_s"], r["total_cpu_s"] = clock.lap()
            r["fsyncs"] = fsyncs(q)
        else:
            await produce(q, batches, case.producers, put_lat)
            r["write_s"], r["write_cpu_s"] = clock.lap()
            r["fsyncs"] = fsyncs(q)
            await consume(q, n, case.record, get_lat)
            r["read_s"], r["read_cpu_s"] = clock.lap()
            r["total_s"] = r["write_s"] + r["read_s"]
            r["total_cpu_s"] = r["write_cpu_s"] + r["read_cpu_s"]
            r["write_MBps"] = payload / MB / r["write_s"]
            r["write_recps"] = n / r["write_s"]
            r["read_MBps"] = payload / MB / r["read_s"]
            r["read_recps"] = n / r["read_s"]
    r["wr_MBps"] = payload / MB / r["total_s"]
    r["wr_recps"] = n / r["total_s"]
    r["cpu_us_per_rec"] = r["total_cpu_s"] / n * 1e6
    r["recs_per_fsync"] = n / r["fsyncs"] if r.get("fsyncs") else None
    put_lat.sort()
    get_lat.sort()
    r["put_p99_ms"] = put_lat[int(0.99 * (len(put_lat) - 1))] * 1e3
    r["put_max_ms"] = put_lat[-1] * 1e3
    r["get_max_ms"] = get_lat[-1] * 1e3 if get_lat else None
    return r


async def run_case(case: Case, root: Path) -> dict[str, Any]:
    batches = make_batches(case.record, case.count)
    room = 2 * case.count * (case.record + 64) + 64 * MiB
    if case.queue == "memory":
        q = MemoryQueue(QueueConfig(max_batches=case.count + 1, max_bytes=room))
        return await drive(q, case, batches)
    tmp = Path(tempfile.mkdtemp(prefix="queue-bench-", dir=root))
    try:
        settings = DiskQueueSettings(tmp / "q", max_bytes=room, durable_ack=case.durable)
        dq = DiskQueue(settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(dq.run)
            try:
                r = await drive(dq, case, batches)
            finally:
                clock = Clock()
                await dq.aclose()  # also ends run()
                r_close = clock.lap()[0]
        r["close_s"] = r_close
        return r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- recovery ---------------------------------------------------------------------------------


def drop_cache(directory: Path) -> None:
    """Evict the pages of the segment files (clean after the close's fsync) from the page cache."""
    for path in directory.glob("*.seg"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


async def recovery(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    record = args.recovery_record_kib * KiB
    count = args.recovery_mb * MiB // record
    tmp = Path(tempfile.mkdtemp(prefix="queue-bench-recovery-", dir=root))
    out: dict[str, Any] = {"record": record, "count": count, "bytes": count * record}
    try:
        settings = DiskQueueSettings(tmp / "q", max_bytes=2 * count * (record + 64) + 64 * MiB)
        q = DiskQueue(settings)
        clock = Clock()
        with trio.fail_after(CASE_TIMEOUT_S):
            await produce(q, make_batches(record, count), 1)
            await q.aclose()
        out["build_s"] = clock.lap()[0]
        out["segments"] = len(list((tmp / "q").glob("*.seg")))
        variants = ["intact", "no_meta", "intact_cold", "no_meta_cold"]
        runs: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.runs):
            for v in variants:
                if v.startswith("no_meta"):
                    (tmp / "q" / "meta.json").unlink()
                if v.endswith("_cold"):
                    drop_cache(tmp / "q")
                clock = Clock()
                q = DiskQueue(settings)
                runs[v].append(clock.lap()[0])
                st = q.statistics()
                await q.aclose()
                if st.length != count or st.meta_rebuilt != v.startswith("no_meta"):
                    raise RuntimeError(f"recovery {v}: {st}")
        out["open_s"] = runs
        out["open_s_median"] = {v: statistics.median(x) for v, x in runs.items()}
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- report -----------------------------------------------------------------------------------


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def med(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


COLUMNS = [
    ("write_MBps", "write MB/s", ",.0f"),
    ("write_recps", "write rec/s", ",.0f"),
    ("read_MBps", "read MB/s", ",.0f"),
    ("read_recps", "read rec/s", ",.0f"),
    ("wr_MBps", "w+r MB/s", ",.0f"),
    ("wr_recps", "w+r rec/s", ",.0f"),
    ("cpu_us_per_rec", "CPU us/rec", ",.1f"),
    ("recs_per_fsync", "rec/fsync", ",.1f"),
    ("put_p99_ms", "put p99 ms", ",.2f"),
    ("put_max_ms", "put max ms", ",.2f"),
    ("get_max_ms", "get max ms", ",.2f"),
    ("close_s", "close s", ".3f"),
]


def report(results: dict[str, list[dict[str, Any]]], meta: dict[str, Case], rec: dict | None):
    print(f"\n== queue throughput: medians of {max(map(len, results.values()), default=0)} runs ==")
    head = f"{'case':28s} {'N':>6s} {'MB':>6s}" + "".join(f" {c[1]:>11s}" for c in COLUMNS)
    print(head)
    medians: dict[str, dict[str, float | None]] = {}
    for name, runs in results.items():
        case = meta[name]
        medians[name] = {k: med(runs, k) for k, _, _ in COLUMNS}
        row = f"{name:28s} {case.count:6d} {case.count * case.record / MB:6.0f}"
        row += "".join(f" {fmt(medians[name][k], spec):>11s}" for k, _, spec in COLUMNS)
        print(row)
    print("\nper run, w+r MB/s (stream: MB/s with producer and consumer running together):")
    for name, runs in results.items():
        print(f"  {name:28s} " + ", ".join(f"{r['wr_MBps']:,.0f}" for r in runs))
    if rec is not None:
        gb = rec["bytes"] / 2**30
        print(
            f"\n== recovery: {gb:.2f} GiB in {rec['count']} records of {rec['record'] // KiB} KiB, "
            f"{rec['segments']} segments (built in {rec['build_s']:.2f} s) =="
        )
        for v, xs in rec["open_s"].items():
            per = ", ".join(f"{x:.3f}" for x in xs)
            print(f"  open, {v:14s} {rec['open_s_median'][v]:8.3f} s  [{per}]")
    print("\ntargets (medians)")
    verdicts = []

    def target(label: str, value: float | None, ok: bool, spec: str = ",.1f") -> None:
        v = "not measured" if value is None else ("met" if ok else "NOT met")
        verdicts.append((label, value, v))
        print(f"  {label}: {fmt(value, spec)} -> {v}")

    seq = medians.get("disk seq 64 KiB", {}).get("wr_MBps")
    target("disk 64 KiB write+read (seq) >= 200 MB/s", seq, bool(seq and seq >= 200))
    stream = medians.get("disk stream 64 KiB", {}).get("wr_MBps")
    target("disk 64 KiB stream >= 200 MB/s", stream, bool(stream and stream >= 200))
    sus = medians.get("disk sustained 64 KiB", {}).get("wr_MBps")
    if "disk sustained 64 KiB" in meta:
        c = meta["disk sustained 64 KiB"]
        label = f"disk 64 KiB sustained ({c.count * c.record / 2**30:.2f} GiB) >= 200 MB/s"
        target(label, sus, bool(sus and sus >= 200))
    gc = medians.get("disk durable 16p 64 KiB", {}).get("write_MBps")
    target("durable_ack 64 KiB, 16 producers, write > 50 MB/s", gc, bool(gc and gc > 50))
    if rec is not None:
        for v in ("intact", "no_meta", "intact_cold", "no_meta_cold"):
            s = rec["open_s_median"][v]
            target(f"recovery of {rec['bytes'] / 2**30:.2f} GiB ({v}) < 2 s", s, s < 2, ".3f")
    return {"medians": medians, "verdicts": verdicts}


def code_state() -> dict[str, str]:
    """Which queue code was measured: HEAD and a hash of service/queue/*.py (read-only git)."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "service" / "queue").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    state = {"service_queue_sha256": h.hexdigest()[:16]}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        state["head"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return state


async def main_async(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    selected = cases(args.quick)
    if args.case:
        selected = [c for c in selected if any(s in c.name for s in args.case)]
    meta = {c.name: c for c in selected}
    results: dict[str, list[dict[str, Any]]] = {c.name: [] for c in selected}
    if "throughput" in args.only:
        for run in range(1, args.runs + 1):
            for c in selected:
                print(
                    f"run {run}/{args.runs}: {c.name} x {c.count} ...", file=sys.stderr, flush=True
                )
                r = await run_case(c, root)
                results[c.name].append(r)
                print(f"  {r['wr_MBps']:,.0f} MB/s", file=sys.stderr, flush=True)
    rec = None
    if "recovery" in args.only:
        print(f"recovery: building {args.recovery_mb} MiB ...", file=sys.stderr, flush=True)
        rec = await recovery(args, root)
    summary = report({k: v for k, v in results.items() if v}, meta, rec)
    return {"cases": results, "recovery": rec, **summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="rounds over every case; medians reported")
    p.add_argument(
        "--quick", action="store_true", help="1/8 of the records, 1 run, 128 MiB recovery"
    )
    p.add_argument("--only", default="throughput,recovery", help="throughput and/or recovery")
    p.add_argument("--case", action="append", default=[], help="only cases whose name has this")
    p.add_argument("--recovery-mb", type=int, default=1024, help="size of the recovery queue")
    p.add_argument("--recovery-record-kib", type=int, default=64, help="its record size")
    p.add_argument(
        "--dir", type=Path, default=None, help="parent of the temp dirs (default TMPDIR)"
    )
    p.add_argument("--json-out", type=Path, help="where to write the JSON results")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 1 if args.runs == 3 else args.runs
        args.recovery_mb = 128 if args.recovery_mb == 1024 else args.recovery_mb
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    if min(args.runs, args.recovery_mb, args.recovery_record_kib) < 1 or not args.only <= {
        "throughput",
        "recovery",
    }:
        p.error("--runs and --recovery-* must be positive; --only takes throughput,recovery")
    root = Path(args.dir or tempfile.gettempdir())
    started = datetime.datetime.now(datetime.UTC)
    code = code_state()
    summary = trio.run(main_async, args, root)
    print(
        f"code measured: HEAD {code.get('head', '?')}, "
        f"service/queue sources sha256 {code['service_queue_sha256']}"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    out = args.json_out or OUT / f"queue_{started:%Y%m%dT%H%M%SZ}.json"
    doc = {
        "started": started.isoformat(),
        "args": {k: sorted(v) if isinstance(v, set) else str(v) for k, v in vars(args).items()},
        "host": {"nproc": os.cpu_count(), "load_avg": os.getloadavg(), "tmp": str(root)},
        "code": code,
        **summary,
    }
    out.write_text(json.dumps(doc, indent=2, default=str))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
