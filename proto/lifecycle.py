"""The process lifecycle both agency services share: ``serve`` options, signals, graceful
stop, CLI errors.

Shared here, beside the gRPC kit, so that neither agency's CLI imports the other's.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proto import service_kit as kit
from protocol.errors import PSIError

__all__ = [
    "add_serve_arguments",
    "run_cli",
    "serve_until_signal",
    "shut_down",
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
                        choices=["debug", "info", "warning", "error"])


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
        Path(port_file).write_text(f"{port}\n")
    kit.log_event(logger, "serving", port=port, **fields)
    wait_for_signal(stop)


def shut_down(logger: logging.Logger, server: Any, grace: float, checkpointer: Any,
              pools: Sequence[Any]) -> None:
    """Graceful stop for either agency: drain RPCs, sign the final checkpoint, stop pools."""
    kit.log_event(logger, "stopping", grace_seconds=grace)
    server.stop(grace).wait()
    final = checkpointer.stop()
    if final is not None:
        kit.log_event(logger, "audit_checkpoint", seq=final.seq, key_id=final.key_id,
                      reason="shutdown")
    for pool in pools:
        if pool is not None:
            pool.close()


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Run a subcommand; user errors print one line (no traceback) and exit 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError, KeyError, PSIError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
