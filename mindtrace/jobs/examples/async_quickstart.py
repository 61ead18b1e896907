"""The README async example: the same job through AsyncOrchestrator and AsyncConsumer."""

import asyncio

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job, JobInput, JobSchema, LocalClient, job_from_schema


class ResizeInput(JobInput):
    path: str
    width: int = 224


class Resize(AsyncConsumer):
    async def run(self, job: Job) -> None:
        resize = job.input_as(ResizeInput)  # typed: the registered input class
        print("resizing", resize.path, "to", resize.width)


async def main() -> None:
    async with AsyncOrchestrator(LocalClient()) as orchestrator:
        schema = JobSchema(name="resize", input=ResizeInput)
        await orchestrator.register(schema)
        consumer = Resize("resize", max_retries=3, retry_delay=1.0)
        consumer.connect(orchestrator)
        jobs = [job_from_schema(schema, {"path": f"/img/{i}.png"}) for i in range(3)]
        await orchestrator.publish_many("resize", jobs)
        await consumer.consume(num_messages=3, concurrency=16)


asyncio.run(main())
