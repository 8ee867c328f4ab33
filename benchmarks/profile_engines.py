"""Where an identity-tier session spends its time, engine by engine, in one process.

Drives the real session objects (``RequesterSession`` and a ``Custodian`` with a real SQLite
ledger and real worker pools, one pool per side as the two services have) on a cached
benchmark scenario (``python -m benchmarks.scale`` writes them to ``benchmarks/data``), and
times each step the services time: the requester's session build, open (incl. the
custodian's index or key table), every exchange, local match, disclosure, close.  Both
parties share this process, so work the services overlap runs one after the other here;
use it to find hot spots (``--profile`` adds a cProfile of the whole session), and the
scale runner for end-to-end figures.

    .venv/bin/python -m benchmarks.profile_engines --size 1300000 --engine kkrt --repeat 3
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pickle
import pstats
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import protocol as psi
from benchmarks.scale import DEFAULT_DATA_DIR, scenario_spec
from protocol.adapters.pools import BatchPool
from protocol.cli.help import HelpFormatter
from protocol.domain.recordstore import load_custodian_csv, load_query_csv
from protocol.sessions.identity import run_exchanges


def _load(path: Path, loader: Any, cache: Path | None) -> Any:
    """Validated records of a scenario file, pickled under ``cache`` for the next run."""
    pickled = None if cache is None else cache / f"{path.parent.name}-{path.stem}.pickle"
    if pickled is not None and pickled.exists():
        with pickled.open("rb") as f:
            return pickle.load(f)  # our own cache file
    with path.open(encoding="utf-8-sig", newline="") as f:
        records = loader(f, today=date.today())[0]
    if pickled is not None:
        pickled.parent.mkdir(parents=True, exist_ok=True)
        with pickled.open("wb") as f:
            pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)
    return records


def _signed(authority: Ed25519PrivateKey, engine: str, rules: Sequence[str], units: int,
            disclosures: int) -> psi.SignedAuthorization:
    now = int(time.time())
    return psi.sign_authorization(psi.draft_authorization(
        authority_key=authority, requester_id="agency-a", custodian_id="agency-b",
        statute="26 U.S.C. 6103(i)(2)", purpose="engine profile", tier=psi.Tier.IDENTITY,
        max_evaluations=units, max_disclosures=disclosures, match_rules=list(rules),
        disclosure_fields=["zip"], retention_days=1, not_before=now - 60,
        not_after=now + 3600, engines=[engine]), authority)


def cpu_seconds() -> float:
    """CPU seconds of this process and its live children (the worker pools): on a loaded
    machine a steadier A/B figure than wall time."""
    me = psutil.Process()
    total = 0.0
    for p in (me, *me.children(recursive=True)):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


_OLDEST = 2  # CPython's generations are 0, 1, 2
#: the timed steps of one session, in order
PHASES = ("prepare", "open", "exchanges", "match", "disclose", "close")


class GcClock:
    """Wall seconds the cyclic garbage collector ran, and its full (oldest-generation)
    passes: a pass walks every tracked object, and cProfile books it as time inside
    whatever Python code happened to allocate (a loaded host inflates it like any wall
    time)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._started = 0.0

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self._tick)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._tick)

    def _tick(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._started
        self.full += info["generation"] == _OLDEST


def one_session(queries: Any, records: Any, engine: str, rules: Sequence[str],
                pools: tuple[Any, Any], tmp: Path, profile: bool) -> dict[str, float]:
    """Seconds per step of one session (a fresh custodian, so its key table is built), and
    CPU seconds: per step of this process (``<step>_cpu``: both parties' session work, the
    pools excluded) and of the whole session (``cpu``: this process and both pools)."""
    authority, a_key, b_key = (Ed25519PrivateKey.generate() for _ in range(3))
    signed = _signed(authority, engine, rules, units=4 * len(queries) * len(rules),
                     disclosures=len(queries))
    policy = psi.CustodianPolicy(
        custodian_id="agency-b", allowed_engines=frozenset({"oprf", "kkrt"}),
        trusted_authorities={psi.authority_key_id(authority.public_key()):
                             authority.public_key()})
    ledger = psi.Ledger(tmp / f"b-{time.monotonic_ns()}.sqlite")
    custodian = psi.Custodian(psi.CustodianConfig(
        policy=policy, records=records, ledger=ledger, master_secret=os.urandom(32),
        signing_key=b_key, requester_keys={"agency-a": a_key.public_key()}, ops=pools[1]))
    seconds: dict[str, float] = {}
    collector = GcClock()
    cpu0 = cpu_seconds()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        # wall, CPU of this process (both parties' session work, the pools excluded), and
        # the part of it the garbage collector took
        t, c, g = time.perf_counter(), time.process_time(), collector.seconds
        yield
        seconds[name] = time.perf_counter() - t
        seconds[f"{name}_cpu"] = time.process_time() - c
        seconds[f"{name}_gc"] = collector.seconds - g

    with collector:
        with phase("prepare"):
            requester = psi.RequesterSession(signed, queries, signing_key=a_key, engine=engine,
                                             custodian_key=b_key.public_key(), ops=pools[0])
        side = custodian.session()
        with phase("open"):
            requester.handle(side.handle(requester.open_request(), peer_id="agency-a"))
        with phase("exchanges"):
            run_exchanges(requester, side)
        with phase("match"):
            matches = requester.match()
        # what every full collection pass walks, at the session's most allocating phase
        seconds["tracked_objects"] = float(len(gc.get_objects()))
        if profile:
            print("objects the collector tracks, by type:", Counter(
                type(o).__name__ for o in gc.get_objects()).most_common(12))
        with phase("disclose"):
            for req in requester.disclosure_requests():
                requester.handle(side.handle(req))
        with phase("close"):
            requester.handle(side.handle(requester.close_request()))
    if profiler is not None:
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(30)
        print(out.getvalue())
    seconds["total"] = sum(seconds[k] for k in PHASES)
    seconds["cpu"] = cpu_seconds() - cpu0
    seconds["gc"] = collector.seconds
    seconds["gc_full_passes"] = float(collector.full)
    seconds["matches"] = float(len(matches))
    ledger.close()
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--size", type=int, default=100_000,
                        help="scenario N (1300000 = the 1.28M x 1.3M headline scenario)")
    parser.add_argument("--engine", default="kkrt", help="registered match engine")
    parser.add_argument("--rules", default="tin+dob", help="comma-separated match rules")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes per side")
    parser.add_argument("--repeat", type=int, default=1, help="sessions; medians are printed")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="scenario cache of the scale runner")
    parser.add_argument("--cache", type=Path, default=None,
                        help="directory to keep the validated scenario in (pickled) between runs")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of the first session")
    args = parser.parse_args(argv)
    spec = scenario_spec(args.size)
    found = sorted(args.data_dir.glob(f"scenario-q{spec.queries}-r{spec.records}-*"))
    if not found:
        parser.error(f"no cached scenario for size {args.size} in {args.data_dir}; "
                     "run benchmarks.scale for that size first")
    t = time.perf_counter()
    queries = _load(found[0] / "queries.csv", load_query_csv, args.cache)
    records = _load(found[0] / "custodian.csv", load_custodian_csv, args.cache)
    print(f"loaded {len(queries):,} queries, {len(records):,} records in "
          f"{time.perf_counter() - t:.1f}s")
    rules = [r for r in args.rules.split(",") if r]
    runs: list[dict[str, float]] = []
    with (BatchPool(args.workers).warm() as pool_a, BatchPool(args.workers).warm() as pool_b,
          tempfile.TemporaryDirectory() as tmp):
        for i in range(args.repeat):
            load = os.getloadavg()[0]
            got = one_session(queries, records, args.engine, rules, (pool_a, pool_b),
                              Path(tmp), args.profile and i == 0)
            runs.append(got)
            print(f"try {i + 1}: load {load:.2f} " + " ".join(
                f"{k} {v:.2f}" for k, v in got.items() if k != "matches")
                + f" matches {int(got['matches']):,}")
    print("median: " + " ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}"
                                for k in runs[0] if k != "matches"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
