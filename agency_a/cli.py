"""``agency-a``: the requester's operator CLI (init, serve, match, results, report, purge)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agency_a.service import RequesterService, serve
from agency_a.store import (
    RESULT_FORMATS,
    ResultStore,
    format_result_rows,
    generate_key_file,
    load_key,
)
from proto import service_kit as kit
from proto.lifecycle import (
    add_serve_arguments,
    run_cli,
    serve_until_signal,
    shut_down,
    start_serve_process,
)
from protocol.adapters.checkpointer import Checkpointer
from protocol.adapters.files import make_private_dir, write_file_atomic
from protocol.adapters.keys import load_signing_key, parse_agency_keys, write_signing_key
from protocol.adapters.operators import (
    OPERATORS_FILE,
    read_operator_roster,
    write_operator_roster,
)
from protocol.adapters.pools import AggregatePool, BatchPool
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli.help import HelpfulParser
from protocol.cli.oversight import (
    add_ledger_commands,
    audit_verify_command,
    export_command,
    read_accuracy,
)
from protocol.domain.engine import Engine
from protocol.domain.records import CSV_SCHEMA_HELP
from protocol.engines import registry as engine_registry
from protocol.report.facts import UNRELEASED_COUNTS_KEY, job_facts
from protocol.report.render import render_report

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc
log = logging.getLogger("agency_a")
UPLOAD_CHUNK = 1 << 20
LEDGER_FILE = "requester-ledger.sqlite"


def cmd_init(args: argparse.Namespace) -> int:
    out = make_private_dir(args.out)
    if args.operator:  # validated before any secret is written
        write_operator_roster(out / OPERATORS_FILE, args.operator, force=args.force)
    write_signing_key(out, "signing", force=args.force)
    key_path = out / "results.key"
    if key_path.exists() and args.force:
        key_path.unlink()
    generate_key_file(key_path)
    print(f"requester secrets written to {out} (signing.key, signing.pub.json, results.key); "
          "keep results.key away from the data directory")
    print(f"operators: {', '.join(args.operator)} ({out / OPERATORS_FILE})" if args.operator
          else "no operators named: 'serve' needs --operators FILE (or re-run init with "
               "--operator ID --force)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    secrets = Path(args.secrets)
    # a missing roster is a configuration error, reported before anything starts
    operators = read_operator_roster(args.operators or secrets / OPERATORS_FILE)
    start_serve_process(args)  # umask 0077, JSON logs only
    data = make_private_dir(args.data)
    audit = Ledger(data / LEDGER_FILE)
    signing_key = load_signing_key(secrets / "signing.key")
    checkpointer = Checkpointer(audit, signing_key, args.checkpoint_interval).start()
    key_path = secrets / "results.key"
    store = ResultStore(data / "results.sqlite", load_key(key_path), audit, key_path=key_path)
    store.start_purger(args.purge_interval)
    pool = BatchPool(args.workers).warm() if args.workers > 1 else None
    agg_pool = AggregatePool(args.workers) if args.workers > 1 else None
    service = RequesterService(
        args.agency_id,
        kit.TLSFiles.from_dir(Path(args.certs), args.agency_id, "client"),
        signing_key=signing_key, operators=operators,
        store=store, ops=pool, custodian_keys=parse_agency_keys(args.custodian_key),
        chunk_size=args.chunk_size, audit=audit, aggregate_ops=agg_pool,
        tagset_cache=data / "tagsets",  # created 0700 on the first epoch-mode job
    )
    tls = kit.TLSFiles.from_dir(Path(args.certs), args.agency_id, "server")
    server, port = serve(service, tls, args.listen)
    service.start_receipt_retries(args.receipt_retry_interval)  # earlier runs' pending jobs
    serve_until_signal(log, port, args.port_file, service="requester", agency=args.agency_id)
    service.stop_receipt_retries()
    store.stop_purger()  # its audit entries land before the final checkpoint
    shut_down(log, server, args.grace, checkpointer, (pool, agg_pool))
    audit.close()
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Verify the requester ledger's hash chain and, with a public key, its checkpoints."""
    return audit_verify_command(Path(args.data) / LEDGER_FILE, args.public_key)


def cmd_export(args: argparse.Namespace) -> int:
    """Write the requester's oversight export of one authorization (receipts, chain head)."""
    key = load_signing_key(Path(args.secrets) / "signing.key") if args.secrets else None
    return export_command("requester", Path(args.data) / LEDGER_FILE, args.authorization,
                          args.out, signing_key=key, force=args.force)


def _channel(args: argparse.Namespace) -> grpc.Channel:
    tls = kit.TLSFiles.from_dir(Path(args.certs), args.agency_id, "client")
    return kit.secure_channel(args.server, tls)


def _upload(header: Any, path: Path) -> Iterator[Any]:
    yield pb2.SubmitChunk(header=header)
    with path.open("rb") as fh:
        while block := fh.read(UPLOAD_CHUNK):
            yield pb2.SubmitChunk(csv=block)


PHASE_LABELS = {
    "validate": "validate queries", "open": "open session", "tags": "custodian tags",
    "evaluate": "OPRF evaluation", "match": "local match", "disclose": "verified disclosure",
    "close": "receipt",
}


def cmd_match(args: argparse.Namespace) -> int:
    console = Console(stderr=False)
    header = pb2.JobHeader(
        signed_authorization=Path(args.authorization).read_bytes(),
        custodian_address=args.custodian, operator=args.operator,
        match_rules=[r for r in (args.rules or "").split(",") if r],
        disclosure_fields=[f for f in (args.fields or "").split(",") if f],
        session_id=args.session_id or "",
        tokens=Path(args.tokens).read_bytes() if args.tokens else b"",
        engine=args.engine,
    )
    with _channel(args) as channel:
        stub = pb2_grpc.RequesterStub(channel)
        try:
            status = stub.SubmitMatch(_upload(header, Path(args.queries)), timeout=3600)
        except grpc.RpcError as exc:
            details = exc.details() or ""
            if "CSV header" in details:  # the status is clipped: the schema is printed here
                details = details.splitlines()[0] + "\n" + CSV_SCHEMA_HELP
            console.print(f"[red]refused[/red] {exc.code().name}: {escape(details)}",
                          highlight=False,
                          soft_wrap=True)
            return 1
        console.print(f"job [bold]{status.job_id}[/bold]: {status.queries} query records, "
                      f"{status.accepted} accepted, {status.queries - status.accepted} refused")
        for r in status.refused[: args.show_refused]:
            console.print(f"  refused line {r.line} {r.record_id or '-'}: {r.code} ({r.detail})")
        summary: dict[str, Any] = {}
        failed = ""
        last_phase = ""
        watch_ended = WATCH_STREAM_CLOSED  # unless "done" or "failed" arrives
        with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, disable=args.no_progress) as bar:
            tasks: dict[str, Any] = {}
            try:
                for ev in stub.WatchJob(pb2.JobRef(job_id=status.job_id,
                                                   operator=args.operator),
                                        timeout=6 * 3600):
                    if ev.phase == "done":
                        summary = json.loads(ev.summary_json)
                    elif ev.phase == "failed":
                        failed = ev.message
                        summary = json.loads(ev.summary_json) if ev.summary_json else {}
                    elif ev.phase in PHASE_LABELS:
                        last_phase = ev.phase
                        if ev.phase not in tasks:
                            tasks[ev.phase] = bar.add_task(PHASE_LABELS[ev.phase],
                                                           total=max(ev.total, 1))
                        bar.update(tasks[ev.phase], completed=ev.done, total=max(ev.total, 1))
            except grpc.RpcError as exc:  # the service stopped, crashed or became unreachable
                watch_ended = f"{exc.code().name}: {exc.details() or ''}"
    if failed:
        console.print(f"[red]match failed[/red] {failed}")
        for line in verifiable_summary_lines(summary):
            console.print(line)
        for rule, count in (summary.get(UNRELEASED_COUNTS_KEY) or {}).items():
            console.print(f"rule {rule}: the custodian announced a count of {count:,} in its "
                          "match challenge, then did not release the answer; the count is "
                          "known to this agency and nothing else of that rule is")
        if args.summary_json:
            doc = {"failed": failed, **{k: summary[k] for k in (*VERIFIABLE_SUMMARY_KEYS,
                                                                UNRELEASED_COUNTS_KEY)
                                       if k in summary}}
            write_file_atomic(args.summary_json, json.dumps(doc, indent=2).encode())
        return 1
    if not summary:
        return watch_ended_early(args, status.job_id, last_phase, watch_ended)
    print_summary(console, summary)
    if args.summary_json:
        # the receipt and per-field counts: audit material, owner-only like the ledgers
        write_file_atomic(args.summary_json,
                          json.dumps(summary, indent=2, default=str).encode())
    return 0


#: Why a watch ended when its stream closed normally without a final event.
WATCH_STREAM_CLOSED = "stream_closed: the service closed the watch without a final event"


def watch_ended_early(args: argparse.Namespace, job_id: str, last_phase: str,
                      reason: str) -> int:
    """The watch ended before "done" or "failed": nothing is known of the job's end, so say
    so on stderr (and in --summary-json) and exit 1, never a summary that reads as success.

    The job's state stays on the service (its results and receipts are stored as they arrive
    and a restarted service finishes the job, docs/architecture.md, Late failures)."""
    print(f"agency-a: the job watch ended before job {job_id} finished (last phase: "
          f"{last_phase or 'none'}; {reason}); whatever the job stored stays on the service: "
          f"check it later with 'agency-a results --job {job_id}'", file=sys.stderr)
    if args.summary_json:
        doc = {"job_id": job_id, "finished": False, "watch_ended": reason,
               "last_phase": last_phase}
        write_file_atomic(args.summary_json, json.dumps(doc, indent=2).encode())
    return 1


def print_summary(console: Console, s: dict[str, Any]) -> None:
    if s.get("tier") in ("aggregate", "cardinality"):
        print_aggregate_summary(console, s)
        return
    t = Table(title="match job summary", show_header=False)
    t.add_column("item")
    t.add_column("value", justify="right")
    rows = [
        ("queries submitted", s.get("queries_submitted")),
        ("queries refused before blinding", s.get("queries_refused")),
        ("queries accepted", s.get("queries_accepted")),
        ("match engine", s.get("engine")),
        ("elements evaluated (query x rule)", s.get("elements_evaluated")),
        ("custodian tags received", s.get("custodian_tags")),
        ("matches", s.get("matches")),
        ("distinct records disclosed (verified)", s.get("disclosed_records")),
        ("disclosures (record x rule)", s.get("disclosure_rows")),
        ("bytes requester -> custodian", s.get("bytes_a_to_b")),
        ("bytes custodian -> requester", s.get("bytes_b_to_a")),
        ("wall seconds", s.get("wall_seconds")),
    ]
    for k, v in rows:
        t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    console.print(t)
    for label, key in (("refused by reason", "refused_by_reason"),
                       ("matches by rule", "matches_by_rule"),
                       ("fields disclosed", "fields_disclosed")):
        items = s.get(key) or {}
        console.print(f"{label}: " + (", ".join(f"{k}={v:,}" for k, v in items.items()) or "none"))
    for line in late_summary_lines(s) + verifiable_summary_lines(s):
        console.print(line)


#: Summary keys of the verifiable option (docs/architecture.md, Verifiable evaluation).
VERIFIABLE_SUMMARY_KEYS = ("verifiable_evaluation", "evaluation_proofs_verified",
                           "evaluation_proof_invalid")


def verifiable_summary_lines(s: dict[str, Any]) -> list[str]:
    """Whether the custodian's evaluations were proven under the pinned key, or which failed."""
    if s.get("evaluation_proof_invalid"):
        return [f"evaluation proof INVALID after {s.get('evaluation_proofs_verified', 0):,} "
                f"verified chunks: {s['evaluation_proof_invalid']} (session aborted; nothing "
                "from that chunk was finalized; recorded in the audit chain)"]
    if s.get("verifiable_evaluation"):
        return [f"verifiable evaluation: {s.get('evaluation_proofs_verified', 0):,} chunk "
                "proofs verified against the authorization's pinned evaluation key"]
    return []


def late_summary_lines(s: dict[str, Any]) -> list[str]:
    """What the cap withheld and whether the receipt is pending (docs/architecture.md,
    Late failures): silent before, only the custodian's log told."""
    lines = []
    if s.get("matches_withheld_uncorroborated"):
        lines.append(f"corroboration: {s['matches_withheld_uncorroborated']:,} matched queries "
                     f"withheld (fewer than {s.get('corroboration')} independent rules agreed; "
                     "a single rule never discloses under this authorization)")
    if s.get("matches_held_by_several_records"):
        lines.append(f"shared keys: {s['matches_held_by_several_records']:,} matches name more "
                     "than one custodian record; each holder was disclosed and counted against "
                     "the cap. Review them before acting on any (docs/architecture.md, Shared "
                     "keys)")
    refused = {r: n for r, n in (s.get("disclosures_rejected_by_reason") or {}).items()
               if r != "disclosure_cap_reached"}
    if refused:
        lines.append("disclosures rejected by the custodian: " + ", ".join(
            f"{n:,} {r}" for r, n in sorted(refused.items())))
    if s.get("disclosure_cap_reached"):
        lines.append(f"disclosure cap reached: {s.get('disclosures_withheld_by_cap', 0):,} "
                     f"disclosures withheld (the authorization allows "
                     f"{s.get('disclosure_cap', 0):,} records)")
    if s.get("receipt_pending"):
        lines.append(f"receipt pending: results are stored and readable; the service retries "
                     f"the receipt ({s.get('receipt_error', '')})")
    elif s.get("match_completed") is False:
        lines.append("match interrupted before it completed: nothing was disclosed; the "
                     "session is closed with its receipt; submit the job again")
    return lines


def print_aggregate_summary(console: Console, s: dict[str, Any]) -> None:
    """Aggregate tiers: a count (and a sum), never an identity."""
    t = Table(title=f"{s['tier']} job summary", show_header=False)
    t.add_column("item")
    t.add_column("value", justify="right")
    def shown_sum(withheld: Any, reason: Any, total: Any) -> str:
        if withheld:
            return f"withheld: {reason}"
        return "-" if total is None else f"{total:,} (${total / 100:,.2f} if cents)"

    by_rule = s.get("aggregate_by_rule") or []
    rows: list[tuple[str, Any]] = [
        ("queries submitted", f"{s.get('queries_submitted', 0):,}"),
        ("queries accepted", f"{s.get('queries_accepted', 0):,}"),
    ]
    if len(by_rule) > 1:  # one session per rule (docs/architecture.md, Aggregate tier)
        for r in by_rule:
            rows += [(f"rule {r['rule']}: count", f"{r['count']:,}"),
                     (f"rule {r['rule']}: sum", shown_sum(r["withheld"], r["reason"],
                                                         r["sum"]))]
        rows.append(("elements evaluated (all rules)", f"{s.get('elements_evaluated', 0):,}"))
    else:
        rows += [
            ("match rule", s.get("match_rule")),
            ("intersection count", f"{s.get('aggregate_count', 0):,}"),
            ("intersection sum", shown_sum(s.get("aggregate_withheld"),
                                           s.get("aggregate_reason"), s.get("aggregate_sum"))),
            ("custodian elements reblinded", f"{s.get('custodian_elements', 0):,}"),
        ]
    rows += [
        ("bytes requester -> custodian", f"{s.get('bytes_a_to_b', 0):,}"),
        ("bytes custodian -> requester", f"{s.get('bytes_b_to_a', 0):,}"),
        ("wall seconds", str(s.get("wall_seconds"))),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    console.print(t)
    if len(by_rule) > 1:
        console.print("the counts are per rule and must not be added up: one person can "
                      "match under several rules")


TERMINAL_ROW_LIMIT = 20


def _result_limit(args: argparse.Namespace) -> int | None:
    """Rows to emit: --limit when given (0 = all); else a screenful on a terminal, else all."""
    if args.limit is not None:
        if args.limit < 0:
            raise ValueError(f"--limit must be 0 (all) or positive, got {args.limit}")
        return args.limit or None
    return TERMINAL_ROW_LIMIT if args.out is None and args.format == "text" else None


def cmd_results(args: argparse.Namespace) -> int:
    """Read (and optionally export) a job's results; the service logs the read first."""
    out = Path(args.out) if args.out else None
    if out is not None and (out.exists() or out.is_symlink()):
        raise FileExistsError(f"--out {out} already exists; results are never overwritten")
    limit = _result_limit(args)
    with _channel(args) as channel:
        stub = pb2_grpc.RequesterStub(channel)
        try:
            replies = list(stub.GetResults(pb2.JobRef(job_id=args.job, operator=args.operator,
                                                      purpose=args.purpose), timeout=600))
        except grpc.RpcError as exc:
            print(f"agency-a: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    rows = [{"query_record_id": r.query_record_id, "rule_id": r.rule_id,
             "pseudonym": r.pseudonym, "fields": {f.name: f.value for f in r.fields}}
            for r in replies]
    shown = rows if limit is None else rows[:limit]
    text = format_result_rows(shown, args.format)
    if out is None:
        sys.stdout.write(text)
    else:
        write_file_atomic(out, text.encode("utf-8"), mode=0o600, overwrite=False)
    logged = f"read logged for operator {args.operator!r}"
    if out is not None:
        logged = (f"written to {out} (plaintext, mode 0600: its handling and deletion are now "
                  f"yours); {logged}")
    note = f"{len(rows)} result rows {logged}"
    if len(shown) < len(rows):
        note = (f"showing {len(shown)} of {len(rows)} result rows, {len(rows) - len(shown)} "
                f"more not shown (--limit 0 shows all; --out FILE exports them); {logged}")
    if not rows:
        note += ("; none stored: the job matched nothing, or its results were purged "
                 "(retention expiry or 'agency-a purge')")
    print(note, file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a job's report (docs/architecture.md, Reports); the service logs the access."""
    out = Path(args.out)
    if not args.force and (out.exists() or out.is_symlink()):
        raise FileExistsError(f"--out {out} already exists (use --force to replace it)")
    oversight = None
    if args.oversight:
        try:
            oversight = json.loads(Path(args.oversight).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--oversight {args.oversight} is not JSON (expected the output "
                             f"of 'psi-authority oversight --json'): {exc}") from exc
    accuracy, source = read_accuracy(args.accuracy)
    with _channel(args) as channel:
        stub = pb2_grpc.RequesterStub(channel)
        try:
            reply = stub.GetReport(pb2.ReportRequest(
                job_id=args.job, operator=args.operator, purpose=args.purpose,
                include_rows=args.include_rows), timeout=600)
        except grpc.RpcError as exc:
            print(f"agency-a: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    rows = ([{"query_record_id": r.query_record_id, "rule_id": r.rule_id,
              "pseudonym": r.pseudonym, "fields": {f.name: f.value for f in r.fields}}
             for r in reply.rows] if args.include_rows else None)
    facts = job_facts(json.loads(reply.summary_json), generated_at=time.time(),
                      accuracy=accuracy, accuracy_source=source, oversight=oversight,
                      rows=rows)
    # with rows it is a case file (owner-only); counts only, it is meant to be handed on
    write_file_atomic(out, render_report(facts).encode("utf-8"),
                      mode=0o600 if rows is not None else 0o644)
    what = (f"with {len(rows)} disclosed rows (personal data, mode 0600)" if rows is not None
            else "counts and aggregates only")
    print(f"report for job {args.job} written to {out} ({what}); access logged for operator "
          f"{args.operator!r}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        stub = pb2_grpc.RequesterStub(channel)
        try:
            ack = stub.PurgeResults(pb2.JobRef(job_id=args.job, operator=args.operator,
                                               purpose=args.reason), timeout=600)
        except grpc.RpcError as exc:
            print(f"agency-a: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"purged {ack.purged} result rows of job {args.job} (reason {args.reason!r}, "
          f"logged for operator {args.operator!r}); the store's file was vacuumed, so a later "
          "'results' for this job reads as empty"
          if ack.purged else
          f"nothing to purge for job {args.job}: no results stored (never matched, already "
          "purged, or expired); the request is logged")
    return 0


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="address of the agency-a service")
    p.add_argument("--certs", required=True, help="directory from 'psi-authority dev-ca'")
    p.add_argument("--agency-id", default="agency-a",
                   help="this agency's id (names the client certificate in --certs)")
    p.add_argument("--operator", required=True, help="operator identity (logged)")


def build_parser() -> argparse.ArgumentParser:
    p = HelpfulParser(prog="agency-a", description=(
        "Requester agency: validates its query file, runs the private match against the "
        "custodian under a signed authorization, and keeps results encrypted with retention.\n"
        "The authorization's tier decides what a match returns: 'identity' (matched records "
        "and their permitted fields) or 'aggregate'/'cardinality' (a count and a sum, no "
        "identities); see 'psi-authority issue --help'."))
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="generate the receipt key and the result-store key",
                       description="Write signing.key/signing.pub.json (countersigns the "
                       "custodian's receipts; give the .pub.json to the custodian) and "
                       "results.key (encrypts stored results; keep it out of --data).")
    i.add_argument("--out", required=True, help="secrets directory (not the data directory)")
    i.add_argument("--force", action="store_true", help="replace existing secrets")
    i.add_argument("--operator", action="append", default=[], metavar="ID",
                   help=f"an operator who may submit jobs and read or purge results "
                        f"(repeatable; written to {OPERATORS_FILE} in --out; ids use "
                        "[A-Za-z0-9._@-], at most 64 characters; default: none, then "
                        "'serve' needs --operators)")
    i.set_defaults(func=cmd_init)

    s = sub.add_parser("serve", help="run the requester gRPC service (mTLS only)",
                       description="Run the requester service: accepts match jobs from "
                       "operators over mTLS, runs them against the custodian, keeps results "
                       "encrypted in --data and purges them when their retention ends. Stops "
                       "gracefully on SIGTERM/SIGINT.")
    add_serve_arguments(s, agency="agency-a", listen="127.0.0.1:50051")
    s.add_argument("--data", required=True, help="directory for the ledger and result store")
    s.add_argument("--operators", metavar="FILE",
                   help="operator roster, one id per line: only these may submit jobs or "
                        "read or purge results (default: "
                        f"{OPERATORS_FILE} in --secrets, written by 'init --operator')")
    s.add_argument("--custodian-key", action="append", default=[], metavar="AGENCY=PUB.json",
                   help="pin a custodian's receipt-signing key (repeatable)")
    s.add_argument("--chunk-size", type=int, default=4096, help="elements per chunk")
    s.add_argument("--purge-interval", type=float, default=60.0,
                   help="seconds between retention purges")
    s.add_argument("--receipt-retry-interval", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between retries of jobs whose receipt is pending (they are "
                        "also retried at start-up; default: %(default)s)")
    s.set_defaults(func=cmd_serve)

    add_ledger_commands(sub, agency="requester", location="--data",
                        location_help="the data directory given to 'serve'",
                        verify=cmd_audit_verify,
                        export=cmd_export)

    m = sub.add_parser("match", help="submit a match job and follow it to the end",
                       description="Upload the query file to the requester service, which "
                       "validates it, runs the match under the authorization's tier "
                       "(identity: records and fields; aggregate/cardinality: a count and a "
                       "sum) and reports progress and a summary.\n\n" + CSV_SCHEMA_HELP)
    _client_args(m)
    m.add_argument("--authorization", required=True, help="signed authorization file")
    m.add_argument("--queries", required=True, help="query records CSV (schema below)")
    m.add_argument("--custodian", required=True, help="custodian service address")
    m.add_argument("--rules", help="comma-separated subset of the authorized match rules "
                   "(default: all the authorization permits)")
    m.add_argument("--fields", help="comma-separated subset of the authorized fields "
                   "(default: all the authorization permits)")
    m.add_argument("--session-id", help="resume this session id")
    m.add_argument("--tokens", help="named-subject tokens from 'psi-authority review'")
    m.add_argument("--engine", default=Engine.OPRF.value, choices=list(engine_registry.names()),
                   help="match engine: RFC 9497 OPRF (default), KKRT OT-extension OPRF, or "
                        "oprf-epoch against a national custodian's key-epoch tag set (fetched "
                        "once per epoch and cached in the service's data directory; the "
                        "authorization and the custodian policy must permit it)")
    m.add_argument("--show-refused", type=int, default=10, help="refused records to list")
    m.add_argument("--summary-json", metavar="FILE",
                   help="write the final summary here as JSON; a failed job writes "
                        "{\"failed\": ...}, a watch that ended before the job did "
                        "{\"finished\": false, \"watch_ended\": ...} (default: not written)")
    m.add_argument("--no-progress", action="store_true",
                   help="no progress bars (for logs and scripts)")
    m.set_defaults(func=cmd_match)

    r = sub.add_parser("results", help="read a job's results (logged, requires a purpose)",
                       description="Decrypt and show, or export, a finished job's results. "
                       "Every read is logged with the operator and purpose before any row is "
                       "returned. An exported file is plaintext (mode 0600) and outside the "
                       "store's retention: its handling is the operator's.")
    _client_args(r)
    r.add_argument("--job", required=True, help="job id printed by 'match'")
    r.add_argument("--purpose", required=True, help="why the results are read (logged)")
    r.add_argument("--format", choices=RESULT_FORMATS, default="text",
                   help="text (tab-separated), csv (one fields.<name> column per field) or "
                        "json")
    r.add_argument("--out", metavar="FILE",
                   help="write the rows to this new file instead of stdout (default: stdout)")
    r.add_argument("--limit", type=int, metavar="N",
                   help=f"at most N rows, 0 = all (default: {TERMINAL_ROW_LIMIT} for text on "
                        "stdout, else all); says how many were left out")
    r.set_defaults(func=cmd_results)

    rp = sub.add_parser("report", help="write a job's report: one self-contained HTML page "
                        "(logged, requires a purpose)",
                        description="Write one self-contained HTML page for a policymaker: the "
                        "request, what was refused before anything ran, what each party "
                        "learned, matches by rule with their misidentification risk, budget "
                        "and cap used, the signed receipt and a timeline. Counts and "
                        "aggregates only unless --include-rows. The access is logged with the "
                        "operator and purpose, like a results read.")
    _client_args(rp)
    rp.add_argument("--job", required=True, help="job id printed by 'match'")
    rp.add_argument("--purpose", required=True, help="why the report is made (logged)")
    rp.add_argument("--out", required=True, metavar="FILE", help="HTML file to write")
    rp.add_argument("--include-rows", action="store_true",
                    help="add the disclosed rows for a case file (personal data: a results "
                         "read on the audit chain; the page says so at the top; file mode "
                         "0600)")
    rp.add_argument("--accuracy", metavar="FILE",
                    help="accuracy JSON from 'make accuracy' for the per-rule precision, "
                         "recall and misidentification risk (default: "
                         "benchmarks/results/accuracy.json of this checkout if present, "
                         "else 'not measured')")
    rp.add_argument("--oversight", metavar="FILE",
                    help="output of 'psi-authority oversight --json' for this job's "
                         "authorization, to show AGREE or the first disagreement (default: "
                         "not set: the page says oversight was not checked)")
    rp.add_argument("--force", action="store_true", help="replace --out if it exists")
    rp.set_defaults(func=cmd_report)

    g = sub.add_parser("purge", help="purge a job's results now",
                       description="Delete a job's stored results before their retention "
                       "ends (securely: secure_delete and VACUUM); logged with the operator "
                       "and reason. Prints how many rows were purged.")
    _client_args(g)
    g.add_argument("--job", required=True, help="job id printed by 'match'")
    g.add_argument("--reason", required=True, help="why the results are purged (logged)")
    g.set_defaults(func=cmd_purge)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
