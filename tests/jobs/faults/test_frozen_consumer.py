"""Redis leases: a frozen consumer (SIGSTOP) loses its lease, and its late ack cannot remove the job."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from mindtrace.jobs import AsyncOrchestrator, Job, JobStatus, from_url
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.faults.conftest import TEST_VISIBILITY, Workers
from tests.jobs.support.ledger import Accounts, Ledger


async def _wait_for(ledger: Ledger, check: object, timeout: float, what: str) -> Accounts:
    deadline = time.monotonic() + timeout
    while True:
        accounts = ledger.read()
        if check(accounts):  # type: ignore[operator]
            return accounts
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {accounts.summary()}"
        await asyncio.sleep(0.05)


async def _publish_one(orchestrator: AsyncOrchestrator, queue: str, ledger: Ledger) -> Job:
    """Register the test schema on ``queue``, publish one job and record it in the ledger."""
    schema = image_schema(queue)
    await orchestrator.register(schema)
    job = make_job(schema, 1)
    await orchestrator.publish(queue, job)
    ledger.record("published", job.id)
    return job


@pytest.fixture
def redis_workers(redis_url: str, queue: str, tmp_path: Path) -> Workers:
    pool = Workers(redis_url, queue, tmp_path / "ledger")
    yield pool
    pool.stop_all()


async def test_late_ack_of_a_frozen_consumer_does_not_remove_the_job(
    redis_url: str, queue: str, redis_workers: Workers
) -> None:
    workers = redis_workers
    ledger = Ledger(workers.ledger)
    async with AsyncOrchestrator(from_url(redis_url)) as orchestrator:
        job = await _publish_one(orchestrator, queue, ledger)
        run = ("--concurrency", "1", "--job-seconds", "3")

        frozen = workers.start(*run)
        await _wait_for(ledger, lambda a: a.started[job.id] == 1, 10, "the first start")
        frozen.send_signal(signal.SIGSTOP)
        await asyncio.sleep(TEST_VISIBILITY + 0.5)  # its lease expires while it is frozen
        # The rightful holder's run outlasts the frozen one's remainder, so it still holds the job when killed.
        second = workers.start("--concurrency", "1", "--job-seconds", "30")
        accounts = await _wait_for(ledger, lambda a: a.started[job.id] == 2, 10, "the takeover")
        assert second.pid in {p for e, j, p, _ in accounts.events if e == "started"}
        frozen.send_signal(signal.SIGCONT)
        # The frozen consumer finishes its run and tries to ack with its stale lease token.
        await _wait_for(
            ledger, lambda a: any(e == "done" and p == frozen.pid for e, _, p, _ in a.events), 10, "the late run"
        )
        await asyncio.sleep(0.5)
        assert not any(e == "done" and p == second.pid for e, _, p, _ in ledger.read().events)
        # The frozen consumer leaves, so the job's next run (after the holder dies) can only be the third's.
        frozen.terminate()
        await asyncio.to_thread(frozen.wait, 10)
        # If the late ack had removed the job, killing the rightful holder now would lose it.
        second.send_signal(signal.SIGKILL)
        second.wait()
        # The third consumer settles it: the frozen one's late run was recorded SUCCEEDED before its ack was
        # refused, so the redelivery is settled unrun (a record says it is done); either way it leaves the queue.
        workers.start(*run)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while await orchestrator.count_queue_messages(queue) and loop.time() < deadline:  # noqa: ASYNC110 (another process settles it: no event reaches this one)
            await asyncio.sleep(0.1)
        accounts = ledger.read()
        assert await orchestrator.count_queue_messages(queue) == 0, "the third consumer did not settle the job"
        assert await orchestrator.job(job.id, queue).status() is JobStatus.SUCCEEDED
        assert await orchestrator.count_queue_messages(queue + ".dlq") == 0
        await orchestrator.delete_queue(queue)
    ledger.close()
    assert not accounts.lost


async def test_a_slow_job_keeps_its_lease_while_its_consumer_lives(
    redis_url: str, queue: str, redis_workers: Workers
) -> None:
    workers = redis_workers
    ledger = Ledger(workers.ledger)
    async with AsyncOrchestrator(from_url(redis_url)) as orchestrator:
        job = await _publish_one(orchestrator, queue, ledger)
        run = ("--concurrency", "1", "--job-seconds", str(TEST_VISIBILITY * 4))
        workers.start(*run)
        workers.start(*run)
        accounts = await _wait_for(ledger, lambda a: a.done[job.id] >= 1, 20, "the slow job")
        await asyncio.sleep(TEST_VISIBILITY)
        accounts = ledger.read()
        await orchestrator.delete_queue(queue)
    ledger.close()
    assert accounts.started[job.id] == 1, accounts.summary()
