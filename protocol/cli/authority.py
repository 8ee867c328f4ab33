"""``psi-authority``: the offline tool a court or oversight office uses to sign Authorizations.

Only argument parsing, file I/O and printing live here; every decision is made by the pure
functions in :mod:`protocol.policy.authority`, records and decide.
Human output goes to stdout, errors to stderr. Exit codes: 0 success, 1 an authorization that
does not verify (``inspect``), 2 a usage or validation error (with a message, never a traceback).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from rich.console import Console
from rich.table import Table
from rich.text import Text

from protocol.adapters.files import open_csv, write_file_atomic, write_policy
from protocol.adapters.keys import load_evaluation_key
from protocol.cli.dev_pki import write_dev_pki
from protocol.cli.help import HelpFormatter, HelpfulParser, add_renamed_option
from protocol.cli.oversight import (
    OVERSIGHT_DESCRIPTION,
    add_oversight_arguments,
    run_oversight_cli,
)
from protocol.domain.engine import Engine
from protocol.domain.estimate import (
    PopulationStats,
    corroborated_false_matches_per_query,
    estimate_false_matches,
    sample_total,
)
from protocol.domain.identity import validate_agency_id
from protocol.domain.records import (
    CSV_SCHEMA_HELP,
    DEFAULT_RULES,
    MATCH_RULES,
    PersonRecord,
    QueryRecord,
    Refusal,
    Strength,
    ValidationReport,
    match_keys_bulk,
    query_match_keys_bulk,
    read_query_csv_with_lines,
    validate_queries,
)
from protocol.engines import registry as engine_registry
from protocol.engines.base import RequesterInputs
from protocol.engines.named import (
    CertificationRequest,
    TokenSet,
    certify,
    issue_tokens,
    new_token_key,
)
from protocol.errors import PSIError
from protocol.policy.authority import (
    SignatureStatus,
    ValidityStatus,
    describe,
    draft_authorization,
    format_timestamp,
    generate_authority_key,
    private_key_from_pem,
    private_key_to_pem,
    public_key_from_json,
    public_key_to_json,
    subject_commitment,
)
from protocol.policy.decide import (
    Authorization,
    CustodianPolicy,
    Mode,
    SignedAuthorization,
    Tier,
    authority_key_id,
    sign_authorization,
)
from protocol.sessions.aggregate import AGGREGATE_TIERS, aggregate_element_counts

__all__ = ["main"]

PROG = "psi-authority"
KEY_FILE = "authority.key"
PUBLIC_KEY_FILE = "authority.pub.json"
TOKEN_KEY_FILE = "authority.token.key"  # noqa: S105 - a file name
REFUSAL_LISTING_LIMIT = 50
DEFAULT_VALID_DAYS = 30
DEFAULT_RETENTION_DAYS = 90
_DAY = 86_400
_BUDGET_CHUNK = 4096  # elements per chunk; the budget does not depend on it
_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644


class CliError(Exception):
    """A user error: printed as one line on stderr, exit code 2, no traceback."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _printable(text: object) -> str:
    """Escape control characters so that data from a CSV cannot rewrite the operator's terminal."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in s)


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _write_file(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    """``files.write_file_atomic``; without ``force`` an existing file is a user error."""
    if not force and (path.exists() or path.is_symlink()):
        raise CliError(f"{path} already exists; pass --force to overwrite it")
    write_file_atomic(path, data, mode=mode)


def _passphrase(env_name: str | None) -> bytes | None:
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise CliError(f"--passphrase-env names {env_name!r}, which is unset or empty")
    return value.encode("utf-8")


def _load_private_key(path: Path, env_name: str | None) -> Ed25519PrivateKey:
    data = path.read_bytes()
    mode = path.stat().st_mode
    if mode & 0o077:
        _warn(f"{path} is readable by other users (mode {mode & 0o777:o}); run chmod 600 on it")
    try:
        return private_key_from_pem(data, password=_passphrase(env_name))
    except ValueError as exc:
        hint = "" if env_name else " (if the key is encrypted, pass --passphrase-env)"
        raise CliError(f"{path}: {exc}{hint}") from exc


def _load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CliError(f"{path} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CliError(f"{path} is not UTF-8 text") from exc
    try:
        return public_key_from_json(doc)
    except ValueError as exc:
        raise CliError(f"{path}: {exc}") from exc


def _trusted_keys(paths: Sequence[str]) -> dict[str, Ed25519PublicKey]:
    keys = [_load_public_key(Path(p)) for p in paths]
    return {authority_key_id(k): k for k in keys}


def _parse_time(flag: str, text: str) -> int:
    """ISO 8601 date or date-time to unix seconds; a value without a zone is taken as UTC."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(
            f"{flag} {text!r} is not an ISO 8601 date or date-time "
            "(e.g. 2025-07-01 or 2025-07-01T09:00:00+00:00)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


# --------------------------------------------------------------------------------------------
# keygen
# --------------------------------------------------------------------------------------------


def _cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    key_path, pub_path = out / KEY_FILE, out / PUBLIC_KEY_FILE
    if not args.force:
        existing = [str(p) for p in (key_path, pub_path) if p.exists() or p.is_symlink()]
        if existing:
            raise CliError(f"{' and '.join(existing)} already exist(s); pass --force to overwrite")
    password = _passphrase(args.passphrase_env)
    key = generate_authority_key()
    public_doc = public_key_to_json(key.public_key())
    _write_file(
        key_path, private_key_to_pem(key, password=password), mode=_PRIVATE_MODE, force=True
    )
    _write_file(
        pub_path,
        (json.dumps(public_doc, indent=2, sort_keys=True) + "\n").encode(),
        mode=_PUBLIC_MODE,
        force=True,
    )
    print(f"authority key id: {public_doc['key_id']}")
    print(f"private key:      {key_path} (mode 0600{', encrypted' if password else ''})")
    print(f"public key:       {pub_path} (give this to custodians)")
    return 0


# --------------------------------------------------------------------------------------------
# issue
# --------------------------------------------------------------------------------------------


def _validity_window(args: argparse.Namespace, now: int) -> tuple[int, int]:
    if args.valid_days is not None and args.not_after is not None:
        raise CliError("use either --valid-days or --not-after, not both")
    if args.valid_days is not None and args.valid_days <= 0:
        raise CliError(f"--valid-days must be positive, got {args.valid_days}")
    not_before = now if args.not_before is None else _parse_time("--not-before", args.not_before)
    if args.not_after is not None:
        not_after = _parse_time("--not-after", args.not_after)
    else:
        not_after = not_before + (args.valid_days or DEFAULT_VALID_DAYS) * _DAY
    if not_after <= not_before:
        raise CliError(
            f"--not-after ({format_timestamp(not_after)}) must be later than "
            f"--not-before ({format_timestamp(not_before)})"
        )
    if not_after <= now:
        raise CliError(
            f"the authorization would already have expired ({format_timestamp(not_after)})"
        )
    return not_before, not_after


def _print_refusals(refused: Sequence[Refusal]) -> None:
    shown = refused[:REFUSAL_LISTING_LIMIT]
    print("Refused records (line, record id, code, detail):")
    for r in shown:
        record_id = _printable(r.record_id) if r.record_id.strip() else "<no id>"
        print(f"  line {r.line}  {record_id}  {r.code}  {_printable(r.detail)}")
    rest = len(refused) - len(shown)
    if rest > 0:
        print(f"  ... and {rest:,} more refusals (write them all with --refusals-out FILE.csv)")


def _refusals_csv(refused: Sequence[Refusal]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["record_id", "line", "code", "detail"])
    for r in refused:
        writer.writerow([r.record_id, r.line, str(r.code), r.detail])
    return buffer.getvalue().encode("utf-8")


def engine_budgets(keys: Sequence[bytes | None], engines: Sequence[str]) -> dict[str, int]:
    """Budget units each engine asks for at open for these match keys (query x rule, in
    session order): each registered engine's requester side is built on exactly the inputs a
    session would give it and reports its own ``units``.

    OPRF spends one unit per element; KKRT one per cuckoo bin, and its table for n distinct
    keys has more bins than keys (about 1.3 n, more for small n to keep the failure bound), so
    the same request costs KKRT more units.
    """
    inputs = [k for k in keys if k is not None]
    return {name: engine_registry.get(name).requester(RequesterInputs(
                authorization_id="budget", session_id="budget", inputs=inputs,
                chunk_size=_BUDGET_CHUNK, ops=None)).units
            for name in engines}


def _read_and_validate(
    path: Path, rules: Sequence[str],
) -> tuple[list[tuple[int, QueryRecord]], ValidationReport, date]:
    """Read a query file and validate it as of today: the one way ``issue``, ``review`` and
    ``estimate`` see a request file, so they price and refuse exactly the same records."""
    try:
        with open_csv(path) as fh:
            items = read_query_csv_with_lines(fh, rules=rules)
    except PSIError as exc:
        raise CliError(f"{path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CliError(f"{path} is not UTF-8 text") from exc
    today = date.today()  # the CLI is the edge that reads the clock
    return items, validate_queries(items, today=today), today


def _aggregate_tier(args: argparse.Namespace) -> bool:
    return getattr(args, "tier", Tier.IDENTITY.value) in {t.value for t in AGGREGATE_TIERS}


def _aggregate_budget(accepted: Sequence[QueryRecord], rules: Sequence[str], today: date
                      ) -> dict[str, int]:
    """The aggregate and cardinality tiers evaluate canonical keys only, one session per
    rule, each sending its distinct keys (docs/architecture.md, Aggregate and cardinality
    tiers): the budget is exactly their sum, whatever engines are listed."""
    counts = aggregate_element_counts(accepted, rules, today=today)
    with_variants = [r for r in rules if r in MATCH_RULES and MATCH_RULES[r].variants]
    print(f"Budget needed (aggregate tier, {len(rules)} rule(s), one session each, distinct "
          "canonical keys; variant keys are not evaluated in this tier): "
          + ", ".join(f"{r} {n:,}" for r, n in counts.items())
          + f"; total {sum(counts.values()):,}")
    if with_variants:
        print(f"  note: {', '.join(with_variants)} match on canonical keys only in this tier, "
              "so their recall there is that of their canonical key")
    return {"aggregate": sum(counts.values())}


def _review_queries(
    args: argparse.Namespace,
) -> tuple[int, bytes, dict[str, int], list[QueryRecord]]:
    """Validate the query file; return (accepted count, commitment over the accepted subjects,
    budget units each permitted engine needs, the accepted queries)."""
    path = Path(args.queries)
    items, report, today = _read_and_validate(path, _csv_list(args.rules))
    accepted, refused = len(report.accepted), report.refused_record_count
    print(
        f"Validated {len(items):,} query records from {path}: {accepted:,} accepted, "
        f"{refused:,} refused"
    )
    if report.refused:
        print("Refusals by reason:")
        for code, count in report.counts_by_reason().items():
            print(f"  {code:<24} {count:>9,}")
        _print_refusals(report.refused)
    if args.refusals_out is not None:
        out = Path(args.refusals_out)
        _write_file(out, _refusals_csv(report.refused), mode=_PUBLIC_MODE, force=True)
        print(f"All {len(report.refused):,} refusals written to {out}")
    if not report.accepted:
        raise CliError(f"no query record in {path} passed validation; nothing to authorize")
    rules = _csv_list(args.rules)
    if _aggregate_tier(args):
        budgets = _aggregate_budget(report.accepted, rules, today)
    else:
        # Every key the requester will evaluate, query-side variants included: the exact budget.
        keys = query_match_keys_bulk([q.person for q in report.accepted], rules, today=today)
        engines = ([Engine.OPRF.value] if getattr(args, "named", False)
                   else _csv_list(args.engines))
        budgets = engine_budgets([k for rule in rules for ks in keys[rule] for k in ks], engines)
        print(f"Budget needed ({len(rules)} rule(s), every key incl. variants), in units per "
              "engine: " + ", ".join(f"{engine} {units:,}" for engine, units in budgets.items()))
    _print_estimate([q.person for q in report.accepted], rules, args, today)
    commitment = subject_commitment(report.accepted, today=today)
    return accepted, commitment, budgets, report.accepted


def _population(args: argparse.Namespace) -> PopulationStats:
    try:
        return PopulationStats(custodian_records=args.custodian_records,
                               persons_per_zip=args.persons_per_zip)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _print_estimate(people: Sequence[PersonRecord], rules: Sequence[str],
                    args: argparse.Namespace, today: date) -> None:
    """The misidentification estimate: expected false matches per rule before signing.

    It builds the subjects' keys itself, a batch at a time and field by field, which is
    faster than pricing keys joined already (``issue``'s, for the budget) and holds few."""
    stats = _population(args)
    print(f"Misidentification estimate (expected false matches; custodian of "
          f"{stats.custodian_records:,} records, {stats.persons_per_zip:,} people per ZIP):")
    total = 0.0
    for e in estimate_false_matches(people, rules, stats, today=today):
        total += e.expected_false_matches
        print(f"  {e.rule_id:<26} {_expected_text(e.expected_false_matches):>10}  "
              f"({e.queries:,} subjects, {e.keys:,} keys)")
    print(f"  {'all rules':<26} {_expected_text(total):>10}")
    k = getattr(args, "corroboration", None)
    if k is not None:
        step = max(1, -(-len(people) // _CORROBORATION_SAMPLE))
        sample = people[::step]
        per_query = corroborated_false_matches_per_query(sample, rules, k, stats,
                                                         today=today)
        corroborated, error = sample_total(per_query, len(people))
        print(f"  {f'corroborated by {k} rules':<26} {_expected_text(corroborated):>10}  "
              f"(a disclosure needs {k} independent rules to agree; upper estimate)")
        if len(sample) < len(people):
            print(f"  {'':<26} {'':>10}  sample-based: priced on a sample of "
                  f"{len(sample):,} of {len(people):,} subjects (every {step:,}th) and "
                  f"scaled; sampling standard error {_expected_text(error)}")
        else:
            print(f"  {'':<26} {'':>10}  priced on all {len(people):,} subjects (no sample)")


#: Subjects the corroborated estimate prices one by one (every independent group of rules
#: and every key combination); a larger file is priced on an even sample and scaled.
_CORROBORATION_SAMPLE = 5_000


def _expected_text(value: float) -> str:
    """An expected count: one decimal from 1 up, three below, "<0.001" for a trace."""
    if value >= 1 or value == 0:
        return f"{value:,.1f}"
    return f"{value:.3f}" if value >= 0.001 else "<0.001"


def _cmd_estimate(args: argparse.Namespace) -> int:
    """Expected false matches per rule for a request file, before anyone signs."""
    _check_rules(_csv_list(args.rules))
    if args.corroboration is not None and args.corroboration < 2:
        raise CliError(f"--corroboration must be at least 2, got {args.corroboration}")
    path = Path(args.queries)
    items, report, today = _read_and_validate(path, _csv_list(args.rules))
    print(f"{len(report.accepted):,} of {len(items):,} query records in {path} pass validation "
          "and are priced")
    _print_estimate([q.person for q in report.accepted], _csv_list(args.rules), args, today)
    return 0


def _check_rules(rules: Sequence[str]) -> None:
    unknown = [r for r in rules if r not in MATCH_RULES]
    if unknown or not rules:
        raise CliError(f"unknown match rule(s) {', '.join(unknown) or '(none given)'}; known: "
                       f"{', '.join(MATCH_RULES)}")


def _draft(
    args: argparse.Namespace,
    key: Ed25519PrivateKey | Ed25519PublicKey,
    window: tuple[int, int],
    max_evaluations: int,
    max_disclosures: int,
    commitment: bytes | None,
) -> Authorization:
    try:
        return draft_authorization(
            authority_key=key,
            requester_id=args.requester,
            custodian_id=args.custodian,
            statute=args.statute,
            purpose=args.purpose,
            tier=args.tier,
            max_evaluations=max_evaluations,
            max_disclosures=max_disclosures,
            match_rules=_csv_list(args.rules),
            disclosure_fields=_csv_list(args.fields),
            value_field=getattr(args, "value_field", ""),
            retention_days=args.retention_days,
            not_before=window[0],
            not_after=window[1],
            subject_commitment=commitment,
            mode=Mode.NAMED_SUBJECTS if getattr(args, "named", False) else None,
            engines=_csv_list(args.engines),
            min_aggregate_count=args.min_aggregate_count,
            evaluation_key=_evaluation_key(args),
            corroboration=getattr(args, "corroboration", None),
        )
    except ValueError as exc:
        message = str(exc).replace("value_field", "--value-field").replace(
            "disclosure_fields", "--fields")
        raise CliError(message) from exc


def _evaluation_key(args: argparse.Namespace) -> bytes | None:
    """The custodian's published POPRF key (``agency-b evaluation-key``), checked to be for
    the authorization's custodian, or None when no key is pinned."""
    path = getattr(args, "custodian_evaluation_key", None)
    if not path:
        return None
    try:
        custodian_id, key = load_evaluation_key(path)
    except (OSError, ValueError) as exc:
        raise CliError(f"--custodian-evaluation-key: {exc}") from exc
    if custodian_id != args.custodian:
        raise CliError(f"--custodian-evaluation-key {path} is custodian {custodian_id!r}'s key, "
                       f"not --custodian {args.custodian!r}'s")
    return key


def _named_inputs(args: argparse.Namespace) -> tuple[bytes, bytes]:
    """(token key c, the custodian's binding secret) for a named-subject review."""
    if args.queries is None:
        raise CliError("a named-subject review needs --queries (the subjects to review)")
    if args.max_evaluations is not None:
        raise CliError("--max-evaluations is fixed by the review: the number of tokens issued")
    token_key = bytes.fromhex(Path(args.token_key).read_text().strip())
    binding = bytes.fromhex(Path(args.binding).read_text().strip())
    if len(token_key) != 32 or len(binding) != 32:
        raise CliError("token key and binding secret must be 32 bytes (hex)")
    return token_key, binding


def _write_tokens(args: argparse.Namespace, auth: Authorization,
                  named_inputs: tuple[bytes, bytes],
                  accepted_queries: Sequence[QueryRecord]) -> None:
    """One token c·d_A·H(key) per approved subject and rule (protocol/engines/named.py)."""
    token_key, binding = named_inputs
    keys = match_keys_bulk([q.person for q in accepted_queries], list(auth.match_rules),
                           today=date.today())
    entries = [(q.person.record_id, rule, key)
               for rule in auth.match_rules
               for q, key in zip(accepted_queries, keys[rule], strict=True)
               if key is not None]
    if len(entries) != auth.max_evaluations:
        raise CliError("internal: token count differs from the signed budget")
    tokens = issue_tokens(token_key, binding, auth.authorization_id, [k for *_, k in entries])
    token_set = TokenSet(auth.authorization_id, tuple(
        (rid, rule, tokens[i * 32:(i + 1) * 32]) for i, (rid, rule, _) in enumerate(entries)))
    _write_file(Path(args.tokens_out), token_set.to_bytes(), mode=_PRIVATE_MODE,
                force=args.force)
    print(f"Named-subject tokens: {len(entries):,} -> {args.tokens_out} (mode 0600; give them "
          "to the requester with the authorization)")


def _cmd_review(args: argparse.Namespace) -> int:
    """``issue`` in named-subject mode: only the reviewed subjects will be able to match."""
    args.named = True
    return _cmd_issue(args)


def _cmd_token_keygen(args: argparse.Namespace) -> int:
    path = Path(args.out) / TOKEN_KEY_FILE
    if path.exists() and not args.force:
        raise CliError(f"{path} already exists; pass --force to overwrite it")
    _write_file(path, (new_token_key().hex() + "\n").encode(), mode=_PRIVATE_MODE, force=True)
    print(f"token key: {path} (mode 0600; keep it offline with the signing key)")
    return 0


def _cmd_certify(args: argparse.Namespace) -> int:
    """Multiply a custodian's blinded elements by c; remember its binding secret."""
    token_key = bytes.fromhex(Path(args.token_key).read_text().strip())
    public = _load_public_key(Path(args.public_key))
    request = CertificationRequest.from_bytes(Path(args.request).read_bytes())
    response = certify(token_key, authority_key_id(public), request)
    _write_file(Path(args.out), response.to_bytes(), mode=_PUBLIC_MODE, force=args.force)
    binding_path = Path(args.binding_out)
    _write_file(binding_path, (request.binding_secret.hex() + "\n").encode(),
                mode=_PRIVATE_MODE, force=args.force)
    print(f"certified {len(request.elements) // 32:,} elements of custodian "
          f"{request.custodian_id!r} (that count is all this step reveals) -> {args.out}")
    print(f"binding secret for reviews: {binding_path} (mode 0600)")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not args.force and (out.exists() or out.is_symlink()):
        raise CliError(f"{out} already exists; pass --force to overwrite it")
    if args.refusals_out is not None and args.queries is None:
        raise CliError("--refusals-out needs --queries")
    if args.max_evaluations is not None and args.max_evaluations <= 0:
        raise CliError(f"--max-evaluations must be positive, got {args.max_evaluations}")
    if args.max_evaluations is None and args.queries is None:
        raise CliError("--max-evaluations is required unless --queries is given")
    if args.max_disclosures is None:
        if args.tier == Tier.IDENTITY.value:
            raise CliError("--max-disclosures is required for the identity tier")
        args.max_disclosures = 0
    if args.max_disclosures < 0:
        raise CliError(f"--max-disclosures must not be negative, got {args.max_disclosures}")
    if args.retention_days < 0:
        raise CliError(f"--retention-days must not be negative, got {args.retention_days}")
    window = _validity_window(args, int(time.time()))
    rules = _csv_list(args.rules)
    with_variants = [r for r in rules if r in MATCH_RULES and MATCH_RULES[r].variants]
    if getattr(args, "named", False) and with_variants:
        raise CliError("a named-subject review issues one token per subject and rule; "
                       f"rules with variant keys ({', '.join(with_variants)}) are not "
                       "available to it")
    named_inputs = _named_inputs(args) if getattr(args, "named", False) else None

    # Check every argument before any I/O, so a typo never costs a long validation run.
    dummy_commitment = bytes(32) if args.queries is not None else None
    _draft(
        args,
        generate_authority_key().public_key(),
        window,
        args.max_evaluations or 1,
        args.max_disclosures,
        dummy_commitment,
    )
    key = _load_private_key(Path(args.key), args.passphrase_env)

    commitment: bytes | None = None
    accepted = 0
    budgets: dict[str, int] = {}
    accepted_queries: list[QueryRecord] = []
    if args.queries is not None:
        accepted, commitment, budgets, accepted_queries = _review_queries(args)
    # One budget serves every permitted engine: the largest need among them.
    derived = max(budgets.values(), default=0)
    max_evaluations = args.max_evaluations if args.max_evaluations is not None else derived
    short = {e: n for e, n in budgets.items() if args.max_evaluations is not None
             and args.max_evaluations < n}
    if (args.queries is not None and args.max_evaluations is not None
            and args.max_evaluations != derived):
        _warn(
            f"--max-evaluations {args.max_evaluations:,} differs from the {derived:,} budget "
            "units the "
            f"{accepted:,} accepted subjects need under {len(rules)} rule(s)"
            + (f"; too small for {', '.join(short)}, which the custodian will refuse with "
               "RESOURCE_EXHAUSTED" if short else "")
        )

    auth = _draft(args, key, window, max_evaluations, args.max_disclosures, commitment)
    for rule_id in auth.match_rules:
        if MATCH_RULES[rule_id].strength < Strength.MEDIUM:
            _warn(
                f"match rule {rule_id!r} is WEAK (high misidentification risk); custodians "
                "refuse it unless their policy explicitly allows it"
                + (" (or allows weak rules under corroboration)"
                   if auth.corroboration is not None else "")
            )
    if "tin" in auth.disclosure_fields:
        _warn("'tin' is a disclosure field; the default custodian policy never discloses it")
    signed = sign_authorization(auth, key)
    _write_file(out, signed.to_bytes(), mode=_PUBLIC_MODE, force=args.force)
    if named_inputs is not None:
        _write_tokens(args, auth, named_inputs, accepted_queries)

    print(f"Signed authorization {auth.authorization_id} -> {out}")
    print(f"  authority key:   {auth.authority_key_id}")
    print(f"  requester:       {auth.requester_id} -> custodian {auth.custodian_id}")
    print(f"  tier / mode:     {auth.tier.value} / {auth.mode.value}")
    print(f"  match rules:     {', '.join(auth.match_rules)}")
    print(f"  fields:          {', '.join(auth.disclosure_fields) or '(none)'}")
    if auth.value_field:
        print(f"  summed column:   {auth.value_field} (aggregate tier: its sum, never a value)")
    budget_note = (
        " (the largest need of the permitted engines: "
        + ", ".join(f"{e} {n:,}" for e, n in budgets.items())
        + f"; {accepted:,} accepted subjects, {len(rules)} rules, "
        + ("distinct canonical keys per rule)" if _aggregate_tier(args)
           else "every key incl. variants)")
        if args.queries is not None and args.max_evaluations is None
        else ""
    )
    print(f"  max evaluations:{auth.max_evaluations:,}{budget_note}")
    print(f"  max disclosures: {auth.max_disclosures:,}")
    if auth.corroboration is not None:
        print(f"  corroboration:   {auth.corroboration} independent rules must agree on a "
              "record before it is disclosed (same budget: the same keys are evaluated)")
    print(
        f"  valid:           {format_timestamp(auth.not_before)} .. "
        f"{format_timestamp(auth.not_after)}"
    )
    print(f"  retention:       {auth.retention_days} days")
    if auth.subject_commitment is not None:
        print(f"  subjects:        {accepted:,}, commitment {auth.subject_commitment.hex()}")
    print(f"  digest:          {signed.digest().hex()}")
    return 0


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------

_STATUS_STYLE = {
    SignatureStatus.VERIFIED: "bold green",
    SignatureStatus.INVALID: "bold red",
    SignatureStatus.UNTRUSTED: "bold red",
    SignatureStatus.NOT_CHECKED: "bold yellow",
    ValidityStatus.VALID: "green",
    ValidityStatus.NOT_YET_VALID: "yellow",
    ValidityStatus.EXPIRED: "red",
}


def _render(info: dict[str, Any]) -> None:
    auth = info["authorization"]
    validity = info["validity"]
    signature = info["signature"]

    def rules_text(rule_ids: list[str]) -> str:
        return ", ".join(
            f"{r} ({MATCH_RULES[r].strength.name})" if r in MATCH_RULES else f"{r} (unknown)"
            for r in rule_ids
        )

    rows: list[tuple[str, str | Text]] = [
        ("Authorization", auth["authorization_id"]),
        ("Authority key", auth["authority_key_id"]),
        ("Requester", auth["requester_id"]),
        ("Custodian", auth["custodian_id"]),
        ("Statute", auth["statute"]),
        ("Purpose", auth["purpose"]),
        ("Tier", auth["tier"]),
        ("Mode", auth["mode"]),
        ("Match rules", rules_text(auth["match_rules"])),
        ("Disclosure fields", ", ".join(auth["disclosure_fields"]) or "(none)"),
        ("Summed column", auth.get("value_field") or "(none)"),
        ("Max evaluations", f"{auth['max_evaluations']:,}"),
        ("Max disclosures", f"{auth['max_disclosures']:,}"),
        ("Retention", f"{auth['retention_days']} days"),
        ("Engines", ", ".join(auth["engines"])),
    ]
    if auth.get("corroboration") is not None:
        rows.append(("Corroboration", f"{auth['corroboration']} independent rules per "
                     "disclosure"))
    if auth["tier"] != Tier.IDENTITY.value:
        rows.append(("Min aggregate count", f"{auth['min_aggregate_count']:,}"))
    rows.append(("Subject commitment", auth["subject_commitment"] or "(none)"))
    rows.append(("Valid from", validity["not_before"]))
    rows.append(("Valid until", validity["not_after"]))
    rows.append(
        (
            "Validity now",
            Text(
                f"{validity['status']} (at {validity['now']})",
                style=_STATUS_STYLE[validity["status"]],
            ),
        )
    )
    rows.append(
        (
            "Signature",
            Text(
                f"{signature['status']}: {signature['detail']}",
                style=_STATUS_STYLE[signature["status"]],
            ),
        )
    )
    rows.append(("Digest", info["digest"]))

    table = Table(title="Signed authorization", show_header=False, title_justify="left")
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for label, value in rows:
        # Text(...) so that brackets in a statute or purpose are never read as rich markup.
        table.add_row(label, value if isinstance(value, Text) else Text(_printable(value)))
    Console(file=sys.stdout, highlight=False).print(table)


def _cmd_inspect(args: argparse.Namespace) -> int:
    if args.no_verify and args.trusted:
        raise CliError("--no-verify and --trusted contradict each other")
    path = Path(args.file)
    data = path.read_bytes()
    trusted = _trusted_keys(args.trusted) if args.trusted else None
    try:
        signed = SignedAuthorization.from_bytes(data)
    except ValueError as exc:
        print(f"{PROG} inspect: {path} is not a valid signed authorization: {exc}", file=sys.stderr)
        return 1
    info = describe(signed, trusted, now=time.time())
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        _render(info)
    status = info["signature"]["status"]
    if status == SignatureStatus.VERIFIED:
        return 0
    if status == SignatureStatus.NOT_CHECKED:
        if args.no_verify:
            return 0
        print(
            f"{PROG} inspect: signature not checked; pass --trusted {PUBLIC_KEY_FILE} "
            "(or --no-verify to only display the file)",
            file=sys.stderr,
        )
        return 1
    print(f"{PROG} inspect: {info['signature']['detail']}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------------------
# dev-ca and policy-template
# --------------------------------------------------------------------------------------------


def _cmd_dev_ca(args: argparse.Namespace) -> int:
    out = Path(args.out)
    agencies = [validate_agency_id(a) for a in args.agency]
    servers = [validate_agency_id(a) for a in (args.server or agencies)]
    if not args.force:
        existing = [str(out / n) for n in ("ca.pem", "ca.key") if (out / n).exists()]
        if existing:
            raise CliError(
                f"{' and '.join(existing)} already exist(s); pass --force to replace the CA "
                "(certificates issued by the old CA stop chaining)"
            )
    written = write_dev_pki(out, agencies, server_agencies=servers)
    print(f"Development PKI written to {out} (not for production use):")
    width = max(len(name) for name in written)
    for name, path in written.items():
        print(f"  {name:<{width}}  {path}")
    return 0


def _cmd_policy_template(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not args.force and (out.exists() or out.is_symlink()):
        raise CliError(f"{out} already exists; pass --force to overwrite it")
    validate_agency_id(args.custodian)
    keys = [_load_public_key(Path(p)) for p in args.trust]
    engines = frozenset(_csv_list(args.engines))
    unknown = engines - set(Engine)
    if unknown or not engines:
        raise CliError(f"--engines must name one or more of {', '.join(Engine)}, "
                       f"got {args.engines!r}")
    policy = CustodianPolicy.trusting(args.custodian, keys, allowed_engines=engines)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_policy(policy, out)
    print(f"Custodian policy for {policy.custodian_id} written to {out}")
    print(f"  trusted authority keys: {', '.join(sorted(policy.trusted_authorities))}")
    print(
        f"  minimum rule strength:  {policy.min_rule_strength.name} "
        "(weaker rules refused unless listed in allowed_weak_rules)"
    )
    print(f"  never disclosed:        {', '.join(sorted(policy.never_disclose))}")
    print(f"  allowed tiers:          {', '.join(sorted(t.value for t in policy.allowed_tiers))}")
    print(f"  allowed engines:        {', '.join(sorted(policy.allowed_engines))}")
    return 0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def _subparser(
    subparsers: Any,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help_text: str,
    description: str,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help_text,
        description=description,
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


#: ``review``'s default rules: a named-subject token covers one key per subject and rule.
NAMED_DEFAULT_RULES = ("tin+dob", "tin+last_name")


def _add_population_arguments(p: argparse.ArgumentParser) -> None:
    """The population statistics the misidentification estimate needs from the operator."""
    p.add_argument("--custodian-records", type=int, default=1_300_000, metavar="N",
                   help="records in the custodian's file, for the misidentification "
                   "estimate (default 1300000)")
    p.add_argument("--persons-per-zip", type=int, default=6_000, metavar="N",
                   help="people per ZIP code in the population, for the misidentification "
                   "estimate (default 6000)")


def _add_issue_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by issue and review."""
    p.add_argument("--key", required=True, metavar="FILE", help=f"the authority's {KEY_FILE}")
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the key's passphrase, if encrypted",
    )
    p.add_argument(
        "--requester",
        required=True,
        metavar="ID",
        help="requesting agency id (must equal its mTLS certificate identity)",
    )
    p.add_argument("--custodian", required=True, metavar="ID", help="custodian agency id")
    p.add_argument("--statute", required=True, metavar="S", help="legal basis of the request")
    p.add_argument("--purpose", required=True, metavar="P", help="reason for the request")
    p.add_argument(
        "--tier",
        default=Tier.IDENTITY.value,
        choices=[t.value for t in Tier],
        help="what the requester may learn: identity (matched records and the permitted "
        "fields), aggregate (only how many match and the sum of the --value-field column) or "
        "cardinality (only how many match)",
    )
    p.add_argument(
        "--rules",
        default=",".join(DEFAULT_RULES),
        metavar="R1,R2",
        help=f"permitted match rules, comma-separated ({', '.join(MATCH_RULES)}; "
        f"default {','.join(DEFAULT_RULES)})",
    )
    _add_population_arguments(p)
    p.add_argument(
        "--fields",
        default="",
        metavar="F1,F2",
        help="permitted disclosure fields, comma-separated (identity tier only: person "
        "fields; the aggregate tier discloses none, see --value-field)",
    )
    p.add_argument(
        "--value-field",
        default="",
        metavar="COLUMN",
        help="aggregate tier only: the custodian value column whose sum may be released, "
        "e.g. tax_paid_cents (summed, never disclosed)",
    )
    add_renamed_option(p, "--max-queries", "--max-evaluations (it counts evaluations, not "
                       "queries: OPRF one per query x rule, KKRT one per cuckoo bin)")
    p.add_argument(
        "--max-evaluations",
        type=int,
        metavar="N",
        help="budget in engine units (default with --queries: computed for every permitted "
        "engine, the largest is signed; OPRF: one per query x rule, KKRT: one per cuckoo bin; "
        "aggregate and cardinality tiers: the distinct canonical keys of each rule, summed)",
    )
    p.add_argument(
        "--max-disclosures",
        type=int,
        metavar="N",
        help="cap on disclosed records (required for the identity tier; else 0)",
    )
    p.add_argument(
        "--min-aggregate-count",
        type=int,
        default=0,
        metavar="N",
        help="aggregate/cardinality tiers: smallest intersection whose sum may be revealed",
    )
    p.add_argument(
        "--engines",
        default=Engine.OPRF.value,
        metavar="E1,E2",
        help=f"permitted match engines, comma-separated ({', '.join(Engine)}); the "
        "computed budget covers each of them",
    )
    p.add_argument(
        "--valid-days",
        type=int,
        metavar="N",
        help=f"validity length from --not-before (default {DEFAULT_VALID_DAYS})",
    )
    p.add_argument(
        "--not-before",
        metavar="ISO",
        help="start of validity, ISO 8601 (default: now; no zone means UTC)",
    )
    p.add_argument(
        "--not-after", metavar="ISO", help="end of validity, ISO 8601 (instead of --valid-days)"
    )
    p.add_argument(
        "--retention-days",
        type=int,
        default=DEFAULT_RETENTION_DAYS,
        metavar="N",
        help=f"how long the requester may keep results (default {DEFAULT_RETENTION_DAYS})",
    )
    p.add_argument(
        "--queries", metavar="FILE.csv",
        help="the request's query file, validated before signing (CSV schema below)"
    )
    p.add_argument(
        "--refusals-out",
        metavar="FILE.csv",
        help="write every refused record (record_id, line, code, detail) here",
    )
    p.add_argument(
        "--custodian-evaluation-key", metavar="FILE",
        help="pin the custodian's published evaluation key (agency-b evaluation-key): its "
             "OPRF evaluations are then proven per chunk and checked by the requester "
             "(RFC 9497 POPRF; identity tier, oprf engine, bulk mode)")
    p.add_argument(
        "--corroboration", type=int, default=None, metavar="K",
        help="identity tier: disclose a record only when K >= 2 pairwise independent rules "
             "(each comparing a field the others do not) agree on it; the custodian checks "
             "every group. The budget is unchanged (the same keys are evaluated) "
             "(default: none, one rule suffices)")
    p.add_argument("--out", required=True, metavar="FILE", help="signed authorization to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")



def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed so documentation tools can render it)."""
    parser = HelpfulParser(
        prog=PROG,
        description=(
            "Offline tool of the authority (court or oversight office): create the signing "
            "key, review a request and sign an Authorization, inspect signed files, and set "
            "up development certificates and custodian policies.\n"
            "An authorization names its tier (issue --tier): identity (matched records and "
            "permitted fields), aggregate (a count and a sum) or cardinality (a count); and "
            "its engines (issue --engines): oprf and/or kkrt."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _subparser(
        sub,
        "keygen",
        _cmd_keygen,
        "create the authority's Ed25519 signing key",
        f"Write {KEY_FILE} (PKCS#8 PEM, mode 0600; keep it offline) and {PUBLIC_KEY_FILE} "
        '({"key_id": ..., "public_key": hex}), which custodians add to their trusted keys.',
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the two files")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="encrypt the private key with the passphrase in environment variable VAR",
    )

    p = _subparser(
        sub,
        "issue",
        _cmd_issue,
        "review a request and sign an Authorization",
        "Sign an Authorization for one requester and one custodian.\n\n"
        "With --queries, the request's query file is validated first: every refused record is "
        "listed with its line, record id, reason code and detail (placeholder or ZIP-only "
        "addresses, missing tax periods, ...). Refused records are excluded: the budget "
        "defaults to what the accepted subjects need (see Budget), and the authorization "
        "commits to exactly the "
        "accepted subjects (mode stays bulk; use review for named subjects).\n\n"
        "Budget: --max-evaluations counts engine units. OPRF spends one per query x rule with a "
        "usable key; KKRT one per cuckoo bin (about 1.3 x the distinct keys, more for small "
        "files). With --queries the need of every engine in --engines is computed and printed, "
        "and the largest is signed, so each permitted engine can run the whole request.\n\n"
        "Tiers: --tier identity (default) discloses the permitted fields of matched records; "
        "--tier aggregate reveals only the count and the sum of one column (--value-field "
        "tax_paid_cents); --tier cardinality only the count.\n\n"
        "example:\n"
        f"  {PROG} issue --key authority.key --requester agency-a --custodian agency-b \\\n"
        "      --statute '26 USC 6103(i)(2)' --purpose 'locate subjects of case 24-117' \\\n"
        "      --rules tin+dob,tin+last_name --fields address,city,state,zip \\\n"
        "      --queries request.csv --max-disclosures 5000 --out auth.json\n\n"
        + CSV_SCHEMA_HELP,
    )
    _add_issue_arguments(p)

    p = _subparser(
        sub,
        "review",
        _cmd_review,
        "review named subjects: sign a named-subject authorization and issue tokens",
        "Like issue, but the authorization is mode named_subjects: every accepted subject "
        "gets one token per rule, c·d·H(match key), and only those subjects can match. "
        "Refused subjects (placeholder or ZIP-only address, missing tax periods, statute or "
        "reason) are listed and get no token. The budget is exactly the number of tokens "
        "(OPRF engine only).\n\n" + CSV_SCHEMA_HELP,
    )
    _add_issue_arguments(p)
    for action in p._actions:  # one token per subject and rule: no variant keys here
        if action.dest == "rules":
            action.default = ",".join(NAMED_DEFAULT_RULES)
            action.help = ("permitted match rules, comma-separated, without query-side "
                           f"variants (default {','.join(NAMED_DEFAULT_RULES)})")
    p.add_argument("--token-key", required=True, metavar="FILE",
                   help=f"the authority's {TOKEN_KEY_FILE}")
    p.add_argument("--binding", required=True, metavar="FILE",
                   help="the custodian's binding secret, saved by 'certify'")
    p.add_argument("--tokens-out", required=True, metavar="FILE",
                   help="where to write the tokens for the requester")

    p = _subparser(
        sub,
        "token-keygen",
        _cmd_token_keygen,
        "create the authority's named-subject token key c",
        f"Write {TOKEN_KEY_FILE} (a ristretto255 scalar, hex, mode 0600).",
    )
    p.add_argument("--out", required=True, metavar="DIR",
                   help=f"directory for {TOKEN_KEY_FILE} (keep it offline)")
    p.add_argument("--force", action="store_true", help="overwrite an existing token key")

    p = _subparser(
        sub,
        "certify",
        _cmd_certify,
        "certify a custodian's blinded records under the token key (once per epoch)",
        "Multiply every blinded element b·H(y) of the custodian's request by c. The elements "
        "are pseudorandom: the authority learns only how many records there are.",
    )
    p.add_argument("--token-key", required=True, metavar="FILE",
                   help=f"the authority's {TOKEN_KEY_FILE} from token-keygen")
    p.add_argument("--public-key", required=True, metavar="FILE",
                   help=f"the authority's {PUBLIC_KEY_FILE} (names the key epoch)")
    p.add_argument("--request", required=True, metavar="FILE",
                   help="the custodian's request from 'agency-b certify-request'")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="response file for 'agency-b certify-finish'")
    p.add_argument("--binding-out", required=True, metavar="FILE",
                   help="where to keep the custodian's binding secret (mode 0600)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")

    p = _subparser(
        sub,
        "inspect",
        _cmd_inspect,
        "show a signed Authorization and verify its signature",
        "Print the authorization's fields, its validity window and whether the signature "
        "verifies under the given trusted authority keys.\n\n"
        "exit status: 0 verified (or --no-verify), 1 bad signature, untrusted or unchecked "
        "signer, or not a signed authorization; 2 usage error.",
    )
    p.add_argument("file", metavar="FILE", help="signed authorization file")
    p.add_argument(
        "--trusted",
        action="append",
        default=[],
        metavar=PUBLIC_KEY_FILE,
        help="a trusted authority public key file (repeatable)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="only display the file; do not require a trusted signature",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = _subparser(
        sub,
        "estimate",
        _cmd_estimate,
        "expected false matches per rule for a request file",
        "Validate the request file and price every key each rule would evaluate (query-side "
        "variants included) against population statistics: name frequencies from faker's "
        "weighted en_US tables, household structure (Jr/Sr namesakes), date-of-birth "
        "spread, people per ZIP. Prints the expected number of false matches per rule; "
        "issue prints the same section (docs/architecture.md, Recall and "
        "misidentification).",
    )
    p.add_argument("--queries", required=True, metavar="FILE", help="query CSV to price")
    p.add_argument("--rules", default=",".join(DEFAULT_RULES), metavar="R1,R2",
                   help=f"match rules to price, comma-separated ({', '.join(MATCH_RULES)}; "
                   f"default {','.join(DEFAULT_RULES)})")
    _add_population_arguments(p)
    p.add_argument(
        "--corroboration", type=int, default=None, metavar="K",
        help="also price disclosures that need K >= 2 pairwise independent rules to agree "
             "(an upper estimate, one more line) (default: none)")

    p = _subparser(
        sub,
        "dev-ca",
        _cmd_dev_ca,
        "issue a development CA and agency mTLS certificates",
        "Write ca.pem/ca.key and, per agency, <agency>.client.pem/.key and "
        "<agency>.server.pem/.key (keys mode 0600). For development and tests only.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--agency",
        action="append",
        required=True,
        metavar="ID",
        help="agency that gets a client certificate (repeatable)",
    )
    p.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="ID",
        help="agency that gets a server certificate (repeatable; default: every --agency)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing CA in DIR")

    p = _subparser(
        sub,
        "policy-template",
        _cmd_policy_template,
        "write a default custodian policy",
        "Write a CustodianPolicy that trusts the given authority keys with conservative "
        "defaults: weak match rules (name+address) refused, the TIN never disclosed.",
    )
    p.add_argument("--custodian", required=True, metavar="ID", help="custodian agency id")
    p.add_argument(
        "--trust",
        action="append",
        required=True,
        metavar=PUBLIC_KEY_FILE,
        help="authority public key file to trust (repeatable)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="policy file to write")
    p.add_argument("--engines", default=Engine.OPRF.value, metavar="E1,E2",
                   help=f"match engines this custodian serves ({', '.join(Engine)}; "
                        f"default {Engine.OPRF.value})")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")

    p = _subparser(
        sub,
        "oversight",
        run_oversight_cli,
        "check that both agencies' exports for an authorization agree",
        OVERSIGHT_DESCRIPTION,
    )
    add_oversight_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``psi-authority``; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: a command is required (see --help)", file=sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except CliError as exc:
        message = str(exc)
    except (ValueError, PSIError) as exc:
        message = str(exc)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        message = f"{where}{exc.strerror or exc}"
    except KeyboardInterrupt:
        return 130
    print(f"{PROG} {args.command}: error: {_printable(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
