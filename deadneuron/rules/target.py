"""Fixes checked against the subject: a fix is suggested only where ``deadneuron patch`` can apply it to
the audited model and it changes exactly the sites its finding names; else the finding says why.

A :class:`PatchTarget` says how ``deadneuron patch`` reaches the subject: the words that name it on a
command line (the checkpoint and the audit's own ``--model``, ``--model-arg``, ``--data`` or
``--input-shape`` ... flags), whether it has a training config (a deadneuron checkpoint: learning rate,
epochs and dropout are config keys, and an activation swap lands where the config places it), and a
``preview`` of what a fix would change. Module surgery (any other model) swaps an activation *module* at
every site that calls it and every functional activation in the code of the module that calls it, so its
preview is read off the report (:func:`surgery_preview`); a config's reach is measured by the caller,
which can build the model. Pure: values in, values out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from deadneuron.ops import AddBatchNorm, Op, ReinitDead, SetHyperParameter, SwapActivation, select_flags
from deadneuron.rules.model import Fix

if TYPE_CHECKING:
    from deadneuron.report import Report, SiteHealth


@dataclass(frozen=True)
class Preview:
    """What one fix would do to the subject: the sites whose activation it changes, and what stops it."""

    sites: frozenset[str] = frozenset()
    problems: tuple[str, ...] = ()


PreviewFn = Callable[["Report", tuple[Op, ...]], Preview]


@dataclass(frozen=True)
class PatchTarget:
    """How ``deadneuron patch`` reaches the audited subject.

    ``words``: the checkpoint and the subject flags, as they go on the command line (None: the subject has
    no command line, as a model audited in Python: fixes are checked, no command is written).
    ``config``: the subject is a deadneuron checkpoint whose training config the patch changes.
    ``preview``: what a fix would change (default: module surgery, read off the report).
    ``limits``: audit flags that ``deadneuron patch`` cannot repeat (its own audit of the model would
    then read other channels), which keep dead-channel re-initialisation from being suggested.
    ``unreachable``: why no fix can be applied to this subject at all ("" where fixes can be).
    ``retrains``: ``deadneuron patch`` retrains the subject (an adapter checkpoint always; a model of your
    own with ``--train``), so re-initialising dead channels keeps the trained weights (``--init checkpoint``).
    """

    words: tuple[str, ...] | None = None
    config: bool = False
    preview: PreviewFn | None = None
    limits: tuple[str, ...] = ()
    unreachable: str = ""
    retrains: bool = False

    def check(self, report: Report, fix: Fix) -> str | None:
        """Why ``fix`` is not suggested for this subject, or None when it applies exactly."""
        shown = " ".join(word for op in fix.ops for word in _short_flags(op, config=self.config))
        if self.unreachable:
            return f"`{shown}`: {self.unreachable}"
        if self.limits and any(isinstance(op, ReinitDead) for op in fix.ops):
            return (f"`{shown}`: the audit ran with {', '.join(self.limits)}, which deadneuron patch does not take, "
                    "so its own audit would look for dead channels elsewhere")
        preview_of = self.preview or surgery_preview
        preview = preview_of(report, fix.ops)
        if preview.problems:
            return f"`{shown}`: {'; '.join(preview.problems)}"
        placed = [op for op in fix.ops if _named_sites(report, op) is not None]
        for op in placed:
            named = _named_sites(report, op)
            assert named is not None
            reach = preview.sites if len(placed) == 1 else preview_of(report, (op,)).sites
            if reach != named:
                return f"`{shown}` at {_few(sorted(named))}: {_reach_text(report, op, named, reach, config=self.config)}"
        return None

    def command(self, fix: Fix) -> str | None:
        return None if self.words is None else fix.command(self.words, adapter_model=self.config or self.retrains)


_LITERAL = re.compile(r"[^*?\[]*")  # a glob without wildcards matches only itself


def surgery_preview(report: Report, ops: tuple[Op, ...]) -> Preview:
    """What ``deadneuron patch --model`` would change, from the report: the module-surgery selection of
    :func:`deadneuron.patch.apply_plan` (a swapped module changes at all its call sites; a swapped
    functional call changes every functional activation in its module's own code; a BatchNorm after the
    layer feeding a site changes every site that layer feeds; an audit limited by ``select`` cannot tell).
    A training hyper-parameter is out of its reach: the model has no config. Which layers can take a
    BatchNorm needs the model (:class:`deadneuron.reach.ModelPreview`); here a site needs a producer."""
    sites: set[str] = set()
    problems: list[str] = []
    for op in ops:
        placed = isinstance(op, (SwapActivation, AddBatchNorm))
        if placed and report.meta.get("select"):
            what = "share these activations" if isinstance(op, SwapActivation) else "these layers feed"
            problems.append(f"the audit measured only the sites matching its --select, so which other sites {what} "
                            "is unknown; audit without --select to have this fix suggested")
        elif isinstance(op, SwapActivation):
            sites |= _swapped_sites(report, select_patterns(op))
        elif isinstance(op, AddBatchNorm):
            producers = select_producers(report, select_patterns(op))
            sites |= fed_sites(report, producers.values())
            problems += _unfed(producers)
        elif isinstance(op, SetHyperParameter):
            problems.append(f"the model has no training config that deadneuron patch could change; set the "
                            f"{op.name.replace('_', ' ')} in your training script")
        elif isinstance(op, ReinitDead):
            sites |= set(op.channel_sites)
    return Preview(frozenset(sites), tuple(problems))


def select_patterns(op: SwapActivation | AddBatchNorm) -> tuple[str, ...]:
    """The ``--select`` globs of the op's command (each selecting exactly one of its sites)."""
    return tuple(select_flags(op.sites)[1::2])


def select_producers(report: Report, patterns: Sequence[str]) -> dict[str, str | None]:
    """Site -> its producer, for the sites ``--add-batchnorm --select PATTERNS`` selects (every site with a
    producer without patterns; which of those are conv-fed needs the model)."""
    picked: dict[str, str | None] = {}
    for s in report.sites.values():
        names = (s.name, s.module, f"module:{s.module}", s.kind, f"kind:{s.kind}")
        if _any_match(names, patterns) if patterns else s.producer is not None:
            picked[s.name] = s.producer
    return picked


def fed_sites(report: Report, layers: Iterable[str | None]) -> set[str]:
    """The sites a BatchNorm after ``layers`` changes: every site one of them feeds."""
    wanted = {layer for layer in layers if layer is not None}
    return {s.name for s in report.sites.values() if s.producer in wanted}


def _unfed(producers: dict[str, str | None]) -> list[str]:
    return [f"{site}: fed by no layer deadneuron can see, so no BatchNorm can be added before it"
            for site, p in producers.items() if p is None]  # fmt: skip


def _named_sites(report: Report, op: Op) -> frozenset[str] | None:
    """The sites a site-placing op's finding names (None for an op that places nothing, as a learning
    rate, or that re-initialises its own sites' channels)."""
    if isinstance(op, SwapActivation):
        return frozenset(op.sites) or frozenset(_sites_of_kind(report, "relu"))
    if isinstance(op, AddBatchNorm) and op.sites:
        return frozenset(op.sites)
    return None


def _swapped_sites(report: Report, patterns: Sequence[str]) -> set[str]:
    """The sites of ``report`` a swap selecting ``patterns`` changes (every relu site without patterns)."""
    if not patterns:
        return set(_sites_of_kind(report, "relu"))
    sites = list(report.sites.values())
    modules: dict[str, list[SiteHealth]] = {}  # module -> its sites (the functional ones: of its own code)
    owners: dict[str, list[SiteHealth]] = {}
    for s in sites:
        (owners if s.functional else modules).setdefault(s.module, []).append(s)
    picked_modules = {m for m, own in modules.items() if _any_match(_module_names(m, own), patterns)}
    picked_owners = {m for m, own in owners.items() if any(_any_match(_function_names(s, own), patterns) for s in own)}
    return {s.name for s in sites if (s.module in picked_owners if s.functional else s.module in picked_modules)}


def _module_names(module: str, own: Sequence[SiteHealth]) -> tuple[str, ...]:
    """What a swap's --select may name to take an activation module: the module, its kind, its sites."""
    kinds = dict.fromkeys(k for s in own for k in (s.kind, f"kind:{s.kind}"))
    return (module, f"module:{module}", *kinds, *(s.name for s in own))


def _function_names(site: SiteHealth, named: Sequence[SiteHealth]) -> tuple[str, ...]:
    """What a swap's --select may name to take a functional site: the function in its owner's code, its kind,
    the owner's functional sites (``named``)."""
    fname = site.name.rsplit(">", 1)[-1].rsplit(".", 1)[-1].split("#", 1)[0]
    owner = site.module
    return (f"{owner}.{fname}", f"function:{owner or '<root>'}.{fname}", site.kind, f"kind:{site.kind}",
            *(s.name for s in named))  # fmt: skip


def _any_match(names: Iterable[str], patterns: Sequence[str]) -> bool:
    names = tuple(n for n in names if n)
    for p in patterns:
        if p in names if _LITERAL.fullmatch(p) else any(fnmatchcase(n, p) for n in names):
            return True
    return False


def _sites_of_kind(report: Report, kind: str) -> list[str]:
    return [s.name for s in report.sites.values() if s.kind == kind]


def _reach_text(report: Report, op: Op, named: frozenset[str], changed: frozenset[str], *,
                config: bool) -> str:  # fmt: skip
    extra, missing = sorted(changed - named), sorted(named - changed)
    if isinstance(op, AddBatchNorm):
        return _batchnorm_reach(report, extra, missing, changed, config=config)
    if config and missing:
        reach = f"of {_few(sorted(changed))} only" if changed else "of none of these sites"
        return f"the checkpoint's config sets the activation {reach}, not of {_few(missing)}"
    if config:
        return (f"the checkpoint's config sets one activation for {_few(sorted(changed))}: the swap would also "
                f"change {_few(extra)}, which this finding does not name")
    if extra:
        modules = sorted({report.sites[s].module for s in extra if s in report.sites})
        return (f"{_few(modules)} also runs at {_few(extra)}, which this finding does not name; a swap changes a "
                "module (and the functional calls in a module's code) at all its sites")
    return f"module surgery cannot reach {_few(missing)}"


def _batchnorm_reach(report: Report, extra: list[str], missing: list[str], changed: frozenset[str], *,
                     config: bool) -> str:  # fmt: skip
    if config and missing:
        reach = f"for {_few(sorted(changed))} only" if changed else "for none of these sites"
        return f"the checkpoint's config switches BatchNorm on {reach}, not for {_few(missing)}"
    if config:
        return (f"the checkpoint's config switches BatchNorm on for {_few(sorted(changed))} together: it would also "
                f"change {_few(extra)}, which this finding does not name")
    if extra:
        layers = sorted({str(report.sites[s].producer) for s in extra if s in report.sites})
        return (f"{_few(layers)} also feeds {_few(extra)}, which this finding does not name; a BatchNorm after a "
                "layer changes every site it feeds")
    return f"no BatchNorm can be added before {_few(missing)}"


def _short_flags(op: Op, *, config: bool) -> tuple[str, ...]:
    """The op's flags without the ``--select`` list (the reason names the sites)."""
    flags = op.flags(adapter_model=config)
    out: list[str] = []
    skip = False
    for word in flags:
        if skip:
            skip = False
        elif word == "--select":
            skip = True
        else:
            out.append(word)
    return tuple(out)


def _few(items: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown} and {len(items) - limit} more" if len(items) > limit else shown


__all__ = ["PatchTarget", "Preview", "PreviewFn", "fed_sites", "select_patterns", "select_producers",
           "surgery_preview"]
