"""Conformance: how consume() calls start and run together: two at once on one consumer, undeclared queues."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest

from mindtrace.jobs import Job, QueueNotFoundError
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


async def _wait_until_declared(api: Api, queue: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await api.count_queue_messages(queue)
            return
        except QueueNotFoundError:
            assert loop.time() < deadline, f"{queue!r} was not declared in {timeout}s"
            await asyncio.sleep(0.05)


async def test_consume_on_an_undeclared_queue_declares_it_with_a_warning_naming_it(
    api: Api, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Workers may start before producers: the queue is declared, but a misspelt name must not go unnoticed.
    schema = image_schema(queue)
    ran: list[str] = []

    async def handler(job: Job) -> None:
        ran.append(job.id)

    with caplog.at_level(logging.WARNING, logger="mindtrace.jobs"):
        consuming = asyncio.ensure_future(api.consumer(queue, handler).consume(num_messages=1))
        await _wait_until_declared(api, queue)
        job = make_job(schema, 1)
        await api.publish(queue, job)
        assert await asyncio.wait_for(consuming, 30) == 1
    assert ran == [job.id]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(repr(queue) in message and "declared" in message for message in warnings), warnings


async def test_consume_on_a_declared_queue_says_nothing(api: Api, queue: str, caplog: pytest.LogCaptureFixture) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await api.publish(queue, make_job(schema, 1))

    async def handler(job: Job) -> None:
        return None

    with caplog.at_level(logging.WARNING, logger="mindtrace.jobs"):
        assert await api.consumer(queue, handler).consume(num_messages=1) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_dead_letter_log_counts_in_good_english(api: Api, queue: str, caplog: pytest.LogCaptureFixture) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    await api.publish(queue, job)

    async def handler(job: Job) -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.WARNING, logger="mindtrace.jobs"):
        assert await api.consumer(queue, handler, max_retries=0).consume(num_messages=1) == 1
    (message,) = [r.getMessage() for r in caplog.records if job.id in r.getMessage()]
    assert f"dead-lettering job {job.id} from {queue!r}: failed 1 time, no retry left" in message, message
