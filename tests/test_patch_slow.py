"""The user's fix on the demo checkpoint, end to end, as CI runs it (about a minute on two cores):

    deadneuron patch checkpoints/slot_attention.pth --activation leaky --lr 5e-5 --max-steps 30 --seeds 1 --out OUT
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deadneuron.checkpoint import file_sha256
from deadneuron.cli import app

DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "slot_attention.pth"


@pytest.mark.slow
@pytest.mark.skipif(not DEMO.exists(), reason=f"the demo checkpoint {DEMO.name} has not been built yet")
def test_patch_the_demo_checkpoint_with_the_users_fix(tmp_path: Path) -> None:
    digest = file_sha256(DEMO)
    out = tmp_path / "patched.pth"
    args = ["patch", str(DEMO), "--activation", "leaky", "--lr", "5e-5", "--max-steps", "30", "--seeds", "1",
            "--out", str(out), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "ACTIVATION: relu -> leaky" in result.stderr and "LEARNING_RATE: 3e-3 -> 5e-5" in result.stderr
    assert "baseline vs patched" in result.stdout
    assert file_sha256(DEMO) == digest, "the input checkpoint is never modified"

    saved = torch.load(out, weights_only=True)
    assert saved["config"]["ACTIVATION"] == "leaky" and saved["config"]["LEARNING_RATE"] == 5e-5
    assert saved["step"] == 30 and saved["patch"]["source_sha256"] == digest
    assert {r["verdict"] for r in saved["patch"]["verification"]["rows"]} >= {"lower by definition"}

    audited = CliRunner().invoke(app, ["audit", str(out), "--batches", "2", "--no-rules", "--format", "json"])
    assert audited.exit_code == 0, audited.stderr
    sites = {s["name"]: s for s in json.loads(audited.stdout)["sites"]}
    assert sites["encoder.bn_layers.0>relu"]["kind"] == "leaky_relu"
