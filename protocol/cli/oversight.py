"""Command-line bodies for oversight, shared by agency-a, agency-b and psi-authority.

``audit verify`` and ``export`` for both agencies, ``psi-authority oversight`` for the
inspector: reading key files and export documents, opening ledger files, writing exports.
The checks and documents themselves are pure (``protocol.accounting.oversight`` and
``protocol.accounting.export``).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.accounting.export import custodian_export, requester_export
from protocol.accounting.oversight import add_signed_checkpoint, check, verify_ledger
from protocol.adapters.files import write_file_atomic
from protocol.adapters.keys import load_public_key_json
from protocol.adapters.sqlite_ledger import Ledger
from protocol.errors import PSIError
from protocol.report.facts import inspector_facts
from protocol.report.render import render_report

__all__ = [
    "OVERSIGHT_DESCRIPTION",
    "add_ledger_commands",
    "add_oversight_arguments",
    "audit_verify_command",
    "export_command",
    "read_accuracy",
    "run_oversight_cli",
    "write_export",
]


def write_export(doc: Mapping[str, Any], dest: str | os.PathLike[str], *,
                 force: bool = False) -> None:
    """Write an export atomically, owner-only (it names disclosed records)."""
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    write_file_atomic(dest, text.encode("utf-8"), mode=0o600, overwrite=force)


def _open_existing(path: Path) -> Ledger:
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    return Ledger(path)


def audit_verify_command(ledger_path: str | os.PathLike[str], public_key_path: str | None,
                         out: TextIO | None = None) -> int:
    """``audit verify``: print OK or FAIL (first bad position, kind of damage); exit 0 / 1."""
    out = out or sys.stdout
    path = Path(ledger_path)
    key = load_public_key_json(public_key_path) if public_key_path else None
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    try:
        with Ledger(path) as ledger:
            report = verify_ledger(ledger, key)
    except (PSIError, sqlite3.DatabaseError) as exc:
        print(f"FAIL: {path} cannot be read as a ledger: unreadable ({exc})", file=out)
        return 1
    print(f"{path}: {report.summary()}", file=out)
    return 0 if report.ok else 1


def export_command(
    role: str,
    ledger_path: str | os.PathLike[str],
    auth_id: str,
    dest: str | os.PathLike[str],
    *,
    signing_key: Ed25519PrivateKey | None = None,
    force: bool = False,
    out: TextIO | None = None,
) -> int:
    """``export``: write the oversight export; with a key, pin the head with a checkpoint first."""
    out = out or sys.stdout
    with _open_existing(Path(ledger_path)) as ledger:
        if signing_key is not None:
            add_signed_checkpoint(ledger, signing_key)
        build = custodian_export if role == "custodian" else requester_export
        doc = build(ledger, auth_id)
    write_export(doc, dest, force=force)
    counts = doc["counts"]
    print(f"{role} export for {auth_id} written to {dest}: {counts['receipts']} receipts, "
          f"evaluated {counts['evaluated']}, disclosed {counts['disclosed']}, head seq "
          f"{doc['audit_head']['seq']}", file=out)
    return 0


OVERSIGHT_DESCRIPTION = (
    "Compare the custodian's and the requester's exports for one authorization: evaluated and "
    "disclosed counts, transcript hashes, both signatures on every receipt, and that both "
    "audit chain heads are covered by valid signed checkpoints. Every finding is printed.\n\n"
    "exit status: 0 the agencies agree, 1 they disagree, 2 usage error."
)


def add_oversight_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``psi-authority oversight``."""
    parser.add_argument("--custodian-export", required=True, metavar="FILE",
                        help="output of 'agency-b export'")
    parser.add_argument("--requester-export", required=True, metavar="FILE",
                        help="output of 'agency-a export'")
    parser.add_argument("--custodian-key", required=True, metavar="PUB.json",
                        help="the custodian's signing.pub.json")
    parser.add_argument("--requester-key", required=True, metavar="PUB.json",
                        help="the requester's signing.pub.json")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--html", metavar="FILE",
                        help="also write the inspector's view as one self-contained HTML page "
                             "(counts only; docs/architecture.md, Reports) (default: not set)")
    parser.add_argument("--accuracy", metavar="FILE",
                        help="accuracy JSON from 'make accuracy' for the per-rule "
                             "misidentification risk on the --html page (default: "
                             "benchmarks/results/accuracy.json of this checkout if present, "
                             "else 'not measured')")


def run_oversight_cli(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Body of ``psi-authority oversight``; returns 0 (agree) or 1 (disagree)."""
    out = out or sys.stdout
    docs = []
    for name in (args.custodian_export, args.requester_export):
        try:
            docs.append(json.loads(Path(name).read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not JSON: {exc}") from exc
    report = check(docs[0], docs[1], custodian_key=load_public_key_json(args.custodian_key),
                   requester_key=load_public_key_json(args.requester_key))
    if args.json:
        print(json.dumps(report.to_json(), indent=2), file=out)
    else:
        for line in report.lines():
            print(line, file=out)
    if getattr(args, "html", None):
        accuracy, source = read_accuracy(getattr(args, "accuracy", None))
        facts = inspector_facts(docs[0], docs[1], report, generated_at=time.time(),
                                accuracy=accuracy, accuracy_source=source)
        write_file_atomic(args.html, render_report(facts).encode("utf-8"), mode=0o644)
        # stderr: the verdict lines on stdout stay exactly what they were
        print(f"inspector's report written to {args.html}", file=sys.stderr)
    return 0 if report.agree else 1


#: The committed accuracy measurement of this checkout, when there is one (a report's
#: precision, recall and misidentification risk per rule; else "not measured").
DEFAULT_ACCURACY = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / \
    "accuracy.json"


def read_accuracy(path: str | os.PathLike[str] | None) -> tuple[Any, str]:
    """The accuracy JSON and where it came from; ``(None, "")`` when absent or unreadable.

    Read defensively: the benchmark may be rewriting it, and a report without measured
    accuracy says "not measured" rather than failing.
    """
    target = Path(path) if path else DEFAULT_ACCURACY
    try:
        return json.loads(target.read_text(encoding="utf-8")), str(target)
    except (OSError, ValueError):
        if path:  # asked for by name: say so, then carry on without it
            print(f"accuracy file {target} is unreadable; the report says 'not measured'",
                  file=sys.stderr)
        return None, ""


def add_ledger_commands(sub: Any, *, agency: str, location: str, location_help: str,
                        verify: Callable[..., int], export: Callable[..., int]) -> None:
    """``audit verify`` and ``export`` subcommands, the same for both agencies' CLIs.

    ``location`` is the flag naming where the agency's ledger is (``--ledger`` for the
    custodian, ``--data`` for the requester).
    """
    a = sub.add_parser("audit", help="audit-log tools",
                       description="Tools for the agency's hash-chained audit log.")
    asub = a.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="verify the ledger's audit chain (exit 0 OK, 1 FAIL)",
                        description="Re-derive the hash chain and, with --public-key, every "
                        "signed checkpoint. Prints OK with the entry count and head, or FAIL "
                        "with the first bad position and the kind of damage.")
    v.add_argument(location, required=True, help=location_help)
    v.add_argument("--public-key", metavar="signing.pub.json",
                   help=f"the {agency}'s public key, to verify the signed checkpoints")
    v.set_defaults(func=verify)
    e = sub.add_parser("export", help="write the oversight export of one authorization",
                       description="Counts, receipts with both signatures, the audit head and "
                       "the newest signed checkpoint, as JSON for 'psi-authority oversight'.")
    e.add_argument(location, required=True, help=location_help)
    e.add_argument("--authorization", required=True, metavar="ID", help="authorization id")
    e.add_argument("--out", required=True, help="JSON file to write (mode 0600)")
    e.add_argument("--secrets", help="the agency's secrets directory: sign a fresh checkpoint "
                   "over the current head first")
    e.add_argument("--force", action="store_true", help="overwrite --out")
    e.set_defaults(func=export)
