"""The policymaker's report (docs/architecture.md, Reports): the pure rendering, and the two
commands that gather its facts (``agency-a report`` over real mTLS, ``psi-authority
oversight --html`` on real exports).

The page itself in a real browser is tests/test_report_browser.py.
"""

from __future__ import annotations

import copy
import io
import json
import re
import stat
from collections.abc import Iterator
from contextlib import redirect_stdout
from html import unescape
from html.parser import HTMLParser
from itertools import pairwise
from typing import Any

import pytest

from agency_a import cli as cli_a
from protocol.accounting.oversight import Finding, OversightReport
from protocol.cli import authority as authority_cli
from protocol.domain.records import MATCH_RULES
from protocol.policy.decide import Tier
from protocol.report.facts import EXAMPLES_PER_REASON, job_facts, pick_refusal_examples
from protocol.report.render import COLOURS, render_report
from tests.helpers.report_job import (
    N_MATCHING,
    OPERATOR,
    REFUSED,
    ReportedJob,
    reported_job,
)

NOW = 1_796_000_000.0

#: A job summary as the requester service writes it (agency-a match --summary-json).
SUMMARY: dict[str, Any] = {
    "job_id": "job-0123456789abcdef", "authorization_id": "auth-1",
    "queries_submitted": 1000, "queries_accepted": 955, "queries_refused": 45,
    "refused_by_reason": {"placeholder_address": 31, "zip_only_address": 9,
                          "malformed_zip": 12},
    "refused_examples": [
        {"line": 17, "code": "placeholder_address",
         "detail": "address 'Failed to Provide' is a placeholder"},
        {"line": 40, "code": "zip_only_address",
         "detail": "address '20500' is only a ZIP or digits"},
        {"line": 41, "code": "malformed_zip", "detail": "zip '2050' is malformed"},
    ],
    "authorization": {
        "authorization_id": "auth-1", "statute": "26 U.S.C. 6103(i)(2)",
        "purpose": "locate subjects of open cases", "requester_id": "agency-a",
        "custodian_id": "agency-b", "not_before": 1_795_990_000, "not_after": 1_798_000_000,
        "tier": "identity", "mode": "bulk", "match_rules": ["tin+dob", "tin+last_name"],
        "disclosure_fields": ["address", "zip"], "max_evaluations": 1832,
        "max_disclosures": 1000, "retention_days": 90, "engines": ["oprf"],
        "value_field": "", "min_aggregate_count": 0},
    "submitted_at": NOW - 10, "session_id": "sess-1", "custodian_id": "agency-b",
    "elements_evaluated": 1832, "custodian_tags": 2000, "matches": 66,
    "matched_queries": 34, "matches_by_rule": {"tin+dob": 33, "tin+last_name": 33},
    "disclosed_records": 34, "disclosure_rows": 66, "disclosure_cap": 1000,
    "fields_disclosed": {"address": 66, "zip": 66},
    "receipt": {"authorization_id": "auth-1", "session_id": "sess-1",
                "custodian_id": "agency-b", "requester_id": "agency-a", "evaluated": 1832,
                "disclosed": 34, "transcript_hash": "ab" * 32,
                "custodian_signature": "cd" * 64, "requester_signature": "ef" * 64},
    "phase_started_at": {"validate": NOW - 9, "open": NOW - 8, "evaluate": NOW - 6,
                         "disclose": NOW - 3, "close": NOW - 1},
    "finished_at": NOW,
}
ROWS = [{"query_record_id": "Q-SECRET-7", "rule_id": "tin+dob", "pseudonym": "ps-1",
         "fields": {"address": "12 Main Street", "zip": "62701"}}]
ACCURACY = {"rules": [
    {"rule_id": "tin+dob", "strength": "strong", "precision": 0.9995, "recall": 0.97,
     "misidentification_rate": 0.0005},
    {"rule_id": "tin+last_name", "precision": "high", "recall": 0.9},  # not numbers: ignored
]}
SECTIONS = ("in-brief", "request", "refusals", "learned", "rules", "budget", "receipt",
            "timeline")


class Page(HTMLParser):
    """What the checks need from a page: headings, svgs, ids, data-facts and URL-bearing
    attributes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.headings: list[int] = []
        self.svgs: list[dict[str, str | None]] = []
        self.svg_children: list[str] = []
        self.ids: set[str] = set()
        self.facts: dict[str, str] = {}
        self.url_attrs: list[tuple[str, str, str | None]] = []
        self.tags: list[str] = []
        self._fact: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if re.fullmatch(r"h[1-6]", tag):
            self.headings.append(int(tag[1]))
        if tag == "svg":
            self.svgs.append(a)
        if tag in ("title", "desc") and self.svgs:
            self.svg_children.append(tag)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if a.get("data-fact"):
            self._fact = str(a["data-fact"])
        for name in ("src", "href", "xlink:href", "action", "srcset", "poster", "data"):
            if name in a:
                self.url_attrs.append((tag, name, a[name]))

    def handle_data(self, data: str) -> None:
        if self._fact is not None:
            self.facts[self._fact] = data
            self._fact = None


def render(summary: dict[str, Any] | None = None, **kw: Any) -> str:
    return render_report(job_facts(summary or SUMMARY, generated_at=NOW, **kw))


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two #rrggbb colours."""
    def luminance(c: str) -> float:
        channels = [int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        lin = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in channels]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


# ------------------------------------------------------------------------------ rendering


def test_every_section_is_there_and_the_numbers_equal_the_summary() -> None:
    text = render()
    page = Page(text)
    assert set(SECTIONS) <= page.ids
    assert "aggregate" not in page.ids and "rows" not in page.ids  # identity tier, no rows
    for key in ("queries_submitted", "queries_refused", "queries_accepted", "matches",
                "matched_queries", "disclosed_records", "elements_evaluated"):
        assert page.facts[key] == f"{SUMMARY[key]:,}", key
    a = SUMMARY["authorization"]
    for word in (a["statute"], a["purpose"], "agency-a", "agency-b", "tin+dob",
                 "tin+last_name", "address, zip", "1,832", "2026-12-"):
        assert word in text, word
    # refusals by reason, in plain words first, with the code and the count
    assert "placeholder address" in text and "ZIP-only address" in text
    assert re.search(r"<code>placeholder_address</code></td><td class=\"num\">31<", text)
    assert "<strong>45</strong> of 1,000 records were refused, for 52 reasons" in text
    # budget and cap used, and the receipt with both signatures
    assert "1,832 of 1,832 (100.0%)" in text and "34 of 1,000 (3.4%)" in text
    for value in ("ab" * 32, "cd" * 64, "ef" * 64):
        assert value in text
    # the timeline: every phase and the end, in order
    steps = re.findall(r"<li><time datetime=\"([^\"]+)\">", text)
    assert len(steps) == 8 and steps == sorted(steps)
    assert "authorization takes effect" in text
    assert "job finished" in text and "session opened" in text


def test_the_page_references_nothing_outside_itself() -> None:
    for text in (render(), render(rows=ROWS, accuracy=ACCURACY, accuracy_source="acc.json")):
        page = Page(text)
        # only same-document references (an SVG's markers), each to an id on the page
        assert {(tag, name) for tag, name, _ in page.url_attrs} <= {("use", "href")}
        targets = {str(value) for _, _, value in page.url_attrs}
        assert all(t.startswith("#") for t in targets) and {t[1:] for t in targets} <= page.ids
        assert not {"script", "link", "iframe", "img", "object", "embed", "base"} & set(
            page.tags)
        lowered = text.lower()
        for needle in ("http:", "https:", "//www", "@import", "@font-face", "ftp:"):
            assert needle not in lowered, needle
        assert re.findall(r"url\((?!#)", text) == []  # only same-document SVG references
        assert "<!doctype svg" not in lowered and "xmlns" not in lowered


def test_rows_only_when_asked_and_then_the_top_of_the_page_says_so() -> None:
    plain = unescape(render())
    assert "Q-SECRET-7" not in plain and "personal-data" not in plain
    assert "counts and aggregates only" in plain.lower()
    # examples: placeholder text is shown, a ZIP (or any other detail) only in a case file
    assert "address 'Failed to Provide' is a placeholder" in plain
    assert "20500" not in plain and "2050'" not in plain
    assert "line 40: ZIP-only address" in plain
    case = unescape(render(rows=ROWS))
    page = Page(case)
    assert {"rows", "personal-data"} <= page.ids
    banner = case.index('id="personal-data"')
    assert banner < case.index("<h1>")
    assert "This page contains personal data: the 1 disclosed rows" in case
    for value in ("Q-SECRET-7", "12 Main Street", "62701", "20500"):
        assert value in case


def test_rules_show_strength_and_measured_risk_or_say_not_measured() -> None:
    measured = render(accuracy=ACCURACY, accuracy_source="benchmarks/results/accuracy.json")
    for rule_id in ("tin+dob", "tin+last_name"):
        assert MATCH_RULES[rule_id].strength.name.lower() in measured
    assert "99.95%" in measured and "97.00%" in measured and "about 1 in 2,000" in measured
    assert "Measured: benchmarks/results/accuracy.json" in measured
    assert 'id="accuracy-title"' in measured  # the precision/recall chart
    # tin+last_name has no numeric precision: not measured, never invented
    row = re.search(r"<code>tin\+last_name</code>.*?</tr>", measured, re.S)
    assert row is not None and row.group(0).count("not measured") == 3
    for broken in (None, {"rules": "x"}, [], {"rules": [{"rule_id": "tin+dob",
                                                         "precision": 2.0, "recall": 0.5}]}):
        text = render(accuracy=broken, accuracy_source="somewhere")
        assert "not measured" in text and "Measured:" not in text
        assert 'id="accuracy-title"' not in text


def test_aggregate_tier_shows_the_answer_and_no_identity() -> None:
    summary = {k: v for k, v in SUMMARY.items()
               if k not in ("matches", "matched_queries", "matches_by_rule",
                            "disclosed_records")}
    summary["authorization"] = {**SUMMARY["authorization"], "tier": "aggregate",
                                "disclosure_fields": [], "value_field": "tax_paid_cents",
                                "min_aggregate_count": 10}
    summary.update({"tier": "aggregate", "match_rule": "tin+dob", "aggregate_count": 321,
                    "aggregate_sum": 123_456_789, "aggregate_withheld": False,
                    "aggregate_reason": ""})
    text = render(summary)
    page = Page(text)
    assert "aggregate" in page.ids
    assert page.facts["aggregate_count"] == "321" == page.facts["aggregate_answer_count"]
    assert "123,456,789" in text and "1,234,567.89" in text and "tax_paid_cents" in text
    summary.update({"aggregate_withheld": True, "aggregate_sum": None,
                    "aggregate_reason": "fewer than 10 contributors"})
    assert "withheld: fewer than 10 contributors" in render(summary)


def test_oversight_verdict_agree_or_the_first_disagreement() -> None:
    ok = OversightReport("auth-1", (Finding("counts", True, "evaluated 1832 = 1832"),))
    assert 'data-fact="oversight">AGREE<' in render(oversight=ok)
    bad = OversightReport("auth-1", (
        Finding("counts", True, "fine"),
        Finding("transcript_hash", False, "custodian ab.. != requester cd..", "sess-9"),
        Finding("checkpoint", False, "head not covered")))
    text = render(oversight=bad.to_json())  # the --json output, as agency-a report reads it
    assert 'data-fact="oversight">DISAGREE<' in text
    assert "2 of 3 checks failed" in text
    assert "transcript_hash (session sess-9): custodian ab.. != requester cd.." in text
    assert "head not covered" not in text  # the first disagreement, not all of them
    assert "not part of this page" in render()  # no verdict given: said so, none invented


def test_headings_charts_and_colours_are_accessible() -> None:
    for text in (render(accuracy=ACCURACY, accuracy_source="a"), render(rows=ROWS)):
        page = Page(text)
        assert page.headings.count(1) == 1 and page.headings[0] == 1
        for before, after in pairwise(page.headings):
            assert after <= before + 1, page.headings  # no level skipped
        assert page.svgs, "no chart"
        for svg in page.svgs:
            assert svg.get("role") == "img"
            assert svg.get("aria-label") and svg.get("aria-labelledby")
        assert page.svg_children.count("title") == page.svg_children.count("desc") == len(
            page.svgs)
    # the CSS's own colours, read back from the page
    css = dict(re.findall(r"--([a-z-]+): (#[0-9a-f]{6});", render()))
    assert css == COLOURS
    for fg, bg in (("text", "bg"), ("muted", "bg"), ("text", "head-bg"),
                   ("text", "banner-bg"), ("agree-text", "agree-bg"),
                   ("disagree-text", "disagree-bg"), ("muted", "head-bg")):
        assert contrast(css[fg], css[bg]) >= 4.5, (fg, bg)


def test_refusal_examples_are_a_few_per_reason() -> None:
    class R:
        def __init__(self, line: int, code: str) -> None:
            self.line, self.code, self.detail = line, code, f"detail {line}"

    refused = [R(i, "placeholder_address" if i % 2 else "missing_reason")
               for i in range(10_000)]
    picked = pick_refusal_examples(refused)
    assert len(picked) == 2 * EXAMPLES_PER_REASON
    assert picked[0] == {"line": 0, "code": "missing_reason", "detail": "detail 0"}


def test_a_refused_count_without_reasons_is_said_not_invented() -> None:
    summary = copy.deepcopy(SUMMARY) | {"refused_by_reason": {}, "refused_examples": []}
    page = unescape(re.sub(r"<[^>]+>", "", render(summary)))
    assert "45 of 1,000 records were refused; the summary does not list their reasons." in page
    assert "the most common" not in page


def test_rendering_does_not_change_the_facts() -> None:
    summary = copy.deepcopy(SUMMARY)
    render(summary, accuracy=ACCURACY, rows=ROWS)
    assert summary == SUMMARY


# ------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReportedJob]:
    with reported_job(tmp_path_factory.mktemp("report-job")) as running:
        yield running


def _report_entries(job: ReportedJob) -> list[dict[str, Any]]:
    return [dict(e.payload) for e in job.audit.audit_entries() if e.kind == "report_read"]


def test_agency_a_report_is_a_logged_access_with_the_job_numbers(job: ReportedJob) -> None:
    out = job.tmp / "report.html"
    before = len(_report_entries(job))
    assert cli_a.main(job.report_args(out, "--purpose", "brief the committee",
                                      "--oversight", str(job.oversight))) == 0
    text = unescape(out.read_text())
    page = Page(text)
    for key in ("queries_submitted", "queries_refused", "queries_accepted", "matches",
                "disclosed_records", "elements_evaluated"):
        assert page.facts[key] == f"{job.summary[key]:,}", key
    assert page.facts["oversight"] == "AGREE"
    assert job.summary["queries_refused"] == len(REFUSED)
    assert job.summary["refused_by_reason"] == {"placeholder_address": 2,
                                                "zip_only_address": 1}
    assert "'Failed to Provide' is a placeholder" in text and "'20500'" not in text
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # counts only: meant to be handed on
    entries = _report_entries(job)
    assert len(entries) == before + 1
    assert entries[-1] | {"authorization_id": None} == {
        "job_id": job.summary["job_id"], "operator": OPERATOR,
        "purpose": "brief the committee", "include_rows": False, "result_rows": 0,
        "authorization_id": None}
    assert entries[-1]["authorization_id"] == job.summary["authorization_id"]


def test_include_rows_is_a_results_read_and_the_page_says_so(job: ReportedJob) -> None:
    out = job.tmp / "case-file.html"
    reads = sum(1 for e in job.audit.audit_entries() if e.kind == "results_read")
    assert cli_a.main(job.report_args(out, "--purpose", "case 24-117 file",
                                      "--include-rows")) == 0
    text = unescape(out.read_text())
    assert 'id="personal-data"' in text and 'id="rows"' in text
    assert f"the {job.summary['disclosure_rows']} disclosed rows" in text
    assert "'20500'" in text  # the case file shows every refusal detail
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sum(1 for e in job.audit.audit_entries() if e.kind == "results_read") == reads + 1
    assert _report_entries(job)[-1]["include_rows"] is True


@pytest.mark.parametrize(("operator", "purpose", "status"), [
    ("mallory", "audit", "PERMISSION_DENIED: unknown_operator"),
    (OPERATOR, "  ", "INVALID_ARGUMENT: malformed: a report requires a purpose"),
])
def test_report_refusals_name_the_reason_and_write_nothing(
        job: ReportedJob, operator: str, purpose: str, status: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = job.tmp / f"refused-{operator}.html"
    before = len(_report_entries(job))
    assert cli_a.main(job.report_args(out, "--purpose", purpose, operator=operator)) == 1
    assert status in capsys.readouterr().err
    assert not out.exists() and len(_report_entries(job)) == before


def test_report_never_overwrites_without_force(job: ReportedJob) -> None:
    out = job.tmp / "kept.html"
    out.write_text("earlier")
    assert cli_a.main(job.report_args(out, "--purpose", "p")) == 2
    assert out.read_text() == "earlier"
    assert cli_a.main(job.report_args(out, "--purpose", "p", "--force")) == 0
    assert "Matching report" in out.read_text()


def test_aggregate_job_report_has_the_answer_and_no_identity(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    with reported_job(tmp_path_factory.mktemp("aggregate-report"),
                      tier=Tier.AGGREGATE) as agg:
        out = agg.tmp / "aggregate.html"
        assert cli_a.main(agg.report_args(out, "--purpose", "statistics for the committee",
                                          "--oversight", str(agg.oversight))) == 0
        summary, text = agg.summary, unescape(out.read_text())
        inspector = agg.tmp / "inspector.html"
        with redirect_stdout(io.StringIO()):
            assert authority_cli.main([
                "oversight", "--custodian-export", str(agg.custodian_export),
                "--requester-export", str(agg.requester_export),
                "--custodian-key", str(agg.custodian_pub),
                "--requester-key", str(agg.requester_pub), "--html", str(inspector)]) == 0
        seen_by_inspector = unescape(re.sub(r"<[^>]+>", " ", inspector.read_text()))
    # the inspector's page names the aggregate session's rule and counts its answer, not
    # (absent) disclosed records
    rules_row = re.search(r"Match rules allowed\s+(\S+)\s+Fields", seen_by_inspector)
    assert rules_row is not None and rules_row.group(1) == summary["match_rule"]
    assert re.search(r"Tier\s+aggregate: a count and a total", seen_by_inspector)
    assert "Aggregate answers given (closed sessions, by rule)" in seen_by_inspector
    page = Page(text)
    assert summary["tier"] == "aggregate" and summary["aggregate_count"] == N_MATCHING
    assert page.facts["aggregate_count"] == page.facts["aggregate_answer_count"] == str(
        N_MATCHING)
    assert page.facts["queries_refused"] == str(len(REFUSED))
    assert f"{summary['aggregate_sum']:,}" in text and "tax_paid_cents" in text
    assert page.facts["oversight"] == "AGREE"
    assert "aggregate" in page.ids and "personal-data" not in page.ids
    assert "q-c0" not in text  # no query record id of the requester's either
    # the timeline in the aggregate tier's own steps
    assert "honesty proof checked" in text and "verified disclosure" not in text


def test_oversight_html_is_the_inspectors_view_and_the_text_is_unchanged(
        job: ReportedJob) -> None:
    args = ["oversight", "--custodian-export", str(job.custodian_export),
            "--requester-export", str(job.requester_export),
            "--custodian-key", str(job.custodian_pub), "--requester-key", str(job.requester_pub)]
    plain, with_html = io.StringIO(), io.StringIO()
    with redirect_stdout(plain):
        assert authority_cli.main(args) == 0
    html_file = job.tmp / "inspector.html"
    with redirect_stdout(with_html):
        assert authority_cli.main([*args, "--html", str(html_file)]) == 0
    assert with_html.getvalue() == plain.getvalue()
    assert plain.getvalue().splitlines()[-1].startswith("AGREE")
    text = html_file.read_text()
    page = Page(text)
    custodian = json.loads(job.custodian_export.read_text())
    assert page.facts["oversight"] == "AGREE"
    assert page.facts["custodian_disclosed"] == f"{custodian['counts']['disclosed']:,}"
    assert page.facts["requester_disclosed"] == page.facts["custodian_disclosed"]
    assert page.facts["custodian_evaluated"] == f"{job.summary['elements_evaluated']:,}"
    assert set(SECTIONS) <= page.ids
    # counts only: no record id of the custodian's file reaches the page
    ids = {d["record_id"] for d in custodian["disclosures"]}
    assert ids and not [i for i in ids if re.search(rf"\b{re.escape(i)}\b", text)]
    assert all(str(value).startswith("#") for _, _, value in page.url_attrs)
