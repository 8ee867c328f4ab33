"""Accountability: audit verify CLIs, signed checkpoints, exports and the oversight check.

Ledgers here are real SQLite files filled by real in-process sessions; tampering is done with
raw sqlite3 edits (tests/helpers/tamper.py), as someone with disk access would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agency_a import cli as cli_a
from agency_b import cli as cli_b
from protocol.accounting.chain import verify_chain
from protocol.accounting.export import (
    EXPORT_FORMAT,
    custodian_export,
    parse_receipt_bytes,
    record_receipt,
    requester_export,
)
from protocol.accounting.oversight import (
    add_signed_checkpoint,
    check,
    signing_key_id,
    verify_ledger,
)
from protocol.adapters.checkpointer import Checkpointer
from protocol.adapters.keys import load_public_key_json
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli import authority as authority_cli
from protocol.crypto.oprf import blind_batch
from protocol.domain.messages import EvaluateChunk, Receipt
from protocol.errors import LedgerError, ProtocolError
from protocol.sessions.identity import RequesterSession, run_in_process
from tests.factories import World, as_query, make_person, make_world
from tests.helpers import tamper

# --------------------------------------------------------------------------------------------
# Fixtures: two agencies that ran real sessions
# --------------------------------------------------------------------------------------------


class Agencies:
    """A world (authority, custodian ledger) plus the requester's own ledger."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.world: World = make_world(tmp, n_records=30)
        self.requester_ledger = Ledger(tmp / "requester-ledger.sqlite")
        self.custodian = self.world.custodian()
        self.signed = self.world.authorize(rules=("tin+dob",), max_evaluations=500,
                                           max_disclosures=100)
        self.auth_id = self.signed.authorization.authorization_id

    @property
    def custodian_key(self) -> Ed25519PrivateKey:
        return self.world.custodian_key

    @property
    def requester_key(self) -> Ed25519PrivateKey:
        return self.world.requester_key

    def run(self, lo: int, hi: int, *, record: bool = True) -> Receipt:
        queries = [as_query(self.world.records[i]) for i in range(lo, hi)]
        queries += [as_query(make_person(2000 + lo + i, prefix="z")) for i in range(3)]
        session = RequesterSession(
            self.signed, queries, signing_key=self.requester_key,
            custodian_key=self.custodian_key.public_key(), chunk_size=4,
        )
        outcome = run_in_process(session, self.custodian.session(), requester_id="agency-a")
        if record:
            record_receipt(self.requester_ledger, outcome.receipt)
        return outcome.receipt

    def exports(self) -> tuple[dict, dict]:
        add_signed_checkpoint(self.world.ledger, self.custodian_key)
        add_signed_checkpoint(self.requester_ledger, self.requester_key)
        return (custodian_export(self.world.ledger, self.auth_id),
                requester_export(self.requester_ledger, self.auth_id))

    def check(self, c: dict, r: dict):
        return check(c, r, custodian_key=self.custodian_key.public_key(),
                     requester_key=self.requester_key.public_key())


@pytest.fixture()
def agencies(tmp_path: Path):
    a = Agencies(tmp_path)
    a.run(0, 6)
    a.run(4, 12)  # overlaps: repeats are disclosed again but counted once
    yield a
    a.requester_ledger.close()
    a.world.ledger.close()


def failing(report) -> set[str]:
    return {f.check for f in report.failures}


def write_pub(path: Path, key: Ed25519PrivateKey) -> Path:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    path.write_text(json.dumps({"public_key": raw.hex()}))
    return path


# --------------------------------------------------------------------------------------------
# The oversight check
# --------------------------------------------------------------------------------------------


def test_agreeing_exports_pass_every_check(agencies: Agencies) -> None:
    c, r = agencies.exports()
    assert c["format"] == r["format"] == EXPORT_FORMAT
    assert c["counts"]["receipts"] == r["counts"]["receipts"] == 2
    assert c["counts"]["disclosed"] == 12 == r["counts"]["disclosed"]
    assert c["counts"]["evaluated"] == r["counts"]["evaluated"] == 6 + 3 + 8 + 3
    for rec in c["receipts"]:
        assert rec["custodian_signature"] and rec["requester_signature"]
        assert rec["transcript_hash"] == next(
            x["transcript_hash"] for x in r["receipts"] if x["session_id"] == rec["session_id"])
    report = agencies.check(c, r)
    assert report.agree, report.lines()
    names = {f.check for f in report.findings}
    assert {"counts.evaluated", "counts.disclosed", "receipt.transcript_hash",
            "receipt.custodian_signature", "receipt.requester_signature", "chain.custodian",
            "chain.requester", "checkpoints.custodian", "checkpoints.requester",
            "receipt.ledger", "limits"} <= names
    # both signatures are checked on both copies of both receipts
    assert len(report.by_check("receipt.requester_signature")) == 4
    assert report.lines()[-1].startswith("AGREE")
    assert json.loads(json.dumps(report.to_json()))["agree"] is True


def test_disclosure_batches_are_rehashed_from_their_rows(agencies: Agencies) -> None:
    """The inspector re-hashes each disclosure entry and recomputes its rows' digest, so a
    row dropped, added or edited in the custodian's export (or tables) does not agree."""
    c, r = agencies.exports()
    batches = c["disclosure_batches"]
    assert sum(b["payload"]["recorded"] for b in batches) == 12
    assert sum(b["payload"]["repeated"] for b in batches) == 2  # records 4 and 5, run 2
    (ok,) = agencies.check(c, r).by_check("disclosures.batches")
    assert ok.ok, ok.detail

    def broken(edit: Callable[[dict], None]) -> str:
        doc = copy.deepcopy(c)
        edit(doc)
        (finding,) = agencies.check(doc, r).by_check("disclosures.batches")
        assert not finding.ok
        return finding.detail

    assert "rows are stored" in broken(lambda d: d["disclosure_batches"][0]["rows"].pop())
    assert "digest" in broken(lambda d: d["disclosure_batches"][0]["rows"][0].__setitem__(
        2, "someone-else"))
    assert "hash" in broken(lambda d: d["disclosure_batches"][0]["payload"].__setitem__(
        "recorded", 1))
    assert "not the same" in broken(lambda d: d["disclosures"].pop())
    assert "malformed" in broken(lambda d: d["disclosure_batches"][0].pop("rows"))
    # ...and a row edited in the custodian's tables shows in its next export
    path = Path(agencies.world.ledger.path)
    agencies.world.ledger.close()
    with tamper.raw(path) as conn:
        conn.execute("DROP TRIGGER disclosures_no_update")
        conn.execute("UPDATE disclosures SET rule_id = 'tin+zip' WHERE id = 1")
    with Ledger(path) as reopened:
        (finding,) = agencies.check(custodian_export(reopened, agencies.auth_id),
                                    r).by_check("disclosures.batches")
    assert not finding.ok and "digest" in finding.detail
    agencies.world = replace(agencies.world, ledger=Ledger(path))  # for the fixture's close


def test_counts_differ_when_custodian_evaluated_without_a_receipt(agencies: Agencies) -> None:
    # A session that consumed budget and then vanished: no receipt on either side.
    session = agencies.custodian.session()
    requester = RequesterSession(agencies.signed, [as_query(agencies.world.records[20])],
                                 signing_key=agencies.requester_key)
    session.handle(requester.open_request(), peer_id="agency-a")
    session.handle(EvaluateChunk(seq=0, elements=blind_batch([b"x"])[1]))
    c, r = agencies.exports()
    report = agencies.check(c, r)
    assert not report.agree
    assert failing(report) == {"counts.evaluated", "session.unreceipted"}
    (finding,) = report.by_check("session.unreceipted")
    assert finding.session_id == requester.session_id
    assert "evaluated 1 elements" in finding.detail


def test_counts_differ_when_requester_lacks_a_receipt(agencies: Agencies) -> None:
    missing = agencies.run(20, 25, record=False)
    c, r = agencies.exports()
    report = agencies.check(c, r)
    assert failing(report) == {"counts.evaluated", "counts.disclosed", "receipt.present"}
    assert report.by_check("receipt.present")[0].session_id == missing.session_id


def test_receipt_counts_edited_in_one_export(agencies: Agencies) -> None:
    c, r = agencies.exports()
    r2 = copy.deepcopy(r)
    r2["receipts"][0]["disclosed"] += 1
    report = agencies.check(c, r2)
    sid = r2["receipts"][0]["session_id"]
    assert {"receipt.fields", "counts.disclosed"} <= failing(report)
    # the edited copy no longer carries valid signatures either
    bad_sigs = [f for f in report.failures if f.check.endswith("_signature")]
    assert bad_sigs and all(f.session_id == sid and "requester's copy" in f.detail
                            for f in bad_sigs)


def test_transcript_hash_mismatch_is_reported(agencies: Agencies) -> None:
    c, r = agencies.exports()
    c2 = copy.deepcopy(c)
    item = c2["receipts"][1]
    item["transcript_hash"] = hashlib.sha256(b"another transcript").hexdigest()
    item.pop("signed_bytes")  # as if the exporter re-encoded the receipt
    report = agencies.check(c2, r)
    (finding,) = [f for f in report.by_check("receipt.transcript_hash") if not f.ok]
    assert finding.session_id == item["session_id"]
    assert "transcript hashes differ" in finding.detail
    # the other session's transcript hashes still agree
    assert len(report.by_check("receipt.transcript_hash")) == 2


def test_bad_signatures_are_reported(agencies: Agencies) -> None:
    c, r = agencies.exports()
    forged = Receipt.from_json(c["receipts"][0])
    wrong = Ed25519PrivateKey.generate().sign(forged.countersigned_bytes())
    c2 = copy.deepcopy(c)
    c2["receipts"][0]["requester_signature"] = wrong.hex()
    report = agencies.check(c2, r)
    bad = report.failures
    assert [(f.check, f.session_id) for f in bad] == [
        ("receipt.requester_signature", forged.session_id)]
    assert "custodian's copy" in bad[0].detail
    # checked under the wrong custodian key, every custodian signature fails
    other = Ed25519PrivateKey.generate().public_key()
    report = check(c, r, custodian_key=other,
                   requester_key=agencies.requester_key.public_key())
    assert {"receipt.custodian_signature", "checkpoints.custodian", "chain.custodian"} == (
        failing(report))


def test_missing_countersignature_is_reported(agencies: Agencies) -> None:
    c, r = agencies.exports()
    c["receipts"][0]["requester_signature"] = ""
    report = agencies.check(c, r)
    (f,) = report.failures
    assert f.check == "receipt.requester_signature" and "no requester countersignature" in f.detail


def test_chain_head_must_be_covered_by_a_valid_checkpoint(agencies: Agencies) -> None:
    c, r = agencies.exports()
    assert c["head_checkpoint"]["seq"] + len(c["tail"]) == c["audit_head"]["seq"]
    cases = {
        "no checkpoint": lambda d: d.update(head_checkpoint=None),
        "tail edited": lambda d: d["tail"][0]["payload"].update(seq=-1),
        "head moved": lambda d: d["audit_head"].update(seq=d["audit_head"]["seq"] + 1),
        "bad signature": lambda d: d["head_checkpoint"].update(signature="00" * 64),
    }
    for name, mutate in cases.items():
        r2 = copy.deepcopy(r)
        mutate(r2)
        report = agencies.check(c, r2)
        assert "chain.requester" in failing(report), name
        assert "chain.custodian" not in failing(report), name


def test_tail_grows_until_the_next_checkpoint(agencies: Agencies) -> None:
    add_signed_checkpoint(agencies.world.ledger, agencies.custodian_key)
    agencies.run(12, 14)  # more entries after the checkpoint, none signed yet
    c = custodian_export(agencies.world.ledger, agencies.auth_id)
    assert len(c["tail"]) > 5
    r = requester_export(agencies.requester_ledger, agencies.auth_id)
    report = agencies.check(c, r)
    assert report.by_check("chain.custodian")[0].ok  # the tail still hashes onto the signature


def test_custodian_receipt_bytes_round_trip(agencies: Agencies) -> None:
    (row, *_) = agencies.world.ledger.receipts(agencies.auth_id)
    receipt = parse_receipt_bytes(row.receipt, row.custodian_signature)
    assert receipt.signed_bytes() == row.receipt
    agencies.custodian_key.public_key().verify(row.custodian_signature, receipt.signed_bytes())
    for bad in (row.receipt[:-1], row.receipt + b"\x00", b"x" + row.receipt[1:]):
        with pytest.raises(ProtocolError):
            parse_receipt_bytes(bad)


@given(
    ids=st.lists(st.text(min_size=0, max_size=20), min_size=4, max_size=4),
    evaluated=st.integers(0, 2**64 - 1),
    disclosed=st.integers(0, 2**64 - 1),
    transcript=st.binary(max_size=64),
)
def test_parse_receipt_bytes_inverts_signed_bytes(ids, evaluated, disclosed, transcript) -> None:
    r = Receipt(*ids, evaluated=evaluated, disclosed=disclosed, transcript_hash=transcript)
    assert parse_receipt_bytes(r.signed_bytes()) == r


def test_requester_export_needs_some_record(agencies: Agencies) -> None:
    with pytest.raises(LedgerError):
        requester_export(agencies.requester_ledger, "auth-never-seen")
    with pytest.raises(ValueError):
        record_receipt(agencies.requester_ledger, Receipt("a", "s", "b", "a", 1, 1, b"t"))


# --------------------------------------------------------------------------------------------
# Ledger verification and checkpoints
# --------------------------------------------------------------------------------------------


def test_signing_key_id_is_hex_sha256_prefix() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert signing_key_id(key) == hashlib.sha256(raw).hexdigest()[:16]


def test_verify_ledger_with_checkpoints(agencies: Agencies) -> None:
    ledger, key = agencies.world.ledger, agencies.custodian_key
    unsigned = verify_ledger(ledger)
    assert unsigned.ok and not unsigned.checkpoints_verified
    cp = add_signed_checkpoint(ledger, key)
    assert cp.key_id == signing_key_id(key.public_key())
    report = verify_ledger(ledger, key.public_key())
    assert report.ok and report.checkpoints == 1 and report.uncovered == 1
    assert report.summary().startswith("OK: ")
    foreign = verify_ledger(ledger, Ed25519PrivateKey.generate().public_key())
    assert (foreign.ok, foreign.damage) == (False, "foreign checkpoint key")


def test_bad_checkpoint_signature_is_detected(agencies: Agencies) -> None:
    ledger, key = agencies.world.ledger, agencies.custodian_key
    cp = add_signed_checkpoint(ledger, key)
    path = Path(ledger.path)
    ledger.close()
    tamper.corrupt_checkpoint_signature(path)
    with Ledger(path) as reopened:
        report = verify_ledger(reopened, key.public_key())
    assert (report.ok, report.damage, report.first_bad_seq) == (
        False, "bad checkpoint signature", cp.seq)


def test_wholesale_rewrite_passes_the_chain_but_not_the_checkpoints(agencies: Agencies) -> None:
    ledger, key = agencies.world.ledger, agencies.custodian_key
    first = add_signed_checkpoint(ledger, key)
    agencies.run(12, 16)
    second = add_signed_checkpoint(ledger, key)
    path = Path(ledger.path)
    ledger.close()
    k = first.seq + 5
    tamper.rewrite_from(path, k)
    with Ledger(path) as reopened:
        assert reopened.verify_audit_chain().ok  # hashes were recomputed
        assert verify_ledger(reopened).ok  # without the key nothing can tell
        report = verify_ledger(reopened, key.public_key())
    assert (report.ok, report.damage) == (False, "rewritten")
    assert report.first_bad_seq == first.seq + 1 <= k <= report.last_bad_seq == second.seq
    assert f"bad positions {first.seq + 1}..{second.seq}" in report.summary()


def test_truncation_is_caught_by_a_checkpoint(agencies: Agencies) -> None:
    ledger, key = agencies.world.ledger, agencies.custodian_key
    cp = add_signed_checkpoint(ledger, key)
    path = Path(ledger.path)
    ledger.close()
    tamper.truncate_after(path, cp.seq - 3)
    with Ledger(path) as reopened:
        assert verify_chain(reopened.stored_entries()).ok  # the links alone cannot tell
        # ...but the disclosure rows of the cut-off batch entries point past the head
        orphaned = reopened.verify_audit_chain()
        assert not orphaned.ok and "not in the chain" in orphaned.detail
        report = verify_ledger(reopened, key.public_key())
    assert (report.ok, report.damage, report.first_bad_seq) == (False, "truncated", cp.seq - 2)


def test_checkpointer_periodic_idle_and_shutdown(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with Ledger(tmp_path / "l.sqlite") as ledger:
        cpr = Checkpointer(ledger, key, interval_s=0.02).start()
        for i in range(5):
            ledger.audit("note", {"i": i})
            time.sleep(0.05)
        deadline = time.monotonic() + 5
        while cpr.added < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cpr.added >= 2
        time.sleep(0.1)
        settled = len(ledger.checkpoints())
        time.sleep(0.15)  # idle: the chain has not moved, so no checkpoint of a checkpoint
        assert len(ledger.checkpoints()) == settled
        assert cpr.stop() is None  # nothing new since the last one
        ledger.audit("late", {})
        stopped = Checkpointer(ledger, key, interval_s=0)
        final = stopped.stop()  # shutdown checkpoint even with the periodic thread disabled
        assert final is not None and final.seq == ledger.audit_head()[0] - 1
        report = verify_ledger(ledger, key.public_key())
        assert report.ok and report.checkpoints == settled + 1 and report.uncovered == 1


# --------------------------------------------------------------------------------------------
# agency-b / agency-a audit verify: each tamper type, first bad position
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_ledger(tmp_path_factory) -> tuple[Path, int, Path]:
    """A closed custodian ledger from two real sessions, with a checkpoint in the middle."""
    tmp = tmp_path_factory.mktemp("base")
    a = Agencies(tmp)
    a.run(0, 5)
    add_signed_checkpoint(a.world.ledger, a.custodian_key)
    a.run(3, 9)
    n = a.world.ledger.audit_head()[0]
    pub = write_pub(tmp / "signing.pub.json", a.custodian_key)
    a.world.ledger.close()
    a.requester_ledger.close()
    return tmp / "custodian-ledger.sqlite", n, pub


def _copy(src: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / "ledger.sqlite"
    shutil.copyfile(src, dest)
    return dest


def _verify_b(path: Path, capsys, *extra: str) -> tuple[int, str]:
    code = cli_b.main(["audit", "verify", "--ledger", str(path), *extra])
    return code, capsys.readouterr().out


TAMPERS = {
    "edited": lambda p, k: tamper.edit_entry(p, k),
    "deleted": lambda p, k: tamper.delete_entry(p, k),
    "inserted": lambda p, k: tamper.insert_entry(p, k),
    "reordered": lambda p, k: tamper.swap_entries(p, k, k + 1),
}


@pytest.mark.parametrize("kind", sorted(TAMPERS))
def test_cli_names_first_bad_position_and_kind(kind, base_ledger, tmp_path, capsys) -> None:
    src, n, pub = base_ledger
    code, out = _verify_b(_copy(src, tmp_path / "clean"), capsys, "--public-key", str(pub))
    assert code == 0 and out.split(": ", 1)[1].startswith(f"OK: {n} entries, head seq {n} ")
    assert "1 signed checkpoints verified" in out
    k = n // 2
    path = _copy(src, tmp_path / "tampered")
    TAMPERS[kind](path, k)
    code, out = _verify_b(path, capsys)
    assert code == 1, out
    assert f"FAIL: first bad position {k}: {kind} " in out


def test_cli_names_weaker_forgeries_too(base_ledger, tmp_path, capsys) -> None:
    src, _n, _pub = base_ledger
    path = _copy(src, tmp_path / "a")
    tamper.insert_entry(path, 7, valid_hash=False)
    assert "first bad position 7: inserted" in _verify_b(path, capsys)[1]
    path = _copy(src, tmp_path / "b")
    tamper.delete_and_renumber(path, 7)
    assert "first bad position 7: unlinked" in _verify_b(path, capsys)[1]
    path = _copy(src, tmp_path / "c")
    tamper.swap_entries(path, 4, 9)
    assert "first bad position 4: reordered" in _verify_b(path, capsys)[1]
    path = _copy(src, tmp_path / "d")
    tamper.delete_entry(path, 1)
    assert "first bad position 1: deleted" in _verify_b(path, capsys)[1]


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(TAMPERS)), frac=st.floats(0, 1))
def test_any_single_tamper_is_located_exactly(kind, frac, base_ledger, tmp_path_factory) -> None:
    src, n, _pub = base_ledger
    lo = 2 if kind == "inserted" else 1
    # deleting the newest entry is a truncation: only a checkpoint can tell (tested above)
    hi = n - 1 if kind in ("reordered", "deleted") else n
    k = lo + round(frac * (hi - lo))
    path = _copy(src, tmp_path_factory.mktemp("h"))
    TAMPERS[kind](path, k)
    with Ledger(path) as ledger:
        report = verify_ledger(ledger)
    assert (report.ok, report.first_bad_seq, report.damage) == (False, k, kind)


def test_cli_missing_and_garbage_files(tmp_path: Path, capsys) -> None:
    assert cli_b.main(["audit", "verify", "--ledger", str(tmp_path / "none.sqlite")]) == 2
    assert not (tmp_path / "none.sqlite").exists()  # verifying never creates a ledger
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    code, out = _verify_b(garbage, capsys)
    assert code == 1 and "FAIL" in out and "unreadable" in out


def test_agency_a_audit_verify(agencies: Agencies, tmp_path: Path, capsys) -> None:
    data = agencies.tmp
    pub = write_pub(tmp_path / "a.pub.json", agencies.requester_key)
    add_signed_checkpoint(agencies.requester_ledger, agencies.requester_key)
    n = agencies.requester_ledger.audit_head()[0]
    agencies.requester_ledger.close()
    args = ["audit", "verify", "--data", str(data), "--public-key", str(pub)]
    assert cli_a.main(args) == 0
    assert f"OK: {n} entries" in capsys.readouterr().out
    tamper.edit_entry(data / "requester-ledger.sqlite", 2)
    assert cli_a.main(args) == 1
    assert "FAIL: first bad position 2: edited" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Export commands and psi-authority oversight, end to end through the CLIs
# --------------------------------------------------------------------------------------------


def test_export_and_oversight_clis(agencies: Agencies, tmp_path: Path, capsys) -> None:
    secrets_b, secrets_a = tmp_path / "sb", tmp_path / "sa"
    for d, key in ((secrets_b, agencies.custodian_key), (secrets_a, agencies.requester_key)):
        d.mkdir()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        (d / "signing.key").write_bytes(pem)
        (d / "signing.key").chmod(0o600)
        write_pub(d / "signing.pub.json", key)
    ledger_b = Path(agencies.world.ledger.path)
    agencies.world.ledger.close()
    agencies.requester_ledger.close()
    out_b, out_a = tmp_path / "b.json", tmp_path / "a.json"
    assert cli_b.main(["export", "--ledger", str(ledger_b), "--authorization",
                       agencies.auth_id, "--out", str(out_b), "--secrets", str(secrets_b)]) == 0
    assert cli_a.main(["export", "--data", str(agencies.tmp), "--authorization",
                       agencies.auth_id, "--out", str(out_a), "--secrets", str(secrets_a)]) == 0
    assert (out_b.stat().st_mode & 0o777) == 0o600
    assert cli_b.main(["export", "--ledger", str(ledger_b), "--authorization",
                       agencies.auth_id, "--out", str(out_b)]) == 2  # never overwrites
    assert cli_b.main(["export", "--ledger", str(ledger_b), "--authorization", "nope",
                       "--out", str(tmp_path / "x.json")]) == 2
    doc = json.loads(out_b.read_text())
    assert len(doc["tail"]) == 1 and doc["tail"][0]["kind"] == "audit.checkpoint"
    capsys.readouterr()
    args = ["oversight", "--custodian-export", str(out_b), "--requester-export", str(out_a),
            "--custodian-key", str(secrets_b / "signing.pub.json"),
            "--requester-key", str(secrets_a / "signing.pub.json")]
    assert authority_cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"AGREE: authorization {agencies.auth_id}"
    assert "FAIL" not in out
    doc["receipts"][0]["evaluated"] += 1
    doc["receipts"][0].pop("signed_bytes")
    out_b.write_text(json.dumps(doc))
    assert authority_cli.main([*args, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["agree"] is False
    assert {f["check"] for f in report["findings"] if not f["ok"]} >= {
        "receipt.fields", "receipt.ledger", "receipt.custodian_signature"}
    assert isinstance(load_public_key_json(secrets_b / "signing.pub.json"), type(
        agencies.custodian_key.public_key()))
