"""Tests for cardinality and rate limits (issue 6): the limits file (service/governance/limits.py),
the engine as the remote-write and OTLP paths meet it (service/governance/stage.py) and the limit
metrics (service/governance/activity.py).

Requests are real serialized WriteRequests (labels sorted by name, `__name__` first, one sample
per series unless said) and OTLP ExportMetricsServiceRequests; what a test checks is the exact
set of series forwarded, decoded from what governance hands on. Time is a plain virtual clock in
milliseconds; the limits' window is 60 s unless a test says otherwise, so `t = 60_000` is the
next window and `t = 120_000` the one after.
"""

from __future__ import annotations

import re
import textwrap

import pytest
import xxhash
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Gauge,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from prometheus_client import CollectorRegistry

from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import Label, Sample, TimeSeries
from service.codec import otlp as otlp_codec
from service.governance.activity import LimitCollector
from service.governance.limits import (
    TENANT,
    Act,
    LabelCap,
    Limit,
    LimitEngine,
    LimitsError,
    LimitSet,
    Override,
    Tenancy,
    Tier,
    load_limits,
)
from service.governance.prw import Governed
from service.governance.rules import Matcher
from service.governance.stage import Governance

# ---- helpers ---------------------------------------------------------------------------------


class Clock:
    """Virtual time in milliseconds; the test sets `ms`."""

    def __init__(self, ms: int = 0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def limits_of(text: str) -> LimitSet:
    return load_limits(textwrap.dedent(text))


def governed(
    text: str,
    clock: Clock,
    *,
    force_dry_run: bool = False,
    exact_limit: int = 1000,
) -> tuple[Governance, LimitEngine]:
    """A remote-write pipeline's governance with the limits file `text` (indented freely)."""
    engine = LimitEngine(
        limits_of(text), pipeline="prw", force_dry_run=force_dry_run, exact_limit=exact_limit
    )
    return Governance(pipeline="prw", limits=engine, clock_ms=clock), engine


_SERIES_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}")


def parse(series: str) -> tuple[str, dict[str, str]]:
    """`name{k=v,...}` as (name, labels)."""
    m = _SERIES_RE.fullmatch(series)
    assert m is not None, series
    pairs = [p.partition("=") for p in m.group(2).split(",") if p]
    return m.group(1), {k: v for k, _, v in pairs}


def labels_of(series: str) -> list[Label]:
    """The labels of `name{k=v,...}` as Prometheus sends them: sorted by name, `__name__` too."""
    name, labels = parse(series)
    return [Label(name=k, value=v) for k, v in sorted({**labels, "__name__": name}.items())]


def write(*series: str, t: int = 0, value: float = 1.0, samples: int = 1) -> bytes:
    """A serialized WriteRequest with each series `name{k=v,...}`, `samples` samples each at
    t, t+1, ... ms, all of `value`."""
    req = WriteRequest()
    for s in series:
        req.timeseries.append(
            TimeSeries(
                labels=labels_of(s),
                samples=[Sample(timestamp=t + j, value=value) for j in range(samples)],
            )
        )
    return req.SerializeToString()


def write_values(t: int, **series_values: float) -> bytes:
    """A WriteRequest with one sample at `t` per series; keys are `name{k=v,...}` texts."""
    req = WriteRequest()
    for s, v in series_values.items():
        req.timeseries.append(
            TimeSeries(labels=labels_of(s), samples=[Sample(timestamp=t, value=v)])
        )
    return req.SerializeToString()


def text_of(ts: TimeSeries) -> str:
    """A forwarded series as `name{k=v,...}`, labels in wire order (`__name__` must be first)."""
    assert ts.labels[0].name == "__name__", ts
    rest = ",".join(f"{lb.name}={lb.value}" for lb in ts.labels[1:])
    return f"{ts.labels[0].value}{{{rest}}}"


def forwarded(data: bytes, g: Governed) -> list[str]:
    """The series a request of `data` goes on with, in order, once governed as `g`."""
    out = WriteRequest.FromString(data if g.data is None else g.data)
    return [text_of(ts) for ts in out.timeseries]


def send(gov: Governance, *series: str, tenant: str = "", t: int | None = None) -> list[str]:
    """Govern a request of `series` (one sample each, at the clock's time) and return what is
    forwarded."""
    data = write(*series, t=gov.clock_ms() if t is None else t)
    return forwarded(data, gov.prw(data, tenant))


def series_id(series: str) -> int:
    """A series' hash by its definition (cardinality.series_hash): XXH3-64 of its labels as a
    TimeSeries with nothing else serializes them."""
    return xxhash.xxh3_64_intdigest(TimeSeries(labels=labels_of(series)).SerializeToString())


def sampled_in(series: list[str], rate: float) -> list[str]:
    """The series a `sample` at `rate` keeps: those whose hash is below rate x 2^64."""
    return [s for s in series if series_id(s) < rate * 2**64]


def many(template: str, n: int, start: int = 0) -> list[str]:
    """`template` with `{i}` filled in for start..start+n-1."""
    return [template.format(i=i) for i in range(start, start + n)]


def emitted(gov: Governance) -> list[tuple[str, dict[str, str], str, list[tuple[int, float]]]]:
    """Every open window of the limits' re-aggregation, as (name, labels, kind, points), sorted."""
    out = [(e.name, e.labels, e.kind, e.points) for e in gov.due(force=True)]
    return sorted(out, key=lambda e: (e[0], sorted(e[1].items()), e[3]))


def problems_of(text: str) -> list[str]:
    """The problems load_limits reports for `text` (it must report some)."""
    with pytest.raises(LimitsError) as info:
        limits_of(text)
    return info.value.problems


# OTLP


SCOPE = InstrumentationScope(name="lib", version="1")


def kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def point(ts_ms: int, value: float, **attributes: str) -> NumberDataPoint:
    return NumberDataPoint(
        time_unix_nano=ts_ms * 1_000_000,
        as_double=value,
        attributes=[kv(k, v) for k, v in attributes.items()],
    )


def gauge(name: str, *points: NumberDataPoint) -> Metric:
    return Metric(name=name, gauge=Gauge(data_points=points))


def resource_metrics(resource: dict[str, str], *metrics: Metric) -> ResourceMetrics:
    return ResourceMetrics(
        resource=Resource(attributes=[kv(k, v) for k, v in resource.items()]),
        scope_metrics=[ScopeMetrics(scope=SCOPE, metrics=metrics)],
    )


def otlp_points(data: bytes) -> list[str]:
    """The datapoints of a serialized OTLP request as `resource|name{attributes}`."""
    out = []
    for rm in ExportMetricsServiceRequest.FromString(data).resource_metrics:
        res = ",".join(f"{a.key}={a.value.string_value}" for a in rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for dp in m.gauge.data_points:
                    attrs = ",".join(f"{a.key}={a.value.string_value}" for a in dp.attributes)
                    out.append(f"{res}|{m.name}{{{attrs}}}")
    return out


def govern_otlp(gov: Governance, *rms: ResourceMetrics, tenant: str = "") -> otlp_codec.Admitted:
    data = ExportMetricsServiceRequest(resource_metrics=rms).SerializeToString()
    return gov.otlp(otlp_codec.admit(data), tenant)


# ---- the file: a valid file with everything loads --------------------------------------------

EVERYTHING = """
window: 30s
dry_run: false
tenant:
  header: X-Tenant
  label: tenant
  resource_attribute: tenant.id
  default: shared
quotas:
  max_series: 1000
  max_datapoints_rate: 500
  tenants:
    team-a: 5000
    team-b: {max_series: 200, max_datapoints_rate: 50}
limits:
  - name: per-service
    labels: {team: platform, channel: "#obs"}
    match:
      name: "http_.*"
      labels: [{label: env, equals: prod}]
    group_by: [service]
    max_series: 100
    tiers:
      - {at: 150%, action: drop}
      - {at: 80%, action: log}
      - {at: 100, action: sample, rate: 0.25}
      - {at: "120%", action: strip, labels: [pod, instance], function: max}
    overrides:
      - {group: {service: checkout}, max_series: 400}
    annotate: true
    strip_interval: 1m
  - name: noisy-tenants
    group_by: [__tenant__, service]
    max_series: 3000
    action: adaptive
    adaptive: {then: sample, rate: 0.1}
    dry_run: true
  - name: user-ids
    match: {name: "api_.*"}
    label_caps:
      - {label: user, max_values: 100, action: drop}
      - {label: session, max_values: 10}
  - name: rate
    max_datapoints_rate: 2000
    group_by: [job]
    action: drop
"""


def test_a_file_with_every_feature_loads_into_these_values() -> None:
    """Tenancy, quotas (a limit named tenant-quota grouped by tenant, each tenant's entry an
    override, a bare number meaning max_series), tiers given as "80%" strings and as numbers
    (kept ascending), adaptive with `then`, label caps (action strip by default), overrides,
    dry run, annotate and ownership labels all load into exactly these values."""
    ls = limits_of(EVERYTHING)
    assert ls.window_s == 30.0
    assert ls.dry_run is False
    assert ls.tenancy == Tenancy("X-Tenant", "tenant", "tenant.id", "shared")
    names = ["tenant-quota", "per-service", "noisy-tenants", "user-ids", "rate"]
    assert [lim.name for lim in ls.limits] == names
    quota, per_service, noisy, users, rate = ls.limits

    assert quota.match.name_source == ".*"
    assert quota.group_by == (TENANT,)
    assert (quota.max_series, quota.max_datapoints_rate) == (1000, 500.0)
    assert quota.tiers == (Tier(1.0, Act("drop_new")),)
    assert quota.overrides == (
        Override(((TENANT, "team-a"),), 5000, 500.0),
        Override(((TENANT, "team-b"),), 200, 50.0),
    )
    assert quota.uses_tenant

    assert per_service.match.name_source == "http_.*"
    assert per_service.match.name.fullmatch("http_requests_total")
    assert per_service.match.labels == (Matcher("env", "equals", "prod"),)
    assert per_service.group_by == ("service",)
    assert (per_service.max_series, per_service.max_datapoints_rate) == (100, 0.0)
    assert per_service.tiers == (
        Tier(0.8, Act("log")),
        Tier(1.0, Act("sample", rate=0.25)),
        Tier(1.2, Act("strip", labels=("pod", "instance"), function="max")),
        Tier(1.5, Act("drop")),
    )
    assert per_service.adaptive is None
    assert per_service.overrides == (Override((("service", "checkout"),), 400, 0.0),)
    assert per_service.annotate is True
    assert per_service.dry_run is False
    assert per_service.labels == (("team", "platform"), ("channel", "#obs"))
    assert per_service.strip_interval_s == 60.0
    assert not per_service.uses_tenant

    assert noisy.group_by == (TENANT, "service")
    assert noisy.max_series == 3000
    assert noisy.tiers == ()
    assert noisy.adaptive == Act("sample", rate=0.1)
    assert noisy.dry_run is True
    assert noisy.annotate is False
    assert noisy.strip_interval_s == 30.0

    assert users.match.name_source == "api_.*"
    assert (users.max_series, users.max_datapoints_rate) == (0, 0.0)
    assert users.tiers == ()
    assert users.label_caps == (LabelCap("user", 100, "drop"), LabelCap("session", 10, "strip"))

    assert rate == Limit(
        "rate",
        rate.match,
        ("job",),
        0,
        2000.0,
        (Tier(1.0, Act("drop")),),
        None,
        (),
        (),
        False,
        False,
        (),
        30.0,
    )


def test_an_empty_file_has_no_limits_and_the_defaults() -> None:
    """An empty file is valid: no limits, a 60 s window, tenant from X-Scope-OrgID else
    `default`, no dry run."""
    ls = limits_of("")
    assert ls == LimitSet((), Tenancy("X-Scope-OrgID", "", "", "default"), 60.0, False)
    assert not LimitEngine(ls, pipeline="prw").active


# ---- the file: every problem, with the limit's name and the key's path -----------------------


@pytest.mark.parametrize(
    ("limit", "problems"),
    [
        pytest.param(
            "{name: x, max_series: 5, actoin: drop}",
            ["limits[0] (x).actoin: unknown key"],
            id="unknown-key",
        ),
        pytest.param(
            "{name: x, max_series: 5, action: drop, tiers: [{at: 80%, action: log}]}",
            ["limits[0] (x): give either `action` or `tiers`, not both"],
            id="action-and-tiers",
        ),
        pytest.param(
            "{name: x, max_series: 5, tiers: [{at: 80%, action: log}, {at: 80, action: drop}]}",
            ["limits[0] (x).tiers: two tiers start at the same percentage"],
            id="two-tiers-at-the-same-percentage",
        ),
        pytest.param(
            "{name: x, max_series: 5, tiers: [{at: lots, action: drop}]}",
            ["limits[0] (x).tiers[0].at: expected a percentage like 80% or 80, got 'lots'"],
            id="tier-at-not-a-percentage",
        ),
        pytest.param(
            "{name: x, max_series: 5, tiers: [{at: 0%, action: drop}]}",
            ["limits[0] (x).tiers[0].at: must be > 0%"],
            id="tier-at-zero",
        ),
        pytest.param(
            "{name: x, max_series: 5, action: adaptive}",
            ["limits[0] (x).group_by: adaptive picks offending groups: give group_by"],
            id="adaptive-without-group_by",
        ),
        pytest.param(
            "{name: x, group_by: [service], max_datapoints_rate: 10, action: adaptive}",
            ["limits[0] (x).max_series: adaptive needs max_series (the budget of the whole limit)"],
            id="adaptive-without-max_series",
        ),
        pytest.param(
            "{name: x, max_series: 5, action: strip, strip: {function: max}}",
            ["limits[0] (x).strip.labels: required: the labels to take off"],
            id="strip-without-labels",
        ),
        pytest.param(
            "{name: x, max_series: 5, action: strip}",
            ["limits[0] (x).strip: settings for 'strip' are required"],
            id="strip-without-settings",
        ),
        pytest.param(
            "{name: x, max_series: 5, action: sample, sample: {rate: 1.5}}",
            ["limits[0] (x).sample.rate: must be between 0 and 1"],
            id="sample-rate-above-1",
        ),
        pytest.param(
            "{name: x, max_series: 5, tiers: [{at: 90%, action: sample, rate: 2}]}",
            ["limits[0] (x).tiers[0].rate: must be between 0 and 1"],
            id="tier-sample-rate-above-1",
        ),
        pytest.param(
            "{name: x, max_series: 5, group_by: [service, env],"
            " overrides: [{group: {service: api}, max_series: 9}]}",
            [
                "limits[0] (x).overrides[0].group: expected a value for each group_by label"
                " (service, env)"
            ],
            id="override-missing-a-group_by-label",
        ),
        pytest.param(
            "{name: x, max_series: 5, group_by: [service],"
            " overrides: [{group: {service: api, pod: p1}, max_series: 9}]}",
            [
                "limits[0] (x).overrides[0].group: expected a value for each group_by label"
                " (service)"
            ],
            id="override-naming-a-label-not-in-group_by",
        ),
        pytest.param(
            "{name: x, group_by: [service]}",
            ["limits[0] (x): nothing to enforce: give an action, tiers or label_caps"],
            id="nothing-to-enforce",
        ),
        pytest.param(
            "{name: x, action: drop}",
            ["limits[0] (x): give max_series and/or max_datapoints_rate"],
            id="an-action-without-a-maximum",
        ),
        pytest.param(
            "{name: x, max_series: 5, action: drop, sample: {rate: 0.5}}",
            ["limits[0] (x).sample: settings for 'sample', but the action is 'drop'"],
            id="settings-of-another-action",
        ),
        pytest.param(
            "{name: x, max_series: -1}",
            ["limits[0] (x).max_series: must be >= 0"],
            id="negative-max_series",
        ),
        pytest.param(
            "{name: x, max_series: 5, group_by: ['bad-label']}",
            ["limits[0] (x).group_by: 'bad-label' is not a label name"],
            id="group_by-not-a-label-name",
        ),
        pytest.param(
            "{name: x, label_caps: [{label: user, max_values: 3, action: sample}]}",
            ["limits[0] (x).label_caps[0].action: 'sample' is not one of strip, drop"],
            id="label-cap-action",
        ),
        pytest.param(
            "{max_series: 5}",
            ["limits[0].name: required"],
            id="no-name",
        ),
    ],
)
def test_a_bad_limit_is_reported_with_its_name_and_key_path(
    limit: str, problems: list[str]
) -> None:
    """Each kind of mistake in one limit comes back as exactly one line `where: what`, `where`
    being the limit's position, its name and the key's path."""
    assert problems_of(f"limits:\n  - {limit}\n") == problems


def test_every_problem_of_a_file_comes_back_at_once() -> None:
    """A file with many mistakes in many limits (and in its top level and its quotas) reports
    all of them in one LimitsError: the quotas' and the top level's first, then each limit's in
    file order, duplicate names last."""
    problems = problems_of(
        """
        windw: 1m
        quotas:
          max_series: 10
          tenants: [team-a]
        limits:
          - {name: typo, max_series: 5, actoin: drop}
          - name: same-at
            max_series: 5
            tiers: [{at: 80%, action: log}, {at: 80, action: drop}]
          - {name: no-group-by, max_series: 5, action: adaptive}
          - {name: no-labels, max_series: 5, action: strip, strip: {}}
          - {name: rate, max_series: 5, action: sample, sample: {rate: 1.5}}
          - name: override
            max_series: 5
            group_by: [service]
            overrides: [{group: {job: x}, max_series: 9}]
          - {name: twice, max_series: 5}
          - {name: twice, max_series: 6}
          - {name: idle}
        """
    )
    assert problems == [
        "quotas.tenants: expected a mapping of tenant to {max_series, max_datapoints_rate}",
        "<top>.windw: unknown key",
        "limits[0] (typo).actoin: unknown key",
        "limits[1] (same-at).tiers: two tiers start at the same percentage",
        "limits[2] (no-group-by).group_by: adaptive picks offending groups: give group_by",
        "limits[3] (no-labels).strip.labels: required: the labels to take off",
        "limits[4] (rate).sample.rate: must be between 0 and 1",
        "limits[5] (override).overrides[0].group: expected a value for each group_by label"
        " (service)",
        "limits[8] (idle): nothing to enforce: give an action, tiers or label_caps",
        "limits: two limits are named 'twice'",
    ]


def test_a_name_used_twice_is_reported_even_when_one_of_the_two_has_another_problem() -> None:
    """Duplicate names are a problem of the file, not of a valid limit: they are reported
    alongside the other problem of one of the two limits, so fixing that one does not reveal a
    second round of problems."""
    problems = problems_of(
        """
        limits:
          - {name: twice, max_series: 5, actoin: drop}
          - {name: twice, max_series: 6}
        """
    )
    assert problems == [
        "limits[0] (twice).actoin: unknown key",
        "limits: two limits are named 'twice'",
    ]


def test_a_problem_in_a_tenants_quota_names_the_tenants_key_path() -> None:
    """A mistake under quotas.tenants.<tenant> is reported at that path, the one in the file,
    not at the path of the override it becomes inside."""
    problems = problems_of("quotas: {max_series: 3, tenants: {team-a: {max_seris: 5}}}\n")
    assert len(problems) == 1
    assert problems[0].startswith("quotas")
    assert problems[0].endswith(".tenants.team-a.max_seris: unknown key")


def test_a_yaml_syntax_error_is_one_problem_with_its_position() -> None:
    """A file that is not YAML is reported as one `<yaml>` problem naming line and column."""
    problems = problems_of("limits: [{name: x, max_series: 5\n")
    assert len(problems) == 1
    assert problems[0].startswith("<yaml>: ")
    assert "line 2, column 1" in problems[0]


@pytest.mark.parametrize("value", ["{name: x}", "5", "x"])
def test_limits_must_be_a_list(value: str) -> None:
    """`limits` that is not a list is reported as such, along with the other problems of the
    top level."""
    assert problems_of(f"windw: 1m\nlimits: {value}\n") == [
        "<top>.windw: unknown key",
        "limits: expected a list of limits",
    ]


# ---- drop_new per group ----------------------------------------------------------------------

PER_SERVICE_5 = """
limits:
  - name: per-service
    group_by: [service]
    max_series: 5
    action: drop_new
"""


def test_drop_new_keeps_a_groups_first_series_and_drops_the_new_ones_beyond_its_maximum() -> None:
    """group_by [service], max_series 5: a service sending 8 series keeps the first 5 of them,
    on this request and later ones; its other 3 are dropped each time. A service with 3 series is
    untouched. LimitStats and Governed.removed count exactly the dropped datapoints."""
    clock = Clock(1_000)
    gov, engine = governed(PER_SERVICE_5, clock)
    api = many("req{{pod=p{i},service=api}}", 8)
    web = many("req{{pod=p{i},service=web}}", 3)

    data = write(*api, *web, t=1_000)
    g = gov.prw(data, "")
    assert forwarded(data, g) == api[:5] + web
    assert (g.series, g.samples, g.removed, g.in_samples) == (8, 8, 3, 11)

    clock.ms = 2_000
    data = write(*reversed(api), *web, t=2_000)
    g = gov.prw(data, "")
    assert forwarded(data, g) == list(reversed(api[:5])) + web
    assert g.removed == 3

    assert engine.stats["per-service"].datapoints == 22
    assert engine.stats["per-service"].dropped == {"drop_new": 6}
    assert engine.stats["per-service"].dry_run == {}
    assert engine.groups["per-service"][("api",)].act == Act("drop_new")
    assert engine.groups["per-service"][("api",)].dropped == 6
    assert engine.groups["per-service"][("web",)].act is None
    assert engine.groups["per-service"][("web",)].dropped == 0


def test_a_series_that_arrives_after_the_group_is_full_is_dropped_even_in_a_later_request() -> None:
    """A group below its maximum admits new series until it holds max_series; a new series after
    that is dropped, whatever the request it comes in."""
    clock = Clock(1_000)
    gov, _ = governed(PER_SERVICE_5, clock)
    api = many("req{{pod=p{i},service=api}}", 7)
    assert send(gov, *api[:4]) == api[:4]
    clock.ms = 2_000
    assert send(gov, *api[:4], api[4], api[5]) == api[:5]
    clock.ms = 3_000
    assert send(gov, *api[:6], api[6]) == api[:5]


def test_drop_new_admits_a_new_series_again_once_the_dropped_ones_have_aged_out() -> None:
    """Active series are those seen in the current or the previous window. The offender stops
    sending its extra series (and one of its kept ones): during the next window they still count
    and a new series is still dropped; in the window after, they have aged out and the same new
    series is admitted."""
    clock = Clock(1_000)
    gov, engine = governed(PER_SERVICE_5, clock)
    api = many("req{{pod=p{i},service=api}}", 8)
    new = "req{pod=new,service=api}"
    assert send(gov, *api) == api[:5]

    clock.ms = 61_000  # window 1: the 3 dropped series of window 0 still count
    assert send(gov, *api[:4], new) == api[:4]
    assert engine.groups["per-service"][("api",)].usage == 9 / 5

    clock.ms = 121_000  # window 2: only window 1's 5 series count
    assert send(gov, *api[:4], new) == [*api[:4], new]
    assert engine.groups["per-service"][("api",)].usage == 5 / 5
    assert engine.stats["per-service"].dropped == {"drop_new": 4}


def test_usage_counts_what_was_attempted_not_what_was_admitted() -> None:
    """A group whose new series are being dropped still counts them: its usage stays at
    attempted / max_series (8 / 5) request after request, so dropping never makes it look
    well-behaved."""
    clock = Clock(1_000)
    gov, engine = governed(PER_SERVICE_5, clock)
    api = many("req{{pod=p{i},service=api}}", 8)
    for step in range(3):
        clock.ms = 1_000 + step * 10_000
        assert send(gov, *api) == api[:5]
        group = engine.groups["per-service"][("api",)]
        assert group.usage == 8 / 5
        assert group.attempted.count() == 8
        assert group.act == Act("drop_new")


# ---- sample ----------------------------------------------------------------------------------


def test_sample_keeps_the_same_series_on_every_request_and_about_its_rate() -> None:
    """action sample at 0.25 over a group of 2000 series: a series is kept exactly when its
    stable hash is below 0.25 x 2^64, so every request keeps the same series, and the share kept
    is within 2 % of the rate."""
    clock = Clock(1_000)
    gov, engine = governed(
        """
        limits:
          - {name: sampled, max_series: 100, action: sample, sample: {rate: 0.25}}
        """,
        clock,
    )
    series = many("req{{pod=p{i},service=api}}", 2000)
    first = send(gov, *series)
    clock.ms = 11_000
    second = send(gov, *series)
    assert first == second == sampled_in(series, 0.25)
    assert abs(len(first) / 2000 - 0.25) < 0.02
    assert engine.stats["sampled"].dropped == {"sample": 2 * (2000 - len(first))}


# ---- strip and its re-aggregation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "gauges"), [("", [3.0, 6.0, 9.0]), ("function: max", [2.0, 5.0, 7.0])]
)
def test_strip_takes_labels_off_and_re_aggregates_what_collapses(
    function: str, gauges: list[float]
) -> None:
    """Series of an over-limit group lose the `pod` label and are not forwarded as they were;
    each label set left comes out of `due` as one series per strip interval: a counter as a
    running total of the inputs' increases that never decreases, even over a source's reset; a
    gauge by the configured function (sum by default). A group under its limit is untouched."""
    clock = Clock(1_000)
    gov, engine = governed(
        f"""
        limits:
          - name: pods
            group_by: [service]
            max_series: 2
            action: strip
            strip: {{labels: [pod], {function}}}
            strip_interval: 10s
        """,
        clock,
    )
    rounds = [
        # (t, counter p1, counter p2, gauge p1, gauge p2)
        (1_000, 10.0, 100.0, 1.0, 2.0),
        (11_000, 15.0, 110.0, 5.0, 1.0),
        (21_000, 3.0, 120.0, 2.0, 7.0),  # p1's counter restarted from 0
    ]
    out = []
    for t, c1, c2, g1, g2 in rounds:
        clock.ms = t
        data = write_values(
            t,
            **{
                "c_total{pod=p1,service=api}": c1,
                "c_total{pod=p2,service=api}": c2,
                "mem{pod=p1,service=api}": g1,
                "mem{pod=p2,service=api}": g2,
                "c_total{pod=p1,service=web}": 1.0,
            },
        )
        g = gov.prw(data, "")
        assert forwarded(data, g) == ["c_total{pod=p1,service=web}"]
        assert g.removed == 4
        out += emitted(gov)
    assert out == [
        ("c_total", {"service": "api"}, "counter", [(10_000, 0.0)]),
        ("mem", {"service": "api"}, "gauge", [(10_000, gauges[0])]),
        ("c_total", {"service": "api"}, "counter", [(20_000, 15.0)]),
        ("mem", {"service": "api"}, "gauge", [(20_000, gauges[1])]),
        ("c_total", {"service": "api"}, "counter", [(30_000, 28.0)]),
        ("mem", {"service": "api"}, "gauge", [(30_000, gauges[2])]),
    ]
    assert engine.stats["pods"].stripped == 12
    assert engine.stats["pods"].dropped == {}


def test_stripped_gauges_combine_each_series_last_value_however_often_it_is_sent() -> None:
    """A stripped gauge's window is the function over each folded series' last value in it:
    p1 sending three times in one interval (1, 4, then 3) and p2 once (2) sum to 3 + 2, as
    `sum without (pod)` reads at the interval's end, not to the sum of all points."""
    clock = Clock(1_000)
    gov, _ = governed(
        """
        limits:
          - {name: pods, group_by: [service], max_series: 1, action: strip,
             strip: {labels: [pod]}, strip_interval: 10s}
        """,
        clock,
    )
    for t, values in [
        (1_000, {"mem{pod=p1,service=api}": 1.0, "mem{pod=p2,service=api}": 2.0}),
        (4_000, {"mem{pod=p1,service=api}": 4.0}),
        (7_000, {"mem{pod=p1,service=api}": 3.0}),
    ]:
        clock.ms = t
        gov.prw(write_values(t, **values), "")
    assert emitted(gov) == [("mem", {"service": "api"}, "gauge", [(10_000, 5.0)])]


def test_a_stripped_series_without_the_labels_passes_unchanged() -> None:
    """Strip takes labels off the series that have them; a series of the same over-limit group
    without any of them is forwarded as it is."""
    clock = Clock(1_000)
    gov, engine = governed(
        """
        limits:
          - {name: pods, group_by: [service], max_series: 1, action: strip,
             strip: {labels: [pod]}}
        """,
        clock,
    )
    assert send(gov, "up{pod=p1,service=api}", "up{service=api}") == ["up{service=api}"]
    assert engine.stats["pods"].stripped == 1
    assert emitted(gov) == [("up", {"service": "api"}, "gauge", [(30_000, 1.0)])]


# ---- drop, log and tiers ---------------------------------------------------------------------


def test_drop_takes_out_every_series_of_an_over_limit_group() -> None:
    """action drop: once a group is at its maximum, all its series are dropped, old and new;
    other groups pass."""
    clock = Clock(1_000)
    gov, engine = governed(
        "limits: [{name: d, group_by: [service], max_series: 3, action: drop}]", clock
    )
    api = many("req{{pod=p{i},service=api}}", 3)
    assert send(gov, *api[:2], "req{service=web}") == [*api[:2], "req{service=web}"]
    clock.ms = 2_000
    assert send(gov, *api, "req{service=web}") == ["req{service=web}"]
    assert engine.stats["d"].dropped == {"drop": 3}


def test_log_lets_everything_through_and_counts_it() -> None:
    """action log: an over-limit group is only noted; every series passes and its datapoints are
    counted under dry_run{log}."""
    clock = Clock(1_000)
    gov, engine = governed(
        "limits: [{name: l, group_by: [service], max_series: 2, action: log}]", clock
    )
    api = many("req{{pod=p{i},service=api}}", 3)
    data = write(*api, t=1_000)
    g = gov.prw(data, "")
    assert g.data is None
    assert forwarded(data, g) == api
    assert engine.groups["l"][("api",)].act == Act("log")
    assert engine.stats["l"].dropped == {}
    assert engine.stats["l"].dry_run == {"log": 3}


def test_tiers_apply_the_action_of_the_highest_tier_reached() -> None:
    """Tiers 80 % log, 100 % sample 0.5, 120 % strip, 150 % drop over max_series 10: fed a growing
    group, the group's action follows its usage (7, 8, 10, 12, 15 series) and so does what is
    forwarded. A small group alongside is never touched."""
    clock = Clock(1_000)
    gov, engine = governed(
        """
        limits:
          - name: tiered
            group_by: [service]
            max_series: 10
            tiers:
              - {at: 80%, action: log}
              - {at: 100%, action: sample, rate: 0.5}
              - {at: 120%, action: strip, labels: [pod]}
              - {at: 150%, action: drop}
        """,
        clock,
    )
    api = many("req{{pod=p{i},service=api}}", 15)
    web = "req{pod=p0,service=web}"
    group = engine.groups["tiered"]
    stats = engine.stats["tiered"]

    assert send(gov, *api[:7], web) == [*api[:7], web]
    assert (group[("api",)].usage, group[("api",)].act) == (0.7, None)

    clock.ms = 2_000
    assert send(gov, *api[:8], web) == [*api[:8], web]
    assert (group[("api",)].usage, group[("api",)].act) == (0.8, Act("log"))
    assert stats.dry_run == {"log": 8}

    clock.ms = 3_000
    kept = sampled_in(api[:10], 0.5)
    assert 0 < len(kept) < 10  # the sample really keeps some and drops some
    assert send(gov, *api[:10], web) == [*kept, web]
    assert (group[("api",)].usage, group[("api",)].act) == (1.0, Act("sample", rate=0.5))
    assert stats.dropped == {"sample": 10 - len(kept)}

    clock.ms = 4_000
    assert send(gov, *api[:12], web) == [web]
    assert (group[("api",)].usage, group[("api",)].act) == (1.2, Act("strip", labels=("pod",)))
    assert stats.stripped == 12
    assert emitted(gov) == [("req", {"service": "api"}, "gauge", [(30_000, 12.0)])]

    clock.ms = 5_000
    assert send(gov, *api, web) == [web]
    assert (group[("api",)].usage, group[("api",)].act) == (1.5, Act("drop"))
    assert stats.dropped == {"sample": 10 - len(kept), "drop": 15}
    assert group[("web",)].act is None


# ---- label caps ------------------------------------------------------------------------------


def test_a_label_cap_with_drop_drops_series_with_a_value_beyond_the_cap() -> None:
    """label_caps {user, max_values 3, drop}: the first 3 distinct values of `user` of a metric
    pass; a series with a 4th value is dropped, while the known values keep flowing, and a series
    without the label is not concerned."""
    clock = Clock(1_000)
    gov, engine = governed(
        """
        limits:
          - name: users
            match: {name: "api_.*"}
            label_caps: [{label: user, max_values: 3, action: drop}]
        """,
        clock,
    )
    users = many("api_calls{{route=/x,user=u{i}}}", 5)
    assert send(gov, *users[:3]) == users[:3]
    clock.ms = 2_000
    assert send(gov, *users[:4], "api_calls{route=/x}") == [*users[:3], "api_calls{route=/x}"]
    clock.ms = 3_000
    assert send(gov, users[4], *users[:3]) == users[:3]
    assert engine.stats["users"].dropped == {"label_cap_drop": 2}


def test_a_label_cap_with_strip_takes_the_label_off_values_beyond_the_cap() -> None:
    """label_caps {user, max_values 3, strip}: series with a value beyond the first 3 lose the
    `user` label and are re-aggregated with the others that collapse with them; the known values
    flow unchanged. As docs/limits.md says, they are counted under dropped{label_cap_strip}
    (folded, not lost), and not as `stripped`, which counts the strip action."""
    clock = Clock(1_000)
    gov, engine = governed(
        """
        limits:
          - name: users
            match: {name: "api_.*"}
            label_caps: [{label: user, max_values: 3, action: strip}]
        """,
        clock,
    )
    users = many("api_calls{{route=/x,user=u{i}}}", 6)
    assert send(gov, *users) == users[:3]
    assert emitted(gov) == [("api_calls", {"route": "/x"}, "gauge", [(30_000, 3.0)])]
    clock.ms = 31_000
    assert send(gov, users[5], *users[:3]) == users[:3]
    assert emitted(gov) == [("api_calls", {"route": "/x"}, "gauge", [(60_000, 1.0)])]
    assert engine.stats["users"].dropped == {}
    assert engine.stats["users"].stripped == 4  # folded into the output, not lost


# ---- overrides and quotas per tenant ---------------------------------------------------------


def test_overrides_raise_or_lower_the_maximum_of_one_group() -> None:
    """max_series 5 with overrides big: 7 and small: 2: of 8 series each, big keeps 7, small
    keeps 2 and any other service keeps 5."""
    clock = Clock(1_000)
    gov, engine = governed(
        """
        limits:
          - name: per-service
            group_by: [service]
            max_series: 5
            overrides:
              - {group: {service: big}, max_series: 7}
              - {group: {service: small}, max_series: 2}
        """,
        clock,
    )
    big = many("req{{pod=p{i},service=big}}", 8)
    small = many("req{{pod=p{i},service=small}}", 8)
    other = many("req{{pod=p{i},service=other}}", 8)
    assert send(gov, *big, *small, *other) == big[:7] + small[:2] + other[:5]
    groups = engine.groups["per-service"]
    assert [groups[(s,)].max_series for s in ("big", "small", "other")] == [7, 2, 5]
    assert engine.stats["per-service"].dropped == {"drop_new": 1 + 6 + 3}


def test_an_override_of_a_group_with_the_tenant_matches_whatever_the_order_of_group_by() -> None:
    """group_by [__tenant__, service] with an override for {__tenant__: team-a, service: api}:
    that group (tenant from the header) gets the override's maximum; the same service of another
    tenant keeps the limit's."""
    clock = Clock(1_000)
    gov, engine = governed(
        """
        limits:
          - name: per-tenant-service
            group_by: [__tenant__, service]
            max_series: 2
            overrides:
              - {group: {__tenant__: team-a, service: api}, max_series: 4}
        """,
        clock,
    )
    a = many("req{{pod=a{i},service=api}}", 5)
    b = many("req{{pod=b{i},service=api}}", 5)
    assert send(gov, *a, tenant="team-a") == a[:4]
    assert send(gov, *b, tenant="team-b") == b[:2]
    groups = engine.groups["per-tenant-service"]
    assert groups[("api", "team-a")].max_series == 4
    assert groups[("api", "team-b")].max_series == 2


QUOTAS = """
quotas:
  max_series: 3
  tenants:
    team-a: 5
    team-b: {max_series: 1}
"""


def test_quotas_limit_each_tenant_named_by_the_request_header() -> None:
    """quotas max_series 3, team-a 5, team-b 1: with the tenant given by the request's header,
    of 6 series each team-a keeps 5, team-b 1, team-c (no entry) 3, and a request without a
    header belongs to the tenant `default` (3 too)."""
    clock = Clock(1_000)
    gov, engine = governed(QUOTAS, clock)
    series = {t: many(f"req{{{{pod=p{{i}},team={t}}}}}", 6) for t in ("a", "b", "c", "d")}
    assert send(gov, *series["a"], tenant="team-a") == series["a"][:5]
    assert send(gov, *series["b"], tenant="team-b") == series["b"][:1]
    assert send(gov, *series["c"], tenant="team-c") == series["c"][:3]
    assert send(gov, *series["d"]) == series["d"][:3]
    assert sorted(engine.groups["tenant-quota"]) == [
        ("default",),
        ("team-a",),
        ("team-b",),
        ("team-c",),
    ]
    assert engine.stats["tenant-quota"].dropped == {"drop_new": 1 + 5 + 3 + 3}


def test_the_same_series_sent_by_two_tenants_counts_in_each_tenants_quota() -> None:
    """Tenants are independent: series with the same labels sent under two tenants' headers in
    one window count against each tenant's quota (team-a 5 of 6, team-b 1 of 6), whichever
    tenant sent them first."""
    clock = Clock(1_000)
    gov, engine = governed(QUOTAS, clock)
    series = many("req{{pod=p{i}}}", 6)
    assert send(gov, *series, tenant="team-a") == series[:5]
    clock.ms = 2_000
    assert send(gov, *series, tenant="team-b") == series[:1]
    assert engine.groups["tenant-quota"][("team-b",)].attempted.count() == 6
    assert engine.stats["tenant-quota"].dropped == {"drop_new": 1 + 5}


def test_quotas_take_the_tenant_from_a_label_when_no_header_names_it() -> None:
    """tenant.label: a series' `tenant` label names its tenant when the request has no tenant
    header; a series without the label goes to the default tenant; a header wins over the
    label."""
    clock = Clock(1_000)
    gov, engine = governed(QUOTAS + "tenant: {label: tenant, default: nobody}\n", clock)
    a = many("req{{pod=p{i},tenant=team-a}}", 6)
    b = many("req{{pod=p{i},tenant=team-b}}", 6)
    none = many("req{{pod=p{i}}}", 6)
    assert send(gov, *a, *b, *none) == a[:5] + b[:1] + none[:3]
    assert sorted(engine.groups["tenant-quota"]) == [("nobody",), ("team-a",), ("team-b",)]

    clock.ms = 2_000
    relabelled = many("req{{pod=q{i},tenant=team-a}}", 2)
    assert send(gov, *relabelled, tenant="team-b") == []  # team-b's one series is taken
    assert engine.groups["tenant-quota"][("team-a",)].attempted.count() == 6


def test_quotas_on_otlp_take_the_tenant_from_a_resource_attribute() -> None:
    """tenant.resource_attribute: on OTLP, a resource's `tenant.id` names the tenant of its
    datapoints; a resource without it belongs to the default tenant."""
    clock = Clock(1_000)
    gov, engine = governed(QUOTAS + "tenant: {resource_attribute: tenant.id}\n", clock)
    pts = [point(1_000, 1.0, pod=f"p{i}") for i in range(6)]
    admitted = govern_otlp(
        gov,
        resource_metrics({"tenant.id": "team-a"}, gauge("m", *pts)),
        resource_metrics({"tenant.id": "team-b"}, gauge("m", *pts)),
        resource_metrics({"host": "h"}, gauge("m", *pts)),
    )
    assert otlp_points(admitted.data) == (
        [f"tenant.id=team-a|m{{pod=p{i}}}" for i in range(5)]
        + ["tenant.id=team-b|m{pod=p0}"]
        + [f"host=h|m{{pod=p{i}}}" for i in range(3)]
    )
    assert sorted(engine.groups["tenant-quota"]) == [("default",), ("team-a",), ("team-b",)]
    assert (admitted.datapoints, admitted.rejected, admitted.limited) == (9, 9, 9)


# ---- dry run ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "force"),
    [
        pytest.param(PER_SERVICE_5.rstrip() + "\n    dry_run: true\n", False, id="limit"),
        pytest.param("dry_run: true\n" + PER_SERVICE_5, False, id="file"),
        pytest.param(PER_SERVICE_5, True, id="engine"),
    ],
)
def test_dry_run_changes_nothing_but_counts_what_would_have_been_dropped(
    text: str, force: bool
) -> None:
    """In dry run (of the limit, of the whole file, or forced on the engine) every series is
    forwarded unchanged, nothing counts as dropped, and LimitStats.dry_run holds what would have
    been: 3 of 8 series, twice."""
    clock = Clock(1_000)
    gov, engine = governed(text, clock, force_dry_run=force)
    api = many("req{{pod=p{i},service=api}}", 8)
    for t in (1_000, 2_000):
        clock.ms = t
        data = write(*api, t=t)
        g = gov.prw(data, "")
        assert g.data is None
        assert g.removed == 0
    assert engine.stats["per-service"].dropped == {}
    assert engine.stats["per-service"].dry_run == {"drop_new": 6}
    assert engine.groups["per-service"][("api",)].act == Act("drop_new")


def test_dry_run_of_strip_and_annotate_changes_nothing() -> None:
    """A stripping, annotating limit in dry run forwards its series as they were, re-aggregates
    nothing and counts the would-be stripped datapoints under dry_run{strip}."""
    clock = Clock(1_000)
    gov, engine = governed(
        """
        dry_run: true
        limits:
          - {name: pods, group_by: [service], max_series: 1, action: strip,
             strip: {labels: [pod]}, annotate: true}
        """,
        clock,
    )
    api = many("req{{pod=p{i},service=api}}", 3)
    data = write(*api, t=1_000)
    assert gov.prw(data, "").data is None
    assert emitted(gov) == []
    assert engine.stats["pods"].stripped == 0
    assert engine.stats["pods"].dry_run == {"strip": 3}


# ---- adaptive --------------------------------------------------------------------------------

ADAPTIVE = """
limits:
  - name: adaptive
    group_by: [service]
    max_series: 3000
    action: adaptive
"""


def test_adaptive_drops_only_the_new_series_of_the_group_that_exceeds_the_budget() -> None:
    """max_series 3000 for the whole limit; services a, b and c with 100 series each. When a adds
    3000 new series, only a is picked as the offender and only its new series beyond its fair
    share (3000 / 3 groups = 1000 series) are dropped: its old ones keep flowing, 900 new ones
    fill its share, b and c are complete. A group's size is its active series (the current and
    the previous window, docs/limits.md *Adaptive*), so in the next window a's burst still
    counts and a is picked again at its first request (its admitted series still pass); in the
    window after, the burst has aged out and a, sending calmly, gets new series admitted."""
    clock = Clock(1_000)
    gov, engine = governed(ADAPTIVE, clock, exact_limit=100_000)
    old = {s: many(f"req{{{{pod=p{{i}},service={s}}}}}", 100) for s in "abc"}
    assert send(gov, *old["a"], *old["b"], *old["c"]) == old["a"] + old["b"] + old["c"]
    groups = engine.groups["adaptive"]

    clock.ms = 2_000
    new = many("req{{pod=n{i},service=a}}", 3000)
    data = write(*old["a"], *new, t=2_000)
    g = gov.prw(data, "")
    assert forwarded(data, g) == old["a"] + new[:900]
    assert g.removed == 2100
    assert [groups[(s,)].offender for s in "abc"] == [True, False, False]
    assert groups[("a",)].act == Act("drop_new")

    clock.ms = 3_000
    assert send(gov, *old["b"], *old["c"]) == old["b"] + old["c"]
    assert send(gov, *old["a"], *new) == old["a"] + new[:900]
    assert engine.stats["adaptive"].dropped == {"drop_new": 4200}
    assert [groups[(s,)].act for s in "abc"] == [Act("drop_new"), None, None]

    clock.ms = 61_000  # window 1: a's 3100 series of window 0 are still active
    assert send(gov, *old["b"], *old["c"]) == old["b"] + old["c"]
    assert send(gov, *old["a"], *new[:200], *new[1000:1100]) == old["a"] + new[:200]
    assert [groups[(s,)].offender for s in "abc"] == [True, False, False]
    assert engine.stats["adaptive"].dropped == {"drop_new": 4300}

    clock.ms = 121_000  # window 2: a holds 400 active series, the three together 600
    assert send(gov, *old["b"], *old["c"]) == old["b"] + old["c"]
    assert send(gov, *old["a"], *new[1000:1200]) == old["a"] + new[1000:1200]
    assert [groups[(s,)].offender for s in "abc"] == [False, False, False]
    assert groups[("a",)].act is None
    assert engine.stats["adaptive"].dropped == {"drop_new": 4300}


def test_adaptive_counts_only_the_active_series_of_groups_that_went_quiet() -> None:
    """A group's size is its active series: a group last seen in window 0 holds none in window
    2, so it adds nothing to the total there (even after the governance task's prune), and a
    group that alone stays within the budget is not picked."""
    clock = Clock(59_000)
    gov, engine = governed(ADAPTIVE, clock, exact_limit=100_000)
    old = {s: many(f"req{{{{pod=p{{i}},service={s}}}}}", 100) for s in "abc"}
    assert send(gov, *old["a"], *old["b"], *old["c"]) == old["a"] + old["b"] + old["c"]

    clock.ms = 61_000
    assert send(gov, *old["a"]) == old["a"]

    clock.ms = 121_000  # window 2: b and c sent nothing in windows 1 and 2
    engine.prune(121.0)
    a = old["a"] + many("req{{pod=n{i},service=a}}", 2800)
    assert send(gov, *a) == a
    assert engine.groups["adaptive"][("a",)].offender is False


def test_adaptive_leaves_everyone_alone_while_the_limit_is_within_budget() -> None:
    """Groups together under the limit's max_series are never picked, however unequal."""
    clock = Clock(1_000)
    gov, engine = governed(ADAPTIVE, clock, exact_limit=100_000)
    a = many("req{{pod=p{i},service=a}}", 2900)
    b = many("req{{pod=p{i},service=b}}", 100)
    assert send(gov, *a, *b) == a + b
    assert [g.offender for g in engine.groups["adaptive"].values()] == [False, False]
    assert engine.stats["adaptive"].dropped == {}


# ---- datapoint rate --------------------------------------------------------------------------


def test_a_group_over_its_datapoint_rate_gets_the_action() -> None:
    """max_datapoints_rate 1/s over a 60 s window: a service sending 30 then 40 datapoints in the
    same window crosses 60 with the second request, whose datapoints are dropped (the request that
    crosses is already limited); another service sending 10 passes."""
    clock = Clock(1_000)
    gov, engine = governed(
        "limits: [{name: rate, group_by: [service], max_datapoints_rate: 1, action: drop}]",
        clock,
    )
    data = write("req{service=a}", t=1_000, samples=30)
    g = gov.prw(data, "")
    assert (g.data, g.datapoints) == (None, 30)
    assert engine.groups["rate"][("a",)].usage == 0.5

    clock.ms = 2_000
    data = write("req{service=a}", "req{service=b}", t=2_000, samples=20)
    g = gov.prw(data, "")
    assert (g.data, g.datapoints) == (None, 40)
    assert engine.groups["rate"][("a",)].usage == 50 / 60
    assert engine.groups["rate"][("a",)].act is None

    clock.ms = 3_000
    data = write("req{service=a}", "req{service=b}", t=3_000, samples=20)
    g = gov.prw(data, "")
    assert forwarded(data, g) == ["req{service=b}"]
    assert (g.datapoints, g.removed) == (20, 20)
    assert engine.groups["rate"][("a",)].usage == 70 / 60
    assert engine.groups["rate"][("a",)].act == Act("drop")
    assert engine.stats["rate"].dropped == {"drop": 20}
    assert engine.groups["rate"][("b",)].act is None

    # Half-way through the next window, half of the previous window's 70 still counts.
    clock.ms = 90_000
    data = write("req{service=a}", t=90_000)
    assert gov.prw(data, "").data is None
    assert engine.groups["rate"][("a",)].usage == (70 * 0.5 + 1) / 60


# ---- annotate --------------------------------------------------------------------------------


@pytest.mark.parametrize("annotate", [True, False])
def test_annotate_labels_the_passing_series_of_a_limited_group(annotate: bool) -> None:
    """annotate: the series of a limited group that pass carry governor_limit="<limit name>"
    (labels still sorted); the series of a group that is not limited do not. Without annotate
    no label is added."""
    clock = Clock(1_000)
    gov, _ = governed(
        f"""
        limits:
          - {{name: per-service, group_by: [service], max_series: 2,
             annotate: {str(annotate).lower()}}}
        """,
        clock,
    )
    api = many("req{{pod=p{i},service=api}}", 3)
    out = send(gov, *api, "req{pod=p0,service=web}")
    if annotate:
        assert out == [
            "req{governor_limit=per-service,pod=p0,service=api}",
            "req{governor_limit=per-service,pod=p1,service=api}",
            "req{pod=p0,service=web}",
        ]
    else:
        assert out == [*api[:2], "req{pod=p0,service=web}"]


# ---- reload ----------------------------------------------------------------------------------


def test_a_reload_keeps_the_state_of_unchanged_limits_and_starts_changed_ones_afresh() -> None:
    """engine.apply(new limits): a limit whose settings did not change keeps its groups (the
    same objects, with their attempted series and admissions), so its over-limit group still
    drops the same series; a limit whose settings changed starts with no groups and admits
    series up to its new maximum; a limit that is gone leaves no stats behind."""
    clock = Clock(1_000)
    before = """
    limits:
      - {name: kept, match: {name: a_.*}, group_by: [service], max_series: 2}
      - {name: changed, match: {name: b_.*}, group_by: [service], max_series: 2}
      - {name: gone, match: {name: c_.*}, group_by: [service], max_series: 2}
    """
    after = """
    limits:
      - {name: kept, match: {name: a_.*}, group_by: [service], max_series: 2}
      - {name: changed, match: {name: b_.*}, group_by: [service], max_series: 3}
    """
    gov, engine = governed(before, clock)
    a = many("a_req{{pod=p{i},service=api}}", 4)
    b = many("b_req{{pod=p{i},service=api}}", 4)
    c = many("c_req{{pod=p{i},service=api}}", 4)
    assert send(gov, *a[1:], *b[1:], *c) == a[1:3] + b[1:3] + c[:2]
    kept = engine.groups["kept"][("api",)]

    engine.apply(limits_of(after))
    assert [lim.name for lim in engine.limits] == ["kept", "changed"]
    assert engine.limits[1].max_series == 3
    assert engine.groups["kept"][("api",)] is kept
    assert kept.usage == 3 / 2
    assert engine.groups["changed"] == {}
    assert sorted(engine.stats) == ["changed", "kept"]

    clock.ms = 2_000
    assert send(gov, *a, *b, *c) == a[1:3] + b[:3] + c


# ---- OTLP ------------------------------------------------------------------------------------


def test_limits_drop_otlp_datapoints_and_report_them_as_rejected() -> None:
    """On OTLP a limit drops datapoints (a group's attributes are the datapoint's attributes);
    the Admitted handed back counts them as rejected and limited, with a message for the
    client's partial success, and its data and datapoints are what is left."""
    clock = Clock(1_000)
    gov, engine = governed(PER_SERVICE_5, clock)
    api = [point(1_000, 1.0, pod=f"p{i}", service="api") for i in range(8)]
    admitted = govern_otlp(
        gov,
        resource_metrics({"host": "h1"}, gauge("m", *api[:4]), gauge("n", *api[4:])),
        resource_metrics({"host": "h2"}, gauge("m", point(1_000, 2.0, service="web"))),
    )
    assert otlp_points(admitted.data) == [
        *(f"host=h1|m{{pod=p{i},service=api}}" for i in range(4)),
        "host=h1|n{pod=p4,service=api}",
        "host=h2|m{service=web}",
    ]
    assert (admitted.datapoints, admitted.metrics) == (6, 3)
    assert (admitted.rejected, admitted.limited) == (3, 3)
    assert admitted.message == "3 data points refused by limits"
    assert engine.stats["per-service"].dropped == {"drop_new": 3}


def test_an_otlp_metric_whose_datapoints_are_all_dropped_goes_with_them() -> None:
    """A metric left without datapoints is taken out of its scope."""
    clock = Clock(1_000)
    gov, _ = governed(PER_SERVICE_5, clock)
    api = [point(1_000, 1.0, pod=f"p{i}", service="api") for i in range(7)]
    admitted = govern_otlp(
        gov, resource_metrics({"host": "h1"}, gauge("m", *api[:5]), gauge("n", *api[5:]))
    )
    assert otlp_points(admitted.data) == [f"host=h1|m{{pod=p{i},service=api}}" for i in range(5)]
    assert (admitted.datapoints, admitted.metrics, admitted.rejected) == (5, 1, 2)


# ---- /metrics --------------------------------------------------------------------------------


def test_the_limit_collector_exposes_counts_top_groups_and_offenders() -> None:
    """LimitCollector over 5 groups (1 to 5 series, max_series 3) with k = 2: datapoints
    attempted, dropped by action, series of the top 2 groups only, and the limited groups with
    their usage and action; every series carries the limit's ownership labels."""
    clock = Clock(1_000)
    gov, engine = governed(
        """
        limits:
          - name: per-service
            labels: {team: platform}
            group_by: [service]
            max_series: 3
        """,
        clock,
    )
    series = [s for n in range(1, 6) for s in many(f"req{{{{pod=p{{i}},service=s{n}}}}}", n)]
    assert len(send(gov, *series)) == 1 + 2 + 3 + 3 + 3
    registry = CollectorRegistry()
    registry.register(LimitCollector([engine], k=2))
    base = {"pipeline": "prw", "limit": "per-service", "team": "platform"}

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {**base, **labels})

    assert value("governor_limit_datapoints_total") == 15.0
    assert value("governor_limit_dropped_datapoints_total", action="drop_new") == 3.0
    assert value("governor_limit_stripped_datapoints_total") == 0.0
    assert value("governor_limit_groups") == 5.0
    assert value("governor_limit_limited_groups") == 3.0  # s3 is at 100 %: a 4th is dropped
    samples = {m.name: [(s.labels, s.value) for s in m.samples] for m in registry.collect()}
    assert samples["governor_limit_group_series"] == [
        ({**base, "group": "service=s5"}, 5.0),
        ({**base, "group": "service=s4"}, 4.0),
    ]
    assert samples["governor_limits_offenders"] == [
        ({**base, "group": "service=s5", "action": "drop_new"}, 5 / 3),
        ({**base, "group": "service=s4", "action": "drop_new"}, 4 / 3),
    ]
    assert samples["governor_limit_group_dropped_datapoints"] == [
        ({**base, "group": "service=s5"}, 2.0),
        ({**base, "group": "service=s4"}, 1.0),
    ]
    assert samples["governor_limit_group_datapoints"] == [  # attempted, not only admitted
        ({**base, "group": "service=s5"}, 5.0),
        ({**base, "group": "service=s4"}, 4.0),
    ]
