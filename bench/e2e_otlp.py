"""End-to-end OTLP benchmark: OTLP/HTTP and OTLP/gRPC load through governor into a counting sink.

    .venv/bin/python bench/e2e_otlp.py [--runs 3] [--transport http,grpc] [--rate 100000]
        [--duration 20] [--export-protocol grpc|http] [--profile]

Each measurement starts three processes on 127.0.0.1 with ports the OS picks:

- a counting OTLP sink (`e2e_otlp.py sink`): grpcio's server for --export-protocol grpc, a
  threaded HTTP/1.1 keep-alive server for http. It decompresses, decodes every request with
  governor's OTLP codec and counts its datapoints; GET /count on its control port reports totals;
- governor (`python -m service`, temporary YAML config): only the OTLP pipeline, only the receiver
  of the transport under test, one OTLP exporter to the sink (governor's defaults otherwise: gzip
  export compression, batches of up to 8192 datapoints, memory queue, log level warning);
- the load generator (`e2e_otlp.py loadgen`), which offers --rate datapoints/s for --duration
  seconds, open loop (no retries; --connections threads, for gRPC x --grpc-calls-per-channel,
  each with one request in flight): requests of --points-per-metric x 10 metrics (1000 datapoints
  by default) in 2 resources with one scope each, 5 metrics per resource: 2 explicit-bucket
  histograms (10 bounds), 2 sums, 1 gauge; every datapoint has 5 attributes. A pool of --pool
  distinct requests (distinct series: service.instance.id differs per request) is serialized
  once; request i is pool entry i mod pool with every datapoint's time_unix_nano (a fixed64, so
  patched in place with one bytes.replace) set to the request's send time. OTLP/HTTP bodies are
  compressed before sending starts (--http-compression, gzip level 6 by default, like the
  Collector's otlphttp exporter; the SDKs' HTTP exporters send uncompressed unless configured:
  --http-compression none measures that). OTLP/gRPC requests go through grpcio's client with gzip
  (--grpc-compression; the Collector's default), which compresses each call in the loadgen.

While the load runs, governor's CPU time (user+system of all its threads: grpcio's server and
client threads are in-process; plus its child processes, of which it has none) and RSS are sampled
every 0.5 s with psutil, and its CPU per thread (from /proc: the trio loop, grpcio's handler
threads, trio's worker threads, grpcio's C threads) is read before and after. After the load the
harness waits, bounded, until governor has settled everything (governor_datapoints_sent_total +
governor_datapoints_dropped_total = governor_datapoints_received_total, pipeline otlp) and the
sink has counted what governor sent. CPU is counted from the first request until then.

Figures per run: offered datapoints/s, achieved datapoints/s at the sink (first request to
drained), governor CPU-seconds, datapoints per governor CPU-second, peak RSS (VmHWM), status codes,
and whether the sink counted exactly what was offered; then medians per transport over --runs,
and the issue's targets (at 100k datapoints/s offered: 300,000 datapoints per governor CPU-second
for OTLP/HTTP, 250,000 for OTLP/gRPC). Output goes to stdout and, as JSON, to bench/out/. It
asserts nothing about the figures; the exit status is 1 when in some run the sink did not count
exactly what was offered (a refused request, e.g. RESOURCE_EXHAUSTED, is not retried).

--profile attaches `py-spy record --pid` to governor for the load window (bench/out/
<--profile-name>-<transport>.<ext>; --profile-format raw (default, collapsed stacks that
speedscope.app opens), speedscope or flamegraph (SVG)) and summarises it by pipeline stage and
function. py-spy adds ~30 % to governor's CPU: profiled figures are marked. py-spy counts a
thread that is runnable but waiting (for a CPU, or for the GIL) as busy: grpcio's handler threads
waiting in trio.from_thread.run show up as a large share with OTLP/gRPC; the per-thread CPU
figures are the better guide there (--profile-gil samples only the GIL holder).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is first on sys.path, where bench/queue.py would shadow the standard
# library's `queue` (concurrent.futures and trio import it): take bench/ off the path first, as
# bench/e2e_prw.py does. Hence the imports below this line (E402).
# ruff: noqa: E402
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import collections
import concurrent.futures
import contextlib
import datetime
import http.client
import http.server
import importlib.util
import json
import os
import random
import resource
import signal
import statistics
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
PYTHON = sys.executable
DRAIN_TIMEOUT_S = 120.0
SINK_LIFETIME_S = 3600.0  # a sink left behind exits on its own

# The PRW harness's process, sampling and profile helpers (bench/ is off sys.path: load by path).
_spec = importlib.util.spec_from_file_location("e2e_prw", BENCH / "e2e_prw.py")
assert _spec is not None and _spec.loader is not None
prw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prw)

TARGETS = {"http": 300_000, "grpc": 250_000}  # datapoints per governor CPU-second (issue 3)


# ---- workload ---------------------------------------------------------------------------------

RESOURCES = 2
# (name, kind, unit, value type) per resource: 2 histograms, 2 sums, 1 gauge.
_METRICS = [
    ("http.server.request.duration", "histogram", "s", "double"),
    ("http.server.active_requests", "sum_updown", "{request}", "int"),
    ("process.cpu.time", "sum", "s", "double"),
    ("system.memory.usage", "gauge", "By", "int"),
    ("rpc.client.duration", "histogram", "ms", "double"),
]
_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
_METHODS = ["GET", "POST", "PUT", "DELETE"]
_ROUTES = [
    f"/api/v{v}/{r}"
    for v in (1, 2)
    for r in ("orders", "users", "carts", "items", "payments", "search", "sessions")
] + [f"/internal/{r}" for r in ("health", "ready", "metrics", "debug", "config", "admin", "jobs")]
_STATUS = [200, 200, 200, 201, 204, 301, 400, 401, 404, 429, 500, 503]
_HOSTS = [f"{s}.shop.svc.cluster.local" for s in ("orders", "users", "payments", "search", "auth")]
_SERVICES = ["checkout", "cart", "frontend", "payments", "search", "users", "shipping", "ads"]
SENTINEL_NS = 1_700_000_000_123_456_789  # every datapoint's time_unix_nano in a template
_SENTINEL = struct.pack("<Q", SENTINEL_NS)
ATTRIBUTES = 5


def datapoints_per_request(points_per_metric: int) -> int:
    return RESOURCES * len(_METRICS) * points_per_metric


def build_request(index: int, points_per_metric: int, rng: random.Random, start_ns: int) -> bytes:
    """Pool entry `index`: a serialized ExportMetricsServiceRequest whose datapoints all have
    time_unix_nano = SENTINEL_NS."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    def kv(key: str, value: str | int) -> KeyValue:
        if isinstance(value, int):
            return KeyValue(key=key, value=AnyValue(int_value=value))
        return KeyValue(key=key, value=AnyValue(string_value=value))

    req = ExportMetricsServiceRequest()
    for r in range(RESOURCES):
        service = _SERVICES[(index * RESOURCES + r) % len(_SERVICES)]
        rm = req.resource_metrics.add()
        rm.schema_url = "https://opentelemetry.io/schemas/1.26.0"
        rm.resource.attributes.extend(
            [
                kv("service.name", service),
                kv("service.namespace", "shop"),
                kv("service.version", rng.choice(["1.4.2", "1.5.0", "2.0.1"])),
                kv("service.instance.id", f"{rng.getrandbits(64):016x}-{index:05d}-{r}"),
                kv("host.name", f"ip-10-0-{rng.randrange(4)}-{rng.randrange(256)}.ec2.internal"),
                kv("k8s.namespace.name", "shop"),
                kv("k8s.pod.name", f"{service}-7f9c{rng.getrandbits(20):05x}-{index:05x}"),
                kv("cloud.region", "eu-west-1"),
                kv("telemetry.sdk.language", rng.choice(["go", "java", "python"])),
            ]
        )
        sm = rm.scope_metrics.add()
        sm.scope.name = "io.opentelemetry.contrib.instrumentation.http"
        sm.scope.version = "1.26.0"
        for name, kind, unit, vtype in _METRICS:
            m = sm.metrics.add()
            m.name, m.unit = name, unit
            m.description = f"{name} ({unit})"
            if kind == "histogram":
                data = m.histogram
                data.aggregation_temporality = 2  # cumulative
            elif kind == "gauge":
                data = m.gauge
            else:
                data = m.sum
                data.aggregation_temporality = 2
                data.is_monotonic = kind == "sum"
            for d in range(points_per_metric):
                dp = data.data_points.add()
                dp.attributes.extend(
                    [
                        kv("http.request.method", _METHODS[(d // len(_ROUTES)) % len(_METHODS)]),
                        kv("http.route", _ROUTES[d % len(_ROUTES)]),
                        kv("http.response.status_code", rng.choice(_STATUS)),
                        kv("server.address", rng.choice(_HOSTS)),
                        kv("network.protocol.version", rng.choice(["1.1", "2"])),
                    ][:ATTRIBUTES]
                )
                dp.start_time_unix_nano = start_ns
                dp.time_unix_nano = SENTINEL_NS
                if kind == "histogram":
                    counts = [rng.randrange(0, 500) for _ in range(len(_BOUNDS) + 1)]
                    dp.count = sum(counts)
                    dp.bucket_counts.extend(counts)
                    dp.explicit_bounds.extend(_BOUNDS)
                    dp.sum = rng.uniform(0, 5) * dp.count
                    dp.min = rng.uniform(0, 0.005)
                    dp.max = rng.uniform(1, 10)
                elif vtype == "int":
                    dp.as_int = rng.randrange(0, 1 << 33)
                else:
                    dp.as_double = rng.uniform(0, 1e6)
    return req.SerializeToString()


def build_pool(size: int, points_per_metric: int, seed: int) -> list[bytes]:
    """`size` distinct requests; checks that each is what it claims."""
    from service.codec import otlp

    rng = random.Random(seed)
    start_ns = time.time_ns() - 3600 * 10**9
    pool = [build_request(i, points_per_metric, rng, start_ns) for i in range(size)]
    expect = datapoints_per_request(points_per_metric)
    for body in (pool[0], pool[-1]):
        points, metrics = otlp.count(otlp.decode(body))
        if points != expect or metrics != RESOURCES * len(_METRICS):
            raise RuntimeError(f"pool request holds {points} datapoints, not {expect}")
        # fixed64 time_unix_nano: the sentinel's 8 bytes must occur once per datapoint, no more.
        if body.count(_SENTINEL) != expect:
            raise RuntimeError("the timestamp sentinel occurs outside time_unix_nano")
    return pool


def with_time(template: bytes, time_ns: int) -> bytes:
    """`template` with every datapoint's time_unix_nano set to `time_ns`."""
    return template.replace(_SENTINEL, struct.pack("<Q", time_ns))


# ---- load generator (a subprocess: `e2e_otlp.py loadgen ...`) -----------------------------------


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Load:
    """The run's requests and the shared open-loop schedule of the sending threads."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dpr = datapoints_per_request(args.points_per_metric)
        self.n_requests = int(args.rate * args.duration / self.dpr)
        self.interval = self.dpr / args.rate  # seconds between request starts
        t0 = time.perf_counter()
        self.pool = build_pool(args.pool, args.points_per_metric, args.seed)
        self.pool_s = time.perf_counter() - t0
        self.base_ns = time.time_ns()
        self.gzip = args.transport == "http" and args.compression == "gzip"
        self.prebuilt: list[bytes] | None = None
        t0 = time.perf_counter()
        if self.gzip:
            # Compressing on the fly would cost the loadgen ~a core at this rate: do it first.
            estimate = len(self._compress(self._raw(0))) * self.n_requests
            if estimate <= args.prebuild_limit_mb * 1024 * 1024:
                self.prebuilt = [self._compress(self._raw(i)) for i in range(self.n_requests)]
        self.prebuild_s = time.perf_counter() - t0
        self.raw_bytes = len(self.pool[0])
        self.body_bytes = len(self.body(0))
        self.lock = threading.Lock()
        self.next_index = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self.sent = self.accepted = self.late = 0
        self.latencies: list[float] = []
        self.max_lag = 0.0
        self.start = self.stop_at = 0.0

    def _compress(self, raw: bytes) -> bytes:
        c = zlib.compressobj(self.args.gzip_level, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        return c.compress(raw) + c.flush()

    def _raw(self, i: int) -> bytes:
        return with_time(self.pool[i % len(self.pool)], self.base_ns + int(i * self.interval * 1e9))

    def body(self, i: int) -> bytes:
        if self.prebuilt is not None:
            return self.prebuilt[i]
        raw = self._raw(i)
        return self._compress(raw) if self.gzip else raw

    def take(self) -> int | None:
        with self.lock:
            i = self.next_index
            if i >= self.n_requests:
                return None
            self.next_index += 1
            return i

    def worker(self, send: Any) -> None:
        """Take the next due request, send it with `send(body) -> status`, until the end."""
        statuses: collections.Counter[str] = collections.Counter()
        latencies: list[float] = []
        sent = accepted = late = 0
        max_lag = 0.0
        try:
            while True:
                i = self.take()
                if i is None:
                    break
                due = self.start + i * self.interval
                now = time.perf_counter()
                if due >= self.stop_at or now >= self.stop_at:
                    break
                if due > now:
                    time.sleep(due - now)
                else:
                    max_lag = max(max_lag, now - due)
                    late += now - due > 0.05
                body = self.body(i)
                t0 = time.perf_counter()
                status = send(body)
                latencies.append(time.perf_counter() - t0)
                statuses[status] += 1
                sent += self.dpr
                if status in ("200", "OK"):
                    accepted += self.dpr
        finally:
            with self.lock:
                self.statuses.update(statuses)
                self.sent += sent
                self.accepted += accepted
                self.latencies += latencies
                self.max_lag = max(self.max_lag, max_lag)
                self.late += late


def http_sender(host: str, port: int, path: str, gzip: bool, timeout: float) -> Any:
    """A send(body) for one thread: one keep-alive HTTP/1.1 connection, protobuf bodies."""
    headers = {
        "Content-Type": "application/x-protobuf",
        "User-Agent": "governor-bench-otlp-loadgen",
        **({"Content-Encoding": "gzip"} if gzip else {}),
    }
    conn: list[http.client.HTTPConnection | None] = [None]

    def send(body: bytes) -> str:
        if conn[0] is None:
            conn[0] = http.client.HTTPConnection(host, port, timeout=timeout)
        c = conn[0]
        try:
            c.request("POST", path, body=body, headers=headers)
            resp = c.getresponse()
            resp.read()
            if resp.will_close:
                c.close()
                conn[0] = None
            return str(resp.status)
        except (OSError, http.client.HTTPException) as e:
            c.close()
            conn[0] = None
            return f"error:{type(e).__name__}"

    return send


def grpc_sender(target: str, gzip: bool, timeout: float) -> tuple[Any, Any]:
    """A send(body) for one thread over its own gRPC channel (its own connection); and the
    channel, to wait for it to connect."""
    import grpc

    from service.codec import otlp

    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.use_local_subchannel_pool", 1),  # a connection per channel, not a shared one
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.primary_user_agent", "governor-bench-otlp-loadgen"),
        ],
    )
    export = channel.unary_unary(otlp.EXPORT_METHOD)
    compression = grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression

    def send(body: bytes) -> str:
        try:
            export(body, timeout=timeout, compression=compression)
        except grpc.RpcError as e:
            return e.code().name if hasattr(e, "code") else f"error:{type(e).__name__}"
        return "OK"

    return send, channel


def loadgen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="e2e_otlp.py loadgen", description="OTLP load generator")
    p.add_argument("--transport", choices=("http", "grpc"), required=True)
    p.add_argument("--target", required=True, help="http: URL of /v1/metrics; grpc: host:port")
    p.add_argument("--rate", type=float, default=100_000, help="offered datapoints/s")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--points-per-metric", type=int, default=100)
    p.add_argument("--pool", type=int, default=100, help="distinct requests")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument(
        "--calls-per-channel", type=int, default=1, help="grpc: sending threads per channel"
    )
    p.add_argument("--compression", choices=("gzip", "none"), default="gzip")
    p.add_argument("--gzip-level", type=int, default=6)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prebuild-limit-mb", type=float, default=1500.0)
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.connections <= 0 or args.pool <= 0:
        p.error("--rate, --duration, --connections and --pool must be > 0")

    load = Load(args)
    channels = []
    senders = []
    if args.transport == "http":
        url = urllib_split(args.target)
        for _ in range(args.connections):
            senders.append(
                http_sender(url[0], url[1], url[2], args.compression == "gzip", args.timeout)
            )
    else:
        import grpc

        for _ in range(args.connections):
            send, channel = grpc_sender(args.target, args.compression == "gzip", args.timeout)
            grpc.channel_ready_future(channel).result(timeout=30)
            senders += [send] * max(1, args.calls_per_channel)
            channels.append(channel)
    print(
        f"loadgen: pool of {len(load.pool)} requests x {load.dpr} datapoints "
        f"({load.raw_bytes:,} bytes serialized, {load.body_bytes:,} sent) built in "
        f"{load.pool_s:.1f}s; {load.n_requests} requests, prebuilt in {load.prebuild_s:.1f}s",
        file=sys.stderr,
    )
    threads = [
        threading.Thread(target=load.worker, args=(s,), name=f"conn{n}", daemon=True)
        for n, s in enumerate(senders)
    ]
    cpu0 = _cpu_self()
    load.start = time.perf_counter() + 0.05
    load.stop_at = load.start + args.duration
    _emit({"event": "sending", "time": time.time(), "pid": os.getpid()})
    for t in threads:
        t.start()
    hard_deadline = load.stop_at + args.timeout + 5
    for t in threads:
        t.join(max(0.0, hard_deadline - time.perf_counter()))
    elapsed = time.perf_counter() - load.start
    cpu = _cpu_self() - cpu0
    with load.lock:
        requests = sum(load.statuses.values())
        lat = sorted(load.latencies)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else 0.0

        result = {
            "event": "done",
            "transport": args.transport,
            "compression": args.compression,
            "elapsed_s": round(elapsed, 3),
            "datapoints_per_request": load.dpr,
            "request_bytes_serialized": load.raw_bytes,
            "request_bytes_sent": load.body_bytes,
            "requests_planned": load.n_requests,
            "requests_sent": requests,
            "status_counts": dict(sorted(load.statuses.items())),
            "datapoints_offered": load.sent,
            "datapoints_accepted": load.accepted,
            "offered_datapoints_per_s": round(load.sent / elapsed, 1),
            "accepted_datapoints_per_s": round(load.accepted / elapsed, 1),
            "latency_ms_p50": pct(0.5),
            "latency_ms_p99": pct(0.99),
            "latency_ms_max": round(lat[-1] * 1000, 2) if lat else 0.0,
            "max_schedule_lag_ms": round(load.max_lag * 1000, 1),
            "requests_late_over_50ms": load.late,
            "loadgen_cpu_s": round(cpu, 3),
            "threads_still_running": sum(t.is_alive() for t in threads),
        }
    _emit(result)
    for ch in channels:
        ch.close()
    return 0


def urllib_split(url: str) -> tuple[str, int, str]:
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise SystemExit(f"loadgen: --target must be http://host:port/path, got {url!r}")
    return u.hostname, u.port or 80, u.path or "/"


# ---- counting sink (a subprocess: `e2e_otlp.py sink ...`) ---------------------------------------


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.datapoints = self.requests = self.bytes = self.errors = 0

    def add(self, data: bytes) -> None:
        from service.codec import otlp

        try:
            points, _ = otlp.count(otlp.decode(data))
        except Exception:
            with self.lock:
                self.errors += 1
            raise
        with self.lock:
            self.datapoints += points
            self.requests += 1
            self.bytes += len(data)

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {
                "datapoints": self.datapoints,
                "requests": self.requests,
                "bytes": self.bytes,
                "errors": self.errors,
            }


def _quiet_handler(base: type) -> type:
    class Handler(base):  # type: ignore[misc, valid-type]
        protocol_version = "HTTP/1.1"  # keep-alive

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def reply(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def sink_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="e2e_otlp.py sink", description="counting OTLP sink")
    p.add_argument("--protocol", choices=("grpc", "http"), required=True)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--lifetime", type=float, default=SINK_LIFETIME_S)
    args = p.parse_args(argv)
    counts = Counts()
    base = _quiet_handler(http.server.BaseHTTPRequestHandler)

    class Control(base):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:
            self.reply(200, json.dumps(counts.as_dict()).encode(), "application/json")

    control = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    if args.protocol == "grpc":
        import grpc

        from service.codec import otlp

        def export(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                counts.add(request)
            except Exception:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "undecodable request")
            return b""  # an empty ExportMetricsServiceResponse: full success

        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(args.threads),
            handlers=[
                grpc.method_handlers_generic_handler(
                    otlp.SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(export)}
                )
            ],
            options=[
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        closer = lambda: server.stop(grace=None)  # noqa: E731
    else:
        from service.codec import compression

        class Sink(base):  # type: ignore[misc, valid-type]
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                try:
                    data = compression.decompress(
                        body, self.headers.get("Content-Encoding", ""), 1 << 30
                    )
                    counts.add(data)
                except Exception:
                    self.reply(400, b"bad request\n", "text/plain")
                    return
                self.reply(200, b"", "application/x-protobuf")

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        port = httpd.server_address[1]
        closer = httpd.shutdown
    _emit({"event": "ready", "port": port, "control_port": control.server_address[1]})
    stop.wait(args.lifetime)
    closer()
    control.shutdown()
    return 0


# ---- one measurement --------------------------------------------------------------------------


def governor_config(
    tel_port: int, transport: str, rx_port: int, sink: str, args: argparse.Namespace
) -> str:
    grpc_listen = f"127.0.0.1:{rx_port}" if transport == "grpc" else ""
    http_listen = f"127.0.0.1:{rx_port}" if transport == "http" else ""
    return f"""\
log:
  level: warning
  format: json
telemetry:
  listen: "127.0.0.1:{tel_port}"
otlp:
  receiver:
    grpc:
      listen: "{grpc_listen}"
    http:
      listen: "{http_listen}"
  exporters:
    - name: sink
      endpoint: "{sink}"
      protocol: {args.export_protocol}
      compression: {args.export_compression}
shutdown_grace_s: 10
"""


def governor_cpu(p: psutil.Process) -> float:
    """User+system CPU of governor's threads, plus its children's (it starts none)."""
    t = p.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for c in p.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += prw.cpu_of(c)
    return total


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU-seconds (user+system) of each thread of `pid` so far, with the thread's name."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            name = (task / "comm").read_text().strip()
            out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return out


def thread_groups(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], main_tid: int
) -> dict[str, float]:
    """CPU-seconds per group of threads between two `thread_cpu` readings; threads are grouped
    by name without trailing digits (the main thread, trio's loop, is "main (trio loop)").
    Threads that ended in between are missing (their CPU still counts in the process total)."""
    groups: dict[str, float] = collections.Counter()
    for tid, (name, cpu) in after.items():
        key = "main (trio loop)" if tid == main_tid else name.rstrip("0123456789_-") or name
        groups[key] += cpu - before.get(tid, (name, 0.0))[1]
    return {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if v > 0}


def sink_counts(control: str) -> dict[str, int]:
    status, body = prw.http_get(control + "/count")
    if status != 200:
        raise RuntimeError(f"sink /count: {status}")
    return json.loads(body)


# Stages of governor's OTLP path, by a frame that marks them; the first marker in this list that
# appears anywhere in a stack names its stage.
OTLP_STAGES = [
    ("admit (service/codec/otlp.py", "receiver: decode + validate + count (otlp.admit)"),
    ("decompress (service/codec/compression.py", "receiver: decompress"),
    ("compress (service/codec/compression.py", "exporter: compress batch"),
    ("read_body (service/receivers/http.py", "receiver: read body (ASGI receive)"),
    ("respond (service/receivers/http.py", "receiver: send response (h11/socket)"),
    ("response (service/codec/otlp.py", "receiver: build ExportMetricsServiceResponse"),
    ("OTLPGRPCReceiver._hand_over", "receiver (gRPC): hand-over on the trio loop"),
    ("OTLPHTTPReceiver.", "receiver (HTTP): other (slots, budget, channel, metrics)"),
    ("OTLPGRPCReceiver.", "receiver (gRPC): other, in grpcio's threads (from_thread.run)"),
    ("_Connection.", "HTTP server: read + parse request, dispatch (h11)"),
    ("OTLPGRPCExporter.", "exporter: gRPC call (grpcio)"),
    ("OTLPHTTPExporter.", "exporter: POST to the sink (httpx/httpcore)"),
    ("Exporter.", "exporter: delivery loop"),
    ("Batcher.", "batcher (other)"),
    ("TelemetryApp.", "telemetry (/metrics, /ready)"),
    ("grpc/_server.py", "grpcio server (Python part)"),
    ("grpc/_channel.py", "grpcio client (Python part)"),
    ("EpollIOManager.get_events", "epoll wait (mostly idle)"),
]


def start_sink(procs: Any, tmp: Path, protocol: str) -> tuple[Any, dict]:
    cmd = [PYTHON, str(Path(__file__).resolve()), "sink", f"--protocol={protocol}"]
    sink = procs.start("sink", cmd, tmp / "sink.log", stdout=subprocess.PIPE, text=True)
    reader = prw.LineReader(sink.stdout)
    reader.start()
    return sink, reader.wait_for("ready", timeout=60)


def run_load(
    transport: str, args: argparse.Namespace, run: int, procs: Any, tmp: Path
) -> dict[str, Any]:
    sink, ready = start_sink(procs, tmp, args.export_protocol)
    control = f"http://127.0.0.1:{ready['control_port']}"
    if args.export_protocol == "grpc":
        sink_endpoint = f"127.0.0.1:{ready['port']}"
    else:
        sink_endpoint = f"http://127.0.0.1:{ready['port']}/v1/metrics"

    tel_port, rx_port = prw.free_port(), prw.free_port()
    cfg = tmp / "governor.yaml"
    cfg.write_text(governor_config(tel_port, transport, rx_port, sink_endpoint, args))
    gov = procs.start(
        "governor",
        [PYTHON, "-m", "service", "--config", str(cfg)],
        tmp / "governor.log",
        proxy=True,
        cwd=ROOT,
        env={**os.environ, **dict(e.split("=", 1) for e in args.governor_env)},
    )
    tel = f"http://127.0.0.1:{tel_port}"
    prw.wait_http_ok(tel + "/ready", gov, "governor")
    target = (
        f"http://127.0.0.1:{rx_port}/v1/metrics" if transport == "http" else f"127.0.0.1:{rx_port}"
    )
    compression = args.http_compression if transport == "http" else args.grpc_compression
    connections = args.connections

    gp, sp = psutil.Process(gov.pid), psutil.Process(sink.pid)
    before = prw.scrape(tel + "/metrics")
    sink0 = sink_counts(control)
    lg_cmd = [
        PYTHON,
        str(Path(__file__).resolve()),
        "loadgen",
        f"--transport={transport}",
        f"--target={target}",
        f"--rate={args.rate}",
        f"--duration={args.duration}",
        f"--connections={connections}",
        f"--calls-per-channel={args.grpc_calls_per_channel}",
        f"--compression={compression}",
        f"--points-per-metric={args.points_per_metric}",
        f"--pool={args.pool}",
    ]
    loadgen = procs.start("loadgen", lg_cmd, tmp / "loadgen.log", stdout=subprocess.PIPE, text=True)
    reader = prw.LineReader(loadgen.stdout)
    reader.start()
    reader.wait_for("sending", timeout=300)
    sampler = prw.Sampler({"proxy": gp, "sink": sp})
    machine0 = psutil.cpu_times()
    t0 = time.monotonic()
    cpu0, sink_cpu0 = governor_cpu(gp), prw.cpu_of(sp)
    wait0 = prw.runqueue_wait_s(gov.pid)
    threads0 = thread_cpu(gov.pid)
    sampler.start()
    profile_proc = profile_file = None
    if args.profile:
        OUT.mkdir(parents=True, exist_ok=True)
        ext = {"raw": "txt", "speedscope": "speedscope.json", "flamegraph": "svg"}
        profile_file = OUT / f"{args.profile_name}-{transport}.{ext[args.profile_format]}"
        profile_proc = procs.start(
            "py-spy",
            [
                str(Path(PYTHON).parent / "py-spy"),
                "record",
                "--pid",
                str(gov.pid),
                "--rate",
                str(args.profile_rate),
                "--duration",
                str(int(args.duration)),
                "--format",
                args.profile_format,
                "-o",
                str(profile_file),
                *(["--native"] if args.profile_native else []),
                *(["--gil"] if args.profile_gil else []),
            ],
            tmp / "py-spy.log",
        )
    done = reader.wait_for("done", timeout=args.duration + 120)
    t_load_end = time.monotonic()
    loadgen.wait(30)
    cpu_load = governor_cpu(gp) - cpu0

    # Drain: bounded wait until governor has sent all it received and the sink counted all the
    # loadgen had accepted.
    drained = False
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    received = sent = lost = 0.0
    counted = 0
    while time.monotonic() < deadline:
        m = prw.scrape(tel + "/metrics")
        received = prw.metric_sum(
            m, "governor_datapoints_received_total", pipeline="otlp"
        ) - prw.metric_sum(before, "governor_datapoints_received_total", pipeline="otlp")
        sent = prw.metric_sum(
            m, "governor_datapoints_sent_total", pipeline="otlp"
        ) - prw.metric_sum(before, "governor_datapoints_sent_total", pipeline="otlp")
        lost = prw.metric_sum(
            m, "governor_datapoints_dropped_total", pipeline="otlp"
        ) - prw.metric_sum(before, "governor_datapoints_dropped_total", pipeline="otlp")
        counted = sink_counts(control)["datapoints"] - sink0["datapoints"]
        # Settled: everything received was sent or dropped (and counted as such by governor),
        # and the sink has what was sent.
        if sent + lost >= received and counted >= sent:
            drained = True
            break
        time.sleep(0.2)
    t_drained = time.monotonic()
    cpu = governor_cpu(gp) - cpu0
    sink_cpu = prw.cpu_of(sp) - sink_cpu0
    rq_wait = prw.runqueue_wait_s(gov.pid) - wait0
    per_thread = thread_groups(threads0, thread_cpu(gov.pid), gov.pid)
    machine1 = psutil.cpu_times()
    sampler.stop()
    hwm = prw.hwm_mb(gov.pid)
    threads = gp.num_threads()
    after = prw.scrape(tel + "/metrics")
    sink1 = sink_counts(control)

    def delta(name: str, key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, lbl, v in after:
            if n == name and lbl.get("pipeline") == "otlp":
                prev = prw.metric_sum(before, name, pipeline="otlp", **{key: lbl.get(key, "")})
                if v - prev:
                    out[lbl.get(key, "?")] = out.get(lbl.get(key, "?"), 0) + int(v - prev)
        return out

    receiver_codes = delta("governor_receiver_requests_total", "code")
    rejected = delta("governor_receiver_rejected_requests_total", "reason")
    dropped = delta("governor_datapoints_dropped_total", "reason")
    export_outcomes = delta("governor_export_requests_total", "outcome")
    retries = int(
        prw.metric_sum(after, "governor_export_retries_total", pipeline="otlp")
        - prw.metric_sum(before, "governor_export_retries_total", pipeline="otlp")
    )

    profile_summary = None
    if profile_proc is not None:
        try:
            profile_proc.wait(args.duration + 60)
        except subprocess.TimeoutExpired:
            prw.Procs.stop(profile_proc)
        if profile_file and profile_file.exists() and args.profile_format != "flamegraph":
            stages = prw._STAGES
            prw._STAGES = OTLP_STAGES
            try:
                profile_summary = prw.summarise_profile(profile_file, args.profile_format)
            finally:
                prw._STAGES = stages
            (OUT / f"{args.profile_name}-{transport}_summary.txt").write_text(profile_summary)

    prw.Procs.stop(gov, timeout=30)
    log_tail = (tmp / "governor.log").read_text(errors="replace")
    warnings = [line for line in log_tail.splitlines() if line.strip()][-20:]
    prw.Procs.stop(sink)

    window = t_drained - t0
    busy = sum(
        getattr(machine1, f) - getattr(machine0, f)
        for f in ("user", "nice", "system", "irq", "softirq", "steal")
    )
    wall = sum(machine1) - sum(machine0)
    delivered = sink1["datapoints"] - sink0["datapoints"]
    return {
        "transport": transport,
        "run": run,
        "profiled": bool(profile_proc),
        "client_compression": compression,
        "connections": connections,
        "export_protocol": args.export_protocol,
        "export_compression": args.export_compression,
        "datapoints_per_request": done["datapoints_per_request"],
        "request_bytes_serialized": done["request_bytes_serialized"],
        "request_bytes_sent": done["request_bytes_sent"],
        "offered_datapoints_per_s": done["offered_datapoints_per_s"],
        "accepted_datapoints_per_s": done["accepted_datapoints_per_s"],
        "delivered_datapoints_per_s": round(delivered / window, 1) if window else 0.0,
        "datapoints_offered": done["datapoints_offered"],
        "datapoints_accepted": done["datapoints_accepted"],
        "datapoints_received_by_governor": int(received),
        "datapoints_sent_by_governor": int(sent),
        "datapoints_delivered": delivered,
        "delivered_equals_offered": delivered == done["datapoints_offered"],
        "sink_requests": sink1["requests"] - sink0["requests"],
        "sink_errors": sink1["errors"] - sink0["errors"],
        "drained": drained,
        "drain_s": round(t_drained - t_load_end, 2),
        "cpu_s": round(cpu, 3),
        "cpu_s_load_window": round(cpu_load, 3),
        "datapoints_per_cpu_s": round(delivered / cpu, 0) if cpu else None,
        "cpu_s_per_million_datapoints": round(cpu / delivered * 1e6, 3) if delivered else None,
        "cpu_cores_avg": round(cpu / window, 3) if window else None,
        "runqueue_wait_s": round(rq_wait, 3),
        "peak_rss_mb": round(hwm, 1),
        "peak_rss_sampled_mb": round(sampler.peak_rss_mb("proxy"), 1),
        "governor_threads": threads,
        "governor_cpu_s_by_thread": per_thread,
        "receiver_status_codes": receiver_codes,
        "receiver_rejected_reasons": rejected,
        "datapoints_dropped": dropped,
        "export_outcomes": export_outcomes,
        "export_retries": retries,
        "loadgen_status_codes": done["status_counts"],
        "loadgen_latency_ms_p50": done["latency_ms_p50"],
        "loadgen_latency_ms_p99": done["latency_ms_p99"],
        "loadgen_max_schedule_lag_ms": done["max_schedule_lag_ms"],
        "loadgen_requests_late_over_50ms": done["requests_late_over_50ms"],
        "loadgen_cpu_s": done["loadgen_cpu_s"],
        "sink_cpu_s": round(sink_cpu, 3),
        "machine_busy_pct": round(busy / wall * 100, 1) if wall else None,
        "machine_steal_pct": round((machine1.steal - machine0.steal) / wall * 100, 2)
        if wall
        else None,
        "proxy_cpu_cores_timeline": sampler.cpu_series("proxy"),
        "governor_log_tail": warnings,
        "profile_file": str(profile_file) if profile_file else None,
        "profile_summary": profile_summary,
    }


def measure(transport: str, args: argparse.Namespace, run: int) -> dict[str, Any]:
    procs = prw.Procs(pin=args.pin)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-otlp-{transport}-"))
    try:
        sha = prw.code_state()["service_sha256"]
        return {**run_load(transport, args, run, procs, tmp), "service_sha256": sha}
    except Exception:
        for log in sorted(tmp.glob("*.log")):
            tail = log.read_text(errors="replace")[-2000:]
            print(f"--- {log.name} (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# ---- report -----------------------------------------------------------------------------------

_FIGURES = [
    ("offered_datapoints_per_s", "offered datapoints/s", "{:,.0f}"),
    ("delivered_datapoints_per_s", "achieved datapoints/s at the sink (to drained)", "{:,.0f}"),
    ("drain_s", "drain time after load, s", "{:.2f}"),
    ("cpu_s", "governor CPU-seconds (load start to drained)", "{:.2f}"),
    ("cpu_cores_avg", "governor CPU, cores (average)", "{:.3f}"),
    ("cpu_s_per_million_datapoints", "governor CPU-s per million datapoints", "{:.3f}"),
    ("datapoints_per_cpu_s", "datapoints per governor CPU-second", "{:,.0f}"),
    ("runqueue_wait_s", "governor time waiting for a CPU (runqueue), s", "{:.2f}"),
    ("peak_rss_mb", "governor peak RSS, MB (VmHWM)", "{:.1f}"),
    ("peak_rss_sampled_mb", "governor peak RSS, MB (0.5 s samples)", "{:.1f}"),
    ("loadgen_latency_ms_p50", "request latency p50, ms", "{:.2f}"),
    ("loadgen_latency_ms_p99", "request latency p99, ms", "{:.2f}"),
    ("loadgen_cpu_s", "loadgen CPU-seconds", "{:.2f}"),
    ("sink_cpu_s", "sink CPU-seconds", "{:.2f}"),
    ("machine_busy_pct", "machine busy, % of all cores", "{:.1f}"),
    ("machine_steal_pct", "machine steal, %", "{:.2f}"),
]


def median_of(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def report(results: list[dict], args: argparse.Namespace, transports: list[str]) -> dict:
    medians = {
        t: {k: median_of([r for r in results if r["transport"] == t], k) for k, _, _ in _FIGURES}
        for t in transports
    }
    r0 = results[0]
    print(
        f"\n== OTLP e2e: {args.rate:,.0f} datapoints/s offered for {args.duration:.0f}s, "
        f"{r0['datapoints_per_request']} datapoints x {ATTRIBUTES} attributes per request "
        f"({r0['request_bytes_serialized']:,} bytes serialized), {args.runs} run(s); "
        f"export {args.export_protocol} ({args.export_compression}) to a counting sink =="
    )
    for t in transports:
        runs = [r for r in results if r["transport"] == t]
        client = (
            f"OTLP/HTTP protobuf, {runs[0]['client_compression']} bodies "
            f"({runs[0]['request_bytes_sent']:,} bytes), {runs[0]['connections']} keep-alive "
            "HTTP/1.1 connections"
            if t == "http"
            else f"OTLP/gRPC (grpcio client), {runs[0]['client_compression']}, "
            f"{runs[0]['connections']} channels x {args.grpc_calls_per_channel} calls in flight"
        )
        print(f"\n{t}: {client}" + (" (PROFILED: py-spy attached)" if runs[0]["profiled"] else ""))
        print(f"  {'figure':48s} {'median':>12s}  per run")
        for key, label, fmt in _FIGURES:
            med = medians[t][key]
            per = ", ".join(fmt.format(r[key]) if r[key] is not None else "-" for r in runs)
            print(f"  {label:48s} {fmt.format(med) if med is not None else '-':>12s}  [{per}]")
        for r in runs:
            print(
                f"  run {r['run']}: delivered == offered: {r['delivered_equals_offered']} "
                f"({r['datapoints_delivered']:,} at the sink of {r['datapoints_offered']:,} "
                f"offered, {r['datapoints_accepted']:,} accepted); drained={r['drained']}; "
                f"receiver codes {r['receiver_status_codes']}, loadgen {r['loadgen_status_codes']}"
                f"; export {r['export_outcomes']}, retries {r['export_retries']}"
                + (f", dropped {r['datapoints_dropped']}" if r["datapoints_dropped"] else "")
                + (
                    f", rejected {r['receiver_rejected_reasons']}"
                    if r["receiver_rejected_reasons"]
                    else ""
                )
                + (f", sink errors {r['sink_errors']}" if r["sink_errors"] else "")
            )
            print(f"    governor CPU-s by thread: {r['governor_cpu_s_by_thread']}")
    if not any(r["profiled"] for r in results) and args.rate == 100_000:
        print("\ntargets (medians, at 100k datapoints/s offered)")
        for t in transports:
            spc = medians[t]["datapoints_per_cpu_s"] or 0
            verdict = "met" if spc >= TARGETS[t] else "NOT met"
            print(f"  {t}: datapoints per CPU-second >= {TARGETS[t]:,}: {spc:,.0f} -> {verdict}")
    for r in results:
        if r.get("profile_summary"):
            print(f"\n[{r['transport']}] {r['profile_summary']}")
            print(f"profile written to {r['profile_file']}")
    return {"medians": medians}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadgen"]:
        return loadgen_main(argv[1:])
    if argv[:1] == ["sink"]:
        return sink_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=100_000, help="offered datapoints/s")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per measurement")
    p.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    p.add_argument("--transport", default="http,grpc", help="comma-separated: http, grpc")
    p.add_argument("--export-protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument(
        "--export-compression",
        choices=("gzip", "zstd", "none"),
        default="gzip",
        help="governor's otlp.exporters[].compression (default gzip, governor's default)",
    )
    p.add_argument("--http-compression", choices=("gzip", "none"), default="gzip")
    p.add_argument("--grpc-compression", choices=("gzip", "none"), default="gzip")
    p.add_argument(
        "--connections",
        type=int,
        default=8,
        help="loadgen keep-alive connections (http) or channels, each its own connection (grpc)",
    )
    p.add_argument(
        "--grpc-calls-per-channel",
        type=int,
        default=4,
        help="grpc: loadgen threads per channel, each with one blocking call in flight",
    )
    p.add_argument("--points-per-metric", type=int, default=100, help="x 10 metrics per request")
    p.add_argument("--pool", type=int, default=100, help="distinct requests in the loadgen pool")
    p.add_argument("--pin", action="store_true", help="governor alone on the last CPU")
    p.add_argument("--profile", action="store_true", help="py-spy governor during the load")
    p.add_argument("--profile-format", choices=("raw", "speedscope", "flamegraph"), default="raw")
    p.add_argument("--profile-name", default="profile_otlp", help="file name stem in bench/out/")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native")
    p.add_argument(
        "--profile-gil",
        action="store_true",
        help="py-spy --gil: only the thread holding the GIL (py-spy otherwise counts grpcio's "
        "threads waiting for the GIL or a CPU as busy)",
    )
    p.add_argument(
        "--governor-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for governor (experiments)",
    )
    p.add_argument("--json-out", type=Path, help="where to write the JSON results")
    args = p.parse_args(argv)
    transports = list(dict.fromkeys(t.strip() for t in args.transport.split(",") if t.strip()))
    if not transports or any(t not in ("http", "grpc") for t in transports):
        p.error("--transport takes http and/or grpc")
    if args.runs < 1 or args.duration <= 0 or args.rate <= 0 or args.points_per_metric <= 0:
        p.error("--runs, --duration, --rate and --points-per-metric must be positive")

    results = []
    started = datetime.datetime.now(datetime.UTC)
    code = prw.code_state()
    for run in range(1, args.runs + 1):
        order = transports if run % 2 else list(reversed(transports))  # alternate who goes first
        for transport in order:
            print(f"run {run}/{args.runs}: {transport} ...", file=sys.stderr, flush=True)
            r = measure(transport, args, run)
            results.append(r)
            print(
                f"  {transport}: {r['datapoints_per_cpu_s'] or 0:,.0f} datapoints/CPU-s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB, codes {r['receiver_status_codes']}, "
                f"delivered == offered: {r['delivered_equals_offered']}",
                file=sys.stderr,
                flush=True,
            )
    summary = report(results, args, transports)
    changed = len(code.get("service_changes", []))
    shas = sorted({r["service_sha256"] for r in results})
    if shas != [code["service_sha256"]]:
        print(f"\nWARNING: service/ changed during the runs (sources sha256 {', '.join(shas)})")
    print(
        f"\ncode measured: HEAD {code.get('head', '?')}, {changed} uncommitted change(s) in "
        f"service/, service sources sha256 {code['service_sha256']}"
        + (f"; governor env {args.governor_env}" if args.governor_env else "")
        + ("; pinned (--pin)" if args.pin else "")
    )
    OUT.mkdir(parents=True, exist_ok=True)
    out = args.json_out or OUT / f"e2e_otlp_{started:%Y%m%dT%H%M%SZ}.json"
    doc = {
        "started": started.isoformat(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "host": {"nproc": os.cpu_count(), "load_avg": os.getloadavg()},
        "code": code,
        **summary,
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=2))
    print(f"\nJSON: {out}")
    all_delivered = all(r["delivered_equals_offered"] for r in results)
    if not all_delivered:
        print("NOT every offered datapoint reached the sink (see the runs above)", file=sys.stderr)
    return 0 if all_delivered else 1


if __name__ == "__main__":
    sys.exit(main())
