"""The facts a report shows, gathered from what the agencies already keep.

Two sources, one shape (:class:`ReportFacts`), so both views render with the same code:

* :func:`job_facts`: the requester's view of one job, from its summary (the same dict
  ``agency-a match --summary-json`` writes: the authorization, refusals by reason with a few
  examples, matches by rule, the receipt, the timeline), optionally with an oversight result
  and the disclosed rows;
* :func:`inspector_facts`: the inspector's view of one authorization, from the two oversight
  exports and the :class:`~protocol.accounting.oversight.OversightReport` on them.

Per-person data stays out unless rows are passed in explicitly: examples of refused query
lines show the line number and the reason, and their detail only where it names no one (a
placeholder address). Measured accuracy comes from the accuracy benchmark's JSON when a copy
is given; otherwise the page says "not measured" and invents nothing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol.accounting.oversight import OversightReport
from protocol.domain.records import MATCH_RULES, ReasonCode, Strength

__all__ = [
    "AGGREGATE_FAILURE_KEYS",
    "PHASE_WORDS",
    "REASON_WORDS",
    "STRENGTH_WORDS",
    "UNRELEASED_COUNTS_KEY",
    "AggregateFacts",
    "Gauge",
    "KeyNumber",
    "OversightFacts",
    "Party",
    "RefusalExample",
    "ReportFacts",
    "RequestFacts",
    "RuleAnswer",
    "RuleFacts",
    "TimelineEvent",
    "accuracy_by_rule",
    "aggregate_facts",
    "inspector_facts",
    "job_facts",
    "oversight_facts",
    "pick_refusal_examples",
    "refusal_examples",
]

#: Each refusal reason in plain words (what a policymaker reads before the code).
REASON_WORDS: dict[str, str] = {
    ReasonCode.MISSING_RECORD_ID: "no record id",
    ReasonCode.DUPLICATE_RECORD_ID: "the same record id twice",
    ReasonCode.MISSING_NAME: "no name",
    ReasonCode.PLACEHOLDER_ADDRESS: "placeholder address (e.g. \"Failed to Provide\")",
    ReasonCode.ZIP_ONLY_ADDRESS: "ZIP-only address (a ZIP code given as the address)",
    ReasonCode.MISSING_ADDRESS: "no address",
    ReasonCode.MALFORMED_ZIP: "malformed ZIP code",
    ReasonCode.MALFORMED_TIN: "malformed taxpayer id (TIN)",
    ReasonCode.IMPOSSIBLE_DOB: "impossible date of birth",
    ReasonCode.MISSING_TAX_PERIODS: "no tax periods named",
    ReasonCode.MALFORMED_TAX_PERIOD: "malformed tax period",
    ReasonCode.MISSING_STATUTE: "no statute cited",
    ReasonCode.MISSING_REASON: "no reason given",
}
#: Reasons whose detail names no one (the placeholder text itself), shown by default.
_DETAIL_SAFE = frozenset({ReasonCode.PLACEHOLDER_ADDRESS.value})
EXAMPLES_PER_REASON = 3

STRENGTH_WORDS: dict[str, str] = {
    Strength.STRONG.name.lower(): "strong: a unique identifier with a second field",
    Strength.MEDIUM.name.lower(): "medium: name, birth date and area, no identifier",
    Strength.WEAK.name.lower(): "weak: name and address only, high misidentification risk",
}


@dataclass(frozen=True)
class RequestFacts:
    """What was asked, under which authority (the signed authorization's terms)."""

    authorization_id: str
    statute: str = ""
    purpose: str = ""
    requester_id: str = ""
    custodian_id: str = ""
    not_before: int | None = None
    not_after: int | None = None
    tier: str = ""
    mode: str = ""
    match_rules: tuple[str, ...] = ()
    disclosure_fields: tuple[str, ...] = ()
    max_evaluations: int | None = None
    max_disclosures: int | None = None
    retention_days: int | None = None
    engines: tuple[str, ...] = ()
    value_field: str = ""
    min_aggregate_count: int = 0

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RequestFacts:
        """From ``Authorization.to_json()`` (missing keys stay unknown)."""
        def opt_int(key: str) -> int | None:
            value = d.get(key)
            return int(value) if isinstance(value, int | float) else None

        return cls(
            authorization_id=str(d.get("authorization_id", "")),
            statute=str(d.get("statute", "")), purpose=str(d.get("purpose", "")),
            requester_id=str(d.get("requester_id", "")),
            custodian_id=str(d.get("custodian_id", "")),
            not_before=opt_int("not_before"), not_after=opt_int("not_after"),
            tier=str(d.get("tier", "")), mode=str(d.get("mode", "")),
            match_rules=tuple(str(r) for r in d.get("match_rules") or ()),
            disclosure_fields=tuple(str(f) for f in d.get("disclosure_fields") or ()),
            max_evaluations=opt_int("max_evaluations"),
            max_disclosures=opt_int("max_disclosures"),
            retention_days=opt_int("retention_days"),
            engines=tuple(str(e) for e in d.get("engines") or ()),
            value_field=str(d.get("value_field", "") or ""),
            min_aggregate_count=int(d.get("min_aggregate_count") or 0),
        )


@dataclass(frozen=True)
class KeyNumber:
    """One headline number; ``key`` names the summary field it equals (for checking)."""

    key: str
    label: str
    value: int | float | str


@dataclass(frozen=True)
class RefusalExample:
    """One refused query line: where, why, and the detail when it names no one."""

    line: int
    reason: str
    detail: str


@dataclass(frozen=True)
class Party:
    """What one party learned and what it did not."""

    name: str
    learned: str
    not_learned: str


@dataclass(frozen=True)
class RuleFacts:
    """One match rule: how many matches it made and how often it is wrong."""

    rule_id: str
    description: str
    strength: str
    matches: int
    precision: float | None = None
    recall: float | None = None
    misidentification_rate: float | None = None

    @property
    def measured(self) -> bool:
        return self.precision is not None and self.recall is not None


@dataclass(frozen=True)
class Gauge:
    """A limit and how much of it is used."""

    label: str
    used: int
    limit: int | None


@dataclass(frozen=True)
class OversightFacts:
    """The inspector's verdict: AGREE, or the first disagreement."""

    agree: bool
    authorization_id: str
    checks: int
    failures: int
    first_disagreement: str = ""


@dataclass(frozen=True)
class RuleAnswer:
    """One rule's aggregate answer, released in that rule's own session."""

    rule_id: str
    count: int
    total: int | None
    withheld: bool
    reason: str
    session_id: str = ""


@dataclass(frozen=True)
class AggregateFacts:
    """An aggregate or cardinality answer (no identity behind it).

    ``match_rule`` .. ``reason`` are the first rule's answer (a one-rule job's only one);
    ``by_rule`` holds every answered rule, in the order run (docs/architecture.md, Aggregate
    and cardinality tiers). A job stopped by a later rule's refusal names that rule, the
    refusal when the summary carries it, and the rules never answered.
    """

    tier: str
    match_rule: str
    count: int
    total: int | None
    withheld: bool
    reason: str
    value_field: str = ""
    min_count: int = 0
    by_rule: tuple[RuleAnswer, ...] = ()
    rules_unanswered: tuple[str, ...] = ()
    failed_rule: str = ""
    failure: str = ""
    #: (rule, count) announced in a match challenge whose answer was then not released
    counts_not_released: tuple[tuple[str, int], ...] = ()

    @property
    def several_rules(self) -> bool:
        """Counts of several rules overlap (one person can match under each): never added."""
        return len(self.by_rule) > 1 or bool(self.failed_rule)

    @property
    def answered_in_part(self) -> bool:
        return bool(self.failed_rule)


@dataclass(frozen=True)
class TimelineEvent:
    """Something that happened, when (unix seconds)."""

    at: float
    what: str


@dataclass(frozen=True)
class ReportFacts:
    """Everything one page shows (docs/architecture.md, Reports)."""

    view: str  # "requester" (agency-a report) or "inspector" (psi-authority oversight)
    subject: str  # job id or authorization id
    generated_at: float
    request: RequestFacts
    key_numbers: tuple[KeyNumber, ...] = ()
    queries_submitted: int | None = None
    queries_refused: int | None = None
    refused_by_reason: Mapping[str, int] = field(default_factory=dict)
    refusal_examples: tuple[RefusalExample, ...] = ()
    refusals_known: bool = True
    parties: tuple[Party, ...] = ()
    rules: tuple[RuleFacts, ...] = ()
    #: What ``RuleFacts.matches`` counts on this page.
    matches_label: str = "matches"
    accuracy_source: str = ""
    gauges: tuple[Gauge, ...] = ()
    receipts: tuple[Mapping[str, Any], ...] = ()
    receipt_note: str = ""
    oversight: OversightFacts | None = None
    aggregate: AggregateFacts | None = None
    timeline: tuple[TimelineEvent, ...] = ()
    rows: tuple[Mapping[str, Any], ...] | None = None
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def _rate(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) and 0.0 <= v <= 1.0 else None


def accuracy_by_rule(doc: Any) -> dict[str, dict[str, float]]:
    """Measured precision, recall and misidentification rate per rule from the accuracy JSON.

    Read defensively (the file may be absent, partial or of another shape): a rule appears
    only with both precision and recall as numbers in [0, 1]; anything else is "not measured".
    """
    out: dict[str, dict[str, float]] = {}
    rules = doc.get("rules") if isinstance(doc, Mapping) else None
    if not isinstance(rules, list):
        return out
    for item in rules:
        if not isinstance(item, Mapping) or not isinstance(item.get("rule_id"), str):
            continue
        precision, recall = _rate(item.get("precision")), _rate(item.get("recall"))
        if precision is None or recall is None:
            continue
        measured = {"precision": precision, "recall": recall}
        mis = _rate(item.get("misidentification_rate"))
        measured["misidentification_rate"] = 1.0 - precision if mis is None else mis
        out[item["rule_id"]] = measured
    return out


def _rule_facts(matches: Mapping[str, int], rule_ids: Sequence[str],
                accuracy: Mapping[str, Mapping[str, float]]) -> tuple[RuleFacts, ...]:
    out = []
    for rule_id in dict.fromkeys([*rule_ids, *matches]):
        rule = MATCH_RULES.get(rule_id)
        measured = accuracy.get(rule_id, {})
        out.append(RuleFacts(
            rule_id=rule_id, description=rule.description if rule else "not a built-in rule",
            strength=rule.strength.name.lower() if rule else "unknown",
            matches=int(matches.get(rule_id, 0)),
            precision=measured.get("precision"), recall=measured.get("recall"),
            misidentification_rate=measured.get("misidentification_rate")))
    return tuple(out)


def pick_refusal_examples(refused: Iterable[Any], per_reason: int = EXAMPLES_PER_REASON
                          ) -> list[dict[str, Any]]:
    """A few refusals per reason (objects with ``line``, ``code``, ``detail``) for a summary.

    Bounded (at most ``per_reason`` times the number of reason codes), so a job's summary
    stays small whatever the query file holds.
    """
    seen: Counter[str] = Counter()
    out = []
    for r in refused:
        code = str(r.code)
        if seen[code] < per_reason:
            seen[code] += 1
            out.append({"line": int(r.line), "code": code, "detail": str(r.detail)})
    return out


def refusal_examples(refused: Sequence[Mapping[str, Any]], *, include_detail: bool = False,
                     per_reason: int = EXAMPLES_PER_REASON) -> tuple[RefusalExample, ...]:
    """A few refused lines per reason; details only where they name no one (or if asked)."""
    seen: Counter[str] = Counter()
    out = []
    for r in refused:
        code = str(r.get("code", ""))
        if seen[code] >= per_reason:
            continue
        seen[code] += 1
        detail = str(r.get("detail", "")) if include_detail or code in _DETAIL_SAFE else ""
        out.append(RefusalExample(int(r.get("line") or 0), code, detail))
    return tuple(out)


def oversight_facts(report: OversightReport | Mapping[str, Any]) -> OversightFacts:
    """The verdict from an :class:`OversightReport` or its ``to_json()`` (``--json`` output)."""
    doc = report.to_json() if isinstance(report, OversightReport) else report
    findings = [f for f in doc.get("findings") or () if isinstance(f, Mapping)]
    failed = [f for f in findings if not f.get("ok")]
    first = ""
    if failed:
        f = failed[0]
        where = f" (session {f['session_id']})" if f.get("session_id") else ""
        first = f"{f.get('check')}{where}: {f.get('detail')}"
    return OversightFacts(agree=bool(doc.get("agree")) and not failed,
                          authorization_id=str(doc.get("authorization_id", "")),
                          checks=len(findings), failures=len(failed), first_disagreement=first)


def _ints(d: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in (d or {}).items() if isinstance(v, int)}


#: What each phase of a job means, for the timeline (the requester service's job events).
PHASE_WORDS: dict[str, str] = {
    "validate": "query records checked; refused ones set aside",
    "open": "session opened: the custodian checked the authorization and reserved the budget",
    "tags": "the custodian's match tags received",
    "evaluate": "blinded evaluation started (each counted against the budget first)",
    "match": "local match by the requester",
    "disclose": "verified disclosure started (each record written to the custodian's ledger "
                "before it left)",
    "close": "session closed: receipt signed by the custodian, countersigned",
    "done": "job finished",
    "failed": "job failed",
}
#: The same phases in the aggregate and cardinality tiers (agency_a.client's aggregate run).
AGGREGATE_PHASE_WORDS: dict[str, str] = {
    **PHASE_WORDS,
    "evaluate": "blinded subjects uploaded (each counted against the budget first)",
    "tags": "the custodian's blinded records received and reblinded by the requester",
    "disclose": "the requester's honesty proof checked; the custodian released the answer",
}


def _timeline(summary: Mapping[str, Any], tier: str, request: RequestFacts
              ) -> tuple[TimelineEvent, ...]:
    words = PHASE_WORDS if tier == "identity" else AGGREGATE_PHASE_WORDS
    events = []
    if request.not_before is not None:
        events.append(TimelineEvent(float(request.not_before),
                                    "the authority's authorization takes effect"))
    if isinstance(summary.get("submitted_at"), int | float):
        events.append(TimelineEvent(float(summary["submitted_at"]),
                                    "query file received by the requester service"))
    started = summary.get("phase_started_at")
    for phase, at in (started.items() if isinstance(started, Mapping) else ()):
        if isinstance(at, int | float) and phase != "done":
            events.append(TimelineEvent(float(at), words.get(phase, str(phase))))
    if isinstance(summary.get("finished_at"), int | float):
        events.append(TimelineEvent(float(summary["finished_at"]), PHASE_WORDS["done"]))
    return tuple(sorted(events, key=lambda e: e.at))


# --------------------------------------------------------------------------------------------
# The requester's view of one job
# --------------------------------------------------------------------------------------------


def job_facts(summary: Mapping[str, Any], *, generated_at: float,
              accuracy: Any = None, accuracy_source: str = "",
              oversight: OversightReport | Mapping[str, Any] | None = None,
              rows: Sequence[Mapping[str, Any]] | None = None) -> ReportFacts:
    """The facts of one job from its summary (``agency-a report``)."""
    request = RequestFacts.from_json(summary.get("authorization") or {
        "authorization_id": summary.get("authorization_id", "")})
    measured = accuracy_by_rule(accuracy)
    tier = str(summary.get("tier") or request.tier or "identity")
    submitted = int(summary.get("queries_submitted") or 0)
    accepted = int(summary.get("queries_accepted") or 0)
    refused = _ints(summary.get("refused_by_reason"))
    examples = refusal_examples(summary.get("refused_examples") or (),
                                include_detail=rows is not None)
    receipt = summary.get("receipt")
    numbers = [KeyNumber("queries_submitted", "query records submitted", submitted),
               KeyNumber("queries_refused", "refused before anything ran",
                         int(summary.get("queries_refused") or 0)),
               KeyNumber("queries_accepted", "accepted for matching", accepted)]
    aggregate = None
    parties: tuple[Party, ...]
    gauges: tuple[Gauge, ...]
    receipts: tuple[Mapping[str, Any], ...] = (receipt,) if isinstance(receipt, Mapping) else ()
    receipt_note = ""
    matches_label = "matches"
    if tier in ("aggregate", "cardinality"):
        aggregate = aggregate_facts(summary, tier, request)
        if aggregate.several_rules:  # one number per rule: they overlap, so no total
            numbers += [KeyNumber(f"aggregate_by_rule.{a.rule_id}.count",
                                  f"subjects found by rule {a.rule_id}", a.count)
                        for a in aggregate.by_rule]
            matches_label = "subjects found (per rule; they overlap, never added up)"
            receipts, receipt_note = _aggregate_receipts(summary)
        else:
            numbers.append(KeyNumber("aggregate_count", "subjects in the custodian's file",
                                     aggregate.count))
        rules = _rule_facts({a.rule_id: a.count for a in aggregate.by_rule},
                            [a.rule_id for a in aggregate.by_rule], measured)
        gauges = (Gauge("evaluations used (this job)",
                        int(summary.get("elements_evaluated") or 0), request.max_evaluations),)
        parties = _aggregate_parties(summary, aggregate)
    else:
        matches = _ints(summary.get("matches_by_rule"))
        numbers += [KeyNumber("matches", "matches (subject x rule)",
                              int(summary.get("matches") or 0)),
                    KeyNumber("matched_queries", "subjects found",
                              int(summary.get("matched_queries") or 0)),
                    KeyNumber("disclosed_records", "custodian records disclosed",
                              int(summary.get("disclosed_records") or 0))]
        rules = _rule_facts(matches, request.match_rules, measured)
        gauges = (Gauge("evaluations used (this job)",
                        int(summary.get("elements_evaluated") or 0), request.max_evaluations),
                  Gauge("records disclosed (disclosure cap)",
                        int(summary.get("disclosed_records") or 0),
                        summary.get("disclosure_cap") or request.max_disclosures))
        parties = _identity_parties(summary)
    numbers.append(KeyNumber("elements_evaluated", "evaluations used",
                             int(summary.get("elements_evaluated") or 0)))
    notes = []
    if summary.get("disclosure_cap_reached"):
        notes.append(f"The disclosure cap was reached: "
                     f"{int(summary.get('disclosures_withheld_by_cap') or 0):,} further "
                     "disclosures were withheld.")
    if summary.get("receipt_pending"):
        receipt_note = ("The receipt is pending: the results are stored and the service "
                        f"retries the receipt ({summary.get('receipt_error', '')}).")
    return ReportFacts(
        view="requester", subject=str(summary.get("job_id", "")), generated_at=generated_at,
        request=request, key_numbers=tuple(numbers), queries_submitted=submitted,
        queries_refused=int(summary.get("queries_refused") or 0),
        refused_by_reason=refused, refusal_examples=examples, parties=parties, rules=rules,
        matches_label=matches_label,
        accuracy_source=accuracy_source if measured else "", gauges=gauges,
        receipts=receipts, receipt_note=receipt_note,
        oversight=oversight_facts(oversight) if oversight is not None else None,
        aggregate=aggregate, timeline=_timeline(summary, tier, request),
        rows=tuple(rows) if rows is not None else None, notes=tuple(notes))


#: Summary keys that may carry the refusal which stopped a several-rule aggregate job, in
#: order of preference: the service's own record of it, else the failure message that
#: ``agency-a match --summary-json`` writes for a failed job.
AGGREGATE_FAILURE_KEYS = ("aggregate_failure", "failed")
#: Summary key: rule -> the count the custodian announced in its match challenge before it
#: refused or failed to release that rule's answer (the requester learned that count).
UNRELEASED_COUNTS_KEY = "aggregate_counts_not_released"


def _sum_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def aggregate_facts(summary: Mapping[str, Any], tier: str, request: RequestFacts
                    ) -> AggregateFacts:
    """The aggregate answer of a job: every answered rule from ``aggregate_by_rule``.

    A summary written before jobs answered every rule has only the one-rule keys
    (``match_rule``, ``aggregate_count``, ...); its single answer is read from those.
    """
    first = RuleAnswer(rule_id=str(summary.get("match_rule", "")),
                       count=int(summary.get("aggregate_count") or 0),
                       total=_sum_or_none(summary.get("aggregate_sum")),
                       withheld=bool(summary.get("aggregate_withheld")),
                       reason=str(summary.get("aggregate_reason") or ""),
                       session_id=str(summary.get("session_id") or ""))
    by_rule = tuple(
        RuleAnswer(rule_id=str(e["rule"]), count=int(e.get("count") or 0),
                   total=_sum_or_none(e.get("sum")), withheld=bool(e.get("withheld")),
                   reason=str(e.get("reason") or ""), session_id=str(e.get("session_id") or ""))
        for e in summary.get("aggregate_by_rule") or ()
        if isinstance(e, Mapping) and e.get("rule"))
    failed_rule = str(summary.get("aggregate_failed_rule") or "")
    failure = next((str(summary[k]) for k in AGGREGATE_FAILURE_KEYS
                    if failed_rule and summary.get(k)), "")
    return AggregateFacts(
        tier=tier, match_rule=first.rule_id, count=first.count, total=first.total,
        withheld=first.withheld, reason=first.reason, value_field=request.value_field,
        min_count=request.min_aggregate_count, by_rule=by_rule or (first,),
        rules_unanswered=tuple(str(r) for r in summary.get("aggregate_rules_unanswered") or ()),
        failed_rule=failed_rule, failure=failure,
        counts_not_released=tuple(
            (str(rule), int(count)) for rule, count
            in (summary.get(UNRELEASED_COUNTS_KEY) or {}).items() if isinstance(count, int)))


def _aggregate_receipts(summary: Mapping[str, Any]
                        ) -> tuple[tuple[Mapping[str, Any], ...], str]:
    """Every answered rule's receipt (one session each), and which rule has none."""
    entries = [e for e in summary.get("aggregate_by_rule") or () if isinstance(e, Mapping)]
    receipts = tuple(e["receipt"] for e in entries if isinstance(e.get("receipt"), Mapping))
    missing = [str(e.get("rule")) for e in entries if not isinstance(e.get("receipt"), Mapping)]
    note = (f"No receipt for rule {', '.join(missing)}: its session failed after the answer "
            "was released and stored, before the receipt was signed." if missing else "")
    return receipts, note


def _identity_parties(s: Mapping[str, Any]) -> tuple[Party, ...]:
    accepted = int(s.get("queries_accepted") or 0)
    matched = int(s.get("matched_queries") or 0)
    fields = ", ".join(s.get("fields_disclosed") or {}) or "no fields"
    return (
        Party(f"{s.get('authorization', {}).get('requester_id') or 'The requester'} "
              "(requester)",
              f"Which {matched:,} of its {accepted:,} accepted subjects are in the custodian's "
              f"file, and for those only: {fields}. The number of entries in the custodian's "
              f"file that the authorization covers ({int(s.get('custodian_tags') or 0):,} "
              "match tags).",
              "Anything about the custodian's other records: the tags it received are "
              "pseudorandom under a key made for this authorization. No taxpayer id of the "
              "custodian's, no record ids (pseudonyms only)."),
        Party(f"{s.get('custodian_id') or 'The custodian'} (custodian)",
              f"That {int(s.get('elements_evaluated') or 0):,} blinded evaluations were asked "
              f"for, and exactly which {int(s.get('disclosed_records') or 0):,} of its own "
              "records were disclosed (each written to its ledger before it left).",
              f"Who the other {max(accepted - matched, 0):,} subjects are, or whether they "
              "exist anywhere: what it evaluated are blinded, uniformly random values."),
    )


def _aggregate_parties(s: Mapping[str, Any], a: AggregateFacts) -> tuple[Party, ...]:
    accepted = int(s.get("queries_accepted") or 0)
    if a.several_rules:
        summed = a.tier != "cardinality" and any(r.total is not None or r.withheld
                                                 for r in a.by_rule)
        what = ("a count per rule" + (" and the total of " + (a.value_field or "the value "
                                       "field") + " per rule" if summed else ""))
        each = "; ".join(f"rule {r.rule_id}: {r.count:,}"
                         + (f" (the total was withheld: {r.reason})" if r.withheld else "")
                         for r in a.by_rule)
        learned = (f"{what.capitalize()}, each from its own session, of its {accepted:,} "
                   f"accepted subjects in the custodian's file: {each}. The counts overlap "
                   "(one person can match under several rules), so they are not added up"
                   + (f"; not answered: rule {', '.join(a.rules_unanswered)}"
                      if a.rules_unanswered else "") + ".")
    else:
        what = ("a count" if a.tier == "cardinality" or a.total is None
                else "a count and the total of " + (a.value_field or "the value field"))
        learned = (f"{what.capitalize()}: {a.count:,} of its {accepted:,} accepted subjects "
                   "are in the custodian's file" + (f" (the total was withheld: {a.reason})"
                                                    if a.withheld else "") + ".")
    return (
        Party("The requester", learned,
              "Which of its subjects are in the file, or any one person's value."),
        Party("The custodian",
              "Which of its own records contributed to the answer (it computed the answer), "
              "and the answer.",
              "Who the requester's subjects are: it saw only blinded values, and a proof "
              "that they were blinded honestly."),
    )


# --------------------------------------------------------------------------------------------
# The inspector's view of one authorization
# --------------------------------------------------------------------------------------------


def inspector_facts(custodian: Mapping[str, Any], requester: Mapping[str, Any],
                    report: OversightReport | Mapping[str, Any], *, generated_at: float,
                    accuracy: Any = None, accuracy_source: str = "") -> ReportFacts:
    """The facts of one authorization from the two exports (``psi-authority oversight``)."""
    auth_id = str(custodian.get("auth_id") or requester.get("auth_id") or "")
    limits = custodian.get("authorization") or {}
    receipts = [r for r in custodian.get("receipts") or () if isinstance(r, Mapping)]
    first = receipts[0] if receipts else {}
    sessions = [s for s in custodian.get("sessions") or () if isinstance(s, Mapping)]
    metas = [s.get("meta") or {} for s in sessions]
    # identity sessions list their rules; an aggregate or cardinality session runs one
    rule_ids = [str(r) for m in metas
                for r in (m.get("rules") or ([m["rule"]] if m.get("rule") else ()))]
    tiers = list(dict.fromkeys(str(m["tier"]) for m in metas if m.get("tier")))
    aggregate_tier = bool(tiers) and set(tiers) <= {"aggregate", "cardinality"}
    request = RequestFacts(
        authorization_id=auth_id,
        requester_id=str(first.get("requester_id", "")),
        custodian_id=str(first.get("custodian_id", "")),
        not_after=limits.get("not_after"), max_evaluations=limits.get("max_evaluations"),
        max_disclosures=limits.get("max_disclosures"),
        match_rules=tuple(dict.fromkeys(rule_ids)),
        tier=tiers[0] if len(tiers) == 1 else "")
    counts_b = custodian.get("counts") or {}
    counts_a = requester.get("counts") or {}
    disclosures = [d for d in custodian.get("disclosures") or () if isinstance(d, Mapping)]
    by_rule = Counter(str(d.get("rule_id")) for d in disclosures)
    matches_label = "records disclosed (by the rule that first matched)"
    if aggregate_tier:  # no record is disclosed: what each rule gave is one answer a session
        by_rule = Counter(str((s.get("meta") or {}).get("rule")) for s in sessions
                          if isinstance(s.get("closed_at"), int | float))
        matches_label = "aggregate answers given (closed sessions, by rule)"
    numbers = (
        KeyNumber("custodian_evaluated", "evaluations (custodian's ledger)",
                  int(counts_b.get("evaluated") or 0)),
        KeyNumber("requester_evaluated", "evaluations (requester's receipts)",
                  int(counts_a.get("evaluated") or 0)),
        KeyNumber("custodian_disclosed", "records disclosed (custodian's ledger)",
                  int(counts_b.get("disclosed") or 0)),
        KeyNumber("requester_disclosed", "records disclosed (requester's receipts)",
                  int(counts_a.get("disclosed") or 0)),
        KeyNumber("receipts", "signed receipts", int(counts_b.get("receipts") or 0)),
    )
    events = [TimelineEvent(float(limits["registered_at"]), "authorization registered by the "
                            "custodian (budget reserved from here)")
              ] if isinstance(limits.get("registered_at"), int | float) else []
    for s in custodian.get("sessions") or ():
        sid = s.get("session_id")
        if isinstance(s.get("opened_at"), int | float):
            events.append(TimelineEvent(float(s["opened_at"]), f"session {sid} opened"))
        if isinstance(s.get("closed_at"), int | float):
            events.append(TimelineEvent(float(s["closed_at"]),
                                        f"session {sid} closed: {s.get('evaluated', 0):,} "
                                        "evaluations"))
    times = [float(d["disclosed_at"]) for d in disclosures
             if isinstance(d.get("disclosed_at"), int | float)]
    if times:
        events.append(TimelineEvent(min(times), f"first of {len(times):,} disclosures"))
        events.append(TimelineEvent(max(times), "last disclosure"))
    for r in custodian.get("aggregate_releases") or ():
        if isinstance(r.get("released_at"), int | float):
            events.append(TimelineEvent(float(r["released_at"]),
                                        f"aggregate released (session {r.get('session_id')})"))
    for doc, who in ((custodian, "custodian"), (requester, "requester")):
        if isinstance(doc.get("exported_at"), int | float):
            events.append(TimelineEvent(float(doc["exported_at"]), f"{who} export written"))
    disclosed = int(counts_b.get("disclosed") or 0)
    parties = (
        Party("The requester", f"{disclosed:,} records' permitted fields (counted in the "
              "custodian's ledger and acknowledged in its countersigned receipts).",
              "Anything about the custodian's other records."),
        Party("The custodian", f"{int(counts_b.get('evaluated') or 0):,} blinded evaluations "
              "were asked for, and which of its records it disclosed.",
              "Who the requester's other subjects are."),
        Party("The inspector (this page)", "Counts, receipts with both signatures, and both "
              "audit chains' heads with their signed checkpoints.",
              "No query, no disclosed value: the exports hold counts, digests and record "
              "ids of the custodian's own file only, and this page shows counts."),
    )
    return ReportFacts(
        view="inspector", subject=auth_id, generated_at=generated_at, request=request,
        key_numbers=numbers, refusals_known=False, parties=parties,
        rules=_rule_facts(dict(by_rule), request.match_rules, accuracy_by_rule(accuracy)),
        # the custodian's ledger keeps one row per record, under the rule that first matched
        matches_label=matches_label,
        accuracy_source=accuracy_source if accuracy_by_rule(accuracy) else "",
        gauges=(Gauge("evaluations used (all sessions)", int(counts_b.get("evaluated") or 0),
                      request.max_evaluations),
                Gauge("records disclosed (disclosure cap)", disclosed,
                      request.max_disclosures)),
        receipts=tuple(receipts), oversight=oversight_facts(report),
        timeline=tuple(sorted(events, key=lambda e: e.at)),
        notes=("The query file and its refusals stay with the requester: its own report "
               "('agency-a report') lists what was refused before anything ran.",))
