"""OpenTelemetry traces of publishes and runs (extra ``otel``): TracingHook, on by default when installed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Final

from opentelemetry import propagate, trace
from opentelemetry.context import Context, attach, detach
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from mindtrace.jobs.hooks import Hook, PublishEvent, RunEvent, SettleEvent
from mindtrace.jobs.lifecycle import JobStatus

#: ``messaging.system`` of each broker (``PublishEvent.broker``): RabbitMQ's is the convention's own value;
#: Redis and memory have none there, so theirs are custom.
MESSAGING_SYSTEMS: Final = {
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "redis": "redis",
    "rediss": "redis",
    "memory": "mindtrace.memory",
}

#: Span events of a run span (its settle), each with ``mindtrace.job.reason``.
EVENT_RETRIED: Final = "mindtrace.job.retried"
EVENT_DEAD_LETTERED: Final = "mindtrace.job.dead_lettered"
EVENT_TIMED_OUT: Final = "mindtrace.job.timed_out"
EVENT_CANCELLED: Final = "mindtrace.job.cancelled"
EVENT_SETTLE_FAILED: Final = "mindtrace.job.settle_failed"

# Run spans waiting for their settle, at most this many: one whose settle never came (a consumer task torn
# down mid-settle) is ended unsettled when the table is full, so the table cannot grow without bound.
_MAX_OPEN_RUNS: Final = 10_000

_TRACER_NAME: Final = "mindtrace.jobs"

# Seconds between looks for a configured global TracerProvider while there is none.
_RECHECK_INTERVAL: Final = 1.0


class TracingHook(Hook):
    """Traces every publish and every run of a job, one trace per job across processes and retries.

    - ``publish``: a PRODUCER span ``send <queue>``, child of the publisher's current span; its W3C trace
      context (``traceparent``, ``tracestate``, baggage: the global propagator's fields) goes into
      ``job.headers``, which travel in the job's envelope on every backend (and as AMQP headers on RabbitMQ).
    - ``run``: a CONSUMER span ``process <queue>`` per attempt, whose parent is the publish span *and* which
      links to it (the conventions require the link), current inside ``run`` (in its thread for a blocking
      ``run``). A retried job is one trace with one process span per attempt: a retry sends the job again with
      its headers unchanged. An exception of ``run`` is recorded on the span, whose status becomes ERROR.
    - the span stays open until its message is settled, so its end says how: events ``mindtrace.job.retried``,
      ``…dead_lettered``, ``…timed_out``, ``…cancelled`` (each with ``mindtrace.job.reason``),
      ``…settle_failed`` (a lost lease), and the attribute ``mindtrace.job.status``.

    Attributes (OpenTelemetry messaging conventions): ``messaging.system`` (``rabbitmq``; ``redis`` and
    ``mindtrace.memory`` are custom values), ``messaging.destination.name``, ``messaging.operation.type`` and
    ``messaging.operation.name`` (``send`` / ``process``), ``messaging.message.id`` (the job id), and
    ``mindtrace.job.attempt`` (1 for the first run) on process spans.

    ``tracer_provider``: where spans go; None for the global one (``trace.set_tracer_provider``). Until one
    is configured the hook is not ``active`` and the core leaves it out of every call: no span, no
    propagation, a job published then carries no trace context. The global provider is looked up again at
    most once a second until then, so one configured after the orchestrator was made is used within a second.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._provider = tracer_provider
        self._tracer: trace.Tracer | None = None
        self._recheck_at = 0.0  # time.monotonic() after which to look for a configured provider again
        self._open: dict[tuple[str, str], list[trace.Span]] = {}

    def __repr__(self) -> str:
        return f"<TracingHook {'global provider' if self._provider is None else self._provider!r}>"

    @property
    def active(self) -> bool:
        """Whether a TracerProvider is configured (see above): until then the core skips this hook."""
        return self._tracer is not None or self._get_tracer() is not None

    def _get_tracer(self) -> trace.Tracer | None:
        """The tracer, or None while no TracerProvider is configured (the API's no-op would still cost)."""
        if self._tracer is not None:
            return self._tracer
        # Looked up at most once a second while none is configured: the lookup reads the environment.
        now = time.monotonic()
        if now < self._recheck_at:
            return None
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            self._recheck_at = now + _RECHECK_INTERVAL
            return None
        self._tracer = provider.get_tracer(_TRACER_NAME, _version())
        return self._tracer

    def publish(self, event: PublishEvent) -> AbstractContextManager[object] | None:
        """Start the ``send`` span and put its context into ``event.job.headers``; the span covers the send."""
        tracer = self._get_tracer()
        if tracer is None:
            return None
        # Started here, not when entered: publish_many enters every job's manager before it sends, and each
        # job's span must be a child of the caller's span, not of the job before it.
        span = tracer.start_span(
            f"send {event.queue}",
            kind=SpanKind.PRODUCER,
            attributes=_attributes(event.broker, event.queue, event.job.id, "send"),
        )
        propagate.inject(event.job.headers, context=trace.set_span_in_context(span))
        return trace.use_span(span, end_on_exit=True)

    def run(self, event: RunEvent) -> AbstractContextManager[object] | None:
        """Start the ``process`` span (parent and link: the publish span), current for the run; it ends once
        the message is settled (see :meth:`settled`)."""
        tracer = self._get_tracer()
        if tracer is None:
            return None
        # A job published untraced starts a trace of its own, not a child of whatever the worker has current.
        headers = event.job.headers
        parent = propagate.extract(headers, context=Context()) if headers else Context()
        producer = trace.get_current_span(parent).get_span_context()
        attributes = _attributes(event.broker, event.queue, event.job.id, "process")
        attributes["mindtrace.job.attempt"] = event.context.attempt
        span = tracer.start_span(
            f"process {event.queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=[Link(producer)] if producer.is_valid else None,
            attributes=attributes,
        )
        self._hold(event.queue, event.job.id, span)
        return _current(span)

    def settled(self, event: SettleEvent) -> None:
        """End the run span of the settled message with what became of it (nothing for an unrun settle)."""
        if not self._open:
            return
        span = self._take(event.queue, event.job.id)
        if span is None:
            return
        reason = {"mindtrace.job.reason": event.reason} if event.reason else None
        if event.failure is not None:
            span.add_event(EVENT_SETTLE_FAILED, {"mindtrace.job.reason": f"{type(event.failure).__name__}"})
        if event.timed_out:
            span.add_event(EVENT_TIMED_OUT, reason)
            span.set_status(Status(StatusCode.ERROR, "the run went over its time limit"))
        if event.status is JobStatus.CANCELLED:
            span.add_event(EVENT_CANCELLED, reason)
        if event.action == "retry" and event.status is JobStatus.RETRYING:
            span.add_event(EVENT_RETRIED, reason)
        elif event.action == "dead_letter":
            span.add_event(EVENT_DEAD_LETTERED, reason)
            span.set_status(Status(StatusCode.ERROR, event.reason or "dead-lettered"))
        span.set_attribute("mindtrace.job.status", event.status.value)
        span.end()

    def _hold(self, queue: str, job_id: str, span: trace.Span) -> None:
        if len(self._open) >= _MAX_OPEN_RUNS:
            for stale in self._open.pop(next(iter(self._open))):
                stale.end()
        self._open.setdefault((queue, job_id), []).append(span)

    def _take(self, queue: str, job_id: str) -> trace.Span | None:
        spans = self._open.get((queue, job_id))
        if not spans:
            return None
        span = spans.pop(0)
        if not spans:
            del self._open[(queue, job_id)]
        return span


@contextlib.contextmanager
def _current(span: trace.Span) -> Iterator[None]:
    """``span`` current for the run; the run's exception recorded on it. It is not ended here."""
    token = attach(trace.set_span_in_context(span))
    try:
        yield
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        detach(token)


def _attributes(broker: str, queue: str, job_id: str, operation: str) -> dict[str, Any]:
    return {
        "messaging.system": MESSAGING_SYSTEMS.get(broker, broker or "mindtrace"),
        "messaging.destination.name": queue,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.message.id": job_id,
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mindtrace-jobs")
    except PackageNotFoundError:
        return "0"
