"""Raw sqlite3 edits of a ledger file, the way someone with write access to the disk would.

Each function drops the append-only triggers first (an attacker with the file can), edits the
``audit_log`` or ``checkpoints`` table directly and commits. None of them go through
SQLite ledger; the ledger must be closed (or at least idle) while they run.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from protocol.accounting.chain import audit_entry_hash, canonical_json

_TRIGGERS = (
    "audit_log_no_update",
    "audit_log_no_delete",
    "checkpoints_no_update",
    "checkpoints_no_delete",
)
_COLS = "at, kind, payload, prev_hash, entry_hash"


@contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection with the append-only triggers removed; commits on success."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for name in _TRIGGERS:
            conn.execute(f"DROP TRIGGER IF EXISTS {name}")
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def entry_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0])


def edit_entry(path: Path, seq: int) -> None:
    """Replace entry ``seq``'s payload with other valid JSON (hash left as it was)."""
    with raw(path) as c:
        c.execute(
            "UPDATE audit_log SET payload = ? WHERE seq = ?", (canonical_json({"edited": seq}), seq)
        )


def delete_entry(path: Path, seq: int) -> None:
    """Remove entry ``seq`` and leave the gap."""
    with raw(path) as c:
        c.execute("DELETE FROM audit_log WHERE seq = ?", (seq,))


def delete_and_renumber(path: Path, seq: int) -> None:
    """Remove entry ``seq`` and shift the later entries down so no gap remains."""
    with raw(path) as c:
        c.execute("DELETE FROM audit_log WHERE seq = ?", (seq,))
        c.execute("UPDATE audit_log SET seq = -(seq - 1) WHERE seq > ?", (seq,))
        c.execute("UPDATE audit_log SET seq = -seq WHERE seq < 0")


def insert_entry(path: Path, seq: int, *, valid_hash: bool = True) -> None:
    """Insert a forged entry at ``seq`` (later entries move up by one).

    With ``valid_hash`` the forger links it to entry ``seq - 1`` and hashes it correctly, the
    strongest thing possible without rewriting everything after it.
    """
    with raw(path) as c:
        prev = c.execute("SELECT entry_hash FROM audit_log WHERE seq = ?", (seq - 1,)).fetchone()
        prev_hash = bytes(prev[0]) if prev else bytes(32)
        c.execute("UPDATE audit_log SET seq = -(seq + 1) WHERE seq >= ?", (seq,))
        c.execute("UPDATE audit_log SET seq = -seq WHERE seq < 0")
        at, kind = 1.0, "disclosure.recorded"
        payload = canonical_json({"auth_id": "forged", "record_id": "planted"})
        entry_hash = (
            audit_entry_hash(prev_hash, seq, at, kind, payload) if valid_hash else bytes(32)
        )
        c.execute(
            "INSERT INTO audit_log (seq, at, kind, payload, prev_hash, entry_hash) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (seq, at, kind, payload, prev_hash, entry_hash),
        )


def swap_entries(path: Path, a: int, b: int) -> None:
    """Exchange the stored contents of positions ``a`` and ``b`` (a reordering)."""
    with raw(path) as c:
        row_a = c.execute(f"SELECT {_COLS} FROM audit_log WHERE seq = ?", (a,)).fetchone()
        row_b = c.execute(f"SELECT {_COLS} FROM audit_log WHERE seq = ?", (b,)).fetchone()
        setter = "UPDATE audit_log SET at=?, kind=?, payload=?, prev_hash=?, entry_hash=? "
        c.execute(setter + "WHERE seq = ?", (*row_b, a))
        c.execute(setter + "WHERE seq = ?", (*row_a, b))


def rewrite_from(path: Path, seq: int) -> None:
    """Edit entry ``seq`` and recompute every hash and link after it (a wholesale rewrite)."""
    with raw(path) as c:
        c.execute(
            "UPDATE audit_log SET payload = ? WHERE seq = ?",
            (canonical_json({"rewritten": seq}), seq),
        )
        prev_row = c.execute(
            "SELECT entry_hash FROM audit_log WHERE seq = ?", (seq - 1,)
        ).fetchone()
        prev = bytes(prev_row[0]) if prev_row else bytes(32)
        rows = c.execute(
            "SELECT seq, at, kind, payload FROM audit_log WHERE seq >= ? ORDER BY seq", (seq,)
        ).fetchall()
        for s, at, kind, payload in rows:
            h = audit_entry_hash(prev, s, float(at), kind, payload)
            c.execute(
                "UPDATE audit_log SET prev_hash = ?, entry_hash = ? WHERE seq = ?", (prev, h, s)
            )
            prev = h


def truncate_after(path: Path, seq: int) -> None:
    """Delete every entry after ``seq`` (the chain itself stays consistent)."""
    with raw(path) as c:
        c.execute("DELETE FROM audit_log WHERE seq > ?", (seq,))


def corrupt_checkpoint_signature(path: Path, index: int = 0) -> None:
    """Flip a bit of the ``index``-th checkpoint's signature."""
    with raw(path) as c:
        rows = c.execute("SELECT id, signature FROM checkpoints ORDER BY id").fetchall()
        cid, sig = rows[index]
        sig = bytearray(sig)
        sig[0] ^= 1
        c.execute("UPDATE checkpoints SET signature = ? WHERE id = ?", (bytes(sig), cid))
