"""Schedules across a broker restart, on servers of the test's own: the schedule is still there afterwards, the
schedulers that rode the outage out fire again, and no fire id is published twice."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import datetime

import pytest

from mindtrace.jobs import AsyncOrchestrator, JobInput, JobSchema, job_from_schema
from tests.jobs.support import servers

pytestmark = pytest.mark.timeout(180)

SCHEMA = JobSchema(name="tick", input=JobInput)


def _missing(what: str) -> None:
    if servers.IN_CI:
        pytest.fail(f"CI=true: {what} is not installed")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(params=["redis", "rabbitmq"])
def server(request: pytest.FixtureRequest) -> Iterator[servers.RedisServer | servers.RabbitMQNode]:
    """A broker this test may restart: Redis with an fsync'd append-only file, or a RabbitMQ node."""
    if request.param == "redis":
        if shutil.which("redis-server") is None:
            _missing("redis-server")
        redis = servers.RedisServer(appendonly=True, appendfsync="always").start()
        try:
            yield redis
        finally:
            redis.cleanup()
        return
    if servers.rabbitmq_server_command() is None or shutil.which("erl") is None:
        _missing("rabbitmq-server")
    node = servers.RabbitMQNode().start()
    try:
        yield node
    finally:
        node.cleanup()


async def test_a_schedule_survives_a_broker_restart_and_fires_on_without_repeats(
    server: servers.RedisServer | servers.RabbitMQNode,
) -> None:
    queue, name = f"restart-{uuid.uuid4().hex[:8]}", f"tick-{uuid.uuid4().hex[:8]}"
    async with AsyncOrchestrator(server.url) as setup:
        await setup.declare_queue(queue)
        await setup.schedule(name, queue, job_from_schema(SCHEMA, JobInput()), every=1)
    async with AsyncOrchestrator(server.url) as orchestrator:
        scheduler = asyncio.create_task(orchestrator.run_schedules(refresh=1.0))
        try:
            before = await orchestrator.receive_message(queue, timeout=20)
            assert before is not None, "no fire before the restart"
            await asyncio.to_thread(server.restart)
            restarted = time.time()
            # The scheduler rides the outage out (logged, with backoff) and fires again once the broker is back.
            ids = [before.id]
            deadline = time.time() + 40
            while time.time() < deadline:
                job = await orchestrator.receive_message(queue, timeout=1)
                if job is not None:
                    ids.append(job.id)
                    if job.created_at.timestamp() > restarted + 2:
                        break
            assert [info.name for info in await orchestrator.schedules() if info.name == name] == [name]
        finally:
            scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scheduler
        await asyncio.sleep(0.5)
        while (job := await orchestrator.receive_message(queue, timeout=0.5)) is not None:
            ids.append(job.id)
        assert len(ids) == len(set(ids)), f"a fire was published twice: {sorted(ids)}"
        fired_at = [datetime.fromisoformat(i.split("@")[1].replace("Z", "+00:00")).timestamp() for i in ids]
        assert max(fired_at) > restarted, f"no fire after the restart: {sorted(ids)}"
        await orchestrator.unschedule(name)
