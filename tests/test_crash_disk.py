"""Crash tests for the disk queue: governor runs as a real process, is killed with SIGKILL at random
moments while clients write to it, restarts on the same queue directory, and at the end delivers to
a live backend. Nothing governor acknowledged with a 204 may be missing there.

Real processes, real sockets on 127.0.0.1, real files, `os.kill(pid, SIGKILL)`. Some kills are
aimed: the test watches /proc/<pid>/task/*/syscall and kills while a thread of governor is inside
an fsync of a queue file, or watches the newest segment and kills as soon as a write lands in it.
Every case prints its seed and what each kill hit; GOVERNOR_CRASH_SEED=<n> replays one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import cramjam
import httpx
import pytest
import trio
import yaml

from service._proto.prometheus.remote_pb2 import WriteRequest
from service.queue import segments
from service.receivers.http import hypercorn_config, serve_http
from tests.test_disk_mode import reserved_port
from tests.test_receiver_prw import PRW_HEADERS, snappy

WRITERS = 6
SAMPLES_PER_REQUEST = 20
KILLS_PER_CASE = 6
# Kill i uses STRATEGIES[i % 3]: after a random delay; inside an fsync; right after a segment
# write (see kill_when).
STRATEGIES = ("random", "fsync", "write")
BASE_MS = 1_700_000_000_000  # sample n of a writer has value n and timestamp BASE_MS + n
# A batch is ~1.5 KiB: segments roll within one life (and, with a live backend, get deleted).
SEGMENT_BYTES = 8 * 1024
START_DEADLINE_S = 10.0
DELIVERY_DEADLINE_S = 10.0  # the happy path takes well under a second
CASE_DEADLINE_S = 50.0
# Syscall numbers as /proc/<pid>/task/<tid>/syscall shows them, per machine (Linux only).
SYSCALLS_BY_MACHINE = {
    "x86_64": {1: "write", 74: "fsync", 75: "fdatasync"},
    "aarch64": {64: "write", 82: "fsync", 83: "fdatasync"},
}
SYSCALLS = SYSCALLS_BY_MACHINE.get(platform.machine(), {})
TORN = ("torn header", "torn record")

Seqs = dict[str, set[int]]  # writer -> sequence numbers


def test_this_machine_can_aim_kills() -> None:
    """The kills are aimed through /proc/<pid>/task/*/syscall: Linux on x86_64 or aarch64 (the
    machines governor is tested on). Elsewhere this fails here, plainly, rather than skipping."""
    assert sys.platform == "linux"
    assert SYSCALLS, f"no syscall numbers for {platform.machine()}: add them to SYSCALLS_BY_MACHINE"


@attrs.frozen
class Case:
    id: str
    durable_ack: bool
    sync_interval_s: float
    backend_live: bool  # up during the kills too (acks, segment deletion, metadata moving on)
    seed: int


# durable_ack false is the default: written at once, fsynced every sync_interval_s. Metadata is
# saved every sync_interval_s in both modes; intervals well under a life of the process (~0.5 s)
# put many fsyncs and metadata replacements (moving the reader, with a live backend) in reach of
# the kills.
CASES = [
    Case("default-dead-backend", False, 0.05, False, 1101),
    Case("default-live-backend", False, 0.1, True, 2202),
    Case("durable-dead-backend", True, 0.1, False, 3303),
    Case("durable-live-backend", True, 0.25, True, 4404),
]


# ---- the data ---------------------------------------------------------------------------------


def numbered_request(writer: str, first: int) -> bytes:
    """A snappy WriteRequest: samples first..first+SAMPLES_PER_REQUEST-1 of `writer`'s series."""
    req = WriteRequest()
    ts = req.timeseries.add()
    ts.labels.add(name="__name__", value="crash_seq")
    ts.labels.add(name="writer", value=writer)
    for n in range(first, first + SAMPLES_PER_REQUEST):
        ts.samples.add(value=float(n), timestamp=BASE_MS + n)
    return snappy(req.SerializeToString())


def decode_entries(raw: bytes) -> list[tuple[str, list[int]]]:
    """(writer, sequence numbers) of every series in a serialized WriteRequest, in order. A sample
    whose timestamp does not match its value, or a series that is not ours, fails the test."""
    entries = []
    for ts in WriteRequest.FromString(raw).timeseries:
        labels = {label.name: label.value for label in ts.labels}
        assert labels.keys() == {"__name__", "writer"} and labels["__name__"] == "crash_seq"
        seqs = [int(s.value) for s in ts.samples]
        assert [s.timestamp for s in ts.samples] == [BASE_MS + n for n in seqs]
        entries.append((labels["writer"], seqs))
    return entries


class SeqBackend:
    """An ASGI remote-write backend: records every request's (writer, sequence numbers) entries,
    one list per request, and answers 204."""

    def __init__(self) -> None:
        self.requests: list[list[tuple[str, list[int]]]] = []
        self._changed = trio.Event()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                done = message["type"] == "lifespan.shutdown"
                await send({"type": message["type"] + ".complete"})
                if done:
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.requests.append(decode_entries(bytes(cramjam.snappy.decompress_raw(body))))
        self._changed.set()
        self._changed = trio.Event()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds, at most DELIVERY_DEADLINE_S (the caller asserts)."""
        with trio.move_on_after(DELIVERY_DEADLINE_S):
            while not predicate():
                await self._changed.wait()

    def samples(self, since: int = 0) -> Counter[tuple[str, int]]:
        """(writer, n) of every sample received, counted, from request `since` on."""
        return Counter(
            (w, n) for entries in self.requests[since:] for w, seqs in entries for n in seqs
        )

    def delivered(self) -> Seqs:
        return by_writer(self.samples())


def missing(acked: Seqs, *found: Seqs) -> dict[str, list[int]]:
    """Acknowledged sequence numbers in none of `found`, per writer (empty writers left out)."""
    out = {}
    for writer, seqs in acked.items():
        lost = seqs.difference(*(f.get(writer, set()) for f in found))
        if lost:
            out[writer] = sorted(lost)
    return out


# ---- the clients ------------------------------------------------------------------------------


class Body(httpx.AsyncByteStream):
    """A request body in one piece. httpx's own streams are async generators, which a
    connection reset mid-send leaves to the garbage collector, and trio then warns."""

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        data, self.data = self.data, None
        if data is None:
            raise StopAsyncIteration
        return data


class Writers:
    """WRITERS concurrent remote-write clients. Each sends its next SAMPLES_PER_REQUEST samples
    and moves on only after a 204; any other outcome (refused, reset, 429) sends the same request
    again, as Prometheus does. `url` is the live governor's, None between lives."""

    def __init__(self) -> None:
        self.next = {f"w{i}": 0 for i in range(WRITERS)}  # first sequence number not acked
        self.url: str | None = None
        self.in_flight = 0
        self.failed = 0  # requests that got no answer (the process died, or was not there)
        self._stopping = False
        self._done = trio.Event()

    def acked(self) -> Seqs:
        return {w: set(range(n)) for w, n in self.next.items()}

    def attempted(self) -> Seqs:
        """Everything a writer ever sent: what was acked and its one request in flight."""
        return {w: set(range(n + SAMPLES_PER_REQUEST)) for w, n in self.next.items()}

    async def run(self, client: httpx.AsyncClient) -> None:
        """Until stop() (the test's deadline bounds it)."""
        try:
            async with trio.open_nursery() as nursery:
                for writer in self.next:
                    nursery.start_soon(self._write, client, writer)
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Let every writer finish its request and wait until they are gone. Called with no
        governor running, so those requests fail at once (and are not acked); cancelling them
        instead would leave httpx's request streams to the garbage collector."""
        self._stopping = True
        await self._done.wait()

    async def _write(self, client: httpx.AsyncClient, writer: str) -> None:
        while not self._stopping:
            url = self.url
            if url is None:
                await trio.sleep(0.005)
                continue
            first = self.next[writer]
            body = numbered_request(writer, first)
            request = client.build_request("POST", url, content=body, headers=PRW_HEADERS)
            request.stream = Body(body)  # sent as it is, with the content-length of `content`
            self.in_flight += 1
            try:
                resp = await client.send(request)
            except httpx.TransportError:
                self.failed += 1
                await trio.sleep(0.005)
                continue
            finally:
                self.in_flight -= 1
            if resp.status_code == 204:
                self.next[writer] = first + SAMPLES_PER_REQUEST
            else:
                assert resp.status_code == 429, (resp.status_code, resp.text)
                await trio.sleep(0.01)


# ---- governor as a process --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@attrs.frozen
class Process:
    proc: subprocess.Popen
    write_url: str


@contextlib.asynccontextmanager
async def governor(
    case: Case, queue_dir: Path, backend_url: str, log_path: Path, client: httpx.AsyncClient
) -> AsyncIterator[Process]:
    """A governor process, ready (/ready answered 200); killed on exit if still running. Ports
    are picked free (bind 0, close); a start that lost one of them to another process is retried."""
    for _attempt in range(3):
        tel, prw = free_port(), free_port()
        config = log_path.with_suffix(".yaml")
        config.write_text(
            yaml.safe_dump(
                {
                    "log": {"level": "warning"},
                    "telemetry": {"listen": f"127.0.0.1:{tel}"},
                    "shutdown_grace_s": 5.0,
                    "prw": {
                        "receiver": {"listen": f"127.0.0.1:{prw}"},
                        "batch": {"interval_s": 0.05},
                        "queue": {
                            "mode": "disk",
                            "dir": str(queue_dir),
                            "segment_bytes": SEGMENT_BYTES,
                            "durable_ack": case.durable_ack,
                            "sync_interval_s": case.sync_interval_s,
                        },
                        "exporters": [
                            {
                                "url": backend_url,
                                "name": "backend",
                                "retry": {"initial_delay_s": 0.01, "max_delay_s": 0.1},
                                "breaker": {"open_s": 0.05, "max_open_s": 0.1},
                            }
                        ],
                    },
                }
            )
        )
        with (
            log_path.open("wb") as log,  # a retried start replaces the failed one's log
            # Popen only forks; the one blocking wait, after SIGKILL, returns at once.
            subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "service", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            ) as proc,
        ):
            try:
                end = time.monotonic() + START_DEADLINE_S
                while proc.poll() is None:
                    if time.monotonic() >= end:
                        text = await trio.Path(log_path).read_text()
                        pytest.fail(f"governor not ready after {START_DEADLINE_S} s: {text}")
                    with contextlib.suppress(httpx.TransportError):
                        resp = await client.get(f"http://127.0.0.1:{tel}/ready")
                        if resp.status_code == 200:
                            break
                    await trio.sleep(0.02)
                if proc.poll() is None:
                    yield Process(proc, f"http://127.0.0.1:{prw}/api/v1/write")
                    return
                text = await trio.Path(log_path).read_text()
                assert "address already in use" in text.lower(), f"governor exited: {text}"
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=START_DEADLINE_S)
    pytest.fail("no free ports for governor after 3 attempts")


def disk_syscalls(pid: int, queue_dir: Path) -> list[str]:
    """What the threads of `pid` are doing on the queue's files right now, e.g. 'fsync segment'.
    Best effort: a thread may leave its syscall before the caller acts on the answer."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            continue
        if len(fields) < 2 or not fields[0].isdigit() or int(fields[0]) not in SYSCALLS:
            continue  # "running", or a syscall that is not about files
        try:
            target = os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}")
        except OSError:
            continue
        if not target.startswith(str(queue_dir)):
            continue  # stderr, sockets
        name = os.path.basename(target)
        if name.endswith((".seg", ".seg (deleted)")):
            kind = "deleted segment" if name.endswith(" (deleted)") else "segment"
        else:
            kind = name if "." in name else "directory"
        out.append(f"{SYSCALLS[int(fields[0])]} {kind}")
    return out


def newest_segment(queue_dir: Path) -> tuple[str, int]:
    """(name, size) of the queue's newest segment file; ("", 0) if there is none yet."""
    newest = ""
    with contextlib.suppress(OSError):
        for exporter_dir in os.scandir(queue_dir):
            with os.scandir(exporter_dir.path) as entries:
                names = [e.name for e in entries if e.name.endswith(segments.SEGMENT_SUFFIX)]
            if names:
                newest = os.path.join(exporter_dir.path, max(names))
    try:
        return newest, os.stat(newest).st_size if newest else 0
    except OSError:
        return newest, 0


def kill_when(pid: int, queue_dir: Path, strategy: str, budget_s: float) -> str:
    """SIGKILL `pid`: at once ("random"); as soon as one of its threads is inside an fsync on
    the queue's files ("fsync"); or right after a write to the newest segment returned, before
    governor could sync or answer it ("write"). After `budget_s` anyway. Returns what it saw."""
    end = time.monotonic() + budget_s
    before = newest_segment(queue_dir)
    what = ""
    for _ in range(1_000_000):
        seen = disk_syscalls(pid, queue_dir)
        if strategy == "fsync" and any(s.startswith(("fsync", "fdatasync")) for s in seen):
            break
        if strategy == "write":
            after = newest_segment(queue_dir)
            if after != before and after[1] > 0:
                grown = after[1] - before[1] if after[0] == before[0] else after[1]
                what = f"a segment write of {grown} bytes"
                break
        if strategy == "random" or time.monotonic() >= end:
            break
    os.kill(pid, signal.SIGKILL)
    return ", ".join([what, *seen] if what else seen) or "no disk syscall"


@attrs.frozen
class Kill:
    strategy: str
    after_s: float  # since /ready
    seen: str  # what kill_when saw just before the kill
    in_flight: int  # client requests waiting for an answer
    acked: int  # samples acknowledged so far, over all lives


# ---- what the process left behind ------------------------------------------------------------


@attrs.frozen
class DiskContents:
    queued: Counter[tuple[str, int]]  # (writer, n) in records from the reader position on
    torn_tails: int
    other_damage: list[str]
    reader_offset: int
    writer_offset: int


def read_queue(queue_dir: Path) -> DiskContents:
    """Scan the exporter's queue directory the way recovery does, without a DiskQueue."""
    [exporter_dir] = [p for p in queue_dir.iterdir() if p.is_dir()]
    meta_path = exporter_dir / segments.META_NAME
    seg_paths = sorted(exporter_dir.glob("*" + segments.SEGMENT_SUFFIX))
    starts = [segments.parse_segment_name(p.name) for p in seg_paths]
    if meta_path.exists():
        meta = segments.decode_meta(meta_path.read_bytes())
        reader, writer = meta.reader_offset, meta.writer_offset
    else:  # recovery rebuilds it: everything in the segments is delivered again
        reader, writer = (starts[0] if starts else 0), 0
    queued: Counter[tuple[str, int]] = Counter()
    torn, other = 0, []
    for path, start in zip(seg_paths, starts):
        data = path.read_bytes()
        if start + len(data) <= reader:
            continue
        records, damage = segments.scan(data, max(reader - start, 0))
        for d in damage:
            if d.reason in TORN and d.position + d.length == len(data):
                torn += 1
            else:
                other.append(f"{path.name}@{d.position}: {d.reason} ({d.length} bytes)")
        for r in records:
            batch = segments.decode_record(data[r.position : r.position + r.length])
            raw = bytes(cramjam.snappy.decompress_raw(batch.payload))
            queued.update((w, n) for w, seqs in decode_entries(raw) for n in seqs)
    return DiskContents(queued, torn, other, reader, writer)


def by_writer(samples: Counter[tuple[str, int]]) -> Seqs:
    out: Seqs = {}
    for writer, n in samples:
        out.setdefault(writer, set()).add(n)
    return out


def queue_log_lines(log_paths: list[Path]) -> tuple[list[dict], list[str]]:
    """Every log record of the governor processes as dicts, and the lines that are not JSON."""
    records, garbage = [], []
    for path in log_paths:
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                garbage.append(line)
    return records, garbage


# ---- the test ---------------------------------------------------------------------------------


def case_seed(case: Case) -> int:
    return int(os.environ.get("GOVERNOR_CRASH_SEED", case.seed))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_kill_9_loses_no_acknowledged_sample(case: Case, tmp_path: Path) -> None:
    """WRITERS clients send numbered samples to a governor with a disk queue; it is killed with
    SIGKILL KILLS_PER_CASE times (after a random delay, inside an fsync of a queue file, or right
    after a write to a segment) and restarted on the same directory. Then a governor with the
    backend up delivers the queue and stops cleanly. Asserted:

    - after the kills, every acknowledged sample is in a record from the saved reader position on
      (to be delivered) or already at the backend; the only damage is a torn tail of a segment,
      and governor logged nothing else about the queue (no lost metadata, no corrupt record);
    - at the end every acknowledged sample arrived, with durable_ack and without it: a kill keeps
      the page cache, so the default mode must lose nothing here either (only a power loss, not
      tested here, may cost it up to sync_interval_s of acknowledged samples);
    - nothing arrived that was never sent, and within each request a writer's samples are one
      in-order run of one request it sent (a writer appears at most once per batch: its next
      request is sent only after the 204, i.e. after the batch holding this one was queued);
    - the final run delivered every record the kills left queued; with the backend dead during
      the kills, exactly those and each once (so every duplicate is a request whose 204 the kill
      cut off, sent again by its writer); with it live, duplicates are batches whose ack was not
      saved yet (at least once): counted and printed, not limited;
    - at least one kill landed in an fsync and one right after a segment write; the queue ends
      empty.
    """
    seed = case_seed(case)
    rng = random.Random(seed)
    print(f"\n{case.id}: seed {seed} (replay with GOVERNOR_CRASH_SEED={seed})")
    started = time.monotonic()
    queue_dir = tmp_path / "queue"
    hold = reserved_port()  # connections to the backend's port are refused until it is up
    backend_port = hold.getsockname()[1]
    backend_url = f"http://127.0.0.1:{backend_port}/api/v1/write"
    backend = SeqBackend()
    writers = Writers()
    kills: list[Kill] = []
    logs: list[Path] = []
    try:
        with trio.fail_after(CASE_DEADLINE_S):
            async with (
                httpx.AsyncClient(timeout=START_DEADLINE_S) as client,
                trio.open_nursery() as nursery,
            ):
                backend_stop = trio.Event()

                async def start_backend() -> None:
                    hold.close()
                    await nursery.start(
                        serve_http,
                        backend,
                        hypercorn_config(f"127.0.0.1:{backend_port}"),
                        backend_stop.wait,
                    )

                if case.backend_live:
                    await start_backend()
                nursery.start_soon(writers.run, client)
                for i in range(KILLS_PER_CASE):
                    logs.append(tmp_path / f"governor-{i}.log")
                    async with governor(case, queue_dir, backend_url, logs[-1], client) as gov:
                        writers.url = gov.write_url
                        ready = time.monotonic()
                        strategy = STRATEGIES[i % len(STRATEGIES)]
                        if strategy == "random":
                            await trio.sleep(rng.uniform(0.05, 0.8))
                        else:  # then wait for the moment (up to 2 s)
                            await trio.sleep(rng.uniform(0.05, 0.3))
                        in_flight = writers.in_flight
                        seen = await trio.to_thread.run_sync(
                            kill_when, gov.proc.pid, queue_dir, strategy, 2.0
                        )
                        acked_now = sum(writers.next.values())
                        kills.append(
                            Kill(strategy, time.monotonic() - ready, seen, in_flight, acked_now)
                        )
                        writers.url = None
                        assert gov.proc.wait(timeout=START_DEADLINE_S) == -signal.SIGKILL
                await writers.stop()

                acked = writers.acked()
                on_disk = read_queue(queue_dir)
                before_final = len(backend.requests)
                lost_at_kills = missing(acked, by_writer(on_disk.queued), backend.delivered())

                if not case.backend_live:
                    await start_backend()
                logs.append(tmp_path / "governor-final.log")
                async with governor(case, queue_dir, backend_url, logs[-1], client) as gov:
                    await backend.wait_for(lambda: not missing(acked, backend.delivered()))
                    gov.proc.send_signal(signal.SIGTERM)  # drains the rest, then exits
                    wait = functools.partial(gov.proc.wait, timeout=START_DEADLINE_S)
                    assert await trio.to_thread.run_sync(wait) == 0
                backend_stop.set()
    finally:
        hold.close()

    received = backend.samples()
    delivered = by_writer(received)
    duplicates = received.total() - len(received)
    records, garbage = queue_log_lines(logs)
    queue_warnings = [r for r in records if r["logger"] == "governor.queue.disk"]
    in_fsync = [k for k in kills if "fsync" in k.seen]
    after_write = [k for k in kills if "segment write" in k.seen]
    print(
        f"{case.id}: {len(kills)} kills ({len(in_fsync)} in fsync, {len(after_write)} right "
        f"after a segment write) in {time.monotonic() - started:.1f} s; "
        f"acked {sum(writers.next.values())} samples, received {received.total()} in "
        f"{len(backend.requests)} requests, duplicates {duplicates}; torn tails on disk "
        f"{on_disk.torn_tails}, logged {len(queue_warnings)}; unanswered requests {writers.failed}"
    )
    for k in kills:
        print(
            f"  kill {k.strategy:6} after {k.after_s:.2f} s, {k.in_flight} in flight, "
            f"{k.acked} acked so far: {k.seen}"
        )

    assert all(n > 0 for n in writers.next.values()), writers.next  # the test did write
    assert lost_at_kills == {}
    assert on_disk.other_damage == []
    assert in_fsync and after_write, "no kill landed in an fsync or right after a write"
    assert missing(acked, delivered) == {}
    assert missing(delivered, writers.attempted()) == {}
    if not case.backend_live:
        # Nothing left the queue before the final run, which stopped cleanly: it delivered
        # exactly what the kills left queued, each record once.
        assert received == on_disk.queued
    for entries in backend.requests:
        writers_in_request = [w for w, _ in entries]
        assert len(writers_in_request) == len(set(writers_in_request)), entries
        for _, seqs in entries:
            first = seqs[0]
            assert first % SAMPLES_PER_REQUEST == 0
            assert seqs == list(range(first, first + SAMPLES_PER_REQUEST))
    assert on_disk.queued - backend.samples(since=before_final) == Counter()

    assert garbage == []
    assert [r for r in queue_warnings if r.get("reason") not in TORN] == []
    assert [r for r in records if r["level"] == "error"] == []

    left = read_queue(queue_dir)
    assert left.queued == Counter()
    assert left.reader_offset == left.writer_offset
