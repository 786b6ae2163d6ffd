"""Both arms of a fix, baseline and patched config, trained on the same budget for every seed (one by one, or
spread over worker processes by `deadneuron.patch.parallel`), audited and compared metric by metric."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from deadneuron.adapters import Adapter
from deadneuron.patch.estimate import Estimator
from deadneuron.patch.parallel import Job, run_jobs
from deadneuron.patch.retrain import Budget, Options, Run, final_loss
from deadneuron.patch.verify import Sample, Verification, compare, sample_from


def verify_arms(
    adapter: Adapter,
    baseline_config: Mapping[str, Any],
    patched_config: Mapping[str, Any],
    budget: Budget,
    options: Options,
    *,
    seeds: Sequence[int],
    reference: Any = None,
) -> tuple[Verification, list[Run]]:
    """Train and audit both arms for every seed; the comparison and the runs (patched runs included)."""
    started = time.monotonic()
    jobs = []
    for seed in seeds:
        for arm, config in (("baseline", baseline_config), ("patched", patched_config)):
            init = None
            if budget.init == "checkpoint":
                init = options.patched_init if arm == "patched" else options.init_checkpoint
            jobs.append(Job(arm, seed, config, init))
    estimate = Estimator(runs=len(jobs), steps=budget.steps, say=options.say)
    runs = run_jobs(adapter, jobs, budget, options, estimate=estimate)  # one by one, or on options.workers processes
    samples = {arm: [_sample(r) for r in runs if r.arm == arm] for arm in ("baseline", "patched")}
    spent = {**budget.to_dict(), "seconds": round(time.monotonic() - started, 1)}
    ref = _sample_of(reference) if reference is not None else None
    return compare(samples["baseline"], samples["patched"], seeds=seeds, budget=spent, reference=ref), runs


def _sample(run: Run) -> Sample:
    return sample_from(run.report, loss=final_loss(run.checkpoint))


def _sample_of(reference: Any) -> Sample:
    report, checkpoint = reference
    return sample_from(report, loss=final_loss(checkpoint))


__all__ = ["verify_arms"]
