"""Conformance: progress reported from inside run, and the per-job context, on every backend and API."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from mindtrace.jobs import Job, UsageError
from mindtrace.jobs.context import JobContext, current_job
from mindtrace.jobs.lifecycle import JobStatus, Progress
from tests.jobs.conformance.flows import Gate, detection_of
from tests.jobs.conformance.models import DetectionOutput, image_schema, make_job
from tests.jobs.support.api import Api

#: Every test here follows jobs through their records.
pytestmark = pytest.mark.usefixtures("job_records")


async def test_progress_reported_in_run_is_visible_in_info_while_it_runs(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    handle = await api.publish(queue, job)
    gate = Gate()

    async def training(job: Job) -> DetectionOutput:
        current_job().report_progress(0.5, loss=0.1, phase="train")
        await gate.hold()
        return detection_of(job)

    consuming = asyncio.create_task(api.consumer(queue, training).consume(num_messages=1))
    try:
        info = await api.wait_until(handle, lambda info: info.progress is not None, timeout=10)
        assert info.status is JobStatus.RUNNING
        assert info.progress == Progress(0.5, {"loss": 0.1, "phase": "train"})
        assert (await api.info(handle)).progress == info.progress
    finally:
        gate.open()
    assert await api.result(handle, timeout=10) == detection_of(job)
    await asyncio.wait_for(consuming, 10)


async def test_progress_writes_are_coalesced_to_about_one_a_second(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    handle = await api.publish(queue, make_job(schema, 1))
    steps = 120

    async def chatty(job: Job) -> None:
        context = current_job()
        for step in range(1, steps + 1):  # about 1.2 s of 10-ms steps, each reported
            context.report_progress(step / steps, step=step)
            await asyncio.sleep(0.01)

    consuming = asyncio.create_task(api.consumer(queue, chatty).consume(num_messages=1))
    seen = await api.history(handle, lambda info: info.terminal, timeout=20)
    await asyncio.wait_for(consuming, 10)
    reported = {info.progress.to_json(): info.progress for info in seen if info.progress is not None}.values()
    assert reported, [info.status.value for info in seen]  # at least one write landed while it ran
    # 120 reports over ~1.2 s: a store written at most about once a second shows a handful, not dozens.
    assert len(reported) <= 5, sorted(p.fraction or 0 for p in list(reported))


async def test_each_running_job_has_its_own_context(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    jobs = [make_job(schema, i) for i in range(3)]
    for job in jobs:
        await api.publish(queue, job)
    all_in = asyncio.Event()
    seen: list[tuple[Job, JobContext, JobContext]] = []
    kept: list[bool] = []
    holder: dict[str, Any] = {}

    async def handler(job: Job) -> None:
        mine, as_consumer_sees = current_job(), holder["consumer"].context
        seen.append((job, mine, as_consumer_sees))
        if len(seen) == len(jobs):
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 10)  # all three run at once
        kept.append(current_job() is mine and holder["consumer"].context is mine)  # after the others started

    started = time.time()
    holder["consumer"] = consumer = api.consumer(queue, handler, timeout=30)
    assert await asyncio.wait_for(consumer.consume(num_messages=3, concurrency=3), 20) == 3
    assert sorted(job.id for job, _, _ in seen) == sorted(job.id for job in jobs)
    assert kept == [True] * 3
    for job, context, as_consumer_sees in seen:
        assert as_consumer_sees is context
        assert (context.job_id, context.queue, context.attempt) == (job.id, queue, 1)
        assert context.worker == consumer.worker_id
        assert context.deadline is not None and started < context.deadline <= time.time() + 30
        assert not (context.cancelled or context.timed_out or context.shutting_down)
    assert len({id(context) for _, context, _ in seen}) == 3
    with pytest.raises(UsageError):
        current_job()  # outside any run
