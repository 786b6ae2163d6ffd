"""deadneuron.Monitor in a plain training loop: dead channels over snapshots against a numpy count of the
pre-activations the model stored itself, the findings, autograd untouched, nothing left on the model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from deadneuron.errors import UsageError
from deadneuron.rules import Severity
from tests.monitor_models import StashCNN, dead_oracle, hook_count, teacher_batches, train


def _dying_run(every: int = 5, steps: int = 50) -> tuple[StashCNN, deadneuron.Monitor]:
    torch.manual_seed(0)
    model = StashCNN(bn=False)
    model.stash = {}
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    with deadneuron.Monitor(model, every=every, optimizer=opt) as mon:
        train(model, opt, teacher_batches(steps), mon.step)
    return model, mon


def test_dead_channels_rise_and_match_a_numpy_count_at_every_snapshot() -> None:
    model, mon = _dying_run()
    assert model.stash is not None
    assert [s.step for s in mon.snapshots] == list(range(5, 51, 5))
    for snap in mon.snapshots:
        for site in ("conv1>relu", "bn>relu"):
            expected = dead_oracle(model.stash[site], snap.first_step, snap.step)
            assert set(snap.sites[site].dead_channels) == expected, (site, snap.step)
    dead = [s.sites["bn>relu"].dead for s in mon.snapshots]
    # rising: none dead over the first steps, then channels die under the high rate and stay dead
    # (a count per window, so it wobbles by a few channels that fire on one window's batches)
    assert dead[0] == 0 and min(dead[1:]) >= 16, dead
    frame = mon.timeline
    assert list(frame.loc[frame.site == "bn>relu", "dead"]) == dead


def test_findings_say_channels_are_dying_since_a_step() -> None:
    model, mon = _dying_run()
    assert model.stash is not None
    windows = [(s.first_step, dead_oracle(model.stash["bn>relu"], s.first_step, s.step)) for s in mon.snapshots]
    died = windows[-1][1] - windows[0][1]
    since = min(first for first, dead in windows if dead & died)  # the first step of the first window seeing one dead
    findings = {f.rule: f for f in mon.findings()}
    dying = findings["channels-dying"]
    assert dying.severity is Severity.WARNING
    assert f"dying since step {since}" in dying.message
    assert set(dying.channels["bn>relu"]) == died
    assert "lr-dying" in findings and "0.03" in findings["lr-dying"].message  # the rate read from the optimizer
    assert "training batches of steps 45-49" in findings["dead-relu"].message


def test_batchnorm_at_a_modest_rate_gets_no_warning() -> None:
    torch.manual_seed(0)
    model = StashCNN(bn=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with deadneuron.Monitor(model, every=10, optimizer=opt) as mon:
        train(model, opt, teacher_batches(60), mon.step)
    assert len(mon.snapshots) == 6 and all(s.dead == 0 for s in mon.snapshots)
    worst = [f for f in mon.findings() if f.severity >= Severity.WARNING]
    assert worst == [], [f.message for f in worst]


class Mixed(nn.Module):
    """In-place ReLU module, functional GELU, a LeakyReLU on (N, C) features, a Tanh: every hook path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 16)
        self.leaky = nn.LeakyReLU(0.1)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.relu(self.conv(x)))
        return self.out(torch.tanh(self.leaky(self.fc(h.mean((2, 3))))))


def _trajectory(monitor: dict | None, steps: int = 6) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(3)
    model = Mixed()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = teacher_batches(steps, batch=4, side=6)
    mon = deadneuron.Monitor(model, optimizer=opt, **monitor) if monitor is not None else None
    with mon if mon is not None else torch.enable_grad():
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
            if mon is not None:
                mon.step()
    if mon is not None:
        assert mon.snapshots and all(s.sites for s in mon.snapshots)
    return [p.detach().clone() for p in model.parameters()], grads


@pytest.mark.parametrize("options", [{"every": 2}, {"every": 4, "sample_every": 2}, {"every": 1}],
                         ids=["every2", "sampled", "every1"])  # fmt: skip
def test_gradients_and_parameters_are_bit_identical_with_and_without_the_monitor(options: dict) -> None:
    params, grads = _trajectory(None)
    params_m, grads_m = _trajectory(options)
    assert all(torch.equal(a, b) for a, b in zip(params, params_m, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_m, strict=True))


def test_an_exception_in_the_loop_leaves_nothing_on_the_model() -> None:
    torch.manual_seed(0)
    model = StashCNN()
    torch.optim.Adam(model.parameters(), lr=1e-3)
    state = copy.deepcopy(model.state_dict())
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"), deadneuron.Monitor(model, every=2) as mon:
        for i, (x, _) in enumerate(teacher_batches(5)):
            model(x).sum().backward()
            assert hook_count(model) > before
            if i == 2:
                raise RuntimeError("boom")
            mon.step()
    assert hook_count(model) == before
    assert torch._C._len_torch_function_stack() == 0
    assert len(mon.snapshots) == 1  # the one taken at step 2; none for the failed window
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.train()
    model(torch.randn(2, 3, 6, 6)).sum().backward()  # no hook fires any more: the monitor saw nothing new
    assert len(mon.snapshots) == 1


def test_eval_passes_are_not_measured_and_modes_are_the_loop_s() -> None:
    torch.manual_seed(0)
    model = StashCNN()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    batches = teacher_batches(4)
    with deadneuron.Monitor(model, every=10, optimizer=opt) as mon:
        for x, y in batches:
            model.train()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            model.eval()
            with torch.no_grad():
                model(x)
                model(x)
            mon.step()
        assert not model.training
    assert not model.training  # the monitor leaves the modes to the loop
    assert len(mon.snapshots) == 1
    assert {h.calls for h in mon.last_health.values()} == {4}  # four training passes, no eval pass
    assert mon.snapshots[0].sites["bn>relu"].grad_elements == 4 * 16 * 100


def test_a_loop_that_calls_a_part_of_the_model_marks_its_batches_and_pauses() -> None:
    torch.manual_seed(0)
    outer = nn.Module()
    outer.net = net = StashCNN()  # the loop calls outer.net, never outer: its own hooks never run
    net.stash = {}
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    batches = teacher_batches(6)
    probe_during_backward = []
    with deadneuron.Monitor(outer, every=3, optimizer=opt) as mon:
        for i, (x, y) in enumerate(batches):
            mon.begin_batch()
            net.step = i
            loss = F.cross_entropy(net(x), y)
            mon.end_forward()  # the functional probe is off for the backward and the optimizer step
            probe_during_backward.append(torch._C._len_torch_function_stack())
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.pause()  # a train-mode pass that is no training: neither measured nor stored
            net.stash, stash = None, net.stash
            with torch.no_grad():
                net(-x)
            net.stash = stash
            mon.resume()
            mon.step()
    assert probe_during_backward == [0] * 6 and torch._C._len_torch_function_stack() == 0
    assert [sorted(s.sites) for s in mon.snapshots] == [["net.bn>relu", "net.conv1>relu"]] * 2  # no #k per batch
    for snap in mon.snapshots:
        figures = snap.sites["net.bn>relu"]
        assert figures.n == figures.grad_elements == 3 * 16 * 100  # the three training batches only
        assert set(figures.dead_channels) == dead_oracle(net.stash["bn>relu"], snap.first_step, snap.step)


def test_sampling_measures_only_every_kth_step_and_detaches_between() -> None:
    torch.manual_seed(0)
    model = StashCNN()
    model.stash = {}
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    gates = hook_count(model) + 2
    attached: list[int] = []
    with deadneuron.Monitor(model, every=6, sample_every=3, optimizer=opt) as mon:
        def step() -> None:
            mon.step()
            attached.append(hook_count(model))
        train(model, opt, teacher_batches(12), step)
    assert [s.sampled_steps for s in mon.snapshots] == [2, 2]
    assert {h.calls for h in mon.last_health.values()} == {2}
    # after step i, the hooks of step i + 1 are on only if it is sampled
    assert [n > gates for n in attached] == [(i + 1) % 3 == 0 for i in range(12)]
    for snap in mon.snapshots:
        expected = dead_oracle(model.stash["bn>relu"], snap.first_step, snap.step, sampled=3)
        assert set(snap.sites["bn>relu"].dead_channels) == expected


@pytest.mark.parametrize("kwargs", [{"every": 0}, {"every": 5, "sample_every": 6}, {"tau": 1.5}, {"every": 2.5}])
def test_bad_arguments_are_usage_errors(kwargs: dict) -> None:
    with pytest.raises(UsageError, match="Monitor"):
        deadneuron.Monitor(nn.ReLU(), **kwargs)


def test_step_outside_the_block_and_report_before_a_snapshot_are_usage_errors() -> None:
    mon = deadneuron.Monitor(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(UsageError, match="outside"):
        mon.step()
    with pytest.raises(UsageError, match="no snapshot"):
        mon.findings()


def test_every_none_snapshots_when_asked_and_start_step_keeps_a_resumed_run_s_steps() -> None:
    torch.manual_seed(0)
    model = StashCNN()
    model.stash = {}
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    batches = teacher_batches(7)
    with deadneuron.Monitor(model, every=None, start_step=100, optimizer=opt) as mon:
        for i, (x, y) in enumerate(batches):
            model.step = 100 + i
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            assert mon.step() is None
            if i == 3:
                mon.snapshot()
    assert [(s.first_step, s.step, s.sampled_steps) for s in mon.snapshots] == [(100, 104, 4), (104, 107, 3)]
    for snap in mon.snapshots:
        assert set(snap.sites["bn>relu"].dead_channels) == dead_oracle(model.stash["bn>relu"], snap.first_step, snap.step)
        assert snap.sites["bn>relu"].n == (snap.step - snap.first_step) * 16 * 100
