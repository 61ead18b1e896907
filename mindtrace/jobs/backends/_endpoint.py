"""Where a backend meets its broker: the Endpoint (URL parts, TLS options, ``describe()``) and the error map.

Both broker backends split their URL, load a CA bundle, describe themselves and translate driver exceptions
the same way, so each of those is written once here. A backend's boundary is a table of driver exception
classes and the translator each gets (most specific first), applied by one :func:`map_errors` context manager:
a translator may decline (return None) and leave the exception to the next row, which is also how an untyped
driver error is recognised by a predicate. The password is never part of an Endpoint, so everything built
from one (``describe()``, error messages, log lines) is free of it.
"""

from __future__ import annotations

import dataclasses
import ssl as _ssl
from collections.abc import Callable, Collection, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from mindtrace.jobs.errors import (
    BackendError,
    BackendRefusedError,
    BackendUnavailableError,
    ConfigurationError,
    JobsError,
)


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where a backend's broker is, without the password: any part of it may go into a message or a log line.

    ``scheme`` is the plain scheme (``redis``, ``amqp``); with ``tls`` the scheme shown gains an ``s``.
    ``path`` is the decoded URL path: the Redis database number, or the RabbitMQ vhost (``/`` is the default
    vhost, shown as an empty path).
    """

    scheme: str
    host: str
    port: int
    username: str | None = None
    path: str = ""
    tls: bool = False

    def describe(self) -> str:
        """``scheme://host:port/path``, the path percent-encoded; never a user name or password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = "" if self.path == "/" else quote(self.path, safe="")
        return f"{self.scheme}{'s' if self.tls else ''}://{host}:{self.port}/{path}"

    def unavailable(self, message: str) -> BackendUnavailableError:
        """A BackendUnavailableError for this broker (``message`` should say what was tried)."""
        return BackendUnavailableError(message, host=self.host, port=self.port, backend=self.describe())

    def refused(self, message: str, *, refused: str, reason: str) -> BackendRefusedError:
        """A BackendRefusedError for this broker: ``refused`` names what, ``reason`` is the broker's words."""
        return BackendRefusedError(message, refused=refused, reason=reason, backend=self.describe())

    def failed(self, message: str) -> BackendError:
        """A BackendError for this broker."""
        return BackendError(message, backend=self.describe())


# -- URLs and TLS options ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class URLParts:
    """A broker URL split into its parts, decoded; the password is left out of the repr."""

    scheme: str
    host: str | None
    port: int | None
    username: str | None
    password: str | None = dataclasses.field(repr=False)
    path: str
    options: dict[str, Any]
    fragment: bool
    #: Whether the scheme is the TLS one.
    tls: bool


#: A query option's converter and how its values are described in errors (``"a number"``).
Option = tuple[Callable[[str], Any], str]


def split_url(
    url: str,
    *,
    kind: str,
    schemes: tuple[str, str],
    options: Mapping[str, Option],
    tls_options: Collection[str] = (),
) -> URLParts:
    """Split ``url`` (one of ``schemes``: the plain one, then the TLS one) into its parts, checking its query.

    ``options`` are the query options any URL takes, ``tls_options`` those only the TLS scheme takes; each is
    converted as it says. ConfigurationError for another scheme, an invalid port, an unknown option, a TLS
    option without TLS or a value that does not convert; ``kind`` ("Redis", "AMQP") names the URL in them.
    Errors never repeat the URL, which may hold a password.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    where = f"{scheme or '(none)'}://{parts.hostname or ''}"
    if scheme not in schemes:
        raise ConfigurationError(f"not a {kind} URL ({schemes[0]}:// or {schemes[1]}://): {where}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigurationError(f"invalid port in {kind} URL {where}") from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - set(options) - set(tls_options))
    if unknown:
        known = ", ".join((*options, *tls_options))
        raise ConfigurationError(
            f"unknown option(s) {', '.join(unknown)} in {kind} URL {where}; known: {known} "
            "(pass other options as keyword arguments)"
        )
    needs_tls = sorted(set(query) & set(tls_options))
    if needs_tls and scheme != schemes[1]:
        raise ConfigurationError(f"TLS option(s) {', '.join(needs_tls)} need a {schemes[1]}:// URL, not {where}")
    converted: dict[str, Any] = {}
    for name, value in query.items():
        convert, description = options.get(name) or (str, "a string")
        try:
            converted[name] = convert(value)
        except ValueError:
            raise ConfigurationError(f"option {name} in {kind} URL {where} must be {description}") from None
    return URLParts(
        scheme=scheme,
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        path=unquote(parts.path[1:]),
        options=converted,
        fragment=bool(parts.fragment),
        tls=scheme == schemes[1],
    )


def ca_bundle_context(ssl_ca_certs: str) -> _ssl.SSLContext:
    """A TLS context that trusts the CA bundle file ``ssl_ca_certs``; ConfigurationError if it does not load.

    A missing or broken bundle is a configuration mistake, not an unreachable server.
    """
    try:
        return _ssl.create_default_context(cafile=ssl_ca_certs)
    except (OSError, _ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the CA bundle ssl_ca_certs={ssl_ca_certs!r}: {exc}") from exc


# -- driver errors -------------------------------------------------------------------------------------

#: Turns a driver exception into ours for an endpoint, or declines (None): the next row is then tried.
Translate = Callable[[BaseException, Endpoint], JobsError | None]
#: Rows of (driver exception class or classes, translator), most specific first.
ErrorTable = Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], Translate]]


def unavailable(error: BaseException, endpoint: Endpoint) -> BackendUnavailableError:
    """Translator: the broker cannot be reached (the driver's words kept)."""
    return endpoint.unavailable(f"cannot reach {endpoint.describe()}: {type(error).__name__}: {error}")


def failed(error: BaseException, endpoint: Endpoint) -> BackendError:
    """Translator: the broker failed the operation (the driver's words kept)."""
    return endpoint.failed(f"{endpoint.describe()} failed: {type(error).__name__}: {error}")


class ErrorMap:
    """The context manager :func:`map_errors` returns; stateless, so one instance serves every call."""

    __slots__ = ("endpoint", "table")

    def __init__(self, table: ErrorTable, endpoint: Endpoint) -> None:
        self.table = table
        self.endpoint = endpoint

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if error is None or isinstance(error, JobsError):
            return
        for classes, translate in self.table:
            if isinstance(error, classes):
                translated = translate(error, self.endpoint)
                if translated is not None:
                    raise translated from error


def map_errors(table: ErrorTable, endpoint: Endpoint) -> ErrorMap:
    """A context manager that raises the first translation ``table`` gives of an exception, chaining it.

    Rows are tried in order (most specific class first); a row matches an instance of its class(es) and its
    translator may decline. JobsError passes through unchanged, and so does anything no row translates (a bug
    of ours is never relabelled). The translation is raised ``from`` the driver's exception.
    """
    return ErrorMap(table, endpoint)
