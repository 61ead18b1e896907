"""Conformance: publishing a job id the queue already holds, as ``capabilities.unique_job_ids`` says."""

from __future__ import annotations

from mindtrace.jobs import Job
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support.api import Api


def copies(api: Api, published: int) -> int:
    """How many copies ``published`` publishes of one job queue: one where job ids are unique, else each."""
    return 1 if api.orchestrator.backend.capabilities.unique_job_ids else published


async def drain_ids(api: Api, queue: str) -> list[str]:
    """Receive (and so ack) every job ready on ``queue``; their ids, in order."""
    ids = []
    while (job := await api.receive_message(queue, timeout=0.2)) is not None:
        ids.append(job.id)
    return ids


async def test_a_job_published_twice_is_queued_as_the_capability_says(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job, other = make_job(schema, 1), make_job(schema, 2)
    assert await api.publish(queue, job) == job.id
    assert await api.publish(queue, job) == job.id
    await api.publish(queue, other)
    assert await api.count_queue_messages(queue) == copies(api, 2) + 1
    assert await drain_ids(api, queue) == [job.id] * copies(api, 2) + [other.id]
    # Acked: the id is free again, on every backend.
    await api.publish(queue, job)
    assert await drain_ids(api, queue) == [job.id]


async def test_a_job_twice_in_one_batch_is_queued_as_the_capability_says(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job, other = make_job(schema, 1), make_job(schema, 2)
    assert await api.publish_many(queue, [job, other, job]) == [job.id, other.id, job.id]
    assert await api.count_queue_messages(queue) == copies(api, 2) + 1
    expected = [job.id, other.id] + [job.id] * (copies(api, 2) - 1)
    assert await drain_ids(api, queue) == expected
    await api.publish_many(queue, [job])
    assert await drain_ids(api, queue) == [job.id]


async def test_a_job_is_held_while_claimed_and_while_waiting_for_its_retry(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    await api.publish(queue, job)
    attempts: list[int] = []

    async def handler(run: Job) -> None:
        attempts.append(run.attempts)
        if len(attempts) == 1:
            await api.publish(queue, job)  # while this run holds it
            raise RuntimeError("first run fails")

    consumer = api.consumer(queue, handler, max_retries=3, retry_delay=0.3)
    assert await consumer.consume(num_messages=1) == 1
    await api.publish(queue, job)  # while its retry waits (or, the delay over, is ready again)
    left = copies(api, 3)  # the retry, and (ids not unique) the two copies published meanwhile
    assert await consumer.consume(num_messages=left) == left
    assert sorted(attempts) == sorted([0, 1] + [0] * (left - 1))
    assert await api.count_queue_messages(queue) == 0
    assert await api.receive_message(queue, timeout=0.5) is None


async def test_a_dead_lettered_or_purged_job_can_be_published_again(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    await api.publish(queue, job)

    async def handler(run: Job) -> None:
        raise RuntimeError("fails")

    assert await api.consumer(queue, handler, max_retries=0).consume(num_messages=1) == 1
    assert await api.count_queue_messages(queue + ".dlq") == 1
    await api.publish(queue, job)
    assert await api.count_queue_messages(queue) == 1
    assert await api.clean_queue(queue) == 1
    await api.publish(queue, job)
    assert await api.count_queue_messages(queue) == 1
    await api.delete_queue(queue)
    await api.register(schema)
    await api.publish(queue, job)
    assert await drain_ids(api, queue) == [job.id]
    assert await api.count_queue_messages(queue + ".dlq") == 0
