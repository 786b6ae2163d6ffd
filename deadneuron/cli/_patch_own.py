"""`deadneuron patch --model M:build --data M:batches --train M:train`: A/B verification on your own model.

The same path as :func:`deadneuron.patch.verify_own`: both arms (the input model's architecture and the
patched one) are trained by your ``train(model, steps=N, seed=S)`` for every seed on the same budget,
audited on the same batches of --data, scored with --metric, and compared in the bundled model's table.
The patched run of the first seed is written to --out as a patched state (``deadneuron.load_patched``
rebuilds it from your factory) with the comparison inside; --markdown and --figure beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deadneuron.errors import AuditRuntimeError, DeadneuronError, UsageError

if TYPE_CHECKING:
    from torch import nn

    from deadneuron.cli._patch_context import Context, SubjectFlags
    from deadneuron.patch import Plan
    from deadneuron.patch.config import Init


def patch_own(ctx: Context, flags: Plan, flagged: SubjectFlags, *, apply_suggestions: bool, train_spec: str,
              metric_spec: str | None, seeds: int, steps: int, init: Init) -> None:  # fmt: skip
    from deadneuron.checkpoint import file_sha256
    from deadneuron.cli._patch_generic import load_subject, plan_for, print_plan, refuse_no_op
    from deadneuron.cli._subject import import_object
    from deadneuron.patch import apply_plan
    from deadneuron.patch.own import train_keywords, verify_own

    train = _user_function(import_object(train_spec, option="--train"), option="--train", spec=train_spec)
    metric = _metric(metric_spec)
    source_hash = file_sha256(ctx.checkpoint)
    subject, sample, before = load_subject(ctx, flagged)
    plan = _without_scratch_reinit(plan_for(flags, before, subject, apply_suggestions), init)
    if not plan:
        raise UsageError("nothing to patch: the audit found nothing to fix and no flag asked for a change")
    keywords = train_keywords(train, plan)  # a learning-rate change train cannot take is refused here
    probe = apply_plan(subject.model, plan, report=before, example=sample[0], seed=0)
    print_plan(ctx, plan, probe.record)
    if keywords["patched"]:
        ctx.say(f"  train(..., {', '.join(f'{k}={v:g}' for k, v in keywords['patched'].items())}) for the patched arm")
    else:
        refuse_no_op(probe.record)
    ctx.say(f"runs: 2 arms x {seeds} seed(s) = {2 * seeds} runs of {steps} steps each (--init {init}, seeds "
            f"{', '.join(map(str, range(seeds)))}), each audited on {len(sample)} batches; output {ctx.out}")  # fmt: skip
    if ctx.dry_run:
        ctx.say("dry run: nothing trained, nothing written")
        return
    factory = _fresh_factory(subject, flagged.model_spec)
    result = verify_own(factory, sample, train, plan, seeds=seeds, steps=steps, init=init,
                        start=subject.model, metric=metric, batches=None, say=ctx.say)  # fmt: skip
    from deadneuron.cli._patch_context import extras, new_outputs
    from deadneuron.render.patch_table import verification_table

    ctx.console.print(verification_table(result.verification))
    outputs = new_outputs(ctx)
    outputs.checkpoint(ctx.out, _state(ctx, result, plan, source_hash, flagged.model_spec, subject))
    before_reports = [r.report for r in result.runs if r.arm == "baseline"]
    after_reports = [r.report for r in result.runs if r.arm == "patched"]
    extras(ctx, outputs, result.verification, before_reports, after_reports, ("baseline", "patched"),
           changes=[op.describe() for op in plan.ops])
    outputs.write(ctx.say)
    ctx.say(f"{ctx.out}: the patched model trained with seed {result.kept().seed}; rebuild it with "
            f"deadneuron.load_patched({str(ctx.out)!r}, <your factory>)")  # fmt: skip


def _without_scratch_reinit(plan: Plan, init: str) -> Plan:
    """A suggested re-initialisation dropped, with a note, where every run starts from scratch (the flag
    itself was refused before any work)."""
    from deadneuron.patch import Plan as PlanType
    from deadneuron.patch import ReinitDead

    if init != "scratch" or plan.get(ReinitDead) is None:
        return plan
    note = "dropped 're-initialise dead channels': with --init scratch every weight is fresh (use --init checkpoint)"
    return PlanType(tuple(op for op in plan.ops if not isinstance(op, ReinitDead)), (*plan.notes, note))


def _user_function(fn: Any, *, option: str, spec: str) -> Callable[..., Any]:
    """``fn`` wrapped so that what it raises is one line naming it (exit 6), not a traceback."""
    if not callable(fn):
        raise UsageError(f"{option} {spec!r} is not callable")

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DeadneuronError, KeyboardInterrupt):
            raise
        except Exception as exc:
            line = (str(exc).strip().splitlines() or [""])[0]
            raise AuditRuntimeError(f"{option} {spec!r} raised {type(exc).__name__}: {line}") from exc

    call.__name__ = getattr(fn, "__name__", "metric")
    call.__signature__ = _signature(fn)  # type: ignore[attr-defined]
    return call


def _signature(fn: Any) -> Any:
    import inspect

    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return inspect.Signature()


def _metric(spec: str | None) -> Callable[..., Any] | None:
    if spec is None:
        return None
    from deadneuron.cli._subject import import_object

    return _user_function(import_object(spec, option="--metric"), option="--metric", spec=spec)


def _fresh_factory(subject: Any, model_spec: str) -> Callable[[], nn.Module]:
    """The input's architecture, freshly initialised: the factory's model with the input's recorded plans."""
    from deadneuron.cli._subject import call_factory, import_object
    from deadneuron.patch.saved import rebuild_architecture

    factory = import_object(model_spec, option="--model")

    def build() -> nn.Module:
        model = call_factory(factory, subject.model_args, option="--model", spec=model_spec)
        return rebuild_architecture(model, subject.patched_plans, where=str(subject.source))

    return build


def _state(ctx: Context, result: Any, plan: Plan, source_hash: str, model_spec: str, subject: Any) -> dict[str, Any]:
    from deadneuron.patch import patched_state

    kept = result.kept()
    budget = dict(result.verification.budget)
    extra = {"verification": result.verification.to_dict(), "budget": budget, "seed": kept.seed}
    return patched_state(kept.model, resolved=result.resolved, requested=plan, record=result.record.to_dict(),
                         source=str(ctx.checkpoint), source_sha256=source_hash, model_spec=model_spec,
                         model_args=subject.model_args, earlier_plans=subject.patched_plans, extra=extra)  # fmt: skip


__all__ = ["patch_own"]
