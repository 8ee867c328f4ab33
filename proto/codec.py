"""Protobuf <-> protocol messages: the one place wire messages are translated.

The services and the requester's client are thin adapters (docs/architecture.md, Services):
they call :func:`to_pb` on every message they send and :func:`from_pb` on every message they
receive, and hand protocol dataclasses to sessions. One table, :data:`WIRE`, names the
protobuf message of every protocol message; fields are copied by name, repeated fields become
tuples, and the few fields whose shape differs on the wire have a converter in the table.

Fields the wire carries around a message rather than in it (the ``session_id`` of a chunk,
the custodian's receipt key in an open response) are passed to :func:`to_pb` as keyword
``envelope`` fields and read by the service from the protobuf itself.

Decoding is checked here too, in one place, whichever peer sent the message
(docs/architecture.md, Threat model: peers may be malicious).  :func:`validate` holds the
limits (:data:`MAX_WIRE_INTEGER`, :data:`MAX_STRING_CHARS`, :data:`MAX_REPEATED_ENTRIES`);
:func:`from_pb` applies them to every message a client or service translates, and
:func:`add_servicer` registers a service whose request decoder applies them to every request
and turns bytes that are no valid protobuf into an INVALID_ARGUMENT refusal (gRPC's own
deserializer would answer INTERNAL) before the RPC body runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from proto import load
from proto import service_kit as kit
from protocol.cli.dev_pki import agency_id_from_auth_context
from protocol.crypto import kkrt
from protocol.domain import messages as m
from protocol.engines import epoch
from protocol.errors import InvalidElementError
from protocol.sessions import aggregate as agg

if TYPE_CHECKING:
    from protocol.accounting.refusals import RefusalLimiter

pb2: Any  # generated at build time (proto.load), so untyped here
pb2, _ = load()
log = logging.getLogger("proto.codec")

T = TypeVar("T")

#: Largest integer any message may carry.  Counts and sequence numbers end in SQLite INTEGER
#: columns and signed arithmetic (64-bit two's complement), so a uint64 at or above 2^63 is
#: refused when decoded rather than overflowing deep inside a session.
MAX_WIRE_INTEGER = 2**63 - 1
#: Longest string field: ids, rule and field names, engine and tier names, an operator's
#: purpose.  None is legitimately near this; a longer one only costs memory and log space.
MAX_STRING_CHARS = 4096
#: Most entries of one repeated field.  The largest legitimate one is a disclosure reply:
#: ``MAX_DISCLOSURE_BATCH`` outputs, each disclosing up to ``MAX_HOLDERS_PER_KEY`` records
#: (a 1.28M x 10M run hit 4,097 disclosures for 4,096 outputs).
MAX_REPEATED_ENTRIES = m.MAX_DISCLOSURE_BATCH * m.MAX_HOLDERS_PER_KEY


@dataclass(frozen=True)
class Convert:
    """How one dataclass field crosses the wire when it is not a plain copy."""

    pb_field: str
    to_pb: Callable[[Any], Any]
    from_pb: Callable[[Any], Any]


@dataclass(frozen=True)
class Wire:
    """The protobuf message of one protocol message, and its non-trivial fields."""

    pb_message: str
    converts: Mapping[str, Convert] = field(default_factory=dict)


def _pairs(pb_field: str, pb_message: str, first: str, second: str) -> Convert:
    """``tuple[tuple[a, b], ...]`` <-> a repeated two-field protobuf message."""
    return Convert(
        pb_field,
        lambda pairs: [getattr(pb2, pb_message)(**{first: a, second: b}) for a, b in pairs],
        lambda items: tuple((getattr(i, first), getattr(i, second)) for i in items),
    )


def _nested(pb_field: str, kind: type) -> Convert:
    """A tuple of protocol messages <-> a repeated protobuf message of the table."""
    return Convert(
        pb_field,
        lambda items: [to_pb(i) for i in items],
        # the enclosing message was validated whole (``validate`` recurses): decode only
        lambda items: tuple(_decode(kind, i) for i in items),
    )


def _signed_int(pb_field: str) -> Convert:
    """``int | None`` <-> two's-complement big-endian bytes (empty = None): an exact sum of
    any size, where a 64-bit field could overflow."""
    def to_pb(value: int | None) -> bytes:
        if value is None:
            return b""
        return value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)

    def from_pb(raw: bytes) -> int | None:
        return int.from_bytes(raw, "big", signed=True) if raw else None

    return Convert(pb_field, to_pb, from_pb)


WIRE: dict[type, Wire] = {
    # identity tier
    m.OpenRequest: Wire("OpenSessionRequest"),
    m.OpenResponse: Wire("OpenSessionResponse"),
    m.TagChunk: Wire("TagChunk"),
    m.EvaluateChunk: Wire("ElementChunk"),
    m.EvaluatedChunk: Wire("ElementChunk"),
    m.DisclosureRequest: Wire(
        "DisclosureRequest", {"outputs": _pairs("items", "DisclosureItem", "rule_id", "output")}
    ),
    m.Disclosure: Wire("Disclosure", {"fields": _pairs("fields", "Field", "name", "value")}),
    m.DisclosureResponse: Wire(
        "DisclosureResponse", {"disclosures": _nested("disclosures", m.Disclosure)}
    ),
    m.CloseRequest: Wire("CloseSessionRequest"),
    m.Receipt: Wire("ReceiptMessage"),
    # KKRT engine
    kkrt.KKRTSetup: Wire("KKRTSetupMessage"),
    kkrt.KKRTBaseOTReply: Wire("KKRTBaseOTReplyMessage"),
    kkrt.KKRTExtensionChunk: Wire("KKRTExtensionChunkMessage"),
    kkrt.KKRTTagChunk: Wire("KKRTTagChunkMessage"),
    # key-epoch engine (national custodian)
    epoch.TagSetRequest: Wire("TagSetRequest"),
    epoch.TagSetChunk: Wire("TagSetChunkMessage"),
    # aggregate tiers
    agg.AggregateOpenRequest: Wire("AggregateOpenRequest"),
    agg.AggregateOpenResponse: Wire("AggregateOpenResponse"),
    agg.BlindedChunk: Wire("ElementChunk"),
    agg.CustodianChunk: Wire("ElementChunk"),
    agg.ReblindedChunk: Wire("ElementChunk"),
    agg.MatchChallenge: Wire("MatchChallengeMessage"),
    agg.ConsistencyProof: Wire("ConsistencyProofMessage"),
    agg.AggregateRelease: Wire("AggregateReleaseMessage", {"sum": _signed_int("sum")}),
}

_FIELDS = {kind: dataclasses.fields(kind) for kind in WIRE}


def to_pb(message: object, **envelope: Any) -> Any:
    """The protobuf form of ``message``, plus ``envelope`` fields (e.g. ``session_id``)."""
    wire = WIRE[type(message)]
    values: dict[str, Any] = {}
    for f in _FIELDS[type(message)]:
        value = getattr(message, f.name)
        convert = wire.converts.get(f.name)
        if convert is not None:
            values[convert.pb_field] = convert.to_pb(value)
        else:
            values[f.name] = list(value) if isinstance(value, tuple) else value
    return getattr(pb2, wire.pb_message)(**values, **envelope)


def from_pb(kind: type[T], pb: Any) -> T:
    """The protocol message ``kind`` carried by ``pb``.

    proto3 cannot tell an unset string from an empty one, so an empty string takes the
    dataclass default where there is one (an old client that sends no engine name gets the
    default engine).  Raises :class:`InvalidElementError` when ``pb`` breaks a wire limit.
    """
    validate(pb)
    return _decode(kind, pb)


def _decode(kind: type[T], pb: Any) -> T:
    """``from_pb`` of a message already validated (with everything nested in it)."""
    wire = WIRE[kind]
    values: dict[str, Any] = {}
    for f in _FIELDS[kind]:
        convert = wire.converts.get(f.name)
        if convert is not None:
            values[f.name] = convert.from_pb(getattr(pb, convert.pb_field))
            continue
        value = getattr(pb, f.name)
        if value == "" and f.default is not dataclasses.MISSING:
            continue
        values[f.name] = value if isinstance(value, str | bytes | int | float) else tuple(value)
    return kind(**values)


# ------------------------------------------------------------------ checked decoding


#: Field types whose values :func:`validate` reads: only these can break a limit (a uint64
#: alone can pass 2^63-1; a bytes field is the sessions' to size, by its meaning).
_READ_TYPES = frozenset({FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE,
                         FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64})
_PLANS: dict[str, tuple[tuple[str, bool, int], ...]] = {}


def _plan(descriptor: Any) -> tuple[tuple[str, bool, int], ...]:
    """(name, repeated, type) of the fields of a message that can break a limit."""
    plan = _PLANS.get(descriptor.full_name)
    if plan is None:
        plan = _PLANS[descriptor.full_name] = tuple(
            (f.name, bool(f.is_repeated), f.type) for f in descriptor.fields
            if f.is_repeated or f.type in _READ_TYPES)
    return plan


def _too_far(descriptor: Any, name: str, code: str, text: str) -> InvalidElementError:
    return InvalidElementError(f"{descriptor.name}.{name} {text}", code=code)


def validate(pb: Any) -> None:
    """Refuse a decoded message that breaks a wire limit (nested messages included).

    Bytes fields are never read (a 2 MiB chunk is not copied to be checked); lengths and
    shapes that depend on the session (element sizes, chunk sizes) are the sessions' to
    check.  These limits hold for every message whatever its state.
    """
    _validate_all((pb,), pb.DESCRIPTOR)


def _validate_all(pbs: Sequence[Any], descriptor: Any) -> None:
    """:func:`validate` over messages of one type, a field at a time.

    A disclosure reply nests thousands of messages, each with its own repeated pairs; one
    pass per field over all of them, rather than a call per message, halved the check of
    a 4,096-record reply (about 22 ms to 11 ms). The report names the field and the worst
    value of the whole message.
    """
    for name, repeated, kind in _plan(descriptor):
        items: Sequence[Any]
        if repeated:
            lists = [getattr(pb, name) for pb in pbs]
            longest = max(map(len, lists), default=0)
            if longest > MAX_REPEATED_ENTRIES:
                raise _too_far(descriptor, name, "too_many_entries",
                               f"has {longest} entries; the limit is {MAX_REPEATED_ENTRIES}")
            if kind not in _READ_TYPES or not longest:
                continue
            items = lists[0] if len(lists) == 1 else [x for xs in lists for x in xs]
        elif kind == FieldDescriptor.TYPE_MESSAGE:
            items = [getattr(pb, name) for pb in pbs if pb.HasField(name)]
        else:
            items = [getattr(pb, name) for pb in pbs]
        if not items:
            continue
        if kind == FieldDescriptor.TYPE_MESSAGE:
            _validate_all(items, descriptor.fields_by_name[name].message_type)
        elif kind == FieldDescriptor.TYPE_STRING:
            longest = max(map(len, items))
            if longest > MAX_STRING_CHARS:
                raise _too_far(descriptor, name, "field_too_long",
                               f"has {longest} characters; the limit is {MAX_STRING_CHARS}")
        else:
            largest = max(items)
            if largest > MAX_WIRE_INTEGER:
                raise _too_far(descriptor, name, "integer_too_large",
                               f"is {largest}; the limit is 2^63-1 ({MAX_WIRE_INTEGER})")


@dataclass(frozen=True)
class Undecodable:
    """A request that failed decoding; its RPC is refused with ``error`` before it runs."""

    error: InvalidElementError


def request_decoder(pb_class: Any) -> Callable[[bytes], Any]:
    """The server's deserializer for ``pb_class``: a checked message, or :class:`Undecodable`.

    gRPC answers INTERNAL when a deserializer raises, so this one never does.
    """
    name = pb_class.DESCRIPTOR.name

    def decode(data: bytes) -> Any:
        try:
            pb = pb_class.FromString(data)
        except DecodeError as exc:  # protobuf's text names the type and the fault, not data
            return Undecodable(InvalidElementError(
                f"not a well-formed {name}: {str(exc)[:200]}", code="malformed_message"))
        try:
            validate(pb)
        except InvalidElementError as exc:
            return Undecodable(exc)
        return pb

    return decode


def _refuse(context: grpc.ServicerContext, rpc: str, error: InvalidElementError,
            refusal_log: RefusalLimiter) -> NoReturn:
    peer = agency_id_from_auth_context(context.auth_context()) or "unauthenticated"
    kit.log_limited(log, refusal_log, "refused", peer, time.monotonic(), rpc=rpc,
                    status=kit.status_for(error).name, reason=kit.error_message(error))
    kit.abort_for(context, error)


def _checked(rpc: str, client_streaming: bool, behavior: Callable[..., Any],
             refusal_log: RefusalLimiter) -> Callable[..., Any]:
    """``behavior`` behind a check that refuses an :class:`Undecodable` request or chunk."""
    if client_streaming:
        def stream_call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            def checked() -> Iterator[Any]:
                for request in requests:
                    if isinstance(request, Undecodable):
                        _refuse(context, rpc, request.error, refusal_log)
                    yield request
            return behavior(checked(), context)
        return stream_call

    def unary_call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            _refuse(context, rpc, request.error, refusal_log)
        return behavior(request, context)
    return unary_call


_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., Any]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(service: str, refusal_log: RefusalLimiter | None = None
                 ) -> Callable[[Any, grpc.Server], None]:
    """Like the generated ``add_<service>Servicer_to_server``, but every request is checked.

    The handlers come from the service's descriptor, so the schema stays the one source;
    each method decodes with :func:`request_decoder` and refuses what does not decode.
    Refusals are logged within ``refusal_log``'s per-peer budget (the custodian passes the
    one its policy configures), so undecodable floods cost a bounded number of log lines.
    """
    descriptor = pb2.DESCRIPTOR.services_by_name[service]
    limiter = refusal_log or kit.service_refusal_log()

    def add(servicer: Any, server: grpc.Server) -> None:
        handlers = {
            method.name: _HANDLER_KINDS[(method.client_streaming, method.server_streaming)](
                _checked(method.name, method.client_streaming, getattr(servicer, method.name),
                         limiter),
                request_deserializer=request_decoder(getattr(pb2, method.input_type.name)),
                response_serializer=getattr(pb2, method.output_type.name).SerializeToString,
            )
            for method in descriptor.methods
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
        server.add_registered_method_handlers(descriptor.full_name, handlers)

    return add
