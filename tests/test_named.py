"""Named-subject authorization: only subjects the authority reviewed can match (issue 7)."""

from __future__ import annotations

import hashlib
import time
from datetime import date
from pathlib import Path

import grpc
import pytest

from agency_a.client import run_remote_session
from agency_b.service import serve as serve_custodian
from proto import service_kit as kit
from protocol.adapters.files import read_certification, write_certification
from protocol.cli.dev_pki import write_dev_pki
from protocol.crypto import oprf
from protocol.crypto.encoding import decode
from protocol.domain.records import match_keys_bulk
from protocol.engines import named
from protocol.errors import PolicyRefusal, ProtocolError
from protocol.policy import decide as P
from protocol.sessions.identity import RequesterSession, run_in_process
from tests.factories import as_query, make_person, make_world

RULES = ("tin+dob", "tin+last_name")


def certify_world(world, token_key: bytes):
    """Custodian certification under the authority's token key (once per epoch)."""
    keys = match_keys_bulk(world.records, list(RULES), today=date.today())
    request, pending = named.start_certification(
        "agency-b", keys, [r.record_id for r in world.records])
    kid = P.authority_key_id(world.authority.public_key())
    response = named.certify(token_key, kid, request)
    return request, named.finish_certification(pending, response)


def named_authorization(world, approved, cert, token_key, *, authority=None,
                        max_evaluations=None):
    authority = authority or world.authority
    keys = match_keys_bulk([q.person for q in approved], list(RULES), today=date.today())
    entries = [(q.person.record_id, rule) for rule in RULES for q in approved]
    flat = [keys[rule][i] for rule in RULES for i in range(len(approved))]
    now = int(time.time())
    auth = P.Authorization(
        authorization_id=P.new_authorization_id(),
        authority_key_id=P.authority_key_id(authority.public_key()),
        requester_id="agency-a", custodian_id="agency-b", statute="26 U.S.C. 6103(i)(2)",
        purpose="named subjects", not_before=now - 60, not_after=now + 3600,
        tier=P.Tier.IDENTITY, max_evaluations=max_evaluations or len(flat), max_disclosures=1000,
        match_rules=RULES, disclosure_fields=("address", "zip"), retention_days=30,
        mode=P.Mode.NAMED_SUBJECTS, subject_commitment=hashlib.sha256(b"list").digest(),
    )
    tokens = named.issue_tokens(token_key, cert.binding_secret, auth.authorization_id, flat)
    token_map = {e: tokens[i * 32:(i + 1) * 32] for i, e in enumerate(entries)}
    return P.sign_authorization(auth, authority), token_map


@pytest.fixture()
def setup(tmp_path):
    world = make_world(tmp_path, n_records=40)
    c = named.new_token_key()
    request, cert = certify_world(world, c)
    kid = P.authority_key_id(world.authority.public_key())
    return world, c, request, cert, kid


def _run(world, cert, kid, signed, queries, tokens):
    custodian = world.custodian(certifications={kid: cert})
    rs = RequesterSession(signed, queries, tokens=tokens, signing_key=world.requester_key)
    return run_in_process(rs, custodian.session(), requester_id="agency-a")


def test_reviewed_subjects_match(setup) -> None:
    world, c, _req, cert, kid = setup
    approved = [as_query(world.records[i]) for i in range(10, 20)]
    signed, tokens = named_authorization(world, approved, cert, c)
    out = _run(world, cert, kid, signed, approved, tokens)
    assert {r.query_record_id for r in out.results} == {q.person.record_id for q in approved}
    assert out.receipt.evaluated == len(approved) * len(RULES)


def test_authority_sees_only_pseudorandom_elements(setup) -> None:
    world, _c, request, _cert, _kid = setup
    keys = match_keys_bulk(world.records, list(RULES), today=date.today())
    plain = {oprf.hash_to_group(k) for rule in RULES for k in keys[rule] if k is not None}
    got = {request.elements[i:i + 32] for i in range(0, len(request.elements), 32)}
    assert len(got) == len(plain) and not (got & plain)


@pytest.mark.parametrize("attack", ["raw_hash", "other_rule", "other_authority",
                                    "other_authorization"])
def test_unreviewed_subject_never_matches(setup, attack) -> None:
    world, c, _req, cert, kid = setup
    approved = [as_query(world.records[i]) for i in range(10, 14)]
    intruder = as_query(world.records[30])  # in the custodian's file, not reviewed
    signed, tokens = named_authorization(world, approved, cert, c, max_evaluations=100)
    key = match_keys_bulk([intruder.person], ["tin+dob"], today=date.today())["tin+dob"][0]
    if attack == "raw_hash":
        forged = oprf.hash_to_group(key)
    elif attack == "other_rule":
        other = match_keys_bulk([intruder.person], ["tin+last_name"],
                                today=date.today())["tin+last_name"][0]
        forged = named.issue_tokens(c, cert.binding_secret,
                                    signed.authorization.authorization_id, [other])
    elif attack == "other_authority":
        forged = named.issue_tokens(named.new_token_key(), cert.binding_secret,
                                    signed.authorization.authorization_id, [key])
    else:  # a genuine token, but reviewed for another authorization
        forged = named.issue_tokens(c, cert.binding_secret, "auth-some-other-case", [key])
    tokens = dict(tokens)
    tokens[(intruder.person.record_id, "tin+dob")] = forged
    out = _run(world, cert, kid, signed, [*approved, intruder], tokens)
    matched = {r.query_record_id for r in out.results}
    assert intruder.person.record_id not in matched
    assert matched == {q.person.record_id for q in approved}


def test_replayed_tokens_beyond_the_approved_count_are_refused(setup) -> None:
    world, c, _req, cert, kid = setup
    approved = [as_query(world.records[i]) for i in range(5)]
    signed, tokens = named_authorization(world, approved, cert, c)
    # the same subjects again under new record ids: twice the approved count
    replay = [as_query(q.person, record_id=f"{q.person.record_id}-again") for q in approved]
    replay_tokens = dict(tokens)
    for q, r in zip(approved, replay, strict=True):
        for rule in RULES:
            replay_tokens[(r.person.record_id, rule)] = tokens[(q.person.record_id, rule)]
    with pytest.raises(PolicyRefusal) as err:
        _run(world, cert, kid, signed, approved + replay, replay_tokens)
    assert err.value.reasons == ("budget_exhausted",)


def test_named_mode_needs_a_certification(setup) -> None:
    world, c, _req, cert, _kid = setup
    approved = [as_query(world.records[1])]
    signed, tokens = named_authorization(world, approved, cert, c)
    rs = RequesterSession(signed, approved, tokens=tokens, signing_key=world.requester_key)
    with pytest.raises(PolicyRefusal) as err:
        run_in_process(rs, world.custodian().session(), requester_id="agency-a")
    assert err.value.reasons == ("mode_not_permitted",)


def test_certification_round_trips_through_files(setup, tmp_path: Path) -> None:
    _world, _c, request, cert, _kid = setup
    again = named.CertificationRequest.from_bytes(request.to_bytes())
    assert again == request
    write_certification(cert, tmp_path / "cert.bin")
    assert (tmp_path / "cert.bin").stat().st_mode & 0o777 == 0o600
    loaded = read_certification(tmp_path / "cert.bin")
    assert loaded.elements == cert.elements and loaded.record_ids == cert.record_ids
    ts = named.TokenSet("auth-x", (("q1", "tin+dob", oprf.hash_to_group(b"k")),))
    assert named.TokenSet.from_bytes(ts.to_bytes()) == ts


def test_certification_files_are_one_tagged_frame(setup) -> None:
    """Each file is one length-prefixed frame whose first part is its format tag: a cut
    file, or a file of another format, is refused with a ProtocolError."""
    _world, c, request, cert, kid = setup
    response = named.certify(c, kid, request)
    files = ((request, named.CertificationRequest, named.CERT_REQUEST_FORMAT),
             (response, named.CertificationResponse, named.CERT_RESPONSE_FORMAT),
             (cert, named.Certification, named.CERT_FORMAT))
    for message, cls, tag in files:
        blob = message.to_bytes()
        assert decode(blob)[0] == tag.encode() and decode(blob)[2] == message.elements
        with pytest.raises(ProtocolError, match="malformed"):
            cls.from_bytes(blob[:-1])
    with pytest.raises(ProtocolError, match="not a"):
        named.CertificationResponse.from_bytes(request.to_bytes())
    with pytest.raises(ProtocolError, match="not a"):
        named.Certification.from_bytes(response.to_bytes())


def test_named_mode_over_grpc(setup, tmp_path: Path) -> None:
    world, c, _req, cert, kid = setup
    write_dev_pki(tmp_path / "pki", ["agency-a", "agency-b"], server_agencies=["agency-b"])
    custodian = world.custodian(certifications={kid: cert})
    server, port = serve_custodian(
        custodian, kit.TLSFiles.from_dir(tmp_path / "pki", "agency-b", "server"), "127.0.0.1:0")
    try:
        approved = [as_query(world.records[i]) for i in range(3)]
        stranger = as_query(make_person(777, prefix="n"))
        intruder = as_query(world.records[25])
        signed, tokens = named_authorization(world, [*approved, stranger], cert, c,
                                             max_evaluations=20)
        tokens[(intruder.person.record_id, "tin+dob")] = oprf.hash_to_group(
            match_keys_bulk([intruder.person], ["tin+dob"], today=date.today())["tin+dob"][0])
        tls = kit.TLSFiles.from_dir(tmp_path / "pki", "agency-a", "client")
        with kit.secure_channel(f"127.0.0.1:{port}", tls) as ch:
            out = run_remote_session(RequesterSession(
                signed, [*approved, stranger, intruder], tokens=tokens,
                signing_key=world.requester_key), ch)
        assert {r.query_record_id for r in out.results} == {q.person.record_id
                                                            for q in approved}
        # without a certification the custodian refuses with FAILED_PRECONDITION
        bare, port2 = serve_custodian(
            world.custodian(), kit.TLSFiles.from_dir(tmp_path / "pki", "agency-b", "server"),
            "127.0.0.1:0")
        try:
            with kit.secure_channel(f"127.0.0.1:{port2}", tls) as ch:
                with pytest.raises(grpc.RpcError) as err:
                    run_remote_session(RequesterSession(signed, approved, tokens=tokens), ch)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "mode_not_permitted" in err.value.details()
        finally:
            bare.stop(0)
    finally:
        server.stop(0)
