"""What only Redis can show of unique jobs: the key's string, freed when its job ends, and never freed by a job
that no longer holds it (a TTL passed and another job took it), with the store written by the publish script
(RedisClient's own) and by another broker's orchestrator (a store given by URL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from mindtrace.jobs import AsyncOrchestrator, Job, RedisClient
from mindtrace.jobs.lifecycle import CancelOutcome, JobStatus
from mindtrace.jobs.state.redis import RedisStateStore
from tests.jobs.conformance.flows import detect
from tests.jobs.conformance.models import image_schema, make_job


@pytest.fixture(params=["own", "url"])
async def orchestrator(request: pytest.FixtureRequest, redis_url: str, queue: str) -> AsyncIterator[AsyncOrchestrator]:
    """An orchestrator over Redis with its client's own store (records in the publish script), or with a store
    given by URL (records written by the store's own scripts, before the publish)."""
    state = None if request.param == "own" else redis_url
    async with AsyncOrchestrator(RedisClient.from_url(redis_url), state=state) as opened:
        await opened.register(image_schema(queue))
        try:
            yield opened
        finally:
            await opened.delete_queue(queue)


@pytest.fixture
async def server(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client of the server, to read the keys."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def _key(orchestrator: AsyncOrchestrator, queue: str, key: str) -> str:
    store = orchestrator.state
    assert isinstance(store, RedisStateStore)
    return store.unique_key(queue, key)


async def _run_one(orchestrator: AsyncOrchestrator, queue: str) -> None:
    from mindtrace.jobs import AsyncConsumer

    class _Consumer(AsyncConsumer):
        async def run(self, job: Job) -> object:
            return await detect(job)

    consumer = _Consumer(queue)
    consumer.connect(orchestrator)
    await asyncio.wait_for(consumer.consume(num_messages=1), 20)


async def test_the_key_is_a_string_naming_its_job_and_goes_when_the_job_ends(
    orchestrator: AsyncOrchestrator, server: aioredis.Redis, queue: str
) -> None:
    schema = image_schema(queue)
    handle = await orchestrator.publish(queue, make_job(schema), dedup_key="k")
    name = _key(orchestrator, queue, "k")
    assert await server.get(name) == handle.encode()
    assert await server.pttl(name) == -1  # no TTL: held until the job ends
    await _run_one(orchestrator, queue)
    assert (await handle.wait(10)).status is JobStatus.SUCCEEDED
    assert await server.exists(name) == 0  # freed at once, not left to a later publish


@pytest.mark.parametrize("end", ["cancel", "run"])
async def test_a_job_that_lost_its_key_to_a_ttl_does_not_free_it_for_the_new_holder(
    orchestrator: AsyncOrchestrator, server: aioredis.Redis, queue: str, end: str
) -> None:
    schema = image_schema(queue)
    old = await orchestrator.publish(queue, make_job(schema, 0), dedup_key="k", dedup_ttl=0.3)
    await asyncio.sleep(0.6)
    new = await orchestrator.publish(queue, make_job(schema, 1), dedup_key="k")
    assert new != old
    name = _key(orchestrator, queue, "k")
    assert await server.get(name) == new.encode()
    # The old job ends (cancelled while queued, or run first: it is ahead in the queue): its release must leave
    # the key to the new one.
    if end == "cancel":
        assert await old.cancel() is CancelOutcome.CANCELLED
    else:
        await _run_one(orchestrator, queue)
        assert (await old.wait(10)).status is JobStatus.SUCCEEDED
    assert await server.get(name) == new.encode()
    assert await orchestrator.publish(queue, make_job(schema, 2), dedup_key="k") == new


async def test_a_key_whose_job_record_is_gone_is_free(
    orchestrator: AsyncOrchestrator, server: aioredis.Redis, queue: str
) -> None:
    # A release that never ran (records deleted by hand, a holder withdrawn) cannot lock the key for ever.
    schema = image_schema(queue)
    old = await orchestrator.publish(queue, make_job(schema, 0), dedup_key="k")
    store = orchestrator.state
    assert isinstance(store, RedisStateStore)
    await server.delete(store.record_key(queue, old))
    assert await server.get(_key(orchestrator, queue, "k")) == old.encode()
    assert await orchestrator.publish(queue, make_job(schema, 1), dedup_key="k") != old
