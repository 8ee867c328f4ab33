"""Drive a ``RequesterSession`` against a remote Custodian service.

The session decides everything; this module only moves its messages over
gRPC.  Whatever the engine, it walks the engine's declared exchanges
(``protocol.engines.base.Exchange``) and maps each message type to its RPC
(``_WIRE``).  For the OPRF engine, blinding (request thread), custodian
evaluation (remote) and finalization (this thread) overlap because the
evaluation RPC is a bidirectional stream, and the tag stream, declared as
overlapping, runs in parallel on its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from proto import codec
from proto import service_kit as kit
from protocol.accounting.receipts import countersign
from protocol.crypto.kkrt import KKRTBaseOTReply, KKRTExtensionChunk, KKRTSetup, KKRTTagChunk
from protocol.domain.messages import (
    MAX_DISCLOSURE_BATCH,
    CloseRequest,
    DisclosureRequest,
    DisclosureResponse,
    EvaluateChunk,
    EvaluatedChunk,
    OpenRequest,
    OpenResponse,
    TagChunk,
    Transcript,
)
from protocol.engines.base import Exchange, Flow
from protocol.errors import ProtocolError
from protocol.policy.decide import SignedAuthorization
from protocol.sessions.aggregate import (
    AggregateOpenResponse,
    AggregateOutcome,
    AggregateRelease,
    AggregateRequesterSession,
    CustodianChunk,
    MatchChallenge,
)
from protocol.sessions.identity import (
    Match,
    MatchResult,
    Receipt,
    RequesterSession,
    SessionOutcome,
    corroboration_groups,
    disclosure_plan,
)

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc

#: progress(phase, done, total)
Progress = Callable[[str, int, int], None]


@dataclass
class WireStats:
    """Payload bytes moved in each direction, per phase (protobuf framing excluded)."""

    a_to_b: dict[str, int] = field(default_factory=dict)
    b_to_a: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, up: int = 0, down: int = 0) -> None:
        self.a_to_b[phase] = self.a_to_b.get(phase, 0) + up
        self.b_to_a[phase] = self.b_to_a.get(phase, 0) + down


def _noop(phase: str, done: int, total: int) -> None:
    return None


class Journal(Protocol):
    """Where a session's late steps are made durable as they happen (docs/architecture.md,
    Late failures): a failure after any of them loses nothing that was disclosed."""

    def opened(self, custodian_key: Ed25519PublicKey | None) -> None:
        """The custodian opened the session (its budget is reserved from here on)."""

    def matched(self, matches: Sequence[Match]) -> None:
        """The local match is done; its proofs allow asking for the disclosures again."""

    def disclosed(self, answered: Sequence[int], results: Sequence[MatchResult],
                  rejected: int) -> None:
        """The matches at positions ``answered`` were answered: ``results`` released."""

    def closing(self, transcript_hash: bytes) -> None:
        """About to ask for the receipt over this transcript."""

    def receipt(self, receipt: Receipt) -> None:
        """The custodian's receipt, verified and countersigned, before it is sent back."""


class NoJournal:
    """Keeps nothing (library callers and tests that do not recover)."""

    def opened(self, custodian_key: Ed25519PublicKey | None) -> None:
        return None

    def matched(self, matches: Sequence[Match]) -> None:
        return None

    def disclosed(self, answered: Sequence[int], results: Sequence[MatchResult],
                  rejected: int) -> None:
        return None

    def closing(self, transcript_hash: bytes) -> None:
        return None

    def receipt(self, receipt: Receipt) -> None:
        return None


def run_remote_session(
    session: RequesterSession,
    channel: grpc.Channel,
    *,
    progress: Progress = _noop,
    stats: WireStats | None = None,
    rpc_timeout: float = 6 * 3600,
    journal: Journal | None = None,
) -> SessionOutcome:
    """Run one identity-tier session end to end over ``channel`` (mTLS).

    ``journal`` receives each late step as it happens (matches, every disclosure batch,
    the close), so a caller can store them durably and finish the session after a failure
    (:func:`finish_session`).
    """
    stub = pb2_grpc.CustodianStub(channel)
    stats = stats if stats is not None else WireStats()

    t0 = time.perf_counter()
    open_pb = codec.to_pb(session.open_request())
    opened = _open_blinding_ahead(session, stub, open_pb)
    stats.add("open", open_pb.ByteSize(), opened.ByteSize())
    session.handle(codec.from_pb(OpenResponse, opened))
    _pin_custodian_key(session, opened)
    journal = journal or NoJournal()
    journal.opened(session.custodian_key)
    stats.seconds["open"] = time.perf_counter() - t0
    progress("open", 1, 1)

    _run_exchanges(session, stub, opened, progress, stats, rpc_timeout)
    return _finish(session, stub, progress, stats, rpc_timeout, journal)


def _open_blinding_ahead(session: RequesterSession, stub: Any, open_pb: Any) -> Any:
    """OpenSession, while a thread blinds the first chunks (``blind_ahead``).

    The custodian's open (policy, budget reservation, tag index) takes seconds during which
    the requester's cores would idle; blinding needs nothing from it.  The thread stops
    as soon as the open returns (or fails) and is joined before the exchanges start, so
    the session is never touched by two threads at once.
    """
    stop = threading.Event()
    errors: list[BaseException] = []

    def ahead() -> None:
        try:
            session.blind_ahead(stop.is_set)
        except BaseException as exc:  # re-raised below, once the open is done
            errors.append(exc)

    thread = threading.Thread(target=ahead, name="blind-ahead", daemon=True)
    thread.start()
    try:
        opened = stub.OpenSession(open_pb, timeout=600)
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
    return opened


def _pin_custodian_key(session: RequesterSession | AggregateRequesterSession,
                       opened: Any) -> None:
    """Verify receipts with the key the custodian sent at open, unless one is pinned."""
    if session.custodian_key is None and opened.custodian_public_key:
        session.custodian_key = Ed25519PublicKey.from_public_bytes(opened.custodian_public_key)


def _close(session: RequesterSession | AggregateRequesterSession, stub: Any,
           journal: Journal | None = None) -> Receipt:
    """Close the session (either tier); returns its receipt, countersigned if we sign."""
    close = session.close_request()
    if journal is not None:
        journal.closing(close.transcript_hash)
    receipt_pb = stub.CloseSession(codec.to_pb(close, session_id=session.session_id),
                                   timeout=600)
    countersigned = session.handle(codec.from_pb(Receipt, receipt_pb))
    if not isinstance(countersigned, Receipt):
        raise ProtocolError("the session closed without a receipt")
    if journal is not None:
        journal.receipt(countersigned)
    if countersigned.requester_signature:
        stub.Countersign(codec.to_pb(countersigned), timeout=600)
    return countersigned


@dataclass(frozen=True)
class _Wire:
    """How one engine message type travels: the RPC it opens, and what it counts for.

    An exchange runs on the RPC of the message type it starts with (the requester's, or
    for a server stream the custodian's); ``proto.codec`` translates every message.
    """

    rpc: str | None  # stub method, for the exchange's leading message type
    payload: Callable[[Any], int]  # bytes counted in WireStats
    units: Callable[[Any, int], int] = lambda message, tag_size: 0  # progress units


def _tag_units(message: Any, tag_size: int) -> int:
    return len(message.tags) // max(tag_size, 1)


_WIRE: dict[type, _Wire] = {
    TagChunk: _Wire("StreamTags", lambda m: len(m.tags), _tag_units),
    EvaluateChunk: _Wire("Evaluate", lambda m: len(m.elements)),
    EvaluatedChunk: _Wire(None, lambda m: len(m.elements), lambda m, _: len(m.elements) // 32),
    KKRTSetup: _Wire("KKRTSetup", lambda m: len(m.base_ot_a) + len(m.context)),
    KKRTBaseOTReply: _Wire(None, lambda m: len(m.base_ot_b) + len(m.code_nonce)),
    KKRTExtensionChunk: _Wire("KKRTExtend", lambda m: len(m.columns), lambda m, _: m.bins),
    KKRTTagChunk: _Wire("KKRTTags", lambda m: len(m.tags), _tag_units),
}


def _run_exchanges(session: RequesterSession, stub: Any, opened: Any, progress: Progress,
                   stats: WireStats, rpc_timeout: float) -> None:
    """Run the engine's exchanges in its declared order, whatever the engine.

    An exchange that may overlap the next ones (the OPRF engine's tag stream) runs on its
    own thread; the session is only ever touched under one lock, so blinding (gRPC's
    request thread), finalization (this thread) and the tag stream interleave safely.
    """
    lock = threading.Lock()
    errors: list[BaseException] = []
    background: list[tuple[str, threading.Thread, float]] = []

    def guarded(exchange: Exchange) -> None:
        try:
            _run_exchange(session, stub, exchange, opened, lock, progress, stats, rpc_timeout)
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    for exchange in session.exchanges:
        started = time.perf_counter()
        if exchange.overlaps_next:
            thread = threading.Thread(target=guarded, args=(exchange,), name=exchange.phase,
                                      daemon=True)
            thread.start()
            background.append((exchange.phase, thread, started))
            continue
        _run_exchange(session, stub, exchange, opened, lock, progress, stats, rpc_timeout)
        stats.seconds[exchange.phase] = (stats.seconds.get(exchange.phase, 0.0)
                                         + time.perf_counter() - started)
    for phase, thread, started in background:
        thread.join()
        stats.seconds[phase] = stats.seconds.get(phase, 0.0) + time.perf_counter() - started
    if errors:
        raise errors[0]


def _run_exchange(session: RequesterSession, stub: Any, exchange: Exchange, opened: Any,
                  lock: threading.Lock, progress: Progress, stats: WireStats,
                  rpc_timeout: float) -> None:
    """One exchange over its RPC, in the exchange's flow."""
    sid, phase = session.session_id, exchange.phase
    tag_size = opened.tag_size
    total = opened.tag_count if exchange.flow is Flow.SERVER_STREAM else session.element_count
    done = 0

    def received(pb: Any) -> None:
        nonlocal done
        assert exchange.replies is not None
        wire = _WIRE[exchange.replies]
        message: object = codec.from_pb(exchange.replies, pb)
        with lock:
            session.handle(message)
        stats.add(phase, 0, wire.payload(message))
        done += wire.units(message, tag_size)
        progress(phase, done, total)

    if exchange.flow is Flow.SERVER_STREAM:
        assert exchange.replies is not None
        rpc = getattr(stub, _WIRE[exchange.replies].rpc or "")
        for pb in rpc(pb2.SessionRef(session_id=sid), timeout=rpc_timeout):
            received(pb)
        return
    assert exchange.sends is not None
    out = _WIRE[exchange.sends]
    assert out.rpc is not None
    rpc = getattr(stub, out.rpc)
    pending = session.requests(exchange)
    # requester computing time, apart from waiting on the wire (reported for client streams,
    # where the requester's own work paces the stream)
    compute_key = f"{phase}_compute" if exchange.flow is Flow.CLIENT_STREAM else None

    def pull() -> object | None:
        started = time.perf_counter()
        with lock:
            message = next(pending, None)
        if compute_key is not None:
            stats.seconds[compute_key] = (stats.seconds.get(compute_key, 0.0)
                                          + time.perf_counter() - started)
        return message

    first = pull()
    if first is None:
        return  # nothing to send: no call at all

    def outgoing() -> Iterator[Any]:  # on gRPC's request thread for streams
        nonlocal done
        message = first
        while message is not None:
            stats.add(phase, out.payload(message), 0)
            done += out.units(message, tag_size)
            if out.units(message, tag_size):
                progress(phase, done, total)
            yield codec.to_pb(message, session_id=sid)
            message = pull()

    if exchange.flow is Flow.UNARY:
        stats.add(phase, out.payload(first), 0)
        received(rpc(codec.to_pb(first, session_id=sid), timeout=600))
    elif exchange.flow is Flow.CLIENT_STREAM:
        rpc(outgoing(), timeout=rpc_timeout)
    else:
        for pb in rpc(outgoing(), timeout=rpc_timeout):
            received(pb)


def _finish(session: RequesterSession, stub: Any, progress: Progress, stats: WireStats,
            rpc_timeout: float, journal: Journal) -> SessionOutcome:
    """Local match, verified disclosure and the receipt: the same for every engine."""
    sid = session.session_id
    t_match = time.perf_counter()
    matches = session.match()
    journal.matched(matches)
    stats.seconds["match"] = time.perf_counter() - t_match
    progress("match", len(matches), len(matches))

    t_disc = time.perf_counter()
    disclosed = 0
    spans: dict[int, tuple[int, int]] = {}  # request seq -> (first match, matches)

    def disclosure_requests() -> Iterator[Any]:
        start = 0
        for req in session.disclosure_requests():
            spans[req.seq] = (start, len(req.outputs))
            start += len(req.outputs)
            pb = codec.to_pb(req, session_id=sid)
            stats.add("disclose", pb.ByteSize(), 0)
            yield pb

    if matches:
        for pb in stub.Disclose(disclosure_requests(), timeout=rpc_timeout):
            stats.add("disclose", 0, pb.ByteSize())
            before = len(session.results)
            session.handle(codec.from_pb(DisclosureResponse, pb))
            start, count = spans.pop(pb.seq)
            journal.disclosed(range(start, start + count), session.results[before:],
                              len(pb.rejected))
            disclosed += len(pb.disclosures) + len(pb.rejected)
            progress("disclose", disclosed, len(matches))
    stats.seconds["disclose"] = time.perf_counter() - t_disc

    t_close = time.perf_counter()
    countersigned = _close(session, stub, journal)
    stats.seconds["close"] = time.perf_counter() - t_close
    progress("close", 1, 1)
    return SessionOutcome(matches=session.matches, results=session.results,
                          receipt=countersigned, rejected=session.rejected)


@dataclass(frozen=True)
class PendingSession:
    """What a requester keeps to finish an identity session after a late failure.

    ``matches`` are (query record id, rule, proof) in match order (None: the session ended
    before its match); ``answered`` the positions whose disclosure batch was answered;
    ``close_hash`` the transcript hash a close was sent with; ``receipt`` the custodian's
    verified receipt, if it arrived.
    """

    open_request: OpenRequest
    matches: tuple[tuple[str, str, bytes], ...] | None = None
    answered: frozenset[int] = frozenset()
    close_hash: bytes | None = None
    receipt: Receipt | None = None


def finish_session(
    pending: PendingSession,
    channel: grpc.Channel,
    *,
    signing_key: Ed25519PrivateKey | None,
    custodian_key: Ed25519PublicKey | None,
    journal: Journal,
    rpc_timeout: float = 6 * 3600,
) -> tuple[Receipt, int]:
    """Finish a session that failed late (docs/architecture.md, Late failures).

    From the furthest durable point: send the countersignature again; or ask for the
    receipt again (the custodian answers a repeated close with the same receipt, after a
    restart too); or resume the session id (its reservation is not charged again), ask
    again for the disclosures whose answers never arrived, and close.  Returns the
    countersigned receipt and the number of disclosures rejected on the way.
    """
    stub = pb2_grpc.CustodianStub(channel)
    sid = pending.open_request.session_id
    if pending.receipt is not None:
        return _countersigned(stub, pending.receipt, pending.receipt.transcript_hash,
                              signing_key, custodian_key, journal), 0
    if pending.close_hash is not None:
        try:
            return _receipt(stub, sid, pending.close_hash, signing_key, custodian_key,
                            journal), 0
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                raise  # NOT_FOUND: the custodian restarted before it closed; resume below
    transcript = Transcript()
    opened = stub.OpenSession(codec.to_pb(pending.open_request), timeout=600)
    response = codec.from_pb(OpenResponse, opened)
    if response.session_id != sid or response.element_count != (
            pending.open_request.element_count):
        raise ProtocolError("the custodian resumed another session or element count")
    if custodian_key is None and opened.custodian_public_key:
        custodian_key = Ed25519PublicKey.from_public_bytes(opened.custodian_public_key)
    transcript.add("open", pending.open_request)
    transcript.add("open", response)
    matches = pending.matches or ()
    keys = [(query_id, rule_id) for query_id, rule_id, _ in matches]
    # The same batching as the first run: corroborated groups presented together.
    corroboration = SignedAuthorization.from_bytes(
        pending.open_request.signed_authorization).authorization.corroboration
    if corroboration is None:
        todo = [i for i in range(len(matches)) if i not in pending.answered]
    else:
        # The first run's groups, chosen over all its matches; each was answered whole or
        # not at all.  Re-choosing among the unanswered matches only would pair a query's
        # left-over matches into a group the first run never presented.
        todo = [i for group in corroboration_groups(keys, corroboration)[0]
                if pending.answered.isdisjoint(group) for i in group]
    plan = disclosure_plan([keys[i] for i in todo], corroboration, MAX_DISCLOSURE_BATCH)
    batches = [[todo[p] for p in positions] for positions, _ in plan]
    allowed = set(response.disclosure_fields)
    rejected = 0

    def requests() -> Iterator[Any]:
        for seq, batch in enumerate(batches):
            req = DisclosureRequest(seq=seq, outputs=tuple((matches[i][1], matches[i][2])
                                                           for i in batch),
                                    groups=plan[seq][1])
            transcript.add("disclosure-request", req)
            yield codec.to_pb(req, session_id=sid)

    answered: set[int] = set()
    if batches:
        try:
            for pb in stub.Disclose(requests(), timeout=rpc_timeout):
                reply = codec.from_pb(DisclosureResponse, pb)
                if not 0 <= reply.seq < len(batches):
                    raise ProtocolError(f"disclosure response {reply.seq} was not requested")
                batch = batches[reply.seq]
                results = []
                for d in reply.disclosures:
                    if not 0 <= d.index < len(batch) or {n for n, _ in d.fields} - allowed:
                        raise ProtocolError("disclosure out of range or with ungranted fields")
                    results.append(MatchResult(query_record_id=matches[batch[d.index]][0],
                                               rule_id=d.rule_id, pseudonym=d.pseudonym,
                                               fields=d.as_dict()))
                transcript.add("disclosure-response", reply)
                rejected += len(reply.rejected)
                answered.update(batch)
                journal.disclosed(batch, results, len(reply.rejected))
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            # The cap is reached: the custodian now refuses every disclosure request (that
            # failed its session).  What is left counts as withheld; resume once more to
            # close, so the session still ends with its receipt.
            left = [i for i in todo if i not in answered]
            journal.disclosed(left, [], len(left))
            receipt, _ = finish_session(
                PendingSession(pending.open_request, pending.matches,
                               frozenset(range(len(matches)))), channel,
                signing_key=signing_key, custodian_key=custodian_key, journal=journal,
                rpc_timeout=rpc_timeout)
            return receipt, rejected + len(left)
    return _receipt(stub, sid, transcript.digest(), signing_key, custodian_key,
                    journal), rejected


def _receipt(stub: Any, session_id: str, transcript_hash: bytes,
             signing_key: Ed25519PrivateKey | None, custodian_key: Ed25519PublicKey | None,
             journal: Journal) -> Receipt:
    """Close over ``transcript_hash`` (again, if need be) and countersign the receipt."""
    journal.closing(transcript_hash)
    receipt_pb = stub.CloseSession(
        codec.to_pb(CloseRequest(transcript_hash=transcript_hash), session_id=session_id),
        timeout=600)
    return _countersigned(stub, codec.from_pb(Receipt, receipt_pb), transcript_hash,
                          signing_key, custodian_key, journal)


def _countersigned(stub: Any, receipt: Receipt, transcript_hash: bytes,
                   signing_key: Ed25519PrivateKey | None,
                   custodian_key: Ed25519PublicKey | None, journal: Journal) -> Receipt:
    """Verify and countersign ``receipt`` (unless it already is), keep it, send it back."""
    if not receipt.requester_signature:
        receipt = countersign(receipt, session_id=receipt.session_id,
                              own_transcript=transcript_hash, custodian_key=custodian_key,
                              signing_key=signing_key)
    journal.receipt(receipt)
    if receipt.requester_signature:
        stub.Countersign(codec.to_pb(receipt), timeout=600)
    return receipt


def run_remote_aggregate(
    session: AggregateRequesterSession,
    channel: grpc.Channel,
    *,
    progress: Progress = _noop,
    stats: WireStats | None = None,
    rpc_timeout: float = 6 * 3600,
) -> AggregateOutcome:
    """Run one aggregate or cardinality session over ``channel``."""
    stub = pb2_grpc.CustodianStub(channel)
    stats = stats if stats is not None else WireStats()
    sid = session.session_id
    t0 = time.perf_counter()
    req = session.open_request()
    opened = stub.AggregateOpen(codec.to_pb(req), timeout=600)
    session.handle(codec.from_pb(AggregateOpenResponse, opened))
    _pin_custodian_key(session, opened)
    stats.seconds["open"] = time.perf_counter() - t0
    progress("open", 1, 1)

    t1 = time.perf_counter()
    total = req.element_count

    def upload() -> Iterator[Any]:
        done = 0
        for chunk in session.blinded_chunks():
            stats.add("evaluate", len(chunk.elements), 0)
            done += len(chunk.elements) // 32
            progress("evaluate", done, total)
            yield codec.to_pb(chunk, session_id=sid)

    stub.AggregateUpload(upload(), timeout=rpc_timeout)
    stats.seconds["evaluate"] = time.perf_counter() - t1

    # The custodian's elements, each reblinded as it arrives (the session checks them).
    t2 = time.perf_counter()
    custodian_total, got = opened.custodian_count, 0
    for pb in stub.AggregateCustodianElements(pb2.SessionRef(session_id=sid),
                                              timeout=rpc_timeout):
        session.handle(codec.from_pb(CustodianChunk, pb))
        stats.add("tags", 0, len(pb.elements))
        got += len(pb.elements) // 32
        progress("tags", got, custodian_total)

    def reblinded() -> Iterator[Any]:
        for chunk in session.reblinded_chunks():
            stats.add("tags", len(chunk.elements), 0)
            yield codec.to_pb(chunk, session_id=sid)

    challenge = stub.AggregateReblind(reblinded(), timeout=rpc_timeout)
    session.handle(codec.from_pb(MatchChallenge, challenge))
    stats.add("tags", 0, challenge.ByteSize())
    stats.seconds["tags"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    proof = session.consistency_proof()
    stats.add("disclose", len(proof.public_element) + len(proof.challenge)
              + len(proof.response), 0)
    release = stub.AggregateRelease(codec.to_pb(proof, session_id=sid), timeout=600)
    session.handle(codec.from_pb(AggregateRelease, release))
    stats.add("disclose", 0, release.ByteSize())
    stats.seconds["disclose"] = time.perf_counter() - t3
    progress("disclose", 1, 1)

    countersigned = _close(session, stub)
    if session.result is None:
        raise ProtocolError("aggregate session ended without a result")
    progress("close", 1, 1)
    return AggregateOutcome(result=session.result, receipt=countersigned,
                            requester_stats=dict(session.stats), custodian_stats={})
