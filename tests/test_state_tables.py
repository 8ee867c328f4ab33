"""Every message type of every tier, in every state of every role (issue 12).

Table-driven: a :class:`Role` says how to build a fresh session, how the happy path drives
it, and whether it runs on the session core (``protocol.sessions.base``).  For each state
the test drives a fresh session there and offers it every event: each message type of
every tier as a received message and (core sessions) as a send.  The outcome is either the
table's transition, or a typed library error (a ``PSIError``) with the session ``FAILED``
and a ``failure_reason`` (a closed session stays closed).  Never an AttributeError,
KeyError or TypeError.

The identity tier (``protocol.sessions.core``) is not on the core yet: its roles are
listed with ``on_core=False``, which checks typed errors only.  Moving it onto the core
means giving its roles a ``table`` and flipping the flag.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from protocol.crypto import oprf
from protocol.crypto.kkrt import KKRTBaseOTReply, KKRTExtensionChunk, KKRTSetup, KKRTTagChunk
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
from protocol.errors import PolicyRefusal, ProtocolError, PSIError
from protocol.policy import decide as P
from protocol.sessions import aggregate as A
from protocol.sessions.base import Row, Send, SessionMachine, TransitionTable
from protocol.sessions.core import (
    CustodianSession,
    CustodianState,
    RequesterSession,
    RequesterState,
    run_exchanges,
)
from tests.factories import World, as_query, make_person, make_world

PEER = "agency-a"
RULE = "tin+dob"
VALUE = "tax_paid_cents"
PAILLIER = A.PaillierSettings(key_bits=1024, window_bits=4, test_mode=True)
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
                                1, 1, b"", 0, 0),
        A.BlindedChunk(0, _ELEMENT),
        A.DoubleBlindedChunk(0, _ELEMENT),
        A.CustodianPairsChunk(0, _ELEMENT, b""),
        A.MaskedSum(0, b""),
        A.SumReveal(0, True, b"", "below_minimum_count"),
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
    table: TransitionTable | None  # None: not on the session core yet
    fresh_failed: Callable[[World], Any] | None  # a session failed at its first event

    @property
    def on_core(self) -> bool:
        return self.table is not None


def _world(tmp: Path) -> World:
    tmp.mkdir(parents=True, exist_ok=True)
    world = make_world(tmp, n_records=0)
    world.records = [replace(make_person(i, prefix="c"), extra=((VALUE, str(10 * i)),))
                     for i in range(6)]
    return world


def _aggregate_walk(world: World) -> Iterator[tuple[Any, Any]]:
    signed = world.authorize(tier=P.Tier.AGGREGATE, fields=(VALUE,), max_disclosures=0)
    custodian = A.AggregateCustodian(world.custodian(), paillier_settings=PAILLIER).session()
    requester = A.AggregateRequesterSession(
        signed, [as_query(r) for r in world.records[:4]], signing_key=world.requester_key,
        custodian_key=world.custodian_key.public_key(), min_key_bits=1024, chunk_size=2)
    yield requester, custodian
    opened = custodian.handle(requester.open_request(), peer_id=PEER)
    yield requester, custodian
    requester.handle(opened)
    yield requester, custodian
    for chunk in requester.blinded_chunks():
        custodian.handle(chunk, peer_id=PEER)
    yield requester, custodian
    for double in custodian.double_blinded_chunks(peer_id=PEER):
        requester.handle(double)
    yield requester, custodian
    for pairs in custodian.pair_chunks(peer_id=PEER):
        requester.handle(pairs)
    yield requester, custodian
    reveal = custodian.handle(requester.masked_sum(), peer_id=PEER)
    yield requester, custodian
    requester.handle(reveal)
    yield requester, custodian
    receipt = custodian.handle(requester.close_request(), peer_id=PEER)
    yield requester, custodian
    custodian.countersign(requester.handle(receipt), peer_id=PEER)
    yield requester, custodian


def _identity_walk(world: World) -> Iterator[tuple[Any, Any]]:
    world.records = [make_person(i, prefix="c") for i in range(6)]
    signed = world.authorize()
    custodian = CustodianSession(world.custodian())
    requester = RequesterSession(signed, [as_query(r) for r in world.records[:3]],
                                 signing_key=world.requester_key,
                                 custodian_key=world.custodian_key.public_key())
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


def _failed_aggregate_custodian(world: World) -> Any:
    session = A.AggregateCustodian(world.custodian(), paillier_settings=PAILLIER).session()
    with pytest.raises(ProtocolError):
        session.handle(object(), peer_id=PEER)
    return session


def _failed_aggregate_requester(world: World) -> Any:
    signed = world.authorize(tier=P.Tier.AGGREGATE, fields=(VALUE,), max_disclosures=0)
    session = A.AggregateRequesterSession(signed, [as_query(world.records[0])])
    with pytest.raises(ProtocolError):
        session.handle(object())
    return session


def _failed_identity_custodian(world: World) -> Any:
    session = CustodianSession(world.custodian())
    with pytest.raises(PSIError):
        session.handle(SAMPLES[OpenRequest], peer_id=PEER)  # not a signed authorization
    return session


ROLES = [
    Role("aggregate custodian", _aggregate_walk, "custodian",
         tuple(A.AggregateCustodianState), A.AGGREGATE_CUSTODIAN_TRANSITIONS,
         _failed_aggregate_custodian),
    Role("aggregate requester", _aggregate_walk, "requester",
         tuple(A.AggregateRequesterState), A.AGGREGATE_REQUESTER_TRANSITIONS,
         _failed_aggregate_requester),
    Role("identity custodian", _identity_walk, "custodian", tuple(CustodianState), None,
         _failed_identity_custodian),
    Role("identity requester", _identity_walk, "requester", tuple(RequesterState), None,
         None),  # no FAILED state yet
]


def _session_in(role: Role, world: World, state: Any) -> Any:
    """A fresh session of ``role`` in ``state`` (None if the happy path never gets there)."""
    if state.value == "failed" and role.fresh_failed is not None:
        return role.fresh_failed(world)
    for requester, custodian in role.walk(world):
        session = requester if role.side == "requester" else custodian
        if session.state == state:
            return session
    return None


def _events(role: Role) -> list[object]:
    received: list[object] = list(SAMPLES)
    sends: list[object] = [Send(t) for t in SAMPLES] if role.on_core else []
    return received + sends


def _cases() -> Iterator[Any]:
    for role in ROLES:
        for state in role.states:
            for event in _events(role):
                name = repr(event) if isinstance(event, Send) else event.__name__  # type: ignore[attr-defined]
                yield pytest.param(role, state, event, id=f"{role.name}-{state.value}-{name}")


def _offer(session: Any, role: Role, event: object) -> object:
    if isinstance(event, Send):
        out = session.send(event.message, peer_id=PEER)
        return list(out) if role.table is not None and _is_stream(role, session, event) else out
    message = SAMPLES[event]  # type: ignore[index]
    if role.side == "custodian":
        return session.handle(message, peer_id=PEER)
    return session.handle(message)


def _is_stream(role: Role, session: Any, event: Send) -> bool:
    assert role.table is not None
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
    row = role.table.get((before, event)) if role.table is not None else None
    try:
        result = _offer(session, role, event)
        if isinstance(result, Iterator):
            list(result)
    except PSIError as exc:
        error: PSIError | None = exc
    else:
        error = None
    # Anything but a library error (AttributeError, KeyError, TypeError, ...) fails here.
    if role.table is None:
        return  # not on the core yet: typed errors are all that is checked
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
        if role.table is None:
            continue
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
    signed = world.authorize(tier=P.Tier.AGGREGATE, fields=(VALUE,), max_disclosures=0,
                             not_before=now - 60, not_after=now + 600, **authorize)
    custodian = A.AggregateCustodian(world.custodian(clock=clock),
                                     paillier_settings=PAILLIER).session()
    requester = A.AggregateRequesterSession(
        signed, [as_query(r) for r in world.records[:4]], min_key_bits=1024, chunk_size=2,
        clock=clock)
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
    assert custodian._b == b"" and custodian._private_key is None


def test_expiry_stops_a_stream_midway(tmp_path: Path) -> None:
    clock = Clock()
    _, custodian, chunks = _open_aggregate(tmp_path, clock)
    for chunk in chunks:
        custodian.handle(chunk)
    stream = custodian.pair_chunks(chunk_pairs=1)
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
        custodian.pair_chunks(peer_id="agency-x")
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
