"""The services' policy for CPython's cyclic garbage collector (docs/architecture.md,
Long-lived bulk data).

A full collection visits every object the collector tracks, and every item of every list
among them. A service holds million-item structures for its whole life (the custodian's
records and prepared tables) or for a whole job (the requester's session), and a large
session triggers a dozen or more full passes, each walking all of it again. Frozen objects
(``gc.freeze``) are skipped by every pass; they are still freed by reference counting when
the last reference goes, so freezing costs nothing but the cyclic garbage among them, which
waits until they are unfrozen.

The library never calls this: an application that embeds it keeps its own collector
settings. The service processes call :func:`settle` once their startup data is built, and
wrap each job in :func:`hold`.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["hold", "holders", "settle"]

_lock = threading.Lock()
_holders = 0


def settle() -> int:
    """Collect the garbage, then freeze everything still alive: what the process holds now
    lives as long as it does. Returns how many objects are frozen."""
    with _lock:
        return _collect_and_freeze()


def _collect_and_freeze() -> int:
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextmanager
def hold() -> Iterator[None]:
    """Freeze everything alive now (a job's bulk data, built) until the last job holding
    ends; then unfreeze, collect what the jobs left as cyclic garbage, and :func:`settle`
    again, so nothing is kept frozen past the jobs that needed it."""
    global _holders
    with _lock:
        gc.freeze()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                gc.unfreeze()
                _collect_and_freeze()


def holders() -> int:
    """Jobs holding a freeze now (0 when the process is idle)."""
    with _lock:
        return _holders
