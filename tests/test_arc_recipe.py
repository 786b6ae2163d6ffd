"""The recipe knobs of the ARC slot model: learning-rate schedule, clipping, slot initialisation, Fourier
positions, decoder norm, per-slot colour and attention masks; the named recipes; determinism with them."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch

from arc_model import data, feed
from arc_model.config import RECIPES, TrainConfig, recipe
from arc_model.model import FOURIER_PERIODS, build_model, fourier_grid
from arc_model.train import learning_rate, main, train, train_step

TINY = TrainConfig(
    CHANNELS=8, SLOT_DIM=8, NUM_SLOTS=3, NUM_GRIDS=12, BATCH_SIZE=4, TIMELINE_GRIDS=4, TIMELINE_EVERY=100,
    LEARNING_RATE=3e-3, NUM_EPOCHS=1000,
)
VARIANTS: dict[str, dict[str, Any]] = {
    "learned-init": {"SLOT_INIT": "learned"},
    "fourier": {"POSITION": "fourier"},
    "decoder-norm": {"DECODER_NORM": True},
    "slot-colour": {"COLOUR_HEAD": "slot"},
    "attention-masks": {"MASKS": "attention"},
    "reference": dict(RECIPES["reference"]),
}


@pytest.fixture
def quick_timeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe-set figures stood in for: these tests are about the training arithmetic, not the timeline."""
    monkeypatch.setattr(feed, "probe_figures", lambda model, batches: {"slots": None, "metrics": {"valid_pixel_accuracy": 0.0}})


@pytest.fixture
def batch() -> data.GridBatch:
    rng = np.random.default_rng(0)
    return data.encode([rng.integers(0, 10, size=(h, w)) for h, w in [(5, 7), (3, 3), (6, 2)]])


def test_warm_up_then_cosine_decay_by_hand() -> None:
    cfg = TrainConfig(LEARNING_RATE=1e-3, WARMUP_STEPS=4, LR_DECAY="cosine")
    rates = [learning_rate(cfg, step, horizon=14) for step in range(15)]
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert rates[4] == pytest.approx(1e-3)  # decay starts after the warm-up
    assert rates[9] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert rates[14] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(rates[4:]))


def test_the_users_recipe_keeps_a_constant_rate() -> None:
    cfg = TrainConfig(LEARNING_RATE=1e-4)
    assert {learning_rate(cfg, step, horizon=10) for step in (0, 5, 10, 500)} == {1e-4}


def test_gradient_clipping_bounds_the_first_adam_step(batch: data.GridBatch) -> None:
    """Adam's first step is lr * g / (|g| + eps): a gradient clipped to norm 1e-12 falls under eps, so the
    weights barely move; unclipped, the largest move is about lr."""
    moves = {}
    for clip in (0.0, 1e-12):
        torch.manual_seed(0)
        model = build_model(TINY)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        train_step(model, optimizer, batch, grad_clip=clip)
        moves[clip] = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before, strict=True))
    assert moves[0.0] == pytest.approx(1e-2, rel=0.05)
    assert moves[1e-12] < 1e-5


def test_fourier_features_against_numpy() -> None:
    grid = fourier_grid(3, 5, torch.device("cpu")).numpy()
    assert grid.shape == (3, 5, 4 * len(FOURIER_PERIODS))
    row, col = 2, 3
    expected = []
    for axis in (row, col):
        for period in FOURIER_PERIODS:
            expected += [np.sin(2 * np.pi * axis / period), np.cos(2 * np.pi * axis / period)]
    assert grid[row, col] == pytest.approx(np.array(expected), abs=1e-6)


@pytest.mark.parametrize("changes", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_variant_gives_distributions(changes: dict[str, Any], batch: data.GridBatch) -> None:
    torch.manual_seed(0)
    model = build_model(TINY.replace(**changes)).eval()
    with torch.no_grad():
        out = model(batch.x)
    assert out.masks.shape == (3, 3, 6, 7)
    assert torch.allclose(out.masks.sum(1), torch.ones(3, 6, 7), atol=1e-5)
    assert torch.allclose(out.logits.exp().sum(1), torch.ones(3, 6, 7), atol=1e-5)


@pytest.mark.parametrize("changes", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_trained_parameter_gets_a_gradient(changes: dict[str, Any], batch: data.GridBatch) -> None:
    torch.manual_seed(0)
    model = build_model(TINY.replace(**changes)).train()
    out = model(batch.x)
    (-out.logits.gather(1, batch.target.clamp(0).unsqueeze(1))[batch.valid.unsqueeze(1)].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_learned_slot_init_has_no_noise(batch: data.GridBatch) -> None:
    model = build_model(TINY.replace(SLOT_INIT="learned", DROPOUT=0.0, BATCH_NORM=False))
    with torch.no_grad():
        trained, evaluated = model.train()(batch.x), model.eval()(batch.x)
    assert torch.equal(trained.slots, evaluated.slots)
    assert not hasattr(model.slot_attention, "slots_mu")


def test_recipes_are_named_overrides_of_the_users_config() -> None:
    assert recipe("user") == TrainConfig()
    ref = recipe("reference")
    assert (ref.MASKS, ref.SLOT_INIT, ref.LR_DECAY, ref.BATCH_NORM, ref.NUM_GRIDS) == ("attention", "shared", "cosine", True, None)
    with pytest.raises(ValueError, match="unknown recipe 'x'; known recipes: user, reference"):
        recipe("x")
    with pytest.raises(ValueError, match="MASKS='alpha' is not one of decoder, attention"):
        TrainConfig(MASKS="alpha")  # type: ignore[arg-type]


def test_command_line_refuses_an_unknown_recipe_or_key_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--recipe", "x", "--out", "unused.pth"], ["--config", "FOO=1", "--out", "unused.pth"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'x'" in err and "unknown config key 'FOO'" in err and "Traceback" not in err


@pytest.mark.usefixtures("quick_timeline")
def test_reference_knobs_train_deterministically_and_resume_exactly() -> None:
    cfg = TINY.replace(**{**RECIPES["reference"], "NUM_GRIDS": 12, "NUM_EPOCHS": 3, "TIMELINE_EVERY": 1,
                          "WARMUP_STEPS": 2})
    whole = train(cfg, progress=False)
    again = train(cfg, progress=False)
    first = train(cfg, max_steps=4, progress=False)
    resumed = train(cfg, init=first, progress=False)
    assert whole["step"] == 9
    for other in (again, resumed):
        for key, value in whole["state_dict"].items():
            assert torch.equal(value, other["state_dict"][key]), key
