"""Stats and limits microbenchmark: what per-metric stats and limits cost a remote-write request,
in CPU and in memory (issue 6).

    .venv/bin/python bench/stats.py [--only overhead,limits,memory] [--repeat 5] [--seconds 1]
                                    [--idle-ms 0]
                                    [--cases basic,full,full-labels] [--limits-repeat 3]
                                    [--no-limits-tracemalloc] [--json-out PATH]

Every case calls what the remote-write receiver calls on a decompressed request:
`service.governance.stage.Governance.prw(data)`, with `service.codec.prw.count(data)` (what the
receiver does with no stats, limits or rules) as the baseline "none". Requests are bench/workload.py
WriteRequests of 1000 series (10 labels with `__name__`, one sample each, 8 metric names), sent
round after round as a scrape loop: every round each request of the pool once, stamped with the
round's time, then governor's tick (`Governance.due()`, the limits' `prune`, the stats' `roll`);
the clock moves `--step` (15 s) per round, the stats and limits windows are 60 s, so a window sees
4 rounds. Only the governance calls and the tick are timed (time.process_time around each);
rendering the requests is not. Figures are samples per CPU-second.

`--idle-ms` makes the process sleep (untimed) before each request. End to end, governor's CPU is
busy a third of the time or less and idles between requests, so each request starts with its
code and data out of the CPU's caches; back to back, the loop keeps them warm. Work made of many
small NumPy calls pays for that far more than one C-level parse: with 4 ms idle the loop shows
the end-to-end cost of a request (bench/RESULTS.md), without it a third to a half less.

1. Stats overhead (`overhead`): 100k active series (`--series`: 100 requests of 1000) through
   `none`, `basic` (datapoints per metric name), `full` (also active series per metric and top label
   values) and `full` with `stats.labels` (`--stats-labels`, default namespace,container: 64
   combinations). Each case has its own Governance and clock; after a warm-up window (its first
   round, where full stats meets every series for the first time, is reported apart), `--repeat`
   repetitions of whole windows (a multiple of 4 rounds, at least `--seconds` CPU-s each), the
   cases taking turns within each repetition, so the ratio to `none` of each repetition compares
   runs seconds apart. Printed: medians, the overhead relative to `none`, the µs added per sample,
   and that as a share of governor's end-to-end CPU per sample (`--e2e-us`, from bench/RESULTS.md:
   ~1.8-2.0 µs, i.e. 500-550k samples per CPU-second), with what end-to-end throughput would keep.
2. Limits overhead at 1M active series (`limits`): 1000 requests of 1000 distinct series per round,
   `none` against a limits file (LIMITS below: a per-service drop_new limit grouped by `job`, 64
   values, and a per-tenant quota, the tenant taken from the `namespace` label, 8 tenants; both
   generous, so nothing is dropped: checked and printed). After a warm-up window (first sight of
   each series reported apart), `--limits-repeat` repetitions of `--limits-rounds` rounds each,
   the two cases taking turns. Memory: the process' RSS growth from before the Governance was made
   to after the last repetition (gc'd), and, with a fresh Governance traced by tracemalloc, what
   two rounds a window apart leave allocated (steady state: both windows of every tracker and
   admission set full), by source file.
3. Memory per million tracked series (`memory`): a full-stats `Stats` (with `--stats-labels`) fed
   1M series through its own API, as Governance feeds it (per batch: datapoints per name and per
   label combination; per series first seen in the window: its label values; per name and per
   combination: the series hashes), for two consecutive windows (steady state: every tracker holds
   both), then counted once as a /metrics scrape does (a tracker that counts by sketch then also
   keeps its windows' union as a sketch), in series-per-metric distributions: Zipf (s=1) over
   1000 metric names, the same over 5000, the worst case (every metric just under `exact_limit`,
   so every tracker is an exact set), and workload.py's 8 names. Each in a fresh process:
   tracemalloc's retained bytes, the RSS growth (another fresh process, without tracemalloc) and
   `Stats.memory_bytes()`. Then, apart, the facts cache that Governance keeps per distinct series
   for full stats and limits (its series index, the Facts and interned strings), and for basic
   stats alone (the index and one shared Facts per name): tracemalloc's retained bytes after one
   pass over `--facts-series` workload.py series.

Prints figures; asserts nothing. The code measured (the imported `service` package, its sources'
sha256 as bench/e2e_prw.py computes it, and HEAD when it is this checkout) is printed first.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/queue.py would shadow the standard library's `queue` for anything that imports it
# (trio does): move bench/ to the end of sys.path, as the other benchmarks do.
# ruff: noqa: E402
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH] + [str(_BENCH)]

import argparse
import collections
import gc
import json
import random
import statistics
import subprocess
import time
import tracemalloc
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np
import provenance
import psutil
import workload

import service
from service import allocator
from service.codec import prw as prw_codec
from service.config import StatsConfig
from service.governance.limits import LimitEngine, load_limits
from service.governance.prw import series_keys
from service.governance.stage import Governance
from service.governance.stats import Stats

SERIES_PER_REQUEST = 1000
WINDOW_S = 60.0
MB = 1e6
_FIRST_TS = 1_800_000_000_000  # ms, a multiple of the window, within workload's varint range

# Generous on purpose: the cost of watching, not of dropping. job has 64 values (8 namespaces x 8
# apps), ~15.6k series each at 1M; each of the 8 tenants (namespaces) has 125k.
LIMITS = """\
window: 1m
tenant:
  label: namespace
quotas:
  max_series: 1000000
  action: drop_new
limits:
  - name: per-service
    group_by: [job]
    max_series: 100000
    action: drop_new
"""


class Clock:
    def __init__(self) -> None:
        self.ms = _FIRST_TS

    def __call__(self) -> int:
        return self.ms


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


# ---- running rounds ---------------------------------------------------------------------------


def _no_sleep(_: float) -> None:
    pass


class Case:
    """One configuration under test: its Governance (None: the receiver's `prw.count` alone),
    its own clock, and the CPU-seconds and samples of each repetition."""

    def __init__(
        self, name: str, make: Callable[[Clock], Governance | None], idle_s: float = 0.0
    ) -> None:
        self.name = name
        self.idle_s = idle_s
        self.clock = Clock()
        self.gov = make(self.clock)
        self.changed = 0  # requests the governance rewrote (limits: should stay 0)
        self.rates: list[float] = []
        self.first_round_us: float | None = None  # µs per series of the very first round

    def round(self, pool: list[list[bytes]], step_s: float) -> float:
        """Every request of the pool once at the clock's time, then the tick; the CPU-seconds.
        With `idle_s`, the process sleeps that long (untimed) before each request."""
        clock, gov, idle_s = self.clock, self.gov, self.idle_s
        cpu = 0.0
        process_time = time.process_time
        sleep = time.sleep if idle_s > 0 else _no_sleep
        if gov is None:
            count = prw_codec.count
            for tpl in pool:
                data = workload.render(tpl, clock.ms)
                sleep(idle_s)
                c0 = process_time()
                count(data)
                cpu += process_time() - c0
        else:
            govern = gov.prw
            changed = 0
            for tpl in pool:
                data = workload.render(tpl, clock.ms)
                sleep(idle_s)
                c0 = process_time()
                g = govern(data)
                cpu += process_time() - c0
                changed += g.data is not None
            self.changed += changed
            c0 = process_time()
            now_s = clock.ms / 1000
            gov.due()
            if gov.limits is not None:
                gov.limits.prune(now_s)
            if gov.stats is not None:
                gov.stats.roll(now_s)
            cpu += process_time() - c0
        clock.ms += int(step_s * 1000)
        return cpu

    def repetition(
        self, pool: list[list[bytes]], step_s: float, period: int, min_s: float, max_rounds: int
    ) -> float:
        """Whole windows (multiples of `period` rounds) until `min_s` CPU-seconds; samples per
        CPU-second."""
        cpu = 0.0
        rounds = 0
        while True:
            cpu += self.round(pool, step_s)
            rounds += 1
            if rounds % period == 0 and (cpu >= min_s or rounds >= max_rounds):
                break
        rate = rounds * len(pool) * SERIES_PER_REQUEST / cpu
        self.rates.append(rate)
        return rate

    def warm_up(self, pool: list[list[bytes]], step_s: float, period: int) -> None:
        """One window; the first round (first sight of every series) is kept apart."""
        cpu = self.round(pool, step_s)
        self.first_round_us = cpu / (len(pool) * SERIES_PER_REQUEST) * 1e6
        for _ in range(period - 1):
            self.round(pool, step_s)


def take_turns(
    cases: list[Case],
    pool: list[list[bytes]],
    args: argparse.Namespace,
    repeat: int,
    min_s: float,
    period_rounds: int,
    max_rounds: int,
) -> None:
    period = max(1, round(WINDOW_S / args.step))
    for c in cases:
        c.warm_up(pool, args.step, period)
        print(
            f"    warm-up {c.name}: first round {c.first_round_us:.2f} µs per series",
            file=sys.stderr,
            flush=True,
        )
    for rep in range(repeat):
        # Rotate who goes first, so a slow spell of the shared machine hits each case in turn.
        order = cases[rep % len(cases) :] + cases[: rep % len(cases)]
        for c in order:
            c.repetition(pool, args.step, period_rounds, min_s, max_rounds)
        print(
            f"    repetition {rep + 1}/{repeat}: "
            + ", ".join(f"{c.name} {c.rates[-1] / 1000:,.0f}k" for c in cases),
            file=sys.stderr,
            flush=True,
        )


def summarise(cases: list[Case], e2e_us: list[float]) -> list[dict[str, Any]]:
    """Per case: the median rate, its ratio to `none` (median of the per-repetition ratios),
    the µs it adds per sample and that as a share of the end-to-end CPU per sample."""
    base = cases[0]
    base_med = statistics.median(base.rates)
    out = []
    for c in cases:
        med = statistics.median(c.rates)
        ratios = [r / b for r, b in zip(c.rates, base.rates, strict=True)]
        added_us = 1e6 / med - 1e6 / base_med
        out.append(
            {
                "case": c.name,
                "rates": [round(r) for r in c.rates],
                "median_samples_per_cpu_s": round(med),
                "us_per_sample": 1e6 / med,
                "ratio_to_none_per_rep": [round(r, 3) for r in ratios],
                "ratio_to_none": statistics.median(ratios),
                "overhead_vs_none": 1 - statistics.median(ratios),
                "added_us_per_sample": added_us,
                "first_round_us_per_series": c.first_round_us,
                "e2e": {
                    str(u): {"share": added_us / u, "throughput_kept": u / (u + added_us)}
                    for u in e2e_us
                },
                "changed_requests": c.changed,
            }
        )
    return out


def print_table(rows: list[dict[str, Any]], e2e_us: list[float]) -> None:
    e2e_head = "  ".join(f"{'% of ' + format(u, 'g') + ' µs':>11s}" for u in e2e_us)
    print(
        f"  {'case':22s} {'samples/CPU-s':>13s} {'µs/sample':>9s} {'vs none':>8s}"
        f" {'overhead':>8s} {'+µs/sample':>10s}  {e2e_head}  {'1st round µs/series':>19s}"
    )
    for r in rows:
        shares = "  ".join(f"{r['e2e'][str(u)]['share'] * 100:10.1f}%" for u in e2e_us)
        print(
            f"  {r['case']:22s} {r['median_samples_per_cpu_s']:>13,} {r['us_per_sample']:9.3f}"
            f" {r['ratio_to_none']:8.3f} {r['overhead_vs_none'] * 100:7.1f}%"
            f" {r['added_us_per_sample']:10.3f}  {shares}  {r['first_round_us_per_series']:19.2f}"
        )
    for r in rows:
        per = ", ".join(f"{x / 1000:,.0f}k" for x in r["rates"])
        print(f"    {r['case']:22s} per repetition [{per}], ratio {r['ratio_to_none_per_rep']}")


# ---- 1. stats overhead ------------------------------------------------------------------------


def stats_gov(level: str, labels: list[str]) -> Callable[[Clock], Governance | None]:
    def make(clock: Clock) -> Governance | None:
        if level == "none":
            return None
        cfg = StatsConfig(level=level, labels=labels, window_s=WINDOW_S)
        return Governance(pipeline="prw", stats=Stats(cfg, pipeline="prw"), clock_ms=clock)

    return make


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    n_req = args.series // SERIES_PER_REQUEST
    print(
        f"\n1. stats overhead: {n_req * SERIES_PER_REQUEST:,} active series ({n_req} requests of"
        f" {SERIES_PER_REQUEST}), {args.step:g} s per round, {WINDOW_S:g} s windows; median of"
        f" {args.repeat} repetitions of whole windows, >= {args.seconds:g} CPU-s each;"
        f" stats.labels {args.stats_labels}"
        + (f"; {args.idle_ms:g} ms idle before each request" if args.idle_ms else ""),
        flush=True,
    )
    pool = workload.build_pool(n_req, SERIES_PER_REQUEST, seed=1)
    labels = args.stats_labels
    plan = {
        "basic": ("basic", stats_gov("basic", [])),
        "full": ("full", stats_gov("full", [])),
        "full-labels": ("full + stats.labels", stats_gov("full", labels)),
    }
    idle_s = args.idle_ms / 1000
    cases = [Case("none (prw.count)", stats_gov("none", []), idle_s)]
    cases += [Case(*plan[key], idle_s) for key in args.cases]
    period = max(1, round(WINDOW_S / args.step))
    take_turns(cases, pool, args, args.repeat, args.seconds, period, args.max_rounds)
    rows = summarise(cases, args.e2e_us)
    print_table(rows, args.e2e_us)
    for c in cases:
        if c.gov is not None and c.gov.stats is not None and c.gov.stats.full:
            st = c.gov.stats
            print(
                f"  {c.name} after the run: {len(st.metrics)} names, {len(st.groups)} label"
                f" combinations, tracker bytes {st.memory_bytes() / MB:.2f} MB,"
                f" facts cached {c.gov.series_cached:,}"
            )
    print("  targets (overhead in samples per CPU-second):")
    for r in rows[1:]:
        limit = 0.10 if r["case"] == "basic" else 0.30
        micro = r["overhead_vs_none"]
        e2e = [1 - r["e2e"][str(u)]["throughput_kept"] for u in args.e2e_us]
        print(
            f"    {r['case']:22s} < {limit:.0%}: against prw.count alone {micro:.1%}"
            f" -> {'met' if micro < limit else 'NOT met'}; end to end (estimate, "
            + ", ".join(f"{u:g} µs: {e:.1%}" for u, e in zip(args.e2e_us, e2e, strict=True))
            + f") -> {'met' if max(e2e) < limit else 'NOT met'}"
        )
    return {"series": n_req * SERIES_PER_REQUEST, "cases": rows}


# ---- 2. limits at 1M series ---------------------------------------------------------------------

_POOLS: dict[int, list[list[bytes]]] = {}


def big_pool(n_series: int) -> list[list[bytes]]:
    """workload.py requests of 1000 distinct series, `n_series` in all (built once per process)."""
    n_req = n_series // SERIES_PER_REQUEST
    if n_req not in _POOLS:
        t0 = time.monotonic()
        _POOLS[n_req] = workload.build_pool(n_req, SERIES_PER_REQUEST, seed=1)
        print(
            f"    built {n_req} requests in {time.monotonic() - t0:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return _POOLS[n_req]


def limits_gov(clock: Clock) -> Governance:
    limits = LimitEngine(load_limits(LIMITS), pipeline="prw")
    return Governance(pipeline="prw", limits=limits, clock_ms=clock)


def traced(fn: Callable[[], Any]) -> tuple[Any, int, list[tuple[str, int]]]:
    """Run `fn` under tracemalloc: its result, the bytes allocated during it and still allocated
    after it (gc'd), and those bytes by source file (largest first)."""
    gc.collect()
    tracemalloc.start()
    m0 = tracemalloc.get_traced_memory()[0]
    result = fn()
    gc.collect()
    total = tracemalloc.get_traced_memory()[0] - m0
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    tracemalloc.stop()
    by_file = [(str(s.traceback[0].filename), s.size) for s in snapshot.statistics("filename")]
    return result, total, by_file


def _short(path: str) -> str:
    for marker in ("/service/", "/site-packages/", "/lib/python3"):
        if marker in path:
            return marker.strip("/").split("/")[0] + "/" + path.split(marker, 1)[1]
    return path


def limits_case(args: argparse.Namespace) -> dict[str, Any]:
    n = args.limits_series
    print(
        f"\n2. limits overhead: {n:,} active series ({n // SERIES_PER_REQUEST} requests of"
        f" {SERIES_PER_REQUEST} per round), {args.step:g} s per round; median of"
        f" {args.limits_repeat} repetitions of {args.limits_rounds} rounds",
        flush=True,
    )
    print("  limits file:\n" + "".join(f"    {line}\n" for line in LIMITS.splitlines()), end="")
    pool = big_pool(n)
    rss0 = rss()
    cases = [Case("none (prw.count)", stats_gov("none", [])), Case("limits", limits_gov)]
    take_turns(
        cases,
        pool,
        args,
        args.limits_repeat,
        0.0,
        args.limits_rounds,
        args.limits_rounds,
    )
    rss1 = rss()
    rows = summarise(cases, args.e2e_us)
    print_table(rows, args.e2e_us)
    gov = cases[1].gov
    engine = gov.limits if gov is not None else None
    dropped = {name: dict(st.dropped) for name, st in engine.stats.items()} if engine else {}
    groups = {name: len(g) for name, g in engine.groups.items()} if engine else {}
    print(
        f"  limits: groups {groups}; dropped {dropped}; requests rewritten {cases[1].changed}"
        f"; facts cached {gov.series_cached if gov is not None else 0:,}"
    )
    print(
        f"  RSS growth, steady state (before the Governance -> after the last repetition):"
        f" {(rss1 - rss0) / MB:.0f} MB, {(rss1 - rss0) / n:.0f} bytes per series"
    )
    del cases, gov, engine
    out: dict[str, Any] = {
        "series": n,
        "limits_file": LIMITS,
        "cases": rows,
        "groups": groups,
        "dropped": dropped,
        "rss_growth_bytes": rss1 - rss0,
    }
    if args.limits_tracemalloc:
        out["tracemalloc"] = limits_traced(pool, n)
    return out


def limits_traced(pool: list[list[bytes]], n: int) -> dict[str, Any]:
    """A fresh Governance with the limits, two rounds a window apart, under tracemalloc."""

    def run() -> Governance | None:
        case = Case("limits", limits_gov)
        case.round(pool, WINDOW_S)
        case.round(pool, WINDOW_S)
        return case.gov

    t0 = time.monotonic()
    gov, total, by_file = traced(run)
    print(
        f"  tracemalloc, a fresh Governance after 2 rounds a window apart"
        f" ({time.monotonic() - t0:.0f} s): {total / MB:.0f} MB retained,"
        f" {total / n:.0f} bytes per series; by file:"
    )
    for path, size in by_file[:6]:
        print(f"    {size / MB:8.1f} MB  {_short(path)}")
    del gov
    return {
        "retained_bytes": total,
        "bytes_per_series": total / n,
        "by_file": [(_short(p), s) for p, s in by_file[:10]],
    }


# ---- 3. memory per million tracked series -----------------------------------------------------


def zipf_counts(n: int, metrics: int, s: float) -> list[int]:
    """`n` series over `metrics` names, the k-th name's share proportional to 1/k^s (largest
    remainders, so they sum to `n`)."""
    w = [1 / (k**s) for k in range(1, metrics + 1)]
    total = sum(w)
    exact = [n * x / total for x in w]
    counts = [int(x) for x in exact]
    for i in sorted(range(metrics), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
        counts[i] += 1
    return counts


def distributions(n: int, exact_limit: int) -> dict[str, list[int]]:
    under = exact_limit - 1
    full, rest = divmod(n, under)
    return {
        "zipf s=1, 1000 names": zipf_counts(n, 1000, 1.0),
        "zipf s=1, 5000 names": zipf_counts(n, 5000, 1.0),
        f"worst: every name {under} series (< exact_limit)": [under] * full
        + ([rest] if rest else []),
        "workload.py: 8 names": [n // 8] * 8,
    }


class LabelTable:
    """Interned label pairs for synthetic series (what Governance's facts share between series):
    series j of a metric gets namespace j%8, app (j//8)%8, job namespace/app, a pod and instance
    per 64 series, and three labels of one of workload.py's metric families (by metric)."""

    def __init__(self, max_per_metric: int) -> None:
        ns, apps = workload._NAMESPACES, workload._APPS
        pods = max_per_metric // 64 + 1
        self.cluster = ("cluster", "prod-eu-west-1")
        self.container = [("container", a) for a in apps]
        self.namespace = [("namespace", x) for x in ns]
        self.job = [("job", f"{x}/{a}") for x in ns for a in apps]
        self.pod = [("pod", f"app-7f9c{p:06x}-x") for p in range(pods)]
        self.instance = [
            ("instance", f"10.{(p >> 16) & 255}.{(p >> 8) & 255}.{p & 255}:8080")
            for p in range(pods)
        ]
        self.families = [
            [[(key, v) for v in values] for key, values in extra]
            for _name, extra in workload._METRICS
        ]
        self.groups = [(x, a) for x in ns for a in apps]  # (namespace, container)

    def pairs(self, metric: int, j: int) -> tuple[tuple[str, str], ...]:
        a, b, c = self.families[metric % len(self.families)]
        ns, app = j % 8, (j // 8) % 8
        pod = j // 64
        return (
            self.cluster,
            self.container[app],
            self.instance[pod],
            self.job[ns * 8 + app],
            self.namespace[ns],
            self.pod[pod],
            a[j % len(a)],
            b[(j * 7) % len(b)],
            c[(j * 13) % len(c)],
        )

    def group(self, j: int) -> tuple[str, str]:
        return self.groups[(j % 8) * 8 + (j // 8) % 8]


def feed_stats(counts: list[int], labels: list[str], table: LabelTable) -> Stats:
    """A full Stats fed every series of `counts` (per metric name) for two consecutive windows,
    in batches of up to 1000 series of one name, the way Governance._count_prw feeds it, then
    counted as a /metrics scrape counts it. Series hashes are fresh int objects in each window
    (as `hash_many` makes them per request)."""
    stats = Stats(StatsConfig(level="full", labels=labels, window_s=WINDOW_S), pipeline="prw")
    names = [f"metric_{m:05d}_total" for m in range(len(counts))]
    for window in range(2):
        now_s = _FIRST_TS / 1000 + window * WINDOW_S
        for m, count in enumerate(counts):
            name = names[m]
            for start in range(0, count, SERIES_PER_REQUEST):
                b = min(SERIES_PER_REQUEST, count - start)
                rng = random.Random(m * 1_000_003 + start)  # the same hashes in both windows
                hashes = array("Q", rng.randbytes(8 * b)).tolist()
                stats.add_datapoints({name: b}, now_s)
                js = range(start, start + b)
                if labels:
                    groups = [table.group(j) for j in js]
                    stats.add_group_datapoints(collections.Counter(groups), now_s)
                for j in js:
                    stats.add_label_values(name, dict.fromkeys(table.pairs(m, j), 1))
                stats.add_series(name, hashes, now_s)
                if labels:
                    by_group: dict[tuple[str, str], list[int]] = {}
                    for g, h in zip(groups, hashes, strict=True):
                        by_group.setdefault(g, []).append(h)
                    for g, hs in by_group.items():
                        stats.add_group_series(g, hs, now_s)
    # A /metrics scrape (StatsCollector) counts every name's and combination's series: from
    # then on a tracker that counts by sketch also keeps the union of its windows as one.
    stats.top_metrics(20, "series")
    for c in stats.groups.values():
        c.series()
    return stats


def _malloc_trim() -> bool:
    """glibc's malloc_trim(0): free memory handed back to the system; False without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def tracker_memory(dist: str, n: int, labels: list[str], trace: bool) -> dict[str, Any]:
    """One distribution, in this (fresh) process: tracemalloc's retained bytes or the RSS
    growth, and Stats.memory_bytes()."""
    counts = distributions(n, StatsConfig().exact_limit)[dist]
    table = LabelTable(max(counts))
    out: dict[str, Any] = {"dist": dist, "series": sum(counts), "metrics": len(counts)}
    if trace:
        stats, retained, by_file = traced(lambda: feed_stats(counts, labels, table))
        out["tracemalloc_bytes"] = retained
        out["by_file"] = [(_short(p), s) for p, s in by_file[:6]]
    else:
        rss0 = rss()
        stats = feed_stats(counts, labels, table)
        out["rss_growth_bytes"] = rss() - rss0
        # The same after glibc hands back the free memory it keeps (governor's allocator
        # tuning keeps up to 64 MB of it: what feeding freed stays in RSS until then).
        out["rss_trimmed_bytes"] = rss() - rss0 if _malloc_trim() else None
    trackers = [c.tracker for c in (*stats.metrics.values(), *stats.groups.values())]
    out["memory_bytes"] = stats.memory_bytes()
    out["exact_trackers"] = sum(1 for t in trackers if t is not None and t.statistics().exact)
    out["trackers"] = len(trackers)
    out["series_counted"] = sum(c.series() for c in stats.metrics.values())
    return out


def _in_subprocess(case: str, **kw: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--case", case, "--args", json.dumps(kw)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def facts_memory(n: int, level: str = "full") -> dict[str, Any]:
    """Governance's per-series facts for `n` workload.py series with stats at `level`, one
    pass, under tracemalloc."""
    pool = big_pool(n)
    clock = Clock()
    stats = Stats(StatsConfig(level=level, window_s=WINDOW_S), pipeline="prw")
    gov = Governance(pipeline="prw", stats=stats, clock_ms=clock)

    def run() -> None:
        gov._check_facts()
        for tpl in pool:
            keys, ids = series_keys(workload.render(tpl, clock.ms))
            gov._slots_of(keys.__getitem__, np.array(ids, dtype=np.uint64))

    t0 = time.monotonic()
    _, retained, by_file = traced(run)
    return {
        "series": gov.series_cached,
        "tracemalloc_bytes": retained,
        "bytes_per_series": retained / gov.series_cached,
        "interned_strings": len(gov._strings),
        "interned_pairs": len(gov._pairs),
        "by_file": [(_short(p), s) for p, s in by_file[:6]],
        "seconds": time.monotonic() - t0,
    }


def memory(args: argparse.Namespace) -> dict[str, Any]:
    n = args.memory_series
    labels = args.stats_labels
    print(
        f"\n3. memory per million tracked series: full stats (labels={','.join(labels)}),"
        f" {n:,} series, two windows fed (steady state); exact_limit"
        f" {StatsConfig().exact_limit}; each distribution in a fresh process",
        flush=True,
    )
    print(
        f"  {'distribution':44s} {'names':>6s} {'exact/all trackers':>18s} {'tracemalloc':>11s}"
        f" {'MB/1M':>7s} {'RSS growth':>10s} {'MB/1M':>7s} {'trimmed':>10s} {'MB/1M':>7s}"
        f" {'memory_bytes()':>14s} {'MB/1M':>7s}"
    )
    rows = []
    for dist in distributions(n, StatsConfig().exact_limit):
        t = _in_subprocess("tracker_memory", dist=dist, n=n, labels=labels, trace=True)
        r = _in_subprocess("tracker_memory", dist=dist, n=n, labels=labels, trace=False)
        t["rss_growth_bytes"] = r["rss_growth_bytes"]
        t["rss_trimmed_bytes"] = trimmed = r["rss_trimmed_bytes"]
        rows.append(t)
        per = 1e6 / t["series"]
        print(
            f"  {dist:44s} {t['metrics']:>6} {t['exact_trackers']:>8}/{t['trackers']:<9}"
            f" {t['tracemalloc_bytes'] / MB:8.1f} MB {t['tracemalloc_bytes'] / MB * per:7.1f}"
            f" {t['rss_growth_bytes'] / MB:7.1f} MB {t['rss_growth_bytes'] / MB * per:7.1f}"
            + (
                f" {trimmed / MB:7.1f} MB {trimmed / MB * per:7.1f}"
                if trimmed is not None
                else f" {'-':>10s} {'-':>7s}"
            )
            + f" {t['memory_bytes'] / MB:11.1f} MB {t['memory_bytes'] / MB * per:7.1f}",
            flush=True,
        )
    f = facts_memory(args.facts_series)
    print(
        f"  Governance facts cache (full stats or limits), {f['series']:,} workload.py series,"
        f" one pass: {f['tracemalloc_bytes'] / MB:.0f} MB retained, {f['bytes_per_series']:.0f}"
        f" bytes per series ({f['bytes_per_series']:.0f} MB per 1M; {f['interned_strings']:,}"
        f" interned strings, {f['interned_pairs']:,} pairs); by file:"
    )
    for path, size in f["by_file"]:
        print(f"    {size / MB:8.1f} MB  {path}")
    b = facts_memory(args.facts_series, "basic")
    print(
        f"  Governance facts cache (basic stats alone: the name only), {b['series']:,} series,"
        f" one pass: {b['tracemalloc_bytes'] / MB:.0f} MB retained, {b['bytes_per_series']:.0f}"
        " bytes per series"
    )
    print("  target: 1M tracked series in under 50 MB:")
    for t in rows:
        mb = t["tracemalloc_bytes"] / MB * 1e6 / t["series"]
        with_facts = mb + f["bytes_per_series"]
        print(
            f"    {t['dist']:44s} stats {mb:6.1f} MB -> {'met' if mb < 50 else 'NOT met'};"
            f" with the facts cache {with_facts:6.1f} MB"
            f" -> {'met' if with_facts < 50 else 'NOT met'}"
        )
    return {"series": n, "labels": labels, "distributions": rows, "facts": f, "basic_facts": b}


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="overhead,limits,memory", help="sections, comma-separated")
    p.add_argument("--repeat", type=int, default=5, help="overhead: repetitions (median)")
    p.add_argument("--seconds", type=float, default=1.0, help="overhead: CPU-s per repetition")
    p.add_argument("--max-rounds", type=int, default=200, help="overhead: rounds per repetition")
    p.add_argument("--series", type=int, default=100_000, help="overhead: active series")
    p.add_argument(
        "--cases",
        default="basic,full,full-labels",
        help="overhead: cases besides none (basic, full, full-labels), comma-separated",
    )
    p.add_argument("--step", type=float, default=15.0, help="seconds between rounds (scrape)")
    p.add_argument(
        "--idle-ms",
        type=float,
        default=0.0,
        help="overhead: ms the process sleeps (untimed) before each request, as governor's CPU"
        " idles between requests end to end",
    )
    p.add_argument(
        "--stats-labels",
        default="namespace,container",
        help="stats.labels of the labelled full case and of the memory section",
    )
    p.add_argument(
        "--e2e-us",
        default="1.8,2.0",
        help="governor's end-to-end CPU per sample, µs (bench/RESULTS.md), comma-separated",
    )
    p.add_argument("--limits-series", type=int, default=1_000_000)
    p.add_argument("--limits-repeat", type=int, default=3)
    p.add_argument("--limits-rounds", type=int, default=4, help="rounds per repetition")
    p.add_argument(
        "--no-limits-tracemalloc",
        dest="limits_tracemalloc",
        action="store_false",
        help="skip the traced limits pass (~1-2 min at 1M series)",
    )
    p.add_argument("--memory-series", type=int, default=1_000_000)
    p.add_argument("--facts-series", type=int, default=1_000_000)
    p.add_argument("--json-out", type=Path, help="where to write the JSON results")
    p.add_argument(
        "--write-limits",
        type=Path,
        metavar="PATH",
        help="write the limits file of the limits case to PATH and exit (for bench/e2e_prw.py"
        " --limits)",
    )
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_limits:
        args.write_limits.write_text(LIMITS)
        return 0
    if args.case:
        fn = {"tracker_memory": tracker_memory}[args.case]
        print(json.dumps(fn(**json.loads(args.args))))
        return 0
    args.stats_labels = [x for x in args.stats_labels.split(",") if x]
    args.cases = [x.strip() for x in args.cases.split(",") if x.strip()]
    if set(args.cases) - {"basic", "full", "full-labels"}:
        p.error("--cases takes basic, full and/or full-labels")
    args.e2e_us = [float(x) for x in args.e2e_us.split(",") if x]
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - {"overhead", "limits", "memory"}
    if unknown:
        p.error(f"--only: unknown section(s) {sorted(unknown)}")
    if min(args.repeat, args.limits_repeat, args.limits_rounds, args.series, args.step) <= 0:
        p.error("--repeat, --limits-repeat, --limits-rounds, --series and --step must be positive")
    if WINDOW_S % args.step:
        p.error(f"--step must divide the {WINDOW_S:g} s window")

    # What governor does at start (service/allocator.py): without it, every request-sized buffer
    # is an mmap and its page faults, which would count against every case.
    tuned = allocator.tune()
    code = provenance.code_state(Path(service.__file__).parent)
    code["malloc_tuned"] = tuned
    print(
        f"stats and limits benchmark; service from {code['service_path']}, sources sha256"
        f" {code['service_sha256']}"
        + (
            f", HEAD {code['head']}, uncommitted changes in service/:"
            f" {code.get('service_changes') or 'none'}"
            if "head" in code
            else ""
        )
    )
    results: dict[str, Any] = {"code": code, "args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.monotonic()
    if "overhead" in sections:
        results["overhead"] = overhead(args)
    if "limits" in sections:
        results["limits"] = limits_case(args)
    if "memory" in sections:
        results["memory"] = memory(args)
    print(f"\n({time.monotonic() - t0:.0f} s)")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
        print(f"JSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
