"""Tests for federation_invite.client.tls: which connection creator a name gets."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from federation_invite.client import tls
from federation_invite.client.tls import FederationTLSPolicy


class FederationTLSPolicyTests(SynchronousTestCase):
    def test_cached_per_name(self) -> None:
        """One creator per name; an IPv6 name with brackets is the same as without."""
        policy = FederationTLSPolicy()
        self.assertIs(
            policy.creatorForNetloc(b"a.example", 1), policy.creatorForNetloc(b"a.example", 2)
        )
        self.assertIs(policy.creatorForNetloc(b"[::1]", 1), policy.creatorForNetloc(b"::1", 1))
        self.assertIsNot(
            policy.creatorForNetloc(b"a.example", 1), policy.creatorForNetloc(b"b.example", 1)
        )

    def test_cache_bounded(self) -> None:
        """Past the cache size the creators are built afresh."""
        self.patch(tls, "_MAX_CACHED_CREATORS", 1)
        policy = FederationTLSPolicy()
        first = policy.creatorForNetloc(b"a.example", 1)
        policy.creatorForNetloc(b"b.example", 1)
        self.assertIsNot(policy.creatorForNetloc(b"a.example", 1), first)

    def test_verify_flag(self) -> None:
        """The verify flag picks verifying or accepting creators; unverified ones share one context."""
        verifying = FederationTLSPolicy().creatorForNetloc(b"a.example", 1)
        policy = FederationTLSPolicy(verify=False)
        unverified = policy.creatorForNetloc(b"a.example", 1)
        self.assertNotEqual(type(verifying), type(unverified))
        self.assertFalse(policy.verify)
        policy.creatorForNetloc(b"b.example", 1)
        self.assertIsNotNone(policy._unverified_options)
