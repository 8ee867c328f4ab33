"""A corroborated job interrupted mid-disclosure and resumed (docs/architecture.md, Late
failures; Recall and misidentification: Corroboration).

A real ``agency-a serve`` process, with disclosure batches of two groups, is SIGKILLed when
the custodian has answered (and accounted) one of its batches but before it stored the
answer; the restarted service resumes the session from its store. Over real gRPC and
mutual TLS, against a real SQLite ledger, the resumed session must present exactly the
groups whose answers were lost, in the first run's choice of rules (never a new pair of
rules made up of a query's left-over matches), receive the same disclosures, and leave each
record counted once on the custodian's ledger, the re-sent ones as repeats.
"""

from __future__ import annotations

import dataclasses
import io
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agency_a.cli import LEDGER_FILE
from protocol.adapters.sqlite_ledger import Ledger
from protocol.domain.messages import DisclosureRequest, DisclosureResponse, Receipt
from protocol.domain.records import QueryRecord, write_query_csv
from protocol.sessions.identity import CustodianSession
from tests import test_corroboration as corroboration
from tests.factories import as_query, make_person, make_world
from tests.helpers.batch_kill_launcher import KILL_AT_ENV, SIZE_ENV
from tests.test_late_failure import (
    OPERATOR,
    PURPOSE,
    RPC_TIMEOUT,
    AgencyA,
    Lab,
    Refusals,
    oversight_agrees,
    submit,
    wait_for_receipt,
)
from tests.test_late_failure import agency_a as agency_a

#: Four rules: an exact copy matches all of them, and its left-over two rules (after the
#: first independent pair, tin+dob and tin+zip) are independent of each other too, so a
#: resume that re-planned from left-overs would present a group the first run never did.
RULES = ("tin+dob", "tin+zip", "first+last+dob+zip", "tin+dob+variants")
FIRST_CHOICE = frozenset({"tin+dob", "tin+zip"})
FIELDS = ("address", "city", "state", "zip")
BATCH = 4  # outputs per disclosure batch: two groups of two
EXACT = 12  # queries that corroborate: six batches


@pytest.fixture()
def lab(tmp_path: Path) -> Iterator[Lab]:
    world = make_world(tmp_path, n_records=40)
    pki = tmp_path / "pki"
    from protocol.cli.dev_pki import write_dev_pki
    write_dev_pki(pki, ["agency-a", "agency-b"], server_agencies=["agency-a", "agency-b"])
    yield Lab(tmp_path, world, pki, Refusals())


@dataclasses.dataclass
class Disclosed:
    """What the custodian received and answered, per custodian session object."""

    session: CustodianSession
    groups: list[frozenset[tuple[str, bytes]]]
    records: set[str]


@pytest.fixture()
def seen(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> list[Disclosed]:
    """Every disclosure request the custodian handles, grouped, with the records it named
    (observed around the real handler, which runs unchanged)."""
    calls: list[Disclosed] = []
    by_address = {r.address: r.record_id for r in lab.world.records}
    handler = CustodianSession._disclose

    def observed(self: CustodianSession, req: DisclosureRequest) -> DisclosureResponse:
        reply = handler(self, req)
        if not calls or calls[-1].session is not self:
            calls.append(Disclosed(self, [], set()))
        units: dict[int, set[tuple[str, bytes]]] = {}
        for gid, item in zip(req.groups, req.outputs, strict=True):
            units.setdefault(gid, set()).add(item)
        calls[-1].groups.extend(frozenset(u) for u in units.values())
        calls[-1].records.update(by_address[d.as_dict()["address"]]
                                 for d in reply.disclosures)
        return reply

    monkeypatch.setattr(CustodianSession, "_disclose", observed)
    return calls


def serving(agency: AgencyA, kill_at: int | None = None) -> Any:
    """A real ``agency-a serve`` process batching ``BATCH`` outputs; with ``kill_at`` it dies
    when that batch is answered, before storing it (tests/helpers/batch_kill_launcher.py)."""
    env = {SIZE_ENV: str(BATCH), **({KILL_AT_ENV: str(kill_at)} if kill_at is not None else {})}
    return agency.serving(launcher="tests.helpers.batch_kill_launcher", launcher_env=env)


def _queries(lab: Lab) -> list[QueryRecord]:
    """EXACT exact copies (all four rules), 4 with another ZIP (tin+dob and its variants:
    one piece of evidence, withheld), 3 with another date of birth (tin+zip alone), 4
    strangers."""
    records = lab.world.records
    exact = [as_query(records[i]) for i in range(EXACT)]
    moved = [as_query(dataclasses.replace(records[i], zip="99001"))
             for i in range(EXACT, EXACT + 4)]
    redated = [as_query(dataclasses.replace(records[i], dob="1931-07-04"))
               for i in range(EXACT + 4, EXACT + 7)]
    strangers = [as_query(make_person(5000 + i, prefix="z")) for i in range(4)]
    return exact + moved + redated + strangers


def _csv(queries: list[QueryRecord]) -> bytes:
    out = io.StringIO()
    write_query_csv(queries, out)
    return out.getvalue().encode()


def _results(stub: Any, job_id: str) -> list[tuple[str, str, str]]:
    """(query, rule, address) of every stored result row."""
    rows = stub.GetResults(kit_job_ref(job_id), timeout=RPC_TIMEOUT)
    return sorted((r.query_record_id, r.rule_id,
                   next(f.value for f in r.fields if f.name == "address")) for r in rows)


def kit_job_ref(job_id: str) -> Any:
    from proto import service_kit as kit
    return kit.pb2.JobRef(job_id=job_id, operator=OPERATOR, purpose=PURPOSE)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [1, 3])
def test_resumed_corroborated_job_resends_only_the_lost_groups(
        lab: Lab, agency_a: AgencyA, seen: list[Disclosed],
        monkeypatch: pytest.MonkeyPatch, kill_at: int) -> None:
    by_address = {r.address: r.record_id for r in lab.world.records}
    monkeypatch.setattr(corroboration, "RULES", RULES)  # its plaintext join, these rules
    queries = _queries(lab)
    signed = lab.world.authorize(rules=RULES, fields=FIELDS, corroboration=2)
    auth_id = signed.authorization.authorization_id
    with lab.custodian() as address:
        with serving(agency_a, kill_at=kill_at) as (proc, stub):
            job_id = submit(stub, signed, _csv(queries), address)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        with serving(agency_a) as (proc, stub):
            summary = wait_for_receipt(stub, job_id)
            received = _results(stub, job_id)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    first, resumed = seen  # one custodian session per run of the requester
    assert first.session is not resumed.session

    # The same disclosures as an uninterrupted run: the plaintext corroborated join,
    # one row per query, each under the first rule of the first run's pair.
    expected = corroboration._plaintext_corroborated(lab.world, queries, 2)
    assert len(expected) == EXACT
    assert {(q, by_address[a]) for q, _, a in received} == expected
    assert [q for q, _, _ in received] == sorted(q for q, _ in expected)  # no duplicates
    assert {rule for _, rule, _ in received} <= FIRST_CHOICE

    # Groups: every group either run sent is the first run's pair of rules; the resume
    # sent exactly the groups whose answers were not stored (batches kill_at, ... of
    # two groups each), the first of them re-sent after the custodian had answered it.
    for run in (first, resumed):
        assert {frozenset(rule for rule, _ in g) for g in run.groups} == {FIRST_CHOICE}
        assert len(set(run.groups)) == len(run.groups)  # no group twice in one run
    stored = 2 * (kill_at - 1)
    assert len(resumed.groups) == EXACT - stored
    assert first.groups[stored:stored + 2] == resumed.groups[:2]
    assert not set(first.groups[:stored]) & set(resumed.groups)
    assert resumed.records <= {r for _, r in expected}

    # The custodian's ledger: each disclosed record counted once; what the resume asked
    # again that the first run had already been given is a repeat, not a new disclosure.
    rows = lab.world.ledger.disclosures(auth_id)
    assert sorted(r.record_id for r in rows) == sorted(r for _, r in expected)
    everything = lab.world.ledger.disclosures(auth_id, include_repeats=True)
    repeats = [r for r in everything if r.repeat]
    assert {r.record_id for r in repeats} == first.records & resumed.records
    assert len(repeats) == len(first.records & resumed.records) >= 1
    receipt = Receipt.from_json(summary["receipt"])
    assert receipt.disclosed == EXACT == summary["disclosed_records"]
    assert receipt.requester_signature
    with Ledger(agency_a.data / LEDGER_FILE) as requester_ledger:
        oversight_agrees(lab, requester_ledger, auth_id)

