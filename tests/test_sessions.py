"""Session state machines driven in one process (docs/architecture.md, Identity tier).

No network."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.adapters.sqlite_ledger import Ledger
from protocol.crypto import oprf
from protocol.domain.messages import CloseRequest, DisclosureRequest, EvaluateChunk, TagChunk
from protocol.domain.records import MATCH_RULES
from protocol.engines import registry
from protocol.engines.base import Flow
from protocol.errors import PolicyRefusal, ProtocolError
from protocol.sessions.core import Send
from protocol.sessions.identity import (
    CUSTODIAN_TRANSITIONS,
    REQUESTER_TRANSITIONS,
    CustodianState,
    RequesterSession,
    RequesterState,
    custodian_table,
    requester_table,
    run_exchanges,
    run_in_process,
)
from tests.factories import as_query, make_person, make_world

FIELDS = ("address", "city", "state", "zip")


def _run(world, signed, queries, **kw):
    custodian = kw.pop("custodian", None) or world.custodian()
    req = RequesterSession(signed, queries, signing_key=world.requester_key, **kw)
    return run_in_process(req, custodian.session(), requester_id="agency-a"), custodian


@pytest.mark.parametrize("engine", registry.names())
def test_each_engines_tables_are_the_common_rows_plus_its_exchanges(engine: str) -> None:
    # The tables are the spec: every engine's rows come from its declared exchanges alone.
    exchanges = registry.get(engine).exchanges
    sends = {ex.sends for ex in exchanges if ex.sends is not None}
    replies = {ex.replies for ex in exchanges if ex.replies is not None}
    streamed = {ex.replies for ex in exchanges if ex.flow is Flow.SERVER_STREAM}
    custodian, requester = custodian_table(engine), requester_table(engine)
    assert dict(custodian).items() >= dict(CUSTODIAN_TRANSITIONS).items()
    assert dict(requester).items() >= dict(REQUESTER_TRANSITIONS).items()
    assert set(custodian) - set(CUSTODIAN_TRANSITIONS) == (
        {(CustodianState.SERVING, t) for t in sends}
        | {(CustodianState.SERVING, Send(t)) for t in streamed})
    assert set(requester) - set(REQUESTER_TRANSITIONS) == (
        {(RequesterState.EVALUATING, Send(t)) for t in sends}
        | {(RequesterState.EVALUATING, t) for t in replies})
    assert custodian_table(engine) is custodian and requester_table(engine) is requester


def test_happy_path_discloses_exactly_the_intersection(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=40)
    inside = [as_query(world.records[i]) for i in range(25, 40)]
    outside = [as_query(make_person(i, prefix="x")) for i in range(100, 120)]
    signed = world.authorize(rules=("tin+dob",), fields=FIELDS)
    out, _ = _run(world, signed, inside + outside)
    got = {r.query_record_id: dict(r.fields) for r in out.results}
    assert set(got) == {q.person.record_id for q in inside}
    for q in inside:
        rec = world.records[int(q.person.record_id.removeprefix("q-c"))]
        assert got[q.person.record_id] == {f: rec.get(f) for f in FIELDS}
    # receipt accounts exactly
    assert out.receipt.evaluated == len(inside) + len(outside)
    assert out.receipt.disclosed == len(inside)
    rows = world.ledger.disclosures(signed.authorization.authorization_id)
    assert {r.record_id for r in rows} == {f"c{i}" for i in range(25, 40)}
    assert world.ledger.verify_audit_chain().ok


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    members=st.sets(st.integers(0, 29), max_size=12),
    strangers=st.integers(0, 6),
    rules=st.sets(st.sampled_from(["tin+dob", "tin+last_name", "first+last+dob+zip"]),
                  min_size=1),
    fields=st.sets(st.sampled_from(["address", "city", "state", "zip", "dob", "first_name"]),
                   min_size=1),
)
def test_property_exact_intersection_and_fields(tmp_path_factory, members, strangers, rules,
                                                fields) -> None:
    world = make_world(tmp_path_factory.mktemp("w"), n_records=30)
    queries = [as_query(world.records[i]) for i in sorted(members)]
    queries += [as_query(make_person(500 + j, prefix="s")) for j in range(strangers)]
    signed = world.authorize(rules=tuple(sorted(rules)), fields=tuple(sorted(fields)))
    out, _ = _run(world, signed, queries)
    assert {r.query_record_id for r in out.results} == {f"q-c{i}" for i in members}
    for r in out.results:
        assert set(r.fields) == fields
        assert r.rule_id in rules
    assert len(world.ledger.disclosures(signed.authorization.authorization_id)) == len(members)


def test_requested_field_subset_and_never_disclose(tmp_path: Path) -> None:
    world = make_world(tmp_path, never_disclose=frozenset({"tin"}))
    signed = world.authorize(fields=("address", "zip", "tin"))
    with pytest.raises(PolicyRefusal) as err:
        _run(world, signed, [as_query(world.records[0])])
    assert "field_never_disclosed" in err.value.reasons
    out, _ = _run(world, signed, [as_query(world.records[0])], disclosure_fields=("zip",))
    assert [dict(r.fields) for r in out.results] == [{"zip": world.records[0].zip}]


def _open_session(world, signed, queries):
    custodian = world.custodian()
    cs = custodian.session()
    rs = RequesterSession(signed, queries, signing_key=world.requester_key)
    rs.handle(cs.handle(rs.open_request(), peer_id="agency-a"))
    run_exchanges(rs, cs)
    rs.match()
    return custodian, cs, rs


def test_invented_and_replayed_outputs_disclose_nothing(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    q = [as_query(world.records[3])]
    # A real output under authorization 1 ...
    signed1 = world.authorize()
    out1, _ = _run(world, signed1, q)
    real_output = out1.matches[0].output
    # ... replayed under authorization 2 discloses nothing; invented outputs neither.
    signed2 = world.authorize()
    _, cs, _rs = _open_session(world, signed2, [as_query(world.records[50])])
    forged = DisclosureRequest(seq=99, outputs=(
        ("tin+dob", real_output), ("tin+dob", os.urandom(64)), ("tin+dob", b"\x00" * 64),
        ("tin+last_name", real_output), ("tin+dob", b"short"),
    ))
    resp = cs.handle(forged)
    assert resp.disclosures == ()
    assert resp.rejected == (0, 1, 2, 3, 4)
    assert world.ledger.disclosures(signed2.authorization.authorization_id) == []


def test_budget_never_exceeded_across_sessions_and_restarts(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    queries = [as_query(world.records[i]) for i in range(10)]
    signed = world.authorize(max_evaluations=25)
    _run(world, signed, queries)  # 10 used
    _run(world, signed, queries)  # 20 used
    # restart: a new Ledger object on the same file, a new custodian
    world.ledger.close()
    world.ledger = Ledger(tmp_path / "custodian-ledger.sqlite")
    with pytest.raises(PolicyRefusal) as err:
        _run(world, signed, queries)  # 30 > 25
    assert err.value.reasons == ("budget_exhausted",)
    budget = world.ledger.budget(signed.authorization.authorization_id)
    assert budget.reserved == 20 and budget.evaluated == 20
    out, _ = _run(world, signed, queries[:5])  # exactly fills the budget
    assert out.receipt.evaluated == 5
    assert world.ledger.budget(signed.authorization.authorization_id).remaining == 0


def test_evaluating_more_than_reserved_is_refused(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    signed = world.authorize(max_evaluations=100)
    _, cs, _rs = _open_session(world, signed, [as_query(world.records[1])])
    blinded = oprf.blind(b"extra")[1]
    with pytest.raises(PolicyRefusal) as refused:  # policy decides before the ledger counts
        cs.handle(EvaluateChunk(seq=5, elements=blinded))
    assert refused.value.reasons == ("budget_exhausted",)
    assert cs.state is CustodianState.FAILED
    assert cs.failure_reason.startswith("budget_exhausted: ")
    assert world.ledger.budget(signed.authorization.authorization_id).evaluated == 1


def test_disclosure_cap(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    signed = world.authorize(max_disclosures=3)
    queries = [as_query(world.records[i]) for i in range(6)]
    # the cap is reached inside the batch: exactly 3 are accounted and released, the rest
    # withheld (never accounted, never released)
    out, _ = _run(world, signed, queries)
    assert len(out.results) == 3 and out.rejected == 3
    assert len(world.ledger.disclosures(signed.authorization.authorization_id)) == 3
    assert out.receipt.disclosed == 3
    # past the cap, a requester asking again (say, its reply was lost) gets exactly the
    # three records it was already given, as repeats; the new ones stay withheld
    again, _ = _run(world, signed, queries)
    assert {r.query_record_id for r in again.results} == {r.query_record_id for r in out.results}
    assert again.rejected == 3 and again.receipt.disclosed == 0
    auth_id = signed.authorization.authorization_id
    assert len(world.ledger.disclosures(auth_id)) == 3
    assert len(world.ledger.disclosures(auth_id, include_repeats=True)) == 6
    assert world.ledger.budget(auth_id).disclosed == 3


def test_excluded_record_classes_never_match(tmp_path: Path) -> None:
    world = make_world(tmp_path, excluded_record_classes=frozenset({"protected"}))
    world.records[5] = replace(world.records[5], record_class="protected")
    queries = [as_query(world.records[i]) for i in (4, 5, 6)]
    out, custodian = _run(world, world.authorize(), queries)
    assert {r.query_record_id for r in out.results} == {"q-c4", "q-c6"}
    assert custodian.excluded_count == 1


def test_weak_rule_refused_by_default_and_allowed_by_opt_in(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    signed = world.authorize(rules=("first+last+address",))
    with pytest.raises(PolicyRefusal) as err:
        _run(world, signed, [as_query(world.records[0])])
    assert err.value.reasons == ("rule_too_weak",)
    (tmp_path / "b").mkdir()
    world2 = make_world(tmp_path / "b", allowed_weak_rules=frozenset({"first+last+address"}))
    signed2 = world2.authorize(rules=("first+last+address",))
    out, _ = _run(world2, signed2, [as_query(world2.records[0])])
    assert len(out.results) == 1


def test_state_machine_rejects_out_of_order_messages(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    cs = world.custodian().session()
    with pytest.raises(ProtocolError, match="await_open"):
        cs.handle(EvaluateChunk(seq=0, elements=oprf.blind(b"x")[1]))
    rs = RequesterSession(world.authorize(), [as_query(world.records[0])])
    with pytest.raises(ProtocolError):
        rs.handle(TagChunk(seq=0, tags=b""))
    with pytest.raises(ProtocolError, match="in state 'start' cannot match"):
        RequesterSession(world.authorize(), [as_query(world.records[0])]).match()
    assert rs.state is RequesterState.FAILED


def test_transcript_mismatch_is_detected(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    _, cs, _rs = _open_session(world, world.authorize(), [as_query(world.records[2])])
    with pytest.raises(ProtocolError, match="transcript"):
        cs.handle(CloseRequest(transcript_hash=b"\x00" * 32))


def test_malformed_chunks_are_rejected(tmp_path: Path) -> None:
    from protocol.errors import InvalidElementError

    world = make_world(tmp_path)
    signed = world.authorize()
    for seq, elements, error in ((1, b"\x01" * 33, InvalidElementError),
                                 (2, b"\x00" * 32, InvalidElementError),  # the identity
                                 (3, b"", ProtocolError)):
        cs = world.custodian().session()
        rs = RequesterSession(signed, [as_query(world.records[i]) for i in range(5)])
        rs.handle(cs.handle(rs.open_request(), peer_id="agency-a"))
        with pytest.raises(error):
            cs.handle(EvaluateChunk(seq=seq, elements=elements))
        # a malformed message ends the session: nothing more is served to it
        assert cs.state is CustodianState.FAILED
        assert cs.failure_reason.startswith(f"{error.code}: ")
    # a refused chunk is never evaluated, so it is not counted as evaluated (issue 13; the
    # reservation made at open stays charged: it is never refunded)
    assert world.ledger.budget(signed.authorization.authorization_id).evaluated == 0


def test_every_rule_is_servable(tmp_path: Path) -> None:
    world = make_world(tmp_path, allowed_weak_rules=frozenset(MATCH_RULES))
    signed = world.authorize(rules=tuple(MATCH_RULES))
    out, _ = _run(world, signed, [as_query(world.records[7])])
    assert {m.rule_id for m in out.matches} == set(MATCH_RULES)
    assert len(out.results) == len(MATCH_RULES)  # one per rule, one distinct record
    assert len(world.ledger.disclosures(signed.authorization.authorization_id)) == 1
