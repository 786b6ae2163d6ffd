"""`deadneuron train` through CliRunner: config overrides, atomic writing, --force, --resume, bad keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deadneuron.cli import app

TINY = ["--config", "NUM_GRIDS=16", "--config", "BATCH_SIZE=8", "--config", "CHANNELS=8", "--config", "SLOT_DIM=8",
        "--config", "NUM_SLOTS=3", "--config", "TIMELINE_GRIDS=8", "--threads", "1", "--no-progress"]  # fmt: skip


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run.pth"
    code, err = run("train", *TINY, "--config", "LEARNING_RATE=3e-3", "--config", "ACTIVATION=leaky",
                    "--max-steps", "2", "--out", out)  # fmt: skip
    assert code == 0, err
    assert f"wrote {out}: step 2" in err
    return out


def test_train_writes_a_deadneuron_checkpoint_with_the_overridden_config(trained: Path) -> None:
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["format"] == "deadneuron-checkpoint" and ckpt["adapter"] == "arc-slot"
    assert ckpt["config"]["LEARNING_RATE"] == 3e-3 and ckpt["config"]["ACTIVATION"] == "leaky"
    assert ckpt["step"] == 2


def test_an_existing_out_is_refused_before_training_unless_forced(trained: Path) -> None:
    before = trained.read_bytes()
    code, err = run("train", *TINY, "--max-steps", "1", "--out", trained)
    assert code == 2 and "already exists; pass --force" in err
    assert trained.read_bytes() == before


def test_resume_continues_the_run_and_never_overwrites_its_input(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "more.pth"
    code, err = run("train", "--resume", trained, "--max-steps", "4", "--out", out, "--threads", "1", "--no-progress")
    assert code == 0, err
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["ACTIVATION"] == "leaky"
    code, err = run("train", "--resume", trained, "--out", trained, "--force", "--no-progress")
    assert code == 2 and "never overwritten" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--config", "NOT_A_KEY=1"), "unknown config key"),
        (("--config", "LEARNING_RATE"), "KEY=VALUE"),
        (("--config", "ACTIVATION=tanh"), "ACTIVATION"),
        (("--max-steps", "-1"), "--max-steps"),
        (("--adapter", "nope"), "not installed"),
    ],
    ids=["unknown-key", "no-value", "bad-activation", "negative-steps", "unknown-adapter"],
)
def test_bad_arguments_fail_before_training_with_one_line(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    code, err = run("train", *args, "--out", tmp_path / "x.pth", "--no-progress")
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.pth").exists()
