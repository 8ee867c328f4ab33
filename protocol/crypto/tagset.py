"""Epoch tag sets: truncated fingerprints of epoch OPRF outputs, Golomb-Rice coded in chunks.

The national custodian (docs/national-custodian.md) evaluates every record once per key
epoch and ships the requester one compressed set of fingerprints per rule, instead of 12-byte
tags per authorization. A fingerprint is the first ``L`` bits of
``SHA-512(encode("gated-psi/epoch-tag/v1", epoch id, rule id, y))`` for an RFC 9497 output
``y``. ``L`` is fixed per epoch so that the chance that any of the requester's ``E``
evaluations collides with any of the ``N`` tags of a rule stays below ``2^-40`` (union bound):
``P <= E * N / 2^L``, with ``L = 40 + ceil(log2 E_max) + ceil(log2 N_max)``.

Representation: a fingerprint array is a numpy ``S16`` array (``FP_DTYPE``), each item the
128-bit big-endian value. Byte order equals numeric order, so numpy sorts and searches it
directly. Never read an item as ``bytes(arr[i])`` (numpy strips trailing zero bytes): use
:func:`to_ints`.

Wire form of one chunk (at most ``MAX_CHUNK_BYTES``, self-delimiting, so decoding streams)::

    magic "GPT1" | L (u8) | k (u8) | count (u32) | unary bits (u32) | first value (16 B)
    | (count - 1) remainders of k bits | unary-coded deltas of the high parts

with ``k = L - ceil(log2 N)`` the Rice parameter: each value after the first is split into
``high = v >> k`` (its delta from the previous high part written in unary: that many zeros,
then a one) and the ``k`` low bits written raw. All multi-byte integers are big-endian and
the bit sections are zero-padded to a byte. Expected size: about ``k + 2.5`` bits per tag.
Every decoder here assumes a hostile peer: counts are bounded, lengths exact, padding zero,
values strictly increasing and below ``2^L``, and each refusal names what is wrong.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.crypto.encoding import LENGTH_BYTES, encode
from protocol.crypto.oprf import derive_key_pair

__all__ = [
    "CHUNK_HEADER_BYTES",
    "CHUNK_MAGIC",
    "FP_DTYPE",
    "MAX_BITS",
    "MAX_CHUNK_BYTES",
    "MAX_CHUNK_TAGS",
    "SECURITY_BITS",
    "Fingerprints",
    "decode_chunks",
    "empty",
    "encode_chunks",
    "epoch_key",
    "false_positive_bound",
    "fingerprint_bits",
    "fingerprints",
    "from_ints",
    "merge_matches",
    "rice_parameter",
    "sort_with_positions",
    "to_ints",
    "top_bits",
]

FP_DTYPE = np.dtype("S16")
Fingerprints = npt.NDArray[np.bytes_]

#: The false-positive exponent every epoch is sized for: P <= 2^-SECURITY_BITS per authorization.
SECURITY_BITS = 40
#: Fingerprints are held in 128 bits.
MAX_BITS = 128
#: Largest chunk a producer writes and a consumer accepts (bounds a decoder's memory).
MAX_CHUNK_BYTES = 1 << 20
#: Most values in one chunk: bounds a decoder's working memory (~100 bytes per value) even
#: for the densest coding a peer can choose; an honest chunk holds about 127k at k = 62.
MAX_CHUNK_TAGS = 1 << 18
CHUNK_MAGIC = b"GPT1"
CHUNK_HEADER_BYTES = 4 + 1 + 1 + 4 + 4 + 16

_FINGERPRINT_DST = "gated-psi/epoch-tag/v1"
_EPOCH_KEY_INFO = b"gated-psi/epoch-key/v1:"
_U64 = np.uint64
_MASK64 = (1 << 64) - 1
#: Widest high-part step coded in unary; a wider one opens a new chunk instead.
_MAX_UNARY_GAP = 1 << 16


def epoch_key(master_secret: bytes, epoch_id: str) -> bytes:
    """The epoch's OPRF secret key: ``DeriveKeyPair(master, "gated-psi/epoch-key/v1:" || id)``.

    One key per epoch (not per authorization) is what lets the custodian evaluate its file
    once; docs/national-custodian.md, Key handling says what that costs in linkability.
    """
    if not epoch_id or len(epoch_id) > 64 or not epoch_id.isprintable():
        raise ValueError(f"epoch id must be 1-64 printable characters, got {epoch_id!r}")
    return derive_key_pair(master_secret, _EPOCH_KEY_INFO + epoch_id.encode("utf-8"))[0]


def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length() if n > 1 else 0


def fingerprint_bits(max_evaluations: int, tags: int) -> int:
    """``L = 40 + ceil(log2 E_max) + ceil(log2 N_max)``: keeps ``E * N / 2^L <= 2^-40``."""
    if max_evaluations < 1 or tags < 1:
        raise ValueError("max_evaluations and tags must be positive")
    bits = SECURITY_BITS + _ceil_log2(max_evaluations) + _ceil_log2(tags)
    if bits > MAX_BITS:
        raise ValueError(f"{bits}-bit fingerprints needed for {max_evaluations} evaluations "
                         f"against {tags} tags; at most {MAX_BITS} are supported")
    return bits


def false_positive_bound(evaluations: int, tags: int, bits: int) -> float:
    """Union bound on a false match in one authorization: ``E * N / 2^L``."""
    return math.ldexp(float(evaluations) * float(tags), -bits)


def rice_parameter(bits: int, tags: int) -> int:
    """``k = L - ceil(log2 N)`` (at least 1): the raw low bits of each coded fingerprint."""
    return max(1, bits - _ceil_log2(max(tags, 1)))


# --- 128-bit values as (hi, lo) uint64 arrays --------------------------------------------


def _split(fps: Fingerprints) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    words = np.ascontiguousarray(fps).view(">u8").reshape(-1, 2).astype(_U64)
    return words[:, 0], words[:, 1]


def _join(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> Fingerprints:
    words = np.empty((hi.size, 2), dtype=">u8")
    words[:, 0], words[:, 1] = hi, lo
    return words.reshape(-1).view(FP_DTYPE)


def _shr(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64], s: int
         ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    if s == 0:
        return hi, lo
    if s >= 64:
        return np.zeros_like(hi), hi >> _U64(s - 64) if s < 128 else np.zeros_like(hi)
    return hi >> _U64(s), (lo >> _U64(s)) | (hi << _U64(64 - s))


def _shl(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64], s: int
         ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    if s == 0:
        return hi, lo
    if s >= 64:
        return (lo << _U64(s - 64)) if s < 128 else np.zeros_like(lo), np.zeros_like(lo)
    return (hi << _U64(s)) | (lo >> _U64(64 - s)), lo << _U64(s)


def _low_bits(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64], k: int
              ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    if k >= 128:
        return hi, lo
    if k >= 64:
        return hi & _U64((1 << (k - 64)) - 1), lo
    return np.zeros_like(hi), lo & _U64((1 << k) - 1)


def empty() -> Fingerprints:
    """An empty fingerprint array."""
    return np.empty(0, dtype=FP_DTYPE)


def to_ints(fps: Fingerprints) -> list[int]:
    """The fingerprints as Python integers (the only safe way to read items one by one)."""
    hi, lo = _split(fps)
    return [(h << 64) | lo_ for h, lo_ in zip(hi.tolist(), lo.tolist(), strict=True)]


def from_ints(values: Iterable[int]) -> Fingerprints:
    """Fingerprint array from integers below ``2^128`` (tests, one-off lookups)."""
    vals = list(values)
    if any(not 0 <= v < 1 << MAX_BITS for v in vals):
        raise ValueError(f"a fingerprint must lie in [0, 2^{MAX_BITS})")
    hi = np.array([v >> 64 for v in vals], dtype=_U64)
    lo = np.array([v & _MASK64 for v in vals], dtype=_U64)
    return _join(hi, lo)


def fingerprints(outputs: Sequence[bytes], *, epoch_id: str, rule_id: str, bits: int
                 ) -> Fingerprints:
    """First ``bits`` bits of ``SHA-512(encode(DST, epoch id, rule id, y))`` per output ``y``.

    The encoding is the project's injective one, so an epoch or rule id can never shift into
    the output; the result is in input order (sort it with :func:`sort_with_positions`).
    """
    if not SECURITY_BITS <= bits <= MAX_BITS:
        raise ValueError(f"fingerprint bits must lie in [{SECURITY_BITS}, {MAX_BITS}]")
    prefix = encode(_FINGERPRINT_DST, epoch_id, rule_id)
    sha512 = hashlib.sha512
    raw = b"".join([sha512(prefix + len(y).to_bytes(LENGTH_BYTES, "big") + y).digest()[:16]
                    for y in outputs])
    fps = np.frombuffer(raw, dtype=FP_DTYPE)
    if bits == MAX_BITS:
        return fps.copy()
    hi, lo = _split(fps)
    return _join(*_shr(hi, lo, MAX_BITS - bits))


def top_bits(fps: Fingerprints, bits: int, count: int) -> npt.NDArray[np.int64]:
    """The leading ``count`` bits of each ``bits``-bit fingerprint: its bucket in an index
    split into ``2^count`` ranges of equal width (so bucket order is fingerprint order)."""
    if not 0 <= count <= min(bits, 62):
        raise ValueError(f"bucket bits must lie in [0, {min(bits, 62)}]")
    if count == 0:
        return np.zeros(fps.size, dtype=np.int64)
    return _shr(*_split(fps), bits - count)[1].astype(np.int64)


def sort_with_positions(fps: Fingerprints) -> tuple[Fingerprints, npt.NDArray[np.int64]]:
    """(sorted fingerprints, the input position of each): what :func:`merge_matches` takes."""
    order = np.argsort(fps, kind="stable").astype(np.int64)
    return fps[order], order


# --- Golomb-Rice chunks ------------------------------------------------------------------


def _check_sorted_distinct(fps: Fingerprints, what: str) -> None:
    if fps.size > 1 and not bool(np.all(fps[1:] > fps[:-1])):
        raise ValueError(f"{what}: fingerprints are not strictly increasing")


def _below(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64], bits: int) -> bool:
    """Every value < 2^bits."""
    if bits >= 128:
        return True
    if bits >= 64:
        return bool(np.all(hi < _U64(1) << _U64(bits - 64))) if bits > 64 else \
            bool(np.all(hi == 0))
    return bool(np.all(hi == 0) and np.all(lo < _U64(1) << _U64(bits)))


def _pack_remainders(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64], k: int) -> bytes:
    rem_hi, rem_lo = _low_bits(hi, lo, k)
    width = (k + 7) // 8  # only the bytes that hold the k bits, so memory is ~n * (k + 7)
    as_bytes = _join(rem_hi, rem_lo).view(np.uint8).reshape(-1, 16)[:, 16 - width:]
    bits = np.unpackbits(as_bytes, axis=1)[:, 8 * width - k:]
    return np.packbits(bits.reshape(-1)).tobytes()


def _encode_one(fps: Fingerprints, bits: int, k: int) -> bytes | None:
    """One chunk, or None when it would exceed ``MAX_CHUNK_BYTES`` (sized before allocating)."""
    hi, lo = _split(fps)
    q_hi, q_lo = _shr(hi, lo, k)
    del q_hi  # zero: the high part has bits - k <= 64 bits
    deltas = np.diff(q_lo)
    unary_bits = int(deltas.sum()) + deltas.size
    size = CHUNK_HEADER_BYTES + (deltas.size * k + 7) // 8 + (unary_bits + 7) // 8
    if size > MAX_CHUNK_BYTES:
        return None
    ones = np.cumsum(deltas + _U64(1)).astype(np.int64) - 1
    unary = np.zeros(unary_bits, dtype=np.uint8)
    unary[ones] = 1
    header = (CHUNK_MAGIC + bytes([bits, k]) + fps.size.to_bytes(4, "big")
              + unary_bits.to_bytes(4, "big") + np.ascontiguousarray(fps[:1]).tobytes())
    return header + _pack_remainders(hi[1:], lo[1:], k) + np.packbits(unary).tobytes()


def encode_chunks(sorted_fps: Fingerprints, bits: int, tags: int) -> Iterator[bytes]:
    """Golomb-Rice code strictly increasing fingerprints below ``2^bits`` into chunks of at
    most ``MAX_CHUNK_BYTES``; ``tags`` is the rule's whole tag count (it sets ``k``)."""
    if not SECURITY_BITS <= bits <= MAX_BITS:
        raise ValueError(f"fingerprint bits must lie in [{SECURITY_BITS}, {MAX_BITS}]")
    fps = np.ascontiguousarray(sorted_fps, dtype=FP_DTYPE)
    _check_sorted_distinct(fps, "encode_chunks")
    if not _below(*_split(fps), bits):
        raise ValueError(f"encode_chunks: a fingerprint does not fit {bits} bits")
    k = rice_parameter(bits, tags)
    if bits - k > 64:
        raise ValueError(f"{bits}-bit fingerprints over {tags} tags leave a high part wider "
                         "than 64 bits")
    per_chunk = max(1, min(MAX_CHUNK_TAGS,
                           8 * (MAX_CHUNK_BYTES - CHUNK_HEADER_BYTES) // (k + 4)))
    # A gap too wide for unary coding starts a new chunk (its first value is written raw).
    high = _shr(*_split(fps), k)[1]
    cuts = (np.flatnonzero(np.diff(high) > _U64(_MAX_UNARY_GAP)) + 1).tolist()
    pending = [fps[a:min(a + per_chunk, b)]
               for a_seg, b in zip([0, *cuts], [*cuts, fps.size], strict=True)
               for a in range(a_seg, b, per_chunk)][::-1]
    while pending:
        part = pending.pop()
        chunk = _encode_one(part, bits, k)
        if chunk is None:  # skewed data: halve until it fits
            mid = part.size // 2
            pending.extend((part[mid:], part[:mid]))
            continue
        yield chunk


def _refuse(index: int, why: str) -> ValueError:
    return ValueError(f"tag-set chunk {index}: {why}")


def _decode_one(chunk: Any, index: int, bits: int | None) -> tuple[int, Fingerprints]:
    if not isinstance(chunk, bytes | bytearray | memoryview):
        raise _refuse(index, f"expected bytes, got {type(chunk).__name__}")
    data = bytes(chunk)
    if len(data) > MAX_CHUNK_BYTES:
        raise _refuse(index, f"{len(data)} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")
    if len(data) < CHUNK_HEADER_BYTES:
        raise _refuse(index, f"{len(data)} bytes is shorter than the "
                      f"{CHUNK_HEADER_BYTES}-byte header")
    if data[:4] != CHUNK_MAGIC:
        raise _refuse(index, "bad magic (not a tag-set chunk of this version)")
    got_bits, k = data[4], data[5]
    count = int.from_bytes(data[6:10], "big")
    unary_bits = int.from_bytes(data[10:14], "big")
    if not SECURITY_BITS <= got_bits <= MAX_BITS:
        raise _refuse(index, f"fingerprint length {got_bits} outside "
                      f"[{SECURITY_BITS}, {MAX_BITS}]")
    if bits is not None and got_bits != bits:
        raise _refuse(index, f"fingerprint length {got_bits}, expected {bits}")
    if not 1 <= k <= got_bits or got_bits - k > 64:
        raise _refuse(index, f"Rice parameter {k} invalid for {got_bits}-bit fingerprints")
    if count < 1:
        raise _refuse(index, "count is zero")
    if count > MAX_CHUNK_TAGS:
        raise _refuse(index, f"count {count} exceeds the {MAX_CHUNK_TAGS}-value limit")
    rest = count - 1
    rem_bytes = (rest * k + 7) // 8
    unary_bytes = (unary_bits + 7) // 8
    expected = CHUNK_HEADER_BYTES + rem_bytes + unary_bytes
    if len(data) != expected:
        raise _refuse(index, f"{len(data)} bytes, but count {count}, k {k} and "
                      f"{unary_bits} unary bits need exactly {expected}")
    first = np.frombuffer(data[14:30], dtype=FP_DTYPE)
    f_hi, f_lo = _split(first)
    if not _below(f_hi, f_lo, got_bits):
        raise _refuse(index, f"first value does not fit {got_bits} bits")
    if rest == 0:
        if unary_bits:
            raise _refuse(index, "unary bits present for a single value")
        return got_bits, first.copy()
    rem_section = np.frombuffer(data, dtype=np.uint8, count=rem_bytes, offset=30)
    rem_all = np.unpackbits(rem_section)
    if rem_all[rest * k:].any():
        raise _refuse(index, "nonzero padding after the remainders")
    unary = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=30 + rem_bytes))
    if unary[unary_bits:].any():
        raise _refuse(index, "nonzero padding after the unary section")
    ones = np.flatnonzero(unary[:unary_bits])
    if ones.size != rest:
        raise _refuse(index, f"{ones.size} unary terminators for {rest} values")
    if ones[-1] != unary_bits - 1:
        raise _refuse(index, "unary section does not end with a terminator")
    deltas = np.diff(ones, prepend=-1) - 1
    q_first = int(_shr(f_hi, f_lo, k)[1][0])
    if q_first + int(deltas.sum()) >= 1 << (got_bits - k):
        raise _refuse(index, f"a value does not fit {got_bits} bits")
    q = _U64(q_first) + np.cumsum(deltas.astype(_U64))
    width = (k + 7) // 8  # bounded by the chunk: about rest * (k + 7) bytes at most
    padded = np.zeros((rest, 8 * width), dtype=np.uint8)
    padded[:, 8 * width - k:] = rem_all[:rest * k].reshape(rest, k)
    del rem_all
    r_bytes = np.zeros((rest, 16), dtype=np.uint8)
    r_bytes[:, 16 - width:] = np.packbits(padded, axis=1)
    del padded
    r_words = r_bytes.reshape(-1).view(">u8").reshape(-1, 2).astype(_U64)
    q_hi, q_lo = _shl(np.zeros_like(q), q, k)
    hi, lo = q_hi | r_words[:, 0], q_lo | r_words[:, 1]
    values = np.concatenate([first, _join(hi, lo)])
    _check_sorted_distinct(values, f"tag-set chunk {index}")
    return got_bits, values


def decode_chunks(chunks: Iterable[bytes], *, bits: int | None = None,
                  max_tags: int | None = None) -> Iterator[Fingerprints]:
    """Decode chunks one at a time into sorted fingerprint blocks, validating each.

    Refuses (ValueError naming the chunk) oversized or truncated chunks, a fingerprint length
    other than ``bits`` (or than the first chunk's), values that do not strictly increase
    within and across chunks, and more than ``max_tags`` values in all.
    """
    seen_bits = bits
    total = 0
    last: Fingerprints | None = None
    for index, chunk in enumerate(chunks):
        got_bits, block = _decode_one(chunk, index, seen_bits)
        seen_bits = got_bits
        total += block.size
        if max_tags is not None and total > max_tags:
            raise _refuse(index, f"more than {max_tags} tags in the tag set")
        if last is not None and not block[0] > last[-1]:
            raise _refuse(index, "does not start above the previous chunk's last value")
        last = block[-1:]
        yield block


def merge_matches(requester: Fingerprints, positions: Sequence[int] | npt.NDArray[np.int64],
                  blocks: Iterable[Fingerprints]) -> Iterator[tuple[int, int]]:
    """Stream the sorted tag-set blocks past the requester's sorted fingerprints and yield
    ``(requester position, fingerprint)`` for each hit, never holding more than one block.

    ``requester`` must be sorted (duplicates allowed: each position is reported); ``blocks``
    must strictly increase, as :func:`decode_chunks` guarantees (checked again here).
    """
    req = np.ascontiguousarray(requester, dtype=FP_DTYPE)
    pos = np.asarray(positions, dtype=np.int64)
    if pos.shape != req.shape:
        raise ValueError(f"{req.size} fingerprints but {pos.size} positions")
    if req.size > 1 and not bool(np.all(req[1:] >= req[:-1])):
        raise ValueError("requester fingerprints are not sorted")
    start = 0
    last: Fingerprints | None = None
    for index, raw in enumerate(blocks):
        block = np.ascontiguousarray(raw, dtype=FP_DTYPE)
        if block.size == 0:
            continue
        _check_sorted_distinct(block, f"tag-set block {index}")
        if last is not None and not block[0] > last[-1]:
            raise ValueError(f"tag-set block {index} does not start above the previous block")
        last = block[-1:]
        lo_i = start + int(np.searchsorted(req[start:], block[0], side="left"))
        hi_i = lo_i + int(np.searchsorted(req[lo_i:], block[-1], side="right"))
        start = hi_i
        if hi_i == lo_i:
            continue
        window = req[lo_i:hi_i]
        at = np.minimum(np.searchsorted(block, window), block.size - 1)
        hits = np.flatnonzero(block[at] == window)
        if hits.size:
            values = to_ints(window[hits])
            yield from zip(pos[lo_i + hits].tolist(), values, strict=True)
