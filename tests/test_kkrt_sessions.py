"""The KKRT engine behind the same session interface (issue 8): same matches, same policy."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from agency_a.client import run_remote_session
from agency_b.service import serve as serve_custodian
from proto import service_kit as kit
from protocol.cli.dev_pki import write_dev_pki
from protocol.errors import PolicyRefusal, ProtocolError
from protocol.sessions.identity import RequesterSession, run_exchanges, run_in_process
from tests.factories import as_query, make_person, make_world

ENGINES = frozenset({"oprf", "kkrt"})
RULES = ("tin+dob", "first+last+dob+zip")


def _queries(world):
    inside = [as_query(world.records[i]) for i in range(30, 70)]
    return inside + [as_query(make_person(2000 + i, prefix="k")) for i in range(25)]


def _result_set(results):
    return {(r.query_record_id, r.rule_id, tuple(sorted(r.fields.items()))) for r in results}


def test_both_engines_find_exactly_the_same_matches(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=80, allowed_engines=ENGINES)
    queries = _queries(world)
    outcomes = {}
    for engine in ("oprf", "kkrt"):
        signed = world.authorize(rules=RULES, engines=("oprf", "kkrt"))
        rs = RequesterSession(signed, queries, engine=engine, signing_key=world.requester_key)
        outcomes[engine] = run_in_process(rs, world.custodian().session(),
                                          requester_id="agency-a")
    assert _result_set(outcomes["kkrt"].results) == _result_set(outcomes["oprf"].results)
    assert len(outcomes["kkrt"].results) == 80
    assert outcomes["kkrt"].receipt.disclosed == 40
    # one bin = one unit: the KKRT session was charged its bins, not its elements
    assert outcomes["kkrt"].receipt.evaluated > len(queries) * len(RULES)


def test_engine_must_be_permitted(tmp_path: Path) -> None:
    world = make_world(tmp_path)  # default policy: oprf only
    signed = world.authorize(engines=("oprf", "kkrt"))
    rs = RequesterSession(signed, [as_query(world.records[0])], engine="kkrt",
                          signing_key=world.requester_key)
    with pytest.raises(PolicyRefusal) as err:
        run_in_process(rs, world.custodian().session(), requester_id="agency-a")
    assert err.value.reasons == ("engine_not_permitted",)


def test_invented_kkrt_proofs_disclose_nothing(tmp_path: Path) -> None:
    from protocol.domain.messages import DisclosureRequest

    world = make_world(tmp_path, allowed_engines=ENGINES)
    signed = world.authorize(engines=("kkrt",))
    cs = world.custodian().session()
    rs = RequesterSession(signed, [as_query(world.records[5])], engine="kkrt")
    rs.handle(cs.handle(rs.open_request(), peer_id="agency-a"))
    run_exchanges(rs, cs)
    (m,) = rs.match()
    forged = bytearray(m.output)
    forged[-1] ^= 1
    resp = cs.handle(DisclosureRequest(seq=0, outputs=(
        ("tin+dob", bytes(forged)), ("tin+dob", b"\x00" * 20), ("tin+dob", m.output[:19]))))
    assert resp.disclosures == () and resp.rejected == (0, 1, 2)
    ok = cs.handle(DisclosureRequest(seq=1, outputs=(("tin+dob", m.output),)))
    assert len(ok.disclosures) == 1


def test_kkrt_over_grpc(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=80, allowed_engines=ENGINES)
    write_dev_pki(tmp_path / "pki", ["agency-a", "agency-b"], server_agencies=["agency-b"])
    server, port = serve_custodian(
        world.custodian(), kit.TLSFiles.from_dir(tmp_path / "pki", "agency-b", "server"),
        "127.0.0.1:0")
    tls = kit.TLSFiles.from_dir(tmp_path / "pki", "agency-a", "client")
    try:
        queries = _queries(world)
        signed = world.authorize(rules=RULES, engines=("kkrt",))
        with kit.secure_channel(f"127.0.0.1:{port}", tls) as ch:
            out = run_remote_session(RequesterSession(
                signed, queries, engine="kkrt", signing_key=world.requester_key), ch)
        assert len(out.results) == 80 and out.receipt.requester_signature
        # an oprf session under a kkrt-only authorization is refused
        with kit.secure_channel(f"127.0.0.1:{port}", tls) as ch:
            with pytest.raises(grpc.RpcError) as err:
                run_remote_session(RequesterSession(signed, queries), ch)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop(0)


def test_engines_agree_on_packed_records_with_exclusions(tmp_path: Path) -> None:
    """The custodian's packed storage (the services' case) and a policy that excludes a
    record class: both engines key only in-scope records, and agree exactly."""
    from dataclasses import replace

    from protocol.domain.recordstore import CompactRecords

    world = make_world(tmp_path, n_records=80, allowed_engines=ENGINES,
                       excluded_record_classes=frozenset({"protected"}))
    people = [replace(p, record_class="protected") if i % 4 == 0 else p
              for i, p in enumerate(world.records)]
    world.records = CompactRecords.of(people)
    queries = _queries(world)
    results = {}
    for engine in ("oprf", "kkrt"):
        signed = world.authorize(rules=RULES, engines=("oprf", "kkrt"))
        rs = RequesterSession(signed, queries, engine=engine, signing_key=world.requester_key)
        results[engine] = _result_set(run_in_process(rs, world.custodian().session(),
                                                     requester_id="agency-a").results)
    assert results["kkrt"] == results["oprf"]
    matched = {qid for qid, _, _ in results["kkrt"]}
    # queries 30..69 hit records 30..69; every fourth record is protected and never matches
    assert matched == {f"q-{world.records[i].record_id}" for i in range(30, 70) if i % 4}


def _evaluated_entries(world) -> list[int]:
    return [e.payload["n"] for e in world.ledger.audit_entries() if e.kind == "budget.evaluated"]


def test_extension_chunks_are_counted_in_one_commit_before_the_tags(tmp_path: Path) -> None:
    """Extension chunks have no reply: policy admits each one (with the units not yet on the
    ledger) and the units are counted in one durable commit before the first tag leaves, so
    the ledger's count is exact without an fsync per chunk; a session that fails mid-stream
    still accounts every chunk it evaluated."""
    world = make_world(tmp_path, n_records=40, allowed_engines=ENGINES)
    queries = [as_query(world.records[i]) for i in range(10)]
    queries += [as_query(make_person(i, prefix="m")) for i in range(1000, 8000)
                if i % 700 != 566]  # area 666 is no SSN
    signed = world.authorize(engines=("kkrt",), max_evaluations=100_000)
    rs = RequesterSession(signed, queries, engine="kkrt", signing_key=world.requester_key)
    outcome = run_in_process(rs, world.custodian().session(), requester_id="agency-a")
    assert rs.element_count > 2 * 4096  # several extension chunks
    assert _evaluated_entries(world) == [rs.element_count]
    assert outcome.receipt.evaluated == rs.element_count
    assert world.ledger.reservation(rs.session_id).evaluated == rs.element_count

    rs = RequesterSession(signed, queries, engine="kkrt", signing_key=world.requester_key)
    cs = world.custodian().session()
    rs.handle(cs.handle(rs.open_request(), peer_id="agency-a"))
    setup_ex, extension_ex, _tags = rs.exchanges
    (setup,) = rs.requests(setup_ex)
    rs.handle(cs.handle(setup))
    chunks = rs.requests(extension_ex)
    first, second = next(chunks), next(chunks)
    assert cs.handle(first) is None and cs.handle(second) is None
    assert world.ledger.reservation(rs.session_id).evaluated == 0  # nothing has left yet
    with pytest.raises((PolicyRefusal, ProtocolError)):
        cs.handle(first)  # a replayed chunk (past the reservation, too) fails the session
    assert world.ledger.reservation(rs.session_id).evaluated == first.bins + second.bins
