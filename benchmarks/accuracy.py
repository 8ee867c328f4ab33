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
from protocol.domain.records import (
    MATCH_RULES,
    match_keys_bulk,
    read_person_csv,
    read_query_csv_with_lines,
    validate_query,
)

__all__ = ["RuleAccuracy", "ScenarioAccuracy", "main", "measure", "measure_scenario",
           "to_markdown"]


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


@dataclass(frozen=True)
class ScenarioAccuracy:
    """Every rule's accuracy plus what was excluded before matching."""

    rules: list[RuleAccuracy]
    refusals_by_reason: dict[str, int]


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
class _Tally:
    """Running counts of one rule over the query batches."""

    no_key: int = 0
    matched: int = 0
    ambiguous: int = 0
    tp: int = 0
    fp: int = 0

    def add(self, query_ids: list[str], keys: list[bytes | None], index: _KeyIndex,
            record_ids: list[str], truth: dict[str, str]) -> None:
        first, shared = index.first, index.shared
        for qid, key in zip(query_ids, keys, strict=True):
            if key is None:
                self.no_key += 1
                continue
            pos = first.get(key)
            if pos is None:
                continue
            self.matched += 1
            want = truth.get(qid)
            candidates = shared.get(key)
            if candidates is None:
                hit = int(record_ids[pos] == want)
                self.tp += hit
                self.fp += 1 - hit
            else:
                self.ambiguous += 1
                hits = sum(record_ids[c] == want for c in candidates)
                self.tp += hits
                self.fp += len(candidates) - hits


def measure_scenario(
    scenario_dir: Path,
    rule_ids: Sequence[str] | None = None,
    *,
    today: date | None = None,
) -> ScenarioAccuracy:
    """Accuracy of each rule (default: all of ``MATCH_RULES``) plus refusal counts."""
    scenario_dir = Path(scenario_dir)
    rule_ids = list(rule_ids) if rule_ids is not None else list(MATCH_RULES)
    unknown = [r for r in rule_ids if r not in MATCH_RULES]
    if unknown:
        raise ValueError(f"unknown match rules: {unknown}")
    today = today or date.today()

    truth = _read_truth(scenario_dir / "truth.csv")

    # Custodian side: an index per rule; of the records themselves only the ids are kept.
    with open_csv(scenario_dir / "custodian.csv") as fh:
        persons = read_person_csv(fh)
    record_ids = [p.record_id for p in persons]
    indexes = {r: _KeyIndex() for r in rule_ids}
    for lo in range(0, len(persons), _BATCH):
        keys = match_keys_bulk(persons[lo:lo + _BATCH], rule_ids, today=today)
        for r in rule_ids:
            indexes[r].add(keys[r], lo)
    del persons

    # Requester side: what validation refuses never reaches matching.
    with open_csv(scenario_dir / "queries.csv") as fh:
        rows = read_query_csv_with_lines(fh)
    refusals: dict[str, int] = {}
    accepted = []
    for line, query in rows:
        problems = validate_query(query, today=today, line=line)
        if problems:
            for p in problems:
                refusals[str(p.code)] = refusals.get(str(p.code), 0) + 1
        else:
            accepted.append(query.person)
    total, evaluated = len(rows), len(accepted)
    del rows

    tallies = {r: _Tally() for r in rule_ids}
    for lo in range(0, evaluated, _BATCH):
        batch = accepted[lo:lo + _BATCH]
        ids = [p.record_id for p in batch]
        keys = match_keys_bulk(batch, rule_ids, today=today)
        for r in rule_ids:
            tallies[r].add(ids, keys[r], indexes[r], record_ids, truth)
    del accepted

    results = []
    for rule_id in rule_ids:
        t = tallies[rule_id]
        tp, fp = t.tp, t.fp
        results.append(RuleAccuracy(
            rule_id=rule_id,
            strength=MATCH_RULES[rule_id].strength.name.lower(),
            queries=total,
            refused=total - evaluated,
            evaluated=evaluated,
            no_key=t.no_key,
            true_matches=len(truth),
            predicted_pairs=tp + fp,
            true_positives=tp,
            false_matches=fp,
            matched_queries=t.matched,
            ambiguous_queries=t.ambiguous,
            precision=_ratio(tp, tp + fp),
            recall=_ratio(tp, len(truth)),
            misidentification_rate=_ratio(fp, tp + fp),
        ))
    return ScenarioAccuracy(rules=results, refusals_by_reason=dict(sorted(refusals.items())))


def measure(scenario_dir: Path, rule_ids: Sequence[str] | None = None) -> list[RuleAccuracy]:
    """Accuracy of each rule (default: all of ``protocol.domain.records.MATCH_RULES``)."""
    return measure_scenario(scenario_dir, rule_ids).rules


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("rule", "rule_id"),
    ("strength", "strength"),
    ("evaluated", "evaluated"),
    ("refused", "refused"),
    ("no key", "no_key"),
    ("pairs", "predicted_pairs"),
    ("true pos.", "true_positives"),
    ("false matches", "false_matches"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("misidentified", "misidentification_rate"),
)


def _cell(value: object) -> str:
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
        lines.append("| " + " | ".join(_cell(getattr(r, attr)) for _, attr in _COLUMNS) + " |")
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
    for r in rules:
        table.add_row(*(_cell(getattr(r, attr)) for _, attr in _COLUMNS))
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)
    if accuracy.refusals_by_reason:
        reasons = ", ".join(f"{k}: {v:,}" for k, v in accuracy.refusals_by_reason.items())
        console.print(f"Refusals by reason: {reasons}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.accuracy DIR``: print the per-rule accuracy table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="Measure precision, recall and misidentification of each match rule "
        "on a scenario generated by protocol.adapters.scenario (plaintext key join against "
        "truth.csv).",
    )
    parser.add_argument("scenario_dir", type=Path, help="scenario directory")
    parser.add_argument("--rules", default=None,
                        help="comma-separated rule ids (default: every rule in MATCH_RULES)")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write results as a Markdown table")
    args = parser.parse_args(argv)

    rule_ids = [r.strip() for r in args.rules.split(",") if r.strip()] if args.rules else None
    try:
        accuracy = measure_scenario(args.scenario_dir, rule_ids)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_table(accuracy, args.scenario_dir)

    if args.json is not None:
        manifest_path = args.scenario_dir / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        payload = {
            "scenario_dir": str(args.scenario_dir),
            "scenario_spec": manifest.get("spec"),
            "scenario_files": manifest.get("files"),
            "refusals_by_reason": accuracy.refusals_by_reason,
            "rules": [dataclasses.asdict(r) for r in accuracy.rules],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(to_markdown(accuracy.rules))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
