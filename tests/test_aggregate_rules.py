"""An aggregate job answers every rule its authorization pays for (issue 19 follow-up).

``psi-authority issue`` prices an aggregate or cardinality authorization as one session per
permitted rule; the requester service's job runs exactly those sessions, one per rule, and
stores one row per rule (docs/architecture.md, Aggregate and cardinality tiers).  Every test
runs both services over real gRPC with real mutual TLS, a real SQLite ledger on each side and
the requester's real encrypted result store; the two-rule job goes through the operator CLI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from agency_a import cli as cli_a
from agency_a.service import ANSWERED_IN_PART
from agency_b.service import serve as serve_custodian
from proto import service_kit as kit
from protocol.adapters.files import open_csv
from protocol.cli.authority import main as authority_main
from protocol.cli.dev_pki import write_dev_pki
from protocol.domain.records import QueryRecord, match_keys_bulk, write_query_csv
from protocol.errors import LedgerError
from protocol.policy import decide as P
from protocol.policy.authority import private_key_from_pem
from protocol.report.facts import UNRELEASED_COUNTS_KEY
from protocol.sessions.aggregate import (
    AggregateCustodian,
    aggregate_element_counts,
    plaintext_answer,
)
from tests.factories import World, as_query, make_person, make_world
from tests.helpers.report_job import serve_requester_service

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc
OPERATOR = "analyst-3"
RULES = ("tin+dob", "tin+last_name")
VALUE = "tax_paid_cents"
RPC_TIMEOUT = 60


@dataclass
class Services:
    """A requester service on loopback, and a custodian started on first use (a test may
    first make it trust another authority), behind one dev PKI."""

    world: World
    tmp: Path
    pki: Path
    requester: str
    servers: list[Any]
    custodian: str = ""

    def channel(self) -> Any:
        return kit.secure_channel(self.requester,
                                  kit.TLSFiles.from_dir(self.pki, "agency-a", "client"))

    def serve_custodian(self) -> str:
        if not self.custodian:
            custodian = self.world.custodian()
            server, port = serve_custodian(
                custodian, kit.TLSFiles.from_dir(self.pki, "agency-b", "server"),
                "127.0.0.1:0", aggregate=AggregateCustodian(custodian))
            self.servers.append(server)
            self.custodian = f"127.0.0.1:{port}"
        return self.custodian


@pytest.fixture()
def services(tmp_path: Path) -> Iterator[Services]:
    world = make_world(tmp_path, n_records=40)
    world.with_tax_paid()
    pki = tmp_path / "pki"
    write_dev_pki(pki, ["agency-a", "agency-b"], server_agencies=["agency-a", "agency-b"])
    server, port, _ = serve_requester_service(world, tmp_path, pki, operator=OPERATOR)
    svc = Services(world, tmp_path, pki, f"127.0.0.1:{port}", [server])
    try:
        yield svc
    finally:
        for running in svc.servers:
            running.stop(0)


# -------------------------------------------------------------------------------- the request


def _request(world: World, *, both: range, dob_only: range, last_name_only: range,
             strangers: int = 4) -> list[QueryRecord]:
    """Held people found under both rules, under tin+dob only (another last name), under
    tin+last_name only (another birth year), and strangers."""
    queries = [as_query(world.records[i]) for i in both]
    queries += [as_query(replace(world.records[i], last_name="Quimbyson")) for i in dob_only]
    for i in last_name_only:
        year, rest = world.records[i].dob.split("-", 1)
        queries.append(as_query(replace(world.records[i], dob=f"{int(year) - 1}-{rest}")))
    queries += [as_query(make_person(800 + i, prefix="stranger-")) for i in range(strangers)]
    return queries


def _plaintext(world: World, queries: Sequence[QueryRecord], rule: str) -> tuple[int, int]:
    """The per-rule answer of the plaintext join (count, sum of tax paid)."""
    today = date.today()
    q_keys = match_keys_bulk([q.person for q in queries], [rule], today=today)[rule]
    c_keys = match_keys_bulk(world.records, [rule], today=today)[rule]
    values = [int(dict(r.extra)[VALUE]) for r in world.records]
    return plaintext_answer(q_keys, zip(c_keys, values, strict=True))


def _write(path: Path, queries: Sequence[QueryRecord]) -> Path:
    with open_csv(path, "w") as fh:
        write_query_csv(list(queries), fh)
    return path


def _issue(svc: Services, queries: Sequence[QueryRecord], *extra: str) -> P.SignedAuthorization:
    """Issue through ``psi-authority issue`` and make the custodian trust that authority."""
    tmp = svc.tmp
    assert authority_main(["keygen", "--out", str(tmp)]) == 0
    out = tmp / "auth.bin"
    assert authority_main([
        "issue", "--key", str(tmp / "authority.key"), "--requester", "agency-a",
        "--custodian", "agency-b", "--statute", "26 U.S.C. 6103(i)(2)",
        "--purpose", "statistics", "--rules", ",".join(RULES), "--engines", "oprf",
        "--queries", str(_write(tmp / "priced.csv", queries)),
        "--custodian-records", str(len(svc.world.records)), "--out", str(out),
        "--tier", "aggregate", "--value-field", VALUE, *extra]) == 0
    key = private_key_from_pem((tmp / "authority.key").read_bytes())
    svc.world.authority = key
    svc.world.policy = replace(svc.world.policy, trusted_authorities={
        P.authority_key_id(key.public_key()): key.public_key()})
    return P.SignedAuthorization.from_bytes(out.read_bytes())


def _authorize(world: World, rules: Sequence[str], *, max_evaluations: int = 1000,
               min_count: int = 0) -> P.SignedAuthorization:
    signed = world.authorize(rules=rules, fields=(), max_disclosures=0, tier=P.Tier.AGGREGATE,
                             value_field=VALUE, max_evaluations=max_evaluations)
    return P.sign_authorization(replace(signed.authorization, min_aggregate_count=min_count),
                                world.authority)


def _job(svc: Services, signed: P.SignedAuthorization, queries: Sequence[QueryRecord], *,
         session_id: str = "", rules: Sequence[str] = ()) -> tuple[str, Any, dict[str, Any]]:
    """Submit over the operator RPCs and follow the job: (job id, final event, summary)."""
    svc.serve_custodian()
    data = _write(svc.tmp / f"q-{len(list(svc.tmp.glob('q-*.csv')))}.csv", queries).read_bytes()
    header = pb2.JobHeader(signed_authorization=signed.to_bytes(),
                           custodian_address=svc.custodian, operator=OPERATOR,
                           session_id=session_id, match_rules=list(rules))
    with svc.channel() as channel:
        stub = pb2_grpc.RequesterStub(channel)
        status = stub.SubmitMatch(iter([pb2.SubmitChunk(header=header),
                                        pb2.SubmitChunk(csv=data)]), timeout=RPC_TIMEOUT)
        last = None
        for ev in stub.WatchJob(pb2.JobRef(job_id=status.job_id, operator=OPERATOR),
                                timeout=RPC_TIMEOUT):
            last = ev
    assert last is not None and last.phase in ("done", "failed")
    return status.job_id, last, json.loads(last.summary_json or "{}")


def _rows(svc: Services, job_id: str) -> dict[str, dict[str, str]]:
    """The job's stored rows by rule, read the operator's way (a logged read)."""
    with svc.channel() as channel:
        stub = pb2_grpc.RequesterStub(channel)
        rows = list(stub.GetResults(pb2.JobRef(job_id=job_id, operator=OPERATOR,
                                               purpose="aggregate statistics check"),
                                    timeout=RPC_TIMEOUT))
    by_rule = {r.rule_id: {f.name: f.value for f in r.fields} for r in rows}
    assert len(by_rule) == len(rows), "one row per rule"
    return by_rule


def _by_rule(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["rule"]: entry for entry in summary["aggregate_by_rule"]}


# -------------------------------------------------------------------------------- the tests


def test_two_rules_answer_each_rule_and_spend_what_issue_priced(
        services: Services, capsys: pytest.CaptureFixture[str]) -> None:
    svc, world = services, services.world
    queries = _request(world, both=range(12), dob_only=range(12, 16),
                       last_name_only=range(16, 19))
    signed = _issue(svc, queries, "--min-aggregate-count", "5")
    auth = signed.authorization
    priced = aggregate_element_counts(queries, RULES, today=date.today())
    assert auth.max_evaluations == sum(priced.values())
    want = {rule: _plaintext(world, queries, rule) for rule in RULES}
    assert want["tin+dob"][0] == 16 and want["tin+last_name"][0] == 15  # the rules differ
    svc.serve_custodian()
    capsys.readouterr()

    auth_file = svc.tmp / "auth.json"
    auth_file.write_bytes(signed.to_bytes())
    summary_file = svc.tmp / "summary.json"
    code = cli_a.main(["match", "--server", svc.requester, "--certs", str(svc.pki),
                       "--operator", OPERATOR, "--authorization", str(auth_file),
                       "--queries", str(_write(svc.tmp / "match.csv", queries)),
                       "--custodian", svc.custodian, "--no-progress",
                       "--summary-json", str(summary_file)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads(summary_file.read_text())

    answers = _by_rule(summary)
    assert list(answers) == list(RULES)  # in order, every rule
    for rule in RULES:
        count, total = want[rule]
        assert (answers[rule]["count"], answers[rule]["sum"]) == (count, total)
        assert not answers[rule]["withheld"] and answers[rule]["elements"] == priced[rule]
        assert answers[rule]["receipt"]["requester_signature"]
    assert len({a["session_id"] for a in answers.values()}) == 2  # one session per rule
    # one-rule readers see the first rule's answer
    assert (summary["match_rule"], summary["aggregate_count"], summary["aggregate_sum"]) == (
        "tin+dob", *want["tin+dob"])
    assert summary["elements_evaluated"] == auth.max_evaluations

    rows = _rows(svc, summary["job_id"])
    assert {rule: (int(r["count"]), int(r["sum"]), r["withheld"]) for rule, r in rows.items()
            } == {rule: (*want[rule], "false") for rule in RULES}

    budget = world.ledger.budget(auth.authorization_id)
    assert budget.evaluated == auth.max_evaluations  # priced == consumed, to the unit
    assert budget.remaining == 0

    for rule in RULES:
        assert f"rule {rule}: count" in printed and f"{want[rule][0]:,}" in printed
    assert "must not be added up" in printed


def test_one_rule_job_is_unchanged(services: Services,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    svc, world = services, services.world
    queries = _request(world, both=range(9), dob_only=range(9, 11), last_name_only=range(0))
    signed = _authorize(world, ("tin+dob",))
    job_id, last, summary = _job(svc, signed, queries)
    assert last.phase == "done", last.message
    want = _plaintext(world, queries, "tin+dob")
    assert want[0] == 11
    assert (summary["tier"], summary["match_rule"], summary["aggregate_count"],
            summary["aggregate_sum"], summary["aggregate_withheld"]) == (
        "aggregate", "tin+dob", *want, False)
    assert summary["receipt"]["custodian_signature"]
    assert [a["rule"] for a in summary["aggregate_by_rule"]] == ["tin+dob"]
    assert _rows(svc, job_id) == {"tin+dob": {"count": str(want[0]), "sum": str(want[1]),
                                              "withheld": "false"}}
    cli_a.print_summary(Console(width=120), summary)
    printed = capsys.readouterr().out
    assert "intersection count" in printed and "must not be added up" not in printed


def test_a_withheld_small_count_on_one_rule_does_not_withhold_the_other(
        services: Services) -> None:
    svc, world = services, services.world
    # tin+dob finds 10 people, tin+last_name only the 3 asked for with their birth dates
    queries = _request(world, both=range(3), dob_only=range(3, 10), last_name_only=range(0))
    signed = _authorize(world, RULES, min_count=5)
    job_id, last, summary = _job(svc, signed, queries, session_id="stats-2026")
    assert last.phase == "done", last.message
    answers = _by_rule(summary)
    # the operator's session id, one per rule (an aggregate session id never reopens)
    assert [a["session_id"] for a in answers.values()] == ["stats-2026-1", "stats-2026-2"]
    assert (answers["tin+dob"]["count"], answers["tin+dob"]["sum"],
            answers["tin+dob"]["withheld"]) == (*_plaintext(world, queries, "tin+dob"), False)
    small = answers["tin+last_name"]
    assert small["count"] == _plaintext(world, queries, "tin+last_name")[0] == 3
    assert small["withheld"] and small["sum"] is None and small["reason"] == "below_minimum_count"
    rows = _rows(svc, job_id)
    assert rows["tin+dob"]["withheld"] == "false" and rows["tin+dob"]["sum"]
    assert rows["tin+last_name"] == {"count": "3", "sum": "", "withheld": "true"}


@pytest.mark.parametrize("refusal", ["budget_exhausted", "release_overlap"])
def test_a_refused_later_rule_fails_the_job_and_keeps_the_answered_rule(
        services: Services, refusal: str) -> None:
    svc, world = services, services.world
    queries = _request(world, both=range(12), dob_only=range(0), last_name_only=range(0))
    per_rule = aggregate_element_counts(queries, RULES, today=date.today())
    if refusal == "budget_exhausted":  # paid for the first rule's session only
        signed = _authorize(world, RULES, max_evaluations=per_rule["tin+dob"])
        status = "RESOURCE_EXHAUSTED"
    else:  # both rules match the same 12 people: the second sum would repeat the first
        signed = _authorize(world, RULES, min_count=5)
        status = "PERMISSION_DENIED"
    job_id, last, summary = _job(svc, signed, queries)

    assert last.phase == "failed"
    assert last.message.startswith(f"{status}: {refusal}: "), last.message
    assert "(rule tin+last_name)" in last.message and "tin+dob (count 12)" in last.message
    assert summary["aggregate_rules_answered"] == ["tin+dob"]
    assert summary["aggregate_rules_unanswered"] == ["tin+last_name"]
    assert summary["aggregate_failed_rule"] == "tin+last_name"
    if refusal == "release_overlap":  # refused after its challenge announced the count
        assert summary[UNRELEASED_COUNTS_KEY] == {"tin+last_name": 12}
    else:  # refused at its open: nothing of that rule was learned
        assert UNRELEASED_COUNTS_KEY not in summary
    want = _plaintext(world, queries, "tin+dob")
    assert (summary["aggregate_count"], summary["aggregate_sum"]) == want
    assert summary["receipt"]["custodian_signature"]  # the answered rule's receipt is kept
    # the answered rule stays readable; the refused one has no row
    assert _rows(svc, job_id) == {"tin+dob": {"count": str(want[0]), "sum": str(want[1]),
                                              "withheld": "false"}}
    with svc.channel() as channel:
        ref = pb2.JobRef(job_id=job_id, operator=OPERATOR, purpose="check")
        report = pb2_grpc.RequesterStub(channel).GetReport(ref, timeout=RPC_TIMEOUT)
    assert json.loads(report.summary_json)["aggregate_rules_answered"] == ["tin+dob"]
    assert ANSWERED_IN_PART.startswith("failed")


def test_a_first_rule_refused_after_its_challenge_says_the_count_it_announced(
        services: Services, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused at release (the overlap rule), after the match challenge announced the count:
    the failed job's summary and ``agency-a match`` say which count the requester learned,
    and nothing else of that rule."""
    svc, world = services, services.world
    queries = _request(world, both=range(12), dob_only=range(0), last_name_only=range(0))
    signed = _authorize(world, ("tin+dob",), min_count=5)
    _, first, released = _job(svc, signed, queries, rules=("tin+dob",))
    assert first.phase == "done" and UNRELEASED_COUNTS_KEY not in released
    _, again, summary = _job(svc, signed, queries, rules=("tin+dob",))  # the same sum again
    assert again.phase == "failed"
    assert again.message.startswith("PERMISSION_DENIED: release_overlap: "), again.message
    assert summary[UNRELEASED_COUNTS_KEY] == {"tin+dob": 12}
    assert "aggregate_sum" not in summary

    auth_file, summary_file = svc.tmp / "overlap-auth.json", svc.tmp / "overlap-summary.json"
    auth_file.write_bytes(signed.to_bytes())
    capsys.readouterr()
    code = cli_a.main(["match", "--server", svc.requester, "--certs", str(svc.pki),
                       "--operator", OPERATOR, "--authorization", str(auth_file),
                       "--queries", str(_write(svc.tmp / "overlap.csv", queries)),
                       "--custodian", svc.custodian, "--no-progress",
                       "--summary-json", str(summary_file)])
    printed = " ".join(capsys.readouterr().out.split())
    assert code == 1
    assert "match failed PERMISSION_DENIED: release_overlap: " in printed
    assert ("rule tin+dob: the custodian announced a count of 12 in its match challenge, "
            "then did not release the answer") in printed
    written = json.loads(summary_file.read_text())
    assert written["failed"].startswith("PERMISSION_DENIED: release_overlap: ")
    assert written[UNRELEASED_COUNTS_KEY] == {"tin+dob": 12}


def test_a_rule_the_authorization_does_not_permit_runs_no_session(services: Services) -> None:
    svc, world = services, services.world
    queries = _request(world, both=range(6), dob_only=range(0), last_name_only=range(0))
    signed = _authorize(world, ("tin+dob",))
    _, last, _ = _job(svc, signed, queries, rules=RULES)
    assert last.phase == "failed"
    assert last.message.startswith("FAILED_PRECONDITION: rule_not_permitted: "), last.message
    assert "tin+last_name" in last.message
    # refused before the first rule's session: the custodian never saw the authorization
    with pytest.raises(LedgerError):
        world.ledger.budget(signed.authorization.authorization_id)
