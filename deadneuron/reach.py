"""What a finding's fix would change on a live subject, measured: the previews a
:class:`deadneuron.rules.PatchTarget` checks fixes with.

:class:`ModelPreview` is module surgery on a model (``deadneuron patch --model``, or
:func:`deadneuron.patch.apply_plan` in Python): the swap's reach is read off the report
(:func:`deadneuron.rules.surgery_preview`), and dead-channel re-initialisation is checked on one forward
pass of an example batch for a conv/linear layer that feeds each site. :class:`ConfigPreview` is a
deadneuron checkpoint: the plan becomes its config change, the models of both configs are built and
audited on one batch, and the sites whose activation changed are the swap's reach. Neither changes the
model or the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from deadneuron.errors import DeadneuronError
from deadneuron.rules import PatchKind, PatchOp, Preview, surgery_preview

if TYPE_CHECKING:
    from torch import nn

    from deadneuron.adapters import Adapter
    from deadneuron.report import Report

Forward = Callable[["nn.Module", Any], Any]


def _reinit_sites(ops: tuple[PatchOp, ...]) -> list[str]:
    return [site for op in ops if op.kind is PatchKind.REINIT_DEAD for site, _ in op.param("channels", ())]


class _ReinitCheck:
    """Which sites' dead channels could get fresh incoming weights: one recorded forward pass, kept."""

    def __init__(self, model: Callable[[], nn.Module], example: Any, forward: Forward | None) -> None:
        self._model, self._example, self._forward = model, example, forward
        self._flow: Any = None

    def problems(self, sites: list[str]) -> list[str]:
        if not sites:
            return []
        if self._example is None:
            return ["no example batch to find the layers around the dead channels"]
        from deadneuron.audit import default_forward
        from deadneuron.patch.reinit import unreachable_sites

        if self._flow is None:
            run = self._forward or default_forward
            self._flow = self._record(run)
        if isinstance(self._flow, str):
            return [self._flow]
        missing = unreachable_sites(self._flow, sites)
        return [f"{site}: {why}, so its dead channels cannot be re-initialised" for site, why in missing.items()]

    def _record(self, run: Forward) -> Any:
        """The dataflow of one sample (else of the whole example batch), or why neither pass ran."""
        from deadneuron.patch.reinit import dataflow

        error = ""
        for example in (first_sample(self._example), self._example):
            try:
                return dataflow(self._model(), lambda m, x=example: run(m, x))
            except Exception as exc:  # the audit's report stands; this fix is only not suggested
                error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        return f"the forward pass that maps layers to sites failed ({error})"


def first_sample(batch: Any) -> Any:
    """The first sample of a batch of tensors (a tensor, or a dict/tuple/list of them), as a batch of one:
    mapping layers to sites keeps every intermediate tensor of the pass, so it runs on one sample."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch[:1] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: first_sample(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
        return type(batch)(first_sample(v) for v in batch)
    return batch


class ModelPreview:
    """Module surgery on ``model``: swaps from the report, re-initialisation checked on ``example``."""

    def __init__(self, model: nn.Module, example: Any, *, forward: Forward | None = None) -> None:
        self._reinit = _ReinitCheck(lambda: model, example, forward)

    def __call__(self, report: Report, ops: tuple[PatchOp, ...]) -> Preview:
        preview = surgery_preview(report, ops)
        problems = self._reinit.problems(_reinit_sites(ops))
        return Preview(preview.sites, (*preview.problems, *problems))


class ConfigPreview:
    """A deadneuron checkpoint: the config change ``deadneuron patch`` would make, and the activation
    sites whose kind that change alters in the model built from it (one held-out batch audited)."""

    def __init__(self, adapter: Adapter, checkpoint: Mapping[str, Any]) -> None:
        self.adapter = adapter
        self.config = dict(checkpoint.get("config") or {})
        self._labels: dict[str, dict[str, str] | str] = {}
        self._example: Any = None
        self._reinit = _ReinitCheck(lambda: adapter.load(checkpoint), None, adapter.forward)

    def __call__(self, report: Report, ops: tuple[PatchOp, ...]) -> Preview:
        from deadneuron.patch import Plan, apply_to_config, op_from_dict

        reinit = _reinit_sites(ops)
        try:
            plan = Plan(tuple(op_from_dict(op.to_dict()) for op in ops))
            config, record = apply_to_config(self.config, plan, init="checkpoint" if reinit else "scratch")
        except (DeadneuronError, ValueError) as exc:
            return Preview(problems=(str(exc),))
        problems = list(record.not_patched)
        if not record.changes and not reinit:
            notes = f" ({'; '.join(record.notes)})" if record.notes else ""
            problems.append(f"the checkpoint's config already has it{notes}")
        if reinit:
            self._reinit._example = self.example()
            problems += self._reinit.problems(reinit)
        sites = set(reinit)
        if any(op.kind is PatchKind.SWAP_ACTIVATION for op in ops) and not problems:
            before, after = self._site_labels(self.config), self._site_labels(config)
            if isinstance(before, str) or isinstance(after, str):
                return Preview(frozenset(sites), (before if isinstance(before, str) else str(after),))
            sites |= {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
        return Preview(frozenset(sites), tuple(problems))

    def example(self) -> Any:
        if self._example is None:
            self._example = next(iter(self.adapter.batches("heldout", self.config)), None)
        return self._example

    def _site_labels(self, config: Mapping[str, Any]) -> dict[str, str] | str:
        """Site name -> activation label of the model ``config`` builds (one batch), or why it failed."""
        key = repr(sorted((k, repr(v)) for k, v in config.items()))
        if key not in self._labels:
            self._labels[key] = self._measure(config)
        return self._labels[key]

    def _measure(self, config: Mapping[str, Any]) -> dict[str, str] | str:
        from deadneuron.audit import audit

        try:
            model = self.adapter.build(config)
            report = audit(model, [self.example()], adapter=self.adapter, progress=False, compile=False, rules=False)
        except DeadneuronError as exc:
            return f"the changed config could not be checked ({exc})"
        return {name: site.label for name, site in report.sites.items()}


__all__ = ["ConfigPreview", "ModelPreview"]
