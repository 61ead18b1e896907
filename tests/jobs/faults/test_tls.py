"""TLS: rediss:// and amqps:// to brokers of the test's own with a certificate from a fresh CA, verified.

Each backend gets a server of this module's own: a redis-server listening for TLS only (``--tls-port``) and a
RabbitMQ node with an AMQPS listener, both presenting a certificate for 127.0.0.1 signed by a CA made with the
openssl CLI. Clients trust that CA through ``ssl_ca_certs`` (a query option of rediss:// and amqps:// URLs).
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from mindtrace.jobs import AsyncOrchestrator, BackendError, ConfigurationError, JobsError, RabbitMQClient, from_url
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.faults.stream import RunCounter, publish_until_returned, wait_until_run
from tests.jobs.support import servers
from tests.jobs.support.proxy import TcpProxy, target_of


@dataclass(frozen=True)
class TlsBroker:
    """A broker speaking only TLS (for clients), its URL, and the CA that signed its certificate."""

    url: str
    ca: Path

    @property
    def trusted_url(self) -> str:
        """The URL with the CA bundle as ``ssl_ca_certs``."""
        return f"{self.url}?ssl_ca_certs={quote(str(self.ca), safe='')}"

    def via(self, proxy: TcpProxy) -> str:
        """``trusted_url`` through ``proxy``."""
        return proxy.via(self.trusted_url)


def _need(command: str, available: bool) -> None:
    if not available:
        if servers.IN_CI:
            pytest.fail(f"CI=true: {command} is not installed")
        pytest.skip(f"{command} is not installed")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> servers.TlsFiles:
    """A fresh CA and a server certificate for 127.0.0.1 and localhost."""
    _need("openssl", shutil.which("openssl") is not None)
    return servers.make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def tls_broker(request: pytest.FixtureRequest, tls_files: servers.TlsFiles) -> Iterator[TlsBroker]:
    """A redis-server with TLS only, or a RabbitMQ node with an AMQPS listener; one per module and backend."""
    if request.param == "redis":
        _need("redis-server", shutil.which("redis-server") is not None)
        redis = servers.RedisServer(tls=tls_files).start()
        try:
            yield TlsBroker(redis.url, tls_files.ca)
        finally:
            redis.cleanup()
    else:
        _need("rabbitmq-server", servers.rabbitmq_server_command() is not None)
        node = servers.RabbitMQNode(tls=tls_files).start()
        try:
            yield TlsBroker(node.tls_url, tls_files.ca)
        finally:
            node.cleanup()


async def test_jobs_travel_over_tls_verified_against_the_given_ca(tls_broker: TlsBroker, queue: str) -> None:
    backend = from_url(tls_broker.trusted_url)
    assert backend.describe().split("://")[0] in {"rediss", "amqps"}
    runs: Counter[str] = Counter()
    async with AsyncOrchestrator(backend) as orchestrator:
        schema = image_schema(queue)
        await orchestrator.register(schema)
        jobs = [make_job(schema, i) for i in range(5)]
        await orchestrator.publish_many(queue, jobs)
        consumer = RunCounter(queue, runs)
        consumer.connect(orchestrator)
        assert await asyncio.wait_for(consumer.consume(num_messages=5), 10) == 5
        await orchestrator.delete_queue(queue)
    assert runs == Counter({job.id: 1 for job in jobs})


async def test_a_certificate_from_an_unknown_ca_is_refused_at_once(tls_broker: TlsBroker, queue: str) -> None:
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        async with AsyncOrchestrator(from_url(tls_broker.url)) as orchestrator:  # system CAs only
            await orchestrator.declare_queue(queue)
    assert time.monotonic() - started < 5, "an untrusted certificate must not be retried like a network error"
    chain: list[BaseException] = []
    error: BaseException | None = info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(link, ssl.SSLCertVerificationError) for link in chain), chain
    assert str(target_of(tls_broker.url)[1]) in str(info.value)


async def test_plain_text_against_the_tls_port_is_an_error_not_a_hang(tls_broker: TlsBroker, queue: str) -> None:
    plain = tls_broker.url.replace("rediss://", "redis://").replace("amqps://", "amqp://")
    options = {"operation_timeout": 2.0, **({"connection_retries": 0} if plain.startswith("redis") else {})}
    started = time.monotonic()
    with pytest.raises(JobsError):
        async with AsyncOrchestrator(from_url(plain, **options)) as orchestrator:
            await orchestrator.declare_queue(queue)
    assert time.monotonic() - started < 8


async def test_a_cut_tls_connection_reconnects_over_tls(tls_broker: TlsBroker, queue: str) -> None:
    runs: Counter[str] = Counter()
    failed: set[str] = set()
    with TcpProxy(*target_of(tls_broker.url)) as proxy:
        async with AsyncOrchestrator(from_url(tls_broker.via(proxy))) as orchestrator:
            schema = image_schema(queue)
            await orchestrator.register(schema)
            consumer = RunCounter(queue, runs)
            consumer.connect(orchestrator)
            consuming = asyncio.create_task(consumer.consume(concurrency=2))
            try:
                before = await orchestrator.publish_many(queue, [make_job(schema, i) for i in range(5)])
                await wait_until_run(runs, set(before), 10)
                connected = proxy.accepted
                assert proxy.cut() >= 1
                # A publish racing the cut may raise (the job may or may not be queued); the next ones return.
                after = [await publish_until_returned(orchestrator, schema, 100 * i, failed) for i in range(1, 6)]
                await wait_until_run(runs, set(after), 15)
                assert not consuming.done()
            finally:
                consumer.stop()
                await asyncio.wait_for(consuming, 10)
            await orchestrator.delete_queue(queue)
    assert proxy.accepted > connected  # new connections, through the proxy, and TLS again (nothing else works)
    assert set(before) | set(after) <= set(runs) <= set(before) | set(after) | failed


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("amqp://h/?ssl_ca_certs=%2Fca.pem", {}),  # a CA bundle on a plain-text URL
        ("amqps://h/?ssl_ca_certs=%2Fnowhere%2Fca.pem", {}),  # a CA bundle that cannot be read
        ("amqps://h/", {"ssl_ca_certs": "CA", "ssl_context": ssl.create_default_context()}),  # both at once
    ],
)
def test_bad_amqps_ca_options_are_configuration_errors(
    url: str, options: dict[str, object], tls_files: servers.TlsFiles
) -> None:
    options = {key: str(tls_files.ca) if value == "CA" else value for key, value in options.items()}
    with pytest.raises(ConfigurationError):
        RabbitMQClient.from_url(url, **options)


def test_an_amqps_ca_bundle_implies_tls(tls_files: servers.TlsFiles) -> None:
    client = RabbitMQClient(host="h", port=5671, ssl_ca_certs=str(tls_files.ca))
    assert client.ssl and client.ssl_ca_certs == str(tls_files.ca)
    assert client.describe() == "amqps://h:5671/"
