"""The configuration tree: frozen attrs classes, built from YAML plus CLI flags.

This module owns every setting and its validation. Loading reports every problem at once, each with
the key's path (`prw.exporters[0].timeout_s: must be > 0`); it never half-applies a config.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import yaml

MiB = 1024 * 1024


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every problem as 'path: reason'."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


# ---- field validators -------------------------------------------------------------------------


def _positive(_inst: object, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:  # written so that NaN fails too
        raise ValueError("must be > 0")


def _non_negative(_inst: object, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:  # written so that NaN fails too
        raise ValueError("must be >= 0")


def _fraction(_inst: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError("must be between 0 and 1")


_LISTEN_RE = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})$")


def parse_listen(value: str) -> tuple[str, int]:
    """Split 'host:port', '[v6]:port' or ':port' (all interfaces); raises ValueError."""
    m = _LISTEN_RE.match(value)
    if not m or int(m["port"]) > 65535:
        raise ValueError(f"{value!r} is not host:port")
    host = m["v6"] if m["v6"] is not None else (m["host"] or "0.0.0.0")
    return host, int(m["port"])


def _listen(_inst: object, attribute: attrs.Attribute, value: str) -> None:
    parse_listen(value)


def _http_url(_inst: object, attribute: attrs.Attribute, value: str) -> None:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")


def _endpoint(_inst: object, attribute: attrs.Attribute, value: str) -> None:
    if not re.match(r"^https?://[^/\s]+", value):
        parse_listen(value)  # host:port (gRPC)


# ---- the tree ---------------------------------------------------------------------------------


@attrs.frozen
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "logfmt"] = "json"
    # Repeated warnings about bad input are logged at most once per reason per interval.
    rate_limit_interval_s: float = attrs.field(default=10.0, validator=_positive)


@attrs.frozen
class TelemetryConfig:
    listen: str = attrs.field(default=":8888", validator=_listen)


def _listen_or_off(_inst: object, attribute: attrs.Attribute, value: str) -> None:
    if value:
        parse_listen(value)


@attrs.frozen
class ReceiverAuthConfig:
    # Empty: no authentication. Otherwise a request must carry `Authorization: Bearer <token>`
    # (gRPC: the `authorization` metadata) with one of these tokens.
    bearer_tokens: list[str] = attrs.field(factory=list)
    bearer_tokens_file: str = ""  # one token per line, read at start

    @property
    def enabled(self) -> bool:
        return bool(self.bearer_tokens or self.bearer_tokens_file)


@attrs.frozen
class IngestConfig:
    """Limits every receiver shares: request sizes, concurrency, the hand-off to the batcher."""

    # vmagent's own limit for a remote-write request is 32 MB; Prometheus sends a few hundred KiB.
    max_request_bytes: int = attrs.field(default=8 * MiB, validator=_positive)
    max_decompressed_bytes: int = attrs.field(default=32 * MiB, validator=_positive)
    # Requests read, decompressed and decoded at the same time; more wait (up to ingest_wait_s)
    # and then get 429. With the two limits above this bounds the memory of requests in progress.
    max_concurrent_requests: int = attrs.field(default=16, validator=_positive)
    # Accepted requests waiting for the next stage, by count and by the bytes held (snappy
    # blocks; the open batch counts too); a request that finds no room in time gets 429.
    ingest_queue_requests: int = attrs.field(default=64, validator=_positive)
    ingest_max_bytes: int = attrs.field(default=128 * MiB, validator=_positive)
    # How long a request may wait for room in the ingest channel before it is answered 429.
    ingest_wait_s: float = attrs.field(default=0.5, validator=_non_negative)
    retry_after_s: int = attrs.field(default=1, validator=_positive)
    auth: ReceiverAuthConfig = attrs.field(factory=ReceiverAuthConfig)


@attrs.frozen(slots=False)  # a mixin: two slotted bases cannot share a subclass
class HTTPServerConfig:
    # A keep-alive connection is closed after this many requests (hypercorn's default of 1000
    # made long-lived remote-write clients reconnect constantly).
    keep_alive_max_requests: int = attrs.field(default=1_000_000, validator=_positive)
    # An idle keep-alive connection is closed after this; Go clients keep theirs 90 s.
    keep_alive_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    # A request's head and body must arrive within this, or the connection is closed.
    read_timeout_s: float = attrs.field(default=30.0, validator=_positive)


@attrs.frozen
class ReceiverConfig(IngestConfig, HTTPServerConfig):
    listen: str = attrs.field(default=":9091", validator=_listen)


@attrs.frozen
class OTLPHTTPReceiverConfig(HTTPServerConfig):
    # Empty: no OTLP/HTTP receiver.
    listen: str = attrs.field(default=":4318", validator=_listen_or_off)


@attrs.frozen
class OTLPGRPCReceiverConfig:
    # Empty: no OTLP/gRPC receiver.
    listen: str = attrs.field(default=":4317", validator=_listen_or_off)
    # Server keepalive (grpc-go's names): ping an idle connection after keepalive_time_s, close
    # it when the ping is not answered within keepalive_timeout_s.
    keepalive_time_s: float = attrs.field(default=7200.0, validator=_positive)
    keepalive_timeout_s: float = attrs.field(default=20.0, validator=_positive)
    # Clients may ping this often (also without calls in flight); faster pings are refused.
    min_ping_interval_s: float = attrs.field(default=10.0, validator=_positive)
    # 0: never. Closing connections now and then spreads clients over replicas behind a
    # load balancer.
    max_connection_idle_s: float = attrs.field(default=0.0, validator=_non_negative)
    max_connection_age_s: float = attrs.field(default=0.0, validator=_non_negative)
    max_connection_age_grace_s: float = attrs.field(default=0.0, validator=_non_negative)
    # Threads of grpcio's server; each holds one call while it waits for the pipeline.
    threads: int = attrs.field(default=16, validator=_positive)


@attrs.frozen
class OTLPReceiverConfig(IngestConfig):
    grpc: OTLPGRPCReceiverConfig = attrs.field(factory=OTLPGRPCReceiverConfig)
    http: OTLPHTTPReceiverConfig = attrs.field(factory=OTLPHTTPReceiverConfig)


@attrs.frozen
class BatchConfig:
    max_series: int = attrs.field(default=10_000, validator=_positive)
    max_bytes: int = attrs.field(default=4 * MiB, validator=_positive)  # uncompressed protobuf
    interval_s: float = attrs.field(default=1.0, validator=_positive)
    # Disk and hybrid modes, where clients wait for their batch to be queued: once nothing more
    # is ready, wait this long for other requests to join, then flush. Measured: 0 made one
    # small batch (and one export request) per client request.
    ack_linger_s: float = attrs.field(default=0.01, validator=_non_negative)


@attrs.frozen
class QueueConfig:
    # memory: lost on a crash; disk: survives restarts and kill -9; hybrid: memory first, disk
    # past spill_at of max_memory_bytes (see docs/queue.md).
    mode: Literal["memory", "disk", "hybrid"] = "memory"
    # Memory mode: both bounds apply; whichever is reached first makes the queue full.
    max_batches: int = attrs.field(default=10_000, validator=_positive)
    # Compressed payload bytes: in RAM (memory mode) or on disk per exporter (disk mode).
    max_bytes: int = attrs.field(default=256 * MiB, validator=_positive)
    # drop_oldest (like vmagent): a slow or dead backend loses its oldest data, not the others.
    full_behavior: Literal["block", "drop_oldest", "drop_newest"] = "drop_oldest"
    # Disk mode: one subdirectory per exporter under this (systemd's StateDirectory).
    dir: str = "/var/lib/governor/queue"
    segment_bytes: int = attrs.field(default=64 * MiB, validator=_positive)
    # Disk mode: answer a client only once its data is fsynced (group commit shares fsyncs).
    durable_ack: bool = False
    # Disk mode without durable_ack: the most a power loss can take.
    sync_interval_s: float = attrs.field(default=1.0, validator=_positive)
    # Hybrid mode: the memory part's budget, and the share of it after which batches go to disk.
    max_memory_bytes: int = attrs.field(default=64 * MiB, validator=_positive)
    spill_at: float = attrs.field(default=0.8, validator=_fraction)


@attrs.frozen
class RetryConfig:
    initial_delay_s: float = attrs.field(default=0.5, validator=_positive)
    max_delay_s: float = attrs.field(default=30.0, validator=_positive)
    multiplier: float = attrs.field(default=2.0, validator=_positive)
    jitter: float = attrs.field(default=0.2, validator=_fraction)
    # A Retry-After longer than this is clipped, so a confused backend cannot park us for days.
    max_retry_after_s: float = attrs.field(default=300.0, validator=_positive)
    # 0 retries a retryable failure until it succeeds (the queue holds the rest), like vmagent.
    max_elapsed_s: float = attrs.field(default=0.0, validator=_non_negative)


@attrs.frozen
class BreakerConfig:
    failure_threshold: int = attrs.field(default=5, validator=_positive)
    open_s: float = attrs.field(default=5.0, validator=_positive)
    # Each failed probe doubles the open time, up to this.
    max_open_s: float = attrs.field(default=60.0, validator=_positive)


@attrs.frozen
class BasicAuthConfig:
    username: str = ""
    password: str = ""
    password_file: str = ""


@attrs.frozen
class PRWExporterConfig:
    url: str = attrs.field(validator=_http_url)
    name: str = ""  # label for metrics and logs; defaults to host:port/path without credentials
    timeout_s: float = attrs.field(default=30.0, validator=_positive)
    workers: int = attrs.field(default=2, validator=_positive)
    headers: dict[str, str] = attrs.field(factory=dict)
    bearer_token: str = ""
    bearer_token_file: str = ""
    basic_auth: BasicAuthConfig | None = None
    retry: RetryConfig = attrs.field(factory=RetryConfig)
    breaker: BreakerConfig = attrs.field(factory=BreakerConfig)


@attrs.frozen
class PRWConfig:
    receiver: ReceiverConfig = attrs.field(factory=ReceiverConfig)
    batch: BatchConfig = attrs.field(factory=BatchConfig)
    queue: QueueConfig = attrs.field(factory=QueueConfig)
    exporters: list[PRWExporterConfig] = attrs.field(factory=list)


@attrs.frozen
class OTLPBatchConfig:
    # The OpenTelemetry Collector's batch processor sends 8192 by default.
    max_datapoints: int = attrs.field(default=8192, validator=_positive)
    max_bytes: int = attrs.field(default=4 * MiB, validator=_positive)  # serialized protobuf
    interval_s: float = attrs.field(default=1.0, validator=_positive)
    ack_linger_s: float = attrs.field(default=0.01, validator=_non_negative)


@attrs.frozen
class TLSConfig:
    # PEM files. With none set, an https:// endpoint is verified against the system's CAs.
    ca_file: str = ""
    cert_file: str = ""  # client certificate (mutual TLS), with key_file
    key_file: str = ""


@attrs.frozen
class OTLPExporterConfig:
    # http: the URL to POST to (a URL without a path gets /v1/metrics, as OTEL_EXPORTER_OTLP_
    # ENDPOINT does). grpc: host:port, or http://host:port; https://host:port uses TLS.
    endpoint: str = attrs.field(validator=_endpoint)
    protocol: Literal["grpc", "http"] = "grpc"
    name: str = ""
    timeout_s: float = attrs.field(default=10.0, validator=_positive)
    workers: int = attrs.field(default=2, validator=_positive)
    # The OTLP exporters of the SDKs and the Collector send gzip by default; zstd is HTTP only.
    compression: Literal["gzip", "zstd", "none"] = "gzip"
    headers: dict[str, str] = attrs.field(factory=dict)
    bearer_token: str = ""
    bearer_token_file: str = ""
    tls: TLSConfig = attrs.field(factory=TLSConfig)
    retry: RetryConfig = attrs.field(factory=RetryConfig)
    breaker: BreakerConfig = attrs.field(factory=BreakerConfig)


@attrs.frozen
class OTLPConfig:
    receiver: OTLPReceiverConfig = attrs.field(factory=OTLPReceiverConfig)
    batch: OTLPBatchConfig = attrs.field(factory=OTLPBatchConfig)
    queue: QueueConfig = attrs.field(factory=QueueConfig)
    exporters: list[OTLPExporterConfig] = attrs.field(factory=list)


@attrs.frozen
class RulesConfig:
    # The rules file (YAML; docs/rules.md). Empty: no rules, data passes untouched. Read at
    # start and again on SIGHUP; a bad file at start stops the start, on SIGHUP keeps the old.
    file: str = ""
    # How often windows that are due are emitted and rules are checked for being dead.
    tick_s: float = attrs.field(default=0.5, validator=_positive)
    # Remote write: distinct series whose way through the rules is remembered (about 0.1 KB
    # each when the rules leave them alone or drop them, 0.4 KB when they relabel them, 1-2 KB
    # when they sample or window them); past it the memory starts again. Size it to the active
    # series: a smaller cache keeps running the rules afresh.
    route_cache_series: int = attrs.field(default=1_000_000, validator=_positive)


@attrs.frozen
class StatsConfig:
    # none: no stats. basic: datapoints per metric name. full: also active series per metric
    # (cardinality), the top label values per metric, and datapoints and series per
    # combination of `labels` (docs/limits.md).
    level: Literal["none", "basic", "full"] = "none"
    # full: the label combination that stats are kept for, e.g. [service, namespace].
    labels: list[str] = attrs.field(factory=list)
    # Series count as active in the window they were seen in and the one after (so series that
    # stopped count down within two windows); datapoint counts are per window.
    window_s: float = attrs.field(default=60.0, validator=_positive)
    # /metrics exposes the top this-many metrics by series and by datapoints, so governor's own
    # metrics stay bounded whatever the clients send.
    top_k: int = attrs.field(default=20, validator=_positive)
    # A tracker counts exactly up to this many series, then with a HyperLogLog (16 KiB, ~1 %).
    exact_limit: int = attrs.field(default=1000, validator=_positive)
    # Distinct metric names (and label combinations) tracked; past it the rest count under
    # `__other__`.
    max_metrics: int = attrs.field(default=10_000, validator=_positive)
    # full: distinct values of one label kept per metric for the top-values report.
    max_label_values: int = attrs.field(default=100, validator=_positive)


@attrs.frozen
class LimitsConfig:
    # The limits file (YAML; docs/limits.md). Empty: no limits. Read at start and on SIGHUP; a
    # bad file at start stops the start, on SIGHUP keeps the old limits.
    file: str = ""
    # Count and log everything as if enforced, drop nothing (overrides every rule's dry_run).
    dry_run: bool = False
    # Distinct series whose facts (name, labels, groups, admission) are remembered for stats
    # and limits (0.3-0.6 KB each, ~50 bytes for basic stats alone on remote write, per
    # pipeline); past it the memory starts again. Size it to the active series.
    series_cache: int = attrs.field(default=1_000_000, validator=_positive)


@attrs.frozen
class Config:
    log: LogConfig = attrs.field(factory=LogConfig)
    telemetry: TelemetryConfig = attrs.field(factory=TelemetryConfig)
    prw: PRWConfig = attrs.field(factory=PRWConfig)
    otlp: OTLPConfig = attrs.field(factory=OTLPConfig)
    rules: RulesConfig = attrs.field(factory=RulesConfig)
    stats: StatsConfig = attrs.field(factory=StatsConfig)
    limits: LimitsConfig = attrs.field(factory=LimitsConfig)
    # Phase two of shutdown starts this long after SIGTERM: what is still queued is then dropped
    # (memory queue) and counted.
    shutdown_grace_s: float = attrs.field(default=30.0, validator=_positive)


def _cross_checks(cfg: Config) -> list[str]:
    problems = []
    if not cfg.prw.exporters and not cfg.otlp.exporters:
        problems.append(
            "prw.exporters, otlp.exporters: at least one exporter is required "
            "(or --prw-export-url / --otlp-export-endpoint)"
        )
    for pipeline, exporters in (("prw", cfg.prw.exporters), ("otlp", cfg.otlp.exporters)):
        for i, exp in enumerate(exporters):
            problems += _exporter_checks(exp, f"{pipeline}.exporters[{i}]")
        names = [exporter_name(e) for e in exporters]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(
                f"{pipeline}.exporters: two exporters are named {name!r}; give them distinct names"
            )
        pcfg = getattr(cfg, pipeline)
        problems += _queue_checks(pcfg.queue, f"{pipeline}.queue")
        problems += _ingest_checks(pcfg.receiver, f"{pipeline}.receiver")
    if cfg.rules.file and not os.access(cfg.rules.file, os.R_OK):
        problems.append(f"rules.file: cannot read {cfg.rules.file}")
    if cfg.limits.file and not os.access(cfg.limits.file, os.R_OK):
        problems.append(f"limits.file: cannot read {cfg.limits.file}")
    rc = cfg.otlp.receiver
    if cfg.otlp.exporters and not rc.grpc.listen and not rc.http.listen:
        problems.append("otlp.receiver: both grpc.listen and http.listen are empty")
    return problems


def _exporter_checks(exp: PRWExporterConfig | OTLPExporterConfig, path: str) -> list[str]:
    problems = []
    ba = getattr(exp, "basic_auth", None)
    if exp.bearer_token and exp.bearer_token_file:
        problems.append(f"{path}: set bearer_token or bearer_token_file, not both")
    if (exp.bearer_token or exp.bearer_token_file) and ba is not None:
        problems.append(f"{path}: set bearer token or basic_auth, not both")
    if ba is not None:
        if ba.password and ba.password_file:
            problems.append(f"{path}.basic_auth: set password or password_file, not both")
        if not ba.username:
            problems.append(f"{path}.basic_auth.username: required")
    files = [
        ("bearer_token_file", exp.bearer_token_file),
        ("basic_auth.password_file", ba.password_file if ba else ""),
    ]
    if isinstance(exp, OTLPExporterConfig):
        files += [(f"tls.{k}", getattr(exp.tls, k)) for k in ("ca_file", "cert_file", "key_file")]
        if bool(exp.tls.cert_file) != bool(exp.tls.key_file):
            problems.append(f"{path}.tls: cert_file and key_file go together")
        if exp.protocol == "grpc" and exp.compression == "zstd":
            problems.append(f"{path}.compression: zstd is for protocol http; gRPC has gzip")
        if exp.protocol == "http" and not re.match(r"^https?://", exp.endpoint):
            problems.append(f"{path}.endpoint: protocol http needs an http:// or https:// URL")
    for key, file in files:
        if file and not os.access(file, os.R_OK):
            problems.append(f"{path}.{key}: cannot read {file}")
    if exp.retry.initial_delay_s > exp.retry.max_delay_s:
        problems.append(f"{path}.retry: initial_delay_s is larger than max_delay_s")
    if exp.breaker.open_s > exp.breaker.max_open_s:
        problems.append(f"{path}.breaker: open_s is larger than max_open_s")
    return problems


def _queue_checks(q: QueueConfig, path: str) -> list[str]:
    problems = []
    if q.mode == "hybrid" and q.durable_ack:
        problems.append(
            f"{path}.durable_ack: the hybrid queue's memory part is never fsynced; "
            "use mode: disk for durable_ack"
        )
    if q.mode in ("disk", "hybrid"):
        parent = os.path.dirname(os.path.abspath(q.dir)) or "/"
        if os.path.exists(q.dir) and not os.path.isdir(q.dir):
            problems.append(f"{path}.dir: {q.dir} exists and is not a directory")
        elif not os.path.exists(q.dir) and not os.access(_existing_ancestor(parent), os.W_OK):
            problems.append(f"{path}.dir: cannot create {q.dir}")
    return problems


def _ingest_checks(rc: IngestConfig, path: str) -> list[str]:
    problems = []
    if rc.max_decompressed_bytes < rc.max_request_bytes:
        problems.append(f"{path}: max_decompressed_bytes is smaller than max_request_bytes")
    if rc.ingest_max_bytes < rc.max_decompressed_bytes:
        problems.append(f"{path}: ingest_max_bytes is smaller than max_decompressed_bytes")
    auth_file = rc.auth.bearer_tokens_file
    if auth_file and not os.access(auth_file, os.R_OK):
        problems.append(f"{path}.auth.bearer_tokens_file: cannot read {auth_file}")
    return problems


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def exporter_name(exp: PRWExporterConfig | OTLPExporterConfig) -> str:
    """The exporter's label: its `name`, or the URL without scheme, credentials and query."""
    if exp.name:
        return exp.name
    url = exp.url if isinstance(exp, PRWExporterConfig) else exp.endpoint
    rest = url.split("://", 1)[-1].split("?", 1)[0]
    host, _, path = rest.partition("/")
    return host.rpartition("@")[2] + ("/" + path if path else "")


# ---- building from plain data -----------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB}
_SIZE_UNITS |= {"KB": 1000, "MB": 1000**2, "GB": 1000**3}


def _convert(tp: Any, value: Any, path: str, problems: list[str], field_name: str = "") -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path, problems, field_name)
    if attrs.has(tp):
        return _build(tp, value, path, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return None
        return [_convert(args[0], v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            problems.append(f"{path}: expected a mapping of strings to strings")
            return None
        return dict(value)
    if origin is Literal:
        if value not in args:
            problems.append(f"{path}: {value!r} is not one of {', '.join(map(str, args))}")
            return None
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
            return None
        return value
    if tp is int:
        if field_name.endswith("_bytes") and isinstance(value, str):
            m = _SIZE_RE.match(value)
            if m:
                return int(m[1]) * _SIZE_UNITS[m[2]]
            problems.append(f"{path}: {value!r} is not a size like 64MiB")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
            return None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
            return None
        return value
    raise TypeError(f"config type {tp!r} is not handled")  # a bug in this module, not user error


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    prefix = f"{path}." if path else ""
    if not isinstance(data, Mapping):
        problems.append(f"{path or '<top>'}: expected a mapping, got {type(data).__name__}")
        return None
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    for key in data:
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key")
    kwargs = {}
    n_before = len(problems)
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(field.type, data[name], prefix + name, problems, name)
        elif field.default is attrs.NOTHING:
            problems.append(f"{prefix}{name}: required")
    # Validators raise on the first bad field; run them one by one to report all of them, also
    # when another field failed to convert (its value is then None and is skipped here).
    for name, value in kwargs.items():
        field = fields[name]
        if field.validator is not None and value is not None:
            try:
                field.validator(None, field, value)
            except ValueError as e:
                problems.append(f"{prefix}{name}: {e}")
    if len(problems) > n_before:
        return None
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build and validate a Config; raises ConfigError listing every problem."""
    problems: list[str] = []
    cfg = _build(Config, data or {}, "", problems)
    if cfg is not None:
        problems += _cross_checks(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_yaml(text: str) -> dict[str, Any]:
    """Parse YAML text with the safe loader; raises ConfigError on syntax errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"<yaml>: {' '.join(str(e).split())}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"<top>: expected a mapping, got {type(data).__name__}"])
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, creating levels as needed (how flags override YAML)."""
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


def to_dict(cfg: Any) -> Any:
    """The config as plain data, in the same shape the YAML file takes."""
    return attrs.asdict(cfg, recurse=True)


def redact(
    data: Any, secret_keys: tuple[str, ...] = ("password", "bearer_token", "bearer_tokens")
) -> Any:
    """Replace secret values with '<redacted>' for printing: passwords, tokens, URL
    credentials and every extra header value (headers often carry API keys)."""
    if isinstance(data, dict):
        return {
            k: (
                "<redacted>"
                if k in secret_keys and v
                else {h: "<redacted>" for h in v}
                if k == "headers" and isinstance(v, dict)
                else redact(v, secret_keys)
            )
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact(v, secret_keys) for v in data]
    if isinstance(data, str):
        return re.sub(r"://[^/\s]*@", "://<redacted>@", data)
    return data
