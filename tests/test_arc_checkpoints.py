"""The committed demo checkpoints (examples/make_checkpoints.sh): safe to load, complete, and what they claim."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from arc_model.adapter import ArcSlotAdapter
from arc_model.config import TrainConfig
from deadneuron.adapters import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
ENCODER_SITES = [f"encoder.bn_layers.{i}>relu" for i in range(4)]


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
    assert ckpt["step"] == 602 and len(ckpt["history"]) == ckpt["epoch"] == 86
    assert ckpt["health_timeline"][0]["step"] == 0 and ckpt["health_timeline"][-1]["step"] == 602
    model = ArcSlotAdapter().load(ckpt)
    assert not model.training


def test_the_sick_checkpoint_is_sick_and_the_healthy_one_is_not() -> None:
    sick, healthy = load("slot_attention.pth"), load("slot_attention_healthy.pth")
    assert not TrainConfig.from_dict(sick["config"]).BATCH_NORM
    assert TrainConfig.from_dict(healthy["config"]).BATCH_NORM
    assert final_encoder_dead(sick) > 64
    assert final_encoder_dead(healthy) == 0
    for ckpt in (sick, healthy):  # neither learned to segment in its budget
        assert ckpt["health_timeline"][-1]["slots"]["mean_active"] < 1.0
