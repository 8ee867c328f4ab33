"""``agency-b import-records`` and ``agency-b build-index``: the national custodian's offline
side (docs/national-custodian.md). Records go into Parquet shards once; the epoch index is
built on Dask once per key epoch."""

from __future__ import annotations

import argparse
import importlib
import json
from datetime import date
from pathlib import Path
from typing import Any

from protocol.adapters.epoch_index import (
    DEFAULT_MAX_EVALUATIONS,
    DEFAULT_PARTITION_ROWS,
    build_epoch_index,
    write_epoch_key,
)
from protocol.adapters.files import read_policy, read_secret
from protocol.adapters.shards import DEFAULT_SHARD_ROWS, import_csv
from protocol.domain.records import CSV_SCHEMA_HELP, MATCH_RULES

__all__ = ["epoch_key_path", "register"]

DEFAULT_RULES = "tin+dob,first+last+dob+zip"


def epoch_key_path(secrets: Path, epoch_id: str) -> Path:
    """Where the epoch key file lives in the custodian's secrets directory."""
    return secrets / f"epoch-{epoch_id}.key"


def _rules(text: str) -> list[str]:
    rules = [r for r in text.split(",") if r]
    unknown = [r for r in rules if r not in MATCH_RULES]
    if unknown or not rules:
        raise argparse.ArgumentTypeError(
            f"expected match rules from {', '.join(MATCH_RULES)}, got {text!r}")
    return rules


def cmd_import_records(args: argparse.Namespace) -> int:
    report = import_csv(args.csv, args.out, today=date.today(), shard_rows=args.shard_rows)
    print(json.dumps({"event": "records_imported", "rows": report.rows_read,
                      "stored": report.store.count, "refused": report.refused,
                      "shards": len(report.store.manifest["shards"]),
                      "disk_bytes": report.store.disk_bytes, "out": str(args.out)}))
    return 0


def cmd_build_index(args: argparse.Namespace) -> int:
    secrets = Path(args.secrets)
    key_file = epoch_key_path(secrets, args.epoch)
    if not key_file.exists():
        master = bytes.fromhex(read_secret(secrets / "master.secret").decode().strip())
        write_epoch_key(key_file, master, args.epoch)
    excluded = read_policy(args.policy).excluded_record_classes if args.policy else frozenset()
    client: Any = None
    if args.scheduler:
        client = importlib.import_module("distributed").Client(args.scheduler)
    try:
        info = build_epoch_index(
            args.records, args.out, epoch_id=args.epoch, rules=args.rules, key_file=key_file,
            max_evaluations=args.max_evaluations, client=client, workers=args.workers,
            partition_rows=args.partition_rows, excluded_classes=excluded,
            today=date.today(), progress=not args.quiet)
    finally:
        if client is not None:
            client.close()
    print(json.dumps({"event": "epoch_index_built", "epoch": info.epoch_id, "bits": info.bits,
                      "records": info.records, "tasks": info.tasks, "workers": info.workers,
                      "seconds": round(info.seconds, 2), "cpu_seconds": round(info.cpu_seconds, 2),
                      "rules": {r: {"tags": i["tags"], "tagset_bytes": i["tagset_bytes"]}
                                for r, i in info.rules.items()},
                      "fpr_per_authorization": info.manifest["fpr_per_authorization"]}))
    return 0


def register(sub: Any) -> None:
    """Add the two subcommands to ``agency-b``'s subparsers."""
    imp = sub.add_parser(
        "import-records", help="shard a custodian CSV into Parquet, validating every row",
        description="Stream a custodian records CSV into a sharded Parquet store (manifest "
        "with counts and per-shard SHA-256), validating each row as it passes; refused rows "
        "are counted by reason and not stored; every occurrence of a repeated record_id is "
        "refused. Memory does not grow with the file.\n\n" + CSV_SCHEMA_HELP)
    imp.add_argument("--csv", required=True, type=Path, help="custodian records CSV")
    imp.add_argument("--out", required=True, type=Path, help="record store directory to create")
    imp.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS,
                     help="rows per Parquet shard")
    imp.set_defaults(func=cmd_import_records)

    b = sub.add_parser(
        "build-index", help="build a key epoch's index of a record store on Dask",
        description="Evaluate every record under every rule with the epoch key (derived from "
        "master.secret, kept in SECRETS/epoch-ID.key, 0600) and write the epoch index: per "
        "rule, sorted fingerprint buckets with their rows and the Golomb-coded tag set the "
        "requesters fetch. Runs on a Dask LocalCluster of --workers processes, or on the "
        "cluster at --scheduler; every worker reads the key file by path, so it must see the "
        "same paths, and the cluster is inside the custodian's trust boundary.")
    b.add_argument("--records", required=True, type=Path,
                   help="record store (from import-records)")
    b.add_argument("--out", required=True, type=Path, help="index directory to create")
    b.add_argument("--epoch", required=True, help="key epoch id, e.g. 2026-11")
    b.add_argument("--secrets", required=True, type=Path,
                   help="secrets directory holding master.secret")
    b.add_argument("--rules", type=_rules, default=_rules(DEFAULT_RULES),
                   help=f"comma-separated match rules to index (default: {DEFAULT_RULES})")
    b.add_argument("--max-evaluations", type=int, default=DEFAULT_MAX_EVALUATIONS,
                   help="the policy's cap on evaluations per authorization in epoch mode; "
                        "fingerprint length is sized so E*N/2^L <= 2^-40")
    b.add_argument("--workers", type=int, default=2,
                   help="LocalCluster worker processes (ignored with --scheduler)")
    b.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786")
    b.add_argument("--partition-rows", type=int, default=DEFAULT_PARTITION_ROWS,
                   help="records per evaluation task")
    b.add_argument("--policy", type=Path, default=None,
                   help="custodian policy JSON: its excluded record classes stay out of the "
                        "index")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_build_index)
