"""Structured logging: one JSON object or one logfmt line per record, on stderr.

Callers pass fields with `extra={"fields": {...}}` (or use `log()`); nothing here runs per
datapoint. `RateLimited` keeps a flood of bad requests from becoming a flood of log lines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STD = set(vars(logging.makeLogRecord({})))


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        if self.fmt == "json":
            return json.dumps(out, default=str)
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in out.items())


def _logfmt_value(v: Any) -> str:
    s = json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)
    if not s or any(c in s for c in ' ="\n'):
        return json.dumps(s)
    return s


def setup(level: str, fmt: str) -> None:
    """Route every `governor.*` log record to stderr in `fmt` ('json' or 'logfmt')."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    root = logging.getLogger("governor")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # hypercorn logs every error with its own format; keep its records structured too.
    for name in ("hypercorn.error",):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.propagate = False


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"governor.{name}")


def log(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log `msg` with structured `fields`."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})


class RateLimited:
    """Logs a warning per key at most once per `interval_s`, counting what it held back."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._next[key] = now + self.interval_s
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        log(self.logger, logging.WARNING, msg, **fields)
