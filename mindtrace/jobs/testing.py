"""mindtrace.jobs.testing: an opt-in pytest plugin with ``jobs_`` fixtures for testing code built on mindtrace.jobs.

Enable it in your top-level ``conftest.py`` (it is never loaded on its own: no ``pytest11`` entry point)::

    pytest_plugins = ["mindtrace.jobs.testing"]

It needs pytest and pytest-asyncio (0.24 or later; strict or auto mode), which the library itself does not
depend on: install them with your tests (``pip install pytest pytest-asyncio``). anyio's pytest plugin is not
supported.

Fixtures:

- ``jobs_backend_url``: the URL of the backend a test runs on. ``memory://`` by default; ``--jobs-backend
  URL`` (or a name: ``memory``, ``redis``, ``rabbitmq``) or the ``MINDTRACE_JOBS_URL`` variable choose another
  for the whole run; ``@pytest.mark.jobs_backends("memory", "redis", "rabbitmq")`` runs one test on each
  (names or URLs). The names ``redis`` and ``rabbitmq`` mean ``MINDTRACE_JOBS_REDIS_URL`` (default
  ``redis://127.0.0.1:6379/0``) and ``MINDTRACE_JOBS_AMQP_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``).
  A broker that cannot be reached skips the test, saying which; under ``CI=true`` it fails it instead.
- ``jobs_state_url``: where job records live (``state=`` of the orchestrators): ``--jobs-state URL`` (or
  ``redis``) or ``MINDTRACE_JOBS_STATE_URL``, e.g. RabbitMQ with its records in Redis; else None (the
  backend's own store).
- ``jobs_orchestrator``: an :class:`AsyncOrchestrator` on that backend, one per test (a ``LocalClient`` is
  bound to the event loop it first ran on), closed after the test.
- ``jobs_sync_orchestrator``: the blocking :class:`Orchestrator` on that backend, closed after the test. In
  memory each orchestrator has its own queues: use one of the two in a test, not both.
- ``jobs_clock``: a :class:`~mindtrace.jobs.clock.FakeClock` that the orchestrator fixtures' in-memory backend runs
  on when a test asks for it: ``jobs_clock.advance(timedelta(days=1))`` makes a one-day delay due at once (and
  fires a nightly schedule); skipped, saying why, on a broker.
- ``jobs_queue``: a queue name no other test or run uses (not declared: declare it, or let a consumer do so),
  deleted with its dead-letter queue after the test, failed or not, by the orchestrator fixture in use.
- ``jobs_run``: ``await jobs_run(consumer, num_messages=N, timeout=10)`` connects an :class:`AsyncConsumer` to
  ``jobs_orchestrator`` (unless connected already) and consumes until N jobs were handled, or, without
  ``num_messages``, until its queue is idle; :class:`JobsRunTimeoutError` if that takes over ``timeout`` s.
- ``jobs_sync_run``: the same, blocking, for a sync :class:`Consumer` and ``jobs_sync_orchestrator``.

And a helper without any backend: ``await run_inline(consumer, job)`` calls the consumer's ``run`` once, with
a :class:`JobContext` current, and returns its output checked as a consumer checks it.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, Protocol
from urllib.parse import urlsplit

import pytest
import pytest_asyncio

from mindtrace.jobs import (
    AsyncConsumer,
    AsyncOrchestrator,
    ClosedError,
    Consumer,
    Job,
    JobContext,
    LocalClient,
    Orchestrator,
    UsageError,
)
from mindtrace.jobs._loop_thread import get_loop_thread
from mindtrace.jobs.backends.base import Backend
from mindtrace.jobs.clock import FakeClock
from mindtrace.jobs.constants import MAX_RESULT_BYTES, URL_ENV
from mindtrace.jobs.context import reset_current, set_current

__all__ = [
    "DEFAULT_AMQP_URL",
    "DEFAULT_REDIS_URL",
    "DEFAULT_RUN_TIMEOUT",
    "JobsRun",
    "JobsRunTimeoutError",
    "JobsSyncRun",
    "backend_url_for",
    "jobs_backend_url",
    "jobs_clock",
    "jobs_orchestrator",
    "jobs_queue",
    "jobs_run",
    "jobs_state_url",
    "jobs_sync_orchestrator",
    "jobs_sync_run",
    "run_inline",
]

#: The Redis the name ``redis`` means when ``MINDTRACE_JOBS_REDIS_URL`` is not set.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: The RabbitMQ the name ``rabbitmq`` means when ``MINDTRACE_JOBS_AMQP_URL`` is not set.
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
#: Seconds ``jobs_run`` waits by default before raising JobsRunTimeoutError.
DEFAULT_RUN_TIMEOUT = 10.0

_MARKER = "jobs_backends"
_DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671}
_POLL = 0.05  # seconds between two looks at an idle queue
_reachable: dict[tuple[str, int], str | None] = {}  # (host, port) -> why not reachable (None: reachable)


class JobsRunTimeoutError(AssertionError):
    """``jobs_run`` / ``jobs_sync_run`` did not see the jobs handled (or the queue idle) within its timeout.

    An AssertionError, so pytest reports the test as failed; ``queue``, ``timeout``, ``ready`` (jobs still
    ready in the queue) and ``running`` (jobs the consumer was running) say where it stood.
    """

    def __init__(self, message: str, *, queue: str, timeout: float, ready: int | None, running: int) -> None:
        super().__init__(message)
        self.queue = queue
        self.timeout = timeout
        self.ready = ready
        self.running = running


class JobsRun(Protocol):
    """The ``jobs_run`` fixture's value: an async function driving an AsyncConsumer."""

    def __call__(
        self,
        consumer: AsyncConsumer,
        *,
        num_messages: int | None = None,
        timeout: float = DEFAULT_RUN_TIMEOUT,
        concurrency: int = 1,
    ) -> Awaitable[int]:
        """Consume until ``num_messages`` jobs were handled (None: until the queue is idle); returns how many."""
        ...


class JobsSyncRun(Protocol):
    """The ``jobs_sync_run`` fixture's value: a blocking function driving a sync Consumer."""

    def __call__(
        self,
        consumer: Consumer,
        *,
        num_messages: int | None = None,
        timeout: float = DEFAULT_RUN_TIMEOUT,
        concurrency: int = 1,
    ) -> int:
        """Consume until ``num_messages`` jobs were handled (None: until the queue is idle); returns how many."""
        ...


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--jobs-backend`` and ``--jobs-state``."""
    group = parser.getgroup("mindtrace-jobs")
    group.addoption(
        "--jobs-backend",
        default=None,
        metavar="URL",
        help="backend of the jobs_ fixtures: a URL or memory/redis/rabbitmq (default: $MINDTRACE_JOBS_URL or memory://)",
    )
    group.addoption(
        "--jobs-state",
        default=None,
        metavar="URL",
        help="state store of the jobs_ orchestrators (default: $MINDTRACE_JOBS_STATE_URL, else the backend's own)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``jobs_backends`` marker (for ``--strict-markers``)."""
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(*backends): run the test on each backend (memory, redis, rabbitmq, or URLs) "
        "through the mindtrace.jobs.testing fixtures",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``jobs_backend_url`` over the backends of a test's ``jobs_backends`` marker."""
    marker = metafunc.definition.get_closest_marker(_MARKER)
    if marker is None or "jobs_backend_url" not in metafunc.fixturenames:
        return
    backends = [str(name) for name in marker.args]
    if not backends:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: @pytest.mark.{_MARKER}() names no backend")
    metafunc.parametrize("jobs_backend_url", backends, indirect=True, ids=backends)


def backend_url_for(name: str) -> str:
    """The URL a backend name stands for (``memory``, ``redis``, ``rabbitmq``); a URL is returned as is."""
    if "://" in name:
        return name
    if name == "memory":
        return "memory://"
    if name == "redis":
        return os.environ.get("MINDTRACE_JOBS_REDIS_URL") or DEFAULT_REDIS_URL
    if name == "rabbitmq":
        return os.environ.get("MINDTRACE_JOBS_AMQP_URL") or DEFAULT_AMQP_URL
    raise pytest.UsageError(f"unknown jobs backend {name!r}: use memory, redis, rabbitmq or a URL")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _unreachable(url: str) -> str | None:
    """Why the broker at ``url`` cannot be reached (a TCP connect), or None when it can; cached per run."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return None
    host, port = parts.hostname or "localhost", parts.port or _DEFAULT_PORTS[scheme]
    if (host, port) not in _reachable:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                _reachable[host, port] = None
        except OSError as exc:
            _reachable[host, port] = f"{scheme} broker at {host}:{port} cannot be reached ({exc})"
    return _reachable[host, port]


def _require(url: str) -> str:
    why = _unreachable(url)
    if why is not None:
        if _in_ci():
            pytest.fail(f"CI=true: {why}", pytrace=False)
        pytest.skip(why)
    return url


@pytest.fixture
def jobs_backend_url(request: pytest.FixtureRequest) -> str:
    """URL of the backend this test runs on (see the module docstring); skips if its broker is down."""
    chosen = getattr(request, "param", None)
    if chosen is None:
        chosen = request.config.getoption("--jobs-backend") or os.environ.get(URL_ENV) or "memory"
    return _require(backend_url_for(str(chosen)))


@pytest.fixture
def jobs_state_url(request: pytest.FixtureRequest) -> str | None:
    """Where the orchestrators keep job records: a URL, or None for the backend's own store."""
    chosen = request.config.getoption("--jobs-state") or os.environ.get("MINDTRACE_JOBS_STATE_URL")
    return _require(backend_url_for(str(chosen))) if chosen else None


@pytest.fixture
def _jobs_queues() -> list[str]:
    """Names ``jobs_queue`` handed out in this test, deleted by the orchestrator fixtures' teardown."""
    return []


@pytest.fixture
def jobs_queue(request: pytest.FixtureRequest, _jobs_queues: list[str]) -> str:
    """A queue name of this test's own, deleted (with its ``.dlq``) after the test by the orchestrator fixture."""
    label = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")[:60] or "q"
    name = f"jobs-{label}-{uuid.uuid4().hex[:12]}"
    _jobs_queues.append(name)
    return name


async def _delete_queues(orchestrator: AsyncOrchestrator, names: list[str], url: str, state: str | None) -> None:
    if not names:
        return
    try:
        for name in names:
            await orchestrator.delete_queue(name)
    except ClosedError:
        # The test closed the orchestrator itself: on a broker, delete through a fresh one (memory's queues
        # went with it).
        if urlsplit(url).scheme.lower() != "memory":
            async with AsyncOrchestrator(url, state=state) as fresh:
                for name in names:
                    await fresh.delete_queue(name)


@pytest.fixture
def jobs_clock(jobs_backend_url: str) -> FakeClock:
    """A :class:`~mindtrace.jobs.clock.FakeClock` the in-memory backend of this test's orchestrator fixtures runs
    on: ``jobs_clock.advance(timedelta(days=1))`` lands a one-day delay (or fires a nightly schedule) at once.

    It starts at the real time. Brokers keep their servers' time, so a test using it on another backend is
    skipped, saying so.
    """
    if urlsplit(jobs_backend_url).scheme.lower() != "memory":
        pytest.skip(f"jobs_clock drives the in-memory backend only, not {jobs_backend_url.split('://')[0]}://")
    return FakeClock()


def _backend_for(url: str, request: pytest.FixtureRequest) -> Backend | str:
    """The orchestrator fixtures' backend: ``url``, or a LocalClient on ``jobs_clock`` when the test uses it."""
    if "jobs_clock" in request.fixturenames:
        return LocalClient(clock=request.getfixturevalue("jobs_clock"))
    return url


@pytest_asyncio.fixture(loop_scope="function")
async def jobs_orchestrator(
    jobs_backend_url: str, jobs_state_url: str | None, _jobs_queues: list[str], request: pytest.FixtureRequest
) -> AsyncIterator[AsyncOrchestrator]:
    """An AsyncOrchestrator on ``jobs_backend_url``, for this test only; deletes the test's queues, then closes."""
    orchestrator = AsyncOrchestrator(_backend_for(jobs_backend_url, request), state=jobs_state_url)
    try:
        yield orchestrator
    finally:
        try:
            await _delete_queues(orchestrator, _jobs_queues, jobs_backend_url, jobs_state_url)
        finally:
            await orchestrator.close()


@pytest.fixture
def jobs_sync_orchestrator(
    jobs_backend_url: str, jobs_state_url: str | None, _jobs_queues: list[str], request: pytest.FixtureRequest
) -> Iterator[Orchestrator]:
    """A blocking Orchestrator on ``jobs_backend_url``, for this test only; deletes the test's queues, then closes."""
    orchestrator = Orchestrator(_backend_for(jobs_backend_url, request), state=jobs_state_url)
    try:
        yield orchestrator
    finally:
        try:
            get_loop_thread().run(
                _delete_queues(orchestrator.aio, _jobs_queues, jobs_backend_url, jobs_state_url), "jobs_queue"
            )
        finally:
            orchestrator.close()


def _connected(consumer: AsyncConsumer) -> bool:
    try:
        consumer.orchestrator  # noqa: B018 (raises UsageError when not connected)
    except UsageError:
        return False
    return True


async def _drive(
    consumer: AsyncConsumer, orchestrator: AsyncOrchestrator, num_messages: int | None, timeout: float, concurrency: int
) -> int:
    """Consume until ``num_messages`` jobs were handled, or (None) the queue is idle; JobsRunTimeoutError after
    ``timeout`` seconds."""
    if not _connected(consumer):
        consumer.connect(orchestrator)
    orchestrator = consumer.orchestrator
    queue = consumer.queue_name
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    task = asyncio.create_task(consumer.consume(num_messages=num_messages, concurrency=concurrency))
    try:
        if num_messages is not None:
            await asyncio.wait({task}, timeout=timeout)
        else:
            # Idle: nothing ready in the queue and nothing running, twice in a row (a job just delivered to
            # the consumer's buffer is neither for an instant). Jobs waiting for a retry delay are not seen.
            quiet = 0
            while not task.done() and loop.time() < deadline:
                idle = not consumer._running and await orchestrator.count_queue_messages(queue) == 0
                quiet = quiet + 1 if idle else 0
                if quiet >= 2:
                    consumer.stop()
                    await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
                    break
                await asyncio.wait({task}, timeout=_POLL)
        if task.done():
            return task.result()
        running = len(consumer._running)
        try:
            ready: int | None = await orchestrator.count_queue_messages(queue)
        except Exception:
            ready = None
        goal = f"handle {num_messages} job(s)" if num_messages is not None else "drain its queue"
        raise JobsRunTimeoutError(
            f"jobs_run: {type(consumer).__name__} did not {goal} within {timeout} s "
            f"(queue {queue!r}: {'?' if ready is None else ready} ready, {running} running)",
            queue=queue,
            timeout=timeout,
            ready=ready,
            running=running,
        )
    finally:
        if not task.done():
            task.cancel()  # gives every claimed, unfinished job back to its queue
            await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
def jobs_run(jobs_orchestrator: AsyncOrchestrator) -> JobsRun:
    """``await jobs_run(consumer, num_messages=None, timeout=10, concurrency=1) -> handled``: see the module."""

    async def run(
        consumer: AsyncConsumer,
        *,
        num_messages: int | None = None,
        timeout: float = DEFAULT_RUN_TIMEOUT,
        concurrency: int = 1,
    ) -> int:
        if not isinstance(consumer, AsyncConsumer):
            raise TypeError(f"jobs_run takes an AsyncConsumer (use jobs_sync_run for a Consumer), not {consumer!r}")
        return await _drive(consumer, jobs_orchestrator, num_messages, timeout, concurrency)

    return run


@pytest.fixture
def jobs_sync_run(jobs_sync_orchestrator: Orchestrator) -> JobsSyncRun:
    """``jobs_sync_run(consumer, num_messages=None, timeout=10, concurrency=1) -> handled``, blocking."""

    def run(
        consumer: Consumer,
        *,
        num_messages: int | None = None,
        timeout: float = DEFAULT_RUN_TIMEOUT,
        concurrency: int = 1,
    ) -> int:
        if not isinstance(consumer, Consumer):
            raise TypeError(f"jobs_sync_run takes a Consumer (use jobs_run for an AsyncConsumer), not {consumer!r}")
        if not _connected(consumer.aio):
            consumer.connect(jobs_sync_orchestrator)
        work = _drive(consumer.aio, consumer.aio.orchestrator, num_messages, timeout, concurrency)
        return get_loop_thread().run(work, "jobs_sync_run")

    return run


async def run_inline(consumer: AsyncConsumer | Consumer, job: Job) -> Any:
    """Call ``consumer.run(job)`` once, here, and return its output as a consumer would record it.

    No backend, queue, retry or job record is involved: ``run`` sees a :class:`JobContext` (attempt
    ``job.attempts + 1``, no deadline) as ``consumer.context``; a sync :class:`Consumer`'s ``run`` runs in a
    thread. An exception from ``run`` propagates. The result is checked as the consumer checks it (against
    the schema's output type, within the result size limit): JobValidationError or ResultTooLargeError
    otherwise. Returns None for None, else an instance of the schema's output type (the result itself when
    the schema has none).
    """
    context = JobContext(job_id=job.id, queue=consumer.queue_name, attempt=job.attempts + 1, worker="run_inline")
    token = set_current(context)
    try:
        if isinstance(consumer, Consumer):
            result = await asyncio.to_thread(consumer.run, job)  # (to_thread carries the context over)
        else:
            result = await consumer.run(job)
    finally:
        reset_current(token)
    text = AsyncConsumer._check_output(job, result, MAX_RESULT_BYTES, consumer.queue_name)
    output_type = job.payload.output_type
    if text is None or output_type is None:
        return result
    return output_type.model_validate_json(text)
