"""Generated malformed messages against the live services (issue 13, adversarial suites).

Hypothesis builds requests for every RPC of the ``Custodian`` and ``Requester`` services from
the protobuf descriptors at run time, so the test follows whatever schema ``proto/psi.proto``
has today: boundary integers, bytes of right and wrong lengths (valid and invalid ristretto255
encodings), overlong strings, exploding repeated fields, 0..3 messages on a stream, and bytes
that are no valid protobuf at all (invalid UTF-8 in a string, truncated or overlong varints,
wrong wire types).  Everything travels over real mTLS on loopback through identity
serializers, so only the server decodes it.  After every call: a success, or a refusal with a
specific status (never UNKNOWN or INTERNAL) and a short ``<code>: <text>`` reason; health still
answers SERVING.  Afterwards an honest match still succeeds.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory  # type: ignore[import-untyped]
from google.protobuf.descriptor import (  # type: ignore[import-untyped]
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from agency_a.client import run_remote_aggregate, run_remote_session
from agency_a.service import RequesterService
from agency_a.service import serve as serve_requester
from agency_a.store import KEY_LEN, ResultStore
from agency_b.service import serve as serve_custodian
from proto import codec
from proto import service_kit as kit
from proto.limits import ServiceLimits
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli.dev_pki import write_dev_pki
from protocol.crypto import oprf
from protocol.domain.engine import Engine
from protocol.domain.messages import OpenResponse
from protocol.sessions.aggregate import AggregateCustodian, AggregateRequesterSession
from protocol.sessions.identity import RequesterSession
from tests.factories import REASON, REFUSALS, World, as_query, make_world

pb2 = kit.pb2
CUSTODIAN = pb2.DESCRIPTOR.services_by_name["Custodian"]
REQUESTER = pb2.DESCRIPTOR.services_by_name["Requester"]
RPC_TIMEOUT = 20.0
#: The statuses a refusal may carry (the contract of tests/test_e2e_rpc_matrix.py): UNKNOWN
#: and INTERNAL mean a bug, DEADLINE_EXCEEDED a server that stopped answering.
#: A status longer than this echoes its input: gRPC's 8 KiB metadata limit would eat it.
MAX_DETAILS = 1024

#: Every example may open a session or three and none is closed: room for all of them, so
#: the honest match at the end is not refused for the fuzzer's own sessions (that limit is
#: not what this module tests).
FUZZ_LIMITS = ServiceLimits(sessions_per_agency=4096, sessions_total=4096)
OPERATOR = "fuzz-operator"
U64_EDGES = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1)
U32_EDGES = (0, 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1)
POINTS = oprf.blind_batch([b"fuzz-1", b"fuzz-2"])[1]  # two canonical ristretto255 elements
BAD_POINTS = (bytes(32), b"\xff" * 32, b"\x01" + bytes(31))  # identity, non-canonical, odd
STRINGS = (
    "", "a", "tin", "tin+dob", "first+last+dob+zip", "identity", "aggregate", "cardinality",
    Engine.OPRF.value, Engine.KKRT.value, "address", "zip", "tax_paid_cents", "agency-a",
    "agency-b", OPERATOR, "\x00", "\u202e\u0301", "s" * 129, "\u00e9" * 600, "x" * 20_000,
)
BYTES = (
    b"", b"\x00", POINTS[:32], POINTS, POINTS[:31], POINTS + b"\x00", POINTS[:32] * 64,
    *BAD_POINTS, bytes(12), bytes(20), bytes(64), b"\xff" * 65, bytes(512), bytes(1 << 16),
)
#: Stand-ins resolved per call: a fresh live session of each kind, a valid authorization.
LIVE_SESSIONS = ("@oprf", "@kkrt", "@aggregate")
AUTHORIZATIONS = (b"@identity-auth", b"@aggregate-auth")


# --------------------------------------------------------------------------- strategies


def _scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    """Values for one (non-repeated) field, biased to the edges that break decoders."""
    t = f.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        return message(f.message_type, depth=1)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.sampled_from(U64_EDGES) | st.integers(0, 2**64 - 1)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.sampled_from(U32_EDGES) | st.integers(0, 2**32 - 1)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return st.integers(-(2**63), 2**63 - 1)
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_ENUM):
        return st.integers(-(2**31), 2**31 - 1)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_STRING:
        if f.name == "session_id":  # mostly live: a random id stops at the session lookup
            return st.sampled_from(LIVE_SESSIONS) | st.sampled_from(LIVE_SESSIONS) | st.text()
        return st.sampled_from(STRINGS) | st.text(max_size=24)
    assert t == FieldDescriptor.TYPE_BYTES, f"unhandled field type {t} of {f.full_name}"
    if f.name == "signed_authorization":  # mostly valid: else policy refuses before the rest
        return st.sampled_from(AUTHORIZATIONS) | st.sampled_from(BYTES) | st.binary()
    return st.sampled_from(BYTES) | st.binary(max_size=80)


#: Bytes one repeated-field explosion may take: a few in one message stay below the limit.
EXPLOSION_BYTES = 2_000_000


def _wire_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode()) + 2
    if isinstance(value, bytes):
        return len(value) + 2
    return int(value.ByteSize()) + 2 if hasattr(value, "ByteSize") else 10


def _repeated(f: FieldDescriptor) -> st.SearchStrategy[list[Any]]:
    """A few entries, or one entry repeated thousands of times (a repeated-field explosion)."""
    many = st.tuples(_scalar(f), st.sampled_from((4097, 20_000, 1_000_000))).map(
        lambda vn: [vn[0]] * min(vn[1], EXPLOSION_BYTES // _wire_size(vn[0])))
    return st.lists(_scalar(f), max_size=3) | many


def _is_repeated(f: FieldDescriptor) -> bool:
    return bool(f.is_repeated)


def _one_member(f: FieldDescriptor) -> st.SearchStrategy[dict[str, Any]]:
    """The one member of a oneof that is set, with its value."""
    return _scalar(f).map(lambda value: {f.name: value})


def message(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """A protobuf message of type ``desc``: each field unset or fuzzed; one member per oneof."""
    cls = message_factory.GetMessageClass(desc)
    plain = [f for f in desc.fields if f.containing_oneof is None]
    field_values = st.fixed_dictionaries(
        {}, optional={f.name: (_repeated(f) if _is_repeated(f) else _scalar(f)) for f in plain
                      if depth == 0 or f.type != FieldDescriptor.TYPE_MESSAGE})
    oneofs: list[st.SearchStrategy[dict[str, Any]]] = [
        st.sampled_from(list(o.fields)).flatmap(_one_member) | st.just({}) for o in desc.oneofs]
    return st.tuples(field_values, *oneofs).map(
        lambda parts: cls(**{k: v for part in parts for k, v in part.items()}))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def broken_wire(desc: Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes a protobuf parser must refuse, or that stretch it, aimed at ``desc``'s fields."""
    numbers = st.sampled_from([f.number for f in desc.fields] or [1])
    length_delimited = [f.number for f in desc.fields if f.type in (
        FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)]
    cases = [
        st.binary(max_size=120),  # noise, some of it valid
        numbers.map(lambda n: _varint(n << 3) + b"\xff" * 10 + b"\x01"),  # varint > 64 bits
        numbers.map(lambda n: _varint(n << 3) + b"\xff\xff"),  # truncated varint
        numbers.map(lambda n: _varint(n << 3 | 2) + _varint(1 << 20) + b"ab"),  # short body
        numbers.map(lambda n: _varint(n << 3 | 7) + b"\x00"),  # wire type 7 does not exist
        numbers.map(lambda n: _varint(n << 3 | 3)),  # unterminated group
        st.just(_varint(0) + b"\x00"),  # field number 0
        st.just(_varint(1 << 40)),  # a tag past the 2^29 field numbers
    ]
    strings = [f.number for f in desc.fields if f.type == FieldDescriptor.TYPE_STRING]
    if strings:  # proto3 strings must be valid UTF-8
        cases.append(st.tuples(st.sampled_from(strings), st.sampled_from(
            (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80"))).map(
            lambda nb: _varint(nb[0] << 3 | 2) + _varint(len(nb[1])) + nb[1]))
    if length_delimited:  # a scalar where a length-delimited field belongs
        cases.append(st.sampled_from(length_delimited).map(lambda n: _varint(n << 3) + b"\x05"))
    return st.one_of(cases)


# --------------------------------------------------------------------------- live services


class Recorder(grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
               grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
               grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
               grpc.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Keeps the requests of honest sessions: templates that fuzzed fields are laid over.

    Random bytes rarely make a request a session accepts, so most fuzzing would stop at the
    first check; a recorded honest request with a few fields replaced gets past it.
    """

    def __init__(self) -> None:
        self.kind = ""
        self.calls: dict[str, list[tuple[str, list[Any]]]] = {}

    def _keep(self, details: Any, requests: list[Any]) -> None:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        kept = self.calls.setdefault(method.rsplit("/", 1)[-1], [])
        if len(kept) < 4:
            kept.append((self.kind, requests))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self._keep(details, [request])
        return continuation(details, request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        seen: list[Any] = []
        self._keep(details, seen)

        def tee() -> Iterator[Any]:
            for request in requests:
                if len(seen) < 3:
                    seen.append(request)
                yield request

        return continuation(details, tee())

    intercept_stream_stream = intercept_stream_unary


@dataclass
class Services:
    """The custodian and the requester service of this module, and a channel to each."""

    world: World
    custodian: grpc.Channel
    requester: grpc.Channel
    custodian_address: str
    #: rpc -> (session kind, the requests of one honest call), recorded at start.
    templates: dict[str, list[tuple[str, list[Any]]]] = field(default_factory=dict)
    #: The requester of each live KKRT session, which alone derives its setup (kept; small).
    kkrt: dict[str, RequesterSession] = field(default_factory=dict)

    def open(self, kind: str) -> str:
        """A fresh live session of ``kind`` (a refusal may fail a session: never reuse one)."""
        stub = kit.pb2_grpc.CustodianStub(self.custodian)
        if kind == "@aggregate":
            agg = AggregateRequesterSession(self.world.authorize_aggregate(),
                                            [as_query(self.world.records[0])])
            stub.AggregateOpen(codec.to_pb(agg.open_request()), timeout=RPC_TIMEOUT)
            return agg.session_id
        engine = Engine.KKRT.value if kind == "@kkrt" else Engine.OPRF.value
        session = RequesterSession(self.world.authorize(engines=(engine,)),
                                   [as_query(self.world.records[0])], engine=engine)
        opened = stub.OpenSession(codec.to_pb(session.open_request()), timeout=RPC_TIMEOUT)
        if kind == "@kkrt":
            session.handle(codec.from_pb(OpenResponse, opened))
            self.kkrt[session.session_id] = session
        return session.session_id

    def authorization(self, which: bytes) -> bytes:
        if which == b"@aggregate-auth":
            return self.world.authorize_aggregate().to_bytes()
        return self.world.authorize(engines=(Engine.OPRF.value, Engine.KKRT.value)).to_bytes()

    def resolve(self, pb: Any, live: dict[str, str]) -> Any:
        """``pb`` with its stand-ins replaced by live session ids and valid authorizations.

        ``live`` maps a stand-in to the session opened for it in this call, so the messages
        of one stream share their session.
        """
        for f, value in pb.ListFields():
            if f.name == "session_id" and value in LIVE_SESSIONS:
                if value not in live:
                    live[value] = self.open(value)
                setattr(pb, f.name, live[value])
            elif f.name == "signed_authorization" and value in AUTHORIZATIONS:
                setattr(pb, f.name, self.authorization(value))
            elif f.name == "custodian_address":
                setattr(pb, f.name, self.custodian_address)
            elif f.type == FieldDescriptor.TYPE_MESSAGE and not _is_repeated(f):
                self.resolve(value, live)
        return pb


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    tmp: Path = tmp_path_factory.mktemp("fuzz-rpc")
    world = make_world(tmp, n_records=12,
                       allowed_engines=frozenset({Engine.OPRF.value, Engine.KKRT.value}))
    world.with_tax_paid()
    custodian = world.custodian()
    aggregate = AggregateCustodian(custodian)
    pki = tmp / "pki"
    write_dev_pki(pki, ["agency-a", "agency-b"], server_agencies=["agency-a", "agency-b"])
    tls = kit.TLSFiles.from_dir(pki, "agency-a", "client")  # the custodian's peer, operators
    custodian_server, custodian_port = serve_custodian(
        custodian, kit.TLSFiles.from_dir(pki, "agency-b", "server"), aggregate=aggregate,
        limits=FUZZ_LIMITS)
    address = f"127.0.0.1:{custodian_port}"
    store = ResultStore(tmp / "results.sqlite", os.urandom(KEY_LEN),
                        Ledger(tmp / "requester-ledger.sqlite"))
    service = RequesterService("agency-a", tls, signing_key=world.requester_key,
                               operators=[OPERATOR], store=store)
    requester_server, requester_port = serve_requester(
        service, kit.TLSFiles.from_dir(pki, "agency-a", "server"))
    try:
        with kit.secure_channel(address, tls) as to_custodian, \
                kit.secure_channel(f"127.0.0.1:{requester_port}", tls) as to_requester:
            services = Services(world, to_custodian, to_requester, address)
            services.templates = _record_honest_sessions(world, to_custodian)
            yield services
    finally:
        requester_server.stop(0)
        custodian_server.stop(0)


def _record_honest_sessions(world: World, channel: grpc.Channel
                            ) -> dict[str, list[tuple[str, list[Any]]]]:
    """One honest session of each kind through a :class:`Recorder`; its requests by rpc."""
    recorder = Recorder()
    recorded = grpc.intercept_channel(channel, recorder)
    queries = [as_query(r) for r in world.records[:2]]
    for kind, engine in (("@oprf", Engine.OPRF.value), ("@kkrt", Engine.KKRT.value)):
        recorder.kind = kind
        run_remote_session(RequesterSession(world.authorize(engines=(engine,)), queries,
                                            engine=engine, signing_key=world.requester_key),
                           recorded)
    recorder.kind = "@aggregate"
    run_remote_aggregate(AggregateRequesterSession(world.authorize_aggregate(), queries),
                         recorded)
    return recorder.calls


# --------------------------------------------------------------------------- calls


def _send(channel: grpc.Channel, service: Any, method: MethodDescriptor,
          payloads: list[bytes]) -> None:
    """One call of ``method`` with already-serialized ``payloads``; streams are drained."""
    path = f"/{service.full_name}/{method.name}"
    if method.client_streaming and method.server_streaming:
        list(channel.stream_stream(path)(iter(payloads), timeout=RPC_TIMEOUT))
    elif method.client_streaming:
        channel.stream_unary(path)(iter(payloads), timeout=RPC_TIMEOUT)
    elif method.server_streaming:
        list(channel.unary_stream(path)(payloads[0], timeout=RPC_TIMEOUT))
    else:
        channel.unary_unary(path)(payloads[0], timeout=RPC_TIMEOUT)


def _assert_specific_answer(channel: grpc.Channel, call: Callable[[], None], case: str) -> None:
    """The call succeeded or was refused specifically; the server still answers health."""
    try:
        call()
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
        assert code in REFUSALS, f"{case}: {code.name}: {details[:300]}"
        assert REASON.match(details), f"{case}: {code.name} without a reason: {details[:300]}"
        assert len(details) < MAX_DETAILS, f"{case}: {len(details)}-character details"
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING, case


def _reuse_session_of_kind(pb: Any, kind: str) -> None:
    """Point a recorded request at a fresh session of its kind (an open: at a new id)."""
    fields = pb.DESCRIPTOR.fields_by_name
    if "signed_authorization" in fields:
        pb.session_id = f"fuzz-{uuid.uuid4().hex}"
    elif "session_id" in fields:
        pb.session_id = kind


def _describe(pbs: list[Any]) -> str:
    return " | ".join(repr(pb)[:300].replace("\n", " ") for pb in pbs)


def _assert_an_honest_match_still_succeeds(services: Services) -> None:
    world = services.world
    queries = [as_query(r) for r in world.records[:3]]
    outcome = run_remote_session(
        RequesterSession(world.authorize(), queries, signing_key=world.requester_key),
        services.custodian)
    assert {r.query_record_id for r in outcome.results} == {q.person.record_id for q in queries}


#: Bounded in count and time: no shrinking (each step is a live call), no example database.
FUZZ = settings(max_examples=250, deadline=None, database=None,
                phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _fuzz_generated(services: Services, service: Any, channel: grpc.Channel,
                    max_examples: int) -> None:
    @settings(FUZZ, max_examples=max_examples)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(list(service.methods)), label="rpc")
        strategy = message(method.input_type)
        templates = services.templates.get(method.name, [])
        over_honest = bool(templates) and data.draw(st.booleans(), label="over an honest call")
        if over_honest:
            kind, honest = data.draw(st.sampled_from(templates), label="template")
            pbs = [type(pb).FromString(pb.SerializeToString()) for pb in honest]
            if pbs:
                pbs[data.draw(st.integers(0, len(pbs) - 1))].MergeFrom(data.draw(strategy))
            if data.draw(st.integers(0, 4), label="keep a fuzzed session id") > 0:
                for pb in pbs:
                    _reuse_session_of_kind(pb, kind)
        else:
            count = st.integers(0, 3) if method.client_streaming else st.just(1)
            pbs = data.draw(count.flatmap(lambda n: st.lists(strategy, min_size=n, max_size=n)))
        live: dict[str, str] = {}
        pbs = [services.resolve(pb, live) for pb in pbs]
        payloads = [pb.SerializeToString() for pb in pbs]
        # the client refuses to send more than the limit itself: nothing reaches the server
        assume(all(len(p) <= kit.MAX_MESSAGE_BYTES for p in payloads))
        _assert_specific_answer(channel, lambda: _send(channel, service, method, payloads),
                                f"{method.name}({_describe(pbs)})")

    run()


def test_generated_custodian_requests_get_specific_answers(services: Services) -> None:
    _fuzz_generated(services, CUSTODIAN, services.custodian, max_examples=250)
    _assert_an_honest_match_still_succeeds(services)


def test_generated_requester_requests_get_specific_answers(services: Services) -> None:
    _fuzz_generated(services, REQUESTER, services.requester, max_examples=60)
    _assert_an_honest_match_still_succeeds(services)


def _fuzz_undecodable(service: Any, channel: grpc.Channel, max_examples: int) -> None:
    @settings(FUZZ, max_examples=max_examples)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(list(service.methods)), label="rpc")
        count = st.integers(1, 3) if method.client_streaming else st.just(1)
        payloads = data.draw(count.flatmap(
            lambda n: st.lists(broken_wire(method.input_type), min_size=n, max_size=n)))
        _assert_specific_answer(channel, lambda: _send(channel, service, method, payloads),
                                f"{method.name}({payloads!r:.300})")

    run()


def test_undecodable_custodian_requests_get_specific_answers(services: Services) -> None:
    _fuzz_undecodable(CUSTODIAN, services.custodian, max_examples=100)
    _assert_an_honest_match_still_succeeds(services)


def test_undecodable_requester_requests_get_specific_answers(services: Services) -> None:
    _fuzz_undecodable(REQUESTER, services.requester, max_examples=40)


def test_the_fuzzing_starts_from_live_sessions_and_honest_requests(services: Services) -> None:
    """Stand-ins reach live sessions and every streaming custodian RPC has an honest template,
    so the fuzzing goes past the session lookup and the first checks."""
    streaming = {m.name for m in CUSTODIAN.methods if m.client_streaming}
    assert streaming | {"OpenSession", "AggregateOpen"} <= set(services.templates)
    for kind in LIVE_SESSIONS:
        sid = services.resolve(pb2.SessionRef(session_id=kind), {}).session_id
        assert sid and sid not in LIVE_SESSIONS
    _assert_an_honest_match_still_succeeds(services)


def _refusal_of(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_every_custodian_rpc_refuses_bytes_that_are_no_message(services: Services) -> None:
    """What the fuzzing samples, for each RPC once: invalid UTF-8 where a string belongs."""
    for method in CUSTODIAN.methods:
        text = next((f for f in method.input_type.fields
                     if f.type == FieldDescriptor.TYPE_STRING), None)
        payload = (_varint(text.number << 3 | 2) + b"\x02\xc3\x28") if text else b"\x0f\x00"
        err = _refusal_of(partial(_send, services.custodian, CUSTODIAN, method, [payload]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, err.details())
        assert err.details().startswith(
            f"malformed_message: not a well-formed {method.input_type.name}: "), err.details()


def test_a_count_of_2_63_is_invalid_argument_not_unknown(services: Services) -> None:
    """The review's finding: counts at or past 2^63 answered UNKNOWN (an overflow)."""
    stub = kit.pb2_grpc.CustodianStub(services.custodian)
    request = pb2.OpenSessionRequest(
        session_id=f"fuzz-{uuid.uuid4().hex}", tier="identity", match_rules=["tin+dob"],
        signed_authorization=services.authorization(b"@identity-auth"), element_count=2**63)
    err = _refusal_of(lambda: stub.OpenSession(request, timeout=RPC_TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (f"integer_too_large: OpenSessionRequest.element_count is {2**63}; "
                             f"the limit is 2^63-1 ({2**63 - 1})")
    chunk = pb2.ElementChunk(session_id=services.open("@oprf"), seq=2**64 - 1,
                             elements=POINTS[:32])
    err = _refusal_of(lambda: list(stub.Evaluate(iter([chunk]), timeout=RPC_TIMEOUT)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("integer_too_large: ElementChunk.seq is 1844674407")
