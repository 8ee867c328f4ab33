"""What both gRPC services share: status mapping, mTLS, health, logs.

The services are thin adapters: they translate protobuf to protocol messages
(:mod:`proto.codec`), hand them to sessions, and map library errors to
gRPC status codes (``abort_for``).  Nothing here decides policy.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import load
from protocol.accounting.refusals import RefusalLimiter
from protocol.adapters.files import open_private_log
from protocol.cli.dev_pki import agency_id_from_auth_context
from protocol.errors import (
    BudgetExhausted,
    DisclosureCapReached,
    InvalidElementError,
    InvalidRecordError,
    LedgerError,
    PolicyRefusal,
    ProtocolError,
    PSIError,
)
from protocol.policy.decide import REFUSAL_CATEGORY, Reason

# Generated at build time (proto.load): typed Any, since mypy cannot see generated classes.
pb2: Any
pb2_grpc: Any
pb2, pb2_grpc = load()

# The generated servicer base classes, named here once.  Their methods only answer
# UNIMPLEMENTED, so the type checker may see them as ``object``; the services then
# subclass a known type and their own methods are checked as usual.
if TYPE_CHECKING:
    RequesterServicer = object
    CustodianServicer = object
else:
    RequesterServicer = pb2_grpc.RequesterServicer
    CustodianServicer = pb2_grpc.CustodianServicer

#: Largest message either side accepts: a 65,536-element chunk is 2 MiB; leave headroom.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: How often a client pings a silent connection, so a dead peer is noticed mid-stream.
KEEPALIVE_MS = 30_000
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
]


def server_ping_options(keepalive_ms: int = KEEPALIVE_MS) -> list[tuple[str, Any]]:
    """Server options that accept a client pinging every ``keepalive_ms`` on a silent stream.

    gRPC's server default (one ping in 5 minutes while it sends nothing) ends a long silent
    job-watch stream in ``GOAWAY too_many_pings``; it did, in a 1.28M benchmark.  A ping every
    ``keepalive_ms`` is not abuse, so the server's floor sits just below it.  The key is
    gRPC core's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; an earlier build used a
    misspelt key, which gRPC ignores silently (tests/test_keepalive.py catches that).
    """
    return [("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms * 2 // 3)]


#: Servers accept our own clients' keepalive pings (``server_ping_options``).
SERVER_ONLY_OPTIONS: list[tuple[str, Any]] = server_ping_options()

_CATEGORY_STATUS = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code that fits a library error."""
    if isinstance(exc, PolicyRefusal):
        first = exc.reasons[0] if exc.reasons else "malformed"
        try:
            category = REFUSAL_CATEGORY[Reason(first)]
        except ValueError:
            category = "invalid_argument"
        return _CATEGORY_STATUS.get(category, grpc.StatusCode.PERMISSION_DENIED)
    if isinstance(exc, BudgetExhausted | DisclosureCapReached):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, InvalidElementError | InvalidRecordError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, ProtocolError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, LedgerError):
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.INTERNAL


#: Longest status message sent: it travels percent-encoded in the ``grpc-message`` trailer,
#: and gRPC's default metadata limit is 8 KiB (512 characters stay under it even when every
#: one is a 4-byte UTF-8 character, encoded as 12 bytes).
MAX_STATUS_CHARS = 512


def clip(text: str, limit: int = MAX_STATUS_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut (peer-supplied strings
    in status messages and logs must not grow with what the peer sent)."""
    if len(text) <= limit:
        return text
    kept = max(0, limit - 48)  # room for the note, whatever the number in it
    return f"{text[:kept]}... [{len(text) - kept:,} characters cut]"


def error_message(exc: BaseException) -> str:
    """``<code>: <message>`` — the machine-readable reason first, then the human text,
    bounded by :data:`MAX_STATUS_CHARS`."""
    code = exc.code if isinstance(exc, PSIError) else "internal"
    return clip(f"{code}: {exc}")


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """``context.abort``, typed as what it is (it always raises), so callers narrow after it.

    The message is clipped (:func:`clip`): a status never exceeds gRPC's metadata limit.
    """
    context.abort(code, clip(message))
    raise AssertionError("unreachable")  # pragma: no cover


def abort_for(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    abort(context, status_for(exc), error_message(exc))


def peer_agency(context: grpc.ServicerContext) -> str:
    """The authenticated agency id of the caller, from its mTLS client certificate."""
    agency = agency_id_from_auth_context(context.auth_context())
    if not agency:
        abort(context, grpc.StatusCode.UNAUTHENTICATED,
              "unauthenticated: no agency identity in the client certificate")
    return agency


# ------------------------------------------------------------------ TLS / servers


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one agency: the CA that it trusts, and its own cert and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, certs: Path, agency: str, role: str) -> TLSFiles:
        """Conventional names written by ``psi-authority dev-ca``: <agency>.<role>.pem/.key."""
        return cls(certs / "ca.pem", certs / f"{agency}.{role}.pem", certs / f"{agency}.{role}.key")

    def read(self) -> tuple[bytes, bytes, bytes]:
        for p in (self.ca, self.cert, self.key):
            if not p.is_file():
                raise FileNotFoundError(f"TLS file not found: {p}")
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """mTLS only: clients must present a certificate from the configured CA."""
    ca, cert, key = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


def secure_channel(address: str, tls: TLSFiles) -> grpc.Channel:
    ca, cert, key = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)


def build_server(
    services: Sequence[tuple[Any, Any]],
    service_names: Sequence[str],
    tls: TLSFiles,
    listen: str,
    *,
    max_workers: int = 16,
    interceptors: Sequence[Any] = (),
    options: Sequence[tuple[str, Any]] = (),
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A gRPC server with mTLS, health checking, reflection and explicit size limits.

    ``services`` are (add_XServicer_to_server, servicer) pairs.  Returns the
    server, the bound port (``listen`` may end in ``:0``) and the health servicer.
    ``interceptors`` see every call, health and reflection included (the custodian's
    per-peer limits, ``proto.limits``); ``options`` are added to ``CHANNEL_OPTIONS``.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=list(interceptors),
                         options=[*CHANNEL_OPTIONS, *SERVER_ONLY_OPTIONS, *options])
    for add, servicer in services:
        add(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in service_names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_secure_port(listen, server_credentials(tls))
    if port == 0:
        raise OSError(f"could not bind {listen}")
    return server, port, health_servicer


def wait_healthy(channel: grpc.Channel, service: str = "", timeout: float = 20.0) -> None:
    """Block until the peer's health service reports SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"service not healthy after {timeout}s: {last}")


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


# ------------------------------------------------------------------ logs

#: Keys every JSON log line starts with; event fields never overwrite them.
LOG_ENVELOPE = ("ts", "level", "logger", "event")
#: Longest string a log field keeps (peer-supplied text must not grow the log without bound).
MAX_LOG_FIELD_CHARS = 512
#: Most items a list-valued log field keeps.
MAX_LOG_FIELD_ITEMS = 64
#: Longest line read from the native stderr stream before it is cut into several events.
MAX_NATIVE_LINE_BYTES = 8192
NATIVE_LOGGER = "grpc.native"
#: Native lines written per window; the rest of the window's lines are only counted.
MAX_NATIVE_LINES_PER_WINDOW = 50
NATIVE_LOG_WINDOW_SECONDS = 1.0

# absl / gRPC C-core prefix: "E1130 01:49:43.123456   4711 file.cc:123] text"
_NATIVE_LINE = re.compile(
    r"^(?P<sev>[IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (?P<source>[^\]\s]+)\] ?(?P<text>.*)$"
)
_NATIVE_LEVEL = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR,
                 "F": logging.CRITICAL}


def iso_utc(epoch_seconds: float) -> str:
    """``2026-11-30T01:49:43.123Z``: ISO-8601, UTC, milliseconds; what every log line carries."""
    moment = datetime.fromtimestamp(epoch_seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bounded(value: Any) -> Any:
    """Cap a field's size: long strings are cut, long lists and dicts shortened, each saying so."""
    if isinstance(value, str) and len(value) > MAX_LOG_FIELD_CHARS:
        return f"{value[:MAX_LOG_FIELD_CHARS]}...(+{len(value) - MAX_LOG_FIELD_CHARS} chars)"
    if isinstance(value, list | tuple) and len(value) > MAX_LOG_FIELD_ITEMS:
        kept = [_bounded(v) for v in value[:MAX_LOG_FIELD_ITEMS]]
        return [*kept, f"...(+{len(value) - MAX_LOG_FIELD_ITEMS} items)"]
    if isinstance(value, list | tuple):
        return [_bounded(v) for v in value]
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(k)[:MAX_LOG_FIELD_CHARS]: _bounded(v) for k, v in items[:MAX_LOG_FIELD_ITEMS]}
        if len(items) > MAX_LOG_FIELD_ITEMS:
            out["..."] = f"+{len(items) - MAX_LOG_FIELD_ITEMS} items"
        return out
    return value


class JSONFormatter(logging.Formatter):
    """One JSON object per line: machine-readable logs for operators and auditors.

    ``ts`` is ISO-8601 UTC with milliseconds, so lines from both agencies sort and compare
    as text; the event's fields follow the envelope and cannot overwrite it (a colliding
    field is kept as ``field_<name>``); strings and lists are capped in size.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": _bounded(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out[f"field_{key}" if key in LOG_ENVELOPE else str(key)] = _bounded(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _JSONLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that never reports its own failures on stderr.

    Once stderr is routed back into the log (``route_native_stderr``), a failing handler
    that printed its error there would feed itself forever; a log that cannot be written
    is dropped instead.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        return


@dataclass
class _Routing:
    """Where this process's stderr really goes, once ``setup_logging`` has routed it."""

    real_stderr: TextIO | None = None
    to_log_file: bool = False


_routing = _Routing()


def setup_logging(level: str = "info", stream: Any = None, *, log_file: str | None = None,
                  capture_native: bool = False) -> None:
    """JSON lines on one structured stream: ``log_file`` (0600, appended) or ``stream``/stderr.

    With ``capture_native`` (the services' ``serve``), whatever else the process writes to
    file descriptor 2 (gRPC's C core, absl, Python warnings and tracebacks, worker processes)
    is turned into JSON events of logger ``grpc.native`` on that same stream, so the stream
    holds JSON lines only.  Not for a process whose stderr others share (a test runner).
    """
    structured: Any = open_private_log(log_file) if log_file is not None else stream
    real_stderr: TextIO | None = None
    if capture_native:
        sys.stderr.flush()
        real_stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8")
    handler = _JSONLineHandler(structured or real_stderr or sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    if real_stderr is not None:
        # only now: with no handler yet, logging's last resort would write a native event
        # back to descriptor 2, and so on forever
        route_native_stderr(real_stderr)
        _routing.real_stderr, _routing.to_log_file = real_stderr, log_file is not None


def report_fatal(prog: str, exc: BaseException) -> None:
    """A command's last words, fit for where its stderr goes.

    Before logging is routed (or in a command that never routes it): one plain line on
    stderr. A service whose stderr is its JSON stream: a ``fatal`` event there instead. A
    service logging to ``--log-file``: the event in the file and the plain line on the real
    stderr, so whoever started it sees why it stopped.
    """
    line = f"{prog}: error: {exc}"
    if _routing.real_stderr is None:
        print(line, file=sys.stderr)
        return
    log_event(logging.getLogger(prog), "fatal", logging.ERROR, error=str(exc),
              error_type=type(exc).__name__)
    if _routing.to_log_file:
        print(line, file=_routing.real_stderr, flush=True)


def route_native_stderr(real_stderr: TextIO) -> None:
    """Route file descriptor 2 through a pipe into JSON log events.

    gRPC's C core writes its own lines (absl format) straight to descriptor 2, bypassing
    Python logging; silencing them would hide TLS handshake failures and the like, so each
    line becomes an event ``native_log`` with ``source`` and ``text`` (absl lines keep their
    severity).  At exit the pipe is drained and descriptor 2 is ``real_stderr`` again.
    """
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    # Worker processes inherit the pipe and may outlive this process's last log line, so the
    # pump stops at a marker rather than waiting for end-of-file.
    marker = f"end-of-native-stderr {os.urandom(8).hex()}\n".encode()
    pump = threading.Thread(target=_pump_native_lines, args=(read_end, marker), daemon=True,
                            name="native-stderr")
    pump.start()

    def restore() -> None:
        sys.stderr.flush()
        os.write(2, marker)
        os.dup2(real_stderr.fileno(), 2)
        pump.join(timeout=2.0)

    atexit.register(restore)


def _pump_native_lines(read_end: int, marker: bytes) -> None:
    """Turn each line from the pipe into a ``native_log`` event, at most
    ``MAX_NATIVE_LINES_PER_WINDOW`` per window; the rest are counted, not written.

    A peer can make gRPC's core log one line per failed TLS handshake, so without the cap
    a connection flood would grow the log as fast as it connects.  Each window that dropped
    lines ends with one ``native_log_suppressed`` event giving the count, so the log still
    says exactly how much was left out.
    """
    logger = logging.getLogger(NATIVE_LOGGER)
    window_end = 0.0
    written = suppressed = 0

    def flush_suppressed() -> None:
        nonlocal suppressed
        if suppressed:
            log_event(logger, "native_log_suppressed", logging.WARNING, lines=suppressed,
                      window_seconds=NATIVE_LOG_WINDOW_SECONDS)
            suppressed = 0

    with os.fdopen(read_end, "rb") as pipe:
        while (raw := pipe.readline(MAX_NATIVE_LINE_BYTES)) and raw != marker:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line.strip():
                continue
            now = time.monotonic()
            if now >= window_end:
                flush_suppressed()
                window_end, written = now + NATIVE_LOG_WINDOW_SECONDS, 0
            if written >= MAX_NATIVE_LINES_PER_WINDOW:
                suppressed += 1
                continue
            written += 1
            match = _NATIVE_LINE.match(line)
            if match:
                log_event(logger, "native_log", _NATIVE_LEVEL[match["sev"]],
                          source=match["source"], text=match["text"])
            else:
                log_event(logger, "native_log", logging.WARNING, source="stderr", text=line)
        flush_suppressed()


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with ``fields`` as one JSON line (see docs/architecture.md, Files and logs,
    for the field names both services share and what each one counts)."""
    logger.log(level, event, extra={"fields": fields})


def service_refusal_log() -> RefusalLimiter:
    """The per-peer budget of logged refusals for a service whose policy sets none."""
    return RefusalLimiter(burst=10, per_minute=60, summary_s=60.0, new_lock=threading.Lock)


def log_limited(logger: logging.Logger, limiter: RefusalLimiter, event: str, peer: str,
                now: float, **fields: Any) -> None:
    """Log a refusal of ``peer`` within its budget of logged refusals; beyond it, only count.

    Every service log line a peer can provoke goes through here, so a flood of refusals
    costs a bounded number of lines; a ``refusals_suppressed`` line says how many were
    counted and not logged (docs/architecture.md, Accounting).
    """
    admission = limiter.admit(peer, now)
    for summary in admission.summaries:
        log_event(logger, "refusals_suppressed", logging.WARNING,
                  peer=clip(summary.peer, 64), count=summary.count,
                  seconds=round(summary.until - summary.since, 3))
    if admission.recorded:
        clipped = {k: clip(v, 256) if isinstance(v, str) else v for k, v in fields.items()}
        log_event(logger, event, logging.WARNING, peer=clip(peer, 64), **clipped)
