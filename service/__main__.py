"""Command line: flags + YAML -> Config, logging, then trio.run(App.run).

Flags override the YAML file. `--check-config` validates and exits; `--print-config` prints the
effective configuration. Exit status: 0 ok, 2 bad configuration or flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import trio
import yaml

from service import __version__
from service.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_yaml,
    redact,
    set_path,
    to_dict,
)

# flag -> (config path, type, help)
_FLAGS: dict[str, tuple[str, type, str]] = {
    "--prw-listen": ("prw.receiver.listen", str, "PRW receiver address, host:port (default :9091)"),
    "--otlp-grpc-listen": (
        "otlp.receiver.grpc.listen",
        str,
        "OTLP/gRPC receiver address (default :4317; empty turns it off)",
    ),
    "--otlp-http-listen": (
        "otlp.receiver.http.listen",
        str,
        "OTLP/HTTP receiver address (default :4318; empty turns it off)",
    ),
    "--telemetry-listen": (
        "telemetry.listen",
        str,
        "/metrics, /live and /ready address (default :8888)",
    ),
    "--rules-file": ("rules.file", str, "rules file (YAML); reloaded on SIGHUP"),
    "--limits-file": ("limits.file", str, "limits file (YAML); reloaded on SIGHUP"),
    "--stats-level": ("stats.level", str, "none, basic or full"),
    "--log-level": ("log.level", str, "debug, info, warning or error"),
    "--log-format": ("log.format", str, "json or logfmt"),
    "--shutdown-grace": ("shutdown_grace_s", float, "seconds to drain on SIGTERM before dropping"),
    "--queue-max-bytes": ("prw.queue.max_bytes", str, "queue byte limit per exporter, e.g. 256MiB"),
    "--queue-full-behavior": ("prw.queue.full_behavior", str, "block, drop_oldest or drop_newest"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="governor",
        epilog="`governor rules test --rules FILE --input SAMPLE` tries a rules file on a sample "
        "(docs/rules.md).",
        description="Metrics governance proxy: receives OTLP metrics and Prometheus Remote "
        "Write, forwards them.",
    )
    p.add_argument("--config", type=Path, help="YAML configuration file")
    for flag, (_, tp, help_) in _FLAGS.items():
        p.add_argument(flag, type=tp, help=help_)
    p.add_argument(
        "--prw-export-url",
        action="append",
        metavar="URL",
        help="remote-write URL to forward to; repeat for fan-out (replaces prw.exporters)",
    )
    p.add_argument(
        "--otlp-export-endpoint",
        action="append",
        metavar="ENDPOINT",
        help="OTLP endpoint to forward to (gRPC host:port, or an http(s) URL); repeat for "
        "fan-out (replaces otlp.exporters)",
    )
    p.add_argument(
        "--otlp-export-protocol",
        choices=("grpc", "http"),
        help="protocol of the --otlp-export-endpoint endpoints (default grpc)",
    )
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument(
        "--print-config", action="store_true", help="print the effective config and exit"
    )
    p.add_argument("--version", action="version", version=f"governor {__version__}")
    return p


def load_config(args: argparse.Namespace) -> Config:
    """The effective config: the YAML file, then the flags on top. Raises ConfigError."""
    data: dict[str, Any] = {}
    if args.config is not None:
        try:
            text = args.config.read_text()
        except OSError as e:
            raise ConfigError([f"--config: cannot read {args.config}: {e.strerror}"]) from None
        data = load_yaml(text)
    for flag, (path, _, _) in _FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            set_path(data, path, value)
    if args.prw_export_url:
        set_path(data, "prw.exporters", [{"url": u} for u in args.prw_export_url])
    if args.otlp_export_endpoint:
        protocol = {"protocol": args.otlp_export_protocol} if args.otlp_export_protocol else {}
        set_path(
            data,
            "otlp.exporters",
            [{"endpoint": e, **protocol} for e in args.otlp_export_endpoint],
        )
    elif args.otlp_export_protocol:
        raise ConfigError(["--otlp-export-protocol: needs --otlp-export-endpoint"])
    return config_from_dict(data)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rules"]:
        from service import rules_cli

        return rules_cli.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)
    except ConfigError as e:
        print(f"governor: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        yaml.safe_dump(redact(to_dict(cfg)), sys.stdout, sort_keys=False)
        return 0
    if cfg.rules.file:
        from service.governance.rules import RulesError, load_rules

        try:
            load_rules(Path(cfg.rules.file).read_text())
        except RulesError as e:
            print(f"governor: {cfg.rules.file}: {e}", file=sys.stderr)
            return 2
    if cfg.limits.file:
        from service.governance.limits import LimitsError, load_limits

        try:
            load_limits(Path(cfg.limits.file).read_text())
        except LimitsError as e:
            print(f"governor: {cfg.limits.file}: {e}", file=sys.stderr)
            return 2
    if args.check_config:
        print("configuration is valid", file=sys.stderr)
        return 0
    from service import allocator
    from service.app import App
    from service.queue import QueueLockedError
    from service.telemetry import logs

    logs.setup(cfg.log.level, cfg.log.format)
    if not allocator.tune():
        logs.get("app").info("malloc is not glibc's: allocator left as it is")
    try:
        trio.run(App(cfg).run)
    except QueueLockedError as e:
        print(
            f"governor: {e}; is another governor running with the same prw.queue.dir?",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
