"""One worker-process pool lifecycle for every bulk job (OPRF, aggregate tier, KKRT).

Processes, not threads: the Python work around each libsodium or hashlib call holds the
GIL.  forkserver (spawn where it is missing): a gRPC service is threaded and must never
fork.  Use one long-lived pool per service; a worker costs a fraction of a second to start.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from types import TracebackType
from typing import Self

__all__ = ["WorkerPool", "process_pool"]


def process_pool(workers: int | None = None, start_method: str | None = None
                 ) -> ProcessPoolExecutor:
    """A process pool that never forks the (threaded) caller."""
    methods = multiprocessing.get_all_start_methods()
    method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
    return ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1,
                               mp_context=multiprocessing.get_context(method))


def _warm_worker(_: int) -> None:
    """Runs once per worker so its interpreter and libraries are loaded ahead of work."""
    time.sleep(0.05)


class WorkerPool:
    """``workers`` processes (none for one worker: everything then runs in the caller).

    Batches smaller than ``min_parallel`` stay in-process because shipping them costs more
    than it saves; subclasses decide how to cut the rest.
    """

    def __init__(self, workers: int | None = None, *, min_parallel: int = 1,
                 start_method: str | None = None) -> None:
        if workers is None:
            workers = os.cpu_count() or 1
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.min_parallel = max(1, min_parallel)
        self._executor: Executor | None = (
            process_pool(workers, start_method) if workers > 1 else None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def executor(self) -> Executor | None:
        """The worker processes (None for one worker), for other bulk jobs to share."""
        return self._executor

    def warm(self) -> Self:
        """Start every worker now (services call this at start-up), not in the first session."""
        if self._executor is not None:
            list(self._executor.map(_warm_worker, range(self.workers)))
        return self

    def close(self) -> None:
        """Stop the workers; pending jobs are cancelled."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
