"""How the operator commands show things: JSON for scripts, ``rich`` tables for people (the ``cli`` extra)."""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from mindtrace.jobs.backends.base import QUEUE_COUNTS, QueueStats
from mindtrace.jobs.errors import MissingDependencyError
from mindtrace.jobs.lifecycle import JobInfo, Progress
from mindtrace.jobs.schedules import ScheduleInfo
from mindtrace.jobs.types import Job

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

#: The columns of the ``queues`` table, after the queue name: each a QueueStats count.
STATS_COLUMNS: dict[str, str] = {
    "ready": "ready",
    "running": "running",
    "delayed": "delayed",
    "dead_lettered": "dead-lettered",
    "consumers": "consumers",
}

#: How a count the backend cannot know is shown in a table (None in JSON).
UNKNOWN = "-"


def require_rich() -> None:
    """MissingDependencyError naming the ``cli`` extra unless ``rich`` is importable (tables need it)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        raise MissingDependencyError("the mindtrace-jobs tables (use --json without it)", "cli", "rich") from None


def console(file: TextIO | None = None) -> Console:
    """A rich console on ``file`` (default: stdout at call time, so captured output is seen)."""
    require_rich()
    from rich.console import Console

    return Console(file=file or sys.stdout, highlight=False, soft_wrap=False)


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses and pydantic models as dicts, datetimes in ISO 8601, enums as
    their values."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Progress):
        return {"fraction": value.fraction, "values": dict(value.values)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def emit_json(data: Any, file: TextIO | None = None) -> None:
    """Print ``data`` as one JSON document (sorted keys) and a newline."""
    print(json.dumps(plain(data), sort_keys=True), file=file or sys.stdout, flush=True)


def _count(value: int | None) -> str:
    return UNKNOWN if value is None else str(value)


def escape(text: str) -> str:
    """``text`` with rich's markup escaped, so brackets in a job's error or a name print as they are."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def stats_table(stats: Sequence[QueueStats], where: str) -> Table:
    """The ``queues`` table: one row per queue, a column per count (``-``: the backend cannot know it)."""
    require_rich()
    from rich.table import Table

    table = Table(title=f"queues on {where}", title_justify="left")
    table.add_column("queue", style="bold")
    for name in QUEUE_COUNTS:
        table.add_column(STATS_COLUMNS[name], justify="right")
    for row in stats:
        cells = [_count(getattr(row, name)) for name in QUEUE_COUNTS]
        dead = row.dead_lettered
        if dead:
            cells[QUEUE_COUNTS.index("dead_lettered")] = f"[red]{dead}[/red]"
        table.add_row(escape(row.queue), *cells)
    if not stats:
        table.caption = "no queues declared"
    return table


def stats_json(stats: Sequence[QueueStats], where: str) -> dict[str, Any]:
    """The ``queues --json`` document: the backend and one object per queue (unknown counts are null)."""
    return {"backend": where, "queues": [row.as_dict() for row in stats]}


def info_json(info: JobInfo) -> dict[str, Any]:
    """A job's record as JSON data (the ``status --json`` document)."""
    data: dict[str, Any] = plain(info)
    return data


def info_table(info: JobInfo) -> Table:
    """A job's record as a two-column table (field, value); empty fields left out."""
    require_rich()
    from rich.table import Table

    table = Table(show_header=False, title=escape(f"job {info.job_id} on {info.queue}"), title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, value in info_json(info).items():
        if name in ("job_id", "queue") or value in (None, False, {}, ""):
            continue
        if name == "progress":
            fraction = value.get("fraction")
            shown = "" if fraction is None else f"{fraction:.0%} "
            value = shown + ", ".join(f"{k}={v}" for k, v in value.get("values", {}).items())
        table.add_row(name, escape(str(value)))  # a job's text is shown as it is, never read as markup
    return table


#: The columns of the ``dead-letters --peek`` table and of the ``schedules`` table, in order.
DEAD_LETTER_COLUMNS = ("job_id", "schema", "priority", "attempts", "error", "created_at")
SCHEDULE_COLUMNS = ("name", "queue", "when", "misfire", "grace", "last_fire", "next_fire")


def dead_letter_row(job: Job) -> dict[str, Any]:
    """One peeked dead-lettered job: id, schema, priority, attempts, error, created_at."""
    return {
        "job_id": job.id,
        "schema": job.payload.name,
        "priority": job.priority,
        "attempts": job.attempts,
        "error": job.error,
        "created_at": job.created_at.isoformat(),
    }


def dead_letters_table(queue: str, jobs: Sequence[Job]) -> Table:
    """The ``dead-letters --peek`` table, in the order a requeue would take them."""
    require_rich()
    rows = [dead_letter_row(job) for job in jobs]
    return _rows_table(escape(f"dead letters of {queue} (left in place)"), DEAD_LETTER_COLUMNS, rows, "none")


def schedule_row(info: ScheduleInfo) -> dict[str, Any]:
    """One schedule for ``schedules``: name, queue, when (cron and zone, or the interval), misfire policy, grace,
    last and next fire times."""
    when = f"{info.cron} ({info.tz})" if info.cron is not None else f"every {info.every}"
    return {
        "name": info.name,
        "queue": info.queue,
        "when": when,
        "misfire": info.misfire,
        "grace": info.grace,
        "last_fire": None if info.last_fire is None else info.last_fire.isoformat(),
        "next_fire": info.next_fire.isoformat(),
    }


def schedules_table(infos: Sequence[ScheduleInfo], where: str) -> Table:
    """The ``schedules`` table: one row per schedule, by name."""
    require_rich()
    rows = [schedule_row(info) for info in infos]
    return _rows_table(f"schedules on {where}", SCHEDULE_COLUMNS, rows, "no schedules")


def _rows_table(title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]], empty: str) -> Table:
    """A table of ``rows`` (dicts keyed by ``columns``; None prints as ``-``), captioned ``empty`` when none."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column.replace("_", " "), overflow="fold")
    for row in rows:
        table.add_row(*(escape(str(row[column])) if row[column] is not None else UNKNOWN for column in columns))
    if not rows:
        table.caption = empty
    return table
