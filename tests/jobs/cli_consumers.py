"""Consumer classes the worker CLI tests run in subprocesses, and a blocking ``consume(handle_signals=True)``
script (``python -m tests.jobs.cli_consumers URL QUEUE``).

Queue names come from the environment (``CLI_TEST_QUEUE``, ``CLI_TEST_QUEUE2``) so each test has its own;
``CLI_TEST_FAST=1`` makes every job return at once (a second worker rerunning jobs given back).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

from mindtrace.jobs import AsyncConsumer, Consumer, Job, JobInput, JobOutput, JobSchema, Orchestrator

log = logging.getLogger("tests.cli")


class Nap(JobInput):
    """How long the job sleeps."""

    seconds: float = 0.0


class Signed(JobOutput):
    """Who ran the job."""

    pid: int
    job_id: str


def schema_for(queue: str) -> JobSchema:
    """The schema of the test queue ``queue``."""
    return JobSchema(name=queue, input=Nap, output=Signed)


def _seconds(job: Job) -> float:
    payload = job.payload.input
    assert isinstance(payload, Nap), f"the input did not decode typed: {type(payload).__name__}"
    return 0.0 if os.environ.get("CLI_TEST_FAST") == "1" else payload.seconds


class Sleeper(AsyncConsumer):
    """Sleeps ``seconds`` (asyncio), logging the start and the end; returns its process id."""

    queue = os.environ.get("CLI_TEST_QUEUE", "cli-test")
    schema = schema_for(queue)

    async def run(self, job: Job) -> Signed:
        log.info("started %s", job.id)
        await asyncio.sleep(_seconds(job))
        log.info("finished %s", job.id)
        return Signed(pid=os.getpid(), job_id=job.id)


class BlockingSleeper(Consumer):
    """The same with ``time.sleep`` in a sync Consumer (its run in a thread of the worker)."""

    queue = os.environ.get("CLI_TEST_QUEUE2", "cli-test2")
    schema = schema_for(queue)

    def run(self, job: Job) -> Signed:
        log.info("started %s", job.id)
        time.sleep(_seconds(job))
        log.info("finished %s", job.id)
        return Signed(pid=os.getpid(), job_id=job.id)


class NotAConsumer:
    """A class the worker must refuse."""


def main(url: str, queue: str) -> None:
    """Consume ``queue`` with the blocking API and ``handle_signals=True``; prints ``returned N`` at the end."""
    logging.basicConfig(level=logging.INFO)
    with Orchestrator(url) as orchestrator:
        orchestrator.register(schema_for(queue))
        consumer = BlockingSleeper(queue)
        consumer.connect(orchestrator)
        print("ready", flush=True)
        handled = consumer.consume(concurrency=2, handle_signals=True, shutdown_timeout=5)
        print(f"returned {handled}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
