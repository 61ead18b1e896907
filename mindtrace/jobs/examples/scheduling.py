"""Example: delayed jobs, a cancelled scheduled job, and unique jobs (in memory; the same code on the brokers)."""

import asyncio
from datetime import datetime, timedelta, timezone

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job, JobInput, JobSchema, LocalClient, job_from_schema


class ReportInput(JobInput):
    customer: str


class Report(AsyncConsumer):
    async def run(self, job: Job) -> None:
        print("report for", job.input_as(ReportInput).customer)


async def main() -> None:
    async with AsyncOrchestrator(LocalClient()) as orchestrator:
        schema = JobSchema(name="reports", input=ReportInput)
        await orchestrator.register(schema)
        consumer = Report("reports")
        consumer.connect(orchestrator)
        worker = asyncio.create_task(consumer.consume())

        def report(customer: str) -> Job:
            return job_from_schema(schema, {"customer": customer})

        soon = await orchestrator.publish("reports", report("acme"), delay=0.2)  # seconds, or a timedelta
        print(await soon.status())  # SCHEDULED: the broker holds it until it is due
        tomorrow = datetime.now(timezone.utc) + timedelta(days=1)
        later = await orchestrator.publish("reports", report("globex"), run_at=tomorrow)
        await later.cancel()  # a cancelled scheduled job never runs

        first = await orchestrator.publish("reports", report("initech"), dedup_key="report:initech")
        again = await orchestrator.publish("reports", report("initech"), dedup_key="report:initech")
        print("one job for the key:", again == first)  # the first job's handle; nothing queued

        await soon.wait(timeout=10)
        await first.wait(timeout=10)
        print(await soon.status(), await later.status())
        consumer.stop()
        await worker


asyncio.run(main())
