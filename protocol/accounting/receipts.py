"""Session receipts (docs/architecture.md, Receipts and oversight), shared by every tier.

The custodian signs (authorization, session, evaluated, disclosed, transcript
hash) only when both parties' transcript hashes agree; the requester checks the
custodian's signature and countersigns; the custodian verifies the
countersignature against the requester's registered key and stores it.  Both
sides keep both signatures.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.accounting.port import LedgerPort
from protocol.domain.messages import Receipt
from protocol.errors import ProtocolError


def issue_receipt(
    *, ledger: LedgerPort, signing_key: Ed25519PrivateKey, custodian_id: str, requester_id: str,
    authorization_id: str, session_id: str, evaluated: int, disclosed: int,
    own_transcript: bytes, presented_transcript: bytes,
) -> Receipt:
    """Custodian: sign and durably store the receipt, or refuse on a transcript mismatch."""
    if not hmac.compare_digest(own_transcript, presented_transcript):
        ledger.audit("transcript_mismatch", {
            "authorization_id": authorization_id, "session_id": session_id,
        })
        raise ProtocolError("transcript hash mismatch: the parties saw different messages")
    unsigned = Receipt(
        authorization_id=authorization_id, session_id=session_id, custodian_id=custodian_id,
        requester_id=requester_id, evaluated=evaluated, disclosed=disclosed,
        transcript_hash=own_transcript,
    )
    signature = signing_key.sign(unsigned.signed_bytes())
    ledger.close_session(authorization_id, session_id, unsigned.signed_bytes(), signature)
    return replace(unsigned, custodian_signature=signature)


def store_countersignature(
    *, ledger: LedgerPort, requester_keys: Mapping[str, Ed25519PublicKey], peer_id: str,
    issued: Receipt | None, presented: Receipt,
) -> Receipt:
    """Custodian: accept the requester's countersignature of exactly the receipt it issued."""
    if issued is None:
        raise ProtocolError("countersignature before the receipt was issued")
    if presented.signed_bytes() != issued.signed_bytes():
        raise ProtocolError("countersigned receipt differs from the one issued")
    key = requester_keys.get(peer_id)
    if key is None:
        raise ProtocolError(f"no receipt key registered for requester {peer_id!r}")
    try:
        key.verify(presented.requester_signature, presented.countersigned_bytes())
    except InvalidSignature:
        raise ProtocolError("requester countersignature does not verify") from None
    ledger.add_countersignature(issued.session_id, presented.requester_signature)
    return presented


def countersign(
    receipt: Receipt, *, session_id: str, own_transcript: bytes,
    custodian_key: Ed25519PublicKey | None, signing_key: Ed25519PrivateKey | None,
) -> Receipt:
    """Requester: check the receipt against its own transcript and key, then countersign."""
    if not hmac.compare_digest(receipt.transcript_hash, own_transcript):
        raise ProtocolError("receipt transcript hash differs from ours")
    if receipt.session_id != session_id:
        raise ProtocolError("receipt for another session")
    if custodian_key is not None:
        try:
            custodian_key.verify(receipt.custodian_signature, receipt.signed_bytes())
        except InvalidSignature:
            raise ProtocolError("custodian receipt signature does not verify") from None
    if signing_key is None:
        return receipt
    return replace(receipt,
                   requester_signature=signing_key.sign(receipt.countersigned_bytes()))
