"""Puts a queue's jobs in every state a queue can count: ready, running, delayed and dead-lettered."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mindtrace.jobs import AsyncOrchestrator, Job
from mindtrace.jobs.backends.base import Delivery
from mindtrace.jobs.policy import Action, Outcome
from tests.jobs.conformance.models import image_schema, make_job


@dataclass
class Staged:
    """The jobs of a staged queue, by the state they were left in."""

    jobs: list[Job]
    running: list[Job]
    delayed: Job
    dead: Job
    ready: list[Job]


@contextlib.asynccontextmanager
async def staged_queue(orchestrator: AsyncOrchestrator, queue: str) -> AsyncIterator[Staged]:
    """Publish 5 jobs to ``queue``; claim 4: hold 2 unsettled (running), retry 1 in 60 s (delayed), dead-letter
    1; 1 stays ready. On exit the held claims are released. Runs on the orchestrator's own loop."""
    await orchestrator.register(image_schema(queue))
    jobs = [make_job(image_schema(queue), i) for i in range(5)]
    for job in jobs:
        await orchestrator.publish(queue, job)
    held: list[Delivery] = []
    # Two receivers: one holds 2 claims (at its prefetch, so the broker pushes it nothing more), the other settles
    # 2 and is closed, giving back whatever the broker pushed it ahead, so the 5th job is ready, not prefetched.
    holder = await orchestrator.open_receiver(queue, prefetch=2, worker="staging")
    try:
        for _ in range(2):
            delivery = await holder.get(5)
            assert delivery is not None, "a published job was not claimable"
            held.append(delivery)
        async with await orchestrator.open_receiver(queue, prefetch=1, worker="staging") as settler:
            d3, d4 = await settler.get(5), await settler.get(5)
            assert d3 is not None and d4 is not None, "a published job was not claimable"
            j3, j4 = orchestrator.decode(d3.body, queue), orchestrator.decode(d4.body, queue)
            failed = j3.model_copy(update={"attempts": 1, "error": "boom"})
            await orchestrator.settle(d3, Outcome(Action.RETRY, failed, delay=60.0, reason="boom"))
            dead = j4.model_copy(update={"attempts": 1, "error": "fatal"})
            await orchestrator.settle(d4, Outcome(Action.DEAD_LETTER, dead, reason="fatal"))
        running = [orchestrator.decode(d.body, queue) for d in held]
        for delivery, job in zip(held, running, strict=True):
            if not delivery.started:  # as the consumer does where the claim did not record the start itself
                await orchestrator.record_started(queue, job, "staging")
        taken = {j3.id, j4.id, *(j.id for j in running)}
        yield Staged(jobs, running, failed, dead, [j for j in jobs if j.id not in taken])
    finally:
        for delivery in held:
            if not delivery.settled:
                with contextlib.suppress(Exception):
                    await orchestrator.backend.release(delivery)
        await holder.close()
