"""Hooks: the one seam for cross-cutting concerns (metrics, traces, timers) around publish, run and settle.

A :class:`Hook` is configured once on the orchestrator (``AsyncOrchestrator(..., hooks=[...])``); consumers
connected to it inherit its hooks. The orchestrator and the consumer call them, never a backend:

- ``publish(event)`` around each job's publish: a context manager (or None) entered before the job is encoded,
  so it may add ``event.job.headers`` (trace context), and exited once the broker holds the job (or with the
  publish's error);
- ``run(event)`` around each run of a job: a context manager (or None) entered just before ``run`` and exited
  after it (with its error, if it raised), in the run's own task, so the context it sets (a span) is current in
  ``run``, for a blocking ``run`` in its thread too;
- ``settled(event)`` after each settle of a claimed message: the outcome (acked as succeeded, cancelled or
  expired, retried, dead-lettered, given back) or the settle's failure (a lost lease).

Retries stay in the core: a hook observes, it does not decide. A hook whose ``publish`` or ``run`` raises
breaks the call it wraps, like any error there; one whose ``settled`` raises is logged and skipped (the message
is settled by then). With no hook installed the core pays one truth test per call; with only hooks that are not
``active`` (a TracingHook before any TracerProvider is configured), one more test per hook and no event; hooks
that return None for a call cost no context manager. The default hooks trace when OpenTelemetry is installed
(:func:`default_hooks`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mindtrace.jobs.context import JobContext
from mindtrace.jobs.errors import ConfigurationError
from mindtrace.jobs.lifecycle import JobStatus
from mindtrace.jobs.policy import Outcome
from mindtrace.jobs.types import Job

if TYPE_CHECKING:
    from mindtrace.jobs.orchestrator import AsyncOrchestrator

logger = logging.getLogger("mindtrace.jobs")

#: Set to ``0`` (or false, no, off) to leave tracing out of the default hooks (see :func:`default_hooks`).
TRACING_ENV = "MINDTRACE_JOBS_TRACING"


@dataclass(frozen=True, slots=True)
class PublishEvent:
    """One job being published to ``queue``; ``job.headers`` may still be changed (it is encoded after).

    ``broker``: which kind of backend holds ``queue``, as :func:`broker_name` says (``memory``, ``redis``,
    ``amqp``).
    """

    queue: str
    job: Job
    broker: str = ""


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One run of ``job`` from ``queue`` about to start: its context (attempt, worker, deadline), how many
    times the broker has handed the message out (see ``Delivery.delivery_count``), ``broker`` as in
    :class:`PublishEvent`, and the orchestrator of the consumer running it (for a hook that reads the queues,
    as the metrics hook samples their depth)."""

    queue: str
    job: Job
    context: JobContext
    delivery_count: int
    broker: str = ""
    orchestrator: AsyncOrchestrator | None = None


@dataclass(frozen=True, slots=True)
class SettleEvent:
    """A claimed message from ``queue`` was settled (``failure`` None) or its settle failed.

    ``action`` is the backend verb: ``"ack"``, ``"retry"``, ``"dead_letter"`` or ``"release"``. ``status`` is
    what the job became: SUCCEEDED, CANCELLED, EXPIRED (acked), RETRYING (retried after a failed run), QUEUED
    (given back uncharged, or a lost run recorded and handed back), FAILED (dead-lettered), UNKNOWN (handed out
    by ``receive_message``). ``job`` is the job as settled (``attempts`` and ``error`` updated); ``reason`` says
    why (the error, the dead-letter reason, the cancel reason); ``ran`` whether a run of it preceded this
    settle; ``timed_out`` whether that run went over its time limit. ``failure`` is the error of a settle that
    did not happen (LeaseLostError: another consumer may hold the job now; the broker keeps the message).
    """

    queue: str
    job: Job
    action: str
    status: JobStatus
    reason: str = ""
    ran: bool = False
    timed_out: bool = False
    failure: BaseException | None = None


class Hook:
    """Base class of a hook: override the methods you need (each one here does nothing).

    ``publish`` and ``run`` return a context manager wrapping the call, or None for none. ``active`` False
    says the hook has nothing to do for now: the core then leaves it out of that call and of its settle.
    """

    @property
    def active(self) -> bool:
        """Whether to call this hook now (always, here); read once per publish, run and settle."""
        return True

    def publish(self, event: PublishEvent) -> AbstractContextManager[object] | None:
        """Called before ``event.job`` is encoded and sent; the context manager returned wraps the send."""
        return None

    def run(self, event: RunEvent) -> AbstractContextManager[object] | None:
        """Called before a run starts; the context manager returned wraps the run (in the run's context)."""
        return None

    def settled(self, event: SettleEvent) -> None:
        """Called after a claimed message was settled, or its settle failed (``event.failure``)."""


def check_hooks(hooks: Sequence[Hook] | None) -> tuple[Hook, ...]:
    """``hooks`` as a tuple (None: the default hooks, see :func:`default_hooks`); ConfigurationError for
    anything that is not a :class:`Hook`."""
    if hooks is None:
        return default_hooks()
    if isinstance(hooks, Hook):
        hooks = [hooks]
    checked = tuple(hooks)
    for hook in checked:
        if not isinstance(hook, Hook):
            raise ConfigurationError(f"hooks must be Hook instances, not {type(hook).__name__}")
    return checked


def broker_name(backend: object) -> str:
    """The name events give ``backend``'s kind: its first URL scheme (``memory``, ``redis``, ``amqp``), else its
    class name."""
    schemes = getattr(backend, "schemes", ())
    return str(schemes[0]) if schemes else type(backend).__name__


def default_hooks() -> tuple[Hook, ...]:
    """The hooks an orchestrator gets when given none: a :class:`~mindtrace.jobs.tracing.TracingHook` when
    ``opentelemetry-api`` is installed (extra ``otel``) and ``MINDTRACE_JOBS_TRACING`` does not turn it off
    (``0``, ``false``, ``no``, ``off``); none otherwise. Nothing is imported from OpenTelemetry when it is
    missing or turned off."""
    if os.environ.get(TRACING_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return ()
    try:
        installed = importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):  # no opentelemetry package at all, or one blocked in sys.modules
        installed = False
    if not installed:
        return ()
    from mindtrace.jobs.tracing import TracingHook

    return (TracingHook(),)


def awake(hooks: Sequence[Hook]) -> list[Hook]:
    """The hooks of ``hooks`` that are ``active`` now."""
    return [hook for hook in hooks if hook.active]


def around(managers: Sequence[AbstractContextManager[object] | None]) -> AbstractContextManager[object] | None:
    """One context manager for ``managers`` (None entries dropped): None when none is left (the caller then
    enters nothing, so hooks that pass on a call cost no context manager), the one left itself, or
    all of them stacked."""
    found = [manager for manager in managers if manager is not None]
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    return _stacked(found)


@contextlib.contextmanager
def _stacked(managers: Sequence[AbstractContextManager[object]]) -> Iterator[None]:
    """Enter every context manager of ``managers`` in order; exit them in reverse."""
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


def settle_event(queue: str, outcome: Outcome, failure: BaseException | None) -> SettleEvent:
    """The event of a settle of ``outcome`` from ``queue`` (``failure``: the settle's error, if it failed)."""
    return SettleEvent(
        queue,
        outcome.job,
        outcome.action.value,
        outcome.becomes,
        outcome.reason,
        outcome.ran,
        outcome.timed_out,
        failure,
    )


def notify_settled(hooks: Sequence[Hook], event: SettleEvent) -> None:
    """Call every hook's ``settled``; one that raises is logged and the others still called."""
    for hook in hooks:
        try:
            hook.settled(event)
        except Exception:
            logger.exception("hook %r failed on a settle of job %s from %r", hook, event.job.id, event.queue)
