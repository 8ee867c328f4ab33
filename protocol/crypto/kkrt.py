"""KKRT16 batched OPRF from OT extension: the second identity-tier match engine (issue 8).

Sans-I/O, like ``protocol.sessions.identity``: the Requester and the Custodian take message
objects and return message objects; the services (or ``run_kkrt_in_process``) only move
them.  The policy, budget, disclosure and receipt logic stays in the sessions
(``protocol.sessions``); this module is the hazmat primitive under the engine adapter
``protocol.engines.kkrt``.

Security (stated plainly)
-------------------------
**Semi-honest security only.**  Both parties are assumed to follow the protocol; a party
that deviates (a requester sending inconsistent extension columns, a custodian using
inconsistent keys) is *not* detected, beyond the malformed-input checks below.  The
analysis is that of Kolesnikov-Kumaresan-Rosulek-Trieu, "Efficient Batched Oblivious PRF
with Applications to Private Set Intersection" (CCS 2016), with IKNP OT extension
(Ishai-Kilian-Nissim-Petrank, CRYPTO 2003) and Chou-Orlandi "simplest OT" base OTs
(LATINCRYPT 2015, used here only in its semi-honest setting).

Parameters: computational security kappa = 128, statistical security lambda = 40.

* Base OTs: 512 Chou-Orlandi OTs over ristretto255 (libsodium via ``rbcl``).  The
  custodian (OPRF sender) is the base-OT *receiver*, with a secret 512-bit choice string
  ``s``; the requester is the base-OT sender.  Every group element from the peer passes
  ``oprf.deserialize_element`` (canonical, on the group, not the identity).
* Pseudorandom code, width w = 512 bits (KKRT need >= 424 at these parameters):
  ``C(x) = AES_kc(d xor 0) || AES_kc(d xor 1) || AES_kc(d xor 2) || AES_kc(d xor 3)``
  (tweak in the last byte) with ``d = BLAKE2b-128(x)`` and an AES-128 key ``kc`` derived
  from the session seed and a fresh custodian nonce (AES as a PRP/PRF).  Two random
  512-bit code words are closer than kappa = 128 bits with probability
  P[Bin(512, 1/2) < 128] = 2^-102.3, so over all pairs of the <= 2^22 inputs
  (n, N <= 2^21) KKRT's minimum-distance condition fails with probability < 2^-59.
  (At w = 424 the same tail is 2^-54.3 per pair, too weak for this many pairs.)
* OT extension (IKNP, KKRT's 1-out-of-2^kappa variant): columns of ``T0`` and ``T1`` are
  AES-128-CTR keystreams of the base-OT seeds; the requester sends
  ``u = T0 xor T1 xor C`` column-wise; the custodian forms ``q_j = t0_j xor (C(x_j) and s)``.
  The OPRF is ``F(k_j, x) = H(j, q_j xor (C(x) and s))`` with ``k_j = (q_j, s)`` and
  ``H = BLAKE2b-128`` (personalized, salted per session; modelled as a random oracle,
  as KKRT do).  Outputs are 16 bytes (kappa bits).
* Tags: ``T(O) = (pi(O) xor O)[:12]`` with pi = AES under a per-session public key
  (the fixed-key-AES hash analysed by Guo-Katz-Wang-Yu, S&P 2020, in the random
  permutation model).  O is uniform and unknown to the requester unless it matched, and
  even finding *some* preimage of a 96-bit T takes ~2^96 AES calls, so the tag set does
  not reveal outputs, while disclosure can still look records up by tag.  False
  matches: < n * N * 2^-96 < 2^-54.
* Cuckoo hashing: see ``protocol.crypto.kkrt_cuckoo`` (3 hash functions, m = ceil(1.30 n), no
  stash, failure <= 2^-40 for every n by a first-moment bound evaluated in code).  On
  failure the requester re-hashes with keys of the next ``attempt`` (the custodian sees
  the attempt number: that one bit says a 2^-40 event happened); after ``max_attempts``
  it raises ``CuckooHashingError``.

Per-session seeding: every public key (cuckoo, code, salt, tag) is derived from
``seed_context`` (the lead passes authorization id and session id) and the custodian's
fresh nonce; the OPRF keys ``(q_j, s)`` are fresh per session.  Tags and outputs are
therefore unlinkable across sessions and authorizations.  The custodian's secrets
(``s`` and its base-OT scalars) are derived from ``authorization_key``, the session seed
and that nonce.

Leakage, as for any KKRT PSI: the custodian learns the number of instances m + stash
(so n up to the factor 1.30) and the cuckoo attempt; the requester learns the number of
custodian records and, for its matched items only, the OPRF outputs.

Budget: one OPRF instance (bin or stash slot) = one unit, ``KKRTSetup.units`` in total;
``KKRTExtensionChunk.bins`` units per chunk, so the ledger can count before evaluating.

Message flow
------------
::

    Requester                                     Custodian
    setup()                 --KKRTSetup-->        handle(): validate, base-OT receiver
    handle(reply)           <-KKRTBaseOTReply--   (B_1..B_512, code nonce)
    extension_chunks()      --KKRTExtensionChunk*->handle(): q rows, evaluate records
    handle(tag chunk)       <-KKRTTagChunk*-----  tag_chunks(): sorted per hash function
    matches(), outputs()    (local)
    (disclosure: bin, output)* --------------->  find_many(proofs): one vectorized check

The engine does no I/O and holds no locks; one session object per protocol run.

Wiring (the engine adapter ``protocol.engines.kkrt`` does this for the sessions)
-------------------------------------------------------------------------------
* Requester: ``KKRTRequester(element_inputs, seed_context=auth_id | session_id)``;
  ``OpenRequest.element_count = requester.units``.  After the open response: send
  ``setup()``, feed back the ``KKRTBaseOTReply``, stream ``extension_chunks()``, feed
  every ``KKRTTagChunk``; ``matches()`` are element indices; a disclosure presents
  ``output_for(e).proof`` (20 bytes) in place of the 64-byte OPRF output.
* Custodian: ``KKRTCustodian(record_keys, authorization_key=<per-authorization secret>,
  seed_context=..., max_units=<reserved budget>, digests=<cached key_digests>)``; for
  each chunk, ``ledger.record_evaluation(..., chunk.bins)`` *then* ``handle(chunk)``;
  when ``state`` is ``EXTENDED`` stream ``tag_chunks()``; at disclosure
  ``find_many([parse_proof(p) for p in batch])`` gives each proof's verified record
  positions (tag lookup, bin check and re-evaluation for the whole batch at once).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import rbcl
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from protocol.crypto import oprf
from protocol.crypto.encoding import encode
from protocol.crypto.executor import Executor, Job
from protocol.crypto.kkrt_cuckoo import (
    CUCKOO_HASHES,
    CuckooPlacement,
    candidate_bins,
    place,
    table_size,
)
from protocol.crypto.kkrt_matrix import ColumnPRG, cols_to_rows, rows_to_cols
from protocol.errors import InvalidElementError, ProtocolError, PSIError

__all__ = [
    "CODE_BITS",
    "DEFAULT_CHUNK_BINS",
    "DIGEST_SIZE",
    "OUTPUT_SIZE",
    "PROOF_SIZE",
    "PROTOCOL_VERSION",
    "TAG_SIZE",
    "BaseOTSender",
    "CuckooHashingError",
    "KKRTBaseOTReply",
    "KKRTCustodian",
    "KKRTExtensionChunk",
    "KKRTOutput",
    "KKRTRequester",
    "KKRTRunResult",
    "KKRTSetup",
    "KKRTTagChunk",
    "base_ot_receive",
    "derive_tags",
    "digest_bytes",
    "key_digests",
    "parse_proof",
    "run_kkrt_in_process",
    "table_size",
    "units_for",
]

PROTOCOL_VERSION = 1
CODE_BITS = 512  # w: code width = number of base OTs
CODE_BYTES = CODE_BITS // 8
BASE_OTS = CODE_BITS
DIGEST_SIZE = 16
OUTPUT_SIZE = 16
TAG_SIZE = 12
DEFAULT_CHUNK_BINS = 4096  # 512 columns x 512 B = 256 KiB per extension chunk
MAX_CHUNK_BINS = 65_536
DEFAULT_TAG_CHUNK = 65_536  # 768 KiB per tag chunk
MAX_TAG_CHUNK = 262_144
MAX_BINS = 1 << 22  # custodian memory bound: 4M q rows = 256 MiB
MAX_STASH = 8  # each stash slot costs the custodian one evaluation of every record
MAX_ATTEMPTS = 8
DEFAULT_ATTEMPTS = 4
_CODE_BLOCKS = CODE_BYTES // 16
_CODE_TWEAKS = np.arange(_CODE_BLOCKS, dtype=np.uint8)
_ROW_BYTES = 8 + CODE_BYTES  # H input: instance index (u64 LE) || 512-bit row
_PARALLEL_MIN = 16_384  # hash jobs smaller than this stay in-process

# Domain separation: one tag per use of a hash or KDF.
_DST_SESSION = b"gated-psi/kkrt/session-seed/v2"
_DST_DERIVE = b"gated-psi/kkrt/derive/v2"
_DST_BASE_OT = b"gated-psi/kkrt/base-ot/v2"
_DST_CUSTODIAN = b"gated-psi/kkrt/custodian-secret/v2"
_PERSON_KEY = b"gpsi-kkrt-key-v1"  # BLAKE2b personalization (16 bytes max)
_PERSON_OPRF = b"gpsi-kkrt-oprf-1"
_LABEL_CUCKOO = b"cuckoo"
_LABEL_CODE = b"code"
_LABEL_SALT = b"oprf-salt"
_LABEL_TAG = b"tag"
_LABEL_CONFIRM = b"confirm"

_scalarmult = rbcl.crypto_scalarmult_ristretto255
_scalarmult_base = rbcl.crypto_scalarmult_ristretto255_base
_point_add = rbcl.crypto_core_ristretto255_add
_point_sub = rbcl.crypto_core_ristretto255_sub
_scalar_reduce = rbcl.crypto_core_ristretto255_scalar_reduce


class CuckooHashingError(PSIError):
    """The requester's items could not be cuckoo-hashed within ``max_attempts`` re-hashes.

    With the default table size this has probability <= 2^-40 per attempt; it is raised
    in practice only for tables forced too small.
    """

    code = "cuckoo_failure"


# --------------------------------------------------------------------------- helpers


def _session_seed(seed_context: bytes) -> bytes:
    """One 32-byte seed per session; everything public is derived from it."""
    if not isinstance(seed_context, bytes | bytearray) or not seed_context:
        raise ValueError("seed_context must be non-empty bytes")
    return hashlib.sha256(encode(_DST_SESSION, seed_context)).digest()


def _derive(seed: bytes, label: bytes, *parts: bytes, size: int = 16) -> bytes:
    """HMAC-SHA-256 KDF: distinct labels give independent keys."""
    return hmac.new(seed, encode(_DST_DERIVE, label, *parts), hashlib.sha256).digest()[:size]


def _ecb(key: bytes) -> CipherContext:
    """An AES-128-ECB encryptor (stateless, reusable): a PRF/PRP over single blocks."""
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - PRF/PRP use


def _aes_blocks(encryptor: CipherContext, blocks: np.ndarray) -> np.ndarray:
    """AES over a (k, 16) uint8 array in one call."""
    out = encryptor.update(np.ascontiguousarray(blocks).tobytes())
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, 16)


def _blake2b_each(items: list[bytes], size: int, person: bytes, salt: bytes) -> bytes:
    """BLAKE2b of every item, concatenated.

    This is the one per-element Python loop left in the engine: hashlib has no batch
    call.  Copying a parameterized state is ~30% cheaper than constructing one per item.
    """
    fresh = hashlib.blake2b(digest_size=size, person=person, salt=salt).copy
    out: list[bytes] = []
    append = out.append
    for item in items:  # inlined: a call per item costs ~10% of the loop
        h = fresh()
        h.update(item)
        append(h.digest())
    return b"".join(out)


def digest_bytes(keys: Sequence[bytes]) -> bytes:
    """``key_digests`` packed end to end: what a match-key worker returns with its keys."""
    return _blake2b_each(list(keys), DIGEST_SIZE, _PERSON_KEY, b"")


def _digest_packed(buffer: bytes, lengths: np.ndarray) -> bytes:
    """Digests of keys packed end to end (what goes to a worker: one buffer, no list)."""
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    return _blake2b_each([buffer[a:b] for a, b in zip(starts, ends, strict=True)],
                         DIGEST_SIZE, _PERSON_KEY, b"")


def _hash_rows(records: np.ndarray, salt: bytes) -> bytes:
    """H over (k, 72) uint8 records (index || row): one BLAKE2b-128 per record."""
    items = np.ascontiguousarray(records).view(f"V{_ROW_BYTES}").ravel().tolist()
    return _blake2b_each(items, OUTPUT_SIZE, _PERSON_OPRF, salt)


def key_digests(keys: Sequence[bytes], executor: Executor | None = None) -> np.ndarray:
    """BLAKE2b-128 of every match key, as an (n, 16) uint8 array.

    Unkeyed (only personalized), so a custodian may compute it once per record set and
    pass it to every session (``KKRTCustodian(digests=...)``); all per-session keying
    happens after this step.
    """
    n = len(keys)
    if executor is not None and n >= 2 * _PARALLEL_MIN:
        lengths = np.fromiter(map(len, keys), dtype=np.int64, count=n)
        packed = b"".join(keys)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        step = -(-n // 8)
        jobs = [
            executor.submit(_digest_packed, packed[offsets[a] : offsets[min(a + step, n)]],
                            lengths[a : a + step])
            for a in range(0, n, step)
        ]
        buf = b"".join(job.result() for job in jobs)
    else:
        buf = digest_bytes(keys)
    return np.frombuffer(buf, dtype=np.uint8).reshape(n, DIGEST_SIZE)


def _tag_blocks(encryptor: CipherContext, outputs: np.ndarray) -> np.ndarray:
    """T(O) = (AES_kt(O) xor O)[:12] for (k, 16) outputs -> (k, 12)."""
    if outputs.shape[0] == 0:
        return np.zeros((0, TAG_SIZE), dtype=np.uint8)
    tags: np.ndarray = (_aes_blocks(encryptor, outputs) ^ outputs)[:, :TAG_SIZE]
    return tags


def _hash_tag_rows(records: np.ndarray, salt: bytes, tag_key: bytes) -> bytes:
    """The tags of H over (k, 72) records: what the custodian's workers hand back.

    The custodian never needs its outputs again (disclosure re-evaluates), so its workers
    return 12-byte tags instead of 16-byte outputs and the tag AES runs beside H.
    """
    outputs = np.frombuffer(_hash_rows(records, salt), dtype=np.uint8).reshape(-1, OUTPUT_SIZE)
    return _tag_blocks(_ecb(tag_key), outputs).tobytes()


def _instance_rows(instances: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pack (j as u64 LE || 64-byte row) records for H: (k, 72) uint8."""
    k = rows.shape[0]
    buf = np.empty((k, _ROW_BYTES), dtype=np.uint8)
    buf[:, :8] = instances.astype("<u8").view(np.uint8).reshape(k, 8)
    buf[:, 8:] = rows
    return buf


class _Hasher:
    """Runs H jobs in-process or on an executor; results come back in submission order.

    With ``tag_key`` every job returns the tags of its outputs instead of the outputs.
    """

    def __init__(self, salt: bytes, executor: Executor | None,
                 tag_key: bytes | None = None) -> None:
        self.salt = salt
        self.executor = executor
        self.tag_key = tag_key
        self.width = OUTPUT_SIZE if tag_key is None else TAG_SIZE
        self._jobs: list[Job[bytes] | bytes] = []
        self._pending: list[np.ndarray] = []
        self._pending_size = 0

    def submit(self, records: np.ndarray) -> None:
        """Queue H over (k, 72) records."""
        if self.executor is None:
            self._jobs.append(self._run(records))
            return
        self._pending.append(records)
        self._pending_size += records.shape[0]
        if self._pending_size >= _PARALLEL_MIN:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            assert self.executor is not None
            batch = np.concatenate(self._pending)
            if self.tag_key is None:
                self._jobs.append(self.executor.submit(_hash_rows, batch, self.salt))
            else:
                self._jobs.append(self.executor.submit(_hash_tag_rows, batch, self.salt,
                                                       self.tag_key))
            self._pending, self._pending_size = [], 0

    def _run(self, records: np.ndarray) -> bytes:
        if self.tag_key is None:
            return _hash_rows(records, self.salt)
        return _hash_tag_rows(records, self.salt, self.tag_key)

    def results(self) -> np.ndarray:
        """All outputs (or tags) so far, (k, 16) (or (k, 12)) uint8, in submission order."""
        self.flush()
        parts = [j if isinstance(j, bytes) else j.result() for j in self._jobs]
        self._jobs = []
        return np.frombuffer(b"".join(parts), dtype=np.uint8).reshape(-1, self.width)


class _SessionKeys:
    """Public per-session keys both parties derive: cuckoo, code, H salt, tag KDF."""

    def __init__(self, seed: bytes, code_nonce: bytes | None = None) -> None:
        self.seed = seed
        self.salt = _derive(seed, _LABEL_SALT)
        self.tag_key = _derive(seed, _LABEL_TAG)  # public: workers rebuild the cipher
        self.tag = _ecb(self.tag_key)
        self.confirm = _derive(seed, _LABEL_CONFIRM, size=32)
        self.code: CipherContext | None = None
        self._cuckoo: dict[int, tuple[CipherContext, ...]] = {}
        if code_nonce is not None:
            self.set_code_nonce(code_nonce)

    def set_code_nonce(self, nonce: bytes) -> None:
        self.code = _ecb(_derive(self.seed, _LABEL_CODE, nonce))

    def cuckoo_words(self, digests: np.ndarray, attempt: int) -> np.ndarray:
        """(n, 4) uint64 pseudorandom words per item for the bins of ``attempt``."""
        pair = self._cuckoo.get(attempt)
        if pair is None:
            a = attempt.to_bytes(2, "big")
            pair = tuple(_ecb(_derive(self.seed, _LABEL_CUCKOO, a, bytes([i]))) for i in (0, 1))
            self._cuckoo[attempt] = pair
        first, second = (_aes_blocks(enc, digests) for enc in pair)
        return np.concatenate([first, second], axis=1).view("<u8")

    def bins(self, digests: np.ndarray, attempt: int, bins: int) -> np.ndarray:
        return candidate_bins(self.cuckoo_words(digests, attempt), bins)

    def code_rows(self, digests: np.ndarray) -> np.ndarray:
        """C(x) = AES_kc(d xor 0) || .. || AES_kc(d xor 3) per digest d: (k, 64) uint8.

        One AES call over the whole batch, and the output is already in row layout.
        """
        k = digests.shape[0]
        blocks = np.repeat(digests, _CODE_BLOCKS, axis=0).reshape(k, _CODE_BLOCKS, 16)
        blocks[:, :, 15] ^= _CODE_TWEAKS
        if self.code is None:
            raise ProtocolError("the code key needs the custodian's code nonce first")
        out = self.code.update(blocks.tobytes())
        return np.frombuffer(out, dtype=np.uint8).reshape(k, CODE_BYTES)

    def tags(self, outputs: np.ndarray) -> np.ndarray:
        """T(O) = (AES_kt(O) xor O)[:12] for (k, 16) outputs -> (k, 12)."""
        return _tag_blocks(self.tag, outputs)


def derive_tags(seed_context: bytes, outputs: Sequence[bytes]) -> list[bytes]:
    """Tags of KKRT outputs for a session: what the custodian's tag sets contain."""
    keys = _SessionKeys(_session_seed(seed_context))
    arr = np.frombuffer(b"".join(outputs), dtype=np.uint8).reshape(-1, OUTPUT_SIZE)
    return [bytes(t) for t in keys.tags(arr)]


def units_for(n_distinct: int, stash: int = 0) -> int:
    """Budget units (OPRF instances) a requester with n distinct keys will ask for."""
    return table_size(n_distinct, stash) + stash


# --------------------------------------------------------------------------- base OTs
#
# Chou-Orlandi "simplest OT" over ristretto255, semi-honest use, 512 in parallel.
# Sender (the requester): a, A = a*G.  Receiver (the custodian), choice bit c_i:
# B_i = b_i*G + c_i*A.  Sender keys: k_i^0 = KDF(a*B_i), k_i^1 = KDF(a*(B_i - A));
# receiver key: k_i^{c_i} = KDF(b_i*A).  The KDF binds the session seed, i, A and B_i.


def _ot_key(seed: bytes, index: int, a: bytes, b: bytes, point: bytes) -> bytes:
    """Base-OT seed: hash of the session, the OT index, the transcript and the DH point."""
    return hashlib.sha256(encode(_DST_BASE_OT, seed, index, a, b, point)).digest()[:16]


class BaseOTSender:
    """The requester's half of the base OTs: learns both seeds of every OT."""

    def __init__(self, session_seed: bytes) -> None:
        self._seed = session_seed
        self._a = oprf.random_scalar()
        self.a_point = _scalarmult_base(self._a)

    def keys(self, b_buffer: bytes) -> tuple[list[bytes], list[bytes]]:
        """Both seeds of each OT from the receiver's B_1..B_n (validated one by one)."""
        if not self._a:
            raise ProtocolError("a base-OT sender is used once")
        size = oprf.ELEMENT_SIZE
        if len(b_buffer) % size or not b_buffer:
            raise InvalidElementError(
                f"wrong length: base-OT buffer of {len(b_buffer)} bytes is not a positive "
                f"multiple of {size}"
            )
        a, a_point = self._a, self.a_point
        a_a = _scalarmult(a, a_point)  # a*A, subtracted to get a*(B - A)
        seeds0: list[bytes] = []
        seeds1: list[bytes] = []
        for i in range(len(b_buffer) // size):
            b = b_buffer[i * size : (i + 1) * size]
            try:
                oprf.deserialize_element(b)
            except InvalidElementError as exc:
                raise InvalidElementError(f"base-OT element {i}: {exc}") from None
            if hmac.compare_digest(b, a_point):  # B = A would make k^1 = KDF(identity)
                raise InvalidElementError(f"base-OT element {i}: equals A")
            a_b = _scalarmult(a, b)
            seeds0.append(_ot_key(self._seed, i, a_point, b, a_b))
            seeds1.append(_ot_key(self._seed, i, a_point, b, _point_sub(a_b, a_a)))
        self._a = b""  # one use only
        return seeds0, seeds1


def base_ot_receive(
    session_seed: bytes, a_point: bytes, choices: np.ndarray, scalars: Sequence[bytes]
) -> tuple[bytes, list[bytes]]:
    """The custodian's half: (B_1..B_n concatenated, seed k_i^{c_i} of each OT).

    ``a_point`` comes from the peer and is validated; ``scalars`` are the receiver's
    secret b_i (non-zero, reduced).
    """
    try:
        a_point = oprf.deserialize_element(a_point)
    except InvalidElementError as exc:
        raise InvalidElementError(f"base-OT element A: {exc}") from None
    if len(scalars) != len(choices):
        raise ValueError("one scalar per choice bit")
    points: list[bytes] = []
    seeds: list[bytes] = []
    for i, (b_i, c_i) in enumerate(zip(scalars, choices.tolist(), strict=True)):
        b_i = oprf.deserialize_scalar(b_i)  # non-zero and canonical
        point = _scalarmult_base(b_i)
        if c_i:
            point = _point_add(point, a_point)
        points.append(point)
        seeds.append(_ot_key(session_seed, i, a_point, point, _scalarmult(b_i, a_point)))
    return b"".join(points), seeds


def _tag_prefix(tags: np.ndarray) -> np.ndarray:
    """First 8 bytes of each (k, 12) tag as big-endian uint64 (sorts like the bytes)."""
    return np.ascontiguousarray(tags[:, :8]).view(">u8").ravel().astype(np.uint64)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class KKRTSetup:
    """Requester -> Custodian: table shape, cuckoo attempt and the base-OT sender's A."""

    version: int
    context: bytes  # 32-byte confirmation that both sides derived the same session seed
    bins: int
    stash: int
    chunk_bins: int
    attempt: int
    base_ot_a: bytes

    @property
    def units(self) -> int:
        """OPRF instances = budget units the session spends."""
        return self.bins + self.stash

    @property
    def chunk_count(self) -> int:
        return -(-self.units // self.chunk_bins)

    def transcript_bytes(self) -> bytes:
        return encode(
            b"kkrt-setup", self.version, self.bins, self.stash, self.chunk_bins, self.attempt,
            self.context, self.base_ot_a,
        )


@dataclass(frozen=True)
class KKRTBaseOTReply:
    """Custodian -> Requester: B_1..B_512 (512 x 32 bytes) and the code nonce."""

    code_nonce: bytes
    base_ot_b: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"kkrt-base-ot", self.code_nonce, self.base_ot_b)


@dataclass(frozen=True)
class KKRTExtensionChunk:
    """Requester -> Custodian: columns of u for instances [start, start + bins).

    ``columns`` is 512 rows of ``bins / 8`` bytes (column i, bit of instance r at byte
    r // 8, bit 7 - r % 8).  ``bins`` is also the budget units this chunk spends.
    """

    seq: int
    start: int
    bins: int
    columns: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"kkrt-ext", self.seq, self.start, self.bins, self.columns)


@dataclass(frozen=True)
class KKRTTagChunk:
    """Custodian -> Requester: part of the sorted tag set of one hash function (or stash slot).

    ``table`` is 0..2 for the three hash functions, 3 + l for stash slot l; ``table_size``
    is the total number of tags in that set, so the requester knows when it has them all.
    """

    seq: int
    table: int
    table_size: int
    tags: bytes

    def transcript_bytes(self) -> bytes:
        return encode(b"kkrt-tags", self.seq, self.table, self.table_size, self.tags)


@dataclass(frozen=True)
class KKRTOutput:
    """The requester's OPRF result for one of its keys."""

    bin_index: int  # OPRF instance: cuckoo bin, or bins + l for stash slot l
    output: bytes  # F(k_bin, x), 16 bytes: presented at disclosure
    tag: bytes  # T(output), 12 bytes
    table: int  # hash function 0..2 (or 3 + l): the custodian tag set to compare with

    @property
    def proof(self) -> bytes:
        """What disclosure presents: bin index (u32 big-endian) || output, 20 bytes."""
        return struct.pack(">I", self.bin_index) + self.output


PROOF_SIZE = 4 + OUTPUT_SIZE


def parse_proof(proof: bytes) -> tuple[int, bytes]:
    """(bin index, output) from a disclosure proof; ProtocolError if malformed."""
    if len(proof) != PROOF_SIZE:
        raise ProtocolError(f"a KKRT disclosure proof is {PROOF_SIZE} bytes, got {len(proof)}")
    return struct.unpack(">I", proof[:4])[0], bytes(proof[4:])


# --------------------------------------------------------------------------- requester


class RequesterState(StrEnum):
    START = "start"
    AWAIT_BASE_OT = "await_base_ot"
    EXTENDING = "extending"
    EXTENDED = "extended"
    FAILED = "failed"


class KKRTRequester:
    """The OPRF receiver: cuckoo-hashes its keys, runs base OTs as sender, extends.

    ``keys`` are match-key bytes (duplicates allowed: they share one bin).
    ``seed_context`` must equal the custodian's (e.g. authorization id + session id).
    ``bins`` overrides the table size (tests); ``executor`` (a process pool from
    ``protocol.adapters.workers.process_pool``) spreads the hashing over processes.
    ``place_on``: an executor that runs the cuckoo placement as one background job, so it
    overlaps with the session's open (the units depend only on the distinct-key count);
    the first message, ``setup``, waits for it.
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        seed_context: bytes,
        *,
        stash: int = 0,
        bins: int | None = None,
        chunk_bins: int = DEFAULT_CHUNK_BINS,
        max_attempts: int = DEFAULT_ATTEMPTS,
        executor: Executor | None = None,
        digests: np.ndarray | None = None,
        place_on: Executor | None = None,
    ) -> None:
        if not 0 <= stash <= MAX_STASH:
            raise ValueError(f"stash must be in 0..{MAX_STASH}")
        if chunk_bins % 8 or not 8 <= chunk_bins <= MAX_CHUNK_BINS:
            raise ValueError(f"chunk_bins must be a multiple of 8 in 8..{MAX_CHUNK_BINS}")
        if not 1 <= max_attempts <= MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be in 1..{MAX_ATTEMPTS}")
        started = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._seed = _session_seed(seed_context)
        self._keys = _SessionKeys(self._seed)
        self._executor = executor
        self.chunk_bins = chunk_bins
        self.stash = stash
        if digests is None:
            digests = key_digests(keys, executor)
        elif digests.shape != (len(keys), DIGEST_SIZE) or digests.dtype != np.uint8:
            raise ValueError("digests must be an (n, 16) uint8 array matching keys")
        self.key_count = len(keys)
        self._digests, self._key_item = _dedupe(digests)
        n = self._digests.shape[0]
        self.timings["digest"] = time.perf_counter() - started
        started = time.perf_counter()
        if bins is None:
            bins = table_size(n, stash)
        elif bins < 3 or (bins + stash) % 8:
            raise ValueError("bins must be >= 3 and bins + stash a multiple of 8")
        if bins + stash > MAX_BINS:
            raise ValueError(f"{bins + stash} instances exceed the limit {MAX_BINS}")
        self.bins = bins
        self._placed: tuple[int, CuckooPlacement] | None = None
        self._placing: Job[tuple[int, CuckooPlacement]] | None = None
        if place_on is None:
            self._placed = cuckoo_placement(self._seed, self._digests, bins, stash,
                                            max_attempts)
        else:
            self._placing = place_on.submit(cuckoo_placement, self._seed, self._digests,
                                            bins, stash, max_attempts)
        self.timings["cuckoo"] = time.perf_counter() - started
        self.state = RequesterState.START
        self._base_ot: BaseOTSender | None = None
        self._prg0: ColumnPRG | None = None
        self._prg1: ColumnPRG | None = None
        self._dummy = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(bytes(16))).encryptor()
        self._hasher = _Hasher(self._keys.salt, executor)
        self._hashed_items: list[np.ndarray] = []
        self._outputs: np.ndarray | None = None
        self._item_tags: np.ndarray | None = None
        self._next_chunk = 0
        self._tag_parts: dict[int, list[bytes]] = {}
        self._table_hits: dict[int, np.ndarray] = {}  # matched items, per complete tag set
        self._tag_sizes: dict[int, int] = {}
        self._tag_counts: dict[int, int] = {}
        self._tag_seq = 0
        self.timings["extension"] = 0.0

    # -- setup -----------------------------------------------------------------

    @property
    def units(self) -> int:
        """Budget units this session spends: one per bin and stash slot."""
        return self.bins + self.stash

    @property
    def item_count(self) -> int:
        """Distinct keys (the items actually placed)."""
        return int(self._digests.shape[0])

    @property
    def attempt(self) -> int:
        """The cuckoo attempt whose hash functions placed every item (waits for placement)."""
        return self._placement_result()[0]

    @property
    def _placement(self) -> CuckooPlacement:
        return self._placement_result()[1]

    def _placement_result(self) -> tuple[int, CuckooPlacement]:
        if self._placed is None:
            assert self._placing is not None
            started = time.perf_counter()
            self._placed = self._placing.result()  # CuckooHashingError re-raised here
            self._placing = None
            self.timings["cuckoo_wait"] = time.perf_counter() - started
        return self._placed

    def setup(self) -> KKRTSetup:
        """First message: the table shape and the base-OT sender's A = a*G."""
        if self.state is not RequesterState.START:
            raise ProtocolError(f"setup in state {self.state.value!r}")
        self._base_ot = BaseOTSender(self._seed)
        self.state = RequesterState.AWAIT_BASE_OT
        return KKRTSetup(
            version=PROTOCOL_VERSION, context=self._keys.confirm, bins=self.bins,
            stash=self.stash, chunk_bins=self.chunk_bins, attempt=self.attempt,
            base_ot_a=self._base_ot.a_point,
        )

    # -- dispatch --------------------------------------------------------------

    def handle(self, message: object) -> list[object]:
        """Apply one custodian message; returns the replies (none for this engine)."""
        try:
            if isinstance(message, KKRTBaseOTReply):
                self._on_base_ot(message)
            elif isinstance(message, KKRTTagChunk):
                self._on_tags(message)
            else:
                raise ProtocolError(f"requester cannot accept {type(message).__name__}")
        except PSIError:
            self.state = RequesterState.FAILED
            raise
        return []

    def _on_base_ot(self, reply: KKRTBaseOTReply) -> None:
        if self.state is not RequesterState.AWAIT_BASE_OT or self._base_ot is None:
            raise ProtocolError(f"base-OT reply in state {self.state.value!r}")
        if len(reply.code_nonce) != 32:
            raise ProtocolError("code nonce must be 32 bytes")
        if len(reply.base_ot_b) != BASE_OTS * oprf.ELEMENT_SIZE:
            raise InvalidElementError(
                f"wrong length: base-OT reply holds {len(reply.base_ot_b)} bytes, "
                f"need {BASE_OTS * oprf.ELEMENT_SIZE}"
            )
        seeds0, seeds1 = self._base_ot.keys(reply.base_ot_b)
        self._base_ot = None
        self._keys.set_code_nonce(reply.code_nonce)
        self._prg0 = ColumnPRG(seeds0)
        self._prg1 = ColumnPRG(seeds1)
        self.state = RequesterState.EXTENDING

    # -- extension -------------------------------------------------------------

    @property
    def chunk_count(self) -> int:
        return -(-self.units // self.chunk_bins)

    def extension_chunks(self) -> Iterator[KKRTExtensionChunk]:
        """All extension chunks, in order (each one is computed when it is pulled).

        Once the last one is out, the outputs and their tags are finished before the
        stream ends: the custodian is building its tag sets then, so this work overlaps.
        """
        while self._next_chunk < self.chunk_count:
            yield self.extension_chunk()
        if self.state is RequesterState.EXTENDED:
            self._finish_outputs()

    def extension_chunk(self) -> KKRTExtensionChunk:
        """Compute and return the next extension chunk."""
        if self.state is not RequesterState.EXTENDING or self._prg0 is None or self._prg1 is None:
            raise ProtocolError(f"extension chunk in state {self.state.value!r}")
        started = time.perf_counter()
        seq = self._next_chunk
        lo = seq * self.chunk_bins
        hi = min(lo + self.chunk_bins, self.units)
        nb = hi - lo
        t0 = self._prg0.next(nb // 8)
        t1 = self._prg1.next(nb // 8)
        items = self._placement.item_in[lo:hi]
        occupied = np.flatnonzero(items >= 0)
        # empty bins get random (non-code) rows: they match nothing
        code = np.frombuffer(self._dummy.update(bytes(nb * CODE_BYTES)), dtype=np.uint8)
        code = code.reshape(nb, CODE_BYTES).copy()
        if occupied.size:
            code[occupied] = self._keys.code_rows(self._digests[items[occupied]])
        u = t0 ^ t1
        u ^= rows_to_cols(code)
        if occupied.size:
            t0_rows = cols_to_rows(t0)
            self._hasher.submit(_instance_rows(lo + occupied, t0_rows[occupied]))
            self._hashed_items.append(items[occupied])
        self._next_chunk += 1
        if self._next_chunk == self.chunk_count:
            self.state = RequesterState.EXTENDED
            self._prg0 = self._prg1 = None
        self.timings["extension"] += time.perf_counter() - started
        return KKRTExtensionChunk(seq=seq, start=lo, bins=nb, columns=u.tobytes())

    # -- tags and results ------------------------------------------------------

    def _on_tags(self, chunk: KKRTTagChunk) -> None:
        if self.state not in (RequesterState.EXTENDING, RequesterState.EXTENDED):
            raise ProtocolError(f"tag chunk in state {self.state.value!r}")
        if chunk.seq != self._tag_seq:
            raise ProtocolError(f"tag chunk {chunk.seq} out of order (expected {self._tag_seq})")
        if not 0 <= chunk.table < CUCKOO_HASHES + self.stash:
            raise ProtocolError(f"tag chunk for unknown table {chunk.table}")
        if len(chunk.tags) % TAG_SIZE:
            raise ProtocolError("tag chunk length is not a multiple of the tag size")
        size = self._tag_sizes.setdefault(chunk.table, chunk.table_size)
        if size != chunk.table_size or size < 0:
            raise ProtocolError(f"tag chunk disagrees on the size of table {chunk.table}")
        have = self._tag_counts.get(chunk.table, 0) + len(chunk.tags) // TAG_SIZE
        if have > size:
            raise ProtocolError(f"more tags than announced for table {chunk.table}")
        self._tag_parts.setdefault(chunk.table, []).append(chunk.tags)
        self._tag_counts[chunk.table] = have
        self._tag_seq += 1
        if have == size and self._outputs is not None:
            # a complete set is matched at once, while the next ones are still streaming
            self._match_table(chunk.table)

    def _match_table(self, table: int) -> None:
        """Which of our items placed by ``table`` have their tag in that custodian set."""
        started = time.perf_counter()
        assert self._item_tags is not None
        mine = np.flatnonzero(self._placement.table_of == table)
        theirs = np.frombuffer(b"".join(self._tag_parts.pop(table)), dtype=np.uint8)
        self._table_hits[table] = mine[_member(self._item_tags[mine],
                                                theirs.reshape(-1, TAG_SIZE))]
        self.timings["match"] = self.timings.get("match", 0.0) + time.perf_counter() - started

    def _finish_outputs(self) -> None:
        if self._outputs is not None:
            return
        if self.state is not RequesterState.EXTENDED:
            raise ProtocolError(f"outputs before the extension finished ({self.state.value!r})")
        started = time.perf_counter()
        hashed = self._hasher.results()
        order = np.concatenate(self._hashed_items) if self._hashed_items else np.zeros(0, np.int64)
        outputs = np.zeros((self.item_count, OUTPUT_SIZE), dtype=np.uint8)
        outputs[order] = hashed
        self._outputs = outputs
        self._item_tags = self._keys.tags(outputs)
        self.timings["outputs"] = time.perf_counter() - started

    def output_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(bin_index, output (n,16), tag (n,12), table) per key, as numpy arrays."""
        self._finish_outputs()
        assert self._outputs is not None and self._item_tags is not None
        item = self._key_item
        p = self._placement
        return p.bin_of[item], self._outputs[item], self._item_tags[item], p.table_of[item]

    def output_for(self, key_index: int) -> KKRTOutput:
        """The (bin index, output, tag, table) of key ``key_index``."""
        self._finish_outputs()
        assert self._outputs is not None and self._item_tags is not None
        item = int(self._key_item[key_index])
        return KKRTOutput(
            bin_index=int(self._placement.bin_of[item]), output=self._outputs[item].tobytes(),
            tag=self._item_tags[item].tobytes(), table=int(self._placement.table_of[item]),
        )

    def proofs(self, key_indices: Sequence[int]) -> list[bytes]:
        """``output_for(i).proof`` for many keys at once (the matches, at disclosure)."""
        bins, outputs, _, _ = self.output_arrays()
        picked = np.asarray(key_indices, dtype=np.int64)
        packed = np.concatenate(
            [bins[picked].astype(">u4").view(np.uint8).reshape(-1, 4), outputs[picked]], axis=1)
        return [row.tobytes() for row in packed]

    def outputs(self) -> list[KKRTOutput]:
        """Per requester key: (bin index, output, tag, table); ``output_arrays`` at scale."""
        return [self.output_for(i) for i in range(self.key_count)]

    @property
    def tags_complete(self) -> bool:
        want = CUCKOO_HASHES + self.stash
        if len(self._tag_sizes) != want:
            return False
        return all(self._tag_counts.get(t, 0) == size for t, size in self._tag_sizes.items())

    def matches(self) -> list[int]:
        """Indices of the keys whose tag is in the custodian's set for their table (local)."""
        self._finish_outputs()
        if not self.tags_complete:
            raise ProtocolError("matches before every custodian tag set arrived")
        for table in range(CUCKOO_HASHES + self.stash):
            if table not in self._table_hits:  # sets that completed before our outputs
                self._match_table(table)
        hit = np.zeros(self.item_count, dtype=bool)
        for items in self._table_hits.values():
            hit[items] = True
        return np.flatnonzero(hit[self._key_item]).tolist()


def cuckoo_placement(seed: bytes, digests: np.ndarray, bins: int, stash: int,
                     max_attempts: int) -> tuple[int, CuckooPlacement]:
    """The first attempt (and its placement) whose hash functions fit every distinct digest.

    Deterministic in the session seed, so it can run in a worker process.
    """
    keys = _SessionKeys(seed)
    for attempt in range(max_attempts):
        cands = keys.bins(digests, attempt, bins)
        rng = np.random.default_rng(np.frombuffer(
            _derive(seed, b"cuckoo-walk", bytes([attempt])), dtype=np.uint32))
        try:
            return attempt, place(cands, bins, stash, rng)
        except OverflowError:
            continue
    raise CuckooHashingError(
        f"{digests.shape[0]} items did not fit {bins} bins and {stash} stash "
        f"slots in {max_attempts} attempts"
    )


def _dedupe(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct digests and, per key, the index of its distinct item."""
    n = digests.shape[0]
    if n == 0:
        return digests.reshape(0, DIGEST_SIZE), np.zeros(0, dtype=np.int64)
    words = np.ascontiguousarray(digests).view("<u8")
    # np.unique's index needs a stable sort; any representative of equal digests will do,
    # so one unstable argsort, run starts and a cumulative sum (same order of items)
    order = np.argsort(words[:, 0])
    ranked = words[order, 0]
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    np.not_equal(ranked[1:], ranked[:-1], out=starts[1:])
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    first = order[starts]
    if not np.array_equal(words[first[inverse], 1], words[:, 1]):
        # two digests share their first 64 bits (p ~ n^2 / 2^64): dedupe on all 128
        _, first, inverse = np.unique(
            np.ascontiguousarray(digests).view(f"V{DIGEST_SIZE}").ravel(),
            return_index=True, return_inverse=True,
        )
    return np.ascontiguousarray(digests[first]), inverse.ravel().astype(np.int64)


def _member(mine: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """For each (k,12) tag in ``mine``: is it among the sorted (N,12) tags ``theirs``?

    Binary search on the 64-bit prefix (needles sorted first, for cache locality), then
    a full comparison; runs of equal prefixes (p ~ N^2 / 2^64) take a slow exact path.
    """
    hit = np.zeros(mine.shape[0], dtype=bool)
    if mine.shape[0] == 0 or theirs.shape[0] == 0:
        return hit
    their_hi = _tag_prefix(theirs)
    if np.any(their_hi[1:] < their_hi[:-1]):
        raise ProtocolError("custodian tag set is not sorted")
    my_hi = _tag_prefix(mine)
    order = np.argsort(my_hi)
    needles = my_hi[order]
    pos = np.minimum(np.searchsorted(their_hi, needles, side="left"), their_hi.size - 1)
    same_prefix = their_hi[pos] == needles
    full = same_prefix & np.all(theirs[pos, 8:] == mine[order, 8:], axis=1)
    hit[order] = full
    nxt = np.minimum(pos + 1, their_hi.size - 1)
    tied = np.flatnonzero(same_prefix & ~full & (nxt != pos) & (their_hi[nxt] == needles))
    for i in tied.tolist():
        j, p = int(order[i]), int(pos[i])
        while p < their_hi.size and their_hi[p] == needles[i]:
            if np.array_equal(theirs[p], mine[j]):
                hit[j] = True
                break
            p += 1
    return hit


# --------------------------------------------------------------------------- custodian


class CustodianState(StrEnum):
    AWAIT_SETUP = "await_setup"
    EXTENDING = "extending"
    EXTENDED = "extended"
    FAILED = "failed"


@dataclass
class _TagTable:
    tags: np.ndarray  # (k, 12) uint8, sorted
    prefix: np.ndarray  # uint64 big-endian prefix of tags
    records: np.ndarray  # int64 record index per tag


class KKRTCustodian:
    """The OPRF sender: base-OT receiver with secret ``s``, evaluates every record.

    ``record_keys`` are the match keys of the in-scope records (positions are what
    ``lookup``/``find`` return).  ``authorization_key`` is the custodian's
    per-authorization secret; ``seed_context`` must equal the requester's.
    ``max_units`` (the reserved budget) bounds what a setup may ask for.
    """

    def __init__(
        self,
        record_keys: Sequence[bytes],
        authorization_key: bytes,
        *,
        seed_context: bytes,
        digests: np.ndarray | None = None,
        executor: Executor | None = None,
        max_units: int | None = None,
        nonce: bytes | None = None,
    ) -> None:
        if len(authorization_key) < 16:
            raise ValueError("authorization_key must be at least 16 bytes")
        started = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._seed = _session_seed(seed_context)
        self._keys = _SessionKeys(self._seed)
        self.nonce = nonce if nonce is not None else os.urandom(32)
        if len(self.nonce) != 32:
            raise ValueError("nonce must be 32 bytes")
        self._keys.set_code_nonce(self.nonce)
        if digests is None:
            digests = key_digests(record_keys, executor)
        elif digests.shape != (len(record_keys), DIGEST_SIZE) or digests.dtype != np.uint8:
            raise ValueError("digests must be an (N, 16) uint8 array matching record_keys")
        self._digests = np.ascontiguousarray(digests)
        self.record_count = int(digests.shape[0])
        self._executor = executor
        self.max_units = max_units
        # secret material: choice string s and base-OT scalars, from the authorization key
        stream = hashlib.shake_256(
            encode(_DST_CUSTODIAN, authorization_key, self._seed, self.nonce)
        ).digest(CODE_BYTES + BASE_OTS * 64)
        self._s_row = np.frombuffer(stream[:CODE_BYTES], dtype=np.uint8).copy()
        self._s_bits = np.unpackbits(self._s_row)
        self._s_mask = (self._s_bits * 0xFF).astype(np.uint8)[:, None]
        self._b_scalars = [
            _scalar_reduce(stream[CODE_BYTES + 64 * i : CODE_BYTES + 64 * (i + 1)])
            for i in range(BASE_OTS)
        ]
        self.state = CustodianState.AWAIT_SETUP
        self.setup_message: KKRTSetup | None = None
        self.evaluated = 0
        self._prg: ColumnPRG | None = None
        self._q = np.zeros((0, CODE_BYTES), dtype=np.uint8)
        # the workers return tags: the custodian never needs its outputs again
        self._hasher = _Hasher(self._keys.salt, executor, tag_key=self._keys.tag_key)
        self._indexed = False
        self._entry_record = np.zeros(0, dtype=np.int32)
        self._entry_table = np.zeros(0, dtype=np.int8)
        self._entry_bin = np.zeros(0, dtype=np.int32)
        self._chunk_starts = np.zeros(1, dtype=np.int64)
        self._tables: list[_TagTable] | None = None
        self.timings["digest"] = time.perf_counter() - started
        self.timings["extension"] = 0.0

    @property
    def units(self) -> int:
        """Instances the requester asked for (0 before setup)."""
        return 0 if self.setup_message is None else self.setup_message.units

    # -- dispatch --------------------------------------------------------------

    def handle(self, message: object) -> list[object]:
        """Apply one requester message; returns the reply messages."""
        try:
            if isinstance(message, KKRTSetup):
                return [self._on_setup(message)]
            if isinstance(message, KKRTExtensionChunk):
                self._on_chunk(message)
                return []
            raise ProtocolError(f"custodian cannot accept {type(message).__name__}")
        except PSIError:
            self.state = CustodianState.FAILED
            raise

    def _on_setup(self, setup: KKRTSetup) -> KKRTBaseOTReply:
        if self.state is not CustodianState.AWAIT_SETUP:
            raise ProtocolError(f"setup in state {self.state.value!r}")
        started = time.perf_counter()
        if setup.version != PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported KKRT version {setup.version}")
        if not hmac.compare_digest(setup.context, self._keys.confirm):
            raise ProtocolError("seed context differs from the custodian's")
        if not 0 <= setup.stash <= MAX_STASH or setup.bins < 3:
            raise ProtocolError("table shape out of range")
        if setup.units % 8 or setup.units > MAX_BINS:
            raise ProtocolError(f"{setup.units} instances: need a multiple of 8 <= {MAX_BINS}")
        if setup.chunk_bins % 8 or not 8 <= setup.chunk_bins <= MAX_CHUNK_BINS:
            raise ProtocolError("chunk size out of range")
        if not 0 <= setup.attempt < MAX_ATTEMPTS:
            raise ProtocolError("cuckoo attempt out of range")
        if self.max_units is not None and setup.units > self.max_units:
            raise ProtocolError(
                f"setup asks for {setup.units} instances; {self.max_units} were reserved"
            )
        b_points, seeds = base_ot_receive(
            self._seed, setup.base_ot_a, self._s_bits, self._b_scalars
        )
        self._b_scalars = []
        self._prg = ColumnPRG(seeds)
        self._q = np.zeros((setup.units, CODE_BYTES), dtype=np.uint8)
        self.setup_message = setup
        # the records are indexed at the first chunk: the base-OT reply goes out first, and
        # the requester computes its first chunks meanwhile
        self.state = CustodianState.EXTENDING
        self.timings["setup"] = time.perf_counter() - started
        return KKRTBaseOTReply(code_nonce=self.nonce, base_ot_b=b_points)

    def _index_records(self, setup: KKRTSetup) -> None:
        """Simple hashing: every record into its 3 bins, entries grouped by chunk."""
        self._indexed = True
        cands = self._keys.bins(self._digests, setup.attempt, setup.bins).ravel()
        chunk = cands // setup.chunk_bins
        narrow = np.uint16 if setup.chunk_count < (1 << 16) else np.uint32
        order = np.argsort(chunk.astype(narrow), kind="stable")  # radix sort for uint16
        self._entry_bin = cands[order].astype(np.int32)  # < MAX_BINS
        self._entry_record = (order // CUCKOO_HASHES).astype(np.int32)
        self._entry_table = (order % CUCKOO_HASHES).astype(np.int8)
        self._chunk_starts = np.searchsorted(
            chunk[order], np.arange(setup.chunk_count + 1), side="left"
        )

    def _on_chunk(self, chunk: KKRTExtensionChunk) -> None:
        setup = self.setup_message
        if self.state is not CustodianState.EXTENDING or setup is None or self._prg is None:
            raise ProtocolError(f"extension chunk in state {self.state.value!r}")
        seq = self.evaluated // setup.chunk_bins
        lo = seq * setup.chunk_bins
        hi = min(lo + setup.chunk_bins, setup.units)
        nb = hi - lo
        if chunk.seq != seq or chunk.start != lo or chunk.bins != nb:
            raise ProtocolError(
                f"extension chunk {chunk.seq} (start {chunk.start}, {chunk.bins} bins) is not "
                f"the expected chunk {seq} (start {lo}, {nb} bins)"
            )
        if len(chunk.columns) != BASE_OTS * nb // 8:
            raise ProtocolError(
                f"extension chunk {seq} holds {len(chunk.columns)} bytes, "
                f"need {BASE_OTS * nb // 8}"
            )
        started = time.perf_counter()
        if not self._indexed:
            self._index_records(setup)
        u = np.frombuffer(chunk.columns, dtype=np.uint8).reshape(BASE_OTS, nb // 8)
        q = self._prg.next(nb // 8)
        q ^= u & self._s_mask
        q_rows = cols_to_rows(q, out=self._q[lo:hi])
        a, b = int(self._chunk_starts[seq]), int(self._chunk_starts[seq + 1])
        if b > a:
            bins = self._entry_bin[a:b]
            code = self._keys.code_rows(self._digests[self._entry_record[a:b]])
            rows = np.bitwise_and(code, self._s_row)
            rows ^= q_rows[bins - lo]
            self._hasher.submit(_instance_rows(bins, rows))
        for row in range(max(lo, setup.bins), hi):  # stash slots: every record
            self._evaluate_everything(row)
        self.evaluated = hi
        self.timings["extension"] += time.perf_counter() - started
        if hi == setup.units:
            self.state = CustodianState.EXTENDED
            self._prg = None
            # built now, while the requester finishes its own outputs, not when asked for
            self._finish_tables()

    def _evaluate_everything(self, row: int) -> None:
        step = 1 << 16
        for a in range(0, self.record_count, step):
            code = self._keys.code_rows(self._digests[a : a + step])
            rows = self._q[row] ^ (code & self._s_row)
            self._hasher.submit(_instance_rows(np.full(code.shape[0], row), rows))

    # -- tags ------------------------------------------------------------------

    def _finish_tables(self) -> list[_TagTable]:
        if self._tables is not None:
            return self._tables
        if self.state is not CustodianState.EXTENDED or self.setup_message is None:
            raise ProtocolError(f"tags before the extension finished ({self.state.value!r})")
        started = time.perf_counter()
        tags = self._hasher.results()  # the workers' tags of every output
        n_entries = self._entry_bin.size
        tables: list[_TagTable] = []
        for t in range(CUCKOO_HASHES):
            sel = np.flatnonzero(self._entry_table == t)
            tables.append(_sorted_table(tags[:n_entries][sel], self._entry_record[sel]))
        for slot in range(self.setup_message.stash):
            a = n_entries + slot * self.record_count
            records = np.arange(self.record_count, dtype=np.int64)
            tables.append(_sorted_table(tags[a : a + self.record_count], records))
        self._tables = tables
        self.timings["tags"] = time.perf_counter() - started
        return tables

    def tag_chunks(self, chunk_tags: int = DEFAULT_TAG_CHUNK) -> Iterator[KKRTTagChunk]:
        """Every tag set (per hash function, then per stash slot), sorted, in chunks."""
        if not 1 <= chunk_tags <= MAX_TAG_CHUNK:
            raise ValueError(f"chunk_tags must be in 1..{MAX_TAG_CHUNK}")
        tables = self._finish_tables()
        seq = 0
        for t, table in enumerate(tables):
            size = table.tags.shape[0]
            for a in range(0, max(size, 1), chunk_tags):
                yield KKRTTagChunk(seq=seq, table=t, table_size=size,
                                   tags=table.tags[a : a + chunk_tags].tobytes())
                seq += 1

    # -- disclosure ------------------------------------------------------------

    def lookup(self, tag: bytes) -> list[int]:
        """Records whose tag (in any table) equals ``tag``: candidates for verification."""
        if len(tag) != TAG_SIZE:
            return []
        _, records = self._lookup_many(np.frombuffer(tag, dtype=np.uint8).reshape(1, TAG_SIZE))
        return sorted(set(records.tolist()))

    def _lookup_many(self, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query position, record) for every full-tag hit of (k, 12) ``tags``, all tables."""
        prefix = _tag_prefix(tags)
        hit_q: list[np.ndarray] = []
        hit_r: list[np.ndarray] = []
        for table in self._finish_tables():
            lo = np.searchsorted(table.prefix, prefix, side="left")
            counts = np.searchsorted(table.prefix, prefix, side="right") - lo
            q = np.repeat(np.arange(prefix.size), counts)
            if not q.size:
                continue
            first = np.cumsum(counts) - counts  # where each query's run starts in q
            pos = np.repeat(lo, counts) + (np.arange(q.size) - np.repeat(first, counts))
            same = (table.tags[pos] == tags[q]).all(axis=1)  # the prefix is only 8 of 12 bytes
            hit_q.append(q[same])
            hit_r.append(table.records[pos[same]].astype(np.int64))
        if not hit_q:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(hit_q), np.concatenate(hit_r)

    def _extended(self, what: str) -> KKRTSetup:
        setup = self.setup_message
        if self.state is not CustodianState.EXTENDED or setup is None:
            raise ProtocolError(f"{what} before the extension finished ({self.state.value!r})")
        return setup

    def _evaluations(self, bins: np.ndarray, digests: np.ndarray) -> np.ndarray:
        """F(k_bin, x) for parallel arrays of instances and key digests: (m, 16) uint8."""
        code = self._keys.code_rows(digests)
        rows = self._q[bins] ^ (code & self._s_row)
        return np.frombuffer(_hash_rows(_instance_rows(bins, rows), self._keys.salt),
                             dtype=np.uint8).reshape(-1, OUTPUT_SIZE)

    def _bin_allowed(self, bins: np.ndarray, digests: np.ndarray) -> np.ndarray:
        """Is each instance one of its key's three cuckoo bins, or a stash slot?"""
        setup = self._extended("verify")
        ok = (bins >= 0) & (bins < setup.units)
        in_table = bins < setup.bins
        if in_table.any():
            cands = self._keys.bins(digests[in_table], setup.attempt, setup.bins)
            ok[in_table] &= (cands == bins[in_table][:, None]).any(axis=1)
        return ok

    def evaluate(self, bin_index: int, record_key: bytes) -> bytes:
        """F(k_bin, record_key): the custodian's own OPRF output for one instance."""
        setup = self._extended("evaluate")
        if not 0 <= bin_index < setup.units:
            raise ProtocolError(f"instance {bin_index} out of range")
        outputs = self._evaluations(np.array([bin_index]), key_digests([record_key]))
        return bytes(outputs[0])

    def verify(self, bin_index: int, output: bytes, record_key: bytes) -> bool:
        """Does ``output`` equal F(k_bin, record_key), for a bin the record can occupy?

        Verified disclosure: only a requester that put this exact key in that bin can
        know the output.  The bin must be one of the record's three cuckoo bins or a
        stash slot; the comparison is constant-time.
        """
        self._extended("verify")
        if len(output) != OUTPUT_SIZE:
            return False
        bins, digest = np.array([bin_index], dtype=np.int64), key_digests([record_key])
        if not self._bin_allowed(bins, digest)[0]:
            return False
        return hmac.compare_digest(self._evaluations(bins, digest)[0].tobytes(), output)

    def find(self, bin_index: int, output: bytes) -> list[int]:
        """Records found by the output's tag whose verification succeeds (disclosure step)."""
        if len(output) != OUTPUT_SIZE:
            return []
        return self.find_many([(bin_index, output)])[0]

    def find_many(self, proofs: Sequence[tuple[int, bytes]]) -> list[list[int]]:
        """``find`` for a whole disclosure batch: one vectorized lookup and evaluation.

        Each (bin, output) yields the records whose tag matches and whose re-computed
        F(k_bin, key) equals the output (constant-time compare), for an allowed bin.
        """
        setup = self._extended("find")
        found: list[list[int]] = [[] for _ in proofs]
        valid = [i for i, (b, out) in enumerate(proofs)
                 if len(out) == OUTPUT_SIZE and 0 <= b < setup.units]
        if not valid:
            return found
        outputs = np.frombuffer(b"".join(proofs[i][1] for i in valid),
                                dtype=np.uint8).reshape(-1, OUTPUT_SIZE)
        bins_all = np.array([proofs[i][0] for i in valid], dtype=np.int64)
        q, records = self._lookup_many(self._keys.tags(outputs))
        if not q.size:
            return found
        pairs = np.unique(q * self.record_count + records)  # a record in two tables: once
        q, records = pairs // self.record_count, pairs % self.record_count
        bins, digests = bins_all[q], self._digests[records]
        allowed = self._bin_allowed(bins, digests)
        q, records, bins, digests = q[allowed], records[allowed], bins[allowed], digests[allowed]
        expected = self._evaluations(bins, digests)
        for j, (qi, rec) in enumerate(zip(q.tolist(), records.tolist(), strict=True)):
            if hmac.compare_digest(expected[j].tobytes(), outputs[qi].tobytes()):
                found[valid[qi]].append(rec)
        return found


def _sorted_table(tags: np.ndarray, records: np.ndarray) -> _TagTable:
    """Sort a tag set bytewise so record order never shows in what is sent.

    Sorted by the 64-bit prefix (a fast integer sort); runs of equal prefixes, which
    are rare, are then ordered by their full bytes so ties do not keep record order.
    """
    tags = np.ascontiguousarray(tags)
    prefix = _tag_prefix(tags)
    order = np.argsort(prefix)
    sorted_prefix = prefix[order]
    ties = np.flatnonzero(sorted_prefix[1:] == sorted_prefix[:-1])
    for start in ties.tolist():
        if start > 0 and sorted_prefix[start - 1] == sorted_prefix[start]:
            continue  # inside a run already handled
        stop = start + 1
        while stop < sorted_prefix.size and sorted_prefix[stop] == sorted_prefix[start]:
            stop += 1
        run = order[start:stop]
        order[start:stop] = run[np.argsort(tags[run].view(f"S{TAG_SIZE}").ravel())]
    sorted_tags = tags[order]
    return _TagTable(tags=sorted_tags, prefix=sorted_prefix, records=records[order])


# --------------------------------------------------------------------------- driver


@dataclass
class KKRTRunResult:
    """What ``run_kkrt_in_process`` measured and found."""

    matches: list[int]  # requester key indices whose tag matched
    requester: KKRTRequester
    custodian: KKRTCustodian
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per phase
    cpu: dict[str, float] = field(default_factory=dict)  # this process's CPU seconds
    wire_bytes: dict[str, int] = field(default_factory=dict)


def run_kkrt_in_process(
    keys: Sequence[bytes],
    record_keys: Sequence[bytes],
    *,
    seed_context: bytes = b"kkrt-in-process",
    authorization_key: bytes | None = None,
    executor: Executor | None = None,
    chunk_bins: int = DEFAULT_CHUNK_BINS,
    stash: int = 0,
    bins: int | None = None,
    custodian_digests: np.ndarray | None = None,
) -> KKRTRunResult:
    """Run both sides of one KKRT match in this process, no network (for tests and benches).

    Phases run one after the other (no overlap between the parties); only the BLAKE2b
    work goes to ``executor`` when one is given.
    """
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    wire: dict[str, int] = {}
    last = [time.perf_counter(), time.process_time()]

    def lap(phase: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        timings[phase] = now[0] - last[0]
        cpu[phase] = now[1] - last[1]
        last[:] = now

    custodian = KKRTCustodian(
        record_keys, authorization_key or os.urandom(32), seed_context=seed_context,
        digests=custodian_digests, executor=executor,
    )
    lap("custodian_digest")
    requester = KKRTRequester(keys, seed_context, stash=stash, bins=bins,
                              chunk_bins=chunk_bins, executor=executor)
    lap("requester_digest_cuckoo")
    setup = requester.setup()
    (reply,) = custodian.handle(setup)
    if not isinstance(reply, KKRTBaseOTReply):
        raise ProtocolError("the custodian did not answer the setup with its base OTs")
    requester.handle(reply)
    lap("base_ot_and_index")
    wire["setup"] = len(setup.transcript_bytes())
    wire["base_ot_reply"] = len(reply.transcript_bytes())
    wire["extension"] = 0
    for chunk in requester.extension_chunks():
        wire["extension"] += len(chunk.columns)
        custodian.handle(chunk)
    lap("extension")
    wire["tags"] = 0
    for tags in custodian.tag_chunks():
        wire["tags"] += len(tags.tags)
        requester.handle(tags)
    lap("custodian_tags")
    matches = requester.matches()
    lap("requester_outputs_match")
    timings["total"] = sum(timings.values())
    cpu["total"] = sum(cpu.values())
    return KKRTRunResult(matches=matches, requester=requester, custodian=custodian,
                         timings=timings, cpu=cpu, wire_bytes=wire)
