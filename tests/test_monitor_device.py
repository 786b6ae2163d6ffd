"""deadneuron.Monitor on an accelerator: no host synchronisation between snapshots, in the training
steps (forward hooks, gradient-flow hooks) and in mon.step(). Skipped where no CUDA device is present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deadneuron
from tests.monitor_models import StashCNN, teacher_batches

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("sample_every", [1, 2])
def test_training_steps_never_synchronise_between_snapshots(sample_every: int) -> None:
    torch.manual_seed(0)
    model = StashCNN().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    batches = [(x.cuda(), y.cuda()) for x, y in teacher_batches(9)]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with deadneuron.Monitor(model, every=4, sample_every=sample_every, optimizer=opt) as mon:
        step(*batches[0])  # first calls: kernels, first allocations
        mon.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x, y in batches[1:4]:  # steps 1-3; the snapshot comes with step 4
                step(x, y)
                mon.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for x, y in batches[4:]:
            step(x, y)
            mon.step()
    assert [s.step for s in mon.snapshots] == [4, 8, 9]
    site = mon.snapshots[0].sites["bn>relu"]
    assert site.grad_elements == (4 // sample_every) * 16 * 100 and 0 < site.grad_nonzero < 1
