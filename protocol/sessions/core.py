"""The session core every tier runs on: one state machine, one gate, one account.

Rules of this module, in the spirit of h11's ``_state.py`` and h2's ``stream.py``
(docs/architecture.md, Sessions and State tables):

1. A role's transitions are one :class:`TransitionTable`: ``(state, event) -> Row(handler,
   next state)``.  An event is a received message *type* (``BlindedChunk``), a send
   (``Send(DoubleBlindedChunk)``) or a local step (``Step("match")``), so what a session
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
  ``(SERVING, Send(CustodianPairsChunk)): Row("_pair_stream", SERVING, stream=True)``.
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
  they evaluate; streams are handlers that check eagerly and return an iterator (the core
  gates every item it yields).

Everything else (parse the signed authorization, ``decide``, the bounded audit entry,
registering the authorization, the idempotent reservation, the gate, count-before-evaluate,
the signed receipt and the countersignature) is here, once.

A requester-side tier subclasses :class:`RequesterCore` the same way (its table; an
``_open_request`` handler; ``_close_request`` and ``_on_receipt`` are shared).  The two
tiers on it are ``protocol.sessions.identity`` and ``protocol.sessions.aggregate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.accounting.port import LedgerPort, Reservation
from protocol.accounting.receipts import countersign, issue_receipt, store_countersignature
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
    "MAX_SESSION_ID",
    "CustodianContext",
    "CustodianCore",
    "Event",
    "OpenMessage",
    "RequesterCore",
    "Row",
    "Send",
    "SessionMachine",
    "Step",
    "TransitionTable",
    "bounded",
    "common_custodian_rows",
]

#: Longest session id a custodian accepts (it is a ledger key and appears in every entry).
MAX_SESSION_ID = 128
#: Audit payloads are bounded: a hostile open request cannot grow the chain without limit.
_MAX_AUDIT_TEXT = 256
_MAX_AUDIT_ITEMS = 32


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


class OpenMessage(Protocol):
    """The fields every tier's open request carries."""

    session_id: str
    signed_authorization: bytes
    tier: str
    element_count: int
    engine: str


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

    def _refused(self, stage: str, reason: Reason, message: str) -> PolicyRefusal:
        """Audit a refusal that happens before ``decide`` can run, and build its error."""
        self.context.ledger.audit("refusal", bounded({
            "stage": stage, "reasons": [reason.value], "peer": self.peer_id,
            "message": message,
        }))
        return PolicyRefusal(message, reasons=(reason.value,))

    def _budget_remaining(self, auth: Authorization, req: OpenMessage) -> int:
        ledger = self.context.ledger
        try:
            remaining = ledger.budget(auth.authorization_id).remaining
        except LedgerError:  # first use of this authorization
            return auth.max_queries
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
        try:
            signed = SignedAuthorization.from_bytes(req.signed_authorization)
        except ValueError as exc:
            raise self._refused(self.AUDIT_STAGE, Reason.MALFORMED,
                                f"malformed authorization: {exc}") from exc
        auth = signed.authorization
        remaining = self._budget_remaining(auth, req)
        try:
            request = self._session_request(req)
        except ValueError as exc:
            raise self._refused(self.AUDIT_STAGE, Reason.MALFORMED,
                                f"malformed session request: {exc}") from exc
        decision = decide(signed, request, ctx.policy, now=ctx.clock(),
                          budget_remaining=remaining, served_tiers=self.SERVED_TIERS,
                          served_engines=self.SERVED_ENGINES, **self._decide_options(signed))
        ledger.audit("decision", bounded({
            "stage": self.AUDIT_STAGE, "authorization_id": auth.authorization_id,
            "session_id": req.session_id, "peer": self.peer_id, "allowed": decision.allowed,
            "reasons": [str(r) for r in decision.reasons], "elements": req.element_count,
            **self._audit_fields(req),
        }))
        decision.raise_if_refused()
        if not req.session_id or len(req.session_id) > MAX_SESSION_ID:
            raise ProtocolError(f"session id must be 1..{MAX_SESSION_ID} characters")
        earlier = ledger.reservation(req.session_id)
        if earlier is not None and not self.RESUMABLE:
            raise ProtocolError(
                f"session id {req.session_id!r} was already used; {self.table.role} sessions "
                "cannot be resumed (their keys live only in the session)")
        if earlier is not None and (earlier.auth_id, earlier.reserved) != (
                auth.authorization_id, req.element_count):
            # Only the same authorization and element count resume a session id; anything
            # else is the caller's mistake, refused here rather than by the ledger's check.
            raise ProtocolError(
                f"session id {req.session_id!r} is in use by another authorization or "
                "reservation; resume it with the same authorization and element count, or "
                "open a new session id")
        self._prepare(req, signed)  # data problems surface before any budget is spent
        # Only a verified authorization is registered (an unverified one could squat its id).
        ledger.ensure_authorization(
            auth.authorization_id, max_queries=auth.max_queries,
            max_disclosures=auth.max_disclosures, not_after=auth.not_after,
        )
        # Reserve before any work; idempotent per session id, never refunded.
        reservation = ledger.reserve(auth.authorization_id, req.session_id, req.element_count)
        ledger.open_session(auth.authorization_id, req.session_id,
                            bounded({"peer": self.peer_id, **self._session_meta(req)}))
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
        check_evaluation(self.authorization, reserved=self.element_limit,
                         evaluated=self.evaluated, units=units).raise_if_refused()
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
