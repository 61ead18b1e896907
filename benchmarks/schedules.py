"""Schedule fires across processes: 3 scheduler processes, ``every=1s`` for 10 s; on a leader store, the leader killed.

Run a scheduler process alone with ``python -m benchmarks.schedules URL`` (it runs ``run_schedules`` until killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from benchmarks.harness import Report, percentile
from mindtrace.jobs import AsyncOrchestrator, Job, JobInput, JobSchema, job_from_schema

#: Rows: fires counted in the window (target: WINDOW plus or minus 1), fires seen twice (target 0), the lateness of
#: a fire's job reaching a waiting receiver after its fire time, and the longest gap between fires around the
#: leader's death (leader stores only).
FIRES, REPEATS = "schedule fires in 10 s (every=1s, 3 processes)", "schedule fire ids seen twice"
LATE_P50, LATE_P99 = "schedule fire lateness p50", "schedule fire lateness p99"
GAP = "longest gap between fires, leader SIGKILLed"
#: Seconds counted, scheduler processes, seconds counted after the leader is killed.
WINDOW, PROCESSES, AFTER_KILL = 10, 3, 10
ROOT = Path(__file__).resolve().parents[1]
SCHEMA = JobSchema(name="tick", input=JobInput)


def _start(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.schedules", url],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _leader(processes: list[subprocess.Popen[str]], timeout: float = 30.0) -> subprocess.Popen[str]:
    """The process that logged it leads (read from the processes' stderr in threads)."""
    found: asyncio.Future[subprocess.Popen[str]] = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()

    def read(process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            if "leads the schedules" in line and not found.done():
                loop.call_soon_threadsafe(lambda: found.done() or found.set_result(process))

    for process in processes:
        loop.run_in_executor(None, read, process)
    return await asyncio.wait_for(found, timeout)


async def fires(url: str, kill_leader: bool) -> dict[str, float]:
    """Counts and lateness of an ``every=1`` schedule's fires with PROCESSES schedulers, from its first fire."""
    queue, name = f"bench-sched-{uuid.uuid4().hex[:8]}", f"bench-tick-{uuid.uuid4().hex[:8]}"
    processes = [_start(url) for _ in range(PROCESSES)]
    seen: list[Job] = []
    late: list[float] = []
    try:
        async with AsyncOrchestrator(url) as orch:
            await orch.declare_queue(queue)
            await orch.schedule(name, queue, job_from_schema(SCHEMA, JobInput()), every=1)
            leader = asyncio.ensure_future(_leader(processes)) if kill_leader else None

            async def take(until: float) -> None:
                while time.time() < until:
                    job = await orch.receive_message(queue, timeout=max(0.05, until - time.time()))
                    if job is not None:
                        seen.append(job)
                        late.append((time.time() - job.created_at.timestamp()) * 1000)

            first = await orch.receive_message(queue, timeout=30)
            assert first is not None, "no fire within 30 s"
            seen.append(first)
            start = first.created_at.timestamp()
            await take(start + WINDOW - 0.5)
            counted = [job for job in seen if job.created_at.timestamp() < start + WINDOW]
            result = {"fires": float(len(counted)), "repeats": float(len(seen) - len({job.id for job in seen}))}
            if leader is not None:
                victim = await leader
                victim.send_signal(signal.SIGKILL)
                killed = time.time()
                await take(killed + AFTER_KILL)
                after = sorted(job.created_at.timestamp() for job in seen if job.created_at.timestamp() >= killed - 1)
                result["gap"] = max((b - a for a, b in itertools.pairwise(after)), default=float(AFTER_KILL))
                result["repeats"] = float(len(seen) - len({job.id for job in seen}))
            result["late_p50"], result["late_p99"] = percentile(late, 50), percentile(late, 99)
            await orch.unschedule(name)
            await orch.delete_queue(queue)
            return result
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()


def measure(report: Report, name: str, url: str) -> None:
    """Adds the fire rows of backend ``name`` (a broker: the schedulers are other processes) to ``report``."""
    from mindtrace.jobs.backends import from_url

    leader = from_url(url).capabilities.schedules == "leader"
    namespace = f"mindtrace-bench-{uuid.uuid4().hex[:8]}"
    if leader:  # a namespace of its own: the leader is one of the benchmark's processes, not anyone else's
        result = asyncio.run(fires(f"{url}{'&' if '?' in url else '?'}schedules_namespace={namespace}", True))
        asyncio.run(_delete_stream(url, f"{namespace}:schedules"))
    else:
        result = asyncio.run(fires(url, kill_leader=False))
    note = f"{PROCESSES} scheduler processes, counted from the first fire"
    report.add(name, FIRES, "ours", result["fires"], "fires", note)
    report.add(name, REPEATS, "ours", result["repeats"], "ids", note + (", leader killed" if leader else ""))
    report.add(name, LATE_P50, "ours", result["late_p50"], "ms", "fire time to a waiting receiver")
    report.add(name, LATE_P99, "ours", result["late_p99"], "ms", "fire time to a waiting receiver")
    if leader:
        report.add(name, GAP, "ours", result["gap"], "s", f"fires of the {AFTER_KILL} s after the SIGKILL")


async def _delete_stream(url: str, stream: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(stream)


async def _scheduler(url: str) -> None:
    async with AsyncOrchestrator(url) as orch:
        await orch.run_schedules()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"{os.getpid()} %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_scheduler(sys.argv[1]))
