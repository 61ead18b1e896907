"""AsyncJobHandle: a published job's id (it is a ``str``) with its status, result, wait and cancel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from mindtrace.jobs.errors import (
    JobCancelledError,
    JobExpiredError,
    JobFailedError,
    JobNotFoundError,
)
from mindtrace.jobs.lifecycle import CancelOutcome, JobInfo, JobStatus
from mindtrace.jobs.types import JobOutput, validate_as
from mindtrace.jobs.wire import UntypedOutput

if TYPE_CHECKING:
    from mindtrace.jobs.orchestrator import AsyncOrchestrator

ModelT = TypeVar("ModelT", bound=BaseModel)


def outcome_error(info: JobInfo) -> Exception | None:
    """The error ``result()`` raises for a job record that is not SUCCEEDED (None for SUCCEEDED)."""
    status = info.status
    if status is JobStatus.SUCCEEDED:
        return None
    if status is JobStatus.FAILED:
        return JobFailedError(job_id=info.job_id, queue=info.queue, attempts=info.attempts, error=info.error, info=info)
    if status is JobStatus.CANCELLED:
        return JobCancelledError(job_id=info.job_id, queue=info.queue, reason=info.reason, info=info)
    if status is JobStatus.EXPIRED:
        return JobExpiredError(job_id=info.job_id, queue=info.queue, info=info)
    return JobNotFoundError(job_id=info.job_id, queue=info.queue)


class AsyncJobHandle(str):
    """A job published on ``queue``: equal to (and usable as) its id, with ways to follow it.

    ``publish`` returns one, so code that treats the id as a ``str`` keeps working; ``orchestrator.job(id,
    queue)`` makes one in any process. Every method asks the orchestrator's state store; waits never poll.
    A handle pickles (and JSON-encodes) as its plain id.
    """

    queue: str
    _orchestrator: AsyncOrchestrator

    def __new__(cls, job_id: str, queue: str, orchestrator: AsyncOrchestrator) -> AsyncJobHandle:
        self = super().__new__(cls, job_id)
        self.queue = queue
        self._orchestrator = orchestrator
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (str(self),))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self)!r} on {self.queue!r}>"

    @property
    def id(self) -> str:
        """The job id (a plain ``str``)."""
        return str(self)

    async def info(self) -> JobInfo:
        """The job's record now: status, attempts, error, output, progress, times, worker."""
        return await self._orchestrator.job_info(self.id, self.queue)

    async def status(self) -> JobStatus:
        """The job's status now (UNKNOWN when the store has no record of it)."""
        return (await self.info()).status

    async def wait(self, timeout: float | None = None) -> JobInfo:
        """The record once the job is terminal (whatever the outcome; never raises for it) or UNKNOWN.

        ResultTimeoutError (a TimeoutError) after ``timeout`` seconds; the job is left running.
        """
        return await self._orchestrator.wait_for(self.id, self.queue, timeout)

    async def result(self, timeout: float | None = None) -> JobOutput | None:
        """The output ``run`` returned, typed as the registered schema's output class (else a JobOutput with
        the fields kept), or None when ``run`` returned None. Returns only on a terminal state: JobFailedError
        (dead-lettered), JobCancelledError, JobExpiredError, JobNotFoundError (UNKNOWN); ResultTimeoutError
        after ``timeout`` seconds, the job left running."""
        info = await self.wait(timeout)
        error = outcome_error(info)
        if error is not None:
            raise error
        if info.output is None:
            return None
        output_type = self._orchestrator.output_type(info.schema) or UntypedOutput
        return validate_as(output_type, info.output, "recorded output", schema=info.schema or "", job_id=self.id)

    async def result_as(self, model: type[ModelT], timeout: float | None = None) -> ModelT:
        """The output validated as ``model`` (JobValidationError naming the field when it does not fit;
        also when ``run`` returned None); raises as :meth:`result` for a job that did not succeed."""
        info = await self.wait(timeout)
        error = outcome_error(info)
        if error is not None:
            raise error
        return validate_as(model, info.output, f"output of job {self.id!r}", schema=info.schema or "", job_id=self.id)

    async def cancel(self, reason: str | None = None) -> CancelOutcome:
        """Cancel the job (see :meth:`AsyncOrchestrator.cancel`)."""
        return await self._orchestrator.cancel(self.id, self.queue, reason=reason)
