"""Conformance: a queue the broker lost behind the orchestrator's back (as after a restart without data).

The queue is deleted through the backend itself, so the orchestrator still believes it exists, as a client
that survived a Redis restart without persistence does.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from mindtrace.jobs import QUEUE_MAPPING, Job, JobType, QueueNotFoundError
from mindtrace.jobs._loop_thread import get_loop_thread
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support.api import Api


async def lose_queue(api: Api, queue: str) -> None:
    """Delete ``queue`` on the broker without telling the orchestrator."""
    deletion = api.orchestrator.backend.delete_queue(queue)
    if api.kind == "async":
        await deletion
    else:  # the sync facade's backend lives on the loop thread
        await asyncio.to_thread(get_loop_thread().run, deletion, "test")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_auto_routed_publish_declares_a_lost_queue_again(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    routed = QUEUE_MAPPING[JobType.DEFAULT]  # no other test routes there
    schema = image_schema("lost-routing")
    try:
        await api.publish(make_job(schema, 1))
        await lose_queue(api, routed)
        job = make_job(schema, 2)
        with caplog.at_level(logging.WARNING, logger="mindtrace.jobs"):
            assert await api.publish(job) == job.id
        assert await api.count_queue_messages(routed) == 1
        received = await api.receive_message(routed, timeout=5)
        assert received is not None and received.id == job.id
        assert any(repr(routed) in message for message in _warnings(caplog)), _warnings(caplog)
    finally:
        await api.delete_queue(routed)


async def test_explicit_publish_to_a_lost_queue_says_it_was_lost(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await api.publish(queue, make_job(schema, 1))
    await lose_queue(api, queue)
    with pytest.raises(QueueNotFoundError) as caught:
        await api.publish(queue, make_job(schema, 2))
    assert caught.value.lost and caught.value.queue == queue
    assert "no longer exists" in str(caught.value) and "restart" in str(caught.value)
    with pytest.raises(QueueNotFoundError):  # still not declared behind the caller's back
        await api.publish_many(queue, [make_job(schema, 3)])
    await api.declare_queue(queue)
    await api.publish(queue, make_job(schema, 4))
    assert await api.count_queue_messages(queue) == 1


async def test_a_consumer_declares_its_lost_queue_again_and_goes_on(
    api: Api, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await api.publish(queue, make_job(schema, 1))
    ran: list[str] = []
    first = asyncio.Event()

    async def handler(job: Job) -> None:
        ran.append(job.id)
        first.set()

    with caplog.at_level(logging.WARNING, logger="mindtrace.jobs"):
        consuming = asyncio.ensure_future(api.consumer(queue, handler).consume(num_messages=2))
        await asyncio.wait_for(first.wait(), 30)
        await asyncio.sleep(0.2)  # the consumer waits on the queue again
        await lose_queue(api, queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:  # the consumer declares it again; a publish before that is refused, saying so
            assert not consuming.done(), consuming.result()
            try:
                job = make_job(schema, 2)
                await api.publish(queue, job)
                break
            except QueueNotFoundError:
                assert loop.time() < deadline, "the consumer did not declare its lost queue again"
                await asyncio.sleep(0.05)
        assert await asyncio.wait_for(consuming, 30) == 2
    assert ran[1:] == [job.id]
    assert any(repr(queue) in message and "again" in message for message in _warnings(caplog)), _warnings(caplog)
