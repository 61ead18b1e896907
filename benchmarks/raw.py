"""Raw-driver baselines for the same work: asyncio.PriorityQueue, redis.asyncio, aio-pika.

Each baseline does what ours does with the least code the driver allows, on the same encoded job bytes
(or, in memory, the same pydantic Job objects): one object per backend, one method per scenario, each
returning jobs/s (or latency samples in ms), so that the runner can interleave them with ours.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from benchmarks.harness import rate
from benchmarks.ours import LATENCY_GAP, LATENCY_WARMUP, make_jobs, queue_name
from mindtrace.jobs.wire import encode


def _bodies(n: int) -> list[bytes]:
    return [encode(job) for job in make_jobs(n)]


class RawMemory:
    """asyncio.PriorityQueue holding the same pydantic Job objects (no serialization at all)."""

    async def publish_single(self, n: int) -> float:
        jobs = make_jobs(n)
        queue: asyncio.PriorityQueue[tuple[int, int, object]] = asyncio.PriorityQueue()
        seq = itertools.count()
        start = time.perf_counter()
        for job in jobs:
            await queue.put((-job.priority, next(seq), job))
        return rate(n, time.perf_counter() - start)

    async def drain(self, n: int, concurrency: int = 1) -> float:
        queue: asyncio.PriorityQueue[tuple[int, int, object]] = asyncio.PriorityQueue()
        seq = itertools.count()
        for job in make_jobs(n):
            queue.put_nowait((-job.priority, next(seq), job))
        start = time.perf_counter()
        for _ in range(n):
            await queue.get()
        return rate(n, time.perf_counter() - start)

    async def latency(self, n: int) -> list[float]:
        queue: asyncio.PriorityQueue[tuple[int, int, object]] = asyncio.PriorityQueue()
        started: asyncio.Queue[float] = asyncio.Queue()

        async def consume() -> None:
            while True:
                await queue.get()
                started.put_nowait(time.perf_counter())

        task = asyncio.create_task(consume())
        samples = await _latency_loop(n, lambda i, job: queue.put((-job.priority, i, job)), started)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return samples

    async def close(self) -> None:
        return None


class RawRedis:
    """redis.asyncio: LPUSH one at a time, pipelined LPUSH, BRPOP; latency LPUSH -> a blocked BRPOP."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self.client: Any = aioredis.Redis.from_url(url)
        self.key = f"bench:raw:{queue_name()}"

    async def publish_single(self, n: int) -> float:
        bodies = _bodies(n)
        await self.client.ping()
        start = time.perf_counter()
        for body in bodies:
            await self.client.lpush(self.key, body)
        elapsed = time.perf_counter() - start
        await self.client.delete(self.key)
        return rate(n, elapsed)

    async def publish_many(self, n: int, batch: int) -> float:
        bodies = _bodies(n)
        await self.client.ping()
        start = time.perf_counter()
        for i in range(0, n, batch):
            async with self.client.pipeline(transaction=False) as pipe:
                for body in bodies[i : i + batch]:
                    pipe.lpush(self.key, body)
                await pipe.execute()
        elapsed = time.perf_counter() - start
        await self.client.delete(self.key)
        return rate(n, elapsed)

    async def drain(self, n: int, concurrency: int = 1) -> float:
        bodies = _bodies(n)
        for i in range(0, n, 1000):
            await self.client.lpush(self.key, *bodies[i : i + 1000])
        start = time.perf_counter()
        for _ in range(n):
            await self.client.brpop([self.key], timeout=5)
        return rate(n, time.perf_counter() - start)

    async def latency(self, n: int) -> list[float]:
        import redis.asyncio as aioredis

        consumer = aioredis.Redis(connection_pool=self.client.connection_pool)
        started: asyncio.Queue[float] = asyncio.Queue()

        async def consume() -> None:
            while True:
                if await consumer.brpop([self.key], timeout=5):
                    started.put_nowait(time.perf_counter())

        bodies = _bodies(1)
        task = asyncio.create_task(consume())
        samples = await _latency_loop(n, lambda i, job: self.client.lpush(self.key, bodies[0]), started)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return samples

    async def close(self) -> None:
        await self.client.delete(self.key)
        await self.client.aclose()


class RawRabbitMQ:
    """aio-pika: confirmed publish one at a time, batched confirms, consume with manual ack (prefetch 16)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection: Any = None
        self.channel: Any = None
        self.queue: Any = None

    async def _ready(self) -> None:
        import aio_pika

        if self.connection is None:
            self.connection = await aio_pika.connect_robust(self.url)
            self.channel = await self.connection.channel(publisher_confirms=True)
            self.queue = await self.channel.declare_queue(queue_name(), durable=True, arguments={"x-max-priority": 9})

    def _message(self, body: bytes) -> Any:
        import aio_pika

        return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, priority=0)

    async def publish_single(self, n: int) -> float:
        await self._ready()
        bodies = _bodies(n)
        exchange = self.channel.default_exchange
        start = time.perf_counter()
        for body in bodies:
            await exchange.publish(self._message(body), routing_key=self.queue.name)
        elapsed = time.perf_counter() - start
        await self.queue.purge()
        return rate(n, elapsed)

    async def publish_many(self, n: int, batch: int) -> float:
        await self._ready()
        bodies = _bodies(n)
        exchange = self.channel.default_exchange
        start = time.perf_counter()
        for i in range(0, n, batch):
            await asyncio.gather(
                *(exchange.publish(self._message(b), routing_key=self.queue.name) for b in bodies[i : i + batch])
            )
        elapsed = time.perf_counter() - start
        await self.queue.purge()
        return rate(n, elapsed)

    async def drain(self, n: int, concurrency: int) -> float:
        await self._ready()
        bodies = _bodies(n)
        exchange = self.channel.default_exchange
        for i in range(0, n, 500):
            await asyncio.gather(
                *(exchange.publish(self._message(b), routing_key=self.queue.name) for b in bodies[i : i + 500])
            )
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=concurrency)
        queue = await channel.get_queue(self.queue.name)
        done = asyncio.Event()
        seen = 0

        async def on_message(incoming: Any) -> None:
            nonlocal seen
            await incoming.ack()
            seen += 1
            if seen >= n:
                done.set()

        start = time.perf_counter()
        tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - start
        await queue.cancel(tag)
        await channel.close()
        return rate(n, elapsed)

    async def latency(self, n: int) -> list[float]:
        await self._ready()
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(self.queue.name)
        started: asyncio.Queue[float] = asyncio.Queue()

        async def on_message(incoming: Any) -> None:
            started.put_nowait(time.perf_counter())
            await incoming.ack()

        tag = await queue.consume(on_message)
        body = _bodies(1)[0]
        exchange = self.channel.default_exchange
        samples = await _latency_loop(
            n, lambda i, job: exchange.publish(self._message(body), routing_key=self.queue.name), started
        )
        await queue.cancel(tag)
        await channel.close()
        return samples

    async def close(self) -> None:
        if self.connection is not None:
            await self.queue.delete(if_unused=False, if_empty=False)
            await self.connection.close()


async def _latency_loop(n: int, publish: Any, started: asyncio.Queue[float]) -> list[float]:
    """Publish one job at a time to an idle consumer; ms from the publish call to the consumer's start."""
    samples: list[float] = []
    for i, job in enumerate(make_jobs(n + LATENCY_WARMUP)):
        await asyncio.sleep(LATENCY_GAP)
        sent = time.perf_counter()
        await publish(i, job)
        ran = await asyncio.wait_for(started.get(), 10)
        if i >= LATENCY_WARMUP:
            samples.append((ran - sent) * 1000)
    return samples
