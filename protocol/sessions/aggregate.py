"""Aggregate and cardinality tiers: the custodian matches and sums; the requester learns a total.

See docs/architecture.md, Aggregate and cardinality tiers, and Threat model.

Safe against a deviating (malicious) requester: whatever it sends, it learns the true count
of the custodian's keys it genuinely named and, when the policy allows a release, the sum
of their values; no individual's value (issue 13).  The earlier design (Ion et al.'s
intersection-sum, where the requester matched locally, multiplied Paillier ciphertexts and
reported the count) let a requester use distinct scalars, dummies, a false count and packed
ciphertexts to read three named people's values from one decryption.  Here there is no
ciphertext to pack and no count to report: the custodian computes both.

This module is a thin tier over the session core (``protocol.sessions.core``; see
docs/architecture.md, Sessions): the core opens, gates every message, counts, closes and
countersigns; this module holds the tier's messages, its two transition tables
(``AGGREGATE_CUSTODIAN_TRANSITIONS``, ``AGGREGATE_REQUESTER_TRANSITIONS``), their handlers
and the cryptography.

Notation: ``H`` = hash-to-group into ristretto255 with this tier's own DST
(``HASH_TO_GROUP_DST``); ``G`` = the group generator; ``a`` / ``b`` = fresh per-session secret
scalars of the requester / custodian; ``V`` = the requester's distinct match keys under the
session's one rule; ``W`` = the custodian's distinct keys of in-scope records, ``t(w)`` the
sum of the value column over the records sharing ``w``; ``pi`` = a fresh uniform order of
``W`` drawn by the custodian from the OS CSPRNG.

::

    Requester A                                        Custodian B
    open_request()        --AggregateOpenRequest---->  decide; reserve |V|; fresh b
                          <-AggregateOpenResponse----  |W|, min_aggregate_count
    blinded_chunks()      --BlindedChunk* a*H(v)---->  validate, count, keep b*(a*H(v))
                          <-CustodianChunk* --------   c_j = b*H(w_pi(j)), only after the
                                                       whole upload is in
    reblinded_chunks()    --ReblindedChunk* r_j ---->  validate (one element per position);
                                                       j matched iff r_j in {b*a*H(v)}
                          <-MatchChallenge ----------  bitmap of matched positions M
    consistency_proof()   --ConsistencyProof-------->  verify; count = |M|; sum of t over
                                                       the keys pi(M); min count, overlap
                          <-AggregateRelease --------  count, and the sum or why withheld
    close_request()       --CloseRequest------------>  signed Receipt (ledger)

Why a deviating requester learns no individual's value
-------------------------------------------------------
* **No count to falsify, nothing to pack.** The count is ``|M|``, computed by B; the sum is
  computed by B in the clear over its own records ``pi(M)``; A sends only group elements.
* **Consistency proof.** A proves, in zero knowledge, one scalar ``x`` with ``r_j = x*c_j``
  for every matched position (a batched Chaum-Pedersen proof over a random linear
  combination whose weights are hashed from the whole exchange, as in RFC 9497's batched
  VOPRF proofs).  So a matched position ``j`` means ``x*H(w_pi(j))`` was in A's upload:
  A named that very key under the scalar it proves.  Without the proof a requester could
  put a multiple ``k*x*c_p`` of one position's element at many positions ("distinct
  scalars": upload ``k*H(t)`` for k = 1..m) and turn one true match into ``m`` counted
  ones; with it, an element at the wrong position or under another scalar fails the proof
  (soundness error ~ 2^-252), and an upload under another scalar never matches.
* **Dummies** that are not real identities never match; **garbage** fails validation.
  Only positions can be matched, and each at most once: a requester's deviation can only
  shrink the matched set.
* **Upload first.** B sends ``c_j`` only after the whole upload is in, so nothing A uploads
  can depend on ``b``.  ``b`` is fresh per session (not cached per authorization): the
  challenge tells A which positions matched, and a ``b`` reused across sessions would let
  A link matched elements between sessions with different query lists, i.e. test
  membership of one person.
* **Minimum count** applies to the true count; **differencing** across releases is refused
  (``Reason.RELEASE_OVERLAP``): B records, durably and with the audit entry in one
  transaction, a keyed digest of every contributing record of each released sum, and
  refuses a release whose contributing set differs from an earlier one to the same
  requester by fewer than ``min_aggregate_count`` records (a repeat of the same set too).

What each party learns (exact leakage)
---------------------------------------
Requester A: ``|W|`` (at open), the count ``|V ∩ W|`` (the matched positions are random
positions of a fresh order of elements it cannot open without ``b``), and the sum when it
is released.  Custodian B: ``|V|`` (the budget unit), and now **which of its own records
contributed** and the released aggregate, which it computes itself; this is what it learns
anyway in the identity tier when it discloses.  The elements ``a*H(v)`` remain pseudorandom
to B (DDH), so B learns nothing about A's queries that are not its records; ``x*G`` in the
proof reveals nothing about ``a`` beyond what a public key does.

Limits (stated, not hidden)
---------------------------
* A requester that truly knows ``min_aggregate_count - 1`` real members of ``W`` **and their
  values** can put them next to a target and subtract.  It must hold real identities that
  the custodian holds, every such release is an audited ``aggregate_release`` entry whose
  contributing set oversight can re-verify, each costs budget, and the overlap rule stops
  the cheap form (the same set with one person added or removed).  Combinations of many
  releases that pairwise differ by ``min_aggregate_count`` or more are not refused; the
  budget and the audit are the controls there, as for any statistical release.
* The count itself is always released (it is the cardinality tier's answer), so counts over
  overlapping lists can be differenced to learn membership, as before; the overlap rule
  guards sums, which are what carry values.
* A custodian that deviates can falsify the result (it computes it); it learns no more
  about A's list than the count and which of its own records matched.

Canonical keys only (docs/architecture.md, Aggregate and cardinality tiers)
------------------------------------------------------------------------------
Both sides use each record's one canonical key under the session's rule; a rule's
query-side variant keys (``MatchRule.match_keys`` beyond the first) are not evaluated in
this tier.  ``V`` is a set of keys with no link back to a query, so a query whose canonical
key and one of its variants matched two different custodian keys would be counted twice,
and the custodian could only prevent that by learning which keys belong to one query.  The
budget is priced accordingly: :func:`aggregate_element_counts` is exactly the ``|V|`` each
session sends, and ``psi-authority issue`` signs that for these tiers.

Every error leaves a session ``FAILED`` with its ``failure_reason`` (the core's rule) and
both sides drop their one-time scalars.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
import rbcl
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.accounting.port import AggregateReleaseRow, Reservation
from protocol.crypto import oprf
from protocol.crypto.encoding import encode
from protocol.domain.engine import Engine
from protocol.domain.messages import (
    MAX_CHUNK_ELEMENTS,
    CloseRequest,
    Receipt,
    Transcript,
)
from protocol.domain.records import PersonRecord, QueryRecord, ValidatedQueries, match_keys_bulk
from protocol.domain.recordstore import CompactRecords, bulk_match_keys, persons_of
from protocol.engines.base import BuildCache, utc_date
from protocol.errors import InvalidElementError, InvalidRecordError, PolicyRefusal, ProtocolError
from protocol.policy.decide import Mode, Reason, SessionRequest, SignedAuthorization, Tier
from protocol.sessions.core import (
    CustodianCore,
    RequesterCore,
    Row,
    Send,
    TransitionTable,
    common_custodian_rows,
)
from protocol.sessions.identity import INDEX_SLICE, Custodian, CustodianConfig

__all__ = [
    "AGGREGATE_CUSTODIAN_TRANSITIONS",
    "AGGREGATE_REQUESTER_TRANSITIONS",
    "AGGREGATE_TIERS",
    "DEFAULT_BLINDED_CHUNK",
    "DEFAULT_CUSTODIAN_CHUNK",
    "ELEMENT_SIZE",
    "HASH_TO_GROUP_DST",
    "MAX_CUSTODIAN_CHUNK",
    "RELEASE_DIGEST_SIZE",
    "AggregateCustodian",
    "AggregateCustodianSession",
    "AggregateCustodianState",
    "AggregateOpenRequest",
    "AggregateOpenResponse",
    "AggregateOps",
    "AggregateOutcome",
    "AggregateRelease",
    "AggregateRequesterSession",
    "AggregateRequesterState",
    "AggregateResult",
    "BlindedChunk",
    "ConsistencyProof",
    "CustodianChunk",
    "MatchChallenge",
    "ReblindedChunk",
    "SerialAggregateOps",
    "ValueIndex",
    "aggregate_element_counts",
    "check_elements",
    "consistency_weights",
    "hash_multiply_span",
    "multiply_span",
    "overlap_problem",
    "plaintext_answer",
    "prove_consistency",
    "run_aggregate_in_process",
    "validate_span",
    "verify_consistency",
]

#: Hash-to-group DST of this tier: its group elements never collide with OPRF inputs.
HASH_TO_GROUP_DST = b"gated-psi/aggregate/hash-to-group/v1"
#: Domain of the consistency proof's weights and challenge.
PROOF_DST = b"gated-psi/aggregate/consistency-proof/v1"
#: Label of the key (derived from the custodian's master secret) of the release digests.
RELEASE_DIGEST_LABEL = b"gated-psi/aggregate/release-digest/v1"
#: Bytes per contributing-record digest: 128 bits, collision-free at any file size here.
RELEASE_DIGEST_SIZE = 16
AGGREGATE_TIERS = frozenset({Tier.AGGREGATE, Tier.CARDINALITY})
#: The engine whose group (ristretto255) and hash-to-group this tier uses.
ENGINE = Engine.OPRF

ELEMENT_SIZE = oprf.ELEMENT_SIZE
#: Requester -> custodian chunks: 4096 x 32 B = 128 KiB; the custodian accepts up to 65,536.
DEFAULT_BLINDED_CHUNK = 4096
#: Custodian -> requester chunks: 65,536 x 32 B = 2 MiB (the maximum too).
DEFAULT_CUSTODIAN_CHUNK = 65_536
MAX_CUSTODIAN_CHUNK = 65_536
#: Every per-key value (after folding duplicate keys) satisfies |t| < 2^VALUE_BITS (int64).
VALUE_BITS = 63

_IDENTITY = bytes(ELEMENT_SIZE)
_scalarmult = rbcl.crypto_scalarmult_ristretto255
_scalarmult_any = rbcl.crypto_scalarmult_ristretto255_allow_scalar_zero
_base_any = rbcl.crypto_scalarmult_ristretto255_base_allow_scalar_zero
_add = rbcl.crypto_core_ristretto255_add
_is_valid_point = rbcl.crypto_core_ristretto255_is_valid_point
_DTYPE = np.dtype(f"S{ELEMENT_SIZE}")


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class AggregateOpenRequest:
    """A -> B: the signed authorization, the tier, one rule, the value column, ``|V|``."""

    session_id: str
    signed_authorization: bytes
    tier: str
    match_rule: str
    value_field: str
    element_count: int
    engine: str = ENGINE.value

    def transcript_bytes(self) -> bytes:
        return encode(
            b"aggregate-open-request", self.session_id, self.signed_authorization, self.tier,
            self.match_rule, self.value_field, self.element_count, self.engine,
        )


@dataclass(frozen=True)
class AggregateOpenResponse:
    """B -> A: what was granted and ``|W|`` (the number of custodian elements to come)."""

    session_id: str
    authorization_id: str
    custodian_id: str
    tier: str
    match_rule: str
    value_field: str
    element_count: int
    custodian_count: int
    min_aggregate_count: int
    budget_remaining: int

    def transcript_bytes(self) -> bytes:
        return encode(
            b"aggregate-open-response/v2", self.session_id, self.authorization_id,
            self.custodian_id, self.tier, self.match_rule, self.value_field,
            self.element_count, self.custodian_count, self.min_aggregate_count,
            self.budget_remaining,
        )


@dataclass(frozen=True)
class BlindedChunk:
    """A -> B: ``a*H(v)`` for a slice of A's shuffled distinct keys (``k * 32`` bytes)."""

    seq: int
    elements: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"aggregate-blinded", self.seq, self.elements)


@dataclass(frozen=True)
class CustodianChunk:
    """B -> A: ``b*H(w)`` for a slice of B's keys in the session's fresh random order."""

    seq: int
    elements: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"aggregate-custodian", self.seq, self.elements)


@dataclass(frozen=True)
class ReblindedChunk:
    """A -> B: ``a*c_j`` for a slice of the custodian elements, position for position."""

    seq: int
    elements: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"aggregate-reblinded", self.seq, self.elements)


@dataclass(frozen=True)
class MatchChallenge:
    """B -> A: which positions matched (a bitmap over ``|W|`` positions, MSB first)."""

    count: int
    matched: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"aggregate-match-challenge", self.count, self.matched)


@dataclass(frozen=True)
class ConsistencyProof:
    """A -> B: ``x*G`` and a Chaum-Pedersen proof ``(e, s)`` that every matched ``r_j`` is
    ``x*c_j``; all three empty when nothing matched."""

    public_element: bytes
    challenge: bytes
    response: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"aggregate-consistency-proof", self.public_element, self.challenge,
                      self.response)


@dataclass(frozen=True)
class AggregateRelease:
    """B -> A: the true count and, in the aggregate tier, the sum, or why it was withheld."""

    count: int
    sum: int | None
    withheld: bool
    reason: str = ""

    def transcript_bytes(self) -> bytes:
        total = b"" if self.sum is None else str(self.sum).encode()
        return encode(b"aggregate-release", self.count, total, self.withheld, self.reason)


class AggregateTranscript(Transcript):
    """Transcript with this tier's streams (each in a fixed order on both sides)."""

    STREAMS = ("open", "blinded", "custodian", "reblinded", "result")


# --------------------------------------------------------------------------- group ops


def _hash_to_group(data: bytes) -> bytes:
    element = oprf.hash_to_group(data, HASH_TO_GROUP_DST)
    if element == _IDENTITY:  # probability ~2^-252
        raise oprf.InvalidInputError("match key hashes to the identity element")
    return element


def hash_multiply_span(scalar: bytes, inputs: Sequence[bytes]) -> bytes:
    """``scalar * H(x)`` for each input, concatenated: one span of ``AggregateOps.hash_multiply``
    (a module-level function, so a process pool can run it)."""
    mult = _scalarmult
    return b"".join([mult(scalar, _hash_to_group(x)) for x in inputs])


def _element_error(element: bytes, index: int) -> InvalidElementError:
    try:
        oprf.deserialize_element(element)
    except InvalidElementError as exc:
        return InvalidElementError(f"element {index}: {exc}")
    return InvalidElementError(f"element {index}: rejected")  # pragma: no cover


def multiply_span(scalar: bytes, elements: bytes, offset: int) -> bytes:
    """Validate each element exactly as ``oprf.deserialize_element`` does, then multiply: one
    span of ``AggregateOps.multiply``; ``offset`` (the span's first index in the whole buffer)
    names a bad element by its index in the batch.

    libsodium's ``crypto_scalarmult_ristretto255`` decodes its input with the same check
    as ``crypto_core_ristretto255_is_valid_point`` and fails (rbcl: RuntimeError) on an
    invalid encoding or an identity result, so the separate validity call (~9% of the
    cost) is folded into the multiplication; bit 255 (ignored by libsodium 1.0.18) and the
    identity encoding are checked explicitly first.
    """
    mult, identity = _scalarmult, _IDENTITY
    out: list[bytes] = []
    append = out.append
    for start in range(0, len(elements), ELEMENT_SIZE):
        element = elements[start:start + ELEMENT_SIZE]
        if element == identity or element[31] & 0x80:
            raise _element_error(element, offset + start // ELEMENT_SIZE)
        try:
            append(mult(scalar, element))
        except RuntimeError:
            raise _element_error(element, offset + start // ELEMENT_SIZE) from None
    return b"".join(out)


def validate_span(elements: bytes, offset: int) -> None:
    """Every element canonical, in the group, not the identity (``oprf.deserialize_element``),
    without multiplying: ~5 us per element."""
    valid, identity = _is_valid_point, _IDENTITY
    for start in range(0, len(elements), ELEMENT_SIZE):
        element = elements[start:start + ELEMENT_SIZE]
        if element == identity or element[31] & 0x80 or not valid(element):
            raise _element_error(element, offset + start // ELEMENT_SIZE)


def check_elements(elements: bytes, what: str) -> int:
    """The number of group elements in ``elements``; ``InvalidElementError`` (naming ``what``)
    if its length is not a whole number of elements."""
    if len(elements) % ELEMENT_SIZE:
        raise InvalidElementError(
            f"{what}: {len(elements)} bytes is not a multiple of {ELEMENT_SIZE}"
        )
    return len(elements) // ELEMENT_SIZE


class AggregateOps(Protocol):
    """Where the heavy work runs: :class:`SerialAggregateOps`, or a process pool
    (``protocol.adapters.pools.AggregatePool``)."""

    def hash_multiply(self, scalar: bytes, inputs: Sequence[bytes]) -> bytes: ...

    def multiply(self, scalar: bytes, elements: bytes) -> bytes: ...


class SerialAggregateOps:
    """Everything in this process: for tests, small sessions and one-core hosts."""

    def hash_multiply(self, scalar: bytes, inputs: Sequence[bytes]) -> bytes:
        return hash_multiply_span(scalar, inputs)

    def multiply(self, scalar: bytes, elements: bytes) -> bytes:
        check_elements(elements, "element buffer")
        return multiply_span(scalar, bytes(elements), 0)


# --------------------------------------------------------------------------- consistency proof


def consistency_weights(session_id: str, matched: bytes, custodian_digest: bytes,
                        reblinded_digest: bytes, count: int) -> list[bytes]:
    """The proof's ``count`` weights ``d_i``, hashed from the whole exchange (Fiat-Shamir).

    They depend on every custodian element and every reblinded element (through the two
    stream digests) and on the matched set, so the requester fixed all of them before the
    weights existed: it cannot choose elements that cancel in the combination.
    """
    seed = hashlib.sha512(encode(PROOF_DST, b"weights", session_id, matched, custodian_digest,
                                 reblinded_digest)).digest()
    reduce = rbcl.crypto_core_ristretto255_scalar_reduce
    return [reduce(hashlib.sha512(seed + i.to_bytes(8, "big")).digest()) for i in range(count)]


def _combine(weights: Sequence[bytes], elements: Sequence[bytes]) -> bytes:
    """``sum d_i * P_i`` (one multiplication per term; the sets proved are the matches only)."""
    total = b""
    for d, point in zip(weights, elements, strict=True):
        term = _scalarmult_any(d, point)
        total = term if not total else _add(total, term)
    return total


def _proof_challenge(public: bytes, composite: bytes, image: bytes, t1: bytes, t2: bytes
                     ) -> bytes:
    digest = hashlib.sha512(encode(PROOF_DST, b"challenge", public, composite, image, t1, t2))
    return rbcl.crypto_core_ristretto255_scalar_reduce(digest.digest())  # type: ignore[no-any-return]


def prove_consistency(scalar: bytes, weights: Sequence[bytes], custodian: Sequence[bytes]
                      ) -> ConsistencyProof:
    """Chaum-Pedersen proof that ``log_G(x*G) = log_C(x*C)`` for ``C = sum d_i c_i``."""
    composite = _combine(weights, custodian)
    image = _scalarmult(scalar, composite)
    public = rbcl.crypto_scalarmult_ristretto255_base(scalar)
    k = oprf.random_scalar()
    t1, t2 = rbcl.crypto_scalarmult_ristretto255_base(k), _scalarmult(k, composite)
    e = _proof_challenge(public, composite, image, t1, t2)
    s = rbcl.crypto_core_ristretto255_scalar_sub(
        k, rbcl.crypto_core_ristretto255_scalar_mul(e, scalar))
    return ConsistencyProof(public_element=public, challenge=e, response=s)


def verify_consistency(proof: ConsistencyProof, weights: Sequence[bytes],
                       custodian: Sequence[bytes], reblinded: Sequence[bytes]) -> bool:
    """Whether ``proof`` shows one scalar ``x`` with ``r_j = x*c_j`` for every pair given.

    The combination ``sum d_i (r_i - x c_i) = 0`` with weights the prover could not choose
    fails for any wrong ``r_i`` except with probability ~2^-252.
    """
    try:
        public = oprf.deserialize_element(proof.public_element)
        e = oprf.deserialize_scalar(proof.challenge)
        s = proof.response
        if len(s) != oprf.SCALAR_SIZE or int.from_bytes(s, "little") >= oprf.GROUP_ORDER:
            return False
        composite = _combine(weights, custodian)
        image = _combine(weights, reblinded)
        t1 = _add(_base_any(s), _scalarmult_any(e, public))
        t2 = _add(_scalarmult_any(s, composite), _scalarmult_any(e, image))
    except (InvalidElementError, RuntimeError):
        return False
    return hmac.compare_digest(_proof_challenge(public, composite, image, t1, t2), e)


# --------------------------------------------------------------------------- helpers


def _random_permutation(n: int) -> np.ndarray:
    """A uniform permutation of ``range(n)`` from the OS CSPRNG.

    Sorting n random 64-bit keys gives a uniform permutation when the keys are distinct;
    on the (~n^2 / 2^65) chance of a tie we draw again, so the result is exactly uniform.
    numpy's own generators are not cryptographic, and an order A could predict would link
    positions to keys.
    """
    while True:
        keys = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        if n < 2 or bool(np.all(ordered[1:] != ordered[:-1])):
            return order


def _shuffled(items: Sequence[bytes]) -> list[bytes]:
    return [items[i] for i in _random_permutation(len(items)).tolist()]


def _bitmap(count: int, positions: np.ndarray) -> bytes:
    mask = np.zeros(count, dtype=np.uint8)
    mask[positions] = 1
    return np.packbits(mask).tobytes()


def _positions(bitmap: bytes, count: int) -> np.ndarray:
    """The set bits of a ``count``-position bitmap; ProtocolError unless well formed."""
    if len(bitmap) != -(-count // 8):
        raise ProtocolError(f"matched bitmap has {len(bitmap)} bytes for {count} positions")
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8))
    if bits[count:].any():
        raise ProtocolError("matched bitmap sets a position past the last element")
    return np.flatnonzero(bits[:count])


def _record_value(record: PersonRecord, value_field: str) -> int:
    try:
        raw = record.get(value_field)
    except KeyError:
        raise InvalidRecordError(
            f"record {record.record_id!r} has no column {value_field!r}"
        ) from None
    return _parse_value(raw, record.record_id, value_field)


def _parse_value(text: str, record_id: str, value_field: str) -> int:
    """A per-record amount: a plain integer (e.g. cents), |t| < 2^63."""
    body = text[1:] if text[:1] == "-" else text
    if not body.isascii() or not body.isdigit() or len(body) > 19:
        raise InvalidRecordError(
            f"record {record_id!r}: {value_field} = {text!r} is not an integer amount"
        )
    value = int(text)
    if abs(value) >= 1 << 63:
        raise InvalidRecordError(f"record {record_id!r}: {value_field} is out of range")
    return value


def plaintext_answer(
    requester_keys: Iterable[bytes | None], custodian_pairs: Iterable[tuple[bytes | None, int]]
) -> tuple[int, int]:
    """The ideal functionality, in the clear: (``|V ∩ W|``, sum of ``t`` over it).

    ``V`` and ``W`` are sets of match keys (``None`` = no key); a custodian key held by
    several records contributes the sum of their values once.  For tests and audits.
    """
    v = {k for k in requester_keys if k is not None}
    w: dict[bytes, int] = {}
    for key, value in custodian_pairs:
        if key is not None:
            w[key] = w.get(key, 0) + value
    common = v & w.keys()
    return len(common), sum(w[k] for k in common)


def _distinct_keys(keys: Iterable[bytes | None]) -> list[bytes]:
    """``V``: the distinct canonical keys, first occurrence first (``None`` = no key)."""
    return list(dict.fromkeys(k for k in keys if k is not None))


def aggregate_element_counts(
    queries: ValidatedQueries | CompactRecords | Sequence[QueryRecord] | Sequence[PersonRecord],
    rule_ids: Sequence[str],
    *,
    today: date,
) -> dict[str, int]:
    """Per rule, the elements ``|V|`` one aggregate or cardinality session under that rule
    sends (and the custodian counts against the budget): the distinct canonical keys of the
    queries.  Variant keys are not evaluated in these tiers (see the module text), so they
    are not priced either."""
    rules = list(dict.fromkeys(rule_ids))
    keys = bulk_match_keys(persons_of(queries), rules, today=today)
    return {r: len(_distinct_keys(keys[r])) for r in rules}


def overlap_problem(contributing: bytes, earlier: Sequence[AggregateReleaseRow],
                    minimum: int) -> str | None:
    """Why a release with this contributing set must be refused, or None.

    ``contributing`` and each earlier row are sorted concatenations of
    ``RELEASE_DIGEST_SIZE``-byte record digests.  Two sums over sets that differ by ``d``
    records give, by subtraction, a sum over ``d`` records: with ``d < minimum`` that is
    exactly what ``min_aggregate_count`` exists to prevent.
    """
    if minimum <= 0:
        return None
    dtype = np.dtype(f"S{RELEASE_DIGEST_SIZE}")
    ours = np.frombuffer(contributing, dtype=dtype)
    for row in earlier:
        theirs = np.frombuffer(row.contributing, dtype=dtype)
        common = np.intersect1d(ours, theirs, assume_unique=True).size
        differ = ours.size + theirs.size - 2 * common
        if differ < minimum:
            return (f"the contributing records differ from release {row.session_id!r} "
                    f"(authorization {row.auth_id!r}) by {differ}, fewer than the minimum "
                    f"of {minimum}")
    return None


# --------------------------------------------------------------------------- custodian


@dataclass(frozen=True)
class ValueIndex:
    """The custodian's distinct match keys under one rule, with summed values.

    Records sharing a key (duplicates in the file) become one key whose value is their
    sum, so ``W`` is a set and the count is a count of distinct people.  Stored compactly
    (one blob of keys plus offsets, int64 values, and the record positions behind each
    key): ~51 bytes per key at 1.3M records.
    """

    rule_id: str
    value_field: str  # "" in the cardinality tier
    key_blob: bytes
    key_offsets: np.ndarray  # int64, len(self) + 1 entries
    values: np.ndarray  # int64, parallel to the keys; zeros in the cardinality tier
    records: int  # in-scope records that have a key under the rule
    member_positions: np.ndarray  # int64 record positions, grouped by key
    member_offsets: np.ndarray  # int64, len(self) + 1 entries into member_positions
    build_seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.key_offsets.shape[0]) - 1

    def keys_at(self, positions: Sequence[int]) -> list[bytes]:
        blob, off = self.key_blob, self.key_offsets
        return [blob[off[i]:off[i + 1]] for i in positions]

    def members_of(self, keys: np.ndarray) -> list[int]:
        """The record positions behind the given key indexes."""
        off, members = self.member_offsets, self.member_positions
        return [int(p) for k in keys.tolist() for p in members[off[k]:off[k + 1]]]

    @property
    def folded(self) -> int:
        """Records merged into another record's key."""
        return self.records - len(self)


class AggregateCustodian:
    """The aggregate tier on top of an identity-tier :class:`~protocol.sessions.identity.Custodian`.

    Shares its records, policy, ledger and signing key; adds value indexes and the
    aggregate ops.  ``session()`` starts one requester session.
    """

    def __init__(self, custodian: Custodian, *, ops: AggregateOps | None = None) -> None:
        self.custodian = custodian
        self.ops: AggregateOps = ops or SerialAggregateOps()
        # locks injected through the config: the core runs no threads
        self._indexes: BuildCache[tuple[str, str], ValueIndex] = BuildCache(
            custodian.config.new_lock)
        # Stable across sessions and restarts (the overlap rule compares releases of
        # different sessions), secret (a digest must not confirm a guessed record id).
        self.release_key = hmac.new(custodian.config.master_secret, RELEASE_DIGEST_LABEL,
                                    hashlib.sha256).digest()

    @property
    def config(self) -> CustodianConfig:
        return self.custodian.config

    def prepare(self, rule_id: str, value_field: str = "") -> ValueIndex:
        """Distinct keys (and summed values) of in-scope records; cached per rule and column.

        Records are read in slices (the record store may be compact).  A value that is not
        an integer raises ``InvalidRecordError`` naming the record: treating it as zero
        would silently falsify the sum.
        """
        return self._indexes.get((rule_id, value_field),
                                 lambda: self._build(rule_id, value_field))

    def release_digests(self, record_positions: Sequence[int]) -> bytes:
        """Sorted keyed digests of the records' ids: the durable record of a release."""
        records, key = self.config.records, self.release_key
        digests = sorted(
            hmac.new(key, records[p].record_id.encode(), hashlib.sha256).digest()[
                :RELEASE_DIGEST_SIZE]
            for p in record_positions
        )
        return b"".join(digests)

    def _build(self, rule_id: str, value_field: str) -> ValueIndex:
        started = time.perf_counter()
        records, in_scope = self.config.records, self.custodian.in_scope
        today = utc_date(self.config.clock())
        slots: dict[bytes, int] = {}
        key_list: list[bytes] = []
        values: list[int] = []
        slot_of_record: list[int] = []
        position_of_record: list[int] = []
        for start in range(0, len(in_scope), INDEX_SLICE):
            positions = [int(i) for i in in_scope[start:start + INDEX_SLICE]]
            part = [records[i] for i in positions]
            keys = match_keys_bulk(part, [rule_id], today=today)[rule_id]
            for position, record, key in zip(positions, part, keys, strict=True):
                if key is None:
                    continue
                value = _record_value(record, value_field) if value_field else 0
                slot = slots.get(key)
                if slot is None:
                    slot = slots[key] = len(key_list)
                    key_list.append(key)
                    values.append(value)
                else:
                    values[slot] += value
                slot_of_record.append(slot)
                position_of_record.append(position)
        del slots
        if any(abs(v) >= 1 << VALUE_BITS for v in values):
            raise InvalidRecordError(
                f"{value_field} summed over duplicate records exceeds 2^{VALUE_BITS}"
            )
        offsets = np.zeros(len(key_list) + 1, dtype=np.int64)
        np.cumsum([len(k) for k in key_list], out=offsets[1:])
        slot_array = np.asarray(slot_of_record, dtype=np.int64)
        order = np.argsort(slot_array, kind="stable")
        member_offsets = np.zeros(len(key_list) + 1, dtype=np.int64)
        np.cumsum(np.bincount(slot_array, minlength=len(key_list)), out=member_offsets[1:])
        return ValueIndex(
            rule_id=rule_id, value_field=value_field, key_blob=b"".join(key_list),
            key_offsets=offsets, values=np.asarray(values, dtype=np.int64),
            records=len(slot_of_record),
            member_positions=np.asarray(position_of_record, dtype=np.int64)[order],
            member_offsets=member_offsets, build_seconds=time.perf_counter() - started,
        )

    def session(self) -> AggregateCustodianSession:
        return AggregateCustodianSession(self)


class AggregateCustodianState(StrEnum):
    AWAIT_OPEN = "await_open"
    RECEIVING = "receiving"  # taking BlindedChunks
    REBLINDING = "reblinding"  # custodian elements sent; taking ReblindedChunks
    PROVING = "proving"  # matched positions announced; awaiting the consistency proof
    RELEASED = "released"  # the one release was answered
    CLOSED = "closed"
    FAILED = "failed"


_C = AggregateCustodianState

#: (state, event) -> (handler, next state): what the custodian accepts and what it sends.
#: Anything else is a ProtocolError and leaves the session FAILED (protocol.sessions.core).
AGGREGATE_CUSTODIAN_TRANSITIONS = TransitionTable(
    "aggregate custodian",
    {
        **common_custodian_rows(AggregateOpenRequest, initial=_C.AWAIT_OPEN,
                                opened=_C.RECEIVING, closed=_C.CLOSED,
                                closable=(_C.RECEIVING, _C.REBLINDING, _C.PROVING,
                                          _C.RELEASED)),
        (_C.RECEIVING, BlindedChunk): Row("_blinded", _C.RECEIVING),
        # Only after the whole upload: nothing A uploads may depend on b.
        (_C.RECEIVING, Send(CustodianChunk)): Row("_custodian_stream", _C.REBLINDING,
                                                  stream=True),
        (_C.REBLINDING, ReblindedChunk): Row("_on_reblinded", _C.REBLINDING),
        (_C.REBLINDING, Send(MatchChallenge)): Row("_challenge", _C.PROVING),
        (_C.PROVING, ConsistencyProof): Row("_release", _C.RELEASED),  # one release
    },
    initial=_C.AWAIT_OPEN, failed=_C.FAILED, final=(_C.CLOSED,),
)


class AggregateCustodianSession(CustodianCore):
    """One requester session on the custodian side, on the session core.

    Received messages go through ``handle(message, peer_id=...)``; what it sends
    (``custodian_chunks()`` once every element is in, ``challenge()`` once every
    reblinded element is in) goes through ``send``.  ``stats`` holds per-phase timings.
    """

    TABLE = AGGREGATE_CUSTODIAN_TRANSITIONS
    SERVED_TIERS = AGGREGATE_TIERS
    SERVED_ENGINES = frozenset({ENGINE})
    RESUMABLE = False  # b and the order live only in this object
    AUDIT_STAGE = "aggregate-open"
    TRANSCRIPT = AggregateTranscript

    def __init__(self, owner: AggregateCustodian) -> None:
        super().__init__(owner.config)
        self.owner = owner
        self.tier: Tier | None = None
        self.match_rule = ""
        self.value_field = ""
        self.received = 0
        self.index: ValueIndex | None = None
        self.released: AggregateRelease | None = None
        self.stats: dict[str, float] = {
            "evaluate_s": 0.0, "custodian_elements_s": 0.0, "validate_s": 0.0,
            "match_s": 0.0, "verify_s": 0.0,
        }
        self._b = b""
        self._double: bytearray = bytearray()
        self._order: np.ndarray | None = None
        self._custodian: bytearray = bytearray()
        self._reblinded: bytearray = bytearray()
        self._reblinded_count = 0
        self._custodian_sent = 0
        self._custodian_hash = hashlib.sha256()
        self._reblinded_hash = hashlib.sha256()
        self._matched: np.ndarray | None = None
        self._bitmap = b""
        self._expected_seq = 0
        self._reblinded_seq = 0

    @property
    def element_count(self) -> int:
        """``|V|``: the elements granted (and reserved) at open."""
        return self.element_limit

    def _discard(self) -> None:
        self._b = b""
        self._double = bytearray()
        self._custodian = bytearray()
        self._reblinded = bytearray()
        self._order = None

    # -- open ------------------------------------------------------------------

    def _session_request(self, req: AggregateOpenRequest) -> SessionRequest:
        return SessionRequest(
            peer_id=self.peer_id, tier=Tier(req.tier), match_rules=(req.match_rule,),
            disclosure_fields=(), query_count=req.element_count, engine=req.engine,
            value_field=req.value_field,
        )

    def _audit_fields(self, req: AggregateOpenRequest) -> dict[str, Any]:
        return {"tier": req.tier, "rule": req.match_rule, "value_field": req.value_field}

    def _session_meta(self, req: AggregateOpenRequest) -> dict[str, Any]:
        return {"tier": req.tier, "rule": req.match_rule, "value_field": req.value_field,
                "elements": req.element_count}

    def _prepare(self, req: AggregateOpenRequest, signed: SignedAuthorization) -> None:
        if req.element_count < 1:
            raise ProtocolError("an aggregate session needs at least one element")
        self.index = self.owner.prepare(req.match_rule, req.value_field)

    def _opened(self, req: AggregateOpenRequest, reservation: Reservation
                ) -> AggregateOpenResponse:
        assert self.index is not None
        auth = self.authorization
        self.tier = Tier(req.tier)
        self.match_rule = req.match_rule
        self.value_field = req.value_field
        self._b = oprf.random_scalar()
        self._double = bytearray(self.element_count * ELEMENT_SIZE)
        return AggregateOpenResponse(
            session_id=req.session_id, authorization_id=auth.authorization_id,
            custodian_id=self.context.policy.custodian_id, tier=req.tier,
            match_rule=req.match_rule, value_field=req.value_field,
            element_count=self.element_count, custodian_count=len(self.index),
            min_aggregate_count=auth.min_aggregate_count,
            budget_remaining=self.context.ledger.budget(auth.authorization_id).remaining,
        )

    # -- upload ----------------------------------------------------------------

    def _blinded(self, chunk: BlindedChunk) -> None:
        if chunk.seq != self._expected_seq:
            raise ProtocolError(f"blinded chunk {chunk.seq} out of order "
                                f"(expected {self._expected_seq})")
        n = check_elements(chunk.elements, f"blinded chunk {chunk.seq}")
        if n == 0:
            raise ProtocolError(f"blinded chunk {chunk.seq} is empty")
        if n > MAX_CHUNK_ELEMENTS:
            raise ProtocolError(
                f"blinded chunk {chunk.seq} has {n} elements; the limit is {MAX_CHUNK_ELEMENTS}"
            )
        self._count(n)  # count before evaluating: refused past the elements granted
        started = time.perf_counter()
        doubled = self.owner.ops.multiply(self._b, chunk.elements)
        self.stats["evaluate_s"] += time.perf_counter() - started
        start = self.received * ELEMENT_SIZE
        self._double[start:start + len(doubled)] = doubled
        self.received += n
        self._expected_seq += 1
        self.transcript.add("blinded", chunk)

    # -- custodian elements ----------------------------------------------------

    def custodian_chunks(
        self, chunk_elements: int = DEFAULT_CUSTODIAN_CHUNK, *, peer_id: str | None = None,
    ) -> Iterator[CustodianChunk]:
        """``b*H(w)`` for every distinct key, in a fresh uniform order this session keeps."""
        return self.send(CustodianChunk, chunk_elements, peer_id=peer_id)  # type: ignore[no-any-return]

    def _custodian_stream(self, chunk_elements: int = DEFAULT_CUSTODIAN_CHUNK
                          ) -> Iterator[CustodianChunk]:
        if not 0 < chunk_elements <= MAX_CUSTODIAN_CHUNK:
            raise ProtocolError(f"chunk_elements must be in 1..{MAX_CUSTODIAN_CHUNK}")
        if self.received != self.element_count:
            raise ProtocolError(
                f"only {self.received} of {self.element_count} blinded elements received"
            )
        assert self.index is not None
        self._order = _random_permutation(len(self.index))
        self._reblinded = bytearray(len(self.index) * ELEMENT_SIZE)
        return self._custodian_slices(chunk_elements)

    def _custodian_slices(self, chunk_elements: int) -> Iterator[CustodianChunk]:
        index, order = self.index, self._order
        assert index is not None and order is not None
        for seq, start in enumerate(range(0, len(order), chunk_elements)):
            started = time.perf_counter()
            keys = index.keys_at(order[start:start + chunk_elements].tolist())
            elements = self.owner.ops.hash_multiply(self._b, keys)
            self.stats["custodian_elements_s"] += time.perf_counter() - started
            chunk = CustodianChunk(seq=seq, elements=elements)
            self._custodian += elements  # the proof needs c_j of the matched positions
            self._custodian_hash.update(elements)
            self._custodian_sent += len(keys)
            self.transcript.add("custodian", chunk)
            yield chunk

    # -- reblinded elements ----------------------------------------------------

    def _on_reblinded(self, chunk: ReblindedChunk) -> None:
        assert self.index is not None
        if self._custodian_sent != len(self.index):
            raise ProtocolError(
                f"reblinded elements before all custodian elements were sent "
                f"({self._custodian_sent} of {len(self.index)})"
            )
        if chunk.seq != self._reblinded_seq:
            raise ProtocolError(f"reblinded chunk {chunk.seq} out of order "
                                f"(expected {self._reblinded_seq})")
        n = check_elements(chunk.elements, f"reblinded chunk {chunk.seq}")
        if (n == 0 and (len(self.index) or chunk.seq)) or n > MAX_CHUNK_ELEMENTS:
            raise ProtocolError(
                f"reblinded chunk {chunk.seq} has {n} elements (1..{MAX_CHUNK_ELEMENTS})")
        if self._reblinded_count + n > len(self.index):
            raise ProtocolError(
                f"{self._reblinded_count + n} reblinded elements for {len(self.index)} "
                "positions: exactly one per position")
        started = time.perf_counter()
        validate_span(chunk.elements, self._reblinded_count)
        self.stats["validate_s"] += time.perf_counter() - started
        start = self._reblinded_count * ELEMENT_SIZE
        self._reblinded[start:start + len(chunk.elements)] = chunk.elements
        self._reblinded_hash.update(chunk.elements)
        self._reblinded_count += n
        self._reblinded_seq += 1
        self.transcript.add("reblinded", chunk)

    def challenge(self, *, peer_id: str | None = None) -> MatchChallenge:
        """Match every position and announce the matched ones (the proof covers them)."""
        return self.send(MatchChallenge, peer_id=peer_id)  # type: ignore[no-any-return]

    def _challenge(self) -> MatchChallenge:
        assert self.index is not None
        if self._reblinded_count != len(self.index):
            raise ProtocolError(
                f"{self._reblinded_count} reblinded elements for {len(self.index)} positions: "
                "exactly one per position")
        started = time.perf_counter()
        table = np.sort(np.frombuffer(bytes(self._double), dtype=_DTYPE))
        self._double = bytearray()
        reblinded = np.frombuffer(bytes(self._reblinded), dtype=_DTYPE)
        hits = np.zeros(0, dtype=np.int64)
        if len(table) and len(reblinded):
            pos = np.searchsorted(table, reblinded)
            pos[pos >= len(table)] = 0
            hits = np.flatnonzero(table[pos] == reblinded)
        if np.unique(reblinded[hits]).size != hits.size:
            raise ProtocolError("the same reblinded element at two positions")
        self._matched = hits
        self._bitmap = _bitmap(len(self.index), hits)
        self.stats["match_s"] = time.perf_counter() - started
        msg = MatchChallenge(count=int(hits.size), matched=self._bitmap)
        self.transcript.add("result", msg)
        return msg

    # -- release ---------------------------------------------------------------

    def _release(self, proof: ConsistencyProof) -> AggregateRelease:
        assert self.index is not None and self.tier is not None and self._matched is not None
        assert self._order is not None
        hits = self._matched
        started = time.perf_counter()
        if hits.size == 0:
            if proof.public_element or proof.challenge or proof.response:
                raise ProtocolError("nothing matched: the proof must be empty")
        else:
            weights = consistency_weights(
                self.session_id, self._bitmap, self._custodian_hash.digest(),
                self._reblinded_hash.digest(), int(hits.size))
            custodian = [bytes(self._custodian[j * ELEMENT_SIZE:(j + 1) * ELEMENT_SIZE])
                         for j in hits.tolist()]
            reblinded = [bytes(self._reblinded[j * ELEMENT_SIZE:(j + 1) * ELEMENT_SIZE])
                         for j in hits.tolist()]
            if not verify_consistency(proof, weights, custodian, reblinded):
                raise InvalidElementError(
                    "consistency proof failed: the reblinded elements at the matched "
                    "positions are not one scalar times the custodian's elements there")
        self.stats["verify_s"] = time.perf_counter() - started
        self._custodian = bytearray()
        self._reblinded = bytearray()
        keys = self._order[hits]  # the custodian's own matched keys: the true matched set
        count = int(keys.size)
        auth = self.authorization
        minimum = auth.min_aggregate_count
        # The contributing records, as sorted keyed digests: bounded in the audit entry (a
        # count and one SHA-256), kept whole only for released sums (the overlap rule).
        members = self.owner.release_digests(self.index.members_of(keys))
        entry: dict[str, Any] = {
            "authorization_id": auth.authorization_id, "session_id": self.session_id,
            "peer": self.peer_id, "tier": self.tier.value, "rule": self.match_rule,
            "value_field": self.value_field, "count": count,
            "min_aggregate_count": minimum, "below_minimum": count < minimum,
            "elements": self.element_count, "custodian_elements": len(self.index),
            "contributing_records": len(members) // RELEASE_DIGEST_SIZE,
            "contributing_sha256": hashlib.sha256(members).hexdigest(),
        }
        if self.tier is Tier.CARDINALITY:
            reply = AggregateRelease(count=count, sum=None, withheld=False)
            self.context.ledger.audit("aggregate_release", {**entry, "sum_released": False})
        elif count < minimum:
            reply = AggregateRelease(count=count, sum=None, withheld=True,
                                     reason="below_minimum_count")
            self.context.ledger.audit("aggregate_release", {
                **entry, "sum_released": False, "reason": reply.reason})
        else:
            total = int(sum(self.index.values[keys].tolist()))
            release_entry = {**entry, "sum_released": True, "sum": str(total)}
            refusal: list[str] = []

            def admit(earlier: Sequence[AggregateReleaseRow]) -> None:
                problem = overlap_problem(members, earlier, minimum)
                if problem is not None:
                    refusal.append(problem)
                    raise PolicyRefusal(f"{Reason.RELEASE_OVERLAP.value}: {problem}",
                                        reasons=(Reason.RELEASE_OVERLAP.value,))

            try:
                # Durable account, overlap rule inside the same transaction, before the
                # sum leaves (as for identity-tier disclosures).
                self.context.ledger.record_aggregate_release(
                    auth.authorization_id, self.session_id, self.peer_id, members,
                    release_entry, admit)
            except PolicyRefusal:
                self.context.ledger.audit("aggregate_release_refused", {
                    **entry, "reason": Reason.RELEASE_OVERLAP.value,
                    "detail": refusal[0] if refusal else ""})
                raise
            reply = AggregateRelease(count=count, sum=total, withheld=False)
        self.released = reply
        self.transcript.add("result", proof)
        self.transcript.add("result", reply)
        self._order = None
        self._b = b""
        return reply


# --------------------------------------------------------------------------- requester


class AggregateRequesterState(StrEnum):
    START = "start"
    AWAIT_OPEN = "await_open"
    EXCHANGING = "exchanging"  # uploading; receiving the custodian elements
    AWAIT_CHALLENGE = "await_challenge"
    PROVING = "proving"
    AWAIT_RELEASE = "await_release"
    RELEASED = "released"
    AWAIT_RECEIPT = "await_receipt"
    CLOSED = "closed"
    FAILED = "failed"


_R = AggregateRequesterState

#: (state, event) -> (handler, next state): what the requester sends and what it accepts.
AGGREGATE_REQUESTER_TRANSITIONS = TransitionTable(
    "aggregate requester",
    {
        (_R.START, Send(AggregateOpenRequest)): Row("_open_request", _R.AWAIT_OPEN),
        (_R.AWAIT_OPEN, AggregateOpenResponse): Row("_on_open", _R.EXCHANGING),
        (_R.EXCHANGING, Send(BlindedChunk)): Row("_blinded_stream", _R.EXCHANGING,
                                                 stream=True),
        (_R.EXCHANGING, CustodianChunk): Row("_on_custodian", _R.EXCHANGING),
        (_R.EXCHANGING, Send(ReblindedChunk)): Row("_reblinded_stream", _R.AWAIT_CHALLENGE,
                                                   stream=True),
        (_R.AWAIT_CHALLENGE, MatchChallenge): Row("_on_challenge", _R.PROVING),
        (_R.PROVING, Send(ConsistencyProof)): Row("_proof", _R.AWAIT_RELEASE),
        (_R.AWAIT_RELEASE, AggregateRelease): Row("_on_release", _R.RELEASED),
        (_R.EXCHANGING, Send(CloseRequest)): Row("_close_request", _R.AWAIT_RECEIPT),
        (_R.RELEASED, Send(CloseRequest)): Row("_close_request", _R.AWAIT_RECEIPT),
        (_R.AWAIT_RECEIPT, Receipt): Row("_on_receipt", _R.CLOSED),
    },
    initial=_R.START, failed=_R.FAILED, final=(_R.CLOSED,),
)


@dataclass(frozen=True)
class AggregateResult:
    """What the requester learns: the count and (aggregate tier) the sum, or why not."""

    tier: str
    count: int
    sum: int | None
    withheld: bool
    reason: str = ""
    elements: int = 0  # |V|, distinct query keys sent
    custodian_elements: int = 0  # |W|, announced by the custodian


class AggregateRequesterSession(RequesterCore):
    """The requester's side of one aggregate or cardinality session, on the session core.

    ``queries``: ``validate_queries(...).accepted`` or the packed records of
    ``recordstore.load_query_csv``; a plain list of query records is validated here and
    refused as a whole if any record would be (as in the identity tier).  Only distinct
    match keys are sent, in a random order, and nothing per query is kept after blinding:
    the session could not link a result to a query even if it wanted to.
    """

    TABLE = AGGREGATE_REQUESTER_TRANSITIONS

    def __init__(
        self,
        signed_authorization: SignedAuthorization,
        queries: ValidatedQueries | CompactRecords | Sequence[QueryRecord],
        *,
        match_rule: str | None = None,
        value_field: str | None = None,
        ops: AggregateOps | None = None,
        chunk_size: int = DEFAULT_BLINDED_CHUNK,
        session_id: str | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        custodian_key: Ed25519PublicKey | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` dates the match keys (a birth date after today has none)."""
        if not isinstance(queries, CompactRecords):  # packed: validated by load_query_csv
            queries = ValidatedQueries.ensure(queries, today=utc_date(clock()))
        auth = signed_authorization.authorization
        if auth.tier not in AGGREGATE_TIERS:
            raise ValueError(
                f"authorization {auth.authorization_id} is for tier {auth.tier.value!r}; "
                "the aggregate session serves only 'aggregate' and 'cardinality'"
            )
        if auth.mode is Mode.NAMED_SUBJECTS:
            raise ValueError("the aggregate tier does not serve named-subject authorizations")
        if match_rule is None:
            if len(auth.match_rules) != 1:
                raise ValueError("the authorization permits several rules; name match_rule")
            match_rule = auth.match_rules[0]
        if value_field is None:
            value_field = ""
            if auth.tier is Tier.AGGREGATE:
                value_field = auth.value_field
        if not 0 < chunk_size <= MAX_CHUNK_ELEMENTS:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_ELEMENTS}")
        super().__init__(
            signed_authorization, session_id=session_id or f"agg-{uuid.uuid4().hex}",
            transcript=AggregateTranscript(), signing_key=signing_key,
            custodian_key=custodian_key)
        self.tier = auth.tier
        self.match_rule = match_rule
        self.value_field = value_field
        self.ops: AggregateOps = ops or SerialAggregateOps()
        self.chunk_size = chunk_size
        self.queries_total = len(queries)
        keys = bulk_match_keys(persons_of(queries), [match_rule],
                               executor=getattr(self.ops, "executor", None),
                               today=utc_date(clock()))[match_rule]
        self.queries_without_key = sum(1 for k in keys if k is None)
        distinct = _distinct_keys(keys)
        del keys
        self._keys: list[bytes] | None = _shuffled(distinct)
        self.element_count = len(distinct)
        self._a = oprf.random_scalar()
        self.open_response: AggregateOpenResponse | None = None
        self.result: AggregateResult | None = None
        self.challenge: MatchChallenge | None = None
        self.stats: dict[str, float] = {"blind_s": 0.0, "reblind_s": 0.0, "prove_s": 0.0}
        self._custodian = bytearray()
        self._custodian_hash = hashlib.sha256()
        self._reblinded = bytearray()
        self._reblinded_hash = hashlib.sha256()
        self._custodian_seq = 0
        self._custodian_received = 0
        self._uploaded = 0

    @property
    def chunk_count(self) -> int:
        return -(-self.element_count // self.chunk_size)

    def _discard(self) -> None:
        self._a = b""
        self._keys = None
        self._custodian = bytearray()
        self._reblinded = bytearray()

    # -- steps (sends go through ``send``, received messages through ``handle``) -----

    def open_request(self) -> AggregateOpenRequest:
        return self.send(AggregateOpenRequest)  # type: ignore[no-any-return]

    def _open_request(self) -> AggregateOpenRequest:
        if self.element_count == 0:
            raise ProtocolError(f"no query has a match key under rule {self.match_rule!r}")
        req = AggregateOpenRequest(
            session_id=self.session_id, signed_authorization=self.signed.to_bytes(),
            tier=self.tier.value, match_rule=self.match_rule, value_field=self.value_field,
            element_count=self.element_count,
        )
        self.transcript.add("open", req)
        return req

    def _on_open(self, resp: AggregateOpenResponse) -> None:
        if resp.session_id != self.session_id:
            raise ProtocolError("open response for another session")
        if (resp.tier, resp.match_rule, resp.value_field) != (
            self.tier.value, self.match_rule, self.value_field
        ):
            raise ProtocolError("custodian granted a different tier, rule or value field")
        if resp.element_count != self.element_count:
            raise ProtocolError("custodian granted a different element count")
        self.open_response = resp
        self.transcript.add("open", resp)

    def blinded_chunks(self) -> Iterator[BlindedChunk]:
        """``a*H(v)`` for the shuffled distinct keys, chunk by chunk."""
        return self.send(BlindedChunk)  # type: ignore[no-any-return]

    def _blinded_stream(self) -> Iterator[BlindedChunk]:
        if self._keys is None:
            raise ProtocolError("the blinded elements of a session are sent once")
        keys = self._keys
        self._keys = None  # nothing per query survives blinding
        return self._blind(keys)

    def _blind(self, keys: list[bytes]) -> Iterator[BlindedChunk]:
        for seq, start in enumerate(range(0, len(keys), self.chunk_size)):
            started = time.perf_counter()
            elements = self.ops.hash_multiply(self._a, keys[start:start + self.chunk_size])
            self.stats["blind_s"] += time.perf_counter() - started
            chunk = BlindedChunk(seq=seq, elements=elements)
            self.transcript.add("blinded", chunk)
            self._uploaded += len(elements) // ELEMENT_SIZE
            yield chunk

    def _on_custodian(self, chunk: CustodianChunk) -> None:
        assert self.open_response is not None
        if self._uploaded != self.element_count:
            raise ProtocolError("custodian elements before the whole upload was sent")
        if chunk.seq != self._custodian_seq:
            raise ProtocolError(f"custodian chunk {chunk.seq} out of order")
        n = check_elements(chunk.elements, f"custodian chunk {chunk.seq}")
        if n == 0 or n > MAX_CUSTODIAN_CHUNK:
            raise ProtocolError(f"custodian chunk {chunk.seq} has {n} elements")
        if self._custodian_received + n > self.open_response.custodian_count:
            raise ProtocolError("custodian sent more elements than it announced")
        started = time.perf_counter()
        reblinded = self.ops.multiply(self._a, chunk.elements)  # validates every element first
        self.stats["reblind_s"] += time.perf_counter() - started
        self._custodian += chunk.elements
        self._custodian_hash.update(chunk.elements)
        self._reblinded += reblinded
        self._reblinded_hash.update(reblinded)
        self._custodian_received += n
        self._custodian_seq += 1
        self.transcript.add("custodian", chunk)

    def reblinded_chunks(self) -> Iterator[ReblindedChunk]:
        """``a*c_j`` for every custodian element, in the order received."""
        return self.send(ReblindedChunk)  # type: ignore[no-any-return]

    def _reblinded_stream(self) -> Iterator[ReblindedChunk]:
        assert self.open_response is not None
        if self._custodian_received != self.open_response.custodian_count:
            raise ProtocolError(f"received {self._custodian_received} of "
                                f"{self.open_response.custodian_count} custodian elements")
        return self._reblinded_slices(bytes(self._reblinded))

    def _reblinded_slices(self, buffer: bytes) -> Iterator[ReblindedChunk]:
        """Slices of at most ``MAX_CHUNK_ELEMENTS``; one empty chunk when ``|W| = 0``, so
        the stream still names its session."""
        step = MAX_CHUNK_ELEMENTS * ELEMENT_SIZE
        for seq, start in enumerate(range(0, max(len(buffer), 1), step)):
            chunk = ReblindedChunk(seq=seq, elements=buffer[start:start + step])
            self.transcript.add("reblinded", chunk)
            yield chunk

    def _on_challenge(self, msg: MatchChallenge) -> None:
        assert self.open_response is not None
        positions = _positions(msg.matched, self.open_response.custodian_count)
        if positions.size != msg.count:
            raise ProtocolError("the matched bitmap disagrees with the count")
        if msg.count > min(self.element_count, self.open_response.custodian_count):
            raise ProtocolError(f"count {msg.count} is impossible for {self.element_count} "
                                "elements")
        self.challenge = msg
        self.transcript.add("result", msg)

    def consistency_proof(self) -> ConsistencyProof:
        """Prove the reblinded elements at the matched positions use this session's scalar."""
        return self.send(ConsistencyProof)  # type: ignore[no-any-return]

    def _proof(self) -> ConsistencyProof:
        assert self.challenge is not None and self.open_response is not None
        positions = _positions(self.challenge.matched, self.open_response.custodian_count)
        started = time.perf_counter()
        if positions.size == 0:
            proof = ConsistencyProof(b"", b"", b"")
        else:
            weights = consistency_weights(
                self.session_id, self.challenge.matched, self._custodian_hash.digest(),
                self._reblinded_hash.digest(), int(positions.size))
            custodian = [bytes(self._custodian[j * ELEMENT_SIZE:(j + 1) * ELEMENT_SIZE])
                         for j in positions.tolist()]
            proof = prove_consistency(self._a, weights, custodian)
        self.stats["prove_s"] = time.perf_counter() - started
        self._a = b""
        self._custodian = bytearray()
        self._reblinded = bytearray()
        self.transcript.add("result", proof)
        return proof

    @property
    def count(self) -> int:
        """The count the custodian announced (0 before its challenge)."""
        return 0 if self.challenge is None else self.challenge.count

    def _on_release(self, release: AggregateRelease) -> None:
        assert self.open_response is not None
        if release.count != self.count:
            raise ProtocolError("custodian released another count than it announced")
        if release.withheld or self.tier is Tier.CARDINALITY:
            if release.sum is not None:
                raise ProtocolError("a withheld sum or a cardinality release carries no sum")
        elif release.sum is None:
            raise ProtocolError("an aggregate release without a sum must say it is withheld")
        elif abs(release.sum) >= max(self.count, 1) << VALUE_BITS or (
                self.count == 0 and release.sum):
            raise ProtocolError("the released sum is impossible for the count")
        self.result = AggregateResult(
            tier=self.tier.value, count=release.count, sum=release.sum,
            withheld=release.withheld, reason=release.reason, elements=self.element_count,
            custodian_elements=self.open_response.custodian_count,
        )
        self.transcript.add("result", release)


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class AggregateOutcome:
    """What an in-process run produced."""

    result: AggregateResult
    receipt: Receipt
    requester_stats: dict[str, float] = field(default_factory=dict)
    custodian_stats: dict[str, float] = field(default_factory=dict)


def run_aggregate_in_process(
    requester: AggregateRequesterSession,
    custodian: AggregateCustodianSession,
    *,
    requester_id: str,
    observe: Callable[[object], None] | None = None,
) -> AggregateOutcome:
    """Run both sides of one aggregate session in this process, no network.

    ``requester_id`` stands in for the transport-authenticated identity; ``observe`` (if
    given) sees every message in the order it crosses, e.g. to inspect the wire.
    """
    def send(message: object) -> object:
        if observe is not None:
            observe(message)
        return message

    opened = custodian.handle(send(requester.open_request()), peer_id=requester_id)
    requester.handle(send(opened))
    for chunk in requester.blinded_chunks():
        custodian.handle(send(chunk))
    for element_chunk in custodian.custodian_chunks():
        requester.handle(send(element_chunk))
    for reblinded in requester.reblinded_chunks():
        custodian.handle(send(reblinded))
    requester.handle(send(custodian.challenge()))
    release = custodian.handle(send(requester.consistency_proof()))
    requester.handle(send(release))
    receipt = custodian.handle(send(requester.close_request()))
    countersigned = requester.handle(send(receipt))
    assert isinstance(countersigned, Receipt) and requester.result is not None
    if countersigned.requester_signature:
        custodian.countersign(countersigned)
    return AggregateOutcome(
        result=requester.result, receipt=countersigned,
        requester_stats=dict(requester.stats), custodian_stats=dict(custodian.stats),
    )
