"""Aggregate tier at scale (issues 5, 13): count + sum over 1.28M x 1.3M, custodian-side.

``python -m benchmarks.aggregate_scale --sizes 100000,1300000`` runs one aggregate session per
size over real gRPC with mTLS between a custodian service and a requester client in this
process (both with a process pool on all cores), and reports wall time per phase, the cost
of the defence against a deviating requester (validating every reblinded element, the
custodian's matching, the consistency proof on each side), bytes on the wire, and whether
count and sum equal the plaintext answer.  Results go to ``benchmarks/results/aggregate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from agency_a.client import WireStats, run_remote_aggregate
from agency_b.service import serve as serve_custodian
from benchmarks.scale import ensure_scenario, scenario_spec
from proto import service_kit as kit
from protocol.adapters.pools import AggregatePool
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli.dev_pki import write_dev_pki
from protocol.domain.records import MATCH_RULES
from protocol.policy import decide as P
from protocol.sessions.aggregate import (
    AggregateCustodian,
    AggregateCustodianSession,
    AggregateRequesterSession,
    plaintext_answer,
)
from protocol.sessions.identity import Custodian, CustodianConfig

RULE = "tin+dob"
VALUE = "tax_paid_cents"


def run_size(size: int, data_dir: Path, workers: int) -> dict[str, object]:
    """One aggregate session at ``size``; its keys, certificates and ledger are removed after."""
    with tempfile.TemporaryDirectory(prefix="agg-bench-") as tmp:
        return _run_size(size, data_dir, workers, Path(tmp))


def _run_size(size: int, data_dir: Path, workers: int, work: Path) -> dict[str, object]:
    files = ensure_scenario(scenario_spec(size), data_dir, Console())
    spec = scenario_spec(size)
    today = date.today()
    records, queries = files.load(today=today)
    rule = MATCH_RULES[RULE]
    want = plaintext_answer(
        (rule.match_key(q, today=today) for q in queries),
        ((rule.match_key(r, today=today), int(r.get(VALUE) or 0)) for r in records))
    write_dev_pki(work / "pki", ["agency-a", "agency-b"], server_agencies=["agency-b"])
    authority = Ed25519PrivateKey.generate()
    kid = P.authority_key_id(authority.public_key())
    policy = P.CustodianPolicy(custodian_id="agency-b",
                               trusted_authorities={kid: authority.public_key()})
    now = int(time.time())
    signed = P.sign_authorization(P.Authorization(
        authorization_id=P.new_authorization_id(), authority_key_id=kid,
        requester_id="agency-a", custodian_id="agency-b", statute="26 U.S.C. 6103(i)(2)",
        purpose="aggregate benchmark", not_before=now - 60, not_after=now + 86400,
        tier=P.Tier.AGGREGATE, max_evaluations=2 * len(queries), max_disclosures=0,
        match_rules=(RULE,), disclosure_fields=(), value_field=VALUE, retention_days=1), authority)
    requester_key = Ed25519PrivateKey.generate()  # countersigns the receipt
    with AggregatePool(workers) as cpool, AggregatePool(workers) as rpool:
        custodian = Custodian(CustodianConfig(
            policy=policy, records=records, ledger=Ledger(work / "b.sqlite"),
            master_secret=os.urandom(32), signing_key=Ed25519PrivateKey.generate(),
            requester_keys={"agency-a": requester_key.public_key()}))
        aggregate = AggregateCustodian(custodian, ops=cpool)
        made: list[AggregateCustodianSession] = []
        make_session = aggregate.session

        def keep_session() -> AggregateCustodianSession:  # keep it to read its stats
            made.append(make_session())
            return made[-1]

        aggregate.session = keep_session  # type: ignore[method-assign]
        server, port = serve_custodian(
            custodian, kit.TLSFiles.from_dir(work / "pki", "agency-b", "server"),
            "127.0.0.1:0", aggregate=aggregate)
        try:
            started = time.perf_counter()
            session = AggregateRequesterSession(signed, queries, ops=rpool,
                                                signing_key=requester_key)
            stats = WireStats()
            tls = kit.TLSFiles.from_dir(work / "pki", "agency-a", "client")
            with kit.secure_channel(f"127.0.0.1:{port}", tls) as channel:
                outcome = run_remote_aggregate(session, channel, stats=stats)
            wall = time.perf_counter() - started
        finally:
            server.stop(0)
    custodian_stats = {k: round(v, 3) for k, v in made[-1].stats.items()}
    requester_stats = outcome.requester_stats
    # What issue 13's defence adds to the plain custodian-side exchange: per-element
    # validation of the reblinded stream and the consistency proof over the matches.
    defence = {
        "validate_reblinded_s": custodian_stats.get("validate_s", 0.0),
        "prove_s": round(requester_stats.get("prove_s", 0.0), 3),
        "verify_s": custodian_stats.get("verify_s", 0.0),
    }
    result = outcome.result
    row: dict[str, object] = {
        "queries": spec.queries, "records": spec.records, "workers": workers,
        "wall_s": round(wall, 2),
        "phases_s": {k: round(v, 2) for k, v in stats.seconds.items()},
        "requester_stats": {k: round(v, 3) for k, v in outcome.requester_stats.items()},
        "custodian_stats": custodian_stats,
        "defence_s": defence, "defence_total_s": round(sum(defence.values()), 3),
        "bytes_a_to_b": sum(stats.a_to_b.values()), "bytes_b_to_a": sum(stats.b_to_a.values()),
        "count": result.count, "sum": result.sum,
        "plaintext_count": want[0], "plaintext_sum": want[1],
        "exact": (result.count, result.sum) == want,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(row, indent=2, default=str))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", default="100000",
                    help="comma-separated N (N queries x N records; 1300000 = the headline "
                         "1.28M x 1.3M scenario)")
    ap.add_argument("--data-dir", default="benchmarks/data", help="scenario cache")
    ap.add_argument("--out", default="benchmarks/results/aggregate.json",
                    help="where the JSON rows are written")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="worker processes per side")
    args = ap.parse_args(argv)
    rows = [run_size(int(s), Path(args.data_dir), args.workers)
            for s in args.sizes.split(",") if s]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
