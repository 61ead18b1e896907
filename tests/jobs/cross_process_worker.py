"""Consumer process of the cross-process results test (``python -m tests.jobs.cross_process_worker URL QUEUE``).

Runs the queue's jobs with ``detection_of`` plus its own process id in ``objects``, until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job, from_url
from tests.jobs.conformance.flows import detection_of
from tests.jobs.conformance.models import DetectionOutput, image_schema


class Detector(AsyncConsumer):
    """Returns the job's expected detection, signed with this process's id."""

    async def run(self, job: Job) -> DetectionOutput:
        output = detection_of(job)
        return output.model_copy(update={"objects": [*output.objects, str(os.getpid())]})


async def main(args: argparse.Namespace) -> None:
    async with AsyncOrchestrator(from_url(args.url), state=args.state) as orchestrator:
        await orchestrator.register(image_schema(args.queue))
        consumer = Detector(args.queue)
        consumer.connect(orchestrator)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, consumer.stop)
        print("ready", flush=True)
        await consumer.consume(concurrency=args.concurrency)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("queue")
    parser.add_argument("--state", default=None, help="state store URL (default: the backend's own)")
    parser.add_argument("--concurrency", type=int, default=8)
    asyncio.run(main(parser.parse_args()))
