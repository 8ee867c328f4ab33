"""Named subjects, embedded: only subjects the authority reviewed can match.

The authority reviews each subject and issues a token for it; the custodian's records are
certified once per key epoch. A subject without a token matches nothing, whatever the
requester sends. Run it with ``python examples/named_subjects.py``.
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
from protocol.domain.records import match_keys_bulk
from protocol.engines import named
from protocol.policy.authority import subject_commitment

RULES = ("tin+dob",)


def main() -> None:
    today, now = date.today(), int(time.time())
    authority_key = psi.generate_authority_key()
    kid = psi.authority_key_id(authority_key.public_key())
    token_key = named.new_token_key()  # the authority's token key c, beside its signing key
    requester_key = Ed25519PrivateKey.generate()
    custodian_key = Ed25519PrivateKey.generate()

    # 1. Once per epoch the custodian has its records certified: it sends blinded elements,
    #    the authority multiplies them by c and learns only how many there are.
    record_keys = match_keys_bulk(CUSTODIAN_RECORDS, RULES, today=today)
    request, pending = named.start_certification(
        "agency-b", record_keys, [r.record_id for r in CUSTODIAN_RECORDS])
    certification = named.finish_certification(
        pending, named.certify(token_key, kid, request))

    # 2. The authority reviews the subjects and approves only some: not a-2, although the
    #    custodian holds a-2.
    report = psi.validate_queries(enumerate(SUBJECTS, 1), today=today)
    approved = [q for q in report.accepted if q.person.record_id != "a-2"]
    keys = match_keys_bulk([q.person for q in approved], RULES, today=today)
    entries = [(q.person.record_id, rule, key) for rule in RULES
               for q, key in zip(approved, keys[rule], strict=True) if key is not None]
    draft = psi.draft_authorization(
        authority_key=authority_key, requester_id="agency-a", custodian_id="agency-b",
        statute="26 U.S.C. 6103(i)(2)", purpose="named subjects of case 24-117",
        tier=psi.Tier.IDENTITY, max_evaluations=len(entries), max_disclosures=len(approved),
        match_rules=RULES, disclosure_fields=("city", "state"), retention_days=30,
        not_before=now - 60, not_after=now + 3600, mode=psi.Mode.NAMED_SUBJECTS,
        subject_commitment=subject_commitment(approved, today=today))
    signed = psi.sign_authorization(draft, authority_key)
    issued = named.issue_tokens(token_key, request.binding_secret, draft.authorization_id,
                                [key for *_, key in entries])
    tokens = {(rid, rule): issued[i * 32:(i + 1) * 32]
              for i, (rid, rule, _) in enumerate(entries)}
    print(f"authority approved {sorted({rid for rid, _ in tokens})}: {len(tokens)} tokens")

    # 3. The session. The requester submits every accepted subject, a-2 too: a subject
    #    without a token is not even sent, and no token can be made without c.
    policy = psi.CustodianPolicy(custodian_id="agency-b",
                                 trusted_authorities={kid: authority_key.public_key()})
    with tempfile.TemporaryDirectory() as tmp, psi.Ledger(Path(tmp) / "b.sqlite") as ledger:
        custodian = psi.Custodian(psi.CustodianConfig(
            policy=policy, records=CUSTODIAN_RECORDS, ledger=ledger,
            master_secret=os.urandom(32), signing_key=custodian_key,
            requester_keys={"agency-a": requester_key.public_key()},
            certifications={kid: certification}))
        requester = psi.RequesterSession(signed, report.accepted, tokens=tokens,
                                         signing_key=requester_key)
        outcome = psi.run_in_process(requester, custodian.session(), requester_id="agency-a")

    for result in sorted(outcome.results, key=lambda r: r.query_record_id):
        fields = ", ".join(f"{k}={v}" for k, v in sorted(result.fields.items()))
        print(f"match {result.query_record_id} by {result.rule_id}: {fields}")
    matched = {r.query_record_id for r in outcome.results}
    unmatched = sorted(q.person.record_id for q in report.accepted
                       if q.person.record_id not in matched)
    print(f"not matched: {unmatched}")
    print(f"receipt: evaluated {outcome.receipt.evaluated}, disclosed "
          f"{outcome.receipt.disclosed}, countersigned "
          f"{bool(outcome.receipt.requester_signature)}")


if __name__ == "__main__":
    main()
