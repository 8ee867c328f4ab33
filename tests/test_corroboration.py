"""Corroborated disclosure, enforced by the custodian (docs/architecture.md, Recall and
misidentification: Corroboration).

End to end over real gRPC and mutual TLS against a real SQLite ledger: the disclosed pairs
equal the plaintext corroborated join; a hostile requester's hand-built disclosure requests
(one rule, two records, two variants of one rule, a repeated rule, an oversized group,
replays) disclose nothing beyond one record per valid group, each refusal with its reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import grpc
import pytest

from agency_a.client import run_remote_session
from proto import service_kit as kit
from protocol.domain.engine import BUILTIN_ENGINE_TRAITS
from protocol.domain.records import (
    QueryRecord,
    Strength,
    corroborated_pairs,
    corroborating_group,
    get_rule,
    independent_group,
    match_keys_bulk,
    query_match_keys_bulk,
    rules_independent,
)
from protocol.policy import decide as P
from protocol.sessions.identity import (
    RequesterSession,
    disclosure_plan,
    run_exchanges,
)
from tests.factories import (
    REASON,
    REFUSALS,
    World,
    as_query,
    custodian_over_mtls,
    make_person,
    make_world,
)

pb2 = kit.pb2
pb2_grpc = kit.pb2_grpc

RULES = ("tin+dob", "tin+zip", "first+last+dob+zip")
FIELDS = ("address", "city", "state", "zip")


# --------------------------------------------------------------------------- independence


def test_independence_is_about_the_columns_each_rule_reads() -> None:
    # two variants of one base rule read the same columns: one piece of evidence
    assert not rules_independent("tin+dob", "tin+dob+variants")
    # a rule implied by another (its columns a subset) adds nothing
    assert not rules_independent("tin+last_phonetic", "tin+last_phonetic+zip")
    # exact and phonetic spellings of one name read the same column
    assert not rules_independent("tin+last_name", "tin+last_phonetic")
    assert rules_independent("tin+dob", "tin+zip")
    assert rules_independent("tin+dob", "names_phonetic+dob+zip")
    assert not independent_group(("tin+dob", "tin+dob"))
    assert corroborating_group(["tin+dob", "tin+dob+variants", "tin+zip"], 2) == (
        "tin+dob", "tin+zip")
    assert corroborating_group(["tin+dob", "tin+dob+variants"], 2) is None


def test_plaintext_join_needs_independent_agreement_on_one_record() -> None:
    pairs = {"tin+dob": {"q1": {1}, "q2": {2}, "q3": {3}},
             "tin+dob+variants": {"q1": {1}},
             "tin+zip": {"q2": {2}, "q3": {4}}}
    # q1: two variants of one rule; q2: independent agreement; q3: they name two records
    assert corroborated_pairs(pairs, 2) == {"q2": {2}}


# --------------------------------------------------------------------------- authorization


def _auth(**changes: object) -> P.Authorization:
    base = dict(authorization_id="auth-1", authority_key_id="k" * 32, requester_id="agency-a",
                custodian_id="agency-b", statute="26 U.S.C. 6103(i)(2)", purpose="locate",
                not_before=1_000, not_after=2_000, tier=P.Tier.IDENTITY, max_evaluations=10,
                max_disclosures=5, match_rules=RULES, disclosure_fields=FIELDS,
                retention_days=30)
    base.update(changes)
    return P.Authorization(**base)  # type: ignore[arg-type]


def test_old_authorizations_keep_their_signed_bytes() -> None:
    """Corroboration is signed only when set: an authorization without it encodes exactly
    as before the field existed (every earlier field, no trailing part)."""
    from protocol.crypto.encoding import encode
    auth = _auth()
    before = [enc(getattr(auth, name)) for name, enc in P._CANONICAL_ENCODERS
              if name not in ("evaluation_key", "corroboration")]
    assert auth.canonical_bytes() == encode(P.AUTHORIZATION_TAG, *before)
    assert "corroboration" not in auth.to_json()
    corroborated = _auth(corroboration=2)
    assert corroborated.canonical_bytes() != auth.canonical_bytes()
    assert P.Authorization.from_json(corroborated.to_json()) == corroborated
    # with the trailing field set, an unset evaluation key is encoded as absent, not omitted
    assert corroborated.canonical_bytes() == encode(
        P.AUTHORIZATION_TAG, *before, b"\x00", 2)


@pytest.mark.parametrize("changes, message", [
    ({"corroboration": 1}, "between 2"),
    ({"corroboration": 4}, "between 2"),
    ({"corroboration": True}, "integer"),
    ({"corroboration": 2, "tier": P.Tier.CARDINALITY, "max_disclosures": 0,
      "disclosure_fields": ()}, "identity tier"),
])
def test_corroboration_is_validated(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _auth(**changes)


# --------------------------------------------------------------------------- policy


def _decide(world: World, signed: P.SignedAuthorization, rules: tuple[str, ...],
            engine: str = "oprf", **policy: Any) -> P.Decision:
    pol = dataclasses.replace(world.policy, **policy)
    request = P.SessionRequest(peer_id="agency-a", tier=P.Tier.IDENTITY, match_rules=rules,
                               disclosure_fields=FIELDS, query_count=10, engine=engine)
    return P.decide(signed, request, pol, now=signed.authorization.not_before + 60,
                    budget_remaining=10_000)


def test_policy_refuses_requires_and_checks_the_engine_and_rules(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=1)
    corroborated = world.authorize(rules=RULES, corroboration=2)
    plain = world.authorize(rules=RULES)
    assert _decide(world, corroborated, RULES).allowed
    refused = _decide(world, corroborated, RULES, corroboration=P.Corroboration.REFUSED)
    assert refused.reasons == (P.Reason.CORROBORATION_NOT_PERMITTED,)
    assert "refuses corroborated disclosure" in refused.message
    required = _decide(world, plain, RULES, corroboration=P.Corroboration.REQUIRED)
    assert required.reasons == (P.Reason.CORROBORATION_NOT_PERMITTED,)
    # the session's own rules must hold k independent ones
    narrow = _decide(world, corroborated, ("tin+dob",))
    assert narrow.reasons == (P.Reason.CORROBORATION_NOT_PERMITTED,)
    assert "pairwise independent" in narrow.message
    # an engine whose proofs bind to single evaluation slots cannot check a group: refused
    # through its declared trait
    epoch_traits = {"oprf": dataclasses.replace(BUILTIN_ENGINE_TRAITS["oprf"],
                                                corroborated_disclosure=False)}
    request = P.SessionRequest(peer_id="agency-a", tier=P.Tier.IDENTITY, match_rules=RULES,
                               disclosure_fields=FIELDS, query_count=10, engine="oprf")
    by_trait = P.decide(corroborated, request, world.policy, engine_traits=epoch_traits,
                        now=corroborated.authorization.not_before + 60, budget_remaining=10_000)
    assert by_trait.reasons == (P.Reason.ENGINE_NOT_PERMITTED,)
    assert not BUILTIN_ENGINE_TRAITS["oprf-epoch"].corroborated_disclosure


def test_weak_rules_are_served_only_under_corroboration_when_policy_says_so(
        tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=1)
    weak = ("tin+dob", "last_phonetic+dob+zip", "first_phonetic+dob+zip")
    assert get_rule("last_phonetic+dob+zip").strength is Strength.WEAK
    corroborated = world.authorize(rules=weak, corroboration=2)
    plain = world.authorize(rules=weak)
    assert P.Reason.RULE_TOO_WEAK in _decide(world, corroborated, weak).reasons
    assert _decide(world, corroborated, weak, weak_rules_when_corroborated=True).allowed
    assert P.Reason.RULE_TOO_WEAK in _decide(world, plain, weak,
                                             weak_rules_when_corroborated=True).reasons


# --------------------------------------------------------------------------- end to end


def _scenario(world: World) -> list[QueryRecord]:
    """Queries: 20 exact copies (all three rules), 10 with another ZIP (tin+dob alone),
    6 with another date of birth (tin+zip alone), 10 strangers."""
    records = world.records
    exact = [as_query(records[i]) for i in range(20)]
    moved = [as_query(dataclasses.replace(records[i], zip="99001")) for i in range(20, 30)]
    redated = [as_query(dataclasses.replace(records[i], dob="1931-07-04"))
               for i in range(30, 36)]
    strangers = [as_query(make_person(5000 + i, prefix="z")) for i in range(10)]
    return exact + moved + redated + strangers


def _plaintext_corroborated(world: World, queries: list[QueryRecord], k: int
                            ) -> set[tuple[str, str]]:
    """(query id, record id) pairs of the plaintext corroborated join, as
    benchmarks/accuracy.py measures it (``corroborated_pairs`` over each rule's key join)."""
    today = date.today()
    records = world.records
    custodian_keys = match_keys_bulk(records, RULES, today=today)
    query_keys = query_match_keys_bulk([q.person for q in queries], RULES, today=today)
    pairs: dict[str, dict[str, set[int]]] = {}
    for rule in RULES:
        index: dict[bytes, set[int]] = {}
        for pos, key in enumerate(custodian_keys[rule]):
            if key is not None:
                index.setdefault(key, set()).add(pos)
        pairs[rule] = {q.person.record_id: hits for q, keys in zip(queries, query_keys[rule],
                                                                    strict=True)
                       if (hits := set().union(*(index.get(k, set()) for k in keys)))}
    agreed = corroborated_pairs(pairs, k)
    return {(q, records[h].record_id) for q, hits in agreed.items() for h in hits}


def test_end_to_end_discloses_exactly_the_corroborated_join(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=60)
    queries = _scenario(world)
    signed = world.authorize(rules=RULES, fields=FIELDS, corroboration=2)
    custodian = world.custodian()
    by_address = {r.address: r.record_id for r in world.records}
    with custodian_over_mtls(custodian, tmp_path / "pki") as (address, tls), \
            kit.secure_channel(address, tls) as channel:
        kit.wait_healthy(channel)
        session = RequesterSession(signed, queries, signing_key=world.requester_key,
                                   chunk_size=32)
        outcome = run_remote_session(session, channel)
    disclosed = {(r.query_record_id, by_address[r.fields["address"]]) for r in outcome.results}
    expected = _plaintext_corroborated(world, queries, 2)
    assert len(expected) == 20  # only the exact copies agree on two independent rules
    assert disclosed == expected
    assert outcome.rejected == 0
    # 16 queries matched under one rule only: withheld by the requester, said why
    assert session.withheld_uncorroborated == 16
    assert outcome.receipt.disclosed == 20
    auth_id = signed.authorization.authorization_id
    assert len(world.ledger.disclosures(auth_id)) == 20
    # the budget is what it would be without corroboration: every key evaluated
    assert outcome.receipt.evaluated == session.element_count


def test_disclosure_plan_keeps_groups_whole_and_numbered() -> None:
    keys = [("q1", "tin+dob"), ("q1", "tin+zip"), ("q2", "tin+dob"), ("q3", "tin+dob"),
            ("q3", "tin+dob+variants"), ("q4", "tin+zip"), ("q4", "first+last+dob+zip")]
    plan = disclosure_plan(keys, 2, batch=3)
    assert plan == [([0, 1], (0, 0)), ([5, 6], (0, 0))]
    assert disclosure_plan(keys, None, batch=3)[0] == ([0, 1, 2], ())


# --------------------------------------------------------------------------- hostile requester


Hostile = tuple[World, P.SignedAuthorization, Any, dict[tuple[str, str], bytes]]


@pytest.fixture()
def hostile(tmp_path: Path) -> Iterator[Hostile]:
    """A custodian behind mTLS, an authorization with corroboration by 2 over three rules
    (two of them variants of one base rule), and valid outputs for two records computed
    in process under the same authorization (outputs are per authorization)."""
    world = make_world(tmp_path, n_records=10)
    rules = ("tin+dob", "tin+dob+variants", "tin+zip")
    signed = world.authorize(rules=rules, fields=FIELDS, corroboration=2)
    queries = [as_query(world.records[0]), as_query(world.records[1])]
    requester = RequesterSession(signed, queries, signing_key=world.requester_key)
    local = world.custodian().session()
    requester.handle(local.handle(requester.open_request(), peer_id="agency-a"))
    run_exchanges(requester, local)
    outputs = {(m.query_record_id, m.rule_id): m.output for m in requester.match()}
    assert len(outputs) == 6  # both queries under all three rules
    with custodian_over_mtls(world.custodian(), tmp_path / "pki") as (address, tls), \
            kit.secure_channel(address, tls) as channel:
        kit.wait_healthy(channel)
        stub = pb2_grpc.CustodianStub(channel)
        stub.OpenSession(pb2.OpenSessionRequest(
            session_id="hostile-1", signed_authorization=signed.to_bytes(), tier="identity",
            match_rules=list(rules), disclosure_fields=list(FIELDS), element_count=6,
            engine="oprf"), timeout=30)
        yield world, signed, stub, outputs


def _disclose(stub: Any, seq: int, items: list[tuple[str, bytes]],
              groups: list[int] | None) -> Any:
    request = pb2.DisclosureRequest(
        session_id="hostile-1", seq=seq,
        items=[pb2.DisclosureItem(rule_id=r, output=o) for r, o in items],
        groups=groups or [])
    return next(iter(stub.Disclose(iter([request]), timeout=30)))


def test_hostile_groups_are_refused_with_reasons(hostile: Hostile) -> None:
    world, signed, stub, out = hostile
    a, b = "q-c0", "q-c1"
    cases = [
        # one rule alone, no groups at all
        ([("tin+dob", out[a, "tin+dob"])], None, "corroboration_required"),
        # a group of one
        ([("tin+zip", out[a, "tin+zip"])], [7], "corroboration_required"),
        # two independent rules whose proofs hold, but for two different records
        ([("tin+dob", out[a, "tin+dob"]), ("tin+zip", out[b, "tin+zip"])], [0, 0],
         "corroboration_records_differ"),
        # two variants of one base rule on one record
        ([("tin+dob", out[a, "tin+dob"]), ("tin+dob+variants", out[a, "tin+dob+variants"])],
         [0, 0], "corroboration_rules_not_independent"),
        # one rule twice
        ([("tin+dob", out[a, "tin+dob"]), ("tin+dob", out[a, "tin+dob"])], [0, 0],
         "corroboration_rule_repeated"),
        # more items than the session has rules
        ([("tin+dob", out[a, "tin+dob"]), ("tin+zip", out[a, "tin+zip"]),
          ("tin+dob+variants", out[a, "tin+dob+variants"]), ("tin+zip", out[a, "tin+zip"])],
         [0, 0, 0, 0], "corroboration_group_oversized"),
        # a rule this session did not open
        ([("tin+dob", out[a, "tin+dob"]), ("first+last+dob+zip", out[a, "tin+zip"])], [0, 0],
         "rule_not_opened"),
        # a forged proof in an otherwise valid group
        ([("tin+dob", out[a, "tin+dob"]), ("tin+zip", bytes(len(out[a, "tin+zip"])))],
         [0, 0], "proof_invalid"),
    ]
    for seq, (items, groups, reason) in enumerate(cases):
        reply = _disclose(stub, seq, items, groups)
        assert list(reply.disclosures) == [], reason
        assert list(reply.rejected) == list(range(len(items))), reason
        assert set(reply.reasons) == {reason}, reason
    auth_id = signed.authorization.authorization_id
    assert world.ledger.disclosures(auth_id) == []
    # each refused group is accounted with its reason (per peer, rate-limited entries)
    audited = [e.payload for e in world.ledger.audit_entries()
               if e.kind == "disclosure_rejected"]
    assert {r for p in audited for r in p.get("reasons", {})} == {c[2] for c in cases}
    # a valid group discloses its record once; replaying it is answered without a new row
    valid = [("tin+dob", out[a, "tin+dob"]), ("tin+zip", out[a, "tin+zip"]),
             ("tin+dob", out[b, "tin+dob"]), ("tin+zip", out[b, "tin+zip"])]
    first = _disclose(stub, 100, valid, [3, 3, 9, 9])
    assert [d.index for d in first.disclosures] == [0, 2]
    assert list(first.rejected) == []
    again = _disclose(stub, 101, valid[:2], [0, 0])
    assert [d.pseudonym for d in again.disclosures] == [first.disclosures[0].pseudonym]
    assert len(world.ledger.disclosures(auth_id)) == 2


def test_group_ids_that_do_not_match_the_items_are_a_clear_refusal(hostile: Hostile) -> None:
    _, _, stub, out = hostile
    with pytest.raises(grpc.RpcError) as err:
        _disclose(stub, 0, [("tin+dob", out["q-c0", "tin+dob"])], [0, 0])
    assert err.value.code() in REFUSALS
    assert REASON.match(err.value.details() or "")
    assert "group ids" in (err.value.details() or "")


# --------------------------------------------------------------------------- psi-authority


def test_issue_signs_corroboration_prices_it_and_refuses_dependent_rules(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_authority_cli import GOOD_ROWS, issue_args, keygen, run, write_queries
    key, _ = keygen(capsys, tmp_path / "keys")
    queries = write_queries(tmp_path / "q.csv", GOOD_ROWS)
    rules = ["--rules", "tin+dob+variants,tin+zip,names_phonetic+dob+zip"]
    plain_out, corroborated_out = tmp_path / "plain.json", tmp_path / "corroborated.json"
    rc, plain, err = run(capsys, *issue_args(key, plain_out), *rules, "--queries", str(queries))
    assert rc == 0, err
    rc, out, err = run(capsys, *issue_args(key, corroborated_out), *rules,
                       "--queries", str(queries), "--corroboration", "2")
    assert rc == 0, err
    signed = P.SignedAuthorization.from_bytes(corroborated_out.read_bytes())
    assert signed.authorization.corroboration == 2
    unsigned = P.SignedAuthorization.from_bytes(plain_out.read_bytes()).authorization
    assert unsigned.corroboration is None
    # the budget is the same: corroboration evaluates the same keys
    assert signed.authorization.max_evaluations == unsigned.max_evaluations
    assert "corroboration:   2 independent rules" in out
    estimate = next(line for line in out.splitlines() if "corroborated by 2 rules" in line)
    total = next(line for line in out.splitlines() if line.strip().startswith("all rules"))
    assert "upper estimate" in estimate
    assert float(estimate.split()[4].replace(",", "").lstrip("<")) <= float(
        total.split()[2].replace(",", "").lstrip("<"))
    assert "corroborated by" not in plain
    # two variants of one rule are one piece of evidence: refused before signing
    rc, _, err = run(capsys, *issue_args(key, tmp_path / "bad.json"), "--rules",
                     "tin+dob,tin+dob+variants", "--corroboration", "2",
                     "--max-evaluations", "10")
    assert rc == 2 and "pairwise independent" in err
    rc, _, err = run(capsys, "estimate", "--queries", str(queries), "--corroboration", "1")
    assert rc == 2 and "at least 2" in err


def test_match_summary_says_what_was_withheld_and_why() -> None:
    from agency_a.cli import late_summary_lines
    lines = late_summary_lines({
        "corroboration": 2, "matches_withheld_uncorroborated": 16,
        "disclosures_rejected_by_reason": {"corroboration_records_differ": 2}})
    assert lines[0].startswith("corroboration: 16 matched queries withheld (fewer than 2 "
                               "independent rules agreed")
    assert lines[1] == ("disclosures rejected by the custodian: 2 "
                        "corroboration_records_differ")
    assert late_summary_lines({"corroboration": None, "matches_withheld_uncorroborated": 0,
                               "disclosures_rejected_by_reason": {}}) == []
