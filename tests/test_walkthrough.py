"""The README's walkthrough runs verbatim (issue 14: an operator follows it literally).

The ``sh`` blocks of the README section whose heading says "walkthrough" are the single
source: this test extracts them from README.md and runs them, in order, in an empty directory
with ``bash -euo pipefail`` and the project's virtual environment first on PATH. Real
processes, real mTLS, real SQLite ledgers, nothing stubbed.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agency_a import demo

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT_S = 240


def walkthrough_section(text: str) -> str:
    """The README section (``##`` heading containing "walkthrough") up to the next ``##``."""
    match = re.search(r"^## [^\n]*walkthrough[^\n]*\n(.*?)(?=^## |\Z)", text,
                      re.IGNORECASE | re.MULTILINE | re.DOTALL)
    assert match is not None, "README.md has no '## ...walkthrough...' section"
    return match.group(1)


def sh_blocks(section: str) -> list[str]:
    """The bodies of the fenced ``sh`` code blocks, in order."""
    return re.findall(r"^```sh\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)


def test_walkthrough_blocks_are_found() -> None:
    section = walkthrough_section(README.read_text(encoding="utf-8"))
    blocks = sh_blocks(section)
    assert len(blocks) >= 5
    script = "\n".join(blocks)
    for step in ("psi-authority policy-template", "psi-authority issue", "agency-b serve",
                 "agency-a match", "agency-a results", "audit verify", "psi-authority oversight"):
        assert step in script, step
    assert "PATH" in section and ".venv/bin" in section  # how to get the commands


@pytest.mark.slow
def test_walkthrough_runs_verbatim(tmp_path: Path) -> None:
    script = "\n".join(sh_blocks(walkthrough_section(README.read_text(encoding="utf-8"))))
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "COLUMNS": "100"}
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        output = ""
    finally:
        # Background services of a failed run must not outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                   for p in sorted(tmp_path.glob("*.log")))
    assert proc.returncode == 0, output[-6000:] + logs

    results = tmp_path / "results.csv"
    assert results.stat().st_mode & 0o077 == 0  # plaintext export: owner only
    with results.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows, "the exported results are empty"
    assert {"query_record_id", "rule_id", "fields.address", "fields.zip"} <= set(rows[0])
    assert "fields.tin" not in rows[0]  # never disclosed under the default policy
    assert f"showing 3 of {len(rows)} result rows, {len(rows) - 3} more not shown" in output
    assert f"purged {len(rows)} result rows of job" in output
    assert "0 result rows" in output and "were purged" in output
    assert output.count(": OK: ") == 2 and "FAIL" not in output  # both audit chains
    assert "AGREE: authorization auth-" in output  # the oversight check


@pytest.mark.parametrize(("keep", "flag"), [(["KEEP=1"], True), ([], False)])
def test_make_demo_keep_passes_keep(keep: list[str], flag: bool) -> None:
    """``make demo KEEP=1`` (and only it) asks the demo to keep its working directory."""
    dry = subprocess.run(["make", "-n", "demo", *keep], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    (demo_line,) = [line for line in dry.splitlines() if "-m agency_a.demo" in line]
    assert ("--keep" in demo_line.split()) is flag


def test_kept_demo_directory_is_printed_in_full(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    """Every kept path is printed whole (never cut to the terminal width)."""
    work = tmp_path / ("a-long-working-directory-name-" * 4)
    demo.print_kept(work)
    out = capsys.readouterr().out
    assert f"working directory kept: {work}" in out
    for _, rel in demo.KEPT_PATHS:
        assert rel in out
    assert f"agency-b audit verify --ledger {work / 'agency-b' / 'ledger.sqlite'}" in out
