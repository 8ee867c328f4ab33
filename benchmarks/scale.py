"""``make bench``: the identity tier at scale, end to end, beside its floor and OpenMined PSI.

Why a separate runner and not a pytest-benchmark suite: the claim to check is about the
whole system (two service processes, gRPC with mTLS, every worker process),
at sizes up to the headline 1.28M queries x 1.3M records (docs/architecture.md, Benchmark
scenario).  For each size it

1. generates (or reuses, from ``benchmarks/data/``) the seeded scenario;
2. works out in plaintext which (query, custodian record, rule) triples *should* match
   (the same validation and scoping as the services), to check the private result
   against it pair by pair;
3. starts the custodian (agency-b) and the requester (agency-a) services as processes,
   runs ``agency-a match`` and records per-phase wall time, CPU time and peak RSS of each
   service *process tree* (psutil, sampled every 0.2 s), payload bytes per direction and
   the matches, then reads the stored results back and compares them pair by pair;
4. runs OpenMined PSI on exactly the same match-key bytes in its own virtualenv
   (``benchmarks/openmined_runner.py``; its protobuf pin conflicts with ours), and checks
   which client items it put in the intersection.

In the same run it measures the single-core cost of each group operation the protocol
needs and prints the *floor*: operations needed at that size x per-operation cost / cores.
The floor is what perfect parallelism with zero protocol, I/O and Python overhead would
cost; actual / floor is the overhead factor of everything else.

One invocation writes one run file, ``benchmarks/results/runs/<UTC time>.json`` (command
line, commit, machine, load, per-op costs, every try of every engine, size and network),
and :mod:`benchmarks.report` renders the report from that file alone: results of different
runs are never merged (docs/benchmarks.md).  ``--net lan,wan`` runs the services in two
network namespaces over an emulated link (:mod:`benchmarks.netem`).
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

from benchmarks.netem import NETS, SHAPES, ShapedLink, shaped_link
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
    "median_op_costs",
    "openmined_network_model",
    "plaintext_expectation",
    "run_benchmark",
    "run_openmined",
    "run_oprf",
    "scenario_spec",
    "write_run",
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
ENGINES = ("oprf", "oprf-verifiable", "kkrt", "kkrt-prepared", "openmined")
#: engines that run through our two services (the others run in-process); "kkrt-prepared"
#: is KKRT with the custodian's authorization-independent key digests built at start-up;
#: "oprf-verifiable" is the OPRF engine under an authorization that pins the custodian's
#: POPRF key (docs/architecture.md, Verifiable evaluation)
SERVICE_ENGINES = ("oprf", "oprf-verifiable", "kkrt", "kkrt-prepared")
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
    an upper bound).  ``peak_anon_rss`` is the root's RSS without its file-backed and shared
    pages: a process that memory-maps large files (the record store's row files, the epoch
    index's buckets) holds the pages it touched in RSS, but the kernel can drop those at any
    time, so this is the part that measures the process's own memory.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._roots: dict[str, psutil.Process] = {}
        self._cpu: dict[str, dict[tuple[int, float], float]] = {}
        self.peak_rss: dict[str, int] = {}
        self.peak_tree_rss: dict[str, int] = {}
        self.peak_anon_rss: dict[str, int] = {}
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
            self.peak_anon_rss[label] = 0
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
                            memory = p.memory_info()
                            rss = memory.rss
                            created = p.create_time()
                    except psutil.Error:
                        continue
                    cpu[(p.pid, created)] = t.user + t.system
                    tree_rss += rss
                    if p.pid == root.pid:
                        self.peak_rss[label] = max(self.peak_rss[label], rss)
                        anon = rss - getattr(memory, "shared", 0)  # Linux: RssFile + RssShmem
                        self.peak_anon_rss[label] = max(self.peak_anon_rss[label], anon)
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
    ``query_ids[i]`` is the (query record id, rule) of ``query_keys[i]``.
    """

    queries: int
    records: int
    accepted_queries: int
    usable_records: int
    query_keys: list[bytes]
    custodian_keys: list[bytes]
    query_ids: list[tuple[str, str]]
    expected: set[tuple[str, str]]  # (query_record_id, rule_id) that must match
    triples: set[tuple[str, str, str]]  # (query_record_id, custodian_record_id, rule_id)
    correct: int  # of those, the ones whose matched record is the ground-truth person
    true_matches: int  # rows in truth.csv
    seconds: float

    def triples_of(self, pairs: set[tuple[str, str]]) -> set[tuple[str, str, str]]:
        """The (query, record, rule) triples of the plaintext join behind (query, rule) pairs.

        For an engine that reveals only which queries matched (OpenMined): the records are
        the custodian's holders of that key in the clear.
        """
        return {t for t in self.triples if (t[0], t[2]) in pairs}


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
    query_ids: list[tuple[str, str]] = []
    expected: set[tuple[str, str]] = set()
    triples: set[tuple[str, str, str]] = set()
    correct = 0
    for rule in rules:
        for qid, key in zip(qids, qkeys[rule], strict=True):
            if key is None:
                continue
            query_keys.append(key)
            query_ids.append((qid, rule))
            hit = by_key.get(key)
            if hit is not None:
                expected.add((qid, rule))
                triples.update((qid, rid, rule) for rid in hit)
                correct += truth.get(qid) in hit
    return PlaintextExpectation(
        queries=n_queries, records=n_records, accepted_queries=len(qids),
        usable_records=len(ids), query_keys=query_keys, custodian_keys=custodian_keys,
        query_ids=query_ids, expected=expected, triples=triples, correct=correct,
        true_matches=len(truth),
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


def setup_identities(work: Path) -> None:
    """Authority key, development CA with mTLS certificates, both agencies' secrets and the
    requester's operator roster: what every benchmark needs before it writes a policy.

    Same layout as ``agency_a.demo`` so its helpers apply.
    """
    _cli(["protocol.cli.authority", "keygen", "--out", str(work / "authority")])
    _cli(["protocol.cli.authority", "dev-ca", "--out", str(work / "certs"),
          "--agency", "agency-a", "--agency", "agency-b",
          "--server", "agency-a", "--server", "agency-b"])
    _cli(["agency_b.cli", "init", "--out", str(work / "agency-b" / "secrets")])
    _cli(["agency_a.cli", "init", "--out", str(work / "agency-a" / "secrets"),
          "--operator", "bench"])


def setup_credentials(work: Path) -> None:
    """:func:`setup_identities` plus the custodian's default policy for the match engines."""
    setup_identities(work)
    _cli(["protocol.cli.authority", "policy-template", "--custodian", "agency-b",
          "--trust", str(work / "authority" / "authority.pub.json"), "--engines", "oprf,kkrt",
          "--out", str(work / "agency-b" / "policy.json")])
    _custodian_cert_for_link(work / "certs")
    _cli(["agency_b.cli", "evaluation-key", "--secrets", str(work / "agency-b" / "secrets"),
          "--out", str(work / "agency-b" / "evaluation-key.json")])


def _custodian_cert_for_link(certs: Path) -> None:
    """Re-issue the custodian's server certificate so it is also valid at its address on an
    emulated link (the requester verifies the IP it dials, as on a real network)."""
    from benchmarks.netem import CUSTODIAN_IP
    from protocol.adapters.files import write_file_atomic
    from protocol.cli.dev_pki import DEFAULT_SERVER_HOSTS, Issued, issue_server_cert

    ca = Issued(cert_pem=(certs / "ca.pem").read_bytes(), key_pem=(certs / "ca.key").read_bytes())
    issued = issue_server_cert(ca, "agency-b", hosts=[*DEFAULT_SERVER_HOSTS, CUSTODIAN_IP])
    write_file_atomic(certs / "agency-b.server.pem", issued.cert_pem, mode=0o644)
    write_file_atomic(certs / "agency-b.server.key", issued.key_pem, mode=0o600)


def _issue(work: Path, name: str, rules: Sequence[str], max_evaluations: int,
           max_disclosures: int, *, verifiable: bool = False) -> Path:
    out = work / f"{name}.auth.json"
    pin = (["--custodian-evaluation-key", str(work / "agency-b" / "evaluation-key.json")]
           if verifiable else [])
    _cli(["protocol.cli.authority", "issue", "--key", str(work / "authority" / "authority.key"),
          "--requester", "agency-a", "--custodian", "agency-b",
          "--statute", "26 U.S.C. 6103(i)(2)", "--purpose", "benchmark of the match step",
          "--rules", ",".join(rules), "--fields", "address,city,state,zip",
          "--max-evaluations", str(max_evaluations), "--max-disclosures", str(max_disclosures),
          "--valid-days", "2", "--retention-days", "1", "--engines", "oprf,kkrt",
          "--out", str(out), "--force", *pin])
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
              workers: int | None, prepare_kkrt: str = "",
              link: ShapedLink | None = None) -> Iterator[_Services]:
    """Start the custodian and the requester as separate processes; stop them afterwards.

    With ``link`` each runs in its own network namespace and the custodian listens on its
    address on the emulated link.
    """
    in_a = link.exec_in("a") if link else []
    in_b = link.exec_in("b") if link else []
    b_host = link.custodian_ip if link else "127.0.0.1"
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
                *in_b, PY, "-m", "agency_b.cli", "serve", "--records", str(files.custodian),
                "--policy", str(work / "agency-b" / "policy.json"),
                "--ledger", str(b_dir / "ledger.sqlite"),
                "--secrets", str(work / "agency-b" / "secrets"), "--certs", str(work / "certs"),
                "--listen", f"{b_host}:0", "--port-file", str(b_dir / "port"),
                "--requester-key",
                f"agency-a={work / 'agency-a' / 'secrets' / 'signing.pub.json'}",
                "--log-level", "warning", *b_extra,
            ], stderr=b_log, cwd=REPO)
        procs.append(b)
        sampler.watch("b", b.pid)
        with open_private_log(a_dir / "service.log") as a_log:
            a = subprocess.Popen([
                *in_a, PY, "-m", "agency_a.cli", "serve", "--certs", str(work / "certs"),
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


KEY_PACKAGES = ("rbcl", "cryptography", "grpcio", "protobuf", "numpy", "psutil")


def _machine() -> dict[str, Any]:
    """CPU model, cores, RAM, Python and the versions of the packages the numbers depend on."""
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages: dict[str, str | None] = {}
    for name in KEY_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "packages": packages,
    }


def _git() -> dict[str, Any]:
    """The commit measured and whether the working tree differed from it (read-only git)."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  check=False, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    # "XY path" entries, NUL-separated; not stripped, since X may be a blank
    status = git("status", "--porcelain", "-z", "--untracked-files=no")
    commit = git("rev-parse", "HEAD")
    files: list[str] = []
    parts = iter((status or "").split("\0"))
    for entry in parts:
        if entry:
            files.append(entry[3:])
            if entry[0] in "RC":  # a rename or copy: its source path follows
                next(parts, None)
    return {"commit": None if commit is None else commit.strip(),
            "dirty": None if status is None else bool(files),
            "dirty_files": files}


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _disclosed_triples(rows: list[dict[str, Any]], plain: PlaintextExpectation,
                       work: Path, auth: Path) -> set[tuple[str, str, str]]:
    """(query, custodian record, rule) of each stored result row (``stored_triples``)."""
    return stored_triples(rows, work, auth, {t[1] for t in plain.triples})


def stored_triples(rows: list[dict[str, Any]], work: Path, auth: Path,
                   record_ids: set[str]) -> set[tuple[str, str, str]]:
    """(query, custodian record, rule) of each stored result row.

    The requester sees a per-authorization pseudonym of the record, not its id; the harness
    holds the custodian's master secret, so it recomputes the pseudonym of every record in
    ``record_ids`` (docs/architecture.md, Identity tier) and maps each row back to its
    record.  A row whose pseudonym is none of them keeps the pseudonym, and counts as extra.
    """
    import hashlib
    import hmac

    from protocol.adapters.files import read_secret
    from protocol.engines.base import authorization_key
    from protocol.policy.decide import SignedAuthorization
    from protocol.sessions.identity import PSEUDONYM_DOMAIN

    master = bytes.fromhex(read_secret(work / "agency-b" / "secrets" / "master.secret")
                           .decode().strip())
    auth_id = SignedAuthorization.from_bytes(auth.read_bytes()).authorization.authorization_id
    key = authorization_key(master, auth_id)
    by_pseudonym = {
        hmac.new(key, PSEUDONYM_DOMAIN + rid.encode(), hashlib.sha256).hexdigest()[:32]: rid
        for rid in record_ids}
    return {(r["query_record_id"], by_pseudonym.get(r["pseudonym"], r["pseudonym"]),
             r["rule_id"]) for r in rows}


def _pair_check(got: set[tuple[str, str, str]], plain: PlaintextExpectation,
                want: set[tuple[str, str, str]] | None = None) -> dict[str, Any]:
    """Pair-level correctness: equal sets, else how many are missing or extra (and examples)."""
    want = plain.triples if want is None else want
    missing, extra = sorted(want - got), sorted(got - want)
    return {"pairs": len(got), "expected_pairs": len(want), "pairs_equal": not missing
            and not extra, "missing_pairs": len(missing), "extra_pairs": len(extra),
            "mismatch_examples": [list(t) for t in (missing[:3] + extra[:3])]}


def _link_rtt(link: ShapedLink, host: str, port: int, probes: int = 5) -> float:
    """Median TCP connect time from the requester's namespace to the custodian: the RTT the
    protocol actually sees on the emulated link (emulator overhead included)."""
    code = ("import socket,statistics,time\nts=[]\n"
            f"for _ in range({probes}):\n t=time.perf_counter()\n"
            f" s=socket.create_connection(({host!r},{port}));ts.append(time.perf_counter()-t)\n"
            " s.close()\nprint(statistics.median(ts))")
    out = subprocess.run([*link.exec_in("a"), PY, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    return float(out.stdout.strip())


def run_oprf(files: ScenarioFiles, spec: ScenarioSpec, plain: PlaintextExpectation,
             rules: Sequence[str], costs: OpCosts, work: Path, sampler: TreeSampler,
             console: Console, *, workers: int | None = None,
             engine: str = "oprf", link: ShapedLink | None = None) -> dict[str, Any]:
    """One identity-tier session over gRPC/mTLS between the two service processes.

    ``engine`` is the match engine of the session: ``oprf`` (RFC 9497) or ``kkrt``
    (OT extension; one budget unit per cuckoo bin, so its budget is larger).  ``workers``
    is each service's ``--workers`` (1: no pool, one process per party).  With ``link`` the
    services run in two namespaces joined by the emulated link.
    """
    # Both services share this machine, so the floor divides by its cores, not by --workers.
    cores = os.cpu_count() or 1
    run_dir = Path(tempfile.mkdtemp(prefix=f"q{spec.queries}-", dir=work))
    auth = _issue(work, run_dir.name, rules, max_evaluations=2 * spec.queries * len(rules),
                  max_disclosures=max(spec.queries, 1),
                  verifiable=engine == "oprf-verifiable")
    summary_path = run_dir / "summary.json"
    match_engine = engine.split("-")[0]  # kkrt-prepared: kkrt; oprf-verifiable: oprf
    prepare = ",".join(rules) if engine == "kkrt-prepared" else ""
    in_a = link.exec_in("a") if link else []
    b_host = link.custodian_ip if link else "127.0.0.1"
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    with _services(work, run_dir, files, sampler, workers, prepare, link) as svc:
        console.log(f"services up: custodian {b_host}:{svc.b_port} (loaded records in "
                    f"{svc.b_startup_s:.1f}s), requester :{svc.a_port}")
        rtt = _link_rtt(link, b_host, svc.b_port) if link else None
        wire0 = link.tx_bytes() if link else None
        relay0 = link.relay_cpu_s() if link else None
        cpu_a0, cpu_b0 = sampler.cpu_seconds("a"), sampler.cpu_seconds("b")
        t0 = time.perf_counter()
        with console.status(f"{engine}: matching {spec.queries:,} x {spec.records:,} "
                            "over gRPC/mTLS"):
            proc = subprocess.run([
                *in_a, PY, "-m", "agency_a.cli", "match", "--server",
                f"127.0.0.1:{svc.a_port}",
                "--certs", str(work / "certs"), "--operator", "bench",
                "--authorization", str(auth), "--queries", str(files.queries),
                "--custodian", f"{b_host}:{svc.b_port}", "--summary-json", str(summary_path),
                "--no-progress", "--show-refused", "0", "--engine", match_engine,
            ], text=True, capture_output=True, check=False, cwd=REPO)
        t_end = time.perf_counter()
        e2e = t_end - t0
        cpu_a_e2e = sampler.cpu_seconds("a") - cpu_a0
        cpu_b_e2e = sampler.cpu_seconds("b") - cpu_b0
        wire1 = link.tx_bytes() if link else None
        relay1 = link.relay_cpu_s() if link else None
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if proc.returncode != 0 or "failed" in summary:
            raise RuntimeError(f"agency-a match failed: {summary.get('failed', '')}\n"
                               f"{proc.stdout}{proc.stderr}")
        # The session ends just before the CLI exits; its wall time dates its start.
        t_session = t_end - float(summary["wall_seconds"])
        cpu_a = sampler.cpu_between("a", t_session, t_end)
        cpu_b = sampler.cpu_between("b", t_session, t_end)
        got = subprocess.run([
            *in_a, PY, "-m", "agency_a.cli", "results", "--server", f"127.0.0.1:{svc.a_port}",
            "--certs", str(work / "certs"), "--operator", "bench",
            "--job", summary["job_id"], "--purpose", "benchmark accuracy check",
            "--format", "json", "--limit", "0"],
            text=True, capture_output=True, check=False, cwd=REPO, timeout=600)
        if got.returncode != 0:
            raise RuntimeError(f"agency-a results failed: {got.stderr}{got.stdout}")
        startup = {"custodian_load": svc.b_startup_s, "requester_start": svc.a_startup_s}
    rows = json.loads(got.stdout)
    check = _pair_check(_disclosed_triples(rows, plain, work, auth), plain)
    phases = {k: float(v) for k, v in summary.get("phase_seconds", {}).items()}
    wall = float(summary["wall_seconds"])
    q_el, r_el = int(summary["elements_evaluated"]), int(summary["custodian_tags"])
    # The group-operation floor bounds the OPRF engine only; KKRT does no per-element EC work.
    floor = costs.floor_seconds(q_el, r_el, cores) if engine == "oprf" else None
    return {
        "engine": engine,
        "workers": workers,
        "net": link.shape.name if link else "loopback",
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
        "wire": None if link is None or wire0 is None or wire1 is None else {
            "measured_rtt_s": rtt, "method": link.method,
            # The TUN relay shares the machine: its CPU is reported, counted to no party.
            "relay_cpu_s": None if relay0 is None or relay1 is None
            else round(relay1 - relay0, 3),
            "a_to_b": wire1["a_to_b"] - wire0["a_to_b"],
            "b_to_a": wire1["b_to_a"] - wire0["b_to_a"]},
        "peak_rss_a": sampler.peak_rss["a"],
        "peak_rss_b": sampler.peak_rss["b"],
        "peak_rss_tree_a": sampler.peak_tree_rss["a"],
        "peak_rss_tree_b": sampler.peak_tree_rss["b"],
        "matches": int(summary["matches"]),
        "true_matches": plain.true_matches,
        "expected_matches": len(plain.expected),
        "correct_matches": plain.correct if check["pairs_equal"] else None,
        "matches_agree_with_plaintext": check["pairs_equal"],
        "pair_check": {**check, "checked": "(query, custodian record, rule) of every stored "
                       "result row; the record from its pseudonym"},
        "accepted_queries": int(summary["queries_accepted"]),
        "query_elements": q_el,
        "custodian_elements": r_el,
        "disclosed_records": int(summary.get("disclosed_records", 0)),
        "verifiable_evaluation": bool(summary.get("verifiable_evaluation", False)),
        "evaluation_proofs_verified": summary.get("evaluation_proofs_verified"),
        "phases": {k: round(v, 3) for k, v in {
            **phases, "index_build_est": phases.get("open", 0.0), **startup,
            "cli_upload_validate": max(e2e - wall, 0.0)}.items()},
        "op_costs_us": costs.as_dict(),
        "op_counts": costs.counts(q_el, r_el),
        "cores": cores,
        "loadavg_start": loadavg_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
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
    tmp = Path(tempfile.mkdtemp(prefix=f"openmined-q{spec.queries}-", dir=work))
    server_file, client_file, out = tmp / "server.hex", tmp / "client.hex", tmp / "result.json"
    _write_hex(server_file, plain.custodian_keys)
    _write_hex(client_file, plain.query_keys)
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
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
    # OpenMined names the client items in the intersection; each is one (query, rule).
    pairs = {plain.query_ids[i] for i in res["intersection_indices"]}
    check = _pair_check(plain.triples_of(pairs), plain)
    check["extra_pairs"] += len(pairs - plain.expected)
    check["pairs_equal"] = pairs == plain.expected
    return {
        "engine": "openmined",
        "workers": 1,
        "net": "loopback",
        "queries": spec.queries,
        "records": spec.records,
        "rules": sorted({rule for _, rule in plain.query_ids}),
        "wall_s": round(res["wall_s"], 3),
        "cpu_s": round(res["cpu_s"], 3),
        "floor_s": None,
        "bytes_a_to_b": res["bytes_a_to_b"],
        "bytes_b_to_a": res["bytes_b_to_a"],
        "message_bytes": {k: res[k] for k in ("setup_bytes", "request_bytes", "response_bytes")},
        # Client and server share one process in OpenMined's standard usage.
        "peak_rss_a": res["peak_rss"],
        "peak_rss_b": res["peak_rss"],
        "matches": res["intersection"],
        "true_matches": plain.true_matches,
        "expected_matches": len(plain.expected),
        "correct_matches": plain.correct if check["pairs_equal"] else None,
        "matches_agree_with_plaintext": check["pairs_equal"],
        "pair_check": {**check, "checked": "(query, rule) of every client item in OpenMined's "
                       "intersection; the record is the custodian's holder of that key (OpenMined "
                       "releases no record)"},
        "query_elements": res["client_items"],
        "custodian_elements": res["server_items"],
        "phases": res["phases"],
        "process_cpu_s": round(cpu_total, 3),
        "openmined": {k: res[k] for k in ("version", "fpr", "data_structure", "threads")
                      if k in res},
        "loadavg_start": loadavg_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "timestamp": _now(),
    }


def openmined_network_model(run: dict[str, Any], net: str) -> dict[str, Any]:
    """OpenMined's figure on an emulated link, as a MODEL (it runs in one process).

    modelled wall = its measured compute wall + all its message bytes x 8 / link rate + one
    round trip (request up, setup + response down).  Not modelled: TCP/TLS handshakes, slow
    start, framing, overlap of transfer with compute.
    """
    shape = SHAPES[net]
    total = run["bytes_a_to_b"] + run["bytes_b_to_a"]
    transfer = total * 8 / shape.rate_bit_s
    return {**run, "net": net, "modelled": True,
            "wall_s": round(run["wall_s"] + transfer + shape.rtt_s, 3),
            "model": {"compute_wall_s": run["wall_s"], "transfer_s": round(transfer, 4),
                      "rtt_s": shape.rtt_s, "message_bytes": total,
                      "formula": "compute wall + message bytes x 8 / rate + 1 RTT"}}


# --------------------------------------------------------------------------- driver


def _best(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs (noise on a shared box only ever adds time)."""
    best = dict(min(tries, key=lambda r: r["wall_s"]))
    best["repeats"] = len(tries)
    best["wall_s_all"] = [r["wall_s"] for r in tries]
    return best


def median_op_costs(samples: Sequence[OpCosts]) -> OpCosts:
    """Per-op costs of a run: the median of each operation over every measurement in it."""
    if not samples:
        raise ValueError("no per-op measurement")
    ops = ("hash_to_group", "scalarmult", "unblind", "validate")
    med = {op: statistics.median(getattr(c, op) for c in samples) for op in ops}
    return OpCosts(**med, sample=sum(c.sample for c in samples))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _label(r: dict[str, Any]) -> str:
    one = " (1 worker)" if r.get("workers") == 1 and r["engine"] != "openmined" else ""
    model = " MODEL" if r.get("modelled") else ""
    return f"{r['engine']}{one} @ {r.get('net', 'loopback')}{model}"


def _print_size(console: Console, runs: list[dict[str, Any]]) -> None:
    t = Table(title=f"{runs[0]['queries']:,} queries x {runs[0]['records']:,} records")
    for col in ("engine [net]", "wall s", "cpu s", "floor s", "actual/floor", "A->B", "B->A",
                "on the wire", "peak RSS A", "peak RSS B", "matches", "expected", "pairs equal"):
        t.add_column(col, justify="left" if col.startswith("engine") else "right")
    for r in runs:
        floor = r.get("floor_s")
        wire = r.get("wire")
        t.add_row(_label(r), f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                  f"{floor:.2f}" if floor else "-",
                  f"{r['wall_s'] / floor:.2f}" if floor else "-",
                  f"{r['bytes_a_to_b']:,}", f"{r['bytes_b_to_a']:,}",
                  f"{wire['a_to_b'] + wire['b_to_a']:,}" if wire else "-",
                  _gib(r["peak_rss_a"]), _gib(r["peak_rss_b"]),
                  f"{r['matches']:,}", f"{r.get('expected_matches', 0):,}",
                  str(r.get("matches_agree_with_plaintext")))
    console.print(t)
    theirs = next((r for r in runs if r["engine"] == "openmined" and not r.get("modelled")),
                  None)
    for ours in runs:
        if ours["engine"] == "openmined" or theirs is None or ours.get("net") != "loopback":
            continue
        console.print(f"OpenMined / {_label(ours)}: wall [bold]"
                      f"{theirs['wall_s'] / ours['wall_s']:.2f}x[/bold], "
                      f"CPU {theirs['cpu_s'] / max(ours['cpu_s'], 1e-9):.2f}x")


def _run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def write_run(run: dict[str, Any], results_dir: Path, *, latest: bool = True) -> Path:
    """Write one run file ``results_dir/runs/<UTC time>.json`` and ``latest.json`` (a copy)."""
    runs_dir = results_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / f"{run['run_id']}.json"
    n = 1
    while path.exists():  # two runs in the same second: never overwrite a run file
        n += 1
        path = runs_dir / f"{run['run_id']}-{n}.json"
    text = json.dumps(run, indent=2) + "\n"
    path.write_text(text)
    if latest:
        (results_dir / "latest.json").write_text(text)
    return path


def run_benchmark(
    sizes: Sequence[int],
    engines: Sequence[str] = ENGINES,
    rules: Sequence[str] = DEFAULT_RULES,
    *,
    nets: Sequence[str] = ("loopback",),
    per_core: bool = True,
    data_dir: Path = DEFAULT_DATA_DIR,
    results_dir: Path = DEFAULT_RESULTS_DIR,
    readme: Path | None = None,
    op_sample: int = 20_000,
    workers: int | None = None,
    keep_work: bool = False,
    repeat: int = 1,
    repeat_engines: Sequence[str] | None = None,
    console: Console | None = None,
    venv: Path = OPENMINED_VENV,
    command: Sequence[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run every engine at every size on every network; write ONE run file and the report.

    Nothing is merged with earlier runs: the run file holds the command line, the commit,
    the machine, the load, every per-op measurement and every try, and the report
    (``latest.md``, ``latest.png``, ``latest.json``, optionally the README block) is
    rendered from it alone.  ``per_core`` adds, on loopback, our service engines with one
    worker per service beside OpenMined's single thread.  ``repeat_engines`` (default:
    all) are the engines run ``repeat`` times; the others run once.  OpenMined runs in one
    process, so it is measured once per repeat and size; on an emulated link its figure is
    a model (:func:`openmined_network_model`).
    """
    from benchmarks import report
    from protocol.adapters.files import read_policy

    console = console or (Console() if sys.stdout.isatty() else Console(width=150))
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engines {unknown}; choose from {ENGINES}")
    bad_nets = [n for n in nets if n not in NETS]
    if bad_nets or not nets:
        raise ValueError(f"unknown networks {bad_nets}; choose from {', '.join(NETS)}")
    data_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    if "openmined" in engines:
        ensure_openmined_venv(venv, console)

    run: dict[str, Any] = {
        "schema": 2,
        "run_id": _run_id(),
        "command": list(command) if command is not None else [sys.executable, *sys.argv],
        "started": _now(),
        "git": _git(),
        "machine": _machine(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "sizes": list(sizes), "engines": list(engines), "rules": list(rules),
        "nets": {n: (SHAPES[n].as_dict() if n in SHAPES else {"name": n}) for n in nets},
        "workers": workers, "per_core": per_core, "repeat": repeat,
        "op_costs": [], "tries": [], "runs": [],
    }
    samples: list[OpCosts] = []
    service = [e for e in engines if e in SERVICE_ENGINES]
    work = Path(tempfile.mkdtemp(prefix="gated-psi-bench-"))
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
                size_tries: dict[tuple[str, str, int | None], list[dict[str, Any]]] = {}

                def record(key: tuple[str, str, int | None], result: dict[str, Any],
                           attempt: int, into: dict[Any, list[dict[str, Any]]] = size_tries
                           ) -> None:
                    result["attempt"] = attempt + 1
                    into.setdefault(key, []).append(result)
                    run["tries"].append(result)
                    console.log(f"{_label(result)} (try {attempt + 1}): wall "
                                f"{result['wall_s']:.2f}s, {result['matches']:,} matches, "
                                f"pairs equal: {result['matches_agree_with_plaintext']}")

                def planned(engine: str) -> int:
                    return repeat if repeat_engines is None or engine in repeat_engines else 1

                for net in nets:
                    configs: list[tuple[str, int | None]] = [(e, workers) for e in service]
                    if per_core and net == "loopback" and workers != 1:
                        configs += [(e, 1) for e in service]
                    with _maybe_link(net) as link:
                        if link is not None:
                            console.log(f"network {net}: {link.shape.describe()} "
                                        f"({link.method}: {link.requester_ns} <-> "
                                        f"{link.custodian_ns})")
                        # Engines alternate within each repeat so a noisy spell hits all.
                        for attempt in range(repeat):
                            if (net == nets[0] and "openmined" in engines
                                    and attempt < planned("openmined")):
                                om = run_openmined(spec, plain, work, sampler, console,
                                                   venv=venv)
                                record(("openmined", "loopback", 1), om, attempt)
                            for engine, w in configs:
                                if attempt >= planned(engine):
                                    continue
                                # Measured right before the run it bounds: same box state.
                                costs = _measure_costs(op_sample, console)
                                samples.append(costs)
                                run["op_costs"].append(
                                    {**costs.as_dict(), "timestamp": _now()})
                                res = run_oprf(files, spec, plain, rules, costs, work,
                                               sampler, console, workers=w, engine=engine,
                                               link=link)
                                record((engine, net, w), res, attempt)
                size_runs = [_best(t) for t in size_tries.values()]
                om_best = next((r for r in size_runs if r["engine"] == "openmined"), None)
                if om_best is not None:
                    size_runs += [openmined_network_model(om_best, n) for n in nets
                                  if n in SHAPES]
                _print_size(console, size_runs)
                run["runs"].extend(size_runs)
                del plain
    except BaseException as exc:
        # Keep what was measured (a failure late in an hour-long run loses nothing), but as
        # a failed run file only: the report and latest.* are never rendered from it.
        run["failed"] = f"{type(exc).__name__}: {exc}"[:4000]
        run["finished"] = _now()
        run["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if run["tries"]:
            kept = write_run(run, results_dir, latest=False)
            console.log(f"run FAILED; its tries so far are kept in {kept}")
        raise
    finally:
        if keep_work:
            console.log(f"working directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    # The floor of every OPRF run uses the run's median per-op costs (robust to one noisy
    # measurement); each try keeps the measurement taken right before it.
    if samples:
        med = median_op_costs(samples)
        run["op_costs_median_us"] = med.as_dict()
        cores = os.cpu_count() or 1
        for r in run["runs"]:
            if r["engine"] == "oprf":
                r["floor_s"] = round(med.floor_seconds(r["query_elements"],
                                                       r["custodian_elements"], cores), 3)
                r["op_costs_us"] = med.as_dict()
    run["finished"] = _now()
    run["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_run(run, results_dir)
    outputs = report.render_run(run, results_dir, source=path)
    if readme is not None:
        report.update_readme(readme, run, results_dir, source=path)
        outputs.append(readme)
    console.log(f"wrote {path}, " + ", ".join(str(p) for p in outputs))
    return path, run


@contextmanager
def _maybe_link(net: str) -> Iterator[ShapedLink | None]:
    if net == "loopback":
        yield None
        return
    with shaped_link(SHAPES[net]) as link:
        yield link


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


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so services stop and namespaces are deleted."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.scale --sizes 100000,1300000 --engines oprf,kkrt,openmined``."""
    from protocol.cli.help import HelpfulParser

    p = HelpfulParser(
        prog="python -m benchmarks.scale",
        description="Identity tier end to end at scale (two services, gRPC/mTLS), its "
        "group-operation floor, and OpenMined PSI on identical inputs. One invocation "
        "writes one run file, benchmarks/results/runs/<UTC time>.json, and renders the report "
        "from it alone (docs/benchmarks.md). "
        f"Size {HEADLINE_SIZE} means the headline 1,280,000 x 1,300,000 scenario.")
    p.add_argument("--sizes", type=_sizes, default=[10_000, 100_000],
                   help="comma-separated N (N queries x N records; 10k, 1.3m accepted); "
                        "default 10000,100000")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--net", default="loopback",
                   help=f"comma-separated networks, of {', '.join(NETS)}; lan and wan run the "
                        "services in two network namespaces over an emulated link (root)")
    p.add_argument("--rules", default=",".join(DEFAULT_RULES),
                   help="match rules (tin+dob: one set, comparable to OpenMined)")
    p.add_argument("--per-core", action=argparse.BooleanOptionalAction, default=True,
                   help="also run our service engines with one worker per service on loopback "
                        "(the per-core comparison with OpenMined's single thread); default: on")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="scenario cache (gitignored)")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR,
                   help="where runs/<time>.json, latest.json/.md/.png go")
    p.add_argument("--readme", type=Path, default=None,
                   help="also refresh the bench block of this README from the new run "
                        "(default: README.md when --results-dir is the default)")
    p.add_argument("--op-sample", type=int, default=20_000,
                   help="elements per per-op cost measurement")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes per service (not set: the services' default, all "
                        "cores)")
    p.add_argument("--repeat", type=int, default=1,
                   help="tries per engine, size and network; the fastest is reported, every "
                        "try is in the run file")
    p.add_argument("--repeat-engines", default=None,
                   help="comma-separated engines that --repeat applies to (not set: all); the "
                        "others run once")
    p.add_argument("--keep-work", action="store_true", help="keep keys, ledgers and logs")
    p.add_argument("--openmined-venv", type=Path, default=OPENMINED_VENV,
                   help="virtualenv for openmined-psi (created on first use)")
    args = p.parse_args(argv)
    readme = args.readme
    if readme is None and args.results_dir.resolve() == DEFAULT_RESULTS_DIR.resolve():
        readme = REPO / "README.md"
    signal.signal(signal.SIGTERM, _terminate)
    try:
        run_benchmark(args.sizes, _names(args.engines), _names(args.rules),
                      nets=_names(args.net), per_core=args.per_core, data_dir=args.data_dir,
                      results_dir=args.results_dir, readme=readme, op_sample=args.op_sample,
                      workers=args.workers, keep_work=args.keep_work, repeat=args.repeat,
                      repeat_engines=(None if args.repeat_engines is None
                                      else _names(args.repeat_engines)),
                      venv=args.openmined_venv,
                      command=[sys.executable, "-m", "benchmarks.scale",
                               *(sys.argv[1:] if argv is None else argv)])
    except (RuntimeError, ValueError, OSError, subprocess.CalledProcessError) as exc:
        Console(stderr=True).print(f"[red]benchmark failed:[/red] {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
