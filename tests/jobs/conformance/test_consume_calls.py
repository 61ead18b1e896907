"""Conformance: how consume() calls start and run together: two at once on one consumer, undeclared queues."""

from __future__ import annotations

import asyncio
from collections import Counter

from mindtrace.jobs import Job
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support.api import Api


async def test_two_consume_calls_at_once_on_one_consumer_run_every_job_once_uncharged(api: Api, queue: str) -> None:
    # The sync Consumer runs each call's jobs in a thread pool: one call ending must not take the pool of the
    # other away (a job refused a thread would be charged an attempt it never ran).
    schema = image_schema(queue)
    await api.register(schema)
    jobs = [make_job(schema, i) for i in range(40)]
    await api.publish_many(queue, jobs)
    runs: Counter[str] = Counter()
    attempts: list[int] = []

    async def handler(job: Job) -> None:
        runs[job.id] += 1
        attempts.append(job.attempts)
        await asyncio.sleep(0.005)

    consumer = api.consumer(queue, handler, max_retries=0)
    # Different lengths: the short call ends while the long one still runs jobs.
    handled = await asyncio.gather(consumer.consume(num_messages=10), consumer.consume(num_messages=30, concurrency=2))
    assert handled == [10, 30]
    assert runs == Counter({job.id: 1 for job in jobs})
    assert attempts == [0] * 40
    assert await api.count_queue_messages(queue) == 0
    assert await api.count_queue_messages(queue + ".dlq") == 0
