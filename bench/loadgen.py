"""Remote-write load generator: posts pre-built snappy WriteRequests at a fixed offered rate.

    .venv/bin/python bench/loadgen.py --url http://127.0.0.1:9091/api/v1/write \\
        --rate 180000 --duration 30

The pool holds `--series` distinct series (default: one second of load) in requests of
`--series-per-request` series with 10 labels and one sample each. Request i of the run is pool
entry i mod pool size; every pass over the pool ("round") moves the timestamps forward by the
round's length, so the backend stores each round as new samples. All payloads of the run are
rendered and compressed before sending starts (or on the fly past `--prebuild-limit-mb`).

Sending is open loop: request i is due at start + i / request rate; `--connections` threads, each
with one keep-alive HTTP/1.1 connection, take the next due request. A late request is sent at
once, so the offered rate holds as long as the connections keep up. Nothing is retried: a 429 is
counted, not re-sent. It stops starting requests at `--duration` and exits once the ones in flight
are answered (each bounded by `--timeout`).

stdout: a JSON line {"event": "sending", ...} when sending starts, then {"event": "done", ...}
with the figures. Progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import math
import os
import resource
import sys
import threading
import time
import urllib.parse

import workload


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Payloads:
    """Request i of the run: (compressed body, samples)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.spr = args.series_per_request
        self.pool_size = max(1, math.ceil(args.series / self.spr))
        self.n_requests = int(args.rate * args.duration / self.spr)
        t0 = time.perf_counter()
        self.templates = workload.build_pool(self.pool_size, self.spr, seed=args.seed)
        self.template_s = time.perf_counter() - t0
        # One round sends every pool entry once; at the offered rate it lasts round_ms.
        self.round_ms = max(1, round(self.pool_size * self.spr / args.rate * 1000))
        self.base_ms = int(time.time() * 1000)
        self.rounds = max(1, math.ceil(self.n_requests / self.pool_size))
        self.prebuilt: list[bytes] | None = None
        sample = workload.compress(self._raw(0))
        estimate = len(sample) * self.n_requests
        self.prebuilt_bytes = 0
        t0 = time.perf_counter()
        if estimate <= args.prebuild_limit_mb * 1024 * 1024:
            self.prebuilt = [workload.compress(self._raw(i)) for i in range(self.n_requests)]
            self.prebuilt_bytes = sum(map(len, self.prebuilt))
        self.render_s = time.perf_counter() - t0

    def _raw(self, i: int) -> bytes:
        rnd, j = divmod(i, self.pool_size)
        return workload.render(self.templates[j], self.base_ms + rnd * self.round_ms)

    def get(self, i: int) -> bytes:
        if self.prebuilt is not None:
            return self.prebuilt[i]
        return workload.compress(self._raw(i))


class Sender:
    """Shared schedule and totals for the sending threads."""

    def __init__(self, args: argparse.Namespace, payloads: Payloads) -> None:
        self.args = args
        self.payloads = payloads
        url = urllib.parse.urlsplit(args.url)
        if url.scheme != "http" or not url.hostname:
            raise SystemExit(f"loadgen: --url must be http://host:port/path, got {args.url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.path = url.path or "/"
        self.interval = payloads.spr / args.rate  # seconds between request starts
        self.lock = threading.Lock()
        self.next_index = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self.sent_samples = 0
        self.accepted_samples = 0
        self.latencies: list[float] = []
        self.max_lag = 0.0
        self.late = 0
        self.start = 0.0
        self.stop_at = 0.0

    def _take(self) -> int | None:
        with self.lock:
            i = self.next_index
            if i >= self.payloads.n_requests:
                return None
            self.next_index += 1
            return i

    def worker(self) -> None:
        headers = {
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "snappy",
            "X-Prometheus-Remote-Write-Version": "0.1.0",
            "User-Agent": "governor-bench-loadgen",
        }
        conn: http.client.HTTPConnection | None = None
        statuses: collections.Counter[str] = collections.Counter()
        latencies = []
        sent = accepted = late = 0
        max_lag = 0.0
        spr = self.payloads.spr
        try:
            while True:
                i = self._take()
                if i is None:
                    break
                due = self.start + i * self.interval
                now = time.perf_counter()
                if due >= self.stop_at or now >= self.stop_at:
                    break
                if due > now:
                    time.sleep(due - now)
                else:
                    lag = now - due
                    max_lag = max(max_lag, lag)
                    if lag > 0.05:
                        late += 1
                body = self.payloads.get(i)
                if conn is None:
                    conn = http.client.HTTPConnection(
                        self.host, self.port, timeout=self.args.timeout
                    )
                t0 = time.perf_counter()
                try:
                    conn.request("POST", self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    status = str(resp.status)
                    if resp.will_close:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException) as e:
                    status = f"error:{type(e).__name__}"
                    conn.close()
                    conn = None
                latencies.append(time.perf_counter() - t0)
                statuses[status] += 1
                sent += spr
                if status.startswith("2"):
                    accepted += spr
        finally:
            if conn is not None:
                conn.close()
            with self.lock:
                self.statuses.update(statuses)
                self.sent_samples += sent
                self.accepted_samples += accepted
                self.latencies += latencies
                self.max_lag = max(self.max_lag, max_lag)
                self.late += late


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True, help="remote-write URL")
    p.add_argument("--rate", type=float, default=180_000, help="offered samples/s")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of sending")
    p.add_argument("--series-per-request", type=int, default=500)
    p.add_argument(
        "--series", type=int, default=0, help="distinct series in the pool (default: rate)"
    )
    p.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prebuild-limit-mb", type=float, default=1500.0)
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.connections <= 0:
        p.error("--rate, --duration and --connections must be > 0")
    if args.series <= 0:
        args.series = int(args.rate)

    payloads = Payloads(args)
    print(
        f"loadgen: pool of {payloads.pool_size} requests x {payloads.spr} series built in "
        f"{payloads.template_s:.1f}s; {payloads.n_requests} requests "
        f"({payloads.prebuilt_bytes / 1e6:.0f} MB prebuilt in {payloads.render_s:.1f}s)",
        file=sys.stderr,
    )
    sender = Sender(args, payloads)
    threads = [
        threading.Thread(target=sender.worker, name=f"conn{n}", daemon=True)
        for n in range(args.connections)
    ]
    cpu0 = _cpu_self()
    sender.start = time.perf_counter() + 0.05
    sender.stop_at = sender.start + args.duration
    _emit({"event": "sending", "time": time.time(), "pid": os.getpid()})
    for t in threads:
        t.start()
    hard_deadline = sender.stop_at + args.timeout + 5
    for t in threads:
        t.join(max(0.0, hard_deadline - time.perf_counter()))
    elapsed = time.perf_counter() - sender.start
    cpu = _cpu_self() - cpu0
    hung = sum(t.is_alive() for t in threads)
    with sender.lock:
        requests = sum(sender.statuses.values())
        result = {
            "event": "done",
            "time": time.time(),
            "url": args.url,
            "elapsed_s": round(elapsed, 3),
            "target_samples_per_s": args.rate,
            "series_per_request": payloads.spr,
            "distinct_series": payloads.pool_size * payloads.spr,
            "requests_planned": payloads.n_requests,
            "requests_sent": requests,
            "status_counts": dict(sorted(sender.statuses.items())),
            "samples_offered": sender.sent_samples,
            "samples_accepted": sender.accepted_samples,
            "offered_samples_per_s": round(sender.sent_samples / elapsed, 1),
            "accepted_samples_per_s": round(sender.accepted_samples / elapsed, 1),
            "latency_ms_p50": round(_percentile(sender.latencies, 0.5) * 1000, 2),
            "latency_ms_p99": round(_percentile(sender.latencies, 0.99) * 1000, 2),
            "latency_ms_max": round(max(sender.latencies, default=0.0) * 1000, 2),
            "max_schedule_lag_ms": round(sender.max_lag * 1000, 1),
            "requests_late_over_50ms": sender.late,
            "loadgen_cpu_s": round(cpu, 3),
            "loadgen_cpu_ms_per_request": round(cpu / requests * 1000, 3) if requests else None,
            "threads_still_running": hung,
        }
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
