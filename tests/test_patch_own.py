"""A/B verification on a model of the user's own (`deadneuron patch --train`, `verify_own`): both arms
trained by the user's function on the same seeds and budget, audited, scored, compared and stored.

The model (tests/own_cnn.py) has 4 of 8 conv channels planted dead (bias -0.5 where pre-activations have a
std of about 0.06). The oracle is the trained models themselves: their conv pre-activations recomputed
with plain torch on the audit batches, a channel dead where it is <= 0 on every element.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deadneuron.checkpoint import file_sha256
from deadneuron.cli import app
from deadneuron.errors import UsageError
from deadneuron.patch import load_patched, plan_from_flags, verify_own

OWN = Path(__file__).resolve().parent / "own_cnn.py"
STEPS = "30"


def own_module() -> Any:
    spec = importlib.util.spec_from_file_location("own_cnn_for_tests", OWN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OWN_CNN = own_module()


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def dead_by_torch(model: nn.Module) -> list[int]:
    """Channels of the conv layer whose pre-activation is <= 0 on every element of the audit batches."""
    model.eval()
    with torch.no_grad():
        z = torch.cat([model[0](x).transpose(0, 1).flatten(1) for x in OWN_CNN.batches()], dim=1)
    return [c for c in range(z.shape[0]) if bool((z[c] <= 0).all())]


@pytest.fixture(scope="module")
def own_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("own") / "own.pth"
    torch.manual_seed(0)
    torch.save(OWN_CNN.build().state_dict(), path)
    return path


def own(ckpt: Path, *extra: object) -> list[object]:
    return ["patch", ckpt, "--model", f"{OWN}:build", "--data", f"{OWN}:batches", "--train", f"{OWN}:train", *extra]


def rows(saved: dict[str, Any], group: str, metric: str) -> dict[str, Any]:
    return next(r for r in saved["verification"]["rows"] if r["group"] == group and r["metric"] == metric)


def test_the_planted_channels_are_dead_before_training(own_ckpt: Path) -> None:
    model = OWN_CNN.build()
    model.load_state_dict(torch.load(own_ckpt, weights_only=True))
    assert dead_by_torch(model) == list(OWN_CNN.DEAD)


def test_leaky_relu_verified_on_the_users_model_two_seeds(own_ckpt: Path, tmp_path: Path) -> None:
    digest = file_sha256(own_ckpt)
    out, md = tmp_path / "patched.pth", tmp_path / "table.md"
    code, stdout, stderr = run(*own(own_ckpt, "--activation", "leaky", "--seeds", 2, "--max-steps", STEPS,
                                    "--metric", f"{OWN}:eval_loss", "--out", out, "--markdown", md))  # fmt: skip
    assert code == 0, stderr
    assert "runs: 2 arms x 2 seed(s) = 4 runs of 30 steps each" in stderr
    assert "[4/4] training the patched model, seed 1" in stderr
    assert "estimate: about" in stderr and "run 1 of 4 took" in stderr
    assert "baseline vs patched" in stdout and "improved" in stdout
    assert file_sha256(own_ckpt) == digest
    saved = torch.load(out, weights_only=True)
    dead = rows(saved, "overall", "dead")
    assert len(dead["baseline"]) == len(dead["patched"]) == 2, "--seeds 2: two runs per arm"
    assert saved["verification"]["seeds"] == [0, 1] and saved["budget"]["steps"] == 30
    assert dead["verdict"] == "improved" and dead["reference"] == len(OWN_CNN.DEAD)
    # The stored figures against the oracle: the kept model (patched, seed 0) recomputed with torch.
    model = load_patched(out, OWN_CNN.build)
    assert isinstance(model[1], nn.LeakyReLU)
    assert dead["patched"][0] == len(dead_by_torch(model)) == 0
    assert dead["baseline"] == [4.0, 4.0], "behind a ReLU the planted channels get no gradient"
    metric = rows(saved, "metric", "eval_loss")
    assert metric["direction"] == "lower" and metric["verdict"] == "improved"
    with torch.no_grad():
        assert metric["patched"][0] == pytest.approx(OWN_CNN.eval_loss(model.eval()), rel=1e-5)
    assert "| --metric | eval_loss |" in md.read_text()


def test_python_api_same_path_with_checkpoint_init_and_reinit(own_ckpt: Path) -> None:
    start = OWN_CNN.build()
    start.load_state_dict(torch.load(own_ckpt, weights_only=True))
    before = {k: v.clone() for k, v in start.state_dict().items()}
    plan = plan_from_flags(reinit_dead=True)
    result = verify_own(OWN_CNN.build, OWN_CNN.batches(), OWN_CNN.train, plan, seeds=[3, 4], steps=20,
                        init="checkpoint", start=start)  # fmt: skip
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in before.items()), "start is never modified"
    assert [(r.arm, r.seed) for r in result.runs] == [("baseline", 3), ("patched", 3), ("baseline", 4), ("patched", 4)]
    by_run = {(r.arm, r.seed): len(dead_by_torch(r.model)) for r in result.runs}
    dead = next(r for r in result.verification.rows if r.group == "overall" and r.spec.key == "dead")
    assert dead.baseline == (by_run[("baseline", 3)], by_run[("baseline", 4)]) == (4, 4)
    assert dead.patched == (by_run[("patched", 3)], by_run[("patched", 4)])
    assert max(dead.patched) < 4 and dead.verdict.value == "improved"
    assert result.verification.budget["init"] == "checkpoint"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--activation", "leaky", "--seeds", "2"), "--train needs a budget: pass --max-steps"),
        (("--reinit-dead", "--max-steps", "5"), "add --init checkpoint"),
        (("--activation", "relu", "--max-steps", "5"), "the plan changes nothing in this model"),
        (("--lr", "1e-3", "--max-steps", "5"), "takes no lr= keyword"),
        (("--activation", "leaky", "--max-steps", "5", "--no-verify"), "--no-verify is for the bundled model"),
    ],
    ids=["no-budget", "reinit-from-scratch", "no-op-plan", "lr-without-lr-keyword", "no-verify"],
)
def test_refused_before_training_with_one_line(own_ckpt: Path, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    code, _, stderr = run(*own(own_ckpt, *args, "--out", tmp_path / "x.pth"))
    assert code == 2, stderr
    assert message in stderr and "Traceback" not in stderr
    assert "training the" not in stderr and not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--seeds", "2"), "--seeds set(s) how the model is retrained"),
        (("--max-steps", "5"), "--max-steps set(s) how the model is retrained"),
        (("--init", "checkpoint"), "--init set(s) how the model is retrained"),
        (("--metric", f"{OWN}:eval_loss"), "--metric scores retrained models: add --train"),
    ],
    ids=["seeds", "max-steps", "init", "metric"],
)
def test_training_flags_without_train_are_refused_not_ignored(own_ckpt: Path, args: tuple[str, ...], message: str) -> None:
    code, _, stderr = run("patch", own_ckpt, "--model", f"{OWN}:build", "--data", f"{OWN}:batches",
                          "--activation", "leaky", "--dry-run", *args)  # fmt: skip
    assert code == 2 and message in stderr


def test_a_train_function_that_raises_is_one_line(own_ckpt: Path, tmp_path: Path) -> None:
    helper = tmp_path / "bad_train.py"
    helper.write_text("def train(model, steps, seed):\n    raise RuntimeError('out of data')\n")
    code, _, stderr = run("patch", own_ckpt, "--model", f"{OWN}:build", "--data", f"{OWN}:batches", "--train",
                          f"{helper}:train", "--activation", "leaky", "--max-steps", "3", "--out", tmp_path / "x.pth")  # fmt: skip
    assert code == 6 and "raised RuntimeError: out of data" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "x.pth").exists()


def test_verify_own_refuses_a_plan_that_changes_nothing() -> None:
    with pytest.raises(UsageError, match="changes nothing"):
        verify_own(OWN_CNN.build, OWN_CNN.batches(), OWN_CNN.train, plan_from_flags(activation="relu"), steps=2)


def test_both_arms_get_the_same_budget_and_seeds_and_a_learning_rate_change_reaches_the_patched_arm() -> None:
    calls: list[tuple[str, int, int, float]] = []

    def train(model: nn.Module, steps: int, seed: int, lr: float = 0.05) -> None:
        calls.append((type(model[1]).__name__, steps, seed, lr))
        OWN_CNN.train(model, steps, seed)

    plan = plan_from_flags(activation="leaky", lr_scale=0.5)
    result = verify_own(OWN_CNN.build, OWN_CNN.batches(), train, plan, seeds=2, steps=3)
    assert calls == [("ReLU", 3, 0, 0.05), ("LeakyReLU", 3, 0, 0.025), ("ReLU", 3, 1, 0.05), ("LeakyReLU", 3, 1, 0.025)]
    assert result.verification.seeds == (0, 1) and result.verification.budget["steps"] == 3
