"""Unique jobs: the checks of ``publish``'s ``dedup_key`` and ``dedup_ttl``, and the key they make a job hold."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mindtrace.jobs.clock import seconds_of
from mindtrace.jobs.constants import MAX_DEDUP_KEY_LENGTH
from mindtrace.jobs.errors import JobValidationError


@dataclass(frozen=True)
class Unique:
    """The key a unique job holds on its queue while it is queued, scheduled, running or retrying, and for how
    long at most (``ttl`` seconds; None: until it ends). A publish of the key meanwhile queues nothing."""

    key: str
    ttl: float | None = None


def unique_of(dedup_key: object, dedup_ttl: object) -> Unique | None:
    """The :class:`Unique` of ``publish(dedup_key=..., dedup_ttl=...)``, or None without a key.

    ``dedup_key``: a non-empty str of at most ``MAX_DEDUP_KEY_LENGTH`` characters; ``dedup_ttl``: seconds (a
    finite number > 0) or a positive timedelta, only with a key. JobValidationError naming the field otherwise.
    """
    if dedup_key is None:
        if dedup_ttl is not None:
            raise JobValidationError(
                "dedup_ttl needs a dedup_key: a TTL bounds how long a key is held", field="dedup_ttl"
            )
        return None
    if not isinstance(dedup_key, str):
        raise JobValidationError(f"dedup_key must be a str, not {type(dedup_key).__name__}", field="dedup_key")
    if not dedup_key:
        raise JobValidationError("dedup_key is empty", field="dedup_key")
    if len(dedup_key) > MAX_DEDUP_KEY_LENGTH:
        raise JobValidationError(
            f"dedup_key {dedup_key[:40]!r}... is {len(dedup_key)} characters long, over the limit of "
            f"{MAX_DEDUP_KEY_LENGTH}",
            field="dedup_key",
        )
    if dedup_ttl is None:
        return Unique(dedup_key)
    seconds = seconds_of(dedup_ttl, "dedup_ttl")
    if not (math.isfinite(seconds) and seconds > 0):
        raise JobValidationError(
            f"dedup_ttl must be a finite number of seconds > 0 (None: until the job ends), not {dedup_ttl!r}",
            field="dedup_ttl",
        )
    return Unique(dedup_key, seconds)
