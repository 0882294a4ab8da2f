"""Log setup shared by the gateway, the worker and the launcher: readable lines, or one JSON object per line.

Only the standard library, so the worker and the launcher can use it without pulling in the gateway.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger, message, and every `extra` field."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = "info", format: str = "text") -> None:
    """Set up the root logger once per process; uvicorn's loggers propagate to it."""
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness poll
