"""Measuring: run a model over data inside a Recorder and build the Report of what it saw, without findings
(`deadneuron.audit` adds those). Patching and retraining measure through this too.

The model is left exactly as it was found: eval mode and `torch.inference_mode` (`torch.no_grad` for an
FSDP-sharded model) during the pass, then every hook removed and every module's train/eval flag restored,
also when the forward pass raises. Parameters and buffers are never written (inference mode and eval-mode
BatchNorm do not update them).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deadneuron._forward_failure import AUTOGRAD_NOTE, NeedsAutograd, forward_error, needs_autograd
from deadneuron._inputs import (
    batch_count,
    batch_size,
    batches_of,
    default_forward,
    model_device,
    refuse_meta,
    resolve_device,
    to_device,
    unbatched,
)
from deadneuron._kept import kept_tensors
from deadneuron._parse import check_count
from deadneuron._text import few
from deadneuron.activations import check_delta, check_eps
from deadneuron.adapters import Feed
from deadneuron.distributed import active as distributed_active
from deadneuron.distributed import all_reduce_part, share_failure
from deadneuron.errors import UsageError
from deadneuron.part import Part
from deadneuron.probe import Recorder, SiteResult
from deadneuron.probe.masks import AUTO, PACKED, MaskSpec, choose_mask, unmatched_error
from deadneuron.probe.placement import StatedDims
from deadneuron.probe.seq2seq import is_encoder_decoder
from deadneuron.probe.tuples import tuple_mask_warning
from deadneuron.registry import ActivationRegistry
from deadneuron.report import Report, SiteHealth
from deadneuron.select import matches
from deadneuron.slots import SlotStats
from deadneuron.stats import HISTOGRAM_EDGES
from deadneuron.wrappers import eager, gradients_off, unwrap, wrapper_notes

Forward = Callable[[nn.Module, Any], Any]
Advance = Callable[[], None]
ProgressBar = Callable[[int | None], AbstractContextManager[Advance]]
"""Given the number of batches (None: unknown), a context manager around the pass that yields a function
called once per batch; the command line draws a terminal bar with it (`deadneuron.render.progress`)."""


@dataclass(frozen=True)
class Measurement:
    """What a pass measured: the Report (no findings yet), the module audited (inside any DDP or
    torch.compile wrapper) and the first batch (on every rank the same one), which fixes are checked on."""

    report: Report
    model: nn.Module
    example: Any


def _refuse_lazy(model: nn.Module) -> None:
    """A UsageError for lazy layers not yet materialised: under inference_mode their weights would become
    inference tensors, and the model could not be trained after the audit."""
    lazy = [(n, m) for n, m in model.named_modules()
            if any(isinstance(t, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer))
                   for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))]  # fmt: skip
    if lazy:
        name, m = lazy[0]
        raise UsageError(f"layer {name or '(the model)'!r} ({type(m).__name__}) has uninitialised lazy parameters"
                         f"{f' (and {len(lazy) - 1} more layers)' if len(lazy) > 1 else ''}: run one forward pass of "
                         "the model on an example batch before auditing it, so they are made outside the audit")


def measure(
    model: nn.Module,
    data: Iterable[Any],
    *,
    eps: float = 0.0,
    delta: float = 0.05,
    select: Sequence[str] | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: ProgressBar | None = None,
    adapter: Feed | None = None,
    functional: bool = True,
    compile: bool = True,
    histograms: bool = False,
    meta: Mapping[str, Any] | None = None,
    activations: ActivationRegistry | None = None,
    mask: MaskSpec = AUTO,
    channel_axis: Mapping[str, int | None] | None = None,
    mask_dims: Mapping[str, Sequence[int]] | None = None,
    distributed: bool = True,
    forward: Forward | None = None,
) -> Measurement:
    """The statistics of ``model`` on ``data`` as a Report without findings; the arguments are those of
    `deadneuron.audit`, which documents them. ``forward(model, batch)`` feeds a batch (default: the
    adapter's, else `deadneuron._inputs.default_forward`)."""
    overrides = _channel_axes(channel_axis)
    check_count(max_batches, "--batches (max_batches)")
    check_eps(eps)
    check_delta(delta)
    model, notes = unwrap(model)
    _refuse_lazy(model)
    refuse_meta(model)
    notes += wrapper_notes(model)  # FSDP / checkpoint wrappers: their forward runs, their names go
    dev = resolve_device(device) if device is not None else model_device(model)
    across_ranks = distributed and distributed_active()
    recorder = functools.partial(Recorder, eps=eps, delta=delta, select=select, functional=functional, compile=compile,
                                 histograms=histograms, activations=activations, channel_axis=overrides,
                                 mask_dims=StatedDims(mask_dims, implied=getattr(adapter, "mask_dims", None)))  # fmt: skip
    run = functools.partial(_pass, model, recorder=recorder, dev=dev, progress=progress, adapter=adapter, mask=mask,
                            forward=forward)  # fmt: skip
    try:
        with kept_tensors(model):  # what the forward caches (as inference tensors) is not left on the model
            try:
                part, rec, example, single = run(data, max_batches=max_batches)
            except NeedsAutograd as need:  # the first batch again, then the rest (`_forward_failure`)
                part, rec, example, single = run(itertools.chain([need.batch], need.rest), max_batches=None, grad=True)
                notes.append(AUTOGRAD_NOTE)
    except Exception as exc:
        if across_ranks:  # the other ranks are waiting for this rank's statistics: they raise too, naming it
            with contextlib.suppress(Exception):  # a broken group: this rank's own error says more
                share_failure(exc)
        raise
    kernels = rec.kernels.name
    if single:
        notes.append(_unbatched_note(single))
    if compile and rec.kernels.fallback_reason:
        kernels = f"{kernels} ({rec.kernels.fallback_reason})"
    world = None
    if across_ranks:
        import torch.distributed as dist

        part = all_reduce_part(part)
        example = _shared_example(example)
        world = {"world_size": dist.get_world_size(), "rank_batches": list(part.rank_batches)}
    if part.batches == 0:
        raise UsageError("the data yielded no batches: nothing to audit (check --data / --batches)")
    results = part.results()
    if not results:
        raise UsageError(_nothing_measured(rec, select, functional))
    warnings = [*part.warnings, *_unmatched_select(results, select), *_mask_warnings(results, part.mask, mask),
                *_empty_sites(results)]
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
        **_placements(results),
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
    return Measurement(report, model, example)


def untracked_batchnorms(model: nn.Module) -> list[str]:
    """BatchNorm layers whose running statistics were never updated (fresh init)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            nbt = m.num_batches_tracked
            if nbt is not None and int(nbt) == 0:
                out.append(name)
    return out


def _silent(total: int | None) -> AbstractContextManager[Advance]:
    return nullcontext(lambda: None)


def _pass(
    model: nn.Module, data: Iterable[Any], recorder: Callable[[nn.Module], Recorder], *, max_batches: int | None,
    dev: torch.device, progress: ProgressBar | None, adapter: Feed | None, mask: MaskSpec, forward: Forward | None,
    grad: bool = False,
) -> tuple[Part, Recorder, Any, int]:  # fmt: skip
    """This process's pass: every batch through the hooked model; its statistics as a Part, the Recorder,
    the first batch (fixes are checked on it) and the number of batches fed without a batch dim (each one
    sample: `deadneuron._inputs.unbatched`). Under torch.inference_mode, or ``grad``: torch.no_grad, where a
    model's own torch.enable_grad() blocks run (`deadneuron._forward_failure`)."""
    if forward is None:
        forward = adapter.forward if adapter is not None else default_forward
    total = max_batches if max_batches is not None else batch_count(data)
    warnings = [
        f"BatchNorm {name!r} has never been updated (num_batches_tracked == 0): in eval mode it "
        "normalises with its initial statistics, so channels can look dead that are not"
        for name in untracked_batchnorms(model)
    ]
    slot_stats: SlotStats | None = None
    used_mask: tuple[str, tuple[int, ...]] | None = None
    metric_sums: dict[str, torch.Tensor] = {}
    batches = samples = single = unused_batches = 0
    unused: tuple[int, Any, int] | None = None  # the first batch with an item that looks like a mask: index, batch, item
    example: Any = None  # the first batch: fixes are checked on it
    moved, seq2seq = _move_model(model, dev), is_encoder_decoder(model)
    try:
        with recorder(model) as rec:
            if any(m.training for m in model.modules()):
                model.eval()
            with gradients_off(model, grad), eager(model), (progress or _silent)(total) as advance:
                for batch in (it := iter(batches_of(data, max_batches))):
                    batch = to_device(batch, dev)
                    example = batch if example is None else example
                    size = batch_size(batch)
                    choice = choose_mask(mask, batch, batch_size=size, device=dev, adapter=adapter, seq2seq=seq2seq)
                    if choice.unused is not None:  # one warning at the end, counting the batches
                        unused, unused_batches = unused or (batches, batch, choice.unused), unused_batches + 1
                    elif choice.warning is not None and choice.warning not in warnings:
                        warnings.append(choice.warning)
                    if choice.mask is not None:  # (N, positions...): its N also where the data is sequence first
                        used_mask, size = (str(choice.source), tuple(choice.mask.shape)), int(choice.mask.shape[0])
                    rec.start_batch(mask=choice.mask)
                    try:
                        outputs = forward(model, batch)
                    except (UsageError, KeyboardInterrupt):
                        raise
                    except Exception as exc:
                        if not grad and batches == 0 and needs_autograd(exc):
                            raise NeedsAutograd(batch, it) from exc
                        raise forward_error(exc, rec, batches, batch) from exc
                    rec.idle()  # the probe off until the next forward: what follows is the audit's, not the model's
                    if choice.mask is None and size > 1 and unbatched(batch, rec.first_input):
                        size, single = 1, single + 1
                    if adapter is not None:
                        slot_stats = _update_slots(adapter, outputs, batch, slot_stats)
                        for k, v in adapter.metric_sums(outputs, batch).items():
                            metric_sums[k] = metric_sums[k] + v if k in metric_sums else v.double().clone()
                    batches += 1
                    samples += size
                    advance()
            warnings += [f"channel axis set for {glob!r} matched no site: check the name against the site table"
                         for glob in rec.axes.unmatched()]
            if unused is not None:
                seen = f" (on {unused_batches} of {batches} batch{'es' if batches > 1 else ''}, from batch {unused[0]})"
                warnings.append(tuple_mask_warning(unused[1], unused[2], seen=seen))
            part = Part.of_recorder(rec, batches=batches, samples=samples, slots=slot_stats, metric_sums=metric_sums,
                                    warnings=[*warnings, *rec.warnings()], mask=used_mask)  # fmt: skip
    finally:
        if moved is not None:
            model.to(moved)
    return part, rec, example, single


def _unbatched_note(count: int) -> str:
    """How the sample count treated batches fed without a batch dim (`deadneuron._inputs.unbatched`)."""
    return (f"{count} batch{'es' if count > 1 else ''} counted as one sample each: the input had no batch dim (the "
            "first activation site it reached read its channels on the input's dim 0, with the input's rank)")


def _mask_warnings(results: Sequence[SiteResult], used: tuple[str, tuple[int, ...]] | None, mask: MaskSpec) -> list[str]:
    """A padding mask that applied at no site (an error where it was asked for), or at some sites on
    some batches only."""
    out = []
    # no site masked, and some site neither masked nor named reordered (that has a warning of its own)
    if used is not None and not any(r.masked for r in results) and not all(r.reordered for r in results):
        source, shape = used
        if source == PACKED:  # no site read the sequences padded again: the packed data holds no padding
            return []
        if (mask != AUTO or source.startswith("adapter:")) and not any(r.reordered for r in results):
            raise unmatched_error(source, shape, {r.name: r.example_shape for r in results})
        out.append(f"{source} of shape {shape} applied at no activation site: padding is counted")
    mixed = [r.name for r in results if r.masked and r.unfitted]
    if mixed:
        out.append(
            f"the padding mask fitted {', '.join(mixed[:3])}{' and more' if len(mixed) > 3 else ''} on some batches "
            "only (their shape did not fit it on the others): their figures count padding on those batches"
        )
    return out


def _empty_sites(results: Sequence[SiteResult]) -> list[str]:
    """Sites that ran but saw no element (an expert no token was routed to, every position padding): their
    figures (sparsity 0, no dead channel) say nothing."""
    empty = [r.name for r in results if r.summary.n == 0]
    return [empty_sites_warning(empty)] if empty else []


def empty_sites_warning(names: Sequence[str], *, where: str = "on the audit set",
                        advice: str = "audit on data that reaches them") -> str:  # fmt: skip
    """The warning for the sites ``names`` that ran but saw no element ``where``: the audit's, and the
    training monitor's (`deadneuron.Monitor`, with its window and its own ``advice``)."""
    return (f"site{'s' if len(names) > 1 else ''} {few(names)} ran but saw no element {where} (every call had an "
            f"empty input, or padding alone): nothing was measured there; {advice}")


def _placements(results: Sequence[SiteResult]) -> dict[str, Any]:
    """``{"mask_dims": {site: placement}}`` where a choice of the mask's dims was made (none: nothing)."""
    placed = {r.name: r.mask_placement.to_dict() for r in results if r.mask_placement is not None}
    return {"mask_dims": placed} if placed else {}


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


def _nothing_measured(rec: Recorder, select: Sequence[str] | None, functional: bool) -> str:
    """The one-line error of an audit without a site: what was found, and what to do."""
    globs = ", ".join(repr(g) for g in select or ())
    left_out = list(rec.coverage.unselected)
    if select and left_out:
        shown = ", ".join(left_out[:6]) + (f" and {len(left_out) - 6} more" if len(left_out) > 6 else "")
        return f"select {globs} matched no activation site (sites: {shown}); check the globs against these names"
    found = f"{rec.coverage.modules} modules, " + ("no activation module called on floating-point input"
                                                 if rec.coverage.dtypes else "no recognised activation module")
    found += ", no functional activation called" if functional else " (functional activations not probed)"
    unknown = rec.warnings()
    tail = f"; {'; '.join(unknown)}" if unknown else "; declare your own with deadneuron.register_activation"
    scope = f" (select {globs})" if select else ""
    return f"no activation site was measured{scope}: the model has {found}{tail}"


def _unmatched_select(results: Sequence[SiteResult], select: Sequence[str] | None) -> list[str]:
    """A warning per select glob that matched none of the measured sites (some others did)."""
    out = []
    for glob in select or ():
        if not any(matches((r.name, r.module, _leaf(r.name), r.kind, f"kind:{r.kind}"), (glob,)) for r in results):
            out.append(f"select {glob!r} matched no activation site")
    return out


def _leaf(site_name: str) -> str:
    """``relu`` of ``conv1>relu#2`` or ``block.relu``: the function or attribute a select may name."""
    return site_name.rsplit(">", 1)[-1].rsplit(".", 1)[-1].split("#", 1)[0]


def _channel_axes(channel_axis: Mapping[str, int | None] | None) -> dict[str, int | None]:
    """``channel_axis`` checked: site globs to integer dims, or None (the input has no channel dim)."""
    if channel_axis is None:
        return {}
    if not isinstance(channel_axis, Mapping):
        raise UsageError(f"channel_axis takes a dict of site glob -> dim, got {type(channel_axis).__name__}")
    for glob, axis in channel_axis.items():
        if not isinstance(glob, str) or not glob or isinstance(axis, bool) or not isinstance(axis, (int, type(None))):
            raise UsageError(f"channel_axis takes site glob -> integer dim, or None where the input has no channel dim "
                             f"(e.g. {{'block.relu': 1, 'gate': None}}), got {glob!r}: {axis!r}")
    return dict(channel_axis)


def _update_slots(adapter: Feed, outputs: Any, batch: Any, stats: SlotStats | None) -> SlotStats | None:
    found = adapter.slot_masks(outputs, batch)
    if found is None:
        return stats
    masks, valid = found
    if stats is None:
        stats = SlotStats(num_slots=masks.shape[1])
    stats.update(masks, valid)
    return stats


def _move_model(model: nn.Module, dev: torch.device) -> torch.device | None:
    current = model_device(model)
    if current == dev:
        return None
    model.to(dev)
    return current


__all__ = ["Advance", "Forward", "Measurement", "ProgressBar", "empty_sites_warning", "measure", "untracked_batchnorms"]
