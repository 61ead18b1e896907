"""A consumer process for fault scenarios: runs jobs, records started/done in a ledger, misbehaves on request.

Run as ``python -m tests.jobs.faults.worker URL QUEUE LEDGER [options]``. A job whose input tags contain
``"poison"`` kills its own process (SIGKILL) mid-run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job, from_url
from tests.jobs.conformance.models import image_schema
from tests.jobs.support.ledger import Ledger


class LedgerConsumer(AsyncConsumer):
    """Records each run in the ledger; sleeps ``job_seconds`` per job; dies on poison jobs."""

    def __init__(self, queue: str, ledger: Ledger, job_seconds: float, **options: Any) -> None:
        super().__init__(queue, **options)
        self.ledger = ledger
        self.job_seconds = job_seconds

    async def run(self, job: Job) -> None:
        self.ledger.record("started", job.id)
        if "poison" in job.payload.input.tags:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.job_seconds:
            await asyncio.sleep(self.job_seconds)
        self.ledger.record("done", job.id)


async def main(args: argparse.Namespace) -> None:
    options: dict[str, Any] = {}
    if args.visibility_timeout is not None:
        options["visibility_timeout"] = args.visibility_timeout
    ledger = Ledger(args.ledger)
    async with AsyncOrchestrator(
        from_url(args.url, **options), state=False if args.no_records else None
    ) as orchestrator:
        await orchestrator.register(image_schema(args.queue))
        consumer = LedgerConsumer(
            args.queue, ledger, args.job_seconds, max_retries=args.max_retries, retry_delay=0.05, retry_backoff=1.0
        )
        consumer.connect(orchestrator)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, consumer.stop)
        print("ready", flush=True)
        await consumer.consume(concurrency=args.concurrency)
    ledger.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("queue")
    parser.add_argument("ledger")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--job-seconds", type=float, default=0.0)
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--visibility-timeout", type=float, default=None)
    parser.add_argument("--no-records", action="store_true", help="keep no job records (state=False)")
    asyncio.run(main(parser.parse_args()))
