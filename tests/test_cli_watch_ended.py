"""``agency-a match`` when the job's watch ends before the job does.

The operator's CLI follows a job through the requester service's watch stream. When that
stream ends without the job's final event, because the service process died or because the
stream was closed early, the CLI must say so on stderr, exit 1, write the same in
``--summary-json`` and print nothing that reads as a finished match; the job's state stays on
the service (docs/architecture.md, Late failures). Everything runs over real gRPC with real
mutual TLS; the crash test runs a real ``agency-a serve`` process that SIGKILLs itself.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agency_a import cli as cli_a
from agency_a.service import serve as serve_requester
from proto import service_kit as kit
from protocol.policy.decide import SignedAuthorization
from tests.test_late_failure import (
    OPERATOR,
    PURPOSE,
    AgencyA,
    Lab,
    lab,  # noqa: F401  (fixture)
    results,
    wait_for_receipt,
    watch,
)
from tests.test_late_failure import agency_a as agency_a

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc
MATCHING = 6  # query records of the job that are in the custodian's file


def match_argv(setup: Lab, server: str, custodian: str, signed: SignedAuthorization,
               summary_json: Path) -> list[str]:
    """``agency-a match`` of ``MATCHING`` known and four unknown queries, without bars."""
    auth_file, queries = setup.tmp / "auth.json", setup.tmp / "queries.csv"
    auth_file.write_bytes(signed.to_bytes())
    queries.write_bytes(setup.queries_csv(matching=MATCHING))
    return ["match", "--server", server, "--certs", str(setup.pki), "--operator", OPERATOR,
            "--authorization", str(auth_file), "--queries", str(queries),
            "--custodian", custodian, "--no-progress", "--summary-json", str(summary_json)]


def assert_said_watch_ended(out: str, err: str, summary_json: Path, *, reason: str,
                            last_phase: str | None = None) -> str:
    """The CLI's account of a watch that ended early, on stderr and in --summary-json, and
    no word of success on stdout; returns the job id. ``last_phase`` None: any phase
    before the final event."""
    doc = json.loads(summary_json.read_text())
    job_id = doc["job_id"]
    if last_phase is None:
        last_phase = doc["last_phase"]
        assert last_phase in ("", *cli_a.PHASE_LABELS), doc
    assert out.startswith(f"job {job_id}: {MATCHING + 4} query records, {MATCHING + 4} "
                          "accepted"), out
    assert f"the job watch ended before job {job_id} finished (last phase: " \
        f"{last_phase or 'none'}; {reason}" in err, err
    assert f"'agency-a results --job {job_id}'" in err
    assert "Traceback" not in out + err
    # nothing claims the match finished: no summary table, no receipt, no count of matches
    for claim in ("summary", "matches", "receipt", "disclosed", "match failed"):
        assert claim not in out, (claim, out)
    assert doc == {"job_id": job_id, "finished": False, "watch_ended": doc["watch_ended"],
                   "last_phase": last_phase}
    assert doc["watch_ended"].startswith(reason)
    return str(job_id)


def test_match_says_so_when_the_requester_process_dies_mid_job(
        lab: Lab, agency_a: AgencyA, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """The service process is SIGKILLed mid-disclosure (late, so that its reply to the
    submission is long sent): the watch breaks (UNAVAILABLE) and the CLI says so; the
    restarted service finishes the job from what it stored, as the message says."""
    summary_json = lab.tmp / "summary.json"
    with lab.custodian() as custodian:
        with agency_a.serving(kill_at="disclosed") as (proc, _):
            # the port file of this start (tests/test_late_failure.py, AgencyA.serving)
            port = int((lab.tmp / f"agency-a-port-{agency_a.starts}").read_text())
            code = cli_a.main(match_argv(lab, f"127.0.0.1:{port}", custodian,
                                         lab.world.authorize(max_disclosures=100),
                                         summary_json))
            assert proc.wait(timeout=60) == -signal.SIGKILL
        out, err = capsys.readouterr()
        assert code == 1
        # how far the watch got before the process died is a race: any phase before it
        job_id = assert_said_watch_ended(out, err, summary_json, reason="UNAVAILABLE")
        with agency_a.serving() as (proc, stub):
            summary = wait_for_receipt(stub, job_id)
            assert summary["job_id"] == job_id
            assert summary["match_completed"] is True
            assert len(results(stub, job_id)) == MATCHING  # the lost batch asked again


def closing_after_evaluate(watch_job: Any) -> Any:
    """``WatchJob`` of the real service, but the first watch's stream closes normally
    (status OK) right after its first evaluation progress event, as a proxy in between might
    leave it; later watches see the whole job."""
    first = threading.Event()

    def closing(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        cut = not first.is_set()
        first.set()
        for event in watch_job(request, context):
            yield event
            if cut and event.phase == "evaluate":
                return

    return closing


def test_match_says_so_when_the_watch_stream_closes_early(
        lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """The stream ends cleanly mid-job: the CLI says so and exits 1, while the job goes on
    on the service and its results are there, as the message says."""
    service = lab.requester()
    service.WatchJob = closing_after_evaluate(service.WatchJob)  # type: ignore[method-assign]
    summary_json = lab.tmp / "summary.json"
    with lab.custodian() as custodian:
        server, port = serve_requester(
            service, kit.TLSFiles.from_dir(lab.pki, "agency-a", "server"))
        try:
            code = cli_a.main(match_argv(lab, f"127.0.0.1:{port}", custodian,
                                         lab.world.authorize(max_disclosures=100),
                                         summary_json))
            out, err = capsys.readouterr()
            assert code == 1
            job_id = assert_said_watch_ended(out, err, summary_json, reason="stream_closed",
                                             last_phase="evaluate")
            with kit.secure_channel(f"127.0.0.1:{port}", kit.TLSFiles.from_dir(
                    lab.pki, "agency-a", "client")) as channel:
                stub = pb2_grpc.RequesterStub(channel)
                phase, summary, message = watch(stub, job_id)
                assert phase == "done", message
                assert summary["disclosed_records"] == MATCHING
                assert len(results(stub, job_id)) == MATCHING
            assert cli_a.main(["results", "--server", f"127.0.0.1:{port}",
                               "--certs", str(lab.pki), "--operator", OPERATOR,
                               "--job", job_id, "--purpose", PURPOSE]) == 0
            assert f"{MATCHING} result rows read logged" in capsys.readouterr().err
        finally:
            server.stop(0)
