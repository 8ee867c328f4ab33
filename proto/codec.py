"""Protobuf <-> protocol messages: the one place wire messages are translated.

The services and the requester's client are thin adapters (docs/architecture.md, Services):
they call :func:`to_pb` on every message they send and :func:`from_pb` on every message they
receive, and hand protocol dataclasses to sessions. One table, :data:`WIRE`, names the
protobuf message of every protocol message; fields are copied by name, repeated fields become
tuples, and the few fields whose shape differs on the wire have a converter in the table.

Fields the wire carries around a message rather than in it (the ``session_id`` of a chunk,
the custodian's receipt key in an open response) are passed to :func:`to_pb` as keyword
``envelope`` fields and read by the service from the protobuf itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from proto import load
from protocol.crypto import kkrt
from protocol.domain import messages as m
from protocol.sessions import aggregate as agg

pb2: Any  # generated at build time (proto.load), so untyped here
pb2, _ = load()

T = TypeVar("T")


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
        lambda items: tuple(from_pb(kind, i) for i in items),
    )


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
    # aggregate tiers
    agg.AggregateOpenRequest: Wire("AggregateOpenRequest"),
    agg.AggregateOpenResponse: Wire("AggregateOpenResponse"),
    agg.BlindedChunk: Wire("ElementChunk"),
    agg.DoubleBlindedChunk: Wire("ElementChunk"),
    agg.CustodianPairsChunk: Wire("PairsChunk"),
    agg.MaskedSum: Wire("MaskedSumMessage"),
    agg.SumReveal: Wire("SumRevealMessage"),
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
    default engine).
    """
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
