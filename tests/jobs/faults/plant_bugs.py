"""Plant each bug the fault suite guards against, in a copy of the repo, and show the suite goes red.

Run: ``python -m tests.jobs.faults.plant_bugs`` (brokers as for the tests: MINDTRACE_JOBS_REDIS_URL and
MINDTRACE_JOBS_AMQP_URL). Each plant is a one-spot source change applied to a scratch copy of the
repository; the guarding tests run against that copy and must fail. The working tree is never touched.
Exit status 0 when every plant was caught by a guard's own assertion (not by a leak warning
noticed in passing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Plant:
    """A bug: replace ``old`` by ``new`` in ``path``; ``tests`` are the pytest node ids that must go red."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


PLANTS = (
    Plant(
        "ack before run",
        "mindtrace/jobs/consumer.py",
        "                    result = await self.run(job)\n",
        "                    await self.orchestrator.backend.ack(delivery)  # PLANTED\n"
        "                    result = await self.run(job)\n",
        (
            "tests/jobs/faults/test_consumer_kills.py",
            "tests/jobs/conformance/test_consumer.py::test_failing_job_is_retried_then_dead_lettered_with_its_error",
        ),
    ),
    Plant(
        "no lease renewal",
        "mindtrace/jobs/consumer.py",
        "                await backend.extend(delivery, lease)\n",
        "                pass  # PLANTED: no renewal\n",
        (
            "tests/jobs/faults/test_frozen_consumer.py::test_a_slow_job_keeps_its_lease_while_its_consumer_lives",
            "tests/jobs/backends/test_redis.py::test_a_long_job_keeps_its_lease_and_runs_once",
        ),
    ),
    Plant(
        "no token check on ack",
        "mindtrace/jobs/backends/redis/lua/ack.lua",
        "if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then",
        "if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then -- PLANTED",
        (
            "tests/jobs/faults/test_frozen_consumer.py::test_late_ack_of_a_frozen_consumer_does_not_remove_the_job",
            "tests/jobs/backends/test_redis.py::test_a_frozen_holder_cannot_settle_after_its_lease_went_to_another",
        ),
    ),
    Plant(
        "no attempt counting",
        "mindtrace/jobs/policy.py",
        "    attempts = job.attempts + 1\n",
        "    attempts = job.attempts  # PLANTED: attempts not counted\n",
        (
            "tests/jobs/conformance/test_consumer.py::test_failing_job_is_retried_then_dead_lettered_with_its_error",
            "tests/jobs/faults/test_poison_job.py",
        ),
    ),
    Plant(
        "no redelivery counting",
        "mindtrace/jobs/policy.py",
        "    if delivery_count > 1 and not counted_deliveries:\n",
        "    if False:  # PLANTED: redeliveries not counted\n",
        ("tests/jobs/faults/test_poison_job.py",),
    ),
)


def _copy_repo(target: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".nox", ".venv", "__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache")
    shutil.copytree(ROOT, target, ignore=ignore)


#: Failure texts that say a test went red because of a leak noticed in passing, not because of the bug.
INCIDENTAL = ("ResourceWarning", "PytestUnraisableExceptionWarning", "unclosed")


def run_plant(plant: Plant, scratch: Path, timeout: float) -> tuple[str, str]:
    """Apply ``plant`` to a fresh copy under ``scratch``, run its tests; (verdict, last line of pytest).

    The verdict is "caught" when a guard test failed on an assertion of its own, "incidental" when every
    failure is a leak warning (the bug went unnoticed by the guard), "missed" when all passed.
    """
    copy = scratch / plant.name.replace(" ", "_")
    _copy_repo(copy)
    source = copy / plant.path
    text = source.read_text()
    if text.count(plant.old) != 1:
        raise SystemExit(f"plant {plant.name!r}: the spot to change is not found once in {plant.path}")
    source.write_text(text.replace(plant.old, plant.new))
    env = {**os.environ, "PYTHONPATH": str(copy), "COLUMNS": "400"}  # summary lines keep their messages
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *plant.tests],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    failed = [line.removeprefix("FAILED ") for line in lines if line.startswith("FAILED ")]
    summary = lines[-1] if lines else result.stderr.strip()[-200:]
    own = [line for line in failed if not any(word in line for word in INCIDENTAL)]
    if result.returncode == 0:
        verdict = "missed"
    elif own or not failed:  # not failed: an error outside the tests (collection), reported as is
        verdict = "caught"
    else:
        verdict = "incidental"
    shown = (own or failed or ["-"])[0][:240]
    return verdict, f"{summary}; first failure: {shown}"


def main() -> int:
    """Run every plant and print one line each; non-zero exit if any plant went unnoticed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the plant with this name")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    missed = 0
    with tempfile.TemporaryDirectory(prefix="mtj-plants-") as scratch:
        for plant in PLANTS:
            if args.only and plant.name != args.only:
                continue
            start = time.monotonic()
            verdict, last = run_plant(plant, Path(scratch), args.timeout)
            missed += verdict != "caught"
            shown = {"caught": "RED (caught)", "incidental": "RED (by a leak!)", "missed": "GREEN (missed!)"}[verdict]
            print(f"{plant.name:<24} {shown:<16} {time.monotonic() - start:6.1f}s  {last}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
