"""The accuracy report at several sizes from one run, and the streamed join it relies on."""

from __future__ import annotations

import dataclasses
import json
from datetime import date
from pathlib import Path

import pytest

from benchmarks import accuracy
from protocol.adapters import scenario
from protocol.domain.records import DEFAULT_RULES

TODAY = date(2025, 6, 1)


def test_headline_size_names_the_mission_scenario(tmp_path: Path) -> None:
    spec, out = accuracy.scenario_for(1_300_000, "realistic", tmp_path)
    assert (spec.queries, spec.records, spec.true_matches) == (1_280_000, 1_300_000, 47_289)
    assert spec == scenario.ScenarioSpec().realistic()
    assert out == tmp_path / "scenario-realistic-1280000x1300000"
    small, _ = accuracy.scenario_for(2_000, "baseline", tmp_path)
    assert (small.queries, small.records) == (2_000, 2_000)


def test_streamed_join_equals_one_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Joining the queries in many small batches (as at 1.28M) gives the same pairs, counts
    and estimates as one batch."""
    spec, out = accuracy.scenario_for(2_000, "realistic", tmp_path)
    scenario.generate(spec, out)
    dataset = accuracy.load_scenario(out, today=TODAY)
    whole = accuracy.measure_dataset(dataset, today=TODAY)
    monkeypatch.setattr(accuracy, "_BATCH", 173)
    stages: list[str] = []
    streamed = accuracy.measure_dataset(dataset, today=TODAY, progress=stages.append)
    assert sum(s.startswith("queries joined") for s in stages) == -(-len(dataset.accepted) // 173)
    assert len(whole) == len(streamed)
    for a, b in zip(whole, streamed, strict=True):
        est_a, est_b = a.estimated_false_matches, b.estimated_false_matches
        assert dataclasses.replace(a, estimated_false_matches=None) == \
            dataclasses.replace(b, estimated_false_matches=None)
        assert (est_a is None) == (est_b is None)
        if est_a is not None:
            assert est_b == pytest.approx(est_a, rel=1e-9)
    default = next(r for r in streamed if r.rule_id.startswith("default:"))
    assert default.predicted_pairs > 0 and set(DEFAULT_RULES) <= set(accuracy.MATCH_RULES)


def test_one_run_writes_every_size_into_one_report(tmp_path: Path) -> None:
    js, md = tmp_path / "acc.json", tmp_path / "acc.md"
    argv = ["--sizes", "1500,2500", "--data-dir", str(tmp_path / "data"), "--json", str(js),
            "--markdown", str(md), "--quiet"]
    assert accuracy.main(argv) == 0
    payload = json.loads(js.read_text())
    assert payload["command"] == "python -m benchmarks.accuracy " + " ".join(argv)
    assert payload["started"] <= payload["finished"]
    assert payload["machine"]["cores_logical"] >= 1 and "commit" in payload["git"]
    sizes = [(s["scenario_spec"]["queries"], s["scenario_spec"]["records"])
             for s in payload["scenarios"]]
    assert sizes == [(1500, 1500), (2500, 2500)]
    # The top-level figures (what the policymaker's report reads) are the largest scenario's.
    assert payload["rules"] == payload["scenarios"][1]["rules"]
    assert payload["scenario_spec"]["queries"] == 2500
    text = md.read_text()
    for q in (1500, 2500):
        assert f"## {tmp_path / 'data'}/scenario-realistic-{q}x{q}" in text
    assert text.count("Targets (issue 19):") == 2
    assert "default set precision" in text and "keys per query" in text
    assert f"One run: `{payload['command']}`" in text
    # A second run reuses the generated scenarios: same files, byte for byte.
    before = (tmp_path / "data" / "scenario-realistic-1500x1500" / "queries.csv").stat()
    assert accuracy.main(["--sizes", "1500", "--data-dir", str(tmp_path / "data"),
                          "--quiet"]) == 0
    after = (tmp_path / "data" / "scenario-realistic-1500x1500" / "queries.csv").stat()
    assert before.st_mtime_ns == after.st_mtime_ns


def test_nothing_to_measure_and_febrl_4_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert accuracy.main(["--quiet"]) == 2
    assert "nothing to measure" in capsys.readouterr().err
    assert accuracy.main(["--febrl", "4", "--quiet"]) == 2
    assert "held out" in capsys.readouterr().err


def test_misses_are_explained_by_refusal_or_by_the_fields_that_disagree(tmp_path: Path) -> None:
    """Every true match the default set misses is counted once, under its refusal reasons
    when the policy refused its query, else under the identifying fields that disagree; and
    the admissible recall is the recall over the true matches whose query was accepted."""
    spec, out = accuracy.scenario_for(3_000, "realistic", tmp_path)
    scenario.generate(spec, out)
    dataset = accuracy.load_scenario(out, today=TODAY)
    rows = accuracy.measure_dataset(dataset, today=TODAY, estimate=False)
    default = next(r for r in rows if r.rule_id.startswith("default:"))
    causes = default.missed_by_cause
    assert causes is not None and sum(causes.values()) == \
        default.true_matches - default.true_positives
    refused_truth = [q for q in dataset.truth if q in dataset.refused_codes]
    assert refused_truth, "the realistic model should refuse some true matches' queries"
    assert sum(n for c, n in causes.items() if c.startswith("refused: ")) == len(refused_truth)
    assert default.admissible_true_matches == default.true_matches - len(refused_truth)
    assert default.recall_admissible == pytest.approx(
        default.true_positives / default.admissible_true_matches)
    assert default.recall_admissible > default.recall
    for cause in causes:
        if not cause.startswith("refused: "):
            assert all(p.rsplit(" ", 1)[1] in ("missing", "differs") for p in cause.split(" + "))
    # only the default set carries the breakdown
    assert all(r.missed_by_cause is None for r in rows if r is not default)

    # a query with the TIN blanked and a moved ZIP, matched by no rule, is explained so
    qid, cid = next((q, c) for q, c in dataset.truth.items() if q not in dataset.refused_codes)
    query = next(q for q in dataset.accepted if q.record_id == qid)
    record = next(r for r in dataset.records if r.record_id == cid)
    changed = dataclasses.replace(query, tin="", zip="99999" if record.zip != "99999" else "11111",
                                  first_name="Zzyzx")
    custom = dataclasses.replace(dataset, accepted=[changed], truth={qid: cid},
                                 refused_codes={})
    assert accuracy.miss_causes(custom, {}, today=TODAY) == {
        "tin missing + first_name differs + zip differs": 1}
    # found under any rule: no miss
    position = [r.record_id for r in dataset.records].index(cid)
    assert accuracy.miss_causes(custom, {qid: {position}}, today=TODAY) == {}


def test_the_report_says_how_many_misses_the_policy_refused(tmp_path: Path) -> None:
    md = tmp_path / "acc.md"
    assert accuracy.main(["--sizes", "2000", "--data-dir", str(tmp_path / "data"),
                          "--markdown", str(md), "--quiet"]) == 0
    text = md.read_text()
    assert "recall, admissible" in text
    assert "were in queries the policy refused before matching" in text
    assert "whose query was accepted" in text
