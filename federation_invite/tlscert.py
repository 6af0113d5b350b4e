"""Self-signed TLS certificates for local testing (``generate-config --tls-cert``).

Federation peers verify certificates by default; a self-signed one only works
with peers that turned verification off (test deployments, the interop suite).
The private key file is created with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .core.ids import parse_server_name

__all__ = ["write_self_signed_certificate"]


def _subject_names(host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
    except ValueError:
        names.append(x509.DNSName(host))
    if host != "localhost":
        names.append(x509.DNSName("localhost"))
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    return names


def write_self_signed_certificate(
    server_name: str, key_path: str, cert_path: str, *, days: int = 365
) -> None:
    """Write a new P-256 key (0600) and a self-signed certificate for ``server_name``'s host.

    The certificate names the host (DNS name or IP address), ``localhost`` and
    ``127.0.0.1`` as subject alternative names. Existing files are never overwritten.
    """
    host, _ = parse_server_name(server_name)
    for path in (key_path, cert_path):
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists; not overwriting it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host.strip("[]"))])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_names(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    with open(cert_path, "xb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))
