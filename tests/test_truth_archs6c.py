"""Truth where a model reorders positions before a layer reads them (the oracle is tests/test_truth_archs6.py's):
a bidirectional Mamba whose backward blocks read the sequence flipped (``x.flip(1)``, as Vision Mamba and
Caduceus do), a Swin-style block with a GELU MLP in its rolled frame on grids under a validity mask, and
data reordered in a way no mask can follow. The padding mask is laid out in the batch's order: at such a
site it must be moved as the positions were (the figures equal the oracle's over the moved mask), or, where
that cannot be told, not applied, with a warning naming the site.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_truth_archs import audit, by_module, gen, recorded
from tests.test_truth_archs6 import MambaBlock, _padded, _unwindow, _windows, applied, check, figures, outputs

# --- a bidirectional Mamba: the backward blocks read the sequence flipped ------------------------------


class BiMamba(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.fwd, self.bwd = nn.ModuleList(MambaBlock() for _ in range(2)), nn.ModuleList(MambaBlock() for _ in range(2))
        with torch.no_grad():
            self.bwd[0].conv.bias[2] = self.bwd[1].in_proj.bias[12 + 5] = -50.0  # planted

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        h = self.fwd[0](h) + self.bwd[0](h.flip(1)).flip([1])
        return self.fwd[1](h) + torch.flip(self.bwd[1](torch.flip(h, dims=(1,))), dims=(1,))


def test_bidirectional_mamba_backward_blocks_are_masked_on_the_flipped_positions() -> None:
    torch.manual_seed(0)
    model, g = BiMamba(), gen()
    batches = [_padded(2, 5, left=False, g=g), _padded(3, 7, left=True, g=g), _padded(2, 12, left=False, g=g)]
    valid = [b["attention_mask"].bool().numpy() for b in batches]
    names = [f"{d}.{k}.{layer}" for d in ("fwd", "bwd") for k in (0, 1) for layer in ("conv", "in_proj")]
    kept = outputs(model, batches, names)
    report = audit(model, batches)
    assert len(report.sites) == 8 and report.meta["warnings"] == []
    for direction in ("fwd", "bwd"):
        order = [v if direction == "fwd" else v[:, ::-1] for v in valid]  # where the data's padding is
        for k in (0, 1):
            block = f"{direction}.{k}"
            conv = [z[..., : b["input_ids"].shape[1]] for z, b in zip(kept[f"{block}.conv"], batches, strict=True)]
            gate = [z[..., 12:] for z in kept[f"{block}.in_proj"]]
            sites = sorted(by_module(report, block), key=lambda s: s.name)
            assert all(s.masked for s in sites)
            check(sites[0], figures(applied(F.silu, conv), 1, "silu", order))
            check(sites[1], figures(applied(F.silu, gate), -1, "silu", order))
    assert 2 in sorted(by_module(report, "bwd.0"), key=lambda s: s.name)[0].dead_channels
    assert 5 in sorted(by_module(report, "bwd.1"), key=lambda s: s.name)[1].dead_channels


# --- a Swin-style block with an MLP in its rolled frame, on grids under a validity mask ----------------


class ShiftedBlock(nn.Module):
    """On (B, H, W, C): roll the map, a GELU MLP there, window attention, roll back, a GELU MLP."""

    def __init__(self, c: int = 6, window: int = 3, shift: int = 1) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.fc1, self.act1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)
        self.norm2, self.fc3, self.act2, self.fc4 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s = self.shift
        y = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        y = y + self.fc2(self.act1(self.fc1(self.norm1(y))))
        win = _windows(y, self.window)
        y = _unwindow(self.attn(win, win, win, need_weights=False)[0], self.window, b, h, w)
        x = x + torch.roll(y, shifts=(s, s), dims=(1, 2))
        return x + self.fc4(self.act2(self.fc3(self.norm2(x))))


class GridSwin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.block = ShiftedBlock()

    def forward(self, grid: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.block(self.embed(grid))


def _grids(g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    out = []
    for n, h, w in ((2, 6, 6), (3, 6, 9)):  # (2, 6, 6, 6): H == W == C
        valid = torch.zeros(n, h, w, dtype=torch.bool)
        for i in range(n):
            valid[i, : h - i, : w - 2 * i] = True  # each grid in the top left corner of its canvas
        out.append({"grid": torch.randn(n, h, w, 3, generator=g) * valid[..., None], "valid": valid})
    return out


def test_swin_mlp_in_the_rolled_frame_is_masked_on_the_rolled_grid() -> None:
    torch.manual_seed(0)
    model, batches = GridSwin(), _grids(gen())
    calls = recorded(model, batches, (nn.GELU,)).calls
    report = audit(model, batches, mask="valid")
    valid = [b["valid"].numpy() for b in batches]
    rolled = [np.roll(v, (-1, -1), axis=(1, 2)) for v in valid]
    assert not all((r == v).all() for r, v in zip(rolled, valid, strict=True))
    for name, mask in (("block.act1", rolled), ("block.act2", valid)):
        (site,) = by_module(report, name)
        assert site.masked
        check(site, figures(calls[name], -1, "gelu", mask))
    assert report.meta["warnings"] == []


# --- reordered data no mask can follow -------------------------------------------------------------------


class Misaligned(nn.Module):
    """Sums the sequence with its reversal (never flipped back): each position holds two positions' data."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.a, self.b, self.act = nn.Embedding(50, 6), nn.Linear(6, 8), nn.Linear(6, 8), nn.ReLU()
        self.c, self.act2 = nn.Linear(6, 8), nn.ReLU()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        x = self.emb(input_ids)
        return self.act(self.a(x) + self.b(x.flip(1))), self.act2(self.c(x.flip(-1)))  # the second: channels only


def test_positions_reordered_beyond_what_a_mask_follows_are_named_and_counted_whole() -> None:
    torch.manual_seed(0)
    model, g = Misaligned(), gen()
    batches = [_padded(2, 5, left=False, g=g), _padded(3, 7, left=False, g=g)]
    calls = recorded(model, batches, (nn.ReLU,)).calls
    report = audit(model, batches)
    (mixed,) = by_module(report, "act")
    assert not mixed.masked
    check(mixed, figures(calls["act"], -1, "relu"))  # the padding counted, as the warning says
    (warning,) = [w for w in report.meta["warnings"] if repr(mixed.name) in w]
    assert "reordered" in warning and "2 of its 2 calls" in warning
    (channels,) = by_module(report, "act2")  # a flip of the channel dim moves no position
    assert channels.masked
    check(channels, figures(calls["act2"], -1, "relu", [b["attention_mask"].bool().numpy() for b in batches]))



class FlatTokens(nn.Module):
    """Grid cells flattened into tokens, (N, H*W, C), then the token order reversed: under an (N, H, W) mask
    the reversal runs across rows and columns at once, which the mask's dims cannot follow one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.act = nn.Linear(3, 6), nn.Linear(6, 8), nn.ReLU()

    def forward(self, grid: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(self.embed(grid).flatten(1, 2).flip(1)))


def test_flattened_grid_cells_reordered_are_named_not_masked_on_the_wrong_cells() -> None:
    torch.manual_seed(0)
    model, batches = FlatTokens(), _grids(gen())
    calls = recorded(model, batches, (nn.ReLU,)).calls
    report = audit(model, batches, mask="valid")
    (site,) = by_module(report, "act")
    assert not site.masked
    check(site, figures(calls["act"], -1, "relu"))
    (warning,) = report.meta["warnings"]
    assert repr(site.name) in warning and "reordered" in warning

class BiMambaHead(nn.Module):
    """One bidirectional Mamba layer, then the mean over the valid tokens: padding gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fwd, self.bwd, self.out = nn.Embedding(50, 6), MambaBlock(), MambaBlock(), nn.Linear(6, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        h = self.fwd(x) + self.bwd(x.flip(1)).flip(1)
        keep = attention_mask[..., None].float()
        return self.out((h * keep).sum(1) / keep.sum(1))


def test_monitor_gradient_flow_of_a_flipped_branch_covers_its_valid_positions() -> None:
    """The gate of each block multiplies one position's data: dL/dz is non-zero at exactly the valid positions,
    once the mask is moved with the flip (laid out in the batch's order, it would read padding, where dL/dz is 0)."""
    import deadneuron

    torch.manual_seed(0)
    model, g = BiMambaHead(), gen()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = [_padded(3, 7, left=False, g=g), _padded(2, 6, left=False, g=g)]
    with deadneuron.Monitor(model, every=2, mask="auto") as mon:
        for b in batches:
            F.cross_entropy(model(**b), torch.zeros(b["input_ids"].shape[0], dtype=torch.long)).backward()
            opt.step()
            opt.zero_grad()
            mon.step()
    (snap,) = mon.snapshots
    valid = sum(int(b["attention_mask"].sum()) for b in batches)
    for name in ("fwd.silu#1", "bwd.silu#1"):  # the gates
        site = snap.sites[name]
        assert (site.n, site.grad_elements, site.grad_nonzero) == (valid, valid, 1.0), name
    assert not mon.warnings
