"""End to end over real gRPC servers on loopback with real mutual TLS (no mocks)."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import grpc
import pytest

from agency_a.client import run_remote_session
from agency_b.service import serve as serve_custodian
from proto import service_kit as kit
from protocol.cli.dev_pki import write_dev_pki
from protocol.crypto import oprf
from protocol.domain.messages import MAX_CHUNK_ELEMENTS
from protocol.errors import LedgerError
from protocol.policy.decide import SignedAuthorization
from protocol.sessions.identity import RequesterSession, run_in_process
from tests.factories import as_query, make_person, make_world

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    write_dev_pki(d, ["agency-a", "agency-b", "agency-c"], server_agencies=["agency-b"])
    other = tmp_path_factory.mktemp("pki-other")
    write_dev_pki(other, ["agency-a"], server_agencies=[])
    (d / "rogue").mkdir()
    for name in ("agency-a.client.pem", "agency-a.client.key"):
        (d / "rogue" / name).write_bytes((other / name).read_bytes())
    (d / "rogue" / "ca.pem").write_bytes((d / "ca.pem").read_bytes())
    return d


@pytest.fixture()
def world(tmp_path):
    return make_world(tmp_path, n_records=80)


@pytest.fixture()
def custodian_server(world, certs):
    custodian = world.custodian()
    tls = kit.TLSFiles.from_dir(certs, "agency-b", "server")
    server, port = serve_custodian(custodian, tls, "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{port}", custodian
    finally:
        server.stop(0).wait()


def channel_for(certs: Path, address: str, agency: str = "agency-a",
                directory: Path | None = None) -> grpc.Channel:
    tls = kit.TLSFiles.from_dir(directory or certs, agency, "client")
    if directory is not None:
        tls = dataclasses.replace(tls, ca=certs / "ca.pem")
    return kit.secure_channel(address, tls)


def queries_for(world):
    inside = [as_query(world.records[i]) for i in range(40, 80)]
    outside = [as_query(make_person(1000 + i, prefix="z")) for i in range(30)]
    return inside + outside


def _result_set(results):
    return {(r.query_record_id, r.rule_id, tuple(sorted(r.fields.items()))) for r in results}


def test_happy_path_matches_in_process_exactly(world, certs, custodian_server) -> None:
    address, _ = custodian_server
    signed = world.authorize(rules=("tin+dob", "first+last+dob+zip"))
    queries = queries_for(world)
    with channel_for(certs, address) as ch:
        kit.wait_healthy(ch)
        remote = run_remote_session(
            RequesterSession(signed, queries, signing_key=world.requester_key, chunk_size=16), ch)
    # the same inputs in one process, under a separate authorization (same records)
    signed2 = world.authorize(rules=("tin+dob", "first+last+dob+zip"))
    local = run_in_process(RequesterSession(signed2, queries, signing_key=world.requester_key),
                           world.custodian().session(), requester_id="agency-a")
    strip = {(q, r, f) for q, r, f in _result_set(remote.results)}
    assert strip == _result_set(local.results)
    assert len(remote.results) == 80  # 40 subjects x 2 rules
    assert remote.receipt.requester_signature and remote.receipt.custodian_signature
    assert remote.receipt.disclosed == 40
    auth_id = signed.authorization.authorization_id
    assert len(world.ledger.disclosures(auth_id)) == 40
    assert world.ledger.receipts(auth_id)[0].requester_signature


def _open(stub, signed, *, elements=5, rules=("tin+dob",), fields=("address",),
          session_id="s-1", tier="identity"):
    return stub.OpenSession(pb2.OpenSessionRequest(
        session_id=session_id, signed_authorization=signed.to_bytes(), tier=tier,
        match_rules=list(rules), disclosure_fields=list(fields), element_count=elements,
        engine="oprf"), timeout=30)


def _tampered(signed: SignedAuthorization) -> bytes:
    doc = json.loads(signed.to_bytes())
    doc["authorization"]["max_evaluations"] = 10**9
    return json.dumps(doc).encode()


@pytest.mark.parametrize("case, code, reason", [
    ("untrusted", grpc.StatusCode.UNAUTHENTICATED, "untrusted_signer"),
    ("tampered", grpc.StatusCode.UNAUTHENTICATED, "bad_signature"),
    ("expired", grpc.StatusCode.FAILED_PRECONDITION, "expired"),
    ("not_yet_valid", grpc.StatusCode.FAILED_PRECONDITION, "not_yet_valid"),
    ("requester_mismatch", grpc.StatusCode.PERMISSION_DENIED, "requester_mismatch"),
    ("custodian_mismatch", grpc.StatusCode.PERMISSION_DENIED, "custodian_mismatch"),
    ("rule_not_permitted", grpc.StatusCode.PERMISSION_DENIED, "rule_not_permitted"),
    ("rule_too_weak", grpc.StatusCode.PERMISSION_DENIED, "rule_too_weak"),
    ("field_not_permitted", grpc.StatusCode.PERMISSION_DENIED, "field_not_permitted"),
    ("field_never_disclosed", grpc.StatusCode.PERMISSION_DENIED, "field_never_disclosed"),
    ("tier", grpc.StatusCode.PERMISSION_DENIED, "tier_not_permitted"),
    ("budget", grpc.StatusCode.RESOURCE_EXHAUSTED, "budget_exhausted"),
    ("rule_unknown", grpc.StatusCode.INVALID_ARGUMENT, "rule_unknown"),
    ("malformed", grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
])
def test_each_refusal_has_its_status_code(world, certs, custodian_server, case, code,
                                          reason) -> None:
    import time

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    address, _ = custodian_server
    now = int(time.time())
    kwargs: dict = {}
    open_kw: dict = {}
    raw: bytes | None = None
    if case == "untrusted":
        kwargs["key"] = Ed25519PrivateKey.generate()
    elif case == "expired":
        kwargs.update(not_before=now - 7200, not_after=now - 3600)
    elif case == "not_yet_valid":
        kwargs.update(not_before=now + 3600, not_after=now + 7200)
    elif case == "requester_mismatch":
        kwargs["requester"] = "agency-c"
    elif case == "custodian_mismatch":
        kwargs["custodian"] = "agency-x"
    elif case == "rule_not_permitted":
        open_kw["rules"] = ("tin+last_name",)
    elif case == "rule_too_weak":
        kwargs["rules"] = ("first+last+address",)
        open_kw["rules"] = ("first+last+address",)
    elif case == "field_not_permitted":
        open_kw["fields"] = ("dob",)
    elif case == "field_never_disclosed":
        kwargs["fields"] = ("address", "tin")
        open_kw["fields"] = ("tin",)
    elif case == "tier":
        open_kw["tier"] = "aggregate"
    elif case == "budget":
        kwargs["max_evaluations"] = 3
    elif case == "rule_unknown":
        open_kw["rules"] = ("shoe+size",)
    signed = world.authorize(**kwargs)
    if case == "tampered":
        raw = _tampered(signed)
    if case == "malformed":
        raw = b"{not json"
    with channel_for(certs, address) as ch:
        stub = pb2_grpc.CustodianStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            if raw is not None:
                stub.OpenSession(pb2.OpenSessionRequest(
                    session_id="s", signed_authorization=raw, tier="identity",
                    match_rules=["tin+dob"], disclosure_fields=["address"], element_count=5),
                    timeout=30)
            else:
                _open(stub, signed, **open_kw)
    assert err.value.code() == code, err.value.details()
    assert reason in err.value.details()
    # a refused authorization is not even registered, let alone charged
    with pytest.raises(LedgerError):
        world.ledger.budget(signed.authorization.authorization_id)


def test_other_agency_certificate_is_refused(world, certs, custodian_server) -> None:
    address, _ = custodian_server
    signed = world.authorize()  # names agency-a
    with channel_for(certs, address, agency="agency-c") as ch:
        with pytest.raises(grpc.RpcError) as err:
            _open(pb2_grpc.CustodianStub(ch), signed)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "requester_mismatch" in err.value.details()


def test_unknown_ca_and_plaintext_are_refused(world, certs, custodian_server) -> None:
    address, _ = custodian_server
    signed = world.authorize()
    with channel_for(certs, address, directory=certs / "rogue") as ch:
        with pytest.raises(grpc.RpcError) as err:
            _open(pb2_grpc.CustodianStub(ch), signed)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _open(pb2_grpc.CustodianStub(ch), signed)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_session_cannot_be_used_by_another_agency(world, certs, custodian_server) -> None:
    address, _ = custodian_server
    signed = world.authorize()
    with channel_for(certs, address) as ch:
        _open(pb2_grpc.CustodianStub(ch), signed, session_id="mine")
    with channel_for(certs, address, agency="agency-c") as ch:
        with pytest.raises(grpc.RpcError) as err:
            list(pb2_grpc.CustodianStub(ch).StreamTags(pb2.SessionRef(session_id="mine")))
    # answered exactly like an id never opened: no oracle on which ids exist (issue 13)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "unknown_session: no open session 'mine'"


def _blinded(n: int) -> bytes:
    return oprf.blind_batch([f"k{i}".encode() for i in range(n)])[1]


def test_disconnect_and_reconnect_neither_refunds_nor_double_spends(
        world, certs, custodian_server) -> None:
    address, _ = custodian_server
    signed = world.authorize(max_evaluations=100)
    auth_id = signed.authorization.authorization_id
    with channel_for(certs, address) as ch:
        stub = pb2_grpc.CustodianStub(ch)
        _open(stub, signed, elements=60, session_id="resume-me")
        gate = threading.Event()

        def chunks():
            for seq in range(3):
                yield pb2.ElementChunk(session_id="resume-me", seq=seq, elements=_blinded(10))
            gate.wait(10)  # hold the stream open, then the client goes away

        call = stub.Evaluate(chunks(), timeout=30)
        got = [next(call) for _ in range(3)]
        call.cancel()
        gate.set()
        assert len(got) == 3
    assert world.ledger.budget(auth_id).reserved == 60
    assert world.ledger.budget(auth_id).evaluated == 30
    with channel_for(certs, address) as ch:
        stub = pb2_grpc.CustodianStub(ch)
        again = _open(stub, signed, elements=60, session_id="resume-me")
        assert again.budget_remaining == 40  # not refunded, not charged twice
        assert world.ledger.budget(auth_id).reserved == 60
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Evaluate(iter([
                pb2.ElementChunk(session_id="resume-me", seq=9, elements=_blinded(30)),
                pb2.ElementChunk(session_id="resume-me", seq=10, elements=_blinded(31)),
            ]), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # a second session may not take more than what is left
        with pytest.raises(grpc.RpcError) as err:
            _open(stub, signed, elements=41, session_id="another")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    budget = world.ledger.budget(auth_id)
    assert budget.evaluated == 60 and budget.reserved == 60


def test_bad_chunks_are_rejected_and_server_keeps_serving(world, certs, custodian_server) -> None:
    address, _ = custodian_server
    signed = world.authorize(max_evaluations=10**6)
    with channel_for(certs, address) as ch:
        stub = pb2_grpc.CustodianStub(ch)
        cases = [
            (b"\x01" * 33, grpc.StatusCode.INVALID_ARGUMENT),  # not a multiple of 32
            (b"\x00" * 32, grpc.StatusCode.INVALID_ARGUMENT),  # identity element
            (b"\xff" * 32, grpc.StatusCode.INVALID_ARGUMENT),  # non-canonical
            (b"\x00" * 32 * (MAX_CHUNK_ELEMENTS + 1), grpc.StatusCode.FAILED_PRECONDITION),
            (b"\x00" * (kit.MAX_MESSAGE_BYTES + 64), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ]
        for i, (payload, code) in enumerate(cases):
            sid = f"bad-{i}"  # a malformed message ends its session: one session per case
            _open(stub, signed, elements=MAX_CHUNK_ELEMENTS + 10, session_id=sid)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Evaluate(iter([pb2.ElementChunk(session_id=sid, seq=0,
                                                          elements=payload)]), timeout=30))
            assert err.value.code() == code, (len(payload), err.value.details())
        # the session that took a malformed chunk refuses what follows, naming why
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamTags(pb2.SessionRef(session_id="bad-0"), timeout=30))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "failed earlier (invalid_element: " in err.value.details()
    # the server is still up and serves a complete session for someone else
    signed2 = world.authorize()
    with channel_for(certs, address) as ch:
        out = run_remote_session(
            RequesterSession(signed2, [as_query(world.records[1])],
                             signing_key=world.requester_key), ch)
    assert len(out.results) == 1


def test_concurrent_sessions_are_served(world, certs, custodian_server) -> None:
    address, _ = custodian_server
    errors: list[BaseException] = []
    outcomes = []

    def one(i: int) -> None:
        try:
            signed = world.authorize()
            with channel_for(certs, address) as ch:
                outcomes.append(run_remote_session(RequesterSession(
                    signed, [as_query(world.records[i]), as_query(make_person(900 + i))],
                    signing_key=world.requester_key, chunk_size=1), ch))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(len(o.results) for o in outcomes) == [1, 1, 1, 1]
