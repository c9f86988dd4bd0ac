"""Rule engine microbenchmark: datapoints per CPU-second through governor's rules, per action.

    .venv/bin/python bench/rules.py [--repeat 5] [--seconds 0.5] [--only prw|otlp]

For each case (one action alone, matching every series; no rule matching; the realistic 10-rule
file bench/rules_realistic.yaml) a RuleEngine is built and requests are run through it:

- remote write: `service.governance.prw.govern(engine, data)` on serialized 1000-series
  WriteRequests (10 labels per series with `__name__`, one sample each; 50 metric names);
- OTLP: `ExportMetricsServiceRequest.FromString(data)` then `service.governance.otlp.govern(engine,
  req)` (govern rewrites the message in place, so every call needs a freshly parsed one) on
  requests of 1000 number data points (5 resources x 50 metrics x 4 points, 10 attributes each;
  the same 50 names: gauges, and monotonic cumulative sums for `*_total`/`_count`/`_bucket`).

Time moves as in a scrape loop: a pool of `--pool` distinct requests (10 x 1000 series) is sent
round after round, every round `--step` seconds (15 s) later, so a 1 m window sees 4 points per
series. The engine's clock is the round's timestamp. After each round the engine's due windows are
collected and encoded (`engine.due()` + `prw.encode`/`otlp.encode`), as governor's tick does;
that work is inside the timed figure. Only the governance calls are timed (time.process_time
around each call); building the payloads is not.

Per case, `--repeat` repetitions (after one warm-up) of whole rounds, at least `--seconds`
CPU-seconds each, and a multiple of the longest window (4 rounds for 1 m, 20 for 5 m) so that
every repetition emits every series' window equally often (bounded by `--max-calls` calls and
`--max-wall` seconds); the figure is the median, in input datapoints per CPU-second and µs per
1000 datapoints. For comparison: parsing alone (`WriteRequest.FromString`,
`ExportMetricsServiceRequest.FromString`) and governor's remote-write receive path without rules
(`service.codec.prw.count`: validate + count, no Python per series). "+snappy" adds what the
receiver does after govern when the rules changed a request: snappy-compress the re-encoded body;
"+count+serialize" runs `otlp.apply` (govern, then recount and serialize a changed request), as
the OTLP receivers do.

Then for the realistic file, the share of the series each rule matched (on the 50-name mix and on
bench/workload.py's 8-name mix, which bench/e2e_prw.py sends). Prints figures; asserts nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

# trio (imported by service.governance) imports the standard library's `queue`, which
# bench/queue.py would shadow: move bench/ to the end of sys.path (workload.py is still found).
# ruff: noqa: E402
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH] + [str(_BENCH)]

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import workload
import yaml
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import Label, Sample, TimeSeries
from service.codec import compression
from service.codec import otlp as otlp_codec
from service.codec import prw as prw_codec
from service.governance import otlp as gov_otlp
from service.governance import prw as gov_prw
from service.governance.engine import RuleEngine
from service.governance.rules import Aggregate, Downsample, load_rules

REALISTIC = _BENCH / "rules_realistic.yaml"
SERIES_PER_REQUEST = 1000
_COUNTER_SUFFIXES = ("_total", "_count", "_bucket", "_sum")

# ---- the 50-name series mix --------------------------------------------------------------------

_NODES = [f"ip-10-0-{i}-{j}.ec2.internal" for i in range(4) for j in (11, 57, 203)]
_IMAGES = [f"registry.example.com/team/app:{v}" for v in ("1.4.2", "1.5.0", "2.0.1")]
_LE = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "+Inf"]
# Three metric-specific labels (with their values) per family; a name's family by its prefix.
_FAMILIES: dict[str, list[tuple[str, list[str]]]] = {
    "http": [
        ("method", ["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ("status", ["200", "201", "204", "301", "400", "401", "404", "429", "500", "503"]),
        ("uri", [f"/api/v{v}/{r}" for v in (1, 2) for r in ("orders", "users", "carts")]),
    ],
    "http_hist": [
        ("host", ["payments.internal", "auth.internal", "s3.eu-west-1.amazonaws.com"]),
        ("le", _LE),
        ("method", ["GET", "POST"]),
    ],
    "container": [
        ("cpu", ["total", *[f"cpu{i}" for i in range(8)]]),
        ("image", _IMAGES),
        ("node", _NODES),
    ],
    "node": [
        ("device", ["eth0", "eth1", "lo", "cni0", "flannel.1", "veth1a2b3c", "nvme0n1"]),
        ("mode", ["user", "system", "idle", "iowait", "steal"]),
        ("node", _NODES),
    ],
    "grpc": [
        ("grpc_code", ["OK", "Canceled", "DeadlineExceeded", "NotFound", "Unavailable"]),
        ("grpc_method", ["GetOrder", "ListOrders", "CreateOrder", "Watch", "Check"]),
        ("grpc_service", ["shop.v1.OrderService", "grpc.health.v1.Health"]),
    ],
    "runtime": [
        ("build", ["a1b2c3d", "e4f5a6b", "c7d8e9f"]),
        ("runtime", ["go1.22.5", "go1.23.1", "jvm-21", "python-3.12"]),
        ("zone", ["eu-west-1a", "eu-west-1b", "eu-west-1c"]),
    ],
    "kube": [
        ("phase", ["Running", "Pending", "Succeeded", "Failed", "Unknown"]),
        ("node", _NODES),
        ("resource", ["cpu", "memory", "ephemeral_storage"]),
    ],
    "queue": [
        ("consumergroup", [f"{s}-consumer" for s in ("billing", "search", "audit", "mail")]),
        ("partition", [str(i) for i in range(12)]),
        ("topic", ["orders", "payments", "events.v2", "clickstream"]),
    ],
    "store": [
        ("db", ["orders", "users", "sessions", "inventory"]),
        ("role", ["primary", "replica"]),
        ("cmd", ["get", "set", "select", "insert", "update", "delete"]),
    ],
    "probe": [
        ("le", _LE),
        ("scheme", ["http", "https"]),
        ("target", [f"https://{h}.example.com/health" for h in ("shop", "api", "auth", "cdn")]),
    ],
}
METRIC_NAMES: list[tuple[str, str]] = [
    # bench/workload.py's 8 names first
    ("http_server_requests_seconds_count", "http"),
    ("container_cpu_usage_seconds_total", "container"),
    ("container_memory_working_set_bytes", "container"),
    ("node_network_receive_bytes_total", "node"),
    ("grpc_server_handled_total", "grpc"),
    ("process_resident_memory_bytes", "runtime"),
    ("kafka_consumergroup_lag", "queue"),
    ("http_client_request_duration_seconds_bucket", "http_hist"),
    # 42 more
    ("http_requests_total", "http"),
    ("http_request_duration_seconds_bucket", "http_hist"),
    ("http_request_duration_seconds_sum", "http"),
    ("http_request_duration_seconds_count", "http"),
    ("http_server_requests_seconds_sum", "http"),
    ("container_network_transmit_bytes_total", "container"),
    ("container_fs_reads_bytes_total", "container"),
    ("container_cpu_cfs_throttled_periods_total", "container"),
    ("container_memory_rss", "container"),
    ("container_spec_memory_limit_bytes", "container"),
    ("kube_pod_container_status_restarts_total", "kube"),
    ("kube_pod_status_phase", "kube"),
    ("kube_deployment_status_replicas_available", "kube"),
    ("kube_pod_container_resource_requests", "kube"),
    ("node_cpu_seconds_total", "node"),
    ("node_memory_MemAvailable_bytes", "node"),
    ("node_filesystem_avail_bytes", "node"),
    ("node_disk_read_bytes_total", "node"),
    ("node_network_transmit_bytes_total", "node"),
    ("node_load1", "node"),
    ("process_cpu_seconds_total", "runtime"),
    ("process_open_fds", "runtime"),
    ("go_goroutines", "runtime"),
    ("go_gc_duration_seconds", "runtime"),
    ("go_memstats_heap_inuse_bytes", "runtime"),
    ("jvm_memory_used_bytes", "runtime"),
    ("jvm_gc_pause_seconds_count", "runtime"),
    ("jvm_threads_live_threads", "runtime"),
    ("grpc_server_handling_seconds_bucket", "grpc"),
    ("grpc_client_handled_total", "grpc"),
    ("kafka_topic_partition_current_offset", "queue"),
    ("rabbitmq_queue_messages_ready", "queue"),
    ("redis_commands_processed_total", "store"),
    ("redis_connected_clients", "store"),
    ("pg_stat_database_xact_commit_total", "store"),
    ("pg_stat_activity_count", "store"),
    ("nginx_ingress_controller_requests", "http"),
    ("nginx_ingress_controller_request_duration_seconds_bucket", "http_hist"),
    ("envoy_cluster_upstream_rq_total", "http"),
    ("coredns_dns_requests_total", "probe"),
    ("apiserver_request_total", "http"),
    ("up", "probe"),
]
assert len(METRIC_NAMES) == 50
_NAMESPACES = ["shop", "payments", "search", "platform", "monitoring", "ingest", "auth", "mail"]
_APPS = ["api", "worker", "frontend", "gateway", "indexer", "scheduler", "consumer", "cache"]


def mix_labels(index: int, rng: random.Random) -> list[tuple[str, str]]:
    """Sorted labels of series `index` of the 50-name mix (distinct indexes, distinct series)."""
    name, family = METRIC_NAMES[index % len(METRIC_NAMES)]
    n = index // len(METRIC_NAMES)
    ns = _NAMESPACES[n % len(_NAMESPACES)]
    app = _APPS[(n // len(_NAMESPACES)) % len(_APPS)]
    pod_no = n // (len(_NAMESPACES) * len(_APPS))
    suffix = f"{pod_no:06x}"
    labels = [
        ("__name__", name),
        ("cluster", "prod-eu-west-1"),
        ("container", app),
        ("instance", f"10.{(pod_no >> 16) & 255}.{(pod_no >> 8) & 255}.{pod_no & 255}:8080"),
        ("job", f"{ns}/{app}"),
        ("namespace", ns),
        ("pod", f"{app}-7f9c{suffix[:3]}d-{suffix[3:]}x"),
    ]
    labels += [(key, rng.choice(values)) for key, values in _FAMILIES[family]]
    labels.sort()
    assert len(labels) == workload.LABELS_PER_SERIES
    return labels


def prw_template(series: list[list[tuple[str, str]]], rng: random.Random) -> list[bytes]:
    """A WriteRequest of `series`, cut at each sample timestamp (see bench/workload.py)."""
    sentinel_ts = (1 << 35) + 12345
    sentinel = workload.ts_varint(sentinel_ts)
    pieces: list[bytes] = []
    for labels in series:
        ts = TimeSeries(
            labels=[Label(name=k, value=v) for k, v in labels],
            samples=[Sample(value=float(rng.randrange(0, 10_000_000)), timestamp=sentinel_ts)],
        )
        body = ts.SerializeToString()
        assert body.endswith(sentinel)
        pieces.append(b"\x0a" + workload._varint(len(body)) + body[: -len(sentinel)])
    pieces.append(b"")
    return pieces


def prw_pool(mix: str, n_requests: int, seed: int = 1) -> list[list[bytes]]:
    """`n_requests` templates of 1000 distinct series: mix "names50" or "workload"."""
    if mix == "workload":
        return workload.build_pool(n_requests, SERIES_PER_REQUEST, seed=seed)
    rng = random.Random(seed)
    return [
        prw_template(
            [mix_labels(r * SERIES_PER_REQUEST + i, rng) for i in range(SERIES_PER_REQUEST)], rng
        )
        for r in range(n_requests)
    ]


class OTLPPool:
    """`n_requests` ExportMetricsServiceRequests of 1000 number points (5 resources x 50 metrics
    x 4 points, 10 attributes per point); serialized per round with that round's timestamp."""

    RESOURCES, POINTS = 5, 4

    def __init__(self, n_requests: int, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.requests: list[ExportMetricsServiceRequest] = []
        serial = 0  # series number among those of one metric name
        cumulative = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
        for _ in range(n_requests):
            req = ExportMetricsServiceRequest()
            for _ in range(self.RESOURCES):
                rm = req.resource_metrics.add()
                first = dict(mix_labels(serial * len(METRIC_NAMES), rng))
                for k, v in (
                    ("service.name", first["job"].split("/")[1]),
                    ("service.namespace", first["namespace"]),
                    ("k8s.pod.name", first["pod"]),
                    ("k8s.cluster.name", first["cluster"]),
                ):
                    rm.resource.attributes.append(KeyValue(key=k, value=AnyValue(string_value=v)))
                sm = rm.scope_metrics.add()
                sm.scope.name = "io.opentelemetry.bench"
                for j, (name, _) in enumerate(METRIC_NAMES):
                    m = sm.metrics.add(name=name, unit="1")
                    counter = name.endswith(_COUNTER_SUFFIXES)
                    if counter:
                        m.sum.is_monotonic = True
                        m.sum.aggregation_temporality = cumulative
                        dps = m.sum.data_points
                    else:
                        dps = m.gauge.data_points
                    for pt in range(self.POINTS):
                        # the labels of a series of this name but __name__, + region: 10
                        index = (serial + pt) * len(METRIC_NAMES) + j
                        labels = [(k, v) for k, v in mix_labels(index, rng) if k != "__name__"]
                        labels.append(("region", "eu-west-1"))
                        dp = dps.add(as_double=float(rng.randrange(0, 10_000_000)))
                        dp.start_time_unix_nano = 1_700_000_000 * 10**9
                        dp.attributes.extend(
                            KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in labels
                        )
                serial += self.POINTS
            self.requests.append(req)
        self.points = self.RESOURCES * len(METRIC_NAMES) * self.POINTS

    def render(self, i: int, ts_ms: int) -> bytes:
        req = self.requests[i]
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    field = m.WhichOneof("data")
                    for dp in getattr(m, field).data_points:
                        dp.time_unix_nano = ts_ms * 1_000_000
        return req.SerializeToString()


# ---- cases ------------------------------------------------------------------------------------


def _one(action: str, **settings: Any) -> str:
    """A rules file of one rule named `bench` that matches every series."""
    return yaml.safe_dump({"rules": [{"name": "bench", "action": action, **settings}]})


_PROD_NS = "shop|payments|search|auth"
# (case, rules file text): one action alone, matching every series; then no rule matching.
ACTIONS: list[tuple[str, str]] = [
    ("drop", _one("drop")),
    ("sample probabilistic 0.1", _one("sample", sample={"method": "probabilistic", "rate": 0.1})),
    ("sample hash 0.25", _one("sample", sample={"method": "hash", "rate": 0.25})),
    ("sample head n=10", _one("sample", sample={"method": "head", "n": 10})),
    ("downsample avg 1m", _one("downsample", downsample={"interval": "1m", "method": "avg"})),
    (
        "downsample lttb 5m, 5 points",
        _one("downsample", downsample={"interval": "5m", "method": "lttb", "points": 5}),
    ),
    (
        "aggregate sum by 2 labels, 1m",
        _one(
            "aggregate",
            aggregate={"interval": "1m", "by": ["namespace", "job"], "functions": ["sum"]},
        ),
    ),
    (
        "transform, 3 ops",
        _one(
            "transform",
            transform=[
                {
                    "op": "extract",
                    "source": "pod",
                    "regex": "^(.*)-[a-z0-9]+-[a-z0-9]+$",
                    "label": "deployment",
                },
                {"op": "remove", "labels": ["instance"]},
                {"op": "set", "label": "env", "value": "prod-${cluster}"},
            ],
        ),
    ),
    (
        "classify, 3 chains + 1 table",
        _one(
            "classify",
            classify={
                "chains": [
                    {
                        "when": [
                            {"label": "namespace", "regex": "shop|payments"},
                            {"label": "container", "equals": "api"},
                        ],
                        "set": {"tier": "critical", "pager": "yes"},
                    },
                    {"when": [{"label": "namespace", "regex": _PROD_NS}], "set": {"tier": "prod"}},
                    {"when": [], "set": {"tier": "other"}},
                ],
                "tables": [
                    {
                        "source": "namespace",
                        "target": "team",
                        "values": {"shop": "storefront", "payments": "payments", "auth": "id"},
                        "default": "unknown",
                    }
                ],
            },
        ),
    ),
    (
        "no rule matches (3 rules, other names)",
        yaml.safe_dump(
            {
                "rules": [
                    {"name": "a", "match": {"name": "debug_.*"}, "action": "drop"},
                    {
                        "name": "b",
                        "match": {"name": "legacy_.*|test_.*"},
                        "action": "sample",
                        "sample": {"method": "hash", "rate": 0.1},
                    },
                    {
                        "name": "c",
                        "match": {"name": "tmp_[a-z]+_total"},
                        "action": "transform",
                        "transform": [{"op": "remove", "labels": ["pod"]}],
                    },
                ]
            }
        ),
    ),
]

_FIRST_TS = 1_800_000_000_000  # ms, within workload's 6-byte varint range


class Clock:
    def __init__(self) -> None:
        self.ms = _FIRST_TS

    def __call__(self) -> int:
        return self.ms


def window_rounds(engine: RuleEngine, step_s: float) -> int:
    """Rounds per window of the longest downsample/aggregate window (1 without windows): a
    repetition of a multiple of this many rounds closes every series' window the same number of
    times, so the emitting is amortised the same way in each."""
    intervals = [
        r.settings.interval_s
        for r in engine.rules
        if isinstance(r.settings, Downsample | Aggregate)
    ]
    return max(1, math.ceil(max(intervals, default=0) / step_s))


def run_case(
    make_engine: Callable[[Clock], RuleEngine],
    step: Callable[[RuleEngine, int, Any], None],
    after_round: Callable[[RuleEngine], None],
    render: Callable[[int, int], Any],
    pool_size: int,
    points_per_call: int,
    args: argparse.Namespace,
) -> tuple[list[float], RuleEngine, int]:
    """Repetitions of timed rounds: datapoints per CPU-second of each repetition (the first, a
    warm-up, left out), the engine, and the datapoints offered in all.

    A round: every request of the pool once at the round's timestamp, then the engine's tick
    (`after_round`); the clock moves on by --step. A repetition runs whole rounds, a multiple of
    `window_rounds`, until it has used --seconds of CPU (bounded by --max-calls calls and
    --max-wall seconds)."""
    clock = Clock()
    engine = make_engine(clock)
    period = window_rounds(engine, args.step)
    rates = []
    calls_total = 0
    for _ in range(args.repeat + 1):  # the first is a warm-up (caches per name, first windows)
        cpu = 0.0
        calls = rounds = 0
        wall_end = time.monotonic() + args.max_wall
        while True:
            for i in range(pool_size):
                payload = render(i, clock.ms)
                c0 = time.process_time()
                step(engine, i, payload)
                cpu += time.process_time() - c0
            c0 = time.process_time()
            after_round(engine)
            cpu += time.process_time() - c0
            clock.ms += int(args.step * 1000)
            calls += pool_size
            rounds += 1
            if cpu >= args.seconds and rounds % period == 0:
                break
            if calls >= args.max_calls or time.monotonic() >= wall_end:
                print(f"    (repetition cut short after {rounds} rounds)", file=sys.stderr)
                break
        calls_total += calls
        rates.append(calls * points_per_call / cpu if cpu else 0.0)
    return rates[1:], engine, calls_total * points_per_call


def prw_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    pools = {mix: prw_pool(mix, args.pool) for mix in ("names50", "workload")}

    def render_for(mix: str) -> Callable[[int, int], bytes]:
        return lambda i, ts: workload.render(pools[mix][i], ts)

    def timed(
        label: str, mix: str, fn: Callable[[RuleEngine, int, bytes], None], rules: str
    ) -> dict[str, Any]:
        ruleset = load_rules(rules)

        def make(clock: Clock) -> RuleEngine:
            return RuleEngine(ruleset, pipeline="prw", clock_ms=clock, rand=random.Random(7).random)

        def after_round(engine: RuleEngine) -> None:
            emitted = engine.due()
            if emitted:
                gov_prw.encode(emitted)

        rates, engine, offered = run_case(
            make, fn, after_round, render_for(mix), args.pool, SERIES_PER_REQUEST, args
        )
        return {
            "pipeline": "prw",
            "case": label,
            "mix": mix,
            "rates": rates,
            "rule_input_share": shares(engine, offered),
        }

    def govern(engine: RuleEngine, i: int, data: bytes) -> None:
        gov_prw.govern(engine, data)

    def govern_compress(engine: RuleEngine, i: int, data: bytes) -> None:
        g = gov_prw.govern(engine, data)
        if g.data is not None:
            compression.compress(g.data, "snappy")

    def parse(engine: RuleEngine, i: int, data: bytes) -> None:
        WriteRequest.FromString(data)

    def count(engine: RuleEngine, i: int, data: bytes) -> None:
        prw_codec.count(data)

    realistic = REALISTIC.read_text()
    plan: list[tuple[str, str, Callable[[RuleEngine, int, bytes], None], str]] = [
        ("baseline: parse only (WriteRequest.FromString)", "names50", parse, "rules: []"),
        ("baseline: no rules, receiver's prw.count", "names50", count, "rules: []"),
    ]
    plan += [(name, "names50", govern, rules) for name, rules in ACTIONS]
    plan += [
        ("realistic 10 rules, 50-name mix", "names50", govern, realistic),
        ("baseline: parse only, workload.py mix", "workload", parse, "rules: []"),
        ("baseline: prw.count, workload.py mix", "workload", count, "rules: []"),
        ("no rule matches, workload.py mix", "workload", govern, ACTIONS[-1][1]),
        ("realistic 10 rules, workload.py mix", "workload", govern, realistic),
        ("realistic 10 rules, workload.py mix, +snappy", "workload", govern_compress, realistic),
    ]
    for label, mix, fn, rules in plan:
        r = timed(label, mix, fn, rules)
        results.append(r)
        print_row(r)
    return results


def otlp_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    pool = OTLPPool(args.pool)
    render = pool.render

    def govern(engine: RuleEngine, i: int, data: bytes) -> None:
        gov_otlp.govern(engine, ExportMetricsServiceRequest.FromString(data))

    def apply(engine: RuleEngine, i: int, data: bytes) -> None:
        req = ExportMetricsServiceRequest.FromString(data)
        gov_otlp.apply(engine, otlp_codec.Admitted(data, pool.points, 250, request=req))

    def parse(engine: RuleEngine, i: int, data: bytes) -> None:
        ExportMetricsServiceRequest.FromString(data)

    def after_round(engine: RuleEngine) -> None:
        emitted = engine.due()
        if emitted:
            gov_otlp.encode(emitted)

    plan = [("baseline: parse only (ExportMetricsServiceRequest.FromString)", parse, "rules: []")]
    plan += [(name, govern, rules) for name, rules in ACTIONS]
    plan += [
        ("realistic 10 rules, 50-name mix", govern, REALISTIC.read_text()),
        ("realistic 10 rules, 50-name mix, +count+serialize (apply)", apply, REALISTIC.read_text()),
    ]
    for label, fn, rules in plan:
        ruleset = load_rules(rules)

        def make(clock: Clock, ruleset=ruleset) -> RuleEngine:
            return RuleEngine(
                ruleset, pipeline="otlp", clock_ms=clock, rand=random.Random(7).random
            )

        rates, engine, offered = run_case(
            make, fn, after_round, render, args.pool, pool.points, args
        )
        r = {
            "pipeline": "otlp",
            "case": label,
            "mix": "names50",
            "rates": rates,
            "rule_input_share": shares(engine, offered),
        }
        results.append(r)
        print_row(r)
    return results


def shares(engine: RuleEngine, offered: int) -> dict[str, float]:
    """Per rule, the datapoints it matched, as a share of the datapoints offered."""
    return {name: st.input / offered for name, st in engine.stats.items() if offered}


_PARSE: dict[tuple[str, str], float] = {}  # (pipeline, mix) -> parse-only dp/CPU-s


def print_row(r: dict[str, Any]) -> None:
    med = statistics.median(r["rates"])
    key = (r["pipeline"], r["mix"])
    if r["case"].startswith("baseline: parse only"):
        _PARSE[key] = med
    base = _PARSE.get(key)
    r["median_dp_per_cpu_s"] = med
    r["us_per_1000_dp"] = 1e9 / med
    extra = ""
    if base and not r["case"].startswith("baseline: parse"):
        r["us_per_1000_dp_beyond_parse"] = 1e9 / med - 1e9 / base
        extra = f"{r['us_per_1000_dp_beyond_parse']:9.0f}"
    per = ", ".join(f"{x / 1000:,.0f}k" for x in r["rates"])
    print(
        f"  {r['pipeline']:4s} {r['case']:62s} {med:>12,.0f} {1e9 / med:9.0f} {extra:>9s}  [{per}]",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=5, help="repetitions per case (median)")
    p.add_argument("--seconds", type=float, default=0.5, help="CPU-seconds per repetition")
    p.add_argument("--max-calls", type=int, default=20_000, help="calls per repetition, at most")
    p.add_argument("--max-wall", type=float, default=60.0, help="seconds per repetition, at most")
    p.add_argument("--pool", type=int, default=10, help="distinct 1000-point requests per round")
    p.add_argument("--step", type=float, default=15.0, help="seconds between rounds (scrape)")
    p.add_argument("--only", choices=("prw", "otlp"), help="one pipeline only")
    p.add_argument("--json-out", type=Path, help="where to write the JSON results")
    args = p.parse_args(argv)
    if min(args.repeat, args.seconds, args.pool, args.max_calls, args.max_wall, args.step) <= 0:
        p.error("--repeat, --seconds, --pool, --max-calls, --max-wall and --step must be positive")

    print(
        f"rule engine benchmark: {SERIES_PER_REQUEST}-datapoint requests, 10 labels, "
        f"pool of {args.pool} requests per round, {args.step:g} s per round; median of "
        f"{args.repeat} x >= {args.seconds:g} CPU-s"
    )
    head = f"{'dp/CPU-s':>12s} {'µs/1k dp':>9s} {'µs>parse':>9s}"
    print(f"  {'':4s} {'case':62s} {head}  per repetition")
    results = []
    if args.only in (None, "prw"):
        results += prw_cases(args)
    if args.only in (None, "otlp"):
        results += otlp_cases(args)

    print("\nrealistic file: share of the datapoints offered that each rule matched")
    shown = [r for r in results if r["case"].startswith("realistic") and "+" not in r["case"]]
    if shown:
        print(
            f"  {'rule':24s} " + " ".join(f"{r['pipeline'] + ' ' + r['mix']:>16s}" for r in shown)
        )
        for name in shown[0]["rule_input_share"]:
            row = " ".join(f"{r['rule_input_share'][name] * 100:15.1f}%" for r in shown)
            print(f"  {name:24s} {row}")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
        print(f"\nJSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
