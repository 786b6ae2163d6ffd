"""The commands and assertions a user meets with a model of their own: gate shares written as "5%",
site globs given as one string, `deadneuron patch --train` with a train function that returns nothing, a
dict or a tensor, or raises on the second seed, and the one-line errors of wrong paths.

Oracles: the planted dead channels of the models (known by construction) and the values the user's
train function itself returned, recorded by the test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from torch import nn

from deadneuron.cli import app
from deadneuron.errors import UsageError
from deadneuron.gate import GateLimits
from deadneuron.patch import plan_from_flags, verify_own
from deadneuron.testing import assert_healthy, assert_sparsity_below
from tests import test_patch_own
from tests.test_patch_own import OWN, OWN_CNN, run

TESTS = Path(__file__).resolve().parent
own_ckpt = test_patch_own.own_ckpt  # the fixture: the own CNN's state dict, saved once per module
SMALL_CNN = TESTS.parent / "examples" / "small_cnn.py"  # 2 of 16 channels dead at its second ReLU: 12.5%


def one_line(stderr: str, *says: str, after_progress: bool = False) -> None:
    """The error is one line (the last of stderr, after the progress lines of a run that had begun)."""
    lines = stderr.splitlines()
    assert "Traceback" not in stderr and (after_progress or len(lines) == 1), stderr
    assert lines[-1].startswith("deadneuron: error: "), stderr
    for text in says:
        assert text in lines[-1], stderr


class Planted(nn.Module):
    """Linear 4 -> 8 with channel 5 dead (zero weights, bias -1), ReLU ``act``: 1 of 8 channels, 12.5%."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.fc.weight[5] = 0.0
            self.fc.bias[5] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


def planted_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(16, 4, generator=gen) for _ in range(2)]


# -- gates: a share as "5%" or 0.05, globs ---------------------------------------------------------------
@pytest.mark.parametrize(("limit", "passes"), [("10%", False), (0.10, False), ("15%", True), (0.15, True), ("0.15", True)])
def test_a_dead_share_limit_reads_the_same_as_a_percentage_or_a_fraction(limit: float | str, passes: bool) -> None:
    torch.manual_seed(0)
    model = Planted()
    if passes:
        assert_healthy(model, planted_batches(), max_dead_fraction=limit)
    else:
        with pytest.raises(AssertionError, match=r"1 of 8 channels dead \(12.5%: 5\) > max_dead_fraction 10.0%"):
            assert_healthy(model, planted_batches(), max_dead_fraction=limit)


def test_a_sparsity_limit_as_a_percentage() -> None:
    torch.manual_seed(0)
    model = Planted()
    with torch.no_grad():
        zeros = float(torch.cat([(model(x) == 0).flatten() for x in planted_batches()]).double().mean())
    assert_sparsity_below(model, f"{100 * zeros + 1:.1f}%", data=planted_batches())
    with pytest.raises(AssertionError, match="max_sparsity"):
        assert_sparsity_below(model, f"{100 * zeros - 1:.1f}%", data=planted_batches())


@pytest.mark.parametrize(("limit", "says"), [(5, "got 5.0 (5% is 0.05 or '5%')"), ("five", "got 'five'"),
                                             ("500%", "got 5.0"), (True, "got True")])  # fmt: skip
def test_a_share_that_is_no_fraction_is_refused_saying_how_to_write_it(limit: object, says: str) -> None:
    with pytest.raises(UsageError, match="max_dead_fraction must be a fraction in") as caught:
        GateLimits(max_dead_fraction=limit)  # type: ignore[arg-type]
    assert says in str(caught.value)


def test_one_site_glob_given_as_a_string_is_one_glob() -> None:
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match=r"act: 1 of 8 channels dead") as caught:
        assert_healthy(Planted(), planted_batches(), sites="act")
    assert "no site matches" not in str(caught.value)  # not the globs 'a', 'c', 't'
    assert GateLimits(max_dead=0, sites="encoder.*").sites == ("encoder.*",)  # type: ignore[arg-type]


def test_a_model_without_activations_never_passes_a_gate() -> None:
    with pytest.raises(UsageError, match="no activation site was measured"):
        assert_healthy(nn.Sequential(nn.Linear(4, 2)), planted_batches())


@pytest.mark.parametrize(("limit", "code"), [("10%", 1), ("0.10", 1), ("15%", 0), ("12", 2)])
def test_the_cli_gate_takes_a_percentage(limit: str, code: int) -> None:
    got, _, stderr = run("audit", SMALL_CNN.with_suffix(".pth"), "--model", f"{SMALL_CNN}:build", "--data",
                         f"{SMALL_CNN}:batches", "--batches", "2", "--no-progress", "--max-dead-fraction", limit)  # fmt: skip
    assert got == code, stderr
    if code == 1:
        assert "2 of 16 channels dead (12.5%: 3, 7) > --max-dead-fraction 10.0%" in stderr
    if code == 2:
        one_line(stderr, "--max-dead-fraction must be a fraction in [0, 1], got 12.0")


# -- patch --train: what the train function returns, and a run that raises --------------------------------
def test_a_train_function_returning_a_dict_or_a_tensor_gives_its_loss_and_rows() -> None:
    returned: dict[tuple[str, int], dict[str, float]] = {}

    def as_dict(model: nn.Module, steps: int, seed: int) -> dict[str, Any]:
        loss = OWN_CNN.train(model, steps, seed)
        returned[(type(model[1]).__name__, seed)] = {"loss": loss, "grad_norm": 0.5 + seed}
        return {"loss": torch.tensor(loss), "grad_norm": 0.5 + seed}

    result = verify_own(OWN_CNN.build, OWN_CNN.batches(), as_dict, plan_from_flags(activation="leaky"), seeds=2, steps=3)
    rows = {(r["group"], r["metric"]): r for r in result.verification.to_dict()["rows"]}
    for arm, module in (("baseline", "ReLU"), ("patched", "LeakyReLU")):
        assert rows[("task", "loss")][arm] == pytest.approx([returned[(module, s)]["loss"] for s in (0, 1)], rel=1e-6)
        assert rows[("metric", "train: grad_norm")][arm] == [0.5, 1.5]
    assert {r.loss for r in result.runs} == {v["loss"] for v in returned.values()}


@pytest.mark.parametrize("value", ["done", [1.0, 2.0], (None, 1.0)])
def test_a_train_function_returning_something_else_is_refused_not_dropped(value: object) -> None:
    def train(model: nn.Module, steps: int, seed: int) -> object:
        OWN_CNN.train(model, steps, seed)
        return value

    with pytest.raises(UsageError, match=rf"returned {type(value).__name__}: return None, the trained model, its final loss"):
        verify_own(OWN_CNN.build, OWN_CNN.batches(), train, plan_from_flags(activation="leaky"), seeds=1, steps=1)


def test_a_train_function_raising_on_the_second_seed_names_the_run_and_discards_the_others(
    own_ckpt: Path, tmp_path: Path
) -> None:
    helper = tmp_path / "user_train.py"
    helper.write_text(f"import importlib.util\nspec = importlib.util.spec_from_file_location('own', {str(OWN)!r})\n"
                      "own = importlib.util.module_from_spec(spec); spec.loader.exec_module(own)\n"
                      "def train(model, steps, seed):\n"
                      "    if seed == 1:\n        raise ValueError('the loader ran dry')\n"
                      "    own.train(model, steps, seed)\n")  # fmt: skip
    out, md = tmp_path / "patched.pth", tmp_path / "table.md"
    code, _, stderr = run("patch", own_ckpt, "--model", f"{OWN}:build", "--data", f"{OWN}:batches", "--train",
                          f"{helper}:train", "--activation", "leaky", "--seeds", 2, "--max-steps", 2, "--out", out,
                          "--markdown", md, "--no-progress")  # fmt: skip
    assert code == 6
    one_line(stderr, "raised ValueError: the loader ran dry", "in the baseline run of seed 1, run 3 of 4",
             "the 2 runs trained before it are discarded and nothing is written", after_progress=True)
    assert not out.exists() and not md.exists()


def test_workers_with_a_model_of_your_own_is_refused_not_ignored(own_ckpt: Path) -> None:
    code, _, stderr = run("patch", own_ckpt, "--model", f"{OWN}:build", "--data", f"{OWN}:batches", "--train",
                          f"{OWN}:train", "--activation", "leaky", "--max-steps", 2, "--workers", 2, "--dry-run")  # fmt: skip
    assert code == 2
    one_line(stderr, "--workers 2", "drop --workers")


# -- wrong paths: one line, the documented exit code ------------------------------------------------------
def test_timeline_of_a_folder_exits_4_as_audit_does(tmp_path: Path) -> None:
    code, _, stderr = run("timeline", tmp_path)
    assert code == 4
    one_line(stderr, "is a folder, not a monitor log")
    code, _, stderr = run("audit", tmp_path, "--model", f"{SMALL_CNN}:build", "--input-shape", "2,3,16,16")
    assert code == 4 and "is a folder" in stderr


def test_train_to_a_folder_says_it_is_a_folder_not_to_use_force(tmp_path: Path) -> None:
    for force in ((), ("--force",)):
        code, _, stderr = run("train", "--out", tmp_path, "--max-steps", 1, "--no-progress", *force)
        assert code == 7
        one_line(stderr, "is a folder; give a file path")


def test_every_option_of_every_command_has_help_text() -> None:
    root: Any = typer.main.get_command(app)
    options = [(name, p) for name, command in root.commands.items() for p in command.params
               if p.param_type_name == "option"]  # fmt: skip
    assert len(options) > 50
    missing = [(name, p.opts) for name, p in options if not (p.help or "").strip()]
    assert missing == []
    assert set(root.commands) == {"audit", "train", "patch", "rules", "compare", "report", "timeline"}
