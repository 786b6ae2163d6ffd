"""The slot autoencoder: the user's encoder shape, output shapes, masks, padding, the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from arc_model import data
from arc_model.config import TrainConfig
from arc_model.loss import metric_sums, reconstruction_nll, summarize
from arc_model.model import SlotAttention, build_model, count_parameters


@pytest.fixture
def batch() -> data.GridBatch:
    rng = np.random.default_rng(0)
    return data.encode([rng.integers(0, 10, size=(h, w)) for h, w in [(5, 7), (3, 3), (6, 2)]])


def test_the_users_encoder_shape() -> None:
    model = build_model(TrainConfig())
    enc = model.encoder
    assert isinstance(enc.conv_layers, nn.ModuleList) and len(enc.conv_layers) == 4
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in enc.bn_layers)
    assert isinstance(enc.relu, nn.ReLU) and isinstance(enc.dropout, nn.Dropout)
    assert 190_000 < count_parameters(model) < 198_000  # MEASURED.md: about 194k


@pytest.mark.parametrize(
    ("activation", "kind"),
    [("relu", nn.ReLU), ("leaky", nn.LeakyReLU), ("gelu", nn.GELU), ("elu", nn.ELU), ("silu", nn.SiLU),
     ("prelu", nn.PReLU)],
)
def test_activation_and_batch_norm_switches(activation: str, kind: type[nn.Module]) -> None:
    cfg = TrainConfig(ACTIVATION=activation, BATCH_NORM=False)  # type: ignore[arg-type]
    enc = build_model(cfg).encoder
    assert type(enc.relu) is kind
    assert all(isinstance(bn, nn.Identity) for bn in enc.bn_layers)
    if activation == "leaky":
        assert enc.relu.negative_slope == 0.01


def test_output_shapes_and_masks_sum_to_one(batch: data.GridBatch) -> None:
    model = build_model(TrainConfig()).eval()
    out = model(batch.x)
    assert out.logits.shape == (3, 10, 6, 7)
    assert out.masks.shape == (3, 7, 6, 7)
    assert out.slots.shape == (3, 7, 64)
    assert torch.allclose(out.masks.sum(1), torch.ones(3, 6, 7), atol=1e-5)
    assert torch.allclose(out.logits.exp().sum(1), torch.ones(3, 6, 7), atol=1e-5)


def test_eval_mode_is_deterministic_and_independent_of_batch_mates(batch: data.GridBatch) -> None:
    model = build_model(TrainConfig()).eval()
    with torch.no_grad():
        first, again = model(batch.x), model(batch.x)
        alone = model(batch.x[:1])  # the largest grid: same crop
    assert torch.equal(first.logits, again.logits)
    assert torch.allclose(first.masks[:1], alone.masks, atol=1e-5)


def test_padding_cells_do_not_attend() -> None:
    attention = SlotAttention(4, 16, 16).eval()
    inputs = torch.randn(2, 10, 16)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[:, 6:] = False
    changed = inputs.clone()
    changed[:, 6:] = torch.randn(2, 4, 16) * 100
    assert torch.allclose(attention(inputs, valid), attention(changed, valid), atol=1e-6)


def test_loss_ignores_padding(batch: data.GridBatch) -> None:
    model = build_model(TrainConfig()).eval()
    log_probs = model(batch.x).logits.detach()
    base = reconstruction_nll(log_probs, batch.target, batch.valid)
    messy_logits = torch.where(batch.valid.unsqueeze(1), log_probs, torch.full_like(log_probs, float("nan")))
    messy_target = torch.where(batch.valid, batch.target, torch.full_like(batch.target, 7))
    assert torch.equal(reconstruction_nll(messy_logits, messy_target, batch.valid), base)
    assert float(base) > 0


def test_loss_is_the_mean_nll_over_valid_cells() -> None:
    target = torch.tensor([[[3, -1]]])
    valid = target >= 0
    log_probs = torch.full((1, 10, 1, 2), float(np.log(0.1)))
    assert float(reconstruction_nll(log_probs, target, valid)) == pytest.approx(np.log(10))


def test_metric_sums_and_the_most_common_colour_baseline() -> None:
    batch = data.encode([np.array([[1, 1, 2]]), np.array([[4], [4]])])
    perfect = torch.nn.functional.one_hot(batch.target.clamp_min(0), 10).permute(0, 3, 1, 2).float()
    sums = {k: float(v) for k, v in metric_sums(perfect.log(), batch.target, batch.valid).items()}
    assert sums == {"correct_pixels": 5, "valid_pixels": 5, "exact_grids": 2, "grids": 2,
                    "baseline_correct_pixels": 4, "baseline_exact_grids": 1}
    summary = summarize(sums)
    assert summary["valid_pixel_accuracy"] == 1.0
    assert summary["baseline_valid_pixel_accuracy"] == 0.8
    assert summary["baseline_exact_grid_accuracy"] == 0.5
