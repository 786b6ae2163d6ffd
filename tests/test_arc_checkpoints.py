"""The committed demo checkpoints (examples/make_checkpoints.sh): safe to load, complete, and what they claim."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from arc_model import data
from arc_model.adapter import ArcSlotAdapter
from arc_model.config import TrainConfig, recipe
from deadneuron.adapters import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
ENCODER_SITES = [f"encoder.bn_layers.{i}>relu" for i in range(4)]
# examples/make_checkpoints.sh: the reference recipe as it is, and without BatchNorm at the high rate
CONFIGS = {
    "slot_attention_healthy.pth": recipe("reference"),
    "slot_attention.pth": recipe("reference").replace(BATCH_NORM=False, LEARNING_RATE=3e-3),
}


def load(name: str) -> dict[str, Any]:
    return torch.load(CHECKPOINTS / name, weights_only=True, map_location="cpu")


def final_encoder_dead(ckpt: dict[str, Any]) -> int:
    entry = ckpt["health_timeline"][-1]
    return sum(entry["sites"][site]["dead"] for site in ENCODER_SITES)


@pytest.mark.parametrize("name", ["slot_attention.pth", "slot_attention_healthy.pth"])
def test_checkpoint_is_complete_and_loads_safely(name: str) -> None:
    assert (CHECKPOINTS / name).stat().st_size < 2_000_000
    ckpt = load(name)
    assert (ckpt["format"], ckpt["version"], ckpt["adapter"]) == (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "arc-slot")
    config = TrainConfig.from_dict(ckpt["config"])
    assert config == CONFIGS[name]
    steps = config.NUM_EPOCHS * data.num_batches(len(data.load_grids("train")), config.BATCH_SIZE)
    assert ckpt["step"] == steps and len(ckpt["history"]) == ckpt["epoch"] == config.NUM_EPOCHS
    # the first entry covers the first step (the initial weights), the last ends at the final step
    assert ckpt["health_timeline"][0]["step"] == 1 and ckpt["health_timeline"][-1]["step"] == steps
    model = ArcSlotAdapter().load(ckpt)
    assert not model.training


def test_the_sick_checkpoint_is_sick_and_the_healthy_one_is_not() -> None:
    sick, healthy = load("slot_attention.pth"), load("slot_attention_healthy.pth")
    assert not TrainConfig.from_dict(sick["config"]).BATCH_NORM
    assert TrainConfig.from_dict(healthy["config"]).BATCH_NORM
    assert final_encoder_dead(sick) > 25  # a tenth of the encoder's 256 channels
    assert final_encoder_dead(healthy) == 0
    final = {name: ckpt["health_timeline"][-1] for name, ckpt in (("sick", sick), ("healthy", healthy))}
    # the healthy one segments and beats the baseline on the probe (tests/test_arc_reference.py recounts it)
    assert final["healthy"]["slots"]["mean_active"] >= 2.0
    assert final["healthy"]["metrics"]["valid_pixel_accuracy"] >= 0.8
    assert final["sick"]["metrics"]["valid_pixel_accuracy"] < final["healthy"]["metrics"]["valid_pixel_accuracy"]
