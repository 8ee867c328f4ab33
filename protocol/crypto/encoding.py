"""The one canonical length-prefixed encoding of everything the project hashes, signs or MACs.

``encode(p1, ..., pn)`` is ``u64(len(b1)) || b1 || ... || u64(len(bn)) || bn`` where ``bi`` is
the part as bytes (bytes as given, ``str`` as UTF-8, ``int`` as :func:`u64`). Reading a
length, then exactly that many bytes, parses the output back to exactly one tuple of byte
strings (:func:`decode`), so two different tuples never encode to the same bytes: the
encoding is injective, and hashing or signing it cannot be confused by moving a boundary.
Nesting keeps this (an inner ``encode`` is one part of the outer one), which is how tuples of
strings are encoded (:func:`encode_strs`).

Domain separation: the first part of every encoding is a versioned domain tag
``b"gated-psi/<purpose>/vN"`` (or, inside one transcript stream, a fixed message label), and
the tag fixes how many parts follow and what type each has. Parts of different types are
compared only under the same tag, so ``"a"`` and ``b"a"`` sharing bytes is no ambiguity. A
format's tag version is bumped whenever its bytes change. Users: authorization canonical
bytes and digests, subject commitments, session and aggregate transcripts and receipts, KKRT
key derivation, match keys, the audit chain and the requester's result-store AD
(docs/architecture.md, Layers).

RFC 9497/9380 inputs (``protocol.crypto.oprf``) keep the 2-byte prefixes the RFCs define.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Width of every length prefix: 8-byte big-endian, so no part is ever too long to encode.
LENGTH_BYTES = 8
_U64_MAX = (1 << 64) - 1

Part = bytes | bytearray | memoryview | str | int


def u64(value: int) -> bytes:
    """A fixed-width 8-byte big-endian unsigned integer; ValueError outside 0..2^64-1."""
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{value} does not fit an unsigned 64-bit integer")
    return value.to_bytes(LENGTH_BYTES, "big")


def _as_bytes(part: Part) -> bytes:
    if isinstance(part, str):
        return part.encode("utf-8")
    if isinstance(part, int):
        return u64(part)
    return bytes(part)


def lp(part: Part) -> bytes:
    """One length-prefixed part: ``u64(len(b)) || b``."""
    raw = part if isinstance(part, bytes) else _as_bytes(part)  # bytes: no copy (hot path)
    return len(raw).to_bytes(LENGTH_BYTES, "big") + raw


def encode(*parts: Part) -> bytes:
    """Every part length-prefixed, concatenated; the inverse is :func:`decode`.

    Transcripts encode every message and every disclosed field, millions of parts per large
    session, so bytes and str take an inlined path (the same bytes as :func:`lp`).
    """
    out: list[bytes] = []
    append = out.append
    for part in parts:
        if isinstance(part, bytes):
            raw = part
        elif isinstance(part, str):
            raw = part.encode("utf-8")
        else:
            raw = _as_bytes(part)
        append(len(raw).to_bytes(LENGTH_BYTES, "big"))
        append(raw)
    return b"".join(out)


def encode_pairs(pairs: Iterable[tuple[Part, Part]]) -> bytes:
    """``encode(*(encode(a, b) for a, b in pairs))`` in one pass: the same bytes.

    A disclosure batch's transcript is a few hundred thousand such pairs (each record's
    fields, each request's outputs) on both sides; one call per pair was a visible share of
    the disclosure phase at full scale.
    """
    out: list[bytes] = []
    append = out.append
    for a, b in pairs:
        first = a if isinstance(a, bytes) else a.encode("utf-8") if isinstance(a, str) \
            else _as_bytes(a)
        second = b if isinstance(b, bytes) else b.encode("utf-8") if isinstance(b, str) \
            else _as_bytes(b)
        append((len(first) + len(second) + 2 * LENGTH_BYTES).to_bytes(LENGTH_BYTES, "big"))
        append(len(first).to_bytes(LENGTH_BYTES, "big"))
        append(first)
        append(len(second).to_bytes(LENGTH_BYTES, "big"))
        append(second)
    return b"".join(out)


def encode_strs(items: Iterable[str]) -> bytes:
    """A tuple of strings as one nested encoding (``()`` and ``("",)`` differ)."""
    return encode(*items)


def decode(data: bytes) -> tuple[bytes, ...]:
    """The parts :func:`encode` joined; ValueError on truncated or trailing bytes."""
    view = memoryview(data)
    parts: list[bytes] = []
    pos = 0
    while pos < len(view):
        if pos + LENGTH_BYTES > len(view):
            raise ValueError("truncated length prefix")
        size = int.from_bytes(view[pos : pos + LENGTH_BYTES], "big")
        pos += LENGTH_BYTES
        if size > len(view) - pos:
            raise ValueError("truncated part")
        parts.append(bytes(view[pos : pos + size]))
        pos += size
    return tuple(parts)
