"""`deadneuron patch` through CliRunner: generic models (surgery, written with the plan) and a tiny
adapter checkpoint (config changed, both arms retrained and compared); writing rules and exit codes."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from deadneuron.checkpoint import file_sha256
from deadneuron.cli import app
from deadneuron.patch import load_patched

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "small_cnn.py"
# A small ARC model and budget: a run takes a second or two.
TINY = {"NUM_GRIDS": 32, "BATCH_SIZE": 8, "CHANNELS": 16, "SLOT_DIM": 16, "NUM_SLOTS": 4, "TIMELINE_GRIDS": 16,
        "TIMELINE_EVERY": 100, "LEARNING_RATE": 1e-3}  # fmt: skip
TINY_RUN = ("--max-steps", "3", "--audit-grids", "16", "--threads", "1", "--no-progress")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def example_module() -> Any:
    spec = importlib.util.spec_from_file_location("small_cnn_for_patch_cli", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("generic") / "small.pth"
    example_module().make(path)
    return path


@pytest.fixture(scope="module")
def tiny_arc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deadneuron.adapters import get_adapter
    from deadneuron.checkpoint import atomic_save

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("arc") / "tiny.pth"
    atomic_save(get_adapter("arc-slot").train(TINY, max_steps=3), path)
    return path


def generic(ckpt: Path, *extra: str) -> list[str]:
    return ["patch", str(ckpt), "--model", f"{EXAMPLE}:build", "--data", f"{EXAMPLE}:batches", *extra]


def test_generic_patch_writes_state_and_plan_and_never_touches_the_input(small_ckpt: Path, tmp_path: Path) -> None:
    digest = file_sha256(small_ckpt)
    out = tmp_path / "p.pth"
    code, stdout, stderr = run(*generic(small_ckpt, "--activation", "leaky", "--reinit-dead", "--out", str(out)))
    assert code == 0, stderr
    assert "5: relu -> leaky_relu(negative_slope=0.01)" in stderr
    assert "fresh incoming weights for channels 3, 7 of 5" in stderr
    assert "lower by definition" in stdout and "improved" in stdout
    assert file_sha256(small_ckpt) == digest
    saved = torch.load(out, weights_only=True)
    assert saved["format"] == "deadneuron-patched-state" and saved["source_sha256"] == digest
    model = load_patched(out, example_module().build)
    assert isinstance(model[5], torch.nn.LeakyReLU) and float(model[4].bias.detach()[3]) == 0.0


def test_default_out_is_beside_the_input_and_is_refused_without_force(small_ckpt: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(small_ckpt.read_bytes())
    assert run(*generic(ckpt, "--activation", "gelu"))[0] == 0
    target = tmp_path / "model_patched.pth"
    assert target.exists()
    before = target.read_bytes()
    code, _, stderr = run(*generic(ckpt, "--activation", "elu"))
    assert code == 2 and "already exists; pass --force" in stderr
    assert target.read_bytes() == before
    assert run(*generic(ckpt, "--activation", "elu", "--force"))[0] == 0
    code, _, stderr = run(*generic(ckpt, "--activation", "elu", "--out", str(ckpt), "--force"))
    assert code == 2 and "never overwritten" in stderr


def test_dry_run_prints_the_plan_and_writes_nothing(small_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "never.pth"
    code, _, stderr = run(*generic(small_ckpt, "--activation", "silu", "--dry-run", "--out", str(out)))
    assert code == 0, stderr
    assert "swap activation -> silu at every relu site" in stderr and "dry run" in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "nothing to patch"),
        (("--activation", "tanh"), "not one of"),
        (("--lr", "1e-3", "--lr-scale", "0.5"), "either --lr or --lr-scale"),
        (("--activation", "leaky", "--seeds", "0"), "--seeds must be at least 1"),
        (("--activation", "leaky", "--init", "warm"), "--init takes scratch or checkpoint"),
    ],
    ids=["no-flags", "bad-activation", "lr-twice", "zero-seeds", "bad-init"],
)
def test_usage_errors_exit_2_with_one_line(small_ckpt: Path, args: tuple[str, ...], message: str) -> None:
    code, _, stderr = run(*generic(small_ckpt, *args))
    assert code == 2 and message in stderr and "Traceback" not in stderr


def test_a_state_dict_without_model_is_told_to_pass_one(small_ckpt: Path) -> None:
    code, _, stderr = run("patch", str(small_ckpt), "--activation", "leaky", "--dry-run")
    assert code == 2 and "--model MODULE:FACTORY" in stderr


def test_adapter_checkpoint_is_retrained_both_arms_compared_and_written(tiny_arc: Path, tmp_path: Path) -> None:
    digest = file_sha256(tiny_arc)
    out, md = tmp_path / "patched.pth", tmp_path / "table.md"
    code, stdout, stderr = run("patch", tiny_arc, "--activation", "leaky", "--lr", "5e-4", "--seeds", "2",
                               "--out", out, "--markdown", md, *TINY_RUN)  # fmt: skip
    assert code == 0, stderr
    assert "ACTIVATION: relu -> leaky" in stderr and "LEARNING_RATE: 1e-3 -> 5e-4" in stderr
    assert "model: encoder.relu: relu -> leaky_relu(negative_slope=0.01)" in stderr
    assert "[4/4] training the patched config, seed 1" in stderr
    assert "baseline vs patched" in stdout and "verdict" in stdout
    assert file_sha256(tiny_arc) == digest
    saved: Mapping[str, Any] = torch.load(out, weights_only=True)
    assert saved["config"]["ACTIVATION"] == "leaky" and saved["config"]["LEARNING_RATE"] == 5e-4
    assert saved["step"] == 3 and saved["patch"]["source_sha256"] == digest
    rows = saved["patch"]["verification"]["rows"]
    dead = next(r for r in rows if r["group"] == "overall" and r["metric"] == "dead")
    assert len(dead["baseline"]) == len(dead["patched"]) == 2
    assert dead["reference"] == dead["baseline"][0], "seed 0 of the baseline arm reproduces the input run"
    assert "| all sites | dead channels |" in md.read_text()


def test_adapter_fine_tune_with_reinit_continues_from_the_checkpoint(tiny_arc: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft.pth"
    code, _, stderr = run("patch", tiny_arc, "--reinit-dead", "--lr-scale", "0.5", "--init", "checkpoint",
                          "--no-verify", "--out", out, *TINY_RUN)  # fmt: skip
    assert code == 0, stderr
    saved = torch.load(out, weights_only=True)
    assert saved["step"] == 6, "3 more steps on top of the checkpoint's 3"
    assert saved["config"]["LEARNING_RATE"] == 5e-4
    assert saved["patch"]["verification"] is None


def test_adapter_dry_run_and_a_no_op_plan(tiny_arc: Path, tmp_path: Path) -> None:
    code, _, stderr = run("patch", tiny_arc, "--activation", "gelu", "--epochs", "10", "--dry-run",
                          "--out", tmp_path / "x.pth", *TINY_RUN)  # fmt: skip
    assert code == 0, stderr
    assert "NUM_EPOCHS: 100000 -> 10" in stderr and "2 arms x 1 seed(s) = 2 runs of 3 steps each" in stderr
    assert not (tmp_path / "x.pth").exists()
    code, _, stderr = run("patch", tiny_arc, "--activation", "relu", "--dry-run", *TINY_RUN)
    assert code == 2 and "changes nothing" in stderr
