"""The identity tier: labeled PSI with verified disclosure (docs/architecture.md, Identity tier).

A thin tier over the session core (``protocol.sessions.core``; docs/architecture.md,
Sessions): the core opens (parse, ``decide``, audit, reserve), gates every message, counts
before evaluating, closes and countersigns.  This module holds what is the identity tier's
own: its transition tables, the engine-neutral drive of the match engine, disclosure
(proof verification, batched accounting with the cap fallback, pseudonyms), the requester's
elements and local match, and the in-process driver.

Nothing here depends on which match engine runs: the engine (looked up by name in
``protocol.engines.registry``) declares its exchanges (``protocol.engines.base``), and each
session's table is the role's common rows plus rows derived from those exchanges
(:func:`custodian_table`, :func:`requester_table`): the requester sends each exchange's
``sends`` (``Send``) and accepts its ``replies``; the custodian accepts each ``sends``
(costed and admitted, evaluated, then counted) and streams its server-stream ``replies`` (``Send``).
The custodian learns its engine at open, so it runs on the common rows until then.

Identity tier, one session (the OPRF engine's exchanges shown):

    Requester                                   Custodian
    open_request()         --OpenRequest-->     handle(): decide, reserve budget
                           <--OpenResponse--
                           <--TagChunk*----     tag_chunks(): sorted tags of its records
    requests(exchange)     --EvaluateChunk*->   handle(): cost, admit, evaluate, count
    handle(EvaluatedChunk) <-EvaluatedChunk*-
    match()  (local; the custodian learns nothing)
    disclosure_requests()  --DisclosureRequest->handle(): verify proofs, account, release
    handle(DiscResponse)   <-DisclosureResponse-
    close_request()        --CloseRequest-->    handle(): sign receipt
    handle(Receipt)        <--Receipt-------
    -> countersigned Receipt                    countersign()
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.accounting.port import DisclosureRow, LedgerPort, Reservation
from protocol.accounting.refusals import RefusalLimiter
from protocol.crypto import tagset
from protocol.domain.engine import Engine, IndexMode
from protocol.domain.messages import (
    DEFAULT_CHUNK,
    MAX_CHUNK_ELEMENTS,
    MAX_DISCLOSURE_BATCH,
    MAX_HOLDERS_PER_KEY,
    CloseRequest,
    Disclosure,
    DisclosureRequest,
    DisclosureResponse,
    OpenRequest,
    OpenResponse,
    Receipt,
    Transcript,
)
from protocol.domain.records import (
    MATCH_RULES,
    PersonRecord,
    QueryRecord,
    ValidatedQueries,
    corroborating_group,
    query_match_keys_bulk,
)
from protocol.domain.recordstore import (
    CompactRecords,
    bulk_keyed_records,
    ids_and_fields,
    persons_of,
)
from protocol.engines import registry
from protocol.engines.base import INDEX_SLICE as INDEX_SLICE
from protocol.engines.base import (
    REQUEST_STREAM,
    CustodianData,
    CustodianEngine,
    EpochTagSet,
    Exchange,
    Flow,
    GroupOps,
    LockFactory,
    RecordsOutOfCore,
    RequesterEngine,
    RequesterInputs,
    SessionGrant,
    authorization_key,
    evaluation_key_pair,
    reply_streams,
    utc_date,
)
from protocol.engines.base import CustodianEngineSession as EngineSession
from protocol.engines.epoch import TagSetChunk, TagSetRequest
from protocol.engines.named import Certification
from protocol.engines.oprf import TAG_SIZE, SerialOps
from protocol.errors import (
    BudgetExhausted,
    DisclosureCapReached,
    LedgerError,
    PolicyRefusal,
    ProtocolError,
)
from protocol.policy.decide import (
    CustodianPolicy,
    DisclosureRejection,
    Mode,
    Reason,
    SessionRequest,
    SignedAuthorization,
    Tier,
    check_disclosure,
    check_disclosure_group,
    check_repeat_disclosure,
    decide,
    permitted_fields,
)
from protocol.sessions.core import (
    MAX_OPEN_NAME,
    MAX_OPEN_NAMES,
    CustodianCore,
    Event,
    RequesterCore,
    Row,
    Send,
    Step,
    TransitionTable,
    bounded,
    common_custodian_rows,
)

PSEUDONYM_DOMAIN = b"gated-psi/disclosure-pseudonym/v1"
#: Tags per chunk of the custodian's tag stream unless the transport asks for another size.
DEFAULT_TAG_CHUNK = 65_536

__all__ = [
    "CUSTODIAN_TRANSITIONS",
    "DEFAULT_TAG_CHUNK",
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
    "corroboration_groups",
    "custodian_table",
    "disclosure_plan",
    "requester_table",
    "run_exchanges",
    "run_in_process",
]


# --------------------------------------------------------------------------- tables


class CustodianState(StrEnum):
    AWAIT_OPEN = "await_open"
    SERVING = "serving"
    CLOSED = "closed"
    FAILED = "failed"


class RequesterState(StrEnum):
    START = "start"
    AWAIT_OPEN = "await_open"
    EVALUATING = "evaluating"  # the engine's exchanges, in any interleaving
    MATCHED = "matched"
    DISCLOSING = "disclosing"
    AWAIT_RECEIPT = "await_receipt"
    CLOSED = "closed"
    FAILED = "failed"


_C = CustodianState
_R = RequesterState

#: The custodian's rows of every engine: open, disclosure, close, countersign.  A session
#: runs on these until open names its engine, then on ``custodian_table(engine)``.
CUSTODIAN_TRANSITIONS = TransitionTable(
    "identity custodian",
    {
        **common_custodian_rows(OpenRequest, initial=_C.AWAIT_OPEN, opened=_C.SERVING,
                                closable=(_C.SERVING,), closed=_C.CLOSED),
        (_C.SERVING, DisclosureRequest): Row("_disclose", _C.SERVING),
    },
    initial=_C.AWAIT_OPEN, failed=_C.FAILED, final=(_C.CLOSED,),
    protocol="the identity tier before open names an engine",
)

#: The requester's rows of every engine; a session runs on ``requester_table(engine)``.
REQUESTER_TRANSITIONS = TransitionTable(
    "identity requester",
    {
        (_R.START, Send(OpenRequest)): Row("_open_request", _R.AWAIT_OPEN),
        (_R.AWAIT_OPEN, OpenResponse): Row("_on_open", _R.EVALUATING),
        (_R.EVALUATING, Step("match")): Row("_match", _R.MATCHED),
        (_R.MATCHED, Send(DisclosureRequest)): Row("_disclosure_requests", _R.DISCLOSING,
                                                   stream=True),
        (_R.DISCLOSING, DisclosureResponse): Row("_on_disclosures", _R.DISCLOSING),
        (_R.MATCHED, Send(CloseRequest)): Row("_close_request", _R.AWAIT_RECEIPT),
        (_R.DISCLOSING, Send(CloseRequest)): Row("_close_request", _R.AWAIT_RECEIPT),
        (_R.AWAIT_RECEIPT, Receipt): Row("_on_receipt", _R.CLOSED),
    },
    initial=_R.START, failed=_R.FAILED, final=(_R.CLOSED,),
    protocol="the identity tier without an engine",
)


def _engine_protocol(name: str, exchanges: tuple[Exchange, ...]) -> str:
    """What an engine's table speaks; refuses a declaration the tables cannot express."""
    sends = [ex.sends for ex in exchanges if ex.sends is not None]
    replies = [ex.replies for ex in exchanges if ex.replies is not None]
    streams = [ex for ex in exchanges if ex.flow is Flow.SERVER_STREAM]
    if len(set(sends)) != len(sends) or len(set(replies)) != len(replies) or len(streams) > 1:
        raise ValueError(f"engine {name!r}: each message type belongs to one exchange, and "
                         "an engine has at most one server stream")
    return f"the identity tier with engine {name!r}"


@functools.lru_cache(maxsize=64)
def _custodian_table(name: str, exchanges: tuple[Exchange, ...]) -> TransitionTable:
    rows: dict[tuple[StrEnum, Event], Row] = {}
    for ex in exchanges:
        if ex.sends is not None:  # costed and counted, then evaluated
            rows[(_C.SERVING, ex.sends)] = Row("_engine_message", _C.SERVING)
        if ex.flow is Flow.SERVER_STREAM and ex.replies is not None:
            rows[(_C.SERVING, Send(ex.replies))] = Row("_tag_stream", _C.SERVING, stream=True)
    return CUSTODIAN_TRANSITIONS.derive(rows, protocol=_engine_protocol(name, exchanges))


@functools.lru_cache(maxsize=64)
def _requester_table(name: str, exchanges: tuple[Exchange, ...]) -> TransitionTable:
    rows: dict[tuple[StrEnum, Event], Row] = {}
    for ex in exchanges:
        if ex.sends is not None:
            rows[(_R.EVALUATING, Send(ex.sends))] = Row("_requests", _R.EVALUATING,
                                                        stream=True, takes_type=True)
        if ex.replies is not None:
            rows[(_R.EVALUATING, ex.replies)] = Row("_on_engine", _R.EVALUATING)
    return REQUESTER_TRANSITIONS.derive(rows, protocol=_engine_protocol(name, exchanges))


def custodian_table(engine: str) -> TransitionTable:
    """The custodian's table for a session of ``engine``: the common rows plus its exchanges'.

    Cached per engine declaration (``registry.UnknownEngine`` if none is registered).
    """
    spec = registry.get(engine)
    return _custodian_table(str(spec.name), tuple(spec.exchanges))


def requester_table(engine: str) -> TransitionTable:
    """The requester's table for a session of ``engine``: the common rows plus its exchanges'."""
    spec = registry.get(engine)
    return _requester_table(str(spec.name), tuple(spec.exchanges))


# --------------------------------------------------------------------------- custodian


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
    #: Epoch mode (``policy.index_mode``): the key-epoch index built offline
    #: (``adapters.epoch_index.EpochIndex``; docs/architecture.md, National custodian).
    epoch_index: Any = None
    #: Per-peer budgets of refusals recorded one by one, shared by every session of this
    #: configuration: ``refusals`` for the audit chain, ``refusal_log`` for the service log
    #: (limits from the policy; docs/architecture.md, Accounting).
    refusals: RefusalLimiter = field(init=False, repr=False)
    refusal_log: RefusalLimiter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_custodian_config(self)
        self.refusals = RefusalLimiter.from_policy(self.policy, self.new_lock)
        self.refusal_log = RefusalLimiter.from_policy(self.policy, self.new_lock)


class Custodian:
    """Long-lived custodian state shared by its sessions: records in scope and engines.

    Each engine's custodian side (its indexes and caches) is created once, on first use,
    from the registry (``engine``), and serves every session that runs that engine.
    """

    def __init__(self, config: CustodianConfig) -> None:
        self.config = config
        self.ops: GroupOps = config.ops or SerialOps()
        excluded = config.policy.excluded_record_classes
        if isinstance(config.records, RecordsOutOfCore):
            # Never iterated here: exclusions apply per disclosed record (the epoch engine).
            self.in_scope = np.zeros(0, dtype=np.int64)
            self.excluded_count = 0
        else:
            classes = (config.records.record_classes()
                       if isinstance(config.records, CompactRecords)
                       else [r.record_class for r in config.records])
            self.in_scope = np.asarray(
                [i for i, c in enumerate(classes) if c not in excluded], dtype=np.int64)
            self.excluded_count = len(config.records) - len(self.in_scope)
        self.data = CustodianData(records=config.records, in_scope=self.in_scope, ops=self.ops,
                                  tag_size=config.tag_size, clock=config.clock,
                                  certifications=config.certifications,
                                  new_lock=config.new_lock, epoch_index=config.epoch_index,
                                  epoch_key=_epoch_key(config),
                                  excluded_record_classes=frozenset(excluded))
        self._engines: dict[str, CustodianEngine] = {}
        self._lock = config.new_lock()
        #: The long-term POPRF key pair an authorization may pin (docs/architecture.md,
        #: Verifiable evaluation); its public half is what ``agency-b`` publishes.
        self.evaluation_secret, self.evaluation_key = evaluation_key_pair(config.master_secret)

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

    def fetch_tagset(self, request: TagSetRequest, *, peer_id: str) -> Iterator[TagSetChunk]:
        """The current epoch's tag set, under any valid authorization, accounted before any
        of it leaves (docs/architecture.md, National custodian).

        Checked eagerly (the returned iterator only reads the index): epoch mode, the sizes,
        the authorization (``decide`` as for an ``oprf-epoch`` session of those rules, with
        no evaluations), then the ledger records the fetch (who, epoch, rules, bytes) and
        refuses past the policy's fetches per epoch.  A requester whose cached epoch is
        current gets the headers only, unaccounted (nothing of the tag set is sent).
        """
        cfg = self.config
        index = self.data.epoch_index
        if cfg.policy.index_mode is not IndexMode.EPOCH or index is None:
            raise ProtocolError("this custodian serves no epoch tag set (its policy keeps "
                                "per-authorization indexes; use the engine 'oprf')")
        rules = tuple(request.match_rules)
        digest = hashlib.sha256(repr(request).encode("utf-8", "replace")).hexdigest()

        def refused(reasons: Sequence[str], message: str, auth_id: str = "") -> PolicyRefusal:
            entry: dict[str, Any] = {"stage": "tagset", "peer": peer_id[:64],
                                     "reasons": list(reasons), "request_sha256": digest}
            if auth_id:
                entry["authorization_id"] = auth_id[:MAX_OPEN_NAME]
            cfg.refusals.record(cfg.ledger, peer_id, cfg.clock(), entry)
            return PolicyRefusal(message, reasons=tuple(reasons))

        if not 0 < len(rules) <= MAX_OPEN_NAMES or any(len(r) > MAX_OPEN_NAME for r in rules):
            raise refused((Reason.MALFORMED,), f"tag-set request refused: 1 to {MAX_OPEN_NAMES} "
                          "match rules of bounded length are needed")
        try:
            signed = SignedAuthorization.from_bytes(request.signed_authorization)
        except ValueError as exc:
            raise refused((Reason.MALFORMED,), bounded(f"malformed authorization: {exc}")) from exc
        auth = signed.authorization
        try:
            remaining = cfg.ledger.budget(auth.authorization_id).remaining
        except LedgerError:  # first use of this authorization
            remaining = auth.max_evaluations
        decision = decide(
            signed, SessionRequest(peer_id=peer_id, tier=Tier.IDENTITY, match_rules=rules,
                                   disclosure_fields=(), query_count=0,
                                   engine=Engine.OPRF_EPOCH),
            cfg.policy, now=cfg.clock(), budget_remaining=remaining,
            engine_traits=registry.traits())
        if not decision.allowed:
            raise refused(decision.reasons, decision.message, auth.authorization_id)
        missing = [r for r in rules if r not in index.rules]
        if missing:
            raise ProtocolError(f"epoch {index.epoch_id} index has no rule {missing}")
        epoch_id, bits = str(index.epoch_id), int(index.bits)
        if request.known_epoch_id == epoch_id:
            return iter([TagSetChunk(epoch_id, bits, r, int(index.tags(r)), unchanged=True)
                         for r in rules])
        cfg.ledger.ensure_authorization(
            auth.authorization_id, max_evaluations=auth.max_evaluations,
            max_disclosures=auth.max_disclosures, not_after=auth.not_after)
        cfg.ledger.record_tagset_fetch(
            auth.authorization_id, peer_id, epoch_id, rules,
            sum(int(index.tagset_bytes(r)) for r in rules),
            cfg.policy.epoch_max_tagset_fetches)
        return self._tagset_chunks(index, rules)

    @staticmethod
    def _tagset_chunks(index: Any, rules: Sequence[str]) -> Iterator[TagSetChunk]:
        for rule_id in rules:
            tags = int(index.tags(rule_id))
            sent = False
            for chunk in index.tagset_chunks(rule_id):
                sent = True
                yield TagSetChunk(index.epoch_id, int(index.bits), rule_id, tags, chunk)
            if not sent:  # an empty rule still announces itself
                yield TagSetChunk(index.epoch_id, int(index.bits), rule_id, tags)


def _epoch_key(config: CustodianConfig) -> bytes | None:
    """The epoch key in epoch mode, after checking the index fits the policy; else None.

    The index must be of the policy's epoch, and its fingerprints long enough for the
    policy's evaluation cap (false-positive bound 2^-40 per authorization).
    """
    policy, index = config.policy, config.epoch_index
    if policy.index_mode is not IndexMode.EPOCH:
        if isinstance(config.records, RecordsOutOfCore):
            raise ValueError("records out of core are served in epoch mode only (policy "
                             "index_mode 'epoch' with its epoch index): a per-authorization "
                             "index would evaluate every record in memory at each open")
        return None
    assert policy.epoch_id is not None  # CustodianPolicy requires it in epoch mode
    if index is None:
        raise ValueError("custodian policy index_mode 'epoch' needs the epoch index (agency-b "
                         "build-index; CustodianConfig(epoch_index=EpochIndex.open(DIR)))")
    if index.epoch_id != policy.epoch_id:
        raise ValueError(f"the epoch index is of epoch {index.epoch_id!r}; the custodian "
                         f"policy serves epoch {policy.epoch_id!r}")
    needed = max((tagset.fingerprint_bits(policy.epoch_max_evaluations, max(index.tags(r), 1))
                  for r in index.rules), default=0)
    if index.bits < needed:
        raise ValueError(f"epoch {index.epoch_id} index has {index.bits}-bit fingerprints; "
                         f"epoch_max_evaluations {policy.epoch_max_evaluations:,} needs {needed}")
    # The tag set is public to every requester of the epoch: a record the policy excludes
    # must not be in it at all (its tag would reveal that the custodian holds it).
    built_without = set(getattr(index, "manifest", {}).get("excluded_classes", ()))
    if not policy.excluded_record_classes <= built_without:
        missing = sorted(policy.excluded_record_classes - built_without)
        raise ValueError(f"epoch {index.epoch_id} index holds records of classes {missing} "
                         "that the policy excludes; rebuild it with this policy")
    if isinstance(config.records, RecordsOutOfCore) and policy.allowed_tiers - {Tier.IDENTITY}:
        raise ValueError("records out of core serve the identity tier only: set the policy's "
                         "allowed_tiers to ['identity']")
    return tagset.epoch_key(config.master_secret, policy.epoch_id)


@dataclass(frozen=True)
class _LedgerEvaluations:
    """A session's evaluated blinded elements, stored on its ledger
    (``engines.base.EvaluationStore``; docs/architecture.md, National custodian)."""

    ledger: LedgerPort
    auth_id: str
    session_id: str

    def store(self, seq: int, elements: bytes) -> None:
        self.ledger.store_evaluated(self.auth_id, self.session_id, seq, elements)

    def load(self, seq: int) -> bytes | None:
        return self.ledger.evaluated_elements(self.session_id, seq)


class CustodianSession(CustodianCore):
    """One requester session on the custodian side, on the session core.

    Received messages go through ``handle(message, peer_id=...)``; its tag stream goes
    through ``send`` (``tag_chunks``).  A session id may reopen after a reconnect: its
    reservation, evaluation count and disclosures are on the ledger, and every key is
    derived again from the authorization.
    """

    TABLE = CUSTODIAN_TRANSITIONS
    DERIVED_HANDLERS = frozenset({"_engine_message", "_tag_stream"})
    SERVED_TIERS = frozenset({Tier.IDENTITY})
    RESUMABLE = True

    def __init__(self, custodian: Custodian) -> None:
        super().__init__(custodian.config)
        self.custodian = custodian
        self.rules: tuple[str, ...] = ()
        self.fields: tuple[str, ...] = ()
        self._pseudonym_key = b""
        self._engine: EngineSession | None = None
        self._reply_streams: dict[type, str] = {}
        self._tag_kind: type | None = None
        #: Records this session has released or recorded as replayed (bounded by the
        #: custodian's records): repeats of them are answered without touching the ledger.
        self._answered: set[str] = set()
        #: Units evaluated for messages that have no reply (a KKRT extension chunk), admitted
        #: by policy and counted durably in one commit before anything next leaves.
        self._uncounted = 0

    # -- open (the core's hooks) --------------------------------------------------------

    def _session_request(self, req: OpenRequest) -> SessionRequest:
        return SessionRequest(
            peer_id=self.peer_id, tier=Tier(req.tier), match_rules=tuple(req.match_rules),
            disclosure_fields=tuple(req.disclosure_fields), query_count=req.element_count,
            engine=req.engine,
        )

    def _certification(self, signed: SignedAuthorization) -> Certification | None:
        return self.custodian.config.certifications.get(signed.authorization.authority_key_id)

    def _decide_options(self, signed: SignedAuthorization) -> dict[str, Any]:
        return {"named_subjects_ready": self._certification(signed) is not None,
                "engine_traits": registry.traits(),
                "evaluation_key": self.custodian.evaluation_key}

    def _audit_fields(self, req: OpenRequest) -> dict[str, Any]:
        return {"rules": list(req.match_rules), "fields": list(req.disclosure_fields)}

    def _session_meta(self, req: OpenRequest) -> dict[str, Any]:
        return {"rules": list(req.match_rules), "elements": req.element_count}

    def _prepare(self, req: OpenRequest, signed: SignedAuthorization) -> None:
        """From here on the session speaks its engine's protocol (its table's rows)."""
        self._adopt(custodian_table(req.engine))

    def _opened(self, req: OpenRequest, reservation: Reservation) -> OpenResponse:
        """Start the engine run on the session's grant (its index is built or cached)."""
        cfg = self.custodian.config
        auth = self.authorization
        assert self.signed is not None  # the core sets it before calling this hook
        self.rules = tuple(req.match_rules)
        allowed = set(permitted_fields(auth, cfg.policy))
        self.fields = tuple(f for f in req.disclosure_fields if f in allowed)
        # A resumed session continues its account: disclosures made before a reconnect count.
        self.disclosed = cfg.ledger.disclosed_count(auth.authorization_id, req.session_id)
        key = authorization_key(cfg.master_secret, auth.authorization_id)
        self._pseudonym_key = key
        self._engine = engine = self.custodian.engine(req.engine).open(SessionGrant(
            authorization_id=auth.authorization_id, session_id=req.session_id,
            rules=self.rules, key=key, max_units=reservation.reserved, mode=auth.mode,
            certification=(self._certification(self.signed)
                           if auth.mode is Mode.NAMED_SUBJECTS else None),
            evaluations=_LedgerEvaluations(cfg.ledger, auth.authorization_id, req.session_id),
            evaluation_secret=(self.custodian.evaluation_secret
                               if auth.evaluation_key is not None else None)))
        exchanges = registry.get(req.engine).exchanges
        self._reply_streams = reply_streams(exchanges)
        self._tag_kind = next((ex.replies for ex in exchanges
                               if ex.flow is Flow.SERVER_STREAM), None)
        return OpenResponse(
            session_id=req.session_id, authorization_id=auth.authorization_id,
            custodian_id=cfg.policy.custodian_id, match_rules=self.rules,
            disclosure_fields=self.fields, element_count=reservation.reserved,
            tag_count=engine.tag_count, tag_size=engine.tag_size,
            budget_remaining=cfg.ledger.budget(auth.authorization_id).remaining,
        )

    def _discard(self) -> None:
        self._engine = None  # its per-session secrets and index references
        if self._uncounted:  # a session failing mid-stream still accounts what it evaluated
            # the failure being recorded may be the ledger's own
            with suppress(LedgerError, BudgetExhausted):
                self._count_uncounted()

    def _count_uncounted(self) -> None:
        """Durably count the evaluated units of reply-less messages: before the first tag
        or reply leaves, and before the receipt (one fsync, not one per extension chunk)."""
        if self._uncounted:
            units, self._uncounted = self._uncounted, 0
            self._record_units(units)

    def _close(self, req: CloseRequest) -> Receipt:
        self._count_uncounted()
        return super()._close(req)

    # -- the engine's messages -------------------------------------------------------------

    def tag_chunks(self, chunk_tags: int = DEFAULT_TAG_CHUNK, kind: type | None = None, *,
                   peer_id: str | None = None) -> Iterator[object]:
        """The engine's tags in bounded chunks (its server stream).

        ``kind`` is the message type the caller's transport carries (default: this session's
        engine's); a session of another engine or tier refuses it (``ProtocolError``).
        """
        if kind is None:
            kind = self._tag_kind
            if kind is None:
                raise self._failed(ProtocolError(
                    f"identity custodian session in state {self.state.value!r} has no tag "
                    "stream (its engine, if open, declares none)"))
        return cast(Iterator[object], self.send(kind, chunk_tags, peer_id=peer_id))

    def _tag_stream(self, chunk_tags: int = DEFAULT_TAG_CHUNK) -> Iterator[object]:
        engine = self._engine
        assert engine is not None  # the table admits engine events only while SERVING
        self._count_uncounted()  # what was evaluated is on the ledger before a tag leaves
        for chunk in engine.tag_chunks(chunk_tags):
            self.transcript.add(self._reply_streams[type(chunk)], chunk)
            yield chunk

    def _engine_message(self, message: object) -> object | None:
        """One engine message: cost it, let policy admit the units, evaluate, then count.

        Policy decides before any evaluation (``check_evaluation``, counting units not yet
        on the ledger); the durable count comes after the engine accepted the message and
        before its reply leaves, so ``evaluated`` counts what was evaluated: an invalid
        element or a refused chunk fails the session and counts nothing (its reservation was
        charged at open and is never refunded).  A message without a reply leaves nothing to
        wait for: its units join the next count (``_count_uncounted``), since a durable
        commit per KKRT extension chunk was seconds of fsync at 1.28M x 1.3M.
        """
        engine = self._engine
        assert engine is not None  # the table admits engine events only while SERVING
        units = engine.cost(message)
        if units:
            self._admit_units(self._uncounted + units)
        reply = engine.evaluate(message)
        if units:
            self._uncounted += units
        if reply is not None:
            self._count_uncounted()
        self.transcript.add(REQUEST_STREAM, message)
        if reply is not None:
            self.transcript.add(self._reply_streams[type(reply)], reply)
        return reply

    # -- disclosure ---------------------------------------------------------------------

    def pseudonym(self, record: PersonRecord) -> str:
        """Per-authorization pseudonym of a custodian record: stable within, unlinkable across."""
        return self._pseudonym_of(record.record_id)

    def _pseudonym_of(self, record_id: str) -> str:
        mac = hmac.new(self._pseudonym_key, PSEUDONYM_DOMAIN + record_id.encode(),
                       hashlib.sha256)
        return mac.hexdigest()[:32]

    def _disclose(self, req: DisclosureRequest) -> DisclosureResponse:
        self._count_uncounted()  # every evaluation is on the ledger before a record leaves
        if len(req.outputs) > MAX_DISCLOSURE_BATCH:
            raise ProtocolError(
                f"disclosure request has {len(req.outputs)} outputs; "
                f"the limit is {MAX_DISCLOSURE_BATCH}"
            )
        cfg = self.custodian.config
        auth = self.authorization
        disclosures: list[Disclosure] = []
        # Expiry refuses the whole request; the cap withholds only records not disclosed
        # before under this authorization (the ledger decides which, atomically), so a
        # requester whose reply was lost can fetch what it was given again.
        budget = cfg.ledger.budget(auth.authorization_id)
        assert self.signed is not None  # self.authorization would have raised
        now = cfg.clock()
        check_repeat_disclosure(self.signed, now=now).raise_if_refused()
        cap_reached_before = not check_disclosure(self.signed, budget.disclosed, now=now)
        assert self._engine is not None  # a served session has its engine
        # Units of disclosure: every item alone, or (corroborated sessions) the items of one
        # group together; policy says which units may disclose before any proof is checked.
        if req.groups and len(req.groups) != len(req.outputs):
            raise ProtocolError(f"disclosure request has {len(req.groups)} group ids for "
                                f"{len(req.outputs)} outputs; send one per output")
        units: dict[int, list[int]] = {}
        for i, group in enumerate(req.groups or range(len(req.outputs))):
            units.setdefault(group, []).append(i)
        why: dict[int, str] = {}
        admitted: list[list[int]] = []
        for unit in units.values():
            refused = check_disclosure_group(auth, self.rules, [req.outputs[i][0] for i in unit])
            if refused is None:
                admitted.append(unit)
            else:
                why.update(dict.fromkeys(unit, refused.value))
        # The engine checks each proof against the record it claims (position -> record
        # index); a proof of the wrong length is never looked at.
        proof_size = self._engine.proof_size
        candidates = [(i, req.outputs[i][0], req.outputs[i][1]) for unit in admitted
                      for i in unit if len(req.outputs[i][1]) == proof_size]
        # Each distinct proof is verified once: a batch replaying one output costs one check.
        first_of: dict[tuple[str, bytes], int] = {}
        for i, rule_id, output in candidates:
            first_of.setdefault((rule_id, output), i)
        checked = self._engine.verify([(i, rule_id, output)
                                       for (rule_id, output), i in first_of.items()])
        found = {i: checked[first_of[(rule_id, output)]] for i, rule_id, output in candidates
                 if first_of[(rule_id, output)] in checked}
        verified: list[tuple[int, str, int]] = []  # (unit's first index, rule, position)
        unit_of: dict[int, list[int]] = {}  # a verified unit's first index -> its items
        for unit in admitted:
            held = [found.get(i) for i in unit]
            if any(rows is None for rows in held):
                why.update(dict.fromkeys(unit, DisclosureRejection.PROOF_INVALID.value))
                continue
            # A key several records hold discloses each of them; a group discloses the
            # records every one of its keys names (docs/architecture.md, Shared keys).
            common = sorted(set.intersection(*(set(rows or ()) for rows in held)))
            if not common:  # each holds, for another record
                why.update(dict.fromkeys(
                    unit, DisclosureRejection.CORROBORATION_RECORDS_DIFFER.value))
                continue
            if len(common) > MAX_HOLDERS_PER_KEY:  # names no one in particular
                why.update(dict.fromkeys(
                    unit, DisclosureRejection.KEY_HELD_BY_TOO_MANY_RECORDS.value))
                continue
            unit_of[unit[0]] = unit
            rule_id = req.outputs[unit[0]][0]
            verified.extend((unit[0], rule_id, position) for position in common)
        rejected = sorted(why)
        # each verified record's id and the granted fields, read in one pass
        released = ids_and_fields(cfg.records, [p for _, _, p in verified], self.fields)
        # The ledger checks the cap atomically and is the authority on it; the rows are
        # durable (one transaction per batch) before any field leaves this function.
        counted = self._account(auth.authorization_id,
                                [(record_id, rule_id) for (_, rule_id, _), (record_id, _)
                                 in zip(verified, released, strict=True)])
        withheld = [i for (i, _, _), first in zip(verified, counted, strict=True)
                    if first is None]
        for (i, rule_id, _), (record_id, fields), first in zip(verified, released, counted,
                                                                strict=True):
            if first is None:
                continue
            if first:
                self.disclosed += 1
            disclosures.append(Disclosure(index=i, rule_id=rule_id,
                                          pseudonym=self._pseudonym_of(record_id),
                                          fields=fields))
        if withheld:
            why.update(dict.fromkeys(
                (i for lead in withheld for i in unit_of[lead]),
                DisclosureRejection.DISCLOSURE_CAP_REACHED.value))
            entry = {"stage": "disclosure", "authorization_id": auth.authorization_id,
                     "session_id": self.session_id, "reasons": ["disclosure_cap_reached"],
                     "withheld": len(withheld)}
            if cap_reached_before:  # asking again past the cap: per peer, rate-limited
                cfg.refusals.record(cfg.ledger, self.peer_id, now, entry)
            else:  # the batch that reached the cap: always on the chain
                cfg.ledger.audit("refusal", entry)
            rejected = sorted(why)
        # Reasons go back only where the requester expects them (a corroborated session,
        # or one that sent groups), so older requesters' transcripts are unchanged.
        explain = auth.corroboration is not None or bool(req.groups)
        if rejected:  # per peer, rate-limited like every refusal: a stream of bad proofs
            # cannot grow the chain (docs/architecture.md, Accounting)
            entry = {"authorization_id": auth.authorization_id, "session_id": self.session_id,
                     "count": len(rejected)}
            if explain:
                entry["reasons"] = dict(Counter(why[i] for i in rejected))
            cfg.refusals.record(cfg.ledger, self.peer_id, cfg.clock(), entry,
                                kind="disclosure_rejected")
        reply = DisclosureResponse(
            seq=req.seq, disclosures=tuple(disclosures), rejected=tuple(rejected),
            reasons=tuple(why[i] for i in rejected) if explain else ())
        self.transcript.add("disclosure-request", req)
        self.transcript.add("disclosure-response", reply)
        return reply

    def _account(self, auth_id: str, verified: list[tuple[str, str]]) -> list[bool | None]:
        """For each verified (record id, rule), in order: True for a first disclosure (it counts
        against the cap), False for a repeat (it does not), None where the cap withholds it.

        Only a record's first sight in this session reaches the ledger: one this session
        already disclosed or already replayed is answered again without a new row or entry,
        so replaying one output any number of times grows the ledger at most once per
        session (docs/architecture.md, Accounting).  The new records commit in one
        transaction; only a batch that crosses the cap falls back to one row at a time, so
        exactly the records under the cap are released.
        """
        ledger = self.custodian.config.ledger
        pending: dict[str, str] = {}  # record id -> the rule of its first occurrence here
        for record_id, rule_id in verified:
            if record_id not in self._answered:
                pending.setdefault(record_id, rule_id)
        outcome: dict[str, bool | None] = {}
        if pending:
            items = list(pending.items())
            rows: list[DisclosureRow | None]
            try:
                rows = list(ledger.record_disclosures(auth_id, self.session_id, items))
            except DisclosureCapReached:
                rows = []
                for record_id, rule_id in items:
                    try:
                        rows.append(ledger.record_disclosure(auth_id, self.session_id,
                                                             record_id, rule_id))
                    except DisclosureCapReached:
                        rows.append(None)
            for (record_id, _), row in zip(items, rows, strict=True):
                outcome[record_id] = None if row is None else not row.repeat
                if row is not None:
                    self._answered.add(record_id)
        counted: list[bool | None] = []
        for record_id, _ in verified:
            if record_id in outcome:  # its first occurrence in this batch carries the row
                first = outcome[record_id]
                counted.append(first)
                if first:
                    outcome[record_id] = False  # later occurrences here are repeats
            else:
                counted.append(False)  # answered earlier in this session
        return counted


def corroboration_groups(keys: Sequence[tuple[str, str]], k: int
                         ) -> tuple[list[list[int]], int]:
    """One group per query: the positions of ``k`` pairwise independent rules among its
    matches (``keys``: (query id, rule) per match), and how many matched queries have no
    such group (withheld: a match under fewer independent rules never discloses)."""
    by_query: dict[str, dict[str, int]] = {}
    for i, (query_id, rule_id) in enumerate(keys):
        by_query.setdefault(query_id, {}).setdefault(rule_id, i)
    groups: list[list[int]] = []
    withheld = 0
    for rules in by_query.values():
        chosen = corroborating_group(list(rules), k)
        if chosen is None:
            withheld += 1
        else:
            groups.append([rules[r] for r in chosen])
    return groups, withheld


def disclosure_plan(keys: Sequence[tuple[str, str]], corroboration: int | None, batch: int
                    ) -> list[tuple[list[int], tuple[int, ...]]]:
    """The disclosure batches of matches ``keys`` ((query id, rule) each): positions and
    group ids per batch, at most ``batch`` items, a group never split across batches.
    Without corroboration every match goes alone, in order, with no group ids."""
    if corroboration is None:
        return [(list(range(lo, min(lo + batch, len(keys)))), ())
                for lo in range(0, len(keys), batch)]
    plan: list[tuple[list[int], tuple[int, ...]]] = []
    positions: list[int] = []
    group_ids: list[int] = []
    for group in corroboration_groups(keys, corroboration)[0]:
        if positions and len(positions) + len(group) > batch:
            plan.append((positions, tuple(group_ids)))
            positions, group_ids = [], []
        gid = group_ids[-1] + 1 if group_ids else 0
        positions.extend(group)
        group_ids.extend([gid] * len(group))
    if positions:
        plan.append((positions, tuple(group_ids)))
    return plan


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


# --------------------------------------------------------------------------- requester


class RequesterSession(RequesterCore):
    """The requester's side of one identity-tier session, on the session core.

    ``queries`` (query records, or just their persons, e.g. ``CompactRecords``)
    must already be validated (``records.validate_queries`` or
    ``recordstore.load_query_csv``); refused records never enter the protocol.
    What it sends goes through ``send`` (``open_request``, ``requests``,
    ``disclosure_requests``, ``close_request``), its local match through ``step``
    (``match``), and the custodian's messages through ``handle``.
    """

    TABLE = REQUESTER_TRANSITIONS
    DERIVED_HANDLERS = frozenset({"_requests", "_on_engine"})

    def __init__(
        self,
        signed_authorization: SignedAuthorization,
        queries: ValidatedQueries | CompactRecords | Sequence[QueryRecord],
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
        tagset: EpochTagSet | None = None,
    ) -> None:
        """``tokens`` ((record id, rule) -> token) are required for a named-subject
        authorization: only subjects the authority reviewed are sent at all.
        ``engine`` names a registered match engine (``protocol.engines.registry``).
        ``clock`` dates the match keys (a birth date after today has none).
        ``tagset``: the custodian's epoch tag set, for an engine that matches against one
        (``oprf-epoch``; fetched once per epoch, see docs/architecture.md, National custodian).

        ``queries``: ``validate_queries(...).accepted``, or the packed records of
        ``recordstore.load_query_csv``; a plain list of query records is validated here
        (``ValidatedQueries.ensure``) and refused as a whole if any record would be.
        Wrong types are a ``TypeError`` naming the expected one."""
        _check_requester_inputs(signed_authorization, match_rules, disclosure_fields,
                                signing_key, custodian_key, tokens, engine)
        if not isinstance(queries, CompactRecords):  # packed: validated by load_query_csv
            queries = ValidatedQueries.ensure(queries, today=utc_date(clock()))
        auth = signed_authorization.authorization
        if not 0 < chunk_size <= MAX_CHUNK_ELEMENTS:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_ELEMENTS}")
        super().__init__(
            signed_authorization, session_id=session_id or f"sess-{uuid.uuid4().hex}",
            transcript=Transcript(), signing_key=signing_key, custodian_key=custodian_key)
        self.rules = tuple(match_rules if match_rules is not None else auth.match_rules)
        self.fields = tuple(
            disclosure_fields if disclosure_fields is not None else auth.disclosure_fields
        )
        self.ops: GroupOps = ops or SerialOps()
        self.chunk_size = chunk_size
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
        self._adopt(requester_table(self.engine))
        executor = getattr(self.ops, "executor", None)
        today = utc_date(clock())
        people = persons_of(queries)
        # Built as lists, kept as tuples of atomic values: the cyclic collector untracks
        # those after one pass instead of walking a million items in each full pass
        # (docs/architecture.md, Long-lived bulk data).
        element_query: list[int] = []
        element_rule: list[int] = []
        element_input: list[bytes] = []
        token_parts: list[bytes] = []
        key_digest = spec.key_digest
        if key_digest is not None and self.named:  # tokens replace keys: nothing to digest
            raise ProtocolError(f"the {engine} engine digests match keys; named-subject "
                                "sessions send tokens instead")
        # The workers cut the ids out of the packed queries, derive the keys and, for an
        # engine that digests them, digest them, all in one job per slice.
        query_ids, keys, digests = bulk_keyed_records(people, self.rules, key_digest,
                                                      executor=executor, today=today)
        # Rules with query-side variants evaluate several keys per query (each one budget
        # unit; docs/architecture.md, Recall and misidentification).
        variant_rules = [r for r in self.rules if MATCH_RULES[r].variants]
        if variant_rules and self.named:
            raise ProtocolError("named-subject sessions take one reviewed token per subject "
                                f"and rule; rules with variant keys ({', '.join(variant_rules)}) "
                                "are not available to them")
        variant_keys = query_match_keys_bulk(people, variant_rules, today=today)
        del people
        for r_i, rule_id in enumerate(self.rules):
            column = keys.pop(rule_id)
            if rule_id in variant_keys:
                lists = variant_keys.pop(rule_id)
                flat = [k for ks in lists for k in ks]
                element_query.extend(i for i, ks in enumerate(lists) for _ in ks)
                element_rule.extend([r_i] * len(flat))
                element_input.extend(flat)
                if key_digest is not None:
                    digests[rule_id] = key_digest(flat)
                continue
            known = cast(list[bytes], column)  # None only where positions skip
            positions: Sequence[int]
            if self.named:  # only subjects the authority reviewed are sent at all
                assert tokens is not None
                positions = [i for i, k in enumerate(column)
                             if k is not None and (query_ids[i], rule_id) in tokens]
                token_parts.extend(tokens[(query_ids[i], rule_id)] for i in positions)
                element_input.extend([known[i] for i in positions])
            elif None not in column:  # every query has a key (the usual case): no scan
                positions = range(len(column))
                element_input.extend(known)
            else:
                positions = [i for i, k in enumerate(column) if k is not None]
                element_input.extend([k for k in known if k is not None])
            element_query.extend(positions)
            element_rule.extend([r_i] * len(positions))
        self.query_ids: tuple[str, ...] = tuple(query_ids)
        self.element_query: tuple[int, ...] = tuple(element_query)
        self.element_rule: tuple[int, ...] = tuple(element_rule)
        self.element_input: tuple[bytes, ...] = tuple(element_input)
        self._engine: RequesterEngine = spec.requester(RequesterInputs(
            authorization_id=auth.authorization_id, session_id=self.session_id,
            inputs=self.element_input, chunk_size=chunk_size, ops=self.ops,
            digests=b"".join(digests[r] for r in self.rules) if key_digest else None,
            tokens=b"".join(token_parts) if self.named else None,
            tagset=tagset, element_rules=tuple(map(self.rules.__getitem__, self.element_rule)),
            evaluation_key=auth.evaluation_key))
        self._reply_streams = reply_streams(self.exchanges)
        self._sends = {ex.sends: ex for ex in self.exchanges if ex.sends is not None}
        # one rule without variants holds each query at most once: no set needed
        with_key = (len(self.element_query) if len(self.rules) == 1 and not variant_rules
                    else len(set(self.element_query)))
        self.queries_without_key = len(self.query_ids) - with_key
        self.open_response: OpenResponse | None = None
        self.matches: list[Match] = []
        self.results: list[MatchResult] = []
        self.rejected = 0
        #: Why the custodian rejected disclosures, by reason (when it says).
        self.rejected_reasons: Counter[str] = Counter()
        #: Corroborated sessions: queries whose matches were never presented because fewer
        #: than the required independent rules matched them (docs/architecture.md, Recall
        #: and misidentification).
        self.withheld_uncorroborated = 0
        self._pending: dict[int, list[Match]] = {}

    @property
    def element_count(self) -> int:
        """Budget units this session asks for (the engine's: elements, bins, ...)."""
        return self._engine.units

    @property
    def evaluation_proofs_verified(self) -> int:
        """Evaluated chunks whose proof verified under the pinned evaluation key (0 in mode 0;
        docs/architecture.md, Verifiable evaluation)."""
        return int(getattr(self._engine, "proofs_verified", 0))

    @property
    def custodian_entries(self) -> int:
        """Custodian (record, rule) entries behind the granted tags (0 before open)."""
        if self.open_response is None:
            return 0
        return self._engine.custodian_entries(self.open_response.tag_count)

    # -- what it sends and does (through the core's ``send`` and ``step``) ---------------

    def open_request(self) -> OpenRequest:
        return cast(OpenRequest, self.send(OpenRequest))

    def requests(self, exchange: Exchange) -> Iterator[object]:
        """The engine's messages for ``exchange``, produced lazily (callers may pull them
        one at a time, e.g. on a transport thread, to overlap with the replies)."""
        if exchange.sends is None:
            raise ProtocolError(f"the {exchange.phase!r} exchange has no requester messages")
        return cast(Iterator[object], self.send(exchange.sends))

    def blind_ahead(self, stop: Callable[[], bool]) -> int:
        """Let the engine prepare its messages while the session opens, until ``stop()``.

        Only for an engine whose messages need nothing from the custodian (the OPRF
        engine's blinded chunks); nothing is sent, counted or added to the transcript here.
        Returns how many messages are ready (0 for an engine that prepares nothing ahead,
        or once the session is open).  The caller stops it before the exchanges start.
        """
        ahead = getattr(self._engine, "blind_ahead", None)
        if ahead is None or self.open_response is not None:
            return 0
        return int(ahead(stop))

    def match(self) -> list[Match]:
        """Local match (step 4): queries whose tag is in the custodian's set."""
        return cast(list[Match], self.step("match"))

    def disclosure_requests(self, batch: int = MAX_DISCLOSURE_BATCH
                            ) -> Iterator[DisclosureRequest]:
        """Present the disclosure proof of each match (step 5), in bounded batches.

        Batches default to the largest allowed: each one costs the custodian a durable
        (fsynced) ledger commit, which dominates small batches."""
        return cast(Iterator[DisclosureRequest], self.send(DisclosureRequest, batch))

    # -- handlers named by the tables --------------------------------------------------

    def _open_request(self) -> OpenRequest:
        req = OpenRequest(
            session_id=self.session_id, signed_authorization=self.signed.to_bytes(),
            tier=Tier.IDENTITY.value, match_rules=self.rules,
            disclosure_fields=self.fields, element_count=self.element_count,
            engine=self.engine,
        )
        self.transcript.add("open", req)
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

    def _requests(self, sent: type) -> Iterator[object]:
        for message in self._engine.requests(self._sends[sent]):
            self.transcript.add(REQUEST_STREAM, message)
            yield message

    def _on_engine(self, message: object) -> None:
        self._engine.handle(message)
        self.transcript.add(self._reply_streams[type(message)], message)

    def _match(self) -> list[Match]:
        hits = self._engine.match()
        self.matches = [
            Match(query_index=self.element_query[e],
                  query_record_id=self.query_ids[self.element_query[e]],
                  rule_id=self.rules[self.element_rule[e]],
                  output=proof)
            for e, proof in zip(hits, self._engine.proofs(hits), strict=True)
        ]
        k = self.signed.authorization.corroboration
        if k is not None:  # each query's group first, in order; what has none comes last
            groups, self.withheld_uncorroborated = corroboration_groups(
                [(m.query_record_id, m.rule_id) for m in self.matches], k)
            grouped = [i for group in groups for i in group]
            rest = sorted(set(range(len(self.matches))) - set(grouped))
            self.matches = [self.matches[i] for i in grouped + rest]
        return self.matches

    def _disclosure_requests(self, batch: int = MAX_DISCLOSURE_BATCH
                             ) -> Iterator[DisclosureRequest]:
        return self._disclosure_batches(min(batch, MAX_DISCLOSURE_BATCH))

    def _disclosure_batches(self, batch: int) -> Iterator[DisclosureRequest]:
        plan = disclosure_plan([(m.query_record_id, m.rule_id) for m in self.matches],
                               self.signed.authorization.corroboration, batch)
        for seq, (positions, groups) in enumerate(plan):
            part = [self.matches[i] for i in positions]
            self._pending[seq] = part
            req = DisclosureRequest(seq=seq, outputs=tuple((m.rule_id, m.output) for m in part),
                                    groups=groups)
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
        if resp.reasons and len(resp.reasons) != len(resp.rejected):
            raise ProtocolError(f"disclosure response {resp.seq} gives {len(resp.reasons)} "
                                f"reasons for {len(resp.rejected)} rejections")
        self.rejected += len(resp.rejected)
        self.rejected_reasons.update(resp.reasons)
        self.transcript.add("disclosure-response", resp)

    def _close_request(self) -> CloseRequest:
        if self._pending:
            raise ProtocolError(f"close with {len(self._pending)} disclosure batches pending")
        return super()._close_request()


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
    countersign: bool = True,
) -> SessionOutcome:
    """Run both sides of one session in this process, no network.

    ``requester_id`` stands in for the identity the transport would authenticate.  Like the
    services, the run ends with the requester's countersignature on the custodian's
    receipt, so the requester needs its ``signing_key`` and the custodian that key's public
    half under ``requester_id`` (``CustodianConfig.requester_keys``); both are checked
    before anything is opened or spent.  ``countersign=False`` runs without it (the receipt
    then carries the custodian's signature only).
    """
    _check_run_inputs(requester, custodian, requester_id, countersign)
    opened = custodian.handle(requester.open_request(), peer_id=requester_id)
    requester.handle(opened)
    run_exchanges(requester, custodian)
    requester.match()
    for req in requester.disclosure_requests():
        requester.handle(custodian.handle(req))
    receipt = custodian.handle(requester.close_request())
    countersigned = requester.handle(receipt)
    assert isinstance(countersigned, Receipt)
    if countersign:
        custodian.countersign(countersigned)
    return SessionOutcome(
        matches=requester.matches, results=requester.results,
        receipt=countersigned, rejected=requester.rejected,
    )


# --------------------------------------------------------------------------- argument checks
#
# The public entry points refuse wrong types with a TypeError naming the expected type, and
# a run the services would refuse with a ValueError, before any work or budget is spent.


def _expect(value: object, expected: type | tuple[type, ...], name: str, hint: str = "") -> None:
    """``TypeError`` unless ``value`` is an ``expected``; the message names both types."""
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple)
                                                 else (expected,)))
        raise TypeError(f"{name} must be of type {names}{hint}, got {type(value).__name__}")


def _expect_names(value: object, name: str) -> None:
    """A sequence of ids (rules, fields), not one id: a str would split into characters."""
    if value is not None and (isinstance(value, str | bytes)
                              or not isinstance(value, Sequence)
                              or not all(isinstance(v, str) for v in value)):
        raise TypeError(f"{name} must be a sequence of str (e.g. ('tin+dob',)), got "
                        f"{type(value).__name__} {value!r:.60}")


def _check_requester_inputs(
    signed: object, match_rules: object, disclosure_fields: object, signing_key: object,
    custodian_key: object, tokens: object, engine: object,
) -> None:
    _expect(signed, SignedAuthorization, "signed_authorization",
            " (sign_authorization(draft_authorization(...), authority_key))")
    _expect_names(match_rules, "match_rules")
    _expect_names(disclosure_fields, "disclosure_fields")
    _expect(signing_key, (Ed25519PrivateKey, type(None)), "signing_key")
    _expect(custodian_key, (Ed25519PublicKey, type(None)), "custodian_key")
    _expect(engine, str, "engine")
    if tokens is not None:
        _expect(tokens, Mapping, "tokens", " ((record id, rule id) -> token bytes)")
        # the first entry shows a wrong shape; checking each would cost at 1M subjects
        bad = next(iter(cast(Mapping[object, object], tokens).items()), None)
        if bad is not None and not (isinstance(bad[0], tuple) and len(bad[0]) == 2
                                    and isinstance(bad[1], bytes)):
            raise TypeError(f"tokens must map (record id, rule id) to token bytes; entry "
                            f"{bad[0]!r:.60} does not (see protocol.engines.named.TokenSet.lookup)")


def _check_custodian_config(config: CustodianConfig) -> None:
    _expect(config.policy, CustodianPolicy, "policy")
    _expect(config.master_secret, bytes, "master_secret", " (32 random bytes)")
    if len(config.master_secret) != 32:
        raise ValueError(f"master secret must be 32 bytes, got {len(config.master_secret)}")
    _expect(config.signing_key, Ed25519PrivateKey, "signing_key")
    _expect(config.requester_keys, Mapping, "requester_keys",
            " (requester id -> Ed25519PublicKey)")
    for requester, key in config.requester_keys.items():
        _expect(key, Ed25519PublicKey, f"requester_keys[{requester!r}]")
    records = config.records
    if isinstance(records, CompactRecords | RecordsOutOfCore):  # checked as they were stored
        return
    _expect(records, Sequence, "records",
            " (of PersonRecord, or the packed records of load_custodian_csv)")
    for position, record in enumerate(records):
        _expect(record, PersonRecord, f"records[{position}]",
                " (records are dataclasses: PersonRecord(**row), not dicts)"
                if isinstance(record, dict) else "")


def _check_run_inputs(requester: object, custodian: object, requester_id: object,
                      countersign: bool) -> None:
    _expect(requester, RequesterSession, "requester")
    _expect(custodian, CustodianSession, "custodian",
            " (one session of the Custodian: custodian.session())")
    _expect(requester_id, str, "requester_id")
    if not countersign:
        return
    assert isinstance(requester, RequesterSession) and isinstance(custodian, CustodianSession)
    if requester.signing_key is None:
        raise ValueError("the requester session has no signing_key, so it cannot countersign "
                         "the receipt as the services do: pass RequesterSession(..., "
                         "signing_key=...) or run_in_process(..., countersign=False)")
    known = custodian.custodian.config.requester_keys.get(cast(str, requester_id))
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if known is None or (known.public_bytes(*raw)
                         != requester.signing_key.public_key().public_bytes(*raw)):
        raise ValueError(f"the custodian holds no receipt key for {requester_id!r} that matches "
                         "the requester's signing_key, so it would refuse the countersignature: "
                         "add CustodianConfig(requester_keys={requester_id: "
                         "signing_key.public_key()}) or pass countersign=False")
