"""A job whose run kills its own consumer is dead-lettered after max_retries + 1 deliveries; others flow on."""

from __future__ import annotations

import asyncio
import time

from mindtrace.jobs import AsyncOrchestrator, from_url
from tests.jobs.conformance.models import ImageInput, image_schema, make_job
from tests.jobs.faults.conftest import Workers
from tests.jobs.support.ledger import Ledger

MAX_RETRIES = 2


async def test_poison_job_is_dead_lettered_while_others_flow(fault_url: str, queue: str, workers: Workers) -> None:
    ledger = Ledger(workers.ledger)
    async with AsyncOrchestrator(from_url(fault_url)) as orchestrator:
        schema = image_schema(queue)
        await orchestrator.register(schema)
        poison = make_job(schema, 0, priority=9)
        poison.payload.input = ImageInput(image_path="/poison.jpg", tags=["poison"])
        normal = [make_job(schema, i) for i in range(1, 41)]
        await orchestrator.publish(queue, poison)
        await orchestrator.publish_many(queue, normal)
        for job in normal:
            ledger.record("published", job.id)
        options = ("--concurrency", "1", "--max-retries", str(MAX_RETRIES), "--job-seconds", "0.01")
        for _ in range(2):
            workers.start(*options)
        deadline = time.monotonic() + 45  # within the test's timeout, so a stuck run fails here, saying why
        while True:
            accounts = ledger.read()
            # A run past the budget is the bug itself (its lost runs were not counted): fail at once, not later.
            poison_runs = accounts.started.get(poison.id, 0)
            assert poison_runs <= MAX_RETRIES + 1, f"poison job ran {poison_runs} times, max_retries={MAX_RETRIES}"
            dead = await orchestrator.count_queue_messages(queue + ".dlq")
            if not accounts.lost and dead == 1:
                break
            assert time.monotonic() < deadline, f"stuck: {accounts.summary()} dlq={dead}"
            for proc in list(workers.processes):
                if proc.poll() is not None:  # killed by the poison job: replace it, as a supervisor would
                    workers.processes.remove(proc)
                    proc.stdout.close() if proc.stdout else None
                    workers.start(*options)
            await asyncio.sleep(0.1)
        dead_job = await orchestrator.receive_message(queue + ".dlq", timeout=5)
        await orchestrator.delete_queue(queue)
    ledger.close()
    assert dead_job is not None and dead_job.id == poison.id
    assert dead_job.attempts == MAX_RETRIES + 1
    assert dead_job.error is not None
    assert accounts.started[poison.id] == MAX_RETRIES + 1
    assert not accounts.lost and not accounts.done_twice, accounts.summary()
