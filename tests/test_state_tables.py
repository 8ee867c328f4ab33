"""Every message type of every tier, in every state of every role (issue 12).

Table-driven: a :class:`Role` says how to build a fresh session, how the happy path drives
it, and its transition table (``protocol.sessions.core``).  The identity tier has one pair
of roles per registered engine (its tables are derived from the engine's exchanges).  For
each state the test drives a fresh session there and offers it every event: each message
type of every tier as a received message and as a send, and every local step.  The outcome
is either the table's transition, or a typed library error (a ``PSIError``) with the
session ``FAILED`` and a ``failure_reason`` (a closed session stays closed).  Never an
AttributeError, KeyError or TypeError.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from protocol.crypto import oprf, tagset
from protocol.crypto.kkrt import KKRTBaseOTReply, KKRTExtensionChunk, KKRTSetup, KKRTTagChunk
from protocol.domain.engine import IndexMode
from protocol.domain.messages import (
    CloseRequest,
    Disclosure,
    DisclosureRequest,
    DisclosureResponse,
    EvaluateChunk,
    EvaluatedChunk,
    OpenRequest,
    OpenResponse,
    Receipt,
    TagChunk,
)
from protocol.engines import registry
from protocol.engines.base import Flow
from protocol.errors import PolicyRefusal, ProtocolError, PSIError
from protocol.policy import decide as P
from protocol.sessions import aggregate as A
from protocol.sessions.core import Row, Send, SessionMachine, Step, TransitionTable
from protocol.sessions.identity import (
    CustodianSession,
    CustodianState,
    RequesterSession,
    RequesterState,
    custodian_table,
    requester_table,
    run_exchanges,
)
from tests.factories import World, as_query, make_person, make_world

PEER = "agency-a"
RULE = "tin+dob"
VALUE = "tax_paid_cents"
_ELEMENT = oprf.hash_to_group(b"state-tables")

#: One instance of every message type of every tier (payloads plausible, not valid).
SAMPLES: dict[type, object] = {
    m.__class__: m for m in [
        OpenRequest("s-sample", b"{}", "identity", (RULE,), (), 1),
        OpenResponse("s-sample", "auth-x", "agency-b", (RULE,), (), 1, 0, 12, 0),
        TagChunk(0, bytes(12)),
        EvaluateChunk(0, _ELEMENT),
        EvaluatedChunk(0, _ELEMENT),
        KKRTSetup(1, bytes(32), 8, 0, 8, 0, bytes(32)),
        KKRTBaseOTReply(bytes(16), bytes(32)),
        KKRTExtensionChunk(0, 0, 8, bytes(512)),
        KKRTTagChunk(0, 0, 1, bytes(12)),
        DisclosureRequest(0, ((RULE, bytes(64)),)),
        DisclosureResponse(0, (Disclosure(0, RULE, "p", ()),)),
        CloseRequest(bytes(32)),
        Receipt("auth-x", "s-sample", "agency-b", PEER, 0, 0, bytes(32)),
        A.AggregateOpenRequest("s-sample", b"{}", "aggregate", RULE, VALUE, 1),
        A.AggregateOpenResponse("s-sample", "auth-x", "agency-b", "aggregate", RULE, VALUE,
                                1, 1, 0, 0),
        A.BlindedChunk(0, _ELEMENT),
        A.CustodianChunk(0, _ELEMENT),
        A.ReblindedChunk(0, _ELEMENT),
        A.MatchChallenge(0, b"\x00"),
        A.ConsistencyProof(b"", b"", b""),
        A.AggregateRelease(0, None, True, "below_minimum_count"),
    ]
}


# --------------------------------------------------------------------------- roles


Walk = Callable[[World], Iterator[tuple[Any, Any]]]


@dataclass(frozen=True)
class Role:
    """One role of one tier: how its sessions are made and walked along the happy path."""

    name: str
    walk: Walk  # yields (requester, custodian) after every step of a whole session
    side: str  # "requester" or "custodian": which of the two this role is
    states: tuple[Any, ...]
    table: TransitionTable
    fresh_failed: Callable[[World], Any]  # a session failed at its first event


def _world(tmp: Path) -> World:
    tmp.mkdir(parents=True, exist_ok=True)
    world = make_world(tmp, n_records=0, allowed_engines=frozenset(registry.names()))
    world.records = [replace(make_person(i, prefix="c"), extra=((VALUE, str(10 * i)),))
                     for i in range(6)]
    return world


def _aggregate_walk(world: World) -> Iterator[tuple[Any, Any]]:
    signed = world.authorize(tier=P.Tier.AGGREGATE, fields=(), value_field=VALUE, max_disclosures=0)
    custodian = A.AggregateCustodian(world.custodian()).session()
    requester = A.AggregateRequesterSession(
        signed, [as_query(r) for r in world.records[:4]], signing_key=world.requester_key,
        custodian_key=world.custodian_key.public_key(), chunk_size=2)
    yield requester, custodian
    opened = custodian.handle(requester.open_request(), peer_id=PEER)
    yield requester, custodian
    requester.handle(opened)
    yield requester, custodian
    for chunk in requester.blinded_chunks():
        custodian.handle(chunk, peer_id=PEER)
    yield requester, custodian
    for element_chunk in custodian.custodian_chunks(peer_id=PEER):
        requester.handle(element_chunk)
    yield requester, custodian
    for reblinded in requester.reblinded_chunks():
        custodian.handle(reblinded, peer_id=PEER)
    yield requester, custodian
    challenge = custodian.challenge(peer_id=PEER)
    yield requester, custodian
    requester.handle(challenge)
    yield requester, custodian
    release = custodian.handle(requester.consistency_proof(), peer_id=PEER)
    yield requester, custodian
    requester.handle(release)
    yield requester, custodian
    receipt = custodian.handle(requester.close_request(), peer_id=PEER)
    yield requester, custodian
    custodian.countersign(requester.handle(receipt), peer_id=PEER)
    yield requester, custodian


def _identity_walk(engine: str) -> Walk:
    def walk(world: World) -> Iterator[tuple[Any, Any]]:
        return _walk_identity(world, engine)
    return walk


def _epoch_mode(world: World, engine: str) -> Any:
    """For an engine that matches against a key-epoch index: the world's custodian in epoch
    mode and its (in-memory) epoch index; None for the other engines."""
    if registry.get(engine).traits.index is not IndexMode.EPOCH:
        return None
    from tests.test_epoch_engine import EPOCH, MemoryEpochIndex

    world.policy = replace(world.policy, index_mode=IndexMode.EPOCH, epoch_id=EPOCH,
                           epoch_max_evaluations=1 << 14)
    return MemoryEpochIndex(world.records, tagset.epoch_key(world.master_secret, EPOCH),
                            max_evaluations=1 << 14)


def _walk_identity(world: World, engine: str) -> Iterator[tuple[Any, Any]]:
    world.records = [make_person(i, prefix="c") for i in range(6)]
    signed = world.authorize(engines=(engine,))
    index = _epoch_mode(world, engine)
    custodian = CustodianSession(world.custodian(epoch_index=index) if index is not None
                                 else world.custodian())
    requester = RequesterSession(signed, [as_query(r) for r in world.records[:3]],
                                 signing_key=world.requester_key,
                                 custodian_key=world.custodian_key.public_key(),
                                 engine=engine, tagset=index)
    yield requester, custodian
    opened = custodian.handle(requester.open_request(), peer_id=PEER)
    yield requester, custodian
    requester.handle(opened)
    yield requester, custodian
    # The rest of run_in_process, step by step.
    run_exchanges(requester, custodian)
    requester.match()
    yield requester, custodian
    for req in requester.disclosure_requests():
        requester.handle(custodian.handle(req))
    yield requester, custodian
    receipt = custodian.handle(requester.close_request())
    yield requester, custodian
    custodian.countersign(requester.handle(receipt))
    yield requester, custodian
    assert custodian.table is custodian_table(engine)  # the engine's rows, adopted at open
    assert requester.table is requester_table(engine)


def _failed_aggregate_custodian(world: World) -> Any:
    session = A.AggregateCustodian(world.custodian()).session()
    with pytest.raises(ProtocolError):
        session.handle(object(), peer_id=PEER)
    return session


def _failed_aggregate_requester(world: World) -> Any:
    signed = world.authorize(tier=P.Tier.AGGREGATE, fields=(), value_field=VALUE, max_disclosures=0)
    session = A.AggregateRequesterSession(signed, [as_query(world.records[0])])
    with pytest.raises(ProtocolError):
        session.handle(object())
    return session


def _failed_identity_custodian(world: World) -> Any:
    session = CustodianSession(world.custodian())
    with pytest.raises(PSIError):
        session.handle(SAMPLES[OpenRequest], peer_id=PEER)  # not a signed authorization
    return session


def _failed_identity_requester(engine: str) -> Callable[[World], Any]:
    def failed(world: World) -> Any:
        session = RequesterSession(world.authorize(engines=(engine,)),
                                   [as_query(make_person(1))], engine=engine)
        with pytest.raises(ProtocolError):
            session.handle(object())
        return session
    return failed


ROLES = [
    Role("aggregate custodian", _aggregate_walk, "custodian",
         tuple(A.AggregateCustodianState), A.AGGREGATE_CUSTODIAN_TRANSITIONS,
         _failed_aggregate_custodian),
    Role("aggregate requester", _aggregate_walk, "requester",
         tuple(A.AggregateRequesterState), A.AGGREGATE_REQUESTER_TRANSITIONS,
         _failed_aggregate_requester),
    *[role for engine in registry.names() for role in (
        Role(f"identity custodian {engine}", _identity_walk(engine), "custodian",
             tuple(CustodianState), custodian_table(engine), _failed_identity_custodian),
        Role(f"identity requester {engine}", _identity_walk(engine), "requester",
             tuple(RequesterState), requester_table(engine), _failed_identity_requester(engine)),
    )],
]


def _session_in(role: Role, world: World, state: Any) -> Any:
    """A fresh session of ``role`` in ``state`` (None if the happy path never gets there)."""
    if state == role.table.failed:
        return role.fresh_failed(world)
    for requester, custodian in role.walk(world):
        session = requester if role.side == "requester" else custodian
        if session.state == state:
            return session
    return None


#: Every local step of every role, and one that no role has.
STEPS = [Step("match"), Step("no-such-step")]


def _events(role: Role) -> list[object]:
    return [*SAMPLES, *(Send(t) for t in SAMPLES), *STEPS]


def _cases() -> Iterator[Any]:
    for role in ROLES:
        for state in role.states:
            for event in _events(role):
                name = (repr(event) if isinstance(event, Send | Step)
                        else event.__name__)  # type: ignore[attr-defined]
                yield pytest.param(role, state, event, id=f"{role.name}-{state.value}-{name}")


def _offer(session: Any, role: Role, event: object) -> object:
    if isinstance(event, Send):
        out = session.send(event.message, peer_id=PEER)
        return list(out) if _is_stream(role, session, event) else out
    if isinstance(event, Step):
        return session.step(event.name)
    message = SAMPLES[event]  # type: ignore[index]
    if role.side == "custodian":
        return session.handle(message, peer_id=PEER)
    return session.handle(message)


def _is_stream(role: Role, session: Any, event: Send) -> bool:
    row = role.table.get((session.state, event))
    return row is not None and row.stream


# --------------------------------------------------------------------------- the walk


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], World]:
    counter = iter(range(10**6))
    return lambda: _world(tmp_path_factory.mktemp(f"tables{next(counter)}"))


@pytest.mark.parametrize(("role", "state", "event"), list(_cases()))
def test_every_event_in_every_state(worlds: Callable[[], World], role: Role, state: Any,
                                    event: object) -> None:
    session = _session_in(role, worlds(), state)
    if session is None:
        pytest.skip(f"the happy path of {role.name} never rests in {state.value}")
    before = session.state
    row = role.table.get((before, event))
    try:
        result = _offer(session, role, event)
        if isinstance(result, Iterator):
            list(result)
    except PSIError as exc:
        error: PSIError | None = exc
    else:
        error = None
    # Anything but a library error (AttributeError, KeyError, TypeError, ...) fails here.
    table = role.table
    if error is None:
        assert row is not None, f"{event} was accepted in {before.value} outside the table"
        assert session.state == row.next_state
        return
    if row is None:
        assert isinstance(error, ProtocolError)
    if before in table.final or before == table.failed:
        assert session.state == before  # closed stays closed; failed stays failed
    else:
        assert session.state == table.failed
        assert session.failure_reason.startswith(f"{error.code}: ")


def test_every_state_is_reached_and_every_row_is_offered(tmp_path: Path) -> None:
    """The walk covers the tables: every state is reached (none is skipped above) and every
    row's event is among those offered."""
    for role in ROLES:
        assert {event for _, event in role.table} <= set(_events(role))
        reached = {(r if role.side == "requester" else c).state
                   for r, c in role.walk(_world(tmp_path / role.name))}
        assert reached | {role.table.failed} == set(role.states)


# --------------------------------------------------------------------------- the gate


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _open_aggregate(tmp_path: Path, clock: Clock, **authorize: Any
                    ) -> tuple[A.AggregateRequesterSession, A.AggregateCustodianSession,
                               list[A.BlindedChunk]]:
    world = _world(tmp_path)
    now = int(clock.now)
    signed = world.authorize(tier=P.Tier.AGGREGATE, fields=(), value_field=VALUE, max_disclosures=0,
                             not_before=now - 60, not_after=now + 600, **authorize)
    custodian = A.AggregateCustodian(world.custodian(clock=clock)).session()
    requester = A.AggregateRequesterSession(
        signed, [as_query(r) for r in world.records[:4]], chunk_size=2, clock=clock)
    requester.handle(custodian.handle(requester.open_request(), peer_id=PEER))
    return requester, custodian, list(requester.blinded_chunks())


def test_expired_authorization_is_refused_on_a_later_message(tmp_path: Path) -> None:
    clock = Clock()
    _, custodian, chunks = _open_aggregate(tmp_path, clock)
    custodian.handle(chunks[0], peer_id=PEER)
    clock.now += 601  # past not_after, with the session open
    with pytest.raises(PolicyRefusal) as refused:
        custodian.handle(chunks[1], peer_id=PEER)
    assert refused.value.reasons == ("expired",)
    assert "while its session was open" in str(refused.value)
    assert custodian.state is A.AggregateCustodianState.FAILED
    assert custodian.failure_reason.startswith("expired: authorization ")
    assert custodian.evaluated == 2  # the refused chunk was never counted
    assert custodian._b == b""


def test_expiry_stops_a_stream_midway(tmp_path: Path) -> None:
    clock = Clock()
    _, custodian, chunks = _open_aggregate(tmp_path, clock)
    for chunk in chunks:
        custodian.handle(chunk)
    stream = custodian.custodian_chunks(chunk_elements=1)
    next(stream)
    clock.now += 601
    with pytest.raises(PolicyRefusal, match="expired"):
        next(stream)
    assert custodian.state is A.AggregateCustodianState.FAILED


def test_close_is_owed_after_expiry(tmp_path: Path) -> None:
    clock = Clock()
    requester, custodian, chunks = _open_aggregate(tmp_path, clock)
    for chunk in chunks:
        custodian.handle(chunk)
    clock.now += 601
    receipt = custodian.handle(requester.close_request(), peer_id=PEER)
    assert isinstance(receipt, Receipt) and receipt.evaluated == 4
    assert custodian.state is A.AggregateCustodianState.CLOSED


def test_another_peer_is_refused_without_failing_the_owner(tmp_path: Path) -> None:
    clock = Clock()
    _, custodian, chunks = _open_aggregate(tmp_path, clock)
    with pytest.raises(PolicyRefusal) as refused:
        custodian.handle(chunks[0], peer_id="agency-x")
    assert refused.value.reasons == ("requester_mismatch",)
    assert "'agency-x'" in str(refused.value)
    with pytest.raises(PolicyRefusal, match="belongs to requester 'agency-a'"):
        custodian.custodian_chunks(peer_id="agency-x")
    # Knowing a session id is not enough to kill it: the owner carries on.
    assert custodian.state is A.AggregateCustodianState.RECEIVING
    for chunk in chunks:
        custodian.handle(chunk, peer_id=PEER)
    assert custodian.evaluated == 4


def test_another_tiers_message_is_a_protocol_error(tmp_path: Path) -> None:
    clock = Clock()
    requester, custodian, _ = _open_aggregate(tmp_path, clock)
    with pytest.raises(ProtocolError, match="not a message of this tier"):
        custodian.handle(SAMPLES[EvaluateChunk], peer_id=PEER)
    assert custodian.failure_reason.startswith("protocol_error: aggregate custodian session")
    with pytest.raises(ProtocolError, match="not a message of this tier"):
        requester.send(EvaluateChunk)
    assert requester.state is A.AggregateRequesterState.FAILED


def test_a_handler_bug_becomes_a_typed_error(tmp_path: Path) -> None:
    clock = Clock()
    _, custodian, chunks = _open_aggregate(tmp_path, clock)
    custodian.owner.ops = None  # type: ignore[assignment]  # any non-library exception
    with pytest.raises(ProtocolError, match="AttributeError") as raised:
        custodian.handle(chunks[0])
    assert isinstance(raised.value.__cause__, AttributeError)
    assert custodian.state is A.AggregateCustodianState.FAILED


def test_a_table_naming_a_missing_handler_is_refused_when_the_class_is_made() -> None:
    states = A.AggregateRequesterState
    table = TransitionTable("broken", {(states.START, CloseRequest): Row("_nowhere", states.START)},
                            initial=states.START, failed=states.FAILED)
    with pytest.raises(TypeError, match="handlers missing"):
        type("Broken", (SessionMachine,), {"TABLE": table})


# --------------------------------------------------------------------------- the identity gate


def _open_identity(tmp_path: Path, clock: Clock, engine: str = "oprf"
                   ) -> tuple[RequesterSession, CustodianSession, list[object]]:
    """An open identity session (validity window now-60 .. now+600) and its first requests."""
    world = _world(tmp_path)
    world.records = [make_person(i, prefix="c") for i in range(6)]
    now = int(clock.now)
    signed = world.authorize(engines=(engine,), not_before=now - 60, not_after=now + 600)
    custodian = CustodianSession(world.custodian(clock=clock))
    requester = RequesterSession(signed, [as_query(r) for r in world.records[:4]],
                                 chunk_size=1, engine=engine, clock=clock)
    requester.handle(custodian.handle(requester.open_request(), peer_id=PEER))
    (evaluate,) = [ex for ex in requester.exchanges if ex.flow is Flow.BIDI]
    return requester, custodian, list(requester.requests(evaluate))


def test_identity_evaluation_is_refused_after_expiry(tmp_path: Path) -> None:
    clock = Clock()
    _, custodian, chunks = _open_identity(tmp_path, clock)
    custodian.handle(chunks[0], peer_id=PEER)
    clock.now += 601  # past not_after, with the session open
    with pytest.raises(PolicyRefusal) as refused:
        custodian.handle(chunks[1], peer_id=PEER)
    assert refused.value.reasons == ("expired",)
    assert custodian.state is CustodianState.FAILED
    assert custodian.failure_reason.startswith("expired: authorization ")
    assert custodian.evaluated == 1  # the refused chunk was never counted
    assert custodian._engine is None  # the session's engine run is dropped


def test_identity_tag_stream_stops_at_expiry(tmp_path: Path) -> None:
    clock = Clock()
    _, custodian, _ = _open_identity(tmp_path, clock)
    stream = custodian.tag_chunks(chunk_tags=1, kind=TagChunk, peer_id=PEER)
    next(stream)
    clock.now += 601
    with pytest.raises(PolicyRefusal, match="expired"):
        next(stream)
    assert custodian.state is CustodianState.FAILED
    # a stream asked for after expiry is refused before it starts
    clock = Clock()
    _, custodian, _ = _open_identity(tmp_path / "again", clock)
    clock.now += 601
    with pytest.raises(PolicyRefusal, match="expired"):
        custodian.tag_chunks(kind=TagChunk)
    assert custodian.state is CustodianState.FAILED


def test_identity_close_is_owed_after_expiry(tmp_path: Path) -> None:
    clock = Clock()
    requester, custodian, chunks = _open_identity(tmp_path, clock)
    for tags in custodian.tag_chunks(kind=TagChunk):
        requester.handle(tags)
    for chunk in chunks:
        requester.handle(custodian.handle(chunk))
    requester.match()
    clock.now += 601
    receipt = custodian.handle(requester.close_request(), peer_id=PEER)
    assert isinstance(receipt, Receipt) and receipt.evaluated == len(chunks)
    assert custodian.state is CustodianState.CLOSED


def test_identity_another_peer_is_refused_without_failing_the_owner(tmp_path: Path) -> None:
    clock = Clock()
    requester, custodian, chunks = _open_identity(tmp_path, clock)
    with pytest.raises(PolicyRefusal) as refused:
        custodian.handle(chunks[0], peer_id="agency-x")
    assert refused.value.reasons == ("requester_mismatch",)
    with pytest.raises(PolicyRefusal, match="belongs to requester 'agency-a'"):
        custodian.tag_chunks(kind=TagChunk, peer_id="agency-x")
    # Knowing a session id is not enough to kill it: the owner carries on.
    assert custodian.state is CustodianState.SERVING
    for chunk in chunks:
        requester.handle(custodian.handle(chunk, peer_id=PEER))
    assert custodian.evaluated == len(chunks)


@pytest.mark.parametrize("foreign", [A.BlindedChunk, KKRTSetup])
def test_identity_refuses_another_tiers_or_engines_message(tmp_path: Path, foreign: type
                                                           ) -> None:
    clock = Clock()
    requester, custodian, _ = _open_identity(tmp_path, clock)
    with pytest.raises(ProtocolError, match="is not a message of the identity tier with "
                                            "engine 'oprf'"):
        custodian.handle(SAMPLES[foreign], peer_id=PEER)
    assert custodian.failure_reason.startswith("protocol_error: identity custodian session")
    with pytest.raises(ProtocolError, match=f"cannot send {foreign.__name__}"):
        requester.send(foreign)
    assert requester.state is RequesterState.FAILED


def test_derived_tables_may_only_add_rows_with_declared_handlers(tmp_path: Path) -> None:
    states = RequesterState
    # a derived row may not replace a common one: what every session does stays the same
    with pytest.raises(ValueError, match="replace common rows"):
        requester_table("oprf").derive(
            {(states.START, Send(OpenRequest)): Row("_requests", states.START)},
            protocol="a broken engine")
    # the handlers derived rows may name are checked when the class is made
    with pytest.raises(TypeError, match=r"handlers missing: \['_nowhere'\]"):
        type("Broken", (RequesterSession,), {"TABLE": requester_table("oprf"),
                                             "DERIVED_HANDLERS": frozenset({"_nowhere"})})
    # and a session refuses to adopt a table naming any other handler
    session = RequesterSession(_world(tmp_path).authorize(), [as_query(make_person(1))])
    odd = requester_table("oprf").derive(
        {(states.MATCHED, TagChunk): Row("_match", states.MATCHED),
         (states.CLOSED, TagChunk): Row("_open", states.CLOSED)}, protocol="an odd engine")
    with pytest.raises(ProtocolError, match=r"handlers \['_open'\]"):
        session._adopt(odd)
