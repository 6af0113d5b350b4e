"""The suite's Hypothesis profile (``tests/__init__.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase


class HypothesisProfileTests(SynchronousTestCase):
    def setUp(self) -> None:
        if os.environ.get("FEDERATION_INVITE_HYPOTHESIS", "federation-invite") != (
            "federation-invite"
        ):
            raise self.skipTest("FEDERATION_INVITE_HYPOTHESIS chose another profile")

    def test_every_run_draws_the_same_examples(self) -> None:
        """The default profile is derandomized and keeps no example database, so a run's
        result depends on the code alone: the same property draws the same examples."""
        self.assertTrue(settings.default.derandomize)
        self.assertIsNone(settings.default.database)
        self.assertIsNone(settings.default.deadline)

        def draws() -> list[int]:
            seen: list[int] = []

            @settings(max_examples=20)
            @given(st.integers())
            def record(value: int) -> None:
                seen.append(value)

            record()
            return seen

        first = draws()
        self.assertEqual(draws(), first)
        self.assertGreater(len(set(first)), 1)

    def test_explore_profile_draws_at_random(self) -> None:
        """``FEDERATION_INVITE_HYPOTHESIS=explore`` draws at random and keeps failing
        examples (docs/fuzzing.md)."""
        explore = settings.get_profile("explore")
        self.assertFalse(explore.derandomize)
        self.assertIsNotNone(explore.database)
        self.assertIsNone(explore.deadline)

    def test_explore_profile_keeps_examples_on_a_ci_runner(self) -> None:
        """With ``CI`` set, Hypothesis's own default has no example database; the
        explore profile names its own, the checkout's ``.hypothesis/examples``."""
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        probe = (
            "import tests\n"
            "from hypothesis import settings\n"
            "print(getattr(settings.get_profile('explore').database, 'path', None))\n"
        )
        env = dict(os.environ, CI="true")
        env.pop("FEDERATION_INVITE_HYPOTHESIS", None)
        output = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.assertEqual(output, os.path.join(checkout, ".hypothesis", "examples"))
