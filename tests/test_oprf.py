"""protocol.crypto.oprf against the published vectors, plus validation and property tests.

Vectors are data outside the code: RFC 9497 Appendix A ships as tests/data/rfc9497.json
(loaded by tests/vectors.py, never skipped); RFC 9380 K.3 and RFC 9496 A.2 are short enough
to list here.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from typing import Any

import pytest
import rbcl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.adapters.pools import AggregatePool, BatchPool
from protocol.crypto import oprf
from protocol.errors import InvalidElementError, PSIError
from tests.vectors import rfc9497_suite
from tests.vectors import split_field as _split

L = oprf.GROUP_ORDER
P = 2**255 - 19  # the ristretto255 base field prime

SUITE = rfc9497_suite(oprf.MODE_OPRF)


def _suite_key() -> bytes:
    sk, _ = oprf.derive_key_pair(bytes.fromhex(SUITE["seed"]), bytes.fromhex(SUITE["keyInfo"]))
    return sk


def _element(i: int) -> bytes:
    """A deterministic valid non-identity element."""
    return oprf.hash_to_group(b"element-%d" % i)


# --- RFC 9497 Appendix A.1.1: OPRF(ristretto255, SHA-512), mode 0 ------------------------


def test_context_string_matches_vector_group_dst() -> None:
    assert bytes.fromhex(SUITE["groupDST"]) == b"HashToGroup-" + oprf.CONTEXT_STRING
    assert SUITE["mode"] == oprf.MODE_OPRF == 0


def test_derive_key_pair_vector() -> None:
    sk, pk = oprf.derive_key_pair(bytes.fromhex(SUITE["seed"]), bytes.fromhex(SUITE["keyInfo"]))
    assert sk.hex() == SUITE["skSm"]
    assert pk == rbcl.crypto_scalarmult_ristretto255_base(sk)
    assert oprf.deserialize_element(pk) == pk


@pytest.mark.parametrize(
    "vector", SUITE["vectors"], ids=[f"vector{i}" for i in range(len(SUITE["vectors"]))]
)
def test_protocol_vector(vector: dict[str, Any]) -> None:
    sk = _suite_key()
    inputs = _split(vector["Input"])
    blinds = _split(vector["Blind"])
    blinded = _split(vector["BlindedElement"])
    evaluated = _split(vector["EvaluationElement"])
    outputs = _split(vector["Output"])
    assert len(inputs) == vector["Batch"]
    for x, r, b, e, out in zip(inputs, blinds, blinded, evaluated, outputs, strict=True):
        got_r, got_b = oprf.blind(x, r)
        assert (got_r, got_b) == (r, b)
        assert oprf.blind_evaluate(sk, b) == e
        assert oprf.finalize(x, r, e) == out
        assert oprf.evaluate(sk, x) == out
        assert len(out) == oprf.OUTPUT_SIZE


def test_batch_forms_match_all_vectors_at_once() -> None:
    sk = _suite_key()
    inputs: list[bytes] = []
    blinds = blinded = evaluated = b""
    outputs: list[bytes] = []
    for vector in SUITE["vectors"]:
        inputs += _split(vector["Input"])
        blinds += b"".join(_split(vector["Blind"]))
        blinded += b"".join(_split(vector["BlindedElement"]))
        evaluated += b"".join(_split(vector["EvaluationElement"]))
        outputs += _split(vector["Output"])
    assert oprf.blind_batch(inputs, blinds) == (blinds, blinded)
    assert oprf.blind_evaluate_batch(sk, blinded) == evaluated
    assert oprf.finalize_batch(inputs, blinds, evaluated) == outputs
    assert oprf.evaluate_batch(sk, inputs) == outputs


# --- RFC 9380 Appendix K.3: expand_message_xmd(SHA-512) ----------------------------------

XMD_DST = b"QUUX-V01-CS02-with-expander-SHA512-256"
XMD_MSGS = {
    "empty": b"",
    "abc": b"abc",
    "abcdef": b"abcdef0123456789",
    "q128": b"q128_" + b"q" * 128,
    "a512": b"a512_" + b"a" * 512,
}
XMD_VECTORS = [
    ("empty", 0x20, "6b9a7312411d92f921c6f68ca0b6380730a1a4d982c507211a90964c394179ba"),
    ("abc", 0x20, "0da749f12fbe5483eb066a5f595055679b976e93abe9be6f0f6318bce7aca8dc"),
    ("abcdef", 0x20, "087e45a86e2939ee8b91100af1583c4938e0f5fc6c9db4b107b83346bc967f58"),
    ("q128", 0x20, "7336234ee9983902440f6bc35b348352013becd88938d2afec44311caf8356b3"),
    ("a512", 0x20, "57b5f7e766d5be68a6bfe1768e3c2b7f1228b3e4b3134956dd73a59b954c66f4"),
    (
        "empty",
        0x80,
        "41b037d1734a5f8df225dd8c7de38f851efdb45c372887be655212d07251b921"
        "b052b62eaed99b46f72f2ef4cc96bfaf254ebbbec091e1a3b9e4fb5e5b619d2e"
        "0c5414800a1d882b62bb5cd1778f098b8eb6cb399d5d9d18f5d5842cf5d13d7e"
        "b00a7cff859b605da678b318bd0e65ebff70bec88c753b159a805d2c89c55961",
    ),
    (
        "abc",
        0x80,
        "7f1dddd13c08b543f2e2037b14cefb255b44c83cc397c1786d975653e36a6b11"
        "bdd7732d8b38adb4a0edc26a0cef4bb45217135456e58fbca1703cd6032cb134"
        "7ee720b87972d63fbf232587043ed2901bce7f22610c0419751c065922b48843"
        "1851041310ad659e4b23520e1772ab29dcdeb2002222a363f0c2b1c972b3efe1",
    ),
    (
        "abcdef",
        0x80,
        "3f721f208e6199fe903545abc26c837ce59ac6fa45733f1baaf0222f8b7acb04"
        "24814fcb5eecf6c1d38f06e9d0a6ccfbf85ae612ab8735dfdf9ce84c372a77c8"
        "f9e1c1e952c3a61b7567dd0693016af51d2745822663d0c2367e3f4f0bed827f"
        "eecc2aaf98c949b5ed0d35c3f1023d64ad1407924288d366ea159f46287e61ac",
    ),
    (
        "q128",
        0x80,
        "b799b045a58c8d2b4334cf54b78260b45eec544f9f2fb5bd12fb603eaee70db7"
        "317bf807c406e26373922b7b8920fa29142703dd52bdf280084fb7ef69da78af"
        "df80b3586395b433dc66cde048a258e476a561e9deba7060af40adf30c64249c"
        "a7ddea79806ee5beb9a1422949471d267b21bc88e688e4014087a0b592b695ed",
    ),
    (
        "a512",
        0x80,
        "05b0bfef265dcee87654372777b7c44177e2ae4c13a27f103340d9cd11c86cb2"
        "426ffcad5bd964080c2aee97f03be1ca18e30a1f14e27bc11ebbd650f305269c"
        "c9fb1db08bf90bfc79b42a952b46daf810359e7bc36452684784a64952c343c5"
        "2e5124cd1f71d474d5197fefc571a92929c9084ffe1112cf5eea5192ebff330b",
    ),
]


@pytest.mark.parametrize(("msg", "length", "expected"), XMD_VECTORS)
def test_expand_message_xmd_rfc9380_k3(msg: str, length: int, expected: str) -> None:
    assert oprf.expand_message_xmd(XMD_MSGS[msg], XMD_DST, length).hex() == expected


def test_expand_message_xmd_oversize_dst_is_hashed_first() -> None:
    long_dst = b"D" * 256
    short_dst = hashlib.sha512(b"H2C-OVERSIZE-DST-" + long_dst).digest()
    for length in (32, 64, 200):
        assert oprf.expand_message_xmd(b"m", long_dst, length) == oprf.expand_message_xmd(
            b"m", short_dst, length
        )
    # A DST of exactly 255 bytes is used as is.
    dst_255 = b"D" * 255
    assert oprf.expand_message_xmd(b"m", dst_255, 64) != oprf.expand_message_xmd(
        b"m", hashlib.sha512(b"H2C-OVERSIZE-DST-" + dst_255).digest(), 64
    )


def test_expand_message_xmd_limits() -> None:
    assert len(oprf.expand_message_xmd(b"m", XMD_DST, 255 * 64)) == 255 * 64
    with pytest.raises(ValueError, match="ell"):
        oprf.expand_message_xmd(b"m", XMD_DST, 255 * 64 + 1)
    for bad in (65536, 70000, 0, -1):
        with pytest.raises(ValueError, match="len_in_bytes"):
            oprf.expand_message_xmd(b"m", XMD_DST, bad)
    with pytest.raises(ValueError, match="DST"):
        oprf.expand_message_xmd(b"m", b"", 32)


@given(st.binary(max_size=300), st.integers(min_value=16, max_value=600))
def test_expand_message_xmd_prefix_free_in_length(msg: bytes, length: int) -> None:
    """len_in_bytes is hashed in, so a shorter output is not a prefix of a longer one.

    From 16 bytes up a chance equality has probability 2^-128; below that (1 byte: 1/256)
    the property only holds with a probability hypothesis would eventually defeat.
    """
    out = oprf.expand_message_xmd(msg, XMD_DST, length)
    assert len(out) == length
    assert oprf.expand_message_xmd(msg, XMD_DST, length + 1)[:length] != out


# --- hash_to_group / hash_to_scalar -------------------------------------------------------


@given(st.binary(max_size=200))
def test_hash_to_group_fast_path_matches_spec_path(msg: bytes) -> None:
    spec = oprf.hash_to_group(msg, b"HashToGroup-" + oprf.CONTEXT_STRING)
    assert oprf.hash_to_group(msg) == spec
    assert oprf._hash_to_group_default(msg) == spec
    assert oprf.deserialize_element(spec) == spec


@given(st.binary(max_size=200))
def test_hash_to_scalar_is_reduced_wide_hash(msg: bytes) -> None:
    uniform = oprf.expand_message_xmd(msg, b"HashToScalar-" + oprf.CONTEXT_STRING, 64)
    scalar = oprf.hash_to_scalar(msg)
    assert int.from_bytes(scalar, "little") == int.from_bytes(uniform, "little") % L
    assert oprf.hash_to_scalar(msg, b"other-dst") != scalar


def test_hash_functions_are_domain_separated() -> None:
    msg = b"same message"
    assert oprf.hash_to_group(msg) != oprf.hash_to_group(msg, b"HashToGroup-other")
    assert oprf.hash_to_scalar(msg) != oprf.hash_to_scalar(
        msg, b"DeriveKeyPair" + oprf.CONTEXT_STRING
    )


# --- deserialize_element ------------------------------------------------------------------

# RFC 9496 Appendix A.2 ("Invalid Encodings"), a selection from each class.
RFC9496_BAD_ENCODINGS = {
    "non-canonical field encoding": [
        "00ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "f3ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ],
    "negative field element": [
        "0100000000000000000000000000000000000000000000000000000000000000",
        "01ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "ed57ffd8c914fb201471d1c3d245ce3c746fcbe63a3679d51b6a516ebebe0e20",
        "c34c4e1826e5d403b78e246e88aa051c36ccf0aafebffe137d148a2bf9104562",
    ],
    "non-square x^2": [
        "26948d35ca62e643e26a83177332e6b6afeb9d08e4268b650f1f5bbd8d81d371",
        "4eac077a713c57b4f4397629a4145982c661f48044dd3f96427d40b147d9742f",
        "de6a7b00deadc788eb6b6c8d20c0ae96c2f2019078fa604fee5b87d6e989ad7b",
    ],
    "negative xy value": [
        "3eb858e78f5a7254d8c9731174a94f76755fd3941c0ac93735c07ba14579630e",
        "a45fdc55c76448c049a1ab33f17023edfb2be3581e9c7aade8a6125215e04220",
        "d483fe813c6ba647ebbfd3ec41adca1c6130c2beeee9d9bf065c8d151c5f396e",
    ],
}


def _le(value: int) -> bytes:
    return value.to_bytes(32, "little")


# Structural bad encodings: s >= p, s odd ("negative"), bit 255 set.
STRUCTURAL_BAD_ENCODINGS = {
    "s = p": _le(P),
    "s = p + 1 (even, >= p)": _le(P + 1),
    "s = p + 3": _le(P + 3),
    "s = 2^255 - 2 (even, >= p)": _le(2**255 - 2),
    "s = 1 (odd)": _le(1),
    "s = 3 (odd)": _le(3),
    "s = p - 2 (odd)": _le(P - 2),
    "bit 255 set, odd": _le(2**255 + 1),
}


def _top_bit_alias(element: bytes) -> bytes:
    return element[:31] + bytes([element[31] | 0x80])


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_deserialize_element_wrong_length(length: int) -> None:
    with pytest.raises(InvalidElementError, match=rf"^wrong length: got {length} bytes$"):
        oprf.deserialize_element(b"\x01" * length)


@pytest.mark.parametrize(
    "encoding",
    [
        pytest.param(bytes.fromhex(h), id=f"{kind}-{i}")
        for kind, hs in RFC9496_BAD_ENCODINGS.items()
        for i, h in enumerate(hs)
    ]
    + [pytest.param(v, id=k) for k, v in STRUCTURAL_BAD_ENCODINGS.items()],
)
def test_deserialize_element_rejects_non_canonical(encoding: bytes) -> None:
    assert not rbcl.crypto_core_ristretto255_is_valid_point(encoding)
    with pytest.raises(InvalidElementError, match="not a canonical ristretto255 encoding") as err:
        oprf.deserialize_element(encoding)
    assert err.value.code == "invalid_element"


@pytest.mark.parametrize(
    "element", [bytes(32), _element(1), _element(2)], ids=["identity", "p1", "p2"]
)
def test_deserialize_element_rejects_bit_255_aliases(element: bytes) -> None:
    """libsodium 1.0.18 (bundled by rbcl) ignores bit 255, so it accepts an alias of
    every element that decodes to the same point; RFC 9496 says reject it."""
    alias = _top_bit_alias(element)
    assert rbcl.crypto_core_ristretto255_is_valid_point(alias)  # the library gap
    with pytest.raises(InvalidElementError, match=r"^not a canonical ristretto255 encoding$"):
        oprf.deserialize_element(alias)
    sk = oprf.random_scalar()
    with pytest.raises(InvalidElementError, match=r"^blinded element 1: not a canonical"):
        oprf.blind_evaluate_batch(sk, _element(0) + alias)
    with pytest.raises(InvalidElementError, match=r"^evaluated element 0: not a canonical"):
        oprf.finalize_batch([b"x"], oprf.random_scalar(), alias)


def test_deserialize_element_rejects_identity() -> None:
    identity = bytes(32)
    # libsodium accepts the identity as a valid point, which is why we check it apart.
    assert rbcl.crypto_core_ristretto255_is_valid_point(identity)
    with pytest.raises(InvalidElementError, match=r"^identity element$"):
        oprf.deserialize_element(identity)


def test_deserialize_element_rejects_random_non_point() -> None:
    rng = random.Random(9497)
    rejected = 0
    for _ in range(200):
        candidate = rng.randbytes(32)
        if rbcl.crypto_core_ristretto255_is_valid_point(candidate):
            continue
        rejected += 1
        with pytest.raises(InvalidElementError, match="not a canonical"):
            oprf.deserialize_element(candidate)
    assert rejected > 100  # most random strings are not encodings


@given(st.binary(min_size=32, max_size=32))
def test_deserialize_element_accepts_exactly_valid_non_identity(data: bytes) -> None:
    valid = rbcl.crypto_core_ristretto255_is_valid_point(data) and any(data) and data[31] < 0x80
    if valid:
        assert oprf.deserialize_element(data) == data
    else:
        with pytest.raises(InvalidElementError):
            oprf.deserialize_element(data)


def test_deserialize_element_accepts_points_and_other_buffers() -> None:
    point = rbcl.crypto_core_ristretto255_random()
    assert oprf.deserialize_element(point) == point
    assert oprf.deserialize_element(bytearray(point)) == point
    assert type(oprf.deserialize_element(memoryview(point))) is bytes


# --- scalars ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_le(L), "not a canonical scalar"),
        (_le(L + 1), "not a canonical scalar"),
        (b"\xff" * 32, "not a canonical scalar"),
        (bytes(32), "zero scalar"),
        (b"\x01" * 31, "wrong length: got 31 bytes"),
        (b"\x01" * 33, "wrong length: got 33 bytes"),
        (b"", "wrong length: got 0 bytes"),
    ],
)
def test_deserialize_scalar_rejects(data: bytes, message: str) -> None:
    with pytest.raises(InvalidElementError, match=message):
        oprf.deserialize_scalar(data)


def test_deserialize_scalar_accepts_range_ends() -> None:
    assert oprf.deserialize_scalar(_le(1)) == _le(1)
    assert oprf.deserialize_scalar(_le(L - 1)) == _le(L - 1)


def test_random_scalar_is_canonical_nonzero_and_fresh() -> None:
    scalars = [oprf.random_scalar() for _ in range(200)]
    assert len(set(scalars)) == 200
    for s in scalars:
        assert 0 < int.from_bytes(s, "little") < L


# --- key derivation -----------------------------------------------------------------------


def test_derive_key_pair_is_deterministic_and_bound_to_info() -> None:
    seed = b"\x07" * 32
    sk1, pk1 = oprf.derive_key_pair(seed, b"authorization-1")
    assert oprf.derive_key_pair(seed, b"authorization-1") == (sk1, pk1)
    sk2, _ = oprf.derive_key_pair(seed, b"authorization-2")
    assert sk1 != sk2
    assert oprf.deserialize_scalar(sk1) == sk1


def test_derive_key_pair_rejects_bad_seed_and_info() -> None:
    with pytest.raises(ValueError, match="seed"):
        oprf.derive_key_pair(b"\x00" * 31, b"info")
    with pytest.raises(ValueError, match="info"):
        oprf.derive_key_pair(b"\x00" * 32, b"i" * 65536)


def test_derive_key_pair_error_after_256_zero_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []

    def always_zero(msg: bytes, dst: bytes | None = None) -> bytes:
        calls.append(msg)
        return bytes(32)

    monkeypatch.setattr(oprf, "hash_to_scalar", always_zero)
    with pytest.raises(oprf.DeriveKeyPairError):
        oprf.derive_key_pair(b"\x00" * 32, b"info")
    assert len(calls) == 256
    assert [c[-1] for c in calls] == list(range(256))  # the counter byte


def test_derive_key_pair_retries_after_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    real = oprf.hash_to_scalar
    calls: list[bytes] = []

    def zero_once(msg: bytes, dst: bytes | None = None) -> bytes:
        calls.append(msg)
        return bytes(32) if len(calls) == 1 else real(msg, dst)

    monkeypatch.setattr(oprf, "hash_to_scalar", zero_once)
    sk, _ = oprf.derive_key_pair(b"\x00" * 32, b"info")
    assert len(calls) == 2
    assert sk == real(calls[1], b"DeriveKeyPair" + oprf.CONTEXT_STRING)


# --- protocol errors ----------------------------------------------------------------------


def test_input_hashing_to_identity_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oprf, "_from_hash", lambda _h: bytes(32))
    sk = oprf.random_scalar()
    for call in (
        lambda: oprf.blind(b"x"),
        lambda: oprf.evaluate(sk, b"x"),
        lambda: oprf.blind_batch([b"a", b"x"]),
        lambda: oprf.evaluate_batch(sk, [b"a", b"x"]),
    ):
        with pytest.raises(oprf.InvalidInputError, match="identity") as err:
            call()
        assert isinstance(err.value, PSIError)


def test_overlong_input_is_refused() -> None:
    sk = oprf.random_scalar()
    long_input = b"x" * 65536
    with pytest.raises(oprf.InvalidInputError):
        oprf.blind(long_input)
    with pytest.raises(oprf.InvalidInputError):
        oprf.evaluate(sk, long_input)
    with pytest.raises(oprf.InvalidInputError, match="input 1"):
        oprf.evaluate_batch(sk, [b"ok", long_input])
    assert len(oprf.evaluate(sk, b"x" * 65535)) == 64


def test_blind_evaluate_validates_element_and_key() -> None:
    sk = oprf.random_scalar()
    with pytest.raises(InvalidElementError, match="identity"):
        oprf.blind_evaluate(sk, bytes(32))
    with pytest.raises(InvalidElementError, match="wrong length"):
        oprf.blind_evaluate(sk, b"\x02" * 31)
    with pytest.raises(InvalidElementError, match="zero scalar"):
        oprf.blind_evaluate(bytes(32), _element(0))


def test_finalize_validates_element_and_blind() -> None:
    r, blinded = oprf.blind(b"x")
    with pytest.raises(InvalidElementError, match="identity"):
        oprf.finalize(b"x", r, bytes(32))
    with pytest.raises(InvalidElementError, match="not a canonical"):
        oprf.finalize(b"x", r, _le(1))
    with pytest.raises(InvalidElementError, match="blind is zero"):
        oprf.finalize(b"x", _le(L), blinded)


def test_blind_evaluate_batch_names_bad_element() -> None:
    sk = oprf.random_scalar()
    good = [_element(i) for i in range(6)]
    for index, bad, reason in [
        (0, bytes(32), "identity element"),
        (3, _le(1), "not a canonical ristretto255 encoding"),
        (5, b"\xff" * 32, "not a canonical ristretto255 encoding"),
    ]:
        buffer = b"".join([*good[:index], bad, *good[index + 1 :]])
        with pytest.raises(InvalidElementError, match=rf"^blinded element {index}: {reason}$"):
            oprf.blind_evaluate_batch(sk, buffer)
    with pytest.raises(InvalidElementError, match=r"wrong length: .*not a multiple of 32"):
        oprf.blind_evaluate_batch(sk, b"".join(good) + b"\x00")
    assert oprf.blind_evaluate_batch(sk, b"") == b""


def test_finalize_batch_names_bad_element_and_checks_lengths() -> None:
    sk = oprf.random_scalar()
    inputs = [b"a", b"b", b"c"]
    blinds, blinded = oprf.blind_batch(inputs)
    evaluated = oprf.blind_evaluate_batch(sk, blinded)
    corrupt = evaluated[:32] + bytes(32) + evaluated[64:]
    with pytest.raises(InvalidElementError, match=r"^evaluated element 1: identity element$"):
        oprf.finalize_batch(inputs, blinds, corrupt)
    with pytest.raises(InvalidElementError, match="wrong length"):
        oprf.finalize_batch(inputs, blinds, evaluated[:64])
    with pytest.raises(ValueError, match="blinds buffer"):
        oprf.finalize_batch(inputs, blinds[:64], evaluated)
    zero_blind = blinds[:64] + bytes(32)
    with pytest.raises(InvalidElementError, match="blind 2: zero scalar"):
        oprf.finalize_batch(inputs, zero_blind, evaluated)
    assert oprf.finalize_batch([], b"", b"") == []


def test_blind_batch_validates_given_blinds() -> None:
    with pytest.raises(InvalidElementError, match="blind 1: zero scalar"):
        oprf.blind_batch([b"a", b"b"], _le(5) + bytes(32))
    with pytest.raises(ValueError, match="blinds buffer"):
        oprf.blind_batch([b"a", b"b"], _le(5))


def test_batch_invert_matches_pow() -> None:
    rng = random.Random(7)
    values = [rng.randrange(1, L) for _ in range(50)]
    assert oprf._batch_invert(values) == [pow(v, -1, L) for v in values]
    assert oprf._batch_invert([]) == []
    assert oprf._batch_invert([5]) == [pow(5, -1, L)]


# --- properties ---------------------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32).map(lambda s: oprf.derive_key_pair(s, b"k")[0])
scalars = st.integers(min_value=1, max_value=L - 1).map(_le)


@settings(max_examples=60, deadline=None)
@given(x=st.binary(max_size=100), sk=keys, r=scalars)
def test_blinded_protocol_equals_direct_evaluation(x: bytes, sk: bytes, r: bytes) -> None:
    got_r, blinded = oprf.blind(x, r)
    assert got_r == r
    output = oprf.finalize(x, r, oprf.blind_evaluate(sk, blinded))
    assert output == oprf.evaluate(sk, x)
    # A fresh random blind gives a different blinded element but the same output.
    r2, blinded2 = oprf.blind(x)
    assert blinded2 != blinded or r2 == r
    assert oprf.finalize(x, r2, oprf.blind_evaluate(sk, blinded2)) == output


@settings(max_examples=25, deadline=None)
@given(inputs=st.lists(st.binary(max_size=40), max_size=12), sk=keys)
def test_batch_forms_equal_single_forms(inputs: list[bytes], sk: bytes) -> None:
    blinds, blinded = oprf.blind_batch(inputs)
    assert len(blinds) == len(blinded) == 32 * len(inputs)
    n = len(inputs)
    for i in range(n):
        r = blinds[32 * i : 32 * i + 32]
        assert oprf.blind(inputs[i], r)[1] == blinded[32 * i : 32 * i + 32]
    evaluated = oprf.blind_evaluate_batch(sk, blinded)
    assert evaluated == b"".join(
        oprf.blind_evaluate(sk, blinded[32 * i : 32 * i + 32]) for i in range(n)
    )
    outputs = oprf.finalize_batch(inputs, blinds, evaluated)
    assert outputs == [oprf.evaluate(sk, x) for x in inputs]
    assert outputs == oprf.evaluate_batch(sk, inputs)


def test_outputs_depend_on_key_and_input() -> None:
    sk1, sk2 = oprf.random_scalar(), oprf.random_scalar()
    assert oprf.evaluate(sk1, b"x") != oprf.evaluate(sk2, b"x")
    assert oprf.evaluate(sk1, b"x") != oprf.evaluate(sk1, b"y")


# --- BatchPool (protocol.adapters.pools) -------------------------------------------------


def test_batch_offset_names_the_global_index() -> None:
    """A worker given one chunk of a batch names a bad element by its index in the batch."""
    sk = oprf.random_scalar()
    chunk = _element(0) + bytes(32)
    with pytest.raises(InvalidElementError, match=r"^blinded element 101: identity element$"):
        oprf.blind_evaluate_batch(sk, chunk, 100)
    blinds, blinded = oprf.blind_batch([b"a", b"b"])
    evaluated = bytearray(oprf.blind_evaluate_batch(sk, blinded))
    evaluated[32:] = _le(1)
    with pytest.raises(InvalidElementError, match=r"^evaluated element 8: not a canonical"):
        oprf.finalize_batch([b"a", b"b"], blinds, bytes(evaluated), 7)
    assert oprf.evaluate_batch(sk, [b"a"], 5) == oprf.evaluate_batch(sk, [b"a"])


@pytest.fixture(scope="module")
def pool() -> Any:
    # Tiny chunks so that even small batches are spread over both workers.
    with BatchPool(workers=2, chunk_size=7, min_parallel=1) as p:
        yield p


def test_pool_matches_serial_functions(pool: BatchPool) -> None:
    sk = oprf.random_scalar()
    inputs = [b"subject-%d" % i for i in range(40)]
    blinds, blinded = pool.blind(inputs)
    assert oprf.blind_batch(inputs, blinds) == (blinds, blinded)
    assert pool.blind(inputs, blinds) == (blinds, blinded)
    evaluated = pool.blind_evaluate(sk, blinded)
    assert evaluated == oprf.blind_evaluate_batch(sk, blinded)
    outputs = pool.finalize(inputs, blinds, evaluated)
    assert outputs == oprf.finalize_batch(inputs, blinds, evaluated)
    assert pool.evaluate(sk, inputs) == oprf.evaluate_batch(sk, inputs) == outputs
    with pytest.raises(ValueError, match=f"blinds buffer holds {len(blinds) - 32} bytes"):
        pool.blind(inputs, blinds[:-32])
    with pytest.raises(InvalidElementError, match="need 1280 for 40 inputs"):
        pool.finalize(inputs, blinds, evaluated[:-32])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=st.lists(st.binary(max_size=30), max_size=30), sk=keys)
def test_pool_property_equals_serial(pool: BatchPool, inputs: list[bytes], sk: bytes) -> None:
    blinds, blinded = pool.blind(inputs)
    evaluated = pool.blind_evaluate(sk, blinded)
    assert evaluated == oprf.blind_evaluate_batch(sk, blinded)
    assert pool.finalize(inputs, blinds, evaluated) == oprf.evaluate_batch(sk, inputs)
    assert pool.evaluate(sk, inputs) == oprf.evaluate_batch(sk, inputs)


def test_pool_reports_global_index_of_bad_element(pool: BatchPool) -> None:
    sk = oprf.random_scalar()
    elements = [_element(i) for i in range(30)]
    elements[23] = bytes(32)  # lands in the fourth chunk of 7
    with pytest.raises(InvalidElementError, match=r"^blinded element 23: identity element$"):
        pool.blind_evaluate(sk, b"".join(elements))
    inputs = [b"%d" % i for i in range(30)]
    blinds, blinded = pool.blind(inputs)
    evaluated = bytearray(pool.blind_evaluate(sk, blinded))
    evaluated[32 * 17 : 32 * 18] = _le(1)
    with pytest.raises(InvalidElementError, match=r"^evaluated element 17: not a canonical"):
        pool.finalize(inputs, blinds, bytes(evaluated))


def test_pool_with_one_worker_runs_in_process() -> None:
    sk = oprf.random_scalar()
    inputs = [b"a", b"b", b"c"]
    with BatchPool(workers=1) as p:
        assert p._executor is None
        blinds, blinded = p.blind(inputs)
        evaluated = p.blind_evaluate(sk, blinded)
        assert p.finalize(inputs, blinds, evaluated) == p.evaluate(sk, inputs)
        assert p.evaluate(sk, inputs) == oprf.evaluate_batch(sk, inputs)


def test_pool_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="workers"):
        BatchPool(workers=0)
    with pytest.raises(ValueError, match="chunk_size"):
        BatchPool(workers=1, chunk_size=0)


def test_every_pool_shares_one_lifecycle() -> None:
    """The OPRF and aggregate pools validate, start, share and stop workers the same way."""
    for pool_class in (BatchPool, AggregatePool):
        with pytest.raises(ValueError, match="workers"):
            pool_class(workers=0)
        with pool_class(workers=1) as single:
            assert single.executor is None and single.warm() is single
        with pool_class(workers=2) as pool:
            assert pool.warm() is pool and pool.executor is not None
            assert pool.executor.submit(sum, [1, 2]).result() == 3
        assert pool.executor is None  # closed on exit
        pool.close()  # twice is fine


def test_pool_spans_cover_input_in_order() -> None:
    p = BatchPool(workers=1)
    p._executor = object()  # type: ignore[assignment]  # only _spans is exercised
    p.workers, p.chunk_size, p.min_parallel = 2, 8192, 512
    assert p._spans(100) is None  # below min_parallel: in-process
    spans = p._spans(10_000)
    assert spans == [(0, 5000), (5000, 10_000)]  # balanced across two workers
    spans = p._spans(100_000)
    assert spans is not None
    assert spans[0] == (0, 8192) and spans[-1][1] == 100_000
    assert all(a == b for (_, a), (b, _) in itertools.pairwise(spans))
    p._executor = None


# --- RFC 9497 Appendix A.1.2 / A.1.3: VOPRF (mode 1) and POPRF (mode 2) ------------------

VERIFIABLE_MODES = (oprf.MODE_VOPRF, oprf.MODE_POPRF)
VERIFIABLE_VECTORS = [
    pytest.param(mode, vector, id=f"mode{mode}-vector{i}-batch{vector['Batch']}")
    for mode in VERIFIABLE_MODES
    for i, vector in enumerate(rfc9497_suite(mode)["vectors"])
]


def _mode_key(mode: int) -> tuple[bytes, bytes]:
    suite = rfc9497_suite(mode)
    return oprf.derive_key_pair_mode(
        bytes.fromhex(suite["seed"]), bytes.fromhex(suite["keyInfo"]), mode)


def test_every_verifiable_vector_is_present_including_batches() -> None:
    for mode in VERIFIABLE_MODES:
        batches = [v["Batch"] for v in rfc9497_suite(mode)["vectors"]]
        assert len(batches) == 3 and max(batches) == 2, (mode, batches)


@pytest.mark.parametrize("mode", VERIFIABLE_MODES)
def test_context_string_per_mode_matches_vector_group_dst(mode: int) -> None:
    suite = rfc9497_suite(mode)
    assert bytes.fromhex(suite["groupDST"]) == b"HashToGroup-" + oprf.context_string(mode)
    assert oprf.context_string(oprf.MODE_OPRF) == oprf.CONTEXT_STRING
    with pytest.raises(ValueError, match="unknown RFC 9497 mode 3"):
        oprf.context_string(3)


@pytest.mark.parametrize("mode", VERIFIABLE_MODES)
def test_derive_key_pair_per_mode_vector(mode: int) -> None:
    suite = rfc9497_suite(mode)
    sk, pk = _mode_key(mode)
    assert (sk.hex(), pk.hex()) == (suite["skSm"], suite["pkSm"])
    # the same seed and info give a different key in every mode (the DST carries the mode)
    assert sk != _suite_key()
    assert sk != _mode_key(3 - mode)[0]


@pytest.mark.parametrize(("mode", "vector"), VERIFIABLE_VECTORS)
def test_verifiable_protocol_vector(mode: int, vector: dict[str, Any]) -> None:
    sk, pk = _mode_key(mode)
    inputs = _split(vector["Input"])
    blinds = _split(vector["Blind"])
    blinded = _split(vector["BlindedElement"])
    evaluated = _split(vector["EvaluationElement"])
    outputs = _split(vector["Output"])
    proof = bytes.fromhex(vector["Proof"]["proof"])
    nonce = bytes.fromhex(vector["Proof"]["r"])
    assert len(inputs) == vector["Batch"]
    if mode == oprf.MODE_VOPRF:
        assert [oprf.voprf_blind(x, r) for x, r in zip(inputs, blinds, strict=True)] == list(
            zip(blinds, blinded, strict=True))
        assert oprf.voprf_blind_evaluate(sk, pk, blinded, nonce) == (evaluated, proof)
        assert oprf.voprf_finalize(inputs, blinds, evaluated, blinded, pk, proof) == outputs
        assert [oprf.voprf_evaluate(sk, x) for x in inputs] == outputs
        assert oprf.verify_proof(_GENERATOR, pk, blinded, evaluated, proof, mode=mode)
    else:
        info = bytes.fromhex(vector["Info"])
        tweaked = oprf.poprf_tweaked_key(pk, info)
        for x, r, b in zip(inputs, blinds, blinded, strict=True):
            assert oprf.poprf_blind(x, info, pk, r) == (r, b, tweaked)
        assert oprf.poprf_blind_evaluate(sk, blinded, info, nonce) == (evaluated, proof)
        assert oprf.poprf_finalize(inputs, blinds, evaluated, blinded, proof, info,
                                   tweaked) == outputs
        assert [oprf.poprf_evaluate(sk, x, info) for x in inputs] == outputs
        # the compact-buffer forms the engine uses give the same bytes
        assert oprf.poprf_blind_batch(inputs, b"".join(blinds)) == (
            b"".join(blinds), b"".join(blinded))
        assert oprf.poprf_finalize_batch(inputs, b"".join(blinds), b"".join(evaluated),
                                         b"".join(blinded), proof, info, tweaked) == outputs
        assert oprf.poprf_evaluate_batch(sk, inputs, info) == outputs
        # the server-side tweak is the discrete log of the client-side tweaked key
        assert rbcl.crypto_scalarmult_ristretto255_base(oprf.poprf_tweak(sk, info)) == tweaked


_GENERATOR = rbcl.crypto_scalarmult_ristretto255_base((1).to_bytes(32, "little"))


@pytest.mark.parametrize(("mode", "vector"), VERIFIABLE_VECTORS)
def test_composites_fast_equals_composites(mode: int, vector: dict[str, Any]) -> None:
    sk, _ = _mode_key(mode)
    blinded = _split(vector["BlindedElement"])
    evaluated = _split(vector["EvaluationElement"])
    k = sk if mode == oprf.MODE_VOPRF else oprf.poprf_tweak(sk, bytes.fromhex(vector["Info"]))
    b = rbcl.crypto_scalarmult_ristretto255_base(k)
    c, d = (blinded, evaluated) if mode == oprf.MODE_VOPRF else (evaluated, blinded)
    assert oprf.compute_composites_fast(k, b, c, d, mode=mode) == oprf.compute_composites(
        b, c, d, mode=mode)


@pytest.mark.parametrize(("mode", "vector"), VERIFIABLE_VECTORS)
def test_tampered_proofs_and_elements_fail_verification(mode: int, vector: dict[str, Any]
                                                         ) -> None:
    _, pk = _mode_key(mode)
    inputs = _split(vector["Input"])
    blinds = _split(vector["Blind"])
    blinded = _split(vector["BlindedElement"])
    evaluated = _split(vector["EvaluationElement"])
    proof = bytes.fromhex(vector["Proof"]["proof"])
    info = bytes.fromhex(vector.get("Info", ""))
    other_sk, other_pk = oprf.derive_key_pair_mode(bytes(range(32)), b"another key", mode)

    def finalize(evaluated: list[bytes], proof: bytes, pk: bytes = pk,
                 info: bytes = info) -> list[bytes]:
        if mode == oprf.MODE_VOPRF:
            return oprf.voprf_finalize(inputs, blinds, evaluated, blinded, pk, proof)
        return oprf.poprf_finalize(inputs, blinds, evaluated, blinded, proof, info,
                                   oprf.poprf_tweaked_key(pk, info))

    flipped = bytearray(proof)
    flipped[5] ^= 1
    swapped = proof[32:] + proof[:32]
    non_canonical_s = proof[:32] + (int.from_bytes(proof[32:], "little") + L).to_bytes(
        32, "little")
    for bad in (bytes(flipped), swapped, proof[:63], proof + b"\0", bytes(64),
                non_canonical_s):
        with pytest.raises(oprf.VerifyError):
            finalize(evaluated, bad)
    # one element evaluated under another key: the batch proof no longer covers it
    key = other_sk if mode == oprf.MODE_VOPRF else oprf.poprf_evaluation_key(other_sk, info)
    mixed = [rbcl.crypto_scalarmult_ristretto255(key, blinded[0]), *evaluated[1:]]
    with pytest.raises(oprf.VerifyError):
        finalize(mixed, proof)
    # a wholly consistent evaluation under another key, proven under that key, still fails
    # against the published key
    if mode == oprf.MODE_VOPRF:
        other_eval, other_proof = oprf.voprf_blind_evaluate(other_sk, other_pk, blinded)
    else:
        other_eval, other_proof = oprf.poprf_blind_evaluate(other_sk, blinded, info)
    with pytest.raises(oprf.VerifyError):
        finalize(other_eval, other_proof)
    assert len(finalize(other_eval, other_proof, pk=other_pk)) == len(inputs)
    if mode == oprf.MODE_POPRF:
        # another info (another authorization) under the right key also fails
        with pytest.raises(oprf.VerifyError):
            finalize(evaluated, proof, info=info + b"x")


def test_poprf_inverse_error_and_identity_tweaked_key() -> None:
    info = b"chosen info"
    m = int.from_bytes(oprf.hash_to_scalar(
        b"Info" + len(info).to_bytes(2, "big") + info,
        b"HashToScalar-" + oprf.context_string(oprf.MODE_POPRF)), "little")
    sk = ((-m) % L).to_bytes(32, "little")  # skS = -m: t = skS + m = 0
    pk = rbcl.crypto_scalarmult_ristretto255_base(sk)
    with pytest.raises(oprf.InverseError):
        oprf.poprf_tweak(sk, info)
    with pytest.raises(oprf.InverseError):
        oprf.poprf_blind_evaluate(sk, [_element(1)], info)
    with pytest.raises(oprf.InverseError):
        oprf.poprf_evaluate(sk, b"x", info)
    with pytest.raises(oprf.InvalidInputError, match="identity"):
        oprf.poprf_tweaked_key(pk, info)
    with pytest.raises(oprf.InvalidInputError, match="identity"):
        oprf.poprf_blind(b"x", info, pk)


def test_proof_limits_and_bad_elements() -> None:
    sk, pk = _mode_key(oprf.MODE_VOPRF)
    with pytest.raises(ValueError, match="at least one"):
        oprf.voprf_blind_evaluate(sk, pk, [])
    with pytest.raises(InvalidElementError, match="identity"):
        oprf.voprf_blind_evaluate(sk, pk, [bytes(32)])
    with pytest.raises(InvalidElementError, match="evaluated element 1"):
        oprf.split_elements(_element(1) + bytes(32), "evaluated element")
    with pytest.raises(InvalidElementError, match="multiple of 32"):
        oprf.split_elements(b"\x01" * 33)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6), st.binary(max_size=20))
def test_poprf_round_trip_equals_direct_evaluation(inputs: list[bytes], info: bytes) -> None:
    sk, pk = oprf.derive_key_pair_mode(bytes(32), b"property", oprf.MODE_POPRF)
    blinds, blinded = oprf.poprf_blind_batch(inputs)
    blinded_list = oprf.split_elements(blinded)
    evaluated, proof = oprf.poprf_blind_evaluate(sk, blinded_list, info)
    outputs = oprf.poprf_finalize_batch(inputs, blinds, b"".join(evaluated), blinded, proof,
                                        info, oprf.poprf_tweaked_key(pk, info))
    assert outputs == oprf.poprf_evaluate_batch(sk, inputs, info)
    # a POPRF output is never the mode-0 output of the same key
    assert outputs[0] != oprf.evaluate(sk, inputs[0])


def test_verifiable_batches_spread_over_workers_equal_serial(pool: BatchPool) -> None:
    """Spans of 1024 on real worker processes: same blinds, proofs, outputs and verdicts."""
    n = 2 * 1024 + 300  # three spans
    sk, pk = oprf.derive_key_pair_mode(bytes(32), b"spread", oprf.MODE_POPRF)
    info = b"auth-spread"
    inputs = [b"input-%d" % i for i in range(n)]
    blinds, blinded = oprf.poprf_blind_batch(inputs)
    assert oprf.poprf_blind_batch(inputs, blinds, executor=pool.executor) == (blinds, blinded)
    elements = oprf.split_elements(blinded)
    evaluated = oprf.blind_evaluate_batch(oprf.poprf_evaluation_key(sk, info), blinded)
    evaluated_list = oprf.split_elements(evaluated)
    nonce = oprf.random_scalar()
    proof = oprf.poprf_prove(sk, info, elements, evaluated_list, nonce)
    assert oprf.poprf_prove(sk, info, elements, evaluated_list, nonce,
                            executor=pool.executor) == proof
    tweaked = oprf.poprf_tweaked_key(pk, info)
    serial = oprf.poprf_finalize_batch(inputs, blinds, evaluated, blinded, proof, info, tweaked)
    assert oprf.poprf_finalize_batch(inputs, blinds, evaluated, blinded, proof, info, tweaked,
                                     executor=pool.executor) == serial
    assert oprf.poprf_evaluate_batch(sk, inputs, info, executor=pool.executor) == serial
    bad = evaluated[:-32] + oprf.blind_evaluate(sk, blinded[-32:])
    with pytest.raises(oprf.VerifyError):
        oprf.poprf_finalize_batch(inputs, blinds, bad, blinded, proof, info, tweaked,
                                  executor=pool.executor)
