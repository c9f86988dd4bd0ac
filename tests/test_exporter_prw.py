"""The remote-write exporter and its delivery policy in action.

Timing tests drive a PRWExporter through a recording fake transport under `autojump_clock`, so
attempt times are exact virtual seconds. The socket tests use real time with small delays and a
hypercorn-served backend; the shutdown tests run a whole App.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import cramjam
import httpx
import trio
from trio.testing import MockClock

from service import __version__
from service._proto.prometheus.remote_pb2 import WriteRequest
from service.app import Addresses, App
from service.config import (
    BasicAuthConfig,
    BreakerConfig,
    PRWExporterConfig,
    QueueConfig,
    RetryConfig,
    config_from_dict,
)
from service.export.prw import PRWExporter
from service.pipeline.items import Batch
from service.queue.memory import MemoryQueue
from service.receivers.http import hypercorn_config, lifespan, read_body, serve_http
from service.telemetry.metrics import Metrics
from tests.test_receiver_prw import SeriesKey, keys

NAME = "fake"
DEADLINE_S = 10.0  # bound on every real-time wait; the happy path takes milliseconds


# ---- data -------------------------------------------------------------------------------------


def write_request(tag: str, n_series: int = 2, n_samples: int = 2) -> WriteRequest:
    req = WriteRequest()
    for i in range(n_series):
        ts = req.timeseries.add()
        ts.labels.add(name="__name__", value="up")
        ts.labels.add(name="instance", value=f"{tag}-{i}")
        for j in range(n_samples):
            ts.samples.add(value=float(i + j), timestamp=1_700_000_000_000 + j)
    return req


def make_batch(tag: str, n_series: int = 2, n_samples: int = 2) -> tuple[Batch, list[SeriesKey]]:
    """A snappy batch as the batcher builds it, and the series it carries."""
    req = write_request(tag, n_series, n_samples)
    raw = req.SerializeToString()
    batch = Batch(
        payload=bytes(cramjam.snappy.compress_raw(raw)),
        encoding="snappy",
        series=n_series,
        datapoints=n_series * n_samples,
        raw_bytes=len(raw),
    )
    return batch, keys(req)


def decode_body(body: bytes) -> list[SeriesKey]:
    return keys(WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(body))))


# ---- the fake transport -----------------------------------------------------------------------

REFUSE = "refuse"  # a scripted reply: the fake raises httpx.ConnectError
Reply = int | tuple[int, dict[str, str]] | str


@attrs.frozen
class Attempt:
    time: float  # virtual seconds since the fake was created
    request: httpx.Request
    series: list[SeriesKey]
    breaker_state: float  # governor_breaker_state while the request was in flight


class FakeBackend(httpx.AsyncBaseTransport):
    """A recording fake of a remote-write backend for the exporter's httpx client.

    `script(n, series)` gives the reply to attempt number `n` (0-based) carrying `series`: a
    status, (status, headers) or REFUSE. Every attempt is recorded with its time; the series of
    every 2xx-answered attempt are added to `delivered`.
    """

    def __init__(self, script: Callable[[int, list[SeriesKey]], Reply]) -> None:
        self.script = script
        self.t0 = trio.current_time()
        self.attempts: list[Attempt] = []
        self.delivered: list[SeriesKey] = []
        self.metrics: Metrics | None = None
        self.stall_from: int | None = None  # attempts from this number on never get an answer

    @property
    def times(self) -> list[float]:
        return [a.time for a in self.attempts]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        series = decode_body(await request.aread())
        state = -1.0
        if self.metrics is not None:
            state = breaker_state(self.metrics)
        n = len(self.attempts)
        self.attempts.append(Attempt(trio.current_time() - self.t0, request, series, state))
        if self.stall_from is not None and n >= self.stall_from:
            await trio.sleep_forever()
        reply = self.script(n, series)
        if reply == REFUSE:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        status, headers = reply if isinstance(reply, tuple) else (reply, {})
        if 200 <= status < 300:
            self.delivered.extend(series)
            return httpx.Response(status, headers=headers)
        return httpx.Response(status, headers=headers, content=f"scripted {status}".encode())


def replies(*scripted: Reply, then: Reply = 204) -> Callable[[int, list[SeriesKey]], Reply]:
    """Answer the first attempts with `scripted`, every later one with `then`."""
    return lambda n, _series: scripted[n] if n < len(scripted) else then


# ---- running the exporter ---------------------------------------------------------------------


def exporter_config(**overrides: Any) -> PRWExporterConfig:
    fields: dict[str, Any] = {
        "url": "http://backend.test:9090/api/v1/write",
        "name": NAME,
        "workers": 1,
        "retry": RetryConfig(initial_delay_s=0.5, multiplier=2.0, max_delay_s=30.0, jitter=0.0),
    }
    return PRWExporterConfig(**(fields | overrides))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """One of the exporter's metrics for pipeline prw and exporter NAME; 0 if not set yet."""
    value = metrics.registry.get_sample_value(name, {"pipeline": "prw", "exporter": NAME, **labels})
    return 0.0 if value is None else value


def breaker_state(metrics: Metrics) -> float:
    return sample(metrics, "governor_breaker_state")


def dropped(metrics: Metrics, reason: str) -> float:
    return sample(metrics, "governor_datapoints_dropped_total", reason=reason)


@attrs.define
class Harness:
    exporter: PRWExporter
    queue: MemoryQueue
    metrics: Metrics
    backend: FakeBackend


def make_harness(cfg: PRWExporterConfig, backend: FakeBackend) -> Harness:
    metrics = Metrics()
    backend.metrics = metrics
    queue = MemoryQueue(QueueConfig(), lambda batch: None)
    exporter = PRWExporter(cfg, queue, metrics=metrics, transport=backend)
    return Harness(exporter, queue, metrics, backend)


async def deliver_all(
    cfg: PRWExporterConfig, backend: FakeBackend, batches: list[Batch]
) -> Harness:
    """Queue `batches`, close the queue and run the exporter until it has settled all of them."""
    h = make_harness(cfg, backend)
    for batch in batches:
        await h.queue.put(batch)
    h.queue.close()
    await h.exporter.run()
    st = h.queue.statistics()
    assert (st.length, st.in_flight) == (0, 0)
    return h


# ---- retries ----------------------------------------------------------------------------------


async def test_5xx_is_retried_with_exact_backoff_then_delivered_once(
    autojump_clock: MockClock,
) -> None:
    """503, 503, 204: attempts at 0, 0.5 and 1.5 s (initial 0.5 s, x2, no jitter), the batch is
    delivered exactly once and two retries are counted."""
    batch, series = make_batch("retry", n_series=3, n_samples=2)
    backend = FakeBackend(replies(503, 503))
    h = await deliver_all(exporter_config(), backend, [batch])
    assert backend.times == [0.0, 0.5, 1.5]
    assert backend.delivered == series
    assert [a.series for a in backend.attempts] == [series, series, series]
    assert sample(h.metrics, "governor_export_retries_total") == 2.0
    assert sample(h.metrics, "governor_datapoints_sent_total") == 6.0
    assert sample(h.metrics, "governor_export_requests_total", outcome="retryable") == 2.0
    assert sample(h.metrics, "governor_export_requests_total", outcome="success") == 1.0
    assert h.exporter.sent_datapoints == 6
    assert h.exporter.dropped_datapoints == {}


async def test_retry_after_sets_the_next_attempt_time(autojump_clock: MockClock) -> None:
    """429 with Retry-After: 7 makes the next attempt exactly 7 s later, not after the 0.5 s
    backoff; a later 503 without Retry-After goes back to the backoff schedule."""
    batch, series = make_batch("ra")
    backend = FakeBackend(replies((429, {"retry-after": "7"}), 503))
    h = await deliver_all(exporter_config(), backend, [batch])
    assert backend.times == [0.0, 7.0, 8.0]
    assert backend.delivered == series
    assert sample(h.metrics, "governor_export_retries_total") == 2.0


async def test_retry_after_is_clipped_to_max_retry_after(autojump_clock: MockClock) -> None:
    """A Retry-After of an hour waits only max_retry_after_s."""
    batch, series = make_batch("clip")
    cfg = exporter_config(retry=RetryConfig(initial_delay_s=0.5, jitter=0.0, max_retry_after_s=60))
    backend = FakeBackend(replies((503, {"retry-after": "3600"})))
    await deliver_all(cfg, backend, [batch])
    assert backend.times == [0.0, 60.0]
    assert backend.delivered == series


async def test_network_error_is_retried(autojump_clock: MockClock) -> None:
    """A connection error is retryable: retried on the backoff schedule, then delivered."""
    batch, series = make_batch("net")
    backend = FakeBackend(replies(REFUSE, REFUSE))
    h = await deliver_all(exporter_config(), backend, [batch])
    assert backend.times == [0.0, 0.5, 1.5]
    assert backend.delivered == series
    assert sample(h.metrics, "governor_export_retries_total") == 2.0
    assert sample(h.metrics, "governor_export_requests_total", outcome="retryable") == 2.0
    assert h.exporter.dropped_datapoints == {}


async def test_max_elapsed_gives_up_with_retries_exhausted(autojump_clock: MockClock) -> None:
    """With max_elapsed_s=2 a batch that keeps failing is tried at 0, 0.5, 1.5 and 3.5 s, then
    dropped and counted as retries_exhausted; the next batch is delivered."""
    failing, _ = make_batch("doomed", n_series=2, n_samples=3)
    good, good_series = make_batch("good")
    cfg = exporter_config(
        retry=RetryConfig(initial_delay_s=0.5, jitter=0.0, max_elapsed_s=2.0),
        breaker=BreakerConfig(failure_threshold=100),
    )
    backend = FakeBackend(replies(503, 503, 503, 503))
    h = await deliver_all(cfg, backend, [failing, good])
    assert backend.times == [0.0, 0.5, 1.5, 3.5, 3.5]
    assert backend.delivered == good_series
    assert dropped(h.metrics, "retries_exhausted") == 6.0
    assert h.exporter.dropped_datapoints == {"retries_exhausted": 6}
    assert sample(h.metrics, "governor_export_retries_total") == 3.0


# ---- permanent errors and splitting -----------------------------------------------------------


async def test_400_is_dropped_without_retry_and_the_next_batch_flows(
    autojump_clock: MockClock,
) -> None:
    """A 400 is permanent: the batch is dropped at once with reason http_400 (its datapoints
    counted), never retried, and the worker goes on to deliver the next batch."""
    bad, bad_series = make_batch("bad", n_series=3, n_samples=4)
    good, good_series = make_batch("good", n_series=2, n_samples=1)
    backend = FakeBackend(lambda n, series: 400 if series == bad_series else 204)
    h = await deliver_all(exporter_config(), backend, [bad, good])
    assert backend.times == [0.0, 0.0]
    assert [a.series for a in backend.attempts] == [bad_series, good_series]
    assert backend.delivered == good_series
    assert dropped(h.metrics, "http_400") == 12.0
    assert h.exporter.dropped_datapoints == {"http_400": 12}
    assert sample(h.metrics, "governor_export_retries_total") == 0.0
    assert sample(h.metrics, "governor_export_requests_total", outcome="permanent") == 1.0
    assert sample(h.metrics, "governor_datapoints_sent_total") == 2.0


async def test_413_splits_recursively_until_every_series_arrives_once(
    autojump_clock: MockClock,
) -> None:
    """A backend that refuses (413) any request with more than 3 series gets a 10-series batch
    split 10 -> 5+5 -> 2+3+2+3: every series arrives exactly once, three splits are counted,
    nothing is dropped and no time is spent waiting."""
    batch, series = make_batch("split", n_series=10, n_samples=2)
    backend = FakeBackend(lambda n, s: 413 if len(s) > 3 else 204)
    h = await deliver_all(exporter_config(), backend, [batch])
    assert [len(a.series) for a in backend.attempts] == [10, 5, 2, 3, 5, 2, 3]
    assert backend.times == [0.0] * 7
    assert sorted(backend.delivered) == sorted(series)
    assert len(backend.delivered) == 10
    assert sample(h.metrics, "governor_export_splits_total") == 3.0
    assert sample(h.metrics, "governor_datapoints_sent_total") == 20.0
    assert h.exporter.sent_datapoints == 20
    assert h.exporter.dropped_datapoints == {}


async def test_413_for_a_single_series_drops_it_as_too_large(autojump_clock: MockClock) -> None:
    """A lone series the backend refuses as too large cannot be split: dropped with reason
    too_large, its datapoints counted, no split counted, no retry."""
    batch, _ = make_batch("huge", n_series=1, n_samples=5)
    backend = FakeBackend(replies(413))
    h = await deliver_all(exporter_config(), backend, [batch])
    assert backend.times == [0.0]
    assert dropped(h.metrics, "too_large") == 5.0
    assert h.exporter.dropped_datapoints == {"too_large": 5}
    assert sample(h.metrics, "governor_export_splits_total") == 0.0
    assert sample(h.metrics, "governor_export_retries_total") == 0.0


async def test_413_split_halves_that_still_fail_are_dropped_separately(
    autojump_clock: MockClock,
) -> None:
    """When only one series is refused even alone, the split delivers all the others and drops
    exactly that series' datapoints as too_large."""
    batch, series = make_batch("mixed", n_series=4, n_samples=3)
    poison = series[2]
    backend = FakeBackend(lambda n, s: 413 if poison in s else 204)
    h = await deliver_all(exporter_config(), backend, [batch])
    assert sorted(backend.delivered) == sorted(s for s in series if s != poison)
    assert h.exporter.dropped_datapoints == {"too_large": 3}
    assert h.exporter.sent_datapoints == 9


# ---- circuit breaker --------------------------------------------------------------------------


async def test_breaker_opens_probes_once_doubles_and_closes(autojump_clock: MockClock) -> None:
    """failure_threshold=3, open_s=10: the third consecutive failure (t=1.5) opens the breaker
    (state 1); no request goes out while it is open; at t=11.5 exactly one probe goes out
    (state 2); it fails, so the breaker reopens for 20 s; the probe at t=31.5 succeeds, the
    breaker closes (state 0) and the queued batches flow right behind it."""
    batches = [make_batch(f"b{i}") for i in range(3)]
    cfg = exporter_config(breaker=BreakerConfig(failure_threshold=3, open_s=10.0, max_open_s=60.0))
    backend = FakeBackend(replies(503, 503, 503, 503))
    h = make_harness(cfg, backend)
    for batch, _ in batches:
        await h.queue.put(batch)
    h.queue.close()
    seen_states: list[tuple[float, float]] = []

    async def watch_breaker() -> None:
        for t in (1.0, 5.0, 11.0, 20.0, 31.0):
            await trio.sleep_until(backend.t0 + t)
            seen_states.append((t, breaker_state(h.metrics)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_breaker)
        await h.exporter.run()

    assert backend.times == [0.0, 0.5, 1.5, 11.5, 31.5, 31.5, 31.5]
    assert [a.breaker_state for a in backend.attempts] == [0, 0, 0, 2, 2, 0, 0]
    assert seen_states == [(1.0, 0.0), (5.0, 1.0), (11.0, 1.0), (20.0, 1.0), (31.0, 1.0)]
    assert not [t for t in backend.times if 1.5 < t < 11.5 or 11.5 < t < 31.5]
    assert breaker_state(h.metrics) == 0.0
    assert h.exporter.breaker.opened_total == 2
    assert sorted(backend.delivered) == sorted(s for _, keys_ in batches for s in keys_)


async def test_breaker_open_time_doubles_up_to_max_open(autojump_clock: MockClock) -> None:
    """Each failed probe doubles the open time (10, 20, 40) until max_open_s (50) caps it."""
    batch, series = make_batch("cap")
    cfg = exporter_config(breaker=BreakerConfig(failure_threshold=1, open_s=10.0, max_open_s=50.0))
    backend = FakeBackend(replies(503, 503, 503, 503, 503))
    await deliver_all(cfg, backend, [batch])
    assert backend.times == [0.0, 10.0, 30.0, 70.0, 120.0, 170.0]
    assert backend.delivered == series


async def test_breaker_lets_exactly_one_probe_through_among_many_workers(
    autojump_clock: MockClock,
) -> None:
    """With four workers each holding a batch and the backend down until t=30, once the breaker
    is open no worker sends until the open time is over, and then exactly one request (the
    probe) goes out at each probe time while the other workers wait; after the successful
    probe the breaker closes and every batch is delivered."""
    batches = [make_batch(f"w{i}") for i in range(4)]
    cfg = exporter_config(
        workers=4, breaker=BreakerConfig(failure_threshold=2, open_s=4.0, max_open_s=60.0)
    )
    backend = FakeBackend(lambda n, s: 503 if trio.current_time() - backend.t0 < 30 else 204)
    h = await deliver_all(cfg, backend, [b for b, _ in batches])
    # Two failures at t=0 open the breaker before the other two workers send; probes follow
    # at 4, 4+8, 12+16 and 28+32 (each failed probe doubles the open time); the last succeeds.
    assert backend.times == [0.0, 0.0, 4.0, 12.0, 28.0, 60.0, 60.0, 60.0, 60.0]
    assert [a.breaker_state for a in backend.attempts] == [0, 0, 2, 2, 2, 2, 0, 0, 0]
    assert h.exporter.breaker.opened_total == 4
    assert sorted(backend.delivered) == sorted(s for _, keys_ in batches for s in keys_)
    assert breaker_state(h.metrics) == 0.0


async def test_cancelled_mid_delivery_keeps_the_batch_in_flight_and_frees_the_probe(
    autojump_clock: MockClock,
) -> None:
    """Cancelling the exporter while its probe waits for the backend neither settles the batch
    (it stays in flight, unacked and uncounted, for the shutdown report or a redelivery) nor
    leaves the breaker stuck on a probe that will never report."""
    batch, _ = make_batch("cancel", n_series=2, n_samples=3)
    cfg = exporter_config(breaker=BreakerConfig(failure_threshold=1, open_s=5.0))
    backend = FakeBackend(replies(503))
    backend.stall_from = 1
    h = make_harness(cfg, backend)
    await h.queue.put(batch)
    with trio.move_on_after(20.0) as scope:
        await h.exporter.run()
    assert scope.cancelled_caught
    assert backend.times == [0.0, 5.0]
    assert backend.attempts[1].breaker_state == 2
    st = h.queue.statistics()
    assert (st.length, st.in_flight, st.in_flight_datapoints) == (0, 1, 6)
    assert h.exporter.sent_datapoints == 0
    assert h.exporter.dropped_datapoints == {}
    assert breaker_state(h.metrics) == 2.0
    assert h.exporter.breaker.acquire(trio.current_time()) == 0.0  # the probe slot is free


# ---- headers and auth -------------------------------------------------------------------------


async def _one_request(cfg: PRWExporterConfig) -> httpx.Request:
    batch, _ = make_batch("hdr")
    backend = FakeBackend(replies())
    await deliver_all(cfg, backend, [batch])
    [attempt] = backend.attempts
    return attempt.request


async def test_remote_write_headers_and_extra_headers(autojump_clock: MockClock) -> None:
    """Every request carries the remote write 1.0 headers (snappy, x-protobuf, version 0.1.0),
    governor's user agent and the configured extra headers; no authorization by default."""
    req = await _one_request(exporter_config(headers={"X-Scope-OrgID": "tenant-1"}))
    assert req.method == "POST"
    assert str(req.url) == "http://backend.test:9090/api/v1/write"
    assert req.headers["content-encoding"] == "snappy"
    assert req.headers["content-type"] == "application/x-protobuf"
    assert req.headers["x-prometheus-remote-write-version"] == "0.1.0"
    assert req.headers["user-agent"] == f"governor/{__version__}"
    assert req.headers["x-scope-orgid"] == "tenant-1"
    assert "authorization" not in req.headers


async def test_bearer_token(autojump_clock: MockClock) -> None:
    """bearer_token becomes Authorization: Bearer <token>."""
    req = await _one_request(exporter_config(bearer_token="s3cret"))
    assert req.headers["authorization"] == "Bearer s3cret"


async def test_bearer_token_file(autojump_clock: MockClock, tmp_path: Path) -> None:
    """bearer_token_file is read (trailing newline stripped) into Authorization: Bearer."""
    token_file = tmp_path / "token"
    token_file.write_text("from-file-token\n")
    req = await _one_request(exporter_config(bearer_token_file=str(token_file)))
    assert req.headers["authorization"] == "Bearer from-file-token"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_basic_auth(autojump_clock: MockClock) -> None:
    """basic_auth sends Authorization: Basic base64(user:password)."""
    cfg = exporter_config(basic_auth=BasicAuthConfig(username="alice", password="pa:ss"))
    req = await _one_request(cfg)
    assert req.headers["authorization"] == _basic("alice", "pa:ss")


async def test_basic_auth_password_file(autojump_clock: MockClock, tmp_path: Path) -> None:
    """basic_auth.password_file is read (trailing newline stripped) as the password."""
    pw = tmp_path / "password"
    pw.write_text("filepw\n")
    cfg = exporter_config(basic_auth=BasicAuthConfig(username="bob", password_file=str(pw)))
    req = await _one_request(cfg)
    assert req.headers["authorization"] == _basic("bob", "filepw")


# ---- over a real socket -----------------------------------------------------------------------


class HTTPBackend:
    """An ASGI remote-write backend: answers `fail_status` to the first `fail_first` requests
    and while `down` is set, 204 otherwise; records the series of every request it accepts."""

    def __init__(self, fail_first: int = 0, fail_status: int = 500) -> None:
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.down = False
        self.requests = 0
        self.failed = 0
        self.series: list[SeriesKey] = []
        self._changed = trio.Event()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(scope, receive, 1 << 30)
        self.requests += 1
        if self.down or self.requests <= self.fail_first:
            self.failed += 1
            status = self.fail_status
        else:
            status = 204
            self.series.extend(decode_body(body))
        self._changed.set()
        self._changed = trio.Event()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        with trio.fail_after(DEADLINE_S):
            while not predicate():
                await self._changed.wait()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll `predicate` (state with no event to wait on) until it holds; fails after DEADLINE_S."""
    with trio.fail_after(DEADLINE_S):
        while not predicate():  # noqa: ASYNC110 - the state has no event to wait on
            await trio.sleep(0.001)


def real_time_config(url: str, **overrides: Any) -> PRWExporterConfig:
    return exporter_config(
        url=url,
        workers=2,
        timeout_s=5.0,
        retry=RetryConfig(initial_delay_s=0.01, max_delay_s=0.05, jitter=0.0),
        **overrides,
    )


async def test_real_backend_500s_then_accepts_everything() -> None:
    """Over a real socket, a backend answering 500 to its first three requests and 204 after
    ends up with every series of every batch exactly once; the three failures are retried."""
    sent: list[SeriesKey] = []
    batches = []
    for i in range(5):
        batch, series = make_batch(f"real-{i}", n_series=3)
        batches.append(batch)
        sent += series
    backend = HTTPBackend(fail_first=3)
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        [(host, port)] = await nursery.start(
            serve_http, backend, hypercorn_config("127.0.0.1:0"), stop.wait
        )
        cfg = real_time_config(f"http://{host}:{port}/api/v1/write")
        metrics = Metrics()
        queue = MemoryQueue(QueueConfig(), lambda batch: None)
        exporter = PRWExporter(cfg, queue, metrics=metrics)
        for batch in batches:
            await queue.put(batch)
        queue.close()
        with trio.fail_after(DEADLINE_S):
            await exporter.run()
        stop.set()
    assert sorted(backend.series) == sorted(sent)
    assert backend.failed == 3
    assert backend.requests == 8
    assert exporter.sent_datapoints == 30
    assert exporter.dropped_datapoints == {}
    assert sample(metrics, "governor_export_retries_total") == 3.0


async def test_backend_down_then_up_on_the_same_port_gets_everything() -> None:
    """While nothing listens on the backend's port the exporter's requests are refused and the
    breaker opens; once the backend starts on that port the breaker closes and everything
    queued meanwhile arrives, exactly once."""
    with trio.socket.socket() as reserve:
        await reserve.bind(("127.0.0.1", 0))
        port = reserve.getsockname()[1]
    sent: list[SeriesKey] = []
    metrics = Metrics()
    queue = MemoryQueue(QueueConfig(), lambda batch: None)
    cfg = real_time_config(
        f"http://127.0.0.1:{port}/api/v1/write",
        breaker=BreakerConfig(failure_threshold=3, open_s=0.05, max_open_s=0.2),
    )
    exporter = PRWExporter(cfg, queue, metrics=metrics)
    backend = HTTPBackend()
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        for i in range(4):
            batch, series = make_batch(f"down-{i}")
            await queue.put(batch)
            sent += series
        await wait_until(lambda: breaker_state(metrics) == 1.0)
        assert backend.requests == 0
        assert sample(metrics, "governor_export_requests_total", outcome="retryable") >= 3.0

        stop = trio.Event()
        [(_, bound)] = await nursery.start(
            serve_http, backend, hypercorn_config(f"127.0.0.1:{port}"), stop.wait
        )
        assert bound == port
        await backend.wait_for(lambda: len(backend.series) >= len(sent))
        queue.close()
        stop.set()
    assert sorted(backend.series) == sorted(sent)
    assert breaker_state(metrics) == 0.0
    assert exporter.breaker.opened_total >= 1
    assert exporter.sent_datapoints == 16
    assert exporter.dropped_datapoints == {}


# ---- shutdown with a whole App ----------------------------------------------------------------


@attrs.define
class Governed:
    app: App
    addrs: Addresses
    backend: HTTPBackend
    client: httpx.AsyncClient
    done: trio.Event
    acknowledged: int = 0  # datapoints answered 204

    async def write(self, tag: str, n_series: int = 2, n_samples: int = 3) -> None:
        req = write_request(tag, n_series, n_samples)
        host, port = self.addrs.prw
        resp = await self.client.post(
            f"http://{host}:{port}/api/v1/write",
            content=bytes(cramjam.snappy.compress_raw(req.SerializeToString())),
            headers={"content-type": "application/x-protobuf", "content-encoding": "snappy"},
        )
        assert resp.status_code == 204
        self.acknowledged += n_series * n_samples


@asynccontextmanager
async def governed(backend: HTTPBackend, shutdown_grace_s: float) -> AsyncIterator[Governed]:
    """A backend and an App exporting to it; the body must shut the App down itself."""
    async with trio.open_nursery() as nursery:
        backend_stop = trio.Event()
        [(host, port)] = await nursery.start(
            serve_http, backend, hypercorn_config("127.0.0.1:0"), backend_stop.wait
        )
        cfg = config_from_dict(
            {
                "telemetry": {"listen": "127.0.0.1:0"},
                "shutdown_grace_s": shutdown_grace_s,
                "prw": {
                    "receiver": {"listen": "127.0.0.1:0"},
                    "batch": {"interval_s": 0.01, "max_series": 2},
                    "exporters": [
                        {
                            "url": f"http://{host}:{port}/api/v1/write",
                            "name": "backend",
                            "workers": 2,
                            "retry": {"initial_delay_s": 0.01, "max_delay_s": 0.05},
                            "breaker": {"open_s": 0.05, "max_open_s": 0.1},
                        }
                    ],
                },
            }
        )
        app = App(cfg)
        done = trio.Event()

        async def run_app(*, task_status: trio.TaskStatus[Addresses]) -> None:
            try:
                await app.run(task_status=task_status)
            finally:
                done.set()

        addrs = await nursery.start(run_app)
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
            yield Governed(app, addrs, backend, client, done)
        with trio.fail_after(DEADLINE_S):
            await done.wait()
        backend_stop.set()


async def test_shutdown_delivers_queued_data_when_the_backend_recovers_within_grace() -> None:
    """Data acknowledged while the backend is failing is still queued when shutdown begins; the
    backend recovers within shutdown_grace_s, so all of it is delivered, nothing is dropped and
    the report says the drain was clean."""
    backend = HTTPBackend(fail_status=503)
    async with governed(backend, shutdown_grace_s=5.0) as gov:
        backend.down = True
        for i in range(4):
            await gov.write(f"recover-{i}")
        await backend.wait_for(lambda: backend.failed >= 3)
        gov.app.shutdown()
        assert not gov.done.is_set()
        backend.down = False
        with trio.fail_after(DEADLINE_S):
            await gov.done.wait()
    report = gov.app.report
    assert report is not None
    assert report.clean
    assert gov.acknowledged == 24
    assert report.delivered == {"backend": 24}
    assert report.dropped == {"backend": {}}
    assert len(backend.series) == 8
    assert len(set(backend.series)) == 8


async def test_shutdown_counts_undelivered_data_as_dropped_after_grace() -> None:
    """With the backend down for good, app.run returns once shutdown_grace_s (0.5 s) is over;
    what was acknowledged but not delivered is reported dropped with reason shutdown, and
    delivered + dropped equals acknowledged exactly."""
    backend = HTTPBackend(fail_status=503)
    async with governed(backend, shutdown_grace_s=0.5) as gov:
        await gov.write("early", n_series=2, n_samples=2)
        await backend.wait_for(lambda: len(backend.series) == 2)
        backend.down = True
        for i in range(5):
            await gov.write(f"late-{i}")
        await backend.wait_for(lambda: backend.failed >= 3)
        started = trio.current_time()
        gov.app.shutdown()
        with trio.fail_after(DEADLINE_S):
            await gov.done.wait()
        took = trio.current_time() - started
    assert 0.5 <= took < 0.5 + 2.0
    report = gov.app.report
    assert report is not None
    assert not report.clean
    assert gov.acknowledged == 4 + 30
    assert report.delivered == {"backend": 4}
    assert report.dropped == {"backend": {"shutdown": 30}}
    assert report.delivered["backend"] + report.dropped["backend"]["shutdown"] == 34
    assert len(backend.series) == 2
    dropped_metric = gov.app.metrics.registry.get_sample_value(
        "governor_datapoints_dropped_total",
        {"pipeline": "prw", "exporter": "backend", "reason": "shutdown"},
    )
    assert dropped_metric == 30.0


# ---- a full queue -----------------------------------------------------------------------------


async def test_queue_evictions_are_counted_as_queue_full(autojump_clock: MockClock) -> None:
    """With drop_oldest and room for two batches, a third put evicts the oldest: the exporter
    counts its datapoints as dropped with reason queue_full and delivers the two that stayed."""
    metrics = Metrics()
    backend = FakeBackend(replies())
    queue = MemoryQueue(QueueConfig(max_batches=2, full_behavior="drop_oldest"))
    exporter = PRWExporter(exporter_config(), queue, metrics=metrics, transport=backend)
    queue.on_drop = exporter.count_queue_drop
    (a, _), (b, b_series), (c, c_series) = (make_batch(t, n_series=3) for t in "abc")
    for batch in (a, b, c):
        await queue.put(batch)
    queue.close()
    await exporter.run()
    assert dropped(metrics, "queue_full") == 6.0
    assert exporter.dropped_datapoints == {"queue_full": 6}
    assert backend.delivered == b_series + c_series
    assert exporter.sent_datapoints == 12


async def test_bearer_token_file_is_read_again_for_every_request(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    """A rotated token file is picked up by the next request; a file that cannot be read keeps
    the last token."""
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    metrics = Metrics()
    backend = FakeBackend(replies())
    queue = MemoryQueue(QueueConfig())
    exporter = PRWExporter(
        exporter_config(bearer_token_file=str(token_file)),
        queue,
        metrics=metrics,
        transport=backend,
    )
    (a, _), (b, _), (c, _) = (make_batch(t) for t in "abc")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exporter.run)
        await queue.put(a)
        await trio.sleep(1)
        token_file.write_text("second\n")
        await queue.put(b)
        await trio.sleep(1)
        token_file.unlink()
        await queue.put(c)
        await trio.sleep(1)
        queue.close()
    assert [att.request.headers["authorization"] for att in backend.attempts] == [
        "Bearer first",
        "Bearer second",
        "Bearer second",
    ]
