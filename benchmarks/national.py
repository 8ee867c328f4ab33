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

__all__ = ["main", "model_160m", "plaintext_join", "plaintext_triples", "run_national"]

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"
RESULTS = ROOT / "results" / "national"
MODEL_RECORDS = 160_000_000
DEFAULT_RULES = ("tin+dob", "first+last+dob+zip")
EPOCH = "bench-1"
#: Each service's group-operation processes in the online run: both parties share the
#: machine's cores, and each one's pool fills them while the other waits on the wire.
DEFAULT_SERVICE_WORKERS = os.cpu_count() or 1


def _column(columns: dict[str, list[str]], blank: list[str], name: str) -> list[str]:
    return columns.get(name, blank)


def plaintext_triples(records_dir: Path, queries_csv: Path, rules: Sequence[str], today: date,
                      excluded_classes: frozenset[str] = frozenset({"protected"})
                      ) -> tuple[dict[str, Any], set[tuple[str, str, str]]]:
    """The plaintext join: a summary (accepted queries, matches per rule, matched subjects)
    and every (query record id, custodian record id, rule) triple the private match must
    disclose.  Streamed over the store: memory holds the queries' keys and the holders of
    those keys only."""
    with open_csv(queries_csv) as fh:
        queries = load_query_csv(fh, today=today)[0]
    qkeys = bulk_match_keys(queries, rules, today=today)
    wanted = {r: {k for k in qkeys[r] if k is not None} for r in rules}
    holders: dict[str, dict[bytes, list[str]]] = {r: {} for r in rules}
    store = ShardedRecords.open(records_dir)
    cols = [c for c in key_columns(rules) if c in store.columns]
    excluded = set(store.excluded_rows.tolist())
    for first, table in store.iter_batches([*cols, "record_class", "record_id"],
                                           batch_rows=1 << 16):
        n = table.num_rows
        got = {c: [v or "" for v in table.column(c).to_pylist()] for c in cols}
        blank = [""] * n
        classes = table.column("record_class").to_pylist()
        ids = table.column("record_id").to_pylist()
        keys = match_keys_from_columns(partial(_column, got, blank), rules, today=today)
        for r in rules:
            hits = holders[r]
            want = wanted[r]
            for i, k in enumerate(keys[r]):
                if (k is not None and k in want and classes[i] not in excluded_classes
                        and first + i not in excluded):
                    hits.setdefault(k, []).append(ids[i])
    qids = queries.record_ids()
    triples = {(qids[i], rid, r)
               for r in rules for i, k in enumerate(qkeys[r])
               if k is not None for rid in holders[r].get(k, ())}
    by_rule = {r: sum(1 for k in qkeys[r] if k is not None and k in holders[r]) for r in rules}
    subjects = sum(1 for i in range(len(queries))
                   if any(qkeys[r][i] is not None and qkeys[r][i] in holders[r] for r in rules))
    return ({"accepted_queries": len(queries), "by_rule": by_rule,
             "matches": sum(by_rule.values()), "subjects": subjects,
             "pairs": len(triples)}, triples)


def plaintext_join(data: NationalData, rules: Sequence[str], today: date,
                   excluded_classes: frozenset[str] = frozenset({"protected"})
                   ) -> dict[str, Any]:
    """Which accepted queries hold a custodian key under each rule (the summary of
    :func:`plaintext_triples`)."""
    return plaintext_triples(data.records_dir, data.queries, rules, today, excluded_classes)[0]


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


def _probe_evaluate(n: int) -> float:
    """Wall seconds of ``n`` RFC 9497 Evaluates in this process: the build's kernel."""
    from protocol.crypto import oprf

    sk, _ = oprf.derive_key_pair(bytes(32), b"gated-psi/bench/parallel-probe")
    inputs = [b"probe-%d" % i for i in range(n)]
    t0 = time.perf_counter()
    oprf.evaluate_batch(sk, inputs)
    return time.perf_counter() - t0


def machine_parallelism(workers: int, n: int = 20_000) -> dict[str, Any]:
    """How much faster ``workers`` processes run the build's kernel than one, on this
    machine now: the ceiling of any K-worker build here (below K when the cores are shared
    with other work, or are hyperthreads of fewer physical cores)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_probe_evaluate, [200] * workers))  # start and import everywhere
        one = min(pool.submit(_probe_evaluate, n).result() for _ in range(2))
        t0 = time.perf_counter()
        list(pool.map(_probe_evaluate, [n] * workers))
        together = time.perf_counter() - t0
    return {"evaluates_per_process": n, "one_process_s": round(one, 3),
            f"{workers}_processes_s": round(together, 3),
            "speedup": round(workers * one / together, 3),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


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


def _online(data: NationalData, index_dir: Path, workdir: Path,
            service_workers: int | None) -> dict[str, Any]:
    try:
        module = importlib.import_module("benchmarks.national_online")
    except ImportError as exc:
        return {"status": f"not run: benchmarks.national_online unavailable ({exc})"}
    run_online: Callable[..., dict[str, Any]] = module.run_online
    result = run_online(data.records_dir, index_dir, data.queries, workdir, engine="oprf-epoch",
                        workers=service_workers)
    return {"status": "run", **result}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT.parent, check=False).stdout.strip()
    except OSError:
        return ""


def run_national(records: int, queries: int, workers: int, *, rules: Sequence[str],
                 max_evaluations: int, partition_rows: int, scaling: bool,
                 model_workers: int, online: bool, progress: bool,
                 service_workers: int | None = DEFAULT_SERVICE_WORKERS,
                 scaling_repeats: int = 1) -> dict[str, Any]:
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
        "offline_timeline": info.timeline,
        "peak_rss_build_tree": peak,
        "disk_bytes_records": store.disk_bytes, "disk_bytes_index": index.disk_bytes,
        "disk_bytes_per_record": round((store.disk_bytes + index.disk_bytes) / records, 2),
    }
    scaling_result: dict[str, Any] = {"status": "not run (pass --scaling)"}
    if scaling:
        # 1 worker, then K again, alternating: the best of each, so a load that comes and
        # goes on a shared machine biases neither side
        ones: list[EpochIndexInfo] = []
        many = [info]
        for rep in range(scaling_repeats):
            for n, out in ((1, ones), (workers, many)):
                if n == workers and rep == 0:
                    continue  # the main build above is the first K-worker build
                built, _ = _build(data, work / f"index-{n}", key_file, rules, n,
                                  max_evaluations, partition_rows, progress)
                shutil.rmtree(work / f"index-{n}")
                out.append(built)
        one, best = min(ones, key=lambda i: i.seconds), min(many, key=lambda i: i.seconds)
        scaling_result = {"status": "run", "repeats": scaling_repeats,
                          "machine_parallelism": machine_parallelism(workers),
                          "offline_s_1_worker": round(one.seconds, 2),
                          f"offline_s_{workers}_workers": round(best.seconds, 2),
                          "speedup": round(one.seconds / best.seconds, 3),
                          "offline_s_1_worker_all": [round(i.seconds, 2) for i in ones],
                          f"offline_s_{workers}_workers_all": [round(i.seconds, 2)
                                                               for i in many],
                          "offline_cpu_s_1_worker": round(one.cpu_seconds, 2),
                          f"offline_cpu_s_{workers}_workers": round(best.cpu_seconds, 2),
                          "timeline_1_worker": one.timeline,
                          f"timeline_{workers}_workers": best.timeline}
    merge = measure_merge(index, rules[0], min(queries, 1_280_000))
    online_result: dict[str, Any] = (_online(data, index_dir, work, service_workers) if online
                                     else {"status": "not run (--no-online)"})
    t1 = time.perf_counter()
    # the online run checks its stored results pair by pair against the plaintext join
    expected = online_result.get("expected_matches") or plaintext_join(data, rules, today)
    checked: dict[str, Any] = online_result.get("pair_check") or {}
    plaintext_s = checked.get("seconds") or round(time.perf_counter() - t1, 2)
    speedup = scaling_result.get("speedup")
    run: dict[str, Any] = {
        "command": " ".join(sys.argv), "commit": _commit(),
        "utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "loadavg_start": loadavg_start,
        "records": records, "queries": queries, "workers": workers, "rules": list(rules),
        "service_workers": service_workers,
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
        "pair_check": online_result.get("pair_check", {"status": "not run (no online run)"}),
        "plaintext_join_s": plaintext_s,
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
    parser.add_argument("--scaling-repeats", type=int, default=1,
                        help="with --scaling: 1-worker and K-worker builds, alternating, this "
                             "many times each; the best of each is compared")
    parser.add_argument("--model-workers", type=int, default=64,
                        help="cluster size of the 160M offline model")
    parser.add_argument("--service-workers", type=int, default=DEFAULT_SERVICE_WORKERS,
                        help="each service's --workers in the online run (0: no pool)")
    parser.add_argument("--no-online", action="store_true",
                        help="skip the online authorization")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    run = run_national(args.records, args.queries, args.workers,
                       rules=[r for r in args.rules.split(",") if r],
                       max_evaluations=args.max_evaluations,
                       partition_rows=args.partition_rows, scaling=args.scaling,
                       model_workers=args.model_workers, online=not args.no_online,
                       progress=not args.quiet,
                       service_workers=args.service_workers or None,
                       scaling_repeats=max(args.scaling_repeats, 1))
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
