"""Builds the stage graph from the config and owns it: start order, signals, two-phase shutdown.

Nesting is start/stop order: telemetry outermost, then exporters with their queues, then the
batcher, then receivers innermost; downstream starts first and upstream stops first. Shutdown
phase one stops the receivers and lets everything drain; phase two, `shutdown_grace_s` later,
cancels what is left and counts it as dropped.
"""

from __future__ import annotations

import logging
import signal

import attrs
import trio

from service.config import Config, exporter_name
from service.export.prw import PRWExporter
from service.pipeline.batcher import Batcher
from service.pipeline.budget import ByteBudget
from service.pipeline.items import Ingested
from service.queue import DiskQueue, HybridQueue, open_queue, queue_dir_name
from service.receivers.http import hypercorn_config, serve_http
from service.receivers.prw import PRWReceiver
from service.receivers.server import ServerConfig, serve_asgi
from service.telemetry import logs
from service.telemetry.health import Health
from service.telemetry.metrics import Metrics
from service.telemetry.server import TelemetryApp

log = logs.get("app")


@attrs.frozen
class Addresses:
    """Where the servers really listen (ports resolved when the config said 0)."""

    telemetry: tuple[str, int]
    prw: tuple[str, int]


@attrs.frozen
class ShutdownReport:
    """What shutdown logged: datapoints delivered and dropped (by reason), per exporter."""

    clean: bool  # everything drained before the grace period ran out
    delivered: dict[str, int]
    dropped: dict[str, dict[str, int]]
    # Disk queues: datapoints still queued at the stop, delivered after the next start.
    kept_on_disk: dict[str, int] = attrs.field(factory=dict)


class App:
    """One governor process: `await app.run(task_status=...)`, stop with `app.shutdown()`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.health = Health()
        self._stop = trio.Event()
        self._hard_stop = trio.Event()
        self._pipeline_scope = trio.CancelScope()
        self.exporters: list[PRWExporter] = []
        self.batcher: Batcher | None = None
        self.report: ShutdownReport | None = None

    def shutdown(self) -> None:
        """Begin phase one of shutdown; a second call skips to phase two."""
        if self._stop.is_set():
            self._hard_stop.set()
        self._stop.set()

    async def run(
        self, *, task_status: trio.TaskStatus[Addresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.cfg
        self._build()
        telemetry_done = trio.Event()
        async with trio.open_nursery() as root:
            tel = await root.start(
                serve_http,
                TelemetryApp(self.metrics, self.health),
                hypercorn_config(cfg.telemetry.listen),
                telemetry_done.wait,
            )
            root.start_soon(self._watch_signals)
            root.start_soon(self._hard_stop_watch)
            try:
                await self._run_pipeline(tel[0], task_status)
            finally:
                telemetry_done.set()
                root.cancel_scope.cancel()

    def _build(self) -> None:
        """Create the queues (a disk queue recovers its directory here), exporters, batcher and
        receiver. Runs before any nursery opens, so a QueueLockedError reaches the caller as is."""
        cfg = self.cfg
        pcfg = cfg.prw
        queues = []
        for exp_cfg in pcfg.exporters:
            q = open_queue(pcfg.queue, queue_dir_name(exporter_name(exp_cfg), exp_cfg.url))
            exporter = PRWExporter(
                exp_cfg, q, metrics=self.metrics, log_interval_s=cfg.log.rate_limit_interval_s
            )
            q.on_drop = exporter.count_queue_drop
            disk = getattr(q, "disk", q)
            if isinstance(disk, DiskQueue):
                disk.on_write_error = exporter.count_write_error
                self.health.checks.append(
                    lambda d=disk, n=exporter.name: (
                        f"queue of {n} cannot write: {d.write_failing}" if d.write_failing else ""
                    )
                )
            queues.append(q)
            self.exporters.append(exporter)
        budget = ByteBudget(pcfg.receiver.ingest_max_bytes)
        self.batcher = Batcher(pcfg.batch, queues, metrics=self.metrics, budget=budget)
        self._tx, self._rx_main = tx, rx = trio.open_memory_channel[Ingested](
            pcfg.receiver.ingest_queue_requests
        )
        self._rx = rx.clone()  # kept to count what a hard stop leaves in the channel
        self._receiver = PRWReceiver(
            pcfg.receiver,
            tx,
            budget,
            metrics=self.metrics,
            health=self.health,
            log_interval_s=cfg.log.rate_limit_interval_s,
            ack_after_queue=pcfg.queue.mode != "memory",
        )

    async def _run_pipeline(
        self, tel: tuple[str, int], task_status: trio.TaskStatus[Addresses]
    ) -> None:
        cfg = self.cfg
        pcfg = cfg.prw
        stop_receiving = trio.Event()
        with self._pipeline_scope as pipeline_scope:
            async with trio.open_nursery() as exporters:
                for exporter in self.exporters:
                    if isinstance(exporter.queue, (DiskQueue, HybridQueue)):
                        await exporters.start(exporter.queue.run)
                    await exporters.start(exporter.run)
                async with trio.open_nursery() as processing:
                    processing.start_soon(self.batcher.run, self._rx_main)
                    async with self._tx, trio.open_nursery() as receivers:
                        prw_addr = await receivers.start(
                            serve_asgi,
                            self._receiver,
                            ServerConfig(
                                pcfg.receiver.listen,
                                keep_alive_max_requests=pcfg.receiver.keep_alive_max_requests,
                                keep_alive_timeout_s=pcfg.receiver.keep_alive_timeout_s,
                                read_timeout_s=pcfg.receiver.read_timeout_s,
                            ),
                            stop_receiving.wait,
                        )
                        self.health.set("ready")
                        addrs = Addresses(telemetry=tel, prw=prw_addr[0])
                        logs.log(
                            log,
                            logging.INFO,
                            "governor started",
                            telemetry=f"{tel[0]}:{tel[1]}",
                            prw=f"{prw_addr[0][0]}:{prw_addr[0][1]}",
                            exporters=[e.name for e in self.exporters],
                        )
                        task_status.started(addrs)
                        await self._stop.wait()
                        self.health.set("draining")
                        logs.log(
                            log,
                            logging.INFO,
                            "shutting down: draining",
                            grace_s=cfg.shutdown_grace_s,
                        )
                        pipeline_scope.deadline = trio.current_time() + cfg.shutdown_grace_s
                        stop_receiving.set()
        self._report(clean=not pipeline_scope.cancelled_caught)

    async def _hard_stop_watch(self) -> None:
        await self._hard_stop.wait()
        self._pipeline_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    # Nothing in the running config can change without a restart yet; rules and
                    # limits (the reloadable parts) arrive with the governance stage.
                    logs.log(log, logging.INFO, "SIGHUP: nothing to reload", signal=name)
                    continue
                logs.log(log, logging.INFO, "signal received", signal=name)
                self.shutdown()

    def _report(self, clean: bool) -> None:
        """Count what the hard stop left behind as dropped, and log the summary per exporter."""
        in_channel = 0
        with self._rx:
            while True:
                try:
                    in_channel += self._rx.receive_nowait().datapoints
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
        kept: dict[str, int] = {}
        for i, exporter in enumerate(self.exporters):
            st = exporter.queue.statistics()
            queued = st.datapoints + st.in_flight_datapoints - exporter.settled_in_flight()
            lost = in_channel + (self.batcher.lost_datapoints(i) if self.batcher else 0)
            if isinstance(exporter.queue, (DiskQueue, HybridQueue)):
                kept[exporter.name] = queued  # stays on disk for the next start
            else:
                lost += queued
            if lost:
                exporter.drop(lost, "shutdown")
        self.report = ShutdownReport(
            clean=clean,
            delivered={e.name: e.sent_datapoints for e in self.exporters},
            dropped={e.name: dict(e.dropped_datapoints) for e in self.exporters},
            kept_on_disk=kept,
        )
        lost = any(self.report.dropped.values())
        logs.log(
            log,
            logging.WARNING if lost or not clean else logging.INFO,
            "governor stopped",
            drained=clean,
            delivered_datapoints=self.report.delivered,
            dropped_datapoints=self.report.dropped,
            kept_on_disk_datapoints=kept,
        )
