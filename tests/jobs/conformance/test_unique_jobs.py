"""Conformance: unique jobs (``publish(dedup_key=..., dedup_ttl=...)``) on every backend and API.

While a job published with a key lives (queued, scheduled, running, retrying) and within its TTL, a publish of
the key on the same queue returns that job's id and queues nothing; once it ends, or the TTL passes, the key is
free. Keys are per queue. Concurrent publishes of a key queue exactly one job where ``store.capabilities.dedup``
is ``"exact"``. Bad keys and TTLs are refused with a JobValidationError naming the field, and nothing is
published.
"""

from __future__ import annotations

import asyncio
import math
from datetime import timedelta
from typing import Any

import pytest

from mindtrace.jobs import Job, JobValidationError, QueueNotFoundError
from mindtrace.jobs.constants import MAX_DEDUP_KEY_LENGTH
from mindtrace.jobs.lifecycle import CancelOutcome, JobStatus
from tests.jobs.conformance.flows import Gate, detection_of, run_until
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.conformance.test_lost_queues import lose_queue
from tests.jobs.support.api import Api

#: Every test here follows jobs through their records.
pytestmark = pytest.mark.usefixtures("job_records")


async def test_a_second_publish_of_a_key_returns_the_first_job_and_queues_nothing(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    first, second = make_job(schema, 0), make_job(schema, 1)
    handle = await api.publish(queue, first, dedup_key="report-42")
    again = await api.publish(queue, second, dedup_key="report-42")
    assert isinstance(again, api.handle_type)
    assert again == handle == first.id
    assert await api.count_queue_messages(queue) == 1
    assert await api.status(again) is JobStatus.QUEUED
    assert (await api.info(handle)).dedup_key == "report-42"
    assert await api.status(api.job(second.id, queue)) is JobStatus.UNKNOWN  # never recorded
    # Another key, or none, is another job.
    other = await api.publish(queue, make_job(schema, 2), dedup_key="report-43")
    plain = await api.publish(queue, make_job(schema, 3))
    assert len({handle, other, plain}) == 3
    assert await api.count_queue_messages(queue) == 3


async def test_keys_are_per_queue(api: Api, new_queue: Any) -> None:
    one, two = new_queue("a"), new_queue("b")
    for name in (one, two):
        await api.register(image_schema(name))
    a = await api.publish(one, make_job(image_schema(one)), dedup_key="k")
    b = await api.publish(two, make_job(image_schema(two)), dedup_key="k")
    assert a != b
    assert await api.count_queue_messages(one) == 1 and await api.count_queue_messages(two) == 1


async def test_the_key_is_held_while_the_job_runs_and_free_once_it_succeeded(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 0)
    handle = await api.publish(queue, job, dedup_key="nightly")
    gate = Gate()

    async def handler(run: Job) -> object:
        if run.id == job.id:
            await gate.hold()
        return detection_of(run)

    running = asyncio.create_task(run_until(api, queue, job.id, handler))
    try:
        await gate.reached()
        assert await api.publish(queue, make_job(schema, 1), dedup_key="nightly") == handle  # running: held
        assert await api.count_queue_messages(queue) == 0
    finally:
        gate.open()
    await running
    assert (await api.wait(handle, timeout=10)).status is JobStatus.SUCCEEDED
    fresh = await api.publish(queue, make_job(schema, 2), dedup_key="nightly")
    assert fresh != handle
    assert await api.status(fresh) is JobStatus.QUEUED
    assert await api.count_queue_messages(queue) == 1


async def test_a_failed_job_frees_its_key(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    handle = await api.publish(queue, make_job(schema, 0), dedup_key="once")

    async def fail(run: Job) -> object:
        raise RuntimeError("boom")

    await asyncio.wait_for(api.consumer(queue, fail, max_retries=0).consume(num_messages=1), 20)
    assert (await api.wait(handle, timeout=10)).status is JobStatus.FAILED
    assert await api.publish(queue, make_job(schema, 1), dedup_key="once") != handle


async def test_a_cancel_frees_the_key(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    handle = await api.publish(queue, make_job(schema, 0), dedup_key="k")
    assert await api.cancel(handle) is CancelOutcome.CANCELLED
    fresh = await api.publish(queue, make_job(schema, 1), dedup_key="k")
    assert fresh != handle
    assert await api.status(fresh) is JobStatus.QUEUED


async def test_a_scheduled_job_holds_its_key(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    handle = await api.publish(queue, make_job(schema, 0), delay=60, dedup_key="later")
    assert await api.status(handle) is JobStatus.SCHEDULED
    assert await api.publish(queue, make_job(schema, 1), dedup_key="later") == handle
    assert await api.cancel(handle) is CancelOutcome.CANCELLED


@pytest.mark.parametrize("ttl", [0.5, timedelta(milliseconds=500)], ids=["seconds", "timedelta"])
async def test_the_ttl_frees_the_key_of_a_job_still_queued(api: Api, queue: str, ttl: float | timedelta) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    handle = await api.publish(queue, make_job(schema, 0), dedup_key="k", dedup_ttl=ttl)
    assert await api.publish(queue, make_job(schema, 1), dedup_key="k") == handle
    await asyncio.sleep(0.8)
    fresh = await api.publish(queue, make_job(schema, 2), dedup_key="k")
    assert fresh != handle
    assert await api.count_queue_messages(queue) == 2  # the first is still queued: the TTL freed only the key
    assert await api.publish(queue, make_job(schema, 3), dedup_key="k") == fresh


async def test_a_publish_the_broker_refused_leaves_the_key_free(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await lose_queue(api, queue)
    refused = make_job(schema, 0)
    with pytest.raises(QueueNotFoundError):
        await api.publish(queue, refused, dedup_key="k")
    assert await api.status(api.job(refused.id, queue)) is JobStatus.UNKNOWN
    await api.declare_queue(queue)
    fresh = await api.publish(queue, make_job(schema, 1), dedup_key="k")
    assert fresh != refused.id
    assert await api.count_queue_messages(queue) == 1


async def test_concurrent_publishes_of_a_key_queue_one_job(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    jobs = [make_job(schema, i) for i in range(20)]
    handles = await asyncio.gather(*(api.publish(queue, job, dedup_key="race") for job in jobs))
    assert set(handles) <= {job.id for job in jobs}
    queued = await api.count_queue_messages(queue)
    if api.store.capabilities.dedup == "exact":
        assert len(set(handles)) == 1 and queued == 1
    else:  # best effort: racers may each queue a job, but every handle names a job that was queued
        assert 1 <= len(set(handles)) == queued <= len(jobs)
    # Once the race is over, the key is held: a later publish queues nothing.
    assert await api.publish(queue, make_job(schema, 99), dedup_key="race") in set(handles)
    assert await api.count_queue_messages(queue) == queued


async def test_publish_many_with_keys(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    held = await api.publish(queue, make_job(schema, 0), dedup_key="a")
    jobs = [make_job(schema, i) for i in range(1, 5)]
    handles = await api.publish_many(queue, jobs, dedup_keys=["a", "b", None, "b"])
    assert handles[0] == held  # held by the earlier publish
    assert handles[1] == jobs[1].id and handles[2] == jobs[2].id
    assert handles[3] == jobs[1].id  # held by a job earlier in the list
    assert await api.count_queue_messages(queue) == 3


_BAD: list[tuple[dict[str, Any], str]] = [
    ({"dedup_key": ""}, "dedup_key"),
    ({"dedup_key": 42}, "dedup_key"),
    ({"dedup_key": b"bytes"}, "dedup_key"),
    ({"dedup_key": "k" * (MAX_DEDUP_KEY_LENGTH + 1)}, "dedup_key"),
    ({"dedup_key": "k", "dedup_ttl": 0}, "dedup_ttl"),
    ({"dedup_key": "k", "dedup_ttl": -1.0}, "dedup_ttl"),
    ({"dedup_key": "k", "dedup_ttl": math.nan}, "dedup_ttl"),
    ({"dedup_key": "k", "dedup_ttl": math.inf}, "dedup_ttl"),
    ({"dedup_key": "k", "dedup_ttl": timedelta(seconds=-1)}, "dedup_ttl"),
    ({"dedup_key": "k", "dedup_ttl": True}, "dedup_ttl"),
    ({"dedup_key": "k", "dedup_ttl": "10"}, "dedup_ttl"),
    ({"dedup_ttl": 10}, "dedup_ttl"),
]


@pytest.mark.parametrize(("options", "field"), _BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(_BAD)])
async def test_bad_keys_and_ttls_are_refused_and_nothing_is_published(
    api: Api, queue: str, options: dict[str, Any], field: str
) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema)
    with pytest.raises(JobValidationError) as caught:
        await api.publish(queue, job, **options)
    assert caught.value.field == field
    assert field in str(caught.value)
    assert await api.count_queue_messages(queue) == 0
    assert await api.status(api.job(job.id, queue)) is JobStatus.UNKNOWN
