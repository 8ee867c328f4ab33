"""One SQLite file behind one connection: opening with retry, and durable transactions.

Shared by the custodian's ledger and the requester's result store, which both need the same
discipline (docs/architecture.md, Adapters):

* every mutating method is exactly one ``BEGIN IMMEDIATE ... COMMIT`` transaction, so a
  SIGKILL at any instant leaves either all of its effects or none, and writers in different
  processes sharing the file are serialised;
* within a process one connection is shared by all threads behind a re-entrant lock (the
  gRPC servers are multi-threaded);
* opening right after another process was killed can meet that file's WAL recovery: SQLite
  then answers "database is locked" at once, without waiting on the busy handler, so opening
  (configuration and schema set-up included) retries with backoff for as long as the busy
  timeout;
* the file is created owner-only (0600) before SQLite opens it, so its journal, WAL and
  shared-memory sidecars, which SQLite creates with the database's mode, are 0600 as well
  (docs/architecture.md, Files and logs).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from protocol.adapters.files import create_private_file

__all__ = ["BUSY_TIMEOUT_MS", "SqliteDatabase", "split_sql"]

BUSY_TIMEOUT_MS = 30_000
"""How long a statement waits for another writer, and how long opening keeps retrying."""


class SqliteDatabase:
    """A configured connection to one file, with write and read transactions.

    ``configure`` sets the connection's pragmas; ``initialize`` then creates or checks the
    schema (normally in one :meth:`write`). Both run again on each retry of the open.
    ``error`` builds the exception for a file that stays locked or a closed database.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        configure: Callable[[sqlite3.Connection], None],
        initialize: Callable[[SqliteDatabase], None],
        error: Callable[[str], Exception],
        name: str = "database",
    ) -> None:
        self._path = os.fspath(path)
        self._configure = configure
        self._initialize = initialize
        self._error = error
        self._name = name
        self.lock = threading.RLock()
        """Held by every transaction; hold it too around several statements without one."""
        self._conn: sqlite3.Connection | None = None
        timeout_ms = BUSY_TIMEOUT_MS  # read at call time, so tests can shorten it
        deadline = time.monotonic() + timeout_ms / 1000
        pause = 0.01
        while True:
            try:
                self._open(timeout_ms)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() + pause > deadline:
                    raise self._error(f"{self._name} {self._path} stayed locked: {exc}") from exc
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def _open(self, timeout_ms: int) -> None:
        if self._path != ":memory:" and not self._path.startswith("file:"):
            create_private_file(self._path)
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=timeout_ms / 1000
        )
        try:
            self._configure(conn)
            conn.execute(f"PRAGMA busy_timeout={int(timeout_ms)}")
            self._conn = conn
            self._initialize(self)
        except BaseException:
            self._conn = None
            conn.close()
            raise

    @property
    def path(self) -> str:
        return self._path

    def connection(self) -> sqlite3.Connection:
        """The open connection; use it under :attr:`lock` or inside a transaction."""
        if self._conn is None:
            raise self._error(f"{self._name} is closed")
        return self._conn

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE ... COMMIT``; any exception rolls the whole block back."""
        with self.lock:
            conn = self.connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction, so multi-statement reads see one consistent snapshot.

        Nested inside another read or write of this thread, it joins that transaction.
        """
        with self.lock:
            conn = self.connection()
            if conn.in_transaction:
                yield conn
                return
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")


def split_sql(script: str) -> list[str]:
    """Split a schema script into statements; trigger bodies end in ``END;``."""
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
