"""Nothing is lost on a late failure (docs/architecture.md, Late failures).

A custodian checks at start-up and at open what would otherwise fail only at the receipt; a
requester stores every disclosed batch as it arrives, so a session that breaks after opening
leaves its job ``done_receipt_pending`` with the results readable, and the receipt is retried
(the custodian answers a repeated close with the same signed receipt, after a restart too).
Everything here runs over real gRPC with real mutual TLS and real SQLite files; the start-up
refusal and the kill tests run real processes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agency_a import cli as cli_a
from agency_a.cli import LEDGER_FILE, late_summary_lines
from agency_a.client import run_remote_session
from agency_a.service import RECEIPT_PENDING, RequesterService
from agency_a.service import serve as serve_requester
from agency_a.store import KEY_LEN, ResultStore
from agency_b.service import serve as serve_custodian
from proto import codec
from proto import service_kit as kit
from protocol.accounting.export import custodian_export, requester_export
from protocol.accounting.oversight import add_signed_checkpoint, check
from protocol.accounting.port import AuditLog
from protocol.adapters.keys import load_signing_key
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli.dev_pki import write_dev_pki
from protocol.domain.messages import CloseRequest, Receipt
from protocol.domain.records import write_query_csv
from protocol.policy.decide import SignedAuthorization
from protocol.sessions.identity import Custodian, CustodianConfig, RequesterSession
from tests.factories import World, as_query, make_person, make_world
from tests.helpers.requester_launcher import KILL_ENV
from tests.test_oversight import write_pub

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc
REPO = Path(__file__).resolve().parents[1]
OPERATOR = "analyst-7"
PURPOSE = "case 24-117"
RPC_TIMEOUT = 60


class Refusals(logging.Handler):
    """Collects the custodian service's refusal log events (their status codes)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Lab:
    """One world, one PKI for both agencies (each a server and a client), both ledgers."""

    tmp: Path
    world: World
    pki: Path
    refusals: Refusals

    @contextmanager
    def custodian(self, requester_keys: dict[str, Ed25519PublicKey] | None = None,
                  port: int = 0) -> Iterator[str]:
        """A custodian server over the world's ledger; ``port`` reuses an earlier address."""
        keys = ({"agency-a": self.world.requester_key.public_key()}
                if requester_keys is None else requester_keys)
        custodian = Custodian(CustodianConfig(
            policy=self.world.policy, records=self.world.records, ledger=self.world.ledger,
            master_secret=self.world.master_secret, signing_key=self.world.custodian_key,
            requester_keys=keys))
        server, bound = serve_custodian(
            custodian, kit.TLSFiles.from_dir(self.pki, "agency-b", "server"),
            f"127.0.0.1:{port}")
        try:
            yield f"127.0.0.1:{bound}"
        finally:
            server.stop(0)

    def requester(self) -> RequesterService:
        """A requester service over this lab's store and ledger (a new one = a restart)."""
        audit = Ledger(self.tmp / "requester-ledger.sqlite")
        key_file = self.tmp / "results.key"
        if not key_file.exists():
            key_file.write_bytes(os.urandom(KEY_LEN))
        store = ResultStore(self.tmp / "results.sqlite", key_file.read_bytes(), audit)
        return RequesterService(
            "agency-a", kit.TLSFiles.from_dir(self.pki, "agency-a", "client"),
            signing_key=self.world.requester_key, operators=[OPERATOR], store=store,
            custodian_keys={"agency-b": self.world.custodian_key.public_key()}, audit=audit)

    @contextmanager
    def operator(self, service: RequesterService) -> Iterator[Any]:
        """An operator's stub on a running requester server."""
        server, port = serve_requester(
            service, kit.TLSFiles.from_dir(self.pki, "agency-a", "server"))
        tls = kit.TLSFiles.from_dir(self.pki, "agency-a", "client")
        try:
            with kit.secure_channel(f"127.0.0.1:{port}", tls) as channel:
                yield pb2_grpc.RequesterStub(channel)
        finally:
            server.stop(0)

    def queries_csv(self, matching: int, missing: int = 4) -> bytes:
        queries = [as_query(r) for r in self.world.records[:matching]]
        queries += [as_query(make_person(i, prefix="z")) for i in range(1000, 1000 + missing)]
        out = io.StringIO()
        write_query_csv(queries, out)
        return out.getvalue().encode()


@pytest.fixture()
def lab(tmp_path: Path) -> Iterator[Lab]:
    world = make_world(tmp_path, n_records=24)
    pki = tmp_path / "pki"
    write_dev_pki(pki, ["agency-a", "agency-b"], server_agencies=["agency-a", "agency-b"])
    refusals = Refusals()
    logging.getLogger("agency_b").addHandler(refusals)
    try:
        yield Lab(tmp_path, world, pki, refusals)
    finally:
        logging.getLogger("agency_b").removeHandler(refusals)
    assert not [m for m in refusals.messages if "INTERNAL" in m or "UNKNOWN" in m], \
        refusals.messages


def submit(stub: Any, signed: SignedAuthorization, csv: bytes, custodian: str) -> str:
    header = pb2.JobHeader(signed_authorization=signed.to_bytes(), custodian_address=custodian,
                           operator=OPERATOR)
    status = stub.SubmitMatch(iter([pb2.SubmitChunk(header=header), pb2.SubmitChunk(csv=csv)]),
                              timeout=RPC_TIMEOUT)
    return str(status.job_id)


def watch(stub: Any, job_id: str) -> tuple[str, dict[str, Any], str]:
    """Follow a job to its end: (last phase, last summary, last message)."""
    phase, summary, message = "", {}, ""
    for ev in stub.WatchJob(pb2.JobRef(job_id=job_id, operator=OPERATOR), timeout=RPC_TIMEOUT):
        phase, message = ev.phase, ev.message
        if ev.summary_json:
            summary = json.loads(ev.summary_json)
    return phase, summary, message


def results(stub: Any, job_id: str) -> set[tuple[str, str]]:
    rows = list(stub.GetResults(pb2.JobRef(job_id=job_id, operator=OPERATOR, purpose=PURPOSE),
                                timeout=RPC_TIMEOUT))
    return {(r.query_record_id, r.pseudonym) for r in rows}


def disclosed_by_custodian(lab: Lab, auth_id: str) -> int:
    return len({row.record_id for row in lab.world.ledger.disclosures(auth_id)})


def oversight_agrees(lab: Lab, requester_ledger: AuditLog | None, auth_id: str) -> None:
    """Both signed chains, both exports, the inspector's check: every finding passes."""
    assert requester_ledger is not None
    add_signed_checkpoint(requester_ledger, lab.world.requester_key)
    add_signed_checkpoint(lab.world.ledger, lab.world.custodian_key)
    report = check(custodian_export(lab.world.ledger, auth_id),
                   requester_export(requester_ledger, auth_id),
                   custodian_key=lab.world.custodian_key.public_key(),
                   requester_key=lab.world.requester_key.public_key())
    assert report.agree, [f for f in report.failures]


# --------------------------------------------------------------------------- checked early


def test_open_without_a_receipt_key_is_refused_before_any_budget(lab: Lab) -> None:
    signed = lab.world.authorize()
    session = RequesterSession(signed, [as_query(r) for r in lab.world.records[:3]],
                               signing_key=lab.world.requester_key)
    with lab.custodian(requester_keys={}) as address:
        tls = kit.TLSFiles.from_dir(lab.pki, "agency-a", "client")
        with kit.secure_channel(address, tls) as channel, pytest.raises(grpc.RpcError) as err:
            run_remote_session(session, channel, rpc_timeout=RPC_TIMEOUT)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert (err.value.details() or "").startswith("no_receipt_key: no receipt key registered "
                                                  "for requester 'agency-a'")
    ledger = lab.world.ledger
    assert ledger.reservation(session.session_id) is None
    assert not ledger.sessions(signed.authorization.authorization_id)
    refusals = [e.payload for e in ledger.audit_entries() if e.kind == "refusal"]
    assert refusals and refusals[-1]["reasons"] == ["no_receipt_key"]


def test_custodian_refuses_to_start_without_requester_keys(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agency_b.cli", "serve", "--records", str(tmp_path / "r.csv"),
         "--policy", str(tmp_path / "p.json"), "--ledger", str(tmp_path / "l.sqlite"),
         "--secrets", str(tmp_path / "s"), "--certs", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "no --requester-key given" in proc.stderr
    assert not (tmp_path / "l.sqlite").exists()  # refused before anything was opened


# --------------------------------------------------------------------------- the receipt


def test_countersign_failure_keeps_results_and_the_receipt_is_retried(lab: Lab) -> None:
    """Issue 14: the custodian holds a wrong key for the requester; then it is fixed."""
    signed = lab.world.authorize(max_disclosures=100)
    auth_id = signed.authorization.authorization_id
    wrong = {"agency-a": Ed25519PrivateKey.generate().public_key()}
    first = lab.requester()
    with lab.custodian(requester_keys=wrong) as address, lab.operator(first) as stub:
        job_id = submit(stub, signed, lab.queries_csv(matching=10), address)
        phase, summary, message = watch(stub, job_id)
        assert phase == "done" and summary["receipt_pending"] is True, message
        assert "countersignature does not verify" in summary["receipt_error"]
        assert first.jobs[job_id].state == RECEIPT_PENDING
        received = results(stub, job_id)  # readable while the receipt is pending
    assert len(received) == 10 == disclosed_by_custodian(lab, auth_id)
    port = int(address.rsplit(":", 1)[1])

    # the custodian's operator adds the right key (a restart); so does the requester's
    second = lab.requester()
    with lab.custodian(port=port), lab.operator(second) as stub:
        assert second.retry_pending() == 1
        assert results(stub, job_id) == received
        phase, summary, _ = watch(stub, job_id)
    assert phase == "done" and summary["receipt_pending"] is False
    receipt = Receipt.from_json(summary["receipt"])
    assert receipt.disclosed == 10 and receipt.requester_signature
    (row,) = lab.world.ledger.receipts(auth_id)
    assert row.requester_signature == receipt.requester_signature
    oversight_agrees(lab, second.audit, auth_id)


def test_a_closed_session_answers_close_again_and_refuses_resume(lab: Lab) -> None:
    signed = lab.world.authorize()
    session = RequesterSession(signed, [as_query(r) for r in lab.world.records[:4]],
                               signing_key=lab.world.requester_key)
    tls = kit.TLSFiles.from_dir(lab.pki, "agency-a", "client")
    with lab.custodian() as address:
        with kit.secure_channel(address, tls) as channel:
            outcome = run_remote_session(session, channel, rpc_timeout=RPC_TIMEOUT)
    close = codec.to_pb(CloseRequest(outcome.receipt.transcript_hash),
                        session_id=session.session_id)
    with lab.custodian(port=int(address.rsplit(":", 1)[1])) as address, \
            kit.secure_channel(address, tls) as channel:
        stub = pb2_grpc.CustodianStub(channel)
        again = codec.from_pb(Receipt, stub.CloseSession(close, timeout=RPC_TIMEOUT))
        assert again.signed_bytes() == outcome.receipt.signed_bytes()
        assert again.custodian_signature == outcome.receipt.custodian_signature
        stub.Countersign(codec.to_pb(outcome.receipt), timeout=RPC_TIMEOUT)  # idempotent
        reopen = RequesterSession(signed, [as_query(r) for r in lab.world.records[:4]],
                                  session_id=session.session_id)
        with pytest.raises(grpc.RpcError) as err:
            stub.OpenSession(codec.to_pb(reopen.open_request()), timeout=RPC_TIMEOUT)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert (err.value.details() or "").startswith("session_closed: ")
        other = codec.to_pb(CloseRequest(bytes(32)), session_id=session.session_id)
        with pytest.raises(grpc.RpcError) as err:
            stub.CloseSession(other, timeout=RPC_TIMEOUT)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION


# --------------------------------------------------------------------------- the cap


def test_summary_says_when_the_cap_withheld_disclosures(lab: Lab) -> None:
    signed = lab.world.authorize(max_disclosures=3)
    service = lab.requester()
    with lab.custodian() as address, lab.operator(service) as stub:
        job_id = submit(stub, signed, lab.queries_csv(matching=8), address)
        phase, summary, message = watch(stub, job_id)
        assert phase == "done", message
        assert len(results(stub, job_id)) == 3
    assert summary["disclosure_cap_reached"] is True
    assert summary["disclosures_withheld_by_cap"] == 5 and summary["disclosure_cap"] == 3
    assert ("disclosure cap reached: 5 disclosures withheld (the authorization allows 3 "
            "records)") in late_summary_lines(summary)
    oversight_agrees(lab, service.audit, signed.authorization.authorization_id)


# --------------------------------------------------------------------------- killed


#: Where the requester process dies (tests/helpers/requester_launcher.py): after open,
#: mid-evaluation, mid-disclosure (accounted by the custodian, not yet stored), before close,
#: before the countersignature.
KILL_STEPS = ("opened", "evaluate", "disclosed", "closing", "receipt")


@dataclass
class AgencyA:
    """``agency-a`` files for real ``serve`` processes: secrets, data, the custodian's key."""

    lab: Lab
    secrets: Path
    data: Path
    custodian_pub: Path
    starts: int = 0

    @contextmanager
    def serving(self, kill_at: str | None = None, *,
                launcher: str = "tests.helpers.requester_launcher",
                launcher_env: dict[str, str] | None = None,
                ) -> Iterator[tuple[subprocess.Popen[bytes], Any]]:
        """A real ``agency-a serve`` process and an operator's stub on it, started through
        ``launcher`` (a module that can kill it at a chosen point, told by ``kill_at`` or by
        ``launcher_env``)."""
        self.starts += 1
        port_file = self.lab.tmp / f"agency-a-port-{self.starts}"
        env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
        if kill_at:
            env[KILL_ENV] = kill_at
        env.update(launcher_env or {})
        argv = [sys.executable, "-m", launcher, "serve",
                "--secrets", str(self.secrets), "--certs", str(self.lab.pki),
                "--data", str(self.data), "--listen", "127.0.0.1:0",
                "--port-file", str(port_file), "--workers", "1", "--grace", "0",
                "--custodian-key", f"agency-b={self.custodian_pub}",
                "--receipt-retry-interval", "0.3", "--checkpoint-interval", "0",
                "--log-level", "warning"]
        log = (self.lab.tmp / f"agency-a-{self.starts}.log").open("wb")
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists():
                assert proc.poll() is None, (self.lab.tmp / f"agency-a-{self.starts}.log"
                                             ).read_text()
                assert time.monotonic() < deadline, "agency-a serve did not start"
                time.sleep(0.05)
            port = int(port_file.read_text())
            tls = kit.TLSFiles.from_dir(self.lab.pki, "agency-a", "client")
            with kit.secure_channel(f"127.0.0.1:{port}", tls) as channel:
                yield proc, pb2_grpc.RequesterStub(channel)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
            log.close()


@pytest.fixture()
def agency_a(lab: Lab) -> AgencyA:
    secrets = lab.tmp / "agency-a-secrets"
    assert cli_a.main(["init", "--out", str(secrets), "--operator", OPERATOR]) == 0
    lab.world.requester_key = load_signing_key(secrets / "signing.key")  # the process's key
    return AgencyA(lab, secrets, lab.tmp / "agency-a-data",
                   write_pub(lab.tmp / "agency-b.pub.json", lab.world.custodian_key))


def wait_for_receipt(stub: Any, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """Watch the job (restored from the store) until its receipt is countersigned."""
    deadline = time.monotonic() + timeout
    while True:
        phase, summary, message = watch(stub, job_id)
        assert phase == "done", message
        assert "INTERNAL" not in summary.get("receipt_error", ""), summary
        if not summary.get("receipt_pending", True):
            return summary
        assert time.monotonic() < deadline, summary
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("step", KILL_STEPS)
def test_requester_killed_at_each_step_loses_no_disclosure(lab: Lab, agency_a: AgencyA,
                                                           step: str) -> None:
    signed = lab.world.authorize(max_disclosures=100)
    auth_id = signed.authorization.authorization_id
    with lab.custodian() as address:
        with agency_a.serving(kill_at=step) as (proc, stub):
            job_id = submit(stub, signed, lab.queries_csv(matching=6), address)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        # restarted: the service finishes the job from the store on its own
        with agency_a.serving() as (proc, stub):
            summary = wait_for_receipt(stub, job_id)
            received = results(stub, job_id)
            proc.send_signal(signal.SIGTERM)  # graceful: a final signed checkpoint
            assert proc.wait(timeout=30) == 0
    disclosed = {row.record_id for row in lab.world.ledger.disclosures(auth_id)}
    # every record the custodian's ledger says it disclosed is readable by the requester
    assert {query.removeprefix("q-") for query, _ in received} == disclosed
    before_match = step in ("opened", "evaluate")
    assert len(disclosed) == (0 if before_match else 6)
    assert summary["match_completed"] is not before_match
    assert any(line.startswith("match interrupted") for line in late_summary_lines(summary)
               ) is before_match
    receipt = Receipt.from_json(summary["receipt"])
    assert receipt.disclosed == len(disclosed) and receipt.requester_signature
    (row,) = lab.world.ledger.receipts(auth_id)
    assert row.requester_signature == receipt.requester_signature
    with Ledger(agency_a.data / LEDGER_FILE) as requester_ledger:
        oversight_agrees(lab, requester_ledger, auth_id)


@pytest.mark.slow
def test_a_reply_lost_after_the_cap_is_fetched_again(lab: Lab, agency_a: AgencyA) -> None:
    """The batch that reaches the disclosure cap is accounted, then its reply is lost: the
    resumed session asks again and the custodian answers the records it already disclosed
    (repeats are served past the cap), so the requester holds every one of them."""
    signed = lab.world.authorize(max_disclosures=4)
    auth_id = signed.authorization.authorization_id
    with lab.custodian() as address:
        with agency_a.serving(kill_at="disclosed") as (proc, stub):
            job_id = submit(stub, signed, lab.queries_csv(matching=6), address)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        with agency_a.serving() as (proc, stub):
            summary = wait_for_receipt(stub, job_id)
            received = results(stub, job_id)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    disclosed = {row.record_id for row in lab.world.ledger.disclosures(auth_id)}
    assert len(disclosed) == 4  # the cap: two matches withheld, never accounted
    assert {query.removeprefix("q-") for query, _ in received} == disclosed
    assert summary["disclosures_withheld_by_cap"] == 2
    receipt = Receipt.from_json(summary["receipt"])
    assert receipt.requester_signature
    with Ledger(agency_a.data / LEDGER_FILE) as requester_ledger:
        oversight_agrees(lab, requester_ledger, auth_id)
