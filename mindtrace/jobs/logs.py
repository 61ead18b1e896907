"""Logging for workers: the running job's id, queue and attempt on every record, as text or JSON lines."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from mindtrace.jobs.context import current_job
from mindtrace.jobs.errors import ConfigurationError, UsageError

#: The formats :func:`configure_logging` knows.
LOG_FORMATS = ("text", "json")

#: The record attributes :class:`JobContextFilter` sets (None outside a job's run).
JOB_FIELDS = ("job_id", "queue", "attempt")


class JobContextFilter(logging.Filter):
    """Sets ``job_id``, ``queue`` and ``attempt`` on every record from the running job's context (the
    library's records and the user's alike, from an async ``run`` or the thread of a blocking one); None on
    records logged outside a run. Install it on a handler to see every logger's records. Never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            context = current_job()
        except UsageError:
            record.job_id = record.queue = record.attempt = None
        else:
            record.job_id, record.queue, record.attempt = context.job_id, context.queue, context.attempt
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, with ``[job <id> <queue> attempt <n>]`` inside a job's run."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", None)
        if job_id is None:
            return text
        head, sep, rest = text.partition(": ")
        queue, attempt = getattr(record, "queue", None), getattr(record, "attempt", None)
        return f"{head} [job {job_id} {queue} attempt {attempt}]{sep}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    ``job_id``, ``queue``, ``attempt`` (null outside a run), and ``exc_info`` (the traceback) when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in JOB_FIELDS:
            entry[name] = getattr(record, name, None)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str | int = "INFO", log_format: str = "text", stream: TextIO | None = None) -> None:
    """Log every logger's records at ``level`` and above to ``stream`` (default: stderr) as ``log_format``
    (``text`` or ``json``), each with the running job's fields (:class:`JobContextFilter`). Replaces the root
    logger's handlers. ConfigurationError for an unknown level or format."""
    if log_format not in LOG_FORMATS:
        raise ConfigurationError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    if isinstance(level, str):
        name = level.upper()
        if not isinstance(logging.getLevelName(name), int):
            raise ConfigurationError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        level = name
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
