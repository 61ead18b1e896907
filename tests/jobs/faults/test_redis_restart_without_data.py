"""A Redis restart that keeps no data: clients that survive it go on without being restarted themselves.

On a redis-server of the test's own with no persistence (``--save ""``, no AOF), restarted under running
clients: an auto-routed publish declares its queue again, a consumer declares its queue again (saying so)
and keeps consuming, and an explicit publish to a queue the server lost says it was lost.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator

import pytest

from mindtrace.jobs import QUEUE_MAPPING, AsyncConsumer, AsyncOrchestrator, Job, JobType, QueueNotFoundError
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support import servers


@pytest.fixture
def server() -> Iterator[servers.RedisServer]:
    if shutil.which("redis-server") is None:
        if servers.IN_CI:
            pytest.fail("CI=true: redis-server is not installed")
        pytest.skip("redis-server is not installed")
    node = servers.RedisServer(appendonly=False)
    try:
        yield node.start()
    finally:
        node.cleanup()


async def _until(what: str, check: object, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            assert callable(check)
            if await check():
                return
        except QueueNotFoundError:
            pass
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)


async def test_surviving_clients_go_on_after_a_restart_that_lost_every_queue(
    server: servers.RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    schema = image_schema("work")
    ran: list[str] = []
    first = asyncio.Event()

    class Worker(AsyncConsumer):
        async def run(self, job: Job) -> None:
            ran.append(job.id)
            first.set()

    caplog.set_level(logging.WARNING, logger="mindtrace.jobs")
    async with AsyncOrchestrator(server.url) as orchestrator:
        await orchestrator.register(schema)
        await orchestrator.declare_queue("idle")
        routed = QUEUE_MAPPING[JobType.ML_TRAINING]
        await orchestrator.publish(make_job(schema, 0, job_type=JobType.ML_TRAINING))
        await orchestrator.publish("work", make_job(schema, 1))
        worker = Worker("work")
        worker.connect(orchestrator)
        consuming = asyncio.ensure_future(worker.consume(num_messages=2))
        await asyncio.wait_for(first.wait(), 20)

        await asyncio.to_thread(server.restart)  # SIGTERM, then up again with nothing

        # Auto-routing declares its queue again and publishes (only the new job: the old one is gone).
        routed_job = make_job(schema, 2, job_type=JobType.ML_TRAINING)
        assert await orchestrator.publish(routed_job) == routed_job.id
        assert await orchestrator.count_queue_messages(routed) == 1
        # An explicit publish to a queue the server lost says so.
        with pytest.raises(QueueNotFoundError) as caught:
            await orchestrator.publish("idle", make_job(schema, 3))
        assert caught.value.lost and "restart" in str(caught.value)
        # The consumer declares its queue again and takes the next job.
        await _until("the consumer declared its queue again", lambda: orchestrator.backend.queue_exists("work"))
        last = make_job(schema, 4)
        await orchestrator.publish("work", last)
        assert await asyncio.wait_for(consuming, 30) == 2
    assert ran[1:] == [last.id]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'work'" in m and "again" in m for m in warnings), warnings
    assert any(repr(routed) in m and "again" in m for m in warnings), warnings
