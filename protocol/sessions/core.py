"""Requester and Custodian session state machines (DESIGN §4), sans-I/O.

Rules of this module, in the spirit of h11's ``_state.py``:

1. Everything that changes a session's state lives here, and the allowed
   transitions of each role are one table (``CUSTODIAN_TRANSITIONS``,
   ``REQUESTER_TRANSITIONS``) that a reader can check at a glance.
2. Sessions take message objects (``protocol.domain.messages``) and return message
   objects.  They never touch a socket; the gRPC services and the in-process
   driver (``run_in_process``) only move messages between them.
3. A message in the wrong state raises ``ProtocolError`` naming the state and
   the message; policy refusals raise ``PolicyRefusal`` with machine-readable
   reasons from ``protocol.policy.decide``; budget and cap violations raise
   ``BudgetExhausted`` / ``DisclosureCapReached``.

Identity tier, one session:

    Requester                                   Custodian
    open_request()         --OpenRequest-->     handle(): decide, reserve budget
                           <--OpenResponse--
                           <--TagChunk*----     tag_chunks(): sorted tags of its records
    evaluation_chunks()    --EvaluateChunk*->   handle(): count, validate, evaluate
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
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.accounting.receipts import countersign, issue_receipt, store_countersignature
from protocol.adapters.sqlite_ledger import Ledger
from protocol.crypto import oprf
from protocol.crypto.kkrt import (
    DIGEST_SIZE,
    KKRTBaseOTReply,
    KKRTCustodian,
    KKRTExtensionChunk,
    KKRTRequester,
    KKRTSetup,
    KKRTTagChunk,
    digest_bytes,
    parse_proof,
)
from protocol.domain.messages import (
    DEFAULT_CHUNK,
    MAX_CHUNK_ELEMENTS,
    MAX_DISCLOSURE_BATCH,
    CloseRequest,
    Disclosure,
    DisclosureRequest,
    DisclosureResponse,
    EvaluateChunk,
    EvaluatedChunk,
    OpenRequest,
    OpenResponse,
    Receipt,
    TagChunk,
    Transcript,
    transition,
)
from protocol.domain.records import MATCH_RULES, PersonRecord, QueryRecord
from protocol.domain.recordstore import (
    CompactRecords,
    bulk_match_keys,
    bulk_match_keys_digested,
    persons_of,
)
from protocol.engines.named import Certification, blind_tokens, custodian_session_key
from protocol.errors import (
    BudgetExhausted,
    DisclosureCapReached,
    InvalidElementError,
    LedgerError,
    PolicyRefusal,
    ProtocolError,
)
from protocol.policy.decide import (
    CustodianPolicy,
    Mode,
    SessionRequest,
    SignedAuthorization,
    Tier,
    check_disclosure,
    decide,
    permitted_fields,
)

TAG_DOMAIN = b"gated-psi/tag/v1"
PSEUDONYM_DOMAIN = b"gated-psi/disclosure-pseudonym/v1"
AUTH_KEY_INFO_PREFIX = b"gated-psi/authorization-key/v1:"
#: Tag length in bytes.  12 B = 96 bits: with 1.3M x 1.3M elements a false tag
#: collision has probability < 2^-55, and disclosure re-verifies the full output.
TAG_SIZE = 12
#: Match engines behind the session interface (DESIGN §8).
ENGINE_OPRF = "oprf"
ENGINE_KKRT = "kkrt"
#: Bytes of what the requester presents at disclosure, per engine.
DISCLOSURE_PROOF_SIZE = {ENGINE_OPRF: 64, ENGINE_KKRT: 20}


def kkrt_context(authorization_id: str, session_id: str) -> bytes:
    """Seed context of the OT-extension engine: per authorization and per session."""
    return b"gated-psi/kkrt-session/v1" + hashlib.sha256(
        authorization_id.encode() + b"\0" + session_id.encode()).digest()
#: Records per slice of the custodian's index build (bounds its peak memory).
INDEX_SLICE = 65_536


def derive_tag(output: bytes, tag_size: int = TAG_SIZE) -> bytes:
    """Short tag T = SHA-256(domain || O)[:tag_size] of an OPRF output O (DESIGN §4 step 2)."""
    return hashlib.sha256(TAG_DOMAIN + output).digest()[:tag_size]


def derive_tags(outputs: Sequence[bytes], tag_size: int = TAG_SIZE) -> bytes:
    """Compact concatenation of ``derive_tag`` over many outputs."""
    sha = hashlib.sha256
    dom = TAG_DOMAIN
    return b"".join([sha(dom + o).digest()[:tag_size] for o in outputs])


def authorization_key(master_secret: bytes, authorization_id: str) -> bytes:
    """Per-authorization OPRF key: DeriveKeyPair(master secret, info = authorization id)."""
    sk, _pk = oprf.derive_key_pair(
        master_secret, AUTH_KEY_INFO_PREFIX + authorization_id.encode("utf-8")
    )
    return sk


class _SerialOps:
    """In-process stand-in for ``oprf.BatchPool`` when no pool is given."""

    executor = None  # no worker processes: everything runs in the caller

    def blind(self, inputs: Sequence[bytes]) -> tuple[bytes, bytes]:
        return oprf.blind_batch(inputs)

    def blind_evaluate(self, sk: bytes, blinded: bytes) -> bytes:
        return oprf.blind_evaluate_batch(sk, blinded)

    def finalize(self, inputs: Sequence[bytes], blinds: bytes, evaluated: bytes) -> list[bytes]:
        return oprf.finalize_batch(inputs, blinds, evaluated)

    def evaluate(self, sk: bytes, inputs: Sequence[bytes]) -> list[bytes]:
        return oprf.evaluate_batch(sk, inputs)


GroupOps = Any  # oprf.BatchPool or _SerialOps: blind / blind_evaluate / finalize / evaluate


# --------------------------------------------------------------------------- custodian


class CustodianState(StrEnum):
    AWAIT_OPEN = "await_open"
    SERVING = "serving"
    CLOSED = "closed"
    FAILED = "failed"


#: (state, message type) -> next state.  Anything else is a ProtocolError.
CUSTODIAN_TRANSITIONS: dict[tuple[CustodianState, type], CustodianState] = {
    (CustodianState.AWAIT_OPEN, OpenRequest): CustodianState.SERVING,
    (CustodianState.SERVING, EvaluateChunk): CustodianState.SERVING,
    (CustodianState.SERVING, KKRTSetup): CustodianState.SERVING,
    (CustodianState.SERVING, KKRTExtensionChunk): CustodianState.SERVING,
    (CustodianState.SERVING, DisclosureRequest): CustodianState.SERVING,
    (CustodianState.SERVING, CloseRequest): CustodianState.CLOSED,
}


@dataclass
class CustodianIndex:
    """Sorted tag set of the custodian's in-scope records under one authorization key.

    Kept as compact numpy arrays (never per-record Python objects) so 1.3M
    records fit comfortably in memory and lookups are a binary search.
    """

    authorization_id: str
    rules: tuple[str, ...]
    tags: np.ndarray  # dtype S<tag_size>, sorted
    record_idx: np.ndarray  # int64, index into Custodian.records
    rule_idx: np.ndarray  # int8, index into rules
    tag_size: int
    build_seconds: float = 0.0
    #: named-subject mode: position of each entry's certified element, else empty
    cert_pos: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.tags.shape[0])

    def tag_bytes(self, start: int = 0, stop: int | None = None) -> bytes:
        return self.tags[start:stop].tobytes()

    def lookup(self, tag: bytes) -> list[tuple[int, str, int]]:
        """Entries (record index, rule, entry position) whose tag equals ``tag``."""
        key = np.array([tag], dtype=self.tags.dtype)
        lo = int(np.searchsorted(self.tags, key, side="left")[0])
        hi = int(np.searchsorted(self.tags, key, side="right")[0])
        return [(int(self.record_idx[i]), self.rules[int(self.rule_idx[i])], i)
                for i in range(lo, hi)]


@dataclass
class CustodianConfig:
    """Everything a custodian needs: its data, policy, ledger and secrets."""

    policy: CustodianPolicy
    records: Sequence[PersonRecord]
    ledger: Ledger
    master_secret: bytes
    signing_key: Ed25519PrivateKey
    requester_keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    ops: GroupOps | None = None
    tag_size: int = TAG_SIZE
    clock: Callable[[], float] = time.time
    #: Named-subject certifications of these records, by authority key id (protocol.engines.named).
    certifications: Mapping[str, Certification] = field(default_factory=dict)


class Custodian:
    """Long-lived custodian state shared by its sessions: records in scope and tag indexes.

    Indexes are cached per (authorization, rules) so a custodian can build one
    ahead of time (``prepare``) and serve several sessions of the same
    authorization from it.
    """

    def __init__(self, config: CustodianConfig) -> None:
        self.config = config
        self.ops: GroupOps = config.ops or _SerialOps()
        excluded = config.policy.excluded_record_classes
        classes = (config.records.record_classes()
                   if isinstance(config.records, CompactRecords)
                   else [r.record_class for r in config.records])
        self.in_scope = np.asarray(
            [i for i, c in enumerate(classes) if c not in excluded], dtype=np.int64)
        self.excluded_count = len(config.records) - len(self.in_scope)
        self._kkrt_cache: dict[tuple[str, ...], Any] = {}
        self._kkrt_locks: dict[tuple[str, ...], threading.Lock] = {}
        self._indexes: dict[tuple[str, tuple[str, ...]], CustodianIndex] = {}
        self._lock = threading.Lock()

    @property
    def custodian_id(self) -> str:
        return self.config.policy.custodian_id

    def public_key(self) -> Ed25519PublicKey:
        return self.config.signing_key.public_key()

    def match_keys(self, rule_id: str, start: int = 0, stop: int | None = None
                   ) -> list[bytes | None]:
        """Match keys of in-scope records ``in_scope[start:stop]`` under ``rule_id``.

        Computed in slices and not cached, so the index build never holds all
        records as objects at once (memory stays flat at 1.3M records).
        """
        return bulk_match_keys(self.config.records, [rule_id],
                               positions=self.in_scope[start:stop],
                               executor=self.ops.executor)[rule_id]

    def prepare(self, authorization_id: str, rules: Sequence[str]) -> CustodianIndex:
        """Build (or fetch) the tag index for an authorization: DESIGN §4 step 2."""
        rules_t = tuple(sorted(rules))
        cache_key = (authorization_id, rules_t)
        with self._lock:
            idx = self._indexes.get(cache_key)
        if idx is not None:
            return idx
        started = time.perf_counter()
        sk = authorization_key(self.config.master_secret, authorization_id)
        all_tags: list[bytes] = []
        rec_idx: list[np.ndarray] = []
        rule_idx: list[np.ndarray] = []
        step = INDEX_SLICE
        for r_i, rule_id in enumerate(rules_t):
            for start in range(0, len(self.in_scope), step):
                keys = self.match_keys(rule_id, start, start + step)
                positions = [p for p, k in enumerate(keys) if k is not None]
                inputs = [keys[p] for p in positions]
                outputs = self.ops.evaluate(sk, inputs) if inputs else []
                all_tags.append(derive_tags(outputs, self.config.tag_size))
                rec_idx.append(self.in_scope[start:start + step][positions])
                rule_idx.append(np.full(len(positions), r_i, dtype=np.int8))
        dtype = np.dtype(f"S{self.config.tag_size}")
        tags = np.frombuffer(b"".join(all_tags), dtype=dtype)
        records = np.concatenate(rec_idx) if rec_idx else np.zeros(0, np.int64)
        rule_ids = np.concatenate(rule_idx) if rule_idx else np.zeros(0, np.int8)
        order = np.argsort(tags, kind="stable")
        idx = CustodianIndex(
            authorization_id=authorization_id,
            rules=rules_t,
            tags=tags[order],
            record_idx=records[order],
            rule_idx=rule_ids[order],
            tag_size=self.config.tag_size,
            build_seconds=time.perf_counter() - started,
        )
        with self._lock:
            self._indexes[cache_key] = idx
        return idx

    def kkrt_keys(self, rules: Sequence[str]) -> tuple[list[bytes], np.ndarray, np.ndarray,
                                                       np.ndarray]:
        """(keys, record index, rule index, key digests) of in-scope records for the KKRT
        engine; cached per rule set (the digests do not depend on any key)."""
        rules_t = tuple(sorted(rules))
        with self._lock:
            build_lock = self._kkrt_locks.setdefault(rules_t, threading.Lock())
        with build_lock:  # one build per rule set; concurrent sessions wait for it
            with self._lock:
                cached = self._kkrt_cache.get(rules_t)
            if cached is None:
                cached = self._build_kkrt_keys(rules_t)
                with self._lock:
                    self._kkrt_cache[rules_t] = cached
        return cached

    def _build_kkrt_keys(self, rules_t: tuple[str, ...]) -> tuple[list[bytes], np.ndarray,
                                                                 np.ndarray, np.ndarray]:
        # One pass on the worker pool: the workers digest the keys they derive.
        columns, digests = bulk_match_keys_digested(
            self.config.records, rules_t, digest_bytes, positions=self.in_scope,
            executor=self.ops.executor)
        keys: list[bytes] = []
        rec: list[np.ndarray] = []
        rule_idx: list[np.ndarray] = []
        for r_i, rule_id in enumerate(rules_t):
            column = columns.pop(rule_id)
            positions = [p for p, k in enumerate(column) if k is not None]
            keys.extend(column[p] for p in positions)
            rec.append(self.in_scope[positions])
            rule_idx.append(np.full(len(positions), r_i, dtype=np.int8))
        return (keys, np.concatenate(rec) if rec else np.zeros(0, np.int64),
                np.concatenate(rule_idx) if rule_idx else np.zeros(0, np.int8),
                np.frombuffer(b"".join(digests[r] for r in rules_t),
                              dtype=np.uint8).reshape(-1, DIGEST_SIZE))

    def prepare_named(self, authorization_id: str, rules: Sequence[str],
                      certification: Certification, session_key: bytes) -> CustodianIndex:
        """Tag index from certified elements ``c·H(y)`` (named-subject mode).

        Output for record y: Finalize(y, k'_A · c·H(y)), the same shape the requester
        gets from a reviewed token.  Records excluded by policy never enter the index.
        """
        rules_t = tuple(sorted(rules))
        cache_key = (f"named:{authorization_id}", rules_t)
        with self._lock:
            idx = self._indexes.get(cache_key)
        if idx is not None:
            return idx
        started = time.perf_counter()
        position_of = {self.config.records[i].record_id: i for i in self.in_scope.tolist()}
        all_tags: list[bytes] = []
        rec_idx: list[int] = []
        rule_idx: list[int] = []
        cert_pos: list[int] = []
        for r_i, rule_id in enumerate(rules_t):
            if rule_id not in certification.rules:
                continue
            code = certification.rules.index(rule_id)
            picks = [p for p in np.flatnonzero(certification.rule_index == code).tolist()
                     if certification.record_ids[p] in position_of]
            if not picks:
                continue
            elements = b"".join(certification.elements[p * 32:(p + 1) * 32] for p in picks)
            evaluated = self.ops.blind_evaluate(session_key, elements)
            rule = MATCH_RULES[rule_id]
            for j, p in enumerate(picks):
                rec = position_of[certification.record_ids[p]]
                key = rule.match_key(self.config.records[rec])
                if key is None:
                    continue
                out = oprf.finalize_element(key, evaluated[j * 32:(j + 1) * 32])
                all_tags.append(derive_tag(out, self.config.tag_size))
                rec_idx.append(rec)
                rule_idx.append(r_i)
                cert_pos.append(p)
        tags = np.frombuffer(b"".join(all_tags), dtype=np.dtype(f"S{self.config.tag_size}"))
        order = np.argsort(tags, kind="stable")
        idx = CustodianIndex(
            authorization_id=authorization_id, rules=rules_t, tags=tags[order],
            record_idx=np.asarray(rec_idx, dtype=np.int64)[order],
            rule_idx=np.asarray(rule_idx, dtype=np.int8)[order],
            tag_size=self.config.tag_size, build_seconds=time.perf_counter() - started,
            cert_pos=np.asarray(cert_pos, dtype=np.int64)[order],
        )
        with self._lock:
            self._indexes[cache_key] = idx
        return idx

    def session(self) -> CustodianSession:
        return CustodianSession(self)


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
        self.index: CustodianIndex | None = None
        self.evaluated = 0
        self.element_limit = 0
        self.disclosed = 0
        self._sk = b""
        self._pseudonym_key = b""
        self._index_key = b""
        self.engine = ENGINE_OPRF
        self._kkrt: KKRTCustodian | None = None
        self._kkrt_rules: tuple[str, ...] = ()
        self._kkrt_index: Any = None
        self._certification: Certification | None = None
        self.receipt: Receipt | None = None

    # -- dispatch --------------------------------------------------------------

    def handle(self, message: object, *, peer_id: str | None = None) -> object:
        """Apply one requester message; return the reply message."""
        next_state = transition(CUSTODIAN_TRANSITIONS, self.state, message, "custodian")
        try:
            if isinstance(message, OpenRequest):
                if peer_id is None:
                    raise ProtocolError("open requires the transport-authenticated peer id")
                reply: object = self._open(message, peer_id)
            elif isinstance(message, EvaluateChunk):
                reply = self._evaluate(message)
            elif isinstance(message, KKRTSetup):
                reply = self._kkrt_setup(message)
            elif isinstance(message, KKRTExtensionChunk):
                reply = self._kkrt_extend(message)
            elif isinstance(message, DisclosureRequest):
                reply = self._disclose(message)
            else:
                assert isinstance(message, CloseRequest)
                reply = self._close(message)
        except (PolicyRefusal, InvalidElementError, ProtocolError):
            if isinstance(message, OpenRequest):
                self.state = CustodianState.FAILED
            raise
        self.state = next_state
        return reply

    @property
    def authorization(self):  # -> Authorization
        if self.signed is None:
            raise ProtocolError("session is not open")
        return self.signed.authorization

    # -- steps -----------------------------------------------------------------

    def _open(self, req: OpenRequest, peer_id: str) -> OpenResponse:
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
        named = auth.mode is Mode.NAMED_SUBJECTS
        decision = decide(signed, request, cfg.policy, now=now, budget_remaining=remaining,
                          named_subjects_ready=certification is not None)
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
        self._sk = authorization_key(cfg.master_secret, auth.authorization_id)
        self._pseudonym_key = self._sk
        self.engine = req.engine
        if self.engine == ENGINE_KKRT:
            keys, rec_idx, rule_idx, digests = self.custodian.kkrt_keys(self.rules)
            self._kkrt_rules = tuple(sorted(self.rules))
            self._kkrt_index = (rec_idx, rule_idx)
            self._kkrt = KKRTCustodian(
                keys, self._sk, seed_context=kkrt_context(auth.authorization_id, req.session_id),
                digests=digests, max_units=reservation.reserved,
                # H over every record entry is the custodian's bulk of the extension; its
                # workers take it while this thread keeps up with the requester's stream
                executor=self.custodian.ops.executor)
            self.index = None
        elif named:
            # Requester elements are evaluated with k_A; the index uses k_A·d_A on the
            # certified c·H(y), matching k_A·(c·d_A·H(x)) from a reviewed token.
            assert certification is not None
            self._certification = certification
            self._index_key = custodian_session_key(self._sk, certification.binding_secret,
                                                    auth.authorization_id)
            self.index = self.custodian.prepare_named(auth.authorization_id, self.rules,
                                                      certification, self._index_key)
        else:
            self.index = self.custodian.prepare(auth.authorization_id, self.rules)
        resp = OpenResponse(
            session_id=req.session_id, authorization_id=auth.authorization_id,
            custodian_id=cfg.policy.custodian_id, match_rules=self.rules,
            disclosure_fields=self.fields, element_count=reservation.reserved,
            tag_count=(len(self.index) if self.index is not None
                       else 3 * len(self._kkrt_index[0])),
            tag_size=TAG_SIZE if self.index is None else self.index.tag_size,
            budget_remaining=ledger.budget(auth.authorization_id).remaining,
        )
        self.transcript.add("open", req)
        self.transcript.add("open", resp)
        return resp

    def tag_chunks(self, chunk_tags: int = 65_536) -> Iterator[TagChunk]:
        """The sorted tag set in bounded chunks (DESIGN §4 step 2); record order never leaks."""
        if self.state is not CustodianState.SERVING or self.index is None:
            raise ProtocolError(f"no tags in state {self.state.value!r}")
        for seq, start in enumerate(range(0, max(len(self.index), 1), chunk_tags)):
            chunk = TagChunk(seq=seq, tags=self.index.tag_bytes(start, start + chunk_tags))
            self.transcript.add("tags", chunk)
            yield chunk

    def kkrt_tag_chunks(self, chunk_tags: int = 65_536) -> Iterator[KKRTTagChunk]:
        """KKRT engine: the custodian's sorted tag sets, once the extension is complete."""
        if self.state is not CustodianState.SERVING or self._kkrt is None:
            raise ProtocolError(f"no KKRT tags in state {self.state.value!r}")
        for chunk in self._kkrt.tag_chunks(chunk_tags):
            self.transcript.add("tags", chunk)
            yield chunk

    def _kkrt_setup(self, setup: KKRTSetup) -> KKRTBaseOTReply:
        if self._kkrt is None:
            raise ProtocolError("KKRT setup in a session that runs another engine")
        if setup.units > self.element_limit:
            raise BudgetExhausted(f"KKRT setup asks for {setup.units} units; "
                                  f"{self.element_limit} were reserved")
        (reply,) = self._kkrt.handle(setup)
        self.transcript.add("evaluate", setup)
        self.transcript.add("evaluated", reply)
        return reply

    def _kkrt_extend(self, chunk: KKRTExtensionChunk) -> None:
        if self._kkrt is None:
            raise ProtocolError("KKRT extension in a session that runs another engine")
        # one bin = one unit, counted before the chunk is processed
        self.evaluated = self.custodian.config.ledger.record_evaluation(
            self.authorization.authorization_id, self.session_id, chunk.bins)
        self._kkrt.handle(chunk)
        self.transcript.add("evaluate", chunk)
        return None

    def _evaluate(self, chunk: EvaluateChunk) -> EvaluatedChunk:
        if self.engine != ENGINE_OPRF:
            raise ProtocolError("OPRF evaluation in a session that runs another engine")
        size = oprf.ELEMENT_SIZE
        if len(chunk.elements) % size:
            raise InvalidElementError(
                f"chunk {chunk.seq}: {len(chunk.elements)} bytes is not a multiple of {size}"
            )
        n = len(chunk.elements) // size
        if n == 0:
            raise ProtocolError(f"chunk {chunk.seq} is empty")
        if n > MAX_CHUNK_ELEMENTS:
            raise ProtocolError(
                f"chunk {chunk.seq} has {n} elements; the limit is {MAX_CHUNK_ELEMENTS}"
            )
        cfg = self.custodian.config
        # Count before evaluating: an evaluation never exists without its accounting.
        self.evaluated = cfg.ledger.record_evaluation(
            self.authorization.authorization_id, self.session_id, n
        )
        evaluated = self.custodian.ops.blind_evaluate(self._sk, chunk.elements)
        reply = EvaluatedChunk(seq=chunk.seq, elements=evaluated)
        self.transcript.add("evaluate", chunk)
        self.transcript.add("evaluated", reply)
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
        check_disclosure(self.signed, budget.disclosed, now=cfg.clock()).raise_if_refused()
        proof_size = DISCLOSURE_PROOF_SIZE[self.engine]
        found = self._verify_outputs([
            (i, rule_id, output) for i, (rule_id, output) in enumerate(req.outputs)
            if rule_id in self.rules and len(output) == proof_size
        ])
        verified: list[tuple[int, str, PersonRecord]] = []
        for i, (rule_id, _) in enumerate(req.outputs):
            record = found.get(i)
            if record is None:
                rejected.append(i)
            else:
                verified.append((i, rule_id, record))
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

    def _verify_outputs(self, items: Sequence[tuple[int, str, bytes]]
                        ) -> dict[int, PersonRecord]:
        """Position -> record whose OPRF output equals the presented one (constant-time).

        Only a requester that queried this exact match key can know the output; invented
        outputs and outputs from other authorizations find nothing.  The whole batch is
        checked at once: vectorized for KKRT, on the worker pool for the OPRF engine.
        """
        records = self.custodian.config.records
        if self._kkrt is not None:
            rec_idx, rule_idx = self._kkrt_index
            found = self._kkrt.find_many([parse_proof(output) for _, _, output in items])
            out: dict[int, PersonRecord] = {}
            for (i, rule_id, _), hits in zip(items, found, strict=True):
                for k in hits:
                    if self._kkrt_rules[int(rule_idx[k])] == rule_id:
                        out[i] = records[int(rec_idx[k])]
                        break
            return out
        assert self.index is not None
        # Every (presented output, candidate record) pair the tag index proposes.
        pending: list[tuple[int, bytes, PersonRecord, bytes, int]] = []
        for i, rule_id, output in items:
            for rec_i, candidate_rule, pos in self.index.lookup(
                    derive_tag(output, self.index.tag_size)):
                if candidate_rule != rule_id:
                    continue
                record = records[rec_i]
                key = MATCH_RULES[rule_id].match_key(record)
                if key is not None:
                    pending.append((i, output, record, key, pos))
        if self._certification is not None and self.index.cert_pos is not None:
            expected = []
            for _, _, _, key, pos in pending:
                p = int(self.index.cert_pos[pos])
                certified = self._certification.elements[p * 32:(p + 1) * 32]
                expected.append(oprf.finalize_element(
                    key, oprf.blind_evaluate(self._index_key, certified)))
        else:
            expected = self.custodian.ops.evaluate(self._sk, [p[3] for p in pending])
        verified: dict[int, PersonRecord] = {}
        for (i, output, record, _, _), want in zip(pending, expected, strict=True):
            if i not in verified and hmac.compare_digest(want, output):
                verified[i] = record
        return verified

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


#: (state, message type received) -> next state.
REQUESTER_TRANSITIONS: dict[tuple[RequesterState, type], RequesterState] = {
    (RequesterState.AWAIT_OPEN, OpenResponse): RequesterState.EVALUATING,
    (RequesterState.EVALUATING, TagChunk): RequesterState.EVALUATING,
    (RequesterState.EVALUATING, EvaluatedChunk): RequesterState.EVALUATING,
    (RequesterState.EVALUATING, KKRTBaseOTReply): RequesterState.EVALUATING,
    (RequesterState.EVALUATING, KKRTTagChunk): RequesterState.EVALUATING,
    (RequesterState.DISCLOSING, DisclosureResponse): RequesterState.DISCLOSING,
    (RequesterState.AWAIT_RECEIPT, Receipt): RequesterState.CLOSED,
}


@dataclass(frozen=True)
class Match:
    """A query whose tag is in the custodian's set under ``rule_id`` (local, step 4)."""

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
        OpenResponse: "_on_open", TagChunk: "_on_tags", EvaluatedChunk: "_on_evaluated",
        DisclosureResponse: "_on_disclosures", Receipt: "_on_receipt",
        KKRTBaseOTReply: "_on_kkrt", KKRTTagChunk: "_on_kkrt",
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
        engine: str = ENGINE_OPRF,
    ) -> None:
        """``tokens`` ((record id, rule) -> token) are required for a named-subject
        authorization: only subjects the authority reviewed are sent at all.
        ``engine`` is ``"oprf"`` (RFC 9497) or ``"kkrt"`` (OT-extension batched OPRF)."""
        auth = signed_authorization.authorization
        self.signed = signed_authorization
        self.rules = tuple(match_rules if match_rules is not None else auth.match_rules)
        self.fields = tuple(
            disclosure_fields if disclosure_fields is not None else auth.disclosure_fields
        )
        if not 0 < chunk_size <= MAX_CHUNK_ELEMENTS:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_ELEMENTS}")
        self.ops: GroupOps = ops or _SerialOps()
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
        if engine not in DISCLOSURE_PROOF_SIZE:
            raise ValueError(f"unknown match engine {engine!r}")
        if engine == ENGINE_KKRT and self.named:
            raise ProtocolError("named-subject authorizations run on the oprf engine")
        self.engine = engine
        executor = getattr(self.ops, "executor", None)
        people = persons_of(queries)
        self.query_ids: list[str] = (people.record_ids() if isinstance(people, CompactRecords)
                                     else [p.record_id for p in people])
        self.element_query: list[int] = []
        self.element_rule: list[int] = []
        self.element_input: list[bytes] = []
        token_parts: list[bytes] = []
        digests: dict[str, bytes] = {}
        if engine == ENGINE_KKRT:  # the workers digest the keys they just derived
            keys, digests = bulk_match_keys_digested(people, self.rules, digest_bytes,
                                                     executor=executor)
        else:
            keys = bulk_match_keys(people, self.rules, executor=executor)
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
            self.element_input.extend([column[i] for i in positions])
        self._tokens = b"".join(token_parts)
        # No worker pool for KKRT here: during the extension the requester and the
        # custodian already fill both cores, and shipping H jobs to workers measured slower.
        self._kkrt = (KKRTRequester(
            self.element_input,
            seed_context=kkrt_context(auth.authorization_id, self.session_id),
            digests=np.frombuffer(b"".join(digests[r] for r in self.rules),
                                  dtype=np.uint8).reshape(-1, DIGEST_SIZE))
                      if engine == ENGINE_KKRT else None)
        n = len(self.element_input)
        self.queries_without_key = len(self.query_ids) - len(set(self.element_query))
        self._blinds: dict[int, bytes] = {}
        self._outputs = bytearray(n * oprf.OUTPUT_SIZE)
        self._tags = bytearray(n * TAG_SIZE)
        self._evaluated_chunks: set[int] = set()
        self._custodian_tags: list[bytes] = []
        self._tag_chunks_seen = 0
        self.open_response: OpenResponse | None = None
        self.matches: list[Match] = []
        self.results: list[MatchResult] = []
        self.rejected = 0
        self.receipt: Receipt | None = None
        self._pending: dict[int, list[Match]] = {}

    @property
    def element_count(self) -> int:
        """Budget units this session asks for: elements (OPRF) or bins (KKRT)."""
        return self._kkrt.units if self._kkrt is not None else len(self.element_input)

    @property
    def chunk_count(self) -> int:
        return -(-len(self.element_input) // self.chunk_size)

    # -- dispatch --------------------------------------------------------------

    def handle(self, message: object) -> object | None:
        """Apply one custodian message; returns the countersigned Receipt for a Receipt."""
        next_state = transition(REQUESTER_TRANSITIONS, self.state, message, "requester")
        reply = getattr(self, self._HANDLERS[type(message)])(message)
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
        if resp.tag_size != TAG_SIZE:
            raise ProtocolError(f"unsupported tag size {resp.tag_size}")
        if not set(resp.match_rules) <= set(self.rules):
            raise ProtocolError("custodian granted rules that were not requested")
        self.open_response = resp
        self.transcript.add("open", resp)

    def kkrt_setup(self) -> KKRTSetup:
        """KKRT engine: base-OT setup (the custodian answers with a KKRTBaseOTReply)."""
        if self.state is not RequesterState.EVALUATING or self._kkrt is None:
            raise ProtocolError(f"kkrt_setup in state {self.state.value!r}")
        setup = self._kkrt.setup()
        self.transcript.add("evaluate", setup)
        return setup

    def kkrt_extension_chunks(self) -> Iterator[KKRTExtensionChunk]:
        """KKRT engine: the OT-extension matrix in bounded chunks."""
        if self.state is not RequesterState.EVALUATING or self._kkrt is None:
            raise ProtocolError(f"kkrt_extension_chunks in state {self.state.value!r}")
        for chunk in self._kkrt.extension_chunks():
            self.transcript.add("evaluate", chunk)
            yield chunk

    def _on_kkrt(self, message: KKRTBaseOTReply | KKRTTagChunk) -> None:
        if self._kkrt is None:
            raise ProtocolError("KKRT message in a session that runs another engine")
        self._kkrt.handle(message)
        self.transcript.add("evaluated" if isinstance(message, KKRTBaseOTReply) else "tags",
                            message)

    def evaluation_chunks(self) -> Iterator[EvaluateChunk]:
        """Blind the match keys chunk by chunk; blinds stay here until the reply arrives."""
        if self.state is not RequesterState.EVALUATING:
            raise ProtocolError(f"evaluation_chunks in state {self.state.value!r}")
        for seq in range(self.chunk_count):
            yield self.evaluation_chunk(seq)

    def evaluation_chunk(self, seq: int) -> EvaluateChunk:
        """Blind chunk ``seq`` (callable out of order so services can pipeline)."""
        start = seq * self.chunk_size
        inputs = self.element_input[start:start + self.chunk_size]
        if self.named:
            blinds, blinded = blind_tokens(self._tokens[start * 32:(start + len(inputs)) * 32])
        else:
            blinds, blinded = self.ops.blind(inputs)
        self._blinds[seq] = blinds
        chunk = EvaluateChunk(seq=seq, elements=blinded)
        self.transcript.add("evaluate", chunk)
        return chunk

    def _on_evaluated(self, chunk: EvaluatedChunk) -> None:
        blinds = self._blinds.pop(chunk.seq, None)
        if blinds is None:
            raise ProtocolError(f"evaluated chunk {chunk.seq} was not requested or is repeated")
        start = chunk.seq * self.chunk_size
        inputs = self.element_input[start:start + self.chunk_size]
        if len(chunk.elements) != len(inputs) * oprf.ELEMENT_SIZE:
            raise ProtocolError(f"evaluated chunk {chunk.seq} has the wrong length")
        outputs = self.ops.finalize(inputs, blinds, chunk.elements)
        o = oprf.OUTPUT_SIZE
        self._outputs[start * o:(start + len(outputs)) * o] = b"".join(outputs)
        self._tags[start * TAG_SIZE:(start + len(outputs)) * TAG_SIZE] = derive_tags(outputs)
        self._evaluated_chunks.add(chunk.seq)
        self.transcript.add("evaluated", chunk)

    def _on_tags(self, chunk: TagChunk) -> None:
        if chunk.seq != self._tag_chunks_seen:
            raise ProtocolError(f"tag chunk {chunk.seq} out of order")
        if len(chunk.tags) % TAG_SIZE:
            raise ProtocolError("tag chunk length is not a multiple of the tag size")
        self._custodian_tags.append(chunk.tags)
        self._tag_chunks_seen += 1
        self.transcript.add("tags", chunk)

    @property
    def tags_received(self) -> int:
        return sum(len(c) for c in self._custodian_tags) // TAG_SIZE

    def match(self) -> list[Match]:
        """Local match (step 4): queries whose tag is in the custodian's set."""
        if self.state is not RequesterState.EVALUATING or self.open_response is None:
            raise ProtocolError(f"match in state {self.state.value!r}")
        if self._kkrt is not None:
            hits = self._kkrt.matches()
            self.matches = [
                Match(query_index=self.element_query[e],
                      query_record_id=self.query_ids[self.element_query[e]],
                      rule_id=self.rules[self.element_rule[e]],
                      output=proof)
                for e, proof in zip(hits, self._kkrt.proofs(hits), strict=True)
            ]
            self.state = RequesterState.MATCHED
            return self.matches
        if len(self._evaluated_chunks) != self.chunk_count:
            raise ProtocolError(
                f"only {len(self._evaluated_chunks)} of {self.chunk_count} chunks evaluated"
            )
        if self.tags_received != self.open_response.tag_count:
            raise ProtocolError(
                f"received {self.tags_received} of {self.open_response.tag_count} tags"
            )
        dtype = np.dtype(f"S{TAG_SIZE}")
        theirs = np.sort(np.frombuffer(b"".join(self._custodian_tags), dtype=dtype))
        ours = np.frombuffer(bytes(self._tags), dtype=dtype)
        hits = np.zeros(len(ours), dtype=bool)
        if len(theirs) and len(ours):
            pos = np.searchsorted(theirs, ours)
            pos[pos >= len(theirs)] = 0
            hits = theirs[pos] == ours
        o = oprf.OUTPUT_SIZE
        self.matches = [
            Match(
                query_index=self.element_query[e],
                query_record_id=self.query_ids[self.element_query[e]],
                rule_id=self.rules[self.element_rule[e]],
                output=bytes(self._outputs[e * o:(e + 1) * o]),
            )
            for e in np.flatnonzero(hits).tolist()
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


def run_in_process(
    requester: RequesterSession, custodian: CustodianSession, *, requester_id: str,
) -> SessionOutcome:
    """Run both sides of one session in this process, no network (DESIGN §3).

    ``requester_id`` stands in for the identity the transport would authenticate.
    """
    opened = custodian.handle(requester.open_request(), peer_id=requester_id)
    requester.handle(opened)
    if requester.engine == ENGINE_KKRT:
        requester.handle(custodian.handle(requester.kkrt_setup()))
        for ext in requester.kkrt_extension_chunks():
            custodian.handle(ext)
        for kkrt_tags in custodian.kkrt_tag_chunks():
            requester.handle(kkrt_tags)
    else:
        for tags in custodian.tag_chunks():
            requester.handle(tags)
        for chunk in requester.evaluation_chunks():
            requester.handle(custodian.handle(chunk))
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
