"""The rules file: parsing, validation and compilation into immutable rule objects.

Owns the file's schema. Loading reports every problem at once, each with the rule's name and the
key's path (`rules[2] (sample-dev).sample.rate: must be between 0 and 1`); it never returns half a
rule set. Regexes are compiled here, once; nothing here runs per datapoint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import attrs
import yaml

ACTIONS = ("drop", "sample", "downsample", "aggregate", "transform", "classify")
TERMINAL = frozenset({"drop", "sample", "downsample", "aggregate"})
DOWNSAMPLE_METHODS = ("avg", "min", "max", "sum", "count", "first", "last", "lttb", "swinging_door")
GAUGE_FUNCTIONS = ("sum", "avg", "min", "max", "count", "last", "stddev")
COUNTER_FUNCTIONS = ("sum", "increase", "rate", "count")
_QUANTILE_RE = re.compile(r"^quantile\((0(?:\.\d+)?|1(?:\.0+)?)\)$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TEMPLATE_RE = re.compile(r"\$\{([^}]*)\}")
LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_.]*$")


class RulesError(Exception):
    """The rules file is invalid; `problems` lists every problem as 'where: what'."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid rules:\n  " + "\n  ".join(problems))
        self.problems = problems


# ---- building blocks -----------------------------------------------------------------------


@attrs.frozen
class Matcher:
    """A condition on one label: equals, not_equals, regex, not_regex (anchored), present,
    absent."""

    label: str
    op: str
    value: str = ""
    regex: re.Pattern[str] | None = attrs.field(default=None, eq=False)

    def test(self, labels: Mapping[str, str]) -> bool:
        v = labels.get(self.label)
        op = self.op
        if op == "equals":
            return v == self.value
        if op == "not_equals":
            return v != self.value
        if op == "present":
            return v is not None
        if op == "absent":
            return v is None
        assert self.regex is not None
        hit = self.regex.fullmatch(v or "") is not None
        return hit if op == "regex" else not hit


def all_match(matchers: tuple[Matcher, ...], labels: Mapping[str, str]) -> bool:
    # A plain loop: all() over a generator costs a frame per call on this hot path.
    for m in matchers:  # noqa: SIM110
        if not m.test(labels):
            return False
    return True


@attrs.frozen
class Template:
    """A string with `${label}` references (`${__name__}` is the metric name)."""

    parts: tuple[tuple[bool, str], ...]  # (is_reference, text)

    @property
    def constant(self) -> str | None:
        if all(not ref for ref, _ in self.parts):
            return "".join(t for _, t in self.parts)
        return None

    def render(self, labels: Mapping[str, str], name: str) -> str:
        out = []
        for ref, text in self.parts:
            if not ref:
                out.append(text)
            elif text == "__name__":
                out.append(name)
            else:
                out.append(labels.get(text, ""))
        return "".join(out)


def template(text: str) -> Template:
    parts: list[tuple[bool, str]] = []
    pos = 0
    for m in _TEMPLATE_RE.finditer(text):
        if m.start() > pos:
            parts.append((False, text[pos : m.start()]))
        parts.append((True, m[1]))
        pos = m.end()
    if pos < len(text):
        parts.append((False, text[pos:]))
    return Template(tuple(parts))


@attrs.frozen
class Match:
    name: re.Pattern[str] = attrs.field(eq=False)
    name_source: str
    labels: tuple[Matcher, ...] = ()
    resource: tuple[Matcher, ...] = ()  # OTLP only; a PRW series has no resource


# ---- actions --------------------------------------------------------------------------------


@attrs.frozen
class Sample:
    method: str  # probabilistic | hash | head
    rate: float = 1.0
    n: int = 1


@attrs.frozen
class Downsample:
    interval_s: float
    method: str
    points: int = 0  # lttb
    deviation: float = 0.0  # swinging_door
    staleness_s: float = 300.0


@attrs.frozen
class Aggregate:
    interval_s: float
    by: tuple[str, ...] | None
    without: tuple[str, ...] | None
    functions: tuple[str, ...]
    output_name: Template
    output_kind: str  # gauge | counter
    input_kind: str  # auto | gauge | counter
    keep_input: bool
    staleness_s: float


@attrs.frozen
class Op:
    """One transform step; `when` conditions are checked against the labels as they are."""

    op: str
    label: str = ""
    source: str = ""
    sources: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    value: Template | None = None
    regex: re.Pattern[str] | None = attrs.field(default=None, eq=False)
    regex_source: str = ""
    replacement: str = ""
    group: int = 1
    separator: str = ""
    table: tuple[tuple[str, str], ...] = ()
    default: str | None = None
    modulus: int = 0
    when: tuple[Matcher, ...] = ()


@attrs.frozen
class Chain:
    when: tuple[Matcher, ...]
    set: tuple[tuple[str, Template], ...]


@attrs.frozen
class Table:
    source: str
    target: str
    values: tuple[tuple[str, str], ...]
    default: str | None


@attrs.frozen
class Classify:
    chains: tuple[Chain, ...] = ()
    tables: tuple[Table, ...] = ()


@attrs.frozen(cache_hash=True)
class Rule:
    name: str
    action: str
    match: Match
    settings: Any  # Sample | Downsample | Aggregate | tuple[Op, ...] | Classify | None
    labels: tuple[tuple[str, str], ...] = ()  # ownership: team, channel ...
    dead_after_s: float = 3600.0

    @property
    def terminal(self) -> bool:
        return self.action in TERMINAL

    @property
    def uses_labels(self) -> bool:
        """Whether deciding or applying this rule needs the series' labels (not only its name)."""
        if self.match.labels or self.match.resource:
            return True
        if self.action == "sample":
            return self.settings.method != "probabilistic"
        return self.action != "drop"


@attrs.frozen
class RuleSet:
    rules: tuple[Rule, ...] = ()
    dead_after_s: float = 3600.0

    def by_name(self) -> dict[str, Rule]:
        return {r.name: r for r in self.rules}


# ---- loading --------------------------------------------------------------------------------


def parse_duration(value: Any) -> float:
    """Seconds from 30, 1.5, "30s", "500ms", "5m", "1h", "1d"; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")  # noqa: TRY004 -- callers catch ValueError
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration like 30s, 5m or 1h")
        seconds = float(m[1]) * _DURATION_UNITS[m[2]]
    if not seconds > 0:
        raise ValueError("must be > 0")
    if not math.isfinite(seconds) or seconds > 366 * 86400:
        raise ValueError("must be at most a year")
    return seconds


class Reader:
    """Reads one mapping of the file, recording problems with their path instead of raising."""

    def __init__(self, data: Any, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = problems
        if not isinstance(data, Mapping):
            self.fail(f"expected a mapping, got {type(data).__name__}")
            data = {}
        self.data = data
        self.used: set[str] = set()

    def fail(self, what: str, key: str = "") -> None:
        self.problems.append(f"{self.where}{'.' + key if key else ''}: {what}")

    def get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                self.fail("required", key)
            return default
        return self.data[key]

    def text(self, key: str, default: str = "", *, required: bool = False) -> str:
        v = self.get(key, default, required=required)
        if not isinstance(v, str):
            self.fail(f"expected a string, got {v!r}", key)
            return default
        return v

    def number(self, key: str, default: float, *, check: str = "") -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(f"expected a number, got {v!r}", key)
            return default
        if check == "fraction" and not 0 <= v <= 1:
            self.fail("must be between 0 and 1", key)
        if check == "positive" and not v > 0:
            self.fail("must be > 0", key)
        return float(v)

    def integer(self, key: str, default: int, minimum: int = 1) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(f"expected an integer, got {v!r}", key)
            return default
        if v < minimum:
            self.fail(f"must be >= {minimum}", key)
        return v

    def duration(self, key: str, default: float | None = None, *, required: bool = False) -> float:
        v = self.get(key, default, required=required)
        if v is None:
            return default or 0.0
        try:
            return parse_duration(v)
        except ValueError as e:
            self.fail(str(e), key)
            return default or 1.0

    def strings(self, key: str) -> tuple[str, ...] | None:
        v = self.get(key)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            self.fail("expected a list of strings", key)
            return ()
        return tuple(v)

    def choice(self, key: str, options: tuple[str, ...], default: str | None = None) -> str:
        """The value if it is one of `options`; otherwise records the problem and returns ""
        (the caller stops reading what depends on it, so no problem is guessed)."""
        v = self.get(key, default, required=default is None)
        if v is None:
            return ""
        if v not in options:
            self.fail(f"{v!r} is not one of {', '.join(options)}", key)
            return ""
        return v

    def regex(self, key: str, value: str) -> re.Pattern[str] | None:
        try:
            return re.compile(value)
        except re.error as e:
            self.fail(f"bad regex {value!r}: {e}", key)
            return None

    def sub(self, key: str, *, required: bool = True) -> Reader | None:
        v = self.get(key, required=required)
        if v is None:
            return None
        return Reader(v, f"{self.where}.{key}", self.problems)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.used:
                self.fail("unknown key", str(key))


_MATCHER_OPS = ("equals", "not_equals", "regex", "not_regex", "present", "absent")


def _matchers(reader: Reader, key: str) -> tuple[Matcher, ...]:
    v = reader.get(key)
    if v is None:
        return ()
    if not isinstance(v, list):
        reader.fail("expected a list of matchers like {label: env, equals: prod}", key)
        return ()
    out = []
    for i, item in enumerate(v):
        r = Reader(item, f"{reader.where}.{key}[{i}]", reader.problems)
        label = r.text("label", required=True)
        ops = [op for op in _MATCHER_OPS if op in r.data]
        for op in ops:
            r.get(op)
        r.finish()
        if len(ops) != 1:
            r.fail(f"give exactly one of {', '.join(_MATCHER_OPS)}")
            continue
        op = ops[0]
        value = r.data[op]
        if op in ("present", "absent"):
            if value is not True:
                r.fail("expected true", op)
            out.append(Matcher(label, op))
            continue
        if not isinstance(value, str):
            r.fail(f"expected a string, got {value!r}", op)
            continue
        compiled = r.regex(op, value) if op in ("regex", "not_regex") else None
        out.append(Matcher(label, op, value, compiled))
    return tuple(out)


def read_match(reader: Reader) -> Match:
    m = reader.sub("match", required=False)
    if m is None:
        return Match(re.compile(".*"), ".*")
    name = m.text("name", ".*")
    compiled = m.regex("name", name) or re.compile(".*")
    match = Match(compiled, name, _matchers(m, "labels"), _matchers(m, "resource"))
    m.finish()
    return match


def _sample(r: Reader) -> Sample:
    method = r.choice("method", ("probabilistic", "hash", "head"))
    if method == "head":
        n = r.integer("n", 1)
        r.finish()
        return Sample(method, n=n)
    rate = r.number("rate", 1.0, check="fraction")
    r.finish()
    return Sample(method, rate=rate)


def _downsample(r: Reader) -> Downsample:
    interval = r.duration("interval", required=True)
    method = r.choice("method", DOWNSAMPLE_METHODS)
    points = r.integer("points", 0, minimum=0) if method == "lttb" else 0
    if method == "lttb" and points < 2:
        r.fail("lttb keeps at least 2 points (the first and the last)", "points")
    deviation = 0.0
    if method == "swinging_door":
        deviation = r.number("deviation", 0.0)
        if not deviation > 0:
            r.fail("must be > 0", "deviation")
    staleness = r.duration("staleness", 300.0)
    r.finish()
    return Downsample(interval, method, points, deviation, staleness)


def _aggregate(r: Reader) -> Aggregate:
    interval = r.duration("interval", required=True)
    by = r.strings("by")
    without = r.strings("without")
    if (by is None) == (without is None):
        r.fail("give exactly one of `by` (labels to keep) or `without` (labels to drop)")
    input_kind = r.choice("input_kind", ("auto", "gauge", "counter"), "auto")
    functions = r.strings("functions") or ("sum",)
    allowed = COUNTER_FUNCTIONS if input_kind == "counter" else GAUGE_FUNCTIONS
    if input_kind == "auto":
        allowed = tuple(dict.fromkeys(GAUGE_FUNCTIONS + COUNTER_FUNCTIONS))
    for f in functions:
        if f not in allowed and not (input_kind != "counter" and _QUANTILE_RE.match(f)):
            also = "" if input_kind == "counter" else " or quantile(q)"
            r.fail(f"{f!r} is not one of {', '.join(allowed)}{also}", "functions")
    if len(set(functions)) != len(functions):
        r.fail("a function is listed twice", "functions")
    first = "quantile" if functions[0].startswith("quantile(") else functions[0]
    default_name = "${__name__}:" + first if len(functions) == 1 else "${__name__}"
    output_name = r.text("output_name", default_name)
    output_kind = r.choice("output_kind", ("gauge", "counter"), "gauge")
    keep_input = r.get("keep_input", False)
    if not isinstance(keep_input, bool):
        r.fail("expected true or false", "keep_input")
        keep_input = False
    staleness = r.duration("staleness", 300.0)
    r.finish()
    return Aggregate(
        interval,
        by,
        without,
        functions,
        template(output_name),
        output_kind,
        input_kind,
        keep_input,
        staleness,
    )


_OP_KEYS = {
    "set": ("label", "value"),
    "remove": ("labels",),
    "rename": ("source", "label"),
    "copy": ("source", "label"),
    "replace": ("label", "regex", "replacement"),
    "extract": ("source", "regex", "label"),
    "lower": ("label",),
    "upper": ("label",),
    "concat": ("sources", "label"),
    "map": ("source", "label", "table"),
    "hash_mod": ("source", "label", "modulus"),
    "rename_metric": ("value",),
}


def _op(r: Reader) -> Op | None:
    op = r.choice("op", tuple(_OP_KEYS))
    if not op:
        r.used.update(r.data)  # without a known op its other keys mean nothing
        return None
    when = _matchers(r, "when")
    required = _OP_KEYS[op]
    kwargs: dict[str, Any] = {"op": op, "when": when}
    if "label" in required:
        kwargs["label"] = r.text("label", required=True)
        if kwargs["label"] and not LABEL_NAME_RE.match(kwargs["label"]):
            r.fail(f"{kwargs['label']!r} is not a label name", "label")
    if "source" in required:
        kwargs["source"] = r.text("source", required=True)
    if "sources" in required:
        kwargs["sources"] = r.strings("sources") or ()
        if not kwargs["sources"]:
            r.fail("required", "sources")
        kwargs["separator"] = r.text("separator", "")
    if "labels" in required:
        kwargs["labels"] = r.strings("labels") or ()
        if not kwargs["labels"]:
            r.fail("required", "labels")
    if "value" in required:
        kwargs["value"] = template(r.text("value", required=True))
    if "regex" in required:
        source = r.text("regex", required=True)
        kwargs["regex_source"] = source
        kwargs["regex"] = r.regex("regex", source)
        if op == "extract":
            kwargs["group"] = r.integer("group", 1, minimum=0)
            if kwargs["regex"] is not None and kwargs["group"] > kwargs["regex"].groups:
                r.fail(f"the regex has {kwargs['regex'].groups} groups", "group")
    if "replacement" in required:
        raw = r.text("replacement", "")
        groups = kwargs["regex"].groups if kwargs.get("regex") is not None else 0
        kwargs["replacement"] = _replacement(raw, groups, r)
    if "table" in required:
        table = r.get("table", required=True)
        if not isinstance(table, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in table.items()
        ):
            r.fail("expected a mapping of strings to strings", "table")
            table = {}
        kwargs["table"] = tuple(table.items())
        default = r.get("default")
        if default is not None and not isinstance(default, str):
            r.fail("expected a string", "default")
            default = None
        kwargs["default"] = default
    if "modulus" in required:
        kwargs["modulus"] = r.integer("modulus", 1)
    r.finish()
    return Op(**kwargs)


_GROUP_REF_RE = re.compile(r"\$(?:(\d+)|\{(\d+)\})")


def _replacement(raw: str, groups: int, r: Reader) -> str:
    """A replacement with `$1` / `${1}` group references as a re.sub template: backslashes
    are literal, references beyond the regex's groups are refused here, not at run time."""
    out = []
    pos = 0
    for m in _GROUP_REF_RE.finditer(raw):
        out.append(raw[pos : m.start()].replace("\\", "\\\\"))
        n = int(m[1] or m[2])
        if n > groups:
            r.fail(f"${n} refers to a group the regex does not have ({groups})", "replacement")
        out.append(f"\\g<{n}>")
        pos = m.end()
    out.append(raw[pos:].replace("\\", "\\\\"))
    return "".join(out)


def _transform(reader: Reader) -> tuple[Op, ...]:
    v = reader.get("transform", required=True)
    if not isinstance(v, list) or not v:
        reader.fail("expected a non-empty list of operations", "transform")
        return ()
    ops = []
    for i, item in enumerate(v):
        op = _op(Reader(item, f"{reader.where}.transform[{i}]", reader.problems))
        if op is not None:
            ops.append(op)
    return tuple(ops)


def _classify(r: Reader) -> Classify:
    chains = []
    raw_chains = r.get("chains", [])
    if not isinstance(raw_chains, list):
        r.fail("expected a list", "chains")
        raw_chains = []
    for i, item in enumerate(raw_chains):
        c = Reader(item, f"{r.where}.chains[{i}]", r.problems)
        when = _matchers(c, "when")
        sets = c.get("set", required=True)
        if (
            not isinstance(sets, Mapping)
            or not sets
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in sets.items())
        ):
            c.fail("expected a mapping of label names to values", "set")
            sets = {}
        c.finish()
        chains.append(Chain(when, tuple((k, template(v)) for k, v in sets.items())))
    tables = []
    raw_tables = r.get("tables", [])
    if not isinstance(raw_tables, list):
        r.fail("expected a list", "tables")
        raw_tables = []
    for i, item in enumerate(raw_tables):
        t = Reader(item, f"{r.where}.tables[{i}]", r.problems)
        source = t.text("source", required=True)
        target = t.text("target", required=True)
        values = t.get("values", required=True)
        if not isinstance(values, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()
        ):
            t.fail("expected a mapping of strings to strings", "values")
            values = {}
        default = t.get("default")
        if default is not None and not isinstance(default, str):
            t.fail("expected a string", "default")
            default = None
        t.finish()
        tables.append(Table(source, target, tuple(values.items()), default))
    if not chains and not tables:
        r.fail("give `chains`, `tables` or both")
    r.finish()
    return Classify(tuple(chains), tuple(tables))


def _rule(item: Any, i: int, problems: list[str], default_dead_after: float) -> Rule | None:
    name = item.get("name") if isinstance(item, Mapping) else None
    where = f"rules[{i}]" + (f" ({name})" if isinstance(name, str) and name else "")
    r = Reader(item, where, problems)
    before = len(problems)
    name = r.text("name", required=True)
    action = r.choice("action", ACTIONS)
    if not action:  # settings of any kind cannot be checked against an unknown action
        r.used.update(k for k in ("sample", "downsample", "aggregate", "transform", "classify"))
    match = read_match(r)
    owner = r.get("labels", {})
    if not isinstance(owner, Mapping) or not all(
        isinstance(k, str) and LABEL_NAME_RE.match(k) and isinstance(v, str)
        for k, v in owner.items()
    ):
        r.fail("expected a mapping of label names to strings", "labels")
        owner = {}
    dead_after = r.duration("dead_after", default_dead_after)
    settings: Any = None
    if action == "sample":
        sub = r.sub("sample")
        settings = _sample(sub) if sub else None
    elif action == "downsample":
        sub = r.sub("downsample")
        settings = _downsample(sub) if sub else None
    elif action == "aggregate":
        sub = r.sub("aggregate")
        settings = _aggregate(sub) if sub else None
    elif action == "transform":
        settings = _transform(r)
    elif action == "classify":
        sub = r.sub("classify")
        settings = _classify(sub) if sub else None
    for other in ("sample", "downsample", "aggregate", "transform", "classify"):
        if action and other != action and other in r.data:
            r.get(other)
            r.fail(f"settings for {other!r}, but the action is {action!r}", other)
    r.finish()
    if len(problems) > before:
        return None
    return Rule(name, action, match, settings, tuple(owner.items()), dead_after)


def top_reader(text: str, problems: list[str], error: type[RulesError] = RulesError) -> Reader:
    """A Reader over a YAML file's top level (an empty file reads as an empty mapping); raises
    `error` with the parser's one-line message when the text is not YAML."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error([f"<yaml>: {' '.join(str(e).split())}"]) from None
    return Reader(data if data is not None else {}, "<top>", problems)


def load_rules(text: str) -> RuleSet:
    """Parse and validate a rules file; raises RulesError listing every problem."""
    problems: list[str] = []
    top = top_reader(text, problems)
    dead_after = top.duration("dead_after", 3600.0)
    raw = top.get("rules", [])
    top.finish()
    if not isinstance(raw, list):
        raise RulesError([*problems, "rules: expected a list of rules"])
    rules = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        rule = _rule(item, i, problems, dead_after)
        if rule is None:
            continue
        if rule.name in seen:
            problems.append(
                f"rules[{i}] ({rule.name}).name: also the name of rules[{seen[rule.name]}]"
            )
        seen.setdefault(rule.name, i)
        rules.append(rule)
    if problems:
        raise RulesError(problems)
    return RuleSet(tuple(rules), dead_after)
