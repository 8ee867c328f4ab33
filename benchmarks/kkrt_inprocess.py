"""In-process throughput of the KKRT engine (issue 8), phase by phase.

Runs both parties of ``protocol.crypto.kkrt`` in one process, no network, on synthetic match
keys shaped like the real ones (rule id + TIN + date of birth), with a known number of
true matches, and checks the match set against a plain set intersection.

    .venv/bin/python -m benchmarks.kkrt_inprocess --sizes 100000 1300000 --workers 0 2

Times are wall-clock per phase plus the process CPU time; the box may be shared with
other jobs, so the 1/5/15-minute load averages are printed before and after each run.
``--workers 0`` runs everything in the calling process; ``--workers k`` hands the BLAKE2b
work (key digests and the OPRF hash H) to a forkserver pool of k processes.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import psutil

from protocol.adapters.workers import process_pool
from protocol.crypto import kkrt


def synthetic_keys(n_queries: int, n_records: int, matches: int, seed: int = 7
                   ) -> tuple[list[bytes], list[bytes]]:
    """Distinct TIN+DOB-like keys; the first ``matches`` queries are custodian records."""
    rng = np.random.default_rng(seed)
    total = n_records + n_queries - matches
    tins = rng.choice(900_000_000, size=total, replace=False) + 100_000_000
    days = rng.integers(0, 36_500, size=total)
    keys = [b"\x01\x07tin+dob\x00\x09%d\x00\x0a%05d" % (t, d)
            for t, d in zip(tins.tolist(), days.tolist(), strict=True)]
    records = keys[:n_records]
    queries = keys[:matches] + keys[n_records:]
    order = rng.permutation(n_queries)
    return [queries[i] for i in order.tolist()], records


def _worker_cpu(executor: ProcessPoolExecutor | None) -> float:
    """CPU seconds used so far by the pool's workers (children of the forkserver)."""
    if executor is None:
        return 0.0
    total = 0.0
    for pid in list(getattr(executor, "_processes", {}) or {}):
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def run_once(n: int, records: int, matches: int, workers: int, chunk_bins: int,
             profile: bool) -> None:
    queries, record_keys = synthetic_keys(n, records, matches)
    executor = process_pool(workers) if workers > 0 else None
    if executor is not None:  # start the workers before timing (forkserver start-up)
        list(executor.map(abs, range(workers * 2)))
    load_before = os.getloadavg()
    cpu0 = time.process_time()
    worker0 = _worker_cpu(executor)
    wall0 = time.perf_counter()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    result = kkrt.run_kkrt_in_process(
        queries, record_keys, seed_context=b"bench|auth|sess", executor=executor,
        chunk_bins=chunk_bins,
    )
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    child_cpu = _worker_cpu(executor) - worker0
    if executor is not None:
        executor.shutdown()
    got = {queries[i] for i in result.matches}
    want = set(queries) & set(record_keys)
    status = "OK" if got == want else f"MISMATCH ({len(got)} vs {len(want)})"
    print(f"\n== n={n:,} queries x N={records:,} records, {matches:,} true matches, "
          f"workers={workers}, chunk={chunk_bins} bins: {status}")
    print(f"   load average before {load_before}, after {os.getloadavg()}")
    print(f"   instances m+s = {result.requester.units:,} "
          f"(m/n = {result.requester.units / max(n, 1):.3f}), cuckoo attempt "
          f"{result.requester.attempt}")
    print(f"   {'phase':<26} {'wall s':>8} {'CPU s':>8}")
    for phase, seconds in result.timings.items():
        print(f"   {phase:<26} {seconds:8.3f} {result.cpu[phase]:8.3f}")
    print(f"   {'wall (driver)':<26} {wall:8.3f} s   process CPU {cpu:.3f} s, "
          f"worker CPU {child_cpu:.3f} s")
    print("   requester:", {k: round(v, 3) for k, v in result.requester.timings.items()})
    print("   custodian:", {k: round(v, 3) for k, v in result.custodian.timings.items()})
    total_wire = sum(result.wire_bytes.values())
    print(f"   wire bytes: {result.wire_bytes} = {total_wire / 2**20:.1f} MiB; "
          f"{result.wire_bytes['extension'] / max(n, 1):.1f} B/query (extension), "
          f"{result.wire_bytes['tags'] / max(records, 1):.1f} B/record (tags)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"   peak RSS (this process, both parties) {peak:.0f} MiB")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_300_000])
    parser.add_argument("--records", type=int, default=None,
                        help="custodian records (default: same as each size)")
    parser.add_argument("--match-rate", type=float, default=47_289 / 1_280_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--chunk-bins", type=int, default=kkrt.DEFAULT_CHUNK_BINS)
    parser.add_argument("--profile", action="store_true", help="cProfile the in-process run")
    args = parser.parse_args(argv)
    for n in args.sizes:
        records = args.records or n
        matches = min(records, int(n * args.match_rate))
        for workers in args.workers:
            run_once(n, records, matches, workers, args.chunk_bins, args.profile)


if __name__ == "__main__":
    main()
