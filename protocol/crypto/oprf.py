"""RFC 9497 OPRF(ristretto255, SHA-512), modes 0 (OPRF), 1 (VOPRF), 2 (POPRF): hazmat layer.

Names mirror the RFC in snake_case so the code can be read line by line beside it:
RFC 9497 §3 (protocol), §4.1 (the ristretto255-SHA512 suite) and RFC 9380 §5.3
(expand_message_xmd); modes 1 and 2 add §2.2 (DLEQ proofs), §3.3.2 and §3.3.3. The
unprefixed names are mode 0 (the engines' bulk path); ``voprf_*``/``poprf_*`` are the
verifiable modes. All group and scalar arithmetic is done by libsodium through
``rbcl``; Python integers are used only for arithmetic modulo the group order where
they are faster (inversion).

Encodings are those of the RFC: elements are 32-byte canonical ristretto255
encodings, scalars are 32-byte little-endian integers below ``GROUP_ORDER``.

The ``*_batch`` functions take and return *compact buffers* (``n * 32``
concatenated encodings in one ``bytes``) because that is what goes on the wire and
to worker processes; their ``offset`` lets a worker that holds one chunk of a larger batch
name a bad element by its index in the whole batch. The process pool that spreads chunks
over all cores is an adapter (``protocol.adapters.pools.BatchPool``); sessions see it, or
an in-process stand-in, through the :class:`GroupOps` protocol.

Nothing here is safe to use without the session layer: it does not decide who may
evaluate what. It only guarantees that every element taken from outside passes
``deserialize_element`` before it touches a secret scalar.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Protocol

import rbcl

from protocol.crypto.executor import Executor
from protocol.errors import InvalidElementError, PSIError

__all__ = [
    "CONTEXT_STRING",
    "ELEMENT_SIZE",
    "GROUP_ORDER",
    "MAX_PROOF_ELEMENTS",
    "MODE_OPRF",
    # modes 1 and 2
    "MODE_POPRF",
    "MODE_VOPRF",
    "OUTPUT_SIZE",
    "PROOF_SIZE",
    "SCALAR_SIZE",
    "DeriveKeyPairError",
    "GroupOps",
    "InvalidInputError",
    "InverseError",
    "VerifyError",
    "blind",
    "blind_batch",
    "blind_evaluate",
    "blind_evaluate_batch",
    "compute_composites",
    "compute_composites_fast",
    "context_string",
    "derive_key_pair",
    "derive_key_pair_mode",
    "deserialize_element",
    "deserialize_scalar",
    "evaluate",
    "evaluate_batch",
    "expand_message_xmd",
    "finalize",
    "finalize_batch",
    "generate_proof",
    "hash_to_group",
    "hash_to_scalar",
    "poprf_blind",
    "poprf_blind_batch",
    "poprf_blind_evaluate",
    "poprf_evaluate",
    "poprf_evaluate_batch",
    "poprf_evaluation_key",
    "poprf_finalize",
    "poprf_finalize_batch",
    "poprf_prove",
    "poprf_tweak",
    "poprf_tweaked_key",
    "poprf_verify",
    "random_scalar",
    "split_elements",
    "verify_proof",
    "voprf_blind",
    "voprf_blind_evaluate",
    "voprf_evaluate",
    "voprf_finalize",
]

# --- suite constants (RFC 9497 §3.1, §4.1) ------------------------------------------------

MODE_OPRF = 0
CONTEXT_STRING = b"OPRFV1-\x00-ristretto255-SHA512"
ELEMENT_SIZE = 32  # Noe
SCALAR_SIZE = 32  # Ns
OUTPUT_SIZE = 64  # Nh
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493  # L, prime

# Domain-separation tags: one per use of the hash, as the RFC assigns them.
_HASH_TO_GROUP_DST = b"HashToGroup-" + CONTEXT_STRING
_HASH_TO_SCALAR_DST = b"HashToScalar-" + CONTEXT_STRING
_DERIVE_KEY_PAIR_DST = b"DeriveKeyPair" + CONTEXT_STRING
_FINALIZE_LABEL = b"Finalize"
_OVERSIZE_DST_PREFIX = b"H2C-OVERSIZE-DST-"  # RFC 9380 §5.3.3

_B_IN_BYTES = 64  # SHA-512 digest size
_S_IN_BYTES = 128  # SHA-512 input block size
_Z_PAD = bytes(_S_IN_BYTES)
_MAX_INPUT_LEN = 0xFFFF  # inputs are length-prefixed with I2OSP(len, 2)
_IDENTITY = bytes(ELEMENT_SIZE)  # the unique canonical encoding of the identity
_ELEMENT_LEN_PREFIX = ELEMENT_SIZE.to_bytes(2, "big")

# libsodium entry points bound once; the batch loops bind them again to locals.
_sha512 = hashlib.sha512
# rbcl ships no type information; these are its libsodium signatures.
_from_hash: Callable[[bytes], bytes] = rbcl.crypto_core_ristretto255_from_hash
_scalarmult: Callable[[bytes, bytes], bytes] = rbcl.crypto_scalarmult_ristretto255
_scalarmult_base: Callable[[bytes], bytes] = rbcl.crypto_scalarmult_ristretto255_base
_is_valid_point: Callable[[bytes], bool] = rbcl.crypto_core_ristretto255_is_valid_point
_scalar_random: Callable[[], bytes] = rbcl.crypto_core_ristretto255_scalar_random
_scalar_reduce: Callable[[bytes], bytes] = rbcl.crypto_core_ristretto255_scalar_reduce


class InvalidInputError(PSIError):
    """RFC 9497 InvalidInputError: an input that cannot be evaluated.

    Raised when an input is longer than 65535 bytes or (with negligible
    probability) hashes to the identity element.
    """

    code = "invalid_input"


class DeriveKeyPairError(PSIError):
    """RFC 9497 DeriveKeyPairError: 256 candidate keys in a row were zero."""

    code = "derive_key_pair_error"


# --- RFC 9380 §5.3.1 expand_message_xmd with SHA-512 --------------------------------------


def expand_message_xmd(msg: bytes, dst: bytes, len_in_bytes: int) -> bytes:
    """Expand ``msg`` into ``len_in_bytes`` uniform bytes (RFC 9380 §5.3.1, H = SHA-512).

    A DST longer than 255 bytes is first replaced by
    ``SHA-512("H2C-OVERSIZE-DST-" || DST)`` (§5.3.3). An empty DST is refused
    because §3.1 requires a non-empty tag.
    """
    if not 1 <= len_in_bytes <= 65535:
        raise ValueError(f"len_in_bytes must be in 1..65535, got {len_in_bytes}")
    ell = -(-len_in_bytes // _B_IN_BYTES)
    if ell > 255:
        raise ValueError(f"len_in_bytes {len_in_bytes} needs ell = {ell} > 255 blocks")
    if not dst:
        raise ValueError("DST must not be empty")
    if len(dst) > 255:
        dst = _sha512(_OVERSIZE_DST_PREFIX + dst).digest()
    dst_prime = dst + len(dst).to_bytes(1, "big")
    msg_prime = _Z_PAD + msg + len_in_bytes.to_bytes(2, "big") + b"\x00" + dst_prime
    b_0 = _sha512(msg_prime).digest()
    b_i = _sha512(b_0 + b"\x01" + dst_prime).digest()
    uniform = [b_i]
    b_0_int = int.from_bytes(b_0, "big")
    for i in range(2, ell + 1):
        strxor = (b_0_int ^ int.from_bytes(b_i, "big")).to_bytes(_B_IN_BYTES, "big")
        b_i = _sha512(strxor + i.to_bytes(1, "big") + dst_prime).digest()
        uniform.append(b_i)
    return b"".join(uniform)[:len_in_bytes]


def _xmd64_suffixes(dst: bytes) -> tuple[bytes, bytes]:
    """Precompute the constant tails of expand_message_xmd(·, dst, 64).

    With SHA-512 and 64 output bytes, ell = 1, so the expansion is exactly
    ``b_1 = H(H(Z_pad || msg || tail_0) || tail_1)``. The fast paths below use this.
    """
    dst_prime = dst + len(dst).to_bytes(1, "big")
    return (64).to_bytes(2, "big") + b"\x00" + dst_prime, b"\x01" + dst_prime


_HTG_TAIL_0, _HTG_TAIL_1 = _xmd64_suffixes(_HASH_TO_GROUP_DST)


# --- group helpers (RFC 9497 §2.1, §4.1) --------------------------------------------------


def hash_to_group(msg: bytes, dst: bytes | None = None) -> bytes:
    """HashToGroup: ristretto255 one-way map of expand_message_xmd(msg, dst, 64).

    Returns the 32-byte element encoding. The default DST is
    ``"HashToGroup-" || contextString``.
    """
    if dst is None:
        dst = _HASH_TO_GROUP_DST
    return _from_hash(expand_message_xmd(msg, dst, 64))


def hash_to_scalar(msg: bytes, dst: bytes | None = None) -> bytes:
    """HashToScalar: expand_message_xmd(msg, dst, 64) read little-endian, reduced mod L.

    The default DST is ``"HashToScalar-" || contextString``.
    """
    if dst is None:
        dst = _HASH_TO_SCALAR_DST
    return _scalar_reduce(expand_message_xmd(msg, dst, 64))


def _hash_to_group_default(msg: bytes) -> bytes:
    """Fast path of ``hash_to_group(msg)`` with the suite DST (same bytes, fewer copies)."""
    return _from_hash(_sha512(_sha512(_Z_PAD + msg + _HTG_TAIL_0).digest() + _HTG_TAIL_1).digest())


def deserialize_element(data: bytes) -> bytes:
    """DeserializeElement: accept only a canonical, valid, non-identity encoding.

    Every element received from a peer must pass here before it meets a secret
    scalar: RFC 9497 §4.1 requires rejecting the identity, RFC 9496 §4.3.1 requires
    rejecting every encoding but the canonical one, and an off-group string must
    never be multiplied.
    """
    if len(data) != ELEMENT_SIZE:
        raise InvalidElementError(f"wrong length: got {len(data)} bytes")
    data = bytes(data)
    # The libsodium bundled with rbcl (1.0.18) ignores bit 255 when decoding, so it
    # accepts a second, non-canonical encoding of every element (including
    # 00..0080 for the identity). RFC 9496 §4.3.1 requires rejecting it.
    if data[31] & 0x80 or not _is_valid_point(data):
        raise InvalidElementError("not a canonical ristretto255 encoding")
    if data == _IDENTITY:
        raise InvalidElementError("identity element")
    return data


def deserialize_scalar(data: bytes) -> bytes:
    """DeserializeScalar: 32 bytes, little-endian, canonical (< L) and non-zero."""
    if len(data) != SCALAR_SIZE:
        raise InvalidElementError(f"wrong length: got {len(data)} bytes")
    value = int.from_bytes(data, "little")
    if value >= GROUP_ORDER:
        raise InvalidElementError("not a canonical scalar encoding")
    if value == 0:
        raise InvalidElementError("zero scalar")
    return bytes(data)


def random_scalar() -> bytes:
    """RandomScalar: uniform in [1, L) from libsodium's CSPRNG."""
    while True:
        scalar = _scalar_random()
        if any(scalar):
            return scalar


def _element_error(data: bytes, index: int, what: str) -> InvalidElementError:
    """Name the offending element of a batch, with deserialize_element's reason."""
    try:
        deserialize_element(data)
    except InvalidElementError as exc:
        return InvalidElementError(f"{what} {index}: {exc}")
    return InvalidElementError(f"{what} {index}: rejected")  # pragma: no cover


def _check_input(data: bytes, index: int | None = None) -> None:
    if len(data) > _MAX_INPUT_LEN:
        where = "input" if index is None else f"input {index}"
        raise InvalidInputError(f"{where}: longer than {_MAX_INPUT_LEN} bytes")


def _finalize_hash(data: bytes, element: bytes) -> bytes:
    """Hash(I2OSP(len(input), 2) || input || I2OSP(Noe, 2) || element || "Finalize")."""
    return _sha512(
        len(data).to_bytes(2, "big") + data + _ELEMENT_LEN_PREFIX + element + _FINALIZE_LABEL
    ).digest()


def finalize_element(input: bytes, element: bytes) -> bytes:
    """The RFC 9497 Finalize hash over an element that is already unblinded.

    Used where the custodian multiplies a certified element ``c·H(x)`` instead
    of hashing to the group (named-subject mode, protocol/engines/named.py); the output
    then has exactly the shape of an RFC 9497 OPRF output.
    """
    _check_input(input)
    return _finalize_hash(input, deserialize_element(element))


def _inverse(scalar: bytes) -> bytes:
    value = int.from_bytes(scalar, "little") % GROUP_ORDER
    if value == 0:
        raise InvalidElementError("blind is zero")
    return pow(value, -1, GROUP_ORDER).to_bytes(SCALAR_SIZE, "little")


# --- RFC 9497 §3.2.1 key generation -------------------------------------------------------


def derive_key_pair(seed: bytes, info: bytes) -> tuple[bytes, bytes]:
    """DeriveKeyPair(seed, info) -> (skS, pkS), deterministic (RFC 9497 §3.2.1).

    The custodian derives one key per authorization from its master seed, so the
    key can be recomputed rather than stored. ``seed`` is Ns = 32 bytes.
    """
    if len(seed) != SCALAR_SIZE:
        raise ValueError(f"seed must be {SCALAR_SIZE} bytes, got {len(seed)}")
    if len(info) > 0xFFFF:
        raise ValueError("info must be at most 65535 bytes")
    derive_input = seed + len(info).to_bytes(2, "big") + info
    for counter in range(256):
        sk = hash_to_scalar(derive_input + counter.to_bytes(1, "big"), _DERIVE_KEY_PAIR_DST)
        if any(sk):
            return sk, _scalarmult_base(sk)
    raise DeriveKeyPairError("DeriveKeyPair failed 256 times")


# --- RFC 9497 §3.3.1 OPRF protocol, one element -------------------------------------------


def blind(input: bytes, blind: bytes | None = None) -> tuple[bytes, bytes]:
    """Blind(input) -> (blind, blindedElement = blind * HashToGroup(input)).

    ``blind`` may be given only to reproduce test vectors; otherwise it is fresh.
    """
    _check_input(input)
    r = random_scalar() if blind is None else deserialize_scalar(blind)
    input_element = hash_to_group(input)
    if input_element == _IDENTITY:
        raise InvalidInputError("input hashes to the identity element")
    return r, _scalarmult(r, input_element)


def blind_evaluate(sk: bytes, blinded_element: bytes) -> bytes:
    """BlindEvaluate(skS, blindedElement) -> evaluatedElement = skS * blindedElement.

    The element comes from the requester, so it is validated first.
    """
    sk = deserialize_scalar(sk)
    return _scalarmult(sk, deserialize_element(blinded_element))


def finalize(input: bytes, blind: bytes, evaluated_element: bytes) -> bytes:
    """Finalize: unblind N = blind^-1 * evaluatedElement and hash it with the input."""
    _check_input(input)
    element = deserialize_element(evaluated_element)
    unblinded = _scalarmult(_inverse(blind), element)
    return _finalize_hash(input, unblinded)


def evaluate(sk: bytes, input: bytes) -> bytes:
    """Evaluate(skS, input): the server computes the output directly (no blinding).

    The custodian uses it to build its tag index over its own records.
    """
    sk = deserialize_scalar(sk)
    _check_input(input)
    input_element = hash_to_group(input)
    if input_element == _IDENTITY:
        raise InvalidInputError("input hashes to the identity element")
    return _finalize_hash(input, _scalarmult(sk, input_element))


# --- batch forms over compact buffers -----------------------------------------------------
#
# The ``_*_chunk`` functions are the loops; they take an ``offset`` so that a worker
# process can name the failing element by its index in the whole batch.


def _as_bytes(buffer: bytes | bytearray | memoryview) -> bytes:
    return buffer if type(buffer) is bytes else bytes(buffer)


def _count(buffer: bytes, size: int, what: str) -> int:
    if len(buffer) % size:
        raise InvalidElementError(
            f"wrong length: {what} of {len(buffer)} bytes is not a multiple of {size}"
        )
    return len(buffer) // size


def _blind_chunk(inputs: Sequence[bytes], blinds: bytes | None, offset: int) -> tuple[bytes, bytes]:
    n = len(inputs)
    if blinds is None:
        scalars = [random_scalar() for _ in range(n)]
    else:
        if len(blinds) != n * SCALAR_SIZE:
            raise ValueError(f"blinds buffer holds {len(blinds)} bytes, need {n * SCALAR_SIZE}")
        scalars = []
        for i in range(n):
            try:
                scalars.append(deserialize_scalar(blinds[i * SCALAR_SIZE : (i + 1) * SCALAR_SIZE]))
            except InvalidElementError as exc:
                raise InvalidElementError(f"blind {offset + i}: {exc}") from None
    sha512, from_hash, mult = _sha512, _from_hash, _scalarmult
    z_pad, tail_0, tail_1, identity = _Z_PAD, _HTG_TAIL_0, _HTG_TAIL_1, _IDENTITY
    blinded: list[bytes] = []
    append = blinded.append
    for i, (data, r) in enumerate(zip(inputs, scalars, strict=True)):
        if len(data) > _MAX_INPUT_LEN:
            _check_input(data, offset + i)
        element = from_hash(sha512(sha512(z_pad + data + tail_0).digest() + tail_1).digest())
        if element == identity:
            raise InvalidInputError(f"input {offset + i}: hashes to the identity element")
        append(mult(r, element))
    return b"".join(scalars), b"".join(blinded)


def _blind_evaluate_chunk(sk: bytes, blinded: bytes, offset: int) -> bytes:
    _count(blinded, ELEMENT_SIZE, "blinded buffer")
    is_valid, mult, identity = _is_valid_point, _scalarmult, _IDENTITY
    evaluated: list[bytes] = []
    append = evaluated.append
    for start in range(0, len(blinded), ELEMENT_SIZE):
        element = blinded[start : start + ELEMENT_SIZE]
        if element == identity or element[31] & 0x80 or not is_valid(element):
            raise _element_error(element, offset + start // ELEMENT_SIZE, "blinded element")
        append(mult(sk, element))
    return b"".join(evaluated)


def _batch_invert(values: list[int]) -> list[int]:
    """Montgomery's trick: n inverses mod L for one modular exponentiation and 3n products."""
    order = GROUP_ORDER
    prefix = []
    acc = 1
    for value in values:
        acc = acc * value % order
        prefix.append(acc)
    inv = pow(acc, -1, order)  # acc != 0 because L is prime and every value is non-zero
    inverses = [0] * len(values)
    for i in range(len(values) - 1, 0, -1):
        inverses[i] = inv * prefix[i - 1] % order
        inv = inv * values[i] % order
    if values:
        inverses[0] = inv
    return inverses


def _finalize_chunk(
    inputs: Sequence[bytes], blinds: bytes, evaluated: bytes, offset: int
) -> list[bytes]:
    n = len(inputs)
    if len(blinds) != n * SCALAR_SIZE:
        raise ValueError(f"blinds buffer holds {len(blinds)} bytes, need {n * SCALAR_SIZE}")
    if len(evaluated) != n * ELEMENT_SIZE:
        raise InvalidElementError(
            f"wrong length: evaluated buffer holds {len(evaluated)} bytes, "
            f"need {n * ELEMENT_SIZE} for {n} inputs"
        )
    order = GROUP_ORDER
    values = []
    for i in range(n):
        value = int.from_bytes(blinds[i * SCALAR_SIZE : (i + 1) * SCALAR_SIZE], "little") % order
        if value == 0:
            raise InvalidElementError(f"blind {offset + i}: zero scalar")
        values.append(value)
    inverses = _batch_invert(values)
    sha512, is_valid, mult, identity = _sha512, _is_valid_point, _scalarmult, _IDENTITY
    prefix, label = _ELEMENT_LEN_PREFIX, _FINALIZE_LABEL
    outputs: list[bytes] = []
    append = outputs.append
    for i, (data, inv) in enumerate(zip(inputs, inverses, strict=True)):
        element = evaluated[i * ELEMENT_SIZE : (i + 1) * ELEMENT_SIZE]
        if element == identity or element[31] & 0x80 or not is_valid(element):
            raise _element_error(element, offset + i, "evaluated element")
        if len(data) > _MAX_INPUT_LEN:
            _check_input(data, offset + i)
        unblinded = mult(inv.to_bytes(32, "little"), element)
        append(sha512(len(data).to_bytes(2, "big") + data + prefix + unblinded + label).digest())
    return outputs


def _evaluate_chunk(sk: bytes, inputs: Sequence[bytes], offset: int) -> list[bytes]:
    sha512, from_hash, mult = _sha512, _from_hash, _scalarmult
    z_pad, tail_0, tail_1, identity = _Z_PAD, _HTG_TAIL_0, _HTG_TAIL_1, _IDENTITY
    prefix, label = _ELEMENT_LEN_PREFIX, _FINALIZE_LABEL
    outputs: list[bytes] = []
    append = outputs.append
    for i, data in enumerate(inputs):
        if len(data) > _MAX_INPUT_LEN:
            _check_input(data, offset + i)
        element = from_hash(sha512(sha512(z_pad + data + tail_0).digest() + tail_1).digest())
        if element == identity:
            raise InvalidInputError(f"input {offset + i}: hashes to the identity element")
        issued = mult(sk, element)
        append(sha512(len(data).to_bytes(2, "big") + data + prefix + issued + label).digest())
    return outputs


def blind_batch(
    inputs: Sequence[bytes], blinds: bytes | None = None, offset: int = 0
) -> tuple[bytes, bytes]:
    """Blind many inputs: returns (blinds_buffer, blinded_buffer), both n * 32 bytes.

    ``blinds`` (a buffer of n scalars) may be given only to reproduce test vectors.
    ``offset``: index of ``inputs[0]`` in the whole batch, for error messages.
    """
    return _blind_chunk(inputs, None if blinds is None else _as_bytes(blinds), offset)


def blind_evaluate_batch(sk: bytes, blinded_buffer: bytes, offset: int = 0) -> bytes:
    """BlindEvaluate every element of a compact buffer; validates each one first.

    A bad element raises InvalidElementError naming its index in the batch (plus
    ``offset``), and nothing is returned for the batch.
    """
    return _blind_evaluate_chunk(deserialize_scalar(sk), _as_bytes(blinded_buffer), offset)


def finalize_batch(
    inputs: Sequence[bytes], blinds_buffer: bytes, evaluated_buffer: bytes, offset: int = 0
) -> list[bytes]:
    """Finalize a batch; the blinds are inverted together (Montgomery's trick)."""
    return _finalize_chunk(
        inputs, _as_bytes(blinds_buffer), _as_bytes(evaluated_buffer), offset
    )


def evaluate_batch(sk: bytes, inputs: Sequence[bytes], offset: int = 0) -> list[bytes]:
    """Evaluate many inputs with the server key (the custodian's index build)."""
    return _evaluate_chunk(deserialize_scalar(sk), inputs, offset)


# --- where the batch work runs ------------------------------------------------------------


class GroupOps(Protocol):
    """The batch functions as sessions call them: in-process, or on a worker pool.

    ``executor`` is the pool's worker processes (None when everything runs in the caller),
    shared with other bulk jobs such as match-key derivation.
    """

    @property
    def executor(self) -> Executor | None: ...

    def blind(self, inputs: Sequence[bytes]) -> tuple[bytes, bytes]: ...

    def blind_evaluate(self, sk: bytes, blinded_buffer: bytes) -> bytes: ...

    def finalize(self, inputs: Sequence[bytes], blinds: bytes, evaluated: bytes) -> list[bytes]:
        ...

    def evaluate(self, sk: bytes, inputs: Sequence[bytes]) -> list[bytes]: ...


# ==========================================================================================
# RFC 9497 modes 1 (VOPRF) and 2 (POPRF): verifiable evaluation
# ==========================================================================================
#
# Everything below is parameterised by the mode's context string (§3.1), which enters
# every hash: HashToGroup, HashToScalar, DeriveKeyPair, the composite seed. A mode-1 key,
# element or proof is therefore never confused with a mode-0 or mode-2 one.

MODE_VOPRF = 1
MODE_POPRF = 2
PROOF_SIZE = 2 * SCALAR_SIZE  # c || s
_SUITE_IDENTIFIER = b"ristretto255-SHA512"
_CHALLENGE_LABEL = b"Challenge"
_COMPOSITE_LABEL = b"Composite"
_INFO_LABEL = b"Info"
_GENERATOR = _scalarmult_base((1).to_bytes(SCALAR_SIZE, "little"))
_add: Callable[[bytes, bytes], bytes] = rbcl.crypto_core_ristretto255_add
_scalarmult_zero: Callable[[bytes, bytes], bytes] = (
    rbcl.crypto_scalarmult_ristretto255_allow_scalar_zero)
_scalarmult_base_zero: Callable[[bytes], bytes] = (
    rbcl.crypto_scalarmult_ristretto255_base_allow_scalar_zero)


class VerifyError(PSIError):
    """RFC 9497 VerifyError: the server's DLEQ proof does not verify.

    The client must not finalize any element of the batch the proof covers: the
    evaluations may come from a key other than the published one.
    """

    code = "verify_error"


class InverseError(PSIError):
    """RFC 9497 InverseError (POPRF): skS + HashToScalar(framedInfo) is zero.

    Happens only if someone chose ``info`` knowing skS; the evaluation is refused.
    """

    code = "inverse_error"


def context_string(mode: int) -> bytes:
    """contextString = "OPRFV1-" || I2OSP(mode, 1) || "-" || identifier (RFC 9497 §3.1)."""
    if mode not in (MODE_OPRF, MODE_VOPRF, MODE_POPRF):
        raise ValueError(f"unknown RFC 9497 mode {mode}")
    return b"OPRFV1-" + mode.to_bytes(1, "big") + b"-" + _SUITE_IDENTIFIER


def _dst(label: bytes, mode: int) -> bytes:
    return label + context_string(mode)


def _i2osp2(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _int(scalar: bytes) -> int:
    return int.from_bytes(scalar, "little")


def _scalar(value: int) -> bytes:
    return (value % GROUP_ORDER).to_bytes(SCALAR_SIZE, "little")


def derive_key_pair_mode(seed: bytes, info: bytes, mode: int) -> tuple[bytes, bytes]:
    """DeriveKeyPair(seed, info) in ``mode``: the DST carries the mode's context string.

    ``derive_key_pair`` is the mode-0 form and keeps its signature; a mode-1 or mode-2
    key must be derived here, because the vectors (and every peer) derive it this way.
    """
    if len(seed) != SCALAR_SIZE:
        raise ValueError(f"seed must be {SCALAR_SIZE} bytes, got {len(seed)}")
    if len(info) > 0xFFFF:
        raise ValueError("info must be at most 65535 bytes")
    dst = _dst(b"DeriveKeyPair", mode)
    derive_input = seed + _i2osp2(info)
    for counter in range(256):
        sk = hash_to_scalar(derive_input + counter.to_bytes(1, "big"), dst)
        if any(sk):
            return sk, _scalarmult_base(sk)
    raise DeriveKeyPairError("DeriveKeyPair failed 256 times")


def split_elements(buffer: bytes, what: str = "element") -> list[bytes]:
    """A compact buffer as a list of elements, each passed through deserialize_element."""
    buffer = _as_bytes(buffer)
    n = _count(buffer, ELEMENT_SIZE, f"{what} buffer")
    out = []
    for i in range(n):
        element = buffer[i * ELEMENT_SIZE:(i + 1) * ELEMENT_SIZE]
        if element == _IDENTITY or element[31] & 0x80 or not _is_valid_point(element):
            raise _element_error(element, i, what)
        out.append(element)
    return out


# --- RFC 9497 §2.2 discrete-log-equivalence proofs ----------------------------------------


def _composite_seed(b: bytes, mode: int) -> bytes:
    return _sha512(_i2osp2(b) + _i2osp2(_dst(b"Seed-", mode))).digest()


MAX_PROOF_ELEMENTS = 0xFFFF  # the composite index is I2OSP(i, 2)
#: Elements per worker job when a batch is spread: a 4096-element chunk (the default) is
#: four jobs, so its proof work fills every core.
_COMPOSITE_SPAN = 1024


def _check_batch(c: Sequence[bytes], d: Sequence[bytes]) -> None:
    if len(c) != len(d):
        raise ValueError(f"C has {len(c)} elements, D has {len(d)}")
    if not c:
        raise ValueError("a proof covers at least one element")
    if len(c) > MAX_PROOF_ELEMENTS:
        raise ValueError(f"a proof covers at most {MAX_PROOF_ELEMENTS} elements, got {len(c)}")


def _composite_part(seed: bytes, c: Sequence[bytes], d: Sequence[bytes], start: int,
                    mode: int, with_z: bool) -> tuple[bytes, bytes]:
    """Partial sums over C[start:], D[start:] of M = sum d_i·C[i] and (if asked) Z = sum d_i·D[i].

    d_i = HashToScalar(I2OSP(len(seed), 2) || seed || I2OSP(i, 2) || C[i] || D[i] ||
    "Composite") (RFC 9497 §2.2.1), each element length-prefixed. Sums are associative, so
    spans may be computed on different workers and added.
    """
    seed_prefix = _i2osp2(seed)
    dst = _dst(b"HashToScalar-", mode)
    mult, add, label = _scalarmult_zero, _add, _COMPOSITE_LABEL
    m = z = _IDENTITY
    for i, (ci, di) in enumerate(zip(c, d, strict=True), start):
        weight = hash_to_scalar(seed_prefix + i.to_bytes(2, "big") + _i2osp2(ci) + _i2osp2(di)
                                + label, dst)
        m = add(m, mult(weight, ci))
        if with_z:
            z = add(z, mult(weight, di))
    return m, z


def _composites(b: bytes, c: Sequence[bytes], d: Sequence[bytes], mode: int, with_z: bool,
                executor: Executor | None) -> tuple[bytes, bytes]:
    _check_batch(c, d)
    seed = _composite_seed(b, mode)
    n = len(c)
    if executor is None or n <= _COMPOSITE_SPAN:
        return _composite_part(seed, c, d, 0, mode, with_z)
    starts = list(range(0, n, _COMPOSITE_SPAN))
    parts = list(executor.map(
        _composite_part, [seed] * len(starts),
        [c[a:a + _COMPOSITE_SPAN] for a in starts], [d[a:a + _COMPOSITE_SPAN] for a in starts],
        starts, [mode] * len(starts), [with_z] * len(starts)))
    m = z = _IDENTITY
    for part_m, part_z in parts:
        m, z = _add(m, part_m), _add(z, part_z)
    return m, z


def compute_composites(b: bytes, c: Sequence[bytes], d: Sequence[bytes], *, mode: int,
                       executor: Executor | None = None) -> tuple[bytes, bytes]:
    """ComputeComposites(B, C, D) -> (M, Z): the verifier's form, without the key.

    ``executor`` spreads the 2n scalar multiplications over worker processes.
    """
    return _composites(b, c, d, mode, True, executor)


def compute_composites_fast(k: bytes, b: bytes, c: Sequence[bytes], d: Sequence[bytes], *,
                            mode: int, executor: Executor | None = None
                            ) -> tuple[bytes, bytes]:
    """ComputeCompositesFast(k, B, C, D) -> (M, Z = k·M): the prover knows k (n multiplications)."""
    m, _ = _composites(b, c, d, mode, False, executor)
    return m, _scalarmult_zero(k, m)


def _challenge(b: bytes, m: bytes, z: bytes, t2: bytes, t3: bytes, mode: int) -> bytes:
    transcript = (_i2osp2(b) + _i2osp2(m) + _i2osp2(z) + _i2osp2(t2) + _i2osp2(t3)
                  + _CHALLENGE_LABEL)
    return hash_to_scalar(transcript, _dst(b"HashToScalar-", mode))


def generate_proof(k: bytes, a: bytes, b: bytes, c: Sequence[bytes], d: Sequence[bytes],
                   r: bytes | None = None, *, mode: int, executor: Executor | None = None
                   ) -> bytes:
    """GenerateProof(k, A, B, C, D): one proof that B = k·A and D[i] = k·C[i] for all i.

    ``r`` (the proof nonce) may be given only to reproduce test vectors.
    """
    k = deserialize_scalar(k)
    m, z = compute_composites_fast(k, b, c, d, mode=mode, executor=executor)
    nonce = random_scalar() if r is None else deserialize_scalar(r)
    t2 = _scalarmult(nonce, a)
    t3 = _scalarmult_zero(nonce, m)
    challenge = _challenge(b, m, z, t2, t3, mode)
    s = _scalar(_int(nonce) - _int(challenge) * _int(k))
    return challenge + s


def verify_proof(a: bytes, b: bytes, c: Sequence[bytes], d: Sequence[bytes], proof: bytes,
                 *, mode: int, executor: Executor | None = None) -> bool:
    """VerifyProof(A, B, C, D, proof): True only if the proof is valid (constant-time compare).

    A malformed proof (wrong length, a non-canonical scalar) is simply not valid.
    """
    if len(proof) != PROOF_SIZE:
        return False
    challenge, s = bytes(proof[:SCALAR_SIZE]), bytes(proof[SCALAR_SIZE:])
    if _int(challenge) >= GROUP_ORDER or _int(s) >= GROUP_ORDER:
        return False
    m, z = compute_composites(b, c, d, mode=mode, executor=executor)
    t2 = _add(_scalarmult_zero(s, a), _scalarmult_zero(challenge, b))
    t3 = _add(_scalarmult_zero(s, m), _scalarmult_zero(challenge, z))
    expected = _challenge(b, m, z, t2, t3, mode)
    return hmac.compare_digest(expected, challenge)


# --- RFC 9497 §3.3.2 VOPRF (mode 1) -------------------------------------------------------


def _hash_input(input: bytes, mode: int, index: int | None = None) -> bytes:
    if len(input) > _MAX_INPUT_LEN:
        _check_input(input, index)
    element = _from_hash(expand_message_xmd(input, _dst(b"HashToGroup-", mode), 64))
    if element == _IDENTITY:
        where = "input" if index is None else f"input {index}"
        raise InvalidInputError(f"{where}: hashes to the identity element")
    return element


def _blind_mode(input: bytes, blind: bytes | None, mode: int) -> tuple[bytes, bytes]:
    r = random_scalar() if blind is None else deserialize_scalar(blind)
    return r, _scalarmult(r, _hash_input(input, mode))


def voprf_blind(input: bytes, blind: bytes | None = None) -> tuple[bytes, bytes]:
    """VOPRF Blind(input) -> (blind, blindedElement), mode-1 HashToGroup."""
    return _blind_mode(input, blind, MODE_VOPRF)


def voprf_blind_evaluate(sk: bytes, pk: bytes, blinded_elements: Sequence[bytes],
                         r: bytes | None = None) -> tuple[list[bytes], bytes]:
    """VOPRF BlindEvaluate, batched: every evaluation under skS and one proof for the batch."""
    sk = deserialize_scalar(sk)
    blinded = [deserialize_element(e) for e in blinded_elements]
    evaluated = [_scalarmult(sk, e) for e in blinded]
    proof = generate_proof(sk, _GENERATOR, pk, blinded, evaluated, r, mode=MODE_VOPRF)
    return evaluated, proof


def _unblind_hash(input: bytes, blind: bytes, evaluated: bytes, info: bytes | None) -> bytes:
    _check_input(input)
    unblinded = _scalarmult(_inverse(blind), evaluated)
    framed = b"" if info is None else _i2osp2(info)
    return _sha512(_i2osp2(input) + framed + _i2osp2(unblinded) + _FINALIZE_LABEL).digest()


def voprf_finalize(inputs: Sequence[bytes], blinds: Sequence[bytes],
                   evaluated_elements: Sequence[bytes], blinded_elements: Sequence[bytes],
                   pk: bytes, proof: bytes) -> list[bytes]:
    """VOPRF Finalize, batched: VerifyProof first; nothing is unblinded if it fails."""
    evaluated = [deserialize_element(e) for e in evaluated_elements]
    blinded = [deserialize_element(e) for e in blinded_elements]
    if not len(inputs) == len(blinds) == len(evaluated) == len(blinded):
        raise ValueError("inputs, blinds and elements must have one entry per element")
    if not verify_proof(_GENERATOR, deserialize_element(pk), blinded, evaluated, proof,
                        mode=MODE_VOPRF):
        raise VerifyError("the evaluation proof does not verify against the server key")
    return [_unblind_hash(x, r, e, None)
            for x, r, e in zip(inputs, blinds, evaluated, strict=True)]


def voprf_evaluate(sk: bytes, input: bytes) -> bytes:
    """VOPRF Evaluate(skS, input): the server's direct computation."""
    _check_input(input)
    issued = _scalarmult(deserialize_scalar(sk), _hash_input(input, MODE_VOPRF))
    return _sha512(_i2osp2(input) + _i2osp2(issued) + _FINALIZE_LABEL).digest()


# --- RFC 9497 §3.3.3 POPRF (mode 2) -------------------------------------------------------


def _info_scalar(info: bytes) -> int:
    """m = HashToScalar("Info" || I2OSP(len(info), 2) || info) in the mode-2 context."""
    if len(info) > 0xFFFF:
        raise ValueError("info must be at most 65535 bytes")
    return _int(hash_to_scalar(_INFO_LABEL + _i2osp2(info), _dst(b"HashToScalar-", MODE_POPRF)))


def poprf_tweaked_key(pk: bytes, info: bytes) -> bytes:
    """The client's tweakedKey = G·HashToScalar(framedInfo) + pkS for ``info``.

    Identity (only if ``info`` was chosen against pkS) is InvalidInputError, as in Blind.
    """
    pk = deserialize_element(pk)
    tweaked = _add(_scalarmult_base_zero(_scalar(_info_scalar(info))), pk)
    if tweaked == _IDENTITY:
        raise InvalidInputError("the tweaked key for this info is the identity")
    return tweaked


def poprf_tweak(sk: bytes, info: bytes) -> bytes:
    """The server's t = skS + HashToScalar(framedInfo); InverseError when it is zero."""
    t = (_int(deserialize_scalar(sk)) + _info_scalar(info)) % GROUP_ORDER
    if t == 0:
        raise InverseError("skS + HashToScalar(framedInfo) is zero for this info")
    return _scalar(t)


def poprf_evaluation_key(sk: bytes, info: bytes) -> bytes:
    """t^-1: the scalar that multiplies every blinded element (and input) under ``info``.

    Bulk callers hand it to ``blind_evaluate_batch`` or a worker pool, then prove the
    batch with ``poprf_prove``.
    """
    return _scalar(pow(_int(poprf_tweak(sk, info)), -1, GROUP_ORDER))


def poprf_blind(input: bytes, info: bytes, pk: bytes, blind: bytes | None = None
                ) -> tuple[bytes, bytes, bytes]:
    """POPRF Blind(input, info, pkS) -> (blind, blindedElement, tweakedKey)."""
    tweaked = poprf_tweaked_key(pk, info)
    r, blinded = _blind_mode(input, blind, MODE_POPRF)
    return r, blinded, tweaked


def poprf_prove(sk: bytes, info: bytes, blinded_elements: Sequence[bytes],
                evaluated_elements: Sequence[bytes], r: bytes | None = None, *,
                executor: Executor | None = None) -> bytes:
    """The POPRF batch proof: GenerateProof(t, G, tweakedKey, evaluated, blinded)."""
    t = poprf_tweak(sk, info)
    return generate_proof(t, _GENERATOR, _scalarmult_base(t), evaluated_elements,
                          blinded_elements, r, mode=MODE_POPRF, executor=executor)


def poprf_blind_evaluate(sk: bytes, blinded_elements: Sequence[bytes], info: bytes,
                         r: bytes | None = None) -> tuple[list[bytes], bytes]:
    """POPRF BlindEvaluate, batched: t^-1·blindedElement for each, one proof for the batch."""
    key = poprf_evaluation_key(sk, info)
    blinded = [deserialize_element(e) for e in blinded_elements]
    evaluated = [_scalarmult(key, e) for e in blinded]
    return evaluated, poprf_prove(sk, info, blinded, evaluated, r)


def poprf_verify(tweaked_key: bytes, blinded_elements: Sequence[bytes],
                 evaluated_elements: Sequence[bytes], proof: bytes, *,
                 executor: Executor | None = None) -> bool:
    """VerifyProof(G, tweakedKey, evaluated, blinded, proof) for one POPRF batch."""
    return verify_proof(_GENERATOR, tweaked_key, evaluated_elements, blinded_elements, proof,
                        mode=MODE_POPRF, executor=executor)


def poprf_finalize(inputs: Sequence[bytes], blinds: Sequence[bytes],
                   evaluated_elements: Sequence[bytes], blinded_elements: Sequence[bytes],
                   proof: bytes, info: bytes, tweaked_key: bytes) -> list[bytes]:
    """POPRF Finalize, batched: VerifyProof first; nothing is unblinded if it fails."""
    evaluated = [deserialize_element(e) for e in evaluated_elements]
    blinded = [deserialize_element(e) for e in blinded_elements]
    if not len(inputs) == len(blinds) == len(evaluated) == len(blinded):
        raise ValueError("inputs, blinds and elements must have one entry per element")
    if not poprf_verify(tweaked_key, blinded, evaluated, proof):
        raise VerifyError("the evaluation proof does not verify against the tweaked key")
    return [_unblind_hash(x, r, e, info)
            for x, r, e in zip(inputs, blinds, evaluated, strict=True)]


def poprf_evaluate(sk: bytes, input: bytes, info: bytes) -> bytes:
    """POPRF Evaluate(skS, input, info): the server's direct computation."""
    return poprf_evaluate_batch(sk, [input], info)[0]


# --- POPRF over compact buffers (the engine's bulk path) ----------------------------------
#
# ``executor`` (worker processes) spreads a batch in spans; each worker runs the same
# function on its span with no executor, and ``offset`` names bad inputs by batch index.


def _spans(n: int, executor: Executor | None) -> list[tuple[int, int]] | None:
    if executor is None or n <= _COMPOSITE_SPAN:
        return None
    return [(a, min(a + _COMPOSITE_SPAN, n)) for a in range(0, n, _COMPOSITE_SPAN)]


def poprf_blind_batch(inputs: Sequence[bytes], blinds: bytes | None = None, offset: int = 0,
                      *, executor: Executor | None = None) -> tuple[bytes, bytes]:
    """POPRF Blind over many inputs: (blinds_buffer, blinded_buffer), mode-2 HashToGroup."""
    n = len(inputs)
    if blinds is not None:
        blinds = _as_bytes(blinds)
        if len(blinds) != n * SCALAR_SIZE:
            raise ValueError(f"blinds buffer holds {len(blinds)} bytes, need {n * SCALAR_SIZE}")
    spans = _spans(n, executor)
    if spans is not None and executor is not None:
        parts = list(executor.map(
            poprf_blind_batch, [inputs[a:b] for a, b in spans],
            [None if blinds is None else blinds[a * SCALAR_SIZE:b * SCALAR_SIZE]
             for a, b in spans],
            [offset + a for a, _ in spans]))
        return b"".join(p[0] for p in parts), b"".join(p[1] for p in parts)
    if blinds is None:
        scalars = [random_scalar() for _ in range(n)]
    else:
        scalars = [deserialize_scalar(blinds[i * SCALAR_SIZE:(i + 1) * SCALAR_SIZE])
                   for i in range(n)]
    mult = _scalarmult
    blinded = [mult(r, _hash_input(x, MODE_POPRF, offset + i))
               for i, (x, r) in enumerate(zip(inputs, scalars, strict=True))]
    return b"".join(scalars), b"".join(blinded)


def _poprf_unblind_chunk(inputs: Sequence[bytes], blinds: bytes, evaluated: bytes,
                         info: bytes) -> list[bytes]:
    """Unblind and hash elements whose batch proof has already verified."""
    n = len(inputs)
    values = [_int(blinds[i * SCALAR_SIZE:(i + 1) * SCALAR_SIZE]) % GROUP_ORDER
              for i in range(n)]
    if not all(values):
        raise InvalidElementError("a blind is zero")
    framed, prefix, label = _i2osp2(info), _ELEMENT_LEN_PREFIX, _FINALIZE_LABEL
    sha512, mult = _sha512, _scalarmult
    outputs = []
    for i, (x, inv) in enumerate(zip(inputs, _batch_invert(values), strict=True)):
        _check_input(x)
        element = evaluated[i * ELEMENT_SIZE:(i + 1) * ELEMENT_SIZE]
        unblinded = mult(inv.to_bytes(SCALAR_SIZE, "little"), element)
        outputs.append(sha512(_i2osp2(x) + framed + prefix + unblinded + label).digest())
    return outputs


def poprf_finalize_batch(inputs: Sequence[bytes], blinds_buffer: bytes,
                         evaluated_buffer: bytes, blinded_buffer: bytes, proof: bytes,
                         info: bytes, tweaked_key: bytes, *,
                         executor: Executor | None = None) -> list[bytes]:
    """POPRF Finalize over compact buffers: the batch proof is verified before any unblinding.

    A proof that fails raises VerifyError and no output of the batch exists.
    """
    n = len(inputs)
    evaluated_buffer = _as_bytes(evaluated_buffer)
    blinds_buffer = _as_bytes(blinds_buffer)
    evaluated = split_elements(evaluated_buffer, "evaluated element")
    blinded = split_elements(blinded_buffer, "blinded element")
    if len(evaluated) != n or len(blinded) != n:
        raise InvalidElementError(
            f"wrong length: {len(evaluated)} evaluated and {len(blinded)} blinded elements "
            f"for {n} inputs")
    if len(blinds_buffer) != n * SCALAR_SIZE:
        raise ValueError(f"blinds buffer holds {len(blinds_buffer)} bytes, need {n * SCALAR_SIZE}")
    if not poprf_verify(tweaked_key, blinded, evaluated, proof, executor=executor):
        raise VerifyError("the evaluation proof does not verify against the tweaked key")
    spans = _spans(n, executor)
    if spans is None or executor is None:
        return _poprf_unblind_chunk(inputs, blinds_buffer, evaluated_buffer, info)
    parts = executor.map(
        _poprf_unblind_chunk, [inputs[a:b] for a, b in spans],
        [blinds_buffer[a * SCALAR_SIZE:b * SCALAR_SIZE] for a, b in spans],
        [evaluated_buffer[a * ELEMENT_SIZE:b * ELEMENT_SIZE] for a, b in spans],
        [info] * len(spans))
    return [output for part in parts for output in part]


def poprf_evaluate_batch(sk: bytes, inputs: Sequence[bytes], info: bytes, offset: int = 0,
                         *, executor: Executor | None = None) -> list[bytes]:
    """POPRF Evaluate over many inputs (the custodian's tag index under ``info``)."""
    key = poprf_evaluation_key(sk, info)
    spans = _spans(len(inputs), executor)
    if spans is not None and executor is not None:
        parts = executor.map(poprf_evaluate_batch, [sk] * len(spans),
                             [inputs[a:b] for a, b in spans], [info] * len(spans),
                             [offset + a for a, _ in spans])
        return [output for part in parts for output in part]
    framed, prefix, label = _i2osp2(info), _ELEMENT_LEN_PREFIX, _FINALIZE_LABEL
    sha512, mult = _sha512, _scalarmult
    return [
        sha512(_i2osp2(x) + framed + prefix + mult(key, _hash_input(x, MODE_POPRF, offset + i))
               + label).digest()
        for i, x in enumerate(inputs)
    ]
