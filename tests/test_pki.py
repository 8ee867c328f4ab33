"""Tests for cli.dev_pki: certificate profiles, identity extraction, and real mTLS over gRPC."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.cli.dev_pki import (
    AGENCY_URN_PREFIX,
    Issued,
    agency_id_from_auth_context,
    agency_id_from_cert_pem,
    create_ca,
    issue_client_cert,
    issue_server_cert,
    write_dev_pki,
)
from protocol.domain.identity import validate_agency_id

# --- helpers ---------------------------------------------------------------------------------


def _cert(issued: Issued) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.cert_pem)


def _ext(cert: x509.Certificate, cls: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(cls)


def _assert_signed_by(leaf: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Verify the leaf's signature with the CA's public key, the way a TLS stack would."""
    ca_pub = ca_cert.public_key()
    assert isinstance(ca_pub, ec.EllipticCurvePublicKey)
    assert leaf.signature_hash_algorithm is not None
    ca_pub.verify(
        leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm)
    )
    assert leaf.issuer == ca_cert.subject


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _handmade_leaf(
    ca: Issued,
    *,
    cn: str | None,
    uris: list[str] | None = None,
) -> bytes:
    """A CA-signed certificate with an arbitrary CN/URI SAN, for identity-extraction edge cases."""
    ca_cert = _cert(ca)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "elsewhere")]
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=1))
        .not_valid_after(_now() + dt.timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return create_ca()


@pytest.fixture(scope="module")
def other_ca() -> Issued:
    return create_ca("some other CA")


# --- CA ----------------------------------------------------------------------------------------


def test_ca_profile(ca: Issued) -> None:
    cert = _cert(ca)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gated-psi dev CA"
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert isinstance(pub.curve, ec.SECP256R1)
    _assert_signed_by(cert, cert)

    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length == 0
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(pub)

    lifetime = cert.not_valid_after_utc - _now()
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)


def test_ca_key_matches_and_is_hidden_from_repr(ca: Issued) -> None:
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert key.public_key() == _cert(ca).public_key()
    assert b"PRIVATE KEY" in ca.key_pem
    assert "PRIVATE KEY" not in repr(ca)
    assert "cert_pem" in repr(ca)


def test_ca_custom_name_and_days() -> None:
    cert = _cert(create_ca("Oversight Court CA", days=2))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Oversight Court CA"
    assert cert.not_valid_after_utc - _now() <= dt.timedelta(days=2)


@pytest.mark.parametrize("days", [0, -1, True])
def test_rejects_bad_days(ca: Issued, days: int) -> None:
    with pytest.raises(ValueError):
        create_ca(days=days)
    with pytest.raises(ValueError):
        issue_client_cert(ca, "agency-a", days=days)


# --- leaf profiles -----------------------------------------------------------------------------


def test_server_cert_profile(ca: Issued) -> None:
    issued = issue_server_cert(ca, "agency-b")
    cert = _cert(issued)
    _assert_signed_by(cert, _cert(ca))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "agency-b"

    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:gated-psi:agency:agency-b"
    ]
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = _ext(cert, x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign

    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert key.public_key() == cert.public_key()


def test_server_cert_passes_rfc5280_server_verifier(ca: Issued) -> None:
    """cryptography's path validator agrees the chain is valid for the names we issued."""
    leaf = _cert(issue_server_cert(ca, "agency-b"))
    store = verification.Store([_cert(ca)])
    for name in (
        verification.DNSName("localhost"),
        verification.IPAddress(ipaddress.ip_address("127.0.0.1")),
        verification.IPAddress(ipaddress.ip_address("::1")),
    ):
        verifier = verification.PolicyBuilder().store(store).build_server_verifier(name)
        chain = verifier.verify(leaf, [])
        assert chain[-1] == _cert(ca)
    wrong = (
        verification.PolicyBuilder()
        .store(store)
        .build_server_verifier(verification.DNSName("evil.example"))
    )
    with pytest.raises(verification.VerificationError):
        wrong.verify(leaf, [])


def test_server_cert_custom_hosts(ca: Issued) -> None:
    cert = _cert(issue_server_cert(ca, "irs", hosts=["psi.irs.example", "10.1.2.3", "fe80::1"]))
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["psi.irs.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("fe80::1"),
    ]


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["ex ample.org"], [""], ["-x.org"], ["é.org"]])
def test_server_cert_rejects_bad_hosts(ca: Issued, hosts: list[str]) -> None:
    with pytest.raises(ValueError):
        issue_server_cert(ca, "agency-b", hosts=hosts)


def test_server_cert_rejects_bare_string_hosts(ca: Issued) -> None:
    with pytest.raises(TypeError):
        issue_server_cert(ca, "agency-b", hosts="localhost")


def test_client_cert_profile(ca: Issued) -> None:
    cert = _cert(issue_client_cert(ca, "agency-a"))
    _assert_signed_by(cert, _cert(ca))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "agency-a"
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:gated-psi:agency:agency-a"
    ]
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.IPAddress) == []
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_client_cert_passes_rfc5280_client_verifier(ca: Issued, other_ca: Issued) -> None:
    leaf = _cert(issue_client_cert(ca, "agency-a"))
    verifier = (
        verification.PolicyBuilder().store(verification.Store([_cert(ca)])).build_client_verifier()
    )
    verified = verifier.verify(leaf, [])
    assert verified.chain[-1] == _cert(ca)
    assert x509.UniformResourceIdentifier("urn:gated-psi:agency:agency-a") in (
        verified.subjects or []
    )
    foreign = _cert(issue_client_cert(other_ca, "agency-a"))
    with pytest.raises(verification.VerificationError):
        verifier.verify(foreign, [])


def test_leaf_never_outlives_ca() -> None:
    short_ca = create_ca(days=1)
    leaf = _cert(issue_client_cert(short_ca, "agency-a", days=365))
    assert leaf.not_valid_after_utc <= _cert(short_ca).not_valid_after_utc
    assert leaf.not_valid_before_utc >= _cert(short_ca).not_valid_before_utc


def test_each_issue_has_fresh_key_and_serial(ca: Issued) -> None:
    a, b = issue_client_cert(ca, "agency-a"), issue_client_cert(ca, "agency-a")
    assert a.key_pem != b.key_pem
    assert _cert(a).serial_number != _cert(b).serial_number


def test_refuses_to_sign_with_a_non_ca(ca: Issued) -> None:
    leaf = issue_client_cert(ca, "agency-a")
    with pytest.raises(ValueError, match="not a CA"):
        issue_client_cert(leaf, "agency-z")


def test_refuses_ca_with_mismatched_key(ca: Issued, other_ca: Issued) -> None:
    franken = Issued(cert_pem=ca.cert_pem, key_pem=other_ca.key_pem)
    with pytest.raises(ValueError, match="does not match"):
        issue_server_cert(franken, "agency-b")


# --- agency ids ----------------------------------------------------------------------------------

_VALID_ID = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


@pytest.mark.parametrize(
    "bad",
    ["", "-lead", ".hidden", "..", "../etc", "a/b", "a b", "a:b", "x" * 65, "agência", "a\n"],
)
def test_invalid_agency_ids_are_refused(ca: Issued, bad: str) -> None:
    with pytest.raises(ValueError):
        validate_agency_id(bad)
    with pytest.raises(ValueError):
        issue_client_cert(ca, bad)
    with pytest.raises(ValueError):
        issue_server_cert(ca, bad)


@settings(max_examples=40, deadline=None)
@given(agency_id=_VALID_ID)
def test_identity_round_trips_through_certificates(ca: Issued, agency_id: str) -> None:
    client = issue_client_cert(ca, agency_id)
    assert agency_id_from_cert_pem(client.cert_pem) == agency_id
    server = issue_server_cert(ca, agency_id, hosts=["localhost"])
    assert agency_id_from_cert_pem(server.cert_pem) == agency_id


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=70))
def test_validate_agency_id_accepts_exactly_the_safe_alphabet(text: str) -> None:
    safe = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
    expected_ok = 1 <= len(text) <= 64 and set(text) <= safe and text[0] not in "._-"
    if expected_ok:
        assert validate_agency_id(text) == text
    else:
        with pytest.raises(ValueError):
            validate_agency_id(text)


# --- identity extraction -------------------------------------------------------------------------


def test_identity_prefers_uri_san_over_cn(ca: Issued) -> None:
    pem = _handmade_leaf(ca, cn="cn-name", uris=[AGENCY_URN_PREFIX + "uri-name"])
    assert agency_id_from_cert_pem(pem) == "uri-name"


def test_identity_falls_back_to_cn(ca: Issued) -> None:
    assert agency_id_from_cert_pem(_handmade_leaf(ca, cn="agency-a")) == "agency-a"


def test_identity_ignores_foreign_uris(ca: Issued) -> None:
    pem = _handmade_leaf(
        ca, cn="agency-a", uris=["spiffe://example.org/agency-b", "urn:other:agency:agency-b"]
    )
    assert agency_id_from_cert_pem(pem) == "agency-a"


def test_identity_missing_raises(ca: Issued) -> None:
    with pytest.raises(ValueError):
        agency_id_from_cert_pem(_handmade_leaf(ca, cn=None))
    with pytest.raises(ValueError):
        agency_id_from_cert_pem(_handmade_leaf(ca, cn="not an agency id"))
    # A CA certificate names no agency: its CN has a space in it.
    with pytest.raises(ValueError):
        agency_id_from_cert_pem(ca.cert_pem)


def test_identity_ambiguous_raises(ca: Issued) -> None:
    pem = _handmade_leaf(
        ca, cn="agency-a", uris=[AGENCY_URN_PREFIX + "agency-a", AGENCY_URN_PREFIX + "agency-b"]
    )
    with pytest.raises(ValueError, match="several"):
        agency_id_from_cert_pem(pem)


def test_identity_malformed_uri_value_raises(ca: Issued) -> None:
    pem = _handmade_leaf(ca, cn="agency-a", uris=[AGENCY_URN_PREFIX + "a/../b"])
    with pytest.raises(ValueError):
        agency_id_from_cert_pem(pem)


def test_identity_garbage_pem_raises() -> None:
    with pytest.raises(ValueError):
        agency_id_from_cert_pem(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


def test_auth_context_extraction(ca: Issued) -> None:
    pem = issue_client_cert(ca, "agency-a").cert_pem
    full = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"agency-a"],
        "x509_subject_alternative_name": [b"urn:gated-psi:agency:agency-a"],
        "x509_pem_cert": [pem],
    }
    assert agency_id_from_auth_context(full) == "agency-a"
    # The PEM alone suffices; the pre-parsed CN/SAN alone do not.
    assert agency_id_from_auth_context({"x509_pem_cert": [pem]}) == "agency-a"
    no_pem = {k: v for k, v in full.items() if k != "x509_pem_cert"}
    assert agency_id_from_auth_context(no_pem) is None
    assert agency_id_from_auth_context({}) is None
    assert agency_id_from_auth_context({"x509_pem_cert": []}) is None
    assert agency_id_from_auth_context({**full, "transport_security_type": [b"insecure"]}) is None


def test_auth_context_with_unusable_cert_is_none(ca: Issued) -> None:
    nameless = _handmade_leaf(ca, cn=None)
    assert agency_id_from_auth_context({"x509_pem_cert": [nameless]}) is None
    assert agency_id_from_auth_context({"x509_pem_cert": [b"not a pem"]}) is None


# --- write_dev_pki -------------------------------------------------------------------------------


def test_write_dev_pki_layout_and_modes(tmp_path: Path) -> None:
    out = tmp_path / "pki" / "dev"
    old_umask = os.umask(0o000)  # the key modes must not depend on the caller's umask
    try:
        paths = write_dev_pki(out, ["agency-a", "agency-b"], server_agencies=["agency-b"])
    finally:
        os.umask(old_umask)

    expected = {
        "ca.pem",
        "ca.key",
        "agency-a.client.pem",
        "agency-a.client.key",
        "agency-b.client.pem",
        "agency-b.client.key",
        "agency-b.server.pem",
        "agency-b.server.key",
    }
    assert set(paths) == expected
    assert {p.name for p in out.iterdir()} == expected
    for name, path in paths.items():
        assert path == out / name
        mode = stat.S_IMODE(path.stat().st_mode)
        if name.endswith(".key"):
            assert mode == 0o600, name
        else:
            assert mode & 0o077 == 0o044 and mode & 0o022 == 0, name

    ca_pem = paths["ca.pem"].read_bytes()
    assert b"PRIVATE KEY" not in ca_pem
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(paths["ca.key"].read_bytes(), password=None)
    assert ca_key.public_key() == ca_cert.public_key()

    for stem, purpose in [
        ("agency-a.client", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("agency-b.client", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("agency-b.server", ExtendedKeyUsageOID.SERVER_AUTH),
    ]:
        leaf_pem = paths[f"{stem}.pem"].read_bytes()
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        _assert_signed_by(leaf, ca_cert)
        assert list(_ext(leaf, x509.ExtendedKeyUsage).value) == [purpose]
        assert agency_id_from_cert_pem(leaf_pem) == stem.split(".")[0]
        key = serialization.load_pem_private_key(paths[f"{stem}.key"].read_bytes(), password=None)
        assert key.public_key() == leaf.public_key()


def test_write_dev_pki_tightens_existing_key_files(tmp_path: Path) -> None:
    stale = tmp_path / "agency-a.client.key"
    stale.write_bytes(b"old")
    stale.chmod(0o644)
    paths = write_dev_pki(tmp_path, ["agency-a"], server_agencies=[])
    assert stat.S_IMODE(stale.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in paths["agency-a.client.key"].read_bytes()
    assert not any(name.endswith(".server.pem") for name in paths)


def test_write_dev_pki_refuses_unsafe_names_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        write_dev_pki(out, ["agency-a", "../escape"], server_agencies=[])
    with pytest.raises(ValueError):
        write_dev_pki(out, ["agency-a"], server_agencies=["x/y"])
    assert not out.exists()
    assert not (tmp_path / "escape.client.pem").exists()


# --- real mutual TLS over gRPC ---------------------------------------------------------------

_METHOD = "/gated_psi.test.Echo/Echo"


class _EchoServer:
    """A TLS gRPC server that requires client certificates and reports who called."""

    def __init__(self, ca: Issued, server: Issued) -> None:
        self.calls: list[str | None] = []

        def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
            agency = agency_id_from_auth_context(context.auth_context())
            self.calls.append(agency)
            return (agency or "").encode() + b"|" + request

        handler = grpc.method_handlers_generic_handler(
            "gated_psi.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
        creds = grpc.ssl_server_credentials(
            [(server.key_pem, server.cert_pem)],
            root_certificates=ca.cert_pem,
            require_client_auth=True,
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        assert self.port > 0


def _call(target: str, creds: grpc.ChannelCredentials | None) -> bytes:
    channel = grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)
    try:
        return channel.unary_unary(_METHOD)(b"ping", timeout=5)
    finally:
        channel.close()


def _client_creds(ca: Issued, client: Issued | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem,
        private_key=client.key_pem,
        certificate_chain=client.cert_pem,
    )


@pytest.fixture(scope="module")
def echo_server(ca: Issued) -> Iterator[_EchoServer]:
    srv = _EchoServer(ca, issue_server_cert(ca, "agency-b"))
    srv.server.start()
    try:
        yield srv
    finally:
        srv.server.stop(0)


def _assert_refused(target: str, creds: grpc.ChannelCredentials | None, srv: _EchoServer) -> None:
    before = len(srv.calls)
    with pytest.raises(grpc.RpcError) as info:
        _call(target, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(srv.calls) == before, "the handler must never run for a refused peer"


def test_grpc_mtls_accepts_ca_client_and_exposes_identity(
    ca: Issued, echo_server: _EchoServer
) -> None:
    creds = _client_creds(ca, issue_client_cert(ca, "agency-a"))
    for host in ("127.0.0.1", "localhost"):
        reply = _call(f"{host}:{echo_server.port}", creds)
        assert reply == b"agency-a|ping"
    assert echo_server.calls[-2:] == ["agency-a", "agency-a"]


def test_grpc_mtls_refuses_client_from_other_ca(
    ca: Issued, other_ca: Issued, echo_server: _EchoServer
) -> None:
    impostor = issue_client_cert(other_ca, "agency-a")  # same claimed identity, wrong issuer
    _assert_refused(f"127.0.0.1:{echo_server.port}", _client_creds(ca, impostor), echo_server)


def test_grpc_mtls_refuses_plaintext_client(echo_server: _EchoServer) -> None:
    _assert_refused(f"127.0.0.1:{echo_server.port}", None, echo_server)


def test_grpc_mtls_refuses_tls_client_without_certificate(
    ca: Issued, echo_server: _EchoServer
) -> None:
    _assert_refused(f"127.0.0.1:{echo_server.port}", _client_creds(ca, None), echo_server)


def test_grpc_mtls_refuses_server_cert_used_as_client_cert(
    ca: Issued, echo_server: _EchoServer
) -> None:
    """EKU matters: a serverAuth-only certificate cannot authenticate a requester."""
    wrong_purpose = issue_server_cert(ca, "agency-a")
    _assert_refused(f"127.0.0.1:{echo_server.port}", _client_creds(ca, wrong_purpose), echo_server)


def test_grpc_client_refuses_server_it_does_not_trust(
    ca: Issued, other_ca: Issued, echo_server: _EchoServer
) -> None:
    """The requester side also authenticates the custodian: a foreign root fails the handshake."""
    creds = _client_creds(other_ca, issue_client_cert(other_ca, "agency-a"))
    _assert_refused(f"127.0.0.1:{echo_server.port}", creds, echo_server)
