"""The process lifecycle both agency services share: signals, graceful stop, CLI errors.

Shared here, beside the gRPC kit, so that neither agency's CLI imports the other's.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from proto import service_kit as kit
from protocol.errors import PSIError

__all__ = ["run_cli", "shut_down", "stop_on_signal", "wait_for_signal"]


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
