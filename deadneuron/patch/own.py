"""A/B verification on a model of your own: your factory, your data, your training function.

    from deadneuron.patch import plan_from_flags, verify_own
    result = verify_own(build, batches(), train, plan_from_flags(activation="leaky"), seeds=2, steps=200)
    print(verification_markdown(result.verification))

``train(model, steps=N, seed=S)`` trains ``model`` in place for N optimizer steps with its randomness
seeded by S; if it returns an ``nn.Module`` that model is used instead, a number (or a one-element tensor) is
its final training loss, a dict of numbers gives that loss as "loss" and its other entries as rows "train:
NAME"; anything else is refused. A run that raises stops the verification, naming the run. Both arms,
baseline and patched, run once per seed on the same budget:

- ``init="scratch"``: each run starts from ``model_factory()`` built under ``torch.manual_seed(seed)``,
  so both arms of a seed start from the same weights wherever the patch leaves them alone; the patched
  arm is the fresh model with the plan applied (its selectors resolved once, on the reference model).
- ``init="checkpoint"``: each run starts from a copy of ``start`` (your trained model); the patched arm
  is ``start`` with the plan applied, dead channels re-initialised where it asks.

Every trained model is audited on the same batches of ``data`` and scored with ``metric(model)`` (a
number, or a mapping of names to numbers; higher is better unless a name says loss or error), in eval
mode without gradients. The comparison is :func:`deadneuron.patch.compare`'s, row for row the table of
the bundled model.
"""

from __future__ import annotations

import copy
import numbers
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

import torch
from torch import nn

from deadneuron.errors import DeadneuronError, UsageError
from deadneuron.ops import ReinitDead, SetHyperParameter
from deadneuron.patch.apply import Forward, PatchResult, apply_plan, audit_batches
from deadneuron.patch.config import Init
from deadneuron.patch.estimate import Estimator
from deadneuron.patch.plan import Plan
from deadneuron.patch.record import ApplyRecord
from deadneuron.patch.verify import Sample, Verification, compare, sample_from

TrainFn = Callable[..., Any]
MetricFn = Callable[[nn.Module], Any]
Say = Callable[[str], None]
ARMS = ("baseline", "patched")


@dataclass(frozen=True)
class OwnRun:
    """One trained and audited run."""

    arm: str
    seed: int
    model: nn.Module
    report: Any  # deadneuron.Report on the audit batches
    loss: float | None
    metrics: Mapping[str, float]
    seconds: float = 0.0  # trained and audited in


@dataclass(frozen=True)
class OwnVerification:
    """The comparison, every run (patched models included), and what the plan changed."""

    verification: Verification
    runs: tuple[OwnRun, ...]
    record: ApplyRecord
    resolved: Plan  # the plan with its selectors pinned to what it changed (for load_patched)
    reference: Any = None  # the audit of ``start``, where one was given

    def kept(self) -> OwnRun:
        """The patched run of the first seed (what ``deadneuron patch --train`` writes)."""
        return next(r for r in self.runs if r.arm == "patched")


@dataclass(frozen=True)
class _Setup:
    sample: list[Any]
    seeds: list[int]
    forward: Forward | None
    reference_model: nn.Module
    reference_report: Any


def _quiet(_: str) -> None:
    return None


def verify_own(
    model_factory: Callable[[], nn.Module],
    data: Iterable[Any],
    train: TrainFn,
    plan: Plan,
    *,
    seeds: int | Sequence[int] = 2,
    steps: int,
    init: Init = "scratch",
    start: nn.Module | None = None,
    metric: MetricFn | None = None,
    batches: int | None = 8,
    forward: Forward | None = None,
    say: Say = _quiet,
) -> OwnVerification:
    """Train and audit both arms for every seed (``seeds``: a count from 0, or the seeds themselves) on
    ``steps`` steps each, and compare them. UsageError before any training where the plan cannot run:
    it changes nothing, it re-initialises channels from scratch, or it sets a hyper-parameter that
    ``train`` takes no keyword for."""
    setup = _setup(model_factory, data, plan, seeds=seeds, steps=steps, init=init, start=start, batches=batches,
                   forward=forward)  # fmt: skip
    hparams = train_keywords(train, plan)
    probe = apply_plan(setup.reference_model, plan, report=setup.reference_report, example=setup.sample[0],
                       forward=forward)  # fmt: skip
    if not probe.record.changes and not hparams["patched"]:
        why = "; ".join(probe.record.notes) or "every selected site already is what the plan asks"
        raise UsageError(f"the plan changes nothing in this model ({why}): nothing to verify")
    runs = _run_all(setup, model_factory, train, plan, probe, init=init, start=start, steps=steps, metric=metric,
                    hparams=hparams, say=say)  # fmt: skip
    samples = {arm: [_sample(r) for r in runs if r.arm == arm] for arm in ARMS}
    budget = {"steps": steps, "init": init, "audit": f"{len(setup.sample)} batches", "seconds": _seconds(runs)}
    reference = sample_from(setup.reference_report) if start is not None else None
    verification = compare(samples["baseline"], samples["patched"], seeds=setup.seeds, budget=budget, reference=reference)
    return OwnVerification(verification, tuple(runs), probe.record, probe.resolved,
                           setup.reference_report if start is not None else None)  # fmt: skip


def _setup(model_factory: Callable[[], nn.Module], data: Iterable[Any], plan: Plan, *, seeds: int | Sequence[int],
           steps: int, init: Init, start: nn.Module | None, batches: int | None, forward: Forward | None) -> _Setup:  # fmt: skip
    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise UsageError("seeds must be at least 1")
    if init not in ("scratch", "checkpoint"):
        raise UsageError(f"init takes scratch or checkpoint, not {init!r}")
    if init == "checkpoint" and start is None:
        raise UsageError("init='checkpoint' fine-tunes a trained model: pass it as start=")
    if init == "scratch" and plan.get(ReinitDead) is not None:
        raise UsageError("re-initialising dead channels needs init='checkpoint' (--init checkpoint): from scratch "
                         "every weight is fresh, so both arms would train the same thing")  # fmt: skip
    sample = list(islice(data, batches)) if batches is not None else list(data)
    if not sample:
        raise UsageError("the data yielded no batches: nothing to audit the runs on")
    reference = start if start is not None else _fresh(model_factory, seed_list[0])
    return _Setup(sample, seed_list, forward, reference, audit_batches(reference, sample, forward))


def _fresh(model_factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"the model factory returned {type(model).__name__}, not an nn.Module")
    return model


def train_keywords(train: TrainFn, plan: Plan) -> dict[str, dict[str, Any]]:
    """Keyword arguments for ``train`` per arm, from the plan's learning-rate op (``train`` must take
    ``lr`` with a default, the baseline's); epochs are the budget's business (``steps``)."""
    import inspect

    out: dict[str, dict[str, Any]] = {arm: {} for arm in ARMS}
    for op in plan.ops:
        if not isinstance(op, SetHyperParameter):
            continue
        if op.name == "epochs":
            raise UsageError("--epochs has no meaning for your train function: set the budget with --max-steps")
        param = inspect.signature(train).parameters.get("lr")
        if param is None or not isinstance(param.default, numbers.Real):
            raise UsageError(f"{op.describe()}: your train function takes no lr= keyword with a default (the "
                             "baseline's learning rate), so the learning rate cannot be changed for one arm")  # fmt: skip
        base = float(param.default)
        out["patched"]["lr"] = op.value if op.value is not None else base * float(op.scale or 1.0)
    return out


def _run_all(setup: _Setup, model_factory: Callable[[], nn.Module], train: TrainFn, plan: Plan, probe: PatchResult,
             *, init: Init, start: nn.Module | None, steps: int, metric: MetricFn | None,
             hparams: Mapping[str, Mapping[str, Any]], say: Say) -> list[OwnRun]:  # fmt: skip
    estimate = Estimator(runs=len(ARMS) * len(setup.seeds), steps=steps, say=say)
    runs: list[OwnRun] = []
    for i, seed in enumerate(setup.seeds):
        for j, arm in enumerate(ARMS):
            index = len(ARMS) * i + j
            say(f"[{index + 1}/{estimate.runs}] training the {arm} model, seed {seed}")
            estimate.run_started(index)
            try:
                model = _start_model(setup, model_factory, plan, probe, arm=arm, seed=seed, init=init, start=start)
                started = time.monotonic()
                model, loss, trained = _train(model, train, steps=steps, seed=seed, kwargs=hparams[arm],
                                              estimate=estimate)  # fmt: skip
                report = audit_batches(model, setup.sample, setup.forward)
                metrics = {**trained, **_score(metric, model)}
            except DeadneuronError as exc:  # its one line says which run failed, and what became of the others
                raise type(exc)(f"{exc} ({_failed_run(arm, seed, index, estimate.runs, done=len(runs))})") from exc
            except Exception as exc:
                exc.add_note(f"deadneuron patch: {_failed_run(arm, seed, index, estimate.runs, done=len(runs))}")
                raise
            runs.append(OwnRun(arm, seed, model, report, loss, metrics, time.monotonic() - started))
            estimate.run_finished(index)
    return runs


def _failed_run(arm: str, seed: int, index: int, total: int, *, done: int) -> str:
    """'in the baseline run of seed 1, run 3 of 4; the 2 runs trained before it are discarded and nothing is written'."""
    dropped = f"the {done} run{'s' if done != 1 else ''} trained before it {'are' if done != 1 else 'is'} discarded" \
        if done else "no run had finished"
    return f"in the {arm} run of seed {seed}, run {index + 1} of {total}; {dropped} and nothing is written"


def _start_model(setup: _Setup, model_factory: Callable[[], nn.Module], plan: Plan, probe: PatchResult, *,
                 arm: str, seed: int, init: Init, start: nn.Module | None) -> nn.Module:  # fmt: skip
    if init == "checkpoint":
        assert start is not None
        if arm == "baseline":
            return copy.deepcopy(start)
        result = apply_plan(start, plan, report=setup.reference_report, example=setup.sample[0],
                            forward=setup.forward, seed=seed)  # fmt: skip
        return result.model
    model = _fresh(model_factory, seed)
    if arm == "baseline":
        return model
    resolved = replace(probe.resolved, ops=tuple(op for op in probe.resolved.ops if not isinstance(op, SetHyperParameter)))
    return apply_plan(model, resolved, example=setup.sample[0], forward=setup.forward).model


def _train(model: nn.Module, train: TrainFn, *, steps: int, seed: int, kwargs: Mapping[str, Any],
           estimate: Estimator) -> tuple[nn.Module, float | None, dict[str, float]]:  # fmt: skip
    count = [0]

    def tick(module: nn.Module, args: Any) -> None:
        if module.training:
            count[0] += 1
            estimate.steps_done(count[0])

    handle = model.register_forward_pre_hook(tick)
    try:
        with torch.random.fork_rng(devices=[]):
            result = train(model, steps=steps, seed=seed, **kwargs)
    finally:
        handle.remove()
    if isinstance(result, nn.Module):
        return result, None, {}
    return (model, *train_result(result, name=getattr(train, "__name__", "train")))


def train_result(result: Any, *, name: str) -> tuple[float | None, dict[str, float]]:
    """What ``train`` returned, as (final training loss, metrics): None; a number or a one-element tensor (the
    loss); or a mapping of names to numbers (its "loss" the loss, the others rows named "train: NAME").
    UsageError for anything else, rather than dropping it silently."""
    if result is None:
        return None, {}
    if isinstance(result, torch.Tensor) and result.numel() == 1:
        result = result.detach().item()
    if isinstance(result, numbers.Real) and not isinstance(result, bool):
        return float(result), {}
    if isinstance(result, Mapping):
        values = metric_values(result, name=name, what="train function")
        loss = values.pop("loss", None)
        return loss, {f"train: {key}": value for key, value in values.items()}
    raise UsageError(f"the train function {name!r} returned {type(result).__name__}: return None, the trained model, "
                     "its final loss (a number) or a dict of numbers ({'loss': ..., 'accuracy': ...})")  # fmt: skip


def _score(metric: MetricFn | None, model: nn.Module) -> dict[str, float]:
    if metric is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            value = metric(model)
    finally:
        model.train(was_training)
    return metric_values(value, name=getattr(metric, "__name__", "metric"))


def metric_values(value: Any, *, name: str, what: str = "metric") -> dict[str, float]:
    """A metric's return value as ``{name: float}`` (one-element tensors read as numbers); UsageError for
    anything but numbers."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.detach().item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return {name if name != "<lambda>" else "metric": float(value)}
    if isinstance(value, Mapping):
        values = {k: v.detach().item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in value.items()}
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values.values()):
            return {str(k): float(v) for k, v in values.items()}
    raise UsageError(f"the {what} {name!r} returned {type(value).__name__}: return a number or a mapping of names "
                     "to numbers")  # fmt: skip


def _sample(run: OwnRun) -> Sample:
    return sample_from(run.report, loss=run.loss, metrics=run.metrics)


def _seconds(runs: Sequence[OwnRun]) -> float:
    return round(sum(r.seconds for r in runs), 1)


__all__ = ["MetricFn", "OwnRun", "OwnVerification", "TrainFn", "metric_values", "train_keywords", "train_result",
           "verify_own"]
