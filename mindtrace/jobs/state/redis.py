"""RedisStateStore: job records in Redis hashes under each queue's hash tag, woken by pub/sub (being written)."""

from __future__ import annotations

from typing import Any

from mindtrace.jobs.state.base import StateStore


class RedisStateStore(StateStore):
    """Job records in Redis (being written: the Redis state work replaces this module)."""

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisStateStore:
        """A Redis store for ``url``."""
        raise NotImplementedError("RedisStateStore is being written")
