"""Verifiable evaluation (docs/architecture.md, Verifiable evaluation; issue 18).

An authorization that pins the custodian's RFC 9497 POPRF public key makes the OPRF engine
evaluate under it with info = the authorization id; every evaluated chunk carries one batch
DLEQ proof that the requester verifies before finalizing anything in that chunk.

Dishonest custodians are real custodians whose engine session is altered in one place
(``OprfCustodianSession.evaluate``): they switch keys mid-session, evaluate under another
authorization's key, send a forged proof, or fall back to unproven mode-0 evaluation.  Each
must be caught by the requester with ``evaluation_proof_invalid``, the session must abort,
and nothing of the offending chunk may be finalized.  The end-to-end runs are over real
gRPC with real mutual TLS (``custodian_over_mtls``) and real SQLite ledgers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from agency_a.cli import verifiable_summary_lines
from agency_a.client import run_remote_session
from agency_a.service import EVALUATION_PROOF_INVALID
from agency_b import cli as cli_b
from proto import service_kit as kit
from protocol.adapters.keys import load_evaluation_key
from protocol.cli import authority as cli_authority
from protocol.crypto import oprf
from protocol.domain.messages import EvaluateChunk, EvaluatedChunk
from protocol.engines import named
from protocol.engines.base import evaluation_info, evaluation_key_pair
from protocol.engines.oprf import EvaluationProofInvalid, OprfCustodianSession, OprfRequester
from protocol.policy import decide as P
from protocol.sessions.identity import RequesterSession, run_in_process
from tests.factories import World, as_query, custodian_over_mtls, make_person, make_world
from tests.test_late_failure import Lab, lab, submit, watch  # noqa: F401  (lab: fixture)
from tests.test_named import certify_world, named_authorization

CHUNK = 16
RULES = ("tin+dob", "first+last+dob+zip")

Evaluate = Callable[[OprfCustodianSession, object], EvaluatedChunk]


def _queries(world: World, matching: int = 40, missing: int = 12) -> list[Any]:
    queries = [as_query(r) for r in world.records[:matching]]
    queries += [as_query(make_person(500 + i, prefix="z")) for i in range(missing)]
    return queries


def _pinned(world: World) -> bytes:
    return evaluation_key_pair(world.master_secret)[1]


def _session(world: World, signed: P.SignedAuthorization, **kw: Any) -> RequesterSession:
    return RequesterSession(signed, _queries(world), match_rules=RULES,
                            signing_key=world.requester_key, chunk_size=CHUNK, **kw)


def _engine(session: RequesterSession) -> OprfRequester:
    engine = session._engine
    assert isinstance(engine, OprfRequester)
    return engine


def _finalized_chunks(session: RequesterSession) -> dict[int, bool]:
    """For every chunk: whether any byte of its outputs or tags was written."""
    engine = _engine(session)
    o, t = oprf.OUTPUT_SIZE, 12
    seen = {}
    for seq in range(engine.chunk_count):
        start = seq * engine.chunk_size
        stop = min(start + engine.chunk_size, engine.units)
        seen[seq] = (any(engine._outputs[start * o:stop * o])
                     or any(engine._tags[start * t:stop * t]))
    return seen


# --------------------------------------------------------------------------- dishonest custodians

HONEST_EVALUATE = OprfCustodianSession.evaluate
BAD_CHUNK = 1  # the custodian is honest for chunk 0, dishonest from chunk 1 on


def _other_key(session: OprfCustodianSession, message: EvaluateChunk) -> EvaluatedChunk:
    """Switches to another POPRF key mid-session, with a valid proof under *that* key."""
    if message.seq < BAD_CHUNK:
        return HONEST_EVALUATE(session, message)
    other_sk, _ = oprf.derive_key_pair_mode(bytes(32), b"a second key", oprf.MODE_POPRF)
    info = evaluation_info(session.index.authorization_id)
    blinded = oprf.split_elements(message.elements)
    evaluated, proof = oprf.poprf_blind_evaluate(other_sk, blinded, info)
    return EvaluatedChunk(seq=message.seq, elements=b"".join(evaluated), proof=proof)


def _other_authorization(session: OprfCustodianSession, message: EvaluateChunk
                         ) -> EvaluatedChunk:
    """Evaluates under its pinned key but another authorization's info (a valid proof)."""
    if message.seq < BAD_CHUNK:
        return HONEST_EVALUATE(session, message)
    assert session._evaluation_secret is not None
    blinded = oprf.split_elements(message.elements)
    evaluated, proof = oprf.poprf_blind_evaluate(
        session._evaluation_secret, blinded, evaluation_info("auth-someone-else"))
    return EvaluatedChunk(seq=message.seq, elements=b"".join(evaluated), proof=proof)


def _forged_proof(session: OprfCustodianSession, message: EvaluateChunk) -> EvaluatedChunk:
    """Evaluates one element under another key and sends the proof of an honest evaluation."""
    honest = HONEST_EVALUATE(session, message)
    if message.seq < BAD_CHUNK:
        return honest
    other_sk, _ = oprf.derive_key_pair_mode(bytes(32), b"a second key", oprf.MODE_POPRF)
    info = evaluation_info(session.index.authorization_id)
    odd = oprf.blind_evaluate(oprf.poprf_evaluation_key(other_sk, info), message.elements[:32])
    return EvaluatedChunk(seq=message.seq, elements=odd + honest.elements[32:],
                          proof=honest.proof)


def _unproven(session: OprfCustodianSession, message: EvaluateChunk) -> EvaluatedChunk:
    """Falls back to mode-0 evaluation under the per-authorization key, with no proof."""
    if message.seq < BAD_CHUNK:
        return HONEST_EVALUATE(session, message)
    key = session._sk  # t^-1 in verifiable sessions; any scalar the requester cannot check
    return EvaluatedChunk(seq=message.seq, elements=oprf.blind_evaluate_batch(
        key, message.elements))


DISHONEST: dict[str, Evaluate] = {
    "switches_keys_mid_session": _other_key,
    "uses_another_authorizations_key": _other_authorization,
    "sends_a_forged_proof": _forged_proof,
    "sends_no_proof": _unproven,
}


@pytest.fixture()
def world(tmp_path: Path) -> World:
    return make_world(tmp_path, n_records=60)


def _assert_caught(session: RequesterSession, exc: BaseException) -> None:
    assert isinstance(exc, EvaluationProofInvalid)
    assert exc.code == "evaluation_proof_invalid"
    assert f"chunk {BAD_CHUNK}" in str(exc)
    assert session.state == session.table.failed
    assert session.failure_reason.startswith("evaluation_proof_invalid: ")
    assert not session.matches and not session.results
    finalized = _finalized_chunks(session)
    assert finalized[BAD_CHUNK] is False  # nothing of the offending chunk was finalized
    assert BAD_CHUNK not in _engine(session)._evaluated_chunks
    assert session.evaluation_proofs_verified <= BAD_CHUNK


@pytest.mark.parametrize("dishonesty", DISHONEST)
def test_dishonest_custodian_caught_in_process(world: World, dishonesty: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(OprfCustodianSession, "evaluate", DISHONEST[dishonesty])
    session = _session(world, world.authorize(rules=RULES, evaluation_key=_pinned(world)))
    with pytest.raises(EvaluationProofInvalid) as caught:
        run_in_process(session, world.custodian().session(), requester_id="agency-a")
    _assert_caught(session, caught.value)
    assert _finalized_chunks(session)[0] is True  # the honest chunk before it verified
    assert session.evaluation_proofs_verified == BAD_CHUNK


@pytest.mark.parametrize("dishonesty", ["switches_keys_mid_session",
                                        "uses_another_authorizations_key",
                                        "sends_a_forged_proof"])
def test_dishonest_custodian_caught_over_mtls(world: World, tmp_path: Path, dishonesty: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(OprfCustodianSession, "evaluate", DISHONEST[dishonesty])
    session = _session(world, world.authorize(rules=RULES, evaluation_key=_pinned(world)))
    with custodian_over_mtls(world.custodian(), tmp_path / "pki") as (address, tls):
        with kit.secure_channel(address, tls) as channel:
            with pytest.raises(EvaluationProofInvalid) as caught:
                run_remote_session(session, channel, rpc_timeout=60)
    _assert_caught(session, caught.value)
    # the custodian disclosed nothing: no disclosure request was ever sent
    assert world.ledger.disclosed_count(session.signed.authorization.authorization_id,
                                        session.session_id) == 0


def test_honest_verifiable_match_equals_mode_0_over_mtls(world: World, tmp_path: Path) -> None:
    custodian = world.custodian()
    outcomes = {}
    with custodian_over_mtls(custodian, tmp_path / "pki") as (address, tls):
        for label, key in (("mode0", None), ("verifiable", _pinned(world))):
            session = _session(world, world.authorize(rules=RULES, evaluation_key=key))
            with kit.secure_channel(address, tls) as channel:
                outcome = run_remote_session(session, channel, rpc_timeout=60)
            assert outcome.receipt.requester_signature and outcome.receipt.custodian_signature
            outcomes[label] = (
                session,
                sorted((m.query_record_id, m.rule_id) for m in outcome.matches),
                sorted((r.query_record_id, r.rule_id, r.fields) for r in outcome.results))
    mode0, verifiable = outcomes["mode0"], outcomes["verifiable"]
    assert verifiable[1] == mode0[1] and len(mode0[1]) == 80  # 40 queries x 2 rules
    assert verifiable[2] == mode0[2]
    assert verifiable[0].evaluation_proofs_verified == _engine(verifiable[0]).chunk_count > 1
    assert mode0[0].evaluation_proofs_verified == 0
    # the tags differ (another PRF), so the custodian's two indexes are not linkable
    assert bytes(_engine(verifiable[0])._tags) != bytes(_engine(mode0[0])._tags)


def test_verifiable_tags_are_poprf_outputs_under_the_authorization_info(world: World) -> None:
    """The custodian's streamed tags use the same tweaked key the proofs pin."""
    signed = world.authorize(rules=RULES, evaluation_key=_pinned(world))
    session = _session(world, signed)
    run_in_process(session, world.custodian().session(), requester_id="agency-a")
    sk, _ = evaluation_key_pair(world.master_secret)
    engine = _engine(session)
    info = evaluation_info(signed.authorization.authorization_id)
    first = engine.element_input[0]
    assert bytes(engine._outputs[:64]) == oprf.poprf_evaluate(sk, first, info)


# --------------------------------------------------------------------------- named subjects


def _named_pinned(world: World, pinned: bytes | None) -> tuple[Any, ...]:
    """A certified custodian and a named-subject authorization (optionally pinned)."""
    token_key = named.new_token_key()
    _, cert = certify_world(world, token_key)
    approved = [as_query(world.records[i]) for i in range(5, 25)]
    signed, tokens = named_authorization(world, approved, cert, token_key)
    if pinned is not None:  # same authorization id (the tokens are bound to it), re-signed
        signed = P.sign_authorization(
            dataclasses.replace(signed.authorization, evaluation_key=pinned), world.authority)
    kid = P.authority_key_id(world.authority.public_key())
    return world.custodian(certifications={kid: cert}), signed, approved, tokens


def test_named_subject_mode_is_verifiable_too(world: World) -> None:
    """Tokens are evaluated under t^-1 with a proof; the certified index uses t^-1·d_A."""
    found = {}
    for label, pinned in (("mode0", None), ("verifiable", _pinned(world))):
        custodian, signed, approved, tokens = _named_pinned(world, pinned)
        session = RequesterSession(signed, approved, tokens=tokens, chunk_size=CHUNK,
                                   signing_key=world.requester_key)
        out = run_in_process(session, custodian.session(), requester_id="agency-a")
        found[label] = {(r.query_record_id, r.rule_id) for r in out.results}
        assert session.evaluation_proofs_verified == (0 if pinned is None else 3)
    assert found["verifiable"] == found["mode0"] and len(found["mode0"]) == 40


def test_named_subject_forged_proof_is_caught(world: World,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(OprfCustodianSession, "evaluate", _other_key)
    custodian, signed, approved, tokens = _named_pinned(world, _pinned(world))
    session = RequesterSession(signed, approved, tokens=tokens, chunk_size=CHUNK,
                               signing_key=world.requester_key)
    with pytest.raises(EvaluationProofInvalid) as caught:
        run_in_process(session, custodian.session(), requester_id="agency-a")
    _assert_caught(session, caught.value)


# --------------------------------------------------------------------------- policy and pinning


def test_custodian_policy_refusing_or_requiring_verifiable_evaluation(
        tmp_path: Path) -> None:
    refusing = make_world(tmp_path / "a", n_records=10, verifiable_evaluation="refused")
    (tmp_path / "a").mkdir(exist_ok=True)
    session = _session(refusing, refusing.authorize(rules=RULES,
                                                     evaluation_key=_pinned(refusing)))
    with custodian_over_mtls(refusing.custodian(), tmp_path / "pki-a") as (address, tls):
        with kit.secure_channel(address, tls) as channel:
            with pytest.raises(grpc.RpcError) as err:
                run_remote_session(session, channel, rpc_timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "verifiable_evaluation_not_permitted" in (err.value.details() or "")

    requiring = make_world(tmp_path / "b", n_records=10, verifiable_evaluation="required")
    custodian = requiring.custodian().session()
    session = _session(requiring, requiring.authorize(rules=RULES))
    with pytest.raises(P.PolicyRefusal) as refused:
        run_in_process(session, custodian, requester_id="agency-a")
    assert refused.value.reasons == ("verifiable_evaluation_not_permitted",)


def test_pinned_key_of_another_custodian_is_refused_at_open(world: World) -> None:
    stranger = oprf.derive_key_pair_mode(bytes(range(1, 33)), b"gated-psi/evaluation-key/v1",
                                         oprf.MODE_POPRF)[1]
    session = _session(world, world.authorize(rules=RULES, evaluation_key=stranger))
    with pytest.raises(P.PolicyRefusal) as refused:
        run_in_process(session, world.custodian().session(), requester_id="agency-a")
    assert refused.value.reasons == ("evaluation_key_mismatch",)


def test_pinned_key_is_signed_and_old_authorizations_keep_their_bytes(world: World) -> None:
    plain = world.authorize(rules=RULES)
    assert plain.authorization.evaluation_key is None
    assert "evaluation_key" not in plain.authorization.to_json()
    pinned = world.authorize(rules=RULES, evaluation_key=_pinned(world))
    again = P.SignedAuthorization.from_bytes(pinned.to_bytes())
    assert again.authorization.evaluation_key == _pinned(world)
    assert P.verify_authorization_signature(again, world.authority.public_key())
    stripped = P.SignedAuthorization(
        P.Authorization(**{**{f: getattr(again.authorization, f)
                              for f in again.authorization.__dataclass_fields__},
                           "evaluation_key": None}), again.signature)
    assert not P.verify_authorization_signature(stripped, world.authority.public_key())


@pytest.mark.parametrize(("changes", "message"), [
    ({"evaluation_key": bytes(32)}, "identity element"),
    ({"evaluation_key": b"\xff" * 32}, "not a canonical"),
    ({"evaluation_key": b"short"}, "wrong length"),
])
def test_malformed_or_misplaced_pins_are_refused(world: World, changes: dict[str, Any],
                                                 message: str) -> None:
    kw = {"evaluation_key": _pinned(world), **changes}
    with pytest.raises(ValueError, match=message):
        world.authorize(rules=RULES, **kw)


def test_pinned_key_with_an_engine_that_cannot_prove_is_refused(world: World) -> None:
    signed = world.authorize(rules=RULES, evaluation_key=_pinned(world),
                             engines=("oprf", "kkrt"))
    policy = P.CustodianPolicy(custodian_id="agency-b",
                               trusted_authorities=world.policy.trusted_authorities,
                               allowed_engines=frozenset({"oprf", "kkrt"}))
    request = P.SessionRequest(peer_id="agency-a", tier=P.Tier.IDENTITY, match_rules=RULES,
                               disclosure_fields=("zip",), query_count=10, engine="kkrt")
    decision = P.decide(signed, request, policy, now=signed.authorization.not_before + 60,
                        budget_remaining=10_000, evaluation_key=_pinned(world))
    assert decision.reasons == (P.Reason.ENGINE_NOT_PERMITTED,)
    assert "does not evaluate verifiably" in decision.message
    oprf_request = P.SessionRequest(peer_id="agency-a", tier=P.Tier.IDENTITY,
                                    match_rules=RULES, disclosure_fields=("zip",),
                                    query_count=10)
    assert P.decide(signed, oprf_request, policy, now=signed.authorization.not_before + 60,
                    budget_remaining=10_000, evaluation_key=_pinned(world)).allowed


def test_verifiable_chunks_are_capped_at_one_proof_s_elements(world: World) -> None:
    signed = world.authorize(rules=RULES, evaluation_key=_pinned(world))
    session = RequesterSession(signed, _queries(world), match_rules=RULES, chunk_size=65_536)
    assert _engine(session).chunk_size == oprf.MAX_PROOF_ELEMENTS
    custodian = world.custodian().session()
    custodian.handle(session.open_request(), peer_id="agency-a")
    oversized = EvaluateChunk(seq=0, elements=oprf.hash_to_group(b"x") * 65_536)
    with pytest.raises(Exception, match="one proof covers at most 65535"):
        custodian.handle(oversized, peer_id="agency-a")


def test_mode_0_session_refuses_an_unexpected_proof(world: World,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def with_proof(session: OprfCustodianSession, message: EvaluateChunk) -> EvaluatedChunk:
        honest = HONEST_EVALUATE(session, message)
        return EvaluatedChunk(seq=honest.seq, elements=honest.elements, proof=bytes(64))
    monkeypatch.setattr(OprfCustodianSession, "evaluate", with_proof)
    session = _session(world, world.authorize(rules=RULES))
    with pytest.raises(Exception, match="carries a proof, but the authorization pins no"):
        run_in_process(session, world.custodian().session(), requester_id="agency-a")


# --------------------------------------------------------------------------- operators' tools


def test_cli_publishes_the_key_and_the_authority_pins_it(tmp_path: Path, world: World,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    secrets = tmp_path / "secrets"
    assert cli_b.main(["init", "--out", str(secrets)]) == 0
    key_file = tmp_path / "evaluation.pub.json"
    assert cli_b.main(["evaluation-key", "--secrets", str(secrets), "--out",
                       str(key_file)]) == 0
    master = bytes.fromhex((secrets / "master.secret").read_text().strip())
    assert load_evaluation_key(key_file) == ("agency-b", evaluation_key_pair(master)[1])
    assert cli_authority.main(["keygen", "--out", str(tmp_path / "authority")]) == 0
    common = ["issue", "--key", str(tmp_path / "authority" / "authority.key"),
              "--requester", "agency-a", "--statute", "26 U.S.C. 6103(i)(2)",
              "--purpose", "locate subjects", "--rules", "tin+dob", "--fields", "zip",
              "--max-evaluations", "100", "--max-disclosures", "10",
              "--custodian-evaluation-key", str(key_file)]
    out = tmp_path / "auth.json"
    assert cli_authority.main([*common, "--custodian", "agency-b", "--out", str(out)]) == 0
    signed = P.SignedAuthorization.from_bytes(out.read_bytes())
    assert signed.authorization.evaluation_key == evaluation_key_pair(master)[1]
    capsys.readouterr()
    # the file names its custodian: pinning it for another custodian is refused
    assert cli_authority.main([*common, "--custodian", "agency-c",
                               "--out", str(tmp_path / "x.json")]) != 0
    assert "custodian 'agency-b''s key" in capsys.readouterr().err
    doc = json.loads(key_file.read_text())
    doc["public_key"] = "00" * 32
    key_file.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="identity element"):
        load_evaluation_key(key_file)


def test_requester_service_records_a_failed_proof(lab: Lab,  # noqa: F811
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The job fails with the reason, in its summary and in the requester's audit chain."""
    monkeypatch.setattr(OprfCustodianSession, "evaluate", _forged_proof)
    world = lab.world
    signed = world.authorize(rules=("tin+dob",), evaluation_key=_pinned(world))
    service = lab.requester()
    with lab.custodian() as address, lab.operator(service) as stub:
        # 24 matching + 4 missing queries = 28 elements; the service's chunk is large, so
        # shrink it to get an honest chunk before the forged one
        service.chunk_size = CHUNK
        job = submit(stub, signed, lab.queries_csv(24), address)
        phase, summary, message = watch(stub, job)
    assert phase == "failed"
    assert "evaluation_proof_invalid" in message
    assert summary["verifiable_evaluation"] is True
    assert summary["evaluation_proofs_verified"] == BAD_CHUNK
    assert summary["evaluation_proof_invalid"].startswith("evaluation_proof_invalid: ")
    assert service.audit is not None
    entries = [e for e in service.audit.audit_entries() if e.kind == EVALUATION_PROOF_INVALID]
    assert len(entries) == 1
    assert entries[0].payload["authorization_id"] == signed.authorization.authorization_id
    assert entries[0].payload["evaluation_key"] == _pinned(world).hex()
    assert service.store.job_states(job)[-1][1] == "failed"


def test_match_summary_lines_say_whether_evaluation_was_proven() -> None:
    assert verifiable_summary_lines({"verifiable_evaluation": False}) == []
    assert verifiable_summary_lines({"verifiable_evaluation": True,
                                     "evaluation_proofs_verified": 1234}) == [
        "verifiable evaluation: 1,234 chunk proofs verified against the authorization's "
        "pinned evaluation key"]
    (line,) = verifiable_summary_lines({"verifiable_evaluation": True,
                                        "evaluation_proofs_verified": 2,
                                        "evaluation_proof_invalid": "evaluation_proof_invalid: x"})
    assert line.startswith("evaluation proof INVALID after 2 verified chunks: "
                           "evaluation_proof_invalid: x")
