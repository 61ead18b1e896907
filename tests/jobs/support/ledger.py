"""A ledger of job ids across processes (published, started, done) and the checker of lost and duplicated jobs."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class Ledger:
    """Append-only event file shared by every process of a scenario; one short line per event.

    Lines are written with one ``os.write`` on an ``O_APPEND`` descriptor, so lines from concurrent processes
    never interleave, and an event written before a SIGKILL is on disk.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, event: str, job_id: str) -> None:
        """Record ``event`` (published, started, done) for ``job_id``."""
        os.write(self._fd, f"{event} {job_id} {os.getpid()} {time.time():.6f}\n".encode())

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self._fd)

    def read(self) -> Accounts:
        """Every event so far, tallied."""
        accounts = Accounts()
        if not self.path.exists():
            return accounts
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 4:
                continue
            event, job_id, pid, stamp = parts
            getattr(accounts, event)[job_id] += 1
            accounts.events.append((event, job_id, int(pid), float(stamp)))
        return accounts


@dataclass
class Accounts:
    """Counts of each event per job id, and what they mean."""

    published: Counter[str] = field(default_factory=Counter)
    started: Counter[str] = field(default_factory=Counter)
    done: Counter[str] = field(default_factory=Counter)
    events: list[tuple[str, str, int, float]] = field(default_factory=list)

    def in_flight_on(self, pid: int) -> set[str]:
        """Jobs that process ``pid`` started and did not finish (in flight when it died)."""
        started = {j for e, j, p, _ in self.events if e == "started" and p == pid}
        done = {j for e, j, p, _ in self.events if e == "done" and p == pid}
        return started - done

    def started_on(self, pid: int) -> set[str]:
        """Jobs that process ``pid`` started (finished or not: its ack may not have been sent)."""
        return {j for e, j, p, _ in self.events if e == "started" and p == pid}

    def restarted_after(self, job_id: str, pid: int) -> float | None:
        """When ``job_id`` was next started by a process other than ``pid``, or None."""
        times = [t for e, j, p, t in self.events if e == "started" and j == job_id and p != pid]
        return min(times) if times else None

    @property
    def lost(self) -> set[str]:
        """Published and never done."""
        return set(self.published) - set(self.done)

    @property
    def duplicated(self) -> set[str]:
        """Started more than once."""
        return {job_id for job_id, n in self.started.items() if n > 1}

    @property
    def done_twice(self) -> set[str]:
        """Run to completion more than once."""
        return {job_id for job_id, n in self.done.items() if n > 1}

    @property
    def unexpected(self) -> set[str]:
        """Started or done but never published."""
        return (set(self.started) | set(self.done)) - set(self.published)

    def summary(self) -> str:
        """One line for assertion messages and reports."""
        return (
            f"published={len(self.published)} done={len(self.done)} lost={len(self.lost)} "
            f"duplicated={len(self.duplicated)} done_twice={len(self.done_twice)} unexpected={len(self.unexpected)}"
        )
