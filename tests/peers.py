"""Real third-party peers for the end-to-end tests: victoria-metrics, Prometheus and vmagent as
subprocesses on free 127.0.0.1 ports, a scrape target the test serves itself, and governor run
in-process.

Every process started here is killed when its context manager exits and every wait has a
deadline. A missing binary fails the test, never skips it: a skipped real-peer test in CI is a
hole nobody sees.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.app import Addresses, App, ShutdownReport
from service.config import Config, config_from_dict

LOCALHOST = "127.0.0.1"
# A cold start of Prometheus or victoria-metrics takes 1-3 s here; a loaded CI machine can be
# several times slower, and a timeout only costs time when something is already broken.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
BIND_ATTEMPTS = 3  # a port picked free can be taken before the peer binds it; then pick again
POLL_INTERVAL_S = 0.05

# A series identity: its label pairs, __name__ included. Order-free, as a backend sees it.
Labels = frozenset[tuple[str, str]]
# What a backend holds: every series with its (timestamp ms, value) samples in timestamp order.
Samples = dict[Labels, list[tuple[int, float]]]


def labels(**pairs: str) -> Labels:
    return frozenset(pairs.items())


def with_labels(series: Labels, **extra: str) -> Labels:
    return frozenset({**dict(series), **extra}.items())


def require_binary(name: str) -> str:
    """The path of `name`; fails the test (never skips it) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name!r} is not on PATH: the end-to-end tests run against the real peers from "
            "Debian; `make peers` installs them (apt-get install prometheus victoria-metrics)",
            pytrace=False,
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago; whoever binds it must cope if not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


async def wait_until(
    check: Callable[[], Awaitable[tuple[bool, Any]]], *, what: str, timeout_s: float
) -> Any:
    """Call `check()` every POLL_INTERVAL_S until it returns (True, observed); return observed.

    Bounded in time and in count; on timeout the test fails with the last observation.
    """
    deadline = trio.current_time() + timeout_s
    observed: Any = None
    for _ in range(math.ceil(timeout_s / POLL_INTERVAL_S) + 1):
        done, observed = await check()
        if done:
            return observed
        if trio.current_time() >= deadline:
            break
        await trio.sleep(POLL_INTERVAL_S)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}; last seen: {observed!r}")


# ---- Prometheus text exposition, as peers report their own metrics ----------------------------


class Exposition:
    """The samples of one /metrics page; `value()` sums the samples that match."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def values(self, name: str, **match: str) -> list[float]:
        return [
            v
            for n, lbls, v in self.samples
            if n == name and all(lbls.get(k) == want for k, want in match.items())
        ]

    def value(self, name: str, **match: str) -> float:
        """The sum of every sample of `name` whose labels include `match`; fails if none does."""
        found = self.values(name, **match)
        assert found, f"no sample {name}{match or ''} in the exposition"
        return math.fsum(found)


async def scrape(client: httpx.AsyncClient, url: str) -> Exposition:
    resp = await client.get(url)
    assert resp.status_code == 200, (url, resp.status_code, resp.text[:200])
    return Exposition(resp.text)


# ---- the scrape target ------------------------------------------------------------------------


def _target_series() -> dict[Labels, float]:
    """200 series over 4 metric names, several labels each; values are exact in binary and in
    the decimal form victoria-metrics stores, so they must arrive unchanged."""
    regions = ["eu-west", "us-east", "ap-south", "sa-east", "af-north"]
    # Label values that exercise escaping on the way through every hop.
    paths = ["/api/v1/items", "with space", 'quote "q"', "back\\slash", "new\nline"]
    paths += ["ünïcödé ✓", "a=b,c=d", "{braces}", "tab\there", "/"]
    out: dict[Labels, float] = {}
    for r, region in enumerate(regions):
        for h in range(10):
            host = f"host-{h:02d}"
            base = r * 10 + h
            out[labels(__name__="e2e_http_requests_total", region=region, host=host,
                       code=("200", "404", "503")[h % 3])] = 1000.0 + base + 0.5  # fmt: skip
            out[labels(__name__="e2e_queue_depth", region=region, host=host,
                       queue=f"q-{h % 4}", shard=str(r))] = float(base)  # fmt: skip
            out[labels(__name__="e2e_temperature_celsius", region=region, host=host,
                       sensor="cpu" if h % 2 else "board")] = -(base + 0.25)  # fmt: skip
            out[labels(__name__="e2e_request_path_info", region=region, host=host,
                       path=paths[h])] = 2.0**40 + base  # fmt: skip
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_exposition(series: Mapping[Labels, float]) -> bytes:
    """The Prometheus text format (0.0.4) of `series`, one family after another."""
    by_name: dict[str, list[str]] = {}
    for lbls, value in series.items():
        d = dict(lbls)
        name = d.pop("__name__")
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(d.items()))
        by_name.setdefault(name, []).append(f"{name}{{{inner}}} {value!r}")
    lines = []
    for name, rows in by_name.items():
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# HELP {name} End-to-end test series.", f"# TYPE {name} {kind}", *sorted(rows)]
    return ("\n".join(lines) + "\n").encode()


TARGET_SERIES = _target_series()
assert len(TARGET_SERIES) == 200


class ScrapeTarget:
    """Serves TARGET_SERIES at GET /metrics (HTTP/1.1, one request per connection) and counts
    the scrapes it answered."""

    def __init__(self) -> None:
        self.series = TARGET_SERIES
        body = render_exposition(self.series)
        self._response = (
            b"HTTP/1.1 200 OK\r\n"
            b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.scrapes = 0
        self.port = 0

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the port it bound on 127.0.0.1."""
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, self._handle, 0, host=LOCALHOST)
            )
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self.port)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(10):
                head = b""
                # Bounded: every pass adds at least one byte, and a request head is small.
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    try:
                        chunk = await stream.receive_some(4096)
                    except trio.BrokenResourceError:
                        return
                    if not chunk:
                        return
                    head += chunk
                request = head.split(b"\r\n", 1)[0].split()
                ok = len(request) == 3 and request[0] == b"GET"
                if ok and request[1].split(b"?", 1)[0] == b"/metrics":
                    self.scrapes += 1
                    response = self._response
                else:
                    response = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
                try:
                    await stream.send_all(response)
                except trio.BrokenResourceError:
                    return


# ---- what a scraper of the target delivers ----------------------------------------------------

JOB = "e2e"
# The series Prometheus 2.42 adds to every scrape (scrape_timeout_seconds only behind a flag).
PROMETHEUS_SCRAPE_SERIES = (
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
)


def expected_scraped_series(target: ScrapeTarget, extra_names: tuple[str, ...]) -> set[Labels]:
    """The target's series with job and instance, plus the series the scraper adds itself."""
    instance = target.address
    series = {with_labels(s, job=JOB, instance=instance) for s in target.series}
    series |= {labels(__name__=name, job=JOB, instance=instance) for name in extra_names}
    return series


def assert_scraped_values(stored: Samples, target: ScrapeTarget) -> None:
    """Every stored sample of a target series has the value the target served; every scrape
    was a success that scraped all 200 series; every series has one sample per scrape."""
    served = {with_labels(s, job=JOB, instance=target.address): v for s, v in target.series.items()}
    for series, samples in stored.items():
        values = {v for _, v in samples}
        name = dict(series)["__name__"]
        if series in served:
            assert values == {served[series]}, dict(series)
        elif name == "up":
            assert values == {1.0}
        elif name == "scrape_samples_scraped":
            assert values == {float(len(target.series))}
    per_series = {len(samples) for samples in stored.values()}
    assert len(per_series) == 1, f"series hold different numbers of samples: {per_series}"


# ---- running a third-party peer ---------------------------------------------------------------


class Peer:
    """A running third-party server: its process, its port on 127.0.0.1 and its log file."""

    def __init__(self, name: str, process: trio.Process, port: int, log_path: Path) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.log_path = log_path

    def url(self, path: str = "") -> str:
        return f"http://{LOCALHOST}:{self.port}{path}"

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def listens(self) -> bool:
        """Whether this process (not some other one) listens on its port."""
        try:
            conns = psutil.Process(self.process.pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns)

    def _failed_to_bind(self) -> bool:
        return "address already in use" in self.log_tail(200).lower()

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Send `signum` and wait for the exit; returns the exit code, fails if it hangs."""
        self.process.send_signal(signum)
        with trio.move_on_after(STOP_TIMEOUT_S):
            return await self.process.wait()
        pytest.fail(
            f"{self.name} did not exit within {STOP_TIMEOUT_S} s of {signum.name}:\n"
            + self.log_tail()
        )

    async def kill(self) -> None:
        """Kill the process if it still runs and reap it (safe to call in any state)."""
        if self.process.returncode is None:
            self.process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT_S):
            await self.process.wait()

    def __repr__(self) -> str:
        return f"<Peer {self.name} pid={self.process.pid} port={self.port}>"


@asynccontextmanager
async def start_peer(
    name: str,
    command: Callable[[int, Path], list[str]],
    *,
    client: httpx.AsyncClient,
    workdir: Path,
    ready_path: str,
    port: int | None = None,
) -> AsyncIterator[Peer]:
    """Run `command(port, rundir)` and yield once GET `ready_path` answers 200; kill it on exit.

    With `port=None` a free port is picked, and picked again (up to BIND_ATTEMPTS times) when the
    peer exits because another process took it first. Output goes to `rundir/<name>.log`.
    """
    for attempt in range(1, BIND_ATTEMPTS + 1):
        p = free_port() if port is None else port
        rundir = workdir / f"run{attempt}"
        rundir.mkdir(parents=True)
        log_path = rundir / f"{name}.log"
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                command(p, rundir),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        peer = Peer(name, process, p, log_path)
        try:

            async def ready(peer: Peer = peer) -> tuple[bool, str]:
                if peer.process.returncode is not None:
                    return True, "exited"
                try:
                    resp = await client.get(peer.url(ready_path), timeout=2.0)
                except httpx.TransportError as e:
                    return False, repr(e)
                if resp.status_code != 200:
                    return False, f"{resp.status_code} {resp.text[:100]!r}"
                # The answer may come from another server that took the port first.
                return peer.listens(), "answered, but not by this process"

            state = await wait_until(
                ready, what=f"{name} to answer {ready_path}", timeout_s=START_TIMEOUT_S
            )
            if state != "exited":
                yield peer
                return
        finally:
            await peer.kill()
        if port is not None or not peer._failed_to_bind():
            pytest.fail(
                f"{name} exited with code {peer.process.returncode} while starting on port "
                f"{p}:\n{peer.log_tail()}"
            )
    pytest.fail(f"{name} found no free port in {BIND_ATTEMPTS} attempts")


# ---- victoria-metrics -------------------------------------------------------------------------


class VictoriaMetrics:
    """A victoria-metrics single-node server: the backend governor forwards to."""

    def __init__(self, peer: Peer, client: httpx.AsyncClient) -> None:
        self.peer = peer
        self.client = client

    @property
    def write_url(self) -> str:
        return self.peer.url("/api/v1/write")

    async def export(self, match: str = '{__name__!=""}') -> Samples:
        """Every raw sample of the series matching `match`, after a flush makes all visible.

        Lists keep duplicates: a sample delivered twice shows up twice."""
        resp = await self.client.get(self.peer.url("/internal/force_flush"))
        assert resp.status_code == 200, resp.text
        # Without `end` the export stops at victoria-metrics's coarse clock, which can lag the
        # newest samples by a second or so.
        params = {"match[]": match, "start": "0", "end": str(int(time.time()) + 86400)}
        resp = await self.client.get(self.peer.url("/api/v1/export"), params=params)
        assert resp.status_code == 200, resp.text
        out: Samples = {}
        for line in resp.text.splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            key = frozenset(row["metric"].items())
            pairs = zip(row["timestamps"], (float(v) for v in row["values"]), strict=True)
            out.setdefault(key, []).extend(pairs)
        for samples in out.values():
            samples.sort()
        return out

    async def metrics(self) -> Exposition:
        return await scrape(self.client, self.peer.url("/metrics"))


@asynccontextmanager
async def start_victoria_metrics(
    client: httpx.AsyncClient, workdir: Path, *, port: int | None = None
) -> AsyncIterator[VictoriaMetrics]:
    """victoria-metrics on 127.0.0.1 (on `port` if given), data under `workdir`."""
    binary = require_binary("victoria-metrics")

    def command(p: int, rundir: Path) -> list[str]:
        return [
            binary,
            f"-storageDataPath={rundir / 'data'}",
            f"-httpListenAddr={LOCALHOST}:{p}",
            "-search.latencyOffset=0s",  # samples are searchable at once, not 30 s later
            "-loggerLevel=ERROR",
        ]

    async with start_peer(
        "victoria-metrics",
        command,
        client=client,
        workdir=workdir,
        ready_path="/health",
        port=port,
    ) as peer:
        yield VictoriaMetrics(peer, client)


# ---- Prometheus -------------------------------------------------------------------------------


def prometheus_config(target: str, job: str, remote_write_url: str | None) -> dict[str, Any]:
    """Scrape `target` every second as `job` (no job without a target) and remote-write to
    `remote_write_url` in batches of at most 500 samples, at least once a second."""
    cfg: dict[str, Any] = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}}
    if target:
        cfg["scrape_configs"] = [{"job_name": job, "static_configs": [{"targets": [target]}]}]
    if remote_write_url:
        cfg["remote_write"] = [
            {
                "url": remote_write_url,
                "queue_config": {"batch_send_deadline": "1s", "max_samples_per_send": 500},
            }
        ]
    return cfg


class Prometheus:
    """A Prometheus server started with --web.enable-lifecycle so its config can be reloaded."""

    def __init__(self, peer: Peer, client: httpx.AsyncClient, config_path: Path) -> None:
        self.peer = peer
        self.client = client
        self.config_path = config_path

    async def reload(self, config: dict[str, Any]) -> None:
        """Apply `config`; Prometheus has stopped removed scrape jobs when this returns."""
        await trio.Path(self.config_path).write_text(yaml.safe_dump(config))
        resp = await self.client.post(self.peer.url("/-/reload"))
        assert resp.status_code == 200, (resp.status_code, resp.text, self.peer.log_tail())

    async def metrics(self) -> Exposition:
        return await scrape(self.client, self.peer.url("/metrics"))

    async def _api(self, path: str, params: dict[str, str]) -> Any:
        resp = await self.client.get(self.peer.url(path), params=params)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", body
        return body["data"]

    async def series(self, match: str) -> set[Labels]:
        """The series in Prometheus's TSDB that match `match`."""
        data = await self._api("/api/v1/series", {"match[]": match})
        return {frozenset(s.items()) for s in data}

    async def samples(self, selector: str, window: str = "1h") -> Samples:
        """Every raw sample in the TSDB of the series matching `selector` over the last `window`."""
        data = await self._api("/api/v1/query", {"query": f"{selector}[{window}]"})
        assert data["resultType"] == "matrix", data["resultType"]
        return {
            frozenset(s["metric"].items()): sorted(
                (round(float(t) * 1000), float(v)) for t, v in s["values"]
            )
            for s in data["result"]
        }


@asynccontextmanager
async def start_prometheus(
    client: httpx.AsyncClient, workdir: Path, config: dict[str, Any]
) -> AsyncIterator[Prometheus]:
    """Prometheus on a free 127.0.0.1 port with `config`, its TSDB under `workdir`."""
    binary = require_binary("prometheus")
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    await trio.Path(config_path).write_text(yaml.safe_dump(config))

    def command(p: int, rundir: Path) -> list[str]:
        return [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={rundir / 'tsdb'}",
            f"--web.listen-address={LOCALHOST}:{p}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    async with start_peer(
        "prometheus", command, client=client, workdir=workdir, ready_path="/-/ready"
    ) as peer:
        yield Prometheus(peer, client, config_path)


# ---- vmagent ----------------------------------------------------------------------------------


def vmagent_scrape_config(target: str, job: str) -> dict[str, Any]:
    """Scrape `target` every second as `job`; no job at all without a target."""
    jobs = [{"job_name": job, "scrape_interval": "1s", "static_configs": [{"targets": [target]}]}]
    return {"scrape_configs": jobs if target else []}


class VMAgent:
    """A vmagent scraping per a -promscrape.config file it re-reads on SIGHUP."""

    def __init__(self, peer: Peer, client: httpx.AsyncClient, config_path: Path) -> None:
        self.peer = peer
        self.client = client
        self.config_path = config_path

    async def reload(self, config: dict[str, Any]) -> None:
        """Write `config` and ask vmagent to re-read it (it does so asynchronously)."""
        await trio.Path(self.config_path).write_text(yaml.safe_dump(config))
        self.peer.process.send_signal(signal.SIGHUP)

    async def metrics(self) -> Exposition:
        return await scrape(self.client, self.peer.url("/metrics"))


@asynccontextmanager
async def start_vmagent(
    client: httpx.AsyncClient, workdir: Path, config: dict[str, Any], remote_write_url: str
) -> AsyncIterator[VMAgent]:
    """vmagent on a free 127.0.0.1 port scraping per `config` and writing to `remote_write_url`."""
    binary = require_binary("vmagent")
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    config_path = workdir / "scrape.yml"
    await trio.Path(config_path).write_text(yaml.safe_dump(config))

    def command(p: int, rundir: Path) -> list[str]:
        return [
            binary,
            f"-promscrape.config={config_path}",
            f"-remoteWrite.url={remote_write_url}",
            f"-remoteWrite.tmpDataPath={rundir / 'queue'}",
            f"-httpListenAddr={LOCALHOST}:{p}",
            "-remoteWrite.flushInterval=1s",
            # Stale markers on reload would add samples at a moment the test does not control.
            "-promscrape.noStaleMarkers",
            "-loggerLevel=ERROR",
        ]

    async with start_peer(
        "vmagent", command, client=client, workdir=workdir, ready_path="/health"
    ) as peer:
        yield VMAgent(peer, client, config_path)


# ---- governor, in-process ---------------------------------------------------------------------


def governor_config(export_url: str, **exporter: Any) -> Config:
    """governor on 127.0.0.1:0 forwarding to `export_url`; `exporter` overrides exporter keys."""
    return config_from_dict(
        {
            "telemetry": {"listen": f"{LOCALHOST}:0"},
            "shutdown_grace_s": 10.0,
            "prw": {
                "receiver": {"listen": f"{LOCALHOST}:0"},
                "batch": {"interval_s": 0.1},
                "exporters": [{"url": export_url, "timeout_s": 10.0, **exporter}],
            },
        }
    )


class InProcessGovernor:
    """`App` run in the caller's nursery: `await gov.start(nursery)`, then `await gov.stop()`
    runs the two-phase shutdown and waits for it to finish."""

    def __init__(self, cfg: Config) -> None:
        self.app = App(cfg)
        self.addrs: Addresses | None = None
        self._stopped = trio.Event()

    async def start(self, nursery: trio.Nursery) -> Addresses:
        self.addrs = await nursery.start(self._run)
        return self.addrs

    async def _run(self, *, task_status: trio.TaskStatus[Addresses]) -> None:
        try:
            await self.app.run(task_status=task_status)
        finally:
            self._stopped.set()

    @property
    def write_url(self) -> str:
        assert self.addrs is not None
        host, port = self.addrs.prw
        return f"http://{host}:{port}/api/v1/write"

    def telemetry_url(self, path: str) -> str:
        assert self.addrs is not None
        host, port = self.addrs.telemetry
        return f"http://{host}:{port}{path}"

    def sample(self, name: str, **match: str) -> float:
        """A metric's current value from the registry /metrics renders; 0 when never set."""
        value = self.app.metrics.registry.get_sample_value(name, match)
        return 0.0 if value is None else value

    async def stop(self) -> ShutdownReport:
        """Phase one of shutdown; waits for the drain (bounded by shutdown_grace_s)."""
        self.app.shutdown()
        with trio.fail_after(self.app.cfg.shutdown_grace_s + STOP_TIMEOUT_S):
            await self._stopped.wait()
        assert self.app.report is not None
        return self.app.report
