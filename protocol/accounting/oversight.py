"""Accountability that a third party can check: ledger verification and the cross-agency
oversight check (docs/architecture.md, Receipts and oversight).

The court found that nobody could check what had been disclosed. Each agency therefore keeps a
hash-chained audit log (the ledger) and pins its head with Ed25519 signatures; at the
end of every session both agencies hold the same receipt with both signatures. This module is
what an inspector runs on top of that:

* :func:`verify_ledger` re-derives an agency's chain and its signed checkpoints and names the
  first bad position and the kind of damage (edited, deleted, inserted, reordered, rewritten,
  truncated), so ``agency-a audit verify`` / ``agency-b audit verify`` can say *where* and
  *what*, not only *that*.
* :func:`add_signed_checkpoint` pins a ledger's head with the agency's key (the periodic
  ``Checkpointer`` thread in ``protocol.adapters.checkpointer`` calls it).
* :func:`check` compares the two exports (:mod:`protocol.accounting.export`): counts,
  transcript hashes, both signatures on every receipt, and coverage of both chain heads by
  valid checkpoints. Each finding is reported.

Everything here is pure: it works on any ledger through the port
(:mod:`protocol.accounting.port`) and on export documents given as data; reading key files,
writing exports and the command lines live in ``protocol.cli.oversight``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.accounting.chain import (
    DISCLOSURE_RECORDED,
    ZERO_HASH,
    Checkpoint,
    DisclosureAccount,
    StoredEntry,
    audit_entry_hash,
    canonical_json,
    check_disclosure_accounts,
    checkpoint_message,
    checkpoints_match,
    verify_chain,
)
from protocol.accounting.export import EXPORT_FORMAT, MAX_TAIL_ENTRIES
from protocol.accounting.port import AuditLog
from protocol.domain.messages import Receipt
from protocol.errors import LedgerError, ProtocolError

__all__ = [
    "ChainReport",
    "Finding",
    "OversightReport",
    "add_signed_checkpoint",
    "check",
    "signing_key_id",
    "verify_ledger",
]

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


def add_signed_checkpoint(ledger: AuditLog, signing_key: Ed25519PrivateKey) -> Checkpoint:
    """Pin the ledger's current head with an Ed25519 signature by the agency's key."""
    return ledger.add_checkpoint(signing_key.sign, signing_key_id(signing_key.public_key()))


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


def verify_ledger(ledger: AuditLog, public_key: Ed25519PublicKey | None = None) -> ChainReport:
    """Verify the hash chain and, given the agency's public key, every signed checkpoint.

    The chain is checked first (:func:`protocol.accounting.chain.verify_chain`); on failure
    the first bad position is classified. With a key, each checkpoint must carry that key's
    id, verify, fall inside the chain and equal the chain's hash at its position; a mismatch
    after an intact chain means the chain was rewritten with recomputed hashes somewhere
    after the previous matching checkpoint.
    """
    chain = verify_chain(ledger.stored_entries())
    checkpoints = ledger.checkpoints()
    last_cp = checkpoints[-1].seq if checkpoints else None
    head_seq, head = ledger.audit_head()
    base = ChainReport(
        ok=True, entries=chain.entries, head_seq=head_seq, head=head, detail=chain.detail,
        checkpoints=len(checkpoints), last_checkpoint_seq=last_cp,
    )
    if not chain.ok:
        assert chain.first_bad_seq is not None
        position, damage, detail = _classify(ledger, chain.first_bad_seq, chain.head, chain.detail)
        return replace(base, ok=False, first_bad_seq=position, damage=damage, detail=detail,
                       head=chain.head)
    if public_key is not None:
        problem = _check_checkpoints(ledger, checkpoints, head_seq, public_key)
        if problem is not None:
            first, last, damage, detail = problem
            return replace(base, ok=False, first_bad_seq=first, last_bad_seq=last,
                           damage=damage, detail=detail, checkpoints_verified=True)
        base = replace(base, checkpoints_verified=True)
    rows = _disclosure_problem(ledger)
    if rows is not None:
        return replace(base, ok=False, first_bad_seq=rows[0], damage="disclosure rows",
                       detail=rows[1])
    return base


def _disclosure_problem(ledger: AuditLog) -> tuple[int, str] | None:
    """A custodian ledger's disclosure rows against their batch entries' digests.

    Rows are accounting tables, not chain entries, so a ledger that keeps them offers
    ``disclosure_accounts``; the requester's audit-only ledger has none and passes.
    """
    accounts = getattr(ledger, "disclosure_accounts", None)
    if accounts is None:
        return None
    return check_disclosure_accounts(ledger.stored_entries(), accounts())


def _stored_links(ledger: AuditLog, start: int) -> tuple[list[tuple[int, bytes, bytes]], bool]:
    """``(seq, prev_hash, entry_hash)`` of stored entries from ``start``; False if unreadable."""
    rows: list[tuple[int, bytes, bytes]] = []
    try:
        for entry in ledger.audit_entries(start):
            rows.append((entry.seq, entry.prev_hash, entry.entry_hash))
    except LedgerError:
        return rows, False
    return rows, True


def _classify(ledger: AuditLog, bad: int, good_head: bytes, detail: str) -> tuple[int, str, str]:
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
    ledger: AuditLog, checkpoints: list[Checkpoint], head_seq: int, key: Ed25519PublicKey
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
    if checkpoints and not checkpoints_match(
        checkpoints, ledger.stored_entries(), lambda msg, sig: _ed25519_valid(key, sig, msg)
    ):
        return 1, good_before, "rewritten", "checkpoints do not match the recomputed chain"
    return None


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
    _check_disclosure_batches(f, custodian_export)

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
    max_q, max_d = limits.get("max_evaluations"), limits.get("max_disclosures")
    within = (
        isinstance(max_q, int) and isinstance(max_d, int)
        and 0 <= int(counts.get("reserved", 0)) <= max_q and c_eval <= max_q and c_disc <= max_d
    )
    f.add("limits", within,
          f"reserved {counts.get('reserved')}, evaluated {c_eval} of max_evaluations {max_q}; "
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


def _check_disclosure_batches(f: _Findings, doc: Mapping[str, Any]) -> None:
    """Each disclosure entry hashes to its stated hash, its rows to its digest, and its rows'
    first disclosures are exactly the export's disclosure list; entries in the tail must be
    the tail's (so those are tied to the signed head)."""
    batches = doc.get("disclosure_batches")
    if batches is None:  # an export written before batch entries existed
        f.add("disclosures.batches", True, "not checked: the export lists no disclosure batches")
        return
    auth_id = str(doc.get("auth_id", ""))
    tail = {int(e["seq"]): str(e["entry_hash"]) for e in doc.get("tail") or []
            if isinstance(e, Mapping) and "seq" in e and "entry_hash" in e}
    firsts: list[tuple[str, str, str, float]] = []
    problems: list[str] = []
    try:
        for b in batches:
            seq, at, kind, payload = int(b["seq"]), float(b["at"]), str(b["kind"]), b["payload"]
            h = audit_entry_hash(bytes.fromhex(b["prev_hash"]), seq, at, kind,
                                 canonical_json(payload))
            if not hmac.compare_digest(h, bytes.fromhex(b["entry_hash"])):
                problems.append(f"entry {seq} does not match its hash")
            elif seq in tail and tail[seq] != b["entry_hash"]:
                problems.append(f"entry {seq} is not the tail's entry {seq}")
            rows = [DisclosureAccount(seq, str(k), auth_id, str(sid), str(rid), str(rule),
                                      str(first), at) for k, sid, rid, rule, first in b["rows"]]
            one = StoredEntry(seq, at, kind, canonical_json(payload), b"", h)
            bad = check_disclosure_accounts([one], rows)
            if bad is not None:
                problems.append(bad[1])
            firsts += [(r.session_id, r.record_id, r.rule_id, at) for r in rows
                       if r.kind == DISCLOSURE_RECORDED]
    except (KeyError, TypeError, ValueError) as exc:
        f.add("disclosures.batches", False, f"malformed disclosure batches: {exc}")
        return
    listed = sorted((str(d.get("session_id")), str(d.get("record_id")), str(d.get("rule_id")),
                     float(d.get("disclosed_at", 0.0))) for d in doc.get("disclosures", []))
    if sorted(firsts) != listed:
        problems.append(f"the batches account {len(firsts)} first disclosures; the export "
                        f"lists {len(listed)} disclosure rows, not the same ones")
    f.add("disclosures.batches", not problems,
          f"{len(batches)} disclosure entries re-hashed; every row matches its entry's digest"
          if not problems else "; ".join(problems[:3]))


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
