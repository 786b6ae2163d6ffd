"""Shared look of deadneuron's figures: palette, colours, figure factory, label shortening.

Figures are built without pyplot (no global figure registry, no backend switch); matplotlib is imported
inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# ARC's ten colours (black, blue, red, green, yellow, grey, magenta, orange, sky, maroon).
ARC_PALETTE = (
    "#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25",
)  # fmt: skip
PAD_COLOUR = "#F4F4F4"
SPARSITY, FLAT, DEAD, DORMANT = "#4C72B0", "#DD8452", "#C0392B", "#F0B429"
BEFORE, AFTER = "#8C8C8C", "#2A7AB8"
MAX_LABEL = 44


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def figure_png(fig: Figure, *, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def short_name(name: str, limit: int = MAX_LABEL) -> str:
    """A site name cut in the middle to ``limit`` characters (both ends carry the meaning)."""
    if len(name) <= limit:
        return name
    keep = limit - 1
    return name[: keep // 2] + "…" + name[len(name) - (keep - keep // 2) :]


def empty_figure(fig: Figure, message: str) -> Figure:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, color="#555555")
    return fig


def site_axis(ax: Axes, names: Sequence[str]) -> None:
    ax.set_yticks(range(len(names)), labels=[short_name(n) for n in names], fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first site on top


