"""Smoke test of the scale runner (``make bench``) and its report, at a tiny size.

The real benchmark takes minutes; this runs the same code path end to end (scenario, both
services over gRPC/mTLS, sampling, per-op costs, the per-core configuration, one run file,
Markdown, plot) on 300 x 300, into a results directory that already holds an older run file
and a stale merged ``latest.json``, and checks that the report comes from the new run alone
and that the private match finds exactly the (query, record, rule) pairs of the plaintext
tin+dob join.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import report, scale
from benchmarks.accuracy import measure_scenario

REPO = Path(__file__).resolve().parent.parent
SIZE = 300
SmokeRun = tuple[Path, Path, Path, dict[str, Any]]  # data dir, results dir, run file, run
#: a marker that only the planted older run carries: it must never reach the report
STALE_WALL = 987.654

ROW_KEYS = {
    "engine": str, "net": str, "queries": int, "records": int, "wall_s": float,
    "cpu_s": float, "floor_s": float, "bytes_a_to_b": int, "bytes_b_to_a": int,
    "peak_rss_a": int, "peak_rss_b": int, "matches": int, "true_matches": int,
    "phases": dict, "pair_check": dict, "timestamp": str, "loadavg_start": list,
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    base = tmp_path_factory.mktemp("bench")
    data, results = base / "data", base / "results"
    (results / "runs").mkdir(parents=True)
    stale = {"schema": 2, "run_id": "20200101T000000Z", "command": ["old"], "tries": [],
             "runs": [{**_row("oprf", SIZE, STALE_WALL, 1.0), "net": "loopback"}]}
    (results / "runs" / "20200101T000000Z.json").write_text(json.dumps(stale))
    (results / "latest.json").write_text(json.dumps([_row("oprf", 10_000, STALE_WALL)]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--sizes", str(SIZE), "--engines", "oprf",
         "--data-dir", str(data), "--results-dir", str(results), "--op-sample", "400"],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new = [p for p in (results / "runs").glob("*.json") if p.name != "20200101T000000Z.json"]
    assert len(new) == 1, new
    return data, results, new[0], json.loads(new[0].read_text())


def test_one_invocation_writes_one_run_file(smoke_run: SmokeRun) -> None:
    _data, results, _path, run = smoke_run
    assert json.loads((results / "latest.json").read_text()) == run
    assert run["command"][1:3] == ["-m", "benchmarks.scale"]
    assert run["command"][-4:] == ["--results-dir", str(results), "--op-sample", "400"]
    assert len(run["git"]["commit"]) == 40 and isinstance(run["git"]["dirty"], bool)
    m = run["machine"]
    assert m["cores_logical"] >= 1 and m["memory_bytes"] > 0 and m["python"]
    assert m["packages"]["rbcl"] and m["packages"]["grpcio"]
    assert len(run["loadavg_start"]) == len(run["loadavg_end"]) == 3
    # Default: the engine with the services' default workers and, per core, with one each.
    assert sorted(str(r["workers"]) for r in run["runs"]) == ["1", "None"]
    assert len(run["tries"]) == len(run["op_costs"]) == 2
    for row in run["runs"]:
        for key, typ in ROW_KEYS.items():
            assert isinstance(row[key], typ), (key, row.get(key))
        assert row["net"] == "loopback" and row["queries"] == row["records"] == SIZE
        assert row["bytes_a_to_b"] >= 32 * row["query_elements"]
        assert row["peak_rss_tree_b"] >= row["peak_rss_b"] > 0
        assert row["cpu_e2e_s"] > 0
        for phase in ("open", "evaluate", "match", "disclose", "close", "custodian_load"):
            assert row["phases"][phase] >= 0
    # The floor uses the run's median per-op costs, the same for both rows.
    med = scale.median_op_costs([scale.OpCosts(**{k: v / 1e6 for k, v in c.items()
                                                  if k not in ("sample", "timestamp")},
                                               sample=int(c["sample"]))
                                 for c in run["op_costs"]])
    for row in run["runs"]:
        assert row["floor_s"] == pytest.approx(
            med.floor_seconds(row["query_elements"], row["custodian_elements"],
                              row["cores"]), abs=1e-3)


def test_pairs_equal_the_plaintext_join(smoke_run: SmokeRun) -> None:
    data, _results, _path, run = smoke_run
    (scenario_dir,) = data.glob("scenario-*")
    (acc,) = measure_scenario(scenario_dir, ["tin+dob"]).rules
    assert acc.matched_queries > 0
    for row in run["runs"]:
        pc = row["pair_check"]
        assert pc["pairs_equal"] is True and pc["missing_pairs"] == pc["extra_pairs"] == 0
        assert pc["pairs"] == pc["expected_pairs"] >= acc.matched_queries == row["matches"]
        assert row["correct_matches"] == acc.true_positives
        assert row["true_matches"] == acc.true_matches


def test_report_comes_from_that_run_only(smoke_run: SmokeRun) -> None:
    _data, results, path, run = smoke_run
    md = (results / "latest.md").read_text()
    assert f"`runs/{path.name}`" in md and "20200101T000000Z" not in md
    assert f"{STALE_WALL}" not in md and "987.65" not in md
    table = md.split("## Runs (fastest try of each)")[1].split("\n\n")[1]
    body = [ln for ln in table.splitlines()[2:] if ln.startswith("|")]
    assert len(body) == len(run["runs"]) == 2
    assert {ln.split(" | ")[0] for ln in body} == {"| oprf", "| oprf (1 worker/service)"}
    assert md.count("| loopback | 300 x 300 | ") >= 4  # runs table and tries table
    assert "## The floor: operation counts" in md and "2q + r" in md
    pytest.importorskip("matplotlib")
    assert (results / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cli_renders_one_named_run_and_refuses_a_merged_list(
        smoke_run: SmokeRun, tmp_path: Path) -> None:
    _data, _results, path, run = smoke_run
    old_list = tmp_path / "merged.json"
    old_list.write_text(json.dumps([_row("oprf", 10_000, 1.0)]))
    assert report.main(["--run", str(old_list), "--out-dir", str(tmp_path / "a")]) == 2
    out = tmp_path / "b"
    assert report.main(["--run", str(path), "--out-dir", str(out)]) == 0
    assert json.loads((out / "latest.json").read_text()) == run
    assert run["run_id"] in (out / "latest.md").read_text()


# --------------------------------------------------------------------------- pure parts


def _row(engine: str, n: int, wall: float, floor: float | None = None,
         **extra: Any) -> dict[str, Any]:
    q = 1_280_000 if n == 1_300_000 else n
    return {"engine": engine, "net": "loopback", "workers": None, "queries": q, "records": n,
            "wall_s": wall, "cpu_s": extra.pop("cpu_s", wall), "floor_s": floor,
            "bytes_a_to_b": 32 * q, "bytes_b_to_a": 32 * q + 12 * n,
            "peak_rss_a": 2**30, "peak_rss_b": 2**30, "matches": 1, "true_matches": 1,
            "phases": {"open": 1.0, "evaluate": 1.0, "match": 0.1, "disclose": 0.1},
            "matches_agree_with_plaintext": True, **extra}


def test_targets_judged_from_numbers_with_wall_and_cpu_ratios() -> None:
    rows = [_row("oprf", 100_000, 10.0, 9.0, cpu_s=19.0),
            _row("openmined", 100_000, 25.0, workers=1),
            _row("oprf", 1_300_000, 110.0, 100.0, cpu_s=210.0),
            _row("openmined", 1_300_000, 230.0, workers=1),
            _row("kkrt", 1_300_000, 9.0), _row("oprf", 100_000, 24.0, 9.0, workers=1)]
    speed, floor, kkrt_wall, kkrt_speed, per_core, rss, size, agg = report.evaluate_targets(rows)
    assert (speed.met, floor.met, kkrt_wall.met, kkrt_speed.met, rss.met, size.met) == (
        True, True, True, True, True, True)
    # Wall and CPU ratios side by side: 25 / 10 on the wall, 25 / 19 on CPU.
    assert "wall **2.50 x**" in speed.detail and "= **1.32 x**" in speed.detail
    assert agg.verdict == "not measured"  # another command's number is never borrowed
    assert per_core.verdict == "reported" and "oprf 100,000 x 100,000" in per_core.detail
    assert "wall **1.04 x**" in per_core.detail  # 25 / 24: only the 1-worker row
    rows[2]["wall_s"] = 116.0  # 1.16 x its floor, and 230 / 116 < 2
    rows[4]["wall_s"] = 10.5
    speed, floor, kkrt_wall, kkrt_speed, *_ = report.evaluate_targets(rows)
    assert (speed.met, floor.met, kkrt_wall.met, kkrt_speed.met) == (False, False, False, False)
    assert "missed by 1.0 s" in floor.detail
    # A row from another network or the per-core configuration never stands in for one.
    only = [_row("oprf", 100_000, 1.0, 0.5, net="wan"), _row("openmined", 100_000, 5.0)]
    assert report.evaluate_targets(only)[0].met is None


def test_openmined_network_figure_is_a_labelled_model() -> None:
    om = _row("openmined", 100_000, 30.0, workers=1)
    wan = scale.openmined_network_model(om, "wan")
    total = om["bytes_a_to_b"] + om["bytes_b_to_a"]
    assert wan["modelled"] is True and wan["net"] == "wan"
    assert wan["wall_s"] == pytest.approx(30.0 + total * 8 / 100e6 + 0.040, abs=1e-3)
    run = {"runs": [om, wan], "tries": [om], "nets": {"loopback": {}, "wan": {}}}
    md = report.render_markdown(run)
    (line,) = [ln for ln in md.splitlines() if ln.startswith("| openmined | wan |")]
    assert "**MODEL**" in line and "(model)" in line


def test_every_engine_states_its_guarantees() -> None:
    """The table names, for every engine the harness can run, whom it is secure against."""
    assert set(scale.ENGINES) <= set(report.GUARANTEES)
    rows = [_row("oprf", 10_000, 1.0), _row("kkrt", 10_000, 1.0)]
    table = "\n".join(report.render_markdown({"runs": rows, "tries": []}).splitlines())
    assert "semi-honest parties only, both sides" in table
    (om,) = [ln for ln in table.splitlines() if ln.startswith("| OpenMined PSI")]
    assert "no authorization" in om and om.endswith("| not measured |")
    (ver,) = [ln for ln in table.splitlines() if ln.startswith("| OPRF, verifiable")]
    assert "malicious custodian" in ver and ver.endswith("| not measured |")


def test_median_op_costs_is_per_operation() -> None:
    mk = scale.OpCosts
    med = scale.median_op_costs([mk(1, 10, 100, 5, 10), mk(3, 30, 300, 1, 10),
                                 mk(2, 90, 200, 9, 10)])
    assert (med.hash_to_group, med.scalarmult, med.unblind, med.validate, med.sample) == (
        2, 30, 200, 5, 30)
    with pytest.raises(ValueError):
        scale.median_op_costs([])


def test_readme_block_replaced_in_place(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# X\n\nintro\n\n{report.README_START}\nstale-block\n"
                      f"{report.README_END}\n\ntail\n")
    run = {"run_id": "20260101T000000Z", "runs": [_row("oprf", 10_000, 1.0, 0.5)],
           "tries": [], "command": ["python", "-m", "benchmarks.scale"]}
    results = tmp_path / "benchmarks" / "results"
    source = results / "runs" / "20260101T000000Z.json"
    report.update_readme(readme, run, results, source=source)
    text = readme.read_text()
    assert "stale-block" not in text and text.startswith("# X\n\nintro") and text.endswith("tail\n")
    assert "](benchmarks/results/latest.png)" in text
    assert "`benchmarks/results/runs/20260101T000000Z.json`" in text
    report.update_readme(readme, run, results, source=source)
    assert readme.read_text() == text  # idempotent


costs = st.floats(min_value=1e-7, max_value=1e-3)


@given(costs, costs, costs, costs, st.integers(0, 10**7), st.integers(0, 10**7),
       st.integers(1, 64))
def test_floor_is_linear_in_work_and_divides_by_cores(h: float, m: float, u: float, v: float,
                                                       q: int, r: int, cores: int) -> None:
    c = scale.OpCosts(hash_to_group=h, scalarmult=m, unblind=u, validate=v, sample=1)
    whole = c.floor_seconds(q, r, cores)
    assert whole == pytest.approx(c.floor_seconds(q, 0, cores) + c.floor_seconds(0, r, cores))
    assert whole * cores == pytest.approx(c.floor_seconds(q, r, 1))
    # Per query: HashToGroup + 2 scalarmults + unblind + 2 validations; per record: H + M.
    assert c.floor_seconds(1, 0, 1) == pytest.approx(h + 2 * m + u + 2 * v)
    assert c.floor_seconds(0, 1, 1) == pytest.approx(h + m)


def test_aggregate_runner_is_exact_and_reports_the_defence(tmp_path: Path) -> None:
    """``benchmarks.aggregate_scale`` end to end at 300 x 300: exact, and the cost of issue
    13's defence (validation, consistency proof) reported; its keys and ledger removed."""
    out = tmp_path / "aggregate.json"
    scratch = tmp_path / "tmp"  # the runner's temporary directory, to see it is emptied
    scratch.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.aggregate_scale", "--sizes", str(SIZE),
         "--data-dir", str(tmp_path / "data"), "--out", str(out), "--workers", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # it once left a PKI and a ledger per run in /tmp (libraries' own scratch files aside)
    assert [p.name for p in scratch.iterdir() if p.is_dir()] == []
    (row,) = json.loads(out.read_text())
    assert row["exact"] is True and row["count"] == row["plaintext_count"] > 0
    assert set(row["defence_s"]) == {"validate_reblinded_s", "prove_s", "verify_s"}
    assert row["defence_s"]["verify_s"] > 0


def test_the_run_file_names_every_modified_file_exactly(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``git status`` starts an unstaged change with a blank; the run file must still name
    the whole path (it once read "EADME.md"), and a staged rename only its new path."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for name in ("README.md", "old.txt", "same.txt"):
        (tmp_path / name).write_text("v1\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    (tmp_path / "README.md").write_text("v2\n")  # unstaged: " M README.md"
    git("mv", "old.txt", "new.txt")  # staged rename: "R  new.txt", then "old.txt"
    (tmp_path / "untracked.txt").write_text("not counted\n")
    monkeypatch.setattr(scale, "REPO", tmp_path)
    got = scale._git()
    assert got["dirty"] is True
    assert sorted(got["dirty_files"]) == ["README.md", "new.txt"]
    assert len(got["commit"]) == 40
    git("checkout", "-q", "--", "README.md")
    git("mv", "new.txt", "old.txt")
    assert scale._git() == {"commit": got["commit"], "dirty": False, "dirty_files": []}
