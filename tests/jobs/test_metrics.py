"""PrometheusHook and serve(): counters scraped over HTTP equal a ledgered workload, on every broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job
from mindtrace.jobs.backends.base import Backend
from mindtrace.jobs.metrics import PrometheusHook, serve
from tests.jobs.conformance.flows import FAST_RETRY, detect
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.conftest import BACKENDS


@pytest.fixture(params=[name for name in BACKENDS if "+" not in name])
def backend_name(request: pytest.FixtureRequest) -> str:
    """The brokers, each with its own store (the metrics do not depend on the store)."""
    return str(request.param)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


async def scrape(port: int) -> Samples:
    """Every sample ``/metrics`` serves, by (name, labels)."""
    status, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


class _Handler(AsyncConsumer):
    def __init__(self, queue: str, behaviour: Callable[[Job], Any], **options: Any) -> None:
        super().__init__(queue, **options)
        self.behaviour = behaviour

    async def run(self, job: Job) -> Any:
        return await self.behaviour(job)


@pytest.fixture
def registry() -> CollectorRegistry:
    """A registry of this test's own."""
    return CollectorRegistry()


@pytest.fixture
async def orchestrator(
    backend_factory: Callable[[], Backend], queue: str, registry: CollectorRegistry
) -> AsyncIterator[AsyncOrchestrator]:
    """An orchestrator with a PrometheusHook on ``registry``; ``queue`` deleted afterwards."""
    hook = PrometheusHook(registry, sample_interval=60)
    orchestrator = AsyncOrchestrator(backend_factory(), hooks=[hook])
    try:
        yield orchestrator
    finally:
        hook.close()
        try:
            await orchestrator.delete_queue(queue)
        finally:
            await orchestrator.close()


async def test_scraped_counters_equal_the_ledger_of_a_mixed_workload(
    orchestrator: AsyncOrchestrator, queue: str, registry: CollectorRegistry
) -> None:
    hook = orchestrator.hooks[0]
    assert isinstance(hook, PrometheusHook)
    schema = image_schema(queue)
    await orchestrator.register(schema)
    kinds = {"ok": 5, "flaky": 2, "doomed": 2, "cancelled": 1, "stopped": 1, "slow": 1, "expiring": 1}
    kind_of: dict[str, str] = {}
    jobs: list[Job] = []
    soon = datetime.now(timezone.utc) + timedelta(seconds=0.3)
    for kind, n in kinds.items():
        for _ in range(n):
            fields: dict[str, Any] = {}
            if kind == "slow":
                fields["timeout"] = 0.2
            if kind == "expiring":
                fields["expires_at"] = soon
            job = make_job(schema, len(jobs), **fields)
            kind_of[job.id] = kind
            jobs.append(job)
    for job in jobs:
        await orchestrator.publish(queue, job)
    cancelled = next(job for job in jobs if kind_of[job.id] == "cancelled")
    await orchestrator.cancel(cancelled.id, queue)
    # A broker that can withdraw a queued message does (memory, Redis): no consumer sees that job. One that
    # cannot (RabbitMQ) hands it out, and the consumer settles it as cancelled, unrun.
    withdrawn = await orchestrator.count_queue_messages(queue) == len(jobs) - 1
    await asyncio.sleep(0.35)  # past the expiring job's expires_at

    async def behave(job: Job) -> Any:
        kind = kind_of[job.id]
        if kind == "doomed" or (kind == "flaky" and job.attempts == 0):
            raise ValueError(f"{kind} run")
        if kind == "stopped":  # cancelled while it runs
            await orchestrator.cancel(job.id, queue)
        if kind in ("slow", "stopped"):
            await asyncio.sleep(5)
        return await detect(job)

    # max_retries=1: a flaky job succeeds on its retry, a doomed or slow one is dead-lettered after two runs.
    consumer = _Handler(queue, behave, max_retries=1, **FAST_RETRY)
    consumer.connect(orchestrator)
    handled = 5 + 2 * 2 + 2 * 2 + (0 if withdrawn else 1) + 1 + 2 + 1
    assert await asyncio.wait_for(consumer.consume(num_messages=handled), 30) == handled

    left = [make_job(schema, 100 + i) for i in range(3)]  # stay queued: the ready depth
    for job in left:
        await orchestrator.publish(queue, job)
    await hook.sample()
    health = [True]
    server = serve(0, host="127.0.0.1", registry=registry, health=lambda: health[0])
    try:
        samples = await scrape(server.port)
        labels = {"queue": queue, "schema": schema.name}
        ledger = {
            "published": len(jobs) + len(left),
            "started": 5 + 2 * 2 + 2 * 2 + 1 + 2,
            "succeeded": 5 + 2,
            "failed": 2 + 2 * 2 + 2,  # flaky first runs, doomed runs, timed-out runs
            "retried": 2 + 2 + 1,
            "dead_lettered": 2 + 1,
            "cancelled": 1 + (0 if withdrawn else 1),  # counted by the consumer that settles it
            "expired": 1,
            "timed_out": 2,
            "lease_lost": 0,
        }
        for name, expected in ledger.items():
            assert value(samples, f"mindtrace_jobs_{name}_total", **labels) == expected, name
        assert value(samples, "mindtrace_jobs_dead_lettered_total", reason="failed", **labels) == 2
        assert value(samples, "mindtrace_jobs_dead_lettered_total", reason="timed_out", **labels) == 1
        durations = "mindtrace_jobs_run_duration_seconds_count"
        assert value(samples, durations, **labels) == ledger["started"]
        assert value(samples, durations, outcome="succeeded", **labels) == 7
        assert value(samples, durations, outcome="failed", **labels) == 6
        assert value(samples, durations, outcome="timed_out", **labels) == 2
        assert value(samples, durations, outcome="cancelled", **labels) == 1
        first_runs = 5 + 2 + 2 + 1 + 1
        assert value(samples, "mindtrace_jobs_queue_wait_seconds_count", **labels) == first_runs
        assert value(samples, "mindtrace_jobs_in_progress", **labels) == 0
        ready = await orchestrator.count_queue_messages(queue)
        assert ready == 3
        assert value(samples, "mindtrace_jobs_queue_ready", queue=queue) == ready
        dead = await orchestrator.count_queue_messages(f"{queue}.dlq")
        assert value(samples, "mindtrace_jobs_dead_letter_ready", queue=queue) == dead == 3
        stats = await orchestrator.queue_stats(queue)
        delayed = [
            v for (n, ls), v in samples.items() if n == "mindtrace_jobs_queue_delayed" and ("queue", queue) in ls
        ]
        if "running" in orchestrator.backend.capabilities.queue_counts:
            assert delayed == [stats.delayed] == [0]
        else:  # RabbitMQ: not counted per queue (the delay chain is shared)
            assert delayed == []
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/healthz") == (200, "ok\n")
        health[0] = False
        assert (await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/healthz"))[0] == 503
    finally:
        server.close()


async def test_series_do_not_grow_with_the_number_of_jobs(
    orchestrator: AsyncOrchestrator, queue: str, registry: CollectorRegistry
) -> None:
    schema = image_schema(queue)
    await orchestrator.register(schema)
    consumer = _Handler(queue, detect)
    consumer.connect(orchestrator)

    async def run(n: int) -> int:
        await orchestrator.publish_many(queue, [make_job(schema, i) for i in range(n)])
        assert await asyncio.wait_for(consumer.consume(num_messages=n, concurrency=16), 30) == n
        server = serve(0, host="127.0.0.1", registry=registry)
        try:
            return len(await scrape(server.port))
        finally:
            server.close()

    after_10 = await run(10)
    assert await run(990) == after_10


def test_healthz_follows_health_and_defaults_to_ok() -> None:
    registry = CollectorRegistry()
    with serve(0, host="127.0.0.1", registry=registry) as server:
        assert _get(f"http://127.0.0.1:{server.port}/healthz") == (200, "ok\n")
        assert _get(f"http://127.0.0.1:{server.port}/nope")[0] == 404

    def broken() -> bool:
        raise RuntimeError("no broker")

    with serve(0, host="127.0.0.1", registry=registry, health=broken) as server:
        assert _get(f"http://127.0.0.1:{server.port}/healthz")[0] == 503


ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"  # a file: spawned children import their target from it
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_prometheus_client_is_imported_only_by_the_metrics_module_and_its_absence_is_named(tmp_path: Path) -> None:
    result = _python(
        """
        import sys
        import mindtrace.jobs, mindtrace.jobs.hooks
        assert "prometheus_client" not in sys.modules, "mindtrace.jobs imported prometheus_client"
        import mindtrace.jobs.metrics
        assert "prometheus_client" not in sys.modules, "prepare_multiprocess() would come too late"
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    result = _python(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if not installed
        from mindtrace.jobs.errors import MissingDependencyError
        try:
            import mindtrace.jobs.metrics
        except MissingDependencyError as exc:
            print(exc)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'mindtrace-jobs[prometheus]'" in result.stdout


def test_multiprocess_workers_are_summed_by_the_parent(tmp_path: Path) -> None:
    result = _python(
        """
        import asyncio, multiprocessing, os, urllib.request
        from mindtrace.jobs.metrics import mark_process_dead, prepare_multiprocess, serve

        def worker() -> None:
            from mindtrace.jobs import AsyncOrchestrator, LocalClient
            from mindtrace.jobs.metrics import PrometheusHook
            from tests.jobs.conformance.models import image_schema, make_job

            async def main() -> None:
                async with AsyncOrchestrator(LocalClient(), hooks=[PrometheusHook()]) as orchestrator:
                    schema = image_schema("mp")
                    await orchestrator.register(schema)
                    await orchestrator.publish("mp", make_job(schema, 1))

            asyncio.run(main())

        if __name__ == "__main__":
            path = prepare_multiprocess()
            assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == path and not os.listdir(path)
            context = multiprocessing.get_context("spawn")
            for _ in range(2):
                child = context.Process(target=worker)
                child.start()
                child.join(20)
                assert child.exitcode == 0
                mark_process_dead(child.pid)
            with serve(0, host="127.0.0.1") as server:
                text = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics").read().decode()
            print(text)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert 'mindtrace_jobs_published_total{queue="mp",schema="mp"} 2.0' in result.stdout


async def test_a_settle_refused_for_a_lost_lease_is_counted(redis_url: str, queue: str) -> None:
    # Redis only: a lease that ran out while its holder was frozen, the job taken by another receiver; the
    # frozen holder's settle (through the orchestrator, as its consumer would) is refused with LeaseLostError.
    from mindtrace.jobs import LeaseLostError, RedisClient
    from mindtrace.jobs.policy import Action, Outcome

    registry = CollectorRegistry()
    hook = PrometheusHook(registry, sample_interval=60)
    async with AsyncOrchestrator(RedisClient.from_url(redis_url, visibility_timeout=0.3), hooks=[hook]) as orch:
        try:
            schema = image_schema(queue)
            await orch.register(schema)
            job = make_job(schema, 1)
            await orch.publish(queue, job)
            async with await orch.open_receiver(queue) as first, await orch.open_receiver(queue) as second:
                frozen = await first.get(0)
                assert frozen is not None
                taken = await second.get(5)  # once the first lease ran out
                assert taken is not None
                with pytest.raises(LeaseLostError):
                    await orch.settle(frozen, Outcome(Action.ACK, job, ran=True))
                await orch.settle(taken, Outcome(Action.ACK, job, ran=True))
            with serve(0, host="127.0.0.1", registry=registry) as server:
                samples = await scrape(server.port)
            labels = {"queue": queue, "schema": schema.name}
            assert value(samples, "mindtrace_jobs_lease_lost_total", **labels) == 1
            assert value(samples, "mindtrace_jobs_succeeded_total", **labels) == 1
        finally:
            hook.close()
            await orch.delete_queue(queue)
