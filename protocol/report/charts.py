"""Charts for the report, drawn ahead as inline SVG (docs/architecture.md, Reports).

The page must work offline and make no request of any kind, so every chart is an SVG string
produced here with matplotlib's SVG backend (no pyplot, no global state: safe in a service's
threads), stripped of everything that names a URL (the DOCTYPE, namespaces, RDF metadata),
and given ``role="img"``, an ``aria-label`` and a ``<title>``/``<desc>`` so a screen reader
reads the same numbers a sighted reader sees. Text stays text (``svg.fonttype = none``): it
is searchable, scales, and uses the page's own system fonts.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Bar", "bar_chart", "grouped_bar_chart"]

#: Colours of the bars; each has at least 3:1 contrast with white (WCAG 1.4.11, graphics).
PALETTE = ("#1f4e79", "#b35900", "#2e6b30", "#7a1f5c")
TEXT = "#1b1b1b"
GRID = "#c8c8c8"

_STRIP = (
    re.compile(r"<\?xml[^>]*\?>\s*"),
    re.compile(r"<!DOCTYPE[^>]*>\s*"),
    re.compile(r"<metadata>.*?</metadata>\s*", re.S),
    re.compile(r'\s+xmlns(:\w+)?="[^"]*"'),
)


@dataclass(frozen=True)
class Bar:
    """One labelled value of a chart."""

    label: str
    value: float


def _figure(rows: int) -> Figure:
    # imported here: only a command that draws a page pays matplotlib's start-up
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, max(1.6, 0.45 * rows + 1.0)), dpi=96)
    fig.patch.set_facecolor("white")
    return fig


def _svg(fig: Figure, *, chart_id: str, title: str, description: str) -> str:
    """The figure as an accessible inline ``<svg>`` with no URL in it."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    out = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": chart_id,
                                "font.family": "sans-serif"}):
        FigureCanvasSVG(fig).print_svg(  # type: ignore[no-untyped-call]
            out, metadata={"Date": None, "Creator": None})
    text = out.getvalue()
    for pattern in _STRIP:
        text = pattern.sub("", text)
    # matplotlib names the figure's clip paths and styles; prefix them so several charts on
    # one page never share an id
    text = text.replace('id="', f'id="{chart_id}-').replace("url(#", f"url(#{chart_id}-")
    text = text.replace('xlink:href="#', f'href="#{chart_id}-')
    label = html.escape(f"{title}. {description}", quote=True)
    head = (f'<svg role="img" aria-labelledby="{chart_id}-title {chart_id}-desc" '
            f'aria-label="{label}" class="chart" ')
    text = re.sub(r"^<svg\s+", head, text.strip(), count=1)
    text = re.sub(r'\s(width|height)="[^"]*pt"', "", text, count=2)  # sized by the page's CSS
    first_close = text.index(">") + 1
    return (text[:first_close]
            + f'<title id="{chart_id}-title">{html.escape(title)}</title>'
            + f'<desc id="{chart_id}-desc">{html.escape(description)}</desc>'
            + text[first_close:])


def _style(ax: object, fig: Figure) -> None:
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)  # type: ignore[attr-defined]
    ax.tick_params(colors=TEXT, labelsize=10)  # type: ignore[attr-defined]
    ax.xaxis.grid(True, color=GRID, linewidth=0.6)  # type: ignore[attr-defined]
    ax.set_axisbelow(True)  # type: ignore[attr-defined]
    fig.tight_layout()


def _number(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.1f}%"
    return f"{value:,.0f}"


def bar_chart(bars: Sequence[Bar], *, chart_id: str, title: str, unit: str = "",
              limit: float | None = None) -> str:
    """Horizontal bars, each labelled with its value; ``limit`` draws a reference line.

    The description (``<desc>`` and ``aria-label``) lists every bar's value in words, so the
    chart says nothing the text alternative does not.
    """
    fig = _figure(len(bars))
    ax = fig.add_subplot()
    labels = [b.label for b in bars][::-1]
    values = [b.value for b in bars][::-1]
    ax.barh(labels, values, color=PALETTE[0], height=0.6)
    top = max([*values, limit or 0, 1])
    for y, v in enumerate(values):
        ax.text(v + top * 0.01, y, _number(v, unit), va="center", color=TEXT, fontsize=10)
    if unit != "%":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if limit is not None:
        ax.axvline(limit, color=PALETTE[1], linestyle="--", linewidth=1.5)
    ax.set_xlim(0, top * 1.18)
    _style(ax, fig)
    parts = [f"{b.label}: {_number(b.value, unit)}" for b in bars] or ["no data"]
    if limit is not None:
        parts.append(f"dashed line: limit {_number(limit, unit)}")
    return _svg(fig, chart_id=chart_id, title=title, description="; ".join(parts) + ".")


def grouped_bar_chart(groups: Sequence[str], series: Sequence[tuple[str, Sequence[float]]], *,
                      chart_id: str, title: str) -> str:
    """Horizontal bars per group, one per series (precision and recall per rule, in %)."""
    fig = _figure(len(groups) * max(len(series), 1))
    ax = fig.add_subplot()
    height = 0.8 / max(len(series), 1)
    for s, (name, values) in enumerate(series):
        ys = [len(groups) - 1 - g + (len(series) - 1 - s) * height - 0.4 + height / 2
              for g in range(len(groups))]
        ax.barh(ys, list(values), height=height * 0.9, color=PALETTE[s % len(PALETTE)],
                label=name)
        for y, v in zip(ys, values, strict=True):
            ax.text(v + 1, y, f"{v:.1f}%", va="center", color=TEXT, fontsize=9)
    ax.set_yticks(range(len(groups)), list(groups)[::-1])
    ax.set_xlim(0, 118)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=max(len(series), 1),
              fontsize=9, frameon=False)
    _style(ax, fig)
    parts = [f"{g}: " + ", ".join(f"{name} {values[i]:.1f}%" for name, values in series)
             for i, g in enumerate(groups)] or ["no data"]
    return _svg(fig, chart_id=chart_id, title=title, description="; ".join(parts) + ".")
