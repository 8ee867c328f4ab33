"""``make bench-national``: the national custodian end to end (docs/national-custodian.md).

1. Generate (or reuse, under ``benchmarks/data/national-<N>x<M>/``) the custodian straight
   into Parquet shards and the requester's queries (``benchmarks.national_gen``).
2. Build the epoch index on a Dask LocalCluster of ``--workers`` workers, timed, with the
   workers' CPU (summed task CPU) and the peak RSS of the runner's process tree; with
   ``--scaling`` build it again on one worker to measure the 1-to-K speedup.
3. Work out the plaintext join (which queries should match, per rule), streaming the store.
4. Decode and merge one tag set locally to measure the requester's per-tag cost.
5. Run one authorization online over gRPC/mTLS through ``benchmarks.national_online``
   (``run_online``), when that module is present.
6. Write ``benchmarks/results/national/<UTC time>.json`` with the measured figures and a
   model for 160M records on this machine and on a K-worker cluster, from the measured
   per-record costs.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.national_gen import NationalData, generate_national
from benchmarks.scale import TreeSampler
from protocol.adapters.epoch_index import (
    DEFAULT_MAX_EVALUATIONS,
    DEFAULT_PARTITION_ROWS,
    EpochIndex,
    EpochIndexInfo,
    build_epoch_index,
    key_columns,
    write_epoch_key,
)
from protocol.adapters.files import make_private_dir, open_csv, write_secret
from protocol.adapters.shards import ShardedRecords
from protocol.cli.help import HelpfulParser
from protocol.crypto import tagset
from protocol.domain.records import match_keys_from_columns
from protocol.domain.recordstore import bulk_match_keys, load_query_csv

__all__ = ["main", "model_160m", "plaintext_join", "run_national"]

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"
RESULTS = ROOT / "results" / "national"
MODEL_RECORDS = 160_000_000
DEFAULT_RULES = ("tin+dob", "first+last+dob+zip")
EPOCH = "bench-1"


def _column(columns: dict[str, list[str]], blank: list[str], name: str) -> list[str]:
    return columns.get(name, blank)


def plaintext_join(data: NationalData, rules: Sequence[str], today: date,
                   excluded_classes: frozenset[str] = frozenset({"protected"})
                   ) -> dict[str, Any]:
    """Which accepted queries hold a custodian key under each rule (streamed over the store;
    memory holds the queries' keys only)."""
    with open_csv(data.queries) as fh:
        queries = load_query_csv(fh, today=today)[0]
    qkeys = bulk_match_keys(queries, rules, today=today)
    wanted = {r: {k for k in qkeys[r] if k is not None} for r in rules}
    present: dict[str, set[bytes]] = {r: set() for r in rules}
    store = ShardedRecords.open(data.records_dir)
    cols = [c for c in key_columns(rules) if c in store.columns]
    excluded = set(store.excluded_rows.tolist())
    for first, table in store.iter_batches([*cols, "record_class"], batch_rows=1 << 16):
        n = table.num_rows
        got = {c: [v or "" for v in table.column(c).to_pylist()] for c in cols}
        blank = [""] * n
        classes = table.column("record_class").to_pylist()
        keys = match_keys_from_columns(partial(_column, got, blank), rules, today=today)
        for r in rules:
            hits = present[r]
            want = wanted[r]
            for i, k in enumerate(keys[r]):
                if (k is not None and k in want and classes[i] not in excluded_classes
                        and first + i not in excluded):
                    hits.add(k)
    by_rule = {r: sum(1 for k in qkeys[r] if k is not None and k in present[r]) for r in rules}
    subjects = sum(1 for i in range(len(queries))
                   if any(qkeys[r][i] is not None and qkeys[r][i] in present[r] for r in rules))
    return {"accepted_queries": len(queries), "by_rule": by_rule, "subjects": subjects}


def measure_merge(index: EpochIndex, rule: str, requester_fps: int) -> dict[str, float]:
    """Decode a whole tag set and stream-merge it with ``requester_fps`` random fingerprints:
    the requester's per-tag cost, measured here."""
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 2**63, size=(requester_fps, 2), dtype=np.uint64)
    shift = 128 - index.bits
    values = [((int(a) << 64 | int(b)) << 1) >> shift for a, b in raw.tolist()]
    ours, positions = tagset.sort_with_positions(tagset.from_ints(values))
    t0 = time.perf_counter()
    blocks = tagset.decode_chunks(index.tagset_chunks(rule), bits=index.bits,
                                  max_tags=index.tags(rule))
    hits = sum(1 for _ in tagset.merge_matches(ours, positions, blocks))
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "tags": index.tags(rule), "random_hits": hits,
            "seconds_per_tag": seconds / max(index.tags(rule), 1)}


def model_160m(records: int, offline: dict[str, Any], online: dict[str, Any],
               merge: dict[str, float], rules: int, workers: int, model_workers: int,
               speedup: float | None, max_evaluations: int) -> dict[str, Any]:
    """160M records from the measured per-record costs (linear in records)."""
    factor = MODEL_RECORDS / records
    cpu_per_record = offline["offline_cpu_s"] / records
    efficiency = (speedup / workers) if speedup else 1.0
    bits = tagset.fingerprint_bits(max_evaluations, MODEL_RECORDS)
    k = tagset.rice_parameter(bits, MODEL_RECORDS)
    extra_tags = (MODEL_RECORDS - records) * rules
    online_s = online.get("online_s")
    return {
        "records": MODEL_RECORDS,
        "basis": "measured per-record costs at this run's size, scaled linearly",
        "offline_cpu_s_per_record": cpu_per_record,
        "offline_s_here": round(offline["offline_s"] * factor, 1),
        f"offline_s_{model_workers}_workers_ideal": round(
            MODEL_RECORDS * cpu_per_record / model_workers, 1),
        f"offline_s_{model_workers}_workers_at_measured_efficiency": round(
            MODEL_RECORDS * cpu_per_record / (model_workers * efficiency), 1),
        "parallel_efficiency_measured": round(efficiency, 3) if speedup else None,
        "offline_s_here_unloaded": round(MODEL_RECORDS * cpu_per_record / (os.cpu_count() or 1),
                                         1),
        "fingerprint_bits": bits,
        "rice_parameter": k,
        "bytes_per_record_per_rule_expected": round((k + 2.5) / 8, 3),
        "tagset_bytes_total_expected": round(MODEL_RECORDS * rules * (k + 2.5) / 8),
        "requester_tag_merge_s": round(merge["seconds_per_tag"] * MODEL_RECORDS * rules, 1),
        "online_s_here": (round(online_s + merge["seconds_per_tag"] * extra_tags, 1)
                          if isinstance(online_s, int | float) else None),
        "disk_bytes": round(offline["disk_bytes_per_record"] * MODEL_RECORDS),
    }


def _build(data: NationalData, out: Path, key_file: Path, rules: Sequence[str], workers: int,
           max_evaluations: int, partition_rows: int, progress: bool
           ) -> tuple[EpochIndexInfo, int]:
    if out.exists():
        shutil.rmtree(out)
    with TreeSampler(interval=0.5) as sampler:
        sampler.watch("runner", os.getpid())
        info = build_epoch_index(data.records_dir, out, epoch_id=EPOCH, rules=rules,
                                 key_file=key_file, max_evaluations=max_evaluations,
                                 workers=workers, partition_rows=partition_rows,
                                 excluded_classes={"protected"}, progress=progress)
        peak = sampler.peak_tree_rss["runner"]
    return info, peak


def _online(data: NationalData, index_dir: Path, workdir: Path) -> dict[str, Any]:
    try:
        module = importlib.import_module("benchmarks.national_online")
    except ImportError as exc:
        return {"status": f"not run: benchmarks.national_online unavailable ({exc})"}
    run_online: Callable[..., dict[str, Any]] = module.run_online
    result = run_online(data.records_dir, index_dir, data.queries, workdir, engine="oprf-epoch")
    return {"status": "run", **result}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT.parent, check=False).stdout.strip()
    except OSError:
        return ""


def run_national(records: int, queries: int, workers: int, *, rules: Sequence[str],
                 max_evaluations: int, partition_rows: int, scaling: bool,
                 model_workers: int, online: bool, progress: bool) -> dict[str, Any]:
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    today = date.today()
    t0 = time.perf_counter()
    data = generate_national(records, queries, DATA / f"national-{records}x{queries}",
                             progress=progress)
    generate_s = time.perf_counter() - t0
    work = make_private_dir(DATA / f"national-{records}x{queries}" / "run")
    secrets = make_private_dir(work / "secrets")
    master = os.urandom(32)
    write_secret(secrets / "master.secret", master.hex().encode(), force=True)
    key_file = secrets / f"epoch-{EPOCH}.key"
    write_epoch_key(key_file, master, EPOCH, force=True)

    index_dir = work / "index"
    info, peak = _build(data, index_dir, key_file, rules, workers, max_evaluations,
                        partition_rows, progress)
    store = ShardedRecords.open(data.records_dir)
    index = EpochIndex.open(index_dir)
    tag_bytes = {r: index.tagset_bytes(r) for r in rules}
    offline = {
        "offline_s": round(info.seconds, 2), "offline_cpu_s": round(info.cpu_seconds, 2),
        "tasks": info.tasks, "partitions": info.partitions,
        "peak_rss_build_tree": peak,
        "disk_bytes_records": store.disk_bytes, "disk_bytes_index": index.disk_bytes,
        "disk_bytes_per_record": round((store.disk_bytes + index.disk_bytes) / records, 2),
    }
    scaling_result: dict[str, Any] = {"status": "not run (pass --scaling)"}
    if scaling:
        one, _ = _build(data, work / "index-1", key_file, rules, 1, max_evaluations,
                        partition_rows, progress)
        shutil.rmtree(work / "index-1")
        scaling_result = {"status": "run", "offline_s_1_worker": round(one.seconds, 2),
                          f"offline_s_{workers}_workers": round(info.seconds, 2),
                          "speedup": round(one.seconds / info.seconds, 3),
                          "offline_cpu_s_1_worker": round(one.cpu_seconds, 2)}
    t1 = time.perf_counter()
    expected = plaintext_join(data, rules, today)
    plaintext_s = time.perf_counter() - t1
    merge = measure_merge(index, rules[0], min(queries, 1_280_000))
    online_result = (_online(data, index_dir, work) if online
                     else {"status": "not run (--no-online)"})
    speedup = scaling_result.get("speedup")
    run: dict[str, Any] = {
        "command": " ".join(sys.argv), "commit": _commit(),
        "utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "loadavg_start": loadavg_start,
        "records": records, "queries": queries, "workers": workers, "rules": list(rules),
        "epoch": EPOCH, "max_evaluations": max_evaluations,
        "fingerprint_bits": index.bits,
        "fpr_formula": "P <= E * N / 2^L, L = 40 + ceil(log2 E_max) + ceil(log2 N_max)",
        "fpr_per_authorization": tagset.false_positive_bound(
            max_evaluations, max(index.tags(r) for r in rules), index.bits),
        "generate_s": round(generate_s, 2),
        **offline,
        "tags": {r: index.tags(r) for r in rules},
        "tagset_bytes": tag_bytes,
        "tagset_bytes_per_record_per_rule": {r: round(b / records, 3)
                                             for r, b in tag_bytes.items()},
        "bytes_per_record_per_rule": online_result.get(
            "bytes_per_record_per_rule",
            round(sum(tag_bytes.values()) / (records * len(rules)), 3)),
        "online": online_result,
        "online_s": online_result.get("online_s"),
        "peak_rss_custodian": online_result.get("peak_rss_custodian"),
        "peak_rss_requester": online_result.get("peak_rss_requester"),
        "matches": online_result.get("matches"),
        "expected_matches": expected,
        "plaintext_join_s": round(plaintext_s, 2),
        "requester_merge": merge,
        "scaling": scaling_result,
        "model_160m": model_160m(records, offline, online_result, merge, len(rules), workers,
                                 model_workers, speedup if isinstance(speedup, float) else None,
                                 max_evaluations),
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = HelpfulParser(prog="python -m benchmarks.national", description=(
        "The national custodian benchmark: generate RECORDS custodian records into shards "
        "and QUERIES queries, build the epoch index on a Dask LocalCluster, run one "
        "authorization online, and write benchmarks/results/national/<UTC time>.json."))
    parser.add_argument("--records", type=int, default=10_000_000, help="custodian records")
    parser.add_argument("--queries", type=int, default=1_280_000, help="requester queries")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers for the build")
    parser.add_argument("--rules", default=",".join(DEFAULT_RULES),
                        help="comma-separated match rules to index")
    parser.add_argument("--max-evaluations", type=int, default=DEFAULT_MAX_EVALUATIONS,
                        help="E_max the fingerprints are sized for")
    parser.add_argument("--partition-rows", type=int, default=DEFAULT_PARTITION_ROWS,
                        help="records per build task")
    parser.add_argument("--scaling", action="store_true",
                        help="also build on one worker and report the speedup")
    parser.add_argument("--model-workers", type=int, default=64,
                        help="cluster size of the 160M offline model")
    parser.add_argument("--no-online", action="store_true",
                        help="skip the online authorization")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    run = run_national(args.records, args.queries, args.workers,
                       rules=[r for r in args.rules.split(",") if r],
                       max_evaluations=args.max_evaluations,
                       partition_rows=args.partition_rows, scaling=args.scaling,
                       model_workers=args.model_workers, online=not args.no_online,
                       progress=not args.quiet)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: run[k] for k in ("records", "queries", "workers", "offline_s",
                                          "offline_cpu_s", "online_s",
                                          "bytes_per_record_per_rule",
                                          "fpr_per_authorization", "disk_bytes_per_record")}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
