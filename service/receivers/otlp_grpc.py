"""The OTLP/gRPC metrics receiver: MetricsService/Export on grpcio's server.

grpcio runs its own threads (it decompresses gzip and deflate, enforces the message size limit and
keepalive); each call is decoded in its thread and handed into the Trio pipeline with
`trio.from_thread.run`. Status codes: OK (with partial_success when part of the request was
rejected), INVALID_ARGUMENT for undecodable data, RESOURCE_EXHAUSTED with a RetryInfo on
backpressure, UNAUTHENTICATED, UNAVAILABLE while draining. It never blocks a call past
`ingest_wait_s` for room in the pipeline.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Awaitable, Callable

import grpc
import trio
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

from service.codec import otlp
from service.codec.errors import CodecError
from service.config import OTLPReceiverConfig, parse_listen
from service.receivers.http import GRPC_CODE, Rejected, rejection
from service.receivers.intake import Intake, Receiver
from service.receivers.otlp_http import count_rejected, hand_over
from service.telemetry.health import Health
from service.telemetry.metrics import Metrics

PIPELINE = "otlp"
_DETAILS_KEY = "grpc-status-details-bin"  # where google.rpc.Status travels (gRPC richer errors)


class OTLPGRPCReceiver(Receiver):
    """Serves MetricsService/Export; `serve()` runs the server until its trigger returns."""

    pipeline = PIPELINE
    logger = "receiver.otlp_grpc"

    def __init__(
        self,
        cfg: OTLPReceiverConfig,
        intake: Intake,
        *,
        metrics: Metrics,
        health: Health,
        log_interval_s: float = 10.0,
    ) -> None:
        super().__init__(cfg, intake, metrics=metrics, health=health, log_interval_s=log_interval_s)
        self.cfg: OTLPReceiverConfig = cfg
        self._ok = metrics.requests.labels(PIPELINE, "OK")
        self._token: trio.lowlevel.TrioToken | None = None
        self._retry_details = _retry_info(cfg.retry_after_s)

    async def serve(
        self,
        shutdown_trigger: Callable[[], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `shutdown_trigger` returns; then refuse new calls and let the ones in
        progress finish (they are handed over or answered UNAVAILABLE). Reports the address
        really bound."""
        self._token = trio.lowlevel.current_trio_token()
        g = self.cfg.grpc
        host, port = parse_listen(g.listen)
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(g.threads, thread_name_prefix="otlp-grpc"),
            handlers=[
                grpc.method_handlers_generic_handler(
                    otlp.SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self._export)}
                )
            ],
            options=_server_options(self.cfg),
            maximum_concurrent_rpcs=g.threads * 4,
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"OTLP/gRPC cannot listen on {g.listen}: {e}") from None
        server.start()
        try:
            task_status.started([(host, bound)])
            await shutdown_trigger()
        finally:
            # Refuses new calls at once; calls in progress get `grace` seconds to finish. Their
            # hand-over runs on this loop, so wait in a thread instead of blocking it.
            stopped = server.stop(grace=5.0)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(stopped.wait, abandon_on_cancel=True)

    def _export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """One call, in a grpcio thread: decode here, hand over on the Trio loop."""
        try:
            admitted = self._admit(request, context)
            if admitted.datapoints or admitted.metrics:
                gov = self.intake.governance
                tenant = ""
                if gov is not None and gov.tenant_header:
                    metadata = dict(context.invocation_metadata())
                    tenant = str(metadata.get(gov.tenant_header.lower(), "")).strip()
                # On the trio loop: stats, limits and rules (their state lives there), then
                # the hand-over.
                admitted = trio.from_thread.run(
                    self._hand_over, admitted, tenant, trio_token=self._token
                )
        except Rejected as r:
            self._refuse(r, context)  # raises
        except (trio.RunFinishedError, trio.Cancelled):
            self._refuse(self.intake.draining(), context)
        self._ok.inc()
        count_rejected(self, admitted)
        return otlp.response(admitted.rejected, admitted.message)

    def _admit(self, request: bytes, context: grpc.ServicerContext) -> otlp.Admitted:
        metadata = dict(context.invocation_metadata())
        self.auth.check(metadata.get("authorization", ""))
        if self.health.draining:
            raise self.intake.draining()
        try:
            return otlp.admit(request)
        except CodecError as e:
            raise rejection(e) from None

    async def _hand_over(self, admitted: otlp.Admitted, tenant: str) -> otlp.Admitted:
        governed, done = await hand_over(self, admitted, self.intake.deadline(), tenant)
        if done is not None:
            await done.wait()
        return governed

    def _refuse(self, r: Rejected, context: grpc.ServicerContext) -> None:
        code = GRPC_CODE.get(r.status, grpc.StatusCode.INTERNAL)
        self.count_refusal(r, code.name, context.peer(), code=code.name)
        if r.status == 429:
            # RetryInfo tells clients that understand it (the OTel SDKs and Collector) that
            # retrying helps, and when.
            status = Status(code=code.value[0], message=str(r), details=[self._retry_details])
            context.set_trailing_metadata(((_DETAILS_KEY, status.SerializeToString()),))
        context.abort(code, str(r))


def _retry_info(retry_after_s: int) -> AnyMessage:
    details = AnyMessage()
    details.Pack(RetryInfo(retry_delay=Duration(seconds=retry_after_s)))
    return details


def _server_options(cfg: OTLPReceiverConfig) -> list[tuple[str, int]]:
    g = cfg.grpc

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    options = [
        # grpcio's limit applies to the message after decompression, so it caps zip bombs too.
        ("grpc.max_receive_message_length", cfg.max_decompressed_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ("grpc.keepalive_time_ms", ms(g.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(g.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(g.min_ping_interval_s)),
        ("grpc.http2.max_pings_without_data", 0),
        # grpcio sets SO_REUSEPORT by default: a second governor would share the port silently.
        ("grpc.so_reuseport", 0),
    ]
    for key, seconds in (
        ("grpc.max_connection_idle_ms", g.max_connection_idle_s),
        ("grpc.max_connection_age_ms", g.max_connection_age_s),
        ("grpc.max_connection_age_grace_ms", g.max_connection_age_grace_s),
    ):
        if seconds:
            options.append((key, ms(seconds)))
    return options
