"""Matplotlib figures of a Report (and of what only the model or the checkpoint knows).

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global figure registry,
no backend switch): save it with ``fig.savefig(path)`` or ``figure_png(fig)``. Matplotlib and numpy are
imported inside the functions, so importing this module costs nothing.

Figures: per-site health, per-channel firing heatmap, per-channel moment distributions (the Report holds
per-channel moments, not element histograms, and the figure says so), slot samples beside their grids,
active slots per image, the health timeline over training, before/after a patch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deadneuron.render._style import (
    ARC_PALETTE,
    DEAD,
    DORMANT,
    FLAT,
    PAD_COLOUR,
    SPARSITY,
    empty_figure,
    figure_png,
    new_figure,
    short_name,
    site_axis,
)
from deadneuron.render.training_plots import plot_before_after, plot_health_timeline
from deadneuron.report import Report

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from deadneuron.slots import SlotHealth


# -- 1. per-site health ------------------------------------------------------------------------------
def plot_site_health(report: Report) -> Figure:
    """Sparsity beside flat fraction, and dead beside dormant channel counts, one row per site."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    sites = list(report.sites.values())
    fig = new_figure(11, max(3.0, 0.36 * len(sites) + 1.8))
    fig.suptitle(f"Per-site activation health: {report.meta.get('source') or report.meta.get('model', '')}")
    if not sites:
        return empty_figure(fig, "no activation sites were recorded")
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    y, h = np.arange(len(sites)), 0.4
    left.barh(y - h / 2, [100 * s.sparsity for s in sites], h, color=SPARSITY, label="sparsity (exact zeros)")
    left.barh(y + h / 2, [100 * s.flat_fraction for s in sites], h, color=FLAT, label="flat fraction (flat region)")
    left.set(xlim=(0, 100), xlabel="% of activation elements", title="Sparsity and flat fraction")
    left.axvline(50, color="#999999", lw=0.8, ls=":")
    site_axis(left, [s.name for s in sites])
    dead = [len(s.dead_channels) for s in sites]
    right.barh(y - h / 2, dead, h, color=DEAD, label="dead (never left the flat region)")
    right.barh(y + h / 2, [len(s.dormant_channels) for s in sites], h, color=DORMANT, label="dormant (flat >= 99%)")
    right.set(xlabel="channels", title="Dead and dormant channels")
    right.set_xlim(0, max(1, *dead, *(len(s.dormant_channels) for s in sites)) * 1.3)  # room for "k/C" labels
    right.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole channels
    for yi, s in zip(y, sites, strict=True):
        right.text(len(s.dead_channels), yi - h / 2, f" {len(s.dead_channels)}/{s.channels}", va="center", fontsize=7)
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    handles = [h for ax in (left, right) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return fig


# -- 2. per-channel heatmap --------------------------------------------------------------------------
def firing_matrix(report: Report) -> Any:
    """(sites, max channels) firing rate = 1 - flat fraction; NaN where a site has fewer channels."""
    import numpy as np

    sites = list(report.sites.values())
    width = max((s.channels for s in sites), default=0)
    m = np.full((len(sites), width), np.nan)
    for i, s in enumerate(sites):
        m[i, : s.channels] = s.firing_rate
    return m


def plot_channel_heatmap(report: Report) -> Figure:
    """Sites x channels firing rate; dead channels in red, dormant in amber, so they stand out."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, to_rgba
    from matplotlib.patches import Patch

    sites = list(report.sites.values())
    fig = new_figure(11, max(2.6, 0.34 * len(sites) + 1.9))
    fig.suptitle("Per-channel firing rate (1 - flat fraction); dead channels in red")
    if not sites:
        return empty_figure(fig, "no activation sites were recorded")
    ax = fig.add_subplot()
    # Blues from a light tint up: a firing rate of 0 must not look like the hatched "no such channel".
    cmap = ListedColormap(colormaps["Blues"](np.linspace(0.12, 1.0, 256))).with_extremes(bad=(0, 0, 0, 0))
    ax.patch.set_facecolor("white")
    ax.patch.set_hatch("////")
    ax.patch.set_edgecolor("#BBBBBB")
    matrix = firing_matrix(report)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    overlay = np.zeros((*matrix.shape, 4))
    for i, s in enumerate(sites):
        overlay[i, list(s.dormant_channels)] = to_rgba(DORMANT)
        overlay[i, list(s.dead_channels)] = to_rgba(DEAD)
    ax.imshow(overlay, aspect="auto", interpolation="nearest")
    site_axis(ax, [f"{short_name(s.name, 36)} ({len(s.dead_channels)}/{s.channels} dead)" for s in sites])
    ax.set(xlabel="channel", ylabel="site")
    ax.set_yticks(np.arange(len(sites) + 1) - 0.5, minor=True)
    ax.grid(which="minor", axis="y", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(image, ax=ax, label="firing rate", shrink=0.9)
    handles = [Patch(color=DEAD, label="dead (firing rate 0)"), Patch(color=DORMANT, label="dormant (< 1%)"),
               Patch(facecolor="white", edgecolor="#BBBBBB", hatch="////", label="no such channel")]  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return fig


# -- 3. per-channel moments --------------------------------------------------------------------------
MOMENTS = (("channel_mean", "mean"), ("channel_std", "std"), ("channel_min", "min"), ("channel_max", "max"))


def plot_activation_distributions(report: Report) -> Figure:
    """Box plots, per site, of each channel's mean, std, min and max of the activation output, all four
    panels on one value axis (the same scale and range), so that their boxes compare directly."""
    import math

    sites = list(report.sites.values())
    fig = new_figure(12, max(3.0, 0.36 * len(sites) + 1.9))
    fig.suptitle("Per-channel moments: the spread over each site's channels (not a histogram of activations)")
    if not sites:
        return empty_figure(fig, "no activation sites were recorded")
    axes = fig.subplots(1, 4, sharey=True, sharex=True)
    everything: list[float] = []
    for ax, (field, label) in zip(axes, MOMENTS, strict=True):
        values = [[v for v in getattr(s, field) if math.isfinite(v)] or [math.nan] for s in sites]
        everything += [v for vs in values for v in vs if math.isfinite(v)]
        ax.boxplot(values, orientation="horizontal", widths=0.6, flierprops={"markersize": 3, "alpha": 0.6},
                   medianprops={"color": FLAT})  # fmt: skip
        dead = [(getattr(s, field)[c], i + 1) for i, s in enumerate(sites) for c in s.dead_channels]
        if dead:
            ax.scatter(*zip(*dead, strict=True), marker="x", s=22, color=DEAD, zorder=3, label="dead channel")
        ax.set_title(f"channel {label}")
        ax.grid(axis="x", alpha=0.3)
        ax.axvline(0, color="#999999", lw=0.8, ls=":")
    xlabel = _moment_scale(axes[0], everything)  # shared: one scale and one range for the four panels
    fig.supxlabel(f"{xlabel}; one axis for all four panels", fontsize=10)
    axes[0].set_yticks(range(1, len(sites) + 1), labels=[short_name(s.name, 36) for s in sites], fontsize=8)
    axes[0].set_ylim(len(sites) + 0.5, 0.5)
    if any(s.dead_channels for s in sites):
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)
    return fig


def plot_activation_histograms(report: Report) -> Figure:
    """Per site, counts of activation values (log scale) over fixed signed-log bins
    (deadneuron.stats.HISTOGRAM_EDGES); exact zeros have a bin of their own."""
    import numpy as np

    from deadneuron.stats import HISTOGRAM_EDGES

    sites = [s for s in report.sites.values() if s.histogram is not None]
    cols = min(4, max(1, len(sites)))
    rows = max(1, -(-len(sites) // cols))
    fig = new_figure(3.2 * cols + 0.6, 2.2 * rows + 0.9)
    sampled = " of a strided sample of each batch" if report.meta.get("histogram_sampled") else ""
    fig.suptitle(f"Activation histograms per site (log counts{sampled}; signed log bins, exact zeros in red)")
    if not sites:
        return empty_figure(fig, "no histograms were recorded (audit with --out, or histograms=True)")
    edges = np.asarray(HISTOGRAM_EDGES)
    zero_bin = int(np.searchsorted(edges, 0.0)) # bucketize: bin i holds (e[i-1], e[i]]
    decades = {-1e4: "-1e4", -1e2: "-100", -1.0: "-1", -1e-2: "-.01", 1e-2: ".01", 1.0: "1", 1e2: "100", 1e4: "1e4"}
    ticks = {int(np.searchsorted(edges, v)): lab for v, lab in decades.items()}
    ticks[zero_bin] = "0"
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, site in zip(axes, sites, strict=False):
        counts = np.asarray(site.histogram, dtype=float)
        colours = [DEAD if i == zero_bin else SPARSITY for i in range(len(counts))]
        ax.bar(np.arange(len(counts)), np.where(counts > 0, counts, np.nan), width=1.0, color=colours)
        ax.set_yscale("log")
        ax.set_title(short_name(site.name, 34), fontsize=9)
        used = np.flatnonzero(counts > 0)
        lo, hi = (min(used.min(), zero_bin) - 1, max(used.max(), zero_bin) + 1) if used.size else (0, len(counts))
        shown = {t: lab for t, lab in ticks.items() if lo <= t <= hi}
        ax.set_xticks(list(shown), labels=list(shown.values()), fontsize=7)
        ax.set_xlim(lo - 0.5, hi + 0.5)
        ax.set(xlabel="activation value", ylabel="count")
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
    for ax in axes[len(sites) :]:
        ax.set_axis_off()
    return fig


def _moment_scale(ax: Axes, values: list[float]) -> str:
    """Linear, unless a few channels' outliers would squash every box into the first pixels: then symlog,
    linear up to the 90th percentile of |value| (where most channels lie) and logarithmic beyond.
    Returns the axis label that says which."""
    import math

    import numpy as np
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    spread = np.abs(np.asarray(values)) if values else np.zeros(1)
    typical, top = float(np.percentile(spread, 90)), float(spread.max())
    label = "activation value"
    if typical > 0 and top > 5 * typical:
        ax.set_xscale("symlog", linthresh=typical, linscale=2)
        label = f"activation value (linear to {typical:.2g}, log beyond)"
        # decades only from the linear threshold up: the default also ticks inside it, on top of the 0
        decades = [10.0**k for k in range(math.floor(math.log10(typical)), math.ceil(math.log10(top)) + 1)]
        ticks = [d for d in decades if d >= 0.2 * typical]  # one inside the linear part where one fits
        ticks = [0.0, *ticks, *(-d for d in ticks if values and -d >= min(values) * 1.5)]
        ax.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, 1, 10: not 10^0 beside 0
    else:
        ax.xaxis.set_major_locator(MaxNLocator(4))
    if values and min(values) >= 0:  # ReLU-like outputs: no room for negative values that do not occur
        ax.set_xlim(left=-0.03 * (typical if typical > 0 else top or 1.0))
    return label


# -- 4. slots ----------------------------------------------------------------------------------------
def plot_active_slots(slots: SlotHealth) -> Figure:
    """Histogram of active slots per image (SlotHealth.active_histogram) with the three mean counts."""
    fig = new_figure(6.5, 3.6)
    ax = fig.add_subplot()
    counts = list(slots.active_histogram)
    ax.bar(range(len(counts)), counts, color=SPARSITY, width=0.75)
    for k, c in enumerate(counts):
        if c:
            ax.annotate(str(c), (k, c), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8, zorder=4, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # above the bar, not on it
    ax.axvline(slots.mean_active, color=DEAD, ls="--", lw=1.2, label=f"mean {slots.mean_active:.2f} active")
    ax.axvline(slots.mean_argmax_active, color="#555555", ls=":", lw=1.2,
               label=f"mean {slots.mean_argmax_active:.2f} by bare argmax")  # fmt: skip
    ax.set_xticks(range(len(counts)))
    ax.set(xlabel=f"active slots (own >= {slots.params.min_pixels} pixel at confidence >= {slots.params.confidence})",
           ylabel="images", title=f"Active slots per image ({slots.images} images, {slots.num_slots} slots)")  # fmt: skip
    ax.set_ylim(0, max([1, *counts]) * 1.15)
    ax.legend(fontsize=8, frameon=False)
    return fig


def slot_sample_arrays(model: Any, adapter: Any, batch: Any, *, images: int = 4) -> dict[str, Any]:
    """Numpy arrays of the first ``images`` of ``batch``: grid, reconstruction, masks and valid pixels.

    Runs ``adapter.forward`` in eval mode without gradients (the model's mode is restored). Duck-typed
    on the ARC adapter's shapes: the batch has ``target`` (N, H, W) colour indices (-1 for padding), the
    outputs have ``logits`` (N, colours, H, W) (or are a tuple starting with them), and
    ``adapter.slot_masks`` gives (masks (N, K, H, W), valid (N, H, W)).
    """
    import torch

    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            outputs = adapter.forward(model, batch)
            masks, valid = adapter.slot_masks(outputs, batch)
            logits = getattr(outputs, "logits", None)
            logits = outputs[0] if logits is None and isinstance(outputs, tuple | list) else logits
    finally:
        model.train(was_training)
    target = getattr(batch, "target", None)
    if target is None or logits is None:
        raise ValueError("slot samples need a batch with .target grids and outputs with .logits (the ARC adapter's)")
    n = min(images, target.shape[0])
    cpu = {"grid": target[:n], "reconstruction": logits[:n].argmax(1), "masks": masks[:n], "valid": valid[:n]}
    return {k: v.detach().float().cpu().numpy() if k == "masks" else v.detach().cpu().numpy() for k, v in cpu.items()}


def plot_slot_samples(model: Any, adapter: Any, batch: Any, *, images: int = 4) -> Figure:
    """Sample ARC grids in the ARC palette beside their reconstructions and each slot's mask."""
    return draw_slot_samples(slot_sample_arrays(model, adapter, batch, images=images))


def _crop(valid: Any) -> tuple[slice, slice]:
    import numpy as np

    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    if not len(rows):
        return slice(0, valid.shape[0]), slice(0, valid.shape[1])
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def draw_slot_samples(arrays: Mapping[str, Any]) -> Figure:
    """The slot-sample figure from ``slot_sample_arrays``' output (testable without a model)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    grid, recon, masks, valid = (np.asarray(arrays[k]) for k in ("grid", "reconstruction", "masks", "valid"))
    n, k = masks.shape[:2]
    cell = min(1.25, 15.0 / (k + 2))
    fig = new_figure(cell * (k + 2) + 0.9, cell * n + 0.9)
    fig.suptitle("Sample grids (ARC palette), reconstructions and slot masks; % = share of pixels the slot owns "
                 "(argmax with mask >= 0.5)")
    palette = ListedColormap([*ARC_PALETTE, PAD_COLOUR])
    mask_cmap = colormaps["magma"].with_extremes(bad=PAD_COLOUR)
    axes = np.asarray(fig.subplots(n, k + 2, squeeze=False))
    image = None
    for i in range(n):
        rs, cs = _crop(valid[i])
        v = valid[i][rs, cs].astype(bool)
        g = np.where(v, grid[i][rs, cs], 10)
        r = np.where(v, recon[i][rs, cs], 10)
        acc = float((g == r)[v].mean()) if v.any() else float("nan")
        m = masks[i][:, rs, cs]
        owner, top = m.argmax(0), m.max(0)
        axes[i, 0].imshow(g, cmap=palette, vmin=0, vmax=10, interpolation="nearest")
        axes[i, 1].imshow(r, cmap=palette, vmin=0, vmax=10, interpolation="nearest")
        axes[i, 1].set_xlabel(f"{100 * acc:.0f}% correct", fontsize=7)
        axes[i, 0].set_ylabel(f"grid {i}", fontsize=8)
        for j in range(k):
            owned = float(((owner == j) & (top >= 0.5) & v).sum() / max(v.sum(), 1))
            image = axes[i, j + 2].imshow(np.where(v, m[j], np.nan), cmap=mask_cmap, vmin=0, vmax=1,
                                          interpolation="nearest")  # fmt: skip
            axes[i, j + 2].set_xlabel(f"{100 * owned:.0f}%", fontsize=7, color="black" if owned else "#999999")
    for j, title in enumerate(["grid", "reconstruction", *(f"slot {s}" for s in range(k))]):
        axes[0, j].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=axes[:, 2:], label="mask value", shrink=0.8, pad=0.01)
    return fig


__all__ = [
    "ARC_PALETTE",
    "draw_slot_samples",
    "figure_png",
    "firing_matrix",
    "plot_activation_distributions",
    "plot_active_slots",
    "plot_before_after",
    "plot_channel_heatmap",
    "plot_health_timeline",
    "plot_site_health",
    "plot_slot_samples",
    "slot_sample_arrays",
]
