"""`deadneuron patch` for a deadneuron checkpoint: change the config, retrain both arms, compare, write.

The plan becomes config changes through the keys' measured parts (:mod:`deadneuron.patch.parts`); the
sites that will change are listed by name before anything is trained, and a plan whose config change
reaches sites it did not select, or changes nothing, is refused then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from deadneuron.errors import UsageError

if TYPE_CHECKING:
    from deadneuron.adapters import Adapter
    from deadneuron.cli._patch_context import Context
    from deadneuron.patch import Plan
    from deadneuron.patch.config import Init
    from deadneuron.patch.retrain import Budget, Options, Run


def patch_adapter(ctx: Context, flags: Plan, *, apply_suggestions: bool, seeds: int, init: Init, max_steps: int | None,
                  verify: bool, audit_grids: int | None, allow_globals: tuple[str, ...] | list[str],
                  workers: int | None = None, threads: int | None = None, ranks: tuple[int, int] = (0, 1)) -> None:  # fmt: skip
    from deadneuron.adapters import get_adapter, is_deadneuron_checkpoint
    from deadneuron.checkpoint import file_sha256, load_checkpoint
    from deadneuron.patch.parts import full_config
    from deadneuron.patch.retrain import Budget, Options, seeds_for

    source_hash = file_sha256(ctx.checkpoint)
    ckpt = load_checkpoint(ctx.checkpoint, allow_globals=allow_globals)
    if not is_deadneuron_checkpoint(ckpt):
        raise UsageError(f"{ctx.checkpoint} holds weights but no config to retrain: pass --model MODULE:FACTORY "
                         "(and --data or --input-shape) to patch the model itself")  # fmt: skip
    ckpt = cast(Mapping[str, Any], ckpt)
    adapter = get_adapter(str(ckpt.get("adapter")))
    config = full_config(adapter, ckpt.get("config") or {})
    budget = Budget(_steps(ckpt, max_steps), init, audit_grids)
    seed_list = seeds_for(config, seeds)
    if not verify and seeds > 1:
        raise UsageError("--seeds needs verification: drop --no-verify (only the patched config is trained without it)")
    needs_input_audit = apply_suggestions or (verify and not ctx.dry_run) or (flags.get(_reinit_type()) and init == "checkpoint")
    input_report = _audit_input(ctx, adapter, ckpt, budget) if needs_input_audit else None
    plan = _plan(flags, input_report, ckpt, adapter, apply_suggestions)
    patched_config, record, changes = _resolve(adapter, config, plan, init, input_report)
    _print_plan(ctx, plan, record, changes, budget, seed_list, verify)
    _refuse_bad_plans(plan, record, changes)
    if ctx.dry_run:
        ctx.say("dry run: nothing trained, nothing written")
        return
    from deadneuron.patch.parallel import available_cores
    from deadneuron.render.progress import audit_bar

    rank, world = ranks
    if not verify and not ctx.primary:
        return  # one run, the patched config: rank 0 trains and writes it
    # under torchrun each rank runs its share, on one process unless --workers says more
    options = Options(progress=ctx.progress, audit_progress=audit_bar if ctx.progress else None, say=ctx.say,
                      init_checkpoint=ckpt if init == "checkpoint" else None,
                      workers=workers or (available_cores() if world == 1 else 1), threads=threads or 1, rank=rank,
                      world_size=world)  # fmt: skip
    if init == "checkpoint":
        options.patched_init = _patched_init(ctx, adapter, ckpt, plan, input_report)
    verification, runs = _train(adapter, config, patched_config, budget, options, seed_list, verify, (input_report, ckpt))
    if not ctx.primary:  # every rank holds every run now; rank 0 shows and writes them
        return
    if verification is not None:
        _show(ctx, verification)
    from deadneuron.cli._patch_context import new_outputs

    outputs = new_outputs(ctx)
    kept = next(r for r in runs if r.arm == "patched")
    _add_checkpoint(ctx, outputs, kept, plan, record, changes.model, source_hash, verification, budget)
    if verification is not None:
        _extras(ctx, outputs, verification, runs, plan)
    outputs.write(ctx.say)


@dataclass(frozen=True)
class _Changes:
    """What the config change does to the model, measured by building both: module lines and sites."""

    model: list[str]
    sites: list[str]
    outside: list[str]  # changed sites the plan did not select
    shared: list[str]  # changed sites no --select glob names, changed with the others by one shared key


def _resolve(adapter: Adapter, config: Mapping[str, Any], plan: Plan, init: Init,
             report: Any) -> tuple[dict[str, Any], Any, _Changes]:  # fmt: skip
    from deadneuron.patch import AddBatchNorm, SwapActivation, apply_to_config
    from deadneuron.patch.parts import changed_sites, config_map, model_changes, outside, site_infos
    from deadneuron.select import matches

    sites = site_infos(adapter, config, report)
    parts = config_map(adapter, config, sites)
    patched, record = apply_to_config(config, plan, init=init, parts=parts)
    changed = changed_sites(adapter, config, patched, sites)
    extra = outside(changed, record.targets) if record.targets else []
    globs = [p for op in plan.ops for p in getattr(op, "sites", ()) if isinstance(op, (SwapActivation, AddBatchNorm))]
    named = {n for n, i in sites.items() if globs and matches((n, i.module, i.kind, f"kind:{i.kind}"), globs)}
    shared = [n for n in changed if globs and n not in named and n not in extra]
    return patched, record, _Changes(model_changes(adapter, config, patched), changed, extra, shared)


def _refuse_bad_plans(plan: Plan, record: Any, changes: _Changes) -> None:
    """Before any training: parts of the plan that cannot apply, reaches beyond the selection, no-ops."""
    from deadneuron.patch import PatchError

    if record.not_patched:
        raise PatchError("could not apply the whole plan: " + "; ".join(record.not_patched))
    if changes.outside:
        raise PatchError(f"the config change also reaches {_few(changes.outside)}, which the selection leaves out "
                         "(a key such as NEGATIVE_SLOPE is shared by every part): select them too, or keep their "
                         "setting")  # fmt: skip
    if not record.changes and not plan.get(_reinit_type()):
        why = "; ".join(record.notes) or "every setting it asks for is already in the config"
        raise UsageError(f"the plan changes nothing in this checkpoint's config ({why}): nothing to train")


def _few(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _reinit_type() -> type:
    from deadneuron.patch import ReinitDead

    return ReinitDead


def _steps(ckpt: Mapping[str, Any], max_steps: int | None) -> int:
    if max_steps is not None:
        return max_steps
    step = ckpt.get("step")
    if isinstance(step, int) and step > 0:
        return step
    raise UsageError("the checkpoint does not record how many steps it was trained: pass --max-steps N")


def _audit_input(ctx: Context, adapter: Adapter, ckpt: Mapping[str, Any], budget: Budget) -> Any:
    from deadneuron.patch.retrain import audit_run
    from deadneuron.render.progress import audit_bar

    ctx.say(f"auditing the input checkpoint {ctx.checkpoint}")
    return audit_run(adapter, ckpt, budget, progress=audit_bar if ctx.progress else None)


def _plan(flags: Plan, report: Any, ckpt: Mapping[str, Any], adapter: Adapter, suggestions: bool) -> Plan:
    if not suggestions:
        return flags
    from deadneuron.patch import plan_from_findings
    from deadneuron.rules import attach_findings

    report = attach_findings(report, ckpt, model=adapter.load(ckpt))
    return plan_from_findings(report.findings).overridden_by(flags)


def _print_plan(ctx: Context, plan: Plan, record: Any, changes: _Changes, budget: Budget, seeds: list[int],
                verify: bool) -> None:  # fmt: skip
    ctx.say("plan:")
    for line in plan.describe() or ["(empty)"]:
        ctx.say(f"  {line}")
    for note in plan.notes:
        ctx.say(f"  note: {note}")
    ctx.say("config changes:")
    for line in record.lines() or ["(none)"]:
        ctx.say(f"  {line}")
    for line in changes.model:
        ctx.say(f"  model: {line}")
    if changes.sites:
        ctx.say(f"sites that will change ({len(changes.sites)}): {', '.join(changes.sites)}")
    if changes.shared:
        ctx.say(f"  note: {', '.join(changes.shared)} change too: one config key sets them with the selected sites")
    runs = f"2 arms x {len(seeds)} seed(s) = {2 * len(seeds)} runs" if verify else "1 run (the patched config)"
    ctx.say(f"runs: {runs} of {budget.steps} steps each, --init {budget.init}; output {ctx.out}")


def _patched_init(ctx: Context, adapter: Adapter, ckpt: Mapping[str, Any], plan: Plan, report: Any) -> dict[str, Any]:
    """The input checkpoint with the plan's dead channels re-initialised (and their optimizer moments reset)."""
    from deadneuron.patch import Plan as PlanType
    from deadneuron.patch import apply_plan
    from deadneuron.patch.reinit import reset_optimizer_rows

    op = plan.get(_reinit_type())
    if op is None:
        return dict(ckpt)
    model = adapter.load(ckpt)
    example = next(iter(adapter.batches("train", ckpt.get("config", {}))))
    result = apply_plan(model, PlanType((op,)), report=report, example=example, forward=adapter.forward, strict=False)
    for line in result.record.lines():
        ctx.say(f"  reinit: {line}")
    out = {**ckpt, "state_dict": {k: v.detach().clone() for k, v in result.model.state_dict().items()}}
    if op.reset_optimizer_state and ckpt.get("optimizer_state") is not None:
        out["optimizer_state"] = reset_optimizer_rows(ckpt["optimizer_state"], model, result.optimizer_slices)
    return out


def _train(adapter: Adapter, baseline: Mapping[str, Any], patched: Mapping[str, Any], budget: Budget,
           options: Options, seeds: list[int], verify: bool, reference: tuple[Any, Any]) -> tuple[Any, list[Run]]:  # fmt: skip
    from deadneuron.patch.arms import verify_arms
    from deadneuron.patch.retrain import retrain

    if not verify:
        return None, [retrain(adapter, patched, budget, options, seed=seeds[0])]
    ref = reference if reference[0] is not None else None
    return verify_arms(adapter, baseline, patched, budget, options, seeds=seeds, reference=ref)


def _add_checkpoint(ctx: Context, outputs: Any, run: Run, plan: Plan, record: Any, model_changes: list[str],
                    source_hash: str, verification: Any, budget: Budget) -> None:  # fmt: skip
    patch_info = {
        "source": str(ctx.checkpoint),
        "source_sha256": source_hash,
        "plan": plan.to_dict(),
        "record": record.to_dict(),
        "model_changes": model_changes,
        "seed": run.seed,
        "budget": budget.to_dict(),
        "verification": verification.to_dict() if verification is not None else None,
    }
    outputs.checkpoint(ctx.out, {**run.checkpoint, "patch": patch_info})
    ctx.say(f"{ctx.out}: the patched config, seed {run.seed}")


def _show(ctx: Context, verification: Any) -> None:
    from deadneuron.render.patch_table import verification_table

    ctx.console.print(verification_table(verification))


def _extras(ctx: Context, outputs: Any, verification: Any, runs: list[Run], plan: Plan) -> None:
    from deadneuron.cli._patch_context import extras

    before = [r.report for r in runs if r.arm == "baseline"]
    after = [r.report for r in runs if r.arm == "patched"]
    extras(ctx, outputs, verification, before, after, ("baseline", "patched"), changes=[op.describe() for op in plan.ops])


__all__ = ["patch_adapter"]
