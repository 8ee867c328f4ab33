"""What the core asks of a worker pool, as a protocol: the core never starts processes.

Bulk jobs (OPRF batches, KKRT hashing, match-key derivation) accept an ``Executor`` and run
in the caller when given None.  ``concurrent.futures.Executor`` satisfies the protocol; the
process pools themselves are adapters (``protocol.adapters.workers``,
``protocol.adapters.pools``).  See docs/architecture.md, Layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

__all__ = ["Executor", "Job"]

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)


class Job(Protocol[_T_co]):
    """A submitted job (a ``concurrent.futures.Future``)."""

    def result(self, timeout: float | None = None) -> _T_co: ...

    def cancel(self) -> bool: ...


class Executor(Protocol):
    """Ordered ``map`` and ``submit`` over worker processes."""

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Job[_T]: ...

    def map(self, fn: Callable[..., _T], *iterables: Iterable[Any]) -> Iterator[_T]: ...
