"""What every section of the benchmark shares: where it works, how it fails and talks, and
the model of one measured figure and its target."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
WORK = CACHE / "bench-work"


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says what failed and how."""


def say(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass
class Measure:
    """One thing measured: its runs, in seconds or MB."""

    label: str
    short: str  # name in the reference column of the rows compared with it
    unit: str = "s"
    values: list[float] = field(default_factory=list)
    error: str | None = None
    wrong: list[str] = field(default_factory=list)  # runs whose bytes or listing were wrong

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def add(self, value: float) -> None:
        self.values.append(value)
        shown = f"{value:.3f} s" if self.unit == "s" else f"{value:.1f} {self.unit}"
        say(f"  {self.label}: run {len(self.values)}: {shown}")


@dataclass(frozen=True)
class Target:
    """A goal from the issue: on the ratio to the reference, or on the value itself."""

    text: str
    limit: float
    hard: float | None = None  # a looser hard limit: "not met, within hard limit"
    on_ratio: bool = True
    strict: bool = False  # "<" rather than "<="

    def verdict(self, value: float) -> str:
        def ok(limit: float) -> bool:
            return value < limit if self.strict else value <= limit

        if ok(self.limit):
            return "met"
        if self.hard is not None and ok(self.hard):
            return "not met (hard limit met)"
        return "NOT MET"

