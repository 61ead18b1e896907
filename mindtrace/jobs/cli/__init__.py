"""The ``mindtrace-jobs`` command (also ``python -m mindtrace.jobs``): ``worker`` and the operator commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mindtrace.jobs.cli.exit_codes import EXIT_CONFIG

#: The modules adding a subcommand each: a ``register(subparsers)`` that sets ``func`` (args -> exit code).
_COMMANDS = ("mindtrace.jobs.cli.worker", "mindtrace.jobs.cli.ops")


def build_parser() -> argparse.ArgumentParser:
    """The command line parser with every subcommand."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="mindtrace-jobs", description="Run mindtrace-jobs workers and inspect their queues."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand; its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_usage(sys.stderr)
        return EXIT_CONFIG
    return func(args)
