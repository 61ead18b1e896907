"""A user's tests, written with the shipped plugin's ``jobs_`` fixtures, on memory, Redis and RabbitMQ."""

from __future__ import annotations

from typing import Any

import pytest

from mindtrace.jobs import (
    AsyncConsumer,
    AsyncOrchestrator,
    Consumer,
    Job,
    JobFailedError,
    JobInput,
    JobOutput,
    JobSchema,
    JobStatus,
    Orchestrator,
    job_from_schema,
)
from mindtrace.jobs.testing import JobsRun, JobsSyncRun

BACKENDS = pytest.mark.jobs_backends("memory", "redis", "rabbitmq")


class ResizeInput(JobInput):
    path: str
    width: int = 256


class ResizeOutput(JobOutput):
    uri: str


def resize_schema(queue: str) -> JobSchema:
    return JobSchema(name=queue, input=ResizeInput(path="/x.png"), output=ResizeOutput)


class Resize(AsyncConsumer):
    async def run(self, job: Job) -> dict[str, Any]:
        data = job.payload.input
        if data.path.endswith(".bad"):
            raise ValueError(f"cannot read {data.path}")
        return {"uri": f"s3://thumbs{data.path}@{data.width}"}


@BACKENDS
async def test_results_are_awaited_typed(
    jobs_orchestrator: AsyncOrchestrator, jobs_queue: str, jobs_run: JobsRun
) -> None:
    schema = resize_schema(jobs_queue)
    await jobs_orchestrator.register(schema)
    handles = [
        await jobs_orchestrator.publish(jobs_queue, job_from_schema(schema, {"path": f"/{i}.png", "width": 64}))
        for i in range(3)
    ]
    assert await jobs_run(Resize(jobs_queue), num_messages=3) == 3
    results = [await handle.result(timeout=10) for handle in handles]
    assert results == [ResizeOutput(uri=f"s3://thumbs/{i}.png@64") for i in range(3)]
    assert [await handle.status() for handle in handles] == [JobStatus.SUCCEEDED] * 3


@BACKENDS
async def test_a_job_that_keeps_failing_is_dead_lettered_then_requeued(
    jobs_orchestrator: AsyncOrchestrator, jobs_queue: str, jobs_run: JobsRun
) -> None:
    schema = resize_schema(jobs_queue)
    await jobs_orchestrator.register(schema)
    handle = await jobs_orchestrator.publish(jobs_queue, job_from_schema(schema, {"path": "/broken.bad"}))
    assert await jobs_run(Resize(jobs_queue, max_retries=1, retry_delay=0.0), num_messages=2) == 2
    with pytest.raises(JobFailedError) as failed:
        await handle.result(timeout=10)
    assert failed.value.attempts == 2 and "cannot read /broken.bad" in str(failed.value)
    assert await jobs_orchestrator.count_queue_messages(f"{jobs_queue}.dlq") == 1
    assert await jobs_orchestrator.requeue_dead_letters(jobs_queue) == 1
    assert await jobs_orchestrator.count_queue_messages(jobs_queue) == 1


class Thumbnail(Consumer):
    def run(self, job: Job) -> ResizeOutput:
        return ResizeOutput(uri=f"file://{job.payload.input.path}")


@BACKENDS
def test_a_blocking_consumer_drains_its_queue(
    jobs_sync_orchestrator: Orchestrator, jobs_queue: str, jobs_sync_run: JobsSyncRun
) -> None:
    schema = resize_schema(jobs_queue)
    jobs_sync_orchestrator.register(schema)
    jobs_sync_orchestrator.declare_queue(jobs_queue)
    handles = [jobs_sync_orchestrator.publish(jobs_queue, job_from_schema(schema, {"path": f"/{i}"})) for i in range(4)]
    assert jobs_sync_run(Thumbnail(jobs_queue)) == 4  # until the queue is idle
    assert jobs_sync_orchestrator.count_queue_messages(jobs_queue) == 0
    assert handles[-1].result(timeout=10) == ResizeOutput(uri="file:///3")
