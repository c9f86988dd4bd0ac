"""Per-rule metrics, read from the engines' RuleStats when /metrics is scraped.

A rule's ownership labels (team, channel ...) appear on each of its series; rules without one of
the keys get an empty value, so every family keeps one label set.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.governance.engine import RuleEngine

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
