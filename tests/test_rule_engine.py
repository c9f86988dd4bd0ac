"""Tests for the rule engine (service/governance/engine.py, windows.py) over both pipelines
(prw.py, otlp.py) and its metrics (activity.py), against docs/rules.md.

Time is virtual: every engine gets `clock_ms` from a Clock the test moves, or from trio's
autojump clock for run(). Randomness is injected (`rand`), so sampling is exact too. Remote-write
series are written as one line each, `{__name__=m,a=1} 1000:1.0 2000:2.0`: labels in wire order,
then timestamp:value per sample; outputs are compared as those lines.
"""

from __future__ import annotations

import math
import random
import textwrap
from collections.abc import Callable

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from prometheus_client import CollectorRegistry, generate_latest

from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import Label, Sample
from service.codec import otlp as otlp_codec
from service.governance import otlp, prw
from service.governance.activity import RuleCollector
from service.governance.engine import LATENESS_MS, RuleEngine, RuleStats
from service.governance.rules import load_rules
from service.governance.stage import Governance
from service.governance.windows import lttb, swinging_door

CUMULATIVE = 2  # AGGREGATION_TEMPORALITY_CUMULATIVE


class Clock:
    """Virtual time in milliseconds since the epoch; the test sets `ms`."""

    def __init__(self, ms: int = 0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def engine(
    rules: str,
    clock: Clock | None = None,
    *,
    rand: Callable[[], float] = random.random,
    pipeline: str = "prw",
) -> RuleEngine:
    """An engine over the rules file `rules` (indented freely), on a virtual clock."""
    ruleset = load_rules(textwrap.dedent(rules))
    return RuleEngine(ruleset, pipeline=pipeline, clock_ms=clock or Clock(), rand=rand)


def request(*series: str) -> bytes:
    """A serialized WriteRequest with one TimeSeries per line `{k=v,...} ts:value ...`; the
    labels go on the wire in the order written."""
    req = WriteRequest()
    for line in series:
        labels, _, samples = line.partition("} ")
        ts = req.timeseries.add()
        for pair in labels.removeprefix("{").split(","):
            k, _, v = pair.partition("=")
            ts.labels.append(Label(name=k, value=v))
        for sample in samples.split():
            t, _, v = sample.partition(":")
            ts.samples.append(Sample(timestamp=int(t), value=float(v)))
    return req.SerializeToString()


def lines(data: bytes) -> list[str]:
    """The series of a serialized WriteRequest as lines, labels in wire order."""
    out = []
    for ts in WriteRequest.FromString(data).timeseries:
        labels = ",".join(f"{lb.name}={lb.value}" for lb in ts.labels)
        samples = " ".join(f"{s.timestamp}:{s.value!r}" for s in ts.samples)
        out.append(f"{{{labels}}} {samples}")
    return out


def govern(e: RuleEngine, *series: str) -> list[str] | None:
    """What the PRW pipeline forwards for a request of `series`; None: the request unchanged."""
    governed = prw.govern(e, request(*series))
    return None if governed.data is None else lines(governed.data)


def due(e: RuleEngine, *, force: bool = False) -> list[str]:
    """The windows due now, encoded for remote write, as lines."""
    return lines(prw.encode(e.due(force=force))[0])


# ---- drop, and requests no rule touches ------------------------------------------------------


def test_drop_removes_the_matching_series_only() -> None:
    """A series whose name matches a drop rule is removed with all its samples; the others go on
    as they were sent, and Governed counts what went in and what came out."""
    e = engine("""
        rules:
          - {name: drop-debug, match: {name: "debug_.*"}, action: drop}
    """)
    governed = prw.govern(
        e,
        request("{__name__=debug_x,a=1} 1000:1.0 2000:2.0", "{__name__=up,job=api} 1000:1.0"),
    )
    assert governed.data is not None
    assert lines(governed.data) == ["{__name__=up,job=api} 1000:1.0"]
    assert (governed.series, governed.datapoints, governed.removed) == (1, 1, 2)
    assert governed.in_samples == 3
    assert e.stats["drop-debug"] == RuleStats(input=2, dropped=2, last_match=0.0)


def test_drop_with_label_matchers_drops_only_series_whose_labels_match() -> None:
    """Label matchers must all hold: only env=dev series of pods canary-* are dropped."""
    e = engine("""
        rules:
          - name: drop-dev-canary
            match:
              name: up
              labels: [{label: env, equals: dev}, {label: pod, regex: "canary-.*"}]
            action: drop
    """)
    assert govern(
        e,
        "{__name__=up,env=dev,pod=canary-1} 1000:1.0",
        "{__name__=up,env=dev,pod=web-1} 1000:1.0",
        "{__name__=up,env=prod,pod=canary-1} 1000:1.0",
    ) == [
        "{__name__=up,env=dev,pod=web-1} 1000:1.0",
        "{__name__=up,env=prod,pod=canary-1} 1000:1.0",
    ]


def test_a_request_no_rule_touches_is_forwarded_as_sent() -> None:
    """When no rule matches any series (by name, or by labels after the name), `data` is None:
    the original bytes are forwarded."""
    e = engine("""
        rules:
          - {name: drop-debug, match: {name: "debug_.*"}, action: drop}
          - name: tag-dev
            match: {name: up, labels: [{label: env, equals: dev}]}
            action: transform
            transform: [{op: set, label: x, value: "1"}]
    """)
    governed = prw.govern(e, request("{__name__=up,env=prod} 1000:1.0", "{__name__=cpu} 1000:2.0"))
    assert governed.data is None
    assert (governed.series, governed.datapoints, governed.removed) == (2, 2, 0)
    assert e.stats["tag-dev"] == RuleStats()


def test_a_rule_with_resource_matchers_never_matches_remote_write() -> None:
    """A PRW series has no resource: a rule with `resource` matchers does not apply to it."""
    e = engine("""
        rules:
          - name: drop-checkout
            match: {resource: [{label: service.name, equals: checkout}]}
            action: drop
    """)
    assert govern(e, "{__name__=up,service.name=checkout} 1000:1.0") is None


# ---- sample ----------------------------------------------------------------------------------


def test_probabilistic_sampling_keeps_a_point_when_rand_is_below_the_rate() -> None:
    """Each datapoint is kept when rand() < rate, independently of the others."""
    e = engine(
        """
        rules:
          - {name: s, action: sample, sample: {method: probabilistic, rate: 0.1}}
        """,
        rand=iter([0.05, 0.5, 0.09, 0.1, 0.99]).__next__,
    )
    assert govern(e, "{__name__=m} 1000:1.0 2000:2.0 3000:3.0 4000:4.0 5000:5.0") == [
        "{__name__=m} 1000:1.0 3000:3.0"
    ]
    assert e.stats["s"] == RuleStats(input=5, output=2, dropped=3, last_match=0.0)


@settings(max_examples=10, deadline=None)
@given(rate=st.sampled_from([0.01, 0.1, 0.5, 0.9]), seed=st.integers(0, 2**32 - 1))
def test_probabilistic_sampling_keeps_about_the_rate(rate: float, seed: int) -> None:
    """Over 20,000 datapoints (200 series of 100) with random.Random(seed), the kept fraction is
    within 5 standard deviations of the rate."""
    e = engine(
        f"rules: [{{name: s, action: sample, sample: {{method: probabilistic, rate: {rate}}}}}]",
        rand=random.Random(seed).random,
    )
    samples = " ".join(f"{t}:1.0" for t in range(1000, 101_000, 1000))
    governed = prw.govern(e, request(*(f"{{__name__=m,i={i}}} {samples}" for i in range(200))))
    n = 20_000
    assert governed.in_samples == n
    assert abs(governed.samples / n - rate) <= 5 * math.sqrt(rate * (1 - rate) / n)
    assert e.stats["s"].output == governed.samples


HASH_RULES = "rules: [{name: h, action: sample, sample: {method: hash, rate: 0.5}}]"


def test_hash_sampling_keeps_whole_series_the_same_in_every_engine() -> None:
    """`hash` keeps all or none of a series' points, decided by the series alone: two engines
    (two processes, replicas or restarts) keep the same series. Which ones is fixed: it must not
    change from one release to the next, or replicas would disagree during a rollout."""
    series = [f"{{__name__=m,id={i}}} 1000:1.0 2000:2.0 3000:3.0" for i in range(10)]
    first = govern(engine(HASH_RULES), *series)
    second = govern(engine(HASH_RULES), *series)
    assert first == second == [series[i] for i in (0, 2, 3, 7, 8)]


@settings(max_examples=10, deadline=None)
@given(rate=st.sampled_from([0.1, 0.25, 0.5, 0.9]), prefix=st.text("abcxyz-", max_size=5))
def test_hash_sampling_keeps_about_the_rate_of_the_series(rate: float, prefix: str) -> None:
    """Of 5,000 distinct series, the kept fraction is within 5 standard deviations of the
    rate."""
    e = engine(f"rules: [{{name: h, action: sample, sample: {{method: hash, rate: {rate}}}}}]")
    n = 5000
    governed = prw.govern(
        e, request(*(f"{{__name__=m,id={prefix}{i}}} 1000:1.0" for i in range(n)))
    )
    assert abs(governed.series / n - rate) <= 5 * math.sqrt(rate * (1 - rate) / n)


def test_head_sampling_keeps_one_in_n_per_series_across_requests() -> None:
    """`head` keeps the 1st, (n+1)th, (2n+1)th ... datapoint of each series; each series counts
    on its own and the count continues in the next request."""
    e = engine("rules: [{name: head, action: sample, sample: {method: head, n: 3}}]")
    assert govern(
        e,
        "{__name__=m,s=a} 1:1.0 2:2.0 3:3.0 4:4.0 5:5.0 6:6.0 7:7.0",
        "{__name__=m,s=b} 1:1.0 2:2.0",
    ) == ["{__name__=m,s=a} 1:1.0 4:4.0 7:7.0", "{__name__=m,s=b} 1:1.0"]
    assert govern(
        e,
        "{__name__=m,s=a} 8:8.0 9:9.0 10:10.0 11:11.0",
        "{__name__=m,s=b} 3:3.0 4:4.0",
    ) == ["{__name__=m,s=a} 10:10.0", "{__name__=m,s=b} 4:4.0"]
    assert e.stats["head"] == RuleStats(input=15, output=6, dropped=9, last_match=0.0)


# ---- transform -------------------------------------------------------------------------------

TRANSFORMS = [
    (
        "{op: set, label: env, value: 'prod-${region}'}",
        "{__name__=m,region=eu} 1:1.0",
        "{__name__=m,env=prod-eu,region=eu} 1:1.0",
    ),
    (
        "{op: set, label: metric, value: '${__name__}_x'}",
        "{__name__=m,region=eu} 1:1.0",
        "{__name__=m,metric=m_x,region=eu} 1:1.0",
    ),
    (  # a reference to a missing label is empty
        "{op: set, label: env, value: 'prod-${zone}'}",
        "{__name__=m,region=eu} 1:1.0",
        "{__name__=m,env=prod-,region=eu} 1:1.0",
    ),
    (  # a label set to an empty value is removed
        "{op: set, label: region, value: ''}",
        "{__name__=m,job=a,region=eu} 1:1.0",
        "{__name__=m,job=a} 1:1.0",
    ),
    (
        "{op: remove, labels: [pod, uid]}",
        "{__name__=m,job=a,pod=p,uid=u} 1:1.0",
        "{__name__=m,job=a} 1:1.0",
    ),
    (
        "{op: rename, source: instance, label: host}",
        "{__name__=m,instance=i:9100} 1:1.0",
        "{__name__=m,host=i:9100} 1:1.0",
    ),
    (  # nothing to rename
        "{op: rename, source: instance, label: host}",
        "{__name__=m,job=a} 1:1.0",
        "{__name__=m,job=a} 1:1.0",
    ),
    (
        "{op: copy, source: job, label: service}",
        "{__name__=m,job=a} 1:1.0",
        "{__name__=m,job=a,service=a} 1:1.0",
    ),
    (
        "{op: replace, label: path, regex: '/users/([0-9]+)', replacement: '/u/$1'}",
        "{__name__=m,path=/api/users/42/posts} 1:1.0",
        "{__name__=m,path=/api/u/42/posts} 1:1.0",
    ),
    (  # every occurrence; ${1} is group 1 too
        "{op: replace, label: v, regex: '(a+)', replacement: '${1}x'}",
        "{__name__=m,v=baabab} 1:1.0",
        "{__name__=m,v=baaxbaxb} 1:1.0",
    ),
    (
        "{op: extract, source: pod, regex: '^(.*)-([a-z0-9]+)$', label: deployment, group: 1}",
        "{__name__=m,pod=web-api-7f9c} 1:1.0",
        "{__name__=m,deployment=web-api,pod=web-api-7f9c} 1:1.0",
    ),
    (
        "{op: extract, source: pod, regex: '^(.*)-([a-z0-9]+)$', label: hash, group: 2}",
        "{__name__=m,pod=web-api-7f9c} 1:1.0",
        "{__name__=m,hash=7f9c,pod=web-api-7f9c} 1:1.0",
    ),
    (  # no match: nothing set
        "{op: extract, source: pod, regex: '^(.*)-([a-z0-9]+)$', label: deployment, group: 1}",
        "{__name__=m,pod=web} 1:1.0",
        "{__name__=m,pod=web} 1:1.0",
    ),
    (
        "{op: lower, label: method}",
        "{__name__=m,method=GET} 1:1.0",
        "{__name__=m,method=get} 1:1.0",
    ),
    ("{op: upper, label: region}", "{__name__=m,region=eu} 1:1.0", "{__name__=m,region=EU} 1:1.0"),
    (
        "{op: concat, sources: [namespace, pod], label: workload, separator: /}",
        "{__name__=m,namespace=prod,pod=web} 1:1.0",
        "{__name__=m,namespace=prod,pod=web,workload=prod/web} 1:1.0",
    ),
    (
        "{op: map, source: code, label: class, table: {'200': ok, '500': error}, default: other}",
        "{__name__=m,code=500} 1:1.0",
        "{__name__=m,class=error,code=500} 1:1.0",
    ),
    (
        "{op: map, source: code, label: class, table: {'200': ok, '500': error}, default: other}",
        "{__name__=m,code=404} 1:1.0",
        "{__name__=m,class=other,code=404} 1:1.0",
    ),
    (  # no default: nothing set
        "{op: map, source: code, label: class, table: {'200': ok}}",
        "{__name__=m,code=404} 1:1.0",
        "{__name__=m,code=404} 1:1.0",
    ),
    (  # CRC-32 of "alice" is 0x278ebc47; 0x278ebc47 % 16 == 7
        "{op: hash_mod, source: user_id, label: shard, modulus: 16}",
        "{__name__=m,user_id=alice} 1:1.0",
        "{__name__=m,shard=7,user_id=alice} 1:1.0",
    ),
    (
        "{op: rename_metric, value: 'legacy_${__name__}'}",
        "{__name__=m,job=a} 1:1.0",
        "{__name__=legacy_m,job=a} 1:1.0",
    ),
    (
        "{op: rename_metric, value: '${job}:${__name__}'}",
        "{__name__=m,job=a} 1:1.0",
        "{__name__=a:m,job=a} 1:1.0",
    ),
    (
        "{op: set, label: tier, value: gold, when: [{label: team, equals: payments}]}",
        "{__name__=m,team=payments} 1:1.0",
        "{__name__=m,team=payments,tier=gold} 1:1.0",
    ),
    (
        "{op: set, label: tier, value: gold, when: [{label: team, equals: payments}]}",
        "{__name__=m,team=search} 1:1.0",
        "{__name__=m,team=search} 1:1.0",
    ),
]


@pytest.mark.parametrize(
    ("op", "series", "expected"),
    TRANSFORMS,
    ids=[f"{i:02}-{t[0].split(',')[0].removeprefix('{op: ')}" for i, t in enumerate(TRANSFORMS)],
)
def test_transform_op(op: str, series: str, expected: str) -> None:
    """Each transform op on one series: the exact label set that goes on, sorted, __name__
    first."""
    e = engine(f"rules: [{{name: t, action: transform, transform: [{op}]}}]")
    assert govern(e, series) == [expected]
    assert e.stats["t"] == RuleStats(input=1, output=1, last_match=0.0)


def test_transformed_labels_go_out_sorted_with_the_name_first() -> None:
    """Labels sent in any order come out in Prometheus order: sorted by name."""
    e = engine(
        "rules: [{name: t, action: transform, transform: [{op: set, label: b, value: '1'}]}]"
    )
    assert govern(e, "{zone=a,__name__=m,app=x} 1:1.0") == ["{__name__=m,app=x,b=1,zone=a} 1:1.0"]


def test_ops_run_in_order_and_when_sees_the_labels_as_left_by_earlier_ops() -> None:
    """A `when` condition is checked against the labels the previous ops produced."""
    e = engine("""
        rules:
          - name: t
            action: transform
            transform:
              - {op: map, source: service, label: team, table: {checkout: payments}}
              - {op: set, label: tier, value: gold, when: [{label: team, equals: payments}]}
              - {op: remove, labels: [service]}
    """)
    assert govern(
        e, "{__name__=m,service=checkout} 1:1.0", "{__name__=m,service=search} 1:1.0"
    ) == [
        "{__name__=m,team=payments,tier=gold} 1:1.0",
        "{__name__=m} 1:1.0",
    ]


@pytest.mark.parametrize("replacement", [r"C:\temp", r"C:\path"])
def test_a_replacement_is_literal_apart_from_group_references(replacement: str) -> None:
    """Only `$1` / `${1}` are special in a replacement: a backslash (a Windows path) is written
    as it is, whatever follows it, and evaluating the rule does not raise."""
    e = engine(f"""
        rules:
          - name: t
            action: transform
            transform: [{{op: replace, label: dir, regex: '/(tmp)', replacement: '{replacement}'}}]
    """)
    assert govern(e, "{__name__=m,dir=/tmp} 1:1.0") == [f"{{__name__=m,dir={replacement}}} 1:1.0"]


# ---- classify --------------------------------------------------------------------------------


def test_classify_first_chain_whose_conditions_hold_wins_then_tables() -> None:
    """Chains are tried in order and only the first that holds sets its labels (templates
    rendered against the labels before it); then every table maps its source to its target, or
    sets its default."""
    e = engine("""
        rules:
          - name: c
            action: classify
            classify:
              chains:
                - when: [{label: namespace, regex: "prod-.*"}, {label: team, equals: payments}]
                  set: {tier: critical, pager: "yes"}
                - when: [{label: namespace, regex: "prod-.*"}]
                  set: {tier: production, where: "${namespace}/${__name__}"}
                - when: []
                  set: {tier: other}
              tables:
                - {source: service, target: owner, values: {checkout: payments, search: discovery},
                   default: unknown}
    """)
    assert govern(
        e,
        "{__name__=m,namespace=prod-eu,service=checkout,team=payments} 1:1.0",
        "{__name__=m,namespace=prod-eu,service=search,team=search} 1:1.0",
        "{__name__=m,namespace=dev,service=cart} 1:1.0",
    ) == [
        "{__name__=m,namespace=prod-eu,owner=payments,pager=yes,service=checkout,team=payments,"
        "tier=critical} 1:1.0",
        "{__name__=m,namespace=prod-eu,owner=discovery,service=search,team=search,tier=production,"
        "where=prod-eu/m} 1:1.0",
        "{__name__=m,namespace=dev,owner=unknown,service=cart,tier=other} 1:1.0",
    ]
    assert e.stats["c"] == RuleStats(input=3, output=3, last_match=0.0)


# ---- evaluation order ------------------------------------------------------------------------


def test_later_rules_see_the_labels_transforms_gave() -> None:
    """A transform continues; the drop after it matches on the label the transform set."""
    e = engine("""
        rules:
          - name: env-from-ns
            action: transform
            transform: [{op: extract, source: ns, regex: "^(dev|prod)-", label: env}]
          - {name: drop-dev, match: {labels: [{label: env, equals: dev}]}, action: drop}
    """)
    assert govern(e, "{__name__=m,ns=dev-a} 1:1.0", "{__name__=m,ns=prod-a} 1:1.0") == [
        "{__name__=m,env=prod,ns=prod-a} 1:1.0"
    ]
    assert e.stats["drop-dev"] == RuleStats(input=1, dropped=1, last_match=0.0)


def test_the_first_terminal_rule_decides() -> None:
    """Once a terminal rule matched, the rules after it (terminal or not) do not see the
    series."""
    e = engine("""
        rules:
          - {name: keep-all, match: {name: m}, action: sample, sample: {method: head, n: 1}}
          - {name: drop-all, action: drop}
          - {name: tag, action: transform, transform: [{op: set, label: x, value: "1"}]}
    """)
    assert govern(e, "{__name__=m} 1:1.0", "{__name__=other} 1:1.0") == ["{__name__=m} 1:1.0"]
    assert e.stats["keep-all"] == RuleStats(input=1, output=1, last_match=0.0)
    assert e.stats["drop-all"] == RuleStats(input=1, dropped=1, last_match=0.0)
    assert e.stats["tag"] == RuleStats()


def test_a_renamed_metric_is_matched_by_later_rules_under_its_new_name() -> None:
    """After rename_metric, later rules match the new name and no longer the old one."""
    e = engine("""
        rules:
          - {name: rename, match: {name: old}, action: transform,
             transform: [{op: rename_metric, value: new}]}
          - {name: tag-old, match: {name: old}, action: transform,
             transform: [{op: set, label: was, value: old}]}
          - {name: tag-new, match: {name: new}, action: transform,
             transform: [{op: set, label: is, value: new}]}
          - {name: sample-new, match: {name: new}, action: sample, sample: {method: head, n: 2}}
    """)
    assert govern(e, "{__name__=old,a=1} 1:1.0 2:2.0 3:3.0") == [
        "{__name__=new,a=1,is=new} 1:1.0 3:3.0"
    ]
    assert e.stats["tag-old"] == RuleStats()
    assert e.stats["sample-new"] == RuleStats(input=3, output=2, dropped=1, last_match=0.0)


# ---- downsample in virtual time --------------------------------------------------------------

DOWNSAMPLE = "rules: [{{name: ds, action: downsample, downsample: {{interval: 10s, method: {}}}}}]"


@pytest.mark.parametrize(
    ("method", "value"),
    [
        ("avg", 2.0),
        ("min", 1.0),
        ("max", 3.0),
        ("sum", 6.0),
        ("count", 3.0),
        ("first", 3.0),
        ("last", 2.0),
    ],
)
def test_downsample_emits_one_point_per_window_stamped_with_its_end(
    method: str, value: float
) -> None:
    """Points 3, 1, 2 at 1 s, 4 s and 7 s fall in the window [0 s, 10 s): the series' points are
    absorbed, and the window's one value is emitted at 10 s."""
    clock = Clock(8000)
    e = engine(DOWNSAMPLE.format(method), clock)
    assert govern(e, "{__name__=m,a=1} 1000:3.0 4000:1.0 7000:2.0") == []
    clock.ms = 12_000
    assert due(e) == [f"{{__name__=m,a=1}} 10000:{value!r}"]
    assert e.stats["ds"] == RuleStats(input=3, output=1, last_match=8.0)


def test_a_window_is_emitted_lateness_after_it_ends_and_only_once() -> None:
    """Window [0 s, 10 s) is not emitted at 11.999 s; at 12 s (LATENESS_MS = 2 s after its end)
    it is, once. Each series has its own windows."""
    assert LATENESS_MS == 2000
    clock = Clock(5000)
    e = engine(DOWNSAMPLE.format("avg"), clock)
    govern(e, "{__name__=m,a=1} 1000:1.0 3000:3.0", "{__name__=m,a=2} 2000:5.0")
    clock.ms = 11_999
    assert due(e) == []
    clock.ms = 12_000
    assert due(e) == ["{__name__=m,a=1} 10000:2.0", "{__name__=m,a=2} 10000:5.0"]
    assert due(e) == []
    assert due(e, force=True) == []


def test_a_point_for_an_emitted_window_is_dropped() -> None:
    """After window [0 s, 10 s) was emitted, a late point for it is not forwarded and does not
    open the window again: nothing more comes out, even when every window is forced out."""
    clock = Clock(5000)
    e = engine(DOWNSAMPLE.format("sum"), clock)
    govern(e, "{__name__=m} 1000:1.0")
    clock.ms = 12_000
    assert due(e) == ["{__name__=m} 10000:1.0"]
    assert govern(e, "{__name__=m} 9000:5.0") == []
    assert due(e, force=True) == []


def test_a_late_point_is_counted_as_dropped() -> None:
    """docs/rules.md: "a point for a window already emitted is dropped and counted". The count
    is the rule's dropped datapoints (governor_rule_dropped_datapoints_total): a point for window
    [0 s, 10 s) after it was emitted, and a point for it while [10 s, 20 s) is already open."""
    clock = Clock(5000)
    e = engine(DOWNSAMPLE.format("sum"), clock)
    govern(e, "{__name__=m} 1000:1.0")
    clock.ms = 12_000
    assert due(e) == ["{__name__=m} 10000:1.0"]
    govern(e, "{__name__=m} 9000:5.0")
    govern(e, "{__name__=m,b=1} 15000:1.0 5000:2.0")
    assert due(e, force=True) == ["{__name__=m,b=1} 20000:1.0"]
    assert e.stats["ds"].dropped == 2


def test_lttb_keeps_first_last_and_the_points_that_make_the_shape() -> None:
    """LTTB with points: 4 over 6 points keeps the first and the last and, of the two middle
    buckets [5, 1] and [1, 8], the point making the largest triangle: 5 and 8 (hand-computed
    areas: 13000 vs 5500, then 6000 vs 27000). Points keep their own timestamps."""
    clock = Clock(0)
    e = engine(
        "rules: [{name: ds, action: downsample, downsample: {interval: 10s, method: lttb, "
        "points: 4}}]",
        clock,
    )
    govern(e, "{__name__=m} 1000:0.0 2000:5.0 3000:1.0 4000:1.0 5000:8.0 6000:0.0")
    clock.ms = 12_000
    assert due(e) == ["{__name__=m} 1000:0.0 2000:5.0 5000:8.0 6000:0.0"]


def test_swinging_door_drops_points_within_the_deviation() -> None:
    """Deviation 0.5: 1.4 at 2 s and 2 at 3 s lie within 0.5 of a line from (1 s, 0) to
    (4 s, 3), so they are dropped; 0 at 5 s closes the door, so (4 s, 3) is kept; the last point
    is always kept."""
    clock = Clock(0)
    e = engine(
        "rules: [{name: ds, action: downsample, downsample: {interval: 10s, "
        "method: swinging_door, deviation: 0.5}}]",
        clock,
    )
    govern(e, "{__name__=m} 1000:0.0 2000:1.4 3000:2.0 4000:3.0 5000:0.0")
    clock.ms = 12_000
    assert due(e) == ["{__name__=m} 1000:0.0 4000:3.0 5000:0.0"]


def test_swinging_door_by_hand() -> None:
    """swinging_door over the same points directly, and the short cases: two points or fewer
    are kept as they are; a straight line keeps only its ends."""
    points = [(1000, 0.0), (2000, 1.4), (3000, 2.0), (4000, 3.0), (5000, 0.0)]
    assert swinging_door(points, 0.5) == [(1000, 0.0), (4000, 3.0), (5000, 0.0)]
    assert swinging_door([(1, 1.0), (2, 9.0)], 0.5) == [(1, 1.0), (2, 9.0)]
    assert swinging_door([(t, float(t)) for t in range(10)], 0.1) == [(0, 0.0), (9, 9.0)]


def test_downsample_keeps_no_series_state_between_windows() -> None:
    """Windows share the rule's boundaries and a series' state lives only in its open windows:
    once a window is emitted nothing of the series is kept, and a point for that window, however
    long after, is late (counted as dropped), never a second output for the same timestamp."""
    clock = Clock(1000)
    e = engine(
        "rules: [{name: ds, action: downsample, downsample: {interval: 10s, method: sum, "
        "staleness: 30s}}]",
        clock,
    )
    govern(e, "{__name__=m} 1000:1.0")
    clock.ms = 12_000
    assert due(e) == ["{__name__=m} 10000:1.0"]
    assert len(e._states["ds"]) == 0
    govern(e, "{__name__=m} 5000:2.0")  # late
    clock.ms = 72_001
    govern(e, "{__name__=m} 5000:4.0")  # still late
    assert due(e, force=True) == []
    assert e.stats["ds"].dropped == 2


@settings(max_examples=50, deadline=None)
@given(
    value=st.floats(-1e12, 1e12, allow_nan=False),
    times=st.lists(st.integers(0, 9_999), min_size=1, max_size=30, unique=True),
)
def test_downsample_avg_of_a_constant_series_is_the_constant(
    value: float, times: list[int]
) -> None:
    """Whatever the number of points and their times in the window, avg of a constant is the
    constant (to rounding: the mean is a floating-point sum divided by the count)."""
    e = engine(DOWNSAMPLE.format("avg"), Clock(0))
    samples = " ".join(f"{t}:{value!r}" for t in sorted(times))
    govern(e, f"{{__name__=m}} {samples}")
    [emitted] = e.due(force=True)
    assert emitted.points == [(10_000, pytest.approx(value, rel=1e-12, abs=0.0))]


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), max_size=60),
    n=st.integers(2, 20),
)
def test_lttb_keeps_first_last_and_min_n_len_points(values: list[float], n: int) -> None:
    """lttb(points, n) returns min(n, len) of the points, in time order, the first and the last
    among them."""
    points = [(1000 * i, v) for i, v in enumerate(values)]
    out = lttb(points, n)
    assert len(out) == min(n, len(points))
    assert [t for t, _ in out] == sorted({t for t, _ in out})
    assert set(out) <= set(points)
    if points:
        assert (out[0], out[-1]) == (points[0], points[-1])


# ---- aggregate -------------------------------------------------------------------------------


def aggregate(settings_: str, clock: Clock | None = None) -> RuleEngine:
    return engine(f"rules: [{{name: agg, action: aggregate, aggregate: {{{settings_}}}}}]", clock)


def test_aggregate_by_keeps_only_the_listed_labels() -> None:
    """`by: [job]`: series are summed per input name and job; the other labels are gone; the
    output is named <name>:<function> and stamped with the window's end."""
    e = aggregate("interval: 10s, by: [job]")
    assert (
        govern(
            e,
            "{__name__=m,env=prod,instance=1,job=a} 1000:1.0",
            "{__name__=m,env=prod,instance=2,job=a} 2000:2.0",
            "{__name__=m,env=prod,instance=1,job=b} 3000:4.0",
        )
        == []
    )
    assert due(e, force=True) == [
        "{__name__=m:sum,job=a} 10000:3.0",
        "{__name__=m:sum,job=b} 10000:4.0",
    ]
    assert e.stats["agg"] == RuleStats(input=3, output=2, last_match=0.0)


def test_aggregate_without_drops_only_the_listed_labels() -> None:
    """`without: [instance]`: every other label is kept."""
    e = aggregate("interval: 10s, without: [instance]")
    govern(
        e,
        "{__name__=m,env=prod,instance=1,job=a} 1000:1.0",
        "{__name__=m,env=prod,instance=2,job=a} 2000:2.0",
        "{__name__=m,env=prod,instance=1,job=b} 3000:4.0",
    )
    assert due(e, force=True) == [
        "{__name__=m:sum,env=prod,job=a} 10000:3.0",
        "{__name__=m:sum,env=prod,job=b} 10000:4.0",
    ]


def test_aggregate_gauge_functions() -> None:
    """Over 2, 9, 4, 5, 5, 7, 4, 4 (the 7 has the latest timestamp): sum 40, avg 5, min 2, max 9,
    count 8, last 7 (by timestamp, not arrival), stddev 2 (population). Several functions: each
    output is <name>_<function>."""
    e = aggregate("interval: 10s, by: [], functions: [sum, avg, min, max, count, last, stddev]")
    govern(
        e,
        *(f"{{__name__=m,i={i}}} {1000 + i}:{v}" for i, v in enumerate([2, 9, 4, 5, 5])),
        "{__name__=m,i=5} 9000:7.0",
        "{__name__=m,i=6} 2000:4.0",
        "{__name__=m,i=7} 3000:4.0",
    )
    assert due(e, force=True) == [
        "{__name__=m_sum} 10000:40.0",
        "{__name__=m_avg} 10000:5.0",
        "{__name__=m_min} 10000:2.0",
        "{__name__=m_max} 10000:9.0",
        "{__name__=m_count} 10000:8.0",
        "{__name__=m_last} 10000:7.0",
        "{__name__=m_stddev} 10000:2.0",
    ]


def test_aggregate_quantiles_interpolate_between_ranks() -> None:
    """quantile(q) over 1..6: linear interpolation between closest ranks, q x (n - 1) = 2.5 and
    4.5, so 3.5 and 5.5; each output carries a `quantile` label."""
    e = aggregate("interval: 10s, by: [job], functions: [quantile(0.5), quantile(0.9)]")
    govern(e, *(f"{{__name__=m,job=a,i={v}}} 1000:{v}" for v in [6, 1, 5, 2, 4, 3]))
    assert due(e, force=True) == [
        "{__name__=m_quantile,job=a,quantile=0.5} 10000:3.5",
        "{__name__=m_quantile,job=a,quantile=0.9} 10000:5.5",
    ]


def test_a_counter_reset_counts_from_zero() -> None:
    """Counter values 10, 20, 5, 15: the first only sets the baseline; then increases 10, 5 (a
    drop is a restart: it counted up from 0) and 10. No negative step, no spike: increase 25,
    rate 25 / 10 s, and `sum` (the running total of increases) 25."""
    e = aggregate("interval: 10s, by: [], functions: [sum, increase, rate, count]")
    govern(e, "{__name__=req_total,pod=a} 1000:10.0 2000:20.0 3000:5.0 4000:15.0")
    assert due(e, force=True) == [
        "{__name__=req_total_sum} 10000:25.0",
        "{__name__=req_total_increase} 10000:25.0",
        "{__name__=req_total_rate} 10000:2.5",
        "{__name__=req_total_count} 10000:4.0",
    ]


def test_counter_sum_is_a_running_total_across_windows() -> None:
    """`sum` of a counter only goes up: window [0, 10 s) has increases 10 (from 10 to 20), window
    [10 s, 20 s) 5 + 5 (20 to 25 to 30), so the outputs are 10, then 20."""
    clock = Clock(0)
    e = aggregate("interval: 10s, by: []", clock)
    govern(e, "{__name__=req_total,pod=a} 1000:10.0 2000:20.0 11000:25.0 12000:30.0")
    clock.ms = 12_000
    assert due(e) == ["{__name__=req_total:sum} 10000:10.0"]
    clock.ms = 22_000
    assert due(e) == ["{__name__=req_total:sum} 20000:20.0"]


def test_counter_increase_is_summed_over_the_group() -> None:
    """Two pods of a group, one of them restarting: increases 5 + 3 and 4 (from 0), total 12."""
    e = aggregate("interval: 10s, by: [job], functions: [increase]")
    govern(
        e,
        "{__name__=req_total,job=a,pod=1} 1000:100.0 2000:105.0 3000:108.0",
        "{__name__=req_total,job=a,pod=2} 1000:50.0 2000:4.0",
    )
    assert due(e, force=True) == ["{__name__=req_total:increase,job=a} 10000:12.0"]


def test_input_kind_overrides_the_name() -> None:
    """`input_kind: counter` treats any name as a counter; `input_kind: gauge` sums the raw values
    even of a _total name."""
    as_counter = aggregate("interval: 10s, by: [], input_kind: counter, functions: [increase]")
    govern(as_counter, "{__name__=temp} 1000:10.0 2000:12.0")
    assert due(as_counter, force=True) == ["{__name__=temp:increase} 10000:2.0"]
    as_gauge = aggregate("interval: 10s, by: [], input_kind: gauge")
    govern(as_gauge, "{__name__=req_total} 1000:10.0 2000:12.0")
    assert due(as_gauge, force=True) == ["{__name__=req_total:sum} 10000:22.0"]


def test_counter_treatment_is_per_rule() -> None:
    """Two aggregate rules over one metric name, one with `input_kind: counter`, the other with
    `input_kind: gauge`: the gauge rule sums the raw values (1 + 2 = 3), whatever the other rule
    decided about the same name."""
    e = engine("""
        rules:
          - name: as-counter
            match: {name: foo, labels: [{label: env, equals: a}]}
            action: aggregate
            aggregate: {interval: 10s, by: [], input_kind: counter, functions: [increase]}
          - name: as-gauge
            match: {name: foo, labels: [{label: env, equals: b}]}
            action: aggregate
            aggregate: {interval: 10s, by: [], input_kind: gauge, functions: [sum]}
    """)
    govern(e, "{__name__=foo,env=a} 1000:1.0 2000:3.0", "{__name__=foo,env=b} 1000:1.0 2000:2.0")
    assert due(e, force=True) == [
        "{__name__=foo:increase} 10000:2.0",
        "{__name__=foo:sum} 10000:3.0",
    ]


def test_counter_staleness_forgets_the_baseline() -> None:
    """A counter series not seen for `staleness` (30 s) is forgotten: its next point only sets a
    new baseline (increase 0, not 50 - 10)."""
    clock = Clock(1000)
    e = aggregate("interval: 10s, by: [], functions: [increase], staleness: 30s", clock)
    govern(e, "{__name__=req_total} 1000:10.0")
    clock.ms = 12_000
    assert due(e) == ["{__name__=req_total:increase} 10000:0.0"]
    clock.ms = 42_000
    assert due(e) == []
    govern(e, "{__name__=req_total} 41000:50.0")
    assert due(e, force=True) == ["{__name__=req_total:increase} 50000:0.0"]


def test_keep_input_forwards_the_originals_too() -> None:
    """`keep_input: true`: the series go on unchanged and are aggregated as well."""
    e = aggregate("interval: 10s, by: [job], keep_input: true")
    assert (
        govern(e, "{__name__=m,job=a,pod=1} 1000:1.0", "{__name__=m,job=a,pod=2} 1000:2.0") is None
    )
    assert due(e, force=True) == ["{__name__=m:sum,job=a} 10000:3.0"]
    assert e.stats["agg"] == RuleStats(input=2, output=3, last_match=0.0)


def test_output_name_is_a_template() -> None:
    """`output_name` renders ${__name__} and the group's labels; with several functions each
    output is <output_name>_<function>."""
    one = aggregate("interval: 10s, by: [job], output_name: '${__name__}:by_${job}'")
    govern(one, "{__name__=m,job=a} 1000:1.0")
    assert due(one, force=True) == ["{__name__=m:by_a,job=a} 10000:1.0"]
    many = aggregate("interval: 10s, by: [job], output_name: 'agg_${job}', functions: [min, max]")
    govern(many, "{__name__=m,job=a} 1000:1.0 2000:3.0")
    assert due(many, force=True) == [
        "{__name__=agg_a_min,job=a} 10000:1.0",
        "{__name__=agg_a_max,job=a} 10000:3.0",
    ]


def test_aggregate_windows_are_emitted_lateness_after_their_end() -> None:
    """An aggregate window [0 s, 10 s) comes out at 12 s, not before; a point for it after that
    is late and not aggregated anywhere."""
    clock = Clock(0)
    e = aggregate("interval: 10s, by: []", clock)
    govern(e, "{__name__=m} 1000:1.0")
    clock.ms = 11_999
    assert due(e) == []
    clock.ms = 12_000
    assert due(e) == ["{__name__=m:sum} 10000:1.0"]
    assert govern(e, "{__name__=m} 9000:5.0") == []
    assert due(e, force=True) == []


def test_a_late_aggregate_point_is_counted_as_dropped() -> None:
    """Like downsample: a point for an aggregate window already emitted is dropped and counted
    in the rule's dropped datapoints."""
    clock = Clock(0)
    e = aggregate("interval: 10s, by: []", clock)
    govern(e, "{__name__=m} 1000:1.0")
    clock.ms = 12_000
    due(e)
    govern(e, "{__name__=m} 9000:5.0")
    assert e.stats["agg"].dropped == 1


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.integers(-1000, 1000), min_size=1, max_size=40))
def test_aggregate_sum_over_a_window_is_the_sum_of_the_inputs(values: list[int]) -> None:
    """Any number of gauge series, one point each in one window: `sum` is their sum."""
    e = aggregate("interval: 10s, by: []")
    govern(e, *(f"{{__name__=m,i={i}}} {1000 + i}:{v}" for i, v in enumerate(values)))
    assert due(e, force=True) == [f"{{__name__=m:sum}} 10000:{float(sum(values))!r}"]


# ---- OTLP ------------------------------------------------------------------------------------

SCOPE = InstrumentationScope(name="lib", version="1")


def kv(key: str, value: str | int | float | bool) -> KeyValue:
    """An attribute of the value's own type."""
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def point(ts_ms: int, value: float, **attributes: str | int | float | bool) -> NumberDataPoint:
    return NumberDataPoint(
        time_unix_nano=ts_ms * 1_000_000,
        as_double=value,
        attributes=[kv(k, v) for k, v in attributes.items()],
    )


def gauge(name: str, *points: NumberDataPoint, unit: str = "", description: str = "") -> Metric:
    return Metric(name=name, unit=unit, description=description, gauge=Gauge(data_points=points))


def counter(name: str, *points: NumberDataPoint, unit: str = "", description: str = "") -> Metric:
    data = Sum(data_points=points, is_monotonic=True, aggregation_temporality=CUMULATIVE)
    return Metric(name=name, unit=unit, description=description, sum=data)


def resource_metrics(resource: dict[str, str | int], *metrics: Metric) -> ResourceMetrics:
    return ResourceMetrics(
        resource=Resource(attributes=[kv(k, v) for k, v in resource.items()]),
        scope_metrics=[ScopeMetrics(scope=SCOPE, metrics=metrics)],
    )


def otlp_request(*rms: ResourceMetrics) -> ExportMetricsServiceRequest:
    return ExportMetricsServiceRequest(resource_metrics=rms)


def test_otlp_drop_by_name() -> None:
    """A metric whose name a drop rule matches goes with all its points; govern returns the
    number of datapoints removed; the other metrics are untouched."""
    e = engine("rules: [{name: d, match: {name: 'debug_.*'}, action: drop}]", pipeline="otlp")
    req = otlp_request(
        resource_metrics(
            {"service.name": "a"},
            gauge("debug_x", point(1000, 1.0), point(2000, 2.0)),
            gauge("up", point(1000, 1.0)),
        )
    )
    assert otlp.govern(e, req) == 2
    assert req == otlp_request(
        resource_metrics({"service.name": "a"}, gauge("up", point(1000, 1.0)))
    )


def test_otlp_request_no_rule_touches_is_unchanged() -> None:
    """govern returns None and leaves the request as it was when no rule applies."""
    e = engine("rules: [{name: d, match: {name: 'debug_.*'}, action: drop}]", pipeline="otlp")
    req = otlp_request(resource_metrics({"service.name": "a"}, gauge("up", point(1000, 1.0))))
    before = ExportMetricsServiceRequest()
    before.CopyFrom(req)
    assert otlp.govern(e, req) is None
    assert req == before


def test_otlp_transform_keeps_the_type_of_untouched_attributes() -> None:
    """Transform ops see attributes as text; the attributes they leave as they were keep their
    type (int, double, bool); changed and new ones are strings."""
    e = engine(
        """
        rules:
          - name: t
            action: transform
            transform: [{op: set, label: team, value: payments}, {op: upper, label: env}]
        """,
        pipeline="otlp",
    )
    req = otlp_request(
        resource_metrics({}, gauge("m", point(1000, 1.0, code=200, env="dev", ratio=0.5, ok=True)))
    )
    assert otlp.govern(e, req) == 0
    [dp] = req.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points
    assert list(dp.attributes) == [
        kv("code", 200),
        kv("env", "DEV"),
        kv("ratio", 0.5),
        kv("ok", True),
        kv("team", "payments"),
    ]


def test_otlp_rename_metric_moves_points_to_a_new_metric_in_the_same_scope() -> None:
    """rename_metric on some points of a metric moves them to a metric of the new name in the same
    scope, with the same unit, description and kind (a monotonic cumulative sum stays one); the
    other points stay where they were."""
    e = engine(
        """
        rules:
          - name: r
            match: {labels: [{label: a, equals: "1"}]}
            action: transform
            transform: [{op: rename_metric, value: "legacy_${__name__}"}]
        """,
        pipeline="otlp",
    )
    req = otlp_request(
        resource_metrics(
            {"service.name": "a"},
            counter(
                "m", point(1000, 1.0, a="1"), point(1000, 2.0, a="2"), unit="s", description="d"
            ),
        )
    )
    assert otlp.govern(e, req) == 0
    assert req == otlp_request(
        resource_metrics(
            {"service.name": "a"},
            counter("m", point(1000, 2.0, a="2"), unit="s", description="d"),
            counter("legacy_m", point(1000, 1.0, a="1"), unit="s", description="d"),
        )
    )


def test_otlp_resource_matchers() -> None:
    """A rule with `resource` matchers applies to the points of matching resources only."""
    e = engine(
        """
        rules:
          - name: drop-checkout
            match: {resource: [{label: service.name, equals: checkout}]}
            action: drop
        """,
        pipeline="otlp",
    )
    req = otlp_request(
        resource_metrics({"service.name": "checkout"}, gauge("m", point(1000, 1.0))),
        resource_metrics({"service.name": "search"}, gauge("m", point(1000, 2.0))),
    )
    assert otlp.govern(e, req) == 1
    assert req == otlp_request(
        resource_metrics({"service.name": "checkout"}),
        resource_metrics({"service.name": "search"}, gauge("m", point(1000, 2.0))),
    )


def test_otlp_histograms_are_skipped_by_downsample_and_aggregate() -> None:
    """A histogram that an aggregate and a downsample rule match is touched by neither: it goes on
    unchanged, each rule counts it as skipped (not as input, and not as a match: a rule that only
    ever sees histograms stays never-matched), and the gauge next to it is absorbed by the first
    rule."""
    e = engine(
        """
        rules:
          - {name: agg, match: {name: "lat.*"}, action: aggregate,
             aggregate: {interval: 10s, by: []}}
          - {name: ds, match: {name: "lat.*"}, action: downsample,
             downsample: {interval: 10s, method: avg}}
        """,
        pipeline="otlp",
    )
    hist = Metric(
        name="latency",
        histogram=Histogram(
            aggregation_temporality=CUMULATIVE,
            data_points=[
                HistogramDataPoint(
                    time_unix_nano=1_000_000_000,
                    count=2,
                    sum=3.0,
                    bucket_counts=[1, 1],
                    explicit_bounds=[1.0],
                ),
                HistogramDataPoint(
                    time_unix_nano=2_000_000_000,
                    count=1,
                    sum=0.5,
                    bucket_counts=[1, 0],
                    explicit_bounds=[1.0],
                ),
            ],
        ),
    )
    req = otlp_request(resource_metrics({}, hist, gauge("latency_now", point(1000, 1.0))))
    assert otlp.govern(e, req) == 1
    assert req == otlp_request(resource_metrics({}, hist))
    assert e.stats["agg"] == RuleStats(input=1, skipped=2, last_match=0.0)
    assert e.stats["ds"] == RuleStats(skipped=2, last_match=None)


def test_otlp_aggregate_keeps_the_resource_attributes_all_inputs_share() -> None:
    """Points of two resources aggregated together go out under one resource holding the
    attributes both had (host differs, so it is gone), in the inputs' scope, with the metric's
    unit and description, stamped with the window's end."""
    e = engine(
        "rules: [{name: agg, action: aggregate, aggregate: {interval: 10s, by: [job]}}]",
        pipeline="otlp",
    )
    req = otlp_request(
        resource_metrics(
            {"service.name": "a", "region": "eu", "host": "1"},
            gauge("m", point(1000, 1.0, job="x", pod="p1"), unit="By", description="d"),
        ),
        resource_metrics(
            {"service.name": "a", "region": "eu", "host": "2"},
            gauge("m", point(2000, 2.0, job="x", pod="p2"), unit="By", description="d"),
        ),
    )
    assert otlp.govern(e, req) == 2
    assert req == otlp_request(
        resource_metrics({"service.name": "a", "region": "eu", "host": "1"}),
        resource_metrics({"service.name": "a", "region": "eu", "host": "2"}),
    )
    data, metrics, points = otlp.encode(e.due(force=True))
    assert (metrics, points) == (1, 1)
    assert ExportMetricsServiceRequest.FromString(data) == otlp_request(
        resource_metrics(
            {"region": "eu", "service.name": "a"},
            gauge("m:sum", point(10_000, 3.0, job="x"), unit="By", description="d"),
        )
    )


def test_otlp_aggregate_of_one_resource_keeps_that_resource_as_it_was() -> None:
    """When all inputs share one resource, the output goes under that exact resource (typed
    attributes stay typed); `output_kind: counter` is a monotonic cumulative sum."""
    e = engine(
        """
        rules:
          - {name: agg, action: aggregate,
             aggregate: {interval: 10s, by: [], functions: [increase], output_kind: counter}}
        """,
        pipeline="otlp",
    )
    req = otlp_request(
        resource_metrics(
            {"service.name": "a", "pid": 42},
            counter("req", point(1000, 10.0, pod="1"), point(1000, 5.0, pod="2")),
        ),
        resource_metrics(
            {"service.name": "a", "pid": 42},
            counter("req", point(2000, 13.0, pod="1"), point(2000, 9.0, pod="2")),
        ),
    )
    otlp.govern(e, req)
    out = ExportMetricsServiceRequest.FromString(otlp.encode(e.due(force=True))[0])
    [rm] = out.resource_metrics
    assert list(rm.resource.attributes) == [kv("service.name", "a"), kv("pid", 42)]
    [sm] = rm.scope_metrics
    assert sm.scope == SCOPE
    [m] = sm.metrics
    assert (m.name, m.sum.is_monotonic, m.sum.aggregation_temporality) == (
        "req:increase",
        True,
        CUMULATIVE,
    )
    [dp] = m.sum.data_points
    assert (dp.time_unix_nano, dp.as_double, list(dp.attributes)) == (10_000_000_000, 7.0, [])


def test_otlp_apply_recounts_what_it_changed() -> None:
    """apply() re-encodes a request the rules changed and recounts datapoints and metrics; a
    request they did not change is returned as it was admitted."""
    e = engine("rules: [{name: d, match: {name: 'debug_.*'}, action: drop}]", pipeline="otlp")
    req = otlp_request(
        resource_metrics({}, gauge("debug_x", point(1000, 1.0)), gauge("up", point(1000, 1.0)))
    )
    admitted = otlp_codec.admit(req.SerializeToString())
    assert (admitted.datapoints, admitted.metrics) == (2, 2)
    after = otlp.apply(e, admitted)
    assert (after.datapoints, after.metrics) == (1, 1)
    assert ExportMetricsServiceRequest.FromString(after.data) == otlp_request(
        resource_metrics({}, gauge("up", point(1000, 1.0)))
    )
    untouched = otlp_codec.admit(
        otlp_request(resource_metrics({}, gauge("up"))).SerializeToString()
    )
    assert otlp.apply(e, untouched) is untouched


# ---- operating: stats, dead rules, reload, metrics -------------------------------------------


def test_stats_count_each_rules_input_output_and_drops() -> None:
    """Per rule: input = datapoints it matched, output = passed on or emitted, dropped = dropped
    or sampled away; last_match is the clock in seconds; a rule that never matched has zeros."""
    clock = Clock(5000)
    e = engine(
        """
        rules:
          - {name: tag, action: transform, transform: [{op: set, label: x, value: "1"}]}
          - {name: sample, match: {name: "s_.*"}, action: sample,
             sample: {method: probabilistic, rate: 0.5}}
          - {name: drop, match: {name: "d_.*"}, action: drop}
          - {name: ds, match: {name: "g_.*"}, action: downsample,
             downsample: {interval: 10s, method: avg}}
          - {name: never, match: {name: "nothing_.*"}, action: drop}
        """,
        clock,
        rand=iter([0.1, 0.9, 0.2, 0.8]).__next__,
    )
    assert govern(
        e,
        "{__name__=s_a} 1000:1.0 2000:2.0 3000:3.0 4000:4.0",
        "{__name__=d_a} 1000:1.0 2000:2.0",
        "{__name__=g_a} 1000:1.0 2000:2.0 3000:3.0",
        "{__name__=other} 1000:1.0",
    ) == ["{__name__=s_a,x=1} 1000:1.0 3000:3.0", "{__name__=other,x=1} 1000:1.0"]
    due(e, force=True)
    assert e.stats == {
        "tag": RuleStats(input=10, output=10, last_match=5.0),
        "sample": RuleStats(input=4, output=2, dropped=2, last_match=5.0),
        "drop": RuleStats(input=2, dropped=2, last_match=5.0),
        "ds": RuleStats(input=3, output=1, last_match=5.0),
        "never": RuleStats(),
    }


def test_check_dead_reports_each_change_once() -> None:
    """A rule is dead once it has not matched for its dead_after (counted from the engine's start
    while it never matched); check_dead returns only the changes, and a match brings it back."""
    clock = Clock(1_000_000)
    e = engine(
        """
        dead_after: 1h
        rules:
          - {name: a, match: {name: a}, action: drop, dead_after: 10m}
          - {name: b, match: {name: b}, action: drop}
        """,
        clock,
    )
    clock.ms = 1_000_000 + 599_999
    assert e.check_dead() == []
    clock.ms = 1_000_000 + 600_000
    assert e.check_dead() == [("a", True)]
    assert e.check_dead() == []
    assert e.stats["a"].dead is True
    clock.ms = 1_000_000 + 700_000
    govern(e, "{__name__=a} 1:1.0")
    assert e.check_dead() == [("a", False)]
    clock.ms = 1_000_000 + 1_299_999
    assert e.check_dead() == []
    clock.ms = 1_000_000 + 1_300_000
    assert e.check_dead() == [("a", True)]
    clock.ms = 1_000_000 + 3_600_000
    assert e.check_dead() == [("b", True)]


def test_a_rule_added_by_reload_gets_its_whole_dead_after() -> None:
    """A rule that a reload adds could not match before it: it is dead only after dead_after
    (1h) from the reload without a match, not from the engine's start. Rule a, unchanged, stays
    dead (no change to report)."""
    clock = Clock(0)
    e = engine("rules: [{name: a, match: {name: a}, action: drop}]", clock)
    clock.ms = 2 * 3_600_000
    assert e.check_dead() == [("a", True)]
    e.reload(
        load_rules(
            "rules: [{name: a, match: {name: a}, action: drop}, "
            "{name: b, match: {name: b}, action: drop}]"
        )
    )
    assert e.check_dead() == []
    clock.ms = 3 * 3_600_000 - 1
    assert e.check_dead() == []
    clock.ms = 3 * 3_600_000
    assert e.check_dead() == [("b", True)]


DS_AND_HEAD = """
rules:
  - {name: ds, match: {name: g}, action: downsample, downsample: {interval: 10s, method: avg}}
  - {name: head, match: {name: h}, action: sample, sample: {method: head, n: 3}}
"""


def test_reload_keeps_the_state_of_unchanged_rules() -> None:
    """An unchanged rule keeps its open window (the window emitted after the reload averages the
    points from before and after it) and its head counters (the count goes on: 2 samples before,
    so the 3rd is dropped and the 4th kept)."""
    clock = Clock(0)
    e = engine(DS_AND_HEAD, clock)
    govern(e, "{__name__=g} 1000:1.0", "{__name__=h} 1:1.0 2:2.0")
    e.reload(load_rules(DS_AND_HEAD + "  - {name: extra, match: {name: x}, action: drop}\n"))
    assert due(e) == []
    assert govern(e, "{__name__=g} 2000:3.0", "{__name__=h} 3:3.0 4:4.0") == ["{__name__=h} 4:4.0"]
    clock.ms = 12_000
    assert due(e) == ["{__name__=g} 10000:2.0"]
    assert e.stats["head"] == RuleStats(input=4, output=2, dropped=2, last_match=0.0)


def test_reload_emits_the_windows_of_changed_and_removed_rules_at_the_next_due() -> None:
    """The open window of a rule whose settings changed, and of a rule that is gone, comes out
    at the next due(), before its time; the changed rule starts with fresh windows and head
    counters."""
    clock = Clock(0)
    e = engine(DS_AND_HEAD, clock)
    govern(e, "{__name__=g} 1000:1.0 2000:3.0", "{__name__=h} 1:1.0 2:2.0")
    e.reload(
        load_rules("""
rules:
  - {name: ds, match: {name: g}, action: downsample, downsample: {interval: 10s, method: max}}
  - {name: head, match: {name: h}, action: sample, sample: {method: head, n: 2}}
""")
    )
    assert due(e) == ["{__name__=g} 10000:2.0"]
    assert govern(e, "{__name__=g} 3000:5.0 4000:4.0", "{__name__=h} 3:3.0 4:4.0") == [
        "{__name__=h} 3:3.0"
    ]
    clock.ms = 12_000
    assert due(e) == ["{__name__=g} 10000:5.0"]


def test_a_removed_rules_window_comes_out_at_the_next_due() -> None:
    """A downsample rule that a reload removes: its open window is emitted by the next due()."""
    clock = Clock(0)
    e = engine(DS_AND_HEAD, clock)
    govern(e, "{__name__=g} 1000:1.0 2000:3.0")
    e.reload(
        load_rules(
            "rules: [{name: head, match: {name: h}, action: sample, sample: {method: head, n: 3}}]"
        )
    )
    assert due(e) == ["{__name__=g} 10000:2.0"]
    assert due(e) == []
    assert set(e.stats) == {"head"}


def test_two_reloads_before_a_due_lose_no_window() -> None:
    """Two SIGHUPs within one tick: the window of the rule the first reload changed still comes
    out at the next due(), with the one the second reload changed."""
    clock = Clock(0)
    e = engine(DS_AND_HEAD, clock)
    govern(e, "{__name__=g} 1000:1.0 2000:3.0")
    e.reload(load_rules(DS_AND_HEAD.replace("method: avg", "method: max")))
    govern(e, "{__name__=g} 3000:7.0")
    e.reload(load_rules(DS_AND_HEAD.replace("method: avg", "method: min")))
    assert sorted(due(e)) == ["{__name__=g} 10000:2.0", "{__name__=g} 10000:7.0"]


def test_rule_collector_exposes_every_rule_with_its_ownership_labels() -> None:
    """The per-rule metrics, one series per rule of each engine, labelled pipeline, rule and
    every ownership key any rule uses (empty where a rule does not set it)."""
    clock = Clock(5000)
    rules = """
        rules:
          - {name: drop-debug, match: {name: "debug_.*"}, action: drop, labels: {team: platform}}
          - {name: tag, match: {name: up}, action: transform, labels: {channel: "#obs"},
             transform: [{op: set, label: x, value: "1"}]}
    """
    prw_engine = engine(rules, clock)
    otlp_engine = engine(rules, clock, pipeline="otlp")
    govern(prw_engine, "{__name__=debug_a} 1:1.0 2:2.0")
    prw_engine.check_dead()
    registry = CollectorRegistry()
    registry.register(RuleCollector([prw_engine, otlp_engine]))
    text = generate_latest(registry).decode()
    samples = [line for line in text.splitlines() if not line.startswith("#")]

    def four(name: str, values: tuple[str, str, str, str]) -> list[str]:
        labels = [
            'channel="",pipeline="prw",rule="drop-debug",team="platform"',
            'channel="#obs",pipeline="prw",rule="tag",team=""',
            'channel="",pipeline="otlp",rule="drop-debug",team="platform"',
            'channel="#obs",pipeline="otlp",rule="tag",team=""',
        ]
        return [f"{name}{{{lb}}} {v}" for lb, v in zip(labels, values)]

    assert samples == [
        *four("governor_rule_input_datapoints_total", ("2.0", "0.0", "0.0", "0.0")),
        *four("governor_rule_output_datapoints_total", ("0.0", "0.0", "0.0", "0.0")),
        *four("governor_rule_dropped_datapoints_total", ("2.0", "0.0", "0.0", "0.0")),
        *four("governor_rule_skipped_datapoints_total", ("0.0", "0.0", "0.0", "0.0")),
        *four("governor_rule_last_match_timestamp_seconds", ("5.0", "0.0", "0.0", "0.0")),
        *four("governor_rule_never_matched", ("0.0", "1.0", "1.0", "1.0")),
        *four("governor_rule_dead", ("0.0", "0.0", "0.0", "0.0")),
    ]
    assert "# TYPE governor_rule_input_datapoints_total counter" in text
    assert "# TYPE governor_rule_dead gauge" in text


# ---- run() in virtual time -------------------------------------------------------------------


def governance_of(e: RuleEngine) -> Governance:
    """A pipeline's governance with rules only: what runs the engine's windows and dead rules."""
    return Governance(pipeline=e.pipeline, engine=e, clock_ms=e.clock_ms)


async def test_run_emits_due_windows_at_their_time_and_the_rest_at_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The governance task (Governance.run) ticks every 0.5 s: window [0 s, 10 s) comes out at
    12 s, [10 s, 20 s) at 22 s; when `stop` is set (at 26 s), the open window [20 s, 30 s) comes
    out at once, and run() returns."""
    e = RuleEngine(
        load_rules(DOWNSAMPLE.format("sum")),
        pipeline="prw",
        clock_ms=lambda: round(trio.current_time() * 1000),
    )
    emitted: list[tuple[float, list[str]]] = []

    async def emit(windows: list) -> None:
        emitted.append((trio.current_time(), lines(prw.encode(windows)[0])))

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(governance_of(e).run, emit, stop)
        await trio.sleep(1)
        govern(e, "{__name__=m} 1000:1.0 5000:2.0")
        await trio.sleep(14)
        govern(e, "{__name__=m} 15000:4.0")
        await trio.sleep(10)
        govern(e, "{__name__=m} 25000:8.0")
        await trio.sleep(1)
        stop.set()
    assert trio.current_time() == 26.0
    assert emitted == [
        (12.0, ["{__name__=m} 10000:3.0"]),
        (22.0, ["{__name__=m} 20000:4.0"]),
        (26.0, ["{__name__=m} 30000:8.0"]),
    ]


async def test_run_reports_dead_rules_while_it_ticks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The governance task (Governance.run) checks for dead rules on every tick: a rule with
    dead_after 10s is dead after 10 s of virtual time without a match."""
    e = RuleEngine(
        load_rules("rules: [{name: a, match: {name: a}, action: drop, dead_after: 10s}]"),
        pipeline="prw",
        clock_ms=lambda: round(trio.current_time() * 1000),
    )

    async def emit(windows: list) -> None:
        raise AssertionError("nothing to emit")

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(governance_of(e).run, emit, stop)
        await trio.sleep(9.9)
        assert e.stats["a"].dead is False
        await trio.sleep(0.2)
        assert e.stats["a"].dead is True
        stop.set()
