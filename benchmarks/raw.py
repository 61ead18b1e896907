"""Raw-driver baselines for the same work: asyncio.PriorityQueue, redis.asyncio, aio-pika."""

from __future__ import annotations

import asyncio
import itertools
import time

from benchmarks.harness import Report, rate
from benchmarks.ours import make_jobs, queue_name


async def memory(report: Report, n: int) -> None:
    """asyncio.PriorityQueue with the same pydantic Job objects (no serialization at all)."""
    jobs = make_jobs(n)
    queue: asyncio.PriorityQueue[tuple[int, int, object]] = asyncio.PriorityQueue()
    seq = itertools.count()
    start = time.perf_counter()
    for job in jobs:
        await queue.put((-job.priority, next(seq), job))
    report.add(
        "memory", "publish single (async)", "raw", rate(n, time.perf_counter() - start), "jobs/s", "PriorityQueue.put"
    )
    start = time.perf_counter()
    for _ in range(n):
        await queue.get()
    report.add("memory", "drain c=1", "raw", rate(n, time.perf_counter() - start), "jobs/s", "PriorityQueue.get")


async def redis(report: Report, url: str, n: int) -> None:
    """LPUSH one at a time, pipelined LPUSH, BRPOP drain: the same encoded job bytes."""
    import redis.asyncio as aioredis

    from mindtrace.jobs.wire import encode

    bodies = [encode(job) for job in make_jobs(n)]
    client = aioredis.Redis.from_url(url)
    key = f"bench:raw:{queue_name()}"
    try:
        await client.ping()
        start = time.perf_counter()
        for body in bodies:
            await client.lpush(key, body)
        report.add("redis", "publish single (async)", "raw", rate(n, time.perf_counter() - start), "jobs/s", "LPUSH")
        start = time.perf_counter()
        for _ in range(n):
            await client.brpop([key], timeout=5)
        report.add("redis", "drain c=1", "raw", rate(n, time.perf_counter() - start), "jobs/s", "BRPOP")
        start = time.perf_counter()
        for i in range(0, n, 500):
            async with client.pipeline(transaction=False) as pipe:
                for body in bodies[i : i + 500]:
                    pipe.lpush(key, body)
                await pipe.execute()
        report.add(
            "redis",
            "publish_many (batch 500)",
            "raw",
            rate(n, time.perf_counter() - start),
            "jobs/s",
            "pipelined LPUSH",
        )
    finally:
        await client.delete(key)
        await client.aclose()


async def rabbitmq(report: Report, url: str, n: int) -> None:
    """aio-pika: confirmed publish one at a time, batched confirms, consume with manual ack (prefetch 16)."""
    import aio_pika

    from mindtrace.jobs.wire import encode

    bodies = [encode(job) for job in make_jobs(n)]
    connection = await aio_pika.connect_robust(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name(), durable=True, arguments={"x-max-priority": 9})
        exchange = channel.default_exchange

        def message(body: bytes) -> aio_pika.Message:
            return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, priority=0)

        start = time.perf_counter()
        for body in bodies:
            await exchange.publish(message(body), routing_key=queue.name)
        report.add(
            "rabbitmq",
            "publish single (async)",
            "raw",
            rate(n, time.perf_counter() - start),
            "jobs/s",
            "confirmed publish",
        )
        start = time.perf_counter()
        for i in range(0, n, 500):
            await asyncio.gather(*(exchange.publish(message(b), routing_key=queue.name) for b in bodies[i : i + 500]))
        report.add(
            "rabbitmq",
            "publish_many (batch 500)",
            "raw",
            rate(n, time.perf_counter() - start),
            "jobs/s",
            "batched confirms",
        )
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=16)
        consume_queue = await consume_channel.get_queue(queue.name)
        total = 2 * n
        done = asyncio.Event()
        seen = 0

        async def on_message(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            await incoming.ack()
            seen += 1
            if seen >= total:
                done.set()

        start = time.perf_counter()
        tag = await consume_queue.consume(on_message)
        await asyncio.wait_for(done.wait(), 600)
        report.add(
            "rabbitmq",
            "drain c=16",
            "raw",
            rate(total, time.perf_counter() - start),
            "jobs/s",
            "consume + ack, prefetch 16",
        )
        await consume_queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
