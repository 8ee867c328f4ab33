"""Signed authorizations, the custodian's own policy, and the one decision function.

Every policy check in the system lives here. The gRPC services and the session state
machines call :func:`decide` (when a session opens) and :func:`check_disclosure` (before each
disclosure); nothing else decides. Refusals carry a machine-readable :class:`Reason` and a
human-readable message that reaches operators verbatim, so messages name the exact rule, field,
identity or number that caused them.

An :class:`Authorization` is signed offline by an authority (a court or oversight office) with
Ed25519 over a canonical, length-prefixed encoding, so that no two different authorizations can
ever share a signature input.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import math
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.crypto.encoding import Part, encode, encode_strs
from protocol.crypto.oprf import deserialize_element
from protocol.domain.engine import BUILTIN_ENGINE_TRAITS, Engine, EngineTraits, IndexMode
from protocol.domain.records import (
    DISCLOSABLE_FIELDS,
    MATCH_RULES,
    MAX_CORROBORATION,
    PERSON_FIELDS,
    RECORD_CLASS_FIELD,
    Strength,
    corroborating_group,
    independent_group,
)
from protocol.errors import InvalidElementError, PolicyRefusal

__all__ = [
    "AUTHORITY_KEY_ID_TAG",
    "AUTHORIZATION_DIGEST_TAG",
    "AUTHORIZATION_SIGNATURE_TAG",
    "AUTHORIZATION_TAG",
    "REFUSAL_CATEGORY",
    "SIGNED_AUTHORIZATION_FORMAT",
    "Authorization",
    "Corroboration",
    "CustodianPolicy",
    "Decision",
    "DisclosureRejection",
    "Mode",
    "Reason",
    "Refused",
    "SessionRequest",
    "SignedAuthorization",
    "Tier",
    "VerifiableEvaluation",
    "authority_key_id",
    "cap_allows_another",
    "check_disclosure",
    "check_disclosure_group",
    "check_evaluation",
    "check_message",
    "decide",
    "new_authorization_id",
    "permitted_fields",
    "sign_authorization",
    "verify_authorization_signature",
    "within_budget",
]

# Domain-separation tags: every hash / signature input in this module starts with its own tag.
AUTHORIZATION_TAG = b"gated-psi/authorization/v2"
AUTHORIZATION_SIGNATURE_TAG = b"gated-psi/authorization-signature/v1"
AUTHORIZATION_DIGEST_TAG = b"gated-psi/signed-authorization-digest/v2"
AUTHORITY_KEY_ID_TAG = b"gated-psi/authority-key-id/v1"
SIGNED_AUTHORIZATION_FORMAT = "gated-psi/signed-authorization/v2"

_E = TypeVar("_E", bound=StrEnum)

_MAX_INT = 2**63 - 1  # fits 8-byte big-endian and a signed SQLite INTEGER
_SIGNATURE_LEN = 64
_COMMITMENT_LEN = 32
_MAX_WIRE_BYTES = 1 << 20  # a signed authorization is a few hundred bytes; refuse absurd input


class Tier(StrEnum):
    """What the requester may learn: identities of matches, an aggregate, or only a count."""

    IDENTITY = "identity"
    AGGREGATE = "aggregate"
    CARDINALITY = "cardinality"


class Mode(StrEnum):
    """Whether any query may be asked, or only subjects the authority reviewed one by one."""

    BULK = "bulk"
    NAMED_SUBJECTS = "named_subjects"


class VerifiableEvaluation(StrEnum):
    """A custodian's stance on RFC 9497 POPRF evaluation under a pinned key
    (docs/architecture.md, Verifiable evaluation): it may refuse authorizations that pin its
    evaluation key, serve both kinds, or require the pin (every evaluation proven)."""

    REFUSED = "refused"
    ALLOWED = "allowed"
    REQUIRED = "required"


class Corroboration(StrEnum):
    """A custodian's stance on corroborated disclosure (docs/architecture.md, Recall and
    misidentification): it may refuse authorizations that ask for it, serve both kinds, or
    require it (every disclosure backed by independent rules)."""

    REFUSED = "refused"
    ALLOWED = "allowed"
    REQUIRED = "required"


class DisclosureRejection(StrEnum):
    """Why a disclosure item (or its whole corroborated group) released nothing; sent back
    beside each rejected index and counted in the custodian's audit entry."""

    PROOF_INVALID = "proof_invalid"  # no in-scope record gives this proof under this rule
    RULE_NOT_OPENED = "rule_not_opened"  # a rule this session did not open
    DISCLOSURE_CAP_REACHED = "disclosure_cap_reached"
    #: Corroborated sessions: an item presented alone, outside any group.
    CORROBORATION_REQUIRED = "corroboration_required"
    CORROBORATION_TOO_FEW_RULES = "corroboration_too_few_rules"
    CORROBORATION_GROUP_OVERSIZED = "corroboration_group_oversized"
    CORROBORATION_RULE_REPEATED = "corroboration_rule_repeated"
    CORROBORATION_RULES_NOT_INDEPENDENT = "corroboration_rules_not_independent"
    #: The group's proofs hold, but for different records.
    CORROBORATION_RECORDS_DIFFER = "corroboration_records_differ"
    #: The key is held by more than ``MAX_HOLDERS_PER_KEY`` records: it identifies no one.
    KEY_HELD_BY_TOO_MANY_RECORDS = "key_held_by_too_many_records"
    #: Disclosure groups sent in a session whose authorization asks for no corroboration.
    CORROBORATION_NOT_AUTHORIZED = "corroboration_not_authorized"


# --------------------------------------------------------------------------------------------
# Validation helpers (raise ValueError with the field name, never TypeError/KeyError)
# --------------------------------------------------------------------------------------------


def _check_str(name: str, value: object, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not encodable as UTF-8") from exc
    return value


def _check_int(name: str, value: object, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > _MAX_INT:
        raise ValueError(f"{name} must be <= {_MAX_INT}, got {value}")
    return value


def _check_str_tuple(name: str, value: object, *, allow_empty: bool = True) -> tuple[str, ...]:
    # A bare string is iterable; accepting it would silently turn "tin+dob" into characters.
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a list or tuple of strings, got {type(value).__name__}")
    items = tuple(_check_str(f"{name}[{i}]", v) for i, v in enumerate(value))
    if not allow_empty and not items:
        raise ValueError(f"{name} must not be empty")
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{name} contains {item!r} more than once")
        seen.add(item)
    return items


def _check_str_set(name: str, value: object) -> frozenset[str]:
    if isinstance(value, str | bytes | bytearray) or not isinstance(
        value, set | frozenset | list | tuple
    ):
        raise ValueError(f"{name} must be a set of strings, got {type(value).__name__}")
    return frozenset(_check_str(f"{name} item", v) for v in value)


def _check_enum(name: str, enum: type[_E], value: object) -> _E:
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        try:
            return enum(value)
        except ValueError:
            pass
    allowed = ", ".join(repr(m.value) for m in enum)
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


# --------------------------------------------------------------------------------------------
# Canonical encoding
# --------------------------------------------------------------------------------------------


def _same(value: Part) -> Part:
    return value


def _enc_optional_bytes(value: bytes | None) -> bytes:
    return b"\x00" if value is None else b"\x01" + value


def _enc_value(member: StrEnum) -> str:
    return member.value


# Fixed field order of the canonical encoding (each field one part of
# ``protocol.crypto.encoding.encode``). A test checks it covers every dataclass field, so adding
# a field without deciding how it is signed fails loudly.
_CANONICAL_ENCODERS: tuple[tuple[str, Callable[[Any], Part]], ...] = (
    ("authorization_id", _same),
    ("authority_key_id", _same),
    ("requester_id", _same),
    ("custodian_id", _same),
    ("statute", _same),
    ("purpose", _same),
    ("not_before", _same),
    ("not_after", _same),
    ("tier", _enc_value),
    ("max_evaluations", _same),
    ("max_disclosures", _same),
    ("match_rules", encode_strs),
    ("disclosure_fields", encode_strs),
    ("retention_days", _same),
    ("mode", _enc_value),
    ("subject_commitment", _enc_optional_bytes),
    ("min_aggregate_count", _same),
    ("engines", encode_strs),
    ("value_field", _same),
    ("evaluation_key", _enc_optional_bytes),
    ("corroboration", _same),
)
#: Trailing fields signed only when set, so authorizations issued before they existed keep
#: their signed bytes (omitting a trailing part keeps the encoding injective: the part count
#: differs).  Only ever append here, and only fields that come last above.  An unset one is
#: left out only when every field after it is unset too (it is encoded as absent otherwise),
#: so the part count still says which fields are present.
_SIGNED_WHEN_SET = ("evaluation_key", "corroboration")


def new_authorization_id() -> str:
    """A fresh random authorization id ("auth-" + 128 random bits in hex)."""
    return "auth-" + secrets.token_hex(16)


def authority_key_id(public_key: Ed25519PublicKey) -> str:
    """Stable short id of an authority key, so authorizations name their signer compactly."""
    if not isinstance(public_key, Ed25519PublicKey):
        raise ValueError("authority key must be an Ed25519 public key")
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(AUTHORITY_KEY_ID_TAG + raw).digest()[:16].hex()


# --------------------------------------------------------------------------------------------
# Authorization
# --------------------------------------------------------------------------------------------

_AUTH_REQUIRED_KEYS = (
    "authorization_id",
    "authority_key_id",
    "requester_id",
    "custodian_id",
    "statute",
    "purpose",
    "not_before",
    "not_after",
    "tier",
    "max_evaluations",
    "max_disclosures",
    "match_rules",
    "disclosure_fields",
    "retention_days",
)
_AUTH_OPTIONAL_KEYS = ("mode", "subject_commitment", "min_aggregate_count", "engines",
                       "value_field", "evaluation_key", "corroboration")
#: Spellings an older authorization file may use, refused with the new name (never read as
#: aliases: a signed field means one thing).
RENAMED_AUTHORIZATION_KEYS = {
    "max_queries": "'max_evaluations' (the evaluation budget: one unit per element the "
                   "custodian evaluates, e.g. subjects x rules for OPRF, bins for KKRT)",
}


@dataclass(frozen=True)
class Authorization:
    """What an authority permits one requester to ask of one custodian, and for how long.

    Validation happens on construction, so an ``Authorization`` object is always well-formed;
    whether it is *acceptable* is decided only by :func:`decide`.
    """

    authorization_id: str
    authority_key_id: str
    requester_id: str
    custodian_id: str
    statute: str
    purpose: str
    not_before: int
    not_after: int
    tier: Tier
    max_evaluations: int
    max_disclosures: int
    match_rules: tuple[str, ...]
    disclosure_fields: tuple[str, ...]
    retention_days: int
    mode: Mode = Mode.BULK
    subject_commitment: bytes | None = None
    min_aggregate_count: int = 0
    engines: tuple[str, ...] = (Engine.OPRF.value,)
    #: The one custodian value column the aggregate tier may sum (empty in other tiers); it
    #: is summed, never disclosed, so it is not among ``disclosure_fields``.
    value_field: str = ""
    #: The custodian's RFC 9497 POPRF public key, pinned by the authority: the OPRF engine
    #: then evaluates verifiably under it with info = the authorization id, and the requester
    #: checks one proof per chunk (docs/architecture.md, Verifiable evaluation).  None: mode 0.
    evaluation_key: bytes | None = None
    #: Corroboration (docs/architecture.md, Recall and misidentification): a record is
    #: disclosed only when this many pairwise independent rules agree on it, each presented
    #: and checked by the custodian.  None: one rule suffices (signed only when set).
    corroboration: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "authorization_id",
            "authority_key_id",
            "requester_id",
            "custodian_id",
            "statute",
            "purpose",
        ):
            _check_str(name, getattr(self, name))
        for name in (
            "not_before",
            "not_after",
            "max_evaluations",
            "max_disclosures",
            "retention_days",
            "min_aggregate_count",
        ):
            _check_int(name, getattr(self, name))
        if self.not_before >= self.not_after:
            raise ValueError(
                f"not_before ({self.not_before}) must be earlier than not_after ({self.not_after})"
            )
        _set(self, "tier", _check_enum("tier", Tier, self.tier))
        _set(self, "mode", _check_enum("mode", Mode, self.mode))
        if not isinstance(self.value_field, str):
            raise ValueError("value_field must be a string")
        if self.value_field and self.tier is not Tier.AGGREGATE:
            raise ValueError(
                f"value_field applies only to the aggregate tier, not {self.tier.value!r}")
        _set(
            self,
            "match_rules",
            _check_str_tuple("match_rules", self.match_rules, allow_empty=False),
        )
        _set(
            self, "disclosure_fields", _check_str_tuple("disclosure_fields", self.disclosure_fields)
        )
        _set(self, "engines", _check_str_tuple("engines", self.engines, allow_empty=False))

        commitment = self.subject_commitment
        if commitment is not None:
            if isinstance(commitment, bytearray | memoryview):
                commitment = bytes(commitment)
                _set(self, "subject_commitment", commitment)
            if not isinstance(commitment, bytes):
                raise ValueError("subject_commitment must be bytes or None")
            if len(commitment) != _COMMITMENT_LEN:
                raise ValueError(
                    f"subject_commitment must be {_COMMITMENT_LEN} bytes, got {len(commitment)}"
                )
        # A named-subject authorization is bound to its reviewed list; a bulk one may
        # carry a commitment too (docs/architecture.md, Policy: "optionally a commitment to
        # the reviewed subject list"), recording which reviewed file it was issued for.
        if self.mode is Mode.NAMED_SUBJECTS and commitment is None:
            raise ValueError("mode 'named_subjects' requires a subject_commitment")
        _set(self, "evaluation_key", _check_evaluation_key(self))
        _check_corroboration(self)

    new_authorization_id = staticmethod(new_authorization_id)

    def canonical_bytes(self) -> bytes:
        """The exact bytes the authority signs; injective over all field values."""
        encoders = list(_CANONICAL_ENCODERS)
        while (encoders and encoders[-1][0] in _SIGNED_WHEN_SET
               and getattr(self, encoders[-1][0]) is None):
            encoders.pop()
        return encode(AUTHORIZATION_TAG, *(enc(getattr(self, name)) for name, enc in encoders))

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict (enums as values, tuples as lists, bytes as hex)."""
        return {
            "authorization_id": self.authorization_id,
            "authority_key_id": self.authority_key_id,
            "requester_id": self.requester_id,
            "custodian_id": self.custodian_id,
            "statute": self.statute,
            "purpose": self.purpose,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "tier": self.tier.value,
            "max_evaluations": self.max_evaluations,
            "max_disclosures": self.max_disclosures,
            "match_rules": list(self.match_rules),
            "disclosure_fields": list(self.disclosure_fields),
            "retention_days": self.retention_days,
            "mode": self.mode.value,
            "subject_commitment": (
                None if self.subject_commitment is None else self.subject_commitment.hex()
            ),
            "min_aggregate_count": self.min_aggregate_count,
            "engines": list(self.engines),
            "value_field": self.value_field,
            **({} if self.evaluation_key is None
               else {"evaluation_key": self.evaluation_key.hex()}),
            **({} if self.corroboration is None
               else {"corroboration": self.corroboration}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Authorization:
        """Parse :meth:`to_json` output strictly; unknown keys are refused (they'd be unsigned)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"authorization must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - set(_AUTH_REQUIRED_KEYS) - set(_AUTH_OPTIONAL_KEYS)
        renamed = sorted(str(k) for k in unknown if k in RENAMED_AUTHORIZATION_KEYS)
        if renamed:
            raise ValueError("authorization uses old key names: " + "; ".join(
                f"{old!r} is now {RENAMED_AUTHORIZATION_KEYS[old]}" for old in renamed))
        if unknown:
            raise ValueError(f"authorization has unknown keys: {sorted(map(str, unknown))}")
        missing = [k for k in _AUTH_REQUIRED_KEYS if k not in data]
        if missing:
            raise ValueError(f"authorization is missing keys: {missing}")
        kwargs: dict[str, Any] = {k: data[k] for k in _AUTH_REQUIRED_KEYS}
        for key in ("mode", "min_aggregate_count", "engines", "value_field", "corroboration"):
            if key in data:
                kwargs[key] = data[key]
        commitment = data.get("subject_commitment")
        if commitment is not None:
            if not isinstance(commitment, str):
                raise ValueError("subject_commitment must be a hex string or null")
            try:
                kwargs["subject_commitment"] = bytes.fromhex(commitment)
            except ValueError as exc:
                raise ValueError("subject_commitment is not valid hex") from exc
        evaluation_key = data.get("evaluation_key")
        if evaluation_key is not None:
            if not isinstance(evaluation_key, str):
                raise ValueError("evaluation_key must be a hex string")
            try:
                kwargs["evaluation_key"] = bytes.fromhex(evaluation_key)
            except ValueError as exc:
                raise ValueError("evaluation_key is not valid hex") from exc
        return cls(**kwargs)


def _check_corroboration(auth: Authorization) -> None:
    """Corroboration is a count of rules from 2 up to the authorization's rules, and applies
    only where records are disclosed (the identity tier)."""
    k = auth.corroboration
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"corroboration must be an integer or None, got {k!r}")
    if not 2 <= k <= min(len(auth.match_rules), MAX_CORROBORATION):
        raise ValueError(f"corroboration must be between 2 and the authorization's "
                         f"{len(auth.match_rules)} match rules, got {k}")
    if auth.tier is not Tier.IDENTITY:
        raise ValueError(f"corroboration applies only to the identity tier, not "
                         f"{auth.tier.value!r}")


def _check_evaluation_key(auth: Authorization) -> bytes | None:
    """A pinned evaluation key is a valid ristretto255 element, for identity-tier use."""
    key = auth.evaluation_key
    if key is None:
        return None
    if isinstance(key, bytearray | memoryview):
        key = bytes(key)
    if not isinstance(key, bytes):
        raise ValueError("evaluation_key must be bytes or None")
    try:
        deserialize_element(key)
    except InvalidElementError as exc:
        raise ValueError(f"evaluation_key is not a ristretto255 public key: {exc}") from None
    if auth.tier is not Tier.IDENTITY:
        raise ValueError(f"evaluation_key applies only to the identity tier, not "
                         f"{auth.tier.value!r}")
    return key


# --------------------------------------------------------------------------------------------
# SignedAuthorization
# --------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


@dataclass(frozen=True)
class SignedAuthorization:
    """An :class:`Authorization` together with the authority's Ed25519 signature."""

    authorization: Authorization
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.authorization, Authorization):
            raise ValueError("authorization must be an Authorization")
        signature = self.signature
        if isinstance(signature, bytearray | memoryview):
            signature = bytes(signature)
            _set(self, "signature", signature)
        if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_LEN:
            raise ValueError(f"signature must be {_SIGNATURE_LEN} bytes")

    def to_bytes(self) -> bytes:
        """Wire/file format: compact, key-sorted UTF-8 JSON (deterministic)."""
        doc = {
            "format": SIGNED_AUTHORIZATION_FORMAT,
            "authorization": self.authorization.to_json(),
            "signature": self.signature.hex(),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedAuthorization:
        """Parse :meth:`to_bytes` output; any malformed input raises ``ValueError`` only.

        The signature is *not* verified here; that is :func:`decide`'s job.
        """
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise ValueError(f"signed authorization must be bytes, got {type(data).__name__}")
        if len(data) > _MAX_WIRE_BYTES:
            raise ValueError(f"signed authorization is too large ({len(data)} bytes)")
        try:
            doc = json.loads(
                data.decode("utf-8"),
                object_pairs_hook=_no_duplicate_keys,
                parse_constant=_reject_constant,
            )
        except RecursionError as exc:
            raise ValueError("signed authorization is nested too deeply") from exc
        except ValueError as exc:  # includes JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"signed authorization is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ValueError("signed authorization must be a JSON object")
        if set(doc) != {"format", "authorization", "signature"}:
            raise ValueError(
                "signed authorization must have exactly the keys "
                "'format', 'authorization' and 'signature'"
            )
        if doc["format"] != SIGNED_AUTHORIZATION_FORMAT:
            raise ValueError(f"unsupported signed authorization format {doc['format']!r}")
        signature = doc["signature"]
        if not isinstance(signature, str):
            raise ValueError("signature must be a hex string")
        try:
            signature_bytes = bytes.fromhex(signature)
        except ValueError as exc:
            raise ValueError("signature is not valid hex") from exc
        return cls(Authorization.from_json(doc["authorization"]), signature_bytes)

    def digest(self) -> bytes:
        """SHA-256 naming this exact signed authorization in transcripts and receipts."""
        canonical = self.authorization.canonical_bytes()
        return hashlib.sha256(encode(AUTHORIZATION_DIGEST_TAG, canonical, self.signature)).digest()


def sign_authorization(auth: Authorization, key: Ed25519PrivateKey) -> SignedAuthorization:
    """Sign as the authority; refuses if ``auth.authority_key_id`` names a different key."""
    if not isinstance(auth, Authorization):
        raise ValueError("auth must be an Authorization")
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("key must be an Ed25519 private key")
    expected = authority_key_id(key.public_key())
    if auth.authority_key_id != expected:
        raise ValueError(
            f"authorization names authority key {auth.authority_key_id!r} "
            f"but the signing key's id is {expected!r}"
        )
    signature = key.sign(AUTHORIZATION_SIGNATURE_TAG + auth.canonical_bytes())
    return SignedAuthorization(auth, signature)


def verify_authorization_signature(
    signed: SignedAuthorization, public_key: Ed25519PublicKey
) -> bool:
    """True iff ``public_key`` signed exactly this authorization."""
    try:
        public_key.verify(
            signed.signature, AUTHORIZATION_SIGNATURE_TAG + signed.authorization.canonical_bytes()
        )
    except InvalidSignature:
        return False
    return True


# --------------------------------------------------------------------------------------------
# CustodianPolicy
# --------------------------------------------------------------------------------------------


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _check_strength(value: object) -> Strength:
    if isinstance(value, Strength):
        return value
    try:
        if isinstance(value, str):
            return Strength[value.upper()]
        if isinstance(value, int) and not isinstance(value, bool):
            return Strength(value)
    except (KeyError, ValueError):
        pass
    names = ", ".join(s.name for s in Strength)
    raise ValueError(f"min_rule_strength must be one of {names}, got {value!r}")


_POLICY_KEYS = (
    "custodian_id",
    "trusted_authorities",
    "min_rule_strength",
    "allowed_weak_rules",
    "never_disclose",
    "excluded_record_classes",
    "allowed_tiers",
    "allowed_engines",
    "clock_skew_s",
    "max_session_queries",
    "audited_refusals_burst",
    "audited_refusals_per_minute",
    "refusal_summary_s",
    "index_mode",
    "epoch_id",
    "epoch_max_evaluations",
    "epoch_max_tagset_fetches",
    "verifiable_evaluation",
    "corroboration",
    "weak_rules_when_corroborated",
)

#: An epoch id names a key epoch in key info strings, file names and the wire: short and plain.
_EPOCH_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_EPOCH_ID_MAX = 32
#: Default cap on evaluations per authorization in epoch mode: the tag-set fingerprints are
#: sized for it (docs/architecture.md, National custodian).
DEFAULT_EPOCH_MAX_EVALUATIONS = 1 << 22


def check_epoch_id(value: object) -> str:
    """A key epoch id: 1..32 characters of letters, digits, '.', '_' or '-', starting with a
    letter or digit (e.g. "2026-11"): it names directories, so "." and ".." never pass."""
    if (not isinstance(value, str) or not 0 < len(value) <= _EPOCH_ID_MAX
            or not set(value) <= _EPOCH_ID_CHARS or not value[0].isalnum()):
        raise ValueError(f"epoch_id must be 1-{_EPOCH_ID_MAX} letters, digits, '.', '_' or '-' "
                         f"starting with a letter or digit, got {value!r:.60}")
    return value


@dataclass(frozen=True)
class CustodianPolicy:
    """The custodian's own limits, applied on top of whatever an authorization permits.

    Defaults are conservative: weak match rules (e.g. name+address) are refused unless named in
    ``allowed_weak_rules``, and the TIN is never disclosed.
    """

    custodian_id: str
    trusted_authorities: Mapping[str, Ed25519PublicKey]
    min_rule_strength: Strength = Strength.MEDIUM
    allowed_weak_rules: frozenset[str] = frozenset()
    never_disclose: frozenset[str] = frozenset({"tin"})
    excluded_record_classes: frozenset[str] = frozenset()
    allowed_tiers: frozenset[Tier] = frozenset(Tier)
    allowed_engines: frozenset[str] = frozenset({Engine.OPRF.value})
    clock_skew_s: int = 60
    max_session_queries: int = 5_000_000
    #: Refusals audited one by one per peer: a burst, refilled at a steady rate.  Beyond
    #: them a peer's refusals are counted and summarised (``refusals_suppressed``) at most
    #: once per ``refusal_summary_s``, so a flood cannot grow the audit chain or the log
    #: (docs/architecture.md, Accounting).
    audited_refusals_burst: int = 20
    audited_refusals_per_minute: int = 60
    refusal_summary_s: int = 60
    #: Which index the identity tier matches against (docs/architecture.md, National
    #: custodian): ``per_authorization`` (records evaluated under each authorization's key,
    #: at open) or ``epoch`` (evaluated once per key epoch ``epoch_id``, offline).  In epoch
    #: mode an authorization may allow at most ``epoch_max_evaluations`` evaluations (the
    #: tag-set fingerprints are sized for it) and fetch the tag set at most
    #: ``epoch_max_tagset_fetches`` times per epoch (each fetch is accounted).
    index_mode: IndexMode = IndexMode.PER_AUTHORIZATION
    epoch_id: str | None = None
    epoch_max_evaluations: int = DEFAULT_EPOCH_MAX_EVALUATIONS
    epoch_max_tagset_fetches: int = 4
    #: Authorizations that pin this custodian's evaluation key: refused, allowed, or
    #: required (docs/architecture.md, Verifiable evaluation).
    verifiable_evaluation: VerifiableEvaluation = VerifiableEvaluation.ALLOWED
    #: Authorizations that ask for corroborated disclosure: refused, allowed, or required
    #: (docs/architecture.md, Recall and misidentification).
    corroboration: Corroboration = Corroboration.ALLOWED
    #: Rules below ``min_rule_strength`` are served when the authorization asks for
    #: corroboration: each of their matches discloses only with independent agreement.
    weak_rules_when_corroborated: bool = False

    def __post_init__(self) -> None:
        _check_str("custodian_id", self.custodian_id)
        if not isinstance(self.trusted_authorities, Mapping):
            raise ValueError("trusted_authorities must map key id -> Ed25519PublicKey")
        trusted: dict[str, Ed25519PublicKey] = {}
        for kid, key in self.trusted_authorities.items():
            _check_str("trusted authority key id", kid)
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"trusted authority {kid!r} is not an Ed25519 public key")
            expected = authority_key_id(key)
            if kid != expected:
                raise ValueError(
                    f"trusted authority key id {kid!r} does not match its key (id {expected!r})"
                )
            trusted[kid] = key
        # Read-only view: a frozen policy must not be mutable through its mapping.
        _set(self, "trusted_authorities", MappingProxyType(trusted))
        _set(self, "min_rule_strength", _check_strength(self.min_rule_strength))
        for name in (
            "allowed_weak_rules",
            "never_disclose",
            "excluded_record_classes",
            "allowed_engines",
        ):
            _set(self, name, _check_str_set(name, getattr(self, name)))
        tiers = self.allowed_tiers
        if isinstance(tiers, str) or not isinstance(tiers, set | frozenset | list | tuple):
            raise ValueError("allowed_tiers must be a set of tiers")
        _set(self, "allowed_tiers", frozenset(_check_enum("allowed_tiers", Tier, t) for t in tiers))
        _check_int("clock_skew_s", self.clock_skew_s)
        _check_int("max_session_queries", self.max_session_queries)
        _check_int("audited_refusals_burst", self.audited_refusals_burst, minimum=1)
        _check_int("audited_refusals_per_minute", self.audited_refusals_per_minute)
        _check_int("refusal_summary_s", self.refusal_summary_s, minimum=1)
        _set(self, "index_mode", _check_enum("index_mode", IndexMode, self.index_mode))
        _set(self, "verifiable_evaluation", _check_enum(
            "verifiable_evaluation", VerifiableEvaluation, self.verifiable_evaluation))
        _set(self, "corroboration", _check_enum(
            "corroboration", Corroboration, self.corroboration))
        if not isinstance(self.weak_rules_when_corroborated, bool):
            raise ValueError("weak_rules_when_corroborated must be true or false")
        _check_int("epoch_max_evaluations", self.epoch_max_evaluations, minimum=1)
        _check_int("epoch_max_tagset_fetches", self.epoch_max_tagset_fetches, minimum=1)
        if self.epoch_id is not None:
            check_epoch_id(self.epoch_id)
        if self.index_mode is IndexMode.EPOCH and self.epoch_id is None:
            raise ValueError("index_mode 'epoch' needs an epoch_id (the key epoch served)")

    def __hash__(self) -> int:
        return hash((self.custodian_id, tuple(sorted(self.trusted_authorities))))

    @classmethod
    def trusting(
        cls, custodian_id: str, authority_keys: Iterable[Ed25519PublicKey], **kwargs: Any
    ) -> CustodianPolicy:
        """Convenience: build a policy from authority public keys (ids are computed)."""
        return cls(custodian_id, {authority_key_id(k): k for k in authority_keys}, **kwargs)

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict (public keys as raw hex, sets as sorted lists)."""
        return {
            "custodian_id": self.custodian_id,
            "trusted_authorities": {
                kid: _raw_public(key).hex() for kid, key in sorted(self.trusted_authorities.items())
            },
            "min_rule_strength": self.min_rule_strength.name,
            "allowed_weak_rules": sorted(self.allowed_weak_rules),
            "never_disclose": sorted(self.never_disclose),
            "excluded_record_classes": sorted(self.excluded_record_classes),
            "allowed_tiers": sorted(t.value for t in self.allowed_tiers),
            "allowed_engines": sorted(self.allowed_engines),
            "clock_skew_s": self.clock_skew_s,
            "max_session_queries": self.max_session_queries,
            "audited_refusals_burst": self.audited_refusals_burst,
            "audited_refusals_per_minute": self.audited_refusals_per_minute,
            "refusal_summary_s": self.refusal_summary_s,
            "index_mode": self.index_mode.value,
            "epoch_id": self.epoch_id,
            "epoch_max_evaluations": self.epoch_max_evaluations,
            "epoch_max_tagset_fetches": self.epoch_max_tagset_fetches,
            "verifiable_evaluation": self.verifiable_evaluation.value,
            "corroboration": self.corroboration.value,
            "weak_rules_when_corroborated": self.weak_rules_when_corroborated,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CustodianPolicy:
        """Parse :meth:`to_json` output; omitted optional keys take their defaults."""
        if not isinstance(data, Mapping):
            raise ValueError("custodian policy must be a JSON object")
        unknown = set(data) - set(_POLICY_KEYS)
        if unknown:
            raise ValueError(f"custodian policy has unknown keys: {sorted(map(str, unknown))}")
        for key in ("custodian_id", "trusted_authorities"):
            if key not in data:
                raise ValueError(f"custodian policy is missing {key!r}")
        raw_trusted = data["trusted_authorities"]
        if not isinstance(raw_trusted, Mapping):
            raise ValueError("trusted_authorities must be an object of key id -> public key hex")
        trusted: dict[str, Ed25519PublicKey] = {}
        for kid, hexkey in raw_trusted.items():
            if not isinstance(hexkey, str):
                raise ValueError(f"trusted authority {kid!r} must be a hex string")
            try:
                trusted[kid] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(hexkey))
            except ValueError as exc:
                raise ValueError(f"trusted authority {kid!r} is not a valid Ed25519 key") from exc
        kwargs: dict[str, Any] = {k: data[k] for k in _POLICY_KEYS[2:] if k in data}
        return cls(custodian_id=data["custodian_id"], trusted_authorities=trusted, **kwargs)


# --------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------


class Reason(StrEnum):
    """Machine-readable refusal reasons; services map them to status codes."""

    UNTRUSTED_SIGNER = "untrusted_signer"
    BAD_SIGNATURE = "bad_signature"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    REQUESTER_MISMATCH = "requester_mismatch"
    CUSTODIAN_MISMATCH = "custodian_mismatch"
    TIER_NOT_PERMITTED = "tier_not_permitted"
    ENGINE_NOT_PERMITTED = "engine_not_permitted"
    ENGINE_UNKNOWN = "engine_unknown"
    RULE_NOT_PERMITTED = "rule_not_permitted"
    RULE_UNKNOWN = "rule_unknown"
    RULE_TOO_WEAK = "rule_too_weak"
    FIELD_NOT_PERMITTED = "field_not_permitted"
    FIELD_NEVER_DISCLOSED = "field_never_disclosed"
    BUDGET_EXHAUSTED = "budget_exhausted"
    DISCLOSURE_CAP_REACHED = "disclosure_cap_reached"
    SESSION_TOO_LARGE = "session_too_large"
    MODE_NOT_PERMITTED = "mode_not_permitted"
    #: Epoch mode: the authorization allows more evaluations than the epoch's tag-set
    #: fingerprints were sized for (its false-positive bound would not hold).
    EPOCH_EVALUATIONS_EXCEEDED = "epoch_evaluations_exceeded"
    #: An aggregate release whose contributing records differ from an earlier release to the
    #: same requester by fewer than ``min_aggregate_count`` (a differencing attempt).
    RELEASE_OVERLAP = "release_overlap"
    #: The authorization pins an evaluation key the custodian's policy refuses, or does not
    #: pin one its policy requires; or it pins a key that is not this custodian's.
    VERIFIABLE_EVALUATION_NOT_PERMITTED = "verifiable_evaluation_not_permitted"
    EVALUATION_KEY_MISMATCH = "evaluation_key_mismatch"
    #: The authorization asks for corroboration the custodian's policy refuses, or lacks
    #: the corroboration its policy requires, or the session's rules cannot corroborate.
    CORROBORATION_NOT_PERMITTED = "corroboration_not_permitted"
    MALFORMED = "malformed"
    #: A session id the ledger cannot open for this request (used, held, or changed); one
    #: reason and one message whoever holds it, so it is no oracle on which ids exist.
    SESSION_ID_UNAVAILABLE = "session_id_unavailable"


REFUSAL_CATEGORY: dict[Reason, str] = {
    Reason.UNTRUSTED_SIGNER: "unauthenticated",
    Reason.BAD_SIGNATURE: "unauthenticated",
    Reason.REQUESTER_MISMATCH: "permission_denied",
    Reason.CUSTODIAN_MISMATCH: "permission_denied",
    Reason.TIER_NOT_PERMITTED: "permission_denied",
    Reason.ENGINE_NOT_PERMITTED: "permission_denied",
    Reason.RULE_NOT_PERMITTED: "permission_denied",
    Reason.RULE_TOO_WEAK: "permission_denied",
    Reason.FIELD_NOT_PERMITTED: "permission_denied",
    Reason.FIELD_NEVER_DISCLOSED: "permission_denied",
    Reason.NOT_YET_VALID: "failed_precondition",
    Reason.EXPIRED: "failed_precondition",
    Reason.BUDGET_EXHAUSTED: "resource_exhausted",
    Reason.DISCLOSURE_CAP_REACHED: "resource_exhausted",
    Reason.SESSION_TOO_LARGE: "resource_exhausted",
    Reason.MODE_NOT_PERMITTED: "failed_precondition",
    Reason.EPOCH_EVALUATIONS_EXCEEDED: "failed_precondition",
    Reason.RELEASE_OVERLAP: "permission_denied",
    Reason.VERIFIABLE_EVALUATION_NOT_PERMITTED: "failed_precondition",
    Reason.EVALUATION_KEY_MISMATCH: "failed_precondition",
    Reason.CORROBORATION_NOT_PERMITTED: "failed_precondition",
    Reason.RULE_UNKNOWN: "invalid_argument",
    Reason.ENGINE_UNKNOWN: "invalid_argument",
    Reason.MALFORMED: "invalid_argument",
    Reason.SESSION_ID_UNAVAILABLE: "failed_precondition",
}


@dataclass(frozen=True)
class Refused:
    """One refusal: why (machine-readable) and what exactly (for the operator)."""

    reason: Reason
    message: str

    def __post_init__(self) -> None:
        _set(self, "reason", _check_enum("reason", Reason, self.reason))
        _check_str("message", self.message)


@dataclass(frozen=True)
class Decision:
    """The outcome of a policy check; ``allowed`` is true exactly when nothing was refused."""

    allowed: bool
    refusals: tuple[Refused, ...] = field(default=())

    def __post_init__(self) -> None:
        refusals = tuple(self.refusals)
        if not all(isinstance(r, Refused) for r in refusals):
            raise ValueError("refusals must be Refused instances")
        _set(self, "refusals", refusals)
        if bool(self.allowed) != (not refusals):
            raise ValueError("a Decision is allowed if and only if it has no refusals")

    @classmethod
    def allow(cls) -> Decision:
        return cls(True, ())

    @classmethod
    def refuse(cls, *refusals: Refused) -> Decision:
        if not refusals:
            raise ValueError("a refusal needs at least one reason")
        return cls(False, refusals)

    def __bool__(self) -> bool:
        # Guards against `if decide(...):` silently passing on a refused decision.
        return self.allowed

    @property
    def reasons(self) -> tuple[Reason, ...]:
        return tuple(r.reason for r in self.refusals)

    @property
    def message(self) -> str:
        return "; ".join(r.message for r in self.refusals)

    def raise_if_refused(self) -> None:
        """Raise :class:`PolicyRefusal` carrying every reason, or return if allowed."""
        if not self.allowed:
            raise PolicyRefusal(self.message, reasons=tuple(str(r) for r in self.reasons))


@dataclass(frozen=True)
class SessionRequest:
    """What the requester asks for when opening a session (``peer_id`` comes from mTLS)."""

    peer_id: str
    tier: Tier
    match_rules: tuple[str, ...]
    disclosure_fields: tuple[str, ...]
    query_count: int
    engine: str = Engine.OPRF.value
    #: The value column an aggregate-tier session sums ("" in every other tier).
    value_field: str = ""

    def __post_init__(self) -> None:
        _check_str("peer_id", self.peer_id, allow_empty=True)
        _set(self, "tier", _check_enum("tier", Tier, self.tier))
        # Duplicates and emptiness are reported by decide() as `malformed`, not raised here,
        # so the requester hears about them as a policy refusal.
        for name in ("match_rules", "disclosure_fields"):
            value = getattr(self, name)
            if isinstance(value, str | bytes | bytearray) or not isinstance(value, list | tuple):
                raise ValueError(f"{name} must be a list or tuple of strings")
            _set(self, name, tuple(_check_str(f"{name} item", v, allow_empty=True) for v in value))
        _check_int("query_count", self.query_count)
        _check_str("engine", self.engine, allow_empty=True)
        _check_str("value_field", self.value_field, allow_empty=True)


def _duplicates(items: tuple[str, ...]) -> list[str]:
    seen: set[str] = set()
    dups: list[str] = []
    for item in items:
        if item in seen and item not in dups:
            dups.append(item)
        seen.add(item)
    return dups


def _utc(seconds: float) -> str:
    """Timestamps in refusal messages are read by people: ISO 8601, UTC."""
    return _dt.datetime.fromtimestamp(int(seconds), _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- limit rules
#
# The arithmetic of the budget and the disclosure cap, written once.  Sessions apply it
# through ``decide`` / ``check_evaluation`` / ``check_disclosure`` before anything is done;
# every ledger applies the same functions again inside its atomic write
# (``protocol.accounting.rules``), because only the ledger sees concurrent sessions of one
# authorization at once.  That second application is defence in depth, never a different
# rule (docs/architecture.md, Policy).


def within_budget(remaining: int, units: int) -> bool:
    """May ``units`` more budget units be taken when ``remaining`` are left?"""
    return 0 <= units <= remaining


def cap_allows_another(max_disclosures: int, disclosed: int) -> bool:
    """May one more *distinct* record be disclosed after ``disclosed`` of ``max_disclosures``?

    Repeats of an already-disclosed record do not count against the cap (they are audited).
    """
    return disclosed < max_disclosures


def decide(
    signed: SignedAuthorization,
    request: SessionRequest,
    policy: CustodianPolicy,
    *,
    now: float,
    budget_remaining: int,
    named_subjects_ready: bool = False,
    engine_traits: Mapping[str, EngineTraits] = BUILTIN_ENGINE_TRAITS,
    served_tiers: Collection[Tier] | None = None,
    served_engines: Collection[str] | None = None,
    evaluation_key: bytes | None = None,
) -> Decision:
    """Decide whether a session may open. Collects every refusal so operators see them all.

    Order: signer trusted, signature, validity window, identities, tier/engine, rules, fields,
    budget. Signature failures stop evaluation, since nothing in an unverified authorization can
    be trusted.  ``engine_traits`` are the traits of the engines the caller can run, by name
    (docs/architecture.md, Engines); an engine missing from it is refused as unknown.
    ``served_tiers`` / ``served_engines`` are what the session asked to open can run (its
    tier module declares them; ``None`` = no restriction): a request outside them is refused
    here, with a reason, rather than by the session (docs/architecture.md, Policy).
    ``evaluation_key`` is the custodian's POPRF public key, which a pinned key must equal.
    """
    if not isinstance(policy, CustodianPolicy):
        raise ValueError("policy must be a CustodianPolicy")
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise ValueError(f"now must be a finite number of unix seconds, got {now!r}")
    if isinstance(budget_remaining, bool) or not isinstance(budget_remaining, int):
        raise ValueError("budget_remaining must be an integer")
    if not isinstance(signed, SignedAuthorization):
        return Decision.refuse(
            Refused(Reason.MALFORMED, "the presented authorization is not a signed authorization")
        )
    if not isinstance(request, SessionRequest):
        return Decision.refuse(Refused(Reason.MALFORMED, "the session request is malformed"))

    auth = signed.authorization

    # 1-2: authenticity. Nothing below is meaningful if these fail.
    authority_key = policy.trusted_authorities.get(auth.authority_key_id)
    if authority_key is None:
        return Decision.refuse(
            Refused(
                Reason.UNTRUSTED_SIGNER,
                f"authorization {auth.authorization_id} is signed by authority key "
                f"{auth.authority_key_id}, which custodian {policy.custodian_id} does not trust",
            )
        )
    if not verify_authorization_signature(signed, authority_key):
        return Decision.refuse(
            Refused(
                Reason.BAD_SIGNATURE,
                f"the signature on authorization {auth.authorization_id} does not verify under "
                f"authority key {auth.authority_key_id}; it was altered or forged",
            )
        )

    refusals: list[Refused] = []

    def refuse(reason: Reason, message: str) -> None:
        refusals.append(Refused(reason, message))

    # 3: validity window (skew tolerated only at the start, never past the end).
    if not now >= auth.not_before - policy.clock_skew_s:
        refuse(
            Reason.NOT_YET_VALID,
            f"authorization {auth.authorization_id} is not valid before {_utc(auth.not_before)} "
            f"(now {_utc(now)}, clock skew allowance {policy.clock_skew_s}s)",
        )
    if not now <= auth.not_after:
        refuse(
            Reason.EXPIRED,
            f"authorization {auth.authorization_id} expired at {_utc(auth.not_after)} "
            f"(now {_utc(now)})",
        )

    # 4: identities.
    if request.peer_id != auth.requester_id:
        refuse(
            Reason.REQUESTER_MISMATCH,
            f"authorization {auth.authorization_id} was issued to requester "
            f"{auth.requester_id!r}, but the authenticated peer is {request.peer_id!r}",
        )
    if auth.custodian_id != policy.custodian_id:
        refuse(
            Reason.CUSTODIAN_MISMATCH,
            f"authorization {auth.authorization_id} is addressed to custodian "
            f"{auth.custodian_id!r}, not to {policy.custodian_id!r}",
        )

    # 5: tier and engine.
    if request.tier != auth.tier:
        refuse(
            Reason.TIER_NOT_PERMITTED,
            f"requested tier {request.tier.value!r} but authorization {auth.authorization_id} "
            f"permits only tier {auth.tier.value!r}",
        )
    if request.tier not in policy.allowed_tiers:
        refuse(
            Reason.TIER_NOT_PERMITTED,
            f"custodian policy does not permit tier {request.tier.value!r}",
        )
    if request.engine not in auth.engines:
        refuse(
            Reason.ENGINE_NOT_PERMITTED,
            f"match engine {request.engine!r} is not permitted by authorization "
            f"{auth.authorization_id} (permitted: {', '.join(auth.engines)})",
        )
    if request.engine not in policy.allowed_engines:
        refuse(
            Reason.ENGINE_NOT_PERMITTED,
            f"custodian policy does not permit match engine {request.engine!r}",
        )
    if served_tiers is not None and request.tier not in served_tiers:
        refuse(
            Reason.TIER_NOT_PERMITTED,
            f"tier {request.tier.value!r} is not served by this session (it serves "
            f"{', '.join(sorted(t.value for t in served_tiers))})",
        )
    if served_engines is not None and request.engine not in served_engines:
        refuse(
            Reason.ENGINE_NOT_PERMITTED,
            f"match engine {request.engine!r} is not run by the {request.tier.value} session "
            f"(it runs {', '.join(sorted(served_engines))})",
        )

    # The engine's properties come from its own declaration (``engine_traits``, which the
    # caller takes from the engine registry): policy never compares engine names.
    traits = engine_traits.get(request.engine)
    if traits is None:
        refuse(
            Reason.ENGINE_UNKNOWN,
            f"match engine {request.engine!r} is not known to this custodian "
            f"(known: {', '.join(sorted(engine_traits))})",
        )
    elif auth.mode is Mode.NAMED_SUBJECTS and not traits.group_element_inputs:
        refuse(
            Reason.ENGINE_NOT_PERMITTED,
            f"named-subject authorization {auth.authorization_id} runs only on an engine "
            f"whose inputs are group elements (its tokens are), not {request.engine!r}",
        )

    # 5a: the index mode (docs/architecture.md, National custodian).  An engine declares the
    # index it matches against; the identity tier serves only the policy's.
    if traits is not None and request.tier is Tier.IDENTITY:
        refusals.extend(_index_mode_refusals(auth, request, policy, traits))

    # 5c: verifiable evaluation (docs/architecture.md, Verifiable evaluation).
    refusals.extend(_verifiable_refusals(auth, request, policy, traits, evaluation_key))
    # 5d: corroborated disclosure (docs/architecture.md, Recall and misidentification).
    refusals.extend(_corroboration_refusals(auth, request, policy, traits))

    # 5b: a named-subject authorization is served only in the identity tier (the other tiers
    # have no per-subject tokens), and only with a certification of the custodian's records
    # under that authority's token key (see protocol/engines/named.py).
    if auth.mode is Mode.NAMED_SUBJECTS and request.tier is not Tier.IDENTITY:
        refuse(
            Reason.MODE_NOT_PERMITTED,
            f"authorization {auth.authorization_id} is named_subjects; tier "
            f"{request.tier.value!r} serves bulk authorizations only (it has no per-subject "
            "tokens)",
        )
    elif auth.mode is Mode.NAMED_SUBJECTS and not named_subjects_ready:
        refuse(
            Reason.MODE_NOT_PERMITTED,
            f"authorization {auth.authorization_id} is named_subjects but this custodian holds "
            f"no certification for authority key {auth.authority_key_id}",
        )

    # 6: match rules.
    if not request.match_rules:
        refuse(Reason.MALFORMED, "the session request names no match rule")
    for dup in _duplicates(request.match_rules):
        refuse(Reason.MALFORMED, f"match rule {dup!r} is requested more than once")
    for rule_id in dict.fromkeys(request.match_rules):
        rule = MATCH_RULES.get(rule_id)
        if rule is None:
            refuse(
                Reason.RULE_UNKNOWN,
                f"match rule {rule_id!r} is unknown (known rules: {', '.join(MATCH_RULES)})",
            )
            continue
        if rule_id not in auth.match_rules:
            refuse(
                Reason.RULE_NOT_PERMITTED,
                f"match rule {rule_id!r} is not permitted by authorization "
                f"{auth.authorization_id} (permitted: {', '.join(auth.match_rules)})",
            )
        strength = Strength(rule.strength)
        corroborated = auth.corroboration is not None and policy.weak_rules_when_corroborated
        if (strength < policy.min_rule_strength and rule_id not in policy.allowed_weak_rules
                and not corroborated):
            refuse(
                Reason.RULE_TOO_WEAK,
                f"match rule {rule_id!r} is {strength.name}; custodian policy requires at "
                f"least {policy.min_rule_strength.name}",
            )

    # 7: disclosure fields.
    for dup in _duplicates(request.disclosure_fields):
        refuse(Reason.MALFORMED, f"field {dup!r} is requested more than once")
    for name in dict.fromkeys(request.disclosure_fields):
        if name not in DISCLOSABLE_FIELDS:
            refuse(
                Reason.MALFORMED,
                f"field {name!r} is not a disclosable field "
                f"(known fields: {', '.join(DISCLOSABLE_FIELDS)})",
            )
            continue
        if request.tier is not Tier.IDENTITY:
            refuse(
                Reason.FIELD_NOT_PERMITTED,
                f"field {name!r} cannot be disclosed: tier {request.tier.value!r} discloses no "
                "record fields",
            )
        elif name not in auth.disclosure_fields:
            refuse(
                Reason.FIELD_NOT_PERMITTED,
                f"field {name!r} is not permitted for disclosure by authorization "
                f"{auth.authorization_id}",
            )
        if name in policy.never_disclose:
            refuse(
                Reason.FIELD_NEVER_DISCLOSED,
                f"custodian policy never discloses field {name!r}",
            )

    # 7b: the value column an aggregate sums.
    refusals.extend(_value_field_refusals(request, auth, policy))

    # 8: budget. The authorization's own cap bounds whatever the ledger reports.
    remaining = max(0, min(budget_remaining, auth.max_evaluations))
    if not within_budget(remaining, request.query_count):
        refuse(
            Reason.BUDGET_EXHAUSTED,
            f"session asks to evaluate {request.query_count:,} queries but only {remaining:,} "
            f"of the {auth.max_evaluations:,} permitted by authorization {auth.authorization_id} "
            "remain",
        )
    if request.query_count > policy.max_session_queries:
        refuse(
            Reason.SESSION_TOO_LARGE,
            f"session asks to evaluate {request.query_count:,} queries; custodian policy "
            f"allows at most {policy.max_session_queries:,} per session",
        )

    return Decision(not refusals, tuple(refusals))


def _index_mode_refusals(auth: Authorization, request: SessionRequest,
                         policy: CustodianPolicy, traits: EngineTraits) -> list[Refused]:
    """The engine must match against the index the custodian keeps; in epoch mode the
    authorization's evaluations must fit the cap its fingerprints were sized for."""
    if traits.index is not policy.index_mode:
        if policy.index_mode is IndexMode.EPOCH:
            why = (f"custodian {policy.custodian_id} serves the key-epoch index of epoch "
                   f"{policy.epoch_id}; match engine {request.engine!r} needs a per-"
                   "authorization index (its per-session work grows with the custodian's "
                   "records, which at national scale is refused)")
        else:
            why = (f"match engine {request.engine!r} matches against a key-epoch index, but "
                   f"custodian {policy.custodian_id} keeps per-authorization indexes only")
        return [Refused(Reason.ENGINE_NOT_PERMITTED, why)]
    if policy.index_mode is IndexMode.EPOCH and auth.max_evaluations > policy.epoch_max_evaluations:
        return [Refused(
            Reason.EPOCH_EVALUATIONS_EXCEEDED,
            f"authorization {auth.authorization_id} allows {auth.max_evaluations:,} "
            f"evaluations; epoch {policy.epoch_id} tag-set fingerprints are sized for at most "
            f"{policy.epoch_max_evaluations:,} per authorization (false-positive bound "
            "2^-40)")]
    return []


def _verifiable_refusals(auth: Authorization, request: SessionRequest,
                         policy: CustodianPolicy, traits: EngineTraits | None,
                         evaluation_key: bytes | None) -> list[Refused]:
    """A pinned key must be allowed by policy, be this custodian's, and run on an engine
    that evaluates verifiably; a policy that requires the pin refuses authorizations
    without one."""
    stance = policy.verifiable_evaluation
    if auth.evaluation_key is None:
        if stance is VerifiableEvaluation.REQUIRED and request.tier is Tier.IDENTITY:
            return [Refused(
                Reason.VERIFIABLE_EVALUATION_NOT_PERMITTED,
                f"custodian {policy.custodian_id} requires verifiable evaluation, but "
                f"authorization {auth.authorization_id} pins no evaluation key")]
        return []
    if stance is VerifiableEvaluation.REFUSED:
        return [Refused(
            Reason.VERIFIABLE_EVALUATION_NOT_PERMITTED,
            f"authorization {auth.authorization_id} pins an evaluation key, but custodian "
            f"{policy.custodian_id}'s policy refuses verifiable evaluation")]
    refusals = []
    if traits is not None and not traits.verifiable_evaluation:
        refusals.append(Refused(
            Reason.ENGINE_NOT_PERMITTED,
            f"authorization {auth.authorization_id} pins an evaluation key, but match engine "
            f"{request.engine!r} does not evaluate verifiably"))
    if evaluation_key is None or not hmac.compare_digest(evaluation_key, auth.evaluation_key):
        refusals.append(Refused(
            Reason.EVALUATION_KEY_MISMATCH,
            f"authorization {auth.authorization_id} pins evaluation key "
            f"{auth.evaluation_key.hex()[:16]}..., which is not custodian "
            f"{policy.custodian_id}'s evaluation key"))
    return refusals


def _corroboration_refusals(auth: Authorization, request: SessionRequest,
                            policy: CustodianPolicy, traits: EngineTraits | None
                            ) -> list[Refused]:
    """Corroboration must be allowed (or, where required, present), run on an engine that
    can check a group's proofs against one record, and be reachable with the session's
    rules (``k`` of them pairwise independent)."""
    stance, k = policy.corroboration, auth.corroboration
    if k is None:
        if stance is Corroboration.REQUIRED and request.tier is Tier.IDENTITY:
            return [Refused(
                Reason.CORROBORATION_NOT_PERMITTED,
                f"custodian {policy.custodian_id} requires corroborated disclosure, but "
                f"authorization {auth.authorization_id} does not ask for it")]
        return []
    if stance is Corroboration.REFUSED:
        return [Refused(
            Reason.CORROBORATION_NOT_PERMITTED,
            f"authorization {auth.authorization_id} asks for corroboration by {k} rules, but "
            f"custodian {policy.custodian_id}'s policy refuses corroborated disclosure")]
    refusals = []
    if traits is not None and not traits.corroborated_disclosure:
        refusals.append(Refused(
            Reason.ENGINE_NOT_PERMITTED,
            f"authorization {auth.authorization_id} asks for corroboration, but match engine "
            f"{request.engine!r} cannot check that a group of proofs names one record of "
            "one query"))
    known = [r for r in dict.fromkeys(request.match_rules) if r in MATCH_RULES]
    if corroborating_group(known, k) is None:
        refusals.append(Refused(
            Reason.CORROBORATION_NOT_PERMITTED,
            f"authorization {auth.authorization_id} asks for corroboration by {k} "
            f"independent rules, but the session's rules ({', '.join(request.match_rules)}) "
            f"hold no {k} pairwise independent ones"))
    return refusals


def check_disclosure_group(auth: Authorization, session_rules: Collection[str],
                           group_rules: Sequence[str]) -> DisclosureRejection | None:
    """Why a group of disclosure items (their rules, in order) may not disclose, or None.

    Without corroboration every item stands alone (a group of one); with it a group needs
    at least ``auth.corroboration`` distinct, opened, pairwise independent rules, and at
    most one item per opened rule.  Whether the proofs hold and name one record is the
    engine's to say after this."""
    k = auth.corroboration
    if any(r not in session_rules for r in group_rules):
        return DisclosureRejection.RULE_NOT_OPENED
    if k is None:
        return None if len(group_rules) == 1 else DisclosureRejection.CORROBORATION_NOT_AUTHORIZED
    if len(group_rules) > min(len(session_rules), MAX_CORROBORATION):
        return DisclosureRejection.CORROBORATION_GROUP_OVERSIZED
    if len(set(group_rules)) != len(group_rules):
        return DisclosureRejection.CORROBORATION_RULE_REPEATED
    if len(group_rules) == 1:
        return DisclosureRejection.CORROBORATION_REQUIRED
    if len(group_rules) < k:
        return DisclosureRejection.CORROBORATION_TOO_FEW_RULES
    if not independent_group(group_rules):
        return DisclosureRejection.CORROBORATION_RULES_NOT_INDEPENDENT
    return None


def _value_field_refusals(
    request: SessionRequest, auth: Authorization, policy: CustodianPolicy
) -> list[Refused]:
    """The aggregate tier sums exactly the value column the authorization names
    (``value_field``) and the custodian does not bar; no other tier sums anything."""
    value_field = request.value_field
    if request.tier is not Tier.AGGREGATE:
        if not value_field:
            return []
        return [Refused(
            Reason.FIELD_NOT_PERMITTED,
            f"tier {request.tier.value!r} sums nothing; value field {value_field!r} refused",
        )]
    if not value_field:
        return [Refused(Reason.MALFORMED, "the aggregate tier needs a value field to sum")]
    out: list[Refused] = []
    if value_field in PERSON_FIELDS or value_field == RECORD_CLASS_FIELD:
        out.append(Refused(
            Reason.FIELD_NOT_PERMITTED,
            f"{value_field!r} is a person field; only value columns can be summed",
        ))
    elif value_field != auth.value_field:
        out.append(Refused(
            Reason.FIELD_NOT_PERMITTED,
            f"value field {value_field!r} is not the one authorization "
            f"{auth.authorization_id} permits to sum ({auth.value_field or 'none'!r})",
        ))
    if value_field in policy.never_disclose:
        out.append(Refused(
            Reason.FIELD_NEVER_DISCLOSED,
            f"custodian policy never releases field {value_field!r}, not even summed",
        ))
    return out


def _authorization_of(signed_or_auth: SignedAuthorization | Authorization) -> Authorization:
    if isinstance(signed_or_auth, SignedAuthorization):
        return signed_or_auth.authorization
    if isinstance(signed_or_auth, Authorization):
        return signed_or_auth
    raise ValueError("expected an Authorization or SignedAuthorization")


def check_disclosure(
    signed_or_auth: SignedAuthorization | Authorization,
    disclosed_so_far: int,
    *,
    now: float,
) -> Decision:
    """May one more record be disclosed? Called before each disclosure is recorded.

    Assumes :func:`decide` already authenticated the authorization when the session opened.
    """
    auth = _authorization_of(signed_or_auth)
    _check_int("disclosed_so_far", disclosed_so_far)
    refusals: list[Refused] = []
    if not cap_allows_another(auth.max_disclosures, disclosed_so_far):
        refusals.append(
            Refused(
                Reason.DISCLOSURE_CAP_REACHED,
                f"authorization {auth.authorization_id} permits {auth.max_disclosures:,} "
                f"disclosures and {disclosed_so_far:,} have been made",
            )
        )
    refusals.extend(check_repeat_disclosure(auth, now=now).refusals)
    return Decision(not refusals, tuple(refusals))


def check_repeat_disclosure(
    signed_or_auth: SignedAuthorization | Authorization, *, now: float
) -> Decision:
    """May a record already disclosed under this authorization be presented again?

    Only the validity window applies: a repeat discloses nothing the requester was not
    already given, so the cap does not withhold it.  This is what lets a requester whose
    reply was lost after the cap was reached fetch it again (docs/architecture.md,
    Accounting: Replays).
    """
    auth = _authorization_of(signed_or_auth)
    _check_now(now)
    if now <= auth.not_after:
        return Decision.allow()
    return Decision.refuse(
        Refused(
            Reason.EXPIRED,
            f"authorization {auth.authorization_id} expired at {_utc(auth.not_after)} "
            f"(now {_utc(now)}); no further disclosures",
        )
    )


def _check_now(now: object) -> None:
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise ValueError(f"now must be a finite number of unix seconds, got {now!r}")


def check_message(
    signed_or_auth: SignedAuthorization | Authorization,
    *,
    peer_id: str,
    now: float,
    policy: CustodianPolicy,
    window: bool = True,
) -> Decision:
    """May this message of an open session be served? The gate every message after open passes.

    ``decide`` let the session open; this keeps the answer true for its whole life: the
    transport-authenticated ``peer_id`` must still be the requester the authorization names
    (session ownership), and, for a message that uses the authorization (``window``: evaluate,
    stream, reveal, disclose), ``now`` must be inside its validity window.  Messages that only
    account for work already done (close, countersign) pass ``window=False``: a receipt is
    owed even after expiry.  Assumes ``decide`` authenticated the authorization at open.
    """
    auth = _authorization_of(signed_or_auth)
    _check_now(now)
    refusals: list[Refused] = []
    if peer_id != auth.requester_id:
        refusals.append(Refused(
            Reason.REQUESTER_MISMATCH,
            f"the session under authorization {auth.authorization_id} belongs to requester "
            f"{auth.requester_id!r}, but the authenticated peer is {peer_id!r}",
        ))
    if window and not now >= auth.not_before - policy.clock_skew_s:
        refusals.append(Refused(
            Reason.NOT_YET_VALID,
            f"authorization {auth.authorization_id} is not valid before "
            f"{_utc(auth.not_before)} (now {_utc(now)})",
        ))
    if window and not now <= auth.not_after:
        refusals.append(Refused(
            Reason.EXPIRED,
            f"authorization {auth.authorization_id} expired at {_utc(auth.not_after)} "
            f"(now {_utc(now)}) while its session was open; nothing more is served",
        ))
    return Decision(not refusals, tuple(refusals))


def check_evaluation(
    signed_or_auth: SignedAuthorization | Authorization,
    *,
    reserved: int,
    evaluated: int,
    units: int,
) -> Decision:
    """May ``units`` more budget units be evaluated in a session that reserved ``reserved``?

    The decision is made here, before the ledger counts; the ledger's own check of the
    reservation (``record_evaluation``) is defence in depth, not a second decider.
    """
    auth = _authorization_of(signed_or_auth)
    for name, value in (("reserved", reserved), ("evaluated", evaluated), ("units", units)):
        _check_int(name, value)
    if within_budget(reserved - evaluated, units):
        return Decision.allow()
    return Decision.refuse(Refused(
        Reason.BUDGET_EXHAUSTED,
        f"the session asks to evaluate {units:,} more units, but only "
        f"{max(reserved - evaluated, 0):,} of the {reserved:,} it reserved under authorization "
        f"{auth.authorization_id} remain",
    ))


def permitted_fields(
    auth: Authorization | SignedAuthorization, policy: CustodianPolicy
) -> tuple[str, ...]:
    """Fields that may actually be released: authorized, known, and not barred by the custodian.

    Only the identity tier discloses record fields; other tiers get an empty tuple.
    """
    authorization = _authorization_of(auth)
    if authorization.tier is not Tier.IDENTITY:
        return ()
    return tuple(
        name
        for name in authorization.disclosure_fields
        if name in DISCLOSABLE_FIELDS and name not in policy.never_disclose
    )
