"""What a finding's fix would change on a live subject, measured: the previews a
:class:`deadneuron.rules.PatchTarget` checks fixes with.

:class:`ModelPreview` is module surgery on a model (``deadneuron patch --model``, or
:func:`deadneuron.patch.apply_plan` in Python): the swap's reach is read off the report
(:func:`deadneuron.rules.surgery_preview`), an added BatchNorm's layers are found as
:func:`deadneuron.patch.batchnorm.add_batchnorm` finds them (the model is not changed), and dead-channel
re-initialisation is checked on one forward pass of an example batch for a conv/linear layer that feeds
each site. :class:`ConfigPreview` is a deadneuron checkpoint: the plan becomes its config change exactly as
``deadneuron patch`` makes it (the keys' parts measured by :mod:`deadneuron.patch.parts`, ``--select``
globs choosing the keys), and the sites whose activation or feeding layer differs between the models of
both configs are the change's reach. Neither changes the model or the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from deadneuron.errors import DeadneuronError
from deadneuron.ops import AddBatchNorm, Op, ReinitDead, SetHyperParameter
from deadneuron.rules import Preview, surgery_preview
from deadneuron.rules.target import fed_sites, select_patterns

if TYPE_CHECKING:
    from torch import nn

    from deadneuron.adapters import Adapter
    from deadneuron.patch.config import ConfigMap
    from deadneuron.patch.parts import SiteInfo
    from deadneuron.report import Report

Forward = Callable[["nn.Module", Any], Any]


def _reinit_sites(ops: tuple[Op, ...]) -> list[str]:
    return [site for op in ops if isinstance(op, ReinitDead) for site in op.channel_sites]


class _ReinitCheck:
    """Which sites' dead channels could get fresh incoming weights: one recorded forward pass, kept."""

    def __init__(self, model: Callable[[], nn.Module], example: Any, forward: Forward | None, *,
                 no_pass: str = "") -> None:  # fmt: skip
        self._model, self._example, self._forward, self._no_pass = model, example, forward, no_pass
        self._flow: Any = None

    def problems(self, sites: list[str]) -> list[str]:
        if not sites:
            return []
        if self._no_pass:
            return [self._no_pass]
        if self._example is None:
            return ["no example batch to find the layers around the dead channels"]
        from deadneuron._inputs import default_forward
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
                return dataflow(self._model(), _fed(run, example))
            except Exception as exc:  # the audit's report stands; this fix is only not suggested
                error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        return f"the forward pass that maps layers to sites failed ({error})"


def _fed(run: Forward, example: Any) -> Callable[[nn.Module], Any]:
    """``run`` with its batch fixed to ``example``."""

    def feed(model: nn.Module) -> Any:
        return run(model, example)

    return feed


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
    """Module surgery on ``model``: swaps from the report, BatchNorm placed on the model's own layers,
    re-initialisation checked on ``example``. With ``train`` (``deadneuron patch --train``) a learning rate
    is the patched arm's ``lr=`` where ``train`` takes one (:func:`deadneuron.patch.own.train_keywords`).
    ``no_pass``: why no forward pass may run here (re-initialisation is then not checked, for that reason)."""

    def __init__(self, model: nn.Module, example: Any, *, forward: Forward | None = None,
                 train: Callable[..., Any] | None = None, no_pass: str = "") -> None:  # fmt: skip
        self._model, self._train = model, train
        self._reinit = _ReinitCheck(lambda: model, example, forward, no_pass=no_pass)

    def __call__(self, report: Report, ops: tuple[Op, ...]) -> Preview:
        norms = [op for op in ops if isinstance(op, AddBatchNorm)]
        trained = [op for op in ops if isinstance(op, SetHyperParameter) and self._train is not None]
        preview = surgery_preview(report, tuple(op for op in ops if op not in norms and op not in trained))
        sites, problems = set(preview.sites), [*preview.problems, *self._reinit.problems(_reinit_sites(ops))]
        problems += self._train_problems(trained)
        for op in norms:
            if report.meta.get("select"):
                problems += surgery_preview(report, (op,)).problems
                continue
            layers, why = self._batchnorm_layers(report, op)
            sites |= fed_sites(report, layers)
            problems += why
        return Preview(frozenset(sites), tuple(problems))

    def _train_problems(self, ops: list[SetHyperParameter]) -> list[str]:
        """Why ``train`` cannot take the hyper-parameter changes ``ops`` (none where it can)."""
        if not ops or self._train is None:
            return []
        from deadneuron.patch import Plan
        from deadneuron.patch.own import train_keywords

        try:
            train_keywords(self._train, Plan(tuple(ops)))
        except DeadneuronError as exc:
            return [str(exc)]
        return []

    def _batchnorm_layers(self, report: Report, op: AddBatchNorm) -> tuple[list[str], list[str]]:
        """The layers ``--add-batchnorm`` with the op's ``--select`` would give a BatchNorm, and why not."""
        from deadneuron.errors import PatchError
        from deadneuron.patch.batchnorm import planned_layers

        try:
            layers, problems = planned_layers(self._model, AddBatchNorm(select_patterns(op)), report)
        except PatchError as exc:
            return [], [str(exc)]
        return list(layers), problems


class ConfigPreview:
    """A deadneuron checkpoint: the config change ``deadneuron patch`` would make (the stored config with
    the adapter's defaults, its keys' parts measured once, ``--select`` mapped onto them), and the sites
    whose activation or feeding layer that change alters in the model built from it."""

    def __init__(self, adapter: Adapter, checkpoint: Mapping[str, Any]) -> None:
        from deadneuron.patch.parts import full_config

        self.adapter = adapter
        self.config = full_config(adapter, checkpoint.get("config") or {})
        self._parts: tuple[dict[str, SiteInfo], ConfigMap] | str | None = None
        self._reach: dict[str, list[str] | str] = {}
        self._example: Any = None
        self._reinit = _ReinitCheck(lambda: adapter.load(checkpoint), None, adapter.forward)

    def __call__(self, report: Report, ops: tuple[Op, ...]) -> Preview:
        from deadneuron.patch import Plan, apply_to_config
        from deadneuron.patch.parts import outside

        parts = self._mapped(report)
        if isinstance(parts, str):
            return Preview(problems=(parts,))
        reinit = _reinit_sites(ops)
        try:
            plan = Plan(ops)
            config, record = apply_to_config(self.config, plan, init="checkpoint" if reinit else "scratch",
                                             parts=parts[1])  # fmt: skip
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
        if record.changes and not problems:
            reach = self._changed(config, parts[0])
            if isinstance(reach, str):
                return Preview(frozenset(sites), (reach,))
            extra = outside(reach, record.targets) if record.targets else []
            if extra:  # deadneuron patch refuses this plan
                problems.append(f"the config change also reaches {', '.join(extra)}, which no selected part holds "
                                "(a key such as NEGATIVE_SLOPE is shared by every part)")  # fmt: skip
            sites |= set(reach)
        return Preview(frozenset(sites), tuple(problems))

    def example(self) -> Any:
        if self._example is None:
            self._example = next(iter(self.adapter.batches("heldout", self.config)), None)
        return self._example

    def _mapped(self, report: Report) -> tuple[dict[str, SiteInfo], ConfigMap] | str:
        """The model's sites (named by ``report``, else by a one-batch audit where the audit was limited
        by --select) and the parts each config key decides; measured once, or why that failed."""
        if self._parts is None:
            from deadneuron.patch.parts import config_map, site_infos

            try:
                sites = site_infos(self.adapter, self.config, None if report.meta.get("select") else report)
                self._parts = (sites, config_map(self.adapter, self.config, sites))
            except DeadneuronError as exc:
                self._parts = f"which sites each config key decides could not be measured ({exc})"
        return self._parts

    def _changed(self, config: Mapping[str, Any], sites: Mapping[str, SiteInfo]) -> list[str] | str:
        """The sites whose activation or feeding layer differs in the model ``config`` builds, or why the
        changed config could not be built."""
        from deadneuron.patch.parts import changed_sites

        key = repr(sorted((k, repr(v)) for k, v in config.items()))
        if key not in self._reach:
            try:
                self._reach[key] = changed_sites(self.adapter, self.config, config, sites)
            except DeadneuronError as exc:
                self._reach[key] = f"the changed config could not be checked ({exc})"
        return self._reach[key]


__all__ = ["ConfigPreview", "ModelPreview"]
