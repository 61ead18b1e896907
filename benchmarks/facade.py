"""The cost of one blocking call: our loop-thread hop against a bare run_coroutine_threadsafe and anyio's portal."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

from benchmarks.harness import Report, rate


async def _noop() -> None:
    return None


def _per_call_us(call: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n * 1e6


def measure(report: Report, n: int, rounds: int = 5) -> None:
    """Microseconds per no-op call each way (best of ``rounds`` interleaved rounds), and calls/s from 8 threads.

    anyio's portal is measured when anyio is installed (the ``bench`` extra); the core does not need it.
    """
    from mindtrace.jobs._loop_thread import get_loop_thread

    try:
        from anyio.from_thread import start_blocking_portal
    except ImportError:
        start_blocking_portal = None

    loop_thread = get_loop_thread()
    loop = loop_thread.loop
    per_round = max(1, n // rounds)
    best = {"raw": float("inf"), "ours": float("inf"), "anyio": float("inf")}
    with contextlib.ExitStack() as stack:
        calls: dict[str, Callable[[], object]] = {
            "raw": lambda: asyncio.run_coroutine_threadsafe(_noop(), loop).result(),
            "ours": lambda: loop_thread.run(_noop(), "bench"),
        }
        if start_blocking_portal is not None:
            portal = stack.enter_context(start_blocking_portal())
            calls["anyio"] = lambda: portal.call(_noop)
        for call in calls.values():
            _per_call_us(call, 200)  # warm-up
        for _ in range(rounds):
            for who, call in calls.items():
                best[who] = min(best[who], _per_call_us(call, per_round))
    report.add("facade", "no-op call", "raw", best["raw"], "us", "bare run_coroutine_threadsafe")
    report.add("facade", "no-op call", "ours", best["ours"], "us", f"{best['ours'] / best['raw']:.2f}x bare")
    if "anyio" in calls:
        report.add("facade", "no-op call", "anyio", best["anyio"], "us", "BlockingPortal.call")

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
