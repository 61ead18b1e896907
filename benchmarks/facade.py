"""The cost of one blocking call: our loop-thread hop against a bare run_coroutine_threadsafe and anyio's portal."""

from __future__ import annotations

import asyncio
import threading
import time

from benchmarks.harness import Report, rate


async def _noop() -> None:
    return None


def measure(report: Report, n: int) -> None:
    """Microseconds per no-op call, each way, and calls/s from 8 threads through ours."""
    from mindtrace.jobs._loop_thread import get_loop_thread

    loop_thread = get_loop_thread()
    for _ in range(200):
        asyncio.run_coroutine_threadsafe(_noop(), loop_thread.loop).result()
    start = time.perf_counter()
    for _ in range(n):
        asyncio.run_coroutine_threadsafe(_noop(), loop_thread.loop).result()
    bare = (time.perf_counter() - start) / n * 1e6
    report.add("facade", "no-op call", "raw", bare, "us", "bare run_coroutine_threadsafe")
    start = time.perf_counter()
    for _ in range(n):
        loop_thread.run(_noop(), "bench")
    ours = (time.perf_counter() - start) / n * 1e6
    report.add("facade", "no-op call", "ours", ours, "us", f"{ours / bare:.2f}x bare")
    try:
        from anyio.from_thread import start_blocking_portal

        with start_blocking_portal() as portal:
            start = time.perf_counter()
            for _ in range(n):
                portal.call(_noop)
            report.add(
                "facade", "no-op call", "anyio", (time.perf_counter() - start) / n * 1e6, "us", "BlockingPortal.call"
            )
    except ImportError:
        pass

    per_thread = max(1, n // 8)

    def worker() -> None:
        for _ in range(per_thread):
            loop_thread.run(_noop(), "bench")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.add("facade", "no-op calls, 8 threads", "ours", rate(per_thread * 8, time.perf_counter() - start), "calls/s")
