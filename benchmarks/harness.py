"""Timing helpers, the result table and its JSON form."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One measured figure: what, on which backend, by whom (ours, raw, peer), value and unit."""

    backend: str
    scenario: str
    who: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Report:
    """Every row of one run, plus the machine it ran on."""

    rows: list[Row] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, backend: str, scenario: str, who: str, value: float, unit: str, note: str = "") -> Row:
        row = Row(backend, scenario, who, value, unit, note)
        self.rows.append(row)
        print(f"  {backend:<14} {scenario:<34} {who:<10} {_fmt(value):>12} {unit:<8} {note}", flush=True)
        return row

    def get(self, backend: str, scenario: str, who: str) -> float | None:
        for row in self.rows:
            if (row.backend, row.scenario, row.who) == (backend, scenario, who):
                return row.value
        return None

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "machine": self.machine,
            "settings": self.settings,
            "rows": [asdict(r) for r in self.rows],
            "targets": self.targets,
            "skipped": self.skipped,
        }
        path.write_text(json.dumps(document, indent=2))

    def skip(self, backend: str, who: str, reason: str) -> None:
        """Record (and print) a measurement that could not be made."""
        self.skipped.append(f"{backend}: {who}: {reason}")
        print(f"  {backend:<14} {who:<34} {'':<10} {'':>12} {reason}", flush=True)


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def machine() -> dict[str, Any]:
    """What this run ran on."""
    import os

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def rate(count: int, seconds: float) -> float:
    """Items per second."""
    return count / seconds if seconds > 0 else float("inf")


def median(values: list[float]) -> float:
    """The median of values."""
    return statistics.median(values)


async def best_of(rounds: int, measures: dict[str, Callable[[], Awaitable[float]]]) -> dict[str, float]:
    """Interleave ``rounds`` rounds of every measure; the best (highest) figure of each."""
    best = dict.fromkeys(measures, 0.0)
    for _ in range(rounds):
        for who, measure in measures.items():
            best[who] = max(best[who], await measure())
    return best
