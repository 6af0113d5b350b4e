"""The trial test suite.

Hypothesis checks properties, not timing: its per-example deadline and its
"too slow" health check fail tests on a loaded machine (a CI runner, or trial's
``-j2`` beside other work) without finding anything wrong, so the suite's
profile turns both off. Performance is measured under ``benchmarks/``.

The suite's profile is also derandomized: every run draws the same examples,
so a test's result depends on the code alone, and a gate (CI, a release)
cannot turn red by drawing a new example of an old oracle mistake. To explore
new examples, run with ``FEDERATION_INVITE_HYPOTHESIS=explore`` (random draws,
failing examples kept in the checkout's ``.hypothesis/`` and replayed until
they pass); ``docs/fuzzing.md`` says more. That database is named here, not
taken from Hypothesis's default: on a CI runner (``CI`` set) Hypothesis's own
default has no database at all.
"""

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

settings.register_profile(
    "federation-invite",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
)
settings.register_profile(
    "explore",
    parent=settings.get_profile("federation-invite"),
    derandomize=False,
    database=DirectoryBasedExampleDatabase(os.path.join(_CHECKOUT, ".hypothesis", "examples")),
)
settings.load_profile(os.environ.get("FEDERATION_INVITE_HYPOTHESIS", "federation-invite"))
