"""Aggregate and cardinality tiers: Private Intersection-Sum-with-Cardinality.

See docs/architecture.md, Aggregate and cardinality tiers.

The protocol is the one of Ion et al. ("On Deploying Secure Computing: Private
Intersection-Sum-with-Cardinality", EuroS&P 2020; Google's Private Join and Compute), with
the sum delivered to the *requester* through a one-time-pad mask.

This module is a thin tier over the session core (``protocol.sessions.core``; see
docs/architecture.md, Sessions): the core opens, gates every message, counts, closes and
countersigns; this module holds the tier's messages, its two transition tables
(``AGGREGATE_CUSTODIAN_TRANSITIONS``, ``AGGREGATE_REQUESTER_TRANSITIONS``, covering what each
side sends and receives, and only this tier's messages, so an identity-tier message in an
aggregate session is a ``ProtocolError``), their handlers, and the cryptography.

Notation: ``H`` = hash-to-group into ristretto255 with this tier's own DST
(``HASH_TO_GROUP_DST``); ``a`` / ``b`` = fresh per-session secret scalars of the requester /
custodian; ``V`` = the requester's distinct match keys under the session's one match rule;
``W`` = the custodian's distinct match keys of in-scope records, each with the value ``t``
(the sum of the value column over the records sharing that key); ``Enc`` = Paillier under a
fresh per-session key of the custodian (``protocol.crypto.paillier``, >= 2048-bit modulus).

::

    Requester A                                      Custodian B
    open_request()        --AggregateOpenRequest-->  decide (tier, rule, value field, budget),
                          <-AggregateOpenResponse--  reserve |V|; Paillier key; scalar b
    blinded_chunks()      --BlindedChunk*--------->  validate, count, b*(a*H(v))
                          <-DoubleBlindedChunk*----  double_blinded_chunks(): ALL of them,
                                                     in one fresh uniform random order
                          <-CustodianPairsChunk*---  pair_chunks(): (b*H(w), Enc(t)) in a
                                                     fresh uniform random order
    match a*(b*H(w)) against the double-blinded set (locally)
    masked_sum()          --MaskedSum------------->  count >= min? decrypt ONE ciphertext
                          <-SumReveal--------------  S + R mod n (or withheld)
    close_request()       --CloseRequest---------->  signed Receipt (ledger)

A multiplies the matched ciphertexts, adds a mask ``R`` uniform in ``Z_n`` and re-randomizes
with a full-strength ``r^n``; B decrypts exactly one ciphertext per session (the state
machine accepts one ``MaskedSum`` and then drops the private key) and returns ``S + R mod
n``; A subtracts ``R``.  The ``cardinality`` tier runs the same exchange without any
Paillier key, ciphertext or decryption.

What each party learns (semi-honest parties; exact leakage)
-----------------------------------------------------------
Requester A: ``|W|`` (the number of pairs, announced at open), the cardinality ``|V ∩ W|``
and, in the aggregate tier, the sum ``S`` of ``t`` over ``V ∩ W`` unless B withholds it.
Nothing links a returned element or a pair to a record: the double-blinded set comes back
as a whole in a fresh CSPRNG permutation, B's pairs arrive in another one, and without
``b`` A cannot connect ``b*a*H(v)`` to ``a*H(v)``.  Ciphertexts hide every ``t`` (DCR +
short-exponent assumption, see ``paillier_fast``).  A also sees the public Paillier
modulus and the custodian's ``min_aggregate_count`` (it is in the authorization).

Custodian B: ``|V|`` (the element count, which is also the budget unit), the count A
reports in ``MaskedSum`` (recorded in the ledger), and ``S + R mod n``, which is uniform in
``Z_n`` whatever ``S`` is (``R`` is uniform in ``Z_n``: perfectly hiding, not merely
statistically).  The elements ``a*H(v)`` are pseudorandom to B (DDH in ristretto255), and
the final ciphertext is re-randomized with a full ``r^n`` so B cannot recognise which of its
own ciphertexts were multiplied into it.

Policy (decided in ``protocol.policy.decide``, never here): the tier comes from the signed
authorization and must be ``aggregate`` or ``cardinality`` (the tiers this session serves);
the session names exactly one match rule and, in the aggregate tier, the value column to sum,
which the authorization must name in ``disclosure_fields`` (the authority CLI's convention)
and the custodian policy must not bar; named-subject authorizations are not served.  The
evaluation budget is reserved at open (``|V|``) and counted chunk by chunk; every later
message passes the core's gate (owner, validity window).  Every release is an
``aggregate_release`` entry in the custodian's audit chain.

Limits of the guarantees (stated, not hidden)
---------------------------------------------
* ``min_aggregate_count`` is enforced by B on the count **A reports**: B cannot verify it.
  A requester that deviates could report a false count, or submit a ciphertext other than
  the product of the matched ones (e.g. one custodian ciphertext, learning one unlinked
  value).  One decryption per session, the budget, the audit entry and named-subject
  authorizations bound the damage; a malicious requester is outside this tier's model.
* In the cardinality tier A computes the count itself, so ``min_aggregate_count`` cannot
  hide it; B records whether it was below the minimum.
* A custodian that deviates (garbage pairs, chosen elements) can falsify the result, and,
  because A reports the count, could learn the cardinality of a set *it* chose, e.g.
  whether one of its own records is on A's list.  The sum stays hidden from it.
* Aggregates over overlapping query lists allow differencing across sessions; the budget
  and the oversight ledger are the controls, as for any statistical release.
* A session id is never reused: the Paillier key and ``b`` live only in the session object,
  so a broken session cannot be resumed; A opens a new one (and pays budget again).

Every error leaves a session ``FAILED`` with its ``failure_reason`` (the core's rule), and
the custodian drops ``b`` and the Paillier private key: a session holding one-time secrets is
not worth repairing.
"""

from __future__ import annotations

import math
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
import rbcl
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from phe import paillier

from protocol.accounting.port import Reservation
from protocol.crypto import oprf
from protocol.crypto import paillier as pf
from protocol.crypto.encoding import encode
from protocol.domain.engine import Engine
from protocol.domain.messages import (
    MAX_CHUNK_ELEMENTS,
    CloseRequest,
    Receipt,
    Transcript,
)
from protocol.domain.records import PersonRecord, QueryRecord, match_keys_bulk
from protocol.domain.recordstore import bulk_match_keys, persons_of
from protocol.engines.base import BuildCache, utc_date
from protocol.errors import InvalidElementError, InvalidRecordError, ProtocolError
from protocol.policy.decide import Mode, SessionRequest, SignedAuthorization, Tier
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
    "DEFAULT_DOUBLE_BLINDED_CHUNK",
    "DEFAULT_PAIR_CHUNK",
    "ELEMENT_SIZE",
    "HASH_TO_GROUP_DST",
    "MAX_PAIR_CHUNK",
    "AggregateCustodian",
    "AggregateCustodianSession",
    "AggregateCustodianState",
    "AggregateOpenRequest",
    "AggregateOpenResponse",
    "AggregateOps",
    "AggregateOutcome",
    "AggregateRequesterSession",
    "AggregateRequesterState",
    "AggregateResult",
    "BlindedChunk",
    "CustodianPairsChunk",
    "DoubleBlindedChunk",
    "MaskedSum",
    "PaillierSettings",
    "SerialAggregateOps",
    "SumReveal",
    "ValueIndex",
    "check_elements",
    "hash_multiply_span",
    "multiply_span",
    "pairs_job",
    "plaintext_answer",
    "run_aggregate_in_process",
]

#: Hash-to-group DST of this tier: its group elements never collide with OPRF inputs.
HASH_TO_GROUP_DST = b"gated-psi/aggregate/hash-to-group/v1"
AGGREGATE_TIERS = frozenset({Tier.AGGREGATE, Tier.CARDINALITY})
#: The engine whose group (ristretto255) and hash-to-group this tier uses.
ENGINE = Engine.OPRF

ELEMENT_SIZE = oprf.ELEMENT_SIZE
#: Requester -> custodian chunks: 4096 x 32 B = 128 KiB; the custodian accepts up to 65,536.
DEFAULT_BLINDED_CHUNK = 4096
#: Custodian -> requester double-blinded chunks: 65,536 x 32 B = 2 MiB (the maximum too).
DEFAULT_DOUBLE_BLINDED_CHUNK = 65_536
MAX_DOUBLE_BLINDED_CHUNK = 65_536
#: Pairs per chunk: 2048 x (32 + 512) B ~ 1.1 MiB at 2048-bit keys; at most 8192 (~4.5 MiB),
#: under the services' 8 MiB message limit.
DEFAULT_PAIR_CHUNK = 2048
MAX_PAIR_CHUNK = 8192
#: Every per-key value (after folding duplicate keys) satisfies |t| < 2^VALUE_BITS (int64).
VALUE_BITS = 63
_MAX_SESSION_ID = 128

_IDENTITY = bytes(ELEMENT_SIZE)
_scalarmult = rbcl.crypto_scalarmult_ristretto255


# --------------------------------------------------------------------------- encodings


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
    """B -> A: what was granted, ``|W|`` and (aggregate tier) the Paillier modulus."""

    session_id: str
    authorization_id: str
    custodian_id: str
    tier: str
    match_rule: str
    value_field: str
    element_count: int
    pair_count: int
    paillier_n: bytes  # big-endian modulus; empty in the cardinality tier
    min_aggregate_count: int
    budget_remaining: int

    def transcript_bytes(self) -> bytes:
        return encode(
            b"aggregate-open-response", self.session_id, self.authorization_id,
            self.custodian_id, self.tier, self.match_rule, self.value_field, self.paillier_n,
            self.element_count, self.pair_count, self.min_aggregate_count, self.budget_remaining,
        )


@dataclass(frozen=True)
class BlindedChunk:
    """A -> B: ``a*H(v)`` for a slice of A's shuffled distinct keys (``k * 32`` bytes)."""

    seq: int
    elements: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"aggregate-blinded", self.seq, self.elements)


@dataclass(frozen=True)
class DoubleBlindedChunk:
    """B -> A: a slice of ``{b*a*H(v)}`` in one random order over the whole set."""

    seq: int
    elements: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"aggregate-double-blinded", self.seq, self.elements)


@dataclass(frozen=True)
class CustodianPairsChunk:
    """B -> A: ``k`` pairs ``(b*H(w), Enc(t))``: ``k * 32`` element bytes and ``k`` fixed-size
    ciphertexts (none in the cardinality tier)."""

    seq: int
    elements: bytes
    ciphertexts: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"aggregate-pairs", self.seq, self.elements, self.ciphertexts)


@dataclass(frozen=True)
class MaskedSum:
    """A -> B: the count A found and ``Enc(S + R)``, re-randomized (empty for cardinality)."""

    count: int
    ciphertext: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"aggregate-masked-sum", self.count, self.ciphertext)


@dataclass(frozen=True)
class SumReveal:
    """B -> A: ``S + R mod n`` (big-endian), or ``withheld`` with a machine-readable reason."""

    count: int
    withheld: bool
    masked_sum: bytes
    reason: str = ""

    def transcript_bytes(self) -> bytes:
        return encode(
            b"aggregate-sum-reveal", self.count, self.withheld, self.masked_sum, self.reason
        )


class AggregateTranscript(Transcript):
    """Transcript with this tier's streams (each in a fixed order on both sides)."""

    STREAMS = ("open", "blinded", "double-blinded", "pairs", "result")


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


def pairs_job(
    scalar: bytes, spec: pf.EncryptorSpec | None, keys: Sequence[bytes], values: Sequence[int]
) -> tuple[bytes, bytes, float, float]:
    """One chunk of custodian pairs ``(b*H(w), Enc(t))``: one job of ``AggregateOps.pairs``;
    also returns (group CPU s, Paillier CPU s) for the session's stats."""
    t0 = time.process_time()
    elements = hash_multiply_span(scalar, keys)
    t1 = time.process_time()
    ciphertexts = b""
    if spec is not None:
        ciphertexts = pf.FastEncryptor.from_spec(spec).encrypt_to_bytes(values)
    return elements, ciphertexts, t1 - t0, time.process_time() - t1


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

    def pairs(
        self, scalar: bytes, spec: pf.EncryptorSpec | None,
        jobs: Iterable[tuple[Sequence[bytes], Sequence[int]]],
    ) -> Iterator[tuple[bytes, bytes, float, float]]: ...


class SerialAggregateOps:
    """Everything in this process: for tests, small sessions and one-core hosts."""

    def hash_multiply(self, scalar: bytes, inputs: Sequence[bytes]) -> bytes:
        return hash_multiply_span(scalar, inputs)

    def multiply(self, scalar: bytes, elements: bytes) -> bytes:
        check_elements(elements, "element buffer")
        return multiply_span(scalar, bytes(elements), 0)

    def pairs(
        self, scalar: bytes, spec: pf.EncryptorSpec | None,
        jobs: Iterable[tuple[Sequence[bytes], Sequence[int]]],
    ) -> Iterator[tuple[bytes, bytes, float, float]]:
        for keys, values in jobs:
            yield pairs_job(scalar, spec, keys, values)


# --------------------------------------------------------------------------- helpers


def _random_permutation(n: int) -> np.ndarray:
    """A uniform permutation of ``range(n)`` from the OS CSPRNG.

    Sorting n random 64-bit keys gives a uniform permutation when the keys are distinct;
    on the (~n^2 / 2^65) chance of a tie we draw again, so the result is exactly uniform.
    numpy's own generators are not cryptographic, and an order A could predict would link
    returned elements to its inputs.
    """
    while True:
        keys = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        if n < 2 or bool(np.all(ordered[1:] != ordered[:-1])):
            return order


def _shuffled(items: Sequence[bytes]) -> list[bytes]:
    return [items[i] for i in _random_permutation(len(items)).tolist()]


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


# --------------------------------------------------------------------------- custodian


@dataclass(frozen=True)
class PaillierSettings:
    """Paillier parameters of the custodian.  Production minimums are enforced here.

    ``test_mode`` is the only way to get a modulus below 2048 bits (1024-bit keys keep the
    property tests fast); nothing outside tests sets it.
    """

    key_bits: int = pf.DEFAULT_KEY_BITS
    exponent_bits: int = pf.DEFAULT_EXPONENT_BITS
    window_bits: int = pf.DEFAULT_WINDOW_BITS
    test_mode: bool = False

    def __post_init__(self) -> None:
        if not self.test_mode:
            if self.key_bits < pf.MIN_KEY_BITS:
                raise ValueError(
                    f"Paillier modulus of {self.key_bits} bits is below the production "
                    f"minimum of {pf.MIN_KEY_BITS}"
                )
            if self.exponent_bits < pf.MIN_EXPONENT_BITS:
                raise ValueError(
                    f"randomizer exponent of {self.exponent_bits} bits is below the "
                    f"production minimum of {pf.MIN_EXPONENT_BITS}"
                )
        if not 1 <= self.window_bits <= pf.MAX_WINDOW_BITS:
            raise ValueError(f"window_bits must be in 1..{pf.MAX_WINDOW_BITS}")

    @property
    def min_key_bits(self) -> int:
        return 512 if self.test_mode else pf.MIN_KEY_BITS


@dataclass(frozen=True)
class ValueIndex:
    """The custodian's distinct match keys under one rule, with summed values.

    Records sharing a key (duplicates in the file) become one pair whose value is their
    sum, so ``W`` is a set and A's count is a count of distinct people.  Stored compactly
    (one blob of keys plus offsets, int64 values): ~35 bytes per key at 1.3M records.
    """

    rule_id: str
    value_field: str  # "" in the cardinality tier
    key_blob: bytes
    key_offsets: np.ndarray  # int64, len(self) + 1 entries
    values: np.ndarray  # int64, parallel to the keys; zeros in the cardinality tier
    records: int  # in-scope records that have a key under the rule
    build_seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.key_offsets.shape[0]) - 1

    def keys_at(self, positions: Sequence[int]) -> list[bytes]:
        blob, off = self.key_blob, self.key_offsets
        return [blob[off[i]:off[i + 1]] for i in positions]

    def values_at(self, positions: Sequence[int]) -> list[int]:
        values: list[int] = self.values[np.asarray(positions, dtype=np.int64)].tolist()
        return values

    @property
    def folded(self) -> int:
        """Records merged into another record's key."""
        return self.records - len(self)


class AggregateCustodian:
    """The aggregate tier on top of an identity-tier :class:`~protocol.sessions.identity.Custodian`.

    Shares its records, policy, ledger and signing key; adds value indexes and the
    aggregate ops.  ``session()`` starts one requester session.
    """

    def __init__(
        self, custodian: Custodian, *, ops: AggregateOps | None = None,
        paillier_settings: PaillierSettings | None = None,
    ) -> None:
        self.custodian = custodian
        self.ops: AggregateOps = ops or SerialAggregateOps()
        self.settings = paillier_settings or PaillierSettings()
        # locks injected through the config: the core runs no threads
        self._indexes: BuildCache[tuple[str, str], ValueIndex] = BuildCache(
            custodian.config.new_lock)

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

    def _build(self, rule_id: str, value_field: str) -> ValueIndex:
        started = time.perf_counter()
        records, in_scope = self.config.records, self.custodian.in_scope
        today = utc_date(self.config.clock())
        slots: dict[bytes, int] = {}
        key_list: list[bytes] = []
        values: list[int] = []
        with_key = 0
        for start in range(0, len(in_scope), INDEX_SLICE):
            part = [records[int(i)] for i in in_scope[start:start + INDEX_SLICE]]
            keys = match_keys_bulk(part, [rule_id], today=today)[rule_id]
            for record, key in zip(part, keys, strict=True):
                if key is None:
                    continue
                with_key += 1
                value = _record_value(record, value_field) if value_field else 0
                slot = slots.get(key)
                if slot is None:
                    slots[key] = len(key_list)
                    key_list.append(key)
                    values.append(value)
                else:
                    values[slot] += value
        del slots
        if any(abs(v) >= 1 << VALUE_BITS for v in values):
            raise InvalidRecordError(
                f"{value_field} summed over duplicate records exceeds 2^{VALUE_BITS}"
            )
        offsets = np.zeros(len(key_list) + 1, dtype=np.int64)
        np.cumsum([len(k) for k in key_list], out=offsets[1:])
        return ValueIndex(
            rule_id=rule_id, value_field=value_field, key_blob=b"".join(key_list),
            key_offsets=offsets, values=np.asarray(values, dtype=np.int64), records=with_key,
            build_seconds=time.perf_counter() - started,
        )

    def session(self) -> AggregateCustodianSession:
        return AggregateCustodianSession(self)


class AggregateCustodianState(StrEnum):
    AWAIT_OPEN = "await_open"
    RECEIVING = "receiving"  # taking BlindedChunks; pairs may already stream
    SERVING = "serving"  # every element in; double-blinded set released
    REVEALED = "revealed"  # the one MaskedSum was answered
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
                                closable=(_C.RECEIVING, _C.SERVING, _C.REVEALED)),
        (_C.RECEIVING, BlindedChunk): Row("_blinded", _C.RECEIVING),
        (_C.RECEIVING, Send(DoubleBlindedChunk)): Row("_double_blinded", _C.SERVING,
                                                      stream=True),
        # The pairs do not depend on A's input: they may stream while A still uploads.
        (_C.RECEIVING, Send(CustodianPairsChunk)): Row("_pair_stream", _C.RECEIVING,
                                                       stream=True),
        (_C.SERVING, Send(CustodianPairsChunk)): Row("_pair_stream", _C.SERVING, stream=True),
        (_C.SERVING, MaskedSum): Row("_reveal", _C.REVEALED),  # one decryption per session
    },
    initial=_C.AWAIT_OPEN, failed=_C.FAILED, final=(_C.CLOSED,),
)


class AggregateCustodianSession(CustodianCore):
    """One requester session on the custodian side, on the session core.

    Received messages go through ``handle(message, peer_id=...)``; what it sends
    (``double_blinded_chunks()`` once every element is in, ``pair_chunks()`` any time after
    open) goes through ``send``.  ``stats`` holds per-phase timings.
    """

    TABLE = AGGREGATE_CUSTODIAN_TRANSITIONS
    SERVED_TIERS = AGGREGATE_TIERS
    SERVED_ENGINES = frozenset({ENGINE})
    RESUMABLE = False  # the Paillier key and b live only in this object
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
        self.released: SumReveal | None = None
        self.stats: dict[str, float] = {
            "keygen_s": 0.0, "evaluate_s": 0.0, "pairs_wall_s": 0.0, "pairs_group_cpu_s": 0.0,
            "pairs_paillier_cpu_s": 0.0, "decrypt_s": 0.0,
        }
        self._b = b""
        self._double: bytearray = bytearray()
        self._public_key: paillier.PaillierPublicKey | None = None
        self._private_key: paillier.PaillierPrivateKey | None = None
        self._spec: pf.EncryptorSpec | None = None
        self._pairs_started = False
        self._pairs_sent = 0
        self._expected_seq = 0

    @property
    def element_count(self) -> int:
        """``|V|``: the elements granted (and reserved) at open."""
        return self.element_limit

    def _discard(self) -> None:
        self._private_key = None
        self._b = b""

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
        n_bytes = b""
        if self.tier is Tier.AGGREGATE:
            started = time.perf_counter()
            settings = self.owner.settings
            pub, priv = pf.generate_keypair(settings.key_bits, min_key_bits=settings.min_key_bits)
            # The tables are built from this public spec (n, h) by whichever process
            # encrypts; the private key never leaves this object.
            self._spec = pf.new_spec(pub, exponent_bits=settings.exponent_bits,
                                     window_bits=settings.window_bits)
            self._public_key, self._private_key = pub, priv
            n_bytes = pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")
            self.stats["keygen_s"] = time.perf_counter() - started
        return AggregateOpenResponse(
            session_id=req.session_id, authorization_id=auth.authorization_id,
            custodian_id=self.context.policy.custodian_id, tier=req.tier,
            match_rule=req.match_rule, value_field=req.value_field,
            element_count=self.element_count, pair_count=len(self.index), paillier_n=n_bytes,
            min_aggregate_count=auth.min_aggregate_count,
            budget_remaining=self.context.ledger.budget(auth.authorization_id).remaining,
        )

    # -- evaluate --------------------------------------------------------------

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

    def double_blinded_chunks(
        self, chunk_elements: int = DEFAULT_DOUBLE_BLINDED_CHUNK, *, peer_id: str | None = None,
    ) -> Iterator[DoubleBlindedChunk]:
        """All of ``{b*a*H(v)}`` in one fresh uniform order, sliced into chunks.

        Shuffling the whole set (not chunk by chunk) is what keeps A from linking a
        returned element even to the chunk it came from.
        """
        return self.send(DoubleBlindedChunk, chunk_elements, peer_id=peer_id)  # type: ignore[no-any-return]

    def _double_blinded(
        self, chunk_elements: int = DEFAULT_DOUBLE_BLINDED_CHUNK
    ) -> Iterator[DoubleBlindedChunk]:
        if not 0 < chunk_elements <= MAX_DOUBLE_BLINDED_CHUNK:
            raise ProtocolError(f"chunk_elements must be in 1..{MAX_DOUBLE_BLINDED_CHUNK}")
        if self.received != self.element_count:
            raise ProtocolError(
                f"only {self.received} of {self.element_count} blinded elements received"
            )
        dtype = np.dtype(f"S{ELEMENT_SIZE}")
        items = np.frombuffer(bytes(self._double), dtype=dtype)
        shuffled = items[_random_permutation(len(items))].tobytes()
        self._double = bytearray()
        return self._slices(shuffled, chunk_elements)

    def _slices(self, buffer: bytes, chunk_elements: int) -> Iterator[DoubleBlindedChunk]:
        step = chunk_elements * ELEMENT_SIZE
        for seq, start in enumerate(range(0, len(buffer), step)):
            chunk = DoubleBlindedChunk(seq=seq, elements=buffer[start:start + step])
            self.transcript.add("double-blinded", chunk)
            yield chunk

    def pair_chunks(
        self, chunk_pairs: int = DEFAULT_PAIR_CHUNK, *, peer_id: str | None = None,
    ) -> Iterator[CustodianPairsChunk]:
        """``(b*H(w), Enc(t))`` for every distinct key, in a fresh uniform order.

        Independent of A's input, so it may stream while A is still uploading.  The order
        is drawn up front and chunks are computed lazily (on the ops pool), so the 1.3M
        ciphertexts (~0.7 GB) never sit in memory at once.
        """
        return self.send(CustodianPairsChunk, chunk_pairs, peer_id=peer_id)  # type: ignore[no-any-return]

    def _pair_stream(self, chunk_pairs: int = DEFAULT_PAIR_CHUNK) -> Iterator[CustodianPairsChunk]:
        if not 0 < chunk_pairs <= MAX_PAIR_CHUNK:
            raise ProtocolError(f"chunk_pairs must be in 1..{MAX_PAIR_CHUNK}")
        if self._pairs_started:
            raise ProtocolError("the pairs of a session are produced once")
        self._pairs_started = True
        assert self.index is not None
        order = _random_permutation(len(self.index)).tolist()
        return self._pairs(order, chunk_pairs)

    def _pairs(self, order: list[int], chunk_pairs: int) -> Iterator[CustodianPairsChunk]:
        index = self.index
        assert index is not None
        aggregate = self.tier is Tier.AGGREGATE

        def jobs() -> Iterator[tuple[list[bytes], list[int]]]:
            for start in range(0, len(order), chunk_pairs):
                part = order[start:start + chunk_pairs]
                yield index.keys_at(part), (index.values_at(part) if aggregate else [])

        started = time.perf_counter()
        spec = self._spec if aggregate else None
        for seq, (elements, ciphertexts, group_s, paillier_s) in enumerate(
            self.owner.ops.pairs(self._b, spec, jobs())
        ):
            self.stats["pairs_group_cpu_s"] += group_s
            self.stats["pairs_paillier_cpu_s"] += paillier_s
            chunk = CustodianPairsChunk(seq=seq, elements=elements, ciphertexts=ciphertexts)
            self._pairs_sent += len(elements) // ELEMENT_SIZE
            self.transcript.add("pairs", chunk)
            self.stats["pairs_wall_s"] = time.perf_counter() - started
            yield chunk

    # -- reveal ----------------------------------------------------------------

    def _reveal(self, msg: MaskedSum) -> SumReveal:
        assert self.index is not None and self.tier is not None
        if self._pairs_sent != len(self.index):
            raise ProtocolError(
                f"masked sum before all pairs were sent ({self._pairs_sent} of {len(self.index)})"
            )
        if not 0 <= msg.count <= min(self.element_count, len(self.index)):
            raise ProtocolError(
                f"reported count {msg.count} is impossible for {self.element_count} elements "
                f"and {len(self.index)} pairs"
            )
        auth = self.authorization
        minimum = auth.min_aggregate_count
        reason = ""
        masked = b""
        if self.tier is Tier.CARDINALITY:
            if msg.ciphertext:
                raise ProtocolError("the cardinality tier carries no ciphertext")
            withheld = False
        elif msg.count < minimum:
            withheld, reason = True, "below_minimum_count"
        else:
            pub, priv = self._public_key, self._private_key
            if pub is None or priv is None:
                raise ProtocolError("this session's decryption was already used")
            started = time.perf_counter()
            value = pf.decode_ciphertext(pub, msg.ciphertext)  # in Z*_{n^2}, or raise
            plain = pf.decrypt_raw(priv, value)
            masked = plain.to_bytes((pub.n.bit_length() + 7) // 8, "big")
            self.stats["decrypt_s"] = time.perf_counter() - started
            withheld = False
        self._private_key = None  # one decryption per session, whatever happened
        # Durable account before anything leaves (as for identity-tier disclosures).
        self.context.ledger.audit("aggregate_release", {
            "authorization_id": auth.authorization_id, "session_id": self.session_id,
            "peer": self.peer_id, "tier": self.tier.value, "rule": self.match_rule,
            "value_field": self.value_field, "count": msg.count,
            "sum_released": bool(masked), "withheld": withheld, "reason": reason,
            "min_aggregate_count": minimum, "below_minimum": msg.count < minimum,
            "elements": self.element_count, "pairs": len(self.index),
        })
        reply = SumReveal(count=msg.count, withheld=withheld, masked_sum=masked, reason=reason)
        self.released = reply
        self.transcript.add("result", msg)
        self.transcript.add("result", reply)
        return reply

# --------------------------------------------------------------------------- requester


class AggregateRequesterState(StrEnum):
    START = "start"
    AWAIT_OPEN = "await_open"
    EXCHANGING = "exchanging"  # uploading; receiving the double-blinded set and pairs
    AWAIT_REVEAL = "await_reveal"
    REVEALED = "revealed"
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
        (_R.EXCHANGING, DoubleBlindedChunk): Row("_on_double", _R.EXCHANGING),
        (_R.EXCHANGING, CustodianPairsChunk): Row("_on_pairs", _R.EXCHANGING),
        (_R.EXCHANGING, Send(MaskedSum)): Row("_masked_sum", _R.AWAIT_REVEAL),
        (_R.AWAIT_REVEAL, SumReveal): Row("_on_reveal", _R.REVEALED),
        (_R.EXCHANGING, Send(CloseRequest)): Row("_close_request", _R.AWAIT_RECEIPT),
        (_R.REVEALED, Send(CloseRequest)): Row("_close_request", _R.AWAIT_RECEIPT),
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
    custodian_pairs: int = 0  # |W|, announced by the custodian


class AggregateRequesterSession(RequesterCore):
    """The requester's side of one aggregate or cardinality session, on the session core.

    ``queries`` must already be validated (``records.validate_queries``).  Only distinct
    match keys are sent, in a random order, and nothing per query is kept after blinding:
    the session could not link a result to a query even if it wanted to.
    """

    TABLE = AGGREGATE_REQUESTER_TRANSITIONS

    def __init__(
        self,
        signed_authorization: SignedAuthorization,
        queries: Sequence[QueryRecord] | Sequence[PersonRecord],
        *,
        match_rule: str | None = None,
        value_field: str | None = None,
        ops: AggregateOps | None = None,
        chunk_size: int = DEFAULT_BLINDED_CHUNK,
        session_id: str | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        custodian_key: Ed25519PublicKey | None = None,
        min_key_bits: int = pf.MIN_KEY_BITS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` dates the match keys (a birth date after today has none)."""
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
                if len(auth.disclosure_fields) != 1:
                    raise ValueError("name the value_field to sum")
                value_field = auth.disclosure_fields[0]
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
        self.min_key_bits = min_key_bits
        self.queries_total = len(queries)
        keys = bulk_match_keys(persons_of(queries), [match_rule],
                               executor=getattr(self.ops, "executor", None),
                               today=utc_date(clock()))[match_rule]
        seen = dict.fromkeys(k for k in keys if k is not None)
        self.queries_without_key = len(keys) - sum(1 for k in keys if k is not None)
        del keys
        distinct = list(seen)
        del seen
        self._keys: list[bytes] | None = _shuffled(distinct)
        self.element_count = len(distinct)
        self._a = oprf.random_scalar()
        self.open_response: AggregateOpenResponse | None = None
        self.result: AggregateResult | None = None
        self.stats: dict[str, float] = {"blind_s": 0.0, "match_s": 0.0, "sum_s": 0.0}
        self._public_key: paillier.PaillierPublicKey | None = None
        self._ct_size = 0
        self._nsquare_bytes = b""
        self._double_parts: list[bytes] = []
        self._double_received = 0
        self._double_seq = 0
        self._double_set: np.ndarray | None = None
        self._pairs_seq = 0
        self._pairs_received = 0
        self._matched: set[bytes] = set()
        self._product: Any = 1
        self._mask = 0
        self._uploaded = 0

    @property
    def chunk_count(self) -> int:
        return -(-self.element_count // self.chunk_size)

    def _discard(self) -> None:
        self._a = b""
        self._keys = None
        self._mask = 0
        self._double_set = None

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
        if self.tier is Tier.AGGREGATE:
            if not resp.paillier_n:
                raise ProtocolError("aggregate tier without a Paillier key")
            pub = paillier.PaillierPublicKey(int.from_bytes(resp.paillier_n, "big"))
            pf.check_public_key(pub, min_key_bits=self.min_key_bits)
            self._public_key = pub
            self._ct_size = pf.ciphertext_size(pub)
            self._nsquare_bytes = pub.nsquare.to_bytes(self._ct_size, "big")
            self._product = pf.to_modular(1)
        elif resp.paillier_n:
            raise ProtocolError("the cardinality tier carries no Paillier key")
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

    def _on_double(self, chunk: DoubleBlindedChunk) -> None:
        if chunk.seq != self._double_seq:
            raise ProtocolError(f"double-blinded chunk {chunk.seq} out of order")
        n = check_elements(chunk.elements, f"double-blinded chunk {chunk.seq}")
        if n == 0 or n > MAX_DOUBLE_BLINDED_CHUNK:
            raise ProtocolError(f"double-blinded chunk {chunk.seq} has {n} elements")
        if self._double_received + n > self.element_count:
            raise ProtocolError("custodian returned more elements than were sent")
        self._double_parts.append(chunk.elements)
        self._double_received += n
        self._double_seq += 1
        self.transcript.add("double-blinded", chunk)
        if self._double_received == self.element_count:
            dtype = np.dtype(f"S{ELEMENT_SIZE}")
            self._double_set = np.sort(np.frombuffer(b"".join(self._double_parts), dtype=dtype))
            self._double_parts = []

    def _on_pairs(self, chunk: CustodianPairsChunk) -> None:
        if self._double_set is None:
            raise ProtocolError("pairs arrived before the whole double-blinded set")
        assert self.open_response is not None
        if chunk.seq != self._pairs_seq:
            raise ProtocolError(f"pairs chunk {chunk.seq} out of order")
        k = check_elements(chunk.elements, f"pairs chunk {chunk.seq}")
        if k == 0 or k > MAX_PAIR_CHUNK:
            raise ProtocolError(f"pairs chunk {chunk.seq} has {k} pairs (1..{MAX_PAIR_CHUNK})")
        if self._pairs_received + k > self.open_response.pair_count:
            raise ProtocolError("custodian sent more pairs than it announced")
        if len(chunk.ciphertexts) != k * self._ct_size:
            raise InvalidElementError(
                f"pairs chunk {chunk.seq}: {len(chunk.ciphertexts)} ciphertext bytes for {k} pairs"
            )
        started = time.perf_counter()
        ours = self.ops.multiply(self._a, chunk.elements)  # validates every element first
        dtype = np.dtype(f"S{ELEMENT_SIZE}")
        candidates = np.frombuffer(ours, dtype=dtype)
        table = self._double_set
        hits: list[int] = []
        if len(table):
            pos = np.searchsorted(table, candidates)
            pos[pos >= len(table)] = 0
            hits = np.flatnonzero(table[pos] == candidates).tolist()
        found = {ours[i * ELEMENT_SIZE:(i + 1) * ELEMENT_SIZE] for i in hits}
        if len(found) != len(hits) or found & self._matched:
            raise ProtocolError("custodian sent the same key twice")
        self.stats["match_s"] += time.perf_counter() - started
        if self._public_key is not None and hits:
            started = time.perf_counter()
            self._accumulate(chunk, hits)  # validates first; a bad chunk changes nothing
            self.stats["sum_s"] += time.perf_counter() - started
        self._matched |= found
        self._pairs_received += k
        self._pairs_seq += 1
        self.transcript.add("pairs", chunk)

    def _accumulate(self, chunk: CustodianPairsChunk, hits: list[int]) -> None:
        """Multiply the matched ciphertexts in, after checking each is in ``Z*_{n^2}``."""
        pub = self._public_key
        assert pub is not None
        size, limit = self._ct_size, self._nsquare_bytes
        mod = pf.to_modular(pub.nsquare)
        part: Any = pf.to_modular(1)
        for i in hits:
            raw = chunk.ciphertexts[i * size:(i + 1) * size]
            if raw >= limit or not raw.strip(b"\x00"):  # same length: bytes order = int order
                raise InvalidElementError(f"pairs chunk {chunk.seq}: ciphertext out of range")
            part = part * pf.to_modular(int.from_bytes(raw, "big")) % mod
        # A product is a unit iff every factor is: one gcd per chunk instead of one per hit.
        if math.gcd(int(part), pub.n) != 1:
            raise InvalidElementError(f"pairs chunk {chunk.seq}: a ciphertext is not a unit")
        self._product = self._product * part % mod

    @property
    def count(self) -> int:
        """Matches found so far (final once every pair is in)."""
        return len(self._matched)

    def masked_sum(self) -> MaskedSum:
        """The count and ``Enc(S + R)``, freshly re-randomized; ``R`` stays here."""
        return self.send(MaskedSum)  # type: ignore[no-any-return]

    def _masked_sum(self) -> MaskedSum:
        assert self.open_response is not None  # EXCHANGING is entered only by the open reply
        if self._uploaded != self.element_count:
            raise ProtocolError(f"only {self._uploaded} of {self.element_count} elements sent")
        if self._double_set is None:
            raise ProtocolError("the double-blinded set is incomplete")
        if self._pairs_received != self.open_response.pair_count:
            raise ProtocolError(
                f"received {self._pairs_received} of {self.open_response.pair_count} pairs"
            )
        ciphertext = b""
        pub = self._public_key
        if pub is not None:
            started = time.perf_counter()
            self._mask = secrets.randbelow(pub.n)  # uniform in Z_n: S + R hides S perfectly
            masked = int(self._product) * pf.encrypt_plain(pub, self._mask) % pub.nsquare
            ciphertext = pf.encode_ciphertext(pub, pf.rerandomize(pub, masked))
            self.stats["sum_s"] += time.perf_counter() - started
        msg = MaskedSum(count=self.count, ciphertext=ciphertext)
        self.transcript.add("result", msg)
        self._a = b""
        self._double_set = None
        return msg

    def _on_reveal(self, reveal: SumReveal) -> None:
        assert self.open_response is not None
        if reveal.count != self.count:
            raise ProtocolError("custodian answered for another count")
        total: int | None = None
        pub = self._public_key
        if reveal.withheld:
            if reveal.masked_sum:
                raise ProtocolError("a withheld sum carries no value")
        elif pub is None:
            if reveal.masked_sum:
                raise ProtocolError("the cardinality tier reveals no sum")
        else:
            if len(reveal.masked_sum) != (pub.n.bit_length() + 7) // 8:
                raise ProtocolError("masked sum has the wrong length")
            masked = int.from_bytes(reveal.masked_sum, "big")
            if masked >= pub.n:
                raise ProtocolError("masked sum is not below n")
            total = (masked - self._mask) % pub.n
            if total > pub.n // 2:
                total -= pub.n
            if abs(total) >= max(self.count, 1) << VALUE_BITS or (self.count == 0 and total):
                raise ProtocolError("the revealed sum is impossible for the count")
        self._mask = 0
        self.result = AggregateResult(
            tier=self.tier.value, count=self.count, sum=total, withheld=reveal.withheld,
            reason=reveal.reason, elements=self.element_count,
            custodian_pairs=self.open_response.pair_count,
        )
        self.transcript.add("result", reveal)


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
    for double in custodian.double_blinded_chunks():
        requester.handle(send(double))
    for pairs in custodian.pair_chunks():
        requester.handle(send(pairs))
    reveal = custodian.handle(send(requester.masked_sum()))
    requester.handle(send(reveal))
    receipt = custodian.handle(send(requester.close_request()))
    countersigned = requester.handle(send(receipt))
    assert isinstance(countersigned, Receipt) and requester.result is not None
    if countersigned.requester_signature:
        custodian.countersign(countersigned)
    return AggregateOutcome(
        result=requester.result, receipt=countersigned,
        requester_stats=dict(requester.stats), custodian_stats=dict(custodian.stats),
    )

