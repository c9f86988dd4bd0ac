"""Governance's remote-write work a request at a time with the CPU idle in between, as end to
end, for two or more checkouts in turn.

    .venv/bin/python bench/idle_ab.py --trees /tmp/old,. [--mode basic|full|rules] [--reps 4]
        [--idle-ms 4] [--size 1000] [--series 180000] [--rounds 3]

End to end, governor's CPU is busy a third of the time or less and idles between requests, so
each request meets its code and data out of the CPU's caches: NumPy calls cost several times
what they cost back to back, and every new object touches cold memory. This measures that case.
Each checkout runs in its own process pinned to the last CPU (`taskset`), `--reps` times, the
checkouts taking turns (their order reversed every other repetition). A process builds
`--series` distinct series (bench/workload.py) in requests of `--size`, sends them once to
meet every series, then `--rounds` rounds through `Governance.prw` (stats at the `--mode` level,
or the realistic rules file, bench/rules_realistic.yaml) and through `prw.count`, the receiver's
work without governance, sleeping `--idle-ms` before every call. Each call's thread CPU time is
taken; figures are µs a sample: per checkout, the mean and the median request of each case, what
governance adds over `prw.count`, and the median over the repetitions. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# trio imports the standard library's `queue`, which bench/queue.py would shadow.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def run_case(tree: str, mode: str, idle_s: float, rounds: int, size: int, series: int) -> dict:
    """One checkout in this process, with `service` imported from `tree`."""
    sys.path.insert(0, tree)
    sys.path.append(str(ROOT / "bench"))
    import workload

    import service.allocator
    from service.codec import prw as prw_codec
    from service.config import StatsConfig
    from service.governance import prw as gov_prw
    from service.governance.engine import RuleEngine
    from service.governance.rules import load_rules
    from service.governance.stage import Governance
    from service.governance.stats import Stats

    service.allocator.tune()
    now = [1_780_000_000_000]
    engine = None
    if mode == "rules":
        rules = load_rules((ROOT / "bench" / "rules_realistic.yaml").read_text())
        engine = RuleEngine(
            rules, pipeline="prw", clock_ms=lambda: now[0], rand=random.Random(7).random
        )
        gov = Governance(pipeline="prw", engine=engine, clock_ms=lambda: now[0])
        step_ms = 1000
    else:
        stats = Stats(StatsConfig(level=mode), pipeline="prw")
        gov = Governance(pipeline="prw", stats=stats, clock_ms=lambda: now[0])
        step_ms = 15_000
    pool = workload.build_pool(max(1, series // size), size)
    clock = time.thread_time
    governed: list[float] = []
    counted: list[float] = []
    for r in range(rounds + 1):  # the first round meets every series: not measured
        datas = [workload.render(t, now[0]) for t in pool]
        for d in datas:
            time.sleep(idle_s)
            t0 = clock()
            gov.prw(d)
            governed.append(clock() - t0)
        t0 = clock()
        if engine is not None:
            emitted = engine.due()
            if emitted:
                gov_prw.encode(emitted)
        governed[-1] += clock() - t0  # the tick, with the round's last request
        for d in datas:
            time.sleep(idle_s)
            t0 = clock()
            prw_codec.count(d)
            counted.append(clock() - t0)
        if r == 0:
            governed.clear()
            counted.clear()
        now[0] += step_ms
    us = 1e6 / size
    return {
        "gov_mean": statistics.fmean(governed) * us,
        "gov_median": statistics.median(governed) * us,
        "count_mean": statistics.fmean(counted) * us,
        "count_median": statistics.median(counted) * us,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trees", default=".", help="checkouts, comma-separated")
    p.add_argument("--mode", choices=("basic", "full", "rules"), default="basic")
    p.add_argument("--reps", type=int, default=4, help="processes per checkout")
    p.add_argument("--idle-ms", type=float, default=4.0, help="sleep before each call")
    p.add_argument("--size", type=int, default=1000, help="series a request")
    p.add_argument("--series", type=int, default=180_000, help="distinct series")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        kw = json.loads(args.case)
        print(json.dumps(run_case(**kw)))
        return
    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    cpu = str((os.cpu_count() or 1) - 1)
    print(
        f"{args.mode}: {args.series:,} series in requests of {args.size}, {args.rounds} rounds,"
        f" {args.idle_ms:g} ms idle before each call, pinned to CPU {cpu}; µs of CPU a sample"
    )
    results: dict[str, list[dict]] = {t: [] for t in trees}
    for rep in range(args.reps):
        for tree in trees if rep % 2 == 0 else trees[::-1]:
            case = {
                "tree": tree,
                "mode": args.mode,
                "idle_s": args.idle_ms / 1000,
                "rounds": args.rounds,
                "size": args.size,
                "series": args.series,
            }
            cmd = ["taskset", "-c", cpu, sys.executable, __file__, "--case", json.dumps(case)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[tree].append(r)
            print(
                f"  {tree}: governance {r['gov_mean']:.3f} (median request"
                f" {r['gov_median']:.3f}), prw.count {r['count_mean']:.3f}"
                f" ({r['count_median']:.3f}); adds {r['gov_mean'] - r['count_mean']:.3f}",
                flush=True,
            )
    print("medians over the repetitions:")
    for tree in trees:
        rs = results[tree]
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        adds = statistics.median(r["gov_mean"] - r["count_mean"] for r in rs)
        adds_med = statistics.median(r["gov_median"] - r["count_median"] for r in rs)
        print(
            f"  {tree}: governance {med['gov_mean']:.3f}, prw.count {med['count_mean']:.3f};"
            f" adds {adds:.3f} (median requests: {adds_med:.3f})"
        )


if __name__ == "__main__":
    main()
