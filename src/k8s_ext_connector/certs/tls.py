"""A CA and webhook serving certificates with ``cryptography`` (ECDSA P-256).

The API server verifies the webhook against the CA bundle in the
MutatingWebhookConfiguration; the serving certificate names the webhook Service's DNS
names. Lifetimes are parameters so tests can use seconds-long certificates.

Certificates are backdated by a minute against clock skew between the issuer and the API
server, but by at most a tenth of their lifetime, so that for seconds-long test
certificates "the fraction of the lifetime left" still means what it says.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # keep the private key out of logs and tracebacks
        return f"Issued(cert={len(self.cert_pem)} bytes)"

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


MAX_BACKDATE = datetime.timedelta(minutes=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def backdate(lifetime: datetime.timedelta) -> datetime.timedelta:
    """How far notBefore lies before the issue time (see the module docstring)."""
    return min(MAX_BACKDATE, lifetime / 10)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_ca(common_name: str, lifetime: datetime.timedelta) -> Issued:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate(lifetime))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_serving_cert(ca: Issued, dns_names: list[str], lifetime: datetime.timedelta) -> Issued:
    """A server certificate for ``dns_names``, never valid beyond its CA."""
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate(lifetime))
        .not_valid_after(min(now + lifetime, ca.certificate.not_valid_after_utc))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use to reach a webhook Service."""
    return [
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        f"{service}.{namespace}",
        service,
    ]


def remaining_fraction(cert: x509.Certificate, now: datetime.datetime | None = None) -> float:
    """How much of the certificate's lifetime is left (1.0 new, 0.0 expired)."""
    now = now or _now()
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    total = (end - start).total_seconds()
    return max(0.0, (end - now).total_seconds() / total) if total > 0 else 0.0


def write_pair(
    directory: Path, issued: Issued, cert_name: str = "tls.crt", key_name: str = "tls.key"
) -> None:
    """Write key (0600) then certificate, each atomically, like a Secret volume update."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data, mode in (
        (key_name, issued.key_pem, 0o600),
        (cert_name, issued.cert_pem, 0o644),
    ):
        temporary = directory / f".{name}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # a stale temporary keeps its old mode otherwise
            handle.write(data)
        temporary.replace(directory / name)


# Inspection, for deciding whether to rotate. Each answers False/empty rather than raising
# on a malformed or foreign certificate: "unusable" is a reason to reissue, not a crash.


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (a caBundle); empty if it is not one."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def to_pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` issued ``cert`` (names match and the signature verifies)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def key_matches(issued: Issued) -> bool:
    """Whether the private key belongs to the certificate (a half-updated pair does not)."""
    try:
        key = serialization.load_pem_private_key(issued.key_pem, password=None)
        return key.public_key() == issued.certificate.public_key()
    except (ValueError, TypeError):
        return False


def dns_names_of(cert: x509.Certificate) -> list[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return names.get_values_for_type(x509.DNSName)
