"""The rules through governance's remote-write stage, by request size, against the plain path.

    .venv/bin/python bench/rules_sizes.py [--sizes 500,2000] [--series 180000] [--rounds 7]
        [--compare-tree DIR] [--idle-ms 0]

For each request size, `--series` distinct series (bench/workload.py: 10 labels, one sample) are
cut into requests of that many series and sent round after round, one second of clock apart,
through `Governance.prw` with the realistic rules file (bench/rules_realistic.yaml), as the
receiver calls it; the windows due after each round are emitted and encoded as governor's tick
does. In the same round the same requests go through `prw.count`, the receiver's work without
rules. Figures: µs of CPU per sample for each, and what the rules add, the median over the
rounds after two warm-up rounds (the first sight of every series is not in it). Requests are
rendered before each round and not timed. `--idle-ms` sleeps (untimed) before each call, as
governor's CPU idles between requests end to end (see bench/stats.py: each request then starts
with cold caches).

--compare-tree DIR runs the same cases with the code of another checkout (a `git worktree add`
of an older commit), each case in its own process and in turn with this checkout's, so both
meet the same machine; it prints both and the ratio of what the rules add. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# trio imports the standard library's `queue`, which bench/queue.py would shadow: bench/ goes to
# the end of sys.path (workload.py is still found).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def run_case(
    tree: Path, size: int, series: int, rounds: int, idle_s: float = 0.0
) -> dict[str, float]:
    """One case in this process, with `service` imported from `tree`."""
    sys.path.insert(0, str(tree))
    sys.path.append(str(ROOT / "bench"))
    import random

    import workload

    import service.allocator
    from service.codec import prw as prw_codec
    from service.governance import prw as gov_prw
    from service.governance.engine import RuleEngine
    from service.governance.rules import load_rules
    from service.governance.stage import Governance

    service.allocator.tune()
    now = [1_700_000_000_000]
    rules = load_rules((ROOT / "bench" / "rules_realistic.yaml").read_text())
    engine = RuleEngine(
        rules, pipeline="prw", clock_ms=lambda: now[0], rand=random.Random(7).random
    )
    gov = Governance(pipeline="prw", engine=engine, clock_ms=lambda: now[0])
    pool = workload.build_pool(max(1, series // size), size)
    n = len(pool) * size
    ruled, plain = [], []
    clock = time.process_time

    def each(call: Any, datas: list[bytes]) -> float:
        """CPU-seconds of `call` on each request, `idle_s` asleep before each (untimed)."""
        spent = 0.0
        for d in datas:
            if idle_s:
                time.sleep(idle_s)
            t0 = clock()
            call(d)
            spent += clock() - t0
        return spent

    for r in range(rounds + 2):
        datas = [workload.render(t, now[0]) for t in pool]
        ruled_s = each(gov.prw, datas)
        t0 = clock()
        emitted = engine.due()
        if emitted:
            gov_prw.encode(emitted)
        ruled_s += clock() - t0
        plain_s = each(prw_codec.count, datas)
        if r >= 2:
            ruled.append(ruled_s / n * 1e6)
            plain.append(plain_s / n * 1e6)
        now[0] += 1000
    extra = [a - b for a, b in zip(ruled, plain, strict=True)]
    return {
        "rules_us": statistics.median(ruled),
        "count_us": statistics.median(plain),
        "extra_us": statistics.median(extra),
    }


def spawn(tree: Path, size: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [
        sys.executable,
        __file__,
        "--case",
        json.dumps({"tree": str(tree), "size": size}),
        "--series",
        str(args.series),
        "--rounds",
        str(args.rounds),
        "--idle-ms",
        str(args.idle_ms),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="500,2000", help="series per request, comma-separated")
    p.add_argument("--series", type=int, default=180_000, help="distinct series")
    p.add_argument("--rounds", type=int, default=7, help="measured rounds (after 2 warm-up)")
    p.add_argument("--compare-tree", type=Path, help="another checkout, measured in turn")
    p.add_argument("--idle-ms", type=float, default=0.0, help="sleep before each call (untimed)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        case = json.loads(args.case)
        result = run_case(
            Path(case["tree"]), case["size"], args.series, args.rounds, args.idle_ms / 1000
        )
        print(json.dumps(result))
        return
    trees = [("this", ROOT)] + ([("that", args.compare_tree)] if args.compare_tree else [])
    print(
        f"{args.series:,} series, rules file bench/rules_realistic.yaml, µs of CPU a sample"
        + (f", {args.idle_ms:g} ms idle before each call" if args.idle_ms else "")
    )
    sys.stdout.flush()
    for size in (int(s) for s in args.sizes.split(",")):
        got = {name: spawn(tree, size, args) for name, tree in trees}
        for name, tree in trees:
            g = got[name]
            print(
                f"  {size:5d} series a request, {name} ({tree}): Governance.prw "
                f"{g['rules_us']:.3f}, prw.count {g['count_us']:.3f}, the rules add "
                f"{g['extra_us']:.3f}"
            )
        if args.compare_tree:
            ratio = got["this"]["extra_us"] / got["that"]["extra_us"]
            print(f"  {size:5d} series a request: what the rules add, this / that: {ratio:.3f}")


if __name__ == "__main__":
    main()
