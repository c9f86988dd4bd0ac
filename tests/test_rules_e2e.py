"""Rules end to end: a rules file changes what reaches real backends, on both pipelines; reloads
(App.reload_rules, and SIGHUP to a governor process) swap rule sets while data flows; dead rules
are reported on /metrics and in the log.

Time is real (sockets, peers, subprocesses): every wait is a condition polled with a deadline.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import yaml
from google.protobuf import text_format
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GRPCMetricExporter,
)
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from service._proto.prometheus.remote_pb2 import WriteRequest
from service.app import Addresses, App
from service.config import Config, RulesConfig
from service.governance.engine import _hash_fraction, _series_key
from service.receivers.http import hypercorn_config, serve_http
from tests.otlp_peers import GRPCBackend, Request, otlp_config, running_otlp_governor
from tests.otlp_peers import wait_until as otlp_wait_until
from tests.peers import (
    JOB,
    PROMETHEUS_SCRAPE_SERIES,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Exposition,
    InProcessGovernor,
    Prometheus,
    Samples,
    ScrapeTarget,
    VictoriaMetrics,
    expected_scraped_series,
    governor_config,
    labels,
    prometheus_config,
    scrape,
    start_prometheus,
    start_victoria_metrics,
    wait_until,
)
from tests.test_receiver_prw import (
    DEADLINE_S,
    PRW_HEADERS,
    RecordingBackend,
    Running,
    make_config,
    snappy,
)
from tests.test_receiver_prw import wait_until as wait_until_true

FLOW_TIMEOUT_S = 40.0  # Prometheus replays its WAL for about 5 s before the first remote write
DRAIN_TIMEOUT_S = 20.0
MIN_SCRAPES = 5
SDK_TIMEOUT_S = 10.0
REPO = Path(__file__).resolve().parents[1]


def write_rules(path: Path, rules: list[dict[str, Any]], **top: Any) -> Path:
    path.write_text(yaml.safe_dump({**top, "rules": rules}, sort_keys=False))
    return path


# ---- 1. remote write: Prometheus -> governor (rules) -> victoria-metrics ------------------------

PRW_RULES = [
    {"name": "drop-path-info", "match": {"name": "e2e_request_path_info"}, "action": "drop"},
    {
        "name": "tag-eu-temperature",
        "match": {
            "name": "e2e_temperature_celsius",
            "labels": [{"label": "region", "equals": "eu-west"}],
        },
        "action": "transform",
        "transform": [
            {"op": "set", "label": "zone", "value": "z-${host}"},
            {"op": "rename", "source": "sensor", "label": "probe"},
        ],
    },
    {
        "name": "classify-codes",
        "match": {"name": "e2e_http_requests_total"},
        "action": "classify",
        "classify": {
            "tables": [
                {
                    "source": "code",
                    "target": "class",
                    "values": {"200": "ok", "404": "client"},
                    "default": "server",
                }
            ]
        },
    },
    {
        "name": "sample-requests",
        "match": {"name": "e2e_http_requests_total"},
        "action": "sample",
        "sample": {"method": "hash", "rate": 0.5},
    },
    {
        "name": "queue-by-region",
        "match": {"name": "e2e_queue_depth"},
        "action": "aggregate",
        "aggregate": {"interval": "2s", "by": ["region"], "functions": ["sum"]},
    },
]
AGG_INTERVAL_MS = 2000
CLASS = {"200": "ok", "404": "client"}


def region_sums(prom: Samples) -> Samples:
    """The queue-by-region aggregate of the e2e_queue_depth samples in `prom`: per region and
    2 s window (by sample timestamp), the sum, stamped with the window's end."""
    sums: dict[tuple[str, int], float] = {}
    for series, samples in prom.items():
        d = dict(series)
        if d["__name__"] != "e2e_queue_depth":
            continue
        for ts, value in samples:
            key = (d["region"], ts - ts % AGG_INTERVAL_MS + AGG_INTERVAL_MS)
            sums[key] = sums.get(key, 0.0) + value
    out: Samples = {}
    for (region, end), total in sorted(sums.items()):
        out.setdefault(labels(__name__="e2e_queue_depth:sum", region=region), []).append(
            (end, total)
        )
    return out


def expected_prw(prom: Samples) -> Samples:
    """What victoria-metrics must hold after PRW_RULES, derived by hand from what Prometheus
    scraped (its TSDB): the rules applied one by one, the hash sample decided by the engine's
    own hash of the classified series."""
    out = region_sums(prom)
    for series, samples in prom.items():
        d = dict(series)
        name = d["__name__"]
        if name in ("e2e_request_path_info", "e2e_queue_depth"):
            continue
        if name == "e2e_temperature_celsius" and d["region"] == "eu-west":
            d["zone"] = "z-" + d["host"]
            d["probe"] = d.pop("sensor")
        if name == "e2e_http_requests_total":
            d["class"] = CLASS.get(d["code"], "server")
            rest = {k: v for k, v in d.items() if k != "__name__"}
            if not _hash_fraction(_series_key(name, rest, None)) < 0.5:
                continue
        out[frozenset(d.items())] = samples
    return out


async def wait_for_flow(prom: Prometheus, targets: list[ScrapeTarget]) -> None:
    """Until each target was scraped MIN_SCRAPES times and Prometheus remote-wrote something."""

    async def flowing() -> tuple[bool, Any]:
        sent = (await prom.metrics()).value("prometheus_remote_storage_samples_total")
        scrapes = [t.scrapes for t in targets]
        return min(scrapes) >= MIN_SCRAPES and sent > 0, {"scrapes": scrapes, "sent": sent}

    await wait_until(flowing, what="scrapes and remote writes", timeout_s=FLOW_TIMEOUT_S)


async def wait_for_all_sent(prom: Prometheus) -> None:
    """Until Prometheus has sent every sample it appended (call once nothing is scraped)."""

    async def all_sent() -> tuple[bool, Any]:
        m = await prom.metrics()
        seen = {
            "appended": m.value("prometheus_tsdb_head_samples_appended_total"),
            "sent": m.value("prometheus_remote_storage_samples_total"),
            "pending": m.value("prometheus_remote_storage_samples_pending"),
        }
        return seen["sent"] == seen["appended"] and seen["pending"] == 0, seen

    await wait_until(all_sent, what="Prometheus to send all", timeout_s=DRAIN_TIMEOUT_S)


@pytest.mark.peers
async def test_prw_rules_shape_what_victoria_metrics_stores(
    tmp_path: Path, peer_client: httpx.AsyncClient, scrape_target: ScrapeTarget
) -> None:
    """Prometheus scrapes 200 series and remote-writes through governor, which runs a rules file,
    to victoria-metrics. victoria-metrics then holds exactly: no series of the dropped metric;
    the transform's new and renamed labels on the eu-west temperatures only; the classify label
    on every request counter that the hash sample kept, and exactly the counters whose hash is
    below the rate; for the queue depths only the aggregate, one series per region with the sum
    of each 2 s window; everything else as Prometheus scraped it, sample for sample."""
    client = peer_client
    rules = write_rules(tmp_path / "rules.yaml", PRW_RULES)
    async with (
        start_victoria_metrics(client, tmp_path / "vm") as vm,
        trio.open_nursery() as nursery,
    ):
        cfg = attrs.evolve(governor_config(vm.write_url), rules=RulesConfig(file=str(rules)))
        gov = InProcessGovernor(cfg)
        await gov.start(nursery)
        prom_cfg = prometheus_config(scrape_target.address, JOB, gov.write_url)
        async with start_prometheus(client, tmp_path / "prometheus", prom_cfg) as prom:
            await wait_for_flow(prom, [scrape_target])
            await prom.reload(prometheus_config("", JOB, gov.write_url))
            await wait_for_all_sent(prom)
            prom_samples = await prom.samples(f'{{job="{JOB}"}}')
        # Shutdown emits the aggregate's open windows.
        report = await gov.stop()
        stored = await vm.export()

    assert report.clean
    scraped = expected_scraped_series(scrape_target, PROMETHEUS_SCRAPE_SERIES)
    assert set(prom_samples) == scraped
    expected = expected_prw(prom_samples)
    assert set(stored) == set(expected)
    assert stored == expected
    kept = {s for s in stored if dict(s)["__name__"] == "e2e_http_requests_total"}
    assert 0 < len(kept) < 50  # the hash sample kept some, not all

    def points(name: str, **match: str) -> int:
        return sum(
            len(samples)
            for series, samples in prom_samples.items()
            if dict(series)["__name__"] == name and match.items() <= dict(series).items()
        )

    def rule(counter: str, name: str) -> float:
        return gov.sample(f"governor_rule_{counter}_datapoints_total", pipeline="prw", rule=name)

    requests = points("e2e_http_requests_total")
    requests_kept = sum(len(stored[s]) for s in kept)
    windows = sum(len(v) for s, v in stored.items() if dict(s)["__name__"].endswith(":sum"))
    assert rule("input", "drop-path-info") == rule("dropped", "drop-path-info")
    assert rule("dropped", "drop-path-info") == points("e2e_request_path_info") > 0
    assert rule("input", "tag-eu-temperature") == rule("output", "tag-eu-temperature")
    assert rule("output", "tag-eu-temperature") == points(
        "e2e_temperature_celsius", region="eu-west"
    )
    assert rule("input", "classify-codes") == rule("output", "classify-codes") == requests
    assert rule("input", "sample-requests") == requests
    assert rule("output", "sample-requests") == requests_kept
    assert rule("dropped", "sample-requests") == requests - requests_kept
    assert rule("input", "queue-by-region") == points("e2e_queue_depth")
    assert rule("output", "queue-by-region") == windows


async def staleness_markers(vm: VictoriaMetrics, match: str) -> int:
    """The staleness markers victoria-metrics holds for `match` (its export shows them as null;
    call after `vm.export`, which flushes)."""
    params = {"match[]": match, "start": "0", "end": str(int(time.time()) + 86400)}
    resp = await vm.client.get(vm.peer.url("/api/v1/export"), params=params)
    assert resp.status_code == 200, resp.text
    rows = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
    return sum(row["values"].count(None) for row in rows)


@pytest.mark.peers
async def test_prw_aggregate_ignores_staleness_markers_of_a_target_that_goes_away(
    tmp_path: Path,
    peer_client: httpx.AsyncClient,
    scrape_target: ScrapeTarget,
    nursery: trio.Nursery,
) -> None:
    """Prometheus scrapes two targets (the same series, two instances) and remote-writes through
    governor, which sums the queue depths of both per region in 2 s windows. Then one target
    leaves the scrape config: Prometheus writes a staleness marker (a special NaN, not a value)
    for each of its series. A staleness marker says "no sample"; the sum of a window is the sum
    of the samples Prometheus scraped in it (its TSDB), a number in every window, as when
    Prometheus itself or vmagent's stream aggregation aggregates."""
    client = peer_client
    other = ScrapeTarget()
    await nursery.start(other.serve)
    rules = write_rules(tmp_path / "rules.yaml", [PRW_RULES[-1]])
    assert PRW_RULES[-1]["name"] == "queue-by-region"

    def prom_config(targets: list[ScrapeTarget], write_url: str) -> dict[str, Any]:
        cfg = prometheus_config("", JOB, write_url)
        if targets:
            static = [{"targets": [t.address for t in targets]}]
            cfg["scrape_configs"] = [{"job_name": JOB, "static_configs": static}]
        return cfg

    async with (
        start_victoria_metrics(client, tmp_path / "vm") as vm,
        trio.open_nursery() as inner,
    ):
        cfg = attrs.evolve(governor_config(vm.write_url), rules=RulesConfig(file=str(rules)))
        gov = InProcessGovernor(cfg)
        await gov.start(inner)
        both = [scrape_target, other]
        async with start_prometheus(
            client, tmp_path / "prometheus", prom_config(both, gov.write_url)
        ) as prom:
            await wait_for_flow(prom, both)
            await prom.reload(prom_config([scrape_target], gov.write_url))
            # Prometheus drops the target when service discovery next reports (up to 5 s), and
            # marks its series stale two scrape intervals later: then `up` of it is gone.
            query = {"query": f'up{{instance="{other.address}"}}'}

            async def marked_stale() -> tuple[bool, Any]:
                resp = await client.get(prom.peer.url("/api/v1/query"), params=query)
                result = resp.json()["data"]["result"]
                return result == [], result

            await wait_until(marked_stale, what="staleness markers", timeout_s=FLOW_TIMEOUT_S)
            await prom.reload(prom_config([], gov.write_url))
            await wait_for_all_sent(prom)
            prom_samples = await prom.samples('{__name__="e2e_queue_depth"}')
        report = await gov.stop()
        stored = await vm.export('{__name__="e2e_queue_depth:sum"}')
        markers = await staleness_markers(vm, f'{{__name__="up",instance="{other.address}"}}')

    assert report.clean
    assert markers == 1  # Prometheus did mark the target that left, and governor passed it on
    instances = {dict(s)["instance"] for s in prom_samples}
    assert instances == {scrape_target.address, other.address}
    expected = region_sums(prom_samples)

    # victoria-metrics stores no NaN sample: a window summed to NaN is a window missing there.
    def ends(samples: list[tuple[int, float]]) -> set[int]:
        return {t for t, _ in samples}

    missing = {
        dict(series)["region"]: sorted(ends(samples) - ends(stored.get(series, [])))
        for series, samples in expected.items()
    }
    assert missing == {dict(series)["region"]: [] for series in expected}
    assert stored == expected


# ---- 2. OTLP: the OpenTelemetry SDK -> governor (rules) -> a gRPC backend ----------------------

OTLP_RULES = [
    {"name": "drop-threads", "match": {"name": r"process\.threads"}, "action": "drop"},
    {
        "name": "route-a",
        "match": {
            "name": r"http\.server\.requests",
            "labels": [{"label": "http.route", "equals": "/a"}],
        },
        "action": "transform",
        "transform": [
            {"op": "set", "label": "tier", "value": "gold-${client}"},
            {"op": "rename", "source": "http.route", "label": "route"},
        ],
    },
    {
        "name": "rename-kitchen",
        "match": {"name": r"room\.temperature"},
        "action": "transform",
        "transform": [
            {
                "op": "rename_metric",
                "value": "legacy.${__name__}",
                "when": [{"label": "room", "equals": "kitchen"}],
            }
        ],
    },
    {
        # Sees the renamed points under their new name, and only those.
        "name": "mark-legacy",
        "match": {"name": r"legacy\..*"},
        "action": "transform",
        "transform": [{"op": "set", "label": "renamed", "value": "yes"}],
    },
    {
        "name": "classify-durations",
        "match": {"name": r"http\.server\.duration"},
        "action": "classify",
        "classify": {
            "chains": [
                {"when": [{"label": "http.route", "regex": "/a|/b"}], "set": {"group": "ab"}},
                {"when": [], "set": {"group": "other"}},
            ]
        },
    },
]

# A datapoint as compared: resource, scope, metric without points (name, unit, kind ...), the
# point without attributes, the attributes sorted (all strings here).
Point = tuple[str, str, str, str, tuple[tuple[str, str], ...]]


def _text(msg: Any) -> str:
    return text_format.MessageToString(msg, as_one_line=True)


def flat_points(requests: Iterable[Request]) -> list[Point]:
    out: list[Point] = []
    for req in requests:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    shell = Metric()
                    shell.CopyFrom(m)
                    getattr(shell, kind).ClearField("data_points")
                    for dp in getattr(m, kind).data_points:
                        bare = type(dp)()
                        bare.CopyFrom(dp)
                        bare.ClearField("attributes")
                        attributes = tuple(
                            sorted((kv.key, kv.value.string_value) for kv in dp.attributes)
                        )
                        where = (_text(rm.resource), _text(sm.scope), _text(shell))
                        out.append((*where, _text(bare), attributes))
    return sorted(out)


def otlp_expected(sent: Iterable[Request]) -> list[Point]:
    """OTLP_RULES applied by hand to what the SDK sent."""
    out: list[Point] = []
    for resource, scope, shell_text, point, attributes in flat_points(sent):
        shell = text_format.Parse(shell_text, Metric())
        a = dict(attributes)
        if shell.name == "process.threads":
            continue
        if shell.name == "http.server.requests" and a.get("http.route") == "/a":
            a["tier"] = "gold-" + a["client"]
            a["route"] = a.pop("http.route")
        if shell.name == "room.temperature" and a.get("room") == "kitchen":
            shell.name = "legacy.room.temperature"  # unit, description and kind stay
            a["renamed"] = "yes"
        if shell.name == "http.server.duration":
            a["group"] = "ab" if a.get("http.route") in ("/a", "/b") else "other"
        out.append((resource, scope, _text(shell), point, tuple(sorted(a.items()))))
    return sorted(out)


class RecordingExporter(MetricExporter):
    """Wraps an SDK exporter: records each export as the SDK's encoder builds it, and the
    result, then delegates."""

    def __init__(self, inner: MetricExporter) -> None:
        # The reader asks its exporter for these: mirror the inner exporter's.
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.sent: list[Request] = []
        self.results: list[MetricExportResult] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.sent.append(encode_metrics(metrics_data))
        result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        self.results.append(result)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class SDKClient:
    """An instrumented process on the OpenTelemetry SDK with the OTLP/gRPC exporter: a counter,
    a gauge, an observable gauge and a histogram. Blocking: run `run()` in a thread."""

    def __init__(self, endpoint: str) -> None:
        self.capture = RecordingExporter(
            GRPCMetricExporter(endpoint=endpoint, insecure=True, timeout=SDK_TIMEOUT_S)
        )
        # One export per force_flush() and one at shutdown(), never one from the timer.
        reader = PeriodicExportingMetricReader(
            self.capture,
            export_interval_millis=600_000,
            export_timeout_millis=SDK_TIMEOUT_S * 1000,
        )
        self.provider = MeterProvider(
            metric_readers=[reader],
            resource=Resource({"service.name": "rules-e2e"}),
            shutdown_on_exit=False,
        )
        meter = self.provider.get_meter("governor.tests.rules", "1.0")
        self.requests = meter.create_counter(
            "http.server.requests", unit="{request}", description="Requests served."
        )
        self.temperature = meter.create_gauge(
            "room.temperature", unit="Cel", description="Room temperature."
        )
        meter.create_observable_gauge("process.threads", callbacks=[self._threads], unit="1")
        self.duration = meter.create_histogram("http.server.duration", unit="ms")

    @staticmethod
    def _threads(options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(7, {"kind": "worker"})

    def run(self) -> None:
        """Record, export (force_flush), record again, shut down (which exports again)."""
        try:
            for client in ("c1", "c2"):
                self.requests.add(3, {"http.route": "/a", "client": client})
                self.requests.add(4, {"http.route": "/b", "client": client})
            self.temperature.set(21.5, {"room": "kitchen"})
            self.temperature.set(18.25, {"room": "hall"})
            self.duration.record(12.5, {"http.route": "/a"})
            self.duration.record(3.0, {"http.route": "/c"})
            assert self.provider.force_flush(SDK_TIMEOUT_S * 1000)
            self.requests.add(1, {"http.route": "/a", "client": "c1"})
            self.temperature.set(22.0, {"room": "kitchen"})
        finally:
            self.provider.shutdown(SDK_TIMEOUT_S * 1000)


async def test_otlp_sdk_rules_shape_what_the_backend_receives(tmp_path: Path) -> None:
    """The OpenTelemetry SDK exports over OTLP/gRPC to governor running a rules file, in front of
    a gRPC backend. The backend receives exactly what the SDK sent with the rules applied: no
    point of the dropped metric; the transformed attributes on the /a request counters only;
    the kitchen temperature under its new name with the original's unit, description and kind
    (and the label of the rule that matches the new name), the hall temperature unchanged; the
    classify label on every histogram point. The rules count what they matched."""
    rules = write_rules(tmp_path / "rules.yaml", OTLP_RULES)

    def config(endpoint: str, protocol: str) -> Config:
        cfg = otlp_config(endpoint, protocol)
        return attrs.evolve(cfg, rules=RulesConfig(file=str(rules)))

    backend = GRPCBackend()
    async with running_otlp_governor(backend, config=config) as gov:
        sdk = SDKClient(gov.grpc_target)
        await trio.to_thread.run_sync(sdk.run)
        expected = otlp_expected(sdk.capture.sent)
        await otlp_wait_until(lambda: backend.datapoints() >= len(expected))
    assert sdk.capture.results == [MetricExportResult.SUCCESS] * 2
    received = flat_points(backend.requests())
    assert received == expected

    metrics = {
        m.name: (m.unit, m.description, m.WhichOneof("data"))
        for m in (text_format.Parse(p[2], Metric()) for p in received)
    }
    assert metrics == {
        "http.server.requests": ("{request}", "Requests served.", "sum"),
        "room.temperature": ("Cel", "Room temperature.", "gauge"),
        "legacy.room.temperature": ("Cel", "Room temperature.", "gauge"),
        "http.server.duration": ("ms", "", "histogram"),
    }
    sent = flat_points(sdk.capture.sent)
    threads = sum(1 for p in sent if '"process.threads"' in p[2])
    route_a = sum(1 for p in sent if ("http.route", "/a") in p[4] and "requests" in p[2])
    kitchen = sum(1 for p in sent if ("room", "kitchen") in p[4])
    assert (threads, route_a, kitchen) == (2, 4, 2)
    rule_input = "governor_rule_input_datapoints_total"
    rule_dropped = "governor_rule_dropped_datapoints_total"
    assert gov.sample(rule_input, pipeline="otlp", rule="drop-threads") == threads
    assert gov.sample(rule_dropped, pipeline="otlp", rule="drop-threads") == threads
    assert gov.sample(rule_input, pipeline="otlp", rule="route-a") == route_a
    assert gov.sample(rule_input, pipeline="otlp", rule="rename-kitchen") == 2 * kitchen
    assert gov.sample(rule_input, pipeline="otlp", rule="mark-legacy") == kitchen


# ---- 3. App.reload_rules while data flows -------------------------------------------------------

STREAM = "stream_value"
SENDERS = 3
SERIES_PER_REQUEST = 2  # stream series per request; one unmatched series rides along
SAMPLES_PER_SERIES = 4
RELOADS = 40
# Every rule set in turn governs at least this many requests sent and answered while in force.
REQUESTS_PER_GENERATION = 3
MAX_REQUESTS_PER_SENDER = 2000  # bounds the stream if the reloads stall
STREAM_DEADLINE_S = 30.0
BASE_MS = 1_700_000_000_000


def version_rules(version: str) -> list[dict[str, Any]]:
    """One transform, the same rule name in both versions (its counts carry over)."""
    return [
        {
            "name": "version",
            "match": {"name": STREAM},
            "action": "transform",
            "transform": [{"op": "set", "label": "version", "value": version}],
        }
    ]


def replace_rules(path: Path, rules: list[dict[str, Any]] | str) -> None:
    """Write the rules file whole (a reader never sees half of it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(rules if isinstance(rules, str) else yaml.safe_dump({"rules": rules}))
    tmp.replace(path)


def numbered_ms(seq: int) -> int:
    """Timestamps that number the samples: request `seq`'s start at BASE_MS + its first number."""
    return BASE_MS + seq * SAMPLES_PER_SERIES


def now_ms(seq: int) -> int:
    return int(time.time() * 1000)


def stream_request(sender: int, seq: int, t0_ms: int) -> WriteRequest:
    """Request `seq` of `sender`: SERIES_PER_REQUEST stream series with SAMPLES_PER_SERIES
    samples each, stamped t0_ms, t0_ms + 1 ..., valued by their offset from BASE_MS; plus one
    series that no rule matches."""
    req = WriteRequest()
    for part in range(SERIES_PER_REQUEST):
        ts = req.timeseries.add()
        ts.labels.add(name="__name__", value=STREAM)
        ts.labels.add(name="part", value=str(part))
        ts.labels.add(name="sender", value=str(sender))
        for j in range(SAMPLES_PER_SERIES):
            ts.samples.add(timestamp=t0_ms + j, value=float(t0_ms + j - BASE_MS))
    other = req.timeseries.add()
    other.labels.add(name="__name__", value="other_value")
    other.labels.add(name="sender", value=str(sender))
    other.samples.add(timestamp=t0_ms, value=float(seq))
    return req


@asynccontextmanager
async def governor_with_rules(rules: Path, *, tick_s: float = 0.5) -> AsyncIterator[Running]:
    """A RecordingBackend and an App in front of it reading `rules`; shut down cleanly on exit."""
    backend = RecordingBackend()
    async with trio.open_nursery() as nursery:
        backend_stop = trio.Event()
        [(host, port)] = await nursery.start(
            serve_http, backend, hypercorn_config("127.0.0.1:0"), backend_stop.wait
        )
        cfg = make_config(f"http://{host}:{port}/api/v1/write")
        app = App(attrs.evolve(cfg, rules=RulesConfig(file=str(rules), tick_s=tick_s)))
        app_done = trio.Event()

        async def run_app(*, task_status: trio.TaskStatus[Addresses]) -> None:
            try:
                await app.run(task_status=task_status)
            finally:
                app_done.set()

        addrs = await nursery.start(run_app)
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
            running = Running(app, addrs, backend, client)
            yield running
        running.shutdown()
        with trio.fail_after(DEADLINE_S):
            await app_done.wait()
        backend_stop.set()


def stream_points(backend: RecordingBackend) -> dict[tuple[str, str, int], list[tuple[str, float]]]:
    """(sender, part, timestamp) -> [(version label, value)] of every stream sample received."""
    out: dict[tuple[str, str, int], list[tuple[str, float]]] = {}
    for lbls, samples in backend.series:
        d = dict(lbls)
        if d["__name__"] != STREAM:
            continue
        for ts, value in samples:
            out.setdefault((d["sender"], d["part"], ts), []).append((d.get("version", ""), value))
    return out


@attrs.define
class Stream:
    """What `stream_while_reloading` did: the version in force in each generation (reload g
    started generation g), and per request (sender, seq, generation before the POST,
    generation after the answer)."""

    versions: list[str]
    sent: list[tuple[int, int, int, int]] = attrs.field(factory=list)
    within: list[int] = attrs.field(factory=lambda: [0])  # requests wholly inside generation g

    def samples(self, sender: int | None = None) -> int:
        """Stream samples sent (by `sender`)."""
        requests = sum(1 for s, _, _, _ in self.sent if sender is None or s == sender)
        return requests * SERIES_PER_REQUEST * SAMPLES_PER_SERIES


async def stream_while_reloading(
    gov: Running,
    path: Path,
    rules_of: Callable[[str], list[dict[str, Any]]],
    *,
    t0_ms: Callable[[int], int],
) -> Stream:
    """SENDERS clients send stream requests without pause (request `seq` stamped from
    `t0_ms(seq)`), while the rules at `path` (version a at the start) are replaced by
    `rules_of(version)` and reloaded RELOADS times, alternating b, a, b ...; each version in turn
    governs at least REQUESTS_PER_GENERATION whole requests."""
    stream = Stream(versions=["a"])
    done = trio.Event()

    async def send(sender: int) -> None:
        for seq in range(MAX_REQUESTS_PER_SENDER):
            if done.is_set():
                return
            before = len(stream.versions) - 1
            resp = await gov.write(stream_request(sender, seq, t0_ms(seq)))
            assert resp.status_code == 204, resp.text
            after = len(stream.versions) - 1
            stream.sent.append((sender, seq, before, after))
            if before == after:
                stream.within[after] += 1
        pytest.fail(f"sender {sender} ran out of requests before the reloads finished")

    async def wait_for_traffic() -> None:
        with trio.fail_after(DEADLINE_S):
            # Counted by the senders' tasks, which have no event to wait on.
            while stream.within[-1] < REQUESTS_PER_GENERATION:  # noqa: ASYNC110
                await trio.sleep(0.001)

    with trio.fail_after(STREAM_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            for sender in range(SENDERS):
                nursery.start_soon(send, sender)
            for i in range(RELOADS):
                await wait_for_traffic()
                version = "b" if i % 2 == 0 else "a"
                replace_rules(path, rules_of(version))
                assert gov.app.reload_rules() is True
                stream.versions.append(version)
                stream.within.append(0)
            await wait_for_traffic()
            done.set()
    return stream


async def test_reloads_while_data_flows_lose_and_double_nothing(tmp_path: Path) -> None:
    """Three clients send uniquely numbered samples without pause while the test reloads the
    rules 40 times, alternating between a file that sets version=a and one that sets version=b.
    Every sample arrives exactly once, with its value, labelled a or b; the series of one request
    all carry the same version (a request is governed by one rule set, never half by each); a
    request sent and answered between two reloads carries the version then in force; the
    unmatched series passes untouched; the rule's counts carry over the reloads."""
    rules = tmp_path / "rules.yaml"
    replace_rules(rules, version_rules("a"))
    async with governor_with_rules(rules) as gov:
        stream = await stream_while_reloading(gov, rules, version_rules, t0_ms=numbered_ms)
        total = stream.samples()
        await wait_until_true(
            lambda: sum(len(v) for v in stream_points(gov.backend).values()) >= total
        )

    points = stream_points(gov.backend)
    expected = {
        (str(sender), str(part), numbered_ms(seq) + j): numbered_ms(seq) + j - BASE_MS
        for sender, seq, _, _ in stream.sent
        for part in range(SERIES_PER_REQUEST)
        for j in range(SAMPLES_PER_SERIES)
    }
    assert set(points) == set(expected)
    doubled = {k: v for k, v in points.items() if len(v) != 1}
    assert doubled == {}
    assert {k: v[0][1] for k, v in points.items()} == expected
    assert {v[0][0] for v in points.values()} == {"a", "b"}
    checked = 0
    for sender, seq, before, after in stream.sent:
        got = {
            points[(str(sender), str(part), numbered_ms(seq) + j)][0][0]
            for part in range(SERIES_PER_REQUEST)
            for j in range(SAMPLES_PER_SERIES)
        }
        assert len(got) == 1, (sender, seq, got)
        assert got <= set(stream.versions[before : after + 1]), (sender, seq, got)
        if before == after:
            checked += 1
    assert checked == sum(stream.within) >= (RELOADS + 1) * REQUESTS_PER_GENERATION
    others = [lbls for lbls, _ in gov.backend.series if dict(lbls)["__name__"] == "other_value"]
    assert len(others) == len(stream.sent)
    assert all("version" not in dict(lbls) for lbls in others)
    assert gov.sample("governor_config_reloads_total", result="success") == RELOADS
    assert gov.sample("governor_config_reloads_total", result="failure") == 0
    assert gov.sample("governor_rule_input_datapoints_total", pipeline="prw", rule="version") == (
        total
    )


def count_rules(version: str) -> list[dict[str, Any]]:
    """An aggregate that counts the stream's samples per sender in 1 m windows; the output name
    differs by version, so every reload changes the rule and flushes its windows."""
    return [
        {
            "name": "count",
            "match": {"name": STREAM},
            "action": "aggregate",
            "aggregate": {
                "interval": "1m",
                "by": ["sender"],
                "functions": ["count"],
                "output_name": f"stream_count_{version}",
            },
        }
    ]


async def test_reloads_while_data_flows_into_an_aggregate_lose_nothing(tmp_path: Path) -> None:
    """As above, with an aggregate rule (count per sender) whose settings change at each of the
    40 reloads: the windows of the replaced rule are emitted (docs/rules.md, Reload), so the
    counts that reach the backend add up, per sender, to exactly the samples sent; none is
    lost between two reloads, none counted twice. Samples are stamped with the current time,
    so none of them is late for its window."""
    rules = tmp_path / "rules.yaml"
    replace_rules(rules, count_rules("a"))
    async with governor_with_rules(rules) as gov:
        stream = await stream_while_reloading(gov, rules, count_rules, t0_ms=now_ms)
    counted: dict[str, float] = {}
    for lbls, samples in gov.backend.series:
        d = dict(lbls)
        if d["__name__"] in ("stream_count_a", "stream_count_b"):
            counted[d["sender"]] = counted.get(d["sender"], 0.0) + sum(v for _, v in samples)
    assert counted == {str(s): stream.samples(s) for s in range(SENDERS)}
    others = [lbls for lbls, _ in gov.backend.series if dict(lbls)["__name__"] == "other_value"]
    assert len(others) == len(stream.sent)


BROKEN_RULES = """
rules:
  - name: version
    match: {name: "stream_(value"}
    action: transform
    transform:
      - {op: set, label: version, value: broken}
  - name: extra
    action: drop
    colour: red
"""


async def test_a_broken_file_keeps_the_old_rules(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload of a file with a bad regex in one rule and an unknown key in another returns
    False and changes nothing: data keeps getting the old label. governor counts one failed
    reload and logs one line per problem, naming the rule and the key. A good file after it
    is taken."""
    caplog.set_level(logging.INFO, logger="governor")
    rules = tmp_path / "rules.yaml"
    replace_rules(rules, version_rules("a"))
    async with governor_with_rules(rules) as gov:

        async def version_of(seq: int) -> set[str]:
            assert (await gov.write(stream_request(0, seq, numbered_ms(seq)))).status_code == 204
            ts = numbered_ms(seq)
            await wait_until_true(lambda: ("0", "0", ts) in stream_points(gov.backend))
            return {
                points[0][0]
                for (_, _, t), points in stream_points(gov.backend).items()
                if ts <= t < ts + SAMPLES_PER_SERIES
            }

        assert await version_of(0) == {"a"}
        caplog.clear()
        replace_rules(rules, BROKEN_RULES)
        assert gov.app.reload_rules() is False
        refused = [r for r in caplog.records if r.getMessage() == "rules reload refused"]
        failed = [r for r in caplog.records if r.getMessage().startswith("rules reload failed")]
        assert await version_of(1) == {"a"}
        assert gov.sample("governor_config_reloads_total", result="failure") == 1
        assert gov.sample("governor_config_reloads_total", result="success") == 0

        replace_rules(rules, version_rules("b"))
        assert gov.app.reload_rules() is True
        assert await version_of(2) == {"b"}
        assert gov.sample("governor_config_reloads_total", result="failure") == 1
        assert gov.sample("governor_config_reloads_total", result="success") == 1

    problems = sorted(r.fields["problem"] for r in refused)  # type: ignore[attr-defined]
    assert len(problems) == 2, problems
    assert problems[0].startswith("rules[0] (version).match.name: bad regex 'stream_(value'")
    assert problems[1] == "rules[1] (extra).colour: unknown key"
    assert all(r.levelno == logging.ERROR for r in refused)
    assert [r.fields["problems"] for r in failed] == [2]  # type: ignore[attr-defined]


# ---- 4. SIGHUP to a governor process ------------------------------------------------------------


class LogLines:
    """A process's stderr, line by line; `started` is set at the "governor started" record."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.started = trio.Event()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def text(self) -> str:
        return "\n".join(self.lines)

    async def read(self, stream: trio.abc.ReceiveStream) -> None:
        """Read until EOF (the process exited)."""
        buf = b""
        async for chunk in stream:
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if '"governor started"' in line:
                    self.started.set()


@asynccontextmanager
async def governor_process(
    argv: list[str], log: LogLines, **popen: Any
) -> AsyncIterator[tuple[trio.Process, dict[str, Any]]]:
    """A governor process run as `argv`, its stderr read into `log`: yields the process and
    its "governor started" log record once it logged it (the test fails if it did not within
    START_TIMEOUT_S). A process still running at the exit is killed, and waited for."""
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen
    )
    try:
        async with trio.open_nursery() as inner:
            assert process.stderr is not None
            inner.start_soon(log.read, process.stderr)
            with trio.move_on_after(START_TIMEOUT_S):
                await log.started.wait()
            if not log.started.is_set():
                pytest.fail("governor did not log 'governor started':\n" + log.text())
            yield process, next(r for r in log.records() if r["msg"] == "governor started")
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT_S):
            await process.wait()


def sighup_rules(*, with_new: bool) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [
        {
            "name": "old-rule",
            "match": {"name": "old_metric"},
            "action": "transform",
            "transform": [{"op": "set", "label": "seen_by", "value": "old-rule"}],
        }
    ]
    if with_new:
        rules.append({"name": "new-rule", "match": {"name": "new_metric"}, "action": "drop"})
    return rules


def two_metrics(seq: int) -> WriteRequest:
    """old_metric with one sample and new_metric with three, timestamps after `seq`."""
    req = WriteRequest()
    for name, n in (("old_metric", 1), ("new_metric", 3)):
        ts = req.timeseries.add()
        ts.labels.add(name="__name__", value=name)
        for j in range(n):
            ts.samples.add(timestamp=BASE_MS + seq * 10 + j, value=float(j))
    return req


async def test_sighup_reloads_the_rules_of_a_running_process(
    tmp_path: Path, peer_client: httpx.AsyncClient, nursery: trio.Nursery
) -> None:
    """governor as a process: after the rules file gains a rule and SIGHUP, /metrics counts one
    successful reload and lists the new rule, which then drops what it matches. After a broken
    file and SIGHUP, /metrics counts one failed reload, the old rules are still listed and still
    apply, and the process keeps serving until SIGTERM, when it exits with 0."""
    client = peer_client
    backend = RecordingBackend()
    backend_stop = trio.Event()
    [(host, port)] = await nursery.start(
        serve_http, backend, hypercorn_config("127.0.0.1:0"), backend_stop.wait
    )
    rules = tmp_path / "rules.yaml"
    replace_rules(rules, sighup_rules(with_new=False))
    config_path = tmp_path / "governor.yaml"
    config = {
        "log": {"level": "info", "format": "json"},
        "telemetry": {"listen": "127.0.0.1:0"},
        "shutdown_grace_s": 5.0,
        "rules": {"file": str(rules), "tick_s": 0.1},
        "prw": {
            "receiver": {"listen": "127.0.0.1:0"},
            "batch": {"interval_s": 0.01},
            "exporters": [{"url": f"http://{host}:{port}/api/v1/write", "name": "backend"}],
        },
    }
    config_path.write_text(yaml.safe_dump(config))
    log = LogLines()
    argv = [sys.executable, "-m", "service", "--config", str(config_path)]
    try:
        async with governor_process(argv, log, cwd=REPO) as (process, started):
            metrics_url = f"http://{started['telemetry']}/metrics"
            write_url = f"http://{started['prw']}/api/v1/write"

            async def write(seq: int) -> None:
                resp = await client.post(
                    write_url,
                    content=snappy(two_metrics(seq).SerializeToString()),
                    headers=PRW_HEADERS,
                )
                assert resp.status_code == 204, resp.text

            def rule_names(m: Exposition) -> set[str]:
                return {
                    labels["rule"]
                    for name, labels, _ in m.samples
                    if name == "governor_rule_input_datapoints_total"
                }

            before = await scrape(client, metrics_url)
            assert rule_names(before) == {"old-rule"}
            assert before.values("governor_config_reloads_total") == []

            replace_rules(rules, sighup_rules(with_new=True))
            process.send_signal(signal.SIGHUP)

            async def reloads(result: str) -> tuple[bool, Any]:
                m = await scrape(client, metrics_url)
                return m.values("governor_config_reloads_total", result=result) == [1.0], m

            after = await wait_until(
                lambda: reloads("success"), what="a successful reload", timeout_s=10.0
            )
            assert rule_names(after) == {"old-rule", "new-rule"}
            await write(1)
            await backend.wait_for(lambda: len(backend.series) >= 1)

            async def new_rule_input(n: float) -> tuple[bool, Any]:
                m = await scrape(client, metrics_url)
                rule = {"pipeline": "prw", "rule": "new-rule"}
                got = m.value("governor_rule_input_datapoints_total", **rule)
                return got == n, m

            m = await wait_until(lambda: new_rule_input(3), what="new-rule input", timeout_s=5.0)
            assert m.value("governor_rule_dropped_datapoints_total", rule="new-rule") == 3

            replace_rules(rules, BROKEN_RULES)
            process.send_signal(signal.SIGHUP)
            broken = await wait_until(
                lambda: reloads("failure"), what="a failed reload", timeout_s=10.0
            )
            assert broken.values("governor_config_reloads_total", result="success") == [1.0]
            assert rule_names(broken) == {"old-rule", "new-rule"}
            assert process.returncode is None
            assert (await client.get(f"http://{started['telemetry']}/live")).status_code == 200
            await write(2)
            await wait_until(lambda: new_rule_input(6), what="new-rule input", timeout_s=5.0)
            await backend.wait_for(lambda: len(backend.series) >= 2)

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(STOP_TIMEOUT_S):
                await process.wait()
            assert process.returncode == 0, log.text()
    finally:
        backend_stop.set()

    assert [dict(lbls) for lbls, _ in backend.series] == [
        {"__name__": "old_metric", "seen_by": "old-rule"}
    ] * 2
    records = log.records()
    assert [r["rules"] for r in records if r["msg"] == "rules reloaded"] == [2]
    refused = sorted(r["problem"] for r in records if r["msg"] == "rules reload refused")
    assert len(refused) == 2 and refused[1] == "rules[1] (extra).colour: unknown key", refused
    assert refused[0].startswith("rules[0] (version).match.name: bad regex")
    assert [r["level"] for r in records if r["msg"].startswith("rules reload failed")] == ["error"]


# ---- 5. dead rules ------------------------------------------------------------------------------


async def test_a_rule_that_never_matches_is_reported_dead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two rules with dead_after 1 s: one matches a series sent every 0.2 s, the other matches
    nothing. About a second after the start the idle one shows governor_rule_dead 1 and
    governor_rule_never_matched 1 on /metrics, and one log line says it is dead; the busy one
    shows 0 for both, and no line is logged about it."""
    caplog.set_level(logging.INFO, logger="governor")
    rules = write_rules(
        tmp_path / "rules.yaml",
        [
            {
                "name": "busy",
                "match": {"name": "busy_value"},
                "action": "transform",
                "transform": [{"op": "set", "label": "checked", "value": "yes"}],
            },
            {"name": "idle", "match": {"name": "no_such_metric"}, "action": "drop"},
        ],
        dead_after="1s",
    )
    t0 = trio.current_time()
    async with governor_with_rules(rules, tick_s=0.1) as gov:
        stop = trio.Event()

        async def busy() -> None:
            for seq in range(200):  # 40 s at most; the test takes about 2
                req = WriteRequest()
                ts = req.timeseries.add()
                ts.labels.add(name="__name__", value="busy_value")
                ts.samples.add(timestamp=BASE_MS + seq, value=float(seq))
                assert (await gov.write(req)).status_code == 204
                with trio.move_on_after(0.2):
                    await stop.wait()
                if stop.is_set():
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy)

            async def idle_dead() -> tuple[bool, Any]:
                m = await scrape(gov.client, gov.telemetry_url("/metrics"))
                return m.value("governor_rule_dead", rule="idle") == 1, m

            await wait_until(idle_dead, what="the idle rule to be dead", timeout_s=5.0)
            dead_after = trio.current_time() - t0
            # Past the point where both would be dead, were the busy one idle too.
            await trio.sleep(0.5)
            m = await scrape(gov.client, gov.telemetry_url("/metrics"))
            stop.set()

    assert 1.0 <= dead_after < 3.0
    for rule, dead, never in (("idle", 1, 1), ("busy", 0, 0)):
        assert m.value("governor_rule_dead", pipeline="prw", rule=rule) == dead, rule
        assert m.value("governor_rule_never_matched", pipeline="prw", rule=rule) == never, rule
    assert m.value("governor_rule_last_match_timestamp_seconds", rule="idle") == 0
    assert m.value("governor_rule_last_match_timestamp_seconds", rule="busy") > 0
    assert m.value("governor_rule_input_datapoints_total", rule="idle") == 0
    assert m.value("governor_rule_input_datapoints_total", rule="busy") > 0
    dead_lines = [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage().startswith("rule is dead")
    ]
    assert dead_lines == [{"rule": "idle", "pipeline": "prw"}]
    assert not [r for r in caplog.records if r.getMessage() == "rule matches again"]


async def test_a_rule_added_by_a_reload_gets_its_whole_dead_after(tmp_path: Path) -> None:
    """governor has run longer than dead_after (1 s) when a reload adds a rule with dead_after
    1 s that matches nothing. The new rule is reported dead 1 s after the reload, not at once:
    before the reload it did not exist, so it cannot have gone 1 s without a match."""
    idle = {"name": "idle", "match": {"name": "no_such_metric"}, "action": "drop"}
    added = {"name": "added", "match": {"name": "nor_this_one"}, "action": "drop"}
    rules = write_rules(tmp_path / "rules.yaml", [idle], dead_after="1s")
    async with governor_with_rules(rules, tick_s=0.1) as gov:

        async def dead(rule: str) -> tuple[bool, Any]:
            m = await scrape(gov.client, gov.telemetry_url("/metrics"))
            return m.value("governor_rule_dead", rule=rule) == 1, m

        await wait_until(lambda: dead("idle"), what="the idle rule to be dead", timeout_s=5.0)
        write_rules(rules, [idle, added], dead_after="1s")
        assert gov.app.reload_rules() is True
        reloaded = trio.current_time()
        await trio.sleep(0.3)  # three ticks, each of which checks for dead rules
        m = await scrape(gov.client, gov.telemetry_url("/metrics"))
        assert m.value("governor_rule_never_matched", rule="added") == 1
        assert m.value("governor_rule_dead", rule="added") == 0
        await wait_until(lambda: dead("added"), what="the added rule to be dead", timeout_s=5.0)
        assert trio.current_time() - reloaded >= 1.0
