"""The budget ``psi-authority issue`` signs is exactly what the tier's sessions consume.

The aggregate and cardinality tiers evaluate canonical keys only, one session per rule, each
sending its distinct keys (docs/architecture.md, Aggregate and cardinality tiers); the
identity tier evaluates every key, variants included.  Each test issues through the real
CLI, runs the sessions against a real custodian server over mutual TLS, and reads the spent
budget back from the custodian's SQLite ledger.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest

from agency_a.client import run_remote_aggregate, run_remote_session
from proto import service_kit as kit
from protocol.cli.authority import main as authority_main
from protocol.domain.records import PersonRecord, QueryRecord, evaluation_count, match_keys_bulk
from protocol.policy import decide as P
from protocol.policy.authority import private_key_from_pem
from protocol.sessions.aggregate import (
    AggregateCustodian,
    AggregateRequesterSession,
    aggregate_element_counts,
    plaintext_answer,
)
from protocol.sessions.identity import RequesterSession
from tests.factories import World, as_query, custodian_over_mtls, make_person, make_world

RULES = ("tin+dob", "tin+dob+variants")
HEADER = "record_id,tin,first_name,last_name,dob,address,city,state,zip,tax_periods,statute," \
         "reason"


def _transposed_tin(person: PersonRecord) -> PersonRecord:
    """The person with two adjacent TIN digits swapped: only a variant key finds them."""
    tin = person.tin.replace("-", "")
    return replace(person, record_id=f"typo-{person.record_id}",
                   tin=tin[:4] + tin[5] + tin[4] + tin[6:])


def _request(world: World) -> list[QueryRecord]:
    """Ten held people (one of them asked for twice), one with a TIN typo, five strangers."""
    people = [world.records[i] for i in range(10)]
    people.append(replace(world.records[3], record_id="again-3"))
    people.append(_transposed_tin(world.records[12]))
    people += [make_person(700 + i, prefix="stranger-") for i in range(5)]
    return [as_query(p, p.record_id) for p in people]


def _write(path: Path, queries: list[QueryRecord]) -> Path:
    rows = [",".join([q.person.record_id, q.person.tin, q.person.first_name, q.person.last_name,
                      q.person.dob, q.person.address, q.person.city, q.person.state,
                      q.person.zip, "2023", "26 USC 6103(i)", "case 1"]) for q in queries]
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def _issue(tmp: Path, world: World, queries: list[QueryRecord], *extra: str
           ) -> P.SignedAuthorization:
    """Issue through the CLI and make the world's custodian trust that authority key."""
    assert authority_main(["keygen", "--out", str(tmp)]) == 0
    out = tmp / "auth.bin"
    rc = authority_main([
        "issue", "--key", str(tmp / "authority.key"), "--requester", "agency-a",
        "--custodian", "agency-b", "--statute", "26 U.S.C. 6103(i)(2)",
        "--purpose", "statistics", "--rules", ",".join(RULES), "--engines", "oprf",
        "--queries", str(_write(tmp / "q.csv", queries)),
        "--custodian-records", str(len(world.records)), "--out", str(out), *extra])
    assert rc == 0
    key = private_key_from_pem((tmp / "authority.key").read_bytes())
    world.authority = key
    world.policy = replace(world.policy, trusted_authorities={
        P.authority_key_id(key.public_key()): key.public_key()})
    return P.SignedAuthorization.from_bytes(out.read_bytes())


@pytest.mark.parametrize("tier", ["aggregate", "cardinality"])
def test_aggregate_budget_is_what_the_sessions_send_and_the_answer_is_plaintext(
        tmp_path: Path, tier: str, capsys: pytest.CaptureFixture[str]) -> None:
    world = make_world(tmp_path, n_records=40)
    world.with_tax_paid()
    queries = _request(world)
    value = ("--value-field", "tax_paid_cents") if tier == "aggregate" else ()
    signed = _issue(tmp_path, world, queries, "--tier", tier, *value)
    printed = capsys.readouterr().out
    auth = signed.authorization
    today = date.today()

    per_rule = aggregate_element_counts(queries, RULES, today=today)
    # 10 distinct held people (the repeat folds), the typo'd one and 5 strangers: 16 keys.
    assert per_rule == {"tin+dob": 16, "tin+dob+variants": 16}
    assert auth.max_evaluations == sum(per_rule.values()) == 32
    assert "variant keys are not evaluated in this tier" in printed
    # The identity tier's price for the same file counts every variant key: far more.
    assert evaluation_count([q.person for q in queries], RULES, today=today) > 3 * 32

    custodian = world.custodian()
    values = [int(dict(r.extra)["tax_paid_cents"]) for r in world.records]
    with custodian_over_mtls(custodian, tmp_path / "pki",
                             aggregate=AggregateCustodian(custodian)) as (address, tls):
        with kit.secure_channel(address, tls) as channel:
            kit.wait_healthy(channel)
            for rule in RULES:
                session = AggregateRequesterSession(signed, queries, match_rule=rule,
                                                    signing_key=world.requester_key)
                assert session.element_count == per_rule[rule]
                result = run_remote_aggregate(session, channel).result
                q_keys = match_keys_bulk([q.person for q in queries], [rule], today=today)[rule]
                c_keys = match_keys_bulk(world.records, [rule], today=today)[rule]
                count, total = plaintext_answer(q_keys, zip(c_keys, values, strict=True))
                # Canonical keys only: the typo'd person is not counted, under either rule.
                assert result.count == count == 10
                assert result.sum == (total if tier == "aggregate" else None)
                assert total == sum(values[:10])

    budget = world.ledger.budget(auth.authorization_id)
    assert budget.evaluated == auth.max_evaluations  # priced == consumed, to the unit
    assert budget.remaining == 0


def test_identity_budget_is_every_key_the_session_evaluates(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=40)
    queries = _request(world)
    signed = _issue(tmp_path, world, queries, "--fields", "address",
                    "--max-disclosures", "20")
    auth = signed.authorization
    assert auth.max_evaluations == evaluation_count([q.person for q in queries], RULES,
                                                    today=date.today())
    with custodian_over_mtls(world.custodian(), tmp_path / "pki") as (address, tls):
        with kit.secure_channel(address, tls) as channel:
            kit.wait_healthy(channel)
            session = RequesterSession(signed, queries, signing_key=world.requester_key)
            outcome = run_remote_session(session, channel)
    found = {r.query_record_id for r in outcome.results if r.rule_id == "tin+dob+variants"}
    assert f"typo-{world.records[12].record_id}" in found  # the identity tier uses variants
    budget = world.ledger.budget(auth.authorization_id)
    assert budget.evaluated == auth.max_evaluations
    assert budget.remaining == 0
