"""The data-path HTTP/1.1 server (service/receivers/server.py) over real sockets.

Every test serves a small recording ASGI app on 127.0.0.1:0 and talks to it with httpx for
ordinary traffic, or with hand-made HTTP/1.1 bytes on a raw trio socket for framing, timeouts and
shutdown. Time is real (sockets): every wait is bounded by trio.fail_after, and timeouts are
checked against a window whose lower bound is the configured value.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import pytest
import trio

from service.receivers.http import Receive, Scope, Send, respond
from service.receivers.server import ServerConfig, serve_asgi

DEADLINE_S = 5.0  # bound on every wait; each of these steps takes milliseconds
SHORT_S = 0.3  # the timeouts under test
LONG_S = 30.0  # a timeout that must not be the one that fires
# How late a timeout may fire on a loaded machine before we call it wrong; far below LONG_S.
SLACK_S = 1.5
TEXT = b"text/plain; charset=utf-8"


# ---- a raw client -----------------------------------------------------------------------------


@attrs.frozen
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def request(method: str, target: str, body: bytes = b"", *headers: str) -> bytes:
    """An HTTP/1.1 request with a Content-Length body (unless one of `headers` frames it)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: governor.test", *headers]
    if body and not any(h.lower().startswith("transfer-encoding") for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Raw:
    """A client socket that writes hand-made bytes and parses what comes back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.local = tuple(stream.socket.getsockname()[:2])

    async def send(self, data: bytes) -> None:
        with trio.fail_after(DEADLINE_S):
            await self.stream.send_all(data)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some()
        self.buf += data
        return bool(data)

    async def read_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The next status line and headers (names lower-cased)."""
        with trio.fail_after(DEADLINE_S):
            while b"\r\n\r\n" not in self.buf:
                if not await self._fill():
                    raise AssertionError(f"closed in the middle of a head: {bytes(self.buf)!r}")
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        status_line, *lines = head.split(b"\r\n")
        version, status, _reason = status_line.split(b" ", 2)
        assert version == b"HTTP/1.1", status_line
        headers = []
        for line in lines:
            name, _, value = line.partition(b":")
            headers.append((name.lower(), value.strip()))
        return int(status), headers

    async def read_response(self) -> Response:
        """The next final response; its body is framed by content-length."""
        status, headers = await self.read_head()
        length = int(dict(headers)[b"content-length"])
        with trio.fail_after(DEADLINE_S):
            while len(self.buf) < length:
                if not await self._fill():
                    raise AssertionError(f"closed in the middle of a body: {bytes(self.buf)!r}")
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return Response(status, headers, body)

    async def read_to_eof(self) -> bytes:
        """Wait until the server closes the connection; returns what was not read yet."""
        with trio.fail_after(DEADLINE_S):
            while await self._fill():
                pass
        rest = bytes(self.buf)
        self.buf.clear()
        return rest

    async def aclose(self) -> None:
        await self.stream.aclose()


# ---- the app ----------------------------------------------------------------------------------


@attrs.define(eq=False)
class Seen:
    """One request as the app saw it."""

    scope: dict[str, Any]
    messages: list[dict[str, Any]] = attrs.field(factory=list)
    cancelled: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages)

    @property
    def finished(self) -> bool:
        """The app has seen the whole body or the client going away."""
        return bool(self.messages) and (
            self.messages[-1]["type"] == "http.disconnect"
            or not self.messages[-1].get("more_body", False)
        )


class RecordingApp:
    """Records every request; what it answers depends on the path.

    /echo    reads the whole body and answers 201 with it (and its length in x-body-bytes); if
             the client goes away mid-body it returns without answering.
    /hold    waits for `gate`, then behaves like /echo.
    /reject  answers 413 without reading the body.
    /boom    raises.
    """

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.gate = trio.Event()
        self._changed = trio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = Seen(dict(scope))
        self.requests.append(seen)
        self._notify()
        path = scope["path"]
        if path == "/boom":
            raise RuntimeError("the app failed")
        if path == "/reject":
            await respond(send, 413, b"too large\n")
            return
        if path == "/hold":
            try:
                await self.gate.wait()
            except trio.Cancelled:
                seen.cancelled = True
                self._notify()
                raise
        while not seen.finished:
            seen.messages.append(dict(await receive()))
            self._notify()
        if seen.messages[-1]["type"] == "http.disconnect":
            return
        body = seen.body
        await respond(send, 201, body, headers=[(b"x-body-bytes", str(len(body)).encode())])

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds; fails after DEADLINE_S."""
        with trio.fail_after(DEADLINE_S):
            while not predicate():
                await self._changed.wait()


def echoed(body: bytes, *, close: bool = False) -> Response:
    """The response /echo gives for `body`."""
    headers = [(b"content-length", str(len(body)).encode())]
    if body:
        headers.append((b"content-type", TEXT))
    headers.append((b"x-body-bytes", str(len(body)).encode()))
    if close:
        headers.append((b"connection", b"close"))
    return Response(201, headers, body)


# ---- the server -------------------------------------------------------------------------------


@attrs.define(eq=False)
class Running:
    addr: tuple[str, int]
    stop: trio.Event
    stopped: trio.Event = attrs.field(factory=trio.Event)
    stopped_at: float | None = None
    clients: list[Raw] = attrs.field(factory=list)

    async def connect(self) -> Raw:
        """A raw client connected to the server; closed when the server's block ends."""
        with trio.fail_after(DEADLINE_S):
            raw = Raw(await trio.open_tcp_stream(*self.addr))
        self.clients.append(raw)
        return raw

    async def wait_stopped(self) -> float:
        """Wait for serve_asgi to return; the time it returned."""
        with trio.fail_after(DEADLINE_S):
            await self.stopped.wait()
        assert self.stopped_at is not None
        return self.stopped_at

    @property
    def url(self) -> str:
        return f"http://{self.addr[0]}:{self.addr[1]}"


@asynccontextmanager
async def running(app: RecordingApp, **cfg: Any) -> AsyncIterator[Running]:
    """serve_asgi(app) on 127.0.0.1:0 until the block ends (or `stop` is set earlier)."""
    stop = trio.Event()
    config = ServerConfig("127.0.0.1:0", **{"graceful_timeout_s": DEADLINE_S, **cfg})
    try:
        async with trio.open_nursery() as nursery:
            server: Running | None = None

            async def serve(*, task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
                await serve_asgi(app, config, stop.wait, task_status=task_status)
                assert server is not None
                server.stopped_at = trio.current_time()
                server.stopped.set()

            [addr] = await nursery.start(serve)
            server = Running(addr, stop)
            try:
                yield server
            finally:
                for raw in server.clients:
                    await raw.aclose()
            stop.set()
    except BaseExceptionGroup as group:
        # A failed assertion in the test's block is easier to read without the nursery's group.
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from None
        raise


async def timed_eof(raw: Raw) -> tuple[bytes, float]:
    """read_to_eof, and how long it took."""
    start = trio.current_time()
    rest = await raw.read_to_eof()
    return rest, trio.current_time() - start


async def echo_works(server: Running) -> None:
    """A fresh client gets an ordinary request answered."""
    async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
        resp = await client.post(f"{server.url}/echo", content=b"still here")
    assert (resp.status_code, resp.content) == (201, b"still here")


# ---- requests and responses -------------------------------------------------------------------


async def test_post_is_answered_with_what_the_app_sends() -> None:
    """httpx POSTs a body; it gets back exactly the status, headers and body the app sent, and
    the app saw the method, path, query string, headers and whole body."""
    app = RecordingApp()
    async with running(app) as server, httpx.AsyncClient(timeout=DEADLINE_S) as client:
        resp = await client.post(
            f"{server.url}/echo?x=1&y=two", content=b"hello world", headers={"X-Custom": "Abc"}
        )
    assert resp.status_code == 201
    assert resp.headers.raw == echoed(b"hello world").headers
    assert resp.content == b"hello world"
    [seen] = app.requests
    assert (seen.scope["method"], seen.scope["path"], seen.scope["query_string"]) == (
        "POST",
        "/echo",
        b"x=1&y=two",
    )
    assert (b"x-custom", b"Abc") in seen.scope["headers"]
    assert seen.body == b"hello world"


async def test_scope_describes_the_request_and_both_ends() -> None:
    """The scope is an ASGI 3 http scope: method, path and query split from the target, header
    names lower-cased with values and order kept, client and server as (host, port)."""
    app = RecordingApp()
    async with running(app) as server:
        raw = await server.connect()
        await raw.send(request("POST", "/echo?a=1&b=two", b"hello", "X-Custom-Header: Mixed-Case"))
        assert await raw.read_response() == echoed(b"hello")
    [seen] = app.requests
    assert seen.scope == {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/echo",
        "raw_path": b"/echo",
        "query_string": b"a=1&b=two",
        "root_path": "",
        "headers": [
            (b"host", b"governor.test"),
            (b"x-custom-header", b"Mixed-Case"),
            (b"content-length", b"5"),
        ],
        "client": raw.local,
        "server": server.addr,
    }


async def test_keep_alive_serves_one_connection_until_max_requests() -> None:
    """Requests on one connection are answered on it; the keep_alive_max_requests-th response
    says connection: close and the server then closes the connection."""
    app = RecordingApp()
    async with running(app, keep_alive_max_requests=3) as server:
        raw = await server.connect()
        for i in range(1, 4):
            body = f"request {i}".encode()
            await raw.send(request("POST", "/echo", body))
            assert await raw.read_response() == echoed(body, close=i == 3)
        assert await raw.read_to_eof() == b""
    assert [seen.scope["client"] for seen in app.requests] == [raw.local] * 3


async def test_pipelined_requests_are_answered_in_order() -> None:
    """Two requests written at once are both answered, in the order they were sent, and the
    connection stays open."""
    app = RecordingApp()
    async with running(app) as server:
        raw = await server.connect()
        await raw.send(request("POST", "/echo", b"first") + request("POST", "/echo", b"second"))
        assert await raw.read_response() == echoed(b"first")
        assert await raw.read_response() == echoed(b"second")
        await raw.send(request("POST", "/echo", b"third"))
        assert await raw.read_response() == echoed(b"third")
    assert [seen.body for seen in app.requests] == [b"first", b"second", b"third"]


async def test_chunked_body_arrives_whole() -> None:
    """A Transfer-Encoding: chunked body reaches the app chunk by chunk as it arrives and whole
    in the end (more_body until the last chunk); no content-length is invented."""
    app = RecordingApp()
    async with running(app) as server:
        raw = await server.connect()
        await raw.send(
            request("POST", "/echo", b"5\r\nhello\r\n", "Transfer-Encoding: chunked"),
        )
        await app.wait_for(lambda: len(app.requests) == 1 and len(app.requests[0].messages) == 1)
        await raw.send(b"1\r\n \r\n5\r\nworld\r\n0\r\n\r\n")
        assert await raw.read_response() == echoed(b"hello world")
    [seen] = app.requests
    assert seen.messages[0] == {"type": "http.request", "body": b"hello", "more_body": True}
    assert seen.messages[-1]["more_body"] is False
    assert seen.body == b"hello world"
    assert (b"transfer-encoding", b"chunked") in seen.scope["headers"]
    assert b"content-length" not in dict(seen.scope["headers"])


async def test_expect_100_continue_is_answered_when_the_app_reads_the_body() -> None:
    """With Expect: 100-continue the client gets 100 once the app asks for the body, before it
    has sent any; after the body it gets the app's final response."""
    app = RecordingApp()
    async with running(app) as server:
        raw = await server.connect()
        head = request("POST", "/echo", b"hello", "Expect: 100-continue")
        await raw.send(head.removesuffix(b"hello"))
        assert await raw.read_head() == (100, [])
        [seen] = app.requests
        assert seen.messages == []  # the app is waiting in receive()
        await raw.send(b"hello")
        assert await raw.read_response() == echoed(b"hello")
        assert seen.body == b"hello"


# ---- an app that does not read the body -------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param((), id="head-only"),
        pytest.param(("Expect: 100-continue",), id="expect-100"),
    ],
)
async def test_answer_without_reading_the_body_closes(extra: tuple[str, ...]) -> None:
    """An app that answers 413 without reading a promised body gets its answer through with
    connection: close (and no 100 Continue), then the server closes the connection."""
    app = RecordingApp()
    async with running(app) as server:
        raw = await server.connect()
        await raw.send(request("POST", "/reject", b"", "Content-Length: 10000000", *extra))
        assert await raw.read_response() == Response(
            413,
            [
                (b"content-length", b"10"),
                (b"content-type", TEXT),
                (b"connection", b"close"),
            ],
            b"too large\n",
        )
        assert await raw.read_to_eof() == b""
        await echo_works(server)
    assert app.requests[0].messages == []


async def test_answer_without_reading_a_body_in_flight_reaches_httpx() -> None:
    """httpx sending a large body to an app that answers 413 without reading it gets the 413
    (with connection: close), not a connection error."""
    app = RecordingApp()
    async with running(app) as server, httpx.AsyncClient(timeout=DEADLINE_S) as client:
        resp = await client.post(f"{server.url}/reject", content=b"x" * 4_000_000)
    assert (resp.status_code, resp.content) == (413, b"too large\n")
    assert resp.headers["connection"] == "close"


# ---- bad requests -----------------------------------------------------------------------------


async def test_malformed_request_gets_400_and_close() -> None:
    """Bytes that are not HTTP get a 400 saying why, with connection: close, and the connection
    is closed; the app never sees them and other clients are still served."""
    app = RecordingApp()
    async with running(app) as server:
        raw = await server.connect()
        await raw.send(b"GARBAGE\r\n\r\n")
        resp = await raw.read_response()
        assert resp.status == 400
        assert resp.body.startswith(b"bad request: ")
        assert resp.headers == [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(resp.body)).encode()),
            (b"connection", b"close"),
        ]
        assert await raw.read_to_eof() == b""
        assert app.requests == []
        await echo_works(server)


@pytest.mark.parametrize("complete", [True, False], ids=["whole-head", "head-prefix"])
async def test_header_block_over_max_header_bytes_gets_431(complete: bool) -> None:
    """A request head larger than max_header_bytes gets 431 with connection: close and the
    connection is closed, whether the whole head arrives at once or only a prefix of it has
    arrived; the app never sees it and other clients are still served."""
    app = RecordingApp()
    async with running(app, max_header_bytes=1024) as server:
        raw = await server.connect()
        head = request("GET", "/echo", b"", "X-Big: " + "a" * 4000)
        await raw.send(head if complete else head[:2000])
        resp = await raw.read_response()
        assert resp.status == 431
        assert resp.body.startswith(b"bad request: ")
        assert resp.headers == [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(resp.body)).encode()),
            (b"connection", b"close"),
        ]
        assert await raw.read_to_eof() == b""
        assert app.requests == []
        await echo_works(server)


async def test_app_exception_gets_500_and_close(caplog: pytest.LogCaptureFixture) -> None:
    """An app that raises: the client gets 500 with connection: close, the connection is
    closed, the exception is logged, and the server keeps serving."""
    app = RecordingApp()
    async with running(app) as server:
        raw = await server.connect()
        with caplog.at_level(logging.ERROR):
            await raw.send(request("GET", "/boom"))
            assert await raw.read_response() == Response(
                500,
                [(b"content-length", b"15"), (b"connection", b"close")],
                b"internal error\n",
            )
            assert await raw.read_to_eof() == b""
        await echo_works(server)
    failures = [r for r in caplog.records if r.getMessage() == "request handler failed"]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert repr(failures[0].exc_info[1]) == "RuntimeError('the app failed')"


# ---- timeouts ---------------------------------------------------------------------------------


async def test_silent_connection_is_closed_after_read_timeout() -> None:
    """A client that connects and sends nothing is disconnected after read_timeout_s (not the
    keep-alive timeout: it has not had a request yet), without a response."""
    app = RecordingApp()
    async with running(app, read_timeout_s=SHORT_S, keep_alive_timeout_s=LONG_S) as server:
        raw = await server.connect()
        rest, waited = await timed_eof(raw)
        assert rest == b""
        assert SHORT_S <= waited < SLACK_S
    assert app.requests == []


async def test_stalled_body_is_a_disconnect_after_read_timeout() -> None:
    """A client that sends a head promising 100 bytes, 10 of them, then nothing: after
    read_timeout_s the app's receive() returns http.disconnect; the app answers nothing and the
    server closes the connection."""
    app = RecordingApp()
    async with running(app, read_timeout_s=SHORT_S, keep_alive_timeout_s=LONG_S) as server:
        raw = await server.connect()
        await raw.send(request("POST", "/echo", b"", "Content-Length: 100") + b"0123456789")
        rest, waited = await timed_eof(raw)
        assert rest == b""
        assert SHORT_S <= waited < SLACK_S
        await app.wait_for(lambda: app.requests[0].finished)
    [seen] = app.requests
    assert seen.body == b"0123456789"
    assert all(m["more_body"] for m in seen.messages[:-1])
    assert seen.messages[-1] == {"type": "http.disconnect"}


async def test_idle_keep_alive_connection_is_closed_after_keep_alive_timeout() -> None:
    """After a response, a connection with no next request is closed after
    keep_alive_timeout_s (not read_timeout_s)."""
    app = RecordingApp()
    async with running(app, read_timeout_s=LONG_S, keep_alive_timeout_s=SHORT_S) as server:
        raw = await server.connect()
        await raw.send(request("POST", "/echo", b"once"))
        assert await raw.read_response() == echoed(b"once")
        rest, waited = await timed_eof(raw)
        assert rest == b""
        # The server starts its timer just after sending; we start ours just after reading.
        assert SHORT_S - 0.05 <= waited < SLACK_S


async def test_client_gone_mid_body_is_a_disconnect() -> None:
    """A client that closes its socket in the middle of a body: the app's receive() returns
    the bytes that came, then http.disconnect; the server carries on serving."""
    app = RecordingApp()
    async with running(app) as server:
        raw = await server.connect()
        await raw.send(request("POST", "/echo", b"", "Content-Length: 100") + b"0123456789")
        await app.wait_for(lambda: len(app.requests) == 1 and app.requests[0].body != b"")
        await raw.aclose()
        await app.wait_for(lambda: app.requests[0].finished)
        await echo_works(server)
    seen = app.requests[0]
    assert seen.body == b"0123456789"
    assert seen.messages[-1] == {"type": "http.disconnect"}


# ---- shutdown ---------------------------------------------------------------------------------


async def test_shutdown_finishes_requests_in_progress_and_closes_idle_connections() -> None:
    """On shutdown the server stops accepting and closes an idle keep-alive connection at once;
    a request in progress still gets its response, with connection: close, then the connection
    is closed and serve_asgi returns."""
    app = RecordingApp()
    async with running(app) as server:
        busy = await server.connect()
        await busy.send(request("POST", "/hold", b"in progress"))
        idle = await server.connect()
        await idle.send(request("POST", "/echo", b"done"))
        assert await idle.read_response() == echoed(b"done")
        await app.wait_for(lambda: any(s.scope["path"] == "/hold" for s in app.requests))

        server.stop.set()
        rest, waited = await timed_eof(idle)
        assert rest == b""
        assert waited < SLACK_S  # well before graceful_timeout_s
        with pytest.raises(OSError):
            await trio.open_tcp_stream(*server.addr)
        assert not server.stopped.is_set()

        app.gate.set()
        assert await busy.read_response() == echoed(b"in progress", close=True)
        assert await busy.read_to_eof() == b""
        await server.wait_stopped()


async def test_shutdown_gives_up_on_a_request_after_graceful_timeout() -> None:
    """A request that does not finish within graceful_timeout_s is cancelled: serve_asgi returns
    after about that long and the client's connection is closed without a response."""
    app = RecordingApp()
    async with running(app, graceful_timeout_s=SHORT_S) as server:
        busy = await server.connect()
        await busy.send(request("POST", "/hold", b"never answered"))
        await app.wait_for(lambda: len(app.requests) == 1)
        start = trio.current_time()
        server.stop.set()
        assert await busy.read_to_eof() == b""
        assert SHORT_S <= await server.wait_stopped() - start < SLACK_S
    assert app.requests[0].cancelled
