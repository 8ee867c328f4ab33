"""Named-subject authorization: a query counts only if the authority reviewed that subject.

Authorized PSI in the spirit of De Cristofaro-Tsudik (FC 2010), on the RFC 9497
group.  The bulk budget bounds *how many* people a requester may look up; this
mode bounds *which* ones, with the key rather than with trust.

Keys and values (all scalars mod L, all elements ristretto255):

* The authority holds a token key ``c`` beside its Ed25519 signing key.
* At certification the custodian picks a binding secret ``s`` and shares it with
  the authority.  For an authorization ``A`` both derive
  ``d_A = HashToScalar("gated-psi/named-binding/v1" || s || A.id)``.
* Review (authority): for each approved subject ``x`` and permitted rule, the
  token is ``T_x = (c · d_A) · H(x)`` where ``H`` is RFC 9497 HashToGroup of the
  match key.  Tokens are useless under any other authorization (``d`` differs,
  and the requester does not know ``s``), for any other rule (the rule id is
  inside the match key) and under any other authority (``c`` differs).
* Certification (once per key epoch): the custodian sends ``b · H(y)`` for all
  its records with one fresh random ``b``; the authority returns
  ``c · b · H(y)``; the custodian removes ``b`` and keeps ``C_y = c · H(y)``.
  The authority sees only pseudorandom elements, hence only how many there are.
* Session (custodian key ``k_A`` from its master secret): the requester blinds
  ``r · T_x``, the custodian returns ``k_A · r · T_x``, the requester unblinds to
  ``k_A · c · d_A · H(x)`` and finalizes exactly like RFC 9497
  (``Hash(len(x) || x || 32 || E || "Finalize")``).  The custodian's tag for
  record ``y`` uses ``(k_A · d_A) · C_y`` = ``k_A · d_A · c · H(y)``: equal iff
  ``x = y`` and the token was made by ``c`` for this authorization.
* A query without a token (a raw ``r · H(x)``, a token for another rule,
  authority or authorization) unblinds to something that is not
  ``k_A d_A c H(x)``; producing a valid token without ``c`` and ``s`` is a CDH
  problem.  Replayed tokens only spend budget: the budget is the approved count.

Who learns what: the authority sees the subjects it reviews and the size of the
custodian's file; the custodian learns nothing new (blinded elements are
uniformly random, as in the bulk mode); the requester learns matches among the
reviewed subjects only and cannot mint tokens.  Semi-honest model, as the rest of
the identity tier.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rbcl

from protocol.crypto import oprf
from protocol.crypto.encoding import decode, encode
from protocol.errors import InvalidElementError, ProtocolError

BINDING_DST = b"gated-psi/named-binding/v1"
#: File-format tags (v2: one ``protocol.crypto.encoding`` frame, the tag its first part).
CERT_FORMAT = "gated-psi/named-certification/v2"
CERT_REQUEST_FORMAT = CERT_FORMAT + "/request"
CERT_RESPONSE_FORMAT = CERT_FORMAT + "/response"
TOKENS_FORMAT = "gated-psi/named-tokens/v1"
L = oprf.GROUP_ORDER


def _scalar_bytes(value: int) -> bytes:
    return (value % L).to_bytes(32, "little")


def _scalar_int(data: bytes) -> int:
    return int.from_bytes(oprf.deserialize_scalar(data), "little")


def new_token_key() -> bytes:
    """The authority's token key ``c`` (a uniformly random non-zero scalar)."""
    return oprf.random_scalar()


def new_binding_secret() -> bytes:
    """The custodian's binding secret ``s``, shared with the authority at certification."""
    return os.urandom(32)


def binding_scalar(binding_secret: bytes, authorization_id: str) -> bytes:
    """``d_A``: binds tokens and the custodian's evaluation key to one authorization."""
    if len(binding_secret) != 32:
        raise ValueError("binding secret must be 32 bytes")
    return oprf.hash_to_scalar(
        binding_secret + authorization_id.encode("utf-8"), BINDING_DST
    )


def token_scalar(token_key: bytes, binding_secret: bytes, authorization_id: str) -> bytes:
    """``c · d_A``: the scalar the authority multiplies into each reviewed subject's element."""
    c = _scalar_int(token_key)
    d = int.from_bytes(binding_scalar(binding_secret, authorization_id), "little")
    return _scalar_bytes(c * d)


def custodian_session_key(authorization_key: bytes, binding_secret: bytes,
                          authorization_id: str) -> bytes:
    """``k_A · d_A``: the key the custodian applies to its certified elements ``c·H(y)``."""
    k = _scalar_int(authorization_key)
    d = int.from_bytes(binding_scalar(binding_secret, authorization_id), "little")
    return _scalar_bytes(k * d)


def issue_tokens(token_key: bytes, binding_secret: bytes, authorization_id: str,
                 match_keys: Sequence[bytes]) -> bytes:
    """Review step: ``T = (c · d_A) · H(key)`` for each approved match key (compact buffer)."""
    scalar = token_scalar(token_key, binding_secret, authorization_id)
    return oprf.blind_batch(list(match_keys), scalar * len(match_keys))[1] if match_keys else b""


def blind_tokens(tokens: bytes) -> tuple[bytes, bytes]:
    """Requester: ``r · T`` with a fresh blind per token (tokens are validated first)."""
    n = oprf_count(tokens)
    blinds = [oprf.random_scalar() for _ in range(n)]
    mult = rbcl.crypto_scalarmult_ristretto255
    out = []
    for i in range(n):
        element = tokens[i * 32:(i + 1) * 32]
        try:
            oprf.deserialize_element(element)
        except InvalidElementError as exc:
            raise InvalidElementError(f"token {i}: {exc}") from None
        out.append(mult(blinds[i], element))
    return b"".join(blinds), b"".join(out)


def oprf_count(buffer: bytes) -> int:
    if len(buffer) % oprf.ELEMENT_SIZE:
        raise InvalidElementError(f"buffer of {len(buffer)} bytes is not a multiple of 32")
    return len(buffer) // oprf.ELEMENT_SIZE


# ------------------------------------------------------------------ certification


@dataclass(frozen=True)
class CertificationRequest:
    """Custodian -> authority: blinded elements ``b · H(y)``; nothing else about the records."""

    custodian_id: str
    binding_secret: bytes
    elements: bytes

    def to_bytes(self) -> bytes:
        return _frame(CERT_REQUEST_FORMAT, {
            "custodian_id": self.custodian_id, "binding_secret": self.binding_secret.hex(),
            "count": len(self.elements) // 32,
        }, self.elements)

    @classmethod
    def from_bytes(cls, data: bytes) -> CertificationRequest:
        head, elements = _unframe(data, CERT_REQUEST_FORMAT)
        _check_count(elements, head.get("count"))
        return cls(custodian_id=str(head["custodian_id"]),
                   binding_secret=bytes.fromhex(str(head["binding_secret"])), elements=elements)


@dataclass(frozen=True)
class CertificationResponse:
    """Authority -> custodian: ``c · b · H(y)`` in the same order."""

    authority_key_id: str
    elements: bytes

    def to_bytes(self) -> bytes:
        return _frame(CERT_RESPONSE_FORMAT, {
            "authority_key_id": self.authority_key_id, "count": len(self.elements) // 32,
        }, self.elements)

    @classmethod
    def from_bytes(cls, data: bytes) -> CertificationResponse:
        head, elements = _unframe(data, CERT_RESPONSE_FORMAT)
        _check_count(elements, head.get("count"))
        return cls(authority_key_id=str(head["authority_key_id"]), elements=elements)


def _frame(fmt: str, head: Mapping[str, object], elements: bytes) -> bytes:
    """A certification file: ``encode(format tag, JSON head, elements)``."""
    return encode(fmt, json.dumps(head).encode(), elements)


def _unframe(data: bytes, fmt: str) -> tuple[dict[str, Any], bytes]:
    """The JSON head and the elements of a file :func:`_frame` wrote with tag ``fmt``."""
    try:
        tag, raw_head, elements = decode(data)
        head = json.loads(raw_head) if tag == fmt.encode() else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed certification file: {exc}") from None
    if not isinstance(head, dict):
        raise ProtocolError(f"not a {fmt} file")
    return head, elements


def _check_count(elements: bytes, count: object) -> None:
    if not isinstance(count, int) or len(elements) != count * 32:
        raise ProtocolError("certification file is truncated")


@dataclass
class PendingCertification:
    """The custodian's state between request and response (keeps ``b`` and the layout)."""

    blind: bytes
    binding_secret: bytes
    rules: tuple[str, ...]
    record_ids: list[str]
    rule_index: np.ndarray
    keys: list[bytes]


def start_certification(custodian_id: str, records_keys: Mapping[str, Sequence[bytes | None]],
                        record_ids: Sequence[str], ops: object | None = None,
                        ) -> tuple[CertificationRequest, PendingCertification]:
    """Custodian: blind every (record, rule) element with one fresh scalar ``b``."""
    b = oprf.random_scalar()
    rules = tuple(sorted(records_keys))
    ids: list[str] = []
    rule_idx: list[int] = []
    keys: list[bytes] = []
    for r_i, rule in enumerate(rules):
        for rid, key in zip(record_ids, records_keys[rule], strict=True):
            if key is not None:
                ids.append(rid)
                rule_idx.append(r_i)
                keys.append(key)
    blind = getattr(ops, "blind", None) or oprf.blind_batch
    _blinds, blinded = blind(keys, b * len(keys)) if keys else (b"", b"")
    secret = new_binding_secret()
    request = CertificationRequest(custodian_id=custodian_id, binding_secret=secret,
                                   elements=blinded)
    pending = PendingCertification(blind=b, binding_secret=secret, rules=rules, record_ids=ids,
                                   rule_index=np.asarray(rule_idx, dtype=np.int8), keys=keys)
    return request, pending


def certify(token_key: bytes, authority_key_id: str, request: CertificationRequest,
            ops: object | None = None) -> CertificationResponse:
    """Authority: multiply every (validated) element by ``c``; learns only the count."""
    evaluate = getattr(ops, "blind_evaluate", None) or oprf.blind_evaluate_batch
    return CertificationResponse(authority_key_id=authority_key_id,
                                 elements=evaluate(token_key, request.elements))


@dataclass
class Certification:
    """The custodian's certified elements ``C_y = c · H(y)`` for one authority key epoch."""

    authority_key_id: str
    binding_secret: bytes
    rules: tuple[str, ...]
    record_ids: list[str]
    rule_index: np.ndarray
    elements: bytes  # n x 32, aligned with record_ids / rule_index

    def __len__(self) -> int:
        return len(self.record_ids)

    def to_bytes(self) -> bytes:
        """The file format; it holds the binding secret, so store it owner-only
        (``protocol.adapters.files.write_certification``)."""
        return _frame(CERT_FORMAT, {
            "authority_key_id": self.authority_key_id, "binding_secret": self.binding_secret.hex(),
            "rules": list(self.rules), "record_ids": self.record_ids,
            "rule_index": self.rule_index.tolist(),
        }, self.elements)

    @classmethod
    def from_bytes(cls, data: bytes) -> Certification:
        doc, elements = _unframe(data, CERT_FORMAT)
        _check_count(elements, len(doc.get("record_ids", ())))
        return cls(authority_key_id=doc["authority_key_id"],
                   binding_secret=bytes.fromhex(doc["binding_secret"]),
                   rules=tuple(doc["rules"]), record_ids=list(doc["record_ids"]),
                   rule_index=np.asarray(doc["rule_index"], dtype=np.int8), elements=elements)

    def digest(self) -> str:
        return hashlib.sha256(self.elements).hexdigest()


def finish_certification(pending: PendingCertification, response: CertificationResponse,
                         ops: object | None = None) -> Certification:
    """Custodian: remove ``b`` (multiply by ``b^-1``), keeping ``c · H(y)``."""
    if len(response.elements) != len(pending.keys) * 32:
        raise ProtocolError("certification response has the wrong number of elements")
    b_inv = _scalar_bytes(pow(_scalar_int(pending.blind), -1, L))
    evaluate = getattr(ops, "blind_evaluate", None) or oprf.blind_evaluate_batch
    elements = evaluate(b_inv, response.elements) if pending.keys else b""
    return Certification(authority_key_id=response.authority_key_id,
                         binding_secret=pending.binding_secret, rules=pending.rules,
                         record_ids=pending.record_ids, rule_index=pending.rule_index,
                         elements=elements)


# ------------------------------------------------------------------ token files


@dataclass(frozen=True)
class TokenSet:
    """The tokens an authority issued with a named-subject authorization."""

    authorization_id: str
    entries: tuple[tuple[str, str, bytes], ...]  # (subject record id, rule id, token)

    def lookup(self) -> dict[tuple[str, str], bytes]:
        return {(rid, rule): tok for rid, rule, tok in self.entries}

    def to_bytes(self) -> bytes:
        return json.dumps({
            "format": TOKENS_FORMAT, "authorization_id": self.authorization_id,
            "tokens": [{"record_id": r, "rule_id": u, "token": t.hex()}
                       for r, u, t in self.entries],
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenSet:
        try:
            doc = json.loads(data)
            if doc.get("format") != TOKENS_FORMAT:
                raise ValueError("not a token file")
            entries = tuple((str(e["record_id"]), str(e["rule_id"]), bytes.fromhex(e["token"]))
                            for e in doc["tokens"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ProtocolError(f"malformed token file: {exc}") from None
        for _, _, tok in entries:
            oprf.deserialize_element(tok)
        return cls(authorization_id=str(doc["authorization_id"]), entries=entries)
