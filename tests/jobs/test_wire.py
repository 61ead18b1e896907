"""The wire envelope: byte-compatible with version 1, and generated from Job's fields."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from mindtrace.jobs import DecodeError, Job, JobSchema, JobType
from mindtrace.jobs.wire import ENVELOPE_V1_FIELDS, SchemaTypes, decode, encode
from tests.jobs.conformance.models import DetectionOutput, ImageInput

SCHEMAS = {"images": SchemaTypes(ImageInput, DetectionOutput)}

#: A job encoded by version 1 of the library: the bytes every later version must write and read.
V1_BYTES = (
    b'{"v":1,"id":"job-1","name":"detect","job_type":"object_detection","priority":3,"entrypoint":"pkg:run",'
    b'"created_at":"2026-01-02T03:04:05.600000+00:00","attempts":2,"error":"RuntimeError: x",'
    b'"metadata":{"k":[1,"\xc3\xa9"]},"schema":"images","input":{"image_path":"/img/1.png","threshold":0.5,'
    b'"tags":[]},"output_kind":1,"output":null}'
)


def v1_job() -> Job:
    return Job(
        id="job-1",
        name="detect",
        job_type=JobType.OBJECT_DETECTION,
        payload=JobSchema(name="images", input=ImageInput(image_path="/img/1.png"), output=DetectionOutput),
        priority=3,
        entrypoint="pkg:run",
        created_at=datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=timezone.utc),
        attempts=2,
        error="RuntimeError: x",
        metadata={"k": [1, "é"]},
    )


def test_encoding_is_byte_compatible_with_version_1_and_decodes_back_equal() -> None:
    assert encode(v1_job()) == V1_BYTES
    assert decode(V1_BYTES, SCHEMAS) == v1_job()


def test_the_envelope_carries_every_job_field_but_the_payload() -> None:
    # Fields added after version 1 are written when set (a job that does not use them keeps the v1 bytes).
    later = {"timeout": 30.0, "expires_at": datetime(2026, 5, 1, tzinfo=timezone.utc), "headers": {"k": "v"}}
    job = v1_job().model_copy(update=later)
    keys = list(json.loads(encode(job)))
    assert keys == ["v", *(f for f in Job.model_fields if f != "payload"), "schema", "input", "output_kind", "output"]
    assert set(Job.model_fields) >= ENVELOPE_V1_FIELDS
    assert decode(encode(job), SCHEMAS) == job
    assert set(json.loads(encode(v1_job()))) == {"v", *ENVELOPE_V1_FIELDS, "schema", "input", "output_kind", "output"}


def test_a_new_job_field_is_written_with_no_other_edit_and_an_unknown_one_is_ignored_on_read() -> None:
    class LaterJob(Job):
        not_before: datetime | None = None

    # As a later version would write it; this version reads it back, the key it does not know ignored.
    later = LaterJob(**v1_job().model_dump(exclude={"payload"}), payload=v1_job().payload)
    later.not_before = datetime(2026, 5, 1, tzinfo=timezone.utc)
    assert b'"not_before":"2026-05-01T00:00:00+00:00"' in encode(later)
    assert decode(encode(later), SCHEMAS) == v1_job()
    with pytest.raises(DecodeError, match="missing field 'attempts'"):
        decode(V1_BYTES.replace(b'"attempts":2,', b""), SCHEMAS)
