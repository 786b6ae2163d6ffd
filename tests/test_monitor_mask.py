"""deadneuron.Monitor with padding masks: the figures (statistics, gradient flow) cover the valid positions
of each training batch only, against numpy counts over the pre-activations the model stored itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from tests.monitor_models import StashCNN, teacher_batches


def _padded(steps: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Teacher batches whose images keep a top-left rectangle of random size; the rest is zero padding."""
    gen = torch.Generator().manual_seed(4)
    out = []
    for x, y in teacher_batches(steps):
        n, _, h, w = x.shape
        rows, cols = torch.randint(3, h + 1, (n,), generator=gen), torch.randint(3, w + 1, (n,), generator=gen)
        valid = (torch.arange(h)[None, :, None] < rows[:, None, None]) & (torch.arange(w)[None, None, :] < cols[:, None, None])
        out.append((x * valid[:, None], y, valid))
    return out


def test_a_callable_mask_leaves_the_padding_out_of_every_figure() -> None:
    torch.manual_seed(0)
    model = StashCNN()
    model.stash = {}
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    batches = _padded(6)
    with deadneuron.Monitor(model, every=3, optimizer=opt, mask=lambda x: x.abs().sum(1) > 0) as mon:
        for step, (x, y, _) in enumerate(batches):
            model.step = step
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    assert [s.step for s in mon.snapshots] == [3, 6]
    for snap in mon.snapshots:
        window = range(snap.first_step, snap.step)
        z = np.concatenate([np.moveaxis(z, 1, 0)[:, batches[k][2].numpy()] for k, z in model.stash["bn>relu"] if k in window], 1)
        site = snap.sites["bn>relu"]
        assert site.n == site.grad_elements == z.shape[1] == sum(int(batches[k][2].sum()) for k in window)
        assert set(site.dead_channels) == set(np.flatnonzero((z <= 0).all(1)).tolist())
        assert site.sparsity == pytest.approx((z <= 0).mean(), rel=1e-12)
    assert mon.last_health["bn>relu"].masked and not mon.warnings


class Tokens(nn.Module):
    """Embedding -> linear -> GELU on (N, L, C) tokens, pooled over the valid tokens only."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.act, self.out = nn.Embedding(20, 8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask[..., None].float()
        return self.out((self.act(self.fc(self.emb(input_ids))) * keep).sum(1) / keep.sum(1))


@pytest.mark.parametrize("mask", ["auto", "attention_mask", None])
def test_the_attention_mask_of_the_forward_s_keywords(mask: str | None) -> None:
    torch.manual_seed(0)
    model = Tokens()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    lengths = [[5, 2, 7], [3, 7, 1]]
    with deadneuron.Monitor(model, every=2, mask=mask) as mon:
        for batch_lengths in lengths:
            ids = torch.randint(1, 20, (3, 7), generator=gen)
            am = (torch.arange(7)[None] < torch.tensor(batch_lengths)[:, None]).long()
            F.cross_entropy(model(input_ids=ids, attention_mask=am), torch.tensor([0, 1, 0])).backward()
            opt.step()
            opt.zero_grad()
            mon.step()
    (snap,) = mon.snapshots
    site = snap.sites["act"]
    valid, total = sum(map(sum, lengths)), 2 * 3 * 7
    # padded tokens get no gradient (the pooling drops them); a GELU's dL/dz is non-zero on every kept token
    if mask is None:
        assert (site.n, site.grad_elements) == (total, total) and site.grad_nonzero == pytest.approx(valid / total)
    else:
        assert (site.n, site.grad_elements, site.grad_nonzero) == (valid, valid, 1.0)
