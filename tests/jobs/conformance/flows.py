"""Steps the job-lifecycle conformance tests share: a job's expected output, runs until a sentinel job."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from mindtrace.jobs import Job
from tests.jobs.conformance.models import DetectionOutput
from tests.jobs.support.api import Api

#: Retry options that make a retry near immediate.
FAST_RETRY: dict[str, Any] = {"retry_delay": 0.01, "retry_backoff": 1.0}


def detection_of(job: Job) -> DetectionOutput:
    """The output a test's run returns for ``job``: derived from its input, so each result can be checked."""
    return DetectionOutput(objects=[job.payload.input.image_path], accuracy=job.payload.input.threshold)


async def detect(job: Job) -> DetectionOutput:
    """A handler returning ``detection_of(job)``."""
    return detection_of(job)


class Gate:
    """An event a handler waits on and the test opens; ``arrived`` is set once the handler waits at it.

    Opened in a test's ``finally``, so a run the consumer abandoned (a sync run past its time limit) ends too.
    """

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.opened = asyncio.Event()

    async def hold(self, limit: float = 30.0) -> None:
        """Wait (in a handler) until the test opens the gate; TimeoutError after ``limit`` s."""
        self.arrived.set()
        await asyncio.wait_for(self.opened.wait(), limit)

    async def reached(self, limit: float = 10.0) -> None:
        """Wait (in the test) until a handler holds at the gate."""
        await asyncio.wait_for(self.arrived.wait(), limit)

    def open(self) -> None:
        """Let every handler holding here go on."""
        self.opened.set()


async def run_until(
    api: Api,
    queue: str,
    sentinel: str,
    handler: Callable[[Job], Awaitable[Any]] | None = None,
    timeout: float = 20.0,
    **options: Any,
) -> list[Job]:
    """Consume ``queue`` until the job ``sentinel`` has run (it was published last, at the lowest priority, so
    every job before it was taken first); returns the jobs that ran, in order. ``handler`` runs each job
    (default: returns its ``detection_of``)."""
    ran: list[Job] = []
    holder: dict[str, Any] = {}

    async def run(job: Job) -> Any:
        ran.append(job)
        if job.id == sentinel:
            holder["consumer"].stop()
        return await handler(job) if handler is not None else detection_of(job)

    holder["consumer"] = consumer = api.consumer(queue, run, **options)
    await asyncio.wait_for(consumer.consume(), timeout)
    return ran
