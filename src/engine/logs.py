"""The CLI's logging set-up: text or JSON lines, session and node ids on every record.

Session-scoped records carry `session_id` and `node_id` (LoggerAdapter
extras); the others show "-" in text and leave the keys out in JSON.
The library itself configures no handler; only the CLI calls `configure`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

#: third-party loggers that stay at INFO under --verbose (gRPC's poller and
#: asyncio's selector lines say nothing about this engine)
QUIET = ("grpc", "asyncio", "matplotlib", "PIL", "urllib3", "opentelemetry")
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class ContextAdapter(logging.LoggerAdapter):
    """A LoggerAdapter whose call-site `extra` (a node_id, say) adds to and overrides its own."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**self.extra, **(kwargs.get("extra") or {})}
        return msg, kwargs


def _session_context(record: logging.LogRecord) -> bool:
    if not hasattr(record, "session_id"):
        record.session_id = "-"
    if not hasattr(record, "node_id"):
        record.node_id = "-"
    return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, session_id, node_id and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and value != "-" and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(verbose: bool = False, fmt: str = "text", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_session_context)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [session=%(session_id)s node=%(node_id)s] %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


__all__ = ["ContextAdapter", "JsonFormatter", "configure"]
