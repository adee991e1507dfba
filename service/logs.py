"""Structured logs: structlog events carried by stdlib logging, rendered as one JSON object a line.

Our loggers never touch global logging state, so a booking service importing the actor keeps its
own logging setup (it sees each event's message). Worker and CLI processes call ``configure``,
which renders every record, Dramatiq's included, as JSON with guest addresses and secrets masked
and no message's arguments shown.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import structlog

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_SECRET_KEYS = ("password", "token", "secret", "authorization", "api_key")
_CONTACT_KEYS = ("email", "guest_email", "guest_name", "to", "recipient", "phone")


def redact_text(text: str) -> str:
    return _EMAIL.sub("<email>", text)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        lowered = key.lower()
        if any(s in lowered for s in _SECRET_KEYS) or lowered in _CONTACT_KEYS:
            event[key] = "<redacted>"
        elif isinstance(value, str):
            event[key] = redact_text(value)
    return event


def _to_stdlib(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (event.get("event", ""),), {"extra": {"structured": dict(event)}}


_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.format_exc_info,
    _redact,
    _to_stdlib,
]


_ACTOR_CALL = "Received args=%r kwargs=%r."


def _looks_like_message(value: object) -> bool:
    return all(hasattr(value, a) for a in ("actor_name", "message_id", "args", "kwargs"))


def describe_message(message: Any) -> str:
    """A message as logs may show it: actor, id and argument names, never argument values."""
    kwargs = message.kwargs if isinstance(message.kwargs, dict) else {}
    names = ", ".join(str(k) for k in kwargs)
    positional = len(message.args) if isinstance(message.args, list | tuple) else 0
    shown = ", ".join(p for p in (f"{positional} positional" if positional else "", names) if p)
    return f"{message.actor_name}({shown}) [id {message.message_id}]"


class RedactMessageArguments(logging.Filter):
    """Replace every message object among a record's arguments by ``describe_message``.

    Dramatiq logs whole messages ("Failed to process message send_booking_email(..., guest_name=
    '...')"); a message's arguments can carry guest data whoever produced it, so no log line of
    this process shows them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(_looks_like_message(a) for a in args):
            record.args = tuple(describe_message(a) if _looks_like_message(a) else a for a in args)
        elif _looks_like_message(args):
            record.args = (describe_message(args),)
        if _looks_like_message(record.msg):
            record.msg = describe_message(record.msg)
        if record.msg == _ACTOR_CALL:  # Dramatiq's actor logs its call's values at DEBUG
            record.args = ("<redacted>", "<redacted>")
        return True


def get_logger(name: str) -> Any:
    return structlog.wrap_logger(
        logging.getLogger(name), processors=_PROCESSORS, wrapper_class=structlog.stdlib.BoundLogger
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        structured = getattr(record, "structured", None)
        if isinstance(structured, dict):
            out.update(structured)
        else:
            out["event"] = redact_text(record.getMessage())
            if record.exc_info:
                out["exception"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        structured = getattr(record, "structured", None)
        extras = ""
        if isinstance(structured, dict):
            extras = " ".join(f"{k}={v}" for k, v in structured.items() if k != "event")
        message = redact_text(record.getMessage())
        return f"{record.levelname.lower():7} {record.name}: {message} {extras}".rstrip()


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Route every log record of this process to stderr, as JSON (or plain text for humans)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    handler.addFilter(RedactMessageArguments())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pika", "UnleashClient", "apscheduler", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
