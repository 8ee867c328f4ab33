"""The ledger port is sufficient: a second ledger, written here, runs real sessions.

``MemoryLedger`` implements :class:`protocol.accounting.port.LedgerPort` in memory, using only
the accounting layer (the shared rules and the pure audit chain). Sessions, receipts,
oversight verification and the export run on it unchanged, and its accounting equals the
SQLite ledger's for the same sessions. The contract tests at the end (repeats reported by
``disclosures``, the per-session disclosed count) run against both implementations.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.accounting import chain
from protocol.accounting.chain import (
    DISCLOSURE_BATCH,
    DISCLOSURE_REPEATED,
    ZERO_HASH,
    AuditEntry,
    Checkpoint,
    StoredEntry,
    disclosure_batch,
)
from protocol.accounting.export import custodian_export, ledger_document
from protocol.accounting.oversight import add_signed_checkpoint, verify_ledger
from protocol.accounting.port import (
    AggregateReleaseRow,
    AuthorizationRow,
    Budget,
    DisclosureRow,
    LedgerPort,
    ReceiptRow,
    Reservation,
    SessionRow,
    TagSetFetchRow,
    check_evaluated_store,
    check_tagset_fetch,
)
from protocol.accounting.rules import (
    check_evaluation,
    check_limits_unchanged,
    check_reserve,
    plan_disclosures,
    require_count,
    require_id,
    require_unix_time,
)
from protocol.adapters.sqlite_ledger import Ledger
from protocol.errors import BudgetExhausted, DisclosureCapReached, LedgerError, PolicyRefusal
from protocol.sessions.identity import RequesterSession, run_in_process
from tests.factories import World, as_query, make_person, make_world

NOT_AFTER = 4_102_444_800  # 2100-01-01


@dataclass
class _Session:
    auth_id: str
    opened_at: float
    meta: str | None = None
    reserved: int | None = None
    evaluated: int = 0
    closed_at: float | None = None
    receipt: bytes | None = None
    custodian_signature: bytes | None = None
    requester_signature: bytes | None = None


class MemoryLedger:
    """A ledger held in memory: every method checks first and then mutates, so a refusal
    changes nothing (the in-memory form of one transaction)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._id = uuid.uuid4().hex
        self._entries: list[StoredEntry] = []
        self._checkpoints: list[Checkpoint] = []
        self._auths: dict[str, AuthorizationRow] = {}
        self._totals: dict[str, dict[str, int]] = {}
        self._sessions: dict[str, _Session] = {}
        self._first: dict[tuple[str, str], tuple[int, DisclosureRow]] = {}
        self._events: list[tuple[int, DisclosureRow]] = []  # every release, repeats too
        self._aggregate_releases: list[AggregateReleaseRow] = []
        self._evaluated: dict[str, dict[int, bytes]] = {}  # session -> seq -> elements
        self._fetches: list[TagSetFetchRow] = []
        self._append(self.now(), [("ledger.created", {"ledger_id": self._id})])

    # -- audit log -----------------------------------------------------------------------------

    @property
    def ledger_id(self) -> str:
        return self._id

    def now(self) -> float:
        return float(self._clock())

    def _append(self, at: float, entries: Sequence[tuple[str, Mapping[str, Any]]]
                ) -> list[AuditEntry]:
        linked = chain.chain_entries(self.audit_head(), at, entries)
        self._entries += [StoredEntry(e.seq, e.at, e.kind, text, e.prev_hash, e.entry_hash)
                          for e, text in linked]
        return [e for e, _ in linked]

    def audit(self, kind: str, payload: Mapping[str, Any]) -> AuditEntry:
        require_id("kind", kind)
        return self._append(self.now(), [(kind, payload)])[0]

    def stored_entries(self) -> Iterator[StoredEntry]:
        return iter(list(self._entries))

    def audit_entries(self, start: int = 0) -> Iterator[AuditEntry]:
        for e in self._entries:
            if e.seq >= start:
                yield AuditEntry(e.seq, float(e.at), str(e.kind),  # type: ignore[arg-type]
                                 json.loads(str(e.payload)), e.prev_hash, e.entry_hash)

    def audit_head(self) -> tuple[int, bytes]:
        return (0, ZERO_HASH) if not self._entries else (
            self._entries[-1].seq, self._entries[-1].entry_hash)

    def add_checkpoint(self, sign: Callable[[bytes], bytes], key_id: str) -> Checkpoint:
        require_id("key_id", key_id)
        seq, head = self.audit_head()
        cp = Checkpoint(seq, head, key_id, bytes(sign(chain.checkpoint_message(seq, head))),
                        self.now())
        self._checkpoints.append(cp)
        self._append(cp.created_at, [("audit.checkpoint", {
            "seq": seq, "head": head, "key_id": key_id, "signature": cp.signature})])
        return cp

    def checkpoints(self) -> list[Checkpoint]:
        return list(self._checkpoints)

    # -- authorizations and sessions -----------------------------------------------------------

    def ensure_authorization(self, auth_id: str, *, max_evaluations: int, max_disclosures: int,
                             not_after: int) -> None:
        require_id("auth_id", auth_id)
        require_count("max_evaluations", max_evaluations)
        require_count("max_disclosures", max_disclosures)
        require_unix_time("not_after", not_after)
        limits = (max_evaluations, max_disclosures, not_after)
        if auth_id in self._auths:
            row = self._auths[auth_id]
            check_limits_unchanged(auth_id, (row.max_evaluations, row.max_disclosures,
                                             row.not_after), limits)
            return
        now = self.now()
        self._auths[auth_id] = AuthorizationRow(auth_id, *limits, now)
        self._totals[auth_id] = {"reserved": 0, "evaluated": 0, "disclosed": 0}
        self._append(now, [("authorization.registered", {
            "auth_id": auth_id, "max_evaluations": max_evaluations,
            "max_disclosures": max_disclosures, "not_after": not_after})])

    def authorization(self, auth_id: str) -> AuthorizationRow:
        if auth_id not in self._auths:
            raise LedgerError(f"unknown authorization {auth_id!r}")
        return self._auths[auth_id]

    def budget(self, auth_id: str) -> Budget:
        a, t = self.authorization(auth_id), self._totals[auth_id]
        return Budget(a.max_evaluations, t["reserved"], t["evaluated"],
                      a.max_evaluations - t["reserved"], a.max_disclosures, t["disclosed"])

    def _session(self, auth_id: str, session_id: str, *, open_only: bool = True) -> _Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise LedgerError(f"unknown session {session_id!r}")
        if s.auth_id != auth_id:
            raise LedgerError(f"session {session_id!r} belongs to another authorization")
        if open_only and s.closed_at is not None:
            raise LedgerError(f"session {session_id!r} is closed")
        return s

    def open_session(self, auth_id: str, session_id: str, meta: Mapping[str, Any]) -> None:
        require_id("auth_id", auth_id)
        require_id("session_id", session_id)
        self.authorization(auth_id)
        meta_json = chain.canonical_json(meta)
        now = self.now()
        s = self._sessions.get(session_id)
        if s is not None:
            s = self._session(auth_id, session_id, open_only=False)
            if s.meta is not None:
                if s.meta != meta_json:
                    raise LedgerError(f"session {session_id!r} already opened differently")
                return
        self._sessions.setdefault(session_id, _Session(auth_id, now)).meta = meta_json
        self._append(now, [("session.opened", {"auth_id": auth_id, "session_id": session_id,
                                                "meta": json.loads(meta_json)})])

    def reserve(self, auth_id: str, session_id: str, n: int) -> Reservation:
        require_id("auth_id", auth_id)
        require_id("session_id", session_id)
        require_count("n", n)
        budget = self.budget(auth_id)
        if session_id in self._sessions:
            s = self._session(auth_id, session_id, open_only=False)
            if s.reserved is not None:
                if s.reserved != n:
                    raise LedgerError(f"session {session_id!r} already reserved {s.reserved}")
                return self._reservation(session_id, s)
            if s.closed_at is not None:
                raise LedgerError(f"session {session_id!r} is closed")
        check_reserve(auth_id, budget, n)
        now = self.now()
        s = self._sessions.setdefault(session_id, _Session(auth_id, now))
        s.reserved = n
        self._totals[auth_id]["reserved"] += n
        self._append(now, [("budget.reserved", {
            "auth_id": auth_id, "session_id": session_id, "n": n,
            "reserved_total": budget.reserved + n, "remaining": budget.remaining - n})])
        return self._reservation(session_id, s)

    @staticmethod
    def _reservation(session_id: str, s: _Session) -> Reservation:
        assert s.reserved is not None
        return Reservation(s.auth_id, session_id, s.reserved, s.evaluated,
                           s.reserved - s.evaluated)

    def reservation(self, session_id: str) -> Reservation | None:
        s = self._sessions.get(session_id)
        return None if s is None or s.reserved is None else self._reservation(session_id, s)

    def record_evaluation(self, auth_id: str, session_id: str, n: int) -> int:
        require_count("n", n)
        s = self._session(auth_id, session_id)
        if s.reserved is None:
            raise LedgerError(f"session {session_id!r} has no reservation")
        check_evaluation(session_id, s.reserved, s.evaluated, n)
        if n:
            s.evaluated += n
            self._totals[auth_id]["evaluated"] += n
            self._append(self.now(), [("budget.evaluated", {
                "auth_id": auth_id, "session_id": session_id, "n": n,
                "evaluated": s.evaluated})])
        return s.evaluated

    def close_session(self, auth_id: str, session_id: str, receipt: bytes,
                      custodian_signature: bytes,
                      requester_signature: bytes | None = None) -> None:
        s = self._session(auth_id, session_id, open_only=False)
        if s.closed_at is not None:
            if s.receipt != receipt or s.custodian_signature != custodian_signature:
                raise LedgerError(f"session {session_id!r} already closed with another receipt")
            if requester_signature is not None:
                self.add_countersignature(session_id, requester_signature)
            return
        now = self.now()
        s.closed_at, s.receipt, s.custodian_signature = now, bytes(receipt), custodian_signature
        s.requester_signature = requester_signature
        self._append(now, [("session.closed", {
            "auth_id": auth_id, "session_id": session_id,
            "receipt_sha256": chain.receipt_digest(receipt),
            "custodian_signature": custodian_signature,
            "requester_signature": requester_signature,
            "reserved": s.reserved, "evaluated": s.evaluated})])

    def add_countersignature(self, session_id: str, requester_signature: bytes) -> None:
        s = self._sessions.get(session_id)
        if s is None or s.closed_at is None:
            raise LedgerError(f"session {session_id!r} is not closed")
        if s.requester_signature is not None:
            if not hmac.compare_digest(s.requester_signature, requester_signature):
                raise LedgerError(f"session {session_id!r} has a different countersignature")
            return
        s.requester_signature = bytes(requester_signature)
        self._append(self.now(), [("session.countersigned", {
            "auth_id": s.auth_id, "session_id": session_id,
            "requester_signature": requester_signature})])

    def sessions(self, auth_id: str) -> list[SessionRow]:
        return [SessionRow(s.auth_id, sid, None if s.meta is None else json.loads(s.meta),
                           s.opened_at, s.reserved, s.evaluated, s.closed_at)
                for sid, s in self._sessions.items() if s.auth_id == auth_id]

    def receipts(self, auth_id: str) -> list[ReceiptRow]:
        closed = [(s.closed_at, sid, s) for sid, s in self._sessions.items()
                  if s.auth_id == auth_id and s.closed_at is not None]
        return [ReceiptRow(auth_id, sid, s.receipt or b"", s.custodian_signature or b"",
                           s.requester_signature, at)
                for at, sid, s in sorted(closed, key=lambda c: c[0])]

    # -- disclosures ---------------------------------------------------------------------------

    def record_disclosure(self, auth_id: str, session_id: str, record_id: str,
                          rule_id: str) -> DisclosureRow:
        return self.record_disclosures(auth_id, session_id, [(record_id, rule_id)])[0]

    def record_disclosures(self, auth_id: str, session_id: str,
                           items: Sequence[tuple[str, str]]) -> list[DisclosureRow]:
        for record_id, rule_id in items:
            require_id("record_id", record_id)
            require_id("rule_id", rule_id)
        budget = self.budget(auth_id)
        self._session(auth_id, session_id)
        first = {rid: row for (aid, rid), (_, row) in self._first.items() if aid == auth_id}
        now = self.now()
        plan = plan_disclosures(auth_id, session_id, items, first, budget, now)
        if not plan.entries:
            return plan.rows
        payload, accounts = disclosure_batch(auth_id, session_id, now, plan.entries)
        (entry,) = self._append(now, [(DISCLOSURE_BATCH, payload)])
        # First disclosures, then repeats, as the SQLite ledger lists one batch's rows.
        for repeat in (False, True):
            self._events += [(entry.seq, DisclosureRow(a.auth_id, a.session_id, a.record_id,
                                                       a.rule_id, now, repeat))
                             for a in accounts if (a.kind == DISCLOSURE_REPEATED) == repeat]
        for row, _ in plan.new:
            self._first[(auth_id, row.record_id)] = (entry.seq, row)
        self._totals[auth_id]["disclosed"] = plan.disclosed
        return plan.rows

    def disclosures(self, auth_id: str | None = None, *,
                    include_repeats: bool = False) -> list[DisclosureRow]:
        return [row for _, row in self._events
                if (auth_id is None or row.auth_id == auth_id)
                and (include_repeats or not row.repeat)]

    def disclosed_count(self, auth_id: str, session_id: str) -> int:
        return sum(1 for (aid, _), (_, row) in self._first.items()
                   if aid == auth_id and row.session_id == session_id)

    def record_aggregate_release(
        self, auth_id: str, session_id: str, requester_id: str, contributing: bytes,
        audit_payload: Mapping[str, Any],
        admit: Callable[[Sequence[AggregateReleaseRow]], None],
    ) -> AggregateReleaseRow:
        if session_id not in self._sessions:
            raise LedgerError(f"unknown session {session_id!r}")
        admit(self.aggregate_releases(requester_id))  # raises to refuse: nothing changes
        (entry,) = self._append(self.now(), [("aggregate_release", audit_payload)])
        row = AggregateReleaseRow(auth_id, requester_id, session_id, bytes(contributing),
                                  entry.at, entry.seq)
        self._aggregate_releases.append(row)
        return row

    def aggregate_releases(self, requester_id: str) -> list[AggregateReleaseRow]:
        return [r for r in self._aggregate_releases if r.requester_id == requester_id]

    def store_evaluated(self, auth_id: str, session_id: str, seq: int, elements: bytes) -> None:
        require_count("seq", seq)
        s = self._session(auth_id, session_id)
        stored = self._evaluated.setdefault(session_id, {})
        elsewhere = sum(len(v) for k, v in stored.items() if k != seq) // 32
        check_evaluated_store(session_id, s.reserved, elsewhere, bytes(elements))
        stored[seq] = bytes(elements)

    def evaluated_elements(self, session_id: str, seq: int) -> bytes | None:
        return self._evaluated.get(session_id, {}).get(seq)

    def record_tagset_fetch(self, auth_id: str, requester_id: str, epoch_id: str,
                            rules: Sequence[str], bytes_sent: int, cap: int) -> TagSetFetchRow:
        require_id("requester_id", requester_id)
        require_count("bytes_sent", bytes_sent)
        self.authorization(auth_id)
        done = sum(1 for f in self._fetches if f.auth_id == auth_id and f.epoch_id == epoch_id)
        check_tagset_fetch(auth_id, epoch_id, done, cap)
        (entry,) = self._append(self.now(), [("tagset.fetched", {
            "auth_id": auth_id, "requester_id": requester_id, "epoch_id": epoch_id,
            "rules": list(rules), "bytes": bytes_sent, "fetch": done + 1})])
        row = TagSetFetchRow(auth_id, requester_id, epoch_id, tuple(rules), bytes_sent,
                             entry.at, entry.seq)
        self._fetches.append(row)
        return row

    def tagset_fetches(self, auth_id: str) -> list[TagSetFetchRow]:
        return [f for f in self._fetches if f.auth_id == auth_id]

    @contextmanager
    def consistent_read(self) -> Iterator[None]:
        yield  # one thread, no concurrent writer: every read is consistent


# --------------------------------------------------------------------------------------------
# The port runs real sessions
# --------------------------------------------------------------------------------------------


def _both(tmp_path: Path, n_records: int = 40) -> tuple[World, World]:
    """The same custodian (records, keys, authority) over the SQLite and the memory ledger."""
    sql = make_world(tmp_path, n_records=n_records)
    # World annotates the SQLite ledger (other tests close and reopen it); sessions take any.
    return sql, replace(sql, ledger=MemoryLedger())  # type: ignore[arg-type]


def _session(world: World, signed: Any, queries: list[Any]) -> Any:
    req = RequesterSession(signed, queries, signing_key=world.requester_key)
    return run_in_process(req, world.custodian().session(), requester_id="agency-a")


def _accounting(ledger: LedgerPort, auth_id: str) -> dict[str, Any]:
    """What a ledger says about an authorization, without ids and timestamps."""
    return {
        "budget": ledger.budget(auth_id),
        "disclosures": [(d.record_id, d.rule_id, d.repeat)
                        for d in ledger.disclosures(auth_id, include_repeats=True)],
        "per_session": sorted((ledger.disclosed_count(auth_id, s.session_id), s.evaluated,
                               s.reserved) for s in ledger.sessions(auth_id)),
        "receipts": len(ledger.receipts(auth_id)),
        "kinds": [e.kind for e in ledger.audit_entries()],
    }


def test_memory_ledger_satisfies_the_port() -> None:
    ledger: LedgerPort = MemoryLedger()  # mypy checks the structural match
    assert isinstance(ledger.ledger_id, str)


def test_sessions_on_a_second_ledger_account_like_sqlite(tmp_path: Path) -> None:
    sql, mem = _both(tmp_path)
    signed = sql.authorize(rules=("tin+dob", "tin+last_name"), max_evaluations=100,
                           max_disclosures=18)
    first = [as_query(sql.records[i]) for i in range(0, 12)]
    first += [as_query(make_person(i, prefix="x")) for i in range(100, 110)]
    again = [as_query(sql.records[i]) for i in range(6, 30)]  # 6..11 repeat, then the cap
    auth_id = signed.authorization.authorization_id
    outcomes = {}
    for world in (sql, mem):
        one = _session(world, signed, first)
        two = _session(world, signed, again)
        with pytest.raises(PolicyRefusal) as refused:  # 92 of 100 used (2 rules x 22 + 2 x 24)
            _session(world, signed, again)
        outcomes[world is sql] = (one.receipt, two.receipt, len(two.results), two.rejected,
                                  refused.value.reasons)
    got_sql, got_mem = outcomes[True], outcomes[False]
    for receipt_sql, receipt_mem in zip(got_sql[:2], got_mem[:2], strict=True):
        assert (receipt_sql.evaluated, receipt_sql.disclosed) == (
            receipt_mem.evaluated, receipt_mem.disclosed)
    assert got_sql[2:] == got_mem[2:]
    assert got_sql[0].disclosed == 12 and got_sql[1].disclosed == 6  # cap of 18 reached
    assert _accounting(sql.ledger, auth_id) == _accounting(mem.ledger, auth_id)
    sql_doc, mem_doc = ledger_document(sql.ledger, auth_id), ledger_document(mem.ledger, auth_id)
    for key in ("budget", "authorization"):
        assert {k: v for k, v in sql_doc[key].items() if k != "registered_at"} == {
            k: v for k, v in mem_doc[key].items() if k != "registered_at"}


def test_oversight_runs_on_a_second_ledger(tmp_path: Path) -> None:
    _, mem = _both(tmp_path)
    signed = mem.authorize()
    out = _session(mem, signed, [as_query(mem.records[i]) for i in range(5)])
    assert out.receipt.disclosed == 5 and out.receipt.requester_signature
    add_signed_checkpoint(mem.ledger, mem.custodian_key)
    report = verify_ledger(mem.ledger, mem.custodian_key.public_key())
    assert report.ok and report.checkpoints_verified, report.summary()
    doc = custodian_export(mem.ledger, signed.authorization.authorization_id)
    assert doc["counts"] == {"evaluated": 5, "disclosed": 5, "reserved": 5, "sessions": 1,
                             "receipts": 1, "aggregate_releases": 0}
    assert doc["receipts"][0]["requester_signature"] == out.receipt.requester_signature.hex()


# --------------------------------------------------------------------------------------------
# Contract tests, run against both ledgers
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "memory"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerPort]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    with Ledger(tmp_path / "ledger.sqlite") as led:
        yield led


def _open(ledger: LedgerPort, auth_id: str, session_id: str, n: int = 10) -> None:
    ledger.reserve(auth_id, session_id, n)
    ledger.open_session(auth_id, session_id, {"peer": "agency-a"})


def test_disclosures_report_repeats(ledger: LedgerPort) -> None:
    ledger.ensure_authorization("auth-1", max_evaluations=100, max_disclosures=3,
                                not_after=NOT_AFTER)
    _open(ledger, "auth-1", "s1")
    _open(ledger, "auth-1", "s2")
    rows = ledger.record_disclosures("auth-1", "s1", [("r1", "tin+dob"), ("r1", "tin+zip"),
                                                      ("r2", "tin+dob")])
    assert [(r.record_id, r.repeat) for r in rows] == [("r1", False), ("r1", True),
                                                       ("r2", False)]
    again = ledger.record_disclosure("auth-1", "s2", "r2", "tin+zip")
    # The batch answer for a repeat is the record's original row, flagged.
    assert (again.session_id, again.rule_id, again.repeat) == ("s1", "tin+dob", True)
    ledger.record_disclosure("auth-1", "s2", "r3", "tin+dob")
    with pytest.raises(DisclosureCapReached):
        ledger.record_disclosures("auth-1", "s2", [("r1", "tin+dob"), ("r4", "tin+dob")])
    # The listing names each release: who replayed it, under which rule, in recording order
    # (batch by batch; within one batch, which shares one entry and time, firsts first).
    events = ledger.disclosures("auth-1", include_repeats=True)
    assert [(d.session_id, d.record_id, d.rule_id, d.repeat) for d in events] == [
        ("s1", "r1", "tin+dob", False),
        ("s1", "r2", "tin+dob", False),
        ("s1", "r1", "tin+zip", True),
        ("s2", "r2", "tin+zip", True),
        ("s2", "r3", "tin+dob", False),
    ]
    # By default one row per disclosed record: what counts against the cap.
    assert [(d.session_id, d.record_id, d.repeat) for d in ledger.disclosures("auth-1")] == [
        ("s1", "r1", False), ("s1", "r2", False), ("s2", "r3", False)]
    assert ledger.budget("auth-1").disclosed == 3


def test_disclosed_count_per_session(ledger: LedgerPort) -> None:
    for auth_id in ("auth-1", "auth-2"):
        ledger.ensure_authorization(auth_id, max_evaluations=100, max_disclosures=10,
                                    not_after=NOT_AFTER)
    _open(ledger, "auth-1", "s1")
    _open(ledger, "auth-1", "s2")
    _open(ledger, "auth-2", "s3")
    assert ledger.disclosed_count("auth-1", "s1") == 0
    ledger.record_disclosures("auth-1", "s1", [("r1", "a"), ("r2", "a"), ("r1", "b")])
    ledger.record_disclosures("auth-1", "s2", [("r2", "b"), ("r3", "a")])  # r2 repeats
    ledger.record_disclosures("auth-2", "s3", [("r1", "a")])  # another authorization
    counts = {(a, s): ledger.disclosed_count(a, s)
              for a, s in (("auth-1", "s1"), ("auth-1", "s2"), ("auth-2", "s3"),
                           ("auth-2", "s1"))}
    assert counts == {("auth-1", "s1"): 2, ("auth-1", "s2"): 1, ("auth-2", "s3"): 1,
                      ("auth-2", "s1"): 0}
    # It is what the sessions computed by scanning every row before.
    for a, s in counts:
        assert counts[(a, s)] == sum(1 for row in ledger.disclosures(a, include_repeats=True)
                                     if row.session_id == s and not row.repeat)


def test_refusals_change_nothing(ledger: LedgerPort) -> None:
    ledger.ensure_authorization("auth-1", max_evaluations=10, max_disclosures=1,
                                not_after=NOT_AFTER)
    _open(ledger, "auth-1", "s1", n=8)
    before = ledger.audit_head()
    with pytest.raises(BudgetExhausted):
        ledger.reserve("auth-1", "s2", 3)
    with pytest.raises(BudgetExhausted):
        ledger.record_evaluation("auth-1", "s1", 9)
    with pytest.raises(DisclosureCapReached):
        ledger.record_disclosures("auth-1", "s1", [("r1", "a"), ("r2", "a")])
    with pytest.raises(LedgerError, match="different limits"):
        ledger.ensure_authorization("auth-1", max_evaluations=11, max_disclosures=1,
                                    not_after=NOT_AFTER)
    assert ledger.audit_head() == before
    assert ledger.budget("auth-1") == Budget(10, 8, 0, 2, 1, 0)
    assert ledger.disclosures("auth-1", include_repeats=True) == []
    assert chain.verify_chain(ledger.stored_entries()).ok


def test_sqlite_disclosed_count_uses_an_index(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as led:
        plan = led._db.connection().execute(
            "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM disclosures "
            "WHERE session_id = ? AND auth_id = ?", ("s", "a")).fetchall()
    assert any("disclosures_by_session" in str(step) for step in plan), plan


def test_repeats_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as led:
        led.ensure_authorization("a", max_evaluations=5, max_disclosures=5, not_after=NOT_AFTER)
        _open(led, "a", "s1", n=1)
        led.record_disclosures("a", "s1", [("r1", "x"), ("r1", "y")])
    with Ledger(path) as led:
        assert [d.repeat for d in led.disclosures("a", include_repeats=True)] == [False, True]
        assert led.disclosed_count("a", "s1") == 1


def test_checkpoint_key_id_is_bound(ledger: LedgerPort) -> None:
    key = Ed25519PrivateKey.generate()
    cp = add_signed_checkpoint(ledger, key)
    assert ledger.checkpoints() == [cp]
    assert verify_ledger(ledger, key.public_key()).ok
    assert not verify_ledger(ledger, Ed25519PrivateKey.generate().public_key()).ok


def test_aggregate_releases_are_recorded_with_their_entry_or_not_at_all(
        ledger: LedgerPort) -> None:
    """Both ledgers: ``admit`` sees earlier releases; a refusal writes neither row nor entry."""
    ledger.ensure_authorization("auth-r", max_evaluations=10, max_disclosures=0,
                                not_after=NOT_AFTER)
    _open(ledger, "auth-r", "s-1", 1)
    _open(ledger, "auth-r", "s-2", 1)
    with pytest.raises(LedgerError):  # a release belongs to a session the ledger knows
        ledger.record_aggregate_release("auth-r", "s-none", "agency-a", b"", {}, lambda _: None)
    seen: list[int] = []

    def admit(earlier: Sequence[AggregateReleaseRow]) -> None:
        seen.append(len(earlier))

    first = ledger.record_aggregate_release("auth-r", "s-1", "agency-a", b"\x01" * 16,
                                            {"count": 1}, admit)
    head = ledger.audit_head()

    def refuse(earlier: Sequence[AggregateReleaseRow]) -> None:
        raise LedgerError("overlap")

    with pytest.raises(LedgerError):
        ledger.record_aggregate_release("auth-r", "s-2", "agency-a", b"\x02" * 16,
                                        {"count": 1}, refuse)
    assert ledger.audit_head() == head
    assert ledger.aggregate_releases("agency-a") == [first]
    assert ledger.aggregate_releases("agency-z") == [] and seen == [0]
    (entry,) = [e for e in ledger.audit_entries() if e.kind == "aggregate_release"]
    assert entry.seq == first.audit_seq
