"""Conformance: hooks around publish, run and settle, on every backend and API; and their configuration."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import pytest

from mindtrace.jobs import AsyncOrchestrator, ConfigurationError, Job, LocalClient, Orchestrator
from mindtrace.jobs.hooks import TRACING_ENV, Hook, PublishEvent, RunEvent, SettleEvent
from mindtrace.jobs.lifecycle import JobStatus
from tests.jobs.conformance.flows import FAST_RETRY, detect, detection_of
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support.api import Api

#: Set by the recording hook around each run: run() reads it, which proves the hook's context is current there.
_AROUND: contextvars.ContextVar[str | None] = contextvars.ContextVar("around", default=None)


class Recorder(Hook):
    """Records every call; stamps a header at publish and sets a context variable around each run."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def publish(self, event: PublishEvent) -> contextlib.AbstractContextManager[object]:
        event.job.headers["stamp"] = f"from-{event.queue}"
        return self._around("publish", event.job.id)

    def run(self, event: RunEvent) -> contextlib.AbstractContextManager[object]:
        return self._around("run", event.job.id, event.context.attempt, token=event.job.id)

    def settled(self, event: SettleEvent) -> None:
        self.calls.append(("settled", event.job.id, (event.action, event.status, event.ran, event.timed_out)))

    @contextlib.contextmanager
    def _around(self, what: str, job_id: str, *extra: Any, token: str | None = None) -> Iterator[None]:
        self.calls.append((f"{what}:enter", job_id, extra))
        reset = _AROUND.set(token) if token is not None else None
        try:
            yield
        except BaseException as exc:
            self.calls.append((f"{what}:exit", job_id, type(exc).__name__))
            raise
        else:
            self.calls.append((f"{what}:exit", job_id, None))
        finally:
            if reset is not None:
                _AROUND.reset(reset)

    def of(self, job_id: str) -> list[tuple[str, Any]]:
        return [(what, extra) for what, id_, extra in self.calls if id_ == job_id]


def install(api: Api, *hooks: Hook) -> None:
    """Give the orchestrator under test ``hooks`` (the consumers connected to it inherit them)."""
    orchestrator = api.orchestrator.aio if api.kind == "sync" else api.orchestrator
    orchestrator.hooks = hooks


async def test_hooks_wrap_publish_and_run_and_see_every_settle(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    recorder = Recorder()
    install(api, recorder)
    seen: dict[str, Any] = {}

    async def handler(job: Job) -> Any:
        seen[job.id] = (_AROUND.get(), dict(job.headers))
        return await detect(job)

    job = make_job(schema, 1)
    await api.publish(queue, job)
    assert await asyncio.wait_for(api.consumer(queue, handler).consume(num_messages=1), 20) == 1
    assert seen[job.id] == (job.id, {"stamp": f"from-{queue}"})  # the header travelled; the run saw the context
    assert recorder.of(job.id) == [
        ("publish:enter", ()),
        ("publish:exit", None),
        ("run:enter", (1,)),
        ("run:exit", None),
        ("settled", ("ack", JobStatus.SUCCEEDED, True, False)),
    ]


async def test_a_failing_run_is_seen_by_the_run_hook_then_retried_then_dead_lettered(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    recorder = Recorder()
    install(api, recorder)

    async def failing(job: Job) -> None:
        raise ValueError("bad image")

    job = make_job(schema, 1)
    await api.publish(queue, job)
    consumer = api.consumer(queue, failing, max_retries=1, **FAST_RETRY)
    assert await asyncio.wait_for(consumer.consume(num_messages=2), 20) == 2
    calls = recorder.of(job.id)
    assert [what for what, _ in calls] == [
        "publish:enter",
        "publish:exit",
        "run:enter",
        "run:exit",
        "settled",
        "run:enter",
        "run:exit",
        "settled",
    ]
    assert calls[3] == ("run:exit", "ValueError") and calls[6] == ("run:exit", "ValueError")
    assert calls[2] == ("run:enter", (1,)) and calls[5] == ("run:enter", (2,))
    assert calls[4] == ("settled", ("retry", JobStatus.RETRYING, True, False))
    assert calls[7] == ("settled", ("dead_letter", JobStatus.FAILED, True, False))


async def test_a_run_over_its_time_limit_settles_with_timed_out(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    recorder = Recorder()
    install(api, recorder)
    release = asyncio.Event()

    async def stuck(job: Job) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(release.wait(), 3)

    job = make_job(schema, 1)
    await api.publish(queue, job)
    try:
        consumer = api.consumer(queue, stuck, timeout=0.3, max_retries=0, **FAST_RETRY)
        assert await asyncio.wait_for(consumer.consume(num_messages=1), 20) == 1
    finally:
        release.set()
    settled = [extra for what, extra in recorder.of(job.id) if what == "settled"]
    assert settled == [("dead_letter", JobStatus.FAILED, True, True)]


async def test_publish_many_calls_the_publish_hook_for_each_job(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    recorder = Recorder()
    install(api, recorder)
    jobs = [make_job(schema, i) for i in range(3)]
    await api.publish_many(queue, jobs)
    for job in jobs:
        assert recorder.of(job.id) == [("publish:enter", ()), ("publish:exit", None)]
    taken = [await api.receive_message(queue, timeout=5) for _ in jobs]
    assert sorted(job.headers["stamp"] for job in taken if job is not None) == [f"from-{queue}"] * 3


async def test_a_publish_the_broker_refuses_exits_the_hook_with_the_error(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    recorder = Recorder()
    install(api, recorder)
    job = make_job(schema, 1)
    with pytest.raises(Exception, match="never-declared"):
        await api.publish(f"{queue}-never-declared", job)
    assert recorder.of(job.id) == [("publish:enter", ()), ("publish:exit", "QueueNotFoundError")]


async def test_a_hook_whose_settled_raises_does_not_stop_the_consumer(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)

    class Broken(Hook):
        def settled(self, event: SettleEvent) -> None:
            raise RuntimeError("metrics backend down")

    recorder = Recorder()
    install(api, Broken(), recorder)
    jobs = [make_job(schema, i) for i in range(2)]
    for job in jobs:
        await api.publish(queue, job)
    assert await asyncio.wait_for(api.consumer(queue, detect).consume(num_messages=2), 20) == 2
    for job in jobs:  # the hook after the broken one was still called, and each job succeeded
        assert ("settled", ("ack", JobStatus.SUCCEEDED, True, False)) in recorder.of(job.id)
        assert detection_of(job) is not None


def test_hooks_are_configured_on_the_orchestrator_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = Hook()
    assert AsyncOrchestrator(LocalClient(), hooks=[hook]).hooks == (hook,)
    assert AsyncOrchestrator(LocalClient(), hooks=[]).hooks == ()
    monkeypatch.setenv(TRACING_ENV, "0")  # the default hooks without tracing (see tests/jobs/test_tracing.py)
    assert AsyncOrchestrator(LocalClient()).hooks == ()
    with Orchestrator(LocalClient(), hooks=[hook]) as orchestrator:
        assert orchestrator.aio.hooks == (hook,)
    with pytest.raises(ConfigurationError, match="Hook instances, not object"):
        AsyncOrchestrator(LocalClient(), hooks=[object()])  # type: ignore[list-item]


async def test_a_hook_that_is_not_active_is_left_out_of_every_call(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)

    class Asleep(Recorder):
        active = False  # type: ignore[assignment]

    asleep, awake = Asleep(), Recorder()
    install(api, asleep, awake)
    job = make_job(schema, 1)
    await api.publish(queue, job)
    assert await asyncio.wait_for(api.consumer(queue, detect).consume(num_messages=1), 20) == 1
    assert asleep.calls == []
    assert [what for what, _ in awake.of(job.id)] == [
        "publish:enter",
        "publish:exit",
        "run:enter",
        "run:exit",
        "settled",
    ]


class FailsOnExit(Hook):
    """A run hook whose exit raises (a metrics backend gone): the run's own ending must stand."""

    @contextlib.contextmanager
    def _fail(self) -> Iterator[None]:
        try:
            yield
        finally:
            raise RuntimeError("exporter down")

    def run(self, event: RunEvent) -> contextlib.AbstractContextManager[object]:
        return self._fail()


async def test_a_run_hook_failing_on_exit_keeps_the_result_and_charges_nothing(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    recorder = Recorder()
    install(api, FailsOnExit(), recorder)
    job = make_job(schema, 1)
    await api.publish(queue, job)
    assert await asyncio.wait_for(api.consumer(queue, detect).consume(num_messages=1), 20) == 1
    settled = [extra for what, extra in recorder.of(job.id) if what == "settled"]
    assert settled == [("ack", JobStatus.SUCCEEDED, True, False)]


async def test_a_run_hook_failing_on_entry_fails_the_run_which_is_retried(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)

    class FailsOnEntry(Hook):
        def run(self, event: RunEvent) -> contextlib.AbstractContextManager[object]:
            raise RuntimeError("tracer misconfigured")

    recorder = Recorder()
    install(api, recorder, FailsOnEntry())
    ran: list[int] = []

    async def handler(job: Job) -> Any:
        ran.append(job.attempts)
        return await detect(job)

    job = make_job(schema, 1)
    await api.publish(queue, job)
    consumer = api.consumer(queue, handler, max_retries=1, **FAST_RETRY)
    assert await asyncio.wait_for(consumer.consume(num_messages=1), 20) == 1
    assert ran == []  # the run never started
    settled = [extra for what, extra in recorder.of(job.id) if what == "settled"]
    assert settled == [("retry", JobStatus.RETRYING, True, False)]


async def test_a_cancelled_consume_gives_the_job_back_through_a_hook_failing_on_exit(
    async_api: Api, queue: str
) -> None:
    schema = image_schema(queue)
    await async_api.register(schema)
    recorder = Recorder()
    install(async_api, FailsOnExit(), recorder)
    started = asyncio.Event()

    async def slow(job: Job) -> None:
        started.set()
        await asyncio.sleep(30)

    job = make_job(schema, 1)
    await async_api.publish(queue, job)
    consuming = asyncio.create_task(async_api.consumer(queue, slow).consume(num_messages=1))
    await asyncio.wait_for(started.wait(), 20)
    consuming.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(consuming, 10)  # the cancellation went on: consume() ended
    settled = [extra for what, extra in recorder.of(job.id) if what == "settled"]
    assert settled == [("release", JobStatus.QUEUED, True, False)]  # given back uncharged
    taken = await async_api.receive_message(queue, timeout=5)
    assert taken is not None and taken.id == job.id and taken.attempts == 0
