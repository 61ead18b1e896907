"""Every exception mindtrace.jobs raises.

The tree::

    JobsError
    ├── ConfigurationError          bad constructor argument, URL or queue option      (also ValueError)
    ├── MissingDependencyError      a backend's driver is not installed; names the extra (also ImportError)
    ├── JobValidationError          a job or a job input does not validate; names the schema (also ValueError)
    ├── PayloadTooLargeError        an encoded job is over the size limit              (also ValueError)
    │   └── ResultTooLargeError     a run's output is over the result size cap (max_result_bytes)
    ├── DecodeError                 bytes on the wire are not a job; keeps the raw bytes
    ├── QueueError
    │   ├── InvalidQueueNameError   empty, too long, or characters that could collide  (also ValueError)
    │   ├── QueueNotFoundError      the queue was never declared, or the broker lost it (also LookupError)
    │   └── QueueConflictError      declared again with different options
    ├── JobOutcomeError             result() of a job that did not succeed; names the job and queue
    │   ├── JobFailedError          it was dead-lettered: ``error`` and ``attempts`` recorded
    │   ├── JobCancelledError       it was cancelled (``reason``)
    │   ├── JobExpiredError         it passed its "do not start after" time unrun
    │   └── JobNotFoundError        no record: never published there, or past retention (also LookupError)
    ├── ResultTimeoutError          a wait for a job ran out of time; the job goes on  (also TimeoutError)
    ├── JobTimeoutError             a run went over its time limit; recorded as a failure (also TimeoutError)
    ├── BackendError                the broker failed an operation
    │   ├── BackendUnavailableError cannot reach host:port (also ConnectionError); retryable
    │   ├── BackendRefusedError     the broker answered and refused: credentials, vhost, permissions; fatal
    │   ├── PublishError            the broker did not confirm a publish; the job may not be queued
    │   └── LeaseLostError          ack/retry of a job this consumer no longer holds (lease expired, connection closed)
    └── UsageError                  the API was used where it cannot work
        ├── ClosedError             a closed orchestrator or backend was used
        ├── WrongEventLoopError     a backend was used from an event loop other than its own
        ├── LoopThreadError         the blocking API was called from its own background loop thread
        └── ForkError               an object created before fork() was used in the child process

Errors carry what a user needs to act as attributes (``queue``, ``job_id``, ``host``, ``port``) and never a
password. A driver exception is chained as ``__cause__`` by the backend's error boundary (the table each
backend gives ``backends._endpoint.map_errors``).
"""

from __future__ import annotations

from typing import Any


class JobsError(Exception):
    """Base class of every error raised by mindtrace.jobs."""


class ConfigurationError(JobsError, ValueError):
    """A constructor argument, URL or queue option is invalid."""


class MissingDependencyError(JobsError, ImportError):
    """The driver a backend needs is not installed; the message names the extra to install."""

    def __init__(self, backend: str, extra: str, package: str) -> None:
        super().__init__(
            f"{backend} needs the {package!r} package: install it with `pip install 'mindtrace-jobs[{extra}]'`"
        )
        self.backend = backend
        self.extra = extra
        self.package = package


class JobValidationError(JobsError, ValueError):
    """A job, or the input given for a schema, does not validate. ``field``: the first field that did not.

    Raised by the library's own checks (``job_from_schema``, ``publish``, ``input_as``, a ``run`` result),
    with the pydantic error as ``__cause__``. Constructing a model directly (``Job(priority=10)``) raises
    ``pydantic.ValidationError`` instead; both are ValueError.
    """

    def __init__(
        self, message: str, *, schema: str | None = None, job_id: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.schema = schema
        self.job_id = job_id
        self.field = field


class PayloadTooLargeError(JobsError, ValueError):
    """An encoded job is larger than the configured maximum; nothing was sent."""

    def __init__(self, *, queue: str, job_id: str | None, size: int, limit: int) -> None:
        super().__init__(
            f"job {job_id!r} for queue {queue!r} encodes to {size} bytes, over the limit of {limit} bytes "
            "(max_payload_bytes)"
        )
        self.queue = queue
        self.job_id = job_id
        self.size = size
        self.limit = limit


class DecodeError(JobsError):
    """Bytes taken from a queue are not a valid job. ``raw`` keeps them; ``preview`` is printable."""

    def __init__(self, reason: str, raw: bytes, *, queue: str | None = None, job_id: str | None = None) -> None:
        self.reason = reason
        self.raw = raw
        self.queue = queue
        self.job_id = job_id
        self.preview = raw[:80].decode("utf-8", errors="backslashreplace")
        where = f" from queue {queue!r}" if queue else ""
        super().__init__(f"cannot decode a job{where}: {reason} (first bytes: {self.preview!r})")


class QueueError(JobsError):
    """An operation named a queue that cannot be used as asked. ``queue`` names it."""

    def __init__(self, message: str, *, queue: str) -> None:
        super().__init__(message)
        self.queue = queue


class InvalidQueueNameError(QueueError, ValueError):
    """A queue name is empty, too long, or holds characters reserved by a backend."""


class QueueNotFoundError(QueueError, LookupError):
    """The queue was never declared (call ``declare_queue`` or ``register`` first), or the broker lost it.

    ``lost``: the queue was known to exist (declared through this orchestrator) and the broker no longer has
    it: deleted by someone else, or gone with a broker restart that kept no data.
    """

    def __init__(self, queue: str, *, lost: bool = False) -> None:
        if lost:
            message = (
                f"queue {queue!r} no longer exists on the broker, although it existed for this orchestrator "
                "(deleted elsewhere, or lost in a broker restart without persistence): declare it again with "
                "declare_queue()"
            )
        else:
            message = f"queue {queue!r} does not exist: declare it first with declare_queue()"
        super().__init__(message, queue=queue)
        self.lost = lost


class QueueConflictError(QueueError):
    """A queue was declared again with options that differ from the existing ones."""


class BackendError(JobsError):
    """The broker failed an operation. ``backend`` describes it as ``scheme://host:port`` (no password)."""

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend


class BackendUnavailableError(BackendError, ConnectionError):
    """The broker at ``host:port`` cannot be reached (after the retry budget, where there is one)."""

    def __init__(self, message: str, *, host: str, port: int, backend: str | None = None) -> None:
        super().__init__(f"{message} ({host}:{port})", backend=backend)
        self.host = host
        self.port = port


class BackendRefusedError(BackendError):
    """The broker answered and refused us: bad credentials, an unknown vhost or database, missing permissions.

    Not retryable: retrying with the same settings is refused again. ``refused`` names what was refused
    (``"credentials"``, ``"vhost"``, ``"permissions"``, ...) and ``reason`` is the broker's own words.
    """

    def __init__(self, message: str, *, refused: str, reason: str = "", backend: str | None = None) -> None:
        super().__init__(message, backend=backend)
        self.refused = refused
        self.reason = reason


class PublishError(BackendError):
    """A publish was not confirmed by the broker: the job may or may not be queued."""

    def __init__(self, message: str, *, queue: str, job_id: str | None = None, backend: str | None = None):
        super().__init__(message, backend=backend)
        self.queue = queue
        self.job_id = job_id


class LeaseLostError(BackendError):
    """This consumer no longer holds the job: its lease expired or its connection closed, so it may not settle it.

    The job is (or will be) delivered again, possibly to another consumer; the late ack or retry is refused.
    """

    def __init__(self, *, queue: str, job_id: str | None, backend: str | None = None) -> None:
        super().__init__(
            f"lease on job {job_id!r} in queue {queue!r} was lost (lease expired or connection closed); "
            "the job may run elsewhere",
            backend=backend,
        )
        self.queue = queue
        self.job_id = job_id


class UsageError(JobsError, RuntimeError):
    """The API was used in a way that cannot work (closed object, wrong loop or thread, after fork)."""


class ClosedError(UsageError):
    """The orchestrator, consumer or backend was closed."""


class WrongEventLoopError(UsageError):
    """A backend bound to one event loop was used from another."""


class LoopThreadError(UsageError):
    """The blocking API was called from the background loop thread it runs on, which would deadlock."""


class ForkError(UsageError):
    """An object created in one process was used in a forked child; create a new one in the child."""


class ResultTooLargeError(PayloadTooLargeError):
    """A run's output encodes to more than the result size cap; the run is recorded as a failure.

    Keep large artifacts elsewhere (object storage, a file system) and return their URIs.
    """

    def __init__(self, *, queue: str, job_id: str, size: int, limit: int) -> None:
        ValueError.__init__(
            self,
            f"output of job {job_id!r} from queue {queue!r} encodes to {size} bytes, over the result limit of "
            f"{limit} bytes (max_result_bytes): store large artifacts elsewhere and return their URIs",
        )
        self.queue = queue
        self.job_id = job_id
        self.size = size
        self.limit = limit


class JobOutcomeError(JobsError):
    """``result()`` of a job that did not succeed. ``job_id`` and ``queue`` name it; ``info`` is its record."""

    def __init__(self, message: str, *, job_id: str, queue: str, info: Any = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.queue = queue
        self.info = info


class JobFailedError(JobOutcomeError):
    """The job spent its retries and was dead-lettered; ``error`` is its last error, ``attempts`` its runs."""

    def __init__(self, *, job_id: str, queue: str, attempts: int, error: str | None, info: Any = None) -> None:
        super().__init__(
            f"job {job_id!r} from queue {queue!r} failed after {attempts} attempt(s): {error}",
            job_id=job_id,
            queue=queue,
            info=info,
        )
        self.attempts = attempts
        self.error = error


class JobCancelledError(JobOutcomeError):
    """The job was cancelled before it finished; ``reason`` is the one given to ``cancel()`` (or None)."""

    def __init__(self, *, job_id: str, queue: str, reason: str | None = None, info: Any = None) -> None:
        why = f": {reason}" if reason else ""
        super().__init__(
            f"job {job_id!r} from queue {queue!r} was cancelled{why}", job_id=job_id, queue=queue, info=info
        )
        self.reason = reason


class JobExpiredError(JobOutcomeError):
    """The job reached its "do not start after" time before a consumer took it, and was dropped unrun."""

    def __init__(self, *, job_id: str, queue: str, info: Any = None) -> None:
        super().__init__(
            f"job {job_id!r} from queue {queue!r} expired before it could start", job_id=job_id, queue=queue, info=info
        )


class JobNotFoundError(JobOutcomeError, LookupError):
    """No record of the job on that queue: it was never published there, or its record is past retention."""

    def __init__(self, *, job_id: str, queue: str) -> None:
        super().__init__(
            f"no job {job_id!r} is known on queue {queue!r} (never published there, or its result is past "
            "retention: see result_ttl)",
            job_id=job_id,
            queue=queue,
        )


class ResultTimeoutError(JobsError, TimeoutError):
    """A wait for a job's result ran out of time. The job is left as it was (``status``: as last seen)."""

    def __init__(self, *, job_id: str, queue: str, timeout: float | None, status: Any = None) -> None:
        seen = f" (last seen {getattr(status, 'value', status)})" if status is not None else ""
        super().__init__(f"job {job_id!r} from queue {queue!r} did not finish within {timeout}s{seen}")
        self.job_id = job_id
        self.queue = queue
        self.timeout = timeout
        self.status = status


class JobTimeoutError(JobsError, TimeoutError):
    """A run of a job went over its time limit; the run is recorded as failed (retried, then dead-lettered)."""

    def __init__(self, *, job_id: str, queue: str, limit: float) -> None:
        super().__init__(f"job {job_id!r} from queue {queue!r} ran over its time limit of {limit}s")
        self.job_id = job_id
        self.queue = queue
        self.limit = limit
