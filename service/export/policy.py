"""Pure policies for delivery: how to read a backend's answer, how long to wait, when to stop
trying a backend. Nothing here sleeps or does I/O; the export worker is the only caller."""

from __future__ import annotations

import email.utils
import enum
import random
import time
from collections.abc import Mapping

import attrs

from service.config import BreakerConfig, RetryConfig


class Kind(enum.Enum):
    SUCCESS = "success"
    RETRYABLE = "retryable"  # 5xx, 429, network errors: try again later
    PERMANENT = "permanent"  # other 4xx: the data will never be accepted; drop and count
    TOO_LARGE = "too_large"  # 413: split the batch and send the halves


@attrs.frozen
class Outcome:
    kind: Kind
    status: int | None = None  # HTTP status, None for a network error
    retry_after_s: float | None = None
    detail: str = ""
    # SUCCESS: datapoints the backend refused for good (OTLP partial success).
    rejected: int = 0
    # PERMANENT: the reason the dropped datapoints are counted under (grpc_<code>); empty for
    # HTTP, counted as http_<status>.
    code: str = ""

    @property
    def backend_alive(self) -> bool:
        """Whether the backend answered like a working server (the breaker's notion of success)."""
        return self.kind is not Kind.RETRYABLE


def classify_http(status: int, headers: Mapping[str, str], body: bytes = b"") -> Outcome:
    """Classify an HTTP response from a remote-write backend."""
    detail = body[:200].decode("utf-8", "replace").strip()
    if 200 <= status < 300:
        return Outcome(Kind.SUCCESS, status)
    if status == 413:
        return Outcome(Kind.TOO_LARGE, status, detail=detail)
    if status == 429 or status >= 500:
        return Outcome(
            Kind.RETRYABLE, status, parse_retry_after(headers.get("retry-after")), detail
        )
    return Outcome(Kind.PERMANENT, status, detail=detail)


def network_error(exc: BaseException) -> Outcome:
    """A retryable outcome whose detail names the error and its first cause that says
    something (httpx wraps a refused TLS certificate in errors without a message)."""
    detail = f"{type(exc).__name__}: {exc}".strip()
    cause: BaseException | None = exc
    seen = 0
    while not str(cause) and cause is not None and seen < 10:
        cause = cause.__cause__ or cause.__context__
        seen += 1
    if cause is not None and cause is not exc and str(cause):
        detail += f" ({type(cause).__name__}: {cause})"
    return Outcome(Kind.RETRYABLE, None, None, detail)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    # ASCII only: str.isdigit() also accepts '²', which float() refuses.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@attrs.frozen
class RetryPolicy:
    cfg: RetryConfig

    def next_delay(
        self, attempt: int, retry_after_s: float | None = None, rand: float | None = None
    ) -> float:
        """Seconds to wait before retry number `attempt` (0 is the first retry).

        Exponential backoff with +-jitter, never below a Retry-After (clipped to
        max_retry_after_s). `rand` in [0, 1) replaces the random draw in tests.
        """
        c = self.cfg
        try:
            base = min(c.max_delay_s, c.initial_delay_s * c.multiplier ** min(attempt, 64))
        except OverflowError:  # an absurd multiplier: the cap is the answer anyway
            base = c.max_delay_s
        r = random.random() if rand is None else rand
        delay = base * (1 + c.jitter * (2 * r - 1))
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, c.max_retry_after_s))
        return delay


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Closed -> open after `failure_threshold` consecutive failures; open -> half-open after the
    open time; half-open lets exactly one probe through, whose outcome closes or re-opens it.
    The open time doubles with every failed probe, up to `max_open_s`."""

    def __init__(self, cfg: BreakerConfig) -> None:
        self.cfg = cfg
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.open_until = 0.0
        self.open_s = cfg.open_s
        self.probe_in_flight = False
        self.opened_total = 0

    def acquire(self, now: float) -> float:
        """0.0 if a request may go now (taking the probe slot when half-open); otherwise how
        long to wait before asking again (inf while another request is the probe)."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        if self.state is BreakerState.OPEN:
            if now < self.open_until:
                return self.open_until - now
            self.state = BreakerState.HALF_OPEN
        if self.probe_in_flight:
            return float("inf")
        self.probe_in_flight = True
        return 0.0

    def record(self, alive: bool, now: float) -> None:
        """Report a request's outcome: `alive` if the backend answered like a working server."""
        was_probe = self.probe_in_flight
        self.probe_in_flight = False
        if alive:
            self.state = BreakerState.CLOSED
            self.failures = 0
            self.open_s = self.cfg.open_s
            return
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN and was_probe:
            self.open_s = min(self.open_s * 2, self.cfg.max_open_s)
            self._open(now)
        elif self.state is BreakerState.CLOSED and self.failures >= self.cfg.failure_threshold:
            self._open(now)

    def abandon(self) -> None:
        """The probe was cancelled before it had an outcome: let another request probe."""
        self.probe_in_flight = False

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.open_until = now + self.open_s
        self.opened_total += 1

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state.name.lower()} failures={self.failures}>"
