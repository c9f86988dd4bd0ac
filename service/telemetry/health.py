"""Process health as /live and /ready report it: starting -> ready -> draining."""

from __future__ import annotations


class Health:
    """Readiness state shared by the app (which moves it) and the HTTP servers (which report it)."""

    def __init__(self) -> None:
        self.state = "starting"

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
