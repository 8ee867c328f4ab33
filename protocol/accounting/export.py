"""Oversight export documents, built from any ledger through the port.

For one authorization, each agency exports the JSON an inspector needs (docs/architecture.md,
Accounting): counts, receipts with both signatures and transcript hashes, the chain head,
and the newest signed checkpoint together with the few entries after it (the *tail*), so the
head itself is provably covered by a signature. :func:`protocol.accounting.oversight.check`
compares the two documents; writing them to files is the CLI's job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

from protocol.accounting.chain import Checkpoint, DisclosureAccount
from protocol.accounting.port import AuditLog, LedgerPort
from protocol.domain.messages import Receipt
from protocol.errors import LedgerError, ProtocolError

__all__ = [
    "EXPORT_FORMAT",
    "MAX_TAIL_ENTRIES",
    "RECEIPT_AUDIT_KIND",
    "REQUESTER_STORE_KINDS",
    "chain_evidence",
    "custodian_export",
    "disclosure_batches",
    "ledger_document",
    "parse_receipt_bytes",
    "record_receipt",
    "requester_export",
]

EXPORT_FORMAT = "gated-psi/oversight-export/v1"
RECEIPT_AUDIT_KIND = "receipt"
"""Audit-entry kind under which the requester keeps each countersigned receipt."""
MAX_TAIL_ENTRIES = 10_000
"""Entries after the newest checkpoint that an export carries; beyond it, checkpoint first."""

REQUESTER_STORE_KINDS = (
    "results_stored",
    "results_read",
    "results_exported",
    "results_purged",
    "results_integrity_failure",
)
"""Audit kinds of the requester's result store, summarised (as counts) in its export."""


# --------------------------------------------------------------------------------------------
# Receipts on the requester side
# --------------------------------------------------------------------------------------------


def record_receipt(ledger: AuditLog, receipt: Receipt) -> None:
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
    return Receipt.from_signed_bytes(data, custodian_signature, requester_signature)


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


def ledger_document(ledger: LedgerPort, auth_id: str) -> dict[str, Any]:
    """A custodian ledger's full account of one authorization, read from one snapshot."""
    with ledger.consistent_read():
        limits = ledger.authorization(auth_id)
        budget = ledger.budget(auth_id)
        sessions = ledger.sessions(auth_id)
        disclosures = ledger.disclosures(auth_id)
        receipts = ledger.receipts(auth_id)
        head_seq, head = ledger.audit_head()
        ledger_id = ledger.ledger_id
        checkpoints = ledger.checkpoints()
    return {
        "ledger_id": ledger_id,
        "auth_id": auth_id,
        "exported_at": ledger.now(),
        "authorization": {
            "max_evaluations": limits.max_evaluations,
            "max_disclosures": limits.max_disclosures,
            "not_after": limits.not_after,
            "registered_at": limits.registered_at,
        },
        "budget": {
            "max_evaluations": budget.max_evaluations,
            "reserved": budget.reserved,
            "evaluated": budget.evaluated,
            "remaining": budget.remaining,
            "max_disclosures": budget.max_disclosures,
            "disclosed": budget.disclosed,
        },
        "sessions": [
            {
                "session_id": s.session_id,
                "meta": None if s.meta is None else dict(s.meta),
                "opened_at": s.opened_at,
                "reserved": s.reserved,
                "evaluated": s.evaluated,
                "closed_at": s.closed_at,
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
        "checkpoints": [_checkpoint_json(c) for c in checkpoints],
    }


def chain_evidence(ledger: AuditLog) -> dict[str, Any]:
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


def custodian_export(ledger: LedgerPort, auth_id: str) -> dict[str, Any]:
    """The custodian's oversight export for one authorization (see module docstring).

    Extends :func:`ledger_document` with decoded receipts (ids, counts, transcript hash and
    both signatures) and with the chain evidence (newest checkpoint and the tail after it).
    """
    doc = ledger_document(ledger, auth_id)
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
    evidence = chain_evidence(ledger)
    batches = disclosure_batches(ledger, auth_id)
    releases = aggregate_release_account(ledger, auth_id, doc["sessions"])
    # Epoch mode: every accounted fetch of a key epoch's tag set (docs/architecture.md,
    # National custodian), tied to its audit entry by seq.
    fetches = [{"requester_id": f.requester_id, "epoch_id": f.epoch_id, "rules": list(f.rules),
                "bytes": f.bytes_sent, "fetched_at": f.fetched_at, "audit_seq": f.audit_seq}
               for f in ledger.tagset_fetches(auth_id)]
    return {
        **doc,
        "format": EXPORT_FORMAT,
        "role": "custodian",
        "receipts": receipts,
        "aggregate_releases": releases,
        "tagset_fetches": fetches,
        **({} if batches is None else {"disclosure_batches": batches}),
        "counts": {
            "evaluated": doc["budget"]["evaluated"],
            "disclosed": doc["budget"]["disclosed"],
            "reserved": doc["budget"]["reserved"],
            "sessions": len(doc["sessions"]),
            "receipts": len(receipts),
            "aggregate_releases": len(releases),
        },
        **evidence,
    }


def disclosure_batches(ledger: LedgerPort, auth_id: str) -> list[dict[str, Any]] | None:
    """Each audit entry that accounts disclosures under ``auth_id``, with its rows.

    An inspector re-hashes each entry from its content and recomputes its rows' digest
    (:func:`protocol.accounting.chain.disclosure_rows_digest`) from the rows given here, so
    a row deleted, added or edited in the custodian's tables shows (docs/architecture.md,
    Accounting).  Ledgers written before batch entries give one entry per first disclosure.
    None for a ledger that does not expose its rows (the export then says nothing of them).
    """
    accounts = getattr(ledger, "disclosure_accounts", None)
    if accounts is None:
        return None
    rows: dict[int, list[DisclosureAccount]] = {}
    for a in accounts():
        if a.auth_id == auth_id:
            rows.setdefault(a.audit_seq, []).append(a)
    out: list[dict[str, Any]] = []
    if not rows:
        return out
    for entry in ledger.audit_entries(min(rows)):
        group = rows.get(entry.seq)
        if group is None:
            continue
        out.append({
            "seq": entry.seq, "at": entry.at, "kind": entry.kind,
            "payload": dict(entry.payload), "prev_hash": entry.prev_hash.hex(),
            "entry_hash": entry.entry_hash.hex(),
            "rows": [[a.kind, a.session_id, a.record_id, a.rule_id, a.first_session_id]
                     for a in group],
        })
        if len(out) == len(rows):
            break
    return out


def aggregate_release_account(ledger: LedgerPort, auth_id: str,
                              sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every aggregate released under ``auth_id``, with its contributing-record digests.

    The digests are keyed (no record id in the clear); an inspector holding the records and
    the custodian's key recomputes them and re-adds the values to check the audited sum,
    and ``contributing_sha256`` ties each row to its ``aggregate_release`` audit entry
    (docs/architecture.md, Aggregate and cardinality tiers).
    """
    peers = sorted({str(s["meta"]["peer"]) for s in sessions
                    if s.get("meta") and s["meta"].get("peer")})
    return [
        {
            "session_id": row.session_id,
            "requester_id": row.requester_id,
            "released_at": row.released_at,
            "audit_seq": row.audit_seq,
            "contributing": row.contributing.hex(),
            "contributing_sha256": hashlib.sha256(row.contributing).hexdigest(),
        }
        for peer in peers
        for row in ledger.aggregate_releases(peer)
        if row.auth_id == auth_id
    ]


def requester_export(
    ledger: AuditLog, auth_id: str, *, clock: Callable[[], float] | None = None
) -> dict[str, Any]:
    """The requester's oversight export for one authorization.

    Receipts come from :func:`record_receipt` entries; result-store activity (stored, read,
    exported, purged) is summarised from the store's audit entries, counts only.
    ``exported_at`` comes from ``clock``, by default the ledger's.
    """
    receipts: dict[str, dict[str, Any]] = {}
    conflicts: list[str] = []
    activity: dict[str, int] = dict.fromkeys(REQUESTER_STORE_KINDS, 0)
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
    evidence = chain_evidence(ledger)
    return {
        "format": EXPORT_FORMAT,
        "role": "requester",
        "ledger_id": ledger.ledger_id,
        "auth_id": auth_id,
        "exported_at": float(clock()) if clock is not None else ledger.now(),
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
