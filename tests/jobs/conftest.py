"""Fixtures: brokers (env URL -> testcontainers -> local server; fail in CI, skip elsewhere) and the APIs."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from mindtrace.jobs import LocalClient
from mindtrace.jobs.backends.base import Backend
from tests.jobs.support import servers
from tests.jobs.support.api import Api, AsyncApi, SyncApi

#: Backends the conformance suite runs on; narrow with MINDTRACE_JOBS_BACKENDS=memory,redis.
ALL_BACKENDS = ("memory", "redis", "rabbitmq")
BACKENDS = tuple(name for name in os.environ.get("MINDTRACE_JOBS_BACKENDS", ",".join(ALL_BACKENDS)).split(",") if name)
APIS = ("async", "sync")


def pytest_configure(config: pytest.Config) -> None:
    """On aiormq 6 (aio-pika 9, all Python 3.10 installs), tolerate the driver's own socket leak; see below."""
    if int(importlib.metadata.version("aiormq").split(".")[0]) < 7:
        # aiormq 6 never closes the socket of a connection the broker or the network closed (aiormq 7 does):
        # garbage collection closes it later with a ResourceWarning, which filterwarnings=error would pin on
        # whichever test runs then. Only these two unraisable warnings are let through, and only on aiormq 6.
        # (As an ini line for the tests, and in the session's filters for what is collected at the end.)
        for leaked in ("<socket.socket", "<function _SelectorTransport.__del__"):
            message = f"Exception ignored in. {re.escape(leaked)}"
            config.addinivalue_line("filterwarnings", f"ignore:{message}:pytest.PytestUnraisableExceptionWarning")
            warnings.filterwarnings("ignore", message, pytest.PytestUnraisableExceptionWarning)


def _require(url: str | None, what: str) -> str:
    if url is None:
        message = f"no {what} available (set the URL variable, run Docker, or install the server)"
        if servers.IN_CI:
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the Redis the tests use."""
    with servers.redis_url() as url:
        yield _require(url, "Redis server (MINDTRACE_JOBS_REDIS_URL)")


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """URL of the RabbitMQ the tests use."""
    with servers.rabbitmq_url() as url:
        yield _require(url, "RabbitMQ server (MINDTRACE_JOBS_AMQP_URL)")


def _factory(name: str, request: pytest.FixtureRequest) -> Callable[[], Backend]:
    if name == "memory":
        return LocalClient
    if name == "redis":
        from mindtrace.jobs import RedisClient

        url = request.getfixturevalue("redis_url")
        return lambda: RedisClient.from_url(url)
    if name == "rabbitmq":
        from mindtrace.jobs import RabbitMQClient

        url = request.getfixturevalue("amqp_url")
        return lambda: RabbitMQClient.from_url(url)
    raise ValueError(f"unknown backend {name!r}")


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Name of the backend under test."""
    return str(request.param)


@pytest.fixture
def backend_factory(backend_name: str, request: pytest.FixtureRequest) -> Callable[[], Backend]:
    """Makes a fresh, unconnected backend of the kind under test."""
    return _factory(backend_name, request)


@pytest.fixture
def queue_names() -> Iterator[list[str]]:
    """Queue names this test made (see ``queue``); the api fixture deletes them afterwards."""
    yield []


@pytest.fixture
def new_queue(queue_names: list[str]) -> Callable[[str], str]:
    """Makes a queue name no other test or run uses."""

    def make(label: str = "q") -> str:
        name = f"t-{label}-{uuid.uuid4().hex[:12]}"
        queue_names.append(name)
        return name

    return make


@pytest.fixture
def queue(new_queue: Callable[[str], str]) -> str:
    """A queue name of this test's own (not declared yet)."""
    return new_queue("q")


async def _open_api(kind: str, backend: Backend) -> Api:
    return AsyncApi(backend) if kind == "async" else SyncApi(backend)


@contextlib.asynccontextmanager
async def _api_session(kind: str, factory: Callable[[], Backend], queue_names: list[str]) -> AsyncIterator[Api]:
    api = await _open_api(kind, factory())
    try:
        yield api
    finally:
        for name in queue_names:
            with contextlib.suppress(Exception):
                await api.delete_queue(name)
        await api.close()


@pytest.fixture(params=APIS)
async def api(
    request: pytest.FixtureRequest, backend_factory: Callable[[], Backend], queue_names: list[str]
) -> AsyncIterator[Api]:
    """The orchestrator under test, through the async API or the sync facade, on each backend."""
    async with _api_session(str(request.param), backend_factory, queue_names) as opened:
        yield opened


@pytest.fixture
async def async_api(backend_factory: Callable[[], Backend], queue_names: list[str]) -> AsyncIterator[Api]:
    """The async API only, for behaviour that exists only there (task cancellation)."""
    async with _api_session("async", backend_factory, queue_names) as opened:
        yield opened
