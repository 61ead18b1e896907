"""The opt-in pytest plugin mindtrace.jobs.testing: README's sample suite, run by pytester on each backend."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
from pathlib import Path

import pytest

from mindtrace.jobs import from_url
from mindtrace.jobs.testing import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL, backend_url_for

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
CONFTEST = 'pytest_plugins = ["mindtrace.jobs.testing"]\n'
#: The user's project settings, as strict as ours (pytest-asyncio itself warns when the loop scope is unset).
INI = (
    "[pytest]\naddopts = --strict-markers --strict-config\nfilterwarnings = error\n"
    "asyncio_default_fixture_loop_scope = function\n"
)
BROKERS = {
    "redis": ("MINDTRACE_JOBS_REDIS_URL", DEFAULT_REDIS_URL),
    "rabbitmq": ("MINDTRACE_JOBS_AMQP_URL", DEFAULT_AMQP_URL),
}


def _readme_suite() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Testing your code with mindtrace.jobs.testing", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match is not None
    return match.group(1)


def _run(pytester: pytest.Pytester, mode: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "asyncio", "-o", f"asyncio_mode={mode}", "-p", "no:cacheprovider", *args, timeout=60
    )


def _user_project(pytester: pytest.Pytester, **files: str) -> None:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(**files)


@pytest.mark.parametrize("mode", ["strict", "auto"])
@pytest.mark.parametrize("backend", ["memory", "redis", "rabbitmq"])
def test_the_readme_suite_passes_on_each_backend_in_both_asyncio_modes(
    pytester: pytest.Pytester, backend: str, mode: str
) -> None:
    _user_project(pytester, test_resize=_readme_suite())
    result = _run(pytester, mode, f"--jobs-backend={backend}")
    # The marked test on its 3 backends, the other two on --jobs-backend; none skipped (CI=true fails them).
    result.assert_outcomes(passed=5)


def test_the_fixtures_are_not_there_without_pytest_plugins(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI.replace("addopts = --strict-markers --strict-config", "addopts ="))
    pytester.makepyfile(test_plain="def test_queue(jobs_queue, jobs_orchestrator):\n    pass\n")
    result = _run(pytester, "auto")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'jobs_queue' not found*"])
    plugins = importlib.metadata.distribution("mindtrace-jobs").entry_points
    assert [entry for entry in plugins if entry.group == "pytest11"] == []


FAILING = """
import pytest

from mindtrace.jobs import Job, JobInput, JobSchema, job_from_schema


@pytest.mark.asyncio
async def test_fails_with_jobs_left(jobs_orchestrator, jobs_queue):
    await jobs_orchestrator.declare_queue(jobs_queue)
    job = job_from_schema(JobSchema(name="x", input=JobInput), JobInput())
    await jobs_orchestrator.publish(jobs_queue, job)
    with open("queue.txt", "w") as f:
        f.write(jobs_queue)
    raise AssertionError("this test fails")


def test_sync_fails_with_jobs_left(jobs_sync_orchestrator, jobs_queue):
    jobs_sync_orchestrator.declare_queue(jobs_queue)
    with open("sync_queue.txt", "w") as f:
        f.write(jobs_queue)
    raise AssertionError("this test fails too")
"""


async def _exists(url: str, queue: str) -> bool:
    backend = from_url(url)
    try:
        return await backend.queue_exists(queue) or await backend.queue_exists(f"{queue}.dlq")
    finally:
        await backend.close()


@pytest.mark.parametrize("backend", ["redis", "rabbitmq"])
def test_the_queue_is_deleted_after_a_failing_test(pytester: pytest.Pytester, backend: str) -> None:
    _user_project(pytester, test_failing=FAILING)
    result = _run(pytester, "strict", f"--jobs-backend={backend}")
    result.assert_outcomes(failed=2)
    url = backend_url_for(backend)
    for written in ("queue.txt", "sync_queue.txt"):
        queue = (pytester.path / written).read_text()
        assert queue.startswith("jobs-test_")
        assert not asyncio.run(_exists(url, queue)), f"{queue} left on {backend}"


HELPERS = """
import pytest

from mindtrace.jobs import (
    AsyncConsumer, Consumer, Job, JobInput, JobOutput, JobSchema, JobValidationError, job_from_schema,
)
from mindtrace.jobs.testing import JobsRunTimeoutError, run_inline


class Nothing(AsyncConsumer):
    async def run(self, job: Job) -> None:
        return None


@pytest.mark.asyncio
async def test_too_few_jobs(jobs_orchestrator, jobs_queue, jobs_run):
    await jobs_orchestrator.declare_queue(jobs_queue)
    await jobs_orchestrator.publish(jobs_queue, job_from_schema(JobSchema(name="x", input=JobInput), JobInput()))
    with pytest.raises(JobsRunTimeoutError, match="did not handle 2 job.s. within 0.5 s .queue 'jobs-") as caught:
        await jobs_run(Nothing(jobs_queue), num_messages=2, timeout=0.5)
    assert (caught.value.ready, caught.value.running) == (0, 0)


@pytest.mark.asyncio
async def test_an_empty_queue_is_idle_at_once(jobs_orchestrator, jobs_queue, jobs_run):
    await jobs_orchestrator.declare_queue(jobs_queue)
    assert await jobs_run(Nothing(jobs_queue), timeout=2) == 0


class Out(JobOutput):
    attempt: int


class Attempt(AsyncConsumer):
    async def run(self, job: Job) -> dict:
        return {"attempt": self.context.attempt}


class SyncAttempt(Consumer):
    def run(self, job: Job) -> dict:
        return {"attempt": self.context.attempt}


class Bad(AsyncConsumer):
    async def run(self, job: Job) -> dict:
        return {"attempt": "not a number"}


@pytest.mark.asyncio
async def test_run_inline():
    job = job_from_schema(JobSchema(name="a", input=JobInput, output=Out), JobInput(), attempts=2)
    assert await run_inline(Attempt("q"), job) == Out(attempt=3)
    assert await run_inline(SyncAttempt("q"), job) == Out(attempt=3)
    assert await run_inline(Nothing("q"), job) is None
    with pytest.raises(JobValidationError, match="does not validate as Out"):
        await run_inline(Bad("q"), job)
"""


def test_jobs_run_says_what_it_waited_for_and_run_inline_checks_the_output(pytester: pytest.Pytester) -> None:
    _user_project(pytester, test_helpers=HELPERS)
    _run(pytester, "strict").assert_outcomes(passed=3)


@pytest.mark.parametrize(("ci", "outcome"), [("", "skipped"), ("true", "errors")])
def test_a_broker_that_is_down_skips_and_fails_under_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, outcome: str
) -> None:
    monkeypatch.setenv("CI", ci)
    _user_project(pytester, test_down="def test_down(jobs_sync_orchestrator):\n    pass\n")
    result = _run(pytester, "auto", "-ra", "--jobs-backend=redis://127.0.0.1:1/0")
    result.assert_outcomes(**{outcome: 1})
    result.stdout.fnmatch_lines(["*redis broker at 127.0.0.1:1 cannot be reached*"])


def test_backend_names_stand_for_the_environment_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, (variable, default) in BROKERS.items():
        monkeypatch.delenv(variable, raising=False)
        assert backend_url_for(name) == default
        monkeypatch.setenv(variable, "redis://elsewhere:1/2")
        assert backend_url_for(name) == "redis://elsewhere:1/2"
    assert backend_url_for("memory") == "memory://"
    assert backend_url_for("amqp://h/") == "amqp://h/"


FAKE_CLOCK = """
import time
from datetime import timedelta

import pytest

from mindtrace.jobs import AsyncConsumer, Job, JobInput, JobSchema, job_from_schema
from mindtrace.jobs.lifecycle import JobStatus

SCHEMA = JobSchema(name="nightly", input=JobInput)


class Nothing(AsyncConsumer):
    async def run(self, job: Job) -> None:
        return None


@pytest.mark.asyncio
async def test_a_one_day_delay_lands_when_the_clock_moves(jobs_orchestrator, jobs_queue, jobs_run, jobs_clock):
    await jobs_orchestrator.register(SCHEMA.model_copy(update={"name": jobs_queue}))
    started = time.monotonic()
    handle = await jobs_orchestrator.publish(jobs_queue, job_from_schema(SCHEMA, JobInput()), delay=timedelta(days=1))
    assert await handle.status() is JobStatus.SCHEDULED
    assert await jobs_run(Nothing(jobs_queue), timeout=0.2) == 0  # not due: nothing to run
    jobs_clock.advance(timedelta(days=1))
    assert await jobs_run(Nothing(jobs_queue), num_messages=1, timeout=5) == 1
    assert await handle.status() is JobStatus.SUCCEEDED
    assert time.monotonic() - started < 5  # a day of waiting, in (well under) seconds


def test_the_blocking_orchestrator_runs_on_the_fake_clock_too(jobs_sync_orchestrator, jobs_queue, jobs_clock):
    jobs_sync_orchestrator.register(SCHEMA.model_copy(update={"name": jobs_queue}))
    jobs_sync_orchestrator.publish(jobs_queue, job_from_schema(SCHEMA, JobInput()), delay=3600)
    assert jobs_sync_orchestrator.count_queue_messages(jobs_queue) == 0
    jobs_clock.advance(3600)
    deadline = time.monotonic() + 5
    while jobs_sync_orchestrator.count_queue_messages(jobs_queue) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jobs_sync_orchestrator.count_queue_messages(jobs_queue) == 1


@pytest.mark.asyncio
async def test_a_nightly_schedule_fires_once_a_night_when_the_clock_moves(jobs_orchestrator, jobs_queue, jobs_clock):
    import asyncio
    from datetime import datetime, timezone
    from zoneinfo import ZoneInfo

    jobs_clock.set(datetime(2027, 3, 26, 12, 0, tzinfo=timezone.utc))  # spring 2027: clocks go forward on the 28th
    await jobs_orchestrator.declare_queue(jobs_queue)
    job = job_from_schema(SCHEMA, JobInput())
    await jobs_orchestrator.schedule("nightly", jobs_queue, job, cron="30 2 * * *", tz="Europe/Berlin")
    scheduler = asyncio.create_task(jobs_orchestrator.run_schedules())
    try:
        for _ in range(3 * 24):  # three days, an hour at a time, across the spring change of clocks
            jobs_clock.advance(timedelta(hours=1))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
    finally:
        scheduler.cancel()
    fired = []
    while (received := await jobs_orchestrator.receive_message(jobs_queue, timeout=0)) is not None:
        fired.append(received.id)
    berlin = ZoneInfo("Europe/Berlin")
    times = [datetime.fromisoformat(i.split("@")[1].replace("Z", "+00:00")).astimezone(berlin) for i in fired]
    # 02:30 does not exist on 28 March in Berlin: that night's run is at 03:00, the next valid minute.
    assert [t.strftime("%d %H:%M") for t in times] == ["27 02:30", "28 03:00", "29 02:30"]
    await jobs_orchestrator.unschedule("nightly")


def test_the_fake_clock_is_for_memory_only(jobs_clock):
    pass
"""


def test_jobs_clock_lands_a_one_day_delay_at_once_and_is_skipped_on_brokers(pytester: pytest.Pytester) -> None:
    _user_project(pytester, test_clock=FAKE_CLOCK)
    _run(pytester, "strict").assert_outcomes(passed=4)
    result = _run(pytester, "strict", "-ra", "--jobs-backend=redis", "-k", "memory_only")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*jobs_clock drives the in-memory backend only, not redis://*"])
