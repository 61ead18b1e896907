"""Schedules: a nightly cron entry in its time zone and an every-second heartbeat, fired by run_schedules."""

import asyncio
from zoneinfo import ZoneInfo

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job, JobInput, JobSchema, LocalClient, job_from_schema


class Tick(JobInput):
    source: str


class Heartbeat(AsyncConsumer):
    async def run(self, job: Job) -> None:
        print("ran", job.id)  # <name>@<UTC fire time>: the same id in every process that fires it


async def main() -> None:
    async with AsyncOrchestrator(LocalClient()) as orchestrator:
        schema = JobSchema(name="ops", input=Tick)
        await orchestrator.register(schema)
        await orchestrator.declare_queue("ops")
        nightly = await orchestrator.schedule(
            "nightly-eval", "ops", job_from_schema(schema, {"source": "cron"}), cron="0 3 * * *", tz="Europe/Berlin"
        )
        print("nightly-eval next fires at", nightly.next_fire.astimezone(ZoneInfo(nightly.tz)).isoformat())
        await orchestrator.schedule("heartbeat", "ops", job_from_schema(schema, {"source": "every"}), every=1)
        print("schedules:", [info.name for info in await orchestrator.schedules()])

        consumer = Heartbeat("ops")
        consumer.connect(orchestrator)
        scheduler = asyncio.create_task(orchestrator.run_schedules())  # any number of processes may run this
        await consumer.consume(num_messages=3)
        print("unscheduled:", await orchestrator.unschedule("heartbeat"))
        scheduler.cancel()


asyncio.run(main())
