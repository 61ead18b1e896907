"""mindtrace.jobs: typed job queues over memory, Redis and RabbitMQ, async at the core, blocking on top."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mindtrace.jobs.backends import from_url
from mindtrace.jobs.backends import load_backend_class as _load_backend_class
from mindtrace.jobs.backends.base import Backend, Capabilities, QueueOptions, QueueStats
from mindtrace.jobs.backends.local import LocalClient
from mindtrace.jobs.consumer import AsyncConsumer
from mindtrace.jobs.context import JobContext, current_job
from mindtrace.jobs.errors import (
    BackendError,
    BackendRefusedError,
    BackendUnavailableError,
    ClosedError,
    ConfigurationError,
    DecodeError,
    ForkError,
    InvalidQueueNameError,
    JobCancelledError,
    JobExpiredError,
    JobFailedError,
    JobNotFoundError,
    JobOutcomeError,
    JobsError,
    JobTimeoutError,
    JobValidationError,
    LeaseLostError,
    LoopThreadError,
    MissingDependencyError,
    PayloadTooLargeError,
    PublishError,
    QueueConflictError,
    QueueError,
    QueueNotFoundError,
    ResultTimeoutError,
    ResultTooLargeError,
    UsageError,
    WrongEventLoopError,
)
from mindtrace.jobs.handle import AsyncJobHandle
from mindtrace.jobs.hooks import Hook, PublishEvent, RunEvent, SettleEvent
from mindtrace.jobs.lifecycle import CancelOutcome, JobInfo, JobStatus, Progress
from mindtrace.jobs.orchestrator import AsyncOrchestrator
from mindtrace.jobs.policy import RetryPolicy
from mindtrace.jobs.schedules import ScheduleInfo
from mindtrace.jobs.state import StateCapabilities, StateStore
from mindtrace.jobs.sync import Consumer, JobHandle, Orchestrator
from mindtrace.jobs.types import QUEUE_MAPPING, Job, JobInput, JobOutput, JobSchema, JobType, job_from_schema
from mindtrace.jobs.wire import UndecodableMessage

if TYPE_CHECKING:
    from mindtrace.jobs.backends.rabbitmq import RabbitMQClient
    from mindtrace.jobs.backends.redis import RedisClient


def __getattr__(name: str) -> Any:
    # The broker clients import their drivers (extras) only when first asked for.
    if name in ("RedisClient", "RabbitMQClient"):
        return _load_backend_class(name)
    raise AttributeError(f"module 'mindtrace.jobs' has no attribute {name!r}")


__all__ = [
    "QUEUE_MAPPING",
    "AsyncConsumer",
    "AsyncJobHandle",
    "AsyncOrchestrator",
    "Backend",
    "BackendError",
    "BackendRefusedError",
    "BackendUnavailableError",
    "CancelOutcome",
    "Capabilities",
    "ClosedError",
    "ConfigurationError",
    "Consumer",
    "DecodeError",
    "ForkError",
    "Hook",
    "InvalidQueueNameError",
    "Job",
    "JobCancelledError",
    "JobContext",
    "JobExpiredError",
    "JobFailedError",
    "JobHandle",
    "JobInfo",
    "JobInput",
    "JobNotFoundError",
    "JobOutcomeError",
    "JobOutput",
    "JobSchema",
    "JobStatus",
    "JobTimeoutError",
    "JobType",
    "JobValidationError",
    "JobsError",
    "LeaseLostError",
    "LocalClient",
    "LoopThreadError",
    "MissingDependencyError",
    "Orchestrator",
    "PayloadTooLargeError",
    "Progress",
    "PublishError",
    "PublishEvent",
    "QueueConflictError",
    "QueueError",
    "QueueNotFoundError",
    "QueueOptions",
    "QueueStats",
    "RabbitMQClient",
    "RedisClient",
    "ResultTimeoutError",
    "ResultTooLargeError",
    "RetryPolicy",
    "RunEvent",
    "ScheduleInfo",
    "SettleEvent",
    "StateCapabilities",
    "StateStore",
    "UndecodableMessage",
    "UsageError",
    "WrongEventLoopError",
    "current_job",
    "from_url",
    "job_from_schema",
]
