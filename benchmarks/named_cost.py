"""Cost of named-subject mode (issue 7): per-epoch certification, per-request overhead.

``python -m benchmarks.named_cost --records 1300000 --subjects 10000`` measures, in one run
and on the same machine:

* the per-epoch certification of the custodian's records (custodian blinding, authority
  multiplication, custodian unblinding), with the process pool on all cores;
* one named-subject request against one bulk request with the same subjects
  (review + index build + session), in process, so the difference is the mode's overhead.

Results go to ``benchmarks/results/named_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.adapters.pools import BatchPool
from protocol.adapters.scenario import ScenarioFiles, ScenarioSpec, generate
from protocol.adapters.sqlite_ledger import Ledger
from protocol.domain.records import match_keys_bulk
from protocol.domain.recordstore import CompactRecords
from protocol.engines import named
from protocol.policy import decide as P
from protocol.sessions.identity import Custodian, CustodianConfig, RequesterSession, run_in_process

RULE = "tin+dob"


def _authorization(key: Ed25519PrivateKey, n: int, mode: P.Mode) -> P.SignedAuthorization:
    now = int(time.time())
    auth = P.Authorization(
        authorization_id=P.new_authorization_id(),
        authority_key_id=P.authority_key_id(key.public_key()), requester_id="agency-a",
        custodian_id="agency-b", statute="26 U.S.C. 6103(i)(2)", purpose="benchmark",
        not_before=now - 60, not_after=now + 86400, tier=P.Tier.IDENTITY, max_evaluations=n,
        max_disclosures=n, match_rules=(RULE,), disclosure_fields=("address",),
        retention_days=1, mode=mode,
        subject_commitment=bytes(32) if mode is P.Mode.NAMED_SUBJECTS else None,
    )
    return P.sign_authorization(auth, key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_300_000)
    ap.add_argument("--subjects", type=int, default=10_000)
    ap.add_argument("--data", default="benchmarks/data")
    ap.add_argument("--out", default="benchmarks/results/named_cost.json")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    spec = ScenarioSpec().scaled(max(args.subjects, 1000), args.records)
    folder = Path(args.data) / f"named-{spec.queries}x{spec.records}"
    files = ScenarioFiles.in_dir(folder)
    if not files.manifest.exists():
        generate(spec, folder)
    today = date.today()
    records, queries = files.load(today=today)
    subjects = CompactRecords.of(queries[: args.subjects])  # validated by the loader
    out: dict[str, object] = {"records": len(records), "subjects": len(subjects),
                              "workers": args.workers, "load_average": os.getloadavg()}

    authority = Ed25519PrivateKey.generate()
    kid = P.authority_key_id(authority.public_key())
    token_key = named.new_token_key()
    with BatchPool(args.workers) as pool:
        keys = match_keys_bulk(records, [RULE], today=today)
        t0 = time.perf_counter()
        request, pending = named.start_certification(
            "agency-b", keys, [r.record_id for r in records], ops=pool)
        t1 = time.perf_counter()
        response = named.certify(token_key, kid, request, ops=pool)
        t2 = time.perf_counter()
        cert = named.finish_certification(pending, response, ops=pool)
        t3 = time.perf_counter()
        out["certification"] = {
            "elements": len(cert), "custodian_blind_s": round(t1 - t0, 2),
            "authority_certify_s": round(t2 - t1, 2), "custodian_unblind_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2),
        }
        print(f"certification of {len(cert):,} elements: {t3 - t0:.1f} s "
              f"(custodian {t1 - t0 + t3 - t2:.1f} s, authority {t2 - t1:.1f} s)")

        policy = P.CustodianPolicy(custodian_id="agency-b",
                                   trusted_authorities={kid: authority.public_key()})
        results = {}
        for mode in (P.Mode.BULK, P.Mode.NAMED_SUBJECTS):
            ledger = Ledger(folder / f"ledger-{mode.value}-{time.time_ns()}.sqlite")
            custodian = Custodian(CustodianConfig(
                policy=policy, records=records, ledger=ledger, master_secret=os.urandom(32),
                signing_key=Ed25519PrivateKey.generate(), ops=pool,
                certifications={kid: cert}))
            n = len(subjects)
            signed = _authorization(authority, n, mode)
            started = time.perf_counter()
            tokens = None
            if mode is P.Mode.NAMED_SUBJECTS:
                subject_keys = match_keys_bulk(subjects, [RULE], today=today)[RULE]
                pairs = [(s.record_id, k) for s, k in zip(subjects, subject_keys, strict=True)
                         if k is not None]
                buf = named.issue_tokens(token_key, cert.binding_secret,
                                         signed.authorization.authorization_id,
                                         [k for _, k in pairs])
                tokens = {(rid, RULE): buf[i * 32:(i + 1) * 32]
                          for i, (rid, _) in enumerate(pairs)}
            review = time.perf_counter() - started
            session = RequesterSession(signed, subjects, ops=pool, tokens=tokens,
                                       chunk_size=8192)
            outcome = run_in_process(session, custodian.session(), requester_id="agency-a",
                                     countersign=False)  # timing only: no receipt key
            total = time.perf_counter() - started
            results[mode.value] = {"review_s": round(review, 2), "total_s": round(total, 2),
                                   "matches": len(outcome.matches)}
            ledger.close()
            print(f"{mode.value:>15}: {total:.1f} s for {n:,} subjects x {len(records):,} "
                  f"records ({len(outcome.matches):,} matches)")
        out["per_request"] = results
        bulk, nam = results["bulk"]["total_s"], results["named_subjects"]["total_s"]
        out["named_overhead_ratio"] = round(nam / bulk, 3) if bulk else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"named / bulk per request: {out['named_overhead_ratio']}x -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
