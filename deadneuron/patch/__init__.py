"""deadneuron.patch: plan a fix, apply it, retrain, and prove by measurement whether it helped.

    from deadneuron.patch import apply_plan, plan_from_findings, plan_from_flags
    plan = plan_from_flags(activation="leaky")          # or plan_from_findings(report.findings)
    result = apply_plan(model, plan, example=batch)     # a patched deep copy + what changed
    result.model, result.record.lines()

For adapter models (the bundled ARC model) the same plan becomes a config change
(:func:`apply_to_config`, ``--select`` mapped onto the config's per-part keys by
:mod:`deadneuron.patch.parts`), and :mod:`deadneuron.patch.arms` trains the baseline and the patched
config on the same budget and seeds; :func:`compare` gives a verdict per metric (rule in
:mod:`deadneuron.patch.verify`). For a model of your own, :func:`verify_own` does the same with your
factory, data and ``train(model, steps=N, seed=S)`` function::

    result = verify_own(build, batches, train, plan, seeds=2, steps=200)
    result.verification   # the table's rows; deadneuron.render.patch_table renders it

A patched generic model is saved as its state_dict with the plan recorded beside it; :func:`load_patched`
rebuilds it from the factory. The ops themselves are `deadneuron.ops` (the rules suggest fixes in them).
"""

from deadneuron.patch.apply import PatchError, PatchResult, apply_plan, make_activation
from deadneuron.patch.config import apply_to_config
from deadneuron.patch.own import OwnRun, OwnVerification, verify_own
from deadneuron.patch.plan import (
    AddBatchNorm,
    InsertDropout,
    Op,
    Plan,
    ReinitDead,
    SetHyperParameter,
    SwapActivation,
    op_from_dict,
    plan_from_findings,
    plan_from_flags,
)
from deadneuron.patch.record import ApplyRecord, Change
from deadneuron.patch.saved import is_patched_state, load_patched, patched_state
from deadneuron.patch.verify import Verdict, Verification, compare, sample_from, verdict

__all__ = [
    "AddBatchNorm",
    "ApplyRecord",
    "Change",
    "InsertDropout",
    "Op",
    "OwnRun",
    "OwnVerification",
    "PatchError",
    "PatchResult",
    "Plan",
    "ReinitDead",
    "SetHyperParameter",
    "SwapActivation",
    "Verdict",
    "Verification",
    "apply_plan",
    "apply_to_config",
    "compare",
    "is_patched_state",
    "load_patched",
    "make_activation",
    "op_from_dict",
    "patched_state",
    "plan_from_findings",
    "plan_from_flags",
    "sample_from",
    "verdict",
    "verify_own",
]
