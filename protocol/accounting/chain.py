"""The audit chain, as pure functions over entries given as data (no storage).

Every ledger mutation appends an entry whose hash commits to the previous entry's hash and to
its own content, so editing, deleting, inserting or reordering stored entries breaks a link.
Signed checkpoints pin the head at a position, so even a chain rewritten with recomputed
hashes contradicts a signature. This module is the one definition of that hashing and of its
verification; ledgers (docs/architecture.md, Accounting) store entries and call it, and an
external verifier can run it on exported rows.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from protocol.crypto.encoding import encode, lp

__all__ = [
    "AUDIT_CHECKPOINT_TAG",
    "AUDIT_ENTRY_TAG",
    "DISCLOSURE_BATCH",
    "DISCLOSURE_RECORDED",
    "DISCLOSURE_REPEATED",
    "ZERO_HASH",
    "AuditEntry",
    "AuditVerification",
    "Checkpoint",
    "DisclosureAccount",
    "StoredEntry",
    "audit_entry_hash",
    "canonical_json",
    "canonical_payload",
    "chain_entries",
    "check_disclosure_accounts",
    "check_link",
    "checkpoint_message",
    "checkpoints_match",
    "disclosure_batch",
    "disclosure_rows_digest",
    "receipt_digest",
    "verify_chain",
]

AUDIT_ENTRY_TAG = b"gated-psi/audit-entry/v1"
AUDIT_CHECKPOINT_TAG = b"gated-psi/audit-checkpoint/v1"
ZERO_HASH = bytes(32)
"""``prev_hash`` of the first audit entry, and the head of an empty chain."""

_RECEIPT_DIGEST_TAG = b"gated-psi/ledger-receipt-digest/v1"
_DISCLOSURE_ROWS_TAG = b"gated-psi/disclosure-rows/v1"

DISCLOSURE_RECORDED = "disclosure.recorded"
"""A first disclosure of a record under an authorization (counted against the cap)."""
DISCLOSURE_REPEATED = "disclosure.repeated"
"""A replayed disclosure: its payload names the replaying session and rule."""
DISCLOSURE_BATCH = "disclosure.batch"
"""One entry per disclosure batch, committing to the digest of the batch's accounting rows
(docs/architecture.md, Accounting); ledgers written before it hold one entry per row."""


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
class StoredEntry:
    """An entry exactly as stored, payload unparsed: verification hashes the stored text.

    Column types are not trusted (SQLite does not enforce them), hence ``object``.
    """

    seq: int
    at: object
    kind: object
    payload: object
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
# Hashing
# --------------------------------------------------------------------------------------------


def canonical_json(payload: Mapping[str, Any]) -> str:
    """The one serialization of a payload that gets hashed.

    Keys are sorted, separators compact, non-ASCII kept as UTF-8. ``bytes`` values become
    lowercase hex so signatures and hashes can be logged directly; NaN and infinities are
    refused because JSON cannot represent them.
    """
    return canonical_payload(payload)[1]


def canonical_payload(payload: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
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
    return hashlib.sha256(
        encode(AUDIT_ENTRY_TAG, prev_hash, seq, struct.pack(">d", at), kind, payload_json)
    ).digest()


def checkpoint_message(seq: int, head: bytes) -> bytes:
    """The bytes a checkpoint signs: tag || seq (8-byte big-endian) || 32-byte head."""
    if len(head) != 32:
        raise ValueError("checkpoint head must be 32 bytes")
    return AUDIT_CHECKPOINT_TAG + seq.to_bytes(8, "big") + head


def receipt_digest(receipt: bytes) -> str:
    """Receipt digest logged in the chain (domain-separated from the entry hash)."""
    return hashlib.sha256(_RECEIPT_DIGEST_TAG + lp(receipt)).hexdigest()


def chain_entries(
    head: tuple[int, bytes], at: float, entries: Sequence[tuple[str, Mapping[str, Any]]]
) -> list[tuple[AuditEntry, str]]:
    """Link new entries onto ``head`` (``(seq, hash)`` of the newest entry), in order.

    Returns each entry with its canonical payload text, which is what a ledger stores.
    """
    seq, prev = head[0] + 1, head[1]
    out: list[tuple[AuditEntry, str]] = []
    for kind, payload in entries:
        normalized, payload_json = canonical_payload(payload)
        entry_hash = audit_entry_hash(prev, seq, at, kind, payload_json)
        out.append((AuditEntry(seq, at, kind, normalized, prev, entry_hash), payload_json))
        seq, prev = seq + 1, entry_hash
    return out


# --------------------------------------------------------------------------------------------
# Disclosure batches
# --------------------------------------------------------------------------------------------


class DisclosureAccount(NamedTuple):
    """One accounting row of a disclosure, as stored next to its batch's audit entry.

    ``kind`` is :data:`DISCLOSURE_RECORDED` or :data:`DISCLOSURE_REPEATED`;
    ``first_session_id`` is the session of the first disclosure ("" for a first one).
    Column types are not trusted (SQLite does not enforce them), so the check tests them.
    (A tuple, not a dataclass: a batch builds thousands of them on the disclosure path.)
    """

    audit_seq: int
    kind: str
    auth_id: str
    session_id: str
    record_id: str
    rule_id: str
    first_session_id: str
    at: float


def disclosure_rows_digest(rows: Iterable[DisclosureAccount]) -> str:
    """SHA-256 (hex) over a batch's rows in canonical order: sorted by record, then kind.

    The hashed text is the canonical JSON (compact, UTF-8) of one array per row: kind,
    authorization, session, record, rule, first session, and the time as the 16 hex digits
    of its IEEE-754 big-endian double, under a domain-separation tag.  Every accounted field
    is in it, so deleting, adding or editing any one row changes the digest; the order the
    rows were stored in does not.  (One C-level JSON encoding per batch, not a Python loop
    per field: this is on the disclosure path.)
    """
    times: dict[float, str] = {}
    table = [[r.kind, r.auth_id, r.session_id, r.record_id, r.rule_id, r.first_session_id,
              times.get(r.at) or times.setdefault(r.at, struct.pack(">d", r.at).hex())]
             for r in sorted(rows, key=lambda r: (r.record_id, r.kind))]
    return hashlib.sha256(
        _DISCLOSURE_ROWS_TAG + _CANONICAL_JSON.encode(table).encode("utf-8")).hexdigest()


def disclosure_batch(
    auth_id: str, session_id: str, at: float,
    entries: Sequence[tuple[str, Mapping[str, Any]]],
) -> tuple[dict[str, Any], list[DisclosureAccount]]:
    """The one audit payload of a disclosure batch and its rows (``audit_seq`` still 0).

    ``entries`` are the per-record ``(kind, payload)`` of ``accounting.rules.plan_disclosures``;
    each becomes a row, and the payload commits to their count and digest.
    """
    rows = [DisclosureAccount(0, kind, str(p["auth_id"]), str(p["session_id"]),
                              str(p["record_id"]), str(p["rule_id"]),
                              str(p.get("first_session_id", "")), at)
            for kind, p in entries]
    recorded = sum(1 for r in rows if r.kind == DISCLOSURE_RECORDED)
    return {"auth_id": auth_id, "session_id": session_id, "recorded": recorded,
            "repeated": len(rows) - recorded, "rows_sha256": disclosure_rows_digest(rows)}, rows


def check_disclosure_accounts(
    entries: Iterable[StoredEntry], rows: Iterable[DisclosureAccount]
) -> tuple[int, str] | None:
    """The first disclosure row that disagrees with the chain, as ``(seq, detail)``, or None.

    ``rows`` must come in ``audit_seq`` order. A :data:`DISCLOSURE_BATCH` entry must equal
    the digest and counts of the rows pointing at it; an entry of the per-row form (older
    ledgers) must have exactly its one row, field for field; and every row must point at
    one of those entries. Run it on a chain that :func:`verify_chain` accepted.
    """
    pending = iter(rows)
    row = next(pending, None)
    for entry in entries:
        group: list[DisclosureAccount] = []
        while row is not None and row.audit_seq <= entry.seq:
            if row.audit_seq < entry.seq:
                return row.audit_seq, (f"disclosure row of record {row.record_id!r} points at "
                                       f"entry {row.audit_seq}, which accounts no disclosure")
            group.append(row)
            row = next(pending, None)
        if entry.kind not in (DISCLOSURE_BATCH, DISCLOSURE_RECORDED):
            if group:
                return entry.seq, (f"{len(group)} disclosure rows point at entry {entry.seq}, "
                                   f"a {entry.kind!r} entry")
            continue
        problem = _disclosure_entry_problem(entry, group)
        if problem is not None:
            return entry.seq, f"entry {entry.seq}: {problem}"
    if row is not None:
        return row.audit_seq, (f"disclosure row of record {row.record_id!r} points at entry "
                               f"{row.audit_seq}, which is not in the chain")
    return None


def _disclosure_entry_problem(entry: StoredEntry, group: list[DisclosureAccount]) -> str | None:
    try:
        payload = json.loads(str(entry.payload))
    except json.JSONDecodeError:
        return "payload is not JSON"
    if not isinstance(payload, dict):
        return "payload is not an object"
    if not all(_well_typed_account(r) for r in group):
        return "a disclosure row has malformed columns"
    if entry.kind == DISCLOSURE_RECORDED:  # the per-row form of older ledgers
        want = (payload.get("auth_id"), payload.get("session_id"), payload.get("record_id"),
                payload.get("rule_id"), entry.at)
        if len(group) != 1 or group[0].kind != DISCLOSURE_RECORDED or (
                group[0].auth_id, group[0].session_id, group[0].record_id, group[0].rule_id,
                group[0].at) != want:
            return f"its disclosure row is missing or was edited ({len(group)} rows found)"
        return None
    recorded = sum(1 for r in group if r.kind == DISCLOSURE_RECORDED)
    if (recorded, len(group) - recorded) != (payload.get("recorded"), payload.get("repeated")):
        return (f"the batch accounts {payload.get('recorded')} recorded and "
                f"{payload.get('repeated')} repeated disclosures; {recorded} and "
                f"{len(group) - recorded} rows are stored")
    if any(r.at != entry.at or r.auth_id != payload.get("auth_id")
           or r.session_id != payload.get("session_id") for r in group):
        return "a disclosure row names another authorization, session or time than its batch"
    digest = payload.get("rows_sha256")
    if not isinstance(digest, str) or not hmac.compare_digest(
            disclosure_rows_digest(group), digest):
        return "the stored disclosure rows do not match the batch digest (a row was edited)"
    return None


def _well_typed_account(r: DisclosureAccount) -> bool:
    return (all(isinstance(v, str) for v in (r.kind, r.auth_id, r.session_id, r.record_id,
                                              r.rule_id, r.first_session_id))
            and isinstance(r.at, float | int) and not isinstance(r.at, bool))


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


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def check_link(entry: StoredEntry, expected_seq: int, prev: bytes) -> tuple[int, str] | None:
    """The first problem with one stored entry, as ``(bad_seq, detail)``, or None."""
    seq = entry.seq
    if seq != expected_seq:
        if seq > expected_seq:
            return expected_seq, f"entry {expected_seq} is missing (next stored seq is {seq})"
        return seq, f"entry {seq} is out of sequence (expected {expected_seq})"
    if not _well_typed(entry):
        return seq, f"entry {seq} has malformed columns"
    if not hmac.compare_digest(entry.prev_hash, prev):
        return seq, f"entry {seq} does not link to entry {seq - 1} (prev_hash mismatch)"
    assert isinstance(entry.at, float | int)
    assert isinstance(entry.kind, str) and isinstance(entry.payload, str)
    computed = audit_entry_hash(prev, seq, float(entry.at), entry.kind, entry.payload)
    if not hmac.compare_digest(computed, entry.entry_hash):
        return seq, f"entry {seq} content does not match its hash"
    return None


def verify_chain(entries: Iterable[StoredEntry]) -> AuditVerification:
    """Re-derive every hash from the stored content and check every link, in seq order.

    Names the first bad position: an edited entry fails its own hash, a deleted entry
    leaves a seq gap (reported at the missing seq), an inserted or reordered entry breaks
    the ``prev_hash`` link or its hash. A forged entry appended at the very end with a
    correct hash cannot be detected by the chain alone; signed checkpoints bound that.
    """
    expected_seq = 1
    prev = ZERO_HASH
    count = 0
    for entry in entries:
        bad = check_link(entry, expected_seq, prev)
        if bad is not None:
            bad_seq, detail = bad
            return AuditVerification(False, count, bad_seq, detail, prev)
        prev = entry.entry_hash
        expected_seq += 1
        count += 1
    return AuditVerification(True, count, None, f"{count} entries verified", prev)


def checkpoints_match(
    checkpoints: Iterable[Checkpoint],
    entries: Iterable[StoredEntry],
    verify: Callable[[bytes, bytes], bool],
) -> bool:
    """True iff every checkpoint's signature verifies and matches the *recomputed* chain.

    ``verify(message, signature)`` must return True for a valid signature (an exception
    counts as invalid). Hashes are recomputed from entry content rather than trusted from
    storage, so a chain rewritten wholesale (hashes and all) fails here even though it
    would pass :func:`verify_chain`. With no checkpoints there is nothing to contradict and
    the result is True. ``entries`` is read only as far as the newest checkpoint.
    """
    pending: dict[int, list[Checkpoint]] = {}
    for cp in checkpoints:
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
    for entry in entries:
        if not pending:
            break
        if entry.seq != expected_seq or not _well_typed(entry):
            return False
        assert isinstance(entry.at, float | int)
        assert isinstance(entry.kind, str) and isinstance(entry.payload, str)
        computed = audit_entry_hash(computed, entry.seq, float(entry.at), entry.kind,
                                    entry.payload)
        for cp in pending.pop(entry.seq, []):
            if not hmac.compare_digest(cp.head, computed):
                return False
        expected_seq += 1
    return not pending


def _well_typed(entry: StoredEntry) -> bool:
    """Stored columns have the types hashing needs."""
    return (
        isinstance(entry.at, float | int)
        and not isinstance(entry.at, bool)
        and isinstance(entry.kind, str)
        and isinstance(entry.payload, str)
    )
