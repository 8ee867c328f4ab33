"""Drive a ``RequesterSession`` against a remote Custodian service.

The session decides everything; this module only moves its messages over
gRPC.  Blinding (request thread), custodian evaluation (remote) and
finalization (this thread) overlap because the evaluation RPC is a
bidirectional stream; the tag stream runs in parallel on its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proto import service_kit as kit
from protocol.crypto.kkrt import KKRTBaseOTReply, KKRTTagChunk
from protocol.domain.messages import EvaluatedChunk, TagChunk
from protocol.errors import ProtocolError
from protocol.sessions.aggregate import (
    AggregateOpenResponse,
    AggregateOutcome,
    AggregateRequesterSession,
    CustodianPairsChunk,
    DoubleBlindedChunk,
    SumReveal,
)
from protocol.sessions.core import Receipt, RequesterSession, SessionOutcome

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


def run_remote_session(
    session: RequesterSession,
    channel: grpc.Channel,
    *,
    progress: Progress = _noop,
    stats: WireStats | None = None,
    rpc_timeout: float = 6 * 3600,
) -> SessionOutcome:
    """Run one identity-tier session end to end over ``channel`` (mTLS)."""
    stub = pb2_grpc.CustodianStub(channel)
    stats = stats if stats is not None else WireStats()
    lock = threading.Lock()
    sid = session.session_id

    t0 = time.perf_counter()
    open_pb = kit.open_request_to_pb(session.open_request())
    opened = stub.OpenSession(open_pb, timeout=600)
    stats.add("open", open_pb.ByteSize(), opened.ByteSize())
    session.handle(kit.open_response_from_pb(opened))
    if session.custodian_key is None and opened.custodian_public_key:
        session.custodian_key = Ed25519PublicKey.from_public_bytes(opened.custodian_public_key)
    stats.seconds["open"] = time.perf_counter() - t0
    progress("open", 1, 1)

    if session.engine == "kkrt":
        _kkrt_exchange(session, stub, progress, stats, rpc_timeout)
        return _finish(session, stub, progress, stats, rpc_timeout)

    tag_total = opened.tag_count
    tag_error: list[BaseException] = []

    def pull_tags() -> None:
        got = 0
        try:
            for pb in stub.StreamTags(pb2.SessionRef(session_id=sid), timeout=rpc_timeout):
                with lock:
                    session.handle(TagChunk(seq=pb.seq, tags=pb.tags))
                stats.add("tags", 0, len(pb.tags))
                got += len(pb.tags) // max(opened.tag_size, 1)
                progress("tags", got, tag_total)
        except BaseException as exc:  # re-raised in the calling thread
            tag_error.append(exc)

    t_tags = time.perf_counter()
    tag_thread = threading.Thread(target=pull_tags, name="tags", daemon=True)
    tag_thread.start()

    total = session.element_count
    t_eval = time.perf_counter()

    def requests():  # runs on gRPC's request thread: blinding overlaps evaluation
        for seq in range(session.chunk_count):
            with lock:
                chunk = session.evaluation_chunk(seq)
            stats.add("evaluate", len(chunk.elements), 0)
            yield pb2.ElementChunk(session_id=sid, seq=seq, elements=chunk.elements)

    done = 0
    if session.chunk_count:
        for pb in stub.Evaluate(requests(), timeout=rpc_timeout):
            with lock:
                session.handle(EvaluatedChunk(seq=pb.seq, elements=pb.elements))
            stats.add("evaluate", 0, len(pb.elements))
            done += len(pb.elements) // 32
            progress("evaluate", done, total)
    stats.seconds["evaluate"] = time.perf_counter() - t_eval
    tag_thread.join()
    stats.seconds["tags"] = time.perf_counter() - t_tags
    if tag_error:
        raise tag_error[0]

    return _finish(session, stub, progress, stats, rpc_timeout)


def _kkrt_exchange(session: RequesterSession, stub: Any, progress: Progress, stats: WireStats,
                   rpc_timeout: float) -> None:
    """KKRT engine: base OTs, the extension matrix (streamed), then the custodian's tags."""
    sid = session.session_id
    t0 = time.perf_counter()
    setup = session.kkrt_setup()
    reply = stub.KKRTSetup(pb2.KKRTSetupMessage(
        session_id=sid, version=setup.version, context=setup.context, bins=setup.bins,
        stash=setup.stash, chunk_bins=setup.chunk_bins, attempt=setup.attempt,
        base_ot_a=setup.base_ot_a), timeout=600)
    stats.add("evaluate", len(setup.base_ot_a) + len(setup.context),
              len(reply.base_ot_b) + len(reply.code_nonce))
    session.handle(KKRTBaseOTReply(code_nonce=reply.code_nonce, base_ot_b=reply.base_ot_b))
    total = session.element_count

    def extension():
        done = 0
        chunks = session.kkrt_extension_chunks()
        while True:
            started = time.perf_counter()
            chunk = next(chunks, None)
            # time this side spends computing the matrix (the rest is waiting on the wire)
            stats.seconds["evaluate_compute"] = (stats.seconds.get("evaluate_compute", 0.0)
                                                 + time.perf_counter() - started)
            if chunk is None:
                return
            stats.add("evaluate", len(chunk.columns), 0)
            done += chunk.bins
            progress("evaluate", done, total)
            yield pb2.KKRTExtensionChunkMessage(session_id=sid, seq=chunk.seq,
                                                start=chunk.start, bins=chunk.bins,
                                                columns=chunk.columns)

    stub.KKRTExtend(extension(), timeout=rpc_timeout)
    stats.seconds["evaluate"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    got = 0
    for pb in stub.KKRTTags(pb2.SessionRef(session_id=sid), timeout=rpc_timeout):
        session.handle(KKRTTagChunk(seq=pb.seq, table=pb.table, table_size=pb.table_size,
                                    tags=pb.tags))
        stats.add("tags", 0, len(pb.tags))
        got += len(pb.tags) // 12
        progress("tags", got, got)
    stats.seconds["tags"] = time.perf_counter() - t1


def _finish(session: RequesterSession, stub: Any, progress: Progress, stats: WireStats,
            rpc_timeout: float) -> SessionOutcome:
    """Local match, verified disclosure and the receipt: the same for every engine."""
    sid = session.session_id
    t_match = time.perf_counter()
    matches = session.match()
    stats.seconds["match"] = time.perf_counter() - t_match
    progress("match", len(matches), len(matches))

    t_disc = time.perf_counter()
    disclosed = 0

    def disclosure_requests():
        for req in session.disclosure_requests():
            pb = kit.disclosure_request_to_pb(sid, req)
            stats.add("disclose", pb.ByteSize(), 0)
            yield pb

    if matches:
        for pb in stub.Disclose(disclosure_requests(), timeout=rpc_timeout):
            stats.add("disclose", 0, pb.ByteSize())
            session.handle(kit.disclosure_response_from_pb(pb))
            disclosed += len(pb.disclosures) + len(pb.rejected)
            progress("disclose", disclosed, len(matches))
    stats.seconds["disclose"] = time.perf_counter() - t_disc

    t_close = time.perf_counter()
    close = session.close_request()
    receipt_pb = stub.CloseSession(
        pb2.CloseSessionRequest(session_id=sid, transcript_hash=close.transcript_hash),
        timeout=600,
    )
    countersigned = session.handle(kit.receipt_from_pb(receipt_pb))
    if not isinstance(countersigned, Receipt):
        raise ProtocolError("no receipt")
    if countersigned.requester_signature:
        stub.Countersign(kit.receipt_to_pb(countersigned), timeout=600)
    stats.seconds["close"] = time.perf_counter() - t_close
    progress("close", 1, 1)
    return SessionOutcome(matches=session.matches, results=session.results,
                          receipt=countersigned, rejected=session.rejected)


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
    opened = stub.AggregateOpen(pb2.AggregateOpenRequest(
        session_id=req.session_id, signed_authorization=req.signed_authorization, tier=req.tier,
        match_rule=req.match_rule, value_field=req.value_field,
        element_count=req.element_count, engine=req.engine), timeout=600)
    session.handle(AggregateOpenResponse(
        session_id=opened.session_id, authorization_id=opened.authorization_id,
        custodian_id=opened.custodian_id, tier=opened.tier, match_rule=opened.match_rule,
        value_field=opened.value_field, element_count=opened.element_count,
        pair_count=opened.pair_count, paillier_n=opened.paillier_n,
        min_aggregate_count=opened.min_aggregate_count,
        budget_remaining=opened.budget_remaining))
    if session.custodian_key is None and opened.custodian_public_key:
        session.custodian_key = Ed25519PublicKey.from_public_bytes(opened.custodian_public_key)
    stats.seconds["open"] = time.perf_counter() - t0
    progress("open", 1, 1)

    t1 = time.perf_counter()
    total = req.element_count

    def upload():
        done = 0
        for chunk in session.blinded_chunks():
            stats.add("evaluate", len(chunk.elements), 0)
            done += len(chunk.elements) // 32
            progress("evaluate", done, total)
            yield pb2.ElementChunk(session_id=sid, seq=chunk.seq, elements=chunk.elements)

    stub.AggregateUpload(upload(), timeout=rpc_timeout)
    got = 0
    for pb in stub.AggregateDoubleBlinded(pb2.SessionRef(session_id=sid), timeout=rpc_timeout):
        session.handle(DoubleBlindedChunk(seq=pb.seq, elements=pb.elements))
        stats.add("evaluate", 0, len(pb.elements))
        got += len(pb.elements) // 32
        progress("evaluate", got, total)
    stats.seconds["evaluate"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    pairs_total, pairs = opened.pair_count, 0
    for pb in stub.AggregatePairs(pb2.SessionRef(session_id=sid), timeout=rpc_timeout):
        session.handle(CustodianPairsChunk(seq=pb.seq, elements=pb.elements,
                                           ciphertexts=pb.ciphertexts))
        stats.add("tags", 0, len(pb.elements) + len(pb.ciphertexts))
        pairs += len(pb.elements) // 32
        progress("tags", pairs, pairs_total)
    stats.seconds["tags"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    masked = session.masked_sum()
    stats.add("disclose", len(masked.ciphertext) + 8, 0)
    reveal = stub.AggregateReveal(pb2.MaskedSumMessage(
        session_id=sid, count=masked.count, ciphertext=masked.ciphertext), timeout=600)
    session.handle(SumReveal(count=reveal.count, withheld=reveal.withheld,
                             masked_sum=reveal.masked_sum, reason=reveal.reason))
    stats.add("disclose", 0, reveal.ByteSize())
    stats.seconds["disclose"] = time.perf_counter() - t3
    progress("disclose", 1, 1)

    close = session.close_request()
    receipt_pb = stub.CloseSession(
        pb2.CloseSessionRequest(session_id=sid, transcript_hash=close.transcript_hash),
        timeout=600)
    countersigned = session.handle(kit.receipt_from_pb(receipt_pb))
    if not isinstance(countersigned, Receipt) or session.result is None:
        raise ProtocolError("aggregate session ended without a receipt or a result")
    if countersigned.requester_signature:
        stub.Countersign(kit.receipt_to_pb(countersigned), timeout=600)
    progress("close", 1, 1)
    return AggregateOutcome(result=session.result, receipt=countersigned,
                            requester_stats=dict(session.stats), custodian_stats={})
