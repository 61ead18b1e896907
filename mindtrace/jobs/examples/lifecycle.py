"""Example: follow a job: its status, its typed result awaited without polling, re-attaching by id."""

import asyncio

from mindtrace.jobs import (
    AsyncConsumer,
    AsyncOrchestrator,
    Job,
    JobInput,
    JobOutput,
    JobSchema,
    LocalClient,
    current_job,
    job_from_schema,
)


class TrainInput(JobInput):
    epochs: int


class TrainOutput(JobOutput):
    checkpoint_uri: str
    loss: float


class Train(AsyncConsumer):
    async def run(self, job: Job) -> TrainOutput:
        context = current_job()  # this job's context (also self.context)
        for epoch in range(job.input_as(TrainInput).epochs):
            await asyncio.sleep(0.01)  # a training step; a cancel or time limit interrupts it here
            context.report_progress((epoch + 1) / 3, epoch=epoch)
        return TrainOutput(checkpoint_uri="s3://bucket/run-1/ckpt.pt", loss=0.12)


async def main() -> None:
    async with AsyncOrchestrator(LocalClient()) as orchestrator:
        schema = JobSchema(name="train", input=TrainInput, output=TrainOutput)
        await orchestrator.register(schema)
        consumer = Train("train", timeout=3600)
        consumer.connect(orchestrator)
        worker = asyncio.create_task(consumer.consume())

        handle = await orchestrator.publish("train", job_from_schema(schema, {"epochs": 3}))
        output = await handle.result_as(TrainOutput, timeout=30)  # typed; waits without polling
        print(handle.id, await handle.status(), output.checkpoint_uri)

        same = orchestrator.job(handle.id, "train")  # from any process: by id and queue
        print((await same.info()).attempts)
        try:
            await orchestrator.job("no-such-id", "train").result()
        except LookupError as exc:  # JobNotFoundError: never "pending"
            print(exc)
        consumer.stop()
        await worker


asyncio.run(main())
