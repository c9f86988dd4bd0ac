"""Admission shared by every receiver of a pipeline: concurrency slots, the byte budget, the
hand-off into the ingest channel, and bearer-token authentication.

It never waits past a request's deadline: no slot, no budget or no room in the channel in time is
backpressure (429 / RESOURCE_EXHAUSTED), a closed channel is draining (503 / UNAVAILABLE).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from service.config import IngestConfig, ReceiverAuthConfig
from service.governance.stage import Governance
from service.pipeline.budget import ByteBudget
from service.pipeline.items import Ingested
from service.receivers.http import Rejected, Scope, header
from service.telemetry import logs
from service.telemetry.health import Health
from service.telemetry.metrics import Metrics

T = TypeVar("T")


class Intake:
    """The bounded entry into one pipeline, shared by its receivers (PRW; OTLP gRPC and HTTP)."""

    def __init__(
        self,
        cfg: IngestConfig,
        tx: trio.MemorySendChannel[Ingested],
        budget: ByteBudget,
        *,
        ack_after_queue: bool = False,
    ) -> None:
        """`ack_after_queue`: items carry a `done` event, set once their batch is queued (disk
        and hybrid queues); receivers answer only then."""
        self.cfg = cfg
        self.tx = tx
        self.budget = budget
        self.ack_after_queue = ack_after_queue
        # The pipeline's stats, limits and rules (service/governance/stage.py); receivers run
        # them on each request before the hand-over, so the answer can say what was rejected.
        self.governance: Governance | None = None
        self._slots = trio.Semaphore(cfg.max_concurrent_requests)
        self._retry_after = [(b"retry-after", str(cfg.retry_after_s).encode())]

    def deadline(self) -> float:
        """The deadline of every wait of a request that arrives now."""
        return trio.current_time() + self.cfg.ingest_wait_s

    async def acquire_slot(self, deadline: float) -> None:
        """Take one of `max_concurrent_requests` slots; raises Rejected(429) at `deadline`.
        Tries without waiting first, so ingest_wait_s: 0 means "only if there is room"."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_at(deadline) as waited:
                await self._slots.acquire()
            if waited.cancelled_caught:
                raise self.backpressure("too many requests in progress") from None

    def release_slot(self) -> None:
        self._slots.release()

    def done_event(self) -> trio.Event | None:
        """The event a new item should carry (None when the answer is given at hand-over)."""
        return trio.Event() if self.ack_after_queue else None

    async def hand_over(self, item: Ingested, deadline: float) -> None:
        """Reserve the item's bytes and send it to the batcher, both within `deadline`.
        Raises Rejected(429) when there is no room in time, Rejected(503) once draining."""
        size = len(item.block)
        if not self.budget.try_acquire(size):
            with trio.move_on_at(deadline) as waited:
                await self.budget.acquire(size)
            if waited.cancelled_caught:
                raise self.backpressure("ingest buffer is full")
        handed_over = False
        try:
            try:
                self.tx.send_nowait(item)  # no wait at all when there is room
                handed_over = True
            except trio.WouldBlock:
                with trio.move_on_at(deadline):
                    await self.tx.send(item)
                    handed_over = True
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self.draining() from None
        finally:
            if not handed_over:  # the batcher never saw these bytes: give them back
                self.budget.release(size)
        if not handed_over:
            raise self.backpressure("ingest queue is full")

    async def emit(self, tx: trio.MemorySendChannel[Ingested], item: Ingested) -> None:
        """Send an item the pipeline made itself (emitted windows) through `tx`, waiting for
        budget and room as long as it takes: its inputs were acknowledged already."""
        await self.budget.acquire(len(item.block))
        try:
            await tx.send(item)
        except BaseException:
            self.budget.release(len(item.block))
            raise

    def backpressure(self, why: str) -> Rejected:
        return Rejected(429, "backpressure", f"{why}; retry later", self._retry_after)

    def draining(self) -> Rejected:
        return Rejected(503, "draining", "shutting down; retry later", self._retry_after)


class Receiver:
    """What every receiver of a pipeline shares: its intake, authentication, health, and the
    counting and logging of what it answers."""

    pipeline = ""
    logger = ""

    def __init__(
        self,
        cfg: IngestConfig,
        intake: Intake,
        *,
        metrics: Metrics,
        health: Health,
        log_interval_s: float = 10.0,
    ) -> None:
        self.cfg = cfg
        self.intake = intake
        self.health = health
        self.auth = Authenticator(cfg.auth)
        self._log = logs.RateLimited(logs.get(self.logger), log_interval_s)
        self.received = metrics.datapoints_received.labels(self.pipeline)  # before rules
        self._rejected_points = metrics.datapoints_rejected
        self._requests = metrics.requests
        self._rejected = metrics.rejected

    def check_request(self, scope: Scope, path: str) -> None:
        """Refuse a request for another path (404), another method (405) or without a known
        bearer token (401); the body is not read."""
        if scope["path"] != path:
            raise Rejected(404, "not_found", f"no such path {scope['path']!r}; use {path}")
        if scope["method"] != "POST":
            raise Rejected(405, "method_not_allowed", "use POST", headers=[(b"allow", b"POST")])
        self.auth.check(header(scope, b"authorization"))

    async def ingest_in_slot(
        self, ingest: Callable[[float], Awaitable[tuple[T, trio.Event | None]]]
    ) -> T:
        """Run `ingest(deadline)` (read, decode, hand over) holding a processing slot, all
        within one deadline; then, outside the slot, wait for the event it returns (disk and
        hybrid queues: the answer waits until the request's batch is queued; a hard stop
        cancels the wait, the client gets no answer and sends again). Refuses while draining."""
        if self.health.draining:
            raise self.intake.draining()
        deadline = self.intake.deadline()
        await self.intake.acquire_slot(deadline)
        try:
            result, done = await ingest(deadline)
        finally:
            # The slot bounds requests being read and decoded; once handed over, a request
            # holds no memory of its own, so waiting for its batch must not hold a slot.
            self.intake.release_slot()
        if done is not None:
            await done.wait()
        return result

    def count_refusal(self, r: Rejected, answer: str, client: str, **fields: object) -> None:
        """Count a refused request under `answer` (its HTTP status or gRPC code name) and its
        reason; log it (rate limited) unless it is backpressure or draining, which are normal
        under load and during a restart."""
        self._requests.labels(self.pipeline, answer).inc()
        self._rejected.labels(self.pipeline, r.reason).inc()
        if r.status != 429 and r.status != 503:
            self._log.warning(
                r.reason,
                "rejected request",
                reason=r.reason,
                **fields,
                detail=str(r),
                client=client,
            )


class Authenticator:
    """Checks `Authorization: Bearer <token>` against the configured tokens (constant time)."""

    def __init__(self, cfg: ReceiverAuthConfig) -> None:
        tokens = list(cfg.bearer_tokens)
        if cfg.bearer_tokens_file:
            lines = Path(cfg.bearer_tokens_file).read_text().splitlines()
            tokens += [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
        self._tokens = [t.encode() for t in tokens]
        self.enabled = cfg.enabled

    def check(self, authorization: str) -> None:
        """Raises Rejected(401) unless auth is off or `authorization` carries a known token."""
        if not self.enabled:
            return
        scheme, _, token = authorization.strip().partition(" ")
        given = token.strip().encode()
        ok = False
        if scheme.lower() == "bearer" and given:
            for known in self._tokens:  # no early exit: the time taken says nothing
                ok |= hmac.compare_digest(known, given)
        if not ok:
            raise Rejected(
                401,
                "unauthenticated",
                "missing or unknown bearer token",
                [(b"www-authenticate", b'Bearer realm="governor"')],
            )


def tenant_of(scope: Scope, name: str) -> str:
    """The tenant a request names in header `name` ("" without one, or when `name` is "")."""
    return header(scope, name.lower().encode()).strip() if name else ""
