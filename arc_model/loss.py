"""Loss and additive task metrics of the ARC slot model, on valid (non-padding) cells only.

About 85% of a 30x30 canvas is padding, so every figure here ignores padding: accuracy over all cells
would be meaningless. The trivial baseline paints each grid its most common colour (about 0.68 of the
held-out cells): a model that does not beat it has learned nothing.
"""

from __future__ import annotations

import torch

from arc_model.data import NUM_COLOURS

METRIC_KEYS: tuple[str, ...] = (
    "correct_pixels",
    "valid_pixels",
    "exact_grids",
    "grids",
    "baseline_correct_pixels",
    "baseline_exact_grids",
)


def reconstruction_nll(log_probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the alpha-mixed colour distribution over valid cells.

    ``log_probs`` (N, 10, H, W) = log sum_k mask_k * softmax(logits_k); padding cells (any value of
    ``log_probs`` or ``target`` there, NaN included) do not change the result.
    """
    picked = log_probs.gather(1, target.clamp(0, NUM_COLOURS - 1).unsqueeze(1)).squeeze(1)
    picked = torch.where(valid, picked, torch.zeros_like(picked))
    return -picked.sum() / valid.sum().clamp_min(1)


def most_common_colour(target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(N,) the most common colour of each grid's valid cells (ties: the lowest colour)."""
    one_hot = torch.nn.functional.one_hot(target.clamp(0, NUM_COLOURS - 1), NUM_COLOURS)
    counts = (one_hot * valid.unsqueeze(-1)).flatten(1, 2).sum(1)
    return counts.argmax(dim=1)


def _grid_counts(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct valid cells, exactly reconstructed grids), both 0-d long tensors."""
    correct = (prediction == target) & valid
    per_grid = correct.flatten(1).sum(1)
    exact = per_grid == valid.flatten(1).sum(1)
    return per_grid.sum(), exact.sum()


def metric_sums(log_probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Additive counts (sum them over batches, then ``summarize``); no host sync."""
    correct, exact = _grid_counts(log_probs.argmax(dim=1), target, valid)
    baseline = most_common_colour(target, valid)[:, None, None].expand_as(target)
    base_correct, base_exact = _grid_counts(baseline, target, valid)
    return {
        "correct_pixels": correct,
        "valid_pixels": valid.sum(),
        "exact_grids": exact,
        "grids": torch.tensor(target.shape[0], device=target.device),
        "baseline_correct_pixels": base_correct,
        "baseline_exact_grids": base_exact,
    }


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Accuracies from summed counts."""
    pixels = max(float(sums["valid_pixels"]), 1.0)
    grids = max(float(sums["grids"]), 1.0)
    return {
        "valid_pixel_accuracy": float(sums["correct_pixels"]) / pixels,
        "exact_grid_accuracy": float(sums["exact_grids"]) / grids,
        "baseline_valid_pixel_accuracy": float(sums["baseline_correct_pixels"]) / pixels,
        "baseline_exact_grid_accuracy": float(sums["baseline_exact_grids"]) / grids,
    }
