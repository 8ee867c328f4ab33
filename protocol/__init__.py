"""gated-psi as a library: policy-gated private matching between two agencies.

Every name below is importable from ``protocol`` itself and loaded on first use, so
``import protocol`` stays cheap and the layers stay intact (docs/architecture.md, Layers).
A walkthrough is docs/embedding.md; runnable programs are in examples/.

Authorize (the authority, offline)
    generate_authority_key, draft_authorization -> Authorization, sign_authorization ->
    SignedAuthorization; a custodian trusts the authority's public key under its
    authority_key_id(key). Tier, Mode.

Prepare the requester's subjects
    QueryRecord(PersonRecord(...), QueryMetadata(tax_periods, statute, reason)), or
    read_query_csv_with_lines(text stream); then validate_queries(pairs, today=...) ->
    ValidationReport: its .accepted (ValidatedQueries) is what a session takes, its
    .refused says why each other record was refused. load_query_csv packs and validates
    a large file.

Hold the custodian's file and rules
    PersonRecord, read_person_csv or load_custodian_csv; CustodianPolicy(custodian_id,
    trusted_authorities={authority_key_id(pub): pub}); Ledger(path) (SQLite);
    CustodianConfig(policy, records, ledger, master_secret=32 random bytes, signing_key,
    requester_keys={requester id: its public key}) -> Custodian.

Identity tier: who matched, with the permitted fields
    RequesterSession(signed, validated queries, signing_key=...) and
    run_in_process(requester, custodian.session(), requester_id=...) -> SessionOutcome
    (.results: MatchResult, .receipt: Receipt signed by both).

Aggregate and cardinality tiers: how many matched and their sum, no identity to the requester
    AggregateCustodian(custodian), AggregateRequesterSession, run_aggregate_in_process.

Named subjects: only subjects the authority reviewed can match
    protocol.engines.named (new_token_key, start_certification, certify,
    finish_certification, issue_tokens); certifications go in CustodianConfig, tokens
    in RequesterSession(tokens=...).

Errors
    PSIError and its kinds: PolicyRefusal (.reasons), ProtocolError, InvalidRecordError,
    BudgetExhausted, DisclosureCapReached. Wrong argument types are TypeErrors naming
    the expected type.

Over a network the same sessions run inside the two gRPC services (agency_a, agency_b).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from protocol.adapters.sqlite_ledger import Ledger
    from protocol.domain.records import (
        PersonRecord,
        QueryMetadata,
        QueryRecord,
        ValidatedQueries,
        ValidationReport,
        read_person_csv,
        read_query_csv_with_lines,
        validate_queries,
    )
    from protocol.domain.recordstore import load_custodian_csv, load_query_csv
    from protocol.errors import (
        BudgetExhausted,
        DisclosureCapReached,
        InvalidRecordError,
        PolicyRefusal,
        ProtocolError,
        PSIError,
    )
    from protocol.policy.authority import draft_authorization, generate_authority_key
    from protocol.policy.decide import (
        Authorization,
        CustodianPolicy,
        Mode,
        SignedAuthorization,
        Tier,
        authority_key_id,
        sign_authorization,
    )
    from protocol.sessions.aggregate import (
        AggregateCustodian,
        AggregateRequesterSession,
        run_aggregate_in_process,
    )
    from protocol.sessions.identity import (
        Custodian,
        CustodianConfig,
        MatchResult,
        Receipt,
        RequesterSession,
        SessionOutcome,
        run_in_process,
    )

#: Public name -> the module that defines it (imported when the name is first used).
_HOME = {
    **dict.fromkeys(("PersonRecord", "QueryMetadata", "QueryRecord", "ValidatedQueries",
                     "ValidationReport", "read_person_csv", "read_query_csv_with_lines",
                     "validate_queries"), "protocol.domain.records"),
    **dict.fromkeys(("load_custodian_csv", "load_query_csv"), "protocol.domain.recordstore"),
    **dict.fromkeys(("Authorization", "CustodianPolicy", "Mode", "SignedAuthorization", "Tier",
                     "authority_key_id", "sign_authorization"), "protocol.policy.decide"),
    **dict.fromkeys(("draft_authorization", "generate_authority_key"),
                    "protocol.policy.authority"),
    **dict.fromkeys(("Custodian", "CustodianConfig", "MatchResult", "Receipt",
                     "RequesterSession", "SessionOutcome", "run_in_process"),
                    "protocol.sessions.identity"),
    **dict.fromkeys(("AggregateCustodian", "AggregateRequesterSession",
                     "run_aggregate_in_process"), "protocol.sessions.aggregate"),
    "Ledger": "protocol.adapters.sqlite_ledger",
    **dict.fromkeys(("BudgetExhausted", "DisclosureCapReached", "InvalidRecordError",
                     "PSIError", "PolicyRefusal", "ProtocolError"), "protocol.errors"),
}

__all__ = [
    "AggregateCustodian",
    "AggregateRequesterSession",
    "Authorization",
    "BudgetExhausted",
    "Custodian",
    "CustodianConfig",
    "CustodianPolicy",
    "DisclosureCapReached",
    "InvalidRecordError",
    "Ledger",
    "MatchResult",
    "Mode",
    "PSIError",
    "PersonRecord",
    "PolicyRefusal",
    "ProtocolError",
    "QueryMetadata",
    "QueryRecord",
    "Receipt",
    "RequesterSession",
    "SessionOutcome",
    "SignedAuthorization",
    "Tier",
    "ValidatedQueries",
    "ValidationReport",
    "authority_key_id",
    "draft_authorization",
    "generate_authority_key",
    "load_custodian_csv",
    "load_query_csv",
    "read_person_csv",
    "read_query_csv_with_lines",
    "run_aggregate_in_process",
    "run_in_process",
    "sign_authorization",
    "validate_queries",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562) and keep the name here."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'protocol' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
