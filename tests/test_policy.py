"""Tests for service/export/policy.py: classifying backend answers, backoff delays and the
circuit breaker. All pure: times are passed in, nothing sleeps."""

from __future__ import annotations

import math

import httpx
import pytest

from service.config import BreakerConfig, RetryConfig
from service.export import policy
from service.export.policy import (
    BreakerState,
    CircuitBreaker,
    Kind,
    Outcome,
    RetryPolicy,
    classify_http,
    network_error,
    parse_retry_after,
)

# ---- classify_http ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_2xx_is_success(status: int) -> None:
    """Any 2xx is a success; a Retry-After on it is ignored."""
    assert classify_http(status, {"retry-after": "5"}, b"ok") == Outcome(Kind.SUCCESS, status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_other_4xx_is_permanent(status: int) -> None:
    """4xx other than 413 and 429 is permanent, with the body's start as detail."""
    out = classify_http(status, {"retry-after": "5"}, b"  out of order sample\n")
    assert out == Outcome(Kind.PERMANENT, status, None, "out of order sample")
    assert out.backend_alive is True


def test_413_is_too_large() -> None:
    """413 asks for the batch to be split, and the backend is alive."""
    out = classify_http(413, {}, b"request too big")
    assert out == Outcome(Kind.TOO_LARGE, 413, None, "request too big")
    assert out.backend_alive is True


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_429_and_5xx_are_retryable(status: int) -> None:
    """429 and 5xx are retryable and count against the backend; no header means no hint."""
    out = classify_http(status, {}, b"busy")
    assert out == Outcome(Kind.RETRYABLE, status, None, "busy")
    assert out.backend_alive is False


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), ("0", 0.0), (" 120 ", 120.0)])
def test_retry_after_delta_seconds(status: int, header: str, seconds: float) -> None:
    """Retry-After in delta-seconds is read on 429 and 5xx."""
    out = classify_http(status, {"retry-after": header})
    assert out == Outcome(Kind.RETRYABLE, status, seconds)


def test_retry_after_from_httpx_headers_is_case_insensitive() -> None:
    """With the exporter's real header type, Retry-After is found whatever its case."""
    out = classify_http(503, httpx.Headers({"Retry-After": "9"}))
    assert out.retry_after_s == 9.0


def test_retry_after_http_date(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry-After as an HTTP-date is the number of seconds from now until then."""
    now = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    monkeypatch.setattr(policy.time, "time", lambda: now)
    out = classify_http(503, {"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"})
    assert out == Outcome(Kind.RETRYABLE, 503, 30.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Wed, 21 Oct 2015 07:29:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # in the past: retry now, never negative
        ("Wednesday, 21-Oct-15 07:28:05 GMT", 5.0),  # RFC 850, still allowed by RFC 9110
    ],
)
def test_parse_retry_after_dates(value: str, expected: float) -> None:
    """An HTTP-date becomes seconds from `now`, clipped at zero."""
    assert parse_retry_after(value, now=1_445_412_480.0) == expected


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "-5", "1.5", "1e3", "5 seconds", "²", "١٢", "Mon, 99 Foo 2015 25:61"],
)
def test_bad_retry_after_is_none(value: str | None) -> None:
    """Absent, negative, fractional, non-ASCII digits and malformed dates give no hint."""
    assert parse_retry_after(value, now=0.0) is None
    assert classify_http(503, {} if value is None else {"retry-after": value}).retry_after_s is None


def test_detail_is_bounded_and_decoded() -> None:
    """The detail is at most 200 bytes of the body, decoded leniently."""
    out = classify_http(400, {}, b"x" * 1000)
    assert out.detail == "x" * 200
    assert classify_http(400, {}, b"\xff bad").detail == "\ufffd bad"


def test_network_error_is_retryable() -> None:
    """A transport error is retryable with no status, named by exception type."""
    out = network_error(httpx.ConnectError("connection refused"))
    assert out == Outcome(Kind.RETRYABLE, None, None, "ConnectError: connection refused")
    assert out.backend_alive is False


# ---- RetryPolicy ------------------------------------------------------------------------------

# Powers of two keep every expected value exact in binary floating point.
RETRY = RetryConfig(
    initial_delay_s=0.5, max_delay_s=30.0, multiplier=2.0, jitter=0.25, max_retry_after_s=300.0
)


def test_backoff_without_jitter() -> None:
    """rand=0.5 is the middle of the jitter range: plain exponential backoff, capped."""
    p = RetryPolicy(RETRY)
    delays = [p.next_delay(a, rand=0.5) for a in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff_cap_holds_for_huge_attempts() -> None:
    """Any attempt number, however large, waits max_delay_s."""
    p = RetryPolicy(RETRY)
    assert p.next_delay(10_000, rand=0.5) == 30.0


def test_jitter_bounds() -> None:
    """rand=0 gives base*(1-jitter); rand just below 1 gives base*(1+jitter), never more."""
    p = RetryPolicy(RETRY)
    assert [p.next_delay(a, rand=0.0) for a in (0, 3, 7)] == [0.375, 3.0, 22.5]
    almost_one = math.nextafter(1.0, 0.0)
    for attempt, base in [(0, 0.5), (3, 4.0), (7, 30.0)]:
        d = p.next_delay(attempt, rand=almost_one)
        assert d <= base * 1.25
        assert d == pytest.approx(base * 1.25, rel=1e-12)


def test_random_delays_stay_within_the_jitter_band() -> None:
    """Without rand, every delay lies in [base*(1-jitter), base*(1+jitter)]."""
    p = RetryPolicy(RETRY)
    for _ in range(200):
        assert 3.0 <= p.next_delay(3) <= 5.0


def test_no_jitter_config_is_exact() -> None:
    """With jitter=0 the delay does not depend on the draw at all."""
    p = RetryPolicy(RetryConfig(initial_delay_s=1.0, multiplier=3.0, max_delay_s=100.0, jitter=0))
    assert [p.next_delay(a) for a in range(6)] == [1.0, 3.0, 9.0, 27.0, 81.0, 100.0]


def test_retry_after_wins_when_longer() -> None:
    """A Retry-After longer than the backoff is used as is; a shorter one changes nothing."""
    p = RetryPolicy(RETRY)
    assert p.next_delay(0, retry_after_s=10.0, rand=0.5) == 10.0
    assert p.next_delay(4, retry_after_s=2.0, rand=0.5) == 8.0
    assert p.next_delay(4, retry_after_s=0.0, rand=0.0) == 6.0
    # Longer than max_delay_s: the backend's word beats our cap.
    assert p.next_delay(9, retry_after_s=120.0, rand=0.5) == 120.0


def test_retry_after_is_clipped() -> None:
    """A Retry-After longer than max_retry_after_s is clipped to it."""
    p = RetryPolicy(RETRY)
    assert p.next_delay(0, retry_after_s=86_400.0, rand=0.5) == 300.0
    assert p.next_delay(0, retry_after_s=300.0, rand=0.5) == 300.0


# ---- CircuitBreaker ---------------------------------------------------------------------------

BREAKER = BreakerConfig(failure_threshold=3, open_s=5.0, max_open_s=60.0)


def opened(now: float = 100.0) -> CircuitBreaker:
    """A breaker that has just opened at `now` after three failures."""
    b = CircuitBreaker(BREAKER)
    for _ in range(3):
        assert b.acquire(now) == 0.0
        b.record(False, now)
    assert b.state is BreakerState.OPEN
    return b


def test_closed_until_threshold_consecutive_failures() -> None:
    """The breaker lets everything through until failure_threshold failures in a row."""
    b = CircuitBreaker(BREAKER)
    assert (b.state, b.acquire(0.0)) == (BreakerState.CLOSED, 0.0)
    b.record(False, 1.0)
    b.record(False, 2.0)
    assert (b.state, b.failures, b.acquire(2.0)) == (BreakerState.CLOSED, 2, 0.0)
    b.record(False, 3.0)
    assert (b.state, b.opened_total, b.open_until) == (BreakerState.OPEN, 1, 8.0)


def test_a_success_resets_the_failure_count() -> None:
    """Failures must be consecutive: a success in between starts the count again."""
    b = CircuitBreaker(BREAKER)
    for alive in (False, False, True, False, False):
        b.record(alive, 0.0)
    assert (b.state, b.failures) == (BreakerState.CLOSED, 2)
    b.record(False, 0.0)
    assert b.state is BreakerState.OPEN


def test_open_returns_the_remaining_time() -> None:
    """While open, acquire refuses and says how long until the breaker may probe."""
    b = opened(now=100.0)
    assert b.acquire(100.0) == 5.0
    assert b.acquire(101.5) == 3.5
    assert b.acquire(104.75) == 0.25
    assert b.state is BreakerState.OPEN
    assert repr(b) == "<CircuitBreaker open failures=3>"


def test_half_open_allows_exactly_one_probe() -> None:
    """When the open time is over, the first acquire is the probe; others wait indefinitely
    (inf) until the probe has an outcome."""
    b = opened(now=100.0)
    assert b.acquire(105.0) == 0.0
    assert (b.state, b.probe_in_flight) == (BreakerState.HALF_OPEN, True)
    assert b.acquire(105.0) == math.inf
    assert b.acquire(500.0) == math.inf


def test_probe_success_closes() -> None:
    """A successful probe closes the breaker and clears the failure count."""
    b = opened(now=100.0)
    assert b.acquire(105.0) == 0.0
    b.record(True, 105.5)
    assert (b.state, b.failures, b.probe_in_flight) == (BreakerState.CLOSED, 0, False)
    assert b.acquire(105.5) == 0.0
    assert b.acquire(105.5) == 0.0


def test_probe_failure_reopens_with_doubled_time_up_to_max() -> None:
    """Each failed probe re-opens the breaker for twice as long, up to max_open_s; a probe
    success then resets the open time to open_s."""
    b = opened(now=0.0)
    now = 0.0
    waits = []
    for _ in range(6):
        now = b.open_until
        assert b.acquire(now) == 0.0
        b.record(False, now)
        assert b.state is BreakerState.OPEN
        waits.append(b.open_until - now)
    assert waits == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert b.opened_total == 7
    now = b.open_until
    assert b.acquire(now) == 0.0
    b.record(True, now)
    for _ in range(3):
        b.record(False, now)
    assert b.open_until - now == 5.0


def test_abandon_frees_the_probe_slot() -> None:
    """A probe cancelled before its outcome gives the slot back: the next acquire probes."""
    b = opened(now=100.0)
    assert b.acquire(105.0) == 0.0
    assert b.acquire(105.0) == math.inf
    b.abandon()
    assert (b.state, b.probe_in_flight) == (BreakerState.HALF_OPEN, False)
    assert b.acquire(106.0) == 0.0
    assert b.acquire(106.0) == math.inf


def test_a_late_failure_while_open_does_not_extend_it() -> None:
    """A request that was already in flight and fails after the breaker opened leaves the open
    time as it was."""
    b = opened(now=100.0)
    b.record(False, 102.0)
    assert (b.state, b.open_until, b.opened_total) == (BreakerState.OPEN, 105.0, 1)


def test_a_late_success_while_open_closes() -> None:
    """Any success shows the backend is alive: the breaker closes at once."""
    b = opened(now=100.0)
    b.record(True, 101.0)
    assert (b.state, b.failures) == (BreakerState.CLOSED, 0)
    assert b.acquire(101.0) == 0.0


def test_an_absurd_multiplier_is_capped_not_an_error() -> None:
    """A multiplier so large that the exponent overflows a float still gives max_delay_s."""
    p = RetryPolicy(RetryConfig(jitter=0, multiplier=1e300, max_delay_s=30.0))
    assert [p.next_delay(a) for a in (0, 1, 2, 70)] == [0.5, 30.0, 30.0, 30.0]
