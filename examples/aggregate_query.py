"""Aggregate query, embedded: how many of agency-a's subjects agency-b holds and what they
paid together, without agency-a learning who they are or any one person's value.

The aggregate tier returns a count and a sum (the cardinality tier: the count only); the
custodian computes both over its own matched records (it learns which of them contributed)
and withholds the sum when fewer subjects match than the authorization's minimum. Run it
with ``python examples/aggregate_query.py``.
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
    authority_key = psi.generate_authority_key()
    requester_key = Ed25519PrivateKey.generate()
    custodian_key = Ed25519PrivateKey.generate()

    report = psi.validate_queries(enumerate(SUBJECTS, 1), today=today)
    print(f"{len(report.accepted)} subjects accepted, {report.refused_record_count} refused")

    # An aggregate authorization discloses no record (max_disclosures 0); its one
    # "disclosure field" is the custodian column that is summed.
    draft = psi.draft_authorization(
        authority_key=authority_key, requester_id="agency-a", custodian_id="agency-b",
        statute="26 U.S.C. 6103(i)(2)", purpose="tax paid by the subjects of case 24-117",
        tier=psi.Tier.AGGREGATE, max_evaluations=len(report.accepted), max_disclosures=0,
        match_rules=("tin+dob",), disclosure_fields=(), value_field="tax_paid_cents",
        retention_days=30,
        not_before=now - 60, not_after=now + 3600, min_aggregate_count=2)
    signed = psi.sign_authorization(draft, authority_key)

    policy = psi.CustodianPolicy(
        custodian_id="agency-b",
        trusted_authorities={psi.authority_key_id(authority_key.public_key()):
                             authority_key.public_key()})
    with tempfile.TemporaryDirectory() as tmp, psi.Ledger(Path(tmp) / "b.sqlite") as ledger:
        custodian = psi.Custodian(psi.CustodianConfig(
            policy=policy, records=CUSTODIAN_RECORDS, ledger=ledger,
            master_secret=os.urandom(32), signing_key=custodian_key,
            requester_keys={"agency-a": requester_key.public_key()}))
        aggregate = psi.AggregateCustodian(custodian)  # the same records, policy and ledger
        requester = psi.AggregateRequesterSession(
            signed, report.accepted, signing_key=requester_key,
            custodian_key=custodian_key.public_key())
        outcome = psi.run_aggregate_in_process(requester, aggregate.session(),
                                               requester_id="agency-a")

    result = outcome.result
    print(f"tier {result.tier}: {result.count} of {result.elements} subjects held")
    if result.withheld:
        print(f"sum withheld: {result.reason}")
    else:
        print(f"tax paid together: {result.sum} cents")
    print(f"receipt countersigned by requester {bool(outcome.receipt.requester_signature)}")


if __name__ == "__main__":
    main()
