"""A national-size scenario, generated straight into record shards (a streaming generator).

The scenario generator (``protocol.adapters.scenario``) builds its whole population in
memory, which is right at 1.3M records and impossible at 160M. Here the custodian file is
cut into blocks of ``block_records``; each block is an independent population drawn with
the scenario's own functions (households, Jr/Sr pairs, name frequencies, the custodian's
and the requester's noise), with its share of the queries and of the planted true matches.
Each block's custodian rows go straight into the Parquet shards and its queries are appended
to ``queries.csv``, so memory is one block's, whatever the file size. Record and query ids
are global (``C`` + 9 digits, ``Q`` + 8 digits); ``truth.csv`` pairs them as the scenario's
does. Same arguments, same numpy and faker versions: the same files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from protocol.adapters import scenario as sc
from protocol.adapters.shards import SCHEMA_VERSION, ShardedRecords, ShardWriter

__all__ = ["NationalData", "generate_national"]

GENERATOR_VERSION = 1
DEFAULT_BLOCK_RECORDS = 1_000_000


@dataclass(frozen=True)
class NationalData:
    """Where a generated national scenario lives."""

    root: Path
    records_dir: Path
    queries: Path
    truth: Path
    manifest: Path

    @classmethod
    def in_dir(cls, root: Path) -> NationalData:
        return cls(root, root / "records", root / "queries.csv", root / "truth.csv",
                   root / "manifest.json")

    def load_manifest(self) -> dict[str, object]:
        return json.loads(self.manifest.read_text())  # type: ignore[no-any-return]


def _strings(field: np.ndarray) -> pa.Array:
    """A zero-padded byte segment (rows x width) as an Arrow string array, padding dropped
    (zero never occurs in the generator's text)."""
    keep = field != 0
    lengths = keep.sum(axis=1)
    offsets = np.zeros(field.shape[0] + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = field[keep].tobytes()
    return pa.StringArray.from_buffers(field.shape[0], pa.py_buffer(offsets.tobytes()),
                                       pa.py_buffer(data))


def _split(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _csv_rows(header: tuple[str, ...], fields: list[np.ndarray], with_header: bool) -> bytes:
    buffer = io.BytesIO()
    sc._write_csv(buffer, header, fields)
    data = buffer.getvalue()
    return data if with_header else data[data.index(b"\r\n") + 2:]


def generate_national(records: int, queries: int, out_dir: Path, *, seed: int = 20251,
                      block_records: int = DEFAULT_BLOCK_RECORDS,
                      progress: bool = True) -> NationalData:
    """Generate (or reuse, when the manifest matches) ``records`` custodian records in shards
    and ``queries`` queries with the scenario's share of planted true matches."""
    files = NationalData.in_dir(Path(out_dir))
    spec = dataclasses.replace(sc.ScenarioSpec(), seed=seed).scaled(queries, records)
    wanted = {"generator_version": GENERATOR_VERSION, "spec": dataclasses.asdict(spec),
              "block_records": block_records, "store_schema": SCHEMA_VERSION}
    if files.manifest.exists():
        got = files.load_manifest()
        if all(got.get(k) == v for k, v in wanted.items()):
            return files
        raise FileExistsError(f"{files.root} holds another national scenario; remove it")
    files.root.mkdir(parents=True, exist_ok=True)
    blocks = max(1, math.ceil(records / block_records))
    seeds = np.random.SeedSequence(seed).spawn(blocks)
    writer = ShardWriter(files.records_dir, sc.CUSTODIAN_HEADER,
                         source={"generator": "benchmarks.national_gen"})
    t0 = time.perf_counter()
    record_base = query_base = matched_total = 0
    with open(files.queries, "wb") as qfh, open(files.truth, "wb") as tfh:
        for b in range(blocks):
            n_rec = _split(records, blocks, b)
            n_q = _split(queries, blocks, b)
            n_match = min(_split(spec.true_matches, blocks, b), n_q, n_rec)
            block_spec = dataclasses.replace(spec, records=n_rec, queries=n_q,
                                             true_matches=n_match)
            rng_pop, rng_assign, rng_cust, rng_query = (
                np.random.default_rng(s) for s in seeds[b].spawn(4))
            # The scenario's own assignment (protocol.adapters.scenario.generate), per block.
            size = n_rec + n_q - n_match
            pop = sc._population(rng_pop, block_spec, size)
            perm = rng_assign.permutation(size)
            filers, others = perm[:n_rec], perm[n_rec:]
            matched_slots = rng_assign.choice(n_rec, size=n_match, replace=False)
            order = rng_assign.permutation(n_q)
            query_people = np.concatenate([filers[matched_slots], others])[order]
            matched_rows = np.flatnonzero(order < n_match)
            matched_records = matched_slots[order[matched_rows]]

            custodian = sc._custodian_fields(rng_cust, block_spec, pop, filers)
            custodian[0] = sc._cat(sc._lit("C", n_rec),
                                   sc._digits(np.arange(1, n_rec + 1) + record_base, 9))
            writer.append(pa.table({name: _strings(f) for name, f in
                                    zip(sc.CUSTODIAN_HEADER, custodian, strict=True)}))
            del custodian
            counts: dict[str, int] = {}
            query_fields = sc._query_fields(rng_query, block_spec, pop, query_people, counts)
            query_fields[0] = sc._cat(sc._lit("Q", n_q),
                                      sc._digits(np.arange(1, n_q + 1) + query_base, 8))
            qfh.write(_csv_rows(sc.QUERY_HEADER, query_fields, b == 0))
            del query_fields
            m = matched_rows.size
            tfh.write(_csv_rows(sc.TRUTH_HEADER, [
                sc._cat(sc._lit("Q", m), sc._digits(matched_rows + 1 + query_base, 8)),
                sc._cat(sc._lit("C", m), sc._digits(matched_records + 1 + record_base, 9)),
            ], b == 0))
            record_base += n_rec
            query_base += n_q
            matched_total += m
            if progress:
                print(f"[{time.perf_counter() - t0:8.1f}s] block {b + 1}/{blocks}: "
                      f"{record_base:,} records, {query_base:,} queries", file=sys.stderr,
                      flush=True)
    store: ShardedRecords = writer.close()
    manifest = {**wanted, "records": store.count, "queries": query_base,
                "true_matches": matched_total, "blocks": blocks,
                "numpy_version": np.__version__, "faker_version": sc._faker_version(),
                "seconds": round(time.perf_counter() - t0, 2)}
    files.manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return files
