"""Lateness of delayed jobs: random delays, published in random order, started by an idle consumer, per backend."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from benchmarks.harness import Report, percentile
from benchmarks.ours import make_jobs, queue_name
from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job
from mindtrace.jobs.backends.base import Backend

#: The scenario rows (ms a job starts after it is due): p50, p99 and the worst of the run.
LATE_P50, LATE_P99, LATE_MAX = "delayed start lateness p50", "delayed start lateness p99", "delayed start lateness max"
#: Delays are drawn uniformly from this range (seconds), as in the issue's test.
DELAYS = (0.1, 5.0)
#: Jobs the consumer runs at once (several jobs may fall due together).
CONCURRENCY = 16


async def lateness(factory: Callable[[], Backend], n: int, seed: int = 7) -> list[float]:
    """ms each of ``n`` delayed jobs started after it was due (due = the publish call's start + its delay, so
    the publish round trip counts as lateness), the consumer idle and waiting before the first publish."""
    rng = random.Random(seed)
    jobs = make_jobs(n)
    delays = {job.id: rng.uniform(*DELAYS) for job in jobs}
    rng.shuffle(jobs)
    due: dict[str, float] = {}
    started: dict[str, float] = {}
    done = asyncio.Event()

    class Timer(AsyncConsumer):
        async def run(self, job: Job) -> None:
            started.setdefault(job.id, time.time())
            if len(started) >= n:
                done.set()

    async with AsyncOrchestrator(factory()) as orch:
        queue = queue_name()
        await orch.declare_queue(queue)
        consumer = Timer(queue)
        consumer.connect(orch)
        task = asyncio.create_task(consumer.consume(concurrency=CONCURRENCY))
        await asyncio.sleep(0.5)
        for job in jobs:
            due[job.id] = time.time() + delays[job.id]
            await orch.publish(queue, job, delay=delays[job.id])
            await asyncio.sleep(0)  # the loop runs between publishes (an in-memory publish never waits)
        await asyncio.wait_for(done.wait(), DELAYS[1] + 60)
        consumer.stop()
        await task
        await orch.delete_queue(queue)
    return [(started[i] - due[i]) * 1000 for i in due]


def measure(report: Report, name: str, factory: Callable[[], Backend], n: int) -> None:
    """Adds the lateness percentiles of ``n`` delayed jobs on backend ``name`` to ``report``."""
    samples = asyncio.run(lateness(factory, n))
    note = f"{n} jobs, delays {DELAYS[0]}-{DELAYS[1]} s in random order, c={CONCURRENCY}"
    report.add(name, LATE_P50, "ours", percentile(samples, 50), "ms", note)
    report.add(name, LATE_P99, "ours", percentile(samples, 99), "ms", note)
    report.add(name, LATE_MAX, "ours", max(samples), "ms", note)
