"""Unique jobs on the memory backend's clock: a ``dedup_ttl`` ends when a FakeClock passes it, not in real time."""

from __future__ import annotations

from datetime import timedelta

from mindtrace.jobs import AsyncOrchestrator, LocalClient
from mindtrace.jobs.clock import FakeClock
from tests.jobs.conformance.models import image_schema, make_job


async def test_a_dedup_ttl_runs_on_the_backends_clock() -> None:
    clock = FakeClock()
    async with AsyncOrchestrator(LocalClient(clock=clock)) as orchestrator:
        queue = await orchestrator.register(image_schema("unique-clock"))
        schema = image_schema(queue)
        first = await orchestrator.publish(queue, make_job(schema, 0), dedup_key="k", dedup_ttl=timedelta(hours=1))
        clock.advance(timedelta(minutes=59))
        assert await orchestrator.publish(queue, make_job(schema, 1), dedup_key="k") == first
        clock.advance(timedelta(minutes=1))
        second = await orchestrator.publish(queue, make_job(schema, 2), dedup_key="k")
        assert second != first
        assert await orchestrator.count_queue_messages(queue) == 2
