"""Test peers for the OTLP pipeline: recording OTLP backends (grpcio's server, and hypercorn for
OTLP/HTTP) that answer what a test scripts, and a governor running the OTLP pipeline in front of
one of them. Everything listens on 127.0.0.1 with ports the OS picks."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import grpc
import httpx
import trio

from service.app import Addresses, App
from service.codec import compression, otlp
from service.config import Config, config_from_dict
from service.receivers.http import (
    Receive,
    Scope,
    Send,
    hypercorn_config,
    lifespan,
    read_body,
    serve_http,
)

DEADLINE_S = 20.0
Request = otlp.ExportMetricsServiceRequest


@attrs.frozen
class GRPCAnswer:
    """What the gRPC backend answers to one call: a status code (OK: the response bytes)."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    trailing: tuple[tuple[str, bytes | str], ...] = ()
    response: bytes = b""


@attrs.frozen
class HTTPAnswer:
    """What the HTTP backend answers to one POST."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@attrs.define
class Received:
    """One request a backend got: the serialized ExportMetricsServiceRequest and its metadata
    (gRPC metadata or HTTP headers, lower-case keys)."""

    data: bytes
    metadata: dict[str, str]

    @property
    def request(self) -> Request:
        return otlp.decode(self.data)


class _Script:
    """Answers in order; when the script runs out, the default answer (success)."""

    def __init__(self, default: Any) -> None:
        self._lock = threading.Lock()
        self._answers: list[Any] = []
        self._default = default
        self.received: list[Received] = []  # successfully answered requests only
        self.attempts = 0

    def script(self, *answers: Any) -> None:
        with self._lock:
            self._answers.extend(answers)

    def next(self) -> Any:
        with self._lock:
            self.attempts += 1
            return self._answers.pop(0) if self._answers else self._default

    def record(self, data: bytes, metadata: dict[str, str]) -> None:
        with self._lock:
            self.received.append(Received(data, metadata))

    def requests(self) -> list[Request]:
        with self._lock:
            return [r.request for r in self.received]

    def datapoints(self) -> int:
        return sum(otlp.count(r)[0] for r in self.requests())


class GRPCBackend(_Script):
    """A MetricsService/Export server on grpcio; `endpoint` is its host:port."""

    protocol = "grpc"

    def __init__(self, *, options: list[tuple[str, Any]] | None = None) -> None:
        super().__init__(GRPCAnswer())
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(8),
            handlers=[
                grpc.method_handlers_generic_handler(
                    otlp.SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self._export)}
                )
            ],
            options=options or [],
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{port}"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None)

    def _export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        answer: GRPCAnswer = self.next()
        if answer.code is not grpc.StatusCode.OK:
            if answer.trailing:
                context.set_trailing_metadata(answer.trailing)
            context.abort(answer.code, answer.details)
        self.record(request, {k: v for k, v in context.invocation_metadata()})
        return answer.response


class HTTPBackend(_Script):
    """An OTLP/HTTP server (hypercorn) that decompresses and records what is POSTed to any
    path; serve it with `serve_http` and set `endpoint` to its URL."""

    protocol = "http"

    def __init__(self) -> None:
        super().__init__(HTTPAnswer())
        self.endpoint = ""
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(scope, receive, 1 << 30)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        answer: HTTPAnswer = self.next()
        if 200 <= answer.status < 300:
            data = compression.decompress(body, headers.get("content-encoding", ""), 1 << 30)
            self.paths.append(scope["path"])
            self.record(data, headers)
        raw_headers = [(k.encode(), v.encode()) for k, v in answer.headers]
        raw_headers.append((b"content-length", str(len(answer.body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": answer.body})


def otlp_config(
    endpoint: str,
    protocol: str,
    *,
    receiver: dict[str, Any] | None = None,
    batch: dict[str, Any] | None = None,
    queue: dict[str, Any] | None = None,
    exporter: dict[str, Any] | None = None,
    shutdown_grace_s: float = 5.0,
) -> Config:
    """A governor config with only the OTLP pipeline, both receivers on free 127.0.0.1 ports,
    one exporter named "backend" with fast retries."""
    receiver = dict(receiver or {})
    return config_from_dict(
        {
            "telemetry": {"listen": "127.0.0.1:0"},
            "shutdown_grace_s": shutdown_grace_s,
            "otlp": {
                "receiver": {
                    **receiver,
                    "grpc": {"listen": "127.0.0.1:0", **receiver.get("grpc", {})},
                    "http": {"listen": "127.0.0.1:0", **receiver.get("http", {})},
                },
                # A short interval so a lone request reaches the backend without waiting a second.
                "batch": {"interval_s": 0.01, **(batch or {})},
                "queue": queue or {},
                "exporters": [
                    {
                        "endpoint": endpoint,
                        "protocol": protocol,
                        "name": "backend",
                        "retry": {"initial_delay_s": 0.01, "max_delay_s": 0.1},
                        **(exporter or {}),
                    }
                ],
            },
        }
    )


@attrs.define
class RunningOTLP:
    app: App
    addrs: Addresses
    backend: GRPCBackend | HTTPBackend
    client: httpx.AsyncClient
    shutting_down: bool = False

    def shutdown(self) -> None:
        """Begin the soft shutdown (once: a second App.shutdown() would be the hard stop)."""
        if not self.shutting_down:
            self.shutting_down = True
            self.app.shutdown()

    @property
    def grpc_target(self) -> str:
        """host:port of governor's OTLP/gRPC receiver."""
        assert self.addrs.otlp_grpc is not None
        host, port = self.addrs.otlp_grpc
        return f"{host}:{port}"

    @property
    def http_url(self) -> str:
        """URL of governor's OTLP/HTTP receiver, /v1/metrics."""
        return self.url("/v1/metrics")

    def url(self, path: str) -> str:
        assert self.addrs.otlp_http is not None
        host, port = self.addrs.otlp_http
        return f"http://{host}:{port}{path}"

    def telemetry_url(self, path: str) -> str:
        host, port = self.addrs.telemetry
        return f"http://{host}:{port}{path}"

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one of the app's own metrics; 0 if it has no such sample yet."""
        value = self.app.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@asynccontextmanager
async def running_otlp_governor(
    backend: GRPCBackend | HTTPBackend | None = None,
    *,
    config: Callable[[str, str], Config] | None = None,
    **settings: Any,
) -> AsyncIterator[RunningOTLP]:
    """`backend` (a GRPCBackend by default) and a governor in front of it, configured by
    `otlp_config(endpoint, protocol, **settings)` or by `config(endpoint, protocol)`. On exit the
    governor shuts down cleanly, then the backend stops."""
    backend = backend or GRPCBackend()
    async with trio.open_nursery() as nursery:
        backend_stop = trio.Event()
        if isinstance(backend, HTTPBackend):
            [(host, port)] = await nursery.start(
                serve_http, backend, hypercorn_config("127.0.0.1:0"), backend_stop.wait
            )
            backend.endpoint = f"http://{host}:{port}/v1/metrics"
        else:
            backend.start()
        cfg = (config or (lambda e, p: otlp_config(e, p, **settings)))(
            backend.endpoint, backend.protocol
        )
        app = App(cfg)
        app_done = trio.Event()

        async def run_app(*, task_status: trio.TaskStatus[Addresses]) -> None:
            try:
                await app.run(task_status=task_status)
            finally:
                app_done.set()

        addrs = await nursery.start(run_app)
        try:
            async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
                running = RunningOTLP(app, addrs, backend, client)
                yield running
            running.shutdown()
            with trio.fail_after(DEADLINE_S):
                await app_done.wait()
        finally:
            backend_stop.set()
            if isinstance(backend, GRPCBackend):
                backend.stop()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    """Poll `predicate` (state owned by other threads has no event to wait on) until it holds."""
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the state has no event to wait on
            await trio.sleep(0.005)
