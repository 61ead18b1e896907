"""Fault-suite fixtures: a broker URL per backend, consumer processes, and scenario sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

#: Scenario sizes: the quick profile by default; `nox -s soak -- --jobs N --kills K` raises them.
SOAK_JOBS = int(os.environ.get("MINDTRACE_JOBS_SOAK_JOBS", "600"))
SOAK_KILLS = int(os.environ.get("MINDTRACE_JOBS_SOAK_KILLS", "5"))
#: Hypothesis examples per fuzz test (the soak raises it).
FUZZ_EXAMPLES = int(os.environ.get("MINDTRACE_JOBS_FUZZ_EXAMPLES", "60"))

#: Redis visibility timeout used by fault scenarios (seconds).
TEST_VISIBILITY = 1.0


@pytest.fixture(params=["redis", "rabbitmq"])
def fault_url(request: pytest.FixtureRequest) -> str:
    """URL of the broker under test."""
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url"))


class Workers:
    """Consumer subprocesses running tests.jobs.faults.worker."""

    def __init__(self, url: str, queue: str, ledger: Path) -> None:
        self.url, self.queue, self.ledger = url, queue, ledger
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, *extra: str) -> subprocess.Popen[str]:
        args = [sys.executable, "-m", "tests.jobs.faults.worker", self.url, self.queue, str(self.ledger), *extra]
        if self.url.startswith("redis"):
            args += ["--visibility-timeout", str(TEST_VISIBILITY)]
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "ready", f"worker did not start: {line!r}"
        self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def workers(fault_url: str, queue: str, tmp_path: Path) -> Iterator[Workers]:
    """Start consumer processes for the scenario; all are stopped afterwards."""
    pool = Workers(fault_url, queue, tmp_path / "ledger")
    try:
        yield pool
    finally:
        pool.stop_all()
