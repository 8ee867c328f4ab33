"""Render ONE run file of ``benchmarks.scale`` into a Markdown report, a plot and the README.

Why one run file and nothing else: numbers from different days (other load, other code)
do not compare, so a report that merges them says nothing.  Every table, verdict and plot
here comes from the single ``benchmarks/results/runs/<UTC time>.json`` named on the command
line (or ``latest.json``, the copy of the newest), and the report says which one, with its
command line, commit, machine and load (docs/benchmarks.md).

    python -m benchmarks.report --run benchmarks/results/runs/20261130T050000Z.json --readme

The Markdown judges the targets of issue 15 with wall and CPU ratios side by side, adds the
per-core comparison (our services with one worker each against OpenMined's single thread),
states what each engine guarantees (docs/architecture.md, Threat model), explains the floor
(operation counts x median per-op cost / cores) and lists every pair-level mismatch.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.cli.help import HelpfulParser

__all__ = [
    "GUARANTEES",
    "README_END",
    "README_START",
    "Target",
    "evaluate_targets",
    "load_run",
    "main",
    "readme_block",
    "render_markdown",
    "render_plot",
    "render_run",
    "update_readme",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
HEADLINE = (1_280_000, 1_300_000)  # queries, records (docs/architecture.md, Benchmark scenario)
HUNDRED_K = (100_000, 100_000)
#: Issue 15 targets (benchmark output on the 2-core machine).
OPRF_SPEEDUP_TARGET = 2.0
OPRF_FLOOR_TARGET = 1.15
KKRT_WALL_TARGET = 10.0
KKRT_SPEEDUP_TARGET = 25.0
#: Standing targets of issue 4.
RSS_TARGET = int(1.5 * 2**30)
BYTES_PER_QUERY, BYTES_PER_RECORD = 80, 16

Run = dict[str, Any]
Row = dict[str, Any]


@dataclass(frozen=True)
class Guarantee:
    """What an engine protects, against whom, and what it leaks (docs/architecture.md)."""

    engine: str
    secure_against: str
    verified: str
    leaks: str


#: From docs/architecture.md, Threat model and Engines; OpenMined as run here (in-process).
GUARANTEES: dict[str, Guarantee] = {
    "oprf": Guarantee(
        "OPRF (RFC 9497), base mode",
        "privacy: semi-honest requester and custodian. Malicious requester: fields, "
        "disclosures and the budget hold. Malicious custodian: NOT protected (can evaluate "
        "with inconsistent keys or withhold records)",
        "every disclosure (exact OPRF output, constant-time compare with a recomputation); "
        "every element admitted by policy and counted before evaluation; signed "
        "authorization; mTLS identity; hash-chained ledger",
        "requester: size of the custodian's tag set, which of its queries matched; "
        "custodian: how many elements were evaluated, which records were disclosed"),
    "oprf-verifiable": Guarantee(
        "OPRF, verifiable evaluation (RFC 9497 POPRF, key pinned in the authorization)",
        "as base mode, and against a malicious custodian: inconsistent keys, a key switched "
        "mid-session, another authorization's key and forged proofs are detected (the "
        "session aborts). Still possible: withholding records, lying about or adding to its "
        "own data, computing its tags under another key (which only withholds)",
        "as base mode, plus one batch DLEQ proof per evaluated chunk, verified by the "
        "requester before anything of the chunk is finalized",
        "as base mode"),
    "kkrt": Guarantee(
        "KKRT (OT-extension OPRF)",
        "semi-honest parties only, both sides (inconsistent extension columns or keys are "
        "not detected)",
        "every disclosure (the custodian recomputes each presented output), so fields and "
        "the account hold as for OPRF; signed authorization; ledger",
        "as OPRF, plus the number of cuckoo bins and the cuckoo attempt"),
    "openmined": Guarantee(
        "OpenMined PSI 2.x (ECDH, GCS, fpr 1e-9), client and server in one process",
        "not covered by docs/architecture.md; as run here there is no authorization, no "
        "budget, no ledger, no mTLS",
        "nothing beyond its own protocol: no disclosure step, no policy gate",
        "client: the intersection (false positives at rate fpr); server: the number of "
        "client items (one element each in the request)"),
}
GUARANTEES["kkrt-prepared"] = GUARANTEES["kkrt"]


@dataclass(frozen=True)
class Target:
    """One target: met is None when the rows needed to judge it are not in the run."""

    name: str
    met: bool | None
    detail: str
    informational: bool = False  # no target number: the numbers are reported, not judged

    @property
    def verdict(self) -> str:
        if self.informational:
            return "reported" if self.met is None and "no per-core" not in self.detail \
                else "not measured"
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]


# --------------------------------------------------------------------------- loading


def load_run(path: Path) -> Run:
    """Read a run file; refuse anything else (the old merged list of rows, say) by name."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "runs" not in data or "tries" not in data:
        raise ValueError(f"{path} is not a run file of benchmarks.scale (schema 2: one "
                         "invocation with its command, machine and every try); re-run "
                         "make bench to get one")
    if data.get("failed"):
        raise ValueError(f"{path} is a FAILED run ({data['failed'][:200]}); its tries are "
                         "kept for diagnosis, but no report is rendered from it")
    return data


# --------------------------------------------------------------------------- helpers


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _size(r: Row) -> str:
    return f"{r['queries']:,} x {r['records']:,}"


def _per_core(r: Row) -> bool:
    return r.get("workers") == 1 and r["engine"] != "openmined"


def _label(r: Row) -> str:
    return str(r["engine"]) + (" (1 worker/service)" if _per_core(r) else "")


def _find(rows: Sequence[Row], engine: str, size: tuple[int, int], *, net: str = "loopback",
          per_core: bool = False) -> Row | None:
    for r in rows:
        if (r["engine"] == engine and (r["queries"], r["records"]) == size
                and r.get("net", "loopback") == net and _per_core(r) == per_core):
            return r
    return None


def _openmined(rows: Sequence[Row], size: tuple[int, int]) -> Row | None:
    return next((r for r in rows if r["engine"] == "openmined" and not r.get("modelled")
                 and (r["queries"], r["records"]) == size), None)


def _ratios(ours: Row, theirs: Row) -> str:
    wall = theirs["wall_s"] / ours["wall_s"]
    cpu = theirs["cpu_s"] / max(ours["cpu_s"], 1e-9)
    return (f"OpenMined {theirs['wall_s']:,.2f} s / {ours['wall_s']:,.2f} s = wall "
            f"**{wall:.2f} x**, CPU {theirs['cpu_s']:,.2f} s / {ours['cpu_s']:,.2f} s = "
            f"**{cpu:.2f} x**")


def _sizes(rows: Sequence[Row]) -> list[tuple[int, int]]:
    return sorted({(r["queries"], r["records"]) for r in rows})


# --------------------------------------------------------------------------- targets


def _speedup(rows: Sequence[Row], engine: str, target: float,
             sizes: Sequence[tuple[str, tuple[int, int]]]) -> Target:
    name = (f"{engine} ≥ {target:g} x OpenMined (wall) at "
            + " and ".join(label for label, _ in sizes))
    parts: list[str] = []
    verdicts: list[bool | None] = []
    for label, size in sizes:
        ours, theirs = _find(rows, engine, size), _openmined(rows, size)
        if ours is None or theirs is None:
            parts.append(f"{label}: not in this run")
            verdicts.append(None)
            continue
        ratio = theirs["wall_s"] / ours["wall_s"]
        verdicts.append(ratio >= target)
        parts.append(f"{label}: {_ratios(ours, theirs)} "
                     f"({'met' if ratio >= target else 'missed'} by "
                     f"{abs(ratio - target):.2f} x)")
    met = False if False in verdicts else (None if None in verdicts else True)
    return Target(name, met, "; ".join(parts))


def _floor_target(rows: Sequence[Row]) -> Target:
    name = f"oprf at 1.28M x 1.3M ≤ {OPRF_FLOOR_TARGET} x its floor"
    r = _find(rows, "oprf", HEADLINE)
    if r is None or not r.get("floor_s"):
        others = [x for x in rows if x["engine"] == "oprf" and x.get("floor_s")
                  and x.get("net") == "loopback" and not _per_core(x)]
        extra = "; ".join(f"{_size(x)}: {x['wall_s'] / x['floor_s']:.2f} x" for x in others)
        return Target(name, None, "no full-scale oprf run in this run file"
                      + (f" (ratios at other sizes: {extra})" if extra else ""))
    ratio = r["wall_s"] / r["floor_s"]
    limit = OPRF_FLOOR_TARGET * r["floor_s"]
    how = (f"{limit - r['wall_s']:.1f} s under the limit" if ratio <= OPRF_FLOOR_TARGET
           else f"missed by {r['wall_s'] - limit:.1f} s")
    return Target(name, ratio <= OPRF_FLOOR_TARGET,
                  f"{r['wall_s']:.1f} s vs floor {r['floor_s']:.1f} s = {ratio:.2f} x "
                  f"(limit {limit:.1f} s); {how}")


def _kkrt_wall(rows: Sequence[Row]) -> Target:
    name = f"kkrt at 1.28M x 1.3M ≤ {KKRT_WALL_TARGET:g} s end to end"
    mine = [r for e in ("kkrt", "kkrt-prepared") if (r := _find(rows, e, HEADLINE))]
    if not mine:
        return Target(name, None, "no full-scale kkrt run in this run file")
    best = min(mine, key=lambda r: r["wall_s"])
    return Target(name, best["wall_s"] <= KKRT_WALL_TARGET, "; ".join(
        f"{r['engine']}: {r['wall_s']:.1f} s" for r in mine))


def _kkrt_speedup(rows: Sequence[Row]) -> Target:
    name = f"kkrt ≥ {KKRT_SPEEDUP_TARGET:g} x OpenMined (wall) at 1.28M x 1.3M"
    theirs = _openmined(rows, HEADLINE)
    mine = [r for e in ("kkrt", "kkrt-prepared") if (r := _find(rows, e, HEADLINE))]
    if not mine or theirs is None:
        return Target(name, None, "no full-scale kkrt and OpenMined rows in this run file")
    ratios = [(r, theirs["wall_s"] / r["wall_s"]) for r in mine]
    return Target(name, max(x for _, x in ratios) >= KKRT_SPEEDUP_TARGET,
                  "; ".join(f"{r['engine']}: {_ratios(r, theirs)}" for r, _ in ratios))


def _per_core_target(rows: Sequence[Row]) -> Target:
    name = "per core: our engines with 1 worker per service vs OpenMined's single thread"
    parts = []
    for size in _sizes(rows):
        theirs = _openmined(rows, size)
        for r in rows:
            if _per_core(r) and r.get("net") == "loopback" and theirs is not None \
                    and (r["queries"], r["records"]) == size:
                parts.append(f"{r['engine']} {_size(r)}: {_ratios(r, theirs)}")
    # No target number is set for it: reported beside the verdicts, never "met".
    return Target(name, None, "; ".join(parts) or "no per-core rows in this run file",
                  informational=True)


def _rss_target(rows: Sequence[Row]) -> Target:
    name = "peak RSS ≤ 1.5 GiB per service at full scale (oprf)"
    r = _find(rows, "oprf", HEADLINE)
    if r is None:
        return Target(name, None, "no full-scale oprf run in this run file")
    peak = max(r["peak_rss_a"], r["peak_rss_b"])
    return Target(name, peak <= RSS_TARGET,
                  f"requester {_mib(r['peak_rss_a'])}, custodian {_mib(r['peak_rss_b'])}")


def _bytes_target(rows: Sequence[Row]) -> Target:
    name = f"oprf payload ≤ {BYTES_PER_QUERY} B/query + {BYTES_PER_RECORD} B/record"
    mine = [r for r in rows if r["engine"] == "oprf" and r.get("net") == "loopback"
            and not _per_core(r)]
    if not mine:
        return Target(name, None, "no oprf run")
    parts, ok = [], True
    for r in mine:
        used = r["bytes_a_to_b"] + r["bytes_b_to_a"]
        budget = BYTES_PER_QUERY * r["queries"] + BYTES_PER_RECORD * r["records"]
        ok = ok and used <= budget
        parts.append(f"{_size(r)}: {used:,} B = {used / budget:.0%} of {budget:,} B")
    return Target(name, ok, "; ".join(parts))


def evaluate_targets(rows: Sequence[Row]) -> list[Target]:
    """The targets of issue 15 (and the standing ones of issue 4), judged on one run's rows."""
    return [
        _speedup(rows, "oprf", OPRF_SPEEDUP_TARGET,
                 [("100k", HUNDRED_K), ("1.28M x 1.3M", HEADLINE)]),
        _floor_target(rows),
        _kkrt_wall(rows),
        _kkrt_speedup(rows),
        _per_core_target(rows),
        _rss_target(rows),
        _bytes_target(rows),
        Target("aggregate tier ≤ 300 s at 1.28M x 1.3M", None,
               "a different command, not part of this run: python -m "
               "benchmarks.aggregate_scale --sizes 1300000"),
    ]


# --------------------------------------------------------------------------- tables


def _targets_table(rows: Sequence[Row]) -> list[str]:
    return ["| target | verdict | numbers (wall and CPU ratios side by side) |", "|---|---|---|",
            *[f"| {t.name} | **{t.verdict}** | {t.detail} |" for t in evaluate_targets(rows)]]


def _guarantees_table(rows: Sequence[Row]) -> list[str]:
    present = {r["engine"] for r in rows}
    lines = ["| engine | secure against | verified | leaks | in this run |",
             "|---|---|---|---|---|"]
    shown: set[str] = set()
    for key in ("oprf", "oprf-verifiable", "kkrt", "kkrt-prepared", "openmined"):
        g = GUARANTEES[key]
        if g.engine in shown:
            continue
        shown.add(g.engine)
        engines = [k for k, v in GUARANTEES.items() if v is g]
        here = ", ".join(e for e in engines if e in present) or "not measured"
        lines.append(f"| {g.engine} | {g.secure_against} | {g.verified} | {g.leaks} | "
                     f"{here} |")
    return lines


def _runs_table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| engine | net | queries x records | wall s | CPU s (both parties) | floor s | "
        "wall / floor | payload A→B | payload B→A | on the wire A→B / B→A | peak RSS A | "
        "peak RSS B | matches | pairs equal to plaintext | walls of all tries s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if r.get("modelled"):
            continue
        floor = r.get("floor_s")
        wire = r.get("wire")
        floor_cells = f"{floor:,.2f} | {r['wall_s'] / floor:.2f}" if floor else "- | -"
        wire_cell = f"{wire['a_to_b']:,} / {wire['b_to_a']:,}" if wire else "-"
        lines.append(
            f"| {_label(r)} | {r.get('net', 'loopback')} | {_size(r)} | {r['wall_s']:,.2f} | "
            f"{r['cpu_s']:,.2f} | {floor_cells} | {r['bytes_a_to_b']:,} | "
            f"{r['bytes_b_to_a']:,} | {wire_cell} | "
            f"{_mib(r['peak_rss_a'])} | {_mib(r['peak_rss_b'])} | {r['matches']:,} | "
            f"{_pairs_word(r)} | {', '.join(f'{w:.2f}' for w in r.get('wall_s_all', []))} |")
    return lines


def _pairs_word(r: Row) -> str:
    pc = r.get("pair_check") or {}
    if r.get("matches_agree_with_plaintext"):
        return f"yes ({pc.get('pairs', r['matches']):,})"
    return (f"**NO**: {pc.get('missing_pairs', '?')} missing, {pc.get('extra_pairs', '?')} "
            "extra")


def _ratio_table(rows: Sequence[Row]) -> list[str]:
    lines = ["| queries x records | ours | ours wall s | OpenMined wall s | OpenMined / ours "
             "(wall) | ours CPU s | OpenMined CPU s | OpenMined / ours (CPU) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    n = 0
    for size in _sizes(rows):
        theirs = _openmined(rows, size)
        if theirs is None:
            continue
        for r in rows:
            if (r["engine"] == "openmined" or r.get("net") != "loopback"
                    or (r["queries"], r["records"]) != size):
                continue
            n += 1
            lines.append(
                f"| {_size(r)} | {_label(r)} | {r['wall_s']:,.2f} | {theirs['wall_s']:,.2f} | "
                f"**{theirs['wall_s'] / r['wall_s']:.2f} x** | {r['cpu_s']:,.2f} | "
                f"{theirs['cpu_s']:,.2f} | "
                f"**{theirs['cpu_s'] / max(r['cpu_s'], 1e-9):.2f} x** |")
    return lines if n else []


#: What shaped the link, per ``wire.method`` (``benchmarks.netem``); the last two are how runs
#: before the kernel's tbf took the rate were built, kept so their reports stay true.
_SHAPING = {
    "tbf+netem": "rate: kernel tbf; delay: kernel netem",
    "tbf+tun-relay": "rate: kernel tbf; delay: user-space relay",
    "netem": "rate and delay: kernel netem",
    "tun-relay": "rate and delay: user-space relay",
}


def _shaping(method: str) -> str:
    return _SHAPING.get(method, method)


def _network_table(run: Run, rows: Sequence[Row]) -> list[str]:
    shaped = [n for n in run.get("nets", {}) if n != "loopback"]
    if not shaped:
        return []
    lines = ["| engine | net | queries x records | wall s | vs loopback | measured RTT ms | "
             "on the wire A→B B | on the wire B→A B | how |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        net = r.get("net", "loopback")
        if net == "loopback":
            continue
        base = _find(rows, r["engine"], (r["queries"], r["records"]),
                     per_core=_per_core(r)) if not r.get("modelled") else \
            _openmined(rows, (r["queries"], r["records"]))
        vs = f"{r['wall_s'] / base['wall_s']:.2f} x" if base else "-"
        if r.get("modelled"):
            m = r["model"]
            lines.append(
                f"| {_label(r)} | {net} | {_size(r)} | {r['wall_s']:,.2f} | {vs} | "
                f"{m['rtt_s'] * 1e3:g} (model) | {r['bytes_a_to_b']:,} (messages) | "
                f"{r['bytes_b_to_a']:,} (messages) | **MODEL**: {m['formula']} = "
                f"{m['compute_wall_s']:.2f} + {m['transfer_s']:.3f} + {m['rtt_s']:g} s |")
            continue
        w = r.get("wire") or {}
        rtt = w.get("measured_rtt_s")
        lines.append(
            f"| {_label(r)} | {net} | {_size(r)} | {r['wall_s']:,.2f} | {vs} | "
            f"{f'{rtt * 1e3:.2f}' if rtt is not None else '-'} | {w.get('a_to_b', 0):,} | "
            f"{w.get('b_to_a', 0):,} | measured ({_shaping(w.get('method', '?'))}"
            + (f"; relay CPU {w['relay_cpu_s']:.2f} s" if w.get("relay_cpu_s") is not None
               else "") + ") |")
    return lines


_PHASES = (
    ("custodian_load", "custodian load (startup)"),
    ("cli_upload_validate", "CLI + upload + validate"),
    ("prepare", "requester session build"),
    ("open", "open (incl. index build)"),
    ("tags", "tags ∥"),
    ("evaluate", "evaluate"),
    ("match", "local match"),
    ("disclose", "disclose"),
    ("close", "close"),
    ("store", "store results"),
)


def _phase_table(rows: Sequence[Row]) -> list[str]:
    mine = [r for r in rows if r["engine"] != "openmined"]
    if not mine:
        return []
    lines = [
        "| engine | net | queries x records | " + " | ".join(t for _, t in _PHASES) +
        " | session wall | CPU A s | CPU B s |",
        "|---|---|---:|" + "---:|" * (len(_PHASES) + 3),
    ]
    for r in mine:
        ph = r.get("phases", {})
        cells = [f"{ph[k]:,.2f}" if k in ph else "-" for k, _ in _PHASES]
        lines.append(f"| {_label(r)} | {r.get('net', 'loopback')} | {_size(r)} | "
                     + " | ".join(cells) + f" | {r['wall_s']:,.2f} | "
                     f"{r.get('cpu_a_s', 0):,.2f} | {r.get('cpu_b_s', 0):,.2f} |")
    return lines


_OPS = ("hash_to_group", "scalarmult", "unblind", "validate")


def _floor_section(run: Run, rows: Sequence[Row]) -> list[str]:
    mine = [r for r in rows if r["engine"] == "oprf" and r.get("floor_s")]
    med = run.get("op_costs_median_us")
    if not mine or not med:
        return []
    samples = run.get("op_costs", [])
    out = [
        "With q blinded query elements (accepted queries x rules) and r custodian elements "
        "(usable records x rules), one OPRF session needs:",
        "",
        "- HashToGroup: q + r (requester blinds q inputs, custodian indexes r records);",
        "- scalar multiplication: 2q + r (blind and BlindEvaluate per query, one per record);",
        "- unblind (Finalize: inversion share, unblinding multiplication, hash): q;",
        "- element validation: 2q (the custodian validates each blinded element, the "
        "requester each evaluated one).",
        "",
        "floor = Σ count x median per-op cost ÷ cores: the time with perfect parallelism and "
        "no protocol, I/O or Python overhead. Per-op costs are single-core, measured in this "
        f"run before every service try ({len(samples)} measurements of "
        f"{int(med.get('sample', 0)) // max(len(samples), 1):,} elements each, each itself "
        "a median over blocks); the floor uses the median of each operation over all of them.",
        "",
        "| operation | median µs | min µs | max µs |", "|---|---:|---:|---:|",
    ]
    for op in _OPS:
        vals = [s[op] for s in samples if op in s] or [med[op]]
        out.append(f"| {op} | {med[op]:.2f} | {min(vals):.2f} | {max(vals):.2f} |")
    out += ["", "| net | queries x records | q | r | " + " | ".join(
        f"{op} count" for op in _OPS) + " | cores | floor s | wall s | wall / floor |",
        "|---|---:|---:|---:|" + "---:|" * (len(_OPS) + 4)]
    for r in mine:
        counts = r.get("op_counts", {})
        out.append(f"| {r.get('net', 'loopback')}{' 1 worker' if _per_core(r) else ''} | "
                   f"{_size(r)} | {r['query_elements']:,} | {r['custodian_elements']:,} | "
                   + " | ".join(f"{counts.get(op, 0):,}" for op in _OPS)
                   + f" | {r.get('cores', '?')} | {r['floor_s']:,.2f} | {r['wall_s']:,.2f} | "
                   f"{r['wall_s'] / r['floor_s']:.2f} |")
    return out


def _correctness(rows: Sequence[Row]) -> list[str]:
    lines = []
    for r in rows:
        if r.get("modelled"):
            continue
        pc = r.get("pair_check") or {}
        net = r.get("net", "loopback")
        if r.get("matches_agree_with_plaintext"):
            what = (f"the same {pc.get('pairs', 0):,} (query, record, rule) pairs as the "
                    f"plaintext join")
        else:
            what = (f"**DIFFERENT** from the plaintext join: {pc.get('missing_pairs')} "
                    f"missing, {pc.get('extra_pairs')} extra; examples "
                    f"{pc.get('mismatch_examples')}")
        truth = (f"; {r['correct_matches']:,} of them are the ground-truth person (of "
                 f"{r['true_matches']:,} true matches in the scenario)"
                 if r.get("correct_matches") is not None else "")
        lines.append(f"- {_label(r)} [{net}] {_size(r)}: {what}{truth}. Checked: "
                     f"{pc.get('checked', '-')}.")
    return lines


def _tries_table(run: Run) -> list[str]:
    lines = ["| # | engine | net | queries x records | try | wall s | CPU s | pairs equal | "
             "load at start | at | ", "|---:|---|---|---:|---:|---:|---:|---|---|---|"]
    for i, t in enumerate(run.get("tries", []), 1):
        load = t.get("loadavg_start") or []
        lines.append(f"| {i} | {_label(t)} | {t.get('net', 'loopback')} | {_size(t)} | "
                     f"{t.get('attempt', 1)} | {t['wall_s']:,.2f} | {t['cpu_s']:,.2f} | "
                     f"{t.get('matches_agree_with_plaintext')} | "
                     f"{' / '.join(f'{x:.2f}' for x in load)} | {t.get('timestamp', '')} |")
    return lines


def _source_lines(run: Run, source: Path | None) -> list[str]:
    m = run.get("machine", {})
    g = run.get("git", {})
    pk = ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items() if v)
    dirty = g.get("dirty")
    tree = ("clean tree" if dirty is False else
            f"tree dirty ({len(g.get('dirty_files', []))} modified tracked files)"
            if dirty else "tree state unknown")
    src = source.as_posix() if source is not None else f"runs/{run.get('run_id')}.json"
    load0 = " / ".join(f"{x:.2f}" for x in run.get("loadavg_start", []))
    load1 = " / ".join(f"{x:.2f}" for x in run.get("loadavg_end", []))
    nets = "; ".join(
        f"{n}: " + (f"{v['rate_bit_s'] / 1e6:g} Mbit/s, {v['rtt_s'] * 1e3:g} ms RTT"
                    if "rate_bit_s" in v else "127.0.0.1, no shaping")
        for n, v in run.get("nets", {}).items())
    return [
        f"Every number below comes from ONE run file: `{src}`; nothing is merged from other "
        "runs.",
        "",
        f"- command: `{shlex.join(run.get('command', []))}`",
        f"- commit `{g.get('commit') or '?'}`, {tree}",
        f"- {run.get('started', '?')} → {run.get('finished', '?')}; 1/5/15-min load average "
        f"at start {load0}, at end {load1}",
        f"- machine: {m.get('cpu_model', '?')}, {m.get('cores_logical', '?')} logical cores, "
        f"{m.get('memory_bytes', 0) / 2**30:.0f} GiB RAM, Python {m.get('python', '?')}; {pk}",
        f"- networks: {nets}",
    ]


def render_markdown(run: Run, plot_name: str = "latest.png", source: Path | None = None) -> str:
    """The full report of one run: verdicts, guarantees, runs, ratios, network, floor, pairs."""
    rows = run["runs"]
    rules = ", ".join(run.get("rules", [])) or "-"
    out = ["# Match-step benchmark", "", *_source_lines(run, source), "",
           f"Identity tier end to end over gRPC with mTLS between two service processes, match "
           f"rule(s) {rules}; OpenMined PSI on the identical match-key bytes in the same run. "
           "Generated by `python -m benchmarks.scale`; re-render with "
           "`python -m benchmarks.report --run FILE`.", "",
           "## Verdicts (targets of issue 15)", "", *_targets_table(rows), "",
           "Ratios are OpenMined / ours: above 1 means ours is faster. CPU = user + system "
           "time of every process of both parties during the session (our two service "
           "process trees incl. pool workers; OpenMined's one process), so the CPU ratio says "
           "how much of a wall-time advantage is only the use of more cores.", "",
           "## What each engine guarantees", "", *_guarantees_table(rows), "",
           "## Runs (fastest try of each)", "", *_runs_table(rows), "",
           "wall = the match session (open, incl. the custodian's index build and both sides' "
           "match-key derivation, through the countersigned receipt); payload = protocol "
           "message bytes counted by the requester (OpenMined: serialized setup + response, "
           "request); on the wire = IP bytes on the emulated link (headers, TLS, ACKs "
           "included); peak RSS = the service process itself (OpenMined: its one process).",
           ""]
    ratio = _ratio_table(rows)
    if ratio:
        out += ["## OpenMined side by side, wall and CPU (loopback, per-core rows included)",
                "", *ratio, "",
                "`(1 worker/service)` rows run each service with `--workers 1` (no process "
                "pool: one process per party) against OpenMined's single thread.", ""]
    net = _network_table(run, rows)
    if net:
        out += ["## Emulated networks", "", *net, "",
                "Our rows are measured: the two services in separate network namespaces "
                "joined by one shaped link (docs/benchmarks.md, Network emulation); the `how` "
                "column says what shaped it: the rate is the kernel's tbf on each link end "
                "(user-space in runs that name no tbf), the delay the kernel's netem or, "
                "where the kernel has no netem, a user-space relay. OpenMined runs client and "
                "server in one process, so its row is a **MODEL**, not a measurement: its "
                "measured compute wall plus its message bytes at the link rate plus one "
                "round trip (no handshakes, no slow start, no overlap).", ""]
    phases = _phase_table(rows)
    if phases:
        out += ["## Where the time goes (seconds)", "", *phases, "",
                "tags ∥ = tag stream (OPRF: concurrent with evaluate). KKRT: evaluate = base "
                "OTs + the OT-extension matrix and the custodian's evaluation of its records. "
                "Outside the session wall: custodian load (read + validate its CSV at start) "
                "and CLI + upload + validate.", ""]
    floor = _floor_section(run, rows)
    if floor:
        out += ["## The floor: operation counts x median per-op cost ÷ cores", "", *floor, ""]
    out += ["## Correctness at pair level", "", *_correctness(rows), "",
            "## Every try", "", *_tries_table(run), "",
            f"![wall time vs size, log-log, this run only]({plot_name})", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- plot


def render_plot(run: Run, path: Path) -> Path | None:
    """Log-log wall time vs size per engine and network, this run only, with the floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    rows = run["runs"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        label = f"{_label(r)}, {r.get('net', 'loopback')}" + (" (MODEL)" if r.get("modelled")
                                                              else "")
        series.setdefault(label, []).append((r["records"], r["wall_s"]))
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^vD<>p"[i % 8],
                linestyle=":" if "MODEL" in label else "-", label=label)
    floors = sorted((r["records"], r["floor_s"]) for r in rows
                    if r["engine"] == "oprf" and r.get("floor_s") and not _per_core(r)
                    and r.get("net") == "loopback")
    if floors:
        ax.plot([p[0] for p in floors], [p[1] for p in floors], "--", color="grey",
                label="oprf floor (group ops x cost ÷ cores)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("custodian records N (queries ≈ N)")
    ax.set_ylabel("wall time of the match step (s)")
    ax.set_title(f"Match step vs size, run {run.get('run_id', '?')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- outputs


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def render_run(run: Run, out_dir: Path = RESULTS_DIR, source: Path | None = None) -> list[Path]:
    """Write latest.md and latest.png into ``out_dir`` from one run; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "latest.md"
    src = Path(_rel(source, out_dir)) if source is not None else None
    md.write_text(render_markdown(run, source=src) + "\n")
    written = [md]
    png = render_plot(run, out_dir / "latest.png")
    if png is not None:
        written.append(png)
    return written


def readme_block(run: Run, plot_link: str, report_link: str,
                 source: str | None = None) -> str:
    """The README excerpt of one run: source, verdicts, guarantees, ratios, network, plot."""
    rows = run["runs"]
    lines = [*_source_lines(run, Path(source) if source else None), "",
             *_targets_table(rows), "", *_guarantees_table(rows)]
    ratio = _ratio_table(rows)
    if ratio:
        lines += ["", *ratio]
    net = _network_table(run, rows)
    if net:
        lines += ["", *net]
    lines += ["", f"![wall time vs size, log-log]({plot_link})", "",
              f"Full report (every try, phases, the floor's counts, pair-level checks): "
              f"[{report_link}]({report_link}); how to read and reproduce it: "
              "[docs/benchmarks.md](docs/benchmarks.md)."]
    return "\n".join(lines)


def update_readme(readme: Path, run: Run, results_dir: Path = RESULTS_DIR,
                  source: Path | None = None) -> None:
    """Replace the bench block of README.md with one run's (a section is appended if none)."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    base = readme.resolve().parent
    rel = _rel(results_dir, base)
    block = readme_block(run, f"{rel}/latest.png", f"{rel}/latest.md",
                         _rel(source, base) if source is not None else None)
    start, end = text.find(README_START), text.find(README_END)
    if start != -1 and end > start:
        text = text[:start] + f"{README_START}\n{block}\n" + text[end:]
    else:
        if start != -1 or end != -1:
            raise ValueError(f"{readme}: unbalanced {README_START} / {README_END} markers")
        text = text.rstrip("\n") + ("\n\n" if text else "") + \
            f"## Benchmarks\n\n{README_START}\n{block}\n{README_END}\n"
    readme.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.report --run runs/<time>.json [--readme]``."""
    p = HelpfulParser(prog="python -m benchmarks.report",
                      description="Render one run file of benchmarks.scale into latest.md, "
                      "latest.png and latest.json (and the README block); never merges runs.")
    p.add_argument("--run", type=Path, default=RESULTS_DIR / "latest.json",
                   help="the run file to render (benchmarks/results/runs/<time>.json)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                   help="where latest.md/.png/.json go")
    p.add_argument("--readme", type=Path, nargs="?", const=Path("README.md"), default=None,
                   help="also refresh the bench block of this README (bare flag: README.md)")
    args = p.parse_args(argv)
    try:
        run = load_run(args.run)
    except (OSError, ValueError) as exc:
        print(f"error: cannot use {args.run}: {exc}", file=sys.stderr)
        return 2
    out_dir: Path = args.out_dir
    latest = out_dir / "latest.json"
    source: Path = args.run
    if source.resolve() != latest.resolve():
        out_dir.mkdir(parents=True, exist_ok=True)
        latest.write_text(json.dumps(run, indent=2) + "\n")
    elif (out_dir / "runs" / f"{run.get('run_id')}.json").exists():
        source = out_dir / "runs" / f"{run.get('run_id')}.json"  # name the run, not its copy
    for path in render_run(run, out_dir, source=source):
        print(f"wrote {path}")
    if args.readme is not None:
        update_readme(args.readme, run, out_dir, source=source)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

