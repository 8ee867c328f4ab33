"""Blinding while the session opens (issue 15: the OPRF engine near its floor at 100k).

The requester blinds its chunks on a thread during ``OpenSession``; these tests check that
this changes nothing anyone can observe except time: the same chunks are sent, a reply to a
chunk blinded but not yet sent is still refused, the verifiable option still verifies every
chunk's proof, and a real session over gRPC with mutual TLS gives the same matches as the
same session run in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agency_a.client import run_remote_session
from proto import service_kit as kit
from protocol.crypto import oprf
from protocol.domain.messages import EvaluateChunk, EvaluatedChunk
from protocol.domain.records import QueryRecord
from protocol.engines.base import RequesterInputs, evaluation_key_pair
from protocol.engines.oprf import OprfCustodian, OprfRequester, SerialOps
from protocol.errors import ProtocolError
from protocol.policy.decide import SignedAuthorization
from protocol.sessions.identity import RequesterSession, SessionOutcome, run_in_process
from tests.factories import World, as_query, custodian_over_mtls, make_person, make_world

CHUNK = 8


@pytest.fixture()
def world(tmp_path: Path) -> World:
    return make_world(tmp_path, n_records=60)


def _queries(world: World) -> list[QueryRecord]:
    inside = [as_query(world.records[i]) for i in range(20, 60)]
    return inside + [as_query(make_person(500 + i, prefix="z")) for i in range(25)]


def _requester(n: int) -> OprfRequester:
    keys = [f"key-{i}".encode() for i in range(n)]
    return OprfRequester(RequesterInputs(authorization_id="auth-1", session_id="s-1",
                                         inputs=keys, chunk_size=CHUNK, ops=SerialOps()))


def test_chunks_blinded_ahead_are_sent_as_they_are_and_only_once() -> None:
    engine = _requester(3 * CHUNK + 5)
    assert engine.blind_ahead(lambda: False) == engine.chunk_count == 4
    ahead = {seq: msg.elements for seq, (msg, _, _) in engine._ahead.items()}
    sent = [engine.evaluation_chunk(seq) for seq in range(engine.chunk_count)]
    assert [m.elements for m in sent] == [ahead[s] for s in range(4)]
    assert all(len(m.elements) == oprf.ELEMENT_SIZE * n
               for m, n in zip(sent, (CHUNK, CHUNK, CHUNK, 5), strict=True))
    # Nothing is left over to be sent twice, and every blinded element is a valid point.
    assert not engine._ahead
    for m in sent:
        for e in oprf.split_elements(m.elements):
            oprf.deserialize_element(e)


def test_stop_ends_blinding_ahead_between_chunks() -> None:
    engine = _requester(5 * CHUNK)
    asked = iter([False, False, True])
    assert engine.blind_ahead(lambda: next(asked)) == 2
    assert sorted(engine._ahead) == [0, 1]
    # The rest is blinded when it is sent, as without blinding ahead.
    assert len(engine.evaluation_chunk(4).elements) == CHUNK * oprf.ELEMENT_SIZE


def test_a_reply_to_a_chunk_blinded_ahead_but_not_sent_is_refused() -> None:
    """A custodian cannot answer a chunk it was never sent, blinded ahead or not."""
    engine = _requester(2 * CHUNK)
    engine.blind_ahead(lambda: False)
    fake = EvaluatedChunk(seq=1, elements=oprf.hash_to_group(b"x") * CHUNK)
    with pytest.raises(ProtocolError, match="not requested"):
        engine.handle(fake)
    engine.evaluation_chunk(0)
    with pytest.raises(ProtocolError, match="not requested"):
        engine.handle(fake)


def test_session_blinds_ahead_only_before_it_is_open(world: World) -> None:
    session = RequesterSession(world.authorize(), _queries(world), chunk_size=CHUNK,
                               signing_key=world.requester_key)
    assert session.blind_ahead(lambda: False) == -(-session.element_count // CHUNK)
    custodian = world.custodian().session()
    session.handle(custodian.handle(session.open_request(), peer_id="agency-a"))
    assert session.blind_ahead(lambda: False) == 0


class _SlowOpenCustodian(OprfCustodian):
    """The real engine, whose index build takes at least half a second (as at scale)."""

    def index(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        time.sleep(0.5)
        return super().index(*args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture()
def slow_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("protocol.engines.oprf.OprfEngine.custodian",
                        lambda self, data: _SlowOpenCustodian(data))


class _Counting(RequesterSession):
    """Records how many chunks were ready when the open returned."""

    ready: int = -1

    def blind_ahead(self, stop: Callable[[], bool]) -> int:
        self.ready = super().blind_ahead(stop)
        return self.ready


def _remote(world: World, tmp_path: Path, signed: SignedAuthorization, queries: list[QueryRecord]
            ) -> tuple[_Counting, SessionOutcome]:
    session = _Counting(signed, queries, chunk_size=CHUNK, signing_key=world.requester_key)
    with custodian_over_mtls(world.custodian(), tmp_path / "pki") as (address, tls), \
            kit.secure_channel(address, tls) as channel:
        kit.wait_healthy(channel)
        return session, run_remote_session(session, channel)


@pytest.mark.usefixtures("slow_open")
def test_blinded_while_opening_over_mtls_matches_in_process(world: World,
                                                            tmp_path: Path) -> None:
    queries = _queries(world)
    session, remote = _remote(world, tmp_path, world.authorize(), queries)
    # The open took half a second: the requester had chunks blinded before it returned.
    assert session.ready >= 1
    local = run_in_process(RequesterSession(world.authorize(), queries,
                                            signing_key=world.requester_key),
                           world.custodian().session(), requester_id="agency-a")
    got = {(r.query_record_id, r.rule_id, r.fields["address"]) for r in remote.results}
    assert got == {(r.query_record_id, r.rule_id, r.fields["address"]) for r in local.results}
    assert len(got) == 40
    assert remote.receipt.requester_signature and remote.receipt.custodian_signature


@pytest.mark.usefixtures("slow_open")
def test_verifiable_chunks_blinded_while_opening_all_verify(world: World,
                                                            tmp_path: Path) -> None:
    pinned = evaluation_key_pair(world.master_secret)[1]
    session, remote = _remote(world, tmp_path, world.authorize(evaluation_key=pinned),
                              _queries(world))
    assert session.ready >= 1
    assert session.evaluation_proofs_verified == -(-session.element_count // CHUNK)
    assert len(remote.results) == 40


def test_evaluate_chunk_type_is_what_is_sent() -> None:
    engine = _requester(CHUNK)
    engine.blind_ahead(lambda: False)
    assert isinstance(engine.evaluation_chunk(0), EvaluateChunk)
