"""Reliability figures: the hostile-input and fault suites print what they reached.

Each call prints one ``FIGURES <suite>: key=value ...`` line (trial shows test
output), so a run's figures can be read off and recorded in the README's
"Reliability" section.
"""

from __future__ import annotations

import sys


def report(suite: str, **figures: object) -> None:
    """Print one line of figures for ``suite``."""
    values = " ".join(f"{key}={value}" for key, value in figures.items())
    sys.stdout.write(f"\nFIGURES {suite}: {values}\n")
    sys.stdout.flush()
