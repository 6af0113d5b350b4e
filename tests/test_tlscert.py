"""Tests for self-signed certificate generation."""

from __future__ import annotations

import os
import stat

from cryptography import x509
from twisted.internet import ssl
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.tlscert import write_self_signed_certificate


class SelfSignedTests(SynchronousTestCase):
    def paths(self) -> tuple[str, str]:
        base = self.mktemp()
        os.makedirs(base)
        return os.path.join(base, "tls.key"), os.path.join(base, "tls.crt")

    def test_certificate_for_dns_name(self) -> None:
        """The certificate names the host, localhost and 127.0.0.1; the key is 0600; Twisted loads both."""
        key_path, cert_path = self.paths()
        write_self_signed_certificate("example.org:8448", key_path, cert_path)
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        with open(cert_path, "rb") as handle:
            pem = handle.read()
        certificate = x509.load_pem_x509_certificate(pem)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["example.org", "localhost"])
        self.assertEqual(
            [str(ip) for ip in names.get_values_for_type(x509.IPAddress)], ["127.0.0.1"]
        )
        with open(key_path, "rb") as handle:
            ssl.PrivateCertificate.loadPEM(handle.read() + pem)

    def test_certificate_for_ip_literal(self) -> None:
        """An IP-literal server name becomes an IP address name."""
        key_path, cert_path = self.paths()
        write_self_signed_certificate("[::1]:8448", key_path, cert_path)
        with open(cert_path, "rb") as handle:
            certificate = x509.load_pem_x509_certificate(handle.read())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            [str(ip) for ip in names.get_values_for_type(x509.IPAddress)], ["::1", "127.0.0.1"]
        )

    def test_never_overwrites(self) -> None:
        """Existing key or certificate files are left alone, refused naming the file."""
        key_path, cert_path = self.paths()
        with open(cert_path, "w") as handle:
            handle.write("mine")
        error = self.assertRaises(
            FileExistsError, write_self_signed_certificate, "example.org", key_path, cert_path
        )
        self.assertEqual(str(error), f"{cert_path} exists; not overwriting it")
        self.assertFalse(os.path.exists(key_path))

    def test_key_not_written_through_a_dangling_symlink(self) -> None:
        """A symlink at the key path whose target does not exist (so the key path does not
        "exist") is refused when the key is opened (O_EXCL): the private key is not written
        wherever the link points, and no certificate is written."""
        key_path, cert_path = self.paths()
        target = os.path.abspath(self.mktemp())
        os.symlink(target, key_path)
        self.assertRaises(
            FileExistsError, write_self_signed_certificate, "example.org", key_path, cert_path
        )
        self.assertFalse(os.path.lexists(target))
        self.assertFalse(os.path.lexists(cert_path))

    def test_not_a_certificate_authority(self) -> None:
        """The certificate says it is not a CA, in a critical BasicConstraints extension (a
        verifier that does not understand it must refuse the certificate, not ignore it)."""
        key_path, cert_path = self.paths()
        write_self_signed_certificate("example.org", key_path, cert_path)
        with open(cert_path, "rb") as handle:
            certificate = x509.load_pem_x509_certificate(handle.read())
        extension = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertEqual(
            (extension.critical, extension.value.ca, extension.value.path_length),
            (True, False, None),
        )
