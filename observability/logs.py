"""How every CityNerve process logs: one line per event, the same shape everywhere, no noise.

    configure_logging("INFO")              # 2026-12-06T18:40:01Z INFO citynerve.operators.hub: …
    configure_logging("INFO", fmt="json")  # {"time": "…", "level": "INFO", "logger": "…", "message": "…"}

Text is for a person at a terminal, JSON lines for a log collector (`--log-format json` of the
operators; `CITYNERVE_LOG_FORMAT=json` for processes without flags). Times are UTC. Terminal
colour codes are removed from every message, so files stay readable.

A few third-party lines are understood and harmless here, and dropped (`KNOWN_NOISE`, each
with its reason); everything else a library says at or above the configured level stays.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import IO, Any, Literal

LogFormat = Literal["text", "json"]
LOG_FORMAT_ENV = "CITYNERVE_LOG_FORMAT"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

#: (logger name prefix, message prefix): lines dropped, and why they are harmless.
KNOWN_NOISE: tuple[tuple[str, str, str], ...] = (
    ("kopf", "OS signals are ignored: running not in the main thread",
     "operators hosted on a thread (the demo, tests) stop through their stop flag, not signals"),
    ("ray", "Token authentication is enabled for this Ray cluster",
     "the local Ray cluster authenticates its clients with a token, as it should"),
    ("mlflow.pyfunc", "Passing a Python object as `python_model` causes it to be serialized",
     "a city loads a model only after checking its artifact's digest against the promotion "
     "(docs/models-trust.md), which is what this warning asks for"),
    ("urllib3.connectionpool", "Connection pool is full, discarding connection",
     "more requests at once than the client's pool keeps open; the extra connection is closed after "
     "its request, nothing is lost"),
)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class DropKnownNoise(logging.Filter):
    """Drops the `KNOWN_NOISE` lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name.startswith(name) and message.startswith(prefix)
                       for name, prefix, _ in KNOWN_NOISE)


class TextFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger>: <message>``, colour codes removed."""

    converter = staticmethod(time.gmtime)

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ")

    def format(self, record: logging.LogRecord) -> str:
        return strip_ansi(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": strip_ansi(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = strip_ansi(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def adopt_logger(name: str) -> None:
    """Send a library's logger through the process's handler (one shape, no colour codes) instead
    of its own: Ray installs a handler of its own on ``ray`` when it is imported."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


def configure_logging(level: str | int = "INFO", fmt: LogFormat | None = None,
                      stream: IO[str] | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one that writes ``fmt`` lines to ``stream`` (stderr)."""
    chosen = fmt or os.environ.get(LOG_FORMAT_ENV, "text")
    if chosen not in ("text", "json"):
        msg = f"log format {chosen!r} is not one of text, json (from {LOG_FORMAT_ENV} or --log-format)"
        raise ValueError(msg)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(DropKnownNoise())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # MLflow prints each run's and experiment's URL to stdout with emoji when a run ends; the
    # project shows the links where they matter (the report, the CLI's own output). And it gives
    # its loggers a handler of their own unless told not to: they come through this one instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name in ("ray", "mlflow"):
        if name in sys.modules:
            adopt_logger(name)
    return handler
