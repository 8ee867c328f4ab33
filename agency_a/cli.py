"""``agency-a``: the requester's operator CLI (init, serve, match, results, purge)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agency_a.service import RequesterService, serve
from agency_a.store import ResultStore, generate_key_file, load_key
from proto import service_kit as kit
from proto.lifecycle import add_serve_arguments, run_cli, serve_until_signal, shut_down
from protocol.adapters.checkpointer import Checkpointer
from protocol.adapters.keys import load_signing_key, parse_agency_keys, write_signing_key
from protocol.adapters.pools import AggregatePool, BatchPool
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli.oversight import add_ledger_commands, audit_verify_command, export_command
from protocol.domain.engine import Engine
from protocol.engines import registry as engine_registry

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc
log = logging.getLogger("agency_a")
UPLOAD_CHUNK = 1 << 20
LEDGER_FILE = "requester-ledger.sqlite"


def cmd_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_signing_key(out, "signing", force=args.force)
    key_path = out / "results.key"
    if key_path.exists() and args.force:
        key_path.unlink()
    generate_key_file(key_path)
    print(f"requester secrets written to {out} (signing.key, signing.pub.json, results.key); "
          "keep results.key away from the data directory")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    kit.setup_logging(args.log_level)
    secrets = Path(args.secrets)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
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
        signing_key=signing_key,
        store=store, ops=pool, custodian_keys=parse_agency_keys(args.custodian_key),
        chunk_size=args.chunk_size, audit=audit, aggregate_ops=agg_pool,
    )
    tls = kit.TLSFiles.from_dir(Path(args.certs), args.agency_id, "server")
    server, port = serve(service, tls, args.listen)
    serve_until_signal(log, port, args.port_file, service="requester", agency=args.agency_id)
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
            console.print(f"[red]refused[/red] {exc.code().name}: {exc.details()}")
            return 1
        console.print(f"job [bold]{status.job_id}[/bold]: {status.queries} query records, "
                      f"{status.accepted} accepted, {status.queries - status.accepted} refused")
        for r in status.refused[: args.show_refused]:
            console.print(f"  refused line {r.line} {r.record_id or '-'}: {r.code} ({r.detail})")
        summary: dict[str, Any] = {}
        failed = ""
        with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, disable=args.no_progress) as bar:
            tasks: dict[str, Any] = {}
            for ev in stub.WatchJob(pb2.JobRef(job_id=status.job_id, operator=args.operator),
                                    timeout=6 * 3600):
                if ev.phase == "done":
                    summary = json.loads(ev.summary_json)
                elif ev.phase == "failed":
                    failed = ev.message
                elif ev.phase in PHASE_LABELS:
                    if ev.phase not in tasks:
                        tasks[ev.phase] = bar.add_task(PHASE_LABELS[ev.phase],
                                                       total=max(ev.total, 1))
                    bar.update(tasks[ev.phase], completed=ev.done, total=max(ev.total, 1))
    if failed:
        console.print(f"[red]match failed[/red] {failed}")
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps({"failed": failed}, indent=2))
        return 1
    print_summary(console, summary)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0


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


def print_aggregate_summary(console: Console, s: dict[str, Any]) -> None:
    """Aggregate tiers: a count (and a sum), never an identity."""
    t = Table(title=f"{s['tier']} job summary", show_header=False)
    t.add_column("item")
    t.add_column("value", justify="right")
    total = s.get("aggregate_sum")
    rows = [
        ("queries submitted", f"{s.get('queries_submitted', 0):,}"),
        ("queries accepted", f"{s.get('queries_accepted', 0):,}"),
        ("match rule", s.get("match_rule")),
        ("intersection count", f"{s.get('aggregate_count', 0):,}"),
        ("intersection sum", "withheld: " + str(s.get("aggregate_reason"))
         if s.get("aggregate_withheld") else
         ("-" if total is None else f"{total:,} (${total / 100:,.2f} if cents)")),
        ("custodian pairs received", f"{s.get('custodian_pairs', 0):,}"),
        ("bytes requester -> custodian", f"{s.get('bytes_a_to_b', 0):,}"),
        ("bytes custodian -> requester", f"{s.get('bytes_b_to_a', 0):,}"),
        ("wall seconds", str(s.get("wall_seconds"))),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    console.print(t)


def cmd_results(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        stub = pb2_grpc.RequesterStub(channel)
        try:
            rows = list(stub.GetResults(pb2.JobRef(job_id=args.job, operator=args.operator,
                                                   purpose=args.purpose), timeout=600))
        except grpc.RpcError as exc:
            print(f"agency-a: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for r in rows[: args.limit]:
        fields = ", ".join(f"{f.name}={f.value}" for f in r.fields)
        print(f"{r.query_record_id}\t{r.rule_id}\t{fields}")
    print(f"{len(rows)} result rows (access logged for operator {args.operator!r})",
          file=sys.stderr)
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
    print(f"purged {ack.purged} result rows")
    return 0


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="address of the agency-a service")
    p.add_argument("--certs", required=True, help="directory from 'psi-authority dev-ca'")
    p.add_argument("--agency-id", default="agency-a", help="this agency's id")
    p.add_argument("--operator", required=True, help="operator identity (logged)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agency-a", description=(
        "Requester agency: validates its query file, runs the private match against the "
        "custodian under a signed authorization, and keeps results encrypted with retention."))
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="generate the receipt key and the result-store key")
    i.add_argument("--out", required=True, help="secrets directory (not the data directory)")
    i.add_argument("--force", action="store_true")
    i.set_defaults(func=cmd_init)

    s = sub.add_parser("serve", help="run the requester gRPC service (mTLS only)")
    add_serve_arguments(s, agency="agency-a", listen="127.0.0.1:50051")
    s.add_argument("--data", required=True, help="directory for the ledger and result store")
    s.add_argument("--custodian-key", action="append", default=[], metavar="AGENCY=PUB.json",
                   help="pin a custodian's receipt-signing key (repeatable)")
    s.add_argument("--chunk-size", type=int, default=4096, help="elements per chunk")
    s.add_argument("--purge-interval", type=float, default=60.0,
                   help="seconds between retention purges")
    s.set_defaults(func=cmd_serve)

    add_ledger_commands(sub, agency="requester", location="--data",
                        location_help="the data directory given to 'serve'",
                        verify=cmd_audit_verify,
                        export=cmd_export)

    m = sub.add_parser("match", help="submit a match job and follow it to the end")
    _client_args(m)
    m.add_argument("--authorization", required=True, help="signed authorization file")
    m.add_argument("--queries", required=True, help="query records CSV")
    m.add_argument("--custodian", required=True, help="custodian service address")
    m.add_argument("--rules", help="comma-separated subset of the authorized match rules")
    m.add_argument("--fields", help="comma-separated subset of the authorized fields")
    m.add_argument("--session-id", help="resume this session id")
    m.add_argument("--tokens", help="named-subject tokens from 'psi-authority review'")
    m.add_argument("--engine", default=Engine.OPRF.value, choices=list(engine_registry.names()),
                   help="match engine: RFC 9497 OPRF (default) or KKRT OT-extension OPRF "
                        "(the authorization and the custodian policy must permit it)")
    m.add_argument("--show-refused", type=int, default=10, help="refused records to list")
    m.add_argument("--summary-json", help="write the final summary here")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=cmd_match)

    r = sub.add_parser("results", help="read a job's results (logged, requires a purpose)")
    _client_args(r)
    r.add_argument("--job", required=True)
    r.add_argument("--purpose", required=True)
    r.add_argument("--limit", type=int, default=20)
    r.set_defaults(func=cmd_results)

    g = sub.add_parser("purge", help="purge a job's results now")
    _client_args(g)
    g.add_argument("--job", required=True)
    g.add_argument("--reason", required=True)
    g.set_defaults(func=cmd_purge)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
