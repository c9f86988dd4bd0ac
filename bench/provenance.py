"""Which governor code a benchmark measured, for its JSON and its printed header."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

_CHECKOUT = Path(__file__).resolve().parent.parent


def code_state(pkg: Path) -> dict[str, Any]:
    """Where the `service` package `pkg` is, the sha256 of its sources (paths and contents;
    comparable across benchmarks), and HEAD and the files of service/ changed but not committed
    when it is this checkout's (read-only git)."""
    pkg = pkg.resolve()
    root = pkg.parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    state: dict[str, Any] = {"service_path": str(pkg), "service_sha256": h.hexdigest()[:16]}
    if root != _CHECKOUT:
        return state
    git = ["git", "-C", str(root)]
    try:
        state["head"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "service"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        state["service_changes"] = [line[3:] for line in status.splitlines()]
    except (OSError, subprocess.SubprocessError):
        pass
    return state
