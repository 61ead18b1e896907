"""JobContext: what a running job can see of its own run (id, attempt, deadline, cancel and shutdown flags)."""

from __future__ import annotations

import contextvars
import math
import threading
import time
from dataclasses import dataclass, field

from mindtrace.jobs.errors import ConfigurationError, UsageError
from mindtrace.jobs.lifecycle import Progress

_current: contextvars.ContextVar[JobContext] = contextvars.ContextVar("mindtrace_jobs_context")


@dataclass(eq=False)
class JobContext:
    """One per running job (not per consumer: a consumer with ``concurrency=8`` runs eight), from inside
    ``run`` as ``self.context`` or :func:`current_job`. Safe to read from the worker thread of a sync ``run``.

    - ``job_id``, ``queue``, ``attempt`` (1 for the first run), ``worker`` (who runs it);
    - ``deadline``: Unix time by which the run must end (its time limit), or None;
    - ``cancelled``: a cancel of this job arrived (an async ``run`` is also cancelled at its next ``await``;
      a sync ``run`` should check and return);
    - ``timed_out``: the run went over its time limit (it is being recorded as failed);
    - ``shutting_down``: the consumer is stopping: checkpoint and return (the job is given back uncharged
      when it does not finish in time).

    ``report_progress`` records progress; writes to the store are coalesced (about one a second per job).
    """

    job_id: str
    queue: str
    attempt: int
    worker: str
    deadline: float | None = None
    cancel_reason: str | None = None
    # Plain flags: set once by the consumer on the loop, read from the run's thread (a bool read or write is
    # atomic in CPython); a context is made per job, so it stays cheap to make.
    _cancelled: bool = field(default=False, repr=False)
    _timed_out: bool = field(default=False, repr=False)
    _shutting_down: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _progress: Progress | None = field(default=None, repr=False)
    _progress_dirty: bool = field(default=False, repr=False)

    @property
    def cancelled(self) -> bool:
        """Whether a cancel of this job arrived."""
        return self._cancelled

    @property
    def timed_out(self) -> bool:
        """Whether this run went over its time limit."""
        return self._timed_out

    @property
    def shutting_down(self) -> bool:
        """Whether the consumer running this job is shutting down."""
        return self._shutting_down

    @property
    def should_stop(self) -> bool:
        """Any of ``cancelled``, ``timed_out``, ``shutting_down``: a loop should wind up and return."""
        return self.cancelled or self.timed_out or self.shutting_down

    def remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), or None without one."""
        return None if self.deadline is None else self.deadline - time.time()

    def report_progress(self, fraction: float | None = None, **values: float | int | str) -> None:
        """Record progress: ``fraction`` done (0..1) and a few named ``values`` (loss=0.3, epoch=2).

        Returns at once (from a sync or async ``run``); the latest report is written to the state store
        within about a second, so calling it every step costs nothing.
        """
        if fraction is not None and (
            isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0
        ):
            raise ConfigurationError(f"progress fraction of job {self.job_id!r} must be in 0..1, not {fraction!r}")
        for name, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigurationError(f"progress value {name!r} of job {self.job_id!r} must be finite")
            if not isinstance(value, (int, float, str)):
                raise ConfigurationError(
                    f"progress value {name!r} of job {self.job_id!r} must be a number or a str, "
                    f"not {type(value).__name__}"
                )
        with self._lock:
            self._progress = Progress(None if fraction is None else float(fraction), dict(values))
            self._progress_dirty = True

    def mark_cancelled(self, reason: str | None) -> bool:
        """For the consumer: a cancel of this job arrived (with ``reason``); whether it is the first."""
        with self._lock:
            if self._cancelled:
                return False
            self.cancel_reason = reason
            self._cancelled = True
            return True

    def mark_timed_out(self) -> None:
        """For the consumer: this run went over its time limit."""
        self._timed_out = True

    def mark_shutting_down(self) -> None:
        """For the consumer: the consumer running this job is stopping."""
        self._shutting_down = True

    def take_progress(self) -> Progress | None:
        """For the consumer: the progress reported since the last call, or None."""
        with self._lock:
            if not self._progress_dirty:
                return None
            self._progress_dirty = False
            return self._progress

    @property
    def progress(self) -> Progress | None:
        """The last progress reported by this run."""
        return self._progress


def current_job() -> JobContext:
    """The context of the job running in this task or worker thread; UsageError outside a run."""
    try:
        return _current.get()
    except LookupError:
        raise UsageError("current_job() is only available inside a consumer's run()") from None


def set_current(context: JobContext) -> contextvars.Token[JobContext]:
    """For the consumer: make ``context`` the current job's in this task (and threads copying its context)."""
    return _current.set(context)


def reset_current(token: contextvars.Token[JobContext]) -> None:
    """For the consumer: undo :func:`set_current`."""
    _current.reset(token)
