"""Conformance: queue counts, the listing of queues and peeking at dead letters, on every backend and API."""

from __future__ import annotations

from typing import Any

import pytest

from mindtrace.jobs import AsyncOrchestrator, InvalidQueueNameError, QueueNotFoundError, UsageError
from mindtrace.jobs.backends.base import QUEUE_COUNTS
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support.api import Api
from tests.jobs.support.queue_states import Staged, staged_queue


def _aio(api: Api) -> AsyncOrchestrator:
    orchestrator: Any = api.orchestrator
    return orchestrator if isinstance(orchestrator, AsyncOrchestrator) else orchestrator.aio


class _Staging:
    """``staged_queue`` entered and left on the API's loop, so the API under test is called between."""

    def __init__(self, api: Api, queue: str) -> None:
        self._api = api
        self._cm = staged_queue(_aio(api), queue)

    async def __aenter__(self) -> Staged:
        return await self._api.run_on_loop(self._cm.__aenter__())  # type: ignore[no-any-return]

    async def __aexit__(self, *exc: object) -> None:
        await self._api.run_on_loop(self._cm.__aexit__(None, None, None))


async def test_queue_stats_count_every_state_the_backend_can_know(api: Api, queue: str) -> None:
    known = _aio(api).backend.capabilities.queue_counts
    assert "ready" in known and known <= set(QUEUE_COUNTS)
    async with _Staging(api, queue):
        stats = await api.queue_stats(queue)
    assert stats.queue == queue
    expected = {"ready": 1, "running": 2, "delayed": 1, "dead_lettered": 1}
    for name in QUEUE_COUNTS:
        value = getattr(stats, name)
        if name not in known:
            assert value is None, f"{name} is not in capabilities.queue_counts, so must be None"
        elif name == "consumers":
            assert isinstance(value, int) and value >= 1  # the staging receiver
        else:
            assert value == expected[name], f"{name}: {stats}"
    assert stats.as_dict()["queue"] == queue


async def test_queue_stats_of_an_empty_queue_and_bad_names(api: Api, queue: str) -> None:
    await api.declare_queue(queue)
    stats = await api.queue_stats(queue)
    assert stats.ready == 0
    assert all(getattr(stats, name) in (0, None) for name in QUEUE_COUNTS)
    with pytest.raises(QueueNotFoundError):
        await api.queue_stats(queue + "-missing")
    with pytest.raises(InvalidQueueNameError):
        await api.queue_stats("no spaces")


async def test_list_queues_lists_declared_queues_without_their_dead_letter_queues(
    api: Api, queue: str, new_queue: Any
) -> None:
    other = new_queue("other")
    if not _aio(api).backend.capabilities.can_list_queues:
        with pytest.raises(UsageError):
            await api.list_queues()
        return
    await api.declare_queue(queue)
    await api.declare_queue(other)
    listed = await api.list_queues()
    assert queue in listed and other in listed
    assert queue + ".dlq" not in listed
    assert listed == sorted(listed)
    await api.delete_queue(other)
    listed = await api.list_queues()
    assert queue in listed and other not in listed


async def test_peek_dead_letters_shows_them_and_leaves_them_in_place(api: Api, queue: str) -> None:
    async with _Staging(api, queue) as staged:
        first = await api.peek_dead_letters(queue, 5)
        again = await api.peek_dead_letters(queue, 5)
    assert [job.id for job in first] == [staged.dead.id] == [job.id for job in again]
    assert first[0].error == "fatal"
    assert await api.peek_dead_letters(queue, 0) == []
    assert await api.requeue_dead_letters(queue) == 1  # still there after two peeks


async def test_peek_keeps_claim_order(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    jobs = [make_job(schema, i, priority=p) for i, p in enumerate([1, 5, 1, 9])]
    for job in jobs:
        await api.publish(queue, job)
    backend = _aio(api).backend
    peeked = await api.run_on_loop(backend.peek(queue, 3))
    expected = [jobs[3], jobs[1], jobs[0]]
    assert [_aio(api).decode(body).id for body in peeked] == [job.id for job in expected]
    assert await api.count_queue_messages(queue) == 4
    received = [(await api.receive_message(queue, timeout=5)).id for _ in jobs]
    assert received == [jobs[3].id, jobs[1].id, jobs[0].id, jobs[2].id]
