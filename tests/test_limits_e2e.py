"""Limits end to end: the test is a remote-write client of governor, which runs a limits file in
front of victoria-metrics. Each test checks, series for series and sample for sample, what
victoria-metrics stores, and that governor's /metrics counts exactly what is missing there.

Time is real. The limits' windows are aligned to the wall clock (multiples of `window`), so the
scenarios send one round a second at a fixed offset inside the second, starting on a window
boundary, and fail loudly if a round is not answered inside the window it was meant for.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import cramjam
import httpx
import pytest
import trio
import yaml

from service._proto.prometheus.remote_pb2 import WriteRequest
from service.config import LimitsConfig
from service.governance.cardinality import hash_many
from tests.peers import (
    STOP_TIMEOUT_S,
    Exposition,
    InProcessGovernor,
    Labels,
    Samples,
    VictoriaMetrics,
    governor_config,
    labels,
    scrape,
    start_victoria_metrics,
    wait_until,
)
from tests.test_rules_e2e import LogLines, governor_process

pytestmark = pytest.mark.peers

WINDOW_S = 4  # the limits file's `window`
ROUND_S = 1  # the client sends one round a second ...
ROUND_OFFSET_S = 0.3  # ... this far into the second, so no sample sits on a window edge
ROUNDS_PER_WINDOW = WINDOW_S // ROUND_S
PRW_HEADERS = {
    "Content-Type": "application/x-protobuf",
    "Content-Encoding": "snappy",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}
RELOAD_TIMEOUT_S = 10.0


# ---- the client, the clock and what the sink holds -----------------------------------------------


def add_series(req: WriteRequest, series: Labels) -> Any:
    """Append a series to `req`, its labels sorted by name as Prometheus sends them."""
    ts = req.timeseries.add()
    for name, value in sorted(series):
        ts.labels.add(name=name, value=value)
    return ts


def write_request(points: Sequence[tuple[Labels, float]], ts_ms: int) -> bytes:
    """A serialized remote write 1.0 request: one sample at `ts_ms` per series, in the order
    given."""
    req = WriteRequest()
    for series, value in points:
        add_series(req, series).samples.add(timestamp=ts_ms, value=value)
    return req.SerializeToString()


def series_hash(series: Labels) -> int:
    """governor's identity of a remote-write series: the hash of its labels as serialized."""
    return hash_many([add_series(WriteRequest(), series).SerializeToString()])[0]


class Sender:
    """The test as a remote-write client of governor: records every sample governor answered
    204 for."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url
        self.sent: Samples = {}

    async def send(
        self, points: Sequence[tuple[Labels, float]], ts_ms: int, *, tenant: str = ""
    ) -> None:
        body = bytes(cramjam.snappy.compress_raw(write_request(points, ts_ms)))
        headers = {**PRW_HEADERS, **({"X-Scope-OrgID": tenant} if tenant else {})}
        resp = await self.client.post(self.url, content=body, headers=headers)
        assert resp.status_code == 204, (resp.status_code, resp.text)
        for series, value in points:
            self.sent.setdefault(series, []).append((ts_ms, value))

    def points(self) -> int:
        return sum(len(samples) for samples in self.sent.values())


class Clock:
    """Rounds on the wall clock: round r is sent at `start` + r s + ROUND_OFFSET_S and stamped
    with that time; `start` is the next window boundary, so round r falls in the limits window
    r // ROUNDS_PER_WINDOW counted from it."""

    def __init__(self) -> None:
        self.start = (math.floor(time.time() / WINDOW_S) + 1) * WINDOW_S

    def ts_ms(self, r: int) -> int:
        return round((self.start + r * ROUND_S + ROUND_OFFSET_S) * 1000)

    async def wait(self, r: int) -> None:
        await trio.sleep(max(0.0, self.ts_ms(r) / 1000 - time.time()))

    def check_in_window(self, r: int) -> None:
        """Fail unless round r was answered before its window ended (a machine too slow for
        the scenario would make its expectations wrong, not governor)."""
        end = self.start + (r // ROUNDS_PER_WINDOW + 1) * WINDOW_S
        late = time.time() - end
        if late >= 0:
            pytest.fail(f"round {r} was answered {late:.2f} s after its limits window ended")


def sum_points(samples: Samples) -> int:
    return sum(len(s) for s in samples.values())


def kind(series: Labels) -> str:
    """A series' kind: its service (or client) and its `series` label without the number."""
    d = dict(series)
    owner = d.get("service") or d.get("client", "")
    return f"{owner} {d['series'].rsplit('-', 1)[0]}" if "series" in d else owner


def tally(samples: Samples) -> dict[str, tuple[int, int]]:
    """(series, samples) per kind of series: a readable summary of what a sink holds."""
    out: dict[str, tuple[int, int]] = {}
    for series, points in samples.items():
        n, m = out.get(kind(series), (0, 0))
        out[kind(series)] = (n + 1, m + len(points))
    return out


def mismatches(stored: Samples, expected: Samples, first: int = 3) -> list[Any]:
    """The first few series whose stored samples differ from the expected ones; [] if none."""
    keys = sorted(set(stored) | set(expected), key=sorted)
    return [
        (dict(k), stored.get(k), expected.get(k)) for k in keys if stored.get(k) != expected.get(k)
    ][:first]


def assert_stored(stored: Samples, expected: Samples) -> None:
    """stored == expected, compared so that a failure reads: first per kind, then the first
    differing series (a plain == of ten thousand series makes an unreadable diff)."""
    assert tally(stored) == tally(expected)
    assert mismatches(stored, expected) == []


def by_action(m: Exposition, family: str, limit: str) -> dict[str, float]:
    return {
        lbls["action"]: v
        for name, lbls, v in m.samples
        if name == f"{family}_total" and lbls["limit"] == limit
    }


def offenders(m: Exposition, limit: str) -> dict[tuple[str, str], float]:
    """governor_limits_offenders of a limit: (group, action) -> usage."""
    return {
        (lbls["group"], lbls["action"]): v
        for name, lbls, v in m.samples
        if name == "governor_limits_offenders" and lbls["limit"] == limit
    }


def write_limits(path: Path, limits: list[dict[str, Any]] | None = None, **top: Any) -> Path:
    """Write a limits file whole (a reload never sees half of it)."""
    doc = {"window": f"{WINDOW_S}s", **top, **({"limits": limits} if limits else {})}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
    return path


@attrs.define
class Running:
    gov: InProcessGovernor
    vm: VictoriaMetrics
    sender: Sender
    client: httpx.AsyncClient

    async def metrics(self) -> Exposition:
        return await scrape(self.client, self.gov.telemetry_url("/metrics"))

    async def finish(self, match: str) -> Samples:
        """Stop governor (it drains and emits its open re-aggregation windows), then what
        victoria-metrics holds for `match`."""
        report = await self.gov.stop()
        assert report.clean
        return await self.vm.export(match)


@asynccontextmanager
async def limited_governor(
    client: httpx.AsyncClient, tmp_path: Path, limits_file: Path
) -> AsyncIterator[Running]:
    """victoria-metrics, and governor in-process in front of it with `limits_file`."""
    async with (
        start_victoria_metrics(client, tmp_path / "vm") as vm,
        trio.open_nursery() as nursery,
    ):
        cfg = governor_config(vm.write_url)
        cfg = attrs.evolve(cfg, limits=LimitsConfig(file=str(limits_file)))
        gov = InProcessGovernor(cfg)
        await gov.start(nursery)
        try:
            yield Running(gov, vm, Sender(client, gov.write_url), client)
        finally:
            nursery.cancel_scope.cancel()  # a no-op after finish(): governor has stopped


# ---- the churn scenario: three steady services, then one churns ----------------------------------

CHURN = "churn_demo"
SERVICES = ("a", "b", "c")
STEADY = 100  # series per service, one sample each every second
NEW_PER_ROUND = 1250  # c's new series per round while it churns: 5000 per window
FRESH = 5  # new series of c once it has calmed down
# Window 0 (rounds 0-3): all steady. Windows 1 and 2 (rounds 4-11): c also sends new series,
# each of them once. Window 3 (rounds 12-15): steady again. Window 4: c adds a few fresh series.
BURST_ROUNDS = range(4, 12)
FRESH_ROUNDS = (16, 17)
CHURN_ROUNDS = 18


def churn_series(service: str, what: str, n: int) -> Labels:
    return labels(__name__=CHURN, service=service, series=f"{what}-{n:04d}")


def churn_round(r: int) -> dict[str, list[Labels]]:
    """The series each service sends in round r, in request order (steady ones first)."""
    out = {s: [churn_series(s, "steady", k) for k in range(STEADY)] for s in SERVICES}
    if r in BURST_ROUNDS:
        out["c"] += [churn_series("c", f"new-r{r:02d}", j) for j in range(NEW_PER_ROUND)]
    if r in FRESH_ROUNDS:
        out["c"] += [churn_series("c", "fresh", j) for j in range(FRESH)]
    return out


async def run_churn(
    sender: Sender, after_round: Callable[[int], Awaitable[None]] | None = None
) -> None:
    """Send the churn scenario: each round, one request per service (a, b, c in turn), every
    series valued with the round's number."""
    clock = Clock()
    for r in range(CHURN_ROUNDS):
        await clock.wait(r)
        for series in churn_round(r).values():
            await sender.send([(s, float(r)) for s in series], clock.ts_ms(r))
        clock.check_in_window(r)
        if after_round is not None:
            await after_round(r)


def without(sent: Samples, *kinds: str) -> Samples:
    return {s: v for s, v in sent.items() if kind(s) not in kinds}


def first_new(sent: Samples, r: int, n: int) -> Samples:
    """c's first `n` new series of round r (in request order) with their samples."""
    keep = {churn_series("c", f"new-r{r:02d}", j) for j in range(n)}
    return {s: sent[s] for s in keep}


async def test_adaptive_limit_picks_the_churning_service_and_lets_it_back_once_calm(
    tmp_path: Path, peer_client: httpx.AsyncClient
) -> None:
    """An adaptive limit over services a, b, c: 3000 series for all together (a fair share of
    1000 each). Each sends 100 steady series every second. Then c churns: 1250 new series a
    second, 5000 a window, for two windows. The limit picks c once the services together
    attempt more than 3000 series; until then c may use what the others leave: its new series
    of the requests before the pick (rounds 4 and 5: 300 + 2 x 1250 = 2800, within 3000; round
    6 makes 4050 and is already limited) reach victoria-metrics, 2500 of the leftover 2700.
    None after, while c keeps churning: picked, c admits new series only up to its fair share
    of admitted series (current and previous window), and it holds 2600. a and b arrive
    complete, every series and every sample; so do c's 100 steady series. /metrics names c (and
    only c) as the offender while it churns, and the datapoints it counts as dropped by
    drop_new are exactly those missing at the sink. After a calm window, c's few fresh series
    arrive again whole, and nothing is an offender any more."""
    limits = write_limits(
        tmp_path / "limits.yaml",
        [
            {
                "name": "fair-share",
                "match": {"name": CHURN},
                "group_by": ["service"],
                "max_series": 3000,
                "action": "adaptive",
            }
        ],
    )
    during: dict[int, dict[tuple[str, str], float]] = {}
    async with limited_governor(peer_client, tmp_path, limits) as run:

        async def look(r: int) -> None:
            if r in (7, 11):  # the last round of each churning window
                during[r] = offenders(await run.metrics(), "fair-share")

        await run_churn(run.sender, look)
        m = await run.metrics()
        stored = await run.finish(f'{{__name__="{CHURN}"}}')

    sent = run.sender.sent
    dropped_rounds = [f"c new-r{r:02d}" for r in BURST_ROUNDS if r not in (4, 5)]
    expected = without(sent, *dropped_rounds)
    assert tally(expected)["c new-r04"] == tally(expected)["c new-r05"] == (1250, 1250)
    assert_stored(stored, expected)
    assert during == {r: {("service=c", "drop_new"): 1.0} for r in (7, 11)}
    missing = run.sender.points() - sum_points(stored)
    assert missing == 6 * NEW_PER_ROUND
    assert by_action(m, "governor_limit_dropped_datapoints", "fair-share") == {"drop_new": missing}
    assert offenders(m, "fair-share") == {}


def per_service_limit(**extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": "per-service",
            "match": {"name": CHURN},
            "group_by": ["service"],
            "max_series": 1000,
            **extra,
        }
    ]


# c's series that a per-service drop_new limit of 1000 lets through: its 100 steady ones and the
# first 900 new ones of the first churning round; its other new series in both churning windows
# are dropped: 350 + 3 x 1250 + 4 x 1250 datapoints.
PER_SERVICE_DROPPED = 9100


async def test_per_service_drop_new_drops_only_the_offenders_new_series(
    tmp_path: Path, peer_client: httpx.AsyncClient
) -> None:
    """A drop_new limit of 1000 series per service (no action given: drop_new is the default),
    the churn scenario. a and b (100 series each) are untouched: every series, every sample.
    c fills its 1000: its 100 steady series keep flowing whole, and the first 900 new series
    of its first churning request get in; every later new series of c is dropped, in both
    churning windows. Once c's churn has left its active series (a calm window), its fresh
    series arrive whole. /metrics counts exactly the missing datapoints as drop_new."""
    limits = write_limits(tmp_path / "limits.yaml", per_service_limit())
    async with limited_governor(peer_client, tmp_path, limits) as run:
        await run_churn(run.sender)
        m = await run.metrics()
        stored = await run.finish(f'{{__name__="{CHURN}"}}')

    sent = run.sender.sent
    new_kinds = [f"c new-r{r:02d}" for r in BURST_ROUNDS]
    expected = without(sent, *new_kinds) | first_new(sent, 4, 900)
    assert_stored(stored, expected)
    assert run.sender.points() - sum_points(stored) == PER_SERVICE_DROPPED
    dropped = by_action(m, "governor_limit_dropped_datapoints", "per-service")
    assert dropped == {"drop_new": PER_SERVICE_DROPPED}
    assert by_action(m, "governor_limit_dry_run_datapoints", "per-service") == {}


async def test_dry_run_lets_everything_through_and_counts_what_it_would_drop(
    tmp_path: Path, peer_client: httpx.AsyncClient
) -> None:
    """The per-service drop_new limit of the test above with dry_run: true, the same churn
    scenario. victoria-metrics holds everything sent, sample for sample, and
    governor_limit_dry_run_datapoints_total{action="drop_new"} counts exactly what the limit
    drops when enforced; nothing is counted as dropped."""
    limits = write_limits(tmp_path / "limits.yaml", per_service_limit(dry_run=True))
    async with limited_governor(peer_client, tmp_path, limits) as run:
        await run_churn(run.sender)
        m = await run.metrics()
        stored = await run.finish(f'{{__name__="{CHURN}"}}')

    assert_stored(stored, run.sender.sent)
    dry = by_action(m, "governor_limit_dry_run_datapoints", "per-service")
    assert dry == {"drop_new": PER_SERVICE_DROPPED}
    assert by_action(m, "governor_limit_dropped_datapoints", "per-service") == {}


# ---- tiers ---------------------------------------------------------------------------------------

TIER = "tier_demo"
TIER_SERIES = {"a": 70, "b": 90, "c": 120, "d": 160}  # of a limit of 100 per service
TIER_ROUNDS = 3


async def test_tiers_act_by_usage_log_sample_drop(
    tmp_path: Path, peer_client: httpx.AsyncClient
) -> None:
    """Tiers on a limit of 100 series per service: from 80 % log, from 100 % sample 0.5, from
    150 % drop. Service a (70 series) and b (90) arrive whole, b only logged; of c (120) exactly
    the series whose hash governor keeps at rate 0.5 arrive, each whole, the others not at all;
    d (160) is dropped entirely, from its first request on. /metrics counts the sampled-away and
    dropped datapoints by action, and b's logged ones as dry run; the offenders are b, c and d
    with their usage and action."""
    limits = write_limits(
        tmp_path / "limits.yaml",
        [
            {
                "name": "tiers",
                "match": {"name": TIER},
                "group_by": ["service"],
                "max_series": 100,
                "tiers": [
                    {"at": "80%", "action": "log"},
                    {"at": "100%", "action": "sample", "rate": 0.5},
                    {"at": "150%", "action": "drop"},
                ],
            }
        ],
    )
    series = {
        s: [labels(__name__=TIER, service=s, series=f"s-{k:03d}") for k in range(n)]
        for s, n in TIER_SERIES.items()
    }
    async with limited_governor(peer_client, tmp_path, limits) as run:
        clock = Clock()
        for r in range(TIER_ROUNDS):
            await clock.wait(r)
            for points in series.values():
                await run.sender.send([(s, float(r)) for s in points], clock.ts_ms(r))
        m = await run.metrics()
        stored = await run.finish(f'{{__name__="{TIER}"}}')

    sent = run.sender.sent
    # governor's sample keeps a series when its hash (of its labels as serialized) is below
    # rate x 2^64.
    kept = {s for s in series["c"] if series_hash(s) < 0.5 * 2**64}
    assert 0 < len(kept) < TIER_SERIES["c"]
    expected = {s: v for s, v in sent.items() if kind(s) in ("a s", "b s") or s in kept}
    assert_stored(stored, expected)
    sampled_away = (TIER_SERIES["c"] - len(kept)) * TIER_ROUNDS
    dropped = by_action(m, "governor_limit_dropped_datapoints", "tiers")
    assert dropped == {"sample": sampled_away, "drop": TIER_SERIES["d"] * TIER_ROUNDS}
    assert by_action(m, "governor_limit_dry_run_datapoints", "tiers") == {
        "log": TIER_SERIES["b"] * TIER_ROUNDS
    }
    assert offenders(m, "tiers") == {
        ("service=b", "log"): 0.9,
        ("service=c", "sample"): 1.2,
        ("service=d", "drop"): 1.6,
    }
    assert (
        m.value("governor_limit_datapoints_total", limit="tiers")
        == sum(TIER_SERIES.values()) * TIER_ROUNDS
    )
    assert m.value("governor_limit_limited_groups", limit="tiers") == 3


# ---- label caps ----------------------------------------------------------------------------------

USERS = 6
CAP = 3
CAP_ROUNDS = 4


def window_end_ms(ts_ms: int, interval_ms: int = 1000) -> int:
    return ts_ms - ts_ms % interval_ms + interval_ms


async def test_label_caps_drop_or_strip_the_values_past_the_cap(
    tmp_path: Path, peer_client: httpx.AsyncClient
) -> None:
    """Two label caps of 3 values of label `user`; six users send every second. On
    user_requests (action drop) the first three users seen arrive whole and the other three
    not at all. On user_sessions (action strip, strip_interval 1s) the first three arrive whole
    with their user label; the other three lose it and are re-aggregated into one series
    without `user`, whose value in each 1 s window is the sum of theirs (gauges), stamped with
    the window's end. /metrics counts the dropped datapoints as label_cap_drop, and the
    stripped ones as stripped, not as dropped."""
    limits = write_limits(
        tmp_path / "limits.yaml",
        [
            {
                "name": "user-cap-drop",
                "match": {"name": "user_requests"},
                "label_caps": [{"label": "user", "max_values": CAP, "action": "drop"}],
            },
            {
                "name": "user-cap-strip",
                "match": {"name": "user_sessions"},
                "label_caps": [{"label": "user", "max_values": CAP, "action": "strip"}],
                "strip_interval": "1s",
            },
        ],
    )

    def value(u: int, r: int) -> float:
        return float(10 * r + u)

    async with limited_governor(peer_client, tmp_path, limits) as run:
        clock = Clock()
        for r in range(CAP_ROUNDS):
            await clock.wait(r)
            for name in ("user_requests", "user_sessions"):
                points = [
                    (labels(__name__=name, region="eu", user=f"u{u}"), value(u, r))
                    for u in range(USERS)
                ]
                await run.sender.send(points, clock.ts_ms(r))
        m = await run.metrics()
        stored = await run.finish('{__name__=~"user_requests|user_sessions"}')

    sent = run.sender.sent
    expected = {s: v for s, v in sent.items() if dict(s)["user"] in ("u0", "u1", "u2")}
    expected[labels(__name__="user_sessions", region="eu")] = [
        (window_end_ms(clock.ts_ms(r)), sum(value(u, r) for u in range(CAP, USERS)))
        for r in range(CAP_ROUNDS)
    ]
    assert stored == expected
    past_cap = (USERS - CAP) * CAP_ROUNDS
    dropped = by_action(m, "governor_limit_dropped_datapoints", "user-cap-drop")
    assert dropped == {"label_cap_drop": past_cap}
    assert m.value("governor_limit_stripped_datapoints_total", limit="user-cap-drop") == 0
    assert m.value("governor_limit_stripped_datapoints_total", limit="user-cap-strip") == past_cap
    assert by_action(m, "governor_limit_dropped_datapoints", "user-cap-strip") == {}


# ---- strip and re-aggregate ----------------------------------------------------------------------

STRIP_ROUNDS = 8
RESTART_ROUND = 5  # pod p2 restarts here: its counter starts again from 0


def pod_counter(pod: int, r: int) -> float:
    """Pod i counts i + 1 a second; p2 restarts before RESTART_ROUND (3 after the restart)."""
    if pod == 2 and r >= RESTART_ROUND:
        return float(3 * (r - RESTART_ROUND + 1))
    return float((pod + 1) * r)


def running_total(rounds: list[dict[int, float]]) -> list[float]:
    """Per round, what the inputs counted together so far: the sum of their increases, where a
    value below the previous one is a restart from 0 (Prometheus' increase). While no input
    restarts, this is the sum of the inputs (they start at 0)."""
    last: dict[int, float] = {}
    total = 0.0
    out = []
    for values in rounds:
        for pod, v in values.items():
            if pod in last:
                total += v - last[pod] if v >= last[pod] else v
            last[pod] = v
        out.append(total)
    return out


async def test_strip_reaggregates_a_counter_into_one_running_total(
    tmp_path: Path, peer_client: httpx.AsyncClient
) -> None:
    """A limit of 2 series per route that strips `pod` (strip_interval 1s). Route /a has three
    pods (150 %: stripped), route /b one (50 %: untouched). victoria-metrics holds /b's series
    as sent, no series of /a with a pod label, and one series http_requests_total{route="/a"}
    with one sample per 1 s window (no duplicates), stamped with the window's end: the three
    pods' counters added up, a running total that never decreases, not even when a pod
    restarts. /metrics counts every /a datapoint as stripped and none as dropped."""
    limits = write_limits(
        tmp_path / "limits.yaml",
        [
            {
                "name": "pods",
                "match": {"name": "http_requests_total"},
                "group_by": ["route"],
                "max_series": 2,
                "action": "strip",
                "strip": {"labels": ["pod"]},
                "strip_interval": "1s",
            }
        ],
    )
    rounds = [{pod: pod_counter(pod, r) for pod in range(3)} for r in range(STRIP_ROUNDS)]
    async with limited_governor(peer_client, tmp_path, limits) as run:
        clock = Clock()
        for r, values in enumerate(rounds):
            await clock.wait(r)
            points = [
                (labels(__name__="http_requests_total", route="/a", pod=f"p{pod}"), v)
                for pod, v in values.items()
            ]
            points.append((labels(__name__="http_requests_total", route="/b", pod="p0"), float(r)))
            await run.sender.send(points, clock.ts_ms(r))
        m = await run.metrics()
        stored = await run.finish('{__name__="http_requests_total"}')

    totals = running_total(rounds)
    assert totals == sorted(totals)
    assert sum(rounds[-1].values()) < totals[-1]  # the restart: the inputs' sum went back
    route_b = labels(__name__="http_requests_total", route="/b", pod="p0")
    assert stored == {
        route_b: run.sender.sent[route_b],
        labels(__name__="http_requests_total", route="/a"): [
            (window_end_ms(clock.ts_ms(r)), totals[r]) for r in range(STRIP_ROUNDS)
        ],
    }
    assert m.value("governor_limit_stripped_datapoints_total", limit="pods") == 3 * STRIP_ROUNDS
    assert by_action(m, "governor_limit_dropped_datapoints", "pods") == {}


# ---- tenants -------------------------------------------------------------------------------------

TENANT_ROUNDS = 3
QUOTA = 50
# client -> (X-Scope-OrgID header, series it sends)
TENANT_CLIENTS = {"one": ("t1", 80), "two": ("t2", 200), "three": ("", 60)}


async def test_tenant_quotas_follow_the_scope_header(
    tmp_path: Path, peer_client: httpx.AsyncClient
) -> None:
    """Quotas of 50 series per tenant, tenant t2 unlimited by an override (max_series 0). Three
    clients send every second: one as tenant t1 (X-Scope-OrgID) with 80 series, one as t2 with
    200, one without the header (the default tenant) with 60. t2's series arrive whole; of t1
    and of the default tenant the first 50 series (in request order) arrive whole and the rest
    not at all. /metrics counts the missing datapoints as drop_new, tracks each tenant's
    series, and names t1 and the default tenant as offenders with their usage."""
    limits = write_limits(
        tmp_path / "limits.yaml",
        quotas={"max_series": QUOTA, "tenants": {"t2": {"max_series": 0}}},
    )
    series = {
        client: [
            labels(__name__="tenant_demo", client=client, series=f"s-{k:03d}") for k in range(n)
        ]
        for client, (_, n) in TENANT_CLIENTS.items()
    }
    async with limited_governor(peer_client, tmp_path, limits) as run:
        clock = Clock()
        for r in range(TENANT_ROUNDS):
            await clock.wait(r)
            for client, (tenant, _) in TENANT_CLIENTS.items():
                points = [(s, float(r)) for s in series[client]]
                await run.sender.send(points, clock.ts_ms(r), tenant=tenant)
        m = await run.metrics()
        stored = await run.finish('{__name__="tenant_demo"}')

    sent = run.sender.sent
    admitted = set(series["two"]) | set(series["one"][:QUOTA]) | set(series["three"][:QUOTA])
    assert_stored(stored, {s: sent[s] for s in admitted})
    over = (80 - QUOTA + 60 - QUOTA) * TENANT_ROUNDS
    assert by_action(m, "governor_limit_dropped_datapoints", "tenant-quota") == {"drop_new": over}
    group_series = {
        lbls["group"]: v
        for name, lbls, v in m.samples
        if name == "governor_limit_group_series" and lbls["limit"] == "tenant-quota"
    }
    assert group_series == {"__tenant__=t1": 80, "__tenant__=t2": 200, "__tenant__=default": 60}
    assert offenders(m, "tenant-quota") == {
        ("__tenant__=t1", "drop_new"): 1.6,
        ("__tenant__=default", "drop_new"): 1.2,
    }


# ---- SIGHUP to a governor process ----------------------------------------------------------------

RELOAD = "reload_demo"
RELOAD_SERIES = 5
OLD_MAX = 3
NEW_MAX = 4
BROKEN_LIMITS = f"""\
window: {WINDOW_S}s
limits:
  - name: per-service
    match: {{name: {RELOAD}}}
    group_by: [service]
    max_series: {NEW_MAX}
    colour: red
"""
# Rounds 0-1 (window 0): the first limits. Then the broken file. Rounds 4-5 (window 1): still
# the first limits. Then the good file, in the same window. Rounds 6-7 (window 1): the new limits.
OLD_ROUNDS = (0, 1, 4, 5)
NEW_ROUNDS = (6, 7)


def reload_limits(max_series: int) -> list[dict[str, Any]]:
    return [
        {
            "name": "per-service",
            "match": {"name": RELOAD},
            "group_by": ["service"],
            "max_series": max_series,
        }
    ]


async def test_sighup_with_a_broken_limits_file_keeps_the_old_limits(
    tmp_path: Path, peer_client: httpx.AsyncClient
) -> None:
    """The `governor` console script with a config file and --limits-file, in front of
    victoria-metrics: a drop_new limit of 3 series per service; service x sends 5 series every
    second. After the file is broken (an unknown key) and SIGHUP, /metrics counts one failed
    reload, the log names the problem, and the old limit keeps dropping the same two series.
    After a good file (4 series per service: a changed limit, whose groups start afresh) and
    SIGHUP, in the middle of a window, /metrics counts one successful reload, and from the next
    request on the new limit applies: the first four series (in request order) pass, the fifth
    is still dropped. So victoria-metrics holds the first three series whole, the fourth from
    after the good reload only, the fifth not at all; the datapoints /metrics counts as dropped
    are exactly those missing."""
    client = peer_client
    governor = Path(sys.executable).parent / "governor"
    assert governor.exists(), f"{governor} is missing: pip install -e . installs it"
    limits = write_limits(tmp_path / "limits.yaml", reload_limits(OLD_MAX))
    series = [labels(__name__=RELOAD, service="x", series=f"s-{k}") for k in range(RELOAD_SERIES)]
    async with start_victoria_metrics(client, tmp_path / "vm") as vm:
        config_path = tmp_path / "governor.yaml"
        config = {
            "log": {"level": "info", "format": "json"},
            "telemetry": {"listen": "127.0.0.1:0"},
            "shutdown_grace_s": 5.0,
            "prw": {
                "receiver": {"listen": "127.0.0.1:0"},
                "batch": {"interval_s": 0.1},
                "exporters": [{"url": vm.write_url, "name": "vm"}],
            },
        }
        config_path.write_text(yaml.safe_dump(config))
        log = LogLines()
        argv = [str(governor), "--config", str(config_path), "--limits-file", str(limits)]
        async with governor_process(argv, log) as (process, started):
            metrics_url = f"http://{started['telemetry']}/metrics"
            sender = Sender(client, f"http://{started['prw']}/api/v1/write")
            clock = Clock()

            async def send_rounds(rounds: tuple[int, ...]) -> None:
                for r in rounds:
                    await clock.wait(r)
                    await sender.send([(s, float(r)) for s in series], clock.ts_ms(r))
                    clock.check_in_window(r)

            async def reloads(result: str) -> tuple[bool, Exposition]:
                m = await scrape(client, metrics_url)
                return m.values("governor_config_reloads_total", result=result) == [1.0], m

            await send_rounds(OLD_ROUNDS[:2])
            limits.write_text(BROKEN_LIMITS)
            process.send_signal(signal.SIGHUP)
            broken = await wait_until(
                lambda: reloads("failure"), what="a failed reload", timeout_s=RELOAD_TIMEOUT_S
            )
            assert broken.values("governor_config_reloads_total", result="success") == []
            await send_rounds(OLD_ROUNDS[2:])

            write_limits(limits, reload_limits(NEW_MAX))
            process.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: reloads("success"), what="a good reload", timeout_s=RELOAD_TIMEOUT_S
            )
            await send_rounds(NEW_ROUNDS)
            m = await scrape(client, metrics_url)

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(STOP_TIMEOUT_S):
                await process.wait()
            assert process.returncode == 0, log.text()
        stored = await vm.export(f'{{__name__="{RELOAD}"}}')

    sent = sender.sent
    new = {clock.ts_ms(r) for r in NEW_ROUNDS}
    expected = {s: sent[s] for s in series[:OLD_MAX]}
    expected[series[OLD_MAX]] = [p for p in sent[series[OLD_MAX]] if p[0] in new]
    assert [len(v) for v in expected.values()] == [6, 6, 6, 2]
    assert stored == expected
    missing = sender.points() - sum_points(stored)
    assert missing == (RELOAD_SERIES - OLD_MAX) * len(OLD_ROUNDS) + len(NEW_ROUNDS)
    assert by_action(m, "governor_limit_dropped_datapoints", "per-service") == {"drop_new": missing}
    assert m.values("governor_config_reloads_total", result="failure") == [1.0]
    assert m.values("governor_config_reloads_total", result="success") == [1.0]
    records = log.records()
    refused = [r["problem"] for r in records if r["msg"] == "limits reload refused"]
    assert refused == ["limits[0] (per-service).colour: unknown key"]
    assert [r["limits"] for r in records if r["msg"] == "limits reloaded"] == [1]
