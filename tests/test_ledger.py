"""Tests for the SQLite ledger: accounting, idempotency, concurrency, audit chain, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import random
import selectors
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.accounting.chain import (
    ZERO_HASH,
    audit_entry_hash,
    canonical_json,
    checkpoint_message,
)
from protocol.adapters.sqlite import SqliteDatabase
from protocol.adapters.sqlite_ledger import Ledger
from protocol.errors import BudgetExhausted, DisclosureCapReached, LedgerError
from tests.helpers.ledger_crash_worker import AUTHORIZATIONS, CHECKPOINT_KEY_SEED

REPO_ROOT = Path(__file__).resolve().parents[1]
NOT_AFTER = 4_102_444_800  # 2100-01-01


class FakeClock:
    """Deterministic clock so timestamps can be asserted exactly."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


@pytest.fixture
def ledger(db_path: Path) -> Iterator[Ledger]:
    with Ledger(db_path, clock=FakeClock()) as led:
        led.ensure_authorization("auth-1", max_evaluations=100, max_disclosures=3,
                                 not_after=NOT_AFTER)
        yield led


@contextmanager
def raw(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A plain second connection: what an attacker with write access to the file has."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def drop_audit_triggers(conn: sqlite3.Connection) -> None:
    """An attacker with file access can drop the append-only triggers first."""
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute("DROP TRIGGER audit_log_no_delete")


def populate(led: Ledger, sessions: int = 3, prefix: str = "s") -> None:
    for i in range(sessions):
        sid = f"{prefix}{i}"
        led.open_session("auth-1", sid, {"peer": "agency-a", "i": i})
        led.reserve("auth-1", sid, 5)
        led.record_evaluation("auth-1", sid, 5)
        led.audit("policy.note", {"i": i, "blob": b"\x00\xff"})


Verifier = Callable[[bytes, bytes], bool]


def ed25519_verifier(public: Ed25519PublicKey) -> Verifier:
    def verify(message: bytes, signature: bytes) -> bool:
        try:
            public.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    return verify


# --------------------------------------------------------------------------------------------
# Opening, schema, settings
# --------------------------------------------------------------------------------------------


def test_sqlite_settings_and_schema_version(ledger: Ledger, db_path: Path) -> None:
    conn = ledger._db.connection()
    assert conn is not None
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.isolation_level is None
    with raw(db_path) as c:
        assert c.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_unsupported_schema_version_is_refused(db_path: Path) -> None:
    Ledger(db_path).close()
    with raw(db_path) as c:
        c.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(LedgerError, match="schema version 99"):
        Ledger(db_path)


def test_closed_ledger_refuses_use(db_path: Path) -> None:
    led = Ledger(db_path)
    led.close()
    led.close()  # idempotent
    with pytest.raises(LedgerError, match="closed"):
        led.budget("x")


def test_genesis_entry_binds_ledger_id(ledger: Ledger) -> None:
    first = next(ledger.audit_entries())
    assert first.seq == 1
    assert first.kind == "ledger.created"
    assert first.prev_hash == ZERO_HASH
    assert first.payload["ledger_id"] == ledger.ledger_id


# --------------------------------------------------------------------------------------------
# Authorizations
# --------------------------------------------------------------------------------------------


def test_ensure_authorization_is_idempotent(ledger: Ledger) -> None:
    head = ledger.audit_head()
    ledger.ensure_authorization("auth-1", max_evaluations=100, max_disclosures=3,
                                not_after=NOT_AFTER)
    assert ledger.audit_head() == head  # a no-op appends nothing
    b = ledger.budget("auth-1")
    assert (b.max_evaluations, b.max_disclosures, b.reserved, b.disclosed) == (100, 3, 0, 0)


@pytest.mark.parametrize(
    "limits",
    [
        {"max_evaluations": 101, "max_disclosures": 3, "not_after": NOT_AFTER},
        {"max_evaluations": 100, "max_disclosures": 4, "not_after": NOT_AFTER},
        {"max_evaluations": 100, "max_disclosures": 3, "not_after": NOT_AFTER + 1},
    ],
)
def test_ensure_authorization_conflicting_limits(ledger: Ledger, limits: dict[str, int]) -> None:
    with pytest.raises(LedgerError, match="different limits"):
        ledger.ensure_authorization("auth-1", **limits)
    assert ledger.budget("auth-1").max_evaluations == 100


def test_invalid_arguments(ledger: Ledger) -> None:
    with pytest.raises(ValueError):
        ledger.ensure_authorization("a", max_evaluations=-1, max_disclosures=1, not_after=1)
    with pytest.raises(ValueError):
        ledger.reserve("auth-1", "s", -3)
    with pytest.raises(ValueError):
        ledger.reserve("auth-1", "", 3)
    with pytest.raises(LedgerError, match="unknown authorization"):
        ledger.reserve("nope", "s", 1)
    with pytest.raises(LedgerError, match="unknown authorization"):
        ledger.budget("nope")


def test_limits_are_immutable_even_via_raw_sql(ledger: Ledger, db_path: Path) -> None:
    with raw(db_path) as c, pytest.raises(sqlite3.IntegrityError, match="immutable"):
        c.execute("UPDATE authorizations SET max_evaluations = 1000000")
    ledger.reserve("auth-1", "s", 10)
    with raw(db_path) as c, pytest.raises(sqlite3.IntegrityError, match="never decrease"):
        c.execute("UPDATE authorizations SET reserved_total = 0")
    with raw(db_path) as c, pytest.raises(sqlite3.IntegrityError, match="never refunded"):
        c.execute("UPDATE sessions SET reserved = 0")
    assert ledger.budget("auth-1").reserved == 10


# --------------------------------------------------------------------------------------------
# Budget: reserve and evaluate
# --------------------------------------------------------------------------------------------


def test_reserve_evaluate_disclose_accounting(ledger: Ledger) -> None:
    ledger.open_session("auth-1", "s1", {"peer": "agency-a"})
    r = ledger.reserve("auth-1", "s1", 40)
    assert (r.auth_id, r.session_id, r.reserved, r.evaluated, r.remaining) == (
        "auth-1",
        "s1",
        40,
        0,
        40,
    )
    assert ledger.record_evaluation("auth-1", "s1", 15) == 15
    assert ledger.record_evaluation("auth-1", "s1", 25) == 40
    d = ledger.record_disclosure("auth-1", "s1", "rec-7", "tin+dob")
    assert (d.record_id, d.rule_id, d.session_id, d.repeat) == ("rec-7", "tin+dob", "s1", False)
    b = ledger.budget("auth-1")
    assert (b.max_evaluations, b.reserved, b.evaluated, b.remaining) == (100, 40, 40, 60)
    assert (b.max_disclosures, b.disclosed) == (3, 1)
    r = ledger.reservation("s1")
    assert r is not None
    assert (r.reserved, r.evaluated, r.remaining) == (40, 40, 0)
    assert ledger.reservation("never") is None
    kinds = [e.kind for e in ledger.audit_entries()]
    assert kinds == [
        "ledger.created",
        "authorization.registered",
        "session.opened",
        "budget.reserved",
        "budget.evaluated",
        "budget.evaluated",
        "disclosure.batch",
    ]


def test_reserve_is_idempotent_per_session(ledger: Ledger) -> None:
    first = ledger.reserve("auth-1", "s1", 30)
    head = ledger.audit_head()
    again = ledger.reserve("auth-1", "s1", 30)
    assert again == first
    assert ledger.budget("auth-1").reserved == 30  # charged once
    assert ledger.audit_head() == head
    with pytest.raises(LedgerError, match="already reserved 30"):
        ledger.reserve("auth-1", "s1", 31)
    assert ledger.budget("auth-1").reserved == 30


def test_reserve_creates_session_and_open_session_attaches_meta(ledger: Ledger) -> None:
    ledger.reserve("auth-1", "s1", 5)
    ledger.open_session("auth-1", "s1", {"peer": "agency-a"})
    ledger.open_session("auth-1", "s1", {"peer": "agency-a"})  # idempotent
    with pytest.raises(LedgerError, match="different metadata"):
        ledger.open_session("auth-1", "s1", {"peer": "someone-else"})
    sessions = ledger.export("auth-1")["sessions"]
    assert [(s["session_id"], s["meta"], s["reserved"]) for s in sessions] == [
        ("s1", {"peer": "agency-a"}, 5)
    ]


def test_session_ids_cannot_cross_authorizations(ledger: Ledger) -> None:
    ledger.ensure_authorization("auth-2", max_evaluations=10, max_disclosures=1,
                                not_after=NOT_AFTER)
    ledger.open_session("auth-1", "s1", {})
    with pytest.raises(LedgerError, match="another authorization"):
        ledger.open_session("auth-2", "s1", {})
    with pytest.raises(LedgerError, match="another authorization"):
        ledger.reserve("auth-2", "s1", 1)
    assert ledger.budget("auth-2").reserved == 0


def test_budget_exhausted_across_many_sessions(ledger: Ledger) -> None:
    for i in range(9):
        ledger.reserve("auth-1", f"s{i}", 11)  # 99 reserved
    with pytest.raises(BudgetExhausted) as info:
        ledger.reserve("auth-1", "s9", 2)
    assert "requested 2" in str(info.value)
    assert "remaining 1" in str(info.value)
    assert info.value.code == "budget_exhausted"
    assert ledger.reservation("s9") is None  # nothing recorded for the refused session
    ledger.reserve("auth-1", "s10", 1)
    with pytest.raises(BudgetExhausted, match="remaining 0"):
        ledger.reserve("auth-1", "s11", 1)
    assert ledger.budget("auth-1").remaining == 0


def test_reservations_are_never_refunded(ledger: Ledger) -> None:
    """Disconnect + reconnect (close, new session) must not return budget."""
    ledger.reserve("auth-1", "s1", 80)
    ledger.record_evaluation("auth-1", "s1", 3)  # requester evaluated little, then left
    ledger.close_session("auth-1", "s1", b"receipt", b"sig")
    b = ledger.budget("auth-1")
    assert (b.reserved, b.evaluated, b.remaining) == (80, 3, 20)
    with pytest.raises(BudgetExhausted):
        ledger.reserve("auth-1", "s2", 21)


def test_budget_survives_restart(db_path: Path) -> None:
    with Ledger(db_path) as led:
        led.ensure_authorization("auth-1", max_evaluations=50, max_disclosures=2,
                                 not_after=NOT_AFTER)
        led.reserve("auth-1", "s1", 30)
        led.record_evaluation("auth-1", "s1", 30)
        led.record_disclosure("auth-1", "s1", "r1", "tin+dob")
    with Ledger(db_path) as led:
        led.ensure_authorization("auth-1", max_evaluations=50, max_disclosures=2,
                                 not_after=NOT_AFTER)
        b = led.budget("auth-1")
        assert (b.reserved, b.evaluated, b.remaining, b.disclosed) == (30, 30, 20, 1)
        assert led.reserve("auth-1", "s1", 30).reserved == 30  # idempotent across restarts
        with pytest.raises(BudgetExhausted, match="requested 21 queries, remaining 20"):
            led.reserve("auth-1", "s2", 21)
        led.reserve("auth-1", "s2", 20)
    with Ledger(db_path) as led:
        assert led.budget("auth-1").remaining == 0
        with pytest.raises(BudgetExhausted):
            led.reserve("auth-1", "s3", 1)
        assert led.verify_audit_chain().ok


def test_record_evaluation_over_reservation_records_nothing(ledger: Ledger) -> None:
    ledger.reserve("auth-1", "s1", 10)
    ledger.record_evaluation("auth-1", "s1", 7)
    head = ledger.audit_head()
    with pytest.raises(BudgetExhausted, match="requested 4 evaluations, remaining 3"):
        ledger.record_evaluation("auth-1", "s1", 4)
    assert ledger.audit_head() == head
    r = ledger.reservation("s1")
    assert r is not None
    assert r.evaluated == 7
    assert ledger.budget("auth-1").evaluated == 7
    assert ledger.record_evaluation("auth-1", "s1", 3) == 10
    assert ledger.record_evaluation("auth-1", "s1", 0) == 10


def test_record_evaluation_needs_a_reservation(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="unknown session"):
        ledger.record_evaluation("auth-1", "ghost", 1)
    ledger.open_session("auth-1", "s1", {})
    with pytest.raises(LedgerError, match="no reservation"):
        ledger.record_evaluation("auth-1", "s1", 1)


def test_closed_session_takes_no_more_work(ledger: Ledger) -> None:
    ledger.reserve("auth-1", "s1", 10)
    ledger.close_session("auth-1", "s1", b"r", b"sig")
    with pytest.raises(LedgerError, match="closed"):
        ledger.record_evaluation("auth-1", "s1", 1)
    with pytest.raises(LedgerError, match="closed"):
        ledger.record_disclosure("auth-1", "s1", "rec", "tin+dob")
    ledger.open_session("auth-1", "s2", {})
    ledger.close_session("auth-1", "s2", b"r2", b"sig2")
    with pytest.raises(LedgerError, match="closed"):
        ledger.reserve("auth-1", "s2", 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_evaluations=st.integers(min_value=0, max_value=60),
    requests=st.lists(st.integers(min_value=0, max_value=25), max_size=12),
)
def test_reserve_matches_a_greedy_model(
    tmp_path_factory: pytest.TempPathFactory, max_evaluations: int, requests: list[int]
) -> None:
    """Each request is granted iff it fits what is left; totals never exceed the budget."""
    path = tmp_path_factory.mktemp("prop") / "l.sqlite"
    with Ledger(path) as led:
        led.ensure_authorization("a", max_evaluations=max_evaluations, max_disclosures=0,
                                 not_after=1)
        left = max_evaluations
        for i, n in enumerate(requests):
            if n <= left:
                assert led.reserve("a", f"s{i}", n).reserved == n
                left -= n
            else:
                with pytest.raises(BudgetExhausted):
                    led.reserve("a", f"s{i}", n)
            assert led.budget("a").remaining == left
        assert led.budget("a").reserved == max_evaluations - left <= max_evaluations
        assert led.verify_audit_chain().ok


# --------------------------------------------------------------------------------------------
# Disclosures
# --------------------------------------------------------------------------------------------


def test_disclosure_cap_and_idempotent_repeats(ledger: Ledger) -> None:
    ledger.reserve("auth-1", "s1", 10)
    rows = [ledger.record_disclosure("auth-1", "s1", f"r{i}", "tin+dob") for i in range(3)]
    assert [r.repeat for r in rows] == [False, False, False]
    with pytest.raises(DisclosureCapReached) as info:
        ledger.record_disclosure("auth-1", "s1", "r3", "tin+dob")
    assert "3" in str(info.value)
    assert info.value.code == "disclosure_cap_reached"
    # A repeat does not consume the cap, so it succeeds even when the cap is reached, from any
    # session, and returns the original row.
    ledger.reserve("auth-1", "s2", 1)
    again = ledger.record_disclosure("auth-1", "s2", "r1", "tin+last_name")
    assert again.repeat is True
    assert (again.session_id, again.rule_id, again.disclosed_at) == (
        "s1",
        "tin+dob",
        rows[1].disclosed_at,
    )
    assert ledger.budget("auth-1").disclosed == 3
    assert [d.record_id for d in ledger.disclosures("auth-1")] == ["r0", "r1", "r2"]
    batches = [e.payload for e in ledger.audit_entries() if e.kind == "disclosure.batch"]
    assert sum(p["recorded"] for p in batches) == 3
    assert sum(p["repeated"] for p in batches) == 1


def test_disclosure_needs_known_session_of_same_authorization(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="unknown session"):
        ledger.record_disclosure("auth-1", "ghost", "r", "tin+dob")
    ledger.ensure_authorization("auth-2", max_evaluations=1, max_disclosures=1, not_after=NOT_AFTER)
    ledger.open_session("auth-2", "s2", {})
    with pytest.raises(LedgerError, match="another authorization"):
        ledger.record_disclosure("auth-1", "s2", "r", "tin+dob")
    assert ledger.disclosures() == []


def test_disclosures_are_per_authorization(ledger: Ledger) -> None:
    ledger.ensure_authorization("auth-2", max_evaluations=1, max_disclosures=1, not_after=NOT_AFTER)
    ledger.open_session("auth-1", "s1", {})
    ledger.open_session("auth-2", "s2", {})
    ledger.record_disclosure("auth-1", "s1", "same-record", "tin+dob")
    second = ledger.record_disclosure("auth-2", "s2", "same-record", "tin+dob")
    assert second.repeat is False  # idempotency key is (auth_id, record_id)
    assert [d.auth_id for d in ledger.disclosures()] == ["auth-1", "auth-2"]
    assert [d.auth_id for d in ledger.disclosures("auth-2")] == ["auth-2"]
    with pytest.raises(DisclosureCapReached):
        ledger.record_disclosure("auth-2", "s2", "other", "tin+dob")


def test_batch_disclosures_are_all_or_nothing(ledger: Ledger) -> None:
    ledger.open_session("auth-1", "s1", {})
    ledger.record_disclosure("auth-1", "s1", "r0", "tin+dob")
    head = ledger.audit_head()
    with pytest.raises(DisclosureCapReached):
        ledger.record_disclosures(
            "auth-1", "s1", [("r1", "tin+dob"), ("r2", "tin+dob"), ("r3", "tin+dob")]
        )
    assert ledger.audit_head() == head
    assert ledger.budget("auth-1").disclosed == 1
    rows = ledger.record_disclosures(
        "auth-1", "s1", [("r0", "tin+dob"), ("r1", "tin+dob"), ("r1", "tin+dob"), ("r2", "x")]
    )
    assert [(r.record_id, r.repeat) for r in rows] == [
        ("r0", True),
        ("r1", False),
        ("r1", True),
        ("r2", False),
    ]
    assert ledger.budget("auth-1").disclosed == 3


def test_disclosure_rows_are_append_only(ledger: Ledger, db_path: Path) -> None:
    ledger.open_session("auth-1", "s1", {})
    ledger.record_disclosure("auth-1", "s1", "r0", "tin+dob")
    with raw(db_path) as c:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            c.execute("DELETE FROM disclosures")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            c.execute("UPDATE disclosures SET record_id = 'other'")
    assert len(ledger.disclosures()) == 1


def test_injected_clock_stamps_rows(db_path: Path) -> None:
    clock = FakeClock(start=1000.0)
    with Ledger(db_path, clock=clock) as led:
        led.ensure_authorization("a", max_evaluations=1, max_disclosures=1, not_after=NOT_AFTER)
        led.open_session("a", "s", {})
        row = led.record_disclosure("a", "s", "r", "tin+dob")
        assert row.disclosed_at == clock.now
        assert led.disclosures("a")[0].disclosed_at == clock.now
        assert led.audit_head()[0] == 4
        assert [e.at for e in led.audit_entries()] == [1001.0, 1002.0, 1003.0, 1004.0]


# --------------------------------------------------------------------------------------------
# Sessions and receipts
# --------------------------------------------------------------------------------------------


def test_receipts_and_countersignatures(ledger: Ledger) -> None:
    ledger.open_session("auth-1", "s1", {"peer": "agency-a"})
    ledger.reserve("auth-1", "s1", 2)
    ledger.close_session("auth-1", "s1", b"receipt-1", b"csig-1")
    ledger.close_session("auth-1", "s1", b"receipt-1", b"csig-1")  # idempotent
    with pytest.raises(LedgerError, match="another receipt"):
        ledger.close_session("auth-1", "s1", b"receipt-X", b"csig-1")
    ledger.add_countersignature("s1", b"rsig-1")
    ledger.add_countersignature("s1", b"rsig-1")  # idempotent
    with pytest.raises(LedgerError, match="different countersignature"):
        ledger.add_countersignature("s1", b"rsig-2")
    ledger.open_session("auth-1", "s2", {})
    ledger.close_session("auth-1", "s2", b"receipt-2", b"csig-2", b"rsig-2")
    with pytest.raises(LedgerError, match="not closed"):
        ledger.open_session("auth-1", "s3", {})
        ledger.add_countersignature("s3", b"x")
    with pytest.raises(LedgerError, match="unknown session"):
        ledger.close_session("auth-1", "ghost", b"r", b"s")
    receipts = ledger.receipts("auth-1")
    assert [
        (r.session_id, r.receipt, r.custodian_signature, r.requester_signature) for r in receipts
    ] == [("s1", b"receipt-1", b"csig-1", b"rsig-1"), ("s2", b"receipt-2", b"csig-2", b"rsig-2")]
    closed = [e for e in ledger.audit_entries() if e.kind == "session.closed"]
    assert closed[0].payload["custodian_signature"] == b"csig-1".hex()
    assert closed[0].payload["reserved"] == 2


def test_export_is_json_and_complete(ledger: Ledger) -> None:
    populate(ledger, sessions=2)
    ledger.record_disclosure("auth-1", "s0", "rec-1", "tin+dob")
    ledger.close_session("auth-1", "s0", b"\x01receipt", b"\x02sig")
    key = Ed25519PrivateKey.generate()
    ledger.add_checkpoint(key.sign, "k1")
    exported = ledger.export("auth-1")
    round_tripped = json.loads(json.dumps(exported))
    assert round_tripped == exported
    assert exported["budget"] == {
        "max_evaluations": 100,
        "reserved": 10,
        "evaluated": 10,
        "remaining": 90,
        "max_disclosures": 3,
        "disclosed": 1,
    }
    assert [d["record_id"] for d in exported["disclosures"]] == ["rec-1"]
    assert exported["receipts"][0]["receipt"] == b"\x01receipt".hex()
    seq, head = ledger.audit_head()
    assert exported["audit_head"] == {"seq": seq, "hash": head.hex()}
    assert exported["checkpoints"][0]["key_id"] == "k1"
    assert exported["ledger_id"] == ledger.ledger_id
    with pytest.raises(LedgerError):
        ledger.export("nope")


# --------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------


def _hammer(reserve, errors: list[BaseException], granted: list[int], tid: int) -> None:
    rng = random.Random(tid)
    for i in range(40):
        n = rng.randint(1, 7)
        try:
            reserve(f"t{tid}-{i}", n)
            granted.append(n)
        except BudgetExhausted:
            pass
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)


def test_parallel_reservations_on_one_ledger_never_overspend(ledger: Ledger) -> None:
    ledger.ensure_authorization("par", max_evaluations=500, max_disclosures=0, not_after=NOT_AFTER)
    errors: list[BaseException] = []
    granted: list[int] = []
    threads = [
        threading.Thread(
            target=_hammer,
            args=(lambda s, n: ledger.reserve("par", s, n), errors, granted, t),
        )
        for t in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    b = ledger.budget("par")
    assert b.reserved == sum(granted) <= 500
    assert b.remaining < 7  # 8x40 requests of up to 7 outstrip 500, so it ran (nearly) dry
    assert ledger.verify_audit_chain().ok


def test_parallel_reservations_across_connections_never_overspend(db_path: Path) -> None:
    with Ledger(db_path) as setup:
        setup.ensure_authorization("par", max_evaluations=300, max_disclosures=0, not_after=1)
    ledgers = [Ledger(db_path) for _ in range(8)]
    errors: list[BaseException] = []
    granted: list[int] = []
    try:
        threads = [
            threading.Thread(
                target=_hammer,
                args=(lambda s, n, led=led: led.reserve("par", s, n), errors, granted, t),
            )
            for t, led in enumerate(ledgers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for led in ledgers:
            led.close()
    assert errors == []
    with Ledger(db_path) as led:
        assert led.budget("par").reserved == sum(granted) <= 300
        audit_n = sum(1 for e in led.audit_entries() if e.kind == "budget.reserved")
        assert audit_n == len(granted)
        assert led.verify_audit_chain().ok


# --------------------------------------------------------------------------------------------
# Audit chain
# --------------------------------------------------------------------------------------------


def _independent_hash(prev: bytes, seq: int, at: float, kind: str, payload: dict) -> bytes:
    """The entry hash re-implemented from the spec, to pin the format."""
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    parts = [
        b"gated-psi/audit-entry/v1",
        prev,
        seq.to_bytes(8, "big"),
        struct.pack(">d", at),
        kind.encode(),
        body.encode(),
    ]
    return hashlib.sha256(b"".join(len(p).to_bytes(8, "big") + p for p in parts)).digest()


def test_audit_chain_verifies_and_matches_spec(ledger: Ledger) -> None:
    populate(ledger)
    entry = ledger.audit("refusal", {"reason": "weak_rule", "name": "Zoë", "n": 3})
    assert entry.payload == {"reason": "weak_rule", "name": "Zoë", "n": 3}
    entries = list(ledger.audit_entries())
    prev = ZERO_HASH
    for i, e in enumerate(entries, start=1):
        assert e.seq == i
        assert e.prev_hash == prev
        assert e.entry_hash == _independent_hash(prev, e.seq, e.at, e.kind, dict(e.payload))
        prev = e.entry_hash
    assert ledger.audit_head() == (entries[-1].seq, entries[-1].entry_hash)
    result = ledger.verify_audit_chain()
    assert result.ok
    assert result.first_bad_seq is None
    assert result.entries == len(entries)
    assert result.head == entries[-1].entry_hash
    assert [e.seq for e in ledger.audit_entries(start=5)] == list(range(5, len(entries) + 1))


def test_canonical_json_rules() -> None:
    assert canonical_json({"b": 1, "a": [b"\x01\x02", ("x",)], "é": None}) == (
        '{"a":["0102",["x"]],"b":1,"é":null}'
    )
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    with pytest.raises(TypeError):
        canonical_json({1: "non-str key"})
    with pytest.raises(TypeError):
        canonical_json({"x": object()})


def test_bad_audit_payload_rolls_back(ledger: Ledger) -> None:
    head = ledger.audit_head()
    with pytest.raises(TypeError):
        ledger.audit("x", {"x": {1, 2}})
    assert ledger.audit_head() == head


def test_audit_log_is_append_only_via_sql(ledger: Ledger, db_path: Path) -> None:
    with raw(db_path) as c:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            c.execute("UPDATE audit_log SET kind = 'x' WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            c.execute("DELETE FROM audit_log WHERE seq = 1")


def test_tamper_edit_payload_detected(ledger: Ledger, db_path: Path) -> None:
    populate(ledger)
    with raw(db_path) as c:
        drop_audit_triggers(c)
        c.execute("""UPDATE audit_log SET payload = '{"i":9}' WHERE seq = 6""")
    result = ledger.verify_audit_chain()
    assert not result.ok
    assert result.first_bad_seq == 6
    assert "does not match its hash" in result.detail
    assert result.entries == 5
    assert result.head == list(ledger.audit_entries())[4].entry_hash


def test_tamper_edit_timestamp_detected(ledger: Ledger, db_path: Path) -> None:
    populate(ledger)
    with raw(db_path) as c:
        drop_audit_triggers(c)
        c.execute("UPDATE audit_log SET at = at + 0.5 WHERE seq = 4")
    assert ledger.verify_audit_chain().first_bad_seq == 4


def test_tamper_delete_row_detected(ledger: Ledger, db_path: Path) -> None:
    populate(ledger)
    with raw(db_path) as c:
        drop_audit_triggers(c)
        c.execute("DELETE FROM audit_log WHERE seq = 7")
    result = ledger.verify_audit_chain()
    assert (result.ok, result.first_bad_seq) == (False, 7)
    assert "missing" in result.detail


def test_tamper_delete_first_row_detected(ledger: Ledger, db_path: Path) -> None:
    populate(ledger)
    with raw(db_path) as c:
        drop_audit_triggers(c)
        c.execute("DELETE FROM audit_log WHERE seq = 1")
    assert ledger.verify_audit_chain().first_bad_seq == 1


def test_tamper_insert_forged_row_detected(ledger: Ledger, db_path: Path) -> None:
    populate(ledger)
    head_seq, head = ledger.audit_head()
    with raw(db_path) as c:
        c.execute(
            "INSERT INTO audit_log (seq, at, kind, payload, prev_hash, entry_hash) "
            "VALUES (?, 0, 'disclosure.recorded', '{}', ?, ?)",
            (head_seq + 1, os.urandom(32), os.urandom(32)),
        )
    result = ledger.verify_audit_chain()
    assert (result.ok, result.first_bad_seq) == (False, head_seq + 1)
    assert result.head == head


def test_tamper_well_forged_insert_in_middle_detected_at_next(
    ledger: Ledger, db_path: Path
) -> None:
    """A forger who links and hashes correctly still breaks the entry that follows."""
    populate(ledger)
    entries = list(ledger.audit_entries())
    k = 5
    prev = entries[k - 1].entry_hash
    forged_payload = '{"auth_id":"auth-1","record_id":"planted"}'
    forged_hash = audit_entry_hash(prev, k + 1, 1.0, "disclosure.recorded", forged_payload)
    with raw(db_path) as c:
        drop_audit_triggers(c)
        c.execute("UPDATE audit_log SET seq = seq + 1000000 WHERE seq > ?", (k,))
        c.execute("UPDATE audit_log SET seq = seq - 999999 WHERE seq > 1000000")
        c.execute(
            "INSERT INTO audit_log VALUES (?, 1.0, 'disclosure.recorded', ?, ?, ?)",
            (k + 1, forged_payload, prev, forged_hash),
        )
    result = ledger.verify_audit_chain()
    assert (result.ok, result.first_bad_seq) == (False, k + 2)
    assert "prev_hash" in result.detail


def test_tamper_swap_rows_detected(ledger: Ledger, db_path: Path) -> None:
    populate(ledger)
    cols = "at, kind, payload, prev_hash, entry_hash"
    with raw(db_path) as c:
        drop_audit_triggers(c)
        a = c.execute(f"SELECT {cols} FROM audit_log WHERE seq = 4").fetchone()
        b = c.execute(f"SELECT {cols} FROM audit_log WHERE seq = 8").fetchone()
        setter = "UPDATE audit_log SET at=?, kind=?, payload=?, prev_hash=?, entry_hash=? "
        c.execute(setter + "WHERE seq = 4", b)
        c.execute(setter + "WHERE seq = 8", a)
    result = ledger.verify_audit_chain()
    assert (result.ok, result.first_bad_seq) == (False, 4)


def test_tamper_swap_payloads_only_detected(ledger: Ledger, db_path: Path) -> None:
    populate(ledger)
    with raw(db_path) as c:
        drop_audit_triggers(c)
        p3 = c.execute("SELECT payload FROM audit_log WHERE seq = 3").fetchone()[0]
        p9 = c.execute("SELECT payload FROM audit_log WHERE seq = 9").fetchone()[0]
        c.execute("UPDATE audit_log SET payload = ? WHERE seq = 3", (p9,))
        c.execute("UPDATE audit_log SET payload = ? WHERE seq = 9", (p3,))
    assert ledger.verify_audit_chain().first_bad_seq == 3


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def test_checkpoints_verify_with_ed25519(ledger: Ledger) -> None:
    key = Ed25519PrivateKey.generate()
    verify = ed25519_verifier(key.public_key())
    populate(ledger, 2)
    seq, head = ledger.audit_head()
    cp = ledger.add_checkpoint(key.sign, "authority-1")
    assert (cp.seq, cp.head, cp.key_id) == (seq, head, "authority-1")
    key.public_key().verify(cp.signature, checkpoint_message(seq, head))
    assert checkpoint_message(seq, head) == (
        b"gated-psi/audit-checkpoint/v1" + seq.to_bytes(8, "big") + head
    )
    last = list(ledger.audit_entries())[-1]
    assert last.kind == "audit.checkpoint"
    assert last.payload["seq"] == seq
    populate(ledger, 1, prefix="late")
    ledger.add_checkpoint(key.sign, "authority-1")
    assert len(ledger.checkpoints()) == 2
    assert ledger.verify_checkpoints(verify) is True
    other = ed25519_verifier(Ed25519PrivateKey.generate().public_key())
    assert ledger.verify_checkpoints(other) is False
    assert ledger.verify_audit_chain().ok


def test_checkpoints_fail_after_tampering(ledger: Ledger, db_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    verify = ed25519_verifier(key.public_key())
    populate(ledger)
    ledger.add_checkpoint(key.sign, "k")
    assert ledger.verify_checkpoints(verify)
    with raw(db_path) as c:
        drop_audit_triggers(c)
        c.execute("""UPDATE audit_log SET payload = '{"i":42}' WHERE seq = 5""")
    assert ledger.verify_checkpoints(verify) is False


def test_checkpoint_catches_wholesale_chain_rewrite(ledger: Ledger, db_path: Path) -> None:
    """Rehashing every entry fools verify_audit_chain but not a signed checkpoint."""
    key = Ed25519PrivateKey.generate()
    verify = ed25519_verifier(key.public_key())
    populate(ledger)
    ledger.add_checkpoint(key.sign, "k")
    with raw(db_path) as c:
        drop_audit_triggers(c)
        c.execute("""UPDATE audit_log SET payload = '{"i":42}' WHERE seq = 5""")
        rows = c.execute("SELECT seq, at, kind, payload FROM audit_log ORDER BY seq").fetchall()
        prev = ZERO_HASH
        for seq, at, kind, payload in rows:
            h = audit_entry_hash(prev, seq, at, kind, payload)
            c.execute(
                "UPDATE audit_log SET prev_hash = ?, entry_hash = ? WHERE seq = ?", (prev, h, seq)
            )
            prev = h
    assert ledger.verify_audit_chain().ok  # the chain alone cannot tell
    assert ledger.verify_checkpoints(verify) is False


def test_checkpoint_catches_truncation(ledger: Ledger, db_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    populate(ledger)
    cp = ledger.add_checkpoint(key.sign, "k")
    with raw(db_path) as c:
        drop_audit_triggers(c)
        c.execute("DELETE FROM audit_log WHERE seq >= ?", (cp.seq - 1,))
    assert ledger.verify_audit_chain().ok  # a clean prefix is still a valid chain
    assert ledger.verify_checkpoints(ed25519_verifier(key.public_key())) is False


def test_verify_checkpoints_treats_verifier_exceptions_as_invalid(ledger: Ledger) -> None:
    key = Ed25519PrivateKey.generate()
    ledger.add_checkpoint(key.sign, "k")

    def raising(message: bytes, signature: bytes) -> bool:
        key.public_key().verify(b"wrong" + signature, message)
        return True

    assert ledger.verify_checkpoints(raising) is False


# --------------------------------------------------------------------------------------------
# Crash safety with real processes
# --------------------------------------------------------------------------------------------

CRASH_ITERATIONS = 12


def _spawn_worker(db: Path, seed: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.ledger_crash_worker", str(db), str(seed)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _committed_lines(output: str) -> list[list[str]]:
    """Complete lines only: a line cut off by the kill reports nothing."""
    lines = output.split("\n")
    return [line.split() for line in lines[:-1] if line]


class _Reported:
    """What the workers said they committed, per authorization."""

    def __init__(self) -> None:
        self.reserved: dict[str, int] = {}
        self.evaluated: dict[str, int] = {}
        self.disclosed: set[str] = set()
        self.closed: set[str] = set()


def _check_recovered_ledger(
    led: Ledger, reported: dict[str, _Reported], checkpoints: set[int], verify: Verifier
) -> None:
    for auth_id, (max_evaluations, max_disclosures) in AUTHORIZATIONS.items():
        budget = led.budget(auth_id)
        assert budget.reserved <= max_evaluations
        assert budget.evaluated <= budget.reserved
        assert budget.disclosed <= max_disclosures
        exported = led.export(auth_id)
        sessions = {s["session_id"]: s for s in exported["sessions"]}
        # Counters agree with the rows they summarise: no half-applied transaction.
        assert sum(s["reserved"] or 0 for s in sessions.values()) == budget.reserved
        assert sum(s["evaluated"] for s in sessions.values()) == budget.evaluated
        rows = led.disclosures(auth_id)
        record_ids = {r.record_id for r in rows}
        assert len(rows) == budget.disclosed == len(record_ids)
        # Everything a worker reported as committed survived the kill.
        mine = reported[auth_id]
        for sid, n in mine.reserved.items():
            assert sessions[sid]["reserved"] == n
        for sid, total in mine.evaluated.items():
            assert sessions[sid]["evaluated"] >= total
        assert mine.disclosed <= record_ids
        assert mine.closed <= {r.session_id for r in led.receipts(auth_id)}
    assert checkpoints <= {cp.seq for cp in led.checkpoints()}
    chain = led.verify_audit_chain()
    assert chain.ok, chain.detail
    assert led.verify_checkpoints(verify)
    # Every accounting change has its audit entry (they share one transaction).
    kinds: dict[str, int] = {}
    for e in led.audit_entries():
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    recorded = sum(e.payload["recorded"] for e in led.audit_entries()
                   if e.kind == "disclosure.batch")
    assert recorded == len(led.disclosures())
    assert led.verify_disclosures() is None  # every row matches its batch's digest
    assert kinds.get("audit.checkpoint", 0) == len(led.checkpoints())


@pytest.mark.slow
def test_sigkill_never_loses_or_double_spends(tmp_path: Path) -> None:
    db = tmp_path / "crash.sqlite"
    rng = random.Random(20250101)
    reported = {auth_id: _Reported() for auth_id in AUTHORIZATIONS}
    checkpoints: set[int] = set()
    refusals = {"budget": 0, "cap": 0}
    verify = ed25519_verifier(
        Ed25519PrivateKey.from_private_bytes(CHECKPOINT_KEY_SEED).public_key()
    )
    # Two processes share the file, so cross-process locking is under test as well. The next
    # pair is spawned (and imports) while the current pair runs; "GO" lets it touch the file.
    pending = [_spawn_worker(db, k) for k in range(2)]
    spawned = list(pending)
    try:
        actions = _crash_rounds(db, rng, pending, spawned, reported, checkpoints, refusals, verify)
    finally:
        for w in spawned:
            if w.poll() is None:
                w.kill()
                w.communicate()
    assert actions > 100, "workers did too little work for the test to mean anything"
    assert refusals["budget"] > 0, "the small budget was never exhausted"
    assert refusals["cap"] > 0, "the small disclosure cap was never reached"
    assert reported["crash-large"].reserved, "no reservations committed on the large budget"


def _crash_rounds(
    db: Path,
    rng: random.Random,
    pending: list[subprocess.Popen[str]],
    spawned: list[subprocess.Popen[str]],
    reported: dict[str, _Reported],
    checkpoints: set[int],
    refusals: dict[str, int],
    verify: Verifier,
) -> int:
    actions = 0
    for iteration in range(CRASH_ITERATIONS):
        workers = pending
        pending = []
        if iteration + 1 < CRASH_ITERATIONS:
            pending = [_spawn_worker(db, (iteration + 1) * 2 + k) for k in range(2)]
            spawned.extend(pending)
        seen = ["", ""]
        for w in workers:
            assert w.stdin is not None
            assert w.stdout is not None
            warm = w.stdout.readline()
            assert warm == "WARM\n", f"worker failed to import (run {iteration}): {warm!r}"
            _send(w, "GO")
        if iteration < 2:
            # Kill during start-up too: schema creation, first registrations.
            for w in workers:
                _send(w, "RUN")
            time.sleep(rng.uniform(0.0, 0.03))
        else:
            for w in workers:
                assert w.stdout is not None
                first = w.stdout.readline()
                if first != "READY\n":
                    w.kill()
                    _, err = w.communicate(timeout=10)
                    pytest.fail(f"worker did not start (run {iteration}): {first!r}\n{err}")
            for w in workers:
                _send(w, "RUN")
            # Kill at a random point of the action stream rather than after a random time, so
            # the amount of work per run does not depend on how loaded the machine is.
            seen = _read_actions(workers, rng.randint(10, 150))
            time.sleep(rng.uniform(0.0, 0.02))
        outputs = []
        for w, before in zip(workers, seen, strict=True):
            w.send_signal(signal.SIGKILL)
            out, err = w.communicate(timeout=10)
            assert w.returncode == -signal.SIGKILL, (
                f"worker exited by itself (run {iteration}):\n{err}"
            )
            outputs.append(before + out)
        for out in outputs:
            for parts in _committed_lines(out):
                if parts in (["WARM"], ["READY"]):
                    continue
                actions += 1
                match parts:
                    case ["RESERVE", auth_id, sid, n]:
                        reported[auth_id].reserved[sid] = int(n)
                    case ["EVAL", auth_id, sid, total]:
                        reported[auth_id].evaluated[sid] = int(total)
                    case ["DISCLOSE", auth_id, _sid, record_id, _repeat]:
                        reported[auth_id].disclosed.add(record_id)
                    case ["CLOSE", auth_id, sid]:
                        reported[auth_id].closed.add(sid)
                    case ["CHECKPOINT", seq]:
                        checkpoints.add(int(seq))
                    case ["REFUSED", kind, *_]:
                        refusals[kind] += 1

        with raw(db) as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        with Ledger(db) as led:
            registered = {a for a in AUTHORIZATIONS if _is_registered(led, a)}
            if registered != set(AUTHORIZATIONS):
                # Only a kill during start-up may leave an authorization unregistered.
                assert iteration < 2 and actions == 0, (iteration, registered, actions)
                continue
            try:
                _check_recovered_ledger(led, reported, checkpoints, verify)
            except AssertionError as exc:
                raise AssertionError(f"after kill {iteration}: {exc}") from exc
    return actions


def _read_actions(workers: list[subprocess.Popen[str]], count: int) -> list[str]:
    """Collect output until the workers together reported ``count`` more lines (or died).

    Both pipes are read, so a worker starved of the write lock by the other does not stall
    the test. Reading the raw fds is safe because the staged start-up (WARM/GO/READY/RUN)
    leaves nothing buffered in the text wrappers after the READY line.
    """
    chunks: dict[int, list[bytes]] = {}
    with selectors.DefaultSelector() as sel:
        for i, w in enumerate(workers):
            assert w.stdout is not None
            sel.register(w.stdout.fileno(), selectors.EVENT_READ, i)
            chunks[i] = []
        lines = 0
        while lines < count and sel.get_map():
            ready = sel.select(timeout=10)
            if not ready:
                break  # a hung worker; the kill and the checks below still run
            for key, _ in ready:
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    continue
                chunks[key.data].append(data)
                lines += data.count(b"\n")
    return [b"".join(chunks[i]).decode() for i in range(len(workers))]


def _send(worker: subprocess.Popen[str], line: str) -> None:
    assert worker.stdin is not None
    worker.stdin.write(line + "\n")
    worker.stdin.flush()


def _is_registered(led: Ledger, auth_id: str) -> bool:
    try:
        led.budget(auth_id)
    except LedgerError:
        return False
    return True


def test_open_retries_while_another_process_recovers_the_file(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite answers "database is locked" at once (no busy wait) while another process
    runs WAL recovery after a crash; opening retries instead of failing (this was the
    intermittent failure of the SIGKILL test), and gives up with a clear error."""
    real_open = SqliteDatabase._open
    failures = iter([True, True, False])

    def flaky_open(self: SqliteDatabase, timeout_ms: int) -> None:
        if next(failures):
            raise sqlite3.OperationalError("database is locked")
        real_open(self, timeout_ms)

    monkeypatch.setattr(SqliteDatabase, "_open", flaky_open)
    with Ledger(db_path) as led:
        assert led.verify_audit_chain().ok

    def locked(self: SqliteDatabase, timeout_ms: int) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(SqliteDatabase, "_open", locked)
    monkeypatch.setattr("protocol.adapters.sqlite.BUSY_TIMEOUT_MS", 50)
    with pytest.raises(LedgerError, match="stayed locked"):
        Ledger(db_path)

    def broken(self: SqliteDatabase, timeout_ms: int) -> None:
        raise sqlite3.OperationalError("no such table: nonsense")

    monkeypatch.setattr(SqliteDatabase, "_open", broken)
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        Ledger(db_path)  # not a lock: no retry, the real error
