"""Hostile input, fuzzed with hypothesis on every backend: foreign bytes, oversized jobs, queue names, bad inputs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import string
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_core import from_json
from redis.crc import key_slot

from mindtrace.jobs import (
    AsyncConsumer,
    AsyncOrchestrator,
    InvalidQueueNameError,
    Job,
    JobValidationError,
    PayloadTooLargeError,
    QueueError,
    UndecodableMessage,
    from_url,
    job_from_schema,
)
from mindtrace.jobs.backends.base import Backend, OutgoingMessage, validate_queue_name
from mindtrace.jobs.backends.rabbitmq import delays
from mindtrace.jobs.backends.redis import _Keys
from mindtrace.jobs.constants import (
    DLQ_SUFFIX,
    MAX_PAYLOAD_BYTES,
    MAX_QUEUE_NAME_LENGTH,
    REDIS_KEY_PREFIX,
)
from mindtrace.jobs.errors import DecodeError
from mindtrace.jobs.wire import SchemaTypes, decode, encode, undecodable_job
from tests.jobs.conformance.models import ImageInput, image_schema, make_job
from tests.jobs.faults.conftest import FUZZ_EXAMPLES
from tests.jobs.support import servers

_T = TypeVar("_T")

#: Examples per fuzz test: pure ones are cheap; each broker example is a publish/consume round trip.
PURE_EXAMPLES = FUZZ_EXAMPLES * 5
BROKER_EXAMPLES = max(5, FUZZ_EXAMPLES // 4)

#: Longest a single step of a broker example may take before the example fails (a lost message hangs).
STEP_TIMEOUT = 30.0

#: Fuzz cases run, by test and backend, printed for the soak summary.
CASES: Counter[str] = Counter()


def fuzz(examples: int) -> settings:
    """Hypothesis settings of a fuzz test: ``examples`` examples, no deadline (brokers vary in speed)."""
    return settings(
        max_examples=examples,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def report(name: str, examples: int) -> None:
    """Check the fuzz test ``name`` really ran, and print its cases in the soak's one-line-per-scenario form."""
    assert CASES[name] >= examples // 2, f"{name}: only {CASES[name]} cases ran"
    print(f"\n[fuzz] {name}: {CASES[name]} cases")


# -- a harness: one orchestrator on its own event loop, driven by hypothesis's synchronous examples ------


class Session:
    """An orchestrator over one backend on an event loop of its own, for hypothesis's synchronous examples.

    The backend stays connected across examples; ``queue()`` names are deleted at the end.
    """

    def __init__(self, backend: Backend) -> None:
        self.loop = asyncio.new_event_loop()
        self.orchestrator = AsyncOrchestrator(backend)
        self.backend = backend
        self.queues: list[str] = []

    def run(self, step: Coroutine[Any, Any, _T]) -> _T:
        """Run one step to completion on the session's loop (failing after STEP_TIMEOUT)."""
        return self.loop.run_until_complete(asyncio.wait_for(step, STEP_TIMEOUT))

    def queue(self, label: str, length: int = 0) -> str:
        """A fresh queue name of this session's own, padded to ``length`` characters if given."""
        name = f"t-{label}-{uuid.uuid4().hex[:12]}"
        name += "x" * max(0, length - len(name))
        self.queues.append(name)
        return name

    async def _close(self) -> None:
        for name in self.queues:
            try:
                await self.orchestrator.delete_queue(name)
            except Exception as exc:  # cleanup must not hide the test's own failure
                print(f"could not delete {name}: {exc}")
        await self.orchestrator.close()

    def close(self) -> None:
        try:
            self.run(self._close())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


@pytest.fixture
def make_session(backend_url: str) -> Iterator[Callable[..., Session]]:
    """Opens sessions on the backend under test; keyword arguments go to the backend (``from_url``)."""
    opened: list[Session] = []

    def make(**options: Any) -> Session:
        session = Session(from_url(backend_url, **options))
        opened.append(session)
        return session

    yield make
    for session in opened:
        session.close()


class Recorder(AsyncConsumer):
    """Records the jobs it runs; raises ``failure`` from run for the jobs in ``failing`` (None: every job)."""

    def __init__(
        self, queue: str, failure: Exception | None = None, failing: set[str] | None = None, **options: Any
    ) -> None:
        super().__init__(queue, **options)
        self.ran: list[Job] = []
        self.failure = failure
        self.failing = failing

    async def run(self, job: Job) -> None:
        self.ran.append(job)
        if self.failure is not None and (self.failing is None or job.id in self.failing):
            raise self.failure


async def _publish_raw(backend: Backend, queue: str, bodies: list[bytes]) -> None:
    """Put foreign bytes on a queue through the backend contract, as another client would."""
    await backend.publish_many(queue, [OutgoingMessage(body, 0, f"raw-{i}") for i, body in enumerate(bodies)])


async def _drain(orchestrator: AsyncOrchestrator, queue: str) -> list[Job]:
    """Every job ready on ``queue``, taken off it in order."""
    jobs = []
    while (job := await orchestrator.receive_message(queue)) is not None:
        jobs.append(job)
    return jobs


# -- bytes on the wire ---------------------------------------------------------------------------------

#: Text JSON can carry: no lone surrogates (a separate mutation sends those).
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)

#: Per field, replacements that no job validates with (each is also a "wrong type" for its field).
WRONG_FIELDS: list[dict[str, Any]] = [
    *({"id": value} for value in (None, 7, [], {}, "")),
    *({"name": value} for value in (None, 7, [], {})),
    *({"job_type": value} for value in ("no_such_type", 3, None, [])),
    *({"priority": value} for value in (-1, 10, "high", None, [], 2.5)),
    *({"entrypoint": value} for value in (7, [], {})),
    *({"created_at": value} for value in ("yesterday", None, [], {}, "9999-12-31T23:59:59-23:59")),
    *({"attempts": value} for value in (-1, "many", None, 1.5, [])),
    *({"error": value} for value in (7, [], {})),
    *({"metadata": value} for value in ([], "x", 7, None)),
    *({"schema": value} for value in (None, 7, [], {})),
    *({"input": value} for value in ("x", 7, [], {"image_path": 7}, {"threshold": 0.1}, {"image_path": []})),
    *({"output_kind": value} for value in ("1", None, 3, -1, True, 1.0, [])),
    *({"output_kind": 2, "output": value} for value in ("x", 7, [], None, {"objects": "cat"})),
]

#: Byte sequences that are not UTF-8: stray continuation bytes, overlong forms, encoded surrogates, 5-byte forms.
INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xed\xa0\x80", b"\xc0\xaf"]
INVALID_UTF8 += [b"\xf0\x28\x8c\xbc", b"\xf8\xa1\xa1\xa1\xa1", b"\xf4\x90\x80\x80", b"\xe0\x80\xaf"]


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def envelope_of(queue: str) -> dict[str, Any]:
    """A real encoded job of the queue's schema, as a dict to mutate (metadata and an entrypoint filled in)."""
    job = make_job(image_schema(queue), 1, metadata={"source": ["camera", 2]}, entrypoint="pkg.module:run")
    value: dict[str, Any] = json.loads(encode(job))
    return value


WRONG_VERSIONS = [0, 2, -1, "1", None, 1.0, True, [1], {"v": 1}]


def listed_refusals(envelope: dict[str, Any]) -> list[bytes]:
    """Each listed mutation once: every wrong version, every wrong field value, every field missing or
    wrapped in a list, the whole job nested."""
    fields = sorted(envelope)
    return [
        *(_dump({**envelope, "v": version}) for version in WRONG_VERSIONS),
        *(_dump({**envelope, **patch}) for patch in WRONG_FIELDS),
        *(_dump({k: v for k, v in envelope.items() if k != gone}) for gone in fields),
        *(_dump({**envelope, f: [envelope[f]]}) for f in fields if f != "output"),  # output is unread for kind 1
        *(_dump(nested) for nested in ([envelope], {"job": envelope}, {"v": 1, "job": envelope})),
    ]


def refused_bodies(envelope: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Near-valid mutations of a real encoded job that are never a job: each must be dead-lettered.

    Truncated, wrong version, wrong field types, missing fields, extra nesting, invalid UTF-8, lone surrogates.
    """
    raw = _dump(envelope)
    fields = sorted(envelope)
    path_at = raw.index(b"/img/")
    return st.one_of(
        st.integers(0, len(raw) - 1).map(lambda n: raw[:n]),
        st.sampled_from(listed_refusals(envelope)),
        st.sets(st.sampled_from(fields), min_size=1).map(
            lambda gone: _dump({k: v for k, v in envelope.items() if k not in gone})
        ),
        st.integers(1, 3000).map(lambda depth: b"[" * depth + raw + b"]" * depth),
        st.integers(1, 20000).map(lambda depth: b'{"v":1,"input":' + b"[" * depth + b"]" * depth + b"}"),
        st.tuples(st.integers(path_at, path_at + 8), st.sampled_from(INVALID_UTF8)).map(
            lambda at: raw[: at[0]] + at[1] + raw[at[0] :]
        ),
        st.tuples(st.integers(0, len(raw)), st.sampled_from(INVALID_UTF8)).map(
            lambda at: raw[: at[0]] + at[1] + raw[at[0] :]
        ),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF).map(
            lambda lone: _dump({**envelope, "input": {**envelope["input"], "image_path": f"a{lone}b"}})
        ),
    )


def hostile_bodies(envelope: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Anything at all: the refused mutations, random bytes and JSON, and edits that may still be a job."""
    raw = _dump(envelope)
    fields = sorted(envelope)
    return st.one_of(
        refused_bodies(envelope),
        st.binary(max_size=300),
        JSON_VALUES.map(_dump),
        st.tuples(st.sampled_from(fields), JSON_VALUES).map(lambda fv: _dump({**envelope, fv[0]: fv[1]})),
        st.dictionaries(TEXT.filter(lambda k: k not in envelope), JSON_VALUES, min_size=1, max_size=3).map(
            lambda extra: _dump({**envelope, **extra})
        ),
        st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)).map(
            lambda flip: raw[: flip[0]] + bytes([flip[1]]) + raw[flip[0] + 1 :]
        ),
    )


PURE_SCHEMA = image_schema("images")
PURE_SCHEMAS = {PURE_SCHEMA.name: SchemaTypes.of(PURE_SCHEMA)}
PURE_ENVELOPE = envelope_of(PURE_SCHEMA.name)


def test_near_valid_jobs_are_refused_with_their_bytes_kept() -> None:
    def refused(body: bytes) -> None:
        CASES["refused mutations"] += 1
        with pytest.raises(DecodeError) as info:
            decode(body, PURE_SCHEMAS, queue="images")
        error = info.value
        assert error.raw == body and error.queue == "images" and error.reason
        # The stand-in for the dead-letter queue encodes, decodes, and gives the very bytes back.
        stand_in = decode(encode(undecodable_job(error)), {})
        assert isinstance(stand_in.payload.input, UndecodableMessage)
        assert stand_in.payload.input.raw == body
        assert stand_in.payload.input.source_queue == "images"
        assert stand_in.error is not None and error.reason in stand_in.error

    for body in listed_refusals(PURE_ENVELOPE):
        refused(body)
    given(body=refused_bodies(PURE_ENVELOPE))(fuzz(PURE_EXAMPLES)(refused))()
    report("refused mutations", PURE_EXAMPLES)


def test_decoding_anything_gives_a_job_or_a_decode_error_and_a_job_re_encodes_stably() -> None:
    @fuzz(PURE_EXAMPLES)
    @given(body=hostile_bodies(PURE_ENVELOPE))
    def check(body: bytes) -> None:
        CASES["hostile bytes, decode"] += 1
        try:
            job = decode(body, PURE_SCHEMAS)
        except DecodeError as error:
            assert error.raw == body
            decode(encode(undecodable_job(error)), {})
            return
        # Whatever was accepted is a job again after a round trip (retries and dead-letters re-encode it).
        once = encode(job)
        assert encode(decode(once, PURE_SCHEMAS)) == once

    check()
    report("hostile bytes, decode", PURE_EXAMPLES)


def test_hostile_bytes_are_dead_lettered_raw_and_the_consumer_goes_on(
    make_session: Callable[..., Session], backend_name: str
) -> None:
    session = make_session()
    orchestrator = session.orchestrator
    queue = session.queue("hostile")
    schema = image_schema(queue)
    session.run(orchestrator.register(schema))
    envelope = envelope_of(queue)
    dlq = queue + DLQ_SUFFIX

    async def scenario(bodies: list[bytes]) -> None:
        await orchestrator.clean_queue(queue)
        await orchestrator.clean_queue(dlq)
        expected_dead: Counter[bytes] = Counter()
        expected_jobs: Counter[str] = Counter()
        for body in bodies:
            try:
                expected_jobs[orchestrator.decode(body, queue).id] += 1
            except DecodeError:
                expected_dead[body] += 1
        await _publish_raw(orchestrator.backend, queue, bodies)
        valid = make_job(schema, 7)
        await orchestrator.publish(queue, valid)
        consumer = Recorder(queue)
        consumer.connect(orchestrator)
        assert await consumer.consume(num_messages=len(bodies) + 1) == len(bodies) + 1
        assert valid.id in [job.id for job in consumer.ran], "the valid job after the hostile ones did not run"
        dead_raw: Counter[bytes] = Counter()
        handled = Counter(job.id for job in consumer.ran)
        for job in await _drain(orchestrator, dlq):
            stand_in = job.payload.input
            if not isinstance(stand_in, UndecodableMessage):
                handled[job.id] += 1  # a job after all, dead-lettered for its attempts
                continue
            assert stand_in.source_queue == queue and stand_in.reason
            assert job.error is not None and stand_in.reason in job.error
            dead_raw[stand_in.raw] += 1
        assert dead_raw == expected_dead
        expected_jobs[valid.id] += 1
        assert handled == expected_jobs
        assert await orchestrator.count_queue_messages(queue) == 0

    @fuzz(BROKER_EXAMPLES)
    @given(bodies=st.lists(hostile_bodies(envelope), min_size=1, max_size=6))
    def check(bodies: list[bytes]) -> None:
        CASES[f"hostile bytes/{backend_name}"] += len(bodies)
        session.run(scenario(bodies))

    check()
    report(f"hostile bytes/{backend_name}", BROKER_EXAMPLES)


# -- schema-mismatched inputs --------------------------------------------------------------------------

INPUT_VALUES = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "image_path": st.one_of(TEXT, JSON_VALUES),
            "threshold": st.one_of(st.floats(allow_nan=False, allow_infinity=False), TEXT, JSON_VALUES),
            "tags": st.one_of(st.lists(TEXT, max_size=3), JSON_VALUES),
            "unknown": JSON_VALUES,
        },
    ),
    JSON_VALUES.filter(lambda value: not isinstance(value, dict)),
)


def test_inputs_that_do_not_fit_their_schema_are_dead_lettered_with_the_validation_error(
    make_session: Callable[..., Session], backend_name: str
) -> None:
    session = make_session()
    orchestrator = session.orchestrator
    queue = session.queue("schema")
    session.run(orchestrator.register(image_schema(queue)))
    envelope = envelope_of(queue)

    async def scenario(inputs: list[Any]) -> None:
        await orchestrator.clean_queue(queue)
        await orchestrator.clean_queue(queue + DLQ_SUFFIX)
        bodies = [_dump({**envelope, "id": str(uuid.uuid4()), "input": value}) for value in inputs]
        await _publish_raw(orchestrator.backend, queue, bodies)
        consumer = Recorder(queue)
        consumer.connect(orchestrator)
        assert await consumer.consume(num_messages=len(bodies)) == len(bodies)
        ran = {job.id: job for job in consumer.ran}
        dead = {job.id: job for job in await _drain(orchestrator, queue + DLQ_SUFFIX)}
        for body, value in zip(bodies, inputs, strict=True):
            job_id = from_json(body)["id"]
            if value is None:  # the envelope's way of saying "input given as the class itself"
                assert ran[job_id].payload.input is ImageInput
                continue
            try:
                expected = ImageInput.model_validate(value)
            except ValidationError as exc:
                assert job_id not in ran, f"input {value!r} ran though it is not an ImageInput"
                stand_in = dead[job_id].payload.input
                assert isinstance(stand_in, UndecodableMessage) and stand_in.raw == body
                error = dead[job_id].error or ""
                assert "does not validate" in error and "ImageInput" in error
                for problem in exc.errors():
                    if problem["loc"]:
                        assert str(problem["loc"][0]) in error
            else:
                assert job_id not in dead
                assert ran[job_id].payload.input == expected
                assert isinstance(ran[job_id].payload.input, ImageInput)

    @fuzz(BROKER_EXAMPLES)
    @given(inputs=st.lists(INPUT_VALUES, min_size=1, max_size=5))
    def check(inputs: list[Any]) -> None:
        CASES[f"schema mismatch/{backend_name}"] += len(inputs)
        session.run(scenario(inputs))

    check()
    report(f"schema mismatch/{backend_name}", BROKER_EXAMPLES)


# -- oversized payloads --------------------------------------------------------------------------------


def sized_job(queue: str, size: int, index: int = 0) -> Job:
    """A job of ``queue``'s schema whose encoding is exactly ``size`` bytes (at least the smallest one)."""
    schema = image_schema(queue)
    job = job_from_schema(schema, ImageInput(image_path="", tags=[str(index)]))
    job.payload.input = ImageInput(image_path="x" * (size - len(encode(job))), tags=[str(index)])
    assert len(encode(job)) == size
    return job


def test_the_default_limit_is_16_mib_accepted_to_the_byte_and_refused_past_it(
    make_session: Callable[..., Session],
) -> None:
    session = make_session()
    orchestrator = session.orchestrator
    queue = session.queue("big")
    session.run(orchestrator.declare_queue(queue))
    assert session.backend.max_payload_bytes == MAX_PAYLOAD_BYTES == 16 * 1024 * 1024
    fits = sized_job(queue, MAX_PAYLOAD_BYTES)
    session.run(orchestrator.publish(queue, fits))
    over = sized_job(queue, MAX_PAYLOAD_BYTES + 1, 1)
    with pytest.raises(PayloadTooLargeError) as info:
        session.run(orchestrator.publish(queue, over))
    assert (info.value.queue, info.value.size, info.value.limit) == (queue, MAX_PAYLOAD_BYTES + 1, MAX_PAYLOAD_BYTES)
    assert session.run(orchestrator.count_queue_messages(queue)) == 1
    back = session.run(orchestrator.receive_message(queue, timeout=10))
    assert back is not None and back.id == fits.id and back.input_as(ImageInput) == fits.payload.input


LIMIT = 4096


def test_jobs_over_the_configured_limit_are_refused_before_sending_and_nothing_queued_changes(
    make_session: Callable[..., Session], backend_name: str
) -> None:
    session = make_session(max_payload_bytes=LIMIT)
    assert session.backend.max_payload_bytes == LIMIT
    orchestrator = session.orchestrator
    queue = session.queue("limit")
    session.run(orchestrator.register(image_schema(queue)))
    smallest = len(encode(job_from_schema(image_schema(queue), ImageInput(image_path="", tags=["0"]))))

    async def scenario(sizes: list[int]) -> None:
        await orchestrator.clean_queue(queue)
        before = sized_job(queue, LIMIT, 99)
        await orchestrator.publish(queue, before)
        jobs = [sized_job(queue, size, i) for i, size in enumerate(sizes)]
        accepted = []
        for job, size in zip(jobs, sizes, strict=True):
            if size <= LIMIT:
                await orchestrator.publish(queue, job)
                accepted.append(job)
                continue
            with pytest.raises(PayloadTooLargeError) as info:
                await orchestrator.publish(queue, job)
            error = info.value
            assert (error.queue, error.job_id, error.size, error.limit) == (queue, job.id, size, LIMIT)
            assert queue in str(error) and str(size) in str(error) and str(LIMIT) in str(error)
        if len(accepted) < len(jobs):
            with pytest.raises(PayloadTooLargeError):
                await orchestrator.publish_many(queue, jobs)  # all or nothing
        received = await _drain(orchestrator, queue)
        assert [job.id for job in received] == [job.id for job in [before, *accepted]]
        assert [job.payload.input for job in received] == [job.payload.input for job in [before, *accepted]]

    sizes = st.one_of(st.integers(LIMIT - 2, LIMIT + 2), st.integers(smallest, 3 * LIMIT))

    @fuzz(BROKER_EXAMPLES)
    @given(sizes=st.lists(sizes, min_size=1, max_size=6))
    def check(sizes: list[int]) -> None:
        CASES[f"payload sizes/{backend_name}"] += len(sizes)
        session.run(scenario(sizes))

    check()
    report(f"payload sizes/{backend_name}", BROKER_EXAMPLES)


def test_a_job_its_error_takes_over_the_limit_is_dead_lettered_not_a_crash(
    make_session: Callable[..., Session],
) -> None:
    # Regression: the retry of a job near the limit, its error recorded, was refused with PayloadTooLargeError
    # inside the consumer, which then crashed with the job still held.
    session = make_session(max_payload_bytes=LIMIT)
    orchestrator = session.orchestrator
    queue = session.queue("grows")
    session.run(orchestrator.register(image_schema(queue)))
    near = sized_job(queue, LIMIT - 10)
    after = sized_job(queue, 1000, 1)
    session.run(orchestrator.publish_many(queue, [near, after]))
    consumer = Recorder(queue, failure=ValueError("e" * 200), failing={near.id}, max_retries=3, retry_delay=0)
    consumer.connect(orchestrator)
    assert session.run(consumer.consume(num_messages=2)) == 2
    dead = session.run(_drain(orchestrator, queue + DLQ_SUFFIX))
    assert [job.id for job in dead] == [near.id]
    assert dead[0].attempts == 1 and dead[0].error is not None
    assert dead[0].error.startswith("ValueError: eee") and "not retried" in dead[0].error
    assert after.id in [job.id for job in consumer.ran]


def test_an_exception_text_with_lone_surrogates_is_recorded_not_a_crash(make_session: Callable[..., Session]) -> None:
    # Regression: an error naming an undecodable file name (surrogate escapes) could not be encoded: the
    # consumer crashed on the retry. Publishing such a job is a JobValidationError, not a driver error.
    session = make_session()
    orchestrator = session.orchestrator
    queue = session.queue("surrogate")
    schema = image_schema(queue)
    session.run(orchestrator.register(schema))
    job = make_job(schema, 1)
    session.run(orchestrator.publish(queue, job))
    name = b"/data/\xff.jpg".decode("utf-8", "surrogateescape")
    consumer = Recorder(queue, failure=OSError(f"cannot open {name}"), max_retries=0)
    consumer.connect(orchestrator)
    assert session.run(consumer.consume(num_messages=1)) == 1
    dead = session.run(orchestrator.receive_message(queue + DLQ_SUFFIX, timeout=5))
    assert dead is not None and dead.id == job.id
    assert dead.error == "OSError: cannot open /data/\\udcff.jpg"
    with pytest.raises(JobValidationError, match="cannot be encoded as JSON"):
        session.run(orchestrator.publish(queue, job_from_schema(schema, {"image_path": name})))


# -- queue names ---------------------------------------------------------------------------------------

NAME_CHARACTERS = set(string.ascii_letters + string.digits + "_-.")


def name_limit(name: str) -> int:
    """Longest allowed length for ``name``: a dead-letter queue name may carry its ``.dlq`` past the 200."""
    return MAX_QUEUE_NAME_LENGTH + (len(DLQ_SUFFIX) if name.endswith(DLQ_SUFFIX) else 0)


def documented_valid(name: object) -> bool:
    """The README's rule, written out independently: 1..200 characters of letters, digits, ``_-.``, not
    starting with ``.`` or ``-``, nor with RabbitMQ's reserved ``amq.``."""
    if not isinstance(name, str) or not name or name[0] in ".-" or not set(name) <= NAME_CHARACTERS:
        return False
    return len(name) <= name_limit(name) and not name.startswith("amq.")


SPECIAL_NAMES = ["", ".dlq", ".", "-", "a:b", "{a}", "a{b}c", "a*", "q?", "[q]", " q", "q ", "q\n", "q\t", "é"]
SPECIAL_NAMES += ["\uff51", "q\x00", "q.dlq", "q.dlq.dlq", "-q.dlq", "..dlq", "q/r", "q#", "q%2F", "٣", "ß", "q\u200b"]
SPECIAL_NAMES += ["amq.q", "amq.q.dlq", "amq.", "amq-q", "AMQ.q", "amqq"]
VALID_PARTS = ["a", "Z", "0", "_", "-", ".", ".dlq", "dlq", "amq.", "x" * 60]
NAME_PARTS = st.sampled_from([*VALID_PARTS, ":", "{", "}", "*", "?", "[", "]", " ", "\n", "é"])
HOSTILE_NAMES: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(SPECIAL_NAMES),
    st.text(max_size=30),
    st.text(alphabet=":{}*?[] \t\n\r\x00é名.-_aZ9/\\#%", max_size=20),
    st.lists(NAME_PARTS, min_size=1, max_size=8).map("".join),
    st.tuples(st.integers(190, 215), st.sampled_from(["", DLQ_SUFFIX, ":", "*"])).map(
        lambda n: "q" * (n[0] - len(n[1])) + n[1]
    ),
    st.sampled_from([None, 5, b"queue", ["q"]]),
)


def test_a_queue_name_is_valid_exactly_as_documented_or_a_typed_error_names_it() -> None:
    @fuzz(PURE_EXAMPLES)
    @given(name=HOSTILE_NAMES)
    def check(name: Any) -> None:
        CASES["queue names"] += 1
        if documented_valid(name):
            assert validate_queue_name(name) == name
            return
        with pytest.raises(InvalidQueueNameError) as info:
            validate_queue_name(name)
        error, message = info.value, str(info.value)
        if not isinstance(name, str):
            assert error.queue == repr(name) and type(name).__name__ in message
        elif not name:
            assert error.queue == "" and "empty" in message
        elif len(name) > name_limit(name):
            assert error.queue == name[:40] + "..." and repr(name[:40]) in message and str(len(name)) in message
        else:
            assert error.queue == name and repr(name) in message

    check()
    report("queue names", PURE_EXAMPLES)


VALID_NAMES = st.one_of(
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,30}", fullmatch=True),
    st.lists(st.sampled_from(VALID_PARTS), min_size=1, max_size=10).map("".join),
    st.tuples(st.integers(1, MAX_QUEUE_NAME_LENGTH), st.booleans()).map(
        lambda n: "q" * n[0] + (DLQ_SUFFIX if n[1] else "")
    ),
).filter(documented_valid)


def test_no_two_valid_queue_names_share_a_redis_key_or_a_delay_destination() -> None:
    # Names one suffix apart are the likeliest to collide: draw those as often as unrelated pairs.
    related = VALID_NAMES.flatmap(lambda name: st.sampled_from([[name, name + DLQ_SUFFIX], [name, name + ".d"]]))
    pairs = st.one_of(st.lists(VALID_NAMES, min_size=2, max_size=2, unique=True), related).filter(
        lambda pair: all(map(documented_valid, pair)) and pair[0] != pair[1]
    )

    @fuzz(PURE_EXAMPLES)
    @given(
        names=pairs,
        prefix=st.sampled_from(["", "app:", "x"]),
    )
    def check(names: list[str], prefix: str) -> None:
        CASES["redis key layout"] += 1
        prefix = REDIS_KEY_PREFIX + prefix
        keys = [set(_Keys.of(prefix, name).all()) for name in names]
        assert not keys[0] & keys[1], f"{names} share keys"
        for name, owned in zip(names, keys, strict=True):
            assert len(owned) == len(dataclasses.fields(_Keys))  # every part of a queue has a key of its own
            assert all(key.startswith(prefix) for key in owned)
            # A queue and its dead-letter queue live in one cluster slot, so each script touches one slot.
            dlq = name if name.endswith(DLQ_SUFFIX) else name + DLQ_SUFFIX
            assert len({key_slot(key.encode()) for key in owned | set(_Keys.of(prefix, dlq).all())}) == 1
        # RabbitMQ's delay chain delivers by a digest of the queue name: no two queues share one.
        assert delays.destination_key(names[0]) != delays.destination_key(names[1])

    check()
    report("redis key layout", PURE_EXAMPLES)


def test_invalid_queue_names_are_refused_by_every_operation_before_any_io(backend_name: str) -> None:
    # The backend points at a port nobody listens on: any I/O would be a BackendUnavailableError instead.
    port = servers.free_port()
    url, options = {
        "memory": ("memory://", {}),
        "redis": (f"redis://127.0.0.1:{port}/0", {"connection_retries": 0}),
        "rabbitmq": (f"amqp://guest:guest@127.0.0.1:{port}/", {}),
    }[backend_name.split("+", 1)[0]]  # a pairing's records are written only after the name is checked
    session = Session(from_url(url, **options))
    orchestrator = session.orchestrator
    schema = image_schema("any")
    operations: dict[str, Callable[[Any], Coroutine[Any, Any, Any]]] = {
        "declare_queue": orchestrator.declare_queue,
        "publish": lambda name: orchestrator.publish(name, make_job(schema)),
        "publish_many": lambda name: orchestrator.publish_many(name, [make_job(schema)]),
        "count_queue_messages": orchestrator.count_queue_messages,
        "clean_queue": orchestrator.clean_queue,
        "delete_queue": orchestrator.delete_queue,
        "receive_message": orchestrator.receive_message,
        "requeue_dead_letters": orchestrator.requeue_dead_letters,
        "open_receiver": orchestrator.open_receiver,
    }

    def refused_everywhere(name: str) -> None:
        CASES[f"invalid names/{backend_name}"] += 1
        for operation, call in operations.items():
            try:
                session.run(call(name))
            except InvalidQueueNameError:
                continue
            except Exception as exc:
                pytest.fail(f"{operation}({name!r}) raised {exc!r}, not InvalidQueueNameError")
            pytest.fail(f"{operation}({name!r}) accepted the name")
        with pytest.raises(InvalidQueueNameError):
            Recorder(name)

    @fuzz(PURE_EXAMPLES)
    @given(name=HOSTILE_NAMES.filter(lambda name: isinstance(name, str) and not documented_valid(name)))
    def check(name: str) -> None:
        refused_everywhere(name)

    try:
        for name in SPECIAL_NAMES:
            if not documented_valid(name):
                refused_everywhere(name)
        check()
    finally:
        session.close()
    report(f"invalid names/{backend_name}", PURE_EXAMPLES)


def test_valid_queue_names_with_dots_dashes_and_dlq_suffixes_work_and_stay_apart(
    make_session: Callable[..., Session], backend_name: str
) -> None:
    session = make_session()
    orchestrator = session.orchestrator
    tag = uuid.uuid4().hex[:8]

    async def scenario(tails: list[str]) -> None:
        names = [f"t{tag}{tail}" for tail in tails]
        session.queues.extend(name for name in names if name not in session.queues)
        for name in names:  # a clean slate, also when hypothesis replays a failed example
            await orchestrator.delete_queue(name)
        jobs = {name: make_job(image_schema(name), i) for i, name in enumerate(names)}
        for name in names:
            await orchestrator.declare_queue(name)
        for name, job in jobs.items():
            await orchestrator.publish(name, job)
        for name, job in jobs.items():
            assert await orchestrator.count_queue_messages(name) == 1, name
            received = await orchestrator.receive_message(name, timeout=5)
            assert received is not None and received.id == job.id, name
        for name in names:
            await orchestrator.delete_queue(name)

    parts = st.sampled_from([part for part in VALID_PARTS if part != "amq."])
    tails = st.lists(parts, max_size=8).map("".join).filter(lambda tail: documented_valid(f"t{tag}{tail}"))

    @fuzz(BROKER_EXAMPLES)
    @given(tails=st.lists(tails, min_size=1, max_size=3, unique=True))
    def check(tails: list[str]) -> None:
        CASES[f"valid names/{backend_name}"] += len(tails)
        session.run(scenario(tails))

    check()
    report(f"valid names/{backend_name}", BROKER_EXAMPLES)


def test_the_dead_letter_queue_of_the_longest_name_is_usable(make_session: Callable[..., Session]) -> None:
    # Regression: a 200-character queue's dead-letter queue (204 characters) was refused as too long, so its
    # dead letters could be neither counted, read nor requeued.
    session = make_session()
    orchestrator = session.orchestrator
    queue = session.queue("long", length=MAX_QUEUE_NAME_LENGTH)
    schema = image_schema(queue)
    session.run(orchestrator.register(schema))
    job = make_job(schema, 1)
    session.run(orchestrator.publish(queue, job))
    consumer = Recorder(queue, failure=RuntimeError("fails"), max_retries=0)
    consumer.connect(orchestrator)
    assert session.run(consumer.consume(num_messages=1)) == 1
    assert session.run(orchestrator.count_queue_messages(queue + DLQ_SUFFIX)) == 1
    assert session.run(orchestrator.requeue_dead_letters(queue)) == 1
    back = session.run(orchestrator.receive_message(queue, timeout=5))
    assert back is not None and back.id == job.id
    with pytest.raises(InvalidQueueNameError, match="205 characters"):
        session.run(orchestrator.declare_queue(queue + "x" + DLQ_SUFFIX))


def test_a_dead_letter_queue_can_be_neither_consumed_nor_requeued_into_itself(
    make_session: Callable[..., Session],
) -> None:
    # Regressions: requeue_dead_letters("q.dlq") moved jobs from q.dlq to q.dlq forever; a consumer of q.dlq
    # dead-lettered each job back into q.dlq forever without running it.
    session = make_session()
    orchestrator = session.orchestrator
    queue = session.queue("dead")
    schema = image_schema(queue)
    session.run(orchestrator.register(schema))
    session.run(orchestrator.publish(queue + DLQ_SUFFIX, make_job(schema, 1, attempts=4)))
    with pytest.raises(QueueError, match="is a dead-letter queue") as info:
        session.run(orchestrator.requeue_dead_letters(queue + DLQ_SUFFIX))
    assert info.value.queue == queue + DLQ_SUFFIX
    with pytest.raises(QueueError, match="is a dead-letter queue"):
        Recorder(queue + DLQ_SUFFIX)
    assert session.run(orchestrator.count_queue_messages(queue + DLQ_SUFFIX)) == 1
    assert session.run(orchestrator.requeue_dead_letters(queue)) == 1
