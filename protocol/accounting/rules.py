"""How every ledger applies the budget and disclosure-cap rules, as pure functions.

The rules themselves are policy's (``protocol.policy.decide.within_budget`` and
``cap_allows_another``): sessions decide with them before any work.  A ledger applies the
same rules again inside its atomic write, reading its current counters, asking these
functions what may happen, and then storing the result: defence in depth against concurrent
sessions of one authorization, never a second, different decision.  Keeping this here (and
not in one storage adapter) is what makes two ledgers refuse exactly the same requests and
write the same audit entries (docs/architecture.md, Accounting).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol.accounting.chain import DISCLOSURE_RECORDED, DISCLOSURE_REPEATED
from protocol.accounting.port import Budget, DisclosureRow
from protocol.errors import BudgetExhausted, DisclosureCapReached, LedgerError
from protocol.policy.decide import cap_allows_another, within_budget

__all__ = [
    "DISCLOSURE_RECORDED",
    "DISCLOSURE_REPEATED",
    "DisclosurePlan",
    "check_evaluation",
    "check_limits_unchanged",
    "check_reserve",
    "plan_disclosures",
    "require_count",
    "require_id",
    "require_unix_time",
]



def require_id(name: str, value: str) -> None:
    """Ids are non-empty strings."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")


def require_count(name: str, value: int) -> None:
    """Counts and limits are non-negative integers (never bools)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer")


def require_unix_time(name: str, value: int) -> None:
    """Validity bounds are whole Unix seconds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer (Unix seconds)")


def check_limits_unchanged(
    auth_id: str, stored: tuple[int, int, int], given: tuple[int, int, int]
) -> None:
    """Limits are fixed at first sight, so a later, more generous copy cannot enlarge them."""
    if tuple(stored) != tuple(given):
        raise LedgerError(
            f"authorization {auth_id!r} already registered with different limits "
            f"(max_evaluations={stored[0]}, max_disclosures={stored[1]}, not_after={stored[2]})"
        )


def check_reserve(auth_id: str, budget: Budget, n: int) -> None:
    """A reservation may take at most what no session has reserved yet."""
    if not within_budget(budget.remaining, n):
        raise BudgetExhausted(
            f"authorization {auth_id!r}: requested {n} queries, "
            f"remaining {budget.remaining} of {budget.max_evaluations}"
        )


def check_evaluation(session_id: str, reserved: int, evaluated: int, n: int) -> None:
    """Evaluations stay within the session's reservation; the caller must not evaluate else."""
    if not within_budget(reserved - evaluated, n):
        raise BudgetExhausted(
            f"session {session_id!r}: requested {n} evaluations, "
            f"remaining {reserved - evaluated} of {reserved} reserved"
        )


@dataclass
class DisclosurePlan:
    """What one batch of disclosures does: rows to return, entries to log, rows to insert.

    ``new`` pairs each first disclosure with the index of its entry in ``entries`` (the row
    keeps that entry's sequence number); ``disclosed`` is the authorization's new total.
    """

    rows: list[DisclosureRow] = field(default_factory=list)
    entries: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    new: list[tuple[DisclosureRow, int]] = field(default_factory=list)
    disclosed: int = 0


def plan_disclosures(
    auth_id: str,
    session_id: str,
    items: Sequence[tuple[str, str]],
    first: Mapping[str, DisclosureRow],
    budget: Budget,
    now: float,
) -> DisclosurePlan:
    """Apply the cap to a batch of ``(record_id, rule_id)``; all or nothing.

    ``first`` maps each record of the batch already disclosed under the authorization to its
    original row. A record seen before (earlier, or earlier in this batch) is a repeat: it is
    audited, because data leaves again, but does not count; a batch audits each record's
    repeat once, however often it names the record (a replay cannot multiply entries).  If
    the new distinct records would pass ``max_disclosures``, :class:`DisclosureCapReached` is
    raised and nothing may be stored.
    """
    plan = DisclosurePlan(disclosed=budget.disclosed)
    seen = dict(first)
    audited: set[str] = set()
    for record_id, rule_id in items:
        payload = {"auth_id": auth_id, "session_id": session_id,
                   "record_id": record_id, "rule_id": rule_id}
        prior = seen.get(record_id)
        if prior is not None:
            payload["first_session_id"] = prior.session_id
            if record_id not in audited:
                plan.entries.append((DISCLOSURE_REPEATED, payload))
                audited.add(record_id)
            plan.rows.append(DisclosureRow(auth_id, prior.session_id, record_id, prior.rule_id,
                                           prior.disclosed_at, True))
            continue
        if not cap_allows_another(budget.max_disclosures, plan.disclosed):
            raise DisclosureCapReached(
                f"authorization {auth_id!r}: disclosure cap of "
                f"{budget.max_disclosures} records reached"
            )
        row = DisclosureRow(auth_id, session_id, record_id, rule_id, now, False)
        plan.new.append((row, len(plan.entries)))
        plan.entries.append((DISCLOSURE_RECORDED, payload))
        seen[record_id] = row
        plan.disclosed += 1
        plan.rows.append(row)
    return plan
