"""Tests for agency_a.store: encryption at rest, integrity, retention, purge residue, audit."""

from __future__ import annotations

import csv
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agency_a.store import (
    AUDIT_KINDS,
    KEY_ENV,
    KEY_LEN,
    ResultIntegrityError,
    ResultStore,
    generate_key_file,
    load_key,
)
from protocol.adapters.sqlite import SqliteDatabase
from protocol.adapters.sqlite_ledger import Ledger
from protocol.errors import PSIError

DAY = 86_400
STREET = "Quillfeather Hollow Lane"  # distinctive plaintext that must never hit the disk
START = 1_750_000_000.0


class FakeClock:
    """Settable clock so retention can be tested without waiting days."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_rows(n: int, *, street: str = STREET, tag: str = "") -> list[dict[str, Any]]:
    return [
        {
            "query_record_id": f"q-{tag}{i:05d}",
            "rule_id": "tin+dob",
            "pseudonym": f"ps-{tag}{i:05d}",
            "fields": {"street": f"{i} {street}", "city": "Marrowgate", "zip": "90210"},
        }
        for i in range(n)
    ]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    data, secrets_dir = tmp_path / "data", tmp_path / "secrets"
    data.mkdir()
    secrets_dir.mkdir()
    return data, secrets_dir


@pytest.fixture
def key() -> bytes:
    return os.urandom(KEY_LEN)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(dirs: tuple[Path, Path], clock: FakeClock) -> Iterator[Ledger]:
    with Ledger(dirs[0] / "audit.sqlite", clock=clock) as led:
        yield led


@pytest.fixture
def db_path(dirs: tuple[Path, Path]) -> Path:
    return dirs[0] / "results.sqlite"


@pytest.fixture
def store(db_path: Path, key: bytes, ledger: Ledger, clock: FakeClock) -> Iterator[ResultStore]:
    with ResultStore(db_path, key, ledger, clock=clock) as s:
        yield s


def raw(path: Path) -> bytes:
    return path.read_bytes()


def kinds(store: ResultStore, job_id: str | None = None) -> list[str]:
    return [e["kind"] for e in store.access_log(job_id)]


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def test_generate_key_file_is_private_and_loads(dirs: tuple[Path, Path]) -> None:
    path = dirs[1] / "results.key"
    generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(path)
    assert len(key) == KEY_LEN
    assert path.read_text().strip() == key.hex()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_key_file(path)
    assert load_key(path) == key  # untouched by the refused overwrite


def test_two_generated_keys_differ(dirs: tuple[Path, Path]) -> None:
    a, b = dirs[1] / "a.key", dirs[1] / "b.key"
    generate_key_file(a)
    generate_key_file(b)
    assert load_key(a) != load_key(b)


def test_raw_key_file_accepted(dirs: tuple[Path, Path]) -> None:
    path = dirs[1] / "raw.key"
    secret = os.urandom(KEY_LEN)
    path.write_bytes(secret)
    path.chmod(0o600)
    assert load_key(path) == secret


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602])
def test_key_file_readable_by_others_refused(dirs: tuple[Path, Path], mode: int) -> None:
    path = dirs[1] / "loose.key"
    generate_key_file(path)
    path.chmod(mode)
    with pytest.raises(ValueError, match="chmod 600") as info:
        load_key(path)
    assert f"{mode:04o}" in str(info.value)


def test_key_file_errors_are_clear_and_do_not_leak(dirs: tuple[Path, Path]) -> None:
    missing = dirs[1] / "nope.key"
    with pytest.raises(ValueError, match="does not exist"):
        load_key(missing)
    bad = dirs[1] / "bad.key"
    bad.write_text("zz" * KEY_LEN)
    bad.chmod(0o600)
    with pytest.raises(ValueError, match="not valid hex") as info:
        load_key(bad)
    assert "zz" * 4 not in str(info.value)
    short = dirs[1] / "short.key"
    short.write_text("ab" * 16)
    short.chmod(0o600)
    with pytest.raises(ValueError, match="64 hex digits"):
        load_key(short)
    with pytest.raises(ValueError, match="not a regular file"):
        load_key(dirs[1])


def test_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = os.urandom(KEY_LEN)
    monkeypatch.setenv(KEY_ENV, " " + secret.hex().upper() + "\n")
    assert load_key() == secret
    monkeypatch.setenv(KEY_ENV, "not-hex" * 9 + "x")
    with pytest.raises(ValueError, match=KEY_ENV):
        load_key()


def test_no_key_source_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"no result-store key.*{KEY_ENV}"):
        load_key()


def test_key_file_wins_over_environment(
    dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = dirs[1] / "k.key"
    generate_key_file(path)
    monkeypatch.setenv(KEY_ENV, os.urandom(KEY_LEN).hex())
    assert load_key(path) == bytes.fromhex(path.read_text())


def test_key_beside_database_refused(dirs: tuple[Path, Path], ledger: Ledger) -> None:
    data, secrets_dir = dirs
    beside = data / "results.key"
    generate_key_file(beside)
    db = data / "results.sqlite"
    with pytest.raises(ValueError, match="stored with the result database"):
        ResultStore(db, load_key(beside), ledger, key_path=beside)
    below = data / "keys" / "results.key"
    below.parent.mkdir()
    generate_key_file(below)
    with pytest.raises(ValueError, match="stored with the result database"):
        ResultStore(db, load_key(below), ledger, key_path=below)
    assert not db.exists()  # refused before anything was created
    elsewhere = secrets_dir / "results.key"
    generate_key_file(elsewhere)
    with ResultStore(db, load_key(elsewhere), ledger, key_path=elsewhere) as s:
        assert s.jobs() == []


def test_bad_key_length_refused(db_path: Path, ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        ResultStore(db_path, b"short", ledger)


# --------------------------------------------------------------------------------------------
# Encryption at rest
# --------------------------------------------------------------------------------------------


def test_round_trip(store: ResultStore) -> None:
    rows = make_rows(5)
    assert store.put_results("job-1", "auth-1", 30, rows, operator="alice") == 5
    assert store.read_results("job-1", operator="bob", purpose="locate subject") == rows
    (meta,) = store.jobs()
    assert meta == {
        "job_id": "job-1",
        "authorization_id": "auth-1",
        "rows": 5,
        "stored_at": START,
        "expires_at": START + 30 * DAY,
        "retention_days": 30,
    }


def test_empty_job_and_unknown_job(store: ResultStore) -> None:
    assert store.put_results("job-empty", "auth-1", 1, [], operator="alice") == 0
    assert store.read_results("job-empty", operator="bob", purpose="check") == []
    assert store.read_results("job-never", operator="bob", purpose="check") == []
    reads = [e for e in store.access_log() if e["kind"] == "results_read"]
    assert [(e["job_id"], e["count"]) for e in reads] == [("job-empty", 0), ("job-never", 0)]


def test_job_stored_once(store: ResultStore) -> None:
    store.put_results("job-1", "auth-1", 1, make_rows(1), operator="alice")
    with pytest.raises(ValueError, match="already stored"):
        store.put_results("job-1", "auth-1", 1, make_rows(2), operator="alice")
    assert store.jobs()[0]["rows"] == 1


def test_invalid_rows_refused_atomically(store: ResultStore) -> None:
    rows = make_rows(3)
    rows[2] = {"query_record_id": "q", "rule_id": "r", "pseudonym": "p"}  # no fields
    with pytest.raises(ValueError, match="row 2 is missing"):
        store.put_results("job-x", "auth-1", 1, rows, operator="alice")
    bad = make_rows(1)
    bad[0]["fields"]["when"] = object()
    with pytest.raises(ValueError, match="not JSON-able"):
        store.put_results("job-x", "auth-1", 1, bad, operator="alice")
    with pytest.raises(ValueError, match="retention_days"):
        store.put_results("job-x", "auth-1", -1, make_rows(1), operator="alice")
    assert store.jobs() == []
    assert "results_stored" not in kinds(store)


def test_no_plaintext_in_database_file(store: ResultStore, db_path: Path) -> None:
    rows = make_rows(50)
    store.put_results("job-secret", "auth-1", 30, rows, operator="alice")
    data = raw(db_path)
    assert b"job-secret" in data  # metadata is in the file, as a sanity check of the scan
    for needle in (STREET, "Marrowgate", "q-00007", "ps-00042", "tin+dob", "street"):
        assert needle.encode() not in data, needle
        assert needle.encode("utf-16-le") not in data, needle
    # The audit ledger holds counts, never content either.
    audit_bytes = raw(Path(store._audit.path))
    assert STREET.encode() not in audit_bytes
    assert not Path(str(db_path) + "-wal").exists()
    assert not Path(str(db_path) + "-journal").exists()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_store_pragmas(store: ResultStore) -> None:
    conn = store._connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_store_opens_through_another_process_recovering_the_file(
    db_path: Path, key: bytes, ledger: Ledger, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store shares the ledger's open-with-retry: a file answering "locked" at once
    (another process's crash recovery) is retried, not reported as broken."""
    real_open = SqliteDatabase._open
    failures = iter([True, False])

    def flaky_open(self: SqliteDatabase, timeout_ms: int) -> None:
        if next(failures):
            raise sqlite3.OperationalError("database is locked")
        real_open(self, timeout_ms)

    monkeypatch.setattr(SqliteDatabase, "_open", flaky_open)
    with ResultStore(db_path, key, ledger, clock=clock) as s:
        assert s.put_results("job-1", "auth-1", 30, make_rows(1), operator="alice") == 1
    with pytest.raises(ValueError, match="result store is closed"):
        s.jobs()


def test_nonces_are_fresh(store: ResultStore, db_path: Path) -> None:
    same = [make_rows(1)[0]] * 20  # identical plaintexts
    store.put_results("job-1", "auth-1", 1, same, operator="alice")
    with sqlite3.connect(db_path) as conn:
        nonces = [r[0] for r in conn.execute("SELECT nonce FROM results")]
        cts = [r[0] for r in conn.execute("SELECT ciphertext FROM results")]
    assert len(set(nonces)) == 20 and all(len(n) == 12 for n in nonces)
    assert len(set(cts)) == 20


# --------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------


def test_wrong_key_is_an_integrity_error(
    db_path: Path, key: bytes, ledger: Ledger, clock: FakeClock
) -> None:
    with ResultStore(db_path, key, ledger, clock=clock) as s:
        s.put_results("job-1", "auth-1", 30, make_rows(2), operator="alice")
    with pytest.raises(ResultIntegrityError, match="key does not open") as info:
        ResultStore(db_path, os.urandom(KEY_LEN), ledger, clock=clock)
    assert isinstance(info.value, PSIError) and info.value.code == "result_integrity"
    with ResultStore(db_path, key, ledger, clock=clock) as s:  # the right key still works
        assert len(s.read_results("job-1", operator="bob", purpose="p")) == 2


def test_wrong_key_fails_row_decryption_too(
    db_path: Path, key: bytes, ledger: Ledger, clock: FakeClock
) -> None:
    """Even if the key-check value were forged, the rows themselves refuse a wrong key."""
    with ResultStore(db_path, key, ledger, clock=clock) as s:
        s.put_results("job-1", "auth-1", 30, make_rows(2), operator="alice")
    other = os.urandom(KEY_LEN)
    with ResultStore(db_path.with_name("other.sqlite"), other, ledger, clock=clock) as o:
        other_check = (
            o._connection()
            .execute("SELECT value FROM store_meta WHERE key = 'key_check'")
            .fetchone()[0]
        )
        other_id = o.store_id
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE store_meta SET value = ? WHERE key = 'key_check'", (other_check,))
        conn.execute("UPDATE store_meta SET value = ? WHERE key = 'store_id'", (other_id,))
    with (
        ResultStore(db_path, other, ledger, clock=clock) as s,
        pytest.raises(ResultIntegrityError, match="fails authentication"),
    ):
        s.read_results("job-1", operator="bob", purpose="p")


def _tamper(db_path: Path, sql: str, *args: Any) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute(sql, args)


def test_tampered_ciphertext_detected(store: ResultStore, db_path: Path) -> None:
    store.put_results("job-1", "auth-1", 30, make_rows(3), operator="alice")
    with sqlite3.connect(db_path) as conn:
        (ct,) = conn.execute(
            "SELECT ciphertext FROM results WHERE job_id = 'job-1' AND row_no = 1"
        ).fetchone()
        flipped = bytearray(ct)
        flipped[5] ^= 0x01
        conn.execute(
            "UPDATE results SET ciphertext = ? WHERE job_id = 'job-1' AND row_no = 1",
            (bytes(flipped),),
        )
    with pytest.raises(ResultIntegrityError, match="row 1 fails authentication"):
        store.read_results("job-1", operator="bob", purpose="p")
    failures = [e for e in store.access_log("job-1") if e["kind"] == "results_integrity_failure"]
    assert len(failures) == 1 and failures[0]["operator"] == "bob"
    assert "results_read" not in kinds(store, "job-1")  # nothing was handed out


def test_rows_swapped_between_jobs_detected(store: ResultStore, db_path: Path) -> None:
    store.put_results("job-a", "auth-1", 30, make_rows(2, tag="a"), operator="alice")
    store.put_results("job-b", "auth-1", 30, make_rows(2, tag="b"), operator="alice")
    with sqlite3.connect(db_path) as conn:
        a = conn.execute(
            "SELECT nonce, ciphertext FROM results WHERE job_id = 'job-a' AND row_no = 0"
        ).fetchone()
        conn.execute(
            "UPDATE results SET nonce = ?, ciphertext = ? WHERE job_id = 'job-b' AND row_no = 0",
            a,
        )
    with pytest.raises(ResultIntegrityError, match="job 'job-b' row 0"):
        store.read_results("job-b", operator="bob", purpose="p")
    assert len(store.read_results("job-a", operator="bob", purpose="p")) == 2


def test_rows_reordered_within_job_detected(store: ResultStore, db_path: Path) -> None:
    store.put_results("job-1", "auth-1", 30, make_rows(2), operator="alice")
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE results SET row_no = row_no + 10 WHERE job_id = 'job-1'")
        conn.execute("UPDATE results SET row_no = 11 - (row_no - 10) - 10 WHERE job_id = 'job-1'")
        assert sorted(r[0] for r in conn.execute("SELECT row_no FROM results")) == [0, 1]
    with pytest.raises(ResultIntegrityError, match="fails authentication"):
        store.read_results("job-1", operator="bob", purpose="p")


def test_expiry_edit_detected(store: ResultStore, db_path: Path) -> None:
    store.put_results("job-1", "auth-1", 1, make_rows(2), operator="alice")
    _tamper(db_path, "UPDATE jobs SET expires_at = expires_at + 365 * 86400")
    with pytest.raises(ResultIntegrityError, match="metadata"):
        store.read_results("job-1", operator="bob", purpose="p")


def test_expiry_edit_with_forged_header_still_detected(store: ResultStore, db_path: Path) -> None:
    """Editing expiry and restoring the header MAC leaves the row AD stale."""
    store.put_results("job-1", "auth-1", 1, make_rows(1), operator="alice")
    store.put_results("job-2", "auth-1", 400, make_rows(1), operator="alice")
    with sqlite3.connect(db_path) as conn:
        j2 = conn.execute(
            "SELECT expires_at, retention_days, header_mac, stored_at FROM jobs "
            "WHERE job_id = 'job-2'"
        ).fetchone()
    # A header MAC from another job does not fit: the job id is bound in.
    _tamper(
        db_path,
        "UPDATE jobs SET expires_at = ?, retention_days = ?, header_mac = ?, stored_at = ? "
        "WHERE job_id = 'job-1'",
        *j2,
    )
    with pytest.raises(ResultIntegrityError):
        store.read_results("job-1", operator="bob", purpose="p")


def test_deleted_row_detected(store: ResultStore, db_path: Path) -> None:
    store.put_results("job-1", "auth-1", 30, make_rows(4), operator="alice")
    _tamper(db_path, "DELETE FROM results WHERE job_id = 'job-1' AND row_no = 3")
    with pytest.raises(ResultIntegrityError, match="rows were removed or added"):
        store.read_results("job-1", operator="bob", purpose="p")


def test_authorization_swap_detected(store: ResultStore, db_path: Path) -> None:
    store.put_results("job-1", "auth-1", 30, make_rows(1), operator="alice")
    _tamper(db_path, "UPDATE jobs SET authorization_id = 'auth-2'")
    with pytest.raises(ResultIntegrityError):
        store.read_results("job-1", operator="bob", purpose="p")


def test_rows_copied_between_stores_detected(
    dirs: tuple[Path, Path], key: bytes, ledger: Ledger, clock: FakeClock
) -> None:
    """Same key, same job id, different store: the store id in the AD tells them apart."""
    p1, p2 = dirs[0] / "one.sqlite", dirs[0] / "two.sqlite"
    with ResultStore(p1, key, ledger, clock=clock) as s1:
        s1.put_results("job-1", "auth-1", 30, make_rows(1, tag="one"), operator="alice")
    with ResultStore(p2, key, ledger, clock=clock) as s2:
        s2.put_results("job-1", "auth-1", 30, make_rows(1, tag="two"), operator="alice")
    with sqlite3.connect(p1) as c1:
        moved = c1.execute("SELECT nonce, ciphertext FROM results").fetchone()
    _tamper(p2, "UPDATE results SET nonce = ?, ciphertext = ?", *moved)
    with (
        ResultStore(p2, key, ledger, clock=clock) as s2,
        pytest.raises(ResultIntegrityError),
    ):
        s2.read_results("job-1", operator="bob", purpose="p")


# --------------------------------------------------------------------------------------------
# Operators and purposes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", "   ", None])
def test_reads_without_operator_or_purpose_refused(store: ResultStore, blank: Any) -> None:
    store.put_results("job-1", "auth-1", 30, make_rows(1), operator="alice")
    with pytest.raises(ValueError, match="operator is required"):
        store.read_results("job-1", operator=blank, purpose="p")
    with pytest.raises(ValueError, match="purpose is required"):
        store.read_results("job-1", operator="bob", purpose=blank)
    with pytest.raises(ValueError, match="operator is required"):
        store.export_results("job-1", Path("/nonexistent/x.csv"), operator=blank, purpose="p")
    with pytest.raises(ValueError, match="purpose is required"):
        store.export_results("job-1", Path("/nonexistent/x.csv"), operator="bob", purpose=blank)
    with pytest.raises(ValueError, match="operator is required"):
        store.purge_job("job-1", operator=blank, reason="r")
    with pytest.raises(ValueError, match="reason is required"):
        store.purge_job("job-1", operator="bob", reason=blank)
    with pytest.raises(ValueError, match="operator is required"):
        store.put_results("job-2", "auth-1", 30, make_rows(1), operator=blank)
    assert kinds(store) == ["results_stored"]  # refusals touched nothing
    assert store.jobs()[0]["rows"] == 1


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def test_export_writes_private_csv_and_is_logged(
    store: ResultStore, dirs: tuple[Path, Path]
) -> None:
    rows = make_rows(3)
    rows[1]["fields"]["note"] = '=HYPERLINK("http://evil")'
    store.put_results("job-1", "auth-1", 10, rows, operator="alice")
    dest = dirs[1] / "out.csv"
    assert store.export_results("job-1", dest, operator="carol", purpose="field visit") == 3
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    with dest.open(newline="", encoding="utf-8") as fh:
        parsed = list(csv.DictReader(fh))
    assert [r["query_record_id"] for r in parsed] == ["q-00000", "q-00001", "q-00002"]
    assert parsed[2]["fields.street"] == f"2 {STREET}"
    assert parsed[0]["authorization_id"] == "auth-1"
    assert parsed[0]["expires_at_utc"].startswith("2025-")
    assert parsed[1]["fields.note"] == '\'=HYPERLINK("http://evil")'  # defused
    assert parsed[0]["fields.note"] == ""
    (entry,) = [e for e in store.access_log("job-1") if e["kind"] == "results_exported"]
    assert entry["operator"] == "carol" and entry["purpose"] == "field visit"
    assert entry["count"] == 3 and entry["dest"] == str(dest.resolve())
    with pytest.raises(FileExistsError):
        store.export_results("job-1", dest, operator="carol", purpose="again")
    with pytest.raises(LookupError, match="unknown or purged"):
        store.export_results("job-none", dirs[1] / "none.csv", operator="carol", purpose="x")
    assert not (dirs[1] / "none.csv").exists()
    assert kinds(store, "job-1").count("results_exported") == 1


# --------------------------------------------------------------------------------------------
# Retention and purge residue
# --------------------------------------------------------------------------------------------


def test_retention_purge_leaves_no_residue(
    store: ResultStore, db_path: Path, clock: FakeClock
) -> None:
    store.put_results("job-doomed-7f3a", "auth-short", 2, make_rows(40), operator="alice")
    store.put_results("job-kept-11bb", "auth-long", 30, make_rows(3, tag="k"), operator="alice")
    with sqlite3.connect(db_path) as conn:
        doomed_cts = [
            bytes(r[0])
            for r in conn.execute("SELECT ciphertext FROM results WHERE job_id = 'job-doomed-7f3a'")
        ]
    before = raw(db_path)
    assert b"job-doomed-7f3a" in before
    assert all(ct in before for ct in doomed_cts)

    clock.advance(2 * DAY - 1)
    assert store.purge_expired() == 0  # not yet
    clock.advance(1)
    assert store.purge_expired() == 40
    assert store.read_results("job-doomed-7f3a", operator="bob", purpose="p") == []
    assert [j["job_id"] for j in store.jobs()] == ["job-kept-11bb"]
    assert len(store.read_results("job-kept-11bb", operator="bob", purpose="p")) == 3

    after = raw(db_path)
    assert b"job-doomed-7f3a" not in after
    assert b"auth-short" not in after
    for ct in doomed_cts:
        assert ct not in after
        assert ct[:16] not in after  # not even a fragment of a purged row
    assert b"job-kept-11bb" in after
    assert not Path(str(db_path) + "-journal").exists()
    assert not Path(str(db_path) + "-wal").exists()

    (purge,) = [e for e in store.access_log("job-doomed-7f3a") if e["kind"] == "results_purged"]
    assert purge["reason"] == "retention_expired" and purge["count"] == 40
    assert purge["operator"] == "system:retention"
    assert store._audit.verify_audit_chain().ok


def test_expired_rows_never_read_even_without_explicit_purge(
    store: ResultStore, clock: FakeClock
) -> None:
    store.put_results("job-1", "auth-1", 1, make_rows(2), operator="alice")
    clock.advance(DAY)
    assert store.read_results("job-1", operator="bob", purpose="p") == []
    assert store.jobs() == []
    assert kinds(store, "job-1") == ["results_stored", "results_purged", "results_read"]


def test_zero_retention_is_never_readable(store: ResultStore) -> None:
    store.put_results("job-0", "auth-0", 0, make_rows(2), operator="alice")
    assert store.read_results("job-0", operator="bob", purpose="p") == []
    assert store.jobs() == []


def test_purge_on_open(db_path: Path, key: bytes, ledger: Ledger, clock: FakeClock) -> None:
    with ResultStore(db_path, key, ledger, clock=clock) as s:
        s.put_results("job-old", "auth-1", 1, make_rows(5), operator="alice")
    clock.advance(DAY + 1)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 5
    with ResultStore(db_path, key, ledger, clock=clock) as s:
        with sqlite3.connect(db_path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
        assert [e["kind"] for e in s.access_log("job-old")][-1] == "results_purged"
    assert b"job-old" not in raw(db_path)


def test_purge_job_by_operator(store: ResultStore, db_path: Path) -> None:
    store.put_results("job-go", "auth-1", 30, make_rows(6), operator="alice")
    store.put_results("job-stay", "auth-1", 30, make_rows(1), operator="alice")
    assert store.purge_job("job-go", operator="dave", reason="case closed") == 6
    assert store.purge_job("job-go", operator="dave", reason="again") == 0
    assert b"job-go" not in raw(db_path)
    assert [j["job_id"] for j in store.jobs()] == ["job-stay"]
    purges = [e for e in store.access_log("job-go") if e["kind"] == "results_purged"]
    assert [(p["operator"], p["reason"], p["count"]) for p in purges] == [
        ("dave", "case closed", 6),
        ("dave", "again", 0),
    ]


def test_background_purger(store: ResultStore, clock: FakeClock, db_path: Path) -> None:
    store.put_results("job-1", "auth-1", 1, make_rows(3), operator="alice")
    thread = store.start_purger(0.01)
    assert thread.daemon and thread.is_alive()
    with pytest.raises(RuntimeError, match="already running"):
        store.start_purger(0.01)
    clock.advance(DAY)
    deadline = time.monotonic() + 10
    while "results_purged" not in kinds(store, "job-1") and time.monotonic() < deadline:
        time.sleep(0.01)
    store.stop_purger()
    assert not thread.is_alive()
    assert "results_purged" in kinds(store, "job-1")
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
    store.stop_purger()  # idempotent
    with pytest.raises(ValueError, match="positive"):
        store.start_purger(0)


def test_close_stops_purger(db_path: Path, key: bytes, ledger: Ledger) -> None:
    s = ResultStore(db_path, key, ledger)
    thread = s.start_purger(60)
    s.close()
    assert not thread.is_alive()
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.jobs()


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


def test_every_access_is_in_the_verified_audit_chain(
    store: ResultStore, ledger: Ledger, dirs: tuple[Path, Path], clock: FakeClock
) -> None:
    store.put_results("job-1", "auth-1", 5, make_rows(4), operator="alice")
    store.put_results("job-2", "auth-2", 1, make_rows(2), operator="alice")
    store.read_results("job-1", operator="bob", purpose="locate")
    store.read_results("job-1", operator="erin", purpose="verify address")
    store.export_results("job-1", dirs[1] / "e.csv", operator="carol", purpose="visit")
    store.purge_job("job-1", operator="dave", reason="done")
    clock.advance(DAY)
    store.purge_expired()

    log1 = store.access_log("job-1")
    assert [e["kind"] for e in log1] == [
        "results_stored",
        "results_read",
        "results_read",
        "results_exported",
        "results_purged",
    ]
    assert [(e.get("operator"), e.get("purpose")) for e in log1[1:4]] == [
        ("bob", "locate"),
        ("erin", "verify address"),
        ("carol", "visit"),
    ]
    assert all(e["count"] == 4 for e in log1)
    assert [e["kind"] for e in store.access_log("job-2")] == ["results_stored", "results_purged"]
    everything = store.access_log()
    assert len(everything) == 7 and {e["kind"] for e in everything} <= AUDIT_KINDS
    seqs = [e["seq"] for e in everything]
    assert seqs == sorted(seqs)

    check = ledger.verify_audit_chain()
    assert check.ok, check.detail
    # Content never enters the audit chain.
    for entry in ledger.audit_entries():
        assert STREET not in str(entry.payload) and "q-0000" not in str(entry.payload)


def test_access_log_is_per_store(
    dirs: tuple[Path, Path], key: bytes, ledger: Ledger, clock: FakeClock
) -> None:
    ledger.audit("unrelated", {"job_id": "job-1"})
    with (
        ResultStore(dirs[0] / "a.sqlite", key, ledger, clock=clock) as a,
        ResultStore(dirs[0] / "b.sqlite", key, ledger, clock=clock) as b,
    ):
        a.put_results("job-1", "auth-1", 1, make_rows(1), operator="alice")
        b.put_results("job-1", "auth-1", 1, make_rows(2), operator="alice")
        assert [e["count"] for e in a.access_log("job-1")] == [1]
        assert [e["count"] for e in b.access_log("job-1")] == [2]


def test_concurrent_reads_all_logged(store: ResultStore, ledger: Ledger) -> None:
    store.put_results("job-1", "auth-1", 30, make_rows(20), operator="alice")
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        try:
            for _ in range(5):
                assert len(store.read_results("job-1", operator=f"op{i}", purpose="p")) == 20
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert kinds(store, "job-1").count("results_read") == 20
    assert ledger.verify_audit_chain().ok


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_row = st.fixed_dictionaries(
    {
        "query_record_id": _text,
        "rule_id": st.sampled_from(["tin+dob", "tin+last_name", "first+last+dob+zip"]),
        "pseudonym": _text,
        "fields": st.dictionaries(_text, _text | st.none() | st.integers(), max_size=5),
    }
)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResultStore]:
    base = tmp_path_factory.mktemp("prop")
    with (
        Ledger(base / "audit.sqlite") as led,
        ResultStore(base / "results.sqlite", os.urandom(KEY_LEN), led) as s,
    ):
        yield s


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(_row, max_size=8), retention=st.integers(min_value=1, max_value=3650))
def test_property_round_trip(
    shared_store: ResultStore, rows: list[dict[str, Any]], retention: int
) -> None:
    job = f"job-{uuid.uuid4().hex}"
    assert shared_store.put_results(job, "auth-p", retention, rows, operator="alice") == len(rows)
    assert shared_store.read_results(job, operator="bob", purpose="prop") == rows
    meta = next(j for j in shared_store.jobs() if j["job_id"] == job)
    assert meta["rows"] == len(rows)
    assert meta["expires_at"] - meta["stored_at"] == pytest.approx(retention * DAY)


def test_rows_appended_in_several_batches_all_read_back(store: ResultStore, db_path: Path
                                                         ) -> None:
    """A job whose disclosures arrive in several batches (each stored as it arrives) reads
    back whole: every row is sealed under the number it is stored at, not its batch index."""
    rows = make_rows(7)
    store.put_results("job-b", "auth-1", 30, rows[:1], operator="op")
    assert store.append_results("job-b", rows[1:3], operator="op") == 2
    assert store.append_results("job-b", [], operator="op") == 0
    assert store.append_results("job-b", rows[3:], operator="op") == 4
    read = store.read_results("job-b", operator="op", purpose="check batches")
    assert [r["query_record_id"] for r in read] == [r["query_record_id"] for r in rows]
    assert STREET.encode() not in raw(db_path)
