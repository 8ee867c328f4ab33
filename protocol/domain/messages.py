"""Session messages exchanged between Requester and Custodian.

These are transport-neutral: the gRPC services translate protobuf to and from
these dataclasses, and the in-process driver passes them directly.  Each
message has a canonical ``transcript_bytes()`` encoding so that both parties
hash exactly the same bytes into the session transcript, whatever the wire
format was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from protocol.crypto.encoding import decode, encode, encode_pairs, encode_strs
from protocol.domain.engine import Engine
from protocol.errors import ProtocolError

TRANSCRIPT_DOMAIN = b"gated-psi/transcript/v2"
RECEIPT_DOMAIN = b"gated-psi/receipt/v2"
COUNTERSIGN_DOMAIN = b"gated-psi/receipt-countersignature/v2"

#: Elements per evaluation chunk by default: 4096 x 32 B = 128 KiB per message.
DEFAULT_CHUNK = 4096
#: Hard upper bound on elements in one chunk, enforced by the custodian.
MAX_CHUNK_ELEMENTS = 65_536
#: Hard upper bound on outputs in one disclosure request.
MAX_DISCLOSURE_BATCH = 4096
#: Most custodian records one presented key may disclose (docs/architecture.md, Shared
#: keys); a key held by more names no one in particular and is refused.  A reply may so
#: carry up to ``MAX_DISCLOSURE_BATCH * MAX_HOLDERS_PER_KEY`` disclosures.
MAX_HOLDERS_PER_KEY = 8


@dataclass(frozen=True)
class OpenRequest:
    """Requester -> Custodian: present the signed authorization and the session shape.

    ``element_count`` is the number of OPRF evaluations the requester will ask for
    (one per query and match rule); it is reserved against the persistent budget.
    """

    session_id: str
    signed_authorization: bytes
    tier: str
    match_rules: tuple[str, ...]
    disclosure_fields: tuple[str, ...]
    element_count: int
    engine: str = Engine.OPRF.value

    def transcript_bytes(self) -> bytes:
        return encode(
            b"open-request", self.session_id, self.signed_authorization, self.tier,
            encode_strs(self.match_rules), encode_strs(self.disclosure_fields),
            self.element_count, self.engine,
        )


@dataclass(frozen=True)
class OpenResponse:
    """Custodian -> Requester: the session is open; what was granted."""

    session_id: str
    authorization_id: str
    custodian_id: str
    match_rules: tuple[str, ...]
    disclosure_fields: tuple[str, ...]
    element_count: int
    tag_count: int
    tag_size: int
    budget_remaining: int

    def transcript_bytes(self) -> bytes:
        return encode(
            b"open-response", self.session_id, self.authorization_id, self.custodian_id,
            encode_strs(self.match_rules), encode_strs(self.disclosure_fields),
            self.element_count, self.tag_count, self.tag_size, self.budget_remaining,
        )


@dataclass(frozen=True)
class TagChunk:
    """Custodian -> Requester: a slice of the sorted tag set (``n * tag_size`` bytes)."""

    seq: int
    tags: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"tags", self.seq, self.tags)


@dataclass(frozen=True)
class EvaluateChunk:
    """Requester -> Custodian: blinded elements, ``n * 32`` bytes, compact."""

    seq: int
    elements: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"evaluate", self.seq, self.elements)


@dataclass(frozen=True)
class EvaluatedChunk:
    """Custodian -> Requester: the evaluated elements of chunk ``seq``, same order.

    ``proof``: under a pinned evaluation key, the RFC 9497 batch DLEQ proof (c || s, 64
    bytes) that every element was evaluated under it; empty in mode 0.
    """

    seq: int
    elements: bytes
    proof: bytes = b""

    def transcript_bytes(self) -> bytes:
        if self.proof:  # mode-0 chunks keep the transcript bytes they always had
            return encode(b"evaluated", self.seq, self.elements, self.proof)
        return encode(b"evaluated", self.seq, self.elements)


@dataclass(frozen=True)
class DisclosureRequest:
    """Requester -> Custodian: OPRF outputs of matched queries (proof of having queried).

    ``groups`` (corroborated sessions only, else empty) is parallel to ``outputs``: items
    with one group id present one record under several independent rules and disclose it
    once, together (docs/architecture.md, Recall and misidentification).
    """

    seq: int
    outputs: tuple[tuple[str, bytes], ...]  # (rule_id, 64-byte OPRF output)
    groups: tuple[int, ...] = ()

    def transcript_bytes(self) -> bytes:
        outputs = encode_pairs(self.outputs)
        if not self.groups:  # the encoding of requests before corroboration existed
            return encode(b"disclosure-request", self.seq, outputs)
        return encode(b"disclosure-request", self.seq, outputs,
                      encode(*self.groups))


@dataclass(frozen=True)
class Disclosure:
    """One released record: only permitted fields, keyed by a per-authorization pseudonym.

    ``index`` points back into the request's ``outputs`` so the requester can join the
    disclosure to its own query without the custodian learning which query it was.
    """

    index: int
    rule_id: str
    pseudonym: str
    fields: tuple[tuple[str, str], ...]

    def transcript_bytes(self) -> bytes:
        return encode(self.index, self.rule_id, self.pseudonym, encode_pairs(self.fields))

    def as_dict(self) -> dict[str, str]:
        return dict(self.fields)


@dataclass(frozen=True)
class DisclosureResponse:
    """Custodian -> Requester: disclosures for the verified outputs of request ``seq``.

    ``rejected`` lists indexes whose output did not verify (invented or replayed);
    ``reasons``, when sent, is parallel to it (``policy.decide.DisclosureRejection`` codes).
    """

    seq: int
    disclosures: tuple[Disclosure, ...]
    rejected: tuple[int, ...] = ()
    reasons: tuple[str, ...] = ()

    def transcript_bytes(self) -> bytes:
        parts = [encode(*(d.transcript_bytes() for d in self.disclosures)),
                 encode(*self.rejected)]
        if self.reasons:  # absent: the encoding of replies before reasons were sent
            parts.append(encode(*self.reasons))
        return encode(b"disclosure-response", self.seq, *parts)


@dataclass(frozen=True)
class CloseRequest:
    """Requester -> Custodian: done; carries the requester's transcript hash."""

    transcript_hash: bytes


@dataclass(frozen=True)
class Receipt:
    """Signed account of a session: what was evaluated and disclosed, over which transcript."""

    authorization_id: str
    session_id: str
    custodian_id: str
    requester_id: str
    evaluated: int
    disclosed: int
    transcript_hash: bytes
    custodian_signature: bytes = b""
    requester_signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """The bytes the custodian signs (everything except the signatures)."""
        return encode(
            RECEIPT_DOMAIN, self.authorization_id, self.session_id, self.custodian_id,
            self.requester_id, self.evaluated, self.disclosed, self.transcript_hash,
        )

    @classmethod
    def from_signed_bytes(
        cls, data: bytes, custodian_signature: bytes = b"", requester_signature: bytes = b""
    ) -> Receipt:
        """Inverse of :meth:`signed_bytes` (the form a custodian ledger stores)."""
        try:
            parts = decode(bytes(data))
            if len(parts) != 8 or parts[0] != RECEIPT_DOMAIN:
                raise ValueError("not a receipt: wrong domain tag or part count")
            if len(parts[5]) != 8 or len(parts[6]) != 8:
                raise ValueError("receipt counts are not 8-byte integers")
            auth_id, session_id, custodian_id, requester_id = (p.decode() for p in parts[1:5])
        except ValueError as exc:  # includes UnicodeDecodeError
            raise ProtocolError(f"malformed stored receipt: {exc}") from exc
        return cls(
            authorization_id=auth_id, session_id=session_id, custodian_id=custodian_id,
            requester_id=requester_id, evaluated=int.from_bytes(parts[5], "big"),
            disclosed=int.from_bytes(parts[6], "big"), transcript_hash=parts[7],
            custodian_signature=bytes(custodian_signature),
            requester_signature=bytes(requester_signature),
        )

    def countersigned_bytes(self) -> bytes:
        """The requester countersigns the receipt together with the custodian's signature."""
        return encode(COUNTERSIGN_DOMAIN, self.signed_bytes(), self.custodian_signature)

    def to_json(self) -> dict[str, object]:
        return {
            "authorization_id": self.authorization_id,
            "session_id": self.session_id,
            "custodian_id": self.custodian_id,
            "requester_id": self.requester_id,
            "evaluated": self.evaluated,
            "disclosed": self.disclosed,
            "transcript_hash": self.transcript_hash.hex(),
            "custodian_signature": self.custodian_signature.hex(),
            "requester_signature": self.requester_signature.hex(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Receipt:
        try:
            return cls(
                authorization_id=str(data["authorization_id"]),
                session_id=str(data["session_id"]),
                custodian_id=str(data["custodian_id"]),
                requester_id=str(data["requester_id"]),
                evaluated=_count(data["evaluated"]),
                disclosed=_count(data["disclosed"]),
                transcript_hash=bytes.fromhex(str(data["transcript_hash"])),
                custodian_signature=bytes.fromhex(str(data.get("custodian_signature", ""))),
                requester_signature=bytes.fromhex(str(data.get("requester_signature", ""))),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ProtocolError(f"malformed receipt: {exc}") from exc


def _count(value: object) -> int:
    """A count read back from JSON: an integer (or its decimal text), nothing else."""
    if isinstance(value, int | str) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"expected an integer count, got {type(value).__name__}")


@dataclass
class Transcript:
    """Running transcript hash, one SHA-512 per message stream.

    Streams are hashed separately because over gRPC the tag stream and the
    evaluation stream interleave differently on each side; within a stream the
    order is fixed, so both parties compute the same digest.
    """

    streams: dict[str, hashlib._Hash] = field(default_factory=dict)

    #: The streams, in digest order; a tier with other messages subclasses with its own.
    STREAMS: ClassVar[tuple[str, ...]] = ("open", "tags", "evaluate", "evaluated",
                                          "disclosure-request", "disclosure-response")

    def __post_init__(self) -> None:
        for name in self.STREAMS:
            h = hashlib.sha512()
            h.update(TRANSCRIPT_DOMAIN + b"/" + name.encode())
            self.streams[name] = h

    def add(self, stream: str, message: object) -> None:
        self.streams[stream].update(message.transcript_bytes())  # type: ignore[attr-defined]

    def digest(self) -> bytes:
        final = hashlib.sha256(TRANSCRIPT_DOMAIN)
        for name in self.STREAMS:
            final.update(encode(self.streams[name].digest()))
        return final.digest()
