"""The verdict rule and the comparison table (pure: synthetic samples, no training)."""

from __future__ import annotations

import pytest
import torch

import deadneuron
from deadneuron.patch.verify import (
    SITE_METRICS,
    SLOT_METRICS,
    TASK_METRICS,
    Sample,
    Verdict,
    Verification,
    compare,
    sample_from,
    verdict,
)
from deadneuron.render.patch_table import verification_markdown

DEAD, _, SPARSITY, FLAT = SITE_METRICS
ACTIVE, _, ENTROPY = SLOT_METRICS
ACCURACY, _, _, LOSS = TASK_METRICS


@pytest.mark.parametrize(
    ("baseline", "patched", "spec", "expected"),
    [
        ([10], [8], DEAD, Verdict.IMPROVED),  # 1 seed: beyond the 1-channel tolerance
        ([10], [9], DEAD, Verdict.NO_CHANGE),  # 1 seed: within it
        ([10], [12], DEAD, Verdict.WORSE),
        ([0.60], [0.605], ACCURACY, Verdict.NO_CHANGE),  # half a point
        ([0.60], [0.62], ACCURACY, Verdict.IMPROVED),
        ([0.60], [0.58], ACCURACY, Verdict.WORSE),
        ([10, 20, 30], [5, 15, 25], DEAD, Verdict.NO_CHANGE),  # d = 5 < std 10
        ([10, 11, 12], [2, 3, 4], DEAD, Verdict.IMPROVED),  # d = 8 > std 1
        ([2, 3, 4], [2, 30, 4], DEAD, Verdict.NO_CHANGE),  # the larger std (patched) decides
        ([1.0, 1.0], [1.0, 1.0], DEAD, Verdict.NO_CHANGE),
        ([1.30], [1.31], LOSS, Verdict.NO_CHANGE),  # within 2% of the baseline
        ([1.30], [1.20], LOSS, Verdict.IMPROVED),
        ([1.0], [1.2], ACTIVE, Verdict.IMPROVED),
        ([0.9], [0.5], ENTROPY, Verdict.LOWER),  # no better direction
        ([0.5], [0.9], SPARSITY, Verdict.HIGHER),
        ([float("nan")], [1.0], DEAD, Verdict.NOT_AVAILABLE),
    ],
)
def test_verdict_rule(baseline: list[float], patched: list[float], spec: object, expected: Verdict) -> None:
    assert verdict(baseline, patched, spec) is expected  # type: ignore[arg-type]


def sample(dead: float, sparsity: float, flat: float, kind: str, accuracy: float) -> Sample:
    values = {("overall", "dead"): dead, ("overall", "sparsity"): sparsity, ("overall", "flat_fraction"): flat,
              ("enc>relu", "dead"): dead, ("enc>relu", "sparsity"): sparsity, ("enc>relu", "flat_fraction"): flat,
              ("task", "valid_pixel_accuracy"): accuracy, ("task", "baseline_valid_pixel_accuracy"): 0.7}  # fmt: skip
    return Sample(values, {"enc>relu": kind})


def test_leaky_zeros_are_lower_by_definition_and_flat_tells_the_truth() -> None:
    base = [sample(80, 0.6, 0.6, "relu", 0.58), sample(70, 0.62, 0.62, "relu", 0.57), sample(75, 0.61, 0.61, "relu", 0.58)]
    patched = [sample(79, 0.0, 0.6, "leaky_relu", 0.58), sample(72, 0.0, 0.61, "leaky_relu", 0.57),
               sample(74, 0.0, 0.62, "leaky_relu", 0.59)]  # fmt: skip
    v = compare(base, patched, seeds=(0, 1, 2), budget={"steps": 600, "init": "scratch"})
    by = {(r.group, r.spec.key): r for r in v.rows}
    assert by[("enc>relu", "sparsity")].verdict is Verdict.BY_DEFINITION
    assert "no exact zeros" in by[("enc>relu", "sparsity")].note
    assert by[("enc>relu", "flat_fraction")].verdict is Verdict.NO_CHANGE
    assert by[("overall", "dead")].verdict is Verdict.NO_CHANGE
    assert by[("task", "baseline_valid_pixel_accuracy")].verdict is Verdict.REFERENCE
    text = verification_markdown(v)
    assert "| enc>relu | dead channels |" in text
    assert "lower by definition" in text and "75.0 ± 5.0" in text
    assert "Budget: seeds 0, 1, 2; init scratch; steps 600." in text


def test_compare_needs_matching_arms() -> None:
    with pytest.raises(ValueError, match="same number"):
        compare([sample(1, 0, 0, "relu", 0)], [], seeds=(0,), budget={})


class _SharedMlp(torch.nn.Module):
    """One Sequential (Linear, activation, Linear) applied twice: its sites are named after the
    activation's kind (``mlp.0>relu#0``, ``mlp.0>relu#1``), so a swap renames them."""

    def __init__(self, act: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), act, torch.nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.mlp(x))


def test_a_site_renamed_by_a_swap_is_compared_with_itself() -> None:
    torch.manual_seed(0)
    relu, leaky = _SharedMlp(torch.nn.ReLU()), _SharedMlp(torch.nn.LeakyReLU(0.01))
    leaky.load_state_dict(relu.state_dict())
    xs = [torch.randn(8, 4) for _ in range(3)]
    before, after = deadneuron.audit(relu, xs, rules=False), deadneuron.audit(leaky, xs, rules=False)
    assert list(after.sites) == ["mlp.0>leaky_relu#0", "mlp.0>leaky_relu#1"]  # the names did change
    v = compare([sample_from(before)], [sample_from(after)], seeds=(0,), budget={"steps": 0})
    by = {(r.group, r.spec.key): r for r in v.rows}
    assert {r.group for r in v.rows} == {"overall", "mlp.0>relu#0", "mlp.0>relu#1"}
    with torch.no_grad():  # the pre-activations by hand: the first call's input, then the second's
        z0 = [relu.mlp[0](x) for x in xs]
        z1 = [relu.mlp[0](relu.mlp(x)) for x in xs]
    for name, zs in (("mlp.0>relu#0", z0), ("mlp.0>relu#1", z1)):
        flat = (torch.cat(zs) <= 0).double().mean().item()
        row = by[(name, "flat_fraction")]
        assert row.baseline == pytest.approx((flat,), abs=1e-12) and row.patched == pytest.approx((flat,), abs=1e-12)
        assert by[(name, "sparsity")].verdict is Verdict.BY_DEFINITION


def _losses(values: list[float], nonfinite: list[float] | None = None) -> list[Sample]:
    out = []
    for i, loss in enumerate(values):
        v = {("overall", "dead"): 3.0, ("task", "loss"): loss}
        if nonfinite is not None:
            v[("overall", "nonfinite")] = nonfinite[i]
        out.append(Sample(v, {}))
    return out


@pytest.mark.parametrize(
    ("baseline", "patched", "expected"),
    [
        ([1.0, 1.1, 1.2], [float("nan"), float("inf"), 0.5], Verdict.WORSE),  # 2 of 3 patched runs diverged
        ([float("nan"), 1.1, 1.2], [0.9, 1.0, 1.1], Verdict.IMPROVED),  # a diverged baseline run
        ([float("nan"), 1.1], [float("nan"), 1.0], Verdict.NOT_AVAILABLE),  # both arms: nothing to compare
    ],
)
def test_a_diverged_run_is_not_left_out_of_the_verdict(baseline: list[float], patched: list[float],
                                                       expected: Verdict) -> None:  # fmt: skip
    """A run whose final loss is NaN or Inf diverged: the other runs' mean must not speak for its arm (0.5
    alone would read 'improved' for a fix that blew up two runs of three)."""
    v = compare(_losses(baseline), _losses(patched), seeds=tuple(range(len(baseline))), budget={})
    (row,) = [r for r in v.rows if r.spec.key == "loss"]
    assert row.verdict is expected
    assert "non-finite" in row.note


def test_non_finite_activations_get_a_row_where_a_run_had_them() -> None:
    """NaN activations are never flat, so a diverged run shows no dead channel: its non-finite count must
    stand beside that (and say worse), while arms without any get no such row."""
    v = compare(_losses([1.0, 1.0], [0, 0]), _losses([1.0, 1.0], [0, 2048]), seeds=(0, 1), budget={})
    by = {(r.group, r.spec.key): r for r in v.rows}
    assert by[("overall", "nonfinite")].verdict is Verdict.WORSE
    assert by[("overall", "nonfinite")].patched == (0, 2048)
    assert Verification.from_dict(v.to_dict()) == v  # as a patched checkpoint stores it
    quiet = compare(_losses([1.0], [0]), _losses([1.0], [0]), seeds=(0,), budget={})
    assert ("overall", "nonfinite") not in {(r.group, r.spec.key) for r in quiet.rows}


def test_an_audited_run_records_its_non_finite_activations() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    with torch.no_grad():
        model[0].weight[1] = float("nan")
    x = torch.randn(5, 3)
    s = sample_from(deadneuron.audit(model, [x], rules=False))
    site = next(n for n in s.kinds)
    assert s.values[("overall", "nonfinite")] == 5 == s.values[(site, "nonfinite")]  # channel 1 on 5 rows
