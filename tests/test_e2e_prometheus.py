"""governor between real peers: Prometheus remote-writing into it, victoria-metrics behind it.

Time is real here: every wait is a condition polled with a deadline, never a sleep. A flow is
stopped by reloading Prometheus without its scrape job (the reload answers only once the scrape
loops have stopped), so Prometheus can still be asked what it sent once the last sample is out.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cramjam
import httpx
import pytest
import trio
import yaml

from service._proto.prometheus.remote_pb2 import WriteRequest
from service.config import exporter_name
from tests.peers import (
    JOB,
    LOCALHOST,
    PROMETHEUS_SCRAPE_SERIES,
    InProcessGovernor,
    Samples,
    ScrapeTarget,
    assert_scraped_values,
    expected_scraped_series,
    governor_config,
    prometheus_config,
    scrape,
    start_prometheus,
    start_victoria_metrics,
    wait_until,
)

pytestmark = pytest.mark.peers

MIN_SCRAPES = 4
# Prometheus replays its WAL for about 5 s before the first remote write; scrapes run meanwhile.
FLOW_TIMEOUT_S = 40.0
DRAIN_TIMEOUT_S = 20.0
PRW_HEADERS = {
    "content-type": "application/x-protobuf",
    "content-encoding": "snappy",
    "x-prometheus-remote-write-version": "0.1.0",
}
REPO = Path(__file__).resolve().parents[1]


def assert_same_samples(stored: Samples, reference: Samples) -> None:
    assert set(stored) == set(reference)
    for series, samples in reference.items():
        assert stored[series] == samples, dict(series)


async def test_prometheus_remote_write_reaches_victoria_metrics_exactly(
    tmp_path: Path, peer_client: httpx.AsyncClient, scrape_target: ScrapeTarget
) -> None:
    """Prometheus scrapes 200 series and remote-writes through governor to victoria-metrics.

    Every series arrives with its labels intact (the target's labels plus job and instance,
    and Prometheus's own scrape series), the stored samples equal Prometheus's TSDB sample for
    sample, and the counts agree exactly: Prometheus sent == governor received == governor sent
    == victoria-metrics inserted == samples stored; nothing failed, retried or dropped.
    """
    client = peer_client
    async with (
        start_victoria_metrics(client, tmp_path / "vm") as vm,
        trio.open_nursery() as nursery,
    ):
        gov = InProcessGovernor(governor_config(vm.write_url))
        await gov.start(nursery)
        prom_cfg = prometheus_config(scrape_target.address, JOB, gov.write_url)
        async with start_prometheus(client, tmp_path / "prometheus", prom_cfg) as prom:

            async def flowing() -> tuple[bool, Any]:
                sent = (await prom.metrics()).value("prometheus_remote_storage_samples_total")
                return scrape_target.scrapes >= MIN_SCRAPES and sent > 0, {
                    "scrapes": scrape_target.scrapes,
                    "sent": sent,
                }

            await wait_until(flowing, what="scrapes and remote writes", timeout_s=FLOW_TIMEOUT_S)
            # Without its scrape job Prometheus appends nothing more; the reload returns once
            # the scrape loop has stopped, and the remote-write queue carries on.
            await prom.reload(prometheus_config("", JOB, gov.write_url))

            async def all_sent() -> tuple[bool, Any]:
                # Settled: every sample appended to the TSDB was sent, failed or dropped.
                m = await prom.metrics()
                seen = {
                    "appended": m.value("prometheus_tsdb_head_samples_appended_total"),
                    "sent": m.value("prometheus_remote_storage_samples_total"),
                    "failed": m.value("prometheus_remote_storage_samples_failed_total"),
                    "dropped": m.value("prometheus_remote_storage_samples_dropped_total"),
                    "pending": m.value("prometheus_remote_storage_samples_pending"),
                }
                settled = seen["sent"] + seen["failed"] + seen["dropped"]
                return settled == seen["appended"] and seen["pending"] == 0, seen

            await wait_until(all_sent, what="Prometheus to send all", timeout_s=DRAIN_TIMEOUT_S)
            m = await prom.metrics()
            prom_series = await prom.series(f'{{job="{JOB}"}}')
            prom_samples = await prom.samples(f'{{job="{JOB}"}}')
            assert await prom.peer.stop(signal.SIGTERM) == 0, prom.peer.log_tail()

        report = await gov.stop()
        stored = await vm.export()
        vm_metrics = await vm.metrics()

    expected_series = expected_scraped_series(scrape_target, PROMETHEUS_SCRAPE_SERIES)
    assert prom_series == expected_series
    assert set(stored) == expected_series
    assert_same_samples(stored, prom_samples)
    assert_scraped_values(stored, scrape_target)

    appended = m.value("prometheus_tsdb_head_samples_appended_total")
    prom_sent = m.value("prometheus_remote_storage_samples_total")
    assert m.value("prometheus_remote_storage_samples_failed_total") == 0
    assert m.value("prometheus_remote_storage_samples_retried_total") == 0
    assert m.value("prometheus_remote_storage_samples_dropped_total") == 0
    stored_count = sum(len(samples) for samples in stored.values())
    received = gov.sample("governor_datapoints_received_total", pipeline="prw")
    name = exporter_name(gov.app.cfg.prw.exporters[0])
    gov_sent = gov.sample("governor_datapoints_sent_total", pipeline="prw", exporter=name)
    vm_inserted = vm_metrics.value("vm_rows_inserted_total", type="promremotewrite")
    assert appended == prom_sent == received == gov_sent == vm_inserted == stored_count > 0
    assert report.clean
    assert report.delivered == {name: prom_sent}
    assert report.dropped == {name: {}}


# ---- a raw remote-write client, for the tests that control exactly what is sent --------------


def write_request(request: int, n_series: int, n_samples: int, t0_ms: int) -> WriteRequest:
    req = WriteRequest()
    for s in range(n_series):
        ts = req.timeseries.add()
        ts.labels.add(name="__name__", value="e2e_backlog_total")
        ts.labels.add(name="request", value=str(request))
        ts.labels.add(name="series", value=str(s))
        for j in range(n_samples):
            ts.samples.add(value=request * 1000 + s * 10 + j + 0.5, timestamp=t0_ms + j * 1000)
    return req


def samples_of(req: WriteRequest) -> Samples:
    return {
        frozenset((lbl.name, lbl.value) for lbl in ts.labels): [
            (s.timestamp, s.value) for s in ts.samples
        ]
        for ts in req.timeseries
    }


async def post(client: httpx.AsyncClient, url: str, req: WriteRequest) -> httpx.Response:
    body = bytes(cramjam.snappy.compress_raw(req.SerializeToString()))
    return await client.post(url, content=body, headers=PRW_HEADERS)


def reserve_port() -> socket.socket:
    """A socket bound to a free port but not listening: connecting to it is refused, and no
    other process can take the port until the socket is closed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOCALHOST, 0))
    return sock


async def test_backend_down_then_up_delivers_everything_acknowledged(
    tmp_path: Path, peer_client: httpx.AsyncClient
) -> None:
    """While nothing listens on the backend's port, governor acknowledges every write (204),
    retries and opens its circuit breaker; once victoria-metrics listens on that port, every
    acknowledged sample arrives exactly once with its timestamp and value, the breaker closes
    again and nothing is dropped."""
    client = peer_client
    reserved = reserve_port()
    try:
        port = reserved.getsockname()[1]
        cfg = governor_config(
            f"http://{LOCALHOST}:{port}/api/v1/write",
            retry={"initial_delay_s": 0.05, "max_delay_s": 0.2},
            breaker={"failure_threshold": 3, "open_s": 0.2, "max_open_s": 0.4},
        )
        name = exporter_name(cfg.prw.exporters[0])
        async with trio.open_nursery() as nursery:
            gov = InProcessGovernor(cfg)
            await gov.start(nursery)

            async def governor_metric(metric: str, **match: str) -> float:
                exposition = await scrape(client, gov.telemetry_url("/metrics"))
                return exposition.value(metric, **match)

            t0_ms = (int(time.time()) - 600) * 1000
            acknowledged: Samples = {}
            for i in range(4):
                req = write_request(i, n_series=25, n_samples=4, t0_ms=t0_ms)
                resp = await post(client, gov.write_url, req)
                assert resp.status_code == 204, resp.text
                acknowledged.update(samples_of(req))
            total = sum(len(s) for s in acknowledged.values())

            async def breaker_open() -> tuple[bool, Any]:
                state = await governor_metric("governor_breaker_state", exporter=name)
                return state == 1, state

            await wait_until(breaker_open, what="the breaker to open", timeout_s=10.0)
            assert await governor_metric("governor_datapoints_sent_total", exporter=name) == 0

            reserved.close()
            async with start_victoria_metrics(client, tmp_path / "vm", port=port) as vm:

                async def delivered() -> tuple[bool, Any]:
                    sent = await governor_metric("governor_datapoints_sent_total", exporter=name)
                    return sent == total, sent

                await wait_until(delivered, what="delivery after recovery", timeout_s=15.0)
                exposition = await scrape(client, gov.telemetry_url("/metrics"))
                report = await gov.stop()
                stored = await vm.export()
                vm_metrics = await vm.metrics()
    finally:
        reserved.close()

    assert stored == acknowledged
    assert vm_metrics.value("vm_rows_inserted_total", type="promremotewrite") == total
    assert exposition.value("governor_breaker_state", exporter=name) == 0
    assert exposition.value("governor_datapoints_received_total") == total
    assert exposition.value("governor_export_retries_total", exporter=name) > 0
    assert exposition.value("governor_export_requests_total", outcome="retryable") > 0
    assert sum(exposition.values("governor_datapoints_dropped_total")) == 0
    assert report.clean
    assert report.delivered == {name: total}
    assert report.dropped == {name: {}}


# ---- governor as a process: SIGTERM ---------------------------------------------------------


class LogLines:
    """Collects a process's stderr lines; `started` is set at the "governor started" record."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.started = trio.Event()

    def records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                pytest.fail(f"a log line is not JSON: {line!r}\nall lines:\n" + self.text())
        return records

    def text(self) -> str:
        return "\n".join(self.lines)

    async def read(self, stream: trio.abc.ReceiveStream) -> None:
        """Read until EOF (the process exited); bounded by the process's life."""
        buf = b""
        async for chunk in stream:
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if '"governor started"' in line:
                    self.started.set()
        if buf:
            self.lines.append(buf.decode(errors="replace"))


async def test_sigterm_drains_for_the_grace_period_then_reports_what_it_dropped(
    tmp_path: Path, peer_client: httpx.AsyncClient
) -> None:
    """governor as a process, its backend down, shutdown_grace_s = 1: after SIGTERM /ready
    answers 503 "draining", the process exits with code 0 no sooner than the grace period and
    within a small margin after it, and its last log line ("governor stopped", JSON on stderr)
    reports every acknowledged datapoint as dropped at shutdown and none delivered."""
    client = peer_client
    grace_s = 1.0
    margin_s = 3.0
    reserved = reserve_port()
    port = reserved.getsockname()[1]
    export_url = f"http://{LOCALHOST}:{port}/api/v1/write"
    config_path = tmp_path / "governor.yaml"
    config = {
        "log": {"level": "info", "format": "json"},
        "telemetry": {"listen": f"{LOCALHOST}:0"},
        "shutdown_grace_s": grace_s,
        "prw": {
            "receiver": {"listen": f"{LOCALHOST}:0"},
            "batch": {"interval_s": 0.1},
            "exporters": [
                {
                    "url": export_url,
                    "retry": {"initial_delay_s": 0.05, "max_delay_s": 0.2},
                    "breaker": {"open_s": 0.2, "max_open_s": 0.4},
                }
            ],
        },
    }
    config_path.write_text(yaml.safe_dump(config))
    log = LogLines()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "service", "--config", str(config_path)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with trio.open_nursery() as nursery:
            assert process.stderr is not None
            nursery.start_soon(log.read, process.stderr)
            with trio.move_on_after(20.0):
                await log.started.wait()
            if not log.started.is_set():
                pytest.fail("governor did not log 'governor started':\n" + log.text())
            started = next(r for r in log.records() if r["msg"] == "governor started")
            write_url = f"http://{started['prw']}/api/v1/write"
            ready_url = f"http://{started['telemetry']}/ready"
            assert (await client.get(ready_url)).status_code == 200

            t0_ms = (int(time.time()) - 600) * 1000
            acknowledged = 0
            for i in range(3):
                req = write_request(i, n_series=10, n_samples=5, t0_ms=t0_ms)
                resp = await post(client, write_url, req)
                assert resp.status_code == 204, resp.text
                acknowledged += 50

            process.send_signal(signal.SIGTERM)
            signalled = trio.current_time()

            async def not_ready() -> tuple[bool, Any]:
                resp = await client.get(ready_url)
                return resp.status_code != 200, (resp.status_code, resp.json())

            assert await wait_until(not_ready, what="/ready to change", timeout_s=grace_s) == (
                503,
                {"status": "draining"},
            )
            with trio.move_on_after(grace_s + margin_s):
                await process.wait()
            elapsed = trio.current_time() - signalled
            assert process.returncode == 0, log.text()
            assert grace_s <= elapsed < grace_s + margin_s
    finally:
        reserved.close()
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10.0):
            await process.wait()

    records = log.records()
    assert [r["msg"] for r in records if r["msg"] == "signal received"] == ["signal received"]
    assert next(r for r in records if r["msg"] == "signal received")["signal"] == "SIGTERM"
    last = records[-1]
    name = f"{LOCALHOST}:{port}/api/v1/write"
    assert last["msg"] == "governor stopped"
    assert last["level"] == "warning"
    assert last["drained"] is False
    assert last["delivered_datapoints"] == {name: 0}
    assert last["dropped_datapoints"] == {name: {"shutdown": acknowledged}}
