"""End-to-end remote-write benchmark: governor against vmagent, same load, same machine.

    .venv/bin/python bench/e2e_prw.py [--runs 3] [--rate 180000] [--duration 30] [--profile]

Each measurement starts a fresh victoria-metrics (temp data dir, free port) and the proxy under
test in front of it: governor (`python -m service`, temporary YAML config) or vmagent. Then
bench/loadgen.py, a separate process, offers `--rate` samples/s to the proxy's /api/v1/write for
`--duration` seconds. While it runs, the proxy's CPU time (user+system) and RSS are sampled every
0.5 s with psutil. After the load the harness waits, bounded, until the proxy has drained (governor:
governor_datapoints_sent_total equals governor_datapoints_received_total; vmagent: victoria-metrics
has stored every sample vmagent accepted). CPU is counted from the first request until drained.

Figures: offered / delivered samples/s, proxy CPU-seconds per million samples, samples per proxy
CPU-second, peak RSS (the kernel's high-water mark, VmHWM), status codes. With --runs N every
figure is reported per run and as the median. Output goes to stdout and, as JSON, to bench/out/.
This prints figures; it asserts nothing about them.

--profile attaches `py-spy record --pid` to governor for the load window and summarises where
its CPU went, by pipeline stage and by function (bench/out/<--profile-name>.txt, raw collapsed
stacks that speedscope.app opens; --profile-format speedscope or flamegraph for the others).
Profiling costs governor ~30 % more CPU: its figures are marked. Use --pin with it: py-spy counts
time spent waiting for a CPU as busy, and without pinning the load generator, woken by each
response, preempts governor often enough to skew the profile.

--compare-tree DIR measures every governor variant a second time with the code of another
checkout (a `git worktree add` of an older commit, say), in the same runs and in turn with this
one's, labelled `governor@<its HEAD>`; the ratios this checkout / that one are printed per run.
Two code versions measured in separate invocations minutes apart differ by the machine's drift
as much as by the change.

Other knobs: --targets governor|vmagent, --series-per-request, --connections, --pin (proxy alone
on the last CPU), --governor-env KEY=VALUE (experiments, e.g. GLIBC_TUNABLES),
--max-concurrent-requests (governor's prw.receiver.max_concurrent_requests).

Queue mode: --queue memory|disk (or memory,disk: both, alternating within each run) sets governor's
prw.queue.mode; in disk mode prw.queue.dir is a directory in the measurement's temp dir, and
--durable-ack sets prw.queue.durable_ack. With both modes, the disk/memory ratios are printed.

Rules mode: --rules FILE measures governor twice per run, alternating, under the same load: without
rules and with FILE as rules.file (label `governor+rules`). The rules drop, sample and absorb
samples into windows, so fewer reach the backend: with rules, "drained" means governor has sent
every sample it accepted minus what its rules removed, plus what their windows emitted (from the
governor_rule_* counters: sent >= received - sum over rules of (input - output)). Both
configurations are compared on samples *accepted* (2xx to the load generator) per governor
CPU-second, and the rules/no-rules ratio of the medians is printed (the issue's target: >= 0.60).
The no-rules path validates requests in C (prw.count); with any rule loaded the receiver parses
every request into Python objects (service/governance/prw.py), so pick a --rate that governor with
rules can sustain on the machine (bench/rules.py gives its datapoints per CPU-second).

Stats and limits mode (issue 6): --stats-level basic|full (comma-separated for several; none adds
nothing) adds a variant per level, `governor+stats-<level>`, with `stats.level` (and
`stats.labels` from --stats-labels) in its config; --limits FILE adds `governor+limits` with FILE
as `limits.file`. Like --rules, each runs next to the plain governor variant within every run and
is compared with it on samples accepted per governor CPU-second (ratio of the medians, and per
run); the issue's targets are printed for the stats levels (basic keeps >= 90 %, full >= 70 %).
With limits, "drained" also subtracts governor_limit_dropped_datapoints_total (datapoints the
limits refused), so a limit that bites does not hold the harness until its drain timeout.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is first on sys.path, where bench/queue.py would shadow the standard
# library's `queue` (imported below and by other modules): move bench/ to the end of the path
# first. Hence the imports below this line (E402).
# ruff: noqa: E402
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH] + [str(_BENCH)]

import argparse
import collections
import contextlib
import copy
import datetime
import itertools
import json
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import provenance
import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
PYTHON = sys.executable
SAMPLE_INTERVAL_S = 0.5
DRAIN_TIMEOUT_S = 120.0


# ---- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Every process the benchmark starts; `stop_all` ends them (SIGTERM, then SIGKILL)."""

    def __init__(self, pin: bool = False) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        # --pin: the proxy alone on the last CPU, everything else on the others.
        ncpu = os.cpu_count() or 1
        self.pin = pin and ncpu >= 2
        self.proxy_cpus = {ncpu - 1}
        self.other_cpus = set(range(ncpu - 1))

    def start(
        self, name: str, cmd: list[str], log: Path, proxy: bool = False, **kw: Any
    ) -> subprocess.Popen:
        if self.pin:
            cpus = self.proxy_cpus if proxy else self.other_cpus
            # Set before exec, so a Go runtime sizes GOMAXPROCS from the mask.
            kw["preexec_fn"] = lambda: os.sched_setaffinity(0, cpus)
        with open(log, "ab") as f:
            p = subprocess.Popen(
                cmd, stdout=kw.pop("stdout", f), stderr=f, stdin=subprocess.DEVNULL, **kw
            )
        self.procs.append((name, p))
        return p

    @staticmethod
    def stop(p: subprocess.Popen, timeout: float = 15.0) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(p)
        self.procs.clear()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http_ok(url: str, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        with contextlib.suppress(OSError):
            if http_get(url, timeout=2.0)[0] == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} was not ready at {url} after {timeout:.0f}s")


_LINE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition as (name, labels, value) tuples."""
    status, body = http_get(url)
    if status != 200:
        raise RuntimeError(f"GET {url}: {status}")
    out = []
    for line in body.decode().splitlines():
        m = _LINE_RE.match(line)
        if m:
            labels = dict(_LABEL_RE.findall(m[2] or ""))
            out.append((m[1], labels, float(m[3])))
    return out


def metric_sum(samples: list, name: str, **match: str) -> float:
    return sum(
        v for n, lbl, v in samples if n == name and all(lbl.get(k) == x for k, x in match.items())
    )


def vm_rows(vm_url: str) -> float:
    return metric_sum(scrape(vm_url + "/metrics"), "vm_rows_inserted_total", type="promremotewrite")


# ---- sampling ---------------------------------------------------------------------------------


def cpu_of(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def system_cpu_of(p: psutil.Process) -> float:
    """The kernel's share of a process's CPU time (system calls, page faults)."""
    return p.cpu_times().system


def minor_faults(pid: int) -> int:
    """Minor page faults of `pid` so far (/proc/pid/stat field 10)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[7])


def runqueue_wait_s(pid: int) -> float:
    """Seconds the threads of `pid` spent runnable but waiting for a CPU (schedstat field 2)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of `pid`, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    """CPU time and RSS of some processes every SAMPLE_INTERVAL_S, until stopped."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in procs}
        self._done = threading.Event()

    def sample(self) -> None:
        now = time.monotonic()
        for name, p in self.procs.items():
            with contextlib.suppress(psutil.Error):
                self.samples[name].append((now, cpu_of(p), p.memory_info().rss / 1e6))

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._done.set()
        self.join(5)
        self.sample()

    def peak_rss_mb(self, name: str) -> float:
        return max((s[2] for s in self.samples[name]), default=0.0)

    def cpu_series(self, name: str) -> list[float]:
        """CPU use (cores) between consecutive samples."""
        s = self.samples[name]
        return [
            round((b[1] - a[1]) / (b[0] - a[0]), 3) for a, b in itertools.pairwise(s) if b[0] > a[0]
        ]


class LineReader(threading.Thread):
    """Reads JSON lines of the load generator's stdout into a queue."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: queue.Queue[dict | None] = queue.Queue()

    def run(self) -> None:
        for raw in self.stream:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(raw))
        self.lines.put(None)

    def wait_for(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"loadgen: no {event!r} line after {timeout:.0f}s")
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                raise RuntimeError(f"loadgen exited before {event!r}")
            if msg.get("event") == event:
                return msg


# ---- profile ----------------------------------------------------------------------------------


def _frame_key(frame: str) -> tuple[str, str]:
    """'func (path/file.py:123)' -> ('func (path/file.py)', 'func (path/file.py:123)')."""
    m = re.match(r"^(.*) \((.*?)(?::(\d+))?\)$", frame)
    if not m:
        return frame, frame
    return f"{m[1]} ({m[2]})", frame


def _area(frame: str) -> str:
    m = re.match(r"^.* \((.*?)(?::\d+)?\)$", frame)
    path = m[1] if m else frame
    if path.startswith("service/"):
        return "/".join(path.split("/")[:2])
    return path.split("/")[0]


def _short_path(path: str) -> str:
    """py-spy's raw format shortens paths to the package part; do the same for speedscope."""
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    root = str(ROOT) + "/"
    if path.startswith(root):
        return path[len(root) :]
    m = re.search(r"/lib/python3\.\d+/(.*)$", path)
    return m[1] if m else path


def load_stacks(path: Path, fmt: str) -> list[tuple[list[str], int]]:
    """Stacks (root first) with sample counts, from a py-spy raw or speedscope file."""
    stacks: list[tuple[list[str], int]] = []
    if fmt == "raw":
        for line in path.read_text().splitlines():
            body, _, count = line.rpartition(" ")
            if body and count.isdigit():
                stacks.append((body.split(";"), int(count)))
    else:
        doc = json.loads(path.read_text())
        frames = [
            f"{f['name']} ({_short_path(f.get('file') or '?')}:{f.get('line') or 0})"
            for f in doc["shared"]["frames"]
        ]
        for prof in doc["profiles"]:
            weights = prof.get("weights") or [1] * len(prof["samples"])
            # py-spy weighs each sample by its interval in seconds: turn them back into counts.
            unit = min((w for w in weights if w > 0), default=1)
            for sample, w in zip(prof["samples"], weights):
                stacks.append(([frames[i] for i in sample], round(w / unit)))  # root first
    return stacks


# Stages of governor's hot path, by a frame that marks them; the first marker in this list that
# appears anywhere in a stack names its stage (so a response's socket send, which runs inside
# hypercorn's TCPServer, still counts as "send response").
_STAGES = [
    # with a rules file (--rules): the receiver's govern() and the engine's window tick
    ("govern (service/governance/prw.py", "rules: govern (parse, engine, re-encode)"),
    ("App._run_engine", "rules: windows tick (due, encode, emit)"),
    ("count (service/codec/prw.py", "receiver: validate + count (prw.count)"),
    ("decode (service/codec/prw.py", "receiver: decode + count (prw.decode)"),
    ("decompress (service/codec/compression.py", "receiver: decompress"),
    ("compress (service/codec/compression.py", "snappy compress"),
    ("snappy_concat (service/codec/compression.py", "batch join (snappy_concat)"),
    ("read_body (service/receivers/http.py", "receiver: read body (ASGI receive)"),
    ("respond (service/receivers/http.py", "receiver: send response (hypercorn/h11/socket)"),
    ("PRWReceiver.", "receiver: other (slots, budget, channel, metrics)"),
    ("TCPServer.", "HTTP server: read + parse request, dispatch (hypercorn/h11)"),
    ("PRWExporter.", "exporter: POST to backend (httpx/httpcore)"),
    ("Batcher.", "batcher (other)"),
    ("TelemetryApp.", "telemetry (/metrics, /ready)"),
    ("EpollIOManager.get_events", "epoll wait (mostly idle)"),
]


def _stage(frames: list[str]) -> str:
    for marker, stage in _STAGES:
        if any(frame.startswith(marker) for frame in frames):
            return stage
    return "trio scheduler, other"


def summarise_profile(path: Path, fmt: str, top: int = 20) -> str:
    stacks = load_stacks(path, fmt)
    total = sum(c for _, c in stacks)
    if not total:
        return "profile: no samples\n"
    self_fn: collections.Counter[str] = collections.Counter()
    self_line: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        frames = [f for f in frames if " (" in f]  # drop py-spy's process/thread pseudo-frames
        if not frames:
            continue
        fn, line = _frame_key(frames[-1])
        self_fn[fn] += count
        self_line[line] += count
        areas[_area(frames[-1])] += count
        stages[_stage(frames)] += count
        for f in {_frame_key(f)[0] for f in frames}:
            incl[f] += count

    def table(title: str, counter: collections.Counter[str]) -> list[str]:
        rows = [f"{title} (% of {total} samples)"]
        rows += [f"  {c / total * 100:5.1f}%  {k}" for k, c in counter.most_common(top)]
        return rows

    lines = [f"profile {path.name}: {total} samples of governor's busy threads"]
    lines += table("by pipeline stage", stages)
    lines += table("self time by package/module (leaf frame)", areas)
    lines += table("self time by function", self_fn)
    lines += table("self time by line", self_line)
    lines += table("inclusive time by function", incl)
    return "\n".join(lines) + "\n"


# ---- one measurement --------------------------------------------------------------------------


def governor_config(
    tel_port: int,
    prw_port: int,
    vm_url: str,
    queue: str = "memory",
    queue_cfg: str = "",
    receiver_cfg: str = "",
    rules_file: Path | None = None,
    governance_cfg: str = "",
) -> str:
    rules_cfg = f'rules:\n  file: "{rules_file}"\n' if rules_file is not None else ""
    return f"""\
log:
  level: warning
  format: json
telemetry:
  listen: "127.0.0.1:{tel_port}"
prw:
  receiver:
    listen: "127.0.0.1:{prw_port}"{receiver_cfg}
  queue:
    mode: {queue}{queue_cfg}
  exporters:
    - url: "{vm_url}/api/v1/write"
shutdown_grace_s: 10
{rules_cfg}{governance_cfg}"""


def start_vm(procs: Procs, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    data = tmp / "vm-data"
    data.mkdir()
    cmd = [
        shutil.which("victoria-metrics") or "victoria-metrics",
        f"-storageDataPath={data}",
        f"-httpListenAddr=127.0.0.1:{port}",
        "-search.latencyOffset=0s",
        "-loggerLevel=ERROR",
    ]
    p = procs.start("victoria-metrics", cmd, tmp / "victoria-metrics.log")
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(url + "/health", p, "victoria-metrics")
    return p, url


def run_load(variant: Variant, args: argparse.Namespace, run: int, procs: Procs, tmp: Path):
    target = variant.target
    vm, vm_url = start_vm(procs, tmp)
    profile_proc = None
    profile_file = None
    profile_name = args.profile_name + ("_rules" if variant.rules else "") + variant.suffix
    if variant.tree is not None:  # --compare-tree: the other checkout's profile, apart
        profile_name += "@" + variant.label.split("@", 1)[1].split("+", 1)[0]
    if target == "governor":
        tel_port, prw_port = free_port(), free_port()
        cfg = tmp / "governor.yaml"
        queue_cfg = ""
        if variant.queue == "disk":
            queue_cfg = (
                f'\n    dir: "{tmp / "queue"}"\n    durable_ack: {str(variant.durable).lower()}'
            )
        receiver_cfg = ""
        if args.max_concurrent_requests:
            receiver_cfg = f"\n    max_concurrent_requests: {args.max_concurrent_requests}"
        cfg.write_text(
            governor_config(
                tel_port,
                prw_port,
                vm_url,
                variant.queue,
                queue_cfg,
                receiver_cfg,
                variant.rules,
                variant.governance_cfg(),
            )
        )
        proxy = procs.start(
            "governor",
            [PYTHON, "-m", "service", "--config", str(cfg)],
            tmp / "governor.log",
            proxy=True,
            cwd=variant.tree or ROOT,  # `-m service` finds the package in its working directory
            env={**os.environ, **dict(e.split("=", 1) for e in args.governor_env)},
        )
        tel = f"http://127.0.0.1:{tel_port}"
        wait_http_ok(tel + "/ready", proxy, "governor")
        write_url = f"http://127.0.0.1:{prw_port}/api/v1/write"
    else:
        port = free_port()
        buf = tmp / "vmagent-data"
        buf.mkdir()
        cmd = [
            shutil.which("vmagent") or "vmagent",
            f"-remoteWrite.url={vm_url}/api/v1/write",
            f"-httpListenAddr=127.0.0.1:{port}",
            f"-remoteWrite.tmpDataPath={buf}",
            "-loggerLevel=ERROR",
        ]
        proxy = procs.start("vmagent", cmd, tmp / "vmagent.log", proxy=True)
        tel = f"http://127.0.0.1:{port}"
        wait_http_ok(tel + "/health", proxy, "vmagent")
        write_url = f"http://127.0.0.1:{port}/api/v1/write"

    pp, vmp = psutil.Process(proxy.pid), psutil.Process(vm.pid)

    def loadgen_cmd(duration: float) -> list[str]:
        return [
            PYTHON,
            str(BENCH / "loadgen.py"),
            f"--url={write_url}",
            f"--rate={args.rate}",
            f"--duration={duration}",
            f"--connections={args.connections}",
            f"--series-per-request={args.series_per_request}",
        ]

    lg_cmd = loadgen_cmd(args.duration)
    warmup = {}
    if args.warmup > 0:
        # The same series (loadgen's pool is seeded) before the measurement: every series'
        # first sight, and whatever a proxy does once per series, falls outside it.
        warm = procs.start(
            "loadgen",
            loadgen_cmd(args.warmup),
            tmp / "loadgen-warmup.log",
            stdout=subprocess.PIPE,
            text=True,
        )
        warm_reader = LineReader(warm.stdout)
        warm_reader.start()
        warm_done = warm_reader.wait_for("done", timeout=args.warmup + 420)
        warm.wait(30)
        warmup = {
            "seconds": args.warmup,
            "samples_accepted": warm_done["samples_accepted"],
            "cpu_s": round(cpu_of(pp), 3),
        }
        time.sleep(3)  # what was accepted is delivered before the measurement starts
    rows0 = vm_rows(vm_url)
    before = scrape(tel + "/metrics") if target == "governor" else []
    loadgen = procs.start("loadgen", lg_cmd, tmp / "loadgen.log", stdout=subprocess.PIPE, text=True)
    reader = LineReader(loadgen.stdout)
    reader.start()
    reader.wait_for("sending", timeout=300)
    sampler = Sampler({"proxy": pp, "vm": vmp})
    machine0 = psutil.cpu_times()
    t0 = time.monotonic()
    cpu0, vm_cpu0, sys0 = cpu_of(pp), cpu_of(vmp), system_cpu_of(pp)
    faults0 = minor_faults(proxy.pid)
    wait0 = runqueue_wait_s(proxy.pid)
    sampler.start()
    if args.profile and target == "governor":
        OUT.mkdir(parents=True, exist_ok=True)
        ext = {"raw": "txt", "speedscope": "speedscope.json", "flamegraph": "svg"}
        profile_file = OUT / f"{profile_name}.{ext[args.profile_format]}"
        profile_proc = procs.start(
            "py-spy",
            [
                str(Path(PYTHON).parent / "py-spy"),
                "record",
                "--pid",
                str(proxy.pid),
                "--rate",
                str(args.profile_rate),
                "--duration",
                str(int(args.duration)),
                "--format",
                args.profile_format,
                "-o",
                str(profile_file),
                *(["--native"] if args.profile_native else []),
            ],
            tmp / "py-spy.log",
        )
    done = reader.wait_for("done", timeout=args.duration + 120)
    t_load_end = time.monotonic()
    loadgen.wait(30)
    cpu_load = cpu_of(pp) - cpu0

    # Drain: bounded wait until everything accepted has been delivered.
    drained = False
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    received = sent = removed = 0.0
    while time.monotonic() < deadline:
        if target == "governor":
            m = scrape(tel + "/metrics")

            def delta(name: str, m: list = m) -> float:
                return metric_sum(m, name) - metric_sum(before, name)

            received = delta("governor_datapoints_received_total")
            sent = delta("governor_datapoints_sent_total")
            if variant.rules is not None:
                # What the rules took out (dropped, sampled away, absorbed into windows) less
                # what their windows emitted: input - output, summed over the rules.
                removed = delta("governor_rule_input_datapoints_total") - delta(
                    "governor_rule_output_datapoints_total"
                )
            if variant.limits is not None:
                removed += delta("governor_limit_dropped_datapoints_total")
        else:
            received = float(done["samples_accepted"])
            sent = vm_rows(vm_url) - rows0
        if sent >= received - removed:
            drained = True
            break
        time.sleep(0.2)
    t_drained = time.monotonic()
    cpu = cpu_of(pp) - cpu0
    vm_cpu = cpu_of(vmp) - vm_cpu0
    sys_cpu = system_cpu_of(pp) - sys0
    faults = minor_faults(proxy.pid) - faults0
    rq_wait = runqueue_wait_s(proxy.pid) - wait0
    machine1 = psutil.cpu_times()
    sampler.stop()
    hwm = hwm_mb(proxy.pid)
    stored = vm_rows(vm_url) - rows0
    receiver_codes: dict[str, int] = {}
    rule_stats: dict[str, dict[str, int]] = {}
    if target == "governor":
        after = scrape(tel + "/metrics")
        for name, lbl, v in after:
            if name == "governor_receiver_requests_total":
                prev = metric_sum(
                    before, "governor_receiver_requests_total", code=lbl.get("code", "")
                )
                receiver_codes[lbl.get("code", "?")] = int(v - prev)
            m = re.fullmatch(r"governor_rule_(\w+)_datapoints_total", name)
            if m and lbl.get("pipeline") == "prw":
                prev = metric_sum(before, name, pipeline="prw", rule=lbl.get("rule", ""))
                rule_stats.setdefault(lbl.get("rule", "?"), {})[m[1]] = int(v - prev)
    else:
        receiver_codes = {k: int(v) for k, v in done["status_counts"].items()}

    profile_summary = None
    if profile_proc is not None:
        try:
            profile_proc.wait(args.duration + 60)
        except subprocess.TimeoutExpired:
            Procs.stop(profile_proc)
        if profile_file and profile_file.exists() and args.profile_format != "flamegraph":
            profile_summary = summarise_profile(profile_file, args.profile_format)
            (OUT / f"{profile_name}_summary.txt").write_text(profile_summary)

    Procs.stop(proxy, timeout=30)
    Procs.stop(vm)

    window = t_drained - t0
    busy = sum(
        getattr(machine1, f) - getattr(machine0, f)
        for f in ("user", "nice", "system", "irq", "softirq", "steal")
    )
    wall = sum(machine1) - sum(machine0)
    steal = machine1.steal - machine0.steal
    delivered = sent if target == "governor" else stored
    accepted = done["samples_accepted"]
    return {
        "target": variant.label,
        "proxy": target,
        "queue": variant.queue,
        "durable_ack": variant.durable,
        "run": run,
        "profiled": bool(profile_proc),
        "offered_samples_per_s": done["offered_samples_per_s"],
        "accepted_samples_per_s": done["accepted_samples_per_s"],
        "delivered_samples_per_s": round(delivered / window, 1) if window else 0.0,
        "samples_offered": done["samples_offered"],
        "samples_accepted": done["samples_accepted"],
        "samples_delivered": int(delivered),
        "samples_stored_in_vm": int(stored),
        "drained": drained,
        "drain_s": round(t_drained - t_load_end, 2),
        "cpu_s": round(cpu, 3),
        "cpu_s_load_window": round(cpu_load, 3),
        "cpu_s_per_million_samples": round(cpu / delivered * 1e6, 3) if delivered else None,
        "samples_per_cpu_s": round(delivered / cpu, 0) if cpu else None,
        "accepted_samples_per_cpu_s": round(accepted / cpu, 0) if cpu else None,
        "cpu_s_per_million_accepted": round(cpu / accepted * 1e6, 3) if accepted else None,
        "rules_file": str(variant.rules) if variant.rules else None,
        "stats_level": variant.stats_level,
        "stats_labels": list(variant.stats_labels),
        "limits_file": str(variant.limits) if variant.limits else None,
        "samples_received_by_governor": int(received) if target == "governor" else None,
        "samples_removed_by_rules": int(removed),
        "rule_stats": rule_stats,
        "cpu_cores_avg": round(cpu / window, 3) if window else None,
        "system_cpu_share": round(sys_cpu / cpu, 3) if cpu else None,
        "runqueue_wait_s": round(rq_wait, 3),
        "minor_faults_per_request": round(faults / max(1, done["requests_sent"]), 1),
        "peak_rss_mb": round(hwm, 1),
        "peak_rss_sampled_mb": round(sampler.peak_rss_mb("proxy"), 1),
        "receiver_status_codes": receiver_codes,
        "loadgen_status_codes": done["status_counts"],
        "loadgen_latency_ms_p50": done["latency_ms_p50"],
        "loadgen_latency_ms_p99": done["latency_ms_p99"],
        "loadgen_max_schedule_lag_ms": done["max_schedule_lag_ms"],
        "loadgen_cpu_s": done["loadgen_cpu_s"],
        "vm_cpu_s": round(vm_cpu, 3),
        "machine_busy_pct": round(busy / wall * 100, 1) if wall else None,
        "machine_steal_pct": round(steal / wall * 100, 2) if wall else None,
        "proxy_cpu_cores_timeline": sampler.cpu_series("proxy"),
        "profile_file": str(profile_file) if profile_file else None,
        "profile_summary": profile_summary,
        "warmup": warmup,
    }


class Variant:
    """What one measurement runs: a proxy, and for governor its queue mode, rules file, stats
    level and limits file."""

    def __init__(
        self,
        target: str,
        queue: str = "memory",
        durable: bool = False,
        rules: Path | None = None,
        stats_level: str = "none",
        stats_labels: tuple[str, ...] = (),
        limits: Path | None = None,
    ) -> None:
        self.target, self.queue, self.durable, self.rules = target, queue, durable, rules
        self.stats_level, self.stats_labels, self.limits = stats_level, stats_labels, limits
        self.tree: Path | None = None  # governor's code from another checkout (--compare-tree)
        self.label = target
        if target == "governor" and (queue != "memory" or durable):
            self.label = f"governor/{queue}" + ("+durable" if durable else "")
        # The label's suffix naming the stats level or limits ("" for neither).
        self.suffix = f"+stats-{stats_level}" if stats_level != "none" else ""
        self.suffix += "+limits" if limits is not None else ""

    def at_tree(self, tree: Path, tag: str) -> Variant:
        """The same measurement with governor run from the checkout `tree`, labelled
        `governor@<tag>...`."""
        other = copy.copy(self)
        other.tree = tree
        other.label = self.label.replace("governor", f"governor@{tag}", 1)
        return other

    def governance_cfg(self) -> str:
        """The `stats:` and `limits:` sections of governor's config ("" when neither is set)."""
        out = ""
        if self.stats_level != "none":
            out += f"stats:\n  level: {self.stats_level}\n"
            if self.stats_labels:
                out += f"  labels: {json.dumps(list(self.stats_labels))}\n"
        if self.limits is not None:
            out += f'limits:\n  file: "{self.limits}"\n'
        return out


def variants(
    targets: list[str],
    queues: list[str],
    durable: bool,
    rules: Path | None = None,
    stats_levels: tuple[str, ...] = (),
    stats_labels: tuple[str, ...] = (),
    limits: Path | None = None,
) -> list[Variant]:
    out = []
    for t in targets:
        if t != "governor":
            out.append(Variant(t))
            continue
        for q in queues:
            v = Variant(t, q, durable and q == "disk")
            if len(queues) > 1 and q == "memory":
                v.label = "governor/memory"
            out.append(v)
            if rules is not None:  # the same configuration with the rules file, next to it
                w = Variant(t, q, durable and q == "disk", rules)
                w.label = v.label + "+rules"
                out.append(w)
            # Stats levels and limits likewise, each next to the plain configuration.
            for level in stats_levels:
                w = Variant(t, q, durable and q == "disk", None, level, stats_labels)
                w.label = v.label + w.suffix
                out.append(w)
            if limits is not None:
                w = Variant(t, q, durable and q == "disk", None, limits=limits)
                w.label = v.label + w.suffix
                out.append(w)
    return out


def measure(variant: Variant, args: argparse.Namespace, run: int) -> dict[str, Any]:
    procs = Procs(pin=args.pin)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{variant.target}-"))
    try:
        return run_load(variant, args, run, procs, tmp)
    except Exception:
        for log in sorted(tmp.glob("*.log")):
            tail = log.read_text(errors="replace")[-2000:]
            print(f"--- {log.name} (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- report -----------------------------------------------------------------------------------

_FIGURES = [
    ("offered_samples_per_s", "offered samples/s", "{:,.0f}"),
    ("delivered_samples_per_s", "delivered samples/s (load start to drained)", "{:,.0f}"),
    ("drain_s", "drain time after load, s", "{:.2f}"),
    ("cpu_s", "proxy CPU-seconds (load start to drained)", "{:.2f}"),
    ("cpu_cores_avg", "proxy CPU, cores (average)", "{:.3f}"),
    ("cpu_s_per_million_samples", "proxy CPU-s per million samples", "{:.3f}"),
    ("samples_per_cpu_s", "samples per proxy CPU-second", "{:,.0f}"),
    ("system_cpu_share", "proxy CPU in the kernel (system), share", "{:.3f}"),
    ("runqueue_wait_s", "proxy time waiting for a CPU (runqueue), s", "{:.2f}"),
    ("minor_faults_per_request", "proxy minor page faults per request", "{:.1f}"),
    ("peak_rss_mb", "proxy peak RSS, MB (VmHWM)", "{:.1f}"),
    ("peak_rss_sampled_mb", "proxy peak RSS, MB (0.5 s samples)", "{:.1f}"),
    ("loadgen_latency_ms_p50", "request latency p50, ms", "{:.2f}"),
    ("loadgen_latency_ms_p99", "request latency p99, ms", "{:.2f}"),
    ("vm_cpu_s", "victoria-metrics CPU-seconds", "{:.2f}"),
    ("loadgen_cpu_s", "loadgen CPU-seconds", "{:.2f}"),
    ("machine_busy_pct", "machine busy, % of all cores", "{:.1f}"),
    ("machine_steal_pct", "machine steal, %", "{:.2f}"),
]


# With --rules: the figures both configurations are compared on (samples the load generator got a
# 2xx for; with rules fewer samples reach the backend than governor accepted).
_RULES_FIGURES = [
    ("accepted_samples_per_s", "accepted samples/s (2xx to the load generator)", "{:,.0f}"),
    ("accepted_samples_per_cpu_s", "accepted samples per proxy CPU-second", "{:,.0f}"),
    ("cpu_s_per_million_accepted", "proxy CPU-s per million accepted samples", "{:.3f}"),
    ("samples_removed_by_rules", "samples removed by rules (input - output)", "{:,.0f}"),
]
RULES_TARGET = 0.60  # the target: rules keep >= 60 % of the no-rules samples/CPU-s
# Issue 6's targets: basic stats cost under 10 %, full under 30 % of the samples per CPU-second.
# Limits have no throughput target (their ratio is printed).
GOVERNANCE_TARGETS = {"+rules": RULES_TARGET, "+stats-basic": 0.90, "+stats-full": 0.70}
_COMPARED_SUFFIXES = ("+rules", "+stats-basic", "+stats-full", "+limits")


def base_label(label: str) -> tuple[str, str]:
    """(the plain variant a --rules/--stats-level/--limits variant is compared with, the
    suffix); (label, "") for a plain one."""
    for suffix in _COMPARED_SUFFIXES:
        if label.endswith(suffix):
            return label.removesuffix(suffix), suffix
    return label, ""


def median_of(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def _per_run_ratio(results: list[dict], a: str, b: str, into: dict[str, Any]) -> None:
    """Variant `a`'s accepted samples per CPU-second over `b`'s, run by run: printed, and kept
    in `into` as per_run_accepted_samples_per_cpu_s."""
    key = "accepted_samples_per_cpu_s"
    per_run = []
    for n in sorted({r["run"] for r in results}):
        x = next((r[key] for r in results if r["run"] == n and r["target"] == a), None)
        y = next((r[key] for r in results if r["run"] == n and r["target"] == b), None)
        if x and y:
            per_run.append(round(x / y, 3))
    if per_run:
        into["per_run_" + key] = per_run
        print(f"  {'accepted samples per CPU-second, per run':46s} {per_run}")


def report(results: list[dict], args: argparse.Namespace, labels: list[str]) -> dict[str, Any]:
    targets = [t for t in labels if any(r["target"] == t for r in results)]
    with_rules = any(
        r.get("rules_file") or r.get("stats_level", "none") != "none" or r.get("limits_file")
        for r in results
    )
    figures = _FIGURES + (_RULES_FIGURES if with_rules else [])
    medians = {
        t: {k: median_of([r for r in results if r["target"] == t], k) for k, _, _ in figures}
        for t in targets
    }
    print(
        f"\n== remote write e2e: {args.rate:,.0f} samples/s offered for {args.duration:.0f}s, "
        f"{args.series_per_request} series x 10 labels per request, {args.runs} run(s)"
        + (f", after {args.warmup:.0f}s of the same load (not measured)" if args.warmup else "")
        + " =="
    )
    for t in targets:
        runs = [r for r in results if r["target"] == t]
        print(f"\n{t}" + (" (PROFILED: py-spy attached)" if runs[0]["profiled"] else ""))
        header = f"  {'figure':46s} {'median':>12s}  per run"
        print(header)
        for key, label, fmt in figures:
            med = medians[t][key]
            per = ", ".join(fmt.format(r[key]) if r[key] is not None else "-" for r in runs)
            print(f"  {label:46s} {fmt.format(med) if med is not None else '-':>12s}  [{per}]")
        for r in runs:
            print(
                f"  run {r['run']}: receiver status codes {r['receiver_status_codes']}, "
                f"loadgen {r['loadgen_status_codes']}, drained={r['drained']}, "
                f"delivered {r['samples_delivered']:,} of {r['samples_accepted']:,} accepted, "
                f"stored in victoria-metrics {r['samples_stored_in_vm']:,}"
                + (
                    f", removed by rules {r['samples_removed_by_rules']:,}"
                    if r.get("rules_file")
                    else ""
                )
            )
        if any(r.get("rule_stats") for r in runs):
            print("  rules: datapoints matched, % of the samples governor received (median)")
            for rule in runs[0]["rule_stats"]:
                shares = [
                    r["rule_stats"].get(rule, {}).get("input", 0)
                    / max(1, r["samples_received_by_governor"] or 0)
                    * 100
                    for r in runs
                ]
                print(f"    {rule:28s} {statistics.median(shares):6.1f} %")
    ratios: dict[str, float] = {}
    governors = [t for t in targets if t.startswith("governor")]
    if "vmagent" in targets and governors:
        v = medians["vmagent"]
        for gl in governors:
            g = medians[gl]
            print(f"\n{gl} / vmagent (medians)")
            for key, label in (
                ("cpu_s_per_million_samples", "CPU-s per million samples"),
                ("samples_per_cpu_s", "samples per CPU-second"),
                ("peak_rss_mb", "peak RSS"),
            ):
                if g[key] and v[key]:
                    name = key if gl == "governor" else f"{gl}:{key}"
                    ratios[name] = round(g[key] / v[key], 3)
                    print(f"  {label:46s} {ratios[name]:>12.3f}")
    queue_ratios: dict[str, dict[str, float]] = {}
    if "governor/memory" in medians:
        m = medians["governor/memory"]
        for gl in governors:
            if gl == "governor/memory":
                continue
            d = medians[gl]
            print(f"\n{gl} / governor/memory (medians)")
            queue_ratios[gl] = {}
            for key, label in (
                ("samples_per_cpu_s", "samples per CPU-second"),
                ("cpu_s_per_million_samples", "CPU-s per million samples"),
                ("delivered_samples_per_s", "delivered samples/s"),
                ("peak_rss_mb", "peak RSS"),
                ("loadgen_latency_ms_p50", "request latency p50"),
            ):
                if d[key] and m[key]:
                    queue_ratios[gl][key] = round(d[key] / m[key], 3)
                    print(f"  {label:46s} {queue_ratios[gl][key]:>12.3f}")
    rules_ratios: dict[str, dict[str, Any]] = {}
    for gl in governors:
        base, _ = base_label(gl)
        if gl == base or base not in medians:
            continue
        d, m = medians[gl], medians[base]
        print(f"\n{gl} / {base} (medians, same runs)")
        rules_ratios[gl] = {}
        for key, label in (
            ("accepted_samples_per_cpu_s", "accepted samples per CPU-second"),
            ("cpu_s_per_million_accepted", "CPU-s per million accepted samples"),
            ("cpu_s", "proxy CPU-seconds"),
            ("peak_rss_mb", "peak RSS"),
            ("loadgen_latency_ms_p50", "request latency p50"),
        ):
            if d[key] and m[key]:
                rules_ratios[gl][key] = round(d[key] / m[key], 3)
                print(f"  {label:46s} {rules_ratios[gl][key]:>12.3f}")
        # Per run as well: the configurations alternate within each run.
        _per_run_ratio(results, gl, base, rules_ratios[gl])
    tree_ratios: dict[str, dict[str, Any]] = {}
    tag = getattr(args, "compare_tag", None)
    for gl in governors:
        other = gl.replace("governor", f"governor@{tag}", 1) if tag else None
        if "@" in gl or other not in medians:
            continue
        key = "accepted_samples_per_cpu_s"
        d, m = medians[gl][key], medians[other][key]
        print(f"\n{gl} / {other} (this checkout over the compared one, medians, same runs)")
        tree_ratios[gl] = {}
        if d and m:
            tree_ratios[gl][key] = round(d / m, 3)
            print(f"  {'accepted samples per CPU-second':46s} {tree_ratios[gl][key]:>12.3f}")
        _per_run_ratio(results, gl, other, tree_ratios[gl])
    if governors and not any(r["profiled"] for r in results):
        print("\ntargets (governor, medians)")
        for gl in governors:
            g = medians[gl]
            if gl in rules_ratios:
                r = rules_ratios[gl].get("accepted_samples_per_cpu_s")
                base, suffix = base_label(gl)
                target = GOVERNANCE_TARGETS.get(suffix)
                if target is None:
                    print(
                        f"  {gl}: accepted samples per CPU-second, % of {base}'s: "
                        f"{(r or 0) * 100:.1f} % (no target)"
                    )
                    continue
                verdict = "met" if r is not None and r >= target else "NOT met"
                print(
                    f"  {gl}: accepted samples per CPU-second >= {target:.0%} of "
                    f"{base}'s: {(r or 0) * 100:.1f} % -> {verdict}"
                )
                continue
            spc, rss = g["samples_per_cpu_s"], g["peak_rss_mb"]
            verdict = "met" if spc and spc >= 450_000 else "NOT met"
            print(f"  {gl}: samples per CPU-second >= 450,000: {spc or 0:,.0f} -> {verdict}")
            print(f"  {gl}: peak RSS < 150 MB: {rss:.1f} MB -> {'met' if rss < 150 else 'NOT met'}")
        for gl, q in queue_ratios.items():
            r = q.get("samples_per_cpu_s")
            if r is not None:
                verdict = "met" if r >= 0.85 else "NOT met"
                print(
                    f"  {gl}: samples per CPU-second >= 85 % of governor/memory's: "
                    f"{r * 100:.1f} % -> {verdict}"
                )
    for r in results:
        if r.get("profile_summary"):
            print(f"\n{r['profile_summary']}")
            print(f"profile written to {r['profile_file']}")
    return {
        "medians": medians,
        "ratios_governor_over_vmagent": ratios,
        "ratios_over_memory_queue": queue_ratios,
        "ratios_rules_over_no_rules": rules_ratios,
        "ratios_over_compare_tree": tree_ratios,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=180_000, help="offered samples/s")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per measurement")
    p.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    p.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="seconds of the same load before each measurement, not measured (first sights)",
    )
    p.add_argument("--connections", type=int, default=8, help="loadgen connections")
    p.add_argument("--series-per-request", type=int, default=500)
    p.add_argument(
        "--targets",
        default="governor,vmagent",
        help="comma-separated: governor, vmagent (default both)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin the proxy to the last CPU and everything else to the other CPUs",
    )
    p.add_argument("--profile", action="store_true", help="py-spy governor during the load")
    p.add_argument("--profile-format", choices=("raw", "speedscope", "flamegraph"), default="raw")
    p.add_argument("--profile-name", default="profile", help="file name stem in bench/out/")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native")
    p.add_argument(
        "--governor-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for governor (experiments, e.g. GLIBC_TUNABLES=...)",
    )
    p.add_argument(
        "--queue",
        default="memory",
        help="governor's prw.queue.mode: memory, disk, or memory,disk (both, alternating)",
    )
    p.add_argument(
        "--durable-ack", action="store_true", help="disk mode: prw.queue.durable_ack: true"
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        help="governor's prw.receiver.max_concurrent_requests (default: governor's own, 16)",
    )
    p.add_argument(
        "--rules",
        type=Path,
        metavar="FILE",
        help="also measure governor with FILE as rules.file, alternating with no rules",
    )
    p.add_argument(
        "--stats-level",
        default="none",
        help="also measure governor with stats.level set: basic, full, or basic,full "
        "(each alternating with the plain governor); none (default) adds nothing",
    )
    p.add_argument(
        "--stats-labels",
        default="",
        help="stats.labels for --stats-level, comma-separated (e.g. namespace,container)",
    )
    p.add_argument(
        "--limits",
        type=Path,
        metavar="FILE",
        help="also measure governor with FILE as limits.file, alternating with no limits",
    )
    p.add_argument(
        "--compare-tree",
        type=Path,
        help="another checkout (e.g. a git worktree of an older commit): every governor variant"
        " is measured with its code too, in the same runs, labelled governor@<its HEAD>",
    )
    p.add_argument("--json-out", type=Path, help="where to write the JSON results")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or any(t not in ("governor", "vmagent") for t in targets):
        p.error("--targets takes governor and/or vmagent")
    queues = list(dict.fromkeys(q.strip() for q in args.queue.split(",") if q.strip()))
    if not queues or any(q not in ("memory", "disk") for q in queues):
        p.error("--queue takes memory and/or disk")
    if args.durable_ack and "disk" not in queues:
        p.error("--durable-ack needs --queue disk")
    if args.rules is not None:
        if "governor" not in targets:
            p.error("--rules needs governor among --targets")
        if not args.rules.is_file():
            p.error(f"--rules: no such file {args.rules}")
        args.rules = args.rules.resolve()
    levels = [x.strip() for x in args.stats_level.split(",") if x.strip()]
    if not levels or any(x not in ("none", "basic", "full") for x in levels):
        p.error("--stats-level takes none, basic and/or full")
    stats_levels = tuple(dict.fromkeys(x for x in levels if x != "none"))
    stats_labels = tuple(x.strip() for x in args.stats_labels.split(",") if x.strip())
    if stats_labels and not stats_levels:
        p.error("--stats-labels needs --stats-level basic or full")
    if (stats_levels or args.limits is not None) and "governor" not in targets:
        p.error("--stats-level and --limits need governor among --targets")
    if args.limits is not None:
        if not args.limits.is_file():
            p.error(f"--limits: no such file {args.limits}")
        args.limits = args.limits.resolve()
    plan = variants(
        targets, queues, args.durable_ack, args.rules, stats_levels, stats_labels, args.limits
    )
    if args.runs < 1 or args.duration <= 0 or args.rate <= 0:
        p.error("--runs, --duration and --rate must be positive")
    compare = None
    if args.compare_tree is not None:
        if "governor" not in targets or not (args.compare_tree / "service").is_dir():
            p.error("--compare-tree needs governor among --targets and a checkout with service/")
        args.compare_tree = args.compare_tree.resolve()
        compare = provenance.code_state(args.compare_tree / "service")
        compare["head"] = subprocess.run(
            ["git", "-C", str(args.compare_tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        args.compare_tag = compare["head"] or args.compare_tree.name
        # Each variant next to its twin from the other checkout, so drift hits both alike.
        twins = {v.label: v.at_tree(args.compare_tree, args.compare_tag) for v in plan}
        plan = [w for v in plan for w in ((v, twins[v.label]) if v.target == "governor" else (v,))]

    results = []
    started = datetime.datetime.now(datetime.UTC)
    code = provenance.code_state(ROOT / "service")
    for run in range(1, args.runs + 1):
        order = plan if run % 2 else list(reversed(plan))  # alternate who goes first
        for variant in order:
            print(f"run {run}/{args.runs}: {variant.label} ...", file=sys.stderr, flush=True)
            r = measure(variant, args, run)
            results.append(r)
            print(
                f"  {variant.label}: {r['samples_per_cpu_s'] or 0:,.0f} samples/CPU-s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB, codes {r['receiver_status_codes']}",
                file=sys.stderr,
                flush=True,
            )
    summary = report(results, args, [v.label for v in plan])
    changed = len(code.get("service_changes", []))
    print(
        f"\ncode measured: HEAD {code.get('head', '?')}, {changed} uncommitted change(s) in "
        f"service/, service sources sha256 {code['service_sha256']}"
        + (f"; governor env {args.governor_env}" if args.governor_env else "")
        + ("; pinned (--pin)" if args.pin else "")
        + (f"; --connections {args.connections}" if args.connections != 8 else "")
        + (f"; rules file {args.rules}" if args.rules else "")
        + (f"; stats level {args.stats_level}" if stats_levels else "")
        + (f", stats labels {list(stats_labels)}" if stats_labels else "")
        + (f"; limits file {args.limits}" if args.limits else "")
        + (
            f"; compared with {args.compare_tree} (HEAD {compare['head'] or '?'}, service sources"
            f" sha256 {compare['service_sha256']}) as governor@{args.compare_tag}"
            if compare
            else ""
        )
        + (
            f"; prw.receiver.max_concurrent_requests {args.max_concurrent_requests}"
            if args.max_concurrent_requests
            else ""
        )
    )
    OUT.mkdir(parents=True, exist_ok=True)
    out = args.json_out or OUT / f"e2e_prw_{started:%Y%m%dT%H%M%SZ}.json"
    doc = {
        "started": started.isoformat(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "host": {"nproc": os.cpu_count(), "load_avg": os.getloadavg()},
        "code": code,
        "compare_code": compare,
        **summary,
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=2))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
