"""Backends by URL scheme: ``from_url`` picks the class and imports its driver only when asked for."""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from mindtrace.jobs.backends.base import Backend, Delivery, OutgoingMessage, QueueOptions, Receiver
from mindtrace.jobs.errors import ConfigurationError, MissingDependencyError

# scheme -> (module, class name, extra to install, driver package)
_BACKENDS: dict[str, tuple[str, str, str, str]] = {
    "memory": ("mindtrace.jobs.backends.local", "LocalClient", "", ""),
    "redis": ("mindtrace.jobs.backends.redis", "RedisClient", "redis", "redis"),
    "rediss": ("mindtrace.jobs.backends.redis", "RedisClient", "redis", "redis"),
    "amqp": ("mindtrace.jobs.backends.rabbitmq", "RabbitMQClient", "rabbitmq", "aio-pika"),
    "amqps": ("mindtrace.jobs.backends.rabbitmq", "RabbitMQClient", "rabbitmq", "aio-pika"),
}

_CLASSES = {cls: (module, extra, package) for module, cls, extra, package in _BACKENDS.values()}


def load_backend_class(name: str) -> type[Backend]:
    """Import and return the backend class ``name`` (e.g. ``"RedisClient"``), naming the extra if missing."""
    module_name, extra, package = _CLASSES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if package and missing.split(".")[0] in {package.replace("-", "_"), "redis", "aio_pika", "aiormq"}:
            raise MissingDependencyError(name, extra, package) from exc
        raise
    cls: type[Backend] = getattr(module, name)
    return cls


def from_url(url: str, **kwargs: Any) -> Backend:
    """A backend for ``url``: ``memory://``, ``redis://``, ``rediss://``, ``amqp://`` or ``amqps://``.

    Keyword arguments go to the backend's constructor. An unknown scheme is a ConfigurationError; a missing
    driver is a MissingDependencyError naming the extra to install.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _BACKENDS:
        raise ConfigurationError(
            f"unknown backend URL scheme {scheme or '(none)'!r}; known: {', '.join(sorted(_BACKENDS))}"
        )
    cls = load_backend_class(_BACKENDS[scheme][1])
    return cls.from_url(url, **kwargs)


__all__ = [
    "Backend",
    "Delivery",
    "OutgoingMessage",
    "QueueOptions",
    "Receiver",
    "from_url",
    "load_backend_class",
]
