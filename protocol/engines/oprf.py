"""The RFC 9497 OPRF engine, with named-subject mode (docs/architecture.md, Engines).

Bulk mode: the custodian streams the sorted short tags ``T = SHA-256(domain || O)[:12]``
of ``O = F(k_A, y)`` for its in-scope records; the requester blinds its match keys, the
custodian evaluates the blinded elements (one budget unit per element), the requester
finalizes to ``O = F(k_A, x)`` and matches tags locally.  At disclosure it presents
``O`` (64 bytes); the custodian looks the record up by tag and recomputes ``F(k_A, y)``.

Named-subject mode (``protocol.engines.named`` for the token math): the requester blinds
the authority's tokens instead of hashing its keys, and the custodian's tags come from
its certified elements under ``k_A · d_A``; everything else is the bulk flow.

Verifiable option (docs/architecture.md, Verifiable evaluation): when the signed
authorization pins the custodian's POPRF public key, ``F`` is RFC 9497 POPRF (mode 2) under
the custodian's long-term key with info = the authorization id, every evaluated chunk carries
one batch DLEQ proof, and the requester verifies it against the pinned key before it
finalizes anything in that chunk.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from protocol.crypto import oprf
from protocol.domain.engine import BUILTIN_ENGINE_TRAITS, Engine, EngineTraits
from protocol.domain.messages import (
    MAX_CHUNK_ELEMENTS,
    EvaluateChunk,
    EvaluatedChunk,
    OpenResponse,
    TagChunk,
)
from protocol.domain.records import MATCH_RULES
from protocol.engines.base import (
    INDEX_SLICE,
    BuildCache,
    CustodianData,
    Exchange,
    Flow,
    GroupOps,
    RequesterInputs,
    SessionGrant,
    evaluation_info,
)
from protocol.engines.named import Certification, blind_tokens, custodian_session_key
from protocol.errors import InvalidElementError, ProtocolError
from protocol.policy.decide import Mode


class EvaluationProofInvalid(ProtocolError):
    """An evaluated chunk whose proof does not verify against the pinned evaluation key.

    The custodian evaluated some element under another key (a different key mid-session,
    another authorization's, or none it can prove): the session aborts and nothing of that
    chunk is finalized (docs/architecture.md, Verifiable evaluation).
    """

    code = "evaluation_proof_invalid"


TAG_DOMAIN = b"gated-psi/tag/v1"
#: Tag length in bytes.  12 B = 96 bits: with 1.3M x 1.3M elements a false tag
#: collision has probability < 2^-55, and disclosure re-verifies the full output.
TAG_SIZE = 12


def derive_tag(output: bytes, tag_size: int = TAG_SIZE) -> bytes:
    """Short tag T = SHA-256(domain || O)[:tag_size] of an OPRF output O."""
    return hashlib.sha256(TAG_DOMAIN + output).digest()[:tag_size]


def derive_tags(outputs: Sequence[bytes], tag_size: int = TAG_SIZE) -> bytes:
    """Compact concatenation of ``derive_tag`` over many outputs."""
    sha = hashlib.sha256
    dom = TAG_DOMAIN
    return b"".join([sha(dom + o).digest()[:tag_size] for o in outputs])


class SerialOps:
    """In-process stand-in for ``adapters.pools.BatchPool`` when no pool is given."""

    executor = None  # no worker processes: everything runs in the caller

    def blind(self, inputs: Sequence[bytes]) -> tuple[bytes, bytes]:
        return oprf.blind_batch(inputs)

    def blind_evaluate(self, sk: bytes, blinded: bytes) -> bytes:
        return oprf.blind_evaluate_batch(sk, blinded)

    def finalize(self, inputs: Sequence[bytes], blinds: bytes, evaluated: bytes) -> list[bytes]:
        return oprf.finalize_batch(inputs, blinds, evaluated)

    def evaluate(self, sk: bytes, inputs: Sequence[bytes]) -> list[bytes]:
        return oprf.evaluate_batch(sk, inputs)


#: Tags first (they may stream while the evaluation runs), then blinded elements.
EXCHANGES = (
    Exchange("tags", Flow.SERVER_STREAM, sends=None, replies=TagChunk, reply_stream="tags",
             overlaps_next=True),
    Exchange("evaluate", Flow.BIDI, sends=EvaluateChunk, replies=EvaluatedChunk),
)


# --------------------------------------------------------------------------- requester


class OprfRequester:
    """Blinds elements (or named-subject tokens) chunk by chunk and matches tags locally."""

    def __init__(self, inputs: RequesterInputs) -> None:
        self.element_input = inputs.inputs
        self.chunk_size = inputs.chunk_size
        self.ops: GroupOps = inputs.ops
        self._tokens = inputs.tokens
        n = len(self.element_input)
        self._blinds: dict[int, bytes] = {}
        self._outputs = bytearray(n * oprf.OUTPUT_SIZE)
        self._tags = bytearray(n * TAG_SIZE)
        self._evaluated_chunks: set[int] = set()
        #: Chunks blinded ahead of sending (``blind_ahead``): message, blinds, blinded.
        self._ahead: dict[int, tuple[EvaluateChunk, bytes, bytes | None]] = {}
        self._custodian_tags: list[bytes] = []
        self._tag_chunks_seen = 0
        self._tag_count: int | None = None
        #: Verifiable option: the pinned key, info, and the tweaked key every proof is
        #: checked against; the blinded elements stay until their chunk's proof is checked.
        self.evaluation_key = inputs.evaluation_key
        self._info = evaluation_info(inputs.authorization_id)
        self._tweaked_key = b""
        self._blinded: dict[int, bytes] = {}
        #: Chunks whose proof verified (the summary reports it).
        self.proofs_verified = 0
        if self.evaluation_key is not None:
            self._tweaked_key = oprf.poprf_tweaked_key(self.evaluation_key, self._info)
            self.chunk_size = min(self.chunk_size, oprf.MAX_PROOF_ELEMENTS)

    @property
    def verifiable(self) -> bool:
        """Whether every evaluated chunk must carry a proof under a pinned key."""
        return self.evaluation_key is not None

    @property
    def units(self) -> int:
        return len(self.element_input)

    @property
    def chunk_count(self) -> int:
        return -(-len(self.element_input) // self.chunk_size)

    def on_open(self, opened: OpenResponse) -> None:
        if opened.tag_size != TAG_SIZE:
            raise ProtocolError(f"unsupported tag size {opened.tag_size}")
        self._tag_count = opened.tag_count

    def requests(self, exchange: Exchange) -> Iterator[object]:
        if exchange.sends is not EvaluateChunk:
            raise ProtocolError(f"the oprf engine sends no {exchange.sends!r}")
        for seq in range(self.chunk_count):
            yield self.evaluation_chunk(seq)

    def evaluation_chunk(self, seq: int) -> EvaluateChunk:
        """Blind chunk ``seq`` (unless it was blinded ahead); its blinds stay here until its
        reply arrives.  Only a chunk handed out here counts as requested."""
        ready = self._ahead.pop(seq) if seq in self._ahead else self._blind_chunk(seq)
        message, blinds, blinded = ready
        if blinded is not None:
            self._blinded[seq] = blinded
        self._blinds[seq] = blinds
        return message

    def _blind_chunk(self, seq: int) -> tuple[EvaluateChunk, bytes, bytes | None]:
        """Chunk ``seq`` blinded: the message, its blinds, and (verifiable) the blinded."""
        start = seq * self.chunk_size
        inputs = self.element_input[start:start + self.chunk_size]
        if self._tokens is not None:
            blinds, blinded = blind_tokens(self._tokens[start * 32:(start + len(inputs)) * 32])
        elif self.verifiable:
            blinds, blinded = oprf.poprf_blind_batch(inputs, executor=self.ops.executor)
        else:
            blinds, blinded = self.ops.blind(inputs)
        return (EvaluateChunk(seq=seq, elements=blinded), blinds,
                blinded if self.verifiable else None)

    def blind_ahead(self, stop: Callable[[], bool]) -> int:
        """Blind chunks in sending order until ``stop()`` is true or all are; returns how many.

        Why: blinding needs nothing from the custodian, so the requester can do it while
        the custodian opens the session (checks policy, reserves budget, builds its tag
        index) instead of leaving its cores idle (docs/architecture.md, Engines).  Nothing
        is sent or counted as requested here: a chunk becomes requested only when
        :meth:`evaluation_chunk` hands it out, so a reply to a chunk blinded ahead but
        never sent is still refused.  Not thread-safe against ``evaluation_chunk``: the
        caller stops this before the exchanges start.
        """
        done = 0
        for seq in range(self.chunk_count):
            if stop():
                break
            if seq not in self._ahead and seq not in self._blinds:
                self._ahead[seq] = self._blind_chunk(seq)
            done += 1
        return done

    def handle(self, message: object) -> None:
        if isinstance(message, EvaluatedChunk):
            self._on_evaluated(message)
        elif isinstance(message, TagChunk):
            self._on_tags(message)
        else:
            raise ProtocolError(f"the oprf engine cannot accept {type(message).__name__}")

    def _on_evaluated(self, chunk: EvaluatedChunk) -> None:
        blinds = self._blinds.pop(chunk.seq, None)
        if blinds is None:
            raise ProtocolError(f"evaluated chunk {chunk.seq} was not requested or is repeated")
        start = chunk.seq * self.chunk_size
        inputs = self.element_input[start:start + self.chunk_size]
        if len(chunk.elements) != len(inputs) * oprf.ELEMENT_SIZE:
            raise ProtocolError(f"evaluated chunk {chunk.seq} has the wrong length")
        if self.verifiable:
            outputs = self._verified_outputs(chunk, inputs, blinds)
        elif chunk.proof:
            raise ProtocolError(f"evaluated chunk {chunk.seq} carries a proof, but the "
                                "authorization pins no evaluation key")
        else:
            outputs = self.ops.finalize(inputs, blinds, chunk.elements)
        o = oprf.OUTPUT_SIZE
        self._outputs[start * o:(start + len(outputs)) * o] = b"".join(outputs)
        self._tags[start * TAG_SIZE:(start + len(outputs)) * TAG_SIZE] = derive_tags(outputs)
        self._evaluated_chunks.add(chunk.seq)

    def _verified_outputs(self, chunk: EvaluatedChunk, inputs: Sequence[bytes], blinds: bytes
                          ) -> list[bytes]:
        """Finalize a chunk only after its proof verifies against the pinned key."""
        blinded = self._blinded.pop(chunk.seq)
        pinned = self.evaluation_key.hex()[:16] if self.evaluation_key else ""
        if len(chunk.proof) != oprf.PROOF_SIZE:
            raise EvaluationProofInvalid(
                f"evaluated chunk {chunk.seq} carries a {len(chunk.proof)}-byte proof, not the "
                f"{oprf.PROOF_SIZE}-byte proof the pinned evaluation key {pinned}... requires; "
                "nothing of it was finalized")
        try:
            if self._tokens is None:
                return self._count_verified(oprf.poprf_finalize_batch(
                    inputs, blinds, chunk.elements, blinded, chunk.proof, self._info,
                    self._tweaked_key, executor=self.ops.executor))
            # Named subjects: the proof covers the tokens' evaluation under t^-1; the outputs
            # are then finalized as the certified index's are (Finalize over k·token).
            if not oprf.poprf_verify(self._tweaked_key, oprf.split_elements(blinded),
                                     oprf.split_elements(chunk.elements), chunk.proof,
                                     executor=self.ops.executor):
                raise oprf.VerifyError("the evaluation proof does not verify")
        except oprf.VerifyError:
            raise EvaluationProofInvalid(
                f"the proof of evaluated chunk {chunk.seq} does not verify against the pinned "
                f"evaluation key {pinned}... under authorization info {self._info.decode()!r}: "
                "some element was evaluated under another key; nothing of it was finalized"
            ) from None
        return self._count_verified(self.ops.finalize(inputs, blinds, chunk.elements))

    def _count_verified(self, outputs: list[bytes]) -> list[bytes]:
        self.proofs_verified += 1
        return outputs

    def _on_tags(self, chunk: TagChunk) -> None:
        if chunk.seq != self._tag_chunks_seen:
            raise ProtocolError(f"tag chunk {chunk.seq} out of order")
        if len(chunk.tags) % TAG_SIZE:
            raise ProtocolError("tag chunk length is not a multiple of the tag size")
        self._custodian_tags.append(chunk.tags)
        self._tag_chunks_seen += 1

    @property
    def tags_received(self) -> int:
        return sum(len(c) for c in self._custodian_tags) // TAG_SIZE

    def match(self) -> list[int]:
        if len(self._evaluated_chunks) != self.chunk_count:
            raise ProtocolError(
                f"only {len(self._evaluated_chunks)} of {self.chunk_count} chunks evaluated"
            )
        if self.tags_received != self._tag_count:
            raise ProtocolError(f"received {self.tags_received} of {self._tag_count} tags")
        dtype = np.dtype(f"S{TAG_SIZE}")
        theirs = np.sort(np.frombuffer(b"".join(self._custodian_tags), dtype=dtype))
        ours = np.frombuffer(bytes(self._tags), dtype=dtype)
        hits = np.zeros(len(ours), dtype=bool)
        if len(theirs) and len(ours):
            pos = np.searchsorted(theirs, ours)
            pos[pos >= len(theirs)] = 0
            hits = theirs[pos] == ours
        result: list[int] = np.flatnonzero(hits).tolist()
        return result

    def proofs(self, elements: Sequence[int]) -> list[bytes]:
        """The OPRF outputs themselves: only a requester that queried the key knows them."""
        o = oprf.OUTPUT_SIZE
        return [bytes(self._outputs[e * o:(e + 1) * o]) for e in elements]

    def custodian_entries(self, tag_count: int) -> int:
        return tag_count  # one tag per (record, rule) entry


# --------------------------------------------------------------------------- custodian


@dataclass
class CustodianIndex:
    """Sorted tag set of the custodian's in-scope records under one authorization key.

    Kept as compact numpy arrays (never per-record Python objects) so 1.3M
    records fit comfortably in memory and lookups are a binary search.
    """

    authorization_id: str
    rules: tuple[str, ...]
    tags: np.ndarray  # dtype S<tag_size>, sorted
    record_idx: np.ndarray  # int64, index into the custodian's records
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


class OprfCustodian:
    """Tag indexes of the custodian's records, cached per (authorization, rules).

    A custodian can build one ahead of time (``index``) and serve several sessions of
    the same authorization from it.
    """

    def __init__(self, data: CustodianData) -> None:
        self.data = data
        self._indexes: BuildCache[tuple[str, tuple[str, ...]], CustodianIndex] = BuildCache(
            data.new_lock)

    def prepare(self, rules: Sequence[str]) -> None:
        """Nothing: every tag depends on the authorization key, so indexes are built at open."""
        return None

    def open(self, grant: SessionGrant) -> OprfCustodianSession:
        return OprfCustodianSession(self, grant)

    def index(self, authorization_id: str, rules: Sequence[str], key: bytes,
              evaluation_secret: bytes | None = None) -> CustodianIndex:
        """Build (or fetch) the tag index for an authorization under its key ``key``.

        With ``evaluation_secret`` (a pinned key) the tags are POPRF outputs under it with
        info = the authorization id, the same function the requester's proofs pin.
        """
        rules_t = tuple(sorted(rules))
        if evaluation_secret is not None:
            info = evaluation_info(authorization_id)
            executor = self.data.ops.executor

            def poprf(_: bytes, inputs: Sequence[bytes]) -> list[bytes]:
                return oprf.poprf_evaluate_batch(evaluation_secret, inputs, info,
                                                 executor=executor)
            return self._indexes.get(
                (f"poprf:{authorization_id}", rules_t),
                lambda: self._build_index(authorization_id, rules_t, key, poprf))
        return self._indexes.get((authorization_id, rules_t),
                                 lambda: self._build_index(authorization_id, rules_t, key))

    def _build_index(self, authorization_id: str, rules_t: tuple[str, ...], key: bytes,
                     evaluate: Callable[..., list[bytes]] | None = None
                     ) -> CustodianIndex:
        started = time.perf_counter()
        data = self.data
        all_tags: list[bytes] = []
        rec_idx: list[np.ndarray] = []
        rule_idx: list[np.ndarray] = []
        step = INDEX_SLICE
        evaluate = evaluate or data.ops.evaluate
        for r_i, rule_id in enumerate(rules_t):
            for start in range(0, len(data.in_scope), step):
                keys = data.match_keys(rule_id, start, start + step)
                positions = [p for p, k in enumerate(keys) if k is not None]
                inputs = [keys[p] for p in positions]
                outputs = evaluate(key, inputs) if inputs else []
                all_tags.append(derive_tags(outputs, data.tag_size))
                rec_idx.append(data.in_scope[start:start + step][positions])
                rule_idx.append(np.full(len(positions), r_i, dtype=np.int8))
        dtype = np.dtype(f"S{data.tag_size}")
        tags = np.frombuffer(b"".join(all_tags), dtype=dtype)
        records = np.concatenate(rec_idx) if rec_idx else np.zeros(0, np.int64)
        rule_ids = np.concatenate(rule_idx) if rule_idx else np.zeros(0, np.int8)
        order = np.argsort(tags, kind="stable")
        return CustodianIndex(
            authorization_id=authorization_id,
            rules=rules_t,
            tags=tags[order],
            record_idx=records[order],
            rule_idx=rule_ids[order],
            tag_size=data.tag_size,
            build_seconds=time.perf_counter() - started,
        )

    def named_index(self, authorization_id: str, rules: Sequence[str],
                    certification: Certification, session_key: bytes) -> CustodianIndex:
        """Tag index from certified elements ``c·H(y)`` (named-subject mode).

        Output for record y: Finalize(y, k'_A · c·H(y)), the same shape the requester
        gets from a reviewed token.  Records excluded by policy never enter the index.
        """
        rules_t = tuple(sorted(rules))
        return self._indexes.get(
            (f"named:{authorization_id}", rules_t),
            lambda: self._build_named_index(authorization_id, rules_t, certification,
                                            session_key))

    def _build_named_index(self, authorization_id: str, rules_t: tuple[str, ...],
                           certification: Certification, session_key: bytes
                           ) -> CustodianIndex:
        started = time.perf_counter()
        data = self.data
        position_of = {data.records[i].record_id: i for i in data.in_scope.tolist()}
        today = data.today()
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
            evaluated = data.ops.blind_evaluate(session_key, elements)
            rule = MATCH_RULES[rule_id]
            for j, p in enumerate(picks):
                rec = position_of[certification.record_ids[p]]
                key = rule.match_key(data.records[rec], today=today)
                if key is None:
                    continue
                out = oprf.finalize_element(key, evaluated[j * 32:(j + 1) * 32])
                all_tags.append(derive_tag(out, data.tag_size))
                rec_idx.append(rec)
                rule_idx.append(r_i)
                cert_pos.append(p)
        tags = np.frombuffer(b"".join(all_tags), dtype=np.dtype(f"S{data.tag_size}"))
        order = np.argsort(tags, kind="stable")
        return CustodianIndex(
            authorization_id=authorization_id, rules=rules_t, tags=tags[order],
            record_idx=np.asarray(rec_idx, dtype=np.int64)[order],
            rule_idx=np.asarray(rule_idx, dtype=np.int8)[order],
            tag_size=data.tag_size, build_seconds=time.perf_counter() - started,
            cert_pos=np.asarray(cert_pos, dtype=np.int64)[order],
        )


class OprfCustodianSession:
    """Serves one session's tags, evaluates its blinded elements and checks its outputs."""

    def __init__(self, owner: OprfCustodian, grant: SessionGrant) -> None:
        self.data = owner.data
        self._sk = grant.key
        self._certification: Certification | None = None
        self._index_key = b""
        #: Verifiable option: the long-term POPRF secret, this authorization's info, and
        #: t^-1 (the scalar every blinded element is multiplied by).
        self._evaluation_secret = grant.evaluation_secret
        self._info = evaluation_info(grant.authorization_id)
        if self._evaluation_secret is not None:
            # Under a pinned key the requester's elements are multiplied by t^-1 (POPRF with
            # info = the authorization id), which the per-chunk proof pins.
            self._sk = oprf.poprf_evaluation_key(self._evaluation_secret, self._info)
        if self._evaluation_secret is not None and grant.mode is not Mode.NAMED_SUBJECTS:
            self.index = owner.index(grant.authorization_id, grant.rules, grant.key,
                                     self._evaluation_secret)
        elif grant.mode is Mode.NAMED_SUBJECTS:
            # Requester elements are evaluated with k_A (t^-1 under a pinned key); the index
            # uses k_A·d_A on the certified c·H(y), matching k_A·(c·d_A·H(x)) from a token.
            if grant.certification is None:
                raise ProtocolError("a named-subject session needs the custodian's certification")
            self._certification = grant.certification
            self._index_key = custodian_session_key(
                self._sk, grant.certification.binding_secret, grant.authorization_id)
            self.index = owner.named_index(grant.authorization_id, grant.rules,
                                           grant.certification, self._index_key)
        else:
            self.index = owner.index(grant.authorization_id, grant.rules, grant.key)

    @property
    def tag_count(self) -> int:
        return len(self.index)

    @property
    def tag_size(self) -> int:
        return self.index.tag_size

    @property
    def proof_size(self) -> int:
        return oprf.OUTPUT_SIZE

    def cost(self, message: object) -> int:
        if not isinstance(message, EvaluateChunk):
            raise ProtocolError(f"the oprf engine cannot accept {type(message).__name__}")
        size = oprf.ELEMENT_SIZE
        if len(message.elements) % size:
            raise InvalidElementError(
                f"chunk {message.seq}: {len(message.elements)} bytes is not a multiple of {size}"
            )
        n = len(message.elements) // size
        if n == 0:
            raise ProtocolError(f"chunk {message.seq} is empty")
        if self._evaluation_secret is not None and n > oprf.MAX_PROOF_ELEMENTS:
            raise ProtocolError(
                f"chunk {message.seq} has {n} elements; one proof covers at most "
                f"{oprf.MAX_PROOF_ELEMENTS} (RFC 9497 composite index)")
        if n > MAX_CHUNK_ELEMENTS:
            raise ProtocolError(
                f"chunk {message.seq} has {n} elements; the limit is {MAX_CHUNK_ELEMENTS}"
            )
        return n

    def evaluate(self, message: object) -> EvaluatedChunk:
        assert isinstance(message, EvaluateChunk)  # cost() accepted it
        evaluated = self.data.ops.blind_evaluate(self._sk, message.elements)
        if self._evaluation_secret is None:
            return EvaluatedChunk(seq=message.seq, elements=evaluated)
        # blind_evaluate validated every blinded element; the proof covers them all at once
        proof = oprf.poprf_prove(
            self._evaluation_secret, self._info, oprf.split_elements(message.elements),
            oprf.split_elements(evaluated), executor=self.data.ops.executor)
        return EvaluatedChunk(seq=message.seq, elements=evaluated, proof=proof)

    def tag_chunks(self, chunk_tags: int) -> Iterator[TagChunk]:
        """The sorted tag set in bounded chunks; record order never leaks."""
        for seq, start in enumerate(range(0, max(len(self.index), 1), chunk_tags)):
            yield TagChunk(seq=seq, tags=self.index.tag_bytes(start, start + chunk_tags))

    def verify(self, items: Sequence[tuple[int, str, bytes]]) -> dict[int, tuple[int, ...]]:
        """Position -> every record whose OPRF output equals the presented one (constant-time).

        Only a requester that queried this exact match key can know the output; invented
        outputs and outputs from other authorizations find nothing.  A key held by several
        records verifies for each of them (docs/architecture.md, Shared keys).  The whole
        batch is evaluated at once on the worker pool.
        """
        records = self.data.records
        today = self.data.today()
        # Every (presented output, candidate record) pair the tag index proposes.
        pending: list[tuple[int, bytes, int, bytes, int]] = []
        for i, rule_id, output in items:
            for rec_i, candidate_rule, pos in self.index.lookup(
                    derive_tag(output, self.index.tag_size)):
                if candidate_rule != rule_id:
                    continue
                key = MATCH_RULES[rule_id].match_key(records[rec_i], today=today)
                if key is not None:
                    pending.append((i, output, rec_i, key, pos))
        if self._certification is not None and self.index.cert_pos is not None:
            expected = []
            for _, _, _, key, pos in pending:
                p = int(self.index.cert_pos[pos])
                certified = self._certification.elements[p * 32:(p + 1) * 32]
                expected.append(oprf.finalize_element(
                    key, oprf.blind_evaluate(self._index_key, certified)))
        elif self._evaluation_secret is not None:
            expected = oprf.poprf_evaluate_batch(
                self._evaluation_secret, [p[3] for p in pending], self._info,
                executor=self.data.ops.executor)
        else:
            expected = self.data.ops.evaluate(self._sk, [p[3] for p in pending])
        verified: dict[int, list[int]] = {}
        for (i, output, rec_i, _, _), want in zip(pending, expected, strict=True):
            if hmac.compare_digest(want, output):
                verified.setdefault(i, []).append(rec_i)
        return {i: tuple(sorted(set(rows))) for i, rows in verified.items()}


# --------------------------------------------------------------------------- engine


class OprfEngine:
    """The RFC 9497 engine as the registry holds it."""

    name: str = Engine.OPRF
    traits: EngineTraits = BUILTIN_ENGINE_TRAITS[Engine.OPRF]
    exchanges: tuple[Exchange, ...] = EXCHANGES
    key_digest: Callable[[Sequence[bytes]], bytes] | None = None

    def requester(self, inputs: RequesterInputs) -> OprfRequester:
        return OprfRequester(inputs)

    def custodian(self, data: CustodianData) -> OprfCustodian:
        return OprfCustodian(data)
