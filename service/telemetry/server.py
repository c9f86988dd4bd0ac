"""The telemetry endpoint: /metrics (Prometheus text format), /live and /ready (JSON)."""

from __future__ import annotations

import json

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.receivers.http import Receive, Scope, Send, lifespan, respond
from service.telemetry.health import Health
from service.telemetry.metrics import Metrics

_JSON = b"application/json"


class TelemetryApp:
    """ASGI app serving governor's own metrics and health."""

    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path not in ("/metrics", "/live", "/ready", "/"):
            await respond(send, 404, b"not found; try /metrics, /live or /ready\n")
            return
        if method not in ("GET", "HEAD"):
            await respond(send, 405, b"use GET\n", headers=[(b"allow", b"GET, HEAD")])
            return
        if path == "/metrics":
            await respond(send, 200, self.metrics.render(), CONTENT_TYPE_LATEST.encode())
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
            await respond(send, 200, b"governor: /metrics /live /ready\n")
