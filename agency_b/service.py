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

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from proto import codec
from proto import service_kit as kit
from proto.limits import CallGuard, ServiceLimits
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
from protocol.engines.epoch import TagSetRequest
from protocol.errors import ProtocolError, PSIError
from protocol.sessions.aggregate import (
    ELEMENT_SIZE,
    AggregateCustodian,
    AggregateOpenRequest,
    BlindedChunk,
    ConsistencyProof,
    CustodianChunk,
    MatchChallenge,
    ReblindedChunk,
)
from protocol.sessions.core import MAX_SESSION_ID, CustodianCore
from protocol.sessions.identity import Custodian

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc
log = logging.getLogger("agency_b")

SERVICE_NAME = "gatedpsi.v1.Custodian"
#: Ids of sessions closed for idleness, remembered to name that in a later call's status.
_EXPIRED_REMEMBERED = 1024
#: HTTP/2 streams one connection may have open at once; more wait in the client, so a
#: connection's cost to this server is bounded whatever the peer asks for.
_STREAMS_PER_CONNECTION = 100


@dataclass
class _Live:
    session: CustodianCore  # a CustodianSession or an AggregateCustodianSession
    peer: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    touched: float = field(default_factory=time.monotonic)


_RPC = Callable[["CustodianService", Any, grpc.ServicerContext], Any]


def _ended(live: _Live) -> bool:
    """Closed with a receipt, or failed: nothing left to run, its account is in the ledger."""
    return live.session.receipt is not None or bool(live.session.failure_reason)


def _opens_session(rpc: _RPC) -> _RPC:
    """Admit an open only if the caller's agency, and the server, have room for one more
    live session (``ServiceLimits``), *before* the session reserves any budget; the claim
    becomes the session in ``_register`` or is dropped when the call ends."""

    @functools.wraps(rpc)
    def admitted(self: CustodianService, request: Any, context: grpc.ServicerContext) -> Any:
        self._claim_session(kit.peer_agency(context), request.session_id, context)
        try:
            return rpc(self, request, context)
        finally:
            self._drop_claim()

    return admitted


class CustodianService(kit.CustodianServicer):
    """gRPC face of a ``Custodian``; one ``CustodianSession`` per session id.

    Live sessions are bounded per agency and in total and never evicted: an open beyond
    either limit is refused (RESOURCE_EXHAUSTED), and a session idle past
    ``session_idle_seconds`` is closed with a signed receipt (``reap_idle``), so its
    reservation is settled in the ledger, not lost (docs/architecture.md, Resource limits).
    """

    def __init__(self, custodian: Custodian,
                 aggregate: AggregateCustodian | None = None,
                 limits: ServiceLimits | None = None) -> None:
        self.custodian = custodian
        self.aggregate = aggregate
        self.limits = limits or ServiceLimits()
        self._sessions: OrderedDict[str, _Live] = OrderedDict()
        self._lock = threading.Lock()
        self._public_key = custodian.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        #: opens admitted but not yet registered, per agency (they count as live sessions)
        self._claims: dict[str, int] = {}
        self._claim = threading.local()  # the agency this thread's open claimed for
        self._expired: OrderedDict[str, str] = OrderedDict()  # session id -> its agency
        self.call_guard = CallGuard(self.limits, [SERVICE_NAME], housekeeping=self.reap_idle,
                                    refusal_log=custodian.config.refusal_log)

    # -- helpers -----------------------------------------------------------------

    def _live(self, session_id: str, peer: str, context: grpc.ServicerContext) -> _Live:
        if len(session_id) > MAX_SESSION_ID:  # never opened; too long to echo in a status
            kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      f"invalid_session_id: a session id has 1..{MAX_SESSION_ID} characters, "
                      f"not {len(session_id)}")
        with self._lock:
            live = self._sessions.get(session_id)
            expired = self._expired.get(session_id) == peer
        if live is None and expired:
            kit.abort(context, grpc.StatusCode.NOT_FOUND,
                      f"session_expired: session {session_id!r} was closed after "
                      f"{self.limits.session_idle_seconds:g} s without a call; its receipt "
                      "is in the custodian's ledger")
        if live is None or live.peer != peer:
            # Another agency's session gets the very answer an unknown id gets: a refusal
            # is no oracle on which session ids exist (issue 13).
            kit.abort(context, grpc.StatusCode.NOT_FOUND,
                      f"unknown_session: no open session {session_id!r}")
        live.touched = time.monotonic()
        return live

    def _refuse(self, context: grpc.ServicerContext, exc: BaseException, **fields: Any) -> None:
        """Log (rate-limited per peer, like the audit; strings clipped) and abort.

        Beyond the peer's budget of logged refusals a line is only counted; the next line
        logged for that peer says how many were suppressed (docs/architecture.md, Accounting).
        """
        peer = str(fields.pop("peer", ""))
        kit.log_limited(log, self.custodian.config.refusal_log, "refused", peer,
                        time.monotonic(), status=kit.status_for(exc).name,
                        reason=kit.error_message(exc), **fields)
        kit.abort_for(context, exc)

    # -- RPCs --------------------------------------------------------------------

    def _register(self, session_id: str, live: _Live) -> None:
        """Keep an opened session; it takes the place its open claimed (never another's)."""
        with self._lock:
            if getattr(self._claim, "peer", None) == live.peer:
                self._claim.peer = None
                self._claims[live.peer] -= 1
            held = self._sessions.get(session_id)
            if held is not None and held.peer != live.peer:  # the ledger refuses this first
                raise ProtocolError(f"session id {session_id!r} is held by another agency")
            self._sessions[session_id] = live
            self._sessions.move_to_end(session_id)
            self._expired.pop(session_id, None)

    # -- resource limits (docs/architecture.md, Resource limits) -----------------------

    def _claim_session(self, peer: str, session_id: str, context: grpc.ServicerContext
                       ) -> None:
        """Claim room for one more live session of ``peer``, or refuse the open at once."""
        refusal = self._session_room(peer, session_id)
        if refusal:  # idle sessions are closed to make room, never live ones
            self.reap_idle()
            refusal = self._session_room(peer, session_id)
        if refusal:
            self.call_guard.log_refusal(peer, "open", refusal)
            kit.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)

    def _session_room(self, peer: str, session_id: str) -> str:
        """Take a claim if there is room (returns ""), else say which limit is reached.

        Only sessions still running count; ended ones (closed with a receipt, or failed)
        keep their state in the ledger and are dropped from memory first, the caller's own
        oldest first, so memory never holds more than ``sessions_total`` sessions.
        """
        lim = self.limits
        with self._lock:
            held = self._sessions.get(session_id)
            if held is not None and held.peer == peer:  # a resume replaces its own session
                own = total = -1
            else:
                running = [live.peer for live in self._sessions.values() if not _ended(live)]
                own = self._claims.get(peer, 0) + running.count(peer)
                total = sum(self._claims.values()) + len(running)
            if own >= lim.sessions_per_agency:
                return (f"too_many_sessions: agency {peer!r} holds {own} live sessions "
                        f"(limit {lim.sessions_per_agency}, --sessions-per-agency); close "
                        "one, or wait for an idle one to expire")
            if total >= lim.sessions_total:
                return (f"server_full: {total} live sessions of all agencies (limit "
                        f"{lim.sessions_total}, --sessions-total); no live session is ever "
                        "evicted, retry later")
            self._claims[peer] = self._claims.get(peer, 0) + 1
            self._claim.peer = peer
            excess = len(self._sessions) + sum(self._claims.values()) - lim.sessions_total
            if excess > 0:
                ended = [sid for sid, live in self._sessions.items() if _ended(live)]
                ended.sort(key=lambda sid: self._sessions[sid].peer != peer)  # stable: by age
                for sid in ended[:excess]:
                    del self._sessions[sid]
        return ""

    def _drop_claim(self) -> None:
        """Release this thread's claim if its open did not register a session."""
        with self._lock:
            peer = getattr(self._claim, "peer", None)
            if peer is not None:
                self._claim.peer = None
                self._claims[peer] -= 1
                if not self._claims[peer]:
                    del self._claims[peer]

    def reap_idle(self) -> bool:
        """Close every session idle past ``session_idle_seconds``; True while any is live.

        A session is idle when no call is using it (``CallGuard.sessions_in_use``) and none
        touched it for the timeout.  It is closed as a requester's close would leave it: a
        receipt signed over the custodian's transcript, with the evaluated and disclosed
        counts, stored in the ledger, which settles its reservation.  A session that cannot
        close (failed, or already closed) keeps the account its ledger rows hold.
        """
        now = time.monotonic()
        in_use = self.call_guard.sessions_in_use()
        with self._lock:
            for session_id, live in self._sessions.items():
                if (live.peer, session_id) in in_use:
                    live.touched = now  # idleness counts from the end of its last call
            idle = [(sid, live) for sid, live in self._sessions.items()
                    if now - live.touched > self.limits.session_idle_seconds]
        for session_id, live in idle:
            if not live.lock.acquire(blocking=False):
                continue  # a call is inside it right now
            try:
                if time.monotonic() - live.touched <= self.limits.session_idle_seconds:
                    continue
                settled = self._settle(live)
                with self._lock:
                    if self._sessions.get(session_id) is live:
                        del self._sessions[session_id]
                        self._expired[session_id] = live.peer
                        while len(self._expired) > _EXPIRED_REMEMBERED:
                            self._expired.popitem(last=False)
            finally:
                live.lock.release()
            kit.log_event(log, "session_expired", peer=live.peer, session=session_id,
                          idle_seconds=round(now - live.touched, 1), settled=settled)
        with self._lock:
            return bool(self._sessions)

    @staticmethod
    def _settle(live: _Live) -> str:
        """Close an idle session with a receipt; says how its account was left."""
        session = live.session
        if session.receipt is not None:
            return "receipt already issued"
        try:
            session.handle(CloseRequest(transcript_hash=session.transcript.digest()))
        except PSIError as exc:  # failed earlier, or not in a closable state
            return f"not closable ({kit.error_message(exc)}); ledger rows kept"
        return "closed with a receipt"

    # -- aggregate tiers -----------------------------------------------------------

    @_opens_session
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
                      tier=reply.tier, elements=reply.element_count,
                      custodian_elements=reply.custodian_count)
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
            count += len(pb.elements) // ELEMENT_SIZE
        return pb2.UploadAck(elements=count)

    def AggregateCustodianElements(self, request: Any, context: grpc.ServicerContext
                                   ) -> Iterator[Any]:
        peer = kit.peer_agency(context)
        live = self._live(request.session_id, peer, context)
        try:
            with live.lock:
                for c in live.session.send(CustodianChunk, peer_id=peer):
                    yield codec.to_pb(c, session_id=request.session_id)
        except PSIError as exc:
            self._refuse(context, exc, rpc="AggregateCustodianElements", peer=peer)

    def AggregateReblind(self, request_iterator: Iterator[Any],
                         context: grpc.ServicerContext) -> Any:
        peer = kit.peer_agency(context)
        live: _Live | None = None
        for pb in request_iterator:
            if live is None:
                live = self._live(pb.session_id, peer, context)
            elif pb.session_id != live.session.session_id:
                kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                          "invalid_argument: one reblind stream carries one session")
            try:
                with live.lock:
                    live.session.handle(codec.from_pb(ReblindedChunk, pb), peer_id=peer)
            except PSIError as exc:
                self._refuse(context, exc, rpc="AggregateReblind", peer=peer)
        if live is None:
            kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      "invalid_argument: an empty reblind stream names no session")
        try:
            with live.lock:
                challenge = live.session.send(MatchChallenge, peer_id=peer)
        except PSIError as exc:
            self._refuse(context, exc, rpc="AggregateReblind", peer=peer)
        return codec.to_pb(challenge)

    def AggregateRelease(self, request: Any, context: grpc.ServicerContext) -> Any:
        peer = kit.peer_agency(context)
        live = self._live(request.session_id, peer, context)
        try:
            with live.lock:
                release = live.session.handle(codec.from_pb(ConsistencyProof, request),
                                              peer_id=peer)
        except PSIError as exc:
            self._refuse(context, exc, rpc="AggregateRelease", peer=peer)
        kit.log_event(log, "aggregate_released", peer=peer, session=request.session_id,
                      count=release.count, withheld=release.withheld, reason=release.reason)
        return codec.to_pb(release)

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

    @_opens_session
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

    def FetchTagSet(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """The key epoch's tag set (docs/architecture.md, National custodian): decided and
        accounted before the first chunk; then streamed from the index, chunk by chunk."""
        peer = kit.peer_agency(context)
        try:
            chunks = self.custodian.fetch_tagset(codec.from_pb(TagSetRequest, request),
                                                 peer_id=peer)
        except PSIError as exc:
            self._refuse(context, exc, rpc="FetchTagSet", peer=peer)
        sent = 0
        for chunk in chunks:
            if not context.is_active():
                return
            sent += len(chunk.chunk)
            yield codec.to_pb(chunk)
        kit.log_event(log, "tagset_sent", peer=peer, rules=list(request.match_rules)[:8],
                      bytes=sent)

    def _closed(self, session_id: str, peer: str) -> _Live | None:
        """A session the ledger holds a receipt for, restored from it (close, countersign).

        Its signed receipt outlives the process: a repeated close gets the same receipt and
        a countersignature is accepted after a restart (docs/architecture.md, Late failures).
        """
        session = self.custodian.session()
        if len(session_id) > MAX_SESSION_ID or not session.restore_closed(session_id, peer):
            return None
        return _Live(session, peer)

    def CloseSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        peer = kit.peer_agency(context)
        live = (self._closed(request.session_id, peer)
                or self._live(request.session_id, peer, context))
        try:
            with live.lock:
                receipt = live.session.handle(codec.from_pb(CloseRequest, request),
                                              peer_id=peer)
        except PSIError as exc:
            self._refuse(context, exc, rpc="CloseSession", peer=peer)
        kit.log_event(log, "session_closed", peer=peer, session=request.session_id,
                      evaluated=receipt.evaluated, disclosed_records=receipt.disclosed)
        return codec.to_pb(receipt)

    def Countersign(self, request: Any, context: grpc.ServicerContext) -> Any:
        peer = kit.peer_agency(context)
        live = (self._closed(request.session_id, peer)
                or self._live(request.session_id, peer, context))
        try:
            with live.lock:
                live.session.countersign(codec.from_pb(Receipt, request), peer_id=peer)
        except PSIError as exc:
            self._refuse(context, exc, rpc="Countersign", peer=peer)
        with self._lock:
            self._sessions.pop(request.session_id, None)
        return pb2.CountersignAck(stored=True)


def serve(custodian: Custodian, tls: kit.TLSFiles, listen: str = "127.0.0.1:0",
          *, aggregate: AggregateCustodian | None = None,
          limits: ServiceLimits | None = None) -> tuple[grpc.Server, int]:
    """Start the custodian service; returns (server, port).  Caller stops it.

    Every call passes the service's ``CallGuard`` (per-agency admission, deadlines on the
    client); the thread pool is sized from ``limits`` so that health checks and refusals
    always find a thread (docs/architecture.md, Resource limits).
    """
    service = CustodianService(custodian, aggregate, limits)
    server, port, _health = kit.build_server(
        [(codec.add_servicer("Custodian", custodian.config.refusal_log), service)],
        [SERVICE_NAME], tls, listen,
        max_workers=service.limits.worker_threads, interceptors=[service.call_guard],
        options=[("grpc.max_concurrent_streams", _STREAMS_PER_CONNECTION)],
    )
    server.start()
    return server, port


__all__ = ["SERVICE_NAME", "CustodianService", "ProtocolError", "serve"]
