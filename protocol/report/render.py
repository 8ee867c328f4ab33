"""One self-contained HTML page from :class:`~protocol.report.facts.ReportFacts`.

Facts in, one string out (docs/architecture.md, Reports): inline CSS, charts as inline SVG
(``protocol.report.charts``), no script, no link, no font, no URL of any kind, so the page
works offline, cannot leak who opened it, and prints to A4 as it shows. Plain words come
first in every section and the numbers after them; every chart has a text alternative and a
table or sentence that states the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from protocol.report.charts import Bar, bar_chart, grouped_bar_chart
from protocol.report.facts import (
    REASON_WORDS,
    STRENGTH_WORDS,
    AggregateFacts,
    Gauge,
    ReportFacts,
    RuleAnswer,
    RuleFacts,
)

__all__ = ["COLOURS", "OVERLAP_WORDS", "render_report"]

#: Colour pairs of the page (text on background); each pair has at least 4.5:1 contrast
#: (WCAG 1.4.3), which tests/test_report_browser.py recomputes from the CSS.
COLOURS: dict[str, str] = {
    "text": "#1b1b1b",
    "bg": "#ffffff",
    "muted": "#4a4a4a",
    "rule": "#b0b7c0",
    "head-bg": "#eef2f7",
    "banner-bg": "#fff4ce",
    "banner-border": "#8a5a00",
    "agree-text": "#1d5a26",
    "agree-bg": "#e7f4ea",
    "disagree-text": "#8a1b1b",
    "disagree-bg": "#fbeaea",
}

_CSS = """
:root { %(vars)s }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%%; }
body { margin: 0; color: var(--text); background: var(--bg);
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  overflow-wrap: break-word; }
.page { max-width: 62rem; margin: 0 auto; padding: 1rem 1.25rem 3rem; }
h1 { font-size: 1.7rem; line-height: 1.25; margin: 0.5rem 0 0.75rem; }
h2 { font-size: 1.3rem; margin: 2.2rem 0 0.6rem; padding-top: 0.6rem;
  border-top: 2px solid var(--rule); }
h3 { font-size: 1.08rem; margin: 1.4rem 0 0.4rem; }
p, li { max-width: 48rem; }
.lede { font-size: 1.08rem; }
.muted, figcaption, footer { color: var(--muted); }
.banner { border: 3px solid var(--banner-border); background: var(--banner-bg);
  color: var(--text); padding: 0.75rem 1rem; margin: 0.5rem 0 1rem; font-weight: 600; }
.verdict { display: inline-block; padding: 0.2rem 0.6rem; font-weight: 700;
  border: 2px solid currentColor; }
.agree { color: var(--agree-text); background: var(--agree-bg); }
.disagree { color: var(--disagree-text); background: var(--disagree-bg); }
dl.numbers { display: grid; grid-template-columns: repeat(auto-fit, minmax(10.5rem, 1fr));
  gap: 0.6rem; margin: 1rem 0; }
dl.numbers div { border: 1px solid var(--rule); padding: 0.5rem 0.7rem; }
dl.numbers dt { font-size: 0.9rem; color: var(--muted); }
dl.numbers dd { margin: 0; font-size: 1.45rem; font-weight: 700;
  font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%%; margin: 0.6rem 0 1rem; }
th, td { text-align: left; vertical-align: top; padding: 0.35rem 0.5rem;
  border-bottom: 1px solid var(--rule); overflow-wrap: break-word; }
thead th { background: var(--head-bg); }
th[scope="row"] { width: 32%%; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.86em;
  overflow-wrap: anywhere; word-break: break-all; }
.wide { overflow-x: auto; }
figure { margin: 0.8rem 0 1.2rem; }
svg.chart { display: block; width: 100%%; max-width: 40rem; height: auto; }
ol.timeline { padding-left: 1.4rem; }
ol.timeline time { font-variant-numeric: tabular-nums; font-weight: 600; }
@media (max-width: 34rem) {
  .page { padding: 0.75rem 0.75rem 2rem; }
  h1 { font-size: 1.4rem; }
  th[scope="row"] { width: 40%%; }
  th, td { padding: 0.3rem 0.3rem; font-size: 0.92rem; }
}
@page { size: A4; margin: 14mm 13mm; }
@media print {
  body { font-size: 10.5pt; }
  .page { max-width: none; padding: 0; }
  h2 { break-after: avoid; }
  figure, dl.numbers, tr, .banner { break-inside: avoid; }
  .wide { overflow: visible; }
  svg.chart { max-width: 15cm; }
}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    return str(value)


def _when(ts: float | None) -> str:
    if ts is None:
        return "not stated"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pct(v: float | None) -> str:
    return "not measured" if v is None else f"{100 * v:.2f}%"


def _short(words: str) -> str:
    """A reason's words without their parenthetical example (chart labels, examples)."""
    return words.split(" (")[0]


def _list(items: Iterable[str], empty: str = "none") -> str:
    items = [escape(i) for i in items]
    return ", ".join(items) if items else empty


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: Sequence[int] = (),
           caption: str = "") -> str:
    """A table; cells are HTML already escaped by the caller."""
    cap = f'<caption class="muted">{escape(caption)}</caption>' if caption else ""
    num = ' class="num"'

    def cls(i: int) -> str:
        return num if i in numeric else ""

    th = "".join(f'<th scope="col"{cls(i)}>{escape(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return (f'<div class="wide"><table>{cap}<thead><tr>{th}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _pairs(rows: Iterable[tuple[str, str]]) -> str:
    body = "".join(f'<tr><th scope="row">{escape(k)}</th><td>{v}</td></tr>' for k, v in rows)
    return f"<table><tbody>{body}</tbody></table>"


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _title(f: ReportFacts) -> str:
    if f.view == "inspector":
        return f"Oversight report: authorization {f.request.authorization_id}"
    return f"Matching report: job {f.subject}"


def _lede(f: ReportFacts) -> str:
    r = f.request
    who = escape(r.requester_id or "The requester")
    whom = escape(r.custodian_id or "the custodian")
    law = f", under {escape(r.statute)}" if r.statute else ""
    why = f" (purpose: \u201c{escape(r.purpose)}\u201d)" if r.purpose else ""
    n = {k.key: k.value for k in f.key_numbers}
    parts: list[str] = []
    if f.view == "inspector":
        parts.append(f"This page is the inspector's account of authorization "
                     f"<code>{escape(r.authorization_id)}</code>: {who} asked {whom} to match "
                     f"people{law}. The custodian's ledger records "
                     f"{_fmt(n.get('custodian_disclosed', 0))} records disclosed in "
                     f"{_fmt(n.get('receipts', 0))} signed sessions.")
    elif f.aggregate is not None and f.aggregate.several_rules:
        a = f.aggregate
        asked = len(a.by_rule) + len(a.rules_unanswered)
        answers = "; ".join(
            f"rule <code>{escape(r.rule_id)}</code>: {_fmt(r.count)}"
            + ("" if r.total is None or r.withheld else
               f", together {_fmt(r.total)} in {escape(a.value_field or 'value')}")
            + (" (total withheld)" if r.withheld else "") for r in a.by_rule)
        parts.append(f"{who} asked {whom}{law}{why} how many of its "
                     f"{_fmt(n.get('queries_accepted', 0))} subjects are in the custodian's "
                     f"file under each of {_fmt(asked)} match rules, without learning which. "
                     f"{_fmt(n.get('queries_refused', 0))} of the "
                     f"{_fmt(n.get('queries_submitted', 0))} records it submitted were refused "
                     f"before anything ran. The answers, one per rule: {answers}. "
                     f"{OVERLAP_WORDS}"
                     + (f" {_stopped_words(a)}" if a.answered_in_part else "")
                     + " No one's identity was released.")
    elif f.aggregate is not None:
        a = f.aggregate
        parts.append(f"{who} asked {whom}{law}{why} how many of its "
                     f"{_fmt(n.get('queries_accepted', 0))} subjects are in the custodian's "
                     f"file, without learning which. {_fmt(n.get('queries_refused', 0))} of "
                     f"the {_fmt(n.get('queries_submitted', 0))} records it submitted were "
                     f"refused before anything ran. The answer: {_fmt(a.count)}"
                     + ("" if a.total is None or a.withheld else
                        f", together {_fmt(a.total)} in {escape(a.value_field or 'value')}")
                     + ". No one's identity was released.")
    else:
        parts.append(f"{who} asked {whom}{law}{why} to find "
                     f"{_fmt(n.get('queries_accepted', 0))} people. "
                     f"{_fmt(n.get('queries_refused', 0))} of the "
                     f"{_fmt(n.get('queries_submitted', 0))} records it submitted were refused "
                     f"before anything ran. {_fmt(n.get('matched_queries', 0))} people were "
                     f"found, and {_fmt(n.get('disclosed_records', 0))} of the custodian's "
                     f"records were disclosed with only the fields "
                     f"{_list(f.request.disclosure_fields, 'none')}.")
    if f.oversight is not None:
        parts.append("An inspector compared both agencies' accounts: "
                     + ("they <strong>agree</strong>." if f.oversight.agree else
                        "they <strong>disagree</strong> (see below)."))
    else:
        parts.append("Whether both agencies' accounts agree is checked by an inspector "
                     "(<code>psi-authority oversight</code>); that check is not part of this "
                     "page.")
    return f'<p class="lede">{" ".join(parts)}</p>'


def _numbers(f: ReportFacts) -> str:
    items = "".join(f'<div><dt>{escape(k.label)}</dt><dd data-fact="{escape(k.key)}">'
                    f"{escape(_fmt(k.value))}</dd></div>" for k in f.key_numbers)
    return f'<section id="in-brief"><h2>In brief</h2><dl class="numbers">{items}</dl></section>'


def _request(f: ReportFacts) -> str:
    r = f.request
    unknown = '<span class="muted">not in the exports</span>'

    def known(value: str) -> str:
        return escape(value) if value else unknown

    tier_words = {"identity": "identity: matched people and the permitted fields",
                  "aggregate": "aggregate: a count and a total, no identity",
                  "cardinality": "cardinality: a count only, no identity"}
    rows = [
        ("Authorization", f"<code>{escape(r.authorization_id)}</code>"),
        ("Statute", known(r.statute)),
        ("Purpose", known(r.purpose)),
        ("Requester", known(r.requester_id)),
        ("Custodian", known(r.custodian_id)),
        ("Valid", (f"from {_when(r.not_before)} " if r.not_before is not None else "")
         + (f"until {_when(r.not_after)}" if r.not_after is not None else "")),
        ("Tier", known(tier_words.get(r.tier, r.tier))
         + (f" ({escape(r.mode)} mode)" if r.mode else "")),
        ("Match rules allowed", _list(r.match_rules) if r.match_rules else unknown),
        ("Fields that may be disclosed", _list(r.disclosure_fields, "none")
         if f.view == "requester" else unknown),
        ("Budget: evaluations", _fmt(r.max_evaluations) if r.max_evaluations is not None
         else unknown),
        ("Cap: records disclosed", _fmt(r.max_disclosures) if r.max_disclosures is not None
         else unknown),
    ]
    if r.retention_days is not None:
        rows.append(("Results kept for", f"{r.retention_days:,} days, then purged"))
    if r.value_field:
        rows.append(("Value summed", escape(r.value_field)
                     + f" (withheld below {r.min_aggregate_count:,} people)"))
    plain = ("An authority signed this authorization before anything ran. It names who may ask "
             "whom, under which law and for what purpose, how people may be matched, what may "
             "be disclosed, and how much: the budget counts every evaluation, the cap every "
             "record disclosed.")
    return (f'<section id="request"><h2>The request</h2><p>{plain}</p>'
            f"{_pairs(rows)}</section>")


def _refusals(f: ReportFacts) -> str:
    head = '<section id="refusals"><h2>What was refused before anything ran</h2>'
    if not f.refusals_known:
        return head + "".join(f"<p>{escape(n)}</p>" for n in f.notes) + "</section>"
    reasons = sum(f.refused_by_reason.values())
    total = f.queries_refused if f.queries_refused is not None else reasons
    plain = ("Every query record was checked before the authorization was used: records with "
             "a placeholder address, a ZIP code given as the address, or without tax periods, "
             "statute or reason are refused one by one with a reason, and never matched. ")
    if not total and not reasons:
        return head + f"<p>{plain}None of the {_fmt(f.queries_submitted or 0)} records was " \
                      "refused.</p></section>"
    items = sorted(f.refused_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    words = [REASON_WORDS.get(code, code) for code, _ in items]
    if not items:  # a count without its reasons: say so rather than invent any
        return head + (f"<p>{plain}<strong>{_fmt(total)}</strong> of "
                       f"{_fmt(f.queries_submitted or 0)} records were refused; the summary "
                       "does not list their reasons.</p></section>")
    plain += (f"<strong>{_fmt(total)}</strong> of {_fmt(f.queries_submitted or 0)} records "
              f"were refused, for {_fmt(reasons)} reasons (a record can have more than one); "
              f"the most common: {escape(words[0])}.")
    chart = bar_chart([Bar(_short(REASON_WORDS.get(c, c)), n) for c, n in items],
                      chart_id="refusals", title="Reasons query records were refused")
    table = _table(("reason", "code", "records with this reason"),
                   ((escape(w), f"<code>{escape(c)}</code>", _fmt(n))
                    for w, (c, n) in zip(words, items, strict=True)), numeric=(2,))
    examples = ""
    if f.refusal_examples:
        lis = "".join(
            f"<li>line {e.line:,}: {escape(_short(REASON_WORDS.get(e.reason, e.reason)))}"
            + (f" \u2014 {escape(e.detail)}" if e.detail else "") + "</li>"
            for e in f.refusal_examples)
        examples = ("<h3>Examples</h3><p class=\"muted\">Line numbers of the submitted file; "
                    "details are shown only where they name no one (placeholder text)"
                    + (" or because this page includes the case file" if f.rows is not None
                       else "") + ".</p>" + f"<ul>{lis}</ul>")
    return (head + f"<p>{plain}</p>"
            + _figure(chart, "Refusal reasons and how many records had each (the table below "
                      "has the same numbers).")
            + table + examples + "</section>")


def _parties(f: ReportFacts) -> str:
    rows = ((escape(p.name), escape(p.learned), escape(p.not_learned)) for p in f.parties)
    return ('<section id="learned"><h2>What each party learned, and did not learn</h2>'
            "<p>The match is private on both sides: each party learns only what the "
            "authorization allows, and the rest stays hidden by cryptography, not by "
            "promise.</p>" + _table(("party", "learned", "did not learn"), rows)
            + "</section>")


def _risk_words(r: RuleFacts) -> str:
    if r.misidentification_rate is None:
        return "not measured"
    if r.misidentification_rate <= 0:
        return "no wrong match measured (0%)"
    return (f"{100 * r.misidentification_rate:.2f}% of matches "
            f"(about 1 in {max(round(1 / r.misidentification_rate), 1):,})")


def _rules(f: ReportFacts) -> str:
    plain = ("A match rule says which fields must agree for two records to count as the same "
             "person. Strong rules use a taxpayer id; weak ones only name and address and "
             "misidentify people more often. The misidentification risk is the share of a "
             "rule's matches that were the wrong person when the rule was measured against a "
             "synthetic population with known truth.")
    source = (f" Measured: {escape(f.accuracy_source)}." if f.accuracy_source else
              " No accuracy measurement was available to this report, so the risk is shown "
              "as \u201cnot measured\u201d.")
    rows = ((f"<code>{escape(r.rule_id)}</code>", escape(r.description),
             escape(STRENGTH_WORDS.get(r.strength, r.strength)), _fmt(r.matches),
             _pct(r.precision), _pct(r.recall), escape(_risk_words(r))) for r in f.rules)
    table = _table(("rule", "fields compared", "strength class", f.matches_label, "precision",
                    "recall", "misidentification risk"), rows, numeric=(3, 4, 5))
    charts = ""
    if f.rules:
        charts += _figure(bar_chart([Bar(r.rule_id, r.matches) for r in f.rules],
                                    chart_id="matches",
                                    title=f"{f.matches_label.capitalize()}, by rule"),
                          f"{f.matches_label.capitalize()}, by rule (the table has the same "
                          "numbers).")
    measured = [r for r in f.rules if r.measured]
    if measured:
        charts += _figure(grouped_bar_chart(
            [r.rule_id for r in measured],
            [("precision", [100 * (r.precision or 0) for r in measured]),
             ("recall", [100 * (r.recall or 0) for r in measured])],
            chart_id="accuracy", title="Measured precision and recall per rule"),
            "Precision (share of matches that are right) and recall (share of true matches "
            "found) per rule, in percent.")
    else:
        charts += ("<p class=\"muted\">Precision and recall per rule: not measured "
                   "(no accuracy report was given).</p>")
    return (f'<section id="rules"><h2>Matches by rule, and how often each rule is wrong</h2>'
            f"<p>{plain}{source}</p>{table}{charts}</section>")


def _gauge_words(g: Gauge) -> str:
    if g.limit is None:
        return f"{_fmt(g.used)} (limit not stated)"
    share = 100 * g.used / g.limit if g.limit else 0.0
    return f"{_fmt(g.used)} of {_fmt(g.limit)} ({share:.1f}%)"


def _budget(f: ReportFacts) -> str:
    plain = ("The budget is counted before each evaluation and never refunded; the cap is "
             "counted as each record is disclosed, and written to the custodian's ledger "
             "before the record leaves. Neither can be exceeded.")
    rows = ((escape(g.label), escape(_gauge_words(g))) for g in f.gauges)
    limited = [g for g in f.gauges if g.limit]
    chart = ""
    if limited:
        chart = _figure(bar_chart(
            [Bar(g.label, 100 * g.used / (g.limit or 1)) for g in limited],
            chart_id="budget", title="Share of the budget and of the disclosure cap used",
            unit="%", limit=100),
            "Share of each limit used, in percent; the dashed line is the limit.")
    notes = "".join(f"<p><strong>{escape(n)}</strong></p>" for n in f.notes
                    if f.view == "requester")
    return (f'<section id="budget"><h2>Budget and disclosure cap used</h2><p>{plain}</p>'
            f"{_table(('limit', 'used'), rows)}{chart}{notes}</section>")


def _total(answer: RuleAnswer, value_field: str) -> str:
    """One answer's total in words (HTML): the number, why it was withheld, or not asked."""
    if answer.withheld:
        return f"withheld: {escape(answer.reason)}"
    if answer.total is None:
        return "not asked (cardinality tier: a count only)"
    return _fmt(answer.total) + (f" ({answer.total / 100:,.2f} if the values are cents)"
                                 if value_field.endswith("_cents") else "")


#: Said wherever several rules' counts stand side by side (docs/architecture.md, Aggregate
#: and cardinality tiers).
OVERLAP_WORDS = ("These counts overlap: one person can be found by several rules, so they "
                 "must not be added up (nor their totals).")


def _stopped_words(a: AggregateFacts) -> str:
    """A job stopped by a later rule's refusal: which rule, which refusal, what was kept."""
    what = ("failed after its answer was released and stored (so it has no receipt)"
            if a.failed_rule in {r.rule_id for r in a.by_rule} else "refused")
    refusal = (f": \u201c{escape(a.failure)}\u201d" if a.failure else
               "; the refusal's message is not in this summary (the job's failure message, "
               "printed by <code>agency-a match</code>, names it)")
    answered = ", ".join(f"<code>{escape(r.rule_id)}</code>" for r in a.by_rule)
    rest = ", ".join(f"<code>{escape(r)}</code>" for r in a.rules_unanswered) or "none"
    return (f"The job stopped before every rule was answered: rule "
            f"<code>{escape(a.failed_rule)}</code> {what}{refusal}. Answered and stored "
            f"(readable with <code>agency-a results</code>): {answered}. Not answered: {rest}.")


def _not_released(a: AggregateFacts) -> str:
    """Counts the requester learned from a match challenge whose answer was not released."""
    return "".join(
        f'<p class="not-released"><strong>Rule <code>{escape(rule)}</code>: the custodian '
        f'announced a count of <span data-fact="aggregate_not_released.{escape(rule)}.count">'
        f"{_fmt(count)}</span> in its match challenge, then did not release the answer. "
        "The requester knows this count and nothing else of that rule.</strong></p>"
        for rule, count in a.counts_not_released)


def _aggregate(f: ReportFacts) -> str:
    a = f.aggregate
    if a is None:
        return ""
    plain = ("The custodian counted the matches and added up their values itself; the "
             "requester received only the answer, never which people or any one value. A "
             "total is withheld when fewer people contribute than the authorization's "
             "minimum, and a release differing from an earlier one by fewer people is refused.")
    if a.several_rules:
        return _aggregate_by_rule(a, plain)
    rows = [("Matched by rule", f"<code>{escape(a.match_rule)}</code>"),
            ("Subjects in the custodian's file", f'<span data-fact="aggregate_answer_count">'
             f"{_fmt(a.count)}</span>"),
            (f"Total of {a.value_field or 'the value'}", _total(a.by_rule[0], a.value_field))]
    if a.min_count:
        rows.append(("Smallest group a total is released for", _fmt(a.min_count)))
    return (f'<section id="aggregate"><h2>The aggregate answer</h2><p>{plain}</p>'
            f"{_pairs(rows)}{_not_released(a)}</section>")


def _aggregate_by_rule(a: AggregateFacts, plain: str) -> str:
    """Several rules: one answer per rule, each from its own session, side by side."""
    plain += (" Each rule was answered in its own session, with its own receipt; the "
              "minimum and the overlap rule apply to each rule on its own.")
    value = a.value_field or "the value"
    rows = ((f"<code>{escape(r.rule_id)}</code>",
             f'<span data-fact="aggregate_by_rule.{escape(r.rule_id)}.count">'
             f"{_fmt(r.count)}</span>", _total(r, a.value_field),
             f"<code>{escape(r.session_id)}</code>" if r.session_id else "not recorded")
            for r in a.by_rule)
    table = _table(("rule", "subjects found", f"total of {value}", "session"), rows,
                   numeric=(1,), caption="One answer per rule, in the order they ran.")
    extra = ""
    if a.min_count:
        extra += (f"<p>Smallest group a total is released for: {_fmt(a.min_count)} "
                  "people, per rule.</p>")
    if a.answered_in_part:
        extra += f'<p id="aggregate-stopped"><strong>{_stopped_words(a)}</strong></p>'
    extra += _not_released(a)
    return (f'<section id="aggregate"><h2>The aggregate answers, one per rule</h2>'
            f"<p>{plain}</p>{table}"
            f'<p id="aggregate-overlap"><strong>{OVERLAP_WORDS}</strong></p>{extra}</section>')


def _receipt(f: ReportFacts) -> str:
    plain = ("At the end of every session the custodian signs a receipt (how many evaluations "
             "and disclosures, and a hash of everything exchanged) and the requester "
             "countersigns it; both keep it. An inspector compares the two agencies' ledgers "
             "and receipts.")
    parts = [f"<p>{plain}</p>"]
    # several aggregate rules: one session, so one receipt, per rule
    rule_of_session = {a.session_id: a.rule_id for a in f.aggregate.by_rule
                       if a.session_id} if f.aggregate is not None else {}
    if f.receipt_note:
        parts.append(f"<p><strong>{escape(f.receipt_note)}</strong></p>")
    for i, r in enumerate(f.receipts[:20]):
        rows = [("Session", f"<code>{escape(str(r.get('session_id', '')))}</code>"),
                ("Evaluated", _fmt(r.get("evaluated", ""))),
                ("Disclosed", _fmt(r.get("disclosed", ""))),
                ("Transcript hash", f"<code>{escape(str(r.get('transcript_hash', '')))}</code>"),
                ("Custodian's signature",
                 f"<code>{escape(str(r.get('custodian_signature', '')))}</code>"),
                ("Requester's countersignature",
                 f"<code>{escape(str(r.get('requester_signature', '') or 'missing'))}</code>")]
        if len(f.receipts) > 1:
            rule = rule_of_session.get(str(r.get("session_id", "")))
            parts.append(f"<h3>Receipt {i + 1} of {len(f.receipts)}"
                         + (f": rule {escape(rule)}" if rule else "") + "</h3>")
        parts.append(_pairs(rows))
    if len(f.receipts) > 20:
        parts.append(f"<p>{len(f.receipts) - 20:,} more receipts are in the exports.</p>")
    if not f.receipts:
        parts.append("<p>No receipt is recorded.</p>")
    o = f.oversight
    if o is None:
        parts.append("<h3>Oversight</h3><p>Not checked on this page: an inspector runs "
                     "<code>psi-authority oversight</code> on both agencies' exports (or "
                     "<code>agency-a report --oversight</code> includes its result).</p>")
    elif o.agree:
        parts.append(f'<h3>Oversight</h3><p><span class="verdict agree" '
                     f'data-fact="oversight">AGREE</span> All {o.checks:,} checks passed: '
                     "counts, transcript hashes, both signatures on every receipt, and both "
                     "audit chains covered by signed checkpoints.</p>")
    else:
        parts.append(f'<h3>Oversight</h3><p><span class="verdict disagree" '
                     f'data-fact="oversight">DISAGREE</span> {o.failures:,} of {o.checks:,} '
                     f"checks failed. The first disagreement: "
                     f"<strong>{escape(o.first_disagreement)}</strong></p>")
    return (f'<section id="receipt"><h2>The signed receipt and the oversight result</h2>'
            f"{''.join(parts)}</section>")


def _timeline(f: ReportFacts) -> str:
    if not f.timeline:
        return ('<section id="timeline"><h2>Timeline</h2><p>No times were recorded for this '
                "job.</p></section>")
    items = "".join(
        f'<li><time datetime="{datetime.fromtimestamp(e.at, UTC).isoformat()}">'
        f"{_when(e.at)}</time> \u2014 {escape(e.what)}</li>" for e in f.timeline)
    return ('<section id="timeline"><h2>Timeline</h2><p>What happened, in order (times in '
            f'UTC).</p><ol class="timeline">{items}</ol></section>')


def _rows(f: ReportFacts) -> str:
    if f.rows is None:
        return ""
    names = list(dict.fromkeys(k for r in f.rows for k in (r.get("fields") or {})))
    rows = ((escape(str(r.get("query_record_id", ""))), escape(str(r.get("rule_id", ""))),
             f"<code>{escape(str(r.get('pseudonym', '')))}</code>",
             *(escape(str((r.get("fields") or {}).get(n, ""))) for n in names))
            for r in f.rows)
    return ('<section id="rows"><h2>Disclosed rows (case file)</h2><p>Personal data: every '
            f"row the custodian disclosed for this job ({len(f.rows):,}), as stored by the "
            "requester. Handle this page under the agency's rules for case files.</p>"
            + _table(("query record", "rule", "custodian pseudonym", *names), rows)
            + "</section>")


def render_report(facts: ReportFacts) -> str:
    """The whole page as one HTML string (UTF-8 when written)."""
    title = _title(facts)
    banner = ""
    if facts.rows is not None:
        banner = (f'<p class="banner" role="note" id="personal-data">This page contains '
                  f"personal data: the {len(facts.rows):,} disclosed rows of this job are "
                  "included for a case file (at the end of the page). Handle it as a case "
                  "file.</p>")
    else:
        banner_text = ("Counts and aggregates only: this page names no person."
                       if facts.view == "requester" else
                       "Counts only: this page names no person and shows no disclosed value.")
        banner = f'<p class="muted">{banner_text}</p>'
    css_vars = " ".join(f"--{k}: {v};" for k, v in COLOURS.items())
    view = ("Requester's report (agency-a report)" if facts.view == "requester"
            else "Inspector's report (psi-authority oversight)")
    body = "".join((
        _numbers(facts), _request(facts), _refusals(facts), _parties(facts), _rules(facts),
        _budget(facts), _aggregate(facts), _receipt(facts), _timeline(facts), _rows(facts),
    ))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="gated-psi report">'
        f"<title>{escape(title)}</title><style>{_CSS % {'vars': css_vars}}</style></head>"
        f'<body><div class="page"><header>{banner}<h1>{escape(title)}</h1>'
        f'<p class="muted">{escape(view)}, generated {_when(facts.generated_at)}.</p>'
        f"{_lede(facts)}</header><main>{body}</main>"
        '<footer><p>This page is self-contained: it loads nothing and runs no script. '
        "Its numbers come from the agencies' own records (the job summary, the ledgers' "
        "exports and the signed receipts).</p></footer></div></body></html>\n"
    )
