"""`deadneuron patch` for a deadneuron checkpoint: change the config, retrain both arms, compare, write."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from deadneuron.errors import UsageError

if TYPE_CHECKING:
    from deadneuron.adapters import Adapter
    from deadneuron.cli.patch import Context
    from deadneuron.patch import Plan
    from deadneuron.patch.retrain import Budget, Options, Run


def patch_adapter(ctx: Context, flags: Plan, *, apply_suggestions: bool, seeds: int, init: str, max_steps: int | None,
                  verify: bool, audit_grids: int | None, allow_globals: tuple[str, ...] | list[str],
                  workers: int | None = None, threads: int | None = None) -> None:  # fmt: skip
    from deadneuron.adapters import get_adapter, is_deadneuron_checkpoint
    from deadneuron.checkpoint import file_sha256, load_checkpoint
    from deadneuron.patch import PatchError, apply_to_config
    from deadneuron.patch.retrain import Budget, Options, seeds_for

    source_hash = file_sha256(ctx.checkpoint)
    ckpt = load_checkpoint(ctx.checkpoint, allow_globals=allow_globals)
    if not is_deadneuron_checkpoint(ckpt):
        raise UsageError(f"{ctx.checkpoint} holds weights but no config to retrain: pass --model MODULE:FACTORY "
                         "(and --data or --input-shape) to patch the model itself")  # fmt: skip
    ckpt = cast(Mapping[str, Any], ckpt)
    adapter = get_adapter(str(ckpt.get("adapter")))
    config = dict(ckpt.get("config") or {})
    budget = Budget(_steps(ckpt, max_steps), init, audit_grids)  # type: ignore[arg-type]
    seed_list = seeds_for(config, seeds)
    if not verify and seeds > 1:
        raise UsageError("--seeds needs verification: drop --no-verify (only the patched config is trained without it)")
    needs_input_audit = apply_suggestions or (verify and not ctx.dry_run) or (flags.get(_reinit_type()) and init == "checkpoint")
    input_report = _audit_input(ctx, adapter, ckpt, budget) if needs_input_audit else None
    plan = _plan(flags, input_report, ckpt, adapter, apply_suggestions)
    patched_config, record = apply_to_config(config, plan, init=init)  # type: ignore[arg-type]
    coverage = _coverage(adapter, config, patched_config)
    _print_plan(ctx, plan, record, coverage, budget, seed_list, verify)
    for line in _uncovered(plan, coverage, input_report):
        ctx.say(f"  note: {line}")
    if record.not_patched:
        raise PatchError("could not apply the whole plan: " + "; ".join(record.not_patched))
    if not record.changes and not plan.get(_reinit_type()):
        raise UsageError("the plan changes nothing in this checkpoint's config (see the notes above)")
    if ctx.dry_run:
        ctx.say("dry run: nothing trained, nothing written")
        return
    from deadneuron.patch.parallel import available_cores

    options = Options(progress=ctx.progress, say=ctx.say, init_checkpoint=ckpt if init == "checkpoint" else None,
                      workers=workers or available_cores(), threads=threads or 1)  # fmt: skip
    if init == "checkpoint":
        options.patched_init = _patched_init(ctx, adapter, ckpt, plan, input_report)
    verification, runs = _train(adapter, config, patched_config, budget, options, seed_list, verify, (input_report, ckpt))
    if verification is not None:
        _show(ctx, verification)
    kept = next(r for r in runs if r.arm == "patched")
    _write(ctx, kept, plan, record, coverage, source_hash, verification, budget)
    if verification is not None:
        _extras(ctx, verification, runs)


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

    ctx.say(f"auditing the input checkpoint {ctx.checkpoint}")
    return audit_run(adapter, ckpt, budget, progress=ctx.progress)


def _plan(flags: Plan, report: Any, ckpt: Mapping[str, Any], adapter: Adapter, suggestions: bool) -> Plan:
    if not suggestions:
        return flags
    from deadneuron.patch import plan_from_findings
    from deadneuron.rules import attach_findings

    report = attach_findings(report, ckpt, model=adapter.load(ckpt))
    return plan_from_findings(report.findings).overridden_by(flags)


def _coverage(adapter: Adapter, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Which activation modules the config change swaps, measured by building both models."""
    from deadneuron.activations import spec_for_module

    old = {n: spec_for_module(m) for n, m in adapter.build(before).named_modules()}
    new = {n: spec_for_module(m) for n, m in adapter.build(after).named_modules()}
    lines = []
    for name, spec in old.items():
        if spec is not None and new.get(name) is not None and new[name] != spec:
            lines.append(f"{name}: {spec.label} -> {new[name].label}")  # type: ignore[union-attr]
    return lines


def _uncovered(plan: Plan, coverage: list[str], report: Any) -> list[str]:
    """Selected sites whose activation the config does not govern (only the encoder's shared one, say)."""
    from deadneuron.patch import SwapActivation

    op = plan.get(SwapActivation)
    if op is None or not op.sites:
        return []
    covered = {line.partition(":")[0] for line in coverage}
    if report is None:
        return [f"the config's activation changes {', '.join(sorted(covered)) or 'nothing'}; --select is not checked "
                "against it without an audit"]  # fmt: skip
    outside = [s for s in op.sites if s in report.sites and report.sites[s].module not in covered]
    if not outside:
        return []
    return [f"the config's activation does not reach {', '.join(outside[:4])}"
            f"{f' and {len(outside) - 4} more' if len(outside) > 4 else ''}; only {', '.join(sorted(covered)) or 'nothing'} changes"]


def _print_plan(ctx: Context, plan: Plan, record: Any, coverage: list[str], budget: Budget, seeds: list[int],
                verify: bool) -> None:  # fmt: skip
    ctx.say("plan:")
    for line in plan.describe() or ["(empty)"]:
        ctx.say(f"  {line}")
    for note in plan.notes:
        ctx.say(f"  note: {note}")
    ctx.say("config changes:")
    for line in record.lines() or ["(none)"]:
        ctx.say(f"  {line}")
    for line in coverage:
        ctx.say(f"  model: {line}")
    arms = f"2 arms x {len(seeds)} seed(s)" if verify else "the patched config once"
    ctx.say(f"budget: {arms}, {budget.steps} steps each, --init {budget.init}; output {ctx.out}")


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
    from deadneuron.patch.retrain import retrain
    from deadneuron.patch.retrain import verify as run_arms

    if not verify:
        return None, [retrain(adapter, patched, budget, options, seed=seeds[0])]
    ref = reference if reference[0] is not None else None
    return run_arms(adapter, baseline, patched, budget, options, seeds=seeds, reference=ref)


def _write(ctx: Context, run: Run, plan: Plan, record: Any, coverage: list[str], source_hash: str,
           verification: Any, budget: Budget) -> None:  # fmt: skip
    from deadneuron.checkpoint import atomic_save

    patch_info = {
        "source": str(ctx.checkpoint),
        "source_sha256": source_hash,
        "plan": plan.to_dict(),
        "record": record.to_dict(),
        "model_changes": coverage,
        "seed": run.seed,
        "budget": budget.to_dict(),
        "verification": verification.to_dict() if verification is not None else None,
    }
    atomic_save({**run.checkpoint, "patch": patch_info}, ctx.out, force=ctx.force, protect=[ctx.checkpoint])
    ctx.say(f"wrote {ctx.out} (the patched config, seed {run.seed})")


def _show(ctx: Context, verification: Any) -> None:
    from deadneuron.patch.table import verification_table

    ctx.console.print(verification_table(verification))


def _extras(ctx: Context, verification: Any, runs: list[Run]) -> None:
    from deadneuron.cli.patch import write_extras

    before = [r.report for r in runs if r.arm == "baseline"]
    after = [r.report for r in runs if r.arm == "patched"]
    write_extras(ctx, verification, before, after, ("baseline", "patched"))


__all__ = ["patch_adapter"]
