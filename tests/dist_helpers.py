"""Shared by the multi-process tests: the planted CNN, the work each spawned rank does, and a comparison
of two reports' figures (counts exactly, moments to a relative tolerance)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import deadneuron
from deadneuron.distributed import reduce_recorder
from tests import zoo

PLANTED = {0: [2], 1: [0, 5], 3: [1, 3, 7]}  # BatchNorm layer -> channels killed by a large negative bias
# Floats that are ratios of counts: equal exactly when the counts are.
COUNT_RATIOS = frozenset({"sparsity", "flat_fraction", "channel_zero", "channel_flat"})


def planted_model() -> nn.Module:
    torch.manual_seed(0)
    model = zoo.SeedEncoder(zoo.Tap())
    zoo.warm_batchnorm(model, zoo.image_batches(2, (8, 3, 8, 8), seed=5))
    with torch.no_grad():
        for layer, channels in PLANTED.items():
            model.bn_layers[layer].bias[channels] = -50.0
    return model.eval()


def batches() -> list[torch.Tensor]:
    """Five batches, the last one smaller: the ranks get 3 and 2 of them."""
    return [*zoo.image_batches(4, (4, 3, 8, 8), seed=1), *zoo.image_batches(1, (3, 3, 8, 8), seed=2)]


class Branchy(nn.Module):
    """Runs ``up`` on inputs that sum above zero, ``down`` on the others: which sites run depends on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.ReLU(), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x) if bool(x.sum() > 0) else self.down(x)


def _error(run: Callable[[], Any]) -> list[str]:
    try:
        run()
    except deadneuron.DeadneuronError as err:
        return [type(err).__name__, str(err)]
    return ["none", ""]


def _train(rank: int, out: Path) -> list[dict[str, Any]]:
    """Three DDP training steps with a Recorder on the wrapped model; its sites merged over the ranks.
    The model stores its own activations (the oracle's input) beside the results."""
    torch.manual_seed(0)
    tap = zoo.Tap()
    model = zoo.GeluMLP(tap, nn.ReLU(), "relu")
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(10 + rank)
    tap.on = True
    with deadneuron.Recorder(ddp, compile=False) as rec:
        for _ in range(3):
            rec.start_batch()
            loss = ddp(torch.randn(8, 12, generator=gen)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results = reduce_recorder(rec)
    np.savez(out / f"tap{rank}.npz", z=np.concatenate(tap.z["act"]), a=np.concatenate(tap.a["act"]))
    return [{"name": r.name, "n": r.summary.n, "zero": r.summary.zero, "flat": r.summary.flat,
             "mean": r.summary.mean, "std": r.summary.std, "min": r.summary.min, "max": r.summary.max}
            for r in results]  # fmt: skip


def _sharded(rank: int, world: int) -> dict[str, Any]:
    """The planted CNN plain, under FSDP (nested units, then the root) and under FSDP2 (``fully_shard``),
    on four batches: FSDP's forward is a collective, so every rank must run as many."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    mine, cpu, quiet = batches()[:4][rank::world], torch.device("cpu"), {"progress": False}
    nested = planted_model()
    nested.bn_layers[1] = FullyShardedDataParallel(nested.bn_layers[1], device_id=cpu)
    fsdp1 = FullyShardedDataParallel(nested, device_id=cpu)
    fsdp2 = planted_model()
    fully_shard(fsdp2.bn_layers[1])
    fully_shard(fsdp2)
    before = [_local(p) for m in (fsdp1, fsdp2) for p in m.parameters()]
    out = {
        "plain": deadneuron.audit(planted_model(), mine, **quiet).to_dict(),
        "fsdp1": deadneuron.audit(fsdp1, mine, **quiet).to_dict(),
        "fsdp2": deadneuron.audit(fsdp2, mine, **quiet).to_dict(),
    }
    after = [_local(p) for m in (fsdp1, fsdp2) for p in m.parameters()]  # still sharded, unchanged
    out["left_as_found"] = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    return out


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (FSDP2: the DTensor's local part; FSDP1: its flat parameter)."""
    return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()


def _cases(rank: int, world: int, out: Path) -> dict[str, Any]:
    model, data = planted_model(), batches()
    mine = data[rank::world]
    quiet = {"progress": False}
    return {
        "eager": deadneuron.audit(model, mine, compile=False, histograms=True, **quiet).to_dict(),
        "native": deadneuron.audit(model, mine, **quiet).to_dict(),
        "empty": deadneuron.audit(model, data if rank == 0 else [], compile=False, **quiet).to_dict(),
        "ddp": deadneuron.audit(DistributedDataParallel(model), mine, compile=False, **quiet).to_dict(),
        "branches": _error(lambda: deadneuron.audit(Branchy(), [torch.ones(2, 4) * (1 - 2 * rank)], **quiet)),
        "failing": _error(lambda: deadneuron.audit(model, mine if rank == 0 else [torch.randn(2, 5, 8, 8)], **quiet)),
        "training": _train(rank, out),
        "sharded": _sharded(rank, world),
    }


def worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank of the spawned group (gloo, CPU): every case, its results to ``out/rank{rank}.json``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = _cases(rank, world, Path(out))
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def spawn(
    world: int, tmp: Path, *, deadline_s: float = 150.0, target: Callable[[int, int, str, str], None] = worker
) -> list[dict[str, Any]]:
    """Run ``target`` (`worker`) on ``world`` spawned processes; the ``rank{r}.json`` each wrote, in rank
    order (a target that writes none: [])."""
    import torch.multiprocessing as mp

    init = f"file://{tmp / 'rendezvous'}"
    ctx = mp.start_processes(target, args=(world, init, str(tmp)), nprocs=world, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=5):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.terminate()
            raise AssertionError(f"the {world} ranks did not finish within {deadline_s:.0f} s")
    files = [tmp / f"rank{r}.json" for r in range(world)]
    return [json.loads(f.read_text()) for f in files] if any(f.exists() for f in files) else []


def same_figures(a: Any, b: Any, *, rel: float, absolute: float = 0.0, path: str = "") -> None:
    """``a`` and ``b`` (report dicts, meta left out by the caller) equal: integers, strings and ratios of
    counts exactly; other floats (moments, slot and metric figures) to ``rel`` relative (or ``absolute``)."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            same_figures(a[k], b[k], rel=rel, absolute=absolute, path=f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: lengths {len(a)} and {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_figures(x, y, rel=rel, absolute=absolute, path=f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and path.rsplit(".", 1)[-1].split("[")[0] not in COUNT_RATIOS:
        assert math.isclose(a, b, rel_tol=rel, abs_tol=absolute), f"{path}: {a} != {b}"
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} != {b!r}"


def figures(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "meta"}


class FlakyAdapter:
    """The smallest adapter that trains and audits, except that the run of seed 1 raises."""

    name = "flaky"

    def build(self, config: Any) -> nn.Module:
        torch.manual_seed(int(config["SEED"]))
        return nn.Sequential(nn.Linear(4, 3), nn.ReLU())

    def load(self, checkpoint: Any) -> nn.Module:
        model = self.build(checkpoint["config"])
        model.load_state_dict(checkpoint["state_dict"])
        return model

    def batches(self, split: str, config: Any) -> list[torch.Tensor]:
        return [torch.randn(2, 4, generator=torch.Generator().manual_seed(3))]

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return model(batch)

    def slot_masks(self, outputs: Any, batch: Any) -> None:
        return None

    def metric_sums(self, outputs: Any, batch: Any) -> dict[str, torch.Tensor]:
        return {}

    def summarize_metrics(self, sums: Any) -> dict[str, float]:
        return {}

    def train(self, config: Any, *, init: Any = None, max_steps: int | None = None) -> dict[str, Any]:
        if config["SEED"] == 1:
            raise ValueError("boom on seed 1")
        return {"config": dict(config), "state_dict": self.build(config).state_dict()}


def flaky_worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank of `deadneuron.patch.parallel.run_jobs` over ranks, rank 1's run failing: what each raised."""
    from deadneuron.patch.parallel import Job, run_jobs
    from deadneuron.patch.retrain import Budget, Options

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    jobs = [Job("baseline", seed, {"SEED": seed}) for seed in (0, 1)]
    try:
        run_jobs(FlakyAdapter(), jobs, Budget(1), Options(threads=1, rank=rank, world_size=world))  # type: ignore[arg-type]
        raised = ["none", ""]
    except Exception as exc:
        raised = [type(exc).__name__, str(exc)]
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(raised))
