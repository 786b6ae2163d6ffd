"""Mask dims a user sets for a site that do not fit its input: that site's padding is counted. Where other
sites took the mask, nothing said so (the report's mask line read "as set"); now a warning names the site."""

from __future__ import annotations

import torch
from torch import nn

import deadneuron


class TwoSites(nn.Module):
    """Token embeddings through two Linear+ReLU blocks, batch first: (N, L, C) at both ReLUs (`enc.1`, `dec.1`)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.enc = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.dec = nn.Sequential(nn.Linear(16, 16), nn.ReLU())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.dec(self.enc(self.emb(input_ids)))


def test_dims_that_fit_no_batch_are_named_and_the_other_site_is_masked() -> None:
    torch.manual_seed(0)
    model = TwoSites().eval()
    ids = torch.randint(0, 50, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[:, 7:] = 0
    report = deadneuron.audit(model, [{"input_ids": ids, "attention_mask": mask}], progress=False, rules=False,
                              mask_dims={"dec.*": (1, 0)})  # fmt: skip  (dec's input is (N, L, C): (0, 1) fits)
    enc, dec = report.sites["enc.1"], report.sites["dec.1"]
    assert enc.n == int(mask.sum()) and dec.n == ids.numel()  # enc masked; dec's padding counted
    warned = [w for w in report.meta["warnings"] if "'dec.1'" in w]
    assert warned and "(1, 0)" in warned[0] and "padding is counted" in warned[0]
    assert not any("'enc.1'" in w for w in report.meta["warnings"])
