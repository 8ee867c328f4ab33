"""Compact in-memory storage for the custodian's records.

A frozen ``PersonRecord`` with nine strings costs about 1 KB in CPython; at
1.3M records that alone would exceed the 1.5 GiB budget of a service.  Here
each record is one UTF-8 blob (fields joined by a separator that cannot occur
in CSV-decoded text we accept), about 150 bytes, and becomes a ``PersonRecord``
again only when it is needed (index build, disclosure).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date
from itertools import repeat
from typing import NamedTuple, TextIO, overload

from protocol.crypto.executor import Executor
from protocol.domain.records import (
    MATCH_RULES,
    PERSON_FIELDS,
    RECORD_CLASS_FIELD,
    PersonRecord,
    QueryRecord,
    ReasonCode,
    Refusal,
    field_columns,
    iter_person_csv,
    iter_query_csv,
    match_keys_bulk,
    match_keys_from_columns,
    validate_person,
    validate_query,
)

_SEP = "\x1f"  # ASCII unit separator
_FIELD_INDEX = {name: i for i, name in enumerate(PERSON_FIELDS)}
#: Raw columns each rule reads (an address needs city, state and ZIP too).
_RULE_COLUMNS = {
    rule_id: {c for f in rule.fields for c in (("address", "city", "state", "zip")
                                               if f == "address" else field_columns(f))}
    for rule_id, rule in MATCH_RULES.items()
}
#: Records per match-key job handed to a worker process: big enough that shipping the
#: blobs and keys costs little next to normalizing them, small enough to balance two cores.
KEY_JOB_RECORDS = 32_768

Keys = dict[str, list[bytes | None]]
#: Digests of a list of match keys, packed end to end (e.g. ``kkrt.digest_bytes``); a
#: module-level function, so it can travel to a worker process.
KeyDigest = Callable[[list[bytes]], bytes]


class KeyedRecords(NamedTuple):
    """What one pass over the records gives: their ids (when asked for), each rule's match
    keys in record order, and each rule's digest of its usable keys (when a digest is given)."""

    record_ids: list[str]
    keys: Keys
    digests: dict[str, bytes]


def _blob_columns(packed: bytes, count: int, names: Iterable[str]) -> dict[str, list[str]]:
    """Columns of ``count`` blobs packed end to end (``_pack_job``): one decode and one split.

    Every blob of one store has the same number of fields (``CompactRecords._pack`` refuses
    records with other extra columns or a separator inside a value), so field ``i`` of
    record ``j`` is item ``j * width + i`` of the split; no per-record list is built.
    """
    if not count:
        return {name: [] for name in names}
    flat = packed.decode("utf-8").split(_SEP)
    width, extra = divmod(len(flat), count)
    if extra:
        raise ValueError("packed records of different widths in one job")
    return {name: flat[_FIELD_INDEX[name]::width] for name in names}


def _pack_job(blobs: Sequence[bytes]) -> tuple[bytes, int]:
    """One worker job's blobs as a single buffer: it crosses to the worker as one copy
    instead of a pickled list of tens of thousands of small objects."""
    return _SEP.encode().join(blobs), len(blobs)


def _blob_match_keys(job: tuple[bytes, int], rule_ids: tuple[str, ...], today: date,
                     digest: KeyDigest | None = None, with_ids: bool = False
                     ) -> KeyedRecords:
    """Match keys straight from a packed job (no record is built), with the ids if asked.

    With ``digest``, also each rule's usable keys digested (in order) in the same job.
    """
    needed = {f for r in rule_ids for f in _RULE_COLUMNS[r]}
    columns = _blob_columns(*job, needed | {"record_id"} if with_ids else needed)
    keys = match_keys_from_columns(columns.__getitem__, rule_ids, today=today)
    return KeyedRecords(columns["record_id"] if with_ids else [], keys, _digests(keys, digest))


def _digests(keys: Keys, digest: KeyDigest | None) -> dict[str, bytes]:
    if digest is None:
        return {}
    return {r: digest([k for k in column if k is not None]) for r, column in keys.items()}


def persons_of(queries: Sequence[QueryRecord] | Sequence[PersonRecord]
               ) -> Sequence[PersonRecord]:
    """The people a query list is about (packed storage stays packed, not unpacked)."""
    if isinstance(queries, CompactRecords):
        return queries
    return [q.person if isinstance(q, QueryRecord) else q for q in queries]


def bulk_match_keys(
    records: Sequence[PersonRecord],
    rule_ids: Sequence[str],
    *,
    positions: Sequence[int] | None = None,
    executor: Executor | None = None,
    today: date,
) -> Keys:
    """Match keys of ``records`` (or of ``records[positions]``) under every rule.

    Packed storage skips building ``PersonRecord`` objects and, given an ``executor``
    (a process pool), spreads the normalization over its workers; results are in input
    order either way, so both parties' key order never depends on the pool.
    """
    return _key_jobs(records, rule_ids, positions, executor, today, None, False).keys


def bulk_match_keys_digested(
    records: Sequence[PersonRecord],
    rule_ids: Sequence[str],
    digest: KeyDigest,
    *,
    positions: Sequence[int] | None = None,
    executor: Executor | None = None,
    today: date,
) -> tuple[Keys, dict[str, bytes]]:
    """``bulk_match_keys`` plus, per rule, ``digest`` of its usable keys in order, computed
    by the same workers (the KKRT engine digests every key; shipping them back and forth
    again would cost more than the hashing)."""
    got = _key_jobs(records, rule_ids, positions, executor, today, digest, False)
    return got.keys, got.digests


def bulk_keyed_records(
    records: Sequence[PersonRecord],
    rule_ids: Sequence[str],
    digest: KeyDigest | None = None,
    *,
    executor: Executor | None = None,
    today: date,
) -> KeyedRecords:
    """Every record's id with ``bulk_match_keys_digested``'s keys and digests, in one pass.

    A requester needs all three for its queries; cutting the ids out of the blobs in the
    same worker jobs spares its main process a serial pass over every packed query.
    """
    return _key_jobs(records, rule_ids, None, executor, today, digest, True)


def _key_jobs(records: Sequence[PersonRecord], rule_ids: Sequence[str],
              positions: Sequence[int] | None, executor: Executor | None,
              today: date, digest: KeyDigest | None, with_ids: bool) -> KeyedRecords:
    rules = tuple(dict.fromkeys(rule_ids))
    if not isinstance(records, CompactRecords):
        chosen = records if positions is None else [records[int(i)] for i in positions]
        plain = match_keys_bulk(chosen, rules, today=today) if rules else {}
        return KeyedRecords([r.record_id for r in chosen] if with_ids else [], plain,
                            _digests(plain, digest))
    if not rules and not with_ids:
        return KeyedRecords([], {}, {})
    blobs = records.blobs(positions)
    jobs = [_pack_job(blobs[a:a + KEY_JOB_RECORDS])
            for a in range(0, len(blobs), KEY_JOB_RECORDS)]
    if executor is None or len(jobs) < 2:
        parts = [_blob_match_keys(job, rules, today, digest, with_ids) for job in jobs]
    else:
        parts = list(executor.map(_blob_match_keys, jobs, repeat(rules), repeat(today),
                                  repeat(digest), repeat(with_ids)))
    ids: list[str] = []
    keys: Keys = {r: [] for r in rules}
    digests: dict[str, list[bytes]] = {r: [] for r in rules}
    for part in parts:
        ids.extend(part.record_ids)
        for r in rules:
            keys[r].extend(part.keys[r])
            if digest is not None:
                digests[r].append(part.digests[r])
    return KeyedRecords(ids, keys, {r: b"".join(d) for r, d in digests.items()}
                        if digest is not None else {})


def ids_and_fields(records: Sequence[PersonRecord], positions: Sequence[int],
                   names: Sequence[str]) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """The id and the ``names`` fields, as (name, value) pairs, of the record at each
    position: what a disclosure releases. Packed records are read without building a
    ``PersonRecord`` each (a tenth of a disclosure batch's time at full scale)."""
    if isinstance(records, CompactRecords):
        return records.ids_and_fields(positions, names)
    return _ids_and_fields_of(records, positions, names)


def _ids_and_fields_of(records: Sequence[PersonRecord], positions: Sequence[int],
                       names: Sequence[str]) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    out: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    for p in positions:
        record = records[p]
        out.append((record.record_id, tuple([(f, record.get(f)) for f in names])))
    return out


class CompactRecords(Sequence[PersonRecord]):
    """A read-only sequence of ``PersonRecord`` stored as packed blobs.

    Once loaded (``seal``) the blobs are a tuple of bytes, which the cyclic garbage
    collector untracks after one pass: its full passes then skip the millions of blobs a
    large file holds (docs/architecture.md, Long-lived bulk data).
    """

    def __init__(self) -> None:
        self._blobs: list[bytes] | tuple[bytes, ...] = []
        self._extra_names: tuple[str, ...] | None = None

    def _pack(self, r: PersonRecord) -> bytes:
        names = tuple(name for name, _ in r.extra)
        if self._extra_names is None:
            self._extra_names = names
        elif names != self._extra_names:
            raise ValueError("all records must carry the same extra columns")
        parts = [getattr(r, f) for f in PERSON_FIELDS]
        parts.append(r.record_class)
        parts.extend(value for _, value in r.extra)
        if any(_SEP in p for p in parts):
            raise ValueError(f"record {r.record_id!r} contains a control separator")
        return _SEP.join(parts).encode("utf-8")

    def append(self, record: PersonRecord) -> None:
        if isinstance(self._blobs, tuple):  # appending after seal: a list again
            self._blobs = list(self._blobs)
        self._blobs.append(self._pack(record))

    def seal(self) -> CompactRecords:
        """Done appending: keep the blobs as a tuple the collector stops walking."""
        self._blobs = tuple(self._blobs)
        return self

    def __setstate__(self, state: dict[str, object]) -> None:
        """Unpickled records are sealed, whichever form was pickled."""
        self.__dict__.update(state)
        self.seal()

    @classmethod
    def of(cls, records: Iterable[PersonRecord]) -> CompactRecords:
        out = cls()
        for r in records:
            out.append(r)
        return out.seal()

    def _unpack(self, blob: bytes) -> PersonRecord:
        parts = blob.decode("utf-8").split(_SEP)
        n = len(PERSON_FIELDS)
        extra = tuple(zip(self._extra_names or (), parts[n + 1:], strict=True))
        # parts[:n] are exactly the person fields, in order (written by _pack)
        return PersonRecord(*parts[:n], record_class=parts[n], extra=extra)  # type: ignore[misc, arg-type]

    def __len__(self) -> int:
        return len(self._blobs)

    @overload
    def __getitem__(self, i: int) -> PersonRecord: ...
    @overload
    def __getitem__(self, i: slice) -> list[PersonRecord]: ...

    def __getitem__(self, i: int | slice) -> PersonRecord | list[PersonRecord]:
        if isinstance(i, slice):
            return [self._unpack(b) for b in self._blobs[i]]
        return self._unpack(self._blobs[i])

    def __iter__(self) -> Iterator[PersonRecord]:
        unpack = self._unpack
        for blob in self._blobs:
            yield unpack(blob)

    def blobs(self, positions: Sequence[int] | None = None) -> list[bytes]:
        """The packed records (all, or at ``positions``): what worker processes receive."""
        if positions is None:
            return list(self._blobs)
        blobs = self._blobs
        chosen = positions.tolist() if hasattr(positions, "tolist") else positions
        return [blobs[i] for i in chosen]

    def record_ids(self) -> list[str]:
        """Every record's id, without building the records."""
        return _blob_columns(*_pack_job(self._blobs), ("record_id",))["record_id"]

    def ids_and_fields(self, positions: Sequence[int], names: Sequence[str]
                       ) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
        """:func:`ids_and_fields` read straight from the blobs: one decode and split per
        record, no record built. A name that is no column takes the record's own ``get``
        (which refuses it)."""
        n = len(PERSON_FIELDS)
        column = {name: i for i, name in enumerate(PERSON_FIELDS)}
        column[RECORD_CLASS_FIELD] = n
        for k, name in enumerate(self._extra_names or ()):
            column.setdefault(name, n + 1 + k)  # as ``get``: person fields first, then extras
        if any(f not in column for f in names):
            return _ids_and_fields_of(self, positions, names)
        picks = [(f, column[f]) for f in names]
        rid = column["record_id"]
        blobs = self._blobs
        out: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        for p in positions:
            parts = blobs[p].decode("utf-8").split(_SEP)
            out.append((parts[rid], tuple([(f, parts[i]) for f, i in picks])))
        return out

    def record_classes(self) -> list[str]:
        """Each record's class, without building the records."""
        n = len(PERSON_FIELDS)
        return [b.decode("utf-8").split(_SEP)[n] for b in self._blobs]


def _load(items: Iterable[tuple[int, PersonRecord, list[Refusal]]]
          ) -> tuple[CompactRecords, list[Refusal], int]:
    """Pack the records that pass, refusing every occurrence of a duplicated record id."""
    store = CompactRecords()
    refused: list[Refusal] = []
    first_seen: dict[str, tuple[int, int]] = {}  # record id -> (line, position or -1)
    keep: list[bool] = []
    rows = 0
    for line, record, problems in items:
        rows += 1
        rid = record.record_id
        prior = first_seen.get(rid) if rid else None
        if prior is not None:
            problems.append(Refusal(rid, line, ReasonCode.DUPLICATE_RECORD_ID,
                                    f"record_id already on line {prior[0]}; every "
                                    "occurrence is refused"))
            if prior[1] >= 0 and keep[prior[1]]:
                keep[prior[1]] = False
                refused.append(Refusal(rid, prior[0], ReasonCode.DUPLICATE_RECORD_ID,
                                       f"record_id also on line {line}; every occurrence "
                                       "is refused"))
        elif rid:
            first_seen[rid] = (line, -1 if problems else len(store))
        if problems:
            refused.extend(problems)
            continue
        store.append(record)
        keep.append(True)
    if not all(keep):
        kept = CompactRecords()
        kept._extra_names = store._extra_names
        kept._blobs = [b for b, k in zip(store._blobs, keep, strict=True) if k]
        store = kept
    return store.seal(), refused, rows


def load_custodian_csv(
    source: TextIO, *, today: date
) -> tuple[CompactRecords, list[Refusal], int]:
    """Stream, validate and pack a custodian file: ``(records, refusals, rows read)``.

    Same rules as ``records.validate_persons``, but never holds more than one record
    object at a time.
    """
    return _load((line, r, validate_person(r, line=line, today=today))
                 for line, r in iter_person_csv(source))


def load_query_csv(
    source: TextIO, *, today: date
) -> tuple[CompactRecords, list[Refusal], int]:
    """Requester side: stream and validate a query file; keep the accepted subjects only.

    Same rules as ``records.validate_queries`` (placeholders, ZIP-only addresses,
    missing statute/reason/periods, duplicates...).  The query metadata is needed
    only to validate, so only the person part of each accepted query is kept.
    """
    return _load((line, q.person, validate_query(q, today=today, line=line))
                 for line, q in iter_query_csv(source))
