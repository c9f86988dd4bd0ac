"""Synthetic Prometheus Remote Write 1.0 workload shared by the benchmarks.

Series look like what a Kubernetes Prometheus ships: 10 labels each (``__name__`` plus cluster,
namespace, job, instance, pod, container and three metric-specific labels), sorted by name, one
sample per series. Every series in a pool is distinct.

A request is pre-encoded once as a *template*: the serialized WriteRequest cut at the position of
every sample timestamp. The timestamp of a ms epoch between 2**35 and 2**42 (years 1971-2109) is a
6-byte protobuf varint, so a request for any such timestamp is ``varint(ts).join(template)``: no
re-encoding, and byte-for-byte what ``WriteRequest.SerializeToString()`` gives for that timestamp.
"""

from __future__ import annotations

import random

import cramjam

from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import Label, Sample, TimeSeries

LABELS_PER_SERIES = 10
_TS_MIN, _TS_MAX = 1 << 35, 1 << 42  # ms timestamps whose varint is exactly 6 bytes
_SENTINEL_TS = _TS_MIN + 12345

# (metric name, three metric-specific labels with their possible values)
_METRICS: list[tuple[str, list[tuple[str, list[str]]]]] = [
    (
        "http_server_requests_seconds_count",
        [
            ("method", ["GET", "POST", "PUT", "DELETE", "PATCH"]),
            ("status", ["200", "201", "204", "301", "400", "401", "404", "429", "500", "503"]),
            ("uri", [f"/api/v{v}/{r}" for v in (1, 2) for r in ("orders", "users", "carts")]),
        ],
    ),
    (
        "container_cpu_usage_seconds_total",
        [
            ("cpu", ["total", *[f"cpu{i}" for i in range(8)]]),
            ("image", [f"registry.example.com/team/app:{v}" for v in ("1.4.2", "1.5.0", "2.0.1")]),
            ("node", [f"ip-10-0-{i}-{j}.ec2.internal" for i in range(4) for j in (11, 57, 203)]),
        ],
    ),
    (
        "container_memory_working_set_bytes",
        [
            ("id", [f"/kubepods/burstable/pod{i:04x}" for i in range(16)]),
            ("image", [f"registry.example.com/team/app:{v}" for v in ("1.4.2", "1.5.0", "2.0.1")]),
            ("node", [f"ip-10-0-{i}-{j}.ec2.internal" for i in range(4) for j in (11, 57, 203)]),
        ],
    ),
    (
        "node_network_receive_bytes_total",
        [
            ("device", ["eth0", "eth1", "lo", "cni0", "flannel.1", "veth1a2b3c"]),
            ("node", [f"ip-10-0-{i}-{j}.ec2.internal" for i in range(4) for j in (11, 57, 203)]),
            ("zone", ["eu-west-1a", "eu-west-1b", "eu-west-1c"]),
        ],
    ),
    (
        "grpc_server_handled_total",
        [
            ("grpc_code", ["OK", "Canceled", "DeadlineExceeded", "NotFound", "Unavailable"]),
            ("grpc_method", ["GetOrder", "ListOrders", "CreateOrder", "Watch", "Check"]),
            ("grpc_service", ["shop.v1.OrderService", "grpc.health.v1.Health"]),
        ],
    ),
    (
        "process_resident_memory_bytes",
        [
            ("build", ["a1b2c3d", "e4f5a6b", "c7d8e9f"]),
            ("runtime", ["go1.22.5", "go1.23.1", "jvm-21", "python-3.12"]),
            ("zone", ["eu-west-1a", "eu-west-1b", "eu-west-1c"]),
        ],
    ),
    (
        "kafka_consumergroup_lag",
        [
            ("consumergroup", [f"{s}-consumer" for s in ("billing", "search", "audit", "mail")]),
            ("partition", [str(i) for i in range(12)]),
            ("topic", ["orders", "payments", "events.v2", "clickstream"]),
        ],
    ),
    (
        "http_client_request_duration_seconds_bucket",
        [
            ("host", ["payments.internal", "auth.internal", "s3.eu-west-1.amazonaws.com"]),
            ("le", ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "+Inf"]),
            ("method", ["GET", "POST"]),
        ],
    ),
]
_NAMESPACES = ["shop", "payments", "search", "platform", "monitoring", "ingest", "auth", "mail"]
_APPS = ["api", "worker", "frontend", "gateway", "indexer", "scheduler", "consumer", "cache"]


def series_labels(index: int, rng: random.Random) -> list[tuple[str, str]]:
    """The sorted labels of series number `index`; distinct indexes give distinct series."""
    name, extra = _METRICS[index % len(_METRICS)]
    n = index // len(_METRICS)
    ns = _NAMESPACES[n % len(_NAMESPACES)]
    app = _APPS[(n // len(_NAMESPACES)) % len(_APPS)]
    # The pod number carries the rest of the index, so that the identity is unique.
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
    labels += [(key, rng.choice(values)) for key, values in extra]
    labels.sort()
    assert len(labels) == LABELS_PER_SERIES
    return labels


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def ts_varint(ts_ms: int) -> bytes:
    """The 6-byte varint of a ms timestamp (the join key of a template)."""
    if not _TS_MIN <= ts_ms < _TS_MAX:
        raise ValueError(f"timestamp {ts_ms} is outside the 6-byte varint range")
    return _varint(ts_ms)


def build_template(first_series: int, n_series: int, rng: random.Random) -> list[bytes]:
    """A WriteRequest of series first_series .. first_series+n_series-1, cut at each timestamp."""
    sentinel = ts_varint(_SENTINEL_TS)
    pieces: list[bytes] = []
    pending = b""
    for i in range(first_series, first_series + n_series):
        ts = TimeSeries(
            labels=[Label(name=k, value=v) for k, v in series_labels(i, rng)],
            samples=[Sample(value=float(rng.randrange(0, 10_000_000)), timestamp=_SENTINEL_TS)],
        )
        body = ts.SerializeToString()
        # labels (field 1) come before samples (field 2); in a sample, the timestamp is last.
        assert body.endswith(sentinel)
        # WriteRequest.timeseries is field 1, length-delimited: tag 0x0a, length, message.
        pending += b"\x0a" + _varint(len(body)) + body[: -len(sentinel)]
        pieces.append(pending)
        pending = b""
    pieces.append(b"")
    return pieces


def render(template: list[bytes], ts_ms: int) -> bytes:
    """The serialized WriteRequest of `template` with every sample at `ts_ms`."""
    return ts_varint(ts_ms).join(template)


def compress(raw: bytes) -> bytes:
    """Snappy block format, as remote write sends it."""
    return bytes(cramjam.snappy.compress_raw(raw))


def check_template(template: list[bytes], ts_ms: int, n_series: int) -> None:
    """Parse a rendered template back (a sanity check, run once per pool)."""
    req = WriteRequest.FromString(render(template, ts_ms))
    if len(req.timeseries) != n_series:
        raise RuntimeError("template renders the wrong number of series")
    for ts in req.timeseries:
        if len(ts.labels) != LABELS_PER_SERIES or ts.samples[0].timestamp != ts_ms:
            raise RuntimeError("template renders a malformed series")


def build_pool(
    n_requests: int, series_per_request: int, seed: int = 1, first_series: int = 0
) -> list[list[bytes]]:
    """`n_requests` templates of distinct series, checked once."""
    rng = random.Random(seed)
    pool = [
        build_template(first_series + r * series_per_request, series_per_request, rng)
        for r in range(n_requests)
    ]
    check_template(pool[0], _SENTINEL_TS + 1, series_per_request)
    check_template(pool[-1], _SENTINEL_TS + 2, series_per_request)
    return pool
