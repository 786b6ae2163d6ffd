"""Figures: checked on the matplotlib objects (titles, axes, plotted data), Agg backend, no pyplot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.render import plots
from deadneuron.report import Report

matplotlib.use("Agg")

GOLDEN = Path(__file__).parent / "golden"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_a() -> Report:
    return Report.from_json((GOLDEN / "report_a.json").read_text())


@pytest.fixture(scope="module")
def report_b() -> Report:
    return Report.from_json((GOLDEN / "report_b.json").read_text())


def titles(fig: Any) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_site_health(report_a: Report) -> None:
    fig = plots.plot_site_health(report_a)
    left, right = fig.axes
    assert "Per-site activation health" in fig.get_suptitle()
    assert (left.get_title(), left.get_xlabel()) == ("Sparsity and flat fraction", "% of activation elements")
    assert (right.get_title(), right.get_xlabel()) == ("Dead and dormant channels", "channels")
    assert [t.get_text() for t in left.get_yticklabels()] == list(report_a.sites)
    sparsity_bars = left.containers[0]
    assert [round(b.get_width(), 1) for b in sparsity_bars] == [55.2, 75.3, 55.9, 66.1, 57.5, 57.0, 52.4, 49.7, 54.3,
                                                               67.1, 62.7]  # fmt: skip
    assert [b.get_width() for b in right.containers[0]] == [0, 14, 10, 15, 7, 16, 9, 13, 10, 26, 21]  # dead
    assert [b.get_width() for b in right.containers[1]] == [0, 7, 0, 5, 5, 1, 2, 3, 1, 3, 4]  # dormant
    assert plots.figure_png(fig).startswith(PNG_MAGIC)


def test_channel_heatmap_marks_dead_channels(report_a: Report) -> None:
    fig = plots.plot_channel_heatmap(report_a)
    ax = fig.axes[0]
    assert "firing rate" in fig.get_suptitle()
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("channel", "site")
    assert fig.axes[1].get_ylabel() == "firing rate"  # the colour bar
    rates, overlay = (im.get_array() for im in ax.images)
    assert rates.shape == (11, 128) and np.ma.is_masked(rates[0, 64])  # 64 channels in a 128-wide row
    first = report_a.sites["encoder.bn_layers.0>relu"]
    assert rates[1, 0] == 0.0 and rates[0, 0] == pytest.approx(1 - first.channel_flat[0])
    dead_red = overlay[1, [0, 2, 6], 0]  # encoder.bn_layers.1>relu: channels 0, 2, 6 dead, 1 and 3 alive
    assert (dead_red > 0.7).all() and (overlay[1, [1, 3], 3] == 0).all()  # dead opaque red, others clear
    assert overlay[1, 15, 3] == 1.0  # the dormant channel 15 of encoder.bn_layers.1>relu is marked too
    assert "(14/64 dead)" in ax.get_yticklabels()[1].get_text()


def test_activation_distributions_are_honestly_titled(report_a: Report) -> None:
    fig = plots.plot_activation_distributions(report_a)
    assert "not a histogram" in fig.get_suptitle()
    assert titles(fig) == ["channel mean", "channel std", "channel min", "channel max"]
    assert (
        fig._supxlabel.get_text().startswith("activation value")
        and "one axis for all four" in fig._supxlabel.get_text()
    )
    assert len(fig.axes[0].collections) == 1  # dead channels drawn over the boxes


def test_activation_distributions_share_one_value_axis(report_a: Report) -> None:
    """The four panels compare directly: one scale and one range, covering every channel's moments."""
    fig = plots.plot_activation_distributions(report_a)
    assert len({ax.get_xscale() for ax in fig.axes}) == 1 and len({ax.get_xlim() for ax in fig.axes}) == 1
    lo, hi = fig.axes[0].get_xlim()
    moments = [v for s in report_a.sites.values() for f in ("channel_mean", "channel_std", "channel_min", "channel_max")
               for v in getattr(s, f)]  # fmt: skip
    assert lo <= min(moments) and hi >= max(moments)


def test_active_slots_histogram(report_a: Report) -> None:
    fig = plots.plot_active_slots(report_a.slots)
    ax = fig.axes[0]
    assert ax.get_title() == "Active slots per image (100 images, 7 slots)"
    assert ax.get_ylabel() == "images" and ax.get_xlabel().startswith("active slots")
    assert [b.get_height() for b in ax.containers[0]] == [19, 35, 46, 0, 0, 0, 0, 0]  # A: at most two slots


def test_active_slots_histogram_of_the_healthy_report(report_b: Report) -> None:
    ax = plots.plot_active_slots(report_b.slots).axes[0]
    assert [b.get_height() for b in ax.containers[0]] == [2, 19, 17, 18, 17, 13, 9, 5]


def test_empty_report_gives_a_figure_that_says_so() -> None:
    empty = Report.build([])
    for draw in (plots.plot_site_health, plots.plot_channel_heatmap, plots.plot_activation_distributions):
        fig = draw(empty)
        assert "no activation sites" in fig.axes[0].texts[0].get_text()


def timeline(*, channel_lists: bool = False) -> list[dict[str, Any]]:
    """Four points, 70 steps apart; at enc.1 channel 0 dies at epoch 10, channel 1 is dead from the start
    and revives at epoch 30, channel 2 is dead throughout (with ``channel_lists``)."""
    lists = {0: [1, 2], 10: [0, 1, 2], 20: [0, 1, 2], 30: [0, 2]}
    return [
        {
            "epoch": e, "step": 7 * e,
            "sites": {"enc.0>relu": {"sparsity": 0.5, "dead": 0, **({"dead_channels": []} if channel_lists else {})},
                      "enc.1>relu": {"sparsity": 0.5 + e / 100, "dead": e // 10,
                                     **({"dead_channels": lists[e]} if channel_lists else {})}},
            "slots": {"num_slots": 7, "images": 64, "mean_active": 1 + e / 20, "mean_argmax_active": 2.0,
                      "mean_mass_active": 6.5},
            "metrics": {"valid_pixel_accuracy": 0.6 + e / 200, "baseline_valid_pixel_accuracy": 0.68},
        }
        for e in (0, 10, 20, 30)
    ]  # fmt: skip


def _panels(fig: Any) -> dict[str, Any]:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_health_timeline() -> None:
    history = [{"epoch": e, "step": 7 * e, "train_accuracy": 0.6 + e / 150} for e in range(1, 31)]
    fig = plots.plot_health_timeline(timeline(), history)
    assert (
        "probe set (64 held-out images, the same at every point), not on the audit's data"
        in fig.get_suptitle()
    )
    panels = _panels(fig)
    assert list(panels) == ["Dead channels, all sites together", "Dead channels per site", "Sparsity per site",
                            "Fate of each site's channels over the timeline", "Active slots per image",
                            "Reconstruction accuracy (valid pixels)"]  # fmt: skip
    total, dead, sparsity = (panels[t] for t in list(panels)[:3])
    slots, accuracy = panels["Active slots per image"], panels["Reconstruction accuracy (valid pixels)"]
    for ax in (total, dead, sparsity, slots, accuracy):  # steps, as the findings count them
        assert ax.get_xlabel() == "training step" and list(ax.lines[0].get_xdata()) == [0, 70, 140, 210]
    assert list(total.lines[0].get_ydata()) == [0, 1, 2, 3]  # the total over sites, on its own panel
    assert [list(line.get_ydata()) for line in dead.lines] == [
        [0, 0, 0, 0],
        [0, 1, 2, 3],
    ]  # each site, own scale
    assert dead.get_ylim()[1] < 4 < total.get_ylim()[1] * 2
    assert list(sparsity.lines[1].get_ydata()) == pytest.approx([50, 60, 70, 80])
    assert [line.get_label() for line in accuracy.lines] == ["probe set", "most-common-colour baseline (probe set)",
                                                             "training batches (epoch mean)"]  # fmt: skip
    assert list(accuracy.lines[2].get_xdata())[:2] == [
        7,
        14,
    ]  # training accuracy at its steps, not its epochs
    fate = panels["Fate of each site's channels over the timeline"]
    assert "no per-channel dead lists" in fate.texts[0].get_text()


def test_timeline_fates_follow_the_channel_lists() -> None:
    fig = plots.plot_health_timeline(timeline(channel_lists=True))
    fate = _panels(fig)["Fate of each site's channels over the timeline"]
    labels = [c.get_label() for c in fate.containers]
    assert [label.split(":")[0] for label in labels] == ["dead at init", "died in training", "revived"]
    assert "dead at the first point and still at the last" in labels[0]
    counts = [[b.get_width() for b in c] for c in fate.containers]  # rows: enc.0, enc.1
    assert counts == [[0, 1], [0, 1], [0, 1]]  # channel 2 at init, channel 0 died, channel 1 revived


def test_a_timeline_resumed_after_step_0_does_not_say_dead_at_init() -> None:
    """A monitor resumed at step 70 did not see the model's init: the legend says what it saw."""
    resumed = [e for e in timeline(channel_lists=True) if e["step"] > 0]
    fate = _panels(plots.plot_health_timeline(resumed))["Fate of each site's channels over the timeline"]
    first = fate.containers[0].get_label()
    assert "at init" not in first and first.startswith("dead since the first point measured (step 70)")


def test_timeline_without_slots_or_entries() -> None:
    bare = [{k: v for k, v in e.items() if k != "slots"} for e in timeline()]
    fig = plots.plot_health_timeline(bare)
    assert _panels(fig)["Active slots per image"].texts[0].get_text() == "no slot masks in the timeline"
    assert "no health timeline" in plots.plot_health_timeline([]).axes[0].texts[0].get_text()


def test_before_after(report_a: Report, report_b: Report) -> None:
    fig = plots.plot_before_after(report_a, report_b, labels=("relu", "healthy"))
    assert fig.get_suptitle().splitlines() == ["relu vs healthy"]  # the same activations at the same sites
    assert titles(fig) == ["Sparsity per site", "Flat fraction per site", "Dead channels per site", "Overall",
                           "Active slots per image"]  # fmt: skip
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(report_a.sites)
    assert [round(b.get_height(), 2) for c in fig.axes[4].containers for b in c] == [1.27, 3.29]


def test_before_after_of_a_patch_that_moved_sites(report_a: Report, report_b: Report) -> None:
    def leaky(site: Any) -> Any:
        return site.__class__(**{**site.__dict__, "kind": "leaky_relu"})

    a, b = report_a.sites, report_b.sites
    relu = Report.build([a["encoder.bn_layers.0>relu"], a["encoder.bn_layers.1>relu"], a["encoder.bn_layers.2>relu"],
                         a["encoder.mlp.1"]])  # fmt: skip
    patched = Report.build([leaky(b["encoder.bn_layers.0>relu"]), leaky(b["encoder.bn_layers.1>relu"]),
                            b["encoder.bn_layers.3>relu"], b["encoder.mlp.1"]])  # fmt: skip
    fig = plots.plot_before_after(relu, patched, labels=("relu", "leaky"))
    assert fig.get_suptitle().splitlines() == [
        "relu vs leaky",
        "leaky: relu -> leaky_relu at 2 of 3 sites",
    ]  # 3 shared
    sparsity = fig.axes[0]
    assert "encoder.bn_layers.3>relu" in [t.get_text() for t in sparsity.get_yticklabels()]  # only in B
    assert any("absent leaky" in t.get_text() for t in sparsity.texts)  # encoder.bn_layers.2>relu: only in A
    assert any("absent relu" in t.get_text() for t in sparsity.texts)


def test_before_after_says_what_was_patched_on_what_budget_against_the_trivial_baseline(
    report_a: Report, report_b: Report
) -> None:
    fig = plots.plot_before_after(report_a, report_b, labels=("baseline", "patched"), changes=["set learning_rate x 0.5"],
                                  budget="seeds 0; init scratch; steps 602")  # fmt: skip
    assert fig.get_suptitle().splitlines()[1:] == ["patched: set learning_rate x 0.5",
                                                   "budget: seeds 0; init scratch; steps 602"]  # fmt: skip
    overall = fig.axes[3]
    (line,) = overall.collections  # the most-common-colour accuracy, the same data for both arms
    trivial = 100 * report_a.metrics["baseline_valid_pixel_accuracy"]
    assert line.get_segments()[0][0][1] == pytest.approx(trivial)
    assert any(f"baseline {trivial:.1f}" in t.get_text() for t in overall.texts)


def test_before_after_per_seed(report_a: Report, report_b: Report) -> None:
    fig = plots.plot_before_after([report_a, report_a], [report_b, report_b])
    assert "2 vs 2 seeds" in fig.get_suptitle()
    assert len(fig.axes[0].collections) == 2  # one dot per seed, per arm
    with pytest.raises(ValueError, match="at least one report"):
        plots.plot_before_after([], report_b)


# -- slot samples ------------------------------------------------------------------------------------
class Out(NamedTuple):
    logits: torch.Tensor
    masks: torch.Tensor
    slots: torch.Tensor


class Batch(NamedTuple):
    x: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor


class TinySlotModel(nn.Module):
    def __init__(self, slots: int = 3) -> None:
        super().__init__()
        self.k = slots
        self.conv = nn.Conv2d(11, slots + 10, 1)

    def forward(self, x: torch.Tensor) -> Out:
        h = self.conv(x)
        return Out(h[:, self.k :].log_softmax(1), h[:, : self.k].softmax(1), h.mean((2, 3)))


class TinyAdapter:
    def forward(self, model: nn.Module, batch: Batch) -> Out:
        return model(batch.x)

    def slot_masks(self, outputs: Out, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs.masks, batch.valid

    def batches(self, split: str, config: Any) -> list[Batch]:
        return [grid_batch()]


def grid_batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 10, (3, 6, 5), generator=gen)
    target[1, 4:, :] = -1  # a 4x5 grid padded to 6x5
    valid = target.ge(0)
    x = torch.nn.functional.one_hot(torch.where(valid, target, 10), 11).permute(0, 3, 1, 2).float()
    return Batch(x, target, valid)


def test_slot_samples() -> None:
    model, batch = TinySlotModel().train(), grid_batch()
    fig = plots.plot_slot_samples(model, TinyAdapter(), batch, images=2)
    assert model.training  # mode restored
    assert "ARC palette" in fig.get_suptitle()
    grid_axes = fig.axes[: 2 * 5]
    assert [ax.get_title() for ax in grid_axes[:5]] == [
        "grid",
        "reconstruction",
        "slot 0",
        "slot 1",
        "slot 2",
    ]
    shown = grid_axes[5].images[0].get_array()  # grid 1, cropped to its valid 4x5 region
    assert shown.shape == (4, 5) and (np.asarray(shown) == batch.target[1, :4].numpy()).all()
    owned = [ax.get_xlabel() for ax in grid_axes[2:5]]
    assert sum(int(s.rstrip("%")) for s in owned) <= 100
    assert fig.axes[-1].get_ylabel() == "mask value"


def test_slot_samples_need_grids() -> None:
    batch = grid_batch()
    with pytest.raises(ValueError, match=r"\.target grids"):
        plots.plot_slot_samples(TinySlotModel(), TinyAdapter(), batch._replace(target=None))


def test_activation_histogram_figure_titles_and_axes() -> None:
    import torch

    import deadneuron
    from deadneuron.render.plots import plot_activation_histograms
    from tests import zoo

    model = zoo.GeluMLP(zoo.Tap())
    report = deadneuron.audit(model, [torch.randn(16, 12) for _ in range(2)], histograms=True, progress=False)
    fig = plot_activation_histograms(report)
    assert "Activation histograms per site" in fig._suptitle.get_text()
    ax = fig.axes[0]
    assert ax.get_title() == "act" and ax.get_yscale() == "log" and ax.get_xlabel() == "activation value"
    assert "0" in [t.get_text() for t in ax.get_xticklabels()]


def test_before_after_pairs_sites_a_swap_renamed() -> None:
    class SharedMlp(torch.nn.Module):  # one Sequential applied twice: its sites are named after the activation
        def __init__(self, act: torch.nn.Module) -> None:
            super().__init__()
            self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), act, torch.nn.Linear(6, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(self.mlp(x))

    torch.manual_seed(0)
    relu, leaky = SharedMlp(torch.nn.ReLU()), SharedMlp(torch.nn.LeakyReLU(0.01))
    leaky.load_state_dict(relu.state_dict())
    xs = [torch.randn(8, 4) for _ in range(3)]
    before, after = deadneuron.audit(relu, xs, rules=False), deadneuron.audit(leaky, xs, rules=False)
    assert list(after.sites) == ["mlp.0>leaky_relu#0", "mlp.0>leaky_relu#1"]
    fig = plots.plot_before_after(before, after, labels=("relu", "leaky"))
    assert fig.get_suptitle().splitlines()[1] == "leaky: relu -> leaky_relu at 2 of 2 sites"
    flat = fig.axes[1]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["mlp.0>relu#0", "mlp.0>relu#1"]
    assert not any("absent" in t.get_text() for ax in fig.axes for t in ax.texts)
    with torch.no_grad():  # the same weights: the flat fraction (z <= 0) is the same in both arms
        zs = ([relu.mlp[0](x) for x in xs], [relu.mlp[0](relu.mlp(x)) for x in xs])
    expected = [100 * (torch.cat(z) <= 0).double().mean().item() for z in zs]
    (relu_bars, leaky_bars) = flat.containers
    assert [b.get_width() for b in relu_bars] == pytest.approx(expected, abs=1e-9)
    assert [b.get_width() for b in leaky_bars] == pytest.approx(expected, abs=1e-9)
