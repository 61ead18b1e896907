"""The operator commands of ``mindtrace-jobs`` run in-process against real Redis and RabbitMQ (one subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import pytest

from mindtrace.jobs import AsyncOrchestrator
from mindtrace.jobs.backends.base import QUEUE_COUNTS
from mindtrace.jobs.cli import main
from mindtrace.jobs.cli.exit_codes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support.queue_states import Staged, staged_queue

_T = TypeVar("_T")

BROKERS = ["redis", "rabbitmq"]


class _Side:
    """An orchestrator on an event loop in a thread of its own: the CLI runs ``asyncio.run`` in the test's thread."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.orchestrator = AsyncOrchestrator(url)
        self.queues: list[str] = []

    def run(self, coroutine: Awaitable[_T]) -> _T:
        async def wrapped() -> _T:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(30)

    def queue(self) -> str:
        name = f"t-cli-{uuid.uuid4().hex[:12]}"
        self.queues.append(name)
        return name

    @contextlib.contextmanager
    def staged(self, queue: str) -> Iterator[Staged]:
        manager = staged_queue(self.orchestrator, queue)
        staged = self.run(manager.__aenter__())
        try:
            yield staged
        finally:
            self.run(manager.__aexit__(None, None, None))

    def close(self) -> None:
        async def clean() -> None:
            for name in self.queues:
                with contextlib.suppress(Exception):
                    await self.orchestrator.delete_queue(name)
            await self.orchestrator.close()

        try:
            self.run(clean())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()


@pytest.fixture(params=BROKERS)
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url"))


@pytest.fixture
def side(url: str) -> Iterator[_Side]:
    opened = _Side(url)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at 80 columns when not on a terminal


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, err = _cli(capsys, *argv, "--json")
    assert out.strip(), err
    return code, json.loads(out)


def _row(table: str, queue: str) -> list[str]:
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.split("│")]
        if queue in cells:
            return cells[cells.index(queue) + 1 : -1]
    raise AssertionError(f"no row for {queue} in\n{table}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- queues --------------------------------------------------------------------------------------------


def test_queues_counts_each_state_in_json_and_in_the_table(
    side: _Side, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = side.queue()
    known = side.orchestrator.backend.capabilities.queue_counts
    expected = {"ready": 1, "running": 2, "delayed": 1, "dead_lettered": 1}
    with side.staged(queue):
        code, document = _json(capsys, "queues", "--url", url)
        assert code == EXIT_OK
        rows = {row["queue"]: row for row in document["queues"]}
        assert queue in rows and f"{queue}.dlq" not in rows  # listed, its dead-letter queue counted in the row
        code, named = _json(capsys, "queues", queue, "--url", url)
        code, out, _ = _cli(capsys, "queues", queue, "--url", url)
    assert code == EXIT_OK
    assert [row["queue"] for row in named["queues"]] == [queue]
    cells = dict(zip(QUEUE_COUNTS, _row(out, queue), strict=True))
    for name in QUEUE_COUNTS:
        for row in (rows[queue], named["queues"][0]):
            if name not in known:
                assert row[name] is None and cells[name] == "-"
            elif name == "consumers":
                assert row[name] >= 1 and int(cells[name]) >= 1
            else:
                assert row[name] == expected[name] and cells[name] == str(expected[name]), (name, row, cells)
    assert "ready" in out and "dead-lettered" in out
    assert "guest:guest" not in out + json.dumps(document)


def test_queues_watch_refreshes_json_lines_and_a_live_table(
    side: _Side, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = side.queue()
    side.run(side.orchestrator.declare_queue(queue))
    code, out, _ = _cli(
        capsys, "queues", queue, "--url", url, "--watch", "--json", "--interval", "0.05", "--count", "2"
    )
    assert code == EXIT_OK
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 and all(line["queues"][0]["queue"] == queue for line in lines)
    assert lines[0]["at"] <= lines[1]["at"]
    code, out, _ = _cli(capsys, "queues", queue, "--url", url, "--watch", "--interval", "0.05", "--count", "2")
    assert code == EXIT_OK
    assert _row(out, queue)[0] == "0" and "Ctrl-C" in out


def test_queues_refuses_a_bad_interval(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "queues", "--url", url, "--watch", "--interval", "0")
    assert code == EXIT_CONFIG and "--interval" in err


def test_tables_without_rich_name_the_extra_and_json_still_works(
    side: _Side, url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = side.queue()
    side.run(side.orchestrator.declare_queue(queue))
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich now raises ImportError
    code, out, err = _cli(capsys, "queues", queue, "--url", url)
    assert code == EXIT_CONFIG and "pip install 'mindtrace-jobs[cli]'" in err and not out
    code, document = _json(capsys, "queues", queue, "--url", url)
    assert code == EXIT_OK and document["queues"][0]["ready"] == 0


# -- status and cancel ---------------------------------------------------------------------------------


def test_status_shows_each_job_record(side: _Side, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    queue = side.queue()
    with side.staged(queue) as staged:
        running, delayed, dead, ready = staged.running[0], staged.delayed, staged.dead, staged.ready[0]
        code, info = _json(capsys, "status", running.id, "--queue", queue, "--url", url)
        assert code == EXIT_OK and info["status"] == "running" and info["worker"] == "staging"
        assert info["attempts"] == 1 and info["started_at"]
        code, info = _json(capsys, "status", delayed.id, "--queue", queue, "--url", url)
        assert (info["status"], info["error"], info["attempts"]) == ("retrying", "boom", 1)
        code, info = _json(capsys, "status", dead.id, "--queue", queue, "--url", url)
        assert (info["status"], info["error"]) == ("failed", "fatal")
        code, info = _json(capsys, "status", ready.id, "--queue", queue, "--url", url)
        assert info["status"] == "queued" and info["enqueued_at"]
        code, out, _ = _cli(capsys, "status", delayed.id, "--queue", queue, "--url", url)
        assert code == EXIT_OK and "retrying" in out and "boom" in out
    code, info = _json(capsys, "status", "no-such-job", "--queue", queue, "--url", url)
    assert code == EXIT_FAILED and info["status"] == "unknown"


def test_cancel_prints_the_outcome(side: _Side, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    queue = side.queue()
    schema = image_schema(queue)
    job = make_job(schema, 1)
    side.run(side.orchestrator.register(schema))
    side.run(side.orchestrator.publish(queue, job))
    code, out, _ = _cli(capsys, "cancel", job.id, "--queue", queue, "--reason", "not needed", "--url", url)
    assert code == EXIT_OK and out.startswith("cancelled:")
    code, info = _json(capsys, "status", job.id, "--queue", queue, "--url", url)
    assert info["status"] == "cancelled" and info["reason"] == "not needed"
    code, outcome = _json(capsys, "cancel", job.id, "--queue", queue, "--url", url)
    assert code == EXIT_OK and outcome["outcome"] == "already_finished"
    code, outcome = _json(capsys, "cancel", "no-such-job", "--queue", queue, "--url", url)
    assert code == EXIT_FAILED and outcome == {"job_id": "no-such-job", "queue": queue, "outcome": "not_found"}


# -- purge and dead letters ----------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_purge_asks_on_a_terminal_and_refuses_without_yes_elsewhere(
    side: _Side, url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = side.queue()
    schema = image_schema(queue)
    side.run(side.orchestrator.register(schema))
    side.run(side.orchestrator.publish_many(queue, [make_job(schema, i) for i in range(3)]))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = _cli(capsys, "purge", queue, "--url", url)
    assert code == EXIT_USAGE and "--yes" in err
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    code, out, err = _cli(capsys, "purge", queue, "--url", url)
    assert code == EXIT_FAILED and "not purged" in err and "3 ready" in out
    assert side.run(side.orchestrator.count_queue_messages(queue)) == 3  # nothing changed
    code, document = _json(capsys, "purge", queue, "--yes", "--url", url)
    assert code == EXIT_OK and document == {"queue": queue, "purged": 3}
    assert side.run(side.orchestrator.count_queue_messages(queue)) == 0


def test_dead_letters_peek_leaves_them_and_requeue_moves_them(
    side: _Side, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = side.queue()
    with side.staged(queue) as staged:
        for _ in range(2):
            code, document = _json(capsys, "dead-letters", queue, "--peek", "5", "--url", url)
            assert code == EXIT_OK
            assert [(row["job_id"], row["error"]) for row in document["dead_letters"]] == [(staged.dead.id, "fatal")]
        code, out, _ = _cli(capsys, "dead-letters", queue, "--peek", "--url", url)
        assert code == EXIT_OK and staged.dead.id in out
        code, document = _json(capsys, "dead-letters", queue, "--requeue", "--limit", "5", "--url", url)
        assert code == EXIT_OK and document == {"queue": queue, "requeued": 1}
        code, document = _json(capsys, "queues", queue, "--url", url)
        assert document["queues"][0]["dead_lettered"] == 0
        code, document = _json(capsys, "dead-letters", queue, "--peek", "--url", url)
        assert document["dead_letters"] == []


def test_schedules_lists_each_schedule_and_removes_one(
    side: _Side, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = side.queue()
    name = f"nightly-{queue}"
    schema = image_schema(queue)
    side.run(side.orchestrator.declare_queue(queue))
    side.run(side.orchestrator.schedule(name, queue, make_job(schema), cron="0 3 * * *", tz="Europe/Berlin"))
    try:
        code, document = _json(capsys, "schedules", "--url", url)
        assert code == EXIT_OK
        (row,) = [row for row in document["schedules"] if row["name"] == name]
        assert (row["queue"], row["when"], row["misfire"], row["last_fire"]) == (
            queue,
            "0 3 * * * (Europe/Berlin)",
            "coalesce",
            None,
        )
        assert row["next_fire"].endswith(("T02:00:00+00:00", "T01:00:00+00:00"))  # 03:00 in Berlin
        code, out, _ = _cli(capsys, "schedules", "--url", url)
        assert code == EXIT_OK and name in out and "Europe/Berlin" in out
        code, document = _json(capsys, "schedules", "--remove", name, "--url", url)
        assert (code, document) == (EXIT_OK, {"removed": name})
        code, document = _json(capsys, "schedules", "--remove", name, "--url", url)
        assert (code, document) == (EXIT_FAILED, {"removed": None})
        assert name not in [info.name for info in side.run(side.orchestrator.schedules())]
    finally:
        side.run(side.orchestrator.unschedule(name))


# -- bad input -----------------------------------------------------------------------------------------


def test_an_unknown_queue_fails_and_changes_nothing(side: _Side, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    missing = side.queue()
    for argv in (
        ["status", "x", "--queue", missing],
        ["cancel", "x", "--queue", missing],
        ["purge", missing, "--yes"],
        ["dead-letters", missing, "--peek"],
        ["dead-letters", missing, "--requeue"],
        ["queues", missing],
    ):
        code, _, err = _cli(capsys, *argv, "--url", url)
        assert code == EXIT_FAILED and f"queue {missing!r} does not exist" in err, argv
    assert not side.run(side.orchestrator.backend.queue_exists(missing))


def test_bad_urls_and_names_have_their_exit_codes(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MINDTRACE_JOBS_URL", raising=False)
    code, _, err = _cli(capsys, "queues")
    assert code == EXIT_CONFIG and "MINDTRACE_JOBS_URL" in err
    code, _, err = _cli(capsys, "check", "--url", "nosuch://host")
    assert code == EXIT_CONFIG and "scheme" in err
    code, _, err = _cli(capsys, "status", "x", "--queue", "bad name", "--url", url)
    assert code == EXIT_USAGE and "bad name" in err
    monkeypatch.setenv("MINDTRACE_JOBS_URL", url)
    code, document = _json(capsys, "check")
    assert code == EXIT_OK and document["ok"] is True


# -- check ---------------------------------------------------------------------------------------------


def test_check_exits_69_when_nothing_listens(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    scheme = url.partition(":")[0]
    closed = (
        f"{scheme}://guest:guest@127.0.0.1:{_free_port()}/"
        if scheme == "amqp"
        else f"redis://127.0.0.1:{_free_port()}/0"
    )
    code, _, err = _cli(capsys, "check", "--url", closed, "--connect-timeout", "1")
    assert code == EXIT_UNAVAILABLE and "127.0.0.1" in err
    code, document = _json(capsys, "check", "--url", closed, "--connect-timeout", "1")
    assert code == EXIT_UNAVAILABLE and document["status"] == "unavailable"


def test_check_exits_77_on_a_wrong_password_without_printing_it(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    scheme, _, rest = url.partition("://")
    hostpart = rest.rpartition("@")[2]
    wrong = f"{scheme}://nosuchuser:{password}@{hostpart}"
    code, out, err = _cli(capsys, "check", "--url", wrong, "--connect-timeout", "5")
    assert code == EXIT_REFUSED, err
    assert password not in out + err and "refused" in err
    code, out, err = _cli(capsys, "check", "--url", wrong, "--connect-timeout", "5", "--json")
    assert code == EXIT_REFUSED and json.loads(out)["status"] == "refused" and password not in out + err


def test_check_in_a_subprocess_and_on_memory(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mindtrace.jobs", "check", "--url", redis_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout.startswith("ok: redis://")
    code, out, _ = _cli(capsys, "check", "--url", "memory://")
    assert code == EXIT_OK and out.startswith("ok: memory://")
    code, document = _json(capsys, "queues", "--url", "memory://")
    assert code == EXIT_OK and document == {"backend": "memory://", "queues": []}


def test_watch_stops_cleanly_on_ctrl_c(redis_url: str) -> None:
    import select
    import signal

    watcher = subprocess.Popen(
        [sys.executable, "-m", "mindtrace.jobs", "queues", "--watch", "--interval", "0.2", "--url", redis_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert watcher.stdout is not None
        ready, _, _ = select.select([watcher.stdout], [], [], 20)
        assert ready, "no first frame within 20 s"
        assert "queues on redis://" in watcher.stdout.readline()  # frames follow each other on a pipe
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == EXIT_OK, err
    assert "Traceback" not in err


def test_tables_print_a_jobs_text_as_it_is_not_as_markup() -> None:
    from rich.console import Console

    from mindtrace.jobs.cli.render import dead_letters_table

    error = "OSError: [/dev/sda] unreadable; 1 validation error [type=missing, input_value={}]"
    job = make_job(image_schema("q"), 1).model_copy(update={"error": error, "id": "job-[bold]x"})
    console = Console(width=400, record=True, color_system=None)
    console.print(dead_letters_table("q[red]", [job]))
    shown = console.export_text()
    assert error in shown and "job-[bold]x" in shown and "q[red]" in shown
