"""Job <-> bytes: JSON through pydantic (never pickle), the size check, typed decoding via a schema registry."""

from __future__ import annotations

import base64
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, from_json, to_json

from mindtrace.jobs.constants import UNDECODABLE_SCHEMA
from mindtrace.jobs.errors import DecodeError, JobValidationError
from mindtrace.jobs.types import Job, JobInput, JobOutput, JobSchema

#: Version of the envelope below; bumped on an incompatible change.
WIRE_VERSION = 1

# Output given as a class, as an instance, or not at all: kept so a job comes back equal.
_OUTPUT_NONE, _OUTPUT_TYPE, _OUTPUT_VALUE = 0, 1, 2

# The envelope holds every Job field but the payload, under its own name and in the model's order, followed by
# the payload as ``schema``, ``input``, ``output_kind`` and ``output``. A new Job field is written and read
# with no edit here; a field missing from an envelope takes its default, unless version 1 already had it.
# A field added after version 1 is written only when it is not None, so a job that does not use it encodes
# to the same bytes as before (and a consumer of an earlier version reads it as it always did).
_JOB_FIELDS = tuple(name for name in Job.model_fields if name != "payload")

#: The Job fields version 1 of the envelope carries: each is required in every envelope (never edit this set).
ENVELOPE_V1_FIELDS: frozenset[str] = frozenset(
    {"id", "name", "job_type", "priority", "entrypoint", "created_at", "attempts", "error", "metadata"}
)


_REQUIRED_FIELDS = tuple(name for name in _JOB_FIELDS if name in ENVELOPE_V1_FIELDS)
_LATER_FIELDS = tuple(name for name in _JOB_FIELDS if name not in ENVELOPE_V1_FIELDS)


def _plain(value: Any) -> Any:
    """A field value as JSON carries it: an enum as its value, a datetime in ISO 8601, anything else as is."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    return value


class _UntypedInput(JobInput, extra="allow"):
    """Input of a job whose schema is not registered in this process: fields kept as given."""


class UntypedOutput(JobOutput, extra="allow"):
    """Output of a job whose schema is not registered in this process: fields kept as given."""


class UndecodableMessage(JobInput):
    """Input of the job that stands in, on a dead-letter queue, for bytes that were not a valid job."""

    raw_base64: str
    reason: str
    source_queue: str | None = None

    @property
    def raw(self) -> bytes:
        """The original bytes, exactly as they were taken from the queue."""
        return base64.b64decode(self.raw_base64)


@dataclass(frozen=True)
class SchemaTypes:
    """The classes a registered schema declares; used to rebuild typed inputs and outputs on receipt."""

    input_type: type[JobInput]
    output_type: type[JobOutput] | None

    @classmethod
    def of(cls, schema: JobSchema) -> SchemaTypes:
        """The declared classes of ``schema``."""
        return cls(schema.input_type, schema.output_type)


def check_against(job: Job, types: SchemaTypes) -> None:
    """Raise JobValidationError, naming the schema and the field, if a receiver knowing ``types`` would find
    ``job``'s input (or output value) invalid, i.e. dead-letter it as undecodable. Instances of the declared
    classes pass without another validation."""
    payload = job.payload
    checks: list[tuple[str, type[JobInput] | type[JobOutput], JobInput | JobOutput]] = []
    if not isinstance(payload.input, (type, types.input_type)):
        checks.append(("input", types.input_type, payload.input))
    output = payload.output
    if types.output_type is not None and output is not None and not isinstance(output, (type, types.output_type)):
        checks.append(("output", types.output_type, output))
    for part, declared, value in checks:
        try:
            # The JSON form, as the receiver will see it: what passes here decodes there.
            declared.model_validate(value.model_dump(mode="json"))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(loc) for loc in first["loc"]) or None
            raise JobValidationError(
                f"job {job.id!r}: {part} does not validate against registered schema {payload.name!r} "
                f"({declared.__name__}): field {field!r}: {first['msg']} ({exc.error_count()} error(s) in all)",
                schema=payload.name,
                job_id=job.id,
                field=field,
            ) from exc


BUILTIN_SCHEMAS: Mapping[str, SchemaTypes] = {UNDECODABLE_SCHEMA: SchemaTypes(UndecodableMessage, None)}


def encode(job: Job) -> bytes:
    """The job as compact JSON bytes. Inverse of :func:`decode` for a registered schema.

    JobValidationError, naming the job, when a value cannot be JSON (an arbitrary object in ``metadata``, a
    string holding a lone surrogate).
    """
    payload = job.payload
    output = payload.output
    if output is None:
        output_kind, output_value = _OUTPUT_NONE, None
    elif isinstance(output, type):
        output_kind, output_value = _OUTPUT_TYPE, None
    else:
        output_kind, output_value = _OUTPUT_VALUE, output.model_dump(mode="json")
    envelope: dict[str, Any] = {"v": WIRE_VERSION}
    for name in type(job).model_fields:
        if name != "payload":
            value = getattr(job, name)
            if (value is not None and value != {}) or name in ENVELOPE_V1_FIELDS:
                envelope[name] = _plain(value)
    envelope["schema"] = payload.name
    envelope["input"] = None if isinstance(payload.input, type) else payload.input.model_dump(mode="json")
    envelope["output_kind"] = output_kind
    envelope["output"] = output_value
    try:
        return to_json(envelope)
    except PydanticSerializationError as exc:
        raise JobValidationError(
            f"job {job.id!r} cannot be encoded as JSON: {exc}", schema=payload.name, job_id=job.id
        ) from exc


def decode(raw: bytes, schemas: Mapping[str, SchemaTypes], *, queue: str | None = None) -> Job:
    """Rebuild a Job from bytes; ``job.payload.input`` is the registered input class when its schema is known.

    Raises DecodeError (keeping ``raw``) for anything that is not a job, including an input that does not
    validate against its registered schema.
    """
    try:
        data = from_json(raw)
    except ValueError as exc:
        raise DecodeError(f"not JSON: {exc}", raw, queue=queue) from exc
    # The version must be the integer itself: JSON's true and 1.0 compare equal to 1 in Python.
    version = data.get("v") if isinstance(data, dict) else None
    if type(version) is not int or version != WIRE_VERSION:
        raise DecodeError(f"not a mindtrace job envelope (version {WIRE_VERSION})", raw, queue=queue)
    job_id = data.get("id") if isinstance(data.get("id"), str) else None
    try:
        schema_name = data["schema"]
        if not isinstance(schema_name, str):
            raise DecodeError("schema name is not a string", raw, queue=queue, job_id=job_id)
        types = schemas.get(schema_name) or BUILTIN_SCHEMAS.get(schema_name)
        input_type: type[JobInput] = types.input_type if types else _UntypedInput
        output_type: type[JobOutput] = (types.output_type if types else None) or UntypedOutput
        input_data = data["input"]
        job_input: JobInput | type[JobInput] = (
            input_type if input_data is None else input_type.model_validate(input_data)
        )
        kind, output_data = data["output_kind"], data["output"]
        if type(kind) is not int or kind not in (_OUTPUT_NONE, _OUTPUT_TYPE, _OUTPUT_VALUE):
            raise DecodeError(f"unknown output_kind {kind!r}", raw, queue=queue, job_id=job_id)
        output: JobOutput | type[JobOutput] | None = None
        if kind == _OUTPUT_TYPE:
            output = output_type
        elif kind == _OUTPUT_VALUE:
            output = output_type.model_validate(output_data)
        fields = {name: data[name] for name in _REQUIRED_FIELDS}
        fields.update((name, data[name]) for name in _LATER_FIELDS if name in data)
        return Job(payload=JobSchema(name=schema_name, input=job_input, output=output), **fields)
    except KeyError as exc:
        raise DecodeError(f"missing field {exc.args[0]!r}", raw, queue=queue, job_id=job_id) from exc
    except ValidationError as exc:
        raise DecodeError(f"does not validate: {exc}", raw, queue=queue, job_id=job_id) from exc
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: a date that leaves datetime's range
        raise DecodeError(f"malformed: {exc}", raw, queue=queue, job_id=job_id) from exc


def undecodable_job(error: DecodeError) -> Job:
    """The job that carries undecodable bytes to a dead-letter queue, raw bytes kept for inspection."""
    job = Job(
        name=UNDECODABLE_SCHEMA,
        payload=JobSchema(
            name=UNDECODABLE_SCHEMA,
            input=UndecodableMessage(
                raw_base64=base64.b64encode(error.raw).decode("ascii"),
                reason=error.reason,
                source_queue=error.queue,
            ),
        ),
        error=str(error),
    )
    if error.job_id:
        job.id = error.job_id
    return job


def peek_job_id(raw: bytes) -> str | None:
    """The ``id`` of an encoded job without validating the rest, for messages about it; None if it has none."""
    try:
        value = from_json(raw)
    except ValueError:
        return None
    job_id = value.get("id") if isinstance(value, dict) else None
    return job_id if isinstance(job_id, str) else None
