"""The trial test suite.

Hypothesis checks properties, not timing: its per-example deadline and its
"too slow" health check fail tests on a loaded machine (a CI runner, or trial's
``-j2`` beside other work) without finding anything wrong, so the suite's
profile turns both off. Performance is measured under ``benchmarks/``.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "federation-invite",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("federation-invite")
