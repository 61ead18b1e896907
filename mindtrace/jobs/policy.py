"""The consumer's decisions, free of I/O: RetryPolicy, and the Outcome of a delivery before and after its run."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from mindtrace.jobs.constants import MAX_RETRIES, MAX_RETRY_DELAY, RETRY_BACKOFF, RETRY_DELAY, UNDECODABLE_SCHEMA
from mindtrace.jobs.errors import ConfigurationError, DecodeError
from mindtrace.jobs.lifecycle import JobStatus
from mindtrace.jobs.types import Job
from mindtrace.jobs.wire import undecodable_job

#: ``job.error`` of a job whose consumer was lost while running it, on a broker that only flags redeliveries.
REDELIVERED_ERROR = "redelivered: the consumer running it died, lost its connection or gave it back"


@dataclass(frozen=True)
class RetryPolicy:
    """How a consumer retries a job whose ``run`` raised, validated once.

    A failed job is retried up to ``max_retries`` times, the n-th retry waiting
    ``retry_delay * retry_backoff ** (n - 1)`` seconds, at most ``max_retry_delay``; then it is dead-lettered.
    The same budget bounds lost runs: a job delivered ``max_retries + 1`` times without being settled (its run
    killed or froze its consumer) is dead-lettered too. ConfigurationError, naming the option, when a value
    is out of range.
    """

    max_retries: int = MAX_RETRIES
    retry_delay: float = RETRY_DELAY
    retry_backoff: float = RETRY_BACKOFF
    max_retry_delay: float = MAX_RETRY_DELAY

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigurationError(f"max_retries must be an int >= 0, not {self.max_retries!r}")
        for name, lowest in (("retry_delay", 0.0), ("max_retry_delay", 0.0), ("retry_backoff", 1.0)):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < lowest
            ):
                raise ConfigurationError(f"{name} must be a finite number >= {lowest:g}, not {value!r}")

    @classmethod
    def of(
        cls,
        policy: RetryPolicy | None = None,
        *,
        max_retries: int | None = None,
        retry_delay: float | None = None,
        retry_backoff: float | None = None,
        max_retry_delay: float | None = None,
    ) -> RetryPolicy:
        """``policy`` (default: the defaults) with the options given here replacing its own."""
        base = cls() if policy is None else policy
        if not isinstance(base, RetryPolicy):
            raise ConfigurationError(f"retry_policy must be a RetryPolicy, not {type(base).__name__}")
        given: dict[str, Any] = {
            "max_retries": max_retries,
            "retry_delay": retry_delay,
            "retry_backoff": retry_backoff,
            "max_retry_delay": max_retry_delay,
        }
        changes = {name: value for name, value in given.items() if value is not None}
        return replace(base, **changes) if changes else base

    def delay(self, attempts: int) -> float:
        """Seconds to wait before the retry that follows the ``attempts``-th failed run (``attempts >= 1``)."""
        try:
            return min(self.retry_delay * self.retry_backoff ** (attempts - 1), self.max_retry_delay)
        except OverflowError:
            return self.max_retry_delay


class Action(enum.Enum):
    """What to do with a claimed message: run it, or settle it with one backend verb."""

    RUN = "run"
    ACK = "ack"
    RELEASE = "release"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


class Outcome(NamedTuple):
    """A decision about one claimed message (immutable): an :class:`Action` and the job to settle it with.

    ``job`` carries the updated fields (``attempts``, ``error``) the settle verb writes back; the job handed
    to the decision is never modified. ``delay`` (seconds) and ``resumes`` (see ``OutgoingMessage``) apply to
    RETRY; ``reason`` says why, for the log (and is the cancel reason of a CANCELLED job). For ACK, ``status``
    is the terminal status recorded (None: SUCCEEDED; CANCELLED, EXPIRED; UNKNOWN: the record is forgotten,
    the job handed out) and ``output`` the JSON text of the validated output. ``record`` False settles the
    message without writing the job's record, which already says how it ended (a duplicate of a job that
    succeeded). ``ran``: a run of the job preceded this decision; ``timed_out``: that run went over its time
    limit (both for hooks and logs).
    """

    action: Action
    job: Job
    delay: float = 0.0
    resumes: bool = False
    reason: str = ""
    status: JobStatus | None = None
    output: str | None = None
    record: bool = True
    ran: bool = False
    timed_out: bool = False

    @property
    def becomes(self) -> JobStatus:
        """The status a settle of this outcome gives the job: ACK its ``status`` (SUCCEEDED when None),
        RETRY RETRYING (QUEUED for a lost run handed back), DEAD_LETTER FAILED, RELEASE QUEUED (RUN is no settle)."""
        if self.action is Action.ACK:
            return self.status or JobStatus.SUCCEEDED
        if self.action is Action.RETRY:
            return JobStatus.QUEUED if self.resumes else JobStatus.RETRYING
        if self.action is Action.DEAD_LETTER:
            return JobStatus.FAILED
        return JobStatus.QUEUED

    @property
    def counts(self) -> bool:
        """Whether this settles the job for ``consume(num_messages=N)``: a run ended (ack, retry or
        dead-letter after it) or a rule dead-lettered it. Handing the job back to its queue unrun (a release,
        a recorded redelivery) does not count."""
        if self.action is Action.RETRY:
            return not self.resumes
        return self.action in (Action.ACK, Action.DEAD_LETTER)


def _charged(job: Job, attempts: int, error: str) -> Job:
    # The text may hold lone surrogates (an undecodable file name): keep them as escapes JSON can carry.
    error = error.encode("utf-8", "backslashreplace").decode("utf-8")
    return job.model_copy(update={"attempts": attempts, "error": error})


def undecodable(error: DecodeError) -> Outcome:
    """A message that is not a job goes to the dead-letter queue at once, its raw bytes kept."""
    return Outcome(Action.DEAD_LETTER, undecodable_job(error), reason=f"undecodable message: {error.reason}")


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1: "1 time", "3 times"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def check_time_limit(value: object, option: str) -> float | None:
    """``value`` as a time limit in seconds (None: no limit); ConfigurationError naming ``option`` unless it is
    a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{option} must be None or a finite number of seconds > 0, not {value!r}")
    return float(value)


def expired(job: Job, now: float | None = None) -> bool:
    """Whether ``job`` is past its "do not start after" time (``expires_at``) at ``now`` (Unix seconds)."""
    return job.expires_at is not None and (time.time() if now is None else now) >= job.expires_at.timestamp()


def cancelled(job: Job, reason: str | None) -> Outcome:
    """A job whose cancel arrived before or during its run: acked as CANCELLED (never retried or
    dead-lettered, no result kept), whatever its run did."""
    return Outcome(Action.ACK, job, reason=reason or "", status=JobStatus.CANCELLED)


def duplicate(job: Job) -> Outcome:
    """A redelivered job whose record already says SUCCEEDED (the ack of its run was lost): acked unrun,
    its record left as it is."""
    return Outcome(Action.ACK, job, reason="already succeeded: a redelivery of a run whose ack was lost", record=False)


def before_run(
    job: Job, delivery_count: int, policy: RetryPolicy, *, counted_deliveries: bool, now: float | None = None
) -> Outcome:
    """RUN ``job``, delivered ``delivery_count`` times, or settle it first.

    A job past its ``expires_at`` (at ``now``, Unix seconds; default: the clock) is acked as EXPIRED, unrun.
    On a broker that only flags redeliveries (``counted_deliveries`` False) a redelivered job's lost run is
    recorded on the job (``attempts + 1``) and the job handed back ahead of its priority (RETRY, resumes),
    or dead-lettered when that is over the budget. Where deliveries are counted, failed runs plus runs
    that never settled over ``max_retries`` dead-letter it (a poison job: its runs kill or stall the
    consumer).
    """
    if job.expires_at is not None and expired(job, now):
        return Outcome(
            Action.ACK, job, reason=f"expired at {job.expires_at.isoformat()}, not started", status=JobStatus.EXPIRED
        )
    if delivery_count > 1 and not counted_deliveries:
        recorded = _charged(job, job.attempts + 1, REDELIVERED_ERROR)
        if recorded.attempts > policy.max_retries:
            return Outcome(Action.DEAD_LETTER, recorded, reason=plural(recorded.attempts, "lost run"))
        return Outcome(Action.RETRY, recorded, resumes=True, reason=f"lost run {recorded.attempts} recorded")
    if job.attempts + delivery_count - 1 > policy.max_retries:
        error = (
            f"delivered {plural(delivery_count, 'time')} without being settled: "
            "the consumer died or lost its lease while running it"
        )
        return Outcome(Action.DEAD_LETTER, _charged(job, job.attempts + delivery_count - 1, error), reason=error)
    return Outcome(Action.RUN, job)


def after_run(job: Job, error: Exception | None, policy: RetryPolicy) -> Outcome:
    """ACK a run that returned; retry one that raised after its backoff delay, or dead-letter it when the
    retries are spent."""
    if error is None:
        return Outcome(Action.ACK, job, ran=True)
    attempts = job.attempts + 1
    failed = _charged(job, attempts, f"{type(error).__name__}: {error}")
    if attempts <= policy.max_retries:
        return Outcome(Action.RETRY, failed, delay=policy.delay(attempts), reason=failed.error or "", ran=True)
    return Outcome(
        Action.DEAD_LETTER,
        failed,
        reason=f"failed {plural(attempts, 'time')}, no retry left: {failed.error}",
        ran=True,
    )


def retry_refused(outcome: Outcome, error: Exception) -> Outcome:
    """A retry the backend refused before settling (its recorded error took it over the size limit): the
    dead-letter queue takes it, whatever its size."""
    job = outcome.job.model_copy(update={"error": f"{outcome.job.error} (not retried: {error})"})
    return Outcome(
        Action.DEAD_LETTER, job, reason=f"not retried: {error}", ran=outcome.ran, timed_out=outcome.timed_out
    )


def release(job: Job) -> Outcome:
    """Give the message back to its queue unchanged and uncharged (a run cut short, a consumer stopping)."""
    return Outcome(Action.RELEASE, job)


def requeued(job: Job) -> Job | None:
    """``job`` as ``requeue_dead_letters`` sends it back (attempts and error reset), or None when it stays
    on the dead-letter queue (the stand-in of an undecodable message, which would only come back)."""
    if job.payload.name == UNDECODABLE_SCHEMA:
        return None
    return job.model_copy(update={"attempts": 0, "error": None})
