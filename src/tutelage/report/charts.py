"""The report's charts, drawn by matplotlib as SVG text to inline in the HTML page.

Charts carry reason codes and numbers only, never generated text; matplotlib's SVG writer escapes
whatever text they hold anyway. matplotlib is imported inside the functions: it takes about a
second to import and only `tutelage report` needs it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager

from markupsafe import Markup

GREY, RED, GREEN, BLUE, ORANGE = "#64748b", "#dc6b6b", "#2f9e5a", "#3b6fd4", "#e08a2c"

RC = {
    # Text stays <text> (not glyph outlines): smaller files, crisp at any zoom, the page's font.
    "svg.fonttype": "none",
    "font.family": ["sans-serif"],
    "font.sans-serif": ["Helvetica", "Arial", "DejaVu Sans"],
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#94a3b8",
    "axes.labelcolor": "#334155",
    "xtick.color": "#475569",
    "ytick.color": "#475569",
}


@contextmanager
def _figure(name: str, width: float, height: float) -> Iterator:
    """A Figure (no pyplot: no global state, no GUI backend) under the report's style.

    `name` salts the SVG element ids: every chart inlined in one page needs ids of its own."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({**RC, "svg.hashsalt": f"tutelage-{name}"}):
        yield Figure(figsize=(width, height), layout="constrained")


def _to_svg(fig) -> Markup:
    """The figure as one <svg> element ready to inline in HTML.

    The XML prologue, DOCTYPE and RDF metadata only matter in a standalone .svg file; dropping them
    (and the namespace declarations, which inline SVG in HTML does not need) leaves no URL at all
    in the page."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(?::\w+)?="[^"]*"', "", svg)
    # The one place the report marks text as safe: markup we drew ourselves from numbers and codes.
    return Markup(svg)


def funnel_chart(funnel: dict) -> Markup:
    """Horizontal bars: generated, then each rejection reason (largest first), then kept."""
    rejected = sorted(funnel["rejected"].items(), key=lambda kv: (-kv[1], kv[0]))
    labels = ["generated", *(f"rejected: {reason}" for reason, _ in rejected), "kept"]
    values = [funnel["generated"], *(n for _, n in rejected), funnel["kept"]]
    colours = [GREY, *([RED] * len(rejected)), GREEN]
    with _figure("funnel", 7.5, 0.9 + 0.34 * len(labels)) as fig:
        ax = fig.add_subplot()
        ax.barh(range(len(labels)), values, color=colours, height=0.7)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()  # read top-down, like the table
        ax.set_xlabel("tasks")
        ax.spines["left"].set_visible(False)
        ax.tick_params(axis="y", length=0)
        top = max(values) or 1
        ax.set_xlim(0, top * 1.12)  # room for the counts at the bar ends
        for y, v in enumerate(values):
            ax.text(v + top * 0.01, y, f"{v:,}", va="center", fontsize=9, color="#334155")
        return _to_svg(fig)


def loss_chart(steps: list[dict]) -> Markup | None:
    """Training loss per logged step and evaluation loss where it was measured; None if neither."""
    train = [(s["step"], s["loss"]) for s in steps if s.get("loss") is not None]
    evals = [(s["step"], s["eval_loss"]) for s in steps if s.get("eval_loss") is not None]
    if not train and not evals:
        return None
    with _figure("loss", 7.5, 3.4) as fig:
        ax = fig.add_subplot()
        if train:
            ax.plot(*zip(*train), color=BLUE, linewidth=1.4, label="train loss")
        if evals:
            ax.plot(*zip(*evals), color=ORANGE, linewidth=1, marker="o", markersize=5,
                    label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(axis="y", color="#e2e8f0", linewidth=0.8)
        ax.legend(frameon=False)
        return _to_svg(fig)
