"""What both gRPC services share: status mapping, mTLS, health, logs.

The services are thin adapters: they translate protobuf to protocol messages
(:mod:`proto.codec`), hand them to sessions, and map library errors to
gRPC status codes (``abort_for``).  Nothing here decides policy.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import load
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
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]

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


def error_message(exc: BaseException) -> str:
    """``<code>: <message>`` — the machine-readable reason first, then the human text."""
    code = exc.code if isinstance(exc, PSIError) else "internal"
    return f"{code}: {exc}"


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """``context.abort``, typed as what it is (it always raises), so callers narrow after it."""
    context.abort(code, message)
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
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A gRPC server with mTLS, health checking, reflection and explicit size limits.

    ``services`` are (add_XServicer_to_server, servicer) pairs.  Returns the
    server, the bound port (``listen`` may end in ``:0``) and the health servicer.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=CHANNEL_OPTIONS)
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


class JSONFormatter(logging.Formatter):
    """One JSON object per line: machine-readable logs for operators and auditors."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, event, extra={"fields": fields})
