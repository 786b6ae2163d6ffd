"""An exact ReLU (``nn.ReLU``, ``F.relu``, ``x.relu_()``...) is measured from its input z alone: relu's
values and the flat region tested on z, in one read. Checked against numpy over the z each model stored
itself, with the values where reading the output would be wrong (z = -inf gives a finite 0 that is not
flat), on every layout the kernel reads; and a ReLU whose forward is not relu's is measured on its output."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from deadneuron.stats import ChannelStats
from tests.test_native import needs_native


class Stored(nn.Module):
    """Applies ``act`` to its input laid out by ``layout``, storing a copy of the pre-activation."""

    def __init__(self, act: nn.Module | None, how: str, layout: str) -> None:
        super().__init__()
        self.act, self.how, self.layout = act, how, layout
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.permute(0, 2, 3, 1) if self.layout == "channels-last-view" else x * 1.0
        self.seen.append(z.detach().numpy().copy())
        if self.how == "module":
            return self.act(z)  # type: ignore[misc]
        if self.how == "F.relu":
            return F.relu(z)
        if self.how == "relu_":
            return z.relu_()
        return torch.relu(z)


def _awkward(shape: tuple[int, ...], seed: int, axis: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    flat[::11] = 0.0
    flat[3::17] = -0.0
    flat[5] = -float("inf")  # relu: 0, finite; z is not flat (a non-finite z never is)
    flat[8] = float("nan")
    flat[13] = float("inf")
    dead = x.select(axis, 1)
    dead.copy_(-torch.rand(dead.shape, generator=g) - 0.1)  # channel 1 is dead
    return x


def _oracle(zs: list[np.ndarray], axis: int) -> dict[str, np.ndarray]:
    z = np.concatenate([np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis]) for t in zs]).astype(np.float64)
    with np.errstate(invalid="ignore"):
        a = np.where(z < 0, 0.0, z)  # torch.relu: -inf -> 0, NaN stays NaN
        fin = np.isfinite(a)
        flat = (np.isfinite(z) & (z <= 0)).sum(0)
        zero = (np.abs(a) <= 0).sum(0)
    am = np.where(fin, a, np.nan)
    return {
        "n": np.array(z.shape[0]), "zero": zero, "flat": flat, "nonfinite": (~fin).sum(0),
        "mean": np.nanmean(am, 0), "std": np.nanstd(am, 0), "min": np.nanmin(am, 0), "max": np.nanmax(am, 0),
    }  # fmt: skip


LAYOUTS = {  # input shape, channel axis of the activation's input, how the model lays it out
    "nchw": ((4, 5, 6, 7), 1, "contiguous"),
    "nchw-long-rows": ((2, 5, 20, 20), 1, "contiguous"),
    "channels-last-view": ((4, 5, 6, 7), 3, "channels-last-view"),
    "conv1d": ((6, 5, 33), 1, "contiguous"),
    "tokens": ((3, 9, 5), 2, "contiguous"),
}


@needs_native
@pytest.mark.parametrize("how", ["module", "module-inplace", "F.relu", "relu_", "torch.relu"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exact_relu_figures_equal_numpy_over_the_stored_input(how: str, layout: str) -> None:
    shape, axis, lay = LAYOUTS[layout]
    act = nn.ReLU(inplace=how == "module-inplace") if how.startswith("module") else None
    model = Stored(act, "module" if act is not None else how, lay)
    batches = [_awkward(shape, seed, 1 if lay == "channels-last-view" else axis) for seed in range(3)]
    # no layer of known layout produces the input: the channel dim is said, as a user would
    report = deadneuron.audit(model, batches, progress=False, rules=False, channel_axis={"*": axis})
    (site,) = report.sites.values()
    want = _oracle(model.seen[-3:], axis)
    assert site.channel_axis == axis
    assert site.n == int(want["n"])
    np.testing.assert_array_equal(np.round(np.array(site.channel_zero) * site.n), want["zero"])
    np.testing.assert_array_equal(np.round(np.array(site.channel_flat) * site.n), want["flat"])
    np.testing.assert_array_equal(site.channel_nonfinite, want["nonfinite"])
    for key in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(getattr(site, f"channel_{key}"), want[key], rtol=1e-9, atol=1e-12, err_msg=key)
    assert 1 in site.dead_channels  # the planted dead channel


@needs_native
def test_minus_inf_input_is_a_finite_zero_that_is_not_flat() -> None:
    """Where the output would be read (relu(-inf) is 0), -inf inputs would be counted flat."""
    z = torch.full((4, 2, 8), -float("inf"))
    z[:, 1] = -1.0
    report = deadneuron.audit(nn.Sequential(nn.ReLU()), [z], progress=False, rules=False, channel_axis={"*": 1})
    (site,) = report.sites.values()
    assert site.channel_zero == (1.0, 1.0)
    assert site.channel_nonfinite == (0, 0)
    assert site.channel_flat == (0.0, 1.0)
    assert site.dead_channels == (1,)


@needs_native
def test_the_input_is_read_once_by_the_relu_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact ReLU of a model goes through `update_relu_along` (one read of z) and nothing else reads
    the output; the same figures as the eager torch reference."""
    calls: list[tuple[int, ...]] = []
    outputs: list[tuple[int, ...]] = []
    relu_along, output_along = ChannelStats.update_relu_along, ChannelStats.update_output_along

    def spy_relu(self: ChannelStats, z: torch.Tensor, *args: object, **kwargs: object) -> bool:
        calls.append(tuple(z.shape))
        return relu_along(self, z, *args, **kwargs)  # type: ignore[arg-type]

    def spy_out(self: ChannelStats, a: torch.Tensor, *args: object, **kwargs: object) -> None:
        outputs.append(tuple(a.shape))
        output_along(self, a, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ChannelStats, "update_relu_along", spy_relu)
    monkeypatch.setattr(ChannelStats, "update_output_along", spy_out)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1), nn.ReLU()).eval()
    batches = [torch.randn(2, 3, 9, 9) for _ in range(2)]
    fast = deadneuron.audit(model, batches, progress=False, rules=False)
    assert calls == [(2, 4, 7, 7)] * 4 and outputs == []
    eager = deadneuron.audit(model, batches, progress=False, rules=False, compile=False)
    for name, site in fast.sites.items():
        ref = eager.sites[name]
        assert (site.channel_zero, site.channel_flat, site.dead_channels) == (ref.channel_zero, ref.channel_flat, ref.dead_channels)
        np.testing.assert_allclose(site.channel_mean, ref.channel_mean, rtol=1e-12)
        np.testing.assert_allclose(site.channel_std, ref.channel_std, rtol=1e-9)


class ShiftedReLU(nn.ReLU):
    """A ReLU subclass whose forward is not relu's: relu(x - 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x - 1.0)


class PlainSubclass(nn.ReLU):
    """A ReLU subclass that keeps relu's forward: still a ReLU."""


def test_a_relu_subclass_with_its_own_forward_is_measured_through_what_it_calls() -> None:
    """Channel 1's input lies in (0, 1]: ShiftedReLU outputs 0 there on every element, a dead channel that a
    ReLU tested on the module's input (x > 0) would call alive. The F.relu inside is measured on x - 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 10, generator=g) + 2.0
    x[:, 1] = torch.rand(6, 10, generator=g) * 0.9 + 0.05
    report = deadneuron.audit(nn.Sequential(ShiftedReLU()), [x], progress=False, rules=False, channel_axis={"*": 1})
    (site,) = report.sites.values()
    flat = ((x - 1.0) <= 0).double().mean(dim=(0, 2)).numpy()  # the oracle: relu(x - 1)'s flat region
    np.testing.assert_allclose(site.channel_flat, flat, rtol=0, atol=1e-12)
    assert site.dead_channels == (1,) and site.functional
    np.testing.assert_allclose(site.channel_mean, torch.relu(x - 1.0).double().mean(dim=(0, 2)).numpy(), rtol=1e-9)
    plain = deadneuron.audit(nn.Sequential(PlainSubclass()), [x - 1.0], progress=False, rules=False,
                             channel_axis={"*": 1})  # fmt: skip
    (same,) = plain.sites.values()
    assert not same.functional and same.kind == "relu" and same.channel_flat == site.channel_flat


def _spy_relu_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, ...]]]:
    """The one-read relu passes that ran, with the shape of the z they read (``rows``: valid rows in place)."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    along, rows = ChannelStats.update_relu_along, ChannelStats.update_relu_rows

    def spy_along(self: ChannelStats, z: torch.Tensor, *args: object, **kwargs: object) -> bool:
        done = along(self, z, *args, **kwargs)  # type: ignore[arg-type]
        seen.extend([("along", tuple(z.shape))] if done else [])
        return done

    def spy_rows(self: ChannelStats, z3: torch.Tensor, *args: object, **kwargs: object) -> bool:
        done = rows(self, z3, *args, **kwargs)  # type: ignore[arg-type]
        seen.extend([("rows", tuple(z3.shape))] if done else [])
        return done

    monkeypatch.setattr(ChannelStats, "update_relu_along", spy_along)
    monkeypatch.setattr(ChannelStats, "update_relu_rows", spy_rows)
    return seen


def _masked_audit(model_type: Any, act: type[nn.Module], batches: list[dict[str, torch.Tensor]]) -> tuple[Any, Any]:
    """The audit of ``model_type(act)`` (same seed, same weights for every act) under the batches' "mask", and
    the pre-activations the model stored."""
    torch.manual_seed(0)
    model = model_type(act)
    return deadneuron.audit(model, batches, progress=False, rules=False, mask="mask"), model.seen


class Tokens(nn.Module):
    """A ReLU on (N, L, C) tokens (the batch's (N, L) mask fits it) and one on the tokens flattened and
    repeated, (2 * N * L, C) (the mask fits no dim of it); each stores its pre-activation."""

    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        self.lin, self.tok, self.flat = nn.Linear(5, 6), act(), act()
        self.seen: dict[str, list[np.ndarray]] = {"tok": [], "flat": []}

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        self.seen["tok"].append(z.detach().numpy().copy())
        h = self.tok(z)
        y = torch.cat([h, h - 0.5]).reshape(-1, h.shape[-1])
        self.seen["flat"].append(y.detach().numpy().copy())
        return self.flat(y)


@needs_native
@pytest.mark.parametrize("valid", ["all", "padded"])
def test_a_padding_mask_keeps_the_one_read(valid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a padding mask (every token valid, some padded, or one that fits no dim of the site) the exact
    ReLU is still measured from z alone; the figures are numpy's over the stored z (padded tokens left out where
    the mask fits), and the report says the same of the mask as where the output is read (a ReLU
    subclass: measured on its output)."""

    class Subclass(nn.ReLU):
        pass

    read_once = _spy_relu_reads(monkeypatch)
    g = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(3):
        mask = torch.ones(3, 7, dtype=torch.bool)
        if valid == "padded":
            mask[1, 4:] = False
        batches.append({"x": torch.randn(3, 7, 5, generator=g), "mask": mask})
    (fast, seen), (slow, _) = (_masked_audit(Tokens, act, batches) for act in (nn.ReLU, Subclass))
    # every call read z alone: in place where every token is valid, the valid rows in place where some are not
    assert read_once == [("along", (3, 7, 6)) if valid == "all" else ("rows", (21, 6, 1)), ("along", (42, 6))] * 3
    assert [s.masked for s in fast.sites.values()] == [s.masked for s in slow.sites.values()]
    assert fast.meta.get("mask") == slow.meta.get("mask") and fast.warnings == slow.warnings
    keep = np.concatenate([b["mask"].numpy().reshape(-1) for b in batches])
    for name, zs in seen.items():
        site = next(s for key, s in fast.sites.items() if key.endswith(name))
        rows = np.concatenate([t.reshape(-1, 6) for t in zs])
        want = _oracle([rows[keep]] if name == "tok" else [rows], 1)
        assert site.n == int(want["n"]) and site.masked == (name == "tok")
        np.testing.assert_array_equal(np.round(np.array(site.channel_zero) * site.n), want["zero"])
        np.testing.assert_array_equal(np.round(np.array(site.channel_flat) * site.n), want["flat"])
        for key in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(getattr(site, f"channel_{key}"), want[key], rtol=1e-9, atol=1e-12)


class Grid(nn.Module):
    """A conv ReLU on (N, C, H, W) maps under an (N, H, W) valid-cell mask; stores its pre-activation."""

    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(2, 5, 3, padding=1), act()
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        self.seen.append(z.detach().numpy().copy())
        return self.act(z)


@needs_native
def test_a_conv_map_s_valid_cells_are_read_from_z_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grids padded to the batch's size: the ReLU's figures are numpy's over the valid cells of the stored z,
    the padding left out, as where its output is read (a ReLU subclass); z's valid cells gathered, not the
    output's and z's."""

    class Subclass(nn.ReLU):
        pass

    read_once = _spy_relu_reads(monkeypatch)
    g = torch.Generator().manual_seed(9)
    batches = []
    for h in (4, 6, 3):
        mask = torch.zeros(3, 6, 6, dtype=torch.bool)
        mask[0, :h, :h], mask[1, :6, :2], mask[2] = True, True, True
        batches.append({"x": torch.randn(3, 2, 6, 6, generator=g), "mask": mask})
    (fast_report, seen), (slow_report, _) = (_masked_audit(Grid, act, batches) for act in (nn.ReLU, Subclass))
    assert [kind for kind, _ in read_once] == ["along"] * 3
    (fast,), (slow,) = fast_report.sites.values(), slow_report.sites.values()
    assert fast.masked and slow.masked and fast.n == slow.n
    keep = [b["mask"].numpy() for b in batches]
    cells = np.concatenate([np.moveaxis(z, 1, -1)[k] for z, k in zip(seen, keep, strict=True)])
    want = _oracle([cells], 1)
    assert fast.n == int(want["n"])
    for key in ("zero", "flat"):
        np.testing.assert_array_equal(np.round(np.array(getattr(fast, f"channel_{key}")) * fast.n), want[key])
        assert getattr(fast, f"channel_{key}") == getattr(slow, f"channel_{key}")
    for key in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(getattr(fast, f"channel_{key}"), want[key], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(getattr(fast, f"channel_{key}"), getattr(slow, f"channel_{key}"), rtol=1e-9)
