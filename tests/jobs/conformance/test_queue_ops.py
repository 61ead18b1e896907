"""Conformance: queue operations, round trips, priority, routing and bad input, on every backend and API."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pydantic
import pytest

from mindtrace.jobs import (
    QUEUE_MAPPING,
    InvalidQueueNameError,
    Job,
    JobSchema,
    JobType,
    JobValidationError,
    PayloadTooLargeError,
    QueueConflictError,
    QueueNotFoundError,
    job_from_schema,
)
from tests.jobs.conformance.models import DetectionOutput, ImageInput, image_schema, make_job
from tests.jobs.support.api import Api


async def test_round_trip_keeps_the_job_and_types_the_input(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    assert await api.register(schema) == queue
    job = make_job(schema, 7, priority=3, entrypoint="detect.py", metadata={"owner": "ml"})
    assert await api.publish(queue, job) == job.id
    received = await api.receive_message(queue, timeout=5)
    assert received == job
    assert isinstance(received.payload.input, ImageInput)
    assert received.payload.input.tags == ["7"]
    assert received.payload.output is DetectionOutput
    assert received.created_at.tzinfo is not None
    assert await api.receive_message(queue) is None


async def test_output_given_as_instance_comes_back_equal(api: Api, queue: str) -> None:
    schema = JobSchema(name=queue, input=ImageInput(image_path="/x"), output=DetectionOutput(objects=["cat"]))
    await api.register(schema)
    job = Job(name="n", job_type=JobType.CLASSIFICATION, payload=schema, priority=5)
    await api.publish(queue, job)
    received = await api.receive_message(queue, timeout=5)
    assert received == job
    assert received.payload.output == DetectionOutput(objects=["cat"])


async def test_unregistered_schema_still_round_trips_the_fields(api: Api, queue: str) -> None:
    await api.declare_queue(queue)
    job = make_job(image_schema("not-registered"), 3)
    await api.publish(queue, job)
    received = await api.receive_message(queue, timeout=5)
    assert received is not None
    assert received.id == job.id
    assert received.payload.input.model_dump() == job.payload.input.model_dump()


async def test_priority_order_then_fifo_among_equals(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    priorities = [0, 5, 9, 5, 0, 9, 1, 5]
    jobs = [make_job(schema, i, priority=p) for i, p in enumerate(priorities)]
    for job in jobs:
        await api.publish(queue, job)
    expected = [j.id for j in sorted(jobs, key=lambda j: (-j.priority, jobs.index(j)))]
    received = [(await api.receive_message(queue, timeout=5)).id for _ in jobs]
    assert received == expected


async def test_count_clean_and_delete(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    assert await api.count_queue_messages(queue) == 0
    for i in range(5):
        await api.publish(queue, make_job(schema, i))
    assert await api.count_queue_messages(queue) == 5
    assert await api.clean_queue(queue) == 5
    assert await api.count_queue_messages(queue) == 0
    assert await api.clean_queue(queue) == 0
    await api.publish(queue, make_job(schema, 9))
    await api.delete_queue(queue)
    with pytest.raises(QueueNotFoundError) as info:
        await api.count_queue_messages(queue)
    assert info.value.queue == queue
    with pytest.raises(QueueNotFoundError):
        await api.publish(queue, make_job(schema, 10))


async def test_delete_removes_the_dead_letter_queue_too(api: Api, queue: str) -> None:
    await api.declare_queue(queue)
    assert await api.count_queue_messages(queue + ".dlq") == 0
    await api.delete_queue(queue)
    with pytest.raises(QueueNotFoundError):
        await api.count_queue_messages(queue + ".dlq")


async def test_publish_to_an_undeclared_queue_is_an_error(
    api: Api, queue: str, new_queue: Callable[[str], str]
) -> None:
    other = new_queue("other")
    schema = image_schema(other)
    await api.register(schema)
    await api.publish(other, make_job(schema, 1))
    with pytest.raises(QueueNotFoundError) as info:
        await api.publish(queue, make_job(schema, 2))
    assert info.value.queue == queue
    assert queue in str(info.value)
    assert await api.count_queue_messages(other) == 1


async def test_declare_is_idempotent_and_conflicting_options_are_an_error(api: Api, queue: str) -> None:
    await api.declare_queue(queue)
    await api.declare_queue(queue)
    await api.declare_queue(queue, durable=True)
    with pytest.raises(QueueConflictError) as info:
        await api.declare_queue(queue, durable=False)
    assert info.value.queue == queue
    with pytest.raises(ValueError, match="unknown option"):
        await api.declare_queue(queue, colour="red")


async def test_auto_routing_by_job_type(api: Api) -> None:
    routed = QUEUE_MAPPING[JobType.OBJECT_DETECTION]
    assert routed == "detection_jobs"
    await api.declare_queue(routed)
    await api.clean_queue(routed)
    try:
        schema = image_schema("routing")
        job = make_job(schema, 1, job_type=JobType.OBJECT_DETECTION)
        assert await api.publish(job) == job.id
        assert await api.count_queue_messages(routed) == 1
        received = await api.receive_message(routed, timeout=5)
        assert received is not None and received.id == job.id
    finally:
        await api.delete_queue(routed)


async def test_auto_routing_declares_the_mapped_queue(api: Api) -> None:
    routed = QUEUE_MAPPING[JobType.DATA_PROCESSING]
    await api.delete_queue(routed)
    try:
        job = make_job(image_schema("routing"), 2, job_type=JobType.DATA_PROCESSING)
        await api.publish(job)
        assert await api.count_queue_messages(routed) == 1
    finally:
        await api.delete_queue(routed)


@pytest.mark.parametrize("name", ["", "a:b", "a*", "q?", "a b", "{tag}", "x" * 201, ".hidden", "new\nline"])
async def test_invalid_queue_names_are_rejected(api: Api, name: str) -> None:
    with pytest.raises(InvalidQueueNameError):
        await api.declare_queue(name)
    with pytest.raises(InvalidQueueNameError):
        await api.publish(name, make_job(image_schema("x")))


async def test_bad_input_gets_typed_errors_and_loses_nothing(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    await api.publish(queue, make_job(schema, 1))
    with pytest.raises(JobValidationError):
        await api.publish(queue, {"not": "a job"})
    with pytest.raises(JobValidationError, match=queue):
        job_from_schema(schema, {"threshold": "not a float"})
    with pytest.raises(JobValidationError, match=queue):
        job_from_schema(schema, 42)  # type: ignore[arg-type]
    with pytest.raises(JobValidationError, match="priority"):
        make_job(schema, 2, priority=10)
    with pytest.raises(pydantic.ValidationError, match="priority"):
        Job(payload=schema, priority=-1)
    assert await api.count_queue_messages(queue) == 1


async def test_oversized_payload_is_refused_before_sending(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    api.orchestrator.backend.max_payload_bytes = 4096
    big = job_from_schema(schema, ImageInput(image_path="x" * 10_000))
    with pytest.raises(PayloadTooLargeError) as info:
        await api.publish(queue, big)
    assert info.value.job_id == big.id and info.value.queue == queue
    with pytest.raises(PayloadTooLargeError):
        await api.publish_many(queue, [make_job(schema, 1), big])
    assert await api.count_queue_messages(queue) == 0


async def test_publish_many_keeps_order_and_returns_ids(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    jobs = [make_job(schema, i) for i in range(20)]
    assert await api.publish_many(queue, jobs) == [j.id for j in jobs]
    assert await api.count_queue_messages(queue) == 20
    received = [(await api.receive_message(queue, timeout=5)).id for _ in jobs]
    assert received == [j.id for j in jobs]


async def test_receive_waits_for_a_job_without_polling(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    assert await api.receive_message(queue) is None
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await api.receive_message(queue, timeout=0.3) is None
    assert loop.time() - started >= 0.25
    job = make_job(schema, 1)

    async def publish_later() -> None:
        await asyncio.sleep(0.2)
        await api.publish(queue, job)

    publisher = asyncio.create_task(publish_later())
    received = await api.receive_message(queue, timeout=10)
    await publisher
    assert received is not None and received.id == job.id


async def test_receive_from_an_undeclared_queue_is_an_error(api: Api, queue: str) -> None:
    with pytest.raises(QueueNotFoundError):
        await api.receive_message(queue)
