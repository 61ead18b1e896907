"""Idle consumer CPU and memory per queued job, each measured in a subprocess of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks.harness import Report

_IDLE = """
import asyncio, json, sys, time
from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, from_url

class Idle(AsyncConsumer):
    async def run(self, job):
        pass

async def main(url, seconds):
    async with AsyncOrchestrator(from_url(url)) as orch:
        queue = "bench-idle-" + str(int(time.time() * 1000))
        await orch.declare_queue(queue)
        consumer = Idle(queue)
        consumer.connect(orch)
        task = asyncio.create_task(consumer.consume(concurrency=16))
        await asyncio.sleep(1.0)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        consumer.stop()
        await task
        await orch.delete_queue(queue)
    print(json.dumps({"cpu_percent": 100 * cpu / wall}))

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""

# Jobs are built and published in batches, so that no list of all of them inflates (or, once freed,
# deflates) the figure; the baseline is taken after one batch went through, with allocator pools warm.
_MEMORY = """
import asyncio, gc, json, sys
from benchmarks.ours import make_jobs
from mindtrace.jobs import AsyncOrchestrator, LocalClient

BATCH = 1000

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

async def main(n):
    async with AsyncOrchestrator(LocalClient()) as orch:
        await orch.declare_queue("warm")
        await orch.publish_many("warm", make_jobs(BATCH))
        await orch.delete_queue("warm")
        await orch.declare_queue("mem")
        gc.collect()
        before = rss()
        for _ in range(0, n, BATCH):
            await orch.publish_many("mem", make_jobs(BATCH))
        gc.collect()
        after = rss()
        count = await orch.count_queue_messages("mem")
    print(json.dumps({"bytes": after - before, "count": count}))

asyncio.run(main(int(sys.argv[1])))
"""


def _start(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _result(process: subprocess.Popen[str], timeout: float) -> dict[str, float]:
    stdout, stderr = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(stderr.strip().splitlines()[-1] if stderr.strip() else "subprocess failed")
    result: dict[str, float] = json.loads(stdout.strip().splitlines()[-1])
    return result


def idle_cpu(report: Report, urls: dict[str, str], seconds: float) -> None:
    """CPU percent of one process per backend whose consumer (concurrency 16) waits on an empty queue.

    The processes run at the same time: idle, they do not disturb one another, and the run is shorter.
    """
    processes = {backend: _start(_IDLE, url, str(seconds)) for backend, url in urls.items()}
    for backend, process in processes.items():
        try:
            result = _result(process, seconds + 60)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            process.kill()
            print(f"  {backend:<14} idle consumer CPU failed: {exc}")
            continue
        report.add(backend, f"idle consumer CPU over {seconds:g}s", "ours", result["cpu_percent"], "%")


def memory_per_100k(report: Report, n: int = 100_000) -> None:
    """Resident memory growth for ``n`` queued jobs on the in-memory backend, scaled to 100,000."""
    result = _result(_start(_MEMORY, str(n)), 300)
    note = f"{result['bytes'] / result['count']:,.0f} B/job over {int(result['count']):,} jobs"
    per_100k = result["bytes"] / result["count"] * 1e5 / 2**20
    report.add("memory", "RSS per 100k queued jobs", "ours", per_100k, "MiB", note)
