"""Per-rule, per-limit and stats metrics, read from the engines when /metrics is scraped.

A rule's ownership labels (team, channel ...) appear on each of its series; rules without one of
the keys get an empty value, so every family keeps one label set.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.governance.cardinality import top_k
from service.governance.engine import RuleEngine
from service.governance.limits import LimitEngine, group_text
from service.governance.stats import Stats

_COUNTERS = (
    ("input", "governor_rule_input_datapoints", "Datapoints a rule matched."),
    ("output", "governor_rule_output_datapoints", "Datapoints a rule passed on or emitted."),
    ("dropped", "governor_rule_dropped_datapoints", "Datapoints a rule dropped or sampled away."),
    (
        "skipped",
        "governor_rule_skipped_datapoints",
        "Datapoints of a kind the rule does not handle (histograms for downsample and "
        "aggregate), passed on to the next rule unchanged.",
    ),
)


class RuleCollector(Collector):
    """Exposes the RuleStats of every engine (one per pipeline)."""

    def __init__(self, engines: list[RuleEngine]) -> None:
        self.engines = engines

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        owner_keys = sorted(
            {k for e in self.engines for r in e.rules for k, _ in r.labels} - {"pipeline", "rule"}
        )
        names = ["pipeline", "rule", *owner_keys]
        counters = {
            field: CounterMetricFamily(name, doc, labels=names) for field, name, doc in _COUNTERS
        }
        last = GaugeMetricFamily(
            "governor_rule_last_match_timestamp_seconds",
            "When a rule last matched (Unix time); 0 if it never did since start.",
            labels=names,
        )
        never = GaugeMetricFamily(
            "governor_rule_never_matched",
            "1 while a rule has not matched since start.",
            labels=names,
        )
        dead = GaugeMetricFamily(
            "governor_rule_dead",
            "1 while a rule has not matched for its dead_after.",
            labels=names,
        )
        for engine in self.engines:
            for rule in engine.rules:
                st = engine.stats.get(rule.name)
                if st is None:
                    continue
                owner = dict(rule.labels)
                values = [engine.pipeline, rule.name, *(owner.get(k, "") for k in owner_keys)]
                for field, fam in counters.items():
                    fam.add_metric(values, getattr(st, field))
                last.add_metric(values, st.last_match or 0.0)
                never.add_metric(values, 1.0 if st.last_match is None else 0.0)
                dead.add_metric(values, 1.0 if st.dead else 0.0)
        return [*counters.values(), last, never, dead]


class StatsCollector(Collector):
    """Exposes the stats of every pipeline, bounded: per metric only the top `k` by series and
    by datapoints."""

    def __init__(self, stats: list[Stats], k: int) -> None:
        self.stats = stats
        self.k = k

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        total = CounterMetricFamily(
            "governor_stats_datapoints",
            "Datapoints the stats counted (what clients sent, before limits and rules).",
            labels=["pipeline"],
        )
        names = GaugeMetricFamily(
            "governor_stats_metric_names", "Distinct metric names tracked.", labels=["pipeline"]
        )
        top_points = GaugeMetricFamily(
            "governor_stats_top_metric_datapoints",
            "Datapoints of the top metrics by datapoints, over the current and previous window.",
            labels=["pipeline", "metric"],
        )
        top_series = GaugeMetricFamily(
            "governor_stats_top_metric_series",
            "Active series of the top metrics by series (stats.level full).",
            labels=["pipeline", "metric"],
        )
        series = GaugeMetricFamily(
            "governor_stats_series",
            "Active series of every tracked metric together (stats.level full).",
            labels=["pipeline"],
        )
        groups = GaugeMetricFamily(
            "governor_stats_top_group_series",
            "Active series of the top label combinations of stats.labels (stats.level full).",
            labels=["pipeline", "group"],
        )
        memory = GaugeMetricFamily(
            "governor_stats_tracker_bytes",
            "Bytes held by the stats' cardinality trackers.",
            labels=["pipeline"],
        )
        for st in self.stats:
            p = st.pipeline
            total.add_metric([p], st.datapoints)
            names.add_metric([p], len(st.metrics))
            for name, n in st.top_metrics(self.k, "datapoints"):
                top_points.add_metric([p, name], n)
            if not st.full:
                continue
            for name, n in st.top_metrics(self.k, "series"):
                top_series.add_metric([p, name], n)
            series.add_metric([p], sum(c.series() for c in st.metrics.values()))
            memory.add_metric([p], st.memory_bytes())
            if st.labels:
                counts = {
                    ",".join(f"{k}={v}" for k, v in zip(st.labels, key, strict=False)): c.series()
                    for key, c in st.groups.items()
                }
                for text, n in top_k(counts, self.k):
                    groups.add_metric([p, text], n)
        return [total, names, top_points, top_series, series, groups, memory]


class LimitCollector(Collector):
    """Exposes the limits of every pipeline; per group only the top `k`."""

    def __init__(self, engines: list[LimitEngine], k: int) -> None:
        self.engines = engines
        self.k = k

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        owner_keys = sorted(
            {k for e in self.engines for lim in e.limits for k, _ in lim.labels}
            - {"pipeline", "limit", "action", "group"}
        )
        base = ["pipeline", "limit", *owner_keys]
        attempted = CounterMetricFamily(
            "governor_limit_datapoints",
            "Datapoints a limit matched (attempted, before anything was dropped).",
            labels=base,
        )
        dropped = CounterMetricFamily(
            "governor_limit_dropped_datapoints",
            "Datapoints a limit dropped, by action.",
            labels=[*base, "action"],
        )
        dry = CounterMetricFamily(
            "governor_limit_dry_run_datapoints",
            "Datapoints a limit in dry run would have dropped (or logged, action log), by action.",
            labels=[*base, "action"],
        )
        stripped = CounterMetricFamily(
            "governor_limit_stripped_datapoints",
            "Datapoints whose labels a limit stripped and re-aggregated.",
            labels=base,
        )
        groups = GaugeMetricFamily("governor_limit_groups", "Groups a limit tracks.", labels=base)
        limited = GaugeMetricFamily(
            "governor_limit_limited_groups", "Groups a limit acts on now.", labels=base
        )
        group_series = GaugeMetricFamily(
            "governor_limit_group_series",
            "Active series (attempted) of a limit's top groups by series.",
            labels=[*base, "group"],
        )
        group_points = GaugeMetricFamily(
            "governor_limit_group_datapoints",
            "Datapoints attempted by a limit's top groups by series, in the current and previous "
            "window.",
            labels=[*base, "group"],
        )
        group_dropped = GaugeMetricFamily(
            "governor_limit_group_dropped_datapoints",
            "Datapoints dropped from a limit's top groups by series, since the group appeared.",
            labels=[*base, "group"],
        )
        offenders = GaugeMetricFamily(
            "governor_limits_offenders",
            "The top groups a limit acts on, with their usage of the limit (1 = 100 %) and the "
            "action taken.",
            labels=[*base, "group", "action"],
        )
        for engine in self.engines:
            for lim in engine.limits:
                st = engine.stats.get(lim.name)
                if st is None:
                    continue
                owner = dict(lim.labels)
                values = [engine.pipeline, lim.name, *(owner.get(k, "") for k in owner_keys)]
                attempted.add_metric(values, st.datapoints)
                for action, n in sorted(st.dropped.items()):
                    dropped.add_metric([*values, action], n)
                for action, n in sorted(st.dry_run.items()):
                    dry.add_metric([*values, action], n)
                stripped.add_metric(values, st.stripped)
                all_groups = engine.groups.get(lim.name, {})
                groups.add_metric(values, len(all_groups))
                acting = [g for g in all_groups.values() if g.act is not None]
                limited.add_metric(values, len(acting))
                for g, n in engine.top_groups(lim, self.k):
                    text = group_text(lim, g.key)
                    group_series.add_metric([*values, text], n)
                    group_points.add_metric([*values, text], g.points + g.points_before)
                    group_dropped.add_metric([*values, text], g.dropped)
                worst = sorted(acting, key=lambda g: -g.usage)[: self.k]
                for g in worst:
                    assert g.act is not None
                    usage = g.usage if lim.adaptive is None else 1.0
                    offenders.add_metric([*values, group_text(lim, g.key), g.act.kind], usage)
        return [
            attempted,
            dropped,
            dry,
            stripped,
            groups,
            limited,
            group_series,
            group_points,
            group_dropped,
            offenders,
        ]
