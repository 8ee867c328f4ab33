"""Requester gRPC service: operators submit match jobs; the service runs them against a custodian.

Thin adapter: it validates the uploaded query file with ``protocol.domain.records``,
builds a ``RequesterSession`` and hands it to ``agency_a.client`` which moves
messages over mTLS to the custodian.  Results go only to the encrypted
``ResultStore``; reads require an operator and a purpose and are logged.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agency_a.client import (
    PendingSession,
    WireStats,
    finish_session,
    run_remote_aggregate,
    run_remote_session,
)
from agency_a.tagset_cache import CachedTagSet, TagSetCache
from proto import codec
from proto import service_kit as kit
from protocol.accounting.export import RECEIPT_AUDIT_KIND, record_receipt
from protocol.adapters import collector
from protocol.adapters.operators import MAX_OPERATOR_CHARS, OperatorRoster, operator_problem
from protocol.adapters.sqlite_ledger import Ledger
from protocol.domain.engine import Engine, IndexMode
from protocol.domain.messages import OpenRequest, Receipt
from protocol.domain.recordstore import load_query_csv
from protocol.engines import registry as engine_registry
from protocol.engines.named import TokenSet
from protocol.engines.oprf import EvaluationProofInvalid
from protocol.errors import InvalidRecordError, PolicyRefusal, ProtocolError, PSIError
from protocol.policy.decide import Reason, SignedAuthorization, Tier
from protocol.report.facts import UNRELEASED_COUNTS_KEY, pick_refusal_examples
from protocol.sessions.aggregate import AggregateRequesterSession
from protocol.sessions.core import MAX_SESSION_ID
from protocol.sessions.identity import GroupOps, Match, MatchResult, RequesterSession

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc
log = logging.getLogger("agency_a")

SERVICE_NAME = "gatedpsi.v1.Requester"
MAX_UPLOAD_BYTES = 1 << 30
MAX_REFUSALS_IN_STATUS = 1000
#: A job whose results are stored but whose receipt is not yet countersigned: its results
#: are readable and the receipt is retried (docs/architecture.md, Late failures).
RECEIPT_PENDING = "done_receipt_pending"
#: States whose results may be read.
#: An aggregate job of several rules that failed on a later rule: the job failed (with that
#: rule's refusal), but the rules answered before it are stored and readable
#: (docs/architecture.md, Aggregate and cardinality tiers).
ANSWERED_IN_PART = "failed_answered_in_part"
READABLE_STATES = ("done", RECEIPT_PENDING, ANSWERED_IN_PART)
FINISHED_STATES = ("done", RECEIPT_PENDING, "failed", ANSWERED_IN_PART)
#: Audit-chain kind (and log event) of an evaluation proof that failed to verify.
EVALUATION_PROOF_INVALID = EvaluationProofInvalid.code
#: Audit entry and log event of a report access (docs/architecture.md, Reports).
REPORT_AUDIT_KIND = "report_read"


@dataclass
class Job:
    """One match job and its event log (watchers replay it, then follow)."""

    job_id: str
    operator: str
    state: str = "queued"
    events: list[Any] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    summary: dict[str, Any] = field(default_factory=dict)
    error_code: str = ""
    error: str = ""
    #: When each phase was first reported (unix seconds): the report's timeline.
    phase_started: dict[str, float] = field(default_factory=dict)

    def emit(self, phase: str, done: int = 0, total: int = 0, message: str = "",
             summary: dict[str, Any] | None = None) -> None:
        self.phase_started.setdefault(phase, time.time())
        ev = pb2.JobEvent(job_id=self.job_id, phase=phase, done=done, total=total,
                          message=message,
                          summary_json=json.dumps(summary, default=str) if summary else "")
        with self.cond:
            self.events.append(ev)
            self.cond.notify_all()

    @property
    def finished(self) -> bool:
        """Ended, and its final event is in the log (watchers must not miss it)."""
        return (self.state in FINISHED_STATES and bool(self.events)
                and self.events[-1].phase in ("done", "failed"))


class RequesterService(kit.RequesterServicer):
    """The requester agency's operator-facing service."""

    def __init__(
        self,
        identity: str,
        client_tls: kit.TLSFiles,
        *,
        signing_key: Ed25519PrivateKey,
        operators: Iterable[str],
        store: Any,
        ops: GroupOps | None = None,
        custodian_keys: dict[str, Ed25519PublicKey] | None = None,
        chunk_size: int = 4096,
        audit: Ledger | None = None,
        aggregate_ops: Any = None,
        tagset_cache: Path | str | None = None,
    ) -> None:
        self.identity = identity
        #: Without a cache directory (an embedded service), a private one that is removed
        #: with the service or at exit; it once stayed behind in /tmp, one per service.
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if tagset_cache is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="gated-psi-tagsets-")
            tagset_cache = self._scratch.name
        #: key-epoch tag sets, fetched once per epoch (owner-only; engine oprf-epoch)
        self.tagsets = TagSetCache(tagset_cache)
        self.operators = operators if isinstance(operators, OperatorRoster) else OperatorRoster(
            operators)
        self.audit = audit
        self.aggregate_ops = aggregate_ops
        self.client_tls = client_tls
        self.signing_key = signing_key
        self.store = store
        self.ops = ops
        self.custodian_keys = custodian_keys or {}
        self.chunk_size = chunk_size
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._active: set[str] = set()  # identity jobs whose session runs in this process
        self._stop_retries = threading.Event()

    def _operator_peer(self, context: grpc.ServicerContext) -> str:
        """Only this agency's own operators (certificates for our agency id) may call."""
        peer = kit.peer_agency(context)
        if peer != self.identity:
            kit.abort(context, grpc.StatusCode.PERMISSION_DENIED,
                      f"requester_mismatch: {peer!r} is not an operator of {self.identity!r}")
        return peer

    def _operator(self, context: grpc.ServicerContext, operator: str, rpc: str) -> str:
        """The operator named in a request, if it is one of the configured roster.

        A malformed id is INVALID_ARGUMENT and an unknown one PERMISSION_DENIED, each with a
        specific reason; both refusals are logged (docs/architecture.md, Files and logs).
        """
        problem = operator_problem(operator)
        if problem is None and operator in self.operators:
            return operator
        shown = operator[:MAX_OPERATOR_CHARS] if isinstance(operator, str) else ""
        if problem is not None:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, f"invalid_operator: {problem}"
        else:
            code, message = (grpc.StatusCode.PERMISSION_DENIED,
                             f"unknown_operator: {shown!r} is not in this service's operator "
                             "roster")
        kit.log_event(log, "operator_refused", logging.WARNING, rpc=rpc, operator=shown,
                      status=code.name, reason=message)
        kit.abort(context, code, message)

    def _job(self, ref: Any, context: grpc.ServicerContext) -> Job:
        with self._lock:
            job = self.jobs.get(ref.job_id)
        if job is None and ref.job_id:
            job = self._stored_job(ref.job_id)
        if job is None:
            kit.abort(context, grpc.StatusCode.NOT_FOUND, f"unknown_job: {ref.job_id!r}")
        return job

    # -- RPCs --------------------------------------------------------------------

    def SubmitMatch(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        self._operator_peer(context)
        header = None
        parts: list[bytes] = []
        size = 0
        for chunk in request_iterator:
            which = chunk.WhichOneof("part")
            if which == "header":
                if header is not None:
                    kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              "malformed: more than one job header")
                header = chunk.header
                self._operator(context, header.operator, "SubmitMatch")  # before the upload
            elif which == "csv":
                if header is None:
                    kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              "malformed: query data before the job header")
                size += len(chunk.csv)
                if size > MAX_UPLOAD_BYTES:
                    kit.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"upload_too_large: query file exceeds {MAX_UPLOAD_BYTES} bytes")
                parts.append(chunk.csv)
        if header is None:
            kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed: no job header")
        try:
            signed = SignedAuthorization.from_bytes(header.signed_authorization)
        except ValueError as exc:
            kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed: authorization: {exc}")
        auth = signed.authorization
        if auth.requester_id != self.identity:
            kit.abort(context, grpc.StatusCode.PERMISSION_DENIED,
                      f"requester_mismatch: the authorization names {auth.requester_id!r}, "
                      f"this service is {self.identity!r}")
        try:
            data = io.BytesIO(b"".join(parts))
            parts.clear()
            stream = io.TextIOWrapper(data, encoding="utf-8-sig", newline="")
            accepted, refused, n_rows = load_query_csv(stream, today=date.today())
        except (UnicodeDecodeError, ValueError, InvalidRecordError) as exc:  # the client's file
            kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid_records: {exc}")
        del data, stream
        tokens = None
        if header.tokens:
            try:
                token_set = TokenSet.from_bytes(header.tokens)
            except PSIError as exc:
                kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed: tokens: {exc}")
            if token_set.authorization_id != auth.authorization_id:
                kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                          "malformed: the token file belongs to another authorization")
            tokens = token_set.lookup()
        job = Job(job_id=f"job-{uuid.uuid4().hex[:16]}", operator=header.operator)
        with self._lock:
            self.jobs[job.job_id] = job
        refused_by_reason = dict(Counter(str(r.code) for r in refused))
        job.summary = {
            "job_id": job.job_id, "authorization_id": auth.authorization_id,
            "queries_submitted": n_rows, "queries_accepted": len(accepted),
            "queries_refused": n_rows - len(accepted),
            "refused_by_reason": refused_by_reason,
            # for the job's report (docs/architecture.md, Reports)
            "authorization": auth.to_json(), "refused_examples": pick_refusal_examples(refused),
            "submitted_at": time.time(),
        }
        kit.log_event(log, "job_submitted", job=job.job_id, operator=header.operator,
                      authorization=auth.authorization_id, queries=n_rows,
                      accepted=len(accepted), refused=refused_by_reason)
        work = [accepted]  # handed over and cleared by the job thread, not kept alive here
        thread = threading.Thread(
            target=self._run_job, args=(job, signed, work, header, tokens), daemon=True,
            name=job.job_id,
        )
        thread.start()
        return pb2.JobStatus(
            job_id=job.job_id, state=job.state, queries=n_rows, accepted=len(accepted),
            refused=[pb2.RefusedRecord(record_id=r.record_id, line=r.line, code=str(r.code),
                                       detail=r.detail)
                     for r in refused[:MAX_REFUSALS_IN_STATUS]],
        )

    def _epoch_tagset(self, engine: str, signed: SignedAuthorization, header: Any,
                      stats: WireStats) -> CachedTagSet | None:
        """The custodian's epoch tag set for an engine that matches against one: from the
        cache, or fetched once per epoch (docs/architecture.md, National custodian)."""
        if engine_registry.get(engine).traits.index is not IndexMode.EPOCH:
            return None
        rules = tuple(header.match_rules) or signed.authorization.match_rules
        started = time.perf_counter()
        with kit.secure_channel(header.custodian_address, self.client_tls) as channel:
            tags, received = self.tagsets.fetch(channel, signed, rules)
        stats.add("tagset", down=received)
        stats.seconds["tagset"] = time.perf_counter() - started
        return tags

    def _run_job(self, job: Job, signed: SignedAuthorization, work: list[Any],
                 header: Any, tokens: dict[tuple[str, str], bytes] | None) -> None:
        """The job's thread: once its session's bulk data is built, the collector's full
        passes skip it until the job ends (docs/architecture.md, Long-lived bulk data)."""
        with ExitStack() as held:
            self._run(job, signed, work, header, tokens, held)

    def _run(self, job: Job, signed: SignedAuthorization, work: list[Any],
             header: Any, tokens: dict[tuple[str, str], bytes] | None,
             held: ExitStack) -> None:
        accepted = work.pop()
        job.state = "running"
        job.emit("validate", len(accepted), len(accepted), "query records validated")
        auth = signed.authorization
        started = time.perf_counter()
        try:
            if auth.tier is not Tier.IDENTITY:
                self._run_aggregate(job, signed, accepted, header, started)
                return
            engine = header.engine or Engine.OPRF.value
            stats = WireStats()
            epoch_tags = self._epoch_tagset(engine, signed, header, stats)
            session = RequesterSession(
                signed, accepted,
                match_rules=tuple(header.match_rules) or None,
                disclosure_fields=tuple(header.disclosure_fields) or None,
                ops=self.ops, chunk_size=self.chunk_size,
                session_id=header.session_id or None, signing_key=self.signing_key,
                custodian_key=self.custodian_keys.get(auth.custodian_id), tokens=tokens,
                engine=engine, tagset=epoch_tags,
            )
            del accepted  # the session keeps ids and match keys only
            held.enter_context(collector.hold())
            # session construction (match keys, cuckoo table): part of the timed job
            stats.seconds["prepare"] = time.perf_counter() - started
            # results are stored as each disclosure batch arrives (docs/architecture.md,
            # Late failures); a failure once the session is open leaves the job
            # done_receipt_pending, with its results readable and the receipt retried
            journal = JobJournal.begin(self.store, job, auth, session,
                                       header.custodian_address)
            with self._lock:
                self._active.add(job.job_id)
            try:
                with kit.secure_channel(header.custodian_address,
                                        self.client_tls) as channel:
                    outcome = run_remote_session(session, channel,
                                                 progress=self._progress(job), stats=stats,
                                                 journal=journal)
            except (grpc.RpcError, PSIError, OSError, ValueError) as exc:
                if isinstance(exc, EvaluationProofInvalid):
                    self._proof_invalid(job, journal, session, exc)
                    raise
                if not journal.data["opened"]:
                    journal.save("failed")
                    raise
                self._receipt_pending(job, journal, exc)
                return
            finally:
                with self._lock:
                    self._active.discard(job.job_id)
            stored = time.perf_counter()
            if self.audit is not None:
                # both signatures, kept on the requester's own hash-chained ledger
                record_receipt(self.audit, outcome.receipt)
            stats.seconds["store"] = time.perf_counter() - stored
            by_rule = Counter(m.rule_id for m in outcome.matches)
            fields_disclosed = Counter(f for r in outcome.results for f in r.fields)
            holders = Counter((r.query_record_id, r.rule_id) for r in outcome.results)
            job.summary.update({
                "session_id": session.session_id,
                "custodian_id": auth.custodian_id,
                "verifiable_evaluation": auth.evaluation_key is not None,
                "evaluation_proofs_verified": session.evaluation_proofs_verified,
                "elements_evaluated": session.element_count,
                "queries_without_usable_key": session.queries_without_key,
                "mode": auth.mode.value,
                "engine": session.engine,
                "custodian_tags": session.open_response.tag_count if session.open_response else 0,
                "matches": len(outcome.matches),
                "matched_queries": len({m.query_record_id for m in outcome.matches}),
                "matches_by_rule": dict(by_rule),
                "disclosed_records": len({r.pseudonym for r in outcome.results}),
                "disclosure_rows": len(outcome.results),
                # one query's key held by several custodian records (docs/architecture.md,
                # Shared keys): each was disclosed; the operator is told to review them
                "matches_held_by_several_records": sum(n > 1 for n in holders.values()),
                # entries, not tags: an engine may send several tags per entry (KKRT: 3)
                "custodian_records_in_scope": (session.custodian_entries
                                               // max(len(session.rules), 1)),
                "disclosures_rejected": outcome.rejected,
                "disclosures_rejected_by_reason": dict(session.rejected_reasons),
                "corroboration": auth.corroboration,
                "matches_withheld_uncorroborated": session.withheld_uncorroborated,
                **self._cap_summary(auth, session.session_id,
                                    len({r.pseudonym for r in outcome.results}),
                                    # with reasons (corroborated sessions), only the cap's
                                    session.rejected_reasons["disclosure_cap_reached"]
                                    if session.rejected_reasons else outcome.rejected),
                "fields_disclosed": dict(fields_disclosed),
                "receipt": outcome.receipt.to_json(),
                "receipt_pending": False,
                "bytes_a_to_b": sum(stats.a_to_b.values()),
                "bytes_b_to_a": sum(stats.b_to_a.values()),
                "phase_bytes_b_to_a": dict(stats.b_to_a),
                "phase_seconds": {k: round(v, 3) for k, v in stats.seconds.items()},
                "wall_seconds": round(time.perf_counter() - started, 3),
                "results_retention_days": auth.retention_days,
                "phase_started_at": dict(job.phase_started), "finished_at": time.time(),
            })
            job.state = "done"
            journal.save("done")
            # field names as the custodian's: records counted once, rows per (record, rule)
            kit.log_event(log, "job_done", job=job.job_id, matches=len(outcome.matches),
                          disclosed_records=job.summary["disclosed_records"],
                          result_rows=len(outcome.results))
            job.emit("done", 1, 1, "match complete", summary=job.summary)
        except grpc.RpcError as exc:
            job.state = "failed"
            job.error_code, job.error = _failure_status(exc, otherwise="INTERNAL")
            kit.log_event(log, "job_failed", logging.WARNING, job=job.job_id,
                          status=job.error_code, reason=job.error)
            job.emit("failed", 0, 0, f"{job.error_code}: {job.error}", summary=job.summary)
        except (PSIError, OSError, ValueError) as exc:
            job.state = "failed"
            job.error_code, job.error = _failure_status(exc, otherwise="INTERNAL")
            kit.log_event(log, "job_failed", logging.WARNING, job=job.job_id, reason=job.error)
            job.emit("failed", 0, 0, f"{job.error_code}: {job.error}", summary=job.summary)

    # -- late failures (docs/architecture.md, Late failures) -------------------------

    def _stored_job(self, job_id: str) -> Job | None:
        """A job of an earlier run of this service, from its stored state (None if unknown)."""
        found = self.store.job_states(job_id)
        if not found:
            return None
        _, state, data = found[0]
        job = Job(job_id=job_id, operator=str(data.get("operator", "")),
                  state=RECEIPT_PENDING if state == "running" else state,
                  summary=dict(data.get("summary") or {}))
        with self._lock:
            known = self.jobs.get(job_id)
            if known is not None:
                return known
            self.jobs[job_id] = job
        # watchers of a job from an earlier run see where it stands
        job.emit("failed" if job.state == "failed" else "done", 1, 1,
                 f"job {job.state} (from an earlier run)", summary=job.summary)
        return job

    def _proof_invalid(self, job: Job, journal: JobJournal, session: RequesterSession,
                       exc: EvaluationProofInvalid) -> None:
        """A chunk's evaluation proof failed: the session is aborted, nothing of that chunk
        was finalized, and the failure goes into the audit chain, the journal and the summary
        (docs/architecture.md, Verifiable evaluation).  No receipt is sought: the custodian
        broke the protocol, so the job fails rather than waiting for one."""
        auth = session.signed.authorization
        event = {"session_id": session.session_id,
                 "authorization_id": auth.authorization_id,
                 "custodian_id": auth.custodian_id,
                 "evaluation_key": (auth.evaluation_key or b"").hex(),
                 "proofs_verified_before": session.evaluation_proofs_verified,
                 "reason": kit.error_message(exc)}
        if self.audit is not None:
            self.audit.audit(EVALUATION_PROOF_INVALID, event)
        job.summary.update({"session_id": session.session_id, "verifiable_evaluation": True,
                            "evaluation_proofs_verified": session.evaluation_proofs_verified,
                            "evaluation_proof_invalid": event["reason"]})
        journal.save("failed")
        kit.log_event(log, EVALUATION_PROOF_INVALID, logging.WARNING, job=job.job_id,
                      session=session.session_id, reason=event["reason"])

    def _receipt_pending(self, job: Job, journal: JobJournal, exc: BaseException) -> None:
        """The session failed after it opened: its results stay readable, the receipt waits."""
        code, reason = _failure_status(exc, otherwise="UNAVAILABLE")
        job.error_code, job.error = code, reason
        job.summary.update(journal.summary_counts())
        job.summary.update({"receipt_pending": True, "receipt_error": f"{code}: {reason}"})
        job.state = RECEIPT_PENDING
        journal.save(RECEIPT_PENDING)
        kit.log_event(log, "job_receipt_pending", logging.WARNING, job=job.job_id,
                      status=code, reason=reason, result_rows=journal.data["result_rows"])
        job.emit("done", 1, 1, f"results stored; receipt pending ({code}: {reason})",
                 summary=job.summary)

    def _receipt_recorded(self, session_id: str) -> bool:
        assert self.audit is not None
        return any(entry.kind == RECEIPT_AUDIT_KIND
                   and entry.payload.get("session_id") == session_id
                   for entry in self.audit.audit_entries())

    def _cap_summary(self, auth: Any, session_id: str, disclosed_records: int,
                     rejected: int) -> dict[str, Any]:
        """Whether the disclosure cap withheld disclosures, said in the summary.

        An honest requester's proofs always verify, so a rejection once this and earlier
        sessions' disclosures (its own receipts) reach the cap is the cap withholding.
        """
        earlier = 0
        if self.audit is not None:
            for entry in self.audit.audit_entries():
                payload = entry.payload
                if (entry.kind == RECEIPT_AUDIT_KIND
                        and payload.get("authorization_id") == auth.authorization_id
                        and payload.get("session_id") != session_id):
                    earlier += int(payload.get("disclosed", 0))
        reached = rejected > 0 and earlier + disclosed_records >= auth.max_disclosures
        return {"disclosure_cap": auth.max_disclosures, "disclosure_cap_reached": reached,
                "disclosures_withheld_by_cap": rejected if reached else 0}

    def retry_pending(self) -> int:
        """Finish every stored job whose receipt is pending (or whose run was interrupted).

        Run at start-up and periodically (``start_receipt_retries``); returns how many
        jobs reached ``done``.  A job still failing stays pending with its last error.
        """
        done = 0
        for job_id, state, data in self.store.job_states():
            if state not in ("running", RECEIPT_PENDING):
                continue
            with self._lock:
                if job_id in self._active:
                    continue  # its session is running in this process
                self._active.add(job_id)
            try:
                done += self._finish_pending(job_id, state, data)
            finally:
                with self._lock:
                    self._active.discard(job_id)
        return done

    def _finish_pending(self, job_id: str, state: str, data: dict[str, Any]) -> int:
        job = self._stored_job(job_id)
        assert job is not None  # its state was just read
        journal = JobJournal(self.store, job, data)
        if not data["opened"]:
            # interrupted before the custodian answered open: nothing was evaluated or
            # disclosed under a session this job knows of
            job.state, job.error_code = "failed", "ABORTED"
            job.error = "interrupted before the session opened; nothing was disclosed"
            journal.save("failed")
            job.emit("failed", 0, 0, f"{job.error_code}: {job.error}")
            return 0
        custodian_key = (Ed25519PublicKey.from_public_bytes(bytes.fromhex(data["custodian_key"]))
                         if data["custodian_key"] else None)
        try:
            with kit.secure_channel(data["custodian_address"], self.client_tls) as channel:
                receipt, rejected = finish_session(
                    journal.pending(), channel, signing_key=self.signing_key,
                    custodian_key=custodian_key or self.custodian_keys.get(
                        data["custodian_id"]), journal=journal)
        except (grpc.RpcError, PSIError, OSError, ValueError) as exc:
            self._receipt_pending(job, journal, exc)
            return 0
        if self.audit is not None and not self._receipt_recorded(receipt.session_id):
            # (a run that died after recording it, before marking the job done, did)
            record_receipt(self.audit, receipt)
        counts = journal.summary_counts()
        job.summary.update(counts)
        job.summary.update({
            "receipt": receipt.to_json(), "receipt_pending": False, "receipt_error": "",
            **self._cap_summary(_Limits(data["authorization_id"], data["max_disclosures"]),
                                receipt.session_id, counts["disclosed_records"],
                                data["rejected"]),
        })
        job.state = "done"
        journal.save("done")
        kit.log_event(log, "job_receipt_retried", job=job_id, was=state,
                      result_rows=data["result_rows"], rejected_on_retry=rejected)
        job.emit("done", 1, 1, "receipt countersigned", summary=job.summary)
        return 1

    def start_receipt_retries(self, interval_s: float) -> threading.Thread:
        """Retry pending receipts now and every ``interval_s`` seconds, on a daemon thread."""
        def loop() -> None:
            while True:
                try:
                    self.retry_pending()
                except Exception:  # keep retrying on the next tick; the failure is logged
                    log.exception("receipt retry failed; next attempt in %.0f s", interval_s)
                if self._stop_retries.wait(interval_s):
                    return

        self._stop_retries.clear()
        thread = threading.Thread(target=loop, name="receipt-retries", daemon=True)
        thread.start()
        return thread

    def stop_receipt_retries(self) -> None:
        self._stop_retries.set()

    def _progress(self, job: Job) -> Any:
        last: dict[str, float] = {}

        def progress(phase: str, done: int, total: int) -> None:
            now = time.monotonic()
            if done >= total or now - last.get(phase, 0.0) > 0.2:
                last[phase] = now
                job.emit(phase, done, total)

        return progress

    def _run_aggregate(self, job: Job, signed: SignedAuthorization, accepted: Any,
                       header: Any, started: float) -> None:
        """Aggregate / cardinality tier: the requester learns a count (and a sum), no one.

        One session per rule of the job (the header's rules, else the authorization's), in
        order, over one mTLS channel: ``psi-authority issue`` prices these tiers as one
        session per permitted rule, so a job that ran only the first would pay for answers it
        never received (docs/architecture.md, Aggregate and cardinality tiers).  Each answered
        rule's row (and receipt) is stored as soon as it is released, so a later rule's
        failure loses nothing already disclosed; the job then fails with that rule's refusal
        and names the rules it answered.
        """
        auth = signed.authorization
        rules = list(dict.fromkeys(tuple(header.match_rules) or auth.match_rules))
        outside = [r for r in rules if r not in auth.match_rules]
        if outside:  # the custodian would refuse it at its open, after earlier rules spent
            raise PolicyRefusal(
                f"the job names rule(s) {', '.join(outside)} that the authorization does not "
                f"permit ({', '.join(auth.match_rules)}); no session was run",
                reasons=(Reason.RULE_NOT_PERMITTED.value,))
        session_ids = _aggregate_session_ids(header.session_id, len(rules))
        answered: list[dict[str, Any]] = []
        stats = WireStats()
        job.summary["tier"] = auth.tier.value
        pending: Any = accepted  # dropped once the last rule's session holds its keys
        del accepted
        with kit.secure_channel(header.custodian_address, self.client_tls) as channel:
            for index, rule in enumerate(rules):
                try:
                    session = AggregateRequesterSession(
                        signed, pending, match_rule=rule, ops=self.aggregate_ops,
                        session_id=session_ids[index], signing_key=self.signing_key,
                        custodian_key=self.custodian_keys.get(auth.custodian_id))
                    if index == len(rules) - 1:
                        pending = None  # the sessions keep distinct match keys only
                    with collector.hold():  # the session's keys and elements are built
                        self._aggregate_rule(job, signed, session, channel, stats, answered)
                except (grpc.RpcError, PSIError, OSError, ValueError) as exc:
                    if not answered:
                        raise  # nothing released: the job fails as any other
                    self._aggregate_answered_in_part(job, rules, answered, rule, exc, stats,
                                                     started)
                    return
        self._aggregate_summary(job, rules, answered, stats, started)
        job.state = "done"
        kit.log_event(log, "job_done", job=job.job_id, tier=auth.tier.value,
                      count=answered[0]["count"], withheld=answered[0]["withheld"],
                      count_by_rule={a["rule"]: a["count"] for a in answered})
        job.emit("done", 1, 1, "aggregate complete", summary=job.summary)

    def _aggregate_rule(self, job: Job, signed: SignedAuthorization,
                        session: AggregateRequesterSession, channel: grpc.Channel,
                        stats: WireStats, answered: list[dict[str, Any]]) -> None:
        """Run one rule's session; store its answer as soon as the custodian released it.

        A failure after the release (the close, say) still stores the answer, without a
        receipt, before it propagates: what left the custodian is not lost.
        """
        auth = signed.authorization
        rule_stats = WireStats()
        receipt: Receipt | None = None
        try:
            outcome = run_remote_aggregate(session, channel, progress=self._progress(job),
                                           stats=rule_stats)
            receipt = outcome.receipt
        finally:
            for phase, up in rule_stats.a_to_b.items():
                stats.add(phase, up, rule_stats.b_to_a.get(phase, 0))
            for phase, seconds in rule_stats.seconds.items():
                stats.seconds[phase] = stats.seconds.get(phase, 0.0) + seconds
            result = session.result
            if result is None and session.challenge is not None:
                # The custodian announced the count in its match challenge and then refused
                # (or failed) the release: the requester has learned that count, so the job
                # says so rather than read as if nothing were learned.
                job.summary.setdefault(UNRELEASED_COUNTS_KEY, {})[session.match_rule] = (
                    session.count)
                kit.log_event(log, "aggregate_count_not_released", logging.WARNING,
                              job=job.job_id, rule=session.match_rule, count=session.count)
            if result is not None:
                row = {"query_record_id": "", "rule_id": session.match_rule,
                       "pseudonym": f"{result.tier}",
                       "fields": {"count": str(result.count),
                                  "sum": "" if result.sum is None else str(result.sum),
                                  "withheld": str(result.withheld).lower()}}
                if answered:
                    self.store.append_results(job.job_id, [row], operator=job.operator)
                else:
                    self.store.put_results(job.job_id, auth.authorization_id,
                                           auth.retention_days, [row], operator=job.operator)
                if receipt is not None and self.audit is not None:
                    record_receipt(self.audit, receipt)
                answered.append({
                    "rule": session.match_rule, "count": result.count, "sum": result.sum,
                    "withheld": result.withheld, "reason": result.reason,
                    "elements": result.elements,
                    "custodian_elements": result.custodian_elements,
                    "session_id": session.session_id,
                    "receipt": None if receipt is None else receipt.to_json(),
                })

    def _aggregate_summary(self, job: Job, rules: Sequence[str],
                           answered: Sequence[dict[str, Any]], stats: WireStats,
                           started: float) -> None:
        """The job summary: every answered rule in ``aggregate_by_rule``; the top-level keys
        of one-rule jobs (``match_rule``, ``aggregate_count``, ...) carry the first rule's
        answer, so their readers keep working.  Counts of several rules are never added up:
        one person can match under several rules."""
        first = answered[0]
        job.summary.update({
            "match_rule": first["rule"], "aggregate_count": first["count"],
            "aggregate_sum": first["sum"], "aggregate_withheld": first["withheld"],
            "aggregate_reason": first["reason"],
            "aggregate_by_rule": list(answered),
            "aggregate_rules": list(rules),
            "aggregate_rules_answered": [a["rule"] for a in answered],
            "aggregate_rules_unanswered": [r for r in rules
                                           if r not in {a["rule"] for a in answered}],
            "elements_evaluated": sum(a["elements"] for a in answered),
            "custodian_elements": first["custodian_elements"],
            "receipt": first["receipt"],
            "bytes_a_to_b": sum(stats.a_to_b.values()),
            "bytes_b_to_a": sum(stats.b_to_a.values()),
            "phase_seconds": {k: round(v, 3) for k, v in stats.seconds.items()},
            "wall_seconds": round(time.perf_counter() - started, 3),
            "phase_started_at": dict(job.phase_started), "finished_at": time.time(),
        })

    def _aggregate_answered_in_part(self, job: Job, rules: Sequence[str],
                                    answered: Sequence[dict[str, Any]], rule: str,
                                    exc: BaseException, stats: WireStats,
                                    started: float) -> None:
        """A later rule failed after earlier ones were answered: the job fails with that
        rule's own refusal, and its answered rules stay stored and readable."""
        code, reason = _failure_status(exc, otherwise="INTERNAL")
        self._aggregate_summary(job, rules, answered, stats, started)
        done = ", ".join(f"{a['rule']} (count {a['count']:,})" for a in answered)
        unanswered = job.summary["aggregate_rules_unanswered"]
        where = (f"rule {rule}, after its answer was released and stored; its receipt is "
                 "missing" if answered[-1]["rule"] == rule else f"rule {rule}")
        job.summary["aggregate_failed_rule"] = rule
        job.summary["aggregate_failure"] = f"{code}: {reason}"  # the report quotes it
        job.error_code, job.error = code, reason
        job.state = ANSWERED_IN_PART
        kit.log_event(log, "job_failed", logging.WARNING, job=job.job_id, status=code,
                      reason=reason, failed_rule=rule,
                      rules_answered=job.summary["aggregate_rules_answered"])
        job.emit("failed", 0, 0,
                 f"{code}: {reason} ({where}); answered and stored (readable with agency-a "
                 f"results): {done}; not answered: {', '.join(unanswered) or 'none'}",
                 summary=job.summary)

    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._operator_peer(context)
        self._operator(context, request.operator, "WatchJob")
        job = self._job(request, context)
        sent = 0
        while context.is_active():
            with job.cond:
                while sent >= len(job.events) and not job.finished:
                    job.cond.wait(timeout=1.0)
                    if not context.is_active():
                        return
                pending = job.events[sent:]
                finished = job.finished
            yield from pending
            sent += len(pending)
            if finished and sent >= len(job.events):
                return

    def GetResults(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._operator_peer(context)
        self._operator(context, request.operator, "GetResults")
        job = self._job(request, context)
        if job.state not in READABLE_STATES:
            kit.abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                      f"job_not_done: job is {job.state}")
        if not request.purpose.strip():
            kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      "malformed: reading results requires a purpose (not blank)")
        rows = self.store.read_results(job.job_id, operator=request.operator,
                                       purpose=request.purpose)
        # also on the requester's audit chain (the store's read entry); here for operators
        kit.log_event(log, "results_read", job=job.job_id, operator=request.operator,
                      purpose=request.purpose, result_rows=len(rows))
        for row in rows:
            yield _result_row(row)

    def GetReport(self, request: Any, context: grpc.ServicerContext) -> Any:
        """A finished job's summary for its report; an access like a results read.

        Operator (on the roster) and purpose are required and the access is logged; the
        disclosed rows are read only when asked, through the store (on the audit chain).
        """
        self._operator_peer(context)
        self._operator(context, request.operator, "GetReport")
        job = self._job(request, context)
        if job.state not in READABLE_STATES:
            kit.abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                      f"job_not_done: job is {job.state}; a report needs a finished match")
        if not request.purpose.strip():
            kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      "malformed: a report requires a purpose (not blank)")
        rows = (self.store.read_results(job.job_id, operator=request.operator,
                                        purpose=request.purpose)
                if request.include_rows else [])
        access = {"job_id": job.job_id, "operator": request.operator,
                  "purpose": request.purpose, "include_rows": request.include_rows,
                  "result_rows": len(rows)}
        if self.audit is not None:  # who saw the job's account, and why, on the chain
            self.audit.audit(REPORT_AUDIT_KIND, {
                "authorization_id": job.summary.get("authorization_id"), **access})
        kit.log_event(log, REPORT_AUDIT_KIND, **access)
        summary = {"phase_started_at": dict(job.phase_started), **job.summary}
        return pb2.JobReport(summary_json=json.dumps(summary, default=str),
                             rows=[_result_row(r) for r in rows])

    def PurgeResults(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._operator_peer(context)
        self._operator(context, request.operator, "PurgeResults")
        job = self._job(request, context)
        n = self.store.purge_job(job.job_id, operator=request.operator,
                                 reason=request.purpose if request.purpose.strip()
                                 else "operator request")
        kit.log_event(log, "results_purged", job=job.job_id, operator=request.operator,
                      result_rows=n)
        return pb2.PurgeAck(purged=n)


def _failure_status(exc: BaseException, *, otherwise: str) -> tuple[str, str]:
    """(gRPC status name, reason) a failed job reports: the peer's own status and details
    for an RPC error, FAILED_PRECONDITION for a protocol or policy error, else
    ``otherwise`` (INTERNAL for a local fault; UNAVAILABLE where the receipt is retried)."""
    if isinstance(exc, grpc.RpcError):
        return exc.code().name, exc.details() or ""
    return ("FAILED_PRECONDITION" if isinstance(exc, PSIError) else otherwise,
            kit.error_message(exc))


def _aggregate_session_ids(base: str, rules: int) -> list[str | None]:
    """Session ids of an aggregate job's sessions, one per rule.

    No id given: each session draws its own.  One rule: the id as given (unchanged).  Several:
    ``<id>-<n>``, since an aggregate session id is never reopened (the custodian refuses a
    repeat as ``session_id_unavailable``); refused here, before any session, if that would
    exceed the custodian's limit.
    """
    if not base:
        return [None] * rules
    if rules == 1:
        return [base]
    ids: list[str | None] = [f"{base}-{n}" for n in range(1, rules + 1)]
    longest = max(len(i or "") for i in ids)
    if longest > MAX_SESSION_ID:
        raise ProtocolError(f"session id {base[:32]!r}...: with one session per rule "
                         f"(<id>-<n>) it would have {longest} characters; the limit is "
                         f"{MAX_SESSION_ID}")
    return ids


def _result_row(row: dict[str, Any]) -> Any:
    """One stored result row as the operator sees it (GetResults, GetReport)."""
    return pb2.ResultRow(
        query_record_id=row["query_record_id"], rule_id=row["rule_id"],
        pseudonym=row["pseudonym"],
        fields=[pb2.Field(name=k, value=v) for k, v in row["fields"].items()],
    )


@dataclass(frozen=True)
class _Limits:
    """The authorization fields a recovered job's summary needs."""

    authorization_id: str
    max_disclosures: int


class JobJournal:
    """One identity job made durable as it runs (``agency_a.client.Journal``).

    Results are appended to the encrypted store as each disclosure batch arrives, in the
    same transaction as the job's sealed recovery state (session, proofs, answered
    batches, close hash, receipt), so a restart can finish the job with nothing lost.
    """

    def __init__(self, store: Any, job: Job, data: dict[str, Any]) -> None:
        self.store = store
        self.job = job
        self.data = data
        if isinstance(data.get("matches"), list):  # read back from the store: freeze it
            data["matches"] = tuple(tuple(m) for m in data["matches"])

    @classmethod
    def begin(cls, store: Any, job: Job, auth: Any, session: RequesterSession,
              custodian_address: str) -> JobJournal:
        """Store the (empty) job and what is needed to resume its session."""
        req = OpenRequest(
            session_id=session.session_id, signed_authorization=session.signed.to_bytes(),
            tier=Tier.IDENTITY.value, match_rules=session.rules,
            disclosure_fields=session.fields, element_count=session.element_count,
            engine=session.engine)
        data: dict[str, Any] = {
            "operator": job.operator, "authorization_id": auth.authorization_id,
            "max_disclosures": auth.max_disclosures, "custodian_id": auth.custodian_id,
            "custodian_address": custodian_address,
            "open_request": {
                "session_id": req.session_id,
                "signed_authorization": req.signed_authorization.hex(), "tier": req.tier,
                "match_rules": list(req.match_rules),
                "disclosure_fields": list(req.disclosure_fields),
                "element_count": req.element_count, "engine": req.engine},
            "opened": False, "custodian_key": "", "matches": None, "answered": [],
            "result_rows": 0, "pseudonyms": [], "rejected": 0, "close_hash": "",
            "receipt": None, "summary": job.summary,
        }
        store.put_results(job.job_id, auth.authorization_id, auth.retention_days, [],
                          operator=job.operator)
        journal = cls(store, job, data)
        journal.save("running")
        return journal

    def save(self, state: str) -> None:
        self.data["summary"] = self.job.summary
        self.store.save_job_state(self.job.job_id, state, self.data)

    def pending(self) -> PendingSession:
        """What ``finish_session`` needs, from the stored state."""
        o = self.data["open_request"]
        req = OpenRequest(
            session_id=o["session_id"],
            signed_authorization=bytes.fromhex(o["signed_authorization"]), tier=o["tier"],
            match_rules=tuple(o["match_rules"]), disclosure_fields=tuple(o["disclosure_fields"]),
            element_count=o["element_count"], engine=o["engine"])
        matches = self.data["matches"]
        return PendingSession(
            open_request=req,
            matches=None if matches is None else tuple(
                (q, r, bytes.fromhex(proof)) for q, r, proof in matches),
            answered=frozenset(i for start, stop in self.data["answered"]
                               for i in range(start, stop)),
            close_hash=bytes.fromhex(self.data["close_hash"]) or None,
            receipt=(Receipt.from_json(self.data["receipt"]) if self.data["receipt"]
                     else None))

    def summary_counts(self) -> dict[str, Any]:
        d = self.data
        return {"session_id": d["open_request"]["session_id"],
                "match_completed": d["matches"] is not None,
                "matches": 0 if d["matches"] is None else len(d["matches"]),
                "disclosure_rows": d["result_rows"],
                "disclosed_records": len(set(d["pseudonyms"])),
                "disclosures_rejected": d["rejected"]}

    # -- agency_a.client.Journal ------------------------------------------------------

    def opened(self, custodian_key: Ed25519PublicKey | None) -> None:
        self.data["opened"] = True
        if custodian_key is not None:
            self.data["custodian_key"] = custodian_key.public_bytes(
                Encoding.Raw, PublicFormat.Raw).hex()
        self.save("running")

    def matched(self, matches: Sequence[Match]) -> None:
        # a tuple of tuples: the store seals it once, not again with every batch's state
        self.data["matches"] = tuple((m.query_record_id, m.rule_id, m.output.hex())
                                     for m in matches)
        self.save("running")

    def disclosed(self, answered: Sequence[int], results: Sequence[MatchResult],
                  rejected: int) -> None:
        spans: list[list[int]] = self.data["answered"]
        for i in answered:  # kept as [start, stop) runs
            if spans and spans[-1][1] == i:
                spans[-1][1] = i + 1
            else:
                spans.append([i, i + 1])
        self.data["result_rows"] += len(results)
        self.data["pseudonyms"].extend(r.pseudonym for r in results)
        self.data["rejected"] += rejected
        rows = [{"query_record_id": r.query_record_id, "rule_id": r.rule_id,
                 "pseudonym": r.pseudonym, "fields": dict(r.fields)} for r in results]
        self.data["summary"] = self.job.summary
        self.store.append_results(self.job.job_id, rows, operator=self.job.operator,
                                  job_state=("running", self.data))

    def closing(self, transcript_hash: bytes) -> None:
        self.data["close_hash"] = transcript_hash.hex()
        self.save("running")

    def receipt(self, receipt: Receipt) -> None:
        self.data["receipt"] = receipt.to_json()
        self.save("running")


def serve(service: RequesterService, tls: kit.TLSFiles, listen: str = "127.0.0.1:0",
          *, max_workers: int = 16) -> tuple[grpc.Server, int]:
    """Start the requester service; returns (server, port)."""
    server, port, _health = kit.build_server(
        [(codec.add_servicer("Requester"), service)], [SERVICE_NAME], tls, listen,
        max_workers=max_workers,
    )
    server.start()
    return server, port
