"""Cuckoo hashing for the KKRT engine: table size, the failure bound, bins and insertion.

The requester places each of its n distinct items into one of three candidate bins of a
table of m bins (one item per bin); the custodian puts every record into all three of
its candidate bins ("simple hashing").  Each bin is one OPRF instance, so m (plus the
stash) is also the evaluation budget the requester spends.

**Parameters.**  Three hash functions giving three *distinct* bins per item,
m = ceil(1.30 n) (rounded up so that m + stash is a multiple of 8), no stash.  The
failure probability is <= 2^-40 for every n (and far below it for large n):

* *Source of the bound.*  A placement exists iff Hall's condition holds: every set S of
  items sees at least |S| bins.  A minimal violating set has exactly |S| - 1 bins, each
  hit at least twice by S (a bin hit once could be dropped with its item).  So, for
  ideal hash functions, P(fail) <= sum_k C(n,k) C(m,k-1) P_k, where P_k bounds the
  probability that k items pick all their triples inside a given (k-1)-set and cover
  each of its bins at least twice; the "at least twice" factor is bounded with the
  saddle-point inequality [x^T] f(x) <= f(x)/x^T.  ``failure_bound_log2`` evaluates this
  sum exactly (log-space numpy).  It is a rigorous first-moment bound, so it needs a
  little more room than the 1.27 n that PSI implementations take from empirical
  extrapolations of three-hash tables (Pinkas, Schneider, Zohner and later Weinert,
  Wieder); this engine does not rely on those: the bound proves 2^-40 from
  m/n ~ 1.297 upwards at large n, so 1.30 costs 2.4% more bins than 1.27.
* *Numbers* (log2 of the bound at m = ``table_size(n)`` ~ 1.30 n, stash 0): n = 2^14:
  -70.2, 2^16: -80.2, 2^18: -90.2, 2^20: -100.2, 2^21: -105.2 (it falls with n at a
  fixed ratio; ``tests/test_kkrt.py`` re-checks 2^14).  For comparison the
  same bound says nothing at 1.27 n (it is > 0 there for all these n: a weaker proof
  technique, not a measured failure).  Below n = 2^14 the bound is weaker, so
  ``table_size`` searches upward from 1.30 n for the smallest m whose bound is <= 2^-40
  (n = 5000: 1.304 n; n = 1000: 1.336 n; n = 100: 2.32 n; n = 10: 80 bins), because
  for tiny tables "four items pick the same three bins" is a real risk.
* Stash slots barely help this bound (the large-set terms dominate), so the default
  stash is 0; ``stash`` stays supported and each slot costs one bin of budget plus one
  evaluation of *every* custodian record.

**Insertion** runs a vectorized parallel random walk (all homeless items claim a bin at
once; the bin keeps one, evicted and losing items move to another of their bins), then
an exact augmenting-path search for any item still homeless, so it fails only if no
placement exists, or (to bound the work on tables far over capacity) when more than
``_EXACT_LIMIT`` items are left after the walk or one search visits more than
``_SEARCH_LIMIT`` items; at the default load neither happens (the walk alone places
everything, and a free bin is found within a few steps).  Items that cannot be placed
go to the stash; beyond the stash the caller re-hashes with fresh keys (see
``protocol.crypto.kkrt``).  Empirically (n = 1024, 2000 trials each) not one placement failed
at m/n = 1.15, 1.20, 1.25, 1.27 or 1.30; no experiment can show 2^-40, hence the bound.
"""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache

import numpy as np

__all__ = [
    "CUCKOO_HASHES",
    "EXPANSION",
    "STAT_SECURITY",
    "CuckooPlacement",
    "candidate_bins",
    "failure_bound_log2",
    "place",
    "table_size",
]

CUCKOO_HASHES = 3
#: m / n for large n; see the module docstring for the bound behind it.
EXPANSION = 1.30
#: Target: cuckoo failure probability <= 2^-STAT_SECURITY.
STAT_SECURITY = 40
#: Below this n the bound is evaluated at run time (it is cheap there).
_CHECKED_BELOW = 1 << 14
_MIN_BINS = 8
_WALK_ROUNDS = 2000
_EXACT_LIMIT = 256
_SEARCH_LIMIT = 200_000  # items one augmenting-path search may visit


# --------------------------------------------------------------------------- the bound


def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def _log_cover_twice(balls: np.ndarray, bins: np.ndarray, lf: np.ndarray) -> np.ndarray:
    """log of an upper bound on P(every one of ``bins`` bins gets >= 2 of ``balls`` balls).

    Balls thrown uniformly and independently.  The count of such throws is
    T! [x^T] (e^x - 1 - x)^j, bounded by T! (e^x - 1 - x)^j / x^T at the saddle point x,
    found here by bisection on log x (vectorized over all sizes at once).
    """
    t = balls.astype(np.float64)
    j = bins.astype(np.float64)

    def f(x: np.ndarray) -> np.ndarray:  # e^x - 1 - x, accurate for small x
        fx: np.ndarray = np.where(x < 1e-4, x * x / 2 + x**3 / 6, np.expm1(x) - x)
        return fx

    lo = np.full_like(t, -30.0)
    hi = np.full_like(t, 12.0)
    for _ in range(70):  # solve j x (e^x - 1) / f(x) = T
        mid = (lo + hi) / 2
        x = np.exp(mid)
        above = j * x * np.expm1(x) / f(x) > t
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    x = np.exp((lo + hi) / 2)
    bound: np.ndarray = lf[balls] - t * np.log(j) + j * np.log(f(x)) - t * np.log(x)
    return bound


def failure_bound_log2(n: int, bins: int, stash: int = 0) -> float:
    """log2 of the union bound on P(no placement of n items with ``stash`` slots).

    Ideal hash functions, three distinct bins per item.  Returns -inf when no violating
    set can exist.  Cost is O(n) numpy work (about a second at n = 2^20).
    """
    if n < 0 or bins < CUCKOO_HASHES or stash < 0:
        raise ValueError("need n >= 0, bins >= 3, stash >= 0")
    k = np.arange(2 + stash, n + 1, dtype=np.int64)
    j = k - 1 - stash  # bins the k items are confined to
    keep = j >= CUCKOO_HASHES
    k, j = k[keep], j[keep]
    if k.size == 0:
        return float("-inf")
    lf = _log_factorials(max(n, bins, 3 * n) + 1)

    def log_comb(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
        out: np.ndarray = lf[a] - lf[b] - lf[np.subtract(a, b)]
        return out

    log_triples_m = float(log_comb(bins, CUCKOO_HASHES))
    base = log_comb(n, k) + log_comb(bins, j) + k * (log_comb(j, CUCKOO_HASHES) - log_triples_m)
    # Inside the set the triples are uniform distinct triples: bound the twice-cover
    # probability for unconstrained throws and divide by P(all k triples distinct).
    jf = j.astype(np.float64)
    log_distinct = k * (np.log1p(-1 / jf) + np.log1p(-2 / jf))
    cover = np.minimum(0.0, _log_cover_twice(3 * k, j, lf) - log_distinct)
    terms = base + cover
    top = float(terms.max())
    return (top + math.log(float(np.exp(terms - top).sum()))) / math.log(2)


def _round_rows(bins: int, stash: int) -> int:
    """Smallest m' >= bins with m' + stash a multiple of 8 (whole bytes per column)."""
    return bins + (-(bins + stash)) % 8


@lru_cache(maxsize=256)
def table_size(n: int, stash: int = 0) -> int:
    """Number of cuckoo bins m for n distinct items (failure <= 2^-40, see module doc)."""
    if n < 0 or stash < 0:
        raise ValueError("n and stash must be non-negative")
    bins = max(_MIN_BINS, math.ceil(EXPANSION * n))
    if n >= _CHECKED_BELOW or failure_bound_log2(n, bins, stash) <= -STAT_SECURITY:
        return _round_rows(bins, stash)
    lo, hi = bins, 2 * bins  # the bound falls as the table grows: bracket, then bisect
    while failure_bound_log2(n, hi, stash) > -STAT_SECURITY:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if failure_bound_log2(n, mid, stash) <= -STAT_SECURITY:
            hi = mid
        else:
            lo = mid
    return _round_rows(hi, stash)


# --------------------------------------------------------------------------- bins


def candidate_bins(words: np.ndarray, bins: int) -> np.ndarray:
    """Three distinct bins per item from three uniform 64-bit words per item.

    ``words`` is (n, >=3) uint64 (from AES under a per-session key).  The first bin is
    uniform over m, the second over the other m-1, the third over the other m-2, so the
    ordered triple is uniform among distinct triples (bias <= m / 2^64 per value).
    """
    if bins < CUCKOO_HASHES:
        raise ValueError("a table needs at least 3 bins")
    w = words.astype(np.uint64, copy=False)
    h0 = w[:, 0] % np.uint64(bins)
    h1 = w[:, 1] % np.uint64(bins - 1)
    h1 += h1 >= h0
    lo = np.minimum(h0, h1)
    hi = np.maximum(h0, h1)
    h2 = w[:, 2] % np.uint64(bins - 2)
    h2 += h2 >= lo
    h2 += h2 >= hi
    return np.stack([h0, h1, h2], axis=1).astype(np.int64)


# --------------------------------------------------------------------------- insertion


class CuckooPlacement:
    """Where each item went: a bin (0..m-1) via hash function ``table`` (0..2), or stash.

    ``bin_of[i]`` is the OPRF instance of item i: its cuckoo bin, or m + slot for a
    stash slot.  ``table_of[i]`` is the hash-function index, or 3 + slot for the stash:
    the custodian's tag set it must be compared with.  ``item_in[r]`` is the item in
    instance r, or -1 for a dummy.
    """

    def __init__(self, bin_of: np.ndarray, table_of: np.ndarray, bins: int, stash: int) -> None:
        self.bin_of = bin_of
        self.table_of = table_of
        self.bins = bins
        self.stash = stash
        self.item_in = np.full(bins + stash, -1, dtype=np.int64)
        self.item_in[bin_of] = np.arange(bin_of.size, dtype=np.int64)


def _walk(cands: np.ndarray, bins: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Parallel random-walk insertion; returns (table, homeless items)."""
    n = cands.shape[0]
    table = np.full(bins, -1, dtype=np.int64)
    choice = np.zeros(n, dtype=np.int64)
    pending = np.arange(n, dtype=np.int64)
    for _ in range(_WALK_ROUNDS):
        if pending.size == 0:
            break
        target = cands[pending, choice[pending]]
        previous = table[target]
        table[target] = pending  # with duplicate targets one claimant wins
        won = table[target] == pending
        evicted = previous[won]
        pending = np.concatenate([pending[~won], evicted[evicted >= 0]])
        # move each homeless item to one of its other two bins, at random
        choice[pending] = (choice[pending] + rng.integers(1, 3, size=pending.size)) % 3
    return table, pending


def _augment(item: int, cands: np.ndarray, table: np.ndarray) -> bool:
    """Place ``item`` along a shortest augmenting path (BFS over evictions), if one exists."""
    parent: dict[int, tuple[int, int]] = {}  # bin -> (item that would move in, previous bin)
    queue: deque[tuple[int, int]] = deque([(item, -1)])
    seen_items = {item}
    while queue and len(seen_items) <= _SEARCH_LIMIT:
        current, came_from = queue.popleft()
        for b in cands[current].tolist():
            if b in parent or b == came_from:
                continue
            parent[b] = (current, came_from)
            occupant = int(table[b])
            if occupant < 0:  # free bin: shift every item on the path one step
                while b != -1:
                    mover, prev = parent[b]
                    table[b] = mover
                    b = prev
                return True
            if occupant not in seen_items:
                seen_items.add(occupant)
                queue.append((occupant, b))
    return False


def place(cands: np.ndarray, bins: int, stash: int, rng: np.random.Generator) -> CuckooPlacement:
    """Place every item (row of ``cands``) in one of its bins or the stash.

    Raises ``OverflowError`` when more than ``stash`` items cannot be placed; the caller
    turns that into a re-hash or a ``CuckooHashingError``.
    """
    n = cands.shape[0]
    if n > bins + stash:
        raise OverflowError(f"{n} items cannot fit {bins} bins and {stash} stash slots")
    table, homeless = _walk(cands, bins, rng)
    if homeless.size > stash + _EXACT_LIMIT:
        raise OverflowError(f"{homeless.size} items left after the random walk")
    stashed = [int(i) for i in homeless.tolist() if not _augment(int(i), cands, table)]
    if len(stashed) > stash:
        raise OverflowError(f"{len(stashed)} items need the stash; it holds {stash}")
    bin_of = np.empty(n, dtype=np.int64)
    table_of = np.empty(n, dtype=np.int64)
    occupied = np.flatnonzero(table >= 0)
    items = table[occupied]
    bin_of[items] = occupied
    # which of its three hash functions put the item there (the bins are distinct)
    table_of[items] = np.argmax(cands[items] == occupied[:, None], axis=1)
    for slot, i in enumerate(stashed):
        bin_of[i] = bins + slot
        table_of[i] = CUCKOO_HASHES + slot
    return CuckooPlacement(bin_of, table_of, bins, stash)
