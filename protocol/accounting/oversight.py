"""Accountability that a third party can check: ledger verification, signed checkpoints,
oversight exports and the cross-agency oversight check (DESIGN §4 step 6, issue 6).

The court found that nobody could check what had been disclosed. Each agency therefore keeps a
hash-chained audit log (the ledger) and pins its head with Ed25519 signatures; at the
end of every session both agencies hold the same receipt with both signatures. This module is
what an inspector runs on top of that:

* :func:`verify_ledger` re-derives an agency's chain and its signed checkpoints and names the
  first bad position and the kind of damage (edited, deleted, inserted, reordered, rewritten,
  truncated), so ``agency-a audit verify`` / ``agency-b audit verify`` can say *where* and
  *what*, not only *that*.
* :class:`Checkpointer` adds a signed checkpoint every few seconds and one at shutdown, so a
  wholesale rewrite of the chain (recomputing every hash) contradicts a signature.
* :func:`custodian_export` / :func:`requester_export` produce, for one authorization, the JSON an
  inspector needs: counts, receipts with both signatures and transcript hashes, the chain head,
  and the newest signed checkpoint together with the few entries after it (the *tail*) so the
  head itself is provably covered by a signature.
* :func:`check` compares the two exports: counts, transcript hashes, both signatures on every
  receipt, and coverage of both chain heads by valid checkpoints. Each finding is reported.

Everything here is pure library code over a ledger; the small
``*_command`` helpers at the end are the shared bodies of the agency and authority CLIs.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import sqlite3
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.adapters.sqlite_ledger import (
    ZERO_HASH,
    Checkpoint,
    Ledger,
    audit_entry_hash,
    canonical_json,
    checkpoint_message,
)
from protocol.domain.messages import RECEIPT_DOMAIN, Receipt
from protocol.errors import LedgerError, ProtocolError, PSIError

__all__ = [
    "EXPORT_FORMAT",
    "MAX_TAIL_ENTRIES",
    "OVERSIGHT_DESCRIPTION",
    "RECEIPT_AUDIT_KIND",
    "ChainReport",
    "Checkpointer",
    "Finding",
    "OversightReport",
    "add_oversight_arguments",
    "add_signed_checkpoint",
    "audit_verify_command",
    "check",
    "custodian_export",
    "export_command",
    "load_public_key",
    "parse_receipt_bytes",
    "record_receipt",
    "requester_export",
    "run_oversight_cli",
    "signing_key_id",
    "verify_ledger",
    "write_export",
]

log = logging.getLogger("protocol.accounting.oversight")

EXPORT_FORMAT = "gated-psi/oversight-export/v1"
RECEIPT_AUDIT_KIND = "receipt"
"""Audit-entry kind under which the requester keeps each countersigned receipt."""
MAX_TAIL_ENTRIES = 10_000
"""Entries after the newest checkpoint that an export carries; beyond it, checkpoint first."""

_REQUESTER_STORE_KINDS = (
    "results_stored",
    "results_read",
    "results_exported",
    "results_purged",
    "results_integrity_failure",
)


# --------------------------------------------------------------------------------------------
# Keys and checkpoints
# --------------------------------------------------------------------------------------------


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def signing_key_id(public_key: Ed25519PublicKey) -> str:
    """Short id of an agency signing key: hex SHA-256 of the raw public key, first 16 chars.

    Stored with every checkpoint so a verifier can tell "signed by someone else" apart from
    "signature does not verify".
    """
    if not isinstance(public_key, Ed25519PublicKey):
        raise ValueError("signing key must be an Ed25519 public key")
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a ``signing.pub.json`` (``{"public_key": hex}``) as written by the agency CLIs."""
    try:
        doc = json.loads(Path(path).read_text())
        raw = bytes.fromhex(str(doc["public_key"]).strip())
        return Ed25519PublicKey.from_public_bytes(raw)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not an Ed25519 public key file: {exc}") from exc


def add_signed_checkpoint(ledger: Ledger, signing_key: Ed25519PrivateKey) -> Checkpoint:
    """Pin the ledger's current head with an Ed25519 signature by the agency's key."""
    return ledger.add_checkpoint(signing_key.sign, signing_key_id(signing_key.public_key()))


class Checkpointer:
    """Adds a signed checkpoint every ``interval_s`` seconds, and a last one on :meth:`stop`.

    A tick is skipped when nothing but the previous checkpoint's own entry was appended since
    then, so an idle service does not grow its chain with checkpoints of checkpoints.
    ``interval_s <= 0`` disables the periodic thread but keeps the shutdown checkpoint.
    """

    def __init__(
        self, ledger: Ledger, signing_key: Ed25519PrivateKey, interval_s: float = 30.0
    ) -> None:
        self._ledger = ledger
        self._key = signing_key
        self._interval = float(interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.added = 0

    def checkpoint_now(self, *, force: bool = False) -> Checkpoint | None:
        """Add a checkpoint unless the chain has not moved since the last one (or ``force``)."""
        with self._lock:
            if not force:
                existing = self._ledger.checkpoints()
                head_seq, _ = self._ledger.audit_head()
                if existing and head_seq <= existing[-1].seq + 1:
                    return None
            cp = add_signed_checkpoint(self._ledger, self._key)
            self.added += 1
            return cp

    def start(self) -> Checkpointer:
        """Start the periodic thread (a daemon; :meth:`stop` ends it)."""
        if self._interval > 0 and self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="audit-checkpointer", daemon=True
            )
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.checkpoint_now()
            except Exception:
                # A missed checkpoint must be visible but must not stop the next one.
                log.exception("audit checkpoint failed; retrying in %.1f s", self._interval)

    def stop(self) -> Checkpoint | None:
        """Stop the thread and add the shutdown checkpoint (if the chain moved)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        return self.checkpoint_now()


# --------------------------------------------------------------------------------------------
# Ledger verification (the "audit verify" commands)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainReport:
    """Outcome of :func:`verify_ledger`.

    ``first_bad_seq`` is the first position known to be damaged and ``damage`` its kind:
    ``edited``, ``deleted``, ``inserted``, ``reordered``, ``unlinked`` (the link to the previous
    entry is wrong for another reason), ``rewritten`` (hashes recomputed but a checkpoint
    contradicts them; the damage lies in ``first_bad_seq..last_bad_seq``), ``truncated``,
    ``bad checkpoint signature``, ``foreign checkpoint key`` or ``unreadable``.
    """

    ok: bool
    entries: int
    head_seq: int
    head: bytes
    first_bad_seq: int | None = None
    last_bad_seq: int | None = None
    damage: str | None = None
    detail: str = ""
    checkpoints: int = 0
    checkpoints_verified: bool = False
    last_checkpoint_seq: int | None = None

    @property
    def uncovered(self) -> int:
        """Entries after the newest checkpoint (not yet pinned by a signature)."""
        if self.last_checkpoint_seq is None:
            return self.head_seq
        return max(self.head_seq - self.last_checkpoint_seq, 0)

    def summary(self) -> str:
        """One line for an operator or an inspector."""
        if not self.ok:
            where = f"first bad position {self.first_bad_seq}"
            if self.last_bad_seq is not None and self.last_bad_seq != self.first_bad_seq:
                where = f"bad positions {self.first_bad_seq}..{self.last_bad_seq}"
            return f"FAIL: {where}: {self.damage} ({self.detail})"
        if self.checkpoints_verified:
            cps = (
                f"{self.checkpoints} signed checkpoints verified, newest pins seq "
                f"{self.last_checkpoint_seq}, {self.uncovered} entries after it"
                if self.checkpoints
                else "no checkpoints yet"
            )
        else:
            cps = f"{self.checkpoints} checkpoints present, signatures not checked (no key given)"
        return f"OK: {self.entries} entries, head seq {self.head_seq} {self.head.hex()}; {cps}"


def verify_ledger(ledger: Ledger, public_key: Ed25519PublicKey | None = None) -> ChainReport:
    """Verify the hash chain and, given the agency's public key, every signed checkpoint.

    The chain is checked first (:meth:`Ledger.verify_audit_chain`); on failure the first bad
    position is classified. With a key, each checkpoint must carry that key's id, verify, fall
    inside the chain and equal the chain's hash at its position; a mismatch after an intact
    chain means the chain was rewritten with recomputed hashes somewhere after the previous
    matching checkpoint.
    """
    chain = ledger.verify_audit_chain()
    checkpoints = ledger.checkpoints()
    last_cp = checkpoints[-1].seq if checkpoints else None
    head_seq, head = ledger.audit_head()
    base = {
        "entries": chain.entries,
        "head_seq": head_seq,
        "head": head,
        "checkpoints": len(checkpoints),
        "last_checkpoint_seq": last_cp,
    }
    if not chain.ok:
        assert chain.first_bad_seq is not None
        position, damage, detail = _classify(ledger, chain.first_bad_seq, chain.head, chain.detail)
        return ChainReport(
            ok=False, first_bad_seq=position, damage=damage, detail=detail,
            **{**base, "head": chain.head},
        )
    if public_key is None:
        return ChainReport(ok=True, detail=chain.detail, **base)
    problem = _check_checkpoints(ledger, checkpoints, head_seq, public_key)
    if problem is not None:
        first, last, damage, detail = problem
        return ChainReport(
            ok=False, first_bad_seq=first, last_bad_seq=last, damage=damage, detail=detail,
            checkpoints_verified=True, **base,
        )
    return ChainReport(ok=True, detail=chain.detail, checkpoints_verified=True, **base)


def _stored_links(ledger: Ledger, start: int) -> tuple[list[tuple[int, bytes, bytes]], bool]:
    """``(seq, prev_hash, entry_hash)`` of stored entries from ``start``; False if unreadable."""
    rows: list[tuple[int, bytes, bytes]] = []
    try:
        for entry in ledger.audit_entries(start):
            rows.append((entry.seq, entry.prev_hash, entry.entry_hash))
    except LedgerError:
        return rows, False
    return rows, True


def _classify(ledger: Ledger, bad: int, good_head: bytes, detail: str) -> tuple[int, str, str]:
    """Name the kind of damage at the first position where the chain breaks.

    ``good_head`` is the hash of entry ``bad - 1`` (the last one that verified).
    """
    rows, readable = _stored_links(ledger, max(bad - 1, 1))
    by_seq = {seq: (prev, h) for seq, prev, h in rows}
    here = by_seq.get(bad)
    if here is None:
        if not readable and "missing" not in detail:
            return bad, "edited", f"entry {bad} payload is no longer JSON"
        return bad, "deleted", detail
    prev_here, _hash_here = here
    before = by_seq.get(bad - 1)
    after = by_seq.get(bad + 1)
    # An entry inserted with a correct link and hash: the displaced entry that follows it
    # still points at the inserted entry's predecessor.
    if before is not None and hmac.compare_digest(prev_here, before[0]):
        return bad - 1, "inserted", (
            f"entry {bad - 1} was inserted: entry {bad} links past it to entry {bad - 2}"
        )
    # An inserted entry without a valid hash: it and its successor claim the same predecessor.
    if after is not None and hmac.compare_digest(after[0], prev_here):
        return bad, "inserted", (
            f"entry {bad} was inserted: entry {bad + 1} links past it to entry {bad - 1}"
        )
    if not hmac.compare_digest(prev_here, good_head):
        for seq, _prev, h in rows:
            if seq > bad and hmac.compare_digest(prev_here, h):
                return bad, "reordered", (
                    f"entry {bad} belongs after the entry now stored at position {seq}"
                )
        return bad, "unlinked", (
            f"entry {bad} does not link to entry {bad - 1}: an entry before it was deleted "
            "and the rest renumbered, or its link was edited"
        )
    return bad, "edited", f"entry {bad} content does not match its hash"


def _ed25519_valid(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _check_checkpoints(
    ledger: Ledger, checkpoints: list[Checkpoint], head_seq: int, key: Ed25519PublicKey
) -> tuple[int, int | None, str, str] | None:
    """First checkpoint problem as ``(first_seq, last_seq, damage, detail)``, or None."""
    kid = signing_key_id(key)
    wanted = {cp.seq for cp in checkpoints if 0 < cp.seq <= head_seq}
    stored: dict[int, bytes] = {}
    if wanted:
        rows, readable = _stored_links(ledger, min(wanted))
        if not readable:
            first = rows[-1][0] + 1 if rows else min(wanted)
            return first, None, "unreadable", f"audit entry {first} has a payload that is not JSON"
        stored = {seq: h for seq, _prev, h in rows if seq in wanted}
    good_before = 0
    for cp in sorted(checkpoints, key=lambda c: c.seq):
        if cp.key_id != kid:
            return cp.seq, None, "foreign checkpoint key", (
                f"checkpoint at seq {cp.seq} names key {cp.key_id}, not the given key {kid}"
            )
        if not _ed25519_valid(key, cp.signature, checkpoint_message(cp.seq, cp.head)):
            return cp.seq, None, "bad checkpoint signature", (
                f"the signature of the checkpoint at seq {cp.seq} does not verify"
            )
        if cp.seq > head_seq:
            return head_seq + 1, cp.seq, "truncated", (
                f"a checkpoint pins seq {cp.seq} but the chain ends at seq {head_seq}: "
                f"entries {head_seq + 1}..{cp.seq} were removed"
            )
        expected = ZERO_HASH if cp.seq == 0 else stored.get(cp.seq)
        if expected is None or not hmac.compare_digest(cp.head, expected):
            return good_before + 1, cp.seq, "rewritten", (
                f"the checkpoint at seq {cp.seq} does not match the chain: entries "
                f"{good_before + 1}..{cp.seq} were rewritten with recomputed hashes"
            )
        good_before = max(good_before, cp.seq)
    # Belt and braces: the ledger's own check recomputes every hash from content.
    if checkpoints and not ledger.verify_checkpoints(
        lambda msg, sig: _ed25519_valid(key, sig, msg)
    ):
        return 1, good_before, "rewritten", "checkpoints do not match the recomputed chain"
    return None


# --------------------------------------------------------------------------------------------
# Receipts on the requester side
# --------------------------------------------------------------------------------------------


def record_receipt(ledger: Ledger, receipt: Receipt) -> None:
    """Keep a countersigned receipt in the requester's audit chain (both signatures).

    The requester's ledger has no session tables; the receipt is one audit entry of kind
    :data:`RECEIPT_AUDIT_KIND`, which :func:`requester_export` collects per authorization.
    """
    if not receipt.custodian_signature:
        raise ValueError("a receipt must carry the custodian's signature to be recorded")
    ledger.audit(RECEIPT_AUDIT_KIND, receipt.to_json())


def parse_receipt_bytes(
    data: bytes, custodian_signature: bytes = b"", requester_signature: bytes = b""
) -> Receipt:
    """Inverse of :meth:`Receipt.signed_bytes` (the form the custodian ledger stores)."""
    view = memoryview(bytes(data))
    pos = len(RECEIPT_DOMAIN)
    if bytes(view[:pos]) != RECEIPT_DOMAIN:
        raise ProtocolError("stored receipt does not start with the receipt domain tag")

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(view):
            raise ProtocolError("stored receipt is truncated")
        out = bytes(view[pos:pos + n])
        pos += n
        return out

    def lp() -> bytes:
        (n,) = struct.unpack(">I", take(4))
        return take(n)

    try:
        auth_id, session_id, custodian_id, requester_id = (lp().decode() for _ in range(4))
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"stored receipt has a non-UTF-8 id: {exc}") from exc
    evaluated, disclosed = struct.unpack(">QQ", take(16))
    transcript_hash = lp()
    if pos != len(view):
        raise ProtocolError("stored receipt has trailing bytes")
    receipt = Receipt(
        authorization_id=auth_id, session_id=session_id, custodian_id=custodian_id,
        requester_id=requester_id, evaluated=evaluated, disclosed=disclosed,
        transcript_hash=transcript_hash, custodian_signature=bytes(custodian_signature),
        requester_signature=bytes(requester_signature),
    )
    if receipt.signed_bytes() != bytes(data):
        raise ProtocolError("stored receipt is not in canonical form")
    return receipt


# --------------------------------------------------------------------------------------------
# Exports
# --------------------------------------------------------------------------------------------


def _chain_evidence(ledger: Ledger) -> dict[str, Any]:
    """Newest checkpoint plus every entry after it, so the head is provably covered."""
    checkpoints = ledger.checkpoints()
    evidence: dict[str, Any] = {
        "checkpoints": [_checkpoint_json(c) for c in checkpoints],
        "head_checkpoint": None,
        "tail": None,
        "tail_truncated": False,
    }
    if not checkpoints:
        seq, head = ledger.audit_head()
        evidence["audit_head"] = {"seq": seq, "hash": head.hex()}
        return evidence
    newest = max(checkpoints, key=lambda c: c.seq)
    tail: list[dict[str, Any]] = []
    seq, head = newest.seq, newest.head
    for entry in ledger.audit_entries(newest.seq + 1):
        if len(tail) >= MAX_TAIL_ENTRIES:
            evidence["tail_truncated"] = True
            break
        tail.append({
            "seq": entry.seq, "at": entry.at, "kind": entry.kind,
            "payload": dict(entry.payload), "prev_hash": entry.prev_hash.hex(),
            "entry_hash": entry.entry_hash.hex(),
        })
        seq, head = entry.seq, entry.entry_hash
    if evidence["tail_truncated"]:
        seq, head = ledger.audit_head()
    evidence.update(
        head_checkpoint=_checkpoint_json(newest), tail=tail,
        audit_head={"seq": seq, "hash": head.hex()},
    )
    return evidence


def _checkpoint_json(c: Checkpoint) -> dict[str, Any]:
    return {
        "seq": c.seq, "head": c.head.hex(), "key_id": c.key_id,
        "signature": c.signature.hex(), "created_at": c.created_at,
    }


def custodian_export(ledger: Ledger, auth_id: str) -> dict[str, Any]:
    """The custodian's oversight export for one authorization (see module docstring).

    Extends :meth:`Ledger.export` with decoded receipts (ids, counts, transcript hash and both
    signatures) and with the chain evidence (newest checkpoint and the tail after it).
    """
    doc = ledger.export(auth_id)
    receipts: list[dict[str, Any]] = []
    for r in ledger.receipts(auth_id):
        item: dict[str, Any] = {
            "session_id": r.session_id,
            "signed_bytes": r.receipt.hex(),
            "custodian_signature": r.custodian_signature.hex(),
            "requester_signature": (r.requester_signature or b"").hex(),
            "closed_at": r.closed_at,
        }
        try:
            decoded = parse_receipt_bytes(
                r.receipt, r.custodian_signature, r.requester_signature or b""
            )
        except ProtocolError as exc:
            item["parse_error"] = str(exc)
        else:
            item.update(decoded.to_json())
        receipts.append(item)
    evidence = _chain_evidence(ledger)
    return {
        **doc,
        "format": EXPORT_FORMAT,
        "role": "custodian",
        "receipts": receipts,
        "counts": {
            "evaluated": doc["budget"]["evaluated"],
            "disclosed": doc["budget"]["disclosed"],
            "reserved": doc["budget"]["reserved"],
            "sessions": len(doc["sessions"]),
            "receipts": len(receipts),
        },
        **evidence,
    }


def requester_export(
    ledger: Ledger, auth_id: str, *, clock: Callable[[], float] = time.time
) -> dict[str, Any]:
    """The requester's oversight export for one authorization.

    Receipts come from :func:`record_receipt` entries; result-store activity (stored, read,
    exported, purged) is summarised from the store's audit entries, counts only.
    """
    receipts: dict[str, dict[str, Any]] = {}
    conflicts: list[str] = []
    activity: dict[str, int] = dict.fromkeys(_REQUESTER_STORE_KINDS, 0)
    stored_rows = 0
    jobs: set[str] = set()
    for entry in ledger.audit_entries():
        payload = entry.payload
        if entry.kind == RECEIPT_AUDIT_KIND and payload.get("authorization_id") == auth_id:
            sid = str(payload.get("session_id"))
            item = {**payload, "audit_seq": entry.seq, "recorded_at": entry.at}
            if sid in receipts and _receipt_core(receipts[sid]) != _receipt_core(item):
                conflicts.append(sid)
            receipts.setdefault(sid, item)
        elif entry.kind in activity and payload.get("authorization_id") == auth_id:
            activity[entry.kind] += 1
            if entry.kind == "results_stored":
                stored_rows += int(payload.get("count", 0))
                jobs.add(str(payload.get("job_id")))
    if not receipts and not any(activity.values()):
        raise LedgerError(f"the requester ledger has no record of authorization {auth_id!r}")
    items = list(receipts.values())
    evidence = _chain_evidence(ledger)
    return {
        "format": EXPORT_FORMAT,
        "role": "requester",
        "ledger_id": ledger.ledger_id,
        "auth_id": auth_id,
        "exported_at": float(clock()),
        "receipts": items,
        "receipt_conflicts": conflicts,
        "counts": {
            "evaluated": sum(int(r.get("evaluated", 0)) for r in items),
            "disclosed": sum(int(r.get("disclosed", 0)) for r in items),
            "receipts": len(items),
        },
        "results": {"jobs": len(jobs), "stored_rows": stored_rows, "events": activity},
        **evidence,
    }


def _receipt_core(item: Mapping[str, Any]) -> tuple[Any, ...]:
    keys = ("authorization_id", "session_id", "custodian_id", "requester_id", "evaluated",
            "disclosed", "transcript_hash", "custodian_signature", "requester_signature")
    return tuple(item.get(k) for k in keys)


def write_export(doc: Mapping[str, Any], dest: str | os.PathLike[str], *,
                 force: bool = False) -> None:
    """Write an export atomically, owner-only (it names disclosed records)."""
    path = Path(dest)
    if not force and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} already exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o600)
            json.dump(doc, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# The oversight check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One check and its outcome; ``session_id`` is set for per-receipt checks."""

    check: str
    ok: bool
    detail: str
    session_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "ok": self.ok, "detail": self.detail,
                "session_id": self.session_id}


@dataclass(frozen=True)
class OversightReport:
    """Every finding of :func:`check`; the agencies agree iff every finding is ok."""

    authorization_id: str
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def agree(self) -> bool:
        return all(f.ok for f in self.findings)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def by_check(self, name: str) -> list[Finding]:
        return [f for f in self.findings if f.check == name]

    def to_json(self) -> dict[str, Any]:
        return {"authorization_id": self.authorization_id, "agree": self.agree,
                "findings": [f.to_json() for f in self.findings]}

    def lines(self) -> list[str]:
        out = []
        for f in self.findings:
            where = f" [{f.session_id}]" if f.session_id else ""
            out.append(f"{'ok  ' if f.ok else 'FAIL'} {f.check}{where}: {f.detail}")
        verdict = "AGREE" if self.agree else f"DISAGREE ({len(self.failures)} findings)"
        out.append(f"{verdict}: authorization {self.authorization_id}")
        return out


class _Findings:
    def __init__(self) -> None:
        self.items: list[Finding] = []

    def add(self, check_name: str, ok: bool, detail: str, session_id: str | None = None) -> None:
        self.items.append(Finding(check_name, bool(ok), detail, session_id))


def check(
    custodian_export: Mapping[str, Any],
    requester_export: Mapping[str, Any],
    *,
    custodian_key: Ed25519PublicKey,
    requester_key: Ed25519PublicKey,
) -> OversightReport:
    """Compare both agencies' exports for one authorization, as an inspector general would.

    Checks: both exports are for the same authorization; each chain head is covered by a
    checkpoint that verifies under that agency's key (newest checkpoint plus a tail that hashes
    to the head); evaluated and disclosed totals agree; every receipt exists on both sides with
    the same counts and transcript hash and both signatures verify on each copy; the custodian's
    own per-session accounting matches its receipts; no session consumed budget or disclosed
    records without a receipt; the totals are within the authorization's limits.
    """
    f = _Findings()
    auth_id = str(custodian_export.get("auth_id", ""))
    for label, doc, role in (("custodian", custodian_export, "custodian"),
                             ("requester", requester_export, "requester")):
        ok = doc.get("format") == EXPORT_FORMAT and doc.get("role") == role
        f.add("export.format", ok,
              f"{label} export is {doc.get('role')!r} in format {doc.get('format')!r}")
    same = auth_id != "" and requester_export.get("auth_id") == auth_id
    f.add("export.authorization", same,
          f"custodian export is for {auth_id!r}, requester export for "
          f"{requester_export.get('auth_id')!r}")
    _check_chain(f, "custodian", custodian_export, custodian_key)
    _check_chain(f, "requester", requester_export, requester_key)

    c_receipts = _index_receipts(f, "custodian", custodian_export.get("receipts", []))
    r_receipts = _index_receipts(f, "requester", requester_export.get("receipts", []))
    for sid in requester_export.get("receipt_conflicts", []) or []:
        f.add("receipt.conflict", False,
              "the requester ledger holds two different receipts for this session", sid)

    counts = custodian_export.get("budget", {})
    c_eval, c_disc = int(counts.get("evaluated", -1)), int(counts.get("disclosed", -1))
    r_eval = sum(r.evaluated for r in r_receipts.values())
    r_disc = sum(r.disclosed for r in r_receipts.values())
    f.add("counts.evaluated", c_eval == r_eval,
          f"custodian ledger counts {c_eval} evaluated elements; requester receipts account "
          f"for {r_eval}")
    f.add("counts.disclosed", c_disc == r_disc,
          f"custodian ledger counts {c_disc} disclosed records; requester receipts account "
          f"for {r_disc}")
    limits = custodian_export.get("authorization", {})
    max_q, max_d = limits.get("max_queries"), limits.get("max_disclosures")
    within = (
        isinstance(max_q, int) and isinstance(max_d, int)
        and 0 <= int(counts.get("reserved", 0)) <= max_q and c_eval <= max_q and c_disc <= max_d
    )
    f.add("limits", within,
          f"reserved {counts.get('reserved')}, evaluated {c_eval} of max_queries {max_q}; "
          f"disclosed {c_disc} of max_disclosures {max_d}")

    sessions = {s["session_id"]: s for s in custodian_export.get("sessions", [])}
    disclosed_by_session: dict[str, int] = {}
    for d in custodian_export.get("disclosures", []):
        sid = d.get("session_id")
        disclosed_by_session[sid] = disclosed_by_session.get(sid, 0) + 1
    for sid in sorted(set(c_receipts) | set(r_receipts)):
        _check_receipt_pair(
            f, sid, c_receipts.get(sid), r_receipts.get(sid), custodian_key, requester_key,
            auth_id, sessions.get(sid), disclosed_by_session.get(sid, 0),
        )
    for sid, s in sessions.items():
        if sid in c_receipts:
            continue
        used = int(s.get("evaluated") or 0)
        released = disclosed_by_session.get(sid, 0)
        if used or released:
            f.add("session.unreceipted", False,
                  f"custodian session evaluated {used} elements and disclosed {released} records "
                  "but was never closed with a receipt", sid)
    return OversightReport(authorization_id=auth_id, findings=tuple(f.items))


def _check_chain(f: _Findings, label: str, doc: Mapping[str, Any],
                 key: Ed25519PublicKey) -> None:
    """Every checkpoint verifies under ``key``; the newest plus the tail reach the head."""
    kid = signing_key_id(key)
    bad = []
    for cp in doc.get("checkpoints", []) or []:
        try:
            msg = checkpoint_message(int(cp["seq"]), bytes.fromhex(cp["head"]))
            sig = bytes.fromhex(cp["signature"])
        except (KeyError, TypeError, ValueError):
            bad.append(f"malformed checkpoint {cp!r}")
            continue
        if cp.get("key_id") != kid or not _ed25519_valid(key, sig, msg):
            bad.append(f"checkpoint at seq {cp.get('seq')} (key {cp.get('key_id')})")
    n = len(doc.get("checkpoints", []) or [])
    f.add(f"checkpoints.{label}", not bad,
          f"all {n} checkpoints verify under key {kid}" if not bad
          else f"do not verify under key {kid}: {', '.join(bad)}")
    ok, detail = _head_covered(doc, key, kid)
    f.add(f"chain.{label}", ok, detail)


def _head_covered(doc: Mapping[str, Any], key: Ed25519PublicKey, kid: str) -> tuple[bool, str]:
    head = doc.get("audit_head") or {}
    cp = doc.get("head_checkpoint")
    if not cp:
        return False, "no signed checkpoint: the chain head is not covered"
    if doc.get("tail_truncated"):
        return False, (f"more than {MAX_TAIL_ENTRIES} entries after the newest checkpoint; "
                       "export again after a fresh checkpoint")
    try:
        seq, prev = int(cp["seq"]), bytes.fromhex(cp["head"])
        valid = cp.get("key_id") == kid and _ed25519_valid(
            key, bytes.fromhex(cp["signature"]), checkpoint_message(seq, prev))
        if not valid:
            return False, f"the newest checkpoint (seq {seq}) does not verify under key {kid}"
        for e in doc.get("tail") or []:
            seq += 1
            if int(e["seq"]) != seq:
                return False, f"tail entry {e['seq']} is out of sequence (expected {seq})"
            if bytes.fromhex(e["prev_hash"]) != prev:
                return False, f"tail entry {seq} does not link to entry {seq - 1}"
            h = audit_entry_hash(prev, seq, float(e["at"]), str(e["kind"]),
                                 canonical_json(e["payload"]))
            if not hmac.compare_digest(h, bytes.fromhex(e["entry_hash"])):
                return False, f"tail entry {seq} does not match its hash"
            prev = h
        head_seq, head_hash = int(head["seq"]), bytes.fromhex(head["hash"])
    except (KeyError, TypeError, ValueError) as exc:
        return False, f"malformed chain evidence: {exc}"
    if seq != head_seq or not hmac.compare_digest(prev, head_hash):
        return False, (f"checkpoint and tail reach seq {seq}, but the export states head seq "
                       f"{head_seq} {head_hash.hex()[:16]}")
    n_tail = len(doc.get("tail") or [])
    return True, (f"head seq {head_seq} {head_hash.hex()[:16]} is covered: signed checkpoint at "
                  f"seq {cp['seq']} plus {n_tail} entries hashed onto it")


def _read_receipt(label: str, item: Any) -> Receipt:
    """One export receipt as a :class:`Receipt`; the custodian's must match its signed bytes."""
    if not isinstance(item, Mapping):
        raise ProtocolError("not an object")
    if "parse_error" in item:
        raise ProtocolError(str(item["parse_error"]))
    receipt = Receipt.from_json(item)
    stored = item.get("signed_bytes")
    if label == "custodian" and stored is not None and (
        receipt.signed_bytes() != bytes.fromhex(str(stored))
    ):
        raise ProtocolError("decoded fields differ from the stored signed bytes")
    return receipt


def _index_receipts(f: _Findings, label: str, items: Iterable[Any]) -> dict[str, Receipt]:
    out: dict[str, Receipt] = {}
    for item in items:
        sid = str(item.get("session_id")) if isinstance(item, Mapping) else None
        try:
            receipt = _read_receipt(label, item)
        except (ProtocolError, ValueError) as exc:
            f.add("receipt.readable", False, f"{label} receipt is unreadable: {exc}", sid)
            continue
        if receipt.session_id in out:
            f.add("receipt.duplicate", False, f"{label} export lists this session twice", sid)
            continue
        out[receipt.session_id] = receipt
    return out


def _check_receipt_pair(
    f: _Findings,
    sid: str,
    c: Receipt | None,
    r: Receipt | None,
    custodian_key: Ed25519PublicKey,
    requester_key: Ed25519PublicKey,
    auth_id: str,
    session: Mapping[str, Any] | None,
    disclosed_rows: int,
) -> None:
    if c is None or r is None:
        missing = "custodian" if c is None else "requester"
        f.add("receipt.present", False, f"the {missing} export has no receipt for this session",
              sid)
    for label, x in (("custodian", c), ("requester", r)):
        if x is None:
            continue
        if x.authorization_id != auth_id:
            f.add("receipt.fields", False,
                  f"{label} receipt names authorization {x.authorization_id!r}", sid)
        cs_ok = _ed25519_valid(custodian_key, x.custodian_signature, x.signed_bytes())
        f.add("receipt.custodian_signature", cs_ok,
              f"custodian signature on the {label}'s copy "
              + ("verifies" if cs_ok else "does NOT verify"), sid)
        if not x.requester_signature:
            f.add("receipt.requester_signature", False,
                  f"the {label}'s copy has no requester countersignature", sid)
        else:
            rs_ok = _ed25519_valid(requester_key, x.requester_signature,
                                   x.countersigned_bytes())
            f.add("receipt.requester_signature", rs_ok,
                  f"requester countersignature on the {label}'s copy "
                  + ("verifies" if rs_ok else "does NOT verify"), sid)
    if c is not None and r is not None:
        fields_c = (c.authorization_id, c.session_id, c.custodian_id, c.requester_id,
                    c.evaluated, c.disclosed)
        fields_r = (r.authorization_id, r.session_id, r.custodian_id, r.requester_id,
                    r.evaluated, r.disclosed)
        f.add("receipt.fields", fields_c == fields_r,
              f"custodian: evaluated {c.evaluated}, disclosed {c.disclosed}; "
              f"requester: evaluated {r.evaluated}, disclosed {r.disclosed}", sid)
        same_t = hmac.compare_digest(c.transcript_hash, r.transcript_hash)
        f.add("receipt.transcript_hash", same_t,
              "transcript hashes agree" if same_t else
              f"transcript hashes differ: custodian {c.transcript_hash.hex()[:16]}, "
              f"requester {r.transcript_hash.hex()[:16]}", sid)
    if c is not None and session is not None:
        ok = int(session.get("evaluated") or 0) == c.evaluated and disclosed_rows == c.disclosed
        f.add("receipt.ledger", ok,
              f"custodian ledger session: evaluated {session.get('evaluated')}, "
              f"{disclosed_rows} disclosure rows; its receipt says {c.evaluated} and "
              f"{c.disclosed}", sid)
    elif c is not None:
        f.add("receipt.ledger", False, "custodian receipt for a session its ledger lacks", sid)


# --------------------------------------------------------------------------------------------
# CLI bodies shared by agency-a, agency-b and psi-authority
# --------------------------------------------------------------------------------------------


def _open_existing(path: Path) -> Ledger:
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    return Ledger(path)


def audit_verify_command(ledger_path: str | os.PathLike[str], public_key_path: str | None,
                         out: TextIO | None = None) -> int:
    """``audit verify``: print OK or FAIL (first bad position, kind of damage); exit 0 / 1."""
    out = out or sys.stdout
    path = Path(ledger_path)
    key = load_public_key(public_key_path) if public_key_path else None
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    try:
        with Ledger(path) as ledger:
            report = verify_ledger(ledger, key)
    except (PSIError, sqlite3.DatabaseError) as exc:
        print(f"FAIL: {path} cannot be read as a ledger: unreadable ({exc})", file=out)
        return 1
    print(f"{path}: {report.summary()}", file=out)
    return 0 if report.ok else 1


def export_command(
    role: str,
    ledger_path: str | os.PathLike[str],
    auth_id: str,
    dest: str | os.PathLike[str],
    *,
    signing_key: Ed25519PrivateKey | None = None,
    force: bool = False,
    out: TextIO | None = None,
) -> int:
    """``export``: write the oversight export; with a key, pin the head with a checkpoint first."""
    out = out or sys.stdout
    with _open_existing(Path(ledger_path)) as ledger:
        if signing_key is not None:
            add_signed_checkpoint(ledger, signing_key)
        build = custodian_export if role == "custodian" else requester_export
        doc = build(ledger, auth_id)
    write_export(doc, dest, force=force)
    counts = doc["counts"]
    print(f"{role} export for {auth_id} written to {dest}: {counts['receipts']} receipts, "
          f"evaluated {counts['evaluated']}, disclosed {counts['disclosed']}, head seq "
          f"{doc['audit_head']['seq']}", file=out)
    return 0


OVERSIGHT_DESCRIPTION = (
    "Compare the custodian's and the requester's exports for one authorization: evaluated and "
    "disclosed counts, transcript hashes, both signatures on every receipt, and that both "
    "audit chain heads are covered by valid signed checkpoints. Every finding is printed.\n\n"
    "exit status: 0 the agencies agree, 1 they disagree, 2 usage error."
)


def add_oversight_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``psi-authority oversight``."""
    parser.add_argument("--custodian-export", required=True, metavar="FILE",
                        help="output of 'agency-b export'")
    parser.add_argument("--requester-export", required=True, metavar="FILE",
                        help="output of 'agency-a export'")
    parser.add_argument("--custodian-key", required=True, metavar="PUB.json",
                        help="the custodian's signing.pub.json")
    parser.add_argument("--requester-key", required=True, metavar="PUB.json",
                        help="the requester's signing.pub.json")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_oversight_cli(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Body of ``psi-authority oversight``; returns 0 (agree) or 1 (disagree)."""
    out = out or sys.stdout
    docs = []
    for name in (args.custodian_export, args.requester_export):
        try:
            docs.append(json.loads(Path(name).read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not JSON: {exc}") from exc
    report = check(docs[0], docs[1], custodian_key=load_public_key(args.custodian_key),
                   requester_key=load_public_key(args.requester_key))
    if args.json:
        print(json.dumps(report.to_json(), indent=2), file=out)
    else:
        for line in report.lines():
            print(line, file=out)
    return 0 if report.agree else 1



def add_ledger_commands(sub: Any, *, agency: str, location: str, location_help: str,
                        verify: Callable[..., int], export: Callable[..., int]) -> None:
    """``audit verify`` and ``export`` subcommands, the same for both agencies' CLIs.

    ``location`` is the flag naming where the agency's ledger is (``--ledger`` for the
    custodian, ``--data`` for the requester).
    """
    a = sub.add_parser("audit", help="audit-log tools")
    asub = a.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="verify the ledger's audit chain (exit 0 OK, 1 FAIL)",
                        description="Re-derive the hash chain and, with --public-key, every "
                        "signed checkpoint. Prints OK with the entry count and head, or FAIL "
                        "with the first bad position and the kind of damage.")
    v.add_argument(location, required=True, help=location_help)
    v.add_argument("--public-key", metavar="signing.pub.json",
                   help=f"the {agency}'s public key, to verify the signed checkpoints")
    v.set_defaults(func=verify)
    e = sub.add_parser("export", help="write the oversight export of one authorization",
                       description="Counts, receipts with both signatures, the audit head and "
                       "the newest signed checkpoint, as JSON for 'psi-authority oversight'.")
    e.add_argument(location, required=True, help=location_help)
    e.add_argument("--authorization", required=True, metavar="ID", help="authorization id")
    e.add_argument("--out", required=True, help="JSON file to write (mode 0600)")
    e.add_argument("--secrets", help="the agency's secrets directory: sign a fresh checkpoint "
                   "over the current head first")
    e.add_argument("--force", action="store_true", help="overwrite --out")
    e.set_defaults(func=export)
