"""The training monitor's figure: dead channels, flat fraction, tau-dormant share and gradient flow per
site over the steps of a health timeline (`deadneuron.Monitor` snapshots or their JSONL/CSV log)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deadneuron.render._style import empty_figure, new_figure, short_name
from deadneuron.render.timeline import timeline_rows

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# (column, title, y label, scale, per channel of the site)
_PANELS = (
    ("dead", "Dead channels (flat on every element of the window)", "channels", 1.0, False),
    ("flat_fraction", "Flat fraction", "% of pre-activations in the flat region", 100.0, False),
    ("tau_dormant", "tau-dormant units (Sokar et al. 2023)", "% of the site's channels", 100.0, True),
    ("grad_nonzero", "Gradient flow: non-zero dL/dz", "% of elements", 100.0, False),
)


def _number(value: object) -> float | None:
    """A number of a timeline row (a bool is not one)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _series(rows: Sequence[Mapping[str, Any]], site: str, column: str, scale: float,
            per_channel: bool) -> tuple[list[float], list[float]]:  # fmt: skip
    xs, ys = [], []
    for row in rows:
        if row["site"] != site:
            continue
        value = _number(row.get(column))
        if value is not None and math.isfinite(value) and per_channel:
            channels = _number(row.get("channels"))
            value = value / channels if channels is not None and channels > 0 else None
        xs.append(float(row["step"]))
        ys.append(scale * value if value is not None and math.isfinite(value) else math.nan)
    return xs, ys


def _panel(ax: Axes, rows: Sequence[Mapping[str, Any]], sites: Sequence[str], panel: tuple[Any, ...]) -> None:
    from matplotlib import colormaps

    column, title, ylabel, scale, per_channel = panel
    ax.set(title=title, ylabel=ylabel)
    ax.grid(alpha=0.3)
    colours = colormaps["tab10"]
    drawn = False
    totals: dict[float, float] = {}
    unmeasured = []
    for i, site in enumerate(sites):
        xs, ys = _series(rows, site, column, scale, per_channel)
        if all(math.isnan(y) for y in ys):
            unmeasured.append(site)
            continue
        drawn = True
        ax.plot(xs, ys, label=short_name(site, 36), color=colours(i % 10), ls=("-", "--", ":")[i // 10 % 3], lw=1.2,
                marker=".")
        for x, y in zip(xs, ys, strict=True):
            totals[x] = totals.get(x, 0.0) + (0.0 if math.isnan(y) else y)
    if not drawn:
        ax.text(0.5, 0.5, f"{column.replace('_', ' ')}: n/a (not measured)", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    elif unmeasured:  # a site without the figure is not at 0: it was not measured (no gradient reached it)
        more = f" and {len(unmeasured) - 2} more" if len(unmeasured) > 2 else ""
        ax.text(0.01, 0.01, f"n/a (not measured): {', '.join(short_name(s, 24) for s in unmeasured[:2])}{more}",
                fontsize=7, ha="left", va="bottom", transform=ax.transAxes)  # fmt: skip
    elif column == "dead" and len(sites) > 1:
        xs = sorted(totals)
        ax.plot(xs, [totals[x] for x in xs], color="black", lw=2, label="all sites")
    top = max(1.0, ax.get_ylim()[1])  # counts and shares from 0 (all-zero lines got ticks at +-0.04), a line at 0
    ax.set_ylim(-0.02 * top, top)  # kept clear of the frame
    if column == "dead":  # whole channels
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def plot_monitor_timeline(entries: Sequence[Mapping[str, Any]], *, title: str = "Health over training") -> Figure:
    """Four panels over the timeline's steps, one line per site."""
    fig = new_figure(12, 7.5)
    fig.suptitle(title)
    rows = timeline_rows(entries)
    if not rows:
        return empty_figure(fig, "the timeline has no entry with a site")
    sites = list(dict.fromkeys(r["site"] for r in rows))
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, panel in zip(axes, _PANELS, strict=True):
        _panel(ax, rows, sites, panel)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=8, frameon=False)
    return fig


__all__ = ["plot_monitor_timeline"]
