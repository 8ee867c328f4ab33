"""The national custodian's records out of core: Parquet shards plus a manifest.

At 160M records the custodian cannot hold its file in memory (docs/national-custodian.md,
Storage). Records are written as a stream into Parquet shards of ``shard_rows`` rows (row
groups of ``row_group_rows``), every column a string; ``manifest.json`` holds the schema
version, the columns, the row counts and each shard's size and SHA-256. A record's *row* is
its position in write order, stable for the life of the store: the epoch index maps
fingerprints to rows and a disclosure reads its rows back (:meth:`ShardedRecords.rows`), one
row group at a time.

Validation is the library's own (``records.validate_person``) applied as the rows stream in
(:func:`import_csv`), and a record id that occurs more than once is refused at every
occurrence, as ``recordstore.load_custodian_csv`` does, without a set of every id in memory:
each shard leaves a sorted file of 64-bit id digests and the check merges them slab by slab.
Refused duplicates stay in the shards (rows never move) and are listed in
``excluded_rows.npy``; readers skip them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from protocol.adapters.files import make_private_dir, open_csv, sha256_file, write_file_atomic
from protocol.domain.records import (
    PERSON_FIELDS,
    RECORD_CLASS_FIELD,
    PersonRecord,
    iter_person_csv,
    validate_person,
)

__all__ = [
    "MANIFEST",
    "SCHEMA_VERSION",
    "ImportReport",
    "ShardWriter",
    "ShardedRecords",
    "import_csv",
    "table_from_records",
]

SCHEMA_VERSION = 2
#: Field separator of the row files (never in accepted text; a field holding it is refused).
_SEP = "\x1f"
MANIFEST = "manifest.json"
EXCLUDED = "excluded_rows.npy"
_KIND = "gated-psi/records"
BASE_COLUMNS: tuple[str, ...] = (*PERSON_FIELDS, RECORD_CLASS_FIELD)
#: Rows kept in memory while writing, and the unit a disclosure reads back.
DEFAULT_ROW_GROUP_ROWS = 1 << 16
DEFAULT_SHARD_ROWS = 1 << 20
#: Digests per slab of the duplicate check: bounds its memory (8 bytes each).
_SLAB_DIGESTS = 1 << 22


def _digest_ids(ids: Sequence[str]) -> npt.NDArray[np.uint64]:
    """64-bit digests of record ids (a collision only sends two ids to the exact check)."""
    blake = hashlib.blake2b
    raw = b"".join([blake(i.encode("utf-8"), digest_size=8).digest() for i in ids])
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def table_from_records(records: Iterable[PersonRecord], columns: Sequence[str]) -> pa.Table:
    """One Arrow table (all columns strings) from person records; extras by name."""
    rows = list(records)
    data: dict[str, list[str]] = {}
    for name in columns:
        data[name] = [r.get(name, "") for r in rows]
    return pa.table({n: pa.array(v, type=pa.string()) for n, v in data.items()})


class ShardWriter:
    """Streaming writer: :meth:`append` tables, then :meth:`close` writes the manifest.

    Memory holds one row group being assembled and one shard's id digests, whatever the
    number of rows written.
    """

    def __init__(self, out_dir: Path, columns: Sequence[str], *,
                 shard_rows: int = DEFAULT_SHARD_ROWS,
                 row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
                 source: dict[str, Any] | None = None) -> None:
        missing = [c for c in BASE_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"record columns lack {', '.join(missing)}")
        if len(set(columns)) != len(columns):
            raise ValueError("record columns repeat a name")
        if row_group_rows < 1 or shard_rows < row_group_rows or shard_rows % row_group_rows:
            raise ValueError("shard_rows must be a positive multiple of row_group_rows")
        self.out = make_private_dir(out_dir)
        if (self.out / MANIFEST).exists():
            raise FileExistsError(f"{self.out} already holds a record store")
        self.columns = tuple(columns)
        self.schema = pa.schema([(c, pa.string()) for c in self.columns])
        self.shard_rows, self.row_group_rows = shard_rows, row_group_rows
        self.source = source or {}
        self.shards: list[dict[str, Any]] = []
        self.count = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._digests: list[npt.NDArray[np.uint64]] = []
        self._blob_fh: BinaryIO | None = None
        self._lengths: list[npt.NDArray[np.int64]] = []

    def _shard_path(self, index: int) -> Path:
        return self.out / f"shard-{index:05d}.parquet"

    def append(self, table: pa.Table) -> None:
        """Add rows (a table with exactly this store's columns, all strings)."""
        if table.column_names != list(self.columns):
            table = table.select(list(self.columns))
        table = table.cast(self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self._room():
            self._flush(self._room())

    def _room(self) -> int:
        return min(self.row_group_rows, self.shard_rows - self._in_shard)

    def _flush(self, rows: int) -> None:
        whole = pa.concat_tables(self._pending).combine_chunks()
        group, rest = whole.slice(0, rows), whole.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._shard_path(len(self.shards)), self.schema,
                                            compression="zstd")
        self._writer.write_table(group, row_group_size=self.row_group_rows)
        self._digests.append(_digest_ids(group.column("record_id").to_pylist()))
        self._write_blobs(group)
        self._in_shard += group.num_rows
        if self._in_shard >= self.shard_rows:
            self._close_shard()

    def _write_blobs(self, group: pa.Table) -> None:
        """The row file: each row's fields joined by 0x1f, so a disclosure reads one row
        with one slice of a memory map instead of decoding a Parquet row group."""
        if self._blob_fh is None:
            # Open across appends until the shard closes (_close_shard closes it).
            path = self._shard_path(len(self.shards)).with_suffix(".rows")
            self._blob_fh = open(path, "wb")  # noqa: SIM115
        width = len(self.columns)
        cols = [[v or "" for v in group.column(c).to_pylist()] for c in self.columns]
        blobs = [_SEP.join(values).encode("utf-8") for values in zip(*cols, strict=True)]
        for i, blob in enumerate(blobs):
            if blob.count(b"\x1f") != width - 1:
                raise ValueError(f"record {cols[0][i]!r} contains the control character 0x1f")
        self._blob_fh.write(b"".join(blobs))
        self._lengths.append(np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs)))

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        index = len(self.shards)
        path = self._shard_path(index)
        assert self._blob_fh is not None  # opened with the shard
        self._blob_fh.flush()
        os.fsync(self._blob_fh.fileno())
        self._blob_fh.close()
        self._blob_fh = None
        offsets = np.zeros(self._in_shard + 1, dtype=np.uint64)
        np.cumsum(np.concatenate(self._lengths), out=offsets[1:])
        self._lengths = []
        rows_path, offsets_path = path.with_suffix(".rows"), path.with_suffix(".offsets.npy")
        np.save(offsets_path, offsets)
        digests = np.concatenate(self._digests) if self._digests else np.empty(0, np.uint64)
        order = np.argsort(digests, kind="stable").astype(np.uint32)
        np.save(self.out / f"shard-{index:05d}.ids.npy", digests[order])
        np.save(self.out / f"shard-{index:05d}.order.npy", order)
        self._digests = []
        self.shards.append({
            "file": path.name, "rows": self._in_shard, "first_row": self.count,
            "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "rows_file": rows_path.name, "rows_bytes": rows_path.stat().st_size,
            "rows_sha256": sha256_file(rows_path), "offsets_file": offsets_path.name,
            "offsets_bytes": offsets_path.stat().st_size,
            "offsets_sha256": sha256_file(offsets_path)})
        self.count += self._in_shard
        self._in_shard = 0

    def close(self) -> ShardedRecords:
        """Write the last rows, refuse duplicated record ids, and write the manifest."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._close_shard()
        excluded = self._duplicate_rows()
        np.save(self.out / EXCLUDED, excluded)
        for i in range(len(self.shards)):
            for suffix in ("ids", "order"):
                (self.out / f"shard-{i:05d}.{suffix}.npy").unlink()
        manifest = {
            "kind": _KIND, "schema_version": SCHEMA_VERSION, "columns": list(self.columns),
            "count": self.count, "usable": self.count - int(excluded.size),
            "row_group_rows": self.row_group_rows, "shard_rows": self.shard_rows,
            "shards": self.shards, "excluded": {"duplicate_record_id": int(excluded.size)},
            "source": self.source,
        }
        write_file_atomic(self.out / MANIFEST,
                          (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        return ShardedRecords.open(self.out)

    def _duplicate_rows(self) -> npt.NDArray[np.int64]:
        """Rows whose record id occurs more than once, merged slab by slab over digests."""
        ids = [np.load(self.out / f"shard-{i:05d}.ids.npy", mmap_mode="r")
               for i in range(len(self.shards))]
        slabs = max(1, -(-self.count // _SLAB_DIGESTS))
        bounds = [(2**64 * i) // slabs for i in range(slabs + 1)]
        suspects: list[tuple[int, int]] = []  # (shard, local row)
        for lo, hi in itertools.pairwise(bounds):
            ranges = [(int(np.searchsorted(a, np.uint64(lo))),
                       len(a) if hi >= 2**64 else int(np.searchsorted(a, np.uint64(hi))))
                      for a in ids]
            slab = np.concatenate([a[s:e] for a, (s, e) in zip(ids, ranges, strict=True)])
            slab.sort()
            repeated = np.unique(slab[1:][slab[1:] == slab[:-1]])
            if not repeated.size:
                continue
            for shard, (a, (s, e)) in enumerate(zip(ids, ranges, strict=True)):
                part = a[s:e]
                hit = np.flatnonzero(np.isin(part, repeated))
                if hit.size:
                    order = np.load(self.out / f"shard-{shard:05d}.order.npy", mmap_mode="r")
                    suspects.extend((shard, int(order[s + h])) for h in hit)
        if not suspects:
            return np.empty(0, dtype=np.int64)
        store = _Reader(self.out, self.shards, self.columns)
        rows = [self.shards[s]["first_row"] + r for s, r in suspects]
        record_ids = [p.record_id for p in store.read(rows)]
        seen = Counter(record_ids)
        return np.array(sorted(r for r, i in zip(rows, record_ids, strict=True) if seen[i] > 1),
                        dtype=np.int64)


class _Reader:
    """Records by global row from the shards' row files, memory-mapped: one slice per row,
    so random access costs microseconds and memory holds only what the OS pages in."""

    def __init__(self, root: Path, shards: list[dict[str, Any]], columns: Sequence[str]) -> None:
        self.root, self.shards, self.columns = root, shards, tuple(columns)
        self.starts = np.array([s["first_row"] for s in shards], dtype=np.int64)
        self._maps: dict[int, tuple[mmap.mmap, npt.NDArray[np.uint64]]] = {}

    def _shard(self, index: int) -> tuple[mmap.mmap, npt.NDArray[np.uint64]]:
        got = self._maps.get(index)
        if got is None:
            shard = self.shards[index]
            with open(self.root / shard["rows_file"], "rb") as fh:
                blob = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            offsets = np.load(self.root / shard["offsets_file"], mmap_mode="r")
            got = self._maps[index] = (blob, offsets)
        return got

    def read(self, rows: Sequence[int]) -> list[PersonRecord]:
        total = int(self.shards[-1]["first_row"] + self.shards[-1]["rows"]) if self.shards else 0
        wanted = np.asarray(rows, dtype=np.int64)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= total):
            raise IndexError(f"row outside the store's {total} rows")
        shard_of = (np.searchsorted(self.starts, wanted, side="right") - 1).tolist()
        local = (wanted - self.starts[shard_of]).tolist() if wanted.size else []
        names = self.columns
        base = [n for n in names if n in BASE_COLUMNS]
        extra = [n for n in names if n not in BASE_COLUMNS]
        out = []
        for shard, row in zip(shard_of, local, strict=True):
            blob, offsets = self._shard(shard)
            start, end = int(offsets[row]), int(offsets[row + 1])
            values = dict(zip(names, blob[start:end].decode("utf-8").split(_SEP), strict=True))
            out.append(PersonRecord(**{n: values[n] for n in base},
                                    extra=tuple((n, values[n]) for n in extra)))
        return out


@dataclass(frozen=True)
class ShardedRecords:
    """An opened record store: counts, columns, streaming reads and reads by row."""

    root: Path
    manifest: dict[str, Any]
    excluded_rows: npt.NDArray[np.int64]
    _reader: list[_Reader] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def write(cls, out_dir: Path, batches: Iterable[pa.Table], columns: Sequence[str], *,
              shard_rows: int = DEFAULT_SHARD_ROWS,
              row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
              source: dict[str, Any] | None = None) -> ShardedRecords:
        """Stream ``batches`` into a new store at ``out_dir``."""
        writer = ShardWriter(out_dir, columns, shard_rows=shard_rows,
                             row_group_rows=row_group_rows, source=source)
        for table in batches:
            writer.append(table)
        return writer.close()

    @classmethod
    def open(cls, root: Path | str, *, verify: bool = False) -> ShardedRecords:
        """Open a store; refuses a foreign or newer manifest and shards of the wrong size
        (``verify`` also re-hashes every shard)."""
        root = Path(root)
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{root} holds no record store ({MANIFEST} missing)") \
                from None
        if manifest.get("kind") != _KIND or manifest.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{root / MANIFEST}: not a version-{SCHEMA_VERSION} record store")
        for shard in manifest["shards"]:
            for name, size, digest in (("file", "bytes", "sha256"),
                                       ("rows_file", "rows_bytes", "rows_sha256"),
                                       ("offsets_file", "offsets_bytes", "offsets_sha256")):
                path = root / shard[name]
                if not path.is_file() or path.stat().st_size != shard[size]:
                    raise ValueError(f"{path}: missing or not {shard[size]} bytes as listed")
                if verify and sha256_file(path) != shard[digest]:
                    raise ValueError(f"{path}: SHA-256 differs from the manifest")
        excluded = np.load(root / EXCLUDED).astype(np.int64)
        return cls(root, manifest, excluded)

    @property
    def count(self) -> int:
        """Rows stored (including refused duplicates, which keep their row numbers)."""
        return int(self.manifest["count"])

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.manifest["columns"])

    @property
    def disk_bytes(self) -> int:
        """Parquet shards, row files and offsets together."""
        return sum(int(s["bytes"]) + int(s["rows_bytes"]) + int(s["offsets_bytes"])
                   for s in self.manifest["shards"])

    def partitions(self, rows_per_partition: int) -> list[tuple[int, int]]:
        """``(first row, end row)`` ranges of about ``rows_per_partition`` rows, never across
        a shard and aligned to row groups (the build's task unit)."""
        step = max(1, rows_per_partition // self.manifest["row_group_rows"])
        step *= self.manifest["row_group_rows"]
        out: list[tuple[int, int]] = []
        for shard in self.manifest["shards"]:
            first, rows = int(shard["first_row"]), int(shard["rows"])
            out.extend((first + a, first + min(a + step, rows)) for a in range(0, rows, step))
        return out

    def read_range(self, start: int, end: int, columns: Sequence[str]) -> pa.Table:
        """Rows ``[start, end)`` of one shard (a partition), only ``columns``."""
        starts = [int(s["first_row"]) for s in self.manifest["shards"]]
        shard_i = int(np.searchsorted(starts, start, side="right")) - 1
        shard = self.manifest["shards"][shard_i]
        local_start, local_end = start - shard["first_row"], end - shard["first_row"]
        if shard_i < 0 or local_end > shard["rows"] or local_start >= local_end:
            raise ValueError(f"rows [{start}, {end}) are not inside one shard")
        rg = self.manifest["row_group_rows"]
        groups = list(range(local_start // rg, (local_end - 1) // rg + 1))
        pf = pq.ParquetFile(self.root / shard["file"])
        table = pf.read_row_groups(groups, columns=list(columns))
        return table.slice(local_start - groups[0] * rg, local_end - local_start)

    def iter_batches(self, columns: Sequence[str] | None = None,
                     batch_rows: int = DEFAULT_ROW_GROUP_ROWS
                     ) -> Iterator[tuple[int, pa.Table]]:
        """``(first row, table)`` over the whole store in row order, one batch in memory."""
        cols = list(columns or self.columns)
        for shard in self.manifest["shards"]:
            pf = pq.ParquetFile(self.root / shard["file"])
            row = int(shard["first_row"])
            for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
                yield row, pa.Table.from_batches([batch])
                row += batch.num_rows

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row: int) -> PersonRecord:
        """One record by row (a disclosure's candidate)."""
        return self.rows([row])[0]

    def rows(self, global_rows: Sequence[int]) -> list[PersonRecord]:
        """The records at these rows, in the order asked (a refused duplicate is refused)."""
        bad = np.intersect1d(np.asarray(global_rows, dtype=np.int64), self.excluded_rows)
        if bad.size:
            raise ValueError(f"row {int(bad[0])} was refused (duplicate record_id)")
        if not self._reader:
            self._reader.append(_Reader(self.root, self.manifest["shards"], self.columns))
        return self._reader[0].read(global_rows)


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_csv` did: rows read and refused (by reason), the store."""

    store: ShardedRecords
    rows_read: int
    refused: dict[str, int]


def import_csv(csv_path: Path | str, out_dir: Path | str, *, today: date,
               batch_rows: int = DEFAULT_ROW_GROUP_ROWS,
               shard_rows: int = DEFAULT_SHARD_ROWS) -> ImportReport:
    """Stream a custodian CSV into shards, validating every row as it passes
    (``records.validate_person``); refused rows are counted by reason, not stored."""
    refused: Counter[str] = Counter()
    rows_read = 0
    writer: ShardWriter | None = None
    buffer: list[PersonRecord] = []
    with open_csv(csv_path) as fh:
        for line, record in iter_person_csv(fh):
            rows_read += 1
            problems = validate_person(record, line=line, today=today)
            if problems:
                refused.update(str(p.code) for p in problems)
                continue
            if writer is None:
                columns = [*BASE_COLUMNS, *(n for n, _ in record.extra)]
                writer = ShardWriter(Path(out_dir), columns, shard_rows=shard_rows,
                                     row_group_rows=min(batch_rows, shard_rows),
                                     source={"csv": os.fspath(csv_path)})
            buffer.append(record)
            if len(buffer) >= batch_rows:
                writer.append(table_from_records(buffer, writer.columns))
                buffer = []
    if writer is None:
        writer = ShardWriter(Path(out_dir), BASE_COLUMNS, shard_rows=shard_rows,
                             row_group_rows=min(batch_rows, shard_rows))
    if buffer:
        writer.append(table_from_records(buffer, writer.columns))
    store = writer.close()
    if store.excluded_rows.size:
        refused["duplicate_record_id"] += int(store.excluded_rows.size)
    return ImportReport(store, rows_read, dict(sorted(refused.items())))
