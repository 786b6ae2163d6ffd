"""`deadneuron patch --model MODULE:FACTORY`: patch the model itself, audit it before and after, write
its state_dict with the plan recorded beside it (rebuild it with ``deadneuron.patch.load_patched``).

Without an adapter there is no training loop to run, so nothing is retrained: the comparison shows what
the surgery itself changed on the same batches (a swapped activation's flat fraction stays where it was
until the model is trained again; its exact zeros go by definition).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

from deadneuron._parse import check_count
from deadneuron.errors import UsageError

if TYPE_CHECKING:
    from deadneuron.cli._patch_context import Context, SubjectFlags
    from deadneuron.patch import Plan

DEFAULT_BATCHES = 8


def patch_generic(ctx: Context, flags: Plan, flagged: SubjectFlags, *, apply_suggestions: bool) -> None:
    from deadneuron.audit import audit
    from deadneuron.checkpoint import file_sha256
    from deadneuron.patch import apply_plan

    source_hash = file_sha256(ctx.checkpoint)
    subject, sample, before = load_subject(ctx, flagged)
    plan = plan_for(flags, before, subject, apply_suggestions)
    if not plan:
        raise UsageError("nothing to patch: the audit found nothing to fix and no flag asked for a change")
    result = apply_plan(subject.model, plan, report=before, example=sample[0])
    print_plan(ctx, plan, result.record)
    refuse_no_op(result.record)
    if ctx.dry_run:
        ctx.say("dry run: nothing written")
        return
    after = audit(result.model, sample, compile=False, meta={"source": f"{ctx.checkpoint} (patched)"})
    verification = _compare(before, after, len(sample))
    from deadneuron.cli._patch_context import extras, new_outputs
    from deadneuron.render.patch_table import verification_table

    ctx.console.print(verification_table(verification))
    outputs = new_outputs(ctx)
    _add_state(ctx, outputs, result, plan, source_hash, flagged.model_spec, subject.model_args, subject.patched_plans)
    extras(ctx, outputs, verification, [before], [after], ("before", "after"), changes=[op.describe() for op in plan.ops])
    outputs.write(ctx.say)
    ctx.say(f"rebuild {ctx.out} with deadneuron.load_patched({str(ctx.out)!r}, <your factory>), audit it with "
            f"`{audit_command(ctx.out, flagged)}`")


def audit_command(path: object, flagged: SubjectFlags) -> str:
    """The `deadneuron audit` command line for the written checkpoint, with the subject's own flags."""
    words = ["deadneuron", "audit", str(path), "--model", flagged.model_spec]
    words += [w for key, value in flagged.model_args.items() for w in ("--model-arg", f"{key}={value}")]
    words += ["--data", flagged.data] if flagged.data is not None else ["--input-shape", str(flagged.input_shape)]
    if flagged.batches is not None:
        words += ["--batches", str(flagged.batches)]
    words += [w for name in flagged.allow_globals for w in ("--allow-global", name)]
    words += ["--trust-code"] if flagged.trust_code else []
    return shlex.join(words)


def refuse_no_op(record: Any) -> None:
    """A plan that changed nothing in the model is refused (exit 2), with the notes saying why."""
    if not record.changes:
        why = "; ".join(record.notes) or "every selected site already is what the plan asks"
        raise UsageError(f"the plan changes nothing in this model ({why})")


def load_subject(ctx: Context, flagged: SubjectFlags) -> tuple[Any, list[Any], Any]:
    """The model with its weights, the batches the patch is checked on (--batches, default 8), and its audit."""
    from deadneuron.audit import audit
    from deadneuron.cli._subject import build_subject

    check_count(flagged.batches, "--batches")
    subject = build_subject(ctx.checkpoint, model_spec=flagged.model_spec, model_args=flagged.model_args,
                            input_shape=flagged.input_shape, data_spec=flagged.data, batches=flagged.batches,
                            allow_globals=flagged.allow_globals, trust_code=flagged.trust_code)  # fmt: skip
    assert subject.data is not None
    sample = list(islice(subject.data, flagged.batches or DEFAULT_BATCHES))
    if not sample:
        raise UsageError("the data yielded no batches: nothing to check the patch on")
    for note in subject.notes:
        ctx.say(f"note: {note}")
    for warning in subject.warnings:
        ctx.say(f"warning: {warning}")
    # Eager statistics: a few batches do not repay torch.compile's start-up (tens of seconds cold).
    before = audit(subject.model, sample, compile=False, meta={"source": str(ctx.checkpoint)})
    return subject, sample, before


def plan_for(flags: Plan, report: Any, subject: Any, suggestions: bool) -> Plan:
    """The flags' plan, over the audit's suggested fixes with --apply-suggestions."""
    if not suggestions:
        return flags
    from deadneuron.patch import plan_from_findings
    from deadneuron.rules import attach_findings

    found = attach_findings(report, subject.checkpoint, model=subject.model)
    return plan_from_findings(found.findings).overridden_by(flags)


def print_plan(ctx: Context, plan: Plan, record: Any) -> None:
    ctx.say("plan:")
    for line in plan.describe():
        ctx.say(f"  {line}")
    ctx.say("changes:")
    for line in record.lines() or ["(none)"]:
        ctx.say(f"  {line}")


def _compare(before: Any, after: Any, batches: int) -> Any:
    from deadneuron.patch import compare, sample_from

    budget = {"init": "the same weights, not retrained", "audit": f"{batches} batches"}
    return compare([sample_from(before)], [sample_from(after)], seeds=(0,), budget=budget, labels=("before", "after"))


def _add_state(ctx: Context, outputs: Any, result: Any, plan: Plan, source_hash: str, model_spec: str,
               model_args: Mapping[str, Any], earlier_plans: Sequence[Mapping[str, Any]]) -> None:  # fmt: skip
    from deadneuron.patch import patched_state

    state = patched_state(result.model, resolved=result.resolved, requested=plan, record=result.record.to_dict(),
                          source=str(ctx.checkpoint), source_sha256=source_hash, model_spec=model_spec,
                          model_args=model_args, earlier_plans=earlier_plans)  # fmt: skip
    outputs.checkpoint(ctx.out, state)


__all__ = ["load_subject", "patch_generic", "plan_for", "print_plan", "refuse_no_op"]
