"""RabbitMQScheduleStore on a real broker: the stream folded by every store, the lock queue, a leader killed."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from mindtrace.jobs import AsyncOrchestrator, ConfigurationError, JobInput, JobSchema, RabbitMQClient, job_from_schema
from mindtrace.jobs.backends.rabbitmq import schedules
from mindtrace.jobs.backends.rabbitmq.schedules import RabbitMQScheduleStore
from mindtrace.jobs.schedules import ScheduleSpec
from tests.jobs.support import servers

ROOT = Path(__file__).resolve().parents[3]


class In(JobInput):
    """The input of the scheduled test job."""

    x: int = 1


@pytest.fixture
def namespaced_url(amqp_url: str) -> Iterator[str]:
    """The shared broker's URL with a schedules namespace of this test's own: no other process (another test, a
    CI lane on another Python) leads or fires its schedules. Its stream is deleted afterwards."""
    namespace = f"mindtrace-test-{uuid.uuid4().hex[:12]}"
    yield servers.namespaced(amqp_url, namespace)
    asyncio.run(servers.delete_schedules_stream(amqp_url, namespace))


@contextlib.asynccontextmanager
async def stores(url: str, count: int) -> AsyncIterator[list[RabbitMQScheduleStore]]:
    """``count`` schedule stores, each of a client of its own (as separate processes would have)."""
    clients = [RabbitMQClient.from_url(url) for _ in range(count)]
    try:
        yield [client.schedule_store() for client in clients]
    finally:
        for client in clients:
            await client.close()


def spec_named(name: str, every_ms: int = 60_000, anchor_ms: int = 0) -> ScheduleSpec:
    """A schedule of ``name`` (its queue and job are never used by a store)."""
    return ScheduleSpec(name=name, queue="unused", job="{}", every_ms=every_ms, anchor_ms=anchor_ms)


def unique(prefix: str) -> str:
    """A schedule or queue name no other test or run uses."""
    return f"test-{prefix}-{uuid.uuid4().hex[:12]}"


async def named(store: RabbitMQScheduleStore, name: str) -> list[tuple[ScheduleSpec, int | None]]:
    """What ``store.load()`` has under ``name``."""
    return [(state.spec, state.cursor_ms) for state in await store.load() if state.spec.name == name]


# -- (1) the stream, folded by every store ------------------------------------------------------------------


async def test_an_upsert_in_one_store_is_loaded_by_another_and_a_remove_is_seen_there_too(namespaced_url: str) -> None:
    name = unique("shared")
    async with stores(namespaced_url, 2) as (first, second):
        await second.load()  # following the stream already: the put arrives live
        second.changed.clear()
        now = await first.now_ms()
        stored = await first.upsert(spec_named(name), now)
        assert stored == spec_named(name)
        [(spec, cursor)] = await named(second, name)
        assert spec == stored
        assert cursor is not None and cursor >= now  # no fire from before the upsert is owed
        await asyncio.wait_for(second.changed.wait(), 5)  # another process's put wakes a scheduler here

        assert await first.remove(name) is True
        assert await named(second, name) == []
        assert await second.remove(name) is False  # gone already
        assert await second.advance(spec, cursor, cursor + 60_000) is False  # a removed schedule never moves


async def test_the_same_spec_upserted_again_is_a_no_op_and_a_changed_one_replaces_it(namespaced_url: str) -> None:
    name = unique("same")
    async with stores(namespaced_url, 2) as (first, second):
        try:
            stored = await first.upsert(spec_named(name), await first.now_ms())
            await second.load()
            version = second._fold.version(name)
            assert version is not None
            # The same schedule with another anchor: the stored one comes back, and no put is written.
            again = await second.upsert(spec_named(name, anchor_ms=12345), await second.now_ms())
            assert again == stored and again.anchor_ms == 0
            await first.load()
            assert first._fold.version(name) == version
            assert second._fold.version(name) == version

            changed = await second.upsert(spec_named(name, every_ms=30_000), await second.now_ms())
            assert changed.every_ms == 30_000
            [(spec, _)] = await named(first, name)
            assert spec == changed
            newer = first._fold.version(name)
            assert newer is not None and newer > version
        finally:
            await first.remove(name)


async def test_the_fold_ignores_order_an_old_put_or_a_stale_snapshot_never_brings_a_removed_schedule_back(
    namespaced_url: str,
) -> None:
    name = unique("order")
    async with stores(namespaced_url, 2) as (first, second):
        await first.upsert(spec_named(name), await first.now_ms())
        await first.load()
        version = first._fold.version(name)
        assert version is not None
        stale = first._fold.snapshot()
        assert await first.remove(name) is True
        # Written after the tombstone, older than it: a put replayed late, and a snapshot from before the remove.
        old_put = {"op": "put", "name": name, "v": list(version), "spec": spec_named(name).model_dump(mode="json")}
        await first._publish(old_put)
        await first._publish(stale)
        assert await named(first, name) == []
        async with stores(namespaced_url, 1) as (late,):  # replays the whole stream, the events in that order
            assert await named(late, name) == []
        assert await named(second, name) == []


async def test_the_leader_writes_a_snapshot_every_so_many_events_and_a_new_store_folds_it(
    namespaced_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schedules, "SNAPSHOT_EVERY", 5)
    name = unique("snapshot")
    async with stores(namespaced_url, 1) as (leader,):
        try:
            stored = await leader.upsert(spec_named(name, every_ms=1000), await leader.now_ms())
            async with leader.leadership():
                taken = leader._snapshotting
                [(_, cursor)] = await named(leader, name)
                assert cursor is not None
                for step in range(1, 7):
                    assert await leader.advance(stored, cursor, cursor + step * 1000)
                    cursor += step * 1000
                assert await leader.advance(stored, cursor - 1, cursor + 1000) is False  # not its cursor
                await leader.load()
                assert leader._snapshotting is not taken and leader._snapshotting is not None
                await leader._snapshotting
                assert leader._fold.since_snapshot < 5
            async with stores(namespaced_url, 1) as (late,):
                assert await named(late, name) == [(stored, cursor)]
        finally:
            await leader.remove(name)


# -- (2) leadership: the exclusive lock queue ---------------------------------------------------------------


async def _lead(store: RabbitMQScheduleStore, entered: asyncio.Event, release: asyncio.Event) -> bool:
    """Hold ``store``'s leadership from ``entered`` until ``release``; whether it was lost meanwhile."""
    async with store.leadership() as lost:
        entered.set()
        waits = [asyncio.ensure_future(release.wait()), asyncio.ensure_future(lost.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return lost.is_set()


async def test_one_store_leads_at_a_time_and_the_next_takes_over_when_the_leader_leaves(namespaced_url: str) -> None:
    async with stores(namespaced_url, 2) as (first, second):
        async with first.leadership() as lost:
            assert not lost.is_set()
            entered, release = asyncio.Event(), asyncio.Event()
            waiting = asyncio.ensure_future(_lead(second, entered, release))
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(entered.wait()), 2)
                assert not lost.is_set()
                # The waiter's connection lost while it waits: it connects again and keeps waiting.
                assert second._lock_connections
                for connection in list(second._lock_connections):
                    await connection.close()
                await asyncio.sleep(1.5)
                assert not entered.is_set()
            except BaseException:
                waiting.cancel()
                raise
        started = time.monotonic()
        try:
            await asyncio.wait_for(entered.wait(), 5)
            assert time.monotonic() - started < 3  # the waiter tries about every second
        finally:
            release.set()
            assert await waiting is False


async def test_a_leader_whose_lock_connection_closes_is_told_and_another_store_takes_over(namespaced_url: str) -> None:
    async with stores(namespaced_url, 2) as (first, second):
        entered, release = asyncio.Event(), asyncio.Event()
        async with first.leadership() as lost:
            waiting = asyncio.ensure_future(_lead(second, entered, release))
            try:
                await asyncio.sleep(0.5)
                assert not entered.is_set()
                for connection in list(first._lock_connections):
                    await connection.close()  # as a network cut would: the broker drops the lock queue
                await asyncio.wait_for(lost.wait(), 5)
                await asyncio.wait_for(entered.wait(), 5)
            finally:
                release.set()
                assert await waiting is False


# -- (3) a leader process killed ----------------------------------------------------------------------------

#: A scheduler process: runs the schedules of the broker at argv[1] after declaring the queue argv[2], and
#: prints "LEADER" each time it takes the lead (the store's leadership wrapped here, not in the library).
SCHEDULER = """
import asyncio, contextlib, sys
from mindtrace.jobs import AsyncOrchestrator
from mindtrace.jobs.backends.rabbitmq.schedules import RabbitMQScheduleStore

leadership = RabbitMQScheduleStore.leadership

@contextlib.asynccontextmanager
async def announced(self):
    async with leadership(self) as lost:
        print("LEADER", flush=True)
        yield lost

RabbitMQScheduleStore.leadership = announced

async def main():
    async with AsyncOrchestrator(sys.argv[1]) as orchestrator:
        await orchestrator.declare_queue(sys.argv[2])
        print("READY", flush=True)
        await orchestrator.run_schedules(refresh=0.5)

asyncio.run(main())
"""


def _fire_ms(job_id: str, name: str) -> int:
    stamp = job_id.removeprefix(f"{name}@")
    return round(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)


async def test_when_the_leading_process_is_killed_another_takes_over_and_every_fire_happens_once(
    namespaced_url: str,
) -> None:
    queue, name = unique("kill-q"), unique("kill")
    job = job_from_schema(JobSchema(name="s", input=In), In())
    async with AsyncOrchestrator(namespaced_url) as orchestrator:
        await orchestrator.declare_queue(queue)
        await orchestrator.schedule(name, queue, job, every=1)
        command = [sys.executable, "-c", SCHEDULER, namespaced_url, queue]
        workers = [
            await asyncio.to_thread(subprocess.Popen, command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        lines: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

        async def read(index: int, worker: subprocess.Popen[str]) -> None:
            assert worker.stdout is not None
            while line := await asyncio.to_thread(worker.stdout.readline):
                await lines.put((index, line.strip()))

        readers = [asyncio.ensure_future(read(i, worker)) for i, worker in enumerate(workers)]

        async def next_leader() -> int:
            while True:
                index, line = await asyncio.wait_for(lines.get(), 15)
                if line == "LEADER":
                    return index

        try:
            leader = await next_leader()
            await asyncio.sleep(3)
            killed_at = time.time()
            workers[leader].send_signal(signal.SIGKILL)
            await asyncio.to_thread(workers[leader].wait, 10)
            successor = await next_leader()
            takeover = time.time() - killed_at
            assert successor != leader
            await asyncio.sleep(4)
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                await asyncio.to_thread(worker.wait, 10)
            await asyncio.gather(*readers, return_exceptions=True)
            for worker in workers:
                assert worker.stdout is not None
                worker.stdout.close()
            await orchestrator.unschedule(name)

        ids: list[str] = []
        while (received := await orchestrator.receive_message(queue, timeout=0.5)) is not None:
            ids.append(received.id)
        await orchestrator.delete_queue(queue)

    print(f"takeover after SIGKILL: {takeover:.2f}s; {len(ids)} fires")
    assert takeover < 5
    assert len(ids) == len(set(ids)), sorted(ids)  # no fire published twice, not even across the kill
    assert all(job_id.startswith(f"{name}@") for job_id in ids), ids
    fires = sorted(_fire_ms(job_id, name) for job_id in ids)
    assert all(ms % 1000 == 0 for ms in fires)  # every=1 fires on whole seconds
    span = (fires[-1] - fires[0]) / 1000
    # One fire a second, but for the few seconds without a leader (whose missed fires coalesce into one).
    assert span - 4 <= len(fires) <= span + 1, fires
    assert any(ms / 1000 > killed_at + 0.5 for ms in fires), (fires, killed_at)  # the successor fires


# -- namespaces ----------------------------------------------------------------------------------------------


async def test_a_schedules_namespace_keeps_schedules_apart_on_one_vhost(namespaced_url: str, amqp_url: str) -> None:
    other_namespace = f"mindtrace-test-{uuid.uuid4().hex[:12]}"
    name = unique("apart")
    mine, other = (
        RabbitMQClient.from_url(namespaced_url),
        RabbitMQClient.from_url(servers.namespaced(amqp_url, other_namespace)),
    )
    try:
        assert mine.schedules_namespace.startswith("mindtrace-test-") and other.schedules_namespace == other_namespace
        await mine.schedule_store().upsert(spec_named(name), 1_000)
        assert await named(mine.schedule_store(), name) != []
        assert await named(other.schedule_store(), name) == []  # another namespace: another stream
        # Both lead at once: each namespace has its own lock.
        async with mine.schedule_store().leadership(), other.schedule_store().leadership() as lost:
            assert not lost.is_set()
    finally:
        await mine.close()
        await other.close()
        await servers.delete_schedules_stream(amqp_url, other_namespace)


@pytest.mark.parametrize("namespace", ["", "a\nb", "x" * 201])
def test_a_bad_schedules_namespace_is_refused(namespace: str) -> None:
    with pytest.raises(ConfigurationError, match="schedules_namespace"):
        RabbitMQClient(schedules_namespace=namespace)
