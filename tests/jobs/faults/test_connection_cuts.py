"""Connections cut, stalled or slowed by a loopback proxy: no published job lost, clients recover by themselves.

The machine's brokers sit behind tests.jobs.support.proxy.TcpProxy; every client of a scenario (the test's
publishers, consumer processes) connects through it. A last test closes the RabbitMQ driver's connection
from inside, mid channel open, where a cut cannot aim. Sizes: ``MINDTRACE_JOBS_SOAK_JOBS`` jobs (600) and
``MINDTRACE_JOBS_SOAK_KILLS`` cuts (5).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiormq.exceptions import AMQPConnectionError

from mindtrace.jobs import AsyncOrchestrator, RabbitMQClient, from_url
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.faults.conftest import SOAK_JOBS, SOAK_KILLS, Workers
from tests.jobs.faults.stream import (
    FAULT_ERRORS,
    Publishers,
    RunCounter,
    drain_and_check,
    duplicates_by_fault,
    first_after,
    publish_until_returned,
    wait_for_event,
    wait_until_run,
)
from tests.jobs.support import servers
from tests.jobs.support.ledger import Ledger
from tests.jobs.support.proxy import TcpProxy, is_loopback, target_of

CUTS = SOAK_KILLS
CONSUMERS = 2
CONCURRENCY = 4

#: Client options for the stall and latency scenarios, by URL scheme: answers are awaited 1 s, and a
#: RabbitMQ connection that misses heartbeats for about 2 s is declared dead.
_REDIS_FAST: dict[str, Any] = {"operation_timeout": 1.0, "connection_retries": 1, "visibility_timeout": 2.0}
_AMQP_FAST: dict[str, Any] = {"operation_timeout": 1.0, "heartbeat": 1, "reconnect_interval": 0.2}
FAST_DETECTION = {"redis": _REDIS_FAST, "rediss": _REDIS_FAST, "amqp": _AMQP_FAST, "amqps": _AMQP_FAST}
#: How long the stalled broker stays silent: several heartbeats and operation timeouts.
STALL_SECONDS = 3.0
#: Latency the slow link adds in each direction (a round trip gains twice this).
LATENCY = 0.05


@pytest.fixture
def proxy(fault_url: str) -> Iterator[TcpProxy]:
    """A proxy in front of the broker under test (which must be on a loopback address)."""
    host, port = target_of(fault_url)
    if not is_loopback(host):
        message = f"the broker at {host} is not on a loopback address, which the proxy needs"
        if servers.IN_CI:
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    with TcpProxy(host, port) as started:
        yield started


def _fast_detection(url: str) -> dict[str, Any]:
    return FAST_DETECTION[url.split(":", 1)[0].lower()]


async def _wait_connected(proxy: TcpProxy, clients: int, timeout: float = 20) -> None:
    """Wait until at least ``clients`` connections are open through ``proxy`` (each client has one at least)."""
    deadline = time.monotonic() + timeout
    while proxy.connections < clients:
        assert time.monotonic() < deadline, f"only {proxy.connections} of {clients} clients reconnected"
        await asyncio.sleep(0.02)


async def test_cut_connections_lose_no_published_job(
    fault_url: str, queue: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path / "ledger")
    workers = Workers(proxy.via(fault_url), queue, ledger.path)
    cuts: list[tuple[float, int]] = []  # (when, connections cut)
    try:
        async with AsyncOrchestrator(from_url(proxy.via(fault_url))) as orchestrator:
            schema = image_schema(queue)
            await orchestrator.register(schema)
            for _ in range(CONSUMERS):
                await asyncio.to_thread(workers.start, "--concurrency", str(CONCURRENCY), "--job-seconds", "0.02")
            publishers = Publishers(orchestrator, schema, ledger, SOAK_JOBS, hold=True)
            publishing = asyncio.create_task(publishers.run())
            try:
                for n in range(1, CUTS + 1):
                    await publishers.wait_published(SOAK_JOBS * n // (CUTS + 1))
                    await _wait_connected(proxy, 1 + CONSUMERS)
                    cut_at = time.time()
                    cuts.append((cut_at, proxy.cut()))
                    # The publisher and every consumer come back by themselves before the next cut.
                    await wait_for_event(ledger, "published", after=cut_at, timeout=20)
                    for proc in workers.processes:
                        await wait_for_event(ledger, "started", after=cut_at, timeout=20, pid=proc.pid)
                publishers.release()
                await publishing
            finally:
                publishing.cancel()
                await asyncio.gather(publishing, return_exceptions=True)
            accounts, alive = await drain_and_check(orchestrator, queue, ledger, workers, SOAK_JOBS)
    finally:
        workers.stop_all()
        ledger.close()

    # Each cut dropped the publisher's and every consumer's connections (all had reconnected since the last).
    assert all(count >= 1 + CONSUMERS for _, count in cuts), cuts
    assert not accounts.lost, accounts.summary()
    assert accounts.unexpected <= publishers.failed, accounts.summary()
    assert all(alive), "a consumer process died"
    for proc in workers.processes:
        assert first_after(accounts, "started", cuts[-1][0], proc.pid) is not None, f"{proc.pid} never resumed"
    # A job runs twice only across a cut: in flight on a consumer (ack lost), or published twice (a command
    # the server ran whose reply the cut lost, sent again).
    unexplained, *by_cut = duplicates_by_fault(accounts, [at for at, _ in cuts])
    assert unexplained == 0, f"{unexplained} job(s) ran twice before any cut: {accounts.summary()}"
    assert len(accounts.duplicated) <= CUTS * (CONSUMERS * CONCURRENCY + publishers.count), accounts.summary()
    print(
        f"\n[cuts] {fault_url.split(':')[0]}: {accounts.summary()} cuts={len(cuts)} "
        f"connections_cut={[count for _, count in cuts]} duplicated_by_cut={by_cut} "
        f"publish_errors={dict(publishers.errors)}"
    )


async def test_a_stalled_broker_is_detected_and_the_client_recovers(
    fault_url: str, queue: str, proxy: TcpProxy
) -> None:
    runs: Counter[str] = Counter()
    returned: set[str] = set()
    failed: set[str] = set()
    schema = image_schema(queue)
    async with AsyncOrchestrator(from_url(proxy.via(fault_url), **_fast_detection(fault_url))) as orchestrator:
        await orchestrator.register(schema)
        consumer = RunCounter(queue, runs)
        consumer.connect(orchestrator)
        consuming = asyncio.create_task(consumer.consume(concurrency=2))
        try:
            for i in range(5):
                returned.add(await orchestrator.publish(queue, make_job(schema, i)))
            await wait_until_run(runs, returned, 10)

            proxy.blackhole()  # the broker stops answering; no connection is closed
            stalled_at = time.monotonic()
            job = make_job(schema, 100)
            failed.add(job.id)
            with pytest.raises(FAULT_ERRORS):
                await orchestrator.publish(queue, job)
            detected = time.monotonic() - stalled_at
            await asyncio.sleep(max(0.0, STALL_SECONDS - detected))

            proxy.blackhole(False)  # answering again, over the same connections: no cut helps the client
            resumed_at = time.monotonic()
            returned.add(await publish_until_returned(orchestrator, schema, 200, failed))
            recovered = time.monotonic() - resumed_at
            for i in range(400, 405):
                returned.add(await orchestrator.publish(queue, make_job(schema, i)))
            await wait_until_run(runs, returned, 20)
            ran_after = time.monotonic() - resumed_at
            assert not consuming.done(), "the consumer gave up"
        finally:
            consumer.stop()
            await asyncio.wait_for(consuming, 15)
        await orchestrator.delete_queue(queue)

    assert detected < 4.0, f"the stall took {detected:.1f}s to surface"
    assert set(runs) - returned <= failed, "a job ran that was never published"
    print(
        f"\n[stall] {fault_url.split(':')[0]}: error after {detected:.1f}s, publish again {recovered:.1f}s and "
        f"all jobs run {ran_after:.1f}s after the broker answered again; runs={sum(runs.values())} "
        f"jobs={len(runs)} connections={proxy.accepted}"
    )


async def test_a_slow_link_is_slow_but_never_fails(fault_url: str, queue: str, proxy: TcpProxy) -> None:
    proxy.slow(LATENCY)  # each round trip takes 2 * LATENCY longer: well under the 1 s operation timeout
    runs: Counter[str] = Counter()
    schema = image_schema(queue)
    async with AsyncOrchestrator(from_url(proxy.via(fault_url), **_fast_detection(fault_url))) as orchestrator:
        await orchestrator.register(schema)
        consumer = RunCounter(queue, runs)
        consumer.connect(orchestrator)
        consuming = asyncio.create_task(consumer.consume(num_messages=8, concurrency=4))

        async def timed_publish(index: int) -> tuple[str, float]:
            started = time.monotonic()
            job_id = await orchestrator.publish(queue, make_job(schema, index))
            return job_id, time.monotonic() - started

        await orchestrator.publish(queue, make_job(schema, 0))  # opens the publishing channel on RabbitMQ
        timed = await asyncio.gather(*(timed_publish(i) for i in range(1, 8)))
        published, times = {job_id for job_id, _ in timed}, [seconds for _, seconds in timed]
        assert await asyncio.wait_for(consuming, 20) == 8
        await orchestrator.delete_queue(queue)
    assert min(times) >= 2 * LATENCY * 0.9, f"the link was not slow: publishes took {times}"
    assert len(runs) == 8 and set(runs.values()) == {1} and published <= set(runs), runs
    print(f"\n[slow] {fault_url.split(':')[0]}: publish took {min(times):.2f}-{max(times):.2f}s at {LATENCY}s latency")


async def test_rabbitmq_a_connection_closing_under_a_channel_open_is_a_typed_error(amqp_url: str, queue: str) -> None:
    """Regression: a connection that closed while a publish opened its channel leaked the driver's untyped
    errors (``RuntimeError("<Connection ...> closed")``, a bare ``Exception``) out of ``publish``.

    The driver's connection is closed from inside (as its reader does when the broker goes away), and the
    publish lands at a different step of that close each round.
    """
    schema = image_schema(queue)
    outcomes: Counter[str] = Counter()
    for pause in range(12):
        client = RabbitMQClient.from_url(amqp_url, reconnect_interval=0.05)
        async with AsyncOrchestrator(client) as orchestrator:
            await orchestrator.register(schema)
            await orchestrator.publish(queue, make_job(schema, 0))
            assert client._channels.publish_channel is not None and client._channels.connection is not None
            await client._channels.publish_channel.close()  # so that the next publish opens a channel
            transport = client._channels.connection.transport
            assert transport is not None
            closing = asyncio.ensure_future(transport.connection.close(AMQPConnectionError("connection lost (test)")))
            for _ in range(pause):
                await asyncio.sleep(0)
            try:
                await orchestrator.publish(queue, make_job(schema, 1))
                outcomes["returned"] += 1
            except FAULT_ERRORS as exc:  # anything else fails the test
                outcomes[type(exc).__name__] += 1
            await asyncio.gather(closing, return_exceptions=True)
            await publish_until_returned(orchestrator, schema, 100, set())  # and the client recovers
            if pause == 11:
                await orchestrator.delete_queue(queue)
    assert sum(outcomes.values()) == 12, outcomes
