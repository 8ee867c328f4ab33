"""Per-agency resource limits for a synchronous gRPC server (docs/architecture.md, Resource
limits).

In grpc's synchronous server every call holds a worker thread for as long as its handler
runs, and a streaming handler keeps running while it waits for the client's next message or
for the client to take the next reply.  A peer that opens calls and then stays silent can
therefore take every thread.  :class:`CallGuard` stops that for every call, of every service:

* it admits a call only while the caller's agency (from its mTLS certificate) has fewer than
  a set number of calls in progress, and a service call only while all agencies together have
  fewer than ``calls_total``; anything over is refused at once with RESOURCE_EXHAUSTED;
* it bounds every wait on the client: the first request message must arrive within
  ``first_message_seconds`` of admission, and later waits (for a request or for the client to
  take a reply) may last ``stream_idle_seconds``; a call past either ends with
  DEADLINE_EXCEEDED and a message naming the limit.  Unary methods are served as client
  streams of one message, so the wait for their request is bounded too;
* the server's thread pool is ``calls_total + spare_threads``, so that health checks, reflection
  and refusals always find a thread while the service calls are all busy.

Time spent working on a message is never counted as waiting: only the client can stall a call.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, fields
from typing import Any

import grpc
from grpc import _common as grpc_common

from proto import service_kit as kit
from protocol.accounting.refusals import RefusalLimiter
from protocol.cli.dev_pki import agency_id_from_auth_context

log = logging.getLogger("proto.limits")

#: Bucket of callers whose certificate names no agency (the services refuse them anyway).
UNIDENTIFIED = "<unidentified>"
#: Session ids remembered per call, for "a call is using this session" (bounded per call).
_SESSIONS_PER_CALL = 4


@dataclass(frozen=True)
class ServiceLimits:
    """The custodian's resource limits; every field is an ``agency-b serve`` option.

    Defaults suit the headline benchmark on a small server: an honest requester keeps at most
    three calls open at once, blinds a first chunk in well under a minute and never pauses
    for minutes inside a stream.
    """

    #: Service calls one agency may have in progress at once.
    calls_per_agency: int = 8
    #: Service calls all agencies together may have in progress (worker threads they may hold).
    calls_total: int = 32
    #: Health and reflection calls one agency may have in progress at once.
    health_calls_per_agency: int = 4
    #: Worker threads beyond ``calls_total``: health, reflection and refusals run on them.
    spare_threads: int = 16
    #: Live (in-memory) sessions one agency may hold; beyond it new opens are refused.
    sessions_per_agency: int = 32
    #: Live sessions of all agencies together; a live session is never evicted to make room.
    sessions_total: int = 256
    #: Seconds a call may wait for its first request message.
    first_message_seconds: float = 60.0
    #: Seconds a stream may wait on the client (next request, or taking the next reply).
    stream_idle_seconds: float = 300.0
    #: Seconds a session may go without any call before it is closed with a receipt.
    session_idle_seconds: float = 900.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive, not {getattr(self, f.name)}")
        if self.calls_per_agency > self.calls_total:
            raise ValueError("calls_per_agency may not exceed calls_total")
        if self.sessions_per_agency > self.sessions_total:
            raise ValueError("sessions_per_agency may not exceed sessions_total")
        if self.health_calls_per_agency >= self.spare_threads:
            raise ValueError("spare_threads must exceed health_calls_per_agency, so that one "
                             "agency's health calls never take every spare thread")

    @property
    def worker_threads(self) -> int:
        """The server's thread pool: every admitted service call, plus the spare threads."""
        return self.calls_total + self.spare_threads

    @property
    def tick_seconds(self) -> float:
        """How often the watchdog looks for overdue calls and idle sessions."""
        shortest = min(self.first_message_seconds, self.stream_idle_seconds,
                       self.session_idle_seconds)
        return min(1.0, max(0.02, shortest / 10))


_OPTION_HELP = {
    "calls_per_agency": "service calls one agency may have in progress",
    "calls_total": "service calls all agencies together may have in progress",
    "health_calls_per_agency": "health and reflection calls one agency may have in progress",
    "spare_threads": "worker threads beyond --calls-total, kept for health checks and refusals",
    "sessions_per_agency": "live sessions one agency may hold (further opens are refused)",
    "sessions_total": "live sessions of all agencies together (none is ever evicted)",
    "first_message_seconds": "seconds a call may wait for its first request message",
    "stream_idle_seconds": "seconds a stream may wait on the client between messages",
    "session_idle_seconds": "seconds without a call before a session is closed with a receipt",
}


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--calls-per-agency`` ... ``--session-idle-seconds`` options of ``serve``."""
    group = parser.add_argument_group("resource limits (per peer; see docs/architecture.md)")
    defaults = ServiceLimits()
    for f in fields(ServiceLimits):
        default = getattr(defaults, f.name)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"limit_{f.name}",
                           type=type(default), default=default,
                           metavar="SECONDS" if f.name.endswith("seconds") else "N",
                           help=f"{_OPTION_HELP[f.name]} (default: {default})")


def limits_from_args(args: argparse.Namespace) -> ServiceLimits:
    """The :class:`ServiceLimits` given on the command line (``add_limit_arguments``)."""
    return ServiceLimits(**{f.name: getattr(args, f"limit_{f.name}")
                            for f in fields(ServiceLimits)})


def cancel_with_status(context: grpc.ServicerContext, code: grpc.StatusCode,
                       message: str) -> None:
    """End a call from another thread with ``code`` and ``message``.

    The handler's thread may be blocked inside grpc (waiting for a request, or for the
    client to take a reply), where ``context.abort`` cannot reach it.  grpc's public
    ``context.cancel()`` would wake it but tell the client only CANCELLED, so this cancels
    the core call with a status (grpc core's cancel-with-status, reached through the
    servicer context's call object); if that is unavailable it falls back to ``cancel()``.
    """
    call: Any = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(grpc_common.STATUS_CODE_TO_CYGRPC_STATUS_CODE[code], message)
    except Exception:  # an older or newer grpc without that shape: the client sees CANCELLED
        context.cancel()


class _Call:
    """One admitted call: who holds it, and when its current wait on the client expires."""

    __slots__ = ("agency", "context", "counted", "deadline", "ended", "limit", "sessions")

    def __init__(self, agency: str, counted: bool, context: grpc.ServicerContext) -> None:
        self.agency = agency
        self.counted = counted  # a service call (also counts towards calls_total)
        self.context = context
        self.deadline: float | None = None  # set while waiting on the client
        self.limit = ""  # the message sent if the wait expires
        self.sessions: set[str] = set()
        self.ended = False


class CallGuard(grpc.ServerInterceptor):  # type: ignore[misc]
    """Admission and deadlines for every call of a server (see the module docstring).

    ``services`` are the full names of the services whose calls count as service calls;
    every other service (health, reflection) counts against ``health_calls_per_agency``.
    ``housekeeping`` runs on the watchdog thread about once a tick; it returns True while it
    has more to watch (the custodian reaps idle sessions with it), which keeps the watchdog
    alive without calls.  The watchdog starts with the first admitted call.  Refusals are
    logged within ``refusal_log``'s per-peer budget (the custodian passes its own).
    """

    def __init__(self, limits: ServiceLimits, services: Collection[str], *,
                 housekeeping: Callable[[], bool] | None = None,
                 refusal_log: RefusalLimiter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._services = frozenset(services)
        self._housekeeping = housekeeping
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._per_agency: Counter[tuple[str, bool]] = Counter()
        self._service_calls = 0
        self._watchdog: threading.Thread | None = None
        self._last_housekeeping = 0.0
        self._refusal_log = refusal_log or kit.service_refusal_log()

    # -- what the service asks --------------------------------------------------------

    def sessions_in_use(self) -> set[tuple[str, str]]:
        """``(agency, session_id)`` of every session a call in progress has named."""
        with self._lock:
            return {(c.agency, s) for c in self._calls for s in c.sessions}

    def calls_in_progress(self) -> int:
        """Calls admitted and not yet ended, of every agency and service (for operators)."""
        with self._lock:
            return len(self._calls)

    # -- interceptor ------------------------------------------------------------------

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        counted = method.split("/")[1] in self._services if method.count("/") == 2 else False
        return self._wrap(handler, method, counted)

    def _wrap(self, handler: Any, method: str, counted: bool) -> Any:
        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                    or handler.stream_stream)
        unary_in = not handler.request_streaming

        def argument(call: _Call, requests: Iterator[Any]) -> Any:
            return self._first(call, requests) if unary_in else self._requests(call, requests)

        if handler.response_streaming:
            def streaming(requests: Iterator[Any], context: grpc.ServicerContext
                          ) -> Iterator[Any]:
                call = self._admit(context, method, counted)
                try:
                    yield from self._responses(call, behavior(argument(call, requests),
                                                              context))
                finally:
                    self._release(call)

            return grpc.stream_stream_rpc_method_handler(
                streaming, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        def single(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            call = self._admit(context, method, counted)
            try:
                return behavior(argument(call, requests), context)
            finally:
                self._release(call)

        return grpc.stream_unary_rpc_method_handler(
            single, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    # -- admission --------------------------------------------------------------------

    def _admit(self, context: grpc.ServicerContext, method: str, counted: bool) -> _Call:
        agency = kit.clip(agency_id_from_auth_context(context.auth_context()) or UNIDENTIFIED,
                          64)
        lim = self.limits
        limit = lim.calls_per_agency if counted else lim.health_calls_per_agency
        refusal, watchdog = "", None
        with self._lock:
            held = self._per_agency[(agency, counted)]
            if held >= limit:
                option = "--calls-per-agency" if counted else "--health-calls-per-agency"
                refusal = (f"too_many_calls: agency {agency!r} already has {held} "
                           f"{'service' if counted else 'health'} calls in progress "
                           f"(limit {limit}, {option}); retry when one ends")
            elif counted and self._service_calls >= lim.calls_total:
                refusal = (f"server_busy: {self._service_calls} service calls in progress "
                           f"from all agencies (limit {lim.calls_total}, --calls-total); "
                           "retry shortly")
            else:
                call = _Call(agency, counted, context)
                self._calls.add(call)
                self._per_agency[(agency, counted)] += 1
                self._service_calls += counted
                if self._watchdog is None:
                    watchdog = self._watchdog = threading.Thread(
                        target=self._watch, daemon=True, name="call-watchdog")
        if refusal:
            self.log_refusal(agency, method, refusal)
            kit.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        if watchdog is not None:
            watchdog.start()
        return call

    def _release(self, call: _Call) -> None:
        with self._lock:
            if call.ended:
                return
            call.ended = True
            self._calls.discard(call)
            key = (call.agency, call.counted)
            self._per_agency[key] -= 1
            if not self._per_agency[key]:
                del self._per_agency[key]
            self._service_calls -= call.counted

    def log_refusal(self, agency: str, method: str, message: str) -> None:
        """Log a RESOURCE_EXHAUSTED refusal (within the peer's budget of logged refusals)."""
        self._log_limited("refused", agency, status="RESOURCE_EXHAUSTED", rpc=method,
                          reason=message)

    def _log_limited(self, event: str, agency: str, **fields: Any) -> None:
        """Log within the peer's budget of logged refusals; beyond it, only count."""
        kit.log_limited(log, self._refusal_log, event, agency, self._clock(), **fields)

    # -- waits on the client ----------------------------------------------------------

    def _wait(self, call: _Call, seconds: float, limit: str) -> None:
        with self._lock:
            call.deadline = self._clock() + seconds
            call.limit = limit

    def _work(self, call: _Call) -> None:
        with self._lock:
            call.deadline = None

    def _note(self, call: _Call, message: Any) -> None:
        session_id = getattr(message, "session_id", "")
        if session_id and len(call.sessions) < _SESSIONS_PER_CALL:
            with self._lock:
                call.sessions.add(session_id)

    def _next(self, call: _Call, requests: Iterator[Any], first: bool) -> Any:
        lim = self.limits
        if first:
            self._wait(call, lim.first_message_seconds,
                       f"first_message_deadline: no request message within "
                       f"{lim.first_message_seconds:g} s of the call's start "
                       "(--first-message-seconds)")
        else:
            self._wait(call, lim.stream_idle_seconds,
                       f"stream_idle_timeout: no request message for "
                       f"{lim.stream_idle_seconds:g} s (--stream-idle-seconds)")
        try:
            message = next(requests)
        finally:
            self._work(call)
        self._note(call, message)
        return message

    def _first(self, call: _Call, requests: Iterator[Any]) -> Any:
        try:
            return self._next(call, requests, first=True)
        except StopIteration:
            kit.abort(call.context, grpc.StatusCode.INVALID_ARGUMENT,
                      "missing_request: the call ended before its request message")

    def _requests(self, call: _Call, requests: Iterator[Any]) -> Iterator[Any]:
        first = True
        while True:
            try:
                message = self._next(call, requests, first)
            except StopIteration:
                return
            first = False
            yield message

    def _responses(self, call: _Call, responses: Iterator[Any]) -> Iterator[Any]:
        idle = self.limits.stream_idle_seconds
        for reply in responses:
            self._wait(call, idle, f"stream_idle_timeout: the client took no reply for "
                                   f"{idle:g} s (--stream-idle-seconds)")
            yield reply  # grpc sends it before asking for the next: the client's pace
            self._work(call)

    # -- watchdog ---------------------------------------------------------------------

    def _watch(self) -> None:
        """Cancel calls whose wait on the client expired; run the housekeeping.

        Runs while calls are in progress or the housekeeping has more to watch, then exits
        (the next admitted call starts it again).
        """
        tick = self.limits.tick_seconds
        more = self._housekeeping is not None
        while True:
            now = self._clock()
            expired = []
            with self._lock:  # cancelled under the lock: the call cannot move on meanwhile
                for call in self._calls:
                    if call.deadline is not None and now >= call.deadline:
                        call.deadline = None
                        cancel_with_status(call.context, grpc.StatusCode.DEADLINE_EXCEEDED,
                                           call.limit)
                        expired.append((call.agency, call.limit))
            for agency, reason in expired:
                self._log_limited("call_expired", agency, status="DEADLINE_EXCEEDED",
                                  reason=reason)
            if self._housekeeping is not None and now - self._last_housekeeping >= tick:
                self._last_housekeeping = now
                try:
                    more = self._housekeeping()
                except Exception:  # keep watching calls whatever the housekeeping does
                    log.exception("housekeeping failed")
            with self._lock:
                if not self._calls and not more:
                    self._watchdog = None
                    return
            time.sleep(tick)


__all__ = ["UNIDENTIFIED", "CallGuard", "ServiceLimits", "add_limit_arguments",
           "cancel_with_status", "limits_from_args"]
