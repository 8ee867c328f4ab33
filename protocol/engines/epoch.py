"""The key-epoch OPRF engine of the national custodian (docs/architecture.md, National custodian).

The custodian evaluates its records once per key epoch, offline, under the epoch key
``k_E = DeriveKeyPair(master, "gated-psi/epoch-key/v1:" || epoch id)`` and publishes the
epoch's tag set: per rule, the sorted ``L``-bit fingerprints of the outputs, Golomb-coded
(``protocol.crypto.tagset``).  Per authorization the online work follows the requester:

1. the requester blinds its match keys, the custodian validates and evaluates every
   blinded element under ``k_E`` (one budget unit each, counted exactly as the ``oprf``
   engine does) and *stores* the evaluated chunk's blinded elements, bounded by the
   session's reservation (``SessionGrant.evaluations``);
2. the requester finalizes, fingerprints its outputs and merges them with the tag set it
   fetched once for the epoch (``FetchTagSet``, accounted) as a stream;
3. each disclosure presents ``(chunk, index, blind r, output y)``: the custodian takes its
   stored blinded element ``B`` of that chunk and index in *this* session, looks up the
   candidate rows of ``fingerprint(y)`` in its index and accepts only a row whose key ``x``
   gives ``r · H(x) == B`` (equivalently ``r^-1 · (k_E · B) == k_E · H(x)``) and
   ``y == Finalize(x, k_E · H(x))``, both compared in constant time.  So every disclosure
   is bound to an evaluation counted under the presenting authorization's session: an
   output learned in another session, another authorization, or not by evaluation at all,
   is refused.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.crypto import oprf, tagset
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
    CustodianData,
    EpochTagSet,
    EvaluationStore,
    Exchange,
    Flow,
    GroupOps,
    RequesterInputs,
    SessionGrant,
    records_at,
)
from protocol.errors import InvalidElementError, ProtocolError

#: A disclosure proof: chunk seq (4 B), index in the chunk (4 B), blind r, output y.
PROOF_SIZE = 8 + oprf.SCALAR_SIZE + oprf.OUTPUT_SIZE

@dataclass(frozen=True)
class TagSetRequest:
    """Ask for the current epoch's tag set of ``match_rules`` under a signed authorization.

    ``known_epoch_id``: the epoch the requester has cached; if it is current, the custodian
    answers with headers only (``unchanged``) and nothing is sent or accounted.
    """

    signed_authorization: bytes
    match_rules: tuple[str, ...]
    known_epoch_id: str = ""


@dataclass(frozen=True)
class TagSetChunk:
    """One Golomb-Rice chunk of a rule's tag set, with the epoch's header fields."""

    epoch_id: str
    bits: int
    rule_id: str
    rule_tags: int
    chunk: bytes = b""
    unchanged: bool = False


#: No tag stream in the session: the tag set is fetched once per epoch, outside it.
EXCHANGES = (Exchange("evaluate", Flow.BIDI, sends=EvaluateChunk, replies=EvaluatedChunk),)


def encode_proof(seq: int, index: int, blind: bytes, output: bytes) -> bytes:
    """The disclosure proof of one evaluated element (see the module docstring)."""
    return seq.to_bytes(4, "big") + index.to_bytes(4, "big") + blind + output


def decode_proof(proof: bytes) -> tuple[int, int, bytes, bytes]:
    """``(seq, index, blind, output)`` of a proof of exactly ``PROOF_SIZE`` bytes."""
    if len(proof) != PROOF_SIZE:
        raise ProtocolError(f"an epoch disclosure proof has {PROOF_SIZE} bytes, got {len(proof)}")
    s = oprf.SCALAR_SIZE
    return (int.from_bytes(proof[:4], "big"), int.from_bytes(proof[4:8], "big"),
            proof[8:8 + s], proof[8 + s:])


# --------------------------------------------------------------------------- requester


class EpochRequester:
    """Blinds, finalizes, and merges fingerprints with the epoch's tag set as a stream."""

    def __init__(self, inputs: RequesterInputs) -> None:
        if inputs.tokens is not None:
            raise ProtocolError("the oprf-epoch engine takes match keys, not named-subject tokens")
        if len(inputs.element_rules) != len(inputs.inputs):
            raise ProtocolError("the oprf-epoch engine needs the rule of every element")
        self._tagset = inputs.tagset
        self.element_input = inputs.inputs
        self.element_rules = inputs.element_rules
        self.chunk_size = inputs.chunk_size
        self.ops: GroupOps = inputs.ops
        n = len(self.element_input)
        self._pending: dict[int, bytes] = {}  # seq -> blinds, until its reply arrives
        self._blinds = bytearray(n * oprf.SCALAR_SIZE)
        self._outputs = bytearray(n * oprf.OUTPUT_SIZE)
        self._evaluated_chunks: set[int] = set()
        self._rules: tuple[str, ...] = ()
        # each output's fingerprint, taken as its chunk arrives (while later chunks are
        # still being evaluated), so the match after the last chunk only sorts and merges
        self._fingerprints = np.empty(n, dtype=tagset.FP_DTYPE)

    @property
    def units(self) -> int:
        return len(self.element_input)

    @property
    def chunk_count(self) -> int:
        return -(-len(self.element_input) // self.chunk_size)

    @property
    def tagset(self) -> EpochTagSet:
        """The epoch's tag set this requester matches against (refused if none was given)."""
        if self._tagset is None:
            raise ProtocolError("the oprf-epoch engine needs the custodian's epoch tag set "
                                "(RequesterSession(..., tagset=...); fetch it with FetchTagSet)")
        return self._tagset

    def on_open(self, opened: OpenResponse) -> None:
        """The grant must be for this epoch's tag set: same fingerprint length, same counts."""
        tags = self.tagset
        missing = set(opened.match_rules) - set(tags.rules)
        if missing:
            raise ProtocolError(f"epoch {tags.epoch_id} tag set has no rule {sorted(missing)}")
        if opened.tag_size != tags.bits:
            raise ProtocolError(f"custodian grants {opened.tag_size}-bit fingerprints; the "
                                f"cached tag set of epoch {tags.epoch_id} has {tags.bits}")
        expected = sum(tags.tags(r) for r in opened.match_rules)
        if opened.tag_count != expected:
            raise ProtocolError(f"custodian grants {opened.tag_count} tags; the cached tag set "
                                f"of epoch {tags.epoch_id} has {expected} (a stale epoch?)")
        self._rules = tuple(opened.match_rules)

    def requests(self, exchange: Exchange) -> Iterator[object]:
        if exchange.sends is not EvaluateChunk:
            raise ProtocolError(f"the oprf-epoch engine sends no {exchange.sends!r}")
        for seq in range(self.chunk_count):
            start = seq * self.chunk_size
            blinds, blinded = self.ops.blind(self.element_input[start:start + self.chunk_size])
            self._pending[seq] = blinds
            yield EvaluateChunk(seq=seq, elements=blinded)

    def handle(self, message: object) -> None:
        if not isinstance(message, EvaluatedChunk):
            raise ProtocolError(f"the oprf-epoch engine cannot accept {type(message).__name__}")
        blinds = self._pending.pop(message.seq, None)
        if blinds is None:
            raise ProtocolError(f"evaluated chunk {message.seq} was not requested or is repeated")
        start = message.seq * self.chunk_size
        inputs = self.element_input[start:start + self.chunk_size]
        if len(message.elements) != len(inputs) * oprf.ELEMENT_SIZE:
            raise ProtocolError(f"evaluated chunk {message.seq} has the wrong length")
        outputs = self.ops.finalize(inputs, blinds, message.elements)
        o, s = oprf.OUTPUT_SIZE, oprf.SCALAR_SIZE
        self._outputs[start * o:(start + len(outputs)) * o] = b"".join(outputs)
        self._blinds[start * s:(start + len(outputs)) * s] = blinds
        self._fingerprint(start, outputs)
        self._evaluated_chunks.add(message.seq)

    def _fingerprint(self, start: int, outputs: Sequence[bytes]) -> None:
        """Fingerprints of one evaluated chunk, rule by rule (the rule is in the hash)."""
        tags = self.tagset
        rules = self.element_rules[start:start + len(outputs)]
        for rule_id in dict.fromkeys(rules):
            at = [j for j, r in enumerate(rules) if r == rule_id]
            self._fingerprints[[start + j for j in at]] = tagset.fingerprints(
                [outputs[j] for j in at], epoch_id=tags.epoch_id, rule_id=rule_id,
                bits=tags.bits)

    def output(self, element: int) -> bytes:
        o = oprf.OUTPUT_SIZE
        return bytes(self._outputs[element * o:(element + 1) * o])

    def match(self) -> list[int]:
        """Positions whose fingerprint is in the epoch's tag set of their rule.

        One rule at a time: the requester's fingerprints (taken chunk by chunk in
        :meth:`handle`) are sorted in memory (they are the small side), the custodian's are
        decoded chunk by chunk and merged.
        """
        if len(self._evaluated_chunks) != self.chunk_count:
            raise ProtocolError(
                f"only {len(self._evaluated_chunks)} of {self.chunk_count} chunks evaluated")
        tags = self.tagset
        hits: list[int] = []
        rules = np.asarray(self.element_rules, dtype=object)
        for rule_id in dict.fromkeys(self.element_rules):
            positions = np.flatnonzero(rules == rule_id)
            ours, order = tagset.sort_with_positions(self._fingerprints[positions])
            blocks = tagset.decode_chunks(tags.tagset_chunks(rule_id), bits=tags.bits,
                                          max_tags=tags.tags(rule_id))
            hits.extend(pos for pos, _fp in tagset.merge_matches(ours, positions[order], blocks))
        return sorted(set(hits))

    def proofs(self, elements: Sequence[int]) -> list[bytes]:
        """(chunk, index, blind, output) per element: binds it to its counted evaluation."""
        s = oprf.SCALAR_SIZE
        return [encode_proof(e // self.chunk_size, e % self.chunk_size,
                             bytes(self._blinds[e * s:(e + 1) * s]), self.output(e))
                for e in elements]

    def custodian_entries(self, tag_count: int) -> int:
        return tag_count  # one tag per (record, rule) entry of the epoch


# --------------------------------------------------------------------------- custodian


class EpochCustodian:
    """The custodian's epoch index, shared by every session of the epoch."""

    def __init__(self, data: CustodianData) -> None:
        self.data = data

    def prepare(self, rules: Sequence[str]) -> None:
        """Nothing: the epoch index was built offline (``agency-b build-index``)."""
        return None

    def open(self, grant: SessionGrant) -> EpochCustodianSession:
        return EpochCustodianSession(self.data, grant)


class EpochCustodianSession:
    """Evaluates and stores a session's blinded elements; verifies bound disclosures.

    Costs and evaluates like the ``oprf`` engine's base mode (one unit per validated
    element), under the epoch key instead of the authorization's.
    """

    def __init__(self, data: CustodianData, grant: SessionGrant) -> None:
        index = data.epoch_index
        if index is None or data.epoch_key is None:
            raise ProtocolError("this custodian serves no epoch index (agency-b serve "
                                "--epoch-index DIR, with index_mode 'epoch' in its policy)")
        if grant.evaluations is None:
            raise ProtocolError("an oprf-epoch session needs the store of its evaluations")
        missing = set(grant.rules) - set(index.rules)
        if missing:
            raise ProtocolError(f"epoch {index.epoch_id} index has no rule {sorted(missing)}")
        self.data = data
        self.epoch_index: Any = index
        self._sk = data.epoch_key
        self._grant = grant
        self._evaluations: EvaluationStore = grant.evaluations

    @property
    def tag_count(self) -> int:
        return sum(int(self.epoch_index.tags(r)) for r in self._grant.rules)

    @property
    def tag_size(self) -> int:
        """The fingerprint length in bits (the requester checks its cached tag set)."""
        return int(self.epoch_index.bits)

    @property
    def proof_size(self) -> int:
        return PROOF_SIZE

    def cost(self, message: object) -> int:
        """One unit per blinded element; the chunk's shape is checked before anything else."""
        if not isinstance(message, EvaluateChunk):
            raise ProtocolError(f"the oprf-epoch engine cannot accept {type(message).__name__}")
        size = oprf.ELEMENT_SIZE
        n, extra = divmod(len(message.elements), size)
        if extra:
            raise InvalidElementError(f"chunk {message.seq}: {len(message.elements)} bytes is "
                                      f"not a multiple of {size}")
        if not 0 < n <= MAX_CHUNK_ELEMENTS:
            raise ProtocolError(f"chunk {message.seq} has {n} elements; a chunk has 1 to "
                                f"{MAX_CHUNK_ELEMENTS}")
        return n

    def evaluate(self, message: object) -> EvaluatedChunk:
        """Evaluate (validating every element), then store the blinded elements durably
        before the reply leaves; the session counts them right after."""
        assert isinstance(message, EvaluateChunk)  # cost() accepted it
        evaluated = self.data.ops.blind_evaluate(self._sk, message.elements)
        self._evaluations.store(message.seq, message.elements)
        return EvaluatedChunk(seq=message.seq, elements=evaluated)

    def tag_chunks(self, chunk_tags: int) -> Iterator[TagChunk]:
        """None in the session: the tag set is fetched once per epoch (``FetchTagSet``)."""
        return iter(())

    def verify(self, items: Sequence[tuple[int, str, bytes]]) -> dict[int, tuple[int, ...]]:
        """Position -> every record row of the proofs bound to this session's evaluations."""
        return self._verify(items)[0]

    def verify_one(self, rule_id: str, proof: bytes) -> tuple[int | None, str]:
        """``(row, "")`` for a proof that holds, else ``(None, why)`` (for tests and logs);
        of a key several records hold, the first row."""
        verified, why = self._verify([(0, rule_id, proof)])
        rows = verified.get(0)
        return (rows[0] if rows else None), why.get(0, "")

    def _verify(self, items: Sequence[tuple[int, str, bytes]]
                ) -> tuple[dict[int, tuple[int, ...]], dict[int, str]]:
        """The binding check of a batch (see the module docstring): verified rows, and why
        each other proof failed.

        The check is ``r · H(x) == B`` (the counted blinded element was this key under
        this blind) and ``y == Finalize(x, k_E · H(x))``.  In a group of prime order with
        ``r != 0`` the first is equivalent to ``r^-1 · (k_E · B) == k_E · H(x)`` and needs
        one scalar multiplication and one inversion fewer per proof.  Batched: the candidates'
        ``k_E · H(x)`` go through ``k_E`` in one call (on the worker pool when the custodian
        has one) and the candidate records are read in one go (out of core: one read per
        row group); what remains per candidate is ``r · H(x)`` and the comparisons.
        """
        index, sid, size = self.epoch_index, self._grant.session_id, oprf.ELEMENT_SIZE
        why: dict[int, str] = {}
        chunks: dict[int, bytes | None] = {}
        # (position, rule, stored element B, blind r, output y)
        held: list[tuple[int, str, bytes, bytes, bytes]] = []
        for i, rule_id, proof in items:
            seq, at, blind, output = decode_proof(proof)
            if seq not in chunks:
                chunks[seq] = self._evaluations.load(seq)
            chunk = chunks[seq]
            if chunk is None or (at + 1) * size > len(chunk):
                why[i] = f"no evaluation {seq}/{at} was counted in session {sid}"
                continue
            try:
                blind = oprf.deserialize_scalar(blind)  # refuses zero and non-canonical
            except InvalidElementError as exc:
                why[i] = f"invalid blind: {exc}"
                continue
            why[i] = (f"evaluation {seq}/{at} of session {sid} with this blind does not give "
                      "the presented output for any record")
            held.append((i, rule_id, chunk[at * size:(at + 1) * size], blind, output))
        if not held:
            return {}, why
        # candidate rows of each output's fingerprint, one index lookup per rule
        candidates: list[list[int]] = [[] for _ in held]
        for rule_id in dict.fromkeys(h[1] for h in held):
            mine = [j for j, h in enumerate(held) if h[1] == rule_id]
            fps = tagset.fingerprints([held[j][4] for j in mine], epoch_id=index.epoch_id,
                                      rule_id=rule_id, bits=index.bits)
            for j, rows_of in zip(mine, index.rows_for_many(rule_id, fps), strict=True):
                candidates[j] = [int(r) for r in rows_of]
        parsed = [(*h, c) for h, c in zip(held, candidates, strict=True)]
        today = self.data.today()
        rows = sorted({r for p in parsed for r in p[5]})
        records = dict(zip(rows, records_at(self.data.records, rows), strict=True))
        excluded = self.data.excluded_record_classes
        # (position, row, key x, H(x), stored B, blind r, output y)
        pending: list[tuple[int, int, bytes, bytes, bytes, bytes, bytes]] = []
        for i, rule_id, stored, blind, output, candidate_rows in parsed:
            rule = MATCH_RULES[rule_id]
            for row in candidate_rows:
                key = rule.match_key(records[row], today=today)
                if key is not None and records[row].record_class not in excluded:
                    pending.append((i, row, key, oprf.hash_to_group(key), stored, blind, output))
        if not pending:
            return {}, why
        # k_E · H(x) of every candidate key, in one batch
        issued = self.data.ops.blind_evaluate(self._sk, b"".join(p[3] for p in pending))
        verified: dict[int, list[int]] = {}
        for j, (i, row, key, element, stored, blind, output) in enumerate(pending):
            same_element = hmac.compare_digest(oprf.blind_evaluate(blind, element), stored)
            same_output = hmac.compare_digest(
                oprf.finalize_element(key, issued[j * size:(j + 1) * size]), output)
            if same_element and same_output:  # every holder of the key (Shared keys)
                verified.setdefault(i, []).append(row)
                why.pop(i, None)
        return {i: tuple(sorted(set(rows))) for i, rows in verified.items()}, why


# --------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class EpochEngine:
    """The key-epoch engine as the registry holds it."""

    name: str = Engine.OPRF_EPOCH
    traits: EngineTraits = BUILTIN_ENGINE_TRAITS[Engine.OPRF_EPOCH]
    exchanges: tuple[Exchange, ...] = EXCHANGES
    key_digest: Callable[[Sequence[bytes]], bytes] | None = None

    def requester(self, inputs: RequesterInputs) -> EpochRequester:
        return EpochRequester(inputs)

    def custodian(self, data: CustodianData) -> EpochCustodian:
        return EpochCustodian(data)
