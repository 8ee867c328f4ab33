"""One real identity job to report on: both services over real mTLS, a real SQLite ledger on
each side, the operator CLI for the match, and the inspector's check on the two exports.

Shared by tests/test_report.py (the ``agency-a report`` access) and
tests/test_report_browser.py (the page in headless Chromium).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agency_a import cli as cli_a
from agency_a.service import RequesterService
from agency_a.service import serve as serve_requester
from agency_a.store import KEY_LEN, ResultStore
from agency_b.service import serve as serve_custodian
from proto import service_kit as kit
from protocol.accounting.export import custodian_export, requester_export
from protocol.accounting.oversight import add_signed_checkpoint, check
from protocol.adapters.files import open_csv
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli.dev_pki import write_dev_pki
from protocol.domain.records import write_query_csv
from protocol.policy.authority import public_key_to_json
from protocol.policy.decide import Tier
from protocol.sessions.aggregate import AggregateCustodian
from tests.factories import World, as_query, make_person, make_world

OPERATOR = "analyst-7"
N_RECORDS = 40
N_MATCHING = 15
#: Query lines refused before anything runs: (address, expected reason code).
REFUSED = (("Failed to Provide", "placeholder_address"), ("N/A", "placeholder_address"),
           ("20500", "zip_only_address"))


@dataclass
class ReportedJob:
    """A finished job and everything needed to ask for its report."""

    tmp: Path
    pki: Path
    requester: str  # the requester service's address
    summary: dict[str, Any]
    oversight: Path  # ``psi-authority oversight --json`` output for the authorization
    custodian_export: Path
    requester_export: Path
    custodian_pub: Path
    requester_pub: Path
    audit: Ledger  # the requester's ledger (report accesses are audited here)

    def report_args(self, out: Path, *extra: str, operator: str = OPERATOR) -> list[str]:
        return ["report", "--server", self.requester, "--certs", str(self.pki),
                "--operator", operator, "--job", str(self.summary["job_id"]),
                "--out", str(out), *extra]


def serve_requester_service(world: World, tmp: Path, pki: Path, *, operator: str = OPERATOR
                            ) -> tuple[Any, int, Ledger]:
    """The requester service in process over mTLS for ``operator``, with its SQLite ledger
    and encrypted result store under ``tmp``: (server, port, ledger)."""
    audit = Ledger(tmp / "requester-ledger.sqlite")
    store = ResultStore(tmp / "results.sqlite", os.urandom(KEY_LEN), audit)
    service = RequesterService(
        "agency-a", kit.TLSFiles.from_dir(pki, "agency-a", "client"),
        signing_key=world.requester_key, operators=[operator], store=store,
        custodian_keys={"agency-b": world.custodian_key.public_key()}, audit=audit)
    server, port = serve_requester(service, kit.TLSFiles.from_dir(pki, "agency-a", "server"))
    return server, port, audit


@contextmanager
def reported_job(tmp: Path, *, tier: Tier = Tier.IDENTITY) -> Iterator[ReportedJob]:
    """Run the job (identity, or aggregate over tax paid); the requester service keeps
    serving until the context exits."""
    world = make_world(tmp, n_records=N_RECORDS)
    if tier is not Tier.IDENTITY:
        world.with_tax_paid()
    custodian = world.custodian()
    pki = tmp / "pki"
    write_dev_pki(pki, ["agency-a", "agency-b"], server_agencies=["agency-a", "agency-b"])
    custodian_server, custodian_port = serve_custodian(
        custodian, kit.TLSFiles.from_dir(pki, "agency-b", "server"), "127.0.0.1:0",
        aggregate=AggregateCustodian(custodian) if tier is not Tier.IDENTITY else None)
    requester_server, requester_port, audit = serve_requester_service(world, tmp, pki)
    try:
        signed = (world.authorize(rules=("tin+dob", "tin+last_name"), max_evaluations=500,
                                  max_disclosures=100) if tier is Tier.IDENTITY
                  else world.authorize_aggregate(tier, min_count=5))
        auth_file = tmp / "auth.json"
        auth_file.write_bytes(signed.to_bytes())
        queries = [as_query(p) for p in world.records[:N_MATCHING]]
        queries += [as_query(make_person(i, prefix="z")) for i in range(500, 505)]
        queries += [as_query(make_person(600 + i, prefix="r", address=address))
                    for i, (address, _) in enumerate(REFUSED)]
        queries_csv = tmp / "queries.csv"
        with open_csv(queries_csv, "w") as fh:
            write_query_csv(queries, fh)
        summary_file = tmp / "summary.json"
        code = cli_a.main(["match", "--server", f"127.0.0.1:{requester_port}",
                           "--certs", str(pki), "--operator", OPERATOR,
                           "--authorization", str(auth_file), "--queries", str(queries_csv),
                           "--custodian", f"127.0.0.1:{custodian_port}", "--no-progress",
                           "--summary-json", str(summary_file)])
        assert code == 0, "the match failed"
        summary = json.loads(summary_file.read_text())
        auth_id = signed.authorization.authorization_id
        add_signed_checkpoint(world.ledger, world.custodian_key)
        add_signed_checkpoint(audit, world.requester_key)
        docs = custodian_export(world.ledger, auth_id), requester_export(audit, auth_id)
        report = check(*docs, custodian_key=world.custodian_key.public_key(),
                       requester_key=world.requester_key.public_key())
        paths = tmp / "export-b.json", tmp / "export-a.json", tmp / "oversight.json"
        for path, doc in zip(paths, (*docs, report.to_json()), strict=True):
            path.write_text(json.dumps(doc))
        pubs = tmp / "b.pub.json", tmp / "a.pub.json"
        for path, key in zip(pubs, (world.custodian_key, world.requester_key), strict=True):
            path.write_text(json.dumps(public_key_to_json(key.public_key())))
        yield ReportedJob(tmp=tmp, pki=pki, requester=f"127.0.0.1:{requester_port}",
                          summary=summary, oversight=paths[2], custodian_export=paths[0],
                          requester_export=paths[1], custodian_pub=pubs[0],
                          requester_pub=pubs[1], audit=audit)
    finally:
        requester_server.stop(0)
        custodian_server.stop(0)
