"""A padding mask whose positions lie after other dims of a site (a spatial-broadcast decoder's (N, K, H, W, C)
under an (N, H, W) mask: every slot at every cell): the mask is placed on leading dims only, so such a site
counts its padding; the audit names it and the dims that would leave the padding out, and with those dims
stated (or stated by the adapter, as the bundled ARC adapter does for its decoder) the figures equal a
numpy oracle over the valid cells of the tensors the model stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.cli._subject import parse_mask_dims
from deadneuron.probe.placement import folded_positions, repeated_placement
from deadneuron.render.markdown import mask_text


@pytest.mark.parametrize(("shape", "axis", "mask", "want"), [
    ((4, 3, 6, 5, 8), -1, (4, 6, 5), (0, 2, 3)),  # decoder (N, K, H, W, C): K between
    ((4, 2, 7, 8), -1, (4, 7), (0, 2)),  # per head (N, heads, L, D)
    ((4, 8, 3, 6, 5), 1, (4, 6, 5), (0, 3, 4)),  # (N, C, K, H, W)
    ((4, 3, 3, 3, 8), -1, (4, 3, 3), None),  # K == H == W: which dims cannot be told
    ((4, 7, 7, 8), -1, (4, 7), None),  # pairwise (N, L, L, C): the positions twice
    ((4, 6, 5, 8), -1, (4, 6, 5), None),  # leading: a placement of its own, not this one
    ((4, 3, 5, 8), -1, (4, 6), None),  # a pooled length: no dims hold the positions
    ((5, 3, 6, 8), -1, (4, 6), None),  # another batch dim
    ((4, 8), -1, (4,), None),  # a mask with no positions
])
def test_repeated_placement_from_the_shapes(shape: tuple[int, ...], axis: int, mask: tuple[int, ...],
                                            want: tuple[int, ...] | None) -> None:  # fmt: skip
    assert repeated_placement(shape, axis, mask) == want


class SlotDecoder(nn.Module):
    """A conv encoder on (N, 3, H, W) and a spatial-broadcast decoder: K slot vectors broadcast over the grid
    plus a position embedding, through Linear + ReLU per cell ((N, K, H, W, D))."""

    def __init__(self, slots: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.act = nn.ReLU()
        self.slots = nn.Parameter(torch.randn(slots, dim))
        self.dec = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, 4))
        self.stored: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x)).mean((2, 3))  # (N, D)
        height, width = x.shape[2:]
        pos = torch.linspace(-1, 1, height * width).reshape(height, width, 1)
        z = (self.slots[None, :, None, None, :] + h[:, None, None, None, :]) * pos  # (N, K, H, W, D)
        self.stored.append(self.dec[0](z).detach().clone())
        return self.dec(z)


def _batches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    xs, masks = [], []
    for h, w in ((6, 5), (4, 4), (6, 5)):
        x = torch.randn(4, 3, h, w, generator=g)
        valid = torch.zeros(4, h, w, dtype=torch.bool)
        for i in range(4):  # a grid of its own size in the top-left corner, padding around it
            valid[i, : h - i % 2, : w - (i + 1) % 3] = True
        xs.append(x * valid[:, None])
        masks.append(valid)
    return xs, masks


def _audit(model: nn.Module, **kwargs: object) -> deadneuron.Report:
    xs, masks = _batches()
    lookup = {id(x): m for x, m in zip(xs, masks, strict=True)}
    return deadneuron.audit(model, xs, mask=lambda x: lookup[id(x)], progress=False, rules=False, **kwargs)  # type: ignore[arg-type]


def test_the_site_the_mask_repeats_over_is_named_with_its_dims() -> None:
    torch.manual_seed(0)
    model = SlotDecoder().eval()
    report = _audit(model)
    assert report.sites["act"].masked and not report.sites["dec.1"].masked
    (warning,) = [w for w in report.meta["warnings"] if "dec.1" in w]
    assert "padding is counted" in warning and "--mask-dims 'dec.1=0,2,3'" in warning
    assert "mask_dims={'dec.1': (0, 2, 3)}" in warning
    assert parse_mask_dims(["dec.1=0,2,3"]) == {"dec.1": (0, 2, 3)}  # the words run as printed


def test_stated_dims_leave_the_padding_out_at_every_slot() -> None:
    torch.manual_seed(0)
    model = SlotDecoder().eval()
    report = _audit(model, mask_dims={"dec.1": (0, 2, 3)})
    _, masks = _batches()
    site = report.sites["dec.1"]
    assert site.masked and not any("dec.1" in w and "padding is counted" in w for w in report.meta["warnings"])
    # oracle: the pre-activations the model stored, at the valid cells of every slot (the mask repeated over K)
    z = np.concatenate([s.numpy()[m.numpy()[:, None].repeat(s.shape[1], 1)] for s, m in
                        zip(model.stored[-3:], masks, strict=True)])  # fmt: skip
    assert site.n == z.shape[0]
    assert site.excluded == sum(int((~m).sum()) for m in masks) * 3
    np.testing.assert_array_equal(np.rint(np.array(site.channel_flat) * site.n), (z <= 0).sum(0))
    np.testing.assert_allclose(site.channel_mean, np.maximum(z, 0).astype(np.float64).mean(0), rtol=1e-9, atol=1e-12)
    assert list(site.dead_channels) == np.flatnonzero((z <= 0).all(0)).tolist()


def test_a_pooled_sequence_is_not_named() -> None:
    """Only the shapes where the mask's positions lie intact after other dims are named: a site whose
    positions were pooled has no dims to suggest."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc1(x))  # (N, L, 6)
            return torch.relu(self.fc2(h[:, ::2]))  # (N, L/2, 6)

    x = torch.randn(3, 8, 4)
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[1, 5:] = False
    report = deadneuron.audit(Pooled(), [x], mask=lambda _: valid, progress=False)
    assert not any("padding is counted" in w for w in report.meta["warnings"])


@pytest.mark.parametrize(("shape", "axis", "mask", "want"), [
    ((12, 8, 6, 5), 1, (4, 6, 5), (2, 3)),  # (N*K, C, H, W): K = 3 slots folded into the batch
    ((12, 6, 5, 8), -1, (4, 6, 5), (1, 2)),  # channels last
    ((4, 8, 6, 5), 1, (4, 6, 5), None),  # N itself: a placement of its own
    ((10, 8, 6, 5), 1, (4, 6, 5), None),  # not a multiple of N
    ((12, 8, 5, 6), 1, (4, 6, 5), None),  # other positions
])
def test_folded_positions_from_the_shapes(shape: tuple[int, ...], axis: int, mask: tuple[int, ...],
                                          want: tuple[int, ...] | None) -> None:  # fmt: skip
    assert folded_positions(shape, axis, mask) == want


class Folded(nn.Module):
    """A decoder run on (N*K, C, H, W), as many Slot Attention decoders run every slot: K = 3 rows per sample,
    sample n's at rows 3n, 3n+1, 3n+2 (a reshape of (N, K, ...))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.dec = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.stored: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # (N, 8, H, W): masked
        slots = h.mean((2, 3))[:, None].expand(-1, 3, -1).reshape(-1, 8) * torch.tensor([1.0, -1.0, 0.5]).repeat(
            x.shape[0])[:, None]  # (N*3, 8), the slots of a sample unalike  # fmt: skip
        grid = torch.linspace(-1, 1, x.shape[2] * x.shape[3]).reshape(x.shape[2:])
        z = self.dec(slots[:, :, None, None] * grid)  # (N*3, 8, H, W)
        self.stored.append(z.detach().clone())
        return torch.relu(z)


def test_slots_folded_into_the_batch_are_named_as_counting_padding() -> None:
    """No placement of the (N, H, W) mask is right there without knowing the order of the rows: the audit says
    the padding is counted, and how to state the order."""
    report = _audit(Folded().eval())
    assert report.sites["conv>relu"].masked and not report.sites["dec>relu"].masked
    (warning,) = [w for w in report.meta["warnings"] if "dec>relu" in w]
    assert "padding is counted at 'dec>relu' (input (12, 8, 6, 5))" in warning
    assert "3 rows per sample (12 for the mask's 4" in warning and "--mask-dims 'dec>relu=0,2,3'" in warning


def test_stated_dims_on_folded_rows_repeat_the_mask_per_sample() -> None:
    torch.manual_seed(0)
    model = Folded().eval()
    report = _audit(model, mask_dims={"dec>relu": (0, 2, 3)})
    _, masks = _batches()
    site = report.sites["dec>relu"]
    assert site.masked and not [w for w in report.meta["warnings"] if "dec>relu" in w]
    assert report.meta["mask_dims"]["dec>relu"] == {"dims": [0, 2, 3], "how": "stated", "options": [], "fold": 3}
    assert "dec>relu on dims (0, 2, 3), 3 rows per sample (as set)" in (mask_text(report) or "")
    # oracle: each sample's mask at each of its 3 rows (numpy repeat), boolean indexing of the stored maps
    z = np.concatenate([np.moveaxis(s.numpy(), 1, -1)[np.repeat(m.numpy(), 3, axis=0)] for s, m in
                        zip(model.stored[-3:], masks, strict=True)])  # fmt: skip
    assert site.n == z.shape[0] == 3 * sum(int(m.sum()) for m in masks)
    assert site.excluded == 3 * sum(int((~m).sum()) for m in masks)
    np.testing.assert_array_equal(np.rint(np.array(site.channel_flat) * site.n), (z <= 0).sum(0))
    np.testing.assert_allclose(site.channel_mean, np.maximum(z, 0).astype(np.float64).mean(0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("shape", "dims"), [
    ((4, 3, 6, 5, 8), (0, 2, 3)),  # decoder (N, K, H, W, C)
    ((6, 4, 8), (1, 0)),  # sequence first (L, N, C)
    ((4, 2, 7, 3, 8), (0, 2)),  # two dims the mask does not cover, one on each side
])
def test_valid_rows_are_named_in_place_where_the_mask_does_not_lead(shape: tuple[int, ...], dims: tuple[int, ...]) -> None:
    """`spread_rows` reads the valid rows in place (no copy of the tensor): each channel holds exactly its
    values at the valid positions, the mask repeated over the dims it does not cover (numpy oracle)."""
    from deadneuron.probe.masks import BatchMask, masked_rows
    from deadneuron.probe.placement import stated_placement

    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g)
    mask_shape = tuple(shape[d] for d in dims)
    mask = torch.rand(mask_shape, generator=g) < 0.6
    place = stated_placement(dims, shape, -1, mask_shape)
    assert place is not None and not place.leading
    found = masked_rows(x, -1, BatchMask.of(mask), place)
    assert found is not None
    rows, index, excluded = found
    assert rows.data_ptr() == x.data_ptr()  # a view: nothing copied
    got = rows[index].reshape(-1, shape[-1]).numpy()
    # oracle: the mask broadcast over the other dims (moved to the mask's dims), numpy boolean indexing
    full = np.moveaxis(np.broadcast_to(mask.numpy().reshape(mask_shape + (1,) * (len(shape) - 1 - len(dims))),
                                       tuple(shape[d] for d in dims) + tuple(s for d, s in enumerate(shape[:-1]) if d not in dims)),
                       range(len(dims)), dims)  # fmt: skip
    want = x.numpy()[full]
    assert got.shape == want.shape and excluded == int((~full).sum())
    for c in range(shape[-1]):
        np.testing.assert_array_equal(np.sort(got[:, c]), np.sort(want[:, c]))
