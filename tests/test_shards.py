"""Out-of-core custodian records (protocol/adapters/shards.py) on real Parquet files."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pyarrow as pa
import pytest

from protocol.adapters.files import open_csv
from protocol.adapters.shards import BASE_COLUMNS, ShardedRecords, import_csv, table_from_records
from protocol.domain.records import PersonRecord, write_person_csv
from protocol.domain.recordstore import load_custodian_csv

TODAY = date(2026, 11, 30)


def _person(i: int, **over: str) -> PersonRecord:
    fields = dict(record_id=f"C{i:07d}", tin=f"{123 + i % 500:03d}-45-{1000 + i % 8999:04d}",
                  first_name="Ann", last_name=f"Lee{i}",
                  dob="1980-04-12", address=f"{i} Main Street", city="Springfield", state="IL",
                  zip="62701")
    fields.update(over)
    return PersonRecord(**fields, extra=(("tax_paid_cents", str(i * 7)),))


def test_import_validates_streams_and_reads_back_by_row(tmp_path: Path) -> None:
    people = [_person(i) for i in range(1, 2500)]
    people[10] = _person(11, dob="2099-01-01")  # impossible birth date: refused
    people[20] = _person(21, record_id="C0000005")  # duplicate of row 4: both refused
    csv_path = tmp_path / "custodian.csv"
    with open_csv(csv_path, "w") as fh:
        write_person_csv(people, fh)
    report = import_csv(csv_path, tmp_path / "store", today=TODAY, batch_rows=256,
                        shard_rows=1024)
    store = report.store
    assert report.rows_read == 2499
    assert report.refused == {"duplicate_record_id": 2, "impossible_dob": 1}
    # The same acceptance as the in-memory loader.
    with open_csv(csv_path) as fh:
        in_memory, _, _ = load_custodian_csv(fh, today=TODAY)
    assert store.count - store.excluded_rows.size == len(in_memory)
    assert len(store.manifest["shards"]) == 3  # 2498 rows in shards of 1024
    assert store.columns == (*BASE_COLUMNS, "tax_paid_cents")
    usable = [r for r in range(store.count) if r not in set(store.excluded_rows.tolist())]
    assert store.rows(usable) == list(in_memory)
    by_row = dict(zip(usable, in_memory, strict=True))
    wanted = [2400, 3, 1500, 3, 1023, 1024]  # any order, repeats, across shards
    assert store.rows(wanted) == [by_row[i] for i in wanted]
    with pytest.raises(ValueError, match="refused"):
        store.rows([int(store.excluded_rows[0])])
    with pytest.raises(IndexError):
        store.rows([store.count])
    streamed = [t.num_rows for _, t in store.iter_batches(["record_id"], batch_rows=500)]
    assert sum(streamed) == store.count
    parts = store.partitions(600)
    assert parts[0] == (0, 512) and parts[-1][1] == store.count
    assert store.read_range(512, 1024, ["record_id"]).column(0).to_pylist() == \
        [r.record_id for r in store.rows(range(512, 1024))]


def test_manifest_guards_the_files(tmp_path: Path) -> None:
    store = ShardedRecords.write(tmp_path / "s", [table_from_records(
        [_person(i) for i in range(100)], BASE_COLUMNS)], BASE_COLUMNS, shard_rows=64,
        row_group_rows=32)
    manifest = json.loads((store.root / "manifest.json").read_text())
    assert manifest["count"] == 100 and manifest["schema_version"] == 2
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    ShardedRecords.open(store.root, verify=True)
    rows_file = store.root / manifest["shards"][1]["rows_file"]
    original = rows_file.read_bytes()
    rows_file.write_bytes(original.replace(b"Main", b"Mian", 1))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        ShardedRecords.open(store.root, verify=True)
    rows_file.write_bytes(original)
    shard = store.root / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        ShardedRecords.open(store.root, verify=True)
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(ValueError, match=r"not \d+ bytes as listed"):
        ShardedRecords.open(store.root)
    with pytest.raises(FileExistsError):
        ShardedRecords.write(store.root, [], BASE_COLUMNS)


def _batches(rows: int, batch: int) -> Iterator[pa.Table]:
    for start in range(0, rows, batch):
        yield table_from_records([_person(i) for i in range(start, min(rows, start + batch))],
                                 BASE_COLUMNS)


def test_writer_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    peaks = []
    for rows in (20_000, 80_000):
        tracemalloc.start()
        ShardedRecords.write(tmp_path / f"m{rows}", _batches(rows, 4096), BASE_COLUMNS,
                             shard_rows=16_384, row_group_rows=4096)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], peaks  # 4x the rows, about the same peak


def test_national_generator_streams_blocks_into_shards(tmp_path: Path) -> None:
    from benchmarks.national_gen import generate_national
    from protocol.domain.records import read_query_csv

    data = generate_national(2500, 300, tmp_path / "n", block_records=1000, progress=False)
    store = ShardedRecords.open(data.records_dir, verify=True)
    assert store.count == 2500 and store.excluded_rows.size == 0
    ids = [p.record_id for p in store.rows(range(store.count))]
    assert ids == [f"C{i:09d}" for i in range(1, 2501)]  # global across the three blocks
    with open_csv(data.queries) as fh:
        queries = read_query_csv(fh)
    assert [q.person.record_id for q in queries] == [f"Q{i:08d}" for i in range(1, 301)]
    truth = data.truth.read_text().splitlines()
    assert truth[0] == "query_record_id,custodian_record_id"
    pairs = [line.split(",") for line in truth[1:]]
    assert len(pairs) == data.load_manifest()["true_matches"] > 0
    by_id = {q.person.record_id: q.person for q in queries}
    same_name = 0
    for qid, cid in pairs:
        custodian = store.rows([int(cid[1:]) - 1])[0]
        query = by_id[qid]
        same_name += custodian.first_name.lower() in query.first_name.lower() or \
            query.first_name.lower()[:1] == custodian.first_name.lower()[:1]
    assert same_name >= 0.9 * len(pairs)  # planted: the same person, noise aside
    assert generate_national(2500, 300, tmp_path / "n", block_records=1000,
                             progress=False) == data  # cached
    with pytest.raises(FileExistsError, match="another national scenario"):
        generate_national(2600, 300, tmp_path / "n", block_records=1000, progress=False)
