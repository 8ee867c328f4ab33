"""Tests for protocol.policy.authority (pure helpers) and the ``psi-authority`` CLI.

The CLI is driven in-process through ``main([...])`` with ``tmp_path``; one test runs the
installed console script to prove the entry point exists.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import stat
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.adapters.files import open_csv, read_policy
from protocol.cli.authority import REFUSAL_LISTING_LIMIT, main
from protocol.cli.dev_pki import agency_id_from_cert_pem
from protocol.domain.records import PersonRecord, QueryMetadata, QueryRecord
from protocol.policy.authority import (
    SUBJECT_COMMITMENT_TAG,
    SignatureStatus,
    ValidityStatus,
    describe,
    draft_authorization,
    private_key_from_pem,
    private_key_to_pem,
    public_key_from_hex,
    public_key_from_json,
    public_key_to_hex,
    public_key_to_json,
    subject_commitment,
)
from protocol.policy.decide import (
    Authorization,
    Mode,
    SessionRequest,
    SignedAuthorization,
    Tier,
    authority_key_id,
    decide,
    sign_authorization,
    verify_authorization_signature,
)

AUTHORITY = Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)
OTHER_AUTHORITY = Ed25519PrivateKey.from_private_bytes(bytes([8]) * 32)
T0 = 1_750_000_000
DAY = 86_400
TODAY = date(2025, 6, 15)  # the day of T0: the clock is injected, never read

HEADER = "record_id,tin,first_name,last_name,dob,address,city,state,zip,tax_periods,statute,reason"
GOOD_ROWS = [
    "Q1,123-45-6789,Maria,Lopez,1980-02-03,12 Main Street,Springfield,IL,62701,2022;2023,"
    "26 USC 6103(i),case 24-117",
    "Q5,345-67-8901,Eve,Stone,1985-07-08,45 Oak Avenue Apt 3,Austin,TX,73301,2023,"
    "26 USC 6103(i),case 24-117",
]
PLACEHOLDER_ROWS = [
    "Q2,,John,Smith,01/02/1975,Failed to Provide,Springfield,IL,62701,2023,26 USC 6103(i),c",
    "Q3,,Ann,Lee,1990-01-01,20500,Washington,DC,20500,2023,26 USC 6103(i),c",
    "Q4,234-56-7890,Bob,Ray,1970-05-06,NA NA,Austin,TX,73301,2023,26 USC 6103(i),c",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def keygen(capsys: pytest.CaptureFixture[str], directory: Path) -> tuple[Path, Path]:
    rc, _, err = run(capsys, "keygen", "--out", str(directory))
    assert rc == 0, err
    return directory / "authority.key", directory / "authority.pub.json"


def issue_args(key: Path, out: Path, *extra: str) -> list[str]:
    return [
        "issue",
        "--key", str(key),
        "--requester", "agency-a",
        "--custodian", "agency-b",
        "--statute", "26 U.S.C. 6103(i)(2)",
        "--purpose", "locate named subjects of case 24-117",
        "--rules", "tin+dob,tin+last_name",
        "--fields", "address,city,state,zip",
        "--max-disclosures", "100",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def write_queries(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def query(record_id: str = "Q1", **person: str) -> QueryRecord:
    fields = {
        "tin": "123-45-6789",
        "first_name": "Maria",
        "last_name": "Lopez",
        "dob": "1980-02-03",
        "address": "12 Main Street",
        "city": "Springfield",
        "state": "IL",
        "zip": "62701",
        **person,
    }
    return QueryRecord(
        PersonRecord(record_id=record_id, **fields),
        QueryMetadata(("2022", "2023"), "26 USC 6103(i)", "case 24-117"),
    )


def draft(**changes: Any) -> Any:
    kwargs: dict[str, Any] = {
        "authority_key": AUTHORITY,
        "requester_id": "agency-a",
        "custodian_id": "agency-b",
        "statute": "26 U.S.C. 6103(i)(2)",
        "purpose": "locate",
        "tier": "identity",
        "max_evaluations": 10,
        "max_disclosures": 5,
        "match_rules": ["tin+dob"],
        "disclosure_fields": ["address", "zip"],
        "retention_days": 90,
        "not_before": T0,
        "not_after": T0 + 30 * DAY,
    }
    kwargs.update(changes)
    return draft_authorization(**kwargs)


# --------------------------------------------------------------------------------------------
# protocol.policy.authority: keys
# --------------------------------------------------------------------------------------------


def test_private_key_pem_round_trip_plain_and_encrypted() -> None:
    plain = private_key_to_pem(AUTHORITY)
    assert b"ENCRYPTED" not in plain
    assert private_key_from_pem(plain).public_key() == AUTHORITY.public_key()

    encrypted = private_key_to_pem(AUTHORITY, password=b"correct horse")
    assert b"ENCRYPTED" in encrypted
    loaded = private_key_from_pem(encrypted, password=b"correct horse")
    assert loaded.public_key() == AUTHORITY.public_key()
    with pytest.raises(ValueError, match="passphrase is wrong"):
        private_key_from_pem(encrypted, password=b"wrong")
    with pytest.raises(ValueError, match="cannot load authority key"):
        private_key_from_pem(encrypted)
    with pytest.raises(ValueError):
        private_key_from_pem(b"not a key")


def test_public_key_hex_and_json_round_trip() -> None:
    pk = AUTHORITY.public_key()
    text = public_key_to_hex(pk)
    assert len(text) == 64
    assert public_key_from_hex(text) == pk
    doc = public_key_to_json(pk)
    assert doc == {"key_id": authority_key_id(pk), "public_key": text}
    assert public_key_from_json(doc) == pk
    for bad in ("zz", "00" * 31, "00" * 33):
        with pytest.raises(ValueError):
            public_key_from_hex(bad)


def test_public_key_json_refuses_a_key_id_naming_another_key() -> None:
    doc = public_key_to_json(AUTHORITY.public_key())
    doc["key_id"] = authority_key_id(OTHER_AUTHORITY.public_key())
    with pytest.raises(ValueError, match="does not match"):
        public_key_from_json(doc)
    with pytest.raises(ValueError, match="unknown keys"):
        public_key_from_json({**public_key_to_json(AUTHORITY.public_key()), "extra": 1})


# --------------------------------------------------------------------------------------------
# protocol.policy.authority: draft_authorization
# --------------------------------------------------------------------------------------------


def test_draft_builds_a_signable_bulk_authorization() -> None:
    auth = draft()
    assert auth.authority_key_id == authority_key_id(AUTHORITY.public_key())
    assert (auth.not_before, auth.not_after) == (T0, T0 + 30 * DAY)
    assert auth.tier is Tier.IDENTITY and auth.mode is Mode.BULK
    assert auth.subject_commitment is None
    assert auth.authorization_id.startswith("auth-")
    assert draft().authorization_id != auth.authorization_id
    signed = sign_authorization(auth, AUTHORITY)
    assert verify_authorization_signature(signed, AUTHORITY.public_key())


def test_draft_with_commitment_stays_bulk_unless_reviewed() -> None:
    # Only the per-subject review (named-subject tokens) makes an authorization named_subjects;
    # a commitment alone records which reviewed file a bulk authorization was issued for.
    auth = draft(subject_commitment=bytes(range(32)))
    assert auth.mode is Mode.BULK
    assert auth.subject_commitment == bytes(range(32))
    named = draft(subject_commitment=bytes(range(32)), mode=Mode.NAMED_SUBJECTS)
    assert named.mode is Mode.NAMED_SUBJECTS


AGGREGATE_DRAFT: dict[str, Any] = {"tier": "aggregate", "max_disclosures": 0,
                                   "disclosure_fields": []}


def test_draft_allows_value_columns_in_aggregate_tier() -> None:
    auth = draft(
        tier="aggregate",
        disclosure_fields=[],
        value_field="tax_paid_cents",
        max_disclosures=0,
        min_aggregate_count=10,
    )
    assert auth.tier is Tier.AGGREGATE
    assert auth.disclosure_fields == () and auth.value_field == "tax_paid_cents"
    assert auth.min_aggregate_count == 10


def test_aggregate_value_column_named_as_a_disclosure_field_is_refused() -> None:
    """The old spelling (the summed column among disclosure_fields) is refused by name."""
    with pytest.raises(ValueError, match=r"aggregate tier discloses no fields.*value_field"):
        draft(tier="aggregate", disclosure_fields=["tax_paid_cents"], max_disclosures=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"match_rules": ["ssn+dob"]}, "unknown match rule 'ssn\\+dob'"),
        ({"match_rules": []}, "at least one match rule"),
        ({"match_rules": ["tin+dob", "tin+dob"]}, "more than once"),
        ({"match_rules": "tin+dob"}, "must be a list"),
        ({"disclosure_fields": ["ssn"]}, "'ssn' is not disclosable"),
        ({"disclosure_fields": ["tax_paid_cents"]}, "can only be summed"),
        ({**AGGREGATE_DRAFT, "value_field": "address"}, "person field"),
        (AGGREGATE_DRAFT, "needs value_field"),
        ({**AGGREGATE_DRAFT, "value_field": "Tax Paid"}, "not a valid column name"),
        ({"tier": "cardinality", "max_disclosures": 0}, "cardinality tier discloses no fields"),
        ({"tier": "cardinality", "max_disclosures": 0, "disclosure_fields": [],
          "value_field": "tax_paid_cents"}, "sums nothing"),
        ({"tier": "aggregate", "disclosure_fields": [], "value_field": "tax_paid_cents"},
         "max_disclosures must"),
        ({"min_aggregate_count": 5}, "min_aggregate_count applies only"),
        ({"tier": "platinum"}, "unknown tier"),
        ({"max_evaluations": 0}, "max_evaluations must be positive"),
        ({"max_evaluations": True}, "must be an integer"),
        ({"max_disclosures": -1}, "must not be negative"),
        ({"retention_days": -1}, "must not be negative"),
        ({"not_after": T0}, "not_after"),
        ({"requester_id": "agency a"}, "invalid agency id"),
        ({"custodian_id": "agency-a"}, "different agencies"),
        ({"statute": "  "}, "statute must not be blank"),
        ({"engines": []}, "at least one match engine"),
    ],
)
def test_draft_refuses_invalid_requests(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        draft(**changes)


# --------------------------------------------------------------------------------------------
# protocol.policy.authority: subject_commitment
# --------------------------------------------------------------------------------------------


def test_subject_commitment_normalizes_equivalent_spellings() -> None:
    a = subject_commitment([query("Q1")], today=TODAY)
    b = subject_commitment(
        [
            query(
                "Q1",
                tin="123456789",
                first_name="  MARIA ",
                last_name="lopez",
                dob="02/03/1980",
                address="12 main st.",
                zip="62701-1234",
            )
        ],
        today=TODAY,
    )
    assert a == b
    assert len(a) == 32


@pytest.mark.parametrize(
    "change",
    [
        {"first_name": "Mario"},
        {"last_name": "Lopez Jr"},
        {"dob": "1980-02-04"},
        {"address": "14 Main Street"},
        {"zip": "62702"},
        {"tin": "123-45-6780"},
        {"city": "Chicago"},
    ],
)
def test_subject_commitment_changes_with_any_subject_field(change: dict[str, str]) -> None:
    base = subject_commitment([query("Q1")], today=TODAY)
    assert base != subject_commitment([query("Q1", **change)], today=TODAY)


def test_subject_commitment_binds_record_id_metadata_and_membership() -> None:
    base = subject_commitment([query("Q1"), query("Q2", tin="234-56-7890")], today=TODAY)
    assert base != subject_commitment([query("Q1")], today=TODAY)
    assert base != subject_commitment([query("Q1"), query("Q3", tin="234-56-7890")], today=TODAY)
    other_meta = dataclasses.replace(
        query("Q1"), metadata=QueryMetadata(("2021",), "26 USC 6103(i)", "case 24-117")
    )
    assert subject_commitment([query("Q1")], today=TODAY) != subject_commitment(
        [other_meta], today=TODAY
    )


def test_subject_commitment_refuses_empty_and_duplicate_lists() -> None:
    with pytest.raises(ValueError, match="at least one subject"):
        subject_commitment([], today=TODAY)
    with pytest.raises(ValueError, match="more than once"):
        subject_commitment([query("Q1"), query(" Q1 ")], today=TODAY)
    with pytest.raises(ValueError, match="record_id"):
        subject_commitment([query("  ")], today=TODAY)
    assert SUBJECT_COMMITMENT_TAG.startswith(b"gated-psi/")


_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(st.tuples(_name, _name), min_size=1, max_size=6, unique_by=lambda t: t[0]),
    data=st.data(),
)
def test_subject_commitment_ignores_row_order(names: list[tuple[str, str]], data: Any) -> None:
    queries = [query(f"R-{rid}", last_name=last) for rid, last in names]
    shuffled = data.draw(st.permutations(queries))
    assert subject_commitment(queries, today=TODAY) == subject_commitment(shuffled, today=TODAY)


@settings(max_examples=60, deadline=None)
@given(a=_name, b=_name)
def test_subject_commitment_components_are_unambiguous(a: str, b: str) -> None:
    # Moving characters between adjacent fields must never yield the same commitment.
    left = query("Q1", first_name=a + b, last_name=b)
    right = query("Q1", first_name=a, last_name=b + b)
    assert subject_commitment([left], today=TODAY) != subject_commitment([right], today=TODAY)


# --------------------------------------------------------------------------------------------
# protocol.policy.authority: describe
# --------------------------------------------------------------------------------------------


def test_describe_reports_validity_at_a_given_time() -> None:
    signed = sign_authorization(draft(), AUTHORITY)
    trusted = {authority_key_id(AUTHORITY.public_key()): AUTHORITY.public_key()}
    before = describe(signed, trusted, now=T0 - 10)
    during = describe(signed, trusted, now=T0 + DAY)
    after = describe(signed, trusted, now=T0 + 31 * DAY)
    assert before["validity"]["status"] == ValidityStatus.NOT_YET_VALID
    assert before["validity"]["seconds_until_valid"] == 10
    assert during["validity"]["status"] == ValidityStatus.VALID
    assert during["validity"]["seconds_remaining"] == 29 * DAY
    assert after["validity"]["status"] == ValidityStatus.EXPIRED
    assert during["validity"]["not_before"] == "2025-06-15T15:06:40Z"
    assert during["authorization"] == signed.authorization.to_json()
    assert during["digest"] == signed.digest().hex()
    json.dumps(during)  # JSON-ready


def test_describe_signature_statuses() -> None:
    signed = sign_authorization(draft(), AUTHORITY)
    kid = authority_key_id(AUTHORITY.public_key())
    other_kid = authority_key_id(OTHER_AUTHORITY.public_key())

    ok = describe(signed, {kid: AUTHORITY.public_key()}, now=T0)["signature"]
    assert ok["status"] == SignatureStatus.VERIFIED and ok["verified"] is True

    unchecked = describe(signed, None, now=T0)["signature"]
    assert unchecked["status"] == SignatureStatus.NOT_CHECKED and unchecked["verified"] is False

    untrusted = describe(signed, {other_kid: OTHER_AUTHORITY.public_key()}, now=T0)
    assert untrusted["signature"]["status"] == SignatureStatus.UNTRUSTED

    # A mapping that files the wrong key under the signer's id must not pass as trusted.
    mislabeled = describe(signed, {kid: OTHER_AUTHORITY.public_key()}, now=T0)
    assert mislabeled["signature"]["status"] == SignatureStatus.UNTRUSTED

    tampered = SignedAuthorization(
        dataclasses.replace(signed.authorization, max_evaluations=10_000), signed.signature
    )
    bad = describe(tampered, {kid: AUTHORITY.public_key()}, now=T0)["signature"]
    assert bad["status"] == SignatureStatus.INVALID and bad["verified"] is False


# --------------------------------------------------------------------------------------------
# CLI: keygen
# --------------------------------------------------------------------------------------------


def test_keygen_writes_private_key_0600_and_public_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "keygen", "--out", str(tmp_path / "k"))
    assert rc == 0
    key_path, pub_path = tmp_path / "k" / "authority.key", tmp_path / "k" / "authority.pub.json"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = private_key_from_pem(key_path.read_bytes())
    doc = json.loads(pub_path.read_text())
    assert set(doc) == {"key_id", "public_key"}
    assert public_key_from_json(doc) == key.public_key()
    assert doc["key_id"] in out


def test_keygen_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, pub_path = keygen(capsys, tmp_path)
    original = key_path.read_bytes()
    rc, _, err = run(capsys, "keygen", "--out", str(tmp_path))
    assert rc == 2
    assert "already exist" in err and "--force" in err
    assert key_path.read_bytes() == original

    rc, _, _ = run(capsys, "keygen", "--out", str(tmp_path), "--force")
    assert rc == 0
    assert key_path.read_bytes() != original
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert public_key_from_json(json.loads(pub_path.read_text())) == (
        private_key_from_pem(key_path.read_bytes()).public_key()
    )


def test_encrypted_key_needs_its_passphrase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTHORITY_PASS", "s3cret passphrase")
    rc, out, _ = run(capsys, "keygen", "--out", str(tmp_path), "--passphrase-env", "AUTHORITY_PASS")
    assert rc == 0 and "encrypted" in out
    key_path = tmp_path / "authority.key"
    assert b"ENCRYPTED" in key_path.read_bytes()

    rc, _, err = run(capsys, *issue_args(key_path, tmp_path / "a.json", "--max-evaluations", "5"))
    assert rc == 2
    assert "--passphrase-env" in err and "Traceback" not in err

    args = issue_args(key_path, tmp_path / "a.json", "--max-evaluations", "5")
    rc, _, err = run(capsys, *args, "--passphrase-env", "AUTHORITY_PASS")
    assert rc == 0, err

    rc, _, err = run(capsys, *args, "--passphrase-env", "UNSET_VARIABLE_XYZ", "--force")
    assert rc == 2 and "unset or empty" in err


# --------------------------------------------------------------------------------------------
# CLI: issue / inspect
# --------------------------------------------------------------------------------------------


def test_keygen_issue_inspect_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, pub_path = keygen(capsys, tmp_path)
    out = tmp_path / "auth.json"
    rc, stdout, err = run(
        capsys, *issue_args(key_path, out, "--max-evaluations", "2000", "--valid-days", "10")
    )
    assert rc == 0, err
    signed = SignedAuthorization.from_bytes(out.read_bytes())
    auth = signed.authorization
    assert auth.authorization_id in stdout
    assert auth.max_evaluations == 2000 and auth.max_disclosures == 100
    assert auth.match_rules == ("tin+dob", "tin+last_name")
    assert auth.disclosure_fields == ("address", "city", "state", "zip")
    assert auth.not_after - auth.not_before == 10 * DAY
    assert auth.retention_days == 90
    assert auth.mode is Mode.BULK
    public_key = public_key_from_json(json.loads(pub_path.read_text()))
    assert verify_authorization_signature(signed, public_key)

    rc, table, err = run(capsys, "inspect", str(out), "--trusted", str(pub_path))
    assert rc == 0, err
    assert "verified" in table and auth.authorization_id in table and "agency-a" in table

    rc, text, _ = run(capsys, "inspect", str(out), "--trusted", str(pub_path), "--json")
    assert rc == 0
    info = json.loads(text)
    assert info["authorization"] == auth.to_json()
    assert info["signature"]["status"] == "verified"
    assert info["validity"]["status"] == "valid"
    assert info["digest"] == signed.digest().hex()


def test_issued_authorization_passes_a_template_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, pub_path = keygen(capsys, tmp_path)
    policy_path = tmp_path / "policy.json"
    rc, stdout, err = run(
        capsys, "policy-template", "--custodian", "agency-b", "--trust", str(pub_path),
        "--out", str(policy_path),
    )  # fmt: skip
    assert rc == 0, err
    assert "tin" in stdout
    policy = read_policy(policy_path)
    assert "tin" in policy.never_disclose
    assert policy.min_rule_strength.name == "MEDIUM"

    out = tmp_path / "auth.json"
    rc, _, err = run(capsys, *issue_args(key_path, out, "--max-evaluations", "500"))
    assert rc == 0, err
    signed = SignedAuthorization.from_bytes(out.read_bytes())
    request = SessionRequest(
        peer_id="agency-a",
        tier=Tier.IDENTITY,
        match_rules=("tin+dob",),
        disclosure_fields=("address", "zip"),
        query_count=500,
    )
    now = signed.authorization.not_before + 60
    assert decide(signed, request, policy, now=now, budget_remaining=10_000).allowed
    weak = dataclasses.replace(request, match_rules=("first+last+address",))
    assert "rule_too_weak" in decide(signed, weak, policy, now=now, budget_remaining=10_000).reasons

    rc, _, err = run(
        capsys, "policy-template", "--custodian", "agency-b", "--trust", str(pub_path),
        "--out", str(policy_path),
    )  # fmt: skip
    assert rc == 2 and "--force" in err


def test_inspect_detects_a_tampered_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, pub_path = keygen(capsys, tmp_path)
    out = tmp_path / "auth.json"
    assert run(capsys, *issue_args(key_path, out, "--max-evaluations", "100"))[0] == 0

    doc = json.loads(out.read_text())
    doc["authorization"]["max_evaluations"] = 1_280_000
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    rc, stdout, err = run(capsys, "inspect", str(tampered), "--trusted", str(pub_path))
    assert rc == 1
    assert "invalid" in stdout
    assert "altered or forged" in err

    doc = json.loads(out.read_text())
    sig = bytearray(bytes.fromhex(doc["signature"]))
    sig[0] ^= 1
    doc["signature"] = sig.hex()
    tampered.write_text(json.dumps(doc))
    rc, stdout, _ = run(capsys, "inspect", str(tampered), "--trusted", str(pub_path), "--json")
    assert rc == 1
    assert json.loads(stdout)["signature"]["status"] == "invalid"

    tampered.write_text(out.read_text()[:-5])
    rc, _, err = run(capsys, "inspect", str(tampered), "--trusted", str(pub_path))
    assert rc == 1
    assert "not a valid signed authorization" in err and "Traceback" not in err


def test_inspect_flags_untrusted_and_unchecked_signers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, _ = keygen(capsys, tmp_path / "real")
    _, other_pub = keygen(capsys, tmp_path / "other")
    out = tmp_path / "auth.json"
    assert run(capsys, *issue_args(key_path, out, "--max-evaluations", "100"))[0] == 0

    rc, stdout, err = run(capsys, "inspect", str(out), "--trusted", str(other_pub), "--json")
    assert rc == 1
    assert json.loads(stdout)["signature"]["status"] == "untrusted"
    assert "not trusted" in err

    rc, _, err = run(capsys, "inspect", str(out))
    assert rc == 1 and "--trusted" in err

    rc, stdout, _ = run(capsys, "inspect", str(out), "--no-verify", "--json")
    assert rc == 0
    assert json.loads(stdout)["signature"]["status"] == "not_checked"

    rc, _, err = run(capsys, "inspect", str(out), "--no-verify", "--trusted", str(other_pub))
    assert rc == 2 and "contradict" in err


def test_issue_with_queries_lists_refusals_and_excludes_them_from_the_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, _ = keygen(capsys, tmp_path)
    csv_path = write_queries(tmp_path / "q.csv", [GOOD_ROWS[0], *PLACEHOLDER_ROWS, GOOD_ROWS[1]])
    refusals_path = tmp_path / "refused.csv"
    out = tmp_path / "auth.json"
    args = [*issue_args(key_path, out), "--queries", str(csv_path)]
    rc, stdout, err = run(capsys, *args, "--refusals-out", str(refusals_path))
    assert rc == 0, err

    assert "5 query records" in stdout and "2 accepted, 3 refused" in stdout
    assert "placeholder_address" in stdout and "zip_only_address" in stdout
    for record_id, line, code in (
        ("Q2", 3, "placeholder_address"),
        ("Q3", 4, "zip_only_address"),
        ("Q4", 5, "placeholder_address"),
    ):
        listing = [ln for ln in stdout.splitlines() if f"line {line} " in ln]
        assert len(listing) == 1
        assert record_id in listing[0] and code in listing[0]
    assert "Failed to Provide" in stdout

    with refusals_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["record_id"], r["line"], r["code"]) for r in rows] == [
        ("Q2", "3", "placeholder_address"),
        ("Q3", "4", "zip_only_address"),
        ("Q4", "5", "placeholder_address"),
    ]

    auth = SignedAuthorization.from_bytes(out.read_bytes()).authorization
    assert auth.max_evaluations == 2 * 2  # accepted subjects x rules; the 3 refused do not count
    assert auth.mode is Mode.BULK
    from protocol.domain.records import read_query_csv

    with open_csv(csv_path) as fh:
        accepted = [q for q in read_query_csv(fh) if q.person.record_id in {"Q1", "Q5"}]
    assert auth.subject_commitment == subject_commitment(accepted, today=date.today())


def test_explicit_max_evaluations_overrides_the_derived_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, _ = keygen(capsys, tmp_path)
    csv_path = write_queries(tmp_path / "q.csv", GOOD_ROWS)
    out = tmp_path / "auth.json"
    rc, _, err = run(capsys, *issue_args(key_path, out), "--queries", str(csv_path),
                     "--max-evaluations", "3")  # fmt: skip
    assert rc == 0
    assert "differs" in err
    assert SignedAuthorization.from_bytes(out.read_bytes()).authorization.max_evaluations == 3


def test_refusal_listing_is_truncated_but_the_file_has_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, _ = keygen(capsys, tmp_path)
    bad = [
        f"B{i},,Ann,Lee,1990-01-01,Unknown Address,Dover,DE,19901,2023,26 USC 6103(i),c"
        for i in range(REFUSAL_LISTING_LIMIT + 12)
    ]
    csv_path = write_queries(tmp_path / "q.csv", [GOOD_ROWS[0], *bad])
    refusals_path = tmp_path / "refused.csv"
    rc, stdout, err = run(
        capsys, *issue_args(key_path, tmp_path / "a.json"), "--queries", str(csv_path),
        "--refusals-out", str(refusals_path),
    )  # fmt: skip
    assert rc == 0, err
    listed = [ln for ln in stdout.splitlines() if ln.startswith("  line ")]
    assert len(listed) == REFUSAL_LISTING_LIMIT
    assert "and 12 more refusals" in stdout
    with refusals_path.open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == REFUSAL_LISTING_LIMIT + 12


def test_refusal_listing_escapes_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, _ = keygen(capsys, tmp_path)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(HEADER.split(","))
    writer.writerow([*GOOD_ROWS[0].split(",", 9)[:9], "2023", "26 USC 6103(i)", "c"])
    writer.writerow(
        ["E\x1b[2J1", "", "Ann", "Lee", "1990-01-01", "N/A", "Dover", "DE", "19901", "2023",
         "26 USC 6103(i)", "c"]
    )  # fmt: skip
    csv_path = tmp_path / "q.csv"
    csv_path.write_text(buffer.getvalue(), encoding="utf-8")
    rc, stdout, err = run(capsys, *issue_args(key_path, tmp_path / "a.json"),
                          "--queries", str(csv_path))  # fmt: skip
    assert rc == 0, err
    assert "\x1b" not in stdout
    assert "E\\x1b[2J1" in stdout


def test_issue_refuses_when_no_query_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, _ = keygen(capsys, tmp_path)
    csv_path = write_queries(tmp_path / "q.csv", PLACEHOLDER_ROWS)
    out = tmp_path / "auth.json"
    rc, stdout, err = run(capsys, *issue_args(key_path, out), "--queries", str(csv_path))
    assert rc == 2
    assert "placeholder_address" in stdout
    assert "no query record" in err
    assert not out.exists()


def test_issue_reports_a_malformed_query_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, _ = keygen(capsys, tmp_path)
    csv_path = tmp_path / "q.csv"
    csv_path.write_text("record_id,first_name\nQ1,Ann\n", encoding="utf-8")
    rc, _, err = run(capsys, *issue_args(key_path, tmp_path / "a.json"), "--queries", str(csv_path))
    assert rc == 2
    assert "lacks required columns" in err and "Traceback" not in err


def test_issue_refuses_to_overwrite_an_authorization(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, _ = keygen(capsys, tmp_path)
    out = tmp_path / "auth.json"
    assert run(capsys, *issue_args(key_path, out, "--max-evaluations", "5"))[0] == 0
    first = out.read_bytes()
    rc, _, err = run(capsys, *issue_args(key_path, out, "--max-evaluations", "5"))
    assert rc == 2 and "already exists" in err
    assert out.read_bytes() == first
    assert run(capsys, *issue_args(key_path, out, "--max-evaluations", "5", "--force"))[0] == 0
    assert out.read_bytes() != first


def test_issue_explicit_window_and_aggregate_tier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, _ = keygen(capsys, tmp_path)
    out = tmp_path / "agg.json"
    rc, _, err = run(
        capsys, "issue", "--key", str(key_path), "--requester", "agency-a",
        "--custodian", "agency-b", "--statute", "S", "--purpose", "P", "--tier", "aggregate",
        "--rules", "tin+dob", "--value-field", "tax_paid_cents", "--max-evaluations", "1300000",
        "--min-aggregate-count", "50", "--not-before", "2025-01-01",
        "--not-after", "2099-01-01T00:00:00+00:00", "--out", str(out),
    )  # fmt: skip
    assert rc == 0, err
    auth = SignedAuthorization.from_bytes(out.read_bytes()).authorization
    assert auth.tier is Tier.AGGREGATE
    assert auth.disclosure_fields == () and auth.value_field == "tax_paid_cents"
    assert auth.max_disclosures == 0 and auth.min_aggregate_count == 50
    assert auth.not_before == 1_735_689_600
    assert auth.not_after == 4_070_908_800


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-evaluations", "0"], "--max-evaluations must be positive"),
        (["--max-evaluations", "-3"], "--max-evaluations must be positive"),
        ([], "--max-evaluations is required unless --queries is given"),
        (["--max-evaluations", "5", "--rules", "ssn+dob"], "unknown match rule 'ssn+dob'"),
        (["--max-evaluations", "5", "--fields", "ssn"], "'ssn' is not disclosable"),
        (["--max-evaluations", "5", "--max-disclosures", "-1"], "must not be negative"),
        (["--max-evaluations", "5", "--valid-days", "0"], "--valid-days must be positive"),
        (
            ["--max-evaluations", "5", "--valid-days", "3", "--not-after", "2099-01-01"],
            "either --valid-days or --not-after",
        ),
        (
            ["--max-evaluations", "5", "--not-before", "2099-02-01", "--not-after", "2099-01-01"],
            "must be later than",
        ),
        (
            ["--max-evaluations", "5", "--not-before", "2000-01-01", "--not-after", "2001-01-01"],
            "already have expired",
        ),
        (["--max-evaluations", "5", "--not-before", "yesterday"], "not an ISO 8601"),
        (["--max-evaluations", "5", "--custodian", "agency-a"], "different agencies"),
        (["--max-evaluations", "5", "--requester", "agency/a"], "invalid agency id"),
        (["--max-evaluations", "5", "--refusals-out", "r.csv"], "--refusals-out needs --queries"),
        (["--max-evaluations", "5", "--retention-days", "-1"], "--retention-days must not be"),
        (["--max-evaluations", "five"], "invalid int value"),
        (["--max-evaluations", "5", "--tier", "gold"], "invalid choice"),
    ],
)
def test_issue_bad_arguments_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    key_path, _ = keygen(capsys, tmp_path)
    out = tmp_path / "auth.json"
    rc, _, err = run(capsys, *issue_args(key_path, out), *extra)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_identity_tier_requires_max_disclosures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path, _ = keygen(capsys, tmp_path)
    args = issue_args(key_path, tmp_path / "a.json", "--max-evaluations", "5")
    i = args.index("--max-disclosures")
    del args[i : i + 2]
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "--max-disclosures is required" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["keygen"],
        ["inspect"],
        ["dev-ca", "--out", "x"],
        ["policy-template", "--custodian", "agency-b", "--out", "p.json"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert "error" in err


def test_missing_files_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(capsys, *issue_args(tmp_path / "nope.key", tmp_path / "a.json",
                                         "--max-evaluations", "5"))  # fmt: skip
    assert rc == 2 and "nope.key" in err and "Traceback" not in err
    rc, _, err = run(capsys, "inspect", str(tmp_path / "missing.json"), "--no-verify")
    assert rc == 2 and "missing.json" in err
    bad_pub = tmp_path / "bad.pub.json"
    bad_pub.write_text("{not json")
    rc, _, err = run(capsys, "policy-template", "--custodian", "agency-b", "--trust",
                     str(bad_pub), "--out", str(tmp_path / "p.json"))  # fmt: skip
    assert rc == 2 and "not valid JSON" in err


# --------------------------------------------------------------------------------------------
# CLI: dev-ca
# --------------------------------------------------------------------------------------------


def test_dev_ca_certificates_chain_to_the_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pki"
    rc, stdout, err = run(
        capsys, "dev-ca", "--out", str(out), "--agency", "agency-a", "--agency", "agency-b",
        "--server", "agency-b",
    )  # fmt: skip
    assert rc == 0, err
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    for name in ("agency-a.client.pem", "agency-b.client.pem", "agency-b.server.pem"):
        assert str(out / name) in stdout
        pem = (out / name).read_bytes()
        leaf = x509.load_pem_x509_certificate(pem)
        leaf.verify_directly_issued_by(ca)  # raises unless the CA signed it
        assert agency_id_from_cert_pem(pem) == name.split(".")[0]
    assert not (out / "agency-a.server.pem").exists()
    for key_file in out.glob("*.key"):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    rc, _, err = run(capsys, "dev-ca", "--out", str(out), "--agency", "agency-a")
    assert rc == 2 and "--force" in err
    rc, _, _ = run(capsys, "dev-ca", "--out", str(out), "--agency", "agency-a", "--force")
    assert rc == 0
    assert (out / "agency-a.server.pem").exists()  # --server defaults to every --agency
    new_ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    x509.load_pem_x509_certificate(
        (out / "agency-a.server.pem").read_bytes()
    ).verify_directly_issued_by(new_ca)


def test_dev_ca_refuses_unsafe_agency_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(capsys, "dev-ca", "--out", str(tmp_path), "--agency", "../evil")
    assert rc == 2 and "invalid agency id" in err
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# help and entry point
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [None, "keygen", "issue", "inspect", "dev-ca", "policy-template"]
)
def test_help_exits_0(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    rc, stdout, _ = run(capsys, *argv)
    assert rc == 0
    assert "usage:" in stdout
    if command is not None:
        assert command in stdout


def test_console_script_entry_point() -> None:
    script = Path(sys.executable).parent / "psi-authority"
    assert script.exists(), "run `pip install -e . --no-deps` to install the console script"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in ("keygen", "issue", "inspect", "dev-ca", "policy-template"):
        assert command in result.stdout


# --------------------------------------------------------------------------------------------
# Old spellings are refused with the new name, never read as aliases
# --------------------------------------------------------------------------------------------


def test_old_budget_spelling_is_refused_in_an_authorization_file() -> None:
    data = draft().to_json()
    data["max_queries"] = data.pop("max_evaluations")
    with pytest.raises(ValueError, match="'max_queries' is now 'max_evaluations'"):
        Authorization.from_json(data)


def test_old_budget_option_is_refused_with_its_new_name(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert main(["issue", "--max-queries", "5"]) == 2
    assert "--max-queries was renamed: use --max-evaluations" in capsys.readouterr().err


def test_old_validity_keywords_and_wrong_key_types_are_refused() -> None:
    with pytest.raises(TypeError, match="valid_from"):
        draft(valid_from=T0)
    with pytest.raises(ValueError, match="must be later than not_before"):
        draft(not_after=T0)
    with pytest.raises(TypeError, match="Ed25519PrivateKey or Ed25519PublicKey, not str"):
        draft(authority_key="not a key")
