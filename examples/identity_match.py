"""Identity match, embedded: which of agency-a's subjects agency-b holds, with the fields
the authorization permits, and a receipt both agencies signed.

Both sides run in this one process (``run_in_process``); over a network the same sessions
run inside the two gRPC services. Run it with ``python examples/identity_match.py``.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import date
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sample_people import CUSTODIAN_RECORDS, SUBJECTS

import protocol as psi


def main() -> None:
    today, now = date.today(), int(time.time())
    authority_key = psi.generate_authority_key()  # the court's signing key
    requester_key = Ed25519PrivateKey.generate()  # agency-a countersigns receipts with it
    custodian_key = Ed25519PrivateKey.generate()  # agency-b signs receipts with it

    # 1. The requester's subjects are validated before anything is signed or sent; a
    #    session takes only what validation accepted.
    report = psi.validate_queries(enumerate(SUBJECTS, 1), today=today)
    for refusal in report.refused:
        print(f"refused {refusal.record_id}: {refusal.code} ({refusal.detail})")
    rules = ("tin+dob",)

    # 2. The authority drafts and signs the authorization: who may ask whom, why, under
    #    which rules, for which fields, and a budget of exactly the evaluations needed.
    draft = psi.draft_authorization(
        authority_key=authority_key, requester_id="agency-a", custodian_id="agency-b",
        statute="26 U.S.C. 6103(i)(2)", purpose="locate subjects of case 24-117",
        tier=psi.Tier.IDENTITY, max_evaluations=len(report.accepted) * len(rules),
        max_disclosures=len(report.accepted), match_rules=rules,
        disclosure_fields=("address", "city", "state", "zip"), retention_days=30,
        not_before=now - 60, not_after=now + 3600)
    signed = psi.sign_authorization(draft, authority_key)

    # 3. The custodian trusts the authority's key under its key id, keeps its account in a
    #    ledger and derives one OPRF key per authorization from its 32-byte master secret.
    policy = psi.CustodianPolicy(
        custodian_id="agency-b",
        trusted_authorities={psi.authority_key_id(authority_key.public_key()):
                             authority_key.public_key()})
    with tempfile.TemporaryDirectory() as tmp, psi.Ledger(Path(tmp) / "b.sqlite") as ledger:
        custodian = psi.Custodian(psi.CustodianConfig(
            policy=policy, records=CUSTODIAN_RECORDS, ledger=ledger,
            master_secret=os.urandom(32), signing_key=custodian_key,
            requester_keys={"agency-a": requester_key.public_key()}))

        # 4. One session, both sides in this process.
        requester = psi.RequesterSession(signed, report.accepted, signing_key=requester_key,
                                         custodian_key=custodian_key.public_key())
        outcome = psi.run_in_process(requester, custodian.session(), requester_id="agency-a")
        budget = ledger.budget(draft.authorization_id)

    for result in sorted(outcome.results, key=lambda r: r.query_record_id):
        fields = ", ".join(f"{k}={v}" for k, v in sorted(result.fields.items()))
        print(f"match {result.query_record_id} by {result.rule_id}: {fields}")
    matched = {r.query_record_id for r in outcome.results}
    for query in report.accepted:
        if query.person.record_id not in matched:
            print(f"no match {query.person.record_id}")
    receipt = outcome.receipt
    print(f"receipt: evaluated {receipt.evaluated}, disclosed {receipt.disclosed}, "
          f"signed by custodian {bool(receipt.custodian_signature)}, "
          f"countersigned by requester {bool(receipt.requester_signature)}")
    print(f"custodian ledger: {budget.evaluated} of {budget.max_evaluations} evaluations, "
          f"{budget.disclosed} of {budget.max_disclosures} disclosures")


if __name__ == "__main__":
    main()
