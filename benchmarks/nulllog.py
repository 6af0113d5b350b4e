"""A twistd ``--logger`` that drops everything: to measure what logging costs (run.py --no-log)."""

from typing import Any


def observer() -> Any:
    return lambda event: None
