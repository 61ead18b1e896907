"""Schedules in several worker processes on real brokers: ``every=1s`` for 10 s fires 10 plus or minus 1 times, each
fire under its own id, however many workers run schedules (the worker CLI runs them by default)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator

import pytest

from mindtrace.jobs import AsyncOrchestrator, job_from_schema
from tests.jobs.cli_consumers import Nap, schema_for
from tests.jobs.support import servers
from tests.jobs.test_cli_worker import SLEEPER, start_worker, workers

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A shared broker, by name; on RabbitMQ with a schedules namespace of the test's own, so that the leader is
    one of its workers (not a scheduler of another test or CI lane)."""
    if request.param == "redis":
        yield str(request.getfixturevalue("redis_url"))
        return
    amqp_url, namespace = str(request.getfixturevalue("amqp_url")), f"mindtrace-test-{uuid.uuid4().hex[:12]}"
    yield servers.namespaced(amqp_url, namespace)
    asyncio.run(servers.delete_schedules_stream(amqp_url, namespace))


async def test_three_workers_fire_an_every_second_schedule_once_a_second(broker_url: str) -> None:
    consumed, fired = f"sw-{uuid.uuid4().hex[:8]}", f"sw-fires-{uuid.uuid4().hex[:8]}"
    name = f"every-second-{uuid.uuid4().hex[:8]}"
    async with AsyncOrchestrator(broker_url) as orchestrator, workers() as started:
        await orchestrator.declare_queue(fired)  # nobody consumes it: every fire stays there to be counted
        try:
            for _ in range(3):
                started.append(await start_worker(SLEEPER, "--url", broker_url, env={"CLI_TEST_QUEUE": consumed}))
            for worker in started:
                await worker.wait_for_line("schedules on")
            await orchestrator.schedule(name, fired, job_from_schema(schema_for(fired), Nap()), every=1)
            # Workers read the schedules again every SCHEDULE_REFRESH (5) s: count from the first fire on, ten seconds.
            first = await orchestrator.receive_message(fired, timeout=15)
            assert first is not None, "\n".join(worker.output for worker in started)
            await asyncio.sleep(10.0)
            await orchestrator.unschedule(name)
            end = time.time()
            for worker in started:
                worker.signal()
            codes = [await worker.exit_code() for worker in started]
            assert codes == [0, 0, 0], "\n".join(worker.output for worker in started)
            ids = [first.id]
            while (job := await orchestrator.receive_message(fired, timeout=0.5)) is not None:
                ids.append(job.id)
            assert len(ids) == len(set(ids)), f"a fire ran twice: {sorted(ids)}"
            assert all(job_id.startswith(f"{name}@") for job_id in ids)
            # One fire a second from the first (at a whole second) to the unschedule: about 11 of them.
            expected = int(end) - int(first.created_at.timestamp()) + 1
            assert expected - 1 <= len(ids) <= expected + 1, sorted(ids)
        finally:
            with contextlib.suppress(Exception):
                await orchestrator.unschedule(name)
            for queue in (consumed, fired):
                with contextlib.suppress(Exception):
                    await orchestrator.delete_queue(queue)
