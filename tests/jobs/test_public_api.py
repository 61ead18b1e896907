"""The public surface: __all__ is exactly what mindtrace.jobs offers, each name documented."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import mindtrace.jobs as jobs
from mindtrace.jobs import QUEUE_MAPPING, JobType

EXPECTED = {
    "QUEUE_MAPPING", "AsyncConsumer", "AsyncOrchestrator", "Backend", "BackendError", "BackendRefusedError",
    "BackendUnavailableError",
    "ClosedError", "ConfigurationError", "Consumer", "DecodeError", "ForkError", "InvalidQueueNameError", "Job",
    "JobInput", "JobOutput", "JobSchema", "JobType", "JobValidationError", "JobsError", "LeaseLostError",
    "LocalClient", "LoopThreadError", "MissingDependencyError", "Orchestrator", "PayloadTooLargeError",
    "PublishError", "QueueConflictError", "QueueError", "QueueNotFoundError", "QueueOptions", "RabbitMQClient",
    "RedisClient", "UndecodableMessage", "UsageError", "WrongEventLoopError", "from_url", "job_from_schema",
    "Capabilities", "RetryPolicy", "QueueStats",
    "AsyncJobHandle", "JobHandle", "JobStatus", "JobInfo", "CancelOutcome", "Progress", "JobContext", "current_job",
    "StateStore", "StateCapabilities", "JobOutcomeError", "JobFailedError", "JobCancelledError", "JobExpiredError",
    "JobNotFoundError", "ResultTimeoutError", "JobTimeoutError", "ResultTooLargeError",
    "Hook", "PublishEvent", "RunEvent", "SettleEvent", "ScheduleInfo",
}  # fmt: skip


def test_all_is_exactly_the_public_surface() -> None:
    assert set(jobs.__all__) == EXPECTED
    public = {name for name in vars(jobs) if not name.startswith("_") and not inspect.ismodule(getattr(jobs, name))}
    public -= {"annotations", "TYPE_CHECKING", "Any"}
    assert public <= EXPECTED
    for name in EXPECTED:
        assert getattr(jobs, name) is not None


def test_every_public_name_and_module_is_documented() -> None:
    for name in jobs.__all__:
        obj = getattr(jobs, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, name
    for path in Path(jobs.__file__).parent.rglob("*.py"):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring and docstring.strip(), path


def test_errors_share_one_base() -> None:
    for name in jobs.__all__:
        obj = getattr(jobs, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, jobs.JobsError), name


def test_queue_mapping_is_the_documented_one() -> None:
    assert QUEUE_MAPPING == {
        JobType.ML_TRAINING: "ml_training_jobs",
        JobType.OBJECT_DETECTION: "detection_jobs",
        JobType.DATA_PROCESSING: "data_jobs",
        JobType.CLASSIFICATION: "classification_jobs",
        JobType.DEFAULT: "default_jobs",
    }
    from mindtrace.jobs.types import JobType as FromTypes

    assert FromTypes is JobType
