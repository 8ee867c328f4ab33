"""Render ``benchmarks/results/latest.json`` into a Markdown report and a log-log plot.

Kept apart from the runner so that a re-render (new wording, a README refresh) never needs
a re-run that takes minutes.  ``--readme`` replaces the block between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` in README.md with the headline tables
and a link to the plot.

The Markdown also judges each target of issue 4 against the numbers, stating by how much
it was met or missed; a target that needs a run that is not in the file says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "README_END",
    "README_START",
    "Target",
    "evaluate_kkrt_targets",
    "evaluate_targets",
    "main",
    "render",
    "render_markdown",
    "render_plot",
    "update_readme",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
HEADLINE = (1_280_000, 1_300_000)  # queries, records (docs/architecture.md, Benchmark scenario)
FLOOR_FACTOR_TARGET = 1.25
SPEEDUP_TARGET = 2.0
RSS_TARGET = int(1.5 * 2**30)
BYTES_PER_QUERY, BYTES_PER_RECORD = 80, 16
#: Issue 8 (KKRT engine) targets at full scale.
KKRT_WALL_TARGET = 20.0
KKRT_SPEEDUP_TARGET = 15.0
KKRT_RSS_TARGET = 2 * 2**30
KKRT_ENGINES = ("kkrt", "kkrt-prepared")

Run = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """One target (issue 4 or 8): met is None when the runs needed to judge it are missing."""

    name: str
    met: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]


# --------------------------------------------------------------------------- helpers


def _n(x: float | int) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.2f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _size(r: Run) -> str:
    return f"{r['queries']:,} x {r['records']:,}"


def _pairs(runs: Sequence[Run]) -> list[tuple[Run, Run | None]]:
    """(oprf run, OpenMined run of the same size or None), by size."""
    by_size: dict[tuple[int, int], dict[str, Run]] = {}
    for r in runs:
        by_size.setdefault((r["queries"], r["records"]), {})[r["engine"]] = r
    return [(d["oprf"], d.get("openmined")) for _, d in sorted(by_size.items()) if "oprf" in d]


def _find(runs: Sequence[Run], engine: str, queries: int, records: int) -> Run | None:
    for r in runs:
        if r["engine"] == engine and r["queries"] == queries and r["records"] == records:
            return r
    return None


def _largest(runs: Sequence[Run], engine: str = "oprf") -> Run | None:
    mine = [r for r in runs if r["engine"] == engine]
    return max(mine, key=lambda r: (r["records"], r["queries"])) if mine else None


def _byte_budget(r: Run) -> int:
    return int(BYTES_PER_QUERY * r["queries"] + BYTES_PER_RECORD * r["records"])


# --------------------------------------------------------------------------- targets


def _target_floor(runs: Sequence[Run]) -> Target:
    name = f"1.28M x 1.3M identity tier end to end ≤ {FLOOR_FACTOR_TARGET} x measured floor"
    r = _find(runs, "oprf", *HEADLINE)
    if r is None:
        big = _largest(runs)
        extra = (f"; largest run {_size(big)}: {big['wall_s']:.1f} s = "
                 f"{big['wall_s'] / big['floor_s']:.2f} x floor {big['floor_s']:.1f} s"
                 if big and big.get("floor_s") else "")
        return Target(name, None, "no full-scale run in latest.json" + extra)
    ratio = r["wall_s"] / r["floor_s"]
    limit = FLOOR_FACTOR_TARGET * r["floor_s"]
    if ratio <= FLOOR_FACTOR_TARGET:
        how = f"{limit - r['wall_s']:.1f} s under the limit"
    else:
        how = (f"missed by {r['wall_s'] - limit:.1f} s "
               f"({ratio / FLOOR_FACTOR_TARGET:.2f} x too slow)")
    return Target(name, ratio <= FLOOR_FACTOR_TARGET,
                  f"{r['wall_s']:.1f} s vs floor {r['floor_s']:.1f} s: ratio {ratio:.2f} "
                  f"(limit {limit:.1f} s); {how}")


def _target_speedup(runs: Sequence[Run]) -> Target:
    name = f"≥ {SPEEDUP_TARGET:g} x faster than OpenMined PSI at 100,000² and at full scale"
    parts: list[str] = []
    verdicts: list[bool | None] = []
    for label, (q, rec) in (("100k", (100_000, 100_000)), ("full scale", HEADLINE)):
        ours, theirs = _find(runs, "oprf", q, rec), _find(runs, "openmined", q, rec)
        if ours is None or theirs is None:
            parts.append(f"{label}: not measured")
            verdicts.append(None)
            continue
        ratio = theirs["wall_s"] / ours["wall_s"]
        verdicts.append(ratio >= SPEEDUP_TARGET)
        parts.append(f"{label}: OpenMined {theirs['wall_s']:.1f} s / ours {ours['wall_s']:.1f} s "
                     f"= {ratio:.2f} x ({'met' if ratio >= SPEEDUP_TARGET else 'missed'}"
                     f", {ratio / SPEEDUP_TARGET:.2f} of the target)")
    met = False if False in verdicts else (None if None in verdicts else True)
    return Target(name, met, "; ".join(parts))


def _target_phases(runs: Sequence[Run]) -> Target:
    name = "phases reported separately (index build, evaluation, local match, disclosure)"
    need = ("open", "evaluate", "match", "disclose")
    mine = [r for r in runs if r["engine"] == "oprf"]
    if not mine:
        return Target(name, None, "no oprf run")
    ok = all(all(k in r.get("phases", {}) for k in need) for r in mine)
    return Target(name, ok, "every oprf run has " + ", ".join(need) +
                  " (the index is built inside open), plus tags, close, custodian load "
                  "and CLI + upload + validate" if ok else "some oprf run lacks a phase")


def _target_rss(runs: Sequence[Run]) -> Target:
    name = "peak RSS ≤ 1.5 GiB per service at full scale"
    r = _find(runs, "oprf", *HEADLINE)
    label = "full scale"
    if r is None:
        r = _largest(runs)
        if r is None:
            return Target(name, None, "no oprf run")
        label = f"largest run {_size(r)} (no full-scale run)"
    peak = max(r["peak_rss_a"], r["peak_rss_b"])
    tree = (f"; whole process trees incl. workers: A {_mib(r.get('peak_rss_tree_a', 0))}, "
            f"B {_mib(r.get('peak_rss_tree_b', 0))}")
    detail = (f"{label}: requester {_mib(r['peak_rss_a'])}, custodian {_mib(r['peak_rss_b'])} "
              f"(limit {_mib(RSS_TARGET)}; {'headroom' if peak <= RSS_TARGET else 'over by'} "
              f"{_mib(abs(RSS_TARGET - peak))}){tree}")
    return Target(name, (peak <= RSS_TARGET) if label == "full scale" else None, detail)


def _target_bytes(runs: Sequence[Run]) -> Target:
    name = f"bytes on the wire ≤ {BYTES_PER_QUERY} B/query + {BYTES_PER_RECORD} B/record"
    mine = [r for r in runs if r["engine"] == "oprf"]
    if not mine:
        return Target(name, None, "no oprf run")
    parts = []
    for r in mine:
        used = r["bytes_a_to_b"] + r["bytes_b_to_a"]
        budget = _byte_budget(r)
        parts.append(f"{_size(r)}: {used:,} B = {used / budget:.0%} of {budget:,} B")
    ok = all(r["bytes_a_to_b"] + r["bytes_b_to_a"] <= _byte_budget(r) for r in mine)
    return Target(name, ok, "; ".join(parts))


def _best_kkrt(runs: Sequence[Run]) -> Run | None:
    mine = [r for e in KKRT_ENGINES if (r := _find(runs, e, *HEADLINE)) is not None]
    return min(mine, key=lambda r: r["wall_s"]) if mine else None


def _kkrt_label(r: Run) -> str:
    return ("custodian keys prepared at start-up" if r["engine"] == "kkrt-prepared"
            else "cold custodian")


def evaluate_kkrt_targets(runs: Sequence[Run]) -> list[Target]:
    """The targets of issue 8, judged on every full-scale KKRT run present."""
    wall_name = f"KKRT 1.28M x 1.3M end to end over gRPC/mTLS ≤ {KKRT_WALL_TARGET:g} s"
    speed_name = f"KKRT ≥ {KKRT_SPEEDUP_TARGET:g} x faster than OpenMined PSI at full scale"
    rss_name = f"KKRT peak RSS ≤ {_mib(KKRT_RSS_TARGET)} per service at full scale"
    bytes_name = "KKRT bytes on the wire per query and per record"
    mine = [r for e in KKRT_ENGINES if (r := _find(runs, e, *HEADLINE)) is not None]
    if not mine:
        return [Target(n, None, "no full-scale KKRT run")
                for n in (wall_name, speed_name, rss_name, bytes_name)]
    best = _best_kkrt(runs)
    assert best is not None
    walls = "; ".join(f"{r['engine']} ({_kkrt_label(r)}): {r['wall_s']:.1f} s" for r in mine)
    theirs = _find(runs, "openmined", *HEADLINE)
    if theirs is None:
        speed = Target(speed_name, None, "no full-scale OpenMined run")
    else:
        ratios = [(r, theirs["wall_s"] / r["wall_s"]) for r in mine]
        speed = Target(speed_name, max(x for _, x in ratios) >= KKRT_SPEEDUP_TARGET,
                       f"OpenMined {theirs['wall_s']:.1f} s; " + "; ".join(
                           f"{r['engine']}: {x:.1f} x" for r, x in ratios))
    peak = max(max(r["peak_rss_a"], r["peak_rss_b"]) for r in mine)
    rss = Target(rss_name, peak <= KKRT_RSS_TARGET, "; ".join(
        f"{r['engine']}: requester {_mib(r['peak_rss_a'])}, custodian {_mib(r['peak_rss_b'])}"
        for r in mine))
    per = "; ".join(
        f"{r['engine']}: A→B {r['bytes_a_to_b'] / r['queries']:.1f} B/query, "
        f"B→A {r['bytes_b_to_a'] / r['records']:.1f} B/record "
        f"({(r['bytes_a_to_b'] + r['bytes_b_to_a']) / 1e6:,.1f} MB in all)" for r in mine)
    return [Target(wall_name, best["wall_s"] <= KKRT_WALL_TARGET, walls), speed, rss,
            Target(bytes_name, True, per)]


def evaluate_targets(runs: Sequence[Run]) -> list[Target]:
    """Each target of issue 4, judged on the runs present."""
    return [_target_floor(runs), _target_speedup(runs), _target_phases(runs), _target_rss(runs),
            _target_bytes(runs)]


# --------------------------------------------------------------------------- markdown


def _runs_table(runs: Sequence[Run]) -> list[str]:
    lines = [
        "| engine | queries x records | wall s | floor s | actual / floor | CPU s | "
        "A→B bytes | B→A bytes | peak RSS A | peak RSS B | matches | expected | true matches | "
        "walls of all tries s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        floor = r.get("floor_s")
        floor_cell = f"{floor:,.2f}" if floor else "-"
        ratio_cell = f"{r['wall_s'] / floor:.2f}" if floor else "-"
        lines.append(
            f"| {r['engine']} | {_size(r)} | {r['wall_s']:,.2f} | {floor_cell} | "
            f"{ratio_cell} | {r['cpu_s']:,.2f} | "
            f"{r['bytes_a_to_b']:,} | {r['bytes_b_to_a']:,} | {_mib(r['peak_rss_a'])} | "
            f"{_mib(r['peak_rss_b'])} | {r['matches']:,} | {r.get('expected_matches', 0):,} | "
            f"{r['true_matches']:,} | "
            + ", ".join(f"{w:,.1f}" for w in r.get("wall_s_all", [r["wall_s"]])) + " |"
        )
    return lines


def _ratio_table(runs: Sequence[Run]) -> list[str]:
    pairs = [(o, m) for o, m in _pairs(runs) if m is not None]
    if not pairs:
        return []
    lines = [
        "| queries x records | ours wall s | OpenMined wall s | OpenMined / ours (wall) | "
        "ours CPU s | OpenMined CPU s | OpenMined / ours (CPU) | OpenMined bytes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o, m in pairs:
        lines.append(
            f"| {_size(o)} | {o['wall_s']:,.2f} | {m['wall_s']:,.2f} | "
            f"**{m['wall_s'] / o['wall_s']:.2f} x** | {o['cpu_s']:,.2f} | {m['cpu_s']:,.2f} | "
            f"{m['cpu_s'] / max(o['cpu_s'], 1e-9):.2f} x | "
            f"{m['bytes_a_to_b'] + m['bytes_b_to_a']:,} |"
        )
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


def _phase_table(runs: Sequence[Run], engines: Sequence[str] = ("oprf",)) -> list[str]:
    mine = [r for r in runs if r["engine"] in engines]
    if not mine:
        return []
    lines = [
        "| engine | queries x records | " + " | ".join(t for _, t in _PHASES) +
        " | session wall | CPU A s | CPU B s |",
        "|---|---:|" + "---:|" * (len(_PHASES) + 3),
    ]
    for r in mine:
        ph = r.get("phases", {})
        cells = [f"{ph[k]:,.2f}" if k in ph else "-" for k, _ in _PHASES]
        lines.append(f"| {r['engine']} | {_size(r)} | " + " | ".join(cells) +
                     f" | {r['wall_s']:,.2f} | {r.get('cpu_a_s', 0):,.2f} | "
                     f"{r.get('cpu_b_s', 0):,.2f} |")
    return lines


def _floor_table(runs: Sequence[Run]) -> list[str]:
    mine = [r for r in runs if r["engine"] == "oprf" and r.get("op_costs_us")]
    if not mine:
        return []
    ops = ("hash_to_group", "scalarmult", "unblind", "validate")
    lines = [
        "| queries x records | " + " | ".join(f"{op} (count x µs)" for op in ops) +
        " | cores | floor s | actual s | actual / floor |",
        "|---:|" + "---:|" * (len(ops) + 4),
    ]
    for r in mine:
        costs, counts = r["op_costs_us"], r.get("op_counts", {})
        cells = [f"{counts.get(op, 0):,} x {costs.get(op, 0):.1f}" for op in ops]
        lines.append(f"| {_size(r)} | " + " | ".join(cells) +
                     f" | {r.get('cores', '?')} | {r['floor_s']:,.2f} | {r['wall_s']:,.2f} | "
                     f"{r['wall_s'] / r['floor_s']:.2f} |")
    return lines


def _split_table(runs: Sequence[Run]) -> list[str]:
    """Floor of each phase beside its actual time: where the overhead sits."""
    mine = [r for r in runs if r["engine"] == "oprf" and r.get("op_costs_us")
            and "query_elements" in r]
    if not mine:
        return []
    lines = [
        "| queries x records | index build: actual / floor s | evaluate: actual / floor s | "
        "everything else (match, disclose, close, keys) s |",
        "|---:|---:|---:|---:|",
    ]
    for r in mine:
        c, cores = r["op_costs_us"], max(int(r.get("cores", 1)), 1)
        q, rec = r["query_elements"], r["custodian_elements"]
        f_index = rec * (c["hash_to_group"] + c["scalarmult"]) / 1e6 / cores
        f_eval = q * (c["hash_to_group"] + 2 * c["scalarmult"] + c["unblind"]
                      + 2 * c["validate"]) / 1e6 / cores
        ph = r.get("phases", {})
        rest = r["wall_s"] - ph.get("open", 0.0) - ph.get("evaluate", 0.0)
        lines.append(f"| {_size(r)} | {ph.get('open', 0.0):,.1f} / {f_index:,.1f} "
                     f"({ph.get('open', 0.0) / max(f_index, 1e-9):.2f} x) | "
                     f"{ph.get('evaluate', 0.0):,.1f} / {f_eval:,.1f} "
                     f"({ph.get('evaluate', 0.0) / max(f_eval, 1e-9):.2f} x) | {rest:,.1f} |")
    return lines


def _machine_line(runs: Sequence[Run]) -> str:
    if not runs:
        return ""
    m = runs[-1].get("machine", {})
    loads = sorted({tuple(r.get("machine", {}).get("loadavg_start", [])) for r in runs})
    stamps = sorted(r.get("timestamp", "") for r in runs)
    return (f"Machine: {m.get('cpu_model', '?')}, {m.get('cores_logical', '?')} cores, "
            f"{m.get('memory_bytes', 0) / 2**30:.0f} GiB, Python {m.get('python', '?')}; "
            f"runs {stamps[0]} … {stamps[-1]}; 1-min load average at run start: "
            + ", ".join(f"{x[0]:.2f}" for x in loads if x) + ".")


def _correctness(runs: Sequence[Run]) -> list[str]:
    lines = []
    for r in runs:
        agree = r.get("matches_agree_with_plaintext")
        if agree is None:
            continue
        what = "the same (query, rule) pairs as" if r["engine"] == "oprf" else "the same count as"
        lines.append(f"- {r['engine']} {_size(r)}: {r['matches']:,} matches — "
                     f"{what if agree else 'DIFFERENT from'} the plaintext join "
                     f"({r.get('expected_matches', 0):,})"
                     + (f"; {r['correct_matches']:,} of them are the ground-truth person "
                        f"(of {r['true_matches']:,} true matches in the scenario; the others are "
                        "refused by validation or carry a missing or noisy TIN/DOB)"
                        if r.get("correct_matches") is not None else "") + ".")
    return lines


def render_markdown(runs: Sequence[Run], plot_name: str = "latest.png") -> str:
    """The full report: runs, OpenMined comparison, phases, floor, targets, plot."""
    rules = sorted({rule for r in runs for rule in r.get("rules", [])})
    out = [
        "# Match-step benchmark",
        "",
        f"Identity tier end to end over gRPC with mTLS between two service processes on "
        f"loopback, match rule(s) {', '.join(rules) or '-'}; OpenMined PSI (in-process client "
        f"and server, fpr 1e-9, GCS) on the identical match-key bytes in the same run. "
        f"Generated by `python -m benchmarks.scale`; re-render with "
        f"`python -m benchmarks.report`.",
        "",
        _machine_line(runs),
        "",
        "## Targets of issue 4",
        "",
        "| target | verdict | numbers |",
        "|---|---|---|",
    ]
    out += [f"| {t.name} | **{t.verdict}** | {t.detail} |" for t in evaluate_targets(runs)]
    out += ["", "## Runs", "", *_runs_table(runs), "",
            "wall = the match session (open, incl. the custodian's index build and both sides' "
            "match-key derivation, through the countersigned receipt); CPU = both service "
            "process trees incl. pool workers during the session (OpenMined: its process); "
            "bytes = protocol payload counted by the requester "
            "(OpenMined: serialized setup + response, request); "
            "peak RSS = the service process itself (OpenMined: its one process). "
            "expected = matches of the plaintext join of the same keys. With `--repeat N` the "
            "fastest try is kept (noise on a shared machine only adds time) and every try's "
            "wall is listed.", ""]
    ratio = _ratio_table(runs)
    if ratio:
        out += ["## OpenMined PSI side by side (same run, identical inputs)", "", *ratio, ""]
    phases_note = ("tags ∥ = tag stream (OPRF: concurrent with evaluate). Inside the session "
                   "wall: requester session build (match keys; KKRT also its key digests and "
                   "cuckoo table), the protocol phases and storing the encrypted results; "
                   "runs made before these were split out show '-'. Outside it: custodian "
                   "load (read + validate its CSV at service start; with `kkrt-prepared` also "
                   "its key digests) and CLI + upload + validate (the `agency-a match` "
                   "process start, the query-file upload and the requester-side validation).")
    phases = _phase_table(runs)
    if phases:
        out += ["## Where the time goes (oprf, seconds)", "", *phases, "", phases_note, ""]
    kkrt_targets = evaluate_kkrt_targets(runs)
    if any(t.met is not None for t in kkrt_targets):
        out += ["## Targets of issue 8 (KKRT engine)", "", "| target | verdict | numbers |",
                "|---|---|---|",
                *[f"| {t.name} | **{t.verdict}** | {t.detail} |" for t in kkrt_targets], "",
                "## Where the time goes (KKRT, seconds)", "",
                *_phase_table(runs, KKRT_ENGINES), "",
                "KKRT: evaluate = base OTs + the OT-extension matrix (requester) and the "
                "custodian's evaluation of its records, tags = the custodian's tag sets, "
                "disclose = verified disclosure (the custodian recomputes each presented "
                "output) and the accounting rows. " + phases_note, ""]
    floor = _floor_table(runs)
    if floor:
        out += ["## Floor: group operations x single-core cost ÷ cores", "", *floor, "",
                "Per-op costs are measured in the same run (median over blocks of the sample).",
                "", *_split_table(runs), ""]
    corr = _correctness(runs)
    if corr:
        out += ["## Correctness against the plaintext join and ground truth", "", *corr, ""]
    out += [f"![wall time vs size, log-log]({plot_name})", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- plot


def render_plot(runs: Sequence[Run], path: Path) -> Path | None:
    """Log-log wall time vs size per engine, with the floor; None if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {"oprf": ("C0", "o", "ours (RFC 9497 OPRF, 2 services, gRPC/mTLS)"),
              "kkrt": ("C2", "^", "ours (KKRT OT-extension OPRF, 2 services, gRPC/mTLS)"),
              "kkrt-prepared": ("C4", "v", "ours (KKRT, custodian keys prepared at start-up)"),
              "openmined": ("C3", "s", "OpenMined PSI (in-process)")}
    for engine in sorted({r["engine"] for r in runs}):
        pts = sorted((r["records"], r["wall_s"]) for r in runs if r["engine"] == engine)
        color, marker, label = styles.get(engine, ("C2", "^", engine))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                label=label)
    floors = sorted((r["records"], r["floor_s"]) for r in runs
                    if r["engine"] == "oprf" and r.get("floor_s"))
    if floors:
        xs = [p[0] for p in floors]
        ax.plot(xs, [p[1] for p in floors], "--", color="C0", alpha=0.6,
                label="floor (group ops x cost ÷ cores)")
        ax.plot(xs, [p[1] * FLOOR_FACTOR_TARGET for p in floors], ":", color="C0", alpha=0.6,
                label=f"target {FLOOR_FACTOR_TARGET} x floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(
        lambda v, _pos: f"{v:,.0f}" if str(round(v, 6))[0] in "25" else ""))
    ax.set_xlabel("custodian records N (queries ≈ N)")
    ax.set_ylabel("wall time of the match step (s)")
    ax.set_title("Identity-tier match step vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- outputs


def render(runs: Sequence[Run], out_dir: Path = RESULTS_DIR) -> list[Path]:
    """Write latest.md and latest.png into ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "latest.md"
    md.write_text(render_markdown(runs) + "\n")
    written = [md]
    png = render_plot(runs, out_dir / "latest.png")
    if png is not None:
        written.append(png)
    return written


def readme_block(runs: Sequence[Run], plot_link: str, report_link: str) -> str:
    """The README excerpt: targets, runs, OpenMined ratio and the plot."""
    lines = ["| target | verdict | numbers |", "|---|---|---|"]
    targets = evaluate_targets(runs) + [t for t in evaluate_kkrt_targets(runs)
                                        if t.met is not None]
    lines += [f"| {t.name} | **{t.verdict}** | {t.detail} |" for t in targets]
    lines += ["", *_runs_table(runs)]
    ratio = _ratio_table(runs)
    if ratio:
        lines += ["", *ratio]
    lines += ["", _machine_line(runs), "",
              f"![wall time vs size, log-log]({plot_link})", "",
              f"Full report with phases and the floor: [{report_link}]({report_link})."]
    return "\n".join(lines)


def update_readme(readme: Path, runs: Sequence[Run], results_dir: Path = RESULTS_DIR) -> None:
    """Replace the bench block of README.md (appending a Benchmarks section if it has none)."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    rel = Path(os.path.relpath(results_dir, readme.resolve().parent)).as_posix()
    block = readme_block(runs, f"{rel}/latest.png", f"{rel}/latest.md")
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
    """``python -m benchmarks.report [--json latest.json] [--readme README.md]``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description="Render latest.json into latest.md and latest.png.")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "latest.json")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where latest.md/.png go (default: beside the JSON)")
    p.add_argument("--readme", type=Path, nargs="?", const=Path("README.md"), default=None,
                   help="also refresh the bench block of this README (default README.md)")
    args = p.parse_args(argv)
    try:
        runs = json.loads(args.json.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: cannot read {args.json}: {exc}", file=sys.stderr)
        return 2
    out_dir = args.out_dir or args.json.parent
    for path in render(runs, out_dir):
        print(f"wrote {path}")
    if args.readme is not None:
        update_readme(args.readme, runs, out_dir)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
