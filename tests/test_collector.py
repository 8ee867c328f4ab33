"""The services' collector policy (protocol.adapters.collector): frozen while held, and no
cyclic garbage kept past the jobs that froze it."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator

import pytest

from protocol.adapters import collector


class Node:
    """A cycle of these is garbage only the cyclic collector frees."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cyclic_garbage() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """Leave the test process's collector as it was found."""
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.collect()


def test_settle_collects_first_then_freezes_what_is_alive() -> None:
    dead = cyclic_garbage()
    kept = [Node() for _ in range(100)]
    frozen = collector.settle()
    assert dead() is None  # collected before the freeze, not kept frozen forever
    assert frozen >= len(kept)
    # no generation holds them now, so no pass visits them
    in_generations = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
    assert not any(id(node) in in_generations for node in kept)


def test_a_hold_freezes_until_the_last_holder_ends_and_then_collects_its_garbage() -> None:
    first = collector.hold()
    second = collector.hold()
    first.__enter__()
    made_in_first = cyclic_garbage()  # garbage from the moment it is made
    second.__enter__()  # freezes it: a full pass cannot free it while held
    gc.collect()
    assert made_in_first() is not None
    assert collector.holders() == 2
    first.__exit__(None, None, None)
    gc.collect()
    assert made_in_first() is not None  # still held by the second job
    assert gc.get_freeze_count() > 0
    second.__exit__(None, None, None)
    assert collector.holders() == 0
    assert made_in_first() is None  # the last holder's exit unfroze and collected it


def test_a_failing_job_releases_its_hold() -> None:
    with pytest.raises(RuntimeError), collector.hold():
        assert collector.holders() == 1
        raise RuntimeError("the job failed")
    assert collector.holders() == 0


def test_holds_from_several_threads_balance() -> None:
    barrier = threading.Barrier(8)
    seen: list[int] = []

    def job() -> None:
        with collector.hold():
            barrier.wait()  # all eight hold at once
            seen.append(collector.holders())
            barrier.wait()

    threads = [threading.Thread(target=job) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [8] * 8
    assert collector.holders() == 0
