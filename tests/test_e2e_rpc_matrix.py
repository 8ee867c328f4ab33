"""Every custodian RPC in every session situation, over real gRPC with mTLS (issue 12).

The custodian must answer each call with success (where the session's transition table
allows it) or a typed refusal: a status from :data:`REFUSALS` whose details start with a
machine-readable reason code (``<code>: <message>``, ``proto.service_kit.error_message``),
never UNKNOWN or INTERNAL, never an AttributeError or KeyError reaching gRPC.  One server
serves every case; each case opens the fresh session it needs, with small data.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from agency_a.client import run_remote_session
from proto import codec
from proto import service_kit as kit
from protocol.crypto import oprf
from protocol.domain.engine import Engine
from protocol.domain.messages import MAX_DISCLOSURE_BATCH, OpenResponse
from protocol.sessions.aggregate import AggregateCustodian, AggregateRequesterSession
from protocol.sessions.identity import RequesterSession
from tests.factories import REASON, REFUSALS, World, as_query, custodian_over_mtls, make_world

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc

RPCS = (
    "OpenSession", "StreamTags", "Evaluate", "Disclose", "CloseSession", "Countersign",
    "AggregateOpen", "AggregateUpload", "AggregateCustodianElements", "AggregateReblind",
    "AggregateRelease", "KKRTSetup", "KKRTExtend", "KKRTTags", "FetchTagSet",
)
#: unknown id; open identity sessions per engine; an open aggregate session; an identity
#: session after CloseSession; an identity session that a malformed chunk failed.
SITUATIONS = ("unknown", "oprf", "kkrt", "aggregate", "closed", "failed")

#: The only statuses a refusal may carry.  UNKNOWN and INTERNAL mean a bug.

#: The cells whose minimal request the session's table accepts; every other cell is refused.
#: Opening under a fresh session id always works, so the unknown id opens either tier.
SUCCEEDS = frozenset({
    ("OpenSession", "unknown"), ("AggregateOpen", "unknown"),
    ("StreamTags", "oprf"), ("Evaluate", "oprf"), ("Disclose", "oprf"),
    ("KKRTSetup", "kkrt"), ("AggregateUpload", "aggregate"),
})
#: The RPCs that open a session (a new session object) rather than reach a live one.
OPENS = frozenset({"OpenSession", "AggregateOpen"})
#: The RPCs that name no session at all (this custodian keeps per-authorization indexes, so
#: its FetchTagSet is refused in every situation: tests/test_national.py serves it).
SESSIONLESS = frozenset({"FetchTagSet"})

OVERLONG_ID = "s" * 10_000
LAST_U64 = 2**64 - 1


@dataclass
class Matrix:
    """The one server of this module, a channel to it as agency-a, and session openers."""

    world: World
    stub: Any
    channel: grpc.Channel
    #: The requester of each KKRT session, which alone can derive its session's setup.
    kkrt_requesters: dict[str, RequesterSession] = field(default_factory=dict)

    def identity_auth(self) -> bytes:
        return self.world.authorize(engines=(Engine.OPRF.value, Engine.KKRT.value)).to_bytes()

    def aggregate_auth(self) -> bytes:
        return self.world.authorize_aggregate().to_bytes()

    def _requester(self, engine: str = Engine.OPRF.value) -> RequesterSession:
        signed = self.world.authorize(engines=(engine,))
        return RequesterSession(signed, [as_query(self.world.records[0])], engine=engine)

    def session(self, situation: str) -> str:
        """A fresh session id in ``situation`` (a refusal may fail a session: never reuse)."""
        if situation == "unknown":
            return f"never-opened-{uuid.uuid4().hex}"
        if situation in ("oprf", "kkrt", "failed"):
            engine = Engine.KKRT.value if situation == "kkrt" else Engine.OPRF.value
            requester = self._requester(engine)
            opened = self.stub.OpenSession(codec.to_pb(requester.open_request()), timeout=30)
            if situation == "kkrt":
                requester.handle(codec.from_pb(OpenResponse, opened))
                self.kkrt_requesters[requester.session_id] = requester
            if situation == "failed":
                with pytest.raises(grpc.RpcError) as err:
                    evaluate(self, requester.session_id, b"\x01" * 33)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return requester.session_id
        if situation == "aggregate":
            aggregate = AggregateRequesterSession(
                self.world.authorize_aggregate(), [as_query(self.world.records[0])])
            self.stub.AggregateOpen(codec.to_pb(aggregate.open_request()), timeout=30)
            return aggregate.session_id
        assert situation == "closed"
        requester = self._requester()  # no signing key: closed, never countersigned
        run_remote_session(requester, self.channel)
        return requester.session_id


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    tmp: Path = tmp_path_factory.mktemp("rpc-matrix")
    world = make_world(tmp, n_records=12,
                       allowed_engines=frozenset({Engine.OPRF.value, Engine.KKRT.value}))
    world.with_tax_paid()
    custodian = world.custodian()
    aggregate = AggregateCustodian(custodian)
    with custodian_over_mtls(custodian, tmp / "pki", aggregate=aggregate) as (address, tls):
        with kit.secure_channel(address, tls) as channel:
            yield Matrix(world, pb2_grpc.CustodianStub(channel), channel)


# --------------------------------------------------------------------------- requests

BLINDED = oprf.blind_batch([b"matrix-key"])[1]  # one well-formed ristretto255 element


def _ref(sid: str, chunk_tags: int = 0) -> Any:
    return pb2.SessionRef(session_id=sid, chunk_tags=chunk_tags)


def evaluate(m: Matrix, sid: str, elements: bytes = BLINDED) -> Any:
    return list(m.stub.Evaluate(iter([pb2.ElementChunk(session_id=sid, seq=0,
                                                       elements=elements)]), timeout=30))


def open_session(m: Matrix, sid: str) -> Any:
    return m.stub.OpenSession(pb2.OpenSessionRequest(
        session_id=sid, signed_authorization=m.identity_auth(), tier="identity",
        match_rules=["tin+dob"], disclosure_fields=["address"], element_count=2,
        engine=Engine.OPRF.value), timeout=30)


def aggregate_open(m: Matrix, sid: str) -> Any:
    return m.stub.AggregateOpen(pb2.AggregateOpenRequest(
        session_id=sid, signed_authorization=m.aggregate_auth(), tier="aggregate",
        match_rule="tin+dob", value_field="tax_paid_cents", element_count=2,
        engine=Engine.OPRF.value), timeout=30)


def disclose(m: Matrix, sid: str, items: int = 1) -> Any:
    """A proof that verifies nothing (it is rejected, not refused), ``items`` times."""
    item = pb2.DisclosureItem(rule_id="tin+dob", output=bytes(64))
    return list(m.stub.Disclose(iter([pb2.DisclosureRequest(
        session_id=sid, seq=0, items=[item] * items)]), timeout=30))


def close(m: Matrix, sid: str, transcript_hash: bytes = bytes(32)) -> Any:
    return m.stub.CloseSession(pb2.CloseSessionRequest(
        session_id=sid, transcript_hash=transcript_hash), timeout=30)


def countersign(m: Matrix, sid: str) -> Any:
    return m.stub.Countersign(pb2.ReceiptMessage(
        authorization_id="a", session_id=sid, custodian_id="agency-b", requester_id="agency-a",
        evaluated=0, disclosed=0, transcript_hash=bytes(32), custodian_signature=bytes(64),
        requester_signature=bytes(64)), timeout=30)


def aggregate_upload(m: Matrix, sid: str, elements: bytes = BLINDED) -> Any:
    return m.stub.AggregateUpload(iter([pb2.ElementChunk(session_id=sid, seq=0,
                                                         elements=elements)]), timeout=30)


def aggregate_reblind(m: Matrix, sid: str, elements: bytes = BLINDED) -> Any:
    return m.stub.AggregateReblind(iter([pb2.ElementChunk(session_id=sid, seq=0,
                                                          elements=elements)]), timeout=30)


def aggregate_release(m: Matrix, sid: str, public_element: bytes = b"") -> Any:
    return m.stub.AggregateRelease(pb2.ConsistencyProofMessage(
        session_id=sid, public_element=public_element), timeout=30)


def kkrt_setup(m: Matrix, sid: str) -> Any:
    """A KKRT session's own setup (its seed context is the session's); else a stand-in."""
    requester = m.kkrt_requesters.get(sid)
    if requester is not None:
        setup = next(requester.requests(requester.exchanges[0]))
        return m.stub.KKRTSetup(codec.to_pb(setup, session_id=sid), timeout=30)
    return bad_kkrt_setup(m, sid, bins=8, base_ot_a=bytes(32))


def bad_kkrt_setup(m: Matrix, sid: str, *, bins: int, base_ot_a: bytes) -> Any:
    return m.stub.KKRTSetup(pb2.KKRTSetupMessage(
        session_id=sid, version=1, context=bytes(32), bins=bins, stash=0, chunk_bins=8,
        attempt=0, base_ot_a=base_ot_a), timeout=30)


def kkrt_extend(m: Matrix, sid: str, seq: int = 0, columns: bytes = bytes(512)) -> Any:
    return m.stub.KKRTExtend(iter([pb2.KKRTExtensionChunkMessage(
        session_id=sid, seq=seq, start=0, bins=8, columns=columns)]), timeout=30)


def fetch_tagset(m: Matrix, sid: str, rules: int = 1) -> Any:
    return list(m.stub.FetchTagSet(pb2.TagSetRequest(
        signed_authorization=m.identity_auth(), match_rules=["tin+dob"] * rules,
        known_epoch_id=sid[:32]), timeout=30))


#: rpc -> the minimal well-formed request for a session id (streams: one item, drained).
REQUESTS: dict[str, Callable[[Matrix, str], Any]] = {
    "OpenSession": open_session,
    "StreamTags": lambda m, sid: list(m.stub.StreamTags(_ref(sid), timeout=30)),
    "Evaluate": evaluate,
    "Disclose": disclose,
    "CloseSession": close,
    "Countersign": countersign,
    "AggregateOpen": aggregate_open,
    "AggregateUpload": aggregate_upload,
    "AggregateCustodianElements": lambda m, sid: list(m.stub.AggregateCustodianElements(
        _ref(sid), timeout=30)),
    "AggregateReblind": aggregate_reblind,
    "AggregateRelease": aggregate_release,
    "KKRTSetup": kkrt_setup,
    "KKRTExtend": kkrt_extend,
    "KKRTTags": lambda m, sid: list(m.stub.KKRTTags(_ref(sid), timeout=30)),
    "FetchTagSet": fetch_tagset,
}

#: rpc -> (the situation of its session, a malformed request: a bad length, a seq or count out
#: of range, too many items, an empty or a 10,000-character session id).  All are refused.
MALFORMED: dict[str, tuple[str, Callable[[Matrix, str], Any]]] = {
    "OpenSession": ("unknown", lambda m, sid: open_session(m, OVERLONG_ID)),
    "StreamTags": ("unknown", lambda m, sid: list(m.stub.StreamTags(_ref(OVERLONG_ID)))),
    "Evaluate": ("oprf", lambda m, sid: evaluate(m, sid, b"\x01" * 33)),
    "Disclose": ("oprf", lambda m, sid: disclose(m, sid, MAX_DISCLOSURE_BATCH + 1)),
    "CloseSession": ("oprf", lambda m, sid: close(m, sid, b"\x01" * 5)),
    "Countersign": ("closed", lambda m, sid: countersign(m, "")),
    "AggregateOpen": ("unknown", lambda m, sid: aggregate_open(m, "")),
    "AggregateUpload": ("aggregate", lambda m, sid: aggregate_upload(m, sid, b"\x01" * 31)),
    "AggregateCustodianElements": ("unknown", lambda m, sid: list(
        m.stub.AggregateCustodianElements(_ref(OVERLONG_ID)))),
    "AggregateReblind": ("aggregate", lambda m, sid: aggregate_reblind(m, sid, b"\x01" * 31)),
    "AggregateRelease": ("aggregate", lambda m, sid: aggregate_release(m, sid, b"\xff" * 7)),
    "KKRTSetup": ("kkrt", lambda m, sid: bad_kkrt_setup(m, sid, bins=LAST_U64,
                                                        base_ot_a=b"\x01" * 31)),
    "KKRTExtend": ("kkrt", lambda m, sid: kkrt_extend(m, sid, seq=LAST_U64, columns=b"\x01")),
    "KKRTTags": ("kkrt", lambda m, sid: list(m.stub.KKRTTags(_ref(OVERLONG_ID, 2**32 - 1)))),
    "FetchTagSet": ("unknown", lambda m, sid: fetch_tagset(m, sid, MAX_DISCLOSURE_BATCH + 1)),
}


def _refusal(call: Callable[[], Any]) -> grpc.RpcError | None:
    """The call's refusal, or None when it succeeded."""
    try:
        call()
    except grpc.RpcError as err:
        return err
    return None


def _assert_typed_refusal(err: grpc.RpcError | None, case: str) -> None:
    assert err is not None, f"{case}: expected a refusal, the call succeeded"
    code, details = err.code(), err.details() or ""
    assert code in REFUSALS, f"{case}: {code.name}: {details[:300]}"
    assert REASON.match(details), f"{case}: {code.name} without a reason code: {details[:300]}"
    # Bounded: a status echoing a 10,000-character input would pass gRPC's metadata limit
    # (8 KiB) and reach the caller as a transport error without the reason.
    assert len(details) < 1024, f"{case}: {len(details)}-character details"


def test_the_matrix_names_every_rpc_of_the_service() -> None:
    service = kit.pb2.DESCRIPTOR.services_by_name["Custodian"]
    assert set(RPCS) == {method.name for method in service.methods} == set(REQUESTS)
    assert set(MALFORMED) == set(RPCS)
    assert {rpc for rpc, _ in SUCCEEDS} <= set(RPCS)


@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize("rpc", RPCS)
def test_rpc_in_situation(matrix: Matrix, rpc: str, situation: str) -> None:
    sid = matrix.session(situation)
    err = _refusal(lambda: REQUESTS[rpc](matrix, sid))
    if (rpc, situation) in SUCCEEDS:
        assert err is None, f"{rpc} on {situation}: {err.code().name}: {err.details()}"
    else:
        _assert_typed_refusal(err, f"{rpc} on {situation}")
        if situation == "unknown" and rpc not in SESSIONLESS:
            assert err is not None and err.code() == grpc.StatusCode.NOT_FOUND
            assert err.details().startswith("unknown_session: ")
        if situation == "failed" and rpc not in OPENS | SESSIONLESS:
            assert "failed earlier (invalid_element: " in (err.details() or "")


@pytest.mark.parametrize("rpc", RPCS)
def test_malformed_request_is_refused_with_a_reason(matrix: Matrix, rpc: str) -> None:
    situation, call = MALFORMED[rpc]
    sid = matrix.session(situation)
    _assert_typed_refusal(_refusal(lambda: call(matrix, sid)), f"malformed {rpc}")
