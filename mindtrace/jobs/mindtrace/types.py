"""Alias of :mod:`mindtrace.jobs.types` under the import path of the seed specification.

The specification (seed 000) imports JobType from this path, an artifact of an older nested layout. The names
here are the very objects of ``mindtrace.jobs.types``; new code imports them from ``mindtrace.jobs``.
"""

from __future__ import annotations

from mindtrace.jobs.types import QUEUE_MAPPING, Job, JobInput, JobOutput, JobSchema, JobType, job_from_schema

__all__ = ["QUEUE_MAPPING", "Job", "JobInput", "JobOutput", "JobSchema", "JobType", "job_from_schema"]
