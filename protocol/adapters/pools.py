"""The worker pools that run the core's batch functions on every core.

The core (``protocol.crypto.oprf``, ``protocol.sessions.aggregate``) holds the per-chunk
functions and accepts an ops object (``oprf.GroupOps``, ``aggregate.AggregateOps``); the
processes live here, at the edge, with the lifecycle of ``workers.WorkerPool``.  Each pool
cuts a batch into chunks, runs them through its executor in input order and passes every
chunk its offset, so a bad element is still named by its index in the whole batch.
See docs/architecture.md, Layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

from protocol.adapters.workers import WorkerPool
from protocol.crypto import oprf
from protocol.sessions.aggregate import (
    ELEMENT_SIZE,
    SerialAggregateOps,
    check_elements,
    hash_multiply_span,
    multiply_span,
)

__all__ = ["AggregatePool", "BatchPool"]


class BatchPool(WorkerPool):
    """``oprf.GroupOps`` on several processes, with results in input order.

    ctypes releases the GIL inside libsodium, but the Python work around every
    call (hashing, slicing, marshalling) does not, so processes, not threads, are
    what fill every core.
    Work is cut into chunks of at most ``chunk_size`` elements (fewer, if that is
    what it takes to keep every worker busy); batches smaller than ``min_parallel``
    run in-process because shipping them costs more than it saves. ``workers=1``
    never starts a pool.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        chunk_size: int = 8192,
        min_parallel: int = 512,
        start_method: str | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        super().__init__(workers, min_parallel=min_parallel, start_method=start_method)
        self.chunk_size = chunk_size

    def _spans(self, n: int) -> list[tuple[int, int]] | None:
        """Chunk boundaries for n elements, or None to run in-process."""
        if self._executor is None or n < self.min_parallel:
            return None
        size = max(1, min(self.chunk_size, -(-n // self.workers)))
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def blind(self, inputs: Sequence[bytes], blinds: bytes | None = None) -> tuple[bytes, bytes]:
        """Parallel ``oprf.blind_batch``: returns (blinds_buffer, blinded_buffer)."""
        if blinds is not None:
            blinds = bytes(blinds)
        spans = self._spans(len(inputs))
        if (spans is None or self._executor is None
                or (blinds is not None and len(blinds) != len(inputs) * 32)):
            return oprf.blind_batch(inputs, blinds)
        parts = list(self._executor.map(
            oprf.blind_batch,
            [inputs[a:b] for a, b in spans],
            repeat(None) if blinds is None else [blinds[a * 32 : b * 32] for a, b in spans],
            [a for a, _ in spans],
        ))
        return b"".join(p[0] for p in parts), b"".join(p[1] for p in parts)

    def blind_evaluate(self, sk: bytes, blinded_buffer: bytes) -> bytes:
        """Parallel ``oprf.blind_evaluate_batch``; a bad element is named by its global index."""
        sk = oprf.deserialize_scalar(sk)
        blinded_buffer = bytes(blinded_buffer)
        spans = self._spans(len(blinded_buffer) // oprf.ELEMENT_SIZE)
        if spans is None or self._executor is None or len(blinded_buffer) % oprf.ELEMENT_SIZE:
            # A wrong length is reported by the serial path with the whole buffer's size.
            return oprf.blind_evaluate_batch(sk, blinded_buffer)
        return b"".join(self._executor.map(
            oprf.blind_evaluate_batch,
            repeat(sk),
            [blinded_buffer[a * 32 : b * 32] for a, b in spans],
            [a for a, _ in spans],
        ))

    def finalize(self, inputs: Sequence[bytes], blinds: bytes, evaluated: bytes) -> list[bytes]:
        """Parallel ``oprf.finalize_batch`` (batch inversion happens per chunk)."""
        blinds, evaluated = bytes(blinds), bytes(evaluated)
        n = len(inputs)
        spans = self._spans(n)
        if (spans is None or self._executor is None
                or len(blinds) != n * 32 or len(evaluated) != n * 32):
            # Wrong lengths are reported by the serial path with the full-batch sizes.
            return oprf.finalize_batch(inputs, blinds, evaluated)
        parts = self._executor.map(
            oprf.finalize_batch,
            [inputs[a:b] for a, b in spans],
            [blinds[a * 32 : b * 32] for a, b in spans],
            [evaluated[a * 32 : b * 32] for a, b in spans],
            [a for a, _ in spans],
        )
        return [output for part in parts for output in part]

    def evaluate(self, sk: bytes, inputs: Sequence[bytes]) -> list[bytes]:
        """Parallel ``oprf.evaluate_batch``."""
        sk = oprf.deserialize_scalar(sk)
        spans = self._spans(len(inputs))
        if spans is None or self._executor is None:
            return oprf.evaluate_batch(sk, inputs)
        parts = self._executor.map(
            oprf.evaluate_batch, repeat(sk), [inputs[a:b] for a, b in spans],
            [a for a, _ in spans],
        )
        return [output for part in parts for output in part]


class AggregatePool(WorkerPool):
    """Process pool for the aggregate tier's group operations.

    Same conventions as :class:`BatchPool` (forkserver, results in input order, small
    batches in-process).  One long-lived pool per service.
    """

    def __init__(
        self, workers: int | None = None, *, min_parallel: int = 256,
        start_method: str | None = None,
    ) -> None:
        super().__init__(workers, min_parallel=min_parallel, start_method=start_method)
        self._serial = SerialAggregateOps()

    def _spans(self, n: int) -> list[tuple[int, int]] | None:
        if self._executor is None or n < self.min_parallel:
            return None
        size = -(-n // self.workers)
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def hash_multiply(self, scalar: bytes, inputs: Sequence[bytes]) -> bytes:
        spans = self._spans(len(inputs))
        if spans is None or self._executor is None:
            return self._serial.hash_multiply(scalar, inputs)
        futures = [self._executor.submit(hash_multiply_span, scalar, inputs[a:b])
                   for a, b in spans]
        return b"".join(f.result() for f in futures)

    def multiply(self, scalar: bytes, elements: bytes) -> bytes:
        n = check_elements(elements, "element buffer")
        spans = self._spans(n)
        if spans is None or self._executor is None:
            return self._serial.multiply(scalar, elements)
        elements = bytes(elements)
        futures = [
            self._executor.submit(multiply_span, scalar,
                                  elements[a * ELEMENT_SIZE:b * ELEMENT_SIZE], a)
            for a, b in spans
        ]
        return b"".join(f.result() for f in futures)
