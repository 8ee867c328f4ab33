"""Periodic signed checkpoints of a ledger's audit chain, on a background thread.

A wholesale rewrite of the chain (every hash recomputed) is only caught when it contradicts a
signature, so each agency service pins its head every few seconds and once at shutdown
(docs/architecture.md, Accounting). The signing itself is
:func:`protocol.accounting.oversight.add_signed_checkpoint`; this adapter only schedules it.
"""

from __future__ import annotations

import logging
import threading

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.accounting.chain import Checkpoint
from protocol.accounting.oversight import add_signed_checkpoint
from protocol.accounting.port import AuditLog

__all__ = ["Checkpointer"]

log = logging.getLogger("protocol.adapters.checkpointer")


class Checkpointer:
    """Adds a signed checkpoint every ``interval_s`` seconds, and a last one on :meth:`stop`.

    A tick is skipped when nothing but the previous checkpoint's own entry was appended since
    then, so an idle service does not grow its chain with checkpoints of checkpoints.
    ``interval_s <= 0`` disables the periodic thread but keeps the shutdown checkpoint.
    """

    def __init__(
        self, ledger: AuditLog, signing_key: Ed25519PrivateKey, interval_s: float = 30.0
    ) -> None:
        self._ledger = ledger
        self._key = signing_key
        self._interval = float(interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.added = 0

    def checkpoint_now(self, *, force: bool = False) -> Checkpoint | None:
        """Add a checkpoint unless the chain has not moved since the last one (or ``force``)."""
        with self._lock:
            if not force:
                existing = self._ledger.checkpoints()
                head_seq, _ = self._ledger.audit_head()
                if existing and head_seq <= existing[-1].seq + 1:
                    return None
            cp = add_signed_checkpoint(self._ledger, self._key)
            self.added += 1
            return cp

    def start(self) -> Checkpointer:
        """Start the periodic thread (a daemon; :meth:`stop` ends it)."""
        if self._interval > 0 and self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="audit-checkpointer", daemon=True
            )
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.checkpoint_now()
            except Exception:
                # A missed checkpoint must be visible but must not stop the next one.
                log.exception("audit checkpoint failed; retrying in %.1f s", self._interval)

    def stop(self) -> Checkpoint | None:
        """Stop the thread and add the shutdown checkpoint (if the chain moved)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        return self.checkpoint_now()
