"""Conformance: cancelling queued, retrying, running, finished and unknown jobs, on every backend and API.

What may differ between stores is read from ``api.store.capabilities``: with ``exact_cancel`` a cancelled
job never starts; without it, only a delivery within ``cancel_race`` seconds of the cancel may start it, so
these tests leave more than that between a cancel and any delivery of the job.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

from mindtrace.jobs import Job
from mindtrace.jobs.backends.base import Backend
from mindtrace.jobs.context import current_job
from mindtrace.jobs.errors import JobCancelledError
from mindtrace.jobs.lifecycle import CancelOutcome, JobStatus
from tests.jobs.conformance.flows import FAST_RETRY, Gate, detect, detection_of, run_until
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support.api import Api

#: Every test here follows jobs through their records.
pytestmark = pytest.mark.usefixtures("job_records")


async def _assert_cancelled(api: Api, handle: str, reason: str | None) -> None:
    """The job's record is CANCELLED for good: result() raises JobCancelledError with ``reason``."""
    info = await api.wait(handle, timeout=10)
    assert info.status is JobStatus.CANCELLED, info
    with pytest.raises(JobCancelledError) as caught:
        await api.result(handle, timeout=5)
    assert caught.value.job_id == handle and caught.value.reason == reason
    assert await api.cancel(handle) is CancelOutcome.ALREADY_FINISHED


async def test_a_cancelled_queued_job_never_runs(api: Api, queue: str) -> None:
    # A consumer runs (busy with a first job) while the job behind it is cancelled.
    schema = image_schema(queue)
    await api.register(schema)
    blocker, victim, sentinel = (make_job(schema, i) for i in range(3))
    await api.publish(queue, blocker)
    gate = Gate()

    async def handler(job: Job) -> object:
        if job.id == blocker.id:
            await gate.hold()
        return detection_of(job)

    running = asyncio.create_task(run_until(api, queue, sentinel.id, handler))
    try:
        await gate.reached()
        handle = await api.publish(queue, victim)
        await api.publish(queue, sentinel)
        assert await api.cancel(handle, reason="not needed") is CancelOutcome.CANCELLED
        assert await api.status(handle) is JobStatus.CANCELLED
        # Without exact cancels, a delivery racing the cancel by less than cancel_race may start the job.
        await asyncio.sleep(api.store.capabilities.cancel_race)
    finally:
        gate.open()
    ran = await asyncio.wait_for(running, 20)
    assert [j.id for j in ran] == [blocker.id, sentinel.id]
    await _assert_cancelled(api, handle, "not needed")
    assert await api.count_queue_messages(queue) == 0
    assert await api.count_queue_messages(queue + ".dlq") == 0


async def test_a_cancel_sent_while_no_consumer_runs_holds_when_one_starts(
    api: Api, queue: str, backend_factory: Callable[[], Backend]
) -> None:
    # The consumer that starts later is another client's where queues are shared (it learns of the cancel
    # from the store, not from this process).
    schema = image_schema(queue)
    await api.register(schema)
    victim, sentinel = make_job(schema, 1), make_job(schema, 2)
    handle = await api.publish(queue, victim)
    await api.publish(queue, sentinel)
    assert await api.cancel(handle) is CancelOutcome.CANCELLED
    shared = api.orchestrator.backend.capabilities.shared_queues
    later = api.sibling(backend_factory()) if shared else api
    try:
        await later.register(schema)
        ran = await run_until(later, queue, sentinel.id)
        assert [j.id for j in ran] == [sentinel.id]
        await _assert_cancelled(later, later.job(victim.id, queue), None)
    finally:
        if later is not api:
            await later.close()
    assert await api.status(handle) is JobStatus.CANCELLED
    assert await api.count_queue_messages(queue + ".dlq") == 0


async def test_a_job_cancelled_while_waiting_for_its_retry_never_runs_again(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    victim = make_job(schema, 1, priority=9)  # ahead of the sentinel, should its retry come back
    handle = await api.publish(queue, victim)
    delay = 0.3 + 2 * api.store.capabilities.cancel_race
    runs: list[str] = []

    async def fail_once(job: Job) -> object:
        runs.append(job.id)
        if job.id == victim.id:
            raise RuntimeError("first run fails")
        return detection_of(job)

    holder = api.consumer(queue, fail_once, retry_delay=delay, retry_backoff=1.0)
    consuming = asyncio.create_task(holder.consume())
    try:
        await api.wait_until(handle, lambda info: info.status is JobStatus.RETRYING)
        assert await api.cancel(handle, reason="superseded") is CancelOutcome.CANCELLED
        await asyncio.sleep(delay + 0.3)  # the retry would be due by now
        sentinel = make_job(schema, 2)
        await api.publish(queue, sentinel)
        await api.wait_until(api.job(sentinel.id, queue), lambda info: info.terminal)
    finally:
        holder.stop()
        await asyncio.wait_for(consuming, 20)
    assert runs == [victim.id, sentinel.id]
    await _assert_cancelled(api, handle, "superseded")
    assert await api.count_queue_messages(queue + ".dlq") == 0


async def test_cancelling_a_running_job_reaches_its_run_and_it_ends_cancelled(api: Api, queue: str) -> None:
    # An async run is cancelled (CancelledError at its next await); a blocking run cannot be interrupted and
    # sees the cancel through its job context instead, then returns. Either way the job ends CANCELLED, with
    # no retry and no dead letter.
    schema = image_schema(queue)
    await api.register(schema)
    victim, sentinel = make_job(schema, 1), make_job(schema, 2)
    handle = await api.publish(queue, victim)
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    heard: list[tuple[str, float]] = []

    async def handler(job: Job) -> object:
        if job.id != victim.id:
            return detection_of(job)
        started.set()
        context = current_job()
        try:
            deadline = loop.time() + 15
            # What a blocking run does: check the flag between steps (it is a thread-safe flag, not awaitable).
            while not context.cancelled and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            heard.append(("CancelledError", loop.time()))
            raise
        heard.append(("context.cancelled" if context.cancelled else "nothing", loop.time()))
        return detection_of(job)

    running = asyncio.create_task(run_until(api, queue, sentinel.id, handler, max_retries=3, **FAST_RETRY))
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert await api.status(handle) is JobStatus.RUNNING
        sent = loop.time()
        assert await api.cancel(handle, reason="stop training") is CancelOutcome.CANCELLING
        await _assert_cancelled(api, handle, "stop training")
    finally:
        await api.publish(queue, sentinel)
    ran = await asyncio.wait_for(running, 20)
    assert len(heard) == 1, heard
    how, when = heard[0]
    assert how == ("CancelledError" if api.kind == "async" else "context.cancelled")
    assert when - sent < 2.0  # within about a second (the bound), with room for a noisy machine
    assert [j.id for j in ran] == [victim.id, sentinel.id]  # never retried
    assert await api.count_queue_messages(queue + ".dlq") == 0
    assert await api.count_queue_messages(queue) == 0


async def test_cancelling_a_finished_job_leaves_its_result(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    handle = await api.publish(queue, job)
    await asyncio.wait_for(api.consumer(queue, detect).consume(num_messages=1), 20)
    before = await api.info(handle)
    assert await api.cancel(handle) is CancelOutcome.ALREADY_FINISHED
    assert await api.info(handle) == before
    assert await api.result(handle, timeout=5) == detection_of(job)


async def test_cancelling_an_unknown_job_is_not_found(api: Api, queue: str) -> None:
    await api.declare_queue(queue)
    handle = api.job(str(uuid.uuid4()), queue)
    assert await api.cancel(handle) is CancelOutcome.NOT_FOUND
    assert await api.call("cancel", str(uuid.uuid4()), queue, reason="typo") is CancelOutcome.NOT_FOUND
    assert await api.status(handle) is JobStatus.UNKNOWN  # the cancel left no record behind
