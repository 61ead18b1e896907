"""Consumers SIGKILLed mid-stream and replaced: no job lost, duplicates only for jobs in flight on a killed one."""

from __future__ import annotations

import asyncio
import random
import signal
import time

from mindtrace.jobs import AsyncOrchestrator, from_url
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.faults.conftest import SOAK_JOBS, SOAK_KILLS, Workers
from tests.jobs.support.ledger import Ledger

CONSUMERS = 4
CONCURRENCY = 4


async def _wait_all_done(ledger: Ledger, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(ledger.read().done) < expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"not all jobs done in {timeout}s: {ledger.read().summary()}")
        await asyncio.sleep(0.2)


async def test_killed_consumers_lose_no_job(fault_url: str, queue: str, workers: Workers) -> None:
    ledger = Ledger(workers.ledger)
    rng = random.Random(1234)
    async with AsyncOrchestrator(from_url(fault_url)) as orchestrator:
        schema = image_schema(queue)
        await orchestrator.register(schema)
        jobs = [make_job(schema, i) for i in range(SOAK_JOBS)]
        for i in range(0, len(jobs), 200):
            await orchestrator.publish_many(queue, jobs[i : i + 200])
            for job in jobs[i : i + 200]:
                ledger.record("published", job.id)
        for _ in range(CONSUMERS):
            workers.start("--concurrency", str(CONCURRENCY), "--job-seconds", "0.02")
        kills: list[tuple[int, float]] = []
        for _ in range(SOAK_KILLS):
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            alive = [p for p in workers.processes if p.poll() is None]
            exits = [p.returncode for p in workers.processes if p.returncode is not None]
            assert alive, f"every consumer process died by itself (exit codes {exits}): {ledger.read().summary()}"
            victim = rng.choice(alive)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills.append((victim.pid, time.time()))
            workers.start("--concurrency", str(CONCURRENCY), "--job-seconds", "0.02")
        await _wait_all_done(ledger, len(jobs), timeout=180)
        accounts = ledger.read()
        assert await orchestrator.count_queue_messages(queue + ".dlq") == 0
        await orchestrator.delete_queue(queue)
    ledger.close()

    in_flight = set().union(*(accounts.in_flight_on(pid) for pid, _ in kills))
    held_by_killed = set().union(*(accounts.started_on(pid) for pid, _ in kills))
    assert not accounts.lost, accounts.summary()
    assert not accounts.unexpected, accounts.summary()
    # A job may start twice only if it was in flight (started, not yet acked) on a killed consumer.
    assert accounts.duplicated <= held_by_killed, accounts.summary()
    assert len(accounts.duplicated) <= SOAK_KILLS * CONCURRENCY
    # Each job a killed consumer held runs again soon: lease expiry on Redis, redelivery on RabbitMQ.
    bound = 3.0 if fault_url.startswith("redis") else 1.0
    for pid, killed_at in kills:
        for job_id in accounts.in_flight_on(pid):
            restarted = accounts.restarted_after(job_id, pid)
            assert restarted is not None, f"job {job_id} held by killed {pid} never ran again"
            assert restarted - killed_at <= bound, f"job {job_id} waited {restarted - killed_at:.2f}s"
    print(
        f"\n[kills] {fault_url.split(':')[0]}: {accounts.summary()} kills={len(kills)} "
        f"in_flight_on_killed={len(in_flight)}"
    )
