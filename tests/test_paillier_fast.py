"""Fixed-base, short-exponent Paillier (crypto.paillier): correctness, validation, limits."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phe import paillier

from protocol.crypto import paillier as pf
from protocol.errors import InvalidElementError

# 1024-bit keys keep these tests fast; the production floor is tested separately.
PUB, PRIV = pf.generate_keypair(1024, min_key_bits=1024)
ENC = pf.FastEncryptor(PUB, window_bits=6)
BACKENDS = [True, False] if pf.HAVE_GMPY2 else [False]


def test_production_minimums() -> None:
    assert pf.DEFAULT_KEY_BITS >= pf.MIN_KEY_BITS >= 2048
    assert pf.DEFAULT_EXPONENT_BITS >= pf.MIN_EXPONENT_BITS >= 256
    with pytest.raises(ValueError, match="below the minimum"):
        pf.generate_keypair(1024)
    with pytest.raises(ValueError, match="below the minimum"):
        pf.FastEncryptor(PUB, exponent_bits=128)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=1, max_size=12))
def test_ciphertexts_decrypt_and_add_like_phe(values: list[int]) -> None:
    cts = ENC.encrypt_raw_many(values)
    assert [pf.decrypt_raw(PRIV, c) for c in cts] == [v % PUB.n for v in values]
    # phe's own types interoperate: EncryptedNumber addition and PaillierPrivateKey.decrypt.
    total = sum((paillier.EncryptedNumber(PUB, c) for c in cts[1:]),
                paillier.EncryptedNumber(PUB, cts[0]))
    assert PRIV.decrypt(total) == sum(values)
    assert pf.decrypt_raw(PRIV, pf.multiply_ciphertexts(PUB, cts)) == sum(values) % PUB.n


@pytest.mark.parametrize("use_gmpy2", BACKENDS)
def test_both_integer_backends_agree(use_gmpy2: bool) -> None:
    enc = pf.FastEncryptor(PUB, window_bits=5, base=ENC.base, use_gmpy2=use_gmpy2)
    # Same base, same table: h^x from the table equals pow(h, x, n^2) for the table's x.
    x = (1 << (enc.windows * enc.window_bits)) - 12345
    acc, mask = 1, (1 << enc.window_bits) - 1
    for i, row in enumerate(enc._rows):
        acc = acc * int(row[(x >> (i * enc.window_bits)) & mask]) % PUB.nsquare
    assert acc == pow(ENC.base, x, PUB.nsquare)
    assert [pf.decrypt_raw(PRIV, c) for c in enc.encrypt_raw_many([0, 7, -7])] == [
        0, 7, PUB.n - 7,
    ]


def test_randomizers_are_fresh_nth_residues() -> None:
    rs = [ENC.randomizer() for _ in range(64)]
    assert len(set(rs)) == len(rs)
    # An n-th residue is an encryption of 0 (and a unit): exactly what a randomizer must be.
    assert all(pf.decrypt_raw(PRIV, r) == 0 for r in rs[:8])
    assert all(math.gcd(r, PUB.n) == 1 for r in rs)
    # Two encryptions of the same value differ.
    a, b = ENC.encrypt_raw_many([42, 42])
    assert a != b


def test_encrypt_returns_phe_encrypted_number() -> None:
    number = ENC.encrypt(-1234)
    assert isinstance(number, paillier.EncryptedNumber)
    assert PRIV.decrypt(number + 1234) == 0
    with pytest.raises(TypeError):
        ENC.encrypt(1.5)  # type: ignore[arg-type]


def test_spec_round_trip_and_cache() -> None:
    spec = ENC.spec
    assert spec.fingerprint() == pf.EncryptorSpec(**spec.__dict__).fingerprint()
    other = pf.new_spec(PUB, exponent_bits=256, window_bits=6)
    assert other.fingerprint() != spec.fingerprint() and other.base != spec.base
    rebuilt = pf.FastEncryptor.from_spec(spec)
    assert rebuilt is pf.FastEncryptor.from_spec(spec)  # cached per process
    assert pf.decrypt_raw(PRIV, rebuilt.raw_encrypt(99)) == 99


def test_encode_decode_and_validation() -> None:
    c = ENC.raw_encrypt(5)
    raw = pf.encode_ciphertext(PUB, c)
    assert len(raw) == pf.ciphertext_size(PUB)
    assert pf.decode_ciphertext(PUB, raw) == c
    size = pf.ciphertext_size(PUB)
    bad = {
        "short": raw[1:],
        "zero": bytes(size),
        "n^2": PUB.nsquare.to_bytes(size, "big"),
        "too big": b"\xff" * size,
        "non-unit": (PRIV.p * 12345).to_bytes(size, "big"),
    }
    for name, data in bad.items():
        with pytest.raises(InvalidElementError):
            pf.decode_ciphertext(PUB, data)
            pytest.fail(f"{name} ciphertext was accepted")
    with pytest.raises(InvalidElementError):
        pf.decrypt_raw(PRIV, PRIV.q * 3)


def test_rerandomize_keeps_plaintext() -> None:
    c = ENC.raw_encrypt(77)
    d = pf.rerandomize(PUB, c)
    assert d != c and pf.decrypt_raw(PRIV, d) == 77
    assert pf.decrypt_raw(PRIV, c * pf.encrypt_plain(PUB, 23) % PUB.nsquare) == 100


def test_check_public_key_rejects_bad_moduli() -> None:
    pf.check_public_key(PUB, min_key_bits=1024)
    with pytest.raises(InvalidElementError, match="at least 2048"):
        pf.check_public_key(PUB, min_key_bits=2048)
    for n in (PUB.n * 2, PUB.n * 3 * 5, PRIV.p * PRIV.p):
        with pytest.raises(InvalidElementError):
            pf.check_public_key(paillier.PaillierPublicKey(n), min_key_bits=512)


def test_fast_encryption_beats_plain_phe_at_2048_bits() -> None:
    """Not a benchmark (see the report); a guard that the fast path stays fast."""
    pub, _ = pf.generate_keypair(2048)
    enc = pf.FastEncryptor(pub, window_bits=8)
    values = list(range(40))
    t0 = time.process_time()
    enc.encrypt_raw_many(values)
    fast = time.process_time() - t0
    t0 = time.process_time()
    for v in values[:10]:
        pub.encrypt(v)
    plain = (time.process_time() - t0) * 4
    assert plain > 10 * fast
