"""Development PKI for the mutual-TLS links between agencies.

Both gRPC services run over mTLS, and the custodian takes the requester's identity from the
client certificate: it must equal the Authorization's ``requester_id``. This module issues a
small development hierarchy (one CA, server and client leaves) and reads the agency identity
back out of a peer certificate.

The agency identity lives in a URI subjectAltName ``urn:gated-psi:agency:<agency_id>`` (the CN
carries the same value as a fallback for certificates issued elsewhere). Keys are ECDSA P-256,
which every TLS stack gRPC ships with (BoringSSL included) accepts.

The core API is pure: it returns PEM bytes and touches no files. ``write_dev_pki`` is the one
convenience that writes a directory, with private keys readable by the owner only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.adapters.files import make_private_dir
from protocol.domain.identity import validate_agency_id

__all__ = [
    "AGENCY_URN_PREFIX",
    "Issued",
    "agency_id_from_auth_context",
    "agency_id_from_cert_pem",
    "create_ca",
    "issue_client_cert",
    "issue_server_cert",
    "write_dev_pki",
]

AGENCY_URN_PREFIX = "urn:gated-psi:agency:"
"""Prefix of the URI SAN that names the agency a certificate belongs to."""

DEFAULT_SERVER_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

# An ASCII DNS name, optionally with a single leading wildcard label.
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME_RE = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?")

_ORGANIZATION = "gated-psi"
# Leaves are backdated a little so that small clock differences between hosts do not make a
# freshly issued certificate "not yet valid".
_CLOCK_SKEW = dt.timedelta(minutes=5)
_SIGNATURE_HASH = hashes.SHA256()
_KEY_FILE_MODE = 0o600
_CERT_FILE_MODE = 0o644


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM-encoded (key in unencrypted PKCS#8).

    The key is kept out of ``repr`` so that logging an ``Issued`` never leaks it.
    """

    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def create_ca(common_name: str = "gated-psi dev CA", *, days: int = 30) -> Issued:
    """Create a self-signed development CA that may sign leaves but no further CAs."""
    if not common_name or len(common_name) > 64:
        raise ValueError("CA common name must be 1-64 characters")
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, _SIGNATURE_HASH)
    )
    return Issued(cert_pem=_cert_pem(cert), key_pem=_key_pem(key))


def issue_server_cert(
    ca: Issued,
    agency_id: str,
    *,
    hosts: Sequence[str] = DEFAULT_SERVER_HOSTS,
    days: int = 30,
) -> Issued:
    """Issue a TLS server certificate for ``agency_id``'s service, valid for ``hosts``.

    Hosts that parse as IP addresses become IP SANs (clients verify them as such); the rest
    must be DNS names.
    """
    validate_agency_id(agency_id)
    if isinstance(hosts, str):
        raise TypeError("hosts must be a sequence of host names, not a single string")
    host_names = [_host_general_name(h) for h in dict.fromkeys(hosts)]
    if not host_names:
        raise ValueError("a server certificate needs at least one host name or IP address")
    return _issue_leaf(ca, agency_id, host_names, ExtendedKeyUsageOID.SERVER_AUTH, days)


def issue_client_cert(ca: Issued, agency_id: str, *, days: int = 30) -> Issued:
    """Issue a TLS client certificate that identifies ``agency_id`` to the peer service."""
    validate_agency_id(agency_id)
    return _issue_leaf(ca, agency_id, [], ExtendedKeyUsageOID.CLIENT_AUTH, days)


def agency_id_from_cert_pem(pem: bytes) -> str:
    """Return the agency id a certificate names: its agency URI SAN, else its CN.

    Raises ValueError when the PEM does not parse, when the certificate names no well-formed
    agency id, or when it names several different ones (an ambiguous identity is no identity).
    This reads the identity only; it does not check the chain, which the TLS handshake does.
    """
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        uris: list[str] = []
    else:
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    from_uri = {u[len(AGENCY_URN_PREFIX) :] for u in uris if u.startswith(AGENCY_URN_PREFIX)}
    if len(from_uri) > 1:
        raise ValueError(f"certificate names several agencies: {sorted(from_uri)}")
    if from_uri:
        return validate_agency_id(from_uri.pop())
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise ValueError("certificate carries no agency URI SAN and no single common name")
    cn = cns[0].value
    if isinstance(cn, bytes):
        cn = cn.decode("utf-8", "strict")
    return validate_agency_id(cn)


def agency_id_from_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """Return the authenticated peer's agency id from a gRPC ``auth_context()``, else None.

    Only the full peer certificate (``x509_pem_cert``) is trusted; the pre-parsed CN and SAN
    entries are ignored because they cannot tell an agency URI apart from any other SAN. None
    means "no usable identity": no TLS, no client certificate, or a certificate that names no
    agency (or several).
    """
    security = _first(auth_context.get("transport_security_type"))
    if security is not None and security != b"ssl":
        return None
    pem = _first(auth_context.get("x509_pem_cert"))
    if not pem:
        return None
    try:
        return agency_id_from_cert_pem(pem)
    except ValueError:
        return None


def write_dev_pki(
    out_dir: Path, agencies: Sequence[str], *, server_agencies: Sequence[str]
) -> dict[str, Path]:
    """Write a fresh development PKI into ``out_dir`` and return file name -> path.

    Files: ``ca.pem`` and ``ca.key``; ``<agency>.client.pem``/``.client.key`` for each of
    ``agencies``; ``<agency>.server.pem``/``.server.key`` for each of ``server_agencies``.
    Every ``.key`` file is mode 0600, existing files are overwritten; a directory created
    here is 0700 (the certificates themselves are public, 0644).
    """
    if isinstance(agencies, str) or isinstance(server_agencies, str):
        raise TypeError("agencies and server_agencies must be sequences of ids, not strings")
    clients = [validate_agency_id(a) for a in dict.fromkeys(agencies)]
    servers = [validate_agency_id(a) for a in dict.fromkeys(server_agencies)]

    ca = create_ca()
    files: dict[str, bytes] = {"ca.pem": ca.cert_pem, "ca.key": ca.key_pem}
    for agency in clients:
        issued = issue_client_cert(ca, agency)
        files[f"{agency}.client.pem"] = issued.cert_pem
        files[f"{agency}.client.key"] = issued.key_pem
    for agency in servers:
        issued = issue_server_cert(ca, agency)
        files[f"{agency}.server.pem"] = issued.cert_pem
        files[f"{agency}.server.key"] = issued.key_pem

    out_dir = make_private_dir(out_dir)
    written: dict[str, Path] = {}
    for name, data in files.items():
        path = out_dir / name
        _write_file(path, data, _KEY_FILE_MODE if name.endswith(".key") else _CERT_FILE_MODE)
        written[name] = path
    return written


# --- internals -------------------------------------------------------------------------------


def _issue_leaf(
    ca: Issued,
    agency_id: str,
    extra_names: list[x509.GeneralName],
    purpose: x509.ObjectIdentifier,
    days: int,
) -> Issued:
    """Sign an end-entity certificate for ``agency_id`` with one extended key usage."""
    _check_days(days)
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    # A leaf cannot usefully outlive its CA, so its lifetime is clamped to the CA's.
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    not_before = max(now - _CLOCK_SKEW, ca_cert.not_valid_before_utc)
    if not_after <= now:
        raise ValueError("the CA certificate has expired")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, agency_id),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
        ]
    )
    san = x509.SubjectAlternativeName(
        [*extra_names, x509.UniformResourceIdentifier(AGENCY_URN_PREFIX + agency_id)]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, _SIGNATURE_HASH)
    )
    return Issued(cert_pem=_cert_pem(cert), key_pem=_key_pem(key))


def _load_ca(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Parse a CA bundle and refuse anything that could not legitimately sign leaves."""
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("CA key must be an EC private key")
    if key.public_key() != cert.public_key():
        raise ValueError("CA private key does not match the CA certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound as exc:
        raise ValueError("certificate is not a CA made by create_ca") from exc
    if not constraints.ca:
        raise ValueError("certificate is not a CA (basicConstraints CA=False)")
    return cert, key


def _host_general_name(host: str) -> x509.GeneralName:
    """Map a host string to an IP or DNS subjectAltName entry."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"invalid host {host!r}")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or _DNS_NAME_RE.fullmatch(host) is None:
        raise ValueError(f"invalid host {host!r}: not an IP address or ASCII DNS name")
    return x509.DNSName(host.rstrip("."))


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` so that the file never exists with looser permissions than ``mode``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        # O_CREAT's mode is filtered by the umask and ignored for existing files.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _first(values: Sequence[bytes] | None) -> bytes | None:
    if not values:
        return None
    value = values[0]
    return value.encode() if isinstance(value, str) else bytes(value)


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, got {days!r}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _serial() -> int:
    # 159 random bits: positive, at most 20 octets, unpredictable (RFC 5280 4.1.2.2).
    return secrets.randbits(159) | 1


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
