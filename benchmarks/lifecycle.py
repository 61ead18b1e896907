"""Job lifecycle per backend config: finish -> wake, status lookups, cancel -> run, drain with/without records."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import Report, best_of, median, percentile, rate
from benchmarks.ours import make_jobs, queue_name
from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job, LocalClient, from_url
from mindtrace.jobs.backends.base import Backend, Delivery
from mindtrace.jobs.lifecycle import JobStatus, StateUpdate
from mindtrace.jobs.policy import Outcome
from mindtrace.jobs.state.redis import RedisStateStore

#: What a finished job returns where a result is kept: a small, realistic output.
OUTPUT = {"label": "cat", "score": 0.93}
#: Pause between the waiter starting its wait and the job being let finish: long enough on loopback for the
#: waiter's subscription (and its first read, which finds the job RUNNING) to be done, so that what is timed
#: is the wake on the terminal change, not a first read that already finds the job finished.
WAIT_GAP = 0.01


@dataclass(frozen=True)
class Config:
    """One backend configuration: its row name, broker URL and the orchestrator's ``state`` option."""

    name: str
    broker: str
    state: str | None = None  # None: the backend's own store
    redis: str | None = None  # where the records live, when in Redis (for the memory figure)
    concurrency: int = 16  # the drain's, as the peers are compared at (memory: 1)

    def backend(self, **kwargs: Any) -> Backend:
        return from_url(self.broker, **kwargs)


def configs(names: list[str], redis_url: str, amqp_url: str) -> list[Config]:
    """The lifecycle configs for the backends asked for (rabbitmq: RabbitMQ alone, and with records in Redis)."""
    out = []
    for name in names:
        if name == "memory":
            out.append(Config("memory", "memory://", concurrency=1))
        elif name == "redis":
            out.append(Config("redis", redis_url, redis=redis_url))
        elif name == "rabbitmq":
            out.append(Config("rabbitmq", amqp_url))
            out.append(Config("rabbitmq+redis", amqp_url, state=redis_url, redis=redis_url))
    return out


@contextlib.asynccontextmanager
async def _pair(
    config: Config, *, worker_cls: type[AsyncOrchestrator] = AsyncOrchestrator, **options: Any
) -> AsyncIterator[tuple[AsyncOrchestrator, AsyncOrchestrator]]:
    """(producer, worker): two orchestrators, each with its own connections, as two processes have. In memory
    they share the one LocalClient (its queues are the process's own: ``shared_queues`` is False)."""
    if "state" not in options and config.state is not None:
        options["state"] = config.state
    if config.name == "memory":
        shared = LocalClient()
        producer, worker = AsyncOrchestrator(shared, **options), worker_cls(shared, **options)
    else:
        producer, worker = AsyncOrchestrator(config.backend(), **options), worker_cls(config.backend(), **options)
    try:
        yield producer, worker
    finally:
        await worker.close()
        await producer.close()


class _Stamped(AsyncOrchestrator):
    """The worker's orchestrator, stamping (perf_counter) per job: its settle's start, the return of the write
    that made its record terminal, and its settle's return."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settle_started: dict[str, float] = {}
        self.written: dict[str, float] = {}
        self.settled: dict[str, float] = {}
        self._stamping = False

    def _stamp_writes(self) -> None:
        """Wrap the store's ``record`` (where the store is written apart from the broker) to stamp terminal writes."""
        if self._stamping or not self.records:
            return
        self._stamping = True
        store = self.state
        plain = store.record

        async def record(queue: str, update: StateUpdate) -> None:
            await plain(queue, update)
            if update.kind == "status" and update.status.terminal:
                self.written[update.job_id] = time.perf_counter()

        store.record = record  # type: ignore[method-assign]

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self._stamp_writes()
        job_id = outcome.job.id
        self.settle_started[job_id] = time.perf_counter()
        await super().settle(delivery, outcome)
        self.settled[job_id] = now = time.perf_counter()
        # A store the backend writes inside its settle step (memory): the record is written when it returns.
        self.written.setdefault(job_id, now)


class _Gated(AsyncConsumer):
    """Runs one job at a time: says it started, then waits for its gate to open (or for a cancel)."""

    def __init__(self, queue: str) -> None:
        super().__init__(queue)
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self.gates: dict[str, asyncio.Event] = {}
        self.heard_cancel: dict[str, float] = {}

    async def run(self, job: Job) -> Any:
        gate = self.gates.setdefault(job.id, asyncio.Event())
        self.started.put_nowait(job.id)
        try:
            await asyncio.wait_for(gate.wait(), 30)
        except asyncio.CancelledError:
            self.heard_cancel[job.id] = time.perf_counter()
            raise
        return OUTPUT


async def wake_and_cancel(config: Config, n: int) -> dict[str, list[float]]:
    """ms samples of: terminal record written -> waiter woke, settle started -> waiter woke, cancel() -> run
    cancelled, and the cancel() call itself.

    Finish -> wake. The waiter is a producer's ``handle.wait()`` on its own orchestrator (its own connections
    and pub/sub, as a web process waiting on a worker's job would have); the consumer is on another. Each job
    is let run, the waiter is started once the run has begun (so the RUNNING change is not what wakes it),
    given WAIT_GAP to subscribe, and only then the run is let return. The clock starts when the write that
    makes the job's record terminal has returned to the consumer: in memory the backend writes it inside its
    ack, so that is when the settle returns; on Redis and on RabbitMQ with records in Redis the orchestrator
    writes it with the store's ``record`` just before the broker's ack, and the benchmark wraps that call to
    stamp its return (the ack, still to come, is not counted). The clock stops right after ``wait()`` returns
    in the waiter. Both run on one event loop, so the figure includes the loop handing over from the consumer
    to the waiter, as in a process that both works and waits. The store wakes the waiter on its own (Redis:
    the record script publishes on the job's channel, the waiter then reads the record once), so the waiter
    can be woken before the writer has its reply: such samples are negative, and counted in the note.
    "settle started -> wake" adds the whole write (its round trip) to that.

    Cancel -> run sees it: the producer cancels a running job whose async run awaits; timed from just before
    ``cancel()`` to the run's CancelledError (the store's cancel signal, heard by the consumer's listener).
    """
    samples: dict[str, list[float]] = {"wake": [], "wake_from_settle_start": [], "cancel": [], "cancel_call": []}
    async with _pair(config, worker_cls=_Stamped) as (producer, worker):
        assert isinstance(worker, _Stamped)
        queue = queue_name()
        await producer.declare_queue(queue)
        consumer = _Gated(queue)
        consumer.connect(worker)
        consuming = asyncio.create_task(consumer.consume())
        try:
            warm_up = 5
            for i, job in enumerate(make_jobs(n + warm_up)):
                handle = await producer.publish(queue, job)
                started = await asyncio.wait_for(consumer.started.get(), 10)
                assert started == job.id
                waiter_woke: asyncio.Future[float] = asyncio.get_running_loop().create_future()

                async def wait(h: Any = handle, woke: asyncio.Future[float] = waiter_woke) -> None:
                    await h.wait(timeout=10)
                    woke.set_result(time.perf_counter())

                waiter = asyncio.create_task(wait())
                await asyncio.sleep(WAIT_GAP)
                consumer.gates[job.id].set()
                woke = await asyncio.wait_for(waiter_woke, 10)
                await waiter
                # A store whose write returns once it has read it back (RabbitMQ's) may wake the waiter first.
                while job.id not in worker.written:  # noqa: ASYNC110
                    await asyncio.sleep(0.0005)
                if i >= warm_up:
                    samples["wake"].append((woke - worker.written[job.id]) * 1000)
                    samples["wake_from_settle_start"].append((woke - worker.settle_started[job.id]) * 1000)
            for i, job in enumerate(make_jobs(max(1, n // 2) + warm_up)):
                handle = await producer.publish(queue, job)
                await asyncio.wait_for(consumer.started.get(), 10)
                sent = time.perf_counter()
                await handle.cancel()
                returned = time.perf_counter()
                info = await handle.wait(timeout=10)
                assert info.status.value == "cancelled", info
                if i >= warm_up:
                    samples["cancel"].append((consumer.heard_cancel[job.id] - sent) * 1000)
                    samples["cancel_call"].append((returned - sent) * 1000)
        finally:
            consumer.stop()
            await asyncio.wait_for(consuming, 30)
            await producer.delete_queue(queue)
    return samples


async def lookups(config: Config, n: int) -> dict[str, list[float]]:
    """ms per ``info()`` of finished jobs: ``handle.info()`` of a handle ``publish`` returned in this process,
    and ``orch.job(id, queue).info()`` of jobs another orchestrator (another process's) published, re-attached
    by id. Both kinds are looked up alternately, so noise on the machine falls on both alike."""
    async with _pair(config) as (mine, other):
        queue = queue_name()
        await mine.declare_queue(queue)
        jobs = make_jobs(2 * n)
        own = await mine.publish_many(queue, jobs[:n])
        theirs = await other.publish_many(queue, jobs[n:])
        consumer = _Returning(queue)
        consumer.connect(other)
        await consumer.consume(num_messages=2 * n, concurrency=16)
        await own[0].info()  # connections made
        await mine.job(theirs[0], queue).info()
        out: dict[str, list[float]] = {"own": [], "reattached": []}
        for handle, job_id in zip(own, theirs, strict=True):
            start = time.perf_counter()
            info = await handle.info()
            mid = time.perf_counter()
            other_info = await mine.job(str(job_id), queue).info()
            end = time.perf_counter()
            assert info.terminal and other_info.terminal, (info, other_info)
            out["own"].append((mid - start) * 1000)
            out["reattached"].append((end - mid) * 1000)
        await mine.delete_queue(queue)
    return out


async def first_lookups(config: Config, n: int, tries: int = 3) -> tuple[list[float], list[float]]:
    """ms of the first and of a later ``info()`` of a job another process published, by an orchestrator that
    never used the queue before, once the queue's store holds ``n`` finished jobs (QUEUED, RUNNING and
    SUCCEEDED written for each, as a consumer writes them); ``tries`` fresh orchestrators, one after another."""
    firsts: list[float] = []
    laters: list[float] = []
    async with _pair(config) as (writer, _):
        queue = queue_name()
        await writer.declare_queue(queue)
        ids = [uuid.uuid4().hex for _ in range(n)]
        output = json.dumps(OUTPUT)
        for start in range(0, n, 1000):
            chunk = ids[start : start + 1000]
            await writer.state.record_many(queue, [StateUpdate(i, JobStatus.QUEUED, kind="published") for i in chunk])
            await writer.state.record_many(queue, [StateUpdate(i, JobStatus.RUNNING, attempts=1) for i in chunk])
            done = [StateUpdate(i, JobStatus.SUCCEEDED, attempts=1, output=output, ttl=3600) for i in chunk]
            await writer.state.record_many(queue, done)
        for attempt in range(tries):
            async with _pair(config) as (reader, _):
                await reader.state.connect()
                started = time.perf_counter()
                first = await reader.job(ids[attempt], queue).info()
                mid = time.perf_counter()
                later = await reader.job(ids[-1 - attempt], queue).info()
                end = time.perf_counter()
                assert first.terminal and later.terminal, (first, later)
                firsts.append((mid - started) * 1000)
                laters.append((end - mid) * 1000)
        await writer.delete_queue(queue)
    return firsts, laters


class _Returning(AsyncConsumer):
    """A trivial run that returns a small output (kept as the job's result where records are)."""

    async def run(self, job: Job) -> Any:
        return OUTPUT


class _Noop(AsyncConsumer):
    """A trivial run: returns None."""

    async def run(self, job: Job) -> None:
        return None


async def drain(config: Config, n: int, records: bool) -> float:
    """Jobs/s for one consumer (the config's concurrency) draining n queued no-op jobs, with records or not."""
    options: dict[str, Any] = {} if records else {"state": False}
    async with _pair(config, **options) as (producer, worker):
        queue = queue_name()
        await producer.declare_queue(queue)
        jobs = make_jobs(n)
        for i in range(0, n, 1000):
            await producer.publish_many(queue, jobs[i : i + 1000])
        consumer = _Noop(queue)
        consumer.connect(worker)
        start = time.perf_counter()
        handled = await consumer.consume(num_messages=n, concurrency=config.concurrency)
        elapsed = time.perf_counter() - start
        assert handled == n, (handled, n)
        await producer.delete_queue(queue)
    return rate(n, elapsed)


async def _redis_memory_once(config: Config, n: int) -> tuple[float, float]:
    """(INFO used_memory delta, sum of MEMORY USAGE of this run's keys) for n retained results, in bytes.

    Every key goes under a key prefix of this run's own, on the db of the URL; all are deleted after.
    """
    import redis.asyncio as aioredis

    assert config.redis is not None
    prefix = f"mtbench-{uuid.uuid4().hex[:8]}:"
    client = aioredis.from_url(config.redis)
    if config.state is None:
        backend = config.backend(key_prefix=prefix)
        state: Any = None
    else:
        backend = config.backend()
        state = RedisStateStore.from_url(config.redis, key_prefix=prefix)
    queue = queue_name()
    try:
        async with AsyncOrchestrator(backend, state=state) as orch:
            warm_queue = queue_name()  # warm: connections made, scripts loaded; its records deleted with it
            await orch.declare_queue(warm_queue)
            await orch.publish_many(warm_queue, make_jobs(50))
            warm = _Returning(warm_queue)
            warm.connect(orch)
            await warm.consume(num_messages=50, concurrency=16)
            await orch.delete_queue(warm_queue)
            await orch.declare_queue(queue)
            jobs = make_jobs(n)
            before = int((await client.info("memory"))["used_memory"])
            for i in range(0, n, 1000):
                await orch.publish_many(queue, jobs[i : i + 1000])
            consumer = _Returning(queue)
            consumer.connect(orch)
            await consumer.consume(num_messages=n, concurrency=16)
            after = int((await client.info("memory"))["used_memory"])
            keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
            usage = 0
            for key in keys:
                usage += int(await client.memory_usage(key, samples=0) or 0)
            await orch.delete_queue(queue)
        return float(after - before), float(usage)
    finally:
        leftovers = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if leftovers:
            await client.delete(*leftovers)
        await client.aclose()


async def redis_memory(config: Config, n: int, rounds: int = 3) -> tuple[float, float, list[float]]:
    """Bytes per retained result: (median INFO delta / n, median MEMORY USAGE sum / n, every INFO figure)."""
    deltas, usages = [], []
    for _ in range(rounds):
        delta, usage = await _redis_memory_once(config, n)
        deltas.append(delta / n)
        usages.append(usage / n)
    return median(deltas), median(usages), deltas


DRAIN_RATIO = "drain records / no records"


async def run_config(report: Report, config: Config, args: Any) -> None:
    """Every lifecycle row of one config, into ``report``."""
    name = config.name
    samples = await wake_and_cancel(config, args.lifecycle_n)
    for q in (50, 99):
        wake = percentile(samples["wake"], q)
        report.add(name, f"finish -> waiter wakes p{q}", "ours", wake, "ms", "from terminal record written")
    early = sum(s < 0 for s in samples["wake"])
    report.add(
        name,
        "finish -> waiter wakes p50",
        "from-start",
        percentile(samples["wake_from_settle_start"], 50),
        "ms",
        f"from settle start; {early}/{len(samples['wake'])} woke before the write returned",
    )
    for q in (50, 99):
        report.add(name, f"cancel -> run cancelled p{q}", "ours", percentile(samples["cancel"], q), "ms")
    report.add(name, "cancel() call p50", "ours", percentile(samples["cancel_call"], 50), "ms")
    looked = await lookups(config, args.lifecycle_n)
    report.add(name, "status lookup p50", "own", percentile(looked["own"], 50), "ms", "handle.info(), published here")
    report.add(
        name, "status lookup p50", "reattached", percentile(looked["reattached"], 50), "ms", "orch.job(id, q).info()"
    )
    if config.name != "memory" and args.lifecycle_replay_n > 0:
        firsts, laters = await first_lookups(config, args.lifecycle_replay_n)
        n = args.lifecycle_replay_n
        note = f"orch.job(id, q).info() by a fresh orchestrator, {n:,} finished jobs kept (3 events each), median of 3"
        report.add(name, "first lookup on a queue", "ours", median(firsts), "ms", note)
        report.add(name, "lookup after the first", "ours", median(laters), "ms", "the same orchestrator, next job")
    per = max(1, args.lifecycle_drain_n // args.rounds)
    best = await best_of(
        args.rounds,
        {"records": lambda: drain(config, per, True), "no-records": lambda: drain(config, per, False)},
    )
    note = f"c={config.concurrency}, best of {args.rounds} interleaved rounds of {per}"
    report.add(name, "drain with records", "ours", best["records"], "jobs/s", note)
    report.add(name, "drain without (state=False)", "ours", best["no-records"], "jobs/s", note)
    report.add(name, DRAIN_RATIO, "ours", best["records"] / best["no-records"], "x")
    if config.redis is not None and args.lifecycle_mem_n > 0:
        per_info, per_usage, all_info = await redis_memory(config, args.lifecycle_mem_n)
        spread = ", ".join(f"{v:,.0f}" for v in all_info)
        report.add(
            name,
            "Redis memory per retained result",
            "info",
            per_info,
            "B",
            f"INFO used_memory delta / {args.lifecycle_mem_n}, median of 3 ({spread})",
        )
        report.add(name, "Redis memory per retained result", "keys", per_usage, "B", "MEMORY USAGE of the run's keys")


def measure(
    report: Report, backends: list[str], urls: dict[str, str], reachable: Callable[[str], bool], args: Any
) -> None:
    """The lifecycle rows of each backend configuration asked for."""
    for config in configs(backends, urls["redis"], urls["rabbitmq"]):
        needed = [config.broker] + ([config.redis] if config.redis else [])
        if config.name != "memory" and not all(reachable(u) for u in needed):
            report.skip(config.name, "lifecycle", "not reachable")
            continue
        asyncio.run(run_config(report, config, args))
