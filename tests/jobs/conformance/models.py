"""Job schemas shared by the conformance tests."""

from __future__ import annotations

from mindtrace.jobs import JobInput, JobOutput, JobSchema, JobType, job_from_schema
from mindtrace.jobs.types import Job


class ImageInput(JobInput):
    image_path: str
    threshold: float = 0.5
    tags: list[str] = []


class DetectionOutput(JobOutput):
    objects: list[str] = []
    accuracy: float = 0.0


def image_schema(name: str) -> JobSchema:
    return JobSchema(name=name, input=ImageInput, output=DetectionOutput)


def make_job(schema: JobSchema, index: int = 0, **fields: object) -> Job:
    return job_from_schema(schema, ImageInput(image_path=f"/img/{index}.jpg", tags=[str(index)]), **fields)


__all__ = ["DetectionOutput", "ImageInput", "JobType", "image_schema", "make_job"]
