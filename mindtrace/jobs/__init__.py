"""mindtrace.jobs: typed job queues over memory, Redis and RabbitMQ, async at the core, blocking on top."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mindtrace.jobs.backends import from_url
from mindtrace.jobs.backends import load_backend_class as _load_backend_class
from mindtrace.jobs.backends.base import Backend, Capabilities, QueueOptions
from mindtrace.jobs.backends.local import LocalClient
from mindtrace.jobs.consumer import AsyncConsumer
from mindtrace.jobs.errors import (
    BackendError,
    BackendRefusedError,
    BackendUnavailableError,
    ClosedError,
    ConfigurationError,
    DecodeError,
    ForkError,
    InvalidQueueNameError,
    JobsError,
    JobValidationError,
    LeaseLostError,
    LoopThreadError,
    MissingDependencyError,
    PayloadTooLargeError,
    PublishError,
    QueueConflictError,
    QueueError,
    QueueNotFoundError,
    UsageError,
    WrongEventLoopError,
)
from mindtrace.jobs.orchestrator import AsyncOrchestrator
from mindtrace.jobs.policy import RetryPolicy
from mindtrace.jobs.sync import Consumer, Orchestrator
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
    "AsyncOrchestrator",
    "Backend",
    "BackendError",
    "BackendRefusedError",
    "BackendUnavailableError",
    "Capabilities",
    "ClosedError",
    "ConfigurationError",
    "Consumer",
    "DecodeError",
    "ForkError",
    "InvalidQueueNameError",
    "Job",
    "JobInput",
    "JobOutput",
    "JobSchema",
    "JobType",
    "JobValidationError",
    "JobsError",
    "LeaseLostError",
    "LocalClient",
    "LoopThreadError",
    "MissingDependencyError",
    "Orchestrator",
    "PayloadTooLargeError",
    "PublishError",
    "QueueConflictError",
    "QueueError",
    "QueueNotFoundError",
    "QueueOptions",
    "RabbitMQClient",
    "RedisClient",
    "RetryPolicy",
    "UndecodableMessage",
    "UsageError",
    "WrongEventLoopError",
    "from_url",
    "job_from_schema",
]
