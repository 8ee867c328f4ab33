"""The requester's result store: disclosed results encrypted at rest, with enforced retention.

The court found that return information sat in plaintext on one employee's computer with no
accounting. This module is the answer on the requester's side:

* **Encrypted at rest.** Every result row is sealed with AES-256-GCM under a sub-key derived
  (HKDF-SHA256, domain-separated) from a 32-byte master key. Each row gets a fresh random
  12-byte nonce, and its associated data binds the store id, job id, row number, authorization
  id and expiry, so rows cannot be moved between jobs or stores, reordered, or have their expiry
  edited without the read failing. A per-job header MAC also fixes the row count, so dropping
  rows is detected too.
* **Key never beside the data.** The master key comes from a key file (mode 0600) or from the
  ``AGENCY_A_RESULTS_KEY`` environment variable; :class:`ResultStore` refuses a key file in the
  database's directory tree, since whoever copies that directory would take both.
* **Retention enforced.** Each job carries the retention period of its authorization. Lapsed
  jobs are purged on open, before every read or listing, and by an optional background thread.
  Purging deletes the rows with ``PRAGMA secure_delete=ON`` (freed pages are zeroed) and then
  ``VACUUM`` s, so the purged ciphertext and job id no longer appear in the database file. The
  store uses a rollback journal (``journal_mode=DELETE``), not WAL, because a WAL file keeps old
  page images around after they are deleted from the database.
* **Accounting.** Storing, reading, exporting and purging each append an entry to the
  requester's hash-chained audit ledger (a separate file). Reads and
  exports need an operator identity and a purpose. Entries carry counts and ids, never content.
  Each entry is committed to the ledger *before* the data moves (and, when storing or purging,
  before the store's own transaction commits), so a failure can over-report access but never
  hide it.

What this does not protect against, by design: the key held in process memory; plaintext that an
operator exports (see :meth:`ResultStore.export_results`); and residue that the file system keeps
after SQLite deletes its rollback journal, which is ciphertext under a key that still exists.
Run the store on an encrypted volume to cover that last case.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import math
import os
import secrets
import sqlite3
import stat
import string
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.accounting.port import AuditLog
from protocol.adapters.sqlite import SqliteDatabase
from protocol.crypto.encoding import encode
from protocol.errors import PSIError

__all__ = [
    "AUDIT_KINDS",
    "KEY_ENV",
    "KEY_LEN",
    "STORE_DOMAIN",
    "ResultIntegrityError",
    "ResultStore",
    "generate_key_file",
    "load_key",
]

log = logging.getLogger(__name__)

KEY_ENV = "AGENCY_A_RESULTS_KEY"
KEY_LEN = 32
STORE_DOMAIN = b"gated-psi/result-store/v1"
"""Root of every domain-separation tag in this module."""

# HKDF ``info`` strings, one per purpose of a sub-key.
_ROW_AEAD_INFO = STORE_DOMAIN + b"/row-aead"
_JOB_MAC_INFO = STORE_DOMAIN + b"/job-mac"
_KEY_CHECK_INFO = STORE_DOMAIN + b"/key-check"
# Tags prefixed to the inputs of the AEAD's associated data and of the two MACs.
_ROW_AD_TAG = STORE_DOMAIN + b"/row-ad"
_JOB_MAC_TAG = STORE_DOMAIN + b"/job-header"
_KEY_CHECK_TAG = STORE_DOMAIN + b"/key-check-value"
_JOB_STATE_AD_TAG = STORE_DOMAIN + b"/job-state-ad"
_JOB_MATCHES_AD_TAG = STORE_DOMAIN + b"/job-matches-ad"
#: The key of a job state's list that is sealed apart from the rest (see ``_put_state``).
_MATCHES_KEY = "matches"

_SCHEMA_VERSION = 1
_NONCE_LEN = 12
_DAY = 86_400
_REQUIRED_ROW_KEYS = ("query_record_id", "rule_id", "pseudonym", "fields")
_FIXED_CSV_COLUMNS = ("job_id", "row", "authorization_id", "expires_at_utc")
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

RESULTS_STORED = "results_stored"
RESULTS_READ = "results_read"
RESULTS_EXPORTED = "results_exported"
RESULTS_PURGED = "results_purged"
RESULTS_INTEGRITY_FAILURE = "results_integrity_failure"
AUDIT_KINDS = frozenset(
    {RESULTS_STORED, RESULTS_READ, RESULTS_EXPORTED, RESULTS_PURGED, RESULTS_INTEGRITY_FAILURE}
)
"""Audit-entry kinds this store writes; :meth:`ResultStore.access_log` returns only these."""

_RETENTION_OPERATOR = "system:retention"


class ResultIntegrityError(PSIError):
    """Stored results fail authentication: wrong key, tampered, swapped, or missing rows."""

    code = "result_integrity"


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def load_key(key_file: Path | None = None) -> bytes:
    """The 32-byte master key, from ``key_file`` if given, else from ``$AGENCY_A_RESULTS_KEY``.

    A key file may hold the raw 32 bytes or 64 hex digits (surrounding whitespace ignored). It
    must be a regular file with no group or other permissions, because a key anyone on the host
    can read protects nothing. The environment variable holds hex. Messages never echo key
    material.
    """
    if key_file is not None:
        return _key_from_file(Path(key_file))
    value = os.environ.get(KEY_ENV)
    if value is None or not value.strip():
        raise ValueError(
            f"no result-store key: pass a key file or set {KEY_ENV} to 64 hex digits "
            "(create a key file with generate_key_file)"
        )
    return _key_from_hex(value, source=f"environment variable {KEY_ENV}")


def generate_key_file(path: Path) -> None:
    """Write a fresh random key as hex to ``path``, mode 0600; never overwrite an existing file.

    Refusing to overwrite protects the only copy of a key that existing data depends on.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(f"key file {path} already exists; refusing to overwrite it") from None
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
        os.write(fd, (secrets.token_bytes(KEY_LEN).hex() + "\n").encode("ascii"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _key_from_file(path: Path) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ValueError(f"key file {path} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"key file {path} is not a regular file")
    if os.name == "posix" and info.st_mode & 0o077:
        raise ValueError(
            f"key file {path} is accessible by group or other (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); restrict it with: chmod 600 {path}"
        )
    data = path.read_bytes()
    # A random raw key is all hex digits with probability below 1e-34; if it is, the file
    # is a too-short hex key, which must not silently become a raw key.
    if len(data) == KEY_LEN and not all(chr(b) in string.hexdigits for b in data):
        return data
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(
            f"key file {path} must hold {KEY_LEN} raw bytes or {2 * KEY_LEN} hex digits "
            f"(it has {len(data)} bytes)"
        ) from None
    return _key_from_hex(text, source=f"key file {path}")


def _key_from_hex(text: str, *, source: str) -> bytes:
    text = text.strip()
    if len(text) != 2 * KEY_LEN:
        raise ValueError(f"{source} must hold {2 * KEY_LEN} hex digits, found {len(text)} chars")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{source} is not valid hex") from None


def _subkey(key: bytes, info: bytes) -> bytes:
    """One purpose-bound sub-key, so no key is ever used for two different jobs."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


# --------------------------------------------------------------------------------------------
# Encodings that get authenticated
# --------------------------------------------------------------------------------------------


def _row_ad(
    store_id: str, job_id: str, row_no: int, authorization_id: str, expires_at: float
) -> bytes:
    return encode(
        _ROW_AD_TAG,
        store_id.encode(),
        job_id.encode(),
        row_no.to_bytes(8, "big"),
        authorization_id.encode(),
        struct.pack(">d", expires_at),
    )


def _job_header(
    store_id: str,
    job_id: str,
    authorization_id: str,
    rows: int,
    stored_at: float,
    expires_at: float,
    retention_days: int,
) -> bytes:
    return encode(
        _JOB_MAC_TAG,
        store_id.encode(),
        job_id.encode(),
        authorization_id.encode(),
        rows.to_bytes(8, "big"),
        struct.pack(">d", stored_at),
        struct.pack(">d", expires_at),
        retention_days.to_bytes(8, "big"),
    )


def _row_plaintext(row: Mapping[str, Any], index: int) -> bytes:
    if not isinstance(row, Mapping):
        raise ValueError(f"row {index} must be a mapping, got {type(row).__name__}")
    missing = [k for k in _REQUIRED_ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"row {index} is missing {missing}")
    if not isinstance(row["fields"], Mapping):
        raise ValueError(f"row {index}: 'fields' must be a mapping")
    try:
        text = json.dumps(
            dict(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"row {index} is not JSON-able: {exc}") from None
    return text.encode("utf-8")


def _require_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} is required (a non-empty string)")
    return value


def _iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    """CREATE TABLE IF NOT EXISTS jobs (
        job_id            TEXT PRIMARY KEY,
        authorization_id  TEXT NOT NULL,
        rows              INTEGER NOT NULL CHECK (rows >= 0),
        stored_at         REAL NOT NULL,
        expires_at        REAL NOT NULL,
        retention_days    INTEGER NOT NULL CHECK (retention_days >= 0),
        header_mac        BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs(expires_at)",
    """CREATE TABLE IF NOT EXISTS results (
        job_id      TEXT NOT NULL,
        row_no      INTEGER NOT NULL,
        nonce       BLOB NOT NULL,
        ciphertext  BLOB NOT NULL,
        PRIMARY KEY (job_id, row_no)
    )""",
    # A job's recovery state (session, proofs, receipt), sealed like a row: what a restart
    # needs to finish a job whose results are already stored (docs/architecture.md, Late
    # failures). Deleted with the job.
    """CREATE TABLE IF NOT EXISTS job_state (
        job_id      TEXT PRIMARY KEY,
        state       TEXT NOT NULL,
        nonce       BLOB NOT NULL,
        sealed      BLOB NOT NULL
    )""",
    # A job state's match list (the largest part, fixed once the match is done), sealed on
    # its own so each disclosure batch rewrites only the part that changed.
    """CREATE TABLE IF NOT EXISTS job_state_matches (
        job_id      TEXT PRIMARY KEY,
        nonce       BLOB NOT NULL,
        sealed      BLOB NOT NULL
    )""",
)


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class ResultStore:
    """Encrypted, retention-enforcing, audited store of one requester's disclosed results.

    ``audit`` is the requester's ledger (its own file); this store only appends to it. Pass
    ``key_path`` when the key came from a file so the store can refuse a key kept beside the
    data. Thread-safe: one SQLite connection behind a re-entrant lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: bytes,
        audit: AuditLog,
        *,
        clock: Callable[[], float] = time.time,
        key_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_LEN:
            raise ValueError(f"result-store key must be {KEY_LEN} bytes")
        self._path = Path(path)
        if key_path is not None:
            _refuse_key_beside(Path(key_path), self._path)
        self._audit = audit
        self._clock = clock
        self._aead = AESGCM(_subkey(bytes(key), _ROW_AEAD_INFO))
        self._mac_key = _subkey(bytes(key), _JOB_MAC_INFO)
        check_key = _subkey(bytes(key), _KEY_CHECK_INFO)
        self._stop = threading.Event()
        self._purger: threading.Thread | None = None
        self._store_id = ""
        # per job, the digest of the match list last sealed and, when it was a tuple (taken
        # as immutable), that very object (see _put_state); memory only
        self._matches_written: dict[str, tuple[bytes, tuple[Any, ...] | None]] = {}
        self._pending_matches: dict[str, tuple[bytes, tuple[Any, ...] | None]] = {}

        # The ledger's connection and transaction discipline (protocol.adapters.sqlite),
        # with this store's pragmas: rollback journal and secure_delete.
        self._db = SqliteDatabase(
            self._path, configure=_configure, error=ValueError, name="result store",
            initialize=lambda db: self._init_schema(db, check_key),
        )
        self._lock = self._db.lock
        # Enforce retention before anything else can see lapsed data.
        self.purge_expired()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def store_id(self) -> str:
        """Random id fixed at creation; bound into every row so rows can't move between stores."""
        return self._store_id

    def close(self) -> None:
        """Stop the purger (if any) and close the database; safe to call twice."""
        self.stop_purger()
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        return self._db.connection()

    def _init_schema(self, db: SqliteDatabase, check_key: bytes) -> None:
        """Create the store's tables and identity, or check that the key opens them."""
        with db.write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            meta = dict(conn.execute("SELECT key, value FROM store_meta").fetchall())
            if not meta:
                store_id = uuid.uuid4().hex
                check = hmac.new(check_key, encode(_KEY_CHECK_TAG, store_id.encode()), "sha256")
                conn.executemany(
                    "INSERT INTO store_meta (key, value) VALUES (?, ?)",
                    [
                        ("schema_version", str(_SCHEMA_VERSION)),
                        ("store_id", store_id),
                        ("key_check", check.digest()),
                        ("created_at", repr(float(self._clock()))),
                    ],
                )
                self._store_id = store_id
                return
        if str(meta.get("schema_version")) != str(_SCHEMA_VERSION):
            raise ValueError(
                f"result store schema version {meta.get('schema_version')!r} is not supported "
                f"(this code knows version {_SCHEMA_VERSION})"
            )
        store_id = str(meta.get("store_id", ""))
        stored_check = meta.get("key_check")
        expected = hmac.new(check_key, encode(_KEY_CHECK_TAG, store_id.encode()), "sha256").digest()
        if not isinstance(stored_check, bytes) or not hmac.compare_digest(stored_check, expected):
            raise ResultIntegrityError(
                f"the key does not open result store {self._path} (wrong key, or the store's "
                "metadata was altered)"
            )
        self._store_id = store_id

    # -- writing -------------------------------------------------------------------------------

    def put_results(
        self,
        job_id: str,
        authorization_id: str,
        retention_days: int,
        rows: Sequence[Mapping[str, Any]],
        *,
        operator: str,
    ) -> int:
        """Encrypt and store one job's disclosed rows in one transaction; returns the row count.

        The job expires ``retention_days`` days from now (the authorization's retention period;
        0 means the rows are never readable and are purged at once). A job id is stored once.
        """
        _require_text("job_id", job_id)
        _require_text("authorization_id", authorization_id)
        _require_text("operator", operator)
        if isinstance(retention_days, bool) or not isinstance(retention_days, int):
            raise ValueError("retention_days must be an integer")
        if retention_days < 0:
            raise ValueError(f"retention_days must be >= 0, got {retention_days}")
        plaintexts = [_row_plaintext(row, i) for i, row in enumerate(rows)]
        with self._db.write() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone():
                raise ValueError(f"results for job {job_id!r} are already stored")
            stored_at = float(self._clock())
            expires_at = stored_at + retention_days * _DAY
            if not math.isfinite(expires_at):
                raise ValueError("retention_days is too large")
            header = _job_header(
                self._store_id,
                job_id,
                authorization_id,
                len(plaintexts),
                stored_at,
                expires_at,
                retention_days,
            )
            conn.execute(
                "INSERT INTO jobs (job_id, authorization_id, rows, stored_at, expires_at, "
                "retention_days, header_mac) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    authorization_id,
                    len(plaintexts),
                    stored_at,
                    expires_at,
                    retention_days,
                    self._mac(header),
                ),
            )
            self._insert_rows(conn, job_id, authorization_id, expires_at, plaintexts, 0)
            # Logged before our COMMIT: stored data is never missing from the accounting.
            self._log(
                RESULTS_STORED,
                job_id=job_id,
                authorization_id=authorization_id,
                operator=operator,
                count=len(plaintexts),
                retention_days=retention_days,
                expires_at=expires_at,
            )
        return len(plaintexts)

    def append_results(
        self,
        job_id: str,
        rows: Sequence[Mapping[str, Any]],
        *,
        operator: str,
        job_state: tuple[str, Mapping[str, Any]] | None = None,
    ) -> int:
        """Encrypt and add ``rows`` to a job already begun with :meth:`put_results`.

        Results are stored as they arrive, so a failure later in the job loses none of them.
        The job's row count and header MAC move with the rows, and ``job_state`` (state,
        data) replaces the job's state, all in one transaction.
        """
        _require_text("job_id", job_id)
        _require_text("operator", operator)
        plaintexts = [_row_plaintext(row, i) for i, row in enumerate(rows)]
        if not plaintexts:
            if job_state is not None:
                self.save_job_state(job_id, *job_state)
            return 0
        with self._state_write() as conn:
            found = conn.execute(
                "SELECT authorization_id, rows, stored_at, expires_at, retention_days "
                "FROM jobs WHERE job_id = ?",
                (job_id,),
            ).fetchone()
            if found is None:
                raise ValueError(f"no stored job {job_id!r} to add results to (unknown or purged)")
            authorization_id, count, stored_at, expires_at, retention_days = found
            total = count + len(plaintexts)
            header = _job_header(
                self._store_id, job_id, authorization_id, total, stored_at, expires_at,
                retention_days,
            )
            conn.execute(
                "UPDATE jobs SET rows = ?, header_mac = ? WHERE job_id = ?",
                (total, self._mac(header), job_id),
            )
            self._insert_rows(conn, job_id, authorization_id, expires_at, plaintexts, count)
            self._log(
                RESULTS_STORED,
                job_id=job_id,
                authorization_id=authorization_id,
                operator=operator,
                count=len(plaintexts),
                total=total,
            )
            if job_state is not None:
                self._put_state(conn, job_id, *job_state)
        return len(plaintexts)

    def save_job_state(self, job_id: str, state: str, data: Mapping[str, Any]) -> None:
        """Seal and keep a job's state and recovery data (replacing the previous one)."""
        _require_text("job_id", job_id)
        with self._state_write() as conn:
            if not conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone():
                raise ValueError(f"no stored job {job_id!r} (unknown or purged)")
            self._put_state(conn, job_id, state, data)

    @contextmanager
    def _state_write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that may save job states: match lists it sealed count as
        written only once it commits."""
        with self._lock:
            self._pending_matches.clear()
            try:
                with self._db.write() as conn:
                    yield conn
            except BaseException:
                self._pending_matches.clear()
                raise
            self._matches_written.update(self._pending_matches)
            self._pending_matches.clear()

    def _put_state(
        self, conn: sqlite3.Connection, job_id: str, state: str, data: Mapping[str, Any]
    ) -> None:
        _require_text("state", state)
        rest = dict(data)
        matches = rest.get(_MATCHES_KEY)
        if isinstance(matches, (list, tuple)):
            # Sealed apart, and written again only when it changed: at full scale it is
            # most of the state, and every disclosure batch saves the state (a rewrite of
            # a multi-MB blob under the rollback journal and secure_delete costs more
            # than the batch's rows).
            del rest[_MATCHES_KEY]
            self._put_matches(conn, job_id, matches)
        else:
            conn.execute("DELETE FROM job_state_matches WHERE job_id = ?", (job_id,))
            self._matches_written.pop(job_id, None)
        plaintext = json.dumps(rest, sort_keys=True, separators=(",", ":"), default=str)
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"),
                                    self._state_ad(job_id, state))
        conn.execute(
            "INSERT INTO job_state (job_id, state, nonce, sealed) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(job_id) DO UPDATE SET state = excluded.state, "
            "nonce = excluded.nonce, sealed = excluded.sealed",
            (job_id, state, nonce, sealed),
        )

    def _put_matches(self, conn: sqlite3.Connection, job_id: str,
                     matches: list[Any] | tuple[Any, ...]) -> None:
        """Seal a job's match list unless it is what was sealed last.  A tuple (of tuples)
        is taken as immutable: the same object again is not even serialized, which at full
        scale saves re-encoding megabytes of JSON for every disclosure batch."""
        kept = matches if isinstance(matches, tuple) else None
        written = self._matches_written.get(job_id)
        if written is not None and kept is not None and written[1] is kept:
            return
        text = json.dumps(matches, separators=(",", ":"), default=str).encode("utf-8")
        digest = hashlib.sha256(text).digest()  # kept in memory only, never stored
        if written is not None and written[0] == digest:
            self._pending_matches[job_id] = (digest, kept)
            return
        nonce = os.urandom(_NONCE_LEN)
        conn.execute(
            "INSERT INTO job_state_matches (job_id, nonce, sealed) VALUES (?, ?, ?) "
            "ON CONFLICT(job_id) DO UPDATE SET nonce = excluded.nonce, sealed = excluded.sealed",
            (job_id, nonce, self._aead.encrypt(nonce, text, self._matches_ad(job_id))),
        )
        # remembered only once the transaction commits (a rollback must not skip a write)
        self._pending_matches[job_id] = (digest, kept)

    def _matches_ad(self, job_id: str) -> bytes:
        return encode(_JOB_MATCHES_AD_TAG, self._store_id.encode(), job_id.encode())

    def job_states(self, job_id: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        """(job id, state, data) of the stored jobs (or one job), unexpired, oldest first."""
        self.purge_expired()
        query = (
            "SELECT s.job_id, s.state, s.nonce, s.sealed, m.nonce, m.sealed FROM job_state s "
            "JOIN jobs j ON j.job_id = s.job_id "
            "LEFT JOIN job_state_matches m ON m.job_id = s.job_id"
        )
        args: tuple[str, ...] = ()
        if job_id is not None:
            query, args = query + " WHERE s.job_id = ?", (job_id,)
        with self._lock:
            found = self._connection().execute(query + " ORDER BY j.stored_at, s.job_id",
                                               args).fetchall()
        out: list[tuple[str, str, dict[str, Any]]] = []
        for jid, state, nonce, sealed, m_nonce, m_sealed in found:
            try:
                plaintext = self._aead.decrypt(bytes(nonce), bytes(sealed),
                                               self._state_ad(jid, state))
                matches = None if m_sealed is None else self._aead.decrypt(
                    bytes(m_nonce), bytes(m_sealed), self._matches_ad(jid))
            except (InvalidTag, ValueError):
                raise ResultIntegrityError(
                    f"job {jid!r}: its stored state fails authentication") from None
            data = json.loads(plaintext.decode("utf-8"))
            if matches is not None:
                data[_MATCHES_KEY] = json.loads(matches.decode("utf-8"))
            out.append((jid, state, data))
        return out

    def _state_ad(self, job_id: str, state: str) -> bytes:
        return encode(_JOB_STATE_AD_TAG, self._store_id.encode(), job_id.encode(),
                      state.encode())

    def _insert_rows(
        self, conn: sqlite3.Connection, job_id: str, authorization_id: str,
        expires_at: float, plaintexts: list[bytes], first_row_no: int,
    ) -> None:
        """Encrypt and insert rows numbered from ``first_row_no``; each row's number is in
        its associated data, so it must be the number it is stored (and read back) under."""
        conn.executemany(
            "INSERT INTO results (job_id, row_no, nonce, ciphertext) VALUES (?, ?, ?, ?)",
            self._seal_all(job_id, authorization_id, expires_at, plaintexts, first_row_no),
        )

    def _seal_all(
        self, job_id: str, authorization_id: str, expires_at: float, plaintexts: list[bytes],
        first_row_no: int,
    ) -> Iterator[tuple[str, int, bytes, bytes]]:
        for row_no, plaintext in enumerate(plaintexts, first_row_no):
            nonce = os.urandom(_NONCE_LEN)
            ad = _row_ad(self._store_id, job_id, row_no, authorization_id, expires_at)
            yield job_id, row_no, nonce, self._aead.encrypt(nonce, plaintext, ad)

    def _mac(self, header: bytes) -> bytes:
        return hmac.new(self._mac_key, header, hashlib.sha256).digest()

    # -- reading -------------------------------------------------------------------------------

    def read_results(self, job_id: str, *, operator: str, purpose: str) -> list[dict[str, Any]]:
        """Decrypt a job's rows for ``operator``, who must state a ``purpose``; logged first.

        Lapsed jobs are purged before the read, so expired rows are never returned; an unknown
        or purged job reads as empty (and the attempt is still logged).
        """
        _require_text("job_id", job_id)
        _require_text("operator", operator)
        _require_text("purpose", purpose)
        self.purge_expired()
        with self._lock:
            meta, rows = self._open_job(job_id, operator=operator)
            self._log(
                RESULTS_READ,
                job_id=job_id,
                authorization_id=None if meta is None else meta["authorization_id"],
                operator=operator,
                purpose=purpose,
                count=len(rows),
            )
        return rows

    def export_results(self, job_id: str, dest: Path, *, operator: str, purpose: str) -> int:
        """Write a job's rows as a **plaintext** CSV at ``dest`` (mode 0600); returns the count.

        Export is the one way results leave encryption, and it moves responsibility for them to
        the operator: the file is outside this store's retention and audit, so it must be
        handled and destroyed under the agency's own rules by ``expires_at_utc`` (a column of
        every row). The export is logged (operator, purpose, destination, count) before the file
        is written. ``dest`` must not exist. Cells that a spreadsheet would run as a formula are
        prefixed with ``'``.
        """
        _require_text("job_id", job_id)
        _require_text("operator", operator)
        _require_text("purpose", purpose)
        dest = Path(dest)
        if dest.exists() or dest.is_symlink():
            raise FileExistsError(f"export destination {dest} already exists")
        self.purge_expired()
        with self._lock:
            meta, rows = self._open_job(job_id, operator=operator)
            if meta is None:
                raise LookupError(f"no stored results for job {job_id!r} (unknown or purged)")
            self._log(
                RESULTS_EXPORTED,
                job_id=job_id,
                authorization_id=meta["authorization_id"],
                operator=operator,
                purpose=purpose,
                count=len(rows),
                dest=str(dest.resolve()),
            )
        _write_csv(dest, job_id, meta, rows)
        return len(rows)

    def _open_job(
        self, job_id: str, *, operator: str
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """Authenticate and decrypt one job; a failure is logged and raised."""
        conn = self._connection()
        row = conn.execute(
            "SELECT authorization_id, rows, stored_at, expires_at, retention_days, header_mac "
            "FROM jobs WHERE job_id = ?",
            (job_id,),
        ).fetchone()
        if row is None:
            return None, []
        authorization_id, count, stored_at, expires_at, retention_days, mac = row
        meta = {
            "job_id": job_id,
            "authorization_id": authorization_id,
            "rows": count,
            "stored_at": stored_at,
            "expires_at": expires_at,
            "retention_days": retention_days,
        }
        if expires_at <= float(self._clock()):  # lapsed since the purge a moment ago
            return None, []
        try:
            header = _job_header(
                self._store_id,
                job_id,
                authorization_id,
                count,
                stored_at,
                expires_at,
                retention_days,
            )
            if not hmac.compare_digest(bytes(mac), self._mac(header)):
                raise ResultIntegrityError(
                    f"job {job_id!r}: its metadata (authorization, row count or expiry) fails "
                    "authentication"
                )
            stored = conn.execute(
                "SELECT row_no, nonce, ciphertext FROM results WHERE job_id = ? ORDER BY row_no",
                (job_id,),
            ).fetchall()
            if [r[0] for r in stored] != list(range(count)):
                raise ResultIntegrityError(
                    f"job {job_id!r}: expected rows 0..{count - 1}, found {len(stored)} rows "
                    "(rows were removed or added)"
                )
            rows = [
                self._open_row(job_id, row_no, authorization_id, expires_at, nonce, ct)
                for row_no, nonce, ct in stored
            ]
        except ResultIntegrityError as exc:
            self._log(
                RESULTS_INTEGRITY_FAILURE,
                job_id=job_id,
                authorization_id=authorization_id,
                operator=operator,
                detail=str(exc),
            )
            raise
        return meta, rows

    def _open_row(
        self,
        job_id: str,
        row_no: int,
        authorization_id: str,
        expires_at: float,
        nonce: bytes,
        ciphertext: bytes,
    ) -> dict[str, Any]:
        ad = _row_ad(self._store_id, job_id, row_no, authorization_id, expires_at)
        try:
            plaintext = self._aead.decrypt(bytes(nonce), bytes(ciphertext), ad)
        except (InvalidTag, ValueError):
            raise ResultIntegrityError(
                f"job {job_id!r} row {row_no} fails authentication (wrong key, tampered "
                "ciphertext, or a row moved from another job)"
            ) from None
        value = json.loads(plaintext.decode("utf-8"))
        if not isinstance(value, dict):
            raise ResultIntegrityError(f"job {job_id!r} row {row_no} is not a result row")
        return value

    # -- retention -----------------------------------------------------------------------------

    def purge_expired(self, now: float | None = None) -> int:
        """Delete every job whose retention has lapsed (``expires_at <= now``); returns rows.

        Each purged job gets its own ``results_purged`` audit entry, logged before the delete
        commits. Afterwards the file is ``VACUUM`` ed so the purged bytes are gone from it.
        """
        when = float(self._clock()) if now is None else float(now)
        with self._lock:
            with self._db.write() as conn:
                lapsed = conn.execute(
                    "SELECT job_id, authorization_id, expires_at FROM jobs WHERE expires_at <= ? "
                    "ORDER BY expires_at, job_id",
                    (when,),
                ).fetchall()
                total = 0
                for job_id, authorization_id, expires_at in lapsed:
                    n = self._delete_job(conn, job_id)
                    total += n
                    self._log(
                        RESULTS_PURGED,
                        job_id=job_id,
                        authorization_id=authorization_id,
                        operator=_RETENTION_OPERATOR,
                        reason="retention_expired",
                        count=n,
                        expires_at=expires_at,
                    )
                # Rows whose job header is gone cannot be authenticated; never keep them.
                orphans = conn.execute(
                    "DELETE FROM results WHERE job_id NOT IN (SELECT job_id FROM jobs)"
                ).rowcount
                orphans += conn.execute(
                    "DELETE FROM job_state WHERE job_id NOT IN (SELECT job_id FROM jobs)"
                ).rowcount
                orphans += conn.execute(
                    "DELETE FROM job_state_matches WHERE job_id NOT IN (SELECT job_id FROM jobs)"
                ).rowcount
                if orphans:
                    self._matches_written.clear()  # cheap to forget: one rewrite each
            if lapsed or orphans:
                self._vacuum()
        return total

    def purge_job(self, job_id: str, *, operator: str, reason: str) -> int:
        """Delete one job's rows now, at an operator's request; returns the rows deleted."""
        _require_text("job_id", job_id)
        _require_text("operator", operator)
        _require_text("reason", reason)
        with self._lock:
            with self._db.write() as conn:
                row = conn.execute(
                    "SELECT authorization_id FROM jobs WHERE job_id = ?", (job_id,)
                ).fetchone()
                n = self._delete_job(conn, job_id)
                self._log(
                    RESULTS_PURGED,
                    job_id=job_id,
                    authorization_id=None if row is None else row[0],
                    operator=operator,
                    reason=reason,
                    count=n,
                )
            if row is not None or n:
                self._vacuum()
        return n

    def _delete_job(self, conn: sqlite3.Connection, job_id: str) -> int:
        self._matches_written.pop(job_id, None)
        n = conn.execute("DELETE FROM results WHERE job_id = ?", (job_id,)).rowcount
        conn.execute("DELETE FROM job_state WHERE job_id = ?", (job_id,))
        conn.execute("DELETE FROM job_state_matches WHERE job_id = ?", (job_id,))
        conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
        return n

    def _vacuum(self) -> None:
        """Rebuild the file so no page, free or not, still holds purged bytes."""
        self._connection().execute("VACUUM")

    def start_purger(self, interval_s: float) -> threading.Thread:
        """Run :meth:`purge_expired` every ``interval_s`` seconds on a daemon thread."""
        if not (isinstance(interval_s, int | float) and interval_s > 0):
            raise ValueError("interval_s must be a positive number")
        with self._lock:
            self._connection()
            if self._purger is not None and self._purger.is_alive():
                raise RuntimeError("the purger is already running")
            self._stop.clear()
            thread = threading.Thread(
                target=self._purge_loop,
                args=(float(interval_s),),
                name="result-store-purger",
                daemon=True,
            )
            self._purger = thread
            thread.start()
        return thread

    def stop_purger(self) -> None:
        """Stop the background purger and wait for it; a no-op if none is running."""
        self._stop.set()
        thread = self._purger
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._purger = None

    def _purge_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.purge_expired()
            except Exception:
                # Keep enforcing retention on the next tick; the failure must still be seen.
                log.exception("result-store purge failed; retrying in %.1f s", interval_s)

    # -- metadata and accounting ---------------------------------------------------------------

    def jobs(self) -> list[dict[str, Any]]:
        """Metadata of the stored (unexpired) jobs, never their content; oldest first."""
        self.purge_expired()
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT job_id, authorization_id, rows, stored_at, expires_at, retention_days "
                    "FROM jobs ORDER BY stored_at, job_id"
                )
                .fetchall()
            )
        return [
            {
                "job_id": r[0],
                "authorization_id": r[1],
                "rows": r[2],
                "stored_at": r[3],
                "expires_at": r[4],
                "retention_days": r[5],
            }
            for r in rows
        ]

    def access_log(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """This store's audit entries (optionally for one job), oldest first.

        Each dict has the ledger's ``seq``, ``at``, ``kind`` and ``entry_hash`` (hex) plus the
        entry's payload fields (job_id, operator, purpose, count, ...).
        """
        out: list[dict[str, Any]] = []
        for entry in self._audit.audit_entries():
            payload = entry.payload
            if entry.kind not in AUDIT_KINDS or payload.get("store_id") != self._store_id:
                continue
            if job_id is not None and payload.get("job_id") != job_id:
                continue
            out.append(
                {
                    "seq": entry.seq,
                    "at": entry.at,
                    "kind": entry.kind,
                    "entry_hash": entry.entry_hash.hex(),
                    **payload,
                }
            )
        return out

    def _log(self, kind: str, **payload: Any) -> None:
        self._audit.audit(kind, {"store_id": self._store_id, **payload})


# --------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------


def _refuse_key_beside(key_path: Path, db_path: Path) -> None:
    """Refuse a key file inside the database's directory (or below it)."""
    key_dir = key_path.resolve().parent
    db_dir = db_path.resolve().parent
    if key_dir == db_dir or db_dir in key_dir.parents:
        raise ValueError(
            f"key file {key_path} is stored with the result database in {db_dir}; keep the key "
            "elsewhere (or in the environment) so a copy of the data is not a copy of the key"
        )


def _configure(conn: sqlite3.Connection) -> None:
    mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    if str(mode).lower() != "delete":
        raise ValueError(f"result store needs journal_mode=DELETE, SQLite gave {mode!r}")
    conn.execute("PRAGMA secure_delete=ON")
    if conn.execute("PRAGMA secure_delete").fetchone()[0] != 1:
        raise ValueError("this SQLite build cannot enable secure_delete")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA temp_store=MEMORY")  # VACUUM's scratch copy never touches disk


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        return json.dumps(value)
    else:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def _write_csv(
    dest: Path, job_id: str, meta: Mapping[str, Any], rows: list[dict[str, Any]]
) -> None:
    """Columns: job metadata, the row's own keys, then one ``fields.<name>`` per field."""
    top: list[str] = list(_REQUIRED_ROW_KEYS[:3])
    top += sorted({k for r in rows for k in r} - set(_REQUIRED_ROW_KEYS))
    field_names = sorted({f for r in rows for f in r.get("fields", {})})
    header = [*_FIXED_CSV_COLUMNS, *top, *(f"fields.{f}" for f in field_names)]
    expires = _iso_utc(meta["expires_at"])
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fh = os.fdopen(os.open(dest, flags, 0o600), "w", encoding="utf-8", newline="")
    try:
        with fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o600)
            writer = csv.writer(fh)
            writer.writerow(header)
            for i, r in enumerate(rows):
                fields = r.get("fields", {})
                writer.writerow(
                    [
                        _csv_cell(job_id),
                        str(i),
                        _csv_cell(meta["authorization_id"]),
                        expires,
                        *(_csv_cell(r.get(k)) for k in top),
                        *(_csv_cell(fields.get(f)) for f in field_names),
                    ]
                )
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


RESULT_FORMATS = ("text", "csv", "json")


def format_result_rows(rows: Sequence[Mapping[str, Any]], fmt: str) -> str:
    """Decrypted result rows as an operator reads them: ``text`` (tab-separated, for a
    terminal), ``csv`` (one ``fields.<name>`` column per disclosed field, formula-looking
    cells prefixed with ``'`` as in :meth:`ResultStore.export_results`) or ``json``.

    Rows carry ``query_record_id``, ``rule_id``, ``pseudonym`` and a ``fields`` mapping.
    """
    if fmt == "json":
        return json.dumps([dict(r) for r in rows], indent=2, ensure_ascii=False) + "\n"
    if fmt == "text":
        return "".join(
            f"{r['query_record_id']}\t{r['rule_id']}\t"
            + ", ".join(f"{k}={v}" for k, v in r["fields"].items()) + "\n"
            for r in rows)
    if fmt != "csv":
        raise ValueError(f"unknown result format {fmt!r}; one of {', '.join(RESULT_FORMATS)}")
    top = list(_REQUIRED_ROW_KEYS[:3])
    field_names = sorted({f for r in rows for f in r["fields"]})
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow([*top, *(f"fields.{f}" for f in field_names)])
    for r in rows:
        writer.writerow([*(_csv_cell(r.get(k)) for k in top),
                         *(_csv_cell(r["fields"].get(f)) for f in field_names)])
    return buffer.getvalue()
