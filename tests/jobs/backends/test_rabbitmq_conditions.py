"""RabbitMQ broker conditions, each on a node of the module's own: consumer_timeout, refusals, resource alarms.

One private node per module (a start costs about 5-8 s), with ``consumer_timeout`` of 3 s and the channel
tick (which checks it; 60 s by default on 3.10) at 0.5 s. Tests use queues of their own; the alarm test
clears its alarm whatever happens. An unreachable broker needs no node: a socket that never answers does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from mindtrace.jobs import (
    AsyncConsumer,
    AsyncOrchestrator,
    BackendRefusedError,
    BackendUnavailableError,
    Job,
    LeaseLostError,
    PublishError,
    RabbitMQClient,
)
from mindtrace.jobs.backends.rabbitmq.compat import _AIORMQ_6
from mindtrace.jobs.constants import CONNECT_TIMEOUT
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support import servers

CONSUMER_TIMEOUT_MS = 3000
SECRET = "n0t-the-Pa55word"


@pytest.fixture(scope="module")
def node() -> Iterator[servers.RabbitMQNode]:
    """A RabbitMQ node of this module's own, with a 3 s consumer_timeout checked every 0.5 s."""
    if servers.rabbitmq_server_command() is None:
        if servers.IN_CI:
            pytest.fail("CI=true: rabbitmq-server is not installed")
        pytest.skip("rabbitmq-server is not installed")
    started = servers.RabbitMQNode(
        config=(f"consumer_timeout = {CONSUMER_TIMEOUT_MS}",),
        erl_args=("-rabbit channel_tick_interval 500",),
    ).start()
    try:
        started.ctl("add_user", "nobody", "nobody-pw")  # a user with no permissions on any vhost
        started.ctl("add_vhost", "jobs")
        yield started
    finally:
        started.cleanup()


@pytest.fixture
async def orchestrator(node: servers.RabbitMQNode) -> AsyncIterator[AsyncOrchestrator]:
    async with AsyncOrchestrator(RabbitMQClient.from_url(node.url, operation_timeout=2)) as opened:
        yield opened


@pytest.fixture
async def recordless(node: servers.RabbitMQNode) -> AsyncIterator[AsyncOrchestrator]:
    """An orchestrator that keeps no job records (``state=False``): its RabbitMQ store's writes are publishes,
    which a resource alarm blocks like any other (see the README), and these tests are about the broker's."""
    async with AsyncOrchestrator(RabbitMQClient.from_url(node.url, operation_timeout=2), state=False) as opened:
        yield opened


def consumer_of(queue: str, handler: Callable[[Job], Any], **options: Any) -> AsyncConsumer:
    class _Consumer(AsyncConsumer):
        async def run(self, job: Job) -> Any:
            return await handler(job)

    return _Consumer(queue, **options)


async def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    """Wait (by polling, in a test only) until ``condition()`` holds; it may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# -- consumer_timeout (bug 7) and the job id of a lost lease (bug 21) -------------------------------------


async def test_a_job_over_consumer_timeout_is_named_and_requeues_only_itself(
    orchestrator: AsyncOrchestrator, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    schema = image_schema(queue)
    await orchestrator.register(schema)
    slow = make_job(schema, 0, priority=9)
    quick = [make_job(schema, i) for i in range(1, 41)]
    await orchestrator.publish(queue, slow)
    await orchestrator.publish_many(queue, quick)
    runs: Counter[str] = Counter()

    async def handler(job: Job) -> None:
        runs[job.id] += 1
        # The slow job overruns consumer_timeout on its first run; the quick ones keep the other two slots busy
        # (40 x 0.15 s on 2 slots: about 3 s), so that two of them are unacked when the broker acts.
        await asyncio.sleep(CONSUMER_TIMEOUT_MS / 1000 + 2 if job.id == slow.id and job.attempts == 0 else 0.15)

    consumer = consumer_of(queue, handler, max_retries=3)
    consumer.connect(orchestrator)
    with caplog.at_level(logging.WARNING, logger="mindtrace.jobs"):
        task = asyncio.create_task(consumer.consume(concurrency=3))
        try:
            await wait_until(lambda: runs[slow.id] == 2 and all(runs[job.id] for job in quick), 20, "every job")
            await wait_until(lambda: "LeaseLostError" in caplog.text or "lease on job" in caplog.text, 10, "late ack")
        finally:
            consumer.stop()
            await asyncio.wait_for(task, 15)
    # Only the overrunning job went back to the queue; none of the jobs running next to it ran twice.
    assert [job.id for job in quick if runs[job.id] != 1] == []
    assert runs[slow.id] == 2
    named = [r for r in caplog.records if r.levelno == logging.ERROR and "consumer_timeout" in r.getMessage()]
    assert len(named) == 1, caplog.text
    message = named[0].getMessage()
    assert "PRECONDITION_FAILED" in message and queue in message and slow.id in message
    # Its late ack was refused, naming the job.
    assert f"lease on job {slow.id!r}" in caplog.text
    assert await orchestrator.count_queue_messages(queue + ".dlq") == 0


async def test_a_lost_lease_names_the_job(orchestrator: AsyncOrchestrator, queue: str) -> None:
    schema = image_schema(queue)
    await orchestrator.register(schema)
    job = make_job(schema, 1)
    await orchestrator.publish(queue, job)
    backend = orchestrator.backend
    async with await backend.open_receiver(queue) as receiver:
        delivery = await receiver.get(5)
        assert delivery is not None
        await delivery.handle.channel.close()  # the broker takes the message back, as at a consumer_timeout
        with pytest.raises(LeaseLostError) as info:
            await backend.ack(delivery)
    assert info.value.job_id == job.id and job.id in str(info.value)
    assert await orchestrator.count_queue_messages(queue) == 1


# -- refusals (bug 8) --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credentials", "vhost", "refused", "named"),
    [
        (f"guest:{SECRET}", "", "credentials", "user 'guest'"),
        ("guest:guest", "no-such-vhost", "vhost", "vhost 'no-such-vhost' does not exist"),
        ("nobody:nobody-pw", "jobs", "permissions", "user 'nobody' has no permissions on vhost 'jobs'"),
    ],
)
async def test_a_broker_that_refuses_raises_a_refusal_naming_what_it_refused(
    node: servers.RabbitMQNode, credentials: str, vhost: str, refused: str, named: str
) -> None:
    client = RabbitMQClient.from_url(f"amqp://{credentials}@127.0.0.1:{node.port}/{vhost}")
    try:
        started = time.monotonic()
        with pytest.raises(BackendRefusedError) as info:
            await client.connect()
        assert time.monotonic() - started < 2  # answered at once, not waited out
    finally:
        await client.close()
    assert not isinstance(info.value, BackendUnavailableError)
    assert info.value.refused == refused
    assert named in str(info.value), str(info.value)
    assert info.value.reason  # the broker's own words
    error: BaseException | None = info.value
    while error is not None:
        assert SECRET not in f"{error!s} {error!r}"
        error = error.__cause__ or error.__context__


# -- an unreachable broker (bug 9) -------------------------------------------------------------------------


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A loopback port that accepts TCP connections (the kernel's backlog) and never sends a byte."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


@pytest.mark.xfail(
    _AIORMQ_6,
    strict=True,
    reason="aiormq 6 (Python 3.10): its connect does not end when cancelled, so connect_timeout cannot bound it",
)
@pytest.mark.timeout(15 if _AIORMQ_6 else 60)
async def test_a_broker_that_never_answers_is_unavailable_within_connect_timeout() -> None:
    with silent_server() as port:
        client = RabbitMQClient("127.0.0.1", port, connect_timeout=0.5)
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailableError) as info:
                await client.connect()
            elapsed = time.monotonic() - started
        finally:
            await client.close()
    assert 0.4 < elapsed < 2, elapsed
    text = str(info.value)
    assert f"127.0.0.1:{port}" in text and "connect_timeout=0.5s" in text and "login as 'guest'" in text, text


async def test_a_closed_port_is_unavailable_at_once_saying_why() -> None:
    port = servers.free_port()
    client = RabbitMQClient.from_url(f"amqp://guest:guest@127.0.0.1:{port}/?connect_timeout=5")
    assert client.connect_timeout == 5
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError) as info:
            await client.connect()
        assert time.monotonic() - started < 2
    finally:
        await client.close()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "Error" in str(info.value).split("):")[-1], str(info.value)  # the cause, not an empty detail
    assert RabbitMQClient("h").connect_timeout == CONNECT_TIMEOUT


# -- resource alarms (bugs 17 and 18) ----------------------------------------------------------------------


@contextlib.contextmanager
def memory_alarm(node: servers.RabbitMQNode) -> Iterator[None]:
    """A memory alarm on ``node`` for the block's duration."""
    node.ctl("set_vm_memory_high_watermark", "0.0000001")
    try:
        yield
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")


@pytest.mark.xfail(
    _AIORMQ_6,
    strict=True,
    reason="aiormq 6 (Python 3.10): the connection's blocked/unblocked notices are not reachable, so errors "
    "during an alarm cannot name it",
)
async def test_a_consumer_acks_through_a_memory_alarm_and_errors_say_the_broker_is_blocked(
    node: servers.RabbitMQNode, recordless: AsyncOrchestrator, queue: str
) -> None:
    orchestrator = recordless
    schema = image_schema(queue)
    await orchestrator.register(schema)
    queued = [make_job(schema, i) for i in range(10)]
    await orchestrator.publish_many(queue, queued)
    ran: list[str] = []

    async def handler(job: Job) -> None:
        ran.append(job.id)

    with memory_alarm(node):
        await asyncio.sleep(0.5)  # the node notices its alarm
        late = make_job(schema, 99)
        # A publish blocks the connection it goes out on (the broker stops reading from it) ...
        publishing = asyncio.create_task(orchestrator.publish(queue, late))
        await asyncio.sleep(0.2)
        # ... yet a consumer of the same client still runs and acks the jobs already queued,
        consumer = consumer_of(queue, handler)
        consumer.connect(orchestrator)
        assert await asyncio.wait_for(consumer.consume(num_messages=10, concurrency=2), 10) == 10
        assert sorted(ran) == sorted(job.id for job in queued)
        # counting works (the broker is up; the blocked job is not queued yet),
        assert await orchestrator.count_queue_messages(queue) == 0
        # and the publish that gave up says the broker blocked it and that the job may have been queued.
        with pytest.raises(PublishError) as info:
            await publishing
        text = str(info.value)
        assert "resource alarm" in text and "low on memory" in text and "may have been queued" in text, text
    # Once the alarm clears, the publish that raised turns out to have been queued.
    await wait_until(lambda: orchestrator.count_queue_messages(queue), 15, "the blocked publish")
    received = await orchestrator.receive_message(queue, timeout=5)
    assert received is not None and received.id == late.id
