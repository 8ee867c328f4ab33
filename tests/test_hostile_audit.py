"""Hostile peers against the custodian's account (issue 13): bounded audit, the gate on
every message, replays, status codes and what ``evaluated`` means.

In-process where the point is the session core (an injected clock, many requests fast);
over real gRPC with mutual TLS and a real SQLite ledger where the point is the service.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agency_b.service import serve as serve_custodian
from proto import codec
from proto import service_kit as kit
from protocol.accounting import chain
from protocol.accounting.refusals import REFUSALS_SUPPRESSED, RefusalLimiter
from protocol.adapters.files import read_policy, write_policy
from protocol.cli.dev_pki import write_dev_pki
from protocol.crypto import oprf
from protocol.crypto.kkrt import KKRTExtensionChunk
from protocol.domain.messages import (
    DisclosureRequest,
    EvaluateChunk,
    OpenRequest,
    OpenResponse,
    TagChunk,
)
from protocol.errors import InvalidElementError, PolicyRefusal, PSIError
from protocol.sessions.core import MAX_SESSION_ID, SESSION_ID_UNAVAILABLE
from protocol.sessions.identity import (
    Custodian,
    CustodianConfig,
    CustodianState,
    RequesterSession,
    run_exchanges,
    run_in_process,
)
from tests.factories import World, as_query, custodian_over_mtls, make_world

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc

FLOOD = 10_000
HUGE_ID = "s" * 100_000
HUGE_RULES = tuple(f"rule-{i:05d}-" + "x" * 90 for i in range(1_000))


class Clock:
    """A clock the test moves: what the custodian reads as now."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _chain_bytes(world: World) -> int:
    """Bytes of the audit chain as stored: kind, payload and both hashes of every entry."""
    return sum(len(str(e.kind)) + len(str(e.payload)) + 64
               for e in world.ledger.stored_entries())


def _entries(world: World, kind: str) -> list[Any]:
    return [e for e in world.ledger.audit_entries() if e.kind == kind]


def _hostile_open(world: World, i: int, untrusted: Ed25519PrivateKey) -> OpenRequest:
    """Three kinds of refused open, in turn: an oversized session id, a huge rule list
    under an untrusted signer, and a well-formed open under an untrusted signer."""
    signed = world.authorize(key=untrusted)
    kind = i % 3
    return OpenRequest(
        session_id=HUGE_ID if kind == 0 else f"flood-{i}",
        signed_authorization=signed.to_bytes(),
        tier="identity",
        match_rules=HUGE_RULES if kind == 1 else ("tin+dob",),
        disclosure_fields=("address",) * (500 if kind == 1 else 1),
        element_count=1,
    )


def _verify_chain(world: World) -> None:
    verification = chain.verify_chain(world.ledger.stored_entries())
    assert verification.ok, verification


# --------------------------------------------------------------------------- audit flood


def test_refused_open_flood_adds_a_bounded_number_of_small_entries(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=4)
    clock = Clock(1_800_000_000.0)
    custodian = world.custodian(clock=clock)
    untrusted = Ed25519PrivateKey.generate()
    before_bytes, before_seq = _chain_bytes(world), world.ledger.audit_head()[0]
    request_bytes = 0
    refused: dict[str, int] = {}
    for i in range(FLOOD):
        req = _hostile_open(world, i, untrusted)
        names = req.match_rules + req.disclosure_fields
        request_bytes += len(req.session_id) + sum(map(len, names))
        clock.now += 0.001  # 10,000 refusals in 10 s of custodian time
        with pytest.raises(PolicyRefusal) as err:
            custodian.session().handle(req, peer_id="agency-a")
        refused[err.value.reasons[0]] = refused.get(err.value.reasons[0], 0) + 1
        assert len(str(err.value)) < 600  # the message never carries the request
    assert refused == {"malformed": 6_667, "untrusted_signer": 3_333}
    summarised = custodian.config.refusals.flush(world.ledger, clock())
    added = world.ledger.audit_head()[0] - before_seq
    grown = _chain_bytes(world) - before_bytes
    per_refusal = grown / FLOOD
    print(f"\n{FLOOD:,} refused opens ({request_bytes / 1e6:,.0f} MB of requests): "
          f"{added} audit entries, {grown:,} bytes, {per_refusal:.1f} bytes per refusal")
    policy = world.policy
    # The burst, then per token refilled over the 10 s one entry and the summary before
    # it, and the final summary.
    bound = policy.audited_refusals_burst + 2 * (policy.audited_refusals_per_minute // 6 + 1) + 1
    assert added <= bound
    assert grown <= bound * 600 and per_refusal < 2
    # The account stays exact: every refusal is an entry or inside a summary's count.
    audited = _entries(world, "refusal")
    counted = sum(e.payload["count"] for e in _entries(world, REFUSALS_SUPPRESSED))
    assert len(audited) + counted == FLOOD and summarised > 0
    assert all(len(e.payload["request_sha256"]) == 64 for e in audited)
    assert all(HUGE_ID not in json.dumps(e.payload) for e in audited)
    _verify_chain(world)


def test_refusal_limiter_refills_and_summarises_per_peer() -> None:
    limiter = RefusalLimiter(burst=2, per_minute=60, summary_s=10)
    assert [limiter.admit("a", 0.0).recorded for _ in range(3)] == [True, True, False]
    assert limiter.admit("b", 0.0).recorded  # peers have buckets of their own
    assert limiter.pending() == 1
    later = limiter.admit("a", 1.5)  # one token refilled: recorded, the summary goes first
    assert later.recorded and [(s.peer, s.count) for s in later.summaries] == [("a", 1)]
    for t in (1.6, 1.7, 1.8):  # half a token left, refilling at one a second
        assert not limiter.admit("a", t).recorded
    refilled = limiter.admit("a", 12.5)
    assert refilled.recorded and [(s.count, s.since) for s in refilled.summaries] == [(3, 1.6)]
    # Without refills, a summary is still written once its window reaches summary_s.
    silent = RefusalLimiter(burst=1, per_minute=0, summary_s=10)
    assert silent.admit("c", 0.0).recorded
    assert [silent.admit("c", t).summaries for t in (1.0, 2.0)] == [(), ()]
    due = silent.admit("c", 11.0)
    assert not due.recorded and [(s.count, s.since) for s in due.summaries] == [(3, 1.0)]
    assert silent.pending() == 0


def test_refusal_limits_are_custodian_policy_fields(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=2, audited_refusals_burst=3,
                       audited_refusals_per_minute=0, refusal_summary_s=5)
    path = tmp_path / "policy.json"
    write_policy(world.policy, path)
    policy = read_policy(path)
    assert (policy.audited_refusals_burst, policy.audited_refusals_per_minute,
            policy.refusal_summary_s) == (3, 0, 5)
    limiter = RefusalLimiter.from_policy(policy)
    assert [limiter.admit("p", 0.0).recorded for _ in range(4)] == [True, True, True, False]
    with pytest.raises(ValueError, match="audited_refusals_burst"):
        replace(policy, audited_refusals_burst=0)


def test_flood_over_mtls_status_and_log_stay_bounded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    world = make_world(tmp_path, n_records=4)
    untrusted = Ed25519PrivateKey.generate()
    custodian = world.custodian()
    before_seq = world.ledger.audit_head()[0]
    n = 600
    caplog.set_level(logging.WARNING, logger="agency_b")
    started = time.monotonic()
    with custodian_over_mtls(custodian, tmp_path / "pki") as (address, tls):
        with kit.secure_channel(address, tls) as channel:
            stub = pb2_grpc.CustodianStub(channel)
            for i in range(n):
                req = _hostile_open(world, i, untrusted)
                with pytest.raises(grpc.RpcError) as err:
                    stub.OpenSession(codec.to_pb(req), timeout=30)
                code, details = err.value.code(), err.value.details() or ""
                expected = (grpc.StatusCode.INVALID_ARGUMENT if i % 3 != 2
                            else grpc.StatusCode.UNAUTHENTICATED)
                assert code == expected, (i, code, details[:200])
                assert len(details) <= kit.MAX_STATUS_CHARS
                assert details.split(":")[0] in ("malformed", "untrusted_signer",
                                                 "field_too_long")  # the codec's own refusal
    elapsed = time.monotonic() - started
    policy = world.policy
    bound = policy.audited_refusals_burst + 2 * (
        int(policy.audited_refusals_per_minute * elapsed / 60) + 2)
    lines = [kit.JSONFormatter().format(r) for r in caplog.records if r.name == "agency_b"]
    refused_lines = [line for line in lines if '"refused"' in line]
    codec_lines = sum(1 for r in caplog.records if r.name == "proto.codec")
    print(f"\n{n} refused opens over mTLS: {len(refused_lines)} 'refused' log lines "
          f"from the service, {sum(map(len, lines)):,} log bytes; {codec_lines} lines from "
          "the codec (oversized fields, refused before the service); "
          f"{world.ledger.audit_head()[0] - before_seq} audit entries")
    assert 0 < len(lines) <= bound
    assert all(len(line) < 4_000 for line in lines)
    assert world.ledger.audit_head()[0] - before_seq <= bound
    _verify_chain(world)


# --------------------------------------------------------------------------- expiry


def _open_in_process(world: World, custodian: Custodian, not_after: int,
                     ) -> tuple[RequesterSession, Any]:
    signed = world.authorize(not_after=not_after)
    requester = RequesterSession(signed, [as_query(p) for p in world.records[:4]])
    session = custodian.session()
    requester.handle(session.handle(requester.open_request(), peer_id="agency-a"))
    return requester, session


def test_expiry_mid_session_refuses_evaluate_and_tags_in_process(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=20)
    clock = Clock(float(int(time.time())))
    custodian = world.custodian(clock=clock)
    expiry = int(clock.now) + 100
    # StreamTags after expiry
    _, tags_session = _open_in_process(world, custodian, expiry)
    clock.now = expiry + 1
    with pytest.raises(PolicyRefusal) as err:
        list(tags_session.tag_chunks(peer_id="agency-a"))
    assert err.value.reasons == ("expired",)
    # Evaluate after expiry: refused before anything is counted
    clock.now = expiry - 50
    requester, eval_session = _open_in_process(world, custodian, expiry)
    chunk = next(requester.requests(requester.exchanges[1]))
    clock.now = expiry + 1
    with pytest.raises(PolicyRefusal) as err:
        eval_session.handle(chunk, peer_id="agency-a")
    assert err.value.reasons == ("expired",) and eval_session.evaluated == 0
    assert eval_session.state is CustodianState.FAILED
    # Expiry during a tag stream: the next chunk is refused
    clock.now = expiry - 50
    _, streaming = _open_in_process(world, custodian, expiry)
    stream = streaming.tag_chunks(2, peer_id="agency-a")
    assert isinstance(next(stream), TagChunk)
    clock.now = expiry + 1
    with pytest.raises(PolicyRefusal):
        next(stream)


def test_expiry_mid_session_over_mtls(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=20)
    clock = Clock(float(int(time.time())))
    custodian = world.custodian(clock=clock)
    expiry = int(clock.now) + 100
    with custodian_over_mtls(custodian, tmp_path / "pki") as (address, tls):
        with kit.secure_channel(address, tls) as channel:
            stub = pb2_grpc.CustodianStub(channel)
            opened = []
            for _ in range(2):
                requester = RequesterSession(world.authorize(not_after=expiry),
                                             [as_query(p) for p in world.records[:4]])
                requester.handle(codec.from_pb(OpenResponse, stub.OpenSession(
                    codec.to_pb(requester.open_request()), timeout=30)))
                opened.append(requester)
            clock.now = expiry + 1
            with pytest.raises(grpc.RpcError) as err:
                list(stub.StreamTags(pb2.SessionRef(session_id=opened[0].session_id),
                                     timeout=30))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert (err.value.details() or "").startswith("expired: ")
            chunk = next(opened[1].requests(opened[1].exchanges[1]))
            assert isinstance(chunk, EvaluateChunk)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Evaluate(iter([codec.to_pb(chunk, session_id=opened[1].session_id)]),
                                   timeout=30))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert (err.value.details() or "").startswith("expired: ")
    auth_budget = world.ledger.budget(opened[1].signed.authorization.authorization_id)
    assert auth_budget.evaluated == 0


# --------------------------------------------------------------------------- replays


def _disclose_stream(session_id: str, rule: str, output: bytes, requests: int
                     ) -> Iterator[Any]:
    for seq in range(requests):
        yield codec.to_pb(DisclosureRequest(seq=seq, outputs=((rule, output),) * 4096),
                          session_id=session_id)


def test_replayed_output_grows_the_ledger_once_per_session(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=20)
    custodian = world.custodian()
    signed = world.authorize()
    first = run_in_process(RequesterSession(signed, [as_query(world.records[3])],
                                            signing_key=world.requester_key),
                           custodian.session(), requester_id="agency-a")
    (match,) = first.matches
    auth_id = signed.authorization.authorization_id
    with custodian_over_mtls(custodian, tmp_path / "pki") as (address, tls):
        with kit.secure_channel(address, tls) as channel:
            stub = pb2_grpc.CustodianStub(channel)
            for session in range(2):
                requester = RequesterSession(signed, [as_query(world.records[3])])
                stub.OpenSession(codec.to_pb(requester.open_request()), timeout=30)
                before = world.ledger.audit_head()[0]
                replies = list(stub.Disclose(
                    _disclose_stream(requester.session_id, match.rule_id, match.output, 4),
                    timeout=60))
                assert len(replies) == 4
                assert all(len(r.disclosures) == 4096 and not r.rejected for r in replies)
                added = world.ledger.audit_head()[0] - before
                print(f"\nsession {session}: 4 x 4,096 replays -> {added} audit entries")
                assert added <= 1
    repeats = world.ledger.disclosures(auth_id, include_repeats=True)
    assert [r.repeat for r in repeats] == [False, True, True]  # first, then once per session
    assert world.ledger.budget(auth_id).disclosed == 1  # a repeat does not count
    _verify_chain(world)


def test_replay_within_the_disclosing_session_adds_nothing(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=20)
    custodian = world.custodian()
    signed = world.authorize()
    requester = RequesterSession(signed, [as_query(world.records[5])])
    session = custodian.session()
    requester.handle(session.handle(requester.open_request(), peer_id="agency-a"))
    run_exchanges(requester, session)
    (match,) = requester.match()
    first = session.handle(DisclosureRequest(seq=0, outputs=((match.rule_id, match.output),)))
    assert len(first.disclosures) == 1 and session.disclosed == 1
    before = world.ledger.audit_head()[0]
    again = session.handle(DisclosureRequest(seq=1, outputs=((match.rule_id, match.output),)
                                             * 4096))
    assert len(again.disclosures) == 4096 and session.disclosed == 1
    assert world.ledger.audit_head()[0] == before


# --------------------------------------------------------------------------- status codes


def _open_pb(base: OpenRequest, **changes: Any) -> Any:
    return codec.to_pb(replace(base, **changes))


@contextmanager
def _three_agencies(world: World, pki: Path) -> Iterator[tuple[Any, Any]]:
    """The custodian over mTLS with receipt keys of two requesters, agency-a and agency-c:
    stubs for both."""
    write_dev_pki(pki, ["agency-a", "agency-b", "agency-c"], server_agencies=["agency-b"])
    custodian = Custodian(CustodianConfig(
        policy=world.policy, records=world.records, ledger=world.ledger,
        master_secret=world.master_secret, signing_key=world.custodian_key,
        requester_keys={"agency-a": world.requester_key.public_key(),
                        "agency-c": Ed25519PrivateKey.generate().public_key()}))
    server, port = serve_custodian(custodian, kit.TLSFiles.from_dir(pki, "agency-b", "server"),
                                   "127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    try:
        with kit.secure_channel(address, kit.TLSFiles.from_dir(pki, "agency-a", "client")) as a, \
                kit.secure_channel(address, kit.TLSFiles.from_dir(pki, "agency-c", "client")) as c:
            yield pb2_grpc.CustodianStub(a), pb2_grpc.CustodianStub(c)
    finally:
        server.stop(0)


def test_session_id_refusals_are_one_neutral_answer_over_mtls(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=12)
    rules = ("tin+dob", "tin+last_name")
    with _three_agencies(world, tmp_path / "pki") as (stub, stranger):
        owner = RequesterSession(world.authorize(rules=rules),
                                 [as_query(p) for p in world.records[:2]],
                                 match_rules=("tin+dob",))
        owner_open = owner.open_request()  # two elements: two queries, one rule
        stub.OpenSession(codec.to_pb(owner_open), timeout=30)
        sid = owner.session_id
        # another agency, under its own authorization, naming the same session id
        theirs = RequesterSession(world.authorize(rules=rules, requester="agency-c"),
                                  [as_query(p) for p in world.records[:2]], session_id=sid,
                                  match_rules=("tin+dob",))
        # the owner under another authorization
        other = RequesterSession(world.authorize(rules=rules),
                                 [as_query(world.records[1])], session_id=sid)
        # the owner, reopening with other rules and the same count (other metadata)
        changed = RequesterSession(owner.signed, [as_query(world.records[0])],
                                   session_id=sid, match_rules=rules)
        assert changed.element_count == 2
        # the owner, reopening with another element count
        recount = RequesterSession(owner.signed, [as_query(p) for p in world.records[:3]],
                                   session_id=sid, match_rules=("tin+dob",))
        answers = []
        for caller, attempt in ((stranger, theirs), (stub, other), (stub, changed),
                                (stub, recount)):
            with pytest.raises(grpc.RpcError) as err:
                caller.OpenSession(codec.to_pb(attempt.open_request()), timeout=30)
            answers.append((err.value.code(), err.value.details()))
        # in-session RPCs: another agency's live session answers like an id never opened
        in_session = []
        for session_id in (sid, "never-opened"):
            with pytest.raises(grpc.RpcError) as err:
                list(stranger.StreamTags(pb2.SessionRef(session_id=session_id), timeout=30))
            in_session.append((err.value.code(),
                               (err.value.details() or "").replace(session_id, "<id>")))
        # the same open again resumes (identity sessions are resumable)
        stub.OpenSession(codec.to_pb(owner_open), timeout=30)
    assert answers == [(grpc.StatusCode.FAILED_PRECONDITION,
                        f"session_id_unavailable: {SESSION_ID_UNAVAILABLE}")] * 4
    assert in_session[0] == in_session[1]
    assert in_session[0][0] == grpc.StatusCode.NOT_FOUND


def test_malformed_opens_get_specific_codes_over_mtls(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=12)
    custodian = world.custodian()
    with custodian_over_mtls(custodian, tmp_path / "pki") as (address, tls):
        with kit.secure_channel(address, tls) as channel:
            stub = pb2_grpc.CustodianStub(channel)
            requester = RequesterSession(world.authorize(), [as_query(world.records[0])])
            base = requester.open_request()
            cases = {
                "long id": (_open_pb(base, session_id="x" * (MAX_SESSION_ID + 1)),
                            grpc.StatusCode.INVALID_ARGUMENT),
                "blank tier": (_open_pb(base, tier=" "), grpc.StatusCode.INVALID_ARGUMENT),
                "blank engine": (_open_pb(base, engine=" "),
                                 grpc.StatusCode.PERMISSION_DENIED),
                "aggregate tier": (_open_pb(base, tier="aggregate"),
                                   grpc.StatusCode.PERMISSION_DENIED),
                "blank rule": (_open_pb(base, match_rules=(" ",)),
                               grpc.StatusCode.INVALID_ARGUMENT),
                "huge count": (_open_pb(base, element_count=2**63 + 5),
                               grpc.StatusCode.INVALID_ARGUMENT),
                "garbage authorization": (_open_pb(base, signed_authorization=b"{"),
                                          grpc.StatusCode.INVALID_ARGUMENT),
            }
            seen = {}
            for name, (pb, expected) in cases.items():
                with pytest.raises(grpc.RpcError) as err:
                    stub.OpenSession(pb, timeout=30)
                seen[name] = err.value.code()
                assert err.value.code() == expected, (name, err.value.details())
                assert len(err.value.details() or "") <= kit.MAX_STATUS_CHARS
            # another tier's or engine's RPC on an identity (OPRF) session: its transition
            # table refuses it, typed
            opened = stub.OpenSession(codec.to_pb(base), timeout=30)
            sid = opened.session_id
            with pytest.raises(grpc.RpcError) as err:
                list(stub.KKRTTags(pb2.SessionRef(session_id=sid), timeout=30))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, seen
            with pytest.raises(grpc.RpcError) as err:
                stub.AggregateUpload(iter([pb2.ElementChunk(
                    session_id=sid, seq=0, elements=oprf.blind_batch([b"k"])[1])]), timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, seen


# --------------------------------------------------------------------------- evaluated counts


def test_evaluated_counts_only_evaluated_elements(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=12)
    custodian = world.custodian()
    signed = world.authorize()
    requester, session = _open_in_process(world, custodian, signed.authorization.not_after)
    good = oprf.blind_batch([b"a", b"b"])[1]
    session.handle(EvaluateChunk(seq=0, elements=good), peer_id="agency-a")
    assert session.evaluated == 2
    bad = good[:32] + b"\x00" * 32  # one valid element, then the identity
    with pytest.raises(InvalidElementError):
        session.handle(EvaluateChunk(seq=1, elements=bad), peer_id="agency-a")
    auth_id = requester.signed.authorization.authorization_id
    assert world.ledger.budget(auth_id).evaluated == 2  # the refused chunk counted nothing
    (row,) = world.ledger.sessions(auth_id)
    assert row.evaluated == 2
    _verify_chain(world)


def test_refused_kkrt_chunks_count_nothing(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=12, allowed_engines=frozenset({"oprf", "kkrt"}))
    signed = world.authorize(engines=("kkrt",))
    auth_id = signed.authorization.authorization_id
    for damage in ("truncated", "out of order"):
        requester = RequesterSession(signed, [as_query(p) for p in world.records[:3]],
                                     engine="kkrt")
        session = world.custodian().session()
        requester.handle(session.handle(requester.open_request(), peer_id="agency-a"))
        setup, extend = requester.exchanges[0], requester.exchanges[1]
        for message in requester.requests(setup):
            requester.handle(session.handle(message, peer_id="agency-a"))
        chunk = next(requester.requests(extend))
        assert isinstance(chunk, KKRTExtensionChunk)
        bad = (replace(chunk, columns=chunk.columns[:-1]) if damage == "truncated"
               else replace(chunk, seq=chunk.seq + 1))
        with pytest.raises(PSIError):
            session.handle(bad, peer_id="agency-a")
        assert session.evaluated == 0 and session.state is CustodianState.FAILED
    assert world.ledger.budget(auth_id).evaluated == 0  # refused chunks were never evaluated
    assert world.ledger.budget(auth_id).reserved > 0  # the reservations stay charged

