"""Reliability figures: the hostile-input and fault suites print what they reached.

Each call prints one ``FIGURES <suite>: key=value ...`` line (trial shows test
output), so a run's figures can be read off and recorded in the README's
"Reliability" section.
"""

from __future__ import annotations

import sys
from collections import Counter


def report(suite: str, **figures: object) -> None:
    """Print one line of figures for ``suite``."""
    values = " ".join(f"{key}={value}" for key, value in figures.items())
    sys.stdout.write(f"\nFIGURES {suite}: {values}\n")
    sys.stdout.flush()


class AnswerTally:
    """HTTP statuses answered over a fuzz test's generated requests, for its figures line."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()

    def count(self, status: int) -> None:
        self.statuses[status] += 1

    def report(self, suite: str) -> None:
        """``requests=N answers_200=... answers_500=...``: every status answered, and 500
        always (the fuzz suites' promise is none)."""
        figures: dict[str, object] = {"requests": sum(self.statuses.values())}
        for status in sorted(set(self.statuses) | {500}):
            figures[f"answers_{status}"] = self.statuses[status]
        report(suite, **figures)
