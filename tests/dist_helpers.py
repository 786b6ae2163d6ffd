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


def spawn(world: int, tmp: Path, *, deadline_s: float = 150.0,
          target: Callable[[int, int, str, str], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Run ``target(rank, world, init, out)`` (default `worker`) on ``world`` spawned processes; the
    results `worker` writes, in rank order (another target leaves its own files in ``tmp``: [])."""
    import torch.multiprocessing as mp

    init = f"file://{tmp / 'rendezvous'}"
    ctx = mp.start_processes(target or worker, args=(world, init, str(tmp)), nprocs=world, join=False,
                             start_method="spawn")  # fmt: skip
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=5):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.terminate()
            raise AssertionError(f"the {world} ranks did not finish within {deadline_s:.0f} s")
    if target is not None:
        return []
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


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
