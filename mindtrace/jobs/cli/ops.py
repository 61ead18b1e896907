"""The operator commands of ``mindtrace-jobs``: queues, status, cancel, purge, dead-letters and check."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mindtrace.jobs.backends import from_url
from mindtrace.jobs.backends.base import Backend, QueueStats
from mindtrace.jobs.cli import render
from mindtrace.jobs.cli.exit_codes import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from mindtrace.jobs.constants import URL_ENV
from mindtrace.jobs.errors import (
    BackendRefusedError,
    BackendUnavailableError,
    ConfigurationError,
    InvalidQueueNameError,
    JobsError,
    MissingDependencyError,
    QueueNotFoundError,
)
from mindtrace.jobs.lifecycle import CancelOutcome, JobStatus
from mindtrace.jobs.orchestrator import AsyncOrchestrator

#: The environment variable ``--url`` defaults to.

#: Seconds ``check`` waits for the broker unless ``--connect-timeout`` (or the URL's ``connect_timeout``) says.
CHECK_CONNECT_TIMEOUT = 5.0

#: Seconds between two refreshes of ``queues --watch``, unless ``--interval`` says.
WATCH_INTERVAL = 2.0

#: Jobs ``dead-letters --peek`` shows when no number is given.
PEEK_DEFAULT = 10


def exit_code_for(error: BaseException) -> int:
    """The documented exit code of an operator command that failed with ``error``.

    Unreachable broker 69, refused credentials/vhost/permission 77, a bad URL, option or missing extra 78, a
    bad queue name 2, anything else the library raises (an unknown queue, say) 1.
    """
    if isinstance(error, BackendUnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(error, BackendRefusedError):
        return EXIT_REFUSED
    if isinstance(error, InvalidQueueNameError):
        return EXIT_USAGE
    if isinstance(error, (ConfigurationError, MissingDependencyError)):
        return EXIT_CONFIG
    return EXIT_FAILED


def _url(args: argparse.Namespace) -> str:
    url = args.url or os.environ.get(URL_ENV)
    if not url:
        raise ConfigurationError(f"no broker URL: pass --url or set {URL_ENV}")
    return str(url)


def _backend(args: argparse.Namespace, *, connect_timeout: float | None = None) -> Backend:
    """The backend ``--url`` names, with ``--connect-timeout`` (or ``connect_timeout``) on brokers that take it."""
    url = _url(args)
    timeout = args.connect_timeout if args.connect_timeout is not None else connect_timeout
    scheme = url.partition(":")[0].lower()
    options: dict[str, Any] = {}
    if timeout is not None and scheme != "memory" and not (args.connect_timeout is None and "connect_timeout=" in url):
        options["connect_timeout"] = timeout
    return from_url(url, **options)


def _fail(error: BaseException) -> int:
    print(f"mindtrace-jobs: {error}", file=sys.stderr)
    return exit_code_for(error)


def _run(args: argparse.Namespace, body: Callable[[AsyncOrchestrator], Awaitable[int]]) -> int:
    """Run ``body`` with an orchestrator over ``--url`` on a new event loop; errors become exit codes."""

    async def main() -> int:
        async with AsyncOrchestrator(_backend(args)) as orchestrator:
            return await body(orchestrator)

    try:
        return asyncio.run(main())
    except JobsError as exc:
        return _fail(exc)


async def _require_queue(orchestrator: AsyncOrchestrator, queue: str) -> None:
    """QueueNotFoundError unless ``queue`` exists: a misspelt name must say so, not read as an empty queue."""
    if not await orchestrator.backend.queue_exists(queue):
        raise QueueNotFoundError(queue)


# -- queues --------------------------------------------------------------------------------------------


async def _collect(orchestrator: AsyncOrchestrator, names: list[str]) -> list[QueueStats]:
    """The stats of ``names`` (every listed queue when empty); a listed queue deleted meanwhile is left out."""
    listed = not names
    stats = []
    for name in names or await orchestrator.list_queues():
        try:
            stats.append(await orchestrator.queue_stats(name))
        except QueueNotFoundError:
            if not listed:
                raise
    return stats


def _queues(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        return _fail(ConfigurationError(f"--interval must be a number of seconds > 0, not {args.interval}"))
    if not args.json:
        try:
            render.require_rich()
        except MissingDependencyError as exc:
            return _fail(exc)

    async def body(orchestrator: AsyncOrchestrator) -> int:
        where = orchestrator.backend.describe()
        if not args.watch:
            stats = await _collect(orchestrator, args.queue)
            if args.json:
                render.emit_json(render.stats_json(stats, where))
            else:
                render.console().print(render.stats_table(stats, where))
            return EXIT_OK
        return await _watch(orchestrator, args, where)

    try:
        return _run(args, body)
    except KeyboardInterrupt:
        return EXIT_OK


async def _watch(orchestrator: AsyncOrchestrator, args: argparse.Namespace, where: str) -> int:
    """Refresh every ``--interval`` s until Ctrl-C (or ``--count`` refreshes): a rich live table, or with
    ``--json`` one JSON document per line."""
    refreshes = 0
    if args.json:
        while args.count is None or refreshes < args.count:
            if refreshes:
                await asyncio.sleep(args.interval)
            document = render.stats_json(await _collect(orchestrator, args.queue), where)
            render.emit_json({**document, "at": time.time()})
            refreshes += 1
        return EXIT_OK
    from rich.live import Live

    screen = render.console()
    # On a terminal the table is redrawn in place; elsewhere (a pipe, a log) each refresh is printed after the last.
    live = Live(console=screen, auto_refresh=False) if screen.is_terminal else None
    with live or contextlib.nullcontext():
        while args.count is None or refreshes < args.count:
            if refreshes:
                await asyncio.sleep(args.interval)
            table = render.stats_table(await _collect(orchestrator, args.queue), where)
            table.caption = f"every {args.interval:g}s, Ctrl-C to stop; {time.strftime('%H:%M:%S')}"
            if live is not None:
                live.update(table, refresh=True)
            else:
                screen.print(table)
                screen.file.flush()
            refreshes += 1
    return EXIT_OK


# -- one job -------------------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    async def body(orchestrator: AsyncOrchestrator) -> int:
        await _require_queue(orchestrator, args.queue)
        info = await orchestrator.job_info(args.job_id, args.queue)
        if args.json:
            render.emit_json(render.info_json(info))
        else:
            render.console().print(render.info_table(info))
        return EXIT_FAILED if info.status is JobStatus.UNKNOWN else EXIT_OK

    return _with_tables(args, body)


def _cancel(args: argparse.Namespace) -> int:
    async def body(orchestrator: AsyncOrchestrator) -> int:
        await _require_queue(orchestrator, args.queue)
        outcome = await orchestrator.cancel(args.job_id, args.queue, reason=args.reason)
        if args.json:
            render.emit_json({"job_id": args.job_id, "queue": args.queue, "outcome": outcome.value})
        else:
            print(f"{outcome.value}: job {args.job_id} on {args.queue}")
        return EXIT_FAILED if outcome is CancelOutcome.NOT_FOUND else EXIT_OK

    return _run(args, body)


# -- queue maintenance ---------------------------------------------------------------------------------


def _confirm(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _purge(args: argparse.Namespace) -> int:
    if not args.yes and not sys.stdin.isatty():
        print(
            f"mindtrace-jobs: refusing to purge {args.queue!r} without --yes (stdin is not a terminal to confirm on)",
            file=sys.stderr,
        )
        return EXIT_USAGE

    async def body(orchestrator: AsyncOrchestrator) -> int:
        await _require_queue(orchestrator, args.queue)
        if not args.yes:
            ready = await orchestrator.count_queue_messages(args.queue)
            question = f"remove the {ready} ready job(s) of {args.queue!r} on {orchestrator.backend.describe()}? [y/N] "
            if not await asyncio.to_thread(_confirm, question):
                print("not purged", file=sys.stderr)
                return EXIT_FAILED
        removed = await orchestrator.clean_queue(args.queue)
        if args.json:
            render.emit_json({"queue": args.queue, "purged": removed})
        else:
            print(f"purged {removed} ready job(s) from {args.queue} (running and delayed jobs are not touched)")
        return EXIT_OK

    return _run(args, body)


def _dead_letters(args: argparse.Namespace) -> int:
    async def body(orchestrator: AsyncOrchestrator) -> int:
        await _require_queue(orchestrator, args.queue)
        if args.requeue:
            moved = await orchestrator.requeue_dead_letters(args.queue, args.limit)
            if args.json:
                render.emit_json({"queue": args.queue, "requeued": moved})
            else:
                print(f"requeued {moved} dead-lettered job(s) to {args.queue}")
            return EXIT_OK
        jobs = await orchestrator.peek_dead_letters(args.queue, args.peek)
        if args.json:
            render.emit_json({"queue": args.queue, "dead_letters": [render.dead_letter_row(job) for job in jobs]})
        else:
            render.console().print(render.dead_letters_table(args.queue, jobs))
        return EXIT_OK

    if args.limit is not None and args.limit < 0:
        return _fail(ConfigurationError(f"--limit must be >= 0, not {args.limit}"))
    if args.peek is not None and args.peek < 0:
        return _fail(ConfigurationError(f"--peek must be >= 0, not {args.peek}"))
    if args.requeue:
        return _run(args, body)
    return _with_tables(args, body)


def _with_tables(args: argparse.Namespace, body: Callable[[AsyncOrchestrator], Awaitable[int]]) -> int:
    """``_run`` for a command that shows a table unless ``--json``: a missing ``rich`` fails before any I/O."""
    if not args.json:
        try:
            render.require_rich()
        except MissingDependencyError as exc:
            return _fail(exc)
    return _run(args, body)


# -- check ---------------------------------------------------------------------------------------------


def _schedules(args: argparse.Namespace) -> int:
    async def body(orchestrator: AsyncOrchestrator) -> int:
        if args.remove is not None:
            removed = await orchestrator.unschedule(args.remove)
            if args.json:
                render.emit_json({"removed": args.remove if removed else None})
            else:
                print(f"removed {args.remove}" if removed else f"no schedule named {args.remove}")
            return EXIT_OK if removed else EXIT_FAILED
        infos = await orchestrator.schedules()
        where = orchestrator.backend.describe()
        if args.json:
            render.emit_json({"backend": where, "schedules": [render.schedule_row(info) for info in infos]})
        else:
            render.console().print(render.schedules_table(infos, where))
        return EXIT_OK

    return _with_tables(args, body)


def _check(args: argparse.Namespace) -> int:
    async def probe() -> tuple[str, float]:
        backend = _backend(args, connect_timeout=CHECK_CONNECT_TIMEOUT)
        started = time.perf_counter()
        try:
            await backend.connect()
            return backend.describe(), time.perf_counter() - started
        finally:
            await backend.close()

    try:
        where, seconds = asyncio.run(probe())
    except JobsError as exc:
        code = exit_code_for(exc)
        if args.json:
            status = {EXIT_UNAVAILABLE: "unavailable", EXIT_REFUSED: "refused"}.get(code, "error")
            render.emit_json({"ok": False, "status": status, "error": str(exc), "exit_code": code})
            return code
        return _fail(exc)
    if args.json:
        render.emit_json({"ok": True, "status": "ok", "backend": where, "seconds": round(seconds, 4)})
    else:
        print(f"ok: {where} answered in {seconds * 1000:.1f} ms")
    return EXIT_OK


# -- the parsers ---------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, json_help: str = "machine-readable JSON on stdout") -> None:
    parser.add_argument("--url", help=f"the broker: memory://, redis://..., amqp://... (default: ${URL_ENV})")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        metavar="S",
        help="seconds to wait for the broker before giving up (default: the URL's, else the backend's)",
    )
    parser.add_argument("--json", action="store_true", help=json_help)


def register(subparsers: Any) -> None:
    """Add the operator commands to the ``mindtrace-jobs`` parser (each sets ``func``: args -> exit code)."""
    queues = subparsers.add_parser(
        "queues",
        help="every queue with its ready, running, delayed and dead-lettered counts",
        description="Every declared queue (or the QUEUEs named) with its counts; '-': the backend cannot know it.",
    )
    queues.add_argument("queue", nargs="*", metavar="QUEUE", help="only these queues (default: every listed one)")
    _common(queues, json_help="JSON on stdout (with --watch: one document per line)")
    queues.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    queues.add_argument("--interval", type=float, default=WATCH_INTERVAL, metavar="S", help="seconds between refreshes")
    queues.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes")
    queues.set_defaults(func=_queues)

    status = subparsers.add_parser("status", help="a job's record: status, attempts, error, times, worker, progress")
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--queue", required=True, metavar="Q")
    _common(status)
    status.set_defaults(func=_status)

    cancel = subparsers.add_parser("cancel", help="cancel a job (queued: it never runs; running: it is signalled)")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--queue", required=True, metavar="Q")
    cancel.add_argument("--reason", metavar="R")
    _common(cancel)
    cancel.set_defaults(func=_cancel)

    purge = subparsers.add_parser("purge", help="remove every ready job of a queue (asks first, or --yes)")
    purge.add_argument("queue", metavar="Q")
    purge.add_argument("--yes", action="store_true", help="do not ask (required when stdin is not a terminal)")
    _common(purge)
    purge.set_defaults(func=_purge)

    dead = subparsers.add_parser("dead-letters", help="peek at or requeue the dead-lettered jobs of a queue")
    dead.add_argument("queue", metavar="Q", help="the queue whose dead-letter queue (Q.dlq) to read")
    action = dead.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--peek", nargs="?", type=int, const=PEEK_DEFAULT, metavar="N", help="show up to N (10) without removing them"
    )
    action.add_argument("--requeue", action="store_true", help="move them back to Q, attempts and error reset")
    dead.add_argument("--limit", type=int, metavar="N", help="with --requeue: move at most N")
    _common(dead)
    dead.set_defaults(func=_dead_letters)

    schedules = subparsers.add_parser(
        "schedules", help="the broker's schedules with their last and next fire times (or --remove NAME)"
    )
    schedules.add_argument("--remove", metavar="NAME", help="unschedule NAME (exit 1 if there is none)")
    _common(schedules)
    schedules.set_defaults(func=_schedules)

    check = subparsers.add_parser(
        "check", help="exit 0 when the broker answers, 69 when unreachable, 77 when it refuses the credentials"
    )
    _common(check)
    check.set_defaults(func=_check)
