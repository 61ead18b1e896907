"""What tracing costs a drain on memory: no hooks, the default TracingHook unconfigured, the API's no-op, an SDK.

``python -m benchmarks.tracing [--jobs N] [--rounds R]`` (needs the ``otel`` extra; the SDK row needs
``opentelemetry-sdk``). Rounds are interleaved; each figure is the median jobs/s, with its ratio to no hooks.
Not part of ``python -m benchmarks``, which runs with whatever ``default_hooks()`` gives.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence

from benchmarks.harness import median, rate
from benchmarks.ours import _Counter, make_jobs, queue_name
from mindtrace.jobs import AsyncOrchestrator, LocalClient
from mindtrace.jobs.hooks import Hook


async def drain(hooks: Sequence[Hook], n: int, concurrency: int) -> float:
    """Jobs/s for one consumer draining n no-op jobs published with ``hooks``, run with them too."""
    async with AsyncOrchestrator(LocalClient(), hooks=hooks) as orch:
        queue = queue_name()
        await orch.declare_queue(queue)
        jobs = make_jobs(n)
        for i in range(0, n, 1000):
            await orch.publish_many(queue, jobs[i : i + 1000])
        consumer = _Counter(queue, n, asyncio.Event())
        consumer.connect(orch)
        start = time.perf_counter()
        handled = await consumer.consume(num_messages=n, concurrency=concurrency)
        elapsed = time.perf_counter() - start
        assert handled == n, (handled, n)
    return rate(n, elapsed)


def variants() -> dict[str, Callable[[], Sequence[Hook]]]:
    """The hook sets measured, by name."""
    from opentelemetry import trace

    from mindtrace.jobs.tracing import TracingHook

    class NoOpTracing(TracingHook):
        """The hook without its lazy check: spans through the API's proxy tracer, no SDK behind it."""

        def _get_tracer(self) -> trace.Tracer:
            return trace.get_tracer("mindtrace.jobs")

    found: dict[str, Callable[[], Sequence[Hook]]] = {
        "no hooks": lambda: (),
        "a Hook() that does nothing (the seam)": lambda: (Hook(),),
        "TracingHook, no provider (the default)": lambda: (TracingHook(),),
        "API no-op tracer (no lazy check)": lambda: (NoOpTracing(),),
    }
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return found
    provider = TracerProvider()  # recording spans, no processor: the cost of the spans themselves
    found["SDK TracerProvider, no exporter"] = lambda: (TracingHook(tracer_provider=provider),)
    return found


async def main(args: argparse.Namespace) -> None:
    """Interleave rounds of every variant at each concurrency; print medians and ratios."""
    measured = variants()
    for concurrency in args.concurrency:
        figures: dict[str, list[float]] = {name: [] for name in measured}
        await drain((), args.jobs, concurrency)  # warm-up
        for _ in range(args.rounds):
            for name, hooks in measured.items():
                figures[name].append(await drain(hooks(), args.jobs, concurrency))
        base = median(figures["no hooks"])
        print(f"drain on memory, {args.jobs} jobs, concurrency {concurrency}, median of {args.rounds} rounds")
        for name, values in figures.items():
            print(f"  {name:42} {median(values):>9,.0f} jobs/s  x{median(values) / base:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    asyncio.run(main(parser.parse_args()))
