"""The endpoint module every broker backend shares: describe(), URL splitting, and error translation by table."""

from __future__ import annotations

import pytest

from mindtrace.jobs.backends._endpoint import Endpoint, ErrorTable, failed, map_errors, split_url, unavailable
from mindtrace.jobs.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    JobsError,
    QueueNotFoundError,
)

ENDPOINT = Endpoint("amqp", "::1", 5672, "worker", "my/vhost", tls=True)


class _DriverError(Exception):
    pass


class _DriverConnectionError(_DriverError):
    pass


def _declines(error: BaseException, endpoint: Endpoint) -> JobsError | None:
    return None


TABLE: ErrorTable = (
    (_DriverConnectionError, _declines),  # a row may decline: the next matching row is tried
    (_DriverConnectionError, unavailable),
    (_DriverError, failed),
)


@pytest.mark.parametrize(
    ("endpoint", "described"),
    [
        (ENDPOINT, "amqps://[::1]:5672/my%2Fvhost"),
        (Endpoint("amqp", "h", 5672, "guest", "/"), "amqp://h:5672/"),
        (Endpoint("redis", "cache", 6380, "ops", "3"), "redis://cache:6380/3"),
    ],
)
def test_describe_shows_where_and_never_who(endpoint: Endpoint, described: str) -> None:
    assert endpoint.describe() == described
    assert "worker" not in described and "ops" not in described


def test_errors_are_translated_by_the_first_row_that_does_not_decline_and_chain_the_driver_error() -> None:
    errors = map_errors(TABLE, ENDPOINT)
    with pytest.raises(BackendUnavailableError) as info, errors:
        raise _DriverConnectionError("refused")
    assert isinstance(info.value.__cause__, _DriverConnectionError)
    assert (info.value.host, info.value.port, info.value.backend) == ("::1", 5672, ENDPOINT.describe())
    assert "cannot reach amqps://[::1]:5672/my%2Fvhost: _DriverConnectionError: refused" in str(info.value)
    with pytest.raises(BackendError) as other, errors:
        raise _DriverError("no")
    assert type(other.value) is BackendError and isinstance(other.value.__cause__, _DriverError)


def test_our_errors_and_errors_no_row_names_pass_through_unchanged() -> None:
    errors = map_errors(TABLE, ENDPOINT)
    ours = QueueNotFoundError("q")
    with pytest.raises(QueueNotFoundError) as info, errors:
        raise ours
    assert info.value is ours
    with pytest.raises(KeyError), errors:
        raise KeyError("a bug of ours is never relabelled")
    with errors:
        pass


@pytest.mark.parametrize(
    "url",
    ["http://u:s3cret@h/", "amqp://u:s3cret@h:port/", "amqp://u:s3cret@h/?colour=red", "amqp://u:s3cret@h/?ca=x"],
)
def test_split_url_refuses_bad_urls_without_repeating_them(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        split_url(url, kind="AMQP", schemes=("amqp", "amqps"), options={"heartbeat": (int, "an integer")})
    assert "s3cret" not in str(info.value)


def test_split_url_decodes_the_parts_and_keeps_tls_options_to_the_tls_scheme() -> None:
    options = {"heartbeat": (int, "an integer")}
    parts = split_url(
        "amqps://u%40x:p%3Aw@h:1/v%2F1?heartbeat=5&ca=/c.pem",
        kind="AMQP",
        schemes=("amqp", "amqps"),
        options=options,
        tls_options=("ca",),
    )
    assert (parts.username, parts.password, parts.host, parts.port, parts.path) == ("u@x", "p:w", "h", 1, "v/1")
    assert parts.tls and parts.options == {"heartbeat": 5, "ca": "/c.pem"}
    assert "p:w" not in repr(parts)
    with pytest.raises(ConfigurationError, match="TLS option"):
        split_url("amqp://h/?ca=/c.pem", kind="AMQP", schemes=("amqp", "amqps"), options=options, tls_options=("ca",))
    with pytest.raises(ConfigurationError, match="must be an integer"):
        split_url("amqp://h/?heartbeat=soon", kind="AMQP", schemes=("amqp", "amqps"), options=options)
