"""The KKRT16 OT-extension engine: an adapter over ``protocol.crypto.kkrt``.

The hazmat primitive (``KKRTRequester`` / ``KKRTCustodian``) does the cryptography; this
module fits it to the engine interface (docs/architecture.md, Engines): the session seed
context, the custodian's key digests cached per rule set, one budget unit per OPRF
instance (bin or stash slot), and disclosure proofs checked in one vectorized batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import numpy as np

from protocol.crypto import kkrt
from protocol.crypto.kkrt import (
    DIGEST_SIZE,
    PROOF_SIZE,
    KKRTBaseOTReply,
    KKRTCustodian,
    KKRTExtensionChunk,
    KKRTRequester,
    KKRTSetup,
    KKRTTagChunk,
    digest_bytes,
    parse_proof,
)
from protocol.crypto.kkrt_cuckoo import CUCKOO_HASHES
from protocol.domain.engine import BUILTIN_ENGINE_TRAITS, Engine, EngineTraits
from protocol.domain.messages import OpenResponse
from protocol.domain.recordstore import bulk_match_keys_digested
from protocol.engines.base import (
    BuildCache,
    CustodianData,
    Exchange,
    Flow,
    RequesterInputs,
    SessionGrant,
)
from protocol.errors import BudgetExhausted, ProtocolError

#: Base OTs (unary), the extension matrix (client stream), then the custodian's tags,
#: which exist only once the extension is complete.
EXCHANGES = (
    Exchange("evaluate", Flow.UNARY, sends=KKRTSetup, replies=KKRTBaseOTReply),
    Exchange("evaluate", Flow.CLIENT_STREAM, sends=KKRTExtensionChunk, replies=None),
    Exchange("tags", Flow.SERVER_STREAM, sends=None, replies=KKRTTagChunk, reply_stream="tags"),
)
#: The custodian sends one tag per (record entry, hash function).
TAGS_PER_ENTRY = CUCKOO_HASHES

#: (keys, record index, rule index, key digests) of the in-scope entries of a rule set.
#: The keys are a tuple, which the garbage collector untracks (docs/architecture.md,
#: Long-lived bulk data): the table lives as long as the service.
KeyTable = tuple[tuple[bytes, ...], np.ndarray, np.ndarray, np.ndarray]


def kkrt_context(authorization_id: str, session_id: str) -> bytes:
    """Seed context of the OT-extension engine: per authorization and per session."""
    return b"gated-psi/kkrt-session/v1" + hashlib.sha256(
        authorization_id.encode() + b"\0" + session_id.encode()).digest()


class KkrtRequesterEngine:
    """Cuckoo-hashes the requester's keys and drives the OT extension."""

    def __init__(self, inputs: RequesterInputs) -> None:
        # No worker pool for H: during the extension the requester and the custodian
        # already fill both cores, and shipping H jobs to workers measured slower.  The
        # cuckoo placement, though, goes to a worker: it then runs while the custodian
        # builds its key table for the open, not before the open is sent.
        self._kkrt = KKRTRequester(
            inputs.inputs, seed_context=kkrt_context(inputs.authorization_id, inputs.session_id),
            digests=None if inputs.digests is None else np.frombuffer(
                inputs.digests, dtype=np.uint8).reshape(-1, DIGEST_SIZE),
            place_on=getattr(inputs.ops, "executor", None))

    @property
    def units(self) -> int:
        return self._kkrt.units

    def on_open(self, opened: OpenResponse) -> None:
        if opened.tag_size != kkrt.TAG_SIZE:
            raise ProtocolError(f"unsupported tag size {opened.tag_size}")

    def requests(self, exchange: Exchange) -> Iterator[object]:
        if exchange.sends is KKRTSetup:
            yield self._kkrt.setup()
        elif exchange.sends is KKRTExtensionChunk:
            yield from self._kkrt.extension_chunks()
        else:
            raise ProtocolError(f"the kkrt engine sends no {exchange.sends!r}")

    def handle(self, message: object) -> None:
        self._kkrt.handle(message)

    def match(self) -> list[int]:
        return self._kkrt.matches()

    def proofs(self, elements: Sequence[int]) -> list[bytes]:
        """Bin index and output of each match (20 bytes): what the custodian re-evaluates."""
        return self._kkrt.proofs(elements)

    def custodian_entries(self, tag_count: int) -> int:
        return tag_count // TAGS_PER_ENTRY


class KkrtCustodianEngine:
    """The custodian's record keys and their digests, cached per rule set.

    The digests do not depend on any key, so one build serves every authorization;
    ``prepare`` runs it ahead of time (e.g. at service start).
    """

    def __init__(self, data: CustodianData) -> None:
        self.data = data
        self._cache: BuildCache[tuple[str, ...], KeyTable] = BuildCache(data.new_lock)

    def prepare(self, rules: Sequence[str]) -> None:
        self.keys(rules)

    def open(self, grant: SessionGrant) -> KkrtCustodianSession:
        return KkrtCustodianSession(self, grant)

    def keys(self, rules: Sequence[str]) -> KeyTable:
        """(keys, record index, rule index, key digests) of in-scope records for a rule set."""
        rules_t = tuple(sorted(rules))
        # one build per rule set; concurrent sessions wait for it
        return self._cache.get(rules_t, lambda: self._build(rules_t))

    def _build(self, rules_t: tuple[str, ...]) -> KeyTable:
        # One pass on the worker pool: the workers digest the keys they derive.
        data = self.data
        columns, digests = bulk_match_keys_digested(
            data.records, rules_t, digest_bytes, positions=cast(Sequence[int], data.in_scope),
            executor=data.ops.executor, today=data.today())
        keys: list[bytes] = []
        rec: list[np.ndarray] = []
        rule_idx: list[np.ndarray] = []
        for r_i, rule_id in enumerate(rules_t):
            column = columns.pop(rule_id)
            known = cast(list[bytes], column)  # None only where positions skip
            if None not in column:  # every record has a key (the usual case): no gather
                keys.extend(known)
                rec.append(np.asarray(data.in_scope))
            else:
                positions = [p for p, k in enumerate(column) if k is not None]
                keys.extend(known[p] for p in positions)
                rec.append(data.in_scope[positions])
            rule_idx.append(np.full(rec[-1].size, r_i, dtype=np.int8))
        return (tuple(keys), np.concatenate(rec) if rec else np.zeros(0, np.int64),
                np.concatenate(rule_idx) if rule_idx else np.zeros(0, np.int8),
                np.frombuffer(b"".join(digests[r] for r in rules_t),
                              dtype=np.uint8).reshape(-1, DIGEST_SIZE))


class KkrtCustodianSession:
    """One OT-extension run: base OTs, the extension (one unit per bin), tags, proofs."""

    def __init__(self, owner: KkrtCustodianEngine, grant: SessionGrant) -> None:
        keys, self._rec_idx, self._rule_idx, digests = owner.keys(grant.rules)
        self._rules = tuple(sorted(grant.rules))
        self._max_units = grant.max_units
        self._kkrt = KKRTCustodian(
            keys, grant.key, seed_context=kkrt_context(grant.authorization_id, grant.session_id),
            digests=digests, max_units=grant.max_units,
            # H over every record entry is the custodian's bulk of the extension; its
            # workers take it while this thread keeps up with the requester's stream
            executor=owner.data.ops.executor)

    @property
    def tag_count(self) -> int:
        return TAGS_PER_ENTRY * len(self._rec_idx)

    @property
    def tag_size(self) -> int:
        return kkrt.TAG_SIZE

    @property
    def proof_size(self) -> int:
        return PROOF_SIZE

    def cost(self, message: object) -> int:
        if isinstance(message, KKRTSetup):
            if message.units > self._max_units:
                raise BudgetExhausted(f"KKRT setup asks for {message.units} units; "
                                      f"{self._max_units} were reserved")
            return 0  # the units are spent bin by bin, as the extension arrives
        if isinstance(message, KKRTExtensionChunk):
            return message.bins  # one bin = one unit
        raise ProtocolError(f"the kkrt engine cannot accept {type(message).__name__}")

    def evaluate(self, message: object) -> KKRTBaseOTReply | None:
        replies = self._kkrt.handle(message)
        if isinstance(message, KKRTSetup):
            (reply,) = replies
            assert isinstance(reply, KKRTBaseOTReply)
            return reply
        return None

    def tag_chunks(self, chunk_tags: int) -> Iterator[KKRTTagChunk]:
        """The sorted tag sets, once the extension is complete."""
        return self._kkrt.tag_chunks(chunk_tags)

    def verify(self, items: Sequence[tuple[int, str, bytes]]) -> dict[int, tuple[int, ...]]:
        """One vectorized lookup, bin check and re-evaluation for the whole batch; every
        record holding the key (docs/architecture.md, Shared keys)."""
        found = self._kkrt.find_many([parse_proof(proof) for _, _, proof in items])
        out: dict[int, tuple[int, ...]] = {}
        for (i, rule_id, _), hits in zip(items, found, strict=True):
            rows = {int(self._rec_idx[k]) for k in hits
                    if self._rules[int(self._rule_idx[k])] == rule_id}
            if rows:
                out[i] = tuple(sorted(rows))
        return out


class KkrtEngine:
    """The KKRT engine as the registry holds it."""

    name: str = Engine.KKRT
    traits: EngineTraits = BUILTIN_ENGINE_TRAITS[Engine.KKRT]
    exchanges: tuple[Exchange, ...] = EXCHANGES

    @property
    def key_digest(self) -> Callable[[Sequence[bytes]], bytes]:
        return digest_bytes

    def requester(self, inputs: RequesterInputs) -> KkrtRequesterEngine:
        return KkrtRequesterEngine(inputs)

    def custodian(self, data: CustodianData) -> KkrtCustodianEngine:
        return KkrtCustodianEngine(data)
