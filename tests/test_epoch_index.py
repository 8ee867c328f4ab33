"""The offline epoch index (protocol/adapters/epoch_index.py) built on a real 2-worker
Dask LocalCluster over a real Parquet record store."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client, LocalCluster

from agency_b.cli import main
from agency_b.national import epoch_key_path
from protocol.adapters.epoch_index import (
    EpochIndex,
    build_epoch_index,
    read_epoch_key,
    write_epoch_key,
)
from protocol.adapters.scenario import ScenarioSpec, generate
from protocol.adapters.shards import ShardedRecords, import_csv
from protocol.crypto import oprf, tagset
from protocol.domain.records import match_keys_bulk

TODAY = date(2026, 11, 30)
RULES = ("tin+dob", "first+last+dob+zip")
EPOCH = "2026-11"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """One real 2-worker cluster of processes for the module, memory-bounded per worker."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      memory_limit="1GiB", dashboard_address=":0") as running:
        yield running


class _RecordingClient:
    """The real client, keeping a pickled copy of every task's arguments: what enters the
    task graph."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.sent: list[bytes] = []

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(pickle.dumps(args))
        return self.client.submit(fn, *args, **kwargs)

    def scheduler_info(self) -> Any:
        return self.client.scheduler_info()


SENT: list[bytes] = []
TIMELINE: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, cluster: LocalCluster
          ) -> Iterator[tuple[ShardedRecords, EpochIndex, bytes]]:
    root = tmp_path_factory.mktemp("national")
    files = generate(ScenarioSpec().scaled(queries=400, records=3000), root / "scenario")
    store = import_csv(files.custodian, root / "records", today=TODAY, batch_rows=512,
                       shard_rows=2048).store
    master = os.urandom(32)
    key_file = root / "keys" / f"epoch-{EPOCH}.key"
    sk = write_epoch_key(key_file, master, EPOCH)
    assert (key_file.stat().st_mode & 0o777) == 0o600
    with Client(cluster) as real:
        client = _RecordingClient(real)
        info = build_epoch_index(store.root, root / "index", epoch_id=EPOCH, rules=RULES,
                                 key_file=key_file, max_evaluations=1 << 12, client=client,
                                 partition_rows=1024, bucket_bits=2,
                                 excluded_classes={"protected"}, today=TODAY, progress=False)
    assert info.workers == 2
    # Four tasks per worker at least (row-group aligned), then one task per (rule, bucket).
    assert info.partitions == 6 and info.tasks == 6 + 2 * 4
    SENT[:] = client.sent
    TIMELINE[:] = [info.timeline]
    yield store, EpochIndex.open(info.out_dir), sk


def _expected(store: ShardedRecords, sk: bytes, bits: int) -> dict[str, dict[int, set[int]]]:
    """fingerprint -> rows per rule, computed in this process from the records."""
    records = store.rows(range(store.count))
    keys = match_keys_bulk(records, RULES, today=TODAY)
    out: dict[str, dict[int, set[int]]] = {}
    for rule in RULES:
        rows = [i for i, k in enumerate(keys[rule])
                if k is not None and records[i].record_class != "protected"]
        outputs = oprf.evaluate_batch(sk, [keys[rule][i] for i in rows])  # type: ignore[misc]
        fps = tagset.to_ints(tagset.fingerprints(outputs, epoch_id=EPOCH, rule_id=rule,
                                                 bits=bits))
        table: dict[int, set[int]] = {}
        for row, fp in zip(rows, fps, strict=True):
            table.setdefault(fp, set()).add(row)
        out[rule] = table
    return out


def test_index_holds_exactly_the_epoch_fingerprints(
        built: tuple[ShardedRecords, EpochIndex, bytes]) -> None:
    store, index, sk = built
    assert index.epoch_id == EPOCH and index.rules == RULES
    assert index.bits == tagset.fingerprint_bits(1 << 12, store.count) == 40 + 12 + 12
    expected = _expected(store, sk, index.bits)
    records = store.rows(range(store.count))
    protected = [r for r in records if r.record_class == "protected"]
    assert protected  # the scenario plants a few; policy keeps them out of the index
    keys = match_keys_bulk(protected, ["tin+dob"], today=TODAY)["tin+dob"]
    outputs = oprf.evaluate_batch(sk, [k for k in keys if k is not None])
    hidden = tagset.to_ints(tagset.fingerprints(outputs, epoch_id=EPOCH, rule_id="tin+dob",
                                                bits=index.bits))
    assert hidden and not set(hidden) & set(expected["tin+dob"])
    assert all(index.rows_for("tin+dob", fp) == [] for fp in hidden)
    for rule in RULES:
        table = expected[rule]
        assert index.tags(rule) == len(table) > 2500
        decoded = np.concatenate(list(tagset.decode_chunks(index.tagset_chunks(rule),
                                                           bits=index.bits)))
        assert tagset.to_ints(decoded) == sorted(table)
        for fp, rows in list(table.items())[::7]:
            assert set(index.rows_for(rule, fp)) == rows
        assert index.rows_for(rule, 12345) == []
    assert index.manifest["fpr_per_authorization"] <= 2.0**-40
    assert index.manifest["excluded_classes"] == ["protected"]


def test_batched_lookup_equals_one_lookup_per_fingerprint(
        built: tuple[ShardedRecords, EpochIndex, bytes]) -> None:
    """``rows_for_many`` (a disclosure batch, one open per bucket) gives what ``rows_for``
    gives one by one: members across all four buckets, repeats, and strangers."""
    store, index, sk = built
    expected = _expected(store, sk, index.bits)
    for rule in RULES:
        members = list(expected[rule])[::5]
        strangers = [12345, (1 << index.bits) - 1, 0]
        asked = [*members, *strangers, members[0]]
        fps = tagset.from_ints(asked)
        assert len(set(tagset.top_bits(fps, index.bits, 2).tolist())) == 4
        found = index.rows_for_many(rule, fps)
        assert found == [index.rows_for(rule, fp) for fp in asked]
        assert [set(f) for f in found[:len(members)]] == [expected[rule][m] for m in members]
        assert found[len(members):-1] == [[], [], []]
    assert index.rows_for_many(RULES[0], tagset.empty()) == []


def test_the_build_timeline_says_where_the_wall_time_went(
        built: tuple[ShardedRecords, EpochIndex, bytes]) -> None:
    """Both rounds' spans, the serial gap between them and the workers' busy time come from
    the tasks' own stamps; the machine's other CPU use is what the build could not have."""
    from protocol.adapters.epoch_index import build_timeline

    tasks = [[{"pid": 1, "started": 10.0, "finished": 14.0, "cpu_s": 4.0},
              {"pid": 2, "started": 10.0, "finished": 13.0, "cpu_s": 3.0}],
             [{"pid": 1, "started": 15.0, "finished": 16.0, "cpu_s": 1.0}]]
    t = build_timeline(tasks, 9.5, 16.5, 2, machine_busy_s=12.0)
    assert t["round_s"] == [4.0, 1.0] and t["between_rounds_s"] == [1.0]
    assert t["before_first_task_s"] == 0.5 and t["after_last_task_s"] == 0.5
    assert t["worker_busy_s"] == [3.0, 5.0]
    assert t["task_cpu_s"] == 8.0 and t["worker_utilization"] == round(8 / 14, 3)
    assert t["other_processes_cpu_s"] == 4.0
    real = TIMELINE[0]  # the fixture's build on the real 2-worker cluster
    assert len(real["round_s"]) == 2 and len(real["between_rounds_s"]) == 1
    assert 1 <= len(real["worker_busy_s"]) <= 2 and real["task_cpu_s"] > 0
    assert 0 < sum(real["round_s"]) <= real["wall_s"]


def test_requester_merge_against_the_index_finds_the_planted_matches(
        built: tuple[ShardedRecords, EpochIndex, bytes]) -> None:
    store, index, sk = built
    rule = "tin+dob"
    records = [r for r in store.rows(range(0, store.count, 10)) if r.record_class != "protected"]
    keys = [k for k in match_keys_bulk(records, [rule], today=TODAY)[rule] if k is not None]
    strangers = [b"not-a-member-%d" % i for i in range(50)]
    inputs = keys + strangers
    # The requester side: blind, the custodian evaluates under the epoch key, finalize.
    blinds, blinded = oprf.blind_batch(inputs)
    outputs = oprf.finalize_batch(inputs, blinds, oprf.blind_evaluate_batch(sk, blinded))
    fps = tagset.fingerprints(outputs, epoch_id=EPOCH, rule_id=rule, bits=index.bits)
    sorted_fps, positions = tagset.sort_with_positions(fps)
    blocks = tagset.decode_chunks(index.tagset_chunks(rule), bits=index.bits)
    hits = dict(tagset.merge_matches(sorted_fps, positions, blocks))
    assert sorted(hits) == list(range(len(keys)))
    for fp in hits.values():
        assert index.rows_for(rule, fp)


def test_the_key_never_enters_the_task_graph(
        built: tuple[ShardedRecords, EpochIndex, bytes]) -> None:
    _, _, sk = built
    assert len(SENT) == 6 + 2 * 4
    for args in SENT:
        assert sk not in args and sk.hex().encode() not in args
    evaluate_args = [a for a in SENT if b"epoch-2026-11.key" in a]
    assert len(evaluate_args) == 6  # every evaluate task got the key file's path instead


def test_key_file_is_read_by_path_and_refused_when_loose(tmp_path: Path) -> None:
    key_file = tmp_path / "k.key"
    sk = write_epoch_key(key_file, os.urandom(32), EPOCH)
    assert read_epoch_key(key_file) == sk
    os.chmod(key_file, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        read_epoch_key(key_file)
    os.chmod(key_file, 0o600)
    key_file.write_text("00" * 32)
    with pytest.raises(ValueError, match="not an epoch key"):
        read_epoch_key(key_file)
    with pytest.raises(FileExistsError):
        write_epoch_key(key_file, os.urandom(32), EPOCH)


def test_cli_imports_a_csv_and_builds_on_a_scheduler_address(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cluster: LocalCluster) -> None:
    files = generate(ScenarioSpec().scaled(queries=100, records=1500), tmp_path / "scenario")
    assert main(["import-records", "--csv", str(files.custodian), "--out",
                 str(tmp_path / "records")]) == 0
    assert '"stored": 1500' in capsys.readouterr().out
    secrets = tmp_path / "secrets"
    assert main(["init", "--out", str(secrets)]) == 0
    assert main(["build-index", "--records", str(tmp_path / "records"), "--out",
                 str(tmp_path / "index"), "--epoch", EPOCH, "--secrets", str(secrets),
                 "--rules", "tin+dob", "--scheduler", cluster.scheduler_address,
                 "--max-evaluations", "1024", "--quiet"]) == 0
    assert '"workers": 2' in capsys.readouterr().out
    index = EpochIndex.open(tmp_path / "index")
    assert index.rules == ("tin+dob",) and index.tags("tin+dob") > 1400
    assert (epoch_key_path(secrets, EPOCH).stat().st_mode & 0o777) == 0o600
    with pytest.raises(SystemExit):
        main(["build-index", "--records", "r", "--out", "o", "--epoch", EPOCH,
              "--secrets", str(secrets), "--rules", "tin+shoe_size"])
