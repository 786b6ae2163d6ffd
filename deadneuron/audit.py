"""Run a model over data inside a Recorder and return a Report.

The model is left exactly as it was found: eval mode and `torch.inference_mode` during the audit, then
every hook removed and every module's train/eval flag restored, also when the forward pass raises.
Parameters and buffers are never written (inference mode and eval-mode BatchNorm do not update them).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from deadneuron._inputs import batches_of, resolve_device
from deadneuron.adapters import Adapter
from deadneuron.distributed import active as dist_active
from deadneuron.distributed import all_reduce_part, share_failure
from deadneuron.errors import AuditRuntimeError, UsageError
from deadneuron.part import Part
from deadneuron.probe import Recorder, SiteResult
from deadneuron.probe.masks import AUTO, MaskSpec, batch_shapes, choose_mask, unmatched_error
from deadneuron.registry import ActivationRegistry
from deadneuron.report import Report, SiteHealth
from deadneuron.rules import PatchTarget, RulesConfig, RuleSet
from deadneuron.stats import HISTOGRAM_EDGES
from deadneuron.wrappers import eager, unwrap


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj) if not hasattr(obj, "_fields") else type(obj)(
            *(_to(v, device) for v in obj)
        )
    if hasattr(obj, "to") and callable(obj.to):
        return obj.to(device)
    return obj


def default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input; a tuple/list's first element is; a dict is passed as keyword arguments."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise UsageError(
        f"cannot feed a batch of type {type(batch).__name__} to the model: "
        "yield tensors, (input, ...) tuples, or dicts of keyword arguments"
    )


def batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()), None)
        return batch_size(batch) if batch is not None else 0
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    x = getattr(batch, "x", None)
    return batch_size(x) if isinstance(x, torch.Tensor) else 0


def untracked_batchnorms(model: nn.Module) -> list[str]:
    """BatchNorm layers whose running statistics were never updated (fresh init)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            nbt = m.num_batches_tracked
            if nbt is not None and int(nbt) == 0:
                out.append(name)
    return out


def _progress(enabled: bool | None, total: int | None) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("auditing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
        console=__import__("rich.console", fromlist=["Console"]).Console(stderr=True),
    )


def audit(
    model: nn.Module,
    data: Iterable[Any],
    *,
    eps: float = 0.0,
    delta: float = 0.05,
    select: Sequence[str] | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    adapter: Adapter | None = None,
    functional: bool = True,
    compile: bool = True,
    histograms: bool = False,
    meta: Mapping[str, Any] | None = None,
    activations: ActivationRegistry | None = None,
    mask: MaskSpec = AUTO,
    channel_axis: Mapping[str, int] | None = None,
    rules: bool | RuleSet = True,
    rules_config: RulesConfig | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    patch_target: PatchTarget | None = None,
    distributed: bool = True,
) -> Report:
    """Audit ``model`` on ``data`` and return a Report (see DESIGN section 3 for every figure).

    ``data`` yields batches: a tensor, a tuple/list whose first element is the input, or a dict of
    keyword arguments (with ``adapter``, whatever the adapter's ``forward`` takes). ``select`` limits
    the sites (globs over names, or kinds such as ``gelu``). ``compile`` fuses the statistics with
    `torch.compile` (falls back to eager kernels, with a note in ``report.meta``, where it cannot).
    ``histograms`` also counts every activation value into fixed signed-log bins per site (for plots;
    it costs a few passes per batch). ``activations``: the registry of the user's own kinds
    (default: the one `deadneuron.register_activation` writes).

    Unknown activations (modules or functions that look like one but are no recognised kind) are
    named in ``report.meta["warnings"]``. An audit that measured no site, or whose ``select`` matched
    none, raises UsageError: no gate or assertion can pass on nothing.

    ``mask`` says which positions of a batch are padding, to leave out of every statistic (DESIGN
    section 3, "Masks: padding is not data"). ``"auto"`` (the default): the adapter's position mask
    where it has one (the ARC adapter: the valid grid cells); else, for dict batches, the
    ``"attention_mask"`` when its shape (N, L) is the leading shape of ``"input_ids"`` (else of
    ``"inputs_embeds"``, else of the batch's first other tensor) and it holds only 0/1; else none.
    A ``str``: that key of dict batches. A callable: ``batch -> tensor``, bool or 0/1 of shape
    (N, positions...), True where the batch holds data. ``None``: no mask, padding counts as data.
    A mask applies at every site whose dims other than the channel begin with the mask's shape
    (tokens (N, L, C) under (N, L); conv maps (N, C, H, W) under (N, H, W)); statistics there cover
    the valid positions only and equal those of the same data unpadded. Each site says whether it
    was masked and how many elements per channel were excluded; ``report.meta["mask"]`` names the mask.
    A mask that does not fit the batch, or that was asked for and fits no site, is a UsageError.

    ``channel_axis`` sets the channel dim of the sites matching each glob
    (``{"block.relu": 1}``; negative dims count from the end) where it cannot be derived from a layer.

    ``rules``: evaluate the rule engine and put its findings (``deadneuron.rules.Finding``, most severe
    first) in ``report.findings`` -- True for the built-in and installed rules, a ``RuleSet`` for those,
    False for none. ``rules_config``: thresholds and disabled rules (default: pyproject.toml's
    ``[tool.deadneuron.rules]`` above the working folder, as the CLI reads it). ``checkpoint``: what the
    training run knows (a deadneuron checkpoint dict: config, history, health timeline, optimizer
    state), for the rules that read it. ``patch_target``: the subject ``deadneuron patch`` would patch
    (the CLI passes the audited checkpoint and its flags, so each finding's commands run as printed);
    by default fixes are checked against module surgery on ``model`` and no command is written.

    ``distributed``: where a torch.distributed process group with more than one rank is initialised,
    every rank audits its own shard of the data and the ranks merge their statistics exactly
    (`deadneuron.distributed`): every rank returns the same Report, equal to one process's audit of
    all the shards (``report.meta["distributed"]`` gives the batches per rank). Every rank must call
    it. ``False`` audits this rank's shard alone. A model inside DistributedDataParallel or
    torch.compile is audited as the module inside (``report.meta["notes"]`` says so).
    """
    overrides = _channel_axes(channel_axis)
    if max_batches is not None and max_batches < 1:
        raise UsageError(f"--batches must be at least 1, got {max_batches}")
    if eps < 0 or not 0 <= delta < 1:
        raise UsageError(f"eps must be >= 0 and delta in [0, 1); got eps={eps}, delta={delta}")
    model, notes = unwrap(model)
    dev = resolve_device(device) if device is not None else _model_device(model)
    merge = distributed and dist_active()
    recorder = functools.partial(Recorder, eps=eps, delta=delta, select=select, functional=functional, compile=compile,
                                 histograms=histograms, activations=activations, channel_axis=overrides)  # fmt: skip
    try:
        part, rec, example = _measure(model, data, recorder, max_batches=max_batches, dev=dev, progress=progress,
                             adapter=adapter, mask=mask)  # fmt: skip
    except Exception as exc:
        if merge:  # the other ranks are waiting for this rank's statistics: they raise too, naming it
            with contextlib.suppress(Exception):  # a broken group: this rank's own error says more
                share_failure(exc)
        raise
    kernels = rec.kernels.name
    if compile and rec.kernels.fallback_reason:
        kernels = f"{kernels} ({rec.kernels.fallback_reason})"
    world = None
    if merge:
        import torch.distributed as dist

        part = all_reduce_part(part)
        example = _shared_example(example)
        world = {"world_size": dist.get_world_size(), "rank_batches": list(part.rank_batches)}
    if part.batches == 0:
        raise UsageError("the data yielded no batches: nothing to audit (check --data / --batches)")
    results = part.results()
    if not results:
        raise UsageError(_nothing_measured(rec, select, functional))
    warnings = [*part.warnings, *_unmatched_select(results, select), *_mask_warnings(results, part.mask, mask)]
    metrics: dict[str, float] = {}
    if adapter is not None and part.metric_sums:
        metrics = dict(adapter.summarize_metrics({k: float(v.sum()) for k, v in part.metric_sums.items()}))
    info = {
        "model": type(model).__name__,
        "batches": part.batches,
        "samples": part.samples,
        "eps": eps,
        "delta": delta,
        "device": str(dev),
        "select": list(select) if select else None,
        "kernels": kernels,
        "mask": part.mask[0] if part.mask is not None else None,
        **({"histogram_edges": list(HISTOGRAM_EDGES), "histogram_sampled": part.histogram_sampled} if histograms else {}),
        **({"distributed": world} if world is not None else {}),
        **({"notes": notes} if notes else {}),
        **(meta or {}),
        "warnings": [*warnings, *(meta or {}).get("warnings", ())],  # the caller's warnings join the audit's
    }
    report = Report.build(
        (SiteHealth.from_result(r) for r in results),
        slots=part.slots.compute() if part.slots is not None else None,
        metrics=metrics,
        meta=info,
    )
    if rules is False:
        return report
    from deadneuron.rules import attach_findings

    ruleset = None if rules is True else rules
    forward = adapter.forward if adapter is not None else default_forward
    target = patch_target if patch_target is not None else _surgery_target(model, example, forward)
    return attach_findings(report, checkpoint, model=model, rules=ruleset, config=_rules_config(ruleset, rules_config),
                           target=target)  # fmt: skip


def _measure(
    model: nn.Module, data: Iterable[Any], recorder: Callable[[nn.Module], Recorder], *, max_batches: int | None,
    dev: torch.device, progress: bool | None, adapter: Adapter | None, mask: MaskSpec,
) -> tuple[Part, Recorder, Any]:  # fmt: skip
    """This process's audit: every batch through the hooked model; its statistics as a Part, the Recorder,
    and the first batch (fixes are checked on it)."""
    from deadneuron.slots import SlotStats

    forward = adapter.forward if adapter is not None else default_forward
    total = max_batches if max_batches is not None else (len(data) if hasattr(data, "__len__") else None)  # type: ignore[arg-type]
    warnings = [
        f"BatchNorm {name!r} has never been updated (num_batches_tracked == 0): in eval mode it "
        "normalises with its initial statistics, so channels can look dead that are not"
        for name in untracked_batchnorms(model)
    ]
    slot_stats: SlotStats | None = None
    used_mask: tuple[str, tuple[int, ...]] | None = None
    metric_sums: dict[str, torch.Tensor] = {}
    batches = samples = 0
    example: Any = None  # the first batch: fixes are checked on it
    moved = _move_model(model, dev)
    try:
        with recorder(model) as rec:
            if any(m.training for m in model.modules()):
                model.eval()
            with torch.inference_mode(), eager(model), _progress(progress, total) as bar:
                task = bar.add_task("audit", total=total) if bar is not None else None
                for batch in batches_of(data, max_batches):
                    batch = _to(batch, dev)
                    example = batch if example is None else example
                    size = batch_size(batch)
                    choice = choose_mask(mask, batch, batch_size=size, device=dev, adapter=adapter)
                    if choice.warning is not None and choice.warning not in warnings:
                        warnings.append(choice.warning)
                    if choice.mask is not None:
                        used_mask = (str(choice.source), tuple(choice.mask.shape))
                    rec.start_batch(mask=choice.mask)
                    try:
                        outputs = forward(model, batch)
                    except (UsageError, KeyboardInterrupt):
                        raise
                    except Exception as exc:
                        raise _forward_error(exc, rec, batches, batch) from exc
                    if adapter is not None:
                        slot_stats = _update_slots(adapter, outputs, batch, slot_stats)
                        for k, v in adapter.metric_sums(outputs, batch).items():
                            metric_sums[k] = metric_sums[k] + v if k in metric_sums else v.double().clone()
                    batches += 1
                    samples += size
                    if bar is not None:
                        bar.advance(task)
            warnings += [f"channel axis set for {glob!r} matched no site: check the name against the site table"
                         for glob in rec.axes.unmatched()]
            part = Part.of_recorder(rec, batches=batches, samples=samples, slots=slot_stats, metric_sums=metric_sums,
                                    warnings=[*warnings, *rec.warnings()], mask=used_mask)  # fmt: skip
    finally:
        if moved is not None:
            model.to(moved)
    return part, rec, example


def _mask_warnings(results: Sequence[SiteResult], used: tuple[str, tuple[int, ...]] | None, mask: MaskSpec) -> list[str]:
    """A padding mask that applied at no site (an error where it was asked for), or at some sites on
    some batches only."""
    out = []
    if used is not None and not any(r.masked for r in results):
        source, shape = used
        if mask != AUTO or source.startswith("adapter:"):
            raise unmatched_error(source, shape, {r.name: r.example_shape for r in results})
        out.append(f"{source} of shape {shape} applied at no activation site: padding is counted")
    mixed = [r.name for r in results if r.masked and r.unfitted]
    if mixed:
        out.append(
            f"the padding mask fitted {', '.join(mixed[:3])}{' and more' if len(mixed) > 3 else ''} on some batches "
            "only (their shape did not fit it on the others): their figures count padding on those batches"
        )
    return out


def _shared_example(example: Any) -> Any:
    """The first batch of the lowest rank that saw one, on every rank: fixes are checked on it, so that every
    rank's findings (and so its Report) are the same, also on a rank that saw no batch."""
    import torch.distributed as dist

    seen: list[bool] = [False] * dist.get_world_size()
    dist.all_gather_object(seen, example is not None)
    if not any(seen):
        return example
    box = [example if example is not None else None]
    dist.broadcast_object_list(box, src=seen.index(True))
    return box[0]


def _surgery_target(model: nn.Module, example: Any, forward: Any) -> PatchTarget:
    """Fixes for ``model`` in Python: module surgery, checked on the audit's first batch; no command line."""
    from deadneuron.reach import ModelPreview

    def run(m: nn.Module, batch: Any) -> Any:
        return forward(m, _to(batch, _model_device(m)))

    return PatchTarget(preview=ModelPreview(model, example, forward=run))


def _rules_config(rules: RuleSet | None, config: RulesConfig | None) -> RulesConfig:
    if config is not None:
        return config
    from deadneuron.rules import load_config, load_rules

    return load_config(rules=rules if rules is not None else load_rules())


def _nothing_measured(rec: Recorder, select: Sequence[str] | None, functional: bool) -> str:
    """The one-line error of an audit without a site: what was found, and what to do."""
    globs = ", ".join(repr(g) for g in select or ())
    left_out = list(rec.coverage.unselected)
    if select and left_out:
        shown = ", ".join(left_out[:6]) + (f" and {len(left_out) - 6} more" if len(left_out) > 6 else "")
        return f"select {globs} matched no activation site (sites: {shown}); check the globs against these names"
    found = f"{rec.coverage.modules} modules, no recognised activation module"
    found += ", no functional activation called" if functional else " (functional activations not probed)"
    unknown = rec.warnings()
    tail = f"; {'; '.join(unknown)}" if unknown else "; declare your own with deadneuron.register_activation"
    scope = f" (select {globs})" if select else ""
    return f"no activation site was measured{scope}: the model has {found}{tail}"


def _unmatched_select(results: Sequence[Any], select: Sequence[str] | None) -> list[str]:
    """A warning per select glob that matched none of the measured sites (some others did)."""
    from deadneuron.select import matches

    out = []
    for glob in select or ():
        if not any(matches((r.name, r.module, _leaf(r.name), r.kind, f"kind:{r.kind}"), (glob,)) for r in results):
            out.append(f"select {glob!r} matched no activation site")
    return out


def _leaf(site_name: str) -> str:
    """``relu`` of ``conv1>relu#2`` or ``block.relu``: the function or attribute a select may name."""
    return site_name.rsplit(">", 1)[-1].rsplit(".", 1)[-1].split("#", 1)[0]


def _channel_axes(channel_axis: Mapping[str, int] | None) -> dict[str, int]:
    """``channel_axis`` checked: site globs to integer dims."""
    if channel_axis is None:
        return {}
    if not isinstance(channel_axis, Mapping):
        raise UsageError(f"channel_axis takes a dict of site glob -> dim, got {type(channel_axis).__name__}")
    for glob, axis in channel_axis.items():
        if not isinstance(glob, str) or not glob or isinstance(axis, bool) or not isinstance(axis, int):
            raise UsageError(f"channel_axis takes site glob -> integer dim (e.g. {{'block.relu': 1}}), got {glob!r}: {axis!r}")
    return dict(channel_axis)


def _update_slots(adapter: Adapter, outputs: Any, batch: Any, stats: Any) -> Any:
    found = adapter.slot_masks(outputs, batch)
    if found is None:
        return stats
    masks, valid = found
    if stats is None:
        from deadneuron.slots import SlotStats

        stats = SlotStats(num_slots=masks.shape[1])
    stats.update(masks, valid)
    return stats


def _move_model(model: nn.Module, dev: torch.device) -> torch.device | None:
    current = _model_device(model)
    if current == dev:
        return None
    model.to(dev)
    return current


def _forward_error(exc: Exception, rec: Recorder, index: int, batch: Any) -> AuditRuntimeError:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = f"after site {rec.last_site!r}" if rec.last_site else "before any activation site ran"
    module = f", last module run {rec.last_module!r}" if rec.last_module else ""
    return AuditRuntimeError(
        f"forward pass failed on batch {index} (input {batch_shapes(batch)}) {where}{module}: "
        f"{type(exc).__name__}: {first_line}"
    )
