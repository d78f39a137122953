"""structlog setup for every triomesh process: JSON or console lines on stderr, filtered by level."""

from __future__ import annotations

import sys
from typing import Any

import msgspec
import structlog

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
FORMATS = ("json", "console")

_json = msgspec.json.Encoder(enc_hook=str)


def json_serializer(event_dict: Any, **_: Any) -> bytes:
    """structlog serializer: msgspec is several times faster than json.dumps; unknown types
    (exceptions, paths) are written as their str()."""
    return _json.encode(event_dict)


def _add_fields(fields: dict[str, Any]) -> Any:
    def processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        for k, v in fields.items():
            event_dict.setdefault(k, v)
        return event_dict

    return processor


def configure(*, level: str = "info", fmt: str = "json", **static_fields: Any) -> None:
    """Configure structlog for this process. `static_fields` (e.g. worker=0) go on every line."""
    processors: list[Any] = [structlog.processors.add_log_level,
                             structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if static_fields:
        processors.append(_add_fields(static_fields))
    if fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
        factory: Any = structlog.WriteLoggerFactory(file=sys.stderr)
    else:
        processors += [structlog.processors.dict_tracebacks,
                       structlog.processors.JSONRenderer(serializer=json_serializer)]
        factory = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(logger_name=name)
