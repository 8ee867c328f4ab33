"""The offline epoch index, built on Dask (docs/national-custodian.md, Offline build).

Once per key epoch the custodian evaluates every record under every rule with the epoch key
and writes, per rule, an on-disk index: ``2^b`` buckets (fingerprint ranges of equal width),
each a sorted fingerprint file and the parallel row file, plus the bucket's Golomb-Rice coded
tag-set chunks (``protocol.crypto.tagset``). The requester fetches the chunks; a disclosure
finds its candidate rows by one binary search in one memory-mapped bucket file.

The build is two rounds of partition-level tasks, so a 160M-record file is about a thousand
tasks, not millions:

1. *evaluate*: one task per record partition (``partition_rows`` rows of one shard) reads
   its columns, derives the match keys, evaluates them (RFC 9497 Evaluate), fingerprints
   the outputs, sorts them and writes them with each bucket's offsets;
2. *merge*: one task per (rule, bucket) reads that bucket's slice of every partition,
   sorts, writes the bucket files and encodes its tag-set chunks.

Key handling: a task is given the *path* of the epoch key file, never the key; each task
reads the 0600 file itself (``read_epoch_key``). The Dask cluster (scheduler, workers and
their disks) is therefore inside the custodian's trust boundary: anyone who can run code on
a worker can read the key. Memory per worker is bounded by the task sizes, whatever the file
size: one partition's keys and outputs in round 1, one bucket in round 2; a LocalCluster
also gets a per-worker ``memory_limit``.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil

from protocol.adapters.files import make_private_dir, read_secret, write_file_atomic
from protocol.adapters.shards import ShardedRecords
from protocol.crypto import oprf, tagset
from protocol.domain.records import get_rule, match_keys_from_columns
from protocol.errors import PSIError

__all__ = [
    "DEFAULT_MAX_EVALUATIONS",
    "DEFAULT_PARTITION_ROWS",
    "EpochIndex",
    "EpochIndexInfo",
    "build_epoch_index",
    "key_columns",
    "read_epoch_key",
    "write_epoch_key",
]

INDEX_KIND = "gated-psi/epoch-index"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
#: E_max the fingerprints are sized for unless the policy says otherwise (2^22 evaluations).
DEFAULT_MAX_EVALUATIONS = 1 << 22
#: Records per round-1 task: ~250 MB of keys and outputs in a worker, ~640 tasks at 160M.
DEFAULT_PARTITION_ROWS = 1 << 18
#: Target index entries per bucket (round-2 task): ~24 MB of fingerprints and rows.
BUCKET_ENTRIES = 1 << 20
#: Per-worker memory limit of the LocalCluster the build starts itself.
WORKER_MEMORY_LIMIT = "2GiB"
_CHUNK_LEN = struct.Struct(">I")


# --- the epoch key file -------------------------------------------------------------------


def write_epoch_key(path: Path | str, master_secret: bytes, epoch_id: str, *,
                    force: bool = False) -> bytes:
    """Derive the epoch key from the master secret and write it 0600 (hex); returns it."""
    sk = tagset.epoch_key(master_secret, epoch_id)
    write_file_atomic(path, sk.hex().encode() + b"\n", mode=0o600, overwrite=force)
    return sk


def read_epoch_key(path: Path | str) -> bytes:
    """Read an epoch key file (refusing a group- or world-readable one) and check it is a
    canonical non-zero scalar."""
    text = read_secret(path).decode("ascii", "replace").strip()
    try:
        return oprf.deserialize_scalar(bytes.fromhex(text))
    except (ValueError, PSIError) as exc:
        raise ValueError(f"{path}: not an epoch key ({exc})") from None


# --- where the build's time goes -----------------------------------------------------------


def _stamp(started: float) -> dict[str, Any]:
    """When and where a task ran (its worker process, wall clock start and end)."""
    return {"pid": os.getpid(), "started": started, "finished": time.time()}


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (every process, all cores)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def build_timeline(rounds: Sequence[Sequence[dict[str, Any]]], t_start: float, t_end: float,
                   workers: int, machine_busy_s: float) -> dict[str, Any]:
    """What limited a build's wall time, from its tasks' stamps: each round's span, the gap
    between rounds (serial), each worker's busy time, the workers' utilization (task CPU over
    wall x workers) and the CPU the rest of the machine took meanwhile (starvation, when
    the machine is shared).  Wall times are the runner's clock; tasks stamp ``time.time``."""
    spans = []
    for tasks in rounds:
        if tasks:
            spans.append((min(t["started"] for t in tasks), max(t["finished"] for t in tasks)))
    busy: dict[int, float] = {}
    for tasks in rounds:
        for t in tasks:
            busy[t["pid"]] = busy.get(t["pid"], 0.0) + t["finished"] - t["started"]
    wall = max(t_end - t_start, 1e-9)
    cpu = sum(t["cpu_s"] for tasks in rounds for t in tasks)
    cores = os.cpu_count() or 1
    return {
        "wall_s": round(wall, 3),
        "round_s": [round(b - a, 3) for a, b in spans],
        "before_first_task_s": round(spans[0][0] - t_start, 3) if spans else None,
        "between_rounds_s": [round(spans[i + 1][0] - spans[i][1], 3)
                             for i in range(len(spans) - 1)],
        "after_last_task_s": round(t_end - spans[-1][1], 3) if spans else None,
        "worker_busy_s": sorted(round(v, 3) for v in busy.values()),
        "task_cpu_s": round(cpu, 3),
        "worker_utilization": round(cpu / (wall * max(workers, 1)), 3),
        "machine_busy_s": round(machine_busy_s, 3),
        "machine_cores": cores,
        "other_processes_cpu_s": round(max(machine_busy_s - cpu, 0.0), 3),
        "cores_left_for_build": round(max(cores - max(machine_busy_s - cpu, 0.0) / wall, 0.0),
                                      2),
    }


# --- round 1: evaluate one partition ------------------------------------------------------


def key_columns(rules: Sequence[str]) -> list[str]:
    """Columns the rules' match keys read (an address also needs city, state and ZIP)."""
    cols: dict[str, None] = {}
    for rule in rules:
        for f in get_rule(rule).fields:
            for c in (("address", "city", "state", "zip") if f == "address" else (f,)):
                cols.setdefault(c, None)
    return list(cols)


def _part_dir(work: Path, part: int) -> Path:
    return work / f"part-{part:05d}"


def _evaluate_partition(records_dir: str, part: int, start: int, end: int,
                        rules: tuple[str, ...], key_file: str, epoch_id: str, bits: int,
                        bucket_bits: int, work_dir: str, today: str,
                        excluded_classes: tuple[str, ...]) -> dict[str, Any]:
    """Round-1 task: keys, Evaluate, fingerprints and bucket offsets of rows [start, end)."""
    cpu0, started = time.process_time(), time.time()
    store = ShardedRecords.open(records_dir)
    wanted = key_columns(rules)
    present = [c for c in wanted if c in store.columns]
    table = store.read_range(start, end, [*present, "record_class"])
    n = table.num_rows
    blank = [""] * n
    cache: dict[str, list[str]] = {}

    def column(name: str) -> list[str]:
        if name not in cache:
            cache[name] = ([v or "" for v in table.column(name).to_pylist()]
                           if name in present else blank)
        return cache[name]

    keys = match_keys_from_columns(column, rules, today=date.fromisoformat(today))
    skip = np.zeros(n, dtype=bool)
    gone = store.excluded_rows[(store.excluded_rows >= start) & (store.excluded_rows < end)]
    skip[gone - start] = True
    if excluded_classes:
        classes = table.column("record_class").to_pylist()
        skip |= np.array([c in excluded_classes for c in classes], dtype=bool)
    sk = read_epoch_key(key_file)
    out = make_private_dir(_part_dir(Path(work_dir), part))
    counts: dict[str, int] = {}
    for rule in rules:
        idx = [i for i, k in enumerate(keys[rule]) if k is not None and not skip[i]]
        outputs = oprf.evaluate_batch(sk, [keys[rule][i] for i in idx])  # type: ignore[misc]
        fps = tagset.fingerprints(outputs, epoch_id=epoch_id, rule_id=rule, bits=bits)
        order = np.argsort(fps, kind="stable")
        fps = fps[order]
        rows = (np.asarray(idx, dtype=np.int64) + start)[order].astype(np.uint64)
        buckets = tagset.top_bits(fps, bits, bucket_bits)
        bounds = np.searchsorted(buckets, np.arange((1 << bucket_bits) + 1)).astype(np.int64)
        np.save(out / f"{rule}.fp.npy", fps)
        np.save(out / f"{rule}.rows.npy", rows)
        np.save(out / f"{rule}.bounds.npy", bounds)
        counts[rule] = len(idx)
    return {"part": part, "rows": n, "entries": counts,
            "cpu_s": time.process_time() - cpu0, **_stamp(started)}


# --- round 2: merge one bucket of one rule ------------------------------------------------


def _bucket_name(bucket: int) -> str:
    return f"bucket-{bucket:05d}"


def _merge_bucket(work_dir: str, out_dir: str, rule: str, bucket: int, parts: int,
                  bits: int, rule_entries: int) -> dict[str, Any]:
    """Round-2 task: one bucket's sorted fingerprints and rows, and its tag-set chunks."""
    cpu0, started = time.process_time(), time.time()
    fp_parts, row_parts = [], []
    for part in range(parts):
        d = _part_dir(Path(work_dir), part)
        bounds = np.load(d / f"{rule}.bounds.npy")
        a, b = int(bounds[bucket]), int(bounds[bucket + 1])
        if b > a:
            fp_parts.append(np.load(d / f"{rule}.fp.npy", mmap_mode="r")[a:b])
            row_parts.append(np.load(d / f"{rule}.rows.npy", mmap_mode="r")[a:b])
    fps = np.concatenate(fp_parts) if fp_parts else tagset.empty()
    rows = np.concatenate(row_parts) if row_parts else np.empty(0, dtype=np.uint64)
    order = np.lexsort((rows, fps))  # by fingerprint, then row
    fps, rows = fps[order], rows[order]
    rule_dir = make_private_dir(Path(out_dir) / rule)
    name = _bucket_name(bucket)
    np.save(rule_dir / f"{name}.fp.npy", fps)
    np.save(rule_dir / f"{name}.rows.npy", rows)
    distinct = fps[np.r_[True, fps[1:] != fps[:-1]]] if fps.size else fps
    tagset_bytes = 0
    with open(rule_dir / f"{name}.tags", "wb") as fh:
        for chunk in tagset.encode_chunks(distinct, bits, max(rule_entries, 1)):
            fh.write(_CHUNK_LEN.pack(len(chunk)) + chunk)
            tagset_bytes += len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return {"rule": rule, "bucket": bucket, "entries": int(fps.size),
            "tags": int(distinct.size), "tagset_bytes": tagset_bytes,
            "index_bytes": (rule_dir / f"{name}.fp.npy").stat().st_size
            + (rule_dir / f"{name}.rows.npy").stat().st_size,
            "cpu_s": time.process_time() - cpu0, **_stamp(started)}


# --- the build ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochIndexInfo:
    """What a build produced and what it cost (the runner's offline figures)."""

    out_dir: Path
    epoch_id: str
    bits: int
    rules: dict[str, dict[str, Any]]
    records: int
    partitions: int
    tasks: int
    workers: int
    seconds: float
    cpu_seconds: float
    manifest: dict[str, Any]
    #: ``build_timeline``: where the wall time went (rounds, serial gaps, starvation)
    timeline: dict[str, Any] = field(default_factory=dict)


def _bucket_bits(records: int) -> int:
    need = -(-records // BUCKET_ENTRIES)
    return min(16, (need - 1).bit_length() if need > 1 else 0)


def _run(client: Any, fn: Any, calls: list[tuple[Any, ...]], label: str,
         progress: bool) -> list[dict[str, Any]]:
    """Submit one task per call and wait for all, with a progress bar on stderr."""
    as_completed = importlib.import_module("distributed").as_completed
    futures = [client.submit(fn, *call, pure=False) for call in calls]
    results: list[dict[str, Any]] = []
    if not progress or not sys.stderr.isatty():
        # A log, not a terminal: one line per tenth of the tasks.
        t0, step = time.perf_counter(), max(1, len(futures) // 10)
        for fut in as_completed(futures):
            results.append(fut.result())
            if progress and (len(results) % step == 0 or len(results) == len(futures)):
                print(f"{label}: {len(results)}/{len(futures)} tasks "
                      f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
        return results
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(label, total=len(futures))
        for fut in as_completed(futures):
            results.append(fut.result())
            bar.advance(task)
    return results


def build_epoch_index(records_dir: Path | str, out_dir: Path | str, *, epoch_id: str,
                      rules: Sequence[str], key_file: Path | str,
                      max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
                      client: Any = None, workers: int = 2,
                      partition_rows: int = DEFAULT_PARTITION_ROWS,
                      bucket_bits: int | None = None,
                      excluded_classes: Collection[str] = (),
                      today: date | None = None, progress: bool = True) -> EpochIndexInfo:
    """Build the epoch index of a record store on Dask (``client``, or a LocalCluster of
    ``workers`` single-threaded worker processes started and stopped here)."""
    rule_ids = tuple(dict.fromkeys(rules))
    if not rule_ids:
        raise ValueError("no match rules to index")
    for rule in rule_ids:
        get_rule(rule)
    read_epoch_key(key_file)  # refuse a bad or loose key before any task runs
    store = ShardedRecords.open(records_dir)
    out = make_private_dir(out_dir)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds an epoch index")
    work = make_private_dir(out / ".work")
    # L is sized for the largest possible rule: every stored record having a key.
    bits = tagset.fingerprint_bits(max_evaluations, max(store.count, 1))
    b_bits = _bucket_bits(store.count) if bucket_bits is None else bucket_bits
    today_iso = (today or date.today()).isoformat()
    own_cluster = None
    if client is None:
        distributed: Any = importlib.import_module("distributed")
        own_cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True,
            memory_limit=WORKER_MEMORY_LIMIT, dashboard_address=":0")
        client = distributed.Client(own_cluster)
    t0, t0_wall, busy0 = time.perf_counter(), time.time(), _machine_busy_s()
    try:
        n_workers = len(client.scheduler_info().get("workers", {})) or workers
        # At least four tasks per worker, so a small file still spreads over the cluster.
        parts = store.partitions(min(partition_rows, -(-store.count // (4 * n_workers))))
        round1 = _run(client, _evaluate_partition, [
            (os.fspath(store.root.resolve()), p, a, b, rule_ids,
             os.fspath(Path(key_file).resolve()), epoch_id, bits, b_bits,
             os.fspath(work.resolve()), today_iso, tuple(sorted(excluded_classes)))
            for p, (a, b) in enumerate(parts)], "evaluate partitions", progress)
        entries = {r: sum(res["entries"][r] for res in round1) for r in rule_ids}
        round2 = _run(client, _merge_bucket, [
            (os.fspath(work.resolve()), os.fspath(out.resolve()), r, bucket, len(parts), bits,
             entries[r])
            for r in rule_ids for bucket in range(1 << b_bits)], "merge buckets", progress)
        t1_wall, busy1 = time.time(), _machine_busy_s()
    finally:
        if own_cluster is not None:
            client.close()
            own_cluster.close()
    seconds = time.perf_counter() - t0
    for part in range(len(parts)):
        for f in _part_dir(work, part).iterdir():
            f.unlink()
        _part_dir(work, part).rmdir()
    work.rmdir()
    rule_info: dict[str, dict[str, Any]] = {}
    for rule in rule_ids:
        mine = sorted((r for r in round2 if r["rule"] == rule), key=lambda r: r["bucket"])
        tags = sum(r["tags"] for r in mine)
        rule_info[rule] = {
            "entries": entries[rule], "tags": tags,
            "rice_parameter": tagset.rice_parameter(bits, max(entries[rule], 1)),
            "tagset_bytes": sum(r["tagset_bytes"] for r in mine),
            "index_bytes": sum(r["index_bytes"] for r in mine),
            "buckets": [{k: r[k] for k in ("entries", "tags", "tagset_bytes", "index_bytes")}
                        for r in mine],
        }
    cpu = sum(r["cpu_s"] for r in round1) + sum(r["cpu_s"] for r in round2)
    timeline = build_timeline([round1, round2], t0_wall, t1_wall, n_workers, busy1 - busy0)
    manifest = {
        "kind": INDEX_KIND, "schema_version": SCHEMA_VERSION, "epoch_id": epoch_id,
        "bits": bits, "max_evaluations": max_evaluations, "bucket_bits": b_bits,
        "rules": rule_info, "rule_order": list(rule_ids),
        "records": {"dir": os.fspath(store.root.resolve()), "count": store.count,
                    "shards_sha256": [s["sha256"] for s in store.manifest["shards"]]},
        "excluded_classes": sorted(excluded_classes),
        "fpr_per_authorization": tagset.false_positive_bound(
            max_evaluations, max([i["tags"] for i in rule_info.values()] + [1]), bits),
        "build": {"partitions": len(parts), "tasks": len(round1) + len(round2),
                  "workers": n_workers, "seconds": round(seconds, 3),
                  "cpu_seconds": round(cpu, 3), "partition_rows": partition_rows},
    }
    write_file_atomic(out / MANIFEST,
                      (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return EpochIndexInfo(out, epoch_id, bits, rule_info, store.count, len(parts),
                          len(round1) + len(round2), n_workers, seconds, cpu, manifest,
                          timeline)


# --- reading an index ---------------------------------------------------------------------


class EpochIndex:
    """An opened epoch index: streams tag-set chunks and answers fingerprint -> rows with one
    binary search in one memory-mapped bucket file (never the whole index in memory)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, root: Path | str) -> EpochIndex:
        root = Path(root)
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{root} holds no epoch index ({MANIFEST} missing)") \
                from None
        if manifest.get("kind") != INDEX_KIND or manifest.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{root / MANIFEST}: not a version-{SCHEMA_VERSION} epoch index")
        return cls(root, manifest)

    @property
    def epoch_id(self) -> str:
        return str(self.manifest["epoch_id"])

    @property
    def bits(self) -> int:
        return int(self.manifest["bits"])

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(self.manifest["rule_order"])

    @property
    def max_evaluations(self) -> int:
        return int(self.manifest["max_evaluations"])

    def _rule(self, rule: str) -> dict[str, Any]:
        info = self.manifest["rules"].get(rule)
        if info is None:
            raise KeyError(f"rule {rule!r} is not in epoch {self.epoch_id}'s index")
        return info  # type: ignore[no-any-return]

    def tags(self, rule: str) -> int:
        """Distinct fingerprints of the rule: the tag set's size."""
        return int(self._rule(rule)["tags"])

    def tagset_bytes(self, rule: str) -> int:
        return int(self._rule(rule)["tagset_bytes"])

    def tagset_chunks(self, rule: str) -> Iterator[bytes]:
        """The rule's tag-set chunks in fingerprint order, read one at a time."""
        self._rule(rule)
        for bucket in range(1 << int(self.manifest["bucket_bits"])):
            with open(self.root / rule / f"{_bucket_name(bucket)}.tags", "rb") as fh:
                while head := fh.read(_CHUNK_LEN.size):
                    (size,) = _CHUNK_LEN.unpack(head)
                    chunk = fh.read(size)
                    if len(chunk) != size:
                        raise ValueError(f"{fh.name}: truncated chunk")
                    yield chunk

    def rows_for(self, rule: str, fingerprint: int) -> list[int]:
        """Rows whose key under ``rule`` has this fingerprint (usually one, [] if none)."""
        self._rule(rule)
        if not 0 <= fingerprint < 1 << self.bits:
            return []
        key = tagset.from_ints([fingerprint])
        bucket = int(tagset.top_bits(key, self.bits, int(self.manifest["bucket_bits"]))[0])
        base = self.root / rule / _bucket_name(bucket)
        fps: npt.NDArray[Any] = np.load(f"{base}.fp.npy", mmap_mode="r")
        lo = int(np.searchsorted(fps, key, side="left")[0])
        hi = int(np.searchsorted(fps, key, side="right")[0])
        if hi == lo:
            return []
        rows: npt.NDArray[Any] = np.load(f"{base}.rows.npy", mmap_mode="r")
        return [int(r) for r in rows[lo:hi]]

    def rows_for_many(self, rule: str, fingerprints: tagset.Fingerprints) -> list[list[int]]:
        """:meth:`rows_for` of many fingerprints (a disclosure batch): each bucket they fall
        in is opened once and searched for all of them at once, so a batch costs one open per
        bucket touched rather than two file opens per fingerprint."""
        self._rule(rule)
        found: list[list[int]] = [[] for _ in range(fingerprints.size)]
        if not fingerprints.size:
            return found
        buckets = tagset.top_bits(fingerprints, self.bits, int(self.manifest["bucket_bits"]))
        for bucket in np.unique(buckets).tolist():
            chosen = np.flatnonzero(buckets == bucket)
            base = self.root / rule / _bucket_name(int(bucket))
            fps: npt.NDArray[Any] = np.load(f"{base}.fp.npy", mmap_mode="r")
            wanted = fingerprints[chosen]
            lo = np.searchsorted(fps, wanted, side="left")
            hi = np.searchsorted(fps, wanted, side="right")
            if not (hi > lo).any():
                continue
            rows: npt.NDArray[Any] = np.load(f"{base}.rows.npy", mmap_mode="r")
            for j, a, b in zip(chosen.tolist(), lo.tolist(), hi.tolist(), strict=True):
                if b > a:
                    found[j] = [int(r) for r in rows[a:b]]
        return found

    @property
    def disk_bytes(self) -> int:
        """Bytes of the index and tag sets on disk."""
        return sum(int(i["index_bytes"]) + int(i["tagset_bytes"])
                   for i in self.manifest["rules"].values())
