"""The user docs cannot drift from the code: the configuration reference is regenerated and
compared, and every metric and reason the code can emit must be named in docs/operations.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import trio

from service import config_doc
from service.app import App
from service.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
OPERATIONS_MD = ROOT / "docs" / "operations.md"


def _mentions(text: str, token: str) -> bool:
    """`token` appears in `text` as a whole name (not as the start of a longer one)."""
    return re.search(r"(?<![\w])" + re.escape(token) + r"(?![\w])", text) is not None


def test_configuration_md_is_what_the_generator_produces() -> None:
    """docs/configuration.md is byte for byte the output of `python -m service.config_doc`
    (config_doc.generate()), so it cannot disagree with the config classes; regenerate it with
    the command written at its top when this fails."""
    assert CONFIGURATION_MD.read_text() == config_doc.generate(), (
        f"docs/configuration.md is stale; run: {config_doc.REGENERATE}"
    )


def test_every_config_key_is_described_and_every_description_is_a_key() -> None:
    """check_descriptions() over the real DESCRIPTIONS returns [] (no key without a description,
    no description without a key), and walk() finds the keys we know exist, written with `[]`
    for list items: prw.exporters[].url and prw.exporters[].basic_auth.password_file."""
    assert config_doc.check_descriptions() == []
    paths = [k.path for k in config_doc.walk()]
    assert "prw.exporters[].url" in paths
    assert "prw.exporters[].basic_auth.password_file" in paths
    assert "shutdown_grace_s" in paths


def test_check_descriptions_names_missing_and_unknown_keys() -> None:
    """With prw.queue.max_bytes removed and a made-up prw.queue.max_byte added, check_descriptions
    returns exactly the problems, one per offending path, in key order: otlp.queue.max_bytes
    shares prw.queue.max_bytes's description (SAME_AS), so it is missing too."""
    descriptions = dict(config_doc.DESCRIPTIONS)
    del descriptions["prw.queue.max_bytes"]
    descriptions["prw.queue.max_byte"] = "a typo"
    assert config_doc.check_descriptions(descriptions) == [
        "prw.queue.max_bytes: no description in service/config_doc.py",
        "otlp.queue.max_bytes: no description in service/config_doc.py",
        "prw.queue.max_byte: described in service/config_doc.py but not a config key",
    ]


def test_shared_keys_take_the_prw_description() -> None:
    """An OTLP key listed in SAME_AS (directly or under a shared section) is described by the
    PRW key it mirrors; an OTLP key with its own description keeps it."""
    d = config_doc.DESCRIPTIONS
    assert config_doc.describe("otlp.queue.mode") == d["prw.queue.mode"]
    assert config_doc.describe("otlp.exporters[].retry.jitter") == d["prw.exporters[].retry.jitter"]
    assert (
        config_doc.describe("otlp.receiver.auth.bearer_tokens")
        == (d["prw.receiver.auth.bearer_tokens"])
    )
    assert (
        config_doc.describe("otlp.receiver.ingest_max_bytes")
        == (d["otlp.receiver.ingest_max_bytes"])
    )
    assert config_doc.describe("otlp.no_such_key") == ""


def test_generator_fails_loudly_without_a_description(monkeypatch: pytest.MonkeyPatch) -> None:
    """generate() raises DocError listing 'log.level: no description ...' when that description
    is missing, and main() then prints the problem and returns 1 instead of writing a page."""
    monkeypatch.delitem(config_doc.DESCRIPTIONS, "log.level")
    with pytest.raises(config_doc.DocError) as err:
        config_doc.generate()
    assert err.value.problems == ["log.level: no description in service/config_doc.py"]
    assert config_doc.main() == 1


def test_size_defaults_are_written_in_size_syntax() -> None:
    """format_size writes the shortest exact binary unit: 16 MiB -> '16MiB', 1536 KiB ->
    '1536KiB', 1 GiB -> '1GiB', 1000 -> '1000' (no unit divides it)."""
    assert config_doc.format_size(16 * 1024 * 1024) == "16MiB"
    assert config_doc.format_size(1536 * 1024) == "1536KiB"
    assert config_doc.format_size(1024**3) == "1GiB"
    assert config_doc.format_size(1000) == "1000"


async def test_every_registered_metric_is_in_operations_md() -> None:
    """Runs an App on 127.0.0.1:0 with one exporter, reads the '# TYPE' lines of its /metrics
    rendering (so counters appear with their _total name, and the exporter's scrape-time gauges
    are included), and asserts each metric name appears as a whole name in docs/operations.md.
    The exporter gauges governor_queue_length, governor_queue_bytes,
    governor_queue_capacity_bytes, governor_queue_in_flight_batches and governor_breaker_state
    must be among the names found, so the check is not vacuous."""
    cfg = config_from_dict(
        {
            "telemetry": {"listen": "127.0.0.1:0"},
            "prw": {
                "receiver": {"listen": "127.0.0.1:0"},
                "exporters": [{"url": "http://127.0.0.1:9/api/v1/write"}],
            },
        }
    )
    app = App(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        exposition = app.metrics.render().decode()
        app.shutdown()
    names = set(re.findall(r"^# TYPE (\S+) \w+$", exposition, flags=re.MULTILINE))
    assert {
        "governor_datapoints_received_total",
        "governor_queue_length",
        "governor_queue_bytes",
        "governor_queue_capacity_bytes",
        "governor_queue_in_flight_batches",
        "governor_breaker_state",
    } <= names
    doc = OPERATIONS_MD.read_text()
    missing = sorted(n for n in names if not _mentions(doc, n))
    assert missing == []


def _string_reason(node: ast.expr) -> str | None:
    """A literal reason; in an f-string each substituted part is written '<code>'; of `a or b`,
    the first operand that is a literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BoolOp):
        found = [r for r in map(_string_reason, node.values) if r is not None]
        return found[0] if found else None
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value if isinstance(part, ast.Constant) else "<code>" for part in node.values
        )
    return None


def _reasons_in_code() -> tuple[set[str], set[str]]:
    """(drop reasons, rejection reasons) as written in service/: the second argument of every
    `.drop(n, reason)` call; the second argument of every `Rejected(status, reason, ...)` call
    and every `reason = "..."` class attribute in service/codec/errors.py."""
    drops: set[str] = set()
    rejections: set[str] = set()
    for path in (ROOT / "service").rglob("*.py"):
        if "_proto" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and len(node.args) >= 2:
                func = node.func
                if isinstance(func, ast.Attribute) and func.attr == "drop":
                    reason = _string_reason(node.args[1])
                    if reason is not None:
                        drops.add(reason)
                if isinstance(func, ast.Name) and func.id == "Rejected":
                    reason = _string_reason(node.args[1])
                    if reason is not None:
                        rejections.add(reason)
            if (
                path.name == "errors.py"
                and isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["reason"]
            ):
                reason = _string_reason(node.value)
                if reason is not None:
                    rejections.add(reason)
    return drops, rejections


def test_every_drop_and_rejection_reason_is_in_operations_md() -> None:
    """Every drop reason (`.drop(n, "reason")`, f-strings as http_<code>) and every receiver
    rejection reason (`Rejected(status, "reason")`, codec error `reason` attributes) found in
    service/ appears in backticks in docs/operations.md. The scan must find at least the known
    drop reasons queue_full, http_<code>, too_large, retries_exhausted, shutdown and the
    rejection reasons backpressure, draining, bad_protobuf, decompressed_too_large."""
    drops, rejections = _reasons_in_code()
    assert {"queue_full", "http_<code>", "too_large", "retries_exhausted", "shutdown"} <= drops
    assert {"backpressure", "draining", "bad_protobuf", "decompressed_too_large"} <= rejections
    doc = OPERATIONS_MD.read_text()
    missing = sorted(r for r in drops | rejections if f"`{r}`" not in doc)
    assert missing == []
