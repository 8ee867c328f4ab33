"""One authorization online against a national custodian (docs/architecture.md, National
custodian): the online half of ``make bench-national`` (``benchmarks.national`` calls
:func:`run_online` after its offline build).

Both real services run as separate processes over mutual TLS, as an operator would run them:
``agency-b serve --records-store DIR --epoch-index DIR`` (records out of core, policy in epoch
mode) and ``agency-a serve``; one ``agency-a match --engine oprf-epoch`` job then fetches the
epoch's tag set (accounted by the custodian), evaluates the queries under the budget, merges
from disk and has its matches disclosed.  Measured: the job's wall time (``online_s``, tag-set
fetch included), bytes on the wire per custodian record per rule (the tag set alone, and all
custodian-to-requester bytes), peak RSS of each service process (psutil, sampled), matches.

Run it on its own against an existing build::

    python -m benchmarks.national_online --records DIR --index DIR --queries CSV --work DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.national import DEFAULT_SERVICE_WORKERS, plaintext_triples
from benchmarks.scale import (
    PY,
    REPO,
    SERVICE_START_TIMEOUT,
    TreeSampler,
    _cli,
    _stop,
    _wait_port,
    setup_identities,
    stored_triples,
)
from protocol.adapters.epoch_index import EpochIndex
from protocol.adapters.files import open_private_log
from protocol.adapters.shards import ShardedRecords
from protocol.cli.help import HelpfulParser
from protocol.crypto import tagset
from protocol.domain.engine import Engine

#: Examples of missing or extra pairs kept in the run file.
MISMATCH_EXAMPLES = 3


def _credentials(work: Path, master_file: Path, index: EpochIndex, engine: str,
                 queries_evaluations: int) -> tuple[Path, Path]:
    """Authority, dev PKI, both agencies' secrets (the custodian's master secret is the one
    the index was built from), an epoch-mode policy and one authorization; returns
    (policy, authorization) paths."""
    if not (work / "certs").exists():
        setup_identities(work)
    shutil.copyfile(master_file, work / "agency-b" / "secrets" / "master.secret")
    policy = work / "agency-b" / "policy.json"
    _cli(["protocol.cli.authority", "policy-template", "--custodian", "agency-b",
          "--trust", str(work / "authority" / "authority.pub.json"), "--engines", engine,
          "--out", str(policy), "--force"])
    doc = json.loads(policy.read_text())
    doc.update({"index_mode": "epoch", "epoch_id": index.epoch_id,
                "epoch_max_evaluations": index.max_evaluations, "allowed_tiers": ["identity"],
                # what the build left out, the policy excludes too (checked per disclosure)
                "excluded_record_classes": sorted(index.manifest.get("excluded_classes", [])),
                "max_session_queries": max(queries_evaluations, 1)})
    policy.write_text(json.dumps(doc, indent=2))
    auth = work / "national.auth.json"
    _cli(["protocol.cli.authority", "issue", "--key", str(work / "authority" / "authority.key"),
          "--requester", "agency-a", "--custodian", "agency-b",
          "--statute", "26 U.S.C. 6103(i)(2)", "--purpose", "national benchmark",
          "--rules", ",".join(index.rules), "--fields", "address,city,state,zip",
          "--max-evaluations", str(queries_evaluations),
          "--max-disclosures", str(max(queries_evaluations, 1)),
          "--valid-days", "2", "--retention-days", "1", "--engines", engine,
          "--out", str(auth), "--force"])
    return policy, auth


def _count_queries(queries_csv: Path) -> int:
    with queries_csv.open("rb") as fh:
        return max(sum(1 for _ in fh) - 1, 0)


def pair_check(got: set[tuple[str, str, str]], want: set[tuple[str, str, str]]
               ) -> dict[str, Any]:
    """Pair-level correctness: the disclosed (query, record, rule) triples equal the
    plaintext join's, else how many are missing or extra, with a few examples."""
    missing, extra = sorted(want - got), sorted(got - want)
    # A (query, rule) match releases one record; a key two custodian records share leaves
    # the other holder undisclosed: counted apart from matches that were missed outright.
    disclosed = {(q, r) for q, _rid, r in got}
    other_holder = sum(1 for q, _rid, r in missing if (q, r) in disclosed)
    return {"pairs": len(got), "expected_pairs": len(want),
            "pairs_equal": not missing and not extra,
            "missing_pairs": len(missing), "extra_pairs": len(extra),
            "missing_pairs_of_a_disclosed_match": other_holder,
            "mismatch_examples": [list(t) for t in (missing[:MISMATCH_EXAMPLES]
                                                    + extra[:MISMATCH_EXAMPLES])]}


def _read_results(a_port: int, work: Path, job_id: str) -> list[dict[str, Any]]:
    """Every stored result row of the job, through the requester service (a logged read)."""
    got = subprocess.run([
        PY, "-m", "agency_a.cli", "results", "--server", f"127.0.0.1:{a_port}",
        "--certs", str(work / "certs"), "--operator", "bench", "--job", job_id,
        "--purpose", "benchmark pair check against the plaintext join",
        "--format", "json", "--limit", "0"],
        text=True, capture_output=True, check=False, cwd=REPO, timeout=1800)
    if got.returncode != 0:
        raise RuntimeError(f"agency-a results failed: {got.stderr[-2000:]}{got.stdout[-2000:]}")
    rows: list[dict[str, Any]] = json.loads(got.stdout)
    return rows


def run_online(records_dir: Path | str, index_dir: Path | str, queries_csv: Path | str,
               workdir: Path | str, *, engine: str = Engine.OPRF_EPOCH,
               workers: int | None = None, check: bool = True,
               chunk_size: int | None = None) -> dict[str, Any]:
    """Start both services over mTLS, run one authorization, return what was measured.

    ``workers``: each service's ``--workers`` (group-operation processes; None: none).
    ``chunk_size``: the requester service's ``--chunk-size`` (elements per evaluated chunk;
    None: its default).  Each chunk costs the custodian two ledger commits.
    ``check``: read the stored results back and compare them, pair by pair, with the
    plaintext join of the same files (``expected_matches``, ``pair_check``); the join is
    worked out after the services stop, so it is not in any measured time.

    ``workdir`` holds ``secrets/master.secret`` (the master secret the index's epoch key was
    derived from, as ``benchmarks.national`` writes it); everything else is created under
    ``workdir/online``.
    """
    records_dir, index_dir = Path(records_dir), Path(index_dir)
    queries_csv, workdir = Path(queries_csv), Path(workdir)
    index = EpochIndex.open(index_dir)
    records = ShardedRecords.open(records_dir).count
    rules = index.rules
    queries = _count_queries(queries_csv)
    evaluations = queries * len(rules)
    work = workdir / "online"
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    policy, auth = _credentials(work, workdir / "secrets" / "master.secret", index, engine,
                                evaluations)
    run_dir = work / f"run-{int(time.time())}"
    b_dir, a_dir = run_dir / "agency-b", run_dir / "agency-a"
    b_dir.mkdir(parents=True)
    a_dir.mkdir(parents=True)
    summary_path = run_dir / "summary.json"
    pool = ["--workers", str(workers)] if workers else []
    chunks = ["--chunk-size", str(chunk_size)] if chunk_size else []
    procs: list[subprocess.Popen[bytes]] = []
    with TreeSampler() as sampler:
        try:
            with open_private_log(b_dir / "service.log") as b_log:
                b = subprocess.Popen([
                    PY, "-m", "agency_b.cli", "serve", "--records-store", str(records_dir),
                    "--epoch-index", str(index_dir), "--policy", str(policy),
                    "--ledger", str(b_dir / "ledger.sqlite"),
                    "--secrets", str(work / "agency-b" / "secrets"),
                    "--certs", str(work / "certs"), "--listen", "127.0.0.1:0",
                    "--port-file", str(b_dir / "port"),
                    "--requester-key",
                    f"agency-a={work / 'agency-a' / 'secrets' / 'signing.pub.json'}",
                    "--log-level", "warning", *pool], stderr=b_log, cwd=REPO)
            procs.append(b)
            sampler.watch("b", b.pid)
            with open_private_log(a_dir / "service.log") as a_log:
                a = subprocess.Popen([
                    PY, "-m", "agency_a.cli", "serve", "--certs", str(work / "certs"),
                    "--secrets", str(work / "agency-a" / "secrets"),
                    "--data", str(a_dir / "data"), "--listen", "127.0.0.1:0",
                    "--port-file", str(a_dir / "port"), "--custodian-key",
                    f"agency-b={work / 'agency-b' / 'secrets' / 'signing.pub.json'}",
                    "--log-level", "warning", *pool, *chunks], stderr=a_log, cwd=REPO)
            procs.append(a)
            sampler.watch("a", a.pid)
            b_port = _wait_port(b_dir / "port", b, SERVICE_START_TIMEOUT)
            a_port = _wait_port(a_dir / "port", a, SERVICE_START_TIMEOUT)
            t0 = time.perf_counter()
            proc = subprocess.run([
                PY, "-m", "agency_a.cli", "match", "--server", f"127.0.0.1:{a_port}",
                "--certs", str(work / "certs"), "--operator", "bench",
                "--authorization", str(auth), "--queries", str(queries_csv),
                "--custodian", f"127.0.0.1:{b_port}", "--summary-json", str(summary_path),
                "--no-progress", "--show-refused", "0", "--engine", engine,
            ], text=True, capture_output=True, check=False, cwd=REPO)
            e2e = time.perf_counter() - t0
            sampler.sample()
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            rows = (_read_results(a_port, work, summary["job_id"])
                    if check and proc.returncode == 0 and "job_id" in summary else None)
        finally:
            for p in reversed(procs):
                _stop(p)
    if proc.returncode != 0 or "failed" in summary or "wall_seconds" not in summary:
        raise RuntimeError(f"agency-a match failed: {summary.get('failed', '')}\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    phase_down = {k: int(v) for k, v in summary.get("phase_bytes_b_to_a", {}).items()}
    tagset_bytes = phase_down.get("tagset", 0)
    entries = records * len(rules)
    tags = max(index.tags(r) for r in rules)
    correctness: dict[str, Any] = {"expected_matches": None,
                                   "pair_check": {"status": "not run (check=False)"}}
    if rows is not None:
        t1 = time.perf_counter()
        # the services' view: the index's exclusions, today's date
        expected, want = plaintext_triples(
            records_dir, queries_csv, rules, dt.date.today(),
            frozenset(index.manifest.get("excluded_classes", [])))
        got = stored_triples(rows, work, auth, {t[1] for t in want})
        correctness = {"expected_matches": expected,
                       "pair_check": {**pair_check(got, want),
                                      "checked": "(query, custodian record, rule) of every "
                                                 "stored result row against the plaintext join",
                                      "seconds": round(time.perf_counter() - t1, 2)}}
        correctness["matches_agree_with_plaintext"] = correctness["pair_check"]["pairs_equal"]
    return {
        "engine": engine, "service_workers": workers, "chunk_size": chunk_size,
        "records": records, "queries": queries, "rules": list(rules),
        "online_s": round(float(summary["wall_seconds"]), 3),
        "online_e2e_s": round(e2e, 3),
        "phases_s": summary.get("phase_seconds", {}),
        "tagset_bytes": tagset_bytes,
        "bytes_per_record_per_rule": round(tagset_bytes / max(entries, 1), 3),
        "all_bytes_b_to_a_per_record_per_rule": round(
            int(summary["bytes_b_to_a"]) / max(entries, 1), 3),
        "bytes_a_to_b": int(summary["bytes_a_to_b"]),
        "bytes_b_to_a": int(summary["bytes_b_to_a"]),
        "phase_bytes_b_to_a": phase_down,
        "fingerprint_bits": index.bits,
        "fpr_per_authorization": tagset.false_positive_bound(evaluations, tags, index.bits),
        "peak_rss_custodian": sampler.peak_rss["b"],
        "peak_rss_requester": sampler.peak_rss["a"],
        "peak_rss_tree_custodian": sampler.peak_tree_rss["b"],
        "peak_rss_tree_requester": sampler.peak_tree_rss["a"],
        # without the memory-mapped files' pages (row files, index buckets, tag-set cache)
        "peak_anon_rss_custodian": sampler.peak_anon_rss["b"],
        "peak_anon_rss_requester": sampler.peak_anon_rss["a"],
        "elements_evaluated": int(summary["elements_evaluated"]),
        "matches": int(summary["matches"]),
        "matched_queries": int(summary["matched_queries"]),
        "disclosed_records": int(summary.get("disclosed_records", 0)),
        **correctness,
    }


def main(argv: list[str] | None = None) -> int:
    p: argparse.ArgumentParser = HelpfulParser(
        prog="python -m benchmarks.national_online",
        description="Run one oprf-epoch authorization over gRPC/mTLS against an epoch index "
                    "and print the measurements as JSON.")
    p.add_argument("--records", required=True, help="sharded record store directory")
    p.add_argument("--index", required=True, help="epoch index directory (agency-b build-index)")
    p.add_argument("--queries", required=True, help="requester query CSV")
    p.add_argument("--work", required=True,
                   help="work directory holding secrets/master.secret of the index's epoch key")
    p.add_argument("--engine", default=Engine.OPRF_EPOCH.value,
                   help="match engine of the session")
    p.add_argument("--service-workers", type=int, default=DEFAULT_SERVICE_WORKERS,
                   help="each service's --workers (group-operation processes; 0: none)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="elements per evaluated chunk (the requester service's --chunk-size; "
                        "default: the service's own)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the pair-level check against the plaintext join")
    args = p.parse_args(argv)
    print(json.dumps(run_online(args.records, args.index, args.queries, args.work,
                                engine=args.engine, workers=args.service_workers or None,
                                check=not args.no_check, chunk_size=args.chunk_size),
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
