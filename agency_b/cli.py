"""``agency-b``: the custodian's operator CLI (init secrets, serve)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agency_b.certification import register as register_certification
from agency_b.national import register as register_national
from agency_b.service import serve
from proto import service_kit as kit
from proto.lifecycle import (
    add_serve_arguments,
    run_cli,
    serve_until_signal,
    shut_down,
    start_serve_process,
)
from proto.limits import add_limit_arguments, limits_from_args
from protocol.adapters import collector
from protocol.adapters.checkpointer import Checkpointer
from protocol.adapters.epoch_index import EpochIndex
from protocol.adapters.files import (
    make_private_dir,
    open_csv,
    read_certification,
    read_policy,
    read_secret,
    write_secret,
)
from protocol.adapters.keys import (
    load_signing_key,
    parse_agency_keys,
    write_evaluation_key,
    write_signing_key,
)
from protocol.adapters.pools import AggregatePool, BatchPool
from protocol.adapters.shards import ShardedRecords
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli.help import HelpfulParser
from protocol.cli.oversight import add_ledger_commands, audit_verify_command, export_command
from protocol.domain.records import CSV_SCHEMA_HELP, PersonRecord, Refusal
from protocol.domain.recordstore import load_custodian_csv
from protocol.engines import registry
from protocol.engines.base import RecordsOutOfCore, evaluation_key_pair
from protocol.sessions.aggregate import AggregateCustodian
from protocol.sessions.identity import Custodian, CustodianConfig

log = logging.getLogger("agency_b")


def cmd_init(args: argparse.Namespace) -> int:
    out = make_private_dir(args.out)
    write_secret(out / "master.secret", os.urandom(32).hex().encode(), force=args.force)
    write_signing_key(out, "signing", force=args.force)
    print(f"custodian secrets written to {out} (master.secret, signing.key, signing.pub.json)")
    return 0


def cmd_evaluation_key(args: argparse.Namespace) -> int:
    """Publish the POPRF public key derived from master.secret, for the authority to pin."""
    master = bytes.fromhex(read_secret(Path(args.secrets) / "master.secret").decode().strip())
    _, public_key = evaluation_key_pair(master)
    write_evaluation_key(Path(args.out), args.custodian_id, public_key)
    print(f"evaluation key {public_key.hex()} of {args.custodian_id} written to {args.out}; "
          "give it to the authority (psi-authority issue --custodian-evaluation-key)")
    return 0


def _engine_rules(text: str) -> tuple[str, list[str]]:
    """``ENGINE=R1,R2`` of ``--prepare``: a registered engine and a non-empty rule list."""
    engine, sep, rules = text.partition("=")
    names = registry.names()
    if not sep or engine not in names:
        raise argparse.ArgumentTypeError(
            f"expected ENGINE=R1,R2 with ENGINE one of {', '.join(names)}, got {text!r}")
    rule_ids = [r for r in rules.split(",") if r]
    if not rule_ids:
        raise argparse.ArgumentTypeError(f"no match rules in {text!r}")
    return engine, rule_ids


def _receipt_keys(items: list[str]) -> dict[str, Ed25519PublicKey]:
    """The requesters' receipt keys; refuses to serve with none (docs/architecture.md,
    Late failures): every session would disclose and then fail at its countersignature."""
    keys = parse_agency_keys(items)
    if not keys:
        raise ValueError(
            "no --requester-key given: this custodian could not check any requester's "
            "countersignature, so every session would fail at its receipt after disclosing; "
            "pass --requester-key AGENCY=PUB.json for each requester it serves")
    return keys


def cmd_serve(args: argparse.Namespace) -> int:
    start_serve_process(args)  # umask 0077, JSON logs only
    requester_keys = _receipt_keys(args.requester_key)  # before any file is loaded
    limits = limits_from_args(args)  # inconsistent limits are refused before loading too
    secrets = Path(args.secrets)
    master = bytes.fromhex(read_secret(secrets / "master.secret").decode().strip())
    signing_key = load_signing_key(secrets / "signing.key")
    policy = read_policy(args.policy)
    t0 = time.perf_counter()
    records: Sequence[PersonRecord]
    refused: list[Refusal]
    if args.records_store:
        # out of core (docs/architecture.md, National custodian): validated when stored,
        # read by row for disclosure only, so memory does not grow with the file
        store = ShardedRecords.open(args.records_store)
        records, refused, rows = RecordsOutOfCore(store), [], store.count
    else:
        with open_csv(args.records) as fh:
            records, refused, rows = load_custodian_csv(fh, today=date.today())
    epoch_index = EpochIndex.open(args.epoch_index) if args.epoch_index else None
    if epoch_index is not None:
        kit.log_event(log, "epoch_index_loaded", epoch=epoch_index.epoch_id,
                      bits=epoch_index.bits, rules=list(epoch_index.rules),
                      tags={r: epoch_index.tags(r) for r in epoch_index.rules})
    certifications = {}
    for path in args.certification:
        cert = read_certification(path)
        certifications[cert.authority_key_id] = cert
    kit.log_event(log, "records_loaded", records=rows, usable=len(records),
                  certifications=sorted(certifications),
                  refused=dict(Counter(str(r.code) for r in refused)),
                  seconds=round(time.perf_counter() - t0, 2))
    ledger = Ledger(args.ledger)
    checkpointer = Checkpointer(ledger, signing_key, args.checkpoint_interval).start()
    pool = BatchPool(args.workers).warm() if args.workers > 1 else None
    custodian = Custodian(CustodianConfig(
        policy=policy, records=records, ledger=ledger, master_secret=master,
        signing_key=signing_key, requester_keys=requester_keys,
        ops=pool, certifications=certifications,
        new_lock=threading.Lock,  # the service serves sessions from several threads
        epoch_index=epoch_index,
    ))
    # what an authority pins for verifiable evaluation (docs/architecture.md, Verifiable
    # evaluation); the same key as ``agency-b evaluation-key`` publishes
    kit.log_event(log, "evaluation_key", public_key=custodian.evaluation_key.hex(),
                  verifiable_evaluation=policy.verifiable_evaluation.value)
    for engine, rules in args.prepare:
        # authorization-independent engine preparation, before the service reports ready
        t1 = time.perf_counter()
        custodian.prepare(engine, rules)
        kit.log_event(log, "engine_prepared", engine=engine, rules=rules,
                      seconds=round(time.perf_counter() - t1, 2))
    tls = kit.TLSFiles.from_dir(Path(args.certs), args.agency_id, "server")
    agg_pool = AggregatePool(args.workers) if args.workers > 1 else None
    aggregate = AggregateCustodian(custodian, ops=agg_pool)
    # the records and prepared tables live as long as the process: full collections skip
    # them from here on (docs/architecture.md, Long-lived bulk data)
    kit.log_event(log, "heap_settled", frozen_objects=collector.settle())
    server, port = serve(custodian, tls, args.listen, aggregate=aggregate, limits=limits)
    serve_until_signal(log, port, args.port_file, service="custodian", agency=args.agency_id,
                       in_scope=len(custodian.in_scope), excluded=custodian.excluded_count)
    shut_down(log, server, args.grace, checkpointer, (pool, agg_pool),
              drain=lambda: custodian.config.refusals.flush(ledger, custodian.config.clock()))
    ledger.close()
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Verify the custodian ledger's hash chain and, with a public key, its checkpoints."""
    return audit_verify_command(args.ledger, args.public_key)


def cmd_export(args: argparse.Namespace) -> int:
    """Write the oversight export of one authorization (see protocol.accounting.export)."""
    key = load_signing_key(Path(args.secrets) / "signing.key") if args.secrets else None
    return export_command("custodian", args.ledger, args.authorization, args.out,
                          signing_key=key, force=args.force)


def build_parser() -> argparse.ArgumentParser:
    p = HelpfulParser(prog="agency-b", description=(
        "Custodian agency: holds the records, enforces its policy and the signed "
        "authorization, evaluates the OPRF and accounts for every disclosure."))
    sub = p.add_subparsers(dest="command", required=True)
    register_certification(sub)
    register_national(sub)
    i = sub.add_parser("init", help="generate the custodian's master secret and receipt key",
                       description="Write master.secret (derives every per-authorization "
                       "OPRF key) and signing.key/signing.pub.json (signs receipts and audit "
                       "checkpoints; give the .pub.json to requesters and oversight).")
    i.add_argument("--out", required=True, help="secrets directory (files are mode 0600)")
    i.add_argument("--force", action="store_true", help="replace existing secrets")
    i.set_defaults(func=cmd_init)
    e = sub.add_parser("evaluation-key", help="publish the verifiable-evaluation public key",
                       description="Write the RFC 9497 POPRF public key derived from "
                       "master.secret (one key for every authorization) to a JSON file. The "
                       "authority pins it in an authorization (psi-authority issue "
                       "--custodian-evaluation-key FILE); the requester then checks a proof "
                       "on every evaluated chunk.")
    e.add_argument("--secrets", required=True, help="secrets directory holding master.secret")
    e.add_argument("--custodian-id", default="agency-b",
                   help="this custodian's agency id, recorded in the file")
    e.add_argument("--out", required=True, help="evaluation key file to write (JSON, 0644)")
    e.set_defaults(func=cmd_evaluation_key)
    s = sub.add_parser("serve", help="run the custodian gRPC service (mTLS only)",
                       description="Load and validate the records, then serve identity-tier "
                       "matches (OPRF or KKRT engine) and aggregate/cardinality tiers to "
                       "requesters over mTLS, under the policy and each signed authorization. "
                       "Stops gracefully on SIGTERM/SIGINT.\n\n" + CSV_SCHEMA_HELP)
    add_serve_arguments(s, agency="agency-b", listen="127.0.0.1:50052")
    add_limit_arguments(s)
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--records", help="custodian records CSV (schema below), loaded into "
                        "memory (default: none; this or --records-store is required)")
    source.add_argument("--records-store", metavar="DIR",
                        help="sharded record store from 'agency-b import-records' or the "
                             "national generator, read by row for disclosure only (default: "
                             "none; this or --records is required)")
    s.add_argument("--epoch-index", metavar="DIR",
                   help="key-epoch index from 'agency-b build-index', served when the policy's "
                        "index_mode is 'epoch' (engine oprf-epoch; default: none)")
    s.add_argument("--policy", required=True,
                   help="custodian policy JSON (write one with 'psi-authority policy-template')")
    s.add_argument("--ledger", required=True, help="SQLite ledger file (created if absent)")
    s.add_argument("--requester-key", action="append", default=[], metavar="AGENCY=PUB.json",
                   help="a requester's receipt-countersigning public key (repeatable; at "
                        "least one is required, since sessions of a requester without a key "
                        "are refused at open; default: none, which refuses to start)")
    s.add_argument("--prepare", action="append", default=[], type=_engine_rules,
                   metavar="ENGINE=R1,R2",
                   help="prepare an engine's authorization-independent state for a rule set at "
                        "start-up, so its sessions skip that step (repeatable; e.g. "
                        "kkrt=tin+dob builds the KKRT key digests; engines: "
                        f"{', '.join(registry.names())}; default: none)")
    s.add_argument("--certification", action="append", default=[], metavar="FILE",
                   help="named-subject certification from certify-finish (repeatable)")
    s.set_defaults(func=cmd_serve)

    add_ledger_commands(sub, agency="custodian", location="--ledger",
                        location_help="the custodian's SQLite ledger", verify=cmd_audit_verify,
                        export=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
