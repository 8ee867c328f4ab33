"""Tests for policy.decide: signed authorizations, custodian policy and the decision function."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st

from protocol.adapters.files import read_policy, write_policy
from protocol.crypto import oprf
from protocol.domain.records import DISCLOSABLE_FIELDS, MATCH_RULES, Strength
from protocol.errors import PolicyRefusal
from protocol.policy import decide as pol
from protocol.policy.decide import (
    REFUSAL_CATEGORY,
    Authorization,
    CustodianPolicy,
    Decision,
    Mode,
    Reason,
    Refused,
    SessionRequest,
    SignedAuthorization,
    Tier,
    authority_key_id,
    check_disclosure,
    check_evaluation,
    check_message,
    decide,
    new_authorization_id,
    permitted_fields,
    sign_authorization,
)

# Fixed keys keep the suite deterministic and fast.
AUTHORITY = Ed25519PrivateKey.from_private_bytes(bytes([1]) * 32)
SECOND_AUTHORITY = Ed25519PrivateKey.from_private_bytes(bytes([2]) * 32)
ROGUE = Ed25519PrivateKey.from_private_bytes(bytes([3]) * 32)
KID = authority_key_id(AUTHORITY.public_key())
SECOND_KID = authority_key_id(SECOND_AUTHORITY.public_key())
ROGUE_KID = authority_key_id(ROGUE.public_key())

NOT_BEFORE = 1_750_000_000
NOT_AFTER = NOT_BEFORE + 90 * 86_400
NOW = NOT_BEFORE + 3_600
BUDGET = 1_300_000


EVALUATION_PK = oprf.derive_key_pair_mode(bytes(32), b"policy test", oprf.MODE_POPRF)[1]
OTHER_EVALUATION_PK = oprf.derive_key_pair_mode(bytes(32), b"other", oprf.MODE_POPRF)[1]


def make_auth(**changes: Any) -> Authorization:
    base: dict[str, Any] = {
        "authorization_id": "auth-0001",
        "authority_key_id": KID,
        "requester_id": "agency-a",
        "custodian_id": "agency-b",
        "statute": "26 U.S.C. 6103(i)(2)",
        "purpose": "locate named subjects of a criminal investigation",
        "not_before": NOT_BEFORE,
        "not_after": NOT_AFTER,
        "tier": Tier.IDENTITY,
        "max_evaluations": BUDGET,
        "max_disclosures": 50_000,
        "match_rules": ("tin+dob", "first+last+dob+zip", "first+last+address"),
        "disclosure_fields": ("first_name", "last_name", "address", "zip", "tin"),
        "retention_days": 30,
    }
    base.update(changes)
    return Authorization(**base)


def make_signed(key: Ed25519PrivateKey = AUTHORITY, **changes: Any) -> SignedAuthorization:
    changes.setdefault("authority_key_id", authority_key_id(key.public_key()))
    return sign_authorization(make_auth(**changes), key)


def make_request(**changes: Any) -> SessionRequest:
    base: dict[str, Any] = {
        "peer_id": "agency-a",
        "tier": Tier.IDENTITY,
        "match_rules": ("tin+dob",),
        "disclosure_fields": ("last_name", "address"),
        "query_count": 1_000,
    }
    base.update(changes)
    return SessionRequest(**base)


def make_policy(**changes: Any) -> CustodianPolicy:
    return CustodianPolicy.trusting(
        changes.pop("custodian_id", "agency-b"),
        [AUTHORITY.public_key(), SECOND_AUTHORITY.public_key()],
        **changes,
    )


def run(
    signed: SignedAuthorization | None = None,
    request: SessionRequest | None = None,
    policy: CustodianPolicy | None = None,
    *,
    now: float = NOW,
    budget_remaining: int = BUDGET,
    named_subjects_ready: bool = True,
    evaluation_key: bytes | None = None,
) -> Decision:
    return decide(
        signed or make_signed(),
        request or make_request(),
        policy or make_policy(),
        now=now,
        budget_remaining=budget_remaining,
        named_subjects_ready=named_subjects_ready,
        evaluation_key=evaluation_key,
    )


def tampered(signed: SignedAuthorization, **changes: Any) -> SignedAuthorization:
    """The same signature over an authorization altered after signing."""
    return SignedAuthorization(
        dataclasses.replace(signed.authorization, **changes), signed.signature
    )


# --------------------------------------------------------------------------------------------
# decide(): each reason from exactly its case
# --------------------------------------------------------------------------------------------

REASON_CASES: list[tuple[str, Reason, dict[str, Any]]] = [
    (
        "named-subject authorization without a certification",
        Reason.MODE_NOT_PERMITTED,
        {
            "signed": lambda: make_signed(
                mode=Mode.NAMED_SUBJECTS, subject_commitment=bytes(range(32))
            ),
            "named_subjects_ready": False,
        },
    ),
    ("untrusted signer", Reason.UNTRUSTED_SIGNER, {"signed": lambda: make_signed(ROGUE)}),
    (
        "tampered purpose",
        Reason.BAD_SIGNATURE,
        {"signed": lambda: tampered(make_signed(), purpose="anything at all")},
    ),
    (
        "signature by other trusted key",
        Reason.BAD_SIGNATURE,
        {
            "signed": lambda: SignedAuthorization(
                make_auth(authority_key_id=SECOND_KID), make_signed().signature
            )
        },
    ),
    ("before window and skew", Reason.NOT_YET_VALID, {"now": NOT_BEFORE - 61}),
    ("after window", Reason.EXPIRED, {"now": NOT_AFTER + 1}),
    (
        "wrong mTLS peer",
        Reason.REQUESTER_MISMATCH,
        {"request": lambda: make_request(peer_id="agency-x")},
    ),
    (
        "addressed to another custodian",
        Reason.CUSTODIAN_MISMATCH,
        {"signed": lambda: make_signed(custodian_id="agency-c")},
    ),
    (
        "tier differs from authorization",
        Reason.TIER_NOT_PERMITTED,
        {"request": lambda: make_request(tier=Tier.CARDINALITY, disclosure_fields=())},
    ),
    (
        "tier barred by custodian",
        Reason.TIER_NOT_PERMITTED,
        {"policy": lambda: make_policy(allowed_tiers=frozenset({Tier.AGGREGATE}))},
    ),
    (
        "engine not in authorization",
        Reason.ENGINE_NOT_PERMITTED,
        {
            "request": lambda: make_request(engine="kkrt"),
            "policy": lambda: make_policy(allowed_engines=frozenset({"oprf", "kkrt"})),
        },
    ),
    (
        "engine barred by custodian",
        Reason.ENGINE_NOT_PERMITTED,
        {
            "request": lambda: make_request(engine="kkrt"),
            "signed": lambda: make_signed(engines=("oprf", "kkrt")),
        },
    ),
    (
        "engine permitted but unknown to the custodian",
        Reason.ENGINE_UNKNOWN,
        {
            "request": lambda: make_request(engine="plain-sha256"),
            "signed": lambda: make_signed(engines=("oprf", "plain-sha256")),
            "policy": lambda: make_policy(allowed_engines=frozenset({"oprf", "plain-sha256"})),
        },
    ),
    (
        "rule not in authorization",
        Reason.RULE_NOT_PERMITTED,
        {"request": lambda: make_request(match_rules=("tin+last_name",))},
    ),
    (
        "rule unknown",
        Reason.RULE_UNKNOWN,
        {"request": lambda: make_request(match_rules=("ssn+shoe_size",))},
    ),
    (
        "weak rule without opt-in",
        Reason.RULE_TOO_WEAK,
        {"request": lambda: make_request(match_rules=("first+last+address",))},
    ),
    (
        "field not in authorization",
        Reason.FIELD_NOT_PERMITTED,
        {"request": lambda: make_request(disclosure_fields=("dob",))},
    ),
    (
        "field barred by custodian",
        Reason.FIELD_NEVER_DISCLOSED,
        {"request": lambda: make_request(disclosure_fields=("tin",))},
    ),
    ("budget too small", Reason.BUDGET_EXHAUSTED, {"budget_remaining": 999}),
    (
        "session too large",
        Reason.SESSION_TOO_LARGE,
        {"policy": lambda: make_policy(max_session_queries=999)},
    ),
    (
        "epoch mode: authorization allows more evaluations than the fingerprints are sized for",
        Reason.EPOCH_EVALUATIONS_EXCEEDED,
        {
            "request": lambda: make_request(engine="oprf-epoch"),
            "signed": lambda: make_signed(engines=("oprf-epoch",)),
            "policy": lambda: make_policy(allowed_engines=frozenset({"oprf-epoch"}),
                                          index_mode="epoch", epoch_id="2026-11",
                                          epoch_max_evaluations=BUDGET - 1),
        },
    ),
    (
        "evaluation key pinned but custodian policy refuses verifiable evaluation",
        Reason.VERIFIABLE_EVALUATION_NOT_PERMITTED,
        {
            "signed": lambda: make_signed(evaluation_key=EVALUATION_PK),
            "policy": lambda: make_policy(verifiable_evaluation="refused"),
            "evaluation_key": EVALUATION_PK,
        },
    ),
    (
        "custodian policy requires verifiable evaluation, no key pinned",
        Reason.VERIFIABLE_EVALUATION_NOT_PERMITTED,
        {"policy": lambda: make_policy(verifiable_evaluation="required"),
         "evaluation_key": EVALUATION_PK},
    ),
    (
        "pinned evaluation key is not the custodian's",
        Reason.EVALUATION_KEY_MISMATCH,
        {"signed": lambda: make_signed(evaluation_key=EVALUATION_PK),
         "evaluation_key": OTHER_EVALUATION_PK},
    ),
    (
        "corroboration asked for, custodian policy refuses it",
        Reason.CORROBORATION_NOT_PERMITTED,
        {"signed": lambda: make_signed(corroboration=2),
         "request": lambda: make_request(match_rules=("tin+dob", "first+last+dob+zip")),
         "policy": lambda: make_policy(corroboration="refused")},
    ),
    ("no match rule", Reason.MALFORMED, {"request": lambda: make_request(match_rules=())}),
    (
        "duplicate rule",
        Reason.MALFORMED,
        {"request": lambda: make_request(match_rules=("tin+dob", "tin+dob"))},
    ),
    (
        "unknown field",
        Reason.MALFORMED,
        {"request": lambda: make_request(disclosure_fields=("favourite_colour",))},
    ),
]


def _run_case(spec: dict[str, Any]) -> Decision:
    kwargs = {k: (v() if callable(v) else v) for k, v in spec.items()}
    return run(**kwargs)


def test_baseline_request_is_allowed() -> None:
    decision = run()
    assert decision.allowed
    assert decision.refusals == ()
    assert decision.reasons == ()
    assert bool(decision) is True
    decision.raise_if_refused()  # must not raise


@pytest.mark.parametrize(
    ("reason", "spec"), [(r, s) for _, r, s in REASON_CASES], ids=[c[0] for c in REASON_CASES]
)
def test_each_reason_comes_from_exactly_its_case(reason: Reason, spec: dict[str, Any]) -> None:
    decision = _run_case(spec)
    assert not decision.allowed
    assert bool(decision) is False
    assert decision.reasons == (reason,)
    assert decision.refusals[0].message  # operators always get words, not just a code


def test_every_reason_has_a_producing_case() -> None:
    # produced by the session core (protocol.sessions.core), not by decide
    covered = {r for _, r, _ in REASON_CASES} | {Reason.DISCLOSURE_CAP_REACHED,
                                                  Reason.SESSION_ID_UNAVAILABLE,
                                                  Reason.RELEASE_OVERLAP}  # aggregate tier
    assert covered == set(Reason)


def test_rule_too_weak_message_names_rule_and_strengths() -> None:
    decision = run(request=make_request(match_rules=("first+last+address",)))
    assert decision.message == (
        "match rule 'first+last+address' is WEAK; custodian policy requires at least MEDIUM"
    )


def test_weak_rule_allowed_when_opted_in() -> None:
    request = make_request(match_rules=("first+last+address",))
    assert run(
        request=request, policy=make_policy(allowed_weak_rules=frozenset({"first+last+address"}))
    ).allowed
    assert run(request=request, policy=make_policy(min_rule_strength=Strength.WEAK)).allowed


def test_opt_in_does_not_bypass_the_authorization() -> None:
    signed = make_signed(match_rules=("tin+dob",))
    request = make_request(match_rules=("first+last+address",))
    policy = make_policy(allowed_weak_rules=frozenset({"first+last+address"}))
    assert run(signed, request, policy).reasons == (Reason.RULE_NOT_PERMITTED,)


def test_strong_minimum_refuses_medium_rule() -> None:
    decision = run(
        request=make_request(match_rules=("first+last+dob+zip",)),
        policy=make_policy(min_rule_strength=Strength.STRONG),
    )
    assert decision.reasons == (Reason.RULE_TOO_WEAK,)
    assert "'first+last+dob+zip' is MEDIUM" in decision.message
    assert "at least STRONG" in decision.message


def test_budget_message_carries_numbers() -> None:
    decision = run(budget_remaining=999)
    assert "1,000" in decision.message
    assert "999" in decision.message
    assert "auth-0001" in decision.message


def test_budget_is_capped_by_authorization_even_if_ledger_says_more() -> None:
    signed = make_signed(max_evaluations=500)
    decision = run(signed, budget_remaining=10**9)
    assert decision.reasons == (Reason.BUDGET_EXHAUSTED,)


def test_budget_and_session_boundaries_are_inclusive() -> None:
    assert run(budget_remaining=1_000).allowed
    assert run(policy=make_policy(max_session_queries=1_000)).allowed
    assert run(budget_remaining=-5).reasons == (Reason.BUDGET_EXHAUSTED,)


def test_validity_window_boundaries() -> None:
    assert run(now=NOT_BEFORE - 60).allowed  # exactly the skew allowance
    assert run(now=NOT_AFTER).allowed  # inclusive end, no skew past it
    assert run(now=NOT_AFTER + 0.5).reasons == (Reason.EXPIRED,)
    assert run(now=NOT_BEFORE - 1, policy=make_policy(clock_skew_s=0)).reasons == (
        Reason.NOT_YET_VALID,
    )


def test_non_finite_clock_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="now"):
        run(now=float("nan"))


def test_signature_failure_stops_evaluation() -> None:
    # Also wrong peer, unknown rule and huge query count: none of it is reported.
    signed = tampered(make_signed(), max_disclosures=10**9)
    request = make_request(peer_id="mallory", match_rules=("nope",), query_count=10**12)
    decision = run(signed, request, budget_remaining=0)
    assert decision.reasons == (Reason.BAD_SIGNATURE,)
    untrusted = run(make_signed(ROGUE), request, budget_remaining=0)
    assert untrusted.reasons == (Reason.UNTRUSTED_SIGNER,)


def test_refusals_are_collected_in_check_order() -> None:
    signed = make_signed(custodian_id="agency-c")
    request = make_request(
        peer_id="agency-x",
        match_rules=("first+last+address",),
        disclosure_fields=("tin", "dob"),
        query_count=10_000_000,
    )
    decision = run(signed, request, now=NOT_AFTER + 10, budget_remaining=5)
    assert decision.reasons == (
        Reason.EXPIRED,
        Reason.REQUESTER_MISMATCH,
        Reason.CUSTODIAN_MISMATCH,
        Reason.RULE_TOO_WEAK,
        Reason.FIELD_NEVER_DISCLOSED,
        Reason.FIELD_NOT_PERMITTED,
        Reason.BUDGET_EXHAUSTED,
        Reason.SESSION_TOO_LARGE,
    )
    assert decision.message == "; ".join(r.message for r in decision.refusals)


def test_non_identity_tier_discloses_no_fields() -> None:
    signed = make_signed(tier=Tier.AGGREGATE, disclosure_fields=(), value_field="tax_paid_cents")
    request = make_request(tier=Tier.AGGREGATE, disclosure_fields=("last_name",),
                           value_field="tax_paid_cents")
    assert run(signed, request).reasons == (Reason.FIELD_NOT_PERMITTED,)
    summed = make_request(tier=Tier.AGGREGATE, disclosure_fields=(), value_field="tax_paid_cents")
    assert run(signed, summed).allowed
    assert permitted_fields(signed, make_policy()) == ()


# --------------------------------------------------------------------------------------------
# The tier's own checks (value field, served tiers and engines, mode), made by decide()
# --------------------------------------------------------------------------------------------

AGGREGATE_SIGNED = {"tier": Tier.AGGREGATE, "disclosure_fields": (),
                    "value_field": "tax_paid_cents"}


@pytest.mark.parametrize(
    ("signed", "request_changes", "options", "reason", "words"),
    [
        ({}, {}, {}, None, ""),
        ({}, {"value_field": ""}, {}, Reason.MALFORMED, "needs a value field"),
        ({}, {"value_field": "last_name"}, {}, Reason.FIELD_NOT_PERMITTED, "is a person field"),
        ({}, {"value_field": "refund_cents"}, {}, Reason.FIELD_NOT_PERMITTED,
         "is not the one authorization"),
        ({"tier": Tier.CARDINALITY, "value_field": ""}, {"tier": Tier.CARDINALITY}, {},
         Reason.FIELD_NOT_PERMITTED, "sums nothing"),
        ({}, {}, {"served_tiers": frozenset({Tier.IDENTITY})}, Reason.TIER_NOT_PERMITTED,
         "is not served by this session"),
        ({}, {}, {"served_engines": frozenset({"kkrt"})}, Reason.ENGINE_NOT_PERMITTED,
         "is not run by the aggregate session"),
        ({"mode": Mode.NAMED_SUBJECTS, "subject_commitment": bytes(32)}, {}, {},
         Reason.MODE_NOT_PERMITTED, "serves bulk authorizations only"),
    ],
)
def test_tier_checks_are_decided_by_policy(
    signed: dict[str, Any], request_changes: dict[str, Any], options: dict[str, Any],
    reason: Reason | None, words: str,
) -> None:
    request = {"tier": Tier.AGGREGATE, "disclosure_fields": (),
               "value_field": "tax_paid_cents", **request_changes}
    decision = decide(make_signed(**{**AGGREGATE_SIGNED, **signed}), make_request(**request),
                      make_policy(), now=NOW, budget_remaining=BUDGET, **options)
    if reason is None:
        assert decision.allowed
        return
    assert decision.reasons == (reason,)
    assert words in decision.message


def test_barred_value_column_is_never_summed() -> None:
    decision = run(make_signed(**AGGREGATE_SIGNED),
                   make_request(tier=Tier.AGGREGATE, disclosure_fields=(),
                                value_field="tax_paid_cents"),
                   make_policy(never_disclose=frozenset({"tin", "tax_paid_cents"})))
    assert decision.reasons == (Reason.FIELD_NEVER_DISCLOSED,)


# --------------------------------------------------------------------------------------------
# The per-message gate: check_message() and check_evaluation()
# --------------------------------------------------------------------------------------------


def test_message_gate_allows_the_owner_inside_the_window() -> None:
    decision = check_message(make_signed(), peer_id="agency-a", now=NOW, policy=make_policy())
    assert decision.allowed


@pytest.mark.parametrize(
    ("peer", "now", "window", "reasons", "words"),
    [
        ("agency-a", NOT_AFTER + 1, True, (Reason.EXPIRED,), "while its session was open"),
        ("agency-a", NOT_AFTER, True, (), ""),  # inclusive, as at open
        ("agency-a", NOT_BEFORE - 61, True, (Reason.NOT_YET_VALID,), "not valid before"),
        ("agency-x", NOW, True, (Reason.REQUESTER_MISMATCH,), "authenticated peer is 'agency-x'"),
        ("agency-x", NOT_AFTER + 1, True, (Reason.REQUESTER_MISMATCH, Reason.EXPIRED), ""),
        # close and countersign account for finished work: owed after expiry, never to others
        ("agency-a", NOT_AFTER + 1, False, (), ""),
        ("agency-x", NOT_AFTER + 1, False, (Reason.REQUESTER_MISMATCH,), ""),
    ],
)
def test_message_gate_reasons_are_specific(
    peer: str, now: int, window: bool, reasons: tuple[Reason, ...], words: str
) -> None:
    decision = check_message(make_signed(), peer_id=peer, now=now, policy=make_policy(),
                             window=window)
    assert decision.reasons == reasons
    assert words in decision.message
    if reasons:
        with pytest.raises(PolicyRefusal) as refused:
            decision.raise_if_refused()
        assert refused.value.reasons == tuple(r.value for r in reasons)


def test_message_gate_refuses_a_non_finite_clock() -> None:
    with pytest.raises(ValueError, match="finite"):
        check_message(make_signed(), peer_id="agency-a", now=float("nan"), policy=make_policy())


def test_evaluation_gate_counts_against_the_reservation() -> None:
    signed = make_signed()
    assert check_evaluation(signed, reserved=10, evaluated=6, units=4).allowed
    refused = check_evaluation(signed, reserved=10, evaluated=6, units=5)
    assert refused.reasons == (Reason.BUDGET_EXHAUSTED,)
    assert "only 4 of the 10 it reserved" in refused.message
    with pytest.raises(ValueError, match="units"):
        check_evaluation(signed, reserved=10, evaluated=0, units=-1)


def test_wrong_object_types_are_malformed_not_crashes() -> None:
    decision = decide(
        b"not signed",
        make_request(),
        make_policy(),
        now=NOW,
        budget_remaining=1,  # type: ignore[arg-type]
    )
    assert decision.reasons == (Reason.MALFORMED,)


def test_raise_if_refused_carries_all_reasons() -> None:
    decision = run(request=make_request(peer_id="x"), budget_remaining=0)
    with pytest.raises(PolicyRefusal) as info:
        decision.raise_if_refused()
    assert info.value.reasons == ("requester_mismatch", "budget_exhausted")
    assert info.value.code == "requester_mismatch"
    assert str(info.value) == decision.message


def test_decision_invariant() -> None:
    with pytest.raises(ValueError):
        Decision(True, (Refused(Reason.EXPIRED, "x"),))
    with pytest.raises(ValueError):
        Decision(False, ())
    assert Decision.refuse(Refused("expired", "late")).reasons == (Reason.EXPIRED,)
    assert Decision.allow().allowed


# --------------------------------------------------------------------------------------------
# Tampering: every field is covered by the signature
# --------------------------------------------------------------------------------------------

NAMED_BASE = {"mode": Mode.NAMED_SUBJECTS, "subject_commitment": bytes(range(32))}

TAMPER_CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({}, {"authorization_id": "auth-0002"}),
    ({}, {"authority_key_id": SECOND_KID}),
    ({}, {"requester_id": "agency-a2"}),
    ({}, {"custodian_id": "agency-b "}),
    ({}, {"statute": "26 U.S.C. 6103(i)(1)"}),
    ({}, {"purpose": "locate named subjects of a criminal investigation."}),
    ({}, {"not_before": NOT_BEFORE - 1}),
    ({}, {"not_after": NOT_AFTER + 1}),
    ({}, {"tier": Tier.AGGREGATE}),
    ({}, {"max_evaluations": BUDGET + 1}),
    ({}, {"max_disclosures": 50_001}),
    ({}, {"match_rules": ("tin+dob", "first+last+dob+zip")}),
    ({}, {"disclosure_fields": ("last_name", "first_name", "address", "zip", "tin")}),
    ({}, {"retention_days": 31}),
    ({}, NAMED_BASE),
    (NAMED_BASE, {"subject_commitment": bytes(32)}),
    ({}, {"min_aggregate_count": 1}),
    ({}, {"engines": ("oprf", "kkrt")}),
    (AGGREGATE_SIGNED, {"value_field": "refund_cents"}),
    ({}, {"evaluation_key": EVALUATION_PK}),  # a pin added after signing
    ({}, {"corroboration": 2}),  # corroboration added after signing
]


@pytest.mark.parametrize(
    ("base", "changes"), TAMPER_CASES, ids=[str(sorted(c)) for _, c in TAMPER_CASES]
)
def test_any_field_changed_after_signing_is_bad_signature(
    base: dict[str, Any], changes: dict[str, Any]
) -> None:
    request = (make_request(tier=Tier.AGGREGATE, disclosure_fields=(),
                            value_field=base["value_field"]) if "value_field" in base else None)
    signed = make_signed(**base)
    assert run(signed, request).allowed  # the untampered one is fine
    forged = tampered(signed, **changes)
    assert forged.authorization.canonical_bytes() != signed.authorization.canonical_bytes()
    assert run(forged, request).reasons == (Reason.BAD_SIGNATURE,)


def test_tamper_cases_cover_every_field() -> None:
    changed = set().union(*(c.keys() for _, c in TAMPER_CASES))
    assert changed == {f.name for f in dataclasses.fields(Authorization)}


def test_canonical_encoding_covers_every_field_in_fixed_order() -> None:
    names = [name for name, _ in pol._CANONICAL_ENCODERS]
    assert names == [f.name for f in dataclasses.fields(Authorization)]
    raw = make_auth().canonical_bytes()
    assert raw.startswith(len(pol.AUTHORIZATION_TAG).to_bytes(8, "big") + pol.AUTHORIZATION_TAG)


def test_truncated_or_spliced_signature_is_bad() -> None:
    signed = make_signed()
    flipped = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
    assert run(SignedAuthorization(signed.authorization, flipped)).reasons == (
        Reason.BAD_SIGNATURE,
    )


def test_sign_refuses_key_that_authorization_does_not_name() -> None:
    with pytest.raises(ValueError, match="signing key"):
        sign_authorization(make_auth(authority_key_id=KID), SECOND_AUTHORITY)


def test_signature_is_domain_separated() -> None:
    auth = make_auth()
    signed = sign_authorization(auth, AUTHORITY)
    # A bare signature over the canonical bytes (no signature tag) must not be accepted.
    bare = AUTHORITY.sign(auth.canonical_bytes())
    assert bare != signed.signature
    assert run(SignedAuthorization(auth, bare)).reasons == (Reason.BAD_SIGNATURE,)
    AUTHORITY.public_key().verify(
        signed.signature, b"gated-psi/authorization-signature/v1" + auth.canonical_bytes()
    )


def test_authority_key_id_definition() -> None:
    raw = AUTHORITY.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    expected = hashlib.sha256(b"gated-psi/authority-key-id/v1" + raw).digest()[:16].hex()
    assert expected == KID
    assert len(KID) == 32
    assert KID != SECOND_KID


def test_new_authorization_id_is_random_and_prefixed() -> None:
    ids = {new_authorization_id() for _ in range(50)}
    assert len(ids) == 50
    for value in ids:
        assert value.startswith("auth-")
        assert len(value) == 5 + 32
        int(value[5:], 16)
    assert Authorization.new_authorization_id().startswith("auth-")


# --------------------------------------------------------------------------------------------
# Authorization validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"authorization_id": ""}, "authorization_id"),
        ({"requester_id": "   "}, "requester_id"),
        ({"custodian_id": 7}, "custodian_id"),
        ({"statute": ""}, "statute"),
        ({"not_before": NOT_AFTER}, "earlier"),
        ({"not_before": -1}, "not_before"),
        ({"max_evaluations": -1}, "max_evaluations"),
        ({"max_disclosures": True}, "max_disclosures"),
        ({"retention_days": 1.5}, "retention_days"),
        ({"max_evaluations": 2**64}, "max_evaluations"),
        ({"tier": "everything"}, "tier"),
        ({"match_rules": ()}, "match_rules"),
        ({"match_rules": "tin+dob"}, "match_rules"),
        ({"match_rules": ("tin+dob", "tin+dob")}, "more than once"),
        ({"disclosure_fields": ("zip", "zip")}, "more than once"),
        ({"disclosure_fields": ("zip", 3)}, "disclosure_fields"),
        ({"engines": ()}, "engines"),
        ({"mode": Mode.NAMED_SUBJECTS}, "subject_commitment"),
        ({"mode": Mode.NAMED_SUBJECTS, "subject_commitment": bytes(31)}, "32 bytes"),
        ({"mode": "partial"}, "mode"),
        ({"purpose": "\ud800"}, "UTF-8"),
    ],
)
def test_authorization_rejects_invalid_values(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_auth(**changes)


def test_authorization_coerces_friendly_inputs() -> None:
    auth = make_auth(tier="aggregate", match_rules=["tin+dob"], disclosure_fields=[])
    assert auth.tier is Tier.AGGREGATE
    assert auth.match_rules == ("tin+dob",)
    assert auth.disclosure_fields == ()
    hash(auth)  # frozen and hashable


# --------------------------------------------------------------------------------------------
# Canonical bytes and wire format (hypothesis)
# --------------------------------------------------------------------------------------------

_small_text = st.text(alphabet="ab+", min_size=1, max_size=3).filter(str.strip)
_text = st.one_of(_small_text, st.text(min_size=1, max_size=10).filter(str.strip))
_count = st.one_of(st.integers(0, 3), st.integers(0, 2**63 - 1))
_names = st.lists(_small_text, unique=True, max_size=3).map(tuple)


@st.composite
def authorizations(draw: st.DrawFn) -> Authorization:
    not_before = draw(st.integers(0, 2**40))
    mode, commitment = draw(
        st.one_of(
            st.just((Mode.BULK, None)),
            st.binary(min_size=32, max_size=32).map(lambda c: (Mode.NAMED_SUBJECTS, c)),
        )
    )
    return Authorization(
        authorization_id=draw(_text),
        authority_key_id=draw(_text),
        requester_id=draw(_text),
        custodian_id=draw(_text),
        statute=draw(_text),
        purpose=draw(_text),
        not_before=not_before,
        not_after=not_before + draw(st.integers(1, 3)),
        tier=draw(st.sampled_from(Tier)),
        max_evaluations=draw(_count),
        max_disclosures=draw(_count),
        match_rules=draw(st.lists(_small_text, unique=True, min_size=1, max_size=3).map(tuple)),
        disclosure_fields=draw(_names),
        retention_days=draw(_count),
        mode=mode,
        subject_commitment=commitment,
        min_aggregate_count=draw(_count),
        engines=draw(st.lists(_small_text, unique=True, min_size=1, max_size=2).map(tuple)),
    )


_FIELD_NAMES = [f.name for f in dataclasses.fields(Authorization)]


@settings(max_examples=200, suppress_health_check=[HealthCheck.filter_too_much])
@given(authorizations(), authorizations(), st.sampled_from(_FIELD_NAMES))
def test_canonical_bytes_change_with_any_single_field(
    base: Authorization, donor: Authorization, name: str
) -> None:
    try:
        changed = dataclasses.replace(base, **{name: getattr(donor, name)})
    except ValueError:
        reject()  # e.g. a donor not_before beyond base's not_after
    assume(changed != base)
    assert changed.canonical_bytes() != base.canonical_bytes()


@settings(max_examples=200)
@given(authorizations(), authorizations())
def test_canonical_bytes_are_injective(a: Authorization, b: Authorization) -> None:
    assert (a.canonical_bytes() == b.canonical_bytes()) == (a == b)


_TUPLE_FIELDS = ["match_rules", "disclosure_fields", "engines"]
_STRING_FIELDS = [
    "authorization_id",
    "authority_key_id",
    "requester_id",
    "custodian_id",
    "statute",
    "purpose",
]


@given(
    authorizations(),
    st.sampled_from(_TUPLE_FIELDS),
    st.lists(_small_text, min_size=2, max_size=4, unique=True),
    st.integers(0, 2),
)
def test_canonical_bytes_keep_tuple_item_boundaries(
    base: Authorization, name: str, items: list[str], at: int
) -> None:
    # Merging two neighbouring items keeps the concatenation but must change the bytes.
    at = min(at, len(items) - 2)
    merged = [*items[:at], items[at] + items[at + 1], *items[at + 2 :]]
    assume(len(set(merged)) == len(merged))
    a = dataclasses.replace(base, **{name: tuple(items)})
    b = dataclasses.replace(base, **{name: tuple(merged)})
    assert a.canonical_bytes() != b.canonical_bytes()


@given(authorizations(), st.integers(0, len(_STRING_FIELDS) - 2))
def test_canonical_bytes_keep_field_boundaries(base: Authorization, i: int) -> None:
    # Moving a character across the boundary of two adjacent fields must change the bytes.
    left, right = _STRING_FIELDS[i], _STRING_FIELDS[i + 1]
    lval, rval = getattr(base, left), getattr(base, right)
    assume(len(lval.strip()) > 1)
    moved = dataclasses.replace(base, **{left: lval[:-1], right: lval[-1] + rval})
    assert moved.canonical_bytes() != base.canonical_bytes()


def test_canonical_bytes_known_ambiguities() -> None:
    pairs = [
        ({"match_rules": ("tin+dob", "tin+last_name")}, {"match_rules": ("tin+dobtin+last_name",)}),
        ({"disclosure_fields": ("zip",)}, {"disclosure_fields": ()}),
        ({"statute": "ab", "purpose": "c"}, {"statute": "a", "purpose": "bc"}),
        ({"engines": ("oprf",)}, {"engines": ("opr", "f")}),
    ]
    for left, right in pairs:
        assert make_auth(**left).canonical_bytes() != make_auth(**right).canonical_bytes()


@given(authorizations())
def test_canonical_bytes_are_deterministic(auth: Authorization) -> None:
    again = Authorization.from_json(json.loads(json.dumps(auth.to_json())))
    assert again == auth
    assert again.canonical_bytes() == auth.canonical_bytes()


@given(authorizations(), st.binary(min_size=64, max_size=64))
def test_wire_round_trip(auth: Authorization, signature: bytes) -> None:
    signed = SignedAuthorization(auth, signature)
    wire = signed.to_bytes()
    back = SignedAuthorization.from_bytes(wire)
    assert back == signed
    assert back.to_bytes() == wire
    assert back.digest() == signed.digest()


def test_digest_binds_authorization_and_signature() -> None:
    signed = make_signed()
    assert len(signed.digest()) == 32
    other_sig = SignedAuthorization(signed.authorization, bytes(64))
    other_auth = SignedAuthorization(make_auth(retention_days=1), signed.signature)
    assert len({signed.digest(), other_sig.digest(), other_auth.digest()}) == 3
    assert signed.digest() != hashlib.sha256(signed.authorization.canonical_bytes()).digest()


@settings(max_examples=500)
@given(st.binary(max_size=512))
def test_from_bytes_rejects_garbage_with_value_error_only(data: bytes) -> None:
    try:
        parsed = SignedAuthorization.from_bytes(data)
    except ValueError as exc:
        assert str(exc)  # always an explanation for the operator
        return
    assert SignedAuthorization.from_bytes(parsed.to_bytes()) == parsed


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=400)
@given(
    st.sampled_from([*_FIELD_NAMES, "format", "signature", "extra"]),
    st.one_of(st.just("<delete>"), _json_values),
)
def test_from_bytes_rejects_mutated_documents_with_value_error_only(key: str, value: Any) -> None:
    doc = json.loads(make_signed().to_bytes())
    target = doc if key in ("format", "signature", "extra") else doc["authorization"]
    if value == "<delete>":
        target.pop(key, None)
    else:
        target[key] = value
    try:
        parsed = SignedAuthorization.from_bytes(json.dumps(doc).encode())
    except ValueError:
        return
    # Anything that parses is a well-formed object and round-trips exactly.
    assert SignedAuthorization.from_bytes(parsed.to_bytes()) == parsed


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[" * 100_000,
        b"null",
        b'{"format":"gated-psi/signed-authorization/v1"}',
        b"x" * (1 << 21),
        b'{"a":1,"a":2}',
        b'{"format":NaN}',
    ],
    ids=["empty", "not-utf8", "deep", "null", "missing-keys", "huge", "dup-keys", "nan"],
)
def test_from_bytes_known_bad_inputs(data: bytes) -> None:
    with pytest.raises(ValueError):
        SignedAuthorization.from_bytes(data)


def test_from_bytes_rejects_unsigned_extra_authorization_key() -> None:
    doc = json.loads(make_signed().to_bytes())
    doc["authorization"]["note"] = "added later"
    with pytest.raises(ValueError, match="unknown keys"):
        SignedAuthorization.from_bytes(json.dumps(doc).encode())


def test_from_bytes_then_decide() -> None:
    wire = make_signed().to_bytes()
    assert run(SignedAuthorization.from_bytes(wire)).allowed


# --------------------------------------------------------------------------------------------
# check_disclosure and permitted_fields
# --------------------------------------------------------------------------------------------


def test_check_disclosure_cap() -> None:
    signed = make_signed(max_disclosures=3)
    assert check_disclosure(signed, 2, now=NOW).allowed
    capped = check_disclosure(signed, 3, now=NOW)
    assert capped.reasons == (Reason.DISCLOSURE_CAP_REACHED,)
    assert "3" in capped.message
    assert check_disclosure(signed.authorization, 4, now=NOW).reasons == (
        Reason.DISCLOSURE_CAP_REACHED,
    )
    zero = make_auth(max_disclosures=0)
    assert check_disclosure(zero, 0, now=NOW).reasons == (Reason.DISCLOSURE_CAP_REACHED,)


def test_check_disclosure_expiry() -> None:
    signed = make_signed()
    assert check_disclosure(signed, 0, now=NOT_AFTER).allowed
    assert check_disclosure(signed, 0, now=NOT_AFTER + 1).reasons == (Reason.EXPIRED,)
    both = check_disclosure(make_auth(max_disclosures=1), 1, now=NOT_AFTER + 1)
    assert both.reasons == (Reason.DISCLOSURE_CAP_REACHED, Reason.EXPIRED)


def test_permitted_fields_order_and_exclusions() -> None:
    auth = make_auth(disclosure_fields=("zip", "tin", "last_name", "shoe_size"))
    assert permitted_fields(auth, make_policy()) == ("zip", "last_name")
    assert permitted_fields(auth, make_policy(never_disclose=frozenset())) == (
        "zip",
        "tin",
        "last_name",
    )


@given(
    st.lists(st.sampled_from(DISCLOSABLE_FIELDS), unique=True).map(tuple),
    st.frozensets(st.sampled_from(DISCLOSABLE_FIELDS)),
)
def test_permitted_fields_never_include_never_disclose(
    auth_fields: tuple[str, ...], never: frozenset[str]
) -> None:
    result = permitted_fields(
        make_auth(disclosure_fields=auth_fields), make_policy(never_disclose=never)
    )
    assert not set(result) & never
    assert set(result) == set(auth_fields) - never
    assert list(result) == [f for f in auth_fields if f in result]


# --------------------------------------------------------------------------------------------
# CustodianPolicy
# --------------------------------------------------------------------------------------------


def test_default_policy_is_conservative() -> None:
    policy = CustodianPolicy("agency-b", {})
    assert policy.min_rule_strength is Strength.MEDIUM
    assert policy.never_disclose == frozenset({"tin"})
    assert policy.allowed_tiers == frozenset(Tier)
    assert policy.allowed_engines == frozenset({"oprf"})
    assert policy.clock_skew_s == 60
    weak = [rid for rid, rule in MATCH_RULES.items() if rule.strength < Strength.MEDIUM]
    assert weak == ["first+last+address", "last_phonetic+dob+zip", "first_phonetic+dob+zip",
                    "names_phonetic+dob"]  # measured precision < 0.999 (issue 19)


def test_policy_json_and_file_round_trip(tmp_path: Any) -> None:
    policy = make_policy(
        min_rule_strength=Strength.STRONG,
        allowed_weak_rules=frozenset({"first+last+address"}),
        never_disclose=frozenset({"tin", "dob"}),
        excluded_record_classes=frozenset({"protected-witness"}),
        allowed_tiers=frozenset({Tier.IDENTITY}),
        allowed_engines=frozenset({"oprf", "kkrt"}),
        clock_skew_s=5,
        max_session_queries=10,
    )
    doc = json.loads(json.dumps(policy.to_json()))
    assert CustodianPolicy.from_json(doc) == policy
    path = tmp_path / "policy.json"
    write_policy(policy, path)
    loaded = read_policy(path)
    assert loaded == policy
    assert set(loaded.trusted_authorities) == {KID, SECOND_KID}
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind


def test_policy_from_json_defaults_and_errors() -> None:
    raw = AUTHORITY.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    minimal = CustodianPolicy.from_json(
        {"custodian_id": "agency-b", "trusted_authorities": {KID: raw.hex()}}
    )
    assert minimal.never_disclose == frozenset({"tin"})
    with pytest.raises(ValueError, match="does not match"):
        CustodianPolicy.from_json(
            {"custodian_id": "agency-b", "trusted_authorities": {SECOND_KID: raw.hex()}}
        )
    with pytest.raises(ValueError, match="unknown keys"):
        CustodianPolicy.from_json({"custodian_id": "b", "trusted_authorities": {}, "x": 1})
    with pytest.raises(ValueError, match="not a valid Ed25519"):
        CustodianPolicy.from_json({"custodian_id": "b", "trusted_authorities": {KID: "00"}})
    with pytest.raises(ValueError, match="min_rule_strength"):
        make_policy(min_rule_strength="EXTREME")


def test_policy_trust_map_is_read_only() -> None:
    policy = make_policy()
    with pytest.raises(TypeError):
        policy.trusted_authorities[ROGUE_KID] = ROGUE.public_key()  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# Refusal categories
# --------------------------------------------------------------------------------------------


def test_refusal_category_covers_every_reason() -> None:
    assert set(REFUSAL_CATEGORY) == set(Reason)
    assert set(REFUSAL_CATEGORY.values()) == {
        "unauthenticated",
        "permission_denied",
        "failed_precondition",
        "resource_exhausted",
        "invalid_argument",
    }


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        (Reason.UNTRUSTED_SIGNER, "unauthenticated"),
        (Reason.BAD_SIGNATURE, "unauthenticated"),
        (Reason.REQUESTER_MISMATCH, "permission_denied"),
        (Reason.RULE_TOO_WEAK, "permission_denied"),
        (Reason.FIELD_NEVER_DISCLOSED, "permission_denied"),
        (Reason.NOT_YET_VALID, "failed_precondition"),
        (Reason.EXPIRED, "failed_precondition"),
        (Reason.BUDGET_EXHAUSTED, "resource_exhausted"),
        (Reason.DISCLOSURE_CAP_REACHED, "resource_exhausted"),
        (Reason.SESSION_TOO_LARGE, "resource_exhausted"),
        (Reason.RULE_UNKNOWN, "invalid_argument"),
        (Reason.MALFORMED, "invalid_argument"),
    ],
)
def test_refusal_category_values(reason: Reason, category: str) -> None:
    assert REFUSAL_CATEGORY[reason] == category


def test_limit_rules_are_written_once_and_applied_by_every_ledger() -> None:
    """The budget and cap arithmetic lives in policy; the ledger rules call the same functions."""
    assert pol.within_budget(5, 5) and pol.within_budget(5, 0)
    assert not pol.within_budget(5, 6) and not pol.within_budget(0, 1)
    assert not pol.within_budget(5, -1)
    assert pol.cap_allows_another(3, 2) and not pol.cap_allows_another(3, 3)
    assert not pol.cap_allows_another(0, 0)
    import protocol.accounting.rules as ledger_rules

    assert ledger_rules.within_budget is pol.within_budget
    assert ledger_rules.cap_allows_another is pol.cap_allows_another
