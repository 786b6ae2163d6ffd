"""Adding BatchNorm (`--add-batchnorm`): module surgery that leaves the function unchanged at the moment
of surgery, normalises in training, survives saving; and the `no-normalisation` rule that suggests it.

Oracles: the unpatched model's own outputs on the same batches, per-channel moments of the patched
layer's output computed with plain torch, and channels planted dead by a large negative bias.
"""

from __future__ import annotations

import copy
import importlib.util
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deadneuron import audit
from deadneuron.cli import app
from deadneuron.patch import PatchError, apply_plan, load_patched, patched_state, plan_from_flags
from deadneuron.rules import context_from, evaluate
from tests.suggested import all_without_out, without_out

ADD_BN = plan_from_flags(add_batchnorm=True)
DEAD = (1, 4, 6)


class PlainCNN(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> pool -> linear -> ReLU -> linear; BatchNorm after each conv with
    ``norm``, no normalisation anywhere without."""

    def __init__(self, *, norm: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norms = nn.ModuleList([nn.BatchNorm2d(8), nn.BatchNorm2d(8)]) if norm else None
        self.fc = nn.Linear(8, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate((self.c1, self.c2)):
            x = conv(x)
            x = torch.relu(self.norms[i](x) if self.norms is not None else x)
        return self.out(torch.relu(self.fc(x.mean((2, 3)))))


def plain(*, norm: bool = False, dead: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = PlainCNN(norm=norm)
    with torch.no_grad():
        if dead:
            target = model.norms[1] if model.norms is not None else model.c2
            target.bias[list(DEAD)] = -50.0
    return model.eval()


def batches(count: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(8, 3, 10, 10, generator=gen) for _ in range(count)]


def test_surgery_keeps_the_function_unchanged_on_the_data() -> None:
    model = plain()
    data = batches()
    result = apply_plan(model, ADD_BN, example=data[0])
    patched = result.model.eval()
    with torch.no_grad():
        for x in data:
            torch.testing.assert_close(patched(x), model(x), rtol=0, atol=0)
    assert isinstance(patched.c1.batchnorm, nn.BatchNorm2d) and isinstance(patched.c2.batchnorm, nn.BatchNorm2d)
    assert not hasattr(model.c2, "batchnorm"), "the input model is never modified"
    assert {c.target for c in result.record.changes} == {"c1", "c2"}, "only conv layers feed sites by default"
    assert [op.to_dict() for op in result.resolved.ops] == [{"op": "add_batchnorm", "sites": ["layer:c1", "layer:c2"]}]


def test_in_training_mode_the_added_batchnorm_normalises_every_channel_of_the_batch() -> None:
    model = apply_plan(plain(), ADD_BN, example=batches()[0]).model.train()
    captured: list[torch.Tensor] = []
    handle = model.c2.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    model(batches()[1])
    handle.remove()
    out = captured[0].transpose(0, 1).flatten(1)  # (C, N*H*W)
    torch.testing.assert_close(out.mean(1), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    assert bool((out[list(DEAD)] > 0).any()), "re-centred: the planted channels fire again"


def test_a_linear_layer_gets_batchnorm_over_its_last_dim_also_for_token_inputs() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1)).eval()
    x = torch.randn(3, 7, 5)
    result = apply_plan(model, plan_from_flags(add_batchnorm=True, sites=["1"]), example=x)
    patched = result.model
    torch.testing.assert_close(patched(x), model(x), rtol=0, atol=0)
    patched.train()
    z = patched[0](x)
    torch.testing.assert_close(z.reshape(-1, 4).mean(0), torch.zeros(4), atol=1e-5, rtol=0)


def test_saved_and_rebuilt_from_the_plan() -> None:
    result = apply_plan(plain(), ADD_BN, example=batches()[0])
    state = patched_state(result.model, resolved=result.resolved, requested=ADD_BN, record={}, source="x")
    assert set(state["state_dict"]) - set(plain().state_dict()) == {
        f"{layer}.batchnorm.{key}" for layer in ("c1", "c2")
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }  # fmt: skip
    rebuilt = load_patched(copy.deepcopy(state), lambda: PlainCNN())
    x = batches()[2]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), result.model.eval()(x), rtol=0, atol=0)


def test_a_site_fed_by_something_else_than_a_conv_or_linear_is_not_patched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.1), nn.ReLU()).eval()
    with pytest.raises(PatchError, match=r"2: fed by 1 \(Dropout\), not a conv or linear layer"):
        apply_plan(model, plan_from_flags(add_batchnorm=True, sites=["2"]), example=batches()[0])
    with pytest.raises(PatchError, match="--select 'nope' matched no site or layer"):
        apply_plan(model, plan_from_flags(add_batchnorm=True, sites=["nope"]), example=batches()[0])


def test_already_normalised_sites_change_nothing() -> None:
    result = apply_plan(plain(norm=True), ADD_BN, example=batches()[0], strict=False)
    assert result.record.changes == ()
    assert any("already normalised by norms.1 (BatchNorm2d)" in n for n in result.record.notes)


# -- the no-normalisation rule ------------------------------------------------------------------------


def findings(model: nn.Module) -> list[Any]:
    report = audit(model, batches(), progress=False, compile=False, meta={"source": "plain.pth"})
    return [f for f in evaluate(report, context_from(None, model)) if f.rule == "no-normalisation"]


def test_rule_fires_on_a_conv_stack_without_normalisation_with_dead_channels() -> None:
    model = plain()
    with torch.no_grad():  # the oracle: pre-activations of c2 <= 0 everywhere on exactly the planted channels
        z = torch.cat([model.c2(torch.relu(model.c1(x))).transpose(0, 1).flatten(1) for x in batches()], dim=1)
    assert [c for c in range(8) if bool((z[c] <= 0).all())] == list(DEAD)
    (finding,) = findings(model)
    assert dict(finding.channels) == {"c2>relu": DEAD}
    assert "of a conv stack with no normalisation (2 sites fed directly by c1, c2)" in finding.message
    assert finding.sites == ("c1>relu", "c2>relu"), "the whole stack: the fix normalises every conv of it"
    assert finding.to_dict()["patch_ops"] == [[{"op": "add_batchnorm", "sites": ["c1>relu", "c2>relu"]}]]
    assert all_without_out(finding.commands) == ("deadneuron patch plain.pth --add-batchnorm --select 'c1>relu' --select 'c2>relu'",)


def test_rule_stays_silent_with_batchnorm_without_dead_channels_and_after_the_patch() -> None:
    assert findings(plain(norm=True)) == [], "dead channels behind BatchNorm: another rule's business"
    assert findings(plain(dead=False)) == []
    patched = apply_plan(plain(), ADD_BN, example=batches()[0]).model
    assert findings(patched) == [], "the patched model reads as normalised (it still has the dead channels)"


def test_rule_reads_a_state_dict_without_the_model() -> None:
    model = plain()
    report = audit(model, batches(), progress=False, compile=False)
    found = evaluate(report, context_from({"state_dict": model.state_dict()}))
    assert [f.rule for f in found if f.rule == "no-normalisation"] == ["no-normalisation"]


def test_the_suggested_command_runs_and_adds_batchnorm_exactly_there(tmp_path: Path) -> None:
    module = tmp_path / "user_cnn.py"
    module.write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),"
        " nn.ReLU(), nn.Flatten(), nn.Linear(800, 2))\n"
        "def batches():\n    g = torch.Generator().manual_seed(3)\n"
        "    return [torch.randn(4, 3, 10, 10, generator=g) for _ in range(3)]\n"
    )  # fmt: skip
    spec = importlib.util.spec_from_file_location("user_cnn_for_bn", module)
    assert spec and spec.loader
    user = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user)
    torch.manual_seed(0)
    model = user.build()
    with torch.no_grad():
        model[2].bias[[0, 5]] = -50.0
    ckpt = tmp_path / "user.pth"
    torch.save(model.state_dict(), ckpt)
    subject = ["--model", f"{module}:build", "--data", f"{module}:batches"]
    audited = CliRunner().invoke(app, ["audit", str(ckpt), *subject, "--format", "json"])
    assert audited.exit_code == 0, audited.stderr
    import json

    (finding,) = [f for f in json.loads(audited.stdout)["findings"] if f["rule"] == "no-normalisation"]
    assert finding["channels"] == {"3": [0, 5]}
    assert finding["patch_ops"] == [[{"op": "add_batchnorm", "sites": ["1", "3"]}]]
    (command,) = finding["commands"]
    assert without_out(command) == f"deadneuron patch {ckpt} {' '.join(subject)} --add-batchnorm --select 1 --select 3"
    out = tmp_path / "bn.pth"
    words = shlex.split(without_out(command))[2:]  # the suggested command as printed (it names the audit's subject), an output
    result = CliRunner().invoke(app, ["patch", *words, "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "0: no normalisation -> BatchNorm2d(8) after it" in result.stderr
    assert "2: no normalisation -> BatchNorm2d(8) after it" in result.stderr
    rebuilt = load_patched(out, user.build).eval()
    assert hasattr(rebuilt[0], "batchnorm") and hasattr(rebuilt[2], "batchnorm")
    assert not hasattr(rebuilt[5], "batchnorm"), "the head's linear layer feeds no site of the stack"
    with torch.no_grad():
        for x in user.batches():
            torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)


def test_the_surgery_preview_places_batchnorm_as_the_surgery_does() -> None:
    from deadneuron.ops import AddBatchNorm
    from deadneuron.reach import ModelPreview
    from deadneuron.rules import Fix, PatchTarget

    model, x = plain(), batches()[0]
    report = audit(model, [x], progress=False, compile=False, rules=False)
    target = PatchTarget(("m.pth",), preview=ModelPreview(model, x))
    stack = (AddBatchNorm(("c1>relu", "c2>relu")),)
    assert ModelPreview(model, x)(report, stack).sites == {"c1>relu", "c2>relu"}
    assert target.check(report, Fix(stack)) is None
    assert not hasattr(model.c1, "batchnorm"), "the preview changes nothing"
    normed = plain(norm=True)
    normed_report = audit(normed, [x], progress=False, compile=False, rules=False)
    own_stack = (AddBatchNorm(tuple(normed_report.sites)[:2]),)  # named after their norms
    why = PatchTarget(("m.pth",), preview=ModelPreview(normed, x)).check(normed_report, Fix(own_stack))
    assert why is not None and "already normalised by norms.1 (BatchNorm2d)" in why
    dropped = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.1), nn.ReLU()).eval()
    dropped_report = audit(dropped, [x], progress=False, compile=False, rules=False)
    why = PatchTarget(("m.pth",), preview=ModelPreview(dropped, x)).check(dropped_report, Fix((AddBatchNorm(("2",)),)))
    assert why is not None and "2: fed by 1 (Dropout), not a conv or linear layer" in why


# -- the audit of a BatchNorm-patched model suggests commands that run as printed ---------------------------

SHARED_ACT = '''
import torch
from torch import nn


class Net(nn.Module):
    """One ReLU module shared by two conv layers (sites c1>act, c2>act); c3 reads c2>act."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.c1(x))
        x = self.act(self.c2(x))
        return self.c3(x).mean((2, 3))


def build():
    return Net()


def batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(6, 3, 8, 8, generator=g) for _ in range(3)]
'''


def _load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pre_c2(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The input of site c2>act in eval mode, by hand from the saved weights (the added BatchNorms included)."""
    def conv_bn(layer: str, h: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.conv2d(h, state[f"{layer}.weight"], state[f"{layer}.bias"], padding=1)
        return torch.nn.functional.batch_norm(
            z, state[f"{layer}.batchnorm.running_mean"], state[f"{layer}.batchnorm.running_var"],
            state[f"{layer}.batchnorm.weight"], state[f"{layer}.batchnorm.bias"], training=False, eps=1e-5)

    return conv_bn("c2", torch.relu(conv_bn("c1", x)))


def test_reinit_suggested_by_the_audit_of_a_batchnorm_patched_model_runs_as_printed(tmp_path: Path) -> None:
    source = tmp_path / "shared_act.py"
    source.write_text(SHARED_ACT)
    user = _load_module(source, "shared_act_for_bn")
    torch.manual_seed(0)
    model = user.build()
    with torch.no_grad():
        model.c2.bias[list(DEAD)] = -50.0
    ckpt, normed = tmp_path / "own.pth", tmp_path / "bn.pth"
    torch.save(model.state_dict(), ckpt)
    subject = ["--model", f"{source}:build", "--data", f"{source}:batches"]
    run = CliRunner().invoke(app, ["patch", str(ckpt), *subject, "--add-batchnorm", "--out", str(normed)])
    assert run.exit_code == 0, run.stderr
    audited = CliRunner().invoke(app, ["audit", str(normed), *subject, "--format", "json"])
    assert audited.exit_code == 0, audited.stderr
    import json

    report = json.loads(audited.stdout)
    assert [s["name"] for s in report["sites"]] == ["c1>act", "c2>act"], "the added BatchNorm renames no site"
    assert any("'c2.batchnorm' has never been updated" in f["message"] for f in report["findings"])
    (dead,) = [f for f in report["findings"] if f["rule"] == "dead-relu"]
    assert dead["channels"] == {"c2>act": list(DEAD)}
    (command,) = [c for c in dead["commands"] if "--reinit-dead" in c]
    assert without_out(command) == f"deadneuron patch {normed} {' '.join(subject)} --reinit-dead --select 'c2>act'"
    printed = CliRunner().invoke(app, shlex.split(command)[1:])  # exactly as printed
    assert printed.exit_code == 0, printed.stderr
    out = tmp_path / "re.pth"
    result = CliRunner().invoke(app, [*shlex.split(without_out(command))[1:], "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    before = torch.load(normed, weights_only=True)["state_dict"]
    after = torch.load(out, weights_only=True)["state_dict"]
    alive = [c for c in range(8) if c not in DEAD]
    assert not torch.equal(after["c2.weight"][list(DEAD)], before["c2.weight"][list(DEAD)]), "fresh incoming weights"
    torch.testing.assert_close(after["c2.weight"][alive], before["c2.weight"][alive], rtol=0, atol=0)
    assert bool((after["c3.weight"][:, list(DEAD)] == 0).all()), "outgoing weights zeroed"
    torch.testing.assert_close(after["c3.weight"][:, alive], before["c3.weight"][:, alive], rtol=0, atol=0)
    z_before = torch.cat([_pre_c2(before, x) for x in user.batches()])
    z_after = torch.cat([_pre_c2(after, x) for x in user.batches()])
    assert [c for c in range(8) if bool((z_before[:, c] <= 0).all())] == list(DEAD)
    assert [c for c in range(8) if bool((z_after[:, c] <= 0).all())] == [], "the dead channels fire again"
    revived = load_patched(out, user.build).eval()
    with torch.no_grad():
        torch.testing.assert_close(revived(user.batches()[0]), model.eval()(user.batches()[0]), rtol=1e-5, atol=1e-5)
