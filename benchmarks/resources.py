"""Idle consumer CPU and memory per queued job, each measured in a subprocess of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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

_MEMORY = """
import asyncio, gc, json, sys
from benchmarks.ours import make_jobs
from mindtrace.jobs import AsyncOrchestrator, LocalClient

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

async def main(n):
    jobs = make_jobs(n)
    gc.collect()
    before = rss()
    async with AsyncOrchestrator(LocalClient()) as orch:
        await orch.declare_queue("mem")
        for i in range(0, n, 1000):
            await orch.publish_many("mem", jobs[i:i + 1000])
        del jobs
        gc.collect()
        print(json.dumps({"bytes": rss() - before, "count": await orch.count_queue_messages("mem")}))

asyncio.run(main(int(sys.argv[1])))
"""


def _run(script: str, *args: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "subprocess failed")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def idle_cpu(report: Report, backend: str, url: str, seconds: float) -> None:
    """CPU percent of one process whose consumer (concurrency 16) waits on an empty queue."""
    result = _run(_IDLE, url, str(seconds))
    report.add(backend, f"idle consumer CPU over {seconds:g}s", "ours", result["cpu_percent"], "%")


def memory_per_100k(report: Report) -> None:
    """Resident memory growth for 100,000 queued jobs on the in-memory backend."""
    result = _run(_MEMORY, "100000")
    report.add("memory", "RSS per 100k queued jobs", "ours", result["bytes"] / 2**20, "MiB")
