"""Conformance: time limits per consumer and per job, and "do not start after" expiry, on every backend and API."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from mindtrace.jobs import Job
from mindtrace.jobs.errors import JobExpiredError, JobFailedError
from mindtrace.jobs.lifecycle import JobStatus
from tests.jobs.conformance.flows import FAST_RETRY, Gate, detection_of, run_until
from tests.jobs.conformance.models import DetectionOutput, image_schema, make_job
from tests.jobs.support.api import Api

#: Every test here follows jobs through their records.
pytestmark = pytest.mark.usefixtures("job_records")


async def test_a_run_over_the_consumer_timeout_fails_with_job_timeout_error_and_is_retried(
    api: Api, queue: str
) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    handle = await api.publish(queue, job)
    gate = Gate()  # never opened before the end: each run would take 5 s
    runs: list[int] = []

    async def stuck(job: Job) -> None:
        runs.append(job.attempts)
        await gate.hold(limit=5)

    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        consumer = api.consumer(queue, stuck, timeout=0.5, max_retries=1, **FAST_RETRY)
        assert await asyncio.wait_for(consumer.consume(num_messages=2), 20) == 2
        took = loop.time() - started
    finally:
        gate.open()  # a blocking run cannot be interrupted: its thread ends here
    assert took < 4.0  # two runs of 0.5 s, not of 5 s: each slot was freed at its limit
    assert runs == [0, 1]
    info = await api.info(handle)
    assert info.status is JobStatus.FAILED and info.attempts == 2
    assert info.error is not None and info.error.startswith("JobTimeoutError") and "0.5" in info.error
    with pytest.raises(JobFailedError) as caught:
        await api.result(handle, timeout=5)
    assert caught.value.attempts == 2
    dead = await api.receive_message(queue + ".dlq", timeout=5)
    assert dead is not None and dead.id == job.id and dead.attempts == 2
    assert dead.error is not None and dead.error.startswith("JobTimeoutError")


async def test_a_job_timeout_overrides_the_consumer_timeout(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    short = make_job(schema, 1, timeout=0.2)  # tighter than the consumer's
    long = make_job(schema, 2, timeout=10.0)  # looser than the consumer's
    handles = [await api.publish(queue, job) for job in (short, long)]
    gate = Gate()

    async def handler(job: Job) -> DetectionOutput:
        if job.id == short.id:
            await gate.hold(limit=5)
        else:
            await asyncio.sleep(0.8)  # over the consumer's 0.5 s, within the job's own 10 s
        return detection_of(job)

    try:
        consumer = api.consumer(queue, handler, timeout=0.5, max_retries=0)
        assert await asyncio.wait_for(consumer.consume(num_messages=2, concurrency=2), 20) == 2
    finally:
        gate.open()
    failed = await api.info(handles[0])
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None and failed.error.startswith("JobTimeoutError")
    assert "0.2s" in failed.error and "0.5s" not in failed.error
    assert await api.result(handles[1], timeout=5) == detection_of(long)


async def test_an_expired_job_is_settled_expired_without_running(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    now = datetime.now(timezone.utc)
    expired = make_job(schema, 1, expires_at=now - timedelta(seconds=1))
    sentinel = make_job(schema, 2, expires_at=now + timedelta(hours=1))  # not yet: it runs
    handle = await api.publish(queue, expired)
    await api.publish(queue, sentinel)
    ran = await run_until(api, queue, sentinel.id)
    assert [j.id for j in ran] == [sentinel.id]
    info = await api.wait(handle, timeout=10)
    assert info.status is JobStatus.EXPIRED and info.started_at is None
    with pytest.raises(JobExpiredError) as caught:
        await api.result(handle, timeout=5)
    assert caught.value.job_id == expired.id and caught.value.queue == queue
    assert await api.status(api.job(sentinel.id, queue)) is JobStatus.SUCCEEDED
    assert await api.count_queue_messages(queue + ".dlq") == 0
    assert await api.count_queue_messages(queue) == 0
