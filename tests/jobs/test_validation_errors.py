"""Which error an invalid job raises: pydantic's from the models, JobValidationError from the library's checks.

The story README tells: constructing (or assigning to) a model is pydantic and raises
``pydantic.ValidationError``; every check the library itself makes raises ``JobValidationError``, with the
pydantic error as its ``__cause__`` where there is one. Both are ``ValueError``.
"""

from __future__ import annotations

import pydantic
import pytest

from mindtrace.jobs import Job, JobSchema, JobValidationError, job_from_schema
from tests.jobs.conformance.models import ImageInput, image_schema, make_job


def test_model_construction_and_assignment_raise_pydantic_validation_error() -> None:
    schema = image_schema("errors")
    with pytest.raises(pydantic.ValidationError, match="priority"):
        Job(payload=schema, priority=10)
    job = make_job(schema)
    with pytest.raises(pydantic.ValidationError, match="priority"):
        job.priority = 10
    with pytest.raises(pydantic.ValidationError, match="name"):
        JobSchema(name="", input=ImageInput)


def test_the_library_checks_raise_job_validation_error_caused_by_the_pydantic_one() -> None:
    schema = image_schema("errors")
    with pytest.raises(JobValidationError, match="priority") as caught:
        job_from_schema(schema, {"image_path": "/a.jpg"}, priority=10)
    assert caught.value.schema == "errors"
    assert isinstance(caught.value.__cause__, pydantic.ValidationError)
    with pytest.raises(JobValidationError, match="image_path") as caught:
        job_from_schema(schema, {"threshold": 0.1})
    assert isinstance(caught.value.__cause__, pydantic.ValidationError)


def test_one_except_value_error_catches_both() -> None:
    schema = image_schema("errors")
    for make in (lambda: Job(payload=schema, priority=10), lambda: job_from_schema(schema, {}, priority=10)):
        with pytest.raises(ValueError):
            make()
