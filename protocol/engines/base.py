"""The match-engine interface of the identity tier (docs/architecture.md, Engines).

An engine is everything between "the requester has match keys" and "the requester knows
which of them the custodian holds, with a proof per match": which messages each side
sends, what each costs in budget units, how the custodian builds its tags for a session,
how it evaluates, how the requester matches locally, and how disclosure proofs are made
and checked.  The identity-tier sessions (``protocol.sessions.identity``, on the session
core) own everything else (policy, budget, transcript, disclosure accounting, receipts)
and drive any engine through this interface alone; engines never see the ledger.

An engine declares its message flow as a sequence of :class:`Exchange` steps.  The
in-process driver and the gRPC client both walk that sequence generically: for every
step they move the engine's messages in the declared :class:`Flow` (the gRPC layer maps
each message type to its RPC), so a new engine needs no change in sessions or services
beyond a new RPC table row if it brings new message types.

Budget: for every message the requester sends, the custodian-side engine states its cost
(:meth:`CustodianEngineSession.cost`, which also validates the message's shape); the
session records that cost in the ledger *before* :meth:`CustodianEngineSession.evaluate`
runs, so an evaluation never exists without its accounting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar, cast

import numpy as np

from protocol.crypto import oprf
from protocol.domain.engine import EngineTraits
from protocol.domain.messages import OpenResponse
from protocol.domain.records import PersonRecord
from protocol.domain.recordstore import bulk_match_keys
from protocol.engines.named import Certification
from protocol.policy.decide import Mode

AUTH_KEY_INFO_PREFIX = b"gated-psi/authorization-key/v1:"
#: DeriveKeyPair info of the custodian's one long-term POPRF key (mode 2): its own label, so
#: it is never any authorization's mode-0 key.
EVALUATION_KEY_INFO = b"gated-psi/evaluation-key/v1"
#: Records per slice of the custodian's index builds (bounds their peak memory).
INDEX_SLICE = 65_536
#: Transcript stream of every message the requester sends during the exchanges.
REQUEST_STREAM = "evaluate"

#: The group-operation object engines compute with: ``adapters.pools.BatchPool`` (processes)
#: or an in-process stand-in with the same methods (blind / blind_evaluate / finalize /
#: evaluate, and ``executor``).  Engines never create pools; the caller injects one.
GroupOps = Any
K = TypeVar("K")
V = TypeVar("V")
#: Makes the locks that guard caches shared by concurrent sessions.  The core starts no
#: threads, so it imports no lock type: a service that drives sessions from several threads
#: injects ``threading.Lock``; the default (no locking) is for single-threaded use, where
#: at worst two sessions would build the same cache entry twice.
LockFactory = Callable[[], AbstractContextManager[Any]]


class BuildCache(Generic[K, V]):
    """Values that are expensive to build (indexes, key tables), built once per key.

    Concurrent callers of one key wait for the first build instead of repeating it (an
    index build costs minutes at national scale); callers of different keys do not wait for
    each other.  Locks come from the injected factory: the core starts no threads.
    """

    def __init__(self, new_lock: LockFactory) -> None:
        self._new_lock = new_lock
        self._lock = new_lock()
        self._values: dict[K, V] = {}
        self._building: dict[K, AbstractContextManager[Any]] = {}

    def get(self, key: K, build: Callable[[], V]) -> V:
        """The cached value of ``key``, built with ``build()`` by the first caller."""
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                return value
            build_lock = self._building.get(key)
            if build_lock is None:
                build_lock = self._building[key] = self._new_lock()
        with build_lock:
            with self._lock:
                value = self._values.get(key)
            if value is None:
                value = build()
                with self._lock:
                    self._values[key] = value
                    self._building.pop(key, None)
        return value


def utc_date(seconds: float) -> date:
    """The UTC calendar date of a clock reading: the ``today`` that match keys are checked at."""
    return datetime.fromtimestamp(seconds, UTC).date()


def authorization_key(master_secret: bytes, authorization_id: str) -> bytes:
    """The custodian's per-authorization secret: DeriveKeyPair(master, info = authorization id).

    An RFC 9497 scalar, so the OPRF engine uses it directly as its key; other engines
    derive their own secrets from it, and disclosure pseudonyms are keyed with it.
    """
    sk, _pk = oprf.derive_key_pair(
        master_secret, AUTH_KEY_INFO_PREFIX + authorization_id.encode("utf-8")
    )
    return sk


def evaluation_key_pair(master_secret: bytes) -> tuple[bytes, bytes]:
    """The custodian's POPRF key pair (skS, pkS): DeriveKeyPair in mode 2 from its master.

    pkS is what the authority pins in an authorization; one key serves every authorization
    (info = authorization id) and every key epoch (info = epoch id).
    """
    return oprf.derive_key_pair_mode(master_secret, EVALUATION_KEY_INFO, oprf.MODE_POPRF)


def evaluation_info(authorization_id: str) -> bytes:
    """The POPRF public input of an authorization's evaluations: its id, UTF-8."""
    return authorization_id.encode("utf-8")


class Flow(StrEnum):
    """How the messages of one exchange move (what the transport must provide)."""

    UNARY = "unary"  # one requester message, one custodian reply
    CLIENT_STREAM = "client_stream"  # requester messages, no replies
    SERVER_STREAM = "server_stream"  # custodian messages (its tags), no requests
    BIDI = "bidi"  # requester messages, one custodian reply each


@dataclass(frozen=True)
class Exchange:
    """One step of an engine's message flow, in the order the requester drives them.

    ``sends`` is the requester's message type (``None`` for a server stream), ``replies``
    the custodian's (``None`` for a client stream).  ``reply_stream`` names the transcript
    stream the replies are hashed into; requests always go to ``REQUEST_STREAM``.
    ``phase`` labels progress and wire statistics.  ``overlaps_next``: the transport may
    run this step concurrently with the following ones (the requester session accepts
    their messages in any interleaving).
    """

    phase: str
    flow: Flow
    sends: type | None
    replies: type | None
    reply_stream: str = "evaluated"
    overlaps_next: bool = False


def reply_streams(exchanges: Sequence[Exchange]) -> dict[type, str]:
    """Transcript stream of each custodian message type of an engine."""
    return {ex.replies: ex.reply_stream for ex in exchanges if ex.replies is not None}


def request_types(exchanges: Sequence[Exchange]) -> tuple[type, ...]:
    """Message types the requester sends during an engine's exchanges."""
    return tuple(ex.sends for ex in exchanges if ex.sends is not None)


# --------------------------------------------------------------------------- requester


class EpochTagSet(Protocol):
    """A key epoch's tag set as the requester matches against it (docs/architecture.md,
    National custodian): the custodian's epoch index, or the requester's cached copy of
    what ``FetchTagSet`` streamed.  Chunks are Golomb-coded fingerprints
    (``protocol.crypto.tagset``), decoded and merged as a stream."""

    @property
    def epoch_id(self) -> str: ...

    @property
    def bits(self) -> int:
        """Fingerprint length L in bits, fixed for the epoch at build time."""
        ...

    @property
    def rules(self) -> Sequence[str]: ...

    def tags(self, rule_id: str) -> int:
        """Number of tags (custodian records with a key) of ``rule_id``."""
        ...

    def tagset_chunks(self, rule_id: str) -> Iterator[bytes]:
        """The coded fingerprints of ``rule_id``, in order, chunk by chunk."""
        ...


class EvaluationStore(Protocol):
    """The custodian's durable record of the blinded elements a session had evaluated.

    An epoch-index engine binds each disclosure to one of these (docs/architecture.md,
    National custodian): the session stores each evaluated chunk before its reply leaves,
    bounded by the session's reservation, and reads it back at disclosure.  The session
    supplies it from its ledger; engines never see the ledger itself.
    """

    def store(self, seq: int, elements: bytes) -> None:
        """Keep chunk ``seq``'s blinded elements (32 bytes each); refuses past the budget."""
        ...

    def load(self, seq: int) -> bytes | None:
        """The stored elements of chunk ``seq`` of this session, or None."""
        ...


@dataclass(frozen=True)
class RequesterInputs:
    """What the requester session hands its engine: the elements, in session order.

    One element per (query, rule) with a usable match key; the engine's match results
    and proofs refer to positions in ``inputs``.  ``tokens`` (32 bytes per element) are
    set in named-subject mode, where only engines with group-element inputs run.
    ``digests`` are the engine's ``key_digest`` of every input, when it declares one.
    """

    authorization_id: str
    session_id: str
    inputs: Sequence[bytes]
    chunk_size: int
    ops: GroupOps
    digests: bytes | None = None  # key_digest(inputs), concatenated
    tokens: bytes | None = None
    #: The epoch's tag set, for an engine that matches against one (fetched once per epoch).
    tagset: EpochTagSet | None = None
    #: The custodian's POPRF public key pinned by the signed authorization: every evaluated
    #: chunk must carry a proof under it (docs/architecture.md, Verifiable evaluation).
    evaluation_key: bytes | None = None
    #: The rule id of every input (same order), for engines whose tags depend on the rule.
    element_rules: Sequence[str] = ()


class RequesterEngine(Protocol):
    """The requester's side of one engine run (one per session)."""

    @property
    def units(self) -> int:
        """Budget units the session asks for at open (``OpenRequest.element_count``)."""
        ...

    def on_open(self, opened: OpenResponse) -> None:
        """Check the engine-specific parts of the custodian's grant (tag size, tag count)."""
        ...

    def requests(self, exchange: Exchange) -> Iterator[object]:
        """The messages this side sends in ``exchange`` (lazily: may be called per item)."""
        ...

    def handle(self, message: object) -> None:
        """Apply one custodian message of this engine."""
        ...

    def match(self) -> list[int]:
        """Local match: ascending positions of the inputs whose tag the custodian holds."""
        ...

    def proofs(self, elements: Sequence[int]) -> list[bytes]:
        """Disclosure proofs of the matched ``elements`` (what the custodian verifies)."""
        ...

    def custodian_entries(self, tag_count: int) -> int:
        """Custodian (record, rule) entries behind ``tag_count`` tags of this engine."""
        ...


# --------------------------------------------------------------------------- custodian


class RowSource(Protocol):
    """Records kept out of core (e.g. ``adapters.shards.ShardedRecords``), read by row."""

    @property
    def count(self) -> int: ...

    def rows(self, global_rows: Sequence[int]) -> list[PersonRecord]: ...


class RecordsOutOfCore(Sequence[PersonRecord]):
    """The custodian's records on disk, as the sequence sessions index by row.

    Only random access by row (a disclosure reads the few records it releases); nothing
    iterates all of them in the custodian's process, so its memory does not grow with the
    file (docs/architecture.md, National custodian).  Slices are refused.
    """

    def __init__(self, source: RowSource) -> None:
        self.source = source
        #: The last batch read (bounded by one disclosure batch's candidates): the session
        #: reads the records it verified again right after, without going to disk.
        self._recent: dict[int, PersonRecord] = {}

    def __len__(self) -> int:
        return int(self.source.count)

    def __getitem__(self, row: Any) -> Any:
        if not isinstance(row, int | np.integer):
            raise TypeError("records out of core are read one row at a time")
        hit = self._recent.get(int(row))
        return hit if hit is not None else self.source.rows([int(row)])[0]

    def rows(self, global_rows: Sequence[int]) -> list[PersonRecord]:
        """Records by row in one read (the store groups them by row group)."""
        wanted = sorted(set(int(r) for r in global_rows))
        found = dict(zip(wanted, self.source.rows(wanted), strict=True)) if wanted else {}
        self._recent = found
        return [found[int(r)] for r in global_rows]


def records_at(records: Sequence[PersonRecord], rows: Sequence[int]) -> list[PersonRecord]:
    """``records[r]`` for each row: one batched read when the records are out of core."""
    if isinstance(records, RecordsOutOfCore):
        return records.rows(rows)
    return [records[int(r)] for r in rows]


@dataclass(frozen=True)
class CustodianData:
    """The custodian's records as its engines see them: only in-scope positions are used."""

    records: Sequence[PersonRecord]
    in_scope: np.ndarray  # int64 positions into records, policy exclusions removed
    ops: GroupOps
    tag_size: int
    clock: Callable[[], float]  # injected; match keys depend on the date (future birth dates)
    certifications: Mapping[str, Certification] = field(default_factory=dict)
    new_lock: LockFactory = nullcontext
    #: Epoch index mode (docs/architecture.md, National custodian): the custodian's
    #: key-epoch index (``adapters.epoch_index.EpochIndex``: ``epoch_id``, ``bits``,
    #: ``rows_for``, ``tagset_chunks``), the epoch's OPRF key, and the record classes its
    #: policy excludes (checked per disclosed record, since the index is built offline).
    epoch_index: Any = None
    epoch_key: bytes | None = None
    excluded_record_classes: frozenset[str] = frozenset()

    def today(self) -> date:
        return utc_date(self.clock())

    def match_keys(self, rule_id: str, start: int = 0, stop: int | None = None
                   ) -> list[bytes | None]:
        """Match keys of in-scope records ``in_scope[start:stop]`` under ``rule_id``.

        Computed in slices and not cached, so an index build never holds all records
        as objects at once (memory stays flat at 1.3M records).
        """
        positions = cast(Sequence[int], self.in_scope[start:stop])  # an int64 array
        return bulk_match_keys(self.records, [rule_id], positions=positions,
                               executor=self.ops.executor, today=self.today())[rule_id]


@dataclass(frozen=True)
class SessionGrant:
    """What the custodian session granted, for its engine: who, which rules, which key."""

    authorization_id: str
    session_id: str
    rules: tuple[str, ...]
    key: bytes  # authorization_key(master secret, authorization id)
    max_units: int  # budget units reserved for this session
    mode: Mode = Mode.BULK
    certification: Certification | None = None  # named-subject mode only
    #: The session's stored evaluated elements (epoch-index engines bind disclosures to them).
    evaluations: EvaluationStore | None = None
    #: The custodian's long-term POPRF secret when the authorization pins its public key
    #: (``evaluation_key_pair``): the OPRF engine then evaluates verifiably with info = the
    #: authorization id instead of using ``key`` (docs/architecture.md, Verifiable evaluation).
    evaluation_secret: bytes | None = None


class CustodianEngineSession(Protocol):
    """The custodian's side of one engine run (one per session)."""

    @property
    def tag_count(self) -> int:
        """Tags the requester will receive (``OpenResponse.tag_count``)."""
        ...

    @property
    def tag_size(self) -> int: ...

    @property
    def proof_size(self) -> int:
        """Bytes of one disclosure proof; other lengths are rejected unseen."""
        ...

    def cost(self, message: object) -> int:
        """Validate a requester message's shape; its budget units, counted before evaluate."""
        ...

    def evaluate(self, message: object) -> object | None:
        """Process one requester message (already accounted); the reply, if the flow has one."""
        ...

    def tag_chunks(self, chunk_tags: int) -> Iterator[object]:
        """The custodian's tags, in bounded chunks (its server-streamed exchange)."""
        ...

    def verify(self, items: Sequence[tuple[int, str, bytes]]) -> dict[int, tuple[int, ...]]:
        """``(position, rule, proof)`` -> {position: record indexes} for the proofs that hold.

        Each proof is compared in constant time with the value recomputed from the
        candidate record; a proof that holds for no in-scope record is left out.  A key
        held by several in-scope records gives all of them, in ascending order
        (docs/architecture.md, Shared keys).
        """
        ...


class CustodianEngine(Protocol):
    """Long-lived custodian side of an engine: its caches, shared by its sessions."""

    def prepare(self, rules: Sequence[str]) -> None:
        """Authorization-independent preparation for a rule set (e.g. at service start)."""
        ...

    def open(self, grant: SessionGrant) -> CustodianEngineSession:
        """Build (or fetch from cache) the session's index and start an engine run."""
        ...


# --------------------------------------------------------------------------- engine


class MatchEngine(Protocol):
    """An engine as the registry holds it: its declaration and both sides' factories."""

    @property
    def name(self) -> str: ...

    @property
    def traits(self) -> EngineTraits: ...

    @property
    def exchanges(self) -> tuple[Exchange, ...]:
        """The message flow, in the order the requester drives it."""
        ...

    @property
    def key_digest(self) -> Callable[[Sequence[bytes]], bytes] | None:
        """Digest the requester's workers compute beside each match key, if any."""
        ...

    def requester(self, inputs: RequesterInputs) -> RequesterEngine: ...

    def custodian(self, data: CustodianData) -> CustodianEngine: ...
