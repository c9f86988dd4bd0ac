"""Tests for `governor rules test` (service/rules_cli.py, reached as `governor rules ...` through
service.__main__.main): a rules file over a sample, and exactly what would be forwarded.

docs/rules.md, *Trying rules*: exposition in, exposition out; OTLP JSON in, OTLP JSON out; every
open window emitted at the end; a bad rules file is exit status 2 with every problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import rules_cli
from service.__main__ import main

RULES = """
rules:
  - {name: drop-debug, match: {name: "debug_.*"}, action: drop}
  - name: tag
    match: {name: up}
    action: transform
    transform: [{op: set, label: env, value: prod}]
  - {name: cpu-1m, match: {name: cpu}, action: downsample, downsample: {interval: 1m, method: avg}}
"""


def rules_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rules: str, sample: str
) -> tuple[int, str, str]:
    """Run `governor rules test` over `rules` and `sample` (written to files): (status, stdout,
    stderr)."""
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules)
    sample_file = tmp_path / "sample"
    sample_file.write_text(sample)
    status = main(["rules", "test", "--rules", str(rules_file), "--input", str(sample_file)])
    out, err = capsys.readouterr()
    return status, out, err


def test_exposition_in_exposition_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Dropped series are gone, transformed ones carry their new labels (sorted), untouched ones
    are as written, and the downsampled series comes out at the end as its window's one point,
    stamped with the window's end: [1699999980 s, 1700000040 s) for points at ...001 s and
    ...031 s. The output is itself a valid exposition."""
    status, out, err = rules_test(
        tmp_path,
        capsys,
        RULES,
        "# TYPE up gauge\n"
        'up{job="api"} 1 1700000000000\n'
        'debug_queries{job="api"} 3 1700000000000\n'
        'cpu{host="a"} 1 1700000001000\n'
        'cpu{host="a"} 3 1700000031000\n'
        "other 7 1700000000000\n",
    )
    assert (status, err) == (0, "")
    assert out == (
        'up{env="prod",job="api"} 1.0 1700000000000\n'
        "other{} 7.0 1700000000000\n"
        'cpu{host="a"} 2.0 1700000040000\n'
    )
    assert [s.name for f in text_string_to_metric_families(out) for s in f.samples] == [
        "up",
        "other",
        "cpu",
    ]


def test_exposition_label_values_are_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Quotes, backslashes and newlines in label values are escaped as the format wants."""
    status, out, _ = rules_test(
        tmp_path, capsys, RULES, 'up{path="a\\"b\\\\c\\nd"} 1 1700000000000\n'
    )
    assert status == 0
    assert out == 'up{env="prod",path="a\\"b\\\\c\\nd"} 1.0 1700000000000\n'


def test_exposition_lines_without_a_timestamp_get_the_current_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line without a timestamp is stamped with the current time (in milliseconds)."""
    monkeypatch.setattr(rules_cli.time, "time", lambda: 1_700_000_000.5)
    status, out, _ = rules_test(tmp_path, capsys, RULES, 'up{job="api"} 1\n')
    assert status == 0
    assert out == 'up{env="prod",job="api"} 1.0 1700000000500\n'


def test_exposition_timestamps_come_out_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A timestamp written in the sample (milliseconds) comes out exactly as written, also where
    milliseconds / 1000 * 1000 is not exact in floating point (1001, 1015, 2002)."""
    status, out, _ = rules_test(
        tmp_path, capsys, RULES, "other 1 1001\nother 2 1015\nother 3 2002\n"
    )
    assert status == 0
    assert out == "other{} 1.0 1001\nother{} 2.0 1015\nother{} 3.0 2002\n"


def attribute(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


RESOURCE = {"attributes": [attribute("service.name", "api")]}


def test_otlp_json_in_otlp_json_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """OTLP JSON in: the same rules over an ExportMetricsServiceRequest. The dropped metric is
    gone, the transformed point has its new attribute, the downsampled metric left its scope
    (emptied) and comes back at the end under the same resource and scope, with its unit, as one
    point at the window's end. Printed as indented OTLP JSON."""
    sample = {
        "resourceMetrics": [
            {
                "resource": RESOURCE,
                "scopeMetrics": [
                    {
                        "scope": {"name": "lib"},
                        "metrics": [
                            {
                                "name": "debug_x",
                                "gauge": {
                                    "dataPoints": [
                                        {"timeUnixNano": "1700000000000000000", "asDouble": 1}
                                    ]
                                },
                            },
                            {
                                "name": "up",
                                "gauge": {
                                    "dataPoints": [
                                        {
                                            "timeUnixNano": "1700000000000000000",
                                            "asDouble": 1,
                                            "attributes": [attribute("job", "api")],
                                        }
                                    ]
                                },
                            },
                            {
                                "name": "cpu",
                                "unit": "1",
                                "gauge": {
                                    "dataPoints": [
                                        {"timeUnixNano": "1700000001000000000", "asDouble": 1},
                                        {"timeUnixNano": "1700000031000000000", "asDouble": 3},
                                    ]
                                },
                            },
                        ],
                    }
                ],
            }
        ]
    }
    status, out, err = rules_test(tmp_path, capsys, RULES, json.dumps(sample))
    assert (status, err) == (0, "")
    assert json.loads(out) == {
        "resourceMetrics": [
            {
                "resource": RESOURCE,
                "scopeMetrics": [
                    {
                        "scope": {"name": "lib"},
                        "metrics": [
                            {
                                "name": "up",
                                "gauge": {
                                    "dataPoints": [
                                        {
                                            "timeUnixNano": "1700000000000000000",
                                            "asDouble": 1.0,
                                            "attributes": [
                                                attribute("job", "api"),
                                                attribute("env", "prod"),
                                            ],
                                        }
                                    ]
                                },
                            }
                        ],
                    }
                ],
            },
            {
                "resource": RESOURCE,
                "scopeMetrics": [
                    {
                        "scope": {"name": "lib"},
                        "metrics": [
                            {
                                "name": "cpu",
                                "unit": "1",
                                "gauge": {
                                    "dataPoints": [
                                        {"timeUnixNano": "1700000040000000000", "asDouble": 2.0}
                                    ]
                                },
                            }
                        ],
                    }
                ],
            },
        ]
    }
    assert out == json.dumps(json.loads(out), indent=2) + "\n"


def test_a_bad_rules_file_is_exit_2_with_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rules file with problems: nothing runs, stdout stays empty, exit status 2, and stderr
    names the file and lists every problem, one per line."""
    status, out, err = rules_test(
        tmp_path,
        capsys,
        "rules:\n"
        "  - {name: s, action: sample, sample: {method: head, n: 0}}\n"
        "  - {name: d, action: dorp}\n",
        "up 1 1700000000000\n",
    )
    assert (status, out) == (2, "")
    assert err == (
        f"governor rules: {tmp_path / 'rules.yaml'}: invalid rules:\n"
        "  rules[0] (s).sample.n: must be >= 1\n"
        "  rules[1] (d).action: 'dorp' is not one of drop, sample, downsample, aggregate, "
        "transform, classify\n"
    )


def test_a_missing_or_bad_sample_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sample that cannot be read, or cannot be parsed, is exit status 2 with the reason."""
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    missing = tmp_path / "missing.prom"
    assert main(["rules", "test", "--rules", str(rules_file), "--input", str(missing)]) == 2
    assert capsys.readouterr() == (
        "",
        f"governor rules: [Errno 2] No such file or directory: '{missing}'\n",
    )
    status, out, err = rules_test(tmp_path, capsys, RULES, 'up{job="api" 1\n')
    assert (status, out) == (2, "")
    assert err == (
        f"governor rules: {tmp_path / 'sample'}: could not convert string to float: "
        "'{job=\"api\"'\n"
    )
