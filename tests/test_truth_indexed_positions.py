"""Truth where a model moves positions by a tensor of indices before a layer reads them: ``x[:, perm]``, a gather,
an index_select, ``take_along_dim``, a scatter or ``y[:, perm] = x`` (token shuffling, sorting tokens by a score,
MAE-style restores). The padding mask is laid out in the batch's order; following such a move would mean reading
the indices (a host sync), so the mask is not applied at a site reading the moved data and the report names the
site. Before, the mask was applied as laid out: the figures left out data and counted padding, without a word.

What moves no position keeps the mask exact: basic indexing (slices, ints, Ellipsis), an index along the channel
dim, a bool index (packing valid tokens in their order), a value set through a bool mask (``x[~mask] = 0``), and
whole samples sorted and put back (``pad_packed_sequence``'s own index_select). The oracle is
tests/test_truth_archs6.py's, over the (z, a) the model's own ReLU produced, stored by the test's hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tests.test_truth_archs import audit, by_module, gen, recorded
from tests.test_truth_archs6 import _padded, check, figures

Move = Callable[[torch.Tensor], torch.Tensor]


def _reversed(n: int) -> torch.Tensor:
    return torch.arange(n - 1, -1, -1)


def _shuffled(x: torch.Tensor) -> torch.Tensor:  # a different order per sample, as sorting tokens by a score does
    order = torch.argsort(x[..., 0], dim=1)
    return torch.take_along_dim(x, order[..., None], 1)


def _set(x: torch.Tensor) -> torch.Tensor:
    y = torch.zeros_like(x)
    y[:, _reversed(x.shape[1])] = x
    return y


MOVED: dict[str, Move] = {
    "x[:, perm]": lambda x: x[:, _reversed(x.shape[1])],
    "x[:, list]": lambda x: x[:, list(range(x.shape[1]))[::-1]],
    "x[..., perm, :]": lambda x: x[..., _reversed(x.shape[1]), :],
    "index_select": lambda x: x.index_select(1, _reversed(x.shape[1])),
    "torch.gather": lambda x: torch.gather(x, 1, _reversed(x.shape[1]).view(1, -1, 1).expand_as(x)),
    "take_along_dim": _shuffled,
    "scatter": lambda x: torch.zeros_like(x).scatter(1, _reversed(x.shape[1]).view(1, -1, 1).expand_as(x), x),
    "y[:, perm] = x": _set,
}
KEPT: dict[str, Move] = {
    "x[:, :, 0:C]": lambda x: x[:, :, 0 : x.shape[2]],
    "x[..., :]": lambda x: x[..., :],
    "channels index_select": lambda x: x.index_select(2, _reversed(x.shape[2])),
    "channels x[..., perm]": lambda x: x[..., _reversed(x.shape[2])],
    "value set through a bool mask": lambda x: x.masked_fill(torch.zeros_like(x, dtype=torch.bool), 0) * 1,
}


class Moves(nn.Module):
    """Tokens embedded, moved by ``move``, then Linear + ReLU (the site); a second ReLU on the unmoved tokens."""

    def __init__(self, move: Move) -> None:
        super().__init__()
        self.move = move
        self.emb, self.fc, self.act = nn.Embedding(50, 6), nn.Linear(6, 8), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(6, 8), nn.ReLU()
        with torch.no_grad():
            self.fc.bias[3] = -50.0  # planted: dead wherever it is read

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.emb(input_ids)
        return self.act(self.fc(self.move(x))), self.act2(self.fc2(x))


def _audited(move: Move) -> tuple[Any, list[dict[str, torch.Tensor]], dict[str, Any]]:
    """The report of `Moves` under ``move`` on padded batches, the batches, and the (z, a) its ReLUs produced."""
    torch.manual_seed(0)
    g = gen()
    model, batches = Moves(move).eval(), [_padded(3, 7, left=False, g=g), _padded(2, 9, left=True, g=g)]
    calls = recorded(model, batches, (nn.ReLU,)).calls
    return audit(model, batches), batches, calls


@pytest.mark.parametrize("how", list(MOVED))
def test_positions_moved_by_indices_are_named_and_counted_whole(how: str) -> None:
    report, batches, calls = _audited(MOVED[how])
    (moved,) = by_module(report, "act")
    assert not moved.masked
    check(moved, figures(calls["act"], -1, "relu"))  # every position: the padding counted, as the warning says
    assert 3 in moved.dead_channels
    (warning,) = [w for w in report.meta["warnings"] if repr(moved.name) in w]
    assert "reordered" in warning and "index" in warning and "2 of its 2 calls" in warning
    (kept,) = by_module(report, "act2")  # the unmoved tokens beside it: masked exactly
    assert kept.masked
    check(kept, figures(calls["act2"], -1, "relu", [b["attention_mask"].bool().numpy() for b in batches]))


@pytest.mark.parametrize("how", list(KEPT))
def test_what_moves_no_position_keeps_the_mask_exact(how: str) -> None:
    report, batches, calls = _audited(KEPT[how])
    valid = [b["attention_mask"].bool().numpy() for b in batches]
    for name in ("act", "act2"):
        (site,) = by_module(report, name)
        assert site.masked, name
        check(site, figures(calls[name], -1, "relu", valid))
    assert report.meta["warnings"] == []


class Unpadded(nn.Module):
    """The valid tokens packed by a bool index (in their order), a ReLU on them, then put back in place and
    the padded positions zeroed through the mask (``h[~keep] = 0``): nothing is reordered."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.act, self.fc2, self.act2 = nn.Embedding(50, 6), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.bool()
        h = self.emb(input_ids)
        packed = self.act(self.fc(h[keep]))  # (valid tokens, 8): no mask fits it
        full = torch.zeros(*keep.shape, 8)
        full[keep] = packed
        full[~keep] = 0.0
        return self.act2(self.fc2(full))


def test_bool_indexing_and_values_set_through_a_mask_keep_the_mask_exact() -> None:
    torch.manual_seed(0)
    g = gen()
    model, batches = Unpadded().eval(), [_padded(3, 7, left=False, g=g), _padded(2, 9, left=True, g=g)]
    calls = recorded(model, batches, (nn.ReLU,)).calls
    report = audit(model, batches)
    (site,) = by_module(report, "act2")
    assert site.masked
    check(site, figures(calls["act2"], -1, "relu", [b["attention_mask"].bool().numpy() for b in batches]))
    assert not any("reordered" in w for w in report.meta["warnings"])
