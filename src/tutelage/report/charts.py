"""The report's charts, drawn by matplotlib as SVG text to inline in the HTML page.

Charts carry reason codes and numbers, and the sunburst words from generated instructions: text
from data is drawn plain (no mathtext, no TeX) and matplotlib's SVG writer escapes it. matplotlib
is imported inside the functions: it takes about a second to import and only `tutelage report`
needs it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
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
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.DOTALL)
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
    """Training loss per logged step and evaluation loss where it was measured; with logit
    distillation also the loss's two parts, the cross-entropy on the data and the divergence from
    the teacher (and the divergence on the valid split), dashed. None if there is nothing."""
    lines = [  # (column, label, colour, dashed, measured only now and then)
        ("loss", "train loss", BLUE, False, False),
        ("ce_loss", "train cross-entropy", GREEN, True, False),
        ("divergence", "train divergence", RED, True, False),
        ("eval_loss", "eval loss", ORANGE, False, True),
        ("eval_divergence", "eval divergence", GREY, True, True),
    ]
    drawn = [
        (points, label, colour, dashed, sparse)
        for column, label, colour, dashed, sparse in lines
        if (points := [(s["step"], s[column]) for s in steps if s.get(column) is not None])
    ]
    if not drawn:
        return None
    with _figure("loss", 7.5, 3.4) as fig:
        ax = fig.add_subplot()
        for points, label, colour, dashed, sparse in drawn:
            ax.plot(
                *zip(*points),
                color=colour,
                linewidth=1 if sparse else 1.4,
                linestyle="--" if dashed else "-",
                marker="o" if sparse else None,
                markersize=5,
                label=label,
            )
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(axis="y", color="#e2e8f0", linewidth=0.8)
        ax.legend(frameon=False)
        return _to_svg(fig)


# -- the analyses of the kept instructions (analysis.py) ---------------------------------------

# Text drawn from generated data: never mathtext ("$x$"), never TeX; the SVG writer escapes it.
_PLAIN = {"usetex": False, "parse_math": False}
_GRID = "#e2e8f0"
_INK = "#334155"
_LENGTH_BINS = 30  # at most, per panel


def _integer_bins(values: list[int]) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Counts of values in integer-aligned bins up to their 99th percentile, the bin edges, and
    where the last bin starts if it also holds the longer tail (else None)."""
    top = max(1, int(np.ceil(np.percentile(values, 99))))
    width = -(-(top + 1) // _LENGTH_BINS)
    bins = -(-(top + 1) // width)
    edges = np.arange(bins + 1) * width - 0.5  # bin k holds the integers k*width ... +width-1
    clipped = np.minimum(values, bins * width - 1)
    counts, _ = np.histogram(clipped, edges)
    overflow = (bins - 1) * width if max(values) > top else None
    return counts, edges, overflow


def _empty_panel(ax, note: str) -> None:
    ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", color=GREY, **_PLAIN)
    ax.set_xticks([])
    ax.set_yticks([])


def length_histograms(lengths: dict[str, list[int]]) -> Markup | None:
    """Three panels: words per instruction, per (non-empty) input and per output; the last bin of
    a panel holds its longest 1% (marked "≥ N"). None when there is no length at all."""
    panels = [("instruction", BLUE), ("input", ORANGE), ("output", GREEN)]
    if not any(lengths.get(name) for name, _ in panels):
        return None
    with _figure("lengths", 7.5, 2.8) as fig:
        for ax, (name, colour) in zip(fig.subplots(1, 3), panels):
            values = lengths.get(name) or []
            if not values:
                ax.set_title(f"{name} (n=0)", fontsize=10)
                _empty_panel(ax, "none")
                continue
            counts, edges, overflow = _integer_bins(values)
            ax.stairs(counts, edges, fill=True, color=colour, linewidth=0)
            ax.set_title(f"{name} (n={len(values):,}, median {np.median(values):g})", fontsize=10)
            ax.set_xlabel("words")
            ax.grid(axis="y", color=_GRID, linewidth=0.8)
            ax.set_axisbelow(True)
            if overflow is not None:
                ax.text(
                    1,
                    1,
                    f"last bin: ≥ {overflow:,}",
                    transform=ax.transAxes,
                    ha="right",
                    va="top",
                    fontsize=8,
                    color=_INK,
                    **_PLAIN,
                )
        fig.axes[0].set_ylabel("tasks")
        return _to_svg(fig)


def novelty_histograms(
    to_seed: list[float], to_kept: list[float], threshold: float | None
) -> Markup | None:
    """Two panels of ROUGE-L F1 (the paper's Figure 3 and its within-data counterpart), 0.05
    bins, with the filter's threshold dashed. None when both are empty."""
    if not to_seed and not to_kept:
        return None
    edges = np.linspace(0.0, 1.0, 21)
    panels = [
        ("to the nearest seed", to_seed, BLUE),
        ("to the nearest other kept instruction", to_kept, GREEN),
    ]
    with _figure("novelty", 7.5, 2.9) as fig:
        for ax, (title, scores, colour) in zip(fig.subplots(1, 2, sharey=True), panels):
            ax.set_title(title, fontsize=10)
            ax.set_xlim(0, 1)
            ax.set_xlabel("ROUGE-L F1")
            if not scores:
                _empty_panel(ax, "nothing to compare with")
                continue
            counts, _ = np.histogram(np.clip(scores, 0.0, 1.0), edges)
            ax.stairs(counts, edges, fill=True, color=colour, linewidth=0)
            ax.grid(axis="y", color=_GRID, linewidth=0.8)
            ax.set_axisbelow(True)
            if threshold is not None:
                ax.axvline(threshold, color=RED, linestyle="--", linewidth=1.2)
                ax.text(
                    threshold,
                    0.98,
                    f" threshold {threshold:g}",
                    transform=ax.get_xaxis_transform(),
                    ha="left",
                    va="top",
                    fontsize=8,
                    color=RED,
                    **_PLAIN,
                )
        fig.axes[0].set_ylabel("instructions")
        return _to_svg(fig)


# the sunburst's rings, in data units (the axes span -1..1)
_HOLE, _MIDDLE, _OUTER = 0.28, 0.62, 1.0
_MAX_LABEL = 16  # characters; longer labels end in "…"


def _tint(colour, amount: float) -> tuple[float, float, float]:
    """colour mixed with white: amount 0 keeps it, 1 is white."""
    from matplotlib.colors import to_rgb

    return tuple(c + (1 - c) * amount for c in to_rgb(colour))


def _ink_on(colour) -> str:
    """White text on a dark background, dark text on a light one."""
    from matplotlib.colors import to_rgb

    red, green, blue = to_rgb(colour)
    return "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.6 else _INK


def _shorten(label: str) -> str:
    return label if len(label) <= _MAX_LABEL else label[: _MAX_LABEL - 1] + "…"


def _ring_label(
    ax,
    text: str,
    start: float,
    end: float,
    inner: float,
    outer: float,
    fontsize: float,
    colour: str,
) -> None:
    """text along the radius of the wedge between angles start and end (degrees), left out where
    the wedge is thinner than the text is high."""
    middle = (inner + outer) / 2
    arc = np.radians(end - start) * middle * ax.figure.get_figheight() * 72 / 2.2  # ~points
    if arc < fontsize * 1.1:
        return
    angle = (start + end) / 2
    x, y = middle * np.cos(np.radians(angle)), middle * np.sin(np.radians(angle))
    # keep text upright: on the left half it reads from the outside in
    angle = (angle + 180) % 360 - 180
    rotation = angle if -90 <= angle <= 90 else angle - 180
    ax.text(
        x,
        y,
        _shorten(text),
        rotation=rotation,
        rotation_mode="anchor",
        ha="center",
        va="center",
        fontsize=fontsize,
        color=colour,
        **_PLAIN,
    )


def sunburst_chart(top: list[tuple[str, int, list[tuple[str, int]]]]) -> Markup | None:
    """The paper's Figure 2: root verbs on the inner ring (wedge size: the verb's count), each
    verb's top direct objects outside it (wedge size: the pair's count; the rest of the verb's
    share left pale). top is analysis.top_pairs(); None when it is empty."""
    total = sum(count for _, count, _ in top)
    if not top or total <= 0:
        return None
    import matplotlib
    from matplotlib.patches import Wedge

    # tab20 is ten dark/light pairs: the dark ten first, so neighbouring verbs differ clearly
    tab20 = matplotlib.colormaps["tab20"].colors
    palette = tab20[0::2] + tab20[1::2]
    with _figure("sunburst", 6.4, 6.4) as fig:
        ax = fig.add_subplot()
        ax.set_aspect("equal")
        ax.set_xlim(-1.02, 1.02)
        ax.set_ylim(-1.02, 1.02)
        ax.axis("off")

        def wedge(start: float, end: float, inner: float, outer: float, colour) -> None:
            ax.add_patch(
                Wedge(
                    (0, 0),
                    outer,
                    start,
                    end,
                    width=outer - inner,
                    facecolor=colour,
                    edgecolor="white",
                    linewidth=0.8,
                )
            )

        # clockwise from 12 o'clock: a share s of the total spans 360*s degrees
        done = 0
        for k, (verb, count, objects) in enumerate(top):
            colour = palette[k % len(palette)]
            end, start = 90 - 360 * done / total, 90 - 360 * (done + count) / total
            wedge(start, end, _HOLE, _MIDDLE, colour)
            _ring_label(ax, verb, start, end, _HOLE, _MIDDLE, 9, _ink_on(colour))
            inner_done = done
            for noun, n in objects:
                o_end = 90 - 360 * inner_done / total
                o_start = 90 - 360 * (inner_done + n) / total
                wedge(o_start, o_end, _MIDDLE, _OUTER, _tint(colour, 0.45))
                _ring_label(ax, noun, o_start, o_end, _MIDDLE, _OUTER, 8, _INK)
                inner_done += n
            if inner_done < done + count:  # the verb's other objects, or none: unlabelled
                wedge(start, 90 - 360 * inner_done / total, _MIDDLE, _OUTER, _tint(colour, 0.85))
            done += count
        return _to_svg(fig)
