"""RabbitMQ's delay chain: the level decomposition, delays across levels and retries on time, arrivals for a
deleted queue kept in the unroutable queue, and a delayed job across a restart of a node of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import time
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest

from mindtrace.jobs import RabbitMQClient
from mindtrace.jobs.backends.base import Delivery, OutgoingMessage, validate_queue_name
from mindtrace.jobs.backends.rabbitmq import delays
from mindtrace.jobs.constants import MAX_DELAY, MAX_QUEUE_NAME_LENGTH
from mindtrace.jobs.errors import InvalidQueueNameError, QueueNotFoundError
from tests.jobs.support import servers

#: As in the conformance suite: how late a delayed job may arrive on a noisy shared machine.
LATENESS = 0.5
#: How early it may seem to arrive (the broker's clock against ours, and ms rounding).
EARLY = 0.003


# -- the decomposition, walked through the declared topology ----------------------------------------------


def _topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


def _walk(ms: int, queue: str, start: str) -> tuple[list[str], int]:
    """The chain queues a message delayed ``ms`` for ``queue``, published to ``start``, waits in, and the ms it
    waits, following the bindings and dead-letter exchanges ``delays.chain()`` declares; ends at
    DELIVER_EXCHANGE's binding of ``queue``."""
    parts = list(delays.chain())
    exchanges = {p.name: p for p in parts if isinstance(p, delays.Exchange)}
    queues = {p.name: p for p in parts if isinstance(p, delays.Queue)}
    bindings = [p for p in parts if isinstance(p, delays.Binding)]
    key = delays.routing_key(ms, queue)
    visited: list[str] = []
    waited = 0
    exchange = start
    while exchange != delays.DELIVER_EXCHANGE:
        kind = exchanges[exchange].kind
        routes = [b for b in bindings if b.source == exchange and (kind == "fanout" or _topic_match(b.pattern, key))]
        assert len(routes) == 1, (exchange, key, routes)
        route = routes[0]
        if route.to_exchange:
            exchange = route.destination
            continue
        waiting = queues[route.destination]
        assert waiting.ttl_ms is not None and waiting.dead_letter_exchange is not None
        visited.append(waiting.name)
        waited += waiting.ttl_ms
        exchange = waiting.dead_letter_exchange
    assert _topic_match(delays.delivery_pattern(queue), key)
    assert not _topic_match(delays.delivery_pattern(queue + "x"), key)
    return visited, waited


@pytest.mark.parametrize(
    "ms",
    [
        *(1, 2, 3, 255, 1000, 1023, 86_400_000, delays.ROUND_MS - 1, delays.ROUND_MS, delays.ROUND_MS + 1),
        *(int(MAX_DELAY * 1000), delays.MAX_DELAY_MS),
        *random.Random(5).sample(range(1, delays.MAX_DELAY_MS), 20),
    ],
)
def test_a_delay_waits_once_in_the_level_of_each_set_bit_and_sums_to_the_ms(ms: int) -> None:
    visited, waited = _walk(ms, "orders.dlq", delays.ENTRY_EXCHANGE)
    assert waited == ms
    assert _walk(ms, "orders.dlq", delays.first_exchange(ms)) == (visited, waited)  # where publishes go
    rounds, rest = divmod(ms, delays.ROUND_MS)
    expected = [delays.round_queue(n) for n in range(rounds, 0, -1)]
    expected += [delays.level_queue(k) for k in reversed(range(delays.LEVELS)) if rest >> k & 1]
    assert visited == expected  # highest first, each queue at most once (no dead-letter cycle)


def test_the_chain_spans_max_delay_within_the_brokers_ttl_limit_and_keys_fit_an_amqp_short_string() -> None:
    assert delays.MAX_DELAY_MS >= MAX_DELAY * 1000
    ttls = [p.ttl_ms for p in delays.chain() if isinstance(p, delays.Queue) and p.ttl_ms is not None]
    assert max(ttls) <= 2**32 - 1  # the broker's x-message-ttl ceiling (Erlang's timer limit)
    assert len(delays.routing_key(delays.MAX_DELAY_MS, "q" * MAX_QUEUE_NAME_LENGTH)) <= 255
    assert delays.delay_ms(0.0004) == 1 and delays.delay_ms(0.001) == 1 and delays.delay_ms(0.0011) == 2
    assert delays.delay_ms(10 * MAX_DELAY) == delays.MAX_DELAY_MS
    # The chain's queues can be no user's queue.
    for part in delays.chain():
        if isinstance(part, delays.Queue):
            with pytest.raises(InvalidQueueNameError):
                validate_queue_name(part.name)


# -- on a broker ----------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def client_with(url: str, *queues: str) -> AsyncIterator[RabbitMQClient]:
    """A connected client with ``queues`` declared; deletes them afterwards."""
    backend = RabbitMQClient.from_url(url)
    await backend.connect()
    try:
        for name in queues:
            await backend.declare_queue(name)
        yield backend
    finally:
        for name in queues:
            with contextlib.suppress(Exception):
                await backend.delete_queue(name)
        await backend.close()


def message(job_id: str, delay: float = 0.0, priority: int = 0) -> OutgoingMessage:
    """A (non-job) message to publish straight to a backend."""
    return OutgoingMessage(job_id.encode(), priority, job_id, delay=delay)


async def arrivals(
    backend: RabbitMQClient, queue: str, count: int, timeout: float
) -> dict[str, tuple[float, Delivery]]:
    """Receive ``count`` messages from ``queue`` (acking each): when each arrived and its delivery, by body."""
    arrived: dict[str, tuple[float, Delivery]] = {}
    deadline = time.monotonic() + timeout
    async with await backend.open_receiver(queue, prefetch=16) as receiver:
        while len(arrived) < count:
            delivery = await receiver.get(max(0.01, deadline - time.monotonic()))
            assert delivery is not None, f"{len(arrived)} of {count} arrived in {timeout}s"
            arrived[delivery.body.decode()] = (time.time(), delivery)
            await backend.ack(delivery)
    return arrived


async def test_delays_spanning_many_levels_arrive_on_time_with_their_priority(amqp_url: str, queue: str) -> None:
    chosen = [0.001, 0.255, 0.512, 1.023, 1.5, 2.047]  # 1 to 11 levels each
    async with client_with(amqp_url, queue) as backend:
        due: dict[str, float] = {}
        for i, delay in enumerate(reversed(chosen)):
            sent = time.time()
            await backend.publish(queue, message(f"d{i}", delay, priority=i % 10))
            due[f"d{i}"] = sent + delay
        assert await backend.count(queue) == 0 or min(chosen) < 0.01  # the 1 ms one may be there already
        got = await arrivals(backend, queue, len(chosen), timeout=10)
    for name, (at, delivery) in got.items():
        assert due[name] - EARLY <= at <= due[name] + LATENESS, (name, at - due[name])
        assert delivery.priority == int(name[1:]) % 10


async def test_a_retry_waits_exactly_its_delay_level_by_level(amqp_url: str, queue: str) -> None:
    async with client_with(amqp_url, queue) as backend:
        await backend.publish(queue, message("r"))
        async with await backend.open_receiver(queue) as receiver:
            first = await receiver.get(5)
            assert first is not None
            retried_at = time.time()
            await backend.retry(first, message("r"), 0.300)  # 300 ms = 256 + 32 + 8 + 4
            again = await receiver.get(5)
            arrived = time.time()
            assert again is not None
            headers = again.handle.headers
            await backend.ack(again)
    assert 0.300 - EARLY <= arrived - retried_at <= 0.300 + LATENESS
    passed = [entry["queue"] for entry in headers["x-death"]]
    assert sorted(passed) == sorted(delays.level_queue(k) for k in (8, 5, 3, 2))
    assert headers[delays.QUEUE_HEADER] == queue
    assert abs(headers[delays.DUE_HEADER] / 1000 - (retried_at + 0.3)) < 0.1


async def test_a_delayed_publish_to_a_missing_queue_is_refused(amqp_url: str, queue: str) -> None:
    async with client_with(amqp_url) as backend:
        with pytest.raises(QueueNotFoundError):
            await backend.publish(queue, message("m", 0.5))


async def _take_unroutable(url: str, queue: str, timeout: float) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take (ack) the messages for ``queue`` from the shared unroutable queue, waiting up to ``timeout``; the
    others' go back when the channel closes."""
    found: list[aio_pika.abc.AbstractIncomingMessage] = []
    connection = await aio_pika.connect(url, timeout=10)
    try:
        deadline = time.monotonic() + timeout
        while not found and time.monotonic() < deadline:
            channel = await connection.channel()
            source = await channel.get_queue(delays.UNROUTABLE_QUEUE, ensure=False)
            for _ in range(10_000):
                incoming = await source.get(no_ack=False, fail=False, timeout=10)
                if incoming is None:
                    break
                if (incoming.headers or {}).get(delays.QUEUE_HEADER) == queue:
                    await incoming.ack()
                    found.append(incoming)
            await channel.close()
            if not found:
                await asyncio.sleep(0.1)
    finally:
        await connection.close()
    return found


async def test_a_job_due_for_a_deleted_queue_lands_in_the_unroutable_queue(amqp_url: str, queue: str) -> None:
    async with client_with(amqp_url, queue) as backend:
        await backend.publish(queue, message("orphan", 0.4))
        await backend.delete_queue(queue)
        found = await _take_unroutable(amqp_url, queue, timeout=5)
    assert [m.body for m in found] == [b"orphan"]
    assert found[0].delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_a_queue_deleted_and_declared_again_by_another_client_takes_delayed_jobs(
    amqp_url: str, queue: str
) -> None:
    async with client_with(amqp_url, queue) as publisher, client_with(amqp_url) as other:
        await publisher.publish(queue, message("before", 0.05))  # binds the queue (and remembers it did)
        assert set(await arrivals(publisher, queue, 1, timeout=5)) == {"before"}
        await other.delete_queue(queue)
        await other.declare_queue(queue)  # binds it to the chain's exit again
        await publisher.publish(queue, message("after", 0.05))
        assert set(await arrivals(publisher, queue, 1, timeout=5)) == {"after"}


async def test_purge_leaves_delayed_jobs_to_arrive_when_due(amqp_url: str, queue: str) -> None:
    async with client_with(amqp_url, queue) as backend:
        await backend.publish(queue, message("ready"))
        await backend.publish(queue, message("later", 0.3))
        assert await backend.purge(queue) == 1
        assert set(await arrivals(backend, queue, 1, timeout=5)) == {"later"}


# -- across a restart, on a node of the test's own --------------------------------------------------------------


@pytest.fixture
def node() -> Iterator[servers.RabbitMQNode]:
    """A RabbitMQ node this test may restart."""
    if servers.rabbitmq_server_command() is None or shutil.which("erl") is None:
        if servers.IN_CI:
            pytest.fail("CI=true: rabbitmq-server is not installed")
        pytest.skip("rabbitmq-server is not installed")
    started = servers.RabbitMQNode().start()
    try:
        yield started
    finally:
        started.cleanup()


async def test_a_delayed_job_survives_a_broker_restart_and_arrives_on_time(
    node: servers.RabbitMQNode, queue: str
) -> None:
    delay = 15.0  # longer than a restart (about 5 s to stop and 5 s to start)
    backend = RabbitMQClient.from_url(node.url)
    try:
        await backend.declare_queue(queue)
        sent = time.time()
        await backend.publish(queue, message("survivor", delay))
        await backend.publish(queue, message("short", 0.2))
        assert set(await arrivals(backend, queue, 1, timeout=5)) == {"short"}
    finally:
        await backend.close()
    await asyncio.to_thread(node.restart)
    assert time.time() < sent + delay, "the restart took longer than the delay: raise it"
    backend = RabbitMQClient.from_url(node.url)
    try:
        assert await backend.count(queue) == 0
        got = await arrivals(backend, queue, 1, timeout=delay + 10)
    finally:
        with contextlib.suppress(Exception):
            await backend.delete_queue(queue)
        await backend.close()
    at, _ = got["survivor"]
    assert sent + delay - EARLY <= at <= sent + delay + 2 * LATENESS, at - (sent + delay)
