"""The job model: Job, JobSchema, JobInput, JobOutput, JobType, QUEUE_MAPPING and job_from_schema."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_serializer, field_validator

from mindtrace.jobs.constants import MAX_PRIORITY, MIN_PRIORITY
from mindtrace.jobs.errors import JobValidationError


class JobInput(BaseModel):
    """Base class of a job's input. Subclass it with the fields your job needs."""


class JobOutput(BaseModel):
    """Base class of a job's output. A consumer's ``run`` result is validated against the subclass."""


class JobType(str, enum.Enum):
    """Kinds of job; each maps to a default queue in :data:`QUEUE_MAPPING` for auto-routing."""

    ML_TRAINING = "ml_training"
    OBJECT_DETECTION = "object_detection"
    DATA_PROCESSING = "data_processing"
    CLASSIFICATION = "classification"
    DEFAULT = "default"


#: The queue each job type is routed to by ``publish(job)`` when no queue name is given.
QUEUE_MAPPING: Final[dict[JobType, str]] = {
    JobType.ML_TRAINING: "ml_training_jobs",
    JobType.OBJECT_DETECTION: "detection_jobs",
    JobType.DATA_PROCESSING: "data_jobs",
    JobType.CLASSIFICATION: "classification_jobs",
    JobType.DEFAULT: "default_jobs",
}


class JobSchema(BaseModel):
    """A named job shape: its input (an instance, or the JobInput subclass itself) and its output type.

    ``output`` may be a JobOutput subclass, an instance of one, or None. ``register()``-ing a schema
    declares a queue named ``name`` and lets receivers rebuild ``input`` as the declared subclass.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = Field(min_length=1)
    input: SerializeAsAny[JobInput] | type[JobInput]
    output: SerializeAsAny[JobOutput] | type[JobOutput] | None = None

    @property
    def input_type(self) -> type[JobInput]:
        """The declared input class (the class given, or the class of the instance given)."""
        return self.input if isinstance(self.input, type) else type(self.input)

    @property
    def output_type(self) -> type[JobOutput] | None:
        """The declared output class, or None when the schema declares no output."""
        if self.output is None:
            return None
        return self.output if isinstance(self.output, type) else type(self.output)

    @field_serializer("input", "output")
    def _serialize_model_or_type(self, value: Any) -> Any:
        # A class is not JSON: dump it as its qualified name, for humans; wire.py never imports by name.
        if isinstance(value, type):
            return f"{value.__module__}.{value.__qualname__}"
        return value


InputT = TypeVar("InputT", bound=JobInput)
ModelT = TypeVar("ModelT", bound=BaseModel)


def validate_as(model: type[ModelT], value: Any, what: str, *, schema: str, job_id: str | None = None) -> ModelT:
    """``value`` (a model or a dict) validated as ``model``; else JobValidationError ``"<what>: <pydantic's
    error>"`` naming the schema (and the job), the pydantic error as ``__cause__``."""
    try:
        return model.model_validate(value.model_dump() if isinstance(value, BaseModel) else value)
    except ValidationError as exc:
        raise JobValidationError(f"{what}: {exc}", schema=schema, job_id=job_id) from exc


def _new_job_id() -> str:
    return str(uuid.uuid4())


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Job(BaseModel):
    """One unit of work. Published to a queue, delivered at least once to a consumer.

    ``priority`` runs from 0 to 9 (higher runs first, FIFO among equals). ``attempts`` counts the runs that
    have failed so far and ``error`` holds the last failure; the consumer keeps both across retries and
    records them on the dead-lettered job. ``metadata`` is free-form JSON for the caller.

    ``timeout`` (seconds, > 0) limits each run of this job, over the consumer's own ``timeout``: a run over it
    is recorded as failed with JobTimeoutError (retried, then dead-lettered). ``expires_at`` (a timezone-aware
    datetime; a naive one is refused) is a "do not start after" time: a consumer that takes the job later
    settles it as EXPIRED without running it. ``headers`` are string pairs set by hooks at publish (the W3C
    trace context of a tracing hook) and read by them on the consumer's side. All three travel with the job; a
    consumer of an earlier version ignores them.

    Job is a pydantic model: constructing one (or assigning a field) with an invalid value raises
    ``pydantic.ValidationError``, as every model here and your JobInput subclasses do. The library's own
    checks (``job_from_schema``, ``publish``, ``input_as``, a ``run`` result) raise JobValidationError naming the
    schema, with the pydantic error as ``__cause__``. Both are ValueError.
    """

    model_config = ConfigDict(validate_assignment=True)

    id: str = Field(default_factory=_new_job_id, min_length=1)
    name: str = ""
    job_type: JobType = JobType.DEFAULT
    payload: JobSchema
    priority: int = Field(default=0, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    entrypoint: str | None = None
    created_at: datetime = Field(default_factory=_utcnow)
    attempts: int = Field(default=0, ge=0)
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    expires_at: datetime | None = None
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("timeout", mode="before")
    @classmethod
    def _numeric_timeout(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("timeout must be a number of seconds, not a bool")
        return value

    @field_validator("expires_at")
    @classmethod
    def _aware_expiry(cls, value: datetime | None) -> datetime | None:
        # A naive time is ambiguous by the consumer's clock and zone: refused rather than guessed.
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError("expires_at must be a timezone-aware datetime (e.g. datetime.now(timezone.utc))")
        return value.astimezone(timezone.utc)

    def model_post_init(self, context: Any, /) -> None:
        """Store ``created_at`` as timezone-aware UTC (a naive datetime is taken to be UTC)."""
        if self.created_at.tzinfo is None:
            object.__setattr__(self, "created_at", self.created_at.replace(tzinfo=timezone.utc))
        elif self.created_at.utcoffset() != timezone.utc.utcoffset(None):
            object.__setattr__(self, "created_at", self.created_at.astimezone(timezone.utc))

    @property
    def queue(self) -> str:
        """The queue auto-routing sends this job to: ``QUEUE_MAPPING[job.job_type]``."""
        return QUEUE_MAPPING[self.job_type]

    def input_as(self, input_type: type[InputT]) -> InputT:
        """``payload.input`` typed as ``input_type``: a checked narrowing for type checkers and readers.

        Returns the input itself when it already is an ``input_type`` (the usual case after ``register()``),
        validates it into one otherwise, and raises JobValidationError naming the job when it does not fit.
        """
        value = self.payload.input
        if isinstance(value, input_type):
            return value
        what = f"input of job {self.id!r} ({self.payload.name!r}) is not a {input_type.__name__}"
        return validate_as(input_type, value, what, schema=self.payload.name, job_id=self.id)


def job_from_schema(schema: JobSchema, input: JobInput | dict[str, Any], **fields: Any) -> Job:
    """Build a Job for ``schema`` from ``input`` (an instance of its input type, or a dict that validates).

    ``fields`` are passed to :class:`Job` (``priority``, ``job_type``, ``entrypoint``, ``id``...). The job's
    name defaults to the schema's name. Anything else as ``input``, or an invalid field, raises
    JobValidationError naming the schema (``__cause__``: the pydantic error), where ``Job(...)`` itself raises
    ``pydantic.ValidationError``.
    """
    input_type = schema.input_type
    if isinstance(input, input_type):
        value: JobInput = input
    elif isinstance(input, dict):
        what = f"input for schema {schema.name!r} does not validate as {input_type.__name__}"
        value = validate_as(input_type, input, what, schema=schema.name)
    else:
        raise JobValidationError(
            f"input for schema {schema.name!r} must be a {input_type.__name__} or a dict, not {type(input).__name__}",
            schema=schema.name,
        )
    fields.setdefault("name", schema.name)
    try:
        return Job(payload=JobSchema(name=schema.name, input=value, output=schema.output), **fields)
    except ValidationError as exc:
        raise JobValidationError(f"job for schema {schema.name!r} is invalid: {exc}", schema=schema.name) from exc
