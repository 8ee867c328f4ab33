"""Requester and Custodian session state machines (docs/architecture.md, Identity tier), sans-I/O.

Rules of this module, in the spirit of h11's ``_state.py``:

1. Everything that changes a session's state lives here, and the allowed
   transitions of each role are one table (``CUSTODIAN_TRANSITIONS``,
   ``REQUESTER_TRANSITIONS``) that a reader can check at a glance.
2. Sessions take message objects (``protocol.domain.messages``) and return message
   objects.  They never touch a socket; the gRPC services and the in-process
   driver (``run_in_process``) only move messages between them.
3. Nothing here depends on which match engine runs: the engine (looked up by name in
   ``protocol.engines.registry``) declares its messages, their budget cost and its
   exchanges, and the sessions drive it through ``protocol.engines.base`` alone.
4. A message in the wrong state raises ``ProtocolError`` naming the state and
   the message; policy refusals raise ``PolicyRefusal`` with machine-readable
   reasons from ``protocol.policy.decide``; budget and cap violations raise
   ``BudgetExhausted`` / ``DisclosureCapReached``.

Identity tier, one session:

    Requester                                   Custodian
    open_request()         --OpenRequest-->     handle(): decide, reserve budget
                           <--OpenResponse--
    the engine's exchanges (protocol.engines; e.g. for the OPRF engine):
                           <--TagChunk*----     tag_chunks(): sorted tags of its records
    requests(exchange)     --EvaluateChunk*->   handle(): validate, count, evaluate
    handle(EvaluatedChunk) <-EvaluatedChunk*-
    match()  (local; the custodian learns nothing)
    disclosure_requests()  --DisclosureRequest->handle(): verify O_x, account, release
    handle(DiscResponse)   <-DisclosureResponse-
    close_request()        --CloseRequest-->    handle(): sign receipt
    handle(Receipt)        <--Receipt-------
    -> countersigned Receipt                    countersign()
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.accounting.port import LedgerPort
from protocol.accounting.receipts import countersign, issue_receipt, store_countersignature
from protocol.domain.engine import Engine
from protocol.domain.messages import (
    DEFAULT_CHUNK,
    MAX_CHUNK_ELEMENTS,
    MAX_DISCLOSURE_BATCH,
    CloseRequest,
    Disclosure,
    DisclosureRequest,
    DisclosureResponse,
    OpenRequest,
    OpenResponse,
    Receipt,
    Transcript,
    transition,
)
from protocol.domain.records import PersonRecord, QueryRecord
from protocol.domain.recordstore import (
    CompactRecords,
    bulk_match_keys,
    bulk_match_keys_digested,
    persons_of,
)
from protocol.engines import registry
from protocol.engines.base import INDEX_SLICE as INDEX_SLICE
from protocol.engines.base import (
    REQUEST_STREAM,
    CustodianData,
    CustodianEngine,
    Exchange,
    Flow,
    GroupOps,
    LockFactory,
    RequesterInputs,
    SessionGrant,
    authorization_key,
    reply_streams,
    request_types,
    utc_date,
)
from protocol.engines.base import CustodianEngineSession as EngineSession
from protocol.engines.named import Certification
from protocol.engines.oprf import TAG_SIZE, SerialOps
from protocol.errors import (
    DisclosureCapReached,
    InvalidElementError,
    LedgerError,
    PolicyRefusal,
    ProtocolError,
)
from protocol.policy.decide import (
    Authorization,
    CustodianPolicy,
    Mode,
    SessionRequest,
    SignedAuthorization,
    Tier,
    check_disclosure,
    decide,
    permitted_fields,
)

PSEUDONYM_DOMAIN = b"gated-psi/disclosure-pseudonym/v1"

__all__ = [
    "CUSTODIAN_TRANSITIONS",
    "INDEX_SLICE",
    "REQUESTER_TRANSITIONS",
    "Custodian",
    "CustodianConfig",
    "CustodianSession",
    "CustodianState",
    "GroupOps",
    "Match",
    "MatchResult",
    "Receipt",
    "RequesterSession",
    "RequesterState",
    "SessionOutcome",
    "run_exchanges",
    "run_in_process",
]


# --------------------------------------------------------------------------- custodian


class CustodianState(StrEnum):
    AWAIT_OPEN = "await_open"
    SERVING = "serving"
    CLOSED = "closed"
    FAILED = "failed"


#: (state, message type) -> next state, for every engine.  Anything else is a
#: ProtocolError.  An open session adds (SERVING, t) -> SERVING for each message type
#: ``t`` its engine's exchanges send (``engine_transitions``).
CUSTODIAN_TRANSITIONS: dict[tuple[CustodianState, type], CustodianState] = {
    (CustodianState.AWAIT_OPEN, OpenRequest): CustodianState.SERVING,
    (CustodianState.SERVING, DisclosureRequest): CustodianState.SERVING,
    (CustodianState.SERVING, CloseRequest): CustodianState.CLOSED,
}


@dataclass
class CustodianConfig:
    """Everything a custodian needs: its data, policy, ledger and secrets."""

    policy: CustodianPolicy
    records: Sequence[PersonRecord]
    ledger: LedgerPort  # e.g. protocol.adapters.sqlite_ledger.Ledger
    master_secret: bytes
    signing_key: Ed25519PrivateKey
    requester_keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    ops: GroupOps | None = None
    tag_size: int = TAG_SIZE
    clock: Callable[[], float] = time.time
    #: Locks for the caches its sessions share: ``threading.Lock`` when a service serves
    #: sessions from several threads (see ``protocol.engines.base.LockFactory``).
    new_lock: LockFactory = nullcontext
    #: Named-subject certifications of these records, by authority key id (protocol.engines.named).
    certifications: Mapping[str, Certification] = field(default_factory=dict)


class Custodian:
    """Long-lived custodian state shared by its sessions: records in scope and engines.

    Each engine's custodian side (its indexes and caches) is created once, on first use,
    from the registry (``engine``), and serves every session that runs that engine.
    """

    def __init__(self, config: CustodianConfig) -> None:
        self.config = config
        self.ops: GroupOps = config.ops or SerialOps()
        excluded = config.policy.excluded_record_classes
        classes = (config.records.record_classes()
                   if isinstance(config.records, CompactRecords)
                   else [r.record_class for r in config.records])
        self.in_scope = np.asarray(
            [i for i, c in enumerate(classes) if c not in excluded], dtype=np.int64)
        self.excluded_count = len(config.records) - len(self.in_scope)
        self.data = CustodianData(records=config.records, in_scope=self.in_scope, ops=self.ops,
                                  tag_size=config.tag_size, clock=config.clock,
                                  certifications=config.certifications,
                                  new_lock=config.new_lock)
        self._engines: dict[str, CustodianEngine] = {}
        self._lock = config.new_lock()

    @property
    def custodian_id(self) -> str:
        return self.config.policy.custodian_id

    def public_key(self) -> Ed25519PublicKey:
        return self.config.signing_key.public_key()

    def engine(self, name: str) -> CustodianEngine:
        """The custodian side of engine ``name`` (``registry.UnknownEngine`` if none)."""
        with self._lock:
            engine = self._engines.get(name)
            if engine is None:
                engine = self._engines[name] = registry.get(name).custodian(self.data)
        return engine

    def prepare(self, engine: str, rules: Sequence[str]) -> None:
        """Authorization-independent preparation of ``engine`` for ``rules`` (service start)."""
        self.engine(engine).prepare(rules)

    def session(self) -> CustodianSession:
        return CustodianSession(self)


def engine_transitions(state: StrEnum, types: Sequence[type]) -> dict[tuple[Any, type], Any]:
    """(state, t) -> state for each engine message type ``t``: engine steps keep the state."""
    return {(state, t): state for t in types}


class CustodianSession:
    """One requester session on the custodian side.  Drive it with ``handle(message)``."""

    def __init__(self, custodian: Custodian) -> None:
        self.custodian = custodian
        self.state = CustodianState.AWAIT_OPEN
        self.transcript = Transcript()
        self.signed: SignedAuthorization | None = None
        self.session_id = ""
        self.peer_id = ""
        self.rules: tuple[str, ...] = ()
        self.fields: tuple[str, ...] = ()
        self.evaluated = 0
        self.element_limit = 0
        self.disclosed = 0
        self._pseudonym_key = b""
        self.engine = ""
        self._engine: EngineSession | None = None
        self._transitions: Mapping[tuple[CustodianState, type], CustodianState] = (
            CUSTODIAN_TRANSITIONS)
        self._reply_streams: dict[type, str] = {}
        self.receipt: Receipt | None = None

    # -- dispatch --------------------------------------------------------------

    def handle(self, message: object, *, peer_id: str | None = None) -> object:
        """Apply one requester message; return the reply message."""
        next_state = transition(self._transitions, self.state, message, "custodian")
        try:
            if isinstance(message, OpenRequest):
                if peer_id is None:
                    raise ProtocolError("open requires the transport-authenticated peer id")
                reply: object = self._open(message, peer_id)
            elif isinstance(message, DisclosureRequest):
                reply = self._disclose(message)
            elif isinstance(message, CloseRequest):
                reply = self._close(message)
            else:  # one of the engine's messages (the transition table admitted it)
                reply = self._evaluate(message)
        except (PolicyRefusal, InvalidElementError, ProtocolError):
            if isinstance(message, OpenRequest):
                self.state = CustodianState.FAILED
            raise
        self.state = next_state
        return reply

    @property
    def authorization(self) -> Authorization:
        if self.signed is None:
            raise ProtocolError("session is not open")
        return self.signed.authorization

    # -- steps -----------------------------------------------------------------

    def _open(self, req: OpenRequest, peer_id: str) -> OpenResponse:
        """Decide, audit, reserve the budget, then start the engine run."""
        cfg = self.custodian.config
        ledger = cfg.ledger
        now = cfg.clock()
        try:
            signed = SignedAuthorization.from_bytes(req.signed_authorization)
        except ValueError as exc:
            ledger.audit("refusal", {"stage": "open", "reasons": ["malformed"],
                                     "peer": peer_id, "message": str(exc)})
            raise PolicyRefusal(f"malformed authorization: {exc}", reasons=("malformed",)) from exc
        auth = signed.authorization
        try:
            remaining = ledger.budget(auth.authorization_id).remaining
        except LedgerError:  # first use of this authorization
            remaining = auth.max_queries
        resumed = ledger.reservation(req.session_id)
        if (resumed is not None and resumed.auth_id == auth.authorization_id
                and resumed.reserved == req.element_count):
            # Resuming a session: its reservation is already charged; it is not charged again.
            remaining += resumed.reserved
        try:
            tier = Tier(req.tier)
        except ValueError:
            raise PolicyRefusal(f"unknown tier {req.tier!r}", reasons=("malformed",)) from None
        request = SessionRequest(
            peer_id=peer_id, tier=tier, match_rules=tuple(req.match_rules),
            disclosure_fields=tuple(req.disclosure_fields), query_count=req.element_count,
            engine=req.engine,
        )
        certification = cfg.certifications.get(auth.authority_key_id)
        decision = decide(signed, request, cfg.policy, now=now, budget_remaining=remaining,
                          named_subjects_ready=certification is not None,
                          engine_traits=registry.traits())
        ledger.audit("decision", {
            "stage": "open", "authorization_id": auth.authorization_id,
            "session_id": req.session_id, "peer": peer_id, "allowed": decision.allowed,
            "reasons": [str(r) for r in decision.reasons], "elements": req.element_count,
            "rules": list(req.match_rules), "fields": list(req.disclosure_fields),
        })
        decision.raise_if_refused()
        if tier is not Tier.IDENTITY:
            raise PolicyRefusal(
                f"tier {tier.value!r} is not served by the identity-tier session",
                reasons=("tier_not_permitted",),
            )
        if not req.session_id or len(req.session_id) > 128:
            raise ProtocolError("session id must be 1..128 characters")
        # Only a verified authorization is registered (an unverified one could squat its id).
        ledger.ensure_authorization(
            auth.authorization_id, max_queries=auth.max_queries,
            max_disclosures=auth.max_disclosures, not_after=auth.not_after,
        )
        # Reserve before any work; idempotent per session id, never refunded.
        reservation = ledger.reserve(auth.authorization_id, req.session_id, req.element_count)
        ledger.open_session(auth.authorization_id, req.session_id, {
            "peer": peer_id, "rules": list(req.match_rules), "elements": req.element_count,
        })
        self.signed = signed
        self.session_id = req.session_id
        self.peer_id = peer_id
        self.rules = tuple(req.match_rules)
        allowed = set(permitted_fields(auth, cfg.policy))
        self.fields = tuple(f for f in req.disclosure_fields if f in allowed)
        self.element_limit = reservation.reserved
        self.evaluated = reservation.evaluated
        # A resumed session continues its account: disclosures made before a reconnect count.
        self.disclosed = sum(1 for row in ledger.disclosures(auth.authorization_id)
                             if row.session_id == req.session_id and not row.repeat)
        key = authorization_key(cfg.master_secret, auth.authorization_id)
        self._pseudonym_key = key
        self._start_engine(req.engine, SessionGrant(
            authorization_id=auth.authorization_id, session_id=req.session_id,
            rules=self.rules, key=key, max_units=reservation.reserved, mode=auth.mode,
            certification=certification if auth.mode is Mode.NAMED_SUBJECTS else None))
        assert self._engine is not None
        resp = OpenResponse(
            session_id=req.session_id, authorization_id=auth.authorization_id,
            custodian_id=cfg.policy.custodian_id, match_rules=self.rules,
            disclosure_fields=self.fields, element_count=reservation.reserved,
            tag_count=self._engine.tag_count, tag_size=self._engine.tag_size,
            budget_remaining=ledger.budget(auth.authorization_id).remaining,
        )
        self.transcript.add("open", req)
        self.transcript.add("open", resp)
        return resp

    def _start_engine(self, name: str, grant: SessionGrant) -> None:
        """Open the engine run and admit its messages in SERVING."""
        exchanges = registry.get(name).exchanges
        self._engine = self.custodian.engine(name).open(grant)
        self.engine = name
        self._reply_streams = reply_streams(exchanges)
        self._transitions = {**CUSTODIAN_TRANSITIONS, **engine_transitions(
            CustodianState.SERVING, request_types(exchanges))}

    def tag_chunks(self, chunk_tags: int = 65_536, kind: type | None = None
                   ) -> Iterator[object]:
        """The engine's tags in bounded chunks; ``kind`` is the message type the caller's
        transport carries (a session of another engine refuses it)."""
        if self.state is not CustodianState.SERVING or self._engine is None:
            raise ProtocolError(f"no tags in state {self.state.value!r}")
        if kind is not None and kind not in self._reply_streams:
            raise ProtocolError(f"a {self.engine} session streams no {kind.__name__}")
        for chunk in self._engine.tag_chunks(chunk_tags):
            self.transcript.add(self._reply_streams[type(chunk)], chunk)
            yield chunk

    def _count(self, units: int) -> None:
        """Record ``units`` of evaluation in the ledger: before the evaluation, never after."""
        if units:
            self.evaluated = self.custodian.config.ledger.record_evaluation(
                self.authorization.authorization_id, self.session_id, units)

    def _evaluate(self, message: object) -> object | None:
        """One engine message: validate and cost it, count, then let the engine evaluate."""
        assert self._engine is not None  # the transition table admits engine messages only
        self._count(self._engine.cost(message))
        reply = self._engine.evaluate(message)
        self.transcript.add(REQUEST_STREAM, message)
        if reply is not None:
            self.transcript.add(self._reply_streams[type(reply)], reply)
        return reply

    def _record_fields(self, record: PersonRecord) -> tuple[tuple[str, str], ...]:
        return tuple((f, record.get(f)) for f in self.fields)

    def pseudonym(self, record: PersonRecord) -> str:
        """Per-authorization pseudonym of a custodian record: stable within, unlinkable across."""
        mac = hmac.new(self._pseudonym_key, PSEUDONYM_DOMAIN + record.record_id.encode(),
                       hashlib.sha256)
        return mac.hexdigest()[:32]

    def _disclose(self, req: DisclosureRequest) -> DisclosureResponse:
        if len(req.outputs) > MAX_DISCLOSURE_BATCH:
            raise ProtocolError(
                f"disclosure request has {len(req.outputs)} outputs; "
                f"the limit is {MAX_DISCLOSURE_BATCH}"
            )
        cfg = self.custodian.config
        auth = self.authorization
        disclosures: list[Disclosure] = []
        rejected: list[int] = []
        # Expiry and an already-reached cap refuse the whole request (RESOURCE_EXHAUSTED /
        # FAILED_PRECONDITION); a cap reached inside this batch withholds the rest.
        budget = cfg.ledger.budget(auth.authorization_id)
        assert self.signed is not None  # self.authorization would have raised
        check_disclosure(self.signed, budget.disclosed, now=cfg.clock()).raise_if_refused()
        assert self._engine is not None  # a served session has its engine
        # The engine checks each proof against the record it claims (position -> record
        # index); a proof of the wrong length or for an unopened rule is never looked at.
        proof_size = self._engine.proof_size
        found = self._engine.verify([
            (i, rule_id, output) for i, (rule_id, output) in enumerate(req.outputs)
            if rule_id in self.rules and len(output) == proof_size
        ])
        records = cfg.records
        verified: list[tuple[int, str, PersonRecord]] = []
        for i, (rule_id, _) in enumerate(req.outputs):
            position = found.get(i)
            if position is None:
                rejected.append(i)
            else:
                verified.append((i, rule_id, records[position]))
        # The ledger checks the cap atomically and is the authority on it; the rows are
        # durable (one transaction per batch) before any field leaves this function.
        rows = self._account(auth.authorization_id, verified)
        withheld = [i for (i, _, _), row in zip(verified, rows, strict=True) if row is None]
        for (i, rule_id, record), row in zip(verified, rows, strict=True):
            if row is None:
                continue
            if not row.repeat:
                self.disclosed += 1
            disclosures.append(Disclosure(
                index=i, rule_id=rule_id, pseudonym=self.pseudonym(record),
                fields=self._record_fields(record),
            ))
        if withheld:
            cfg.ledger.audit("refusal", {
                "stage": "disclosure", "authorization_id": auth.authorization_id,
                "session_id": self.session_id, "reasons": ["disclosure_cap_reached"],
                "withheld": len(withheld),
            })
            rejected = sorted(rejected + withheld)
        if rejected:
            cfg.ledger.audit("disclosure_rejected", {
                "authorization_id": auth.authorization_id, "session_id": self.session_id,
                "count": len(rejected),
            })
        reply = DisclosureResponse(seq=req.seq, disclosures=tuple(disclosures),
                                   rejected=tuple(rejected))
        self.transcript.add("disclosure-request", req)
        self.transcript.add("disclosure-response", reply)
        return reply

    def _account(self, auth_id: str, verified: list[tuple[int, str, PersonRecord]]
                 ) -> list[Any]:
        """Ledger rows for the verified disclosures, in order; ``None`` where the cap withholds.

        The batch commits in one transaction; only a batch that crosses the cap falls back
        to one row at a time, so exactly the records under the cap are released.
        """
        ledger = self.custodian.config.ledger
        items = [(record.record_id, rule_id) for _, rule_id, record in verified]
        if not items:
            return []
        try:
            return list(ledger.record_disclosures(auth_id, self.session_id, items))
        except DisclosureCapReached:
            rows: list[Any] = []
            for record_id, rule_id in items:
                try:
                    rows.append(ledger.record_disclosure(auth_id, self.session_id, record_id,
                                                         rule_id))
                except DisclosureCapReached:
                    rows.append(None)
            return rows

    def _close(self, req: CloseRequest) -> Receipt:
        cfg = self.custodian.config
        self.receipt = issue_receipt(
            ledger=cfg.ledger, signing_key=cfg.signing_key,
            custodian_id=cfg.policy.custodian_id, requester_id=self.peer_id,
            authorization_id=self.authorization.authorization_id, session_id=self.session_id,
            evaluated=self.evaluated, disclosed=self.disclosed,
            own_transcript=self.transcript.digest(), presented_transcript=req.transcript_hash,
        )
        return self.receipt

    def countersign(self, receipt: Receipt) -> None:
        """Store the requester's countersignature after checking it against its known key."""
        if self.state is not CustodianState.CLOSED:
            raise ProtocolError("countersignature before the receipt was issued")
        cfg = self.custodian.config
        self.receipt = store_countersignature(
            ledger=cfg.ledger, requester_keys=cfg.requester_keys, peer_id=self.peer_id,
            issued=self.receipt, presented=receipt)


# --------------------------------------------------------------------------- requester


class RequesterState(StrEnum):
    START = "start"
    AWAIT_OPEN = "await_open"
    EVALUATING = "evaluating"
    MATCHED = "matched"
    DISCLOSING = "disclosing"
    AWAIT_RECEIPT = "await_receipt"
    CLOSED = "closed"


#: (state, message type received) -> next state, for every engine.  A session adds
#: (EVALUATING, t) -> EVALUATING for each message type ``t`` its engine's custodian sends.
REQUESTER_TRANSITIONS: dict[tuple[RequesterState, type], RequesterState] = {
    (RequesterState.AWAIT_OPEN, OpenResponse): RequesterState.EVALUATING,
    (RequesterState.DISCLOSING, DisclosureResponse): RequesterState.DISCLOSING,
    (RequesterState.AWAIT_RECEIPT, Receipt): RequesterState.CLOSED,
}


@dataclass(frozen=True)
class Match:
    """A query whose tag is in the custodian's set under ``rule_id`` (local, step 4).

    ``output`` is the engine's disclosure proof for it (e.g. the OPRF output).
    """

    query_index: int
    query_record_id: str
    rule_id: str
    output: bytes


@dataclass(frozen=True)
class MatchResult:
    """A verified disclosure joined back to the requester's own query."""

    query_record_id: str
    rule_id: str
    pseudonym: str
    fields: Mapping[str, str]


class RequesterSession:
    """The requester's side of one identity-tier session.

    ``queries`` (query records, or just their persons, e.g. ``CompactRecords``)
    must already be validated (``records.validate_queries`` or
    ``recordstore.load_query_csv``); refused records never enter the protocol.
    """

    _HANDLERS: ClassVar[dict[type, str]] = {
        OpenResponse: "_on_open", DisclosureResponse: "_on_disclosures", Receipt: "_on_receipt",
    }

    def __init__(
        self,
        signed_authorization: SignedAuthorization,
        queries: Sequence[QueryRecord] | Sequence[PersonRecord],
        *,
        match_rules: Sequence[str] | None = None,
        disclosure_fields: Sequence[str] | None = None,
        ops: GroupOps | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        session_id: str | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        custodian_key: Ed25519PublicKey | None = None,
        tokens: Mapping[tuple[str, str], bytes] | None = None,
        engine: str = Engine.OPRF,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``tokens`` ((record id, rule) -> token) are required for a named-subject
        authorization: only subjects the authority reviewed are sent at all.
        ``engine`` names a registered match engine (``protocol.engines.registry``).
        ``clock`` dates the match keys (a birth date after today has none)."""
        auth = signed_authorization.authorization
        self.signed = signed_authorization
        self.rules = tuple(match_rules if match_rules is not None else auth.match_rules)
        self.fields = tuple(
            disclosure_fields if disclosure_fields is not None else auth.disclosure_fields
        )
        if not 0 < chunk_size <= MAX_CHUNK_ELEMENTS:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_ELEMENTS}")
        self.ops: GroupOps = ops or SerialOps()
        self.chunk_size = chunk_size
        self.session_id = session_id or f"sess-{uuid.uuid4().hex}"
        self.signing_key = signing_key
        self.custodian_key = custodian_key
        self.state = RequesterState.START
        self.transcript = Transcript()
        # Elements: one per (query, rule) with a usable match key, in a fixed order.
        # Only ids and keys are kept (packed queries are never unpacked into records).
        self.named = auth.mode is Mode.NAMED_SUBJECTS
        if self.named and tokens is None:
            raise ProtocolError("a named-subject authorization needs the authority's tokens")
        spec = registry.get(engine)  # UnknownEngine (a ValueError) if not registered
        if self.named and not spec.traits.group_element_inputs:
            raise ProtocolError("named-subject authorizations run only on an engine whose "
                                f"inputs are group elements, not {engine!r}")
        self.engine = str(engine)
        self.exchanges: tuple[Exchange, ...] = spec.exchanges
        executor = getattr(self.ops, "executor", None)
        today = utc_date(clock())
        people = persons_of(queries)
        self.query_ids: list[str] = (people.record_ids() if isinstance(people, CompactRecords)
                                     else [p.record_id for p in people])
        self.element_query: list[int] = []
        self.element_rule: list[int] = []
        self.element_input: list[bytes] = []
        token_parts: list[bytes] = []
        digests: dict[str, bytes] = {}
        key_digest = spec.key_digest
        if key_digest is not None and self.named:  # tokens replace keys: nothing to digest
            raise ProtocolError(f"the {engine} engine digests match keys; named-subject "
                                "sessions send tokens instead")
        if key_digest is not None:  # the workers digest the keys they just derived
            keys, digests = bulk_match_keys_digested(people, self.rules, key_digest,
                                                     executor=executor, today=today)
        else:
            keys = bulk_match_keys(people, self.rules, executor=executor, today=today)
        del people
        for r_i, rule_id in enumerate(self.rules):
            column = keys.pop(rule_id)
            if self.named:  # only subjects the authority reviewed are sent at all
                assert tokens is not None
                ids = self.query_ids
                positions = [i for i, k in enumerate(column)
                             if k is not None and (ids[i], rule_id) in tokens]
                token_parts.extend(tokens[(ids[i], rule_id)] for i in positions)
            else:
                positions = [i for i, k in enumerate(column) if k is not None]
            self.element_query.extend(positions)
            self.element_rule.extend([r_i] * len(positions))
            known = cast(list[bytes], column)  # None only where positions skip
            self.element_input.extend([known[i] for i in positions])
        self._engine = spec.requester(RequesterInputs(
            authorization_id=auth.authorization_id, session_id=self.session_id,
            inputs=self.element_input, chunk_size=chunk_size, ops=self.ops,
            digests=b"".join(digests[r] for r in self.rules) if key_digest else None,
            tokens=b"".join(token_parts) if self.named else None))
        self._reply_streams = reply_streams(self.exchanges)
        self._transitions = {**REQUESTER_TRANSITIONS, **engine_transitions(
            RequesterState.EVALUATING, tuple(self._reply_streams))}
        self.queries_without_key = len(self.query_ids) - len(set(self.element_query))
        self.open_response: OpenResponse | None = None
        self.matches: list[Match] = []
        self.results: list[MatchResult] = []
        self.rejected = 0
        self.receipt: Receipt | None = None
        self._pending: dict[int, list[Match]] = {}

    @property
    def element_count(self) -> int:
        """Budget units this session asks for (the engine's: elements, bins, ...)."""
        return self._engine.units

    @property
    def custodian_entries(self) -> int:
        """Custodian (record, rule) entries behind the granted tags (0 before open)."""
        if self.open_response is None:
            return 0
        return self._engine.custodian_entries(self.open_response.tag_count)

    # -- dispatch --------------------------------------------------------------

    def handle(self, message: object) -> object | None:
        """Apply one custodian message; returns the countersigned Receipt for a Receipt."""
        next_state = transition(self._transitions, self.state, message, "requester")
        handler = self._HANDLERS.get(type(message))
        reply: object | None = None
        if handler is None:  # one of the engine's messages (the transition table admitted it)
            self._on_engine(message)
        else:
            reply = getattr(self, handler)(message)
        self.state = next_state
        return reply

    # -- steps -----------------------------------------------------------------

    def open_request(self) -> OpenRequest:
        if self.state is not RequesterState.START:
            raise ProtocolError(f"open_request in state {self.state.value!r}")
        req = OpenRequest(
            session_id=self.session_id, signed_authorization=self.signed.to_bytes(),
            tier=Tier.IDENTITY.value, match_rules=self.rules,
            disclosure_fields=self.fields, element_count=self.element_count,
            engine=self.engine,
        )
        self.transcript.add("open", req)
        self.state = RequesterState.AWAIT_OPEN
        return req

    def _on_open(self, resp: OpenResponse) -> None:
        if resp.session_id != self.session_id:
            raise ProtocolError("open response for another session")
        if resp.element_count != self.element_count:
            raise ProtocolError("custodian granted a different element count")
        if not set(resp.match_rules) <= set(self.rules):
            raise ProtocolError("custodian granted rules that were not requested")
        self._engine.on_open(resp)
        self.open_response = resp
        self.transcript.add("open", resp)

    def requests(self, exchange: Exchange) -> Iterator[object]:
        """The engine's messages for ``exchange``, produced lazily (callers may pull them
        one at a time, e.g. on a transport thread, to overlap with the replies)."""
        if self.state is not RequesterState.EVALUATING:
            raise ProtocolError(f"requests in state {self.state.value!r}")
        for message in self._engine.requests(exchange):
            self.transcript.add(REQUEST_STREAM, message)
            yield message

    def _on_engine(self, message: object) -> None:
        self._engine.handle(message)
        self.transcript.add(self._reply_streams[type(message)], message)

    def match(self) -> list[Match]:
        """Local match (step 4): queries whose tag is in the custodian's set."""
        if self.state is not RequesterState.EVALUATING or self.open_response is None:
            raise ProtocolError(f"match in state {self.state.value!r}")
        hits = self._engine.match()
        self.matches = [
            Match(query_index=self.element_query[e],
                  query_record_id=self.query_ids[self.element_query[e]],
                  rule_id=self.rules[self.element_rule[e]],
                  output=proof)
            for e, proof in zip(hits, self._engine.proofs(hits), strict=True)
        ]
        self.state = RequesterState.MATCHED
        return self.matches

    def disclosure_requests(self, batch: int = MAX_DISCLOSURE_BATCH
                            ) -> Iterator[DisclosureRequest]:
        """Present the OPRF output of each match (step 5), in bounded batches.

        Batches default to the largest allowed: each one costs the custodian a durable
        (fsynced) ledger commit, which dominates small batches."""
        if self.state is not RequesterState.MATCHED:
            raise ProtocolError(f"disclosure_requests in state {self.state.value!r}")
        batch = min(batch, MAX_DISCLOSURE_BATCH)
        self.state = RequesterState.DISCLOSING
        for seq, start in enumerate(range(0, len(self.matches), batch)):
            part = self.matches[start:start + batch]
            self._pending[seq] = part
            req = DisclosureRequest(seq=seq, outputs=tuple((m.rule_id, m.output) for m in part))
            self.transcript.add("disclosure-request", req)
            yield req

    def _on_disclosures(self, resp: DisclosureResponse) -> None:
        part = self._pending.pop(resp.seq, None)
        if part is None:
            raise ProtocolError(f"disclosure response {resp.seq} was not requested")
        allowed = set(self.open_response.disclosure_fields if self.open_response else ())
        for d in resp.disclosures:
            if not 0 <= d.index < len(part):
                raise ProtocolError("disclosure index out of range")
            extra = {name for name, _ in d.fields} - allowed
            if extra:
                raise ProtocolError(f"custodian sent fields that were not granted: {extra}")
            m = part[d.index]
            self.results.append(MatchResult(
                query_record_id=m.query_record_id, rule_id=d.rule_id,
                pseudonym=d.pseudonym, fields=d.as_dict(),
            ))
        self.rejected += len(resp.rejected)
        self.transcript.add("disclosure-response", resp)

    def close_request(self) -> CloseRequest:
        if self.state is RequesterState.MATCHED:
            self.state = RequesterState.DISCLOSING
        if self.state is not RequesterState.DISCLOSING or self._pending:
            raise ProtocolError(f"close_request in state {self.state.value!r} "
                                f"with {len(self._pending)} disclosure batches pending")
        self.state = RequesterState.AWAIT_RECEIPT
        return CloseRequest(transcript_hash=self.transcript.digest())

    def _on_receipt(self, receipt: Receipt) -> Receipt:
        self.receipt = countersign(
            receipt, session_id=self.session_id, own_transcript=self.transcript.digest(),
            custodian_key=self.custodian_key, signing_key=self.signing_key)
        return self.receipt

# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class SessionOutcome:
    """What an in-process run produced, for library users and tests."""

    matches: list[Match]
    results: list[MatchResult]
    receipt: Receipt
    rejected: int


def run_exchanges(requester: RequesterSession, custodian: CustodianSession) -> None:
    """Move the engine's exchange messages between two open sessions, in the declared order.

    Every flow reduces to the same two moves in one process: the custodian's server
    stream is read to the end, and every requester message is handled by the custodian,
    whose reply (if the flow has one) goes straight back.
    """
    for exchange in requester.exchanges:
        if exchange.flow is Flow.SERVER_STREAM:
            for message in custodian.tag_chunks(kind=exchange.replies):
                requester.handle(message)
            continue
        for message in requester.requests(exchange):
            reply = custodian.handle(message)
            if reply is not None:
                requester.handle(reply)


def run_in_process(
    requester: RequesterSession, custodian: CustodianSession, *, requester_id: str,
) -> SessionOutcome:
    """Run both sides of one session in this process, no network.

    ``requester_id`` stands in for the identity the transport would authenticate.
    """
    opened = custodian.handle(requester.open_request(), peer_id=requester_id)
    requester.handle(opened)
    run_exchanges(requester, custodian)
    requester.match()
    for req in requester.disclosure_requests():
        requester.handle(custodian.handle(req))
    receipt = custodian.handle(requester.close_request())
    countersigned = requester.handle(receipt)
    assert isinstance(countersigned, Receipt)
    if countersigned.requester_signature:
        custodian.countersign(countersigned)
    return SessionOutcome(
        matches=requester.matches, results=requester.results,
        receipt=countersigned, rejected=requester.rejected,
    )
