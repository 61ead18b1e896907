"""mindtrace-jobs measured: publish (async, sync, batch), drain at several concurrencies, latency."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence

from benchmarks.harness import rate
from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job, JobInput, JobSchema, Orchestrator, job_from_schema
from mindtrace.jobs.backends.base import Backend
from mindtrace.jobs.hooks import Hook


class BenchInput(JobInput):
    """A small, realistic payload: a path, a few numbers, a short list."""

    image_path: str
    threshold: float = 0.5
    tags: list[str] = []


SCHEMA = JobSchema(name="bench", input=BenchInput)


def make_jobs(n: int) -> list[Job]:
    """n jobs of the benchmark schema."""
    return [job_from_schema(SCHEMA, BenchInput(image_path=f"/data/img_{i}.jpg", tags=["a", "b"])) for i in range(n)]


def queue_name() -> str:
    """A fresh queue name for one measurement."""
    return f"bench-{uuid.uuid4().hex[:10]}"


class _Counter(AsyncConsumer):
    def __init__(self, queue: str, target: int, done: asyncio.Event) -> None:
        super().__init__(queue)
        self.seen = 0
        self.target = target
        self.done = done

    async def run(self, job: Job) -> None:
        self.seen += 1
        if self.seen >= self.target:
            self.done.set()


async def publish_async(factory: Callable[[], Backend], n: int) -> float:
    """Jobs/s for n single publishes through AsyncOrchestrator."""
    async with AsyncOrchestrator(factory()) as orch:
        queue = queue_name()
        await orch.declare_queue(queue)
        warm_up, *jobs = make_jobs(n + 1)  # a job of its own: publishing a queued job again is a no-op
        await orch.publish(queue, warm_up)
        start = time.perf_counter()
        for job in jobs:
            await orch.publish(queue, job)
        elapsed = time.perf_counter() - start
        await orch.delete_queue(queue)
    return rate(n, elapsed)


def publish_sync(factory: Callable[[], Backend], n: int) -> float:
    """Jobs/s for n single publishes through the blocking Orchestrator, from one thread."""
    with Orchestrator(factory()) as orch:
        queue = queue_name()
        orch.declare_queue(queue)
        warm_up, *jobs = make_jobs(n + 1)  # a job of its own: publishing a queued job again is a no-op
        orch.publish(queue, warm_up)
        start = time.perf_counter()
        for job in jobs:
            orch.publish(queue, job)
        elapsed = time.perf_counter() - start
        orch.delete_queue(queue)
    return rate(n, elapsed)


async def publish_many(factory: Callable[[], Backend], n: int, batch: int = 500) -> float:
    """Jobs/s for publish_many in batches."""
    async with AsyncOrchestrator(factory()) as orch:
        queue = queue_name()
        await orch.declare_queue(queue)
        jobs = make_jobs(n)
        start = time.perf_counter()
        for i in range(0, n, batch):
            await orch.publish_many(queue, jobs[i : i + batch])
        elapsed = time.perf_counter() - start
        await orch.delete_queue(queue)
    return rate(n, elapsed)


async def drain(
    factory: Callable[[], Backend], n: int, concurrency: int, hooks: Callable[[], Sequence[Hook]] | None = None
) -> float:
    """Jobs/s for one consumer draining n queued no-op jobs at the given concurrency (with the hooks
    ``hooks()`` makes, none by default)."""
    async with AsyncOrchestrator(factory(), hooks=None if hooks is None else hooks()) as orch:
        queue = queue_name()
        await orch.declare_queue(queue)
        jobs = make_jobs(n)
        for i in range(0, n, 1000):
            await orch.publish_many(queue, jobs[i : i + 1000])
        done = asyncio.Event()
        consumer = _Counter(queue, n, done)
        consumer.connect(orch)
        start = time.perf_counter()
        handled = await consumer.consume(num_messages=n, concurrency=concurrency)
        elapsed = time.perf_counter() - start
        assert handled == n, (handled, n)
        await orch.delete_queue(queue)
    return rate(n, elapsed)


#: Pause before each latency sample, so the consumer is idle and blocked when the job arrives; warm-up jobs.
LATENCY_GAP = 0.002
LATENCY_WARMUP = 20


async def latency(factory: Callable[[], Backend], n: int) -> list[float]:
    """ms from publish to run start, one job at a time, the consumer idle in between (n samples)."""
    async with AsyncOrchestrator(factory()) as orch:
        queue = queue_name()
        await orch.declare_queue(queue)
        started: asyncio.Queue[float] = asyncio.Queue()

        class Timer(AsyncConsumer):
            async def run(self, job: Job) -> None:
                started.put_nowait(time.perf_counter())

        consumer = Timer(queue)
        consumer.connect(orch)
        task = asyncio.create_task(consumer.consume())
        samples: list[float] = []
        for i, job in enumerate(make_jobs(n + LATENCY_WARMUP)):
            await asyncio.sleep(LATENCY_GAP)
            sent = time.perf_counter()
            await orch.publish(queue, job)
            ran = await asyncio.wait_for(started.get(), 10)
            if i >= LATENCY_WARMUP:
                samples.append((ran - sent) * 1000)
        consumer.stop()
        await task
        await orch.delete_queue(queue)
    return samples
