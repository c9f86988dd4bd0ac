"""Tests for the rules file: service/governance/rules.py (docs/rules.md, *The file* and *Actions*).

A valid file with every action and every transform operation loads into the values written here;
every kind of mistake comes back as one line `rules[i] (name).key.path: what`, and all the
problems of a file come back at once. Nothing here evaluates a rule.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from service.governance.rules import (
    Aggregate,
    Chain,
    Classify,
    Downsample,
    Matcher,
    Op,
    RulesError,
    Sample,
    Table,
    load_rules,
    parse_duration,
    template,
)

ACTIONS = "drop, sample, downsample, aggregate, transform, classify"
OPS = (
    "set, remove, rename, copy, replace, extract, lower, upper, concat, map, hash_mod, "
    "rename_metric"
)
MATCHER_OPS = "equals, not_equals, regex, not_regex, present, absent"
FUNCTIONS = "sum, avg, min, max, count, last, stddev, increase, rate"


def problems_of(text: str) -> list[str]:
    """The problems load_rules reports for `text` (it must report some)."""
    with pytest.raises(RulesError) as info:
        load_rules(text)
    return info.value.problems


def one_rule(**rule: Any) -> str:
    """A rules file holding the single rule `rule` (written as keyword arguments)."""
    return yaml.safe_dump({"rules": [rule]}, sort_keys=False)


# ---- a file with everything loads ------------------------------------------------------------

EVERYTHING = """
dead_after: 2h
rules:
  - name: drop-debug
    labels: {team: platform, channel: "#obs"}
    match:
      name: "debug_.*"
      labels:
        - {label: env, equals: dev}
        - {label: stage, not_equals: prod}
        - {label: pod, regex: "canary-.*"}
        - {label: zone, not_regex: "eu-.*"}
        - {label: owner, present: true}
        - {label: temp, absent: true}
      resource:
        - {label: service.name, present: true}
    action: drop
    dead_after: 10m
  - name: sample-probabilistic
    action: sample
    sample: {method: probabilistic, rate: 0.1}
  - name: sample-hash
    action: sample
    sample: {method: hash, rate: 0.25}
  - name: sample-head
    action: sample
    sample: {method: head, n: 10}
  - name: downsample-avg
    action: downsample
    downsample: {interval: 1m, method: avg}
  - name: downsample-lttb
    action: downsample
    downsample: {interval: 30s, method: lttb, points: 10, staleness: 10m}
  - name: downsample-door
    action: downsample
    downsample: {interval: 500ms, method: swinging_door, deviation: 0.5}
  - name: aggregate-by
    action: aggregate
    aggregate:
      interval: 1m
      by: [job, status]
      functions: [sum, max, quantile(0.99)]
      output_name: "${__name__}:by_job"
      output_kind: counter
      input_kind: auto
      keep_input: true
      staleness: 1h
  - name: aggregate-without
    action: aggregate
    aggregate: {interval: 2m, without: [instance, pod], input_kind: counter, functions: [rate]}
  - name: transform-all
    action: transform
    transform:
      - {op: set, label: env, value: "prod-${region}"}
      - {op: remove, labels: [pod_template_hash, uid]}
      - {op: rename, source: instance, label: host}
      - {op: copy, source: job, label: service}
      - {op: replace, label: path, regex: "/users/[0-9]+", replacement: "/users/:id"}
      - {op: extract, source: pod, regex: "^(.*)-[a-z0-9]+$", label: deployment, group: 1}
      - {op: lower, label: method}
      - {op: upper, label: region}
      - {op: concat, sources: [namespace, pod], label: workload, separator: "/"}
      - {op: map, source: code, label: class, table: {"200": ok, "500": error}, default: other}
      - {op: hash_mod, source: user_id, label: shard, modulus: 16}
      - {op: rename_metric, value: "legacy_${__name__}"}
      - {op: set, label: tier, value: gold, when: [{label: team, equals: payments}]}
  - name: classify-tier
    action: classify
    classify:
      chains:
        - when: [{label: namespace, regex: "prod-.*"}, {label: team, equals: payments}]
          set: {tier: critical, pager: "yes"}
        - when: []
          set: {tier: other}
      tables:
        - {source: service, target: owner, values: {checkout: payments}, default: unknown}
"""


def test_a_file_with_every_action_and_every_op_loads() -> None:
    """Every action, every matcher, every sampling and downsampling method, both aggregate
    groupings and every transform op load into the values the file says; `dead_after` at the top
    is every rule's default, and a rule's own `dead_after` and ownership labels are kept."""
    rs = load_rules(EVERYTHING)
    assert [(r.name, r.action) for r in rs.rules] == [
        ("drop-debug", "drop"),
        ("sample-probabilistic", "sample"),
        ("sample-hash", "sample"),
        ("sample-head", "sample"),
        ("downsample-avg", "downsample"),
        ("downsample-lttb", "downsample"),
        ("downsample-door", "downsample"),
        ("aggregate-by", "aggregate"),
        ("aggregate-without", "aggregate"),
        ("transform-all", "transform"),
        ("classify-tier", "classify"),
    ]
    assert rs.dead_after_s == 7200.0
    assert [r.dead_after_s for r in rs.rules] == [600.0] + [7200.0] * 10
    assert [r.terminal for r in rs.rules] == [True] * 9 + [False] * 2

    drop = rs.rules[0]
    assert drop.labels == (("team", "platform"), ("channel", "#obs"))
    assert drop.match.name_source == "debug_.*"
    assert drop.match.labels == (
        Matcher("env", "equals", "dev"),
        Matcher("stage", "not_equals", "prod"),
        Matcher("pod", "regex", "canary-.*"),
        Matcher("zone", "not_regex", "eu-.*"),
        Matcher("owner", "present"),
        Matcher("temp", "absent"),
    )
    assert drop.match.resource == (Matcher("service.name", "present"),)
    assert drop.settings is None
    assert rs.rules[1].match.name_source == ".*"  # no `match`: every name

    assert [r.settings for r in rs.rules[1:7]] == [
        Sample("probabilistic", rate=0.1),
        Sample("hash", rate=0.25),
        Sample("head", n=10),
        Downsample(60.0, "avg"),
        Downsample(30.0, "lttb", points=10, staleness_s=600.0),
        Downsample(0.5, "swinging_door", deviation=0.5),
    ]
    assert rs.rules[7].settings == Aggregate(
        interval_s=60.0,
        by=("job", "status"),
        without=None,
        functions=("sum", "max", "quantile(0.99)"),
        output_name=template("${__name__}:by_job"),
        output_kind="counter",
        input_kind="auto",
        keep_input=True,
        staleness_s=3600.0,
    )
    assert rs.rules[8].settings == Aggregate(
        interval_s=120.0,
        by=None,
        without=("instance", "pod"),
        functions=("rate",),
        output_name=template("${__name__}:rate"),
        output_kind="gauge",
        input_kind="counter",
        keep_input=False,
        staleness_s=300.0,
    )
    team_is_payments = (Matcher("team", "equals", "payments"),)
    assert rs.rules[9].settings == (
        Op("set", label="env", value=template("prod-${region}")),
        Op("remove", labels=("pod_template_hash", "uid")),
        Op("rename", source="instance", label="host"),
        Op("copy", source="job", label="service"),
        Op("replace", label="path", regex_source="/users/[0-9]+", replacement="/users/:id"),
        Op("extract", source="pod", regex_source="^(.*)-[a-z0-9]+$", label="deployment", group=1),
        Op("lower", label="method"),
        Op("upper", label="region"),
        Op("concat", sources=("namespace", "pod"), label="workload", separator="/"),
        Op(
            "map",
            source="code",
            label="class",
            table=(("200", "ok"), ("500", "error")),
            default="other",
        ),
        Op("hash_mod", source="user_id", label="shard", modulus=16),
        Op("rename_metric", value=template("legacy_${__name__}")),
        Op("set", label="tier", value=template("gold"), when=team_is_payments),
    )
    assert rs.rules[10].settings == Classify(
        chains=(
            Chain(
                (Matcher("namespace", "regex", "prod-.*"), *team_is_payments),
                (("tier", template("critical")), ("pager", template("yes"))),
            ),
            Chain((), (("tier", template("other")),)),
        ),
        tables=(Table("service", "owner", (("checkout", "payments"),), "unknown"),),
    )


def test_regexes_are_compiled_at_load_and_anchored_in_matchers() -> None:
    """Regexes are compiled once at load; name and matcher regexes must match the whole value."""
    rule = load_rules(EVERYTHING).rules[0]
    assert rule.match.name.fullmatch("debug_x") is not None
    assert rule.match.name.fullmatch("not_debug_x") is None
    pod = rule.match.labels[2]
    assert [pod.test({"pod": v}) for v in ("canary-1", "my-canary-1", "canary")] == [
        True,
        False,
        False,
    ]


@pytest.mark.parametrize(
    ("matcher", "labels", "holds"),
    [
        ({"label": "env", "equals": "dev"}, {"env": "dev"}, True),
        ({"label": "env", "equals": "dev"}, {"env": "devel"}, False),
        ({"label": "env", "equals": ""}, {}, False),  # a missing label has no value
        ({"label": "env", "not_equals": "x"}, {}, True),
        ({"label": "env", "not_equals": "x"}, {"env": "x"}, False),
        ({"label": "env", "regex": "d.v"}, {"env": "dev"}, True),
        ({"label": "env", "regex": "d"}, {"env": "dev"}, False),
        ({"label": "env", "not_regex": "d"}, {"env": "dev"}, True),
        ({"label": "env", "not_regex": "d.v"}, {"env": "dev"}, False),
        ({"label": "env", "present": True}, {"env": ""}, True),
        ({"label": "env", "present": True}, {}, False),
        ({"label": "env", "absent": True}, {}, True),
        ({"label": "env", "absent": True}, {"env": "dev"}, False),
    ],
)
def test_matchers(matcher: dict[str, Any], labels: dict[str, str], holds: bool) -> None:
    """Each matcher kind over a label set; regexes are anchored, a missing label has no value."""
    rs = load_rules(one_rule(name="r", action="drop", match={"labels": [matcher]}))
    assert rs.rules[0].match.labels[0].test(labels) is holds


def test_an_empty_file_is_no_rules() -> None:
    """An empty file (or one without `rules`) loads as an empty rule set with the defaults."""
    assert load_rules("").rules == ()
    assert load_rules("dead_after: 5m").dead_after_s == 300.0


def test_uses_labels_says_whether_a_rule_needs_the_series_labels() -> None:
    """Only a drop or probabilistic sample without label or resource matchers can be decided
    from the name alone."""
    rs = load_rules(EVERYTHING)
    assert [r.uses_labels for r in rs.rules] == [True, False] + [True] * 9
    plain_drop = load_rules(one_rule(name="d", action="drop")).rules[0]
    assert plain_drop.uses_labels is False


# ---- every kind of mistake -------------------------------------------------------------------

MISTAKES: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "unknown key",
        {"name": "r", "action": "drop", "mtach": {}},
        ["rules[0] (r).mtach: unknown key"],
    ),
    (
        "unknown key in match",
        {"name": "r", "action": "drop", "match": {"nmae": "x"}},
        ["rules[0] (r).match.nmae: unknown key"],
    ),
    (
        "unknown key in settings",
        {"name": "r", "action": "sample", "sample": {"method": "hash", "rate": 0.5, "n": 3}},
        ["rules[0] (r).sample.n: unknown key"],
    ),
    ("missing name", {"action": "drop"}, ["rules[0].name: required"]),
    (
        "name not a string",
        {"name": 5, "action": "drop"},
        ["rules[0].name: expected a string, got 5"],
    ),
    (
        "unknown action",
        {"name": "r", "action": "keep"},
        [f"rules[0] (r).action: 'keep' is not one of {ACTIONS}"],
    ),
    ("missing action", {"name": "r"}, ["rules[0] (r).action: required"]),
    (
        "settings for another action",
        {"name": "r", "action": "drop", "sample": {"method": "hash", "rate": 0.5}},
        ["rules[0] (r).sample: settings for 'sample', but the action is 'drop'"],
    ),
    ("missing settings", {"name": "r", "action": "sample"}, ["rules[0] (r).sample: required"]),
    (
        "settings not a mapping",
        {"name": "r", "action": "downsample", "downsample": "1m"},
        [
            "rules[0] (r).downsample: expected a mapping, got str",
            "rules[0] (r).downsample.interval: required",
            "rules[0] (r).downsample.method: required",
        ],
    ),
    (
        "bad regex in match.name",
        {"name": "r", "action": "drop", "match": {"name": "debug_(.*"}},
        [
            "rules[0] (r).match.name: bad regex 'debug_(.*': "
            "missing ), unterminated subpattern at position 6"
        ],
    ),
    (
        "bad regex in a label matcher",
        {"name": "r", "action": "drop", "match": {"labels": [{"label": "a", "regex": "["}]}},
        [
            "rules[0] (r).match.labels[0].regex: bad regex '[': unterminated character set at "
            "position 0"
        ],
    ),
    (
        "bad regex in a resource matcher",
        {"name": "r", "action": "drop", "match": {"resource": [{"label": "a", "not_regex": "*"}]}},
        [
            "rules[0] (r).match.resource[0].not_regex: bad regex '*': "
            "nothing to repeat at position 0"
        ],
    ),
    (
        "matcher with two conditions",
        {
            "name": "r",
            "action": "drop",
            "match": {"labels": [{"label": "a", "equals": "x", "regex": "y"}]},
        },
        [f"rules[0] (r).match.labels[0]: give exactly one of {MATCHER_OPS}"],
    ),
    (
        "matcher without a label",
        {"name": "r", "action": "drop", "match": {"labels": [{"equals": "x"}]}},
        ["rules[0] (r).match.labels[0].label: required"],
    ),
    (
        "present: false",
        {"name": "r", "action": "drop", "match": {"labels": [{"label": "a", "present": False}]}},
        ["rules[0] (r).match.labels[0].present: expected true"],
    ),
    (
        "matchers not a list",
        {"name": "r", "action": "drop", "match": {"labels": {"env": "dev"}}},
        ["rules[0] (r).match.labels: expected a list of matchers like {label: env, equals: prod}"],
    ),
    (
        "bad regex in a replace op",
        {
            "name": "r",
            "action": "transform",
            "transform": [{"op": "replace", "label": "a", "regex": "(", "replacement": "x"}],
        },
        [
            "rules[0] (r).transform[0].regex: bad regex '(': "
            "missing ), unterminated subpattern at position 0"
        ],
    ),
    (
        "bad regex in a when condition",
        {
            "name": "r",
            "action": "transform",
            "transform": [{"op": "lower", "label": "a", "when": [{"label": "b", "regex": "+"}]}],
        },
        ["rules[0] (r).transform[0].when[0].regex: bad regex '+': nothing to repeat at position 0"],
    ),
    (
        "extract group beyond the regex's groups",
        {
            "name": "r",
            "action": "transform",
            "transform": [
                {"op": "extract", "source": "a", "regex": "(x)", "label": "b", "group": 2}
            ],
        },
        ["rules[0] (r).transform[0].group: the regex has 1 groups"],
    ),
    (
        "op without its keys",
        {"name": "r", "action": "transform", "transform": [{"op": "rename", "source": "a"}]},
        ["rules[0] (r).transform[0].label: required"],
    ),
    (
        "op setting a label that is no label name",
        {
            "name": "r",
            "action": "transform",
            "transform": [{"op": "set", "label": "a-b", "value": "x"}],
        },
        ["rules[0] (r).transform[0].label: 'a-b' is not a label name"],
    ),
    (
        "empty transform",
        {"name": "r", "action": "transform", "transform": []},
        ["rules[0] (r).transform: expected a non-empty list of operations"],
    ),
    (
        "map table of non-strings",
        {
            "name": "r",
            "action": "transform",
            "transform": [{"op": "map", "source": "a", "label": "b", "table": {200: "ok"}}],
        },
        ["rules[0] (r).transform[0].table: expected a mapping of strings to strings"],
    ),
    (
        "hash_mod modulus 0",
        {
            "name": "r",
            "action": "transform",
            "transform": [{"op": "hash_mod", "source": "a", "label": "b", "modulus": 0}],
        },
        ["rules[0] (r).transform[0].modulus: must be >= 1"],
    ),
    (
        "rate above 1",
        {"name": "r", "action": "sample", "sample": {"method": "probabilistic", "rate": 1.5}},
        ["rules[0] (r).sample.rate: must be between 0 and 1"],
    ),
    (
        "rate below 0",
        {"name": "r", "action": "sample", "sample": {"method": "hash", "rate": -0.1}},
        ["rules[0] (r).sample.rate: must be between 0 and 1"],
    ),
    (
        "rate not a number",
        {"name": "r", "action": "sample", "sample": {"method": "hash", "rate": "10%"}},
        ["rules[0] (r).sample.rate: expected a number, got '10%'"],
    ),
    (
        "unknown sample method",
        {"name": "r", "action": "sample", "sample": {"method": "tail", "n": 2}},
        [
            "rules[0] (r).sample.method: 'tail' is not one of probabilistic, hash, head",
            "rules[0] (r).sample.n: unknown key",
        ],
    ),
    (
        "head n 0",
        {"name": "r", "action": "sample", "sample": {"method": "head", "n": 0}},
        ["rules[0] (r).sample.n: must be >= 1"],
    ),
    (
        "head n not an integer",
        {"name": "r", "action": "sample", "sample": {"method": "head", "n": 2.5}},
        ["rules[0] (r).sample.n: expected an integer, got 2.5"],
    ),
    (
        "lttb with 1 point",
        {
            "name": "r",
            "action": "downsample",
            "downsample": {"interval": "1m", "method": "lttb", "points": 1},
        },
        ["rules[0] (r).downsample.points: lttb keeps at least 2 points (the first and the last)"],
    ),
    (
        "lttb without points",
        {"name": "r", "action": "downsample", "downsample": {"interval": "1m", "method": "lttb"}},
        ["rules[0] (r).downsample.points: lttb keeps at least 2 points (the first and the last)"],
    ),
    (
        "swinging_door without deviation",
        {
            "name": "r",
            "action": "downsample",
            "downsample": {"interval": "1m", "method": "swinging_door"},
        },
        ["rules[0] (r).downsample.deviation: must be > 0"],
    ),
    (
        "points for a method that has none",
        {
            "name": "r",
            "action": "downsample",
            "downsample": {"interval": "1m", "method": "avg", "points": 5},
        },
        ["rules[0] (r).downsample.points: unknown key"],
    ),
    (
        "unknown downsample method",
        {"name": "r", "action": "downsample", "downsample": {"interval": "1m", "method": "median"}},
        [
            "rules[0] (r).downsample.method: 'median' is not one of "
            "avg, min, max, sum, count, first, last, lttb, swinging_door"
        ],
    ),
    (
        "aggregate with both by and without",
        {
            "name": "r",
            "action": "aggregate",
            "aggregate": {"interval": "1m", "by": ["job"], "without": ["pod"]},
        },
        [
            "rules[0] (r).aggregate: give exactly one of `by` (labels to keep) or `without` "
            "(labels to drop)"
        ],
    ),
    (
        "aggregate with neither by nor without",
        {"name": "r", "action": "aggregate", "aggregate": {"interval": "1m"}},
        [
            "rules[0] (r).aggregate: give exactly one of `by` (labels to keep) or `without` "
            "(labels to drop)"
        ],
    ),
    (
        "unknown function",
        {
            "name": "r",
            "action": "aggregate",
            "aggregate": {"interval": "1m", "by": [], "functions": ["median"]},
        },
        [f"rules[0] (r).aggregate.functions: 'median' is not one of {FUNCTIONS} or quantile(q)"],
    ),
    (
        "quantile(1.5)",
        {
            "name": "r",
            "action": "aggregate",
            "aggregate": {"interval": "1m", "by": [], "functions": ["quantile(1.5)"]},
        },
        [
            f"rules[0] (r).aggregate.functions: 'quantile(1.5)' is not one of {FUNCTIONS} or "
            "quantile(q)"
        ],
    ),
    (
        "a function twice",
        {
            "name": "r",
            "action": "aggregate",
            "aggregate": {"interval": "1m", "by": [], "functions": ["sum", "sum"]},
        },
        ["rules[0] (r).aggregate.functions: a function is listed twice"],
    ),
    (
        "keep_input not a boolean",
        {
            "name": "r",
            "action": "aggregate",
            "aggregate": {"interval": "1m", "by": [], "keep_input": "yes"},
        },
        ["rules[0] (r).aggregate.keep_input: expected true or false"],
    ),
    (
        "classify with neither chains nor tables",
        {"name": "r", "action": "classify", "classify": {}},
        ["rules[0] (r).classify: give `chains`, `tables` or both"],
    ),
    (
        "classify chain without set",
        {"name": "r", "action": "classify", "classify": {"chains": [{"when": []}]}},
        [
            "rules[0] (r).classify.chains[0].set: required",
            "rules[0] (r).classify.chains[0].set: expected a mapping of label names to values",
        ],
    ),
    (
        "duration with an unknown unit",
        {"name": "r", "action": "downsample", "downsample": {"interval": "1w", "method": "avg"}},
        ["rules[0] (r).downsample.interval: '1w' is not a duration like 30s, 5m or 1h"],
    ),
    (
        "duration in words",
        {"name": "r", "action": "drop", "dead_after": "5 minutes"},
        ["rules[0] (r).dead_after: '5 minutes' is not a duration like 30s, 5m or 1h"],
    ),
    (
        "zero duration",
        {"name": "r", "action": "aggregate", "aggregate": {"interval": 0, "by": []}},
        ["rules[0] (r).aggregate.interval: must be > 0"],
    ),
    (
        "negative staleness",
        {
            "name": "r",
            "action": "downsample",
            "downsample": {"interval": "1m", "method": "avg", "staleness": -5},
        },
        ["rules[0] (r).downsample.staleness: must be > 0"],
    ),
    (
        "missing interval",
        {"name": "r", "action": "downsample", "downsample": {"method": "avg"}},
        ["rules[0] (r).downsample.interval: required"],
    ),
    (
        "ownership labels as a list",
        {"name": "r", "action": "drop", "labels": ["team"]},
        ["rules[0] (r).labels: expected a mapping of label names to strings"],
    ),
    (
        "ownership label with a number value",
        {"name": "r", "action": "drop", "labels": {"team": 5}},
        ["rules[0] (r).labels: expected a mapping of label names to strings"],
    ),
    (
        "ownership label that is no label name",
        {"name": "r", "action": "drop", "labels": {"team-name": "x"}},
        ["rules[0] (r).labels: expected a mapping of label names to strings"],
    ),
]


@pytest.mark.parametrize(
    ("rule", "expected"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_each_mistake_is_reported_with_rule_name_and_path(
    rule: dict[str, Any], expected: list[str]
) -> None:
    """One rule with one mistake: the problem names the rule (`rules[i] (name)`, or `rules[i]`
    without a name) and the path of the key, and says what is wrong."""
    assert problems_of(one_rule(**rule)) == expected


def test_duplicate_names_are_reported_on_each_later_rule() -> None:
    """A name used again is reported on every later rule, pointing at the first."""
    text = yaml.safe_dump({"rules": [{"name": n, "action": "drop"} for n in ("a", "b", "a", "a")]})
    assert problems_of(text) == [
        "rules[2] (a).name: also the name of rules[0]",
        "rules[3] (a).name: also the name of rules[0]",
    ]


def test_top_level_mistakes() -> None:
    """Top-level keys are checked like the rules' keys; `rules` must be a list."""
    assert problems_of("dead_after: 0\nrulez: []\n") == [
        "<top>.dead_after: must be > 0",
        "<top>.rulez: unknown key",
    ]
    assert problems_of("rules: {name: a}\n") == ["rules: expected a list of rules"]
    assert problems_of("- a\n- b\n") == ["<top>: expected a mapping, got list"]
    assert problems_of("rules: [drop]\n") == [
        "rules[0]: expected a mapping, got str",
        "rules[0].name: required",
        "rules[0].action: required",
    ]


def test_yaml_syntax_error_is_one_problem_on_one_line() -> None:
    """A file that is not YAML is one problem, `<yaml>: ...`, with the position, on one line."""
    assert problems_of("rules: [\n  {name: a\n") == [
        '<yaml>: while parsing a flow mapping in "<unicode string>", line 2, column 3: '
        "{name: a ^ expected ',' or '}', but got '<stream end>' in \"<unicode string>\", "
        "line 3, column 1: ^"
    ]


def test_every_problem_of_a_file_comes_back_at_once() -> None:
    """A file with mistakes in several rules and at the top: RulesError.problems lists all of
    them, in file order, and the message lists them one per line. Good rules in the same file
    change nothing: nothing is half-loaded."""
    text = """
dead_after: soon
rules:
  - name: fine
    action: drop
  - name: sample-dev
    action: sample
    sample: {method: probabilistic, rate: 2}
  - action: drop
    match: {name: "("}
  - name: agg
    action: aggregate
    aggregate: {interval: 1x, functions: [quantile(1.5)]}
    labels: owner
  - name: fine
    action: downsample
    downsample: {interval: 1m, method: lttb, points: 1}
"""
    with pytest.raises(RulesError) as info:
        load_rules(text)
    expected = [
        "<top>.dead_after: 'soon' is not a duration like 30s, 5m or 1h",
        "rules[1] (sample-dev).sample.rate: must be between 0 and 1",
        "rules[2].name: required",
        "rules[2].match.name: bad regex '(': missing ), unterminated subpattern at position 0",
        "rules[3] (agg).labels: expected a mapping of label names to strings",
        "rules[3] (agg).aggregate.interval: '1x' is not a duration like 30s, 5m or 1h",
        "rules[3] (agg).aggregate: give exactly one of `by` (labels to keep) or `without` "
        "(labels to drop)",
        f"rules[3] (agg).aggregate.functions: 'quantile(1.5)' is not one of {FUNCTIONS} or "
        "quantile(q)",
        "rules[4] (fine).downsample.points: lttb keeps at least 2 points (the first and the last)",
    ]
    assert info.value.problems == expected
    assert str(info.value) == "invalid rules:\n  " + "\n  ".join(expected)


def test_an_unknown_action_is_one_problem_even_with_its_settings() -> None:
    """A misspelt action with its settings (the usual way to get it wrong) is one problem: the
    action. The settings are not also reported as belonging to some other action: the rule has
    no action that they could contradict."""
    rule = {"name": "r", "action": "smaple", "sample": {"method": "hash", "rate": 0.5}}
    assert problems_of(one_rule(**rule)) == [
        f"rules[0] (r).action: 'smaple' is not one of {ACTIONS}"
    ]


def test_an_unknown_op_is_one_problem() -> None:
    """A transform op that does not exist is reported once; its keys are not checked against
    the keys of some other op (`value: required`, `source: unknown key` would be guesses)."""
    rule = {
        "name": "r",
        "action": "transform",
        "transform": [{"op": "relabel", "source": "a", "label": "b"}],
    }
    assert problems_of(one_rule(**rule)) == [
        f"rules[0] (r).transform[0].op: 'relabel' is not one of {OPS}"
    ]


def test_a_replacement_referring_to_a_missing_group_is_reported() -> None:
    """`replacement: $2` with a one-group regex can never be applied: it is a problem of the
    file, reported at load with its path (like extract's `group`), not an error per series."""
    rule = {
        "name": "r",
        "action": "transform",
        "transform": [{"op": "replace", "label": "a", "regex": "(x)", "replacement": "$2"}],
    }
    problems = problems_of(one_rule(**rule))
    assert len(problems) == 1
    assert problems[0].startswith("rules[0] (r).transform[0].replacement: ")


@pytest.mark.parametrize("key", ["interval", "staleness"])
def test_an_infinite_window_duration_is_reported(key: str) -> None:
    """`.inf` is a YAML number, but a window of infinite length (or an infinite staleness) cannot
    be computed with: it is reported at load, not left to fail when the engine is built or
    ticks."""
    settings = {"interval": "1m", "method": "avg", key: float("inf")}
    problems = problems_of(one_rule(name="d", action="downsample", downsample=settings))
    assert len(problems) == 1
    assert problems[0].startswith(f"rules[0] (d).downsample.{key}: ")


# ---- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        (" 2 m ", 120.0),
        ("0.25s", 0.25),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    """Seconds as a number, or a string with an optional unit ms, s, m, h or d."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5 minutes", "'5 minutes' is not a duration like 30s, 5m or 1h"),
        ("1w", "'1w' is not a duration like 30s, 5m or 1h"),
        ("", "'' is not a duration like 30s, 5m or 1h"),
        ("-5s", "'-5s' is not a duration like 30s, 5m or 1h"),
        ("1e3", "'1e3' is not a duration like 30s, 5m or 1h"),
        (None, "None is not a duration like 30s, 5m or 1h"),
        (True, "True is not a duration"),
        (0, "must be > 0"),
        (-1, "must be > 0"),
        ("0s", "must be > 0"),
        (float("nan"), "must be > 0"),
    ],
)
def test_parse_duration_rejects(value: Any, message: str) -> None:
    """Anything else is a ValueError saying what was wrong."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_duration(value)
