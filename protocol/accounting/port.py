"""What sessions, receipts and oversight need from a ledger: the ledger port.

A ledger is the custodian's single source of truth for three things (docs/architecture.md,
Accounting):

* **Budget.** ``max_evaluations`` is a persistent budget per authorization. Sessions reserve part
  of it up front; reservations are never refunded, so a requester cannot regain budget by
  disconnecting. Evaluated elements are then counted against the session's reservation.
* **Disclosures.** One row per (authorization, record), durable *before* the caller releases
  any field ("row first, data second"). ``max_disclosures`` caps the distinct records; a
  record disclosed again under the same authorization is a *repeat*: audited, not counted.
* **Audit chain.** Every mutation appends an entry to a hash chain (:mod:`.chain`) in the same
  atomic step as the mutation; signed checkpoints pin its head.

The decisions themselves are made by the policy gate; a ledger enforces the limits again,
atomically, as defence in depth, and is the authority on what was consumed. Implementations
share those rules through :mod:`.rules`, so every ledger refuses exactly the same requests.
The SQLite adapter (``protocol.adapters.sqlite_ledger``) is one implementation; any class with
these methods is another, and nothing outside its own module has to change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from protocol.accounting.chain import AuditEntry, Checkpoint, StoredEntry
from protocol.errors import BudgetExhausted, LedgerError

__all__ = [
    "AggregateReleaseRow",
    "AuditLog",
    "AuthorizationRow",
    "Budget",
    "DisclosureRow",
    "LedgerPort",
    "ReceiptRow",
    "Reservation",
    "SessionRow",
    "TagSetFetchRow",
    "check_evaluated_store",
    "check_tagset_fetch",
]

#: Bytes of one stored blinded element (a ristretto255 encoding).
EVALUATED_ELEMENT_SIZE = 32


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

    max_evaluations: int
    reserved: int
    evaluated: int
    remaining: int
    max_disclosures: int
    disclosed: int


@dataclass(frozen=True)
class DisclosureRow:
    """The accounting of one release of a record; ``repeat`` marks an idempotent replay.

    A first disclosure counts against the cap. A repeat does not: ``record_disclosures``
    answers it with the record's *original* row flagged ``repeat=True``, while
    ``disclosures(include_repeats=True)`` lists it as its own event (the replaying session,
    rule and time).
    """

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
class AuthorizationRow:
    """An authorization's limits, fixed when it was first registered."""

    auth_id: str
    max_evaluations: int
    max_disclosures: int
    not_after: int
    registered_at: float


@dataclass(frozen=True)
class SessionRow:
    """One session's account: ``meta`` is what open recorded (None if only reserved)."""

    auth_id: str
    session_id: str
    meta: Mapping[str, Any] | None
    opened_at: float
    reserved: int | None
    evaluated: int
    closed_at: float | None


@dataclass(frozen=True)
class AggregateReleaseRow:
    """One released aggregate sum and the compact record of who contributed to it.

    ``contributing`` is the sorted concatenation of fixed-size keyed digests of the
    contributing records (docs/architecture.md, Aggregate and cardinality tiers): enough
    to apply the overlap rule after a restart and for oversight to re-verify the sum,
    and no record id in the clear.
    """

    auth_id: str
    requester_id: str
    session_id: str
    contributing: bytes
    released_at: float
    audit_seq: int


@dataclass(frozen=True)
class TagSetFetchRow:
    """One fetch of a key epoch's tag set (docs/architecture.md, National custodian): who,
    under which authorization, which epoch and rules, how many bytes were sent."""

    auth_id: str
    requester_id: str
    epoch_id: str
    rules: tuple[str, ...]
    bytes_sent: int
    fetched_at: float
    audit_seq: int


def check_evaluated_store(session_id: str, reserved: int | None, stored_elsewhere: int,
                          elements: bytes) -> int:
    """The number of elements in ``elements``; refuses what the reservation does not cover.

    A session stores at most as many blinded elements as it reserved (the chunk being
    replaced, if any, excluded from ``stored_elsewhere``), so a peer cannot grow the ledger
    beyond its budget.  Every ledger applies this same rule.
    """
    if reserved is None:
        raise LedgerError(f"session {session_id!r} has no reservation")
    if not elements or len(elements) % EVALUATED_ELEMENT_SIZE:
        raise LedgerError(f"session {session_id!r}: {len(elements)} bytes are not whole "
                          "blinded elements")
    n = len(elements) // EVALUATED_ELEMENT_SIZE
    if stored_elsewhere + n > reserved:
        raise BudgetExhausted(f"session {session_id!r}: storing {n} more evaluated elements "
                              f"would exceed the {reserved} reserved ({stored_elsewhere} stored)")
    return n


def check_tagset_fetch(auth_id: str, epoch_id: str, done: int, cap: int) -> None:
    """An authorization fetches one epoch's tag set at most ``cap`` times."""
    if done >= cap:
        raise BudgetExhausted(f"authorization {auth_id!r} already fetched the tag set of epoch "
                              f"{epoch_id!r} {done} times; the custodian allows {cap}")


class AuditLog(Protocol):
    """An append-only, hash-chained audit log with signed checkpoints.

    This is all the requester's ledger is used for (its receipts and result-store accounting
    are audit entries), and all that checkpointing and chain verification need.
    """

    @property
    def ledger_id(self) -> str:
        """Random id fixed at creation and bound into the first audit entry."""
        ...

    def now(self) -> float:
        """The ledger's clock; every timestamp it records comes from it."""
        ...

    def audit(self, kind: str, payload: Mapping[str, Any]) -> AuditEntry:
        """Append a decision that changes nothing else (a refusal, say) to the chain."""
        ...

    def audit_entries(self, start: int = 0) -> Iterator[AuditEntry]:
        """Entries with ``seq >= start`` in chain order, payloads parsed (LedgerError if not)."""
        ...

    def stored_entries(self) -> Iterator[StoredEntry]:
        """Every entry exactly as stored, in seq order, for verification."""
        ...

    def audit_head(self) -> tuple[int, bytes]:
        """``(seq, entry_hash)`` of the newest entry; ``(0, ZERO_HASH)`` for an empty chain."""
        ...

    def add_checkpoint(self, sign: Callable[[bytes], bytes], key_id: str) -> Checkpoint:
        """Sign the current head and store the checkpoint, itself logged as the next entry."""
        ...

    def checkpoints(self) -> list[Checkpoint]:
        """Stored checkpoints, oldest first."""
        ...


class LedgerPort(AuditLog, Protocol):
    """Budget and disclosure accounting over an audit log: what a custodian's sessions use.

    Every mutating method is atomic (all of its effects, audit entry included, or none) and
    durable when it returns; each is idempotent for an identical retry, so a retried RPC never
    charges twice.
    """

    # -- authorizations and budget -------------------------------------------------------------

    def ensure_authorization(
        self, auth_id: str, *, max_evaluations: int, max_disclosures: int, not_after: int
    ) -> None:
        """Register an authorization's limits once; re-registering must repeat them exactly."""
        ...

    def budget(self, auth_id: str) -> Budget:
        """Authorization-wide counters (LedgerError for an unknown authorization)."""
        ...

    def authorization(self, auth_id: str) -> AuthorizationRow:
        """The registered limits (LedgerError for an unknown authorization)."""
        ...

    # -- sessions ------------------------------------------------------------------------------

    def open_session(self, auth_id: str, session_id: str, meta: Mapping[str, Any]) -> None:
        """Record that a session started, with its metadata; idempotent for the same call."""
        ...

    def reserve(self, auth_id: str, session_id: str, n: int) -> Reservation:
        """Charge ``n`` units of the persistent budget to a session, for good (BudgetExhausted)."""
        ...

    def reservation(self, session_id: str) -> Reservation | None:
        """The session's reservation, or None if it has not reserved anything."""
        ...

    def record_evaluation(self, auth_id: str, session_id: str, n: int) -> int:
        """Count ``n`` more evaluated elements; returns the session's new evaluated total."""
        ...

    def close_session(
        self,
        auth_id: str,
        session_id: str,
        receipt: bytes,
        custodian_signature: bytes,
        requester_signature: bytes | None = None,
    ) -> None:
        """Store the signed receipt that ends a session; no budget use after this."""
        ...

    def add_countersignature(self, session_id: str, requester_signature: bytes) -> None:
        """Attach the requester's countersignature to a closed session's receipt (once)."""
        ...

    def sessions(self, auth_id: str) -> list[SessionRow]:
        """The authorization's sessions in opening order."""
        ...

    def receipts(self, auth_id: str) -> list[ReceiptRow]:
        """Receipts of the authorization's closed sessions, in closing order."""
        ...

    # -- disclosures ---------------------------------------------------------------------------

    def record_disclosure(
        self, auth_id: str, session_id: str, record_id: str, rule_id: str
    ) -> DisclosureRow:
        """Durably account for one disclosure; release the fields only after this returns."""
        ...

    def record_disclosures(
        self, auth_id: str, session_id: str, items: Sequence[tuple[str, str]]
    ) -> list[DisclosureRow]:
        """Account for a batch of ``(record_id, rule_id)``; all or nothing past the cap."""
        ...

    def disclosures(
        self, auth_id: str | None = None, *, include_repeats: bool = False
    ) -> list[DisclosureRow]:
        """Disclosure rows in recording order (all authorizations if None).

        By default one row per disclosed record (what counts against the cap); with
        ``include_repeats`` every replay too, flagged ``repeat=True``.
        """
        ...

    def disclosed_count(self, auth_id: str, session_id: str) -> int:
        """Distinct records first disclosed by this session (what its receipt must state)."""
        ...

    # -- aggregate releases -------------------------------------------------------------------

    def record_aggregate_release(
        self, auth_id: str, session_id: str, requester_id: str, contributing: bytes,
        audit_payload: Mapping[str, Any],
        admit: Callable[[Sequence[AggregateReleaseRow]], None],
    ) -> AggregateReleaseRow:
        """Durably record one aggregate release and its audit entry, in one transaction.

        ``admit`` sees the requester's earlier releases inside that transaction and raises to
        refuse (nothing is written then), so two concurrent sessions cannot both pass a rule
        that compares a release with the ones before it.
        """
        ...

    def aggregate_releases(self, requester_id: str) -> list[AggregateReleaseRow]:
        """The requester's recorded aggregate releases, oldest first."""
        ...

    # -- the national custodian's epoch mode --------------------------------------------------

    def store_evaluated(self, auth_id: str, session_id: str, seq: int, elements: bytes) -> None:
        """Durably keep the blinded elements of a session's evaluated chunk ``seq`` (a
        repeated ``seq`` replaces it), bounded by the reservation (``check_evaluated_store``)."""
        ...

    def evaluated_elements(self, session_id: str, seq: int) -> bytes | None:
        """The stored blinded elements of chunk ``seq`` of a session, or None."""
        ...

    def record_tagset_fetch(self, auth_id: str, requester_id: str, epoch_id: str,
                            rules: Sequence[str], bytes_sent: int, cap: int) -> TagSetFetchRow:
        """Account one tag-set fetch (row and audit entry in one step) before it is sent;
        refuses past ``cap`` fetches of that epoch under that authorization."""
        ...

    def tagset_fetches(self, auth_id: str) -> list[TagSetFetchRow]:
        """The authorization's tag-set fetches, oldest first."""
        ...

    def consistent_read(self) -> AbstractContextManager[None]:
        """Reads inside this block see one snapshot (for exports spanning several reads)."""
        ...
