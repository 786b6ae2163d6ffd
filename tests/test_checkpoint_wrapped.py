"""A checkpoint that holds the model's weights under a wrapper's attribute (a Lightning checkpoint of a
LightningModule whose ``self.model`` is the network: keys ``model.net.0.weight``) audited with a factory of
the inner network: exit 5, one line that names the prefix and says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from deadneuron.checkpoint import load_state_dict_strict
from deadneuron.errors import ModelMismatchError

ROOT = Path(__file__).resolve().parent.parent

FACTORIES = '''
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def batches():
    return [torch.randn(2, 3) for _ in range(2)]
'''


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _lightning_like(net: nn.Module, *, extra: bool) -> dict[str, object]:
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    if extra:  # a LightningModule's own parameters beside the network's (a learned loss weight)
        state["loss_weight"] = torch.ones(1)
    return {"state_dict": state, "epoch": 0, "global_step": 6, "pytorch-lightning_version": "2.6.6"}


@pytest.mark.parametrize("extra", [False, True])
def test_the_wrapper_prefix_is_named_with_what_to_do(extra: bool) -> None:
    wrapped = _lightning_like(_net(), extra=extra)["state_dict"]
    assert isinstance(wrapped, dict)
    with pytest.raises(ModelMismatchError) as caught:
        load_state_dict_strict(_net(), wrapped, source="run.ckpt")
    message = str(caught.value)
    assert "under the prefix 'model.'" in message
    assert "torch.save(wrapper.model.state_dict()" in message


def test_no_prefix_is_claimed_for_another_model() -> None:
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    with pytest.raises(ModelMismatchError) as caught:
        load_state_dict_strict(_net(), {f"model.{k}": v for k, v in other.state_dict().items()}, source="x.pth")
    assert "prefix" not in str(caught.value)


def test_the_cli_says_it_in_one_line_with_exit_5(tmp_path: Path) -> None:
    (tmp_path / "factories.py").write_text(textwrap.dedent(FACTORIES))
    torch.save(_lightning_like(_net(), extra=False), tmp_path / "epoch=0-step=6.ckpt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "deadneuron", "audit", "epoch=0-step=6.ckpt", "--model",
                             "factories:build", "--data", "factories:batches"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 5, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "under the prefix 'model.'" in lines[0], result.stderr
    assert result.stdout == ""
