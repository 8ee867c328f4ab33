"""A deviating requester for the aggregate tier (issue 13): builds its own messages.

It does what the hostile-peer review did to the old Paillier design, translated to the
current one: a distinct scalar per uploaded element, dummy elements that are no real
identity, scalar multiples of one known member's element ("packing" several contributions
into positions that are not theirs), and whatever count or proof it likes.  To model the
strongest requester it is also given an *oracle* the real one never has: the positions of
its targets among the custodian's elements (computed by the test from the custodian's
secret).  The tests then show it still learns no individual's value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import rbcl

from protocol.crypto import oprf
from protocol.sessions import aggregate as A

ELEMENT = A.ELEMENT_SIZE


def split(buffer: bytes) -> list[bytes]:
    return [buffer[i:i + ELEMENT] for i in range(0, len(buffer), ELEMENT)]


def times(scalar: bytes, element: bytes) -> bytes:
    return rbcl.crypto_scalarmult_ristretto255(scalar, element)  # type: ignore[no-any-return]


def small_scalar(k: int) -> bytes:
    return k.to_bytes(32, "little")


def h(key: bytes) -> bytes:
    return oprf.hash_to_group(key, A.HASH_TO_GROUP_DST)


@dataclass
class Deviant:
    """One deviating session's state: what it uploaded and what it will send back."""

    session_id: str
    target_keys: list[bytes]
    dummies: int = 7
    scalars: list[bytes] = field(default_factory=list)  # one per target, all different
    packed: int = 7  # scalar multiples k*s_0*H(t_0), k = 2..packed+1

    def upload(self) -> list[bytes]:
        """Targets under distinct scalars, packed multiples of the first, then dummies."""
        self.scalars = [oprf.random_scalar() for _ in self.target_keys]
        out = [times(s, h(k)) for s, k in zip(self.scalars, self.target_keys, strict=True)]
        first = times(self.scalars[0], h(self.target_keys[0]))
        out += [times(small_scalar(k), first) for k in range(2, self.packed + 2)]
        out += [rbcl.crypto_core_ristretto255_random() for _ in range(self.dummies)]
        return out

    def reblind(self, custodian: Sequence[bytes], target_positions: Sequence[int],
                pack_positions: Sequence[int]) -> list[bytes]:
        """Each target's own scalar at its (oracle-given) position, the packed multiples of
        the first target at ``pack_positions``, random valid elements everywhere else."""
        out = [rbcl.crypto_core_ristretto255_random() for _ in custodian]
        for s, p in zip(self.scalars, target_positions, strict=True):
            out[p] = times(s, custodian[p])
        first = times(self.scalars[0], custodian[target_positions[0]])
        for k, q in enumerate(pack_positions, start=2):
            out[q] = times(small_scalar(k), first)
        return out

    def proof_attempts(self, matched: bytes, custodian: Sequence[bytes],
                       reblinded: Sequence[bytes], positions: Sequence[int]
                       ) -> dict[str, A.ConsistencyProof]:
        """Every proof this requester could make: under each of its scalars (an honest
        proof of a dishonest reblinding), an empty one, and a random one."""
        weights = A.consistency_weights(
            self.session_id, matched, hashlib.sha256(b"".join(custodian)).digest(),
            hashlib.sha256(b"".join(reblinded)).digest(), len(positions))
        at = [custodian[j] for j in positions]
        attempts = {f"scalar-{i}": A.prove_consistency(s, weights, at)
                    for i, s in enumerate(self.scalars)}
        attempts["empty"] = A.ConsistencyProof(b"", b"", b"")
        attempts["random"] = A.ConsistencyProof(
            rbcl.crypto_core_ristretto255_random(), oprf.random_scalar(), oprf.random_scalar())
        return attempts


def positions_of(custodian_scalar: bytes, custodian: Sequence[bytes],
                 keys: Sequence[bytes]) -> list[int]:
    """The oracle: where each key's ``b*H(k)`` sits among the custodian's elements."""
    where = {e: j for j, e in enumerate(custodian)}
    return [where[times(custodian_scalar, h(k))] for k in keys]
