"""Figures of training runs: the health timeline stored in a checkpoint, and before/after a patch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from deadneuron.patch.verify import renamed_sites, site_positions
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
FATES = (
    ("at_init", "dead at init: dead at the first point and still at the last", "#7F1D1D"),
    ("died", "died in training: alive at the first point, dead at the last", DEAD),
    ("revived", "revived: dead at some point, alive at the last", "#5AAE61"),
)


def _steps_known(timeline: Sequence[Mapping[str, Any]]) -> bool:
    steps = [e.get("step") for e in timeline]
    return all(isinstance(s, (int, float)) for s in steps) and all(a < b for a, b in pairwise(steps))  # type: ignore[operator]


def _timeline_x(timeline: Sequence[Mapping[str, Any]]) -> tuple[list[float], str]:
    """Optimizer steps where the timeline has them (the findings count in steps), else epochs, else points."""
    if _steps_known(timeline):
        return [float(e["step"]) for e in timeline], "training step"
    epochs = [e.get("epoch") for e in timeline]
    if all(isinstance(x, (int, float)) for x in epochs) and len(set(epochs)) == len(epochs):
        return [float(x) for x in epochs], "epoch"  # type: ignore[arg-type]
    return [float(i) for i in range(len(timeline))], "timeline point"


def _epoch_axis(ax: Axes, timeline: Sequence[Mapping[str, Any]]) -> None:
    """Epochs on the top edge of a panel drawn over steps (where the timeline has both)."""
    import numpy as np

    pairs = [(float(e["step"]), float(e["epoch"])) for e in timeline if isinstance(e.get("epoch"), (int, float))]
    if len(pairs) < 2 or not _steps_known(timeline) or any(b[1] <= a[1] for a, b in pairwise(pairs)):
        return
    steps, epochs = (np.array(v) for v in zip(*pairs, strict=True))
    top = ax.secondary_xaxis("top", functions=(lambda x: _extend(x, steps, epochs), lambda x: _extend(x, epochs, steps)))
    top.set_xlabel("epoch", fontsize=8)
    top.tick_params(labelsize=7)


def _extend(x: Any, xp: Any, fp: Any) -> Any:
    """``np.interp`` that continues the end segments' slopes past the ends (axis edges lie beyond them)."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    out = np.interp(x, xp, fp)
    lo, hi = (fp[1] - fp[0]) / (xp[1] - xp[0]), (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    out = np.where(x < xp[0], fp[0] + (x - xp[0]) * lo, out)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi, out)


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


def probe_text(timeline: Sequence[Mapping[str, Any]]) -> str:
    """What the timeline was measured on: the training batches of each window (a monitor's timeline), or
    its own fixed probe set (older checkpoints); never the audit's data."""
    measured = timeline[0].get("measured_on") if timeline else None
    if isinstance(measured, str):
        return f"measured on the {measured} since the previous point, not on the audit's data"
    images = {int(e["slots"]["images"]) for e in timeline if isinstance((e.get("slots") or {}).get("images"), int)}
    size = f"{images.pop()} held-out images, " if len(images) == 1 else ""
    return f"measured on the timeline's probe set ({size}the same at every point), not on the audit's data"


def plot_health_timeline(timeline: Sequence[Mapping[str, Any]],
                         history: Sequence[Mapping[str, Any]] | None = None) -> Figure:  # fmt: skip
    """Dead channels (all sites, and per site on their own scale), each site's channel fates, sparsity,
    active slots and accuracy over training (a checkpoint's health timeline), against optimizer steps."""
    fig = new_figure(12, 10.5)
    if not timeline:
        fig.suptitle("Health over training")
        return empty_figure(fig, "the checkpoint has no health timeline")
    fig.suptitle(f"Health over training: {probe_text(timeline)}", fontsize=11)
    x, xlabel = _timeline_x(timeline)
    axes = fig.subplot_mosaic([["total", "dead"], ["sparsity", "fate"], ["slots", "accuracy"]])
    timed = [axes[k] for k in ("total", "dead", "sparsity", "slots", "accuracy")]
    for ax in timed[1:]:
        ax.sharex(timed[0])
    sites = _timeline_sites(timeline)
    _dead_panels(axes["total"], axes["dead"], axes["sparsity"], timeline, x, sites)
    _fate_panel(axes["fate"], timeline, sites)
    _slot_panel(axes["slots"], timeline, x)
    _accuracy_panel(axes["accuracy"], timeline, x, history, steps=xlabel == "training step")
    for ax in timed:
        ax.grid(alpha=0.3)
        ax.set_xlabel(xlabel)
    if xlabel == "training step":
        for key in ("total", "dead"):
            _epoch_axis(axes[key], timeline)
    fig.legend(*axes["dead"].get_legend_handles_labels(), loc="outside lower center", ncols=min(4, max(1, len(sites))),
               fontsize=8, frameon=False)  # fmt: skip
    return fig


def _dead_panels(total_ax: Axes, dead_ax: Axes, sparse_ax: Axes, timeline: Sequence[Mapping[str, Any]],
                 x: Sequence[float], sites: Sequence[str]) -> None:  # fmt: skip
    """The total over all sites on one panel, each site on its own scale on the next, sparsity per site."""
    import math

    from matplotlib import colormaps

    colours = colormaps["tab10"]  # past ten sites the line style changes, not the shade (tab20 pairs look alike)
    total = [0.0] * len(timeline)
    for i, site in enumerate(sites):
        dead = _site_series(timeline, site, "dead")
        total = [t + (0 if math.isnan(d) else d) for t, d in zip(total, dead, strict=True)]
        colour, ls = colours(i % 10), ("-", "--", ":")[i // 10 % 3]
        dead_ax.plot(x, dead, label=short_name(site, 36), color=colour, ls=ls, lw=1.2, marker=".")
        sparse_ax.plot(x, _site_series(timeline, site, "sparsity", 100), color=colour, ls=ls, lw=1.2, marker=".")
    total_ax.plot(x, total, color="black", lw=2, marker=".", label="all sites")
    total_ax.set(title="Dead channels, all sites together", ylabel="channels", ylim=(0, max([1.0, *total]) * 1.1))
    dead_ax.set(title="Dead channels per site", ylabel="channels")
    dead_ax.set_ylim(bottom=0)
    sparse_ax.set(title="Sparsity per site", ylabel="% exact zeros", ylim=(0, 100))


def _fate_panel(ax: Axes, timeline: Sequence[Mapping[str, Any]], sites: Sequence[str]) -> None:
    """Per site, how many channels were dead at init, died in training, revived (the findings' words)."""
    from deadneuron.rules.timeline import dead_from_start_text, dead_history, window_of

    histories = [(site, dead_history(timeline, site)) for site in sites]
    known = [(site, h) for site, h in histories if h is not None]
    ax.set_title("Fate of each site's channels over the timeline")
    if not known:
        ax.text(0.5, 0.5, "no per-channel dead lists in the timeline", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    left = [0] * len(known)
    start = dead_from_start_text(window_of(timeline[0], 0))  # "dead at init" only where it starts at step 0
    for key, label, colour in FATES:
        label = label.replace("dead at init", start, 1)
        counts = [len(getattr(h, key)) for _, h in known]
        ax.barh(range(len(known)), counts, 0.7, left=left, color=colour, label=label)
        left = [a + b for a, b in zip(left, counts, strict=True)]
    site_axis(ax, [site for site, _ in known])
    ax.set_ylim(len(known) - 0.5, -0.5 - 0.35 * len(FATES) - 0.3)  # headroom above the first site for the legend
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("channels")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="upper left")


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
                    history: Sequence[Mapping[str, Any]] | None, *, steps: bool) -> None:  # fmt: skip
    ax.set(title="Reconstruction accuracy (valid pixels)", ylabel="%")
    acc = _metric_series(timeline, "metrics", "valid_pixel_accuracy", 100)
    if all(a != a for a in acc):
        ax.text(0.5, 0.5, "no accuracy in the timeline", ha="center", va="center", transform=ax.transAxes)
        return
    ax.plot(x, acc, color=AFTER, lw=2, marker=".", label="probe set")
    ax.plot(x, _metric_series(timeline, "metrics", "baseline_valid_pixel_accuracy", 100), color="#555555", ls="--",
            label="most-common-colour baseline (probe set)")  # fmt: skip
    where = "step" if steps else "epoch"
    train = [(float(r[where]), 100 * float(r["train_accuracy"])) for r in history or ()
             if r.get("train_accuracy") is not None and isinstance(r.get(where), (int, float))]  # fmt: skip
    if train and x and max(x) > 0:
        ax.plot(*zip(*train, strict=True), color=SPARSITY, lw=0.8, alpha=0.7, label="training batches (epoch mean)")
    ax.legend(fontsize=8, frameon=False)


# -- 6. before / after -------------------------------------------------------------------------------
def _as_list(reports: Report | Sequence[Report]) -> list[Report]:
    return [reports] if isinstance(reports, Report) else list(reports)


def _arm_values(reports: Sequence[Report], names: Sequence[str], key: str,
                aliases: Sequence[Mapping[str, str]] = ()) -> list[list[float]]:  # fmt: skip
    """Per site, the figure of each seed's report (missing sites skipped); ``aliases[i]`` maps a shown
    name to report i's own name for that site (where a swap renamed it)."""
    out = []
    for name in names:
        values = []
        for i, r in enumerate(reports):
            s = r.sites.get(aliases[i].get(name, name) if i < len(aliases) else name)
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
            ax.scatter([x for x, _ in dots], [y for _, y in dots], s=9, color="black", zorder=3)
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


def kind_changes(before: Sequence[Report], after: Sequence[Report]) -> list[str]:
    """What the reports themselves show was patched: the sites whose activation kind differs."""
    kinds_a = {n: s.kind for r in before for n, s in r.sites.items()}
    base = [site_positions(r) for r in before]
    kinds_b = {renamed_sites(base, site_positions(r)).get(n, n): s.kind for r in after for n, s in r.sites.items()}
    swaps: dict[tuple[str, str], int] = {}
    for name, kind in kinds_a.items():
        if name in kinds_b and kinds_b[name] != kind:
            swaps[(kind, kinds_b[name])] = swaps.get((kind, kinds_b[name]), 0) + 1
    shared = sum(1 for n in kinds_a if n in kinds_b)
    return [f"{a} -> {b} at {n} of {shared} sites" for (a, b), n in swaps.items()]


def plot_before_after(before: Report | Sequence[Report], after: Report | Sequence[Report], *,
                      labels: tuple[str, str] = ("before", "after"), changes: Sequence[str] = (),
                      budget: str = "") -> Figure:  # fmt: skip
    """Two Reports (or per-seed lists of Reports) side by side: per site and overall, the accuracy beside
    the trivial baseline. The title says what was patched (``changes``, e.g. the plan's lines; by default
    the activation swaps the reports show) and on what ``budget`` (e.g. seeds, init, steps)."""
    arms = (_as_list(before), _as_list(after))
    if not arms[0] or not arms[1]:
        raise ValueError("plot_before_after needs at least one report on each side")
    base = [site_positions(r) for r in arms[0]]
    renames = [renamed_sites(base, site_positions(r)) for r in arms[1]]  # after's name -> before's
    aliases: list[Mapping[str, str]] = [{b: a for a, b in rename.items()} for rename in renames]
    names = list(dict.fromkeys([*(n for r in arms[0] for n in r.sites),
                                *(rename.get(n, n) for r, rename in zip(arms[1], renames, strict=True) for n in r.sites)]))
    seeds = f" ({len(arms[0])} vs {len(arms[1])} seeds; dots: single seeds)" if max(map(len, arms)) > 1 else ""
    what = list(changes) or kind_changes(*arms)
    lines = [f"{labels[0]} vs {labels[1]}{seeds}"]
    lines += [f"{labels[1]}: " + "; ".join(what)] if what else []
    lines += [f"budget: {budget}"] if budget else []
    fig = new_figure(13, max(5.0, 0.36 * len(names) + 4.0 + 0.25 * (len(lines) - 1)))
    fig.suptitle("\n".join(lines), fontsize=11)
    mosaic = fig.subplot_mosaic([["sparsity", "flat", "dead"], ["overall", "overall", "slots"]],
                                height_ratios=(max(2.0, 0.36 * len(names) + 0.8), 2.2))  # fmt: skip
    panels = (("sparsity", "sparsity", "Sparsity per site", "% exact zeros"),
              ("flat", "flat_fraction", "Flat fraction per site", "% in the flat region"),
              ("dead", "dead_channels", "Dead channels per site", "channels"))  # fmt: skip
    for key, field, title, xlabel in panels:
        ax = mosaic[key]
        _paired_bars(ax, names, [_arm_values(arms[0], names, field), _arm_values(arms[1], names, field, aliases)], labels)
        ax.set(title=title, xlabel=xlabel)
        site_axis(ax, names) if key == "sparsity" else ax.set_yticks(range(len(names)), labels=[])
        ax.set_ylim(len(names) - 0.5, -0.5)
    fig.legend(*mosaic["sparsity"].get_legend_handles_labels(), loc="outside lower center", ncols=2, frameon=False)
    _summary_panels(mosaic["overall"], mosaic["slots"], arms, labels)
    return fig


def _trivial_baseline(arms: Sequence[Sequence[Report]]) -> float | None:
    """The most-common-colour accuracy (%) the reports carry (the same data for both arms), or None."""
    values = [100 * r.metrics["baseline_valid_pixel_accuracy"] for a in arms for r in a
              if "baseline_valid_pixel_accuracy" in r.metrics]  # fmt: skip
    return sum(values) / len(values) if values else None


def _summary_panels(overall: Axes, slot_ax: Axes, arms: Sequence[Sequence[Report]], labels: Sequence[str]) -> None:
    summaries = [_summary_values(a) for a in arms]
    keys = [k for k in ("sparsity %", "flat %", "accuracy %") if all(s[k] for s in summaries)]
    w = 0.38
    for j, (summary, colour, label) in enumerate(zip(summaries, (BEFORE, AFTER), labels, strict=True)):
        xs = [i + (j - 0.5) * w for i in range(len(keys))]
        means = [sum(summary[k]) / len(summary[k]) for k in keys]
        bars = overall.bar(xs, means, w, color=colour, label=label)
        overall.bar_label(bars, fmt="%.1f", fontsize=7)
    trivial = _trivial_baseline(arms)
    if trivial is not None and "accuracy %" in keys:
        i = keys.index("accuracy %")
        overall.hlines(trivial, i - w * 1.25, i + w * 1.25, colors="#222222", linestyles="--", lw=1.2)
        overall.text(i + w * 1.3, trivial, f"most-common-colour\nbaseline {trivial:.1f}", va="center", fontsize=7)
    overall.set_xticks(range(len(keys)), labels=keys)
    overall.set_xlim(-0.6, len(keys) - 0.4 + (0.5 if trivial is not None and "accuracy %" in keys else 0))
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
