"""Conformance: publishing a job whose input does not fit its registered schema raises, and sends nothing."""

from __future__ import annotations

import pytest

from mindtrace.jobs import QUEUE_MAPPING, Job, JobInput, JobSchema, JobType, JobValidationError
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support.api import Api


class NotAnImage(JobInput):
    """An input of another shape: no ``image_path``."""

    path: str = "/x.jpg"


def _misfit(schema_name: str, **fields: object) -> Job:
    return Job(payload=JobSchema(name=schema_name, input=NotAnImage()), **fields)


def _assert_names_schema_and_field(error: JobValidationError, schema_name: str, job: Job) -> None:
    assert error.schema == schema_name and error.job_id == job.id and error.field == "image_path"
    assert schema_name in str(error) and "image_path" in str(error)


async def test_publish_refuses_input_that_does_not_fit_the_registered_schema(api: Api, queue: str) -> None:
    await api.register(image_schema(queue))
    job = _misfit(queue)
    with pytest.raises(JobValidationError) as caught:
        await api.publish(queue, job)
    _assert_names_schema_and_field(caught.value, queue, job)
    assert await api.count_queue_messages(queue) == 0


async def test_publish_many_refuses_the_batch_with_one_misfit_and_sends_none(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    misfit = _misfit(queue)
    with pytest.raises(JobValidationError) as caught:
        await api.publish_many(queue, [make_job(schema, 1), misfit, make_job(schema, 2)])
    _assert_names_schema_and_field(caught.value, queue, misfit)
    assert await api.count_queue_messages(queue) == 0


async def test_auto_routed_publish_refuses_a_misfit_too(api: Api, queue: str) -> None:
    await api.register(image_schema(queue))
    routed = QUEUE_MAPPING[JobType.ML_TRAINING]  # no other test routes there
    try:
        job = _misfit(queue, job_type=JobType.ML_TRAINING)
        with pytest.raises(JobValidationError) as caught:
            await api.publish(job)
        _assert_names_schema_and_field(caught.value, queue, job)
        await api.declare_queue(routed)
        assert await api.count_queue_messages(routed) == 0
    finally:
        await api.delete_queue(routed)


async def test_input_that_fits_in_json_form_is_accepted_and_received_typed(api: Api, queue: str) -> None:
    # Not an instance of the declared class, but its fields fit: the receiver rebuilds it, so it is accepted.
    class SameFields(JobInput):
        image_path: str

    schema = image_schema(queue)
    await api.register(schema)
    await api.publish(queue, Job(payload=JobSchema(name=queue, input=SameFields(image_path="/a.jpg"))))
    received = await api.receive_message(queue, timeout=5)
    assert received is not None and received.payload.input == schema.input_type(image_path="/a.jpg")


async def test_a_schema_not_registered_here_is_not_checked(api: Api, queue: str) -> None:
    await api.declare_queue(queue)
    await api.publish(queue, _misfit(queue))
    assert await api.count_queue_messages(queue) == 1
