"""Nox sessions: tests, conformance (per supported Python), lowest (dependency floors), lint, typecheck, bench, soak."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nox
import nox.project
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

nox.options.sessions = ["lint", "typecheck", "tests"]
#: The supported Pythons (pyproject: requires-python >= 3.10).
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: The conformance suite (every backend, both APIs) and the public API: what each supported Python runs.
CONFORMANCE = [
    "tests/jobs/conformance",
    "tests/jobs/test_public_api.py",
    "tests/jobs/test_worker_lifecycle.py",
    "tests/jobs/test_cli_worker.py",  # signals and shutdown meet each Python's asyncio
    "tests/jobs/test_schedules.py",  # fire times across DST with each Python's zoneinfo and the cron parser's floor
]
#: At the lowest admitted versions: the conformance suite, plus the backends' own tests (driver-specific paths,
#: such as aio-pika 9's) and the blocking facade, the seeds and README's examples.
LOWEST = [
    *CONFORMANCE,
    "tests/jobs/backends",
    "tests/jobs/test_sync_facade.py",
    "tests/jobs/test_seed_examples.py",
    "tests/jobs/test_readme.py",
]
#: What the nox lanes' pytest reports beyond the counts: failures and errors, whole. (Not -ra: on pytest 8 it
#: also prints every expected failure's captured logs, hundreds of thousands of lines that hide a failure.)
REPORT = ["-q", "-p", "no:cacheprovider", "-rfE"]
#: The extras whose dependencies the ``lowest`` session pins to their floors, with the core dependencies.
LOWEST_EXTRAS = ["redis", "rabbitmq", "test"]


def lowest_constraints(path: Path) -> dict[str, str]:
    """Write a pip constraints file pinning each direct dependency to the floor pyproject.toml declares.

    The core dependencies and those of LOWEST_EXTRAS, each ``name==floor`` (its ``>=`` bound), so the floors
    are read from pyproject.toml and cannot drift from it. A dependency without a ``>=`` floor is an error.
    """
    project = nox.project.load_toml("pyproject.toml")["project"]
    lines = list(project["dependencies"])
    for extra in LOWEST_EXTRAS:
        lines += project["optional-dependencies"][extra]
    pins: dict[str, str] = {}
    for line in lines:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == canonicalize_name(project["name"]):
            continue  # an extra of this package: its dependencies are in the list already
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(floors) != 1:
            raise ValueError(f"pyproject.toml: {line!r} needs exactly one '>=' floor for the lowest session")
        pins[name] = floors[0]
    path.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())), encoding="utf-8")
    return pins


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite (brokers: see README, 'Running the tests')."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "tests/jobs/", "-v", *session.posargs)


@nox.session(python=PYTHONS)
def conformance(session: nox.Session) -> None:
    """The conformance suite and the public API on each supported Python, with the latest dependencies.

    The three brokers with their own state stores unless MINDTRACE_JOBS_BACKENDS says otherwise; the
    RabbitMQ-with-Redis-records pairing runs in the main suite and in ``lowest`` (its code is the brokers' and
    the Redis store's, which each Python runs here). Brokers as for the tests.
    """
    session.install("-e", ".[test]")
    env = {} if os.environ.get("MINDTRACE_JOBS_BACKENDS") else {"MINDTRACE_JOBS_BACKENDS": "memory,redis,rabbitmq"}
    session.run("python", "-m", "pytest", *CONFORMANCE, *REPORT, *session.posargs, env=env)


@nox.session(python=PYTHONS[0])
def lowest(session: nox.Session) -> None:
    """The conformance suite and the backends' tests on the oldest Python at the lowest admitted versions.

    Every direct dependency (core, redis, rabbitmq, test extras) is pinned to its pyproject.toml floor.
    """
    constraints = Path(session.create_tmp()) / "lowest.txt"
    pins = lowest_constraints(constraints)
    session.log("floors: " + ", ".join(f"{name}=={version}" for name, version in sorted(pins.items())))
    session.install("-c", str(constraints), "-e", ".[test]")
    session.run("python", "-m", "pytest", *LOWEST, *REPORT, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", "mindtrace", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "mindtrace", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy, strict on the package."""
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks with every peer installed: python -m benchmarks, arguments passed through (-- --n 3000).

    Brokers as for the tests (MINDTRACE_JOBS_REDIS_URL, MINDTRACE_JOBS_AMQP_URL, or the local defaults).
    """
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """The fault suite at full size: nox -s soak -- --jobs 10000 --kills 5 [--fuzz 2000] [pytest args].

    Each scenario prints a summary line (jobs, kills, restarts, cuts, fuzz cases, lost, duplicated).
    """
    parser = argparse.ArgumentParser(prog="nox -s soak --")
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs per scenario")
    parser.add_argument("--kills", type=int, default=5, help="consumer kills (and cuts, restarts) per scenario")
    parser.add_argument("--fuzz", type=int, default=1_000, help="hypothesis examples per fuzz test")
    args, rest = parser.parse_known_args(session.posargs)
    session.install("-e", ".[test]")
    env = {
        "MINDTRACE_JOBS_SOAK_JOBS": str(args.jobs),
        "MINDTRACE_JOBS_SOAK_KILLS": str(args.kills),
        "MINDTRACE_JOBS_FUZZ_EXAMPLES": str(args.fuzz),
    }
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/jobs/faults/",
        "-v",
        "-s",
        "-p",
        "no:cacheprovider",
        "-o",
        "timeout=3600",
        *rest,
        env=env,
    )
