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
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agency_a.client import WireStats, run_remote_aggregate, run_remote_session
from proto import service_kit as kit
from protocol.accounting.export import record_receipt
from protocol.adapters.sqlite_ledger import Ledger
from protocol.domain.engine import Engine
from protocol.domain.recordstore import load_query_csv
from protocol.engines.named import TokenSet
from protocol.errors import PSIError
from protocol.policy.decide import SignedAuthorization, Tier
from protocol.sessions.aggregate import AggregateRequesterSession
from protocol.sessions.identity import GroupOps, RequesterSession

pb2, pb2_grpc = kit.pb2, kit.pb2_grpc
log = logging.getLogger("agency_a")

SERVICE_NAME = "gatedpsi.v1.Requester"
MAX_UPLOAD_BYTES = 1 << 30
MAX_REFUSALS_IN_STATUS = 1000


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

    def emit(self, phase: str, done: int = 0, total: int = 0, message: str = "",
             summary: dict[str, Any] | None = None) -> None:
        ev = pb2.JobEvent(job_id=self.job_id, phase=phase, done=done, total=total,
                          message=message,
                          summary_json=json.dumps(summary, default=str) if summary else "")
        with self.cond:
            self.events.append(ev)
            self.cond.notify_all()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")


class RequesterService(kit.RequesterServicer):
    """The requester agency's operator-facing service."""

    def __init__(
        self,
        identity: str,
        client_tls: kit.TLSFiles,
        *,
        signing_key: Ed25519PrivateKey,
        store: Any,
        ops: GroupOps | None = None,
        custodian_keys: dict[str, Ed25519PublicKey] | None = None,
        chunk_size: int = 4096,
        audit: Ledger | None = None,
        aggregate_ops: Any = None,
    ) -> None:
        self.identity = identity
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

    def _operator_peer(self, context: grpc.ServicerContext) -> str:
        """Only this agency's own operators (certificates for our agency id) may call."""
        peer = kit.peer_agency(context)
        if peer != self.identity:
            kit.abort(context, grpc.StatusCode.PERMISSION_DENIED,
                      f"requester_mismatch: {peer!r} is not an operator of {self.identity!r}")
        return peer

    def _job(self, ref: Any, context: grpc.ServicerContext) -> Job:
        with self._lock:
            job = self.jobs.get(ref.job_id)
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
        if not header.operator:
            kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed: operator is required")
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
        except (UnicodeDecodeError, ValueError) as exc:
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
        }
        kit.log_event(log, "job_submitted", job=job.job_id, operator=header.operator,
                      authorization=auth.authorization_id, queries=n_rows,
                      accepted=len(accepted), refused=refused_by_reason)
        work = [accepted]  # handed over and cleared by the job thread, not kept alive here
        thread = threading.Thread(
            target=self._run, args=(job, signed, work, header, tokens), daemon=True,
            name=job.job_id,
        )
        thread.start()
        return pb2.JobStatus(
            job_id=job.job_id, state=job.state, queries=n_rows, accepted=len(accepted),
            refused=[pb2.RefusedRecord(record_id=r.record_id, line=r.line, code=str(r.code),
                                       detail=r.detail)
                     for r in refused[:MAX_REFUSALS_IN_STATUS]],
        )

    def _run(self, job: Job, signed: SignedAuthorization, work: list[Any],
             header: Any, tokens: dict[tuple[str, str], bytes] | None) -> None:
        accepted = work.pop()
        job.state = "running"
        job.emit("validate", len(accepted), len(accepted), "query records validated")
        auth = signed.authorization
        started = time.perf_counter()
        try:
            if auth.tier is not Tier.IDENTITY:
                self._run_aggregate(job, signed, accepted, header, started)
                return
            session = RequesterSession(
                signed, accepted,
                match_rules=tuple(header.match_rules) or None,
                disclosure_fields=tuple(header.disclosure_fields) or None,
                ops=self.ops, chunk_size=self.chunk_size,
                session_id=header.session_id or None, signing_key=self.signing_key,
                custodian_key=self.custodian_keys.get(auth.custodian_id), tokens=tokens,
                engine=header.engine or Engine.OPRF.value,
            )
            del accepted  # the session keeps ids and match keys only
            stats = WireStats()
            # session construction (match keys, cuckoo table): part of the timed job
            stats.seconds["prepare"] = time.perf_counter() - started
            with kit.secure_channel(header.custodian_address, self.client_tls) as channel:
                outcome = run_remote_session(session, channel, progress=self._progress(job),
                                             stats=stats)
            stored = time.perf_counter()
            if self.audit is not None:
                # both signatures, kept on the requester's own hash-chained ledger
                record_receipt(self.audit, outcome.receipt)
            rows = [
                {"query_record_id": r.query_record_id, "rule_id": r.rule_id,
                 "pseudonym": r.pseudonym, "fields": dict(r.fields)}
                for r in outcome.results
            ]
            self.store.put_results(job.job_id, auth.authorization_id, auth.retention_days,
                                   rows, operator=job.operator)
            stats.seconds["store"] = time.perf_counter() - stored
            by_rule = Counter(m.rule_id for m in outcome.matches)
            fields_disclosed = Counter(f for r in outcome.results for f in r.fields)
            job.summary.update({
                "session_id": session.session_id,
                "custodian_id": auth.custodian_id,
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
                # entries, not tags: an engine may send several tags per entry (KKRT: 3)
                "custodian_records_in_scope": (session.custodian_entries
                                               // max(len(session.rules), 1)),
                "disclosures_rejected": outcome.rejected,
                "fields_disclosed": dict(fields_disclosed),
                "receipt": outcome.receipt.to_json(),
                "bytes_a_to_b": sum(stats.a_to_b.values()),
                "bytes_b_to_a": sum(stats.b_to_a.values()),
                "phase_seconds": {k: round(v, 3) for k, v in stats.seconds.items()},
                "wall_seconds": round(time.perf_counter() - started, 3),
                "results_retention_days": auth.retention_days,
            })
            job.state = "done"
            kit.log_event(log, "job_done", job=job.job_id, matches=len(outcome.matches),
                          disclosed=len(outcome.results))
            job.emit("done", 1, 1, "match complete", summary=job.summary)
        except grpc.RpcError as exc:
            job.state = "failed"
            job.error_code = exc.code().name
            job.error = exc.details() or ""
            kit.log_event(log, "job_failed", logging.WARNING, job=job.job_id,
                          status=job.error_code, reason=job.error)
            job.emit("failed", 0, 0, f"{job.error_code}: {job.error}")
        except (PSIError, OSError, ValueError) as exc:
            job.state = "failed"
            job.error_code = "FAILED_PRECONDITION" if isinstance(exc, PSIError) else "INTERNAL"
            job.error = kit.error_message(exc)
            kit.log_event(log, "job_failed", logging.WARNING, job=job.job_id, reason=job.error)
            job.emit("failed", 0, 0, f"{job.error_code}: {job.error}")

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
        """Aggregate / cardinality tier: the requester learns a count (and a sum), no one."""
        auth = signed.authorization
        rules = tuple(header.match_rules) or auth.match_rules
        session = AggregateRequesterSession(
            signed, accepted, match_rule=rules[0], ops=self.aggregate_ops,
            session_id=header.session_id or None, signing_key=self.signing_key,
            custodian_key=self.custodian_keys.get(auth.custodian_id))
        del accepted
        stats = WireStats()
        with kit.secure_channel(header.custodian_address, self.client_tls) as channel:
            outcome = run_remote_aggregate(session, channel, progress=self._progress(job),
                                           stats=stats)
        if self.audit is not None:
            record_receipt(self.audit, outcome.receipt)
        result = outcome.result
        row = {"query_record_id": "", "rule_id": rules[0], "pseudonym": f"{result.tier}",
               "fields": {"count": str(result.count),
                          "sum": "" if result.sum is None else str(result.sum),
                          "withheld": str(result.withheld).lower()}}
        self.store.put_results(job.job_id, auth.authorization_id, auth.retention_days, [row],
                               operator=job.operator)
        job.summary.update({
            "tier": result.tier, "match_rule": rules[0], "aggregate_count": result.count,
            "aggregate_sum": result.sum, "aggregate_withheld": result.withheld,
            "aggregate_reason": result.reason, "elements_evaluated": result.elements,
            "custodian_pairs": result.custodian_pairs,
            "receipt": outcome.receipt.to_json(),
            "bytes_a_to_b": sum(stats.a_to_b.values()),
            "bytes_b_to_a": sum(stats.b_to_a.values()),
            "phase_seconds": {k: round(v, 3) for k, v in stats.seconds.items()},
            "wall_seconds": round(time.perf_counter() - started, 3),
        })
        job.state = "done"
        kit.log_event(log, "job_done", job=job.job_id, tier=result.tier, count=result.count,
                      withheld=result.withheld)
        job.emit("done", 1, 1, "aggregate complete", summary=job.summary)

    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._operator_peer(context)
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
        job = self._job(request, context)
        if job.state != "done":
            kit.abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                      f"job_not_done: job is {job.state}")
        if not request.operator or not request.purpose:
            kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      "malformed: reading results requires an operator and a purpose")
        rows = self.store.read_results(job.job_id, operator=request.operator,
                                       purpose=request.purpose)
        for row in rows:
            yield pb2.ResultRow(
                query_record_id=row["query_record_id"], rule_id=row["rule_id"],
                pseudonym=row["pseudonym"],
                fields=[pb2.Field(name=k, value=v) for k, v in row["fields"].items()],
            )

    def PurgeResults(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._operator_peer(context)
        job = self._job(request, context)
        if not request.operator:
            kit.abort(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed: operator is required")
        n = self.store.purge_job(job.job_id, operator=request.operator,
                                 reason=request.purpose or "operator request")
        return pb2.PurgeAck(purged=n)


def serve(service: RequesterService, tls: kit.TLSFiles, listen: str = "127.0.0.1:0",
          *, max_workers: int = 16) -> tuple[grpc.Server, int]:
    """Start the requester service; returns (server, port)."""
    server, port, _health = kit.build_server(
        [(pb2_grpc.add_RequesterServicer_to_server, service)], [SERVICE_NAME], tls, listen,
        max_workers=max_workers,
    )
    server.start()
    return server, port
