"""Conformance: handles, statuses and job records (times, worker, retention, purge), on every backend and API."""

from __future__ import annotations

import asyncio
import json
import pickle
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

import pytest

from mindtrace.jobs import Job
from mindtrace.jobs.constants import RESULT_TTL
from mindtrace.jobs.errors import JobNotFoundError
from mindtrace.jobs.lifecycle import JobInfo, JobStatus
from mindtrace.jobs.state.base import StateCapabilities
from tests.jobs.conformance.flows import FAST_RETRY, Gate, detect, detection_of
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support.api import Api

#: Every test here follows jobs through their records.
pytestmark = pytest.mark.usefixtures("job_records")


async def test_publish_returns_a_handle_that_is_the_job_id(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    handle = await api.publish(queue, job)
    assert isinstance(handle, api.handle_type)
    assert isinstance(handle, str) and handle == job.id and str(handle) == job.id and type(str(handle)) is str
    assert handle.id == job.id and handle.queue == queue
    assert {job.id: "found"}[handle] == "found" and hash(handle) == hash(job.id)
    assert json.dumps({"id": handle}) == json.dumps({"id": job.id})
    unpickled = pickle.loads(pickle.dumps(handle))
    assert unpickled == job.id and type(unpickled) is str
    many = [make_job(schema, i) for i in range(3)]
    handles = await api.publish_many(queue, many)
    assert handles == [j.id for j in many] and all(isinstance(h, api.handle_type) for h in handles)
    assert [await api.status(h) for h in handles] == [JobStatus.QUEUED] * 3
    again = api.job(job.id, queue)  # re-attached by id: the same job
    assert isinstance(again, api.handle_type) and again == handle
    assert await api.status(again) is JobStatus.QUEUED


async def test_status_is_queued_then_running_inside_run_then_succeeded(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    handle = await api.publish(queue, job)
    assert await api.status(handle) is JobStatus.QUEUED
    gate = Gate()

    async def handler(job: Job) -> object:
        await gate.hold()
        return detection_of(job)

    consuming = asyncio.create_task(api.consumer(queue, handler).consume(num_messages=1))
    try:
        await gate.reached()
        assert await api.status(handle) is JobStatus.RUNNING
        running = await api.info(handle)
        assert running.started_at is not None and running.finished_at is None and running.attempts == 1
    finally:
        gate.open()
    assert await asyncio.wait_for(consuming, 20) == 1
    assert await api.status(handle) is JobStatus.SUCCEEDED


def _within(moment: datetime | None, start: float, end: float) -> datetime:
    """``moment``, checked to be an aware UTC time between ``start`` and ``end`` (Unix seconds, 1 s slack for
    a store that takes its time from its server's clock)."""
    assert moment is not None and moment.utcoffset() == timezone.utc.utcoffset(None), moment
    assert start - 1.0 <= moment.timestamp() <= end + 1.0, (moment, start, end)
    return moment


async def test_info_records_attempts_times_worker_and_output(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    before = time.time()
    handle = await api.publish(queue, job)
    queued = await api.info(handle)
    assert (queued.job_id, queued.queue, queued.status, queued.attempts) == (job.id, queue, JobStatus.QUEUED, 0)
    assert queued.started_at is None and queued.finished_at is None and queued.output is None
    consumer = api.consumer(queue, detect)
    assert await asyncio.wait_for(consumer.consume(num_messages=1), 20) == 1
    after = time.time()
    info = await api.info(handle)
    assert info.status is JobStatus.SUCCEEDED and info.terminal
    assert info.attempts == 1 and info.error is None
    assert info.output == detection_of(job).model_dump()
    assert info.schema == queue
    assert info.worker == consumer.worker_id
    enqueued, started, finished = (
        _within(t, before, after) for t in (info.enqueued_at, info.started_at, info.finished_at)
    )
    assert enqueued <= started <= finished
    assert info.enqueued_at == queued.enqueued_at


async def test_info_of_a_failed_job_keeps_its_error_and_attempts(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    handle = await api.publish(queue, make_job(schema, 1))
    runs: list[int] = []

    async def handler(job: Job) -> None:
        runs.append(job.attempts)
        raise ValueError(f"bad pixel {len(runs)}")

    await asyncio.wait_for(api.consumer(queue, handler, max_retries=1, **FAST_RETRY).consume(num_messages=2), 20)
    info = await api.info(handle)
    assert info.status is JobStatus.FAILED
    assert info.attempts == 2 and runs == [0, 1]
    assert info.error == "ValueError: bad pixel 2"
    assert info.output is None and info.finished_at is not None
    assert await api.count_queue_messages(queue + ".dlq") == 1


async def test_an_unknown_id_is_unknown_never_queued(api: Api, queue: str) -> None:
    await api.declare_queue(queue)
    handle = api.job(str(uuid.uuid4()), queue)
    assert await api.status(handle) is JobStatus.UNKNOWN
    info = await api.info(handle)
    assert info == JobInfo(job_id=handle.id, queue=queue)
    # A wait for it returns at once (a wait that thought it pending would time out instead).
    assert (await api.wait(handle, timeout=5)).status is JobStatus.UNKNOWN
    with pytest.raises(JobNotFoundError) as caught:
        await api.result(handle, timeout=5)
    assert isinstance(caught.value, LookupError)
    assert caught.value.job_id == handle.id and caught.value.queue == queue
    assert await api.status(handle) is JobStatus.UNKNOWN  # looking did not create a record


async def test_a_job_looked_up_on_another_queue_is_unknown(api: Api, new_queue: Callable[[str], str]) -> None:
    queue, other = new_queue("q"), new_queue("other")
    schema = image_schema(queue)
    await api.register(schema)
    await api.declare_queue(other)
    job = make_job(schema, 1)
    handle = await api.publish(queue, job)
    elsewhere = api.job(job.id, other)
    assert await api.status(elsewhere) is JobStatus.UNKNOWN
    consumer = api.consumer(queue, detect)
    await asyncio.wait_for(consumer.consume(num_messages=1), 20)
    assert await api.status(handle) is JobStatus.SUCCEEDED
    assert await api.status(elsewhere) is JobStatus.UNKNOWN
    with pytest.raises(JobNotFoundError):
        await api.result(elsewhere, timeout=5)


async def test_finished_records_are_forgotten_after_the_result_ttl_of_their_queue(
    api: Api, new_queue: Callable[[str], str]
) -> None:
    short, default = new_queue("ttl1"), new_queue("ttl-default")
    handles = {}
    for queue in (short, default):
        schema = image_schema(queue)
        await api.register(schema)
        handles[queue] = await api.publish(queue, make_job(schema, 1))
    await api.declare_queue(short, result_ttl=1)
    for queue in (short, default):
        consumer = api.consumer(queue, detect)
        await asyncio.wait_for(consumer.consume(num_messages=1), 20)
    kept = await api.info(handles[short])
    assert kept.status is JobStatus.SUCCEEDED
    assert kept.expires_at is not None and kept.finished_at is not None
    assert abs((kept.expires_at - kept.finished_at).total_seconds() - 1.0) < 0.1
    long = await api.info(handles[default])
    assert long.expires_at is not None and long.finished_at is not None
    assert abs((long.expires_at - long.finished_at).total_seconds() - RESULT_TTL) < 1.0
    # Retention is a time: wait it out (a second past the record's expiry, for stores with 1-s precision).
    await asyncio.sleep(max(0.0, kept.expires_at.timestamp() - time.time()) + 1.0)
    assert await api.status(handles[short]) is JobStatus.UNKNOWN
    with pytest.raises(JobNotFoundError):
        await api.result(handles[short], timeout=5)
    assert await api.status(handles[default]) is JobStatus.SUCCEEDED


async def test_purged_jobs_read_unknown_and_their_waiters_wake(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    done = await api.publish(queue, make_job(schema, 0))
    await asyncio.wait_for(api.consumer(queue, detect).consume(num_messages=1), 20)
    handles = await api.publish_many(queue, [make_job(schema, i) for i in range(1, 4)])
    waiter = asyncio.create_task(api.result(handles[0], timeout=20))
    # (A waiter still subscribing when the purge lands reads UNKNOWN at once: the same outcome.)
    await api.wait_until(handles[0], lambda info: info.status is JobStatus.QUEUED)
    assert await api.clean_queue(queue) == 3
    assert [await api.status(h) for h in handles] == [JobStatus.UNKNOWN] * 3
    with pytest.raises(JobNotFoundError):
        await waiter
    with pytest.raises(JobNotFoundError):
        await api.result(handles[1], timeout=5)
    assert await api.status(done) is JobStatus.SUCCEEDED  # a purge takes only what is queued


async def test_a_job_handed_out_by_receive_message_is_forgotten(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    handle = await api.publish(queue, job)
    received = await api.receive_message(queue, timeout=5)
    assert received is not None and received.id == job.id
    assert await api.status(handle) is JobStatus.UNKNOWN
    with pytest.raises(JobNotFoundError):
        await api.result(handle, timeout=5)


async def test_the_state_store_declares_capabilities_that_agree(api: Api) -> None:
    store = api.store
    capabilities = store.capabilities
    assert isinstance(capabilities, StateCapabilities)
    if capabilities.exact_cancel:
        assert capabilities.cancel_race == 0
    else:
        assert capabilities.cancel_race > 0
    # Records written inside the broker's steps are what "fused" means: the two must say the same.
    assert capabilities.atomic_settles == store.settles_with(api.orchestrator.backend)
