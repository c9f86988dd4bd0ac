"""`governor rules test`: run a rules file over a small sample and print what would come out.

Input: a Prometheus text exposition (the remote-write pipeline's view) or an OTLP JSON
ExportMetricsServiceRequest (the OTLP pipeline's view). Every open window is emitted at the end.
Nothing listens and nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from service._proto.prometheus.remote_pb2 import WriteRequest
from service.codec import otlp
from service.codec.errors import CodecError
from service.governance import otlp as governance_otlp
from service.governance import prw as governance_prw
from service.governance.engine import RuleEngine
from service.governance.rules import RulesError, load_rules


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="governor rules",
        description="Try a rules file on a sample before deploying it.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("test", help="run the rules over a sample and print the result")
    t.add_argument("--rules", type=Path, required=True, help="rules file (YAML)")
    t.add_argument(
        "--input",
        type=Path,
        required=True,
        help="sample: Prometheus text exposition, or OTLP JSON (ExportMetricsServiceRequest)",
    )
    t.add_argument(
        "--format",
        choices=("auto", "prometheus", "otlp-json"),
        default="auto",
        help="the sample's format (auto: JSON when it starts with '{')",
    )
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        ruleset = load_rules(args.rules.read_text())
        sample = args.input.read_text()
    except OSError as e:
        print(f"governor rules: {e}", file=sys.stderr)
        return 2
    except RulesError as e:
        print(f"governor rules: {args.rules}: {e}", file=sys.stderr)
        return 2
    fmt = args.format
    if fmt == "auto":
        fmt = "otlp-json" if sample.lstrip().startswith("{") else "prometheus"
    try:
        if fmt == "otlp-json":
            out = run_otlp(RuleEngine(ruleset, pipeline="otlp"), sample.encode())
        else:
            out = run_prometheus(RuleEngine(ruleset, pipeline="prw"), sample)
    except (CodecError, ValueError) as e:
        print(f"governor rules: {args.input}: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    return 0


def exposition_to_write_request(text: str, now_ms: int) -> WriteRequest:
    """One series per exposition sample (histogram and summary lines as they are written)."""
    req = WriteRequest()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            ts = req.timeseries.add()
            labels = sorted({**s.labels, "__name__": s.name}.items())
            ts.labels.extend(governance_prw.Label(name=k, value=v) for k, v in labels)
            stamp = round(s.timestamp * 1000) if s.timestamp is not None else now_ms
            ts.samples.add(value=s.value, timestamp=stamp)
    return req


def write_request_to_exposition(req: WriteRequest) -> str:
    lines = []
    for ts in req.timeseries:
        name = governance_prw.series_name(ts)
        labels = ",".join(
            f'{lb.name}="{_escape(lb.value)}"' for lb in ts.labels if lb.name != "__name__"
        )
        for s in ts.samples:
            lines.append(f"{name}{{{labels}}} {s.value!r} {s.timestamp}")
        for _ in ts.histograms:
            lines.append(f"{name}{{{labels}}} <native histogram>")
    return "\n".join(lines) + ("\n" if lines else "")


def run_prometheus(engine: RuleEngine, text: str) -> str:
    now_ms = int(time.time() * 1000)
    data = exposition_to_write_request(text, now_ms).SerializeToString()
    # Series by series (not the cached path, which forwards kept series first): the output
    # keeps the sample's order.
    governed = governance_prw.govern_each(engine, data)
    out = WriteRequest.FromString(governed.data if governed.data is not None else data)
    emitted = engine.due(force=True)
    if emitted:
        out.MergeFromString(governance_prw.encode(emitted)[0])
    return write_request_to_exposition(out)


def run_otlp(engine: RuleEngine, data: bytes) -> str:
    admitted = governance_otlp.apply(engine, otlp.admit(data, json_body=True))
    req = otlp.decode(admitted.data)
    emitted = engine.due(force=True)
    if emitted:
        req.MergeFromString(governance_otlp.encode(emitted)[0])
    return json.dumps(json.loads(otlp.encode_json(req)), indent=2) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
