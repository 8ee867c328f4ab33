"""``make bench``: the identity tier at scale, end to end, beside its floor and OpenMined PSI.

Why a separate runner and not a pytest-benchmark suite: the claim to check is about the
whole system (two service processes, gRPC with mTLS on loopback, every worker process),
at sizes up to the headline 1.28M queries x 1.3M records (docs/architecture.md, Benchmark
scenario).  For each size it

1. generates (or reuses, from ``benchmarks/data/``) the seeded scenario;
2. works out in plaintext which queries *should* match under the rule (the same
   validation and scoping as the services), to check the private result against it;
3. starts the custodian (agency-b) and the requester (agency-a) services as processes,
   runs ``agency-a match`` and records per-phase wall time, CPU time and peak RSS of each
   service *process tree* (psutil, sampled every 0.2 s), payload bytes per direction and
   the matches, then reads the matched query ids back and compares them;
4. runs OpenMined PSI on exactly the same match-key bytes in its own virtualenv
   (``benchmarks/openmined_runner.py``; its protobuf pin conflicts with ours).

In the same run it measures the single-core cost of each group operation the protocol
needs and prints the *floor*: operations needed at that size x per-operation cost / cores.
The floor is what perfect parallelism with zero protocol, I/O and Python overhead would
cost; actual / floor is the overhead factor of everything else.

Results are merged into ``benchmarks/results/latest.json`` (a run replaces the previous
run of the same engine and size) and rendered by :mod:`benchmarks.report`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import importlib.metadata
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from protocol.adapters.files import open_csv, open_private_log
from protocol.adapters.scenario import GENERATOR_VERSION, ScenarioFiles, ScenarioSpec, generate

__all__ = [
    "HEADLINE_SIZE",
    "OpCosts",
    "PlaintextExpectation",
    "TreeSampler",
    "ensure_openmined_venv",
    "ensure_scenario",
    "main",
    "measure_op_costs",
    "plaintext_expectation",
    "run_benchmark",
    "run_openmined",
    "run_oprf",
    "scenario_spec",
]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO / "benchmarks" / "data"
DEFAULT_RESULTS_DIR = REPO / "benchmarks" / "results"
OPENMINED_VENV = REPO / ".venv-openmined"
OPENMINED_REQUIREMENT = "openmined-psi>=2.0,<3"
OPENMINED_RUNNER = Path(__file__).resolve().parent / "openmined_runner.py"
#: ``--sizes 1300000`` means the headline scenario (1.28M queries x 1.3M records).
HEADLINE_SIZE = 1_300_000
DEFAULT_RULES = ("tin+dob",)
ENGINES = ("oprf", "kkrt", "kkrt-prepared", "openmined")
#: engines that run through our two services (the others run in-process); "kkrt-prepared"
#: is KKRT with the custodian's authorization-independent key digests built at start-up
SERVICE_ENGINES = ("oprf", "kkrt", "kkrt-prepared")
PY = sys.executable
OPENMINED_FPR = 1e-9
SERVICE_START_TIMEOUT = 1800.0


# --------------------------------------------------------------------------- scenarios


def scenario_spec(size: int) -> ScenarioSpec:
    """N queries x N records, except the headline size: the scenario of docs/architecture.md,
    Benchmark scenario."""
    if size == HEADLINE_SIZE:
        return ScenarioSpec()
    return ScenarioSpec().scaled(size, size)


def _scenario_dir(data_dir: Path, spec: ScenarioSpec) -> Path:
    return data_dir / f"scenario-q{spec.queries}-r{spec.records}-s{spec.seed}-g{GENERATOR_VERSION}"


def ensure_scenario(spec: ScenarioSpec, data_dir: Path, console: Console) -> ScenarioFiles:
    """Generate the scenario once and reuse it: its manifest records the exact spec."""
    out = _scenario_dir(data_dir, spec)
    files = ScenarioFiles.in_dir(out)
    if files.manifest.exists():
        try:
            manifest = json.loads(files.manifest.read_text())
        except json.JSONDecodeError:
            manifest = {}
        same = (manifest.get("spec") == dataclasses.asdict(spec)
                and manifest.get("generator_version") == GENERATOR_VERSION)
        if same and all(p.exists() for p in (files.custodian, files.queries, files.truth)):
            console.log(f"scenario {spec.queries:,} x {spec.records:,}: cached in {out}")
            return files
    t0 = time.perf_counter()
    with console.status(f"generating scenario {spec.queries:,} x {spec.records:,}"):
        files = generate(spec, out, progress=False)
    console.log(f"scenario {spec.queries:,} x {spec.records:,}: generated in "
                f"{time.perf_counter() - t0:.1f}s ({out})")
    return files


# --------------------------------------------------------------------------- per-op cost


@dataclass(frozen=True)
class OpCosts:
    """Single-core seconds per group operation, measured in this run on ``sample`` elements.

    * ``hash_to_group``: RFC 9497 HashToGroup (expand_message_xmd + ristretto255 map);
    * ``scalarmult``: one variable-base scalar multiplication, from ``blind_evaluate_batch``
      per element minus its validation;
    * ``unblind``: ``finalize_batch`` per element minus its validation (batch inversion
      share, the unblinding scalar multiplication and the Finalize hash);
    * ``validate``: canonical-encoding and group-membership check of a received element.
    """

    hash_to_group: float
    scalarmult: float
    unblind: float
    validate: float
    sample: int

    def counts(self, query_elements: int, custodian_elements: int) -> dict[str, int]:
        """How many of each operation one session needs.

        Requester: blind = HashToGroup + scalarmult; finalize = validate + unblind.
        Custodian: index = HashToGroup + scalarmult per record element;
        BlindEvaluate = validate + scalarmult per query element.
        """
        q, r = query_elements, custodian_elements
        return {"hash_to_group": q + r, "scalarmult": 2 * q + r, "unblind": q,
                "validate": 2 * q}

    def floor_seconds(self, query_elements: int, custodian_elements: int, cores: int) -> float:
        """Operations x per-op cost / cores: the time with perfect parallelism, no overhead."""
        counts = self.counts(query_elements, custodian_elements)
        total: float = sum(n * getattr(self, op) for op, n in counts.items())
        return total / max(cores, 1)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (v * 1e6 if k != "sample" else v) for k, v in d.items()}


def _synthetic_keys(n: int) -> list[bytes]:
    """tin+dob match keys of the real encoding and length (values made up)."""
    from protocol.domain.records import encode_match_key

    return [
        encode_match_key("tin+dob", [f"{100000000 + 7919 * i:09d}",
                                     f"19{50 + i % 50:02d}-{1 + i % 12:02d}-{1 + i % 28:02d}"])
        for i in range(n)
    ]


def _per_element(fn: Any, n: int, blocks: int) -> float:
    """Median over ``blocks`` calls of fn(block) seconds per element (robust to a busy box)."""
    times = []
    for b in range(blocks):
        t0 = time.perf_counter()
        fn(b)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def measure_op_costs(sample: int = 20_000, blocks: int = 4) -> OpCosts:
    """Measure each group operation on ``sample`` elements in this process, single core."""
    import rbcl

    from protocol.crypto import oprf

    per = max(1, sample // blocks)
    inputs = [_synthetic_keys(per) for _ in range(blocks)]
    sk, _pk = oprf.derive_key_pair(bytes(range(32)), b"gated-psi/bench/op-costs")
    prepared = [oprf.blind_batch(x) for x in inputs]
    evaluated = [oprf.blind_evaluate_batch(sk, blinded) for _, blinded in prepared]
    is_valid = rbcl.crypto_core_ristretto255_is_valid_point
    identity = bytes(32)

    def validate(b: int) -> None:
        buf = prepared[b][1]
        for s in range(0, len(buf), 32):
            e = buf[s:s + 32]
            if e == identity or e[31] & 0x80 or not is_valid(e):
                raise AssertionError("invalid element in benchmark input")

    h2g = oprf.hash_to_group
    t_h2g = _per_element(lambda b: [h2g(x) for x in inputs[b]], per, blocks)
    t_valid = _per_element(validate, per, blocks)
    t_eval = _per_element(lambda b: oprf.blind_evaluate_batch(sk, prepared[b][1]), per, blocks)
    t_fin = _per_element(
        lambda b: oprf.finalize_batch(inputs[b], prepared[b][0], evaluated[b]), per, blocks)
    return OpCosts(hash_to_group=t_h2g, scalarmult=max(t_eval - t_valid, 0.0),
                   unblind=max(t_fin - t_valid, 0.0), validate=t_valid, sample=per * blocks)


# --------------------------------------------------------------------------- sampling


class TreeSampler:
    """CPU seconds and RSS of labelled processes *and all their descendants*.

    Pool workers are grandchildren (forkserver), so the tree is walked recursively.  CPU is
    the sum over every pid ever seen of its last observed user+system time, so a worker's
    time survives its exit up to one sampling interval.  RSS is tracked for the root process
    alone and for the tree (sum of RSS, so pages shared after fork count more than once:
    an upper bound).
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._roots: dict[str, psutil.Process] = {}
        self._cpu: dict[str, dict[tuple[int, float], float]] = {}
        self.peak_rss: dict[str, int] = {}
        self.peak_tree_rss: dict[str, int] = {}
        self._history: dict[str, list[tuple[float, float]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def watch(self, label: str, pid: int) -> None:
        with self._lock:
            self._roots[label] = psutil.Process(pid)
            self._cpu[label] = {}
            self.peak_rss[label] = 0
            self.peak_tree_rss[label] = 0
            self._history[label] = []
        self.sample()

    def unwatch(self, label: str) -> None:
        with self._lock:
            self._roots.pop(label, None)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            for label, root in list(self._roots.items()):
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                tree_rss = 0
                cpu = self._cpu[label]
                for p in procs:
                    try:
                        with p.oneshot():
                            t = p.cpu_times()
                            rss = p.memory_info().rss
                            created = p.create_time()
                    except psutil.Error:
                        continue
                    cpu[(p.pid, created)] = t.user + t.system
                    tree_rss += rss
                    if p.pid == root.pid:
                        self.peak_rss[label] = max(self.peak_rss[label], rss)
                self.peak_tree_rss[label] = max(self.peak_tree_rss[label], tree_rss)
                self._history[label].append((time.perf_counter(), sum(cpu.values())))

    def cpu_seconds(self, label: str) -> float:
        """CPU seconds of the tree so far (samples first, so the value is current)."""
        self.sample()
        with self._lock:
            return sum(self._cpu.get(label, {}).values())

    def cpu_between(self, label: str, start: float, stop: float) -> float:
        """CPU seconds of the tree between two ``time.perf_counter()`` instants.

        Interpolated linearly between samples, so it is exact to about one interval.
        """
        with self._lock:
            hist = list(self._history.get(label, []))
        if not hist:
            return 0.0

        def at(t: float) -> float:
            if t <= hist[0][0]:
                return hist[0][1]
            for (t0, c0), (t1, c1) in itertools.pairwise(hist):
                if t0 <= t <= t1:
                    return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
            return hist[-1][1]

        return max(at(stop) - at(start), 0.0)

    def processes(self, label: str) -> int:
        with self._lock:
            return len(self._cpu.get(label, {}))


# --------------------------------------------------------------------------- plaintext


@dataclass
class PlaintextExpectation:
    """What the private match must produce, computed in the clear with the services' rules.

    ``query_keys`` / ``custodian_keys`` are the exact OPRF inputs of each side (accepted
    queries x rules; in-scope, valid custodian records x rules): OpenMined gets these bytes.
    """

    queries: int
    records: int
    accepted_queries: int
    usable_records: int
    query_keys: list[bytes]
    custodian_keys: list[bytes]
    expected: set[tuple[str, str]]  # (query_record_id, rule_id) that must match
    correct: int  # of those, the ones whose matched record is the ground-truth person
    true_matches: int  # rows in truth.csv
    seconds: float


def _read_truth(path: Path) -> dict[str, str]:
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["query_record_id"]: row["custodian_record_id"] for row in csv.DictReader(fh)}


def plaintext_expectation(files: ScenarioFiles, rules: Sequence[str],
                          excluded_classes: frozenset[str] = frozenset()) -> PlaintextExpectation:
    """Join the plaintext match keys exactly as the two services would select them."""
    from protocol.domain.records import (
        match_keys_bulk,
        read_person_csv_with_lines,
        read_query_csv_with_lines,
        validate_persons,
        validate_queries,
    )

    t0 = time.perf_counter()
    today = dt.date.today()
    with open_csv(files.custodian) as fh:
        rows = read_person_csv_with_lines(fh)
    n_records = len(rows)
    persons, _refused = validate_persons(rows, today=today)
    del rows
    persons = [p for p in persons if p.record_class not in excluded_classes]
    ids = [p.record_id for p in persons]
    ckeys = match_keys_bulk(persons, list(rules), today=today)
    del persons
    by_key: dict[bytes, list[str]] = {}
    custodian_keys: list[bytes] = []
    for rule in rules:
        for rid, key in zip(ids, ckeys[rule], strict=True):
            if key is not None:
                custodian_keys.append(key)
                by_key.setdefault(key, []).append(rid)
    del ckeys

    with open_csv(files.queries) as fh:
        qrows = read_query_csv_with_lines(fh)
    n_queries = len(qrows)
    report = validate_queries(qrows, today=today)
    del qrows
    accepted = [q.person for q in report.accepted]
    qids = [p.record_id for p in accepted]
    qkeys = match_keys_bulk(accepted, list(rules), today=today)
    del accepted, report
    truth = _read_truth(files.truth)
    query_keys: list[bytes] = []
    expected: set[tuple[str, str]] = set()
    correct = 0
    for rule in rules:
        for qid, key in zip(qids, qkeys[rule], strict=True):
            if key is None:
                continue
            query_keys.append(key)
            hit = by_key.get(key)
            if hit is not None:
                expected.add((qid, rule))
                correct += truth.get(qid) in hit
    return PlaintextExpectation(
        queries=n_queries, records=n_records, accepted_queries=len(qids),
        usable_records=len(ids), query_keys=query_keys, custodian_keys=custodian_keys,
        expected=expected, correct=correct, true_matches=len(truth),
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- services


def _cli(args: list[str], *, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([PY, "-m", *args], text=True, capture_output=True, timeout=timeout,
                          check=False, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"step failed ({proc.returncode}): {' '.join(args)}\n"
                           f"{proc.stderr}{proc.stdout}")
    return proc


def _wait_port(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    from agency_a.demo import DemoFailure, wait_port

    try:
        return wait_port(path, proc, timeout=timeout)
    except DemoFailure as exc:
        raise RuntimeError(f"{exc} (see {path.parent / 'service.log'})") from None


def setup_credentials(work: Path) -> None:
    """Authority key, development CA with mTLS certificates, agency secrets, default policy.

    Same layout as ``agency_a.demo`` so its helpers apply.
    """
    _cli(["protocol.cli.authority", "keygen", "--out", str(work / "authority")])
    _cli(["protocol.cli.authority", "dev-ca", "--out", str(work / "certs"),
          "--agency", "agency-a", "--agency", "agency-b",
          "--server", "agency-a", "--server", "agency-b"])
    _cli(["agency_b.cli", "init", "--out", str(work / "agency-b" / "secrets")])
    _cli(["agency_a.cli", "init", "--out", str(work / "agency-a" / "secrets"),
          "--operator", "bench"])
    _cli(["protocol.cli.authority", "policy-template", "--custodian", "agency-b",
          "--trust", str(work / "authority" / "authority.pub.json"), "--engines", "oprf,kkrt",
          "--out", str(work / "agency-b" / "policy.json")])


def _issue(work: Path, name: str, rules: Sequence[str], max_evaluations: int,
           max_disclosures: int) -> Path:
    out = work / f"{name}.auth.json"
    _cli(["protocol.cli.authority", "issue", "--key", str(work / "authority" / "authority.key"),
          "--requester", "agency-a", "--custodian", "agency-b",
          "--statute", "26 U.S.C. 6103(i)(2)", "--purpose", "benchmark of the match step",
          "--rules", ",".join(rules), "--fields", "address,city,state,zip",
          "--max-evaluations", str(max_evaluations), "--max-disclosures", str(max_disclosures),
          "--valid-days", "2", "--retention-days", "1", "--engines", "oprf,kkrt",
          "--out", str(out), "--force"])
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@dataclass
class _Services:
    a_port: int
    b_port: int
    a_startup_s: float
    b_startup_s: float


@contextmanager
def _services(work: Path, run_dir: Path, files: ScenarioFiles, sampler: TreeSampler,
              workers: int | None, prepare_kkrt: str = "") -> Iterator[_Services]:
    """Start the custodian and the requester as separate processes; stop them afterwards."""
    b_dir, a_dir = run_dir / "agency-b", run_dir / "agency-a"
    b_dir.mkdir(parents=True, exist_ok=True)
    a_dir.mkdir(parents=True, exist_ok=True)
    extra = ["--workers", str(workers)] if workers else []
    b_extra = [*extra, "--prepare", f"kkrt={prepare_kkrt}"] if prepare_kkrt else extra
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.perf_counter()
        with open_private_log(b_dir / "service.log") as b_log:
            b = subprocess.Popen([
                PY, "-m", "agency_b.cli", "serve", "--records", str(files.custodian),
                "--policy", str(work / "agency-b" / "policy.json"),
                "--ledger", str(b_dir / "ledger.sqlite"),
                "--secrets", str(work / "agency-b" / "secrets"), "--certs", str(work / "certs"),
                "--listen", "127.0.0.1:0", "--port-file", str(b_dir / "port"),
                "--requester-key",
                f"agency-a={work / 'agency-a' / 'secrets' / 'signing.pub.json'}",
                "--log-level", "warning", *b_extra,
            ], stderr=b_log, cwd=REPO)
        procs.append(b)
        sampler.watch("b", b.pid)
        with open_private_log(a_dir / "service.log") as a_log:
            a = subprocess.Popen([
                PY, "-m", "agency_a.cli", "serve", "--certs", str(work / "certs"),
                "--secrets", str(work / "agency-a" / "secrets"), "--data", str(a_dir / "data"),
                "--listen", "127.0.0.1:0", "--port-file", str(a_dir / "port"),
                "--custodian-key", f"agency-b={work / 'agency-b' / 'secrets' / 'signing.pub.json'}",
                "--log-level", "warning", *extra,
            ], stderr=a_log, cwd=REPO)
        procs.append(a)
        sampler.watch("a", a.pid)
        # The custodian (loading its records) is almost always the last one up.
        b_port = _wait_port(b_dir / "port", b, SERVICE_START_TIMEOUT)
        b_startup = time.perf_counter() - t0
        a_port = _wait_port(a_dir / "port", a, SERVICE_START_TIMEOUT)
        a_startup = time.perf_counter() - t0
        yield _Services(a_port=a_port, b_port=b_port, a_startup_s=a_startup,
                        b_startup_s=b_startup)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        sampler.unwatch("a")
        sampler.unwatch("b")


def _machine() -> dict[str, Any]:
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        sodium = importlib.metadata.version("rbcl")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        sodium = ""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "rbcl": sodium,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def run_oprf(files: ScenarioFiles, spec: ScenarioSpec, plain: PlaintextExpectation,
             rules: Sequence[str], costs: OpCosts, work: Path, sampler: TreeSampler,
             console: Console, *, workers: int | None = None,
             engine: str = "oprf") -> dict[str, Any]:
    """One identity-tier session over gRPC/mTLS between the two service processes.

    ``engine`` is the match engine of the session: ``oprf`` (RFC 9497) or ``kkrt``
    (OT extension; one budget unit per cuckoo bin, so its budget is larger).
    """
    # Both services share this machine, so the floor divides by its cores, not by --workers.
    cores = os.cpu_count() or 1
    machine = _machine()
    run_dir = Path(tempfile.mkdtemp(prefix=f"q{spec.queries}-", dir=work))
    auth = _issue(work, run_dir.name, rules, max_evaluations=2 * spec.queries * len(rules),
                  max_disclosures=max(spec.queries, 1))
    summary_path = run_dir / "summary.json"
    match_engine = "kkrt" if engine.startswith("kkrt") else engine
    prepare = ",".join(rules) if engine == "kkrt-prepared" else ""
    with _services(work, run_dir, files, sampler, workers, prepare) as svc:
        console.log(f"services up: custodian :{svc.b_port} (loaded records in "
                    f"{svc.b_startup_s:.1f}s), requester :{svc.a_port}")
        cpu_a0, cpu_b0 = sampler.cpu_seconds("a"), sampler.cpu_seconds("b")
        t0 = time.perf_counter()
        with console.status(f"{engine}: matching {spec.queries:,} x {spec.records:,} "
                            "over gRPC/mTLS"):
            proc = subprocess.run([
                PY, "-m", "agency_a.cli", "match", "--server", f"127.0.0.1:{svc.a_port}",
                "--certs", str(work / "certs"), "--operator", "bench",
                "--authorization", str(auth), "--queries", str(files.queries),
                "--custodian", f"127.0.0.1:{svc.b_port}", "--summary-json", str(summary_path),
                "--no-progress", "--show-refused", "0", "--engine", match_engine,
            ], text=True, capture_output=True, check=False, cwd=REPO)
        t_end = time.perf_counter()
        e2e = t_end - t0
        cpu_a_e2e = sampler.cpu_seconds("a") - cpu_a0
        cpu_b_e2e = sampler.cpu_seconds("b") - cpu_b0
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if proc.returncode != 0 or "failed" in summary:
            raise RuntimeError(f"agency-a match failed: {summary.get('failed', '')}\n"
                               f"{proc.stdout}{proc.stderr}")
        # The session ends just before the CLI exits; its wall time dates its start.
        t_session = t_end - float(summary["wall_seconds"])
        cpu_a = sampler.cpu_between("a", t_session, t_end)
        cpu_b = sampler.cpu_between("b", t_session, t_end)
        got = _cli(["agency_a.cli", "results", "--server", f"127.0.0.1:{svc.a_port}",
                    "--certs", str(work / "certs"), "--operator", "bench",
                    "--job", summary["job_id"], "--purpose", "benchmark accuracy check",
                    "--limit", str(10**9)])
        startup = {"custodian_load": svc.b_startup_s, "requester_start": svc.a_startup_s}
    matched = {tuple(line.split("\t")[:2]) for line in got.stdout.splitlines() if line}
    phases = {k: float(v) for k, v in summary.get("phase_seconds", {}).items()}
    wall = float(summary["wall_seconds"])
    q_el, r_el = int(summary["elements_evaluated"]), int(summary["custodian_tags"])
    # The group-operation floor bounds the OPRF engine only; KKRT does no per-element EC work.
    floor = costs.floor_seconds(q_el, r_el, cores) if engine == "oprf" else None
    return {
        "engine": engine,
        "queries": spec.queries,
        "records": spec.records,
        "rules": list(rules),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu_a + cpu_b, 3),
        "cpu_a_s": round(cpu_a, 3),
        "cpu_b_s": round(cpu_b, 3),
        "cpu_e2e_s": round(cpu_a_e2e + cpu_b_e2e, 3),
        "floor_s": None if floor is None else round(floor, 3),
        "e2e_wall_s": round(e2e, 3),
        "bytes_a_to_b": int(summary["bytes_a_to_b"]),
        "bytes_b_to_a": int(summary["bytes_b_to_a"]),
        "peak_rss_a": sampler.peak_rss["a"],
        "peak_rss_b": sampler.peak_rss["b"],
        "peak_rss_tree_a": sampler.peak_tree_rss["a"],
        "peak_rss_tree_b": sampler.peak_tree_rss["b"],
        "matches": int(summary["matches"]),
        "true_matches": plain.true_matches,
        "expected_matches": len(plain.expected),
        "correct_matches": plain.correct if matched == plain.expected else None,
        "matches_agree_with_plaintext": matched == plain.expected,
        "accepted_queries": int(summary["queries_accepted"]),
        "query_elements": q_el,
        "custodian_elements": r_el,
        "disclosed_records": int(summary.get("disclosed_records", 0)),
        "phases": {k: round(v, 3) for k, v in {
            **phases, "index_build_est": phases.get("open", 0.0), **startup,
            "cli_upload_validate": max(e2e - wall, 0.0)}.items()},
        "op_costs_us": costs.as_dict(),
        "op_counts": costs.counts(q_el, r_el),
        "cores": cores,
        "machine": {**machine, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "timestamp": _now(),
    }


# --------------------------------------------------------------------------- OpenMined


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_openmined_venv(venv: Path = OPENMINED_VENV, console: Console | None = None) -> Path:
    """A separate virtualenv with ``openmined-psi`` (its protobuf pin conflicts with ours)."""
    py = _venv_python(venv)
    probe = [str(py), "-c", "import private_set_intersection.python"]
    if py.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return py
    if console is not None:
        console.log(f"creating {venv} with {OPENMINED_REQUIREMENT}")
    base = shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", OPENMINED_REQUIREMENT],
                   check=True)
    subprocess.run(probe, check=True)
    return py


def _write_hex(path: Path, keys: Sequence[bytes]) -> None:
    with path.open("w", encoding="ascii") as fh:
        for k in keys:
            fh.write(k.hex())
            fh.write("\n")


def run_openmined(spec: ScenarioSpec, plain: PlaintextExpectation, work: Path,
                  sampler: TreeSampler, console: Console, *,
                  venv: Path = OPENMINED_VENV) -> dict[str, Any]:
    """OpenMined PSI, in-process client and server, on exactly our OPRF inputs."""
    py = ensure_openmined_venv(venv, console)
    machine = _machine()
    tmp = Path(tempfile.mkdtemp(prefix=f"openmined-q{spec.queries}-", dir=work))
    server_file, client_file, out = tmp / "server.hex", tmp / "client.hex", tmp / "result.json"
    _write_hex(server_file, plain.custodian_keys)
    _write_hex(client_file, plain.query_keys)
    with console.status(f"openmined: {len(plain.query_keys):,} x {len(plain.custodian_keys):,}"):
        proc = subprocess.Popen([str(py), str(OPENMINED_RUNNER), "--server-keys",
                                 str(server_file), "--client-keys", str(client_file),
                                 "--fpr", str(OPENMINED_FPR), "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        sampler.watch("openmined", proc.pid)
        stdout, stderr = proc.communicate()
        cpu_total = sampler.cpu_seconds("openmined")
        sampler.unwatch("openmined")
    if proc.returncode != 0:
        raise RuntimeError(f"openmined runner failed ({proc.returncode}):\n"
                           f"{stdout.decode()}{stderr.decode()}")
    res = json.loads(out.read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "engine": "openmined",
        "queries": spec.queries,
        "records": spec.records,
        "rules": res.get("rules") or [],
        "wall_s": round(res["wall_s"], 3),
        "cpu_s": round(res["cpu_s"], 3),
        "floor_s": None,
        "bytes_a_to_b": res["bytes_a_to_b"],
        "bytes_b_to_a": res["bytes_b_to_a"],
        # Client and server share one process in OpenMined's standard usage.
        "peak_rss_a": res["peak_rss"],
        "peak_rss_b": res["peak_rss"],
        "matches": res["intersection"],
        "true_matches": plain.true_matches,
        "expected_matches": len(plain.expected),
        "matches_agree_with_plaintext": res["intersection"] == len(plain.expected),
        "query_elements": res["client_items"],
        "custodian_elements": res["server_items"],
        "phases": res["phases"],
        "process_cpu_s": round(cpu_total, 3),
        "openmined": {k: res[k] for k in ("version", "fpr", "data_structure", "threads")
                      if k in res},
        "machine": {**machine, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "timestamp": _now(),
    }


# --------------------------------------------------------------------------- driver


def _best(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs (noise on a shared box only ever adds time)."""
    best = dict(min(tries, key=lambda r: r["wall_s"]))
    best["repeats"] = len(tries)
    best["wall_s_all"] = [r["wall_s"] for r in tries]
    return best


def _merge(existing: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New runs replace earlier runs of the same engine and size; the rest are kept."""
    keys = {(r["engine"], r["queries"], r["records"]) for r in new}
    kept = [r for r in existing
            if (r.get("engine"), r.get("queries"), r.get("records")) not in keys]
    return sorted([*kept, *new], key=lambda r: (r["records"], r["queries"], r["engine"]))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _print_size(console: Console, runs: list[dict[str, Any]]) -> None:
    t = Table(title=f"{runs[0]['queries']:,} queries x {runs[0]['records']:,} records")
    for col in ("engine", "wall s", "cpu s", "floor s", "actual/floor", "A->B", "B->A",
                "peak RSS A", "peak RSS B", "matches", "expected", "true"):
        t.add_column(col, justify="left" if col == "engine" else "right")
    for r in runs:
        floor = r.get("floor_s")
        t.add_row(r["engine"], f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                  f"{floor:.2f}" if floor else "-",
                  f"{r['wall_s'] / floor:.2f}" if floor else "-",
                  f"{r['bytes_a_to_b']:,}", f"{r['bytes_b_to_a']:,}",
                  _gib(r["peak_rss_a"]), _gib(r["peak_rss_b"]),
                  f"{r['matches']:,}", f"{r.get('expected_matches', 0):,}",
                  f"{r['true_matches']:,}")
    console.print(t)
    ours = next((r for r in runs if r["engine"] == "oprf"), None)
    theirs = next((r for r in runs if r["engine"] == "openmined"), None)
    if ours:
        ph = ", ".join(f"{k} {v:.2f}s" for k, v in ours["phases"].items())
        console.print(f"oprf phases: {ph}")
        console.print(f"oprf: actual {ours['wall_s']:.2f}s vs floor {ours['floor_s']:.2f}s "
                      f"-> ratio {ours['wall_s'] / max(ours['floor_s'], 1e-9):.2f}; "
                      f"matches agree with plaintext: {ours['matches_agree_with_plaintext']}")
    if ours and theirs:
        console.print(f"OpenMined / ours (wall): [bold]{theirs['wall_s'] / ours['wall_s']:.2f}x"
                      f"[/bold]   (cpu: {theirs['cpu_s'] / max(ours['cpu_s'], 1e-9):.2f}x)")


def run_benchmark(
    sizes: Sequence[int],
    engines: Sequence[str] = ENGINES,
    rules: Sequence[str] = DEFAULT_RULES,
    *,
    data_dir: Path = DEFAULT_DATA_DIR,
    results_dir: Path = DEFAULT_RESULTS_DIR,
    op_sample: int = 20_000,
    workers: int | None = None,
    fresh: bool = False,
    keep_work: bool = False,
    repeat: int = 1,
    repeat_engines: Sequence[str] | None = None,
    console: Console | None = None,
    venv: Path = OPENMINED_VENV,
) -> list[dict[str, Any]]:
    """Run every engine at every size; merge into ``results_dir/latest.json`` and render it.

    ``repeat_engines`` (default: all) are the engines run ``repeat`` times; the others run
    once, so the short KKRT runs can be repeated in the same run as a 7-minute OpenMined one.
    """
    from benchmarks import report
    from protocol.adapters.files import read_policy

    console = console or (Console() if sys.stdout.isatty() else Console(width=150))
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engines {unknown}; choose from {ENGINES}")
    data_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    if "openmined" in engines:
        ensure_openmined_venv(venv, console)

    work = Path(tempfile.mkdtemp(prefix="gated-psi-bench-"))
    new_runs: list[dict[str, Any]] = []
    try:
        setup_credentials(work)
        excluded = read_policy(work / "agency-b" / "policy.json").excluded_record_classes
        with TreeSampler() as sampler:
            for size in sizes:
                spec = scenario_spec(size)
                console.rule(f"{spec.queries:,} queries x {spec.records:,} records")
                files = ensure_scenario(spec, data_dir, console)
                with console.status("plaintext expectation (validation + match keys)"):
                    plain = plaintext_expectation(files, rules, excluded)
                console.log(f"plaintext: {plain.accepted_queries:,} accepted queries, "
                            f"{plain.usable_records:,} usable records, "
                            f"{len(plain.expected):,} expected matches "
                            f"({plain.correct:,} of {plain.true_matches:,} true) "
                            f"in {plain.seconds:.1f}s")
                tries: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
                # Engines alternate within each repeat so a noisy spell hits both alike.
                for attempt in range(repeat):
                    for engine in engines:
                        if attempt and repeat_engines is not None \
                                and engine not in repeat_engines:
                            continue
                        if engine in SERVICE_ENGINES:
                            # Measured right before the run it bounds: both see the same box.
                            costs = _measure_costs(op_sample, console)
                            run = run_oprf(files, spec, plain, rules, costs, work, sampler,
                                           console, workers=workers, engine=engine)
                        else:
                            run = run_openmined(spec, plain, work, sampler, console, venv=venv)
                        planned = repeat if repeat_engines is None or engine in repeat_engines \
                            else 1
                        console.log(f"{engine} (try {attempt + 1}/{planned}): wall "
                                    f"{run['wall_s']:.2f}s, {run['matches']:,} matches")
                        tries[engine].append(run)
                size_runs = [_best(tries[e]) for e in engines]
                _print_size(console, size_runs)
                new_runs.extend(size_runs)
                del plain
    finally:
        if keep_work:
            console.log(f"working directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    latest = results_dir / "latest.json"
    existing: list[dict[str, Any]] = []
    if latest.exists() and not fresh:
        try:
            existing = json.loads(latest.read_text())
        except json.JSONDecodeError:
            existing = []
    runs = _merge(existing, new_runs)
    latest.write_text(json.dumps(runs, indent=2) + "\n")
    outputs = report.render(runs, results_dir)
    console.log(f"wrote {latest}, " + ", ".join(str(p) for p in outputs))
    return new_runs


def _measure_costs(sample: int, console: Console) -> OpCosts:
    with console.status(f"measuring per-op group costs on {sample:,} elements"):
        costs = measure_op_costs(sample)
    console.log("per-op cost (single core, µs): " + ", ".join(
        f"{k} {v:.1f}" for k, v in costs.as_dict().items() if k != "sample"))
    return costs


def _sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        if not part:
            continue
        mult = 1
        if part[-1] in "km":
            mult = 1000 if part[-1] == "k" else 1_000_000
            part = part[:-1]
        out.append(int(float(part) * mult))
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("sizes must be positive integers")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.scale --sizes 10000,100000,1300000 --engines oprf,openmined``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description="Identity tier end to end at scale (two services, gRPC/mTLS on loopback), "
        "its group-operation floor, and OpenMined PSI on identical inputs. "
        f"Size {HEADLINE_SIZE} means the headline 1,280,000 x 1,300,000 scenario.")
    p.add_argument("--sizes", type=_sizes, default=[10_000, 100_000],
                   help="comma-separated N (N queries x N records); default 10000,100000")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated: oprf, openmined (default: both)")
    p.add_argument("--rules", default=",".join(DEFAULT_RULES),
                   help="match rules (default tin+dob: one set, comparable to OpenMined)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="scenario cache (default benchmarks/data, gitignored)")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    p.add_argument("--op-sample", type=int, default=20_000,
                   help="elements for the per-op cost measurement (default 20000)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes per service (default: all cores)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per engine and size; the fastest is kept, all walls recorded")
    p.add_argument("--repeat-engines", default=None,
                   help="comma-separated engines that --repeat applies to (default: all); "
                        "the others run once")
    p.add_argument("--fresh", action="store_true",
                   help="replace latest.json instead of merging into it")
    p.add_argument("--keep-work", action="store_true", help="keep keys, ledgers and logs")
    p.add_argument("--openmined-venv", type=Path, default=OPENMINED_VENV)
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    try:
        run_benchmark(args.sizes, engines, rules, data_dir=args.data_dir,
                      results_dir=args.results_dir, op_sample=args.op_sample,
                      workers=args.workers, fresh=args.fresh, keep_work=args.keep_work,
                      repeat=args.repeat,
                      repeat_engines=(None if args.repeat_engines is None else
                                      [e.strip() for e in args.repeat_engines.split(",")]),
                      venv=args.openmined_venv)
    except (RuntimeError, ValueError, OSError, subprocess.CalledProcessError) as exc:
        Console(stderr=True).print(f"[red]benchmark failed:[/red] {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
