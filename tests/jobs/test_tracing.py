"""OpenTelemetry traces (TracingHook) on every backend: one trace per job, across retries and processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mindtrace.jobs import Job, current_job
from mindtrace.jobs.hooks import TRACING_ENV, default_hooks
from mindtrace.jobs.lifecycle import CancelOutcome
from mindtrace.jobs.tracing import (
    EVENT_CANCELLED,
    EVENT_DEAD_LETTERED,
    EVENT_RETRIED,
    EVENT_TIMED_OUT,
    TracingHook,
)
from tests.jobs.conformance.flows import FAST_RETRY, detect, detection_of
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.conformance.test_hooks import install
from tests.jobs.support.api import Api

ROOT = Path(__file__).resolve().parents[2]

#: ``messaging.system`` by the backend under test's broker.
SYSTEMS = {"memory": "mindtrace.memory", "redis": "redis", "rabbitmq": "rabbitmq", "rabbitmq+redis": "rabbitmq"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The exporter of a fresh TracerProvider (not the global one) for this test's hook."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    provider.shutdown()


def hook_for(exporter: InMemorySpanExporter) -> TracingHook:
    """A TracingHook on a provider of its own exporting to ``exporter``."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return TracingHook(tracer_provider=provider)


def of_kind(spans: InMemorySpanExporter, kind: SpanKind, job: Job) -> list[ReadableSpan]:
    """The finished spans of ``kind`` about ``job``, in the order they started."""
    found = [
        span
        for span in spans.get_finished_spans()
        if span.kind is kind and (span.attributes or {}).get("messaging.message.id") == job.id
    ]
    return sorted(found, key=lambda span: span.start_time or 0)


def events(span: ReadableSpan) -> list[str]:
    """The names of ``span``'s events."""
    return [event.name for event in span.events]


def assert_child_and_link(process: ReadableSpan, send: ReadableSpan) -> None:
    """``process`` is in ``send``'s trace, its parent is ``send``, and it links to ``send``."""
    sent = send.get_span_context()
    assert sent is not None and process.parent is not None
    assert process.context is not None and process.context.trace_id == sent.trace_id
    assert process.parent.span_id == sent.span_id and process.parent.is_remote
    assert [(link.context.trace_id, link.context.span_id) for link in process.links] == [(sent.trace_id, sent.span_id)]


async def test_a_job_is_one_trace_from_its_publish_to_its_run(
    api: Api, queue: str, backend_name: str, spans: InMemorySpanExporter
) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    install(api, hook_for(spans))
    inside: dict[str, Any] = {}

    async def handler(job: Job) -> Any:
        # The process span is current in run (for the sync API, in the thread running it).
        inside["span"] = trace.get_current_span().get_span_context()
        inside["headers"] = dict(job.headers)
        return await detect(job)

    job = make_job(schema, 1)
    await api.publish(queue, job)
    assert await asyncio.wait_for(api.consumer(queue, handler).consume(num_messages=1), 20) == 1
    [send] = of_kind(spans, SpanKind.PRODUCER, job)
    [process] = of_kind(spans, SpanKind.CONSUMER, job)
    assert send.name == f"send {queue}" and process.name == f"process {queue}"
    assert_child_and_link(process, send)
    assert inside["span"] == process.get_span_context()
    sent = send.get_span_context()
    assert sent is not None
    assert inside["headers"]["traceparent"].startswith(f"00-{sent.trace_id:032x}-{sent.span_id:016x}-")
    common = {
        "messaging.system": SYSTEMS[backend_name],
        "messaging.destination.name": queue,
        "messaging.message.id": job.id,
    }
    assert dict(send.attributes or {}) == {
        **common,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
    }
    assert dict(process.attributes or {}) == {
        **common,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "mindtrace.job.attempt": 1,
        "mindtrace.job.status": "succeeded",
    }
    assert process.status.status_code is StatusCode.UNSET and events(process) == []


async def test_a_retried_job_is_one_trace_with_a_process_span_per_attempt(
    async_api: Api, queue: str, spans: InMemorySpanExporter
) -> None:
    api = async_api
    schema = image_schema(queue)
    await api.register(schema)
    hook = hook_for(spans)
    install(api, hook)
    headers: list[dict[str, str]] = []

    async def flaky(job: Job) -> Any:
        headers.append(dict(job.headers))
        if len(headers) == 1:
            raise ValueError("transient")
        return detection_of(job)

    job = make_job(schema, 1)
    await api.publish(queue, job)
    assert await asyncio.wait_for(api.consumer(queue, flaky, max_retries=2, **FAST_RETRY).consume(2), 20) == 2
    assert len(headers) == 2 and headers[0] == headers[1]  # the retry sent the headers unchanged
    [send] = of_kind(spans, SpanKind.PRODUCER, job)
    first, second = of_kind(spans, SpanKind.CONSUMER, job)
    assert_child_and_link(first, send)
    assert_child_and_link(second, send)
    assert [span.attributes["mindtrace.job.attempt"] for span in (first, second) if span.attributes] == [1, 2]
    assert first.status.status_code is StatusCode.ERROR and "ValueError: transient" in str(first.status.description)
    assert events(first) == ["exception", EVENT_RETRIED]
    assert first.events[0].attributes is not None and first.events[0].attributes["exception.type"] == "ValueError"
    assert second.status.status_code is StatusCode.UNSET and events(second) == []
    assert hook._open == {}  # every run span ended at its settle: none is left waiting


async def test_a_dead_lettered_job_ends_its_span_with_an_event_and_keeps_its_headers(
    async_api: Api, queue: str, spans: InMemorySpanExporter
) -> None:
    api = async_api
    schema = image_schema(queue)
    await api.register(schema)
    install(api, hook_for(spans))

    async def failing(job: Job) -> None:
        raise ValueError("bad image")

    job = make_job(schema, 1)
    await api.publish(queue, job)
    assert await asyncio.wait_for(api.consumer(queue, failing, max_retries=0, **FAST_RETRY).consume(1), 20) == 1
    [send] = of_kind(spans, SpanKind.PRODUCER, job)
    [process] = of_kind(spans, SpanKind.CONSUMER, job)
    assert events(process) == ["exception", EVENT_DEAD_LETTERED]
    assert process.status.status_code is StatusCode.ERROR
    assert (process.attributes or {})["mindtrace.job.status"] == "failed"
    dead = await api.receive_message(queue + ".dlq", timeout=5)
    assert dead is not None and dead.id == job.id
    sent = send.get_span_context()
    assert sent is not None and f"{sent.span_id:016x}" in dead.headers["traceparent"]


async def test_a_run_over_its_time_limit_has_a_timed_out_event(
    async_api: Api, queue: str, spans: InMemorySpanExporter
) -> None:
    api = async_api
    schema = image_schema(queue)
    await api.register(schema)
    install(api, hook_for(spans))

    async def stuck(job: Job) -> None:
        await asyncio.sleep(5)

    job = make_job(schema, 1)
    await api.publish(queue, job)
    consumer = api.consumer(queue, stuck, timeout=0.2, max_retries=0, **FAST_RETRY)
    assert await asyncio.wait_for(consumer.consume(num_messages=1), 20) == 1
    [process] = of_kind(spans, SpanKind.CONSUMER, job)
    assert events(process) == [EVENT_TIMED_OUT, EVENT_DEAD_LETTERED]
    assert process.status.status_code is StatusCode.ERROR


@pytest.mark.usefixtures("job_records")
async def test_a_run_cancelled_while_it_runs_has_a_cancelled_event(
    async_api: Api, queue: str, spans: InMemorySpanExporter
) -> None:
    api = async_api
    schema = image_schema(queue)
    await api.register(schema)
    install(api, hook_for(spans))
    started = asyncio.Event()

    async def long(job: Job) -> None:
        started.set()
        context = current_job()
        while not context.cancelled:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    job = make_job(schema, 1)
    handle = await api.publish(queue, job)
    consuming = asyncio.create_task(api.consumer(queue, long).consume(num_messages=1))
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert await api.cancel(handle, reason="not needed") is CancelOutcome.CANCELLING
        assert await asyncio.wait_for(consuming, 20) == 1
    finally:
        consuming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consuming
    [process] = of_kind(spans, SpanKind.CONSUMER, job)
    assert events(process) == [EVENT_CANCELLED]
    assert process.events[0].attributes == {"mindtrace.job.reason": "not needed"}
    assert (process.attributes or {})["mindtrace.job.status"] == "cancelled"


async def test_publish_many_makes_sibling_spans_under_the_callers_span(
    async_api: Api, queue: str, spans: InMemorySpanExporter
) -> None:
    api = async_api
    schema = image_schema(queue)
    await api.register(schema)
    hook = hook_for(spans)
    install(api, hook)
    jobs = [make_job(schema, i) for i in range(3)]
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        await api.publish_many(queue, jobs)
    for job in jobs:
        [send] = of_kind(spans, SpanKind.PRODUCER, job)
        assert send.parent is not None and send.parent.span_id == request.get_span_context().span_id


async def test_the_trace_context_is_mirrored_into_the_amqp_headers(
    amqp_url: str, new_queue: Any, spans: InMemorySpanExporter
) -> None:
    from mindtrace.jobs import AsyncOrchestrator, from_url

    queue = new_queue("amqp-headers")
    async with AsyncOrchestrator(from_url(amqp_url), hooks=[hook_for(spans)]) as orchestrator:
        schema = image_schema(queue)
        await orchestrator.register(schema)
        await orchestrator.declare_queue(queue)
        try:
            job = make_job(schema, 1)
            await orchestrator.publish(queue, job)
            async with await orchestrator.backend.open_receiver(queue, prefetch=1) as receiver:
                delivery = await receiver.get(10)
                assert delivery is not None
                amqp_headers = dict(delivery.handle.headers or {})
                await orchestrator.backend.ack(delivery)
            assert amqp_headers["traceparent"] == job.headers["traceparent"]
        finally:
            await orchestrator.delete_queue(queue)


async def test_a_job_published_here_and_run_in_another_process_is_one_trace(
    async_api: Api,
    queue: str,
    backend_url: str,
    orchestrator_options: dict[str, Any],
    spans: InMemorySpanExporter,
    tmp_path: Path,
) -> None:
    api = async_api
    if not api.orchestrator.backend.capabilities.shared_queues:
        pytest.skip("in-memory queues live in one process (capabilities.shared_queues is False)")
    schema = image_schema(queue)
    await api.register(schema)
    await api.declare_queue(queue)
    install(api, hook_for(spans))
    job = make_job(schema, 1)
    await api.publish(queue, job)
    out = tmp_path / "spans.jsonl"
    state = orchestrator_options.get("state")
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.jobs.tracing_worker",
        backend_url,
        queue,
        str(out),
        *(["--state", state] if state else []),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(worker.communicate(), 30)
    assert worker.returncode == 0, stderr.decode()[-2000:]
    [send] = of_kind(spans, SpanKind.PRODUCER, job)
    [process] = [json.loads(line) for line in out.read_text().splitlines()]
    sent = send.get_span_context()
    assert sent is not None
    assert (process["name"], process["kind"]) == (f"process {queue}", "CONSUMER")
    assert process["trace_id"] == f"{sent.trace_id:032x}"
    assert process["parent"] == f"{sent.span_id:016x}" and process["links"] == [f"{sent.span_id:016x}"]
    assert process["attributes"]["messaging.message.id"] == job.id


def test_the_default_hooks_trace_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    [hook] = default_hooks()
    assert isinstance(hook, TracingHook)
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv(TRACING_ENV, off)
        assert default_hooks() == ()


def test_without_opentelemetry_the_package_imports_and_has_no_default_hooks() -> None:
    # opentelemetry made unimportable (None in sys.modules), as if not installed.
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import mindtrace.jobs\n"
        "from mindtrace.jobs import AsyncOrchestrator, LocalClient\n"
        "assert AsyncOrchestrator(LocalClient()).hooks == (), 'default hooks'\n"
        "loaded = [name for name, module in sys.modules.items() if name.startswith('opentelemetry') and module]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    env = {key: value for key, value in os.environ.items() if key != TRACING_ENV}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


async def test_with_no_provider_configured_the_hook_is_inactive_and_sets_no_headers(async_api: Api, queue: str) -> None:
    hook = TracingHook(tracer_provider=trace.NoOpTracerProvider())
    assert not hook.active
    schema = image_schema(queue)
    await async_api.register(schema)
    install(async_api, hook)
    job = make_job(schema, 1)
    await async_api.publish(queue, job)
    taken = await async_api.receive_message(queue, timeout=5)
    assert taken is not None and taken.headers == {} and job.headers == {}
