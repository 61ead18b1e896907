"""Nox sessions: tests, lint, typecheck, bench, soak."""

from __future__ import annotations

import argparse

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
PYTHONS = ["3.10", "3.11", "3.12"]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite (brokers: see README, 'Running the tests')."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "tests/jobs/", "-v", *session.posargs)


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
