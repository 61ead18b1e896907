"""Peer job queues on the same broker with the same no-op job: Taskiq, arq, SAQ, Dramatiq, Celery, Huey.

Each peer runs in a subprocess of its own (``python -m benchmarks.peers PEER BACKEND URL N CONCURRENCY``), so
that its imports, globals, threads and signal handlers touch nothing else. In that process: N jobs are
published one per call through the peer's usual API (the publish rate), then one worker, in that same
process, drains them (the drain rate). A peer runs as many times as ours has rounds and keeps its best. The
job takes the benchmark payload's fields as arguments and only counts itself. The drain rate is timed from
the first job's start to the last job's end, so a peer's worker start-up is not charged to it. Every peer
keeps its default delivery settings, even where they are cheaper than ours (Celery acks a job before running
it; RedisHuey pops it off the list, with no ack at all); only concurrency, queue names, result storage (off,
as ours has none) and arq's poll interval (10 ms, not 0.5 s) are set. ``CONFIGS`` says exactly how each peer
was set up.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import Report

# The payload fields of benchmarks.ours.BenchInput, as plain arguments.
PAYLOAD = {"threshold": 0.5, "tags": ["a", "b"]}


@dataclass(frozen=True)
class Peer:
    """A peer library: the modules it needs and the backends it is measured on."""

    name: str
    modules: dict[str, tuple[str, ...]]  # backend -> modules that must be importable


PEERS = [
    Peer("taskiq", {"memory": ("taskiq",), "redis": ("taskiq", "taskiq_redis"), "rabbitmq": ("taskiq_aio_pika",)}),
    Peer("arq", {"redis": ("arq",)}),
    Peer("saq", {"redis": ("saq",)}),
    Peer("dramatiq", {"memory": ("dramatiq",), "redis": ("dramatiq", "redis"), "rabbitmq": ("dramatiq", "pika")}),
    Peer("celery", {"redis": ("celery", "redis"), "rabbitmq": ("celery",)}),
    Peer("huey", {"memory": ("huey",), "redis": ("huey", "redis")}),
]

CONFIGS = {
    ("taskiq", "memory"): "InMemoryBroker: kiq() runs the task at once, so publish only",
    ("taskiq", "redis"): "taskiq-redis RedisStreamBroker (acks), Receiver(max_async_tasks=c) in-process",
    ("taskiq", "rabbitmq"): "taskiq-aio-pika AioPikaBroker, classic queue, qos=c, Receiver(max_async_tasks=c)",
    ("arq", "redis"): "enqueue_job; Worker(max_jobs=c, keep_result=0, poll_delay=10 ms, burst=True) in-process",
    ("saq", "redis"): "Queue.enqueue; Worker(concurrency=c) in-process",
    ("dramatiq", "memory"): "StubBroker; Worker(worker_threads=c)",
    ("dramatiq", "redis"): "RedisBroker; actor.send; Worker(worker_threads=c)",
    ("dramatiq", "rabbitmq"): "RabbitmqBroker (confirm_delivery=True, as ours); Worker(worker_threads=c)",
    ("celery", "redis"): "task.delay; start_worker(pool=threads, concurrency=c), prefetch x4, no result backend",
    ("celery", "rabbitmq"): "task.delay; start_worker(pool=threads, concurrency=c), prefetch x4, no result backend",
    ("huey", "memory"): "MemoryHuey; consumer(workers=c, thread)",
    ("huey", "redis"): "RedisHuey (blocking BRPOP); consumer(workers=c, thread)",
}


def missing_modules(peer: Peer, backend: str) -> list[str]:
    """The modules of ``peer`` on ``backend`` that are not installed."""
    return [m for m in peer.modules.get(backend, ()) if importlib.util.find_spec(m) is None]


def measure(report: Report, backend: str, url: str, n: int, concurrency: int, rounds: int = 1) -> None:
    """Publish and drain rates of every peer on ``backend``, best of ``rounds`` runs of ``n`` jobs each (as
    ours is best of its rounds); 'not installed' for those missing."""
    scenario = f"drain c={concurrency}"
    for peer in PEERS:
        if backend not in peer.modules:
            continue
        missing = missing_modules(peer, backend)
        if missing:
            report.skip(backend, peer.name, f"not installed ({', '.join(missing)})")
            continue
        best: dict[str, float] = {}
        failure = ""
        for _ in range(rounds):
            result, failure = _run_peer(peer.name, backend, url, n, concurrency)
            if result is None:
                break
            for kind, rate in result.items():
                best[kind] = max(best.get(kind, 0.0), rate)
        if failure:
            report.skip(backend, peer.name, failure)
            continue
        config = CONFIGS[(peer.name, backend)]
        report.add(backend, "publish single", peer.name, best["publish"], "jobs/s", config)
        if best.get("drain"):
            report.add(backend, scenario, peer.name, best["drain"], "jobs/s", config)


def _run_peer(name: str, backend: str, url: str, n: int, concurrency: int) -> tuple[dict[str, float] | None, str]:
    """One run of one peer in a subprocess: its rates, or None and why it failed."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.peers", name, backend, url, str(n), str(concurrency)],
            capture_output=True,
            text=True,
            timeout=max(120, n / 20),
            cwd=Path(__file__).resolve().parent.parent,
        )
    except subprocess.TimeoutExpired:
        return None, "timed out"
    if out.returncode != 0:
        lines = (out.stderr or out.stdout or "no output").strip().splitlines()
        return None, f"failed: {lines[-1] if lines else ''}"
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result, ""


def best_peer(report: Report, backend: str, scenario: str) -> tuple[str, float] | None:
    """The fastest peer measured in this run for ``scenario`` on ``backend``: (name, jobs/s)."""
    names = {peer.name for peer in PEERS}
    peers = [r for r in report.rows if r.backend == backend and r.scenario == scenario and r.who in names]
    if not peers:
        return None
    best = max(peers, key=lambda r: r.value)
    return best.who, best.value


# -- in the peer's subprocess ----------------------------------------------------------------------


class _Tally:
    """Counts finished jobs from any thread; remembers when the first and the n-th one ran."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def hit(self) -> None:
        now = time.perf_counter()
        with self._lock:
            self.count += 1
            if self.count == 1:
                self.first = now
            if self.count == self.target:
                self.last = now
                self.done.set()

    def wait(self, timeout: float) -> None:
        if not self.done.wait(timeout):
            raise TimeoutError(f"{self.count} of {self.target} jobs ran in {timeout}s")

    async def await_done(self, timeout: float) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.wait, timeout)

    def drain_rate(self) -> float:
        return (self.target - 1) / (self.last - self.first) if self.target > 1 else 0.0


TALLY = _Tally(0)
_TIMEOUT = 120.0


def noop(image_path: str, threshold: float, tags: list[str]) -> None:
    """The no-op job, sync."""
    TALLY.hit()


async def anoop(image_path: str, threshold: float, tags: list[str]) -> None:
    """The no-op job, async."""
    TALLY.hit()


def _payloads(n: int) -> list[dict[str, Any]]:
    return [{"image_path": f"/data/img_{i}.jpg", **PAYLOAD} for i in range(n)]


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _timed_publish(payloads: list[dict[str, Any]], send: Callable[[dict[str, Any]], Any]) -> float:
    start = time.perf_counter()
    for p in payloads:
        send(p)
    return _rate(len(payloads), time.perf_counter() - start)


def _delete_redis_keys(url: str, token: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*{token}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


async def _delete_amqp(url: str, queues: list[str], exchanges: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        for name in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):  # a queue the peer did not create
                await channel.queue_delete(name)
        for name in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
    finally:
        await connection.close()


def run_huey(backend: str, url: str, n: int, concurrency: int, token: str) -> dict[str, float]:
    import huey

    app = huey.MemoryHuey(token) if backend == "memory" else huey.RedisHuey(token, url=url)
    task = app.task()(noop)
    publish = _timed_publish(_payloads(n), lambda p: task(**p))
    consumer = app.create_consumer(workers=concurrency, worker_type="thread", periodic=False, check_worker_health=False)
    consumer.start()
    try:
        TALLY.wait(_TIMEOUT)
    finally:
        consumer.stop(graceful=True)
        app.flush()
    return {"publish": publish, "drain": TALLY.drain_rate()}


def run_dramatiq(backend: str, url: str, n: int, concurrency: int, token: str) -> dict[str, float]:
    import dramatiq
    from dramatiq.brokers.stub import StubBroker

    broker: Any
    if backend == "memory":
        broker = StubBroker()
    elif backend == "redis":
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=url, namespace=f"dramatiq-{token}")
    else:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker = RabbitmqBroker(url=url, confirm_delivery=True)
    dramatiq.set_broker(broker)
    actor = dramatiq.actor(noop, queue_name=token, max_retries=0, broker=broker)
    publish = _timed_publish(_payloads(n), lambda p: actor.send(**p))
    worker = dramatiq.Worker(broker, worker_threads=concurrency, worker_timeout=100)
    worker.start()
    try:
        TALLY.wait(_TIMEOUT)
    finally:
        worker.stop()
        if backend == "rabbitmq":
            asyncio.run(_delete_amqp(url, [token, f"{token}.DQ", f"{token}.XQ"], []))
        broker.close()
    return {"publish": publish, "drain": TALLY.drain_rate()}


def run_celery(backend: str, url: str, n: int, concurrency: int, token: str) -> dict[str, float]:
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    app = Celery(token, broker=url, set_as_current=False)
    app.conf.update(
        task_default_queue=token,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
    )
    task = app.task(name="noop")(noop)
    publish = _timed_publish(_payloads(n), lambda p: task.delay(**p))
    # Left running: the process ends right after the measurement (a clean stop of this worker takes ~10 s).
    worker = start_worker(app, pool="threads", concurrency=concurrency, perform_ping_check=False, loglevel="WARNING")
    worker.__enter__()
    TALLY.wait(_TIMEOUT)
    if backend == "rabbitmq":
        asyncio.run(_delete_amqp(url, [token], [token]))
    return {"publish": publish, "drain": TALLY.drain_rate()}


#: arq polls its queue; its default 0.5 s between polls would measure the poll interval, not arq.
ARQ_POLL_DELAY = 0.01


async def run_arq(backend: str, url: str, n: int, concurrency: int, token: str) -> dict[str, float]:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    async def job(ctx: dict[str, Any], image_path: str, threshold: float, tags: list[str]) -> None:
        TALLY.hit()

    pool = await create_pool(RedisSettings.from_dsn(url))
    start = time.perf_counter()
    for p in _payloads(n):
        await pool.enqueue_job("noop", _queue_name=token, **p)
    publish = _rate(n, time.perf_counter() - start)
    # Burst mode: the worker returns once the queue is empty and its jobs are done.
    worker = Worker(
        functions=[func(job, name="noop")],
        redis_pool=pool,
        queue_name=token,
        max_jobs=concurrency,
        keep_result=0,
        handle_signals=False,
        burst=True,
        poll_delay=ARQ_POLL_DELAY,
    )
    try:
        await asyncio.wait_for(worker.async_run(), _TIMEOUT)
        TALLY.wait(0)
    finally:
        await worker.close()
    return {"publish": publish, "drain": TALLY.drain_rate()}


async def run_saq(backend: str, url: str, n: int, concurrency: int, token: str) -> dict[str, float]:
    from saq import Queue, Worker

    async def job(ctx: dict[str, Any], *, image_path: str, threshold: float, tags: list[str]) -> None:
        TALLY.hit()

    queue = Queue.from_url(url, name=token)
    await queue.connect()
    start = time.perf_counter()
    for p in _payloads(n):
        await queue.enqueue("job", **p)
    publish = _rate(n, time.perf_counter() - start)
    worker = Worker(queue, functions=[("job", job)], concurrency=concurrency)
    running = asyncio.ensure_future(worker.start())
    try:
        await TALLY.await_done(_TIMEOUT)
    finally:
        await worker.stop()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await queue.disconnect()
    return {"publish": publish, "drain": TALLY.drain_rate()}


async def run_taskiq(backend: str, url: str, n: int, concurrency: int, token: str) -> dict[str, float]:
    from taskiq import InMemoryBroker
    from taskiq.receiver import Receiver

    broker: Any
    if backend == "memory":
        broker = InMemoryBroker()
    elif backend == "redis":
        from taskiq_redis import RedisStreamBroker

        broker = RedisStreamBroker(url, queue_name=token, consumer_group_name=token)
    else:
        from taskiq_aio_pika import AioPikaBroker, Exchange, Queue, QueueType

        broker = AioPikaBroker(
            url,
            qos=concurrency,
            exchange=Exchange(name=token),
            task_queues=[Queue(name=token, type=QueueType.CLASSIC)],
            dead_letter_queue=Queue(name=f"{token}.dead_letter", type=QueueType.CLASSIC),
            delay_queue=Queue(name=f"{token}.delay", type=QueueType.CLASSIC),
        )
    task = broker.task(task_name="noop")(anoop)
    broker.is_worker_process = backend != "memory"
    await broker.startup()
    start = time.perf_counter()
    for p in _payloads(n):
        await task.kiq(**p)
    publish = _rate(n, time.perf_counter() - start)
    if backend == "memory":
        await broker.shutdown()
        return {"publish": publish}
    receiver = Receiver(broker, max_async_tasks=concurrency, run_startup=False)
    finish = asyncio.Event()
    listening = asyncio.ensure_future(receiver.listen(finish))
    try:
        await TALLY.await_done(_TIMEOUT)
    finally:
        finish.set()
        # The receiver notices the event between reads; it does not answer cancellation promptly.
        await asyncio.wait({listening}, timeout=3)
        listening.cancel()
        await asyncio.wait_for(broker.shutdown(), 10)
        if backend == "rabbitmq":
            await _delete_amqp(url, [token, f"{token}.dead_letter", f"{token}.delay"], [token])
    return {"publish": publish, "drain": TALLY.drain_rate()}


RUNNERS: dict[str, Callable[..., Any]] = {
    "huey": run_huey,
    "dramatiq": run_dramatiq,
    "celery": run_celery,
    "arq": run_arq,
    "saq": run_saq,
    "taskiq": run_taskiq,
}


def main(argv: list[str]) -> None:
    """Measure one peer on one backend and print its rates as JSON (the subprocess side)."""
    import logging

    logging.disable(logging.WARNING)
    peer, backend, url, n, concurrency = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    token = f"bench-peer-{peer}-{uuid.uuid4().hex[:8]}"
    TALLY.target = n
    runner = RUNNERS[peer]
    try:
        result = runner(backend, url, n, concurrency, token)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
    finally:
        if backend == "redis":
            _delete_redis_keys(url, token)
    print(json.dumps(result), flush=True)
    os._exit(0)  # without waiting for the peer's worker threads to wind down


if __name__ == "__main__":
    main(sys.argv[1:])
