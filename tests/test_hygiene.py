"""An audit leaves the model exactly as it found it, also when it fails half way."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_globals

import deadneuron
from deadneuron.errors import AuditRuntimeError
from tests import zoo


def _state_hash(model: nn.Module) -> str:
    buf = io.BytesIO()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _hook_count(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._forward_hooks_with_kwargs):
            n += len(d)
    return n


def _global_hooks() -> int:
    return len(module_globals._global_forward_hooks) + len(module_globals._global_forward_pre_hooks)


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


class Exploding(nn.Module):
    """Fails in its third layer, after two activation sites have run."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = zoo.SeedEncoder(zoo.Tap())
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))  # (N, 8, H, W) into Linear(5): shape error


@pytest.mark.parametrize("training", [True, False])
def test_audit_restores_everything(training: bool) -> None:
    model = zoo.SeedEncoder(zoo.Tap())
    zoo.warm_batchnorm(model, zoo.image_batches())
    model.train(training)
    model.bn_layers[2].eval()  # a mixed state must come back as it was
    before = (_state_hash(model), _modes(model), _hook_count(model), _global_hooks())
    deadneuron.audit(model, zoo.image_batches(), progress=False)
    assert (_state_hash(model), _modes(model), _hook_count(model), _global_hooks()) == before


def test_failed_audit_restores_everything_and_names_the_site() -> None:
    model = Exploding()
    model.train()
    before = (_state_hash(model), _modes(model), _hook_count(model), _global_hooks())
    with pytest.raises(AuditRuntimeError) as info:
        deadneuron.audit(model, zoo.image_batches(), progress=False)
    message = str(info.value)
    assert "enc.bn_layers.3>relu" in message and "(4, 3, 6, 6)" in message and "\n" not in message
    assert (_state_hash(model), _modes(model), _hook_count(model), _global_hooks()) == before
    # BatchNorm buffers were not touched although the model was in train mode
    assert int(model.enc.bn_layers[0].num_batches_tracked) == 0


def test_keyboard_interrupt_mid_audit_restores_hooks() -> None:
    model = zoo.SeedEncoder(zoo.Tap())

    def data():
        yield torch.randn(2, 3, 6, 6)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deadneuron.audit(model, data(), progress=False)
    assert _hook_count(model) == 0 and model.training


def test_recorder_removes_hooks_on_error() -> None:
    model = zoo.FunctionalCNN(zoo.Tap())
    with pytest.raises(RuntimeError), deadneuron.Recorder(model):
        model(torch.randn(1, 5, 4, 4))
    assert _hook_count(model) == 0
    # the functional probe is gone too: F.relu outside is not recorded anywhere
    torch.relu(torch.randn(3))


# --- the functional probe (a TorchFunctionMode) is suspended inside activation modules and torch's
# own leaves; none of that may leak out of the Recorder or lose a functional activation --------------


def _mode_stack() -> list[object]:
    return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]


class FunctionalAfterLeaf(nn.Module):
    """F.relu on a conv output, then a BatchNorm, then F.gelu: functional sites after quiet leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.bn(nn.functional.relu(self.conv(x))))


def test_functional_sites_after_leaves_are_found() -> None:
    report = deadneuron.audit(FunctionalAfterLeaf().eval(), [torch.randn(2, 3, 8, 8)], progress=False)
    assert list(report.sites) == ["conv>relu", "bn>gelu"]
    assert _mode_stack() == []


def test_a_leaf_that_raises_does_not_lose_the_probe() -> None:
    """The conv raises on a wrong input while the probe is suspended inside it; the next forward pass
    in the same Recorder still finds both functional activations, and the exit removes the probe."""
    model = FunctionalAfterLeaf().eval()
    with torch.inference_mode(), deadneuron.Recorder(model) as rec:
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 5, 8, 8))
        rec.start_batch()
        model(torch.randn(2, 3, 8, 8))
        names = [r.name for r in rec.results()]
    assert names == ["conv>relu", "bn>gelu"]
    assert _mode_stack() == []


def test_audit_failing_inside_a_leaf_leaves_no_mode() -> None:
    model = Exploding()
    with pytest.raises(AuditRuntimeError):
        deadneuron.audit(model, zoo.image_batches(), progress=False)
    assert _mode_stack() == []


class _UserMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return func(*args, **(kwargs or {}))


def test_a_users_mode_outside_the_audit_stays() -> None:
    with _UserMode() as user:
        report = deadneuron.audit(FunctionalAfterLeaf().eval(), [torch.randn(2, 3, 8, 8)], progress=False)
        assert _mode_stack() == [user]
    assert list(report.sites) == ["conv>relu", "bn>gelu"]
    assert _mode_stack() == []


class ReluInsideConv(nn.Conv2d):
    """A subclass of a quiet leaf that overrides forward: it may call activations, so it is watched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_a_leaf_subclass_with_its_own_forward_is_watched() -> None:
    model = nn.Sequential(ReluInsideConv(3, 4, 3)).eval()
    report = deadneuron.audit(model, [torch.randn(2, 3, 8, 8)], progress=False)
    assert list(report.sites) == ["0.relu"]


def test_a_model_with_uninitialised_lazy_layers_is_refused_and_left_trainable() -> None:
    # materialised under inference_mode, a lazy layer's weights became inference tensors: no training after the audit
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.LazyLinear(2))
    with pytest.raises(deadneuron.DeadneuronError, match=r"'0'.*LazyLinear.*forward pass"):
        deadneuron.audit(model, [torch.randn(5, 4)], progress=False)
    assert all(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())
    model(torch.randn(5, 4)).sum().backward()  # a first forward of the user's own: materialised, trainable
    assert all(p.grad is not None and not p.is_inference() for p in model.parameters())
    report = deadneuron.audit(model, [torch.randn(5, 4)], progress=False)
    assert list(report.sites) == ["1"]
    model(torch.randn(5, 4)).sum().backward()


def test_a_lazy_batchnorm_without_affine_parameters_is_refused_too() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(affine=False), nn.ReLU())
    with pytest.raises(deadneuron.DeadneuronError, match=r"'1'.*LazyBatchNorm2d"):
        deadneuron.audit(model, [torch.randn(2, 3, 4, 4)], progress=False)


def test_a_model_on_the_meta_device_is_refused_with_one_clear_line() -> None:
    # built under torch.device("meta") (or an init_empty_weights context): shapes, no values to measure
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    for batch in (torch.randn(5, 4), torch.randn(5, 4, device="meta")):
        with pytest.raises(deadneuron.DeadneuronError, match=r"'0\.weight'.*meta device.*load_state_dict"):
            deadneuron.audit(model, [batch], progress=False)
    with pytest.raises(deadneuron.DeadneuronError, match=r"'0\.weight'.*meta device"):
        deadneuron.Monitor(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.is_meta and p.requires_grad for p in model.parameters()) and model.training


class CachingModel(nn.Module):
    """Caches in its forward, as rotary embeddings do: a buffer grown to the sequence length, a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.GELU()
        self.scale: torch.Tensor | None = None
        self.register_buffer("cos_cached", torch.zeros(0, 6), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cos_cached.shape[0] < x.shape[1]:
            self.cos_cached = torch.cos(torch.arange(x.shape[1])[:, None] * torch.ones(6))
        if self.scale is None:
            self.scale = torch.ones(6)
        return self.act(self.fc(x) * self.cos_cached[: x.shape[1]] * self.scale)


def test_tensors_a_model_caches_in_its_forward_are_left_as_found_and_it_still_trains() -> None:
    # made under inference_mode, the caches were inference tensors: the next training step raised
    torch.manual_seed(0)
    model = CachingModel()
    empty = model.cos_cached
    deadneuron.audit(model, [torch.randn(2, 5, 4)], progress=False)
    assert model.cos_cached is empty and model.scale is None and "cos_cached" in dict(model.named_buffers())
    model(torch.randn(2, 5, 4)).sum().backward()
    assert model.fc.weight.grad is not None and not model.cos_cached.is_inference()


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(4, 6), nn.Linear(3, 6), nn.ReLU()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.act(self.a(x1) + self.b(x2))


def test_a_tuple_batch_for_a_model_of_two_inputs_says_how_to_feed_both() -> None:
    model, pair = _TwoInputs().eval(), (torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(AuditRuntimeError, match=r"x2.*first element.*dicts of keyword arguments"):
        deadneuron.audit(model, [pair], progress=False)
    report = deadneuron.audit(model, [{"x1": pair[0], "x2": pair[1]}], progress=False)  # as the message says
    z = model.a(pair[0]) + model.b(pair[1])
    assert report.sites["act"].sparsity == pytest.approx(float((z <= 0).double().mean()))


class _PerImage(nn.Module):
    """Takes a list of per-sample images of different sizes, as torchvision's detection models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 8, 3), nn.ReLU()

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.act(self.conv(im[None])) for im in images]


def test_a_list_of_per_sample_images_that_fails_says_how_to_feed_the_whole_list() -> None:
    """A list batch feeds its first element alone (one image, read as a batch of its channels): the forward's
    own error says nothing of that, so the message does; fed as the message says, every image is measured."""
    model = _PerImage().eval()
    images = [torch.randn(3, 16, 16), torch.randn(3, 20, 12), torch.randn(3, 9, 9)]
    with pytest.raises(AuditRuntimeError, match=r"list batch feeds its first element alone.*whole list.*'images'"):
        deadneuron.audit(model, [images], progress=False)
    report = deadneuron.audit(model, [{"images": images}], progress=False)
    # one site per call of the module (its k-th call: the k-th image), each image's positions
    assert [s.n for s in report.sites.values() if s.module == "act"] == [(h - 2) * (w - 2) for _, h, w in (im.shape for im in images)]
    assert report.meta["samples"] == 3


class Counting(nn.Module):
    """Counts its forward passes and keeps a running mean of its input in buffers it updates in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(4, 6), nn.ReLU()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.running.mul_(0.9).add_(0.1 * x.mean(0))
        return self.act(self.fc(x))


def test_buffers_a_forward_updates_in_place_are_put_back() -> None:
    """The audit's passes (and the rules' own forward pass on one sample) must not count as the model's."""
    torch.manual_seed(0)
    model = Counting()
    model(torch.randn(3, 4))  # the model's own history: one call, a running mean
    calls, running = model.calls.clone(), model.running.clone()
    buffers = dict(model.named_buffers())
    deadneuron.audit(model, [torch.randn(5, 4) for _ in range(3)], progress=False)
    assert dict(model.named_buffers()) == buffers  # the same tensors...
    assert torch.equal(model.calls, calls) and torch.equal(model.running, running)  # ...holding what they held
    assert not model.running.is_inference()
