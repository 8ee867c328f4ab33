"""``make demo``: the whole system, for a reviewer, in one command.

In a temporary working directory it generates keys, certificates and a seeded
synthetic scenario, starts the custodian (agency-b) and the requester (agency-a)
as separate processes on free loopback ports with mutual TLS, runs an
authorized identity-tier match, prints who learned what, then shows three
refusals (expired authorization, weak name+address rule, exhausted budget),
stops both services and verifies both audit chains.  Exit status is non-zero
if any step did not behave as it should.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from protocol.adapters.files import make_private_dir, open_private_log
from protocol.adapters.scenario import ScenarioSpec, generate
from protocol.domain.engine import Engine
from protocol.domain.records import MATCH_RULES
from protocol.policy.authority import draft_authorization, private_key_from_pem
from protocol.policy.decide import sign_authorization
from protocol.sessions.aggregate import plaintext_answer

console = Console()
PY = sys.executable
FIELDS = "address,city,state,zip"
RULES = "tin+dob,tin+last_name"
NAMED_RULE = "tin+dob"


class DemoFailure(RuntimeError):
    """A step of the demo did not do what it should; the demo exits non-zero."""


def run(args: list[str], *, check: bool = True, quiet: bool = False,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([PY, "-m", *args], text=True, capture_output=quiet, env=env,
                          check=False)
    if check and proc.returncode != 0:
        detail = (proc.stderr or "") + (proc.stdout or "") if quiet else ""
        raise DemoFailure(f"step failed ({proc.returncode}): {' '.join(args)}\n{detail}")
    return proc


def wait_port(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoFailure(f"service exited early with status {proc.returncode}")
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.1)
    raise DemoFailure(f"service did not report its port within {timeout}s")


def issue(work: Path, name: str, *extra: str, queries: Path | None = None,
          quiet: bool = False) -> Path:
    out = work / f"{name}.auth.json"
    args = ["protocol.cli.authority", "issue", "--key", str(work / "authority" / "authority.key"),
            "--requester", "agency-a", "--custodian", "agency-b",
            "--statute", "26 U.S.C. 6103(i)(2)", "--purpose", "locate subjects of open cases",
            "--out", str(out), *extra]
    if "--tier" not in extra or extra[extra.index("--tier") + 1] == "identity":
        args += ["--fields", FIELDS]  # only the identity tier discloses fields
    if queries is not None:
        args += ["--queries", str(queries)]
    run(args, quiet=quiet or queries is None)
    return out


def issue_expired(work: Path) -> Path:
    """An authorization whose window closed 30 days ago.

    The CLI refuses to issue one (rightly), so the demo signs it with the library,
    as an authorization issued long ago and presented after it lapsed.
    """
    key = private_key_from_pem((work / "authority" / "authority.key").read_bytes())
    start = int(time.time()) - 60 * 86400
    auth = draft_authorization(
        authority_key=key, requester_id="agency-a", custodian_id="agency-b",
        statute="26 U.S.C. 6103(i)(2)", purpose="locate subjects of open cases",
        tier="identity", max_evaluations=1000, max_disclosures=100,
        match_rules=RULES.split(","), disclosure_fields=FIELDS.split(","), retention_days=90,
        not_before=start, not_after=start + 30 * 86400,
    )
    out = work / "expired.auth.json"
    out.write_bytes(sign_authorization(auth, key).to_bytes())
    return out


def match(work: Path, auth: Path, queries: Path, ports: dict[str, int], name: str,
          *, progress: bool = True, tokens: Path | None = None, engine: str = Engine.OPRF.value,
          ) -> tuple[int, dict[str, Any]]:
    summary = work / f"{name}.summary.json"
    args = ["agency_a.cli", "match", "--server", f"127.0.0.1:{ports['a']}",
            "--certs", str(work / "certs"), "--operator", "demo-analyst",
            "--authorization", str(auth), "--queries", str(queries),
            "--custodian", f"127.0.0.1:{ports['b']}", "--summary-json", str(summary),
            "--show-refused", "5"]
    if not progress:
        args.append("--no-progress")
    if tokens is not None:
        args += ["--tokens", str(tokens)]
    args += ["--engine", engine]
    proc = run(args, check=False, quiet=not progress)
    data = json.loads(summary.read_text()) if summary.exists() else {}
    if not progress and proc.returncode != 0 and "failed" not in data:
        data["failed"] = (proc.stdout or "") + (proc.stderr or "")
    return proc.returncode, data


def truth_queries(path: Path) -> set[str]:
    with path.open(newline="") as fh:
        return {row["query_record_id"] for row in csv.DictReader(fh)}


def certify_custodian(work: Path, custodian_csv: Path) -> Path:
    """Once per epoch: the custodian's records certified under the authority's token key."""
    a, b = work / "authority", work / "agency-b"
    t0 = time.perf_counter()
    run(["protocol.cli.authority", "token-keygen", "--out", str(a)], quiet=True)
    run(["agency_b.cli", "certify-request", "--records", str(custodian_csv), "--policy",
         str(b / "policy.json"), "--rules", NAMED_RULE, "--out", str(b / "cert.request"),
         "--state", str(b / "cert.state")], quiet=True)
    out = run(["protocol.cli.authority", "certify", "--token-key", str(a / "authority.token.key"),
               "--public-key", str(a / "authority.pub.json"), "--request",
               str(b / "cert.request"), "--out", str(b / "cert.response"), "--binding-out",
               str(a / "agency-b.binding")], quiet=True)
    run(["agency_b.cli", "certify-finish", "--state", str(b / "cert.state"), "--response",
         str(b / "cert.response"), "--out", str(b / "named.cert")], quiet=True)
    console.print(f"   named-subject certification of the custodian's records "
                  f"({time.perf_counter() - t0:.1f}s): {out.stdout.splitlines()[0]}")
    return b / "named.cert"


def matched_ids_of(work: Path, ports: dict[str, int], job_id: str) -> set[str]:
    results = run(["agency_a.cli", "results", "--server", f"127.0.0.1:{ports['a']}",
                   "--certs", str(work / "certs"), "--operator", "demo-analyst",
                   "--job", job_id, "--purpose", "demo review", "--limit", str(10**9)],
                  quiet=True)
    return {line.split("\t")[0] for line in results.stdout.splitlines() if line}


def kkrt_scene(work: Path, scenario: Any, ports: dict[str, int], oprf_summary: dict[str, Any],
               oprf_ids: set[str]) -> None:
    """The same authorized match on the OT-extension engine: same matches, less time."""
    console.rule("second match engine: KKRT OT-extension OPRF")
    auth = issue(work, "kkrt", "--rules", RULES, "--engines", Engine.KKRT, "--max-disclosures",
                 str(oprf_summary["queries_submitted"]), "--max-evaluations",
                 str(4 * oprf_summary["elements_evaluated"]), "--valid-days", "30",
                 quiet=True)
    code, summary = match(work, auth, scenario.queries, ports, "kkrt", progress=False,
                          engine=Engine.KKRT)
    if code != 0:
        raise DemoFailure(f"KKRT match failed: {summary}")
    ids = matched_ids_of(work, ports, summary["job_id"])
    same = ids == oprf_ids
    console.print(f"  KKRT engine: {summary['matches']:,} matches in "
                  f"{summary['wall_seconds']:.1f} s (OPRF engine: {oprf_summary['matches']:,} "
                  f"in {oprf_summary['wall_seconds']:.1f} s); same matched subjects: "
                  + ("[green]yes[/green]" if same else "[red]NO[/red]"))
    if not same:
        raise DemoFailure("the two engines disagree")


#: Smallest ``--scale`` whose scenario has the true matches every scene uses.
MIN_SCALE = 1000


def named_scene(work: Path, scenario: Any, ports: dict[str, int]) -> None:
    """Only subjects the authority reviewed can match; an unreviewed one in the file cannot."""
    console.rule("named-subject authorization")
    with scenario.queries.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        rows = list(reader)
    truth = truth_queries(scenario.truth)
    placeholders = {"failed to provide", "unknown address", "na na", "n/a"}
    good = [r for r in rows if r["record_id"] in truth and r["tin"] and r["dob"][:1].isdigit()
            and r["address"].strip().lower() not in placeholders]
    bad = [r for r in rows if r["address"].strip().lower() in placeholders][:3]
    reviewed, intruder = good[:12], good[12]
    review_file = work / "scenario" / "named-review.csv"
    submit_file = work / "scenario" / "named-submit.csv"
    for path, subset in ((review_file, reviewed + bad), (submit_file, reviewed + bad + [intruder])):
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=header)
            w.writeheader()
            w.writerows(subset)
    console.print(f"the requester asks to review {len(reviewed) + len(bad)} named subjects "
                  f"({len(bad)} with placeholder addresses):")
    auth = work / "named.auth.json"
    tokens = work / "named.tokens.json"
    run(["protocol.cli.authority", "review", "--key", str(work / "authority" / "authority.key"),
         "--token-key", str(work / "authority" / "authority.token.key"),
         "--binding", str(work / "authority" / "agency-b.binding"),
         "--requester", "agency-a", "--custodian", "agency-b",
         "--statute", "26 U.S.C. 6103(i)(2)", "--purpose", "named subjects of case 24-117",
         "--rules", NAMED_RULE, "--fields", FIELDS, "--max-disclosures", "100",
         "--queries", str(review_file), "--out", str(auth), "--tokens-out", str(tokens)])
    console.print(f"the requester submits those subjects plus one it did not have reviewed "
                  f"({intruder['record_id']}, who IS in the custodian's file):")
    code, summary = match(work, auth, submit_file, ports, "named", progress=False,
                          tokens=tokens)
    if code != 0:
        raise DemoFailure(f"named-subject match failed: {summary}")
    matched = matched_ids_of(work, ports, summary["job_id"])
    reviewed_ids = {r["record_id"] for r in reviewed}
    console.print(f"  matched {len(matched & reviewed_ids)} of {len(reviewed)} reviewed subjects "
                  f"who are in the custodian file; refused at review: {len(bad)} "
                  "(placeholder addresses, no token issued)")
    if intruder["record_id"] in matched or not matched <= reviewed_ids or not matched:
        raise DemoFailure("named-subject mode let an unreviewed subject match")
    console.print(f"  unreviewed subject {intruder['record_id']}: [green]no match[/green] "
                  "(no token from the authority, so its output matches nothing)")


def aggregate_scene(work: Path, scenario: Any, ports: dict[str, int]) -> None:
    """Statistics without identities: how many are filers, and what they paid together."""
    console.rule("aggregate tier: a count and a sum, no identity or individual value")
    auth = issue(work, "aggregate", "--tier", "aggregate", "--rules", NAMED_RULE,
                 "--value-field", "tax_paid_cents", "--valid-days", "30", "--min-aggregate-count",
                 "10", queries=scenario.queries, quiet=True)
    code, summary = match(work, auth, scenario.queries, ports, "aggregate", progress=False)
    if code != 0:
        raise DemoFailure(f"aggregate match failed: {summary}")
    today = date.today()
    records, accepted = scenario.load(today=today)
    policy = json.loads((work / "agency-b" / "policy.json").read_text())
    excluded = set(policy.get("excluded_record_classes", []))
    in_scope = [r for r in records if r.record_class not in excluded]
    rule = MATCH_RULES[NAMED_RULE]
    want_count, want_sum = plaintext_answer(
        (rule.match_key(p, today=today) for p in accepted),
        ((rule.match_key(r, today=today), int(r.get("tax_paid_cents") or 0)) for r in in_scope))
    got_count, got_sum = summary["aggregate_count"], summary["aggregate_sum"]
    console.print(f"  the requester learned: [bold]{got_count:,}[/bold] of its "
                  f"{summary['queries_accepted']:,} subjects are in the custodian's file, and "
                  f"together they paid [bold]${got_sum / 100:,.2f}[/bold]")
    console.print("  it learned nothing about which ones or what any one of them paid: the "
                  "custodian matched and summed its own records, after a proof that the "
                  "requester's elements were honest; it learned which of its records "
                  "contributed and recorded a digest of them, so a later release differing "
                  "by fewer than 10 people will be refused")
    console.print(f"  plaintext check (measurement only): count {want_count:,}, "
                  f"sum ${want_sum / 100:,.2f}")
    if (got_count, got_sum) != (want_count, want_sum):
        raise DemoFailure("aggregate result differs from the plaintext answer")


def learned_table(summary: dict[str, Any], true_ids: set[str], matched_ids: set[str]) -> Table:
    t = Table(title="who learned what", show_lines=True)
    t.add_column("party")
    t.add_column("learned")
    t.add_column("did not learn")
    correct = len(matched_ids & true_ids)
    t.add_row(
        "agency-a (requester)",
        f"{summary.get('matched_queries', 0):,} of its {summary.get('queries_accepted', 0):,} "
        f"accepted subjects are in the custodian file; for those only the fields "
        f"{', '.join(summary.get('fields_disclosed', {}) or ['(none)'])}; the size of the "
        f"custodian's tag set ({summary.get('custodian_tags', 0):,}).",
        "anything about the custodian's other records: tags are pseudorandom under a "
        "per-authorization key; no TIN, no record ids (pseudonyms only).",
    )
    t.add_row(
        "agency-b (custodian)",
        f"that {summary.get('elements_evaluated', 0):,} blinded elements were evaluated, and "
        f"exactly which {summary.get('disclosed_records', 0):,} of its records were disclosed "
        "(accounted in its ledger before release).",
        f"who the other {summary.get('queries_accepted', 0) - summary.get('matched_queries', 0):,}"
        " queried subjects are: blinded elements are uniformly random group elements.",
    )
    t.add_row(
        "ground truth (measurement only)",
        f"{correct:,} of {len(true_ids):,} true matches found; "
        f"{len(matched_ids - true_ids):,} matched subjects are not true matches.",
        "never shown to either party",
    )
    return t


def oversight_json(work: Path, auth_id: str, name: str = "report") -> Path:
    """Both agencies export the authorization's account (each pins its head with a fresh
    signed checkpoint) and the inspector's check runs on them; its JSON verdict's path."""
    for agency, where in (("agency_b", ["--ledger", str(work / "agency-b" / "ledger.sqlite")]),
                          ("agency_a", ["--data", str(work / "agency-a" / "data")])):
        side = agency[-1]
        run([f"{agency}.cli", "export", *where, "--authorization", auth_id,
             "--out", str(work / f"{name}-export-{side}.json"), "--force",
             "--secrets", str(work / f"agency-{side}" / "secrets")], quiet=True)
    out = work / f"{name}-oversight.json"
    proc = run(["protocol.cli.authority", "oversight",
                "--custodian-export", str(work / f"{name}-export-b.json"),
                "--requester-export", str(work / f"{name}-export-a.json"),
                "--custodian-key", str(work / "agency-b" / "secrets" / "signing.pub.json"),
                "--requester-key", str(work / "agency-a" / "secrets" / "signing.pub.json"),
                "--json"], check=False, quiet=True)
    if proc.returncode not in (0, 1):  # 1 = they disagree: the report shows where
        raise DemoFailure(f"oversight check failed to run: {proc.stderr}")
    out.write_text(proc.stdout)
    return out


def write_report(work: Path, ports: dict[str, int], job_id: str, auth_id: str,
                 dest: Path) -> Path:
    """The policymaker's page for the main match (docs/architecture.md, Reports): the
    operator's ``agency-a report``, logged like any read, with the inspector's verdict."""
    verdict = oversight_json(work, auth_id)
    run(["agency_a.cli", "report", "--server", f"127.0.0.1:{ports['a']}",
         "--certs", str(work / "certs"), "--operator", "demo-analyst", "--job", job_id,
         "--purpose", "demo report for policymakers", "--oversight", str(verdict),
         "--out", str(dest), "--force"], quiet=True)
    return dest


def expect_refusal(label: str, code: int, summary: dict[str, Any], want: str) -> bool:
    text = str(summary.get("failed", ""))
    ok = code != 0 and want in text
    mark = "[green]refused as expected[/green]" if ok else "[red]NOT refused as expected[/red]"
    console.print(f"  {label}: {mark}\n    {text.strip()}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo", description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=int(os.environ.get("SCALE", "20000")),
                   help="queries and custodian records (default 20000; at least 1000; "
                   "1300000 = full size)")
    p.add_argument("--workdir", help="keep everything here instead of a temporary directory "
                   "(default: a new temporary directory, deleted at the end unless --keep)")
    p.add_argument("--keep", action="store_true",
                   help="keep the working directory and print where everything is "
                        "('make demo KEEP=1')")
    p.add_argument("--report", metavar="FILE",
                   help="write the main match's HTML report here (default: report.html in "
                        "the working directory when it is kept, else a new "
                        "gated-psi-demo-report-*.html in the system's temporary directory)")
    args = p.parse_args(argv)
    if args.scale < MIN_SCALE:  # the named scene needs a dozen reviewable true matches
        p.error(f"--scale must be at least {MIN_SCALE:,}: the scenes need enough true matches "
                f"(got {args.scale:,})")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gated-psi-demo-"))
    make_private_dir(work)  # synthetic people, keys, ledgers: owner-only
    procs: list[subprocess.Popen[bytes]] = []
    ok = True
    state: dict[str, str] = {}
    if args.report:
        state["report"] = str(Path(args.report).resolve())
    elif args.workdir or args.keep:
        state["report"] = str(work / "report.html")
    else:  # outlives the deleted working directory: counts only, no one is named in it
        fd, name = tempfile.mkstemp(prefix="gated-psi-demo-report-", suffix=".html")
        os.close(fd)
        state["report"] = name
    try:
        ok = _demo(work, args.scale, procs, state)
    except DemoFailure as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        ok = False
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if ok:
            ok = _verify_chains(work, state.get("auth_id", "")) and ok
        if args.workdir or args.keep or not ok:
            print_kept(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
            console.print(f"working directory {work} deleted (keys, ledgers and logs with it); "
                          "'make demo KEEP=1' keeps it")
    if state.get("report_written"):
        console.print(f"report for policymakers (one self-contained HTML page): "
                      f"{state['report']}", soft_wrap=True, highlight=False)
    elif "report" in state and not args.report and not (args.workdir or args.keep):
        Path(state["report"]).unlink(missing_ok=True)  # the placeholder of a failed run
    console.print(Panel("[green]demo completed: every step behaved as expected[/green]" if ok
                        else "[red]demo FAILED[/red]"))
    return 0 if ok else 1


#: What a kept working directory holds, relative to it (``kept_table``).
KEPT_PATHS = (
    ("synthetic inputs (queries, custodian records, ground truth)", "scenario"),
    ("authority signing key and public key", "authority"),
    ("signed authorizations (main.auth.json: the main match)", "*.auth.json"),
    ("development CA and mTLS certificates", "certs"),
    ("custodian policy", "agency-b/policy.json"),
    ("custodian secrets (master secret, receipt key)", "agency-b/secrets"),
    ("custodian ledger (audit chain, budgets, disclosures)", "agency-b/ledger.sqlite"),
    ("custodian service log (JSON lines)", "agency-b/service.log"),
    ("requester secrets (receipt key, result-store key)", "agency-a/secrets"),
    ("requester data (ledger, encrypted results)", "agency-a/data"),
    ("requester service log (JSON lines)", "agency-a/service.log"),
    ("oversight exports of the main authorization", "export-a.json, export-b.json"),
    ("the main match's report for policymakers (HTML)", "report.html"),
)


def print_kept(work: Path) -> None:
    """Where everything is in a kept working directory, and how to look at it again.

    Plain lines, never a table: paths must not be cut to the terminal's width.
    """
    console.print(f"working directory kept: {work}", soft_wrap=True)
    for label, rel in KEPT_PATHS:
        console.print(f"  {rel:<34} {label}", soft_wrap=True, highlight=False)
    console.print("check the two audit chains again (with the venv's bin on PATH):",
                  soft_wrap=True)
    console.print(f"  agency-b audit verify --ledger {work / 'agency-b' / 'ledger.sqlite'}",
                  soft_wrap=True, highlight=False)
    console.print(f"  agency-a audit verify --data {work / 'agency-a' / 'data'}",
                  soft_wrap=True, highlight=False)


def _verify_chains(work: Path, auth_id: str) -> bool:
    """After both services stopped: both audit chains, then the inspector's oversight check."""
    console.rule("accountability")
    ok = True
    for cmd in (["agency_b.cli", "audit", "verify", "--ledger", str(work / "agency-b" /
                 "ledger.sqlite"), "--public-key",
                 str(work / "agency-b" / "secrets" / "signing.pub.json")],
                ["agency_a.cli", "audit", "verify", "--data", str(work / "agency-a" / "data"),
                 "--public-key", str(work / "agency-a" / "secrets" / "signing.pub.json")]):
        proc = run(cmd, check=False, quiet=True)
        console.print(f"{cmd[0].split('.')[0]} audit chain: {proc.stdout.strip()}")
        ok = ok and proc.returncode == 0
    if not auth_id:
        return False
    for agency, where in (("agency_b", ["--ledger", str(work / "agency-b" / "ledger.sqlite")]),
                          ("agency_a", ["--data", str(work / "agency-a" / "data")])):
        side = agency[-1]
        run([f"{agency}.cli", "export", *where, "--authorization", auth_id,
             "--out", str(work / f"export-{side}.json"),
             "--secrets", str(work / f"agency-{side}" / "secrets")], quiet=True)
    proc = run(["protocol.cli.authority", "oversight",
                "--custodian-export", str(work / "export-b.json"),
                "--requester-export", str(work / "export-a.json"),
                "--custodian-key", str(work / "agency-b" / "secrets" / "signing.pub.json"),
                "--requester-key", str(work / "agency-a" / "secrets" / "signing.pub.json")],
               check=False, quiet=True)
    console.print(Panel(proc.stdout.strip() or proc.stderr.strip(),
                        title="oversight check (what an inspector general runs)"))
    return ok and proc.returncode == 0


def _demo(work: Path, scale: int, procs: list[subprocess.Popen[bytes]],
          state: dict[str, str]) -> bool:
    console.rule("[bold]policy-gated private matching: demo")
    console.print(f"working directory: {work}")
    t0 = time.perf_counter()
    scenario = generate(ScenarioSpec().scaled(scale, scale), work / "scenario")
    console.print(f"1. synthetic scenario: {scale:,} requester queries, {scale:,} custodian "
                  f"records, seeded ({time.perf_counter() - t0:.1f}s)")

    run(["protocol.cli.authority", "keygen", "--out", str(work / "authority")], quiet=True)
    run(["protocol.cli.authority", "dev-ca", "--out", str(work / "certs"),
         "--agency", "agency-a", "--agency", "agency-b",
         "--server", "agency-a", "--server", "agency-b"], quiet=True)
    run(["agency_b.cli", "init", "--out", str(work / "agency-b" / "secrets")], quiet=True)
    run(["agency_a.cli", "init", "--out", str(work / "agency-a" / "secrets"),
         "--operator", "demo-analyst"], quiet=True)
    run(["protocol.cli.authority", "policy-template", "--custodian", "agency-b",
         "--trust", str(work / "authority" / "authority.pub.json"), "--engines", "oprf,kkrt",
         "--out", str(work / "agency-b" / "policy.json")], quiet=True)
    console.print("2. authority key, development CA with mTLS certificates, agency secrets and "
                  "the custodian's default policy (weak rules refused, TIN never disclosed)")

    console.print("3. the authority reviews the query file and signs an authorization:")
    auth = issue(work, "main", "--rules", RULES, "--max-disclosures", str(scale),
                 "--valid-days", "30", "--retention-days", "90", queries=scenario.queries)

    state["auth_id"] = json.loads(auth.read_text())["authorization"]["authorization_id"]
    certification = certify_custodian(work, scenario.custodian)

    ports: dict[str, int] = {}
    b_dir = work / "agency-b"
    procs.append(subprocess.Popen([
        PY, "-m", "agency_b.cli", "serve", "--records", str(scenario.custodian),
        "--policy", str(b_dir / "policy.json"), "--ledger", str(b_dir / "ledger.sqlite"),
        "--secrets", str(b_dir / "secrets"), "--certs", str(work / "certs"),
        "--listen", "127.0.0.1:0", "--port-file", str(b_dir / "port"),
        "--certification", str(certification),
        "--requester-key", f"agency-a={work / 'agency-a' / 'secrets' / 'signing.pub.json'}",
    ], stderr=open_private_log(b_dir / "service.log")))
    a_dir = work / "agency-a"
    procs.append(subprocess.Popen([
        PY, "-m", "agency_a.cli", "serve", "--certs", str(work / "certs"),
        "--secrets", str(a_dir / "secrets"), "--data", str(a_dir / "data"),
        "--listen", "127.0.0.1:0", "--port-file", str(a_dir / "port"),
        "--custodian-key", f"agency-b={b_dir / 'secrets' / 'signing.pub.json'}",
    ], stderr=open_private_log(a_dir / "service.log")))
    ports["b"] = wait_port(b_dir / "port", procs[0])
    ports["a"] = wait_port(a_dir / "port", procs[1])
    console.print(f"4. services up on loopback with mTLS: custodian :{ports['b']}, "
                  f"requester :{ports['a']} (logs, JSON lines: {b_dir / 'service.log'}, "
                  f"{a_dir / 'service.log'})")

    console.rule("authorized identity-tier match")
    code, summary = match(work, auth, scenario.queries, ports, "main")
    if code != 0:
        raise DemoFailure(f"authorized match failed: {summary}")
    true_ids = truth_queries(scenario.truth)
    matched_ids = matched_ids_of(work, ports, summary["job_id"])
    console.print(learned_table(summary, true_ids, matched_ids))
    receipt = summary["receipt"]
    console.print(Panel(
        f"authorization {receipt['authorization_id']}\nsession {receipt['session_id']}\n"
        f"evaluated {receipt['evaluated']:,}  disclosed {receipt['disclosed']:,}\n"
        f"transcript {receipt['transcript_hash'][:32]}…\n"
        f"custodian signature {receipt['custodian_signature'][:32]}…\n"
        f"requester countersignature {receipt['requester_signature'][:32]}…",
        title="signed receipt (both parties keep both signatures)"))
    console.print(f"results are stored encrypted at rest for "
                  f"{summary['results_retention_days']} days, then purged; "
                  f"the read above was logged for operator 'demo-analyst'.")
    write_report(work, ports, summary["job_id"], state["auth_id"], Path(state["report"]))
    state["report_written"] = "yes"
    console.print(f"report for policymakers written (counts only, the access logged): "
                  f"{state['report']}", soft_wrap=True, highlight=False)

    kkrt_scene(work, scenario, ports, summary, matched_ids)
    named_scene(work, scenario, ports)
    aggregate_scene(work, scenario, ports)

    console.rule("refusals")
    small = work / "scenario" / "small-queries.csv"
    with scenario.queries.open(newline="") as src, small.open("w", newline="") as dst:
        for i, line in enumerate(src):
            if i > 200:
                break
            dst.write(line)
    expired = issue_expired(work)
    weak = issue(work, "weak", "--rules", "first+last+address", "--max-evaluations", "1000",
                 "--max-disclosures", "100", "--valid-days", "30")
    checks = []
    code, s = match(work, expired, small, ports, "expired", progress=False)
    checks.append(expect_refusal("expired authorization", code, s, "expired"))
    code, s = match(work, weak, small, ports, "weak", progress=False)
    checks.append(expect_refusal("weak name+address rule under the default policy", code, s,
                                 "rule_too_weak"))
    code, s = match(work, auth, scenario.queries, ports, "replay", progress=False)
    checks.append(expect_refusal("the main authorization again, budget used up", code, s,
                                 "budget_exhausted"))
    if not all(checks):
        raise DemoFailure("a refusal did not happen as expected")
    return True


if __name__ == "__main__":
    sys.exit(main())
