"""Aggregate and cardinality tiers over real gRPC with mTLS (issues 5 and 13)."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agency_a.client import run_remote_aggregate, run_remote_session
from proto import codec
from proto import service_kit as kit
from protocol.domain.records import MATCH_RULES
from protocol.policy import decide as P
from protocol.sessions import aggregate as A
from protocol.sessions.aggregate import (
    AggregateCustodian,
    AggregateCustodianSession,
    AggregateRequesterSession,
    plaintext_answer,
)
from protocol.sessions.identity import RequesterSession
from tests.factories import (
    as_query,
    custodian_over_mtls,
    make_person,
    make_world,
)
from tests.helpers.aggregate_adversary import Deviant, positions_of, split


@pytest.fixture()
def setup(tmp_path: Path):
    world = make_world(tmp_path, n_records=60)
    world.with_tax_paid()
    custodian = world.custodian()
    aggregate = AggregateCustodian(custodian)
    made: list[AggregateCustodianSession] = []
    make_session = aggregate.session

    def keep_session() -> AggregateCustodianSession:  # the adversary's oracle reads it
        made.append(make_session())
        return made[-1]

    aggregate.session = keep_session  # type: ignore[method-assign]
    with custodian_over_mtls(custodian, tmp_path / "pki", aggregate=aggregate) as (address, tls):
        yield world, address, tls, made


@pytest.mark.parametrize("tier", [P.Tier.AGGREGATE, P.Tier.CARDINALITY])
def test_count_and_sum_equal_plaintext(setup, tier) -> None:
    world, address, tls, _ = setup
    queries = [as_query(world.records[i]) for i in range(20, 45)]
    queries += [as_query(make_person(900 + i, prefix="z")) for i in range(10)]
    rule = MATCH_RULES["tin+dob"]
    want = plaintext_answer((rule.match_key(q.person, today=date.today()) for q in queries),
                            ((rule.match_key(r, today=date.today()), int(r.get("tax_paid_cents")))
                             for r in world.records))
    session = AggregateRequesterSession(world.authorize_aggregate(tier), queries,
                                        signing_key=world.requester_key)
    with kit.secure_channel(address, tls) as ch:
        out = run_remote_aggregate(session, ch)
    assert out.result.count == want[0] == 25
    if tier is P.Tier.AGGREGATE:
        assert out.result.sum == want[1]
    else:
        assert out.result.sum is None
    assert out.receipt.requester_signature and out.receipt.custodian_signature


def test_minimum_count_withholds_the_sum(setup) -> None:
    world, address, tls, _ = setup
    queries = [as_query(world.records[i]) for i in range(3)]
    signed = world.authorize_aggregate(P.Tier.AGGREGATE, min_count=10)
    session = AggregateRequesterSession(signed, queries)
    with kit.secure_channel(address, tls) as ch:
        out = run_remote_aggregate(session, ch)
    assert out.result.count == 3 and out.result.withheld and out.result.sum is None


def test_tier_mismatch_refused_over_grpc(setup) -> None:
    world, address, tls, _ = setup
    identity_auth = world.authorize()
    aggregate_auth = world.authorize_aggregate(P.Tier.AGGREGATE)
    with kit.secure_channel(address, tls) as ch:
        with pytest.raises(grpc.RpcError) as err:
            run_remote_session(RequesterSession(aggregate_auth,
                                                [as_query(world.records[0])]), ch)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "tier_not_permitted" in err.value.details()
        stub = kit.pb2_grpc.CustodianStub(ch)
        with pytest.raises(grpc.RpcError) as err2:
            stub.AggregateOpen(kit.pb2.AggregateOpenRequest(
                session_id="agg-x", signed_authorization=identity_auth.to_bytes(),
                tier="aggregate", match_rule="tin+dob", value_field="",
                element_count=3, engine="oprf"), timeout=30)
        assert err2.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "tier_not_permitted" in err2.value.details()


def test_cross_tier_rpcs_fail_precondition(setup) -> None:
    """An RPC of one tier on a session of the other reaches the session, whose transition
    table refuses it: FAILED_PRECONDITION with a specific message, never UNKNOWN (issue 12)."""
    world, address, tls, _ = setup
    queries = [as_query(world.records[0])]
    pb2 = kit.pb2
    with kit.secure_channel(address, tls) as ch:
        stub = kit.pb2_grpc.CustodianStub(ch)

        def identity() -> str:  # a refusal fails the session: a fresh one for every call
            session = RequesterSession(world.authorize(), queries)
            stub.OpenSession(codec.to_pb(session.open_request()), timeout=30)
            return session.session_id

        aggregate = AggregateRequesterSession(world.authorize_aggregate(P.Tier.AGGREGATE),
                                              queries)
        stub.AggregateOpen(codec.to_pb(aggregate.open_request()), timeout=30)

        def ref(session_id: str) -> Any:
            return pb2.SessionRef(session_id=session_id)

        def element(session_id: str) -> Any:
            return pb2.ElementChunk(session_id=session_id, seq=0, elements=bytes(32))

        calls = {  # rpc -> (call, the message it asks the session to take or send)
            "AggregateCustodianElements": (
                lambda: list(stub.AggregateCustodianElements(ref(identity()))),
                "CustodianChunk"),
            "AggregateReblind": (
                lambda: stub.AggregateReblind(iter([element(identity())])), "ReblindedChunk"),
            "AggregateUpload": (
                lambda: stub.AggregateUpload(iter([element(identity())])), "BlindedChunk"),
            "AggregateRelease": (lambda: stub.AggregateRelease(pb2.ConsistencyProofMessage(
                session_id=identity())), "ConsistencyProof"),
            "KKRTTags": (lambda: list(stub.KKRTTags(ref(identity()))), "KKRTTagChunk"),
            "StreamTags": (lambda: list(stub.StreamTags(ref(aggregate.session_id))),
                           "TagChunk"),
        }
        for rpc, (call, message) in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, rpc
            assert err.value.details().startswith("protocol_error: "), rpc
            assert (f"cannot accept {message}: {message} is not a message of "
                    in err.value.details()
                    or f"cannot send {message}: {message} is not a message of "
                    in err.value.details()), err.value.details()
        # The aggregate session failed on that call and refuses everything after it.
        for call in (lambda: list(stub.KKRTTags(ref(aggregate.session_id))),
                     lambda: list(stub.Evaluate(iter([element(aggregate.session_id)])))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "failed earlier (protocol_error: " in err.value.details()


def test_deviating_requester_learns_nothing_over_grpc(setup) -> None:
    """Issue 13's attack over real gRPC and mTLS: distinct scalars, dummies, packed multiples
    of a known member placed (with an oracle) so the matched count reaches the minimum. The
    custodian refuses the proof with INVALID_ARGUMENT and releases and records nothing."""
    world, address, tls, made = setup
    signed = world.authorize_aggregate(P.Tier.AGGREGATE, min_count=10)
    rule = MATCH_RULES["tin+dob"]
    targets = [rule.match_key(r, today=date.today()) for r in world.records[:3]]
    deviant = Deviant(session_id="agg-deviant-grpc", target_keys=targets)
    upload = deviant.upload()
    pb2 = kit.pb2
    with kit.secure_channel(address, tls) as ch:
        stub = kit.pb2_grpc.CustodianStub(ch)
        stub.AggregateOpen(codec.to_pb(A.AggregateOpenRequest(
            deviant.session_id, signed.to_bytes(), "aggregate", "tin+dob", "tax_paid_cents",
            len(upload))), timeout=30)
        stub.AggregateUpload(iter([pb2.ElementChunk(
            session_id=deviant.session_id, seq=0, elements=b"".join(upload))]), timeout=30)
        elems = split(b"".join(pb.elements for pb in stub.AggregateCustodianElements(
            pb2.SessionRef(session_id=deviant.session_id), timeout=30)))
        where = positions_of(made[-1]._b, elems, targets)  # the oracle
        pack = [j for j in range(len(elems)) if j not in where][:deviant.packed]
        reblinded = deviant.reblind(elems, where, pack)
        challenge = stub.AggregateReblind(iter([pb2.ElementChunk(
            session_id=deviant.session_id, seq=0, elements=b"".join(reblinded))]), timeout=30)
        assert challenge.count == 10  # packing reached the minimum ...
        positions = np.flatnonzero(np.unpackbits(np.frombuffer(challenge.matched, np.uint8)))
        proof = deviant.proof_attempts(challenge.matched, elems, reblinded,
                                       positions.tolist())["scalar-0"]
        with pytest.raises(grpc.RpcError) as err:  # ... and the proof stops it
            stub.AggregateRelease(codec.to_pb(proof, session_id=deviant.session_id),
                                  timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "consistency proof failed" in err.value.details()
    assert world.ledger.aggregate_releases("agency-a") == []
    assert not [e for e in world.ledger.audit_entries() if e.kind == "aggregate_release"]


def test_differencing_refused_over_grpc(setup) -> None:
    world, address, tls, _ = setup
    signed = world.authorize_aggregate(P.Tier.AGGREGATE, min_count=5)
    with kit.secure_channel(address, tls) as ch:
        first = run_remote_aggregate(AggregateRequesterSession(
            signed, [as_query(world.records[i]) for i in range(10)]), ch)
        assert first.result.count == 10 and first.result.sum is not None
        with pytest.raises(grpc.RpcError) as err:
            run_remote_aggregate(AggregateRequesterSession(
                signed, [as_query(world.records[i]) for i in range(11)]), ch)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details().startswith("release_overlap: ")
    assert len(world.ledger.aggregate_releases("agency-a")) == 1
