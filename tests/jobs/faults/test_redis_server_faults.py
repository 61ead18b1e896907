"""A Redis server of the test's own that is full, stalled, busy, failing to save, evicting, silent or refusing.

Each test starts its own redis-server on a free loopback port (never the shared one) and configures it as
the scenario needs: ``maxmemory`` reached under ``noeviction``, SIGSTOP past ``operation_timeout``, a long
script of another client (BUSY), a failed background save (MISCONF), ``allkeys-lru``, ACL users and a
missing database. Unreachable servers are a plain asyncio server that accepts and never answers, the loopback
proxy's blackhole, and a listener whose backlog is full (SYNs dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError

from mindtrace.jobs import (
    AsyncConsumer,
    AsyncOrchestrator,
    BackendError,
    BackendRefusedError,
    BackendUnavailableError,
    ConfigurationError,
    Job,
    RedisClient,
)
from mindtrace.jobs.orchestrator import outgoing
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support import servers
from tests.jobs.support.proxy import TcpProxy

PASSWORD = "s3cret-Pa55"


def _need_redis_server() -> None:
    if shutil.which("redis-server") is None:
        if servers.IN_CI:
            pytest.fail("CI=true: redis-server is not on PATH")
        pytest.skip("redis-server is not on PATH")


@contextlib.contextmanager
def _server(*extra: str) -> Iterator[servers.RedisServer]:
    _need_redis_server()
    server = servers.RedisServer(extra=extra).start()
    try:
        yield server
    finally:
        server.cleanup()


@contextlib.asynccontextmanager
async def _raw(url: str) -> AsyncIterator[aioredis.Redis]:
    raw = aioredis.Redis.from_url(url)
    try:
        yield raw
    finally:
        await raw.aclose()


@contextlib.asynccontextmanager
async def _backend(url: str, **options: Any) -> AsyncIterator[RedisClient]:
    backend = RedisClient.from_url(url, **options)
    try:
        yield backend
    finally:
        await backend.close()


class _Recorder(AsyncConsumer):
    """Counts the runs of each job id; each run takes ``seconds``."""

    def __init__(self, queue: str, seconds: float = 0.0, **options: Any) -> None:
        super().__init__(queue, **options)
        self.runs: Counter[str] = Counter()
        self.seconds = seconds

    async def run(self, job: Job) -> None:
        self.runs[job.id] += 1
        if self.seconds:
            await asyncio.sleep(self.seconds)


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _consume_in_background(consumer: AsyncConsumer) -> asyncio.Task[int]:
    task = asyncio.create_task(consumer.consume(concurrency=2))
    await asyncio.sleep(0)
    return task


async def _stop(consumer: AsyncConsumer, task: asyncio.Task[int]) -> None:
    consumer.stop()
    await asyncio.wait_for(task, 15)


# -- bug 13: a full server (noeviction) ------------------------------------------------------------------


async def _fill(raw: aioredis.Redis) -> None:
    """Set maxmemory a little above what the server uses now and write filler keys until it refuses even a
    small one (a refused big value only shows that its own bytes did not fit)."""
    used = int((await raw.info("memory"))["used_memory"])
    await raw.config_set("maxmemory", used + 256 * 1024)
    await raw.config_set("maxmemory-policy", "noeviction")
    for size in (8192, 512, 16):
        with pytest.raises(OutOfMemoryError):
            for i in range(100_000):
                await raw.set(f"filler:{size}:{i}", b"x" * size)
    # Refused writes free their own buffers (and Redis shrinks client buffers lazily), leaving the server
    # hovering around its limit: hold it firmly over, as a server another tenant keeps full is.
    used = int((await raw.info("memory"))["used_memory"])
    await raw.config_set("maxmemory", used - 256 * 1024)


async def test_a_full_server_with_an_expired_lease_and_a_due_retry_still_drains_every_job(queue: str) -> None:
    # Regression: with one expired lease (or one due retry) every claim ran promote(), whose first write was
    # a ZADD, refused on a full server: OutOfMemoryError on each claim, the consumer died, 0 jobs drained.
    with _server() as server:
        schema = image_schema(queue)
        jobs = [make_job(schema, i) for i in range(20)]
        async with AsyncOrchestrator(RedisClient.from_url(server.url, visibility_timeout=0.3)) as orchestrator:
            await orchestrator.register(schema)
            for job in jobs:
                await orchestrator.publish(queue, job)
            backend = orchestrator.backend
            async with await backend.open_receiver(queue, prefetch=1) as receiver:
                abandoned = await receiver.get(0)  # its lease runs out: never settled
                retried = await receiver.get(0)
                assert abandoned is not None and retried is not None
                await backend.retry(retried, outgoing(orchestrator.decode(retried.body, queue)), 0.2)
                async with _raw(server.url) as raw:
                    await _fill(raw)
                    with pytest.raises(BackendError, match="OutOfMemoryError"):
                        await orchestrator.publish(queue, make_job(schema, 99))  # the server is full indeed
                    await asyncio.sleep(0.5)  # the lease ran out and the retry is due
                    consumer = _Recorder(queue)
                    consumer.connect(orchestrator)
                    # Drains on the full server: claims, acks and lease renewals all remove before they add.
                    assert await asyncio.wait_for(consumer.consume(num_messages=20, concurrency=2), 30) == 20
                    assert set(consumer.runs) == {job.id for job in jobs}
                    assert await orchestrator.count_queue_messages(queue) == 0


# -- bug 16: BUSY and MISCONF -------------------------------------------------------------------------


async def test_a_consumer_waits_out_another_clients_long_script_busy(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: BUSY (another client's script past busy-reply-threshold) killed the consumer.
    with _server("--busy-reply-threshold", "100") as server:
        schema = image_schema(queue)
        # A short lease: an idle receiver claims again every 0.3 s, so claims meet the script.
        backend = RedisClient.from_url(server.url, visibility_timeout=0.3)
        async with AsyncOrchestrator(backend) as orchestrator, _raw(server.url) as raw:
            await orchestrator.register(schema)
            consumer = _Recorder(queue)
            consumer.connect(orchestrator)
            task = await _consume_in_background(consumer)
            await orchestrator.publish(queue, make_job(schema, 0))
            await _until(lambda: len(consumer.runs) == 1, 10, "the first job")
            other = aioredis.Redis.from_url(server.url)
            busy = asyncio.create_task(other.eval("while true do end", 0))
            try:
                await asyncio.sleep(1.0)  # every claim meanwhile is answered BUSY
                assert not task.done(), "the consumer stopped on BUSY"
            finally:
                await raw.script_kill()
                with pytest.raises(ResponseError):
                    await busy
                await other.aclose()
            jobs = [make_job(schema, i) for i in range(1, 11)]
            for job in jobs:
                await orchestrator.publish(queue, job)
            await _until(lambda: len(consumer.runs) == 11, 15, "every job after the script was killed")
            await _stop(consumer, task)
    assert any("BUSY" in record.getMessage() and "retrying" in record.getMessage() for record in caplog.records)


async def test_a_consumer_waits_out_a_failed_background_save_misconf(
    queue: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: MISCONF (stop-writes-on-bgsave-error after a failed save) killed the consumer.
    # MISCONF needs save points (the helper starts servers with none) and a settable dir.
    with _server(
        "--save", "3600 1", "--stop-writes-on-bgsave-error", "yes", "--enable-protected-configs", "yes"
    ) as server:
        schema = image_schema(queue)
        async with AsyncOrchestrator(RedisClient.from_url(server.url)) as orchestrator, _raw(server.url) as raw:
            await orchestrator.register(schema)
            jobs = [make_job(schema, i) for i in range(10)]
            for job in jobs:
                await orchestrator.publish(queue, job)
            gone = tmp_path / "gone"
            gone.mkdir()
            await raw.config_set("dir", str(gone))
            gone.rmdir()  # the save cannot create its file (running as root, a mode would not stop it)
            await raw.bgsave()
            await _until_async(lambda: _last_save_failed(raw), 10, "the background save to fail")
            consumer = _Recorder(queue)
            consumer.connect(orchestrator)
            task = await _consume_in_background(consumer)
            await asyncio.sleep(1.0)  # every claim meanwhile is refused MISCONF
            assert not task.done(), "the consumer stopped on MISCONF"
            assert not consumer.runs
            await raw.config_set("dir", str(server.directory))
            await raw.bgsave()
            await _until(lambda: len(consumer.runs) == 10, 15, "every job after a good save")
            await _stop(consumer, task)
            assert set(consumer.runs) == {job.id for job in jobs}
    assert any("MISCONF" in record.getMessage() and "retrying" in record.getMessage() for record in caplog.records)


async def _last_save_failed(raw: aioredis.Redis) -> bool:
    return (await raw.info("persistence"))["rdb_last_bgsave_status"] == "err"


async def _until_async(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_purge_of_many_jobs_runs_as_bounded_script_calls(queue: str) -> None:
    # Regression: clean_queue was one script over every ready job (2-3 us each): at 1.5-3 M jobs it passed
    # the 5 s after which Redis answers BUSY to every other client. Now each call removes at most 10k.
    with _server() as server:
        async with _backend(server.url) as backend, _raw(server.url) as raw:
            await backend.declare_queue(queue)
            schema = image_schema(queue)
            total = 30_500
            for start in range(0, total, 5000):
                batch = [outgoing(make_job(schema, i)) for i in range(start, min(start + 5000, total))]
                await backend.publish_many(queue, batch)
            assert await backend.count(queue) == total
            before = await _script_calls(raw)
            assert await backend.purge(queue) == total
            calls = await _script_calls(raw) - before
            assert calls >= 4, f"{total} jobs purged in {calls} script call(s)"
            assert await backend.count(queue) == 0
            assert await raw.hlen(f"mindtrace:jobs:{{{queue}}}:bodies") == 0
            assert await raw.hlen(f"mindtrace:jobs:{{{queue}}}:deliveries") == 0


async def _script_calls(raw: aioredis.Redis) -> int:
    stats = await raw.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


async def test_deleting_a_queue_of_many_jobs_holds_the_server_briefly(queue: str) -> None:
    # delete_queue is one UNLINK: Redis frees big keys in a background thread, so it is already bounded.
    with _server("--slowlog-log-slower-than", "0", "--slowlog-max-len", "10000") as server:
        async with _backend(server.url) as backend, _raw(server.url) as raw:
            await backend.declare_queue(queue)
            schema = image_schema(queue)
            for start in range(0, 30_000, 5000):
                await backend.publish_many(queue, [outgoing(make_job(schema, i)) for i in range(start, start + 5000)])
            await raw.slowlog_reset()
            await backend.delete_queue(queue)
            entries = await raw.slowlog_get(10_000)
            unlinks = [entry for entry in entries if entry["command"].upper().startswith(b"UNLINK")]
            assert unlinks and max(entry["duration"] for entry in unlinks) < 20_000  # microseconds


# -- bug 14: a stall past operation_timeout -----------------------------------------------------------


@contextlib.asynccontextmanager
async def _stalled(server: servers.RedisServer, seconds: float) -> AsyncIterator[None]:
    """SIGSTOP the server for ``seconds`` in the background; waits for SIGCONT on exit."""
    assert server.process is not None
    pid = server.process.pid

    async def stall() -> None:
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)

    task = asyncio.create_task(stall())
    try:
        yield
    finally:
        await task


_STALL_OPTIONS: dict[str, Any] = {"operation_timeout": 1.0, "visibility_timeout": 8.0}


async def test_publishes_during_a_stall_queue_each_job_once(queue: str) -> None:
    # Regression: the driver re-sent a publish whose answer timed out, and the server ran every copy:
    # 50 publishes returned, 90 copies queued.
    with _server() as server:
        schema = image_schema(queue)
        async with AsyncOrchestrator(RedisClient.from_url(server.url, **_STALL_OPTIONS)) as orchestrator:
            await orchestrator.register(schema)
            returned: list[str] = []

            async def publisher(first: int) -> None:
                for i in range(first, first + 10):
                    job = make_job(schema, i)
                    await orchestrator.publish(queue, job)
                    returned.append(job.id)
                    await asyncio.sleep(0.05)

            publishers = [asyncio.create_task(publisher(10 * n)) for n in range(5)]
            await asyncio.sleep(0.15)
            async with _stalled(server, 3.0):
                await asyncio.gather(*publishers)
            assert len(returned) == 50
            assert await orchestrator.count_queue_messages(queue) == 50
            consumer = _Recorder(queue)
            consumer.connect(orchestrator)
            assert await asyncio.wait_for(consumer.consume(num_messages=50, concurrency=4), 20) == 50
            assert consumer.runs == Counter(returned)
            assert await orchestrator.count_queue_messages(queue) == 0


async def test_a_claim_sent_during_a_stall_leaves_no_job_leased_to_nobody(queue: str) -> None:
    # Regression: the driver re-sent a claim whose answer timed out, with the same lease token, and the
    # server ran both: the first run's job stayed leased under a token nobody held, came back when the lease
    # ended as "delivered 2 times without being settled", and was dead-lettered without having run.
    with _server() as server:
        schema = image_schema(queue)
        jobs = [make_job(schema, i) for i in range(5)]
        async with _backend(server.url, **_STALL_OPTIONS) as backend, _raw(server.url) as raw:
            await backend.declare_queue(queue)
            await backend.publish_many(queue, [outgoing(job) for job in jobs])
            async with await backend.open_receiver(queue, prefetch=1) as receiver:
                first = await receiver.get(0)  # the server knows the claim script now (no NOSCRIPT below)
                assert first is not None
                await backend.ack(first)
                async with _stalled(server, 3.0):
                    await asyncio.sleep(0.1)
                    delivery = await receiver.get(0)  # sent while the server is stopped; answered after
                assert delivery is not None and delivery.delivery_count == 1
                leases = await raw.zcard(f"mindtrace:jobs:{{{queue}}}:leases")
                assert leases == 1, f"{leases} jobs leased, one held: the others are leased to nobody"
                await backend.ack(delivery)
                rest = [await receiver.get(0) for _ in range(len(jobs) - 2)]
                assert all(each is not None and each.delivery_count == 1 for each in rest)
                taken = {_job_id(d.body) for d in [first, delivery, *rest] if d is not None}
                assert taken == {job.id for job in jobs}
                for each in rest:
                    assert each is not None
                    await backend.ack(each)
            assert await backend.count(queue) == 0


def _job_id(body: bytes) -> str:
    return str(json.loads(body)["id"])


# -- bug 15: an eviction policy that drops keys -------------------------------------------------------


async def test_a_server_that_evicts_any_key_is_refused_at_connect(queue: str) -> None:
    # Regression: with allkeys-lru, queued jobs were evicted without a word (499 of 500 when another tenant
    # filled the cache).
    with _server("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru") as server:
        backend = RedisClient.from_url(server.url)
        with pytest.raises(ConfigurationError, match="maxmemory-policy allkeys-lru") as info:
            await backend.declare_queue(queue)
        assert "noeviction" in str(info.value)
        await backend.close()


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru"])
async def test_servers_that_keep_our_keys_are_accepted(queue: str, policy: str) -> None:
    with _server("--maxmemory", "64mb", "--maxmemory-policy", policy) as server:
        async with _backend(server.url) as backend:
            await backend.declare_queue(queue)
            assert await backend.queue_exists(queue)


async def test_a_server_that_hides_its_configuration_gets_a_warning(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    with _server() as server:
        async with _raw(server.url) as raw:
            await raw.execute_command("ACL", "SETUSER", "app", "on", f">{PASSWORD}", "~*", "+@all", "-config")
        async with _backend(f"redis://app:{PASSWORD}@127.0.0.1:{server.port}/0") as backend:
            with caplog.at_level(logging.WARNING, logger="mindtrace.jobs"):
                await backend.declare_queue(queue)
    assert any("could not check the maxmemory-policy" in record.getMessage() for record in caplog.records)


# -- bug 9: a server that cannot be reached -----------------------------------------------------------


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[int]:
    """A TCP server on a free loopback port that accepts connections and never answers; yields its port."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for writer in held:
            writer.transport.abort()
        await server.wait_closed()


@contextlib.contextmanager
def _full_backlog() -> Iterator[int]:
    """A loopback listener that never accepts, its backlog filled: new SYNs are dropped (blackholed)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def _assert_unreachable_within(url: str, bound: float) -> BackendUnavailableError:
    backend = RedisClient.from_url(url)
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        await backend.connect()
    elapsed = time.monotonic() - started
    await backend.close()
    assert elapsed < bound + 1.0, f"connect gave up after {elapsed:.1f} s, bound {bound} s"
    message = str(info.value)
    assert "cannot reach redis://127.0.0.1:" in message and "attempt" in message and " s " in message, message
    return info.value


async def test_a_server_that_accepts_and_never_answers_is_unreachable_within_connect_timeout() -> None:
    # Regression: 75 s (7 attempts of 10 s each, plus backoff) before anything was raised.
    async with _silent_server() as port:
        error = await _assert_unreachable_within(f"redis://127.0.0.1:{port}/0?connect_timeout=1.5", 1.5)
    assert "TimeoutError" in str(error)


async def test_a_blackholed_proxy_is_unreachable_within_connect_timeout() -> None:
    with _server() as server, TcpProxy("127.0.0.1", server.port) as proxy:
        proxy.blackhole()
        await _assert_unreachable_within(f"redis://127.0.0.1:{proxy.port}/0?connect_timeout=1.5", 1.5)


async def test_dropped_syns_are_unreachable_within_connect_timeout() -> None:
    with _full_backlog() as port:
        await _assert_unreachable_within(f"redis://127.0.0.1:{port}/0?connect_timeout=1.5", 1.5)


async def test_the_default_connect_timeout_is_the_shared_bound() -> None:
    from mindtrace.jobs.constants import CONNECT_TIMEOUT

    assert RedisClient().connect_timeout == CONNECT_TIMEOUT
    assert RedisClient.from_url("redis://h/0?connect_timeout=2.5").connect_timeout == 2.5
    with pytest.raises(ConfigurationError):
        RedisClient.from_url("redis://h/0?connect_timeout=soon")
    with pytest.raises(ConfigurationError):
        RedisClient(connect_timeout=0)


# -- bug 8: refusals ------------------------------------------------------------------------------------


async def test_refusals_are_typed_and_name_what_was_refused(queue: str) -> None:
    with _server("--requirepass", PASSWORD) as server:
        async with _raw(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0") as raw:
            await raw.execute_command("ACL", "SETUSER", "reader", "on", ">reader-pw", "~*", "+ping", "+config|get")
        cases = {
            "credentials": f"redis://:not-{PASSWORD}@127.0.0.1:{server.port}/0",
            "database": f"redis://:{PASSWORD}@127.0.0.1:{server.port}/99",
            "permissions": f"redis://reader:reader-pw@127.0.0.1:{server.port}/0",
        }
        for refused, url in cases.items():
            backend = RedisClient.from_url(url)
            started = time.monotonic()
            with pytest.raises(BackendRefusedError) as info:
                await backend.declare_queue(queue)
            await backend.close()
            assert time.monotonic() - started < 2, f"a refusal of the {refused} is not retried"
            assert info.value.refused == refused
            assert not isinstance(info.value, BackendUnavailableError)
            assert PASSWORD not in str(info.value) and "reader-pw" not in str(info.value)
