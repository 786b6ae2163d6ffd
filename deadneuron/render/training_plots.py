"""Figures of training runs: the health timeline stored in a checkpoint, and before/after a patch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deadneuron.render._style import (
    AFTER,
    BEFORE,
    DEAD,
    FLAT,
    SPARSITY,
    empty_figure,
    new_figure,
    short_name,
    site_axis,
)
from deadneuron.report import Report

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# -- 5. health timeline ------------------------------------------------------------------------------
def _timeline_x(timeline: Sequence[Mapping[str, Any]]) -> tuple[list[float], str]:
    epochs = [float(e.get("epoch", 0)) for e in timeline]
    if len(set(epochs)) == len(epochs):
        return epochs, "epoch"
    return [float(e.get("step", i)) for i, e in enumerate(timeline)], "step"


def _timeline_sites(timeline: Sequence[Mapping[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for entry in timeline:
        names.update(dict.fromkeys(entry.get("sites", {})))
    return list(names)


def _site_series(timeline: Sequence[Mapping[str, Any]], site: str, key: str, scale: float = 1.0) -> list[float]:
    out = []
    for entry in timeline:
        value = entry.get("sites", {}).get(site, {}).get(key)
        out.append(float("nan") if value is None else scale * float(value))
    return out


def _metric_series(timeline: Sequence[Mapping[str, Any]], group: str, key: str, scale: float = 1.0) -> list[float]:
    out = []
    for entry in timeline:
        value = (entry.get(group) or {}).get(key)
        out.append(float("nan") if value is None else scale * float(value))
    return out


def plot_health_timeline(timeline: Sequence[Mapping[str, Any]],
                         history: Sequence[Mapping[str, Any]] | None = None) -> Figure:  # fmt: skip
    """Dead channels, sparsity, active slots and accuracy over training (a checkpoint's health timeline)."""
    import math

    from matplotlib import colormaps

    fig = new_figure(12, 7.5)
    fig.suptitle("Health over training")
    if not timeline:
        return empty_figure(fig, "the checkpoint has no health timeline")
    x, xlabel = _timeline_x(timeline)
    (dead_ax, sparse_ax), (slot_ax, acc_ax) = fig.subplots(2, 2, sharex=True)
    sites = _timeline_sites(timeline)
    colours = colormaps["tab10"]  # past ten sites the line style changes, not the shade (tab20 pairs look alike)
    total = [0.0] * len(timeline)
    for i, site in enumerate(sites):
        dead = _site_series(timeline, site, "dead")
        total = [t + (0 if math.isnan(d) else d) for t, d in zip(total, dead, strict=True)]
        style = {"color": colours(i % 10), "ls": ("-", "--", ":")[i // 10 % 3], "lw": 1.2, "marker": "."}
        dead_ax.plot(x, dead, label=short_name(site, 36), **style)
        sparse_ax.plot(x, _site_series(timeline, site, "sparsity", 100), **style)
    dead_ax.plot(x, total, color="black", lw=2, label="all sites")
    dead_ax.set(title="Dead channels", ylabel="channels")
    sparse_ax.set(title="Sparsity per site", ylabel="% exact zeros", ylim=(0, 100))
    _slot_panel(slot_ax, timeline, x)
    _accuracy_panel(acc_ax, timeline, x, history)
    for ax in (dead_ax, sparse_ax, slot_ax, acc_ax):
        ax.grid(alpha=0.3)
    for ax in (slot_ax, acc_ax):
        ax.set_xlabel(xlabel)
    fig.legend(*dead_ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(4, len(sites) + 1),
               fontsize=8, frameon=False)  # fmt: skip
    return fig


def _slot_panel(ax: Axes, timeline: Sequence[Mapping[str, Any]], x: Sequence[float]) -> None:
    ax.set(title="Active slots per image", ylabel="slots")
    if not any(e.get("slots") for e in timeline):
        ax.text(0.5, 0.5, "no slot masks in the timeline", ha="center", va="center", transform=ax.transAxes)
        return
    ax.plot(x, _metric_series(timeline, "slots", "mean_active"), color=DEAD, lw=2, marker=".", label="active")
    ax.plot(x, _metric_series(timeline, "slots", "mean_argmax_active"), color="#555555", ls=":", label="bare argmax")
    ax.plot(x, _metric_series(timeline, "slots", "mean_mass_active"), color=FLAT, ls="--", label="mass >= 5%")
    num_slots = max(int((e.get("slots") or {}).get("num_slots", 0)) for e in timeline)
    ax.set_ylim(0, max(num_slots, 1) + 0.5)
    ax.legend(fontsize=8, frameon=False)


def _accuracy_panel(ax: Axes, timeline: Sequence[Mapping[str, Any]], x: Sequence[float],
                    history: Sequence[Mapping[str, Any]] | None) -> None:  # fmt: skip
    ax.set(title="Reconstruction accuracy (valid pixels)", ylabel="%")
    acc = _metric_series(timeline, "metrics", "valid_pixel_accuracy", 100)
    if all(a != a for a in acc):
        ax.text(0.5, 0.5, "no accuracy in the timeline", ha="center", va="center", transform=ax.transAxes)
        return
    ax.plot(x, acc, color=AFTER, lw=2, marker=".", label="held-out probe")
    ax.plot(x, _metric_series(timeline, "metrics", "baseline_valid_pixel_accuracy", 100), color="#555555", ls="--",
            label="most-common-colour baseline")  # fmt: skip
    train = [(float(r["epoch"]), 100 * float(r["train_accuracy"])) for r in history or ()
             if r.get("train_accuracy") is not None and "epoch" in r]  # fmt: skip
    if train and x and max(x) > 0:
        ax.plot(*zip(*train, strict=True), color=SPARSITY, lw=0.8, alpha=0.7, label="training (epoch mean)")
    ax.legend(fontsize=8, frameon=False)


# -- 6. before / after -------------------------------------------------------------------------------
def _as_list(reports: Report | Sequence[Report]) -> list[Report]:
    return [reports] if isinstance(reports, Report) else list(reports)


def _arm_values(reports: Sequence[Report], names: Sequence[str], key: str) -> list[list[float]]:
    """Per site, the figure of each seed's report (missing sites skipped)."""
    out = []
    for name in names:
        values = []
        for r in reports:
            s = r.sites.get(name)
            if s is not None:
                values.append(float(len(getattr(s, key))) if key.endswith("_channels") else 100 * getattr(s, key))
        out.append(values)
    return out


def _paired_bars(ax: Axes, names: Sequence[str], arms: Sequence[list[list[float]]],
                 labels: Sequence[str]) -> None:  # fmt: skip
    """Two bars per site (mean over seeds), each seed as a dot."""
    h = 0.38
    for offset, values, colour, label in zip((-h / 2, h / 2), arms, (BEFORE, AFTER), labels, strict=True):
        means = [sum(v) / len(v) if v else float("nan") for v in values]
        ax.barh([i + offset for i in range(len(names))], means, h, color=colour, label=label)
        for i, v in enumerate(values):
            if not v:
                ax.text(0, i + offset, f" absent {label}", va="center", fontsize=6, color="#777777")
        dots = [(x, i + offset) for i, v in enumerate(values) if len(v) > 1 for x in v]
        if dots:
            ax.scatter(*zip(*dots, strict=True), s=9, color="black", zorder=3)
    ax.grid(axis="x", alpha=0.3)


def _summary_values(reports: Sequence[Report]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"sparsity %": [], "flat %": [], "accuracy %": [], "active slots": []}
    for r in reports:
        out["sparsity %"].append(100 * r.summary.sparsity)
        out["flat %"].append(100 * r.summary.flat_fraction)
        if "valid_pixel_accuracy" in r.metrics:
            out["accuracy %"].append(100 * r.metrics["valid_pixel_accuracy"])
        if r.slots is not None:
            out["active slots"].append(r.slots.mean_active)
    return out


def plot_before_after(before: Report | Sequence[Report], after: Report | Sequence[Report], *,
                      labels: tuple[str, str] = ("before", "after")) -> Figure:  # fmt: skip
    """Two Reports (or per-seed lists of Reports) side by side: per site and overall."""
    arms = (_as_list(before), _as_list(after))
    if not arms[0] or not arms[1]:
        raise ValueError("plot_before_after needs at least one report on each side")
    names = list(dict.fromkeys(n for r in (*arms[0], *arms[1]) for n in r.sites))
    seeds = f" ({len(arms[0])} vs {len(arms[1])} seeds; dots: single seeds)" if max(map(len, arms)) > 1 else ""
    fig = new_figure(13, max(5.0, 0.36 * len(names) + 4.0))
    fig.suptitle(f"{labels[0]} vs {labels[1]}{seeds}")
    mosaic = fig.subplot_mosaic([["sparsity", "flat", "dead"], ["overall", "overall", "slots"]],
                                height_ratios=(max(2.0, 0.36 * len(names) + 0.8), 2.2))  # fmt: skip
    panels = (("sparsity", "sparsity", "Sparsity per site", "% exact zeros"),
              ("flat", "flat_fraction", "Flat fraction per site", "% in the flat region"),
              ("dead", "dead_channels", "Dead channels per site", "channels"))  # fmt: skip
    for key, field, title, xlabel in panels:
        ax = mosaic[key]
        _paired_bars(ax, names, [_arm_values(a, names, field) for a in arms], labels)
        ax.set(title=title, xlabel=xlabel)
        site_axis(ax, names) if key == "sparsity" else ax.set_yticks(range(len(names)), labels=[])
        ax.set_ylim(len(names) - 0.5, -0.5)
    fig.legend(*mosaic["sparsity"].get_legend_handles_labels(), loc="outside lower center", ncols=2, frameon=False)
    _summary_panels(mosaic["overall"], mosaic["slots"], arms, labels)
    return fig


def _summary_panels(overall: Axes, slot_ax: Axes, arms: Sequence[Sequence[Report]], labels: Sequence[str]) -> None:
    summaries = [_summary_values(a) for a in arms]
    keys = [k for k in ("sparsity %", "flat %", "accuracy %") if all(s[k] for s in summaries)]
    w = 0.38
    for j, (summary, colour, label) in enumerate(zip(summaries, (BEFORE, AFTER), labels, strict=True)):
        xs = [i + (j - 0.5) * w for i in range(len(keys))]
        means = [sum(summary[k]) / len(summary[k]) for k in keys]
        bars = overall.bar(xs, means, w, color=colour, label=label)
        overall.bar_label(bars, fmt="%.1f", fontsize=7)
    overall.set_xticks(range(len(keys)), labels=keys)
    overall.set(title="Overall", ylabel="%", ylim=(0, 110))
    slot_ax.set(title="Active slots per image", ylabel="slots")
    if not all(s["active slots"] for s in summaries):
        slot_ax.text(0.5, 0.5, "no slot masks", ha="center", va="center", transform=slot_ax.transAxes)
        slot_ax.set_xticks([])
        return
    for j, (summary, colour) in enumerate(zip(summaries, (BEFORE, AFTER), strict=True)):
        values = summary["active slots"]
        bars = slot_ax.bar([j], [sum(values) / len(values)], 0.6, color=colour)
        slot_ax.bar_label(bars, fmt="%.2f", fontsize=7)
        if len(values) > 1:
            slot_ax.scatter([j] * len(values), values, s=9, color="black", zorder=3)
    slot_ax.set_xticks([0, 1], labels=list(labels))
    top = max(v for s in summaries for v in s["active slots"])
    slot_ax.set_ylim(0, max(top * 1.2, 1.0))  # all-collapsed runs (0 active) still get an axis


__all__ = ["plot_before_after", "plot_health_timeline"]
