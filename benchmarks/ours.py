"""mindtrace-jobs measured: publish (async, sync, batch), drain at several concurrencies, latency."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from benchmarks.harness import Report, percentile, rate
from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job, JobInput, JobSchema, Orchestrator, job_from_schema
from mindtrace.jobs.backends.base import Backend


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
        jobs = make_jobs(n)
        await orch.publish(queue, jobs[0])
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
        jobs = make_jobs(n)
        orch.publish(queue, jobs[0])
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


async def drain(factory: Callable[[], Backend], n: int, concurrency: int) -> float:
    """Jobs/s for one consumer draining n queued no-op jobs at the given concurrency."""
    async with AsyncOrchestrator(factory()) as orch:
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


async def latency(factory: Callable[[], Backend], n: int) -> tuple[float, float]:
    """p50 and p99 (ms) from publish to run start, one job at a time, consumer idle in between."""
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
        jobs = make_jobs(n + 20)
        for i, job in enumerate(jobs):
            await asyncio.sleep(0.002)  # the consumer is idle and blocked when the job arrives
            sent = time.perf_counter()
            await orch.publish(queue, job)
            ran = await asyncio.wait_for(started.get(), 10)
            if i >= 20:  # warm-up
                samples.append((ran - sent) * 1000)
        consumer.stop()
        await task
        await orch.delete_queue(queue)
    return percentile(samples, 50), percentile(samples, 99)


async def measure_backend(report: Report, name: str, factory: Callable[[], Backend], n: int, lat_n: int) -> None:
    """Every scenario of ours on one backend."""
    report.add(name, "publish single (async)", "ours", await publish_async(factory, n), "jobs/s")
    report.add(
        name, "publish single (sync facade)", "ours", await asyncio.to_thread(publish_sync, factory, n), "jobs/s"
    )
    report.add(name, "publish_many (batch 500)", "ours", await publish_many(factory, n), "jobs/s")
    for concurrency in (1, 16, 128):
        report.add(name, f"drain c={concurrency}", "ours", await drain(factory, n, concurrency), "jobs/s")
    p50, p99 = await latency(factory, lat_n)
    report.add(name, "latency p50", "ours", p50, "ms")
    report.add(name, "latency p99", "ours", p99, "ms")


def run_in_loop(coro: Any) -> Any:
    """Run a coroutine to completion on a fresh loop."""
    return asyncio.run(coro)
