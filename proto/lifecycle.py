"""The process lifecycle both agency services share: ``serve`` options, private files and JSON
logs at start, signals, graceful stop, CLI errors.

Shared here, beside the gRPC kit, so that neither agency's CLI imports the other's.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from proto import service_kit as kit
from protocol.adapters.files import use_private_umask, write_file_atomic
from protocol.errors import PSIError

__all__ = [
    "add_serve_arguments",
    "run_cli",
    "serve_until_signal",
    "shut_down",
    "start_serve_process",
    "stop_on_signal",
    "wait_for_signal",
]


def add_serve_arguments(parser: argparse.ArgumentParser, *, agency: str, listen: str) -> None:
    """The ``serve`` options both agencies take: secrets, TLS, identity, address, worker
    processes, shutdown and checkpoint timing, log level."""
    parser.add_argument("--secrets", required=True, help=f"directory from '{agency} init'")
    parser.add_argument("--certs", required=True, help="directory from 'psi-authority dev-ca'")
    parser.add_argument("--agency-id", default=agency,
                        help="this agency's id (certificate name)")
    parser.add_argument("--listen", default=listen, help="host:port (port 0 = any free)")
    parser.add_argument("--port-file", help="write the bound port here (for port 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for group operations (default: all cores)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="shutdown grace period, seconds")
    parser.add_argument("--checkpoint-interval", type=float, default=30.0, metavar="SECONDS",
                        help="sign an audit checkpoint this often (and always at shutdown; "
                             "0 = only at shutdown)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="least severe event logged (default: %(default)s)")
    parser.add_argument("--log-file", metavar="FILE",
                        help="append the JSON log lines to FILE (created 0600) instead of "
                             "stderr (default: stderr); gRPC's native log lines are turned "
                             "into JSON events on the same stream")


def start_serve_process(args: argparse.Namespace) -> None:
    """First thing ``serve`` does: owner-only umask, then JSON logs on one stream.

    The umask comes first so the log file, the ledgers and every file SQLite or gRPC creates
    afterwards are owner-only (docs/architecture.md, Files and logs).
    """
    use_private_umask()
    kit.setup_logging(args.log_level, log_file=args.log_file, capture_native=True)


def stop_on_signal() -> threading.Event:
    """An event set by SIGTERM/SIGINT.

    Installed before the service announces its port, so a signal that arrives as soon
    as the port is known still leads to a graceful shutdown (checkpoint, ledger close).
    """
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def wait_for_signal(stop: threading.Event) -> None:
    """Block until the event from ``stop_on_signal`` is set; graceful shutdown follows."""
    while not stop.is_set():
        stop.wait(0.5)


def serve_until_signal(logger: logging.Logger, port: int, port_file: str | None,
                       **fields: Any) -> None:
    """Announce the bound port (``--port-file`` and a ``serving`` log event with ``fields``),
    then block until SIGTERM/SIGINT; the caller shuts down gracefully after it returns."""
    stop = stop_on_signal()  # before the port is known outside
    if port_file:
        # atomic, so a reader polling for the file never sees it empty
        write_file_atomic(Path(port_file), f"{port}\n".encode())
    kit.log_event(logger, "serving", port=port, **fields)
    wait_for_signal(stop)


def shut_down(logger: logging.Logger, server: Any, grace: float, checkpointer: Any,
              pools: Sequence[Any], drain: Callable[[], object] | None = None) -> None:
    """Graceful stop for either agency: drain RPCs, run ``drain`` (the custodian writes the
    refusal summaries still counted in memory), sign the final checkpoint, stop pools."""
    kit.log_event(logger, "stopping", grace_seconds=grace)
    server.stop(grace).wait()
    if drain is not None:
        drain()
    final = checkpointer.stop()
    if final is not None:
        kit.log_event(logger, "audit_checkpoint", seq=final.seq, key_id=final.key_id,
                      reason="shutdown")
    for pool in pools:
        if pool is not None:
            pool.close()


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Run a subcommand; user errors are reported in one line or one JSON event (no
    traceback, see ``service_kit.report_fatal``) and exit 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError, KeyError, PSIError) as exc:
        kit.report_fatal(parser.prog, exc)
        return 2
