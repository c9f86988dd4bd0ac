"""ASGI plumbing shared by the HTTP receivers and the telemetry server, and the one table that
maps what went wrong with a request to an HTTP status and a metric reason.

Bodies are read with a hard limit; nothing here buffers more than the caller allows.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import grpc
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from service.codec import errors
from service.config import parse_listen

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Rejected(Exception):
    """A request we refuse; `reason` labels the metric, the message is the one-line answer."""

    def __init__(self, status: int, reason: str, message: str, headers: list | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers or []


# The one table: codec error -> HTTP status; and HTTP status -> gRPC code for the OTLP/gRPC
# receiver, which answers every Rejected with the code of its HTTP status.
HTTP_STATUS: dict[type[errors.CodecError], int] = {
    errors.BadCompression: 400,
    errors.BadProtobuf: 400,
    errors.BadJSON: 400,
    errors.TooLarge: 413,
    errors.DecompressedTooLarge: 413,
    errors.UnsupportedEncoding: 415,
}


GRPC_CODE: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def rejection(err: errors.CodecError) -> Rejected:
    """The answer for a codec error, from HTTP_STATUS."""
    return Rejected(HTTP_STATUS.get(type(err), 400), err.reason, str(err))


def header(scope: Scope, name: bytes) -> str:
    """The first value of request header `name` (lower-case bytes), or ''."""
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return ""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """Read the whole request body; raises Rejected(413) past `limit` bytes without reading on."""
    length = header(scope, b"content-length")
    if length:
        if not length.isdigit():
            raise Rejected(400, "bad_request", "content-length is not a number")
        if int(length) > limit:
            raise Rejected(413, "too_large", f"body of {length} bytes is over the limit of {limit}")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Rejected(400, "client_disconnected", "client went away mid-body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Rejected(413, "too_large", f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def respond(
    send: Send,
    status: int,
    body: bytes = b"",
    content_type: bytes | None = None,
    headers: list | None = None,
) -> None:
    """Send a complete response. A body without `content_type` is sent as plain text; an
    explicit `content_type` is sent even with an empty body (an empty protobuf message)."""
    hdrs = [(b"content-length", str(len(body)).encode())]
    if content_type is not None or body:
        hdrs.append((b"content-type", content_type or b"text/plain; charset=utf-8"))
    if headers:
        hdrs += headers
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer hypercorn's lifespan protocol; our stages start and stop in app.py instead."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def hypercorn_config(listen: str, *, keep_alive_max_requests: int = 1_000_000) -> HypercornConfig:
    """A hypercorn config bound to `listen`, logging through our structured logger."""
    host, port = parse_listen(listen)
    cfg = HypercornConfig()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.keep_alive_max_requests = keep_alive_max_requests
    cfg.graceful_timeout = 5.0
    cfg.include_server_header = False
    return cfg


async def serve_http(
    app: ASGIApp,
    cfg: HypercornConfig,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns; reports the (host, port) pairs really bound."""

    class _Status:
        def started(self, binds: list[str]) -> None:
            addrs = []
            for b in binds:
                hostport = b.split("://", 1)[1]
                host, _, port = hostport.rpartition(":")
                addrs.append((host.strip("[]"), int(port)))
            task_status.started(addrs)

    await serve(app, cfg, shutdown_trigger=shutdown_trigger, task_status=_Status())  # type: ignore[arg-type]
