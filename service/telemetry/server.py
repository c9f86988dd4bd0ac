"""The telemetry endpoint: /metrics (Prometheus text format), /live and /ready (JSON), and
/api/v1/cardinality (JSON: the stats' top metrics, label values and groups)."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.receivers.http import Receive, Scope, Send, lifespan, respond
from service.telemetry.health import Health
from service.telemetry.metrics import Metrics

_JSON = b"application/json"
CARDINALITY = "/api/v1/cardinality"


class TelemetryApp:
    """ASGI app serving governor's own metrics and health."""

    def __init__(
        self,
        metrics: Metrics,
        health: Health,
        cardinality: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        """`cardinality(top)`: the /api/v1/cardinality answer (None: stats are off)."""
        self.metrics = metrics
        self.health = health
        self.cardinality = cardinality

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path not in ("/metrics", "/live", "/ready", "/", CARDINALITY):
            await respond(
                send,
                404,
                b"not found; try /metrics, /live, /ready or " + CARDINALITY.encode() + b"\n",
            )
            return
        if method not in ("GET", "HEAD"):
            await respond(send, 405, b"use GET\n", headers=[(b"allow", b"GET, HEAD")])
            return
        if path == "/metrics":
            await respond(send, 200, self.metrics.render(), CONTENT_TYPE_LATEST.encode())
        elif path == CARDINALITY:
            await self._cardinality(scope, send)
        elif path == "/live":
            await respond(send, 200, json.dumps({"status": "live"}).encode(), _JSON)
        elif path == "/ready":
            problems = self.health.problems() if self.health.ready else []
            status = 200 if self.health.ready and not problems else 503
            answer: dict[str, object] = {"status": "degraded" if problems else self.health.state}
            if problems:
                answer["problems"] = problems
            await respond(send, status, json.dumps(answer).encode(), _JSON)
        else:
            await respond(send, 200, b"governor: /metrics /live /ready /api/v1/cardinality\n")

    async def _cardinality(self, scope: Scope, send: Send) -> None:
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        raw = query.get("top", ["20"])[-1]
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 10_000:
            answer = {
                "status": "error",
                "error": f"top must be an integer from 1 to 10000, got {raw!r}",
            }
            await respond(send, 400, json.dumps(answer).encode(), _JSON)
            return
        if self.cardinality is None:
            answer = {"status": "error", "error": "stats are off: set stats.level to basic or full"}
            await respond(send, 404, json.dumps(answer).encode(), _JSON)
            return
        await respond(send, 200, json.dumps(self.cardinality(int(raw))).encode(), _JSON)
