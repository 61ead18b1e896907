"""The Redis key layout of a queue (_Keys), a claim's handle (_Lease), and priority ranks."""

from __future__ import annotations

import dataclasses
import functools

from mindtrace.jobs.constants import DLQ_SUFFIX, MAX_PRIORITY, MIN_PRIORITY

#: Ranks are (MAX_PRIORITY - priority) * _PRIORITY_BAND + sequence, as in lua/lib.lua.
_PRIORITY_BAND = 2**44


@dataclasses.dataclass(frozen=True)
class _Keys:
    """The keys of one queue: ``<prefix>{<queue without .dlq>}[.dlq]:<name>``.

    A queue and its dead-letter queue share the hash tag, so each script touches a single cluster slot.
    """

    meta: str  # hash: options (JSON); exists exactly while the queue does
    sequence: str  # counter: message ids and FIFO order
    ready: str  # sorted set: message id -> rank
    delayed: str  # sorted set: message id -> time (ms) its delay (a delayed publish, a retry) ends
    leases: str  # sorted set: message id -> time (ms) its lease ends
    bodies: str  # hash: message id -> body
    tokens: str  # hash: message id -> token of its current lease
    ranks: str  # hash: message id -> rank to come back to, while claimed or delayed
    deliveries: str  # hash: message id -> times claimed
    wake: str  # list: wake-up tokens for receivers blocked on the queue

    @classmethod
    def of(cls, prefix: str, queue: str) -> _Keys:
        stem = queue[: -len(DLQ_SUFFIX)] if queue.endswith(DLQ_SUFFIX) else queue
        base = f"{prefix}{{{stem}}}{queue[len(stem) :]}:"
        return cls(*(base + field.name for field in dataclasses.fields(cls)))

    def all(self) -> list[str]:
        return [getattr(self, field.name) for field in dataclasses.fields(self)]


_keys_of = functools.lru_cache(maxsize=1024)(_Keys.of)


@dataclasses.dataclass(frozen=True)
class _Lease:
    """A Delivery's handle: the message id in its queue and the token of this claim."""

    message_id: bytes
    token: str


def _priority_of(rank: bytes) -> int:
    # A member written by someone else may carry any score: clamp it into the priority range.
    try:
        band = int(float(rank) // _PRIORITY_BAND)
    except (ValueError, OverflowError):
        return MIN_PRIORITY
    return min(MAX_PRIORITY, max(MIN_PRIORITY, MAX_PRIORITY - band))
