"""The session core every tier runs on: one state machine, one gate, one account.

Rules of this module, in the spirit of h11's ``_state.py`` and h2's ``stream.py``
(docs/architecture.md, Sessions and State tables):

1. A role's transitions are one :class:`TransitionTable`: ``(state, event) -> Row(handler,
   next state)``.  An event is a received message *type* (``BlindedChunk``), a send
   (``Send(CustodianChunk)``) or a local step (``Step("match")``), so what a session
   sends, accepts and does are checked in the same place.  A reader can check a table at a
   glance; a test walks every pair.  A session may run on a table derived for it
   (``TransitionTable.derive``, ``SessionMachine._adopt``; e.g. with its engine's rows).
2. One processing path: :meth:`SessionMachine.handle` (received messages),
   :meth:`SessionMachine.send` (messages this side produces) and :meth:`SessionMachine.step`
   look the event up, run the gate, run the row's handler and only then apply the row's
   next state.  A reply to a received message is its handler's return value.
3. Any exception in a lookup, the gate or a handler moves the session to ``FAILED`` with
   ``failure_reason`` (``"<code>: <message>"``) and reaches the caller as a typed library
   error: library errors (``ProtocolError``, ``PolicyRefusal``, ``BudgetExhausted``,
   ``InvalidElementError``, ...) as they are, anything else wrapped in ``ProtocolError``.
   A failed session refuses everything after; a *closed* session keeps its state (its
   signed receipt stands) and refuses what comes after without failing.  One refusal does
   not fail a session: a message from another peer (it is not the owner's doing, and
   letting it fail the session would let anyone who learns a session id kill it).
4. Policy is decided in ``protocol.policy`` only.  The custodian core calls ``decide`` at
   open and ``check_message`` on every later message (session ownership = the
   transport-authenticated peer id; validity window against the injected clock), and
   ``check_evaluation`` before it counts; the session's table decides state, tier and
   engine (another tier's or engine's message is not in it).  The ledger re-checks budget
   and caps atomically: defence in depth, not a second decider.

How a tier plugs in
-------------------
A custodian-side tier subclasses :class:`CustodianCore` and supplies:

* ``TABLE``: its rows, built from :func:`common_custodian_rows` (open, close, countersign)
  plus its own, e.g. ``(RECEIVING, BlindedChunk): Row("_blinded", RECEIVING)`` and
  ``(RECEIVING, Send(CustodianChunk)): Row("_custodian_stream", REBLINDING, stream=True)``.
  Rows of messages that only account for finished work (close, countersign) set
  ``window=False``.  A tier whose rows depend on the session (the identity tier: on its
  engine's exchanges) derives a table per session, adopts it in a hook, and lists the
  handlers its derived rows may name in ``DERIVED_HANDLERS``.
* ``SERVED_TIERS`` / ``SERVED_ENGINES`` (what ``decide`` lets it open), ``RESUMABLE`` (may
  a session id reopen with its reservation, e.g. after a reconnect), ``AUDIT_STAGE`` and
  ``TRANSCRIPT`` (its transcript class).
* hooks: ``_session_request(open message) -> SessionRequest``; ``_decide_options(signed)``
  (extra ``decide`` keywords, e.g. ``named_subjects_ready`` or ``engine_traits``);
  ``_audit_fields`` / ``_session_meta`` (what the decision entry and the session row record);
  ``_prepare`` (work that must fail before any budget is spent); ``_opened(open message,
  reservation) -> open response`` (keys, indexes, the reply); ``_discard`` (drop one-time
  secrets when the session closes or fails).
* handlers named by its rows.  Evaluation handlers call :meth:`CustodianCore._count` before
  they evaluate (or, when the engine validates while it evaluates, ``_admit_units`` before
  and ``_record_units`` after, before the reply leaves: ``evaluated`` then counts only what
  was evaluated); streams are handlers that check eagerly and return an iterator (the core
  gates every item it yields).

Everything else (the size checks, parse the signed authorization, ``decide``, the bounded and
per-peer rate-limited audit of refusals, one neutral answer for an unavailable session id,
registering the authorization, the idempotent reservation, the gate, admitting and counting
units, the signed receipt and the countersignature) is here, once.

A requester-side tier subclasses :class:`RequesterCore` the same way (its table; an
``_open_request`` handler; ``_close_request`` and ``_on_receipt`` are shared).  The two
tiers on it are ``protocol.sessions.identity`` and ``protocol.sessions.aggregate``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.accounting.port import LedgerPort, Reservation
from protocol.accounting.receipts import countersign, issue_receipt, store_countersignature
from protocol.accounting.refusals import RefusalLimiter
from protocol.domain.messages import CloseRequest, Receipt, Transcript
from protocol.errors import LedgerError, PolicyRefusal, ProtocolError, PSIError
from protocol.policy.decide import (
    Authorization,
    CustodianPolicy,
    Reason,
    SessionRequest,
    SignedAuthorization,
    Tier,
    check_evaluation,
    check_message,
    decide,
)

__all__ = [
    "MAX_OPEN_NAME",
    "MAX_OPEN_NAMES",
    "MAX_SESSION_ID",
    "SESSION_ID_UNAVAILABLE",
    "CustodianContext",
    "CustodianCore",
    "Event",
    "OpenMessage",
    "ReceiptKeyMissing",
    "RequesterCore",
    "Row",
    "Send",
    "SessionClosed",
    "SessionMachine",
    "Step",
    "TransitionTable",
    "bounded",
    "common_custodian_rows",
    "request_digest",
]

#: Longest session id a custodian accepts (it is a ledger key and appears in every entry).
MAX_SESSION_ID = 128
#: Longest rule, field, tier or engine name an open request may carry, and the most names
#: in one of its lists: checked before anything is parsed, decided or written (every real
#: name and every real list is far shorter).
MAX_OPEN_NAME = 64
MAX_OPEN_NAMES = 32
_MAX_COUNT = 2**63 - 1  # a signed SQLite INTEGER
#: The one answer to every refusal of a session id that depends on the ledger (used by
#: another authorization, another reservation, other metadata, or not resumable): the same
#: words and status whoever holds the id, so a refusal is no oracle on which ids exist.
SESSION_ID_UNAVAILABLE = ("session id is not available for this open; open a new session "
                          "id, or resume with exactly the request that opened it")
#: Audit payloads are bounded: a hostile open request cannot grow the chain without limit.
_MAX_AUDIT_TEXT = 256
_MAX_AUDIT_ITEMS = 32


class ReceiptKeyMissing(ProtocolError):
    """The custodian holds no receipt key for the requester (docs/architecture.md, Late failures).

    Refused at open, before any budget is reserved: without the key the countersignature
    could never be checked, and the session would fail only after its disclosures.
    """

    code = "no_receipt_key"


class SessionClosed(ProtocolError):
    """A session id that already closed with a signed receipt cannot be resumed."""

    code = "session_closed"


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Send:
    """The event of this side producing a message of type ``message``."""

    message: type

    def __repr__(self) -> str:
        return f"Send({self.message.__name__})"


@dataclass(frozen=True)
class Step:
    """A local step that changes a session's state without a message (the requester's match)."""

    name: str

    def __repr__(self) -> str:
        return f"Step({self.name})"


Event = type | Send | Step


def _event_name(event: Event) -> str:
    if isinstance(event, Send):
        return f"send {event.message.__name__}"
    if isinstance(event, Step):
        return event.name
    return f"accept {getattr(event, '__name__', repr(event))}"


@dataclass(frozen=True)
class Row:
    """What an event does in a state: run ``handler``, then move to ``next_state``.

    ``window``: the custodian's gate checks the authorization's validity window (off for
    close and countersign: a receipt is owed even after expiry).  ``stream``: the handler
    returns an iterator whose every item passes the gate.  ``takes_type``: the handler of a
    send receives the message type first (one handler serving the sends of several types,
    e.g. every message an engine's exchanges send).
    """

    handler: str
    next_state: StrEnum
    window: bool = True
    stream: bool = False
    takes_type: bool = False


class TransitionTable(Mapping[tuple[StrEnum, Event], Row]):
    """One role's complete table; anything not in it is a ``ProtocolError`` naming why.

    ``protocol`` names what the table speaks, for the error a foreign event gets (e.g.
    "the identity tier with engine 'oprf'").
    """

    def __init__(
        self, role: str, rows: Mapping[tuple[StrEnum, Event], Row], *,
        initial: StrEnum, failed: StrEnum, final: Iterable[StrEnum] = (),
        protocol: str = "this tier's protocol",
    ) -> None:
        self.role = role
        self.initial = initial
        self.failed = failed
        self.final = frozenset(final)
        self.protocol = protocol
        self._rows = dict(rows)
        self.events = frozenset(event for _, event in self._rows)
        self.handlers = frozenset(row.handler for row in self._rows.values())
        if any(state == failed for state, _ in self._rows):
            raise ValueError(f"{role}: a failed session accepts nothing")

    def derive(self, rows: Mapping[tuple[StrEnum, Event], Row], *, protocol: str
               ) -> TransitionTable:
        """This table plus ``rows`` (e.g. those an engine's exchanges declare), same states.

        A derived row may not replace one of this table's: what every session of the role
        does stays what this table says.
        """
        clash = sorted(repr(key) for key in rows if key in self._rows)
        if clash:
            raise ValueError(f"{self.role}: derived rows replace common rows: {clash}")
        return TransitionTable(self.role, {**self._rows, **rows}, initial=self.initial,
                               failed=self.failed, final=self.final, protocol=protocol)

    def __getitem__(self, key: tuple[StrEnum, Event]) -> Row:
        return self._rows[key]

    def __iter__(self) -> Iterator[tuple[StrEnum, Event]]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, state: StrEnum, event: Event) -> Row:
        """The row for ``event`` in ``state``, or a ProtocolError saying which check failed."""
        row = self._rows.get((state, event))
        if row is None:
            if event not in self.events:
                what = event.message if isinstance(event, Send) else event
                name = getattr(what, "__name__", repr(what))
                raise ProtocolError(
                    f"{self.role} session in state {state.value!r} cannot {_event_name(event)}: "
                    f"{name} is not a message of {self.protocol} (a message of another tier or "
                    "engine, or not a message)"
                )
            raise ProtocolError(
                f"{self.role} session in state {state.value!r} cannot {_event_name(event)}"
            )
        return row


# --------------------------------------------------------------------------- one path


def _reason(exc: BaseException) -> str:
    code = exc.code if isinstance(exc, PSIError) else "internal"
    return f"{code}: {exc}"


class SessionMachine:
    """The one processing path shared by both roles: look up, gate, run, apply.

    Subclasses set ``TABLE`` and name handlers in it; every handler named there must exist
    (checked when the class is made, so a lookup can never end in an AttributeError).  A
    session runs on ``self.table``: ``TABLE``, or a table derived from it for this session
    (``_adopt``; e.g. with its engine's rows), whose extra rows may name only the handlers
    listed in ``DERIVED_HANDLERS`` (checked with ``TABLE``'s when the class is made).
    """

    TABLE: ClassVar[TransitionTable]
    DERIVED_HANDLERS: ClassVar[frozenset[str]] = frozenset()
    table: TransitionTable
    state: StrEnum
    failure_reason: str
    engine: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table = cls.__dict__.get("TABLE")
        if table is not None:
            named = table.handlers | cls.DERIVED_HANDLERS
            missing = sorted(h for h in named if not callable(getattr(cls, h, None)))
            if missing:
                raise TypeError(f"{cls.__name__}: table handlers missing: {missing}")

    def _start(self) -> None:
        self.table = self.TABLE
        self.state = self.TABLE.initial
        self.failure_reason = ""
        self.engine = ""

    def _adopt(self, table: TransitionTable) -> None:
        """Run on ``table`` from now on: ``TABLE`` extended for this session (its engine)."""
        unknown = sorted(table.handlers - self.TABLE.handlers - self.DERIVED_HANDLERS)
        if unknown or (table.initial, table.failed) != (self.TABLE.initial, self.TABLE.failed):
            raise ProtocolError(f"{type(self).__name__} cannot run on the {table.role} table "
                                f"of {table.protocol} (handlers {unknown})")
        self.table = table

    # -- hooks ------------------------------------------------------------------

    def _check_owner(self, peer_id: str | None) -> None:
        """Refuse a message from someone other than the session's owner (no state change)."""

    def _gate(self, row: Row) -> None:
        """Per-message policy gate after the table lookup (custodian side)."""

    def _discard(self) -> None:
        """Drop one-time secrets: called when the session closes or fails."""

    # -- the path -----------------------------------------------------------------

    def handle(self, message: object, *, peer_id: str | None = None) -> Any:
        """Apply one received message; returns the reply (or ``None``)."""
        return self._run(type(message), (message,), peer_id)

    def send(self, message_type: type, *args: Any, peer_id: str | None = None) -> Any:
        """Produce this side's next message(s) of ``message_type`` (an iterator for streams)."""
        return self._run(Send(message_type), args, peer_id)

    def step(self, name: str, *args: Any) -> Any:
        """Take the local step ``name`` (no message moves; e.g. the requester's match)."""
        return self._run(Step(name), args, None)

    def _run(self, event: Event, args: tuple[Any, ...], peer_id: str | None) -> Any:
        self._check_owner(peer_id)
        table = self.table
        if self.state == table.failed:
            raise ProtocolError(
                f"{table.role} session failed earlier ({self.failure_reason}); "
                "open a new session")
        try:
            row = table.lookup(self.state, event)
            self._gate(row)
            handler = getattr(self, row.handler)
            if row.takes_type and isinstance(event, Send):
                result = handler(event.message, *args)
            else:
                result = handler(*args)
        except PSIError as exc:
            self._failed(exc)
            raise
        except Exception as exc:
            raise self._failed(exc) from exc
        self.state = row.next_state
        if row.stream:
            return self._guarded(result, row)
        return result

    def _guarded(self, items: Iterable[Any], row: Row) -> Iterator[Any]:
        """Yield a stream's items while the session stays alive and the gate stays open."""
        iterator = iter(items)
        while True:
            try:
                if self.state == self.table.failed:
                    raise ProtocolError(f"the session failed during the stream "
                                        f"({self.failure_reason})")
                self._gate(row)
                item = next(iterator)
            except StopIteration:
                return
            except PSIError as exc:
                self._failed(exc)
                raise
            except Exception as exc:
                raise self._failed(exc) from exc
            yield item

    def _failed(self, exc: Exception) -> PSIError:
        """Record the failure; the typed error to raise (library errors pass unchanged)."""
        table = self.table
        error = exc if isinstance(exc, PSIError) else ProtocolError(
            f"{table.role} session failed in state {self.state.value!r}: "
            f"{type(exc).__name__}: {exc}")
        if self.state not in table.final and self.state != table.failed:
            self.state = table.failed
            self.failure_reason = _reason(error)
            self._discard()
        return error


# --------------------------------------------------------------------------- custodian


class CustodianContext(Protocol):
    """What the custodian core needs from its configuration (``CustodianConfig`` has it).

    Read-only: a session reads its configuration, never replaces a part of it.
    """

    @property
    def policy(self) -> CustodianPolicy: ...

    @property
    def ledger(self) -> LedgerPort: ...

    @property
    def signing_key(self) -> Ed25519PrivateKey: ...

    @property
    def requester_keys(self) -> Mapping[str, Ed25519PublicKey]: ...

    @property
    def clock(self) -> Callable[[], float]: ...

    @property
    def refusals(self) -> RefusalLimiter: ...


class OpenMessage(Protocol):
    """The fields every tier's open request carries."""

    session_id: str
    signed_authorization: bytes
    tier: str
    element_count: int
    engine: str

    def transcript_bytes(self) -> bytes: ...


def request_digest(req: OpenMessage) -> str:
    """SHA-256 of an open request's canonical encoding: what a refusal's audit entry keeps
    instead of the request (which a hostile peer makes as large as the transport allows)."""
    try:
        data = req.transcript_bytes()
    except ValueError:  # a count no encoding holds; the refusal still needs a digest
        data = repr(req).encode("utf-8", "replace")
    return hashlib.sha256(data).hexdigest()


def _shape_problem(req: object) -> str | None:
    """What makes an open request too large to consider, or None (sizes only, no meaning).

    Generic over a tier's open message: every string and every list of strings it carries
    is bounded (the session id by :data:`MAX_SESSION_ID`), and its counts must fit a ledger
    integer.  Runs before anything is parsed, decided or written.
    """
    session_id = getattr(req, "session_id", "")
    if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID:
        size = len(session_id) if isinstance(session_id, str) else 0
        return f"a session id has 1..{MAX_SESSION_ID} characters, not {size:,}"
    for name, value in vars(req).items():
        if name in ("session_id", "signed_authorization"):
            continue
        if isinstance(value, str) and len(value) > MAX_OPEN_NAME:
            return f"{name} has {len(value):,} characters; the limit is {MAX_OPEN_NAME}"
        if isinstance(value, tuple | list):
            if len(value) > MAX_OPEN_NAMES:
                return f"{name} has {len(value):,} items; the limit is {MAX_OPEN_NAMES}"
            if any(not isinstance(v, str) or len(v) > MAX_OPEN_NAME for v in value):
                return f"{name} has an item longer than {MAX_OPEN_NAME} characters"
        if isinstance(value, int) and not isinstance(value, bool) and not (
                0 <= value <= _MAX_COUNT):
            return f"{name} must be in 0..{_MAX_COUNT:,}"
    return None


def bounded(value: Any) -> Any:
    """An audit-safe copy of a payload: long strings and long lists cut, structure kept."""
    if isinstance(value, str):
        return value if len(value) <= _MAX_AUDIT_TEXT else value[:_MAX_AUDIT_TEXT] + "..."
    if isinstance(value, list | tuple):
        return [bounded(v) for v in list(value)[:_MAX_AUDIT_ITEMS]]
    if isinstance(value, Mapping):
        return {str(k): bounded(v) for k, v in value.items()}
    return value


def common_custodian_rows(
    open_message: type, *, initial: StrEnum, opened: StrEnum, closable: Iterable[StrEnum],
    closed: StrEnum,
) -> dict[tuple[StrEnum, Event], Row]:
    """The rows every custodian tier shares: open, close (from ``closable``), countersign."""
    rows: dict[tuple[StrEnum, Event], Row] = {(initial, open_message): Row("_open", opened)}
    for state in closable:
        rows[(state, CloseRequest)] = Row("_close", closed, window=False)
    # A close repeated after a lost reply (or a restart) gets the same signed receipt.
    rows[(closed, CloseRequest)] = Row("_reclose", closed, window=False)
    rows[(closed, Receipt)] = Row("_countersign", closed, window=False)
    return rows


class CustodianCore(SessionMachine):
    """Custodian side of one session of any tier: open, gate, count, close, countersign."""

    SERVED_TIERS: ClassVar[frozenset[Tier]]
    SERVED_ENGINES: ClassVar[frozenset[str] | None] = None
    RESUMABLE: ClassVar[bool] = False
    AUDIT_STAGE: ClassVar[str] = "open"
    TRANSCRIPT: ClassVar[type[Transcript]] = Transcript

    def __init__(self, context: CustodianContext) -> None:
        self.context = context
        self._start()
        self.transcript = self.TRANSCRIPT()
        self.signed: SignedAuthorization | None = None
        self.session_id = ""
        self.peer_id = ""
        self.element_limit = 0
        self.evaluated = 0
        self.disclosed = 0
        self.receipt: Receipt | None = None

    @property
    def authorization(self) -> Authorization:
        if self.signed is None:
            raise ProtocolError("session is not open")
        return self.signed.authorization

    def countersign(self, receipt: Receipt, *, peer_id: str | None = None) -> None:
        """Store the requester's countersignature (a Receipt received in state CLOSED)."""
        self.handle(receipt, peer_id=peer_id)

    # -- gate ---------------------------------------------------------------------

    def _check_owner(self, peer_id: str | None) -> None:
        if self.signed is None:  # opening: the peer id is recorded, decide() checks it
            if self.state == self.table.initial and peer_id is not None:
                self.peer_id = peer_id
            elif peer_id is not None and self.peer_id and peer_id != self.peer_id:
                # a session restored from its ledger receipt (restore_closed)
                raise PolicyRefusal(
                    f"session {self.session_id!r} belongs to requester {self.peer_id!r}, "
                    f"not {peer_id!r}", reasons=(Reason.REQUESTER_MISMATCH.value,))
            return
        if peer_id is None:
            return  # an in-process caller speaks for the owner
        check_message(self.signed, peer_id=peer_id, now=self.context.clock(),
                      policy=self.context.policy, window=False).raise_if_refused()

    def _gate(self, row: Row) -> None:
        if self.signed is None or not row.window:
            return
        check_message(self.signed, peer_id=self.peer_id, now=self.context.clock(),
                      policy=self.context.policy).raise_if_refused()

    # -- open ---------------------------------------------------------------------

    def _refused(self, reasons: Sequence[str], message: str, *, digest: str,
                 authorization_id: str = "") -> PolicyRefusal:
        """Account for a refused open, and build its error.

        The audit entry is small and bounded whatever the request was: the stage, the peer,
        the reason codes, the authorization id (if one was parsed) and the request's digest,
        never its body.  Refusals are rate-limited per peer (``RefusalLimiter``, limits in
        the policy): beyond the budget they are counted and summarised, so a flood cannot
        grow the chain (docs/architecture.md, Accounting).
        """
        ctx = self.context
        codes = list(dict.fromkeys(str(r) for r in reasons))[:_MAX_AUDIT_ITEMS]
        entry: dict[str, Any] = {"stage": self.AUDIT_STAGE, "peer": self.peer_id[:64],
                                 "reasons": codes, "request_sha256": digest}
        if authorization_id:
            entry["authorization_id"] = authorization_id[:MAX_OPEN_NAME]
        ctx.refusals.record(ctx.ledger, self.peer_id, ctx.clock(), entry)
        return PolicyRefusal(message, reasons=tuple(codes))

    def _budget_remaining(self, auth: Authorization, req: OpenMessage) -> int:
        ledger = self.context.ledger
        try:
            remaining = ledger.budget(auth.authorization_id).remaining
        except LedgerError:  # first use of this authorization
            return auth.max_evaluations
        if self.RESUMABLE:
            resumed = ledger.reservation(req.session_id)
            if (resumed is not None and resumed.auth_id == auth.authorization_id
                    and resumed.reserved == req.element_count):
                remaining += resumed.reserved  # already charged; not charged again
        return remaining

    def _open(self, req: OpenMessage) -> object:
        if not self.peer_id:
            raise ProtocolError("open requires the transport-authenticated peer id")
        ctx = self.context
        ledger = ctx.ledger
        digest = request_digest(req)
        # Sizes first: nothing of an oversized request is parsed, decided or written.
        problem = _shape_problem(req)
        if problem is not None:
            raise self._refused((Reason.MALFORMED,), f"open request refused: {problem}",
                                digest=digest)
        try:
            signed = SignedAuthorization.from_bytes(req.signed_authorization)
        except ValueError as exc:
            raise self._refused((Reason.MALFORMED,), bounded(f"malformed authorization: {exc}"),
                                digest=digest) from exc
        auth = signed.authorization
        try:
            request = self._session_request(req)
        except ValueError as exc:
            raise self._refused((Reason.MALFORMED,), bounded(f"malformed session request: {exc}"),
                                digest=digest, authorization_id=auth.authorization_id) from exc
        remaining = self._budget_remaining(auth, req)
        decision = decide(signed, request, ctx.policy, now=ctx.clock(),
                          budget_remaining=remaining, served_tiers=self.SERVED_TIERS,
                          served_engines=self.SERVED_ENGINES, **self._decide_options(signed))
        if not decision.allowed:
            raise self._refused(decision.reasons, decision.message, digest=digest,
                                authorization_id=auth.authorization_id)
        if self.peer_id not in ctx.requester_keys:
            # Checked before anything is reserved or evaluated: the receipt at the end
            # could never be countersigned, so the session must not start.
            message = (f"no receipt key registered for requester {self.peer_id!r}: the "
                       "custodian could not check its countersignature, so no session is "
                       "opened (the custodian operator must add the requester's key)")
            self._refused((ReceiptKeyMissing.code,), message, digest=digest,
                          authorization_id=auth.authorization_id)
            raise ReceiptKeyMissing(message)
        earlier = ledger.reservation(req.session_id)
        if earlier is not None and (not self.RESUMABLE or (earlier.auth_id, earlier.reserved)
                                    != (auth.authorization_id, req.element_count)):
            # Only the same authorization and element count resume a session id, and only
            # in a resumable tier (others keep their keys only in the session).  The answer
            # is the same whoever holds the id: no oracle on which ids exist.
            raise self._refused((Reason.SESSION_ID_UNAVAILABLE,), SESSION_ID_UNAVAILABLE,
                                digest=digest, authorization_id=auth.authorization_id)
        if earlier is not None and self._stored_receipt(earlier.auth_id,
                                                        req.session_id) is not None:
            message = (f"session {req.session_id!r} is closed with a signed receipt; send "
                       "CloseSession again to receive that receipt, or open a new session id")
            self._refused((SessionClosed.code,), message, digest=digest,
                          authorization_id=auth.authorization_id)
            raise SessionClosed(message)
        if earlier is None:
            # A new session's decision; a resume adds no entry (its session and reservation
            # are on the ledger already), so repeating an open cannot grow the chain.
            ledger.audit("decision", bounded({
                "stage": self.AUDIT_STAGE, "authorization_id": auth.authorization_id,
                "session_id": req.session_id, "peer": self.peer_id, "allowed": True,
                "elements": req.element_count, "request_sha256": digest,
                **self._audit_fields(req),
            }))
        self._prepare(req, signed)  # data problems surface before any budget is spent
        # Only a verified authorization is registered (an unverified one could squat its id).
        ledger.ensure_authorization(
            auth.authorization_id, max_evaluations=auth.max_evaluations,
            max_disclosures=auth.max_disclosures, not_after=auth.not_after,
        )
        # Reserve before any work; idempotent per session id, never refunded.
        try:
            reservation = ledger.reserve(auth.authorization_id, req.session_id,
                                         req.element_count)
            ledger.open_session(auth.authorization_id, req.session_id,
                                bounded({"peer": self.peer_id, **self._session_meta(req)}))
        except LedgerError as exc:
            # Past the checks above, the ledger refuses only a session id it holds otherwise:
            # a resume that changes what the session was opened with (its rules, say), or a
            # concurrent open of the same new id.  Refused like any other unavailable id
            # (nothing was charged again), never as an internal error.
            raise PolicyRefusal(SESSION_ID_UNAVAILABLE,
                                reasons=(Reason.SESSION_ID_UNAVAILABLE.value,)) from exc
        self.signed = signed
        self.session_id = req.session_id
        self.engine = req.engine
        self.element_limit = reservation.reserved
        self.evaluated = reservation.evaluated
        resp = self._opened(req, reservation)
        self.transcript.add("open", req)
        self.transcript.add("open", resp)
        return resp

    # -- tier hooks for open ----------------------------------------------------------

    def _session_request(self, req: Any) -> SessionRequest:
        raise NotImplementedError

    def _decide_options(self, signed: SignedAuthorization) -> dict[str, Any]:
        return {}

    def _audit_fields(self, req: Any) -> dict[str, Any]:
        return {}

    def _session_meta(self, req: Any) -> dict[str, Any]:
        return {}

    def _prepare(self, req: Any, signed: SignedAuthorization) -> None:
        """Tier data work that must fail before budget is reserved (default: none)."""

    def _opened(self, req: Any, reservation: Reservation) -> object:
        raise NotImplementedError

    # -- count, close, countersign ---------------------------------------------------

    def _count(self, units: int) -> None:
        """Count ``units`` against the reservation *before* evaluating them.

        Policy decides (``check_evaluation``); the ledger then counts, and its own check of
        the reservation is defence in depth.  An evaluation never exists without its account.
        """
        self._admit_units(units)
        self._record_units(units)

    def _admit_units(self, units: int) -> None:
        """Policy's decision that ``units`` more fit the reservation (before any evaluation)."""
        check_evaluation(self.authorization, reserved=self.element_limit,
                         evaluated=self.evaluated, units=units).raise_if_refused()

    def _record_units(self, units: int) -> None:
        """Durably count ``units`` that were evaluated, before their result leaves.

        For a tier whose engine validates while it evaluates (the identity tier): what is
        counted is what was evaluated, never an element refused as invalid.  The ledger's
        own check of the reservation still applies; if it refuses, the result is dropped.
        """
        self.evaluated = self.context.ledger.record_evaluation(
            self.authorization.authorization_id, self.session_id, units)

    def _close(self, req: CloseRequest) -> Receipt:
        ctx = self.context
        self.receipt = issue_receipt(
            ledger=ctx.ledger, signing_key=ctx.signing_key,
            custodian_id=ctx.policy.custodian_id, requester_id=self.peer_id,
            authorization_id=self.authorization.authorization_id, session_id=self.session_id,
            evaluated=self.evaluated, disclosed=self.disclosed,
            own_transcript=self.transcript.digest(), presented_transcript=req.transcript_hash,
        )
        self._discard()
        return self.receipt

    def _reclose(self, req: CloseRequest) -> Receipt:
        """Close again (the reply was lost, or the custodian restarted): the same receipt."""
        issued = self.receipt
        if issued is None:
            raise ProtocolError("closed session has no receipt")
        if not hmac.compare_digest(req.transcript_hash, issued.transcript_hash):
            raise ProtocolError("transcript hash mismatch: the session closed over another "
                                "transcript")
        return replace(issued, requester_signature=b"")

    def _stored_receipt(self, auth_id: str, session_id: str) -> Receipt | None:
        """The signed receipt the ledger holds for ``session_id`` (None while it is open)."""
        for row in self.context.ledger.receipts(auth_id):
            if row.session_id == session_id:
                return Receipt.from_signed_bytes(row.receipt, row.custodian_signature,
                                                 row.requester_signature or b"")
        return None

    def restore_closed(self, session_id: str, peer_id: str) -> bool:
        """Become the closed session ``session_id`` of ``peer_id`` from its ledger receipt.

        After a restart a closed session is no longer in memory; restored, it answers a
        repeated close with the same receipt and accepts the countersignature.  False if the
        ledger holds no receipt of that session for that peer.
        """
        if self.state != self.table.initial or not session_id:
            return False
        reservation = self.context.ledger.reservation(session_id)
        if reservation is None:
            return False
        receipt = self._stored_receipt(reservation.auth_id, session_id)
        if receipt is None or receipt.requester_id != peer_id:
            return False
        self.session_id, self.peer_id, self.receipt = session_id, peer_id, receipt
        self.evaluated, self.disclosed = receipt.evaluated, receipt.disclosed
        self.state = next(iter(self.table.final))
        return True

    def _countersign(self, receipt: Receipt) -> None:
        ctx = self.context
        self.receipt = store_countersignature(
            ledger=ctx.ledger, requester_keys=ctx.requester_keys, peer_id=self.peer_id,
            issued=self.receipt, presented=receipt)


# --------------------------------------------------------------------------- requester


class RequesterCore(SessionMachine):
    """Requester side of one session of any tier: open bookkeeping, close, countersign."""

    def __init__(
        self, signed: SignedAuthorization, *, session_id: str, transcript: Transcript,
        signing_key: Ed25519PrivateKey | None, custodian_key: Ed25519PublicKey | None,
    ) -> None:
        self._start()
        self.signed = signed
        self.session_id = session_id
        self.transcript = transcript
        self.signing_key = signing_key
        self.custodian_key = custodian_key
        self.receipt: Receipt | None = None

    def close_request(self) -> CloseRequest:
        """Done: carries this side's transcript hash (the custodian compares its own)."""
        return self.send(CloseRequest)  # type: ignore[no-any-return]

    def _close_request(self) -> CloseRequest:
        return CloseRequest(transcript_hash=self.transcript.digest())

    def _on_receipt(self, receipt: Receipt) -> Receipt:
        self.receipt = countersign(
            receipt, session_id=self.session_id, own_transcript=self.transcript.digest(),
            custodian_key=self.custodian_key, signing_key=self.signing_key)
        return self.receipt
