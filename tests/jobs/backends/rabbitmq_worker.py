"""Consumer process for the RabbitMQ kill test (``python -m tests.jobs.backends.rabbitmq_worker URL QUEUE N``)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job, RabbitMQClient
from tests.jobs.conformance.models import image_schema


class HoldingConsumer(AsyncConsumer):
    """Prints ``started <job id>`` for every job it starts, then holds the job until the process is killed."""

    async def run(self, job: Job) -> Any:
        sys.stdout.write(f"started {job.id}\n")
        sys.stdout.flush()
        await asyncio.Event().wait()


async def main(url: str, queue: str, concurrency: int) -> None:
    async with AsyncOrchestrator(RabbitMQClient.from_url(url)) as orchestrator:
        await orchestrator.register(image_schema(queue))
        consumer = HoldingConsumer(queue)
        consumer.connect(orchestrator)
        await consumer.consume(concurrency=concurrency)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
