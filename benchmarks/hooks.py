"""The drain with the PrometheusHook installed beside the hook-free drain, interleaved, per backend."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from benchmarks import ours
from benchmarks.harness import Report, best_of
from mindtrace.jobs.backends.base import Backend
from mindtrace.jobs.hooks import Hook

#: The scenario rows: the hook-free drain and the one with the PrometheusHook, at the same concurrency.
DRAIN = "drain c={c} (hooks section)"
WHO_BARE, WHO_PROMETHEUS = "no hook", "prometheus"


def _prometheus() -> Sequence[Hook]:
    from prometheus_client import CollectorRegistry

    from mindtrace.jobs.metrics import PrometheusHook

    return [PrometheusHook(CollectorRegistry())]  # a registry per round: no series carried over


def measure(
    report: Report, name: str, factory: Callable[[], Backend], n: int, rounds: int, concurrency: int
) -> float | None:
    """Adds both drains' best rounds to ``report``; the ratio with the hook / without (None: not installed)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        report.skipped.append(f"{name}: hooks section (prometheus-client not installed)")
        return None
    best = asyncio.run(
        best_of(
            rounds,
            {
                WHO_BARE: lambda: ours.drain(factory, n, concurrency),
                WHO_PROMETHEUS: lambda: ours.drain(factory, n, concurrency, _prometheus),
            },
        )
    )
    scenario = DRAIN.format(c=concurrency)
    report.add(name, scenario, WHO_BARE, best[WHO_BARE], "jobs/s")
    report.add(name, scenario, WHO_PROMETHEUS, best[WHO_PROMETHEUS], "jobs/s", "PrometheusHook installed")
    return best[WHO_PROMETHEUS] / best[WHO_BARE] if best[WHO_BARE] else None
