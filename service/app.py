"""Builds the stage graph from the config and owns it: start order, signals, two-phase shutdown.

Nesting is start/stop order: telemetry outermost, then exporters with their queues, then the
batcher, then receivers innermost; downstream starts first and upstream stops first. Shutdown
phase one stops the receivers and lets everything drain; phase two, `shutdown_grace_s` later,
cancels what is left and counts it as dropped.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from service.codec import compression
from service.config import (
    Config,
    HTTPServerConfig,
    OTLPConfig,
    PRWConfig,
    PRWExporterConfig,
    exporter_name,
)
from service.export.base import Exporter
from service.export.otlp import otlp_exporter
from service.export.prw import PRWExporter
from service.governance import otlp as governance_otlp
from service.governance import prw as governance_prw
from service.governance.activity import LimitCollector, RuleCollector, StatsCollector
from service.governance.engine import RuleEngine, wall_clock_ms
from service.governance.limits import LimitEngine, LimitSet, load_limits
from service.governance.rules import RulesError, RuleSet, load_rules
from service.governance.stage import Governance
from service.governance.stats import Stats
from service.governance.windows import Emitted
from service.pipeline.batcher import Batcher
from service.pipeline.budget import ByteBudget
from service.pipeline.items import Ingested
from service.queue import DiskQueue, HybridQueue, open_queue, queue_dir_name
from service.receivers.http import hypercorn_config, serve_http
from service.receivers.intake import Intake
from service.receivers.otlp_grpc import OTLPGRPCReceiver
from service.receivers.otlp_http import OTLPHTTPReceiver
from service.receivers.prw import PRWReceiver
from service.receivers.server import ServerConfig, serve_asgi
from service.telemetry import logs
from service.telemetry.health import Health
from service.telemetry.metrics import Metrics
from service.telemetry.server import TelemetryApp

T = TypeVar("T")
log = logs.get("app")


@attrs.frozen
class Addresses:
    """Where the servers really listen (ports resolved when the config said 0); None: off."""

    telemetry: tuple[str, int]
    prw: tuple[str, int] | None = None
    otlp_grpc: tuple[str, int] | None = None
    otlp_http: tuple[str, int] | None = None


@attrs.frozen
class ShutdownReport:
    """What shutdown logged: datapoints delivered and dropped (by reason), per exporter."""

    clean: bool  # everything drained before the grace period ran out
    delivered: dict[str, int]
    dropped: dict[str, dict[str, int]]
    # Disk queues: datapoints still queued at the stop, delivered after the next start.
    kept_on_disk: dict[str, int] = attrs.field(factory=dict)


@attrs.define
class Pipeline:
    """One pipeline's stages: intake (shared by its receivers), batcher, exporters."""

    name: str
    intake: Intake
    batcher: Batcher
    exporters: list[Exporter]
    rx: trio.MemoryReceiveChannel[Ingested]  # the batcher's end
    rx_left: trio.MemoryReceiveChannel[Ingested]  # a clone, to count what a hard stop leaves
    engine: RuleEngine | None = None  # with a rules file
    governance: Governance | None = None  # with rules, stats or limits
    engine_tx: trio.MemorySendChannel[Ingested] | None = None  # where its windows go


class App:
    """One governor process: `await app.run(task_status=...)`, stop with `app.shutdown()`."""

    def __init__(self, cfg: Config, *, clock_ms: Callable[[], int] | None = None) -> None:
        """`clock_ms` replaces the wall clock of the rule engines (tests use trio's clock)."""
        self.cfg = cfg
        self.clock_ms = clock_ms
        self.metrics = Metrics()
        self.health = Health()
        self._stop = trio.Event()
        self._hard_stop = trio.Event()
        self._pipeline_scope = trio.CancelScope()
        self.pipelines: list[Pipeline] = []
        self.exporters: list[Exporter] = []
        self.report: ShutdownReport | None = None
        self.ruleset: RuleSet | None = None
        self.limitset: LimitSet | None = None

    @property
    def batcher(self) -> Batcher | None:
        """The first pipeline's batcher (the PRW one when PRW is on)."""
        return self.pipelines[0].batcher if self.pipelines else None

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
                TelemetryApp(
                    self.metrics,
                    self.health,
                    self.cardinality if cfg.stats.level != "none" else None,
                ),
                hypercorn_config(cfg.telemetry.listen),
                telemetry_done.wait,
            )
            root.start_soon(self._watch_signals)
            root.start_soon(self._hard_stop_watch)
            try:
                await self._run_pipelines(tel[0], task_status)
            finally:
                telemetry_done.set()
                root.cancel_scope.cancel()

    def cardinality(self, top: int) -> dict[str, Any]:
        """The /api/v1/cardinality answer: each pipeline's stats report."""
        reports = {g.pipeline: g.stats.report(top) for g in self.governance if g.stats is not None}
        level = self.cfg.stats.level
        return {"status": "success", "level": level, "top": top, "pipelines": reports}

    def _build(self) -> None:
        """Create each configured pipeline's queues (a disk queue recovers its directory here),
        exporters, batcher and intake. Runs before any nursery opens, so a QueueLockedError
        reaches the caller as is."""
        cfg = self.cfg
        if cfg.rules.file:
            self.ruleset = load_rules(Path(cfg.rules.file).read_text())  # RulesError stops it
        if cfg.limits.file:
            self.limitset = load_limits(Path(cfg.limits.file).read_text())  # so does LimitsError
        if cfg.prw.exporters:
            self._build_pipeline("prw", cfg.prw)
        if cfg.otlp.exporters:
            self._build_pipeline("otlp", cfg.otlp)
        engines = [p.engine for p in self.pipelines if p.engine is not None]
        if engines:
            self.metrics.registry.register(RuleCollector(engines))
        stats = [g.stats for g in self.governance if g.stats is not None]
        if stats:
            self.metrics.registry.register(StatsCollector(stats, cfg.stats.top_k))
        limits = [g.limits for g in self.governance if g.limits is not None]
        if limits:
            self.metrics.registry.register(LimitCollector(limits, cfg.stats.top_k))

    @property
    def governance(self) -> list[Governance]:
        return [p.governance for p in self.pipelines if p.governance is not None]

    def _build_pipeline(self, name: str, pcfg: PRWConfig | OTLPConfig) -> None:
        interval = self.cfg.log.rate_limit_interval_s
        queues = []
        exporters: list[Exporter] = []
        for exp_cfg in pcfg.exporters:
            if isinstance(exp_cfg, PRWExporterConfig):
                dir_name = queue_dir_name(exporter_name(exp_cfg), exp_cfg.url)
            else:
                dir_name = queue_dir_name(f"otlp-{exporter_name(exp_cfg)}", exp_cfg.endpoint)
            q = open_queue(pcfg.queue, dir_name)
            exporter: Exporter
            if isinstance(exp_cfg, PRWExporterConfig):
                exporter = PRWExporter(exp_cfg, q, metrics=self.metrics, log_interval_s=interval)
            else:
                exporter = otlp_exporter(exp_cfg, q, metrics=self.metrics, log_interval_s=interval)
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
            exporters.append(exporter)
        budget = ByteBudget(pcfg.receiver.ingest_max_bytes)
        batcher = Batcher(pcfg.batch, queues, metrics=self.metrics, budget=budget, pipeline=name)
        tx, rx = trio.open_memory_channel[Ingested](pcfg.receiver.ingest_queue_requests)
        intake = Intake(pcfg.receiver, tx, budget, ack_after_queue=pcfg.queue.mode != "memory")
        pipeline = Pipeline(name, intake, batcher, exporters, rx, rx.clone())
        cfg = self.cfg
        if self.ruleset is not None:
            pipeline.engine = RuleEngine(
                self.ruleset,
                pipeline=name,
                clock_ms=self.clock_ms,
                route_cache_max=cfg.rules.route_cache_series,
            )
        stats = Stats(cfg.stats, pipeline=name) if cfg.stats.level != "none" else None
        limits = None
        if self.limitset is not None:
            limits = LimitEngine(
                self.limitset,
                pipeline=name,
                exact_limit=cfg.stats.exact_limit,
                force_dry_run=cfg.limits.dry_run,
            )
        if pipeline.engine is not None or stats is not None or limits is not None:
            pipeline.governance = Governance(
                pipeline=name,
                engine=pipeline.engine,
                stats=stats,
                limits=limits,
                clock_ms=self.clock_ms or wall_clock_ms,
                series_cache=cfg.limits.series_cache,
            )
            pipeline.engine_tx = tx.clone()
            intake.governance = pipeline.governance
        self.pipelines.append(pipeline)
        self.exporters += exporters

    async def _run_pipelines(
        self, tel: tuple[str, int], task_status: trio.TaskStatus[Addresses]
    ) -> None:
        cfg = self.cfg
        stop_receiving = trio.Event()
        interval = cfg.log.rate_limit_interval_s
        common = {"metrics": self.metrics, "health": self.health, "log_interval_s": interval}
        with self._pipeline_scope as pipeline_scope:
            async with trio.open_nursery() as exporters:
                for exporter in self.exporters:
                    if isinstance(exporter.queue, (DiskQueue, HybridQueue)):
                        await exporters.start(exporter.queue.run)
                    await exporters.start(exporter.run)
                async with trio.open_nursery() as processing:
                    stop_engines = trio.Event()
                    for p in self.pipelines:
                        processing.start_soon(p.batcher.run, p.rx)
                        if p.governance is not None:
                            processing.start_soon(self._run_engine, p, stop_engines)
                    async with contextlib.AsyncExitStack() as channels:
                        for p in self.pipelines:
                            await channels.enter_async_context(p.intake.tx)
                        async with trio.open_nursery() as receivers:
                            found: dict[str, tuple[str, int]] = {}
                            for p in self.pipelines:
                                found |= await self._start_receivers(
                                    p, receivers, stop_receiving.wait, common
                                )
                            self.health.set("ready")
                            addrs = Addresses(telemetry=tel, **found)
                            logs.log(
                                log,
                                logging.INFO,
                                "governor started",
                                telemetry=f"{tel[0]}:{tel[1]}",
                                **{k: f"{h}:{port}" for k, (h, port) in found.items()},
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
                    # Receivers are done: the engines emit their open windows, then close.
                    stop_engines.set()
        self._report(clean=not pipeline_scope.cancelled_caught)

    async def _run_engine(self, p: Pipeline, stop: trio.Event) -> None:
        """The pipeline's governance task: emits windows as they fall due, all of them at
        `stop`."""
        assert p.governance is not None and p.engine_tx is not None
        encode = governance_prw.encode if p.name == "prw" else governance_otlp.encode
        snappy = p.name == "prw"

        async def emit(emitted: list[Emitted]) -> None:
            data, series, points = encode(emitted)
            block = compression.compress(data, "snappy") if snappy else data
            await p.intake.emit(p.engine_tx, Ingested(block, len(data), series, points))

        async with p.engine_tx:
            await p.governance.run(emit, stop, tick_s=self.cfg.rules.tick_s)

    def reload_rules(self) -> bool:
        """Read the rules file again (SIGHUP). A valid file replaces the rules of every
        pipeline; a bad one keeps the old rules and logs every problem. Returns success."""
        if not self.cfg.rules.file and not self.cfg.limits.file:
            logs.log(log, logging.INFO, "SIGHUP: no rules or limits file; nothing to reload")
        ruleset = self._read("rules", self.cfg.rules.file, load_rules)
        if ruleset is None:
            return not self.cfg.rules.file
        self.ruleset = ruleset
        for p in self.pipelines:
            if p.engine is not None:
                p.engine.reload(ruleset)
        self._reloaded("rules", rules=len(ruleset.rules))
        return True

    def reload_limits(self) -> bool:
        """Read the limits file again (SIGHUP), like reload_rules. Returns success."""
        limitset = self._read("limits", self.cfg.limits.file, load_limits)
        if limitset is None:
            return not self.cfg.limits.file
        self.limitset = limitset
        for g in self.governance:
            if g.limits is not None:
                g.limits.apply(limitset)
        self._reloaded("limits", limits=len(limitset.limits))
        return True

    def _read(self, what: str, path: str, load: Callable[[str], T]) -> T | None:
        """A rules or limits file, loaded and validated; None without one, or when it cannot
        be read or has problems (each logged, and the reload counted as a failure)."""
        if not path:
            return None
        try:
            return load(Path(path).read_text())
        except (OSError, RulesError) as e:  # LimitsError is a RulesError
            problems = e.problems if isinstance(e, RulesError) else [f"{path}: {e}"]
            self.metrics.config_reloads.labels("failure").inc()
            for problem in problems:
                logs.log(log, logging.ERROR, f"{what} reload refused", file=path, problem=problem)
            logs.log(
                log,
                logging.ERROR,
                f"{what} reload failed; the old {what} stay active",
                file=path,
                problems=len(problems),
            )
            return None

    def _reloaded(self, what: str, **counts: int) -> None:
        self.metrics.config_reloads.labels("success").inc()
        path = self.cfg.rules.file if what == "rules" else self.cfg.limits.file
        logs.log(log, logging.INFO, f"{what} reloaded", file=path, **counts)

    async def _start_receivers(
        self,
        p: Pipeline,
        nursery: trio.Nursery,
        stop: Callable[[], Awaitable[None]],
        common: dict[str, Any],
    ) -> dict[str, tuple[str, int]]:
        """Start the pipeline's receivers in `nursery`; their bound addresses by name."""
        found = {}
        if p.name == "prw":
            rc = self.cfg.prw.receiver
            app = PRWReceiver(rc, p.intake, **common)
            bound = await nursery.start(serve_asgi, app, _server_config(rc.listen, rc), stop)
            found["prw"] = bound[0]
            return found
        rc = self.cfg.otlp.receiver
        if rc.grpc.listen:
            grpc_receiver = OTLPGRPCReceiver(rc, p.intake, **common)
            found["otlp_grpc"] = (await nursery.start(grpc_receiver.serve, stop))[0]
        if rc.http.listen:
            http_app = OTLPHTTPReceiver(rc, p.intake, **common)
            server_cfg = _server_config(rc.http.listen, rc.http)
            found["otlp_http"] = (await nursery.start(serve_asgi, http_app, server_cfg, stop))[0]
        return found

    async def _hard_stop_watch(self) -> None:
        await self._hard_stop.wait()
        self._pipeline_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    self.reload_rules()
                    self.reload_limits()
                    continue
                logs.log(log, logging.INFO, "signal received", signal=name)
                self.shutdown()

    def _report(self, clean: bool) -> None:
        """Count what the hard stop left behind as dropped, and log the summary per exporter."""
        kept: dict[str, int] = {}
        for p in self.pipelines:
            in_channel = 0
            with p.rx_left:
                while True:
                    try:
                        in_channel += p.rx_left.receive_nowait().datapoints
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
            for i, exporter in enumerate(p.exporters):
                st = exporter.queue.statistics()
                queued = st.datapoints + st.in_flight_datapoints - exporter.settled_in_flight()
                lost = in_channel + p.batcher.lost_datapoints(i)
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


def _server_config(listen: str, cfg: HTTPServerConfig) -> ServerConfig:
    return ServerConfig(
        listen,
        keep_alive_max_requests=cfg.keep_alive_max_requests,
        keep_alive_timeout_s=cfg.keep_alive_timeout_s,
        read_timeout_s=cfg.read_timeout_s,
    )
