"""governor with `prw.queue.mode: disk`: what a stop leaves queued stays on disk and is delivered
after the next start; a queue directory is never shared by two processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from service.app import Addresses, App
from service.config import Config
from service.pipeline.items import Batch
from service.queue import QueueLockedError
from service.receivers.http import hypercorn_config, serve_http
from tests.test_receiver_prw import (
    DEADLINE_S,
    PRW_HEADERS,
    RecordingBackend,
    SeriesKey,
    keys,
    make_config,
    snappy,
    write_request,
)


def reserved_port() -> socket.socket:
    """A bound, non-listening socket: connections to its port are refused, and nobody else can
    take the port until it is closed."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def disk_config(url: str, queue_dir: Path, mode: str = "disk", **queue: object) -> Config:
    return make_config(
        url,
        queue={"mode": mode, "dir": str(queue_dir), **queue},
        exporter={"breaker": {"open_s": 0.05, "max_open_s": 0.1}},
        shutdown_grace_s=0.3,
    )


async def run_app(app: App, nursery: trio.Nursery) -> Addresses:
    return await nursery.start(app.run)


@pytest.mark.parametrize("mode", ["disk", "hybrid"])
async def test_undelivered_data_survives_a_stop_and_is_delivered_after_restart(
    tmp_path: Path, mode: str
) -> None:
    """With the backend down, acknowledged samples stay queued; the stop reports them as kept on
    disk (not dropped; the hybrid queue moves its memory part to disk); after a restart with the
    backend up, every series arrives exactly once."""
    hold = reserved_port()
    port = hold.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api/v1/write"
    sent: list[SeriesKey] = []

    app = App(disk_config(url, tmp_path, mode))
    async with trio.open_nursery() as nursery:
        addrs = await run_app(app, nursery)
        write_url = f"http://{addrs.prw[0]}:{addrs.prw[1]}/api/v1/write"
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
            for i in range(10):
                req = write_request(f"disk-{i}", n_series=3, n_samples=2)
                resp = await client.post(
                    write_url, content=snappy(req.SerializeToString()), headers=PRW_HEADERS
                )
                assert resp.status_code == 204
                sent += keys(req)
        app.shutdown()
    assert app.report is not None
    assert app.report.dropped == {"backend": {}}
    assert app.report.delivered == {"backend": 0}
    assert app.report.kept_on_disk == {"backend": 60}

    hold.close()
    backend = RecordingBackend()
    async with trio.open_nursery() as nursery:
        stop_backend = trio.Event()
        await nursery.start(
            serve_http, backend, hypercorn_config(f"127.0.0.1:{port}"), stop_backend.wait
        )
        again = App(disk_config(url, tmp_path, mode))
        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as app_nursery:
                await run_app(again, app_nursery)
                await backend.wait_for(lambda: len(backend.series) >= len(sent))
                again.shutdown()
        stop_backend.set()
    assert sorted(backend.series) == sorted(sent)
    assert again.report.delivered == {"backend": 60}
    assert again.report.kept_on_disk == {"backend": 0}
    assert again.report.dropped == {"backend": {}}


async def test_a_second_app_on_the_same_queue_dir_is_refused(tmp_path: Path) -> None:
    """Two governors on one queue directory: the second fails before it listens, naming the
    process that holds the directory."""
    hold = reserved_port()
    url = f"http://127.0.0.1:{hold.getsockname()[1]}/api/v1/write"
    first = App(disk_config(url, tmp_path))
    async with trio.open_nursery() as nursery:
        await run_app(first, nursery)
        second = App(disk_config(url, tmp_path))
        with pytest.raises(QueueLockedError) as info:
            await second.run()
        assert info.value.pid is not None
        assert f"locked by pid {info.value.pid}" in str(info.value)
        first.shutdown()
    hold.close()


def test_cli_reports_a_locked_queue_dir_in_one_line(tmp_path: Path) -> None:
    """`governor` started on a queue directory another process holds exits 1 with one line."""
    hold = reserved_port()
    url = f"http://127.0.0.1:{hold.getsockname()[1]}/api/v1/write"
    config = tmp_path / "governor.yaml"
    config.write_text(
        "telemetry: {listen: '127.0.0.1:0'}\n"
        "prw:\n"
        "  receiver: {listen: '127.0.0.1:0'}\n"
        f"  queue: {{mode: disk, dir: '{tmp_path / 'q'}'}}\n"
        f"  exporters: [{{url: '{url}', name: backend}}]\n"
    )
    with subprocess.Popen(
        [sys.executable, "-m", "service", "--config", str(config), "--log-level", "error"],
        stderr=subprocess.DEVNULL,
    ) as holder:
        try:
            end = time.monotonic() + DEADLINE_S
            while not list((tmp_path / "q").glob("*/lock")):
                assert time.monotonic() < end, "the first governor never took its queue lock"
                assert holder.poll() is None, "the first governor exited"
                time.sleep(0.02)
            # A second process: main() in this one would reconfigure logging for later tests.
            second = subprocess.run(
                [sys.executable, "-m", "service", "--config", str(config), "--log-level", "error"],
                capture_output=True,
                text=True,
                timeout=DEADLINE_S,
            )
            assert second.returncode == 1
            err = second.stderr.strip().splitlines()
            assert len(err) == 1
            assert f"locked by pid {holder.pid}" in err[0]
        finally:
            holder.terminate()
            holder.wait(timeout=DEADLINE_S)
            hold.close()


async def test_in_disk_mode_a_204_means_the_data_is_in_the_queue(tmp_path: Path) -> None:
    """With a disk queue the receiver answers only once the request's batch is in the queue: right
    after every 204, the queue holds at least every datapoint acknowledged so far (the backend is
    down, so nothing has left it)."""
    hold = reserved_port()
    url = f"http://127.0.0.1:{hold.getsockname()[1]}/api/v1/write"
    app = App(
        make_config(
            url,
            queue={"mode": "disk", "dir": str(tmp_path)},
            batch={"interval_s": 0.2},
            shutdown_grace_s=0.3,
        )
    )
    acknowledged = 0
    async with trio.open_nursery() as nursery:
        addrs = await run_app(app, nursery)
        queue = app.exporters[0].queue
        write_url = f"http://{addrs.prw[0]}:{addrs.prw[1]}/api/v1/write"
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
            for i in range(4):
                req = write_request(f"ack-{i}", n_series=2, n_samples=3)
                resp = await client.post(
                    write_url, content=snappy(req.SerializeToString()), headers=PRW_HEADERS
                )
                assert resp.status_code == 204
                acknowledged += 6
                st = queue.statistics()
                assert st.datapoints + st.in_flight_datapoints == acknowledged
        app.shutdown()
    hold.close()
    assert app.report is not None
    assert app.report.kept_on_disk == {"backend": acknowledged}


async def test_disk_queue_metrics_are_exported(tmp_path: Path) -> None:
    """In disk mode /metrics carries the disk queue's own series: used bytes, and counters of
    corrupt records, write errors and sync errors (all 0 on a healthy queue)."""
    hold = reserved_port()
    url = f"http://127.0.0.1:{hold.getsockname()[1]}/api/v1/write"
    app = App(disk_config(url, tmp_path))
    async with trio.open_nursery() as nursery:
        await run_app(app, nursery)
        labels = {"pipeline": "prw", "exporter": "backend"}
        value = app.metrics.registry.get_sample_value
        assert value("governor_queue_disk_used_bytes", labels) == 0
        for name in ("corrupt_records", "write_errors", "sync_errors"):
            assert value(f"governor_queue_{name}_total", labels) == 0
        app.shutdown()
    hold.close()


async def test_ready_reports_a_queue_that_cannot_write_until_it_can(tmp_path: Path) -> None:
    """While the disk queue's last write failed, /ready answers 503 "degraded" naming the
    exporter and the error; once a write succeeds again, /ready is 200 "ready" again."""
    hold = reserved_port()
    url = f"http://127.0.0.1:{hold.getsockname()[1]}/api/v1/write"
    app = App(disk_config(url, tmp_path))
    async with trio.open_nursery() as nursery:
        addrs = await run_app(app, nursery)
        ready_url = f"http://{addrs.telemetry[0]}:{addrs.telemetry[1]}/ready"
        disk = app.exporters[0].queue
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
            assert (await client.get(ready_url)).json() == {"status": "ready"}
            disk.write_failing = "[Errno 28] No space left on device"  # as a failed write sets it
            resp = await client.get(ready_url)
            assert resp.status_code == 503
            assert resp.json() == {
                "status": "degraded",
                "problems": ["queue of backend cannot write: [Errno 28] No space left on device"],
            }
            req = write_request("after-enospc", n_series=1, n_samples=1)
            ok = await client.post(
                f"http://{addrs.prw[0]}:{addrs.prw[1]}/api/v1/write",
                content=snappy(req.SerializeToString()),
                headers=PRW_HEADERS,
            )
            assert ok.status_code == 204  # this batch was written: the queue recovered
            resp = await client.get(ready_url)
            assert (resp.status_code, resp.json()) == (200, {"status": "ready"})
        app.shutdown()
    hold.close()


async def test_write_errors_are_dropped_with_their_own_reason(tmp_path: Path) -> None:
    """A batch the disk queue cannot write is counted as dropped with reason queue_write_error."""
    hold = reserved_port()
    url = f"http://127.0.0.1:{hold.getsockname()[1]}/api/v1/write"
    app = App(disk_config(url, tmp_path))
    async with trio.open_nursery() as nursery:
        await run_app(app, nursery)
        exporter = app.exporters[0]
        disk = exporter.queue
        assert disk.on_write_error == exporter.count_write_error
        disk.on_write_error(_batch_of(7))
        labels = {"pipeline": "prw", "exporter": "backend", "reason": "queue_write_error"}
        assert (
            app.metrics.registry.get_sample_value("governor_datapoints_dropped_total", labels) == 7
        )
        app.shutdown()
    hold.close()


def _batch_of(datapoints: int) -> Batch:
    return Batch(payload=b"x", encoding="snappy", series=1, datapoints=datapoints, raw_bytes=1)
