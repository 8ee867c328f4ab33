"""The canonical length-prefixed encoding: injective, invertible, domain-separated."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.crypto.encoding import (
    LENGTH_BYTES,
    decode,
    encode,
    encode_pairs,
    encode_strs,
    lp,
    u64,
)
from protocol.domain.messages import RECEIPT_DOMAIN, Receipt
from protocol.domain.records import MATCH_KEY_DST, encode_match_key
from protocol.policy.decide import AUTHORIZATION_TAG

part_tuples = st.lists(st.binary(max_size=24), max_size=6).map(tuple)
# Parts drawn from a tiny alphabet collide under plain concatenation ("a" + "b" == "ab").
tricky_parts = st.lists(
    st.sampled_from([b"", b"a", b"b", b"ab", b"\x00", b"\x00" * LENGTH_BYTES]), max_size=5
).map(tuple)


@given(part_tuples)
def test_decode_inverts_encode(parts: tuple[bytes, ...]) -> None:
    assert decode(encode(*parts)) == parts


@given(part_tuples | tricky_parts, part_tuples | tricky_parts)
def test_different_part_tuples_never_encode_equal(
    a: tuple[bytes, ...], b: tuple[bytes, ...]
) -> None:
    assert (encode(*a) == encode(*b)) == (a == b)


@given(st.lists(st.text(max_size=8), max_size=5), st.lists(st.text(max_size=8), max_size=5))
def test_string_tuples_are_injective_when_nested(a: list[str], b: list[str]) -> None:
    assert (encode(b"tag", encode_strs(a)) == encode(b"tag", encode_strs(b))) == (a == b)


_part = st.text(max_size=6) | st.binary(max_size=6) | st.integers(0, 2**64 - 1)


@given(st.lists(st.tuples(_part, _part), max_size=6))
def test_encode_pairs_is_the_nested_encoding(pairs: list[tuple[str | bytes | int, ...]]) -> None:
    """The one-pass pair encoder (disclosure transcripts) gives exactly the nested bytes."""
    assert encode_pairs(pairs) == encode(*(encode(a, b) for a, b in pairs))


def test_layout_is_eight_byte_big_endian_length_then_bytes() -> None:
    assert lp(b"xyz") == b"\x00\x00\x00\x00\x00\x00\x00\x03xyz"
    assert encode(b"", "é", 1) == (
        u64(0) + u64(2) + "é".encode() + u64(8) + (1).to_bytes(8, "big")
    )
    assert encode_strs(()) == b""
    assert encode_strs(("",)) == u64(0)


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_u64_refuses_values_outside_64_bits(value: int) -> None:
    with pytest.raises(ValueError):
        u64(value)


@pytest.mark.parametrize(
    "data", [b"\x00" * (LENGTH_BYTES - 1), u64(4) + b"abc", u64(1) + b"a" + b"\x00"]
)
def test_decode_refuses_truncated_input(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode(data)


@pytest.mark.parametrize("tag", [AUTHORIZATION_TAG, RECEIPT_DOMAIN, MATCH_KEY_DST])
def test_signed_and_hashed_formats_lead_with_a_versioned_domain_tag(tag: bytes) -> None:
    assert tag.startswith(b"gated-psi/") and tag.rsplit(b"/", 1)[1].startswith(b"v")


def test_formats_under_different_tags_never_share_bytes() -> None:
    # The same values under two tags: the first part differs, so the encodings differ.
    receipt = Receipt("auth-1", "s-1", "agency-b", "agency-a", 3, 1, bytes(32))
    assert decode(receipt.signed_bytes())[0] == RECEIPT_DOMAIN
    assert decode(encode_match_key("tin", ["123456789"]))[0] == MATCH_KEY_DST
    assert receipt.signed_bytes() != encode(MATCH_KEY_DST, *decode(receipt.signed_bytes())[1:])
    assert Receipt.from_signed_bytes(receipt.signed_bytes()) == receipt
