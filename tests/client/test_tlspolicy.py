"""Tests for federation_invite.client.tls: which connection creator a name gets."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from OpenSSL import SSL
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.client import tls
from federation_invite.client.tls import FederationTLSPolicy


class _FakeTLSProtocol:
    """Stands in for the TLSMemoryBIOProtocol a connection is created for."""

    def __init__(self) -> None:
        self.failures: list[Failure] = []
        # What Twisted's creators read to offer ALPN: the wrapped (HTTP) factory.
        self.factory = SimpleNamespace(wrappedFactory=Factory())

    def failVerification(self, reason: Failure) -> None:
        self.failures.append(reason)


def _connect(policy: FederationTLSPolicy, name: bytes) -> SSL.Connection:
    protocol: Any = _FakeTLSProtocol()
    connection: SSL.Connection = policy.creatorForNetloc(name, 8448).clientConnectionForTLS(
        protocol
    )
    return connection


class FederationTLSPolicyTests(SynchronousTestCase):
    def test_one_context_for_all_names(self) -> None:
        """Every name, DNS or IP literal, shares the policy's one SSL context."""
        policy = FederationTLSPolicy()
        contexts = {
            id(_connect(policy, name).get_context())
            for name in (b"a.example", b"b.example", b"1.2.3.4", b"[::1]")
        }
        self.assertEqual(len(contexts), 1)

    def test_one_unverified_context_for_all_names(self) -> None:
        """With verify off every name shares one SSL context too, which verifies nothing."""
        policy = FederationTLSPolicy(verify=False)
        first = _connect(policy, b"a.example")
        self.assertIs(_connect(policy, b"b.example").get_context(), first.get_context())
        self.assertEqual(first.get_verify_mode(), SSL.VERIFY_NONE)
        self.assertFalse(policy.verify)

    def test_contexts_per_policy(self) -> None:
        """Two policies (another trust root or verify flag) do not share a context."""
        verifying = _connect(FederationTLSPolicy(), b"a.example")
        unverified = _connect(FederationTLSPolicy(verify=False), b"a.example")
        self.assertIsNot(verifying.get_context(), unverified.get_context())
        self.assertEqual(
            verifying.get_verify_mode(), SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        )

    def test_tls_1_2_minimum(self) -> None:
        """SSLv3, TLS 1.0 and 1.1 are disabled, verifying or not; compression too."""
        for policy in (FederationTLSPolicy(), FederationTLSPolicy(verify=False)):
            context = _connect(policy, b"a.example").get_context()
            # pyOpenSSL has no getter, and refuses set_options once a connection exists.
            options = SSL._lib.SSL_CTX_get_options(context._context)
            for disabled in (SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
                self.assertTrue(options & disabled, hex(disabled))
            self.assertTrue(options & SSL.OP_NO_COMPRESSION)

    def test_sni(self) -> None:
        """SNI is the DNS name (verifying or not), never an IP literal."""
        for policy in (FederationTLSPolicy(), FederationTLSPolicy(verify=False)):
            self.assertEqual(
                _connect(policy, b"xn--bcher-kva.example").get_servername(),
                b"xn--bcher-kva.example",
            )
            self.assertIsNone(_connect(policy, b"10.1.2.3").get_servername())
            self.assertIsNone(_connect(policy, b"[2001:db8::1]").get_servername())
            self.assertIsNone(_connect(policy, b"2001:db8::1").get_servername())

    def test_no_sni_for_a_name_that_is_no_dns_name(self) -> None:
        """SNI is the name IDNA-encoded: a name that is no valid DNS name (an empty label,
        a 64-character label) gets no SNI, verifying or not (the name check then refuses
        it); a valid name gets its SNI."""
        for policy in (FederationTLSPolicy(), FederationTLSPolicy(verify=False)):
            for name in (b"a..example", b"x" * 64 + b".example"):
                self.assertIsNone(_connect(policy, name).get_servername(), name)
            self.assertEqual(_connect(policy, b"a.example").get_servername(), b"a.example")

    def test_info_callback_error_logged_not_raised(self) -> None:
        """An exception in the context's info callback (called from inside OpenSSL, where
        it would be lost) is logged as an error, not raised: here a connection the policy
        registered no verifier for (KeyError)."""
        policy = FederationTLSPolicy()
        stranger = SSL.Connection(_connect(policy, b"a.example").get_context(), None)
        policy._info_callback(stranger, SSL.SSL_CB_HANDSHAKE_DONE, 1)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_failing_verification_error_logged_not_raised(self) -> None:
        """A protocol whose failVerification raises (at a handshake done without the name
        check) has the error logged, not raised into OpenSSL."""

        class Broken:
            def failVerification(self, reason: Failure) -> None:
                raise RuntimeError("gone")

        protocol = Broken()  # held: the verifier's reference is weak
        verifier = tls._IdentityVerifier("a.example", False, protocol)
        verifier.info_callback(None, SSL.SSL_CB_HANDSHAKE_DONE, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_handshake_done_without_name_check(self) -> None:
        """A handshake that completes without the leaf's name check passing fails verification."""
        protocol = _FakeTLSProtocol()
        policy = FederationTLSPolicy()
        creator: Any = policy.creatorForNetloc(b"a.example", 8448)
        connection = creator.clientConnectionForTLS(protocol)
        # What the context's info callback is called with during a handshake.
        policy._info_callback(connection, SSL.SSL_CB_HANDSHAKE_START, 1)
        self.assertEqual(protocol.failures, [])
        policy._info_callback(connection, SSL.SSL_CB_HANDSHAKE_DONE, 1)
        [failure] = protocol.failures
        self.assertIsInstance(failure.value, SSL.Error)

    def test_chain_failure_kept(self) -> None:
        """OpenSSL's chain verdict stands: a failed certificate at any depth fails verification."""
        protocol = _FakeTLSProtocol()
        connection = _connect(FederationTLSPolicy(), b"a.example")
        verifier = tls._IdentityVerifier("a.example", False, protocol)
        self.assertFalse(verifier.verify_callback(connection, None, 10, 1, 0))
        self.assertFalse(verifier.verify_callback(connection, None, 10, 0, 0))
        self.assertEqual(protocol.failures, [])
