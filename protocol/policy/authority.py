"""The authority's side: keys, drafting Authorizations, subject commitments, review summaries.

The authority (a court or an oversight office) is not a service. It reviews a request offline,
signs an :class:`Authorization` with its Ed25519 key, and hands the signed file
to the requester. This module holds the pure part of that work; ``authority_cli`` only adds
argument parsing and file I/O on top.

Drafting refuses, with a ``ValueError`` that names the offending value, anything that the
custodian would refuse later anyway (unknown match rules, fields that are not disclosable for the
tier), so that mistakes surface while the authority is still reviewing rather than mid-session.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.crypto.encoding import encode
from protocol.domain.engine import Engine
from protocol.domain.identity import validate_agency_id
from protocol.domain.records import (
    DISCLOSABLE_FIELDS,
    MATCH_RULES,
    PERSON_FIELDS,
    QUERY_META_FIELDS,
    QueryRecord,
    corroborating_group,
    normalize_address,
    normalize_dob,
    normalize_name,
    normalize_tax_period,
    normalize_tin,
    normalize_zip,
    split_suffix,
)
from protocol.policy.decide import (
    Authorization,
    Mode,
    SignedAuthorization,
    Tier,
    authority_key_id,
    new_authorization_id,
    verify_authorization_signature,
)

__all__ = [
    "SUBJECT_COMMITMENT_TAG",
    "SignatureStatus",
    "ValidityStatus",
    "describe",
    "draft_authorization",
    "format_timestamp",
    "generate_authority_key",
    "private_key_from_pem",
    "private_key_to_pem",
    "public_key_from_hex",
    "public_key_from_json",
    "public_key_to_hex",
    "public_key_to_json",
    "subject_commitment",
    "validity_status",
]

SUBJECT_COMMITMENT_TAG = b"gated-psi/subject-commitment/v2"
"""Domain tag of :func:`subject_commitment`; no other hash in the system starts with it."""

_ED25519_RAW_LEN = 32
# Extra custodian columns (e.g. ``tax_paid_cents``) that an aggregate authorization may name.
_EXTRA_FIELD_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_RESERVED_COLUMNS = frozenset((*PERSON_FIELDS, *QUERY_META_FIELDS, "record_class"))
# A subject is 13 normalized components (see ``_encode_subject``), each preceded by its length.


class SignatureStatus(StrEnum):
    """Outcomes of checking a signed authorization against the keys a reviewer trusts."""

    VERIFIED = "verified"
    INVALID = "invalid"
    UNTRUSTED = "untrusted"
    NOT_CHECKED = "not_checked"


class ValidityStatus(StrEnum):
    """Where "now" falls relative to an authorization's validity window."""

    NOT_YET_VALID = "not_yet_valid"
    VALID = "valid"
    EXPIRED = "expired"


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def generate_authority_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key for an authority."""
    return Ed25519PrivateKey.generate()


def private_key_to_pem(key: Ed25519PrivateKey, *, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM; encrypted with the library's best scheme when a password is given."""
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("authority key must be an Ed25519 private key")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def private_key_from_pem(data: bytes, *, password: bytes | None = None) -> Ed25519PrivateKey:
    """Load a PEM private key; ValueError unless it is an Ed25519 key (wrong password included)."""
    try:
        key = serialization.load_pem_private_key(data, password=password or None)
    except TypeError as exc:
        # cryptography signals "encrypted but no password" / "password but not encrypted" so.
        raise ValueError(f"cannot load authority key: {exc}") from exc
    except ValueError as exc:
        raise ValueError(
            "cannot load authority key: not a PEM private key, or the passphrase is wrong"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(
            f"authority key must be an Ed25519 key, got {type(key).__name__.lstrip('_')}"
        )
    return key


def public_key_to_hex(public_key: Ed25519PublicKey) -> str:
    """Raw 32-byte public key as hex: the form policy files use."""
    if not isinstance(public_key, Ed25519PublicKey):
        raise ValueError("authority public key must be an Ed25519 public key")
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Inverse of :func:`public_key_to_hex`; ValueError on anything but 32 bytes of hex."""
    if not isinstance(text, str):
        raise ValueError("public key must be a hex string")
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise ValueError("public key is not valid hex") from exc
    if len(raw) != _ED25519_RAW_LEN:
        raise ValueError(f"public key must be {_ED25519_RAW_LEN} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_to_json(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The ``authority.pub.json`` document: ``{"key_id": ..., "public_key": hex}``."""
    return {
        "key_id": authority_key_id(public_key),
        "public_key": public_key_to_hex(public_key),
    }


def public_key_from_json(doc: Mapping[str, Any]) -> Ed25519PublicKey:
    """Parse an ``authority.pub.json`` document, refusing one whose key_id names another key.

    A mismatched id would make a custodian trust a key under a name it does not have.
    """
    if not isinstance(doc, Mapping):
        raise ValueError("authority public key file must hold a JSON object")
    unknown = set(doc) - {"key_id", "public_key"}
    if unknown:
        raise ValueError(f"authority public key file has unknown keys: {sorted(map(str, unknown))}")
    if "public_key" not in doc:
        raise ValueError("authority public key file lacks 'public_key'")
    key = public_key_from_hex(doc["public_key"])
    expected = authority_key_id(key)
    claimed = doc.get("key_id", expected)
    if claimed != expected:
        raise ValueError(f"key_id {claimed!r} does not match the public key (its id is {expected})")
    return key


# --------------------------------------------------------------------------------------------
# Drafting
# --------------------------------------------------------------------------------------------


def _check_count(name: str, value: object, *, positive: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


def _unique(name: str, items: Sequence[str]) -> tuple[str, ...]:
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise ValueError(f"{name} must be a list of strings, not {type(items).__name__}")
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{name} contains an empty or non-string entry: {item!r}")
        if item in seen:
            raise ValueError(f"{name} names {item!r} more than once")
        seen.add(item)
    return tuple(items)


def _check_rules(match_rules: Sequence[str]) -> tuple[str, ...]:
    rules = _unique("match_rules", match_rules)
    if not rules:
        raise ValueError("at least one match rule is required")
    for rule_id in rules:
        if rule_id not in MATCH_RULES:
            raise ValueError(
                f"unknown match rule {rule_id!r} (known rules: {', '.join(MATCH_RULES)})"
            )
    return rules


def _check_fields(tier: Tier, disclosure_fields: Sequence[str]) -> tuple[str, ...]:
    """Only the identity tier discloses fields, and only person fields."""
    fields = _unique("disclosure_fields", disclosure_fields)
    if tier is Tier.IDENTITY:
        for name in fields:
            if name not in DISCLOSABLE_FIELDS:
                raise ValueError(
                    f"field {name!r} is not disclosable in the identity tier (disclosable: "
                    f"{', '.join(DISCLOSABLE_FIELDS)}); a custodian value column such as "
                    "tax_paid_cents can only be summed, in the aggregate tier (value_field)"
                )
    elif fields:
        raise ValueError(
            f"the {tier.value} tier discloses no fields; remove disclosure_fields "
            f"({', '.join(fields)})"
            + ("; name the column to sum with value_field" if tier is Tier.AGGREGATE else "")
        )
    return fields


def _check_value_field(tier: Tier, value_field: str) -> str:
    """The aggregate tier sums exactly one custodian value column; no other tier sums."""
    if not isinstance(value_field, str):
        raise TypeError(f"value_field must be a str, not {type(value_field).__name__}")
    if tier is not Tier.AGGREGATE:
        if value_field:
            raise ValueError(f"the {tier.value} tier sums nothing; remove value_field "
                             f"({value_field!r})")
        return ""
    if not value_field:
        raise ValueError("the aggregate tier needs value_field: the custodian value column to "
                         "sum (e.g. tax_paid_cents)")
    if value_field in _RESERVED_COLUMNS:
        raise ValueError(f"value_field {value_field!r} is a person field; the aggregate tier "
                         "sums only custodian value columns such as tax_paid_cents")
    if _EXTRA_FIELD_RE.fullmatch(value_field) is None:
        raise ValueError(f"value_field {value_field!r} is not a valid column name (lower-case "
                         "letters, digits and underscores, starting with a letter)")
    return value_field


def draft_authorization(
    *,
    authority_key: Ed25519PrivateKey | Ed25519PublicKey,
    requester_id: str,
    custodian_id: str,
    statute: str,
    purpose: str,
    tier: Tier | str,
    max_evaluations: int,
    max_disclosures: int,
    match_rules: Sequence[str],
    disclosure_fields: Sequence[str],
    retention_days: int,
    not_before: int,
    not_after: int,
    mode: Mode | str | None = None,
    subject_commitment: bytes | None = None,
    engines: Sequence[str] = (Engine.OPRF.value,),
    min_aggregate_count: int = 0,
    value_field: str = "",
    evaluation_key: bytes | None = None,
    corroboration: int | None = None,
) -> Authorization:
    """Build an unsigned Authorization after checking it against the known rules and fields.

    ``mode`` defaults to ``bulk``; ``named_subjects`` is set by the review step, which issues
    per-subject tokens.  ``evaluation_key`` pins the custodian's POPRF public key, so its OPRF
    evaluations are verified (docs/architecture.md, Verifiable evaluation).  ``corroboration``
    (k >= 2) makes every disclosure need k pairwise independent rules of ``match_rules``
    (docs/architecture.md, Recall and misidentification).  The authorization
    id is fresh and random. Raises ValueError with a message naming the offending argument.
    """
    if isinstance(authority_key, Ed25519PrivateKey):
        public_key = authority_key.public_key()
    elif isinstance(authority_key, Ed25519PublicKey):
        public_key = authority_key
    else:
        raise TypeError("authority_key must be an Ed25519PrivateKey or Ed25519PublicKey, "
                        f"not {type(authority_key).__name__}")
    validate_agency_id(requester_id)
    validate_agency_id(custodian_id)
    if requester_id == custodian_id:
        raise ValueError(f"requester and custodian must be different agencies ({requester_id!r})")
    for name, text in (("statute", statute), ("purpose", purpose)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} must not be blank: it is the legal basis a custodian checks")
    try:
        tier = Tier(tier)
    except ValueError:
        allowed = ", ".join(t.value for t in Tier)
        raise ValueError(f"unknown tier {tier!r} (known tiers: {allowed})") from None
    _check_count("max_evaluations", max_evaluations, positive=True)
    _check_count("max_disclosures", max_disclosures, positive=False)
    _check_count("retention_days", retention_days, positive=False)
    _check_count("not_before", not_before, positive=False)
    _check_count("not_after", not_after, positive=True)
    if not_after <= not_before:
        raise ValueError(f"not_after ({not_after}) must be later than not_before ({not_before}): "
                         "the validity window is [not_before, not_after] in unix seconds")
    _check_count("min_aggregate_count", min_aggregate_count, positive=False)
    if tier is not Tier.IDENTITY and max_disclosures:
        raise ValueError(
            f"the {tier.value} tier discloses no records; max_disclosures must be 0, "
            f"got {max_disclosures}"
        )
    if tier is Tier.IDENTITY and min_aggregate_count:
        raise ValueError("min_aggregate_count applies only to the aggregate and cardinality tiers")
    rules = _check_rules(match_rules)
    fields = _check_fields(tier, disclosure_fields)
    summed = _check_value_field(tier, value_field)
    engine_ids = _unique("engines", engines)
    if not engine_ids:
        raise ValueError("at least one match engine is required")
    if mode is None:
        mode = Mode.BULK
    if corroboration is not None and corroborating_group(rules, corroboration) is None:
        raise ValueError(f"corroboration by {corroboration} rules needs {corroboration} "
                         f"pairwise independent rules (each comparing a field the others do "
                         f"not); {', '.join(rules)} hold none")
    return Authorization(
        authorization_id=new_authorization_id(),
        authority_key_id=authority_key_id(public_key),
        requester_id=requester_id,
        custodian_id=custodian_id,
        statute=statute.strip(),
        purpose=purpose.strip(),
        not_before=not_before,
        not_after=not_after,
        tier=tier,
        max_evaluations=max_evaluations,
        max_disclosures=max_disclosures,
        match_rules=rules,
        disclosure_fields=fields,
        value_field=summed,
        retention_days=retention_days,
        mode=Mode(mode),
        subject_commitment=subject_commitment,
        min_aggregate_count=min_aggregate_count,
        engines=engine_ids,
        evaluation_key=evaluation_key,
        corroboration=corroboration,
    )


# --------------------------------------------------------------------------------------------
# Subject commitment
# --------------------------------------------------------------------------------------------


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _encode_subject(query: QueryRecord, today: date) -> tuple[str, bytes]:
    """(record id, encoding) of one subject: its normalized values, canonically encoded."""
    person, meta = query.person, query.metadata
    last, suffix = split_suffix(person.last_name)
    periods = sorted(
        {
            normalize_tax_period(t, today=today) or _collapse(t).upper()
            for t in meta.tax_periods
            if t.strip()
        }
    )
    record_id = person.record_id.strip()
    parts = [
        c.encode("utf-8")
        for c in (
            record_id,
            normalize_tin(person.tin) or "",
            normalize_name(person.first_name),
            last,
            suffix,
            normalize_dob(person.dob, today=today) or "",
            normalize_address(person.address),
            normalize_name(person.city),
            normalize_name(person.state),
            normalize_zip(person.zip) or "",
            ";".join(periods),
            _collapse(meta.statute),
            _collapse(meta.reason),
        )
    ]
    return record_id, encode(*parts)


def subject_commitment(queries: Iterable[QueryRecord], *, today: date) -> bytes:
    """SHA-256 commitment to the exact list of subjects an authorization was issued for.

    Each subject is encoded as its record id and normalized fields (person fields, tax periods,
    statute, reason), each length-prefixed; the encodings are sorted so the file's row order
    does not matter, counted and hashed under :data:`SUBJECT_COMMITMENT_TAG`. Normalizing first
    means a requester re-deriving the commitment from a differently formatted but equivalent
    file (e.g. "01/02/1980" vs "1980-01-02") gets the same value, while any change to who is
    asked about changes it. Raises ValueError on an empty list or a repeated record id, since
    either would make "the reviewed list" ambiguous. ``today`` is the date the values are
    normalized against (a birth date after it is no date); the caller reads the clock.
    """
    encoded: list[bytes] = []
    seen: set[str] = set()
    for query in queries:
        if not isinstance(query, QueryRecord):
            raise ValueError(f"expected QueryRecord, got {type(query).__name__}")
        record_id, subject = _encode_subject(query, today)
        if not record_id:
            raise ValueError("every subject needs a record_id")
        if record_id in seen:
            raise ValueError(f"record_id {record_id!r} occurs more than once")
        seen.add(record_id)
        encoded.append(subject)
    if not encoded:
        raise ValueError("a subject commitment needs at least one subject")
    encoded.sort()
    return hashlib.sha256(encode(SUBJECT_COMMITMENT_TAG, encode(*encoded))).digest()


# --------------------------------------------------------------------------------------------
# Review
# --------------------------------------------------------------------------------------------


def format_timestamp(seconds: int | float) -> str:
    """Unix seconds as ISO 8601 UTC with a ``Z`` ("2025-07-01T00:00:00Z")."""
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validity_status(auth: Authorization, now: float) -> ValidityStatus:
    """A :class:`ValidityStatus` value: the authority's view, without any custodian skew."""
    if now < auth.not_before:
        return ValidityStatus.NOT_YET_VALID
    if now > auth.not_after:
        return ValidityStatus.EXPIRED
    return ValidityStatus.VALID


def _signature_check(
    signed: SignedAuthorization, trusted: Mapping[str, Ed25519PublicKey] | None
) -> dict[str, Any]:
    key_id = signed.authorization.authority_key_id
    if trusted is None:
        return {
            "status": SignatureStatus.NOT_CHECKED,
            "verified": False,
            "detail": f"signature not checked: no trusted authority keys given (signer {key_id})",
        }
    key = trusted.get(key_id)
    if key is None:
        known = ", ".join(sorted(trusted)) or "none"
        return {
            "status": SignatureStatus.UNTRUSTED,
            "verified": False,
            "detail": f"signed by authority key {key_id}, which is not trusted (trusted: {known})",
        }
    if authority_key_id(key) != key_id:
        return {
            "status": SignatureStatus.UNTRUSTED,
            "verified": False,
            "detail": f"the key trusted under id {key_id} does not have that id",
        }
    if not verify_authorization_signature(signed, key):
        return {
            "status": SignatureStatus.INVALID,
            "verified": False,
            "detail": f"signature does not verify under trusted authority key {key_id}: "
            "the file was altered or forged",
        }
    return {
        "status": SignatureStatus.VERIFIED,
        "verified": True,
        "detail": f"signature verifies under trusted authority key {key_id}",
    }


def describe(
    signed: SignedAuthorization,
    trusted: Mapping[str, Ed25519PublicKey] | None,
    *,
    now: float,
) -> dict[str, Any]:
    """What a reviewer needs to know about a signed authorization, as a JSON-ready dict.

    Keys: ``authorization`` (its fields as in ``to_json``), ``digest`` (hex, the id receipts
    use), ``signature`` (``status`` one of :class:`SignatureStatus`, ``verified``, ``detail``)
    and ``validity`` (``status`` one of :class:`ValidityStatus`, window in ISO 8601 UTC, and
    the seconds until it opens or closes). ``trusted`` maps key id to key; ``None`` means no
    check was asked for, which is reported as ``not_checked`` rather than as a pass. ``now``
    (unix seconds) is the review time; the caller reads the clock.
    """
    if not isinstance(signed, SignedAuthorization):
        raise ValueError("expected a SignedAuthorization")
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise ValueError(f"now must be finite unix seconds, got {now!r}")
    auth = signed.authorization
    status = validity_status(auth, now)
    validity: dict[str, Any] = {
        "status": status,
        "now": format_timestamp(now),
        "not_before": format_timestamp(auth.not_before),
        "not_after": format_timestamp(auth.not_after),
        "duration_seconds": auth.not_after - auth.not_before,
    }
    if status == ValidityStatus.NOT_YET_VALID:
        validity["seconds_until_valid"] = int(auth.not_before - now)
    elif status == ValidityStatus.VALID:
        validity["seconds_remaining"] = int(auth.not_after - now)
    return {
        "authorization": auth.to_json(),
        "digest": signed.digest().hex(),
        "signature": _signature_check(signed, trusted),
        "validity": validity,
    }
