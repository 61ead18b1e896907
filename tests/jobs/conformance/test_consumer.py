"""Conformance: consuming with at-least-once delivery, retries, dead-lettering, concurrency, cancellation."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, ClosedError, Job, JobInput, JobSchema, UndecodableMessage
from mindtrace.jobs.backends.base import Backend, OutgoingMessage
from mindtrace.jobs.wire import encode
from tests.jobs.conformance.models import DetectionOutput, ImageInput, image_schema, make_job
from tests.jobs.support.api import Api

FAST_RETRY = {"retry_delay": 0.01, "retry_backoff": 1.0}


async def test_consumer_runs_each_job_and_acks_it(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    jobs = [make_job(schema, i) for i in range(5)]
    for job in jobs:
        await api.publish(queue, job)
    seen: list[Job] = []

    async def handler(job: Job) -> DetectionOutput:
        seen.append(job)
        return DetectionOutput(objects=["cat"])

    consumer = api.consumer(queue, handler)
    assert await consumer.consume(num_messages=5) == 5
    assert [j.id for j in seen] == [j.id for j in jobs]
    assert all(isinstance(j.payload.input, ImageInput) for j in seen)
    assert await api.count_queue_messages(queue) == 0
    assert await api.count_queue_messages(queue + ".dlq") == 0
    assert await api.receive_message(queue, timeout=0.2) is None


async def test_failing_job_is_retried_then_dead_lettered_with_its_error(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    await api.publish(queue, job)
    attempts_seen: list[int] = []

    async def handler(job: Job) -> None:
        attempts_seen.append(job.attempts)
        raise RuntimeError(f"boom {len(attempts_seen)}")

    consumer = api.consumer(queue, handler, max_retries=2, **FAST_RETRY)
    assert await consumer.consume(num_messages=3) == 3
    assert attempts_seen == [0, 1, 2]
    assert await api.count_queue_messages(queue) == 0
    assert await api.count_queue_messages(queue + ".dlq") == 1
    dead = await api.receive_message(queue + ".dlq", timeout=5)
    assert dead is not None and dead.id == job.id
    assert dead.attempts == 3
    assert dead.error == "RuntimeError: boom 3"
    assert dead.payload.input == job.payload.input


async def test_dead_letters_can_be_requeued_and_cleaned(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    for i in range(3):
        await api.publish(queue, make_job(schema, i))

    async def handler(job: Job) -> None:
        raise ValueError("bad")

    await api.consumer(queue, handler, max_retries=0).consume(num_messages=3)
    assert await api.count_queue_messages(queue + ".dlq") == 3
    assert await api.requeue_dead_letters(queue, limit=2) == 2
    assert await api.count_queue_messages(queue) == 2
    requeued = await api.receive_message(queue, timeout=5)
    assert requeued is not None and requeued.attempts == 0 and requeued.error is None
    assert await api.clean_queue(queue + ".dlq") == 1


async def test_a_retry_that_succeeds_is_not_dead_lettered(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await api.publish(queue, make_job(schema, 1))
    runs: list[int] = []

    async def handler(job: Job) -> None:
        runs.append(job.attempts)
        if len(runs) == 1:
            raise RuntimeError("transient")

    await api.consumer(queue, handler, max_retries=3, **FAST_RETRY).consume(num_messages=2)
    assert runs == [0, 1]
    assert await api.count_queue_messages(queue + ".dlq") == 0
    assert await api.count_queue_messages(queue) == 0


async def test_retry_waits_for_its_delay(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await api.publish(queue, make_job(schema, 1))
    times: list[float] = []
    loop = asyncio.get_running_loop()

    async def handler(job: Job) -> None:
        times.append(loop.time())
        if len(times) == 1:
            raise RuntimeError("later")

    await api.consumer(queue, handler, max_retries=1, retry_delay=0.5).consume(num_messages=2)
    assert times[1] - times[0] >= 0.45
    assert await api.count_queue_messages(queue + ".dlq") == 0


async def test_output_that_does_not_match_the_schema_fails_the_job(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await api.publish(queue, make_job(schema, 1))

    async def handler(job: Job) -> Any:
        return {"accuracy": "not a number"}

    await api.consumer(queue, handler, max_retries=0).consume(num_messages=1)
    dead = await api.receive_message(queue + ".dlq", timeout=5)
    assert dead is not None
    assert dead.error is not None and "DetectionOutput" in dead.error


async def test_undecodable_message_is_dead_lettered_and_the_queue_goes_on(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    garbage = b"\x00\xffnot a job{"
    backend = api.orchestrator.backend
    await _publish_raw(api, queue, garbage)
    job = make_job(schema, 1)
    await api.publish(queue, job)
    seen: list[str] = []

    async def handler(job: Job) -> None:
        seen.append(job.id)

    assert await api.consumer(queue, handler).consume(num_messages=2) == 2
    assert seen == [job.id]
    dead = await api.receive_message(queue + ".dlq", timeout=5)
    assert dead is not None
    assert isinstance(dead.payload.input, UndecodableMessage)
    assert dead.payload.input.raw == garbage
    assert dead.payload.input.source_queue == queue
    assert "not JSON" in (dead.error or "")
    assert backend is api.orchestrator.backend


async def test_schema_mismatched_input_is_dead_lettered_with_the_validation_error(api: Api, queue: str) -> None:
    await api.register(image_schema(queue))

    class OtherInput(JobInput):
        image_path: int

    wrong = Job(payload=JobSchema(name=queue, input=OtherInput(image_path=3)))
    raw = encode(wrong).replace(b'"image_path":3', b'"image_path":{"nested":true}')
    await _publish_raw(api, queue, raw)

    async def handler(job: Job) -> None:
        raise AssertionError("must not run")

    await api.consumer(queue, handler).consume(num_messages=1)
    dead = await api.receive_message(queue + ".dlq", timeout=5)
    assert dead is not None and isinstance(dead.payload.input, UndecodableMessage)
    assert dead.id == wrong.id
    assert "image_path" in (dead.error or "")
    assert base64.b64decode(dead.payload.input.raw_base64) == raw


async def test_receive_message_skips_undecodable_messages_to_the_dead_letter_queue(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await _publish_raw(api, queue, b"[1, 2, 3]")
    job = make_job(schema, 1)
    await api.publish(queue, job)
    received = await api.receive_message(queue, timeout=5)
    assert received is not None and received.id == job.id
    assert await api.count_queue_messages(queue + ".dlq") == 1


async def test_n_jobs_through_k_consumers_run_exactly_once(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    jobs = [make_job(schema, i) for i in range(120)]
    await api.publish_many(queue, jobs)
    counts: Counter[str] = Counter()
    done = asyncio.Event()

    async def handler(job: Job) -> None:
        counts[job.id] += 1
        await asyncio.sleep(0)
        if sum(counts.values()) >= len(jobs):
            done.set()

    consumers = [api.consumer(queue, handler) for _ in range(3)]
    tasks = [asyncio.create_task(c.consume(concurrency=4)) for c in consumers]
    await asyncio.wait_for(done.wait(), 30)
    for consumer in consumers:
        consumer.stop()
    handled = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert sum(handled) == len(jobs)
    assert set(counts) == {j.id for j in jobs}
    assert max(counts.values()) == 1
    assert await api.count_queue_messages(queue) == 0


async def test_concurrency_runs_jobs_at_the_same_time(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    for i in range(4):
        await api.publish(queue, make_job(schema, i))
    barrier = asyncio.Barrier(4) if hasattr(asyncio, "Barrier") else None
    running = 0
    peak = 0

    async def handler(job: Job) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if barrier is not None:
            await asyncio.wait_for(barrier.wait(), 10)
        else:
            await asyncio.sleep(0.3)
        running -= 1

    assert await api.consumer(queue, handler).consume(num_messages=4, concurrency=4) == 4
    assert peak == 4


async def test_stop_returns_after_the_running_job(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    for i in range(3):
        await api.publish(queue, make_job(schema, i))
    seen: list[str] = []
    holder: dict[str, Any] = {}

    async def handler(job: Job) -> None:
        seen.append(job.id)
        holder["consumer"].stop()

    holder["consumer"] = consumer = api.consumer(queue, handler)
    assert await asyncio.wait_for(consumer.consume(), 10) == 1
    assert len(seen) == 1
    assert await api.count_queue_messages(queue) == 2


async def test_idle_consumer_stops_when_asked(api: Api, queue: str) -> None:
    await api.declare_queue(queue)

    async def handler(job: Job) -> None:
        raise AssertionError("no job was published")

    consumer = api.consumer(queue, handler)
    task = asyncio.create_task(consumer.consume(concurrency=2))
    await asyncio.sleep(0.3)
    assert not task.done()
    consumer.stop()
    assert await asyncio.wait_for(task, 10) == 0


async def _cancel_consume_mid_job(api: Api, queue: str, running: Job, published_meanwhile: list[Job]) -> None:
    """Publish ``running``, let a consumer start it, publish ``published_meanwhile``, then cancel consume()."""
    await api.publish(queue, running)
    started = asyncio.Event()

    async def handler(job: Job) -> None:
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(api.consumer(queue, handler).consume())
    await asyncio.wait_for(started.wait(), 10)
    for job in published_meanwhile:
        await api.publish(queue, job)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelling_consume_gives_the_running_job_back(async_api: Api, queue: str) -> None:
    api = async_api
    schema = image_schema(queue)
    await api.register(schema)
    job = make_job(schema, 1)
    await _cancel_consume_mid_job(api, queue, job, [])
    back = await api.receive_message(queue, timeout=10)
    assert back is not None and back.id == job.id
    assert back.attempts == 0


async def _publish_raw(api: Api, queue: str, body: bytes) -> None:
    """Put foreign bytes on a queue through the backend contract, as another client would."""
    backend = api.orchestrator.backend
    if api.kind == "sync":
        from mindtrace.jobs._loop_thread import get_loop_thread

        await asyncio.to_thread(get_loop_thread().run, backend.publish(queue, OutgoingMessage(body, 0, "raw")), "test")
    else:
        await backend.publish(queue, OutgoingMessage(body, 0, "raw"))


async def test_stopping_a_busy_consumer_never_charges_or_dead_letters_a_job(api: Api, queue: str) -> None:
    # Jobs claimed or prefetched by a consumer that stops are given back, not counted as lost runs: with
    # max_retries=0 a single charge would dead-letter them.
    schema = image_schema(queue)
    await api.register(schema)
    jobs = [make_job(schema, i) for i in range(12)]
    for job in jobs:
        await api.publish(queue, job)
    first_run: list[str] = []
    holder: dict[str, Any] = {}

    async def stop_after_two(job: Job) -> None:
        first_run.append(job.id)
        if len(first_run) == 2:
            holder["consumer"].stop()
        await asyncio.sleep(0.05)

    holder["consumer"] = consumer = api.consumer(queue, stop_after_two, max_retries=0)
    await asyncio.wait_for(consumer.consume(concurrency=4), 20)
    assert await api.count_queue_messages(queue + ".dlq") == 0
    rest: list[Job] = []

    async def collect(job: Job) -> None:
        rest.append(job)

    remaining = len(jobs) - len(first_run)
    assert await asyncio.wait_for(api.consumer(queue, collect, max_retries=0).consume(num_messages=remaining), 20)
    assert sorted([j.id for j in rest] + first_run) == sorted(j.id for j in jobs)
    assert all(j.attempts == 0 and j.error is None for j in rest)
    assert await api.count_queue_messages(queue + ".dlq") == 0


async def test_a_job_given_back_goes_ahead_of_the_jobs_waiting_at_its_priority(async_api: Api, queue: str) -> None:
    api = async_api
    schema = image_schema(queue)
    await api.register(schema)
    first, *others = [make_job(schema, i, priority=3) for i in range(4)]
    urgent = make_job(schema, 9, priority=7)
    await _cancel_consume_mid_job(api, queue, first, [*others, urgent])
    order = [(await api.receive_message(queue, timeout=10)) for _ in range(5)]
    assert [j.id for j in order if j is not None] == [urgent.id, first.id, *(j.id for j in others)]
    assert order[1] is not None and order[1].attempts == 0


async def test_closing_the_backend_gives_running_jobs_back_uncharged(
    api: Api, queue: str, backend_factory: Callable[[], Backend]
) -> None:
    # The backend closed under running jobs (interpreter exit, or a close whose grace ran out): the broker gets
    # them back uncharged, as at a stop(), so with max_retries=0 none is dead-lettered when a later consumer
    # takes them.
    if not api.orchestrator.backend.capabilities.shared_queues:
        pytest.skip("in-memory queues end with their client: nothing is left to give back to")
    schema = image_schema(queue)
    await api.register(schema)
    jobs = [make_job(schema, i) for i in range(6)]
    for job in jobs:
        await api.publish(queue, job)
    started: list[str] = []
    release = asyncio.Event()

    async def hold(job: Job) -> None:
        started.append(job.id)
        await release.wait()

    consuming = asyncio.create_task(api.consumer(queue, hold, max_retries=0).consume(concurrency=4))
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while len(started) < 4:
            assert asyncio.get_running_loop().time() < deadline, f"only {len(started)} jobs started"
            await asyncio.sleep(0.02)
        await asyncio.wait_for(api.run_on_loop(api.orchestrator.backend.close()), 10)
    finally:
        release.set()
        # What consume() does once its orchestrator is closed under it is not this test's concern.
        await asyncio.wait_for(asyncio.gather(consuming, return_exceptions=True), 10)
    async with AsyncOrchestrator(backend_factory()) as reopened:
        await reopened.register(schema)
        assert await reopened.count_queue_messages(queue) == len(jobs)
        ran: list[Job] = []

        class Collect(AsyncConsumer):
            async def run(self, job: Job) -> None:
                ran.append(job)

        collector = Collect(queue, max_retries=0)
        collector.connect(reopened)
        assert await asyncio.wait_for(collector.consume(num_messages=len(jobs)), 20) == len(jobs)
        assert sorted(job.id for job in ran) == sorted(job.id for job in jobs)
        assert all(job.attempts == 0 and job.error is None for job in ran), [(j.attempts, j.error) for j in ran]
        assert await reopened.count_queue_messages(queue + ".dlq") == 0


async def test_num_messages_counts_jobs_run_not_jobs_handed_back_unrun(
    api: Api, queue: str, backend_factory: Callable[[], Backend]
) -> None:
    # A first consumer holds 4 of 16 jobs when it loses its backend (another client whose connection closes
    # under it; on the in-process backend, which no other client shares, it is stopped). The held jobs come
    # back, on RabbitMQ flagged as redelivered, which the next consumer records on the job and hands back
    # (attempts + 1, republished): bookkeeping, not a run. consume(num_messages=16) still runs 16 jobs.
    schema = image_schema(queue)
    await api.register(schema)
    jobs = [make_job(schema, i) for i in range(16)]
    await api.publish_many(queue, jobs)
    shared = api.orchestrator.backend.capabilities.shared_queues
    first = api.sibling(backend_factory()) if shared else api
    held: list[str] = []
    let_go = asyncio.Event()

    async def hold(job: Job) -> None:
        held.append(job.id)
        await let_go.wait()
        if shared:
            # Not a success: its record must not say SUCCEEDED (the records' store may outlive the closed backend,
            # and a redelivery of a job that succeeded is settled unrun, which this test does not count as a run).
            raise RuntimeError("let go after the backend closed")

    holder = first.consumer(queue, hold)
    task = asyncio.create_task(holder.consume(concurrency=4))
    try:
        while len(held) < 4:
            assert not task.done(), task
            await asyncio.sleep(0.02)
        if shared:
            await first.run_on_loop(first.orchestrator.backend.close())
        else:
            holder.stop()
    finally:
        let_go.set()
        with contextlib.suppress(ClosedError):
            await asyncio.wait_for(task, 20)
        if first is not api:
            await first.close()
    runs: Counter[str] = Counter()

    async def count(job: Job) -> None:
        runs[job.id] += 1

    left = len(jobs) if shared else len(jobs) - len(held)
    assert await asyncio.wait_for(api.consumer(queue, count).consume(num_messages=left), 30) == left
    assert sum(runs.values()) == left
    assert set(runs) == {j.id for j in jobs} - (set() if shared else set(held))


async def _consume_until_closed(
    api: Api, backend_factory: Callable[[], Backend], queue: str, handler: Any, started: list[str], **close: Any
) -> tuple[int, Api]:
    """Publish 12 jobs, consume them 4 at a time through a second orchestrator (the same one on a backend
    no other client shares), close that orchestrator once 6 jobs started; what consume() returned."""
    schema = image_schema(queue)
    await api.register(schema)
    await api.publish_many(queue, [make_job(schema, i) for i in range(12)])
    closing = api.sibling(backend_factory()) if api.orchestrator.backend.capabilities.shared_queues else api
    await closing.register(schema)
    task = asyncio.create_task(closing.consumer(queue, handler).consume(concurrency=4))
    while len(started) < 6:
        assert not task.done(), task
        await asyncio.sleep(0.01)
    await asyncio.wait_for(closing.close(**close), 20)
    # close() returns once its consumers' consume() calls have (a sync one then only has its thread to leave)
    return await asyncio.wait_for(task, 2), closing


async def test_closing_the_orchestrator_lets_running_jobs_finish_and_be_acked(
    api: Api, queue: str, backend_factory: Callable[[], Backend]
) -> None:
    started: list[str] = []
    finished: list[str] = []

    async def job_of_300_ms(job: Job) -> None:
        started.append(job.id)
        await asyncio.sleep(0.3)
        finished.append(job.id)

    handled, closing = await _consume_until_closed(api, backend_factory, queue, job_of_300_ms, started)
    assert handled == len(finished) == len(started) >= 6  # every job started finished within the grace period
    assert len(set(started)) == len(started)
    if closing is not api:  # the queue outlives the closed client: finished jobs never run again
        rest = await _take_the_rest(api, queue, 12 - len(finished))
        assert {j.id for j in rest}.isdisjoint(finished)
        assert all(j.attempts == 0 and j.error is None for j in rest)


async def test_closing_the_orchestrator_gives_back_uncharged_the_jobs_still_running_after_the_grace(
    api: Api, queue: str, backend_factory: Callable[[], Backend]
) -> None:
    started: list[str] = []
    let_go = asyncio.Event()

    async def slow(job: Job) -> None:
        started.append(job.id)
        if len(started) > 4:
            await let_go.wait()

    try:
        handled, closing = await _consume_until_closed(api, backend_factory, queue, slow, started, grace=0.2)
    finally:
        let_go.set()  # a blocking run is not interrupted: its thread ends once the test lets it
    assert handled == 4
    if closing is not api:
        rest = await _take_the_rest(api, queue, 8)
        assert {j.id for j in rest}.isdisjoint(started[:4])
        assert set(started[4:]) <= {j.id for j in rest}  # cut short: given back, uncharged
        assert all(j.attempts == 0 and j.error is None for j in rest)


async def _take_the_rest(api: Api, queue: str, left: int) -> list[Job]:
    """Consume exactly the ``left`` jobs still queued (and check nothing else is, dead-lettered included)."""
    rest: list[Job] = []

    async def collect(job: Job) -> None:
        rest.append(job)

    assert await asyncio.wait_for(api.consumer(queue, collect).consume(num_messages=left), 20) == left
    extra = await api.receive_message(queue, timeout=0.3)
    assert extra is None, (extra.id[:8], sorted((j.id[:8], j.attempts) for j in rest))
    assert await api.count_queue_messages(queue + ".dlq") == 0
    return rest
