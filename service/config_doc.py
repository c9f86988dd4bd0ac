"""Generates docs/configuration.md from the config classes in service/config.py.

Owns the one-line meaning of every configuration key (`DESCRIPTIONS`); types, defaults, limits and
the flags come from the code itself. It must never guess: a key without a description, or a
description for a key that no longer exists, stops the generator with the list of offenders.

    python -m service.config_doc > docs/configuration.md
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

import attrs

from service import config
from service.__main__ import _FLAGS, build_parser

REGENERATE = ".venv/bin/python -m service.config_doc > docs/configuration.md"

# Keyed by dotted path; a list of sections is written `name[]`, its keys `name[].key`.
DESCRIPTIONS: dict[str, str] = {
    # ---- log
    "log": "Structured logging on stderr (see docs/operations.md, *Logs*).",
    "log.level": "Lowest level written.",
    "log.format": "`json`: one JSON object per line. `logfmt`: one `key=value` line per record. "
    "Both carry the same fields.",
    "log.rate_limit_interval_s": "A warning about bad client input (a rejected request) is "
    "written at most once per reason per this many seconds; the next one carries "
    "`suppressed_since_last` with the number held back. Export warnings use a fixed 10 s "
    "interval today.",
    # ---- telemetry
    "telemetry": "The HTTP server for governor's own `/metrics`, `/live` and `/ready`.",
    "telemetry.listen": "Address to listen on. `:8888` means all IPv4 interfaces; use "
    "`127.0.0.1:8888` to keep it local or `[::]:8888` for IPv6. Port 0 picks a free port.",
    # ---- prw
    "prw": "The Prometheus Remote Write 1.0 pipeline: receiver, batcher, one queue per exporter, "
    "exporters.",
    "prw.receiver": "The remote-write endpoint, `POST /api/v1/write`.",
    "prw.receiver.listen": "Address to listen on, `host:port`, `[v6]:port` or `:port` (all IPv4 "
    "interfaces).",
    "prw.receiver.max_request_bytes": "Largest request body accepted, as sent (compressed). A "
    "larger body is answered 413 without being read further.",
    "prw.receiver.max_decompressed_bytes": "Largest body after decompression; past it the "
    "request is answered 413 (`decompressed_too_large`) and decompression stops there, so a "
    "zip bomb costs at most this much memory. Must be at least `max_request_bytes`.",
    "prw.receiver.max_concurrent_requests": "Requests read, decompressed and decoded at the "
    "same time. A request that finds no free slot within `ingest_wait_s` is answered 429. With "
    "`max_request_bytes` and `max_decompressed_bytes` this bounds the memory of requests in "
    "progress (see docs/operations.md, *Memory bounds*).",
    "prw.receiver.ingest_queue_requests": "Accepted requests that may wait between the receiver "
    "and the batcher.",
    "prw.receiver.ingest_max_bytes": "Bytes of accepted requests that may wait between the "
    "receiver and the batcher, the open batch included, counted as they are held: snappy "
    "compressed (a request sent with another encoding is converted to snappy once). A request "
    "that finds no room within `ingest_wait_s` is answered 429. Must be at least "
    "`max_decompressed_bytes`.",
    "prw.receiver.ingest_wait_s": "How long a request may wait in all for a processing slot "
    "and for room in the ingest queue before it is answered 429 with `Retry-After`. 0 means "
    "no waiting: a request is accepted only if there is room at once.",
    "prw.receiver.retry_after_s": "Seconds sent in the `Retry-After` header of 429 "
    "(backpressure) and 503 (draining) answers.",
    "prw.receiver.keep_alive_max_requests": "Requests served on one keep-alive connection "
    "before the server closes it.",
    "prw.receiver.keep_alive_timeout_s": "An idle keep-alive connection is closed after this "
    "many seconds without a new request. Keep it above your clients' send interval.",
    "prw.receiver.read_timeout_s": "A request's head and body must arrive within this many "
    "seconds (the first request of a connection included), or the connection is closed.",
    "prw.receiver.auth": "Bearer-token authentication of clients. Off while no token is set.",
    "prw.receiver.auth.bearer_tokens": "Tokens clients may send as `Authorization: Bearer "
    "<token>`; a request without one of them is answered 401 (`unauthenticated`). Printed "
    "redacted by `--print-config`; prefer `bearer_tokens_file`.",
    "prw.receiver.auth.bearer_tokens_file": "File with one accepted token per line (blank "
    "lines and lines starting with `#` are skipped), read at start; adds to `bearer_tokens`.",
    "prw.batch": "How accepted requests are joined into batches before they are queued. A batch "
    "is flushed by whichever limit is reached first.",
    "prw.batch.max_series": "Flush once the batch holds this many series.",
    "prw.batch.max_bytes": "Flush once the batch holds this many uncompressed bytes. A request "
    "that would push the batch past it starts a new batch; one request larger than this "
    "becomes a batch of its own.",
    "prw.batch.interval_s": "Flush this many seconds after the first request entered the "
    "batch, however small it is.",
    "prw.batch.ack_linger_s": "Disk and hybrid modes, where a client's answer waits until its "
    "batch is in the queue: once no further request is ready, the batcher waits this long for "
    "others to join, then flushes (group commit). 0 flushes at once: lowest latency, but one "
    "small batch and export request per client request.",
    "prw.queue": "The queue in front of each exporter. Every exporter has its own queue with "
    "these limits; a batch is compressed once and shared by all queues.",
    "prw.queue.mode": "Where batches wait. `memory`: lost on a crash, and counted as dropped "
    "(`shutdown`) when a stop cannot deliver them. `disk`: segment files under `dir`, one "
    "subdirectory per exporter; what a stop or a crash leaves is delivered after the next start "
    "(at least once). `hybrid`: memory first, disk past `spill_at`; a stop moves the memory "
    "part to disk, a crash loses it. See docs/queue.md.",
    "prw.queue.max_batches": "Memory mode: most batches the queue holds. The queue is full when "
    "this or `max_bytes` is reached. Batches being sent by a worker do not count.",
    "prw.queue.max_bytes": "Most compressed bytes the queue holds: in memory (memory mode) or "
    "on disk per exporter (disk mode, batches being sent included). A single batch larger than "
    "this is still accepted when the queue is empty.",
    "prw.queue.dir": "Disk mode: the directory under which each exporter's queue lives "
    "(created if missing; the systemd unit's StateDirectory). Two governors must not share "
    "it: the second refuses to start and names the first one's pid.",
    "prw.queue.segment_bytes": "Disk mode: size at which a segment file is closed and a new one "
    "started. Delivered data is freed a whole segment at a time.",
    "prw.queue.durable_ack": "Disk mode: fsync each batch before the queue accepts it (many "
    "batches share one fsync). Without it the queue fsyncs every `sync_interval_s`.",
    "prw.queue.sync_interval_s": "Disk and hybrid modes without `durable_ack`: seconds between "
    "fsyncs; a power loss can take at most this much of what the disk part accepted.",
    "prw.queue.max_memory_bytes": "Hybrid mode: the memory part's budget of compressed bytes.",
    "prw.queue.spill_at": "Hybrid mode: share of `max_memory_bytes` past which new batches go "
    "to disk (until the disk part has nothing waiting, so the order of delivery stays the order "
    "of arrival).",
    "prw.queue.full_behavior": "What a full queue does with a new batch. `block`: the batcher "
    "waits, the ingest queue fills, and the receiver answers 429, so clients keep the data. "
    "`drop_oldest`: evict the oldest batch. `drop_newest`: refuse the new batch. Drops are "
    'counted as `governor_datapoints_dropped_total{reason="queue_full"}`.',
    "prw.exporters": "Remote-write backends. Each gets every batch (fan-out), through its own "
    "queue and workers. At least one is required; `--prw-export-url` replaces the whole list.",
    "prw.exporters[].url": "Remote-write URL, `http://` or `https://`. Redirects are not "
    "followed: a 3xx answer drops the batch, so give the final URL.",
    "prw.exporters[].name": "The `exporter` label of metrics and log lines. Empty means the URL "
    "without scheme, credentials and query (`host:port/path`). Names must be distinct.",
    "prw.exporters[].timeout_s": "Timeout for each phase of a request (connect, write, read, "
    "waiting for a free connection); not a total deadline. A timeout is retried.",
    "prw.exporters[].workers": "Concurrent requests to this backend, and the size of its "
    "connection pool.",
    "prw.exporters[].headers": "Extra HTTP headers for every request. Names are lower-cased "
    "and replace governor's own header of the same name (such as `content-encoding`). Values "
    "are printed as they are by `--print-config`: put secrets in `bearer_token_file` or "
    "`basic_auth.password_file` instead.",
    "prw.exporters[].bearer_token": "Sent as `Authorization: Bearer <token>`. Prefer "
    "`bearer_token_file`. Not together with `bearer_token_file` or `basic_auth`.",
    "prw.exporters[].bearer_token_file": "File whose content (stripped of surrounding "
    "whitespace) is the bearer token. Read again for every request, so a rotated token is "
    "picked up; unreadable at start stops the start (`--check-config` says so), unreadable "
    "later keeps the last token and logs a warning.",
    "prw.exporters[].basic_auth": "HTTP basic authentication. Not together with a bearer token.",
    "prw.exporters[].basic_auth.username": "User name.",
    "prw.exporters[].basic_auth.password": "Password. Prefer `password_file`.",
    "prw.exporters[].basic_auth.password_file": "File whose content (stripped of surrounding "
    "whitespace) is the password; not together with `password`. Read once at start.",
    "prw.exporters[].retry": "Backoff between attempts at a batch that failed in a retryable "
    "way (HTTP 429, 5xx, network error or timeout).",
    "prw.exporters[].retry.initial_delay_s": "Delay before the first retry. Must not exceed "
    "`max_delay_s`.",
    "prw.exporters[].retry.max_delay_s": "Largest backoff delay before jitter.",
    "prw.exporters[].retry.multiplier": "Each retry waits this many times longer than the one "
    "before, up to `max_delay_s`.",
    "prw.exporters[].retry.jitter": "Random spread of each delay: 0.2 means +-20 %.",
    "prw.exporters[].retry.max_retry_after_s": "A backend's `Retry-After` is honoured (the "
    "delay is never shorter) up to this many seconds.",
    "prw.exporters[].retry.max_elapsed_s": "Give up on a batch after retrying it this long and "
    "count it as dropped (`retries_exhausted`). 0 retries until it succeeds, while the queue "
    "holds what comes next.",
    "prw.exporters[].breaker": "Circuit breaker: stops sending to a backend that keeps failing, "
    "then probes it with one request at a time.",
    "prw.exporters[].breaker.failure_threshold": "Consecutive retryable failures (429, 5xx, "
    "network errors) that open the breaker.",
    "prw.exporters[].breaker.open_s": "How long the breaker stays open before one probe "
    "request is let through. Must not exceed `max_open_s`.",
    "prw.exporters[].breaker.max_open_s": "Each failed probe doubles the open time, up to this.",
    # ---- top level
    "shutdown_grace_s": "Phase one of shutdown (draining) lasts at most this long after SIGTERM "
    "or SIGINT; then phase two cancels what is left and counts it as dropped (`shutdown`). "
    "Keep the service manager's stop timeout longer than this.",
    # ---- otlp
    "otlp": "The OpenTelemetry (OTLP) metrics pipeline: gRPC and HTTP receivers, batcher, one "
    "queue per exporter, exporters. It runs when `otlp.exporters` is not empty. Nothing is "
    "converted to or from remote write.",
    "otlp.receiver": "The OTLP receivers: gRPC (`MetricsService/Export`) and HTTP "
    "(`POST /v1/metrics`, protobuf or JSON). Both share the limits below.",
    "otlp.receiver.max_request_bytes": "OTLP/HTTP: largest request body accepted, as sent "
    "(compressed); a larger body is answered 413 without being read further.",
    "otlp.receiver.max_decompressed_bytes": "Largest request after decompression. OTLP/HTTP "
    "answers 413 past it and stops decompressing there; OTLP/gRPC hands it to grpcio as the "
    "largest message it receives (after decompression), answered RESOURCE_EXHAUSTED. So a zip "
    "bomb costs at most this much memory. Must be at least `max_request_bytes`.",
    "otlp.receiver.ingest_max_bytes": "Bytes of accepted requests that may wait between the "
    "receivers and the batcher, the open batch included, counted as serialized protobuf. A "
    "request that finds no room within `ingest_wait_s` is answered 429 / RESOURCE_EXHAUSTED. "
    "Must be at least `max_decompressed_bytes`.",
    "otlp.receiver.retry_after_s": "Seconds a refused client is told to wait: the `Retry-After` "
    "header of HTTP 429 and 503, and the RetryInfo of gRPC RESOURCE_EXHAUSTED.",
    "otlp.receiver.grpc": "The OTLP/gRPC receiver (grpcio's server, in its own threads). It "
    "takes gzip and deflate compressed messages.",
    "otlp.receiver.grpc.listen": "Address to listen on, `host:port`, `[v6]:port` or `:port` "
    "(all IPv4 interfaces). Empty turns the gRPC receiver off.",
    "otlp.receiver.grpc.keepalive_time_s": "The server pings a connection idle for this long "
    "(grpc-go's `keepalive.ServerParameters.Time`).",
    "otlp.receiver.grpc.keepalive_timeout_s": "A ping not answered within this closes the "
    "connection.",
    "otlp.receiver.grpc.min_ping_interval_s": "Clients may send keepalive pings this often, "
    "also without calls in flight; a client pinging faster is disconnected (`too_many_pings`).",
    "otlp.receiver.grpc.max_connection_idle_s": "Close a connection without calls for this "
    "long. 0: never.",
    "otlp.receiver.grpc.max_connection_age_s": "Close any connection this old (clients "
    "reconnect, which spreads them over replicas behind a load balancer). 0: never.",
    "otlp.receiver.grpc.max_connection_age_grace_s": "Calls in flight on a connection closed "
    "for its age get this long to finish. 0: grpcio's default (no limit).",
    "otlp.receiver.grpc.threads": "grpcio server threads: calls decoded and handed to the "
    "pipeline at the same time. Calls past four times this are answered RESOURCE_EXHAUSTED "
    "by grpcio at once.",
    "otlp.receiver.http": "The OTLP/HTTP receiver, `POST /v1/metrics`, on the same HTTP/1.1 "
    "server as the remote-write receiver. Bodies: protobuf (`application/x-protobuf`) or "
    "JSON (`application/json`), identity, gzip, zstd or deflate; the answer uses the "
    "request's encoding.",
    "otlp.receiver.http.listen": "Address to listen on. Empty turns the HTTP receiver off.",
    "otlp.batch": "How accepted requests are joined into batches before they are queued. A "
    "batch is the requests' serialized protobuf one after another: every resource keeps its "
    "own resource and scope entries. Flushed by whichever limit is reached first.",
    "otlp.batch.max_datapoints": "Flush once the batch holds this many datapoints.",
    "otlp.batch.max_bytes": "Flush once the batch holds this many bytes of serialized protobuf.",
    "otlp.queue": "The queue in front of each OTLP exporter; the same settings and formats as "
    "`prw.queue` (see docs/queue.md). OTLP batches are queued uncompressed; exporters compress "
    "each attempt.",
    "otlp.exporters": "OTLP backends (an OpenTelemetry Collector, a SaaS, a TSDB's OTLP "
    "endpoint). Each gets every batch (fan-out), through its own queue and workers. "
    "`--otlp-export-endpoint` replaces the whole list.",
    "otlp.exporters[].endpoint": "protocol `grpc`: `host:port` or `http://host:port` "
    "(plaintext), `https://host:port` (TLS). protocol `http`: the URL to POST to; a URL "
    "without a path gets `/v1/metrics`.",
    "otlp.exporters[].protocol": "`grpc`: `MetricsService/Export` with grpcio. `http`: "
    "OTLP/HTTP protobuf POSTs.",
    "otlp.exporters[].name": "The `exporter` label of metrics and log lines. Empty means the "
    "endpoint without scheme and query. Names must be distinct.",
    "otlp.exporters[].timeout_s": "gRPC: the deadline of each call. HTTP: the timeout of each "
    "phase of a request (connect, write, read). A timeout is retried.",
    "otlp.exporters[].compression": "Request compression: `gzip` (gRPC and HTTP), `zstd` "
    "(HTTP only) or `none`.",
    "otlp.exporters[].headers": "Extra headers (HTTP) or metadata (gRPC) for every request; "
    "names are lower-cased. Printed redacted by `--print-config`.",
    "otlp.exporters[].bearer_token": "Sent as `authorization: Bearer <token>` (HTTP header or "
    "gRPC metadata). Prefer `bearer_token_file`.",
    "otlp.exporters[].tls": "TLS for `https://` endpoints.",
    "otlp.exporters[].tls.ca_file": "PEM file of the CA(s) that signed the backend's "
    "certificate. Empty: the system's CAs.",
    "otlp.exporters[].tls.cert_file": "PEM client certificate for mutual TLS, with `key_file`.",
    "otlp.exporters[].tls.key_file": "PEM private key of `cert_file`.",
    # ---- rules
    "rules": "Governance rules for both pipelines (docs/rules.md).",
    "rules.file": "The rules file (YAML, docs/rules.md). Empty: no rules; data passes untouched. "
    "Read at start (a bad file stops the start, every problem listed; `--check-config` checks "
    "it) and again on SIGHUP (a bad file keeps the old rules).",
    "rules.tick_s": "How often due windows (downsample, aggregate) are emitted and rules are "
    "checked for being dead.",
    "rules.route_cache_series": "Remote write: distinct series whose way through the rules is "
    "remembered, so a series seen before costs a lookup instead of running the rules again "
    "(docs/rules.md, *Cost*). About 0.1 KB per series the rules leave alone or drop, 0.4 KB per "
    "series they relabel and 1-2 KB per series they sample or fold into windows; when full it "
    "is emptied and fills again. Size it to the number of active series: with fewer, series "
    "keep meeting the rules afresh (~30 µs each instead of ~1-3 µs).",
    # ---- stats
    "stats": "Statistics about what clients send, per metric name: datapoints, active series "
    "and top label values, for `/metrics` and `/api/v1/cardinality` (docs/limits.md). Counted "
    "before limits and rules, on both pipelines.",
    "stats.level": "`none`: no stats. `basic`: datapoints per metric name (cheap; on remote "
    "write about 50 bytes per active series, see `limits.series_cache`). `full`: "
    "also active series per metric, the most common values of each label, and series and "
    "datapoints per combination of `labels`; costs CPU and memory per series (docs/limits.md, "
    "*Stats*).",
    "stats.labels": "`full` only: labels whose value combinations are counted as groups, e.g. "
    "`[service, namespace]`; a series without one of them counts under an empty value. Empty: "
    "no groups.",
    "stats.window_s": "Length of a stats window. A series counts as active in the window it "
    "was seen in and the next one, so a series that stops sending leaves the count within two "
    "windows; datapoint counts cover the current and the previous window. Windows start at "
    "multiples of this on the wall clock.",
    "stats.top_k": "How many metrics (by series and by datapoints), label combinations and "
    "limit groups `/metrics` shows, so governor's own series stay bounded whatever clients "
    "send. Used by the limits' metrics too.",
    "stats.exact_limit": "A series counter (per metric, per stats group, per limit group) "
    "counts exactly up to this many series, then switches to a 16 KiB HyperLogLog sketch "
    "(about 1 % error). Exact counting costs 8 bytes per series and window (a sorted "
    "array of hashes), so a counter holds at most about 16 KB while exact.",
    "stats.max_metrics": "Most distinct metric names tracked (and, separately, label "
    "combinations of `labels`). A name with nothing in two windows is forgotten; while "
    "the table is full, new names are counted together under `__other__`.",
    "stats.max_label_values": "`full` only: most distinct values kept per label of a metric "
    "for the top-values report; further values are left out of it.",
    # ---- limits
    "limits": "Cardinality and datapoint-rate limits, per group of series (docs/limits.md).",
    "limits.file": "The limits file (YAML, docs/limits.md). Empty: no limits. Read at start (a "
    "bad file stops the start, every problem listed; `--check-config` checks it) and again on "
    "SIGHUP (a bad file keeps the old limits).",
    "limits.dry_run": "Run every limit in dry run, whatever the file says: groups are counted, "
    "logged and reported as if the limits were enforced, and nothing is dropped, stripped or "
    "labelled.",
    "limits.series_cache": "Distinct series whose facts (name, labels, stats group, which "
    "limits apply) are remembered, so a series seen before is not worked out again. Used with "
    "stats or a limits file, per pipeline. About 0.3 to 0.6 KB per series (more with many "
    "labels unique to the series), ~50 bytes with basic stats alone on remote write (only the "
    "name is kept); when full it forgets its older half and logs a warning. Size it to the "
    "number of active series.",
}

# Keys whose meaning is the same in both pipelines: described once, under the PRW path.
SAME_AS = {
    "otlp.receiver.max_concurrent_requests": "prw.receiver.max_concurrent_requests",
    "otlp.receiver.ingest_queue_requests": "prw.receiver.ingest_queue_requests",
    "otlp.receiver.ingest_wait_s": "prw.receiver.ingest_wait_s",
    "otlp.receiver.auth": "prw.receiver.auth",
    "otlp.receiver.http.keep_alive_max_requests": "prw.receiver.keep_alive_max_requests",
    "otlp.receiver.http.keep_alive_timeout_s": "prw.receiver.keep_alive_timeout_s",
    "otlp.receiver.http.read_timeout_s": "prw.receiver.read_timeout_s",
    "otlp.batch.interval_s": "prw.batch.interval_s",
    "otlp.batch.ack_linger_s": "prw.batch.ack_linger_s",
    "otlp.queue.": "prw.queue.",
    "otlp.exporters[].workers": "prw.exporters[].workers",
    "otlp.exporters[].bearer_token_file": "prw.exporters[].bearer_token_file",
    "otlp.exporters[].retry": "prw.exporters[].retry",
    "otlp.exporters[].breaker": "prw.exporters[].breaker",
}


def describe(path: str, descriptions: dict[str, str] | None = None) -> str:
    """The description of `path`, its own or that of the PRW key it shares (SAME_AS)."""
    descriptions = DESCRIPTIONS if descriptions is None else descriptions
    if path in descriptions:
        return descriptions[path]
    for dst, src in SAME_AS.items():
        if path == dst or path.startswith(dst if dst.endswith(".") else dst + "."):
            return descriptions.get(src + path[len(dst) :], "")
    return ""


_TOP = "(top level)"


class DocError(Exception):
    """The descriptions do not match the config classes; `problems` lists every mismatch."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("configuration docs are out of date:\n  " + "\n  ".join(problems))
        self.problems = problems


@attrs.frozen
class Key:
    """One configuration key as the reference shows it."""

    path: str
    section: str  # dotted path of the section that holds it; "" for the top level
    type: str
    default: str
    is_section: bool  # a nested mapping, or a list of them, documented under its own heading


# ---- walking the config classes -----------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_CONSTRAINTS = {
    config._positive: "> 0",
    config._non_negative: ">= 0",
    config._fraction: "0 to 1",
}
_FORMATS = {
    config._listen: "host:port",
    config._listen_or_off: "host:port or empty",
    config._http_url: "URL",
    config._endpoint: "URL or host:port",
}


def _type_name(field: attrs.Attribute, tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in typing.get_args(tp))
    if typing.get_origin(tp) is dict:
        return "mapping of string to string"
    if typing.get_origin(tp) is list:
        return "list of strings"
    if tp is int and field.name.endswith("_bytes"):
        name = "size"
    else:
        name = {str: "string", int: "integer", float: "number", bool: "boolean"}[tp]
    name = _FORMATS.get(field.validator, name)
    if field.validator in _CONSTRAINTS:
        name += ", " + _CONSTRAINTS[field.validator]
    return name


def format_size(n: int) -> str:
    """The shortest exact way to write `n` bytes in the size syntax (binary units first)."""
    for unit, mult in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def _default(field: attrs.Attribute) -> str:
    d = field.default
    if d is attrs.NOTHING:
        return "required"
    if isinstance(d, attrs.Factory):  # type: ignore[arg-type]
        d = d.factory()
        if attrs.has(type(d)):
            return "(section)"
    if d is None:
        return "not set"
    if isinstance(d, bool):
        return f"`{str(d).lower()}`"
    if isinstance(d, int) and field.name.endswith("_bytes"):
        return f"`{format_size(d)}`"
    if isinstance(d, float):
        return f"`{d:g}`"
    if isinstance(d, str):
        return f'`"{d}"`' if d == "" or d.startswith(":") else f"`{d}`"
    if isinstance(d, list | dict):
        return f"`{d!r}`"
    return f"`{d}`"


def walk(cls: type = config.Config, prefix: str = "") -> Iterator[Key]:
    """Every key under `cls`, depth first in declaration order, sections before their keys."""
    attrs.resolve_types(cls)
    for field in attrs.fields(cls):
        path = f"{prefix}.{field.name}" if prefix else field.name
        tp, optional = _unwrap_optional(field.type)
        if attrs.has(tp):
            kind = "section" + (", optional" if optional else "")
            yield Key(path, prefix, kind, _default(field), True)
            yield from walk(tp, path)
        elif typing.get_origin(tp) is list and attrs.has(typing.get_args(tp)[0]):
            yield Key(path, prefix, "list of sections", _default(field), True)
            yield from walk(typing.get_args(tp)[0], path + "[]")
        else:
            yield Key(path, prefix, _type_name(field, tp), _default(field), False)


def check_descriptions(descriptions: dict[str, str] = DESCRIPTIONS) -> list[str]:
    """Every mismatch between `descriptions` and the config keys, as 'path: problem'."""
    paths = [k.path for k in walk()]
    problems = [
        f"{p}: no description in service/config_doc.py"
        for p in paths
        if not describe(p, descriptions).strip()
    ]
    problems += [
        f"{p}: described in service/config_doc.py but not a config key"
        for p in descriptions
        if p not in paths
    ]
    return problems


# ---- the page ------------------------------------------------------------------------------

_INTRO = """\
# Configuration reference

<!-- Generated by service/config_doc.py from service/config.py. Do not edit by hand. -->

This page is generated from the configuration classes in `service/config.py`; edit those (and the
descriptions in `service/config_doc.py`), then regenerate it:

```sh
{regenerate}
```

`tests/test_docs.py` fails when this file differs from what the generator produces.

## How the configuration is read

- `governor --config FILE` reads a YAML file (safe loader). Every key is optional except
  `prw.exporters[].url`, and at least one exporter is required.
- Flags override the file (see below). Without `--config` the defaults apply, and the flags alone
  can make a working configuration: `governor --prw-export-url http://127.0.0.1:8428/api/v1/write`.
- Loading checks everything at once and reports every problem with the key's path, for example
  `prw.exporters[0].timeout_s: must be > 0` or `prw.receiver.listne: unknown key`; unknown keys are
  errors. governor then exits with status 2 and never starts with half a configuration.
- `governor --config FILE --check-config` validates and exits (0 valid, 2 invalid);
  `--print-config` prints the effective configuration as YAML, with passwords, bearer tokens and
  credentials in URLs replaced by `<redacted>`.
- Files named in the configuration (`bearer_token_file`, `basic_auth.password_file`) are read when
  governor starts, not by `--check-config`.
- Checks across keys: at least one exporter in either pipeline (a pipeline without exporters
  does not run, and its receivers do not listen); `bearer_token` and `bearer_token_file` not
  both; a bearer token and `basic_auth` not both; `retry.initial_delay_s` at most
  `retry.max_delay_s`; `breaker.open_s` at most `breaker.max_open_s`; exporter names (given or
  derived from the URL) distinct within a pipeline; `max_decompressed_bytes` at least
  `max_request_bytes` and `ingest_max_bytes` at least `max_decompressed_bytes`; an OTLP
  exporter with protocol `http` has an http(s) URL, `zstd` only with `http`, TLS `cert_file`
  and `key_file` together; the two OTLP receivers not both off.
"""

_EXAMPLE = """\
# /etc/governor/governor.yaml
log:
  level: info
  format: json              # or logfmt
telemetry:
  listen: "127.0.0.1:8888"  # /metrics, /live, /ready; scrape this
prw:
  receiver:
    listen: ":9091"         # all IPv4 interfaces; POST /api/v1/write
    max_request_bytes: 16MiB
    max_decompressed_bytes: 64MiB
    ingest_queue_requests: 64
    ingest_wait_s: 0.5      # then 429 with Retry-After: 1
  batch:
    max_series: 10000
    max_bytes: 4MiB         # uncompressed
    interval_s: 1.0
  queue:
    mode: disk              # survives restarts; memory is the default
    dir: /var/lib/governor/queue
    max_bytes: 2GiB         # per exporter, on disk, compressed
    full_behavior: drop_oldest  # one slow backend must not hold back the other
  exporters:                # every batch goes to each of them
    - url: "http://victoria-metrics:8428/api/v1/write"
      name: vm
      workers: 2
    - url: "https://mimir.example.com/api/v1/push"
      name: mimir
      timeout_s: 30
      headers:
        X-Scope-OrgID: team-a
      basic_auth:
        username: team-a
        password_file: /etc/governor/mimir-password
      retry:
        max_delay_s: 30
        max_elapsed_s: 3600   # give up on a batch after an hour (0: never)
      breaker:
        failure_threshold: 5
        open_s: 5
otlp:                       # runs because it has exporters
  receiver:
    grpc:
      listen: ":4317"       # MetricsService/Export; gzip and deflate accepted
    http:
      listen: ":4318"       # POST /v1/metrics, protobuf or JSON
    auth:
      bearer_tokens_file: /etc/governor/otlp-tokens
  batch:
    max_datapoints: 8192
  queue:
    mode: hybrid            # memory first, disk past 80 % of max_memory_bytes
    dir: /var/lib/governor/queue
  exporters:
    - endpoint: "otel-collector:4317"   # plaintext gRPC
      protocol: grpc
      compression: gzip
    - endpoint: "https://otlp.example.com/v1/metrics"
      protocol: http
      name: saas
      compression: zstd
      bearer_token_file: /etc/governor/saas-token
shutdown_grace_s: 30        # keep systemd's TimeoutStopSec and docker's stop timeout longer
"""


def _flag_rows(parser: argparse.ArgumentParser, keys: list[Key]) -> list[str]:
    types_by_path = {k.path: k.type for k in keys}
    rows = ["| flag | value | effect |", "| --- | --- | --- |"]
    for action in parser._actions:
        flag = ", ".join(f"`{o}`" for o in action.option_strings)
        value = "" if action.nargs == 0 else (action.metavar or action.dest.upper())
        effect = (action.help or "").replace("|", "\\|")
        sets = _FLAGS.get(action.option_strings[-1])
        if sets is not None:
            value = types_by_path[sets[0]]
            effect += f"; sets `{sets[0]}`"
        if isinstance(action, argparse._AppendAction):
            value += " (repeatable)"
        rows.append(f"| {flag} | {value} | {effect} |")
    return rows


def _size_section(keys: list[Key]) -> list[str]:
    units = sorted(
        ((u, m) for u, m in config._SIZE_UNITS.items() if u is not None), key=lambda um: um[1]
    )
    unit_list = ", ".join(f"`{u}` = {m:,}" for u, m in units)
    size_keys = ", ".join(f"`{k.path}`" for k in keys if k.type.startswith("size"))
    return [
        "## Sizes",
        "",
        "Keys whose names end in `_bytes` (and `--queue-max-bytes`) take a size: a whole number "
        "of bytes (`1048576`), or a whole number and a unit, with or without a space between "
        f"(`64MiB`, `1 GB`). Units, case-sensitive: {unit_list} bytes. Fractions are not "
        "accepted: write `1536MiB`, not `1.5GiB`.",
        "",
        f"Size keys: {size_keys}.",
    ]


def _reference(keys: list[Key]) -> list[str]:
    out = ["## Reference", ""]
    sections = [""] + [k.path + ("[]" if k.type == "list of sections" else "") for k in keys]
    sections = [s for s in sections if s == "" or any(k.section == s for k in keys)]
    for section in sections:
        title = f"`{section}`" if section else _TOP
        out += [f"### {title}", ""]
        if section:
            out += [describe(section.removesuffix("[]")), ""]
        out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for k in keys:
            if k.section != section:
                continue
            desc = describe(k.path)
            if k.is_section:
                desc = f"See `{k.path}{'[]' if k.type == 'list of sections' else ''}` below."
            desc = desc.replace("|", "\\|")
            out.append(f"| `{k.path}` | {k.type} | {k.default} | {desc} |")
        out.append("")
    return out


def generate() -> str:
    """The whole docs/configuration.md; raises DocError if the descriptions do not match."""
    problems = check_descriptions()
    try:
        config.config_from_dict(config.load_yaml(_EXAMPLE))
    except config.ConfigError as e:
        # The example names secret files that exist on the reader's machine, not on this one.
        problems += [f"annotated example: {p}" for p in e.problems if ": cannot read " not in p]
    if problems:
        raise DocError(problems)
    keys = list(walk())
    lines = [_INTRO.format(regenerate=REGENERATE)]
    lines += ["## Command-line flags", ""]
    lines += [
        "Flags override the YAML file; `--prw-export-url` replaces `prw.exporters` as a whole "
        "(each URL with default settings), and `--otlp-export-endpoint` replaces "
        "`otlp.exporters` (each with `--otlp-export-protocol`, default grpc). Exit status: 0 "
        "when all is well, 2 for a bad configuration or bad flags.",
        "",
    ]
    lines += _flag_rows(build_parser(), keys)
    lines.append("")
    lines += _size_section(keys)
    lines.append("")
    lines += [
        "## Annotated example",
        "",
        "Two backends with fan-out, each isolated from the other's slowness. "
        "`deploy/governor.yaml` is the smaller file `make run` uses.",
        "",
        "```yaml",
        _EXAMPLE.rstrip("\n"),
        "```",
        "",
    ]
    lines += _reference(keys)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    try:
        text = generate()
    except DocError as e:
        print(f"config_doc: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
