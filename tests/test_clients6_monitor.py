"""The Monitor in a user's own loop: validation through a part of the model, gradient accumulation, a
model that measures nothing, a loop that never calls step(), and the model left exactly as found.

The oracle is plain torch: a forward hook of the test keeps the ReLU input z of every training pass (train
mode), and the figures a snapshot should give are counted from those tensors."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from deadneuron.errors import UsageError
from tests.monitor_models import hook_count

PLANTED = 3  # the hidden channel with zero weights and bias -1: its ReLU never fires


class Mlp(nn.Module):
    """Linear 6 -> 8, ReLU, Linear 8 -> 2; channel PLANTED of the first layer is dead from the start.
    ``boom``: raise after the activation ran (a validation pass that fails half way)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.out = nn.Linear(8, 2)
        self.boom = False
        with torch.no_grad():
            self.fc.weight[PLANTED] = 0.0
            self.fc.bias[PLANTED] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.fc(x))
        if self.boom:
            raise RuntimeError("boom")
        return self.out(a)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = Mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Stored:
    """The oracle: z of every train-mode call of ``act`` (eval-mode calls are no training)."""

    def __init__(self, act: nn.Module) -> None:
        self.z: list[torch.Tensor] = []
        self.handle = act.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if module.training:
            self.z.append(args[0].detach().clone())

    def window(self, first: int, last: int, *, per_step: int = 1) -> tuple[int, set[int]]:
        """Elements per channel and dead channel ids over the train-mode calls of steps first .. last - 1."""
        z = torch.cat(self.z[first * per_step : last * per_step])
        return z.shape[0], set(torch.nonzero(~(z > 0).any(0)).flatten().tolist())


def batches(n: int, *, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=gen), torch.randint(0, 2, (batch,), generator=gen)) for _ in range(n)]


def state(model: nn.Module) -> dict[str, Any]:
    """Everything an audit must leave as it found it: hooks, modes, parameters, buffers, gradients."""
    return {"hooks": hook_count(model), "modes": [m.training for m in model.modules()],
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            "attributes": sorted(vars(model))}  # fmt: skip


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert (a["hooks"], a["modes"], a["attributes"]) == (b["hooks"], b["modes"], b["attributes"])
    for key in ("params", "buffers", "grads"):
        assert a[key].keys() == b[key].keys()
        for name, x in a[key].items():
            y = b[key][name]
            assert (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)), (key, name)


def validation_through_the_part(model: Outer, monitor: bool, *, steps: int = 4, every: int = 2) -> Any:
    """Train ``model``; after every step validate with ``model.net`` called on its own in eval mode."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data, val = batches(steps), batches(2, seed=9)
    mon = deadneuron.Monitor(model, every=every, optimizer=opt) if monitor else None
    if mon is not None:
        mon.start()
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step()
        model.eval()
        with torch.no_grad():
            for xv, _ in val:
                model.net(xv)  # a part of the model, not the model: its own forward hook never runs
        model.train()
    if mon is not None:
        mon.close()
    return mon


def test_validation_through_a_part_of_the_model_is_not_measured_and_changes_nothing() -> None:
    torch.manual_seed(0)
    plain, watched = Outer(), Outer()
    watched.load_state_dict(plain.state_dict())
    validation_through_the_part(plain, monitor=False)
    stored = Stored(watched.net.act)
    mon = validation_through_the_part(watched, monitor=True)
    stored.handle.remove()
    assert_same_state(state(plain), state(watched))  # same weights, grads and modes; no hook left
    assert len(stored.z) == 4  # the oracle kept the four training passes only
    assert [sorted(s.sites) for s in mon.snapshots] == [["net.act"]] * 2  # no net.act#1, #2, #3 of the eval calls
    for snap in mon.snapshots:
        n, dead = stored.window(snap.first_step, snap.step)
        site = snap.sites["net.act"]
        assert site.n == n == 2 * 8
        assert set(site.dead_channels) == dead == {PLANTED}
        assert site.grad_elements == n  # every measured pass got its gradient: no eval pass among them
    assert not any("order of their calls" in w or "no gradient reached" in w for w in mon.warnings), mon.warnings


def test_a_frozen_part_in_eval_mode_called_on_its_own_is_no_training_while_the_rest_is() -> None:
    # a distillation step: the teacher (eval mode) and the student (train mode) are called one after the
    # other by the loop, never through the model's own forward
    torch.manual_seed(0)
    model = nn.Module()
    model.teacher, model.student = Mlp(), Mlp()
    model.teacher.eval()
    opt = torch.optim.SGD(model.student.parameters(), lr=0.1)
    stored = Stored(model.student.act)
    with deadneuron.Monitor(model, every=3, optimizer=opt) as mon:
        for x, _ in batches(3):
            mon.begin_batch()
            with torch.no_grad():
                target = model.teacher(x).softmax(-1)
            loss = F.cross_entropy(model.student(x), target)
            mon.end_forward()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    stored.handle.remove()
    (snap,) = mon.snapshots
    assert list(snap.sites) == ["student.act"]
    n, dead = stored.window(0, 3)
    assert snap.sites["student.act"].n == n == 3 * 8 and set(snap.sites["student.act"].dead_channels) == dead
    assert hook_count(model) == 0 and model.teacher.training is False and model.student.training is True


def test_a_frozen_part_in_eval_mode_inside_the_model_s_forward_is_measured_with_the_training_pass() -> None:
    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = Mlp(), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    torch.manual_seed(0)
    model = Frozen()
    model.backbone.eval()
    stored = Stored(model.backbone.act)  # eval mode: keeps nothing, so count the batches instead
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with deadneuron.Monitor(model, every=2, optimizer=opt) as mon:
        for x, y in batches(2):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    stored.handle.remove()
    assert mon.snapshots[0].sites["backbone.act"].n == 2 * 8


def test_a_validation_pass_through_a_part_that_raises_leaves_the_next_step_measured() -> None:
    torch.manual_seed(0)
    model = Outer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stored = Stored(model.net.act)
    data = batches(4)
    with deadneuron.Monitor(model, every=4, optimizer=opt) as mon:
        for i, (x, y) in enumerate(data):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
            if i == 1:
                model.eval()
                model.net.boom = True
                with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
                    model.net(data[0][0])  # the activation ran, then the part raised: its return never came
                model.net.boom = False
                model.train()
    stored.handle.remove()
    (snap,) = mon.snapshots
    n, dead = stored.window(0, 4)
    assert list(snap.sites) == ["net.act"] and snap.sites["net.act"].n == n == 4 * 8
    assert set(snap.sites["net.act"].dead_channels) == dead
    assert hook_count(model) == 0


def test_gradient_accumulation_counts_optimizer_steps_and_measures_every_micro_batch() -> None:
    torch.manual_seed(0)
    model = Outer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stored = Stored(model.net.act)
    accumulate, data = 3, batches(12)
    with deadneuron.Monitor(model, every=2, optimizer=opt) as mon:
        for i, (x, y) in enumerate(data):
            (F.cross_entropy(model(x), y) / accumulate).backward()
            if (i + 1) % accumulate == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
                mon.step()
    stored.handle.remove()
    assert mon.steps == 4 and [(s.first_step, s.step) for s in mon.snapshots] == [(0, 2), (2, 4)]
    for snap in mon.snapshots:
        n, dead = stored.window(snap.first_step, snap.step, per_step=accumulate)
        assert snap.sites["net.act"].n == snap.sites["net.act"].grad_elements == n == 2 * accumulate * 8
        assert set(snap.sites["net.act"].dead_channels) == dead


def test_the_model_is_exactly_as_without_the_monitor_when_the_loop_raises_half_way() -> None:
    def run(monitor: bool) -> Outer:
        torch.manual_seed(0)
        model = Outer()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        with pytest.raises(RuntimeError, match="half way"):
            mon = deadneuron.Monitor(model, every=2, sample_every=2, optimizer=opt) if monitor else None
            if mon is not None:
                mon.start()
            try:
                for i, (x, y) in enumerate(batches(5)):
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()  # gradients left accumulated, as a loop stopped before zero_grad leaves them
                    if i == 3:
                        raise RuntimeError("half way")
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if mon is not None:
                        mon.step()
            finally:
                if mon is not None:
                    mon.close(snapshot=False)  # what leaving the with block on an exception does
        return model

    assert_same_state(state(run(monitor=False)), state(run(monitor=True)))


def test_a_monitor_that_measures_nothing_says_so_when_the_block_ends() -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))  # no activation at all
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="measured no activation site"), \
            deadneuron.Monitor(model, every=100, optimizer=opt) as mon:  # fewer steps than every
        for x, y in batches(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    assert mon.snapshots == [] and len(mon.warnings) == 1 and "nothing was recorded" in mon.warnings[0]
    with pytest.raises(UsageError, match="the 3 steps counted measured no activation site"):
        mon.findings()


def test_a_snapshot_before_any_step_call_is_flagged_and_its_window_is_named_by_its_step() -> None:
    model = Outer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with deadneuron.Monitor(model, every=10, optimizer=opt) as mon:
            for x, y in batches(2):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()  # ... and no mon.step()
    assert [(s.first_step, s.step) for s in mon.snapshots] == [(0, 0)]
    assert any("before any call of mon.step()" in str(w.message) for w in caught)
    assert mon.report().meta["samples"] == "the training batches of step 0"  # not "steps 0--1"
    dead = next(f for f in mon.findings() if f.rule == "dead-relu")
    assert "steps 0--1" not in dead.message and "of step 0" in dead.message
