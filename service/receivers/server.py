"""A lean HTTP/1.1 server for the data path: h11 for the protocol, one trio task per connection,
the ASGI app called in that task (no task, channel or timer per request).

It exists because measured on the 2-core machine, hypercorn spent 0.64 ms of CPU per request on
a trivial app against 0.26 ms for this loop: more than half of a remote-write request's budget
(docs/architecture.md). It speaks the subset of ASGI our receivers use (http scope, receive,
send). It never buffers more than the app reads, never waits on a client without a timeout, and
on shutdown stops accepting, finishes the requests in progress and closes idle connections.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import h11
import trio

from service.config import parse_listen
from service.receivers.http import ASGIApp
from service.telemetry import logs

log = logs.get("http")
_MAX_RECV = 256 * 1024
_LINGER_S = 2.0
_LINGER_MAX_BYTES = 64 * 1024 * 1024


@attrs.frozen
class ServerConfig:
    listen: str
    keep_alive_max_requests: int = 1_000_000
    # An idle keep-alive connection is closed after this; Go's HTTP client (Prometheus, vmagent)
    # keeps idle connections for 90 s and reconnects transparently.
    keep_alive_timeout_s: float = 60.0
    # A request's head and body must arrive within this, or the connection is closed.
    read_timeout_s: float = 30.0
    # On shutdown, requests in progress get this long to finish.
    graceful_timeout_s: float = 5.0
    max_header_bytes: int = 64 * 1024


class _Closed(Exception):
    """The connection is finished (closed by the client, timed out, or unusable)."""


class _Connection:
    """One client connection: reads requests with h11 and runs the app for each."""

    def __init__(self, stream: trio.SocketStream, app: ASGIApp, cfg: ServerConfig, server: Any):
        self.stream = stream
        self.app = app
        self.cfg = cfg
        self.server = server
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.max_header_bytes)
        sock = stream.socket
        try:
            self.client = sock.getpeername()[:2]
            self.local = sock.getsockname()[:2]
        except OSError:
            self.client = self.local = None

    async def _next_event(self, timeout_s: float) -> Any:
        """The next h11 event, reading from the socket as needed, within `timeout_s`."""
        with trio.move_on_after(timeout_s) as scope:
            while True:
                event = self.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
                try:
                    data = await self.stream.receive_some(_MAX_RECV)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                self.h11.receive_data(data)
        assert scope.cancelled_caught
        raise _Closed("timed out")

    async def _send(self, *events: Any) -> None:
        data = b"".join(self.h11.send(e) for e in events)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Closed("client went away") from None

    async def run(self) -> None:
        try:
            served = 0
            while True:
                # The first head must arrive within read_timeout_s; between requests the
                # keep-alive timeout covers the whole next head. Shutdown closes a connection
                # waiting here at once (a half-received head is dropped with it).
                timeout = self.cfg.keep_alive_timeout_s if served else self.cfg.read_timeout_s
                try:
                    with self.server.idle(self):
                        event = await self._next_event(timeout)
                except h11.RemoteProtocolError as e:
                    await self._protocol_error(e)
                    return
                if isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request), event
                if _head_bytes(event) > self.cfg.max_header_bytes:
                    # h11 bounds only a head still arriving; one that came whole is checked here.
                    too_large = h11.RemoteProtocolError("request head too large", 431)
                    await self._protocol_error(too_large)
                    return
                served += 1
                last = served >= self.cfg.keep_alive_max_requests or self.server.closing
                await self._handle(event, close=last)
                if self.h11.our_state is h11.MUST_CLOSE or last:
                    return
                if self.h11.their_state is not h11.DONE:
                    return  # the app did not read the whole body: we said connection: close
                self.h11.start_next_cycle()
        except _Closed:
            pass
        finally:
            try:
                if self.h11.their_state is h11.SEND_BODY and self.h11.our_state is h11.MUST_CLOSE:
                    await self._linger()  # not shielded: a hard stop cuts it short
            finally:
                with trio.CancelScope(shield=True):
                    await self.stream.aclose()

    async def _linger(self) -> None:
        """We answered before reading the whole body (413, say). Closing with unread data makes
        the kernel reset the connection, and a client still sending may then never read our
        answer. So: end our side, then read and discard for a short while (nginx's lingering
        close)."""
        try:
            await self.stream.send_eof()
            with trio.move_on_after(_LINGER_S):
                discarded = 0
                while discarded < _LINGER_MAX_BYTES:
                    data = await self.stream.receive_some(_MAX_RECV)
                    if not data:
                        break
                    discarded += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _protocol_error(self, e: h11.RemoteProtocolError) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = e.error_status_hint
        body = f"bad request: {e}\n".encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        headers.append((b"connection", b"close"))
        try:
            await self._send(h11.Response(status_code=status, headers=headers), h11.Data(body))
            await self._send(h11.EndOfMessage())
        except (_Closed, h11.LocalProtocolError):
            pass

    async def _handle(self, request: h11.Request, *, close: bool) -> None:
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": "",
            "headers": list(request.headers),  # h11 gives names lower-cased
            "client": self.client,
            "server": self.local,
        }
        deadline = trio.current_time() + self.cfg.read_timeout_s
        body_done = False
        response: dict[str, Any] = {}

        async def receive() -> dict[str, Any]:
            nonlocal body_done
            if body_done:
                # Per ASGI, a further receive waits for the client to go away; our apps never
                # do that, so answer at once rather than park the connection task.
                return {"type": "http.disconnect"}
            if self.h11.they_are_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            try:
                event = await self._next_event(max(0.0, deadline - trio.current_time()))
            except (_Closed, h11.RemoteProtocolError):
                body_done = True
                return {"type": "http.disconnect"}
            if isinstance(event, h11.Data):
                data = event.data
                if type(data) is not bytes:
                    data = bytes(data)
                return {"type": "http.request", "body": data, "more_body": True}
            body_done = True
            if isinstance(event, h11.EndOfMessage):
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["headers"] = list(message.get("headers", []))
                return
            if message["type"] != "http.response.body":
                return
            response.setdefault("body", []).append(message.get("body", b""))
            if message.get("more_body", False):
                return
            headers = response["headers"]
            # A body the app left unread cannot be skipped safely: close after answering. A
            # shutdown that began while the app ran also closes (the next read would refuse).
            if close or self.server.closing or self.h11.their_state is not h11.DONE:
                headers = [*headers, (b"connection", b"close")]
            # A HEAD answer carries the headers of the would-be body, never the body.
            body = b"" if scope["method"] == "HEAD" else b"".join(response["body"])
            await self._send(
                h11.Response(status_code=response["status"], headers=headers),
                h11.Data(body),
                h11.EndOfMessage(),
            )
            response["sent"] = True

        try:
            await self.app(scope, receive, send)
        except _Closed:
            raise
        except Exception:
            log.exception("request handler failed", extra={"fields": {"path": path}})
            if "sent" not in response and self.h11.our_state is h11.SEND_RESPONSE:
                body = b"internal error\n"
                hdrs = [(b"content-length", b"15"), (b"connection", b"close")]
                await self._send(
                    h11.Response(status_code=500, headers=hdrs), h11.Data(body), h11.EndOfMessage()
                )
            raise _Closed("handler failed") from None
        if "sent" not in response:
            raise _Closed("handler sent no response")


def _head_bytes(request: h11.Request) -> int:
    """The fewest bytes the request line and headers of `request` can have taken on the wire."""
    size = len(request.method) + len(request.target) + 14  # "M T HTTP/1.1\r\n" ... "\r\n"
    for name, value in request.headers:
        size += len(name) + len(value) + 3  # "name:value\r\n"
    return size


class _Server:
    """Tracks connections so that shutdown can close the idle ones at once."""

    def __init__(self) -> None:
        self.closing = False
        self._idle: dict[_Connection, trio.CancelScope] = {}

    def idle(self, conn: _Connection) -> _IdleScope:
        return _IdleScope(self, conn)

    def close_idle(self) -> None:
        self.closing = True
        for scope in self._idle.values():
            scope.cancel()


class _IdleScope:
    def __init__(self, server: _Server, conn: _Connection) -> None:
        self.server = server
        self.conn = conn
        self.scope = trio.CancelScope()

    def __enter__(self) -> None:
        if self.server.closing:
            raise _Closed("shutting down")
        self.server._idle[self.conn] = self.scope
        self.scope.__enter__()

    def __exit__(self, *exc: object) -> bool:
        del self.server._idle[self.conn]
        swallowed = self.scope.__exit__(*exc)
        if self.scope.cancelled_caught:
            raise _Closed("shutting down")
        return bool(swallowed)


async def serve_asgi(
    app: ASGIApp,
    cfg: ServerConfig,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `cfg.listen` until `shutdown_trigger` returns, then stop accepting, let
    requests in progress finish (at most `graceful_timeout_s`) and return. Reports the
    (host, port) pairs really bound."""
    host, port = parse_listen(cfg.listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    addrs = [tuple(lst.socket.getsockname()[:2]) for lst in listeners]
    server = _Server()

    async def handle(stream: trio.SocketStream) -> None:
        await _Connection(stream, app, cfg, server).run()

    async with trio.open_nursery() as connections:
        with trio.CancelScope() as accepting:
            async with trio.open_nursery() as acceptors:
                acceptors.start_soon(
                    partial(trio.serve_listeners, handle, listeners, handler_nursery=connections)
                )
                task_status.started(addrs)
                await shutdown_trigger()
                accepting.cancel()
        for lst in listeners:
            await lst.aclose()
        server.close_idle()
        connections.cancel_scope.deadline = trio.current_time() + cfg.graceful_timeout_s
        logs.log(log, logging.DEBUG, "stopped accepting", listen=cfg.listen)
