"""Job-state stores: the contract (StateStore) and the stores, picked by URL with ``state_store_from_url``."""

from __future__ import annotations

from mindtrace.jobs.errors import ConfigurationError
from mindtrace.jobs.state.base import CancelListener, StateCapabilities, StateStore, Watch


def state_store_from_url(url: str) -> StateStore:
    """A state store for ``url``: ``redis://`` / ``rediss://`` gives a Redis store, ``amqp://`` / ``amqps://``
    a RabbitMQ one (either for any broker)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss"):
        from mindtrace.jobs.state.redis import RedisStateStore

        return RedisStateStore.from_url(url)
    if scheme in ("amqp", "amqps"):
        from mindtrace.jobs.state.rabbitmq import RabbitMQStateStore

        return RabbitMQStateStore.from_url(url)
    raise ConfigurationError(
        f"no state store for URL scheme {scheme or url!r}: use redis://, rediss://, amqp:// or amqps://"
    )


__all__ = ["CancelListener", "StateCapabilities", "StateStore", "Watch", "state_store_from_url"]
