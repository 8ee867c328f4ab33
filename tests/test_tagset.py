"""Epoch tag sets (protocol/crypto/tagset.py): fingerprints, Golomb-Rice chunks, the merge."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.crypto import oprf, tagset
from protocol.crypto.encoding import encode


def _random_fps(n: int, bits: int, seed: int) -> tagset.Fingerprints:
    rng = np.random.default_rng(seed)
    values = {int.from_bytes(rng.bytes(16), "big") >> (128 - bits) for _ in range(n)}
    return np.sort(tagset.from_ints(values))


def _round_trip(fps: tagset.Fingerprints, bits: int, tags: int) -> tagset.Fingerprints:
    chunks = list(tagset.encode_chunks(fps, bits, tags))
    assert all(len(c) <= tagset.MAX_CHUNK_BYTES for c in chunks)
    blocks = list(tagset.decode_chunks(chunks, bits=bits))
    return np.concatenate(blocks) if blocks else tagset.empty()


def test_bits_follow_the_formula_and_bound_the_false_positive_rate() -> None:
    assert tagset.fingerprint_bits(2**22, 10_000_000) == 40 + 22 + 24
    assert tagset.fingerprint_bits(1, 1) == 40
    for e, n in ((2**22, 160_000_000), (1_280_000, 10_000_000), (7, 3)):
        bits = tagset.fingerprint_bits(e, n)
        assert tagset.false_positive_bound(e, n, bits) <= 2.0**-40
    with pytest.raises(ValueError, match="at most 128"):
        tagset.fingerprint_bits(2**60, 2**40)


def test_fingerprint_is_the_domain_separated_sha512_prefix() -> None:
    y = os.urandom(64)
    bits = 86
    got = tagset.to_ints(tagset.fingerprints([y], epoch_id="2026-11", rule_id="tin+dob",
                                             bits=bits))[0]
    digest = hashlib.sha512(encode("gated-psi/epoch-tag/v1", "2026-11", "tin+dob", y)).digest()
    assert got == int.from_bytes(digest, "big") >> (512 - bits)
    other_rule = tagset.fingerprints([y], epoch_id="2026-11", rule_id="tin+last_name", bits=bits)
    other_epoch = tagset.fingerprints([y], epoch_id="2026-12", rule_id="tin+dob", bits=bits)
    assert tagset.to_ints(other_rule)[0] != got != tagset.to_ints(other_epoch)[0]


def test_epoch_key_is_derive_key_pair_with_the_epoch_info() -> None:
    master = os.urandom(32)
    sk = tagset.epoch_key(master, "2026-11")
    assert sk == oprf.derive_key_pair(master, b"gated-psi/epoch-key/v1:2026-11")[0]
    assert sk != tagset.epoch_key(master, "2026-12")
    with pytest.raises(ValueError, match="epoch id"):
        tagset.epoch_key(master, "")


@settings(max_examples=60, deadline=None)
@given(st.integers(40, 128), st.lists(st.integers(0, 2**128 - 1), max_size=300),
       st.integers(1, 2**30))
def test_encode_decode_round_trip(bits: int, raw: list[int], tags: int) -> None:
    values = sorted({v >> (128 - bits) for v in raw})
    fps = tagset.from_ints(values)
    if bits - tagset.rice_parameter(bits, tags) > 64:
        with pytest.raises(ValueError, match="wider than 64 bits"):
            list(tagset.encode_chunks(fps, bits, tags))
        return
    assert tagset.to_ints(_round_trip(fps, bits, tags)) == values


def test_edge_values_round_trip() -> None:
    bits = 128
    values = [0, 1, 2**64 - 1, 2**64, 2**127, 2**128 - 1]
    for tags in (1, 6, 2**20, 2**64):
        assert tagset.to_ints(_round_trip(tagset.from_ints(values), bits, tags)) == values


def test_bits_per_tag_near_k_plus_two_and_under_the_target() -> None:
    n = 200_000
    bits = tagset.fingerprint_bits(2**22, n)
    fps = _random_fps(n, bits, seed=1)
    chunks = list(tagset.encode_chunks(fps, bits, fps.size))
    per_tag = 8 * sum(len(c) for c in chunks) / fps.size
    k = tagset.rice_parameter(bits, fps.size)
    assert k == 62
    assert k + 1.5 < per_tag < k + 3.2, per_tag
    assert per_tag / 8 <= 8.5
    assert len(chunks) >= 2  # 200k tags do not fit one 1 MiB chunk


def test_encoder_refuses_unsorted_duplicate_or_oversized_values() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        list(tagset.encode_chunks(tagset.from_ints([5, 3]), 64, 2))
    with pytest.raises(ValueError, match="strictly increasing"):
        list(tagset.encode_chunks(tagset.from_ints([3, 3]), 64, 2))
    with pytest.raises(ValueError, match="does not fit 64 bits"):
        list(tagset.encode_chunks(tagset.from_ints([2**64]), 64, 2))


def _chunk(bits: int = 64) -> bytes:
    fps = _random_fps(50, bits, seed=2)
    (chunk,) = tagset.encode_chunks(fps, bits, 50)
    return chunk


def _decode(*chunks: object, bits: int | None = None, max_tags: int | None = None) -> None:
    for _ in tagset.decode_chunks(chunks, bits=bits, max_tags=max_tags):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda c: c[:10], "shorter than the 30-byte header"),
    (lambda c: b"XXXX" + c[4:], "bad magic"),
    (lambda c: c + b"\x00", "need exactly"),
    (lambda c: c[:-1], "need exactly"),
    (lambda c: c[:4] + bytes([39]) + c[5:], r"fingerprint length 39 outside"),
    (lambda c: c[:5] + bytes([0]) + c[6:], "Rice parameter 0 invalid"),
    (lambda c: c[:6] + (0).to_bytes(4, "big") + c[10:], "count is zero"),
    (lambda c: c[:6] + (2**32 - 1).to_bytes(4, "big") + c[10:], r"exceeds the \d+-value limit"),
    (lambda c: c[:10] + (2**32 - 1).to_bytes(4, "big") + c[14:], "need exactly"),
    (lambda c: b"x" * (tagset.MAX_CHUNK_BYTES + 1), "exceeds the"),
    (lambda c: c[:-1] + bytes([c[-1] ^ 0x01]), "terminator|padding|increasing"),
    (lambda c: c[:14] + b"\xff" * 16 + c[30:], "does not fit 64 bits"),
])
def test_hostile_chunks_are_refused_with_a_reason(mutate, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        _decode(mutate(_chunk()))


def test_hostile_streams_are_refused() -> None:
    a, b = _chunk(), _chunk()
    with pytest.raises(ValueError, match="does not start above"):
        _decode(a, b)  # the same values twice: not increasing across chunks
    with pytest.raises(ValueError, match="expected 80"):
        _decode(a, bits=80)
    with pytest.raises(ValueError, match="more than 10 tags"):
        _decode(a, max_tags=10)
    with pytest.raises(ValueError, match="expected bytes"):
        _decode("text")
    # Zero deltas with a repeated remainder: a duplicate value inside a chunk.
    bits, k = 64, 40
    header = (tagset.CHUNK_MAGIC + bytes([bits, k]) + struct.pack(">II", 2, 1)
              + tagset.from_ints([5]).tobytes())
    remainder = (5).to_bytes(5, "big")
    with pytest.raises(ValueError, match="strictly increasing"):
        _decode(header + remainder + b"\x80")


def test_unary_overflow_is_refused_without_wrapping() -> None:
    bits, k = 64, 63
    first = tagset.from_ints([1 << 63])  # high part already at its maximum, 1
    header = (tagset.CHUNK_MAGIC + bytes([bits, k]) + struct.pack(">II", 2, 2)
              + first.tobytes())
    with pytest.raises(ValueError, match="does not fit 64 bits"):
        _decode(header + bytes(8) + b"\x40")  # one more step of the high part


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**70), max_size=200), st.lists(st.integers(0, 2**70),
       max_size=200), st.integers(1, 40))
def test_streaming_merge_equals_set_intersection(tags: list[int], queries: list[int],
                                                 per_block: int) -> None:
    tag_values = sorted(set(tags) | set(queries[::3]))  # some queries always hit
    fps = tagset.from_ints(tag_values)
    blocks = [fps[i:i + per_block] for i in range(0, fps.size, per_block)]
    sorted_fps, positions = tagset.sort_with_positions(tagset.from_ints(queries))
    got = sorted(tagset.merge_matches(sorted_fps, positions, blocks))
    members = set(tag_values)
    assert got == sorted((i, q) for i, q in enumerate(queries) if q in members)


def test_merge_through_the_codec_and_refuses_bad_inputs() -> None:
    bits = 72
    fps = _random_fps(30_000, bits, seed=3)
    queries = np.concatenate([fps[::1000], _random_fps(500, bits, seed=4)])
    sorted_fps, positions = tagset.sort_with_positions(queries)
    blocks = tagset.decode_chunks(tagset.encode_chunks(fps, bits, fps.size), bits=bits)
    got = dict(tagset.merge_matches(sorted_fps, positions, blocks))
    assert sorted(got) == list(range(30))
    assert [got[i] for i in range(30)] == tagset.to_ints(fps[::1000])
    with pytest.raises(ValueError, match="not sorted"):
        list(tagset.merge_matches(queries[::-1], positions, [fps]))
    with pytest.raises(ValueError, match="positions"):
        list(tagset.merge_matches(sorted_fps, positions[:-1], [fps]))
    with pytest.raises(ValueError, match="does not start above"):
        list(tagset.merge_matches(sorted_fps, positions, [fps[:10], fps[5:20]]))


def test_decoding_a_full_chunk_of_tiny_values_stays_bounded() -> None:
    import tracemalloc

    # k = 1: the densest coding a peer can choose (about 2.5 bits per value); the value cap,
    # not the byte cap, bounds such a chunk.
    bits, tags = 64, 2**63
    assert tagset.rice_parameter(bits, tags) == 1
    values = np.arange(3 * tagset.MAX_CHUNK_TAGS, dtype=np.uint64)
    fps = tagset._join(np.zeros_like(values), values)
    chunks = list(tagset.encode_chunks(fps, bits, tags))
    assert len(chunks) == 3
    tracemalloc.start()
    blocks = [b.size for b in tagset.decode_chunks(chunks, bits=bits)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert blocks == [tagset.MAX_CHUNK_TAGS] * 3
    # About 140 bytes per value of one chunk (measured), whatever the length of the stream.
    assert peak < 160 * tagset.MAX_CHUNK_TAGS, peak
    too_many = (chunks[0][:6] + (tagset.MAX_CHUNK_TAGS + 1).to_bytes(4, "big")
                + chunks[0][10:])
    with pytest.raises(ValueError, match="exceeds the 262144-value limit"):
        _decode(too_many)


def test_sparse_values_are_split_into_chunks_that_fit() -> None:
    # High parts 65,000 apart: unary-coded, 200 of them need ~1.6 MB, so the encoder halves.
    bits, tags = 100, 2**40
    k = tagset.rice_parameter(bits, tags)
    values = [(i * 65_000 << k) | i for i in range(200)]
    chunks = list(tagset.encode_chunks(tagset.from_ints(values), bits, tags))
    assert len(chunks) >= 2 and all(len(c) <= tagset.MAX_CHUNK_BYTES for c in chunks)
    decoded = np.concatenate(list(tagset.decode_chunks(chunks, bits=bits)))
    assert tagset.to_ints(decoded) == values
