"""Retraining adapter models: one run of a config, audited (both arms over several seeds:
`deadneuron.patch.arms`).

``--init scratch`` (the default, and what the user was told to do: set the old checkpoint aside and train
fresh) builds every run from the config; ``--init checkpoint`` fine-tunes the input checkpoint's weights
for ``steps`` more steps (its optimizer state kept, except where dead channels were re-initialised).
Both arms of a seed get the same budget: the same step cap, the same seed, the same data.

Nothing is written here: the caller saves the checkpoint it keeps, so Ctrl-C leaves no file behind.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deadneuron._parse import check_count
from deadneuron.adapters import Adapter, heldout_batches
from deadneuron.audit import audit
from deadneuron.errors import UsageError
from deadneuron.measure import ProgressBar
from deadneuron.patch.config import Init
from deadneuron.patch.estimate import Estimator

Say = Callable[[str], None]
SEED_KEYS = ("SEED", "seed")


@dataclass(frozen=True)
class Budget:
    """What each run may spend: ``steps`` optimizer steps (None: the config's own epoch/step limits)."""

    steps: int | None
    init: Init = "scratch"
    audit_grids: int | None = None  # held-out grids audited (None: all)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "init": self.init, "audit": self.audit_grids and f"{self.audit_grids} grids"}


@dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    checkpoint: Mapping[str, Any]
    report: Any  # deadneuron.Report of the trained model on the held-out grids


@dataclass
class Options:
    """How to run: progress bars, a line printer, the starting weights for ``--init checkpoint``."""

    progress: bool = False  # the adapter's training bar
    audit_progress: ProgressBar | None = None  # the audits' bar (`deadneuron.render.progress.audit_bar`)
    say: Say = field(default=lambda _: None)
    init_checkpoint: Mapping[str, Any] | None = None
    patched_init: Mapping[str, Any] | None = None  # init for the patched arm (re-initialised channels)
    workers: int = 1  # processes the runs of `verify` spread over (`deadneuron.patch.parallel`)
    threads: int | None = None  # torch threads per run (None: as this process has; 1 in a worker)
    rank: int = 0  # under torchrun: this process's rank among world_size, each running its share of the runs
    world_size: int = 1


def seeded(config: Mapping[str, Any], seed: int) -> dict[str, Any]:
    key = next((k for k in SEED_KEYS if k in config), None)
    if key is None:
        return dict(config)
    return {**config, key: seed}


def seeds_for(config: Mapping[str, Any], count: int) -> list[int]:
    """``count`` seeds starting at the config's own (so seed 1 of the baseline arm is the input run)."""
    check_count(count, "--seeds")
    key = next((k for k in SEED_KEYS if k in config), None)
    if key is None and count > 1:
        raise UsageError("the config has no SEED key, so runs cannot differ by seed: use --seeds 1")
    start = int(config[key]) if key is not None else 0
    return [start + i for i in range(count)]


def train_run(adapter: Adapter, config: Mapping[str, Any], budget: Budget, options: Options,
              *, init: Mapping[str, Any] | None, estimate: Estimator | None = None) -> dict[str, Any]:  # fmt: skip
    """One training run through the adapter: fresh (``init`` None) or continued from ``init``; the
    adapter's per-epoch callbacks feed ``estimate`` the step count."""
    max_steps = budget.steps
    if init is not None:
        init = fit_init(adapter, config, init)
        if max_steps is not None:
            max_steps += int(init.get("step", 0))  # the trainer caps the *total* step count
    kwargs: dict[str, Any] = {"init": init, "max_steps": max_steps}
    params = inspect.signature(adapter.train).parameters
    if "progress" in params:
        kwargs["progress"] = options.progress
    if estimate is not None and "callbacks" in params:
        kwargs["callbacks"] = [lambda record: _tick(estimate, record)]
    return adapter.train(config, **kwargs)


def _tick(estimate: Estimator, record: Any) -> None:
    step = record.get("step") if isinstance(record, Mapping) else None
    if isinstance(step, int):
        estimate.steps_done(step)


def fit_init(adapter: Adapter, config: Mapping[str, Any], init: Mapping[str, Any]) -> dict[str, Any]:
    """``init`` made to fit the model ``config`` builds: weights the new model lacks (a PReLU slope) come
    from a fresh model, and the optimizer state is dropped when the parameter list changed. The seed
    of the run, not the stored random state, decides the run's randomness."""
    fresh = adapter.build(config).state_dict()
    state = dict(init.get("state_dict", {}))
    out = {k: v for k, v in init.items() if k != "rng_state"}
    if set(fresh) != set(state):
        out["state_dict"] = {k: state.get(k, v) for k, v in fresh.items()}
        out["optimizer_state"] = None
    return out


def audit_run(adapter: Adapter, checkpoint: Mapping[str, Any], budget: Budget, *, progress: ProgressBar | None) -> Any:
    """The audit of the checkpoint's model on the held-out data (``budget.audit_grids`` of it where set)."""
    model = adapter.load(checkpoint)
    config = checkpoint.get("config", {})
    batches = heldout_batches(adapter, config, max_grids=budget.audit_grids)
    return audit(model, batches, adapter=adapter, progress=progress, distributed=False)  # a run of this rank alone


def final_loss(checkpoint: Mapping[str, Any]) -> float | None:
    history = checkpoint.get("history") or []
    for record in reversed(history):
        if isinstance(record, Mapping) and isinstance(record.get("loss"), (int, float)):
            return float(record["loss"])
    return None


def retrain(adapter: Adapter, config: Mapping[str, Any], budget: Budget, options: Options, *, seed: int) -> Run:
    """The patched config, trained once (no verification) and audited."""
    init = options.patched_init if budget.init == "checkpoint" else None
    options.say(f"training the patched config, seed {seed}")
    estimate = Estimator(runs=1, steps=budget.steps, say=options.say)
    estimate.run_started(0)
    ckpt = train_run(adapter, seeded(config, seed), budget, options, init=init, estimate=estimate)
    return Run("patched", seed, ckpt, audit_run(adapter, ckpt, budget, progress=options.audit_progress))


__all__ = ["Budget", "Options", "Run", "audit_run", "final_loss", "fit_init", "retrain", "seeded", "seeds_for",
           "train_run"]  # fmt: skip
