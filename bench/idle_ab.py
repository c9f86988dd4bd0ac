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

`--together` runs every checkout in one process instead, each imported under a name of its own
(a copy of its `service` package with its imports renamed, in a temporary directory): every
request goes through each checkout's governance in turn (the order reversed every other
request), each call after its own idle sleep, so the machine's drift over seconds, which moves
separate processes by ±20 %, falls on all of them alike. The checkouts must share their .proto
files (upb's descriptor pool takes the same file twice only when it is the same).
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# trio imports the standard library's `queue`, which bench/queue.py would shadow.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def run_case(tree: str, mode: str, idle_s: float, rounds: int, size: int, series: int) -> dict:
    """One checkout in this process, with `service` imported from `tree`."""
    import importlib

    sys.path.insert(0, tree)
    sys.path.append(str(ROOT / "bench"))
    import workload

    mod = {m: importlib.import_module(f"service.{m}") for m in _MODULES}
    mod["allocator"].tune()
    now = [1_780_000_000_000]
    gov, _, tick = _governance(mod, mode, now)
    step_ms = 1000 if mode == "rules" else 15_000
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
        if tick is not None:
            t0 = clock()
            tick()
            governed[-1] += clock() - t0  # the tick, with the round's last request
        for d in datas:
            time.sleep(idle_s)
            t0 = clock()
            mod["codec.prw"].count(d)
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


def _import_as(tree: str, alias: str, into: Path) -> Any:
    """`tree`'s service package, copied to `into/alias` with its imports renamed, imported."""
    import importlib
    import re
    import shutil

    shutil.copytree(Path(tree) / "service", into / alias, ignore=shutil.ignore_patterns("*.pyc"))
    imports = re.compile(r"(?m)^(\s*(?:from|import)\s+)service(?=[.\s])")
    for path in (into / alias).rglob("*.py"):
        path.write_text(imports.sub(lambda m: m.group(1) + alias, path.read_text()))
    if str(into) not in sys.path:
        sys.path.insert(0, str(into))
    return importlib.import_module(alias)


def run_together(
    trees: list[str], mode: str, idle_s: float, rounds: int, size: int, series: int
) -> dict:
    """Every checkout in this process, a request through each in turn (see the module doc)."""
    import importlib
    import tempfile

    sys.path.append(str(ROOT / "bench"))
    import workload

    now = [1_780_000_000_000]
    calls: dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="idle_ab")  # the copies stay until the process ends
    for i, tree in enumerate(trees):
        pkg = _import_as(tree, f"service_ab{i}", Path(tmp))
        mod = {m: importlib.import_module(f"{pkg.__name__}.{m}") for m in _MODULES}
        if i == 0:
            mod["allocator"].tune()
            calls["prw.count"] = mod["codec.prw"].count
        gov, _, tick = _governance(mod, mode, now)
        calls[tree] = (gov.prw, tick)
    step_ms = 1000 if mode == "rules" else 15_000
    pool = workload.build_pool(max(1, series // size), size)
    clock = time.thread_time
    spent: dict[str, list[float]] = {k: [] for k in calls}
    order = list(calls)
    for r in range(rounds + 1):  # the first round meets every series: not measured
        datas = [workload.render(t, now[0]) for t in pool]
        for j, d in enumerate(datas):
            for k in order if j % 2 else order[::-1]:
                call = calls[k]
                time.sleep(idle_s)
                t0 = clock()
                (call[0] if isinstance(call, tuple) else call)(d)
                spent[k].append(clock() - t0)
        for k, call in calls.items():
            if isinstance(call, tuple) and call[1] is not None:
                t0 = clock()
                call[1]()
                spent[k][-1] += clock() - t0  # the tick, with the round's last request
        if r == 0:
            for v in spent.values():
                v.clear()
        now[0] += step_ms
    us = 1e6 / size
    return {
        k: {"mean": statistics.fmean(v) * us, "median": statistics.median(v) * us}
        for k, v in spent.items()
    }


_MODULES = (
    "allocator",
    "codec.prw",
    "config",
    "governance.prw",
    "governance.engine",
    "governance.rules",
    "governance.stage",
    "governance.stats",
)


def _governance(mod: dict[str, Any], mode: str, now: list[int]) -> tuple[Any, Any, Any]:
    """A Governance at the `mode` level (or with the realistic rules), its engine, and its
    tick (the engine's due windows, encoded; None without rules)."""
    if mode == "rules":
        rules = mod["governance.rules"].load_rules(
            (ROOT / "bench" / "rules_realistic.yaml").read_text()
        )
        engine = mod["governance.engine"].RuleEngine(
            rules, pipeline="prw", clock_ms=lambda: now[0], rand=random.Random(7).random
        )
        gov = mod["governance.stage"].Governance(
            pipeline="prw", engine=engine, clock_ms=lambda: now[0]
        )

        def tick() -> None:
            emitted = engine.due()
            if emitted:
                mod["governance.prw"].encode(emitted)

        return gov, engine, tick
    stats = mod["governance.stats"].Stats(mod["config"].StatsConfig(level=mode), pipeline="prw")
    gov = mod["governance.stage"].Governance(pipeline="prw", stats=stats, clock_ms=lambda: now[0])
    return gov, None, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trees", default=".", help="checkouts, comma-separated")
    p.add_argument("--mode", choices=("basic", "full", "rules"), default="basic")
    p.add_argument("--reps", type=int, default=4, help="processes per checkout")
    p.add_argument("--idle-ms", type=float, default=4.0, help="sleep before each call")
    p.add_argument("--size", type=int, default=1000, help="series a request")
    p.add_argument("--series", type=int, default=180_000, help="distinct series")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds")
    p.add_argument(
        "--together", action="store_true", help="all checkouts in one process, a request each"
    )
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        kw = json.loads(args.case)
        together = kw.pop("together", None)
        if together:
            print(json.dumps(run_together(together, **kw)))
        else:
            print(json.dumps(run_case(**kw)))
        return
    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    cpu = str((os.cpu_count() or 1) - 1)
    print(
        f"{args.mode}: {args.series:,} series in requests of {args.size}, {args.rounds} rounds,"
        f" {args.idle_ms:g} ms idle before each call, pinned to CPU {cpu}; µs of CPU a sample"
        + (", checkouts in one process" if args.together else "")
    )
    if args.together:
        _main_together(args, trees, cpu)
        return
    results: dict[str, list[dict]] = {t: [] for t in trees}
    for rep in range(args.reps):
        for tree in trees if rep % 2 == 0 else trees[::-1]:
            r = _in_process(cpu, _case(args, tree=tree))
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


def _case(args: argparse.Namespace, **which: Any) -> dict[str, Any]:
    """A measuring process' arguments: the checkout(s) `which` names, the rest from `args`."""
    return {
        **which,
        "mode": args.mode,
        "idle_s": args.idle_ms / 1000,
        "rounds": args.rounds,
        "size": args.size,
        "series": args.series,
    }


def _in_process(cpu: str, case: dict[str, Any]) -> dict[str, Any]:
    """Run `case` in a fresh process pinned to `cpu`; its figures."""
    cmd = ["taskset", "-c", cpu, sys.executable, __file__, "--case", json.dumps(case)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main_together(args: argparse.Namespace, trees: list[str], cpu: str) -> None:
    case = _case(args, together=trees)
    runs = []
    for rep in range(args.reps):
        r = _in_process(cpu, case)
        runs.append(r)
        base = r["prw.count"]["mean"]
        print(
            f"  process {rep + 1}: prw.count {base:.3f};"
            + "".join(f" {t}: {r[t]['mean']:.3f} (adds {r[t]['mean'] - base:.3f})" for t in trees),
            flush=True,
        )
    print("medians over the processes (mean request; adds = over prw.count in the same process):")
    for k in ["prw.count", *trees]:
        mean = statistics.median(r[k]["mean"] for r in runs)
        adds = statistics.median(r[k]["mean"] - r["prw.count"]["mean"] for r in runs)
        print(f"  {k}: {mean:.3f}" + (f", adds {adds:.3f}" if k != "prw.count" else ""))


if __name__ == "__main__":
    main()
