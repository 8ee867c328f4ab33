"""Fast Paillier encryption for the aggregate tier, on top of ``phe``'s key types.

See docs/architecture.md, Aggregate and cardinality tiers.

Why this module exists
----------------------
Textbook Paillier (and ``phe``'s ``PaillierPublicKey.encrypt``) draws a fresh ``r`` in
``Z*_n`` for every ciphertext and computes ``r^n mod n^2``: one exponentiation with a
2048-bit exponent modulo a 4096-bit number.  The custodian has to encrypt one value per
record, 1.3 million of them per session, which costs hours that way.  We keep ``phe``'s
``PaillierPublicKey`` / ``PaillierPrivateKey`` / ``EncryptedNumber`` (``g = n + 1``, so
``g^m = 1 + m*n mod n^2``) and replace only how the randomizer is drawn.

The scheme ("fixed base, short exponent")
-----------------------------------------
Per key pick ``h = r0^n mod n^2`` for a uniformly random ``r0`` in ``Z*_n`` (a uniformly
random n-th residue).  Encrypt ``m`` as::

    c = (1 + m*n) * h^x  mod n^2,     x uniform in [0, 2^l),  l >= 2*kappa

with ``kappa = 128`` and ``l = 256`` by default.  ``h`` is fixed, so ``h^x`` comes from a
precomputed table ``T[i][d] = h^(d * 2^(w*i))``: writing ``x`` in base ``2^w`` (``W =
ceil(l / w)`` digits ``d_i``), ``h^x = prod_i T[i][d_i]``, i.e. ``W - 1`` modular
multiplications and no squaring at all (21 at the defaults ``l = 256``, ``w = 12``, against
~2,300 for a full ``r^n``).  The randomizer ``h^x`` with a short ``x`` is the encryption of
Damgård-Jurik (PKC 2001) and Damgård-Jurik-Nielsen (IJIS 2010), there with ``|x| = |n|/2``
and ``h = (-y^2)^n``; ABY's DJN code and SecretFlow HEU implement it the same way.  The
table is the classic fixed-base windowing (Brickell-Gordon-McCurley-Wilson, Lim-Lee).

Security argument (IND-CPA against anyone without the factorization, even given ``h``)
-------------------------------------------------------------------------------------------
Assumptions:

* **DCR** (Paillier 1999): a uniformly random n-th residue mod ``n^2`` is computationally
  indistinguishable from a uniformly random element of ``Z*_{n^2}``.
* **SEI** (short-exponent indistinguishability in the n-th residues): for ``h`` a random
  n-th residue, ``{h^x : x <- [0, 2^l)}`` is computationally indistinguishable from
  ``{h^x : x <- [0, 2^L)}`` with ``L = 2|n| + kappa`` (i.e. from a full-length exponent).
  This is the composite-modulus analogue of the short-exponent assumptions of
  Koshiba-Kurosawa (PKC 2004).  The best known attacks are generic (Pollard lambda /
  van Oorschot-Wiener, ~``2^(l/2)`` group operations), so ``l = 2*kappa`` gives ``kappa``
  bits; the group order is also unknown to the attacker (it would factor ``n``).  Whoever
  wants a reduction to factoring rather than a short-exponent assumption can set
  ``exponent_bits = |n| / 2`` as DJ01 and ABY do (4x the cost); Håstad-Schrift-Shamir
  (JCSS 1993) is the classic result that exponents of half the modulus length are as good
  as full ones under factoring.

Hybrids, for any fixed ``m``:

1. ``c = g^m h^x`` with short ``x``  ~c  the same with full-length ``x``            (SEI)
2. replace ``h`` by a uniformly random ``h'`` in ``Z*_{n^2}``                         (DCR;
   the reduction samples ``x`` itself and never needs the factorization)
3. write ``h' = g^a s^n``; ``a`` is a unit mod ``n`` except with negligible probability and
   ``x mod n*lambda(n)`` is ``2^-kappa``-close to uniform, so ``g^(m + a*x) (s^n)^x`` is
   statistically independent of ``m`` (``gcd(n, lambda(n)) = 1``, CRT).

Hence ``c`` hides ``m`` under DCR + SEI.  What the argument does **not** cover, on purpose:
ciphertexts are malleable (additively homomorphic; that is the point), so integrity of the
sum comes from the protocol, not from here; and any ciphertext a party *sends on* after
homomorphic operations must be re-randomized with a full-strength ``r^n``
(:func:`rerandomize`), because the sender's randomness could otherwise be recognised.

``gmpy2``
---------
``phe`` uses ``gmpy2`` automatically when it is installed, and so does this module; it makes
each multiplication modulo ``n^2`` ~7x faster than Python integers.  Everything works
without it (Python ``int``), only slower.  Measured CPU per encryption, 2048-bit ``n``, on
the project's 2-core box (loaded): plain ``phe`` 10.6 ms with gmpy2 / 91 ms without; this
module (``l = 256``, ``w = 12``) 0.13 ms with gmpy2 / 0.92 ms without.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from phe import paillier
from phe.util import powmod

from protocol.crypto.encoding import encode
from protocol.errors import InvalidElementError

try:  # pragma: no cover - exercised by whichever backend the environment has
    import gmpy2

    HAVE_GMPY2 = True
except ImportError:  # pragma: no cover
    gmpy2 = None
    HAVE_GMPY2 = False

__all__ = [
    "DEFAULT_EXPONENT_BITS",
    "DEFAULT_KEY_BITS",
    "DEFAULT_WINDOW_BITS",
    "HAVE_GMPY2",
    "MIN_EXPONENT_BITS",
    "MIN_KEY_BITS",
    "EncryptorSpec",
    "FastEncryptor",
    "check_public_key",
    "ciphertext_size",
    "decode_ciphertext",
    "decrypt_raw",
    "encode_ciphertext",
    "encrypt_plain",
    "generate_keypair",
    "multiply_ciphertexts",
    "new_spec",
    "rerandomize",
    "to_modular",
]

#: Production minimum for the Paillier modulus (~112-bit security, NIST SP 800-57).
MIN_KEY_BITS = 2048
DEFAULT_KEY_BITS = 2048
#: l = 2 * kappa for kappa = 128 (see the module docstring).
DEFAULT_EXPONENT_BITS = 256
MIN_EXPONENT_BITS = 256
#: 12-bit windows: 21 multiplications mod n^2 per randomizer at l = 256; the table holds
#: 22 * 4096 entries of 4096 bits (~50 MB per process) and takes ~0.5 s to build.
DEFAULT_WINDOW_BITS = 12
MAX_WINDOW_BITS = 16

SPEC_FINGERPRINT_TAG = b"gated-psi/paillier-encryptor-spec/v2"

#: An integer for modular arithmetic: ``int`` or ``gmpy2.mpz``, which share no static type.
ModInt = Any

# Product of the odd primes below 2000: a modulus sharing one of them is not an RSA modulus.
_SMALL_PRIMES_PRODUCT = math.prod(
    p for p in range(3, 2000, 2) if all(p % d for d in range(3, math.isqrt(p) + 1, 2))
)


def _number(use_gmpy2: bool | None) -> type:
    """The integer type for modular arithmetic: gmpy2.mpz when available and wanted."""
    if use_gmpy2 is None:
        use_gmpy2 = HAVE_GMPY2
    if use_gmpy2 and not HAVE_GMPY2:
        raise ValueError("gmpy2 was requested but is not installed")
    return gmpy2.mpz if use_gmpy2 else int


# --------------------------------------------------------------------------- keys


def generate_keypair(
    key_bits: int = DEFAULT_KEY_BITS, *, min_key_bits: int = MIN_KEY_BITS
) -> tuple[paillier.PaillierPublicKey, paillier.PaillierPrivateKey]:
    """A fresh ``phe`` key pair; refuses moduli below ``min_key_bits``.

    Only tests lower ``min_key_bits`` (1024-bit keys make property tests fast); production
    code never passes it, so the 2048-bit floor holds wherever a key is made for real.
    """
    if key_bits < min_key_bits:
        raise ValueError(
            f"Paillier modulus of {key_bits} bits is below the minimum of {min_key_bits}"
        )
    if key_bits < 512 or key_bits % 2:
        raise ValueError(f"key_bits must be even and >= 512, got {key_bits}")
    public_key, private_key = paillier.generate_paillier_keypair(n_length=key_bits)
    return public_key, private_key


def check_public_key(public_key: paillier.PaillierPublicKey, *, min_key_bits: int) -> None:
    """Reject a peer's modulus that is too small or plainly not an RSA modulus.

    This cannot prove that ``n`` is a product of two large primes; it rules out the cheap
    mistakes (short, even, small factors, a perfect square).
    """
    n = public_key.n
    if not isinstance(n, int) or n <= 0:
        raise InvalidElementError("Paillier modulus must be a positive integer")
    if n.bit_length() < min_key_bits:
        raise InvalidElementError(
            f"Paillier modulus has {n.bit_length()} bits; at least {min_key_bits} are required"
        )
    if n % 2 == 0 or math.gcd(n, _SMALL_PRIMES_PRODUCT) != 1:
        raise InvalidElementError("Paillier modulus has a small factor")
    if math.isqrt(n) ** 2 == n:
        raise InvalidElementError("Paillier modulus is a perfect square")


def ciphertext_size(public_key: paillier.PaillierPublicKey) -> int:
    """Bytes of one encoded ciphertext: fixed, big-endian, the byte length of ``n^2``."""
    nsquare: int = public_key.nsquare
    return (nsquare.bit_length() + 7) // 8


def encode_ciphertext(public_key: paillier.PaillierPublicKey, ciphertext: int) -> bytes:
    return int(ciphertext).to_bytes(ciphertext_size(public_key), "big")


def decode_ciphertext(public_key: paillier.PaillierPublicKey, data: bytes) -> int:
    """Parse and validate one ciphertext from the network: exactly in ``Z*_{n^2}``.

    A non-unit would make the holder of the private key decrypt something that is not a
    Paillier ciphertext, which can leak a factor of ``n``; zero and out-of-range values are
    not ciphertexts at all.
    """
    if len(data) != ciphertext_size(public_key):
        raise InvalidElementError(
            f"ciphertext has {len(data)} bytes; expected {ciphertext_size(public_key)}"
        )
    value = int.from_bytes(data, "big")
    if not 0 < value < public_key.nsquare:
        raise InvalidElementError("ciphertext is not in the range 1 .. n^2 - 1")
    if math.gcd(value, public_key.n) != 1:
        raise InvalidElementError("ciphertext is not a unit modulo n^2")
    return value


def multiply_ciphertexts(
    public_key: paillier.PaillierPublicKey, ciphertexts: Iterable[int], start: int = 1
) -> int:
    """Homomorphic sum: the product of ciphertexts modulo ``n^2`` (not re-randomized)."""
    num = _number(None)
    mod = num(public_key.nsquare)
    acc = num(start)
    for c in ciphertexts:
        acc = acc * c % mod
    return int(acc)


def to_modular(value: int) -> ModInt:
    """``value`` in the fastest integer type for modular products (gmpy2.mpz if installed)."""
    return _number(None)(value)


def new_spec(
    public_key: paillier.PaillierPublicKey,
    *,
    exponent_bits: int = DEFAULT_EXPONENT_BITS,
    window_bits: int = DEFAULT_WINDOW_BITS,
) -> EncryptorSpec:
    """A fresh random base ``h = r0^n mod n^2`` for ``public_key``, as a spec (no tables)."""
    n, nsquare = public_key.n, public_key.nsquare
    base = int(powmod(_random_unit(n), n, nsquare))
    return EncryptorSpec(n=n, base=base, exponent_bits=exponent_bits, window_bits=window_bits)


def _random_unit(n: int) -> int:
    """Uniform in ``Z*_n`` minus {1} (CSPRNG)."""
    while True:
        r = secrets.randbelow(n)
        if r > 1 and math.gcd(r, n) == 1:
            return r


def rerandomize(public_key: paillier.PaillierPublicKey, ciphertext: int) -> int:
    """Multiply by a fresh, full-strength ``r^n`` (r uniform in ``Z*_n``).

    Used once per session on the ciphertext that leaves the requester, so the custodian
    cannot recognise products of its own ciphertexts (it knows their randomness).
    """
    n, nsquare = public_key.n, public_key.nsquare
    return int(int(ciphertext) * powmod(_random_unit(n), n, nsquare) % nsquare)


def encrypt_plain(public_key: paillier.PaillierPublicKey, value: int) -> int:
    """``(1 + m*n) mod n^2``: the deterministic part of an encryption (``m = value mod n``)."""
    n: int = public_key.n
    nsquare: int = public_key.nsquare
    return (1 + value % n * n) % nsquare


def decrypt_raw(private_key: paillier.PaillierPrivateKey, ciphertext: int) -> int:
    """Decrypt to the plaintext in ``[0, n)`` after validating the ciphertext."""
    pub = private_key.public_key
    if not 0 < ciphertext < pub.nsquare or math.gcd(ciphertext, pub.n) != 1:
        raise InvalidElementError("ciphertext is not a unit modulo n^2")
    return int(private_key.raw_decrypt(int(ciphertext)))


# --------------------------------------------------------------------------- encryptor


@dataclass(frozen=True)
class EncryptorSpec:
    """What a worker process needs to rebuild a :class:`FastEncryptor`.

    Small, picklable and public (no factorization), so the tables are built where they are
    used instead of being shipped between processes.
    """

    n: int
    base: int
    exponent_bits: int
    window_bits: int

    def fingerprint(self) -> bytes:
        """Stable id of the spec across processes (domain-separated hash), e.g. for logs."""
        n, base = (v.to_bytes((v.bit_length() + 7) // 8 or 1, "big") for v in (self.n, self.base))
        spec = encode(SPEC_FINGERPRINT_TAG, n, base, self.exponent_bits, self.window_bits)
        return hashlib.sha256(spec).digest()


def _window_rows(base: ModInt, mod: ModInt, windows: int, window_bits: int) -> list[list[ModInt]]:
    """Row ``i`` holds ``base^(d * 2^(w*i)) mod mod`` for ``d = 0 .. 2^w - 1``."""
    size = 1 << window_bits
    rows: list[list[ModInt]] = []
    step = base % mod  # base^(2^(w*i)) for the current row i
    for _ in range(windows):
        entry = type(mod)(1)
        row = [entry]
        for _ in range(size - 1):
            entry = entry * step % mod
            row.append(entry)
        rows.append(row)
        step = entry * step % mod  # base^((2^w - 1) * 2^(w*i)) * base^(2^(w*i))
    return rows


class FastEncryptor:
    """Paillier encryption with fixed-base, short-exponent randomizers for one public key.

    Ciphertexts are ordinary ``phe`` ciphertexts: the matching ``PaillierPrivateKey``
    decrypts them.  The encryptor needs only the public key (a CRT variant with the
    private key was measured and is no faster with gmpy2 at 2048 bits: two 2048-bit
    modular products cost about as much as one 4096-bit one).
    """

    def __init__(
        self,
        public_key: paillier.PaillierPublicKey,
        *,
        exponent_bits: int = DEFAULT_EXPONENT_BITS,
        window_bits: int = DEFAULT_WINDOW_BITS,
        base: int | None = None,
        min_exponent_bits: int = MIN_EXPONENT_BITS,
        use_gmpy2: bool | None = None,
    ) -> None:
        if exponent_bits < min_exponent_bits:
            raise ValueError(
                f"exponent_bits {exponent_bits} is below the minimum of {min_exponent_bits}"
            )
        if not 1 <= window_bits <= MAX_WINDOW_BITS:
            raise ValueError(f"window_bits must be in 1..{MAX_WINDOW_BITS}, got {window_bits}")
        self.public_key = public_key
        self.exponent_bits = exponent_bits
        self.window_bits = window_bits
        self.windows = -(-exponent_bits // window_bits)
        n, nsquare = public_key.n, public_key.nsquare
        if base is None:
            base = int(powmod(_random_unit(n), n, nsquare))  # a uniform n-th residue
        elif not 1 < base < nsquare or math.gcd(base, n) != 1:
            raise ValueError("base must be a unit modulo n^2 other than 1")
        self.base = int(base)
        num = _number(use_gmpy2)
        self._n = num(n)
        self._nsquare = num(nsquare)
        self._rows = _window_rows(num(self.base), self._nsquare, self.windows, window_bits)

    @property
    def spec(self) -> EncryptorSpec:
        return EncryptorSpec(
            n=int(self.public_key.n), base=self.base, exponent_bits=self.exponent_bits,
            window_bits=self.window_bits,
        )

    @classmethod
    def from_spec(cls, spec: EncryptorSpec) -> FastEncryptor:
        """Rebuild (or fetch from this process's small cache) the encryptor for ``spec``."""
        return _cached_encryptor(spec)

    # -- encryption ------------------------------------------------------------------------

    def _randomizers(self, count: int) -> list[ModInt]:
        """``count`` values ``h^x``, each ``x`` uniform and independent, ``windows * w`` bits."""
        w = self.window_bits
        nbytes = (self.windows * w + 7) // 8
        mask = (1 << w) - 1
        first, rest = self._rows[0], self._rows[1:]
        mod = self._nsquare
        pool = os.urandom(count * nbytes)  # bits above windows * w are never read
        out: list[ModInt] = []
        append = out.append
        for k in range(count):
            x = int.from_bytes(pool[k * nbytes:(k + 1) * nbytes], "little")
            r = first[x & mask]
            for row in rest:
                x >>= w
                r = r * row[x & mask] % mod
            append(r)
        return out

    def randomizer(self) -> int:
        """One ``h^x`` (an n-th residue); for tests and callers that combine their own."""
        return int(self._randomizers(1)[0])

    def encrypt_raw_many(self, values: Sequence[int]) -> list[int]:
        """Ciphertexts (ints) of ``values``; negative values are encoded modulo ``n``."""
        n, nsquare = self._n, self._nsquare
        out: list[int] = []
        append = out.append
        for value, r in zip(values, self._randomizers(len(values)), strict=True):
            m = int(value) % n
            # (1 + m*n) * r = r + n * (m*r mod n)   (mod n^2)
            c = r + n * (m * r % n)
            if c >= nsquare:
                c -= nsquare
            append(int(c))
        return out

    def encrypt_to_bytes(self, values: Sequence[int]) -> bytes:
        """Concatenated fixed-length encodings (:func:`ciphertext_size` bytes each)."""
        size = ciphertext_size(self.public_key)
        return b"".join([c.to_bytes(size, "big") for c in self.encrypt_raw_many(values)])

    def raw_encrypt(self, value: int) -> int:
        return self.encrypt_raw_many([value])[0]

    def encrypt(self, value: int) -> paillier.EncryptedNumber:
        """A ``phe`` ``EncryptedNumber`` of the integer ``value`` (exponent 0)."""
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError("FastEncryptor encrypts integers only")
        if abs(value) > self.public_key.max_int:
            raise ValueError("value is outside phe's safe integer range")
        return paillier.EncryptedNumber(self.public_key, self.raw_encrypt(value), 0)


#: Encryptors kept per process: the current session's and one more (tables are large).
_CACHE_SIZE = 2


@lru_cache(maxsize=_CACHE_SIZE)  # thread-safe, so the core needs no lock of its own
def _cached_encryptor(spec: EncryptorSpec) -> FastEncryptor:
    return FastEncryptor(
        paillier.PaillierPublicKey(spec.n), exponent_bits=spec.exponent_bits,
        window_bits=spec.window_bits, base=spec.base, min_exponent_bits=1,
    )
