"""Durable ledger: persistent budget, disclosure accounting and a hash-chained audit log.

The custodian must be able to show, after the fact and to a third party, exactly how many
queries each authorization consumed and exactly which of its records were disclosed. So the
ledger is the single source of truth for three things:

* **Budget.** ``max_queries`` is a *persistent* budget per authorization. Sessions reserve part
  of it up front; reservations are never refunded, so a requester cannot regain budget by
  disconnecting. Evaluated elements are then counted against the session's reservation.
* **Disclosures.** One row per (authorization, record), written and committed *before* the
  caller releases any field ("row first, data second"), so a crash can never leave a disclosure
  unaccounted for. ``max_disclosures`` caps the number of distinct records.
* **Audit chain.** Every mutation appends an entry, in the same SQLite transaction, to a
  SHA-256 hash chain; signed checkpoints pin its head so a rewrite of the whole chain is caught.

Storage is SQLite in WAL mode with ``synchronous=FULL``: every mutating method is exactly one
``BEGIN IMMEDIATE ... COMMIT`` transaction, so a SIGKILL at any instant leaves either all of a
method's effects or none. ``BEGIN IMMEDIATE`` also serialises writers across processes sharing
the file. Within a process one connection is shared by all threads behind a re-entrant lock
(the gRPC servers are multi-threaded).

The append-only tables (audit log, disclosures, checkpoints) are protected by triggers, and the
budget limits by CHECK constraints, so even a bug in this module cannot rewrite history or
overspend; someone with raw write access to the file can, which is what the audit chain and
checkpoints detect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from protocol.errors import BudgetExhausted, DisclosureCapReached, LedgerError

__all__ = [
    "AUDIT_CHECKPOINT_TAG",
    "AUDIT_ENTRY_TAG",
    "SCHEMA_VERSION",
    "ZERO_HASH",
    "AuditEntry",
    "AuditVerification",
    "Budget",
    "Checkpoint",
    "DisclosureRow",
    "Ledger",
    "ReceiptRow",
    "Reservation",
    "audit_entry_hash",
    "canonical_json",
    "checkpoint_message",
]

SCHEMA_VERSION = 1
AUDIT_ENTRY_TAG = b"gated-psi/audit-entry/v1"
AUDIT_CHECKPOINT_TAG = b"gated-psi/audit-checkpoint/v1"
ZERO_HASH = bytes(32)
"""``prev_hash`` of the first audit entry, and the head of an empty chain."""

_RECEIPT_DIGEST_TAG = b"gated-psi/ledger-receipt-digest/v1"
_BUSY_TIMEOUT_MS = 30_000
_PAGE = 1000
#: Record ids per "IN (...)" lookup: under SQLite's historical 999-variable limit.
_IN_LIST = 500


# --------------------------------------------------------------------------------------------
# Records returned to callers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reservation:
    """A session's share of an authorization's budget.

    ``remaining`` is what *this session* may still evaluate (``reserved - evaluated``); the
    authorization-wide remainder is in :class:`Budget`.
    """

    auth_id: str
    session_id: str
    reserved: int
    evaluated: int
    remaining: int


@dataclass(frozen=True)
class Budget:
    """Authorization-wide accounting; ``remaining`` is budget not yet reserved by any session."""

    max_queries: int
    reserved: int
    evaluated: int
    remaining: int
    max_disclosures: int
    disclosed: int


@dataclass(frozen=True)
class DisclosureRow:
    """The accounting row for one disclosed record; ``repeat`` marks an idempotent replay."""

    auth_id: str
    session_id: str
    record_id: str
    rule_id: str
    disclosed_at: float
    repeat: bool


@dataclass(frozen=True)
class ReceiptRow:
    """A closed session's signed receipt, as stored for oversight."""

    auth_id: str
    session_id: str
    receipt: bytes
    custodian_signature: bytes
    requester_signature: bytes | None
    closed_at: float


@dataclass(frozen=True)
class AuditEntry:
    """One link of the audit chain; ``entry_hash`` commits to ``prev_hash`` and the content."""

    seq: int
    at: float
    kind: str
    payload: Mapping[str, Any]
    prev_hash: bytes
    entry_hash: bytes


@dataclass(frozen=True)
class AuditVerification:
    """Result of re-deriving the chain; ``head`` is the last hash that verified."""

    ok: bool
    entries: int
    first_bad_seq: int | None
    detail: str
    head: bytes


@dataclass(frozen=True)
class Checkpoint:
    """A signature over the chain head at ``seq`` (see :func:`checkpoint_message`)."""

    seq: int
    head: bytes
    key_id: str
    signature: bytes
    created_at: float


# --------------------------------------------------------------------------------------------
# Pure helpers (also usable by an external verifier)
# --------------------------------------------------------------------------------------------


def canonical_json(payload: Mapping[str, Any]) -> str:
    """The one serialization of a payload that gets hashed.

    Keys are sorted, separators compact, non-ASCII kept as UTF-8. ``bytes`` values become
    lowercase hex so signatures and hashes can be logged directly; NaN and infinities are
    refused because JSON cannot represent them.
    """
    return _canonical(payload)[1]


def _canonical(payload: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The normalized payload (what a reader will parse back) and its canonical JSON."""
    if not isinstance(payload, Mapping):
        raise TypeError("audit payload must be a mapping")
    if all(type(k) is str and type(v) is str for k, v in payload.items()):
        normalized = dict(payload)  # flat text (every disclosure entry): nothing to convert
    else:
        normalized = _jsonable(payload)
    return normalized, _CANONICAL_JSON.encode(normalized)


#: One encoder for every entry (a disclosure batch writes one entry per record).
_CANONICAL_JSON = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def audit_entry_hash(prev_hash: bytes, seq: int, at: float, kind: str, payload_json: str) -> bytes:
    """SHA-256 over the length-prefixed parts of an entry, under a domain-separation tag.

    The timestamp is hashed as its IEEE-754 big-endian double, the exact value SQLite stores.
    """
    parts = (
        AUDIT_ENTRY_TAG,
        prev_hash,
        _u64(seq),
        struct.pack(">d", at),
        kind.encode("utf-8"),
        payload_json.encode("utf-8"),
    )
    return hashlib.sha256(b"".join(_u64(len(part)) + part for part in parts)).digest()


def checkpoint_message(seq: int, head: bytes) -> bytes:
    """The bytes a checkpoint signs: tag || seq (8-byte big-endian) || 32-byte head."""
    if len(head) != 32:
        raise ValueError("checkpoint head must be 32 bytes")
    return AUDIT_CHECKPOINT_TAG + _u64(seq) + head


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _jsonable(value: Any) -> Any:
    if value is None or type(value) is str or type(value) is int:  # the common case, fast
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"audit payload keys must be str, got {type(k).__name__}")
            out[k] = _jsonable(v)
        return out
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("audit payload may not contain NaN or infinity")
    if value is None or isinstance(value, str | int | float):
        return value
    raise TypeError(f"audit payload value of type {type(value).__name__} is not JSON-able")


def _check_id(name: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer")


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
    max_queries      INTEGER NOT NULL CHECK (max_queries >= 0),
    max_disclosures  INTEGER NOT NULL CHECK (max_disclosures >= 0),
    not_after        INTEGER NOT NULL,
    registered_at    REAL NOT NULL,
    reserved_total   INTEGER NOT NULL DEFAULT 0
        CHECK (reserved_total >= 0 AND reserved_total <= max_queries),
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
BEFORE UPDATE OF auth_id, max_queries, max_disclosures, not_after ON authorizations
WHEN NEW.auth_id IS NOT OLD.auth_id OR NEW.max_queries IS NOT OLD.max_queries
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


# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------


class Ledger:
    """Thread-safe handle on one ledger file; every mutation is one durable transaction."""

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        self._path = os.fspath(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        # Opening right after another process was killed can meet that file's WAL recovery:
        # SQLite then answers "database is locked" at once, without waiting on the busy
        # handler, so opening retries (with backoff) for as long as the busy timeout.
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        pause = 0.01
        while True:
            try:
                self._open()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() + pause > deadline:
                    raise LedgerError(f"ledger {self._path} stayed locked: {exc}") from exc
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def _open(self) -> None:
        conn = sqlite3.connect(
            self._path,
            isolation_level=None,
            check_same_thread=False,
            timeout=_BUSY_TIMEOUT_MS / 1000,
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"ledger needs WAL journal mode, SQLite gave {mode!r}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            self._conn = conn
            self._init_schema()
        except BaseException:
            self._conn = None
            conn.close()
            raise

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self._path

    @property
    def ledger_id(self) -> str:
        """Random id fixed at creation; it is in the genesis audit entry, binding the chain."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM ledger_info WHERE key = 'ledger_id'").fetchone()
        if row is None:
            raise LedgerError("ledger_info has no ledger_id")
        return str(row[0])

    # -- transactions --------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError("ledger is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE ... COMMIT``; any exception rolls the whole method back."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise LedgerError(f"ledger constraint violated: {exc}") from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction, so multi-statement reads see one consistent snapshot."""
        with self._lock:
            conn = self._connection()
            if conn.in_transaction:  # nested inside another read or write of this thread
                yield conn
                return
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def _init_schema(self) -> None:
        with self._write() as conn:
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
                return
            now = float(self._clock())
            for statement in _split_sql(_SCHEMA):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (SCHEMA_VERSION, now),
            )
            ledger_id = uuid.uuid4().hex
            conn.execute(
                "INSERT INTO ledger_info (key, value) VALUES ('ledger_id', ?)", (ledger_id,)
            )
            self._append(
                conn,
                now,
                "ledger.created",
                {"ledger_id": ledger_id, "schema_version": SCHEMA_VERSION},
            )

    # -- authorizations ------------------------------------------------------------------------

    def ensure_authorization(
        self, auth_id: str, *, max_queries: int, max_disclosures: int, not_after: int
    ) -> None:
        """Register an authorization's limits once; re-registering must repeat them exactly.

        Limits are fixed at first sight so that a later, more generous copy of an
        authorization id cannot silently enlarge its budget.
        """
        _check_id("auth_id", auth_id)
        _check_count("max_queries", max_queries)
        _check_count("max_disclosures", max_disclosures)
        if isinstance(not_after, bool) or not isinstance(not_after, int):
            raise ValueError("not_after must be an integer (Unix seconds)")
        with self._write() as conn:
            row = conn.execute(
                "SELECT max_queries, max_disclosures, not_after FROM authorizations "
                "WHERE auth_id = ?",
                (auth_id,),
            ).fetchone()
            if row is not None:
                if tuple(row) != (max_queries, max_disclosures, not_after):
                    raise LedgerError(
                        f"authorization {auth_id!r} already registered with different limits "
                        f"(max_queries={row[0]}, max_disclosures={row[1]}, not_after={row[2]})"
                    )
                return
            now = float(self._clock())
            conn.execute(
                "INSERT INTO authorizations "
                "(auth_id, max_queries, max_disclosures, not_after, registered_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (auth_id, max_queries, max_disclosures, not_after, now),
            )
            self._append(
                conn,
                now,
                "authorization.registered",
                {
                    "auth_id": auth_id,
                    "max_queries": max_queries,
                    "max_disclosures": max_disclosures,
                    "not_after": not_after,
                },
            )

    def budget(self, auth_id: str) -> Budget:
        """Authorization-wide counters, read from one snapshot."""
        with self._read() as conn:
            return self._budget(conn, auth_id)

    def _budget(self, conn: sqlite3.Connection, auth_id: str) -> Budget:
        row = conn.execute(
            "SELECT max_queries, reserved_total, evaluated_total, max_disclosures, "
            "disclosed_total FROM authorizations WHERE auth_id = ?",
            (auth_id,),
        ).fetchone()
        if row is None:
            raise LedgerError(f"unknown authorization {auth_id!r}")
        max_q, reserved, evaluated, max_d, disclosed = row
        return Budget(
            max_queries=max_q,
            reserved=reserved,
            evaluated=evaluated,
            remaining=max_q - reserved,
            max_disclosures=max_d,
            disclosed=disclosed,
        )

    # -- sessions and budget -------------------------------------------------------------------

    def open_session(self, auth_id: str, session_id: str, meta: Mapping[str, Any]) -> None:
        """Record that a session started, with its metadata (e.g. peer identity, tier).

        Idempotent: the same call again is a no-op; different metadata for an existing session,
        or a session id already used by another authorization, is an error.
        """
        _check_id("auth_id", auth_id)
        _check_id("session_id", session_id)
        meta_json = canonical_json(meta)
        with self._write() as conn:
            self._require_authorization(conn, auth_id)
            row = self._session_row(conn, session_id)
            now = float(self._clock())
            if row is None:
                conn.execute(
                    "INSERT INTO sessions (session_id, auth_id, meta, opened_at) "
                    "VALUES (?, ?, ?, ?)",
                    (session_id, auth_id, meta_json, now),
                )
            else:
                self._require_session_auth(row, auth_id, session_id)
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
            self._append(
                conn,
                now,
                "session.opened",
                {"auth_id": auth_id, "session_id": session_id, "meta": json.loads(meta_json)},
            )

    def reserve(self, auth_id: str, session_id: str, n: int) -> Reservation:
        """Charge ``n`` units of the persistent budget to a session, atomically and for good.

        Idempotent per session (same ``n`` returns the existing reservation, nothing charged
        twice), so a retried RPC is safe. Creates the session row if ``open_session`` was not
        called first.
        """
        _check_id("auth_id", auth_id)
        _check_id("session_id", session_id)
        _check_count("n", n)
        with self._write() as conn:
            budget = self._budget(conn, auth_id)
            row = self._session_row(conn, session_id)
            if row is not None:
                self._require_session_auth(row, auth_id, session_id)
                if row["reserved"] is not None:
                    if row["reserved"] != n:
                        raise LedgerError(
                            f"session {session_id!r} already reserved {row['reserved']}, not {n}"
                        )
                    return _reservation(row)
                if row["closed_at"] is not None:
                    raise LedgerError(f"session {session_id!r} is closed")
            if n > budget.remaining:
                raise BudgetExhausted(
                    f"authorization {auth_id!r}: requested {n} queries, "
                    f"remaining {budget.remaining} of {budget.max_queries}"
                )
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
            self._append(
                conn,
                now,
                "budget.reserved",
                {
                    "auth_id": auth_id,
                    "session_id": session_id,
                    "n": n,
                    "reserved_total": budget.reserved + n,
                    "remaining": budget.remaining - n,
                },
            )
            return _reservation(self._session_row(conn, session_id))

    def reservation(self, session_id: str) -> Reservation | None:
        """The session's reservation, or None if it has not reserved anything."""
        with self._read() as conn:
            row = self._session_row(conn, session_id)
        if row is None or row["reserved"] is None:
            return None
        return _reservation(row)

    def record_evaluation(self, auth_id: str, session_id: str, n: int) -> int:
        """Count ``n`` more evaluated elements against the session's reservation.

        Returns the session's new evaluated total. Exceeding the reservation raises
        :class:`BudgetExhausted` and records nothing, so the caller must not evaluate.
        """
        _check_id("auth_id", auth_id)
        _check_id("session_id", session_id)
        _check_count("n", n)
        with self._write() as conn:
            row = self._session_row(conn, session_id)
            if row is None:
                raise LedgerError(f"unknown session {session_id!r}")
            self._require_session_auth(row, auth_id, session_id)
            if row["reserved"] is None:
                raise LedgerError(f"session {session_id!r} has no reservation")
            if row["closed_at"] is not None:
                raise LedgerError(f"session {session_id!r} is closed")
            reserved, evaluated = row["reserved"], row["evaluated"]
            if evaluated + n > reserved:
                raise BudgetExhausted(
                    f"session {session_id!r}: requested {n} evaluations, "
                    f"remaining {reserved - evaluated} of {reserved} reserved"
                )
            if n == 0:
                return evaluated
            conn.execute(
                "UPDATE sessions SET evaluated = evaluated + ? WHERE session_id = ?",
                (n, session_id),
            )
            conn.execute(
                "UPDATE authorizations SET evaluated_total = evaluated_total + ? WHERE auth_id = ?",
                (n, auth_id),
            )
            self._append(
                conn,
                float(self._clock()),
                "budget.evaluated",
                {
                    "auth_id": auth_id,
                    "session_id": session_id,
                    "n": n,
                    "evaluated": evaluated + n,
                },
            )
            return evaluated + n

    def close_session(
        self,
        auth_id: str,
        session_id: str,
        receipt: bytes,
        custodian_signature: bytes,
        requester_signature: bytes | None = None,
    ) -> None:
        """Store the signed receipt that ends a session; no budget use after this.

        Idempotent for an identical receipt; a different receipt for a closed session is an
        error (a session has exactly one receipt).
        """
        _check_id("auth_id", auth_id)
        _check_id("session_id", session_id)
        receipt = bytes(receipt)
        custodian_signature = bytes(custodian_signature)
        requester_signature = None if requester_signature is None else bytes(requester_signature)
        with self._write() as conn:
            row = self._session_row(conn, session_id)
            if row is None:
                raise LedgerError(f"unknown session {session_id!r}")
            self._require_session_auth(row, auth_id, session_id)
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
            self._append(
                conn,
                now,
                "session.closed",
                {
                    "auth_id": auth_id,
                    "session_id": session_id,
                    "receipt_sha256": _receipt_digest(receipt),
                    "custodian_signature": custodian_signature,
                    "requester_signature": requester_signature,
                    "reserved": row["reserved"],
                    "evaluated": row["evaluated"],
                },
            )

    def add_countersignature(self, session_id: str, requester_signature: bytes) -> None:
        """Attach the requester's countersignature to a closed session's receipt (once)."""
        _check_id("session_id", session_id)
        with self._write() as conn:
            row = self._session_row(conn, session_id)
            if row is None:
                raise LedgerError(f"unknown session {session_id!r}")
            if row["closed_at"] is None:
                raise LedgerError(f"session {session_id!r} is not closed yet")
            self._countersign(conn, row, bytes(requester_signature))

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
        self._append(
            conn,
            float(self._clock()),
            "session.countersigned",
            {
                "auth_id": row["auth_id"],
                "session_id": row["session_id"],
                "requester_signature": signature,
            },
        )

    def receipts(self, auth_id: str) -> list[ReceiptRow]:
        """Receipts of the authorization's closed sessions, in closing order."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT auth_id, session_id, receipt, custodian_signature, requester_signature, "
                "closed_at FROM sessions WHERE auth_id = ? AND closed_at IS NOT NULL "
                "ORDER BY closed_at, rowid",
                (auth_id,),
            ).fetchall()
        return [
            ReceiptRow(
                auth_id=r[0],
                session_id=r[1],
                receipt=bytes(r[2]),
                custodian_signature=bytes(r[3]),
                requester_signature=None if r[4] is None else bytes(r[4]),
                closed_at=r[5],
            )
            for r in rows
        ]

    # -- disclosures ---------------------------------------------------------------------------

    def record_disclosure(
        self, auth_id: str, session_id: str, record_id: str, rule_id: str
    ) -> DisclosureRow:
        """Durably account for one disclosure; release the fields only after this returns.

        A record already disclosed under this authorization returns its original row with
        ``repeat=True`` and does not count against the cap (the replay is still audited,
        because data leaves again).
        """
        return self.record_disclosures(auth_id, session_id, [(record_id, rule_id)])[0]

    def record_disclosures(
        self, auth_id: str, session_id: str, items: Sequence[tuple[str, str]]
    ) -> list[DisclosureRow]:
        """Account for a batch of ``(record_id, rule_id)`` disclosures in one transaction.

        All or nothing: if the new distinct records would exceed ``max_disclosures``,
        :class:`DisclosureCapReached` is raised and nothing is recorded. One commit per
        batch keeps fsync cost off the per-match path at scale.
        """
        _check_id("auth_id", auth_id)
        _check_id("session_id", session_id)
        for record_id, rule_id in items:
            _check_id("record_id", record_id)
            _check_id("rule_id", rule_id)
        with self._write() as conn:
            budget = self._budget(conn, auth_id)
            row = self._session_row(conn, session_id)
            if row is None:
                raise LedgerError(f"unknown session {session_id!r}")
            self._require_session_auth(row, auth_id, session_id)
            if row["closed_at"] is not None:
                raise LedgerError(f"session {session_id!r} is closed")
            now = float(self._clock())
            # (session, rule, time) of every record of this batch already disclosed under
            # this authorization; records first disclosed by this batch join as they go.
            first: dict[str, tuple[str, str, float]] = {}
            distinct = list(dict.fromkeys(record_id for record_id, _ in items))
            for a in range(0, len(distinct), _IN_LIST):
                part = distinct[a:a + _IN_LIST]
                for rid, sid, rule, at in conn.execute(
                    "SELECT record_id, session_id, rule_id, disclosed_at FROM disclosures "
                    f"WHERE auth_id = ? AND record_id IN ({','.join('?' * len(part))})",
                    (auth_id, *part),
                ):
                    first[rid] = (sid, rule, at)
            out: list[DisclosureRow] = []
            entries: list[tuple[str, dict[str, Any]]] = []
            new_rows: list[tuple[str, str, str, str, float]] = []
            new_rows_entry: list[int] = []
            disclosed = budget.disclosed
            for record_id, rule_id in items:
                payload = {"auth_id": auth_id, "session_id": session_id,
                           "record_id": record_id, "rule_id": rule_id}
                prior = first.get(record_id)
                if prior is not None:
                    payload["first_session_id"] = prior[0]
                    entries.append(("disclosure.repeated", payload))
                    out.append(DisclosureRow(auth_id, prior[0], record_id, prior[1], prior[2],
                                             True))
                    continue
                if disclosed >= budget.max_disclosures:
                    raise DisclosureCapReached(
                        f"authorization {auth_id!r}: disclosure cap of "
                        f"{budget.max_disclosures} records reached"
                    )
                new_rows_entry.append(len(entries))
                entries.append(("disclosure.recorded", payload))
                new_rows.append((auth_id, session_id, record_id, rule_id, now))
                first[record_id] = (session_id, rule_id, now)
                disclosed += 1
                out.append(DisclosureRow(auth_id, session_id, record_id, rule_id, now, False))
            appended = self._append_many(conn, now, entries)
            conn.executemany(
                "INSERT INTO disclosures "
                "(auth_id, session_id, record_id, rule_id, disclosed_at, audit_seq) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(*r, appended[e].seq) for r, e in zip(new_rows, new_rows_entry, strict=True)],
            )
            if disclosed != budget.disclosed:
                conn.execute(
                    "UPDATE authorizations SET disclosed_total = ? WHERE auth_id = ?",
                    (disclosed, auth_id),
                )
            return out

    def disclosures(self, auth_id: str | None = None) -> list[DisclosureRow]:
        """Accounting rows in the order they were recorded (all authorizations if None)."""
        sql = "SELECT auth_id, session_id, record_id, rule_id, disclosed_at FROM disclosures"
        args: tuple[str, ...] = ()
        if auth_id is not None:
            sql += " WHERE auth_id = ?"
            args = (auth_id,)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
        return [DisclosureRow(r[0], r[1], r[2], r[3], r[4], False) for r in rows]

    # -- audit chain ---------------------------------------------------------------------------

    def audit(self, kind: str, payload: Mapping[str, Any]) -> AuditEntry:
        """Append a decision that changes nothing else (a refusal, say) to the chain."""
        _check_id("kind", kind)
        with self._write() as conn:
            return self._append(conn, float(self._clock()), kind, payload)

    def _append(
        self,
        conn: sqlite3.Connection,
        at: float,
        kind: str,
        payload: Mapping[str, Any],
    ) -> AuditEntry:
        """Append one entry inside the caller's transaction (the caller holds the write lock)."""
        return self._append_many(conn, at, [(kind, payload)])[0]

    def _append_many(
        self,
        conn: sqlite3.Connection,
        at: float,
        entries: Sequence[tuple[str, Mapping[str, Any]]],
    ) -> list[AuditEntry]:
        """Append entries, chained in order, inside the caller's transaction.

        The head is read once and the rows go in with one ``executemany``: a disclosure
        batch writes one entry per record, so this is on the per-match path.
        """
        if not entries:
            return []
        last = conn.execute(
            "SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        seq, prev = (1, ZERO_HASH) if last is None else (last[0] + 1, bytes(last[1]))
        out: list[AuditEntry] = []
        rows: list[tuple[int, float, str, str, bytes, bytes]] = []
        for kind, payload in entries:
            normalized, payload_json = _canonical(payload)
            entry_hash = audit_entry_hash(prev, seq, at, kind, payload_json)
            rows.append((seq, at, kind, payload_json, prev, entry_hash))
            out.append(AuditEntry(seq, at, kind, normalized, prev, entry_hash))
            seq, prev = seq + 1, entry_hash
        conn.executemany(
            "INSERT INTO audit_log (seq, at, kind, payload, prev_hash, entry_hash) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        return out

    def audit_entries(self, start: int = 0) -> Iterator[AuditEntry]:
        """Entries with ``seq >= start`` in chain order (seq starts at 1).

        Reads page by page so a long iteration does not block writers on other threads.
        """
        cursor = start
        while True:
            with self._read() as conn:
                rows = conn.execute(
                    "SELECT seq, at, kind, payload, prev_hash, entry_hash FROM audit_log "
                    "WHERE seq >= ? ORDER BY seq LIMIT ?",
                    (cursor, _PAGE),
                ).fetchall()
            for seq, at, kind, payload, prev, entry_hash in rows:
                try:
                    parsed = json.loads(payload)
                except json.JSONDecodeError as exc:
                    raise LedgerError(f"audit entry {seq} has an unreadable payload") from exc
                yield AuditEntry(seq, at, kind, parsed, bytes(prev), bytes(entry_hash))
            if len(rows) < _PAGE:
                return
            cursor = rows[-1][0] + 1

    def audit_head(self) -> tuple[int, bytes]:
        """``(seq, entry_hash)`` of the newest entry; ``(0, ZERO_HASH)`` for an empty chain."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return (0, ZERO_HASH) if row is None else (row[0], bytes(row[1]))

    def _raw_entries(self) -> Iterator[tuple[int, float, str, str, bytes, bytes]]:
        """Stored rows in seq order, paged, with no parsing (verification hashes raw text)."""
        cursor = -(2**63)
        while True:
            with self._read() as conn:
                rows = conn.execute(
                    "SELECT seq, at, kind, payload, prev_hash, entry_hash FROM audit_log "
                    "WHERE seq >= ? ORDER BY seq LIMIT ?",
                    (cursor, _PAGE),
                ).fetchall()
            yield from rows
            if len(rows) < _PAGE:
                return
            cursor = rows[-1][0] + 1

    def verify_audit_chain(self) -> AuditVerification:
        """Re-derive every hash from the stored content and check every link.

        Names the first bad position: an edited entry fails its own hash, a deleted entry
        leaves a seq gap (reported at the missing seq), an inserted or reordered entry breaks
        the ``prev_hash`` link or its hash. A forged entry appended at the very end with a
        correct hash cannot be detected by the chain alone; signed checkpoints bound that.
        """
        expected_seq = 1
        prev = ZERO_HASH
        count = 0
        for seq, at, kind, payload, stored_prev, stored_hash in self._raw_entries():
            stored_prev, stored_hash = bytes(stored_prev), bytes(stored_hash)
            bad = _check_link(seq, at, kind, payload, stored_prev, stored_hash, expected_seq, prev)
            if bad is not None:
                bad_seq, detail = bad
                return AuditVerification(False, count, bad_seq, detail, prev)
            prev = stored_hash
            expected_seq += 1
            count += 1
        return AuditVerification(True, count, None, f"{count} entries verified", prev)

    def add_checkpoint(self, sign: Callable[[bytes], bytes], key_id: str) -> Checkpoint:
        """Sign the current head (see :func:`checkpoint_message`) and store the signature.

        The checkpoint itself is then logged as the next audit entry, so the chain records
        when and by which key it was pinned.
        """
        _check_id("key_id", key_id)
        with self._write() as conn:
            last = conn.execute(
                "SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq, head = (0, ZERO_HASH) if last is None else (last[0], bytes(last[1]))
            signature = bytes(sign(checkpoint_message(seq, head)))
            now = float(self._clock())
            conn.execute(
                "INSERT INTO checkpoints (seq, head, key_id, signature, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (seq, head, key_id, signature, now),
            )
            self._append(
                conn,
                now,
                "audit.checkpoint",
                {"seq": seq, "head": head, "key_id": key_id, "signature": signature},
            )
            return Checkpoint(seq, head, key_id, signature, now)

    def checkpoints(self) -> list[Checkpoint]:
        """Stored checkpoints, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT seq, head, key_id, signature, created_at FROM checkpoints ORDER BY id"
            ).fetchall()
        return [Checkpoint(r[0], bytes(r[1]), r[2], bytes(r[3]), r[4]) for r in rows]

    def verify_checkpoints(self, verify: Callable[[bytes, bytes], bool]) -> bool:
        """True iff every checkpoint's signature verifies and matches the *recomputed* chain.

        ``verify(message, signature)`` must return True for a valid signature (an exception
        counts as invalid). Hashes are recomputed from entry content rather than trusted from
        storage, so a chain rewritten wholesale (hashes and all) fails here even though it
        would pass :meth:`verify_audit_chain`. With no checkpoints there is nothing to
        contradict and the result is True; check :meth:`checkpoints` if one is required.
        """
        pending: dict[int, list[Checkpoint]] = {}
        for cp in self.checkpoints():
            try:
                valid = bool(verify(checkpoint_message(cp.seq, cp.head), cp.signature))
            except Exception:
                valid = False
            if not valid:
                return False
            pending.setdefault(cp.seq, []).append(cp)
        if not pending:
            return True
        computed = ZERO_HASH
        for cp in pending.pop(0, []):
            if not hmac.compare_digest(cp.head, computed):
                return False
        expected_seq = 1
        for seq, at, kind, payload, _prev, _hash in self._raw_entries():
            if not pending:
                break
            if seq != expected_seq or not _well_typed(at, kind, payload):
                return False
            computed = audit_entry_hash(computed, seq, float(at), kind, payload)
            for cp in pending.pop(seq, []):
                if not hmac.compare_digest(cp.head, computed):
                    return False
            expected_seq += 1
        return not pending

    # -- oversight export ----------------------------------------------------------------------

    def export(self, auth_id: str) -> dict[str, Any]:
        """Everything an oversight body needs for one authorization, as JSON-able data."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT max_queries, max_disclosures, not_after, registered_at "
                "FROM authorizations WHERE auth_id = ?",
                (auth_id,),
            ).fetchone()
            if row is None:
                raise LedgerError(f"unknown authorization {auth_id!r}")
            budget = self._budget(conn, auth_id)
            sessions = conn.execute(
                "SELECT session_id, meta, opened_at, reserved, evaluated, closed_at "
                "FROM sessions WHERE auth_id = ? ORDER BY opened_at, rowid",
                (auth_id,),
            ).fetchall()
            disclosures = self.disclosures(auth_id)
            receipts = self.receipts(auth_id)
            head_seq, head = self.audit_head()
            ledger_id = self.ledger_id
            checkpoints = self.checkpoints()
        return {
            "ledger_id": ledger_id,
            "auth_id": auth_id,
            "exported_at": float(self._clock()),
            "authorization": {
                "max_queries": row[0],
                "max_disclosures": row[1],
                "not_after": row[2],
                "registered_at": row[3],
            },
            "budget": {
                "max_queries": budget.max_queries,
                "reserved": budget.reserved,
                "evaluated": budget.evaluated,
                "remaining": budget.remaining,
                "max_disclosures": budget.max_disclosures,
                "disclosed": budget.disclosed,
            },
            "sessions": [
                {
                    "session_id": s[0],
                    "meta": None if s[1] is None else json.loads(s[1]),
                    "opened_at": s[2],
                    "reserved": s[3],
                    "evaluated": s[4],
                    "closed_at": s[5],
                }
                for s in sessions
            ],
            "disclosures": [
                {
                    "session_id": d.session_id,
                    "record_id": d.record_id,
                    "rule_id": d.rule_id,
                    "disclosed_at": d.disclosed_at,
                }
                for d in disclosures
            ],
            "receipts": [
                {
                    "session_id": r.session_id,
                    "receipt": r.receipt.hex(),
                    "custodian_signature": r.custodian_signature.hex(),
                    "requester_signature": (
                        None if r.requester_signature is None else r.requester_signature.hex()
                    ),
                    "closed_at": r.closed_at,
                }
                for r in receipts
            ],
            "audit_head": {"seq": head_seq, "hash": head.hex()},
            "checkpoints": [
                {
                    "seq": c.seq,
                    "head": c.head.hex(),
                    "key_id": c.key_id,
                    "signature": c.signature.hex(),
                    "created_at": c.created_at,
                }
                for c in checkpoints
            ],
        }

    # -- row helpers ---------------------------------------------------------------------------

    @staticmethod
    def _require_authorization(conn: sqlite3.Connection, auth_id: str) -> None:
        if conn.execute("SELECT 1 FROM authorizations WHERE auth_id = ?", (auth_id,)).fetchone():
            return
        raise LedgerError(f"unknown authorization {auth_id!r}")

    @staticmethod
    def _session_row(conn: sqlite3.Connection, session_id: str) -> sqlite3.Row | None:
        cur = conn.execute("SELECT * FROM sessions WHERE session_id = ?", (session_id,))
        cur.row_factory = sqlite3.Row
        return cur.fetchone()

    @staticmethod
    def _require_session_auth(row: sqlite3.Row, auth_id: str, session_id: str) -> None:
        if row["auth_id"] != auth_id:
            raise LedgerError(f"session {session_id!r} belongs to another authorization")


def _reservation(row: sqlite3.Row | None) -> Reservation:
    if row is None or row["reserved"] is None:
        raise LedgerError("session has no reservation")
    return Reservation(
        auth_id=row["auth_id"],
        session_id=row["session_id"],
        reserved=row["reserved"],
        evaluated=row["evaluated"],
        remaining=row["reserved"] - row["evaluated"],
    )


def _check_link(
    seq: int,
    at: float,
    kind: str,
    payload: str,
    stored_prev: bytes,
    stored_hash: bytes,
    expected_seq: int,
    prev: bytes,
) -> tuple[int, str] | None:
    """The first problem with one stored entry, as ``(bad_seq, detail)``, or None."""
    if seq != expected_seq:
        if seq > expected_seq:
            return expected_seq, f"entry {expected_seq} is missing (next stored seq is {seq})"
        return seq, f"entry {seq} is out of sequence (expected {expected_seq})"
    if not _well_typed(at, kind, payload):
        return seq, f"entry {seq} has malformed columns"
    if not hmac.compare_digest(stored_prev, prev):
        return seq, f"entry {seq} does not link to entry {seq - 1} (prev_hash mismatch)"
    if not hmac.compare_digest(audit_entry_hash(prev, seq, float(at), kind, payload), stored_hash):
        return seq, f"entry {seq} content does not match its hash"
    return None


def _well_typed(at: object, kind: object, payload: object) -> bool:
    """Stored columns have the types hashing needs (SQLite does not enforce column types)."""
    return (
        isinstance(at, float | int)
        and not isinstance(at, bool)
        and isinstance(kind, str)
        and isinstance(payload, str)
    )


def _same_bytes(stored: bytes | None, given: bytes) -> bool:
    return stored is not None and hmac.compare_digest(bytes(stored), given)


def _receipt_digest(receipt: bytes) -> str:
    """Receipt digest logged in the chain (domain-separated from the entry hash)."""
    return hashlib.sha256(_RECEIPT_DIGEST_TAG + _u64(len(receipt)) + receipt).hexdigest()


def _split_sql(script: str) -> list[str]:
    """Split the schema into statements; trigger bodies end in ``END;``."""
    statements: list[str] = []
    buf: list[str] = []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            statements.append(text)
            buf = []
    if "\n".join(buf).strip():
        raise ValueError("schema script has an unterminated statement")
    return statements
