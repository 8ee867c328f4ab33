"""The report of a several-rule aggregate job shows every rule (docs/architecture.md, Reports).

An aggregate job runs one session per rule and lists every answer in ``aggregate_by_rule``
(docs/architecture.md, Aggregate and cardinality tiers); the page shows each rule's count,
total or why it was withheld, says the counts overlap and must not be added up, and, for a
job stopped by a later rule's refusal, which rules were answered and what stopped the rest.
The jobs run the way tests/test_aggregate_rules.py runs them: both services over real gRPC
with real mutual TLS, real SQLite ledgers and the requester's real result store; the page is
written by ``agency-a report`` (the service's ``GetReport``, an audited access).
"""

from __future__ import annotations

import copy
import json
import re
from datetime import date
from html import unescape
from typing import Any

from agency_a import cli as cli_a
from agency_a.service import ANSWERED_IN_PART
from proto import service_kit as kit
from protocol.domain.records import QueryRecord
from protocol.report.facts import job_facts
from protocol.report.render import OVERLAP_WORDS, render_report
from protocol.sessions.aggregate import aggregate_element_counts
from tests import test_aggregate_rules as aggregate_rules
from tests.test_aggregate_rules import (
    OPERATOR,
    RPC_TIMEOUT,
    RULES,
    VALUE,
    Services,
    _authorize,
    _job,
    _plaintext,
    _request,
)
from tests.test_report import SUMMARY, Page

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc
#: The fixture of tests/test_aggregate_rules.py: both services over mTLS, one dev PKI.
services = aggregate_rules.services
NOW = 1_796_000_000.0


def _report(svc: Services, job_id: str, name: str) -> str:
    """The page ``agency-a report`` writes for the job (counts only)."""
    out = svc.tmp / f"{name}.html"
    assert cli_a.main(["report", "--server", svc.requester, "--certs", str(svc.pki),
                       "--operator", OPERATOR, "--job", job_id, "--out", str(out),
                       "--purpose", "statistics for the committee"]) == 0
    return out.read_text()


def _words(page: str) -> str:
    """What a reader sees: the page's text without tags or entities."""
    return unescape(re.sub(r"<[^>]+>", "", page))


def _reported_summary(svc: Services, job_id: str) -> dict[str, Any]:
    """The summary the service hands ``agency-a report`` (what the page was built from)."""
    with svc.channel() as channel:
        ref = pb2.ReportRequest(job_id=job_id, operator=OPERATOR, purpose="check the page")
        reply = pb2_grpc.RequesterStub(channel).GetReport(ref, timeout=RPC_TIMEOUT)
    summary: dict[str, Any] = json.loads(reply.summary_json)
    return summary


def _overlap(words: str) -> int:
    """How often the page says the per-rule counts overlap and must not be added up."""
    return words.count(unescape(OVERLAP_WORDS))


# ------------------------------------------------------------------ real jobs over mTLS


def _two_rule_job(svc: Services) -> tuple[str, dict[str, Any], list[QueryRecord]]:
    """A finished two-rule job whose second rule's total is withheld: (its page, the summary
    the page was built from, the queries)."""
    # tin+dob finds 10 people; tin+last_name only the 3 asked for with their birth dates,
    # fewer than the minimum of 5, so its total is withheld and the other's is not
    queries = _request(svc.world, both=range(3), dob_only=range(3, 10),
                       last_name_only=range(0))
    signed = _authorize(svc.world, RULES, min_count=5)
    job_id, last, _ = _job(svc, signed, queries, session_id="stats-report")
    assert last.phase == "done", last.message
    return _report(svc, job_id, "two-rules"), _reported_summary(svc, job_id), queries


def test_two_rule_job_page_shows_each_rule_and_says_the_counts_overlap(
        services: Services) -> None:
    html, summary, queries = _two_rule_job(services)
    want = {rule: _plaintext(services.world, queries, rule) for rule in RULES}
    assert want["tin+dob"][0] == 10 and want["tin+last_name"][0] == 3
    page, words = Page(html), _words(html)
    # every rule's count, from its own session, equal to the plaintext join's
    for rule in RULES:
        fact = f"aggregate_by_rule.{rule}.count"
        assert page.facts[fact] == str(want[rule][0]), rule  # the key numbers ...
        assert html.count(f'data-fact="{fact}"') == 2  # ... and the answers' table
    assert "aggregate_count" not in page.facts  # no lone number that reads as the total
    assert "aggregate_answer_count" not in page.facts
    assert str(sum(count for count, _ in want.values())) not in page.facts.values()
    # the total where it was released, the reason where it was withheld
    total = f"{want['tin+dob'][1]:,}"
    assert (f"The answers, one per rule: rule tin+dob: 10, together {total} in {VALUE}; "
            "rule tin+last_name: 3 (total withheld).") in words
    assert "tin+last_name3withheld: below_minimum_count" in words  # its row of the table
    # said plainly, at the top and beside the answers
    assert _overlap(words) == 2
    assert words.index(unescape(OVERLAP_WORDS)) < words.index("In brief")
    assert "aggregate-stopped" not in page.ids  # nothing stopped this job
    # one receipt per rule's session, each named by its rule
    for n, rule in enumerate(RULES, 1):
        assert f"Receipt {n} of 2: rule {rule}" in words
        assert f"stats-report-{n}" in words
    for entry in summary["aggregate_by_rule"]:
        assert entry["receipt"]["custodian_signature"] in html
        assert entry["receipt"]["requester_signature"] in html
    # the budget gauge counts both sessions' evaluations
    priced = aggregate_element_counts(queries, RULES, today=date.today())
    assert summary["elements_evaluated"] == sum(priced.values())
    assert page.facts["elements_evaluated"] == f"{sum(priced.values()):,}"
    assert "personal-data" not in page.ids  # counts only


def test_two_rule_page_in_headless_chromium(services: Services) -> None:
    """The per-rule answers as a browser shows them: the summary's numbers, nothing loaded,
    no console error, and nothing wider than a 375 px phone (tables scroll in their box)."""
    # skips (or fails under CI) exactly as the other page checks do without a browser
    from tests import test_report_browser as browser_checks
    chromium, launch_args = browser_checks.CHROMIUM, browser_checks.LAUNCH_ARGS
    from playwright.sync_api import sync_playwright

    _, summary, _ = _two_rule_job(services)
    out = services.tmp / "two-rules.html"
    outside: list[str] = []
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=launch_args)
        try:
            page = browser.new_page(viewport={"width": 375, "height": 812})
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(
                ("file:", "data:")) else (outside.append(r.request.url), r.abort()))
            page.on("console", lambda m: problems.append(m.text)
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(out.as_uri(), wait_until="load")
            for entry in summary["aggregate_by_rule"]:
                shown = page.locator(f'[data-fact="aggregate_by_rule.{entry["rule"]}.count"]')
                assert shown.count() == 2
                assert {int(t.replace(",", "")) for t in shown.all_inner_texts()} == {
                    entry["count"]}
            answers = page.locator("#aggregate").inner_text()
            assert "must not be added up" in answers and "below_minimum_count" in answers
            widths = page.evaluate("""() => [document.documentElement.scrollWidth,
                document.documentElement.clientWidth,
                Math.max(...[...document.querySelectorAll('main *')]
                    .filter(e => !e.closest('.wide'))
                    .map(e => e.getBoundingClientRect().right))]""")
        finally:
            browser.close()
    assert outside == [] and problems == []
    assert widths[0] <= widths[1] == 375 and widths[2] <= 375.5, widths


def test_job_stopped_by_a_later_rule_page_names_answered_rules_and_the_refusal(
        services: Services) -> None:
    svc, world = services, services.world
    queries = _request(world, both=range(12), dob_only=range(0), last_name_only=range(0))
    per_rule = aggregate_element_counts(queries, RULES, today=date.today())
    # paid for the first rule's session only: the second is refused at its open
    signed = _authorize(world, RULES, max_evaluations=per_rule["tin+dob"])
    job_id, last, event_summary = _job(svc, signed, queries)
    assert last.phase == "failed" and last.message.startswith(
        "RESOURCE_EXHAUSTED: budget_exhausted: "), last.message
    want = _plaintext(world, queries, "tin+dob")

    html = _report(svc, job_id, "stopped")
    summary = _reported_summary(svc, job_id)
    assert summary["aggregate_failed_rule"] == "tin+last_name"
    page, words = Page(html), _words(html)
    assert page.facts["aggregate_by_rule.tin+dob.count"] == str(want[0])
    assert "aggregate_by_rule.tin+last_name.count" not in page.facts  # never answered
    assert "aggregate-stopped" in page.ids and _overlap(words) == 2
    stopped = "The job stopped before every rule was answered: rule tin+last_name refused"
    assert stopped in words
    assert ("Answered and stored (readable with agency-a results): tin+dob. "
            "Not answered: tin+last_name.") in words
    assert f"rule tin+dob: {want[0]}, together {want[1]:,} in {VALUE}" in words
    assert "; not answered: rule tin+last_name." in words  # what the requester learned
    # the refusal itself: the service records it in the summary, and the page quotes it
    assert summary["aggregate_failure"].startswith("RESOURCE_EXHAUSTED: budget_exhausted: ")
    assert f"{stopped}: \u201cRESOURCE_EXHAUSTED: budget_exhausted: " in words
    # a summary without it (written before the service recorded it): the page says where
    # to find it and invents nothing
    older = {k: v for k, v in summary.items() if k != "aggregate_failure"}
    assert (f"{stopped}; the refusal's message is not in this summary"
            in _words(render_report(job_facts(older, generated_at=NOW))))

    # the summary the job's last event carries, with its failure message as
    # ``agency-a match --summary-json`` records a failed job's (``failed``)
    # (the fallback for a summary without ``aggregate_failure``)
    event_only = {k: v for k, v in event_summary.items() if k != "aggregate_failure"}
    full = _words(render_report(job_facts({**event_only, "failed": last.message},
                                          generated_at=NOW)))
    assert f"{stopped}: \u201cRESOURCE_EXHAUSTED: budget_exhausted: " in full
    assert "(rule tin+last_name)" in full
    assert ANSWERED_IN_PART == "failed_answered_in_part"


# -------------------------------------------------------- summaries of the same shape


def _aggregate_summary(**extra: Any) -> dict[str, Any]:
    """An aggregate summary; without ``extra``, in the one-rule shape written before
    ``aggregate_by_rule`` existed."""
    summary = {k: v for k, v in copy.deepcopy(SUMMARY).items()
               if k not in ("matches", "matched_queries", "matches_by_rule",
                            "disclosed_records")}
    summary["authorization"] |= {"tier": "aggregate", "disclosure_fields": [],
                                 "value_field": VALUE, "min_aggregate_count": 5}
    summary |= {"tier": "aggregate", "match_rule": "tin+dob", "aggregate_count": 321,
                "aggregate_sum": 123_456_789, "aggregate_withheld": False,
                "aggregate_reason": "", **extra}
    return summary


def test_one_rule_job_renders_as_before_whether_or_not_it_lists_aggregate_by_rule() -> None:
    old = _aggregate_summary()
    new = _aggregate_summary(aggregate_by_rule=[{
        "rule": "tin+dob", "count": 321, "sum": 123_456_789, "withheld": False, "reason": "",
        "elements": 1832, "session_id": "sess-1", "receipt": SUMMARY["receipt"]}],
        aggregate_rules=["tin+dob"], aggregate_rules_answered=["tin+dob"],
        aggregate_rules_unanswered=[])
    page_old = render_report(job_facts(old, generated_at=NOW))
    assert render_report(job_facts(new, generated_at=NOW)) == page_old
    page = Page(page_old)
    assert page.facts["aggregate_count"] == page.facts["aggregate_answer_count"] == "321"
    assert _overlap(_words(page_old)) == 0 and "<h2>The aggregate answer</h2>" in page_old


def test_withheld_totals_and_a_rule_failing_after_its_release_are_told_apart() -> None:
    summary = _aggregate_summary(
        aggregate_by_rule=[
            {"rule": "tin+dob", "count": 321, "sum": 123_456_789, "withheld": False,
             "reason": "", "session_id": "s-1", "receipt": SUMMARY["receipt"]},
            {"rule": "tin+last_name", "count": 4, "sum": None, "withheld": True,
             "reason": "below_minimum_count", "session_id": "s-2", "receipt": None}],
        aggregate_rules_unanswered=["name+dob+zip"], aggregate_failed_rule="tin+last_name",
        aggregate_failure="UNAVAILABLE: custodian unreachable")
    facts = job_facts(summary, generated_at=NOW)
    a = facts.aggregate
    assert a is not None and a.several_rules and a.answered_in_part
    assert [(r.rule_id, r.count, r.total, r.withheld) for r in a.by_rule] == [
        ("tin+dob", 321, 123_456_789, False), ("tin+last_name", 4, None, True)]
    assert (a.match_rule, a.count) == ("tin+dob", 321)  # the one-rule fields: first rule
    assert len(facts.receipts) == 1
    assert all(k.value != 325 for k in facts.key_numbers)  # never a sum of the counts
    words = _words(render_report(facts))
    assert ("rule tin+last_name failed after its answer was released and stored (so it has "
            "no receipt): \u201cUNAVAILABLE: custodian unreachable\u201d") in words
    assert "Not answered: name+dob+zip." in words
    assert "No receipt for rule tin+last_name" in words
    assert "tin+last_name4withheld: below_minimum_count" in words
    assert "subjects found (per rule; they overlap, never added up)" in words


def test_a_count_announced_but_not_released_is_on_the_page() -> None:
    """The second rule's release was refused after its match challenge (the overlap rule):
    the page says which count the requester learned from the challenge, and only that."""
    summary = _aggregate_summary(
        aggregate_by_rule=[
            {"rule": "tin+dob", "count": 321, "sum": 123_456_789, "withheld": False,
             "reason": "", "session_id": "s-1", "receipt": SUMMARY["receipt"]}],
        aggregate_rules_unanswered=["tin+last_name"], aggregate_failed_rule="tin+last_name",
        aggregate_failure="PERMISSION_DENIED: release_overlap: 3 records differ",
        aggregate_counts_not_released={"tin+last_name": 318})
    facts = job_facts(summary, generated_at=NOW)
    assert facts.aggregate is not None
    assert facts.aggregate.counts_not_released == (("tin+last_name", 318),)
    html = render_report(facts)
    assert Page(html).facts["aggregate_not_released.tin+last_name.count"] == "318"
    assert ("Rule tin+last_name: the custodian announced a count of 318 in its match "
            "challenge, then did not release the answer.") in _words(html)
    # a summary without the key: nothing of the kind is said
    plain = _aggregate_summary()
    assert "match challenge, then did not release" not in _words(
        render_report(job_facts(plain, generated_at=NOW)))


def test_cardinality_rules_show_counts_and_no_total() -> None:
    summary = _aggregate_summary(aggregate_sum=None, tier="cardinality", aggregate_by_rule=[
        {"rule": rule, "count": count, "sum": None, "withheld": False, "reason": "",
         "session_id": f"s-{n}"}
        for n, (rule, count) in enumerate((("tin+dob", 40), ("tin+last_name", 38)), 1)])
    summary["authorization"] |= {"tier": "cardinality", "value_field": ""}
    html = render_report(job_facts(summary, generated_at=NOW))
    words = _words(html)
    assert words.count("not asked (cardinality tier: a count only)") == 2
    assert "A count per rule, each from its own session" in words
    assert "together" not in words and _overlap(words) == 2
    # what a peer-chosen string could inject is escaped like every other value
    assert {(t, n) for t, n, _ in Page(html).url_attrs} <= {("use", "href")}
