"""Conformance: typed results awaited through handles: round trips, failures, retries, timeouts, bad results."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pydantic
import pytest

from mindtrace.jobs import Job, JobOutput, JobValidationError
from mindtrace.jobs.backends.base import Backend
from mindtrace.jobs.constants import MAX_RESULT_BYTES
from mindtrace.jobs.errors import JobFailedError, ResultTimeoutError
from mindtrace.jobs.lifecycle import JobStatus
from tests.jobs.conformance.flows import FAST_RETRY, Gate, detect, detection_of
from tests.jobs.conformance.models import DetectionOutput, image_schema, make_job
from tests.jobs.support.api import Api

#: Every test here follows jobs through their records.
pytestmark = pytest.mark.usefixtures("job_records")


class Summary(pydantic.BaseModel):
    """A reading-side model of part of DetectionOutput."""

    objects: list[str]


class Unrelated(pydantic.BaseModel):
    """A model the output does not fit."""

    checkpoint_uri: str


async def test_result_is_the_output_typed_as_the_registered_class(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 4)
    handle = await api.publish(queue, job)
    await asyncio.wait_for(api.consumer(queue, detect).consume(num_messages=1), 20)
    result = await api.result(handle, timeout=10)
    assert type(result) is DetectionOutput and result == detection_of(job)
    assert await api.result_as(handle, DetectionOutput, timeout=10) == detection_of(job)
    assert await api.result_as(handle, Summary) == Summary(objects=["/img/4.jpg"])
    with pytest.raises(JobValidationError) as caught:
        await api.result_as(handle, Unrelated)
    assert "checkpoint_uri" in str(caught.value) and caught.value.job_id == job.id


async def test_a_run_returning_none_has_a_none_result(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    handle = await api.publish(queue, make_job(schema, 1))

    async def nothing(job: Job) -> None:
        return None

    await asyncio.wait_for(api.consumer(queue, nothing).consume(num_messages=1), 20)
    assert await api.result(handle, timeout=10) is None
    assert await api.status(handle) is JobStatus.SUCCEEDED
    with pytest.raises(JobValidationError):  # None is not a DetectionOutput
        await api.result_as(handle, DetectionOutput)


async def test_a_result_read_without_the_schema_registered_keeps_its_fields(api: Api, queue: str) -> None:
    await api.declare_queue(queue)  # the schema is never registered here
    job = make_job(image_schema(queue), 2)
    handle = await api.publish(queue, job)
    await asyncio.wait_for(api.consumer(queue, detect).consume(num_messages=1), 20)
    result = await api.result(handle, timeout=10)
    assert isinstance(result, JobOutput) and not isinstance(result, DetectionOutput)
    assert result.model_dump() == detection_of(job).model_dump()
    assert await api.result_as(handle, DetectionOutput) == detection_of(job)


async def test_a_finished_job_returns_its_result_at_once(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    handle = await api.publish(queue, job)
    await asyncio.wait_for(api.consumer(queue, detect).consume(num_messages=1), 20)
    # timeout=0: nothing to wait for, the record is read once.
    assert await api.result(handle, timeout=0) == detection_of(job)
    assert (await api.wait(handle, timeout=0)).status is JobStatus.SUCCEEDED


async def test_a_wait_that_times_out_leaves_the_job_running(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    handle = await api.publish(queue, job)
    gate = Gate()

    async def slow(job: Job) -> DetectionOutput:
        await gate.hold()
        return detection_of(job)

    consuming = asyncio.create_task(api.consumer(queue, slow).consume(num_messages=1))
    try:
        await gate.reached()
        with pytest.raises(ResultTimeoutError) as caught:
            await api.result(handle, timeout=0.3)
        assert isinstance(caught.value, TimeoutError)
        assert caught.value.job_id == job.id and caught.value.queue == queue
        assert await api.status(handle) is JobStatus.RUNNING
        with pytest.raises(ResultTimeoutError):
            await api.wait(handle, timeout=0.1)
    finally:
        gate.open()
    assert await api.result(handle, timeout=10) == detection_of(job)
    await asyncio.wait_for(consuming, 10)


async def test_a_job_failing_every_retry_raises_job_failed_error_only_once_dead_lettered(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    handle = await api.publish(queue, job)
    runs: list[int] = []
    runs_when_answered: list[int] = []

    async def failing(job: Job) -> None:
        runs.append(job.attempts)
        raise RuntimeError(f"boom {len(runs)}")

    async def answered() -> object:
        try:
            return await api.result(handle, timeout=30)
        finally:  # noted as the wait ends, not in a done callback that may run after the test reads it
            runs_when_answered.append(len(runs))

    def waiter() -> asyncio.Task[object]:
        return asyncio.create_task(answered())

    early = waiter()  # waits from QUEUED
    # The retry delay is long enough to find the job RETRYING and start a waiter there.
    consumer = api.consumer(queue, failing, max_retries=2, retry_delay=0.3, retry_backoff=1.0)
    consuming = asyncio.create_task(consumer.consume(num_messages=3))
    retrying = await api.wait_until(handle, lambda info: info.status is JobStatus.RETRYING)
    assert retrying.error == "RuntimeError: boom 1" and retrying.attempts == 1
    during = waiter()
    assert await asyncio.wait_for(consuming, 20) == 3
    for task in (early, during):
        with pytest.raises(JobFailedError) as caught:
            await task
        failed = caught.value
        assert (failed.job_id, failed.queue) == (job.id, queue)
        assert failed.attempts == 3 and failed.error == "RuntimeError: boom 3"
        assert "boom 3" in str(failed)
    assert runs == [0, 1, 2]
    assert runs_when_answered == [3, 3]  # neither waiter returned between retries
    assert await api.status(handle) is JobStatus.FAILED
    assert await api.count_queue_messages(queue + ".dlq") == 1


async def test_a_job_that_succeeds_on_its_third_run_returns_that_result(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    handle = await api.publish(queue, make_job(schema, 1))
    waiting = asyncio.create_task(api.result(handle, timeout=30))
    runs: list[int] = []

    async def flaky(job: Job) -> DetectionOutput:
        runs.append(job.attempts)
        if len(runs) < 3:
            raise RuntimeError("transient")
        return DetectionOutput(objects=[f"run {len(runs)}"])

    await asyncio.wait_for(api.consumer(queue, flaky, max_retries=3, **FAST_RETRY).consume(num_messages=3), 20)
    assert await waiting == DetectionOutput(objects=["run 3"])
    info = await api.info(handle)
    assert info.status is JobStatus.SUCCEEDED and info.attempts == 3
    assert await api.count_queue_messages(queue + ".dlq") == 0


async def test_a_result_over_max_result_bytes_fails_the_run_naming_the_job_and_the_limit(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    handle = await api.publish(queue, job)

    async def huge(job: Job) -> DetectionOutput:
        return DetectionOutput(objects=["x" * MAX_RESULT_BYTES])  # the default cap, 1 MiB

    await asyncio.wait_for(api.consumer(queue, huge, max_retries=1, **FAST_RETRY).consume(num_messages=2), 20)
    info = await api.info(handle)
    assert info.status is JobStatus.FAILED and info.attempts == 2 and info.output is None
    assert info.error is not None and info.error.startswith("ResultTooLargeError")
    assert job.id in info.error and str(MAX_RESULT_BYTES) in info.error
    with pytest.raises(JobFailedError) as caught:
        await api.result(handle, timeout=5)
    assert caught.value.error == info.error
    dead = await api.receive_message(queue + ".dlq", timeout=5)
    assert dead is not None and dead.id == job.id and dead.error == info.error


async def test_a_result_that_does_not_validate_fails_the_job_with_the_validation_error(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    handle = await api.publish(queue, make_job(schema, 1))

    async def wrong(job: Job) -> object:
        return {"accuracy": "not a number"}

    await asyncio.wait_for(api.consumer(queue, wrong, max_retries=0).consume(num_messages=1), 20)
    info = await api.info(handle)
    assert info.status is JobStatus.FAILED and info.attempts == 1
    assert info.error is not None and info.error.startswith("JobValidationError")
    assert "DetectionOutput" in info.error and "accuracy" in info.error
    with pytest.raises(JobFailedError):
        await api.result(handle, timeout=5)


async def test_a_job_is_followed_by_id_from_another_orchestrator(
    api: Api, queue: str, backend_factory: Callable[[], Backend]
) -> None:
    # Another client, as another process has; in memory there is no other process: the same orchestrator,
    # by id.
    shared = api.orchestrator.backend.capabilities.shared_queues
    other = api.sibling(backend_factory()) if shared else api
    try:
        schema = image_schema(queue)
        await api.register(schema)
        job = make_job(schema, 3)
        published = await api.publish(queue, job)
        handle = other.job(job.id, queue)
        assert await other.status(handle) is JobStatus.QUEUED
        waiting = asyncio.create_task(other.wait(handle, timeout=30))  # a waiter that did not publish
        await asyncio.wait_for(api.consumer(queue, detect).consume(num_messages=1), 20)
        seen = await waiting
        mine = await api.info(published)
        assert seen.status is JobStatus.SUCCEEDED
        assert await other.info(handle) == seen
        fields = ("status", "attempts", "error", "output", "schema", "enqueued_at", "started_at", "finished_at")
        assert {f: getattr(seen, f) for f in fields} == {f: getattr(mine, f) for f in fields}
        assert seen.worker == mine.worker is not None
        if other is not api:  # no schema registered there yet: the fields, untyped
            untyped = await other.result(handle)
            assert type(untyped) is not DetectionOutput and untyped.model_dump() == detection_of(job).model_dump()
            await other.register(schema)
        assert type(await other.result(handle)) is DetectionOutput
        assert await other.result(handle) == detection_of(job)
    finally:
        if other is not api:
            await other.close()


async def test_200_handles_awaited_at_once_all_get_their_results(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    jobs = [make_job(schema, i) for i in range(200)]
    handles = await api.publish_many(queue, jobs)
    waiting = asyncio.gather(*(api.result(handle, timeout=60) for handle in handles))
    consumed = await asyncio.wait_for(api.consumer(queue, detect).consume(num_messages=200, concurrency=8), 60)
    assert consumed == 200
    results = await asyncio.wait_for(waiting, 60)
    assert results == [detection_of(job) for job in jobs]
