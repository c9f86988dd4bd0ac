"""The files in deploy/ are valid for the tools that read them, and agree with each other and
with governor's configuration: compose file, systemd unit, Dockerfile, governor configs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from service import __main__ as cli
from service.config import Config, config_from_dict, load_yaml, parse_listen
from service.governance.limits import load_limits

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
UNIT = DEPLOY / "governor.service"
DOCKERFILE = DEPLOY / "Dockerfile"
GOVERNOR_CONFIGS = [DEPLOY / "governor.yaml", DEPLOY / "compose" / "governor.yaml"]


def _compose_command() -> list[str]:
    """`docker compose` when the v2 plugin works, else Debian's `docker-compose` (v1)."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=60, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.fail(
        "neither `docker compose` nor `docker-compose` found: apt-get install docker-compose"
    )


def _seconds(value: str) -> float:
    """'45s', '45', '1min 30s', '2m' -> seconds (the subset systemd and compose use here)."""
    total = 0.0
    for part in value.replace("min", "m").split():
        if part.endswith("ms"):
            total += float(part[:-2]) / 1000
        elif part.endswith("s"):
            total += float(part[:-1])
        elif part.endswith("m"):
            total += float(part[:-1]) * 60
        else:
            total += float(part)
    return total


def _max_grace_s() -> float:
    """The longest shutdown_grace_s of the default config and both deploy configs."""
    graces = [Config().shutdown_grace_s]
    for path in GOVERNOR_CONFIGS:
        graces.append(config_from_dict(load_yaml(path.read_text())).shutdown_grace_s)
    return max(graces)


# ---- docker compose ---------------------------------------------------------------------------


def test_compose_config_is_accepted() -> None:
    """`docker compose -f deploy/docker-compose.yml config` (or docker-compose v1) exits 0, and its
    resolved output has exactly the services governor, victoria-metrics and prometheus; governor is
    built with deploy/Dockerfile from the repository root, and every bind-mounted file exists."""
    result = subprocess.run(
        [*_compose_command(), "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"governor", "victoria-metrics", "prometheus"}
    build = resolved["services"]["governor"]["build"]
    assert Path(build["context"]).resolve() == ROOT
    assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKERFILE
    for service in resolved["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("/"):
                assert Path(source).is_file(), source


def test_compose_services_are_wired_to_each_other() -> None:
    """In the compose setup: governor's mounted config listens on all interfaces (host 0.0.0.0)
    for remote write and telemetry and forwards to http://victoria-metrics:8428/...; Prometheus
    remote-writes to http://governor:<receiver port>/api/v1/write with retry_on_http_429 true and
    scrapes governor:<telemetry port>; compose publishes both governor ports; governor's
    stop_grace_period is longer than its shutdown_grace_s; every service has a healthcheck; the
    data of victoria-metrics and prometheus lives in named volumes."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    gov = services["governor"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gov["volumes"]}
    cfg_path = (DEPLOY / mounts["/etc/governor/governor.yaml"]).resolve()
    assert cfg_path == DEPLOY / "compose" / "governor.yaml"
    cfg = config_from_dict(load_yaml(cfg_path.read_text()))
    rw_host, rw_port = parse_listen(cfg.prw.receiver.listen)
    tel_host, tel_port = parse_listen(cfg.telemetry.listen)
    assert (rw_host, tel_host) == ("0.0.0.0", "0.0.0.0")
    assert [urlsplit(e.url).netloc for e in cfg.prw.exporters] == ["victoria-metrics:8428"]
    assert {f"{rw_port}:{rw_port}", f"{tel_port}:{tel_port}"} <= set(gov["ports"])
    assert _seconds(gov["stop_grace_period"]) > cfg.shutdown_grace_s

    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    prom = yaml.safe_load((DEPLOY / prom_mounts["/etc/prometheus/prometheus.yml"]).read_text())
    [remote_write] = prom["remote_write"]
    assert remote_write["url"] == f"http://governor:{rw_port}/api/v1/write"
    assert remote_write["queue_config"]["retry_on_http_429"] is True
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert f"governor:{tel_port}" in targets

    assert all("healthcheck" in s for s in services.values())
    assert set(compose["volumes"]) == {"vm-data", "prometheus-data"}


def test_prometheus_config_passes_promtool() -> None:
    """`promtool check config deploy/compose/prometheus.yml` exits 0 (promtool comes with the
    Debian prometheus package that `make peers` installs)."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: run `make peers` (Debian package prometheus)"
    result = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "compose" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- governor configurations ------------------------------------------------------------------


@pytest.mark.parametrize("path", GOVERNOR_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_deploy_configs_pass_check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`governor --check-config --config <file>` returns 0 and prints exactly
    'configuration is valid' on stderr, for deploy/governor.yaml and
    deploy/compose/governor.yaml."""
    assert cli.main(["--check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().err == "configuration is valid\n"


def test_deploy_limits_example_passes_check_config_in_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """deploy/limits.yaml, the example deploy/governor.yaml points at in a comment, is a valid
    limits file that starts in dry run: uncommenting it cannot drop anything by surprise."""
    text = (DEPLOY / "governor.yaml").read_text()
    assert "# limits:\n#   file: deploy/limits.yaml\n" in text
    config = tmp_path / "governor.yaml"
    config.write_text(
        text.replace(
            "# limits:\n#   file: deploy/limits.yaml\n",
            "limits:\n  file: " + str(DEPLOY / "limits.yaml") + "\n",
        )
    )
    assert cli.main(["--check-config", "--config", str(config)]) == 0
    assert capsys.readouterr().err == "configuration is valid\n"
    assert load_limits((DEPLOY / "limits.yaml").read_text()).dry_run is True


# ---- systemd ----------------------------------------------------------------------------------


def _unit_options(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_has_restart_state_and_hardening() -> None:
    """deploy/governor.service [Service] sets exactly: Type=simple, Restart=on-failure,
    StateDirectory=governor, KillSignal=SIGTERM, DynamicUser=yes, the hardening options
    (NoNewPrivileges, ProtectSystem=strict, ProtectHome, PrivateTmp, PrivateDevices,
    ProtectKernelTunables/Modules, ProtectControlGroups, RestrictAddressFamilies=AF_INET AF_INET6
    AF_UNIX, RestrictNamespaces, LockPersonality, MemoryDenyWriteExecute,
    SystemCallArchitectures=native, an empty CapabilityBoundingSet), a RestartSec and a
    LimitNOFILE; ExecStart runs /opt/governor/.venv/bin/governor --config
    /etc/governor/governor.yaml; TimeoutStopSec is longer than every shutdown_grace_s in use;
    [Install] WantedBy=multi-user.target."""
    unit = _unit_options(UNIT.read_text())
    service = {k: v[-1] for k, v in unit["Service"].items()}
    expected = {
        "Type": "simple",
        "Restart": "on-failure",
        "StateDirectory": "governor",
        "KillSignal": "SIGTERM",
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert _seconds(service["RestartSec"]) > 0
    assert int(service["LimitNOFILE"]) >= 4096
    assert service["ExecStart"] == (
        "/opt/governor/.venv/bin/governor --config /etc/governor/governor.yaml"
    )
    assert _seconds(service["TimeoutStopSec"]) > _max_grace_s()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` exits 0 on the unit, with /opt/governor/.venv/bin/governor
    replaced by this virtualenv's governor script (verify requires the executable to exist).
    systemd-analyze comes with Debian's systemd package, which `make peers` installs if missing."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: run `make peers` (package systemd)"
    governor = Path(sys.executable).parent / "governor"
    assert governor.is_file(), "governor is not installed in this virtualenv"
    unit = tmp_path / "governor.service"
    unit.write_text(UNIT.read_text().replace("/opt/governor/.venv/bin/governor", str(governor)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Dockerfile -------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with backslash continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_unprivileged_with_healthcheck_and_ports() -> None:
    """deploy/Dockerfile: every stage is FROM python:3.11-slim; the final USER is neither root
    nor uid 0; EXPOSE lists 9091 and 8888 (the default receiver and telemetry ports of the config
    classes); there is a HEALTHCHECK whose URL (GOVERNOR_HEALTHCHECK_URL) is /live on the telemetry
    port; STOPSIGNAL SIGTERM; ENTRYPOINT ["governor"]; CMD ["--config",
    "/etc/governor/governor.yaml"]; and every COPY from the build context names files that exist
    in the repository."""
    steps = _instructions(DOCKERFILE.read_text())
    kinds = [k for k, _ in steps]
    assert {args.split()[0] for k, args in steps if k == "FROM"} == {"python:3.11-slim"}
    user = [args for k, args in steps if k == "USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    default = Config()
    ports = {
        str(parse_listen(default.prw.receiver.listen)[1]),
        str(parse_listen(default.telemetry.listen)[1]),
    }
    exposed = {p for k, args in steps if k == "EXPOSE" for p in args.split()}
    assert ports == {"9091", "8888"}
    assert ports <= exposed
    assert "HEALTHCHECK" in kinds
    env = " ".join(args for k, args in steps if k == "ENV")
    assert "GOVERNOR_HEALTHCHECK_URL=http://127.0.0.1:8888/live" in env
    assert [args for k, args in steps if k == "STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads([args for k, args in steps if k == "ENTRYPOINT"][-1]) == ["governor"]
    assert json.loads([args for k, args in steps if k == "CMD"][-1]) == [
        "--config",
        "/etc/governor/governor.yaml",
    ]
    for kind, args in steps:
        if kind == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
