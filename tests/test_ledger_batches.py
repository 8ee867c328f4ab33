"""Disclosure batches: one audit entry per batch, committing to the digest of its rows.

Every disclosed record keeps its own accounting row, written in the batch entry's
transaction; verification recomputes the digest from the rows, so deleting, adding or
editing any single row (first or repeated disclosure) is caught, and ledgers written with
one entry per row (the older form) still verify (docs/architecture.md, Accounting).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.accounting.chain import (
    DISCLOSURE_BATCH,
    DISCLOSURE_RECORDED,
    DisclosureAccount,
    disclosure_rows_digest,
)
from protocol.accounting.export import custodian_export
from protocol.accounting.oversight import (
    _check_disclosure_batches,
    _Findings,
    add_signed_checkpoint,
    verify_ledger,
)
from protocol.adapters.sqlite_ledger import Ledger, _write
from tests.helpers.tamper import raw

NOT_AFTER = 4_102_444_800  # 2100-01-01
_ROW_TRIGGERS = ("disclosures_no_update", "disclosures_no_delete",
                 "disclosure_repeats_no_update", "disclosure_repeats_no_delete")


def _ledger(path: Path) -> Ledger:
    """Two sessions: s1 discloses r0..r4 in one batch; s2 replays r1 and discloses r9."""
    led = Ledger(path)
    led.ensure_authorization("auth-1", max_evaluations=100, max_disclosures=50,
                             not_after=NOT_AFTER)
    for sid in ("s1", "s2"):
        led.open_session("auth-1", sid, {"peer": "agency-a"})
        led.reserve("auth-1", sid, 10)
    led.record_disclosures("auth-1", "s1", [(f"r{i}", "tin+dob") for i in range(5)])
    led.record_disclosures("auth-1", "s2", [("r1", "tin+zip"), ("r9", "tin+dob")])
    return led


def _tampered(path: Path, sql: str, args: tuple[object, ...] = ()) -> None:
    """One raw edit of the accounting tables, triggers dropped, as a disk-level attacker."""
    with raw(path) as c:
        for name in _ROW_TRIGGERS:
            c.execute(f"DROP TRIGGER IF EXISTS {name}")
        c.execute(sql, args)


def _batch_seqs(path: Path) -> list[int]:
    with sqlite3.connect(path) as c:
        return [int(r[0]) for r in c.execute(
            "SELECT seq FROM audit_log WHERE kind = ? ORDER BY seq", (DISCLOSURE_BATCH,))]


def test_one_entry_per_batch_commits_to_every_row(tmp_path: Path) -> None:
    with _ledger(tmp_path / "l.sqlite") as led:
        batches = [e for e in led.audit_entries() if e.kind == DISCLOSURE_BATCH]
        assert [(b.payload["session_id"], b.payload["recorded"], b.payload["repeated"])
                for b in batches] == [("s1", 5, 0), ("s2", 1, 1)]
        rows = list(led.disclosure_accounts())
        assert len(rows) == 7  # every disclosed record keeps its own row
        for b in batches:
            mine = [r for r in rows if r.audit_seq == b.seq]
            assert all(r.at == b.at for r in mine)
            assert b.payload["rows_sha256"] == disclosure_rows_digest(mine)
        (repeat,) = [r for r in rows if r.kind != DISCLOSURE_RECORDED]
        assert (repeat.session_id, repeat.record_id, repeat.rule_id,
                repeat.first_session_id) == ("s2", "r1", "tin+zip", "s1")
        assert led.verify_audit_chain().ok
        assert led.verify_disclosures() is None
        report = verify_ledger(led)
        assert report.ok, report.summary()


def test_digest_ignores_storage_order_but_not_content() -> None:
    rows = [DisclosureAccount(7, DISCLOSURE_RECORDED, "a", "s", f"r{i}", "tin+dob", "", 1.5)
            for i in range(4)]
    assert disclosure_rows_digest(rows) == disclosure_rows_digest(rows[::-1])
    for i, field in enumerate(("kind", "auth_id", "session_id", "record_id", "rule_id",
                               "first_session_id")):
        edited = rows[0]._replace(**{field: f"x{i}"})
        assert disclosure_rows_digest([edited, *rows[1:]]) != disclosure_rows_digest(rows)
    later = rows[0]._replace(at=1.5000001)
    assert disclosure_rows_digest([later, *rows[1:]]) != disclosure_rows_digest(rows)
    assert disclosure_rows_digest(rows[1:]) != disclosure_rows_digest(rows)


TAMPERS: dict[str, Callable[[list[int]], tuple[str, tuple[object, ...]]]] = {
    "first row deleted": lambda s: ("DELETE FROM disclosures WHERE record_id = 'r3'", ()),
    "first row edited": lambda s: (
        "UPDATE disclosures SET record_id = 'r77' WHERE record_id = 'r2'", ()),
    "first row re-ruled": lambda s: (
        "UPDATE disclosures SET rule_id = 'tin+zip' WHERE record_id = 'r0'", ()),
    "first row re-timed": lambda s: (
        "UPDATE disclosures SET disclosed_at = disclosed_at + 1 WHERE record_id = 'r4'", ()),
    "row added to a batch": lambda s: (
        "INSERT INTO disclosures (auth_id, session_id, record_id, rule_id, disclosed_at, "
        "audit_seq) SELECT auth_id, session_id, 'planted', rule_id, disclosed_at, audit_seq "
        "FROM disclosures WHERE record_id = 'r0'", ()),
    "row added under another entry": lambda s: (
        "INSERT INTO disclosures (auth_id, session_id, record_id, rule_id, disclosed_at, "
        "audit_seq) VALUES ('auth-1', 's1', 'planted', 'tin+dob', 1.0, 2)", ()),
    "row added past the head": lambda s: (
        "INSERT INTO disclosures (auth_id, session_id, record_id, rule_id, disclosed_at, "
        "audit_seq) VALUES ('auth-1', 's1', 'planted', 'tin+dob', 1.0, 10000)", ()),
    "row moved to the other batch": lambda s: (
        "UPDATE disclosures SET audit_seq = ? WHERE record_id = 'r0'", (s[1],)),
    "repeat deleted": lambda s: ("DELETE FROM disclosure_repeats", ()),
    "repeat edited": lambda s: (
        "UPDATE disclosure_repeats SET first_session_id = 's2'", ()),
    "repeat added": lambda s: (
        "INSERT INTO disclosure_repeats (auth_id, session_id, record_id, rule_id, "
        "first_session_id, repeated_at, audit_seq) SELECT auth_id, session_id, 'r3', rule_id, "
        "'s1', repeated_at, audit_seq FROM disclosure_repeats", ()),
    "row made a number": lambda s: (
        "UPDATE disclosures SET record_id = 5 WHERE record_id = 'r1'", ()),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_any_single_row_change_is_detected(tmp_path: Path, name: str) -> None:
    path = tmp_path / "l.sqlite"
    key = Ed25519PrivateKey.generate()
    with _ledger(path) as led:
        add_signed_checkpoint(led, key)
    seqs = _batch_seqs(path)
    sql, args = TAMPERS[name](seqs)
    _tampered(path, sql, args)
    with Ledger(path) as led:
        chain = led.verify_audit_chain()
        assert not chain.ok
        assert chain.first_bad_seq is not None
        report = verify_ledger(led, key.public_key())
    # The chain and checkpoints are intact: only the rows were touched, and it shows.
    assert (report.ok, report.damage) == (False, "disclosure rows"), report.summary()
    assert report.checkpoints_verified


def test_ledger_with_one_entry_per_row_still_verifies(tmp_path: Path) -> None:
    """The older form (one ``disclosure.recorded`` entry per row) verifies, and its rows are
    still checked field for field against their entries."""
    path = tmp_path / "old.sqlite"
    with Ledger(path) as led:
        led.ensure_authorization("auth-1", max_evaluations=10, max_disclosures=10,
                                 not_after=NOT_AFTER)
        led.open_session("auth-1", "s1", {"peer": "agency-a"})
        with _write(led._db) as conn:  # what the code before batch entries wrote
            now = led.now()
            entries = led._audit.append_many(conn, now, [
                (DISCLOSURE_RECORDED, {"auth_id": "auth-1", "session_id": "s1",
                                       "record_id": f"r{i}", "rule_id": "tin+dob"})
                for i in range(3)])
            conn.executemany(
                "INSERT INTO disclosures (auth_id, session_id, record_id, rule_id, "
                "disclosed_at, audit_seq) VALUES ('auth-1', 's1', ?, 'tin+dob', ?, ?)",
                [(f"r{i}", now, e.seq) for i, e in enumerate(entries)])
        led.record_disclosures("auth-1", "s1", [("r1", "tin+zip"), ("r5", "tin+dob")])
        assert led.verify_audit_chain().ok
        assert [(d.record_id, d.repeat) for d in led.disclosures("auth-1",
                                                                include_repeats=True)] == [
            ("r0", False), ("r1", False), ("r2", False), ("r5", False), ("r1", True)]
    _tampered(path, "UPDATE disclosures SET rule_id = 'tin+zip' WHERE record_id = 'r2'")
    with Ledger(path) as led:
        report = led.verify_audit_chain()
    assert not report.ok and "missing or was edited" in report.detail


def test_inspector_checks_exports_of_both_forms(tmp_path: Path) -> None:
    """``psi-authority oversight`` re-hashes per-row entries of an older ledger too."""
    path = tmp_path / "mixed.sqlite"
    with Ledger(path) as led:
        led.ensure_authorization("auth-1", max_evaluations=10, max_disclosures=10,
                                 not_after=NOT_AFTER)
        led.open_session("auth-1", "s1", {"peer": "agency-a"})
        with _write(led._db) as conn:  # the older form, then a batch
            now = led.now()
            (entry,) = led._audit.append_many(conn, now, [(DISCLOSURE_RECORDED, {
                "auth_id": "auth-1", "session_id": "s1", "record_id": "r0",
                "rule_id": "tin+dob"})])
            conn.execute("INSERT INTO disclosures (auth_id, session_id, record_id, rule_id, "
                         "disclosed_at, audit_seq) VALUES ('auth-1', 's1', 'r0', 'tin+dob', ?, ?)",
                         (now, entry.seq))
        led.record_disclosures("auth-1", "s1", [("r0", "tin+zip"), ("r1", "tin+dob")])
        doc = custodian_export(led, "auth-1")
    assert [b["kind"] for b in doc["disclosure_batches"]] == [DISCLOSURE_RECORDED,
                                                              DISCLOSURE_BATCH]
    found = _Findings()
    _check_disclosure_batches(found, doc)
    assert [(f.check, f.ok) for f in found.items] == [("disclosures.batches", True)]
    doc["disclosure_batches"][0]["rows"][0][3] = "tin+zip"  # the older row, edited
    found = _Findings()
    _check_disclosure_batches(found, doc)
    assert not found.items[0].ok and "missing or was edited" in found.items[0].detail
