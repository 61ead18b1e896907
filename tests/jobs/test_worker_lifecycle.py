"""The worker lifecycle in-process: shutdown requests, leases kept during the grace, lost cancels, logs, config."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Consumer, Job, UsageError, from_url, job_from_schema
from mindtrace.jobs.backends.base import Delivery, Receiver
from mindtrace.jobs.cli.worker import mask_url, resolve_config
from mindtrace.jobs.errors import ConfigurationError
from mindtrace.jobs.logs import configure_logging
from mindtrace.jobs.worker import ShutdownRequest, run_until_signalled
from tests.jobs.cli_consumers import Nap, schema_for


async def eventually(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


class Napper(AsyncConsumer):
    """Sleeps the job's ``seconds``, counting its starts in ``runs``."""

    def __init__(self, queue: str, runs: Counter[str]) -> None:
        super().__init__(queue)
        self.runs = runs

    async def run(self, job: Job) -> None:
        self.runs[job.id] += 1
        assert isinstance(job.payload.input, Nap)
        await asyncio.sleep(job.payload.input.seconds)


async def test_leases_stay_renewed_while_running_jobs_finish_during_shutdown(redis_url: str) -> None:
    # A 1.5-s lease, 3-s jobs: unless the stopping consumer keeps renewing their leases through its grace, the
    # second consumer claims them again once the leases expire and they run twice.
    queue = f"life-{uuid.uuid4().hex[:10]}"
    runs: Counter[str] = Counter()
    async with (
        AsyncOrchestrator(from_url(redis_url, visibility_timeout=1.5)) as first,
        AsyncOrchestrator(from_url(redis_url, visibility_timeout=1.5)) as second,
    ):
        await first.register(schema_for(queue))
        await second.register(schema_for(queue))
        try:
            ids = [
                str(h)
                for h in await first.publish_many(
                    queue, [job_from_schema(schema_for(queue), Nap(seconds=3.0)) for _ in range(2)]
                )
            ]
            stopping, other = Napper(queue, runs), Napper(queue, runs)
            stopping.connect(first)
            other.connect(second)
            request = ShutdownRequest()
            task = asyncio.create_task(run_until_signalled([stopping], concurrency=2, request=request))
            await eventually(lambda: sum(runs.values()) >= 2)
            rival = asyncio.create_task(other.consume(concurrency=2))
            request.request()
            assert await asyncio.wait_for(task, 10) == 2
            await asyncio.sleep(1.0)  # past the 1.5-s lease of a job that was not renewed
            assert runs == Counter(ids), runs
            for job_id in ids:
                info = await first.job_info(job_id, queue)
                assert info.attempts == 1
            rival.cancel()
            await asyncio.gather(rival, return_exceptions=True)
        finally:
            await first.delete_queue(queue)


async def test_a_cancel_swallowed_by_the_receiver_does_not_hang_the_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    # A driver whose wait swallows the first cancellation (asyncio.wait_for before 3.12 does when its wait ends
    # at the same time): stop() must cancel the waiting worker again, or shutdown() waits forever.
    original = AsyncOrchestrator.open_receiver
    swallowed = []

    async def open_receiver(self: AsyncOrchestrator, queue: str, **options: Any) -> Receiver:
        receiver = await original(self, queue, **options)
        get = receiver.get

        async def deaf_get(timeout: float | None = None) -> Delivery | None:
            try:
                return await get(timeout)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)
                return await get(timeout)

        receiver.get = deaf_get  # type: ignore[method-assign]
        return receiver

    monkeypatch.setattr(AsyncOrchestrator, "open_receiver", open_receiver)
    async with AsyncOrchestrator("memory://") as orchestrator:
        await orchestrator.register(schema_for("idle"))
        consumer = Napper("idle", Counter())
        consumer.connect(orchestrator)
        task = asyncio.create_task(consumer.consume())
        await eventually(lambda: consumer._idle)
        started = time.monotonic()
        assert await asyncio.wait_for(consumer.shutdown(5.0), 3) == (0, 0)
        assert await asyncio.wait_for(task, 3) == 0
        assert swallowed and time.monotonic() - started < 1.0


async def test_a_second_request_cuts_the_grace_short() -> None:
    async with AsyncOrchestrator("memory://") as orchestrator:
        schema = schema_for("cut")
        await orchestrator.register(schema)
        runs: Counter[str] = Counter()
        consumer = Napper("cut", runs)
        consumer.connect(orchestrator)
        await orchestrator.publish("cut", job_from_schema(schema, Nap(seconds=30)))
        request = ShutdownRequest()
        task = asyncio.create_task(run_until_signalled([consumer], shutdown_timeout=20, request=request))
        await eventually(lambda: runs)
        request.request()
        await asyncio.sleep(0.1)
        assert not task.done()
        started = time.monotonic()
        request.request()
        assert await asyncio.wait_for(task, 3) == 0
        assert time.monotonic() - started < 1.5
        assert await orchestrator.count_queue_messages("cut") == 1  # given back


def test_handle_signals_outside_the_main_thread_is_a_usage_error() -> None:
    class Blocking(Consumer):
        def run(self, job: Job) -> None:
            return None

    errors: list[BaseException] = []

    def consume() -> None:
        try:
            Blocking("anywhere").consume(handle_signals=True)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], UsageError) and "main thread" in str(errors[0])


async def test_json_logs_carry_the_running_jobs_fields() -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    try:
        user = logging.getLogger("user.code")

        class Talker(AsyncConsumer):
            async def run(self, job: Job) -> None:
                user.info("inside")
                try:
                    raise ValueError("boom")
                except ValueError:
                    user.exception("failed")

        async with AsyncOrchestrator("memory://") as orchestrator:
            schema = schema_for("talk")
            await orchestrator.register(schema)
            handle = await orchestrator.publish("talk", job_from_schema(schema, Nap()))
            consumer = Talker("talk")
            consumer.connect(orchestrator)
            await consumer.consume(num_messages=1)
            user.info("outside")
    finally:
        logging.getLogger().handlers.clear()
    records = {r["message"]: r for r in map(json.loads, stream.getvalue().splitlines())}
    assert (records["inside"]["job_id"], records["inside"]["queue"], records["inside"]["attempt"]) == (
        str(handle),
        "talk",
        1,
    )
    assert "ValueError: boom" in records["failed"]["exc_info"] and records["failed"]["job_id"] == str(handle)
    assert records["outside"]["job_id"] is None and "exc_info" not in records["outside"]


def test_flag_beats_environment_beats_default_and_bad_values_name_their_source() -> None:
    args = argparse.Namespace(targets=["m:C"], url=None, concurrency="4", shutdown_timeout=None, processes=None)
    env = {"MINDTRACE_JOBS_URL": "redis://h:6379/0", "MINDTRACE_JOBS_CONCURRENCY": "2", "MINDTRACE_JOBS_PROCESSES": "3"}
    config = resolve_config(args, env)
    assert (config.url, config.concurrency, config.processes, config.shutdown_timeout) == (
        "redis://h:6379/0",
        4,
        3,
        25.0,
    )
    with pytest.raises(ConfigurationError, match="MINDTRACE_JOBS_SHUTDOWN_TIMEOUT"):
        resolve_config(args, {**env, "MINDTRACE_JOBS_SHUTDOWN_TIMEOUT": "-1"})
    with pytest.raises(ConfigurationError, match="--concurrency"):
        resolve_config(argparse.Namespace(targets=["m:C"], concurrency="0"), env)
    with pytest.raises(ConfigurationError, match="memory://"):
        resolve_config(argparse.Namespace(targets=["m:C"], url="memory://"), {})


def test_schedules_run_in_a_worker_unless_the_flag_or_the_environment_says_no() -> None:
    url = {"MINDTRACE_JOBS_URL": "redis://h:6379/0"}
    assert resolve_config(argparse.Namespace(targets=["m:C"]), url).schedules is True
    assert resolve_config(argparse.Namespace(targets=["m:C"], no_schedules=True), url).schedules is False
    assert (
        resolve_config(argparse.Namespace(targets=["m:C"]), {**url, "MINDTRACE_JOBS_NO_SCHEDULES": "1"}).schedules
        is False
    )
    assert (
        resolve_config(argparse.Namespace(targets=["m:C"]), {**url, "MINDTRACE_JOBS_NO_SCHEDULES": "0"}).schedules
        is True
    )
    with pytest.raises(ConfigurationError, match="MINDTRACE_JOBS_NO_SCHEDULES"):
        resolve_config(argparse.Namespace(targets=["m:C"]), {**url, "MINDTRACE_JOBS_NO_SCHEDULES": "maybe"})


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("amqp://guest:s3cret@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    assert mask_url("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"
