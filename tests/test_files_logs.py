"""Private files, operator identities and structured logs, on real processes (issues 13, 14).

Both services run as real processes over real mTLS; a real match goes through them with the
``agency-a`` CLI. Then: every file that holds disclosed data, keys or audit is 0600 and its
directories 0700 (``os.stat`` on the real files, SQLite sidecars included); each service's
structured stream holds JSON lines only, with ISO-8601 UTC timestamps, even with gRPC's native
logging turned up; ``--log-file`` works; an operator outside the roster or malformed is refused
with a specific status, never UNKNOWN, and the refusal is logged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agency_a import cli as cli_a
from agency_b import cli as cli_b
from proto import service_kit as kit
from protocol.adapters.files import (
    create_private_file,
    make_private_dir,
    open_csv,
    open_private_log,
)
from protocol.adapters.operators import (
    OperatorRoster,
    operator_problem,
    read_operator_roster,
    write_operator_roster,
)
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli import authority as authority_cli
from protocol.cli.dev_pki import write_dev_pki
from protocol.domain.records import write_person_csv, write_query_csv
from protocol.policy import decide as P
from protocol.policy.authority import public_key_to_json
from tests.factories import as_query, make_person

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
OPERATOR = "analyst-7"
AUDITOR = "auditor@agency-a"
N_RECORDS = 40
N_MATCHING = 12

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc


# -------------------------------------------------------------------------- helpers


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def wait_port(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"service exited with {proc.returncode}: {log.read_text()}")
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"no port file after {timeout}s: {log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line parsed as a JSON object with the log envelope; fails otherwise."""
    events = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"line {number} is not JSON: {line[:200]!r}")
        assert isinstance(event, dict), line
        assert list(event)[:4] == ["ts", "level", "logger", "event"], line
        assert ISO_UTC_MS.match(event["ts"]), event["ts"]
        events.append(event)
    return events


def cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", module, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)


# -------------------------------------------------------------------------- the real run


BAD_OPERATORS = [
    ("", grpc.StatusCode.INVALID_ARGUMENT, "invalid_operator: an operator id is required"),
    ("   ", grpc.StatusCode.INVALID_ARGUMENT, "invalid_operator: the operator id is blank"),
    ("x" * 65, grpc.StatusCode.INVALID_ARGUMENT, "invalid_operator: the operator id has 65"),
    ("ana\x1b[2J", grpc.StatusCode.INVALID_ARGUMENT,
     "invalid_operator: the operator id contains control characters"),
    ("ana smith", grpc.StatusCode.INVALID_ARGUMENT, "invalid_operator: the operator id must"),
    ("mallory", grpc.StatusCode.PERMISSION_DENIED,
     "unknown_operator: 'mallory' is not in this service's operator roster"),
    ("Analyst-7", grpc.StatusCode.PERMISSION_DENIED, "unknown_operator: 'Analyst-7'"),
]
RPCS = ("GetResults", "WatchJob", "PurgeResults", "SubmitMatch")


def probe(stub: Any, rpc: str, operator: str, *, job: str, purpose: str = "audit",
          auth: bytes = b"", queries: bytes = b"", custodian: str = "") -> tuple[str, str]:
    """Call ``rpc`` as ``operator``; the status name and details it answered ("OK" if none)."""
    ref = pb2.JobRef(job_id=job, operator=operator, purpose=purpose)
    try:
        if rpc == "GetResults":
            list(stub.GetResults(ref, timeout=10))
        elif rpc == "WatchJob":
            list(stub.WatchJob(ref, timeout=10))
        elif rpc == "PurgeResults":
            stub.PurgeResults(ref, timeout=10)
        else:
            header = pb2.JobHeader(signed_authorization=auth, operator=operator,
                                   custodian_address=custodian)
            stub.SubmitMatch(iter([pb2.SubmitChunk(header=header),
                                   pb2.SubmitChunk(csv=queries)]), timeout=10)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Both services as real processes: one match and one results read by the CLI, every
    operator probe, then a graceful stop, so each test only reads what was recorded."""
    old_umask = os.umask(0o022)  # the usual default: privacy must not depend on it
    try:
        yield from _run(tmp_path_factory.mktemp("files-logs"))
    finally:
        os.umask(old_umask)


def _run(tmp: Path) -> Iterator[dict[str, Any]]:
    certs = tmp / "pki" / "certs"
    write_dev_pki(certs, ["agency-a", "agency-b"], server_agencies=["agency-a", "agency-b"])
    a_dir, b_dir = tmp / "agency-a", tmp / "agency-b"
    assert cli_b.main(["init", "--out", str(b_dir / "secrets")]) == 0
    assert cli_a.main(["init", "--out", str(a_dir / "secrets"), "--operator", OPERATOR,
                       "--operator", AUDITOR]) == 0

    authority = Ed25519PrivateKey.generate()
    authority_pub = tmp / "authority.pub.json"
    authority_pub.write_text(json.dumps(public_key_to_json(authority.public_key())))
    policy = tmp / "policy.json"
    assert authority_cli.main(["policy-template", "--custodian", "agency-b",
                               "--trust", str(authority_pub), "--out", str(policy)]) == 0
    records = [make_person(i) for i in range(N_RECORDS)]
    records_csv, queries_csv = tmp / "custodian.csv", tmp / "queries.csv"
    with open_csv(records_csv, "w") as fh:
        write_person_csv(records, fh)
    queries = [as_query(p) for p in records[:N_MATCHING]]
    queries += [as_query(make_person(i, prefix="z")) for i in range(1000, 1010)]
    with open_csv(queries_csv, "w") as fh:
        write_query_csv(queries, fh)
    now = int(time.time())
    auth = P.Authorization(
        authorization_id=P.new_authorization_id(),
        authority_key_id=P.authority_key_id(authority.public_key()),
        requester_id="agency-a", custodian_id="agency-b", statute="26 U.S.C. 6103(i)(2)",
        purpose="files and logs test", not_before=now - 60, not_after=now + 3600,
        tier=P.Tier.IDENTITY, max_evaluations=1000, max_disclosures=1000,
        match_rules=("tin+dob",), disclosure_fields=("address", "city", "state", "zip"),
        retention_days=30,
    )
    auth_file = tmp / "auth.json"
    auth_file.write_bytes(P.sign_authorization(auth, authority).to_bytes())

    b_stderr, a_stderr = tmp / "b.stderr", tmp / "a.stderr"
    a_log = a_dir / "logs" / "requester.log"  # its directory does not exist yet
    common = ["--certs", str(certs), "--listen", "127.0.0.1:0", "--workers", "1",
              "--grace", "1", "--checkpoint-interval", "0"]
    # gRPC's own logging turned up on the custodian: its native lines must arrive as JSON
    b_env = {**os.environ, "GRPC_VERBOSITY": "INFO"}
    with b_stderr.open("wb") as err:
        custodian = subprocess.Popen([
            PY, "-m", "agency_b.cli", "serve", *common, "--records", str(records_csv),
            "--policy", str(policy), "--ledger", str(b_dir / "ledger.sqlite"),
            "--secrets", str(b_dir / "secrets"), "--port-file", str(b_dir / "port"),
            "--requester-key", f"agency-a={a_dir / 'secrets' / 'signing.pub.json'}",
        ], stderr=err, cwd=ROOT, env=b_env)
    with a_stderr.open("wb") as err:
        requester = subprocess.Popen([
            PY, "-m", "agency_a.cli", "serve", *common, "--secrets", str(a_dir / "secrets"),
            "--data", str(a_dir / "data"), "--port-file", str(a_dir / "port"),
            "--custodian-key", f"agency-b={b_dir / 'secrets' / 'signing.pub.json'}",
            "--log-file", str(a_log),
        ], stderr=err, cwd=ROOT)
    try:
        b_port = wait_port(b_dir / "port", custodian, b_stderr)
        a_port = wait_port(a_dir / "port", requester, a_stderr)
        summary = tmp / "summary.json"
        match = cli("agency_a.cli", "match", "--server", f"127.0.0.1:{a_port}",
                    "--certs", str(certs), "--operator", OPERATOR, "--authorization",
                    str(auth_file), "--queries", str(queries_csv), "--custodian",
                    f"127.0.0.1:{b_port}", "--no-progress", "--summary-json", str(summary))
        assert match.returncode == 0, match.stdout + match.stderr
        job = json.loads(summary.read_text())["job_id"]
        results = cli("agency_a.cli", "results", "--server", f"127.0.0.1:{a_port}",
                      "--certs", str(certs), "--operator", AUDITOR, "--job", job,
                      "--purpose", "check the files test")
        assert results.returncode == 0, results.stderr
        # modes of the SQLite sidecars, which exist only while the ledgers are open
        sidecars = {p: mode_of(p) for d in (b_dir, a_dir / "data")
                    for p in d.iterdir() if p.name.endswith(("-wal", "-shm", "-journal"))}
        kw = {"job": job, "auth": auth_file.read_bytes(), "queries": queries_csv.read_bytes(),
              "custodian": f"127.0.0.1:{b_port}"}
        with kit.secure_channel(f"127.0.0.1:{a_port}",
                                kit.TLSFiles.from_dir(certs, "agency-a", "client")) as channel:
            stub = pb2_grpc.RequesterStub(channel)
            probes = {(operator, rpc): probe(stub, rpc, operator, **kw)
                      for operator, _, _ in BAD_OPERATORS for rpc in RPCS}
            blank_purpose = probe(stub, "GetResults", OPERATOR, job=job, purpose=" \t")
            rows_after = len(list(stub.GetResults(
                pb2.JobRef(job_id=job, operator=OPERATOR, purpose="recheck"), timeout=10)))
        # a TLS client without a certificate: gRPC's core logs the failed handshake natively
        no_cert = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{a_port}", no_cert) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb2_grpc.RequesterStub(channel).PurgeResults(pb2.JobRef(job_id=job), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        cli_refusal = cli("agency_a.cli", "results", "--server", f"127.0.0.1:{a_port}",
                          "--certs", str(certs), "--operator", " ", "--job", job,
                          "--purpose", "p")
    finally:
        codes = stop(requester), stop(custodian)
    assert codes == (0, 0), codes
    yield {
        "tmp": tmp, "certs": certs, "a_dir": a_dir, "b_dir": b_dir, "a_log": a_log,
        "a_stderr": a_stderr, "b_stderr": b_stderr, "sidecars": sidecars, "results": results,
        "summary": json.loads(summary.read_text()), "probes": probes,
        "blank_purpose": blank_purpose, "rows_after": rows_after, "cli_refusal": cli_refusal,
        "custodian_serve": ["serve", *common, "--records", str(records_csv), "--policy",
                            str(policy), "--secrets", str(b_dir / "secrets"),
                            "--requester-key",
                            f"agency-a={a_dir / 'secrets' / 'signing.pub.json'}"],
    }


# -------------------------------------------------------------------------- operators


def test_match_and_results_by_rostered_operators(run: dict[str, Any]) -> None:
    assert run["summary"]["matches"] == N_MATCHING
    rows = [line for line in run["results"].stdout.splitlines() if line.strip()]
    assert len(rows) == N_MATCHING
    assert f"operator {AUDITOR!r}" in run["results"].stderr


@pytest.mark.parametrize(("operator", "code", "reason"), BAD_OPERATORS)
def test_operator_refused_on_every_rpc(run: dict[str, Any], operator: str,
                                       code: grpc.StatusCode, reason: str) -> None:
    for rpc in RPCS:
        status, details = run["probes"][(operator, rpc)]
        assert status == code.name, (rpc, details)
        assert details.startswith(reason), (rpc, details)


def test_refusals_changed_nothing_and_blank_purpose_is_refused(run: dict[str, Any]) -> None:
    assert run["rows_after"] == N_MATCHING  # no refused purge went through
    status, details = run["blank_purpose"]
    assert status == "INVALID_ARGUMENT"
    assert details.startswith("malformed: reading results requires a purpose")


def test_cli_names_the_refusal(run: dict[str, Any]) -> None:
    out = run["cli_refusal"]
    assert out.returncode == 1
    assert "INVALID_ARGUMENT: invalid_operator: the operator id is blank" in out.stderr


def test_serve_without_roster_refuses_to_start(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    assert cli_a.main(["init", "--out", str(secrets)]) == 0
    assert not (secrets / "operators.txt").exists()
    out = cli("agency_a.cli", "serve", "--certs", str(tmp_path), "--secrets", str(secrets),
              "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0")
    assert out.returncode == 2
    assert "operator roster" in out.stderr and "agency-a init --operator" in out.stderr
    assert not (tmp_path / "data").exists()  # nothing started


def test_unusable_log_file_is_a_plain_start_up_error(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    assert cli_a.main(["init", "--out", str(secrets), "--operator", OPERATOR]) == 0
    (tmp_path / "a-file").write_text("")
    out = cli("agency_a.cli", "serve", "--certs", str(tmp_path), "--secrets", str(secrets),
              "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0",
              "--log-file", str(tmp_path / "a-file" / "x.log"))
    assert out.returncode == 2
    assert out.stderr.startswith("agency-a: error:") and "not a directory" in out.stderr


def test_fatal_error_after_logging_started(run: dict[str, Any], tmp_path: Path) -> None:
    """A ledger path that is a directory: JSON on a JSON-only stderr; with --log-file, the
    event in the file and one plain line on stderr."""
    argv = [*run["custodian_serve"], "--ledger", str(tmp_path)]
    out = cli("agency_b.cli", *argv)
    assert out.returncode == 2
    (fatal,) = [e for e in json_lines(out.stderr) if e["event"] == "fatal"]
    assert "not a regular file" in fatal["error"] and fatal["level"] == "error"
    log = tmp_path / "b.log"
    out = cli("agency_b.cli", *argv, "--log-file", str(log))
    assert out.returncode == 2
    assert out.stderr.startswith("agency-b: error:") and len(out.stderr.splitlines()) == 1
    assert [e["event"] for e in json_lines(log.read_text())][-1] == "fatal"


def test_roster_file_rules(tmp_path: Path) -> None:
    roster = tmp_path / "ops" / "operators.txt"
    write_operator_roster(roster, ["b.lee", "a@x"], force=False)
    assert mode_of(roster) == 0o600 and mode_of(roster.parent) == 0o700
    assert list(read_operator_roster(roster)) == ["a@x", "b.lee"]
    with pytest.raises(FileExistsError):
        write_operator_roster(roster, ["c"], force=False)
    roster.write_text("# comment\nok-1  # trailing comment\n\nbad name\n")
    with pytest.raises(ValueError, match=r"operators.txt:4: .*must start"):
        read_operator_roster(roster)
    roster.chmod(0o620)
    with pytest.raises(PermissionError, match="writable by group/others"):
        read_operator_roster(roster)
    roster.chmod(0o644)  # readable by others is fine: the roster names people, it is no secret
    roster.write_text("# nobody\n")
    with pytest.raises(ValueError, match="names no operator"):
        read_operator_roster(roster)
    with pytest.raises(ValueError, match="blank"):
        OperatorRoster([" "])
    assert operator_problem("analyst-7") is None
    assert "control" in (operator_problem("a\u200bb") or "")  # zero-width space: not printable


# -------------------------------------------------------------------------- file modes


def test_every_private_file_is_0600_and_its_directories_0700(run: dict[str, Any]) -> None:
    a_dir, b_dir, certs = run["a_dir"], run["b_dir"], run["certs"]
    private_files = [
        b_dir / "ledger.sqlite", b_dir / "port", b_dir / "secrets" / "master.secret",
        b_dir / "secrets" / "signing.key",
        a_dir / "data" / "requester-ledger.sqlite", a_dir / "data" / "results.sqlite",
        a_dir / "port", a_dir / "secrets" / "signing.key", a_dir / "secrets" / "results.key",
        a_dir / "secrets" / "operators.txt", run["a_log"], run["tmp"] / "summary.json",
        *certs.glob("*.key"),
    ]
    modes = {str(p.relative_to(run["tmp"])): mode_of(p) for p in private_files}
    assert modes == dict.fromkeys(modes, 0o600)
    assert len(list(certs.glob("*.key"))) == 5
    # the SQLite sidecars seen while the services ran (WAL and shared memory at least)
    assert len(run["sidecars"]) >= 4, run["sidecars"]
    assert set(run["sidecars"].values()) == {0o600}, run["sidecars"]
    # anything else the services left in their own directories is private too
    for d in (a_dir / "data", a_dir / "logs"):
        for p in d.iterdir():
            assert mode_of(p) == 0o600, p
    dirs = [a_dir, a_dir / "secrets", a_dir / "data", a_dir / "logs", b_dir, b_dir / "secrets",
            certs, certs.parent]
    dir_modes = {str(p.relative_to(run["tmp"])): mode_of(p) for p in dirs}
    assert dir_modes == dict.fromkeys(dir_modes, 0o700)


def test_existing_ledger_is_tightened_and_sidecars_follow(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "new" / "ledger.sqlite"
        ledger = Ledger(path)
        sidecars = [p for p in path.parent.iterdir() if p != path]
        assert mode_of(path) == 0o600 and mode_of(path.parent) == 0o700
        assert sidecars and all(mode_of(p) == 0o600 for p in sidecars), sidecars
        ledger.close()
        path.chmod(0o644)
        Ledger(path).close()
        assert mode_of(path) == 0o600
        if os.geteuid() == 0:  # someone else's copy (an inspector's) is read, not re-moded
            path.chmod(0o644)
            os.chown(path, 65534, 65534)
            Ledger(path).close()
            assert mode_of(path) == 0o644
    finally:
        os.umask(old)


def test_private_helpers(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        existing = tmp_path / "mine"
        existing.mkdir(mode=0o755)
        deep = make_private_dir(existing / "a" / "b")
        assert mode_of(existing) == 0o755  # not created here: left alone
        assert mode_of(existing / "a") == 0o700 and mode_of(deep) == 0o700
        loose = deep / "f"
        loose.write_text("x")
        loose.chmod(0o666)
        create_private_file(loose)
        assert mode_of(loose) == 0o600 and loose.read_text() == "x"
        with pytest.raises(ValueError, match="not a regular file"):
            create_private_file(deep)
        os.mkfifo(deep / "fifo")
        with pytest.raises(ValueError, match="not a regular file"):
            create_private_file(deep / "fifo")
        with open_private_log(deep / "l.log") as fh:
            fh.write("one\n")
        with open_private_log(deep / "l.log") as fh:
            fh.write("two\n")
        assert (deep / "l.log").read_text() == "one\ntwo\n"
        assert mode_of(deep / "l.log") == 0o600
    finally:
        os.umask(old)


# -------------------------------------------------------------------------- logs


def test_custodian_stderr_is_json_only_with_native_lines_routed(run: dict[str, Any]) -> None:
    events = json_lines(run["b_stderr"].read_text())
    names = [e["event"] for e in events]
    for expected in ("records_loaded", "serving", "session_opened", "session_closed",
                     "stopping"):
        assert expected in names, names
    native = [e for e in events if e["logger"] == kit.NATIVE_LOGGER]
    assert native, "GRPC_VERBOSITY=INFO produced no native line to route"
    assert all(e["event"] == "native_log" and e["source"] and "text" in e for e in native)


def test_requester_log_file_and_silent_stderr(run: dict[str, Any]) -> None:
    assert run["a_stderr"].read_text() == ""
    events = json_lines(run["a_log"].read_text())
    by_name: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_name.setdefault(e["event"], []).append(e)
    done = by_name["job_done"][0]
    # same names and meanings as the custodian's: distinct records, and rows per (record, rule)
    assert done["disclosed_records"] == N_MATCHING and done["result_rows"] == N_MATCHING
    assert "disclosed" not in done
    refused = by_name["operator_refused"]
    assert {e["rpc"] for e in refused} >= {"GetResults", "WatchJob", "PurgeResults",
                                           "SubmitMatch"}
    assert {e["status"] for e in refused} == {"INVALID_ARGUMENT", "PERMISSION_DENIED"}
    assert all(len(e["operator"]) <= 64 for e in refused)
    assert by_name["job_submitted"][0]["operator"] == OPERATOR
    reads = by_name["results_read"]  # the accepted accesses, by whom and why
    assert [(e["operator"], e["result_rows"]) for e in reads] == [(AUDITOR, N_MATCHING),
                                                                  (OPERATOR, N_MATCHING)]
    assert reads[0]["purpose"] == "check the files test"
    # at gRPC's default verbosity the failed handshake is there, as a JSON event
    assert any(e["logger"] == kit.NATIVE_LOGGER and "Handshake failed" in e["text"]
               for e in by_name["native_log"])


NATIVE_FLOOD = """
import os, sys, time, warnings
from proto import service_kit as kit
kit.setup_logging("info", capture_native=True)
warnings.warn("a python warning")
print("plain text on stderr", file=sys.stderr, flush=True)
for i in range(1000):  # what a flood of failed TLS handshakes makes gRPC's core write
    os.write(2, b"E1130 01:49:43.123456   4711 probe.cc:7] handshake failed %d\\n" % i)
time.sleep(kit.NATIVE_LOG_WINDOW_SECONDS + 0.2)
raise RuntimeError("boom")
"""


def test_native_stderr_becomes_json_and_a_flood_is_capped() -> None:
    out = subprocess.run([PY, "-c", NATIVE_FLOOD], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, check=False)
    assert out.returncode == 1  # the uncaught exception, reported as JSON below
    events = json_lines(out.stderr)
    native = [e for e in events if e["event"] == "native_log"]
    flood = [e for e in native if e["source"] == "probe.cc:7"]
    suppressed = sum(e["lines"] for e in events if e["event"] == "native_log_suppressed")
    assert len(flood) + suppressed == 1000  # every line either written or counted
    assert suppressed >= 1000 - 2 * kit.MAX_NATIVE_LINES_PER_WINDOW
    assert all(e["level"] == "error" and e["text"].startswith("handshake failed")
               for e in flood)
    assert any(e["source"] == "stderr" and e["text"] == "plain text on stderr" for e in native)
    assert any(e["logger"] == "py.warnings" and "a python warning" in e["event"]
               for e in events)
    assert any(e["text"] == "RuntimeError: boom" for e in native)  # traceback after a window


def test_json_formatter_envelope_and_bounds() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(kit.JSONFormatter())
    logger = logging.getLogger("test_files_logs.formatter")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("probe", extra={"fields": {"ts": "forged", "event": "forged",
                                               "peer": "p" * 5000, "items": list(range(100)),
                                               "by": {str(i): i for i in range(100)}}})
    finally:
        logger.removeHandler(handler)
    (event,) = json_lines(out.getvalue())
    assert event["event"] == "probe" and event["field_event"] == "forged"
    assert event["field_ts"] == "forged" and ISO_UTC_MS.match(event["ts"])
    assert len(event["peer"]) < 600 and event["peer"].endswith("(+4488 chars)")
    assert len(event["items"]) == kit.MAX_LOG_FIELD_ITEMS + 1
    assert len(event["by"]) == kit.MAX_LOG_FIELD_ITEMS + 1 and event["by"]["..."] == "+36 items"
    assert kit.iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert kit.iso_utc(1.2345) == "1970-01-01T00:00:01.234Z"
