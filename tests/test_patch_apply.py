"""Module surgery on a deep copy: every ReLU swapped (a shared one at all its sites), identity regions
unchanged, functional calls rewritten with torch.fx, a clear error where fx cannot trace, dropout,
ReDo re-initialisation, and rebuilding a saved patched model."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deadneuron import audit
from deadneuron.patch import (
    InsertDropout,
    PatchError,
    Plan,
    ReinitDead,
    apply_plan,
    load_patched,
    patched_state,
    plan_from_flags,
)
from deadneuron.patch.reinit import reset_optimizer_rows

LEAKY = plan_from_flags(activation="leaky")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "small_cnn.py"


class SharedEncoder(nn.Module):
    """The user's encoder shape: one ``self.relu`` after four conv+BN layers, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(4))
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = self.relu(bn(conv(x)))
        return self.head(x.mean((2, 3)))


class TwoNames(nn.Module):
    """One activation instance registered under two attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.act1 = nn.ReLU()
        self.act2 = self.act1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.b(self.act1(self.a(x))))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.lin(x))


class Functional(nn.Module):
    """No activation modules: F.relu, torch.relu, x.relu_() (in place, result unused), in a child too."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.block = Block()
        self.register_buffer("offset", torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x)) + self.offset
        h = self.block(h)
        g = self.b(h)
        g.relu_()
        return self.c(torch.relu(g) + g)


class FunctionalLeaky(Functional):
    """What Functional must compute after the swap (the oracle, written by hand)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.a(x), 0.01) + self.offset
        h = h + F.leaky_relu(self.block.lin(h), 0.01)
        g = F.leaky_relu(self.b(h), 0.01)
        return self.c(F.leaky_relu(g, 0.01) + g)


class Untraceable(nn.Module):
    """Data-dependent control flow around a functional relu: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.lin(x))
        if h.sum() > 0:
            return F.relu(self.lin(h))
        return h


class UntraceableParent(nn.Module):
    """Untraceable own code without functional activations; a traceable child with one."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) if x.sum() > 0 else -x


def state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def kinds(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    return {name: s.kind for name, s in audit(model, [x], progress=False, compile=False).sites.items()}


def test_every_relu_is_swapped_the_shared_one_at_all_four_sites() -> None:
    torch.manual_seed(0)
    model, x = SharedEncoder().eval(), torch.randn(2, 3, 8, 8)
    before, digest = kinds(model, x), state_hash(model)
    result = apply_plan(model, LEAKY, example=x)
    after = kinds(result.model, x)
    assert set(after) == set(before) and len([n for n in after if n.startswith("bns.")]) == 4
    assert set(after.values()) == {"leaky_relu"} and set(before.values()) == {"relu"}
    assert not any(isinstance(m, nn.ReLU) for m in result.model.modules())
    assert result.model.head[1].inplace, "in-place stays in-place"
    assert isinstance(model.relu, nn.ReLU) and state_hash(model) == digest, "the input model is untouched"
    assert [c.target for c in result.record.changes] == ["relu", "head.1"]


def test_a_report_names_the_shared_modules_sites_in_the_record() -> None:
    model, x = SharedEncoder().eval(), torch.randn(2, 3, 8, 8)
    report = audit(model, [x], progress=False, compile=False)
    plan = plan_from_flags(activation="gelu", sites=("bns.2>relu",))
    result = apply_plan(model, plan, report=report, example=x)
    assert isinstance(result.model.relu, nn.GELU) and isinstance(result.model.head[1], nn.ReLU)
    assert result.record.changes[0].note == "shared by 4 call sites: changed at all of them"


def test_a_site_name_selector_works_without_a_report() -> None:
    result = apply_plan(SharedEncoder(), plan_from_flags(activation="elu", sites=("bns.1>relu",)))
    assert isinstance(result.model.relu, nn.ELU) and isinstance(result.model.head[1], nn.ReLU)


def test_one_instance_under_two_names_changes_under_both_and_stays_shared() -> None:
    result = apply_plan(TwoNames(), LEAKY, example=torch.randn(3, 4))
    assert isinstance(result.model.act1, nn.LeakyReLU) and result.model.act1 is result.model.act2
    assert "registered as act1, act2" in result.record.changes[0].note


@pytest.mark.parametrize("activation", ["leaky", "elu", "prelu"])
def test_outputs_unchanged_where_the_activation_is_in_its_identity_region(activation: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU())
    with torch.no_grad():
        for p in model.parameters():
            p.abs_().add_(0.01)  # positive weights and biases, positive inputs: every pre-activation > 0
    x = torch.rand(16, 4)
    patched = apply_plan(model, plan_from_flags(activation=activation), example=x).model
    assert not any(isinstance(m, nn.ReLU) for m in patched.modules())
    assert torch.equal(patched(x), model(x))


def test_functional_activations_are_rewritten_with_fx_and_compute_the_swapped_function() -> None:
    torch.manual_seed(0)
    model, x = Functional(), torch.randn(5, 6)
    result = apply_plan(model, LEAKY, example=x)
    oracle = FunctionalLeaky()
    oracle.load_state_dict(model.state_dict())
    assert torch.allclose(result.model(x), oracle(x), atol=1e-6)
    assert set(kinds(result.model, x).values()) == {"leaky_relu"}
    assert set(result.model.state_dict()) == set(model.state_dict()), "state_dict keys do not change"
    assert "rewritten with torch.fx" in result.record.lines()[0]
    assert type(result.model.block).__name__ == "Block", "children keep their class name"


def test_untraceable_model_gets_a_clear_error_naming_the_site_and_the_reason() -> None:
    model, x = Untraceable(), torch.ones(2, 4)
    with pytest.raises(PatchError) as err:
        apply_plan(model, LEAKY, example=x)
    message = str(err.value)
    assert "lin>relu (relu, functional)" in message
    assert "torch.fx cannot trace <root>.forward" in message and "control flow" in message
    assert "nn.ReLU()" in message  # what to do
    lenient = apply_plan(model, LEAKY, example=x, strict=False)
    assert isinstance(lenient.model.act, nn.LeakyReLU), "what could be patched was"
    assert len(lenient.record.not_patched) == 1


def test_an_untraceable_parent_does_not_stop_its_traceable_child() -> None:
    x = torch.rand(3, 6)
    result = apply_plan(UntraceableParent(), LEAKY, example=x)
    assert set(kinds(result.model, x).values()) == {"leaky_relu"}


def test_a_selector_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(PatchError, match="matched no activation"):
        apply_plan(SharedEncoder(), plan_from_flags(activation="gelu", sites=("decoder.*",)))


def test_dropout_between_convs_is_a_training_mode_hook_on_the_shared_activation() -> None:
    torch.manual_seed(0)
    model, x = SharedEncoder().eval(), torch.randn(4, 3, 8, 8)
    report = audit(model, [x], progress=False, compile=False)
    result = apply_plan(model, Plan((InsertDropout(0.5),)), report=report)
    assert [c.target for c in result.record.changes] == ["relu"], "the head's ReLU follows a Linear"
    assert torch.equal(result.model.eval()(x), model(x))
    assert result.resolved.ops == (InsertDropout(0.5, ("module:relu",)),)
    with pytest.raises(PatchError, match="needs an audit report"):
        apply_plan(model, Plan((InsertDropout(0.5),)))


def planted_encoder() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = SharedEncoder(), torch.randn(4, 3, 8, 8)
    model.train()
    with torch.no_grad():
        model(x)  # BatchNorm statistics
        model.bns[1].bias[2] = -50.0  # channel 2 of site bns.1>relu never fires
    return model.eval(), x


def test_reinit_revives_dead_channels_and_leaves_the_function_unchanged() -> None:
    model, x = planted_encoder()
    report = audit(model, [x], progress=False, compile=False)
    assert report.sites["bns.1>relu"].dead_channels == (2,)
    result = apply_plan(model, Plan((ReinitDead((("bns.1>relu", (2,)),)),)), report=report, example=x)
    new = result.model
    assert torch.allclose(new(x), model(x), atol=1e-6), "zero outgoing weights: same function at surgery"
    assert not torch.equal(new.convs[1].weight[2], model.convs[1].weight[2])
    assert torch.equal(new.convs[1].weight[:2], model.convs[1].weight[:2])
    assert float(new.bns[1].bias.detach()[2]) == 0.0 and float(new.bns[1].running_var[2]) == 1.0
    assert torch.count_nonzero(new.convs[2].weight[:, 2]) == 0
    assert audit(new, [x], progress=False, compile=False).sites["bns.1>relu"].dead_channels == ()
    assert {s.param for s in result.optimizer_slices} == {"convs.1.weight", "convs.1.bias", "bns.1.weight",
                                                          "bns.1.bias", "convs.2.weight"}  # fmt: skip


class BlockFed(nn.Module):
    """F.relu reads what a Sequential block returns: the audit names the site after the block."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.block(x)))


def test_reinit_finds_a_site_named_after_the_container_that_returned_its_input() -> None:
    torch.manual_seed(0)
    model, x = BlockFed().eval(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model.block[1].bias[[2, 5]] = -50.0
    report = audit(model, [x], progress=False, compile=False)
    assert list(report.sites) == ["block>relu"]
    result = apply_plan(model, Plan((ReinitDead((("block>relu", (2, 5)),)),)), report=report, example=x)
    new = result.model
    with torch.no_grad():  # the oracle: the block's output by hand, before and after
        z_old = F.batch_norm(model.block[0](x), model.block[1].running_mean, model.block[1].running_var,
                             model.block[1].weight, model.block[1].bias, training=False)  # fmt: skip
        z_new = F.batch_norm(F.conv2d(x, new.block[0].weight, new.block[0].bias, padding=1), new.block[1].running_mean,
                             new.block[1].running_var, new.block[1].weight, new.block[1].bias, training=False)  # fmt: skip
    assert [c for c in range(6) if bool((z_old[:, c] <= 0).all())] == [2, 5]
    assert [c for c in range(6) if bool((z_new[:, c] <= 0).all())] == []
    assert torch.equal(new.block[0].weight[[0, 1, 3, 4]], model.block[0].weight[[0, 1, 3, 4]])
    assert torch.count_nonzero(new.head.weight[:, [2, 5]]) == 0
    assert torch.allclose(new(x), model(x), atol=1e-6), "zero outgoing weights: same function at surgery"


def test_reinit_resets_the_optimizer_moments_of_the_touched_slices() -> None:
    model, x = planted_encoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).sum().backward()
    optimizer.step()
    for entry in optimizer.state.values():  # a dead channel has no gradient: make its moments visible
        entry["exp_avg_sq"].fill_(1.0)
    result = apply_plan(model, Plan((ReinitDead((("bns.1>relu", (2,)),)),)), example=x)
    state = reset_optimizer_rows(optimizer.state_dict(), model, result.optimizer_slices)
    index = [n for n, _ in model.named_parameters()].index("convs.2.weight")
    moments = state["state"][index]["exp_avg_sq"]
    assert torch.count_nonzero(moments[:, 2]) == 0 and torch.count_nonzero(moments[:, 1]) > 0
    assert torch.count_nonzero(optimizer.state_dict()["state"][index]["exp_avg_sq"][:, 2]) > 0, "a copy"


def test_reinit_on_the_small_cnn_example_revives_its_planted_channels() -> None:
    spec = importlib.util.spec_from_file_location("small_cnn_for_patch", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.build().train()
    data = list(module.batches(2))
    with torch.no_grad():
        for x in data:
            model(x)
        model[4].bias[list(module.DEAD)] = -50.0
    model.eval()
    report = audit(model, data, progress=False, compile=False)
    result = apply_plan(model, Plan((ReinitDead(),)), report=report, example=data[0])
    assert audit(result.model, data, progress=False, compile=False).summary.dead == 0
    assert any("outgoing weights left as they are" in n for n in result.record.notes), "pooling, then flatten"


def test_a_saved_patched_model_rebuilds_from_factory_plan_and_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    result = apply_plan(Functional(), plan_from_flags(activation="prelu"), example=x)
    assert "block.patched_prelu_0.weight" in result.model.state_dict()
    with torch.no_grad():
        result.model.block.patched_prelu_0.weight.fill_(0.3)  # as if trained
    saved = patched_state(result.model, resolved=result.resolved, requested=LEAKY, record=result.record.to_dict(),
                          source="x.pth")  # fmt: skip
    torch.save(saved, tmp_path / "p.pth")
    rebuilt = load_patched(tmp_path / "p.pth", Functional)
    assert torch.equal(rebuilt(x), result.model(x))
    assert copy.deepcopy(rebuilt) is not rebuilt


def test_reinit_draws_rows_other_than_those_the_model_was_built_with() -> None:
    """A model built right after torch.manual_seed(0), its first layer's channel 1 planted dead by its bias: the
    re-initialised rows are fresh, not the rows it was built with (drawn again under the same seed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].bias[1] = -50.0
    x = torch.randn(16, 4)
    report = audit(model, [x], progress=False, compile=False)
    assert report.sites["1"].dead_channels == (1,)
    new = apply_plan(model, Plan((ReinitDead((("1", (1,)),)),)), report=report, example=x).model
    assert not torch.equal(new[0].weight[1], model[0].weight[1])
    assert torch.equal(new[0].weight[[0, 2]], model[0].weight[[0, 2]])
