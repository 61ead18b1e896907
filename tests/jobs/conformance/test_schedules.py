"""Conformance: schedules (``schedule``, ``unschedule``, ``schedules``, ``run_schedules``) on every backend and API.

Upserts are idempotent, a listed schedule says its next fire, every fire happens once under the deterministic id
``<name>@<time>`` however many schedulers run, an unscheduled schedule fires no more, missed fires coalesce into
one (or are skipped past their grace), and bad input is refused with a JobValidationError naming the field,
storing nothing. The backend's ``capabilities.schedules`` says how fires are kept single.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta

import pytest

from mindtrace.jobs import (
    Job,
    JobInput,
    JobValidationError,
    LocalClient,
    QueueNotFoundError,
    RabbitMQClient,
    RedisClient,
)
from mindtrace.jobs.backends.base import Backend
from mindtrace.jobs.schedules import ScheduleInfo, fire_id
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support import servers
from tests.jobs.support.api import Api


class _OtherInput(JobInput):
    """An input that is not the registered schema's."""

    colour: str = "red"


@pytest.fixture
async def schedule_name(api: Api, queue: str) -> AsyncIterator[str]:
    """A schedule name of this test's own, unscheduled after it (the registry is shared by every test)."""
    name = f"sched-{queue}"
    yield name
    with contextlib.suppress(Exception):
        await api.unschedule(name)


async def _mine(api: Api, name: str) -> list[ScheduleInfo]:
    return [info for info in await api.schedules() if info.name == name]


async def _drain(api: Api, queue: str) -> list[Job]:
    jobs = []
    while (job := await api.receive_message(queue, timeout=0.2)) is not None:
        jobs.append(job)
    return jobs


def test_every_backend_says_how_it_keeps_fires_single(backend_factory: Callable[[], Backend]) -> None:
    assert backend_factory().capabilities.schedules in ("atomic", "leader", "none")


async def test_schedule_is_an_idempotent_upsert_listed_until_unscheduled(
    api: Api, queue: str, schedule_name: str
) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await api.declare_queue(queue)
    first = await api.schedule(schedule_name, queue, make_job(schema), cron="0 3 * * *", tz="Europe/Berlin")
    assert isinstance(first, ScheduleInfo)
    assert (first.cron, first.tz, first.every, first.last_fire) == ("0 3 * * *", "Europe/Berlin", None, None)
    assert first.next_fire.astimezone(first.next_fire.tzinfo).hour in (1, 2)  # 03:00 Berlin is 01:00/02:00 UTC
    # The same schedule again (a new template instance, another id) changes nothing.
    again = await api.schedule(schedule_name, queue, make_job(schema), cron="0 3 * * *", tz="Europe/Berlin")
    assert again.next_fire == first.next_fire
    listed = await _mine(api, schedule_name)
    assert len(listed) == 1 and listed[0].queue == queue and listed[0].job.payload.name == schema.name
    # A changed schedule replaces it.
    changed = await api.schedule(schedule_name, queue, make_job(schema), every=timedelta(hours=1))
    assert changed.every == timedelta(hours=1) and changed.cron is None
    assert [info.every for info in await _mine(api, schedule_name)] == [timedelta(hours=1)]
    assert await api.unschedule(schedule_name) is True
    assert await _mine(api, schedule_name) == []
    assert await api.unschedule(schedule_name) is False
    assert await api.count_queue_messages(queue) == 0


async def test_each_fire_happens_once_under_its_id_with_two_schedulers(
    api: Api, queue: str, private_schedules: Callable[[], Backend]
) -> None:
    """Two schedulers (two clients, as two processes have) of schedules no one else fires (on a shared broker,
    another CI lane's scheduler could lead and leave mid-test): every 0.5 s, once, under its own id."""
    first = api.sibling(private_schedules())
    other = api.sibling(private_schedules()) if first.aio.backend.capabilities.shared_queues else first
    name = f"sched-{queue}"
    try:
        schema = image_schema(queue)
        await first.register(schema)
        await first.declare_queue(queue)
        info = await first.schedule(name, queue, make_job(schema), every=0.5)
        started = time.time()
        async with first.scheduler(), other.scheduler():
            await asyncio.sleep(3.2)
            await first.unschedule(name)
        elapsed = time.time() - started
        jobs = await _drain(first, queue)
    finally:
        with contextlib.suppress(Exception):
            await first.unschedule(name)
        with contextlib.suppress(Exception):
            await first.delete_queue(queue)
        await first.close()
        if other is not first:
            await other.close()
    ids = [job.id for job in jobs]
    assert len(ids) == len(set(ids)), f"a fire ran twice: {sorted(ids)}"
    assert all(job_id.startswith(f"{name}@") for job_id in ids)
    # Fires every 0.5 s from the first after the upsert; a leader store may take a moment to be elected.
    leader = api.aio.backend.capabilities.schedules == "leader"
    assert elapsed / 0.5 - (5 if leader else 2) <= len(ids) <= elapsed / 0.5 + 1, ids
    first_fire = int(info.next_fire.timestamp() * 1000)
    assert fire_id(name, first_fire) in ids or leader
    assert all(job.payload.name == schema.name for job in jobs)


async def test_an_unscheduled_schedule_fires_no_more(api: Api, queue: str, schedule_name: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await api.declare_queue(queue)
    await api.schedule(schedule_name, queue, make_job(schema), every=0.3)
    async with api.scheduler():
        assert await api.receive_message(queue, timeout=10) is not None  # it fires
        assert await api.unschedule(schedule_name) is True
        fired = await api.count_queue_messages(queue)
        await asyncio.sleep(1.0)
        assert await api.count_queue_messages(queue) <= fired + 1  # at most one fire already under way


@pytest.fixture
def private_schedules(backend_name: str, request: pytest.FixtureRequest) -> Iterator[Callable[[], Backend]]:
    """Backends of the kind under test whose schedules no other process sees (no scheduler but the test's own
    fires them): a Redis key prefix, a RabbitMQ schedules namespace of the test's own; a LocalClient is private."""
    broker, tag = backend_name.split("+", 1)[0], uuid.uuid4().hex[:10]
    if broker == "memory":
        yield LocalClient
        return
    if broker == "redis":
        redis_url = str(request.getfixturevalue("redis_url"))
        yield lambda: RedisClient.from_url(redis_url, key_prefix=f"mindtrace-test-{tag}:")
        return
    amqp_url = str(request.getfixturevalue("amqp_url"))
    namespace = f"mindtrace-test-{tag}"
    yield lambda: RabbitMQClient.from_url(servers.namespaced(amqp_url, namespace))
    asyncio.run(servers.delete_schedules_stream(amqp_url, namespace))


async def _until_phase(api: Api, period: float, phase: float) -> None:
    """Sleep until the backend's clock is ``phase`` seconds past a multiple of ``period``."""
    now = await api.run_on_loop(api.aio.schedule_store.now_ms()) / 1000
    await asyncio.sleep((phase - now % period) % period)


@pytest.mark.parametrize("misfire", ["coalesce", "skip"])
async def test_missed_fires_coalesce_into_one_or_are_skipped_past_their_grace(
    api: Api, queue: str, misfire: str, private_schedules: Callable[[], Backend]
) -> None:
    """No scheduler runs for two fire times; then one starts about a second after the last of them: with
    "coalesce" those fires run once, late (one job, not two); with "skip" and a grace of 0.3 s, not at all."""
    private = api.sibling(private_schedules())
    name = f"sched-{queue}"
    try:
        schema = image_schema(queue)
        await private.register(schema)
        await private.declare_queue(queue)
        period = 2.0
        await _until_phase(private, period, 0.2)
        grace = 0.3 if misfire == "skip" else None
        await private.schedule(name, queue, make_job(schema), every=period, misfire=misfire, grace=grace)
        await asyncio.sleep(4.8)  # fire times pass at +1.8 and +3.8 with no scheduler; now about 1 s after the last
        resumed = time.time()
        async with private.scheduler():
            await asyncio.sleep(0.5)
        jobs = await _drain(private, queue)
        missed = [job.id for job in jobs if job.created_at.timestamp() < resumed]  # a fire's job is made at its time
        assert len(missed) == (1 if misfire == "coalesce" else 0), [job.id for job in jobs]
        assert [info.last_fire is not None for info in await _mine(private, name)] == [True]
    finally:
        with contextlib.suppress(Exception):
            await private.unschedule(name)
        with contextlib.suppress(Exception):
            await private.delete_queue(queue)
        await private.close()


async def test_bad_schedules_are_refused_naming_the_field_and_store_nothing(
    api: Api, queue: str, schedule_name: str
) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await api.declare_queue(queue)
    job = make_job(schema)
    cases: list[tuple[dict[str, object], str]] = [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "0 3 * *"}, "cron"),
        ({"cron": "0 3 * * *", "tz": "Mars/Olympus"}, "tz"),
        ({}, "cron"),
        ({"cron": "0 3 * * *", "every": 60}, "cron"),
        ({"every": 0}, "every"),
        ({"every": -5}, "every"),
        ({"every": float("nan")}, "every"),
        ({"every": "5m"}, "every"),
        ({"every": 60, "tz": "UTC"}, "tz"),
        ({"every": 60, "misfire": "later"}, "misfire"),
        ({"every": 60, "grace": -1}, "grace"),
    ]
    for options, field in cases:
        with pytest.raises(JobValidationError) as caught:
            await api.schedule(schedule_name, queue, job, **options)
        assert caught.value.field == field, (options, caught.value)
    with pytest.raises(JobValidationError) as caught:
        await api.schedule("", queue, job, every=60)
    assert caught.value.field == "name"
    mismatched = job.model_copy(update={"payload": job.payload.model_copy(update={"input": _OtherInput()})})
    with pytest.raises(JobValidationError) as caught:
        await api.schedule(schedule_name, queue, mismatched, every=60)
    assert caught.value.schema == schema.name
    with pytest.raises(QueueNotFoundError):
        await api.schedule(schedule_name, f"{queue}-missing", job, every=60)
    assert await _mine(api, schedule_name) == []
    assert await api.count_queue_messages(queue) == 0
