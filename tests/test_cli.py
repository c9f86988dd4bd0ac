"""Tests for the command line (service/__main__.py): config loading with flags on top of YAML,
--check-config, --print-config and exit codes. Nothing here starts the proxy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service import __version__
from service.__main__ import build_parser, load_config, main
from service.config import ConfigError, MiB, PRWExporterConfig, config_from_dict, to_dict

ROOT = Path(__file__).resolve().parent.parent
URL = "http://127.0.0.1:9090/api/v1/write"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "governor.yaml"
    path.write_text(text)
    return path


VALID = f"""
log:
  level: debug
prw:
  receiver:
    listen: ":1111"
  queue:
    max_bytes: 1MiB
  exporters:
    - url: {URL}
      name: main
      workers: 3
shutdown_grace_s: 5
"""


def test_check_config_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check-config on a valid file exits 0, says so on stderr and prints nothing else."""
    path = write(tmp_path, VALID)
    assert main(["--check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("", "configuration is valid\n")


def test_check_config_invalid_prints_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check-config on an invalid file exits 2 and prints every problem, one per line."""
    path = write(
        tmp_path,
        """
log:
  level: loud
prw:
  batch:
    interval_s: 0
  exporters:
    - url: ftp://backend
      timeot_s: 3
shutdown_grace_s: -1
""",
    )
    assert main(["--check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "governor: invalid configuration:\n"
        "  log.level: 'loud' is not one of debug, info, warning, error\n"
        "  prw.batch.interval_s: must be > 0\n"
        "  prw.exporters[0].timeot_s: unknown key\n"
        "  prw.exporters[0].url: 'ftp://backend' is not an http:// or https:// URL\n"
        "  shutdown_grace_s: must be > 0\n"
    )


def test_check_config_checks_the_limits_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check-config reads the limits file too: a bad one exits 2 with every problem, each
    with the limit's name and the key's path; a good one passes."""
    limits = tmp_path / "limits.yaml"
    limits.write_text("limits:\n  - name: x\n    max_series: -1\n    bogus: 1\n")
    path = write(tmp_path, VALID + f"limits:\n  file: {limits}\n")
    assert main(["--check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"governor: {limits}: invalid limits:\n"
        "  limits[0] (x).max_series: must be >= 0\n"
        "  limits[0] (x).bogus: unknown key\n"
    )
    limits.write_text("limits:\n  - {name: x, group_by: [service], max_series: 10}\n")
    assert main(["--check-config", "--config", str(path)]) == 0
    assert capsys.readouterr() == ("", "configuration is valid\n")


def test_check_config_without_exporter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file without exporters in either pipeline, and no export flag, is invalid."""
    path = write(tmp_path, "log:\n  level: info\n")
    assert main(["--check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        "governor: invalid configuration:\n"
        "  prw.exporters, otlp.exporters: at least one exporter is required "
        "(or --prw-export-url / --otlp-export-endpoint)\n"
    )


def test_bad_yaml_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that is not YAML exits 2 with a single <yaml> problem line."""
    path = write(tmp_path, "prw: [unclosed\n")
    assert main(["--check-config", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "governor: invalid configuration:"
    assert len(lines) == 2
    assert lines[1].startswith("  <yaml>: ")


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config file that does not exist is one clear problem (no traceback) and exit 2."""
    path = tmp_path / "nope.yaml"
    assert main(["--check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "governor: invalid configuration:\n"
        f"  --config: cannot read {path}: No such file or directory\n"
    )


def test_config_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --config that is not a readable file is reported the same way."""
    assert main(["--check-config", "--config", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"governor: invalid configuration:\n  --config: cannot read {tmp_path}: Is a directory\n"
    )


def test_flags_override_yaml(tmp_path: Path) -> None:
    """Each flag replaces the value from the file; settings without a flag keep the file's."""
    path = write(tmp_path, VALID)
    args = build_parser().parse_args(
        [
            "--config",
            str(path),
            "--log-level",
            "error",
            "--log-format",
            "logfmt",
            "--prw-listen",
            "127.0.0.1:0",
            "--telemetry-listen",
            "[::1]:0",
            "--queue-max-bytes",
            "2MiB",
            "--queue-full-behavior",
            "drop_newest",
            "--shutdown-grace",
            "2.5",
        ]
    )
    cfg = load_config(args)
    assert (cfg.log.level, cfg.log.format) == ("error", "logfmt")
    assert cfg.prw.receiver.listen == "127.0.0.1:0"
    assert cfg.telemetry.listen == "[::1]:0"
    assert (cfg.prw.queue.max_bytes, cfg.prw.queue.full_behavior) == (2 * MiB, "drop_newest")
    assert cfg.shutdown_grace_s == 2.5
    assert cfg.prw.exporters == [PRWExporterConfig(url=URL, name="main", workers=3)]


def test_yaml_alone(tmp_path: Path) -> None:
    """Without flags, the file's values are the config."""
    cfg = load_config(build_parser().parse_args(["--config", str(write(tmp_path, VALID))]))
    assert cfg.log.level == "debug"
    assert cfg.prw.receiver.listen == ":1111"
    assert cfg.prw.queue.max_bytes == MiB
    assert cfg.shutdown_grace_s == 5.0


def test_flags_alone() -> None:
    """Flags work without a config file; everything else is the default."""
    cfg = load_config(
        build_parser().parse_args(["--prw-export-url", URL, "--log-level", "warning"])
    )
    assert cfg.log.level == "warning"
    assert cfg.prw.exporters == [PRWExporterConfig(url=URL)]
    assert cfg.prw.receiver.listen == ":9091"


def test_export_url_flags_replace_exporters(tmp_path: Path) -> None:
    """Repeated --prw-export-url replaces the file's exporters with one per URL, in order."""
    path = write(tmp_path, VALID)
    a, b = "http://a:8428/api/v1/write", "https://b/api/v1/push"
    args = build_parser().parse_args(
        ["--config", str(path), "--prw-export-url", a, "--prw-export-url", b]
    )
    cfg = load_config(args)
    assert cfg.prw.exporters == [PRWExporterConfig(url=a), PRWExporterConfig(url=b)]


def test_invalid_flag_values_are_config_problems() -> None:
    """Flag values are validated like file values, and every problem is reported."""
    args = build_parser().parse_args(
        [
            "--prw-export-url",
            "not-a-url",
            "--log-level",
            "loud",
            "--queue-max-bytes",
            "12 parsecs",
            "--prw-listen",
            "9091",
        ]
    )
    with pytest.raises(ConfigError) as info:
        load_config(args)
    assert info.value.problems == [
        "log.level: 'loud' is not one of debug, info, warning, error",
        "prw.receiver.listen: '9091' is not host:port",
        "prw.queue.max_bytes: '12 parsecs' is not a size like 64MiB",
        "prw.exporters[0].url: 'not-a-url' is not an http:// or https:// URL",
    ]


def test_unparsable_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A flag value of the wrong type is an argparse error: exit status 2."""
    with pytest.raises(SystemExit) as info:
        main(["--shutdown-grace", "soon", "--check-config"])
    assert info.value.code == 2
    assert "--shutdown-grace: invalid float value: 'soon'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the program name and version and exits 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"governor {__version__}\n"


def test_print_config_round_trips_and_hides_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--print-config prints YAML that loads back into the same config, except that passwords,
    bearer tokens, header values and URL credentials are replaced by <redacted>."""
    path = write(
        tmp_path,
        """
prw:
  exporters:
    - url: https://alice:url-secret@a.example/api/v1/write
      bearer_token: token-secret
      headers:
        X-Api-Key: header-secret
    - url: http://b.example/api/v1/write
      basic_auth:
        username: bob
        password: password-secret
""",
    )
    assert main(["--print-config", "--config", str(path), "--log-level", "debug"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for secret in ("url-secret", "token-secret", "password-secret", "header-secret"):
        assert secret not in out
    printed = config_from_dict(yaml.safe_load(out))
    assert printed.log.level == "debug"
    a, b = printed.prw.exporters
    assert a.url == "https://<redacted>@a.example/api/v1/write"
    assert a.bearer_token == "<redacted>"
    assert a.headers == {"X-Api-Key": "<redacted>"}
    assert b.basic_auth is not None
    assert (b.basic_auth.username, b.basic_auth.password) == ("bob", "<redacted>")
    # Apart from the secrets, the printed config is the effective one.
    real = load_config(build_parser().parse_args(["--config", str(path), "--log-level", "debug"]))
    assert to_dict(printed)["prw"]["receiver"] == to_dict(real)["prw"]["receiver"]
    assert (printed.log, printed.telemetry, printed.shutdown_grace_s) == (
        real.log,
        real.telemetry,
        real.shutdown_grace_s,
    )


def test_print_config_without_secrets_is_exact(capsys: pytest.CaptureFixture[str]) -> None:
    """With no secrets, the printed YAML is the config itself, in the file's shape."""
    assert main(["--print-config", "--prw-export-url", URL]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(build_parser().parse_args(["--prw-export-url", URL]))
    assert data == to_dict(expected)
    assert config_from_dict(data) == expected


def test_check_config_in_a_subprocess() -> None:
    """`python -m service --check-config --prw-export-url ...` exits 0 without starting anything."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "--check-config",
            "--prw-export-url",
            "http://127.0.0.1:1/api/v1/write",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "configuration is valid\n")
