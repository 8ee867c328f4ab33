"""The key-epoch engine in process (docs/architecture.md, National custodian).

Policy (index mode, epoch cap, the engine that fits the mode), the engine's match against
the epoch tag set, and the disclosure binding: a disclosure is accepted only for an
evaluation counted in the presenting session, with the blind that produced it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol.crypto import oprf, tagset
from protocol.domain.engine import Engine, IndexMode
from protocol.domain.records import MATCH_RULES, PersonRecord
from protocol.engines.base import RecordsOutOfCore
from protocol.engines.epoch import EpochCustodianSession, decode_proof, encode_proof
from protocol.errors import BudgetExhausted, PolicyRefusal
from protocol.policy import decide as P
from protocol.sessions.identity import (
    CustodianSession,
    RequesterSession,
    run_exchanges,
    run_in_process,
)
from tests.factories import World, as_query, make_person, make_world

EPOCH = "2026-11"
RULES = ("tin+dob", "tin+last_name")
MAX_EVALUATIONS = 4096


class MemoryEpochIndex:
    """Scaffolding only: an epoch index held in memory, built with the real tag-set code.

    The national tests (tests/test_national.py) run the real on-disk index built on Dask.
    """

    def __init__(self, records: Sequence[PersonRecord], key: bytes, *, epoch_id: str = EPOCH,
                 rules: Sequence[str] = RULES, max_evaluations: int = MAX_EVALUATIONS,
                 excluded: frozenset[str] = frozenset()) -> None:
        self.epoch_id = epoch_id
        self.rules = tuple(rules)
        self.manifest = {"excluded_classes": sorted(excluded)}
        self._rows: dict[str, dict[int, list[int]]] = {}
        self._sorted: dict[str, Any] = {}
        tags = max(len(records), 1)
        self.bits = tagset.fingerprint_bits(max_evaluations, tags)
        import datetime as dt
        today = dt.date.today()
        for rule_id in self.rules:
            keyed = [(row, MATCH_RULES[rule_id].match_key(r, today=today))
                     for row, r in enumerate(records)]
            keyed = [(row, k) for row, k in keyed
                     if k is not None and records[row].record_class not in excluded]
            outputs = [oprf.evaluate(key, k) for _, k in keyed]
            fps = tagset.fingerprints(outputs, epoch_id=epoch_id, rule_id=rule_id,
                                      bits=self.bits)
            rows: dict[int, list[int]] = {}
            for (row, _), fp in zip(keyed, tagset.to_ints(fps), strict=True):
                rows.setdefault(fp, []).append(row)
            self._rows[rule_id] = rows
            self._sorted[rule_id] = np.unique(fps)

    def tags(self, rule_id: str) -> int:
        return int(self._sorted[rule_id].size)

    def tagset_bytes(self, rule_id: str) -> int:
        return sum(len(c) for c in self.tagset_chunks(rule_id))

    def tagset_chunks(self, rule_id: str) -> Iterator[bytes]:
        return tagset.encode_chunks(self._sorted[rule_id], self.bits, self.tags(rule_id))

    def rows_for(self, rule_id: str, fingerprint: int) -> list[int]:
        return list(self._rows[rule_id].get(fingerprint, []))

    def rows_for_many(self, rule_id: str, fps: tagset.Fingerprints) -> list[list[int]]:
        return [self.rows_for(rule_id, fp) for fp in tagset.to_ints(fps)]


def _epoch_world(tmp_path: Path, n: int = 80, **policy: Any) -> tuple[World, MemoryEpochIndex]:
    world = make_world(tmp_path, n, index_mode=IndexMode.EPOCH, epoch_id=EPOCH,
                       allowed_engines=frozenset({Engine.OPRF, Engine.OPRF_EPOCH}),
                       epoch_max_evaluations=MAX_EVALUATIONS, **policy)
    index = MemoryEpochIndex(world.records, tagset.epoch_key(world.master_secret, EPOCH))
    return world, index


def _authorize(world: World, **kw: Any) -> P.SignedAuthorization:
    kw.setdefault("max_evaluations", MAX_EVALUATIONS)
    return world.authorize(rules=RULES, engines=(Engine.OPRF_EPOCH,), **kw)


def _queries(world: World, hits: Sequence[int], misses: int = 5) -> list[Any]:
    return _queries_of(world.records, hits, misses)


def _queries_of(records: Sequence[PersonRecord], hits: Sequence[int], misses: int = 5
                ) -> list[Any]:
    return ([as_query(records[i]) for i in hits]
            + [as_query(make_person(900 + j, prefix="x")) for j in range(misses)])


def _requester(world: World, signed: P.SignedAuthorization, queries: list[Any],
               index: Any, **kw: Any) -> RequesterSession:
    return RequesterSession(signed, queries, engine=Engine.OPRF_EPOCH, tagset=index,
                            signing_key=world.requester_key, chunk_size=7, **kw)


# --------------------------------------------------------------------------- policy


def test_policy_round_trips_the_epoch_fields() -> None:
    world_policy = P.CustodianPolicy("agency-b", {}, index_mode=IndexMode.EPOCH, epoch_id=EPOCH,
                                     epoch_max_evaluations=1 << 20)
    again = P.CustodianPolicy.from_json(world_policy.to_json())
    assert again.index_mode is IndexMode.EPOCH
    assert (again.epoch_id, again.epoch_max_evaluations) == (EPOCH, 1 << 20)
    assert P.CustodianPolicy("agency-b", {}).index_mode is IndexMode.PER_AUTHORIZATION


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"index_mode": "epoch"}, "needs an epoch_id"),
    ({"index_mode": "national"}, "index_mode"),
    ({"epoch_id": "2026/11"}, "epoch_id must be"),
    ({"epoch_max_evaluations": 0}, "epoch_max_evaluations"),
])
def test_policy_refuses_a_bad_epoch_configuration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        P.CustodianPolicy("agency-b", {}, **kwargs)


def test_kkrt_is_refused_in_epoch_mode(tmp_path: Path) -> None:
    world, _ = _epoch_world(tmp_path, allowed_tiers=frozenset({P.Tier.IDENTITY}))
    world.policy = P.CustodianPolicy(
        world.policy.custodian_id, world.policy.trusted_authorities, index_mode="epoch",
        epoch_id=EPOCH, allowed_engines=frozenset({"kkrt", "oprf-epoch"}))
    signed = world.authorize(engines=("kkrt",))
    decision = P.decide(signed, P.SessionRequest("agency-a", P.Tier.IDENTITY, ("tin+dob",),
                                                 ("address",), 10, engine="kkrt"),
                        world.policy, now=signed.authorization.not_before + 61,
                        budget_remaining=10_000)
    assert decision.reasons == (P.Reason.ENGINE_NOT_PERMITTED,)
    assert "key-epoch index of epoch 2026-11" in decision.message
    assert "'kkrt' needs a per-authorization index" in decision.message


def test_epoch_engine_is_refused_by_a_per_authorization_custodian(tmp_path: Path) -> None:
    world = make_world(tmp_path, 10, allowed_engines=frozenset({"oprf", "oprf-epoch"}))
    signed = world.authorize(engines=("oprf-epoch",))
    decision = P.decide(signed, P.SessionRequest("agency-a", P.Tier.IDENTITY, ("tin+dob",),
                                                 ("address",), 10, engine="oprf-epoch"),
                        world.policy, now=signed.authorization.not_before + 61,
                        budget_remaining=10_000)
    assert decision.reasons == (P.Reason.ENGINE_NOT_PERMITTED,)
    assert "keeps per-authorization indexes only" in decision.message


def test_authorization_over_the_epoch_cap_is_refused_at_open(tmp_path: Path) -> None:
    world, index = _epoch_world(tmp_path)
    signed = _authorize(world, max_evaluations=MAX_EVALUATIONS + 1)
    custodian = world.custodian(epoch_index=index).session()
    requester = _requester(world, signed, _queries(world, [1]), index)
    with pytest.raises(PolicyRefusal, match="sized for at most 4,096") as refused:
        custodian.handle(requester.open_request(), peer_id="agency-a")
    assert refused.value.reasons[0] == P.Reason.EPOCH_EVALUATIONS_EXCEEDED


def test_custodian_refuses_an_index_that_does_not_fit_its_policy(tmp_path: Path) -> None:
    world, _index = _epoch_world(tmp_path)
    other = MemoryEpochIndex(world.records[:5], b"\x01" * 32, epoch_id="2026-12")
    with pytest.raises(ValueError, match="policy serves epoch '2026-11'"):
        world.custodian(epoch_index=other)
    short = MemoryEpochIndex(world.records[:5], b"\x01" * 32, max_evaluations=16)
    with pytest.raises(ValueError, match="needs"):
        world.custodian(epoch_index=short)
    with pytest.raises(ValueError, match="needs the epoch index"):
        world.custodian()


# --------------------------------------------------------------------------- engine


def _plaintext_join(world: World, queries: list[Any]) -> set[tuple[str, str]]:
    import datetime as dt
    today = dt.date.today()
    theirs = {(rule, MATCH_RULES[rule].match_key(r, today=today)): r for r in world.records
              for rule in RULES}
    found = set()
    for q in queries:
        for rule in RULES:
            key = MATCH_RULES[rule].match_key(q.person, today=today)
            if key is not None and (rule, key) in theirs:
                found.add((q.person.record_id, rule))
    return found


def test_honest_run_matches_the_plaintext_join_and_is_accounted(tmp_path: Path) -> None:
    world, index = _epoch_world(tmp_path)
    signed = _authorize(world)
    queries = _queries(world, [0, 3, 17, 42, 79])
    requester = _requester(world, signed, queries, index)
    custodian = world.custodian(epoch_index=index)
    outcome = run_in_process(requester, custodian.session(), requester_id="agency-a")
    got = {(m.query_record_id, m.rule_id) for m in outcome.matches}
    assert got == _plaintext_join(world, queries) and len(got) == 10
    assert {r.query_record_id for r in outcome.results} == {f"q-c{i}" for i in (0, 3, 17, 42, 79)}
    assert outcome.rejected == 0
    auth_id = signed.authorization.authorization_id
    budget = world.ledger.budget(auth_id)
    assert budget.evaluated == requester.element_count == 2 * len(queries)
    assert budget.disclosed == 5
    # The close purged the blinded elements the session's disclosures were bound to.
    session_id = requester.session_id
    assert [world.ledger.evaluated_elements(session_id, seq) for seq in range(4)] == [None] * 4


def test_evaluated_elements_are_kept_while_open_and_purged_at_close(tmp_path: Path) -> None:
    """Bounded twice: at most the session's reservation while it is open (``store_evaluated``
    refuses more), none once it is closed (the close deletes them in its transaction)."""
    world, index = _epoch_world(tmp_path)
    signed = _authorize(world)
    queries = _queries(world, [0, 3, 17, 42, 79])
    requester, custodian = _opened_pair(world, index, signed, queries)
    session_id = requester.session_id
    stored = [world.ledger.evaluated_elements(session_id, seq) for seq in range(4)]
    # chunk by chunk, exactly what the requester sent
    assert [len(s or b"") // 32 for s in stored] == [7, 7, 6, 0]
    for req in requester.disclosure_requests():
        requester.handle(custodian.handle(req))
    assert len(requester.results) == 10  # one row per (query, rule): five subjects
    requester.handle(custodian.handle(requester.close_request()))
    assert [world.ledger.evaluated_elements(session_id, seq) for seq in range(4)] == [None] * 4
    assert world.ledger.budget(signed.authorization.authorization_id).disclosed == 5


def _opened_pair(world: World, index: Any, signed: P.SignedAuthorization,
                 queries: list[Any]) -> tuple[RequesterSession, CustodianSession]:
    custodian = world.custodian(epoch_index=index).session()
    requester = _requester(world, signed, queries, index)
    requester.handle(custodian.handle(requester.open_request(), peer_id="agency-a"))
    run_exchanges(requester, custodian)
    requester.match()
    return requester, custodian


def _engine(custodian: CustodianSession) -> EpochCustodianSession:
    engine = custodian._engine
    assert isinstance(engine, EpochCustodianSession)
    return engine


def test_a_disclosure_from_another_authorization_is_refused(tmp_path: Path) -> None:
    world, index = _epoch_world(tmp_path)
    queries = _queries(world, [5, 6])
    first, first_custodian = _opened_pair(world, index, _authorize(world), queries)
    second, second_custodian = _opened_pair(world, index, _authorize(world), queries[:1])
    stolen = first.matches[0]
    # The epoch key is shared, so the OUTPUT is the same in both authorizations; the
    # binding is what refuses it: the second session never evaluated this blind's element.
    assert stolen.output[40:] == second.matches[0].output[40:]
    row, why = _engine(second_custodian).verify_one(stolen.rule_id, stolen.output)
    assert row is None
    assert "does not give the presented output" in why or "no evaluation" in why
    # Pointing at an element the second session did evaluate, with the first one's blind:
    _seq, _idx, blind, output = decode_proof(stolen.output)
    forged = encode_proof(0, 0, blind, output)
    row, why = _engine(second_custodian).verify_one(stolen.rule_id, forged)
    assert row is None and "does not give the presented output" in why
    # and over the wire the disclosure is rejected, counted nowhere.
    second.matches = [stolen]
    response = second_custodian.handle(next(iter(second.disclosure_requests())))
    assert response.rejected == (0,) and response.disclosures == ()
    assert world.ledger.budget(second.signed.authorization.authorization_id).disclosed == 0
    # The honest owner of the proof is served.
    row, why = _engine(first_custodian).verify_one(stolen.rule_id, stolen.output)
    assert row == 5 and why == ""


def test_an_element_that_was_never_evaluated_is_refused(tmp_path: Path) -> None:
    world, index = _epoch_world(tmp_path)
    requester, custodian = _opened_pair(world, index, _authorize(world), _queries(world, [9]))
    _, _, blind, output = decode_proof(requester.matches[0].output)
    row, why = _engine(custodian).verify_one("tin+dob", encode_proof(99, 0, blind, output))
    assert row is None and f"no evaluation 99/0 was counted in session {requester.session_id}" \
        == why


def test_a_forged_blind_is_refused(tmp_path: Path) -> None:
    world, index = _epoch_world(tmp_path)
    requester, custodian = _opened_pair(world, index, _authorize(world), _queries(world, [11]))
    seq, idx, _blind, output = decode_proof(requester.matches[0].output)
    other = oprf.random_scalar()
    row, why = _engine(custodian).verify_one("tin+dob", encode_proof(seq, idx, other, output))
    assert row is None and "does not give the presented output" in why
    zero = bytes(32)
    row, why = _engine(custodian).verify_one("tin+dob", encode_proof(seq, idx, zero, output))
    assert row is None and why == "invalid blind: zero scalar"
    big = (oprf.GROUP_ORDER).to_bytes(32, "little")
    row, why = _engine(custodian).verify_one("tin+dob", encode_proof(seq, idx, big, output))
    assert row is None and why == "invalid blind: not a canonical scalar encoding"
    # The true proof still holds.
    assert _engine(custodian).verify_one("tin+dob", requester.matches[0].output)[0] == 11


def test_stored_evaluations_are_bounded_by_the_reservation(tmp_path: Path) -> None:
    world, index = _epoch_world(tmp_path)
    signed = _authorize(world)
    requester, _ = _opened_pair(world, index, signed, _queries(world, [1]))
    auth_id = signed.authorization.authorization_id
    element = oprf.blind(b"x")[1]
    # The session reserved 12 units and stored them all (7 + 5): one more is refused.
    with pytest.raises(BudgetExhausted, match="would exceed the 12 reserved"):
        world.ledger.store_evaluated(auth_id, requester.session_id, 2, element)
    # Replacing a chunk counts it once.
    world.ledger.store_evaluated(auth_id, requester.session_id, 1, element * 5)


def test_excluded_records_are_never_disclosed(tmp_path: Path) -> None:
    world, index = _epoch_world(tmp_path, excluded_record_classes=frozenset({"sealed"}))
    world.records[4] = replace(world.records[4], record_class="sealed")
    with pytest.raises(ValueError, match=r"holds records of classes \['sealed'\]"):
        world.custodian(epoch_index=index)  # built without the exclusion: refused
    index = MemoryEpochIndex(world.records, tagset.epoch_key(world.master_secret, EPOCH),
                             excluded=frozenset({"sealed"}))
    assert index.tags("tin+dob") == len(world.records) - 1
    signed = _authorize(world)
    requester = _requester(world, signed, _queries(world, [4, 8]), index)
    outcome = run_in_process(requester, world.custodian(epoch_index=index).session(),
                             requester_id="agency-a")
    assert {r.query_record_id for r in outcome.results} == {"q-c8"}


class _Rows:
    def __init__(self, records: list[PersonRecord]) -> None:
        self.records = records
        self.read: list[int] = []

    @property
    def count(self) -> int:
        return len(self.records)

    def rows(self, global_rows: Sequence[int]) -> list[PersonRecord]:
        self.read.extend(global_rows)
        return [self.records[i] for i in global_rows]


def test_records_out_of_core_are_read_only_for_disclosure(tmp_path: Path) -> None:
    world, index = _epoch_world(tmp_path, allowed_tiers=frozenset({P.Tier.IDENTITY}))
    source = _Rows(world.records)
    world_records = world.records
    world.records = RecordsOutOfCore(source)  # type: ignore[assignment]
    signed = _authorize(world)
    requester = _requester(world, signed, _queries_of(world_records, [2, 30]), index)
    outcome = run_in_process(requester, world.custodian(epoch_index=index).session(),
                             requester_id="agency-a")
    assert {r.query_record_id for r in outcome.results} == {"q-c2", "q-c30"}
    assert set(source.read) == {2, 30}  # nothing else of the file was read
    small = make_world(tmp_path / "small", 0)
    small.records = RecordsOutOfCore(source)  # type: ignore[assignment]
    with pytest.raises(ValueError, match="records out of core are served in epoch mode only"):
        small.custodian()

