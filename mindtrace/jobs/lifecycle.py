"""A job's life as callers see it: JobStatus, CancelOutcome, Progress, JobInfo, and the StateUpdate stores write.

Every state store keeps one record per job and changes it only by :meth:`JobInfo.apply`, the one merge rule:
a record moves forward (by attempt, then by stage) and never leaves a terminal state, so updates that arrive
out of order or twice (a stream replayed, a crash re-running a settled job) leave the same record. Stores
that cannot run Python at the record (Redis scripts) implement the same rule and the conformance suite
checks that they agree.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final, Literal


class JobStatus(str, enum.Enum):
    """Where a job is in its life.

    - ``QUEUED``: waiting to run (also after being given back unrun).
    - ``SCHEDULED``: waiting for its start time (delayed jobs).
    - ``RUNNING``: a consumer is running it.
    - ``RETRYING``: its last run failed and it waits for its retry delay.
    - ``SUCCEEDED``: ``run`` returned; the output is kept for the retention period.
    - ``FAILED``: its retries are spent and it was dead-lettered (``error`` and ``attempts`` kept).
    - ``CANCELLED``: cancelled before it finished; it never runs (again) and is not retried.
    - ``EXPIRED``: it reached its "do not start after" time unrun and was dropped without running.
    - ``UNKNOWN``: no record: never published here, or its record is past retention. Never shown as QUEUED.
    """

    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    UNKNOWN = "unknown"

    @property
    def terminal(self) -> bool:
        """Whether the job is done (SUCCEEDED, FAILED, CANCELLED or EXPIRED): the record changes no more."""
        return self in TERMINAL_STATUSES


#: Statuses a job does not leave.
TERMINAL_STATUSES: Final = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})

#: What a StateUpdate changes: ``"published"`` starts a new record (QUEUED or SCHEDULED; a job id published
#: again after it finished starts a new life); ``"status"`` moves the status; ``"progress"`` only the progress
#: of a running job; ``"cancel"`` only the cancel request flag; ``"withdrawn"`` forgets a record that is not
#: terminal (a publish that failed, a job handed out by ``receive_message``): the job reads UNKNOWN again.
UpdateKind = Literal["published", "status", "progress", "cancel", "withdrawn"]


class CancelOutcome(str, enum.Enum):
    """What ``cancel()`` did.

    - ``CANCELLED``: the job had not started and never will (its status is CANCELLED).
    - ``CANCELLING``: it is running; the consumer running it was signalled (``wait()`` tells the end).
    - ``ALREADY_FINISHED``: it had finished (succeeded, failed, expired or was cancelled); its record is intact.
    - ``NOT_FOUND``: no job of that id is known on that queue (never published, or past retention).
    """

    CANCELLED = "cancelled"
    CANCELLING = "cancelling"
    ALREADY_FINISHED = "already_finished"
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class Progress:
    """What a running job last reported: a ``fraction`` done (0..1, or None) and a few named ``values``."""

    fraction: float | None = None
    values: dict[str, float | int | str] = field(default_factory=dict)

    def to_json(self) -> str:
        """Compact JSON, as stores keep it."""
        return json.dumps({"fraction": self.fraction, "values": self.values}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Progress:
        """The progress ``to_json`` wrote."""
        data = json.loads(text)
        return cls(data.get("fraction"), dict(data.get("values") or {}))


def _datetime(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc)


@dataclass(frozen=True)
class StateUpdate:
    """One change of a job's record, as the orchestrator and the consumer send it to a state store.

    ``at`` is the time of the change (Unix seconds); ``attempts`` the runs started so far (RUNNING counts
    its own run; a terminal update never lowers the count); ``output`` the JSON text of the validated output
    (SUCCEEDED only); ``schema`` the job's schema name, so a reader can type the output; ``ttl`` how long a
    terminal record is kept (seconds).
    ``worker`` names the consumer that ran it, ``reason`` why it was cancelled. ``kind`` says what the update
    changes (see :data:`UpdateKind`; a cancel request of a running job does not change its status).
    ``not_after`` (published only): the job's "do not start after" time (Unix seconds), for a store whose
    claims record starts (they leave an expired job to its consumer); it is not part of the record.
    ``dedup_key`` and ``dedup_ttl`` (published only): the key this job holds on its queue while it lives (a
    unique job: see ``StateStore.record_unique``), and for how long at most (seconds; None: until it ends).
    """

    job_id: str
    status: JobStatus
    at: float = field(default_factory=time.time)
    attempts: int = 0
    error: str | None = None
    output: str | None = None
    schema: str | None = None
    worker: str | None = None
    progress: Progress | None = None
    reason: str | None = None
    ttl: float | None = None
    kind: UpdateKind = "status"
    not_after: float | None = None
    dedup_key: str | None = None
    dedup_ttl: float | None = None

    def to_fields(self) -> dict[str, str]:
        """The update as flat string fields (a Redis hash, a stream message's body); None fields left out."""
        out = {"id": self.job_id, "status": self.status.value, "at": repr(self.at), "attempts": str(self.attempts)}
        for name in ("error", "output", "schema", "worker", "reason"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.progress is not None:
            out["progress"] = self.progress.to_json()
        if self.ttl is not None:
            out["ttl"] = repr(self.ttl)
        if self.kind != "status":
            out["kind"] = self.kind
        if self.dedup_key is not None:
            out["dedup_key"] = self.dedup_key
        if self.dedup_ttl is not None:
            out["dedup_ttl"] = repr(self.dedup_ttl)
        return out

    @classmethod
    def from_fields(cls, data: dict[str, str]) -> StateUpdate:
        """The update ``to_fields`` wrote (unknown fields ignored, so newer writers stay readable)."""
        progress = data.get("progress")
        ttl = data.get("ttl")
        dedup_ttl = data.get("dedup_ttl")
        return cls(
            job_id=data["id"],
            status=JobStatus(data["status"]),
            at=float(data["at"]),
            attempts=int(data.get("attempts", 0)),
            error=data.get("error"),
            output=data.get("output"),
            schema=data.get("schema"),
            worker=data.get("worker"),
            progress=None if progress is None else Progress.from_json(progress),
            reason=data.get("reason"),
            ttl=None if ttl is None else float(ttl),
            kind=data.get("kind", "status"),  # type: ignore[arg-type]
            dedup_key=data.get("dedup_key"),
            dedup_ttl=None if dedup_ttl is None else float(dedup_ttl),
        )


@dataclass(frozen=True)
class JobInfo:
    """What a state store knows of one job.

    ``output`` is the JSON-decoded output (a dict) of a SUCCEEDED job, or None; ``handle.result()`` types it.
    Times are aware UTC datetimes (None when not reached); ``expires_at`` is when a terminal record is
    forgotten (the job then reads as UNKNOWN). ``cancel_requested``: a cancel reached the job while it ran.
    ``dedup_key``: the key a unique job was published with (``publish(dedup_key=...)``); it holds the key while
    it lives (:meth:`holds_key`), up to ``dedup_until`` when it was published with a ``dedup_ttl``.
    """

    job_id: str
    queue: str
    status: JobStatus = JobStatus.UNKNOWN
    attempts: int = 0
    error: str | None = None
    output: dict[str, Any] | None = None
    schema: str | None = None
    progress: Progress | None = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str | None = None
    reason: str | None = None
    cancel_requested: bool = False
    expires_at: datetime | None = None
    dedup_key: str | None = None
    dedup_until: datetime | None = None

    @property
    def terminal(self) -> bool:
        """Whether the job is done (see :attr:`JobStatus.terminal`)."""
        return self.status.terminal

    def expired(self, now: float | None = None) -> bool:
        """Whether this record is past its retention (it then reads as UNKNOWN)."""
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) >= self.expires_at.timestamp()

    def holds_key(self, now: float | None = None) -> bool:
        """Whether this job holds its ``dedup_key`` at ``now`` (Unix seconds): it has one, it is queued,
        scheduled, running or retrying, and its ``dedup_until`` (if any) has not passed."""
        if self.dedup_key is None or self.status is JobStatus.UNKNOWN or self.status.terminal:
            return False
        return self.dedup_until is None or (time.time() if now is None else now) < self.dedup_until.timestamp()

    def apply(self, update: StateUpdate) -> JobInfo:
        """This record after ``update``, by the merge rule (see the module's docstring): a terminal record
        never changes, except by a new publish of its id; a status update replaces the status (keeping what it
        does not say: enqueue time, schema, the cancel request); a progress update applies to a RUNNING record;
        a cancel update sets ``cancel_requested``; a withdrawal forgets the record.
        """
        if update.kind == "published":
            return JobInfo(
                job_id=self.job_id,
                queue=self.queue,
                status=update.status,
                attempts=update.attempts,
                schema=update.schema,
                enqueued_at=_datetime(update.at),
                dedup_key=update.dedup_key,
                dedup_until=None if update.dedup_ttl is None else _datetime(update.at + update.dedup_ttl),
            )
        if self.status.terminal:
            return self
        if update.kind == "cancel":
            return self._with(cancel_requested=True, reason=update.reason or self.reason)
        if update.kind == "progress":
            return self._with(progress=update.progress) if self.status is JobStatus.RUNNING else self
        if update.kind == "withdrawn":
            return JobInfo(job_id=self.job_id, queue=self.queue)
        at = _datetime(update.at)
        changes: dict[str, Any] = {"status": update.status, "attempts": update.attempts}
        if update.schema:
            changes["schema"] = update.schema
        if update.status.terminal:
            changes["attempts"] = max(self.attempts, update.attempts)
            changes.update(
                error=update.error if update.error is not None else self.error,
                output=None if update.output is None else json.loads(update.output),
                finished_at=at,
                worker=update.worker or self.worker,
                reason=update.reason or self.reason,
                expires_at=None if update.ttl is None else _datetime(update.at + update.ttl),
            )
        elif update.status in (JobStatus.QUEUED, JobStatus.SCHEDULED):
            if self.enqueued_at is None:
                changes["enqueued_at"] = at
        elif update.status is JobStatus.RUNNING:
            changes.update(started_at=at, worker=update.worker, progress=update.progress)
        elif update.status is JobStatus.RETRYING:
            changes["error"] = update.error
        return self._with(**changes)

    def _with(self, **changes: Any) -> JobInfo:
        """A copy with ``changes`` (``dataclasses.replace`` without its per-call field introspection: the merge
        rule runs on every record write, and the values come from the rule itself)."""
        copy = object.__new__(JobInfo)
        copy.__dict__.update(self.__dict__)
        copy.__dict__.update(changes)
        return copy

    @classmethod
    def new(cls, queue: str, update: StateUpdate) -> JobInfo:
        """The record of a job first seen through ``update``."""
        return cls(job_id=update.job_id, queue=queue).apply(update)
