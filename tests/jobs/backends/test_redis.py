"""What only the Redis backend can show: leases, key layout, persistence, reconnects, URLs and idle cost."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from mindtrace.jobs import (
    AsyncConsumer,
    AsyncOrchestrator,
    BackendRefusedError,
    BackendUnavailableError,
    ConfigurationError,
    Job,
    JobStatus,
    LeaseLostError,
    QueueNotFoundError,
    RedisClient,
    UndecodableMessage,
)
from mindtrace.jobs.backends.base import OutgoingMessage
from mindtrace.jobs.orchestrator import outgoing
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.faults.conftest import Workers
from tests.jobs.support import servers
from tests.jobs.support.ledger import Ledger

PASSWORD = "s3cret-Pa55"


@pytest.fixture
def redis_server() -> Iterator[servers.RedisServer]:
    """A redis-server of this test's own, persisting every write (appendonly, fsync always)."""
    if shutil.which("redis-server") is None:
        if servers.IN_CI:
            pytest.fail("CI=true: redis-server is not on PATH")
        pytest.skip("redis-server is not on PATH")
    server = servers.RedisServer(appendonly=True, appendfsync="always").start()
    try:
        yield server
    finally:
        server.cleanup()


@contextlib.asynccontextmanager
async def _client(url: str, *queues: str, **options: Any) -> AsyncIterator[RedisClient]:
    """A connected client; deletes ``queues`` and closes on exit."""
    client = RedisClient.from_url(url, **options)
    try:
        yield client
    finally:
        for queue in queues:
            with contextlib.suppress(Exception):
                await client.delete_queue(queue)
        await client.close()


@contextlib.asynccontextmanager
async def _raw(url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client, as another program would use the server."""
    raw = aioredis.Redis.from_url(url)
    try:
        yield raw
    finally:
        await raw.aclose()


def _consumer(orchestrator: AsyncOrchestrator, queue: str, handler: Callable[[Job], Awaitable[Any]]) -> AsyncConsumer:
    class _Consumer(AsyncConsumer):
        async def run(self, job: Job) -> Any:
            return await handler(job)

    consumer = _Consumer(queue, max_retries=0)
    consumer.connect(orchestrator)
    return consumer


async def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# -- leases -----------------------------------------------------------------------------------------


async def test_a_frozen_holder_cannot_settle_after_its_lease_went_to_another(redis_url: str, queue: str) -> None:
    async with _client(redis_url, queue, visibility_timeout=0.5) as backend:
        assert backend.capabilities.lease_timeout == 0.5
        await backend.declare_queue(queue)
        job = make_job(image_schema(queue), 1)
        await backend.publish(queue, outgoing(job))
        async with await backend.open_receiver(queue) as first, await backend.open_receiver(queue) as second:
            frozen = await first.get(0)
            assert frozen is not None and frozen.delivery_count == 1
            claimed_at = time.monotonic()
            # The second receiver blocks; it wakes when the first lease ends, told the deadline by its claim.
            taken = await second.get(5)
            assert taken is not None and taken.body == frozen.body and taken.delivery_count == 2
            assert 0.45 <= time.monotonic() - claimed_at < 1.5
            with pytest.raises(LeaseLostError) as info:
                await backend.extend(frozen, 10)
            with pytest.raises(LeaseLostError) as info:
                await backend.ack(frozen)
            assert info.value.queue == queue and info.value.job_id == job.id
            assert job.id in str(info.value)
            await backend.extend(taken, 10)
            await backend.ack(taken)
        assert await backend.count(queue) == 0
        assert await backend.count(queue + ".dlq") == 0


async def test_a_lost_holder_cannot_retry_dead_letter_or_release(redis_url: str, queue: str) -> None:
    async with _client(redis_url, queue, visibility_timeout=0.3) as backend:
        await backend.declare_queue(queue)
        job = make_job(image_schema(queue), 1)
        await backend.publish(queue, outgoing(job))
        async with await backend.open_receiver(queue) as receiver:
            lost = [await receiver.get(0) for _ in range(3)]
            assert lost[0] is not None and lost[1] is None
            await asyncio.sleep(0.4)
            holder = await receiver.get(0)
            assert holder is not None
            assert lost[0] is not None
            with pytest.raises(LeaseLostError):
                await backend.retry(lost[0], outgoing(job), 0)
            # Each settle marks its delivery settled: take fresh copies of the stale one for the others.
            stale = [type(lost[0])(queue, lost[0].body, lost[0].priority, lost[0].handle) for _ in range(2)]
            with pytest.raises(LeaseLostError):
                await backend.dead_letter(stale[0], outgoing(job))
            await backend.release(stale[1])  # nothing to give back: a no-op
            assert await receiver.get(0) is None
            assert await backend.count(queue + ".dlq") == 0
            await backend.ack(holder)


async def test_a_long_job_keeps_its_lease_and_runs_once(redis_url: str, queue: str) -> None:
    async with (
        AsyncOrchestrator(RedisClient.from_url(redis_url, visibility_timeout=0.6)) as first,
        AsyncOrchestrator(RedisClient.from_url(redis_url, visibility_timeout=0.6)) as second,
    ):
        schema = image_schema(queue)
        await first.register(schema)
        await first.publish(queue, make_job(schema, 1))
        runs: list[str] = []

        async def slow(job: Job) -> None:
            runs.append(job.id)
            await asyncio.sleep(2.0)  # over three leases long: the consumer renews it every 0.2 s

        consumers = [_consumer(first, queue, slow), _consumer(second, queue, slow)]
        tasks = [asyncio.create_task(c.consume()) for c in consumers]
        await _wait_until(lambda: len(runs) == 1, 5, "the job to start")
        await asyncio.sleep(2.5)
        for consumer in consumers:
            consumer.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert len(runs) == 1
        assert await first.count_queue_messages(queue) == 0
        await first.delete_queue(queue)


async def test_a_consumer_killed_mid_job_loses_it_to_another_and_nothing_else_runs_twice(
    redis_url: str, queue: str, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path / "ledger")
    workers = Workers(redis_url, queue, ledger.path)
    try:
        async with AsyncOrchestrator(redis_url) as orchestrator:
            schema = image_schema(queue)
            await orchestrator.register(schema)
            jobs = [make_job(schema, i) for i in range(6)]
            await orchestrator.publish_many(queue, jobs)
            for job in jobs:
                ledger.record("published", job.id)
            victim = await asyncio.to_thread(workers.start, "--concurrency", "1", "--job-seconds", "30")
            await _wait_until(lambda: bool(ledger.read().started_on(victim.pid)), 10, "the victim to start a job")
            victim.send_signal(signal.SIGKILL)
            await asyncio.to_thread(victim.wait)
            killed_at = time.time()
            (in_flight,) = ledger.read().in_flight_on(victim.pid)
            await asyncio.to_thread(workers.start, "--concurrency", "2", "--job-seconds", "0.05")
            await _wait_until(lambda: len(ledger.read().done) == len(jobs), 10, "every job to be done")
            accounts = ledger.read()
            assert not accounts.lost and not accounts.unexpected, accounts.summary()
            assert accounts.duplicated == {in_flight}, accounts.summary()
            restarted = accounts.restarted_after(in_flight, victim.pid)
            assert restarted is not None and restarted - killed_at < 3.0
            assert not accounts.done_twice
            assert await orchestrator.count_queue_messages(queue + ".dlq") == 0
            await orchestrator.delete_queue(queue)
    finally:
        workers.stop_all()
        ledger.close()


# -- persistence and connection loss ------------------------------------------------------------------


async def test_jobs_survive_a_server_crash_and_restart(redis_server: servers.RedisServer, queue: str) -> None:
    schema = image_schema(queue)
    jobs = [make_job(schema, i, priority=i % 3) for i in range(10)]
    async with AsyncOrchestrator(redis_server.url) as orchestrator:
        await orchestrator.register(schema)
        await orchestrator.publish_many(queue, jobs[:5])
        for job in jobs[5:]:
            await orchestrator.publish(queue, job)
    redis_server.stop(kill=True)  # SIGKILL: only what reached the append-only file survives
    await asyncio.to_thread(redis_server.start)
    async with AsyncOrchestrator(redis_server.url) as orchestrator:
        await orchestrator.register(schema)
        assert await orchestrator.count_queue_messages(queue) == 10
        received = [await orchestrator.receive_message(queue, timeout=5) for _ in jobs]
        expected = sorted(jobs, key=lambda j: (-j.priority, jobs.index(j)))
        assert [r.id for r in received if r is not None] == [j.id for j in expected]


async def test_a_delayed_job_survives_a_server_crash_and_arrives_when_due(
    redis_server: servers.RedisServer, queue: str
) -> None:
    schema = image_schema(queue)
    job = make_job(schema, 1)
    async with AsyncOrchestrator(redis_server.url) as orchestrator:
        await orchestrator.register(schema)
        sent = time.time()
        handle = await orchestrator.publish(queue, job, delay=4.0)
        assert await handle.status() is JobStatus.SCHEDULED
    redis_server.stop(kill=True)  # SIGKILL: only what reached the append-only file survives
    await asyncio.to_thread(redis_server.start)
    async with AsyncOrchestrator(redis_server.url) as orchestrator:
        await orchestrator.register(schema)
        assert time.time() < sent + 4.0, "the restart took longer than the delay: raise it"
        assert await orchestrator.job(job.id, queue).status() is JobStatus.SCHEDULED
        assert await orchestrator.count_queue_messages(queue) == 0  # still held, not ready
        received = await orchestrator.receive_message(queue, timeout=10)
        arrived = time.time()
    assert received is not None and received.id == job.id
    assert sent + 4.0 - 0.01 <= arrived <= sent + 4.0 + 1.0, arrived - sent  # on the server's clock, kept


async def test_publishing_to_an_unreachable_server_raises_with_host_and_port_and_no_password(queue: str) -> None:
    port = servers.free_port()
    backend = RedisClient.from_url(f"redis://worker:{PASSWORD}@127.0.0.1:{port}/0", connection_retries=2)
    async with AsyncOrchestrator(backend) as orchestrator:
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError) as info:
            await orchestrator.publish(queue, make_job(image_schema(queue), 1))
        assert time.monotonic() - started < 5
    error = info.value
    assert (error.host, error.port) == ("127.0.0.1", port)
    assert f"127.0.0.1:{port}" in str(error)
    assert isinstance(error.__cause__, Exception)
    for text in (str(error), repr(error), str(error.__cause__), repr(backend), backend.describe()):
        assert PASSWORD not in text


async def test_a_publisher_gets_an_error_while_the_server_is_down_and_recovers(
    redis_server: servers.RedisServer, queue: str
) -> None:
    async with _client(redis_server.url, queue, connection_retries=2) as backend:
        await backend.declare_queue(queue)
        await backend.publish(queue, OutgoingMessage(b"before", 0, "a"))
        redis_server.stop()
        with pytest.raises(BackendUnavailableError) as info:
            await backend.publish(queue, OutgoingMessage(b"lost?", 0, "b"))
        assert info.value.port == redis_server.port
        await asyncio.to_thread(redis_server.start)
        await backend.publish(queue, OutgoingMessage(b"after", 0, "c"))
        assert await backend.count(queue) == 2


async def test_a_consumer_survives_a_server_restart(redis_server: servers.RedisServer, queue: str) -> None:
    schema = image_schema(queue)
    async with AsyncOrchestrator(redis_server.url) as orchestrator:
        await orchestrator.register(schema)
        seen: list[str] = []

        async def handler(job: Job) -> None:
            seen.append(job.id)

        task = asyncio.create_task(_consumer(orchestrator, queue, handler).consume(num_messages=6))
        before = [make_job(schema, i) for i in range(3)]
        await orchestrator.publish_many(queue, before)
        await _wait_until(lambda: len(seen) == 3, 5, "the first jobs")
        await asyncio.sleep(0.2)  # the consumer is blocked on the server now
        redis_server.stop(kill=True)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(redis_server.start)
        after = [make_job(schema, i) for i in range(3, 6)]
        await orchestrator.publish_many(queue, after)
        assert await asyncio.wait_for(task, 12) == 6
        assert seen == [j.id for j in before + after]


# -- keys and wire ------------------------------------------------------------------------------------


async def test_every_key_is_under_the_prefix_and_hash_tag_and_delete_removes_them(redis_url: str, queue: str) -> None:
    prefix = f"mindtrace-test-{uuid.uuid4().hex[:8]}:"
    async with _client(redis_url, queue, key_prefix=prefix) as backend, _raw(redis_url) as raw:
        await backend.declare_queue(queue)
        jobs = [make_job(image_schema(queue), i) for i in range(4)]
        job = jobs[0]
        await backend.publish_many(queue, [outgoing(each) for each in jobs])
        async with await backend.open_receiver(queue, prefetch=3) as receiver:
            retried, held, dead = [await receiver.get(0) for _ in range(3)]
            assert retried is not None and held is not None and dead is not None
            await backend.retry(retried, outgoing(job), 60)
            await backend.dead_letter(dead, outgoing(job))
            keys = {key.decode() async for key in raw.scan_iter(match=f"{prefix}*")}
            # The one key outside the queue's hash tag: the registry of queue names (list_queues), apart on purpose.
            assert backend.registry_key == f"{prefix}queues" and backend.registry_key in keys
            assert await raw.smembers(backend.registry_key) == {queue.encode()}
            keys.discard(backend.registry_key)
            names = {
                f"{prefix}{{{queue}}}:{name}"
                for name in ("meta", "sequence", "ready", "delayed", "leases", "bodies", "tokens", "ranks")
            }
            names |= {f"{prefix}{{{queue}}}:{name}" for name in ("deliveries", "wake")}
            names |= {f"{prefix}{{{queue}}}.dlq:{name}" for name in ("meta", "sequence", "ready", "bodies", "wake")}
            assert names - {f"{prefix}{{{queue}}}:wake", f"{prefix}{{{queue}}}.dlq:wake"} <= keys <= names
            assert len({key_slot(key.encode()) for key in keys}) == 1  # one cluster slot for a queue and its DLQ
            await backend.release(held)
        await backend.delete_queue(queue)
        assert [key async for key in raw.scan_iter(match=f"{prefix}*")] == []


async def test_a_receiver_cancelled_after_delete_does_not_recreate_keys(redis_url: str, queue: str) -> None:
    async with _client(redis_url, queue) as backend, _raw(redis_url) as raw:
        await backend.declare_queue(queue)
        async with await backend.open_receiver(queue) as receiver:
            blocked = asyncio.create_task(receiver.get(None))
            await asyncio.sleep(0.2)
            await backend.delete_queue(queue)
            blocked.cancel()  # the cancelled read passes its possible wake-up on, only if the queue exists
            with pytest.raises(asyncio.CancelledError):
                await blocked
            await asyncio.sleep(0.2)
        assert [key async for key in raw.scan_iter(match=f"mindtrace:jobs:{{{queue}}}*")] == []


async def test_foreign_bytes_in_the_ready_set_are_dead_lettered_raw(redis_url: str, queue: str) -> None:
    garbage = [b"\x00\xff raw bytes {", b"42"]
    async with AsyncOrchestrator(redis_url) as orchestrator, _raw(redis_url) as raw:
        schema = image_schema(queue)
        await orchestrator.register(schema)
        await raw.zadd(f"mindtrace:jobs:{{{queue}}}:ready", {garbage[0]: 0, garbage[1]: float("inf")})
        job = make_job(schema, 1)
        await orchestrator.publish(queue, job)
        seen: list[str] = []

        async def handler(received: Job) -> None:
            seen.append(received.id)

        assert await _consumer(orchestrator, queue, handler).consume(num_messages=3) == 3
        assert seen == [job.id]
        dead = [await orchestrator.receive_message(queue + ".dlq", timeout=5) for _ in garbage]
        assert all(d is not None and isinstance(d.payload.input, UndecodableMessage) for d in dead)
        assert sorted(d.payload.input.raw for d in dead if d is not None) == sorted(garbage)  # type: ignore[union-attr]
        assert await orchestrator.count_queue_messages(queue) == 0
        await orchestrator.delete_queue(queue)


async def test_ranks_stay_exact_at_high_sequence_numbers(redis_url: str, queue: str) -> None:
    async with _client(redis_url, queue) as backend, _raw(redis_url) as raw:
        await backend.declare_queue(queue)
        await raw.set(f"mindtrace:jobs:{{{queue}}}:sequence", 2**44 - 20)
        priorities = [0, 9, 5, 9, 0, 5, 1]
        await backend.publish_many(
            queue, [OutgoingMessage(str(i).encode(), p, str(i)) for i, p in enumerate(priorities)]
        )
        async with await backend.open_receiver(queue) as receiver:
            order = []
            for _ in priorities:
                delivery = await receiver.get(0)
                assert delivery is not None
                order.append((delivery.priority, int(delivery.body)))
                await backend.ack(delivery)
        assert order == sorted(((p, i) for i, p in enumerate(priorities)), key=lambda pi: (-pi[0], pi[1]))


async def test_a_large_publish_many_is_all_or_nothing(
    redis_url: str, queue: str, new_queue: Callable[[str], str]
) -> None:
    messages = [OutgoingMessage(b"%d" % i, i % 10, str(i)) for i in range(1234)]  # several script calls
    missing = new_queue("missing")
    async with _client(redis_url, queue) as backend, _raw(redis_url) as raw:
        with pytest.raises(QueueNotFoundError):
            await backend.publish_many(missing, messages)
        assert [key async for key in raw.scan_iter(match=f"mindtrace:jobs:{{{missing}}}*")] == []
        await backend.declare_queue(queue)
        await backend.publish_many(queue, messages)
        assert await backend.count(queue) == len(messages)
        async with await backend.open_receiver(queue) as receiver:
            first = await receiver.get(0)
            assert first is not None and first.body == b"9" and first.priority == 9


async def test_prefetched_and_unsettled_messages_go_back_on_close(redis_url: str, queue: str) -> None:
    async with _client(redis_url) as backend:
        await backend.declare_queue(queue)
        await backend.publish_many(queue, [OutgoingMessage(b"%d" % i, 0, str(i)) for i in range(5)])
        async with await backend.open_receiver(queue, prefetch=3) as receiver:
            # Three get() at once share one claim of three messages.
            deliveries = await asyncio.gather(*(receiver.get(1) for _ in range(3)))
            assert sorted(d.body for d in deliveries if d is not None) == [b"0", b"1", b"2"]
            assert await backend.count(queue) == 2
            for delivery in deliveries[1:]:
                assert delivery is not None
                await backend.ack(delivery)
        assert await backend.count(queue) == 2
    # The first delivery was never settled: closing the backend gives it back, at its place, uncounted.
    async with _client(redis_url, queue) as backend, await backend.open_receiver(queue) as receiver:
        again = await receiver.get(0)
        assert again is not None and again.body == b"0" and again.delivery_count == 1
        await backend.ack(again)


def test_every_transition_ships_as_a_lua_file_with_its_keys_and_arguments() -> None:
    folder = importlib.resources.files("mindtrace.jobs.backends.redis").joinpath("lua")
    names = {entry.name for entry in folder.iterdir() if entry.name.endswith(".lua")}
    assert {"claim.lua", "publish.lua", "ack.lua", "release.lua", "retry.lua", "dead_letter.lua"} <= names
    for name in names - {"lib.lua"}:
        header = folder.joinpath(name).read_text().split("\n\n")[0]
        assert header.startswith(f"-- {name}:") and "KEYS[1]" in header and "Returns" in header, name


# -- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", ("localhost", 6379, 0, None, False, "redis://localhost:6379/0")),
        ("redis://10.0.0.5:6380/3", ("10.0.0.5", 6380, 3, None, False, "redis://10.0.0.5:6380/3")),
        (f"redis://:{PASSWORD}@cache:7000/1", ("cache", 7000, 1, None, False, "redis://cache:7000/1")),
        (f"redis://ops:{PASSWORD}@cache/", ("cache", 6379, 0, "ops", False, "redis://cache:6379/0")),
        (f"rediss://ops:{PASSWORD}@[::1]:6390/2", ("::1", 6390, 2, "ops", True, "rediss://[::1]:6390/2")),
    ],
)
def test_from_url_reads_every_part_and_never_shows_the_password(url: str, expected: tuple[Any, ...]) -> None:
    client = RedisClient.from_url(url)
    *fields, described = expected
    assert [client.host, client.port, client.db, client.username, client.ssl] == fields
    assert client.describe() == described
    assert repr(client) == f"<RedisClient {described}>"
    assert PASSWORD not in repr(client) and PASSWORD not in str(vars(client).get("host"))


def test_from_url_decodes_credentials_and_lets_keywords_win() -> None:
    client = RedisClient.from_url("redis://us%40er:p%3Ass@h:1/0", visibility_timeout=5, key_prefix="app:")
    assert client.username == "us@er" and client._password == "p:ss"
    assert client.visibility_timeout == client.capabilities.lease_timeout == 5.0
    assert client.key_prefix == "app:"


@pytest.mark.parametrize(
    "url",
    [
        f"http://u:{PASSWORD}@h/0",
        f"redis://u:{PASSWORD}@h:notaport/0",
        f"redis://u:{PASSWORD}@h/zero",
        f"redis://u:{PASSWORD}@h/0?ssl_cert_reqs=none",
    ],
)
def test_bad_urls_are_configuration_errors_that_do_not_repeat_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RedisClient.from_url(url)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    "options", [{"key_prefix": "a{b}:"}, {"visibility_timeout": 0}, {"port": 0}, {"db": -1}, {"connection_retries": -1}]
)
def test_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RedisClient(**options)


async def test_the_password_reaches_the_server_and_a_wrong_one_is_not_shown(queue: str) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    server = servers.RedisServer(extra=("--requirepass", PASSWORD)).start()
    try:
        async with _client(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0", queue) as backend:
            await backend.declare_queue(queue)
            assert await backend.queue_exists(queue)
        wrong = RedisClient.from_url(f"redis://:not-{PASSWORD}@127.0.0.1:{server.port}/0")
        started = time.monotonic()
        with pytest.raises(BackendRefusedError) as info:
            await wrong.connect()
        assert time.monotonic() - started < 1, "refused credentials are not retried"
        assert not isinstance(info.value, BackendUnavailableError)
        assert info.value.refused == "credentials"
        assert "refused the credentials" in str(info.value)
        assert PASSWORD not in str(info.value)
        await wrong.close()
    finally:
        server.cleanup()


# -- no polling -------------------------------------------------------------------------------------


async def _round_trips(raw: aioredis.Redis) -> int:
    """Claims (EVALSHA) and blocking reads (BLPOP) so far: the only commands a receiver sends."""
    stats = await raw.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "blpop"))


async def test_an_idle_consumer_makes_almost_no_calls_and_a_publish_reaches_it_at_once(
    redis_server: servers.RedisServer, queue: str
) -> None:
    schema = image_schema(queue)
    async with AsyncOrchestrator(redis_server.url) as orchestrator, _raw(redis_server.url) as raw:
        await orchestrator.register(schema)
        received: asyncio.Queue[float] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def handler(job: Job) -> None:
            received.put_nowait(loop.time())

        consumer = _consumer(orchestrator, queue, handler)
        task = asyncio.create_task(consumer.consume(concurrency=4))
        await asyncio.sleep(0.5)
        calls, cpu = await _round_trips(raw), time.process_time()
        await asyncio.sleep(2.0)
        idle_calls, idle_cpu = await _round_trips(raw) - calls, time.process_time() - cpu
        # A receiver with nothing due wakes every 5 s at most: one claim and one BLPOP in 2 s.
        assert idle_calls <= 2, idle_calls
        assert idle_cpu < 0.1, idle_cpu
        latencies = []
        for i in range(5):
            await asyncio.sleep(0.1)
            sent = loop.time()
            await orchestrator.publish(queue, make_job(schema, i))
            latencies.append(await asyncio.wait_for(received.get(), 5) - sent)
        consumer.stop()
        assert await asyncio.wait_for(task, 10) == 5
        # "At once" against polling: a receiver that polled would wait up to its 5-s block; a wake-up under
        # 1 s (typically ~3 ms; a noisy, shared machine has shown 0.25 s) is the push path.
        assert max(latencies) < 1.0, latencies


# -- job records ------------------------------------------------------------------------------------


async def test_a_watch_opened_as_another_of_the_same_job_closes_still_hears_the_change(redis_url: str) -> None:
    """Closing the last watch of a job sends UNSUBSCRIBE later, from a task: a new watch of the same job that
    subscribes meanwhile must not be unsubscribed by it (it would sleep through the job's end)."""
    from mindtrace.jobs.lifecycle import JobStatus, StateUpdate

    store = RedisClient.from_url(redis_url).state_store()
    queue = f"t-watch-{uuid.uuid4().hex[:8]}"
    try:
        for round_ in range(30):
            job_id = f"job-{round_}"
            await store.record(queue, StateUpdate(job_id, JobStatus.QUEUED, kind="published"))
            first = store.watch(queue, job_id)
            assert (await first.next(None)).status is JobStatus.QUEUED  # type: ignore[union-attr]
            await first.close()  # its UNSUBSCRIBE is now due...
            async with store.watch(queue, job_id) as second:  # ...while this one subscribes
                assert (await second.next(None)).status is JobStatus.QUEUED  # type: ignore[union-attr]
                await store.record(queue, StateUpdate(job_id, JobStatus.SUCCEEDED, attempts=1, ttl=60))
                woken = await second.next(asyncio.get_running_loop().time() + 5)
                assert woken is not None and woken.status is JobStatus.SUCCEEDED, f"round {round_}: not woken"
    finally:
        await store.forget_queue(queue)
        await store.close()
