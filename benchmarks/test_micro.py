"""Micro-benchmarks of the OPRF hot path, 10,000 elements per call.

Run with ``make bench-micro`` (``pytest benchmarks/ --benchmark-only --benchmark-enable``).
Never part of ``make test``: pytest's ``testpaths`` is ``tests/`` only.

Why these operations: they are what the match step spends its CPU on (see the floor in
``benchmarks.scale``), so a regression in any of them moves the headline number.  Each
benchmark also checks its result, so a fast wrong answer fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from protocol.crypto import oprf
from protocol.domain.records import encode_match_key

N = 10_000
CUSTODIAN_TAGS = 1_300_000
TAG_SIZE = 12
ROUNDS = 3


def _keys(n: int) -> list[bytes]:
    """tin+dob match keys with the real encoding and length."""
    return [
        encode_match_key("tin+dob", [f"{200000000 + 104729 * i % 699999999:09d}",
                                     f"19{40 + i % 60:02d}-{1 + i % 12:02d}-{1 + i % 28:02d}"])
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def inputs() -> list[bytes]:
    return _keys(N)


@pytest.fixture(scope="module")
def key() -> bytes:
    sk, _pk = oprf.derive_key_pair(bytes(range(32)), b"gated-psi/bench/micro")
    return sk


@pytest.fixture(scope="module")
def blinded(inputs: list[bytes]) -> tuple[bytes, bytes]:
    return oprf.blind_batch(inputs)


@pytest.fixture(scope="module")
def evaluated(key: bytes, blinded: tuple[bytes, bytes]) -> bytes:
    return oprf.blind_evaluate_batch(key, blinded[1])


# ``benchmark`` is pytest-benchmark's fixture; its methods are untyped, so it is ``Any`` here.
def _run(benchmark: Any, fn: Callable[..., Any], *args: Any) -> Any:
    benchmark.extra_info["elements"] = N
    return benchmark.pedantic(fn, args=args, rounds=ROUNDS, iterations=1, warmup_rounds=0)


def test_hash_to_group(benchmark: Any, inputs: list[bytes]) -> None:
    out = _run(benchmark, lambda xs: [oprf.hash_to_group(x) for x in xs], inputs)
    assert len(out) == N and len(set(out)) == N
    assert all(oprf.deserialize_element(e) == e for e in out[:100])


def test_blind(benchmark: Any, inputs: list[bytes]) -> None:
    blinds, blinded = _run(benchmark, oprf.blind_batch, inputs)
    assert len(blinds) == len(blinded) == N * 32


def test_blind_evaluate(benchmark: Any, key: bytes, blinded: tuple[bytes, bytes]) -> None:
    out = _run(benchmark, oprf.blind_evaluate_batch, key, blinded[1])
    assert len(out) == N * 32
    assert out[:32] == oprf.blind_evaluate(key, blinded[1][:32])


def test_finalize(benchmark: Any, key: bytes, inputs: list[bytes], blinded: tuple[bytes, bytes],
                  evaluated: bytes) -> None:
    out = _run(benchmark, oprf.finalize_batch, inputs, blinded[0], evaluated)
    assert len(out) == N
    # Blinding must cancel out: the blind protocol gives exactly Evaluate(k, x).
    assert out[0] == oprf.evaluate(key, inputs[0])
    assert out[-1] == oprf.evaluate(key, inputs[-1])


def test_evaluate(benchmark: Any, key: bytes, inputs: list[bytes]) -> None:
    out = _run(benchmark, oprf.evaluate_batch, key, inputs)
    assert len(out) == N and all(len(o) == oprf.OUTPUT_SIZE for o in out)


@pytest.fixture(scope="module")
def tag_index() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1.3M sorted S12 custodian tags, and 10,000 query tags of which half are present."""
    dtype = np.dtype(f"S{TAG_SIZE}")
    tags = np.sort(np.frombuffer(os.urandom(CUSTODIAN_TAGS * TAG_SIZE), dtype=dtype))
    rng = np.random.default_rng(7)
    present = tags[rng.choice(CUSTODIAN_TAGS, size=N // 2, replace=False)]
    absent = np.frombuffer(os.urandom((N - N // 2) * TAG_SIZE), dtype=dtype)
    queries = np.concatenate([present, absent])
    expected = np.isin(queries, tags)
    return tags, queries, expected


def _lookup(tags: np.ndarray, queries: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(tags, queries)
    pos[pos >= len(tags)] = 0
    hits: np.ndarray = tags[pos] == queries
    return hits


def test_tag_lookup(benchmark: Any, tag_index: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    tags, queries, expected = tag_index
    benchmark.extra_info["elements"] = N
    benchmark.extra_info["custodian_tags"] = CUSTODIAN_TAGS
    hits = benchmark.pedantic(_lookup, args=(tags, queries), rounds=20, iterations=1)
    assert np.array_equal(hits, expected)
    assert int(hits.sum()) >= N // 2
