"""``agency-b certify-request`` / ``certify-finish``: named-subject certification, once per epoch.

The custodian blinds ``b·H(y)`` for every in-scope record and rule, the authority
multiplies by its token key ``c`` (``psi-authority certify``), and the custodian
removes ``b`` and keeps ``c·H(y)`` in a certification file that ``serve``
loads with ``--certification``.  See docs/architecture.md, Named-subject mode.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from protocol.adapters.files import open_csv, read_policy, write_certification, write_file_atomic
from protocol.adapters.pools import BatchPool
from protocol.domain.records import match_keys_bulk
from protocol.domain.recordstore import load_custodian_csv
from protocol.engines.named import (
    CertificationResponse,
    PendingCertification,
    finish_certification,
    start_certification,
)

PENDING_FORMAT = "gated-psi/named-certification-pending/v1"


def save_pending(pending: PendingCertification, path: Path) -> None:
    """Keep ``b`` and the layout between the two steps (mode 0600: ``b`` is secret)."""
    doc = {"format": PENDING_FORMAT, "blind": pending.blind.hex(),
           "binding_secret": pending.binding_secret.hex(), "rules": list(pending.rules),
           "record_ids": pending.record_ids, "rule_index": pending.rule_index.tolist()}
    write_file_atomic(path, json.dumps(doc).encode())


def load_pending(path: Path) -> PendingCertification:
    doc = json.loads(path.read_text())
    if doc.get("format") != PENDING_FORMAT:
        raise ValueError(f"{path} is not a pending certification")
    ids = list(doc["record_ids"])
    return PendingCertification(
        blind=bytes.fromhex(doc["blind"]), binding_secret=bytes.fromhex(doc["binding_secret"]),
        rules=tuple(doc["rules"]), record_ids=ids,
        rule_index=np.asarray(doc["rule_index"], dtype=np.int8), keys=[b""] * len(ids),
    )


def cmd_certify_request(args: argparse.Namespace) -> int:
    policy = read_policy(args.policy)
    today = date.today()
    with open_csv(args.records) as fh:
        records, refused, rows = load_custodian_csv(fh, today=today)
    in_scope = [r for r in records if r.record_class not in policy.excluded_record_classes]
    rules = [r for r in args.rules.split(",") if r]
    keys = match_keys_bulk(in_scope, rules, today=today)
    with BatchPool(args.workers) as pool:
        request, pending = start_certification(
            policy.custodian_id, keys, [r.record_id for r in in_scope], ops=pool)
    Path(args.out).write_bytes(request.to_bytes())
    save_pending(pending, Path(args.state))
    print(f"{rows:,} records read, {len(refused):,} refused, {len(in_scope):,} in scope; "
          f"{len(request.elements) // 32:,} blinded elements -> {args.out}")
    print(f"keep {args.state} (mode 0600) for certify-finish; send {args.out} to the authority")
    return 0


def cmd_certify_finish(args: argparse.Namespace) -> int:
    pending = load_pending(Path(args.state))
    response = CertificationResponse.from_bytes(Path(args.response).read_bytes())
    with BatchPool(args.workers) as pool:
        cert = finish_certification(pending, response, ops=pool)
    write_certification(cert, args.out)
    Path(args.state).unlink()
    print(f"certification for authority key {cert.authority_key_id}: {len(cert):,} elements "
          f"-> {args.out} (load it with serve --certification)")
    return 0


def register(sub: Any) -> None:
    """Add the two subcommands to ``agency-b``'s parser."""
    r = sub.add_parser("certify-request",
                       help="named subjects: blind the records for the authority's certification",
                       description="Blind every in-scope record's match keys for the chosen "
                       "rules, so the authority can certify them (it learns only their number). "
                       "Once per key epoch; keep --state secret until certify-finish.")
    r.add_argument("--records", required=True, help="custodian records CSV")
    r.add_argument("--policy", required=True, help="custodian policy JSON (exclusions apply)")
    r.add_argument("--rules", default="tin+dob,tin+last_name",
                   help="match rules to certify, comma-separated")
    r.add_argument("--out", required=True, help="request file for 'psi-authority certify'")
    r.add_argument("--state", required=True, help="secret state kept until certify-finish")
    r.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for the group operations")
    r.set_defaults(func=cmd_certify_request)
    f = sub.add_parser("certify-finish",
                       help="named subjects: unblind the authority's response into a certification",
                       description="Unblind the authority's response with the state saved by "
                       "certify-request; the result is given to 'agency-b serve "
                       "--certification'.")
    f.add_argument("--state", required=True, help="the state file from certify-request")
    f.add_argument("--response", required=True, help="file from 'psi-authority certify'")
    f.add_argument("--out", required=True, help="certification file for serve --certification")
    f.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for the group operations")
    f.set_defaults(func=cmd_certify_finish)
