"""Cost of verifiable evaluation (issue 18): RFC 9497 POPRF proofs against mode 0.

``python -m benchmarks.verifiable_cost --sizes 100000`` measures, in one run on one machine:

* per element, the median over ``--repeats`` of: a proof over one chunk (GenerateProof with
  ComputeCompositesFast, the custodian), its verification (VerifyProof with
  ComputeComposites, the requester), and for scale the mode-0 and POPRF evaluations;
* end to end, one identity session in mode 0 and one under a pinned evaluation key, in
  process on the same worker pool (the custodian's index build included, as at open): wall
  seconds and CPU seconds of this process and its pool workers, with the load average
  before and after each run (the machine may be shared).

Sizes are those of the benchmark scenario (docs/architecture.md, Benchmark scenario):
``N`` is N x N, and 1300000 is the headline 1.28M queries x 1.3M records.  One JSON run file
is written to ``benchmarks/results/verifiable/<UTC time>.json``; a markdown table is printed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from benchmarks.scale import _git, _machine, ensure_scenario, scenario_spec
from protocol.adapters.pools import BatchPool
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli.help import HelpfulParser
from protocol.crypto import oprf
from protocol.domain.messages import DEFAULT_CHUNK
from protocol.engines.base import evaluation_info, evaluation_key_pair
from protocol.policy import decide as P
from protocol.policy.authority import draft_authorization
from protocol.sessions.identity import Custodian, CustodianConfig, RequesterSession, run_in_process

RULE = "tin+dob"
RESULTS = Path("benchmarks/results/verifiable")


def _median_per_element(fn: Callable[[], object], n: int, repeats: int) -> float:
    """Median over ``repeats`` of the seconds one call takes, divided by its ``n`` elements."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def measure_proofs(chunk: int, repeats: int) -> dict[str, float]:
    """Per-element seconds of the proof and evaluation steps over one chunk, single core."""
    sk, pk = evaluation_key_pair(os.urandom(32))
    info = evaluation_info("auth-benchmark")
    inputs = [b"benchmark-%d" % i for i in range(chunk)]
    _, blinded_buffer = oprf.poprf_blind_batch(inputs)
    blinded = oprf.split_elements(blinded_buffer)
    key = oprf.poprf_evaluation_key(sk, info)
    evaluated_buffer = oprf.blind_evaluate_batch(key, blinded_buffer)
    evaluated = oprf.split_elements(evaluated_buffer)
    proof = oprf.poprf_prove(sk, info, blinded, evaluated)
    tweaked = oprf.poprf_tweaked_key(pk, info)
    assert oprf.poprf_verify(tweaked, blinded, evaluated, proof)
    mode0_key = oprf.derive_key_pair(os.urandom(32), b"benchmark")[0]
    return {
        "chunk_elements": chunk,
        "repeats": repeats,
        "proof_generation_s_per_element": _median_per_element(
            lambda: oprf.poprf_prove(sk, info, blinded, evaluated), chunk, repeats),
        "proof_verification_s_per_element": _median_per_element(
            lambda: oprf.poprf_verify(tweaked, blinded, evaluated, proof), chunk, repeats),
        "mode0_blind_evaluate_s_per_element": _median_per_element(
            lambda: oprf.blind_evaluate_batch(mode0_key, blinded_buffer), chunk, repeats),
        "poprf_blind_evaluate_s_per_element": _median_per_element(
            lambda: oprf.blind_evaluate_batch(key, blinded_buffer), chunk, repeats),
        "mode0_evaluate_s_per_element": _median_per_element(
            lambda: oprf.evaluate_batch(mode0_key, inputs), chunk, repeats),
        "poprf_evaluate_s_per_element": _median_per_element(
            lambda: oprf.poprf_evaluate_batch(sk, inputs, info), chunk, repeats),
    }


def _authorization(key: Ed25519PrivateKey, n: int, evaluation_key: bytes | None
                   ) -> P.SignedAuthorization:
    now = int(time.time())
    auth = draft_authorization(
        authority_key=key, requester_id="agency-a", custodian_id="agency-b",
        statute="26 U.S.C. 6103(i)(2)", purpose="benchmark", tier=P.Tier.IDENTITY,
        max_evaluations=n, max_disclosures=n, match_rules=(RULE,), disclosure_fields=("zip",),
        retention_days=1, not_before=now - 60, not_after=now + 86400,
        evaluation_key=evaluation_key)
    return P.sign_authorization(auth, key)


def _cpu_seconds(proc: psutil.Process) -> float:
    """CPU seconds of this process and every live child (the pool's workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def run_session(records: Any, queries: Any, pool: BatchPool, work: Path, verifiable: bool,
                chunk: int) -> dict[str, Any]:
    """One identity session end to end in process; the custodian is fresh (index at open)."""
    authority = Ed25519PrivateKey.generate()
    requester_key = Ed25519PrivateKey.generate()
    master = os.urandom(32)
    policy = P.CustodianPolicy(
        custodian_id="agency-b",
        trusted_authorities={P.authority_key_id(authority.public_key()): authority.public_key()},
        max_session_queries=max(len(queries), 1))
    ledger = Ledger(work / f"ledger-{'v' if verifiable else '0'}.sqlite")
    custodian = Custodian(CustodianConfig(
        policy=policy, records=records, ledger=ledger, master_secret=master,
        signing_key=Ed25519PrivateKey.generate(),
        requester_keys={"agency-a": requester_key.public_key()}, ops=pool))
    pinned = evaluation_key_pair(master)[1] if verifiable else None
    signed = _authorization(authority, len(queries), pinned)
    load_before = os.getloadavg()
    me = psutil.Process()
    cpu0, t0 = _cpu_seconds(me), time.perf_counter()
    session = RequesterSession(signed, queries, match_rules=(RULE,), ops=pool,
                               signing_key=requester_key, chunk_size=chunk)
    outcome = run_in_process(session, custodian.session(), requester_id="agency-a")
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds(me) - cpu0
    ledger.close()
    return {"verifiable": verifiable, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "elements": session.element_count, "matches": len(outcome.matches),
            "disclosed": len(outcome.results),
            "chunks": -(-session.element_count // min(chunk, oprf.MAX_PROOF_ELEMENTS)),
            "proofs_verified": session.evaluation_proofs_verified,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def markdown(run: dict[str, Any]) -> str:
    """The run as the markdown tables the report quotes."""
    micro = run["per_element"]
    lines = ["| step (single core, per element) | microseconds |", "|---|---:|"]
    for key, label in (
            ("proof_generation_s_per_element", "proof generation (custodian)"),
            ("proof_verification_s_per_element", "proof verification (requester)"),
            ("mode0_blind_evaluate_s_per_element", "mode-0 blind evaluation"),
            ("poprf_blind_evaluate_s_per_element", "POPRF blind evaluation"),
            ("mode0_evaluate_s_per_element", "mode-0 index evaluation"),
            ("poprf_evaluate_s_per_element", "POPRF index evaluation")):
        lines.append(f"| {label} | {micro[key] * 1e6:.1f} |")
    lines += ["", "| size | mode | elements | matches | wall s | CPU s | wall overhead | "
              "CPU overhead | load avg before/after |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for size in run["end_to_end"]:
        base = size["runs"][0]
        for r in size["runs"]:
            mode = "verifiable" if r["verifiable"] else "mode 0"
            over_w = f"{r['wall_s'] / base['wall_s'] - 1:+.0%}" if r["verifiable"] else ""
            over_c = f"{r['cpu_s'] / base['cpu_s'] - 1:+.0%}" if r["verifiable"] else ""
            lines.append(f"| {size['queries']:,} x {size['records']:,} | {mode} | "
                         f"{r['elements']:,} | {r['matches']:,} | {r['wall_s']:.1f} | "
                         f"{r['cpu_s']:.1f} | {over_w} | {over_c} | "
                         f"{r['load_average_before'][0]:.2f} / {r['load_average_after'][0]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = HelpfulParser(prog="python -m benchmarks.verifiable_cost",
                       description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000",
                    help="comma-separated sizes (N x N; 1300000 is the headline 1.28M x "
                         "1.3M); "
                         "empty for the per-element figures only")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of each per-element figure")
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                    help="elements per evaluated chunk (one proof each)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="worker processes of the pool both sides use")
    ap.add_argument("--data", default="benchmarks/data", help="scenario cache directory")
    ap.add_argument("--out-dir", default=str(RESULTS), help="directory of the JSON run files")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    run: dict[str, Any] = {"started": started.isoformat(), "machine": _machine(), "git": _git(),
                           "workers": args.workers, "rule": RULE,
                           "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    console.log("per-element proof costs")
    run["per_element"] = measure_proofs(args.chunk, args.repeats)
    run["end_to_end"] = []
    today = date.today()
    with BatchPool(args.workers) as pool, tempfile.TemporaryDirectory() as tmp:
        for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
            spec = scenario_spec(size)
            files = ensure_scenario(spec, Path(args.data), console)
            records, queries = files.load(today=today)
            runs = []
            for verifiable in (False, True):
                console.log(f"{spec.queries:,} x {spec.records:,}: "
                            f"{'verifiable' if verifiable else 'mode 0'}")
                runs.append(run_session(records, queries, pool, Path(tmp), verifiable,
                                        args.chunk))
            if runs[0]["matches"] != runs[1]["matches"]:
                raise SystemExit(f"verifiable run found {runs[1]['matches']} matches, "
                                 f"mode 0 {runs[0]['matches']}")
            run["end_to_end"].append({"queries": len(queries), "records": len(records),
                                      "runs": runs})
    run["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(run, indent=2) + "\n")
    print(markdown(run))
    console.log(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
