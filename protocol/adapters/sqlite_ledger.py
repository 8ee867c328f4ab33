"""The SQLite ledger: one implementation of the ledger port (:mod:`protocol.accounting.port`).

What a ledger accounts for (budget, disclosures, the audit chain) and the rules it applies are
defined in the accounting layer; this adapter stores them durably (docs/architecture.md,
Accounting):

* Storage is SQLite in WAL mode with ``synchronous=FULL``; every mutating method is exactly
  one ``BEGIN IMMEDIATE ... COMMIT`` transaction (``protocol.adapters.sqlite``), so a SIGKILL
  at any instant leaves either all of a method's effects (its audit entries included) or
  none.
* Disclosure rows are committed *before* the caller releases any field, one transaction per
  batch so the fsync cost stays off the per-match path at scale.
* The append-only tables (audit log, disclosures, checkpoints) are protected by triggers, and
  the budget limits by CHECK constraints, so even a bug in this module cannot rewrite history
  or overspend; someone with raw write access to the file can, which is what the audit chain
  and signed checkpoints detect. These constraints are defence in depth: the decisions are
  the policy gate's and the rules' (:mod:`protocol.accounting.rules`).

The three concerns are three private classes: :class:`_Schema` (creating and checking the
file), :class:`_AuditTables` (the hash chain and checkpoints) and :class:`_AccountTables`
(authorizations, sessions, budget and disclosures); :class:`Ledger` opens the file and
exposes them as the port.
"""

from __future__ import annotations

import hmac
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

from protocol.accounting import chain
from protocol.accounting.chain import (
    DISCLOSURE_BATCH,
    DISCLOSURE_RECORDED,
    ZERO_HASH,
    AuditEntry,
    AuditVerification,
    Checkpoint,
    DisclosureAccount,
    StoredEntry,
    canonical_json,
)
from protocol.accounting.export import ledger_document
from protocol.accounting.port import (
    AggregateReleaseRow,
    AuthorizationRow,
    Budget,
    DisclosureRow,
    ReceiptRow,
    Reservation,
    SessionRow,
    TagSetFetchRow,
    check_evaluated_store,
    check_tagset_fetch,
)
from protocol.accounting.rules import (
    DISCLOSURE_REPEATED,
    check_evaluation,
    check_limits_unchanged,
    check_reserve,
    plan_disclosures,
    require_count,
    require_id,
    require_unix_time,
)
from protocol.adapters.sqlite import SqliteDatabase, split_sql
from protocol.errors import LedgerError

__all__ = ["SCHEMA_VERSION", "Ledger"]

SCHEMA_VERSION = 1
_PAGE = 1000
#: Lowest possible seq: verification reads every stored row, even a forged one below 1.
_FIRST_SEQ = -(2**63)
#: Record ids per "IN (...)" lookup: under SQLite's historical 999-variable limit.
_IN_LIST = 500


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE schema_version (
    version     INTEGER NOT NULL,
    applied_at  REAL NOT NULL
);
CREATE TABLE ledger_info (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE authorizations (
    auth_id          TEXT PRIMARY KEY,
    max_evaluations      INTEGER NOT NULL CHECK (max_evaluations >= 0),
    max_disclosures  INTEGER NOT NULL CHECK (max_disclosures >= 0),
    not_after        INTEGER NOT NULL,
    registered_at    REAL NOT NULL,
    reserved_total   INTEGER NOT NULL DEFAULT 0
        CHECK (reserved_total >= 0 AND reserved_total <= max_evaluations),
    evaluated_total  INTEGER NOT NULL DEFAULT 0
        CHECK (evaluated_total >= 0 AND evaluated_total <= reserved_total),
    disclosed_total  INTEGER NOT NULL DEFAULT 0
        CHECK (disclosed_total >= 0 AND disclosed_total <= max_disclosures)
);
CREATE TABLE sessions (
    session_id           TEXT PRIMARY KEY,
    auth_id              TEXT NOT NULL REFERENCES authorizations(auth_id),
    meta                 TEXT,
    opened_at            REAL NOT NULL,
    reserved             INTEGER CHECK (reserved IS NULL OR reserved >= 0),
    evaluated            INTEGER NOT NULL DEFAULT 0
        CHECK (evaluated >= 0 AND evaluated <= COALESCE(reserved, 0)),
    closed_at            REAL,
    receipt              BLOB,
    custodian_signature  BLOB,
    requester_signature  BLOB
);
CREATE INDEX sessions_by_auth ON sessions(auth_id);
CREATE TABLE disclosures (
    id            INTEGER PRIMARY KEY,
    auth_id       TEXT NOT NULL REFERENCES authorizations(auth_id),
    session_id    TEXT NOT NULL REFERENCES sessions(session_id),
    record_id     TEXT NOT NULL,
    rule_id       TEXT NOT NULL,
    disclosed_at  REAL NOT NULL,
    audit_seq     INTEGER NOT NULL,
    UNIQUE (auth_id, record_id)
);
CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY,
    at          REAL NOT NULL,
    kind        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    prev_hash   BLOB NOT NULL,
    entry_hash  BLOB NOT NULL
);
CREATE TABLE checkpoints (
    id          INTEGER PRIMARY KEY,
    seq         INTEGER NOT NULL,
    head        BLOB NOT NULL,
    key_id      TEXT NOT NULL,
    signature   BLOB NOT NULL,
    created_at  REAL NOT NULL
);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER disclosures_no_update BEFORE UPDATE ON disclosures
BEGIN SELECT RAISE(ABORT, 'disclosures are append-only'); END;
CREATE TRIGGER disclosures_no_delete BEFORE DELETE ON disclosures
BEGIN SELECT RAISE(ABORT, 'disclosures are append-only'); END;
CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
CREATE TRIGGER authorizations_limits_fixed
BEFORE UPDATE OF auth_id, max_evaluations, max_disclosures, not_after ON authorizations
WHEN NEW.auth_id IS NOT OLD.auth_id OR NEW.max_evaluations IS NOT OLD.max_evaluations
  OR NEW.max_disclosures IS NOT OLD.max_disclosures OR NEW.not_after IS NOT OLD.not_after
BEGIN SELECT RAISE(ABORT, 'authorization limits are immutable'); END;
CREATE TRIGGER authorizations_no_refund
BEFORE UPDATE OF reserved_total, evaluated_total, disclosed_total ON authorizations
WHEN NEW.reserved_total < OLD.reserved_total OR NEW.evaluated_total < OLD.evaluated_total
  OR NEW.disclosed_total < OLD.disclosed_total
BEGIN SELECT RAISE(ABORT, 'budget counters never decrease'); END;
CREATE TRIGGER authorizations_no_delete BEFORE DELETE ON authorizations
BEGIN SELECT RAISE(ABORT, 'authorizations are never deleted'); END;
CREATE TRIGGER sessions_no_refund BEFORE UPDATE OF reserved, evaluated ON sessions
WHEN COALESCE(NEW.reserved, 0) < COALESCE(OLD.reserved, 0) OR NEW.evaluated < OLD.evaluated
BEGIN SELECT RAISE(ABORT, 'reservations are never refunded'); END;
CREATE TRIGGER sessions_no_delete BEFORE DELETE ON sessions
BEGIN SELECT RAISE(ABORT, 'sessions are never deleted'); END;
"""

#: Indexes added after version 1 shipped: created on every open (``IF NOT EXISTS``), so older
#: files gain them; they change no table, so older code still opens the file.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS disclosures_by_session ON disclosures(session_id)",
)

#: Tables added after version 1 shipped, created on every open like ``_INDEXES``: older files
#: gain them and older code, which never reads them, still opens the file.  One row per
#: released aggregate sum (docs/architecture.md, Aggregate and cardinality tiers).
_ADDED_TABLES = (
    """CREATE TABLE IF NOT EXISTS aggregate_releases (
    id            INTEGER PRIMARY KEY,
    auth_id       TEXT NOT NULL REFERENCES authorizations(auth_id),
    requester_id  TEXT NOT NULL,
    session_id    TEXT NOT NULL UNIQUE REFERENCES sessions(session_id),
    contributing  BLOB NOT NULL,
    released_at   REAL NOT NULL,
    audit_seq     INTEGER NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS aggregate_releases_by_requester "
    "ON aggregate_releases(requester_id)",
    "CREATE TRIGGER IF NOT EXISTS aggregate_releases_no_update BEFORE UPDATE ON "
    "aggregate_releases BEGIN SELECT RAISE(ABORT, 'aggregate releases are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS aggregate_releases_no_delete BEFORE DELETE ON "
    "aggregate_releases BEGIN SELECT RAISE(ABORT, 'aggregate releases are append-only'); END",
    # Epoch mode (docs/architecture.md, National custodian): the blinded elements each
    # session had evaluated, which its disclosures are bound to (at most its reservation),
    # and the accounted fetches of an epoch's tag set.
    """CREATE TABLE IF NOT EXISTS evaluated_elements (
    session_id  TEXT NOT NULL REFERENCES sessions(session_id),
    seq         INTEGER NOT NULL CHECK (seq >= 0),
    elements    BLOB NOT NULL,
    count       INTEGER NOT NULL CHECK (count > 0),
    PRIMARY KEY (session_id, seq)
)""",
    """CREATE TABLE IF NOT EXISTS tagset_fetches (
    id            INTEGER PRIMARY KEY,
    auth_id       TEXT NOT NULL REFERENCES authorizations(auth_id),
    requester_id  TEXT NOT NULL,
    epoch_id      TEXT NOT NULL,
    rules         TEXT NOT NULL,
    bytes_sent    INTEGER NOT NULL CHECK (bytes_sent >= 0),
    fetched_at    REAL NOT NULL,
    audit_seq     INTEGER NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS tagset_fetches_by_auth ON tagset_fetches(auth_id, epoch_id)",
    "CREATE TRIGGER IF NOT EXISTS tagset_fetches_no_update BEFORE UPDATE ON tagset_fetches "
    "BEGIN SELECT RAISE(ABORT, 'tag-set fetches are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS tagset_fetches_no_delete BEFORE DELETE ON tagset_fetches "
    "BEGIN SELECT RAISE(ABORT, 'tag-set fetches are append-only'); END",
    # Replayed disclosures, one row each, under their batch's audit entry (docs/architecture.md,
    # Accounting); ledgers written before batch entries audited each replay as its own entry.
    """CREATE TABLE IF NOT EXISTS disclosure_repeats (
    id                INTEGER PRIMARY KEY,
    auth_id           TEXT NOT NULL REFERENCES authorizations(auth_id),
    session_id        TEXT NOT NULL REFERENCES sessions(session_id),
    record_id         TEXT NOT NULL,
    rule_id           TEXT NOT NULL,
    first_session_id  TEXT NOT NULL,
    repeated_at       REAL NOT NULL,
    audit_seq         INTEGER NOT NULL
)""",
    "CREATE TRIGGER IF NOT EXISTS disclosure_repeats_no_update BEFORE UPDATE ON "
    "disclosure_repeats BEGIN SELECT RAISE(ABORT, 'disclosures are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS disclosure_repeats_no_delete BEFORE DELETE ON "
    "disclosure_repeats BEGIN SELECT RAISE(ABORT, 'disclosures are append-only'); END",
)


class _Schema:
    """Creates a new ledger file, or checks an existing one's version."""

    @staticmethod
    def initialize(db: SqliteDatabase, clock: Callable[[], float], audit: _AuditTables) -> None:
        with _write(db) as conn:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if exists:
                row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
                if row is None or row[0] != SCHEMA_VERSION:
                    found = None if row is None else row[0]
                    raise LedgerError(
                        f"ledger schema version {found} is not supported "
                        f"(this code knows version {SCHEMA_VERSION})"
                    )
            else:
                now = float(clock())
                for statement in split_sql(_SCHEMA):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (SCHEMA_VERSION, now),
                )
                ledger_id = uuid.uuid4().hex
                conn.execute(
                    "INSERT INTO ledger_info (key, value) VALUES ('ledger_id', ?)", (ledger_id,)
                )
                audit.append(
                    conn, now, "ledger.created",
                    {"ledger_id": ledger_id, "schema_version": SCHEMA_VERSION},
                )
            for statement in (*_INDEXES, *_ADDED_TABLES):
                conn.execute(statement)

    @staticmethod
    def configure(conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerError(f"ledger needs WAL journal mode, SQLite gave {mode!r}")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")


@contextmanager
def _write(db: SqliteDatabase) -> Iterator[sqlite3.Connection]:
    """A write transaction whose constraint violations surface as :class:`LedgerError`."""
    try:
        with db.write() as conn:
            yield conn
    except sqlite3.IntegrityError as exc:
        raise LedgerError(f"ledger constraint violated: {exc}") from exc


# --------------------------------------------------------------------------------------------
# The audit chain
# --------------------------------------------------------------------------------------------


class _AuditTables:
    """The ``audit_log`` and ``checkpoints`` tables; hashing is :mod:`protocol.accounting.chain`."""

    def __init__(self, db: SqliteDatabase, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    @staticmethod
    def head(conn: sqlite3.Connection) -> tuple[int, bytes]:
        row = conn.execute(
            "SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return (0, ZERO_HASH) if row is None else (row[0], bytes(row[1]))

    def append(
        self, conn: sqlite3.Connection, at: float, kind: str, payload: Mapping[str, Any]
    ) -> AuditEntry:
        """Append one entry inside the caller's write transaction."""
        return self.append_many(conn, at, [(kind, payload)])[0]

    def append_many(
        self,
        conn: sqlite3.Connection,
        at: float,
        entries: Sequence[tuple[str, Mapping[str, Any]]],
    ) -> list[AuditEntry]:
        """Append entries, chained in order, inside the caller's write transaction.

        The head is read once and the rows go in with one ``executemany``: a disclosure
        batch writes one entry per record, so this is on the per-match path.
        """
        if not entries:
            return []
        linked = chain.chain_entries(self.head(conn), at, entries)
        conn.executemany(
            "INSERT INTO audit_log (seq, at, kind, payload, prev_hash, entry_hash) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(e.seq, e.at, e.kind, text, e.prev_hash, e.entry_hash) for e, text in linked],
        )
        return [e for e, _ in linked]

    def audit(self, kind: str, payload: Mapping[str, Any]) -> AuditEntry:
        require_id("kind", kind)
        with _write(self._db) as conn:
            return self.append(conn, float(self._clock()), kind, payload)

    def stored(self, start: int) -> Iterator[StoredEntry]:
        """Stored rows in seq order, paged so a long read does not block writers."""
        cursor = start
        while True:
            with self._db.read() as conn:
                rows = conn.execute(
                    "SELECT seq, at, kind, payload, prev_hash, entry_hash FROM audit_log "
                    "WHERE seq >= ? ORDER BY seq LIMIT ?",
                    (cursor, _PAGE),
                ).fetchall()
            for seq, at, kind, payload, prev, entry_hash in rows:
                yield StoredEntry(seq, at, kind, payload, bytes(prev), bytes(entry_hash))
            if len(rows) < _PAGE:
                return
            cursor = rows[-1][0] + 1

    def entries(self, start: int) -> Iterator[AuditEntry]:
        for e in self.stored(start):
            try:
                parsed = json.loads(str(e.payload))
            except json.JSONDecodeError as exc:
                raise LedgerError(f"audit entry {e.seq} has an unreadable payload") from exc
            # Stored as found: verification, not parsing, judges the column types.
            yield AuditEntry(e.seq, cast(float, e.at), cast(str, e.kind), parsed, e.prev_hash,
                             e.entry_hash)

    def audit_head(self) -> tuple[int, bytes]:
        with self._db.read() as conn:
            return self.head(conn)

    def add_checkpoint(self, sign: Callable[[bytes], bytes], key_id: str) -> Checkpoint:
        require_id("key_id", key_id)
        with _write(self._db) as conn:
            seq, head = self.head(conn)
            signature = bytes(sign(chain.checkpoint_message(seq, head)))
            now = float(self._clock())
            conn.execute(
                "INSERT INTO checkpoints (seq, head, key_id, signature, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (seq, head, key_id, signature, now),
            )
            self.append(
                conn, now, "audit.checkpoint",
                {"seq": seq, "head": head, "key_id": key_id, "signature": signature},
            )
            return Checkpoint(seq, head, key_id, signature, now)

    def checkpoints(self) -> list[Checkpoint]:
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT seq, head, key_id, signature, created_at FROM checkpoints ORDER BY id"
            ).fetchall()
        return [Checkpoint(r[0], bytes(r[1]), r[2], bytes(r[3]), r[4]) for r in rows]

    def repeats(self, auth_id: str | None) -> list[tuple[int, DisclosureRow]]:
        """Replayed disclosures (audited, not counted) with their entry's seq: rows under
        batch entries, and the per-replay entries of ledgers written before them."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT seq, at, payload FROM audit_log WHERE kind = ? ORDER BY seq",
                (DISCLOSURE_REPEATED,),
            ).fetchall()
            batched = conn.execute(
                "SELECT audit_seq, auth_id, session_id, record_id, rule_id, repeated_at "
                "FROM disclosure_repeats" + (" WHERE auth_id = ?" if auth_id else "")
                + " ORDER BY id", (auth_id,) if auth_id else ()).fetchall()
        out: list[tuple[int, DisclosureRow]] = []
        for seq, at, payload in rows:
            p = json.loads(payload)
            if auth_id is None or p["auth_id"] == auth_id:
                out.append((seq, DisclosureRow(p["auth_id"], p["session_id"], p["record_id"],
                                               p["rule_id"], at, True)))
        out += [(seq, DisclosureRow(aid, sid, rid, rule, at, True))
                for seq, aid, sid, rid, rule, at in batched]
        return out

    def accounts(self) -> Iterator[DisclosureAccount]:
        """Every disclosure row (first and repeated) in ``audit_seq`` order, as stored."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT audit_seq, ?, auth_id, session_id, record_id, rule_id, '', disclosed_at "
                "FROM disclosures UNION ALL "
                "SELECT audit_seq, ?, auth_id, session_id, record_id, rule_id, first_session_id, "
                "repeated_at FROM disclosure_repeats ORDER BY 1",
                (DISCLOSURE_RECORDED, DISCLOSURE_REPEATED)).fetchall()
        for row in rows:
            yield DisclosureAccount(*row)


# --------------------------------------------------------------------------------------------
# Authorizations, sessions, budget and disclosures
# --------------------------------------------------------------------------------------------


class _AccountTables:
    """The accounting tables, changed only under the shared rules, each change audited."""

    def __init__(
        self, db: SqliteDatabase, clock: Callable[[], float], audit: _AuditTables
    ) -> None:
        self._db = db
        self._clock = clock
        self._audit = audit

    # -- authorizations ------------------------------------------------------------------------

    def ensure_authorization(
        self, auth_id: str, max_evaluations: int, max_disclosures: int, not_after: int
    ) -> None:
        limits = (max_evaluations, max_disclosures, not_after)
        with _write(self._db) as conn:
            row = conn.execute(
                "SELECT max_evaluations, max_disclosures, not_after FROM authorizations "
                "WHERE auth_id = ?",
                (auth_id,),
            ).fetchone()
            if row is not None:
                check_limits_unchanged(auth_id, tuple(row), limits)
                return
            now = float(self._clock())
            conn.execute(
                "INSERT INTO authorizations "
                "(auth_id, max_evaluations, max_disclosures, not_after, registered_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (auth_id, *limits, now),
            )
            self._audit.append(conn, now, "authorization.registered", {
                "auth_id": auth_id, "max_evaluations": max_evaluations,
                "max_disclosures": max_disclosures, "not_after": not_after,
            })

    @staticmethod
    def budget(conn: sqlite3.Connection, auth_id: str) -> Budget:
        row = conn.execute(
            "SELECT max_evaluations, reserved_total, evaluated_total, max_disclosures, "
            "disclosed_total FROM authorizations WHERE auth_id = ?",
            (auth_id,),
        ).fetchone()
        if row is None:
            raise LedgerError(f"unknown authorization {auth_id!r}")
        max_q, reserved, evaluated, max_d, disclosed = row
        return Budget(max_evaluations=max_q, reserved=reserved, evaluated=evaluated,
                      remaining=max_q - reserved, max_disclosures=max_d, disclosed=disclosed)

    def authorization(self, auth_id: str) -> AuthorizationRow:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT max_evaluations, max_disclosures, not_after, registered_at "
                "FROM authorizations WHERE auth_id = ?",
                (auth_id,),
            ).fetchone()
        if row is None:
            raise LedgerError(f"unknown authorization {auth_id!r}")
        return AuthorizationRow(auth_id, *row)

    # -- sessions and budget -------------------------------------------------------------------

    def open_session(self, auth_id: str, session_id: str, meta_json: str) -> None:
        with _write(self._db) as conn:
            if not conn.execute(
                "SELECT 1 FROM authorizations WHERE auth_id = ?", (auth_id,)
            ).fetchone():
                raise LedgerError(f"unknown authorization {auth_id!r}")
            row = _session_row(conn, session_id)
            now = float(self._clock())
            if row is None:
                conn.execute(
                    "INSERT INTO sessions (session_id, auth_id, meta, opened_at) "
                    "VALUES (?, ?, ?, ?)",
                    (session_id, auth_id, meta_json, now),
                )
            else:
                _require_session_auth(row, auth_id, session_id)
                if row["meta"] is not None:
                    if row["meta"] != meta_json:
                        raise LedgerError(
                            f"session {session_id!r} already opened with different metadata"
                        )
                    return
                # Created earlier by reserve(); attach the metadata now.
                conn.execute(
                    "UPDATE sessions SET meta = ? WHERE session_id = ?", (meta_json, session_id)
                )
            self._audit.append(conn, now, "session.opened", {
                "auth_id": auth_id, "session_id": session_id, "meta": json.loads(meta_json),
            })

    def reserve(self, auth_id: str, session_id: str, n: int) -> Reservation:
        with _write(self._db) as conn:
            budget = self.budget(conn, auth_id)
            row = _session_row(conn, session_id)
            if row is not None:
                _require_session_auth(row, auth_id, session_id)
                if row["reserved"] is not None:
                    if row["reserved"] != n:
                        raise LedgerError(
                            f"session {session_id!r} already reserved {row['reserved']}, not {n}"
                        )
                    return _reservation(row)
                if row["closed_at"] is not None:
                    raise LedgerError(f"session {session_id!r} is closed")
            check_reserve(auth_id, budget, n)
            now = float(self._clock())
            if row is None:
                conn.execute(
                    "INSERT INTO sessions (session_id, auth_id, opened_at, reserved) "
                    "VALUES (?, ?, ?, ?)",
                    (session_id, auth_id, now, n),
                )
            else:
                conn.execute(
                    "UPDATE sessions SET reserved = ? WHERE session_id = ?", (n, session_id)
                )
            conn.execute(
                "UPDATE authorizations SET reserved_total = reserved_total + ? WHERE auth_id = ?",
                (n, auth_id),
            )
            self._audit.append(conn, now, "budget.reserved", {
                "auth_id": auth_id, "session_id": session_id, "n": n,
                "reserved_total": budget.reserved + n, "remaining": budget.remaining - n,
            })
            return _reservation(_session_row(conn, session_id))

    def reservation(self, session_id: str) -> Reservation | None:
        with self._db.read() as conn:
            row = _session_row(conn, session_id)
        if row is None or row["reserved"] is None:
            return None
        return _reservation(row)

    def record_evaluation(self, auth_id: str, session_id: str, n: int) -> int:
        with _write(self._db) as conn:
            row = _open_session_row(conn, auth_id, session_id)
            if row["reserved"] is None:
                raise LedgerError(f"session {session_id!r} has no reservation")
            reserved, evaluated = row["reserved"], row["evaluated"]
            check_evaluation(session_id, reserved, evaluated, n)
            if n == 0:
                return int(evaluated)
            conn.execute(
                "UPDATE sessions SET evaluated = evaluated + ? WHERE session_id = ?",
                (n, session_id),
            )
            conn.execute(
                "UPDATE authorizations SET evaluated_total = evaluated_total + ? WHERE auth_id = ?",
                (n, auth_id),
            )
            self._audit.append(conn, float(self._clock()), "budget.evaluated", {
                "auth_id": auth_id, "session_id": session_id, "n": n, "evaluated": evaluated + n,
            })
            return int(evaluated + n)

    def close_session(
        self, auth_id: str, session_id: str, receipt: bytes, custodian_signature: bytes,
        requester_signature: bytes | None,
    ) -> None:
        with _write(self._db) as conn:
            row = _session_row(conn, session_id)
            if row is None:
                raise LedgerError(f"unknown session {session_id!r}")
            _require_session_auth(row, auth_id, session_id)
            if row["closed_at"] is not None:
                same = _same_bytes(row["receipt"], receipt) and _same_bytes(
                    row["custodian_signature"], custodian_signature
                )
                if not same:
                    raise LedgerError(f"session {session_id!r} already closed with another receipt")
                if requester_signature is not None:
                    self._countersign(conn, row, requester_signature)
                return
            now = float(self._clock())
            conn.execute(
                "UPDATE sessions SET closed_at = ?, receipt = ?, custodian_signature = ?, "
                "requester_signature = ? WHERE session_id = ?",
                (now, receipt, custodian_signature, requester_signature, session_id),
            )
            # Epoch mode: a closed session discloses nothing more, so the blinded elements
            # its disclosures were bound to go with the close, in the same transaction.
            conn.execute("DELETE FROM evaluated_elements WHERE session_id = ?", (session_id,))
            self._audit.append(conn, now, "session.closed", {
                "auth_id": auth_id, "session_id": session_id,
                "receipt_sha256": chain.receipt_digest(receipt),
                "custodian_signature": custodian_signature,
                "requester_signature": requester_signature,
                "reserved": row["reserved"], "evaluated": row["evaluated"],
            })

    def add_countersignature(self, session_id: str, requester_signature: bytes) -> None:
        with _write(self._db) as conn:
            row = _session_row(conn, session_id)
            if row is None:
                raise LedgerError(f"unknown session {session_id!r}")
            if row["closed_at"] is None:
                raise LedgerError(f"session {session_id!r} is not closed yet")
            self._countersign(conn, row, requester_signature)

    def _countersign(self, conn: sqlite3.Connection, row: sqlite3.Row, signature: bytes) -> None:
        existing = row["requester_signature"]
        if existing is not None:
            if not _same_bytes(existing, signature):
                raise LedgerError(
                    f"session {row['session_id']!r} already has a different countersignature"
                )
            return
        conn.execute(
            "UPDATE sessions SET requester_signature = ? WHERE session_id = ?",
            (signature, row["session_id"]),
        )
        self._audit.append(conn, float(self._clock()), "session.countersigned", {
            "auth_id": row["auth_id"], "session_id": row["session_id"],
            "requester_signature": signature,
        })

    def sessions(self, auth_id: str) -> list[SessionRow]:
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT auth_id, session_id, meta, opened_at, reserved, evaluated, closed_at "
                "FROM sessions WHERE auth_id = ? ORDER BY opened_at, rowid",
                (auth_id,),
            ).fetchall()
        return [SessionRow(r[0], r[1], None if r[2] is None else json.loads(r[2]), *r[3:])
                for r in rows]

    def receipts(self, auth_id: str) -> list[ReceiptRow]:
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT auth_id, session_id, receipt, custodian_signature, requester_signature, "
                "closed_at FROM sessions WHERE auth_id = ? AND closed_at IS NOT NULL "
                "ORDER BY closed_at, rowid",
                (auth_id,),
            ).fetchall()
        return [
            ReceiptRow(auth_id=r[0], session_id=r[1], receipt=bytes(r[2]),
                       custodian_signature=bytes(r[3]),
                       requester_signature=None if r[4] is None else bytes(r[4]),
                       closed_at=r[5])
            for r in rows
        ]

    # -- disclosures ---------------------------------------------------------------------------

    def record_disclosures(
        self, auth_id: str, session_id: str, items: Sequence[tuple[str, str]]
    ) -> list[DisclosureRow]:
        with _write(self._db) as conn:
            budget = self.budget(conn, auth_id)
            _open_session_row(conn, auth_id, session_id)
            first: dict[str, DisclosureRow] = {}
            distinct = list(dict.fromkeys(record_id for record_id, _ in items))
            for a in range(0, len(distinct), _IN_LIST):
                part = distinct[a:a + _IN_LIST]
                for rid, sid, rule, at in conn.execute(
                    "SELECT record_id, session_id, rule_id, disclosed_at FROM disclosures "
                    f"WHERE auth_id = ? AND record_id IN ({','.join('?' * len(part))})",
                    (auth_id, *part),
                ):
                    first[rid] = DisclosureRow(auth_id, sid, rid, rule, at, False)
            now = float(self._clock())
            plan = plan_disclosures(auth_id, session_id, items, first, budget, now)
            if not plan.entries:
                return plan.rows
            # One audit entry per batch, committing to the digest of its rows, which go in
            # with it in this transaction (docs/architecture.md, Accounting).
            payload, accounts = chain.disclosure_batch(auth_id, session_id, now, plan.entries)
            seq = self._audit.append(conn, now, DISCLOSURE_BATCH, payload).seq
            conn.executemany(
                "INSERT INTO disclosures "
                "(auth_id, session_id, record_id, rule_id, disclosed_at, audit_seq) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(r.auth_id, r.session_id, r.record_id, r.rule_id, r.disclosed_at, seq)
                 for r, _ in plan.new],
            )
            repeats = [a for a in accounts if a.kind == DISCLOSURE_REPEATED]
            if repeats:
                conn.executemany(
                    "INSERT INTO disclosure_repeats (auth_id, session_id, record_id, rule_id, "
                    "first_session_id, repeated_at, audit_seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(a.auth_id, a.session_id, a.record_id, a.rule_id, a.first_session_id,
                      a.at, seq) for a in repeats],
                )
            if plan.disclosed != budget.disclosed:
                conn.execute(
                    "UPDATE authorizations SET disclosed_total = ? WHERE auth_id = ?",
                    (plan.disclosed, auth_id),
                )
            return plan.rows

    def disclosures(self, auth_id: str | None, include_repeats: bool) -> list[DisclosureRow]:
        sql = ("SELECT audit_seq, auth_id, session_id, record_id, rule_id, disclosed_at "
               "FROM disclosures")
        args: tuple[str, ...] = ()
        if auth_id is not None:
            sql += " WHERE auth_id = ?"
            args = (auth_id,)
        with self._db.read() as conn:
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
            first = [(seq, DisclosureRow(aid, sid, rid, rule, at, False))
                     for seq, aid, sid, rid, rule, at in rows]
            if not include_repeats:
                return [row for _, row in first]
            both = first + self._audit.repeats(auth_id)
        return [row for _, row in sorted(both, key=lambda pair: pair[0])]

    def disclosed_count(self, auth_id: str, session_id: str) -> int:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM disclosures WHERE session_id = ? AND auth_id = ?",
                (session_id, auth_id),
            ).fetchone()
        return int(row[0])


def _release_rows(conn: sqlite3.Connection, requester_id: str) -> list[AggregateReleaseRow]:
    rows = conn.execute(
        "SELECT auth_id, requester_id, session_id, contributing, released_at, audit_seq "
        "FROM aggregate_releases WHERE requester_id = ? ORDER BY id", (requester_id,),
    ).fetchall()
    return [AggregateReleaseRow(a, r, s, bytes(c), at, seq) for a, r, s, c, at, seq in rows]


def _session_row(conn: sqlite3.Connection, session_id: str) -> sqlite3.Row | None:
    cur = conn.execute("SELECT * FROM sessions WHERE session_id = ?", (session_id,))
    cur.row_factory = sqlite3.Row
    row: sqlite3.Row | None = cur.fetchone()
    return row


def _open_session_row(conn: sqlite3.Connection, auth_id: str, session_id: str) -> sqlite3.Row:
    """The row of a known, not yet closed session of this authorization."""
    row = _session_row(conn, session_id)
    if row is None:
        raise LedgerError(f"unknown session {session_id!r}")
    _require_session_auth(row, auth_id, session_id)
    if row["closed_at"] is not None:
        raise LedgerError(f"session {session_id!r} is closed")
    return row


def _require_session_auth(row: sqlite3.Row, auth_id: str, session_id: str) -> None:
    if row["auth_id"] != auth_id:
        raise LedgerError(f"session {session_id!r} belongs to another authorization")


def _reservation(row: sqlite3.Row | None) -> Reservation:
    if row is None or row["reserved"] is None:
        raise LedgerError("session has no reservation")
    return Reservation(auth_id=row["auth_id"], session_id=row["session_id"],
                       reserved=row["reserved"], evaluated=row["evaluated"],
                       remaining=row["reserved"] - row["evaluated"])


def _same_bytes(stored: bytes | None, given: bytes) -> bool:
    return stored is not None and hmac.compare_digest(bytes(stored), given)


# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------


class Ledger:
    """Thread-safe handle on one ledger file; every mutation is one durable transaction.

    Implements :class:`protocol.accounting.port.LedgerPort`; the methods' contracts are
    documented there.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._db = SqliteDatabase(
            path, configure=_Schema.configure, error=LedgerError, name="ledger",
            initialize=lambda db: _Schema.initialize(db, clock, _AuditTables(db, clock)),
        )
        self._audit = _AuditTables(self._db, clock)
        self._accounts = _AccountTables(self._db, clock, self._audit)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self._db.path

    @property
    def ledger_id(self) -> str:
        with self._db.read() as conn:
            row = conn.execute("SELECT value FROM ledger_info WHERE key = 'ledger_id'").fetchone()
        if row is None:
            raise LedgerError("ledger_info has no ledger_id")
        return str(row[0])

    def now(self) -> float:
        return float(self._clock())

    @contextmanager
    def consistent_read(self) -> Iterator[None]:
        with self._db.read():
            yield

    # -- authorizations, sessions and budget ---------------------------------------------------

    def ensure_authorization(
        self, auth_id: str, *, max_evaluations: int, max_disclosures: int, not_after: int
    ) -> None:
        require_id("auth_id", auth_id)
        require_count("max_evaluations", max_evaluations)
        require_count("max_disclosures", max_disclosures)
        require_unix_time("not_after", not_after)
        self._accounts.ensure_authorization(auth_id, max_evaluations, max_disclosures, not_after)

    def budget(self, auth_id: str) -> Budget:
        with self._db.read() as conn:
            return self._accounts.budget(conn, auth_id)

    def authorization(self, auth_id: str) -> AuthorizationRow:
        return self._accounts.authorization(auth_id)

    def open_session(self, auth_id: str, session_id: str, meta: Mapping[str, Any]) -> None:
        require_id("auth_id", auth_id)
        require_id("session_id", session_id)
        self._accounts.open_session(auth_id, session_id, canonical_json(meta))

    def reserve(self, auth_id: str, session_id: str, n: int) -> Reservation:
        require_id("auth_id", auth_id)
        require_id("session_id", session_id)
        require_count("n", n)
        return self._accounts.reserve(auth_id, session_id, n)

    def reservation(self, session_id: str) -> Reservation | None:
        return self._accounts.reservation(session_id)

    def record_evaluation(self, auth_id: str, session_id: str, n: int) -> int:
        require_id("auth_id", auth_id)
        require_id("session_id", session_id)
        require_count("n", n)
        return self._accounts.record_evaluation(auth_id, session_id, n)

    def close_session(
        self,
        auth_id: str,
        session_id: str,
        receipt: bytes,
        custodian_signature: bytes,
        requester_signature: bytes | None = None,
    ) -> None:
        require_id("auth_id", auth_id)
        require_id("session_id", session_id)
        self._accounts.close_session(
            auth_id, session_id, bytes(receipt), bytes(custodian_signature),
            None if requester_signature is None else bytes(requester_signature),
        )

    def add_countersignature(self, session_id: str, requester_signature: bytes) -> None:
        require_id("session_id", session_id)
        self._accounts.add_countersignature(session_id, bytes(requester_signature))

    def sessions(self, auth_id: str) -> list[SessionRow]:
        return self._accounts.sessions(auth_id)

    def receipts(self, auth_id: str) -> list[ReceiptRow]:
        return self._accounts.receipts(auth_id)

    # -- disclosures ---------------------------------------------------------------------------

    def record_disclosure(
        self, auth_id: str, session_id: str, record_id: str, rule_id: str
    ) -> DisclosureRow:
        return self.record_disclosures(auth_id, session_id, [(record_id, rule_id)])[0]

    def record_disclosures(
        self, auth_id: str, session_id: str, items: Sequence[tuple[str, str]]
    ) -> list[DisclosureRow]:
        require_id("auth_id", auth_id)
        require_id("session_id", session_id)
        for record_id, rule_id in items:
            require_id("record_id", record_id)
            require_id("rule_id", rule_id)
        return self._accounts.record_disclosures(auth_id, session_id, items)

    def disclosures(
        self, auth_id: str | None = None, *, include_repeats: bool = False
    ) -> list[DisclosureRow]:
        return self._accounts.disclosures(auth_id, include_repeats)

    def disclosed_count(self, auth_id: str, session_id: str) -> int:
        return self._accounts.disclosed_count(auth_id, session_id)

    # -- aggregate releases ----------------------------------------------------------------------

    def record_aggregate_release(
        self, auth_id: str, session_id: str, requester_id: str, contributing: bytes,
        audit_payload: Mapping[str, Any],
        admit: Callable[[Sequence[AggregateReleaseRow]], None],
    ) -> AggregateReleaseRow:
        require_id("auth_id", auth_id)
        require_id("session_id", session_id)
        require_id("requester_id", requester_id)
        with _write(self._db) as conn:
            admit(_release_rows(conn, requester_id))
            now = float(self._clock())
            entry = self._audit.append(conn, now, "aggregate_release", audit_payload)
            conn.execute(
                "INSERT INTO aggregate_releases (auth_id, requester_id, session_id, "
                "contributing, released_at, audit_seq) VALUES (?, ?, ?, ?, ?, ?)",
                (auth_id, requester_id, session_id, bytes(contributing), now, entry.seq),
            )
        return AggregateReleaseRow(auth_id, requester_id, session_id, bytes(contributing),
                                   now, entry.seq)

    def aggregate_releases(self, requester_id: str) -> list[AggregateReleaseRow]:
        with self._db.read() as conn:
            return _release_rows(conn, requester_id)

    # -- epoch mode ------------------------------------------------------------------------------

    def store_evaluated(self, auth_id: str, session_id: str, seq: int, elements: bytes) -> None:
        require_id("auth_id", auth_id)
        require_id("session_id", session_id)
        require_count("seq", seq)
        with _write(self._db) as conn:
            row = _open_session_row(conn, auth_id, session_id)
            other = conn.execute(
                "SELECT COALESCE(SUM(count), 0) FROM evaluated_elements "
                "WHERE session_id = ? AND seq != ?", (session_id, seq)).fetchone()[0]
            n = check_evaluated_store(session_id, row["reserved"], int(other), bytes(elements))
            conn.execute(
                "INSERT OR REPLACE INTO evaluated_elements (session_id, seq, elements, count) "
                "VALUES (?, ?, ?, ?)", (session_id, seq, bytes(elements), n))

    def evaluated_elements(self, session_id: str, seq: int) -> bytes | None:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT elements FROM evaluated_elements WHERE session_id = ? AND seq = ?",
                (session_id, seq)).fetchone()
        return None if row is None else bytes(row[0])

    def record_tagset_fetch(self, auth_id: str, requester_id: str, epoch_id: str,
                            rules: Sequence[str], bytes_sent: int, cap: int) -> TagSetFetchRow:
        require_id("auth_id", auth_id)
        require_id("requester_id", requester_id)
        require_id("epoch_id", epoch_id)
        require_count("bytes_sent", bytes_sent)
        rules_t = tuple(rules)
        with _write(self._db) as conn:
            self._accounts.budget(conn, auth_id)  # LedgerError for an unknown authorization
            done = conn.execute(
                "SELECT COUNT(*) FROM tagset_fetches WHERE auth_id = ? AND epoch_id = ?",
                (auth_id, epoch_id)).fetchone()[0]
            check_tagset_fetch(auth_id, epoch_id, int(done), cap)
            now = float(self._clock())
            entry = self._audit.append(conn, now, "tagset.fetched", {
                "auth_id": auth_id, "requester_id": requester_id, "epoch_id": epoch_id,
                "rules": list(rules_t), "bytes": bytes_sent, "fetch": int(done) + 1,
            })
            conn.execute(
                "INSERT INTO tagset_fetches (auth_id, requester_id, epoch_id, rules, "
                "bytes_sent, fetched_at, audit_seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (auth_id, requester_id, epoch_id, json.dumps(list(rules_t)), bytes_sent, now,
                 entry.seq))
        return TagSetFetchRow(auth_id, requester_id, epoch_id, rules_t, bytes_sent, now,
                              entry.seq)

    def tagset_fetches(self, auth_id: str) -> list[TagSetFetchRow]:
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT auth_id, requester_id, epoch_id, rules, bytes_sent, fetched_at, "
                "audit_seq FROM tagset_fetches WHERE auth_id = ? ORDER BY id",
                (auth_id,)).fetchall()
        return [TagSetFetchRow(a, r, e, tuple(json.loads(ru)), b, at, seq)
                for a, r, e, ru, b, at, seq in rows]

    # -- audit chain ---------------------------------------------------------------------------

    def audit(self, kind: str, payload: Mapping[str, Any]) -> AuditEntry:
        return self._audit.audit(kind, payload)

    def audit_entries(self, start: int = 0) -> Iterator[AuditEntry]:
        return self._audit.entries(start)

    def stored_entries(self) -> Iterator[StoredEntry]:
        return self._audit.stored(_FIRST_SEQ)

    def audit_head(self) -> tuple[int, bytes]:
        return self._audit.audit_head()

    def add_checkpoint(self, sign: Callable[[bytes], bytes], key_id: str) -> Checkpoint:
        return self._audit.add_checkpoint(sign, key_id)

    def checkpoints(self) -> list[Checkpoint]:
        return self._audit.checkpoints()

    def verify_audit_chain(self) -> AuditVerification:
        """Re-derive every hash and check every link (see :func:`chain.verify_chain`), then
        every disclosure row against its entry (:meth:`verify_disclosures`)."""
        report = chain.verify_chain(self.stored_entries())
        if not report.ok:
            return report
        problem = self.verify_disclosures()
        if problem is None:
            return report
        return AuditVerification(False, report.entries, problem[0], problem[1], report.head)

    def disclosure_accounts(self) -> Iterator[DisclosureAccount]:
        """Every stored disclosure row, first and repeated, in ``audit_seq`` order."""
        return self._audit.accounts()

    def verify_disclosures(self) -> tuple[int, str] | None:
        """The first disclosure row that disagrees with its audit entry, as ``(seq, detail)``
        (see :func:`chain.check_disclosure_accounts`), or None."""
        return chain.check_disclosure_accounts(self.stored_entries(), self.disclosure_accounts())

    def verify_checkpoints(self, verify: Callable[[bytes, bytes], bool]) -> bool:
        """Every checkpoint verifies and matches the recomputed chain (see
        :func:`chain.checkpoints_match`)."""
        return chain.checkpoints_match(self.checkpoints(), self.stored_entries(), verify)

    # -- oversight export ----------------------------------------------------------------------

    def export(self, auth_id: str) -> dict[str, Any]:
        """Everything an oversight body needs for one authorization, as JSON-able data."""
        return ledger_document(self, auth_id)
