"""Process health as /live and /ready report it: starting -> ready -> draining."""

from __future__ import annotations

from collections.abc import Callable


class Health:
    """Readiness state shared by the app (which moves it) and the HTTP servers (which report it)."""

    def __init__(self) -> None:
        self.state = "starting"
        # Each check returns "" when fine, else a one-line problem that makes /ready answer 503.
        self.checks: list[Callable[[], str]] = []

    def problems(self) -> list[str]:
        """What currently keeps a running governor from being ready."""
        return [p for check in self.checks if (p := check())]

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def draining(self) -> bool:
        return self.state == "draining"

    def set(self, state: str) -> None:
        assert state in ("starting", "ready", "draining"), state
        self.state = state

    def __repr__(self) -> str:
        return f"<Health {self.state}>"
