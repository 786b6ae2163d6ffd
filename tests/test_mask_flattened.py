"""A feed-forward run on the tokens flattened into rows, (N*L, C), as ``reshape(-1, C)`` of a batch-first (N, L, C)
lays them out (Hugging Face's OPT): the batch's (N, L) padding mask is read flattened the same way, and the report
says so. Before, the mask fitted no site there and the padding counted as data. The oracle: numpy over the rows the
test's own hook stored, the valid ones picked by the mask flattened in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron

LENGTHS = ([7, 3, 5], [2, 7, 6])


class FlatFFN(nn.Module):
    def __init__(self, dim: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.emb = nn.Linear(4, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)
        with torch.no_grad():
            self.fc1.bias[2] = -40.0  # dead on data

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        n, length, dim = h.shape
        rows = h.reshape(-1, dim)
        return self.fc2(self.act(self.fc1(rows))).view(n, length, dim)


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for lengths in LENGTHS:
        mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
        x = torch.randn(3, 7, 4, generator=g)
        x[mask == 0] = 30.0  # padding that would make channel 2 fire if it were read
        out.append({"x": x, "attention_mask": mask})
    return out


def test_rows_flattened_batch_first_are_masked_as_the_tokens_they_are() -> None:
    torch.manual_seed(0)
    model, batches = FlatFFN().eval(), _batches()
    with torch.no_grad():
        model.emb.weight.fill_(0.2)
        model.fc1.weight[2].fill_(1.0)
    kept: list[np.ndarray] = []
    hook = model.fc1.register_forward_hook(lambda m, a, o: kept.append(o.detach().double().numpy().copy()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    hook.remove()
    z = np.concatenate([k[b["attention_mask"].numpy().reshape(-1) == 1] for k, b in zip(kept, batches, strict=True)])
    everything = np.concatenate(kept)
    assert not (everything[:, 2] <= 0).all()  # counted with the padding, channel 2 would fire
    report = deadneuron.audit(model, batches, progress=False)
    s = report.sites["act"]
    assert s.masked and s.n == z.shape[0] == sum(map(sum, LENGTHS)) and s.excluded == 42 - z.shape[0]
    assert np.array_equal(np.asarray(s.channel_flat), (z <= 0).mean(0))
    assert list(s.dead_channels) == list(np.flatnonzero((z <= 0).all(0))) and 2 in s.dead_channels
    assert report.meta["mask_dims"]["act"]["how"] == "flattened"
    assert not [w for w in report.meta["warnings"] if "applied at no activation site" in w]


class PerHead(nn.Module):
    """An activation on (N*heads, L, d) where heads == L: rows are not tokens; the mask must not be read there."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 7 * 3)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        h = self.proj(x).view(n, length, 7, 3).transpose(1, 2).reshape(n * 7, length, 3)
        return torch.relu(h)


def test_a_tensor_of_more_dims_is_not_read_as_flattened_rows() -> None:
    report = deadneuron.audit(PerHead().eval(), _batches(), progress=False)
    (s,) = report.sites.values()
    assert not s.masked and s.n == 2 * 21 * 7


def test_a_hugging_face_opt_is_masked() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OPTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, ffn_dim=40, vocab_size=64,
                                 word_embed_proj_dim=32)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.OPTModel(cfg).eval()
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    report = deadneuron.audit(model, [{"input_ids": torch.randint(0, 64, (2, 7)), "attention_mask": mask}], progress=False)
    (s,) = report.sites.values()
    assert s.masked and s.n == 11 and s.excluded == 3


class SortedRows(nn.Module):
    """Rows sorted before the layer (as a dispatch by expert sorts them): no longer in the mask's order."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, 4)
        return torch.relu(self.fc(rows[torch.argsort(rows[:, 0])]))


def test_rows_reordered_by_indices_are_not_masked_and_the_site_is_named() -> None:
    report = deadneuron.audit(SortedRows().eval(), _batches(), progress=False)
    (s,) = report.sites.values()
    assert not s.masked and s.n == 42
    assert [w for w in report.meta["warnings"] if f"site {s.name!r}" in w and "reordered" in w]


class SequenceFirstRows(nn.Module):
    """A sequence-first (L, N, C) flattened into rows: its rows are not in a batch-first mask's order."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x.transpose(0, 1).reshape(-1, 4)))


def test_rows_of_a_sequence_first_tensor_are_not_masked_and_the_site_is_named() -> None:
    report = deadneuron.audit(SequenceFirstRows().eval(), _batches(), progress=False)
    (s,) = report.sites.values()
    assert not s.masked and s.n == 42
    assert [w for w in report.meta["warnings"] if f"site {s.name!r}" in w and "reordered" in w]
