"""Custodian gRPC service: a thin adapter from ``Custodian`` RPCs to ``CustodianSession``.

It authenticates the caller from its mTLS certificate, finds the caller's
session, passes messages in and replies out, and maps library errors to
status codes.  Every decision is made by the sessions (``protocol.sessions``) and
``protocol.policy.decide``.  Both tiers run on the session core: what a session accepts goes
through ``handle`` and what it streams through ``send``, so an RPC of one tier (or engine)
on a session of another reaches the session, whose transition table refuses it with a
``ProtocolError`` (FAILED_PRECONDITION).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from proto import codec
from proto import service_kit as kit
from protocol.crypto.kkrt import KKRTExtensionChunk, KKRTSetup, KKRTTagChunk
from protocol.domain.engine import Engine
from protocol.domain.messages import (
    CloseRequest,
    DisclosureRequest,
    EvaluateChunk,
    OpenRequest,
    Receipt,
    TagChunk,
)
from protocol.errors import ProtocolError, PSIError
from protocol.sessions.aggregate import (
    AggregateCustodian,
    AggregateOpenRequest,
    BlindedChunk,
    CustodianPairsChunk,
    DoubleBlindedChunk,
    MaskedSum,
)
from protocol.sessions.core import MAX_SESSION_ID, CustodianCore
from protocol.sessions.identity import Custodian

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc
log = logging.getLogger("agency_b")

SERVICE_NAME = "gatedpsi.v1.Custodian"
#: Live sessions kept in memory; the oldest idle ones are dropped beyond this.
MAX_LIVE_SESSIONS = 256


@dataclass
class _Live:
    session: CustodianCore  # a CustodianSession or an AggregateCustodianSession
    peer: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    touched: float = field(default_factory=time.monotonic)


class CustodianService(kit.CustodianServicer):
    """gRPC face of a ``Custodian``; one ``CustodianSession`` per session id."""

    def __init__(self, custodian: Custodian,
                 aggregate: AggregateCustodian | None = None) -> None:
        self.custodian = custodian
        self.aggregate = aggregate
        self._sessions: OrderedDict[str, _Live] = OrderedDict()
        self._lock = threading.Lock()
        self._public_key = custodian.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    # -- helpers -----------------------------------------------------------------

    def _live(self, session_id: str, peer: str, context: grpc.ServicerContext) -> _Live:
        if len(session_id) > MAX_SESSION_ID:  # never opened; too long to echo in a status
            kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      f"invalid_session_id: a session id has 1..{MAX_SESSION_ID} characters, "
                      f"not {len(session_id)}")
        with self._lock:
            live = self._sessions.get(session_id)
        if live is None:
            kit.abort(context, grpc.StatusCode.NOT_FOUND,
                      f"unknown_session: no open session {session_id!r}")
        if live.peer != peer:
            kit.abort(context, grpc.StatusCode.PERMISSION_DENIED,
                      "requester_mismatch: the session belongs to another agency")
        live.touched = time.monotonic()
        return live

    def _refuse(self, context: grpc.ServicerContext, exc: BaseException, **fields: Any) -> None:
        kit.log_event(log, "refused", logging.WARNING, status=kit.status_for(exc).name,
                      reason=kit.error_message(exc), **fields)
        kit.abort_for(context, exc)

    # -- RPCs --------------------------------------------------------------------

    def _register(self, session_id: str, live: _Live) -> None:
        with self._lock:
            self._sessions[session_id] = live
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > MAX_LIVE_SESSIONS:
                self._sessions.popitem(last=False)

    # -- aggregate tiers -----------------------------------------------------------

    def AggregateOpen(self, request: Any, context: grpc.ServicerContext) -> Any:
        peer = kit.peer_agency(context)
        if self.aggregate is None:
            kit.abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                      "tier_not_permitted: this custodian serves no aggregate tier")
        msg = codec.from_pb(AggregateOpenRequest, request)
        session = self.aggregate.session()
        try:
            reply = session.handle(msg, peer_id=peer)
        except PSIError as exc:
            self._refuse(context, exc, rpc="AggregateOpen", peer=peer,
                         session=request.session_id)
        self._register(request.session_id, _Live(session, peer))
        kit.log_event(log, "aggregate_opened", peer=peer, session=request.session_id,
                      tier=reply.tier, elements=reply.element_count, pairs=reply.pair_count)
        return codec.to_pb(reply, custodian_public_key=self._public_key)

    def AggregateUpload(self, request_iterator: Iterator[Any],
                        context: grpc.ServicerContext) -> Any:
        peer = kit.peer_agency(context)
        count = 0
        for pb in request_iterator:
            live = self._live(pb.session_id, peer, context)
            try:
                with live.lock:
                    live.session.handle(codec.from_pb(BlindedChunk, pb), peer_id=peer)
            except PSIError as exc:
                self._refuse(context, exc, rpc="AggregateUpload", peer=peer)
            count += len(pb.elements) // 32
        return pb2.UploadAck(elements=count)

    def AggregateDoubleBlinded(self, request: Any, context: grpc.ServicerContext
                               ) -> Iterator[Any]:
        peer = kit.peer_agency(context)
        live = self._live(request.session_id, peer, context)
        try:
            with live.lock:
                chunks = list(live.session.send(DoubleBlindedChunk, peer_id=peer))
        except PSIError as exc:
            self._refuse(context, exc, rpc="AggregateDoubleBlinded", peer=peer)
        for c in chunks:
            yield codec.to_pb(c, session_id=request.session_id)

    def AggregatePairs(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        peer = kit.peer_agency(context)
        live = self._live(request.session_id, peer, context)
        try:
            with live.lock:
                for c in live.session.send(CustodianPairsChunk, peer_id=peer):
                    yield codec.to_pb(c)
        except PSIError as exc:
            self._refuse(context, exc, rpc="AggregatePairs", peer=peer)

    def AggregateReveal(self, request: Any, context: grpc.ServicerContext) -> Any:
        peer = kit.peer_agency(context)
        live = self._live(request.session_id, peer, context)
        try:
            with live.lock:
                reveal = live.session.handle(codec.from_pb(MaskedSum, request), peer_id=peer)
        except PSIError as exc:
            self._refuse(context, exc, rpc="AggregateReveal", peer=peer)
        kit.log_event(log, "aggregate_released", peer=peer, session=request.session_id,
                      withheld=reveal.withheld, reason=reveal.reason)
        return codec.to_pb(reveal)

    # -- KKRT engine ----------------------------------------------------------------

    def KKRTSetup(self, request: Any, context: grpc.ServicerContext) -> Any:
        peer = kit.peer_agency(context)
        live = self._live(request.session_id, peer, context)
        msg = codec.from_pb(KKRTSetup, request)
        try:
            with live.lock:
                reply = live.session.handle(msg, peer_id=peer)
        except PSIError as exc:
            self._refuse(context, exc, rpc="KKRTSetup", peer=peer)
        return codec.to_pb(reply)

    def KKRTExtend(self, request_iterator: Iterator[Any], context: grpc.ServicerContext
                   ) -> Any:
        peer = kit.peer_agency(context)
        bins, busy, started = 0, 0.0, time.perf_counter()
        for pb in request_iterator:
            live = self._live(pb.session_id, peer, context)
            chunk = codec.from_pb(KKRTExtensionChunk, pb)
            t = time.perf_counter()
            try:
                with live.lock:
                    live.session.handle(chunk, peer_id=peer)
            except PSIError as exc:
                self._refuse(context, exc, rpc="KKRTExtend", peer=peer)
            busy += time.perf_counter() - t
            bins += pb.bins
        kit.log_event(log, "evaluated", peer=peer, engine=Engine.KKRT.value, bins=bins,
                      seconds=round(time.perf_counter() - started, 3),
                      compute_seconds=round(busy, 3))
        return pb2.UploadAck(elements=bins)

    def KKRTTags(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        peer = kit.peer_agency(context)
        live = self._live(request.session_id, peer, context)
        try:
            with live.lock:
                for c in live.session.send(KKRTTagChunk, request.chunk_tags or 65_536,
                                                  peer_id=peer):
                    yield codec.to_pb(c)
        except PSIError as exc:
            self._refuse(context, exc, rpc="KKRTTags", peer=peer)

    # -- identity tier -------------------------------------------------------------

    def OpenSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        peer = kit.peer_agency(context)
        msg = codec.from_pb(OpenRequest, request)
        session = self.custodian.session()
        try:
            reply = session.handle(msg, peer_id=peer)
        except PSIError as exc:
            self._refuse(context, exc, rpc="OpenSession", peer=peer, session=msg.session_id)
        self._register(msg.session_id, _Live(session, peer))
        kit.log_event(log, "session_opened", peer=peer, session=msg.session_id,
                      authorization=reply.authorization_id, elements=reply.element_count,
                      tags=reply.tag_count, budget_remaining=reply.budget_remaining)
        return codec.to_pb(reply, custodian_public_key=self._public_key)

    def StreamTags(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        peer = kit.peer_agency(context)
        live = self._live(request.session_id, peer, context)
        chunk_tags = request.chunk_tags or 65_536
        chunk_tags = max(1, min(chunk_tags, 262_144))
        try:
            with live.lock:
                chunks = list(live.session.send(TagChunk, chunk_tags, peer_id=peer))
        except PSIError as exc:
            self._refuse(context, exc, rpc="StreamTags", peer=peer)
        for chunk in chunks:
            if not context.is_active():
                return
            yield codec.to_pb(chunk)

    def Evaluate(self, request_iterator: Iterator[Any], context: grpc.ServicerContext
                 ) -> Iterator[Any]:
        peer = kit.peer_agency(context)
        count = 0
        for pb in request_iterator:
            live = self._live(pb.session_id, peer, context)
            try:
                with live.lock:
                    reply = live.session.handle(codec.from_pb(EvaluateChunk, pb), peer_id=peer)
            except PSIError as exc:
                self._refuse(context, exc, rpc="Evaluate", peer=peer, session=pb.session_id,
                             seq=pb.seq)
            count += len(pb.elements) // 32
            yield codec.to_pb(reply, session_id=pb.session_id)
        kit.log_event(log, "evaluated", peer=peer, elements=count)

    def Disclose(self, request_iterator: Iterator[Any], context: grpc.ServicerContext
                 ) -> Iterator[Any]:
        peer = kit.peer_agency(context)
        for pb in request_iterator:
            live = self._live(pb.session_id, peer, context)
            try:
                with live.lock:
                    reply = live.session.handle(codec.from_pb(DisclosureRequest, pb),
                                                peer_id=peer)
            except PSIError as exc:
                self._refuse(context, exc, rpc="Disclose", peer=peer, session=pb.session_id)
            kit.log_event(log, "disclosed", peer=peer, session=pb.session_id,
                          released=len(reply.disclosures), rejected=len(reply.rejected))
            yield codec.to_pb(reply)

    def CloseSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        peer = kit.peer_agency(context)
        live = self._live(request.session_id, peer, context)
        try:
            with live.lock:
                receipt = live.session.handle(codec.from_pb(CloseRequest, request),
                                              peer_id=peer)
        except PSIError as exc:
            self._refuse(context, exc, rpc="CloseSession", peer=peer)
        kit.log_event(log, "session_closed", peer=peer, session=request.session_id,
                      evaluated=receipt.evaluated, disclosed=receipt.disclosed)
        return codec.to_pb(receipt)

    def Countersign(self, request: Any, context: grpc.ServicerContext) -> Any:
        peer = kit.peer_agency(context)
        live = self._live(request.session_id, peer, context)
        try:
            with live.lock:
                live.session.countersign(codec.from_pb(Receipt, request), peer_id=peer)
        except PSIError as exc:
            self._refuse(context, exc, rpc="Countersign", peer=peer)
        with self._lock:
            self._sessions.pop(request.session_id, None)
        return pb2.CountersignAck(stored=True)


def serve(custodian: Custodian, tls: kit.TLSFiles, listen: str = "127.0.0.1:0",
          *, max_workers: int = 16, aggregate: AggregateCustodian | None = None,
          ) -> tuple[grpc.Server, int]:
    """Start the custodian service; returns (server, port).  Caller stops it."""
    service = CustodianService(custodian, aggregate)
    server, port, _health = kit.build_server(
        [(pb2_grpc.add_CustodianServicer_to_server, service)], [SERVICE_NAME], tls, listen,
        max_workers=max_workers,
    )
    server.start()
    return server, port


__all__ = ["SERVICE_NAME", "CustodianService", "ProtocolError", "serve"]
