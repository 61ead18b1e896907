"""Results across processes: another process's consumers run 200 jobs, this one awaits every result."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from mindtrace.jobs.lifecycle import JobStatus
from tests.jobs.conformance.flows import detection_of
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support.api import Api

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.usefixtures("job_records")
async def test_200_results_of_jobs_run_by_another_process(
    api: Api, queue: str, backend_url: str, orchestrator_options: dict[str, Any]
) -> None:
    if not api.orchestrator.backend.capabilities.shared_queues:
        pytest.skip("in-memory queues live in one process (capabilities.shared_queues is False)")
    schema = image_schema(queue)
    await api.register(schema)
    state = orchestrator_options.get("state")
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.jobs.cross_process_worker",
        backend_url,
        queue,
        *(["--state", state] if state else []),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert worker.stdout is not None and worker.stderr is not None
        ready = await asyncio.wait_for(worker.stdout.readline(), 30)
        if ready.strip() != b"ready":
            pytest.fail(f"the worker did not start: {ready!r} {(await worker.stderr.read()).decode()[-2000:]}")
        jobs = [make_job(schema, i) for i in range(200)]
        handles = await api.publish_many(queue, jobs)
        results = await asyncio.wait_for(asyncio.gather(*(api.result(h, timeout=60) for h in handles)), 90)
        signed = str(worker.pid)
        for job, result in zip(jobs, results, strict=True):
            expected = detection_of(job)
            assert result == expected.model_copy(update={"objects": [*expected.objects, signed]})
        info = await api.info(handles[-1])
        assert info.status is JobStatus.SUCCEEDED and info.worker is not None and f":{signed}:" in info.worker
        assert signed != str(os.getpid())
    finally:
        with contextlib.suppress(ProcessLookupError):
            worker.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(worker.wait(), 20)
        except asyncio.TimeoutError:
            worker.kill()
            await worker.wait()
    assert worker.returncode == 0, (await worker.stderr.read()).decode()[-2000:] if worker.stderr else ""
